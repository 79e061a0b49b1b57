//! The staging decorator on its own: the socket transport wrapped in StagedNet over loopback,
//! device regions registered with its comms, chunks posted and tested by hand the way the engine
//! does, and every byte checked against a pattern copied back from the GPU. Skipped (with
//! "SKIPPED: no CUDA driver") where no CUDA driver exists.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::internal::transport::staged::{StagedNet, StagingParams};
use uccl_tcpx::internal::transport::{IoSeg, ListenComm, MemKind, MrHandle, MrRun, Net, RecvComm, SendComm};
use uccl_tcpx::{SocketConfig, StagingConfig, UcclStatus};

mod common;
use common::gpu::{Mem, Side, blocks, fewer_gpus_than, landed, no_gpu, odd_pieces, span};
use common::{assert_same, pattern};

/// Requests a comm holds at once, as the engine's window allows at most.
const WINDOW: usize = 16;

struct Staged {
    net: Arc<dyn Net>,
    tx: Box<dyn SendComm>,
    rx: Box<dyn RecvComm>,
    _listen: Box<dyn ListenComm>,
    slot: usize,
}

fn staged(slot: usize, slots: usize) -> Staged {
    staged_with(StagingParams::new(slot, slots))
}

fn staged_with(params: StagingParams) -> Staged {
    let slot = params.slot_size;
    let socket = common::socket::socket_net(SocketConfig::default());
    let net = StagedNet::wrap(Arc::new(socket), params).unwrap();
    let (tx, rx, listen) = common::comm::comm_pair(&*net, 0);
    Staged { net, tx, rx, _listen: listen, slot }
}

/// One side's view of a transfer: where the bytes are and the handle to post them with.
#[derive(Clone, Copy)]
struct End {
    addr: usize,
    mr: MrHandle,
}

/// Moves `len` bytes from `src` to `dst` in slot-sized chunks, up to the window in flight on each
/// side, testing only the oldest request and consuming receives in order. `on_chunk` sees each
/// receive as soon as it is reported done.
fn transfer(s: &mut Staged, src: End, dst: End, len: usize, on_chunk: impl FnMut(usize, usize)) {
    transfer_in(s, WINDOW, src, dst, len, on_chunk)
}

/// As `transfer`, with at most `window` requests in flight on each side.
fn transfer_in(s: &mut Staged, window: usize, src: End, dst: End, len: usize, mut on_chunk: impl FnMut(usize, usize)) {
    let chunk = s.slot;
    let n = len.div_ceil(chunk);
    let piece = |i: usize| (i * chunk, chunk.min(len - i * chunk));
    let (mut next_send, mut next_recv, mut sent, mut received) = (0, 0, 0, 0);
    let mut sends = VecDeque::new();
    let mut recvs = VecDeque::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent < n || received < n {
        while next_recv < n && recvs.len() < window {
            let (off, l) = piece(next_recv);
            // SAFETY: every caller's dst names a buffer of at least len bytes that outlives this call, and
            // transfer returns only once every receive is reported done; [off, off + l) lies within len.
            match unsafe { s.rx.irecv((dst.addr + off) as *mut u8, l, dst.mr) }.unwrap() {
                Some(r) => recvs.push_back((r, next_recv)),
                None => break,
            }
            next_recv += 1;
        }
        while next_send < n && sends.len() < window {
            let (off, l) = piece(next_send);
            // SAFETY: every caller's src names a buffer of at least len bytes that outlives this call, and
            // transfer returns only once every send is reported done; [off, off + l) lies within len.
            match unsafe { s.tx.isend((src.addr + off) as *const u8, l, src.mr) }.unwrap() {
                Some(r) => sends.push_back((r, next_send)),
                None => break,
            }
            next_send += 1;
        }
        if let Some(&(r, i)) = sends.front()
            && let Some(size) = s.tx.test(r).unwrap()
        {
            assert_eq!(size, piece(i).1, "send {i} reports its size");
            sends.pop_front();
            sent += 1;
        }
        if let Some(&(r, i)) = recvs.front()
            && let Some(size) = s.rx.test(r).unwrap()
        {
            let (off, l) = piece(i);
            assert_eq!(size, l, "receive {i} reports the sender's size");
            on_chunk(off, l);
            s.rx.irecv_consumed(r).unwrap();
            recvs.pop_front();
            received += 1;
        }
        assert!(Instant::now() < deadline, "transfer of {len} bytes stuck at {sent}/{received} of {n} chunks");
    }
}

fn register(s: &mut Staged, src: &Mem, dst: &Mem) -> (MrHandle, MrHandle) {
    let smr = s.tx.reg_mr(src.addr(), src.len(), src.kind()).unwrap();
    let rmr = s.rx.reg_mr(dst.addr(), dst.len(), dst.kind()).unwrap();
    (smr, rmr)
}

#[test]
fn every_direction_and_size_byte_for_byte() {
    if no_gpu() {
        return;
    }
    let sizes = [1usize, 3, 4095, 4097, (64 << 10) + 1, 1 << 20, (4 << 20) - 1, (4 << 20) + 3, (64 << 20) + 5];
    let max = *sizes.iter().max().unwrap() + 64;
    for (from, to) in
        [(Side::Gpu, Side::Gpu), (Side::Gpu, Side::Host), (Side::Host, Side::Gpu), (Side::Host, Side::Host)]
    {
        let mut s = staged(1 << 20, 8);
        let mut src = Mem::new(from, max);
        let mut dst = Mem::new(to, max);
        let (smr, rmr) = register(&mut s, &src, &dst);
        for (k, &len) in sizes.iter().enumerate() {
            // Unaligned on both ends, differently per size.
            let (soff, doff) = (1 + k % 7, 3 + (k * 5) % 11);
            let data = pattern(len, k as u64 + 1);
            src.write(soff, &data);
            dst.clear();
            let (a, b) = (End { addr: src.addr() + soff, mr: smr }, End { addr: dst.addr() + doff, mr: rmr });
            transfer(&mut s, a, b, len, |_, _| {});
            let got = dst.read(doff - 1, len + 2);
            assert_same(&got[1..=len], &data, &format!("{from:?}->{to:?} {len} bytes"));
            assert_eq!((got[0], got[len + 1]), (0, 0), "{from:?}->{to:?} {len} bytes: neighbours untouched");
        }
        assert!(!s.net.needs_polling(), "every copy was seen finished, nothing left to poll");
        s.tx.dereg_mr(smr);
        s.rx.dereg_mr(rmr);
    }
}

/// Segments of `lens` (cycled) making up `total` bytes, `gap` bytes apart from `base` on.
fn segments(base: usize, total: usize, lens: &[usize], gap: usize) -> Vec<IoSeg> {
    let (mut at, mut left, mut out) = (base, total, Vec::new());
    for &len in lens.iter().cycle() {
        if left == 0 {
            break;
        }
        let len = len.min(left);
        out.push(IoSeg { addr: at, len });
        at += len + gap;
        left -= len;
    }
    out
}

/// A vectored device request is gathered into its slot and a vectored device receive scattered out
/// of it, by the segment kernel (`auto`: these segments are small) or with a copy per segment
/// (`copies`, as where the kernel cannot be built); host segments go to the socket transport as
/// they are. Each side cuts the same bytes differently.
#[test]
fn vectored_requests_gather_and_scatter_through_the_slots() {
    use uccl_tcpx::StagingGather;
    use uccl_tcpx::internal::cuda::ring::segment_copy_counts;
    if no_gpu() || common::gpu::no_nvrtc() {
        return;
    }
    let (slot, total) = (256usize << 10, 250_000usize);
    for mode in [StagingGather::Auto, StagingGather::Copies] {
        for (from, to) in
            [(Side::Gpu, Side::Gpu), (Side::Gpu, Side::Host), (Side::Host, Side::Gpu), (Side::Host, Side::Host)]
        {
            let what = format!("{mode:?} {from:?}->{to:?}");
            let tuning = StagingConfig { gather: mode, ..StagingConfig::default() };
            let mut s = staged_with(StagingParams { tuning, ..StagingParams::new(slot, 4) });
            let mut src = Mem::new(from, 2 * total);
            let mut dst = Mem::new(to, 2 * total);
            let (smr, rmr) = register(&mut s, &src, &dst);
            let data = pattern(2 * total, 7);
            src.write(0, &data);
            dst.clear();
            let send = segments(src.addr() + 1, total, &[4096, 1, 30_001], 100);
            let recv = segments(dst.addr() + 3, total, &[10_000, 4095], 64);
            // Each side's segments in two runs of two registrations of its buffer, as a chunk that
            // crosses from one region into the next names them.
            let (smr2, rmr2) = register(&mut s, &src, &dst);
            let halves = |n: usize, a, b| [MrRun { segs: n / 2, mr: a }, MrRun { segs: n - n / 2, mr: b }];
            let (send_runs, recv_runs) = (halves(send.len(), smr, smr2), halves(recv.len(), rmr2, rmr));
            let before = segment_copy_counts();
            // SAFETY: both buffers outlive the requests, which are tested to completion below.
            let r = unsafe { s.rx.irecvv(&recv, &recv_runs) }.unwrap().unwrap();
            // SAFETY: as above.
            let t = unsafe { s.tx.isendv(&send, &send_runs) }.unwrap().unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let (mut sent, mut got) = (None, None);
            while sent.is_none() || got.is_none() {
                if sent.is_none() {
                    sent = s.tx.test(t).unwrap();
                }
                if got.is_none() {
                    got = s.rx.test(r).unwrap();
                }
                assert!(Instant::now() < deadline, "{what}: vectored request stuck");
            }
            assert_eq!((sent, got), (Some(total), Some(total)), "{what}");
            s.rx.irecv_consumed(r).unwrap();
            // One gather at a GPU source, one scatter at a GPU destination, each on the path the
            // mode names (at least: other tests of this binary may move vectors meanwhile).
            let staged = u64::from(from == Side::Gpu) + u64::from(to == Side::Gpu);
            let after = segment_copy_counts();
            let (moved, path) = match mode {
                StagingGather::Copies => (after.by_copies - before.by_copies, "one copy per segment"),
                _ => (after.by_kernel - before.by_kernel, "the segment kernel"),
            };
            assert!(moved >= staged, "{what}: {moved} of {staged} staged chunks went through {path}");
            let gather = |m: &Mem, segs: &[IoSeg]| -> Vec<u8> {
                segs.iter().flat_map(|g| m.read(g.addr - m.addr(), g.len)).collect()
            };
            assert_same(&gather(&dst, &recv), &gather(&src, &send), &what);
            let end = recv.last().map(|g| g.addr + g.len - dst.addr()).unwrap();
            let whole = dst.read(0, end + 1);
            let mut covered = vec![false; whole.len()];
            for g in &recv {
                covered[g.addr - dst.addr()..g.addr - dst.addr() + g.len].fill(true);
            }
            assert!(whole.iter().zip(&covered).all(|(&b, &c)| c || b == 0), "{what}: gaps untouched");
            // A device request over its slot's size is refused, not truncated.
            if from == Side::Gpu {
                let big = segments(src.addr(), slot + 1, &[slot / 2], 0);
                // SAFETY: refused before anything is posted.
                let refused = unsafe { s.tx.isendv(&big, &MrRun::all(&big, smr)) };
                assert_eq!(refused.unwrap_err().status(), UcclStatus::ErrInvalidParam);
            }
            for (smr, rmr) in [(smr, rmr), (smr2, rmr2)] {
                s.tx.dereg_mr(smr);
                s.rx.dereg_mr(rmr);
            }
        }
    }
}

#[test]
fn every_staging_tuning_moves_the_same_bytes() {
    if no_gpu() {
        return;
    }
    let tuning = |streams, ahead| StagingConfig { streams, ahead, ..StagingConfig::default() };
    let tunings = [StagingConfig::default(), tuning(1, 0), tuning(1, 2), tuning(3, 1), tuning(2, 3)];
    let sizes = [1usize, (256 << 10) + 7, (3 << 20) + 5];
    let max = sizes.iter().max().unwrap() + 64;
    for tuning in tunings {
        for (from, to) in [(Side::Gpu, Side::Gpu), (Side::Gpu, Side::Host), (Side::Host, Side::Gpu)] {
            let mut s = staged_with(StagingParams { tuning, ..StagingParams::new(64 << 10, 8) });
            let mut src = Mem::new(from, max);
            let mut dst = Mem::new(to, max);
            let (smr, rmr) = register(&mut s, &src, &dst);
            for (k, &len) in sizes.iter().enumerate() {
                let data = pattern(len, k as u64 + 7);
                src.write(k, &data);
                dst.clear();
                let (a, b) = (End { addr: src.addr() + k, mr: smr }, End { addr: dst.addr() + 2 * k, mr: rmr });
                transfer(&mut s, a, b, len, |_, _| {});
                assert_same(&dst.read(2 * k, len), &data, &format!("{tuning:?} {from:?}->{to:?} {len} bytes"));
            }
            assert!(!s.net.needs_polling(), "{tuning:?}: every copy was seen finished, nothing left to poll");
            s.tx.dereg_mr(smr);
            s.rx.dereg_mr(rmr);
        }
    }
}

#[test]
fn staged_receives_are_written_back_with_the_knob_and_only_then() {
    if no_gpu() {
        return;
    }
    common::ChildTest::new("written_back_process").ignored().run_within(Duration::from_secs(300));
}

/// In a process of its own: the count of written-back bytes is process-wide.
#[test]
#[ignore = "runs as the child process of staged_receives_are_written_back_with_the_knob_and_only_then"]
fn written_back_process() {
    use uccl_tcpx::internal::transport::socket::written_back_bytes;
    assert!(
        common::is_child("written_back_process"),
        "runs as the child of staged_receives_are_written_back_with_the_knob_and_only_then"
    );
    let (slot, len) = (1usize << 20, (3 << 20) + 7);
    for write_back in [true, false] {
        let tuning = StagingConfig { write_back, ..StagingConfig::default() };
        for (from, to) in [(Side::Gpu, Side::Gpu), (Side::Host, Side::Gpu), (Side::Gpu, Side::Host)] {
            for window in [1, WINDOW] {
                let what = format!("write-back {write_back}, {from:?}->{to:?}, window {window}");
                let mut s = staged_with(StagingParams { tuning, ..StagingParams::new(slot, 8) });
                let mut src = Mem::new(from, len);
                let mut dst = Mem::new(to, len);
                let (smr, rmr) = register(&mut s, &src, &dst);
                let data = pattern(len, u64::from(write_back) + window as u64);
                src.write(0, &data);
                dst.clear();
                let before = written_back_bytes();
                let (a, b) = (End { addr: src.addr(), mr: smr }, End { addr: dst.addr(), mr: rmr });
                transfer_in(&mut s, window, a, b, len, |_, _| {});
                let moved = written_back_bytes() - before;
                assert_same(&dst.read(0, len), &data, &what);
                let expect = match (write_back && to == Side::Gpu, window) {
                    (false, _) => 0,
                    // Each receive alone: every staged byte written back once (x86 hosts all have
                    // an instruction for it: the library's unit tests check that).
                    (true, 1) => len,
                    // All four receives posted before any byte came: only the last two (1 MiB and
                    // 7 bytes) had at most one posted behind them.
                    (true, _) => len - 2 * slot,
                };
                assert_eq!(moved, expect as u64, "{what}: bytes written back");
                s.tx.dereg_mr(smr);
                s.rx.dereg_mr(rmr);
            }
        }
    }
}

#[test]
fn quarter_gigabyte_gpu_to_gpu_in_4_mib_slots() {
    if no_gpu() {
        return;
    }
    let len = 256 << 20;
    let mut s = staged(4 << 20, 16);
    let mut src = Mem::new(Side::Gpu, len);
    let dst = Mem::new(Side::Gpu, len);
    let (smr, rmr) = register(&mut s, &src, &dst);
    let data = pattern(len, 99);
    src.write(0, &data);
    let start = Instant::now();
    transfer(&mut s, End { addr: src.addr(), mr: smr }, End { addr: dst.addr(), mr: rmr }, len, |_, _| {});
    let secs = start.elapsed().as_secs_f64();
    println!("staged comm pair, GPU->GPU 256 MiB in 4 MiB slots: {:.2} GB/s", len as f64 / secs / 1e9);
    assert_same(&dst.read(0, len), &data, "256 MiB GPU->GPU");
}

/// A staged comm pair over loopback made after the net was told its GPU (as the engine tells it
/// before its first comm), `slot`-byte slots.
fn staged_for_gpu(gpu: i32, slot: usize) -> Staged {
    let socket = common::socket::socket_net(SocketConfig::default());
    let net = StagedNet::wrap(Arc::new(socket), StagingParams::new(slot, 8)).unwrap();
    net.set_gpu(&uccl_tcpx::internal::cuda::Gpu::open(gpu).unwrap());
    let (mut tx, mut rx, listen) = common::comm::comm_pair(&*net, 0);
    // As the engine asks of a connection whose GPU memory takes its channels.
    tx.make_ahead();
    rx.make_ahead();
    Staged { net, tx, rx, _listen: listen, slot }
}

/// Moves each of `sizes` from `src` to `dst` (registered with the pair) at odd offsets and checks
/// every byte and the neighbours.
fn every_size(s: &mut Staged, src: &mut Mem, dst: &mut Mem, sizes: &[usize], what: &str) {
    let (smr, rmr) = register(s, src, dst);
    for (k, &len) in sizes.iter().enumerate() {
        let (soff, doff) = (1 + k % 7, 3 + (k * 5) % 11);
        let data = pattern(len, k as u64 + 40);
        src.write(soff, &data);
        dst.clear();
        transfer(s, End { addr: src.addr() + soff, mr: smr }, End { addr: dst.addr() + doff, mr: rmr }, len, |_, _| {});
        let got = dst.read(doff - 1, len + 2);
        assert_same(&got[1..=len], &data, &format!("{what}: {len} bytes"));
        assert_eq!((got[0], got[len + 1]), (0, 0), "{what}: {len} bytes: neighbours untouched");
    }
    s.tx.dereg_mr(smr);
    s.rx.dereg_mr(rmr);
}

/// Comms made once the net knows its GPU, asked to make ahead, warm its pool with a ring each:
/// their first device transfer allocates nothing, takes a ring and gives it back once done. Comms
/// made before make theirs at first use, which the count sees, and take them from their pool after
/// that.
#[test]
fn comms_made_once_the_gpu_is_known_make_their_rings_with_them() {
    use uccl_tcpx::internal::transport::staged::{RingCounts, ring_counts};
    if no_gpu() {
        return;
    }
    let sizes = [(64 << 10) + 1, 256 << 10, (3 << 20) + 5];
    let max = sizes.iter().max().unwrap() + 64;
    let before = ring_counts();
    let mut early = staged(1 << 20, 8);
    assert_eq!(ring_counts(), before, "no GPU known: nothing made with the comms");
    let mut s = staged_for_gpu(0, 1 << 20);
    let made = ring_counts();
    assert_eq!(made.at_connect, before.at_connect + 2, "both comms made their ring: {made:?}");
    let (mut src, mut dst) = (Mem::new(Side::Gpu, max), Mem::new(Side::Gpu, max));
    every_size(&mut s, &mut src, &mut dst, &sizes, "GPU->GPU, rings made with the comms");
    let used = ring_counts();
    let made_since = |c: RingCounts| (c.at_connect, c.on_first_use, c.lanes_added, c.freed);
    assert_eq!(made_since(used), made_since(made), "the first transfers made no ring and no lane: {used:?}");
    assert!(used.taken >= made.taken + 2 * sizes.len() as u64, "each transfer took the rings: {used:?}");
    assert_eq!(used.taken - made.taken, used.given_back - made.given_back, "and gave every one back");
    every_size(&mut early, &mut src, &mut dst, &sizes, "GPU->GPU, rings made at first use");
    let late = ring_counts();
    assert_eq!(late.on_first_use, made.on_first_use + 2, "the comms made before made theirs now");
    assert!(late.taken >= used.taken + 2 * (sizes.len() as u64 - 1), "and took them from their pool after");
}

/// An engine's idle staging is bounded whatever its connections: many comm pairs on one net, each
/// moving GPU memory in turn, share the pool's rings, and once the rings past the bound lingered
/// they are freed, leaving the bound (here 3 rings' worth of `UCCL_TCPX_STAGING_POOL`), all idle;
/// with a pool of 0 none is left; closing the comms frees the rest. Counted by the process's ring
/// tally, not by time.
#[test]
fn idle_staging_is_bounded_by_the_pool_whatever_the_connections() {
    use uccl_tcpx::internal::transport::staged::ring_counts;
    if no_gpu() {
        return;
    }
    let (slot, slots, len) = (1usize << 20, 4usize, (3usize << 20) + 11);
    for keep in [3usize, 0] {
        let tuning = StagingConfig { pool: (keep * slot * slots) as u32, ..StagingConfig::default() };
        let socket = common::socket::socket_net(SocketConfig::default());
        let net =
            StagedNet::wrap(Arc::new(socket), StagingParams { tuning, ..StagingParams::new(slot, slots) }).unwrap();
        net.set_gpu(&uccl_tcpx::internal::cuda::Gpu::open(0).unwrap());
        let before = ring_counts();
        let mut pairs: Vec<Staged> = (0..8)
            .map(|_| {
                let (mut tx, mut rx, listen) = common::comm::comm_pair(&*net, 0);
                tx.make_ahead();
                rx.make_ahead();
                Staged { net: net.clone(), tx, rx, _listen: listen, slot }
            })
            .collect();
        let warmed = ring_counts();
        assert_eq!(warmed.at_connect - before.at_connect, keep as u64, "pool {keep}: rings made ahead");
        let (mut src, mut dst) = (Mem::new(Side::Gpu, len + 64), Mem::new(Side::Gpu, len + 64));
        for (k, s) in pairs.iter_mut().enumerate() {
            every_size(s, &mut src, &mut dst, &[len], &format!("pool {keep}, pair {k}"));
        }
        let after = ring_counts();
        let past = after.live() - before.live();
        assert!(past <= keep.max(2) as u64, "pool {keep}: the bound or the two rings a pair used: {after:?}");
        // Rings past the bound linger a moment (a steady load reuses them), then go: the progress
        // thread of an engine trims them as it parks; here the test asks the net.
        testkit::wait_until("the rings past the bound freed", testkit::PATIENCE, || {
            net.trim_staging();
            ring_counts().live() - before.live() == keep as u64
        });
        let moved = after.taken - before.taken + after.on_first_use - before.on_first_use;
        assert!(moved >= 16, "every comm took a ring or made one: {moved}");
        assert!(!net.needs_polling(), "every copy was seen finished");
        drop(pairs);
        assert_eq!(ring_counts().live(), before.live(), "pool {keep}: the closed comms left no ring");
    }
}

/// A comm of the net of GPU 0 stages memory of GPU 1 on a lane of that GPU's streams and events
/// (made once per ring, when the ring first stages that GPU's memory), every direction between the
/// two GPUs and host memory, byte for byte.
#[test]
fn a_ring_stages_memory_of_another_gpu_on_a_lane_of_its_own() {
    use uccl_tcpx::internal::transport::staged::ring_counts;
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    let sizes = [1usize, 4097, (64 << 10) + 1, (1 << 20) - 3, (4 << 20) + 3];
    let max = sizes.iter().max().unwrap() + 64;
    let mem = |gpu: Option<i32>| match gpu {
        Some(g) => Mem::on_gpu(g, max),
        None => Mem::new(Side::Host, max),
    };
    for (from, to) in [(Some(1), Some(0)), (Some(0), Some(1)), (Some(1), Some(1)), (Some(1), None), (None, Some(1))] {
        let mut s = staged_for_gpu(0, 1 << 20);
        let before = ring_counts();
        let (mut src, mut dst) = (mem(from), mem(to));
        every_size(&mut s, &mut src, &mut dst, &sizes, &format!("GPU {from:?} -> GPU {to:?} on comms of GPU 0"));
        let lanes = [from, to].iter().filter(|g| **g == Some(1)).count() as u64;
        let after = ring_counts();
        // The pair's two rings move between its comms through the pool: at most one lane each.
        let added = after.lanes_added - before.lanes_added;
        assert!((lanes..=2).contains(&added), "{from:?} -> {to:?}: {added} lanes; {lanes} comms stage GPU 1");
        assert_eq!(after.on_first_use, before.on_first_use, "{from:?} -> {to:?}: the rings were made with the comms");
        assert!(!s.net.needs_polling(), "every copy was seen finished, on whichever lane");
    }
}

#[test]
fn unregistered_device_pointers_are_staged_by_what_cuda_says_they_are() {
    if no_gpu() {
        return;
    }
    let mut s = staged(64 << 10, 4);
    let len = (1 << 20) + 17;
    let mut src = Mem::new(Side::Gpu, len + 8);
    let dst = Mem::new(Side::Gpu, len + 8);
    let data = pattern(len, 5);
    src.write(7, &data);
    // Handle 0 is "no registration", what the engine posts its own small buffers with.
    let none = MrHandle(0);
    transfer(&mut s, End { addr: src.addr() + 7, mr: none }, End { addr: dst.addr() + 1, mr: none }, len, |_, _| {});
    assert_same(&dst.read(1, len), &data, "GPU->GPU without registrations");
}

#[test]
fn receive_is_in_place_when_reported_and_send_source_is_free_after_done() {
    if no_gpu() {
        return;
    }
    let chunk = 8 << 10;
    let len = 4 * chunk + 5;
    let mut s = staged(chunk, 4);
    let mut src = Mem::new(Side::Gpu, len);
    let dst = Mem::new(Side::Gpu, len);
    let (smr, rmr) = register(&mut s, &src, &dst);
    let data = pattern(len, 11);
    src.write(0, &data);

    // All sends finish before any receive is posted (40 KiB fit in the loopback socket buffers): once a send is
    // reported done its source may change without the receiver seeing it.
    let mut sends = Vec::new();
    for i in 0..len.div_ceil(chunk) {
        let (off, l) = (i * chunk, chunk.min(len - i * chunk));
        // SAFETY: [off, off + l) lies inside src's len bytes, and every send is tested to completion below
        // before src is rewritten.
        sends.push(unsafe { s.tx.isend((src.addr() + off) as *const u8, l, smr) }.unwrap().expect("slot free"));
        if sends.len() == 4 {
            // The ring has 4 slots: wait for them before posting more.
            for r in sends.drain(..) {
                let deadline = Instant::now() + testkit::PATIENCE;
                while s.tx.test(r).unwrap().is_none() {
                    assert!(Instant::now() < deadline, "send stuck");
                }
            }
        }
    }
    for r in sends {
        let deadline = Instant::now() + testkit::PATIENCE;
        while s.tx.test(r).unwrap().is_none() {
            assert!(Instant::now() < deadline, "send stuck");
        }
    }
    if let Mem::Device(d) = &mut src {
        d.fill(0xEE).unwrap();
    }

    // Each receive is checked the moment it is reported done.
    let mut checked = 0;
    let mut posted = VecDeque::new();
    let mut next = 0;
    let n = len.div_ceil(chunk);
    let deadline = Instant::now() + Duration::from_secs(30);
    while checked < n {
        while next < n && posted.len() < 4 {
            let (off, l) = (next * chunk, chunk.min(len - next * chunk));
            // SAFETY: [off, off + l) lies inside dst's len bytes, and every receive is tested to completion
            // in this loop before dst is dropped.
            match unsafe { s.rx.irecv((dst.addr() + off) as *mut u8, l, rmr) }.unwrap() {
                Some(r) => posted.push_back((r, off, l)),
                None => break,
            }
            next += 1;
        }
        let &(r, off, l) = posted.front().unwrap();
        if let Some(size) = s.rx.test(r).unwrap() {
            assert_eq!(size, l);
            assert_same(&dst.read(off, l), &data[off..off + l], &format!("chunk at {off} when reported done"));
            s.rx.irecv_consumed(r).unwrap();
            posted.pop_front();
            checked += 1;
        }
        assert!(Instant::now() < deadline, "receives stuck at {checked} of {n}");
    }
}

#[test]
fn misuse_is_refused_with_a_clear_error() {
    if no_gpu() {
        return;
    }
    let mut s = staged(64 << 10, 4);
    let dev = Mem::new(Side::Gpu, 1 << 20);
    let host = Mem::new(Side::Host, 1 << 20);
    let invalid = |r: uccl_tcpx::Result<MrHandle>, what: &str| {
        let err = r.expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}: {err}");
    };
    invalid(s.tx.reg_mr(host.addr(), host.len(), MemKind::Cuda { device: 0 }), "host memory registered as GPU");
    invalid(s.rx.reg_mr(dev.addr(), dev.len(), MemKind::Host), "GPU memory registered as host");
    invalid(s.tx.reg_mr(dev.addr(), dev.len(), MemKind::Cuda { device: 1 }), "GPU memory of another ordinal");

    let smr = s.tx.reg_mr(dev.addr(), dev.len(), MemKind::Cuda { device: 0 }).unwrap();
    // SAFETY: the chunk is refused for exceeding a slot before any byte is read.
    let err = unsafe { s.tx.isend(dev.addr() as *const u8, (64 << 10) + 1, smr) }.unwrap_err();
    assert!(err.message().contains("staging slot"), "a chunk larger than a slot: {err}");
    // SAFETY: the range is refused as outside the registration before any byte is read.
    let err = unsafe { s.tx.isend((dev.addr() + dev.len() - 8) as *const u8, 16, smr) }.unwrap_err();
    assert!(err.message().contains("outside its GPU registration"), "{err}");
    // Refused posts leave the comm usable.
    let mut dst = Mem::new(Side::Host, 4096);
    let data = pattern(4096, 3);
    let mut devw = dev;
    devw.write(0, &data);
    let rmr = s.rx.reg_mr(dst.addr(), dst.len(), MemKind::Host).unwrap();
    transfer(&mut s, End { addr: devw.addr(), mr: smr }, End { addr: dst.addr(), mr: rmr }, 4096, |_, _| {});
    assert_same(&dst.read(0, 4096), &data, "after refusals");
    dst.clear();
}

/// The small copier behind inline transfers, in every mode: sizes around the kernel's 8-byte limit
/// and up to 8 KiB, at every alignment, ending exactly at the buffer's end; neighbouring bytes
/// stay untouched, and the caller's current context is the same afterwards.
#[test]
fn small_copies_every_mode_size_and_alignment() {
    use uccl_tcpx::internal::cuda::small_copy::{MAX_SMALL_COPY, SmallCopier, SmallCopyMode};
    if no_gpu() {
        return;
    }
    let gpu = uccl_tcpx::internal::cuda::Gpu::open(0).unwrap();
    let total = 3 * MAX_SMALL_COPY;
    let mut dev = uccl_tcpx::internal::cuda::DeviceBuffer::new(0, total).unwrap();
    let before = cudarc::driver::result::ctx::get_current().unwrap();
    for mode in [SmallCopyMode::Legacy, SmallCopyMode::Dma] {
        let copier = SmallCopier::new(&gpu, mode).unwrap();
        for len in [1usize, 2, 3, 7, 8, 9, 15, 16, 64, 4095, 4096, MAX_SMALL_COPY] {
            for offset in [0usize, 1, 3, 5, 7, 8, MAX_SMALL_COPY + 13, total - len] {
                dev.fill(0xee).unwrap();
                let payload = pattern(len, (len * 31 + offset) as u64);
                // SAFETY: offset + len <= total (the last offset is total - len), so the range lies inside
                // dev, which only this thread uses.
                unsafe { copier.to_device(dev.addr() + offset, &payload).unwrap() };
                let all = dev.to_vec().unwrap();
                assert_same(&all[offset..offset + len], &payload, "small copy to the device");
                assert!(all[..offset].iter().all(|&b| b == 0xee), "{mode:?}: bytes before +{offset} changed");
                assert!(
                    all[offset + len..].iter().all(|&b| b == 0xee),
                    "{mode:?}: bytes after +{offset}+{len} changed"
                );
                let mut back = vec![0u8; len];
                // SAFETY: offset + len <= total, so the len bytes read lie inside dev.
                unsafe { copier.from_device(&mut back, dev.addr() + offset).unwrap() };
                assert_same(&back, &payload, "small copy from the device");
            }
        }
        let mut big = vec![0u8; MAX_SMALL_COPY + 1];
        // SAFETY: the copy is refused for exceeding MAX_SMALL_COPY before any byte moves; dev holds 3 *
        // MAX_SMALL_COPY bytes anyway.
        let err = unsafe { copier.from_device(&mut big, dev.addr()) }.unwrap_err();
        assert!(err.message().contains("exceeds"), "{err}");
        // SAFETY: the copy is refused for exceeding MAX_SMALL_COPY before any byte moves; dev holds 3 *
        // MAX_SMALL_COPY bytes anyway.
        assert!(unsafe { copier.to_device(dev.addr(), &big) }.is_err());
    }
    assert_eq!(cudarc::driver::result::ctx::get_current().unwrap(), before, "the caller's context changed");
}

/// Started copies: each through a slot of its own, as many at once as there are slots (one more
/// is declined, for the caller to copy synchronously), bytes landing at their offsets and loads
/// bringing theirs; a dropped copy's slot is free again, a legacy copier starts none, and the
/// caller's context is the same afterwards.
#[test]
fn started_small_copies_take_a_slot_each_and_land() {
    use uccl_tcpx::internal::cuda::small_copy::{COPY_SLOTS, MAX_SMALL_COPY, SmallCopier, SmallCopyMode};
    if no_gpu() {
        return;
    }
    let gpu = uccl_tcpx::internal::cuda::Gpu::open(0).unwrap();
    let total = (COPY_SLOTS + 1) * MAX_SMALL_COPY;
    let dev = uccl_tcpx::internal::cuda::DeviceBuffer::new(0, total).unwrap();
    let before = cudarc::driver::result::ctx::get_current().unwrap();
    let copier = Arc::new(SmallCopier::new(&gpu, SmallCopyMode::Dma).unwrap());
    let lens: Vec<usize> = (0..COPY_SLOTS).map(|i| MAX_SMALL_COPY - i * 4093).collect();
    let data: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &n)| pattern(n, 90 + i as u64)).collect();
    // SAFETY: each copy's range [i * MAX_SMALL_COPY, + len) lies inside dev and is this copy's alone.
    let stores: Vec<_> = (0..COPY_SLOTS)
        .map(|i| unsafe { copier.start_to_device(dev.addr() + i * MAX_SMALL_COPY, &data[i]) }.unwrap().expect("a slot"))
        .collect();
    // SAFETY: as above, past every other copy's range.
    let extra = unsafe { copier.start_to_device(dev.addr() + COPY_SLOTS * MAX_SMALL_COPY, &data[0]) }.unwrap();
    assert!(extra.is_none(), "a copy started with every slot taken");
    assert_eq!(copier.started(), COPY_SLOTS as u64);
    for s in &stores {
        s.wait().unwrap();
        assert!(s.done().unwrap());
    }
    drop(stores);
    let all = dev.to_vec().unwrap();
    for (i, d) in data.iter().enumerate() {
        assert_same(&all[i * MAX_SMALL_COPY..i * MAX_SMALL_COPY + d.len()], d, &format!("started store {i}"));
    }
    let loads: Vec<_> = (0..COPY_SLOTS)
        .map(|i| {
            // SAFETY: the ranges lie inside dev, written above and not written meanwhile.
            unsafe { copier.start_from_device(dev.addr() + i * MAX_SMALL_COPY, lens[i]) }.unwrap().expect("slots back")
        })
        .collect();
    for (i, l) in loads.iter().enumerate() {
        l.wait().unwrap();
        assert_same(l.loaded(), &data[i], &format!("started load {i}"));
    }
    let legacy = Arc::new(SmallCopier::new(&gpu, SmallCopyMode::Legacy).unwrap());
    // SAFETY: inside dev.
    assert!(unsafe { legacy.start_to_device(dev.addr(), &data[0]) }.unwrap().is_none(), "legacy copiers start none");
    assert_eq!(cudarc::driver::result::ctx::get_current().unwrap(), before, "the caller's context changed");
}

/// The copier the engine uses is warmed when it is made: copies through its slots (one each way)
/// ran before any transfer asked for one.
#[test]
fn the_engines_copier_is_warmed_when_made() {
    if no_gpu() {
        return;
    }
    let gpu = uccl_tcpx::internal::cuda::Gpu::open(0).unwrap();
    let copier = uccl_tcpx::internal::cuda::small_copy::SmallCopier::for_gpu(&gpu).unwrap();
    assert!(copier.started() >= 2, "{} copies started", copier.started());
}

/// Threads sharing one GPU's copier (its bounce buffer is one, behind a lock) never see each
/// other's bytes.
#[test]
fn small_copies_from_concurrent_callers_stay_apart() {
    if no_gpu() {
        return;
    }
    let gpu = uccl_tcpx::internal::cuda::Gpu::open(0).unwrap();
    let copier = uccl_tcpx::internal::cuda::small_copy::SmallCopier::for_gpu(&gpu).unwrap();
    let threads = 6;
    let dev = Arc::new(uccl_tcpx::internal::cuda::DeviceBuffer::new(0, threads * 8192).unwrap());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (copier, dev) = (copier.clone(), dev.clone());
            std::thread::spawn(move || {
                for i in 0..400usize {
                    let len = [8usize, 5, 1000, 8192][i % 4];
                    let at = dev.addr() + t * 8192 + (8192 - len);
                    let payload = pattern(len, (t * 1000 + i) as u64);
                    // SAFETY: at + len = dev.addr() + (t + 1) * 8192, so the range lies in this thread's own
                    // 8 KiB of dev, which no other thread touches.
                    unsafe { copier.to_device(at, &payload).unwrap() };
                    let mut back = vec![0u8; len];
                    // SAFETY: the range lies in this thread's own 8 KiB of dev (see above).
                    unsafe { copier.from_device(&mut back, at).unwrap() };
                    assert_eq!(back, payload, "thread {t} iteration {i}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Copies queued back to back on one ring each land, in and out, on one stream or several. A
/// ring locks each slot at its first copy, none before; slots of part of a page, all at once.
#[test]
fn every_ring_copy_lands() {
    use uccl_tcpx::internal::cuda::{DeviceBuffer, Gpu, StagingRing};
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let (slot_size, slots) = (64 << 10, 8usize);
    for streams in [1, 3] {
        let mut ring = StagingRing::new(&gpu, slot_size, slots, streams).unwrap();
        assert_eq!(ring.pinned_slots(), 0, "a new ring locks no slot");
        let want = pattern(slot_size * slots, 77);
        let mut src = DeviceBuffer::new(0, want.len()).unwrap();
        src.copy_from_host(0, &want).unwrap();
        let dst = DeviceBuffer::new(0, want.len()).unwrap();
        let wait_all = |ring: &StagingRing, taken: &[usize]| {
            let deadline = Instant::now() + testkit::PATIENCE;
            while !taken.iter().all(|&s| ring.copied(s).unwrap()) {
                assert!(Instant::now() < deadline, "{streams} streams: staging copies did not finish");
            }
        };
        let taken: Vec<usize> = (0..slots).map(|_| ring.take().unwrap()).collect();
        assert!(ring.take().is_none(), "a full ring hands out no slot");
        for (i, &slot) in taken.iter().enumerate() {
            // SAFETY: src holds slots * slot_size bytes, so slot i's source lies inside it; src outlives the
            // wait below, and each slot was taken above.
            unsafe { ring.copy_in(slot, src.addr() + i * slot_size, slot_size).unwrap() };
            assert_eq!(ring.pinned_slots(), i + 1, "slots locked as their first copies come");
        }
        wait_all(&ring, &taken);
        for (i, &slot) in taken.iter().enumerate() {
            // SAFETY: wait_all saw this slot's copy_in finish, so its slot_size bytes are final, and no copy
            // runs on the slot while `got` lives.
            let got = unsafe { std::slice::from_raw_parts(ring.slot_ptr(slot), slot_size) };
            assert_same(got, &want[i * slot_size..(i + 1) * slot_size], "slot after copy_in");
        }
        for (i, &slot) in taken.iter().enumerate() {
            // SAFETY: dst holds slots * slot_size bytes, so slot i's destination lies inside it; nothing else
            // reads dst before wait_all below, and every slot's bytes are final (its copy_in finished).
            unsafe { ring.copy_out(slot, dst.addr() + i * slot_size, slot_size).unwrap() };
        }
        wait_all(&ring, &taken);
        assert_same(&dst.to_vec().unwrap(), &want, "device memory after copy_out");
        assert_eq!(ring.pinned_slots(), slots, "copies out lock nothing more");
        drop(ring);
    }
    let odd = 5000;
    let mut ring = StagingRing::new(&gpu, odd, 3, 1).unwrap();
    assert_eq!(ring.pinned_slots(), 3, "slots of part of a page are locked at once");
    let want = pattern(odd, 78);
    let mut src = DeviceBuffer::new(0, odd).unwrap();
    src.copy_from_host(0, &want).unwrap();
    let dst = DeviceBuffer::new(0, odd).unwrap();
    let slot = (0..2).map(|_| ring.take().unwrap()).last().unwrap();
    // SAFETY: src and dst hold `odd` bytes and outlive the waits; the slot was taken above and its
    // bytes are final once copy_in is seen done.
    unsafe { ring.copy_in(slot, src.addr(), odd).unwrap() };
    wait_copied(&ring, slot, "copy into a slot of part of a page");
    // SAFETY: as above; nothing else reads dst before the wait below.
    unsafe { ring.copy_out(slot, dst.addr(), odd).unwrap() };
    wait_copied(&ring, slot, "copy out of a slot of part of a page");
    assert_same(&dst.to_vec().unwrap(), &want, "device memory through a slot of part of a page");
}

/// A ring locked ahead ends with every slot locked, by the background locker or by a copy that got
/// there first; copies taken meanwhile land; a ring dropped while the locker works on it
/// is freed without harm.
#[test]
fn a_ring_locked_ahead_locks_every_slot() {
    use uccl_tcpx::internal::cuda::slots::locked_ahead;
    use uccl_tcpx::internal::cuda::{DeviceBuffer, Gpu, StagingRing};
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let (slot_size, slots) = (2 << 20, 8usize);
    let before = locked_ahead();
    let mut ring = StagingRing::new(&gpu, slot_size, slots, 2).unwrap();
    let want = pattern(slot_size * 2, 79);
    let mut src = DeviceBuffer::new(0, want.len()).unwrap();
    src.copy_from_host(0, &want).unwrap();
    let dst = DeviceBuffer::new(0, want.len()).unwrap();
    ring.lock_ahead();
    let taken: Vec<usize> = (0..2).map(|_| ring.take().unwrap()).collect();
    for (i, &slot) in taken.iter().enumerate() {
        // SAFETY: src holds two slots' bytes, slot i's lie inside it; src outlives the waits below.
        unsafe { ring.copy_in(slot, src.addr() + i * slot_size, slot_size).unwrap() };
    }
    for &slot in &taken {
        wait_copied(&ring, slot, "copy into a slot while the locker works");
    }
    for (i, &slot) in taken.iter().enumerate() {
        // SAFETY: dst holds two slots' bytes; the slot's bytes are final (its copy_in finished).
        unsafe { ring.copy_out(slot, dst.addr() + i * slot_size, slot_size).unwrap() };
    }
    for &slot in &taken {
        wait_copied(&ring, slot, "copy out of a slot while the locker works");
    }
    assert_same(&dst.to_vec().unwrap(), &want, "device memory through slots locked meanwhile");
    wait_all_locked(&ring, "the ring locked ahead");
    // The copies locked at most the two slots they took; the locker, from the last down, the rest
    // (the count is the process's: other tests' rings only add to it).
    let by_locker = locked_ahead() - before;
    assert!(by_locker as usize >= slots - 2, "the locker locked {by_locker} of the {} slots no copy took", slots - 2);
    drop(ring);
    for _ in 0..4 {
        let ring = StagingRing::new(&gpu, slot_size, 32, 1).unwrap();
        ring.lock_ahead();
        drop(ring);
    }
}

/// The locker serves rings comms hold before idle ones, and leaves an idle ring alone while any
/// ring is held: its locking would hold the driver against the held rings' copies. Given back, the
/// held ring lets the idle one be locked.
#[test]
fn a_held_ring_is_locked_ahead_and_an_idle_one_waits_until_none_is_held() {
    use uccl_tcpx::internal::cuda::{Gpu, StagingRing};
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let idle = StagingRing::new(&gpu, 2 << 20, 8, 1).unwrap();
    let held = StagingRing::new(&gpu, 2 << 20, 8, 1).unwrap();
    held.hold(true);
    idle.lock_ahead();
    held.lock_ahead();
    wait_all_locked(&held, "the held ring");
    // Queued first, the idle ring had none of its slots taken: a ring was held before either was
    // queued (rings of other tests are dropped, and tests of this file run one at a time).
    assert_eq!(idle.pinned_slots(), 0, "the locker locked an idle ring while a ring was held");
    held.hold(false);
    wait_all_locked(&idle, "the idle ring, once no ring was held");
}

/// Chunks of at most `slot` bytes made of consecutive pieces (none split), as `(first, end)` indices.
fn chunks_of(pieces: &[(usize, usize)], slot: usize) -> Vec<(usize, usize)> {
    let (mut out, mut first, mut bytes) = (Vec::new(), 0, 0);
    for (i, &(_, len)) in pieces.iter().enumerate() {
        assert!(len <= slot, "a piece larger than a slot");
        if bytes + len > slot {
            out.push((first, i));
            (first, bytes) = (i, 0);
        }
        bytes += len;
    }
    out.push((first, pieces.len()));
    out
}

/// One ring gathers chunks of device pieces into its slots and scatters them back out into pieces
/// elsewhere, in every gather mode: every slot byte for byte, every destination byte (gaps and
/// the bytes a short scatter does not reach stay zero), and the path each chunk took counted
/// exactly. Shapes: KV-cache blocks (1024 x 16 KiB, 4 KiB apart), 1000 pieces of 1-5000 bytes at
/// odd offsets, 3000 pieces of 1-3 bytes (more tiles than one launch carries), and 4 x 512 KiB,
/// which `auto` leaves to copies.
#[test]
fn ring_gathers_and_scatters_many_pieces_in_every_mode() {
    use uccl_tcpx::StagingGather;
    use uccl_tcpx::internal::cuda::ring::{KERNEL_BELOW_MEAN_SEGMENT, SegmentCopyCounts};
    use uccl_tcpx::internal::cuda::{DeviceBuffer, Gpu, StagingRing};
    if no_gpu() || common::gpu::no_nvrtc() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let slot = 2 << 20;
    let mut rng = common::Rng::new("ring_gathers_and_scatters_many_pieces_in_every_mode");
    let shapes = [
        ("1024 x 16 KiB", blocks(1024, 16 << 10, 20 << 10, 0), blocks(1024, 16 << 10, 24 << 10, 4096)),
        ("1000 odd pieces", odd_pieces(&mut rng, 1000, 5000), odd_pieces(&mut rng, 1000, 5000)),
        ("3000 pieces of 1-3 bytes", odd_pieces(&mut rng, 3000, 3), odd_pieces(&mut rng, 3000, 3)),
        ("4 x 512 KiB", blocks(4, 512 << 10, (512 << 10) + 3, 1), blocks(4, 512 << 10, 600 << 10, 5)),
    ];
    for mode in [StagingGather::Auto, StagingGather::Kernel, StagingGather::Copies] {
        for streams in [1, 2] {
            let mut ring = StagingRing::new(&gpu, slot, 4, streams).unwrap();
            ring.set_gather(mode);
            let mut want = SegmentCopyCounts::default();
            for (name, from, to_lens) in &shapes {
                let what = format!("{mode:?}, {streams} streams, {name}");
                let src_len = span(from);
                let data = pattern(src_len, 3);
                let mut src = DeviceBuffer::new(0, src_len).unwrap();
                src.copy_from_host(0, &data).unwrap();
                for (first, end) in chunks_of(from, slot) {
                    let pieces = &from[first..end];
                    let len: usize = pieces.iter().map(|p| p.1).sum();
                    // The destination cuts the same bytes its own way (the first piece's offset
                    // and the pieces' lengths from to_lens, cycled), and a scatter shorter by 7
                    // bytes leaves the tail of the last reached piece alone.
                    let mut to = Vec::new();
                    let (mut at, mut left) = (to_lens[0].0, len);
                    for &(_, l) in to_lens.iter().cycle() {
                        if left == 0 {
                            break;
                        }
                        let l = l.min(left);
                        to.push((at, l));
                        (at, left) = (at + l + 3, left - l);
                    }
                    let s = ring.take().unwrap();
                    let segs: Vec<(usize, usize)> = pieces.iter().map(|&(o, l)| (src.addr() + o, l)).collect();
                    // SAFETY: every piece lies inside src, which outlives the wait below, and a tile
                    // names any address of it; the pieces add up to len; the slot is taken.
                    unsafe { ring.gather(s, len, segs.iter().copied(), true) }.unwrap();
                    wait_copied(&ring, s, &what);
                    // SAFETY: the gather into the slot finished (waited above) and nothing else writes it.
                    let got = unsafe { std::slice::from_raw_parts(ring.slot_ptr(s), len) };
                    let stream: Vec<u8> = pieces.iter().flat_map(|&(o, l)| data[o..o + l].iter().copied()).collect();
                    assert_same(got, &stream, &format!("{what}: slot after gathering pieces {first}..{end}"));
                    let short = len.saturating_sub(7).max(1);
                    let dst_len = span(&to) + 16;
                    let dst = DeviceBuffer::new(0, dst_len).unwrap();
                    let mut dst = common::gpu::Mem::Device(dst);
                    dst.clear();
                    let dsegs: Vec<(usize, usize)> = to.iter().map(|&(o, l)| (dst.addr() + o, l)).collect();
                    // SAFETY: every piece lies inside dst, which nothing else touches until the wait below,
                    // and a tile names any address of it; the pieces hold at least `short` bytes; the
                    // slot's bytes are final.
                    unsafe { ring.scatter(s, short, dsegs.iter().copied(), true) }.unwrap();
                    wait_copied(&ring, s, &what);
                    let expect = landed(&stream[..short], &[(0, short)], &to, dst_len);
                    assert_same(&dst.read(0, dst_len), &expect, &format!("{what}: scattered pieces {first}..{end}"));
                    ring.give_back();
                    // Chunks of one piece count on neither path.
                    for (count, bytes) in [(pieces.len(), len), (to.len(), short)] {
                        let kernel = match mode {
                            StagingGather::Copies => false,
                            StagingGather::Kernel => true,
                            StagingGather::Auto => bytes / count < KERNEL_BELOW_MEAN_SEGMENT,
                        };
                        if count >= 2 && kernel {
                            want.by_kernel += 1;
                        } else if count >= 2 {
                            want.by_copies += 1;
                        }
                    }
                }
                assert_eq!(ring.segment_copies(), want, "{what}: the path each chunk took");
            }
        }
    }
}

/// Waits, within the tests' patience, until every slot of `ring` is page-locked.
fn wait_all_locked(ring: &uccl_tcpx::internal::cuda::StagingRing, what: &str) {
    let deadline = Instant::now() + testkit::PATIENCE;
    while ring.pinned_slots() < ring.slots() {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} slots left unlocked",
            ring.slots() - ring.pinned_slots(),
            ring.slots()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn wait_copied(ring: &uccl_tcpx::internal::cuda::StagingRing, slot: usize, what: &str) {
    let deadline = Instant::now() + testkit::PATIENCE;
    while !ring.copied(slot).unwrap() {
        assert!(Instant::now() < deadline, "{what}: slot {slot}'s copies did not finish");
    }
}

/// Staging rings share their GPU's streams (`cuda::stream::shared_streams`): a stream costs the
/// GPU memory that the driver keeps once it is destroyed, so as many rings as the share has streams,
/// two streams each, held at once make no more than the share, and each still copies its own bytes:
/// every ring gathers a pattern of its own into a slot, all queued before any is waited for.
#[test]
fn rings_share_their_gpus_streams() {
    use uccl_tcpx::internal::cuda::stream::{SHARED_PER_GPU, shared_made};
    use uccl_tcpx::internal::cuda::{DeviceBuffer, Gpu, StagingRing};
    if no_gpu() {
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let len = 1 << 20;
    let mut rings: Vec<StagingRing> = (0..SHARED_PER_GPU).map(|_| StagingRing::new(&gpu, len, 2, 2).unwrap()).collect();
    assert!(shared_made(0) <= SHARED_PER_GPU, "{} streams for {SHARED_PER_GPU} rings of two", shared_made(0));
    let srcs: Vec<DeviceBuffer> = (0..rings.len())
        .map(|i| {
            let mut b = DeviceBuffer::new(0, len).unwrap();
            b.copy_from_host(0, &pattern(len, i as u64)).unwrap();
            b
        })
        .collect();
    let slots: Vec<usize> = rings
        .iter_mut()
        .zip(&srcs)
        .map(|(ring, src)| {
            let s = ring.take().unwrap();
            // SAFETY: the piece is all of src, which outlives the waits below; the slot is taken.
            unsafe { ring.gather(s, len, std::iter::once((src.addr(), len)), true) }.unwrap();
            s
        })
        .collect();
    for (i, (ring, s)) in rings.iter().zip(slots).enumerate() {
        let what = format!("ring {i}");
        wait_copied(ring, s, &what);
        // SAFETY: the gather into the slot finished (waited above) and nothing else writes it.
        let got = unsafe { std::slice::from_raw_parts(ring.slot_ptr(s), len) };
        assert_same(got, &pattern(len, i as u64), &what);
    }
}
