//! Comms over several data links: a piece that comes twice lands once, completed requests are
//! acknowledged (again when asked by a repeated piece), a piece is taken over from a socket that
//! stalls in its middle, and a send comm that loses a socket under a stream of messages delivers
//! every byte over the others, then dials that link again and uses it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pure::wire;
use super::pure::wire::{ACK_LEN, Ack, DONE_LEN, PieceCut, PieceHeader, SocketHello, attach_ack};
use super::*;
use crate::trace::{DeadWhy, ResendCause};
use crate::transport::testutil::until;
use crate::transport::{MrHandle, RecvComm, RequestId};

const PIECE: usize = 64 << 10;

/// A receive comm of an acknowledged comm of two sockets whose sender is the test: the raw
/// sockets (the second acknowledged as added) and the comm.
fn raw_acked_sender(net: &SocketNet) -> (TcpStream, TcpStream, Box<dyn RecvComm>) {
    let (handle, mut listen) = net.listen(0).unwrap();
    let h = SocketHandle::decode(&handle).unwrap();
    let hello = |index| SocketHello {
        listen_nonce: h.nonce,
        comm_id: 99,
        index,
        count: 2,
        subchunk: PIECE as u32,
        acked: true,
        spare: 1,
    };
    let mut first = TcpStream::connect(h.addr).unwrap();
    first.write_all(&hello(0).encode()).unwrap();
    let rx = until(|| listen.accept()).unwrap();
    let mut second = TcpStream::connect(h.addr).unwrap();
    second.write_all(&hello(1).encode()).unwrap();
    let mut ack = [0u8; ACK_LEN];
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    second.read_exact(&mut ack).unwrap();
    assert_eq!(ack, attach_ack(1));
    (first, second, rx)
}

fn piece(seq: u64, total: usize, index: usize) -> PieceHeader {
    let len = (total - index * PIECE).min(PIECE);
    PieceHeader { seq, total: total as u64, offset: (index * PIECE) as u64, len: len as u32 }
}

fn send_piece(s: &mut TcpStream, h: PieceHeader, msg: &[u8]) {
    s.write_all(&h.encode()).unwrap();
    s.write_all(&msg[h.offset as usize..][..h.len as usize]).unwrap();
}

fn read_ack(s: &mut TcpStream) -> u64 {
    let mut b = [0u8; DONE_LEN];
    s.read_exact(&mut b).unwrap();
    Ack::decode(&b).unwrap().completed
}

#[test]
fn a_piece_sent_twice_lands_once_and_a_repeat_after_completion_is_acknowledged_again() {
    let net = crate::transport::testutil::loopback_socket_net();
    let (mut first, mut second, mut rx) = raw_acked_sender(&net);
    assert_eq!(PieceCut::new(PIECE, 2).piece_len(3 * PIECE as u64), PIECE as u64);
    let total = 3 * PIECE;
    let msg: Vec<u8> = (0..total).map(|i| (i * 13 % 251) as u8).collect();
    let mut got = vec![0u8; total + 100];
    // SAFETY: `got` outlives the receive, tested to completion below.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    send_piece(&mut first, piece(0, total, 0), &msg);
    send_piece(&mut second, piece(0, total, 0), &msg);
    send_piece(&mut second, piece(0, total, 1), &msg);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rx.test(r).unwrap(), None, "two of three pieces, one of them twice: not complete");
    send_piece(&mut first, piece(0, total, 2), &msg);
    assert_eq!(until(|| rx.test(r)).unwrap(), total);
    assert!(got[..total] == msg[..] && got[total..].iter().all(|&b| b == 0), "every byte once, nothing past");
    assert_eq!(read_ack(&mut first), 1, "the socket that completed the request acknowledges it");
    // A copy of a piece of the completed request: read past, and acknowledged again there.
    send_piece(&mut second, piece(0, total, 1), &msg);
    assert_eq!(read_ack(&mut second), 1);
    rx.irecv_consumed(r).unwrap();
    // The next request still lands whole after the repeated piece.
    let small = &msg[..1000];
    // SAFETY: as above.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    send_piece(&mut second, PieceHeader { seq: 1, total: 1000, offset: 0, len: 1000 }, small);
    assert_eq!(until(|| rx.test(r)).unwrap(), 1000);
    assert_eq!(read_ack(&mut second), 2);
    assert!(got[..1000] == *small);
}

/// A socket that stopped in the middle of a piece (its link failed) has that piece taken over by
/// a copy on another socket; the rest of the stalled copy, should it still come, is read past.
#[test]
fn a_piece_cut_off_mid_way_is_taken_over_by_its_copy() {
    let net = crate::transport::testutil::loopback_socket_net();
    let (mut first, mut second, mut rx) = raw_acked_sender(&net);
    let total = 2 * PIECE;
    let msg: Vec<u8> = (0..total).map(|i| (i * 7 % 253) as u8).collect();
    let mut got = vec![0u8; total];
    // SAFETY: `got` outlives the receive, tested to completion below.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    let h = piece(0, total, 0);
    first.write_all(&h.encode()).unwrap();
    // Half of it, whose bytes differ from the copy's: only the copy's may be what completes.
    first.write_all(&vec![0xEE; PIECE / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    send_piece(&mut second, h, &msg);
    send_piece(&mut second, piece(0, total, 1), &msg);
    assert_eq!(until(|| rx.test(r)).unwrap(), total);
    assert!(got == msg, "the copy's bytes, all of them");
    assert_eq!(read_ack(&mut second), 1);
    // The stalled copy's rest comes after all: read past, and the stream goes on.
    first.write_all(&vec![0xEE; PIECE / 2]).unwrap();
    rx.irecv_consumed(r).unwrap();
    got.fill(0);
    // SAFETY: as above.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    send_piece(&mut first, PieceHeader { seq: 1, total: 10, offset: 0, len: 10 }, &msg);
    assert_eq!(until(|| rx.test(r)).unwrap(), 10);
    assert!(got[..10] == msg[..10] && got[10..].iter().all(|&b| b == 0));
}

/// A send comm over two links (127.0.0.1 and 127.0.0.2) of four sockets with a short stall bound.
fn two_link_pair() -> (SocketNet, comm::SocketSendComm, Box<dyn RecvComm>) {
    two_link_pair_stalling(Duration::from_millis(800))
}

/// The same, failing a transfer after `stall` without progress (a link silent for a quarter of it
/// is dead).
fn two_link_pair_stalling(stall: Duration) -> (SocketNet, comm::SocketSendComm, Box<dyn RecvComm>) {
    let links: Vec<IpAddr> = vec![Ipv4Addr::new(127, 0, 0, 1).into(), Ipv4Addr::new(127, 0, 0, 2).into()];
    let net = SocketNet::new("127.0.0.1".parse().unwrap(), Duration::from_secs(5), stall, Arc::new(|| {}))
        .with_options(crate::config::SocketConfig {
            nthreads: 2,
            nsocks_per_thread: 2,
            lazy: false,
            subchunk: PIECE as u32,
            ..Default::default()
        })
        .with_data_links(links);
    let (handle, mut listen) = net.listen(0).unwrap();
    let tx = net.connect_comm(0, &handle).unwrap();
    let rx = until(|| listen.accept()).unwrap();
    (net, tx, rx)
}

/// Sends `rounds` messages of `len` bytes from `tx` to `rx`, up to eight in flight, calling
/// `between(i)` before message `i`; checks every byte of each.
fn stream(
    tx: &mut comm::SocketSendComm,
    rx: &mut Box<dyn RecvComm>,
    rounds: usize,
    len: usize,
    mut between: impl FnMut(usize, &mut comm::SocketSendComm),
) {
    let msgs: Vec<Vec<u8>> = (0..8).map(|m| (0..len).map(|i| ((i * 31 + m * 17) % 251) as u8).collect()).collect();
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; len]).collect();
    let mut flight = std::collections::VecDeque::new();
    for i in 0..rounds + 8 {
        if flight.len() == 8 || (i >= rounds && !flight.is_empty()) {
            let (j, s, r): (usize, RequestId, RequestId) = flight.pop_front().unwrap();
            assert_eq!(until(|| tx.test(s)).unwrap(), len, "send {j}");
            assert_eq!(until(|| rx.test(r)).unwrap(), len, "receive {j}");
            rx.irecv_consumed(r).unwrap();
            assert!(bufs[j % 8] == msgs[j % 8], "message {j} arrived whole");
            bufs[j % 8].fill(0);
        }
        if i >= rounds {
            continue;
        }
        between(i, tx);
        let b = &mut bufs[i % 8];
        // SAFETY: each buffer and message outlives its request, tested to completion above.
        let r = unsafe { rx.irecv(b.as_mut_ptr(), b.len(), MrHandle::NONE) }.unwrap().unwrap();
        let m = &msgs[i % 8];
        // SAFETY: as above.
        let s = unsafe { tx.isend(m.as_ptr(), m.len(), MrHandle::NONE) }.unwrap().unwrap();
        flight.push_back((i, s, r));
    }
}

#[test]
fn a_send_socket_failing_under_a_stream_of_messages_loses_no_byte_and_its_link_is_dialed_again() {
    let (_net, mut tx, mut rx) = two_link_pair();
    let link_bytes = |tx: &comm::SocketSendComm, link: IpAddr| -> u64 {
        tx.link_stats().iter().filter(|l| l.link == link).map(|l| l.bytes).sum()
    };
    let second: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    let killed = std::cell::Cell::new(None);
    stream(&mut tx, &mut rx, 64, 4 * PIECE, |i, tx| {
        if i == 20 {
            killed.set(Some(tx.kill_socket_on(second)));
        }
    });
    let k = killed.get().expect("a socket was killed");
    let links = tx.link_stats();
    assert_eq!(links.iter().map(|l| l.errors).sum::<u64>(), 1, "one socket failed: {links:?}");
    // The link is dialed again after the bound (200 ms here) and carries pieces once joined.
    let start = Instant::now();
    while tx.open_sockets() < 4 {
        assert!(start.elapsed() < testkit::PATIENCE, "the link was not dialed again: {links:?}");
        stream(&mut tx, &mut rx, 4, PIECE, |_, _| {});
        std::thread::sleep(Duration::from_millis(20));
    }
    // Which socket takes a piece is the helpers' race: on a loaded host the others can take every
    // piece of a few rounds, so rounds go on until the rejoined link has carried one.
    let before = link_bytes(&tx, second);
    let start = Instant::now();
    while link_bytes(&tx, second) == before {
        assert!(start.elapsed() < testkit::PATIENCE, "the link carries pieces again (socket {k} was replaced)");
        stream(&mut tx, &mut rx, 32, 4 * PIECE, |_, _| {});
    }
}

/// A comm that can open no socket any more (a helper once failed to take one it opened, which no
/// test can bring about: the test takes the dialer away) drops the re-dial of a dead link when it
/// comes due, and a socket that dies later schedules none: no attempt every few bounds for the
/// rest of the comm. The comm goes on over the sockets left.
#[test]
fn a_comm_that_opens_no_more_sockets_dials_no_dead_link_again() {
    let (_net, mut tx, mut rx) = two_link_pair();
    let second: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    stream(&mut tx, &mut rx, 4, 4 * PIECE, |_, _| {});
    assert_eq!(tx.open_sockets(), 4);
    tx.forget_dialer();
    // Kills a socket over the second link; streams until the comm counts it dead and has looked
    // at its links once more (the next post), so that a re-dial would be scheduled.
    let kill = |tx: &mut comm::SocketSendComm, rx: &mut Box<dyn RecvComm>, left: usize| {
        tx.kill_socket_on(second);
        let start = Instant::now();
        while tx.open_sockets() > left {
            assert!(start.elapsed() < testkit::PATIENCE, "the socket was never declared dead");
            stream(tx, rx, 1, PIECE, |_, _| {});
        }
        stream(tx, rx, 1, PIECE, |_, _| {});
    };
    kill(&mut tx, &mut rx, 3);
    // Past the bound (200 ms) with the comm in use: the re-dial came due and was dropped.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        stream(&mut tx, &mut rx, 2, PIECE, |_, _| {});
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((tx.open_sockets(), tx.redials_pending()), (3, 0), "the re-dial was dropped");
    kill(&mut tx, &mut rx, 2);
    assert_eq!((tx.open_sockets(), tx.redials_pending()), (2, 0), "a later death schedules no re-dial");
    stream(&mut tx, &mut rx, 8, 4 * PIECE, |_, _| {});
    let links = tx.link_stats();
    assert_eq!(links.iter().map(|l| l.errors).sum::<u64>(), 2, "{links:?}");
}

/// The trace events of send comm `comm` of the failover: (time, label, fields as the schema
/// names them).
fn failover_events(comm: u64) -> Vec<(u64, &'static str, std::collections::HashMap<&'static str, u64>)> {
    crate::trace::recorded_of_comm(
        comm,
        &["sock_dead", "sock_resent", "sock_redial", "sock_rejoined", "sock_redial_failed"],
    )
}

/// A failover run writes its steps to the trace: the socket declared dead and why, the pieces it
/// carried handed back, the re-dial of its link started and joined, in that order.
#[test]
fn a_failover_is_traced() {
    crate::trace::record_in_memory(crate::trace::SOCKET);
    let (_net, mut tx, mut rx) = two_link_pair();
    let second: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    let killed = std::cell::Cell::new(None);
    stream(&mut tx, &mut rx, 24, 4 * PIECE, |i, tx| {
        if i == 12 {
            killed.set(Some(tx.kill_socket_on(second)));
        }
    });
    let k = killed.get().expect("a socket was killed") as u64;
    let start = Instant::now();
    while tx.open_sockets() < 4 {
        assert!(start.elapsed() < testkit::PATIENCE, "the link was not dialed again");
        stream(&mut tx, &mut rx, 4, PIECE, |_, _| {});
        std::thread::sleep(Duration::from_millis(20));
    }
    // The join is traced by the comm's next look at its links.
    let comm = tx.comm_id();
    let traced = |label| failover_events(comm).into_iter().filter(|e| e.1 == label).collect::<Vec<_>>();
    while traced("sock_rejoined").is_empty() {
        assert!(start.elapsed() < testkit::PATIENCE, "the join was never traced");
        stream(&mut tx, &mut rx, 1, PIECE, |_, _| {});
    }
    let dead = traced("sock_dead");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let why = dead[0].2["why"];
    assert_eq!(dead[0].2["socket"], k);
    assert!(why == DeadWhy::Closed as u64 || why == DeadWhy::Failed as u64, "a socket shut down: {why}");
    let resent = traced("sock_resent");
    assert_eq!(resent.len(), 1, "{resent:?}");
    let r = &resent[0].2;
    assert_eq!((r["socket"], r["cause"]), (k, ResendCause::Dead as u64));
    assert!(r["bytes"] <= r["pieces"] * PIECE as u64 && (r["bytes"] > 0) == (r["pieces"] > 0), "{r:?}");
    let (redial, joined) = (traced("sock_redial"), traced("sock_rejoined"));
    assert_eq!((redial.len(), joined.len()), (1, 1), "{redial:?} {joined:?}");
    // The link of socket k, named by k as in the comm's log lines.
    let (d, j) = (&redial[0].2, &joined[0].2);
    assert_eq!((d["link"], d["attempt"]), (k, 1), "{d:?}");
    assert!(d["socket"] >= 4, "a spare slot: {d:?}");
    assert_eq!((j["link"], j["attempt"], j["socket"]), (d["link"], d["attempt"], d["socket"]));
    assert!(traced("sock_redial_failed").is_empty());
    assert!(dead[0].0 <= resent[0].0 && resent[0].0 <= redial[0].0 && redial[0].0 <= joined[0].0, "in order");
}

/// A raw listener reached over two data links (127.0.0.1 and 127.0.0.2), its handle, and a net of
/// those links whose stall bound is `bound` and whose failover is `failover`, with one helper per
/// direction.
fn two_link_raw_peer(bound: Duration, failover: bool) -> (std::net::TcpListener, NetHandle, SocketNet) {
    let links: Vec<Ipv4Addr> = vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = SocketHandle::new(std::net::SocketAddr::new(links[0].into(), port), 5, &links).encode();
    // One helper per direction: every comm of the net shares it.
    let options =
        crate::config::SocketConfig { nthreads: 1, nsocks_per_thread: 1, helpers: 1, failover, ..Default::default() };
    let net = SocketNet::new("127.0.0.1".parse().unwrap(), Duration::from_secs(5), bound * 4, Arc::new(|| {}))
        .with_options(options)
        .with_data_links(links.iter().map(|&a| a.into()).collect());
    (listener, handle, net)
}

/// The hello of the first socket a comm of `net` sends to `listener`.
fn first_hello(listener: &std::net::TcpListener) -> (TcpStream, SocketHello) {
    let (mut first, _) = listener.accept().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; wire::HELLO_LEN];
    first.read_exact(&mut hello).unwrap();
    (first, SocketHello::decode(&hello, 5).unwrap())
}

/// `UCCL_TCPX_SOCKET_FAILOVER=0`: a comm over two links asks for no acknowledgements and keeps
/// no spare slots, and a send completes once its bytes are in the kernel.
#[test]
fn without_failover_a_comm_over_two_links_is_not_acknowledged() {
    let (listener, handle, net) = two_link_raw_peer(Duration::from_millis(100), false);
    let mut tx = net.connect_comm(0, &handle).unwrap();
    let (_first, hello) = first_hello(&listener);
    assert!(!hello.acked && hello.spare == 0, "{hello:?}");
    let msg = vec![7u8; 1000];
    // SAFETY: msg outlives the send, tested to completion below.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), msg.len(), "complete without an acknowledgement");
}

/// A sender whose request's bytes all arrived but whose acknowledgement never came (lost with the
/// socket that carried it) sends a piece of it again two bounds later, and completes on the
/// acknowledgement that answers it; never before.
#[test]
fn an_acknowledgement_that_never_comes_is_asked_for_again() {
    let bound = Duration::from_millis(100);
    let (listener, handle, net) = two_link_raw_peer(bound, true);
    let mut tx = net.connect_comm(0, &handle).unwrap();
    let (mut first, hello) = first_hello(&listener);
    assert!(hello.acked && hello.spare > 0, "a comm over two links is acknowledged: {hello:?}");
    let msg: Vec<u8> = (0..1000).map(|i| i as u8).collect();
    // SAFETY: msg outlives the send, tested to completion below.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    let read_piece = move |sock: &mut TcpStream| {
        let mut h = [0u8; wire::PIECE_HEADER_LEN];
        sock.read_exact(&mut h).unwrap();
        let h = PieceHeader::decode(&h, PieceCut::new(hello.subchunk as usize, hello.count as usize)).unwrap();
        let mut payload = vec![0u8; h.len as usize];
        sock.read_exact(&mut payload).unwrap();
        (h, payload)
    };
    let (h, payload) = read_piece(&mut first);
    assert_eq!((h.seq, h.offset, h.total, &payload[..]), (0, 0, 1000, &msg[..]));
    // Nobody acknowledges: the send stays incomplete while the comm is tested, and the piece comes
    // again after two bounds.
    let asked = std::thread::spawn(move || {
        let again = read_piece(&mut first);
        (first, again, Instant::now())
    });
    let start = Instant::now();
    while !asked.is_finished() {
        assert_eq!(tx.test(s).unwrap(), None, "complete without an acknowledgement");
        assert!(start.elapsed() < testkit::PATIENCE, "the piece never came again");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut first, (again, payload), at) = asked.join().unwrap();
    assert_eq!((again, &payload[..]), (h, &msg[..]), "the same piece, the same bytes");
    assert!(at - start >= bound * 3 / 2, "asked again only after two bounds: {:?}", at - start);
    first.write_all(&Ack { completed: 1 }.encode()).unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), msg.len());
}

/// A receiver that read a request's bytes but does not acknowledge it (it has not posted its
/// receive yet: nothing was lost) gets the piece again after two bounds, then after four, eight:
/// not a copy every two bounds.
#[test]
fn an_acknowledgement_overdue_is_asked_for_with_a_doubling_back_off() {
    crate::trace::record_in_memory(crate::trace::SOCKET);
    let bound = Duration::from_millis(100);
    let (listener, handle, net) = two_link_raw_peer(bound, true);
    let mut tx = net.connect_comm(0, &handle).unwrap();
    let (mut first, hello) = first_hello(&listener);
    let msg: Vec<u8> = (0..1000).map(|i| i as u8).collect();
    // SAFETY: msg outlives the send, tested to completion below.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    let cut = PieceCut::new(hello.subchunk as usize, hello.count as usize);
    let mut reader = first.try_clone().unwrap();
    let pieces = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut h = [0u8; wire::PIECE_HEADER_LEN];
        // Until the test shuts the socket down for reading.
        while reader.read_exact(&mut h).is_ok() {
            let h = PieceHeader::decode(&h, cut).unwrap();
            let mut payload = vec![0u8; h.len as usize];
            reader.read_exact(&mut payload).unwrap();
            got.push((h, payload));
        }
        got
    });
    // Twelve bounds with the comm tested: asks at about 2 and 6 bounds (the next at 14); one
    // every two bounds would be 5.
    let start = Instant::now();
    while start.elapsed() < bound * 12 {
        assert_eq!(tx.test(s).unwrap(), None, "complete without an acknowledgement");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A copy the last test sent reaches the reader before it stops.
    std::thread::sleep(Duration::from_millis(50));
    first.shutdown(std::net::Shutdown::Read).unwrap();
    let got = pieces.join().unwrap();
    assert!(got.iter().all(|(h, p)| (h.seq, h.offset, &p[..]) == (0, 0, &msg[..])), "the same piece each time");
    assert!((2..=3).contains(&got.len()), "the piece, then one or two copies: {} in all", got.len());
    let asks: Vec<_> = failover_events(tx.comm_id()).into_iter().map(|(_, label, f)| (label, f)).collect();
    assert_eq!(asks.len(), got.len() - 1, "each copy traced: {asks:?}");
    assert!(
        asks.iter().all(|(label, f)| *label == "sock_resent"
            && (f["pieces"], f["bytes"], f["cause"]) == (1, 1000, ResendCause::AckOverdue as u64)),
        "{asks:?}"
    );
    first.write_all(&Ack { completed: 1 }.encode()).unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), msg.len());
}

/// A hostile receiver acknowledges a request whose bytes it cannot hold (it read none, and most
/// are still in the sender's memory): the comm fails with a protocol violation, the request
/// never completes, and nothing panics.
#[test]
fn an_acknowledgement_of_bytes_never_sent_fails_the_comm() {
    let (listener, handle, net) = two_link_raw_peer(Duration::from_millis(100), true);
    let mut tx = net.connect_comm(0, &handle).unwrap();
    let (mut first, hello) = first_hello(&listener);
    assert!(hello.acked);
    // Far more than the socket buffers hold while nobody reads.
    let msg = vec![3u8; 256 << 20];
    // SAFETY: msg outlives the send: the comm fails and is dropped (joining its helpers) first.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    first.write_all(&Ack { completed: 1 }.encode()).unwrap();
    let start = Instant::now();
    let err = loop {
        match tx.test(s) {
            Ok(None) => {}
            Ok(Some(n)) => panic!("a request completed on a lie ({n} bytes)"),
            Err(e) => break e,
        }
        assert!(start.elapsed() < testkit::PATIENCE, "the comm never failed");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(err.message().contains("protocol violation") && err.message().contains("not sent in full"), "{err}");
    drop(tx);
}

/// A receiver that posts nothing for several bounds (within the stall timeout) while the sender's messages fill every
/// buffer: its kernel closes the window, and only window probes go (backing off past the bound).
/// No socket is declared dead, and the messages complete whole once it posts.
#[test]
fn a_receiver_posting_nothing_for_several_bounds_kills_no_socket() {
    // Bounds of 800 ms, not 200: with the whole suite running on two cores a live link was once
    // silent past 400 ms while the receiver drained (a starved receiver short of memory drops
    // segments, and the retransmissions back off), which a production bound (7.5 s) never sees.
    let (_net, mut tx, mut rx) = two_link_pair_stalling(Duration::from_millis(3200));
    stream(&mut tx, &mut rx, 4, PIECE, |_, _| {});
    let len = 4 << 20;
    let msgs: Vec<Vec<u8>> = (0..8).map(|m| (0..len).map(|i| ((i * 7 + m * 13) % 253) as u8).collect()).collect();
    // SAFETY: each message outlives its send, tested to completion below.
    let sends: Vec<RequestId> =
        msgs.iter().map(|m| unsafe { tx.isend(m.as_ptr(), m.len(), MrHandle::NONE) }.unwrap().unwrap()).collect();
    // Three and a half bounds, with the comm tested, so its links are checked; not the stall
    // timeout, past which the kernel gives a closed window up as well.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2800) {
        assert_eq!(tx.test(sends[0]).unwrap(), None, "complete before anything was received");
        std::thread::sleep(Duration::from_millis(5));
    }
    let links = tx.link_stats();
    assert_eq!(links.iter().map(|l| l.errors).sum::<u64>(), 0, "a socket was declared dead: {links:?}");
    assert_eq!(tx.open_sockets(), 4);
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; len]).collect();
    // SAFETY: each buffer outlives its receive, tested to completion below.
    let recvs: Vec<RequestId> =
        bufs.iter_mut().map(|b| unsafe { rx.irecv(b.as_mut_ptr(), len, MrHandle::NONE) }.unwrap().unwrap()).collect();
    for (s, r) in sends.into_iter().zip(recvs) {
        assert_eq!(until(|| tx.test(s)).unwrap(), len);
        assert_eq!(until(|| rx.test(r)).unwrap(), len);
    }
    assert!(bufs == msgs, "every message arrived whole");
    let links = tx.link_stats();
    assert_eq!(links.iter().map(|l| l.errors).sum::<u64>(), 0, "a socket was declared dead: {links:?}");
}

/// A hostile receiver floods a send comm's socket with stale acknowledgements (valid, but old)
/// faster than they can be read. The helper serving that socket reads a bounded number per run,
/// so it still serves its other sockets: another comm on the same helper moves every message.
#[test]
fn a_flood_of_stale_acknowledgements_keeps_no_helper_from_its_other_sockets() {
    // One sending helper serves both comms' sockets.
    let (listener, handle, net) = two_link_raw_peer(Duration::from_millis(100), true);
    let flooded = net.connect_comm(0, &handle).unwrap();
    let (first, hello) = first_hello(&listener);
    assert!(hello.acked);
    let flood = {
        let mut s = first.try_clone().unwrap();
        std::thread::spawn(move || {
            let acks: Vec<u8> = (0..4096).flat_map(|_| Ack { completed: 0 }.encode()).collect();
            let mut written = 0;
            // Until the comm's socket goes: blocked while its buffers are full.
            while let Ok(n) = s.write(&acks) {
                written += n;
            }
            written
        })
    };
    let (h, mut listen) = net.listen(0).unwrap();
    let mut tx = net.connect_comm(0, &h).unwrap();
    let mut rx = until(|| listen.accept()).unwrap();
    stream(&mut tx, &mut rx, 16, 4 * PIECE, |_, _| {});
    let _ = first.shutdown(std::net::Shutdown::Both);
    drop(flooded);
    let written = flood.join().unwrap();
    assert!(written >= 64 * DONE_LEN, "the flood went out ({written} bytes)");
}
