//! Two-sided messages of GPU memory between engines of one host: the receiver copies each out of
//! the sender's memory (IpcSend), over CUDA IPC between processes, by address within one, and no
//! byte takes a socket. Messages of 1 byte, 4 KiB + 3 and 16 MiB each way, into GPU memory and
//! into host memory, on one GPU and between GPU 0 and GPU 1, every byte checked; every message
//! counted as one device batch of the receiver (`device_recv_batches`) and as copied by its
//! receiver at the sender (`sends_copied_by_peer`), while the channels' sockets carried nothing
//! inbound.
//!
//! Without a CUDA driver each test prints "SKIPPED: no CUDA driver" (and fails under
//! UCCL_TCPX_REQUIRE_GPU=1, as scripts/gpu_tests.sh runs it); tests needing two GPUs say so on
//! hosts with one.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{Config, Connection, Engine, Locality};

mod common;
use common::gpu::{Mem, Side, fewer_gpus_than, no_gpu};
use common::{ChildTest, assert_same, pattern, same_host, wait};

const SIZES: [usize; 3] = [1, 4096 + 3, 16 << 20];
const LEN: usize = (16 << 20) + 4096;
/// The peer's messages are its buffer's first bytes, ours our buffer's, from these patterns.
const PEER_SEED: u64 = 17;
const OUR_SEED: u64 = 29;
/// Where our receives and sends start in our buffers: an odd offset into the allocation.
const OFFSET: usize = 3;

/// Bytes the channels' sockets brought in on `conn`.
fn inbound_socket_bytes(conn: &Connection) -> u64 {
    conn.link_stats().iter().map(|l| l.inbound.bytes).sum()
}

/// Receives every size into `mem` at [`OFFSET`], each checked against what the sender sent and
/// counted as one device batch, with no byte from the sockets meanwhile (what the connection's
/// setup moved on them before is not the messages'); returns the sockets' inbound bytes before.
fn receive_each(conn: &Connection, mem: &Mem, mr: u64, seed: u64) -> u64 {
    let before = inbound_socket_bytes(conn);
    let expected = pattern(LEN, seed);
    for len in SIZES {
        let batches = conn.device_recv_batches();
        let id = conn.recv(mr, mem.addr() + OFFSET, len).unwrap();
        assert_eq!(wait(conn, id).unwrap(), len as u64, "a {len}-byte message");
        assert_same(&mem.read(OFFSET, len), &expected[..len], &format!("the {len}-byte message"));
        assert_eq!(conn.device_recv_batches(), batches + 1, "the {len}-byte message took one device copy");
    }
    assert_eq!(inbound_socket_bytes(conn), before, "no message byte came over the sockets");
    before
}

/// The peer process: its engine and GPU memory on `UCCL_TCPX_TEST_PEER_GPU`. It sends every size
/// out of its buffer's start, then receives every size into a second GPU buffer and checks it,
/// printing "PEER-RECEIVED <device batches> <socket bytes in>"; parks until killed.
#[test]
#[ignore = "started by the send/recv tests as their peer process"]
fn gpu_send_peer_process() {
    assert!(common::is_child("gpu_send_peer_process"), "runs as the peer process of the send/recv tests");
    let gpu: i32 = std::env::var("UCCL_TCPX_TEST_PEER_GPU").unwrap().parse().unwrap();
    let engine = Arc::new(Engine::new(Config { gpu: Some(gpu), ..same_host() }).unwrap());
    let mut src = Mem::on_gpu(gpu, LEN);
    src.write(0, &pattern(LEN, PEER_SEED));
    let src_mr = engine.register(src.addr(), LEN).unwrap();
    let dst = Mem::on_gpu(gpu, LEN);
    let dst_mr = engine.register(dst.addr(), LEN).unwrap();
    println!("PEER {}", engine.address().port());
    let conn = common::accept(&engine).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    for len in SIZES {
        let id = conn.send(&[(src_mr, src.addr(), len)]).unwrap();
        assert_eq!(wait(&conn, id).unwrap(), len as u64);
    }
    let before = receive_each(&conn, &dst, dst_mr, OUR_SEED);
    println!("PEER-RECEIVED {} {}", conn.device_recv_batches(), inbound_socket_bytes(&conn) - before);
    testkit::child::park_until_killed()
}

/// This process's engine on GPU `ours` receiving into memory on `side` (GPU `ours` or host), the
/// peer process on GPU `theirs`; then this process sends out of GPU `ours` to the peer's GPU.
fn send_and_receive(ours: i32, theirs: i32, side: Side) {
    let mut peer =
        ChildTest::new("gpu_send_peer_process").ignored().env("UCCL_TCPX_TEST_PEER_GPU", theirs.to_string()).spawn();
    let port: u16 = peer.announcement("PEER ", Duration::from_secs(120)).trim().parse().unwrap();
    let engine = Engine::new(Config { gpu: Some(ours), ..same_host() }).unwrap();
    let dst = match side {
        Side::Gpu => Mem::on_gpu(ours, LEN),
        Side::Host => Mem::new(Side::Host, LEN),
    };
    let dst_mr = engine.register(dst.addr(), LEN).unwrap();
    let mut src = Mem::on_gpu(ours, LEN);
    src.write(0, &pattern(LEN, OUR_SEED));
    let src_mr = engine.register(src.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", port).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    receive_each(&conn, &dst, dst_mr, PEER_SEED);
    for len in SIZES {
        let id = conn.send(&[(src_mr, src.addr(), len)]).unwrap();
        assert_eq!(wait(&conn, id).unwrap(), len as u64, "our {len}-byte message");
    }
    assert_eq!(conn.sends_copied_by_peer(), SIZES.len() as u64, "each of our messages was copied by the peer");
    let line = peer.announcement("PEER-RECEIVED ", Duration::from_secs(120));
    let counts: Vec<u64> = line.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!(counts, [SIZES.len() as u64, 0], "the peer copied each of our messages, none over the sockets");
}

#[test]
fn send_recv_one_gpu_between_processes() {
    if no_gpu() {
        return;
    }
    send_and_receive(0, 0, Side::Gpu);
}

#[test]
fn send_recv_into_host_memory_between_processes() {
    if no_gpu() {
        return;
    }
    send_and_receive(0, 0, Side::Host);
}

#[test]
fn send_recv_two_gpus_between_processes() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    // The peer's messages come from GPU 1 into GPU 0, ours from GPU 0 into GPU 1.
    send_and_receive(0, 1, Side::Gpu);
}

/// Engines of GPUs `ga` and `gb` in this process: `a` sends out of GPU `ga`'s memory, `b`
/// receives into memory on `side` (GPU `gb` or host), each message copied by address. The sends
/// go first, so the receives match them in order.
fn in_process(ga: i32, gb: i32, side: Side) {
    let a = Arc::new(Engine::new(Config { gpu: Some(ga), ..same_host() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(gb), ..same_host() }).unwrap());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = common::accept(&b).unwrap();
    assert_eq!(ab.peer.locality, Locality::SameProcess);
    let mut src = Mem::on_gpu(ga, LEN);
    src.write(0, &pattern(LEN, OUR_SEED));
    let src_mr = a.register(src.addr(), LEN).unwrap();
    let dst = match side {
        Side::Gpu => Mem::on_gpu(gb, LEN),
        Side::Host => Mem::new(Side::Host, LEN),
    };
    let dst_mr = b.register(dst.addr(), LEN).unwrap();
    let sends: Vec<u64> = SIZES.iter().map(|&len| ab.send(&[(src_mr, src.addr(), len)]).unwrap()).collect();
    receive_each(&ba, &dst, dst_mr, OUR_SEED);
    for (id, len) in sends.into_iter().zip(SIZES) {
        assert_eq!(wait(&ab, id).unwrap(), len as u64, "the {len}-byte message's send");
    }
    assert_eq!(ab.sends_copied_by_peer(), SIZES.len() as u64, "each message was copied by its receiver");
}

#[test]
fn send_recv_one_gpu_in_one_process() {
    if no_gpu() {
        return;
    }
    in_process(0, 0, Side::Gpu);
    in_process(0, 0, Side::Host);
}

#[test]
fn send_recv_two_gpus_in_one_process() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    in_process(0, 1, Side::Gpu);
    in_process(1, 0, Side::Gpu);
}

/// Deregistering the receive's region while the receiver copies a large message into it returns
/// only once the copy landed (both transfers complete, the bytes do not change afterwards);
/// deregistering the message's source meanwhile fails the connection, as for any unfinished send,
/// and returns only once no copy reads it any more: the receive's bytes no longer change.
#[test]
fn deregistration_during_the_receivers_copy_is_a_fence() {
    if no_gpu() {
        return;
    }
    let len = 256 << 20;
    for deregister_receive in [true, false] {
        let p = common::pair(same_host());
        assert_eq!(p.ab.peer.locality, Locality::SameProcess);
        let dst = Mem::on_gpu(0, len);
        let mut src = Mem::on_gpu(0, len);
        src.write(0, &pattern(len, 8));
        let dmr = p.b.register(dst.addr(), len).unwrap();
        let smr = p.a.register(src.addr(), len).unwrap();
        let r = p.ba.recv(dmr, dst.addr(), len).unwrap();
        let s = p.ab.send(&[(smr, src.addr(), len)]).unwrap();
        common::eventually("the receiver's copy", Duration::from_secs(60), || {
            (p.ba.device_recv_batches() == 1).then_some(())
        });
        if deregister_receive {
            p.b.deregister(dmr).unwrap();
        } else {
            p.a.deregister(smr).unwrap();
        }
        let first = dst.read(0, len);
        std::thread::sleep(Duration::from_millis(50));
        assert!(first == dst.read(0, len), "the receive changed after the deregistration returned");
        if deregister_receive {
            assert_same(&first, &pattern(len, 8), "all of it landed before the deregistration returned");
            assert_eq!(wait(&p.ba, r).unwrap(), len as u64, "the copy was under way and completed");
            assert_eq!(wait(&p.ab, s).unwrap(), len as u64);
        } else {
            assert!(wait(&p.ab, s).is_err(), "a send whose source was deregistered fails with its connection");
            // The receive ends either way: landed before the failure was seen, or failed with it.
            let _ = wait(&p.ba, r);
        }
    }
}
