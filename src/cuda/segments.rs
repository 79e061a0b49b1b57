//! Many device copies at about the cost of one, through the unpack kernel: [`TileCopier`] copies
//! between device addresses of one GPU (the same-host path's vectors), and [`SegmentKernel`] moves
//! a chunk of many device segments into or out of a pinned staging slot. For a chunk, the unpack
//! kernel (`unpack/`, one warp per tile of at most 4 KiB, any alignment) gathers the segments into
//! a device bounce buffer and one copy moves that to the slot; on the way in one copy fills the
//! bounce buffer from the slot and the kernel scatters it.
//! Two driver calls per chunk instead of one copy per segment, each of which costs the issuing
//! thread a few microseconds and the copy engine a start of its own (1024 segments of 16 KiB
//! moved at 0.28-0.32 of one 16 MiB buffer that way, docs/perf-log/vectors.md).
//!
//! Why a bounce buffer in device memory rather than the kernel storing into the slot through a
//! host mapping: the copy engine is what moves bytes over PCIe at full rate, and a kernel storing
//! to host memory would hold its SMs for the whole PCIe-bound transfer, next to the user's
//! kernels, while a gather through device memory takes them for microseconds. Why not one
//! `cuMemcpyBatchAsync` per chunk: it saves the driver calls but the copy engine still starts one
//! operation per segment; the fake NIC's GPU mode measured both (one batch per receive 1.45x one
//! copy per page, a whole-message copy and a scatter kernel 2x; docs/perf-log/gpu-unpack.md).
//!
//! One bounce buffer per copy stream, of a slot's size. Everything that touches it is queued on
//! that stream, so a gather's kernel starts only after the previous chunk's copy out of the buffer
//! finished, and a scatter's copy in only after the previous chunk's kernel: stream order is the
//! only synchronisation needed. Tiles travel in the kernel parameters, which the driver copies at
//! the launch, so nothing the host fills outlives the call; a chunk with more tiles than one launch
//! carries takes several launches.

use std::sync::Arc;

use cudarc::driver::sys;

use super::memory::DeviceBuffer;
use super::stream::Stream;
use super::unpack::{InlineTiles, UnpackKernels, run_tiles};
use super::{Gpu, check};
use crate::error::{Error, Result};

/// A kernel a path under a connection's lock takes once it is built, never building it there
/// (NVRTC would hold the lock for hundreds of milliseconds): waiting until the build ended, then
/// ready for good, or unavailable for good where it could not be built.
pub enum Built<T> {
    Waiting,
    Ready(T),
    Unavailable,
}

impl<T> Built<T> {
    /// The kernel, once ready. While waiting, `take` is asked for it (`None`: not built yet, ask
    /// again next time); an error makes it unavailable, told to `unavailable` once.
    pub fn get(
        &mut self,
        take: impl FnOnce() -> Option<Result<T>>,
        unavailable: impl FnOnce(&Error),
    ) -> Option<&mut T> {
        if let Built::Waiting = self {
            match take() {
                None => {}
                Some(Ok(kernel)) => *self = Built::Ready(kernel),
                Some(Err(e)) => {
                    unavailable(&e);
                    *self = Built::Unavailable;
                }
            }
        }
        match self {
            Built::Ready(kernel) => Some(kernel),
            Built::Waiting | Built::Unavailable => None,
        }
    }
}

pub struct SegmentKernel {
    tiles: TileCopier,
    /// Bounce buffer `i` belongs to copy stream `i`.
    bounce: Vec<DeviceBuffer>,
}

/// Copies between device addresses of one GPU by the unpack kernel: tiles of at most 4 KiB, carried
/// in the parameters of as few launches as hold them. Many small copies at about the cost of one.
pub struct TileCopier {
    kernels: Arc<UnpackKernels>,
    /// The parameters of the next launch, filled in place.
    params: Box<InlineTiles>,
    /// Most tiles one launch carries (what this driver allows in parameters).
    per_launch: usize,
}

impl TileCopier {
    /// Builds `gpu`'s kernel if no build ended yet (once per process; NVRTC takes a few hundred
    /// milliseconds), leaving the calling thread's current context as it was; a build that fails
    /// (no NVRTC) is logged, once. For a thread that holds no lock: the paths that copy through
    /// the kernel under a connection's lock only take it once built (`if_built`), and move bytes
    /// another way until then.
    pub fn build(gpu: &Gpu) {
        let ordinal = gpu.ordinal() as usize;
        if UnpackKernels::if_built(ordinal).is_some() {
            return;
        }
        if let Err(e) = gpu.enter().and_then(|_ctx| UnpackKernels::for_device(ordinal)) {
            log::info!("GPU {ordinal}: no unpack kernel, its vectors are copied piece by piece ({e})");
        }
    }

    /// The kernel of `gpu` if its build ended (`UnpackKernels::if_built`: `None` until then). Fails
    /// where it cannot be built (no NVRTC, a GPU older than compute capability 7.0).
    pub fn if_built(gpu: &Arc<Gpu>) -> Option<Result<TileCopier>> {
        let kernels = UnpackKernels::if_built(gpu.ordinal() as usize)?;
        Some(kernels.and_then(TileCopier::new))
    }

    fn new(kernels: Arc<UnpackKernels>) -> Result<TileCopier> {
        let per_launch = kernels.max_inline();
        if per_launch == 0 {
            return Err(Error::backend("the unpack kernel has no launch that carries its tiles in parameters"));
        }
        // The parameters keep the zero completion signal: an event behind the work says when it
        // finished.
        Ok(TileCopier { kernels, params: InlineTiles::boxed(), per_launch })
    }

    /// Queues on `stream` the copies `(src, dst, len)` of `runs`, each run that continues the one
    /// before it in both source and destination joined to it.
    ///
    /// # Safety
    /// The GPU's context is current and `stream` is of it; every range is device memory of this GPU
    /// that stays valid, and reserved to these copies, until the stream passed this work; every
    /// range is addressable by a tile (`unpack::addressable`).
    pub unsafe fn copy(&mut self, stream: &Stream, runs: impl Iterator<Item = (u64, u64, u64)>) -> Result<()> {
        for run in merged(runs.map(|(src, dst, len)| Run { src, dst, len })) {
            // SAFETY: forwarded from the caller.
            unsafe { self.push_run(stream, run)? };
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.launch(stream) }
    }

    /// Appends the run's tiles to the parameters, launching whenever they are full.
    unsafe fn push_run(&mut self, stream: &Stream, run: Run) -> Result<()> {
        for tile in run_tiles(run.src, run.dst, run.len) {
            if self.params.count as usize == self.per_launch {
                // SAFETY: forwarded from the caller.
                unsafe { self.launch(stream)? };
            }
            self.params.tiles[self.params.count as usize] = tile;
            self.params.count += 1;
        }
        Ok(())
    }

    /// Launches the tiles collected so far, if any; the driver has copied them when this returns.
    unsafe fn launch(&mut self, stream: &Stream) -> Result<()> {
        // SAFETY: the stream is of this GPU's primary context, current on this thread; the tiles'
        // ranges are the caller's, valid until the stream passed this launch.
        let launched = unsafe { self.kernels.launch_inline(stream.raw(), &self.params) };
        self.params.count = 0;
        launched
    }
}

/// One copy, merged from segments that continue each other: device addresses.
#[derive(Clone, Copy)]
struct Run {
    src: u64,
    dst: u64,
    len: u64,
}

impl SegmentKernel {
    /// The kernel of `gpu` if its build ended (`None` until then, as for
    /// [`TileCopier::if_built`]) and one bounce buffer of `slot_size` bytes for each of `streams`
    /// copy streams. Fails where the kernel cannot be built (no NVRTC, a GPU older than compute
    /// capability 7.0) or the memory is not there.
    pub fn if_built(gpu: &Arc<Gpu>, slot_size: usize, streams: usize) -> Option<Result<SegmentKernel>> {
        let tiles = TileCopier::if_built(gpu)?;
        Some(tiles.and_then(|tiles| {
            let _ctx = gpu.enter()?;
            let bounce =
                (0..streams).map(|_| DeviceBuffer::new(gpu.ordinal(), slot_size)).collect::<Result<Vec<_>>>()?;
            Ok(SegmentKernel { tiles, bounce })
        }))
    }

    /// Queues on `stream` (copy stream `index` of the ring) the gather of the device segments
    /// `(addr, len)` of `segs` into its bounce buffer and the copy of their `len` bytes to `host`.
    ///
    /// # Safety
    /// The GPU's context is current; `stream` is copy stream `index`; every segment is device
    /// memory of this GPU that stays valid and unwritten until the stream reached the end of this
    /// work; the segments add up to `len`, at most a slot; `host` is pinned memory of at least
    /// `len` bytes nobody else touches until then; every segment is addressable by a tile
    /// (`unpack::addressable`).
    pub unsafe fn gather(
        &mut self,
        index: usize,
        stream: &Stream,
        host: *mut u8,
        len: usize,
        segs: impl Iterator<Item = (usize, usize)>,
    ) -> Result<()> {
        let bounce = self.bounce_for(index, len)?;
        for run in gather_runs(bounce, segs) {
            // SAFETY: forwarded from the caller.
            unsafe { self.tiles.push_run(stream, run)? };
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.tiles.launch(stream)? };
        check(
            // SAFETY: the bounce buffer holds a slot, `len` of whose bytes the kernels queued just
            // before on this stream wrote; `host` holds `len` bytes (the caller's contract).
            unsafe { sys::cuMemcpyDtoHAsync_v2(host.cast(), bounce, len, stream.raw()) },
            "cuMemcpyDtoHAsync of a gathered chunk into its staging slot",
        )
    }

    /// Queues on `stream` (copy stream `index` of the ring) the copy of `len` bytes at `host` into
    /// its bounce buffer and their scatter, in order, into the device segments `(addr, len)` of
    /// `segs` (as far as `len` reaches).
    ///
    /// # Safety
    /// As [`gather`](Self::gather), except that the segments are written, nobody else accesses them
    /// until the stream reached the end of this work, and they add up to at least `len`.
    pub unsafe fn scatter(
        &mut self,
        index: usize,
        stream: &Stream,
        host: *const u8,
        len: usize,
        segs: impl Iterator<Item = (usize, usize)>,
    ) -> Result<()> {
        let bounce = self.bounce_for(index, len)?;
        check(
            // SAFETY: `host` holds `len` final bytes and the bounce buffer a slot (the caller's
            // contract, checked above); earlier work on the buffer is queued before this on the
            // same stream.
            unsafe { sys::cuMemcpyHtoDAsync_v2(bounce, host.cast(), len, stream.raw()) },
            "cuMemcpyHtoDAsync of a staging slot into its scatter buffer",
        )?;
        for run in scatter_runs(bounce, len, segs) {
            // SAFETY: forwarded from the caller.
            unsafe { self.tiles.push_run(stream, run)? };
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.tiles.launch(stream) }
    }

    fn bounce_for(&self, index: usize, len: usize) -> Result<sys::CUdeviceptr> {
        let buffer =
            self.bounce.get(index).ok_or_else(|| Error::backend(format!("no bounce buffer for stream {index}")))?;
        if len > buffer.len() {
            return Err(Error::invalid(format!("{len} bytes exceed the {}-byte bounce buffer", buffer.len())));
        }
        Ok(buffer.addr() as sys::CUdeviceptr)
    }
}

/// The copies of a gather: segment after segment into the next bytes from `bounce` on, segments
/// that continue each other merged into one copy. Empty segments copy nothing.
fn gather_runs(bounce: u64, segs: impl Iterator<Item = (usize, usize)>) -> impl Iterator<Item = Run> {
    let mut at = bounce;
    merged(segs.map(move |(addr, len)| {
        let run = Run { src: addr as u64, dst: at, len: len as u64 };
        at += len as u64;
        run
    }))
}

/// The copies of a scatter of `len` bytes from `bounce` on: into segment after segment as far as
/// the bytes reach, segments that continue each other merged into one copy.
fn scatter_runs(bounce: u64, len: usize, segs: impl Iterator<Item = (usize, usize)>) -> impl Iterator<Item = Run> {
    let (mut at, end) = (bounce, bounce + len as u64);
    merged(segs.map_while(move |(addr, seg_len)| {
        if at == end {
            return None;
        }
        let n = (seg_len as u64).min(end - at);
        let run = Run { src: at, dst: addr as u64, len: n };
        at += n;
        Some(run)
    }))
}

/// `runs` with empty ones dropped and each run that continues the previous one in both source and
/// destination joined to it: side-by-side segments become one longer copy.
fn merged(runs: impl Iterator<Item = Run>) -> impl Iterator<Item = Run> {
    let mut runs = runs.filter(|r| r.len > 0).peekable();
    std::iter::from_fn(move || {
        let mut run = runs.next()?;
        while let Some(next) = runs.next_if(|n| run.src + run.len == n.src && run.dst + run.len == n.dst) {
            run.len += next.len;
        }
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::unpack::TILE_BYTES;

    /// A model address space: sources below `BOUNCE`, the bounce buffer from it on.
    const BOUNCE: u64 = 4 << 20;
    const SPACE: usize = 8 << 20;

    /// Applies the tiles of `runs` to `memory`, as the kernel would.
    fn apply(memory: &mut [u8], runs: impl Iterator<Item = Run>) -> usize {
        let mut tiles = 0;
        for run in runs {
            for tile in run_tiles(run.src, run.dst, run.len) {
                assert!(tile.bytes() >= 1 && u64::from(tile.bytes()) <= TILE_BYTES);
                let (s, d, n) = (tile.src() as usize, tile.dst() as usize, tile.bytes() as usize);
                memory.copy_within(s..s + n, d);
                tiles += 1;
            }
        }
        tiles
    }

    /// Random segments at odd places below `BOUNCE`, some side by side, some empty.
    fn segments(seed: u64, count: usize, max: usize) -> Vec<(usize, usize)> {
        let mut state = seed;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut at = 1 + next(64);
        (0..count)
            .map(|_| {
                let len = if next(20) == 0 { 0 } else { 1 + next(max) };
                let seg = (at, len);
                at += len + if next(4) == 0 { 0 } else { 1 + next(100) };
                seg
            })
            .collect()
    }

    #[test]
    fn a_gather_lays_the_segments_end_to_end_and_a_scatter_puts_them_back() {
        for (round, (count, max)) in [(1000, 5000), (128, 16 << 10), (3000, 3), (2, 1)].into_iter().enumerate() {
            let segs = segments(round as u64 * 7919 + 1, count, max);
            let len: usize = segs.iter().map(|s| s.1).sum();
            assert!(segs.last().map_or(0, |s| s.0 + s.1) < BOUNCE as usize && len <= SPACE - BOUNCE as usize);
            let original: Vec<u8> = (0..SPACE).map(|i| (i * 131 % 251) as u8).collect();
            let stream: Vec<u8> = segs.iter().flat_map(|&(a, n)| original[a..a + n].iter().copied()).collect();

            let mut memory = original.clone();
            let tiles = apply(&mut memory, gather_runs(BOUNCE, segs.iter().copied()));
            let b = BOUNCE as usize;
            assert_eq!(&memory[b..b + len], &stream[..], "round {round}: the gathered bytes");
            assert_eq!(&memory[b + len..], &original[b + len..], "round {round}: past the gather");
            assert_eq!(&memory[..b], &original[..b], "round {round}: the sources");
            let filled: Vec<_> = segs.iter().filter(|s| s.1 > 0).collect();
            let side_by_side = filled.windows(2).filter(|w| w[0].0 + w[0].1 == w[1].0).count();
            assert!(side_by_side > 0 || count < 3, "round {round}: the test has side-by-side segments");
            let runs = gather_runs(BOUNCE, segs.iter().copied()).count();
            assert_eq!(runs, filled.len() - side_by_side, "round {round}: side-by-side segments merged");
            assert!(tiles >= runs);

            // The bounce bytes scattered back over cleared segments, short by 5 bytes: the last
            // five stay clear, and so does every byte between the segments.
            let short = len.saturating_sub(5);
            let mut back = memory.clone();
            for &(a, n) in &segs {
                back[a..a + n].fill(0);
            }
            let cleared = back.clone();
            apply(&mut back, scatter_runs(BOUNCE, short, segs.iter().copied()));
            let mut want = cleared;
            let mut from = 0;
            for &(a, n) in &segs {
                let n = n.min(short - from);
                want[a..a + n].copy_from_slice(&stream[from..from + n]);
                from += n;
            }
            assert!(want == back, "round {round}: the scattered bytes");
        }
    }

    #[test]
    fn runs_merge_only_where_both_ends_continue() {
        let runs = |v: &[(u64, u64, u64)]| {
            merged(v.iter().map(|&(src, dst, len)| Run { src, dst, len }))
                .map(|r| (r.src, r.dst, r.len))
                .collect::<Vec<_>>()
        };
        assert_eq!(runs(&[(0, 100, 10), (10, 110, 5), (15, 115, 0), (15, 115, 1)]), [(0, 100, 16)]);
        assert_eq!(runs(&[(0, 100, 10), (10, 111, 5)]), [(0, 100, 10), (10, 111, 5)]);
        assert_eq!(runs(&[(0, 100, 10), (11, 110, 5)]), [(0, 100, 10), (11, 110, 5)]);
        assert_eq!(runs(&[(0, 0, 0), (5, 5, 0)]), []);
        let scatter: Vec<_> =
            scatter_runs(1000, 7, [(0, 4), (4, 4), (50, 9)].into_iter()).map(|r| (r.src, r.dst, r.len)).collect();
        assert_eq!(scatter, [(1000, 0, 7)], "the bytes end inside the second segment");
        let gather: Vec<_> =
            gather_runs(1000, [(50, 3), (0, 0), (53, 2), (10, 1)].into_iter()).map(|r| (r.src, r.dst, r.len)).collect();
        assert_eq!(gather, [(50, 1000, 5), (10, 1005, 1)]);
    }
}
