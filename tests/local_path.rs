//! Same-host peers: a connection knows that its peer shares the host (boot id and network
//! namespace from the handshake) or the process (proven through this process's own tables), and
//! one-sided host transfers between engines of one process are copied directly, under the target's
//! authorization exactly as on the network path. `UCCL_TCPX_DISABLE_IPC` turns all of it off.

use std::time::Duration;

use uccl_tcpx::engine::OneSided;
use uccl_tcpx::engine::local::Locality;
use uccl_tcpx::{Config, Engine, UcclStatus};

mod common;
use common::{ChildTest, pair, same_host, wait};

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
    wrong_token = uccl_tcpx::proto::FifoItem::from_bytes(&raw);
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
        uccl_tcpx::engine::notify::drain(usize::MAX).into_iter().find(|n| n.name == b"local-notify-test")
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
