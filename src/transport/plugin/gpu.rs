//! What the plugin transport shares across its comms about GPUs: the engine's GPU, made current
//! around the plugin's control calls (TCPX binds a comm to the device current at listen, connect,
//! accept and regMr, as NCCL's proxy thread would have it), and one [`Unpacker`] per GPU, shared by
//! every receive comm whose bounce pool lives there so that receives of all channels batch into
//! the same launches, and one set of landing slots per GPU for receives into host memory.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::landing::HostLanding;
use crate::cuda::Gpu;
use crate::cuda::gpu::ContextRestore;
use crate::cuda::unpack::{UnpackMode, Unpacker, UnpackerConfig};
use crate::error::{Error, Result};

/// Opt-in resident unpack kernel (see `UnpackMode::Persistent`).
pub const PERSISTENT_ENV: &str = "UCCL_TCPX_UNPACK_PERSISTENT";

/// The unpack mode `UCCL_TCPX_UNPACK_PERSISTENT` asks for: unset, empty or `0` launch a kernel per
/// batch, `1` runs the resident kernel.
pub fn unpack_mode(value: Option<&str>) -> Result<UnpackMode> {
    match value.map(str::trim) {
        None | Some("") | Some("0") => Ok(UnpackMode::Launch),
        Some("1") => Ok(UnpackMode::Persistent),
        Some(other) => Err(Error::invalid(format!("{PERSISTENT_ENV}={other:?}: expected 0 or 1"))),
    }
}

#[derive(Default)]
pub struct PluginGpus {
    /// The GPU the engine serves, as the engine told it (`Net::set_gpu`).
    engine_gpu: OnceLock<Arc<Gpu>>,
    unpackers: Mutex<HashMap<i32, Arc<Mutex<Unpacker>>>>,
    /// Per GPU, where receives into host memory land (`landing.rs`), made on first use.
    landings: Mutex<HashMap<i32, Arc<HostLanding>>>,
}

impl PluginGpus {
    /// The engine's GPU. The engine names it before its first listen or connect whenever the
    /// plugin binds comms to a GPU, and never changes it; a second, different one is ignored.
    pub fn set_engine_gpu(&self, gpu: &Arc<Gpu>) {
        let _ = self.engine_gpu.set(gpu.clone());
    }

    /// Makes the engine's GPU current until the guard drops, when one is known. With none known
    /// (no CUDA driver: the plugin then has no GPU to bind) the plugin sees the caller's context.
    pub(crate) fn enter(&self) -> Result<Option<ContextRestore>> {
        match self.engine_gpu.get() {
            Some(gpu) => gpu.enter().map(Some),
            None => Ok(None),
        }
    }

    /// The landing slots of GPU `ordinal`, created on first use.
    pub fn landing(&self, ordinal: i32) -> Result<Arc<HostLanding>> {
        let mut landings = self.landings.lock();
        if let Some(l) = landings.get(&ordinal) {
            return Ok(l.clone());
        }
        let gpu = Gpu::open(ordinal)?;
        let landing = Arc::new(
            HostLanding::new(&gpu).map_err(|e| e.context(format!("landing host-memory receives on GPU {ordinal}")))?,
        );
        landings.insert(ordinal, landing.clone());
        Ok(landing)
    }

    /// The unpacker of GPU `ordinal`, created on first use.
    pub fn unpacker(&self, ordinal: i32) -> Result<Arc<Mutex<Unpacker>>> {
        let mut unpackers = self.unpackers.lock();
        if let Some(u) = unpackers.get(&ordinal) {
            return Ok(u.clone());
        }
        let gpu = Gpu::open(ordinal)?;
        // Creating the unpacker binds the context to the calling thread; the caller's stays its own.
        let _restore = gpu.enter()?;
        let mode = unpack_mode(std::env::var(PERSISTENT_ENV).ok().as_deref())?;
        let unpacker = Unpacker::new(UnpackerConfig { ordinal: ordinal as usize, mode, ..UnpackerConfig::default() })
            .map_err(|e| e.context(format!("GPU unpack on GPU {ordinal}")))?;
        log::debug!("GPU unpack on GPU {ordinal}: {mode:?} mode");
        let unpacker = Arc::new(Mutex::new(unpacker));
        unpackers.insert(ordinal, unpacker.clone());
        Ok(unpacker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistent_knob_accepts_only_0_and_1() {
        assert_eq!(unpack_mode(None).unwrap(), UnpackMode::Launch);
        assert_eq!(unpack_mode(Some("")).unwrap(), UnpackMode::Launch);
        assert_eq!(unpack_mode(Some("0")).unwrap(), UnpackMode::Launch);
        assert_eq!(unpack_mode(Some(" 1 ")).unwrap(), UnpackMode::Persistent);
        for bad in ["yes", "2", "true"] {
            let msg = unpack_mode(Some(bad)).unwrap_err().to_string();
            assert!(msg.contains(PERSISTENT_ENV) && msg.contains(bad), "{msg}");
        }
    }
}
