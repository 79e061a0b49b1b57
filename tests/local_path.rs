//! Same-host peers: a connection knows that its peer shares the host (boot id and network
//! namespace from the handshake) or the process (proven through this process's own tables), and
//! one-sided host transfers between engines of one process are copied directly, under the target's
//! authorization exactly as on the network path. `UCCL_TCPX_DISABLE_IPC` turns all of it off.

use std::time::Duration;

use uccl_tcpx::{Config, Engine, FifoItem, Locality, OneSided, UcclStatus};

mod common;
use common::{ChildTest, pair, same_host, wait};
use testkit::mapping::AlignedMapping;

const LEN: usize = 256 << 10;
const SENTINEL: u8 = 0x5a;

/// A registered buffer of `LEN` bytes filled with `fill`.
struct Buf {
    bytes: Vec<u8>,
    mr: u64,
}

impl Buf {
    fn new(engine: &Engine, fill: u8) -> Buf {
        let mut bytes = vec![fill; LEN];
        let mr = engine.register(bytes.as_mut_ptr() as usize, LEN).unwrap();
        Buf { bytes, mr }
    }

    fn addr(&self) -> usize {
        self.bytes.as_ptr() as usize
    }
}

#[test]
fn engines_of_one_process_are_local_and_copy_at_once() {
    let p = pair(same_host());
    assert_eq!(p.ab.peer.locality, Locality::SameProcess);
    assert_eq!(p.ba.peer.locality, Locality::SameProcess);
    let src_data = common::pattern(LEN, 11);
    let mut src = Buf::new(&p.a, 0);
    src.bytes.copy_from_slice(&src_data);
    let target = Buf::new(&p.b, SENTINEL);
    let item = p.b.prepare_fifo(target.mr, target.addr(), LEN).unwrap();

    let w = p.ab.write(&[OneSided { mr: src.mr, addr: src.addr(), len: LEN, remote: item }]).unwrap();
    // The direct copy is finished when the call returns; the network path needs the peer's Done.
    assert_eq!(p.ab.poll(w).unwrap(), Some(LEN as u64));
    common::assert_same(&target.bytes, &src_data, "target after a same-process write");

    let back = Buf::new(&p.a, 0);
    let mut remote = item;
    remote.addr += 100;
    let r = p.ab.read(&[OneSided { mr: back.mr, addr: back.addr() + 7, len: LEN - 100, remote }]).unwrap();
    assert_eq!(p.ab.poll(r).unwrap(), Some((LEN - 100) as u64));
    common::assert_same(&back.bytes[7..7 + LEN - 100], &src_data[100..], "read back from the target");

    // The accepting end initiates too, into the connector's memory.
    let a_item = p.a.prepare_fifo(back.mr, back.addr(), LEN).unwrap();
    let w = p.ba.write(&[OneSided { mr: target.mr, addr: target.addr(), len: 64, remote: a_item }]).unwrap();
    assert_eq!(wait(&p.ba, w).unwrap(), 64);
    assert_eq!(&back.bytes[..64], &src_data[..64]);

    // No items is refused on this path as on the network's, and leaves nothing in flight.
    for empty in [p.ab.write(&[]), p.ab.read(&[])] {
        assert_eq!(empty.unwrap_err().status(), uccl_tcpx::UcclStatus::ErrInvalidParam);
    }
    let stats = p.ab.stats();
    assert_eq!((stats.in_flight, stats.out.transfers, stats.inbound.transfers), (0, 1, 1), "{stats}");
}

#[test]
fn the_local_path_refuses_what_the_target_did_not_advertise() {
    let p = pair(same_host());
    let src = Buf::new(&p.a, 0x11);
    let target = Buf::new(&p.b, SENTINEL);
    let window = p.b.prepare_fifo(target.mr, target.addr() + 4096, 4096).unwrap();
    let mut outside = window;
    outside.addr -= 1;
    let mut wrong_token = window;
    let mut raw = wrong_token.to_bytes();
    raw[40] ^= 1;
    wrong_token = uccl_tcpx::FifoItem::from_bytes(&raw);
    assert_ne!(wrong_token.capability(), window.capability(), "byte 40 lies in the capability");
    for (what, remote) in [("before the window", outside), ("a forged token", wrong_token)] {
        let w = p.ab.write(&[OneSided { mr: src.mr, addr: src.addr(), len: 16, remote }]);
        let err = w.and_then(|id| wait(&p.ab, id)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what}: {err}");
    }
    assert!(target.bytes.iter().all(|&b| b == SENTINEL), "the target is untouched");

    // A deregistered target is refused as well, and the connection still serves the window again.
    let back = Buf::new(&p.a, 0);
    p.b.deregister(target.mr).unwrap();
    let r = p.ab.read(&[OneSided { mr: back.mr, addr: back.addr(), len: 16, remote: window }]);
    let err = r.and_then(|id| wait(&p.ab, id)).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{err}");
    assert!(back.bytes.iter().all(|&b| b == 0), "nothing was read");
    let again = Buf::new(&p.b, 0x77);
    let item = p.b.prepare_fifo(again.mr, again.addr(), LEN).unwrap();
    let r = p.ab.read(&[OneSided { mr: back.mr, addr: back.addr(), len: LEN, remote: item }]).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), LEN as u64);
    assert!(back.bytes.iter().all(|&b| b == 0x77));
}

#[test]
fn two_sided_and_notifications_work_on_a_local_connection() {
    let p = pair(same_host());
    assert!(p.ab.peer.locality.is_local());
    let src_data = common::pattern(LEN, 3);
    let mut src = Buf::new(&p.a, 0);
    src.bytes.copy_from_slice(&src_data);
    let dst = Buf::new(&p.b, 0);
    let r = p.ba.recv(dst.mr, dst.addr(), LEN).unwrap();
    let s = p.ab.send(&[(src.mr, src.addr(), LEN)]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), LEN as u64);
    assert_eq!(wait(&p.ba, r).unwrap(), LEN as u64);
    common::assert_same(&dst.bytes, &src_data, "received over a local connection");
    p.ab.notify(b"local-notify-test", b"hello").unwrap();
    let got = common::eventually("the notification arrives", common::PATIENCE, || {
        uccl_tcpx::drain_notifications(usize::MAX).into_iter().find(|n| n.name == b"local-notify-test")
    });
    assert_eq!(got.msg, b"hello");
}

#[test]
fn disabling_ipc_on_either_side_makes_the_peer_remote() {
    for (a_off, b_off) in [(true, true), (true, false), (false, true)] {
        let a = Engine::new(Config { disable_ipc: a_off, ..same_host() }).unwrap();
        let b = std::sync::Arc::new(Engine::new(Config { disable_ipc: b_off, ..same_host() }).unwrap());
        let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let ba = common::accept(&b).unwrap();
        assert_eq!((ab.peer.locality, ba.peer.locality), (Locality::Remote, Locality::Remote), "{a_off} {b_off}");
        // The network path still moves the data.
        let src = Buf::new(&a, 0x42);
        let target = Buf::new(&b, 0);
        let item = b.prepare_fifo(target.mr, target.addr(), LEN).unwrap();
        let w = ab.write(&[OneSided { mr: src.mr, addr: src.addr(), len: LEN, remote: item }]).unwrap();
        assert_eq!(wait(&ab, w).unwrap(), LEN as u64);
        assert!(target.bytes.iter().all(|&x| x == 0x42));
    }
}

#[test]
#[ignore = "runs as the peer process of another process on this host"]
fn host_peer_process() {
    assert!(common::is_child("host_peer_process"), "runs as the peer process of a_process_of_this_host_is_local");
    let engine = std::sync::Arc::new(Engine::new(same_host()).unwrap());
    let mut target = Buf::new(&engine, SENTINEL);
    target.bytes[..4].copy_from_slice(b"peer");
    let item = engine.prepare_fifo(target.mr, target.addr(), LEN).unwrap();
    println!("PEER {} {}", engine.address().port(), common::engine::fifo_to_hex(&item));
    let conn = common::accept(&engine).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    testkit::child::park_until_killed()
}

#[test]
fn a_process_of_this_host_is_local_and_moves_host_memory() {
    let mut process = ChildTest::new("host_peer_process").ignored().spawn();
    let line = process.announcement("PEER ", Duration::from_secs(120));
    let (port, hex) = line.trim().split_once(' ').unwrap();
    let item = common::engine::fifo_from_hex(hex);
    let engine = Engine::new(same_host()).unwrap();
    let conn = engine.connect("127.0.0.1", "0", port.parse().unwrap()).unwrap();
    // Same host, another process: local, but never taken for this process.
    assert_eq!(conn.peer.locality, Locality::SameHost);
    let back = Buf::new(&engine, 0);
    let r = conn.read(&[OneSided { mr: back.mr, addr: back.addr(), len: LEN, remote: item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_eq!(&back.bytes[..4], b"peer");
    assert!(back.bytes[4..].iter().all(|&b| b == SENTINEL));
    let src = Buf::new(&engine, 0x99);
    let w = conn.write(&[OneSided { mr: src.mr, addr: src.addr(), len: 8, remote: item }]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), 8);
    let r = conn.read(&[OneSided { mr: back.mr, addr: back.addr(), len: 8, remote: item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), 8);
    assert_eq!(&back.bytes[..8], &[0x99; 8]);
}

// ---- Between processes: host memory copied with process_vm_readv ----------------------------------

/// The target region of a direct-path peer: a guard page the writer is not given, then the window.
const GUARD: usize = 4096;
/// Three pieces and a bit (`local::PIECE_BYTES` is 4 MiB), so copies take several calls.
const WINDOW: usize = (12 << 20) + 333;
const WINDOW_SEED: u64 = 77;

/// Which end of the same-host check the peer process makes fail, as a kernel refusing ptrace
/// access would (`UCCL_TCPX_TEST_REFUSE=parent`: the peer cannot read its parent).
const REFUSE_VAR: &str = "UCCL_TCPX_TEST_REFUSE";

/// Set: the peer process makes itself not dumpable (`prctl(PR_SET_DUMPABLE, 0)`), so that a
/// process without `CAP_SYS_PTRACE` may read neither its memory nor its descriptors, whatever its
/// user: the kernel itself refuses.
const NOT_DUMPABLE_VAR: &str = "UCCL_TCPX_TEST_NOT_DUMPABLE";

/// Set: the peer process makes itself not dumpable when it receives SIGUSR1, so that a reader
/// without `CAP_SYS_PTRACE` that proved it readable loses its access between two copies.
const NOT_DUMPABLE_ON_SIGNAL_VAR: &str = "UCCL_TCPX_TEST_NOT_DUMPABLE_ON_SIGNAL";

#[test]
#[ignore = "runs as the peer process of another process on this host"]
fn direct_peer_process() {
    assert!(common::is_child("direct_peer_process"), "runs as the peer process of the direct-path tests");
    if std::env::var(REFUSE_VAR).as_deref() == Ok("parent") {
        uccl_tcpx::internal::engine::same_host::refuse_process_access(std::os::unix::process::parent_id());
    }
    if std::env::var_os(NOT_DUMPABLE_VAR).is_some() {
        // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
        assert_eq!(rc, 0, "prctl(PR_SET_DUMPABLE, 0): {}", std::io::Error::last_os_error());
    }
    if std::env::var_os(NOT_DUMPABLE_ON_SIGNAL_VAR).is_some() {
        // Its reader is a sibling, not an ancestor.
        allow_any_ptracer();
        extern "C" fn not_dumpable(_: libc::c_int) {
            // SAFETY: as above; a plain system call, safe in a signal handler.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
        }
        // SAFETY: the handler makes one system call and touches no memory of ours.
        let old = unsafe { libc::signal(libc::SIGUSR1, not_dumpable as *const () as libc::sighandler_t) };
        assert_ne!(old, libc::SIG_ERR, "signal(SIGUSR1): {}", std::io::Error::last_os_error());
    }
    let huge = std::env::var_os(HUGE_VAR).is_some();
    let band = std::env::var_os(BAND_VAR).is_some();
    let config = if band { band_config() } else { Config { host_copy_huge_pages: huge, ..same_host() } };
    let engine = std::sync::Arc::new(Engine::new(config).unwrap());
    let (mut plain, mut on_huge, mut on_small);
    let region: &mut [u8] = if huge {
        on_huge = AlignedMapping::new(GUARD + WINDOW, libc::MADV_HUGEPAGE, 0);
        &mut on_huge
    } else if band {
        on_small = small_page_mapping(GUARD + WINDOW, libc::MADV_NORMAL);
        &mut on_small
    } else {
        plain = vec![0; GUARD + WINDOW];
        &mut plain
    };
    region.fill(SENTINEL);
    region[GUARD..].copy_from_slice(&common::pattern(WINDOW, WINDOW_SEED));
    let mr = engine.register(region.as_mut_ptr() as usize, region.len()).unwrap();
    let window = engine.prepare_fifo(mr, region.as_ptr() as usize + GUARD, WINDOW).unwrap();
    // Read-only use by the test: it checks the guard through this capability.
    let guard = engine.prepare_fifo(mr, region.as_ptr() as usize, GUARD).unwrap();
    let hex = common::engine::fifo_to_hex;
    println!("PEER {} {} {}", engine.address().port(), hex(&window), hex(&guard));
    // Serve every connection the test opens.
    loop {
        let conn = common::accept(&engine).unwrap();
        std::mem::forget(conn);
    }
}

/// Set: the peer process backs its region with memory that asks for transparent huge pages and
/// heeds the page size of its copies' sources (`UCCL_TCPX_HOST_COPY_HUGE_PAGES`).
const HUGE_VAR: &str = "UCCL_TCPX_TEST_HUGE";

/// Set: the peer process backs its region with small pages and runs [`band_config`].
const BAND_VAR: &str = "UCCL_TCPX_TEST_BAND";

/// Transfers longer than 512 KiB and shorter than 4 MiB keep to the channels unless their source
/// lies on huge pages, and regions we are a source of are collapsed (the defaults of a host with
/// many CPUs, whatever this one has).
fn band_config() -> Config {
    Config {
        host_copy_network_band: Some((512 << 10, 4 << 20)),
        host_copy_huge_pages: true,
        host_copy_collapse: true,
        ..same_host()
    }
}

/// `len` zeroed bytes faulted in as small pages whatever the THP mode, in a mapping of their own;
/// with `MADV_NOHUGEPAGE` they stay advised against huge pages, which a collapse honours.
fn small_page_mapping(len: usize, advice: libc::c_int) -> AlignedMapping {
    if advice != libc::MADV_NOHUGEPAGE {
        return AlignedMapping::on_small_pages(len, |b| b.fill(0));
    }
    let buf = AlignedMapping::new(len, libc::MADV_NOHUGEPAGE, 0);
    // Its own mapping, as `on_small_pages` keeps one.
    buf.advise(libc::MADV_DONTFORK);
    buf
}

/// Whether at least 90 % of the resident bytes of the mappings of process `pid` overlapping
/// `[addr, addr + len)` lie on transparent huge pages, as its smaps say now.
fn smaps_say_huge(pid: u32, addr: usize, len: usize) -> bool {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut overlaps, mut rss, mut huge) = (false, 0u64, 0u64);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            overlaps = start < addr + len && addr < end;
        } else if overlaps {
            let kib = fields.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match first {
                "Rss:" => rss += kib,
                "AnonHugePages:" => huge += kib,
                _ => {}
            }
        }
    }
    rss > 0 && huge * 10 >= rss * 9
}

/// The peer process (started with the variables `env`), its engine's port, the window's and the
/// guard's capabilities.
fn direct_peer(env: &[(&str, &str)]) -> (testkit::child::Peer, u16, uccl_tcpx::FifoItem, uccl_tcpx::FifoItem) {
    let (process, line) = direct_peer_line(env);
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [port, window, guard] = fields[..] else { panic!("PEER line {line:?}") };
    let (window, guard) = (common::engine::fifo_from_hex(window), common::engine::fifo_from_hex(guard));
    (process, port.parse().unwrap(), window, guard)
}

/// The peer process and its announcement: port, window and guard.
fn direct_peer_line(env: &[(&str, &str)]) -> (testkit::child::Peer, String) {
    let mut child = ChildTest::new("direct_peer_process").ignored();
    for (key, value) in env {
        child = child.env(key, value);
    }
    let mut process = child.spawn();
    let line = process.announcement("PEER ", Duration::from_secs(120));
    (process, line)
}

/// Connects to the peer and waits until both ends checked each other's process.
fn checked_connection(engine: &Engine, port: u16) -> std::sync::Arc<uccl_tcpx::Connection> {
    let conn = engine.connect("127.0.0.1", "0", port).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    common::wait_until("both ends checked each other's process", common::PATIENCE, || conn.host_path().checked);
    conn
}

fn one(mr: u64, addr: usize, len: usize, remote: uccl_tcpx::FifoItem) -> OneSided {
    OneSided { mr, addr, len, remote }
}

/// Reads the peer's guard page and checks nobody wrote it.
fn assert_guard_untouched(engine: &Engine, conn: &uccl_tcpx::Connection, guard: uccl_tcpx::FifoItem) {
    let mut back = vec![0u8; GUARD];
    let mr = engine.register(back.as_mut_ptr() as usize, GUARD).unwrap();
    let r = conn.read(&[one(mr, back.as_ptr() as usize, GUARD, guard)]).unwrap();
    assert_eq!(wait(conn, r).unwrap(), GUARD as u64);
    assert!(back.iter().all(|&b| b == SENTINEL), "the guard page was written");
    engine.deregister(mr).unwrap();
}

#[test]
fn another_process_of_this_host_copies_host_memory_directly_under_the_targets_authorization() {
    let (_process, port, window, guard) = direct_peer(&[]);
    // Our reads are cut into pieces for four threads, whatever the host; the worker and the
    // helpers look for the next copy a while after each.
    let spin = Duration::from_micros(200);
    let engine = Engine::new(Config { host_copy_threads: 4, host_copy_spin: spin, ..same_host() }).unwrap();
    let conn = checked_connection(&engine, port);
    let path = conn.host_path();
    assert!(path.reads_peer && path.peer_reads_us, "{path:?}");

    // A read of the whole window, copied out of the peer in pieces.
    let mut buf = vec![0u8; WINDOW];
    let mr = engine.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    common::assert_same(&buf, &common::pattern(WINDOW, WINDOW_SEED), "read from the peer process");

    // A write of the whole window, copied in by the peer, read back.
    let data = common::pattern(WINDOW, 78);
    buf.copy_from_slice(&data);
    let w = conn.write(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), WINDOW as u64);
    buf.fill(0);
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    common::assert_same(&buf, &data, "written to the peer process and read back");

    // A vector of scattered items each way: one request, one copy.
    let items: Vec<OneSided> = [(0usize, 100usize, 200_000usize), (300_000, 5 << 20, 1 << 20), (2 << 20, 9 << 20, 77)]
        .iter()
        .map(|&(l, r, len)| {
            let mut remote = window;
            remote.addr += r as u64;
            one(mr, buf.as_ptr() as usize + l, len, remote)
        })
        .collect();
    let fresh = common::pattern(WINDOW, 79);
    buf.copy_from_slice(&fresh);
    let w = conn.write(&items).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), 200_000 + (1 << 20) + 77);
    buf.fill(0);
    let r = conn.read(&items).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), 200_000 + (1 << 20) + 77);
    for item in &items {
        let at = item.addr - buf.as_ptr() as usize;
        common::assert_same(&buf[at..at + item.len], &fresh[at..at + item.len], "vector item read back");
    }
    assert_eq!(conn.host_path().direct_ops, 5, "every large request took the direct path");

    // What the target did not advertise is refused on this path too, and nothing lands.
    let mut before = window;
    before.addr -= 16;
    let mut forged = window;
    let mut raw = forged.to_bytes();
    raw[40] ^= 1;
    forged = uccl_tcpx::FifoItem::from_bytes(&raw);
    for (what, remote) in [("16 bytes before the window", before), ("a forged token", forged)] {
        for write in [true, false] {
            let item = [one(mr, buf.as_ptr() as usize, 1 << 20, remote)];
            let posted = if write { conn.write(&item) } else { conn.read(&item) };
            let err = posted.and_then(|id| wait(&conn, id)).unwrap_err();
            assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what}, write {write}: {err}");
        }
    }
    assert_guard_untouched(&engine, &conn, guard);
    assert_eq!(conn.host_path().direct_ops, 5, "refusals are not counted, nor the small guard read");

    // Small transfers keep riding the control stream.
    let w = conn.write(&[one(mr, buf.as_ptr() as usize, 64, window)]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), 64);
    assert_eq!(conn.host_path().direct_ops, 5);
}

/// With `UCCL_TCPX_HOST_COPY_HUGE_PAGES` on both ends, host memory asking for huge pages moves
/// byte for byte both ways, inside the network band and above it; a transfer inside the band goes
/// direct exactly when its source lies on huge pages, which only the kernel decides.
#[test]
fn host_memory_on_huge_pages_moves_byte_exact_with_the_knob_on() {
    let (process, port, window, _guard) = direct_peer(&[(HUGE_VAR, "1")]);
    let band = Some((1 << 20, 12 << 20));
    let config =
        Config { host_copy_huge_pages: true, host_copy_network_band: band, host_copy_threads: 4, ..same_host() };
    let engine = Engine::new(config).unwrap();
    let conn = checked_connection(&engine, port);
    let mut buf = AlignedMapping::new(WINDOW, libc::MADV_HUGEPAGE, 0);
    let addr = buf.as_ptr() as usize;
    let mr = engine.register(addr, WINDOW).unwrap();
    let ours = || smaps_say_huge(std::process::id(), addr, WINDOW);
    let theirs = || smaps_say_huge(process.pid(), window.addr as usize, WINDOW);
    // Each end read its region's page size at registration, and the end whose memory is read
    // decides: ours for writes, the peer's for reads. Where the kernel changed its mind since
    // (khugepaged collapsing pages meanwhile), which path a transfer took is not asserted.
    let (ours_before, theirs_before) = (ours(), theirs());
    let whole = [one(mr, addr, WINDOW, window)];
    for (verb, moved) in [("write", conn.write(&whole)), ("read", conn.read(&whole))] {
        assert_eq!(wait(&conn, moved.unwrap()).unwrap(), WINDOW as u64, "the first {verb}");
    }
    assert_eq!(conn.host_path().direct_ops, 2, "a whole window lies above the band");
    for (n, len) in [(4 << 20, 4usize << 20), (8 << 20, (8 << 20) + 5), (0, WINDOW)] {
        let mut remote = window;
        remote.addr += (WINDOW - len) as u64 / 2;
        let data = common::pattern(len, len as u64);
        buf[n / 8..n / 8 + len].copy_from_slice(&data);
        let item = [one(mr, addr + n / 8, len, remote)];
        let before = conn.host_path().direct_ops;
        assert_eq!(wait(&conn, conn.write(&item).unwrap()).unwrap(), len as u64);
        let wrote_direct = conn.host_path().direct_ops - before;
        buf.fill(0);
        assert_eq!(wait(&conn, conn.read(&item).unwrap()).unwrap(), len as u64);
        let read_direct = conn.host_path().direct_ops - before - wrote_direct;
        common::assert_same(&buf[n / 8..n / 8 + len], &data, &format!("{len} bytes written and read back"));
        let inside = len < 12 << 20;
        let want = |huge: bool| u64::from(huge || !inside);
        if !inside {
            assert_eq!((wrote_direct, read_direct), (1, 1), "{len} bytes lie above the band: the direct copy");
        }
        if (ours(), theirs()) == (ours_before, theirs_before) {
            assert_eq!(wrote_direct, want(ours_before), "write of {len}: our buffer on huge pages: {ours_before}");
            assert_eq!(read_direct, want(theirs_before), "read of {len}: the peer's on huge pages: {theirs_before}");
        }
    }
}

/// Whether the engine collapses memory into huge pages here (`MADV_COLLAPSE`, Linux 6.1, THP not
/// turned off, 2 MiB huge pages).
fn collapse_possible() -> bool {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let size = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").unwrap_or_default();
    let thp = !mode.is_empty() && !mode.contains("[never]") && size.trim() == (2 << 20).to_string();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    thp && (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 1)
}

/// A region of ours on small pages that the peer copies out of (the source of our writes) moves
/// to huge pages in the background with `UCCL_TCPX_HOST_COPY_COLLAPSE` on, its contents intact;
/// with the knob off, or with the memory advised against huge pages, it stays as it was.
#[test]
fn a_source_the_peer_copies_out_of_moves_to_huge_pages() {
    let (_process, port, window, _guard) = direct_peer(&[]);
    let len = 8 << 20;
    for (collapse, advice) in [(true, libc::MADV_NORMAL), (false, libc::MADV_NORMAL), (true, libc::MADV_NOHUGEPAGE)] {
        let engine = Engine::new(Config { host_copy_collapse: collapse, ..same_host() }).unwrap();
        let conn = checked_connection(&engine, port);
        let mut buf = small_page_mapping(len, advice);
        let addr = buf.addr();
        let huge_now = || smaps_say_huge(std::process::id(), addr, len);
        let before = huge_now();
        let data = common::pattern(len, 80);
        buf.copy_from_slice(&data);
        let mr = engine.register(addr, len).unwrap();
        let item = [one(mr, addr, len, window)];
        assert_eq!(wait(&conn, conn.write(&item).unwrap()).unwrap(), len as u64);
        let want = collapse && advice == libc::MADV_NORMAL && collapse_possible();
        if want {
            // The extents the peer's copy held pinned when asked are tried again a little later.
            common::wait_until("the source lies on huge pages", common::PATIENCE, huge_now);
        }
        assert!(uccl_tcpx::internal::engine::collapses_settled(common::PATIENCE), "the collapse ends");
        assert_eq!(huge_now(), want || before, "collapse {collapse}, advice {advice}, on huge pages before: {before}");
        common::assert_same(&buf, &data, "the source after its collapse");
        buf.fill(0);
        assert_eq!(wait(&conn, conn.read(&item).unwrap()).unwrap(), len as u64);
        common::assert_same(&buf, &data, "written and read back");
        engine.deregister(mr).unwrap();
    }
}

/// A write or read inside the network band out of a source on small pages keeps to the channels
/// and has the source collapsed (a write's by its initiator, a read's by its target), so that
/// later transfers out of it take the direct copy: the end whose memory is read sees its own huge
/// pages once collapsed, and skips the band.
#[test]
fn transfers_the_band_keeps_to_the_channels_are_copied_once_their_source_collapsed() {
    let (process, port, window, _guard) = direct_peer(&[(BAND_VAR, "1")]);
    let engine = Engine::new(band_config()).unwrap();
    let conn = checked_connection(&engine, port);
    let len = 1 << 20;
    let collapsing = collapse_possible();
    let mut src = small_page_mapping(4 << 20, libc::MADV_NORMAL);
    let data = common::pattern(src.len(), 81);
    src.copy_from_slice(&data);
    let mr = engine.register(src.addr(), src.len()).unwrap();
    let mut back = vec![0u8; len];
    let back_mr = engine.register(back.as_mut_ptr() as usize, len).unwrap();
    let (peer, window_at) = (process.pid(), window.addr as usize);
    for write in [true, false] {
        let what = if write { "our write's source" } else { "the peer's region we read" };
        let (pid, at) = if write { (std::process::id(), src.addr()) } else { (peer, window_at) };
        let huge_now = || smaps_say_huge(pid, at, len);
        assert!(!huge_now(), "{what} starts on small pages");
        let moved = |direct: &mut u64| {
            let before = conn.host_path().direct_ops;
            let item = if write {
                one(mr, src.addr(), len, window)
            } else {
                one(back_mr, back.as_ptr() as usize, len, window)
            };
            let op = if write { conn.write(&[item]) } else { conn.read(&[item]) }.unwrap();
            assert_eq!(wait(&conn, op).unwrap(), len as u64);
            *direct = conn.host_path().direct_ops - before;
        };
        let mut direct = 0;
        moved(&mut direct);
        assert_eq!(direct, 0, "{what}: a transfer inside the band out of small pages takes the channels");
        if !collapsing {
            assert!(uccl_tcpx::internal::engine::collapses_settled(common::PATIENCE));
            assert!(!huge_now(), "{what}: nothing collapses where the kernel cannot");
            moved(&mut direct);
            assert_eq!(direct, 0, "{what}: and the band keeps applying");
            continue;
        }
        common::wait_until(&format!("{what} lies on huge pages"), common::PATIENCE, huge_now);
        // The collapsing end reads its own pages again once its collapse ended: a later transfer
        // takes the direct copy.
        common::wait_until(&format!("a transfer out of {what} copied directly"), common::PATIENCE, || {
            moved(&mut direct);
            std::thread::sleep(Duration::from_millis(20));
            direct == 1
        });
    }
    // What was written (in both ways) is what was read back.
    common::assert_same(&back, &data[..len], "written and read back");
    drop(process);
}

#[test]
fn with_the_same_host_path_off_or_refused_host_memory_takes_the_network() {
    // This process may not read the peer: reads go over the network, writes are still copied in by
    // the peer. Then the peer may not read us either: everything goes over the network.
    for refuse_parent in [false, true] {
        let refuse: &[(&str, &str)] = if refuse_parent { &[(REFUSE_VAR, "parent")] } else { &[] };
        let (process, port, window, guard) = direct_peer(refuse);
        uccl_tcpx::internal::engine::same_host::refuse_process_access(process.pid());
        let engine = Engine::new(same_host()).unwrap();
        let conn = checked_connection(&engine, port);
        uccl_tcpx::internal::engine::same_host::refuse_process_access(0);
        let path = conn.host_path();
        assert_eq!((path.reads_peer, path.peer_reads_us), (false, !refuse_parent), "{path:?}");
        let mut buf = common::pattern(WINDOW, 80);
        let mr = engine.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
        let w = conn.write(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
        assert_eq!(wait(&conn, w).unwrap(), WINDOW as u64);
        buf.fill(0);
        let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
        assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
        common::assert_same(&buf, &common::pattern(WINDOW, 80), "moved with the kernel refusing");
        assert_eq!(conn.host_path().direct_ops, u64::from(!refuse_parent), "only the write, when the peer reads us");
        assert_guard_untouched(&engine, &conn, guard);

        // UCCL_TCPX_DISABLE_IPC=1 on this end: the peer is remote, nothing is checked.
        let off = Engine::new(Config { disable_ipc: true, ..same_host() }).unwrap();
        let remote = off.connect("127.0.0.1", "0", port).unwrap();
        assert_eq!(remote.peer.locality, Locality::Remote);
        let mr = off.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
        let r = remote.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
        assert_eq!(wait(&remote, r).unwrap(), WINDOW as u64);
        assert_eq!(remote.host_path(), uccl_tcpx::HostPath::default());
        drop(process);
    }
}

/// The pidfds this process holds for process `pid` (a pidfd's fdinfo names its process).
fn pidfds_of(pid: u32) -> usize {
    let want = pid.to_string();
    let names_pid = |info: String| {
        info.lines().any(|line| line.split_once(':').is_some_and(|(key, value)| key == "Pid" && value.trim() == want))
    };
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_string_lossy()))
                .is_ok_and(names_pid)
        })
        .count()
}

/// Connections to one peer process share one handle of it (one pidfd, one cache of its smaps),
/// a connection to another process has its own, and the handle closes with the last connection
/// holding it.
#[test]
fn connections_to_one_peer_process_share_its_handle() {
    let (first, port, window, _) = direct_peer(&[]);
    let (second, other_port, _, _) = direct_peer(&[]);
    let (shared, other) = (first.pid(), second.pid());
    let engine = Engine::new(same_host()).unwrap();
    assert_eq!(pidfds_of(shared), 0);
    let a = checked_connection(&engine, port);
    let b = checked_connection(&engine, port);
    let c = checked_connection(&engine, other_port);
    for conn in [&a, &b, &c] {
        assert!(conn.host_path().reads_peer, "{:?}", conn.host_path());
    }
    assert_eq!((pidfds_of(shared), pidfds_of(other)), (1, 1), "one handle per peer process");
    engine.close_connection(&a);
    assert_eq!(pidfds_of(shared), 1, "the other connection to that process still holds it");
    engine.close_connection(&b);
    common::wait_until("the handle closes with its last connection", common::PATIENCE, || pidfds_of(shared) == 0);
    assert_eq!(pidfds_of(other), 1);
    // A later connection pins the process afresh, and moves bytes with it.
    let d = checked_connection(&engine, port);
    assert_eq!(pidfds_of(shared), 1);
    let mut buf = common::pattern(LEN, 81);
    let mr = engine.register(buf.as_mut_ptr() as usize, LEN).unwrap();
    assert_eq!(wait(&d, d.write(&[one(mr, buf.as_ptr() as usize, LEN, window)]).unwrap()).unwrap(), LEN as u64);
    buf.fill(0);
    assert_eq!(wait(&d, d.read(&[one(mr, buf.as_ptr() as usize, LEN, window)]).unwrap()).unwrap(), LEN as u64);
    common::assert_same(&buf, &common::pattern(LEN, 81), "moved with the fresh handle");
    assert_eq!(d.host_path().direct_ops, 2);
    drop((first, second));
}

/// The peer process as `refused_reader_process` finds it: pid, then its announcement.
const REFUSED_PEER_VAR: &str = "UCCL_TCPX_TEST_REFUSED_PEER";

/// What the kernel logs, once per process and reason, when it will not let us read a peer.
const KERNEL_REFUSAL: &str = "the kernel refuses to let this process read the peer's memory";

/// Takes `CAP_SYS_PTRACE` out of this thread's effective set, so that the kernel's ptrace rules
/// hold for this process as for an unprivileged one (the engine's threads, started afterwards by
/// this thread, inherit the set). Fails the test where it cannot: it would pass without the kernel
/// refusing anything.
fn drop_ptrace_capability() {
    use testkit::caps::{CAP_SYS_PTRACE, drop_effective, effective};
    if let Err(e) = drop_effective(&[CAP_SYS_PTRACE]) {
        panic!("cannot drop CAP_SYS_PTRACE from the effective set ({e}): this test needs a process the kernel refuses");
    }
    assert!(!effective(CAP_SYS_PTRACE).unwrap(), "CAP_SYS_PTRACE is still effective");
}

/// The error `process_vm_readv` of one byte of process `pid` gives, `None` when the kernel let
/// the call look at the memory (an unmapped address 0 then fails with EFAULT).
fn kernel_refusal(pid: u32) -> Option<i32> {
    let mut byte = 0u8;
    let local = libc::iovec { iov_base: (&raw mut byte).cast(), iov_len: 1 };
    let remote = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 1 };
    // SAFETY: one valid local byte; the remote address is only looked up in the peer.
    let n = unsafe { libc::process_vm_readv(pid.cast_signed(), &local, 1, &remote, 1, 0) };
    let err = std::io::Error::last_os_error().raw_os_error();
    (n < 0 && err != Some(libc::EFAULT)).then_some(err.unwrap_or(0))
}

/// The peer a reader process is handed in `var`: its pid, port, announced window and guard.
fn announced_peer(var: &str) -> (u32, u16, FifoItem, FifoItem) {
    let peer = std::env::var(var).expect("the peer's pid and announcement");
    let fields: Vec<&str> = peer.split_whitespace().collect();
    let [pid, port, window, guard] = fields[..] else { panic!("{var}={peer:?}") };
    let (pid, port): (u32, u16) = (pid.parse().unwrap(), port.parse().unwrap());
    (pid, port, common::engine::fifo_from_hex(window), common::engine::fifo_from_hex(guard))
}

/// A process that the kernel does not let read its peer (the peer is not dumpable, this process
/// drops `CAP_SYS_PTRACE`): every same-host connection to the peer moves reads over the network,
/// while the peer still copies our writes in directly.
#[test]
#[ignore = "runs as a process of this host that may not read its peer"]
fn refused_reader_process() {
    assert!(common::is_child("refused_reader_process"), "runs as the reader of the kernel-refusal test");
    let (pid, port, window, guard) = announced_peer(REFUSED_PEER_VAR);
    drop_ptrace_capability();
    // The parent reads the refusal's log line (UCCL_TCPX_LOG=warn).
    uccl_tcpx::init_logging();
    assert_eq!(
        kernel_refusal(pid),
        Some(libc::EPERM),
        "the kernel must refuse this process a read of the non-dumpable peer"
    );

    let engine = Engine::new(same_host()).unwrap();
    // Two connections: the refusal holds for both, and is logged once.
    for round in 0..2u64 {
        let conn = checked_connection(&engine, port);
        let path = conn.host_path();
        assert_eq!((path.reads_peer, path.peer_reads_us), (false, true), "round {round}: {path:?}");
        let data = common::pattern(WINDOW, 90 + round);
        let mut buf = data.clone();
        let mr = engine.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
        let w = conn.write(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
        assert_eq!(wait(&conn, w).unwrap(), WINDOW as u64);
        buf.fill(0);
        let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
        assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
        common::assert_same(&buf, &data, "written and read back with the kernel refusing our reads");
        assert_eq!(conn.host_path().direct_ops, 1, "round {round}: only the write, which the peer copies in");
        assert_guard_untouched(&engine, &conn, guard);
        engine.deregister(mr).unwrap();
    }
}

#[test]
fn a_kernel_refusing_to_let_us_read_the_peer_sends_host_memory_over_the_network() {
    let (process, line) = direct_peer_line(&[(NOT_DUMPABLE_VAR, "1")]);
    let out = ChildTest::new("refused_reader_process")
        .ignored()
        .env(REFUSED_PEER_VAR, format!("{} {line}", process.pid()))
        .env("UCCL_TCPX_LOG", "warn")
        .run_within(Duration::from_secs(300));
    assert_eq!(out.matches(KERNEL_REFUSAL).count(), 1, "the refusal is logged once per process and reason:\n{out}");
    assert!(
        out.lines().any(|l| l.contains(KERNEL_REFUSAL) && l.contains("Operation not permitted")),
        "the log names the kernel's answer (EPERM):\n{out}"
    );
    assert!(!out.contains("did not check out"), "a kernel refusal is not a failed claim:\n{out}");
    drop(process);
}

/// The peer process as `lost_access_reader_process` finds it: pid, then its announcement.
const LOST_ACCESS_PEER_VAR: &str = "UCCL_TCPX_TEST_LOST_ACCESS_PEER";
/// Where `lost_access_reader_process` writes its trace (a path prefix).
const LOST_ACCESS_TRACE_VAR: &str = "UCCL_TCPX_TEST_LOST_ACCESS_TRACE";

/// A reader without `CAP_SYS_PTRACE` that proved its peer readable, whose peer then turns not
/// dumpable: the read granted for a copy the kernel now refuses is asked for again over the
/// channels and arrives byte-exact, later reads take the channels, writes still go direct.
#[test]
#[ignore = "runs as a process of this host whose peer stops being readable"]
fn lost_access_reader_process() {
    assert!(common::is_child("lost_access_reader_process"), "runs as the reader of the lost-access test");
    let (pid, port, window, _guard) = announced_peer(LOST_ACCESS_PEER_VAR);
    // The peer, our sibling, copies our writes in.
    allow_any_ptracer();
    drop_ptrace_capability();
    assert_eq!(
        kernel_refusal(pid),
        None,
        "the dumpable peer is readable without CAP_SYS_PTRACE (Yama's ptrace_scope 2 and 3 refuse it)"
    );

    // Traced: the refused copy must not count as one copied here.
    let prefix = std::env::var(LOST_ACCESS_TRACE_VAR).expect("the trace's path prefix");
    let trace = Some(uccl_tcpx::TraceSetting::parse(&format!("host:{prefix}")).unwrap());
    let engine = Engine::new(Config { trace, ..same_host() }).unwrap();
    let conn = checked_connection(&engine, port);
    let path = conn.host_path();
    assert!(path.reads_peer && path.peer_reads_us, "{path:?}");
    let mut buf = vec![0u8; WINDOW];
    let mr = engine.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    assert_eq!(conn.host_path().direct_ops, 1, "copied out of the peer while it was readable");

    // SAFETY: a signal to the peer process this test started.
    assert_eq!(unsafe { libc::kill(pid.cast_signed(), libc::SIGUSR1) }, 0);
    common::wait_until("the kernel refuses reads of the peer", common::PATIENCE, || {
        kernel_refusal(pid) == Some(libc::EPERM)
    });
    assert!(conn.host_path().reads_peer, "nothing told the connection yet: its next read asks for a copy");
    buf.fill(0);
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    common::assert_same(&buf, &common::pattern(WINDOW, WINDOW_SEED), "read after the kernel refused the copy");
    let path = conn.host_path();
    assert!(!path.reads_peer && path.peer_reads_us, "{path:?}");
    assert_eq!(path.direct_ops, 1, "the refused read took the channels");

    // The peer still copies our writes in; our reads keep to the channels.
    let data = common::pattern(WINDOW, 83);
    buf.copy_from_slice(&data);
    let w = conn.write(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), WINDOW as u64);
    buf.fill(0);
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    common::assert_same(&buf, &data, "written directly and read back over the channels");
    assert_eq!(conn.host_path().direct_ops, 2, "only the write went direct");
}

/// Lets any process of ours read this one under Yama's ptrace_scope 1, which otherwise lets only
/// ancestors read it: the lost-access test's two processes are siblings. Without Yama there is
/// nothing to allow (EINVAL).
fn allow_any_ptracer() {
    // SAFETY: PR_SET_PTRACER takes a pid (or "any") and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        let yama = std::path::Path::new("/proc/sys/kernel/yama").exists();
        assert!(!yama && err.raw_os_error() == Some(libc::EINVAL), "prctl(PR_SET_PTRACER, ANY): {err}");
    }
}

/// Takes `CAP_SYS_PTRACE` out of this thread's bounding set, so that the processes it starts hold
/// it in none of their sets: a reader lacking it may then look at such a peer's descriptors (the
/// kernel wants the peer's capabilities to be a subset of the reader's) until the peer turns not
/// dumpable. Where that is not allowed (no `CAP_SETPCAP`), this process must lack it already.
fn bound_out_ptrace_capability() {
    use testkit::caps::{CAP_SYS_PTRACE, effective};
    // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(CAP_SYS_PTRACE)) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        assert!(!effective(CAP_SYS_PTRACE).unwrap(), "cannot take CAP_SYS_PTRACE out of the bounding set: {err}");
    }
}

#[test]
fn a_read_granted_for_a_copy_the_kernel_then_refuses_takes_the_channels() {
    bound_out_ptrace_capability();
    let (process, line) = direct_peer_line(&[(NOT_DUMPABLE_ON_SIGNAL_VAR, "1")]);
    let prefix = common::trace::fresh_dir("lost-access").join("t").to_string_lossy().into_owned();
    ChildTest::new("lost_access_reader_process")
        .ignored()
        .env(LOST_ACCESS_PEER_VAR, format!("{} {line}", process.pid()))
        .env(LOST_ACCESS_TRACE_VAR, &prefix)
        .run_within(Duration::from_secs(300));
    drop(process);
    // The first read was copied; the second, refused, took the channels.
    let out = common::trace::run_script("trace_summary.py", &[&prefix]);
    let copied = format!("read copied here {WINDOW} B: 1 jobs;");
    assert!(out.lines().any(|l| l.starts_with("host[") && l.contains(&copied)), "{copied:?}:\n{out}");
}

/// A panic in the host copy thread fails its connection with an internal error naming the thread,
/// as every library thread's does, instead of taking the process down or leaving the read pending.
/// In a process of its own: the injected panic hits the next host copy of the process, which must
/// not be another test's.
#[test]
fn a_panicking_host_copy_thread_fails_its_connection() {
    ChildTest::new("panicking_host_copy_process").ignored().run_within(Duration::from_secs(300));
}

#[test]
#[ignore = "runs in a process of its own for a_panicking_host_copy_thread_fails_its_connection"]
fn panicking_host_copy_process() {
    use uccl_tcpx::internal::threads::{ThreadKind, inject_panic};
    assert!(common::is_child("panicking_host_copy_process"), "runs as a child of the host copy panic test");
    let (_process, port, window, _guard) = direct_peer(&[]);
    let engine = Engine::new(same_host()).unwrap();
    let conn = checked_connection(&engine, port);
    let mut buf = vec![0u8; WINDOW];
    let mr = engine.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
    inject_panic(ThreadKind::HostCopier);
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    let err = wait(&conn, r).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrInternal, "{err}");
    assert!(err.message().contains("host copy thread panicked"), "{err}");
    assert!(conn.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).is_err(), "the connection failed");
    // Another connection to the same peer still works.
    let again = checked_connection(&engine, port);
    let r = again.read(&[one(mr, buf.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&again, r).unwrap(), WINDOW as u64);
}

/// Large copies are shared with the process's copy helpers, as many as `host_copy_threads` asks
/// for (none with 1), and a panic in a helper fails the connection whose copy it hit, as a panic of
/// its worker does; the helpers go on serving others. In a process of its own: the helper count is
/// the process's, and the injected panic must not hit another test's copy.
#[test]
fn copy_helpers_follow_the_knob_and_a_panicking_one_fails_only_its_connection() {
    ChildTest::new("copy_helpers_process").ignored().run_within(Duration::from_secs(300));
}

#[test]
#[ignore = "runs in a process of its own for copy_helpers_follow_the_knob_and_a_panicking_one_fails_only_its_connection"]
fn copy_helpers_process() {
    use uccl_tcpx::internal::threads::{ThreadKind, inject_panic, panic_pending};
    assert!(common::is_child("copy_helpers_process"), "runs as a child of the copy-helper test");
    let helpers = || testkit::threads::count_named("uccl-copy-help");
    let (_process, port, window, _guard) = direct_peer(&[]);
    let mut buf = vec![0u8; WINDOW];
    let addr = buf.as_ptr() as usize;

    // One thread per copy: the worker copies alone.
    let single = Engine::new(Config { host_copy_threads: 1, ..same_host() }).unwrap();
    let conn = checked_connection(&single, port);
    let mr = single.register(addr, WINDOW).unwrap();
    let r = conn.read(&[one(mr, addr, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    common::assert_same(&buf, &common::pattern(WINDOW, WINDOW_SEED), "read by one thread");
    assert_eq!(helpers(), 0, "host_copy_threads = 1 starts no helper");
    drop(conn);
    drop(single);
    buf.fill(0);

    let engine = Engine::new(Config { host_copy_threads: 4, ..same_host() }).unwrap();
    let conn = checked_connection(&engine, port);
    let mr = engine.register(addr, WINDOW).unwrap();
    let read = |conn: &uccl_tcpx::Connection| conn.read(&[one(mr, addr, WINDOW, window)]).and_then(|id| wait(conn, id));
    let started = std::time::Instant::now();
    assert_eq!(read(&conn).unwrap(), WINDOW as u64);
    // A helper names itself once it first runs, which a loaded host may delay past the copy; and
    // helpers end after a second without work, which such a host may let pass before we look.
    let running = loop {
        let n = helpers();
        if (1..=3).contains(&n) || started.elapsed() >= Duration::from_secs(1) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        (1..=3).contains(&running) || running == 0 && started.elapsed() >= Duration::from_secs(1),
        "{running} helpers for host_copy_threads = 4"
    );
    common::assert_same(&buf, &common::pattern(WINDOW, WINDOW_SEED), "read by several threads");

    inject_panic(ThreadKind::HostCopyHelper);
    // A helper joins a copy once it is awake, which on a loaded host may take a few copies.
    let mut failed = None;
    for _ in 0..200 {
        match read(&conn) {
            Ok(n) => assert_eq!(n, WINDOW as u64),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("no copy was shared with a helper in 200 reads of 12 MiB");
    assert!(!panic_pending(ThreadKind::HostCopyHelper));
    assert_eq!(err.status(), UcclStatus::ErrInternal, "{err}");
    assert!(err.message().contains("host copy helper thread panicked"), "{err}");
    assert!(read(&conn).is_err(), "the connection failed");
    // Another connection to the same peer still copies, helpers included, byte for byte.
    let again = checked_connection(&engine, port);
    buf.fill(0);
    assert_eq!(read(&again).unwrap(), WINDOW as u64);
    common::assert_same(&buf, &common::pattern(WINDOW, WINDOW_SEED), "read after the panic");
}

/// Under the `host` trace a process records where its same-host copies spent their time, and
/// `scripts/diag/trace_summary.py` says it per role and size: its reads copied here (every step
/// from post to outcome, the pieces, the threads that took them) and its writes posted here (copied
/// in by the peer, so only post to outcome).
#[test]
fn the_host_copy_trace_times_every_step_of_a_copy() {
    let dir = common::trace::fresh_dir("host");
    let prefix = dir.join("t").to_string_lossy().into_owned();
    ChildTest::new("traced_host_copies_process")
        .ignored()
        .env("UCCL_TCPX_TRACE", format!("host:{prefix}"))
        .run_within(Duration::from_secs(300));
    let out = common::trace::run_script("trace_summary.py", &[&prefix]);
    let line = |head: &str| {
        let found = out.lines().find(|l| l.starts_with("host[") && l.contains(head));
        found.unwrap_or_else(|| panic!("no line with {head:?}:\n{out}")).to_owned()
    };
    let reads = line("read copied here 4194304 B: 5 jobs;");
    // Helpers joining is left out: on a loaded host none may wake before the job is done.
    for step in ["post>queued", "queued>picked", "picked>offered", "picked>last-piece"] {
        assert!(reads.contains(step), "{step} missing: {reads}");
    }
    assert!(reads.contains("last-piece>finished") && reads.contains("finished>reported") && reads.contains("total"));
    // Reads' callers wait on them and copy what the worker did not take up first.
    // 4 MiB on four threads: two pieces a thread would be 512 KiB, under the 1 MiB minimum.
    let pieces = line("; pieces per job 4 (4-4)");
    let by = |who: &str| -> usize {
        let at = pieces.find(who).unwrap_or_else(|| panic!("{who} missing: {pieces}")) + who.len();
        pieces[at..].split([' ', ';']).next().unwrap().parse().unwrap()
    };
    // Which thread copies a read depends on who read the target's grant first (the caller or the
    // control reactor), so only the sum is fixed here; that a waiting caller copies its own read
    // is held by the host worker's unit tests.
    assert_eq!(by("run by caller ") + by(" worker "), 5, "{pieces}");
    assert!(pieces.contains("piece KiB 1024 (1024-1024)") && pieces.contains("GB/s per thread copying"), "{pieces}");
    let writes = line("write posted here 4194304 B: 5 jobs;");
    assert!(writes.contains(" total ") && !writes.contains("picked"), "{writes}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "runs in a process of its own for the_host_copy_trace_times_every_step_of_a_copy"]
fn traced_host_copies_process() {
    assert!(common::is_child("traced_host_copies_process"), "runs as a child of the trace test");
    let (_process, port, window, _guard) = direct_peer(&[]);
    let trace = Some(uccl_tcpx::TraceSetting::parse(&std::env::var("UCCL_TCPX_TRACE").unwrap()).unwrap());
    let engine = Engine::new(Config { host_copy_threads: 4, trace, ..same_host() }).unwrap();
    let conn = checked_connection(&engine, port);
    let len = 4 << 20;
    let mut buf = vec![0u8; len];
    let mr = engine.register(buf.as_mut_ptr() as usize, len).unwrap();
    for _ in 0..5 {
        let r = conn.read(&[one(mr, buf.as_ptr() as usize, len, window)]).unwrap();
        assert_eq!(conn.wait(r).unwrap(), len as u64);
        let w = conn.write(&[one(mr, buf.as_ptr() as usize, len, window)]).unwrap();
        assert_eq!(wait(&conn, w).unwrap(), len as u64);
    }
    assert_eq!(conn.host_path().direct_ops, 10);
}

/// A read that its caller copies on its own thread (the caller waits on it) is fenced by the
/// deregistration of its destination as the worker's copies are: once `deregister` returned nothing
/// lands there any more, and the read fails unless it was done before. Rounds deregister at spread
/// moments until one fell in the middle of a copy that the caller took up, and one failed a read.
/// Which thread copies is a race (the worker, woken for the same copy, may win it), so the rounds
/// run until both were seen or a time bound passed, not a fixed number of them.
#[test]
fn a_read_copied_on_its_callers_thread_stops_at_deregistration() {
    /// Far beyond what a host where the caller ever wins needs; the rounds end once both were seen.
    const BOUND: Duration = Duration::from_secs(120);
    let (_process, port, window, _guard) = direct_peer(&[]);
    let engine = Engine::new(Config { host_copy_threads: 1, ..same_host() }).unwrap();
    let conn = checked_connection(&engine, port);
    let pattern = common::pattern(WINDOW, WINDOW_SEED);
    let (mut mid, mut failed, mut by_caller) = (0, 0, 0);
    let started = std::time::Instant::now();
    let mut round = 0u64;
    while !(mid > 0 && failed > 0) && started.elapsed() < BOUND {
        round += 1;
        let buf = vec![SENTINEL; WINDOW];
        let addr = buf.as_ptr() as usize;
        let mr = engine.register(addr, WINDOW).unwrap();
        let before = conn.host_path().caller_copies;
        let r = conn.read(&[one(mr, addr, WINDOW, window)]).unwrap();
        let (outcome, snapshot) = std::thread::scope(|s| {
            let deregistered = s.spawn(|| {
                std::thread::sleep(Duration::from_micros(150 * (round % 20)));
                engine.deregister(mr).unwrap();
                // SAFETY: nothing writes the buffer any more (the fence under test); reading it
                // through its address leaves `buf` itself untouched.
                unsafe { std::slice::from_raw_parts(addr as *const u8, WINDOW) }.to_vec()
            });
            (wait(&conn, r), deregistered.join().unwrap())
        });
        assert!(buf == snapshot, "round {round}: bytes landed after the deregistration returned");
        match &outcome {
            Ok(n) => assert_eq!(*n, WINDOW as u64),
            Err(e) => assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "round {round}: {e}"),
        }
        // Only rounds whose copy this thread took up count towards what is under test: the worker,
        // woken for the same copy, may win it.
        if conn.host_path().caller_copies == before {
            continue;
        }
        by_caller += 1;
        failed += usize::from(outcome.is_err());
        let head = snapshot[..4096] == pattern[..4096];
        let tail = snapshot[WINDOW - 4096..] == pattern[WINDOW - 4096..];
        if head && !tail {
            mid += 1;
        }
    }
    assert!(
        mid > 0 && failed > 0,
        "in {round} rounds ({by_caller} copied by their caller) over {BOUND:?}, deregistrations fell in the \
         middle of {mid} copies taken up by the caller and failed {failed} of its reads; both must happen"
    );
}

/// A shuffled block table: `n` slot numbers in random order.
fn block_table(n: usize, stream: &str) -> Vec<usize> {
    let mut rng = common::Rng::new(stream);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

/// KV-cache traffic to another process of the host: random block tables on both ends, 100,000
/// blocks of an odd size at odd offsets, and a single block, read and written, every byte of both
/// buffers checked (each block lands in its slot, nothing between); a table with one bad block in
/// the middle fails the whole transfer with a status and leaves the target untouched.
#[test]
fn random_block_tables_move_every_block_to_its_slot_on_the_same_host_path() {
    let (_process, port, window, guard) = direct_peer(&[]);
    let engine = Engine::new(same_host()).unwrap();
    let conn = checked_connection(&engine, port);
    let mut buf = vec![0u8; WINDOW];
    let mr = engine.register(buf.as_mut_ptr() as usize, WINDOW).unwrap();
    let base = buf.as_ptr() as usize;
    let theirs = common::pattern(WINDOW, WINDOW_SEED);
    // Slots of 113 bytes from byte 1, blocks of 67: odd sizes and alignments on both ends.
    let (slot, block, at) = (113usize, 67usize, 1usize);
    for count in [1usize, 100_000] {
        let (mine, remote) = (block_table(count, "kv-local"), block_table(count, "kv-remote"));
        let items: Vec<OneSided> = (0..count)
            .map(|i| {
                let mut item = window;
                item.addr += (at + remote[i] * slot) as u64;
                one(mr, base + at + mine[i] * slot, block, item)
            })
            .collect();
        let total = (count * block) as u64;

        buf.fill(0);
        let r = conn.read(&items).unwrap();
        assert_eq!(wait(&conn, r).unwrap(), total, "read of {count} blocks");
        let mut expected = vec![0u8; WINDOW];
        for i in 0..count {
            let (l, r) = (at + mine[i] * slot, at + remote[i] * slot);
            expected[l..l + block].copy_from_slice(&theirs[r..r + block]);
        }
        common::assert_same(&buf, &expected, &format!("{count} blocks read"));

        let fresh = common::pattern(WINDOW, 700 + count as u64);
        buf.copy_from_slice(&fresh);
        let w = conn.write(&items).unwrap();
        assert_eq!(wait(&conn, w).unwrap(), total, "write of {count} blocks");
        // The whole window back, in one piece: each written block in its slot, the rest as it was.
        buf.fill(0);
        let r = conn.read(&[one(mr, base, WINDOW, window)]).unwrap();
        assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
        let mut expected = theirs.clone();
        for i in 0..count {
            let (l, r) = (at + mine[i] * slot, at + remote[i] * slot);
            expected[r..r + block].copy_from_slice(&fresh[l..l + block]);
        }
        common::assert_same(&buf, &expected, &format!("{count} blocks written, read back whole"));
        // Put the window back as the next round expects it.
        buf.copy_from_slice(&theirs);
        let w = conn.write(&[one(mr, base, WINDOW, window)]).unwrap();
        assert_eq!(wait(&conn, w).unwrap(), WINDOW as u64);
    }

    // One block past the window's end in the middle of 10,000: the transfer fails whole.
    let table = block_table(10_000, "kv-bad");
    let mut items: Vec<OneSided> = (0..10_000)
        .map(|i| {
            let mut item = window;
            item.addr += (table[i] * slot) as u64;
            one(mr, base + i * slot, block, item)
        })
        .collect();
    items[5_000].remote.addr = window.addr + WINDOW as u64 - 10;
    for write in [true, false] {
        let posted = if write { conn.write(&items) } else { conn.read(&items) };
        let err = posted.and_then(|id| wait(&conn, id)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "write {write}: {err}");
    }
    assert_guard_untouched(&engine, &conn, guard);
}
