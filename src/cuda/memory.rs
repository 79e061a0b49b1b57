//! Owned CUDA memory: [`DeviceBuffer`] (device memory with blocking copies, for tests and
//! benchmarks that need GPU buffers without a framework), [`PinnedBuffer`] (page-locked host
//! memory) and [`MappedBuffer`] (page-locked host memory kernels write in place). All free
//! themselves on drop. A staging ring's slots live in `super::slots`.

use std::sync::Arc;

use cudarc::driver::sys;

use super::{Gpu, check};
use crate::error::{Error, Result};

pub struct DeviceBuffer {
    gpu: Arc<Gpu>,
    ptr: sys::CUdeviceptr,
    len: usize,
    /// What cuMemAlloc returned, freed on drop: `ptr` where that began a page.
    alloc: sys::CUdeviceptr,
}

/// A net plugin registers device memory by whole pages: a buffer starts on one, so that its
/// registration covers only its own allocation.
const PAGE: u64 = 4096;

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes on {:?})", self.ptr, self.len, self.gpu)
    }
}

impl DeviceBuffer {
    /// `len` bytes of uninitialized device memory on GPU `ordinal`.
    pub fn new(ordinal: i32, len: usize) -> Result<DeviceBuffer> {
        if len == 0 {
            return Err(Error::invalid("a device buffer of 0 bytes"));
        }
        let gpu = Gpu::open(ordinal)?;
        let _ctx = gpu.enter()?;
        let alloc = |bytes: usize| {
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: the driver writes one device pointer into `ptr`.
            check(unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) }, &format!("cuMemAlloc of {bytes} bytes")).map(|()| ptr)
        };
        let mut base = alloc(len)?;
        // The driver carves small allocations out of larger ones: the page below such a buffer may
        // be nobody's memory, and a net plugin registers whole pages (GPUDirect-TCPXO v1.0.17 rounds
        // the range out to pages and exports it with cuMemGetHandleForAddressRange, `nccl_shim.cc`
        // RegMrDmaBuf, `nccl_cuda/cuda_common.cc` getDmabufFd), so a staging buffer registered there
        // failed. One page more makes room to start on one.
        if base % PAGE != 0 {
            // SAFETY: allocated just above, unused.
            let _ = unsafe { sys::cuMemFree_v2(base) };
            base = alloc(len + PAGE as usize)?;
        }
        Ok(DeviceBuffer { gpu, ptr: base.next_multiple_of(PAGE), len, alloc: base })
    }

    /// The device address, for registration and transfers.
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn range(&self, offset: usize, len: usize) -> Result<sys::CUdeviceptr> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.ptr + offset as u64),
            _ => Err(Error::invalid(format!("[{offset}, +{len}) lies outside a device buffer of {} bytes", self.len))),
        }
    }

    /// Copies `src` to device bytes `[offset, offset + src.len())`; returns once they are in place.
    pub fn copy_from_host(&mut self, offset: usize, src: &[u8]) -> Result<()> {
        let dst = self.range(offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let _ctx = self.gpu.enter()?;
        // SAFETY: dst..+len lies in this allocation (checked); src is a live host slice.
        check(unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) }, "cuMemcpyHtoD")?;
        // From pageable memory the call may return before the DMA landed; streams that do not
        // synchronize with the legacy stream (the staging streams) must see the bytes.
        sync_legacy_stream()
    }

    /// Copies device bytes `[offset, offset + dst.len())` into `dst`; waits for them.
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = self.range(offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let _ctx = self.gpu.enter()?;
        // SAFETY: src..+len lies in this allocation (checked); dst is a live, writable host slice.
        check(unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) }, "cuMemcpyDtoH")
    }

    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        self.copy_to_host(0, &mut out)?;
        Ok(out)
    }

    /// Sets every byte to `value` and waits.
    pub fn fill(&mut self, value: u8) -> Result<()> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: exactly this allocation.
        check(unsafe { sys::cuMemsetD8_v2(self.ptr, value, self.len) }, "cuMemsetD8")?;
        // The memset runs asynchronously on the legacy stream.
        sync_legacy_stream()
    }
}

pub(super) fn sync_legacy_stream() -> Result<()> {
    // SAFETY: the null handle names the current context's legacy default stream.
    check(unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) }, "cuStreamSynchronize")
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Ok(_ctx) = self.gpu.enter() {
            // SAFETY: allocated by cuMemAlloc in new(), freed once here. cuMemFree waits for work
            // still using the memory.
            let _ = unsafe { sys::cuMemFree_v2(self.alloc) };
        }
    }
}

/// Page-locked host memory: DMA-able by every GPU (portable), readable and writable by the CPU at
/// full speed (not write-combined), so the socket transport can use it like any host buffer.
pub struct PinnedBuffer {
    gpu: Arc<Gpu>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain allocation; who may touch which bytes when is up to the owner (the staging ring).
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<PinnedBuffer> {
        if len == 0 {
            return Err(Error::invalid("a pinned buffer of 0 bytes"));
        }
        let _ctx = gpu.enter()?;
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        check(
            // SAFETY: the driver writes one host pointer into `ptr`, a live local; the GPU's context
            // is current (entered above).
            unsafe { sys::cuMemHostAlloc(&mut ptr, len, sys::CU_MEMHOSTALLOC_PORTABLE) },
            &format!("cuMemHostAlloc of {len} bytes"),
        )?;
        if ptr.is_null() {
            return Err(Error::backend("cuMemHostAlloc returned NULL"));
        }
        Ok(PinnedBuffer { gpu: gpu.clone(), ptr: ptr.cast(), len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if let Ok(_ctx) = self.gpu.enter() {
            // SAFETY: allocated by cuMemHostAlloc in new(), freed once here; the owner made sure no
            // copy or I/O still uses it.
            let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

/// Page-locked host memory mapped into every context's address space (`DEVICEMAP | PORTABLE`): a
/// kernel writes it at [`MappedBuffer::device_ptr`] and the CPU reads the same bytes at
/// [`MappedBuffer::as_ptr`], cached.
pub struct MappedBuffer {
    pinned: PinnedBuffer,
    device: sys::CUdeviceptr,
}

// SAFETY: as for PinnedBuffer.
unsafe impl Send for MappedBuffer {}
// SAFETY: shared references hand out addresses only; who touches which bytes is up to the owner.
unsafe impl Sync for MappedBuffer {}

impl MappedBuffer {
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<MappedBuffer> {
        if len == 0 {
            return Err(Error::invalid("a mapped buffer of 0 bytes"));
        }
        let _ctx = gpu.enter()?;
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: the driver writes one host pointer into `ptr`.
        check(unsafe { sys::cuMemHostAlloc(&mut ptr, len, flags) }, &format!("cuMemHostAlloc of {len} bytes"))?;
        if ptr.is_null() {
            return Err(Error::backend("cuMemHostAlloc returned NULL"));
        }
        // Owned from here: an error below frees it.
        let pinned = PinnedBuffer { gpu: gpu.clone(), ptr: ptr.cast(), len };
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with DEVICEMAP, with this GPU's context current.
        check(unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, ptr, 0) }, "cuMemHostGetDevicePointer")?;
        Ok(MappedBuffer { pinned, device })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.pinned.as_ptr()
    }

    /// The address kernels of the buffer's GPU use.
    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    pub fn len(&self) -> usize {
        self.pinned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_driver_means_a_clear_error() {
        if crate::cuda::available() {
            assert!(super::DeviceBuffer::new(0, 0).is_err());
            return;
        }
        let err = super::DeviceBuffer::new(0, 16).unwrap_err();
        assert!(err.message().contains("CUDA unavailable"), "{err}");
    }

    /// Buffers of every size a plugin's staging makes, and odd ones between, each start on a page,
    /// so that registering their whole pages registers nothing but them.
    #[test]
    fn device_buffers_start_on_a_page() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let sizes = [1usize, 100, 4096, 5000, 64 << 10, 100_000, 256 << 10, 1 << 20, 3 << 20];
        let buffers: Vec<_> = sizes
            .iter()
            .flat_map(|&n| (0..4).map(move |_| n))
            .map(|n| super::DeviceBuffer::new(0, n).unwrap())
            .collect();
        for b in &buffers {
            assert_eq!(b.addr() % 4096, 0, "{b:?}");
        }
    }
}
