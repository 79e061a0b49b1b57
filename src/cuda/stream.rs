//! A stream and events of one GPU, created once and reused: the staging path issues every copy on
//! its ring's streams (shared per GPU, `shared_streams`) and learns of completion through per-slot
//! events, never by blocking.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUresult};

use super::{Gpu, check};
use crate::error::Result;

pub struct Stream {
    gpu: Arc<Gpu>,
    raw: sys::CUstream,
}

// SAFETY: a CUstream may be used from any thread once its context is current there.
unsafe impl Send for Stream {}
// SAFETY: every method takes `&self` and makes driver calls, which are thread-safe on one stream:
// work two threads queue on it runs in the order the driver took it (`shared_streams`).
unsafe impl Sync for Stream {}

impl Stream {
    /// A non-blocking stream: it does not wait for work the user queued on the legacy default stream.
    pub fn new(gpu: &Arc<Gpu>) -> Result<Stream> {
        let _ctx = gpu.enter()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        check(
            // SAFETY: the driver writes one stream handle into `raw`, a live local; the GPU's
            // context is current (entered above).
            unsafe { sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        Ok(Stream { gpu: gpu.clone(), raw })
    }

    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn synchronize(&self) -> Result<()> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: a stream this object owns.
        check(unsafe { sys::cuStreamSynchronize(self.raw) }, "cuStreamSynchronize")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(_ctx) = self.gpu.enter() {
            // SAFETY: a stream this object owns; synchronizing first means no copy queued on it
            // still touches memory its owner is about to release, and every host call has run.
            unsafe {
                let _ = sys::cuStreamSynchronize(self.raw);
                let _ = sys::cuStreamDestroy_v2(self.raw);
            }
        }
    }
}

/// Streams the staging rings of every engine share, at most [`SHARED_PER_GPU`] a GPU. A stream
/// costs its GPU 0.5-1 MiB (H200) that the driver keeps once the stream is destroyed, for the next
/// one made: rings with streams of their own left the most rings a burst ever held on the GPU
/// for good (at 128 connections, 4 MiB a connection). Rings that share these hold at most that
/// many streams a GPU, and each waits for its own slots' events, never for a stream.
static SHARED: Mutex<Vec<Arc<Stream>>> = Mutex::new(Vec::new());

/// Two streams for each of 16 rings, the staging pool's bound from 16 cores: past it, rings share.
pub const SHARED_PER_GPU: usize = 32;

/// `n` distinct streams of `gpu` for one ring: unused ones first, then new ones while the GPU has
/// fewer than [`SHARED_PER_GPU`], then the least used.
pub fn shared_streams(gpu: &Arc<Gpu>, n: usize) -> Result<Vec<Arc<Stream>>> {
    let mut all = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let mut picked: Vec<Arc<Stream>> = Vec::with_capacity(n);
    for _ in 0..n {
        let ours = |s: &&Arc<Stream>| s.gpu.ordinal() == gpu.ordinal();
        let have = all.iter().filter(ours).count();
        let least = all
            .iter()
            .filter(ours)
            .filter(|s| !picked.iter().any(|p| Arc::ptr_eq(p, s)))
            .min_by_key(|s| Arc::strong_count(s));
        match least {
            Some(s) if Arc::strong_count(s) == 1 || have >= SHARED_PER_GPU => picked.push(s.clone()),
            _ => {
                let stream = Arc::new(Stream::new(gpu)?);
                all.push(stream.clone());
                picked.push(stream);
            }
        }
    }
    Ok(picked)
}

/// Streams of GPU `ordinal` made for the rings so far.
pub fn shared_made(ordinal: i32) -> usize {
    SHARED.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|s| s.gpu.ordinal() == ordinal).count()
}

pub struct Event {
    gpu: Arc<Gpu>,
    raw: sys::CUevent,
}

// SAFETY: a CUevent may be recorded and queried from any thread once its context is current there.
unsafe impl Send for Event {}
// SAFETY: every method takes `&self` and makes one driver call, and the driver's calls on an event
// are thread-safe: a caller may wait on an event while another thread queries it.
unsafe impl Sync for Event {}

impl Event {
    pub fn new(gpu: &Arc<Gpu>) -> Result<Event> {
        let _ctx = gpu.enter()?;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        check(
            // SAFETY: the driver writes one event handle into `raw`, a live local; the GPU's context
            // is current (entered above).
            unsafe { sys::cuEventCreate(&mut raw, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) },
            "cuEventCreate",
        )?;
        Ok(Event { gpu: gpu.clone(), raw })
    }

    /// Marks the point in `stream` that `done` reports on. The stream must be of the same GPU and
    /// its context current (the caller bound it to issue the work being marked).
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both handles are owned and alive.
        check(unsafe { sys::cuEventRecord(self.raw, stream.raw) }, "cuEventRecord")
    }

    /// Whether the work before the last `record` finished; never blocks. An error is one the
    /// copies themselves hit (e.g. an invalid address) and is reported as such.
    pub fn done(&self) -> Result<bool> {
        // SAFETY: an owned event handle.
        match unsafe { sys::cuEventQuery(self.raw) } {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(super::driver_error(other, "staging copy (cuEventQuery)")),
        }
    }
}

impl Stream {
    /// Makes the stream's later work wait for the work before `event`'s last record (on any stream
    /// of the same GPU), without blocking the host.
    pub fn wait(&self, event: &Event) -> Result<()> {
        // SAFETY: both handles are owned and alive.
        check(unsafe { sys::cuStreamWaitEvent(self.raw, event.raw, 0) }, "cuStreamWaitEvent")
    }
}

impl Event {
    /// Blocks until the work before the last `record` finished; for paths that must not return
    /// while a copy may still touch memory (a failing connection). Errors are the copies' own.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: an owned event handle; waiting needs no current context.
        check(unsafe { sys::cuEventSynchronize(self.raw) }, "cuEventSynchronize")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(_ctx) = self.gpu.enter() {
            // SAFETY: an event this object owns, destroyed once.
            let _ = unsafe { sys::cuEventDestroy_v2(self.raw) };
        }
    }
}
