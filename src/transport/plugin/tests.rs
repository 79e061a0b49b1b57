//! The plugin transport against the mock table: data moves and lands gathered, and every TCPX rule
//! the engine could break is refused here before the plugin sees it (the mock records violations).

use super::gpu::BatchUnpack;
use super::mock;
use super::stage::StageBudget;
use super::*;
use crate::error::UcclStatus;
use crate::transport::{IoSeg, MemKind, MrHandle, MrRun, RequestId};

fn net() -> PluginNet {
    PluginNet::with_plugin(mock::plugin(), None, None).unwrap()
}

struct Link {
    pair: u64,
    send: Box<dyn SendComm>,
    recv: Box<dyn RecvComm>,
}

fn link(net: &PluginNet) -> Link {
    let (handle, mut listen) = net.listen(0).unwrap();
    assert_eq!(&handle[tcpx::PROFILE.connect_state.clone()], &[0u8; 8], "connect state never goes on the wire");
    let pair = mock::pair_of_handle(&handle);
    let mut mine = handle;
    // A peer may ship anything in those bytes; the connect must start from a clean copy anyway.
    mine[tcpx::PROFILE.connect_state.clone()].fill(0xFF);
    let (mut send, mut recv) = (None, None);
    for _ in 0..10 {
        if send.is_none() {
            send = net.connect(0, &mut mine).unwrap();
        }
        if recv.is_none() {
            recv = listen.accept().unwrap();
        }
    }
    let err = listen.accept().err().expect("one accept per listen comm");
    assert!(err.to_string().contains("serves one accept"), "{err}");
    drop(listen);
    mock::pair(pair, |p| {
        assert!(p.listen_closed, "listen closed after its accept completed");
        assert!(p.calls["connect"] >= 2 && p.calls["accept"] >= 2, "both were asynchronous: {:?}", p.calls);
    });
    Link { pair, send: send.expect("connected"), recv: recv.expect("accepted") }
}

fn no_violations(pair: u64) {
    mock::pair(pair, |p| assert!(p.violations.is_empty(), "{:?}", p.violations));
}

fn calls(pair: u64, entry: &str) -> usize {
    mock::pair(pair, |p| p.calls.get(entry).copied().unwrap_or(0))
}

fn wait_send(l: &mut Link, req: RequestId) -> usize {
    (0..100).find_map(|_| l.send.test(req).unwrap()).expect("send completes")
}

fn wait_recv(l: &mut Link, req: RequestId) -> usize {
    (0..100).find_map(|_| l.recv.test(req).unwrap()).expect("receive completes")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn messages_arrive_in_order_gathered_from_shuffled_fragments() {
    let net = net();
    let mut l = link(&net);
    let sizes = [0usize, 1, 999, 1000, 4097, 60_000];
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u8)).collect();
    let mut dsts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let recvs: Vec<RequestId> = dsts
        .iter_mut()
        // SAFETY: each d is a live Vec of d.len() bytes in dsts, which outlives every test of these receives
        // (the comm gathers into a receive's buffer only inside test).
        .map(|d| unsafe { l.recv.irecv(d.as_mut_ptr(), d.len(), MrHandle::NONE) }.unwrap().unwrap())
        .collect();
    let sends: Vec<RequestId> =
        // SAFETY: each s is a live Vec in srcs, which outlives the sends (the mock copies a send's bytes
        // inside isend).
        srcs.iter().map(|s| unsafe { l.send.isend(s.as_ptr(), s.len(), MrHandle::NONE) }.unwrap().unwrap()).collect();
    assert!(net.needs_polling(), "requests outstanding");
    for (i, req) in sends.into_iter().enumerate() {
        assert_eq!(wait_send(&mut l, req), sizes[i]);
    }
    for (i, req) in recvs.into_iter().enumerate() {
        assert_eq!(wait_recv(&mut l, req), sizes[i], "message {i}");
        assert_eq!(dsts[i], srcs[i], "message {i}");
        l.recv.irecv_consumed(req).unwrap();
    }
    assert!(!net.needs_polling(), "nothing outstanding");
    no_violations(l.pair);
    mock::pair(l.pair, |p| assert_eq!(p.live_mrs, 0, "per-request registrations were released"));
}

#[test]
fn the_window_is_full_at_sixteen_before_the_plugin_is_called() {
    let net = net();
    let mut l = link(&net);
    let mut bufs = [[0u8; 8]; 17];
    for (k, b) in bufs.iter_mut().enumerate().take(16) {
        // SAFETY: b is one of bufs' 8-byte arrays, which outlive the link's every test call (gathers happen
        // only inside test).
        let r = unsafe { l.recv.irecv(b.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap();
        assert_eq!(r, Some(RequestId(k as u64)));
    }
    // SAFETY: bufs[16] is a live 8-byte array; the window is full, so nothing keeps the pointer.
    assert_eq!(unsafe { l.recv.irecv(bufs[16].as_mut_ptr(), 8, MrHandle::NONE) }.unwrap(), None);
    assert_eq!(calls(l.pair, "irecv"), 16);

    let src = [7u8; 8];
    let sends: Vec<RequestId> =
        // SAFETY: src is a live 8-byte array that outlives the sends (the mock copies a send's bytes inside
        // isend).
        (0..16).map(|_| unsafe { l.send.isend(src.as_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap()).collect();
    // SAFETY: src is a live 8-byte array; the window is full, so nothing keeps the pointer.
    assert_eq!(unsafe { l.send.isend(src.as_ptr(), 8, MrHandle::NONE) }.unwrap(), None);
    assert_eq!(calls(l.pair, "isend"), 16);

    // A completed but unconsumed receive still holds its slot.
    assert_eq!(wait_recv(&mut l, RequestId(0)), 8);
    // SAFETY: bufs[16] is a live 8-byte array; the window is still full, so nothing keeps the pointer.
    assert_eq!(unsafe { l.recv.irecv(bufs[16].as_mut_ptr(), 8, MrHandle::NONE) }.unwrap(), None);
    l.recv.irecv_consumed(RequestId(0)).unwrap();
    // SAFETY: bufs[16] is a live 8-byte array of the test's that outlives every test call on this link.
    let r = unsafe { l.recv.irecv(bufs[16].as_mut_ptr(), 8, MrHandle::NONE) }.unwrap();
    assert_eq!(r, Some(RequestId(16)), "slot freed by consumption");
    for s in sends {
        wait_send(&mut l, s);
    }
    no_violations(l.pair);
}

#[test]
fn test_and_consume_only_in_order_and_never_twice() {
    let net = net();
    let mut l = link(&net);
    mock::pair(l.pair, |p| p.send_polls_to_finish = 2);
    let src = pattern(64, 1);
    // SAFETY: src holds 64 bytes and lives to the end of the test; the mock copies a send's bytes inside
    // isend.
    let s0 = unsafe { l.send.isend(src.as_ptr(), 64, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: src holds 64 bytes (32 are sent) and lives to the end of the test.
    let s1 = unsafe { l.send.isend(src.as_ptr(), 32, MrHandle::NONE) }.unwrap().unwrap();
    let err = l.send.test(s1).unwrap_err().to_string();
    assert!(err.contains("oldest request in flight is 0"), "{err}");
    assert_eq!(calls(l.pair, "test"), 0, "refused before the plugin");
    assert_eq!(l.send.test(s0).unwrap(), None, "in progress");
    assert_eq!(l.send.test(s0).unwrap(), Some(64));
    assert!(l.send.test(s0).is_err(), "a done request is never tested again");
    assert_eq!(wait_send(&mut l, s1), 32);

    let mut a = [0u8; 64];
    let mut b = [0u8; 64];
    // SAFETY: a is a live 64-byte array read only after r0 is reported done.
    let r0 = unsafe { l.recv.irecv(a.as_mut_ptr(), 64, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: b is a live 64-byte array read only after r1 is reported done.
    let r1 = unsafe { l.recv.irecv(b.as_mut_ptr(), 64, MrHandle::NONE) }.unwrap().unwrap();
    let tests_before = calls(l.pair, "test");
    assert!(l.recv.test(r1).is_err());
    assert!(l.recv.irecv_consumed(r0).unwrap_err().to_string().contains("in flight"));
    assert_eq!(calls(l.pair, "test"), tests_before);
    assert_eq!(calls(l.pair, "irecvConsumed"), 0);
    assert_eq!(wait_recv(&mut l, r0), 64);
    assert!(l.recv.test(r0).is_err(), "never re-tested");
    assert_eq!(wait_recv(&mut l, r1), 32);
    assert!(l.recv.irecv_consumed(r1).is_err(), "r0 first");
    l.recv.irecv_consumed(r0).unwrap();
    l.recv.irecv_consumed(r1).unwrap();
    assert!(l.recv.irecv_consumed(r1).is_err(), "never consumed twice");
    assert_eq!((&a[..], &b[..32]), (&src[..], &src[..32]));
    no_violations(l.pair);
}

#[test]
fn sizes_beyond_the_plugin_limits_are_refused() {
    let net = net();
    let mut l = link(&net);
    let mut big = vec![0u8; (4 << 20) + 1];
    // SAFETY: big is a live Vec of big.len() bytes; the size is refused before the plugin is called.
    let e = unsafe { l.recv.irecv(big.as_mut_ptr(), big.len(), MrHandle::NONE) }.unwrap_err();
    assert!(e.to_string().contains("4194304-byte limit"), "{e}");
    // SAFETY: big is a live Vec of big.len() bytes; the size is refused before the plugin is called.
    let e = unsafe { l.send.isend(big.as_ptr(), big.len(), MrHandle::NONE) }.unwrap_err();
    assert!(e.to_string().contains("4194304-byte limit"), "{e}");
    // SAFETY: big is a live Vec of more than 4 MiB that lives to the end of the test; no message is sent, so
    // nothing is gathered into it.
    let r = unsafe { l.recv.irecv(big.as_mut_ptr(), 4 << 20, MrHandle::NONE) }.unwrap();
    assert_eq!(r, Some(RequestId(0)), "exactly 4 MiB is allowed");
    let e = l.send.reg_mr(0x1000, 1 << 31, MemKind::Host).unwrap_err();
    assert!(e.to_string().contains("2 GiB"), "{e}");
    assert_eq!(calls(l.pair, "regMr"), 1, "only the 4 MiB receive's own registration");
    no_violations(l.pair);
}

#[test]
fn a_sender_larger_than_the_receive_fails_the_comm_without_touching_memory() {
    let net = net();
    let mut l = link(&net);
    let mut dst = vec![0u8; 100];
    let src = pattern(200, 3);
    // SAFETY: dst is a live 100-byte Vec that lives to the end of the test and is read only after the receive
    // failed.
    let r = unsafe { l.recv.irecv(dst.as_mut_ptr(), 100, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: src is a live 200-byte Vec; the mock copies a send's bytes inside isend.
    let s = unsafe { l.send.isend(src.as_ptr(), 200, MrHandle::NONE) }.unwrap().unwrap();
    wait_send(&mut l, s);
    let e = (0..10).find_map(|_| l.recv.test(r).err()).expect("refused");
    assert!(e.to_string().contains("exceeds the posted 100-byte receive"), "{e}");
    assert!(dst.iter().all(|b| *b == 0), "nothing gathered");
    let irecvs = calls(l.pair, "irecv");
    // SAFETY: dst is a live 100-byte Vec; the comm has failed, so the receive is refused before anything
    // keeps the pointer.
    let again = unsafe { l.recv.irecv(dst.as_mut_ptr(), 100, MrHandle::NONE) }.unwrap_err();
    assert_eq!(again, e, "the comm stays failed");
    assert_eq!(calls(l.pair, "irecv"), irecvs, "no plugin call after the failure");
    no_violations(l.pair);
}

#[test]
fn plugin_errors_carry_the_last_warning() {
    let net = net();
    let mut l = link(&net);
    let mut dst = [0u8; 8];
    // SAFETY: dst is a live 8-byte array; the receive fails (injected) before anything is gathered into it.
    let r = unsafe { l.recv.irecv(dst.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    mock::pair(l.pair, |p| p.fail_next_recv_test = Some(2));
    let e = l.recv.test(r).unwrap_err();
    assert_eq!(e.status(), UcclStatus::ErrRemoteDisconnect);
    assert!(e.message().contains("rc 2 (system error)"), "{e}");
    assert!(e.message().contains("Connection closed by remote peer"), "{e}");
    assert_eq!(l.recv.test(r).unwrap_err(), e, "failed comms are not called again");
    drop(l.recv);
    mock::pair(l.pair, |p| assert_eq!(p.closed_with_outstanding, 1, "closed anyway"));
    assert!(!net.needs_polling(), "a closed comm counts nothing outstanding");
}

#[test]
fn cuda_registrations_cover_whole_pages_and_gpu_receives_from_a_host_pool_are_refused() {
    let net = net();
    let mut l = link(&net);
    let mr = l.send.reg_mr(0x10010, 100, MemKind::Cuda { device: 0 }).unwrap();
    l.send.reg_mr(0x1F000, 0x2000, MemKind::Cuda { device: 0 }).unwrap();
    mock::pair(l.pair, |p| assert_eq!(p.cuda_regs, vec![(0x10000, 4096), (0x1F000, 0x2000)]));
    // SAFETY: 0x10000 is outside mr's page-rounded registration at 0x10010, so the send is refused before any
    // byte is read.
    let e = unsafe { l.send.isend(0x10000 as *const u8, 8, mr) }.unwrap_err();
    assert!(e.to_string().contains("not inside its registration"), "{e}");
    l.send.dereg_mr(mr);

    let gpu = l.recv.reg_mr(0x40000, 4096, MemKind::Cuda { device: 0 }).unwrap();
    // SAFETY: 0x40000 is never dereferenced: the receive's gather refuses a CUDA destination from a host
    // bounce pool (what this test checks) before writing.
    let r = unsafe { l.recv.irecv(0x40000 as *mut u8, 4096, gpu) }.unwrap().unwrap();
    let src = pattern(10, 9);
    // SAFETY: src is a live 10-byte Vec; the mock copies a send's bytes inside isend.
    let s = unsafe { l.send.isend(src.as_ptr(), 10, MrHandle::NONE) }.unwrap().unwrap();
    wait_send(&mut l, s);
    let e = (0..10).find_map(|_| l.recv.test(r).err()).expect("refused");
    assert_eq!(e.status(), UcclStatus::ErrNotSupported);
    assert!(e.to_string().contains("from a host bounce pool"), "{e}");
    no_violations(l.pair);
}

#[test]
fn deregistering_while_in_use_waits_for_completion() {
    let net = net();
    let mut l = link(&net);
    let src = pattern(300, 4);
    let mr = l.send.reg_mr(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
    // SAFETY: src[100..] is 200 live bytes inside mr's registration of src, and src lives to the end of the
    // test.
    let s = unsafe { l.send.isend(src[100..].as_ptr(), 200, mr) }.unwrap().unwrap();
    l.send.dereg_mr(mr);
    mock::pair(l.pair, |p| assert_eq!(p.live_mrs, 1, "still used by the send"));
    wait_send(&mut l, s);
    mock::pair(l.pair, |p| assert_eq!(p.live_mrs, 0));
    no_violations(l.pair);
}

#[test]
fn listen_comms_close_only_when_no_accept_runs() {
    let net = net();
    let (h, listen) = net.listen(0).unwrap();
    let pair = mock::pair_of_handle(&h);
    drop(listen);
    mock::pair(pair, |p| assert!(p.listen_closed, "never accepted: closed"));

    let (h, mut listen) = net.listen(0).unwrap();
    let pair = mock::pair_of_handle(&h);
    assert!(listen.accept().unwrap().is_none(), "no peer yet");
    drop(listen);
    mock::pair(pair, |p| assert!(!p.listen_closed, "accept running: left open"));
    no_violations(pair);
}

#[test]
fn interleaved_connects_each_keep_their_own_handle_buffer() {
    let net = net();
    let (h1, mut l1) = net.listen(0).unwrap();
    let (h2, mut l2) = net.listen(0).unwrap();
    let (mut c1, mut c2) = (h1, h2);
    let (mut s1, mut s2, mut r1, mut r2) = (None, None, None, None);
    for _ in 0..10 {
        if s1.is_none() {
            s1 = net.connect(0, &mut c1).unwrap();
        }
        if s2.is_none() {
            s2 = net.connect(0, &mut c2).unwrap();
        }
        if r1.is_none() {
            r1 = l1.accept().unwrap();
        }
        if r2.is_none() {
            r2 = l2.accept().unwrap();
        }
    }
    assert!(s1.is_some() && s2.is_some() && r1.is_some() && r2.is_some());
    no_violations(mock::pair_of_handle(&h1));
    no_violations(mock::pair_of_handle(&h2));
    assert!(net.connects.lock().is_empty(), "finished attempts leave nothing behind");
}

#[test]
fn devices_and_properties_come_from_the_plugin() {
    let net = net();
    assert_eq!(net.caps().name, "MockNet_v7");
    assert_eq!(net.devices(), 1);
    let p = net.properties(0).unwrap();
    assert!(p.device_unpack && p.supports_cuda && p.supports_host);
    assert_eq!((p.name.as_str(), p.max_requests), ("mock0", 16));
    assert!(net.properties(1).is_err());
    assert!(net.listen(3).is_err());
    assert_eq!((net.channel_device(0), net.channel_device(5)), (0, 0));
    assert!(PluginNet::with_plugin(mock::plugin(), Some(&[1]), None).is_err(), "device 1 does not exist");
}

#[test]
fn no_two_threads_are_ever_inside_the_plugin_at_once() {
    // Connects, accepts and transfers from several threads at once, as the engine's handshake
    // threads and its progress thread do; the mock records any call that found another inside.
    let net = Arc::new(net());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let net = net.clone();
            std::thread::spawn(move || {
                for round in 0..3u8 {
                    let mut l = link(&net);
                    let src = pattern(5000, t.wrapping_mul(16).wrapping_add(round));
                    let mut dst = vec![0u8; src.len()];
                    // SAFETY: dst is a live Vec of dst.len() bytes, read only after the receive is reported
                    // done.
                    let r = unsafe { l.recv.irecv(dst.as_mut_ptr(), dst.len(), MrHandle::NONE) }.unwrap().unwrap();
                    // SAFETY: src is a live Vec of src.len() bytes; the mock copies a send's bytes inside
                    // isend.
                    let s = unsafe { l.send.isend(src.as_ptr(), src.len(), MrHandle::NONE) }.unwrap().unwrap();
                    wait_send(&mut l, s);
                    assert_eq!(wait_recv(&mut l, r), src.len());
                    l.recv.irecv_consumed(r).unwrap();
                    assert_eq!(dst, src);
                    no_violations(l.pair);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let overlaps = mock::overlaps();
    assert!(overlaps.is_empty(), "{} overlapping plugin calls, first: {:?}", overlaps.len(), overlaps.first());
}

/// A net whose receive comms take the mock's host pools for device pools, unpacked by a stand-in
/// that finishes receives only when the test lets it.
fn held_net(test_ahead: bool) -> (PluginNet, Arc<Mutex<mock::HeldUnpack>>) {
    let net = net().with_test_ahead(test_ahead);
    let held = Arc::new(Mutex::new(mock::HeldUnpack::default()));
    net.gpus.stand_in(held.clone(), (mock::SLOT_POOL * crate::ncclnet::UNPACK_QUEUE_DEPTH) as u64);
    (net, held)
}

/// Three receives "into GPU memory" (host memory registered as CUDA memory, which only the
/// stand-in unpacker writes) and their three sends; the first test of the oldest receive hands it
/// to the unpacker, which holds it, and the oldest is tested three times more meanwhile. Returns
/// how many receives reached the unpacker while the oldest was held, after checking that every
/// byte lands once it is let go, in order, and that the plugin saw no rule broken.
fn receives_reaching_the_unpacker_while_the_oldest_unpacks(test_ahead: bool) -> u64 {
    const LEN: usize = 3000;
    const STRIDE: usize = 4096;
    let (net, held) = held_net(test_ahead);
    let mut l = link(&net);
    let mut dst = vec![0u8; 3 * STRIDE];
    let mr = l.recv.reg_mr(dst.as_ptr() as usize, dst.len(), MemKind::Cuda { device: 0 }).unwrap();
    let recvs: Vec<RequestId> = (0..3)
        // SAFETY: each receive gets its own 3000 bytes of dst, which outlives the link; only the
        // stand-in writes them, inside test.
        .map(|k| unsafe { l.recv.irecv(dst.as_mut_ptr().add(k * STRIDE), LEN, mr) }.unwrap().unwrap())
        .collect();
    let srcs: Vec<Vec<u8>> = (0..3).map(|k| pattern(LEN, 10 + k)).collect();
    for s in &srcs {
        // SAFETY: s lives to the end of the test; the mock copies a send's bytes inside isend.
        let req = unsafe { l.send.isend(s.as_ptr(), LEN, MrHandle::NONE) }.unwrap().unwrap();
        assert_eq!(wait_send(&mut l, req), LEN);
    }
    for _ in 0..4 {
        assert_eq!(l.recv.test(recvs[0]).unwrap(), None, "held in the unpacker");
    }
    let reached = held.lock().submitted();
    assert!(l.recv.test(recvs[1]).is_err(), "reported in order: the oldest first");
    held.lock().release_below = u64::MAX;
    for (k, &req) in recvs.iter().enumerate() {
        assert_eq!(wait_recv(&mut l, req), LEN, "receive {k}");
        l.recv.irecv_consumed(req).unwrap();
        assert_eq!(&dst[k * STRIDE..k * STRIDE + LEN], &srcs[k][..], "receive {k}");
    }
    no_violations(l.pair);
    reached
}

#[test]
fn the_plugin_keeps_progressing_while_earlier_receives_unpack() {
    // TCPX moves a comm only inside `test`, which may name only the oldest request it has not
    // reported done: while the oldest receive unpacks, its successors are that request.
    assert_eq!(receives_reaching_the_unpacker_while_the_oldest_unpacks(true), 3, "the plugin was tested for r1 and r2");
    // UCCL_TCPX_PLUGIN_TEST_AHEAD=0, the behaviour before: the plugin waits for the unpack.
    assert_eq!(receives_reaching_the_unpacker_while_the_oldest_unpacks(false), 1, "only the oldest receive moved");
}

#[test]
fn receives_the_plugin_finished_are_reported_without_testing_it_again() {
    let (net, held) = held_net(true);
    let mut l = link(&net);
    let mut dst = vec![0u8; 2 * 4096];
    let mr = l.recv.reg_mr(dst.as_ptr() as usize, dst.len(), MemKind::Cuda { device: 0 }).unwrap();
    // SAFETY: two disjoint 100-byte parts of dst, which outlives the link.
    let r0 = unsafe { l.recv.irecv(dst.as_mut_ptr(), 100, mr) }.unwrap().unwrap();
    // SAFETY: as above.
    let r1 = unsafe { l.recv.irecv(dst.as_mut_ptr().add(4096), 100, mr) }.unwrap().unwrap();
    let src = pattern(100, 5);
    for _ in 0..2 {
        // SAFETY: src lives to the end of the test; the mock copies a send's bytes inside isend.
        let s = unsafe { l.send.isend(src.as_ptr(), 100, MrHandle::NONE) }.unwrap().unwrap();
        wait_send(&mut l, s);
    }
    assert_eq!(l.recv.test(r0).unwrap(), None);
    assert_eq!(held.lock().submitted(), 2);
    assert_eq!(held.lock().launches, 1, "both receives went into one launch");
    held.lock().release_below = 1;
    let tests = calls(l.pair, "test");
    assert_eq!(l.recv.test(r0).unwrap(), Some(100));
    l.recv.irecv_consumed(r0).unwrap();
    assert_eq!(l.recv.test(r1).unwrap(), None, "still in the kernel");
    held.lock().release_below = 2;
    assert_eq!(l.recv.test(r1).unwrap(), Some(100));
    assert_eq!(calls(l.pair, "test"), tests, "nothing left in the plugin to test");
    l.recv.irecv_consumed(r1).unwrap();
    assert_eq!((&dst[..100], &dst[4096..4196]), (&src[..], &src[..]));
    no_violations(l.pair);
}

/// A random block table: `n` pieces of `1..=max` bytes at distinct, shuffled places of a buffer of
/// `n * stride` bytes, each at an odd offset inside its own stride, so sizes and alignments vary.
fn block_table(n: usize, stride: usize, max: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as usize
    };
    let mut slots: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        slots.swap(i, next() % (i + 1));
    }
    slots
        .into_iter()
        .map(|slot| {
            let len = 1 + next() % max;
            let off = next() % (stride - len + 1);
            (slot * stride + off, len)
        })
        .collect()
}

fn iov(base: usize, table: &[(usize, usize)]) -> Vec<IoSeg> {
    table.iter().map(|&(off, len)| IoSeg { addr: base + off, len }).collect()
}

/// Every piece of `table` in registration `mr`.
fn one_run(table: &[(usize, usize)], mr: MrHandle) -> [MrRun; 1] {
    [MrRun { segs: table.len(), mr }]
}

/// Sends `table_s` of `src` as one vectored request into `table_r` of `dst` and checks every byte,
/// and that each end made one plugin request.
fn vectored_round(
    l: &mut Link,
    src: &[u8],
    table_s: &[(usize, usize)],
    dst: &mut [u8],
    table_r: &[(usize, usize)],
    kind: MemKind,
) {
    let smr = l.send.reg_mr(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
    let rmr = l.recv.reg_mr(dst.as_ptr() as usize, dst.len(), kind).unwrap();
    let (sends, recvs) = (calls(l.pair, "isend"), calls(l.pair, "irecv"));
    let before = dst.to_vec();
    // SAFETY: every piece lies in dst, which outlives the link; only the comm writes it, in test.
    let r = unsafe { l.recv.irecvv(&iov(dst.as_ptr() as usize, table_r), &one_run(table_r, rmr)) }.unwrap().unwrap();
    // SAFETY: src outlives the request; isendv copies the pieces before it returns.
    let s = unsafe { l.send.isendv(&iov(src.as_ptr() as usize, table_s), &one_run(table_s, smr)) }.unwrap().unwrap();
    let total: usize = table_s.iter().map(|p| p.1).sum();
    assert_eq!(wait_send(l, s), total);
    assert_eq!(wait_recv(l, r), total);
    l.recv.irecv_consumed(r).unwrap();
    assert_eq!((calls(l.pair, "isend") - sends, calls(l.pair, "irecv") - recvs), (1, 1), "one request per end");
    let sent: Vec<u8> = table_s.iter().flat_map(|&(off, len)| src[off..off + len].iter().copied()).collect();
    let mut expected = before;
    let mut at = 0;
    for &(off, len) in table_r {
        expected[off..off + len].copy_from_slice(&sent[at..at + len]);
        at += len;
    }
    assert!(dst == &expected[..], "every byte of the pieces, and none outside them");
    l.send.dereg_mr(smr);
    l.recv.dereg_mr(rmr);
}

#[test]
fn a_vector_of_pieces_is_one_request_scattered_into_its_pieces() {
    let net = net();
    let mut l = link(&net);
    // Pieces of odd sizes at odd offsets on both ends, cut differently on each end, so that
    // pieces cross each other's boundaries and the pool's fragment boundaries.
    for (n, stride, max, seed) in [(1usize, 64, 40, 1u64), (300, 97, 90, 2), (2000, 40, 33, 3)] {
        let table_s = block_table(n, stride, max, seed);
        let total: usize = table_s.iter().map(|p| p.1).sum();
        let mut lens = Vec::new();
        let mut left = total;
        let mut x = seed;
        while left > 0 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = (1 + (x >> 33) as usize % (2 * max)).min(left);
            lens.push(len);
            left -= len;
        }
        let stride_r = 2 * max + 8;
        let mut table_r = block_table(lens.len(), stride_r, 1, seed + 7);
        for (p, len) in table_r.iter_mut().zip(&lens) {
            p.0 = p.0 / stride_r * stride_r + (p.0 % 8);
            p.1 = *len;
        }
        let src = pattern(n * stride, seed as u8);
        let mut dst = vec![0xA5u8; lens.len() * stride_r];
        vectored_round(&mut l, &src, &table_s, &mut dst, &table_r, MemKind::Host);
    }
    no_violations(l.pair);
}

/// A send comm's staging buffers are bounded by its net, whatever the number of comms: within the
/// bound a vectored send's buffer is kept and the next send takes it (no second registration);
/// past it and calm, it is deregistered and freed as its send completes, and the next send makes
/// one again. A comm's kept buffers leave the net's count with the comm.
#[test]
fn staging_kept_between_vectored_sends_is_bounded_per_net() {
    let table = block_table(64, 64, 48, 5);
    let src = pattern(64 * 64, 3);
    let mut dst = vec![0u8; 64 * 64];
    let regs = |pair| (calls(pair, "regMr"), calls(pair, "deregMr"));

    let kept = net();
    let mut l = link(&kept);
    for round in 0..3 {
        let before = regs(l.pair);
        vectored_round(&mut l, &src, &table, &mut dst, &table, MemKind::Host);
        let (made, freed) = (regs(l.pair).0 - before.0, regs(l.pair).1 - before.1);
        // Each round registers and deregisters the caller's two regions; the first one the stage.
        assert_eq!((made, freed), (2 + usize::from(round == 0), 2), "round {round}");
        assert!(kept.stage_budget.idle() > 0, "the buffer is kept");
    }
    no_violations(l.pair);
    drop(l);
    assert_eq!(kept.stage_budget.idle(), 0, "a closed comm's buffers leave the count");

    let mut bounded = net();
    bounded.stage_budget = StageBudget::new(0, std::time::Duration::ZERO);
    let mut l = link(&bounded);
    for round in 0..3 {
        let before = regs(l.pair);
        vectored_round(&mut l, &src, &table, &mut dst, &table, MemKind::Host);
        let (made, freed) = (regs(l.pair).0 - before.0, regs(l.pair).1 - before.1);
        assert_eq!((made, freed), (3, 3), "round {round}: the stage made, and freed as its send completed");
        assert_eq!(bounded.stage_budget.idle(), 0);
    }
    mock::pair(l.pair, |p| assert_eq!(p.live_mrs, 0, "nothing left registered"));
    no_violations(l.pair);
}

#[test]
fn a_vector_into_device_pieces_is_unpacked_straight_into_them() {
    // The stand-in unpacker plays the GPU: the receive's fragments composed with its pieces.
    let (net, held) = held_net(true);
    held.lock().release_below = u64::MAX;
    let mut l = link(&net);
    let table_s = block_table(500, 64, 60, 11);
    let total: usize = table_s.iter().map(|p| p.1).sum();
    let table_r: Vec<(usize, usize)> = {
        let mut t = Vec::new();
        let (mut at, mut k) = (0usize, 0usize);
        while at < total {
            let len = (1 + (k * 37) % 77).min(total - at);
            t.push((k * 128 + 3, len));
            at += len;
            k += 1;
        }
        t.reverse();
        t
    };
    let src = pattern(500 * 64, 9);
    let mut dst = vec![0x5Au8; table_r.len() * 128];
    vectored_round(&mut l, &src, &table_s, &mut dst, &table_r, MemKind::Cuda { device: 0 });
    assert_eq!(held.lock().submitted(), 1, "one receive through the unpacker");
    no_violations(l.pair);
}

/// Pieces of several registrations (a chunk that crosses from one region into the next), none
/// of which holds the request's total: one request per end, each run checked against its own
/// registration, the receive posted against the comm's own spare range.
#[test]
fn a_vector_over_several_registrations_smaller_than_it_is_one_request() {
    let net = net();
    let mut l = link(&net);
    let src = pattern(3 * 1000, 5);
    let dst: Vec<Vec<u8>> = (0..3).map(|_| vec![0xA5u8; 1000]).collect();
    let base = src.as_ptr() as usize;
    let smrs: Vec<MrHandle> = (0..3).map(|i| l.send.reg_mr(base + i * 1000, 1000, MemKind::Host).unwrap()).collect();
    let rmrs: Vec<MrHandle> =
        dst.iter().map(|d| l.recv.reg_mr(d.as_ptr() as usize, 1000, MemKind::Host).unwrap()).collect();
    // 2,700 bytes: two pieces in each source region, one piece in each destination region.
    let send: Vec<IoSeg> = (0..3)
        .flat_map(|i| [(i * 1000, 500), (i * 1000 + 600, 400)])
        .map(|(o, len)| IoSeg { addr: base + o, len })
        .collect();
    let send_runs: Vec<MrRun> = smrs.iter().map(|&mr| MrRun { segs: 2, mr }).collect();
    let recv: Vec<IoSeg> = dst.iter().map(|d| IoSeg { addr: d.as_ptr() as usize + 50, len: 900 }).collect();
    let recv_runs: Vec<MrRun> = rmrs.iter().map(|&mr| MrRun { segs: 1, mr }).collect();
    // A run whose first piece lies outside its registration is refused before the plugin sees it.
    let swapped = [recv_runs[1], recv_runs[0], recv_runs[2]];
    // SAFETY: refused before anything is posted.
    let e = unsafe { l.recv.irecvv(&recv, &swapped) }.unwrap_err().to_string();
    assert!(e.contains("not inside its registration"), "{e}");
    let (sends, recvs) = (calls(l.pair, "isend"), calls(l.pair, "irecv"));
    // SAFETY: the buffers outlive the requests, tested to completion below.
    let r = unsafe { l.recv.irecvv(&recv, &recv_runs) }.unwrap().unwrap();
    // SAFETY: as above; isendv copies the pieces before it returns.
    let s = unsafe { l.send.isendv(&send, &send_runs) }.unwrap().unwrap();
    assert_eq!(wait_send(&mut l, s), 2700);
    assert_eq!(wait_recv(&mut l, r), 2700);
    l.recv.irecv_consumed(r).unwrap();
    assert_eq!((calls(l.pair, "isend") - sends, calls(l.pair, "irecv") - recvs), (1, 1), "one request per end");
    let sent: Vec<u8> = send.iter().flat_map(|g| src[g.addr - base..g.addr - base + g.len].iter().copied()).collect();
    for (i, d) in dst.iter().enumerate() {
        assert!(d[50..950] == sent[i * 900..(i + 1) * 900], "region {i}");
        assert!(d[..50].iter().chain(&d[950..]).all(|&b| b == 0xA5), "region {i}: nothing outside the piece");
    }
    no_violations(l.pair);
}

#[test]
fn vectored_requests_outside_their_registration_or_overlapping_are_refused() {
    let net = net();
    let mut l = link(&net);
    let buf = vec![0u8; 4096];
    let base = buf.as_ptr() as usize;
    let mr = l.recv.reg_mr(base, 4096, MemKind::Host).unwrap();
    let outside = [IoSeg { addr: base + 4090, len: 10 }, IoSeg { addr: base, len: 10 }];
    // SAFETY: refused before anything is posted.
    let e = unsafe { l.recv.irecvv(&outside, &MrRun::all(&outside, mr)) }.unwrap_err().to_string();
    assert!(e.contains("not inside its registration"), "{e}");
    let overlapping = [IoSeg { addr: base, len: 3000 }, IoSeg { addr: base + 1000, len: 3000 }];
    // SAFETY: as above.
    let e = unsafe { l.recv.irecvv(&overlapping, &MrRun::all(&overlapping, mr)) }.unwrap_err().to_string();
    assert!(e.contains("pieces overlap"), "{e}");
    let smr = l.send.reg_mr(base, 4096, MemKind::Host).unwrap();
    // SAFETY: as above.
    let e = unsafe { l.send.isendv(&outside, &MrRun::all(&outside, smr)) }.unwrap_err().to_string();
    assert!(e.contains("not inside its registration"), "{e}");
    assert_eq!((calls(l.pair, "isend"), calls(l.pair, "irecv")), (0, 0));
    no_violations(l.pair);
}

/// The driver takes the vendor's rules from its profile: TCPX's reach the net's caps, its devices'
/// request bound and the part of a handle it never ships.
#[test]
fn tcpx_rules_come_from_its_profile() {
    let net = PluginNet::with_plugin(mock::plugin(), None, None).unwrap();
    let (caps, rules) = (net.caps(), &tcpx::PROFILE);
    assert!(caps.listen_per_channel && rules.listen_per_channel, "one accept per listen comm");
    assert!(!caps.reaches_own_host && !rules.reaches_own_host, "no peers on its own host");
    assert!(net.devices() > 0);
    for dev in 0..net.devices() {
        assert_eq!(net.properties(dev).unwrap().max_requests, 16, "device {dev}");
    }
    assert_eq!(rules.connect_state, 80..88);
}
