//! Where a devmem plugin reports received fragments: the `UnpackDeviceHandle` that the device handle
//! filled by `accept` points to, read once per receive comm. For TCPX that handle is device memory
//! (one `cuMemcpyDtoH`); a host-mode fake keeps it in host memory. The fragment lists it points to
//! are host (or host-mapped) memory either way; the bounce pool may be either.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::sys;

use crate::error::{Error, Result};
use crate::ncclnet::{
    LoadMeta, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NcclNetDeviceHandleV7, NetUnpackMeta,
    UNPACK_QUEUE_DEPTH, UnpackDeviceHandle,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residence {
    Host,
    Device,
}

/// Device memory only when a CUDA driver exists and says so; any other pointer is host memory
/// (without a driver nothing can be device memory, and unregistered host memory makes the query
/// fail with "invalid value").
pub fn residence(ptr: *const c_void) -> Residence {
    if crate::cuda::driver().is_err() || ptr.is_null() {
        return Residence::Host;
    }
    let mut ty: u32 = 0;
    // SAFETY: the driver is initialised (probed above); the attribute is a 32-bit enum written to `ty`.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ty as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as sys::CUdeviceptr,
        )
    };
    if rc == sys::CUresult::CUDA_SUCCESS && ty == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        Residence::Device
    } else {
        Residence::Host
    }
}

/// Copies the 24-byte handle out of device memory, in the context that owns it.
fn copy_from_device(ptr: *const c_void) -> Result<UnpackDeviceHandle> {
    let cuda =
        |what: &str, rc: sys::CUresult| Error::backend(format!("reading the unpack handle: {what} failed: {rc:?}"));
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: the driver is initialised (`residence` said Device); out-pointers are valid.
    unsafe {
        let rc = sys::cuPointerGetAttribute(
            (&mut ctx as *mut sys::CUcontext).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
            ptr as sys::CUdeviceptr,
        );
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(cuda("cuPointerGetAttribute(CONTEXT)", rc));
        }
        let rc = sys::cuCtxPushCurrent_v2(ctx);
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(cuda("cuCtxPushCurrent", rc));
        }
        let mut handle = std::mem::MaybeUninit::<UnpackDeviceHandle>::zeroed();
        let rc =
            sys::cuMemcpyDtoH_v2(handle.as_mut_ptr().cast(), ptr as sys::CUdeviceptr, size_of::<UnpackDeviceHandle>());
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        let _ = sys::cuCtxPopCurrent_v2(&mut popped);
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(cuda("cuMemcpyDtoH", rc));
        }
        Ok(handle.assume_init())
    }
}

/// A bounce pool in device memory: where, how large (the allocation it lies in, as the driver
/// reports it, so no fragment can send the kernel past it) and on which GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePool {
    pub addr: u64,
    pub len: u64,
    pub ordinal: i32,
}

/// The device pool at `addr`: its GPU and the bytes from `addr` to the end of its allocation.
fn device_pool(addr: u64) -> Result<DevicePool> {
    let ordinal = match crate::cuda::locate(addr as usize, 1)? {
        crate::cuda::Location::Device { ordinal } => ordinal,
        crate::cuda::Location::Host => {
            return Err(Error::backend(format!("net plugin's bounce pool {addr:#x} is not device memory")));
        }
    };
    let gpu = crate::cuda::Gpu::open(ordinal)?;
    let _current = gpu.enter()?;
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: out-pointers for one address range query on an address the driver knows as device memory.
    let rc = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr as sys::CUdeviceptr) };
    crate::cuda::check(rc, "cuMemGetAddressRange of the bounce pool")?;
    let end = base + size as u64;
    if base > addr || end <= addr {
        return Err(Error::backend(format!("net plugin's bounce pool {addr:#x} lies outside its own allocation")));
    }
    Ok(DevicePool { addr, len: (end - addr).min(super::gather::MAX_POOL_LEN), ordinal })
}

/// A receive comm's view of its unpack queue.
pub struct UnpackView {
    meta: *const NetUnpackMeta,
    pool: *const u8,
    pool_residence: Residence,
    device_pool: Option<DevicePool>,
}

// SAFETY: the pointers name the plugin's per-comm queue and pool, which live until the comm closes
// and are only read through the comm that owns this view.
unsafe impl Send for UnpackView {}

impl UnpackView {
    /// Reads what `accept` reported. `None` when the plugin filled no unpack handle (host-type device).
    pub fn from_device_handle(h: &NcclNetDeviceHandleV7) -> Result<Option<UnpackView>> {
        if h.net_device_type != NCCL_NET_DEVICE_UNPACK {
            return Ok(None);
        }
        let bad = |why: String| Error::backend(format!("net plugin's unpack device handle is unusable: {why}"));
        if h.net_device_version != NCCL_NET_DEVICE_UNPACK_VERSION {
            return Err(bad(format!("version {} (expected {NCCL_NET_DEVICE_UNPACK_VERSION})", h.net_device_version)));
        }
        if h.handle.is_null() || h.size < size_of::<UnpackDeviceHandle>() {
            return Err(bad(format!("handle {:p} of {} bytes", h.handle, h.size)));
        }
        let handle = match residence(h.handle) {
            // SAFETY: a host pointer the plugin filled with at least 24 bytes (size checked above).
            Residence::Host => unsafe { std::ptr::read_unaligned(h.handle as *const UnpackDeviceHandle) },
            Residence::Device => copy_from_device(h.handle)?,
        };
        if handle.meta.is_null() {
            return Err(bad("no fragment metadata".into()));
        }
        if !(handle.meta as usize).is_multiple_of(align_of::<NetUnpackMeta>()) {
            return Err(bad(format!("misaligned fragment metadata at {:p}", handle.meta)));
        }
        if residence(handle.meta as *const c_void) == Residence::Device {
            return Err(bad("the fragment metadata is in device memory, which the host cannot read".into()));
        }
        let pool = handle.bounce_buf as *const u8;
        let pool_residence = residence(pool.cast());
        let device_pool = match pool_residence {
            Residence::Device => Some(device_pool(pool as u64)?),
            Residence::Host => None,
        };
        Ok(Some(UnpackView { meta: handle.meta, pool, pool_residence, device_pool }))
    }

    /// `cnt[slot]`, published by the plugin (release) before `test` reported the receive done.
    pub fn fragment_count(&self, slot: usize) -> u64 {
        debug_assert!(slot < UNPACK_QUEUE_DEPTH);
        // SAFETY: `meta` is the plugin's live queue for this comm (checked non-NULL and aligned);
        // the counter is only ever accessed whole.
        unsafe {
            let cnt = std::ptr::addr_of!((*self.meta).cnt[slot % UNPACK_QUEUE_DEPTH]);
            AtomicU64::from_ptr(cnt.cast_mut()).load(Ordering::Acquire)
        }
    }

    /// Copies the first `count` (≤ 2048, checked by the caller) fragments of `slot` into `out`, so
    /// what is validated is what is used even if the plugin touched the queue meanwhile.
    pub fn copy_fragments(&self, slot: usize, count: usize, out: &mut Vec<LoadMeta>) {
        out.clear();
        // SAFETY: as in `fragment_count`; `count` is within the slot's 2048 entries, all of which
        // the plugin wrote before publishing the count.
        unsafe {
            let first = std::ptr::addr_of!((*self.meta).mem[slot % UNPACK_QUEUE_DEPTH][0]);
            out.extend_from_slice(std::slice::from_raw_parts(first, count));
        }
    }

    /// The bounce pool when it is device memory.
    pub fn device_pool(&self) -> Option<DevicePool> {
        self.device_pool
    }

    /// Unit tests: the host pool passes for a device pool of `len` bytes on GPU 0, which a stand-in
    /// unpacker gathers on the CPU.
    #[cfg(test)]
    pub fn pretend_device_pool(&mut self, len: u64) {
        self.device_pool = Some(DevicePool { addr: self.pool as u64, len, ordinal: 0 });
    }

    /// The bounce pool when the CPU can read it.
    pub fn host_pool(&self) -> Result<*const u8> {
        match (self.pool.is_null(), self.pool_residence) {
            (true, _) => Err(Error::backend("net plugin has no bounce pool to gather received fragments from")),
            (false, Residence::Device) => {
                Err(Error::backend("received data sits in a GPU bounce pool, which the CPU cannot read"))
            }
            (false, Residence::Host) => Ok(self.pool),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack_type(handle: *mut c_void) -> NcclNetDeviceHandleV7 {
        NcclNetDeviceHandleV7 {
            net_device_type: NCCL_NET_DEVICE_UNPACK,
            net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
            handle,
            size: size_of::<UnpackDeviceHandle>(),
            needs_proxy_progress: 1,
        }
    }

    fn zeroed_meta() -> Box<NetUnpackMeta> {
        // SAFETY: plain integers, all-zero is valid; boxed because it is 512 KiB.
        unsafe { Box::from_raw(std::alloc::alloc_zeroed(std::alloc::Layout::new::<NetUnpackMeta>()).cast()) }
    }

    #[test]
    fn a_host_resident_handle_is_read_directly_and_refuses_bad_values() {
        let mut meta = zeroed_meta();
        meta.cnt[3] = 2;
        meta.mem[3][1] = LoadMeta { src_off: 7, len: 9, dst_off: 11 };
        let mut pool = vec![0u8; 4096];
        let mut handle = UnpackDeviceHandle { meta: &mut *meta, bounce_buf: pool.as_mut_ptr().cast(), head: u64::MAX };
        let view = UnpackView::from_device_handle(&unpack_type((&mut handle as *mut UnpackDeviceHandle).cast()))
            .unwrap()
            .expect("an unpack view");
        assert_eq!(view.fragment_count(3), 2);
        let mut out = Vec::new();
        view.copy_fragments(3, 2, &mut out);
        assert_eq!(out[1], LoadMeta { src_off: 7, len: 9, dst_off: 11 });
        assert_eq!(view.host_pool().unwrap(), pool.as_ptr());

        let host_type = NcclNetDeviceHandleV7::default();
        assert!(UnpackView::from_device_handle(&host_type).unwrap().is_none());
        let mut wrong = unpack_type((&mut handle as *mut UnpackDeviceHandle).cast());
        wrong.net_device_version = 6;
        assert!(UnpackView::from_device_handle(&wrong).err().unwrap().to_string().contains("version 6"));
        assert!(UnpackView::from_device_handle(&unpack_type(std::ptr::null_mut())).is_err());
        handle.meta = std::ptr::null_mut();
        let e = UnpackView::from_device_handle(&unpack_type((&mut handle as *mut UnpackDeviceHandle).cast()));
        assert!(e.err().unwrap().to_string().contains("no fragment metadata"));
        handle.meta = &mut *meta;
        handle.bounce_buf = std::ptr::null_mut();
        let view = UnpackView::from_device_handle(&unpack_type((&mut handle as *mut UnpackDeviceHandle).cast()));
        assert!(view.unwrap().unwrap().host_pool().unwrap_err().to_string().contains("no bounce pool"));
    }

    /// TCPX's layout: the handle and the pool in device memory, the metadata in host memory. Needs a
    /// CUDA device; without a driver there is no device memory to read and the case is skipped.
    #[test]
    fn a_device_resident_handle_is_copied_once_and_a_device_pool_is_measured() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let ctx = cudarc::driver::CudaContext::new(0).expect("a CUDA device");
        ctx.bind_to_thread().unwrap();
        let mut meta = zeroed_meta();
        meta.cnt[0] = 5;
        // SAFETY: plain driver allocations and copies of the sizes given, freed below.
        unsafe {
            let pool = cudarc::driver::result::malloc_sync(1 << 20).unwrap();
            let handle = UnpackDeviceHandle { meta: &mut *meta, bounce_buf: pool as *mut c_void, head: u64::MAX };
            let dev_handle = cudarc::driver::result::malloc_sync(size_of::<UnpackDeviceHandle>()).unwrap();
            let bytes = std::slice::from_raw_parts(
                (&handle as *const UnpackDeviceHandle).cast::<u8>(),
                size_of::<UnpackDeviceHandle>(),
            );
            cudarc::driver::result::memcpy_htod_sync(dev_handle, bytes).unwrap();
            assert_eq!(residence(dev_handle as *const c_void), Residence::Device);
            assert_eq!(residence((&*meta as *const NetUnpackMeta).cast()), Residence::Host);
            // Read from another thread, where no context is current: the copy pushes the owner's.
            let raw = dev_handle as usize;
            let view = std::thread::spawn(move || {
                UnpackView::from_device_handle(&unpack_type(raw as *mut c_void)).map(|v| v.map(|v| v.fragment_count(0)))
            })
            .join()
            .unwrap();
            assert_eq!(view.unwrap(), Some(5), "meta pointer came through the device copy");
            let view = UnpackView::from_device_handle(&unpack_type(dev_handle as *mut c_void)).unwrap().unwrap();
            let err = view.host_pool().unwrap_err();
            assert!(err.to_string().contains("GPU bounce pool"), "{err}");
            let pool_info = view.device_pool().expect("a device pool");
            assert_eq!((pool_info.addr, pool_info.ordinal), (pool, 0));
            assert!(pool_info.len >= 1 << 20, "the allocation holds the pool: {pool_info:?}");
            cudarc::driver::result::free_sync(dev_handle).unwrap();
            cudarc::driver::result::free_sync(pool).unwrap();
        }
    }
}
