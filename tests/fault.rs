//! Faults of a peer process: stopped (SIGSTOP), killed (SIGKILL). The peer is this test binary run
//! again in "peer" mode, so the faults hit a real, separate process.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{Config, Connection, Engine, FifoItem, OneSided, UcclStatus};

mod common;
use common::wait_done as wait;
use common::{ChildTest, PATIENCE, threads, threads_settle};

/// The tests count this process's threads, so they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const REGION: usize = 64 << 20;

fn config(timeout_ms: u64) -> Config {
    Config { timeout: Duration::from_millis(timeout_ms), ..common::loopback() }
}

/// The peer: an engine with one advertised region; prints its port and FifoItem, then serves
/// until killed.
#[test]
#[ignore = "started by the other tests as their peer process"]
fn peer_process() {
    assert!(common::is_child("peer_process"), "runs as a peer process that the other tests start");
    let engine = Engine::new(config(60_000)).unwrap();
    let buf = vec![0u8; REGION];
    let mr = engine.register(buf.as_ptr() as usize, buf.len()).unwrap();
    let item = engine.prepare_fifo(mr, buf.as_ptr() as usize, buf.len()).unwrap();
    println!("PEER {} {}", engine.address().port(), common::engine::fifo_to_hex(&item));
    let _conn = engine.accept().unwrap();
    testkit::child::park_until_killed()
}

struct Peer {
    process: testkit::child::Peer,
    port: u16,
    item: FifoItem,
}

impl Peer {
    fn spawn() -> Peer {
        // Quiet: what the peer logs after the faults inflicted on it is noise.
        let mut process = ChildTest::new("peer_process").ignored().quiet().spawn();
        let line = process.announcement("PEER ", PATIENCE);
        let (port, hex) = line.split_once(' ').expect("PEER <port> <item>");
        Peer { port: port.parse().unwrap(), item: common::engine::fifo_from_hex(hex.trim()), process }
    }

    fn signal(&self, sig: i32) {
        let pid = self.process.pid();
        // SAFETY: sending a signal to our own child process, which is alive until `process` drops.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
        if sig == libc::SIGSTOP {
            // kill() only queues it: the peer's threads stop once its main thread takes the signal,
            // and until then its engine still answers.
            let deadline = std::time::Instant::now() + PATIENCE;
            while !all_stopped(pid) {
                assert!(std::time::Instant::now() < deadline, "peer {pid} not stopped after SIGSTOP");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Whether every thread of process `pid` is stopped (state T in /proc).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        // A thread that ended meanwhile has nothing left to run.
        std::fs::read_to_string(task.path().join("stat")).map_or(true, |stat| {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("T")
        })
    })
}

fn connected(timeout_ms: u64) -> (Engine, Arc<Connection>, Peer, Vec<u8>, u64) {
    let peer = Peer::spawn();
    let engine = Engine::new(config(timeout_ms)).unwrap();
    let conn = engine.connect("127.0.0.1", "0", peer.port).unwrap();
    let src = vec![0x5Au8; REGION];
    let mr = engine.register(src.as_ptr() as usize, src.len()).unwrap();
    // A first write proves the path works before the fault.
    let w = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: 4096, remote: peer.item }]).unwrap();
    assert_eq!(wait(&conn, w, Duration::from_secs(10)).unwrap(), 4096);
    (engine, conn, peer, src, mr)
}

#[test]
fn stopped_peer_fails_pending_transfers_with_timeout() {
    let _serial = serial();
    let (engine, conn, peer, src, mr) = connected(1500);
    let other = Engine::new(config(1500)).unwrap();
    let other_conn = engine.connect("127.0.0.1", "0", other.address().port()).unwrap();
    let _accepted = other.accept().unwrap();
    peer.signal(libc::SIGSTOP);
    let w = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: REGION, remote: peer.item }]).unwrap();
    // The stall timeout fails it (nothing else would: the stopped peer's sockets stay open).
    let err = wait(&conn, w, PATIENCE).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrTimeout, "{err}");
    // Other connections of the engine are unaffected.
    other_conn.notify(b"still", b"alive").unwrap();
    peer.signal(libc::SIGCONT);
}

#[test]
fn killed_peer_fails_pending_transfers_promptly() {
    let _serial = serial();
    let (_engine, conn, peer, src, mr) = connected(30_000);
    let w = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: REGION, remote: peer.item }]).unwrap();
    peer.signal(libc::SIGKILL);
    // The kill fails them as a lost peer, not at the stall timeout (30 s here, a timeout's status).
    match wait(&conn, w, Duration::from_secs(60)) {
        // The whole write may have landed before the kill.
        Ok(n) => assert_eq!(n, REGION as u64),
        Err(e) => assert_eq!(e.status(), UcclStatus::ErrRemoteDisconnect, "{e}"),
    }
    let later = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: 8, remote: peer.item }]);
    let err = match later {
        Err(e) => e,
        Ok(id) => wait(&conn, id, Duration::from_secs(60)).unwrap_err(),
    };
    assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");
}

/// After each kind of peer fault, closing the connection and dropping the engine returns every
/// thread the engine started (control reader and writer, progress, accept, socket helpers).
#[test]
fn faults_leave_no_threads_behind() {
    let _serial = serial();
    for fault in [libc::SIGKILL, libc::SIGSTOP] {
        let baseline = threads();
        {
            let (engine, conn, peer, src, mr) = connected(1500);
            assert!(threads() > baseline, "the engine runs threads of its own");
            let w =
                conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len: REGION, remote: peer.item }]).unwrap();
            peer.signal(fault);
            let err = wait(&conn, w, Duration::from_secs(20));
            if fault == libc::SIGSTOP {
                assert_eq!(err.unwrap_err().status(), UcclStatus::ErrTimeout);
            }
            engine.close_connection(&conn);
            drop(conn);
            drop(engine);
            drop(peer);
        }
        threads_settle(baseline, PATIENCE);
    }
}
