//! Mid-size two-sided messages sent eagerly: into a receive posted first, landed and copied when
//! the receive comes later, refused as strictly as an announced send, and bounded at both ends.

use super::*;
use crate::proto::{EAGER_SLOT, eager_landing_bytes};

/// A mid-size length that is no multiple of a landing slot.
const MID: usize = 3 * CHUNK + 17;

fn kinds(outbox: &VecDeque<Control>) -> Vec<u8> {
    outbox.iter().map(Control::kind).collect()
}

fn eager(n: usize) -> Vec<u8> {
    vec![Control::EagerSend { xfer: 0, len: MID as u64 }.kind(); n]
}

/// Nothing of either end's eager bookkeeping is left.
fn settled(a: &End, b: &End) {
    for end in [a, b] {
        assert_eq!(end.st.inline_send_backlog, 0, "every backlog given back");
        assert_eq!(end.st.held_for_peer(), 0, "every landing slot free");
        assert!(end.st.eager.as_ref().unwrap().sent.is_empty(), "every eager send answered");
    }
}

#[test]
fn a_mid_size_send_goes_at_once_into_a_receive_posted_first() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(MID, pattern(40));
    let dst = b.buffer(MID + 5, |_| 0);
    let r = b.recv(&dst, MID + 5);
    let s = a.send(&[(&src, 0, MID)]);
    assert_eq!(kinds(&a.outbox), eager(1), "no announcement, no grant to wait for");
    assert_eq!(a.sending.len(), 1, "its chunks are queued with the message");
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.st.held_for_peer(), 0, "taken by the posted receive, nothing lands");
    assert_eq!(b.st.eager_landed(), 0);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&s).unwrap().unwrap(), MID as u64);
    assert_eq!(b.outcome(&r).unwrap().unwrap(), MID as u64);
    assert_eq!(&dst.bytes[..MID], &src.bytes[..]);
    assert!(dst.bytes[MID..].iter().all(|&x| x == 0));
    settled(&a, &b);
    assert!(!a.st.holds_landing_memory() && !b.st.holds_landing_memory(), "nothing landed, no landing memory made");
}

#[test]
fn sends_before_their_receives_land_and_are_copied_in_order() {
    let (mut a, mut b) = (End::new(), End::new());
    let lens = [INLINE_LEN_FLOOR + 1, MID, MAX_EAGER_LEN as usize];
    let srcs: Vec<_> = lens.iter().enumerate().map(|(i, &n)| a.buffer(n, pattern(41 + i as u8))).collect();
    let sends: Vec<_> = srcs.iter().zip(lens).map(|(src, n)| a.send(&[(src, 0, n)])).collect();
    assert_eq!(kinds(&a.outbox), eager(3));
    assert!(!b.st.holds_landing_memory(), "made when the first message lands, not with the connection");
    pump(&mut a, &mut b);
    assert!(b.st.holds_landing_memory() && !a.st.holds_landing_memory());
    let landed: u64 = lens.iter().map(|&n| eager_landing_bytes(n as u64)).sum();
    assert_eq!(b.st.held_for_peer(), landed, "all three wait in landing slots");
    assert_eq!(b.st.eager_landed(), 3, "each counted once");
    assert!(sends.iter().all(|s| a.outcome(s).is_none()), "unanswered until received");
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer(), "waiting for the peer's user is no stall");
    let dsts: Vec<_> = lens.iter().map(|&n| b.buffer(n, |_| 0)).collect();
    let recvs: Vec<_> = dsts.iter().zip(lens).map(|(d, n)| b.recv(d, n)).collect();
    pump(&mut a, &mut b);
    for (((s, r), d), (src, n)) in sends.iter().zip(&recvs).zip(&dsts).zip(srcs.iter().zip(lens)) {
        assert_eq!(a.outcome(s).unwrap().unwrap(), n as u64);
        assert_eq!(b.outcome(r).unwrap().unwrap(), n as u64);
        assert_eq!(d.bytes, src.bytes, "{n} bytes copied out of their slots");
    }
    settled(&a, &b);
}

/// Landing memory that cannot be made is the connection's failure, with its reason; nothing lands.
#[test]
fn landing_memory_that_cannot_be_made_fails_the_message_with_its_reason() {
    let (mut a, mut b) = (End::new(), End::without_eager_sends(Cut::Spanning));
    b.st.send_eagerly_with(Box::new(|| Err(Error::backend("no memory for landing slots"))));
    let src = a.buffer(MID, pattern(45));
    a.send(&[(&src, 0, MID)]);
    let err = deliver(&mut a, &mut b).unwrap_err();
    assert!(err.message().contains("no memory for landing slots"), "{}", err.message());
    assert!(!b.st.holds_landing_memory());
    assert_eq!(b.st.eager_landed(), 0);
}

#[test]
fn a_landed_message_goes_into_device_memory_in_one_store_per_run_of_slots() {
    let (mut a, mut b) = (End::new(), End::new());
    let n = MAX_EAGER_LEN as usize;
    let src = a.buffer(n, pattern(47));
    let send = a.send(&[(&src, 0, n)]);
    pump(&mut a, &mut b);
    assert_eq!(b.st.held_for_peer(), eager_landing_bytes(n as u64), "landed in adjacent slots");
    assert_eq!(b.st.eager_landed(), 1);
    let dst = b.device_buffer(n);
    let recv = b.recv(&dst, n);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&send).unwrap().unwrap(), n as u64);
    assert_eq!(b.outcome(&recv).unwrap().unwrap(), n as u64);
    assert_eq!(dst.bytes, src.bytes);
    // One store per run of adjacent slots (the engine's: one copy straight from the slots).
    assert_eq!(*b.mem.device_stores.lock().unwrap(), [n], "one store of the whole run");
    settled(&a, &b);
}

#[test]
fn a_receive_posted_while_its_message_lands_gets_it_once_landed() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(MID, pattern(44));
    let dst = b.buffer(MID, |_| 0);
    let s = a.send(&[(&src, 0, MID)]);
    deliver(&mut a, &mut b).unwrap();
    let r = b.recv(&dst, MID);
    assert!(b.outcome(&r).is_none() && b.outbox.is_empty(), "matched, its bytes still on the way");
    assert!(dst.bytes.iter().all(|&x| x == 0));
    pump(&mut a, &mut b);
    assert_eq!(b.outcome(&r).unwrap().unwrap(), MID as u64);
    assert_eq!(a.outcome(&s).unwrap().unwrap(), MID as u64);
    assert_eq!(dst.bytes, src.bytes);
    settled(&a, &b);
}

#[test]
fn an_eager_message_too_large_for_its_receive_fails_both_wherever_it_waited() {
    for posted_first in [true, false] {
        let (mut a, mut b) = (End::new(), End::new());
        let src = a.buffer(MID, pattern(45));
        let dst = b.buffer(MID, |_| 0);
        let (r, s) = if posted_first {
            let r = b.recv(&dst, MID - 1);
            (r, a.send(&[(&src, 0, MID)]))
        } else {
            let s = a.send(&[(&src, 0, MID)]);
            pump(&mut a, &mut b);
            (b.recv(&dst, MID - 1), s)
        };
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&s)), UcclStatus::ErrMismatch, "posted first: {posted_first}");
        assert_eq!(status(b.outcome(&r)), UcclStatus::ErrMismatch);
        assert!(dst.bytes.iter().all(|&x| x == 0), "nothing of it reached the receive");
        assert_eq!(b.st.refused_chunks, 0);
        settled(&a, &b);
        // The next pair still matches.
        let r = b.recv(&dst, MID);
        let s = a.send(&[(&src, 0, MID)]);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&s).unwrap().unwrap(), b.outcome(&r).unwrap().unwrap());
        assert_eq!(dst.bytes, src.bytes);
    }
}

#[test]
fn a_receive_cut_off_before_its_message_landed_fails_and_refuses_it_after_landing() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(MID, pattern(46));
    let dst = b.buffer(MID, |_| 0);
    let s = a.send(&[(&src, 0, MID)]);
    deliver(&mut a, &mut b).unwrap();
    let r = b.recv(&dst, MID);
    b.cut(&dst).unwrap();
    assert_eq!(status(b.outcome(&r)), UcclStatus::ErrNotAllowed, "the receive fails at once");
    assert!(b.outbox.is_empty(), "the refusal waits for the landing slots to be free");
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&s));
    assert!(dst.bytes.iter().all(|&x| x == 0));
    settled(&a, &b);
}

#[test]
fn past_the_backlog_a_mid_size_send_is_announced() {
    let (mut a, mut b) = (End::new(), End::new());
    let per = MAX_EAGER_LEN as usize;
    let n = (MAX_INLINE_SEND_BACKLOG / eager_landing_bytes(per as u64)) as usize;
    let src = a.buffer(per, pattern(47));
    let sends: Vec<_> = (0..=n).map(|_| a.send(&[(&src, 0, per)])).collect();
    let mut expected = vec![Control::EagerSend { xfer: 0, len: 1 << 20 }.kind(); n];
    expected.push(Control::SendAnnounce { xfer: 0, len: 1 }.kind());
    assert_eq!(kinds(&a.outbox), expected);
    pump(&mut a, &mut b);
    assert_eq!(b.st.held_for_peer(), MAX_INLINE_SEND_BACKLOG, "the receiver holds exactly the bound");
    let dsts: Vec<_> = (0..=n).map(|_| b.buffer(per, |_| 0)).collect();
    let recvs: Vec<_> = dsts.iter().map(|d| b.recv(d, per)).collect();
    pump(&mut a, &mut b);
    for ((s, r), d) in sends.iter().zip(&recvs).zip(&dsts) {
        assert_eq!(a.outcome(s).unwrap().unwrap(), per as u64);
        assert_eq!(b.outcome(r).unwrap().unwrap(), per as u64);
        assert_eq!(d.bytes, src.bytes);
    }
    settled(&a, &b);
}

#[test]
fn a_peer_landing_more_than_the_bound_or_unasked_is_cut_off() {
    let mut b = End::new();
    let per = MAX_EAGER_LEN;
    for xfer in 0..MAX_INLINE_SEND_BACKLOG / per {
        b.handle(Control::EagerSend { xfer, len: per }).unwrap();
    }
    let err = b.handle(Control::EagerSend { xfer: 99, len: INLINE_LEN_FLOOR as u64 + 1 }).unwrap_err();
    assert!(err.message().contains("would hold more than"), "{err}");
    // Inline payloads and landing slots share the bound.
    let mut b = End::new();
    b.handle(Control::InlineSend { xfer: 1, payload: vec![1; 10] }).unwrap();
    for xfer in 2..MAX_INLINE_SEND_BACKLOG / per + 1 {
        b.handle(Control::EagerSend { xfer, len: per }).unwrap();
    }
    let err = b.handle(Control::EagerSend { xfer: 99, len: per - EAGER_SLOT + 1 }).unwrap_err();
    assert!(err.message().contains("would hold more than"), "{err}");
    // A connection whose chunks do not span segments agreed on no eager sends.
    let mut c = End::without_eager_sends(Cut::PerSegment);
    let err = c.handle(Control::EagerSend { xfer: 1, len: MID as u64 }).unwrap_err();
    assert!(err.message().contains("agreed on none"), "{err}");
    assert!(!c.st.goes_eagerly(MID as u64));
}

#[test]
fn a_failing_connection_fails_the_receives_waiting_for_landing_messages() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(MID, pattern(48));
    let dst = b.buffer(MID, |_| 0);
    let s = a.send(&[(&src, 0, MID)]);
    deliver(&mut a, &mut b).unwrap();
    let r = b.recv(&dst, MID);
    let failed = b.st.fail(Error::disconnected("gone"));
    assert_eq!(failed.iter().map(|t| t.id).collect::<Vec<_>>(), [r.id]);
    assert_eq!(b.st.held_for_peer(), 0);
    let failed = a.st.fail(Error::disconnected("gone"));
    assert_eq!(failed.iter().map(|t| t.id).collect::<Vec<_>>(), [s.id]);
    assert_eq!(a.st.inline_send_backlog, 0);
}
