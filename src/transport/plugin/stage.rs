//! The send comm's staging for vectored sends: a chunk of many pieces goes to the plugin as one
//! request from one registered buffer, so the requests a transfer makes follow its bytes, not its
//! pieces (TCPX takes 16 requests per comm, each with its own control message and, on the peer,
//! its own unpack). Host pieces are copied into a host buffer, or into device memory with one copy
//! each where the plugin takes no host memory (TCPXO); device pieces are gathered into device
//! memory by the unpack kernel (`cuda::segments::TileCopier`, one warp per tile of at most 4 KiB,
//! pieces side by side joined into one copy). The comm waits for the stream before it posts,
//! since the plugin reads the buffer from its own threads.
//!
//! Buffers are registered with the comm once, on first need, sized to the chunk that needed them
//! (a power of two, at most one request's [`MAX_MESSAGE`]); one is taken per vectored send in
//! flight and comes back when the plugin reports it done, so a comm holds at most as many as it
//! has sends in flight (and one per smaller size class seen), each about a chunk.
//!
//! What the comms of one net keep idle between sends is bounded by [`StageBudget`]
//! (`UCCL_TCPX_STAGING_POOL` bytes), whatever the number of connections: a buffer given back past
//! the bound is deregistered and freed, but not while comms still make buffers (for [`CALM`] after
//! the last one was made), since a load wider than the bound would otherwise register a buffer
//! for every send (on TCPX a dma-buf import, milliseconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::cuda::memory::DeviceBuffer;
use crate::cuda::segments::TileCopier;
use crate::cuda::stream::Stream;
use crate::cuda::unpack::addressable;
use crate::cuda::{Gpu, check};
use crate::error::{Error, Result};
use crate::ncclnet::UNPACK_MAX_SLICE_SIZE as MAX_MESSAGE;
use crate::transport::{IoSeg, MemKind};

enum Memory {
    Host(Box<[u8]>),
    Device(DeviceBuffer),
}

/// The smallest staging buffer.
const MIN_STAGE: usize = 64 << 10;

/// One staging buffer and its registration with the comm.
pub(super) struct Stage {
    memory: Memory,
    len: usize,
    /// The comm's registration key.
    pub key: usize,
}

impl Stage {
    pub fn addr(&self) -> usize {
        match &self.memory {
            Memory::Host(b) => b.as_ptr() as usize,
            Memory::Device(d) => d.addr(),
        }
    }

    fn kind(&self) -> MemKind {
        match &self.memory {
            Memory::Host(_) => MemKind::Host,
            Memory::Device(d) => MemKind::Cuda { device: d.gpu().ordinal() },
        }
    }
}

/// How long after a comm of the net made a buffer nothing given back is freed (as the socket path's
/// ring pool waits before it frees past its bound).
pub(super) const CALM: Duration = Duration::from_secs(5);

/// The idle staging buffers of one net's send comms: their bytes, against the bound (read and
/// added without a lock: comms giving back at the same moment may keep a buffer past it).
pub(super) struct StageBudget {
    keep: usize,
    calm: Duration,
    idle: AtomicUsize,
    /// Since `epoch`, in nanoseconds, when a comm last made a buffer (`NEVER`: none yet): an atomic,
    /// as every send comm of the net gives buffers back on its completions.
    made: AtomicU64,
    epoch: Instant,
}

const NEVER: u64 = u64::MAX;

impl StageBudget {
    pub fn new(keep: usize, calm: Duration) -> Arc<StageBudget> {
        let (idle, made, epoch) = (AtomicUsize::new(0), AtomicU64::new(NEVER), Instant::now());
        Arc::new(StageBudget { keep, calm, idle, made, epoch })
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Bytes of buffers kept idle now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }

    fn made(&self, now: Instant) {
        self.made.store(self.since_epoch(now), Ordering::Relaxed);
    }

    /// Whether a buffer of `len` given back at `now` is kept (and counted): within the bound, or
    /// while comms still make buffers.
    fn keeps(&self, len: usize, now: Instant) -> bool {
        let fits = || self.idle.load(Ordering::Relaxed).saturating_add(len) <= self.keep;
        let busy = || {
            let made = self.made.load(Ordering::Relaxed);
            made != NEVER && self.since_epoch(now).saturating_sub(made) < self.calm.as_nanos() as u64
        };
        let kept = fits() || busy();
        if kept {
            self.idle.fetch_add(len, Ordering::Relaxed);
        }
        kept
    }

    /// A kept buffer in use again, or gone with its comm.
    fn left(&self, len: usize) {
        self.idle.fetch_sub(len, Ordering::Relaxed);
    }
}

/// The device pieces' gather: the GPU, its stream and the kernel.
struct DeviceGather {
    gpu: Arc<Gpu>,
    stream: Stream,
    copier: TileCopier,
}

/// Registers memory with the comm: address, length and kind in, the registration's key out.
pub(super) type Register<'a> = &'a mut dyn FnMut(usize, usize, MemKind) -> Result<usize>;

pub(super) struct Staging {
    free: Vec<Stage>,
    gather: Option<DeviceGather>,
    budget: Arc<StageBudget>,
}

impl Staging {
    pub fn new(budget: Arc<StageBudget>) -> Staging {
        Staging { free: Vec::new(), gather: None, budget }
    }

    /// A buffer of `kind` memory holding at least `len` bytes, registered with the comm by
    /// `register` (address, length, kind: the registration's key): a free one, or a new one. Free
    /// ones too small stay for smaller chunks: a comm's chunks come in one size but a flow's
    /// last, so few are ever made.
    fn take(&mut self, register: Register<'_>, kind: MemKind, len: usize) -> Result<Stage> {
        if let Some(i) = self.free.iter().position(|s| s.kind() == kind && s.len >= len) {
            let stage = self.free.swap_remove(i);
            self.budget.left(stage.len);
            return Ok(stage);
        }
        self.budget.made(Instant::now());
        let size = len.next_power_of_two().clamp(MIN_STAGE, MAX_MESSAGE);
        let memory = match kind {
            MemKind::Host => Memory::Host(vec![0u8; size].into_boxed_slice()),
            MemKind::Cuda { device } => Memory::Device(DeviceBuffer::new(device, size)?),
        };
        let mut stage = Stage { memory, len: size, key: 0 };
        stage.key = register(stage.addr(), size, kind)?;
        Ok(stage)
    }

    /// Gives a buffer back once the send that used it is done: kept for the next send, or handed
    /// back past the net's bound for the caller to deregister and drop.
    #[must_use]
    pub fn put(&mut self, stage: Stage) -> Option<Stage> {
        if self.budget.keeps(stage.len, Instant::now()) {
            self.free.push(stage);
            return None;
        }
        Some(stage)
    }

    /// A buffer of `into` memory holding the pieces of `iov`, `kind` memory all, side by side:
    /// `into` is `kind`, or GPU memory for host pieces.
    ///
    /// # Safety
    /// Every piece is readable `kind` memory (of this comm's GPU for device memory) that nobody
    /// writes during the call; the pieces add up to at most [`MAX_MESSAGE`] bytes.
    pub unsafe fn fill(
        &mut self,
        register: Register<'_>,
        kind: MemKind,
        into: MemKind,
        iov: &[IoSeg],
    ) -> Result<Stage> {
        let len = iov.iter().map(|s| s.len).sum();
        let mut stage = self.take(register, into, len)?;
        // SAFETY: forwarded; the buffer holds at least the pieces' total.
        let filled = unsafe { self.copy_in(&mut stage, kind, iov) };
        match filled {
            Ok(()) => Ok(stage),
            Err(e) => {
                // A failed gather may still write the buffer: it is never used again (the comm
                // fails, and its registrations go with it).
                std::mem::forget(stage);
                Err(e)
            }
        }
    }

    unsafe fn copy_in(&mut self, stage: &mut Stage, kind: MemKind, iov: &[IoSeg]) -> Result<()> {
        match &mut stage.memory {
            Memory::Device(buf) if kind == MemKind::Host => {
                let gather = self.device_gather(buf.gpu())?;
                let _current = gather.gpu.enter()?;
                let mut at = buf.addr() as u64;
                for seg in iov {
                    let (src, stream) = (seg.addr as *const c_void, gather.stream.raw());
                    // SAFETY: the caller vouches for the host piece; the buffer is ours and holds
                    // the pieces' total; the stream is waited for below.
                    let copied = unsafe { sys::cuMemcpyHtoDAsync_v2(at, src, seg.len, stream) };
                    check(copied, "cuMemcpyHtoDAsync of a host piece into a send's staging buffer")?;
                    at += seg.len as u64;
                }
                gather.stream.synchronize()
            }
            Memory::Host(buf) => {
                let mut at = 0;
                for seg in iov {
                    // SAFETY: the caller vouches for the piece; `at + len` ≤ the buffer's length.
                    unsafe { std::ptr::copy_nonoverlapping(seg.addr as *const u8, buf.as_mut_ptr().add(at), seg.len) };
                    at += seg.len;
                }
                Ok(())
            }
            Memory::Device(buf) => {
                let gather = self.device_gather(buf.gpu())?;
                let _current = gather.gpu.enter()?;
                let base = buf.addr() as u64;
                let mut at = 0u64;
                let mut runs = Vec::with_capacity(iov.len());
                for seg in iov {
                    let (src, len) = (seg.addr as u64, seg.len as u64);
                    if !addressable(src, len) {
                        return Err(Error::invalid(format!(
                            "device piece {src:#x}+{len} lies outside what the gather kernel addresses"
                        )));
                    }
                    runs.push((src, base + at, len));
                    at += len;
                }
                // SAFETY: the pieces are this GPU's device memory nobody writes meanwhile (the
                // caller's contract) and the buffer is ours; the stream is waited for below.
                unsafe { gather.copier.copy(&gather.stream, runs.into_iter())? };
                gather.stream.synchronize()
            }
        }
    }

    /// The kernel, stream and GPU of `gpu`'s gathers, made on the first device send (building the
    /// kernel takes NVRTC a few hundred milliseconds, once per process).
    fn device_gather(&mut self, gpu: &Arc<Gpu>) -> Result<&mut DeviceGather> {
        if self.gather.as_ref().is_some_and(|g| g.gpu.ordinal() != gpu.ordinal()) {
            return Err(Error::invalid("a send comm's device pieces lie on two GPUs"));
        }
        if self.gather.is_none() {
            TileCopier::build(gpu);
            let copier = TileCopier::if_built(gpu)
                .unwrap_or_else(|| Err(Error::backend("the unpack kernel was not built")))
                .map_err(|e| e.context(format!("gathering device pieces on GPU {}", gpu.ordinal())))?;
            let stream = {
                let _current = gpu.enter()?;
                Stream::new(gpu)?
            };
            self.gather = Some(DeviceGather { gpu: gpu.clone(), stream, copier });
        }
        Ok(self.gather.as_mut().expect("set above"))
    }
}

impl Drop for Staging {
    /// The comm's idle buffers leave the net's count; their registrations go with the comm.
    fn drop(&mut self) {
        for stage in &self.free {
            self.budget.left(stage.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within the bound a buffer given back is kept; past it, only while a comm made one less than
    /// the calm ago; what leaves (taken again, or gone with its comm) leaves the count.
    #[test]
    fn buffers_past_the_bound_go_once_no_comm_made_one_for_the_calm() {
        let calm = Duration::from_secs(5);
        let budget = StageBudget::new(100, calm);
        let t0 = Instant::now();
        assert!(budget.keeps(60, t0), "within the bound");
        assert!(!budget.keeps(60, t0), "past it, and no comm ever made one");
        assert_eq!(budget.idle(), 60, "what went is not counted");
        budget.made(t0);
        assert!(budget.keeps(60, t0 + calm / 2), "past the bound, a comm made one lately");
        assert_eq!(budget.idle(), 120);
        assert!(!budget.keeps(60, t0 + calm), "past the bound and calm");
        budget.left(60);
        assert!(budget.keeps(40, t0 + calm), "room again once one left");
        assert_eq!(budget.idle(), 100);
    }
}
