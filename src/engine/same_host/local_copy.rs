//! One-sided transfers between two engines of this process: the initiator copies with the CPU,
//! after the target's region table decided every request exactly as it decides a network peer's
//! (registered region, its token, inside an advertised window; a vector's every segment or none of
//! them), and while both ends' connection locks are held. A deregistration removes the region first
//! and then takes every connection's lock, so it either waits for a copy under way or makes the copy
//! refused.

use super::seam::{Conn, Locked};
use super::{Locality, peer_connection};
use crate::engine::one_sided::OneSidedRequest;
use crate::engine::plan::Extent;
use crate::error::{Error, Result};
use crate::transport::MemKind;

/// The same-process host path of a connection.
pub(crate) trait LocalCopy: Conn {
    /// `None` when the transfer takes the network path instead: the peer is not in this process,
    /// its connection is gone or failed, or memory at either end is not host memory.
    fn try_local_one_sided(&self, requests: &[OneSidedRequest], write: bool) -> Option<Result<u64>> {
        if self.link().locality != Locality::SameProcess
            || requests.iter().any(|r| r.local_region().kind != MemKind::Host)
        {
            return None;
        }
        let peer = peer_connection::<Self>(self.link())?;
        let (ours, theirs) = self.lock_with_peer(&peer);
        if let Err(e) = ours.check_open() {
            return Some(Err(e));
        }
        if theirs.failure().is_some() {
            return None;
        }
        let mut decided = Vec::with_capacity(requests.len());
        for request in requests {
            // The token is what the network path would carry: bound to this connection when it is
            // authenticated, which the peer's end of it checks with the same binding.
            let binding = peer.binding();
            let regions = &peer.core().regions;
            let decision = match request {
                OneSidedRequest::Item(i) => regions.authorize(i.remote_region, i.token, i.remote_addr, i.len, binding),
                OneSidedRequest::Vector(v) => regions.authorize_segments(v.remote_region, v.token, &v.segs, binding),
            };
            match decision {
                Ok(region) if region.kind != MemKind::Host => return None,
                decision => decided.push(decision),
            }
        }
        let transfer = self.new_transfer(requests.len(), write);
        for (request, decision) in requests.iter().zip(decided) {
            let outcome = decision.and_then(|target| {
                if request.local_region().is_removed() || target.is_removed() {
                    return Err(Error::not_allowed("the memory region was deregistered during the transfer"));
                }
                // Each pair is (local, remote, len).
                let pairs: Vec<(usize, usize, usize)> = match request {
                    OneSidedRequest::Item(i) => vec![(i.addr, i.remote_addr as usize, i.len as usize)],
                    OneSidedRequest::Vector(v) => match &v.local {
                        Extent::Scattered { segs, .. } => {
                            segs.iter().zip(&v.segs).map(|(l, r)| (l.addr, r.addr as usize, r.len as usize)).collect()
                        }
                        Extent::Contiguous { addr, len } => vec![(*addr, v.segs[0].addr as usize, *len as usize)],
                    },
                };
                let mut moved = 0;
                for (local, remote, len) in pairs {
                    let (src, dst) = if write { (local, remote) } else { (remote, local) };
                    // SAFETY: the local range lies in a live registration of this engine (checked
                    // at post), the remote one inside a window the peer advertised of a live
                    // registration, and neither can be deregistered while both locks are held. One
                    // process may name overlapping ranges, hence a move rather than a copy.
                    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
                    moved += len as u64;
                }
                Ok(moved)
            });
            transfer.finish_part(outcome);
        }
        drop((ours, theirs));
        Some(Ok(transfer.id))
    }
}

impl<C: Conn> LocalCopy for C {}
