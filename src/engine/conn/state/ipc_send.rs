//! Two-sided messages of GPU memory between processes of one host, copied by the receiver over
//! CUDA IPC instead of sent over the channels (`path::message_path` decides at the sender).
//!
//! The sender offers the message with an IpcSend in place of its SendAnnounce: the range, and the
//! IPC handle and range of the allocation holding it. The receiver matches it against its posted
//! receives exactly as an announced message (same queue, same order, same `fit` rule, so a receive
//! smaller than the message fails and the message is denied), then maps the allocation and copies
//! the range into the receive on a queue of its own (`same_host/device_recv.rs`), answering Done
//! once the copy's event fired, or Deny when the copy failed. A receiver that cannot copy (no GPU
//! in reach of its receive, the allocation not mappable) answers with the Grant a SendAnnounce
//! gets, and the sender sends the chunks as it would have.
//!
//! Who copies: the receiver, out of the sender's memory, so no new grant of the receiver's memory
//! is needed (its receive is its own to fill), and the one message replaces the announce-grant
//! round trip. The sender's region is revoked on deregistration like one it granted to an
//! IpcRequest (`IpcState::record_grant`): the receiver answers once no copy out of it is in flight.

use std::sync::Arc;

use super::offer::{DeviceRecv, IpcOffer, IpcSource};
use super::{Action, Announced, Body, ConnState, Outbound, PostedRecv, Source};
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::Control;

impl DeviceRecv {
    pub(super) fn new(peer_op: u64, len: u64, src: IpcSource, recv: PostedRecv) -> DeviceRecv {
        DeviceRecv { peer_op, len, src, addr: recv.addr, region: recv.region, transfer: recv.transfer }
    }
}

impl ConnState {
    /// The peer is an engine of this host: it may offer messages for us to copy.
    pub fn accept_ipc_sends(&mut self) {
        self.ipc_sends = true;
    }

    /// Registers our message `id` of `src` (at `addr`) as offered over CUDA IPC and pushes the
    /// action that has the region revoked on deregistration, then the IpcSend. Like an announced
    /// message it waits for the peer's user, and a deregistration of its source meanwhile fails
    /// the connection (`cut`): the receiver may be copying out of it.
    pub(super) fn offer_ipc(
        &mut self,
        id: u64,
        (src, addr): (Source, u64),
        transfer: &Arc<Transfer>,
        offer: IpcOffer,
        out: &mut Vec<Action>,
    ) {
        let len = src.extent.len();
        let pending = Outbound { src, transfer: transfer.clone(), prompt: false, error: None, offered: true };
        self.awaiting_grant.insert(id, pending);
        let IpcOffer { region, handle, alloc_base, alloc_len } = offer;
        out.push(Action::GrantIpc(region));
        out.push(Action::Send(Control::IpcSend { xfer: id, len, region, addr, handle, alloc_base, alloc_len }));
    }

    /// Our offered messages the peer copied over CUDA IPC.
    pub fn sends_copied(&self) -> u64 {
        self.sends_copied
    }

    /// The peer's IpcSend: queued with its announced messages, in order.
    pub(super) fn ipc_send_arrived(&mut self, peer_op: u64, len: u64, src: IpcSource) -> Result<()> {
        if !self.ipc_sends {
            return Err(Error::backend(
                "protocol violation: an IpcSend from a peer that is not an engine of this host",
            ));
        }
        self.announced(Announced { peer_op, len, body: Body::Ipc(src) })
    }

    /// The receiver's Done for our offered message `xfer`, which it copied; `None` when `xfer` is
    /// not one. A length other than the message's is a protocol violation (the part stays, so
    /// failing the connection fails it).
    pub(super) fn ipc_send_done(&mut self, xfer: u64, len: u64, out: &mut Vec<Action>) -> Option<Result<()>> {
        let offered = self.awaiting_grant.get(&xfer).filter(|o| o.offered)?;
        let expected = offered.src.extent.len();
        if len != expected {
            return Some(Err(Error::backend(format!(
                "protocol violation: Done for offered message {xfer} reports {len} bytes, expected {expected}"
            ))));
        }
        let Outbound { transfer, error, .. } = self.awaiting_grant.remove(&xfer)?;
        self.sends_copied += 1;
        transfer.answered();
        out.push(Action::Finish(transfer, error.map_or(Ok(len), Err)));
        Some(Ok(()))
    }

    /// The connection could not copy `recv` (no GPU reaches its receive, or the allocation does
    /// not map here): the message is granted as an announced one, and its chunks come over the
    /// channels.
    pub fn recv_by_network(&mut self, recv: DeviceRecv, out: &mut Vec<Action>) {
        let DeviceRecv { peer_op, len, addr, region, transfer, .. } = recv;
        let posted = PostedRecv { addr, max: len, region, transfer, cut: None };
        let grant = self.grant_recv(peer_op, len, posted);
        out.push(Action::Send(grant));
    }
}
