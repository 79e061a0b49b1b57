//! CUDA through cudarc, loaded at run time: the library builds and runs on machines without CUDA, and
//! every entry point here checks for the driver first because cudarc panics when it is missing.

use std::sync::OnceLock;

use crate::error::{Error, Result};

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
