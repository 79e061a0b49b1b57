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
//! only synchronisation needed. Up to 254 tiles travel in the kernel parameters, which the driver
//! copies at the launch; more go in a pinned list the kernel reads through its device mapping,
//! reused only once an event behind that launch fired (up to four lists of 64 KiB per copier,
//! allocated on first need, with the GPU's context current; with all four in flight, whole
//! parameter blocks).

use std::sync::Arc;

use cudarc::driver::sys;

use super::memory::DeviceBuffer;
use super::stream::{Event, Stream};
use super::unpack::{
    CompletionSignal, INLINE_SMALL, InlineTiles, PinnedTiles, TILE_BYTES, Tile, UnpackKernels, cut_run,
};
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
/// in the parameters of a launch, or, for calls of more tiles than a small parameter block holds,
/// read by the kernel out of a pinned list through its device mapping. Many small copies at about
/// the cost of one.
pub struct TileCopier {
    kernels: Arc<UnpackKernels>,
    gpu: Arc<Gpu>,
    /// The parameters of the next launch, filled in place.
    params: Box<InlineTiles>,
    /// Most tiles one launch carries (what this driver allows in parameters).
    per_launch: usize,
    /// Mapped lists, allocated as calls need them, at most [`MAX_LISTS`].
    lists: Vec<MappedList>,
    /// The list the call being queued fills, once its tiles outgrew [`INLINE_TILES`], and how many
    /// it holds.
    filling: Option<(usize, usize)>,
    /// Where the call's parameters stop taking tiles: at [`INLINE_TILES`], to move to a list, or,
    /// once every list was found in flight, at a whole parameter block.
    params_limit: usize,
    /// Launches that read their tiles from a mapped list.
    mapped_launches: u64,
}

/// Launches of more tiles than this read them from a mapped list where one is free. The driver
/// copies a launch's whole parameter block on the issuing thread, while a kernel that reads a
/// pinned list pays about one PCIe round trip on the GPU (2.4 us more per call on an H100; with
/// tiles cut straight into the list, a 64 x 256 KiB call's post went from 41-44 to 16-24 us there,
/// docs/perf-log/vectors.md); the unpacker draws its line at the same count
/// (`UnpackerConfig::inline_tiles`, docs/perf-log/gpu-unpack.md).
const INLINE_TILES: usize = INLINE_SMALL;
/// Tiles in one mapped list (64 KiB of pinned memory): 1024 page-aligned pieces of 16 KiB.
const LIST_TILES: usize = 4096;
/// Mapped lists per copier. A list is reused once the launch that read it finished; while all are
/// in flight, later calls carry their tiles in parameters.
const MAX_LISTS: usize = 4;

/// A pinned tile list the kernel reads through its device mapping.
struct MappedList {
    tiles: PinnedTiles,
    /// Recorded behind the last launch that read the list: it may be refilled once this fired (an
    /// event never recorded reports done).
    read: Event,
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
        Some(kernels.and_then(|kernels| TileCopier::new(kernels, gpu)))
    }

    fn new(kernels: Arc<UnpackKernels>, gpu: &Arc<Gpu>) -> Result<TileCopier> {
        let per_launch = kernels.max_inline();
        if per_launch < INLINE_TILES {
            return Err(Error::backend(format!(
                "the unpack kernel carries {per_launch} tiles in parameters, fewer than {INLINE_TILES}"
            )));
        }
        // The parameters keep the zero completion signal: an event behind the work says when it
        // finished.
        Ok(TileCopier {
            kernels,
            gpu: gpu.clone(),
            params: InlineTiles::boxed(),
            per_launch,
            lists: Vec::new(),
            filling: None,
            params_limit: INLINE_TILES,
            mapped_launches: 0,
        })
    }

    /// Launches so far that read their tiles from a mapped list.
    pub fn mapped_launches(&self) -> u64 {
        self.mapped_launches
    }

    /// Queues on `stream` the copies `(src, dst, len)` of `runs`, each run that continues the one
    /// before it in both source and destination joined to it.
    ///
    /// # Safety
    /// The GPU's context is current and `stream` is of it; every range is device memory of this GPU
    /// that stays valid, and reserved to these copies, until the stream passed this work; every
    /// range is addressable by a tile (`unpack::addressable`).
    pub unsafe fn copy(&mut self, stream: &Stream, runs: impl Iterator<Item = (u64, u64, u64)>) -> Result<()> {
        // SAFETY: forwarded from the caller.
        self.call(|copier| unsafe {
            copier.push_runs(stream, merged(runs.map(|(src, dst, len)| Run { src, dst, len })))?;
            copier.launch(stream)
        })
    }

    /// Runs one call's pushes and launches; a call that fails leaves nothing of itself behind, so
    /// no tile of it reaches a later call's launch (its caller was told its ranges are free).
    fn call(&mut self, queue: impl FnOnce(&mut TileCopier) -> Result<()>) -> Result<()> {
        let queued = queue(self);
        if queued.is_err() {
            self.filling = None;
            self.params.count = 0;
            self.params_limit = INLINE_TILES;
        }
        queued
    }

    /// Cuts the runs' tiles into the call's parameters or mapped list, as many at a time as they
    /// have room for ([`fill`]), making room (a launch, a move to a list) whenever they are full.
    /// Room is asked for once per block it fills, not per run: a staged chunk of 512 B blocks is
    /// 4,096 runs, whose gather took 40-100 us on an H200 host's thread, under its connection's
    /// lock.
    unsafe fn push_runs(&mut self, stream: &Stream, runs: impl Iterator<Item = Run>) -> Result<()> {
        let mut runs = runs.filter(|r| r.len > 0);
        let mut pending = runs.next();
        while pending.is_some() {
            // SAFETY: forwarded from the caller.
            let room = unsafe { self.room(stream)? };
            let used = fill(room, &mut pending, &mut runs);
            match &mut self.filling {
                Some((_, count)) => *count += used,
                None => self.params.count += used as u32,
            }
        }
        Ok(())
    }

    /// [`push_runs`](Self::push_runs) of one run.
    #[cfg(test)]
    unsafe fn push_run(&mut self, stream: &Stream, run: Run) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.push_runs(stream, std::iter::once(run)) }
    }

    /// Where the call's next tiles go, with room for one at least: what is left of the list being
    /// filled, else of the parameters. A full list or parameter block is launched first; parameters
    /// that reached [`INLINE_TILES`] move to a free list, or, with every list in flight, go on to a
    /// whole block.
    unsafe fn room(&mut self, stream: &Stream) -> Result<&mut [Tile]> {
        if let Some((_, LIST_TILES)) = self.filling {
            // SAFETY: forwarded from the caller.
            unsafe { self.launch_list(stream)? };
        }
        let count = self.params.count as usize;
        if self.filling.is_none() && count == INLINE_TILES && self.params_limit == INLINE_TILES {
            match self.free_list()? {
                Some(index) => {
                    // The call outgrew a small parameter block: its tiles so far move to the list.
                    self.lists[index].tiles.as_mut_slice()[..count].copy_from_slice(&self.params.tiles[..count]);
                    self.params.count = 0;
                    self.filling = Some((index, count));
                }
                None => self.params_limit = self.per_launch,
            }
        }
        if self.filling.is_none() && count == self.per_launch {
            // SAFETY: forwarded from the caller.
            unsafe { self.launch_params(stream)? };
        }
        Ok(match self.filling {
            Some((index, count)) => &mut self.lists[index].tiles.as_mut_slice()[count..],
            None => &mut self.params.tiles[self.params.count as usize..self.params_limit],
        })
    }

    /// A list no launch still reads, allocated if there are fewer than [`MAX_LISTS`]; `None` when
    /// every list is in flight or pinned memory cannot be had (the call's tiles then stay in
    /// parameters). The GPU's context is current.
    fn free_list(&mut self) -> Result<Option<usize>> {
        for (index, list) in self.lists.iter().enumerate() {
            if list.read.done()? {
                return Ok(Some(index));
            }
        }
        if self.lists.len() == MAX_LISTS {
            return Ok(None);
        }
        let made =
            PinnedTiles::new(LIST_TILES).and_then(|tiles| Ok(MappedList { tiles, read: Event::new(&self.gpu)? }));
        match made {
            Ok(list) => {
                self.lists.push(list);
                Ok(Some(self.lists.len() - 1))
            }
            Err(e) => {
                log::debug!("{:?}: no mapped tile list, tiles go in launch parameters ({e})", self.gpu);
                Ok(None)
            }
        }
    }

    /// Launches the tiles collected so far, if any, which ends the call: the parameters' have been
    /// copied by the driver when this returns, a list's are read by the launch.
    unsafe fn launch(&mut self, stream: &Stream) -> Result<()> {
        self.params_limit = INLINE_TILES;
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_list(stream)? };
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_params(stream) }
    }

    unsafe fn launch_params(&mut self, stream: &Stream) -> Result<()> {
        // SAFETY: the stream is of this GPU's primary context, current on this thread; the tiles'
        // ranges are the caller's, valid until the stream passed this launch.
        let launched = unsafe { self.kernels.launch_inline(stream.raw(), &self.params) };
        self.params.count = 0;
        launched
    }

    /// Launches the list being filled, if any, and marks it read behind the launch.
    unsafe fn launch_list(&mut self, stream: &Stream) -> Result<()> {
        let Some((index, count)) = self.filling.take() else {
            return Ok(());
        };
        let list = &self.lists[index];
        // SAFETY: the list holds `count` tiles and is mapped into this GPU's context, current on
        // this thread with the stream of it; it is not refilled before `read` fired, recorded
        // next; the tiles' ranges are the caller's, valid until the stream passed this launch.
        unsafe {
            self.kernels.launch_device_tiles(
                stream.raw(),
                list.tiles.device_ptr(),
                count as u32,
                CompletionSignal::default(),
            )?
        };
        self.mapped_launches += 1;
        if let Err(e) = list.read.record(stream) {
            // Unmarked, the list could be refilled under the launch: wait for it instead.
            let _ = stream.synchronize();
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for TileCopier {
    fn drop(&mut self) {
        // Pinned lists are freed with the copier, with its GPU's context current (as they were
        // allocated); a launch may still be reading one.
        let _ctx = self.gpu.enter();
        for list in &self.lists {
            let _ = list.read.synchronize();
        }
        self.lists.clear();
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
        // SAFETY: forwarded from the caller.
        self.tiles.call(|copier| unsafe {
            copier.push_runs(stream, bounce_runs(bounce, len, true, segs))?;
            copier.launch(stream)
        })?;
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
        // SAFETY: forwarded from the caller.
        self.tiles.call(|copier| unsafe {
            copier.push_runs(stream, bounce_runs(bounce, len, false, segs))?;
            copier.launch(stream)
        })
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

/// Cuts `pending` and the runs after it into `room`'s tiles until it is full or they run out;
/// returns how many it wrote. `pending` is left holding what did not fit (the rest of a run cut at
/// the room's end, or the next run), `None` once `runs` ran out. A run of at most [`TILE_BYTES`] is
/// one tile whatever its alignment (the kernel copies any), written without `cut_run`'s walk: the
/// tiles of a chunk of about 3,900 blocks of 512 B took 20-34 us instead of 33-43 on an H200 host.
/// Longer runs are cut by `cut_run`. Runs must not be empty.
fn fill(room: &mut [Tile], pending: &mut Option<Run>, runs: &mut impl Iterator<Item = Run>) -> usize {
    let mut used = 0;
    while let Some(run) = pending.as_mut() {
        if used == room.len() {
            break;
        }
        if run.len <= TILE_BYTES {
            room[used] = Tile::new(run.src, run.dst, run.len as u32);
            used += 1;
        } else {
            let (tiles, bytes) = cut_run(&mut room[used..], run.src, run.dst, run.len);
            used += tiles;
            if bytes < run.len {
                *run = Run { src: run.src + bytes, dst: run.dst + bytes, len: run.len - bytes };
                break;
            }
        }
        *pending = runs.next();
    }
    used
}

/// The copies of a gather (`gather`: from the segments into the bounce buffer) or a scatter (out
/// of it into them) of `len` bytes through the buffer at `bounce`: segment after segment to or from
/// its next bytes, as far as the bytes reach, segments that continue each other merged into one
/// copy. Empty segments copy nothing.
fn bounce_runs(
    bounce: u64,
    len: usize,
    gather: bool,
    segs: impl Iterator<Item = (usize, usize)>,
) -> impl Iterator<Item = Run> {
    let (mut at, end) = (bounce, bounce + len as u64);
    merged(segs.map_while(move |(addr, seg_len)| {
        if at == end {
            return None;
        }
        let n = (seg_len as u64).min(end - at);
        let (src, dst) = if gather { (addr as u64, at) } else { (at, addr as u64) };
        at += n;
        Some(Run { src, dst, len: n })
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
    use crate::cuda::unpack::run_tiles;

    /// A model address space: sources below `BOUNCE`, the bounce buffer from it on.
    const BOUNCE: u64 = 4 << 20;
    const SPACE: usize = 8 << 20;

    /// Applies the tiles `fill` cuts `runs` into to `memory`, as the kernel would, into rooms of
    /// one to a list's tiles in turn (a run cut at a room's end goes on in the next).
    fn apply(memory: &mut [u8], runs: impl Iterator<Item = Run>) -> usize {
        let mut runs = runs.filter(|r| r.len > 0);
        let mut pending = runs.next();
        let mut room = vec![Tile::default(); LIST_TILES];
        let (mut tiles, mut rooms) = (0, [1, 2, 5, INLINE_TILES, LIST_TILES].into_iter().cycle());
        while pending.is_some() {
            let size = rooms.next().unwrap();
            let n = fill(&mut room[..size], &mut pending, &mut runs);
            assert!(n >= 1 && n <= size, "a room of {size} took {n} tiles");
            for tile in &room[..n] {
                assert!(tile.bytes() >= 1 && u64::from(tile.bytes()) <= TILE_BYTES);
                let (s, d, n) = (tile.src() as usize, tile.dst() as usize, tile.bytes() as usize);
                memory.copy_within(s..s + n, d);
            }
            tiles += n;
        }
        tiles
    }

    #[test]
    fn a_run_of_a_tile_or_less_is_one_tile_and_longer_ones_are_cut() {
        // One tile of 4096 bytes at an odd destination; 4097 bytes cut as `cut_run` cuts them.
        let mut room = [Tile::default(); 8];
        let mut none = std::iter::empty();
        let mut pending = Some(Run { src: 0x1001, dst: 0x9003, len: TILE_BYTES });
        assert_eq!(fill(&mut room, &mut pending, &mut none), 1);
        assert_eq!((room[0].src(), room[0].dst(), u64::from(room[0].bytes())), (0x1001, 0x9003, TILE_BYTES));
        assert!(pending.is_none());
        let long = Run { src: 0x1001, dst: 0x9003, len: TILE_BYTES + 1 };
        let mut pending = Some(long);
        let n = fill(&mut room, &mut pending, &mut none);
        assert_eq!(&room[..n], run_tiles(long.src, long.dst, long.len).collect::<Vec<_>>().as_slice());
        // A room of one takes the first tile of a long run and keeps the rest pending.
        let mut pending = Some(long);
        assert_eq!(fill(&mut room[..1], &mut pending, &mut none), 1);
        let rest = pending.expect("the rest of the run");
        assert_eq!(rest.src + rest.len, long.src + long.len);
        assert_eq!(rest.src - long.src, u64::from(room[0].bytes()));
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
            let tiles = apply(&mut memory, bounce_runs(BOUNCE, len, true, segs.iter().copied()));
            let b = BOUNCE as usize;
            assert_eq!(&memory[b..b + len], &stream[..], "round {round}: the gathered bytes");
            assert_eq!(&memory[b + len..], &original[b + len..], "round {round}: past the gather");
            assert_eq!(&memory[..b], &original[..b], "round {round}: the sources");
            let filled: Vec<_> = segs.iter().filter(|s| s.1 > 0).collect();
            let side_by_side = filled.windows(2).filter(|w| w[0].0 + w[0].1 == w[1].0).count();
            assert!(side_by_side > 0 || count < 3, "round {round}: the test has side-by-side segments");
            let runs = bounce_runs(BOUNCE, len, true, segs.iter().copied()).count();
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
            apply(&mut back, bounce_runs(BOUNCE, short, false, segs.iter().copied()));
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

    /// GPU 0's copier, or `None` (test skipped) without a GPU or NVRTC.
    fn gpu_copier() -> Option<(Arc<Gpu>, TileCopier)> {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return None;
        }
        let gpu = Gpu::open(0).unwrap();
        TileCopier::build(&gpu);
        let copier = TileCopier::if_built(&gpu).expect("the build ended");
        if testkit::skip_without("NVRTC", copier.is_ok()) {
            return None;
        }
        Some((gpu, copier.unwrap()))
    }

    fn numbered(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 31 + seed * 7) % 253) as u8).collect()
    }

    /// A call of more tiles than a list holds fills a list, launches it, goes on in parameters and
    /// then in another list: every byte lands, and no byte between the pieces is written.
    #[test]
    fn a_call_of_more_tiles_than_a_list_lands_through_several_lists() {
        let Some((gpu, mut copier)) = gpu_copier() else { return };
        let _ctx = gpu.enter().unwrap();
        // 10,000 pieces of 100 bytes, one tile each, every other 100 bytes of the destination.
        const PIECES: usize = 10_000;
        let data = numbered(PIECES * 100, 1);
        let mut src = DeviceBuffer::new(0, data.len()).unwrap();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, 2 * data.len()).unwrap();
        dst.fill(0xee).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        let stream = Stream::new(&gpu).unwrap();
        let runs = (0..PIECES as u64).map(|i| (s + i * 100, d + i * 200, 100));
        // SAFETY: every range lies in a buffer of this test, untouched until the stream is synchronized.
        unsafe { copier.copy(&stream, runs) }.unwrap();
        stream.synchronize().unwrap();
        let got = dst.to_vec().unwrap();
        for i in 0..PIECES {
            assert_eq!(&got[i * 200..i * 200 + 100], &data[i * 100..(i + 1) * 100], "piece {i}");
            assert!(got[i * 200 + 100..(i + 1) * 200].iter().all(|&b| b == 0xee), "between pieces {i} and {}", i + 1);
        }
        // 4096 + 4096 + the last 1808, each list's first 254 gathered in parameters first.
        assert_eq!(copier.mapped_launches(), 3);
    }

    /// A call that fails leaves nothing behind: the tiles it had queued (here 300, in a list) never
    /// reach the next call's launch, whose caller's ranges alone are copied.
    #[test]
    fn a_failed_call_leaves_no_tile_to_the_next() {
        let Some((gpu, mut copier)) = gpu_copier() else { return };
        let _ctx = gpu.enter().unwrap();
        let data = numbered(1 << 20, 3);
        let mut src = DeviceBuffer::new(0, data.len()).unwrap();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, data.len()).unwrap();
        dst.fill(0).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        let stream = Stream::new(&gpu).unwrap();
        let failed = copier.call(|c| {
            for i in 0..300u64 {
                // SAFETY: both ranges lie in this test's buffers (nothing is launched).
                unsafe { c.push_run(&stream, Run { src: s + i * 1024, dst: d + i * 1024, len: 512 })? };
            }
            Err(Error::internal("failed after queueing its tiles"))
        });
        assert!(failed.is_err());
        // SAFETY: every range lies in this test's buffers, untouched until the stream is synchronized.
        unsafe { copier.copy(&stream, std::iter::once((s + (900 << 10), d + (900 << 10), 4096))) }.unwrap();
        stream.synchronize().unwrap();
        let got = dst.to_vec().unwrap();
        assert_eq!(&got[900 << 10..(900 << 10) + 4096], &data[900 << 10..(900 << 10) + 4096], "the next call's copy");
        assert!(got[..300 << 10].iter().all(|&b| b == 0), "a tile of the failed call was launched");
        assert_eq!(copier.mapped_launches(), 0, "the failed call's list was dropped, not launched");
    }

    /// A word in mapped memory a stream waits on until it is 1: opened at the latest when dropped,
    /// so that a failing test never leaves a stream waiting (a stream's drop synchronizes it).
    struct Gate(crate::cuda::memory::MappedBuffer);

    impl Gate {
        fn closed(gpu: &Arc<Gpu>) -> Gate {
            let gate = Gate(crate::cuda::memory::MappedBuffer::new(gpu, 4).unwrap());
            // SAFETY: 4 bytes of pinned memory this gate owns.
            unsafe { std::ptr::write_volatile(gate.0.as_ptr().cast::<u32>(), 0) };
            gate
        }

        fn open(&self) {
            // SAFETY: as above; a waiting stream reads the word once it is written.
            unsafe { std::ptr::write_volatile(self.0.as_ptr().cast::<u32>(), 1) };
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.open();
        }
    }

    /// Calls queued behind a gate keep their lists in flight: a list is never refilled before the
    /// launch that reads it ran, so the calls beyond the lists carry their tiles in parameters, and
    /// every call lands its own bytes. A copier that refilled a busy list would launch more lists
    /// and land a later call's bytes for an earlier one.
    #[test]
    fn a_list_in_flight_is_never_refilled() {
        let Some((gpu, mut copier)) = gpu_copier() else { return };
        let _ctx = gpu.enter().unwrap();
        const CALLS: usize = 2 * MAX_LISTS;
        const PIECES: usize = 1000;
        let sources: Vec<DeviceBuffer> = (0..CALLS)
            .map(|c| {
                let mut b = DeviceBuffer::new(0, PIECES * 512).unwrap();
                b.copy_from_host(0, &numbered(PIECES * 512, c)).unwrap();
                b
            })
            .collect();
        let mut dst = DeviceBuffer::new(0, CALLS * PIECES * 1024).unwrap();
        dst.fill(0).unwrap();
        let stream = Stream::new(&gpu).unwrap();
        // The stream waits for the host to open the gate: every launch below stays queued. Made
        // after the stream, so dropped (and opened) before it, should the test fail.
        let gate = Gate::closed(&gpu);
        let flags = sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32;
        // SAFETY: the word's device address is of this GPU's context, current; it outlives the stream's wait.
        check(
            unsafe { sys::cuStreamWaitValue32_v2(stream.raw(), gate.0.device_ptr(), 1, flags) },
            "cuStreamWaitValue32_v2",
        )
        .unwrap();
        for (c, src) in sources.iter().enumerate() {
            let (s, d) = (src.addr() as u64, dst.addr() as u64 + (c * PIECES * 1024) as u64);
            let runs = (0..PIECES as u64).map(move |i| (s + i * 512, d + i * 1024, 512));
            // SAFETY: every range lies in a buffer of this test, untouched until the stream is synchronized.
            unsafe { copier.copy(&stream, runs) }.unwrap();
        }
        let in_flight = copier.mapped_launches();
        gate.open();
        stream.synchronize().unwrap();
        assert_eq!(in_flight, MAX_LISTS as u64, "one list per call while all are queued");
        let got = dst.to_vec().unwrap();
        for c in 0..CALLS {
            let want = numbered(PIECES * 512, c);
            for i in 0..PIECES {
                let at = c * PIECES * 1024 + i * 1024;
                assert_eq!(&got[at..at + 512], &want[i * 512..(i + 1) * 512], "call {c}, piece {i}");
            }
        }
        // Once they ran, the lists serve again.
        let (s, d) = (sources[0].addr() as u64, dst.addr() as u64);
        // SAFETY: as above.
        unsafe { copier.copy(&stream, (0..PIECES as u64).map(|i| (s + i * 512, d + i * 1024, 512))) }.unwrap();
        stream.synchronize().unwrap();
        assert_eq!(copier.mapped_launches(), MAX_LISTS as u64 + 1);
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
            bounce_runs(1000, 7, false, [(0, 4), (4, 4), (50, 9)].into_iter()).map(|r| (r.src, r.dst, r.len)).collect();
        assert_eq!(scatter, [(1000, 0, 7)], "the bytes end inside the second segment");
        let gather: Vec<_> = bounce_runs(1000, 6, true, [(50, 3), (0, 0), (53, 2), (10, 1), (90, 4)].into_iter())
            .map(|r| (r.src, r.dst, r.len))
            .collect();
        assert_eq!(gather, [(50, 1000, 5), (10, 1005, 1)]);
    }
}
