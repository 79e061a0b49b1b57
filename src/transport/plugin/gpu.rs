//! What the plugin transport shares across its comms about GPUs: the engine's GPU, made current
//! around the plugin's control calls (TCPX binds a comm to the device current at listen, connect,
//! accept and regMr, as NCCL's proxy thread would have it), and one [`Unpacker`] per GPU, shared by
//! every receive comm whose bounce pool lives there so that receives of all channels batch into
//! the same launches, and one set of landing slots per GPU for receives into host memory.
//!
//! Receive comms see the unpacker through [`BatchUnpack`], so that unit tests without a GPU can
//! stand a host-memory gather in for it (`mock::HeldUnpack`) and drive the device path's ordering.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::landing::HostLanding;
use crate::cuda::Gpu;
use crate::cuda::gpu::ContextRestore;
use crate::cuda::unpack::{DstPiece, ReceiveLayout, Submit, Unpacker, UnpackerConfig};
use crate::error::Result;
use crate::ncclnet::LoadMeta;

/// What a receive comm asks of its GPU's unpacker (see [`Unpacker`], whose methods these are).
pub trait BatchUnpack: Send {
    /// `pieces`: where the bytes go when not to `layout.dst` (a vectored receive).
    ///
    /// # Safety
    /// As [`Unpacker::submit_pieces`].
    unsafe fn submit(&mut self, layout: &ReceiveLayout, pieces: &[DstPiece], metas: &[LoadMeta]) -> Result<Submit>;
    fn launch(&mut self) -> Result<bool>;
    fn poll(&mut self) -> Result<u64>;
    fn finish(&mut self) -> Result<u64>;
    fn submitted(&self) -> u64;
    fn pending_receives(&self) -> usize;
    fn pending_tiles(&self) -> usize;
    fn launches_in_flight(&self) -> usize;
}

impl BatchUnpack for Unpacker {
    unsafe fn submit(&mut self, layout: &ReceiveLayout, pieces: &[DstPiece], metas: &[LoadMeta]) -> Result<Submit> {
        // SAFETY: the caller keeps `Unpacker::submit_pieces`'s contract.
        unsafe { Unpacker::submit_pieces(self, layout, pieces, metas) }
    }
    fn launch(&mut self) -> Result<bool> {
        Unpacker::launch(self)
    }
    fn poll(&mut self) -> Result<u64> {
        Unpacker::poll(self)
    }
    fn finish(&mut self) -> Result<u64> {
        Unpacker::finish(self)
    }
    fn submitted(&self) -> u64 {
        Unpacker::submitted(self)
    }
    fn pending_receives(&self) -> usize {
        Unpacker::pending_receives(self)
    }
    fn pending_tiles(&self) -> usize {
        Unpacker::pending_tiles(self)
    }
    fn launches_in_flight(&self) -> usize {
        Unpacker::launches_in_flight(self)
    }
}

/// One GPU's unpacker, shared by the receive comms whose pools live there.
pub type SharedUnpack = Arc<Mutex<dyn BatchUnpack>>;

#[derive(Default)]
pub struct PluginGpus {
    /// The GPU the engine serves, as the engine told it (`Net::set_gpu`).
    engine_gpu: OnceLock<Arc<Gpu>>,
    unpackers: Mutex<HashMap<i32, SharedUnpack>>,
    /// Per GPU, where receives into host memory land (`landing.rs`), made on first use.
    landings: Mutex<HashMap<i32, Arc<HostLanding>>>,
    /// Unit tests: host pools of this many bytes pass for device pools, gathered by this stand-in.
    #[cfg(test)]
    stand_in: OnceLock<(SharedUnpack, u64)>,
}

impl PluginGpus {
    /// The engine's GPU. The engine names it before its first listen or connect whenever the
    /// plugin binds comms to a GPU, and never changes it; a second, different one is ignored.
    pub fn set_engine_gpu(&self, gpu: &Arc<Gpu>) {
        let _ = self.engine_gpu.set(gpu.clone());
    }

    /// The engine's GPU's ordinal, once named.
    pub fn engine_ordinal(&self) -> Option<i32> {
        self.engine_gpu.get().map(|g| g.ordinal())
    }

    /// Whether a comm of this net may register memory of GPU `device`: see
    /// [`crate::transport::bound_gpu_takes`].
    pub fn takes(&self, device: i32) -> Result<()> {
        crate::transport::bound_gpu_takes(self.engine_gpu.get().map(|g| g.ordinal()), device)
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

    /// The GPU `ordinal` and its unpacker, created on first use; no GPU for a unit test's stand-in.
    pub fn unpack_device(&self, ordinal: i32) -> Result<(Option<Arc<Gpu>>, SharedUnpack)> {
        #[cfg(test)]
        if let Some((unpack, _)) = self.stand_in.get() {
            return Ok((None, unpack.clone()));
        }
        Ok((Some(Gpu::open(ordinal)?), self.unpacker(ordinal)?))
    }

    /// Unit tests: every receive comm made from now on takes its host pool of `pool_len` bytes for
    /// a device pool on GPU 0, unpacked by `unpack`.
    #[cfg(test)]
    pub fn stand_in(&self, unpack: SharedUnpack, pool_len: u64) {
        assert!(self.stand_in.set((unpack, pool_len)).is_ok(), "one stand-in per net");
    }

    /// The length of the host pools a unit test's stand-in takes for device pools.
    #[cfg(test)]
    pub fn stand_in_pool_len(&self) -> Option<u64> {
        self.stand_in.get().map(|(_, len)| *len)
    }

    /// The unpacker of GPU `ordinal`, created on first use.
    fn unpacker(&self, ordinal: i32) -> Result<SharedUnpack> {
        let mut unpackers = self.unpackers.lock();
        if let Some(u) = unpackers.get(&ordinal) {
            return Ok(u.clone());
        }
        let gpu = Gpu::open(ordinal)?;
        // Creating the unpacker binds the context to the calling thread; the caller's stays its own.
        let _restore = gpu.enter()?;
        let unpacker = Unpacker::new(UnpackerConfig { ordinal: ordinal as usize, ..UnpackerConfig::default() })
            .map_err(|e| e.context(format!("GPU unpack on GPU {ordinal}")))?;
        let unpacker: SharedUnpack = Arc::new(Mutex::new(unpacker));
        unpackers.insert(ordinal, unpacker.clone());
        Ok(unpacker)
    }
}
