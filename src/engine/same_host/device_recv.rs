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

use super::ipc::{Hold, IpcState, NotIssued};
use crate::cuda::Gpu;
use crate::cuda::device_copy::DeviceCopy;
use crate::cuda::ipc::Mapping;
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
    let held = Held { regions: vec![recv.region.clone()], remote_regions: vec![src.region], mappings: vec![mapping] };
    issue(ipc, core, &gpu, copy, &recv, held, None)
}

/// Queues the copy of an offered message of an engine of this process out of `source`, its live
/// registration, which `recv.src` names by address and the caller counted for the copy
/// (`RegionTable::local_counted`): issued by the receive's GPU, else the source's, each end named
/// with its own GPU as `device_copy` names them within the process. The source's count ends with
/// the batch, or here when nothing was queued.
pub(crate) fn receive_in_process(
    ipc: &mut IpcState,
    recv: Offered<'_>,
    source: Arc<Region>,
    core: &EngineCore,
) -> Received {
    let (dst_gpu, src_gpu) = (device_of(recv.region), device_of(&source));
    let gpu = match (src_gpu, dst_gpu.or(src_gpu)) {
        (Some(_), Some(issuer)) => Gpu::open(issuer).map_err(|e| e.to_string()),
        _ => Err(format!("the peer offered memory region {} of host memory as GPU memory", source.id)),
    };
    let gpu = match gpu {
        Ok(gpu) => gpu,
        Err(why) => {
            source.copy_ended();
            log::debug!("cannot copy the peer's message {}: {why}; it takes the channels", recv.peer_op);
            return Received::Declined;
        }
    };
    let copy = DeviceCopy { dst: recv.addr as u64, dst_gpu, src: recv.src.addr, src_gpu, len: recv.len as usize };
    // The source is counted already; the receive's region is counted with the batch.
    let held = Held { regions: vec![recv.region.clone()], remote_regions: Vec::new(), mappings: Vec::new() };
    let received = issue(ipc, core, &gpu, copy, &recv, held, Some(&source));
    if !matches!(received, Received::Issued) {
        source.copy_ended();
    }
    received
}

fn device_of(region: &Region) -> Option<i32> {
    match region.kind {
        MemKind::Cuda { device } => Some(device),
        MemKind::Host => None,
    }
}

/// What a batch holds until its copy is over, besides the receive's part.
struct Held {
    /// Regions of this process, counted with the batch.
    regions: Vec<Arc<Region>>,
    /// The peer process's regions, whose revocation waits.
    remote_regions: Vec<u64>,
    mappings: Vec<Mapping>,
}

/// Queues `copy` on `gpu`'s queue behind one event, as the batch that finishes `recv`'s part and
/// answers the peer; `counted`, a region the caller counted already, goes with the batch too
/// (whose end ends its count), and stays the caller's to end when nothing was queued.
fn issue(
    ipc: &mut IpcState,
    core: &EngineCore,
    gpu: &Arc<Gpu>,
    copy: DeviceCopy,
    recv: &Offered<'_>,
    held: Held,
    counted: Option<&Arc<Region>>,
) -> Received {
    let Held { regions, remote_regions, mappings } = held;
    let hold = Hold {
        transfer: recv.transfer.clone(),
        parts: vec![recv.len],
        regions,
        counted: counted.into_iter().cloned().collect(),
        remote_regions,
        mappings,
        answer: Some(recv.peer_op),
    };
    // SAFETY: `fit` admitted `len` bytes of the receive's live registration from its address (not
    // cut, under the connection's lock); the source lies in the peer's mapped allocation (held by
    // the batch) or in its live registration of this process. The regions stay counted, and the
    // mappings held, until the batch finished.
    match ipc.issue(gpu, hold, &core.waker, |q| unsafe { q.issue_known(&[copy], None) }) {
        Ok(()) => Received::Issued,
        Err(NotIssued::NoQueue(e)) => {
            log::warn!("no copy queue on GPU {}: {e}; the peer's message takes the channels", gpu.ordinal());
            Received::Declined
        }
        Err(NotIssued::Failed(e)) => Received::Failed(e),
    }
}
