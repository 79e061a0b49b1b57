//! The connection state's side of the seam to the same-host sub-state (`engine::same_host::state`):
//! it lends the sub-state its network path and its actions, and nothing else of itself.

use std::sync::Arc;

use super::{Action, ConnState, Extent, Inbound, Memory, OnDone, Outbound, Source};
use crate::engine::region::Region;
use crate::engine::same_host::state::{Authorize, CopyJob, Destination, Network, SameHost};
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{Control, RemoteSeg};

/// The state with the actions of the step under way, as the sub-state sees it.
pub(super) struct Net<'a> {
    state: &'a mut ConnState,
    out: &'a mut Vec<Action>,
}

impl Network for Net<'_> {
    fn send(&mut self, msg: Control) {
        self.out.push(Action::Send(msg));
    }

    fn finish(&mut self, transfer: Arc<Transfer>, outcome: Result<u64>) {
        self.out.push(Action::Finish(transfer, outcome));
    }

    fn host_work(&mut self, ours: bool) {
        self.out.push(Action::HostWork { ours });
    }

    fn collapse(&mut self, region: Arc<Region>) {
        self.out.push(Action::Collapse(region));
    }

    fn grant(&mut self, xfer: u64, extent: Extent, region: Arc<Region>) {
        self.state.grant(xfer, extent, region, self.out);
    }

    fn serve(&mut self, xfer: u64, extent: Extent, region: Arc<Region>) -> Result<()> {
        self.state.serve(xfer, Source { extent, region: region.into() }, self.out)
    }

    fn serving(&self, xfer: u64) -> bool {
        self.state.serving.contains_key(&xfer)
    }

    fn take_read(&mut self, xfer: u64) -> Option<Destination> {
        let Inbound { extent, region, on_done, error, .. } = self.state.inbound.remove(&xfer)?;
        // Only a read in one region asks for the same-host copy.
        let region = region.first().clone();
        Some(Destination { extent, region, transfer: on_done.transfer().cloned(), error })
    }

    fn take_write(&mut self, xfer: u64) -> Option<(Arc<Transfer>, u64, Option<Error>)> {
        let Outbound { src, transfer, error, .. } = self.state.awaiting_grant.remove(&xfer)?;
        Some((transfer, src.extent.len(), error))
    }

    fn read_again(
        &mut self,
        extent: Extent,
        region: Arc<Region>,
        transfer: Arc<Transfer>,
        request: impl FnOnce(u64) -> Control,
    ) {
        let id = self.state.take_id();
        let read = Inbound { awaits_answer: true, ..Inbound::new(extent, region, OnDone::Part(transfer)) };
        self.state.inbound.insert(id, read);
        self.out.push(Action::Send(request(id)));
    }

    fn failed(&self) -> bool {
        self.state.failure.is_some()
    }
}

/// The engine's memory as the sub-state sees it.
struct Auth<'a, M>(pub &'a M);

impl<M: Memory> Authorize for Auth<'_, M> {
    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>> {
        self.0.authorize_segments(region, token, segs)
    }
}

impl ConnState {
    /// The same-host sub-state, for what it keeps to itself (its settings, the host worker's queue,
    /// how far it got).
    pub fn same_host(&self) -> &SameHost {
        &self.same_host
    }

    pub fn same_host_mut(&mut self) -> &mut SameHost {
        &mut self.same_host
    }

    /// Runs a step of the same-host sub-state that may answer, fall back to the network path or
    /// finish parts: `f` gets the sub-state and this state as its [`Network`], whose actions go to
    /// `out` in order.
    pub(super) fn with_same_host<R>(
        &mut self,
        out: &mut Vec<Action>,
        f: impl FnOnce(&mut SameHost, &mut Net<'_>) -> R,
    ) -> R {
        // Lent out for the step: the network side never reaches back into the sub-state.
        let mut same_host = std::mem::take(&mut self.same_host);
        let r = f(&mut same_host, &mut Net { state: self, out });
        self.same_host = same_host;
        r
    }

    /// The host worker checked the peer's ProcessHello: `reads_peer` says whether we can read it.
    pub fn proved(&mut self, reads_peer: bool, out: &mut Vec<Action>) {
        self.with_same_host(out, |sh, net| sh.proved(reads_peer, net));
    }

    /// The host worker finished `job` (`copied` is what the copy itself said).
    pub fn copy_finished(&mut self, job: CopyJob, copied: Result<()>, out: &mut Vec<Action>) {
        self.with_same_host(out, |sh, net| sh.copy_finished(job, copied, net));
    }

    /// The kernel refused `job`'s copy out of the peer after the proof.
    pub fn copy_refused(&mut self, job: CopyJob, err: Error, out: &mut Vec<Action>) {
        self.with_same_host(out, |sh, net| sh.copy_refused(job, err, net));
    }

    /// Hands the peer's same-host message to the sub-state.
    pub(super) fn same_host_message(&mut self, msg: Control, mem: &impl Memory, out: &mut Vec<Action>) -> Result<()> {
        self.with_same_host(out, |sh, net| sh.handle(msg, &Auth(mem), net))
    }

    /// The same-host request for one item or vector of ours, or `None` (the network request then);
    /// regions to collapse go to `flows` as they come.
    pub(super) fn same_host_request(
        &mut self,
        op: (u64, bool),
        local: (&Extent, &Arc<Region>),
        remote: (u64, u64),
        segs: &[RemoteSeg],
        flows: &mut Vec<Action>,
    ) -> Option<Control> {
        let mut collapse = Vec::new();
        let msg = self.same_host.request(op, local, remote, segs, &mut collapse);
        flows.extend(collapse.into_iter().map(Action::Collapse));
        msg
    }

    /// The peer answered op `xfer` the network way (Grant, Data) or refused it: should it have
    /// asked for the same-host path, it no longer waits for that, and a read's answer came.
    pub(super) fn network_answered(&mut self, xfer: u64) {
        if self.same_host.answered_by_network(xfer)
            && let Some(read) = self.inbound.get_mut(&xfer)
        {
            read.answer_once();
        }
    }
}
