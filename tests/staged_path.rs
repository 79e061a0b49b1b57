//! Host memory between two processes of this host through the staging areas
//! (`UCCL_TCPX_HOST_COPY_STAGING=1` in both): the end whose memory is read pushes the bytes into
//! its area, the other drains them. Byte-exact at every size up to the area, vectors, transfers
//! larger than the area or finding it full (they take the direct copy), a source deregistered
//! while its write is pushed, and ends the kernel will not let copy out of each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use uccl_tcpx::engine::OneSided;
use uccl_tcpx::engine::local::Locality;
use uccl_tcpx::proto::FifoItem;
use uccl_tcpx::{Config, Connection, Engine, UcclStatus};

mod common;
use common::{ChildTest, same_host, wait};

/// The area's data size in both processes: 20 MiB, so 16 MiB transfers fit and 24 MiB ones do not.
const AREA: &str = "20M";
const AREA_BYTES: usize = 20 << 20;
/// The peer's window: larger than the area.
const WINDOW: usize = (24 << 20) + 333;
const WINDOW_SEED: u64 = 91;

/// Both processes stage: this one through its configuration, the peer through the environment.
fn staged_config() -> Config {
    let env = Config::from_lookup(|name| match name {
        "UCCL_TCPX_HOST_COPY_STAGING" => Some("1".into()),
        "UCCL_TCPX_HOST_COPY_STAGING_BYTES" => Some(AREA.into()),
        "UCCL_TCPX_HOST_COPY_COLLAPSE" => Some("0".into()),
        _ => None,
    })
    .unwrap();
    Config {
        host_copy_staging: env.host_copy_staging,
        host_copy_staging_bytes: env.host_copy_staging_bytes,
        // Sources collapsed into huge pages skip the areas (the direct copy needs no second copy
        // there), and which transfers find them collapsed depends on timing: these tests stage
        // small-page sources, as the areas are for (the peer gets the same from its environment).
        host_copy_collapse: env.host_copy_collapse,
        host_copy_threads: 4,
        ..same_host()
    }
}

#[test]
#[ignore = "runs as the peer process of another process on this host"]
fn staged_peer_process() {
    assert!(common::is_child("staged_peer_process"), "runs as the peer process of the staged-path tests");
    if std::env::var_os(REFUSE_VAR).is_some() {
        uccl_tcpx::engine::local::refuse_process_access(std::os::unix::process::parent_id());
    }
    // The knobs as a deployment sets them: in the environment.
    let env = Config::from_env().unwrap();
    assert!(env.host_copy_staging, "UCCL_TCPX_HOST_COPY_STAGING=1 reaches the peer");
    assert!(!env.host_copy_collapse, "UCCL_TCPX_HOST_COPY_COLLAPSE=0 reaches the peer");
    let config = Config {
        host_copy_staging: env.host_copy_staging,
        host_copy_staging_bytes: env.host_copy_staging_bytes,
        host_copy_collapse: env.host_copy_collapse,
        host_copy_threads: 4,
        ..same_host()
    };
    let engine = Arc::new(Engine::new(config).unwrap());
    let mut region = common::pattern(WINDOW, WINDOW_SEED);
    let mr = engine.register(region.as_mut_ptr() as usize, WINDOW).unwrap();
    let window = engine.prepare_fifo(mr, region.as_ptr() as usize, WINDOW).unwrap();
    println!("PEER {} {}", engine.address().port(), common::engine::fifo_to_hex(&window));
    loop {
        let conn = common::accept(&engine).unwrap();
        std::mem::forget(conn);
    }
}

/// Set: the peer process probes this one as a kernel refusing `process_vm_readv` would (the
/// test hook `refuse_process_access`).
const REFUSE_VAR: &str = "UCCL_TCPX_TEST_REFUSE";

/// The peer process, a connection both ends checked, and the peer's window.
fn staged_peer(engine: &Engine) -> (testkit::child::Peer, Arc<Connection>, FifoItem) {
    staged_peer_refusing(engine, false)
}

/// As `staged_peer`; with `refuse`, each end's kernel refuses it the copy out of the other (test
/// hook, set on this end before it connects and kept until the caller clears it).
fn staged_peer_refusing(engine: &Engine, refuse: bool) -> (testkit::child::Peer, Arc<Connection>, FifoItem) {
    let mut child = ChildTest::new("staged_peer_process")
        .ignored()
        .env("UCCL_TCPX_HOST_COPY_STAGING", "1")
        .env("UCCL_TCPX_HOST_COPY_STAGING_BYTES", AREA)
        .env("UCCL_TCPX_HOST_COPY_COLLAPSE", "0");
    if refuse {
        child = child.env(REFUSE_VAR, "1");
    }
    let mut process = child.spawn();
    if refuse {
        uccl_tcpx::engine::local::refuse_process_access(process.pid());
    }
    let line = process.announcement("PEER ", Duration::from_secs(120));
    let (port, hex) = line.trim().split_once(' ').unwrap();
    let window = common::engine::fifo_from_hex(hex);
    let conn = engine.connect("127.0.0.1", "0", port.parse().unwrap()).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    common::wait_until("both ends checked each other's process", common::PATIENCE, || conn.host_path().checked);
    (process, conn, window)
}

fn at(window: FifoItem, offset: usize) -> FifoItem {
    let mut item = window;
    item.addr += offset as u64;
    item
}

fn one(mr: u64, addr: usize, len: usize, remote: FifoItem) -> OneSided {
    OneSided { mr, addr, len, remote }
}

/// Writes `data` at `offset` of the window and reads it back into a fresh buffer: both byte-exact.
fn write_and_read_back(engine: &Engine, conn: &Connection, window: FifoItem, offset: usize, data: &[u8]) {
    let len = data.len();
    let mut buf = data.to_vec();
    let mr = engine.register(buf.as_mut_ptr() as usize, len).unwrap();
    let w = conn.write(&[one(mr, buf.as_ptr() as usize, len, at(window, offset))]).unwrap();
    assert_eq!(wait(conn, w).unwrap(), len as u64, "write of {len}");
    buf.fill(0);
    let r = conn.read(&[one(mr, buf.as_ptr() as usize, len, at(window, offset))]).unwrap();
    assert_eq!(wait(conn, r).unwrap(), len as u64, "read of {len}");
    common::assert_same(&buf, data, &format!("{len} bytes written and read back"));
    engine.deregister(mr).unwrap();
}

/// Each end makes its area on first use (this end's write, the peer's served read) and the other
/// maps it; once this end mapped the peer's and heard that its own was mapped, every later
/// request of ours reaches the peer after our answer to its area, so transfers that fit are staged.
fn warm_up(engine: &Engine, conn: &Connection, window: FifoItem) {
    assert!(!conn.host_path().staging, "no area before the first transfer");
    write_and_read_back(engine, conn, window, 0, &common::pattern((1 << 20) + 1, 1));
    common::wait_until("both areas mapped", common::PATIENCE, || conn.host_path().staging);
}

#[test]
fn host_memory_moves_through_the_staging_areas_byte_exact() {
    let engine = Engine::new(staged_config()).unwrap();
    let (_process, conn, window) = staged_peer(&engine);
    // The peer's window as it started, read whole: larger than the area, so the direct copy.
    let mut whole = vec![0u8; WINDOW];
    let mr = engine.register(whole.as_mut_ptr() as usize, WINDOW).unwrap();
    let r = conn.read(&[one(mr, whole.as_ptr() as usize, WINDOW, window)]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), WINDOW as u64);
    common::assert_same(&whole, &common::pattern(WINDOW, WINDOW_SEED), "the peer's window");
    engine.deregister(mr).unwrap();
    warm_up(&engine, &conn, window);
    let before = conn.host_path();
    let sizes = [(64 << 10) + 1, 256 << 10, (1 << 20) + 7, 4 << 20, (16 << 20) - 3, 16 << 20];
    for (i, &len) in sizes.iter().enumerate() {
        write_and_read_back(&engine, &conn, window, 4096 * i + 5, &common::pattern(len, 100 + i as u64));
    }
    let after = conn.host_path();
    let n = 2 * sizes.len() as u64;
    assert_eq!(after.staged_ops - before.staged_ops, n, "every write and read staged: {before:?} -> {after:?}");
    assert_eq!(after.direct_ops - before.direct_ops, n);

    // A vector of scattered items each way: one request, one range.
    let mut buf = common::pattern(6 << 20, 7);
    let data = buf.clone();
    let mr = engine.register(buf.as_mut_ptr() as usize, buf.len()).unwrap();
    let base = buf.as_ptr() as usize;
    let spans = [(0usize, 100usize, 200_000usize), (300_000, 5 << 20, 1 << 20), (2 << 20, 9 << 20, 77)];
    let items: Vec<OneSided> = spans.iter().map(|&(l, r, len)| one(mr, base + l, len, at(window, r))).collect();
    let total: usize = spans.iter().map(|s| s.2).sum();
    let before = conn.host_path();
    assert_eq!(wait(&conn, conn.write(&items).unwrap()).unwrap(), total as u64);
    buf.fill(0);
    assert_eq!(wait(&conn, conn.read(&items).unwrap()).unwrap(), total as u64);
    for &(l, _, len) in &spans {
        common::assert_same(&buf[l..l + len], &data[l..l + len], "vector item read back");
    }
    assert_eq!(conn.host_path().staged_ops - before.staged_ops, 2, "a vector is one staged request each way");
    engine.deregister(mr).unwrap();

    // Larger than the area: the direct copy, byte-exact all the same.
    let before = conn.host_path();
    write_and_read_back(&engine, &conn, window, 0, &common::pattern(AREA_BYTES + 1, 8));
    let after = conn.host_path();
    assert_eq!((after.direct_ops - before.direct_ops, after.staged_ops - before.staged_ops), (2, 0));
}

/// Eight writes of 3 MiB in one call are eight requests (each from its own registration), posted
/// together: six fill the 20 MiB area, two find it full and take the direct copy; nothing is lost
/// either way. Reads likewise, as far as the target's area allows at the moment they arrive.
#[test]
fn transfers_finding_the_area_full_take_the_direct_copy() {
    const N: usize = 8;
    const LEN: usize = 3 << 20;
    let engine = Engine::new(staged_config()).unwrap();
    let (_process, conn, window) = staged_peer(&engine);
    warm_up(&engine, &conn, window);
    let mut bufs: Vec<Vec<u8>> = (0..N).map(|i| common::pattern(LEN, 200 + i as u64)).collect();
    let data = bufs.clone();
    let mrs: Vec<u64> = bufs.iter_mut().map(|b| engine.register(b.as_mut_ptr() as usize, LEN).unwrap()).collect();
    let items: Vec<OneSided> =
        (0..N).map(|i| one(mrs[i], bufs[i].as_ptr() as usize, LEN, at(window, i * LEN))).collect();
    let fit = (AREA_BYTES / LEN) as u64;
    let before = conn.host_path();
    let w = conn.write(&items).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), (N * LEN) as u64);
    let after = conn.host_path();
    assert_eq!(after.direct_ops - before.direct_ops, N as u64);
    assert_eq!(after.staged_ops - before.staged_ops, fit, "six fit the area, two not");
    for b in &mut bufs {
        b.fill(0);
    }
    let before = conn.host_path();
    let r = conn.read(&items).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), (N * LEN) as u64);
    let after = conn.host_path();
    assert_eq!(after.direct_ops - before.direct_ops, N as u64);
    let staged = after.staged_ops - before.staged_ops;
    assert!(fit <= staged && staged <= N as u64, "{staged} staged reads");
    for i in 0..N {
        common::assert_same(&bufs[i], &data[i], &format!("item {i} read back"));
    }
}

/// A source deregistered while its write is pushed: the write fails with a clear error or lands
/// whole, never a crash, and the connection goes on working. The deregistration comes a while
/// after the write is called: too early, the post finds the region gone; too late, the push is
/// over and the write lands, or fails as cut off while awaiting its answer. Rounds go on, the
/// while shrinking after a late one and growing after an early one (with jitter, so that it does
/// not keep stepping over the push), until writes were cut off during their push: the push marks
/// the pieces it could not copy aborted, and the target's drain of such a piece is what answers
/// that the push stopped (no other path says so). Every write that landed was staged.
#[test]
fn deregistering_the_source_during_a_staged_write_fails_it_cleanly() {
    const LEN: usize = 16 << 20;
    /// Far more rounds than the while needs to settle on the push however slow this machine is
    /// (a round takes milliseconds), and to hit it a few times once it did.
    const ROUNDS: usize = 300;
    const CUT_WHILE_STAGED: &str = "peer refused: the push of the source stopped: it was deregistered during the \
                                    transfer, or the pushing end's connection failed";
    let engine = Arc::new(Engine::new(staged_config()).unwrap());
    let (_process, conn, window) = staged_peer(&engine);
    warm_up(&engine, &conn, window);
    let mut rng = testkit::Rng::new("deregistering_the_source_during_a_staged_write");
    let mut src = common::pattern(LEN, 300);
    let addr = src.as_ptr() as usize;
    let staged_before = conn.host_path().staged_ops;
    let (mut cut_while_staged, mut early, mut late, mut landed) = (0u64, 0u64, 0u64, 0u64);
    let mut delay = Duration::from_micros(300);
    for round in 0..ROUNDS {
        if cut_while_staged >= 2 {
            break;
        }
        let mr = engine.register(src.as_mut_ptr() as usize, LEN).unwrap();
        let posting = Arc::new(AtomicBool::new(false));
        // Between three quarters and five quarters of the while.
        let this_round = delay * (3 + rng.below(3) as u32) / 4;
        let deregistering = {
            let (engine, posting) = (engine.clone(), posting.clone());
            thread::spawn(move || {
                while !posting.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                // Spun rather than slept: a sleep's slack is as long as the push.
                let start = Instant::now();
                while start.elapsed() < this_round {
                    std::hint::spin_loop();
                }
                engine.deregister(mr)
            })
        };
        posting.store(true, Ordering::Release);
        let outcome = conn.write(&[one(mr, addr, LEN, window)]).and_then(|w| wait(&conn, w));
        deregistering.join().unwrap().unwrap();
        let later = match outcome {
            Ok(len) => {
                assert_eq!(len, LEN as u64);
                landed += 1;
                false
            }
            Err(e) if e.message() == CUT_WHILE_STAGED => {
                assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "round {round}: {e}");
                cut_while_staged += 1;
                continue;
            }
            // Gone before the post looked the region up, or before it was posted.
            Err(e) if e.status() == UcclStatus::ErrNotFound => {
                assert!(e.message().starts_with(&format!("memory region {mr} ")), "round {round}: {e}");
                early += 1;
                true
            }
            Err(e) => {
                assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "round {round}: {e}");
                assert!(e.message().ends_with("was deregistered during the transfer"), "round {round}: {e}");
                late += 1;
                false
            }
        };
        delay = if later { delay * 5 / 4 + Duration::from_micros(10) } else { delay * 4 / 5 };
    }
    let staged_landed = conn.host_path().staged_ops - staged_before;
    let seen = format!(
        "{cut_while_staged} cut off while staged, {early} before the post, {late} after the push, {landed} landed"
    );
    eprintln!("{seen}");
    assert!(cut_while_staged > 0, "no write was cut off during its push in {ROUNDS} rounds: {seen}");
    assert_eq!(staged_landed, landed, "every write that landed was staged: {seen}");
    // The connection still moves bytes both ways, staged.
    let before = conn.host_path().staged_ops;
    write_and_read_back(&engine, &conn, window, 5, &common::pattern(2 << 20, 4));
    assert_eq!(conn.host_path().staged_ops - before, 2);
}

/// The kernel refusing `process_vm_readv` both ways (test hook, as Yama's ptrace scope 1 does
/// between sibling processes, and `pidfd_getfd` with it) leaves the staging areas, which need only
/// the peer's proven identity and take its descriptor through `/proc`: transfers that fit move
/// through them byte-exact, larger ones over the channels, none copied out of the peer. Without
/// this end's opt-in nothing changes: the channels carry everything, and no area is mapped.
#[test]
fn the_staging_areas_serve_ends_the_kernel_will_not_let_copy_from_each_other() {
    for opted_in in [true, false] {
        let config = if opted_in { staged_config() } else { Config { host_copy_threads: 4, ..same_host() } };
        let engine = Engine::new(config).unwrap();
        let (process, conn, window) = staged_peer_refusing(&engine, true);
        let path = conn.host_path();
        assert!(!path.reads_peer && !path.peer_reads_us, "the kernel refuses either way: {path:?}");
        let sizes = [(64 << 10) + 1, (1 << 20) + 7, 16 << 20];
        if opted_in {
            warm_up(&engine, &conn, window);
        } else {
            // What would have made and mapped the areas, and more.
            for (i, &len) in sizes.iter().enumerate() {
                write_and_read_back(&engine, &conn, window, 4096 * i + 5, &common::pattern(len, 400 + i as u64));
            }
            thread::sleep(Duration::from_millis(200));
        }
        let before = conn.host_path();
        for (i, &len) in sizes.iter().enumerate() {
            write_and_read_back(&engine, &conn, window, 4096 * i + 3, &common::pattern(len, 300 + i as u64));
        }
        let after = conn.host_path();
        let staged = if opted_in { 2 * sizes.len() as u64 } else { 0 };
        assert_eq!(after.staged_ops - before.staged_ops, staged, "{before:?} -> {after:?}");
        assert_eq!(after.direct_ops, after.staged_ops, "nothing copied out of either process: {after:?}");
        assert_eq!(after.staging, opted_in, "{after:?}");
        // Larger than the area: the channels, as without staging.
        write_and_read_back(&engine, &conn, window, 0, &common::pattern(AREA_BYTES + 1, 9));
        assert_eq!(conn.host_path().direct_ops, after.direct_ops);
        uccl_tcpx::engine::local::refuse_process_access(0);
        drop(process);
    }
}
