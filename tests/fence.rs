//! `deregister` (C: `uccl_engine_mr_destroy`) is a fence: once it returns, no engine thread reads or
//! writes the region again, whoever started the transfer that used it, and a transfer cut off that
//! way fails with -6 (not allowed) instead of reporting success. Each case runs a 64 MiB transfer,
//! deregisters a region while bytes are moving (timed by watching them land), overwrites the
//! region with a sentinel right after `deregister` returned, waits for the transfer and checks that
//! the sentinel is intact and that nothing read after the deregistration reached the peer.
//! Connection and engine destroy are checked the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::{Config, Connection, Engine, Locality, OneSided, UcclStatus};

mod common;
use common::Pair;

const BIG: usize = 64 << 20;
const ROUNDS: usize = 20;
/// Written over a deregistered region; no pattern byte has this value.
const SENTINEL: u8 = 0xEE;
const LIMIT: Duration = Duration::from_secs(60);

/// The network path (the harness's loopback config keeps two engines of one process off their
/// direct copy), 2 channels of 256 KiB chunks. The fence waits up to 60 s for posted requests
/// instead of 200 ms: these tests are about the cut, and a loaded 2-core host can take longer than
/// 200 ms to drain a window, which fails the connection instead (the timeout has a test of its own).
/// The most the knob takes: only a bound on a drain that never ends.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

fn config() -> Config {
    Config { num_channels: Some(2), chunk_size: 256 << 10, fence_timeout: FENCE_TIMEOUT, ..common::loopback() }
}

/// Memory the engine reads and writes behind the test's back, so the test touches it only through
/// its raw pointer (never through a reference that would promise nobody else does).
struct Buf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain heap allocation; the tests synchronise with the engine through its calls.
unsafe impl Send for Buf {}
// SAFETY: as above.
unsafe impl Sync for Buf {}

impl Buf {
    fn new(len: usize) -> Buf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Buf { ptr, len }
    }

    fn addr(&self) -> usize {
        self.ptr as usize
    }

    fn fill(&self, byte: u8) {
        // SAFETY: `len` bytes at `ptr` are ours.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) };
    }

    fn set(&self, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.len);
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, self.len) };
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), self.len) };
        out
    }

    /// The byte at `i`, read afresh each time (the kernel or a copy on an engine thread writes it).
    fn byte(&self, i: usize) -> u8 {
        assert!(i < self.len);
        // SAFETY: in bounds.
        unsafe { std::ptr::read_volatile(self.ptr.add(i)) }
    }

    fn find(&self, byte: u8) -> Option<usize> {
        // SAFETY: `len` readable bytes.
        let at = unsafe { libc::memchr(self.ptr.cast(), byte as i32, self.len) };
        (!at.is_null()).then(|| at as usize - self.addr())
    }

    /// The first byte that is not `byte`, if any.
    fn first_not(&self, byte: u8) -> Option<usize> {
        let all = vec![byte; self.len];
        let now = self.snapshot();
        if now == all { None } else { now.iter().position(|&b| b != byte) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Bytes 1..=200 varying with position: never zero (so landing shows) and never the sentinel.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 7) % 200 + 1).map(|b| b as u8).collect()
}

fn pair_with(config: Config) -> Pair {
    common::pair(config)
}

fn pair() -> Pair {
    pair_with(config())
}

fn outcome(conn: &Connection, id: u64) -> uccl_tcpx::Result<u64> {
    common::wait_done(conn, id, LIMIT)
}

/// When round `k` of `rounds` cuts in: round 0 right after posting, the others once the byte at a
/// growing offset of `watch` landed (or the transfer ended before anything was seen).
fn wait_for_cut(k: usize, rounds: usize, watch: &Buf) {
    if k == 0 {
        return;
    }
    wait_for_byte((k - 1) * watch.len / rounds, watch);
}

/// Until the byte at `at` of `watch` landed.
fn wait_for_byte(at: usize, watch: &Buf) {
    let deadline = Instant::now() + LIMIT;
    while watch.byte(at) == 0 {
        assert!(Instant::now() < deadline, "no byte landed at offset {at}");
        std::hint::spin_loop();
    }
}

/// How a round ended, for the summary and for checking that the cut really hit moving transfers.
#[derive(Default, Debug)]
struct Tally {
    completed: usize,
    refused: usize,
    /// Refused with part of the bytes moved: the fence cut a running flow.
    cut_mid_flight: usize,
}

/// Checks a cut-off transfer: -6, or success when it completed before the cut (then `complete`
/// says whether its bytes are all there).
fn judge(what: &str, outcome: uccl_tcpx::Result<u64>, len: usize, complete: bool, moved: bool, tally: &mut Tally) {
    match outcome {
        Ok(n) => {
            assert_eq!(n, len as u64, "{what}: short");
            assert!(complete, "{what}: reported success without all of its bytes");
            tally.completed += 1;
        }
        Err(e) => {
            assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "{what}: {e}");
            tally.refused += 1;
            tally.cut_mid_flight += usize::from(moved);
        }
    }
}

fn assert_sentinel(buf: &Buf, what: &str) {
    if let Some(at) = buf.first_not(SENTINEL) {
        panic!("{what}: byte {at} was written after deregister returned ({:#x})", buf.byte(at));
    }
}

/// Registers `buf` with `engine` and advertises all of it.
fn write_item(engine: &Engine, buf: &Buf) -> (u64, uccl_tcpx::FifoItem) {
    let mr = engine.register(buf.addr(), buf.len).unwrap();
    (mr, engine.prepare_fifo(mr, buf.addr(), buf.len).unwrap())
}

/// A writes into B's region; B deregisters it while the bytes land.
fn remote_write_cut(p: &Pair, len: usize, rounds: usize) -> Tally {
    let data = pattern(len);
    let (src, dst) = (Buf::new(len), Buf::new(len));
    src.set(&data);
    let smr = p.a.register(src.addr(), len).unwrap();
    let mut tally = Tally::default();
    for k in 0..rounds {
        dst.fill(0);
        let (dmr, item) = write_item(&p.b, &dst);
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len, remote: item }]).unwrap();
        wait_for_cut(k, rounds, &dst);
        p.b.deregister(dmr).unwrap();
        let landed = dst.snapshot();
        dst.fill(SENTINEL);
        let done = outcome(&p.ab, w);
        assert_sentinel(&dst, &format!("write round {k}"));
        let moved = landed.iter().any(|&b| b != 0);
        judge(&format!("write round {k}"), done, len, landed == data, moved, &mut tally);
    }
    p.a.deregister(smr).unwrap();
    tally
}

/// A reads B's region; B deregisters it while the bytes are served.
fn remote_read_cut(p: &Pair, len: usize, rounds: usize) -> Tally {
    let data = pattern(len);
    let (src, dst) = (Buf::new(len), Buf::new(len));
    let dmr = p.a.register(dst.addr(), len).unwrap();
    let mut tally = Tally::default();
    for k in 0..rounds {
        src.set(&data);
        dst.fill(0);
        let (smr, item) = write_item(&p.b, &src);
        let r = p.ab.read(&[OneSided { mr: dmr, addr: dst.addr(), len, remote: item }]).unwrap();
        wait_for_cut(k, rounds, &dst);
        p.b.deregister(smr).unwrap();
        src.fill(SENTINEL);
        let done = outcome(&p.ab, r);
        if let Some(at) = dst.find(SENTINEL) {
            panic!("read round {k}: byte {at} was read from the region after deregister returned");
        }
        let moved = dst.byte(0) != 0;
        judge(&format!("read round {k}"), done, len, dst.snapshot() == data, moved, &mut tally);
    }
    p.a.deregister(dmr).unwrap();
    tally
}

fn small_write(p: &Pair) {
    let data = pattern(100_000);
    let (src, dst) = (Buf::new(data.len()), Buf::new(data.len()));
    src.set(&data);
    let smr = p.a.register(src.addr(), src.len).unwrap();
    let (dmr, item) = write_item(&p.b, &dst);
    let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len: src.len, remote: item }]).unwrap();
    assert_eq!(outcome(&p.ab, w).unwrap(), data.len() as u64, "the connection still works");
    assert!(dst.snapshot() == data);
    p.a.deregister(smr).unwrap();
    p.b.deregister(dmr).unwrap();
}

#[test]
fn a_write_landing_when_the_target_deregisters_stops_there() {
    let p = pair();
    let tally = remote_write_cut(&p, BIG, ROUNDS);
    eprintln!("write cut while landing: {tally:?}");
    assert!(tally.cut_mid_flight > 0, "no round cut a running write: {tally:?}");
    small_write(&p);
}

#[test]
fn a_read_served_when_the_target_deregisters_stops_there() {
    let p = pair();
    let tally = remote_read_cut(&p, BIG, ROUNDS);
    eprintln!("read cut while served: {tally:?}");
    assert!(tally.cut_mid_flight > 0, "no round cut a running read: {tally:?}");
    small_write(&p);
}

#[test]
fn the_plugin_path_stops_at_deregistration_too() {
    let p = pair_with(Config { fence_timeout: FENCE_TIMEOUT, ..common::plugin::config(2, 256 << 10) });
    assert_eq!(p.a.transport(), "FakeDevmemTCPX_v7");
    let writes = remote_write_cut(&p, 16 << 20, 8);
    let reads = remote_read_cut(&p, 16 << 20, 8);
    eprintln!("fake NIC: writes {writes:?}, reads {reads:?}");
    assert!(writes.cut_mid_flight + reads.cut_mid_flight > 0, "no round cut a running transfer");
    small_write(&p);
}

/// A keeps writing small (inline) items while B deregisters the target: the copy that checks the
/// region and stores into it is one step under the connection lock, so none lands afterwards.
#[test]
fn small_writes_stop_at_deregistration() {
    writes_streamed_while_the_target_goes(pair(), 4096);
}

/// Inline writes large enough that the target reads their payloads straight into the region as
/// they arrive: a deregistration closes that landing, so no byte of a payload still arriving lands
/// after it returns, and the write is refused.
#[test]
fn inline_writes_landing_from_the_socket_stop_at_deregistration() {
    let p = pair_with(Config { inline_max: 256 << 10, ..config() });
    writes_streamed_while_the_target_goes_with(p, 192 << 10, true);
}

/// The inline payloads below: large enough that the reader lands them from the socket.
const LANDING_ITEM: usize = 192 << 10;
const LANDING_SLOTS: usize = 64;

/// Waits for the outcome of one posted transfer: true when it completed, false when it was cut.
type Posted = Box<dyn FnOnce() -> bool + Send>;

/// Rounds of transfers of `LANDING_ITEM` bytes into `dst`'s slots, eight in flight at a time from a
/// thread, while `dst` is deregistered (`register` and `deregister` on its engine): `post(mr, off)`
/// posts the transfer into the slot at `off`, or gives `None` once refused at the post. Nothing may
/// land after deregister returned; some transfer completes before the cut in every round, and some
/// round cuts one in flight.
fn landing_transfers_cut(
    what: &str,
    dst: &Arc<Buf>,
    register: impl Fn() -> u64,
    deregister: impl Fn(u64),
    post: impl Fn(u64, usize) -> Option<Posted> + Send + Sync + 'static,
) {
    let post = Arc::new(post);
    let mut cut = 0;
    for round in 0..ROUNDS {
        dst.fill(0);
        let mr = register();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = {
            let (post, stop) = (post.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut refused, mut slot) = (0, 0, 0);
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let mut posted = Vec::new();
                    for _ in 0..8 {
                        let Some(wait) = post(mr, (slot % LANDING_SLOTS) * LANDING_ITEM) else { break };
                        posted.push(wait);
                        slot += 1;
                    }
                    if posted.is_empty() {
                        break;
                    }
                    for wait in posted {
                        if wait() {
                            ok += 1;
                        } else {
                            refused += 1;
                        }
                    }
                }
                (ok, refused)
            })
        };
        // A byte of the slot after the first proves the first transfer done.
        wait_for_byte((round % 4) * dst.len / 4 + LANDING_ITEM, dst);
        deregister(mr);
        dst.fill(SENTINEL);
        std::thread::sleep(Duration::from_millis(5));
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (ok, refused) = worker.join().unwrap();
        assert_sentinel(dst, &format!("{what} round {round} ({ok} completed, {refused} cut)"));
        assert!(ok > 0, "{what} round {round}: none completed before the cut");
        cut += refused;
    }
    assert!(cut > 0, "{what}: no round cut one in flight");
}

/// A reads slots of B's region into its own, small reads whose answers land straight from the
/// socket, and deregisters its region meanwhile: each read completed with its bytes or failed -6.
#[test]
fn inline_read_answers_landing_from_the_socket_stop_at_deregistration() {
    let p = pair_with(Config { inline_max: 256 << 10, ..config() });
    let src = Buf::new(LANDING_ITEM * LANDING_SLOTS);
    src.set(&pattern(src.len));
    let (smr, item) = write_item(&p.b, &src);
    let dst = Arc::new(Buf::new(src.len));
    let (ab, into) = (p.ab.clone(), dst.clone());
    let read = move |mr, off: usize| -> Option<Posted> {
        let mut remote = item;
        remote.addr += off as u64;
        remote.size = LANDING_ITEM as u32;
        let id = ab.read(&[OneSided { mr, addr: into.addr() + off, len: LANDING_ITEM, remote }]).ok()?;
        let ab = ab.clone();
        Some(Box::new(move || match outcome(&ab, id) {
            Ok(n) => {
                assert_eq!(n, LANDING_ITEM as u64);
                true
            }
            Err(e) => {
                assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "{e}");
                false
            }
        }))
    };
    let register = || p.a.register(dst.addr(), dst.len).unwrap();
    landing_transfers_cut("inline reads", &dst, register, |mr| p.a.deregister(mr).unwrap(), read);
    p.b.deregister(smr).unwrap();
    small_write(&p);
}

/// B receives A's inline messages into its region, whose payloads land straight from the socket
/// in the receive, and deregisters its region meanwhile: each pair ends alike, both done or the
/// receive -6 and its send refused.
#[test]
fn inline_messages_landing_in_a_receive_stop_at_deregistration() {
    let p = pair_with(Config { inline_max: 256 << 10, ..config() });
    let src = Arc::new(Buf::new(LANDING_ITEM * LANDING_SLOTS));
    src.set(&pattern(src.len));
    let smr = p.a.register(src.addr(), src.len).unwrap();
    let dst = Arc::new(Buf::new(src.len));
    let (ab, ba, into) = (p.ab.clone(), p.ba.clone(), dst.clone());
    let pair = move |mr, off: usize| -> Option<Posted> {
        let r = ba.recv(mr, into.addr() + off, LANDING_ITEM).ok()?;
        let s = ab.send(&[(smr, src.addr() + off, LANDING_ITEM)]).unwrap();
        let (ab, ba) = (ab.clone(), ba.clone());
        Some(Box::new(move || match (outcome(&ab, s), outcome(&ba, r)) {
            (Ok(sent), Ok(received)) => {
                assert_eq!((sent, received), (LANDING_ITEM as u64, LANDING_ITEM as u64));
                true
            }
            (Err(sent), Err(received)) => {
                assert_eq!(received.status(), UcclStatus::ErrNotAllowed, "{received}");
                assert_eq!(sent.status(), UcclStatus::ErrNotAllowed, "{sent}");
                false
            }
            (sent, received) => panic!("the two ends disagree: send {sent:?}, receive {received:?}"),
        }))
    };
    let register = || p.b.register(dst.addr(), dst.len).unwrap();
    landing_transfers_cut("inline messages", &dst, register, |mr| p.b.deregister(mr).unwrap(), pair);
    p.a.deregister(smr).unwrap();
    small_write(&p);
}

/// The same between two engines of this process, whose one-sided transfers are direct copies made
/// under both connections' locks: a deregistration waits for a copy under way, later ones are
/// refused.
#[test]
fn same_process_copies_stop_at_deregistration() {
    let p = pair_with(Config { num_channels: Some(2), fence_timeout: FENCE_TIMEOUT, ..common::same_host() });
    assert_eq!(p.ab.peer.locality, Locality::SameProcess, "the engines did not take the direct path");
    writes_streamed_while_the_target_goes(p, 256 << 10);
}

/// A thread posts writes of `item_len` bytes round the target's slots while the target is deregistered;
/// the sentinel written right after must stay, writes before land, writes after are refused.
fn writes_streamed_while_the_target_goes(p: Pair, item_len: usize) {
    writes_streamed_while_the_target_goes_with(p, item_len, false);
}

/// The same; with `landing`, the target's first bytes of a write are visible before the write is
/// done, so the cut waits one slot more: a byte of the next slot proves the previous write done
/// (its reader took the landed payload's end before it started the next).
fn writes_streamed_while_the_target_goes_with(p: Pair, item_len: usize, landing: bool) {
    const SLOTS: usize = 64;
    let data = pattern(item_len * SLOTS);
    let (src, dst) = (Arc::new(Buf::new(data.len())), Buf::new(data.len()));
    src.set(&data);
    let smr = p.a.register(src.addr(), src.len).unwrap();
    for round in 0..ROUNDS {
        dst.fill(0);
        let (dmr, item) = write_item(&p.b, &dst);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (ab, src, stop) = (p.ab.clone(), src.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ids, mut slot) = (Vec::new(), 0);
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let off = (slot % SLOTS) * item_len;
                    let mut remote = item;
                    remote.addr += off as u64;
                    remote.size = item_len as u32;
                    let op = OneSided { mr: smr, addr: src.addr() + off, len: item_len, remote };
                    ids.push(ab.write(&[op]));
                    slot += 1;
                }
                // One more after the deregistration for certain: it must be refused.
                let mut remote = item;
                remote.size = item_len as u32;
                let last = ab.write(&[OneSided { mr: smr, addr: src.addr(), len: item_len, remote }]);
                ids.push(last);
                ids
            })
        };
        let k = 1 + round % 4;
        wait_for_byte((k - 1) * dst.len / 4 + if landing { item_len } else { 0 }, &dst);
        p.b.deregister(dmr).unwrap();
        dst.fill(SENTINEL);
        stop.store(true, std::sync::atomic::Ordering::Release);
        let ids = writer.join().unwrap();
        let (mut ok, mut refused) = (0, 0);
        // The direct path refuses at post, the network path when the request arrives.
        for posted in ids {
            match posted.and_then(|id| outcome(&p.ab, id)) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(e.status(), UcclStatus::ErrNotAllowed, "{e}");
                    refused += 1;
                }
            }
        }
        assert_sentinel(&dst, &format!("small writes round {round} ({ok} landed, {refused} refused)"));
        assert!(ok > 0 && refused > 0, "round {round}: {ok} landed, {refused} refused");
    }
    p.a.deregister(smr).unwrap();
    small_write(&p);
}

/// B receives into a region it deregisters while A's send lands: both ends fail with -6 (or both
/// completed before), and a receive still waiting for its send fails at once.
#[test]
fn a_receive_whose_region_is_deregistered_stops_there() {
    let p = pair();
    let data = pattern(BIG);
    let (src, dst) = (Buf::new(BIG), Buf::new(BIG));
    src.set(&data);
    let smr = p.a.register(src.addr(), BIG).unwrap();
    let mut tally = Tally::default();
    for k in 0..ROUNDS / 2 {
        dst.fill(0);
        let dmr = p.b.register(dst.addr(), BIG).unwrap();
        let r = p.ba.recv(dmr, dst.addr(), BIG).unwrap();
        let s = p.ab.send(&[(smr, src.addr(), BIG)]).unwrap();
        wait_for_cut(k, ROUNDS / 2, &dst);
        p.b.deregister(dmr).unwrap();
        let landed = dst.snapshot();
        dst.fill(SENTINEL);
        let (sent, received) = (outcome(&p.ab, s), outcome(&p.ba, r));
        assert_sentinel(&dst, &format!("receive round {k}"));
        assert_eq!(sent.is_ok(), received.is_ok(), "round {k}: send {sent:?}, receive {received:?}");
        let moved = landed.iter().any(|&b| b != 0);
        judge(&format!("send round {k}"), sent, BIG, landed == data, moved, &mut Tally::default());
        judge(&format!("receive round {k}"), received, BIG, landed == data, moved, &mut tally);
    }
    eprintln!("receives cut while landing: {tally:?}");
    assert!(tally.cut_mid_flight > 0, "no round cut a running receive: {tally:?}");
    // A receive posted and deregistered before its send arrives fails now; the send it would have
    // matched is refused, and the next pair matches as usual.
    let dmr = p.b.register(dst.addr(), BIG).unwrap();
    let r = p.ba.recv(dmr, dst.addr(), BIG).unwrap();
    p.b.deregister(dmr).unwrap();
    assert_eq!(outcome(&p.ba, r).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    let s = p.ab.send(&[(smr, src.addr(), 1000)]).unwrap();
    assert_eq!(outcome(&p.ab, s).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    dst.fill(0);
    let dmr = p.b.register(dst.addr(), BIG).unwrap();
    let r = p.ba.recv(dmr, dst.addr(), BIG).unwrap();
    let s = p.ab.send(&[(smr, src.addr(), 100_000)]).unwrap();
    assert_eq!(outcome(&p.ab, s).unwrap(), 100_000);
    assert_eq!(outcome(&p.ba, r).unwrap(), 100_000);
    assert!(dst.snapshot()[..100_000] == data[..100_000]);
}

/// The initiator deregisters its own buffer mid-transfer: a write's source and a read's
/// destination are not touched again and the transfer fails with -6; a send's source cannot be cut
/// without the receiver taking zeros for data, so the connection fails instead.
#[test]
fn local_regions_deregistered_mid_transfer_are_not_touched_again() {
    let p = pair();
    let data = pattern(BIG);
    let (local, remote) = (Buf::new(BIG), Buf::new(BIG));
    let (mut writes, mut reads) = (Tally::default(), Tally::default());
    for k in 0..ROUNDS / 2 {
        // Write: the source is cut, so nothing read after the deregistration reaches B.
        local.set(&data);
        remote.fill(0);
        let lmr = p.a.register(local.addr(), BIG).unwrap();
        let (rmr, item) = write_item(&p.b, &remote);
        let w = p.ab.write(&[OneSided { mr: lmr, addr: local.addr(), len: BIG, remote: item }]).unwrap();
        wait_for_cut(k, ROUNDS / 2, &remote);
        p.a.deregister(lmr).unwrap();
        local.fill(SENTINEL);
        let done = outcome(&p.ab, w);
        if let Some(at) = remote.find(SENTINEL) {
            panic!("write round {k}: byte {at} was read from the source after deregister returned");
        }
        judge(&format!("write round {k}"), done, BIG, remote.snapshot() == data, remote.byte(0) != 0, &mut writes);
        p.b.deregister(rmr).unwrap();

        // Read: the destination is cut, so nothing lands in it afterwards.
        remote.set(&data);
        local.fill(0);
        let lmr = p.a.register(local.addr(), BIG).unwrap();
        let (rmr, item) = write_item(&p.b, &remote);
        let r = p.ab.read(&[OneSided { mr: lmr, addr: local.addr(), len: BIG, remote: item }]).unwrap();
        wait_for_cut(k, ROUNDS / 2, &local);
        p.a.deregister(lmr).unwrap();
        let landed = local.snapshot();
        local.fill(SENTINEL);
        let done = outcome(&p.ab, r);
        assert_sentinel(&local, &format!("read round {k}"));
        judge(&format!("read round {k}"), done, BIG, landed == data, landed[0] != 0, &mut reads);
        p.b.deregister(rmr).unwrap();
    }
    eprintln!("local cuts: writes {writes:?}, reads {reads:?}");
    assert!(writes.cut_mid_flight > 0 && reads.cut_mid_flight > 0, "writes {writes:?}, reads {reads:?}");
    small_write(&p);

    // Send: a fresh pair each round, since the cut fails the connection.
    for k in 1..4 {
        let p = pair();
        local.set(&data);
        remote.fill(0);
        let lmr = p.a.register(local.addr(), BIG).unwrap();
        let rmr = p.b.register(remote.addr(), BIG).unwrap();
        let r = p.ba.recv(rmr, remote.addr(), BIG).unwrap();
        let s = p.ab.send(&[(lmr, local.addr(), BIG)]).unwrap();
        wait_for_cut(k, 4, &remote);
        p.a.deregister(lmr).unwrap();
        local.fill(SENTINEL);
        let (sent, received) = (outcome(&p.ab, s), outcome(&p.ba, r));
        if let Some(at) = remote.find(SENTINEL) {
            panic!("send round {k}: byte {at} was read from the source after deregister returned");
        }
        if received.is_ok() {
            assert!(remote.snapshot() == data, "send round {k}: the receive completed without all bytes");
        }
        assert!(sent.is_err() || received.is_ok(), "send round {k}: send {sent:?}, receive {received:?}");
    }
}

/// Destroying the connection or the engine while a write lands: once the call returned, the
/// target's memory is not written again.
#[test]
fn connection_and_engine_destroy_are_fences_too() {
    let data = pattern(BIG);
    let (src, dst) = (Buf::new(BIG), Buf::new(BIG));
    src.set(&data);
    for k in 1..7 {
        let p = pair();
        dst.fill(0);
        let smr = p.a.register(src.addr(), BIG).unwrap();
        let (_, item) = write_item(&p.b, &dst);
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len: BIG, remote: item }]).unwrap();
        wait_for_cut(k, 7, &dst);
        if k % 2 == 0 {
            p.b.close_connection(&p.ba);
        } else {
            p.b.shutdown();
        }
        dst.fill(SENTINEL);
        let done = outcome(&p.ab, w);
        assert_sentinel(&dst, &format!("destroy round {k} ({done:?})"));
    }
}

/// With no time allowed for posted requests to complete, a deregistration that finds some fails
/// the connection instead of waiting: dropping the channels ends their I/O before it returns.
#[test]
fn requests_still_posted_past_the_bound_fail_the_connection() {
    let data = pattern(BIG);
    let (src, dst) = (Buf::new(BIG), Buf::new(BIG));
    src.set(&data);
    for round in 0..5 {
        let p = pair_with(Config { fence_timeout: Duration::ZERO, ..config() });
        dst.fill(0);
        let smr = p.a.register(src.addr(), BIG).unwrap();
        let (dmr, item) = write_item(&p.b, &dst);
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len: BIG, remote: item }]).unwrap();
        wait_for_cut(1, 4, &dst);
        p.b.deregister(dmr).unwrap();
        dst.fill(SENTINEL);
        let done = outcome(&p.ab, w);
        assert_sentinel(&dst, &format!("round {round}"));
        match p.ba.notify(b"n", b"m") {
            Err(e) => {
                assert!(e.message().contains("UCCL_TCPX_FENCE_TIMEOUT_MS"), "{e}");
                assert!(done.is_err(), "the write succeeded on a connection that failed mid-write");
                return;
            }
            // Nothing was posted on the region at that instant: the write was cut off the usual way.
            Ok(()) => assert!(done.is_ok() || done.unwrap_err().status() == UcclStatus::ErrNotAllowed),
        }
    }
    panic!("no deregistration found a request posted on its region in 5 rounds");
}
