//! Engines on two test hosts of this machine (network namespaces joined by veth links,
//! `scripts/testnet.sh`): separate processes on separate network stacks, so the connection crosses
//! real interfaces and routes, the engines see each other as remote (no same-host path, with no
//! knob), and a link can be taken down under a transfer. The parent test makes the hosts and starts
//! a server and a client process on them; each child checks what it can see and says so on stdout.

use std::time::{Duration, Instant};

use testkit::netns::TestNet;
use uccl_tcpx::{Config, Engine, Locality, OneSided, UcclStatus};

mod common;
use common::engine::{fifo_from_hex, fifo_to_hex};
use common::{ChildTest, PATIENCE, assert_same, pattern, wait_done};

/// The tests that measure rates run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server's advertised region.
const REGION: usize = 32 << 20;
/// The client's message to the server, and the server's reply.
const MESSAGE: usize = (1 << 20) + 3;
const REPLY: usize = 70_001;
/// What a transfer may take on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(60);
/// The engines' stall timeout where a test takes a link away.
const STALL_MS: u64 = 2_000;

/// The environment's settings (the parent passes each child the knobs it wants, and no other), at
/// this host's control address.
fn config(own_ip: &str, timeout_ms: u64) -> Config {
    // `RUST_LOG` shows the children's logs (the parent clears their `UCCL_TCPX_` knobs).
    uccl_tcpx::init_logging();
    Config {
        ip: Some(own_ip.parse().unwrap()),
        timeout: Duration::from_millis(timeout_ms),
        ..Config::from_env().unwrap()
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"))
}

/// The server: one advertised region holding `pattern(REGION, 1)`; prints its port and FifoItem,
/// accepts one connection, and in the exchange run takes a message, answers it and notifies.
#[test]
#[ignore = "started by the tests of this file on a test host"]
fn server_host() {
    assert!(common::is_child("server_host"));
    let engine = Engine::new(config(&var("TESTNET_SELF"), var("TESTNET_STALL_MS").parse().unwrap())).unwrap();
    let region = pattern(REGION, 1);
    let mr = engine.register(region.as_ptr() as usize, REGION).unwrap();
    let item = engine.prepare_fifo(mr, region.as_ptr() as usize, REGION).unwrap();
    let inbox = vec![0u8; 2 * MESSAGE];
    let imr = engine.register(inbox.as_ptr() as usize, inbox.len()).unwrap();
    println!("SERVER {} {}", engine.address().port(), fifo_to_hex(&item));
    let conn = engine.accept().unwrap();
    assert_eq!(conn.peer.locality, Locality::Remote, "a client on another test host is remote");
    if std::env::var("TESTNET_EXCHANGE").is_ok() {
        let r = conn.recv(imr, inbox.as_ptr() as usize, inbox.len()).unwrap();
        assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), MESSAGE as u64);
        assert_same(&inbox[..MESSAGE], &pattern(MESSAGE, 2), "the client's message");
        assert!(inbox[MESSAGE..].iter().all(|&b| b == 0), "nothing past the message");
        let reply = pattern(REPLY, 3);
        let rmr = engine.register(reply.as_ptr() as usize, REPLY).unwrap();
        let s = conn.send(&[(rmr, reply.as_ptr() as usize, REPLY)]).unwrap();
        assert_eq!(wait_done(&conn, s, LIMIT).unwrap(), REPLY as u64);
        conn.notify(b"server-host", b"served").unwrap();
        println!("SERVED ok");
    }
    testkit::child::park_until_killed()
}

/// The client's engine connected to the server whose announcement is in TESTNET_SERVER.
fn connect_to_server(timeout_ms: u64) -> (Engine, std::sync::Arc<uccl_tcpx::Connection>, uccl_tcpx::FifoItem) {
    let server = var("TESTNET_SERVER");
    let mut words = server.split_whitespace();
    let (ip, port, hex) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap());
    let engine = Engine::new(config(&var("TESTNET_SELF"), timeout_ms)).unwrap();
    let conn = engine.connect(ip, "0", port.parse().unwrap()).unwrap();
    assert_eq!(conn.peer.locality, Locality::Remote, "a server on another test host is remote");
    (engine, conn, fifo_from_hex(hex))
}

/// Every kind of transfer against the server, bytes checked at both ends.
#[test]
#[ignore = "started by the tests of this file on a test host"]
fn client_exchange() {
    assert!(common::is_child("client_exchange"));
    let (engine, conn, remote) = connect_to_server(10_000);
    let at = |offset: usize| uccl_tcpx::FifoItem { addr: remote.addr + offset as u64, ..remote };
    let mut local = vec![0u8; REGION + 64];
    let base = local.as_mut_ptr() as usize;
    let mr = engine.register(base, local.len()).unwrap();

    // The whole region, read at an odd local offset.
    let r = conn.read(&[OneSided { mr, addr: base + 1, len: REGION, remote }]).unwrap();
    assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), REGION as u64);
    assert_same(&local[1..=REGION], &pattern(REGION, 1), "the server's region read across hosts");

    // A write into the middle, read back.
    let fresh = pattern((3 << 20) + 5, 4);
    local[..fresh.len()].copy_from_slice(&fresh);
    let w = conn.write(&[OneSided { mr, addr: base, len: fresh.len(), remote: at(12_345) }]).unwrap();
    assert_eq!(wait_done(&conn, w, LIMIT).unwrap(), fresh.len() as u64);
    local.fill(0);
    let r = conn.read(&[OneSided { mr, addr: base + 7, len: fresh.len(), remote: at(12_345) }]).unwrap();
    assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), fresh.len() as u64);
    assert_same(&local[7..7 + fresh.len()], &fresh, "a write read back across hosts");

    // A vector: pieces of several sizes at scattered places on both ends, one transfer.
    let pieces = [(5usize, 6 << 20), (65_537, 5 << 20), (300_000, 4 << 20), (1 << 20, 1 << 20)];
    let mut items = Vec::new();
    let mut offset = 0;
    for (i, &(len, roff)) in pieces.iter().enumerate() {
        local[offset..offset + len].copy_from_slice(&pattern(len, 10 + i as u64));
        items.push(OneSided { mr, addr: base + offset, len, remote: at(roff) });
        offset += len + 4099;
    }
    let total: u64 = pieces.iter().map(|p| p.0 as u64).sum();
    let w = conn.write(&items).unwrap();
    assert_eq!(wait_done(&conn, w, LIMIT).unwrap(), total);
    local.fill(0);
    let r = conn.read(&items).unwrap();
    assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), total);
    for (i, item) in items.iter().enumerate() {
        let at = item.addr - base;
        assert_same(&local[at..at + item.len], &pattern(item.len, 10 + i as u64), &format!("vector piece {i}"));
    }

    // Two-sided both ways, then the server's notification.
    let message = pattern(MESSAGE, 2);
    local[..MESSAGE].copy_from_slice(&message);
    let s = conn.send(&[(mr, base, MESSAGE)]).unwrap();
    assert_eq!(wait_done(&conn, s, LIMIT).unwrap(), MESSAGE as u64);
    local.fill(0);
    let r = conn.recv(mr, base + 3, 2 * REPLY).unwrap();
    assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), REPLY as u64);
    assert_same(&local[3..3 + REPLY], &pattern(REPLY, 3), "the server's reply");
    testkit::wait_until("the server's notification arrives", LIMIT, || {
        uccl_tcpx::drain_notifications(16).iter().any(|n| n.name == b"server-host" && n.msg == b"served")
    });
    println!("CLIENT ok");
}

/// Writes the whole region until one fails (the parent takes a link away or kills the server in
/// between), then reports how it failed and how long closing the engine took.
#[test]
#[ignore = "started by the tests of this file on a test host"]
fn client_until_failure() {
    assert!(common::is_child("client_until_failure"));
    let (engine, conn, remote) = connect_to_server(var("TESTNET_STALL_MS").parse().unwrap());
    let src = pattern(REGION, 5);
    let mr = engine.register(src.as_ptr() as usize, REGION).unwrap();
    let write = || conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: REGION, remote }]);
    let w = write().unwrap();
    assert_eq!(wait_done(&conn, w, LIMIT).unwrap(), REGION as u64);
    println!("WRITING");
    let start = Instant::now();
    let failure = loop {
        assert!(start.elapsed() < LIMIT, "no write failed within {LIMIT:?}");
        let outcome = write().and_then(|id| wait_done(&conn, id, LIMIT));
        match outcome {
            Ok(n) => assert_eq!(n, REGION as u64, "a write that succeeds moves every byte"),
            Err(e) => break e,
        }
    };
    // Every later transfer fails as well, alike.
    let after = write().and_then(|id| wait_done(&conn, id, LIMIT)).expect_err("a write after the failure");
    assert_eq!(after.status(), failure.status(), "a later write fails alike: {after}");
    // The failed connection still says what its links carried, the writes that succeeded too.
    let links = conn.link_stats();
    let sent: u64 = links.iter().map(|l| l.out.bytes).sum();
    assert!(!links.is_empty() && sent >= REGION as u64, "links after the failure: {links:?}");
    println!("FAILED {:?} {}", failure.status(), failure);
    let closing = Instant::now();
    drop(conn);
    drop(engine);
    println!("CLOSED {}", closing.elapsed().as_millis());
}

/// Writes the whole region with a fresh pattern and reads it back, checking every byte, round
/// after round until the file TESTNET_STOP exists (the parent takes a data link down and up in
/// between); reports each round's time and every failure.
#[test]
#[ignore = "started by the tests of this file on a test host"]
fn client_across_a_link_failure() {
    assert!(common::is_child("client_across_a_link_failure"));
    let (engine, conn, remote) = connect_to_server(var("TESTNET_STALL_MS").parse().unwrap());
    let stop = std::path::PathBuf::from(var("TESTNET_STOP"));
    let patterns = [pattern(REGION, 100), pattern(REGION, 101)];
    let mut src = vec![0u8; REGION];
    let mut back = vec![0u8; REGION];
    let mr = engine.register(src.as_ptr() as usize, REGION).unwrap();
    let bmr = engine.register(back.as_ptr() as usize, REGION).unwrap();
    let mut round = 0u64;
    while !stop.exists() {
        assert!(round < 10_000, "the parent never said stop");
        // Each round's bytes differ from the last's, so a stale piece would show.
        src.copy_from_slice(&patterns[round as usize % 2]);
        println!("WRITE {round}");
        let start = Instant::now();
        let w = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: REGION, remote }]);
        let written = w.and_then(|id| wait_done(&conn, id, LIMIT));
        let write_ms = start.elapsed().as_millis();
        let r = conn.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: REGION, remote }]);
        let read = r.and_then(|id| wait_done(&conn, id, LIMIT));
        if let Err(e) = written.as_ref().and(read.as_ref()) {
            println!("ROUND FAILED {:?} {e}", e.status());
            return;
        }
        assert_eq!((written.unwrap(), read.unwrap()), (REGION as u64, REGION as u64));
        assert_same(&back, &src, &format!("round {round}: the region written and read back"));
        println!("ROUND {round} {write_ms} {}", start.elapsed().as_millis());
        round += 1;
    }
    let errors: u64 = conn.link_stats().iter().map(|l| l.out.errors + l.inbound.errors).sum();
    println!("CLIENT ok {errors}");
}

/// Writes the whole region again and again for about TESTNET_BYTES bytes after a warm-up, checks
/// one write read back, and reports the rate in bytes per second.
#[test]
#[ignore = "started by the tests of this file on a test host"]
fn client_throughput() {
    assert!(common::is_child("client_throughput"));
    let (engine, conn, remote) = connect_to_server(10_000);
    let src = pattern(REGION, 6);
    let mr = engine.register(src.as_ptr() as usize, REGION).unwrap();
    let write = || {
        let id = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: REGION, remote }]).unwrap();
        assert_eq!(wait_done(&conn, id, LIMIT).unwrap(), REGION as u64);
    };
    write();
    let rounds = var("TESTNET_BYTES").parse::<usize>().unwrap().div_ceil(REGION);
    let start = Instant::now();
    for _ in 0..rounds {
        write();
    }
    let rate = (rounds * REGION) as f64 / start.elapsed().as_secs_f64();
    let mut back = vec![0u8; REGION];
    let bmr = engine.register(back.as_mut_ptr() as usize, REGION).unwrap();
    let r = conn.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: REGION, remote }]).unwrap();
    assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), REGION as u64);
    assert_same(&back, &src, "the last write read back");
    let links: Vec<String> = conn.link_stats().iter().map(|t| format!("{}={}", t.link, t.out.bytes)).collect();
    println!("LINKS {}", links.join(" "));
    println!("RATE {rate:.0}");
}

/// Host 1's server and a client on host 0, as separate processes, both with `extra` set.
fn start(net: &TestNet, client: &str, extra: &[(&str, &str)]) -> (testkit::child::Peer, ChildTest) {
    let stall = STALL_MS.to_string();
    let mut server = ChildTest::new("server_host")
        .ignored()
        .env_cleared("UCCL_TCPX_")
        .env("TESTNET_SELF", net.addr(1, 0).to_string())
        .env("TESTNET_STALL_MS", &stall);
    for (k, v) in extra {
        server = server.env(k, v);
    }
    let mut server = server.on_host(net, 1).spawn();
    let announced = server.announcement("SERVER ", PATIENCE);
    let mut client = ChildTest::new(client)
        .ignored()
        .env_cleared("UCCL_TCPX_")
        .env("TESTNET_SELF", net.addr(0, 0).to_string())
        .env("TESTNET_STALL_MS", &stall)
        .env("TESTNET_SERVER", format!("{} {}", net.addr(1, 0), announced.trim()));
    for (k, v) in extra {
        client = client.env(k, v);
    }
    (server, client.on_host(net, 0))
}

#[test]
fn host_memory_across_two_test_hosts() {
    let Some(net) = TestNet::up(1, None) else { return };
    let (mut server, client) = start(&net, "client_exchange", &[("TESTNET_EXCHANGE", "1")]);
    let out = client.run_within(Duration::from_secs(180));
    assert!(out.contains("CLIENT ok"), "the client checked everything:\n{out}");
    assert_eq!(server.announcement("SERVED ", PATIENCE).trim(), "ok");
    // The bytes crossed host 0's control link (every socket goes to the server's advertised
    // address today): at least the region read and the vector, both ways.
    let (sent, received) = net.link_bytes(0, 0);
    assert!(received > REGION as u64 && sent > (3 << 20), "control link carried {sent} / {received} bytes");
}

/// A failure's report from `client_until_failure`: its status, and how long closing took.
fn failure_report(client: &mut testkit::child::Peer) -> (String, Duration) {
    let failed = client.announcement("FAILED ", LIMIT + PATIENCE);
    let closed = client.announcement("CLOSED ", PATIENCE);
    (failed, Duration::from_millis(closed.trim().parse().unwrap()))
}

#[test]
fn the_link_to_the_server_going_down_fails_transfers_within_the_stall_timeout() {
    let Some(net) = TestNet::up(1, None) else { return };
    let (_server, client) = start(&net, "client_until_failure", &[]);
    let mut client = client.spawn();
    client.announcement("WRITING", LIMIT);
    // The server's end of the link, as if its NIC failed: no reset reaches the client, packets
    // just stop.
    net.set_link(1, 0, false);
    let down = Instant::now();
    let (failed, closing) = failure_report(&mut client);
    let after = down.elapsed();
    println!("link down: {failed}; failed {after:?} after, closing took {closing:?}");
    assert!(
        failed.starts_with(&format!("{:?}", UcclStatus::ErrTimeout))
            || failed.starts_with(&format!("{:?}", UcclStatus::ErrRemoteDisconnect)),
        "a lost link fails the transfer as a timeout or a lost peer: {failed}"
    );
}

/// The server's processes killed on its host, with every socket on the control link, then with
/// the data sockets on two data links (where each socket's failure is first taken for its link's).
#[test]
fn a_server_killed_on_its_host_fails_transfers_promptly() {
    for (links, extra) in [(1, &[][..]), (2, &[("UCCL_TCPX_SOCKET_IFNAME", "dat")][..])] {
        let Some(net) = TestNet::up(links, None) else { return };
        let (server, client) = start(&net, "client_until_failure", extra);
        let mut client = client.spawn();
        client.announcement("WRITING", LIMIT);
        let killed = Instant::now();
        drop(server);
        let (failed, closing) = failure_report(&mut client);
        println!("server killed ({extra:?}): {failed}; failed {:?} after, closing took {closing:?}", killed.elapsed());
        assert!(
            failed.starts_with(&format!("{:?}", UcclStatus::ErrRemoteDisconnect)),
            "a killed peer is a lost peer ({extra:?}): {failed}"
        );
    }
}

/// The control link going down where the data sockets run over two data links: the data still
/// flows, but no Done can come, so every transfer fails within the stall timeout as a peer that
/// is unreachable, and closing the engine returns promptly.
#[test]
fn the_control_link_going_down_fails_every_transfer_as_unreachable() {
    let Some(net) = TestNet::up(2, None) else { return };
    let (_server, client) = start(&net, "client_until_failure", &[("UCCL_TCPX_SOCKET_IFNAME", "dat")]);
    let mut client = client.spawn();
    client.announcement("WRITING", LIMIT);
    net.set_link(1, 0, false);
    let down = Instant::now();
    let (failed, closing) = failure_report(&mut client);
    let after = down.elapsed();
    println!("control link down: {failed}; failed {after:?} after, closing took {closing:?}");
    assert!(
        failed.starts_with(&format!("{:?}", UcclStatus::ErrTimeout)) && failed.contains("unreachable"),
        "a lost control link fails the transfer as an unreachable peer: {failed}"
    );
}

/// Every data link going down under writes (the control link stays): no socket is left to fail
/// over to, so the transfer fails within the stall timeout, as a timeout or a lost peer, and
/// closing the engine returns promptly.
#[test]
fn every_data_link_going_down_fails_transfers_within_the_stall_timeout() {
    let Some(net) = TestNet::up(2, None) else { return };
    let (_server, client) = start(&net, "client_until_failure", &[("UCCL_TCPX_SOCKET_IFNAME", "dat")]);
    let mut client = client.spawn();
    client.announcement("WRITING", LIMIT);
    net.set_link(1, 1, false);
    net.set_link(1, 2, false);
    let down = Instant::now();
    let (failed, closing) = failure_report(&mut client);
    let after = down.elapsed();
    println!("every data link down: {failed}; failed {after:?} after, closing took {closing:?}");
    assert!(
        failed.starts_with(&format!("{:?}", UcclStatus::ErrTimeout))
            || failed.starts_with(&format!("{:?}", UcclStatus::ErrRemoteDisconnect)),
        "losing every data link fails the transfer as a timeout or a lost peer: {failed}"
    );
}

/// Rounds of the client's checked writes and reads that the parent reads as they come: (round,
/// write ms, round ms).
fn next_round(client: &mut testkit::child::Peer, limit: Duration) -> (u64, u64, u64) {
    let line = client.announcement("ROUND ", limit);
    assert!(!line.starts_with("FAILED"), "a transfer across the link failure failed: {line}");
    let n: Vec<u64> = line.split_whitespace().map(|w| w.parse().unwrap()).collect();
    (n[0], n[1], n[2])
}

/// A data link taken down at the server's end in the middle of a write (two data links of 200
/// Mbit/s): that write and every later write and read complete with every byte right, over the
/// link that remains, the write across the failure within the stall timeout of the others' time;
/// once the link is back, the connection dials it again and it carries both ways.
#[test]
fn a_data_link_going_down_mid_transfer_fails_over_and_is_used_again_once_back() {
    let _serial = serial();
    let Some(net) = TestNet::up(2, Some("200mbit")) else { return };
    let dir = std::env::temp_dir().join(format!("uccl-failover-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let stop = dir.to_string_lossy().into_owned();
    let extra = [("UCCL_TCPX_SOCKET_IFNAME", "dat"), ("TESTNET_STOP", &stop)];
    let (_server, client) = start(&net, "client_across_a_link_failure", &extra);
    let mut client = client.spawn();
    let link2 = |net: &TestNet| net.link_bytes(0, 2);
    let (_, _, _) = next_round(&mut client, LIMIT);
    let before = link2(&net);
    let (_, write, _) = next_round(&mut client, LIMIT);
    let both = link2(&net);
    assert!(both.0 - before.0 > (4 << 20), "link 2 carried writes before it failed: {before:?} -> {both:?}");
    // Down at the server's end a while into the next write, which takes `write` ms.
    let writing: u64 = client.announcement("WRITE ", LIMIT).trim().parse().unwrap();
    let into = Duration::from_millis(write / 4);
    std::thread::sleep(into);
    net.set_link(1, 2, false);
    let down = Instant::now();
    let (round, across, _) = next_round(&mut client, LIMIT);
    assert_eq!(round, writing);
    println!("link down {into:?} into write {round}: it took {across} ms, {write} ms before");
    assert!(Duration::from_millis(across) > into, "the write was in flight when the link went down");
    // Later rounds run over the link that remains.
    while down.elapsed() < Duration::from_secs(3) {
        let (round, w, total) = next_round(&mut client, LIMIT);
        println!("link down: round {round} writes {w} ms, round {total} ms");
    }
    net.set_link(1, 2, true);
    let up = Instant::now();
    let (sent, received) = link2(&net);
    // The link is dialed again within a few back-offs (each at most 16 quarters of the stall
    // timeout) and carries writes out and reads in.
    loop {
        let (round, _, total) = next_round(&mut client, LIMIT);
        let now = link2(&net);
        if now.0 - sent > (8 << 20) && now.1 - received > (8 << 20) {
            println!("link back: used again {:?} after, by round {round} ({total} ms)", up.elapsed());
            break;
        }
        assert!(up.elapsed() < Duration::from_secs(60), "link 2 was not used again: {sent}/{received} -> {now:?}");
    }
    std::fs::write(&dir, b"stop").unwrap();
    let done = client.announcement("CLIENT ok ", LIMIT);
    let _ = std::fs::remove_file(&dir);
    let errors: u64 = done.trim().parse().unwrap();
    assert!(errors >= 1, "the failed link's sockets count errors: {errors}");
}

/// Bytes per second the client's writes reached on `net` with `extra` set at both ends, and the
/// bytes host 0 sent on each data link meanwhile, by the interface's counter. The client's own
/// per-link counts of payload sent must agree: at most what the interface sent (which adds
/// headers) and, for a link that carried the writes, at least 90 % of it.
fn write_rate(net: &TestNet, links: usize, bytes: usize, extra: &[(&str, &str)]) -> (f64, Vec<u64>) {
    let before: Vec<u64> = (1..=links).map(|l| net.link_bytes(0, l).0).collect();
    let bytes = bytes.to_string();
    let mut extra = extra.to_vec();
    extra.push(("TESTNET_BYTES", &bytes));
    let (_server, client) = start(net, "client_throughput", &extra);
    let out = client.run_within(Duration::from_secs(240));
    let rate = out.split("RATE ").nth(1).and_then(|r| r.split_whitespace().next()).expect("the client's rate");
    let sent: Vec<u64> = (1..=links).zip(before).map(|(l, b)| net.link_bytes(0, l).0 - b).collect();
    let ours: std::collections::HashMap<String, u64> = out
        .split("LINKS ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .expect("the client's per-link counts")
        .split_whitespace()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.parse().unwrap())).unwrap())
        .collect();
    for (l, &wire) in (1..=links).zip(&sent) {
        let counted = ours.get(&net.addr(0, l).to_string()).copied().unwrap_or(0);
        assert!(counted <= wire, "data link {l}: counted {counted} payload bytes, the interface sent {wire}");
        if wire > (8 << 20) {
            assert!(counted as f64 >= 0.9 * wire as f64, "data link {l}: counted {counted}, the interface sent {wire}");
        }
    }
    (rate.parse().unwrap(), sent)
}

/// Four data links shaped to one rate: named exactly, one link carries the writes alone; named by
/// their prefix (`UCCL_TCPX_SOCKET_IFNAME=dat`), all four carry an even share. The rates are
/// printed (a figure for benchmarks: a loaded host bends them); the interfaces' byte counts are
/// the check.
#[test]
fn four_data_links_carry_four_times_one() {
    const MBIT: f64 = 200.0;
    let _serial = serial();
    let Some(net) = TestNet::up(4, Some("200mbit")) else { return };
    let link = MBIT * 1e6 / 8.0;
    let (one, sent) = write_rate(&net, 4, 64 << 20, &[("UCCL_TCPX_SOCKET_IFNAME", "=dat0_1,dat1_1")]);
    println!("one link: {:.1} MB/s ({:.2} of {MBIT} Mbit/s); per link {sent:?}", one / 1e6, one / link);
    assert!(sent[0] > (64 << 20) && sent[1..].iter().all(|&b| b < (1 << 20)), "only the named link: {sent:?}");
    let (rate, sent) = write_rate(&net, 4, 192 << 20, &[("UCCL_TCPX_SOCKET_IFNAME", "dat")]);
    let total: u64 = sent.iter().sum();
    println!("four links: {:.1} MB/s ({:.2} of 4 x {MBIT} Mbit/s); per link {sent:?}", rate / 1e6, rate / (4.0 * link));
    for (l, &bytes) in sent.iter().enumerate() {
        let share = bytes as f64 / total as f64;
        assert!((0.2..=0.3).contains(&share), "data link {} carried {:.0}% of the bytes", l + 1, share * 100.0);
    }
}

/// Bytes per second the writes reach over three data links at 200 Mbit/s and a fourth at 50 with
/// `sockets` per channel, against the links' sum, and what each link carried; `None` where test
/// hosts cannot be made. `extra` goes to both ends.
fn slow_link_rate(sockets: &str, extra: &[(&str, &str)]) -> Option<(f64, Vec<u64>)> {
    const MBIT: f64 = 200.0;
    let net = TestNet::up(4, Some("200mbit"))?;
    net.set_rate(4, "50mbit");
    let sum = 3.25 * MBIT * 1e6 / 8.0;
    let mut all = vec![("UCCL_TCPX_SOCKET_IFNAME", "dat"), ("UCCL_TCPX_SOCKET_NTHREADS", sockets)];
    all.extend_from_slice(extra);
    let (rate, sent) = write_rate(&net, 4, 160 << 20, &all);
    println!(
        "three links and a slow one, {sockets} sockets per channel: {:.1} MB/s ({:.2} of their sum); per link {sent:?}",
        rate / 1e6,
        rate / sum
    );
    Some((rate / sum, sent))
}

/// Three data links at one rate and a fourth at a quarter of it: a socket takes pieces as its link
/// drains them, and one of the slow link leaves the last pieces of a write to faster ones, so the
/// slow link carries about its share instead of an even split (as NCCL's), which would hold the
/// writes to four times the slowest. The rate against the links' sum is printed.
#[test]
fn a_slow_link_does_not_hold_the_others_back() {
    let _serial = serial();
    let Some((_, sent)) = slow_link_rate("1", &[]) else { return };
    assert!((sent[3] as f64) < 0.4 * sent[0] as f64, "the slow link carried about its share: {sent:?}");
}

/// As above with eight sockets per channel (the default from 16 cores), four of them on the slow
/// link: each holds a piece and a backlog in the kernel, which end a write late unless those
/// sockets stop taking pieces in time. The client's trace shows them leaving pieces to faster
/// sockets, and `trace_summary.py` counts those.
#[test]
fn a_slow_link_with_several_sockets_does_not_hold_the_others_back() {
    let _serial = serial();
    let dir = common::trace::fresh_dir("slow-link");
    let trace = format!("socket:{}/t", dir.display());
    let Some((_, sent)) = slow_link_rate("8", &[("UCCL_TCPX_TRACE", &trace)]) else { return };
    assert!((sent[3] as f64) < 0.4 * sent[0] as f64, "the slow link carried about its share: {sent:?}");
    let declined: usize = common::trace::files(&dir)
        .iter()
        .map(|f| common::trace::rows(f).iter().filter(|r| r.event == "sock_declined").count())
        .sum();
    assert!(declined > 0, "no socket left a piece to a faster one");
    let out = common::trace::run_script("trace_summary.py", &[&format!("{}/t", dir.display())]);
    let counted: usize = out
        .lines()
        .filter_map(|l| l.split("pieces left to faster sockets ").nth(1))
        .map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(counted, declined, "the summary counts every declined piece:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The harness leaves nothing behind, and a second net of the same process gets its own names.
#[test]
fn test_hosts_are_removed_with_their_links() {
    let Some(a) = TestNet::up(2, Some("100mbit")) else { return };
    let b = TestNet::up(1, None).expect("a second net");
    assert_ne!(a.ns(0), b.ns(0));
    let names = [a.ns(0), a.ns(1), b.ns(0), b.ns(1)];
    let listed = || {
        String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap()
    };
    assert!(names.iter().all(|n| listed().contains(n.as_str())), "{}", listed());
    drop(a);
    drop(b);
    let left = listed();
    assert!(names.iter().all(|n| !left.contains(n.as_str())), "left behind: {left}");
}
