//! Two-sided messages offered over CUDA IPC (`ipc_send.rs`): matched with announced and inline
//! messages in one order, refused by a small receive as strictly, ended by the receiver's Done
//! after its copy, handed to the channels when the receiver cannot copy, and fenced like an
//! announced send. The receiver's device copy is played by the test (`copy`), both "processes"
//! being this one, as the connection's batch would end it: the part, then the answer.

use super::*;
use crate::proto::IPC_HANDLE_LEN;

/// A pair of ends as a connection between processes of one host makes them.
fn same_host() -> (End, End) {
    let (mut a, mut b) = (End::new(), End::new());
    a.st.accept_ipc_sends();
    b.st.accept_ipc_sends();
    (a, b)
}

impl End {
    /// Sends `len` bytes of `buf` from `off`, each message offered over CUDA IPC (the handle is a
    /// stand-in: the test copies by address).
    fn send_offered(&mut self, items: &[(&Buf, usize, usize)]) -> Arc<Transfer> {
        let items = items
            .iter()
            .map(|&(buf, off, len)| SendItem {
                region: buf.region.clone(),
                addr: buf.addr() + off,
                len: len as u64,
                payload: None,
                ipc: Some(IpcOffer {
                    region: buf.region.id,
                    handle: [buf.region.id as u8; IPC_HANDLE_LEN],
                    alloc_base: buf.addr() as u64,
                    alloc_len: buf.bytes.len() as u64,
                }),
            })
            .collect();
        self.post_sends(items)
    }

    /// Plays the connection's device copy of the oldest matched offered message: the bytes (when
    /// `copied`), the receive's part, then the answer, as a finished batch does (`ipc.rs`).
    fn copy(&mut self, copied: Result<()>) -> DeviceRecv {
        let recv = self.device_recvs.pop_front().expect("a matched offered message");
        assert!(recv.region.contains(recv.addr, recv.len as usize), "fit admitted it");
        let answer = match &copied {
            Ok(()) => {
                // SAFETY: both ranges are live test buffers; the source is where the offer said.
                unsafe {
                    std::ptr::copy_nonoverlapping(recv.src.addr as *const u8, recv.addr as *mut u8, recv.len as usize)
                };
                Control::Done { xfer: recv.peer_op, len: recv.len }
            }
            Err(e) => deny_msg(recv.peer_op, e),
        };
        recv.transfer.finish_part(copied.clone().map(|()| recv.len));
        self.outbox.push_back(answer);
        recv
    }

    /// Hands the oldest matched offered message to the channels, as the connection does when it
    /// cannot copy it.
    fn decline(&mut self) {
        let recv = self.device_recvs.pop_front().expect("a matched offered message");
        let mut out = Vec::new();
        self.st.recv_by_network(recv, &mut out);
        self.take(out);
    }
}

fn kinds(outbox: &VecDeque<Control>) -> Vec<u8> {
    outbox.iter().map(Control::kind).collect()
}

#[test]
fn an_offered_message_is_one_ipc_send_and_its_region_is_revoked_on_deregistration() {
    let (mut a, _) = same_host();
    let src = a.buffer(4 * CHUNK, pattern(60));
    a.send_offered(&[(&src, 8, 1)]);
    let Some(Control::IpcSend { len, region, addr, handle, alloc_base, alloc_len, .. }) = a.outbox.front().cloned()
    else {
        panic!("{:?}", a.outbox)
    };
    assert_eq!(a.outbox.len(), 1, "no payload, no announcement besides");
    assert_eq!((len, region, addr), (1, src.region.id, src.addr() as u64 + 8));
    assert_eq!((handle[0], alloc_base, alloc_len), (src.region.id as u8, src.addr() as u64, 4 * CHUNK as u64));
    assert_eq!(a.ipc_granted, [src.region.id], "the peer may map it: a deregistration revokes it");
    assert!(a.sending.is_empty(), "no chunk queued");
    assert!(!a.st.waits_on_peer(), "waiting for the peer's user to post a receive is no stall");
}

#[test]
fn offered_messages_match_receives_in_order_with_the_others_and_end_with_the_receivers_done() {
    let (mut a, mut b) = same_host();
    let gpu = a.device_buffer(8 * CHUNK);
    let host = a.buffer(8 * CHUNK, pattern(61));
    // SAFETY: the test owns the buffer; its bytes stand for the GPU memory.
    unsafe { std::ptr::copy_nonoverlapping(host.bytes.as_ptr(), gpu.addr() as *mut u8, 8 * CHUNK) };
    let d: Vec<Buf> = (0..4).map(|_| b.buffer(4 * CHUNK + 3, |_| 0)).collect();
    // Offered, announced, offered before any receive; an inline one after them all.
    let s1 = a.send_offered(&[(&gpu, 0, 4 * CHUNK + 3)]);
    let s2 = a.send(&[(&host, 0, 3 * CHUNK)]);
    let s3 = a.send_offered(&[(&gpu, 5, 1)]);
    for s in [&s1, &s3] {
        assert_eq!(s.answers(), Answers::AfterData, "the caller blocks on the stream for the Done after the copy");
    }
    pump(&mut a, &mut b);
    assert!(b.device_recvs.is_empty(), "nothing matched yet");
    let r: Vec<_> = d.iter().map(|buf| b.recv(buf, 4 * CHUNK + 3)).collect();
    let s4 = a.send(&[(&host, 9, 100)]);
    pump(&mut a, &mut b);
    let matched: Vec<(usize, u64)> = b.device_recvs.iter().map(|m| (m.addr, m.len)).collect();
    assert_eq!(matched, [(d[0].addr(), 4 * CHUNK as u64 + 3), (d[2].addr(), 1)], "in the peer's order");
    assert_eq!(b.outcome(&r[1]).unwrap().unwrap(), 3 * CHUNK as u64, "the announced one between");
    assert_eq!(b.outcome(&r[3]).unwrap().unwrap(), 100);
    assert!(a.outcome(&s1).is_none() && a.outcome(&s3).is_none(), "the offered ones wait for their copies");
    assert!(b.outcome(&r[0]).is_none());
    for _ in 0..2 {
        b.copy(Ok(()));
    }
    pump(&mut a, &mut b);
    for (s, n) in [(&s1, 4 * CHUNK + 3), (&s2, 3 * CHUNK), (&s3, 1), (&s4, 100)] {
        assert_eq!(a.outcome(s).unwrap().unwrap(), n as u64);
    }
    assert_eq!(a.st.sends_copied(), 2, "the announced and inline ones are not counted");
    assert_eq!(b.outcome(&r[0]).unwrap().unwrap(), 4 * CHUNK as u64 + 3);
    assert_eq!(b.outcome(&r[2]).unwrap().unwrap(), 1);
    assert_eq!(&d[0].bytes[..4 * CHUNK + 3], &host.bytes[..4 * CHUNK + 3]);
    assert_eq!(d[2].bytes[0], host.bytes[5]);
    assert!(d[2].bytes[1..].iter().all(|&x| x == 0), "nothing past the message");
    assert_eq!(&d[1].bytes[..3 * CHUNK], &host.bytes[..3 * CHUNK]);
    assert!(a.st.awaiting_grant.is_empty() && b.st.announces.is_empty());
}

#[test]
fn a_receive_smaller_than_an_offered_message_fails_both_with_mismatch_and_copies_nothing() {
    let (mut a, mut b) = same_host();
    let src = a.device_buffer(4 * CHUNK);
    let dst = b.buffer(4 * CHUNK, |_| 0);
    for len in [4 * CHUNK, 1] {
        let r = b.recv(&dst, len - 1);
        let s = a.send_offered(&[(&src, 0, len)]);
        pump(&mut a, &mut b);
        assert!(b.device_recvs.is_empty(), "refused before any copy");
        assert_eq!(status(a.outcome(&s)), UcclStatus::ErrMismatch, "{len}");
        assert_eq!(status(b.outcome(&r)), UcclStatus::ErrMismatch, "{len}");
    }
    // A message landing past the receive's registration is refused as well, not copied.
    let r = b.recv(&dst, 8 * CHUNK);
    let big = a.device_buffer(8 * CHUNK);
    let s = a.send_offered(&[(&big, 0, 5 * CHUNK)]);
    pump(&mut a, &mut b);
    assert!(b.device_recvs.is_empty());
    assert_eq!(status(a.outcome(&s)), UcclStatus::ErrNotAllowed);
    assert_eq!(status(b.outcome(&r)), UcclStatus::ErrNotAllowed);
    assert!(dst.bytes.iter().all(|&x| x == 0));
}

#[test]
fn a_receiver_that_cannot_copy_takes_the_message_over_the_channels() {
    let (mut a, mut b) = same_host();
    let src = a.buffer(5 * CHUNK, pattern(62));
    let dst = b.buffer(5 * CHUNK, |_| 0);
    let r = b.recv(&dst, 5 * CHUNK);
    let s = a.send_offered(&[(&src, CHUNK, 3 * CHUNK + 7)]);
    pump(&mut a, &mut b);
    b.decline();
    assert_eq!(kinds(&b.outbox), [Control::Grant { xfer: 0, flow: 0 }.kind()]);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&s).unwrap().unwrap(), 3 * CHUNK as u64 + 7);
    assert_eq!(b.outcome(&r).unwrap().unwrap(), 3 * CHUNK as u64 + 7);
    assert_eq!(a.st.sends_copied(), 0, "it went over the channels");
    assert_eq!(&dst.bytes[..3 * CHUNK + 7], &src.bytes[CHUNK..4 * CHUNK + 7]);
    assert!(a.st.awaiting_grant.is_empty() && a.st.awaiting_done.is_empty());
}

#[test]
fn a_failed_copy_fails_both_with_its_status() {
    let (mut a, mut b) = same_host();
    let src = a.device_buffer(CHUNK);
    let dst = b.device_buffer(CHUNK);
    let r = b.recv(&dst, CHUNK);
    let s = a.send_offered(&[(&src, 0, CHUNK)]);
    pump(&mut a, &mut b);
    b.copy(Err(Error::new(UcclStatus::ErrBackend, "the copy failed")));
    pump(&mut a, &mut b);
    assert_eq!(status(a.outcome(&s)), UcclStatus::ErrBackend);
    assert_eq!(status(b.outcome(&r)), UcclStatus::ErrBackend);
    assert!(a.st.awaiting_grant.is_empty());
}

#[test]
fn an_ipc_send_from_a_peer_elsewhere_or_a_wrong_done_fails_the_connection() {
    let (mut a, _) = same_host();
    let mut remote = End::new();
    let src = a.device_buffer(CHUNK);
    a.send_offered(&[(&src, 0, CHUNK)]);
    let offer = a.outbox.pop_front().unwrap();
    let err = remote.handle(offer).unwrap_err();
    assert!(err.message().contains("not an engine of this host"), "{err}");
    // Our offered message ends with a Done of its own length only; failing then fails it.
    let s = a.send_offered(&[(&src, 0, CHUNK)]);
    let Some(Control::IpcSend { xfer, .. }) = a.outbox.pop_front() else { panic!() };
    let err = a.handle(Control::Done { xfer, len: CHUNK as u64 - 1 }).unwrap_err();
    assert!(err.message().contains("offered message"), "{err}");
    let failed = a.st.fail(Error::backend("violation"));
    assert!(failed.iter().any(|t| t.id == s.id), "still pending, so the failure fails it");
}

#[test]
fn deregistering_an_offered_source_before_its_answer_fails_the_connection() {
    let (mut a, mut b) = same_host();
    let src = a.device_buffer(CHUNK);
    let dst = b.device_buffer(CHUNK);
    let s = a.send_offered(&[(&src, 0, CHUNK)]);
    let r = b.recv(&dst, CHUNK);
    pump(&mut a, &mut b);
    assert_eq!(b.device_recvs.len(), 1, "the receiver may be copying out of it");
    let err = a.cut(&src).unwrap_err();
    assert!(err.message().contains("cannot be told"), "{err}");
    let failed = a.st.fail(err);
    assert!(failed.iter().any(|t| t.id == s.id));
    // The receiver's side ends with its copy (the connection's batch), or with its own failure.
    b.copy(Ok(()));
    assert_eq!(b.outcome(&r).unwrap().unwrap(), CHUNK as u64);
}

#[test]
fn a_cut_receive_refuses_the_offered_message_it_matches() {
    let (mut a, mut b) = same_host();
    let src = a.device_buffer(CHUNK);
    let cut = b.buffer(CHUNK, |_| 0);
    let next = b.buffer(CHUNK, |_| 0);
    let r1 = b.recv(&cut, CHUNK);
    let r2 = b.recv(&next, CHUNK);
    b.cut(&cut).unwrap();
    let s1 = a.send_offered(&[(&src, 0, CHUNK)]);
    let s2 = a.send_offered(&[(&src, 0, 10)]);
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&s1));
    assert!(b.outcome(&r1).is_some());
    assert_eq!(b.device_recvs.len(), 1);
    assert_eq!(b.device_recvs[0].addr, next.addr(), "the next offered message matches the next receive");
    b.copy(Ok(()));
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&s2).unwrap().unwrap(), 10);
    assert_eq!(b.outcome(&r2).unwrap().unwrap(), 10);
}
