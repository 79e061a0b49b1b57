//! The state machine's part of the same-host path: one-sided host transfers between processes of
//! one host copied with `process_vm_readv` instead of sent over the channels.
//!
//! Who copies: the end whose memory is written. A write is copied in by its target, out of the
//! initiator's process; a read by its initiator, out of the target's. So an engine only ever writes
//! its own memory, from its own threads, and a deregistration here stays a fence by local means: it
//! waits for the copy under way (at most one piece of `same_host::PIECE_BYTES` per copying thread) and
//! no further piece starts (`conn/host_job.rs`). Another process only ever reads our memory, which
//! cannot corrupt it.
//!
//! Whose pages count: a transfer's source is the memory of the end that is read, and only that end
//! looks at its pages (`Region::on_huge_pages`, read from its own smaps). It decides whether the
//! network band keeps the transfer to the channels (a write's initiator before asking, a read's
//! target when answering), and tells the copying end in its DirectWrite or DirectGrant, which
//! uses the word only to size its copy pieces.
//!
//! Who decides: the target, exactly as on the network path. A DirectWrite or DirectRead is
//! authorized by the region table like a WriteVector or ReadVector (token, advertised window, every
//! segment or none), and refused with Deny. The target may also answer with the network path's own
//! reply (Grant for a write, Data for a read): for device memory, which `process_vm_readv` cannot
//! reach, or when it cannot read the initiator; the initiator then sends the chunks as for a
//! WriteRequest or takes them as for a ReadRequest.
//!
//! - write: A `DirectWrite{op, region, token, segs, src}` → B authorizes, copies from A, `Done`
//!   (or `Deny`; or `Grant` and the network path).
//! - read: A `DirectRead{op, region, token, segs}` → B authorizes, `DirectGrant` (or `Deny`; or
//!   `Data` and the network path) → A copies from B, `DirectDone` → B `Done`, or `Deny` when the
//!   region was deregistered meanwhile: the bytes A copied may then be anything.
//!
//! A copy the kernel refuses after the proof takes the network path the request stands for
//! (`copy_refused`): the peer's write is granted, our read asks again over the channels.
//!
//! Before any of it each end proves the other's process (ProcessHello, answered by ProcessAck
//! saying whether the proof held and the kernel lets it read the peer): an end asks for direct
//! writes only once the peer said it can read us, for direct reads only once it can read the peer.

use std::sync::Arc;

use super::direct_table::{AskedRead, Copied, CopyJob, HostPath, HostTask, Lease, MAX_DIRECT_PENDING, OurRead};
use super::{Action, ConnState, Extent, Inbound, Memory, OnDone, Source, deny, deny_msg, unknown_op, violation};
use crate::engine::region::Region;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{Control, RemoteSeg};
use crate::trace::clock_ns;
use crate::transport::{IoSeg, MemKind};

pub(super) fn segs_of(extent: &Extent) -> Vec<IoSeg> {
    match extent {
        Extent::Contiguous { addr, len } => vec![IoSeg { addr: *addr, len: *len as usize }],
        Extent::Scattered { segs, .. } => segs.to_vec(),
    }
}

pub(super) fn remote_segs(segs: &[RemoteSeg]) -> Vec<IoSeg> {
    segs.iter().map(|s| IoSeg { addr: s.addr as usize, len: s.len as usize }).collect()
}

/// The target's view of a request's segments as a flow's extent: a single segment is contiguous,
/// as the initiator's single item is, so both ends cut the network fallback alike.
pub(super) fn extent_of(segs: &[RemoteSeg]) -> Extent {
    match segs {
        [one] => Extent::Contiguous { addr: one.addr as usize, len: u64::from(one.len) },
        _ => super::local_segments(segs),
    }
}

/// As [`extent_of`], for segments in this end's terms (a copy job's destination).
fn extent_of_local(segs: &[IoSeg]) -> Extent {
    match segs {
        [one] => Extent::Contiguous { addr: one.addr, len: one.len as u64 },
        _ => Extent::scattered(segs.iter().copied()),
    }
}

impl ConnState {
    /// The peer shares this host (another process): its ProcessHello will be checked. One-sided
    /// transfers longer than the band's first bound and shorter than its second keep to the
    /// network, but with `huge_pages` those whose source lies on huge pages.
    pub fn set_same_host(&mut self, network_band: Option<(u64, u64)>, huge_pages: bool) {
        self.direct.same_host = true;
        self.direct.network_band = network_band;
        self.direct.huge_pages = huge_pages;
    }

    /// Our regions that the peer is to copy out of get collapsed into huge pages
    /// (`Config::host_copy_collapse`).
    pub fn set_collapse_sources(&mut self) {
        self.direct.collapse = true;
    }

    /// Whether the network band keeps a transfer of `len` bytes out of our memory to the channels:
    /// inside the band, unless its source lies on huge pages and `Config::host_copy_huge_pages`
    /// lets that count. On huge pages the copy no longer loses to the channels there: the kernel
    /// pins the source in a few steps, so its copying threads do not contend.
    fn kept_to_channels(&self, len: u64, huge_source: bool) -> bool {
        let huge = self.direct.huge_pages && huge_source;
        !huge && self.direct.network_band.is_some_and(|(lo, hi)| lo < len && len < hi)
    }

    /// Asks for `region` to be collapsed into huge pages: the peer is to copy out of it.
    fn collapse_source(&self, region: &Arc<Region>, out: &mut Vec<Action>) {
        if self.direct.collapse && region.kind == MemKind::Host && region.collapse_due() {
            out.push(Action::Collapse(region.clone()));
        }
    }

    /// Copy jobs carry the time they were queued (`UCCL_TCPX_TRACE_HOST_COPY`); untraced they
    /// skip the clock read.
    pub fn set_timed_copies(&mut self) {
        self.direct.timed = true;
    }

    /// Now in CLOCK_MONOTONIC ns when copies are timed, else 0 (a mark the trace counts as unseen).
    pub(super) fn queued_at(&self) -> u64 {
        if self.direct.timed { clock_ns() } else { 0 }
    }

    pub fn host_path(&self) -> HostPath {
        HostPath { checked: self.direct.proved && self.direct.ack_seen, ..self.direct.path }
    }

    /// Whether work for the host worker is queued.
    pub fn has_host_task(&self) -> bool {
        !self.direct.work.is_empty()
    }

    /// Next work for the host worker.
    pub fn next_host_task(&mut self) -> Option<HostTask> {
        let task = self.direct.work.pop_front();
        if let Some(HostTask::Copy(job)) = &task {
            self.direct.running = job.transfer().cloned();
        }
        task
    }

    /// The first queued copy of a read of `transfer`, taken out of turn by the caller waiting for
    /// it; the rest of the queue keeps its order.
    pub fn next_host_copy_of(&mut self, transfer: u64) -> Option<HostTask> {
        let at = self.direct.work.iter().position(|task| {
            matches!(task, HostTask::Copy(job)
                if job.transfer().is_some_and(|t| t.id == transfer))
        })?;
        let task = self.direct.work.remove(at);
        if let Some(HostTask::Copy(job)) = &task {
            self.direct.running = job.transfer().cloned();
            self.direct.path.caller_copies += 1;
        }
        task
    }

    /// The peer's ProcessHello was checked: tell it whether we can read it.
    pub fn proved(&mut self, reads_peer: bool, out: &mut Vec<Action>) {
        self.direct.proved = true;
        self.direct.path.reads_peer = reads_peer;
        self.announce_reads_peer(reads_peer, out);
    }

    fn announce_reads_peer(&mut self, readable: bool, out: &mut Vec<Action>) {
        self.direct.announced_reads_peer = Some(readable);
        out.push(Action::Send(Control::ProcessAck { readable }));
    }

    /// The kernel refused a copy after the proof: no more direct copies out of the peer, and the
    /// copies queued out of it take the channels now rather than each being refused in turn.
    fn lost_peer_access(&mut self, out: &mut Vec<Action>) {
        self.direct.path.reads_peer = false;
        let mut kept = std::collections::VecDeque::with_capacity(self.direct.work.len());
        for task in std::mem::take(&mut self.direct.work) {
            match task {
                HostTask::Copy(job) if !is_cut(&job) => self.take_channels(job, out),
                task => kept.push_back(task),
            }
        }
        self.direct.work = kept;
    }

    /// The request message for a one-sided item or vector that may take the direct path, or `None`
    /// (the network request then). `local` is this end's memory and its region, `segs` the peer's.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn direct_request(
        &mut self,
        id: u64,
        write: bool,
        (local, region): (&Extent, &Arc<Region>),
        remote_region: u64,
        token: u64,
        segs: &[RemoteSeg],
        extra: &mut Vec<Action>,
    ) -> Option<Control> {
        if !self.direct.usable(write) {
            return None;
        }
        // A write's source is ours, and the band is ours to apply; a read's source is the
        // target's, which applies the band when it answers (`on_direct_read`).
        let huge_source = write && region.on_huge_pages();
        if write && self.kept_to_channels(local.len(), huge_source) {
            // Once the source lies on huge pages, later transfers out of it skip the band.
            if self.direct.huge_pages {
                self.collapse_source(region, extra);
            }
            return None;
        }
        // Copied only once the copy is possible: between hosts a vector's list stays where it is.
        let segs = segs.to_vec();
        if write {
            let src: Vec<u64> = segs_of(local).iter().map(|s| s.addr as u64).collect();
            // Local and remote segments pair up one to one (each item is one of each).
            if src.len() != segs.len() {
                return None;
            }
            self.direct.writes.insert(id);
            // A source on huge pages already has nothing to gain.
            if !huge_source {
                self.collapse_source(region, extra);
            }
            Some(Control::DirectWrite { xfer: id, region: remote_region, token, segs, src, huge: huge_source })
        } else {
            let asked = AskedRead { region: remote_region, token, segs: segs.clone() };
            self.direct.reads.insert(id, asked);
            Some(Control::DirectRead { xfer: id, region: remote_region, token, segs })
        }
    }

    pub(super) fn on_process_hello(&mut self, pid: u32, fd: u32, out: &mut Vec<Action>) -> Result<()> {
        if std::mem::replace(&mut self.direct.hello_seen, true) {
            return Err(violation("a second ProcessHello"));
        }
        if self.direct.same_host {
            self.direct.work.push_back(HostTask::Prove { pid, fd });
            out.push(Action::HostWork { ours: false });
        } else {
            self.announce_reads_peer(false, out);
        }
        Ok(())
    }

    pub(super) fn on_process_ack(&mut self, readable: bool) -> Result<()> {
        if std::mem::replace(&mut self.direct.ack_seen, true) {
            return Err(violation("a second ProcessAck"));
        }
        self.direct.path.peer_reads_us = readable && self.direct.same_host;
        Ok(())
    }

    /// The peer's DirectWrite: authorized like a WriteVector, then copied in here when we can read
    /// the peer and the memory is ours to copy with the CPU, else granted as a network write.
    /// `remote_huge`, the peer's word that its source lies on huge pages, only sizes the pieces.
    pub(super) fn on_direct_write(
        &mut self,
        xfer: u64,
        (region, token): (u64, u64),
        segs: Vec<RemoteSeg>,
        (src, remote_huge): (Vec<u64>, bool),
        mem: &impl Memory,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        let Some(region) = authorized(xfer, (region, token), &segs, mem, out) else {
            return Ok(());
        };
        if region.kind != MemKind::Host || !self.direct.path.reads_peer {
            self.grant(xfer, extent_of(&segs), region, out);
            return Ok(());
        }
        let remote = segs.iter().zip(&src).map(|(s, &a)| IoSeg { addr: a as usize, len: s.len as usize }).collect();
        self.queue_peer_write(xfer, region, &segs, (remote, remote_huge), out)
    }

    /// Queues for the worker the copy of the peer's authorized write `xfer` into `segs` of
    /// `region` out of the peer's memory (`remote`).
    pub(super) fn queue_peer_write(
        &mut self,
        xfer: u64,
        region: Arc<Region>,
        segs: &[RemoteSeg],
        (remote, remote_huge): (Vec<IoSeg>, bool),
        out: &mut Vec<Action>,
    ) -> Result<()> {
        self.check_pending()?;
        let len = segs.iter().map(|s| u64::from(s.len)).sum();
        let queued = self.queued_at();
        let local = remote_segs(segs);
        let job = CopyJob { op: xfer, read: None, region, local, remote, remote_huge, len, error: None, queued };
        self.direct.work.push_back(HostTask::Copy(job));
        out.push(Action::HostWork { ours: false });
        Ok(())
    }

    /// The peer's DirectRead: authorized like a ReadVector, then granted for the peer to copy out
    /// of host memory, else served over the network: device memory, a reader that cannot copy out
    /// of us, or a transfer our network band keeps to the channels (whose source is then asked to
    /// be collapsed, so that later reads out of it are granted).
    pub(super) fn on_direct_read(
        &mut self,
        xfer: u64,
        (region, token): (u64, u64),
        segs: Vec<RemoteSeg>,
        mem: &impl Memory,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        let Some(region) = authorized(xfer, (region, token), &segs, mem, out) else {
            return Ok(());
        };
        if region.kind != MemKind::Host {
            return self.serve(xfer, Source { extent: extent_of(&segs), region }, out);
        }
        self.check_pending()?;
        if self.direct.leases.contains_key(&xfer) || self.serving.contains_key(&xfer) {
            return Err(violation(&format!("a read request reuses op id {xfer} of a read still being served")));
        }
        if !self.direct.path.peer_reads_us {
            // The reader cannot copy out of us: the channels carry it, as for a ReadVector.
            return self.serve(xfer, Source { extent: extent_of(&segs), region }, out);
        }
        let len = segs.iter().map(|s| u64::from(s.len)).sum();
        let huge = region.on_huge_pages();
        if self.kept_to_channels(len, huge) {
            if self.direct.huge_pages {
                self.collapse_source(&region, out);
            }
            return self.serve(xfer, Source { extent: extent_of(&segs), region }, out);
        }
        out.push(Action::Send(Control::DirectGrant { xfer, huge }));
        if !huge {
            self.collapse_source(&region, out);
        }
        self.direct.leases.insert(xfer, Lease { region, len });
        Ok(())
    }

    /// A peer queueing more work than `MAX_DIRECT_PENDING` here is treated as hostile.
    pub(super) fn check_pending(&self) -> Result<()> {
        if self.direct.pending() >= MAX_DIRECT_PENDING {
            return Err(violation(&format!("more than {MAX_DIRECT_PENDING} direct requests pending")));
        }
        Ok(())
    }

    /// The target granted our direct read: copy it, or ask for it over the channels at once when
    /// the kernel refused us a copy out of the peer since (`lost_peer_access`). `remote_huge`, the
    /// target's word that its region lies on huge pages, only sizes the pieces.
    pub(super) fn on_direct_grant(&mut self, xfer: u64, remote_huge: bool, out: &mut Vec<Action>) -> Result<()> {
        if self.direct.announced_reads_peer != Some(true) {
            return Err(violation(&format!(
                "a DirectGrant for read {xfer}, though we never said we can copy out of the peer"
            )));
        }
        let asked = self.direct.reads.remove(&xfer).ok_or_else(|| unknown_op("DirectGrant", xfer))?;
        let dst = self.inbound.remove(&xfer).ok_or_else(|| unknown_op("DirectGrant", xfer))?;
        let queued = self.queued_at();
        let job = CopyJob {
            op: xfer,
            read: asked.read_for(dst.on_done.transfer()),
            local: segs_of(&dst.extent),
            remote: remote_segs(&asked.segs),
            remote_huge,
            len: dst.extent.len(),
            region: dst.region,
            error: dst.error,
            queued,
        };
        // A read cut off meanwhile is not asked for again into its deregistered destination: the
        // worker reports the cut without copying (`host_copy::copy`, the gate).
        if !self.direct.path.reads_peer && !is_cut(&job) {
            self.take_channels(job, out);
            return Ok(());
        }
        self.direct.work.push_back(HostTask::Copy(job));
        out.push(Action::HostWork { ours: true });
        Ok(())
    }

    /// The peer finished copying our region for its read `xfer`: vouch for the bytes unless the
    /// region was deregistered meanwhile.
    pub(super) fn on_direct_done(&mut self, xfer: u64, out: &mut Vec<Action>) -> Result<()> {
        let lease = self.direct.leases.remove(&xfer).ok_or_else(|| unknown_op("DirectDone", xfer))?;
        out.push(Action::Send(if lease.region.is_removed() {
            deny_msg(xfer, &Error::not_allowed("the memory region was deregistered during the transfer"))
        } else {
            Control::Done { xfer, len: lease.len }
        }));
        Ok(())
    }

    /// A Done that answers a direct op of ours (a copied write, or a read we copied); `None` when
    /// the op is not one.
    pub(super) fn direct_done(&mut self, xfer: u64, len: u64, out: &mut Vec<Action>) -> Option<Result<()>> {
        if let Some(leased) = self.direct.retried.remove(&xfer) {
            // Let go, but held to what the lease covered, as any Done is.
            return Some(match len == leased {
                true => Ok(()),
                false => Err(violation(&format!("Done for op {xfer} reports {len} bytes, its lease covered {leased}"))),
            });
        }
        let (transfer, expected, error) = if self.direct.writes.remove(&xfer) {
            let o = self.awaiting_grant.remove(&xfer)?;
            (o.transfer, o.src.extent.len(), o.error)
        } else {
            let c = self.direct.copied.remove(&xfer)?;
            (c.transfer, c.len, c.error)
        };
        if len != expected {
            out.push(Action::Finish(transfer, Err(violation("a direct transfer's Done reports another length"))));
            return Some(Err(violation(&format!("Done for op {xfer} reports {len} bytes, expected {expected}"))));
        }
        if error.is_none() {
            self.direct.path.direct_ops += 1;
        }
        transfer.answered();
        out.push(Action::Finish(transfer, error.map_or(Ok(len), Err)));
        Some(Ok(()))
    }

    /// Forgets that op `xfer` asked for the direct path: the target answered the network way
    /// (Grant, Data) or refused it. A read served with Data now completes through the channels, so
    /// its answer came (a caller waiting on it stops reading the control stream for it); a granted
    /// write still ends with the target's Done, after its chunks.
    pub(super) fn direct_answered(&mut self, xfer: u64) {
        self.direct.writes.remove(&xfer);
        if self.direct.reads.remove(&xfer).is_some()
            && let Some(read) = self.inbound.get_mut(&xfer)
        {
            read.answer_once();
        }
    }

    /// A Deny for a read we copied; `None` when `xfer` is not one.
    pub(super) fn direct_denied(&mut self, xfer: u64, err: Error, out: &mut Vec<Action>) -> Option<()> {
        if self.direct.retried.remove(&xfer).is_some() {
            return Some(());
        }
        let c = self.direct.copied.remove(&xfer)?;
        c.transfer.answered();
        out.push(Action::Finish(c.transfer, Err(err)));
        Some(())
    }

    /// The host worker finished `job` (`copied` is what the copy itself said).
    pub fn copy_finished(&mut self, job: CopyJob, copied: Result<()>, out: &mut Vec<Action>) {
        self.direct.running = None;
        if self.failure.is_some() {
            return;
        }
        let gone = || Error::not_allowed("the memory region was deregistered during the transfer");
        // A cut region explains whatever the copy said: the deregistration is the error.
        let error = job.error.or_else(|| job.region.is_removed().then(gone)).or_else(|| copied.err());
        match job.read {
            None => out.push(Action::Send(match &error {
                None => Control::Done { xfer: job.op, len: job.len },
                Some(e) => deny_msg(job.op, e),
            })),
            Some(read) => {
                let c = Copied { transfer: read.transfer, len: job.len, region: job.region.id, error };
                self.direct.copied.insert(job.op, c);
                out.push(Action::Send(Control::DirectDone { xfer: job.op }));
            }
        }
    }

    /// The kernel refused `job`'s copy out of the peer after the proof (EPERM, ESRCH): no more
    /// copies out of it (`lost_peer_access`), and the job takes the network path it stands for
    /// (`take_channels`). A job cut off meanwhile fails as a cut copy does, with the
    /// deregistration's error.
    pub fn copy_refused(&mut self, job: CopyJob, err: Error, out: &mut Vec<Action>) {
        self.direct.running = None;
        if self.failure.is_some() {
            return;
        }
        self.lost_peer_access(out);
        if is_cut(&job) {
            return self.copy_finished(job, Err(err), out);
        }
        self.take_channels(job, out);
    }

    /// Moves `job`, a copy out of the peer that the kernel no longer allows, to the network path
    /// it stands for, through steps the peer follows already. The peer's write is granted as a
    /// network write (a Grant may answer a DirectWrite until its Done). Our read ends the target's
    /// lease with its DirectDone, whose answer is let go, and is asked for again as the
    /// ReadRequest or ReadVector it stands for under a fresh op id, so that the lease's answer and
    /// the read's never share one; its Data, or Deny, is its answer.
    fn take_channels(&mut self, job: CopyJob, out: &mut Vec<Action>) {
        let extent = extent_of_local(&job.local);
        let Some(OurRead { transfer, ask: (region, token) }) = job.read else {
            return self.grant(job.op, extent, job.region, out);
        };
        let leased = job.remote.iter().map(|s| s.len as u64).sum();
        self.direct.retried.insert(job.op, leased);
        out.push(Action::Send(Control::DirectDone { xfer: job.op }));
        let id = self.take_id();
        // Lengths of the peer's segments as it named them: each fits its u32.
        let segs: Vec<RemoteSeg> =
            job.remote.iter().map(|s| RemoteSeg { addr: s.addr as u64, len: s.len as u32 }).collect();
        let request = match segs[..] {
            [one] => Control::ReadRequest { xfer: id, region, token, addr: one.addr, len: u64::from(one.len) },
            _ => Control::ReadVector { xfer: id, region, token, segs },
        };
        let read = Inbound { awaits_answer: true, ..Inbound::new(extent, job.region, OnDone::Part(transfer)) };
        self.inbound.insert(id, read);
        out.push(Action::Send(request));
    }

    /// Cuts `region` off the direct path: queued copies into it will not run, and a read of ours
    /// that already landed there fails when the target answers.
    pub(super) fn cut_direct(&mut self, region: u64, err: &Error) {
        for task in &mut self.direct.work {
            if let HostTask::Copy(job) = task
                && job.region.id == region
            {
                job.error.get_or_insert_with(|| err.clone());
            }
        }
        for c in self.direct.copied.values_mut().filter(|c| c.region == region) {
            c.error.get_or_insert_with(|| err.clone());
        }
    }

    /// Whether the peer's engine owes us an answer on the direct path.
    pub(super) fn direct_waits_on_peer(&self) -> bool {
        !self.direct.copied.is_empty() || !self.direct.leases.is_empty() || !self.direct.retried.is_empty()
    }

    /// Every pending part of the direct path, for `fail`.
    pub(super) fn fail_direct(&mut self) -> Vec<Arc<Transfer>> {
        let d = &mut self.direct;
        let mut failed: Vec<Arc<Transfer>> = d.copied.drain().map(|(_, c)| c.transfer).collect();
        failed.extend(d.running.take());
        failed.extend(d.work.drain(..).filter_map(|t| match t {
            HostTask::Copy(job) => job.read.map(|read| read.transfer),
            HostTask::Prove { .. } => None,
        }));
        d.writes.clear();
        d.reads.clear();
        d.retried.clear();
        d.leases.clear();
        d.path.reads_peer = false;
        d.path.peer_reads_us = false;
        failed
    }
}

/// Whether `job`'s region was cut off (deregistered) before it ran: it fails then, on any path.
fn is_cut(job: &CopyJob) -> bool {
    job.error.is_some() || job.region.is_removed()
}

/// The region a peer's direct request names, authorized as the vector request it stands for; a
/// refusal is answered with a Deny and gives `None`.
pub(super) fn authorized(
    xfer: u64,
    (region, token): (u64, u64),
    segs: &[RemoteSeg],
    mem: &impl Memory,
    out: &mut Vec<Action>,
) -> Option<Arc<Region>> {
    mem.authorize_segments(region, token, segs).map_err(|e| deny(xfer, e, out)).ok()
}
