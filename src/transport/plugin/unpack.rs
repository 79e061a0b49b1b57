//! Where a devmem plugin reports received fragments: the `UnpackDeviceHandle` that the device handle
//! filled by `accept` points to, read once per receive comm. For TCPX that handle is device memory
//! (one `cuMemcpyDtoH`); a host-mode fake keeps it in host memory. The fragment lists it points to
//! are host (or host-mapped) memory either way; the bounce pool may be either.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::sys;

use super::abi::{
    LoadMeta, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NcclNetDeviceHandleV7, NetUnpackMeta,
    UNPACK_QUEUE_DEPTH, UnpackDeviceHandle,
};
use crate::error::{Error, Result};

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

/// A receive comm's view of its unpack queue.
pub struct UnpackView {
    meta: *const NetUnpackMeta,
    pool: *const u8,
    pool_residence: Residence,
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
        Ok(Some(UnpackView { meta: handle.meta, pool, pool_residence: residence(pool.cast()) }))
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

    /// The bounce pool when the CPU can read it.
    pub fn host_pool(&self) -> Result<*const u8> {
        match (self.pool.is_null(), self.pool_residence) {
            (true, _) => Err(Error::backend("net plugin has no bounce pool to gather received fragments from")),
            (false, Residence::Device) => Err(Error::new(
                crate::error::UcclStatus::ErrNotSupported,
                "received data sits in a GPU bounce pool; gathering it is unsupported until the GPU unpack path is wired",
            )),
            (false, Residence::Host) => Ok(self.pool),
        }
    }
}
