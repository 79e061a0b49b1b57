//! CUDA through cudarc, loaded at run time: the library builds and runs on machines without CUDA, and
//! every entry point here checks for the driver first because cudarc panics when it is missing.
//!
//! - [`gpu`]: a device's primary context and PCI identity (shared with PyTorch and cudart callers);
//! - [`pointer`]: is an address host or device memory, and on which GPU;
//! - [`memory`]: [`DeviceBuffer`] (device memory for tests and benchmarks) and pinned host memory;
//! - [`stream`]: streams and events, the asynchronous copies the staging path issues;
//! - [`ring`]: a comm's ring of pinned staging slots;
//! - [`pieces`]: many copies on one GPU by one kernel, listed one piece at a time;
//! - [`segments`]: chunks of many device segments gathered into and scattered out of a slot by the
//!   unpack kernel and one copy;
//! - [`small_copy`]: the synchronous copies of inline transfers, fast up to 64 KiB;
//! - [`ipc`]: CUDA IPC handles of registered allocations and mappings of peers' ones;
//! - [`device_copy`]: the asynchronous copies of the same-host path, completion through events.

pub mod device_copy;
pub mod gpu;
pub mod ipc;
pub mod memory;
pub mod pieces;
pub mod pointer;
pub mod ring;
pub mod segments;
pub mod slots;
pub mod small_copy;
pub mod stream;

use std::sync::OnceLock;

use cudarc::driver::sys::CUresult;

use crate::error::{Error, Result};

pub use gpu::Gpu;
pub use memory::DeviceBuffer;
pub use pointer::{Location, locate};
pub use ring::StagingRing;
pub mod unpack;

/// Whether a usable CUDA driver is present (libcuda loads and `cuInit` succeeds), probed once per
/// process. The error says why not, for messages such as "cannot register device memory".
pub fn driver() -> Result<()> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: only tries to dlopen the candidate library names; calls nothing in them.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no CUDA driver library (libcuda.so) could be loaded".to_owned());
            }
            cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))
        })
        .clone()
        .map_err(|why| Error::backend(format!("CUDA unavailable: {why}")))
}

/// True when CUDA work can run here; GPU tests use it to report themselves skipped.
pub fn available() -> bool {
    driver().is_ok()
}

/// A driver status as a result whose error names the call that failed. Only called after a
/// successful [`driver`] probe, since naming the error calls into the driver.
pub(crate) fn check(status: CUresult, what: &str) -> Result<()> {
    match status {
        CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(driver_error(other, what)),
    }
}

pub(crate) fn driver_error(status: CUresult, what: &str) -> Error {
    let err = cudarc::driver::result::DriverError(status);
    let name = err.error_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{status:?}"));
    let text = err.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Error::backend(format!("CUDA {what} failed: {name} ({text})"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_is_stable_and_never_panics() {
        let first = super::driver().map_err(|e| e.to_string());
        let second = super::driver().map_err(|e| e.to_string());
        assert_eq!(first, second);
        if let Err(why) = first {
            assert!(why.contains("CUDA unavailable"), "{why}");
        }
    }
}
