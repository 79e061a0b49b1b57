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
use crate::transport::{MemKind, Net};

pub(super) struct EngineMemory<'a> {
    core: &'a EngineCore,
    /// The connection's token binding when it is authenticated: requests must carry bound tokens.
    binding: Option<&'a TokenBinding>,
    reach: Reach,
}

/// What a connection's channels can move, known once its transport is agreed: device memory of
/// the GPU their comms are bound to (every GPU's where the transport binds none), and host memory
/// unless the transport refuses it in requests with no GPU to stage it through (TCPXO without a
/// CUDA driver). What they cannot move is refused as a post or a peer's request names it, before
/// any comm sees it, and the connection goes on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reach {
    pub bound_gpu: Option<i32>,
    pub host: bool,
    /// The transport's name, for the refusal.
    pub transport: &'static str,
}

impl Reach {
    /// The reach of channels over `net` whose comms are bound to `bound_gpu`.
    pub fn of(bound_gpu: Option<i32>, net: &dyn Net) -> Reach {
        let host = net.properties(0).map_or(true, |p| p.supports_host);
        Reach { bound_gpu, host, transport: net.caps().name }
    }
}

/// Whether channels of `reach` can move `region`: not device memory of another GPU
/// (`transport::bound_gpu_takes`), nor host memory where the transport refuses it.
pub(super) fn channels_take(reach: Reach, region: &Region) -> Result<()> {
    let refused = match (reach.bound_gpu, region.kind) {
        (Some(_), MemKind::Cuda { device }) => crate::transport::bound_gpu_takes(reach.bound_gpu, device),
        (_, MemKind::Host) if !reach.host => Err(Error::new(
            UcclStatus::ErrNotSupported,
            format!(
                "the {} transport moves GPU memory only here (its plugin refuses host memory in requests, \
                 as GPUDirect-TCPXO does, and no GPU stages it): host memory moves to peers on this host, \
                 or over UCCL_TCPX_TRANSPORT=socket",
                reach.transport
            ),
        )),
        _ => Ok(()),
    };
    refused.map_err(|e| e.context(format!("memory region {}", region.id)))
}

impl<'a> EngineMemory<'a> {
    pub fn new(core: &'a EngineCore, binding: Option<&'a TokenBinding>, reach: Reach) -> EngineMemory<'a> {
        EngineMemory { core, binding, reach }
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
        channels_take(self.reach, &r)?;
        Ok(r)
    }

    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>> {
        let r = self.core.regions.authorize_segments(region, token, segs, self.binding)?;
        channels_take(self.reach, &r)?;
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
    use super::{Reach, channels_take};
    use crate::engine::region::RegionTable;
    use crate::error::UcclStatus;
    use crate::transport::MemKind;

    fn reach(bound_gpu: Option<i32>, host: bool) -> Reach {
        Reach { bound_gpu, host, transport: "Plugin" }
    }

    /// Channels on comms bound to a GPU take host memory and that GPU's memory; another GPU's is
    /// refused with the region named, and channels bound to none take every GPU's. A transport
    /// refusing host memory (TCPXO) has it refused here too, and only that.
    #[test]
    fn channels_refuse_another_gpus_memory_and_host_memory_their_transport_refuses() {
        let t = RegionTable::default();
        let on0 = t.get(t.register(0x10000, 0x1000, MemKind::Cuda { device: 0 }).unwrap()).unwrap();
        let host = t.get(t.register(0x20000, 0x1000, MemKind::Host).unwrap()).unwrap();
        for (bound, region) in [(Some(0), &on0), (None, &on0), (Some(1), &host), (None, &host)] {
            assert!(channels_take(reach(bound, true), region).is_ok(), "bound to {bound:?}, {:?}", region.kind);
        }
        let err = channels_take(reach(Some(1), true), &on0).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotSupported);
        assert!(err.message().contains(&format!("memory region {}", on0.id)), "{err}");
        assert!(err.message().contains("memory of GPU 0"), "{err}");
        assert!(channels_take(reach(Some(0), false), &on0).is_ok());
        let err = channels_take(reach(Some(0), false), &host).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotSupported);
        assert!(err.message().contains(&format!("memory region {}", host.id)), "{err}");
        assert!(err.message().contains("the Plugin transport moves GPU memory only here"), "{err}");
    }
}
