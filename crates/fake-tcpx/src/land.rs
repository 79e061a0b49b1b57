//! Where a TCPXO receive's bytes land: in the posted buffer itself, as the NIC's transfer service
//! writes them into the registered buffer at the request's offset (`dxs/client/recv-socket.h`
//! `RecvLinearized` L75). Host memory (host mode, where CUDA registrations stand in for device
//! memory) is written straight from the socket; device memory (GPU mode) through a pinned staging
//! buffer and one copy on a borrowed stream (`gpu::with_stream`) before `test` reports the receive done. Everything
//! is allocated at accept: nothing is allocated or freed inside `test` (see `staging.rs` for why).

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUdeviceptr};

use crate::fail::{Fail, Result};
use crate::fragment::{MAX_FRAGMENTS, PAGE};
use crate::gpu::{GpuContext, cuda, with_stream};

/// The largest GPU-mode receive: the same staging size as TCPX's receives in GPU mode (a limit of
/// the fake; TCPXO has none below `int`).
pub const DEVICE_STAGING_BYTES: usize = MAX_FRAGMENTS * PAGE;

pub struct Landing {
    gpu: Option<DeviceLanding>,
    /// Where the bytes of a receive with nowhere to go (0 bytes) are read into.
    empty: [u8; 8],
}

struct DeviceLanding {
    ctx: GpuContext,
    staging: *mut c_void,
}

// SAFETY: owned CUDA objects and pinned memory, used under the comm's lock.
unsafe impl Send for DeviceLanding {}

impl Landing {
    /// Host mode: every buffer is host memory.
    pub fn host() -> Landing {
        Landing { gpu: None, empty: [0; 8] }
    }

    /// GPU mode: CUDA registrations are device memory of `ctx`'s GPU.
    pub fn gpu(ctx: GpuContext) -> Result<Landing> {
        let mut d = DeviceLanding { ctx, staging: std::ptr::null_mut() };
        let staging = &mut d.staging;
        // On failure `d` is dropped, freeing what was made.
        d.ctx.with(|| {
            // SAFETY: an out-pointer to a field; the staging is DEVICE_STAGING_BYTES long.
            unsafe {
                cuda(
                    "cuMemHostAlloc(receive staging)",
                    sys::cuMemHostAlloc(staging, DEVICE_STAGING_BYTES, sys::CU_MEMHOSTALLOC_PORTABLE),
                )
            }
        })?;
        Ok(Landing { gpu: Some(d), empty: [0; 8] })
    }

    /// The GPU its device buffers belong to (GPU mode).
    pub fn context(&self) -> Option<&GpuContext> {
        self.gpu.as_ref().map(|d| &d.ctx)
    }

    /// The largest receive into device memory (GPU mode), if there is a limit.
    pub fn device_limit(&self) -> Option<usize> {
        self.gpu.as_ref().map(|_| DEVICE_STAGING_BYTES)
    }

    /// Where the socket writes a receive of `len` bytes bound for `dst` (device memory when
    /// `device`).
    pub fn target(&mut self, dst: usize, len: usize, device: bool) -> Result<*mut u8> {
        match (&self.gpu, device, len) {
            (_, _, 0) => Ok(self.empty.as_mut_ptr()),
            (Some(d), true, _) if len <= DEVICE_STAGING_BYTES => Ok(d.staging.cast()),
            (Some(_), true, _) => Err(Fail::internal(format!(
                "a {len}-byte receive into GPU memory exceeds the fake's {DEVICE_STAGING_BYTES}-byte staging"
            ))),
            _ => Ok(dst as *mut u8),
        }
    }

    /// The `len` bytes for `dst` arrived where `target` said: copy them to the device if they were
    /// staged.
    pub fn finish(&mut self, dst: usize, len: usize, device: bool) -> Result<()> {
        let Some(d) = self.gpu.as_ref().filter(|_| device && len > 0) else { return Ok(()) };
        let staging = d.staging;
        d.ctx.with(|| {
            with_stream(&d.ctx, |stream| {
                // SAFETY: `dst` lies in a CUDA registration of this comm's GPU that the irecv
                // contract keeps valid until the receive is reported done; the staging holds the
                // `len` bytes just received and is not written again before the synchronisation.
                unsafe {
                    cuda(
                        "cuMemcpyHtoDAsync(posted buffer)",
                        sys::cuMemcpyHtoDAsync_v2(dst as CUdeviceptr, staging, len, stream),
                    )?;
                    cuda("cuStreamSynchronize", sys::cuStreamSynchronize(stream))
                }
            })
        })
    }
}

impl Drop for DeviceLanding {
    fn drop(&mut self) {
        let _ = self.ctx.with(|| {
            // SAFETY: frees only what `Landing::gpu` made; every copy out of it was waited for.
            unsafe {
                if !self.staging.is_null() {
                    let _ = sys::cuMemFreeHost(self.staging);
                }
            }
            Ok(())
        });
    }
}
