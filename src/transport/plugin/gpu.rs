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
use crate::cuda::unpack::{Unpacker, UnpackerConfig};
use crate::error::Result;

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
        let unpacker = Unpacker::new(UnpackerConfig { ordinal: ordinal as usize, ..UnpackerConfig::default() })
            .map_err(|e| e.context(format!("GPU unpack on GPU {ordinal}")))?;
        let unpacker = Arc::new(Mutex::new(unpacker));
        unpackers.insert(ordinal, unpacker.clone());
        Ok(unpacker)
    }
}
