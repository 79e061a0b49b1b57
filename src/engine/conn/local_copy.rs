//! One-sided transfers between two engines of this process: the initiator copies with the CPU,
//! after the target's region table decided every item exactly as it decides a network peer's
//! request (registered region, its token, inside an advertised window), and while both ends'
//! connection locks are held. A deregistration removes the region first and then takes every
//! connection's lock, so it either waits for a copy under way or makes the copy refused.

use super::Connection;
use super::state::OneSidedItem;
use crate::engine::local::{self, Locality};
use crate::error::{Error, Result};
use crate::transport::MemKind;

impl Connection {
    /// `None` when the transfer takes the network path instead: the peer is not in this process,
    /// its connection is gone or failed, or memory at either end is not host memory.
    pub(super) fn try_local_one_sided(&self, items: &[OneSidedItem], write: bool) -> Option<Result<u64>> {
        if self.link.locality != Locality::SameProcess || items.iter().any(|i| i.region.kind != MemKind::Host) {
            return None;
        }
        let peer = local::peer_connection(&self.link)?;
        // Both ends take the two locks in one order, the connector's first.
        let (ours, theirs) = if self.link.connector {
            let ours = self.inner.lock();
            (ours, peer.inner.lock())
        } else {
            let theirs = peer.inner.lock();
            (self.inner.lock(), theirs)
        };
        if let Err(e) = ours.state.check_open() {
            return Some(Err(e));
        }
        if theirs.state.failure().is_some() {
            return None;
        }
        let mut decided = Vec::with_capacity(items.len());
        for item in items {
            // The token is what the network path would carry: bound to this connection when it is
            // authenticated, which the peer's end of it checks with the same binding.
            let binding = peer.binding.as_ref();
            match peer.core.regions.authorize(item.remote_region, item.token, item.remote_addr, item.len, binding) {
                Ok(region) if region.kind != MemKind::Host => return None,
                decision => decided.push(decision),
            }
        }
        let transfer = self.core.transfers.create(self.id, items.len());
        for (item, decision) in items.iter().zip(decided) {
            let outcome = decision.and_then(|target| {
                if item.region.is_removed() || target.is_removed() {
                    return Err(Error::not_allowed("the memory region was deregistered during the transfer"));
                }
                let (src, dst) =
                    if write { (item.addr, item.remote_addr as usize) } else { (item.remote_addr as usize, item.addr) };
                // SAFETY: the local range lies in a live registration of this engine (checked at
                // post), the remote one inside a window the peer advertised of a live registration,
                // and neither can be deregistered while both locks are held. One process may name
                // overlapping ranges, hence a move rather than a copy.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, item.len as usize) };
                Ok(item.len)
            });
            transfer.finish_part(outcome);
        }
        drop((ours, theirs));
        Some(Ok(transfer.id))
    }
}
