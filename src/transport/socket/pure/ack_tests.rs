//! A send window's acknowledgements: an acknowledgement is believed only for requests every piece
//! of which was written in full, and a request acknowledged while a socket still writes from its
//! memory completes only once that write is over, the rest of the piece then coming from zeros.

use std::sync::Arc;

use super::window::{Piece, Window};
use super::wire::PieceCut;
use crate::transport::IoSeg;

const PIECE: usize = 64 << 10;

/// A send window of an acknowledged comm of two sockets with `n` requests of two pieces posted
/// over `buf`.
fn posted(buf: &[u8], n: u64) -> Window {
    let w = Window::acked(PieceCut::new(PIECE, 2), Arc::new(|| {}), 2);
    for seq in 0..n {
        w.post(seq, &[IoSeg { addr: buf.as_ptr() as usize, len: buf.len() }], false);
    }
    w
}

/// Cuts a piece and writes it in full, as a socket does.
fn cut_and_send(w: &Window) -> Piece {
    let (p, _) = w.cut().expect("a piece to cut");
    assert!(w.begin_write(&p));
    w.end_write(&p, true);
    w.finish(&p);
    p
}

#[test]
fn an_acknowledgement_of_a_request_not_cut_is_a_protocol_violation() {
    let buf = vec![1u8; 2 * PIECE];
    let w = posted(&buf, 2);
    let err = w.ack(2).expect_err("nothing was sent");
    assert!(err.message().contains("protocol violation") && err.message().contains("request 0"), "{err}");
    assert_eq!((w.done(0), w.done(1), w.acked_upto()), (None, None, 0), "nothing completes");
    // Request 0 cut and sent, request 1 only half: acknowledging both is still a lie.
    cut_and_send(&w);
    cut_and_send(&w);
    cut_and_send(&w);
    let err = w.ack(2).expect_err("request 1 not cut to its end");
    assert!(err.message().contains("request 1"), "{err}");
    assert_eq!(w.done(0), None, "a lie completes nothing");
    assert!(w.ack(1).unwrap());
    assert_eq!(w.done(0), Some(2 * PIECE));
}

#[test]
fn an_acknowledgement_of_a_request_cut_but_not_written_in_full_is_a_protocol_violation() {
    let buf = vec![1u8; 2 * PIECE];
    let w = posted(&buf, 1);
    cut_and_send(&w);
    // The second piece was taken and partly written, its socket waiting for room.
    let (p, _) = w.cut().unwrap();
    assert!(w.begin_write(&p));
    w.end_write(&p, false);
    let err = w.ack(1).expect_err("a piece was never written in full");
    assert!(err.message().contains("not sent in full"), "{err}");
    assert_eq!(w.done(0), None);
    // A piece written twice counts once.
    let w = posted(&buf, 1);
    let first = cut_and_send(&w);
    assert!(w.begin_write(&first));
    w.end_write(&first, true);
    w.cut().unwrap();
    assert!(w.ack(1).is_err(), "the second piece was cut, never written");
}

#[test]
fn a_request_acknowledged_while_a_piece_of_it_is_being_written_completes_after_the_write() {
    let buf = vec![1u8; 2 * PIECE];
    let w = posted(&buf, 1);
    cut_and_send(&w);
    let (p, _) = w.cut().unwrap();
    // A socket is inside its `sendmsg` for the last piece, whose bytes already reached the peer.
    assert!(w.begin_write(&p));
    assert!(w.ack(1).unwrap());
    assert_eq!(w.done(0), None, "completed while a write reads the caller's memory");
    // A copy of it another socket was sending: its next write must not read the memory.
    let copy = Piece { ..p };
    assert!(!w.begin_write(&copy), "the request was acknowledged");
    assert_eq!(w.done(0), None);
    w.end_write(&p, true);
    assert_eq!(w.done(0), Some(2 * PIECE), "the last writer completes it");
    assert!(!w.is_failed());
}

#[test]
fn an_early_acknowledgement_with_a_write_in_flight_fails_the_comm_once_the_write_ends_short() {
    let buf = vec![1u8; 2 * PIECE];
    let w = posted(&buf, 1);
    cut_and_send(&w);
    let (p, _) = w.cut().unwrap();
    assert!(w.begin_write(&p));
    assert!(w.ack(1).unwrap(), "believed until the write ends");
    w.end_write(&p, false);
    assert!(w.is_failed(), "the piece was not written in full");
    assert!(w.check().unwrap_err().message().contains("protocol violation"));
    assert_eq!(w.done(0), None, "nothing completes early");
}

#[test]
fn an_acknowledgement_in_order_completes_requests_and_frees_their_slots_for_new_ones() {
    let buf = vec![1u8; 2 * PIECE];
    let w = posted(&buf, 16);
    for _ in 0..32 {
        cut_and_send(&w);
    }
    assert!(w.cut().is_none());
    assert!(w.ack(16).unwrap());
    assert!((0..16).all(|seq| w.done(seq) == Some(2 * PIECE)));
    // Slot 0 again: its marks start over.
    w.post(16, &[IoSeg { addr: buf.as_ptr() as usize, len: buf.len() }], false);
    assert!(w.ack(17).is_err(), "request 16 was not sent");
    let p = cut_and_send(&w);
    assert_eq!((p.seq, p.offset), (16, 0));
}
