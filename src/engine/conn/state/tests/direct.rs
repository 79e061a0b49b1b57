//! The same-host path without sockets or a second process: the host worker's tasks are run by
//! hand, a copy being the worker's own out of this process (both "processes" are this one).

use super::*;

/// Two ends of one host; each proved the other (or not) and told it so.
pub(super) fn host_pair(a_reads_b: bool, b_reads_a: bool) -> (End, End) {
    host_pair_with_band(a_reads_b, b_reads_a, None, false)
}

/// As `host_pair`, with the network band and `Config::host_copy_huge_pages` as given.
fn host_pair_with_band(a_reads_b: bool, b_reads_a: bool, band: Option<(u64, u64)>, huge_pages: bool) -> (End, End) {
    let (mut a, mut b) = (End::new(), End::new());
    for (end, reads) in [(&mut a, a_reads_b), (&mut b, b_reads_a)] {
        end.st.same_host_mut().set_same_host(band, huge_pages);
        end.handle(Control::ProcessHello { pid: 7, fd: 3 }).unwrap();
        assert!(end.host_work, "the proof is the worker's");
        let Some(HostTask::Prove { pid: 7, fd: 3 }) = end.st.same_host_mut().next_host_task() else {
            panic!("a proof task")
        };
        let mut out = Vec::new();
        end.st.proved(reads, &mut out);
        end.take(out);
        assert_eq!(end.outbox, [Control::ProcessAck { readable: reads }]);
        end.host_work = false;
    }
    pump(&mut a, &mut b);
    let want = HostPath { checked: true, reads_peer: a_reads_b, peer_reads_us: b_reads_a, ..HostPath::default() };
    assert_eq!(a.st.same_host().host_path(), want);
    (a, b)
}

/// Whether `b`, handed `a`'s read request, served it over the channels (Data) rather than
/// granting it for a copy.
fn target_served_over_channels(a: &mut End, b: &mut End) -> bool {
    assert!(matches!(a.outbox.front(), Some(Control::DirectRead { .. })), "a read asks the target: {:?}", a.outbox);
    b.outbox.clear();
    deliver(a, b).unwrap();
    match b.outbox.front() {
        Some(Control::Data { .. }) => true,
        Some(Control::DirectGrant { .. }) => false,
        other => panic!("{other:?}"),
    }
}

/// Inside the network band (bounds excluded) writes and reads take the channels, at and outside
/// it the direct copy, whatever their shape. The end whose memory is read applies the band: a
/// write's initiator before asking, a read's target when it answers.
#[test]
fn transfers_inside_the_network_band_take_the_channels() {
    let band = (2 * CHUNK as u64, 4 * CHUNK as u64);
    let (mut a, mut b) = host_pair_with_band(true, true, Some(band), false);
    let len = 4 * CHUNK + 100;
    let ours = a.buffer(len, pattern(41));
    let theirs = b.buffer(len, |_| 0);
    for (n, network) in
        [(2 * CHUNK, false), (2 * CHUNK + 1, true), (4 * CHUNK - 1, true), (4 * CHUNK, false), (4 * CHUNK + 100, false)]
    {
        a.outbox.clear();
        a.one_sided(true, &[(&ours, 0, &theirs, 0, n)]);
        let direct = matches!(a.outbox.front(), Some(Control::DirectWrite { .. }));
        assert_eq!(!direct, network, "{n} bytes written");
        a.outbox.clear();
        a.one_sided(false, &[(&ours, 0, &theirs, 0, n)]);
        assert_eq!(target_served_over_channels(&mut a, &mut b), network, "{n} bytes read");
    }
    // A vector counts its bytes in total.
    a.outbox.clear();
    let half = 3 * CHUNK / 2;
    a.one_sided(true, &[(&ours, 0, &theirs, 0, half), (&ours, half, &theirs, half + 64, half)]);
    assert!(!matches!(a.outbox.front(), Some(Control::DirectWrite { .. })), "a vector inside the band went direct");
}

/// A source on huge pages skips the band when the knob is on, and only then; a source on small
/// pages keeps to it either way. The end whose memory is read says in its request or grant
/// whether it lies on huge pages, whatever its knob.
#[test]
fn sources_on_huge_pages_skip_the_network_band_with_the_knob_on() {
    let band = (2 * CHUNK as u64, 4 * CHUNK as u64);
    let n = 3 * CHUNK;
    for (knob, huge) in [(false, false), (false, true), (true, false), (true, true)] {
        let (mut a, mut b) = host_pair_with_band(true, true, Some(band), knob);
        let ours = a.buffer(4 * CHUNK, pattern(42));
        let theirs = b.buffer(4 * CHUNK, |_| 0);
        ours.region.set_huge_pages(huge);
        theirs.region.set_huge_pages(huge);
        let what = format!("knob {knob}, huge source {huge}");
        a.outbox.clear();
        a.one_sided(true, &[(&ours, 0, &theirs, 0, n)]);
        let direct = matches!(a.outbox.front(), Some(Control::DirectWrite { .. }));
        assert_eq!(direct, knob && huge, "write, {what}");
        a.outbox.clear();
        a.one_sided(false, &[(&ours, 0, &theirs, 0, n)]);
        assert_eq!(!target_served_over_channels(&mut a, &mut b), knob && huge, "read, {what}");
        // A vector is one request with one source: the same rule.
        let half = n / 2;
        let vector = [(&ours, 0, &theirs, 0, half), (&ours, half, &theirs, half + 64, half)];
        a.outbox.clear();
        a.one_sided(true, &vector);
        let direct = matches!(a.outbox.front(), Some(Control::DirectWrite { .. }));
        assert_eq!(direct, knob && huge, "vector write, {what}");
        a.outbox.clear();
        a.one_sided(false, &vector);
        assert_eq!(!target_served_over_channels(&mut a, &mut b), knob && huge, "vector read, {what}");
    }
    // Outside the band the copy is direct whatever the pages, and the page size travels with it.
    for huge in [false, true] {
        let (mut a, mut b) = host_pair_with_band(true, true, Some(band), true);
        let ours = a.buffer(4 * CHUNK, pattern(42));
        let theirs = b.buffer(4 * CHUNK, |_| 0);
        ours.region.set_huge_pages(huge);
        theirs.region.set_huge_pages(huge);
        a.one_sided(true, &[(&ours, 0, &theirs, 0, 4 * CHUNK)]);
        assert!(matches!(a.outbox.front(), Some(Control::DirectWrite { huge: said, .. }) if *said == huge));
        a.outbox.clear();
        a.one_sided(false, &[(&ours, 0, &theirs, 0, 4 * CHUNK)]);
        assert!(!target_served_over_channels(&mut a, &mut b));
        assert!(matches!(b.outbox.front(), Some(Control::DirectGrant { huge: said, .. }) if *said == huge));
    }
}

/// What the end whose memory is read says of its pages reaches the copy as a hint, and only as
/// one: the copying end keeps its own piece bounds, and moves the same bytes either way.
#[test]
fn the_page_size_a_peer_tells_only_picks_the_copys_pieces() {
    for said in [false, true] {
        let (mut a, mut b) = host_pair(true, true);
        let len = 3 * CHUNK + 5;
        let src = a.buffer(len, pattern(55));
        let dst = b.buffer(len, |_| 0);
        let t = a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
        let Some(Control::DirectWrite { xfer, region, token, segs, src: from, .. }) = a.outbox.pop_front() else {
            panic!("{:?}", a.outbox)
        };
        // The peer's word, whatever our knowledge of its memory.
        b.handle(Control::DirectWrite { xfer, region, token, segs, src: from, huge: said }).unwrap();
        let Some(HostTask::Copy(job)) = b.st.same_host().queued().front() else { panic!("a copy queued") };
        assert_eq!(job.remote_huge, said);
        assert!(run_host_work(&mut b));
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
        assert_eq!(dst.bytes, src.bytes, "said huge pages: {said}");
    }
}

#[test]
fn writes_are_copied_in_by_the_target_and_reads_out_by_the_reader() {
    let (mut a, mut b) = host_pair(true, true);
    let len = 3 * CHUNK + 5;
    let src = a.buffer(len, pattern(40));
    let dst = b.buffer(len + 100, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 100, len)]);
    let Some(Control::DirectWrite { xfer, segs, src: from, .. }) = a.outbox.front().cloned() else {
        panic!("{:?}", a.outbox)
    };
    assert_eq!(segs, [RemoteSeg { addr: dst.addr() as u64 + 100, len: len as u32 }]);
    assert_eq!(from, [src.addr() as u64]);
    assert_eq!(t.answers(), Answers::AfterData, "a waiting caller blocks on the stream for the Done");
    deliver(&mut a, &mut b).unwrap();
    assert!(b.host_work && b.outbox.is_empty(), "the target copies before it answers");
    assert!(run_host_work(&mut b));
    assert_eq!(b.outbox, [Control::Done { xfer, len: len as u64 }]);
    deliver(&mut b, &mut a).unwrap();
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(&dst.bytes[100..], &src.bytes[..]);
    assert!(a.sending.is_empty() && b.receiving.is_empty(), "no channel carried anything");

    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &dst, 100, len)]);
    let Some(&Control::DirectRead { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    assert_eq!(t.answers(), Answers::Inline, "a waiting caller reads the prompt grant and copies");
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.outbox, [Control::DirectGrant { xfer, huge: false }]);
    assert!(b.st.waits_on_peer(), "the reader owes its DirectDone");
    deliver(&mut b, &mut a).unwrap();
    assert!(run_host_work(&mut a));
    assert_eq!(a.outbox, [Control::DirectDone { xfer }]);
    assert!(a.outcome(&t).is_none(), "copied, but the target still has to vouch for the bytes");
    assert!(a.st.waits_on_peer());
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(back.bytes, src.bytes);
    assert_eq!(a.st.same_host().host_path().direct_ops, 2);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());

    // Vectors too: one request, one copy, whatever the segments; small items stay inline.
    let remote = b.buffer(1 << 20, |_| 0);
    let items = scattered_items(&src, &remote, &[30_000, 70_000, 50_000], 10, 20);
    let t = a.one_sided(true, &items);
    assert!(
        matches!(a.outbox.front(), Some(Control::DirectWrite { segs, src, .. }) if segs.len() == 3 && src.len() == 3)
    );
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 150_000);
    assert!(items_match(&items));
    let t = a.one_sided(true, &[(&src, 0, &remote, 0, 100)]);
    assert!(matches!(a.outbox.front(), Some(Control::InlineWrite { .. })), "{:?}", a.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 100);
}

#[test]
fn without_a_proof_either_way_requests_take_the_network_path() {
    for (a_reads_b, b_reads_a) in [(false, false), (true, false), (false, true)] {
        let (mut a, mut b) = host_pair(a_reads_b, b_reads_a);
        let len = 2 * CHUNK;
        let src = a.buffer(len, pattern(41));
        let dst = b.buffer(len, |_| 0);
        let w = a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
        let direct_write = matches!(a.outbox.front(), Some(Control::DirectWrite { .. }));
        assert_eq!(direct_write, b_reads_a, "a writes directly only when b can read it");
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&w).unwrap().unwrap(), len as u64);
        let back = a.buffer(len, |_| 0);
        let r = a.one_sided(false, &[(&back, 0, &dst, 0, len)]);
        let direct_read = matches!(a.outbox.front(), Some(Control::DirectRead { .. }));
        assert_eq!(direct_read, a_reads_b, "a reads directly only when it can read b");
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&r).unwrap().unwrap(), len as u64);
        assert_eq!(back.bytes, src.bytes);
        assert_eq!(a.st.same_host().host_path().direct_ops, u64::from(a_reads_b) + u64::from(b_reads_a));
    }
    // A peer that is not on this host gets no proof, whatever it says.
    let mut remote = End::new();
    remote.handle(Control::ProcessHello { pid: 1, fd: 1 }).unwrap();
    assert!(!remote.host_work);
    assert_eq!(remote.outbox, [Control::ProcessAck { readable: false }]);
    remote.handle(Control::ProcessAck { readable: true }).unwrap();
    assert!(!remote.st.same_host().host_path().peer_reads_us, "a remote peer's claim to read us means nothing");
}

#[test]
fn a_target_that_cannot_copy_answers_the_network_way() {
    // The initiator was told the target reads it, but the target did not prove it (or the kernel
    // took the access away): it grants the write and serves the read over the channels.
    let (mut a, mut b) = (End::new(), End::new());
    a.st.same_host_mut().set_same_host(None, false);
    b.st.same_host_mut().set_same_host(None, false);
    a.handle(Control::ProcessAck { readable: true }).unwrap();
    let len = 2 * CHUNK + 3;
    let src = a.buffer(len, pattern(42));
    let dst = b.buffer(len, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
    assert!(matches!(a.outbox.front(), Some(Control::DirectWrite { .. })));
    assert!(t.awaits_answer());
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Grant { .. })), "{:?}", b.outbox);
    deliver(&mut b, &mut a).unwrap();
    assert!(t.awaits_answer(), "granted: the target's Done still ends it, after the chunks");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(dst.bytes, src.bytes);
    assert_eq!(a.st.same_host().host_path().direct_ops, 0);

    // Device memory at the target: neither direction can be copied with the CPU.
    let (mut a, mut b) = host_pair(true, true);
    let src = a.buffer(len, pattern(43));
    let dev = b.device_buffer(len);
    let t = a.one_sided(true, &[(&src, 0, &dev, 0, len)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Grant { .. })), "{:?}", b.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &dev, 0, len)]);
    assert!(t.awaits_answer());
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Data { .. })), "{:?}", b.outbox);
    deliver(&mut b, &mut a).unwrap();
    assert!(!t.awaits_answer(), "served over the channels: no further answer comes");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(back.bytes, src.bytes);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

#[test]
fn the_target_refuses_what_it_did_not_advertise_and_copies_nothing() {
    let (mut a, mut b) = host_pair(true, true);
    let local = a.buffer(4 * CHUNK, pattern(44));
    let target = b.buffer(4 * CHUNK, |_| 0);
    let forged = b.forged(&target);
    let window = b.buffer(8 * CHUNK, |_| 0);
    for write in [true, false] {
        let t = a.one_sided(write, &[(&local, 0, &forged, 0, 4 * CHUNK)]);
        deliver(&mut a, &mut b).unwrap();
        assert!(!b.host_work, "nothing is queued for a refused request");
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed, "write {write}");
        // One segment past the window's end: the whole vector is refused.
        let items = [(&local, 0, &window, 0, CHUNK), (&local, CHUNK, &window, 8 * CHUNK - CHUNK / 2, CHUNK)];
        let t = a.one_sided(write, &items);
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed, "vector, write {write}");
    }
    assert!(target.bytes.iter().chain(window.bytes.iter()).all(|&x| x == 0));
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert_eq!(a.st.same_host().host_path().direct_ops, 0);
}

#[test]
fn a_cut_region_is_neither_copied_into_nor_vouched_for() {
    // The target's region cut while the peer's write waits for the worker.
    let (mut a, mut b) = host_pair(true, true);
    let src = a.buffer(4 * CHUNK, pattern(45));
    let dst = b.buffer(4 * CHUNK, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 4 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    b.cut(&dst).unwrap();
    pump(&mut a, &mut b);
    assert!(not_allowed(a.outcome(&t)).contains("deregistered"));
    assert!(dst.bytes.iter().all(|&x| x == 0), "nothing landed after the cut");

    // Our read's destination cut before the copy ran.
    let back = a.buffer(4 * CHUNK, |_| 0);
    let remote = b.buffer(4 * CHUNK, pattern(46));
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, 4 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    deliver(&mut b, &mut a).unwrap();
    assert!(a.host_work);
    a.cut(&back).unwrap();
    pump(&mut a, &mut b);
    assert!(not_allowed(a.outcome(&t)).contains("deregistered"));
    assert!(back.bytes.iter().all(|&x| x == 0));

    // The target's region cut after the reader copied, before its DirectDone arrived: the bytes are
    // not vouched for.
    let back = a.buffer(4 * CHUNK, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, 4 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    deliver(&mut b, &mut a).unwrap();
    run_host_work(&mut a);
    b.cut(&remote).unwrap();
    pump(&mut a, &mut b);
    assert!(not_allowed(a.outcome(&t)).contains("deregistered"));

    // Our write's source cut while the target copies it: the write fails whatever the target says.
    let fresh = b.buffer(4 * CHUNK, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &fresh, 0, 4 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    a.cut(&src).unwrap();
    pump(&mut a, &mut b);
    assert!(not_allowed(a.outcome(&t)).contains("deregistered"));
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// A refused direct read counts as one answer of its transfer (the refusal ends both the request
/// for the copy and the read): another part still waiting for its answer keeps the caller reading
/// for it.
#[test]
fn a_refused_direct_read_is_answered_once() {
    let (mut a, mut b) = host_pair(true, true);
    let local = a.buffer(4 * CHUNK, pattern(45));
    let target = b.buffer(4 * CHUNK, |_| 0);
    let forged = b.forged(&target);
    let small = b.buffer(16, pattern(46));
    let t = a.one_sided(false, &[(&local, 0, &forged, 0, 4 * CHUNK), (&local, 0, &small, 0, 16)]);
    assert!(matches!(a.outbox.front(), Some(Control::DirectRead { .. })), "{:?}", a.outbox);
    deliver(&mut a, &mut b).unwrap();
    let at = b.outbox.iter().position(|m| matches!(m, Control::Deny { .. })).expect("a Deny");
    let deny = b.outbox.remove(at).unwrap();
    a.handle(deny).unwrap();
    assert!(t.awaits_answer(), "the small read's answer is still to come");
    pump(&mut a, &mut b);
    assert!(!t.awaits_answer());
    assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed);
}

#[test]
fn a_peer_breaking_the_direct_exchange_fails_the_connection() {
    let (mut a, _b) = host_pair(true, true);
    for msg in [
        Control::ProcessHello { pid: 7, fd: 3 },
        Control::ProcessAck { readable: true },
        Control::DirectGrant { xfer: 99, huge: false },
        Control::DirectDone { xfer: 99 },
    ] {
        let err = a.handle(msg.clone()).unwrap_err();
        assert!(err.message().contains("protocol violation"), "{msg:?}: {err}");
    }
    // A Done reporting another length than the direct write asked for.
    let (mut a, b) = host_pair(true, true);
    let src = a.buffer(2 * CHUNK, pattern(47));
    let dst = b.buffer(2 * CHUNK, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 2 * CHUNK)]);
    let Some(&Control::DirectWrite { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    assert!(a.handle(Control::Done { xfer, len: 1 }).is_err());
    assert!(a.outcome(&t).unwrap().is_err(), "the part is failed, not left behind");
    // A reader that copied and waits for the answer fails with the connection.
    let (mut a, mut b) = host_pair(true, true);
    let back = a.buffer(2 * CHUNK, |_| 0);
    let remote = b.buffer(2 * CHUNK, pattern(48));
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, 2 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    deliver(&mut b, &mut a).unwrap();
    run_host_work(&mut a);
    let failed = a.st.fail(Error::disconnected("gone"));
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, t.id);
    let path = a.st.same_host().host_path();
    assert_eq!((path.reads_peer, path.peer_reads_us, path.direct_ops), (false, false, 0));
}

/// A copy job reads the clock for its queued mark only when the host-copy trace asked for it.
#[test]
fn copy_jobs_are_timed_only_when_asked() {
    for timed in [false, true] {
        let (mut a, mut b) = host_pair(true, true);
        if timed {
            b.st.same_host_mut().set_timed_copies();
        }
        let src = a.buffer(3 * CHUNK, pattern(41));
        let dst = b.buffer(3 * CHUNK, |_| 0);
        a.one_sided(true, &[(&src, 0, &dst, 0, 3 * CHUNK)]);
        deliver(&mut a, &mut b).unwrap();
        let Some(HostTask::Copy(job)) = b.st.same_host_mut().next_host_task() else { panic!("a copy task") };
        assert_eq!(job.queued != 0, timed, "queued at {}", job.queued);
    }
}

/// A copy the waiting caller takes out of turn counts as the caller's; the worker's do not.
#[test]
fn copies_taken_up_by_their_caller_are_counted() {
    let (mut a, mut b) = host_pair(true, true);
    let src = b.buffer(3 * CHUNK, pattern(42));
    let (one, two) = (a.buffer(3 * CHUNK, |_| 0), a.buffer(3 * CHUNK, |_| 0));
    let first = a.one_sided(false, &[(&one, 0, &src, 0, 3 * CHUNK)]);
    let second = a.one_sided(false, &[(&two, 0, &src, 0, 3 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    deliver(&mut b, &mut a).unwrap();
    let Some(HostTask::Copy(job)) = a.st.same_host_mut().next_host_copy_of(second.id) else {
        panic!("the second read's copy")
    };
    assert_eq!(job.transfer().map(|t| t.id), Some(second.id), "taken out of turn");
    assert_eq!(a.st.same_host().host_path().caller_copies, 1);
    assert!(a.st.same_host_mut().next_host_copy_of(second.id).is_none(), "it had one copy");
    let Some(HostTask::Copy(job)) = a.st.same_host_mut().next_host_task() else { panic!("the first read's copy") };
    assert_eq!(job.transfer().map(|t| t.id), Some(first.id));
    assert_eq!(a.st.same_host().host_path().caller_copies, 1, "the worker's copy is not the caller's");
}

/// What the copy gets when the kernel refuses it after the proof (the peer went non-dumpable).
pub(super) fn kernel_refused() -> Error {
    Error::new(UcclStatus::ErrBackend, "copying from peer process 7: Operation not permitted (os error 1)")
}

/// Takes `end`'s queued copy and has the kernel refuse it.
fn refuse_copy(end: &mut End) {
    let Some(HostTask::Copy(job)) = end.st.same_host_mut().next_host_task() else { panic!("a copy task") };
    let mut out = Vec::new();
    end.st.copy_refused(job, kernel_refused(), &mut out);
    end.take(out);
}

/// The kernel refusing our copy after the target granted the read (the target went non-dumpable,
/// the ptrace policy changed): the read ends the target's lease, is asked for again over the
/// channels under a fresh op id, item or vector as it was, and completes byte-exact; the target's
/// answer to the lease's end is let go, and later reads keep to the channels.
#[test]
fn a_read_whose_granted_copy_the_kernel_refuses_is_asked_for_again_over_the_channels() {
    for vector in [false, true] {
        let (mut a, mut b) = host_pair(true, true);
        let len = 3 * CHUNK + 5;
        let remote = b.buffer(2 * len + 64, pattern(49));
        let back = a.buffer(2 * len, |_| 0);
        let items: &[_] = if vector {
            &[(&back, 0, &remote, 0, len), (&back, len, &remote, len + 64, len)]
        } else {
            &[(&back, 0, &remote, 64, len)]
        };
        let t = a.one_sided(false, items);
        let Some(&Control::DirectRead { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
        deliver(&mut a, &mut b).unwrap();
        assert_eq!(b.outbox, [Control::DirectGrant { xfer, huge: false }]);
        deliver(&mut b, &mut a).unwrap();
        refuse_copy(&mut a);
        assert!(!a.st.same_host().host_path().reads_peer, "no more copies out of the peer");
        let again = match a.outbox.make_contiguous() {
            [Control::DirectDone { xfer: done }, Control::ReadRequest { xfer: again, .. }] if !vector => {
                assert_eq!(*done, xfer);
                *again
            }
            [Control::DirectDone { xfer: done }, Control::ReadVector { xfer: again, segs, .. }] if vector => {
                assert_eq!((*done, segs.len()), (xfer, 2));
                *again
            }
            other => panic!("vector {vector}: {other:?}"),
        };
        assert_ne!(again, xfer, "a fresh op id: the target still holds the lease under the first");
        assert!(a.outcome(&t).is_none() && t.awaits_answer(), "the second request's Data answers it");
        pump(&mut a, &mut b);
        let total = items.len() * len;
        assert_eq!(a.outcome(&t).unwrap().unwrap(), total as u64);
        if vector {
            assert_eq!(&back.bytes[..len], &remote.bytes[..len]);
            assert_eq!(&back.bytes[len..], &remote.bytes[len + 64..2 * len + 64]);
        } else {
            assert_eq!(&back.bytes[..len], &remote.bytes[64..len + 64]);
        }
        assert!(b.st.same_host().leases() == 0, "the lease ended");
        assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
        assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
        assert_eq!(a.st.same_host().host_path().direct_ops, 0);

        let t = a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
        assert!(matches!(a.outbox.front(), Some(Control::ReadRequest { .. })), "{:?}", a.outbox);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    }
}

/// The target deregistering its region between the grant and the refusal: the lease's end is
/// answered with a Deny, let go like a Done, and the second request is refused; the read fails
/// with the refusal and nothing hangs.
#[test]
fn a_read_asked_for_again_after_its_source_was_deregistered_fails_cleanly() {
    let (mut a, mut b) = host_pair(true, true);
    let len = 3 * CHUNK;
    let remote = b.buffer(len, pattern(50));
    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
    pump_messages_only(&mut a, &mut b);
    b.cut(&remote).unwrap();
    refuse_copy(&mut a);
    pump(&mut a, &mut b);
    assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed);
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    assert!(back.bytes.iter().all(|&x| x == 0));
}

/// The kernel refusing the target's copy of the peer's write: the write is granted as a network
/// write instead of refused, completes byte-exact, and later writes are granted at once.
#[test]
fn a_write_whose_copy_the_kernel_refuses_is_granted_over_the_channels() {
    let (mut a, mut b) = host_pair(true, true);
    let len = 3 * CHUNK + 5;
    let src = a.buffer(len, pattern(51));
    let dst = b.buffer(len + 100, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 100, len)]);
    let Some(&Control::DirectWrite { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    deliver(&mut a, &mut b).unwrap();
    refuse_copy(&mut b);
    assert!(matches!(b.outbox.make_contiguous(), [Control::Grant { xfer: g, .. }] if *g == xfer), "{:?}", b.outbox);
    assert!(!b.st.same_host().host_path().reads_peer);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(&dst.bytes[100..], &src.bytes[..]);
    assert_eq!(a.st.same_host().host_path().direct_ops, 0);

    let t = a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Grant { .. })), "{:?}", b.outbox);
    assert!(!b.st.same_host().has_host_task(), "nothing copied out of the peer any more");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// Takes `end`'s queued copy as its worker does, then `cut` deregisters the copy's region while
/// it runs (a cut reaches only queued jobs), and the kernel refuses it.
fn refuse_cut_copy(end: &mut End, cut: impl FnOnce(&mut End)) {
    let Some(HostTask::Copy(job)) = end.st.same_host_mut().next_host_task() else { panic!("a copy task") };
    cut(end);
    let mut out = Vec::new();
    end.st.copy_refused(job, kernel_refused(), &mut out);
    end.take(out);
}

/// A copy the kernel refuses while its region is being deregistered fails as the cut copy it is:
/// with the deregistration's error, not the kernel's, and without a detour over the channels. Our
/// read's destination, and the destination of the peer's write.
#[test]
fn a_refused_copy_into_a_deregistered_region_fails_as_deregistered() {
    let (mut a, mut b) = host_pair(true, true);
    let len = 3 * CHUNK;
    let remote = b.buffer(len, pattern(52));
    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
    pump_messages_only(&mut a, &mut b);
    refuse_cut_copy(&mut a, |a| a.cut(&back).unwrap());
    let Some(&Control::DirectDone { .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    assert_eq!(a.outbox.len(), 1, "not asked for again: {:?}", a.outbox);
    pump(&mut a, &mut b);
    let why = not_allowed(a.outcome(&t));
    assert!(why.contains("deregistered"), "{why}");
    assert!(!a.st.same_host().host_path().reads_peer);

    let src = a.buffer(len, pattern(53));
    let dst = b.buffer(len, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
    deliver(&mut a, &mut b).unwrap();
    refuse_cut_copy(&mut b, |b| b.cut(&dst).unwrap());
    assert!(matches!(b.outbox.make_contiguous(), [Control::Deny { .. }]), "{:?}", b.outbox);
    pump(&mut a, &mut b);
    let why = not_allowed(a.outcome(&t));
    assert!(why.contains("deregistered"), "{why}");
    assert!(dst.bytes.iter().all(|&x| x == 0));
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// Once the kernel refused one copy out of the peer, the copies queued behind it and the grants
/// still on their way take the channels at once instead of each being refused in turn: reads are
/// asked for again, the peer's writes granted, and all complete byte-exact.
#[test]
fn after_a_refusal_queued_copies_and_grants_in_flight_take_the_channels_at_once() {
    let (mut a, mut b) = host_pair(true, true);
    let len = 2 * CHUNK + 3;
    let remote = b.buffer(3 * len, pattern(54));
    let back = a.buffer(3 * len, |_| 0);
    let reads: Vec<_> = (0..3).map(|k| a.one_sided(false, &[(&back, k * len, &remote, k * len, len)])).collect();
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.outbox.len(), 3, "three grants: {:?}", b.outbox);
    let late = b.outbox.pop_back().unwrap();
    deliver(&mut b, &mut a).unwrap();
    assert_eq!(a.st.same_host().queued().len(), 2, "two copies queued");
    refuse_copy(&mut a);
    assert!(!a.st.same_host().has_host_task(), "the queued copy took the channels");
    let asks = |a: &End| a.outbox.iter().filter(|m| matches!(m, Control::ReadRequest { .. })).count();
    assert_eq!(asks(&a), 2, "{:?}", a.outbox);
    a.handle(late).unwrap();
    assert!(!a.st.same_host().has_host_task(), "the grant in flight took the channels");
    assert_eq!(asks(&a), 3, "{:?}", a.outbox);
    pump(&mut a, &mut b);
    for t in &reads {
        assert_eq!(a.outcome(t).unwrap().unwrap(), len as u64);
    }
    assert_eq!(back.bytes, remote.bytes);

    // The peer's writes queued for the copy: granted at once behind the refused one.
    let src = a.buffer(2 * len, pattern(55));
    let dst = b.buffer(2 * len, |_| 0);
    let writes: Vec<_> = (0..2).map(|k| a.one_sided(true, &[(&src, k * len, &dst, k * len, len)])).collect();
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.st.same_host().queued().len(), 2);
    refuse_copy(&mut b);
    assert!(!b.st.same_host().has_host_task());
    assert!(matches!(b.outbox.make_contiguous(), [Control::Grant { .. }, Control::Grant { .. }]), "{:?}", b.outbox);
    pump(&mut a, &mut b);
    for t in &writes {
        assert_eq!(a.outcome(t).unwrap().unwrap(), len as u64);
    }
    assert_eq!(dst.bytes, src.bytes);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    assert_eq!(a.st.same_host().host_path().direct_ops, 0);
}

/// A grant still on its way when the kernel refused a copy, for a read whose destination was
/// deregistered meanwhile: the read fails as deregistered, is not asked for again over the
/// channels, and nothing lands in its destination (the copy is not made).
#[test]
fn a_grant_in_flight_for_a_deregistered_destination_after_a_refusal_fails_as_deregistered() {
    let (mut a, mut b) = host_pair(true, true);
    let len = 2 * CHUNK + 3;
    let remote = b.buffer(2 * len, pattern(58));
    let (first, gone) = (a.buffer(len, |_| 0), a.buffer(len, |_| 0));
    let refused = a.one_sided(false, &[(&first, 0, &remote, 0, len)]);
    let cut = a.one_sided(false, &[(&gone, 0, &remote, len, len)]);
    deliver(&mut a, &mut b).unwrap();
    let late = b.outbox.pop_back().unwrap();
    assert!(matches!(late, Control::DirectGrant { .. }), "{late:?}");
    deliver(&mut b, &mut a).unwrap();
    refuse_copy(&mut a);
    a.cut(&gone).unwrap();
    a.handle(late).unwrap();
    run_host_work(&mut a);
    let asks = a.outbox.iter().filter(|m| matches!(m, Control::ReadRequest { .. })).count();
    assert_eq!(asks, 1, "only the refused read is asked for again: {:?}", a.outbox);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&refused).unwrap().unwrap(), len as u64);
    assert_eq!(&first.bytes[..], &remote.bytes[..len]);
    let why = not_allowed(a.outcome(&cut));
    assert!(why.contains("deregistered"), "{why}");
    assert!(gone.bytes.iter().all(|&x| x == 0));
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

/// A read asked for again over the channels, from the refusal up to its Data: what the target
/// holds under its first op id, and the read itself.
fn retried_read(a: &mut End, b: &mut End, len: usize) -> (Arc<Transfer>, u64, Buf, Buf) {
    let remote = b.buffer(len, pattern(57));
    let back = a.buffer(len, |_| 0);
    let t = a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
    let Some(&Control::DirectRead { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    pump_messages_only(a, b);
    refuse_copy(a);
    (t, xfer, remote, back)
}

/// The connection failing while a read asked for again is outstanding fails it exactly once, and
/// forgets the target's lease it waited on.
#[test]
fn a_connection_failing_with_a_retried_read_outstanding_fails_it_once() {
    let (mut a, mut b) = host_pair(true, true);
    let (t, _, _remote, _back) = retried_read(&mut a, &mut b, 3 * CHUNK);
    deliver(&mut a, &mut b).unwrap();
    assert!(a.st.waits_on_peer());
    let err = Error::new(UcclStatus::ErrBackend, "the control stream broke");
    let failed = a.st.fail(err.clone());
    assert_eq!(failed.iter().filter(|f| f.id == t.id).count(), 1, "the read fails once");
    for f in failed {
        f.finish_part(Err(err.clone()));
    }
    assert_eq!(a.outcome(&t).unwrap().unwrap_err(), err);
    assert!(!a.st.same_host().waits_on_peer(), "the lease of the read asked again is forgotten");
    assert!(!a.st.waits_on_peer());
}

/// The target's answer to the first op id of a read asked for again is let go once, and only
/// with the length its lease covered: a second answer, or another length, is a violation.
#[test]
fn a_retried_reads_first_id_is_answered_once_and_with_its_length() {
    let len = 3 * CHUNK;
    for deny in [false, true] {
        let (mut a, mut b) = host_pair(true, true);
        let (t, first, _remote, _back) = retried_read(&mut a, &mut b, len);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
        let second = match deny {
            false => Control::Done { xfer: first, len: len as u64 },
            true => deny_msg(first, &Error::not_allowed("the memory region was deregistered")),
        };
        let err = a.handle(second.clone()).unwrap_err();
        assert!(err.message().contains("protocol violation"), "{second:?}: {err}");
    }

    let (mut a, mut b) = host_pair(true, true);
    let (_, first, _remote, _back) = retried_read(&mut a, &mut b, len);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Done { xfer, .. }) if *xfer == first), "{:?}", b.outbox);
    let err = a.handle(Control::Done { xfer: first, len: len as u64 + 1 }).unwrap_err();
    assert!(err.message().contains("protocol violation") && err.message().contains("lease"), "{err}");
}

/// With collapsing on, the end whose region the peer is to copy out of asks for it: a write's
/// initiator for its source, a read's target for the region it grants; nothing where the channels
/// carry the bytes or where the knob is off.
#[test]
fn the_source_the_peer_copies_out_of_is_collapsed() {
    for collapse in [false, true] {
        let (mut a, mut b) = host_pair(true, true);
        if collapse {
            a.st.same_host_mut().set_collapse_sources();
            b.st.same_host_mut().set_collapse_sources();
        }
        let len = 3 * CHUNK;
        let src = a.buffer(len, pattern(43));
        let remote = b.buffer(len, |_| 0);
        a.one_sided(true, &[(&src, 0, &remote, 0, len)]);
        assert!(matches!(a.outbox.front(), Some(Control::DirectWrite { .. })), "{:?}", a.outbox);
        pump(&mut a, &mut b);
        let want_a = if collapse { vec![src.region.id] } else { vec![] };
        assert_eq!(a.collapsed, want_a, "collapse {collapse}: the write's source");
        assert!(b.collapsed.is_empty(), "the write's target copies in, its region is no source");

        let back = a.buffer(len, |_| 0);
        a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
        pump(&mut a, &mut b);
        let want_b = if collapse { vec![remote.region.id] } else { vec![] };
        assert_eq!(b.collapsed, want_b, "collapse {collapse}: the read's granted region");
        assert_eq!(a.collapsed, want_a, "the reader's destination is no source");
        assert_eq!(back.bytes, src.bytes);
    }

    // A reader that cannot copy out of its target reads over the channels: nothing to collapse.
    let (mut a, mut b) = host_pair(false, true);
    b.st.same_host_mut().set_collapse_sources();
    let len = 3 * CHUNK;
    let remote = b.buffer(len, pattern(44));
    let back = a.buffer(len, |_| 0);
    a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
    pump(&mut a, &mut b);
    assert_eq!(back.bytes, remote.bytes);
    assert!(b.collapsed.is_empty(), "{:?}", b.collapsed);

    // Nor a write whose source lies on huge pages already.
    let (mut a, mut b) = host_pair(true, true);
    a.st.same_host_mut().set_collapse_sources();
    let src = a.buffer(len, pattern(46));
    src.region.set_huge_pages(true);
    let dst = b.buffer(len, |_| 0);
    a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
    assert!(matches!(a.outbox.front(), Some(Control::DirectWrite { .. })), "{:?}", a.outbox);
    pump(&mut a, &mut b);
    assert_eq!(dst.bytes, src.bytes);
    assert!(a.collapsed.is_empty(), "{:?}", a.collapsed);

    // Nor a write inside the network band, which the channels carry, where a source on huge pages
    // would not skip the band (`host_copy_huge_pages` off).
    let band = (2 * CHUNK as u64, 4 * CHUNK as u64);
    let (mut a, mut b) = host_pair_with_band(true, true, Some(band), false);
    a.st.same_host_mut().set_collapse_sources();
    b.st.same_host_mut().set_collapse_sources();
    let src = a.buffer(len, pattern(45));
    let dst = b.buffer(len, |_| 0);
    a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
    pump(&mut a, &mut b);
    assert_eq!(dst.bytes, src.bytes);
    a.one_sided(false, &[(&src, 0, &dst, 0, len)]);
    pump(&mut a, &mut b);
    assert_eq!(dst.bytes, src.bytes);
    assert!(a.collapsed.is_empty() && b.collapsed.is_empty(), "{:?} {:?}", a.collapsed, b.collapsed);
}

/// Inside the network band a source on small pages keeps to the channels, but where one on huge
/// pages would skip the band the region is collapsed, so that later transfers out of it are
/// copied: a write's initiator asks for its source, a read's target for the region it serves
/// (when the reader could copy out of it). Once collapsed, the target grants the next read.
#[test]
fn a_source_kept_to_the_channels_by_the_band_is_collapsed() {
    let band = (2 * CHUNK as u64, 4 * CHUNK as u64);
    let len = 3 * CHUNK;
    for collapse in [false, true] {
        let (mut a, mut b) = host_pair_with_band(true, true, Some(band), true);
        if collapse {
            a.st.same_host_mut().set_collapse_sources();
            b.st.same_host_mut().set_collapse_sources();
        }
        let src = a.buffer(len, pattern(47));
        let dst = b.buffer(len, |_| 0);
        a.one_sided(true, &[(&src, 0, &dst, 0, len)]);
        assert!(matches!(a.outbox.front(), Some(Control::WriteRequest { .. })), "{:?}", a.outbox);
        pump(&mut a, &mut b);
        assert_eq!(dst.bytes, src.bytes);
        assert_eq!(a.collapsed, if collapse { vec![src.region.id] } else { vec![] }, "collapse {collapse}");
        assert!(b.collapsed.is_empty(), "the write's target is no source: {:?}", b.collapsed);

        let back = a.buffer(len, |_| 0);
        a.one_sided(false, &[(&back, 0, &dst, 0, len)]);
        assert!(target_served_over_channels(&mut a, &mut b), "{:?}", b.outbox);
        pump(&mut a, &mut b);
        assert_eq!(back.bytes, src.bytes);
        assert_eq!(b.collapsed, if collapse { vec![dst.region.id] } else { vec![] }, "collapse {collapse}");
        assert_eq!(a.collapsed.len(), usize::from(collapse), "the reader's destination is no source");

        // What the collapse leaves, the target's region says: on huge pages its reads are granted.
        dst.region.set_huge_pages(true);
        let again = a.buffer(len, |_| 0);
        let direct_before = a.st.same_host().host_path().direct_ops;
        a.one_sided(false, &[(&again, 0, &dst, 0, len)]);
        assert!(!target_served_over_channels(&mut a, &mut b), "{:?}", b.outbox);
        pump(&mut a, &mut b);
        assert_eq!(again.bytes, src.bytes);
        assert_eq!(a.st.same_host().host_path().direct_ops, direct_before + 1, "copied directly");
    }

    // A read's target that the reader cannot copy out of has nothing to gain.
    let (mut a, mut b) = host_pair_with_band(false, true, Some(band), true);
    b.st.same_host_mut().set_collapse_sources();
    let remote = b.buffer(len, pattern(48));
    let back = a.buffer(len, |_| 0);
    a.one_sided(false, &[(&back, 0, &remote, 0, len)]);
    pump(&mut a, &mut b);
    assert_eq!(back.bytes, remote.bytes);
    assert!(b.collapsed.is_empty(), "{:?}", b.collapsed);
}
