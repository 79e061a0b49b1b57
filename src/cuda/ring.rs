//! A comm's staging ring: `slots` pinned host buffers of `slot_size` bytes in one allocation
//! (portable: pinned for every context), and per GPU whose memory it stages a lane of one or more
//! copy streams (slot `i` copies on stream `i % streams`) and one event per slot. A slot copies on
//! the lane of the GPU it was taken for ([`StagingRing::take_for`]), so each copy, kernel and event
//! runs in the context of the GPU that owns the device memory. Slots are taken and given back in
//! FIFO order, which is the order a comm's requests complete in.
//!
//! A chunk of several device segments is gathered into its slot (or scattered out of it) with one
//! copy per segment, or, when its segments are small, by the segment kernel ([`super::segments`]):
//! a kernel and one copy, at about the cost of a contiguous chunk. The kernel is built on the first
//! chunk that wants it; where it cannot be (no NVRTC, say) the ring says so once in the log and
//! copies segment by segment.
//!
//! Nothing signals a finished copy: its owner polls the slot's event ([`StagingRing::copied`]). A
//! driver host function per copy that woke the engine instead was measured: under load the driver
//! ran those up to about 1.5 ms late, and the parked engine with them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use cudarc::driver::sys;

use super::segments::{Built, SegmentKernel};
use super::slots::SlotMemory;
use super::stream::{Event, Stream, shared_streams};
use super::unpack::addressable;
use super::{Gpu, check};
use crate::config::StagingGather;
use crate::error::{Error, Result};

/// Chunks of two or more device segments that average less than this many bytes go through the
/// segment kernel; chunks of larger segments keep one copy per segment. Each copy costs the one
/// thread that issues them a few microseconds (1024 x 16 KiB took about 5 ms per 16 MiB that way on
/// the 2 x H200 host, about 5 us a segment), about what the staged path moves of a contiguous chunk
/// in that time (about 60 KiB at its 12 GB/s): below that the issuing thread sets the pace. At 256
/// KiB the copies hide behind their DMA (64 x 256 KiB measured 0.83-0.98 of one buffer), so from
/// there on nothing is left to gain against the kernel's own cost per chunk (a launch and a pass
/// through device memory). Between the two the kernel's fixed cost is the smaller;
/// `UCCL_TCPX_STAGING_GATHER=kernel` and `=copies` measure either side.
pub const KERNEL_BELOW_MEAN_SEGMENT: usize = 256 << 10;

/// Whether a chunk of `count` segments and `len` bytes is one for the kernel under `mode`.
fn wants_kernel(mode: StagingGather, count: usize, len: usize) -> bool {
    match mode {
        StagingGather::Copies => false,
        StagingGather::Kernel => count >= 2 && len > 0,
        StagingGather::Auto => count >= 2 && len > 0 && len / count < KERNEL_BELOW_MEAN_SEGMENT,
    }
}

/// Chunks of two or more segments moved by each path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentCopyCounts {
    /// By the segment kernel: one launch or a few and one copy.
    pub by_kernel: u64,
    /// By one copy per segment.
    pub by_copies: u64,
}

static BY_KERNEL: AtomicU64 = AtomicU64::new(0);
static BY_COPIES: AtomicU64 = AtomicU64::new(0);

/// Chunks of two or more segments every ring of this process moved, by path: for tests and the
/// benchmark, which have no other view of the path a vector took.
pub fn segment_copy_counts() -> SegmentCopyCounts {
    SegmentCopyCounts { by_kernel: BY_KERNEL.load(Ordering::Relaxed), by_copies: BY_COPIES.load(Ordering::Relaxed) }
}

/// Segment kernels (with their device bounce buffers) that a ring readied at a chunk rather than
/// ahead of it (`StagingRing::prepare_kernels`): for tests of what a first transfer allocates.
static KERNELS_AT_A_CHUNK: AtomicU64 = AtomicU64::new(0);

pub fn kernels_readied_at_a_chunk() -> u64 {
    KERNELS_AT_A_CHUNK.load(Ordering::Relaxed)
}

/// The one log line of a process whose rings could not build the segment kernel.
fn kernel_unavailable(why: &Error) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::warn!(
            "staging: GPU chunks of many segments are copied one segment at a time (slower): the segment kernel is \
             unavailable: {why}"
        )
    });
}

/// One GPU's side of a ring: its copy streams (shared with other rings, `shared_streams`), one
/// event per slot and its segment kernel. Drop order: the streams synchronize first (no copy or
/// kernel still reads or writes a slot, a bounce buffer or user memory), then the kernel's buffers
/// and the events go.
struct Lane {
    streams: Vec<Arc<Stream>>,
    kernel: Built<SegmentKernel>,
    events: Vec<Event>,
}

impl Lane {
    fn new(gpu: &Arc<Gpu>, slots: usize, streams: usize) -> Result<Lane> {
        let streams = shared_streams(gpu, streams.min(slots))?;
        let events = (0..slots).map(|_| Event::new(gpu)).collect::<Result<Vec<_>>>()?;
        Ok(Lane { streams, kernel: Built::Waiting, events })
    }

    fn gpu(&self) -> &Arc<Gpu> {
        self.streams[0].gpu()
    }

    fn stream(&self, slot: usize) -> &Stream {
        &self.streams[slot % self.streams.len()]
    }
}

impl Drop for Lane {
    /// The shared streams outlive the ring: what it queued on them ends before its memory goes.
    fn drop(&mut self) {
        for stream in &self.streams {
            let _ = stream.synchronize();
        }
    }
}

pub struct StagingRing {
    // Drop order matters: every lane's streams synchronize before the slots go.
    /// The first is the GPU the ring was made for; others are added for memory of other GPUs.
    lanes: Vec<Lane>,
    /// The lane each slot copies on: the one it was last taken for.
    slot_lane: Vec<usize>,
    host: SlotMemory,
    slot_size: usize,
    /// Slots handed out and given back so far; slot `i` of the sequence is `i % slots`.
    taken: u64,
    returned: u64,
    gather: StagingGather,
    counts: SegmentCopyCounts,
}

impl StagingRing {
    /// `slots` slots of `slot_size` bytes copying on `streams` streams (at most one per slot).
    pub fn new(gpu: &Arc<Gpu>, slot_size: usize, slots: usize, streams: usize) -> Result<StagingRing> {
        if slot_size == 0 || slots == 0 || streams == 0 {
            return Err(Error::invalid(format!(
                "a staging ring of {slots} slots of {slot_size} bytes on {streams} streams"
            )));
        }
        let host = SlotMemory::new(gpu, slot_size, slots)?;
        let lane = Lane::new(gpu, slots, streams)?;
        Ok(StagingRing {
            lanes: vec![lane],
            slot_lane: vec![0; slots],
            host,
            slot_size,
            taken: 0,
            returned: 0,
            gather: StagingGather::Auto,
            counts: SegmentCopyCounts::default(),
        })
    }

    /// Lets the ring stage memory of `gpu` too: a lane of its own streams and events, made once.
    pub fn add_gpu(&mut self, gpu: &Arc<Gpu>) -> Result<()> {
        if self.lane_of(gpu.ordinal()).is_none() {
            let lane = Lane::new(gpu, self.slots(), self.lanes[0].streams.len())?;
            self.lanes.push(lane);
        }
        Ok(())
    }

    /// Whether the ring stages memory of GPU `ordinal`.
    pub fn stages(&self, ordinal: i32) -> bool {
        self.lane_of(ordinal).is_some()
    }

    fn lane_of(&self, ordinal: i32) -> Option<usize> {
        self.lanes.iter().position(|l| l.gpu().ordinal() == ordinal)
    }

    /// How chunks of several segments are gathered and scattered from now on.
    pub fn set_gather(&mut self, mode: StagingGather) {
        self.gather = mode;
    }

    /// Readies each lane's segment kernel now (a slot of device memory per stream to bounce
    /// through) where the mode may use it and its GPU's kernel is built, so that the first chunk
    /// of many segments allocates nothing; where it is not built yet, that chunk readies it.
    pub fn prepare_kernels(&mut self) {
        if self.gather == StagingGather::Copies {
            return;
        }
        for lane in &mut self.lanes {
            let streams = &lane.streams;
            let take = || SegmentKernel::if_built(streams[0].gpu(), self.slot_size, streams.len());
            lane.kernel.get(take, kernel_unavailable);
        }
    }

    /// Chunks of two or more segments this ring moved, by path.
    pub fn segment_copies(&self) -> SegmentCopyCounts {
        self.counts
    }

    /// The GPU the ring was made for.
    pub fn gpu(&self) -> &Arc<Gpu> {
        self.lanes[0].gpu()
    }

    /// The lane slot `slot` copies on.
    fn lane(&mut self, slot: usize) -> &mut Lane {
        &mut self.lanes[self.slot_lane[slot]]
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub fn slots(&self) -> usize {
        self.slot_lane.len()
    }

    /// Slots page-locked so far: each at its first copy, or ahead of it
    /// ([`StagingRing::lock_ahead`]).
    pub fn pinned_slots(&self) -> usize {
        self.host.pinned()
    }

    /// Has every slot page-locked in the background, ahead of the copies
    /// (`SlotMemory::lock_ahead`): for a ring made before its first transfer.
    pub fn lock_ahead(&self) {
        self.host.lock_ahead();
    }

    /// A comm takes the ring or gives it back (`SlotMemory::hold`): the background locking serves
    /// held rings first.
    pub fn hold(&self, held: bool) {
        self.host.hold(held);
    }

    /// The bytes of all slots, for a transport that wants them registered.
    pub fn host_range(&self) -> (usize, usize) {
        (self.host.as_ptr() as usize, self.host.len())
    }

    pub fn in_use(&self) -> usize {
        (self.taken - self.returned) as usize
    }

    /// The slot the next `take` returns, if one is free.
    pub fn peek(&self) -> Option<usize> {
        (self.in_use() < self.slots()).then_some((self.taken % self.slots() as u64) as usize)
    }

    /// Takes the next slot for memory of the ring's own GPU.
    pub fn take(&mut self) -> Option<usize> {
        let slot = self.peek()?;
        self.taken += 1;
        self.slot_lane[slot] = 0;
        Some(slot)
    }

    /// Takes the next slot for memory of GPU `ordinal`, whose lane its copies run on; an error when
    /// the ring has no lane for that GPU (`add_gpu`).
    pub fn take_for(&mut self, ordinal: i32) -> Result<Option<usize>> {
        let lane = self.lane_of(ordinal).ok_or_else(|| {
            Error::new(crate::error::UcclStatus::ErrInternal, format!("staging ring has no lane for GPU {ordinal}"))
        })?;
        let Some(slot) = self.take() else { return Ok(None) };
        self.slot_lane[slot] = lane;
        Ok(Some(slot))
    }

    /// Gives back the oldest slot taken.
    pub fn give_back(&mut self) {
        debug_assert!(self.returned < self.taken, "staging slot returned twice");
        self.returned = (self.returned + 1).min(self.taken);
    }

    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots());
        // In bounds: slot < slots and the allocation holds slots * slot_size bytes.
        self.host.as_ptr().wrapping_add(slot * self.slot_size)
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len > self.slot_size {
            return Err(Error::invalid(format!(
                "a {len}-byte device chunk exceeds the {}-byte staging slot (UCCL_TCPX_CHUNK_SIZE)",
                self.slot_size
            )));
        }
        Ok(())
    }

    /// Queues the copy of `len` device bytes at `src` into `slot`; `copied(slot)` tells when it is
    /// there, and the wake runs then.
    ///
    /// # Safety
    /// `[src, src + len)` is device memory of the GPU the slot was taken for, valid until the copy
    /// is reported done or the ring is dropped; `slot` is taken and not otherwise in use.
    pub unsafe fn copy_in(&mut self, slot: usize, src: usize, len: usize) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { self.gather(slot, len, [(src, len)], addressable(src as u64, len as u64)) }
    }

    /// Queues the gather of the device segments `(addr, len)` of `segs`, `len` bytes in all,
    /// concatenated into `slot`: by the segment kernel when they are many and small, else one copy
    /// per segment; one completion for all of them either way. The caller measured the segments
    /// as it checked them (a chunk of 512 B blocks is 4,096 of them, and each pass costs the
    /// thread holding its connection's lock): they add up to `len`, and `addressable` says whether
    /// a tile can name every one (`unpack::addressable`).
    ///
    /// # Safety
    /// As `copy_in`, for every segment; the segments add up to `len` and `addressable` is true only
    /// where every one is.
    pub unsafe fn gather<I>(&mut self, slot: usize, len: usize, segs: I, addressable: bool) -> Result<()>
    where
        I: IntoIterator<Item = (usize, usize)>,
        I::IntoIter: ExactSizeIterator,
    {
        self.check_len(len)?;
        self.host.pin(slot)?;
        let segs = segs.into_iter();
        let (host, slot_size, gather) = (self.slot_ptr(slot), self.slot_size, self.gather);
        let lane = self.lane(slot);
        lane.gpu().bind()?;
        let index = slot % lane.streams.len();
        let many = segs.len() >= 2;
        if use_kernel(lane, gather, slot_size, (segs.len(), len), addressable)
            && let Built::Ready(kernel) = &mut lane.kernel
        {
            // SAFETY: the caller vouches for the segments, their total and their being
            // addressable, and for the taken slot, which holds slot_size >= len bytes (check_len);
            // the kernel's walk stops at len bytes whatever the segments say; the lane's GPU is
            // bound on this thread.
            unsafe { kernel.gather(index, &lane.streams[index], host, len, segs)? };
            self.count(true);
            return self.mark(slot);
        }
        let mut at = 0;
        for (addr, seg_len) in segs {
            let n = seg_len.min(len - at);
            if n == 0 {
                continue;
            }
            check(
                // SAFETY: the caller vouches for each device source and the taken slot; the slot
                // holds slot_size >= len >= at + n bytes, and the GPU is bound on this thread.
                unsafe {
                    sys::cuMemcpyDtoHAsync_v2(
                        host.add(at).cast(),
                        addr as sys::CUdeviceptr,
                        n,
                        lane.streams[index].raw(),
                    )
                },
                "cuMemcpyDtoHAsync into a staging slot",
            )?;
            at += n;
        }
        if many {
            self.count(false);
        }
        self.mark(slot)
    }

    /// Queues the copy of the first `len` bytes of `slot` to device memory at `dst`.
    ///
    /// # Safety
    /// `[dst, dst + len)` is device memory of the GPU the slot was taken for, which nobody else
    /// accesses until the copy is reported done or the ring is dropped; the slot's bytes are final.
    pub unsafe fn copy_out(&mut self, slot: usize, dst: usize, len: usize) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { self.scatter(slot, len, [(dst, len)], addressable(dst as u64, len as u64)) }
    }

    /// Queues the scatter of the first `len` bytes of `slot` into the device segments `(addr,
    /// len)` of `segs`, in order, as far as `len` reaches: by the segment kernel when they are
    /// many and small, else one copy per segment reached; one completion for all of them. As for
    /// [`gather`](Self::gather), the caller measured the segments.
    ///
    /// # Safety
    /// As `copy_out`, for every segment; `len` is at most their total, and `addressable` is true
    /// only where a tile can name every one.
    pub unsafe fn scatter<I>(&mut self, slot: usize, len: usize, segs: I, addressable: bool) -> Result<()>
    where
        I: IntoIterator<Item = (usize, usize)>,
        I::IntoIter: ExactSizeIterator,
    {
        self.check_len(len)?;
        self.host.pin(slot)?;
        let segs = segs.into_iter();
        let (host, slot_size, gather) = (self.slot_ptr(slot), self.slot_size, self.gather);
        let lane = self.lane(slot);
        lane.gpu().bind()?;
        let index = slot % lane.streams.len();
        let many = segs.len() >= 2;
        if use_kernel(lane, gather, slot_size, (segs.len(), len), addressable)
            && let Built::Ready(kernel) = &mut lane.kernel
        {
            // SAFETY: the caller vouches for the segments, their being addressable and the slot's
            // final bytes; `len` is at most a slot (check_len) and, by the caller's word, at most
            // the segments' total; the lane's GPU is bound on this thread.
            unsafe { kernel.scatter(index, &lane.streams[index], host, len, segs)? };
            self.count(true);
            return self.mark(slot);
        }
        let mut at = 0;
        for (addr, seg_len) in segs {
            let n = seg_len.min(len - at);
            if n == 0 {
                break;
            }
            check(
                // SAFETY: the caller vouches for each device destination and the slot's final
                // bytes; `at + n <= len <= slot_size` (check_len above), and the GPU is bound on
                // this thread.
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        addr as sys::CUdeviceptr,
                        host.add(at).cast(),
                        n,
                        lane.streams[index].raw(),
                    )
                },
                "cuMemcpyHtoDAsync from a staging slot",
            )?;
            at += n;
        }
        if many {
            self.count(false);
        }
        self.mark(slot)
    }

    fn count(&mut self, by_kernel: bool) {
        if by_kernel {
            self.counts.by_kernel += 1;
            BY_KERNEL.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.by_copies += 1;
            BY_COPIES.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn mark(&mut self, slot: usize) -> Result<()> {
        let lane = self.lane(slot);
        lane.events[slot].record(lane.stream(slot))
    }

    /// Whether the last copy queued for `slot` finished.
    pub fn copied(&self, slot: usize) -> Result<bool> {
        let lane = &self.lanes[self.slot_lane[slot]];
        lane.gpu().bind()?;
        lane.events[slot].done()
    }
}

/// Whether a chunk of `count` segments and `len` bytes goes through `lane`'s kernel: the mode
/// wants it for them, a tile can name every one (`addressable`), and the kernel is built. The ring
/// is used under its connection's lock, which NVRTC would hold for hundreds of milliseconds: the
/// engine builds the kernel when it registers the GPU's memory, and chunks take one copy per
/// segment until it is there.
fn use_kernel(
    lane: &mut Lane,
    gather: StagingGather,
    slot_size: usize,
    chunk: (usize, usize),
    addressable: bool,
) -> bool {
    let (count, len) = chunk;
    if !wants_kernel(gather, count, len) || !addressable {
        return false;
    }
    let waiting = matches!(lane.kernel, Built::Waiting);
    let streams = &lane.streams;
    let take = || SegmentKernel::if_built(streams[0].gpu(), slot_size, streams.len());
    let ready = lane.kernel.get(take, kernel_unavailable).is_some();
    if waiting && ready {
        KERNELS_AT_A_CHUNK.fetch_add(1, Ordering::Relaxed);
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_takes_chunks_of_many_small_segments_unless_told_otherwise() {
        let small = KERNEL_BELOW_MEAN_SEGMENT - 1;
        // 1024 x 16 KiB in 2 MiB chunks: 128 segments a chunk.
        assert!(wants_kernel(StagingGather::Auto, 128, 128 * (16 << 10)));
        assert!(wants_kernel(StagingGather::Auto, 2, 2 * small));
        // 64 x 256 KiB: the copies already keep up.
        assert!(!wants_kernel(StagingGather::Auto, 8, 8 * KERNEL_BELOW_MEAN_SEGMENT));
        // One segment is one copy whatever the mode.
        for mode in [StagingGather::Auto, StagingGather::Kernel, StagingGather::Copies] {
            assert!(!wants_kernel(mode, 1, 100), "{mode:?}");
            assert!(!wants_kernel(mode, 0, 0), "{mode:?}");
        }
        assert!(wants_kernel(StagingGather::Kernel, 2, 8 << 20));
        // Nothing to move: no launch.
        assert!(!wants_kernel(StagingGather::Auto, 4, 0));
        assert!(!wants_kernel(StagingGather::Copies, 1000, 1000));
    }
}
