//! The engine's memory as the connection state machine sees it: a peer's requests are decided by
//! the region table, and inline payloads are copied with the CPU (host memory) or a copy of at
//! most 64 KiB through the GPU's small copier (device memory, cheaper than a staged pass): started
//! where the state can wait for it (`start_store`, `start_load`), synchronous elsewhere.

use std::sync::Arc;

use super::state::{Copying, Memory, Started};
use crate::cuda::small_copy::StartedCopy;
use crate::engine::region::Region;
use crate::engine::shared::EngineCore;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{RemoteSeg, TokenBinding};
use crate::transport::MemKind;

pub(super) struct EngineMemory<'a> {
    core: &'a EngineCore,
    /// The connection's token binding when it is authenticated: requests must carry bound tokens.
    binding: Option<&'a TokenBinding>,
    /// The GPU the connection's comms are bound to, if their transport binds them to one.
    bound_gpu: Option<i32>,
}

/// Whether channels whose comms are bound to GPU `bound_gpu` (if any) can move `region`: not
/// device memory of another GPU (`transport::bound_gpu_takes`).
pub(super) fn channels_take(bound_gpu: Option<i32>, region: &Region) -> Result<()> {
    match (bound_gpu, region.kind) {
        (Some(_), MemKind::Cuda { device }) => crate::transport::bound_gpu_takes(bound_gpu, device)
            .map_err(|e| e.context(format!("memory region {}", region.id))),
        _ => Ok(()),
    }
}

impl<'a> EngineMemory<'a> {
    pub fn new(core: &'a EngineCore, binding: Option<&'a TokenBinding>, bound_gpu: Option<i32>) -> EngineMemory<'a> {
        EngineMemory { core, binding, bound_gpu }
    }

    /// The GPU owning a device region: the engine's or another of the process (registration
    /// opened it), whose context its inline copies run in.
    fn region_gpu(&self, region: &Region) -> Result<Arc<crate::cuda::Gpu>> {
        match (self.core.gpu.get(), region.kind) {
            (Some(gpu), MemKind::Cuda { device }) if gpu.ordinal() == device => Ok(gpu.clone()),
            (_, MemKind::Cuda { device }) => crate::cuda::Gpu::open(device),
            (_, MemKind::Host) => Err(Error::new(
                UcclStatus::ErrInternal,
                format!("region {} is host memory, not device memory", region.id),
            )),
        }
    }
}

impl Copying for StartedCopy {
    fn done(&self) -> Result<bool> {
        StartedCopy::done(self)
    }

    fn wait(&self) -> Result<()> {
        StartedCopy::wait(self)
    }

    fn loaded(&self) -> &[u8] {
        StartedCopy::loaded(self)
    }
}

#[cfg(test)]
impl Copying for crate::engine::test_copies::SimulatedCopy {
    fn done(&self) -> Result<bool> {
        crate::engine::test_copies::SimulatedCopy::done(self)
    }

    fn wait(&self) -> Result<()> {
        crate::engine::test_copies::SimulatedCopy::wait(self)
    }

    fn loaded(&self) -> &[u8] {
        crate::engine::test_copies::SimulatedCopy::loaded(self)
    }
}

impl Memory for EngineMemory<'_> {
    fn authorize(&self, region: u64, token: u64, addr: u64, len: u64) -> Result<Arc<Region>> {
        let r = self.core.regions.authorize(region, token, addr, len, self.binding)?;
        channels_take(self.bound_gpu, &r)?;
        Ok(r)
    }

    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>> {
        let r = self.core.regions.authorize_segments(region, token, segs, self.binding)?;
        channels_take(self.bound_gpu, &r)?;
        Ok(r)
    }

    unsafe fn store(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<()> {
        match region.kind {
            // SAFETY: per the contract.
            MemKind::Host => unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), addr as *mut u8, payload.len()) },
            // SAFETY: per the contract; registration proved the range is memory of the region's GPU.
            MemKind::Cuda { .. } => unsafe {
                crate::cuda::small_copy::copy_to_device_sync(&*self.region_gpu(region)?, addr, payload)?
            },
        }
        Ok(())
    }

    unsafe fn load(&self, region: &Region, addr: usize, len: usize) -> Result<Vec<u8>> {
        match region.kind {
            // SAFETY: per the contract.
            MemKind::Host => Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()),
            MemKind::Cuda { .. } => {
                let mut out = vec![0u8; len];
                // SAFETY: per the contract.
                unsafe { crate::cuda::small_copy::copy_from_device_sync(&*self.region_gpu(region)?, &mut out, addr)? };
                Ok(out)
            }
        }
    }

    unsafe fn start_store(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<Started<()>> {
        #[cfg(test)]
        if let (MemKind::Host, Some(sim)) = (region.kind, self.core.simulated_copies.get()) {
            // SAFETY: per the contract: the range stays live until the copy is done.
            return Ok(Started::Later(Box::new(unsafe { sim.store(addr, payload) })));
        }
        if let MemKind::Cuda { .. } = region.kind {
            let gpu = self.region_gpu(region)?;
            // SAFETY: per the contract; registration proved the range is memory of that GPU.
            let started = unsafe { crate::cuda::small_copy::start_to_device(&gpu, addr, payload)? };
            if let Some(copy) = started {
                return Ok(Started::Later(Box::new(copy)));
            }
        }
        // SAFETY: per the contract.
        unsafe { self.store(region, addr, payload) }.map(Started::Now)
    }

    unsafe fn start_load(&self, region: &Region, addr: usize, len: usize) -> Result<Started<Vec<u8>>> {
        #[cfg(test)]
        if let (MemKind::Host, Some(sim)) = (region.kind, self.core.simulated_copies.get()) {
            // SAFETY: per the contract.
            return Ok(Started::Later(Box::new(unsafe { sim.load(addr, len) })));
        }
        if let MemKind::Cuda { .. } = region.kind {
            let gpu = self.region_gpu(region)?;
            // SAFETY: as above.
            let started = unsafe { crate::cuda::small_copy::start_from_device(&gpu, addr, len)? };
            if let Some(copy) = started {
                return Ok(Started::Later(Box::new(copy)));
            }
        }
        // SAFETY: per the contract.
        unsafe { self.load(region, addr, len) }.map(Started::Now)
    }
}

#[cfg(test)]
mod tests {
    use super::channels_take;
    use crate::engine::region::RegionTable;
    use crate::error::UcclStatus;
    use crate::transport::MemKind;

    /// Channels on comms bound to a GPU take host memory and that GPU's memory; another GPU's is
    /// refused with the region named, and channels bound to none take every GPU's.
    #[test]
    fn channels_bound_to_a_gpu_refuse_only_another_gpus_memory() {
        let t = RegionTable::default();
        let on0 = t.get(t.register(0x10000, 0x1000, MemKind::Cuda { device: 0 }).unwrap()).unwrap();
        let host = t.get(t.register(0x20000, 0x1000, MemKind::Host).unwrap()).unwrap();
        for (bound, region) in [(Some(0), &on0), (None, &on0), (Some(1), &host), (None, &host)] {
            assert!(channels_take(bound, region).is_ok(), "bound to {bound:?}, {:?}", region.kind);
        }
        let err = channels_take(Some(1), &on0).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotSupported);
        assert!(err.message().contains(&format!("memory region {}", on0.id)), "{err}");
        assert!(err.message().contains("memory of GPU 0"), "{err}");
    }
}
