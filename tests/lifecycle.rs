//! Tearing things down while transfers run: `close_connection` (C: `uccl_engine_conn_destroy`) and
//! `deregister` (`uccl_engine_mr_destroy`) with 64 MiB transfers in flight, engine shutdown with
//! connections and transfers open, `stop_accept` racing handshakes, a connection's listener stopped
//! and restarted. Nothing may crash or hang (every
//! wait is bounded), every transfer id must end in success or an error (never stay in progress), and
//! once a close returns no transport may touch the caller's memory again (`tests/fence.rs` checks
//! the same for `deregister` byte by byte).

use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::{Config, Connection, Engine, FifoItem, OneSided, UcclStatus};

mod common;
use common::{PATIENCE, Pair, pattern, wait, wait_done as outcome, within};

const BIG: usize = 64 << 20;
/// Bound on any single transfer id reaching a final state after a teardown.
const SETTLE: Duration = PATIENCE;

fn config() -> Config {
    Config {
        num_channels: Some(2),
        chunk_size: 256 << 10,
        connect_timeout: Duration::from_secs(5),
        ..common::loopback()
    }
}

fn accept(engine: &Arc<Engine>) -> Arc<Connection> {
    common::accept(engine).unwrap()
}

fn pair() -> Pair {
    common::pair(config())
}

/// Large buffers on both engines: A's source and read-back, B's target and send source.
struct Buffers {
    src: Vec<u8>,
    back: Vec<u8>,
    target: Vec<u8>,
    smr: u64,
    bmr: u64,
    tmr: u64,
    item: FifoItem,
}

impl Buffers {
    fn new(p: &Pair) -> Buffers {
        let mut src = vec![0u8; BIG];
        // A few distinct bytes per MiB make a misplaced or partial copy visible to a memcmp.
        for (i, chunk) in src.chunks_mut(1 << 20).enumerate() {
            chunk.fill(0x40 + i as u8);
            chunk[7] = i as u8;
        }
        let mut back = vec![0u8; BIG];
        let mut target = vec![0u8; BIG];
        let smr = p.a.register(src.as_ptr() as usize, BIG).unwrap();
        let bmr = p.a.register(back.as_mut_ptr() as usize, BIG).unwrap();
        let tmr = p.b.register(target.as_mut_ptr() as usize, BIG).unwrap();
        let item = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, BIG).unwrap();
        Buffers { src, back, target, smr, bmr, tmr, item }
    }

    fn write(&self, conn: &Connection) -> uccl_tcpx::Result<u64> {
        conn.write(&[OneSided { mr: self.smr, addr: self.src.as_ptr() as usize, len: BIG, remote: self.item }])
    }

    fn read(&mut self, conn: &Connection) -> uccl_tcpx::Result<u64> {
        conn.read(&[OneSided { mr: self.bmr, addr: self.back.as_mut_ptr() as usize, len: BIG, remote: self.item }])
    }
}

/// Posts `rounds` times a 64 MiB write and a 64 MiB read, then a 64 MiB send (with B's receive), so
/// that the later ones are still queued or in flight when the teardown comes.
fn post_big_transfers(p: &Pair, bufs: &mut Buffers, rounds: usize) -> (Vec<(&'static str, u64)>, u64) {
    let rid = p.ba.recv(bufs.tmr, bufs.target.as_mut_ptr() as usize, BIG).unwrap();
    let mut ids = Vec::new();
    for _ in 0..rounds {
        ids.push(("write", bufs.write(&p.ab).unwrap()));
        ids.push(("read", bufs.read(&p.ab).unwrap()));
    }
    ids.push(("send", p.ab.send(&[(bufs.smr, bufs.src.as_ptr() as usize, BIG)]).unwrap()));
    (ids, rid)
}

/// Checks the outcomes of the posted ids; returns how many failed (were really cut off).
fn settle(conn: &Connection, ids: &[(&str, u64)], allowed: &[UcclStatus]) -> usize {
    let mut failed = 0;
    for &(what, id) in ids {
        match outcome(conn, id, SETTLE) {
            Ok(n) => assert_eq!(n, BIG as u64, "{what} completed short"),
            Err(e) => {
                assert!(allowed.contains(&e.status()), "{what}: unexpected {e}");
                failed += 1;
            }
        }
        // Reported once, then unknown.
        assert_eq!(conn.poll(id).unwrap_err().status(), UcclStatus::ErrNotFound, "{what} reported twice");
    }
    failed
}

/// `buf` still holds `then`, what it held when a close (or shutdown) returned. Called once every
/// transfer the close cut off reached its final state on both ends and the engines moved data on a
/// fresh connection: a transport still writing the caller's memory would have changed it by then.
fn assert_untouched_since(buf: &[u8], then: &[u8], what: &str) {
    assert!(buf == then, "{what}: memory changed after the close returned");
}

fn assert_new_connection_works(a: &Arc<Engine>, b: &Arc<Engine>) {
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = accept(b);
    let src = vec![0x77u8; 100_000];
    let mut dst = vec![0u8; 100_000];
    let smr = a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    assert_eq!(outcome(&ab, s, SETTLE).unwrap(), 100_000);
    assert_eq!(outcome(&ba, r, SETTLE).unwrap(), 100_000);
    assert!(dst == src);
    a.close_connection(&ab);
    b.close_connection(&ba);
    a.deregister(smr).unwrap();
    b.deregister(dmr).unwrap();
}

#[test]
fn close_connection_with_64_mib_transfers_in_flight() {
    let p = pair();
    let mut bufs = Buffers::new(&p);
    let (ids, rid) = post_big_transfers(&p, &mut bufs, 1);
    let start = Instant::now();
    let (a, ab) = (p.a.clone(), p.ab.clone());
    within(PATIENCE, "close_connection", move || a.close_connection(&ab));
    let closed_in = start.elapsed();
    // After the close returned no transport touches the initiator's memory.
    let back_then = bufs.back.clone();
    let failed = settle(&p.ab, &ids, &[UcclStatus::ErrCanceled]);
    assert!(failed > 0, "every 64 MiB transfer finished before the close: nothing was in flight");
    match outcome(&p.ba, rid, SETTLE) {
        Ok(n) => assert_eq!(n, BIG as u64),
        Err(e) => assert_eq!(e.status(), UcclStatus::ErrRemoteDisconnect, "{e}"),
    }
    // Both ends refuse new work with the right status.
    assert_eq!(bufs.write(&p.ab).unwrap_err().status(), UcclStatus::ErrCanceled);
    assert_eq!(p.ba.notify(b"x", b"y").unwrap_err().status(), UcclStatus::ErrRemoteDisconnect);
    // Closing again, and from the other side, is harmless.
    p.a.close_connection(&p.ab);
    p.b.close_connection(&p.ba);
    eprintln!("close with 3 x 64 MiB in flight: returned in {closed_in:?}, {failed} of {} cut off", ids.len());
    assert_new_connection_works(&p.a, &p.b);
    assert_untouched_since(&bufs.back, &back_then, "read destination");
}

#[test]
fn peer_closes_while_64_mib_transfers_are_in_flight() {
    let p = pair();
    let mut bufs = Buffers::new(&p);
    let (ids, rid) = post_big_transfers(&p, &mut bufs, 1);
    let (b, ba) = (p.b.clone(), p.ba.clone());
    within(PATIENCE, "close_connection", move || b.close_connection(&ba));
    // The target closed: nothing may land in its memory any more.
    let target_then = bufs.target.clone();
    let allowed = [UcclStatus::ErrRemoteDisconnect, UcclStatus::ErrBackend];
    let failed = settle(&p.ab, &ids, &allowed);
    assert!(failed > 0, "nothing was in flight");
    match outcome(&p.ba, rid, SETTLE) {
        Ok(n) => assert_eq!(n, BIG as u64),
        Err(e) => assert_eq!(e.status(), UcclStatus::ErrCanceled, "{e}"),
    }
    // Every read ended: nothing may land in the initiator's memory any more either.
    let back_then = bufs.back.clone();
    assert_new_connection_works(&p.a, &p.b);
    assert_untouched_since(&bufs.target, &target_then, "write target");
    assert_untouched_since(&bufs.back, &back_then, "read destination");
}

/// Waits (bounded) until the first byte of `buf` changed from zero: data is moving into it.
fn wait_first_byte(buf: &[u8], what: &str) {
    let deadline = Instant::now() + SETTLE;
    // SAFETY: `buf` is a live, initialised slice. The bytes are filled by the kernel (a recv on the
    // engine's channel thread), so the read must be volatile to be repeated rather than hoisted.
    while unsafe { std::ptr::read_volatile(buf.as_ptr()) } == 0 {
        assert!(Instant::now() < deadline, "{what}: no byte arrived");
        std::hint::spin_loop();
    }
}

#[test]
fn deregister_during_64_mib_transfers() {
    let p = pair();
    let mut bufs = Buffers::new(&p);
    // 1. Deregistered right after the post: the request may reach the target before or after.
    let w = bufs.write(&p.ab).unwrap();
    let r = bufs.read(&p.ab).unwrap();
    p.b.deregister(bufs.tmr).unwrap();
    let mut early = Vec::new();
    for (what, id) in [("write", w), ("read", r)] {
        match outcome(&p.ab, id, SETTLE) {
            Ok(n) => {
                assert_eq!(n, BIG as u64);
                early.push(format!("{what} ok"));
            }
            Err(e) => {
                assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "{what}: {e}");
                early.push(format!("{what} refused"));
            }
        }
    }
    // 2. Deregistered (both sides) while the bytes are moving: the running flows are cut off (the
    //    rest of their bytes move through scratch memory) and fail with NOT_ALLOWED, unless they
    //    finished before; new requests are refused.
    let tmr2 = p.b.register(bufs.target.as_mut_ptr() as usize, BIG).unwrap();
    let item2 = p.b.prepare_fifo(tmr2, bufs.target.as_mut_ptr() as usize, BIG).unwrap();
    bufs.target.fill(0);
    let w =
        p.ab.write(&[OneSided { mr: bufs.smr, addr: bufs.src.as_ptr() as usize, len: BIG, remote: item2 }]).unwrap();
    wait_first_byte(&bufs.target, "write");
    p.b.deregister(tmr2).unwrap();
    p.a.deregister(bufs.smr).unwrap();
    let moving = [("write", outcome(&p.ab, w, SETTLE))];
    let tmr3 = p.b.register(bufs.target.as_mut_ptr() as usize, BIG).unwrap();
    let item3 = p.b.prepare_fifo(tmr3, bufs.target.as_mut_ptr() as usize, BIG).unwrap();
    bufs.target.copy_from_slice(&bufs.src);
    bufs.back.fill(0);
    let op = OneSided { mr: bufs.bmr, addr: bufs.back.as_mut_ptr() as usize, len: BIG, remote: item3 };
    let r = p.ab.read(&[op]).unwrap();
    wait_first_byte(&bufs.back, "read");
    p.b.deregister(tmr3).unwrap();
    p.a.deregister(bufs.bmr).unwrap();
    let read = outcome(&p.ab, r, SETTLE);
    for (what, done) in moving.into_iter().chain([("read", read)]) {
        match done {
            Ok(n) => assert_eq!(n, BIG as u64, "{what} completed short"),
            Err(e) => assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "{what}: {e}"),
        }
    }
    eprintln!("deregister right after post: {early:?}");
    // 3. Every stale item is refused; stale local ids are unknown.
    let fresh = p.a.register(bufs.src.as_ptr() as usize, 4096).unwrap();
    for item in [bufs.item, item2, item3] {
        let stale = p.ab.write(&[OneSided { mr: fresh, addr: bufs.src.as_ptr() as usize, len: 4096, remote: item }]);
        assert_eq!(outcome(&p.ab, stale.unwrap(), SETTLE).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    }
    let old_local = OneSided { mr: bufs.bmr, addr: bufs.back.as_mut_ptr() as usize, len: 16, remote: bufs.item };
    assert_eq!(p.ab.read(&[old_local]).unwrap_err().status(), UcclStatus::ErrNotFound);
    assert_eq!(p.b.deregister(bufs.tmr).unwrap_err().status(), UcclStatus::ErrNotFound);
    assert_new_connection_works(&p.a, &p.b);
}

#[test]
fn deregister_a_posted_receive_region_then_receive_into_it() {
    let p = pair();
    let src = vec![0x31u8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    // Deregistering cuts the posted receive off: it fails at once, and the send it matches is
    // refused; new posts naming the region are unknown.
    p.b.deregister(dmr).unwrap();
    assert_eq!(outcome(&p.ba, r, SETTLE).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert_eq!(p.ba.recv(dmr, dst.as_mut_ptr() as usize, 16).unwrap_err().status(), UcclStatus::ErrNotFound);
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    assert_eq!(outcome(&p.ab, s, SETTLE).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert!(dst.iter().all(|&b| b == 0));
}

#[test]
fn engine_shutdown_with_connections_and_transfers_open() {
    let p = pair();
    // A second connection, the other way round, with its own traffic.
    let ba2 = p.b.connect("127.0.0.1", "0", p.a.address().port()).unwrap();
    let ab2 = accept(&p.a);
    let mut bufs = Buffers::new(&p);
    let (ids, rid) = post_big_transfers(&p, &mut bufs, 6);
    let mut small = vec![0u8; 4096];
    let small_mr = p.b.register(small.as_mut_ptr() as usize, small.len()).unwrap();
    let pending_recv = ba2.recv(small_mr, small.as_mut_ptr() as usize, small.len()).unwrap();
    let b = p.b.clone();
    let start = Instant::now();
    within(PATIENCE, "Engine::shutdown", move || b.shutdown());
    let shutdown_in = start.elapsed();
    let target_then = bufs.target.clone();
    let failed = settle(&p.ab, &ids, &[UcclStatus::ErrRemoteDisconnect, UcclStatus::ErrBackend]);
    assert!(failed > 0, "nothing was in flight");
    for (conn, id) in [(&p.ba, rid), (&ba2, pending_recv)] {
        match outcome(conn, id, SETTLE) {
            Ok(n) => assert_eq!(n, BIG as u64),
            Err(e) => assert_eq!(e.status(), UcclStatus::ErrCanceled, "{e}"),
        }
    }
    // The shut-down engine refuses everything promptly; its old connection handles report the closure.
    let b = p.b.clone();
    assert_eq!(
        within(PATIENCE, "accept after shutdown", move || b.accept()).unwrap_err().status(),
        UcclStatus::ErrCanceled
    );
    let b = p.b.clone();
    let port = p.a.address().port();
    assert!(within(PATIENCE, "connect after shutdown", move || b.connect("127.0.0.1", "0", port)).is_err());
    assert!(ba2.notify(b"x", b"y").is_err());
    // The survivor notices the peer engine went away on its second connection too.
    common::wait_until("A notices that B shut down", SETTLE, || ab2.notify(b"x", b"y").is_err());
    p.b.shutdown();
    eprintln!("shutdown with 2 connections and {} x 64 MiB posted took {shutdown_in:?}, {failed} cut off", ids.len());
    // Dropping every handle (engines last) returns promptly.
    let Pair { a, b, ab, ba } = p;
    within(PATIENCE, "dropping engines and connections", move || {
        drop((ab, ba, ab2, ba2));
        drop((a, b));
    });
    assert_untouched_since(&bufs.target, &target_then, "B's memory after shutdown");
}

#[test]
fn dropping_an_engine_while_holding_its_connections() {
    let p = pair();
    let mut dst = vec![0u8; 4096];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let Pair { a, b, ab, ba } = p;
    within(PATIENCE, "dropping engine B", move || drop(b));
    // B's connection handle outlives its engine: it reports the closure instead of hanging.
    assert_eq!(outcome(&ba, r, SETTLE).unwrap_err().status(), UcclStatus::ErrCanceled);
    assert!(ba.notify(b"n", b"m").is_err());
    assert!(ba.recv(dmr, dst.as_mut_ptr() as usize, 16).is_err());
    common::wait_until("A notices that B went away", SETTLE, || ab.notify(b"n", b"m").is_err());
    within(PATIENCE, "dropping the rest", move || drop((ab, ba, a)));
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Write,
    Read,
    Send,
}

/// Rounds of 24 small pipelined transfers of `kinds`, each round's connection closed right after the
/// posts by A (the initiator) when `close_by_a(round)`, else by B: Grants and Data cross the Close on
/// the wire. Every id must end; returns (completed, failed).
fn close_right_after_posting(rounds: usize, kinds: &[Kind], close_by_a: impl Fn(usize) -> bool) -> (usize, usize) {
    let a = Arc::new(Engine::new(config()).unwrap());
    let b = Arc::new(Engine::new(config()).unwrap());
    let src = vec![0x5u8; 1 << 20];
    let mut back = vec![0u8; 1 << 20];
    let mut target = vec![0u8; 1 << 20];
    let smr = a.register(src.as_ptr() as usize, src.len()).unwrap();
    let bmr = a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let tmr = b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let item = b.prepare_fifo(tmr, target.as_mut_ptr() as usize, target.len()).unwrap();
    let (mut ok, mut failed) = (0usize, 0usize);
    for round in 0..rounds {
        let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let ba = accept(&b);
        let mut ids = Vec::new();
        for i in 0..24usize {
            let len = 1 + (i * 4099 + round * 31) % (64 << 10);
            let off = (i * 8192) % ((1 << 20) - len);
            let remote = FifoItem { addr: item.addr + off as u64, ..item };
            let kind = kinds[i % kinds.len()];
            let id = match kind {
                Kind::Write => ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]),
                Kind::Read => ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote }]),
                // B posts no receive: these stay announced until the close fails them.
                Kind::Send => ab.send(&[(smr, src.as_ptr() as usize, len)]),
            };
            ids.push((["write", "read", "send"][kind as usize], id.unwrap()));
        }
        let by_a = close_by_a(round);
        let (closer, closed, engine) = if by_a { (&a, &ab, "A") } else { (&b, &ba, "B") };
        closer.close_connection(closed);
        for (kind, id) in ids {
            let what = format!("round {round}, a {kind}, closed by {engine}");
            let end = format!("{what}: transfer {id} ends after the close");
            match common::eventually(&end, Duration::from_secs(10), || ab.poll(id).transpose()) {
                Ok(_) => ok += 1,
                Err(e) => {
                    let expected = if by_a { UcclStatus::ErrCanceled } else { UcclStatus::ErrRemoteDisconnect };
                    assert_eq!(e.status(), expected, "{what}: {e}");
                    failed += 1;
                }
            }
        }
        a.close_connection(&ab);
        b.close_connection(&ba);
    }
    (ok, failed)
}

#[test]
fn close_right_after_posting_never_strands_a_transfer() {
    let all = [Kind::Write, Kind::Read, Kind::Send];
    let (ok, failed) = close_right_after_posting(30, &all, |_| false);
    eprintln!("30 rounds closed by the target: {ok} transfers completed, {failed} failed, none stranded");
    let (ok2, failed2) = close_right_after_posting(30, &[Kind::Read, Kind::Send], |_| true);
    eprintln!("30 rounds of reads and sends closed by the initiator: {ok2} completed, {failed2} failed");
    assert!(failed > 0 && failed2 > 0, "no round was cut off mid-flight");
}

static ENGINE_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts panics on the engine's own threads (all named `uccl-*`), then runs the default hook.
fn count_engine_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with("uccl-")) {
                ENGINE_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

/// Regression (found here, fixed in 8b66d84): when the initiator closed while its reads were queued
/// at the target, the target's progress thread failed the connection on the data-channel EOF (`fail`
/// clears the channels) but its control reader kept handling the buffered ReadRequests, and
/// `channel::plan` over zero channels panicked ("attempt to calculate the remainder with a divisor
/// of zero"), killing the reader thread.
#[test]
fn reads_queued_at_a_failed_target_do_not_panic_its_reader() {
    count_engine_panics();
    let before = ENGINE_PANICS.load(std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = close_right_after_posting(40, &[Kind::Read], |_| true);
    eprintln!("40 rounds of reads closed by the initiator: {ok} completed, {failed} failed");
    let panics = ENGINE_PANICS.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(panics, 0, "{panics} engine threads panicked");
}

#[test]
fn stop_accept_racing_handshakes() {
    let mut outcomes = [0usize; 2];
    let connectors: Vec<Arc<Engine>> = (0..3).map(|_| Arc::new(Engine::new(config()).unwrap())).collect();
    for round in 0..12u64 {
        let b = Arc::new(Engine::new(config()).unwrap());
        let port = b.address().port();
        let b2 = b.clone();
        let (tx, blocked) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(b2.accept());
        });
        let handles: Vec<_> = connectors
            .iter()
            .cloned()
            .map(|c| std::thread::spawn(move || c.connect("127.0.0.1", "0", port).map(|conn| (c, conn))))
            .collect();
        std::thread::sleep(Duration::from_micros(round * 700));
        b.stop_accept();
        // A blocked accept may have taken one connection before the stop; afterwards it is canceled.
        let first = blocked.recv_timeout(PATIENCE).expect("stop_accept did not release a blocked accept");
        let b3 = b.clone();
        let later = within(PATIENCE, "accept after stop_accept", move || b3.accept());
        assert_eq!(later.unwrap_err().status(), UcclStatus::ErrCanceled);
        for h in handles {
            match within(PATIENCE, "a connect racing stop_accept", move || h.join()).unwrap() {
                Ok((c, conn)) => {
                    outcomes[0] += 1;
                    c.close_connection(&conn);
                }
                Err(e) => {
                    outcomes[1] += 1;
                    assert_ne!(e.status(), UcclStatus::ErrInternal, "{e}");
                }
            }
        }
        if let Ok(conn) = first {
            b.close_connection(&conn);
        }
        within(PATIENCE, "dropping the engine after stop_accept", move || drop(b));
    }
    eprintln!("connects racing stop_accept: {} completed, {} failed", outcomes[0], outcomes[1]);
}

/// Regression (found here, fixed in 8b66d84): after `stop_accept` the engine still completed every
/// incoming handshake and queued the connection for an accept that could no longer be called; the
/// connector got a working connection to a peer nobody could reach, holding threads and sockets until
/// the engine shut down.
#[test]
fn connect_after_stop_accept_is_refused() {
    let a = Engine::new(config()).unwrap();
    let b = Engine::new(config()).unwrap();
    b.stop_accept();
    let port = b.address().port();
    let result = a.connect("127.0.0.1", "0", port);
    assert!(result.is_err(), "a connect after stop_accept succeeded");
}

/// UCCL lets a connection's listener be stopped and started again. The restart must succeed, the
/// connection must move data and notifications before, during and after it, and the engine must
/// keep its metadata and accept loop, so a peer holding the metadata from before still connects.
#[test]
fn listener_restarts_and_the_engine_stays_reachable_at_its_metadata() {
    let p = pair();
    let held = p.b.metadata();
    let len = 256 << 10;
    let mut remote = vec![0u8; len];
    let rmr = p.b.register(remote.as_mut_ptr() as usize, len).unwrap();
    let fifo = p.b.prepare_fifo(rmr, remote.as_ptr() as usize, len).unwrap();

    p.ab.stop_listener(); // never started: nothing to stop, no error
    p.ba.start_listener().unwrap();
    assert_eq!(p.ba.start_listener().unwrap_err().status(), UcclStatus::ErrRepostActive);
    assert!(write_and_notify(&p.a, &p.ab, fifo, 1) == remote, "bytes before the restart");
    for round in 0..2u64 {
        p.ba.stop_listener();
        assert!(write_and_notify(&p.a, &p.ab, fifo, 10 + round) == remote, "bytes while stopped");
        p.ba.stop_listener();
        p.ba.start_listener().unwrap_or_else(|e| panic!("restart {round}: {e}"));
        assert_eq!(p.ba.start_listener().unwrap_err().status(), UcclStatus::ErrRepostActive);
        assert!(write_and_notify(&p.a, &p.ab, fifo, 20 + round) == remote, "bytes after the restart");
    }

    assert_eq!(p.b.metadata(), held, "the metadata changed across the restart");
    let port = held.split('?').next().and_then(|addr| addr.rsplit(':').next()).unwrap();
    let c = Engine::new(config()).unwrap();
    let cb = c.connect("127.0.0.1", "0", port.parse().unwrap()).expect("a peer holding the old metadata connects");
    common::accept(&p.b).unwrap().start_listener().unwrap();
    assert!(write_and_notify(&c, &cb, fifo, 30) == remote, "bytes from the late peer");
}

/// Writes a pattern of `fifo.size` bytes from `engine` through `conn` into `fifo`, then notifies,
/// and waits for the write's outcome and the notification; returns what was written.
fn write_and_notify(engine: &Engine, conn: &Connection, fifo: FifoItem, round: u64) -> Vec<u8> {
    let len = fifo.size as usize;
    let src = pattern(len, round);
    let smr = engine.register(src.as_ptr() as usize, len).unwrap();
    let id = conn.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote: fifo }]).unwrap();
    assert_eq!(wait(conn, id).unwrap(), len as u64, "round {round}: write");
    let name = format!("listener-restart-{round}").into_bytes();
    conn.notify(&name, b"m").unwrap();
    common::wait_until("the round's notification arrives", PATIENCE, || {
        uccl_tcpx::drain_notifications(16).into_iter().any(|n| n.name == name)
    });
    engine.deregister(smr).unwrap();
    src
}
