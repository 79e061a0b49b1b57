//! Small synchronous copies between device memory of one GPU and the host (the inline transfers,
//! at most [`MAX_SMALL_COPY`] bytes), as fast as the hardware allows: a per-GPU pinned bounce buffer
//! and a non-blocking stream made once and reused under a lock, `cuMemcpy*Async` through the bounce
//! buffer, and completion learned by spinning on `cuStreamQuery` instead of sleeping in the driver.
//!
//! On two H200s this took an 8-byte copy from 8.7 to 5.8 us (to the device) and from 10.9 to 7.5 us
//! (from it) against synchronous copies from pageable memory; a one-thread kernel that moves the
//! bytes and publishes completion in mapped host memory was slower than either copy (8.8 / 9.1 us:
//! the launch costs more than the copy engine). The copies never touch the legacy default stream,
//! so they do not wait for unrelated work the user queued there. Every call makes the GPU's primary
//! context current for its duration only and restores the caller's context.
//!
//! `copy_to_device_sync` and `copy_from_device_sync` are what the engine calls: through the
//! GPU's copier up to [`MAX_SMALL_COPY`], plain synchronous copies beyond. A connection's control
//! reader starts its copies instead (`SmallCopier::start_to_device`, `start_from_device`): each
//! through a pinned slot of its own, so that the reader reads the next inline payload while the
//! copy runs and answers the peer once it finished (docs/perf-log/two-gpus.md, "Inline device
//! copies overlapped").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};

use super::memory::{PinnedBuffer, sync_legacy_stream};
use super::stream::{Event, Stream};
use super::{Gpu, check};
use crate::error::{Error, Result};

/// The largest copy this module serves (the inline limit of device memory).
pub const MAX_SMALL_COPY: usize = crate::proto::INLINE_LEN_FLOOR;
/// Spinning beyond this hands the wait to the driver: the GPU is busy with other work and the
/// copy will take long enough that a sleeping wait costs nothing extra.
const SPIN_LIMIT: Duration = Duration::from_micros(500);
/// Started copies one GPU's copier keeps in flight at once (a pinned slot of [`MAX_SMALL_COPY`]
/// each: 512 KiB per GPU); with every slot taken a copy is made synchronously, as before.
pub const COPY_SLOTS: usize = 8;

/// How small copies move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmallCopyMode {
    /// `cuMemcpyHtoD`/`cuMemcpyDtoH` from and to pageable memory on the legacy stream: what a
    /// plain synchronous copy costs.
    Legacy,
    /// Through the pinned bounce buffer with asynchronous copies on the copier's stream, spinning
    /// until they finished: what the engine uses.
    Dma,
}

struct State {
    stream: Stream,
    bounce: PinnedBuffer,
}

/// The process's copiers, one per GPU (`SmallCopier::for_gpu`).
static COPIERS: Mutex<Vec<Arc<SmallCopier>>> = Mutex::new(Vec::new());
static COPIERS_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static THREADS_WARMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a library thread that may touch a GPU runs when it starts (`threads::on_start`): one small
/// copy to each GPU whose copier this process made, so that the driver's set-up of the thread is
/// done before the thread serves a transfer. A failure only leaves that set-up to the transfer.
fn warm_thread() {
    let copiers: Vec<Arc<SmallCopier>> = SmallCopier::all();
    for copier in copiers {
        let warmed = copier.scratch().and_then(|dev| {
            // SAFETY: the copier's own scratch bytes, which only copies of 8 bytes of zeros touch.
            unsafe { copier.to_device(dev.addr(), &[0u8; 8]) }
        });
        if let Err(e) = warmed {
            log::debug!("GPU {}: warming a thread failed: {}", copier.gpu.ordinal(), e.message());
        }
    }
    THREADS_WARMED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    WARMED_HERE.set(true);
}

thread_local! {
    /// Whether this thread ran `warm_thread`.
    static WARMED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub struct SmallCopier {
    gpu: Arc<Gpu>,
    mode: SmallCopyMode,
    state: Mutex<State>,
    /// Free slots of started copies (none in `Legacy` mode).
    slots: Mutex<Vec<Slot>>,
    /// Copies started, for tests that check a path started them.
    started: std::sync::atomic::AtomicU64,
    /// A few device bytes that library threads copy to when they start (`warm_thread`).
    scratch: std::sync::OnceLock<super::DeviceBuffer>,
}

/// Which way a started copy goes, and the memory at the other end.
#[derive(Clone, Copy)]
enum Way<'a> {
    ToDevice { dst: usize, src: &'a [u8] },
    FromDevice { src: usize },
}

/// A started copy's own bounce buffer and the event marking its end.
struct Slot {
    bounce: PinnedBuffer,
    end: Event,
}

/// A copy started through a slot: the bytes are in place (or, for a copy from the device, in
/// `loaded`) once `done` says so. Dropping it waits for the copy, so the slot goes back unused.
pub struct StartedCopy {
    copier: Arc<SmallCopier>,
    slot: Option<Slot>,
    len: usize,
    /// Seen finished: dropping it then asks the driver nothing.
    finished: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SmallCopier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmallCopier({:?}, {:?})", self.gpu, self.mode)
    }
}

impl SmallCopier {
    /// The copier of `gpu` that the engine's inline transfers use, made on first use and kept for
    /// the life of the process, like the GPU itself. From then on every library thread that may
    /// touch a GPU warms itself on this GPU as it starts (`warm_thread`).
    pub fn for_gpu(gpu: &Gpu) -> Result<Arc<SmallCopier>> {
        let mut copiers = COPIERS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(copier) = copiers.iter().find(|c| c.gpu.ordinal() == gpu.ordinal()) {
            return Ok(copier.clone());
        }
        // The registry hands out the one Arc of this GPU, which the copier's stream and buffer hold.
        let copier = Arc::new(SmallCopier::new(&Gpu::open(gpu.ordinal())?, SmallCopyMode::Dma)?);
        copier.warm_up();
        copiers.push(copier.clone());
        COPIERS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::threads::on_start(warm_thread);
        Ok(copier)
    }

    /// Moves a few bytes each way, synchronously and through a slot, so that the driver's
    /// first-use work on the stream and the copy engines is done here, when the engine or its
    /// first connection is made, not in the first inline transfer. A failure only leaves that work
    /// to the first transfer.
    fn warm_up(self: &Arc<Self>) {
        let warmed = (|| -> Result<()> {
            let dev = self.scratch()?;
            let mut back = [0u8; 64];
            // SAFETY: the 64 bytes lie in `dev`, the copier's scratch, which lives as long as the
            // copier and which only warm-ups write (bytes nobody reads for their value).
            unsafe {
                self.to_device(dev.addr(), &[7u8; 64])?;
                self.from_device(&mut back, dev.addr())?;
                if let Some(copy) = self.start_to_device(dev.addr(), &back)? {
                    copy.wait()?;
                }
                if let Some(copy) = self.start_from_device(dev.addr(), 64)? {
                    copy.wait()?;
                }
            }
            Ok(())
        })();
        if let Err(e) = warmed {
            log::debug!("GPU {}: the small copier's warm-up failed: {}", self.gpu.ordinal(), e.message());
        }
    }

    /// The copier's scratch bytes on its GPU, allocated at the first use.
    fn scratch(&self) -> Result<&super::DeviceBuffer> {
        if let Some(dev) = self.scratch.get() {
            return Ok(dev);
        }
        let dev = super::DeviceBuffer::new(self.gpu.ordinal(), 64)?;
        Ok(self.scratch.get_or_init(|| dev))
    }

    /// The copiers `for_gpu` made.
    fn all() -> Vec<Arc<SmallCopier>> {
        COPIERS.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Library threads that warmed themselves on the process's GPUs as they started.
    pub fn threads_warmed() -> u64 {
        THREADS_WARMED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the calling thread warmed itself as it started.
    pub fn warmed_here() -> bool {
        WARMED_HERE.get()
    }

    /// Copiers `for_gpu` made so far in this process: for tests that check a transfer made none.
    pub fn made() -> u64 {
        COPIERS_MADE.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(gpu: &Arc<Gpu>, mode: SmallCopyMode) -> Result<SmallCopier> {
        let stream = Stream::new(gpu)?;
        let bounce = PinnedBuffer::new(gpu, MAX_SMALL_COPY)?;
        let slots = match mode {
            SmallCopyMode::Legacy => Vec::new(),
            SmallCopyMode::Dma => (0..COPY_SLOTS)
                .map(|_| Ok(Slot { bounce: PinnedBuffer::new(gpu, MAX_SMALL_COPY)?, end: Event::new(gpu)? }))
                .collect::<Result<_>>()?,
        };
        Ok(SmallCopier {
            gpu: gpu.clone(),
            mode,
            state: Mutex::new(State { stream, bounce }),
            slots: Mutex::new(slots),
            started: std::sync::atomic::AtomicU64::new(0),
            scratch: std::sync::OnceLock::new(),
        })
    }

    /// Copies started through slots so far.
    pub fn started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take_slot(&self) -> Option<Slot> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_slot(&self, slot: Slot) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
    }

    /// Starts copying `src` to device address `dst` through a slot of its own and returns; None
    /// when no slot is free (the caller copies synchronously).
    ///
    /// # Safety
    /// `[dst, dst + src.len())` is device memory of this copier's GPU that nobody else writes or
    /// frees until the copy is done.
    pub unsafe fn start_to_device(self: &Arc<Self>, dst: usize, src: &[u8]) -> Result<Option<StartedCopy>> {
        // SAFETY: per the contract.
        unsafe { self.start(Way::ToDevice { dst, src }, src.len()) }
    }

    /// Starts copying `len` device bytes at `src` into a slot of its own and returns; the bytes
    /// are `StartedCopy::loaded` once done. None when no slot is free.
    ///
    /// # Safety
    /// `[src, src + len)` is device memory of this copier's GPU that stays allocated until the copy
    /// is done.
    pub unsafe fn start_from_device(self: &Arc<Self>, src: usize, len: usize) -> Result<Option<StartedCopy>> {
        // SAFETY: per the contract.
        unsafe { self.start(Way::FromDevice { src }, len) }
    }

    /// A started copy of `len` bytes through a free slot: the bytes to the device go into the slot
    /// first (before the copier's lock), then the copy is issued on the copier's stream and its end
    /// marked with the slot's event.
    ///
    /// # Safety
    /// As `start_to_device` or `start_from_device`, by `way`.
    unsafe fn start(self: &Arc<Self>, way: Way<'_>, len: usize) -> Result<Option<StartedCopy>> {
        too_large(len)?;
        if len == 0 {
            return Ok(None);
        }
        let Some(slot) = self.take_slot() else { return Ok(None) };
        if let Way::ToDevice { src, .. } = way {
            // SAFETY: the slot holds MAX_SMALL_COPY bytes (checked above) and is this copy's alone.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), slot.bounce.as_ptr(), len) };
        }
        let _ctx = match self.gpu.enter() {
            Ok(ctx) => ctx,
            Err(e) => {
                self.put_slot(slot);
                return Err(e);
            }
        };
        let st = self.lock();
        let (bounce, stream) = (slot.bounce.as_ptr(), st.stream.raw());
        // SAFETY: the slot holds the bytes or takes them; the device range is the caller's contract.
        let issued = unsafe {
            match way {
                Way::ToDevice { dst, .. } => check(
                    sys::cuMemcpyHtoDAsync_v2(dst as sys::CUdeviceptr, bounce.cast(), len, stream),
                    "cuMemcpyHtoDAsync (started small copy)",
                ),
                Way::FromDevice { src } => check(
                    sys::cuMemcpyDtoHAsync_v2(bounce.cast(), src as sys::CUdeviceptr, len, stream),
                    "cuMemcpyDtoHAsync (started small copy)",
                ),
            }
        };
        let marked = issued.and_then(|()| slot.end.record(&st.stream));
        drop(st);
        self.started_with(slot, len, marked)
    }

    /// The copy just issued and marked with the slot's event, or the slot given back when either
    /// failed.
    fn started_with(self: &Arc<Self>, slot: Slot, len: usize, marked: Result<()>) -> Result<Option<StartedCopy>> {
        match marked {
            Ok(()) => {
                self.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let finished = std::sync::atomic::AtomicBool::new(false);
                Ok(Some(StartedCopy { copier: self.clone(), slot: Some(slot), len, finished }))
            }
            Err(e) => {
                // Nothing was queued after the failed call; whatever was waits in the stream.
                let _ = self.lock().stream.synchronize();
                self.put_slot(slot);
                Err(e)
            }
        }
    }

    pub fn mode(&self) -> SmallCopyMode {
        self.mode
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies `src` to device address `dst` and returns once the bytes are in place.
    ///
    /// # Safety
    /// `[dst, dst + src.len())` is device memory of this copier's GPU that nobody else writes meanwhile.
    pub unsafe fn to_device(&self, dst: usize, src: &[u8]) -> Result<()> {
        too_large(src.len())?;
        // SAFETY: per the contract.
        unsafe { self.copy_up(dst, src, true) }
    }

    /// Copies `src`, of any length, to device address `dst` straight from where it lies (no
    /// bounce) on the copier's stream, and returns once the bytes are in place: from page-locked
    /// memory one DMA, from pageable memory through the driver's own staging. Never on the legacy
    /// stream, so it does not wait behind the user's kernels.
    ///
    /// # Safety
    /// As [`to_device`](Self::to_device).
    pub unsafe fn to_device_direct(&self, dst: usize, src: &[u8]) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { self.copy_up(dst, src, false) }
    }

    /// `to_device` through the bounce buffer (`src` at most [`MAX_SMALL_COPY`] bytes, checked by
    /// the caller), else `to_device_direct`.
    ///
    /// # Safety
    /// As [`to_device`](Self::to_device).
    unsafe fn copy_up(&self, dst: usize, src: &[u8], bounce: bool) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let _ctx = self.gpu.enter()?;
        let dst = dst as sys::CUdeviceptr;
        if self.mode == SmallCopyMode::Legacy {
            // SAFETY: per the contract; src is a live host slice.
            check(unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) }, "cuMemcpyHtoD")?;
            // From pageable memory the call may return before the DMA landed.
            return sync_legacy_stream();
        }
        let st = self.lock();
        let from = if bounce {
            // SAFETY: the bounce buffer holds MAX_SMALL_COPY bytes (the caller checked `src`) and
            // no copy is in flight (the lock is held and every call waits for its copy).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), st.bounce.as_ptr(), src.len()) };
            st.bounce.as_ptr().cast_const()
        } else {
            src.as_ptr()
        };
        // SAFETY: per the contract; `from` (the bounce buffer or `src`) outlives the copy, which is
        // waited for before returning.
        let issued = unsafe { sys::cuMemcpyHtoDAsync_v2(dst, from.cast(), src.len(), st.stream.raw()) };
        check(issued, if bounce { "cuMemcpyHtoDAsync (small copy)" } else { "cuMemcpyHtoDAsync (direct copy)" })?;
        st.wait_stream()
    }

    /// Copies device bytes at `src` into `dst` and returns once they are there.
    ///
    /// # Safety
    /// `[src, src + dst.len())` is device memory of this copier's GPU.
    pub unsafe fn from_device(&self, dst: &mut [u8], src: usize) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        too_large(dst.len())?;
        let _ctx = self.gpu.enter()?;
        let src = src as sys::CUdeviceptr;
        if self.mode == SmallCopyMode::Legacy {
            // SAFETY: per the contract; dst is a live, writable host slice.
            return check(unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) }, "cuMemcpyDtoH");
        }
        let st = self.lock();
        // SAFETY: as in to_device.
        unsafe {
            check(
                sys::cuMemcpyDtoHAsync_v2(st.bounce.as_ptr().cast(), src, dst.len(), st.stream.raw()),
                "cuMemcpyDtoHAsync (small copy)",
            )?;
        }
        st.wait_stream()?;
        // SAFETY: the copy into the bounce buffer finished.
        unsafe { std::ptr::copy_nonoverlapping(st.bounce.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// Copies host bytes to device address `dst` of `gpu` and waits: for small transfers (inline writes)
/// where a staged pass would cost more than the copy, and for eager messages landed before their
/// receive. Up to the inline limit (64 KiB) through the GPU's small copier's bounce buffer, beyond
/// straight from `src` on the copier's stream.
///
/// # Safety
/// `[dst, dst + src.len())` is device memory of `gpu` that nobody else writes meanwhile.
pub(crate) unsafe fn copy_to_device_sync(gpu: &Gpu, dst: usize, src: &[u8]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let copier = SmallCopier::for_gpu(gpu)?;
    // SAFETY: per the contract.
    unsafe { if src.len() <= MAX_SMALL_COPY { copier.to_device(dst, src) } else { copier.to_device_direct(dst, src) } }
}

/// Copies device bytes at `src` of `gpu` into `dst` and waits.
///
/// # Safety
/// `[src, src + dst.len())` is device memory of `gpu`.
pub(crate) unsafe fn copy_from_device_sync(gpu: &Gpu, dst: &mut [u8], src: usize) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    if dst.len() <= MAX_SMALL_COPY {
        // SAFETY: per the contract.
        return unsafe { SmallCopier::for_gpu(gpu)?.from_device(dst, src) };
    }
    let _ctx = gpu.enter()?;
    // SAFETY: the caller vouches for the device range; dst is a live, writable host slice.
    check(unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src as sys::CUdeviceptr, dst.len()) }, "cuMemcpyDtoH")
}

/// Starts copying host bytes to device address `dst` of `gpu` through its copier: None when the
/// copy is larger than a slot or no slot is free (the caller copies synchronously).
///
/// # Safety
/// As [`SmallCopier::start_to_device`].
pub(crate) unsafe fn start_to_device(gpu: &Gpu, dst: usize, src: &[u8]) -> Result<Option<StartedCopy>> {
    if src.len() > MAX_SMALL_COPY {
        return Ok(None);
    }
    // SAFETY: per the contract.
    unsafe { SmallCopier::for_gpu(gpu)?.start_to_device(dst, src) }
}

/// Starts copying `len` device bytes at `src` of `gpu` into a slot of its copier: None as above.
///
/// # Safety
/// As [`SmallCopier::start_from_device`].
pub(crate) unsafe fn start_from_device(gpu: &Gpu, src: usize, len: usize) -> Result<Option<StartedCopy>> {
    if len > MAX_SMALL_COPY {
        return Ok(None);
    }
    // SAFETY: per the contract.
    unsafe { SmallCopier::for_gpu(gpu)?.start_from_device(src, len) }
}

fn too_large(len: usize) -> Result<()> {
    if len > MAX_SMALL_COPY {
        return Err(Error::invalid(format!("a {len}-byte small copy exceeds {MAX_SMALL_COPY} bytes")));
    }
    Ok(())
}

impl StartedCopy {
    fn slot(&self) -> &Slot {
        self.slot.as_ref().expect("a slot until dropped")
    }

    /// Whether the copy finished; never blocks. An error is the copy's own.
    pub fn done(&self) -> Result<bool> {
        if self.finished.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(true);
        }
        let done = self.slot().end.done()?;
        self.finished.store(done, std::sync::atomic::Ordering::Release);
        Ok(done)
    }

    /// Spins until the copy finished (for at most the spin limit, then waits in the driver).
    pub fn wait(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.done()? {
                return Ok(());
            }
            if start.elapsed() > SPIN_LIMIT {
                self.slot().end.synchronize()?;
                self.finished.store(true, std::sync::atomic::Ordering::Release);
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    /// What a copy from the device brought, once `done`.
    pub fn loaded(&self) -> &[u8] {
        // SAFETY: the slot holds at least `len` bytes and is this copy's until it is dropped; the
        // caller reads it after the copy into it finished.
        unsafe { std::slice::from_raw_parts(self.slot().bounce.as_ptr(), self.len) }
    }
}

impl Drop for StartedCopy {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // The slot is reused only once no copy touches it; an error left it idle as well.
            if !*self.finished.get_mut() {
                let _ = slot.end.synchronize();
            }
            self.copier.put_slot(slot);
        }
    }
}

impl std::fmt::Debug for StartedCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StartedCopy({:?}, {} bytes)", self.copier.gpu, self.len)
    }
}

impl State {
    /// Spins until every copy queued on the stream finished.
    fn wait_stream(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            if stream_done(&self.stream)? {
                return Ok(());
            }
            if start.elapsed() > SPIN_LIMIT {
                return self.stream.synchronize();
            }
            std::hint::spin_loop();
        }
    }
}

fn stream_done(stream: &Stream) -> Result<bool> {
    // SAFETY: a live stream of the current context.
    match unsafe { sys::cuStreamQuery(stream.raw()) } {
        CUresult::CUDA_SUCCESS => Ok(true),
        CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => Err(super::driver_error(other, "small copy (cuStreamQuery)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once a GPU's copier exists, a library thread of a kind that may touch a GPU warms itself
    /// on it before its body runs; other kinds (the accept loop) start as before.
    #[test]
    fn library_threads_that_may_touch_a_gpu_warm_themselves_as_they_start() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        SmallCopier::for_gpu(&Gpu::open(0).unwrap()).unwrap();
        let warmed = |kind| {
            let (tx, rx) = std::sync::mpsc::channel();
            let body = move || tx.send(SmallCopier::warmed_here()).unwrap();
            let t = crate::threads::spawn_contained(std::thread::Builder::new(), kind, |_| {}, body).unwrap();
            t.join().unwrap();
            rx.recv().unwrap()
        };
        let before = SmallCopier::threads_warmed();
        assert!(warmed(crate::threads::ThreadKind::ControlReactor), "a control reactor thread warms itself");
        assert!(warmed(crate::threads::ThreadKind::SocketReceiver), "a socket helper warms itself");
        assert!(!warmed(crate::threads::ThreadKind::Accept), "the accept loop touches no GPU");
        assert!(SmallCopier::threads_warmed() >= before + 2);
        assert!(!SmallCopier::warmed_here(), "the test's own thread was not started by the library");
    }

    #[test]
    fn oversized_copies_are_refused_before_touching_the_driver() {
        assert!(too_large(MAX_SMALL_COPY).is_ok());
        let err = too_large(MAX_SMALL_COPY + 1).unwrap_err();
        assert!(err.message().contains("exceeds"), "{err}");
    }
}
