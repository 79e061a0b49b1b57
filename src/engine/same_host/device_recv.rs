//! The receiver's copy of a peer's two-sided message of GPU memory offered over CUDA IPC (the
//! protocol is in `conn/state/ipc_send.rs`): the peer's allocation mapped into the GPU that reaches
//! the receive (its own GPU for device memory, the engine's for host memory), one
//! `cuMemcpyAsync` on that GPU's queue behind an event, finished like a one-sided batch
//! (`ipc.rs`) and answered with Done or Deny when the event fired.
//!
//! The receive's region is counted for the copy (`Region::copy_started`), so its deregistration
//! waits for it; the peer's region stays in the batch's `remote_regions`, so the peer's revocation
//! of it is answered only once the copy is over.

use std::sync::Arc;

use super::ipc::{Batch, IpcState};
use crate::cuda::Gpu;
use crate::cuda::device_copy::DeviceCopy;
use crate::engine::region::Region;
use crate::engine::shared::EngineCore;
use crate::engine::transfer::Transfer;
use crate::error::Error;
use crate::proto::IPC_HANDLE_LEN;
use crate::transport::MemKind;

/// The peer's offered message `peer_op` of `len` bytes, matched to a receive at `addr` of
/// `region` that takes all of it.
pub(crate) struct Offered<'a> {
    pub peer_op: u64,
    pub len: u64,
    pub addr: usize,
    pub region: &'a Arc<Region>,
    pub transfer: &'a Arc<Transfer>,
    pub src: Source,
}

/// Where the offered message lies at the peer: `addr` of its `region`, inside the allocation the
/// handle names (checked when its IpcSend was decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Source {
    pub region: u64,
    pub addr: u64,
    pub handle: [u8; IPC_HANDLE_LEN],
    pub alloc_base: u64,
    pub alloc_len: u64,
}

/// How a device receive went.
pub(crate) enum Received {
    /// The copy is queued; its batch answers the peer.
    Issued,
    /// Nothing was queued: the message takes the channels.
    Declined,
    /// Queuing the copy failed: the receive fails with this, and the peer's message is denied.
    Failed(Error),
}

/// Queues the copy of the offered message into its receive.
pub(crate) fn receive(ipc: &mut IpcState, core: &EngineCore, recv: Offered<'_>) -> Received {
    let gpu = match recv.region.kind {
        MemKind::Cuda { device } => Gpu::open(device).ok(),
        MemKind::Host => core.gpu.get().cloned(),
    };
    let Some(gpu) = gpu else {
        log::debug!("no GPU reaches the receive of the peer's message {}: it takes the channels", recv.peer_op);
        return Received::Declined;
    };
    let src = recv.src;
    let mapping = match ipc.sent_mapping(src.region, &gpu, (src.handle, src.alloc_base, src.alloc_len)) {
        Ok(m) => m,
        Err(e) => {
            log::warn!(
                "cannot map the peer's GPU allocation of region {} into GPU {}: {e}; its message takes the channels",
                src.region,
                gpu.ordinal()
            );
            return Received::Declined;
        }
    };
    let queue = match ipc.queue(&gpu) {
        Ok((queue, _)) => queue,
        Err(e) => {
            log::warn!("no copy queue on GPU {}: {e}; the peer's message takes the channels", gpu.ordinal());
            return Received::Declined;
        }
    };
    let here = gpu.ordinal();
    let local = match recv.region.kind {
        MemKind::Cuda { device } if device == here => Some(here),
        _ => None,
    };
    // The decoder checked the range lies inside the allocation, which the mapping covers whole.
    let copy = DeviceCopy {
        dst: recv.addr as u64,
        dst_gpu: local,
        src: mapping.ptr() + (src.addr - src.alloc_base),
        src_gpu: Some(here),
        len: recv.len as usize,
    };
    // Counted before the copy: a deregistration of the receive's region now waits for it.
    recv.region.copy_started();
    let (_, q) = ipc.queue(&gpu).expect("made above");
    // SAFETY: `fit` admitted `len` bytes of the live registration from `addr` (the receive was not
    // cut, under the connection's lock), and the region stays counted until the batch finished;
    // the source lies inside the peer's allocation, mapped here and held by the batch.
    match unsafe { q.issue_known(&[copy], None) } {
        Ok(event) => {
            let batch = Batch {
                event: Arc::new(event),
                queue,
                transfer: recv.transfer.clone(),
                parts: vec![recv.len],
                regions: vec![recv.region.clone()],
                remote_regions: vec![src.region],
                mappings: vec![mapping],
                answer: Some(recv.peer_op),
            };
            ipc.push(batch, &core.waker);
            Received::Issued
        }
        Err(e) => {
            recv.region.copy_ended();
            Received::Failed(e)
        }
    }
}
