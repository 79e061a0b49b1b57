//! Asynchronous copies of the same-host path: the copies of one call go back to back on a stream of
//! the issuing GPU and one event marks their end, which the engine polls (no library thread waits
//! on a copy; a caller waiting for its own transfer blocks on the event). Between GPUs of this process a copy names both primary contexts (`cuMemcpyPeerAsync`);
//! everything else (one GPU, host memory, a peer's allocation mapped here) is a unified-address
//! `cuMemcpyAsync`. Peer access is never enabled on the user's contexts: peer copies use the
//! GPUs' direct link without it. A call of many small copies whose every end is memory of the
//! issuing GPU (a KV cache's blocks between two processes of one GPU, or two engines of one
//! process) goes through the unpack kernel instead, its tiles in one launch or a few: each copy issued
//! on its own costs the poster about 5 us and moved 1024 blocks of 16 KiB at 3 GB/s on an H100.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;

use super::gpu::ContextRestore;
use super::pieces::PieceCopier;
use super::segments::Built;
use super::stream::{Event, Stream};
use super::unpack::{UnpackKernels, addressable};
use super::{Gpu, check};
use crate::error::Result;

/// Calls of at least this many copies, averaging at most `KERNEL_MAX_AVERAGE` bytes, go through
/// the piece kernel when every end lies on the issuing GPU. Below, the copies' own launches cost
/// less than the kernel's launch (one per call, or per list of 16,384 pieces, each about as much
/// as a copy); larger copies keep the copy engines, which leave the SMs to the user's kernels.
const KERNEL_MIN_COPIES: usize = 4;
const KERNEL_MAX_AVERAGE: usize = 512 << 10;

/// One copy: `len` bytes from `src` to `dst`. An end with a GPU is memory that GPU's kernels
/// address: its own allocations in this process, or a peer's allocation mapped into its context.
/// An end without one is host memory or another GPU's allocation, which only copies reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCopy {
    pub dst: u64,
    pub dst_gpu: Option<i32>,
    pub src: u64,
    pub src_gpu: Option<i32>,
    pub len: usize,
}

/// Events kept for reuse per queue: one per batch in flight, so this bounds nothing but the spares.
const SPARE_EVENTS: usize = 64;

pub struct CopyQueue {
    stream: Stream,
    spare: Vec<Event>,
    /// The piece kernel of the queue's GPU: calls are issued under the connection's lock, so the
    /// engine builds it when it registers the GPU's memory, and calls copy one by one until then.
    kernel: Built<PieceCopier>,
    /// Calls that went through the kernel.
    by_kernel: u64,
}

/// Copy queues made in this process (`CopyQueue::made`).
static MADE: AtomicU64 = AtomicU64::new(0);

/// Copy queues no connection holds, of every GPU, for the next connection that copies. A stream
/// costs its GPU about 0.5-1 MiB (H200), which the driver keeps after the stream is destroyed and
/// hands to the next one made: what streams cost is set by the most that ever lived at once. So a
/// connection holds a queue only while its copies are in flight, and a process's queues follow
/// its busiest moment, not its connections.
static IDLE: Mutex<Vec<CopyQueue>> = Mutex::new(Vec::new());

/// Idle queues kept per GPU: dropping one would give back no stream memory, and making one again
/// costs a busy connection a stream's creation and destruction at every call (at 64 connections
/// writing at once, half the rate). Past [`KEEP_LISTS`] idle queues, one given back frees its
/// piece lists, which are memory the driver does give back.
const KEEP_IDLE: usize = 256;
const KEEP_LISTS: usize = 8;

impl CopyQueue {
    pub fn new(gpu: &Arc<Gpu>) -> Result<CopyQueue> {
        let queue = CopyQueue { stream: Stream::new(gpu)?, spare: Vec::new(), kernel: Built::Waiting, by_kernel: 0 };
        MADE.fetch_add(1, Ordering::Relaxed);
        Ok(queue)
    }

    /// An idle queue of `gpu` (the last given back, which kept its piece lists), else a new one.
    pub fn take(gpu: &Arc<Gpu>) -> Result<CopyQueue> {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        match idle.iter().rposition(|q| q.gpu().ordinal() == gpu.ordinal()) {
            Some(at) => Ok(idle.remove(at)),
            None => {
                drop(idle);
                CopyQueue::new(gpu)
            }
        }
    }

    /// Gives the queue back for another connection once nothing queued on it is awaited (a
    /// caller may still hold the event of its last batch: that event is never recorded again).
    pub fn give_back(mut self) {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        let ordinal = self.gpu().ordinal();
        let kept = idle.iter().filter(|q| q.gpu().ordinal() == ordinal).count();
        if kept >= KEEP_IDLE {
            return;
        }
        if kept >= KEEP_LISTS
            && let Built::Ready(kernel) = &mut self.kernel
            && let Ok(_ctx) = self.stream.gpu().enter()
        {
            kernel.trim();
            // Behind the warm ones: `take` hands out the last first.
            idle.insert(0, self);
            return;
        }
        idle.push(self);
    }

    /// Idle queues of GPU `ordinal`.
    pub fn idle(ordinal: i32) -> usize {
        IDLE.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|q| q.gpu().ordinal() == ordinal).count()
    }

    /// Copy queues made in this process so far: for tests of what a first transfer sets up.
    pub fn made() -> u64 {
        MADE.load(Ordering::Relaxed)
    }

    /// Readies the queue for its first batch: an event kept for it, and one operation done on the
    /// stream, so that what the driver sets up at a stream's first work is done as well.
    pub fn ready(&mut self) -> Result<()> {
        let gpu = self.stream.gpu().clone();
        let _ctx = gpu.enter()?;
        let event = mark(&self.stream, &mut self.spare, Ok(()))?;
        event.synchronize()?;
        self.recycle(event);
        Ok(())
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        self.stream.gpu()
    }

    /// Queues `copies` in order and returns the event that fires once all of them finished. On an
    /// error the copies queued before it have been waited for, so nothing touches their memory.
    ///
    /// # Safety
    /// Every range is memory that stays valid and reserved to these copies until the event fired
    /// (or, on error, until this returned).
    pub unsafe fn issue(&mut self, copies: &[DeviceCopy]) -> Result<Event> {
        // SAFETY: per the contract.
        unsafe { self.issue_known(copies, None) }
    }

    /// `issue`, where the caller already asked `kernel_takes` of these copies (`Some`): the
    /// answer is not worked out again, a second pass over every copy under the connection's lock.
    ///
    /// # Safety
    /// As for `issue`.
    pub unsafe fn issue_known(&mut self, copies: &[DeviceCopy], takes: Option<bool>) -> Result<Event> {
        let gpu = self.stream.gpu().clone();
        let _ctx = gpu.enter()?;
        let queued = match kernel_for(&mut self.kernel, &gpu, copies, takes) {
            Some(kernel) => {
                // SAFETY: per the contract; every end is device memory of this GPU, addressable
                // (`kernel_for`).
                let copied = unsafe {
                    copies
                        .iter()
                        .try_for_each(|c| kernel.push(&self.stream, c.src, c.dst, c.len as u64))
                        .and_then(|()| kernel.finish(&self.stream))
                };
                if copied.is_err() {
                    kernel.abandon();
                }
                self.by_kernel += u64::from(copied.is_ok());
                copied
            }
            // SAFETY: per the contract.
            None => copies.iter().try_for_each(|c| unsafe { self.queue_one(c) }),
        };
        mark(&self.stream, &mut self.spare, queued)
    }

    /// A call through the piece kernel whose copies the caller lists one at a time, each full list
    /// launched at once, so the GPU starts on a long call while the rest is still being worked out;
    /// `None` while the kernel is not built (or cannot be). The GPU's context is current while the
    /// call lives.
    pub fn piece_call(&mut self) -> Result<Option<PieceCall<'_>>> {
        let gpu = self.stream.gpu().clone();
        let ctx = gpu.enter()?;
        let CopyQueue { stream, spare, kernel, by_kernel } = self;
        let Some(kernel) = kernel.get(
            || PieceCopier::if_built(&gpu),
            |e| log::info!("device copies go one by one on {gpu:?}: no piece kernel ({e})"),
        ) else {
            return Ok(None);
        };
        Ok(Some(PieceCall { kernel, stream, spare, by_kernel, _ctx: ctx, ended: false }))
    }

    /// The piece kernel's copier, once this queue took it.
    #[cfg(test)]
    pub(crate) fn piece_copier(&self) -> Option<&PieceCopier> {
        match &self.kernel {
            Built::Ready(copier) => Some(copier),
            Built::Waiting | Built::Unavailable => None,
        }
    }

    /// Calls so far whose copies went through the kernel.
    pub fn batches_by_kernel(&self) -> u64 {
        self.by_kernel
    }

    /// The calls that went through the kernel since the last time this was asked.
    pub fn take_batches_by_kernel(&mut self) -> u64 {
        std::mem::take(&mut self.by_kernel)
    }

    /// Takes back a fired event for later batches.
    pub fn recycle(&mut self, event: Event) {
        if self.spare.len() < SPARE_EVENTS {
            self.spare.push(event);
        }
    }

    /// Events kept for later batches.
    #[cfg(test)]
    pub(crate) fn spare_events(&self) -> usize {
        self.spare.len()
    }

    /// Waits for every copy queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()
    }

    /// # Safety
    /// As for `issue`; the issuing GPU's context is current.
    unsafe fn queue_one(&self, c: &DeviceCopy) -> Result<()> {
        let stream = self.stream.raw();
        match (c.dst_gpu, c.src_gpu) {
            (Some(d), Some(s)) if d != s => {
                let (dst_gpu, src_gpu) = (Gpu::open(d)?, Gpu::open(s)?);
                check(
                    // SAFETY: both ranges are device memory of the named GPUs (the contract); the
                    // contexts are those GPUs' primary contexts, retained for the process's life.
                    unsafe {
                        sys::cuMemcpyPeerAsync(
                            c.dst,
                            dst_gpu.raw_context(),
                            c.src,
                            src_gpu.raw_context(),
                            c.len,
                            stream,
                        )
                    },
                    "cuMemcpyPeerAsync",
                )
            }
            // SAFETY: per the contract; unified addressing tells the driver what each end is.
            _ => check(unsafe { sys::cuMemcpyAsync(c.dst, c.src, c.len, stream) }, "cuMemcpyAsync"),
        }
    }
}

/// A call through the piece kernel (`CopyQueue::piece_call`). Dropped without [`end`](Self::end)
/// (an error on the way), its pieces not yet launched are dropped and the stream is waited for,
/// so nothing it launched still touches the caller's ranges.
pub struct PieceCall<'a> {
    kernel: &'a mut PieceCopier,
    stream: &'a Stream,
    spare: &'a mut Vec<Event>,
    by_kernel: &'a mut u64,
    _ctx: ContextRestore,
    ended: bool,
}

impl PieceCall<'_> {
    /// Lists one copy of `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges are device memory the queue's GPU's kernels address (its own allocations, or a
    /// peer's mapped into its context), below 2^52 (`unpack::addressable`), valid and reserved to
    /// this copy until the event [`end`](Self::end) returns fired (or the call was dropped).
    #[inline]
    pub unsafe fn push(&mut self, src: u64, dst: u64, len: u64) -> Result<()> {
        // SAFETY: forwarded from the caller; the context is current (`_ctx`).
        unsafe { self.kernel.push(self.stream, src, dst, len) }
    }

    /// Launches the rest and returns the event that fires once every copy of the call finished.
    pub fn end(mut self) -> Result<Event> {
        self.ended = true;
        // SAFETY: the pieces were listed under `push`'s contract.
        let launched = unsafe { self.kernel.finish(self.stream) };
        if launched.is_err() {
            self.kernel.abandon();
        }
        *self.by_kernel += u64::from(launched.is_ok());
        mark(self.stream, self.spare, launched)
    }
}

impl Drop for PieceCall<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.kernel.abandon();
            let _ = self.stream.synchronize();
        }
    }
}

/// The event behind what `queued` queued on `stream`, or, where queuing or recording failed, the
/// error once the stream passed everything queued before it. The GPU's context is current.
fn mark(stream: &Stream, spare: &mut Vec<Event>, queued: Result<()>) -> Result<Event> {
    let marked = queued.and_then(|()| {
        let event = match spare.pop() {
            Some(e) => e,
            None => Event::new(stream.gpu())?,
        };
        event.record(stream).map(|()| event)
    });
    if marked.is_err() {
        let _ = stream.synchronize();
    }
    marked
}

/// Whether GPU `ordinal`'s unpack kernel is built; never builds it.
fn kernel_ready(ordinal: i32) -> bool {
    usize::try_from(ordinal).is_ok_and(|o| matches!(UnpackKernels::if_built(o), Some(Ok(_))))
}

/// Whether a call of `copies` issued on GPU `here` goes through its unpack kernel rather than one
/// copy each: the one question both the queue and the engine's choice of path ask, so that a call
/// the engine keeps on the device path for the kernel is one the kernel takes.
pub fn kernel_takes(here: i32, copies: &[DeviceCopy]) -> bool {
    kernel_fits(here, copies) && kernel_ready(here)
}

/// Whether `listed` pieces of `bytes` in all, every end already known to be memory that GPU
/// `here`'s kernels address, go through its piece kernel: as many and as small as `kernel_takes`
/// asks of copies, the kernel built. The same-host paths that list pieces straight from their
/// runs ask this.
pub fn kernel_takes_listed(here: i32, listed: usize, bytes: u64) -> bool {
    listed >= KERNEL_MIN_COPIES
        && bytes <= (listed as u64).saturating_mul(KERNEL_MAX_AVERAGE as u64)
        && kernel_ready(here)
}

/// Whether `copies` suit the kernel of GPU `here`, built or not: many and small enough, every end
/// memory that `here`'s kernels address within a tile's reach (its own allocations, and peers'
/// allocations mapped into its context, which CUDA IPC maps with peer access), and independent.
fn kernel_fits(here: i32, copies: &[DeviceCopy]) -> bool {
    if copies.len() < KERNEL_MIN_COPIES {
        return false;
    }
    let here = Some(here);
    let mut bytes = 0usize;
    for c in copies {
        let fits = c.src_gpu == here
            && c.dst_gpu == here
            && addressable(c.src, c.len as u64)
            && addressable(c.dst, c.len as u64);
        if !fits {
            return false;
        }
        bytes += c.len;
    }
    bytes <= copies.len().saturating_mul(KERNEL_MAX_AVERAGE) && independent(copies)
}

/// The kernel, where it takes `copies` (`kernel_takes`, or `takes` where the caller asked it) and
/// this queue got hold of it.
fn kernel_for<'a>(
    kernel: &'a mut Built<PieceCopier>,
    gpu: &Arc<Gpu>,
    copies: &[DeviceCopy],
    takes: Option<bool>,
) -> Option<&'a mut PieceCopier> {
    if !takes.unwrap_or_else(|| kernel_takes(gpu.ordinal(), copies)) {
        return None;
    }
    kernel.get(
        || PieceCopier::if_built(gpu),
        |e| log::info!("device copies go one by one on {gpu:?}: no unpack kernel ({e})"),
    )
}

/// Whether `copies` may run all at once: no copy reads bytes another writes (the sources' span and
/// the destinations' span are apart), which only copies in order get right. Bytes two copies of a
/// call both write get either copy's bytes, as on the network path and the host-memory path, so
/// destinations may overlap: checking that they do not took a sort of every destination under the
/// connection's lock (8,192 of them: 60-90 us on the 2-core machine).
fn independent(copies: &[DeviceCopy]) -> bool {
    let (mut src_lo, mut src_hi, mut dst_lo, mut dst_hi) = (u64::MAX, 0, u64::MAX, 0);
    for c in copies {
        let len = c.len as u64;
        (src_lo, src_hi) = (src_lo.min(c.src), src_hi.max(c.src.saturating_add(len)));
        (dst_lo, dst_hi) = (dst_lo.min(c.dst), dst_hi.max(c.dst.saturating_add(len)));
    }
    !(src_lo < dst_hi && dst_lo < src_hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::DeviceBuffer;

    fn copy(src: u64, dst: u64, len: usize) -> DeviceCopy {
        DeviceCopy { dst, dst_gpu: Some(0), src, src_gpu: Some(0), len }
    }

    #[test]
    fn copies_run_at_once_unless_one_reads_what_another_writes() {
        let apart = [copy(0x1000, 0x9000, 0x100), copy(0x1100, 0x8000, 0x100), copy(0x1000, 0x9100, 0x100)];
        assert!(independent(&apart), "sources may repeat and lie side by side, destinations apart");
        let reads_a_write = [copy(0x1000, 0x9000, 0x100), copy(0x9000, 0x5000, 0x100)];
        assert!(!independent(&reads_a_write), "a source inside the destinations' span");
        let reads_itself = [copy(0x1000, 0x1080, 0x100), copy(0x3000, 0x9000, 0x10)];
        assert!(!independent(&reads_itself), "a copy overlapping its own destination");
        let same_bytes = [copy(0x1000, 0x9000, 0x100), copy(0x2000, 0x90ff, 0x100)];
        assert!(independent(&same_bytes), "two destinations sharing a byte get either copy's");
        let empty = [copy(0x1000, 0x9000, 0), copy(0x2000, 0x9000, 0x100)];
        assert!(independent(&empty), "an empty copy writes nothing");
    }

    /// What the kernel of GPU 0 takes, built or not: both ends its memory (a peer's allocation
    /// mapped into its context is labelled so by the engine), at least four copies, half a MiB on
    /// average at most, and none reading what another writes.
    #[test]
    fn the_kernel_takes_many_small_copies_whose_ends_it_addresses() {
        let many = |n: u64, len: usize| -> Vec<DeviceCopy> {
            (0..n).map(|i| copy(0x10_0000 + i * 0x10_0000, 0x1_0000_0000 + i * 0x10_0000, len)).collect()
        };
        assert!(kernel_fits(0, &many(64, 4096)));
        assert!(kernel_fits(0, &many(4, 4096)), "four is enough");
        assert!(!kernel_fits(0, &many(3, 4096)), "three copies cost less than a launch");
        assert!(!kernel_fits(1, &many(64, 4096)), "memory of another GPU than the issuing one");
        let mut host_end = many(64, 4096);
        host_end[5].dst_gpu = None;
        assert!(!kernel_fits(0, &host_end), "one end in host memory");
        let mut other_gpu = many(64, 4096);
        other_gpu[63].src_gpu = Some(1);
        assert!(!kernel_fits(0, &other_gpu), "one end on another GPU");
        let mut large = many(64, 4096);
        large[0].len = 8 << 20;
        assert!(kernel_fits(0, &large), "one large copy among small ones is cut into pieces");
        assert!(!kernel_fits(0, &many(8, 600 << 10)), "averaging over half a MiB");
        let mut unreachable = many(64, 4096);
        unreachable[2].dst = 1 << 52;
        assert!(!kernel_fits(0, &unreachable), "beyond a tile's 52-bit addresses");
        let mut chained = many(64, 4096);
        chained[1].src = chained[0].dst;
        assert!(!kernel_fits(0, &chained), "a copy reads what another writes");
    }

    /// Many small copies on one GPU go through the kernel (when it can be built), in one call, and
    /// land as the copies one by one would; copies that read what others write still go one by
    /// one, in order.
    #[test]
    fn many_small_copies_on_one_gpu_go_through_the_kernel_and_land() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        const LEN: usize = 4 << 20;
        let gpu = Gpu::open(0).unwrap();
        let data: Vec<u8> = (0..LEN).map(|i| (i * 13 % 251) as u8).collect();
        let mut src = DeviceBuffer::new(0, LEN).unwrap();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, LEN).unwrap();
        dst.fill(0).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        // 256 pieces of odd sizes and offsets, the destinations in reverse order of the sources.
        let pieces: Vec<(usize, usize, usize)> =
            (0..256).map(|i| (i * 16_384 + i % 7, LEN - (i + 1) * 16_384 + 3, 4096 + i * 37)).collect();
        let copies: Vec<DeviceCopy> =
            pieces.iter().map(|&(so, dof, n)| copy(s + so as u64, d + dof as u64, n)).collect();
        let mut queue = CopyQueue::new(&gpu).unwrap();
        let mut want = vec![0u8; LEN];
        for &(so, dof, n) in &pieces {
            want[dof..dof + n].copy_from_slice(&data[so..so + n]);
        }
        let built = crate::cuda::unpack::UnpackKernels::if_built(0).is_some();
        // SAFETY: every range lies in a live buffer of this test, untouched until the event fired.
        let event = unsafe { queue.issue(&copies) }.unwrap();
        event.synchronize().unwrap();
        assert!(dst.to_vec().unwrap() == want, "every piece in place, nothing else written");
        // Builds it if no other test of this process did (the engine builds it at registration;
        // a queue never does).
        let kernel = {
            let _ctx = gpu.enter().unwrap();
            crate::cuda::unpack::UnpackKernels::for_device(0).is_ok()
        };
        let first = queue.batches_by_kernel();
        assert!(first <= u64::from(kernel), "not through a kernel that cannot be built");
        assert!(first == u64::from(kernel) || !built, "through the kernel where it was built already");
        // Again, now that the build ended: the kernel wherever it could be built.
        dst.fill(0).unwrap();
        // SAFETY: as above.
        let event = unsafe { queue.issue(&copies) }.unwrap();
        event.synchronize().unwrap();
        assert!(dst.to_vec().unwrap() == want, "every piece in place again");
        let by_kernel = first + u64::from(kernel);
        assert_eq!(queue.batches_by_kernel(), by_kernel, "through the kernel wherever it can be built");
        if !kernel {
            println!("no unpack kernel on this host: the copies went one by one");
            return;
        }
        let copier = queue.piece_copier().expect("the kernel was taken");
        assert_eq!(copier.launches(), by_kernel, "one launch a call of 256 pieces");
        // A chain: piece k reads what piece k - 1 wrote, which only copies in order get right.
        let chain: Vec<DeviceCopy> = (0..8u64).map(|k| copy(d + k * 4096, d + (k + 1) * 4096, 4096)).collect();
        // SAFETY: as above.
        let event = unsafe { queue.issue(&chain) }.unwrap();
        event.synchronize().unwrap();
        assert_eq!(queue.batches_by_kernel(), by_kernel, "copies that depend on each other go one by one");
        let got = dst.to_vec().unwrap();
        for k in 1..=8 {
            assert_eq!(got[k * 4096..(k + 1) * 4096], want[..4096], "piece {k} of the chain");
        }
    }

    #[test]
    fn a_batch_lands_in_order_and_its_event_fires() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let gpu = Gpu::open(0).unwrap();
        let mut src = DeviceBuffer::new(0, 1 << 20).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, 1 << 20).unwrap();
        dst.fill(0).unwrap();
        let mut host = vec![0u8; 4096];
        let mut queue = CopyQueue::new(&gpu).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        let copies = [
            DeviceCopy { dst: d, dst_gpu: Some(0), src: s + 4096, src_gpu: Some(0), len: (1 << 20) - 4096 },
            DeviceCopy { dst: d + (1 << 20) - 4096, dst_gpu: Some(0), src: s, src_gpu: Some(0), len: 4096 },
            DeviceCopy { dst: host.as_mut_ptr() as u64, dst_gpu: None, src: s + 8, src_gpu: Some(0), len: 4096 },
        ];
        // SAFETY: every range lies in a live buffer of this test, untouched until the event fired.
        let event = unsafe { queue.issue(&copies) }.unwrap();
        event.synchronize().unwrap();
        assert!(event.done().unwrap());
        let got = dst.to_vec().unwrap();
        assert_eq!(&got[..(1 << 20) - 4096], &data[4096..]);
        assert_eq!(&got[(1 << 20) - 4096..], &data[..4096]);
        assert_eq!(&host[..], &data[8..4104]);
        queue.recycle(event);
        assert_eq!(queue.spare.len(), 1);
    }
}
