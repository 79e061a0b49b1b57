//! Inline payloads of device memory whose copy the memory starts and the connection finishes:
//! nothing answers for the bytes (a Done, a read's data, a receive's end) before the copy is done.

use super::*;

const LEN: usize = 4096;

/// The peer's inline write into device memory is answered once its copy is done.
#[test]
fn an_inline_write_into_device_memory_is_done_once_its_copy_is() {
    let (mut a, mut b) = (End::new(), End::new());
    b.mem.start_device_copies = true;
    let local = a.buffer(LEN, pattern(1));
    let remote = b.device_buffer(LEN);
    let w = a.one_sided(true, &[(&local, 0, &remote, 0, LEN)]);
    assert!(matches!(a.outbox.front(), Some(Control::InlineWrite { .. })), "{:?}", a.outbox);
    deliver(&mut a, &mut b).unwrap();
    assert!(b.outbox.is_empty(), "answered before the copy: {:?}", b.outbox);
    assert!(!b.copies.is_empty());
    b.finish_copies();
    assert!(matches!(b.outbox.front(), Some(Control::Done { len, .. }) if *len == LEN as u64), "{:?}", b.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&w).unwrap().unwrap(), LEN as u64);
    assert_eq!(remote.bytes, local.bytes);
}

/// A small read of device memory: the target answers with what its copy loaded once it is done,
/// and a reader whose destination is device memory ends the read once its own copy is.
#[test]
fn a_small_read_of_and_into_device_memory_ends_after_both_copies() {
    let (mut a, mut b) = (End::new(), End::new());
    a.mem.start_device_copies = true;
    b.mem.start_device_copies = true;
    let local = a.device_buffer(LEN);
    let mut remote = b.device_buffer(LEN);
    remote.bytes.iter_mut().enumerate().for_each(|(i, v)| *v = pattern(5)(i));
    let r = a.one_sided(false, &[(&local, 0, &remote, 0, LEN)]);
    assert!(matches!(a.outbox.front(), Some(Control::ReadSmall { .. })), "{:?}", a.outbox);
    deliver(&mut a, &mut b).unwrap();
    assert!(b.outbox.is_empty(), "answered before the load: {:?}", b.outbox);
    b.finish_copies();
    assert!(matches!(b.outbox.front(), Some(Control::ReadData { payload, .. }) if payload[..] == remote.bytes[..]));
    deliver(&mut b, &mut a).unwrap();
    assert!(a.outcome(&r).is_none(), "the read ended before its store was done");
    a.finish_copies();
    assert_eq!(a.outcome(&r).unwrap().unwrap(), LEN as u64);
    assert_eq!(local.bytes, remote.bytes);
}

/// An inline message into a device receive, posted before or after the message came: the receive
/// ends and the sender hears Done once the copy is.
#[test]
fn an_inline_message_into_a_device_receive_ends_once_its_copy_is() {
    for recv_first in [true, false] {
        let (mut a, mut b) = (End::new(), End::new());
        b.mem.start_device_copies = true;
        let src = a.buffer(LEN, pattern(9));
        let dst = b.device_buffer(LEN);
        let early = recv_first.then(|| b.recv(&dst, LEN));
        let s = a.send(&[(&src, 0, LEN)]);
        assert!(matches!(a.outbox.front(), Some(Control::InlineSend { .. })), "{:?}", a.outbox);
        deliver(&mut a, &mut b).unwrap();
        let r = early.unwrap_or_else(|| b.recv(&dst, LEN));
        assert!(b.outcome(&r).is_none() && b.outbox.is_empty(), "ended before the copy (recv first: {recv_first})");
        b.finish_copies();
        assert_eq!(b.outcome(&r).unwrap().unwrap(), LEN as u64);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&s).unwrap().unwrap(), LEN as u64);
        assert_eq!(dst.bytes, src.bytes);
    }
}
