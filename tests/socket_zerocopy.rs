//! MSG_ZEROCOPY sends of the socket transport over loopback, where the kernel delivers with a copy
//! but still reports every send on the error queue: data arrives intact with many requests and
//! sockets in flight, every zero-copy send is reported before its request counts as done, and a
//! request whose pages the kernel still holds is not reported done.

use uccl_tcpx::config::SocketConfig;
use uccl_tcpx::transport::MrHandle;

mod common;
use common::comm::comm_pair;
use common::socket::socket_net;
use common::{Rng, TRANSFER_LIMIT as LIMIT, pattern};

fn until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::drive(what, LIMIT, f)
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
    let (mut tx, mut rx, _listen) = comm_pair(&net, 0);
    let mut rng = Rng::new("zero-copy message sizes");
    let count = 160;
    let sizes: Vec<usize> = (0..count)
        .map(|_| match rng.below(4) {
            0 => rng.below(8 << 10),
            1 => piece * (1 + rng.below(8)),
            _ => rng.below(1 << 20) + 1,
        })
        .collect();
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u64 + 1)).collect();
    let max_in_flight = common::comm::stream(&mut *tx, &mut *rx, &srcs, 8);
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
    let (mut tx, mut rx, _listen) = comm_pair(&net, 0);
    if net.zerocopy_stats().refused_sockets > 0 {
        eprintln!("SKIPPED: the kernel refuses SO_ZEROCOPY");
        return;
    }
    let pieces = 8;
    let msg = pattern(pieces * piece, 99);
    // SAFETY: `msg` outlives the request.
    let id = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle(0)) }.unwrap().unwrap();
    until("every piece handed to the kernel", || (net.zerocopy_stats().pieces_sent == pieces as u64).then_some(()));
    // The kernel released the pages of what the receiver's socket took and reported them: the
    // sender has reaped reports since, yet still holds the rest.
    let stats = until("the first zero-copy sends reported", || {
        let stats = net.zerocopy_stats();
        (stats.completed > 0).then_some(stats)
    });
    assert!(stats.pieces_held > 0, "the receiver took nothing, yet no pages are held: {stats:?}");
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
