//! Started copies without a GPU, for tests: an engine given a `SimulatedCopies` starts a copy for
//! every host-memory store and load of an inline payload, as it does for device memory, and the
//! copy lands only once its delay passed (when it is next looked at, or waited for). The
//! connection's handling of started copies (readers reading on, callers taking the stream, a
//! deregistration and a failure waiting for them) then runs over the sockets of the CPU tests,
//! and an answer sent before its copy shows as bytes missing when the transfer ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Result;

#[derive(Debug, Default)]
pub(crate) struct SimulatedCopies {
    pub delay: Duration,
    pub started: AtomicU64,
    pub landed: AtomicU64,
}

/// A store (`dst` set: its bytes land there) or a load (its bytes, read at the start).
#[derive(Debug)]
pub(crate) struct SimulatedCopy {
    sim: Arc<SimulatedCopies>,
    ready: Instant,
    dst: Option<usize>,
    bytes: Vec<u8>,
    landed: AtomicBool,
}

impl SimulatedCopies {
    pub fn new(delay: Duration) -> Arc<SimulatedCopies> {
        Arc::new(SimulatedCopies { delay, ..SimulatedCopies::default() })
    }

    /// A copy of `payload` to `dst`.
    ///
    /// # Safety
    /// `[dst, dst + payload.len())` stays writable until the copy landed: what a started device
    /// copy asks of its destination.
    pub unsafe fn store(self: &Arc<Self>, dst: usize, payload: &[u8]) -> SimulatedCopy {
        self.start(Some(dst), payload.to_vec())
    }

    /// A copy of `[src, src + len)` out of memory.
    ///
    /// # Safety
    /// The range is readable now.
    pub unsafe fn load(self: &Arc<Self>, src: usize, len: usize) -> SimulatedCopy {
        // SAFETY: per the contract.
        let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) }.to_vec();
        self.start(None, bytes)
    }

    fn start(self: &Arc<Self>, dst: Option<usize>, bytes: Vec<u8>) -> SimulatedCopy {
        self.started.fetch_add(1, Ordering::SeqCst);
        let ready = Instant::now() + self.delay;
        SimulatedCopy { sim: self.clone(), ready, dst, bytes, landed: AtomicBool::new(false) }
    }
}

impl SimulatedCopy {
    pub fn done(&self) -> Result<bool> {
        if Instant::now() < self.ready {
            return Ok(false);
        }
        self.land();
        Ok(true)
    }

    pub fn wait(&self) -> Result<()> {
        while !self.done()? {
            std::thread::yield_now();
        }
        Ok(())
    }

    pub fn loaded(&self) -> &[u8] {
        &self.bytes
    }

    fn land(&self) {
        if self.landed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(dst) = self.dst {
            // SAFETY: the store's contract keeps the destination writable until now.
            unsafe { std::ptr::copy_nonoverlapping(self.bytes.as_ptr(), dst as *mut u8, self.bytes.len()) };
        }
        self.sim.landed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for SimulatedCopy {
    fn drop(&mut self) {
        // A device copy runs to its end whoever still looks at it.
        self.land();
    }
}
