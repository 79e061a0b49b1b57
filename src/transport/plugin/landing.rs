//! Receives into host memory on a comm whose bounce pool is device memory (TCPX).
//!
//! TCPX steers every data socket of a receive comm into GPU memory at accept, and its HOST-type
//! receive is a plain `recv()` that can never read such a payload. So a receive into host memory is
//! posted as a CUDA receive against the anchor, a small device buffer registered on the comm (TCPX
//! never writes a CUDA receive's buffer: the bytes stay in its pool and `loadMeta.dst_off` is
//! relative to the request), the GPU unpack gathers its fragments into a slot of pinned host memory
//! mapped into the device, batched with the GPU receives of every comm, and the GPU's copier thread
//! copies the slot into the destination, so the progress thread never spends a copy's time (a 4 MiB
//! copy costs about as long as the next 4 MiB take to arrive). Slots belong to the GPU and are
//! shared by all its receive comms: one is taken when the plugin completed a receive and comes back
//! once its bytes were copied out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::cuda::Gpu;
use crate::cuda::memory::{DeviceBuffer, MappedBuffer};
use crate::error::{Error, Result};
use crate::ncclnet::UNPACK_MAX_SLICE_SIZE;
use crate::threads::{ThreadKind, spawn_contained};

/// Host-destination receives of one GPU between the plugin's completion and the copy out. A comm
/// has at most one receive there (only its oldest is tested), so this many comms land in parallel
/// and the others wait their turn.
pub const SLOTS: usize = 16;

pub struct HostLanding {
    /// What host-destination receives are posted against (the fake checks the posted range lies
    /// inside the registration; TCPX only uses the address as the base of `dst_off`).
    anchor: DeviceBuffer,
    slots: MappedBuffer,
    free: Mutex<Vec<usize>>,
    copier: Copier,
}

impl HostLanding {
    pub fn new(gpu: &Arc<Gpu>) -> Result<HostLanding> {
        let anchor = DeviceBuffer::new(gpu.ordinal(), UNPACK_MAX_SLICE_SIZE)?;
        let slots = MappedBuffer::new(gpu, SLOTS * UNPACK_MAX_SLICE_SIZE)?;
        let copier = Copier::start(gpu.ordinal())?;
        Ok(HostLanding { anchor, slots, free: Mutex::new((0..SLOTS).rev().collect()), copier })
    }

    /// The anchor's device address and length.
    pub fn anchor(&self) -> (usize, usize) {
        (self.anchor.addr(), self.anchor.len())
    }

    /// A free slot, if any.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let index = self.free.lock().pop()?;
        Some(Slot { landing: self.clone(), index })
    }
}

/// One slot of [`UNPACK_MAX_SLICE_SIZE`] bytes; goes back to its GPU's free list on drop.
pub struct Slot {
    landing: Arc<HostLanding>,
    index: usize,
}

impl Slot {
    fn offset(&self) -> usize {
        self.index * UNPACK_MAX_SLICE_SIZE
    }

    /// Where the unpack kernel writes the slot.
    pub fn device_ptr(&self) -> u64 {
        self.landing.slots.device_ptr() + self.offset() as u64
    }

    /// Starts copying the slot's first `len` bytes to `dst` on the GPU's copier thread.
    ///
    /// # Safety
    /// `len` ≤ [`UNPACK_MAX_SLICE_SIZE`]; the kernel that filled the slot finished; `[dst, dst + len)` is
    /// writable host memory nobody else touches until the copy finished, and the slot is kept
    /// until then.
    pub unsafe fn copy_out(&self, dst: *mut u8, len: usize) -> CopyOut {
        debug_assert!(len <= UNPACK_MAX_SLICE_SIZE);
        // SAFETY: the slot lies inside the mapped buffer.
        let src = unsafe { self.landing.slots.as_ptr().add(self.offset()) };
        self.landing.copier.submit(Job { src, dst, len, done: Arc::default() })
    }

    /// The GPU's unpack failed with this slot's kernel in an unknown state: the slot is never
    /// handed out again, so no later receive can be overwritten by a late write.
    pub fn retire(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.landing.free.lock().push(self.index);
    }
}

/// One copy out of a slot.
struct Job {
    src: *const u8,
    dst: *mut u8,
    len: usize,
    done: Arc<AtomicBool>,
}

// SAFETY: the addresses are handed to the copier thread, which alone touches them until `done`;
// `Slot::copy_out`'s caller keeps both ranges valid that long.
unsafe impl Send for Job {}

impl Job {
    fn run(&self) {
        // SAFETY: per `Slot::copy_out`'s contract.
        unsafe { std::ptr::copy_nonoverlapping(self.src, self.dst, self.len) };
        self.done.store(true, Ordering::Release);
    }
}

/// A copy handed to the copier thread.
pub struct CopyOut {
    done: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
}

impl CopyOut {
    /// Whether the bytes are in place; an error once the copier died with the copy unfinished.
    pub fn finished(&self) -> Result<bool> {
        if self.done.load(Ordering::Acquire) {
            return Ok(true);
        }
        if !self.alive.load(Ordering::Acquire) {
            return Err(Error::internal("the landing copier thread stopped before copying a receive out"));
        }
        Ok(false)
    }

    /// Waits until the copier no longer touches the destination: the copy finished or the copier
    /// is gone.
    pub fn wait(&self) {
        while !self.done.load(Ordering::Acquire) && self.alive.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A GPU's copier thread and the queue feeding it.
struct Copier {
    jobs: Option<mpsc::Sender<Job>>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    fn start(ordinal: i32) -> Result<Copier> {
        let (tx, rx) = mpsc::channel::<Job>();
        let alive = Arc::new(AtomicBool::new(true));
        let (ends, dies) = (alive.clone(), alive.clone());
        let builder = std::thread::Builder::new().name(format!("uccl-landing{ordinal}"));
        let thread = spawn_contained(
            builder,
            ThreadKind::LandingCopier,
            move |_| dies.store(false, Ordering::Release),
            move || {
                while let Ok(job) = rx.recv() {
                    crate::threads::point(ThreadKind::LandingCopier);
                    job.run();
                }
                ends.store(false, Ordering::Release);
            },
        )
        .map_err(|e| Error::io("spawn the landing copier thread", e))?;
        Ok(Copier { jobs: Some(tx), alive, thread: Some(thread) })
    }

    /// Queues `job`; with the copier gone, copies on the calling thread.
    fn submit(&self, job: Job) -> CopyOut {
        let out = CopyOut { done: job.done.clone(), alive: self.alive.clone() };
        let sent = match &self.jobs {
            Some(jobs) if self.alive.load(Ordering::Acquire) => jobs.send(job),
            _ => Err(mpsc::SendError(job)),
        };
        if let Err(mpsc::SendError(job)) = sent {
            job.run();
        }
        out
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it copied what was queued.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
