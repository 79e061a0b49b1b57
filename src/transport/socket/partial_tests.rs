//! Requests that are only partly there (`partial`). Sends posted before all their bytes are
//! ready: exactly the ready pieces leave, a raise lets more go and wakes the helpers that sleep,
//! and a comm dropped with such a send closes as any other. Receives report the prefix that landed,
//! whatever order their pieces land in, on a comm asked to track it; others refuse to report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::comm::SocketSendComm;
use super::tests::{eager_net, eager_pair};
use super::wire::PieceCut;
use super::*;
use crate::error::UcclStatus;
use crate::transport::testutil::until;
use crate::transport::{MrHandle, RequestId};

const PIECE: usize = 16 << 10;

/// Four sockets, each on a sending helper of its own that sleeps as soon as it has nothing to do, all
/// opened at connect; `fanout` sleeping helpers woken per post or raise.
fn four_socket_net(fanout: u8) -> SocketNet {
    eager_net(4, fanout, Some(Duration::ZERO))
}

fn message(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed * 13) % 251) as u8).collect()
}

/// Waits until `tx` handed `want` bytes of `req` to the kernel, then checks that nothing more
/// leaves for a while (the sockets are idle, not slow).
fn sends_exactly(tx: &SocketSendComm, req: RequestId, want: u64, what: &str) {
    let deadline = Instant::now() + testkit::PATIENCE;
    while tx.sent(req) < want {
        assert!(Instant::now() < deadline, "{what}: {} of {want} bytes sent", tx.sent(req));
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(tx.sent(req), want, "{what}: no byte past the watermark leaves");
}

/// A receive window lands pieces in any order; its prefix counts only those from the first on
/// without a gap, and is the sender's size once the request completed.
#[test]
fn the_landed_prefix_grows_only_over_pieces_without_a_gap() {
    use super::window::Admission;
    let window = super::window::Window::new(PieceCut::new(PIECE, 1), Arc::new(|| {}));
    let mut buf = vec![0u8; 8 * PIECE];
    let iov = [crate::transport::IoSeg { addr: buf.as_mut_ptr() as usize, len: buf.len() }];
    assert!(window.track_landed());
    window.post(0, &iov, usize::MAX, false);
    assert_eq!(window.landed(0), Some(0), "nothing arrived");
    // The sender's message is shorter than the receive: 4 full pieces and a short fifth.
    let total = (4 * PIECE + 100) as u64;
    let pieces: Vec<super::window::Piece> = (0..5u64)
        .map(|i| {
            let len = (total - i * PIECE as u64).min(PIECE as u64);
            match window.admit(0, total, i * PIECE as u64, len).unwrap() {
                Admission::Land(piece, ..) => piece,
                Admission::NotPosted | Admission::TakeOver(..) | Admission::Discard(..) => {
                    unreachable!("request 0 is posted, once")
                }
            }
        })
        .collect();
    assert_eq!(window.landed(0), Some(0), "admitted is not landed");
    for (landing, expect) in [(2, 0), (0, PIECE), (3, PIECE), (1, 4 * PIECE)] {
        window.landed_piece(&pieces[landing]);
        assert_eq!(window.landed(0), Some(expect), "after piece {landing} landed");
    }
    assert_eq!(window.done(0), None, "the short last piece lands last");
    window.landed_piece(&pieces[4]);
    assert_eq!(window.done(0), Some(total as usize));
    assert_eq!(window.landed(0), Some(total as usize), "complete: the sender's size");
    // The slot's next request starts from nothing.
    for seq in 1..=16 {
        window.post(seq, &iov, usize::MAX, false);
    }
    assert_eq!(window.landed(16), Some(0), "request 16 in request 0's slot");
    drop(buf);
}

/// Admits every piece of request `seq`, a `total`-byte message, in order, and returns them.
fn admit_all(window: &super::window::Window, seq: u64, total: u64) -> Vec<super::window::Piece> {
    use super::window::Admission;
    let piece = window.cut.piece_len(total);
    (0..window.cut.pieces(total))
        .map(|i| match window.admit(seq, total, i * piece, (total - i * piece).min(piece)).unwrap() {
            Admission::Land(piece, ..) => piece,
            Admission::NotPosted | Admission::TakeOver(..) | Admission::Discard(..) => {
                unreachable!("request {seq} is posted, each piece once")
            }
        })
        .collect()
}

/// Slots are reused every 16 requests: each request's prefix counts its own pieces only, whatever
/// the slot's last request left, also after one of more pieces (more bitmap words) than its own.
/// Pieces land out of order.
#[test]
fn a_reused_slot_reports_only_its_new_requests_pieces() {
    let window = super::window::Window::new(PieceCut::new(PIECE, 1), Arc::new(|| {}));
    let mut buf = vec![0u8; 200 * PIECE];
    let iov = [crate::transport::IoSeg { addr: buf.as_mut_ptr() as usize, len: buf.len() }];
    assert!(window.track_landed());
    // Slot 0 holds, in turn, 130 pieces (three words), 70 pieces and a short last one, 3 pieces
    // (one word), then 200 pieces; the requests between fill the other slots with one piece each.
    let sizes = [130 * PIECE as u64, 69 * PIECE as u64 + 9, 3 * PIECE as u64, 200 * PIECE as u64];
    for (round, &total) in sizes.iter().enumerate() {
        let seq = 16 * round as u64;
        window.post(seq, &iov, usize::MAX, false);
        let pieces = admit_all(&window, seq, total);
        let n = pieces.len();
        assert_eq!(window.landed(seq), Some(0), "round {round}: nothing of the new request landed");
        // The last piece first, then the others but the first and the one before the last,
        // backwards: no prefix until the first lands, then up to the gap, in the request's last
        // bitmap word (where a bit the last request left would close it).
        let gap = n - 2;
        window.landed_piece(&pieces[n - 1]);
        for p in pieces[1..gap].iter().rev() {
            window.landed_piece(p);
        }
        assert_eq!(window.landed(seq), Some(0), "round {round}: piece 0 missing");
        window.landed_piece(&pieces[0]);
        assert_eq!(window.landed(seq), Some(gap * PIECE), "round {round}: piece {gap} missing");
        window.landed_piece(&pieces[gap]);
        assert_eq!(window.done(seq), Some(total as usize), "round {round}: complete");
        assert_eq!(window.landed(seq), Some(total as usize), "round {round}: the sender's size");
        // The other slots' requests, so that the next round's post reuses slot 0.
        for other in seq + 1..seq + 16 {
            window.post(other, &iov, usize::MAX, false);
            let pieces = admit_all(&window, other, 10);
            window.landed_piece(&pieces[0]);
            assert_eq!(window.landed(other), Some(10));
        }
    }
    drop(buf);
}

/// A window not asked to track landed pieces reports none (rather than a prefix of nothing), and
/// cannot be asked once a request was posted: that request's pieces would go unmarked.
#[test]
fn an_untracked_window_reports_no_landed_prefix() {
    let window = super::window::Window::new(PieceCut::new(PIECE, 1), Arc::new(|| {}));
    let mut buf = vec![0u8; 4 * PIECE];
    let iov = [crate::transport::IoSeg { addr: buf.as_mut_ptr() as usize, len: buf.len() }];
    window.post(0, &iov, usize::MAX, false);
    let pieces = admit_all(&window, 0, 4 * PIECE as u64);
    window.landed_piece(&pieces[0]);
    assert_eq!(window.landed(0), None, "not tracked");
    assert!(!window.track_landed(), "too late: request 0 is posted");
    for p in &pieces[1..] {
        window.landed_piece(p);
    }
    assert_eq!(window.done(0), Some(4 * PIECE), "an untracked request completes as any other");
    assert_eq!(window.landed(0), None, "still not tracked");
    drop(buf);
}

/// A receive comm that was not asked to track landed bytes refuses to report them as not
/// supported, before and after its receive completed, and still receives; asked after its first
/// receive, it declines.
#[test]
fn a_receive_comm_reports_landed_bytes_only_when_asked() {
    let net = four_socket_net(4);
    let (mut tx, mut rx) = eager_pair(&net, 4);
    let len = 8 * PIECE + 3;
    let msg = message(len, 9);
    let mut got = vec![0u8; len];
    // SAFETY: got and msg outlive both requests, tested to completion below.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), len, MrHandle::NONE) }.unwrap().unwrap();
    assert!(!rx.track_landed(), "asked after the first receive");
    // SAFETY: as above.
    let s = unsafe { tx.isend_ready(msg.as_ptr(), len, MrHandle::NONE, 2 * PIECE) }.unwrap().unwrap();
    sends_exactly(&tx, s, 2 * PIECE as u64, "two pieces");
    assert_eq!(rx.landed(r).unwrap_err().status(), UcclStatus::ErrNotSupported, "in flight");
    tx.raise_ready(s, len).unwrap();
    assert_eq!(until(|| rx.test(r)).unwrap(), len);
    assert_eq!(rx.landed(r).unwrap_err().status(), UcclStatus::ErrNotSupported, "complete");
    assert_eq!(until(|| tx.test(s)).unwrap(), len);
    rx.irecv_consumed(r).unwrap();
    assert!(got == msg, "the message arrived intact");
}

/// What a receive comm reports while a partial send's pieces arrive: exactly the pieces below
/// the watermark, then more after each raise, the whole message once complete; a receive not
/// posted, or consumed, is refused.
#[test]
fn a_receive_reports_the_pieces_a_partial_send_let_go() {
    let net = four_socket_net(4);
    let (mut tx, mut rx) = eager_pair(&net, 4);
    assert!(rx.track_landed());
    assert!(rx.track_landed(), "asking twice before a receive is no harm");
    let len = 16 * PIECE + 5000;
    let msg = message(len, 6);
    let mut got = vec![0u8; len + 100];
    // SAFETY: got and msg outlive both requests, tested to completion below.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    let landed_at = |rx: &mut Box<dyn RecvComm>, want: usize, what: &str| {
        let deadline = Instant::now() + testkit::PATIENCE;
        while rx.landed(r).unwrap() < want {
            assert!(Instant::now() < deadline, "{what}: {} of {want} bytes landed", rx.landed(r).unwrap());
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rx.landed(r).unwrap(), want, "{what}");
    };
    // SAFETY: as above.
    let s = unsafe { tx.isend_ready(msg.as_ptr(), len, MrHandle::NONE, 3 * PIECE + 1) }.unwrap().unwrap();
    landed_at(&mut rx, 3 * PIECE, "three pieces");
    assert!(got[..3 * PIECE] == msg[..3 * PIECE], "the landed prefix is final");
    tx.raise_ready(s, 11 * PIECE).unwrap();
    landed_at(&mut rx, 11 * PIECE, "eleven pieces");
    assert!(got[..11 * PIECE] == msg[..11 * PIECE]);
    tx.raise_ready(s, len).unwrap();
    assert_eq!(until(|| rx.test(r)).unwrap(), len);
    assert_eq!(rx.landed(r).unwrap(), len, "complete: the sender's size, not the posted one");
    assert_eq!(until(|| tx.test(s)).unwrap(), len);
    assert!(got[..len] == msg[..], "the message arrived intact");
    rx.irecv_consumed(r).unwrap();
    assert_eq!(rx.landed(r).unwrap_err().status(), UcclStatus::ErrBackend, "a consumed receive is gone");
    assert!(rx.landed(RequestId(1)).is_err(), "a receive never posted");
}

#[test]
fn the_window_cuts_only_below_the_watermark() {
    let window = super::window::Window::new(PieceCut::new(PIECE, 4), Arc::new(|| {}));
    let buf = vec![0u8; 10 * PIECE + 5];
    let iov = [crate::transport::IoSeg { addr: buf.as_ptr() as usize, len: buf.len() }];
    window.post(0, &iov, 2 * PIECE + 3, false);
    let offsets = |w: &super::window::Window| std::iter::from_fn(|| w.cut().map(|(p, _)| p.offset)).collect::<Vec<_>>();
    assert_eq!(offsets(&window), [0, PIECE as u64], "two whole pieces are ready");
    let work = window.send_work();
    assert_eq!(window.raise(0, 2 * PIECE + 100), 0, "nothing more cuttable");
    assert_eq!(window.send_work(), work, "a raise that frees no piece wakes nobody");
    assert_eq!(window.raise(0, PIECE), 0, "a watermark never goes down");
    assert_eq!(window.raise(0, 7 * PIECE), 5);
    assert!(window.send_work() > work);
    assert_eq!(offsets(&window).len(), 5);
    // A later request, whole, waits behind the one that is not ready.
    window.post(1, &iov[..], usize::MAX, false);
    assert!(window.cut().is_none(), "request 1 waits for request 0");
    assert_eq!(window.raise(0, usize::MAX), 4, "the three whole pieces left and the short last one");
    let rest: Vec<(u64, u64, usize)> =
        std::iter::from_fn(|| window.cut().map(|(p, _)| (p.seq, p.offset, p.len))).collect();
    assert_eq!(rest.len(), 4 + 11);
    assert_eq!(rest[3], (0, 10 * PIECE as u64, 5));
    assert_eq!(rest[4], (1, 0, PIECE));
    assert_eq!(window.raise(7, 100), 0, "a request the slot does not hold is left alone");
}

/// A request posted with a partial watermark sends the pieces below it and nothing more until
/// raised, raise after raise, and completes after the last; the receiver gets the message intact.
/// A watermark not on a piece boundary holds the piece it cuts back.
#[test]
fn a_partial_send_moves_exactly_its_ready_bytes_until_raised() {
    let net = four_socket_net(4);
    let (mut tx, mut rx) = eager_pair(&net, 4);
    assert!(tx.takes_ready_watermark());
    let len = 16 * PIECE + 1000;
    let msg = message(len, 1);
    let mut got = vec![0u8; len + 10];
    // SAFETY: got and msg outlive both requests, which are tested to completion below; msg is not
    // modified.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isend_ready(msg.as_ptr(), len, MrHandle::NONE, 5 * PIECE + 100) }.unwrap().unwrap();
    sends_exactly(&tx, s, 5 * PIECE as u64, "first watermark");
    assert!(tx.test(s).unwrap().is_none() && rx.test(r).unwrap().is_none(), "nothing completes");
    tx.raise_ready(s, 12 * PIECE).unwrap();
    sends_exactly(&tx, s, 12 * PIECE as u64, "second watermark");
    tx.raise_ready(s, 3 * PIECE).unwrap();
    sends_exactly(&tx, s, 12 * PIECE as u64, "a lower watermark changes nothing");
    tx.raise_ready(s, len - 1).unwrap();
    sends_exactly(&tx, s, 16 * PIECE as u64, "one byte short: the short last piece waits");
    assert!(tx.test(s).unwrap().is_none());
    tx.raise_ready(s, len).unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), len);
    assert_eq!(until(|| rx.test(r)).unwrap(), len);
    rx.irecv_consumed(r).unwrap();
    assert!(got[..len] == msg[..], "the message arrived intact");
    // A tested request takes no raise any more.
    assert_eq!(tx.raise_ready(s, len).unwrap_err().status(), UcclStatus::ErrBackend);
    assert!(tx.raise_ready(RequestId(5), 1).is_err(), "nor one never posted");
}

/// Several requests in flight, partial and whole, leave in posting order: a whole request behind a
/// partial one waits for it, and every message arrives intact. A watermark at or past the length
/// from the start is a plain send (the small one goes inline).
#[test]
fn partial_and_whole_sends_keep_their_order() {
    let net = four_socket_net(1);
    let (mut tx, mut rx) = eager_pair(&net, 4);
    let lens = [9 * PIECE + 7, 3 * PIECE, 100, 20 * PIECE, 1];
    let msgs: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &l)| message(l, i)).collect();
    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
    let recvs: Vec<RequestId> = bufs
        .iter_mut()
        // SAFETY: every buffer outlives its receive, tested to completion below.
        .map(|b| unsafe { rx.irecv(b.as_mut_ptr(), b.len(), MrHandle::NONE) }.unwrap().unwrap())
        .collect();
    let ready = [PIECE, usize::MAX, 100, 0, 1];
    let sends: Vec<RequestId> = msgs
        .iter()
        .zip(ready)
        // SAFETY: every message outlives its send, tested to completion below.
        .map(|(m, ready)| unsafe { tx.isend_ready(m.as_ptr(), m.len(), MrHandle::NONE, ready) }.unwrap().unwrap())
        .collect();
    sends_exactly(&tx, sends[0], PIECE as u64, "the first request's first piece");
    assert_eq!(tx.sent(sends[1]), 0, "the whole request behind it waits");
    tx.raise_ready(sends[0], usize::MAX).unwrap();
    sends_exactly(&tx, sends[3], 0, "the third partial request holds the line");
    assert_eq!(tx.sent(sends[1]) + tx.sent(sends[2]), (3 * PIECE + 100) as u64);
    for step in 1..=20 {
        tx.raise_ready(sends[3], step * PIECE).unwrap();
    }
    for (i, (&s, &r)) in sends.iter().zip(&recvs).enumerate() {
        assert_eq!(until(|| tx.test(s)).unwrap(), lens[i]);
        assert_eq!(until(|| rx.test(r)).unwrap(), lens[i]);
        rx.irecv_consumed(r).unwrap();
        assert!(bufs[i] == msgs[i], "message {i} arrived intact");
    }
}

/// A raise wakes the comm's helpers from `epoll_wait`, where nothing else would: every step of
/// the watermark is posted only once they all sleep again, with a fan-out of 1 (the raise wakes
/// one, which wakes the others) and of 0 (the raise wakes them all).
#[test]
fn a_raise_wakes_sleeping_helpers() {
    for fanout in [1u8, 0] {
        let net = four_socket_net(fanout);
        let (mut tx, mut rx) = eager_pair(&net, 4);
        let len = 12 * PIECE;
        let msg = message(len, 3);
        let mut got = vec![0u8; len];
        // SAFETY: got and msg outlive both requests, tested to completion below.
        let r = unsafe { rx.irecv(got.as_mut_ptr(), len, MrHandle::NONE) }.unwrap().unwrap();
        // SAFETY: as above.
        let s = unsafe { tx.isend_ready(msg.as_ptr(), len, MrHandle::NONE, 0) }.unwrap().unwrap();
        for step in [1, 2, 6, 12] {
            testkit::wait_until("the sending helpers sleep", testkit::PATIENCE, || tx.helpers_sleep());
            tx.raise_ready(s, step * PIECE).unwrap();
            sends_exactly(&tx, s, (step * PIECE) as u64, &format!("fan-out {fanout}, watermark {step} pieces"));
        }
        assert_eq!(until(|| tx.test(s)).unwrap(), len);
        assert_eq!(until(|| rx.test(r)).unwrap(), len);
        assert!(got == msg, "fan-out {fanout}: the message arrived intact");
    }
}

/// A send comm dropped with a request stuck at its watermark returns at once and leaves no
/// helper or socket behind; its peer's receive fails with the disconnect.
#[test]
fn dropping_a_comm_with_a_partial_send_closes_cleanly() {
    let net = four_socket_net(2);
    for ready in [0, 3 * PIECE] {
        let msg = message(8 * PIECE, 4);
        let mut got = vec![0u8; msg.len()];
        let (mut tx, mut rx) = eager_pair(&net, 4);
        // SAFETY: got outlives rx, dropped below with the receive still posted.
        let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
        // SAFETY: msg outlives tx, dropped below with the send in flight.
        let s = unsafe { tx.isend_ready(msg.as_ptr(), msg.len(), MrHandle::NONE, ready) }.unwrap().unwrap();
        sends_exactly(&tx, s, ready as u64, "before the drop");
        // The held-back part never comes: the drop returns without waiting for it.
        testkit::within(testkit::PATIENCE, "the drop", move || drop(tx));
        let err = until(|| rx.test(r)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");
        drop(rx);
        assert_eq!(net.helper_threads(), 0, "no helper is left");
        assert_eq!(net.data_socket_stats().sending, 0);
    }
}
