//! The staging areas without the connection's threads: both "processes" are this one, each end's
//! area a real sealed memfd that the other maps; the connection's own pushes and drains are run
//! by hand (`run_pushes`, `run_host_work`).

use super::direct::{host_pair, kernel_refused};
use super::*;
use crate::engine::local::staging_area::STAGE_PIECE;

const P: usize = STAGE_PIECE as usize;

/// Has `end` (staging through areas of `bytes`) make its area as its worker does, and takes the
/// announcement out of its outbox: the descriptor and the file's size.
fn offer_area(end: &mut End, bytes: u64) -> (u32, u64) {
    end.st.set_staging(bytes);
    let mut out = Vec::new();
    end.st.want_area(bytes, &mut out);
    end.take(out);
    assert!(end.outbox.is_empty() && end.host_work, "the worker makes the area: {:?}", end.outbox);
    assert!(run_host_work(end));
    let Some(Control::StagingArea { fd, len }) = end.outbox.pop_back() else { panic!("{:?}", end.outbox) };
    (fd, len)
}

/// Two proven ends that stage through areas of `bytes`, both areas announced and mapped.
fn staged_pair(bytes: u64) -> (End, End) {
    let (mut a, mut b) = host_pair(true, true);
    for end in [&mut a, &mut b] {
        let (fd, len) = offer_area(end, bytes);
        end.outbox.push_back(Control::StagingArea { fd, len });
    }
    pump(&mut a, &mut b);
    for end in [&a, &b] {
        assert_eq!(end.st.direct.staging.ack, Some(true), "each end mapped the other's area");
        assert!(end.st.direct.staging.peer.is_some());
    }
    (a, b)
}

fn pieces_in_use(end: &End) -> usize {
    end.st.direct.staging.ours.as_ref().map_or(0, |area| area.pieces_in_use())
}

#[test]
fn writes_and_reads_move_through_the_staging_areas() {
    let (mut a, mut b) = staged_pair(2 << 20);
    let len = 3 * P + 5;
    let src = a.buffer(len, pattern(50));
    let dst = b.buffer(len + 100, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 100, len)]);
    let Some(Control::StagedWrite { xfer, segs, first_piece, generation, .. }) = a.outbox.front().cloned() else {
        panic!("{:?}", a.outbox)
    };
    assert_eq!(segs, [RemoteSeg { addr: dst.addr() as u64 + 100, len: len as u32 }]);
    assert_ne!(generation, 0);
    assert_eq!(pieces_in_use(&a), 4, "the range is taken at post");
    assert_eq!(a.pushes.len(), 1, "the posting thread pushes after the lock");
    assert_eq!(t.answers(), Answers::AfterData);
    deliver(&mut a, &mut b).unwrap();
    assert!(b.host_work && b.outbox.is_empty(), "the target drains before it answers");
    // The drain waits for the marks: push first, as the posting thread would meanwhile.
    assert!(run_pushes(&mut a));
    assert_eq!(pieces_in_use(&a), 4, "pushed, but the target still reads the range");
    assert!(run_host_work(&mut b));
    assert_eq!(b.outbox, [Control::Done { xfer, len: len as u64 }]);
    deliver(&mut b, &mut a).unwrap();
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(&dst.bytes[100..], &src.bytes[..]);
    assert_eq!(pieces_in_use(&a), 0, "freed once pushed and answered");
    let path = a.st.host_path();
    assert_eq!((path.direct_ops, path.staged_ops), (1, 1));
    assert!(a.sending.is_empty() && b.receiving.is_empty(), "no channel carried anything");

    // A second write reuses the pieces under a new generation.
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
    let Some(&Control::StagedWrite { first_piece: again, generation: next, .. }) = a.outbox.front() else {
        panic!("{:?}", a.outbox)
    };
    assert_eq!(again, first_piece);
    assert!(next > generation);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);

    // A read: the target pushes into its area on its worker, the reader drains.
    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &dst, 0, len)]);
    let Some(&Control::DirectRead { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    deliver(&mut a, &mut b).unwrap();
    let Some(&Control::StagedGrant { xfer: granted, .. }) = b.outbox.front() else { panic!("{:?}", b.outbox) };
    assert_eq!(granted, xfer);
    assert!(b.host_work, "the push is the target's worker's");
    assert_eq!(pieces_in_use(&b), 4);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(&back.bytes[..], &src.bytes[..]);
    assert_eq!(pieces_in_use(&b), 0);
    let path = a.st.host_path();
    assert_eq!((path.direct_ops, path.staged_ops), (3, 3));
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// A vector writes and reads through the area like a single item, its segments cut at the
/// pieces' boundaries on both ends.
#[test]
fn vectors_are_staged_whole() {
    let (mut a, mut b) = staged_pair(2 << 20);
    let n = P / 3 + 1;
    let src = a.buffer(4 * n, pattern(51));
    let dst = b.buffer(4 * n + 64, |_| 0);
    let items: Vec<_> = (0..4).map(|i| (&src, i * n, &dst, i * n + 16, n)).collect();
    let t = a.one_sided(true, &items);
    assert!(matches!(a.outbox.front(), Some(Control::StagedWrite { segs, .. }) if segs.len() == 4), "{:?}", a.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 4 * n as u64);
    assert_eq!(&dst.bytes[16..16 + 4 * n], &src.bytes[..]);

    let back = a.buffer(4 * n, |_| 0);
    let items: Vec<_> = (0..4).map(|i| (&back, i * n, &dst, i * n + 16, n)).collect();
    let t = a.one_sided(false, &items);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 4 * n as u64);
    assert_eq!(back.bytes, src.bytes);
    assert_eq!(a.st.host_path().staged_ops, 2);
}

/// Before the peer mapped our area, above its size, and when it is full, transfers take the
/// paths they took before; nothing is lost.
#[test]
fn transfers_that_find_no_room_take_the_other_paths() {
    let (mut a, mut b) = host_pair(true, true);
    for end in [&mut a, &mut b] {
        end.st.set_staging(1 << 20);
    }
    let src = a.buffer(5 * P, pattern(52));
    let dst = b.buffer(5 * P, |_| 0);
    // The first write asks the worker for the area and goes direct: the peer has not mapped it.
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 3 * P)]);
    assert!(matches!(a.outbox.make_contiguous(), [Control::DirectWrite { .. }]), "{:?}", a.outbox);
    assert!(matches!(a.st.direct.work.front(), Some(HostTask::MakeArea { .. })));
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 3 * P as u64);
    assert_eq!(a.st.direct.staging.ack, Some(true));

    // Larger than the area: direct.
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 5 * P)]);
    assert!(matches!(a.outbox.front(), Some(Control::DirectWrite { .. })), "{:?}", a.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 5 * P as u64);

    // Two of three pieces each in flight: the second finds no room.
    let first = a.one_sided(true, &[(&src, 0, &dst, 0, 3 * P)]);
    let second = a.one_sided(true, &[(&src, P, &dst, P, 3 * P)]);
    assert!(
        matches!(a.outbox.make_contiguous(), [Control::StagedWrite { .. }, Control::DirectWrite { .. }]),
        "{:?}",
        a.outbox
    );
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&first).unwrap().unwrap(), 3 * P as u64);
    assert_eq!(a.outcome(&second).unwrap().unwrap(), 3 * P as u64);
    assert_eq!(&dst.bytes[..4 * P], &src.bytes[..4 * P]);
    assert_eq!(pieces_in_use(&a), 0);
    assert_eq!(a.st.host_path().staged_ops, 1);
}

/// A staged read whose reader is done before the target's push returned: the target answers
/// only once its push finished, and frees the range then.
#[test]
fn a_staged_read_is_answered_once_both_the_push_and_the_reader_are_done() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let remote = b.buffer(2 * P, pattern(53));
    let back = a.buffer(2 * P, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, 2 * P)]);
    deliver(&mut a, &mut b).unwrap();
    let Some(HostTask::Push(job)) = b.st.next_host_task() else { panic!("the push task") };
    // The pieces land (the worker's copy), but the worker has not reported back yet.
    let (op, write) = (job.op, job.write);
    push(&b, job);
    deliver(&mut b, &mut a).unwrap();
    assert!(a.st.has_host_task());
    assert!(
        a.st.next_host_copy_of(t.id).is_none(),
        "a caller waiting on the read never drains it out of the worker's turn"
    );
    assert!(run_host_work(&mut a));
    assert!(matches!(a.outbox.front(), Some(Control::DirectDone { .. })), "{:?}", a.outbox);
    deliver(&mut a, &mut b).unwrap();
    assert!(b.outbox.is_empty(), "the target waits for its push");
    assert_eq!(pieces_in_use(&b), 2);
    let mut out = Vec::new();
    b.st.push_finished(op, write, &mut out);
    b.take(out);
    assert_eq!(b.outbox, [Control::Done { xfer: op, len: 2 * P as u64 }]);
    assert_eq!(pieces_in_use(&b), 0);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 2 * P as u64);
    assert_eq!(back.bytes, remote.bytes);
    // A second DirectDone for it is a violation.
    assert!(b.handle(Control::DirectDone { xfer: op }).is_err());
}

/// A write's source deregistered before its push: the pieces are marked aborted, the target
/// stops at once and refuses the write, and the range is freed. A read's source deregistered on
/// the target likewise.
#[test]
fn a_deregistered_source_aborts_the_push_and_the_transfer_fails_cleanly() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let src = a.buffer(3 * P, pattern(54));
    // Not zeros, which is what an aborted piece of a fresh area holds.
    let dst = b.buffer(3 * P, |_| 0xa5);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 3 * P)]);
    assert!(matches!(a.outbox.front(), Some(Control::StagedWrite { .. })));
    a.cut(&src).unwrap();
    pump(&mut a, &mut b);
    let why = not_allowed(a.outcome(&t));
    assert!(why.contains("deregistered"), "{why}");
    assert!(dst.bytes.iter().all(|&x| x == 0xa5), "nothing of an aborted push lands");
    assert_eq!(pieces_in_use(&a), 0);

    let remote = b.buffer(3 * P, pattern(55));
    let back = a.buffer(3 * P, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, 3 * P)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::StagedGrant { .. })));
    b.cut(&remote).unwrap();
    pump(&mut a, &mut b);
    assert!(not_allowed(a.outcome(&t)).contains("deregistered"));
    assert_eq!(pieces_in_use(&b), 0);
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    assert_eq!(a.st.host_path().staged_ops, 0);
}

/// The initiator's connection failing before its posting thread pushed a staged write: no piece
/// starts, every piece is marked aborted, and the target's drain stops at once and lands nothing.
#[test]
fn a_connection_failing_before_the_push_aborts_it() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let src = a.buffer(3 * P, pattern(59));
    let dst = b.buffer(3 * P, |_| 0xa5);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 3 * P)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(b.host_work, "the target drains");
    a.fail(Error::new(UcclStatus::ErrBackend, "the control stream broke"));
    assert_eq!(status(a.outcome(&t)), UcclStatus::ErrBackend);
    assert!(run_pushes(&mut a), "the posting thread still pushes, and marks");
    let started = Instant::now();
    assert!(run_host_work(&mut b));
    assert!(started.elapsed() < Duration::from_secs(1), "the drain waited for pieces that never come");
    let Some(Control::Deny { reason, .. }) = b.outbox.front() else { panic!("{:?}", b.outbox) };
    assert!(reason.contains("connection failed"), "{reason}");
    assert!(dst.bytes.iter().all(|&x| x == 0xa5), "nothing of an aborted push lands");
}

/// The target's connection failing with the push of a staged read still queued for its worker:
/// the push never runs, so failing marks its pieces aborted, and the reader's drain stops at once
/// with the push's failure instead of waiting for its own connection to fail or its deadline.
#[test]
fn a_target_failing_with_a_staged_reads_push_queued_aborts_it() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let remote = b.buffer(3 * P, pattern(63));
    let back = a.buffer(3 * P, |_| 0xa5);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, 3 * P)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::StagedGrant { .. })), "{:?}", b.outbox);
    assert!(matches!(b.st.direct.work.back(), Some(HostTask::Push(_))), "the push waits for the worker");
    deliver(&mut b, &mut a).unwrap();
    b.fail(Error::new(UcclStatus::ErrBackend, "the control stream broke"));
    assert!(!b.st.has_host_task(), "the failed connection's worker runs nothing");
    let started = Instant::now();
    assert!(run_host_work(&mut a));
    assert!(started.elapsed() < Duration::from_secs(1), "the drain waited for pieces that never come");
    let Some(&Control::DirectDone { xfer }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    let err = a.st.direct.copied[&xfer].error.clone().expect("the drain failed");
    assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{err}");
    assert!(err.message().contains("push of the source stopped"), "{err}");
    assert!(back.bytes.iter().all(|&x| x == 0xa5), "nothing of an aborted push lands");
    // The failed target answers nothing more: the reader's own failure ends the read.
    a.fail(Error::new(UcclStatus::ErrBackend, "remote disconnected"));
    assert_eq!(status(a.outcome(&t)), UcclStatus::ErrBackend);
}

/// The target deregistering a staged write's destination while its worker holds the drain: the
/// worker's gate lets no piece in, the write is refused, nothing lands, and the range is freed once
/// pushed.
#[test]
fn a_destination_deregistered_during_the_drain_refuses_the_write() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let src = a.buffer(2 * P, pattern(60));
    let dst = b.buffer(2 * P, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 2 * P)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(run_pushes(&mut a));
    let Some(HostTask::Copy(job)) = b.st.next_host_task() else { panic!("the drain") };
    assert!(job.staged.is_some() && job.error.is_none(), "taken before the deregistration");
    b.cut(&dst).unwrap();
    let mut out = Vec::new();
    run_task(&mut b, HostTask::Copy(job), &mut out);
    b.take(out);
    let Some(Control::Deny { reason, .. }) = b.outbox.front() else { panic!("{:?}", b.outbox) };
    assert!(reason.contains("deregistered"), "{reason}");
    assert!(dst.bytes.iter().all(|&x| x == 0), "no piece entered the gate");
    pump(&mut a, &mut b);
    assert!(not_allowed(a.outcome(&t)).contains("deregistered"));
    assert_eq!(pieces_in_use(&a), 0);
}

/// GPU memory at the target: a staged write is granted the network way rather than drained (the
/// worker's CPU copy cannot store into device memory), the initiator's range is freed once its
/// push finished, and a read of it is served over the channels rather than staged.
#[test]
fn device_memory_at_the_target_is_written_and_read_over_the_channels() {
    let (mut a, mut b) = staged_pair(2 << 20);
    let len = 3 * P + 5;
    let src = a.buffer(len, pattern(61));
    let dev = b.device_buffer(len);
    let t = a.one_sided(true, &[(&src, 0, &dev, 0, len)]);
    assert!(matches!(a.outbox.front(), Some(Control::StagedWrite { .. })), "the initiator cannot tell: {:?}", a.outbox);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Grant { .. })), "{:?}", b.outbox);
    assert!(!b.host_work && !b.st.has_host_task(), "nothing is drained into device memory");
    deliver(&mut b, &mut a).unwrap();
    assert!(t.awaits_answer(), "granted: the target's Done still ends it, after the chunks");
    assert!(matches!(a.outbox.front(), Some(Control::Data { .. })), "{:?}", a.outbox);
    assert_eq!(a.sending.len(), 1, "the channels carry it");
    assert_eq!(pieces_in_use(&a), 4, "answered, but the push has not finished");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(dev.bytes, src.bytes);
    assert_eq!(pieces_in_use(&a), 0);
    assert_eq!(a.st.host_path().staged_ops, 0);

    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &dev, 0, len)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Data { .. })), "{:?}", b.outbox);
    assert_eq!(pieces_in_use(&b), 0, "nothing staged");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(back.bytes, src.bytes);
    assert_eq!(a.st.host_path().staged_ops, 0);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// A staged write the target refuses is denied without a look at the area; the initiator frees
/// its range once its push finished as well.
#[test]
fn a_refused_staged_write_is_denied_and_its_range_freed() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let src = a.buffer(2 * P, pattern(56));
    let target = b.buffer(2 * P, |_| 0);
    let forged = a.forged(&target);
    let t = a.one_sided(true, &[(&src, 0, &forged, 0, 2 * P)]);
    assert!(matches!(a.outbox.front(), Some(Control::StagedWrite { .. })));
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Deny { .. })), "{:?}", b.outbox);
    assert!(!b.host_work, "nothing to drain");
    deliver(&mut b, &mut a).unwrap();
    assert!(a.outcome(&t).unwrap().is_err());
    assert_eq!(pieces_in_use(&a), 2, "the push has not finished");
    assert!(run_pushes(&mut a));
    assert_eq!(pieces_in_use(&a), 0);
    assert!(target.bytes.iter().all(|&x| x == 0));
}

/// A peer naming pieces outside the area it announced, staging with no area, or repeating the
/// area's messages fails the connection; its transfers fail with it.
#[test]
fn a_peer_breaking_the_staging_exchange_fails_the_connection() {
    let seg = |buf: &Buf, len: usize| RemoteSeg { addr: buf.addr() as u64, len: len as u32 };
    let (_a, mut b) = staged_pair(1 << 20);
    let dst = b.buffer(2 * P, |_| 0);
    for (first_piece, len) in [(4, 1), (3, P + 1), (u32::MAX, 1)] {
        let msg = Control::StagedWrite {
            xfer: 9,
            region: dst.cap.region,
            token: dst.cap.token,
            first_piece,
            generation: 1,
            segs: vec![seg(&dst, len)],
        };
        let err = b.handle(msg).unwrap_err();
        assert!(err.message().contains("outside"), "{first_piece}+{len}: {err}");
    }
    assert!(b.handle(Control::StagingArea { fd: 1, len: 1 << 20 }).is_err(), "a second area");
    assert!(b.handle(Control::StagingAck { ok: true }).is_err(), "a second ack");

    // A grant naming pieces outside the target's area, for a read that waits for it.
    let (mut a2, b2) = staged_pair(1 << 20);
    let remote = b2.buffer(2 * P, pattern(57));
    let back = a2.buffer(2 * P, |_| 0);
    let t = a2.one_sided(false, &[(&back, 0, &remote, 0, 2 * P)]);
    let Some(&Control::DirectRead { xfer, .. }) = a2.outbox.front() else { panic!("{:?}", a2.outbox) };
    let err = a2.handle(Control::StagedGrant { xfer, first_piece: 3, generation: 1 }).unwrap_err();
    assert!(err.message().contains("outside"), "{err}");
    let failed = a2.st.fail(err);
    assert!(failed.iter().any(|f| f.id == t.id), "the read fails with the connection");

    // Staged bytes from a peer whose area this end never mapped.
    let (mut c, _d) = host_pair(true, true);
    let err = c.handle(Control::StagedGrant { xfer: 1, first_piece: 0, generation: 1 }).unwrap_err();
    assert!(err.message().contains("protocol violation"), "{err}");
}

/// A peer that would not (or could not) map our area never gets staged transfers; an area
/// announced by a peer we cannot take descriptors from is refused.
#[test]
fn an_area_the_peer_did_not_map_is_never_used() {
    let (mut a, mut b) = host_pair(true, true);
    let (_, len) = offer_area(&mut a, 1 << 20);
    // The peer names a descriptor that is no area of ours: its worker refuses it.
    b.st.set_staging(1 << 20);
    b.handle(Control::StagingArea { fd: i32::MAX.unsigned_abs(), len }).unwrap();
    assert!(run_host_work(&mut b));
    assert_eq!(b.outbox, [Control::StagingAck { ok: false }]);
    assert!(b.st.direct.staging.peer.is_none());
    deliver(&mut b, &mut a).unwrap();
    assert_eq!(a.st.direct.staging.ack, Some(false));
    let src = a.buffer(2 * P, pattern(58));
    let dst = b.buffer(2 * P, |_| 0);
    a.one_sided(true, &[(&src, 0, &dst, 0, 2 * P)]);
    assert!(matches!(a.outbox.front(), Some(Control::DirectWrite { .. })), "{:?}", a.outbox);
    assert_eq!(pieces_in_use(&a), 0);
}

/// An end that did not opt in to staging, or whose own area would be smaller, opens nothing the
/// peer names: it answers at once, and its worker gets no work.
#[test]
fn a_peer_area_is_mapped_only_by_an_end_that_opted_in_and_only_up_to_its_own_size() {
    let announce = |a: &mut End| offer_area(a, 2 << 20);
    for ours in [None, Some(1 << 20)] {
        let (mut a, mut b) = host_pair(true, true);
        let (fd, len) = announce(&mut a);
        if let Some(bytes) = ours {
            b.st.set_staging(bytes);
        }
        b.handle(Control::StagingArea { fd, len }).unwrap();
        assert_eq!(b.outbox, [Control::StagingAck { ok: false }], "{ours:?}: refused at once");
        assert!(!b.st.has_host_task(), "{ours:?}: the worker opens nothing");
        assert!(b.st.direct.staging.peer.is_none());
    }
    // Opted in with room for it: the worker maps it.
    let (mut a, mut b) = host_pair(true, true);
    let (fd, len) = announce(&mut a);
    b.st.set_staging(2 << 20);
    b.handle(Control::StagingArea { fd, len }).unwrap();
    assert!(b.st.has_host_task());
    assert!(run_host_work(&mut b));
    assert_eq!(b.outbox, [Control::StagingAck { ok: true }]);
}

/// Two proven ends that told each other they may not copy out of it (ProcessAck readable false
/// both ways, as under Yama's ptrace scope 1), B with a 2 MiB staging area, A with one when
/// `a_stages`; no area made yet.
fn unreadable_pair(a_stages: bool) -> (End, End) {
    let (mut a, mut b) = (End::new(), End::new());
    for (end, stages) in [(&mut a, a_stages), (&mut b, true)] {
        end.st.set_same_host(None, false);
        if stages {
            end.st.set_staging(2 << 20);
        }
        end.handle(Control::ProcessHello { pid: 7, fd: 3 }).unwrap();
        let Some(HostTask::Prove { .. }) = end.st.next_host_task() else { panic!("a proof task") };
        let mut out = Vec::new();
        end.st.proved(false, &mut out);
        end.take(out);
        end.host_work = false;
    }
    pump(&mut a, &mut b);
    let path = a.st.host_path();
    assert!(path.checked && !path.reads_peer && !path.peer_reads_us, "{path:?}");
    (a, b)
}

/// Each end makes its area on first use: A's write of `src` into `dst`, and B's serving A's read
/// of `dst` into `back` over the channels, `len` bytes each.
fn make_areas(a: &mut End, b: &mut End, (src, back, dst): (&Buf, &Buf, &Buf), len: usize) {
    for (write, buf) in [(true, src), (false, back)] {
        let t = a.one_sided(write, &[(buf, 0, dst, 0, len)]);
        pump(a, b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    }
}

/// A target granting a copy to a reader that said it may not copy out of the target breaks the
/// protocol: the reader fails the connection rather than attempt the copy.
#[test]
fn a_direct_grant_to_a_reader_that_said_it_cannot_copy_is_a_violation() {
    let (mut a, mut b) = unreadable_pair(true);
    let len = 3 * P + 5;
    let src = a.buffer(len, pattern(62));
    let dst = b.buffer(len, |_| 0);
    let back = a.buffer(len, |_| 0);
    make_areas(&mut a, &mut b, (&src, &back, &dst), len);
    assert!(a.st.host_path().staging);
    a.one_sided(false, &[(&back, 0, &dst, 0, len)]);
    let Some(&Control::DirectRead { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    let err = a.handle(Control::DirectGrant { xfer }).unwrap_err();
    assert!(err.message().contains("protocol violation"), "{}", err.message());
    assert!(!a.st.has_host_task(), "no copy out of the peer was queued");
}

/// A reader whose copy the kernel refused after it told the target it may copy (the target still
/// takes it for one) keeps its reads off the target's area: a full area there would grant it a
/// copy it cannot make. Its reads are served over the channels.
#[test]
fn a_reader_that_lost_access_after_saying_it_can_copy_reads_over_the_channels() {
    let (mut a, mut b) = staged_pair(2 << 20);
    let remote = b.buffer(6 * P, pattern(61));
    let (one, two, three) = (a.buffer(5 * P, |_| 0), a.buffer(5 * P, |_| 0), a.buffer(5 * P, |_| 0));
    // The first read holds 5 of the area's 8 pieces until it is drained; the next, finding no
    // room, is granted for a copy, which the kernel refuses.
    let first = a.one_sided(false, &[(&one, 0, &remote, 0, 5 * P)]);
    let refused = a.one_sided(false, &[(&three, 0, &remote, P, 5 * P)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(
        matches!(b.outbox.make_contiguous(), [Control::StagedGrant { .. }, Control::DirectGrant { .. }]),
        "{:?}",
        b.outbox
    );
    deliver(&mut b, &mut a).unwrap();
    // Its waiting caller takes the copy out of turn, ahead of the first read's drain.
    let Some(HostTask::Copy(job)) = a.st.next_host_copy_of(refused.id) else { panic!("the granted copy") };
    let mut out = Vec::new();
    a.st.copy_refused(job, kernel_refused(), &mut out);
    a.take(out);
    assert!(!a.st.host_path().reads_peer);
    let second = a.one_sided(false, &[(&two, 0, &remote, P, 5 * P)]);
    assert!(!a.outbox.iter().any(|m| matches!(m, Control::DirectRead { .. })), "{:?}", a.outbox);
    deliver(&mut a, &mut b).unwrap();
    assert!(!b.outbox.iter().any(|m| matches!(m, Control::DirectGrant { .. })), "{:?}", b.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&first).unwrap().unwrap(), 5 * P as u64);
    assert_eq!(a.outcome(&refused).unwrap().unwrap(), 5 * P as u64);
    assert_eq!(a.outcome(&second).unwrap().unwrap(), 5 * P as u64);
    assert_eq!(&one.bytes[..], &remote.bytes[..5 * P]);
    assert_eq!(&two.bytes[..], &remote.bytes[P..6 * P]);
    assert_eq!(&three.bytes[..], &remote.bytes[P..6 * P]);
    let path = a.st.host_path();
    assert_eq!((path.direct_ops, path.staged_ops), (1, 1), "only the first went through the area: {path:?}");
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// Ends the kernel does not let copy out of each other (ProcessAck readable false both ways, as
/// under Yama's ptrace scope 1) still stage what fits: writes and reads move through the areas,
/// and what does not fit, or finds no room, takes the channels, never a copy out of the peer. An
/// end that did not opt in maps nothing of its peer's and stages nothing: the channels carry all.
#[test]
fn ends_that_may_not_copy_out_of_each_other_still_stage_what_fits() {
    for a_stages in [true, false] {
        let (mut a, mut b) = unreadable_pair(a_stages);
        let len = 3 * P + 5;
        let src = a.buffer(len, pattern(60));
        let dst = b.buffer(2 * len, |_| 0);
        let back = a.buffer(len, |_| 0);
        make_areas(&mut a, &mut b, (&src, &back, &dst), len);
        assert_eq!(a.st.host_path().staging, a_stages, "both areas mapped only when both opted in");
        assert_eq!(a.st.direct.staging.peer.is_some(), a_stages, "nothing of the peer's mapped without the opt-in");
        let direct = |end: &End| {
            end.outbox.iter().any(|m| {
                matches!(m, Control::DirectWrite { .. } | Control::DirectGrant { .. } | Control::StagedWrite { .. })
            })
        };
        let staged_before = a.st.host_path().staged_ops;
        let t = a.one_sided(true, &[(&src, 0, &dst, 100, len)]);
        assert_eq!(matches!(a.outbox.front(), Some(Control::StagedWrite { .. })), a_stages, "{:?}", a.outbox);
        assert!(a_stages || !direct(&a), "{:?}", a.outbox);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
        assert_eq!(&dst.bytes[100..100 + len], &src.bytes[..]);

        // Two reads of the 2 MiB area's 5 of 8 pieces each: the first is staged, the second finds
        // no room and is served with the channels' Data, not granted for a copy.
        let (one, two) = (a.buffer(5 * P, |_| 0), a.buffer(5 * P, |_| 0));
        let first = a.one_sided(false, &[(&one, 0, &dst, 0, 5 * P)]);
        let second = a.one_sided(false, &[(&two, 0, &dst, P, 5 * P)]);
        let asked = a.outbox.iter().filter(|m| matches!(m, Control::DirectRead { .. })).count();
        assert_eq!(asked, if a_stages { 2 } else { 0 }, "{:?}", a.outbox);
        deliver(&mut a, &mut b).unwrap();
        assert!(!b.outbox.iter().any(|m| matches!(m, Control::DirectGrant { .. })), "{:?}", b.outbox);
        let staged = b.outbox.iter().filter(|m| matches!(m, Control::StagedGrant { .. })).count();
        assert_eq!(staged, usize::from(a_stages), "{:?}", b.outbox);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&first).unwrap().unwrap(), 5 * P as u64);
        assert_eq!(a.outcome(&second).unwrap().unwrap(), 5 * P as u64);
        assert_eq!(&one.bytes[..], &dst.bytes[..5 * P]);
        assert_eq!(&two.bytes[..], &dst.bytes[P..6 * P]);
        let path = a.st.host_path();
        assert_eq!(path.staged_ops - staged_before, if a_stages { 2 } else { 0 }, "{path:?}");
        assert_eq!(path.direct_ops, path.staged_ops, "nothing copied out of the peer: {path:?}");
        assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    }
}

/// A drain of the peer's staging area that the kernel refuses (the peer is gone) fails with the
/// kernel's error: the bytes were only ever in the area, so there is no request to ask again.
#[test]
fn a_refused_drain_fails_with_the_kernels_error() {
    let (mut a, mut b) = staged_pair(1 << 20);
    let len = 2 * P;
    let remote = b.buffer(len, pattern(56));
    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::StagedGrant { .. })), "{:?}", b.outbox);
    assert!(run_host_work(&mut b), "the target pushes");
    deliver(&mut b, &mut a).unwrap();
    let Some(HostTask::Copy(job)) = a.st.next_host_task() else { panic!("the drain") };
    assert!(job.staged.is_some());
    let mut out = Vec::new();
    a.st.copy_refused(job, kernel_refused(), &mut out);
    a.take(out);
    assert!(matches!(a.outbox.make_contiguous(), [Control::DirectDone { .. }]), "{:?}", a.outbox);
    assert!(!a.st.host_path().reads_peer);
    pump(&mut a, &mut b);
    let err = a.outcome(&t).unwrap().unwrap_err();
    assert_eq!(err, kernel_refused());
    assert!(back.bytes.iter().all(|&x| x == 0));
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
}
