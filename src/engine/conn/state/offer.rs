//! What an offer of a two-sided message over CUDA IPC carries (`ipc_send.rs`), at either end.

use std::sync::Arc;

use crate::engine::region::Region;
use crate::engine::transfer::Transfer;
use crate::proto::IPC_HANDLE_LEN;

/// Our message's region as offered to the peer: its CUDA IPC handle (`Region::ipc_export`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct IpcOffer {
    pub region: u64,
    pub handle: [u8; IPC_HANDLE_LEN],
    pub alloc_base: u64,
    pub alloc_len: u64,
}

/// The peer's offered message: `addr` of its `region`, inside the allocation the handle names
/// (checked when the IpcSend was decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IpcSource {
    pub region: u64,
    pub addr: u64,
    pub handle: [u8; IPC_HANDLE_LEN],
    pub alloc_base: u64,
    pub alloc_len: u64,
}

/// A matched receive of the peer's offered message, for the connection to copy.
#[derive(Debug)]
pub(crate) struct DeviceRecv {
    /// The peer's op, answered with Done or Deny.
    pub peer_op: u64,
    pub len: u64,
    pub src: IpcSource,
    /// Where the message lands: `fit` admitted `len` bytes of `region` from here.
    pub addr: usize,
    pub region: Arc<Region>,
    pub transfer: Arc<Transfer>,
}
