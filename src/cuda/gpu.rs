//! A GPU as the engine uses it: the device's primary context (the one PyTorch and cudart use, so
//! pointers and streams are shared with them) and its PCI identity.

use std::sync::{Arc, Mutex};

use cudarc::driver::safe::CudaContext;
use cudarc::driver::{result, sys};

use super::check;
use crate::error::{Error, Result};

pub struct Gpu {
    ctx: Arc<CudaContext>,
    ordinal: i32,
    bus_id: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPU {} ({})", self.ordinal, self.bus_id)
    }
}

impl Gpu {
    /// GPU `ordinal` with its primary context retained. The calling thread's current context is
    /// left as it was.
    ///
    /// Retained once per process and kept, as cudart does: releasing the last reference would reset
    /// the context (freeing every allocation in it, including the user's) and leave threads with a
    /// destroyed context current, and re-creating one costs far more than keeping it.
    pub fn open(ordinal: i32) -> Result<Arc<Gpu>> {
        super::driver()?;
        static OPEN: Mutex<Vec<Arc<Gpu>>> = Mutex::new(Vec::new());
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gpu) = open.iter().find(|g| g.ordinal == ordinal) {
            return Ok(gpu.clone());
        }
        let count = result::device::get_count().map_err(|e| super::driver_error(e.0, "cuDeviceGetCount"))?;
        if ordinal < 0 || ordinal >= count {
            return Err(Error::invalid(format!("GPU {ordinal} does not exist: {count} CUDA device(s) are visible")));
        }
        let ctx = {
            let _restore = ContextRestore::save()?;
            CudaContext::new(ordinal as usize).map_err(|e| super::driver_error(e.0, "retain primary context"))?
        };
        let bus_id = pci_bus_id(ctx.cu_device())?;
        let gpu = Arc::new(Gpu { ctx, ordinal, bus_id });
        open.push(gpu.clone());
        Ok(gpu)
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// PCI bus id in sysfs form ("0000:4a:00.0"), the identity peers name this GPU by.
    pub fn bus_id(&self) -> &str {
        &self.bus_id
    }

    /// The primary context's handle, for calls that name a context (peer copies).
    pub(crate) fn raw_context(&self) -> sys::CUcontext {
        self.ctx.cu_ctx()
    }

    /// The device's sysfs path (`/sys/devices/pci0000:49/.../0000:4a:00.0`), which places it in
    /// the PCI tree next to NICs; None where sysfs does not list it (some containers).
    pub fn sysfs_path(&self) -> Option<String> {
        let link = format!("/sys/bus/pci/devices/{}", self.bus_id);
        std::fs::canonicalize(link).ok().map(|p| p.to_string_lossy().into_owned())
    }

    /// Makes this GPU's context current on the calling thread and leaves it so: for threads this
    /// library owns (the progress thread), where switching back would only cost time.
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| super::driver_error(e.0, "cuCtxSetCurrent"))
    }

    /// Bytes of this GPU's memory in use, by every process (`cuMemGetInfo`): for the benchmark's
    /// view of what connections cost, with one process per GPU.
    pub fn memory_in_use(&self) -> Result<u64> {
        let _restore = self.enter()?;
        let (free, total) = result::mem_get_info().map_err(|e| super::driver_error(e.0, "cuMemGetInfo"))?;
        Ok(total.saturating_sub(free) as u64)
    }

    /// Makes this GPU's context current until the guard drops, then restores the caller's: for
    /// calls made on the user's threads, whose CUDA state is theirs.
    pub(crate) fn enter(&self) -> Result<ContextRestore> {
        let restore = ContextRestore::save()?;
        self.bind()?;
        Ok(restore)
    }
}

/// CUDA devices the process sees.
pub fn device_count() -> Result<i32> {
    super::driver()?;
    result::device::get_count().map_err(|e| super::driver_error(e.0, "cuDeviceGetCount"))
}

/// The ordinal of the GPU whose context is current on the calling thread: how a caller that did
/// `cudaSetDevice(n)` (or made any context of GPU `n` current) says which GPU it works on, as UCCL's
/// endpoint reads it. `None` without a driver or without a current context. A context that fails
/// the query (destroyed under the thread, say) names no GPU either; that is logged, not an error,
/// since the caller may still name its GPU another way.
pub fn current_ordinal() -> Option<i32> {
    super::driver().ok()?;
    let current = match result::ctx::get_current() {
        Ok(Some(ctx)) => ctx,
        Ok(None) => return None,
        Err(e) => {
            log::debug!("cuCtxGetCurrent failed ({e:?}): no current GPU");
            return None;
        }
    };
    if current.is_null() {
        return None;
    }
    let mut device: sys::CUdevice = 0;
    // SAFETY: writes one device handle for the context current on this thread.
    let status = unsafe { sys::cuCtxGetDevice(&mut device) };
    if status != sys::CUresult::CUDA_SUCCESS {
        log::debug!("cuCtxGetDevice failed ({status:?}): no current GPU");
        return None;
    }
    // A device handle is its ordinal on every driver we know; map it through the device table
    // anyway, so that nothing rests on that.
    let count = result::device::get_count().ok()?;
    (0..count).find(|&ordinal| result::device::get(ordinal).is_ok_and(|d| d == device))
}

/// Puts back the context that was current when it was made.
pub(crate) struct ContextRestore {
    previous: sys::CUcontext,
}

impl ContextRestore {
    fn save() -> Result<ContextRestore> {
        let previous = result::ctx::get_current()
            .map_err(|e| super::driver_error(e.0, "cuCtxGetCurrent"))?
            .unwrap_or(std::ptr::null_mut());
        Ok(ContextRestore { previous })
    }
}

impl Drop for ContextRestore {
    fn drop(&mut self) {
        // SAFETY: restores a context handle the driver gave this thread (or none); a context the
        // user destroyed meanwhile makes the call fail, which changes nothing.
        let _ = unsafe { sys::cuCtxSetCurrent(self.previous) };
    }
}

fn pci_bus_id(device: sys::CUdevice) -> Result<String> {
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: the driver writes a NUL-terminated string of at most `len` bytes into `buf`.
    check(unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device) }, "cuDeviceGetPCIBusId")?;
    buf[buf.len() - 1] = 0;
    // SAFETY: NUL-terminated above at the latest.
    let raw = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    Ok(normalize_bus_id(&raw))
}

/// The driver writes "domain:bus:device.function" in upper-case hex with a varying domain width;
/// sysfs (and NIC pairing) uses "%04x:%02x:%02x.%x".
pub(crate) fn normalize_bus_id(raw: &str) -> String {
    let parsed = (|| {
        let (domain, rest) = raw.trim().split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (device, function) = rest.split_once('.')?;
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        Some(format!("{:04x}:{:02x}:{:02x}.{:x}", hex(domain)?, hex(bus)?, hex(device)?, hex(function)?))
    })();
    parsed.unwrap_or_else(|| raw.trim().to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::normalize_bus_id;

    #[test]
    fn bus_ids_take_the_sysfs_form() {
        assert_eq!(normalize_bus_id("00000000:4A:00.0"), "0000:4a:00.0");
        assert_eq!(normalize_bus_id("0000:C1:00.1"), "0000:c1:00.1");
        assert_eq!(normalize_bus_id("0001:0a:1f.7"), "0001:0a:1f.7");
        assert_eq!(normalize_bus_id(" WEIRD "), "weird");
    }

    #[test]
    fn open_without_a_driver_is_an_error_not_a_panic() {
        if super::super::available() {
            assert!(super::Gpu::open(-1).is_err());
            assert!(super::Gpu::open(1 << 20).is_err());
        } else {
            let err = super::Gpu::open(0).unwrap_err();
            assert!(err.message().contains("CUDA unavailable"), "{err}");
        }
    }
}
