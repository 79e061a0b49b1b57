//! The engine's memory as the connection state machine sees it: a peer's requests are decided by
//! the region table, and inline payloads are copied with the CPU (host memory) or a synchronous
//! copy of at most 64 KiB (device memory, cheaper than a staged pass).

use std::sync::Arc;

use super::state::Memory;
use crate::engine::region::Region;
use crate::engine::shared::EngineCore;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{RemoteSeg, TokenBinding};
use crate::transport::MemKind;

pub(super) struct EngineMemory<'a> {
    core: &'a EngineCore,
    /// The connection's token binding when it is authenticated: requests must carry bound tokens.
    binding: Option<&'a TokenBinding>,
}

impl<'a> EngineMemory<'a> {
    pub fn new(core: &'a EngineCore, binding: Option<&'a TokenBinding>) -> EngineMemory<'a> {
        EngineMemory { core, binding }
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

impl Memory for EngineMemory<'_> {
    fn authorize(&self, region: u64, token: u64, addr: u64, len: u64) -> Result<Arc<Region>> {
        self.core.regions.authorize(region, token, addr, len, self.binding)
    }

    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>> {
        self.core.regions.authorize_segments(region, token, segs, self.binding)
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
}
