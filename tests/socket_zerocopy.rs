//! MSG_ZEROCOPY sends of the socket transport over loopback, where the kernel delivers with a copy
//! but still reports every send on the error queue: data arrives intact with many requests and
//! sockets in flight, every zero-copy send is reported before its request counts as done, and a
//! request whose pages the kernel still holds is not reported done.

use std::time::{Duration, Instant};

use uccl_tcpx::config::SocketConfig;
use uccl_tcpx::transport::{MrHandle, RequestId};

mod common;
use common::socket::{comm_pair, socket_net};
use common::{Rng, pattern};

const LIMIT: Duration = Duration::from_secs(60);

fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::yield_now();
    }
}

/// Keeps 16 sends and 16 receives in flight over a comm of several sockets and threads; sizes mix
/// whole pieces (zero-copy), short tails and small messages (copies). Every byte is checked.
#[test]
fn many_requests_in_flight_arrive_intact_and_every_send_is_reported() {
    let piece = 32 << 10;
    let net = socket_net(SocketConfig {
        nthreads: 2,
        nsocks_per_thread: 2,
        subchunk: piece as u32,
        zerocopy_threshold: 8 << 10,
        ..SocketConfig::default()
    });
    let (mut tx, mut rx) = comm_pair(&net);
    let mut rng = Rng(0x2c0f_fee5);
    let count = 160;
    let sizes: Vec<usize> = (0..count)
        .map(|_| match rng.below(4) {
            0 => rng.below(8 << 10),
            1 => piece * (1 + rng.below(8)),
            _ => rng.below(1 << 20) + 1,
        })
        .collect();
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u64 + 1)).collect();
    let mut dsts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n + 8]).collect();
    let (mut next_send, mut next_recv, mut checked) = (0, 0, 0);
    let mut sends: std::collections::VecDeque<RequestId> = Default::default();
    let mut recvs: std::collections::VecDeque<(usize, RequestId)> = Default::default();
    let mut max_in_flight = 0;
    let deadline = Instant::now() + LIMIT;
    while checked < count {
        assert!(Instant::now() < deadline, "stalled: {checked} of {count} checked");
        while next_recv < count {
            let d = &mut dsts[next_recv];
            // SAFETY: `dsts` outlives the request, which is consumed before it is read.
            let Some(id) = (unsafe { rx.irecv(d.as_mut_ptr(), d.len(), MrHandle(0)) }).unwrap() else { break };
            recvs.push_back((next_recv, id));
            next_recv += 1;
        }
        while next_send < count {
            let s = &srcs[next_send];
            // SAFETY: `srcs` outlives every request.
            let Some(id) = (unsafe { tx.isend(s.as_ptr(), s.len(), MrHandle(0)) }).unwrap() else { break };
            sends.push_back(id);
            next_send += 1;
        }
        max_in_flight = max_in_flight.max(sends.len());
        while let Some(&id) = sends.front() {
            if tx.test(id).unwrap().is_none() {
                break;
            }
            sends.pop_front();
        }
        while let Some(&(i, id)) = recvs.front() {
            let Some(n) = rx.test(id).unwrap() else { break };
            assert_eq!(n, sizes[i], "message {i} reports the sender's size");
            assert!(dsts[i][..n] == srcs[i][..], "message {i} of {n} bytes arrived intact");
            assert!(dsts[i][n..].iter().all(|&b| b == 0), "nothing landed past message {i}");
            rx.irecv_consumed(id).unwrap();
            recvs.pop_front();
            checked += 1;
        }
    }
    while let Some(id) = sends.pop_front() {
        until("last sends", || tx.test(id).unwrap());
    }
    assert_eq!(max_in_flight, 16, "the window was full at times");
    let stats = net.zerocopy_stats();
    eprintln!("{stats:?}");
    if stats.refused_sockets > 0 {
        assert_eq!(stats.sends, 0, "a refused socket never sends zero-copy: {stats:?}");
        return;
    }
    assert!(stats.sends >= 100, "whole pieces went out zero-copy: {stats:?}");
    assert_eq!(stats.completed, stats.sends, "every send was reported before its request finished: {stats:?}");
    assert_eq!(stats.copied, stats.completed, "loopback delivers every zero-copy send with a copy: {stats:?}");
    assert_eq!(stats.pieces_held, 0);
}

/// The receiver takes nothing, so once its socket buffer is full the kernel keeps the rest of a
/// request queued on the sending socket with the caller's pages pinned: the request must stay in
/// progress although every byte was handed to the kernel, and finish once the receiver drains the
/// socket. (Kernel-tuned buffers: a receive window below loopback's 64 KiB segment stalls TCP.)
#[test]
fn request_is_not_done_while_the_kernel_holds_its_pages() {
    let piece = 64 << 10;
    let net = socket_net(SocketConfig {
        nthreads: 1,
        nsocks_per_thread: 1,
        subchunk: piece as u32,
        zerocopy_threshold: piece as u32,
        ..SocketConfig::default()
    });
    let (mut tx, mut rx) = comm_pair(&net);
    if net.zerocopy_stats().refused_sockets > 0 {
        eprintln!("SKIPPED: the kernel refuses SO_ZEROCOPY");
        return;
    }
    let pieces = 8;
    let msg = pattern(pieces * piece, 99);
    // SAFETY: `msg` outlives the request.
    let id = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle(0)) }.unwrap().unwrap();
    until("every piece handed to the kernel", || (net.zerocopy_stats().pieces_sent == pieces as u64).then_some(()));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(tx.test(id).unwrap(), None, "done while the kernel still held its pages");
    let stats = net.zerocopy_stats();
    assert!(stats.pieces_held > 0 && stats.completed < stats.sends, "the kernel still holds pages: {stats:?}");

    let mut buf = vec![0u8; msg.len()];
    // SAFETY: `buf` outlives the request.
    let rid = unsafe { rx.irecv(buf.as_mut_ptr(), buf.len(), MrHandle(0)) }.unwrap().unwrap();
    assert_eq!(until("receive", || rx.test(rid).unwrap()), msg.len());
    assert_eq!(until("send", || tx.test(id).unwrap()), msg.len());
    assert!(buf == msg, "the message arrived intact");
    let stats = net.zerocopy_stats();
    assert_eq!((stats.completed, stats.pieces_held), (stats.sends, 0), "{stats:?}");
}
