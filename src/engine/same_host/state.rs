//! The same-host sub-state machine: one-sided host transfers between processes of one host copied
//! with `process_vm_readv` instead of sent over the channels. The connection state
//! (`conn/state.rs`) owns it, hands it the same-host messages (ProcessHello, ProcessAck,
//! DirectWrite, DirectRead, DirectGrant, DirectDone) and the host worker's results, and lends it
//! the one seam to the network path, [`Network`]: where its answers go, and the network requests
//! it falls back to. Like the connection state it never touches a socket, a thread or a channel.
//!
//! Who copies: the end whose memory is written. A write is copied in by its target, out of the
//! initiator's process; a read by its initiator, out of the target's. So an engine only ever writes
//! its own memory, from its own threads, and a deregistration here stays a fence by local means: it
//! waits for the copy under way (at most one piece of `same_host::PIECE_BYTES` per copying thread) and
//! no further piece starts (`host_job.rs`). Another process only ever reads our memory, which
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

mod table;

pub use table::HostPath;
use table::{AskedRead, Copied, Lease, MAX_DIRECT_PENDING, OurRead};
pub(crate) use table::{CopyJob, HostTask, SameHost};

use crate::engine::plan::Extent;
use crate::engine::region::Region;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{Control, RemoteSeg};
use crate::trace::clock_ns;
use crate::transport::{IoSeg, MemKind};

/// The connection state as the same-host sub-state sees it: where its answers go, in order with
/// the connection's own, and the network path a same-host request falls back to (the target
/// answering the network way, or the kernel refusing a copy).
pub(crate) trait Network {
    /// Puts a control message on the wire.
    fn send(&mut self, msg: Control);
    /// Finishes one part of a caller's transfer.
    fn finish(&mut self, transfer: Arc<Transfer>, outcome: Result<u64>);
    /// Wakes the connection's host worker: a proof or copy is queued. `ours`: the copy of a read of
    /// ours, which a caller waiting on the connection may run on its own thread instead.
    fn host_work(&mut self, ours: bool);
    /// Collapses this region of ours into huge pages in the background, once: the peer is to copy
    /// out of it.
    fn collapse(&mut self, region: Arc<Region>);
    /// Grants the peer's authorized write `xfer` into `extent` as a network write: the peer sends
    /// its chunks after the Grant.
    fn grant(&mut self, xfer: u64, extent: Extent, region: Arc<Region>);
    /// Serves the peer's authorized read `xfer` of `extent` over the channels. An error means the
    /// connection must fail.
    fn serve(&mut self, xfer: u64, extent: Extent, region: Arc<Region>) -> Result<()>;
    /// Whether the channels serve the peer's read `xfer` now.
    fn serving(&self, xfer: u64) -> bool;
    /// Takes the destination of our read `xfer`, registered when it was posted.
    fn take_read(&mut self, xfer: u64) -> Option<Destination>;
    /// Takes our write `xfer` that asked for the copy and waits for the target's answer: its part,
    /// its length, and its cut, if any.
    fn take_write(&mut self, xfer: u64) -> Option<(Arc<Transfer>, u64, Option<Error>)>;
    /// Asks for our read into `extent` again over the channels under a fresh op id; `request` is
    /// the ReadRequest or ReadVector for that id. The target's Data or Deny answers it.
    fn read_again(
        &mut self,
        extent: Extent,
        region: Arc<Region>,
        transfer: Arc<Transfer>,
        request: impl FnOnce(u64) -> Control,
    );
    /// Whether the connection failed.
    fn failed(&self) -> bool;
}

/// The region table as the sub-state sees it: the peer's direct requests are authorized as the
/// vector requests they stand for.
pub(crate) trait Authorize {
    /// Decides a peer's request for `segs` of region `region` presenting `token`: every segment, or
    /// none.
    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>>;
}

/// Where our read lands, as registered when it was posted.
pub(crate) struct Destination {
    pub extent: Extent,
    pub region: Arc<Region>,
    /// The caller's part it fills.
    pub transfer: Option<Arc<Transfer>>,
    /// Its region was cut off (deregistered) since.
    pub error: Option<Error>,
}

fn segs_of(extent: &Extent) -> Vec<IoSeg> {
    match extent {
        Extent::Contiguous { addr, len } => vec![IoSeg { addr: *addr, len: *len as usize }],
        Extent::Scattered { segs, .. } => segs.to_vec(),
    }
}

fn remote_segs(segs: &[RemoteSeg]) -> Vec<IoSeg> {
    segs.iter().map(|s| IoSeg { addr: s.addr as usize, len: s.len as usize }).collect()
}

/// The target's view of a request's segments as a flow's extent: a single segment is contiguous,
/// as the initiator's single item is, so both ends cut the network fallback alike.
fn extent_of(segs: &[RemoteSeg]) -> Extent {
    match segs {
        [one] => Extent::Contiguous { addr: one.addr as usize, len: u64::from(one.len) },
        _ => Extent::scattered(segs.iter().map(|s| IoSeg { addr: s.addr as usize, len: s.len as usize })),
    }
}

/// As [`extent_of`], for segments in this end's terms (a copy job's destination).
fn extent_of_local(segs: &[IoSeg]) -> Extent {
    match segs {
        [one] => Extent::Contiguous { addr: one.addr, len: one.len as u64 },
        _ => Extent::scattered(segs.iter().copied()),
    }
}

impl SameHost {
    /// The peer shares this host (another process): its ProcessHello will be checked. One-sided
    /// transfers longer than the band's first bound and shorter than its second keep to the
    /// network, but with `huge_pages` those whose source lies on huge pages.
    pub fn set_same_host(&mut self, network_band: Option<(u64, u64)>, huge_pages: bool) {
        self.same_host = true;
        self.network_band = network_band;
        self.huge_pages = huge_pages;
    }

    /// Our regions that the peer is to copy out of get collapsed into huge pages
    /// (`Config::host_copy_collapse`).
    pub fn set_collapse_sources(&mut self) {
        self.collapse = true;
    }

    /// Whether the network band keeps a transfer of `len` bytes out of our memory to the channels:
    /// inside the band, unless its source lies on huge pages and `Config::host_copy_huge_pages`
    /// lets that count. On huge pages the copy no longer loses to the channels there: the kernel
    /// pins the source in a few steps, so its copying threads do not contend.
    fn kept_to_channels(&self, len: u64, huge_source: bool) -> bool {
        let huge = self.huge_pages && huge_source;
        !huge && self.network_band.is_some_and(|(lo, hi)| lo < len && len < hi)
    }

    /// `region`, to be collapsed into huge pages when that is on and due: the peer is to copy out
    /// of it.
    fn collapse_due(&self, region: &Arc<Region>) -> Option<Arc<Region>> {
        (self.collapse && region.kind == MemKind::Host && region.collapse_due()).then(|| region.clone())
    }

    /// Asks for `region` to be collapsed into huge pages (see `collapse_due`).
    fn collapse_source(&self, region: &Arc<Region>, net: &mut impl Network) {
        if let Some(region) = self.collapse_due(region) {
            net.collapse(region);
        }
    }

    /// Copy jobs carry the time they were queued (for the `host` trace); untraced they skip the
    /// clock read.
    pub fn set_timed_copies(&mut self) {
        self.timed = true;
    }

    /// Now in CLOCK_MONOTONIC ns when copies are timed, else 0 (a mark the trace counts as unseen).
    fn queued_at(&self) -> u64 {
        if self.timed { clock_ns() } else { 0 }
    }

    pub fn host_path(&self) -> HostPath {
        HostPath { checked: self.proved && self.ack_seen, ..self.path }
    }

    /// Whether work for the host worker is queued.
    pub fn has_host_task(&self) -> bool {
        !self.work.is_empty()
    }

    /// Next work for the host worker.
    pub fn next_host_task(&mut self) -> Option<HostTask> {
        let task = self.work.pop_front();
        if let Some(HostTask::Copy(job)) = &task {
            self.running = job.transfer().cloned();
        }
        task
    }

    /// The first queued copy of a read of `transfer`, taken out of turn by the caller waiting for
    /// it; the rest of the queue keeps its order.
    pub fn next_host_copy_of(&mut self, transfer: u64) -> Option<HostTask> {
        let at = self.work.iter().position(|task| {
            matches!(task, HostTask::Copy(job)
                if job.transfer().is_some_and(|t| t.id == transfer))
        })?;
        let task = self.work.remove(at);
        if let Some(HostTask::Copy(job)) = &task {
            self.running = job.transfer().cloned();
            self.path.caller_copies += 1;
        }
        task
    }

    /// The peer's ProcessHello was checked: tell it whether we can read it.
    pub fn proved(&mut self, reads_peer: bool, net: &mut impl Network) {
        self.proved = true;
        self.path.reads_peer = reads_peer;
        self.announce_reads_peer(reads_peer, net);
    }

    fn announce_reads_peer(&mut self, readable: bool, net: &mut impl Network) {
        self.announced_reads_peer = Some(readable);
        net.send(Control::ProcessAck { readable });
    }

    /// The kernel refused a copy after the proof: no more direct copies out of the peer, and the
    /// copies queued out of it take the channels now rather than each being refused in turn.
    fn lost_peer_access(&mut self, net: &mut impl Network) {
        self.path.reads_peer = false;
        let mut kept = std::collections::VecDeque::with_capacity(self.work.len());
        for task in std::mem::take(&mut self.work) {
            match task {
                HostTask::Copy(job) if !is_cut(&job) => self.take_channels(job, net),
                task => kept.push_back(task),
            }
        }
        self.work = kept;
    }

    /// The request message for a one-sided item or vector that may take the direct path, or `None`
    /// (the network request then). `local` is this end's memory and its region, `segs` the peer's.
    /// Regions to collapse into huge pages are pushed to `collapse`, in order.
    pub(crate) fn request(
        &mut self,
        (id, write): (u64, bool),
        (local, region): (&Extent, &Arc<Region>),
        (remote_region, token): (u64, u64),
        segs: &[RemoteSeg],
        collapse: &mut Vec<Arc<Region>>,
    ) -> Option<Control> {
        if !self.usable(write) {
            return None;
        }
        // A write's source is ours, and the band is ours to apply; a read's source is the
        // target's, which applies the band when it answers (`on_direct_read`).
        let huge_source = write && region.on_huge_pages();
        if write && self.kept_to_channels(local.len(), huge_source) {
            // Once the source lies on huge pages, later transfers out of it skip the band.
            if self.huge_pages {
                collapse.extend(self.collapse_due(region));
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
            self.writes.insert(id);
            // A source on huge pages already has nothing to gain.
            if !huge_source {
                collapse.extend(self.collapse_due(region));
            }
            Some(Control::DirectWrite { xfer: id, region: remote_region, token, segs, src, huge: huge_source })
        } else {
            let asked = AskedRead { region: remote_region, token, segs: segs.clone() };
            self.reads.insert(id, asked);
            Some(Control::DirectRead { xfer: id, region: remote_region, token, segs })
        }
    }

    /// Applies one same-host message of the peer. An error is a protocol violation: the connection
    /// must fail.
    pub(crate) fn handle(&mut self, msg: Control, auth: &impl Authorize, net: &mut impl Network) -> Result<()> {
        match msg {
            Control::ProcessHello { pid, fd } => self.on_process_hello(pid, fd, net),
            Control::ProcessAck { readable } => self.on_process_ack(readable),
            Control::DirectWrite { xfer, region, token, segs, src, huge } => {
                self.on_direct_write(xfer, (region, token), segs, (src, huge), auth, net)
            }
            Control::DirectRead { xfer, region, token, segs } => {
                self.on_direct_read(xfer, (region, token), segs, auth, net)
            }
            Control::DirectGrant { xfer, huge } => self.on_direct_grant(xfer, huge, net),
            Control::DirectDone { xfer } => self.on_direct_done(xfer, net),
            _ => Err(Error::backend("internal: a network message reached the same-host state machine")),
        }
    }

    fn on_process_hello(&mut self, pid: u32, fd: u32, net: &mut impl Network) -> Result<()> {
        if std::mem::replace(&mut self.hello_seen, true) {
            return Err(violation("a second ProcessHello"));
        }
        if self.same_host {
            self.work.push_back(HostTask::Prove { pid, fd });
            net.host_work(false);
        } else {
            self.announce_reads_peer(false, net);
        }
        Ok(())
    }

    fn on_process_ack(&mut self, readable: bool) -> Result<()> {
        if std::mem::replace(&mut self.ack_seen, true) {
            return Err(violation("a second ProcessAck"));
        }
        self.path.peer_reads_us = readable && self.same_host;
        Ok(())
    }

    /// The peer's DirectWrite: authorized like a WriteVector, then copied in here when we can read
    /// the peer and the memory is ours to copy with the CPU, else granted as a network write.
    /// `remote_huge`, the peer's word that its source lies on huge pages, only sizes the pieces.
    fn on_direct_write(
        &mut self,
        xfer: u64,
        (region, token): (u64, u64),
        segs: Vec<RemoteSeg>,
        (src, remote_huge): (Vec<u64>, bool),
        auth: &impl Authorize,
        net: &mut impl Network,
    ) -> Result<()> {
        let Some(region) = authorized(xfer, (region, token), &segs, auth, net) else {
            return Ok(());
        };
        if region.kind != MemKind::Host || !self.path.reads_peer {
            net.grant(xfer, extent_of(&segs), region);
            return Ok(());
        }
        let remote = segs.iter().zip(&src).map(|(s, &a)| IoSeg { addr: a as usize, len: s.len as usize }).collect();
        self.queue_peer_write(xfer, region, &segs, (remote, remote_huge), net)
    }

    /// Queues for the worker the copy of the peer's authorized write `xfer` into `segs` of
    /// `region` out of the peer's memory (`remote`).
    fn queue_peer_write(
        &mut self,
        xfer: u64,
        region: Arc<Region>,
        segs: &[RemoteSeg],
        (remote, remote_huge): (Vec<IoSeg>, bool),
        net: &mut impl Network,
    ) -> Result<()> {
        self.check_pending()?;
        let len = segs.iter().map(|s| u64::from(s.len)).sum();
        let queued = self.queued_at();
        let local = remote_segs(segs);
        let job = CopyJob { op: xfer, read: None, region, local, remote, remote_huge, len, error: None, queued };
        self.work.push_back(HostTask::Copy(job));
        net.host_work(false);
        Ok(())
    }

    /// The peer's DirectRead: authorized like a ReadVector, then granted for the peer to copy out
    /// of host memory, else served over the network: device memory, a reader that cannot copy out
    /// of us, or a transfer our network band keeps to the channels (whose source is then asked to
    /// be collapsed, so that later reads out of it are granted).
    fn on_direct_read(
        &mut self,
        xfer: u64,
        (region, token): (u64, u64),
        segs: Vec<RemoteSeg>,
        auth: &impl Authorize,
        net: &mut impl Network,
    ) -> Result<()> {
        let Some(region) = authorized(xfer, (region, token), &segs, auth, net) else {
            return Ok(());
        };
        if region.kind != MemKind::Host {
            return net.serve(xfer, extent_of(&segs), region);
        }
        self.check_pending()?;
        if self.leases.contains_key(&xfer) || net.serving(xfer) {
            return Err(violation(&format!("a read request reuses op id {xfer} of a read still being served")));
        }
        if !self.path.peer_reads_us {
            // The reader cannot copy out of us: the channels carry it, as for a ReadVector.
            return net.serve(xfer, extent_of(&segs), region);
        }
        let len = segs.iter().map(|s| u64::from(s.len)).sum();
        let huge = region.on_huge_pages();
        if self.kept_to_channels(len, huge) {
            if self.huge_pages {
                self.collapse_source(&region, net);
            }
            return net.serve(xfer, extent_of(&segs), region);
        }
        net.send(Control::DirectGrant { xfer, huge });
        if !huge {
            self.collapse_source(&region, net);
        }
        self.leases.insert(xfer, Lease { region, len });
        Ok(())
    }

    /// A peer queueing more work than `MAX_DIRECT_PENDING` here is treated as hostile.
    fn check_pending(&self) -> Result<()> {
        if self.pending() >= MAX_DIRECT_PENDING {
            return Err(violation(&format!("more than {MAX_DIRECT_PENDING} direct requests pending")));
        }
        Ok(())
    }

    /// The target granted our direct read: copy it, or ask for it over the channels at once when
    /// the kernel refused us a copy out of the peer since (`lost_peer_access`). `remote_huge`, the
    /// target's word that its region lies on huge pages, only sizes the pieces.
    fn on_direct_grant(&mut self, xfer: u64, remote_huge: bool, net: &mut impl Network) -> Result<()> {
        if self.announced_reads_peer != Some(true) {
            return Err(violation(&format!(
                "a DirectGrant for read {xfer}, though we never said we can copy out of the peer"
            )));
        }
        let asked = self.reads.remove(&xfer).ok_or_else(|| unknown_op("DirectGrant", xfer))?;
        let dst = net.take_read(xfer).ok_or_else(|| unknown_op("DirectGrant", xfer))?;
        let queued = self.queued_at();
        let job = CopyJob {
            op: xfer,
            read: asked.read_for(dst.transfer.as_ref()),
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
        if !self.path.reads_peer && !is_cut(&job) {
            self.take_channels(job, net);
            return Ok(());
        }
        self.work.push_back(HostTask::Copy(job));
        net.host_work(true);
        Ok(())
    }

    /// The peer finished copying our region for its read `xfer`: vouch for the bytes unless the
    /// region was deregistered meanwhile.
    fn on_direct_done(&mut self, xfer: u64, net: &mut impl Network) -> Result<()> {
        let lease = self.leases.remove(&xfer).ok_or_else(|| unknown_op("DirectDone", xfer))?;
        net.send(if lease.region.is_removed() {
            deny_msg(xfer, &Error::not_allowed("the memory region was deregistered during the transfer"))
        } else {
            Control::Done { xfer, len: lease.len }
        });
        Ok(())
    }

    /// Whether a Done for `xfer` may answer a direct op of ours (see `done`): a look that costs the
    /// network path's Done three lookups, no more.
    pub(crate) fn may_answer_done(&self, xfer: u64) -> bool {
        self.retried.contains_key(&xfer) || self.writes.contains(&xfer) || self.copied.contains_key(&xfer)
    }

    /// A Done that answers a direct op of ours (a copied write, or a read we copied); `None` when
    /// the op is not one.
    pub(crate) fn done(&mut self, xfer: u64, len: u64, net: &mut impl Network) -> Option<Result<()>> {
        if let Some(leased) = self.retried.remove(&xfer) {
            // Let go, but held to what the lease covered, as any Done is.
            return Some(match len == leased {
                true => Ok(()),
                false => Err(violation(&format!("Done for op {xfer} reports {len} bytes, its lease covered {leased}"))),
            });
        }
        let (transfer, expected, error) = if self.writes.remove(&xfer) {
            net.take_write(xfer)?
        } else {
            let c = self.copied.remove(&xfer)?;
            (c.transfer, c.len, c.error)
        };
        if len != expected {
            net.finish(transfer, Err(violation("a direct transfer's Done reports another length")));
            return Some(Err(violation(&format!("Done for op {xfer} reports {len} bytes, expected {expected}"))));
        }
        if error.is_none() {
            self.path.direct_ops += 1;
        }
        transfer.answered();
        net.finish(transfer, error.map_or(Ok(len), Err));
        Some(Ok(()))
    }

    /// Forgets that op `xfer` asked for the direct path: the target answered the network way
    /// (Grant, Data) or refused it. A read served with Data now completes through the channels, so
    /// its answer came (a caller waiting on it stops reading the control stream for it); a granted
    /// write still ends with the target's Done, after its chunks.
    /// True when it was a read of ours, whose answer the network path now counts.
    pub(crate) fn answered_by_network(&mut self, xfer: u64) -> bool {
        self.writes.remove(&xfer);
        self.reads.remove(&xfer).is_some()
    }

    /// A Deny for a read we copied; false when `xfer` is not one.
    pub(crate) fn denied(&mut self, xfer: u64, err: Error, net: &mut impl Network) -> bool {
        if self.retried.remove(&xfer).is_some() {
            return true;
        }
        let Some(c) = self.copied.remove(&xfer) else { return false };
        c.transfer.answered();
        net.finish(c.transfer, Err(err));
        true
    }

    /// The host worker finished `job` (`copied` is what the copy itself said).
    pub fn copy_finished(&mut self, job: CopyJob, copied: Result<()>, net: &mut impl Network) {
        self.running = None;
        if net.failed() {
            return;
        }
        let gone = || Error::not_allowed("the memory region was deregistered during the transfer");
        // A cut region explains whatever the copy said: the deregistration is the error.
        let error = job.error.or_else(|| job.region.is_removed().then(gone)).or_else(|| copied.err());
        match job.read {
            None => net.send(match &error {
                None => Control::Done { xfer: job.op, len: job.len },
                Some(e) => deny_msg(job.op, e),
            }),
            Some(read) => {
                let c = Copied { transfer: read.transfer, len: job.len, region: job.region.id, error };
                self.copied.insert(job.op, c);
                net.send(Control::DirectDone { xfer: job.op });
            }
        }
    }

    /// The kernel refused `job`'s copy out of the peer after the proof (EPERM, ESRCH): no more
    /// copies out of it (`lost_peer_access`), and the job takes the network path it stands for
    /// (`take_channels`). A job cut off meanwhile fails as a cut copy does, with the
    /// deregistration's error.
    pub fn copy_refused(&mut self, job: CopyJob, err: Error, net: &mut impl Network) {
        self.running = None;
        if net.failed() {
            return;
        }
        self.lost_peer_access(net);
        if is_cut(&job) {
            return self.copy_finished(job, Err(err), net);
        }
        self.take_channels(job, net);
    }

    /// Moves `job`, a copy out of the peer that the kernel no longer allows, to the network path
    /// it stands for, through steps the peer follows already. The peer's write is granted as a
    /// network write (a Grant may answer a DirectWrite until its Done). Our read ends the target's
    /// lease with its DirectDone, whose answer is let go, and is asked for again as the
    /// ReadRequest or ReadVector it stands for under a fresh op id, so that the lease's answer and
    /// the read's never share one; its Data, or Deny, is its answer.
    fn take_channels(&mut self, job: CopyJob, net: &mut impl Network) {
        let extent = extent_of_local(&job.local);
        let Some(OurRead { transfer, ask: (region, token) }) = job.read else {
            return net.grant(job.op, extent, job.region);
        };
        let leased = job.remote.iter().map(|s| s.len as u64).sum();
        self.retried.insert(job.op, leased);
        net.send(Control::DirectDone { xfer: job.op });
        // Lengths of the peer's segments as it named them: each fits its u32.
        let segs: Vec<RemoteSeg> =
            job.remote.iter().map(|s| RemoteSeg { addr: s.addr as u64, len: s.len as u32 }).collect();
        net.read_again(extent, job.region, transfer, |id| match segs[..] {
            [one] => Control::ReadRequest { xfer: id, region, token, addr: one.addr, len: u64::from(one.len) },
            _ => Control::ReadVector { xfer: id, region, token, segs },
        });
    }

    /// Cuts `region` off the direct path: queued copies into it will not run, and a read of ours
    /// that already landed there fails when the target answers.
    pub(crate) fn cut(&mut self, region: u64, err: &Error) {
        for task in &mut self.work {
            if let HostTask::Copy(job) = task
                && job.region.id == region
            {
                job.error.get_or_insert_with(|| err.clone());
            }
        }
        for c in self.copied.values_mut().filter(|c| c.region == region) {
            c.error.get_or_insert_with(|| err.clone());
        }
    }

    /// Whether the peer's engine owes us an answer on the direct path.
    pub(crate) fn waits_on_peer(&self) -> bool {
        !self.copied.is_empty() || !self.leases.is_empty() || !self.retried.is_empty()
    }

    /// Every pending part of the direct path, once the connection failed.
    pub(crate) fn fail(&mut self) -> Vec<Arc<Transfer>> {
        let d = self;
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
fn authorized(
    xfer: u64,
    (region, token): (u64, u64),
    segs: &[RemoteSeg],
    auth: &impl Authorize,
    net: &mut impl Network,
) -> Option<Arc<Region>> {
    auth.authorize_segments(region, token, segs).map_err(|e| deny(xfer, e, net)).ok()
}

fn deny(xfer: u64, e: Error, net: &mut impl Network) {
    log::debug!("refusing the peer's op {xfer}: {}", e.message());
    net.send(deny_msg(xfer, &e));
}

fn deny_msg(xfer: u64, e: &Error) -> Control {
    Control::Deny { xfer, status: e.status() as i32, reason: e.message().to_owned() }
}

/// The peer broke the protocol: `what` says how.
fn violation(what: &str) -> Error {
    Error::backend(format!("protocol violation: {what}"))
}

fn unknown_op(what: &str, id: u64) -> Error {
    Error::backend(format!("protocol violation: {what} for unknown id {id}"))
}

#[cfg(test)]
mod tests;
