//! The unpacker's own CUDA resources, each freed on drop: pinned tile buffers the host fills,
//! device tile buffers the kernel reads, and completion events. All are created once per unpacker
//! and reused for every launch.
//!
//! Drop runs with whatever context is current; the owner binds its context before dropping them.

use cudarc::driver::{result, sys};

use super::plan::Tile;
use crate::error::{Error, Result};

pub(super) fn driver_error(what: &str, err: result::DriverError) -> Error {
    Error::backend(format!("unpack: {what}: {err}"))
}

/// Page-locked, cached (not write-combined: the host reads it back for inline launches) host
/// memory, mapped into the device so a kernel can also read it in place: a list of `T` (tiles, or
/// the pieces of `cuda::pieces`).
pub(crate) struct PinnedList<T: Plain> {
    ptr: *mut T,
    len: usize,
    device: sys::CUdeviceptr,
}

pub(crate) type PinnedTiles = PinnedList<Tile>;

/// Plain old data a pinned list may hold: zeroed memory is a valid value of it.
///
/// # Safety
/// Every bit pattern, all zeros included, is a valid value of the type.
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: two u64 words.
unsafe impl Plain for Tile {}

// SAFETY: plain memory owned by this value; nothing about it is tied to a thread.
unsafe impl<T: Plain> Send for PinnedList<T> {}

impl<T: Plain> PinnedList<T> {
    pub(crate) fn new(len: usize) -> Result<PinnedList<T>> {
        let bytes = len.max(1) * size_of::<T>();
        // SAFETY: a fresh allocation; zeroed below before any read.
        let ptr = unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(|e| driver_error("pinned list", e))?;
        let ptr = ptr.cast::<T>();
        let mut list = PinnedList { ptr, len, device: 0 };
        // SAFETY: `ptr` points to `bytes` writable bytes, page-aligned; zeroes are a valid `T`
        // (`Plain`).
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        // SAFETY: `ptr` was allocated with DEVICEMAP in the current context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut list.device, ptr.cast(), 0) }
            .result()
            .map_err(|e| driver_error("map pinned list", e))?;
        Ok(list)
    }

    /// The device's address of the same memory.
    pub(crate) fn device_ptr(&self) -> sys::CUdeviceptr {
        self.device
    }

    /// The host's address of it, for a copy the driver makes.
    pub(crate) fn host_ptr(&self) -> *const T {
        self.ptr
    }

    pub(super) fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised values owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Plain> Drop for PinnedList<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host in new and freed once.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// Device memory for one launch's tiles.
pub(super) struct DeviceTiles {
    ptr: sys::CUdeviceptr,
}

impl DeviceTiles {
    pub(super) fn new(len: usize) -> Result<DeviceTiles> {
        // SAFETY: plain allocation in the current context.
        let ptr = unsafe { result::malloc_sync(len.max(1) * size_of::<Tile>()) }
            .map_err(|e| driver_error("device tile buffer", e))?;
        Ok(DeviceTiles { ptr })
    }

    pub(super) fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
}

impl Drop for DeviceTiles {
    fn drop(&mut self) {
        // SAFETY: allocated in new, freed once, after the owner synchronised its stream.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A reusable completion event (no timing, so record and query stay cheap).
pub(super) struct Event(sys::CUevent);

// SAFETY: CUDA events may be used from any thread.
unsafe impl Send for Event {}

impl Event {
    pub(super) fn new() -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| driver_error("create event", e))
    }

    pub(super) fn record(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: a live event and a live stream of the same context.
        unsafe { result::event::record(self.0, stream) }.map_err(|e| driver_error("record event", e))
    }

    /// Ok(true) once all work before the last record finished; Err for a failed launch.
    pub(super) fn is_complete(&self) -> Result<bool> {
        // SAFETY: a live event.
        match unsafe { result::event::query(self.0) } {
            Ok(()) => Ok(true),
            Err(result::DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(driver_error("unpack launch failed", e)),
        }
    }

    pub(super) fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        unsafe { result::event::synchronize(self.0) }.map_err(|e| driver_error("wait for unpack launch", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in new, destroyed once.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// Page-locked, device-mapped 64-bit words shared with a running kernel: the host and the GPU
/// both read and write them, so every access goes through atomics.
pub(super) struct MappedWords {
    ptr: *mut u64,
    len: usize,
    device: sys::CUdeviceptr,
}

// SAFETY: plain memory owned by this value, accessed only through atomics.
unsafe impl Send for MappedWords {}

impl MappedWords {
    pub(super) fn new(len: usize) -> Result<MappedWords> {
        // SAFETY: a fresh allocation; zeroed below before any read.
        let ptr = unsafe { result::malloc_host(len * size_of::<u64>(), sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(|e| driver_error("mapped control words", e))?
            .cast::<u64>();
        let mut words = MappedWords { ptr, len, device: 0 };
        // SAFETY: `len` writable, page-aligned words.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        // SAFETY: allocated with DEVICEMAP in the current context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut words.device, ptr.cast(), 0) }
            .result()
            .map_err(|e| driver_error("map control words", e))?;
        Ok(words)
    }

    pub(crate) fn device_ptr(&self) -> sys::CUdeviceptr {
        self.device
    }

    pub(super) fn word(&self, index: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(index < self.len, "control word {index} of {}", self.len);
        // SAFETY: in bounds, 8-byte aligned, live as long as self; shared with the GPU only through
        // atomic accesses on this side.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.add(index)) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host in new, freed once, after the kernel using it stopped.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

/// Device memory of `bytes` bytes, freed on drop.
pub(super) struct DeviceBytes {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceBytes {
    pub(super) fn new(bytes: usize) -> Result<DeviceBytes> {
        // SAFETY: plain allocation in the current context.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| driver_error("device control words", e))?;
        Ok(DeviceBytes { ptr, bytes })
    }

    pub(super) fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    pub(super) fn len(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBytes {
    fn drop(&mut self) {
        // SAFETY: allocated in new, freed once, after the kernel using it stopped.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}
