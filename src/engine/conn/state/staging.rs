//! The state machine's part of the staging areas (`local::staging_area`): one-sided host
//! transfers between processes of one host whose bytes move through memory both map, pushed by
//! the end whose memory is read and drained by the end whose memory is written, two plain copies
//! where `process_vm_readv` pins the source page by page.
//!
//! Each end that stages (`Config::host_copy_staging`) creates its area on first use (a write it
//! posts, or a read of its host memory the peer asks for), announces it with StagingArea, and
//! stages into it only once the peer answered StagingAck with ok: the peer's worker took the
//! descriptor out of our proven process and checked the file's seals and size. A peer that names
//! pieces outside the area it announced, or stages into an area it never announced, violates the
//! protocol.
//!
//! - write: A `StagedWrite{op, region, token, segs, first_piece, generation}`, then A's posting
//!   thread pushes the source into the range, after the connection lock is let go; B authorizes it
//!   as it would a DirectWrite, drains each piece into the segments once its mark says pushed,
//!   and answers `Done`, or `Deny` (refused: B reads nothing; or the push was aborted because A's
//!   source was deregistered or A's connection failed). A frees the range once its push finished
//!   and the answer came.
//! - read: A `DirectRead` as on the direct path → B authorizes, answers `StagedGrant{op,
//!   first_piece, generation}` and its worker pushes the source into B's range → A drains it, then
//!   `DirectDone` → B frees the range once its push finished too, and answers `Done`, or `Deny`
//!   when its region was deregistered meanwhile. B's connection failing with the push still
//!   queued marks its pieces aborted, so A's drain stops at once.
//!
//! Why this cannot deadlock: a drain waits only for a push, and no push waits for the peer. A
//! write's push runs on its posting thread. A read's push runs on the target's worker, which may be
//! in a drain of its own read, waiting for the peer's worker to push; but each worker runs its
//! queue in the order the messages came, and a drain is queued on the grant that the peer sent
//! after the request that queued the push it waits for, so two workers never each wait on a push
//! queued behind the other's drain. That order is why a waiting caller never takes a staged drain
//! out of turn (`next_host_copy_of`). Keep it: no push may wait for the peer, and staged drains
//! run only in queue order.
//!
//! An end maps a peer's area only when it opted in to staging itself, and only up to its own
//! area's size: with staging off, nothing the peer names is opened.
//!
//! The areas need the peer's proven identity, not the kernel's leave to copy out of its process:
//! where that copy is refused (ProcessAck with readable false: Yama's ptrace scope 1 between
//! siblings), transfers that fit still take the areas (a read asks for its target's area once
//! mapped, the first of them served over the channels made it), and a read that finds no room
//! there is served over the channels (Data), not granted for a copy the reader cannot make. A
//! reader that said it may copy and was refused a copy later never learns to say otherwise: its
//! reads keep to the channels, since a target without room would grant it that copy.

use std::sync::Arc;

use super::direct_table::{CopyJob, HostTask, PushJob, StagedRange, StagedSource};
use super::{Action, ConnState, Extent, unknown_op, violation};
use crate::engine::local::staging_area::{self, OutboundArea, PeerArea, pieces_for};
use crate::engine::region::Region;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, RemoteSeg};

impl ConnState {
    /// This end stages transfers through an area of `bytes` data bytes (`Config::host_copy_staging`),
    /// and maps a peer's area of at most that size.
    pub fn set_staging(&mut self, bytes: u64) {
        self.direct.staging.bytes = Some(bytes);
        self.direct.staging.opted_in = Some(bytes);
    }

    /// Asks our worker for our area (once) when a transfer of `len` bytes could use it: made off
    /// the connection lock (a memfd sized, sealed and mapped), and off the thread that asked.
    pub(super) fn want_area(&mut self, len: u64, out: &mut Vec<Action>) {
        let staging = &mut self.direct.staging;
        if let Some(bytes) = staging.bytes.filter(|&b| self.direct.same_host && !staging.offered && len <= b) {
            staging.offered = true;
            self.direct.work.push_back(HostTask::MakeArea { bytes });
            out.push(Action::HostWork { ours: false });
        }
    }

    /// The connection made our area (or could not: then we never stage): announce it.
    pub fn area_created(&mut self, area: Result<OutboundArea>, out: &mut Vec<Action>) {
        match area {
            Ok(area) => {
                out.push(Action::Send(Control::StagingArea { fd: area.fd(), len: area.len() }));
                self.direct.staging.ours = Some(Arc::new(area));
            }
            Err(e) => {
                log::warn!("no staging area for a same-host peer: {}; its transfers take the other paths", e.message());
                self.direct.staging.bytes = None;
            }
        }
    }

    /// The peer's worker mapped our area, or could not.
    pub(super) fn on_staging_ack(&mut self, ok: bool) -> Result<()> {
        let staging = &mut self.direct.staging;
        let Some(area) = &staging.ours else {
            return Err(violation("a StagingAck for a staging area never announced"));
        };
        if staging.ack.replace(ok).is_some() {
            return Err(violation("a second StagingAck"));
        }
        // The peer holds its own descriptor now, or never will.
        area.close_fd();
        if !ok {
            log::debug!("the same-host peer did not map our staging area; transfers take the other paths");
        }
        Ok(())
    }

    /// The peer announced its area: our worker maps it (behind the peer's proof in the queue), if
    /// this end opted in to staging and the area is no larger than ours may be. Without the opt-in
    /// nothing of the peer's is opened or mapped: a peer's descriptor is what it chose, and its
    /// area's pages are ours to fault in.
    pub(super) fn on_staging_area(&mut self, fd: u32, len: u64, out: &mut Vec<Action>) -> Result<()> {
        if std::mem::replace(&mut self.direct.staging.peer_announced, true) {
            return Err(violation("a second StagingArea"));
        }
        let within = self.direct.staging.opted_in.is_some_and(|bytes| len <= staging_area::file_len_for(bytes));
        if self.direct.same_host && within {
            self.direct.work.push_back(HostTask::MapArea { fd, len });
            out.push(Action::HostWork { ours: false });
        } else {
            out.push(Action::Send(Control::StagingAck { ok: false }));
        }
        Ok(())
    }

    /// The worker mapped the peer's area, or could not: tell the peer.
    pub fn area_mapped(&mut self, mapped: Result<PeerArea>, out: &mut Vec<Action>) {
        let ok = match mapped {
            Ok(area) => {
                self.direct.staging.peer = Some(Arc::new(area));
                true
            }
            Err(e) if e.status() == UcclStatus::ErrNotSupported => {
                // The kernel's refusal holds for every peer of this process: said once.
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    log::warn!("{}; same-host peers' staging areas are not used (logged once)", e.message());
                });
                false
            }
            Err(e) => {
                log::warn!("the same-host peer's staging area is not used: {}", e.message());
                false
            }
        };
        out.push(Action::Send(Control::StagingAck { ok }));
    }

    /// A range of our area for `len` bytes, once the peer mapped it, when one is free.
    fn staged_range(&self, len: u64) -> Option<(Arc<OutboundArea>, StagedRange)> {
        let staging = &self.direct.staging;
        let area = staging.ours.as_ref().filter(|_| staging.ack == Some(true))?;
        let range = area.alloc(len)?;
        Some((area.clone(), StagedRange::new(range)))
    }

    /// Whether the peer's read of `len` bytes may be staged by the peer: it announced an area
    /// that we mapped and that holds it (it may still find no room, and answer otherwise).
    pub(super) fn peer_may_stage(&self, len: u64) -> bool {
        self.direct.staging.peer.as_ref().is_some_and(|area| len <= area.data_bytes())
    }

    /// Our write `id` of `local` (in `region`) as a staged write, when our area has room: the
    /// request, with the push for the posting thread in `extra`.
    pub(super) fn stage_write(
        &mut self,
        id: u64,
        (local, region): (&Extent, &Arc<Region>),
        remote_region: u64,
        token: u64,
        segs: &[RemoteSeg],
        extra: &mut Vec<Action>,
    ) -> Option<Control> {
        let len = local.len();
        self.want_area(len, extra);
        let (area, staged) = self.staged_range(len)?;
        let range = staged.range;
        self.direct.staging.writes.insert(id, staged);
        self.direct.writes.insert(id);
        let src = super::direct::segs_of(local);
        extra.push(Action::Push(PushJob { op: id, write: true, area, range, region: region.clone(), src, len }));
        Some(Control::StagedWrite {
            xfer: id,
            region: remote_region,
            token,
            first_piece: range.first_piece,
            generation: range.generation,
            segs: segs.to_vec(),
        })
    }

    /// The peer's read `xfer` of `segs` (ours, authorized, in host `region`) staged into our
    /// area when it has room: the grant and the push for our worker; `None` when it has none.
    pub(super) fn stage_read(
        &mut self,
        xfer: u64,
        region: &Arc<Region>,
        segs: &[RemoteSeg],
        out: &mut Vec<Action>,
    ) -> Option<StagedRange> {
        let len = segs.iter().map(|s| u64::from(s.len)).sum();
        self.want_area(len, out);
        let (area, staged) = self.staged_range(len)?;
        let range = staged.range;
        let src = super::direct::remote_segs(segs);
        out.push(Action::Send(Control::StagedGrant {
            xfer,
            first_piece: range.first_piece,
            generation: range.generation,
        }));
        let push = PushJob { op: xfer, write: false, area, range, region: region.clone(), src, len };
        self.direct.work.push_back(HostTask::Push(push));
        out.push(Action::HostWork { ours: false });
        Some(staged)
    }

    /// The peer's StagedWrite: authorized like a DirectWrite, then drained from the peer's area
    /// by our worker (or granted as a network write into device memory).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_staged_write(
        &mut self,
        xfer: u64,
        (region, token): (u64, u64),
        (first_piece, generation): (u32, u64),
        segs: Vec<RemoteSeg>,
        mem: &impl super::Memory,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        let area = self.checked_range(first_piece, segs.iter().map(|s| u64::from(s.len)).sum())?;
        let Some(region) = super::direct::authorized(xfer, (region, token), &segs, mem, out) else {
            return Ok(());
        };
        if region.kind != crate::transport::MemKind::Host {
            self.grant(xfer, super::direct::extent_of(&segs), region, out);
            return Ok(());
        }
        let staged = StagedSource { area, first_piece, generation };
        self.queue_peer_write(xfer, region, &segs, (Vec::new(), Some(staged)), out)
    }

    /// The target staged our direct read: drain it from its area.
    pub(super) fn on_staged_grant(
        &mut self,
        xfer: u64,
        (first_piece, generation): (u32, u64),
        out: &mut Vec<Action>,
    ) -> Result<()> {
        let len = self.inbound.get(&xfer).filter(|_| self.direct.reads.contains_key(&xfer));
        let len = len.ok_or_else(|| unknown_op("StagedGrant", xfer))?.extent.len();
        let area = self.checked_range(first_piece, len)?;
        let asked = self.direct.reads.remove(&xfer).expect("looked up above");
        let dst = self.inbound.remove(&xfer).expect("looked up above");
        let job = CopyJob {
            op: xfer,
            read: asked.read_for(dst.on_done.transfer()),
            local: super::direct::segs_of(&dst.extent),
            remote: Vec::new(),
            staged: Some(StagedSource { area, first_piece, generation }),
            len,
            region: dst.region,
            error: dst.error,
            queued: self.queued_at(),
        };
        self.direct.work.push_back(HostTask::Copy(job));
        out.push(Action::HostWork { ours: true });
        Ok(())
    }

    /// The peer's area, when the `len` bytes from `first_piece` lie inside it.
    fn checked_range(&self, first_piece: u32, len: u64) -> Result<Arc<PeerArea>> {
        let area =
            self.direct.staging.peer.clone().ok_or_else(|| violation("staged bytes from an area not mapped here"))?;
        let pieces = pieces_for(len);
        let pieces = u32::try_from(pieces).map_err(|_| violation(&format!("a staged transfer of {len} bytes")))?;
        area.check(first_piece, pieces)?;
        Ok(area)
    }

    /// A push of ours finished (whatever it copied: the peer learns of an abort from the marks).
    pub fn push_finished(&mut self, op: u64, write: bool, out: &mut Vec<Action>) {
        if write {
            if self.direct.staging.writes.get_mut(&op).is_some_and(StagedRange::push_done) {
                self.free_write_range(op);
            }
        } else if self.direct.leases.get_mut(&op).and_then(|l| l.staged.as_mut()).is_some_and(StagedRange::push_done) {
            self.end_lease(op, out);
        }
    }

    /// The target answered our write `xfer` (Done, Deny or Grant); whether it was staged.
    pub(super) fn staged_write_answered(&mut self, xfer: u64) -> bool {
        let Some(staged) = self.direct.staging.writes.get_mut(&xfer) else { return false };
        if staged.peer_done() == Some(true) {
            self.free_write_range(xfer);
        }
        true
    }

    fn free_write_range(&mut self, op: u64) {
        if let (Some(staged), Some(area)) = (self.direct.staging.writes.remove(&op), &self.direct.staging.ours) {
            area.free(staged.range);
        }
    }

    /// Frees the lease's range (if staged) and vouches for the bytes unless the region was
    /// deregistered meanwhile.
    pub(super) fn end_lease(&mut self, xfer: u64, out: &mut Vec<Action>) {
        let Some(lease) = self.direct.leases.remove(&xfer) else { return };
        if let (Some(staged), Some(area)) = (&lease.staged, &self.direct.staging.ours) {
            area.free(staged.range);
        }
        out.push(Action::Send(if lease.region.is_removed() {
            super::deny_msg(xfer, &Error::not_allowed("the memory region was deregistered during the transfer"))
        } else {
            Control::Done { xfer, len: lease.len }
        }));
    }
}
