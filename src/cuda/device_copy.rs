//! Asynchronous copies of the same-host path: the copies of one call go back to back on a stream of
//! the issuing GPU and one event marks their end, which the engine polls (no library thread waits
//! on a copy; a caller waiting for its own transfer blocks on the event). Between GPUs of this process a copy names both primary contexts (`cuMemcpyPeerAsync`);
//! everything else (one GPU, host memory, a peer's allocation mapped here) is a unified-address
//! `cuMemcpyAsync`. Peer access is never enabled on the user's contexts: peer copies use the
//! GPUs' direct link without it. A call of many small copies whose every end is memory of the
//! issuing GPU (a KV cache's blocks between two processes of one GPU, or two engines of one
//! process) goes through the unpack kernel instead, its tiles in one launch or a few: each copy issued
//! on its own costs the poster about 5 us and moved 1024 blocks of 16 KiB at 3 GB/s on an H100.

use std::sync::Arc;

use cudarc::driver::sys;

use super::segments::{Built, TileCopier};
use super::stream::{Event, Stream};
use super::unpack::{UnpackKernels, addressable};
use super::{Gpu, check};
use crate::error::Result;

/// Calls of at least this many copies, averaging at most `KERNEL_MAX_AVERAGE` bytes, go through
/// the unpack kernel when every end lies on the issuing GPU. Below, the copies' own launches cost
/// less than the kernel's launch (one per call, or per list of 4096 tiles of 4 KiB, each about as
/// much as a copy).
const KERNEL_MIN_COPIES: usize = 4;
const KERNEL_MAX_AVERAGE: usize = 512 << 10;
/// No copy of such a call is larger: one large copy among many small ones would cost more launches
/// as tiles than it saves.
const KERNEL_MAX_COPY: usize = 4 << 20;

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
    /// The unpack kernel of the queue's GPU: calls are issued under the connection's lock, so the
    /// engine builds it when it registers the GPU's memory, and calls copy one by one until then.
    kernel: Built<TileCopier>,
    /// Calls that went through the kernel.
    by_kernel: u64,
}

impl CopyQueue {
    pub fn new(gpu: &Arc<Gpu>) -> Result<CopyQueue> {
        Ok(CopyQueue { stream: Stream::new(gpu)?, spare: Vec::new(), kernel: Built::Waiting, by_kernel: 0 })
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
                // SAFETY: per the contract; every end is device memory of this GPU (`kernel_for`).
                let copied = unsafe { kernel.copy(&self.stream, copies.iter().map(|c| (c.src, c.dst, c.len as u64))) };
                self.by_kernel += u64::from(copied.is_ok());
                copied
            }
            // SAFETY: per the contract.
            None => copies.iter().try_for_each(|c| unsafe { self.queue_one(c) }),
        };
        let marked = queued.and_then(|()| {
            let event = match self.spare.pop() {
                Some(e) => e,
                None => Event::new(&gpu)?,
            };
            event.record(&self.stream).map(|()| event)
        });
        if marked.is_err() {
            let _ = self.stream.synchronize();
        }
        marked
    }

    /// Calls so far whose copies went through the kernel.
    pub fn batches_by_kernel(&self) -> u64 {
        self.by_kernel
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

/// Whether `copies` suit the kernel of GPU `here`, built or not: many and small enough, every end
/// memory that `here`'s kernels address within a tile's reach (its own allocations, and peers'
/// allocations mapped into its context, which CUDA IPC maps with peer access), and independent.
/// Two passes over the copies (this one's checks, then `independent`'s), as they are walked under
/// a connection's lock for every call of a vector's pieces.
fn kernel_fits(here: i32, copies: &[DeviceCopy]) -> bool {
    if copies.len() < KERNEL_MIN_COPIES {
        return false;
    }
    let here = Some(here);
    let mut bytes = 0usize;
    for c in copies {
        let fits = c.len <= KERNEL_MAX_COPY
            && c.src_gpu == here
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
    kernel: &'a mut Built<TileCopier>,
    gpu: &Arc<Gpu>,
    copies: &[DeviceCopy],
    takes: Option<bool>,
) -> Option<&'a mut TileCopier> {
    if !takes.unwrap_or_else(|| kernel_takes(gpu.ordinal(), copies)) {
        return None;
    }
    kernel.get(
        || TileCopier::if_built(gpu),
        |e| log::info!("device copies go one by one on {gpu:?}: no unpack kernel ({e})"),
    )
}

/// Whether `copies` may run all at once and leave what they would one after another: no copy
/// reads bytes another writes (the sources' span and the destinations' span are apart) and no two
/// write the same bytes. Copies one by one, in order, are what a call that breaks this gets.
fn independent(copies: &[DeviceCopy]) -> bool {
    // One pass: both spans, and whether the destinations lie in address order either way (a KV
    // cache's blocks often do), which needs no sort.
    let (mut src_lo, mut src_hi, mut dst_lo, mut dst_hi) = (u64::MAX, 0, u64::MAX, 0);
    let (mut rising, mut falling) = (true, true);
    let mut previous: Option<(u64, u64)> = None;
    for c in copies {
        let len = c.len as u64;
        let (src_end, dst_end) = (c.src.saturating_add(len), c.dst.saturating_add(len));
        (src_lo, src_hi) = (src_lo.min(c.src), src_hi.max(src_end));
        (dst_lo, dst_hi) = (dst_lo.min(c.dst), dst_hi.max(dst_end));
        if let Some((start, end)) = previous {
            rising &= end <= c.dst;
            falling &= dst_end <= start;
        }
        previous = Some((c.dst, dst_end));
    }
    if src_lo < dst_hi && dst_lo < src_hi {
        return false;
    }
    if rising || falling {
        return true;
    }
    // A scattered block table: sorted by start. One u64 per copy, its offset from the lowest start
    // above its length, where both fit: sorting those took half the time of (start, end) pairs
    // (8,192 copies, 60-90 us against 125-190 us), under the connection's lock on every call.
    if let Some(apart) = packed_apart(copies, dst_lo, dst_hi) {
        return apart;
    }
    let mut written: Vec<(u64, u64)> =
        copies.iter().map(|c| (c.dst, c.dst.saturating_add(c.len as u64))).filter(|(start, end)| start < end).collect();
    written.sort_unstable();
    written.windows(2).all(|pair| pair[0].1 <= pair[1].0)
}

/// Bits of a packed key that hold a copy's length: every copy the kernel takes is shorter than 2^23
/// (`KERNEL_MAX_COPY`); longer ones make the caller sort pairs.
const LEN_BITS: u32 = 23;

/// Whether no two of `copies`' destinations share a byte, by one sort of packed u64 keys (offset
/// from `lo` above the length); `None` where a length or the span `lo..hi` does not fit them.
fn packed_apart(copies: &[DeviceCopy], lo: u64, hi: u64) -> Option<bool> {
    if hi.saturating_sub(lo) >= 1 << (64 - LEN_BITS) {
        return None;
    }
    let mut keys = Vec::with_capacity(copies.len());
    for c in copies {
        let len = c.len as u64;
        if len >= 1 << LEN_BITS {
            return None;
        }
        if len > 0 {
            keys.push((c.dst - lo) << LEN_BITS | len);
        }
    }
    keys.sort_unstable();
    let end = |k: u64| (k >> LEN_BITS) + (k & ((1 << LEN_BITS) - 1));
    Some(keys.windows(2).all(|pair| end(pair[0]) <= pair[1] >> LEN_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::DeviceBuffer;

    fn copy(src: u64, dst: u64, len: usize) -> DeviceCopy {
        DeviceCopy { dst, dst_gpu: Some(0), src, src_gpu: Some(0), len }
    }

    #[test]
    fn copies_run_at_once_only_when_none_reads_or_writes_what_another_writes() {
        let apart = [copy(0x1000, 0x9000, 0x100), copy(0x1100, 0x8000, 0x100), copy(0x1000, 0x9100, 0x100)];
        assert!(independent(&apart), "sources may repeat and lie side by side, destinations apart");
        let reads_a_write = [copy(0x1000, 0x9000, 0x100), copy(0x9000, 0x5000, 0x100)];
        assert!(!independent(&reads_a_write), "a source inside the destinations' span");
        let same_bytes = [copy(0x1000, 0x9000, 0x100), copy(0x2000, 0x90ff, 0x100)];
        assert!(!independent(&same_bytes), "two destinations share a byte");
        let touching = [copy(0x1000, 0x9000, 0x100), copy(0x2000, 0x9100, 0x100), copy(0x3000, 0x8f00, 0x100)];
        assert!(independent(&touching), "destinations side by side share no byte");
        let empty = [copy(0x1000, 0x9000, 0), copy(0x2000, 0x9000, 0x100)];
        assert!(independent(&empty), "an empty copy writes nothing");
        let descending = [copy(0x1000, 0x9200, 0x100), copy(0x2000, 0x9100, 0x100), copy(0x3000, 0x9000, 0x100)];
        assert!(independent(&descending), "destinations in falling order");
        let falling_overlap = [copy(0x1000, 0x9200, 0x100), copy(0x2000, 0x9150, 0x100)];
        assert!(!independent(&falling_overlap), "in no order once they overlap");
        let rising_overlap = [copy(0x1000, 0x9000, 0x100), copy(0x2000, 0x90ff, 0x100), copy(0x3000, 0x9400, 0x10)];
        assert!(!independent(&rising_overlap));
    }

    /// What the kernel of GPU 0 takes, built or not: both ends its memory (a peer's allocation
    /// mapped into its context is labelled so by the engine), at least four copies, none over
    /// 4 MiB, half a MiB on average at most, and independent.
    #[test]
    fn the_kernel_takes_many_small_independent_copies_whose_ends_it_addresses() {
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
        large[0].len = KERNEL_MAX_COPY + 1;
        assert!(!kernel_fits(0, &large), "a copy over 4 MiB among small ones");
        assert!(!kernel_fits(0, &many(8, 600 << 10)), "averaging over half a MiB");
        let mut overlapping = many(64, 4096);
        overlapping[1].dst = overlapping[0].dst + 100;
        assert!(!kernel_fits(0, &overlapping), "two copies write the same bytes");
    }

    /// The one-pass check against its definition, pair by pair, on random calls: small address
    /// ranges so that overlaps, touching ends, empty copies and both orders all occur.
    #[test]
    fn the_one_pass_check_agrees_with_the_pairwise_definition() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1;
        let (mut yes, mut no) = (0, 0);
        for round in 0..5000 {
            let count = 1 + next(6) as usize;
            let ordered = next(3);
            let mut at = next(64);
            let copies: Vec<DeviceCopy> = (0..count)
                .map(|_| {
                    let len = next(24) as usize;
                    let dst = match ordered {
                        0 => 1000 + next(200),
                        _ => {
                            at += next(40);
                            1000 + at
                        }
                    };
                    copy(next(1200), dst, len)
                })
                .collect();
            let copies: Vec<DeviceCopy> = if ordered == 2 { copies.into_iter().rev().collect() } else { copies };
            let span =
                |ends: Vec<(u64, u64)>| ends.iter().fold((u64::MAX, 0), |(lo, hi), &(s, e)| (lo.min(s), hi.max(e)));
            let src = span(copies.iter().map(|c| (c.src, c.src + c.len as u64)).collect());
            let dst = span(copies.iter().map(|c| (c.dst, c.dst + c.len as u64)).collect());
            let spans_apart = !(src.0 < dst.1 && dst.0 < src.1);
            let writes_apart = (0..count).all(|i| {
                (0..count).all(|j| {
                    let (a, b) = (&copies[i], &copies[j]);
                    i == j || !overlap((a.dst, a.dst + a.len as u64), (b.dst, b.dst + b.len as u64))
                })
            });
            let want = spans_apart && writes_apart;
            assert_eq!(independent(&copies), want, "round {round}: {copies:?}");
            if want { yes += 1 } else { no += 1 }
        }
        assert!(yes > 500 && no > 500, "both answers occur: {yes} / {no}");
    }

    /// The packed keys agree with the pairs where they fit and step aside where they do not.
    #[test]
    fn packed_keys_decide_as_the_pairs_do_where_they_fit() {
        let scattered = |len: usize, far: u64| -> Vec<DeviceCopy> {
            (0..64u64).map(|i| copy(i << 24, (1 << 40) + ((i * 37) % 64) * far, len)).collect()
        };
        let apart = scattered(4096, 8192);
        assert_eq!(packed_apart(&apart, 1 << 40, (1 << 40) + 64 * 8192), Some(true));
        let overlapping = scattered(8193, 8192);
        assert_eq!(packed_apart(&overlapping, 1 << 40, (1 << 40) + 64 * 8192 + 1), Some(false));
        assert!(!independent(&overlapping) && independent(&apart));
        let long = scattered(1 << LEN_BITS, 1 << 24);
        assert_eq!(packed_apart(&long, 1 << 40, (1 << 40) + (65 << 24)), None, "a length over 23 bits");
        assert!(independent(&long), "the pairs decide it");
        let wide = [copy(0, 0x10, 16), copy(0, 1 << 50, 16), copy(0, 0x20, 16)];
        assert_eq!(packed_apart(&wide, 0x10, (1 << 50) + 16), None, "a span over 41 bits");
        assert!(independent(&wide));
    }

    /// Many small copies on one GPU go through the kernel (when it can be built), in one call, and
    /// land as the copies one by one would; copies that write the same bytes, or read what others
    /// write, still go one by one, in order.
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
        let Built::Ready(copier) = &queue.kernel else { panic!("the kernel was taken") };
        assert!(copier.mapped_launches() >= 1, "256 pieces of 4-13 KiB are more tiles than parameters carry");
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
