//! Staged send comm: a device chunk is copied into a slot, and handed to the inner comm once the
//! copy finished; host chunks go straight to the inner comm. The inner comm sees every request in
//! posting order (its stream order is what the receiver matches), so a host chunk posted behind a
//! copying device chunk waits for it.
//!
//! With a copy limit (`UCCL_TCPX_STAGING_AHEAD`) a device chunk beyond it keeps its slot but its
//! copy is queued only once an earlier one finished: the engine posts a channel's whole window in
//! one go, and without the limit every channel's copies are issued before the next channel's
//! first one. A chunk of several segments may be queued while fewer copies than the ring has
//! streams are: its gather kernel then runs on its own stream beside the previous chunk's copy
//! instead of after it (a KV cache's 16 KiB blocks, 2 MiB chunks: 0.55 of one piece with one
//! gathered chunk at a time, 0.8 with two on two streams, on an H100).
//!
//! A chunk of several segments is gathered whole (by the segment kernel or a copy per segment), and
//! sent once all of it is there.

use std::collections::VecDeque;

use super::regions::{Route, Routed, SpareSegments, Staging};
use super::setup::{Setup, StickyFailure};
use crate::error::{Error, Result};
use crate::trace::{StageMark as Mark, StagedChunk as ChunkTrace, StagedComm as CommTracer, clock_ns};
use crate::transport::{IoSeg, MemKind, MrHandle, MrRun, RequestId, SendComm};

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Host data not yet handed to the inner comm.
    Waiting { addr: usize, mr: MrHandle },
    /// Device data at `src` waiting for its copy into `slot` to be queued.
    Pending { slot: usize, src: usize },
    /// Device data being copied into `slot`.
    Copying { slot: usize },
    /// In `slot`, not yet handed to the inner comm.
    Copied { slot: usize },
    /// Handed to the inner comm as this request.
    Sent { inner: RequestId, slot: Option<usize> },
}

struct Request {
    len: usize,
    stage: Stage,
    /// A vectored request's segments (its stage's address is the first one's); `None` for one buffer.
    segs: Option<Vec<IoSeg>>,
    /// Whether the segment kernel can name every segment (as routing found them).
    addressable: bool,
    /// A host vector's runs of registrations with the inner comm (empty otherwise).
    runs: Vec<MrRun>,
    trace: Option<ChunkTrace>,
}

pub struct StagedSendComm {
    // Declared first so it drops first: its I/O stops reading slots before the ring goes.
    inner: Box<dyn SendComm>,
    staging: Staging,
    /// Requests not yet reported done, oldest first; the oldest has id `posted - queue.len()`.
    queue: VecDeque<Request>,
    posted: u64,
    /// Index in `queue` of the first request not yet handed to the inner comm.
    unsent: usize,
    /// Copies queued and not yet seen finished.
    copying: usize,
    /// Copies this comm may have queued and unfinished at once.
    copy_limit: usize,
    /// The same for a chunk of several segments: at least one per stream of the ring.
    gather_limit: usize,
    spare: SpareSegments,
    failure: StickyFailure,
    tracer: Option<CommTracer>,
}

impl StagedSendComm {
    pub(crate) fn new(inner: Box<dyn SendComm>, setup: Setup) -> StagedSendComm {
        let tuning = setup.params.tuning;
        let copy_limit = if tuning.ahead == 0 { usize::MAX } else { tuning.ahead as usize };
        StagedSendComm {
            inner,
            copy_limit,
            gather_limit: copy_limit.max(setup.params.streams()),
            tracer: CommTracer::new(true),
            staging: Staging::new(setup),
            queue: VecDeque::new(),
            posted: 0,
            unsent: 0,
            copying: 0,
            spare: SpareSegments::default(),
            failure: StickyFailure::default(),
        }
    }

    /// Queues the copies of pending chunks, oldest first, while the copy limit allows.
    fn issue_copies(&mut self) -> Result<()> {
        for i in self.unsent..self.queue.len() {
            let gathered = self.queue[i].segs.as_ref().is_some_and(|segs| segs.len() >= 2);
            let limit = if gathered { self.gather_limit } else { self.copy_limit };
            if self.copying >= limit {
                break;
            }
            let Stage::Pending { slot, src } = self.queue[i].stage else { continue };
            let len = self.queue[i].len;
            let started = self.tracer.as_ref().map(|_| clock_ns());
            let ring = self.staging.ring.as_mut().ok_or_else(|| Error::backend("staging ring missing"))?;
            match &self.queue[i].segs {
                // SAFETY: the device source stays valid until the request is reported done or the
                // comm dropped (isend's contract), and the drop waits for the copy.
                None => unsafe { ring.copy_in(slot, src, len)? },
                // SAFETY: as above, for every segment.
                // The segments add up to `len` and `addressable` is what routing found (`post`).
                Some(segs) => unsafe {
                    ring.gather(slot, len, segs.iter().map(|s| (s.addr, s.len)), self.queue[i].addressable)?
                },
            }
            self.copying += 1;
            self.staging.setup.copies_changed(true, 1);
            let req = &mut self.queue[i];
            req.stage = Stage::Copying { slot };
            if let (Some(trace), Some(started)) = (&mut req.trace, started) {
                trace.issued(started, 1);
                trace.mark(Mark::CopyIssued);
            }
        }
        Ok(())
    }

    /// Whether request `i`'s copy finished; once it did, the request stops counting as a copy
    /// (which may let the next one be queued).
    fn poll_copy(&mut self, i: usize) -> Result<bool> {
        let Stage::Copying { slot } = self.queue[i].stage else { return Ok(false) };
        let ring = self.staging.ring.as_mut().ok_or_else(|| Error::backend("staging ring missing"))?;
        if !ring.copied(slot)? {
            return Ok(false);
        }
        let req = &mut self.queue[i];
        req.stage = Stage::Copied { slot };
        if let Some(trace) = &mut req.trace {
            trace.mark(Mark::CopySeen);
        }
        self.copying -= 1;
        self.staging.setup.copies_changed(false, 1);
        // A finished copy makes room under the limit: queue the next before the (slower) hand-over.
        self.issue_copies()?;
        Ok(true)
    }

    /// Hands requests to the inner comm in order while their data is ready and it has room.
    fn advance(&mut self) -> Result<()> {
        self.issue_copies()?;
        while self.unsent < self.queue.len() {
            let req = &mut self.queue[self.unsent];
            let (addr, mr, slot) = match req.stage {
                Stage::Waiting { addr, mr } => (addr, mr, None),
                Stage::Pending { .. } => break,
                Stage::Copying { .. } => {
                    if self.poll_copy(self.unsent)? {
                        continue;
                    }
                    break;
                }
                Stage::Copied { slot } => {
                    (self.staging.ring_mut()?.slot_ptr(slot) as usize, self.staging.ring_mr, Some(slot))
                }
                Stage::Sent { .. } => {
                    self.unsent += 1;
                    continue;
                }
            };
            let req = &self.queue[self.unsent];
            let len = req.len;
            let posted = match (&req.segs, slot) {
                // SAFETY: host segments stay valid until this request is reported done (isendv's
                // contract).
                (Some(segs), None) => unsafe { self.inner.isendv(segs, &req.runs)? },
                // SAFETY: host data stays valid until this request is reported done (the caller's
                // isend contract); a slot stays ours until then too.
                _ => unsafe { self.inner.isend(addr as *const u8, len, mr)? },
            };
            let Some(inner) = posted else { break };
            let req = &mut self.queue[self.unsent];
            req.stage = Stage::Sent { inner, slot };
            if let Some(trace) = &mut req.trace {
                trace.mark(Mark::Handed);
            }
            self.unsent += 1;
        }
        Ok(())
    }

    fn post(&mut self, routed: Routed, iov: &[IoSeg], runs: Vec<MrRun>) -> Result<Option<RequestId>> {
        let (route, addr, len) = (routed.route, iov[0].addr, routed.len);
        let stage = match route {
            Route::Direct(mr) => Stage::Waiting { addr, mr },
            Route::Staged(device) => {
                let ring = self.staging.ring_mut()?;
                let Some(slot) = ring.take_for(device)? else { return Ok(None) };
                Stage::Pending { slot, src: addr }
            }
        };
        let segs = (iov.len() > 1).then(|| self.spare.copy(iov));
        let runs = if segs.is_some() && !route.staged() { runs } else { Vec::new() };
        let trace = self.tracer.as_mut().map(|t| t.posted(len, route.staged()));
        self.queue.push_back(Request { len, stage, segs, addressable: routed.addressable, runs, trace });
        let id = RequestId(self.posted);
        self.posted += 1;
        self.advance()?;
        Ok(Some(id))
    }

    fn finish_oldest(&mut self) -> Result<Option<usize>> {
        self.advance()?;
        let Some(Request { stage: Stage::Sent { inner, slot }, .. }) = self.queue.front() else {
            return Ok(None);
        };
        let (inner, slot) = (*inner, *slot);
        let Some(size) = self.inner.test(inner)? else { return Ok(None) };
        let done = self.queue.pop_front().expect("front request");
        self.unsent -= 1;
        if let (Some(tracer), Some(trace)) = (&mut self.tracer, done.trace) {
            trace.mark(Mark::InnerDone);
            tracer.reported(trace);
        }
        self.spare.give(done.segs);
        if slot.is_some() {
            self.staging.ring_mut()?.give_back();
        }
        if self.queue.is_empty() {
            self.staging.idle(&mut self.inner);
            self.spare.clear();
        }
        Ok(Some(size))
    }

    fn enter(&mut self, test: bool) -> Option<u64> {
        self.tracer.as_mut().map(|t| t.enter(test))
    }

    fn exit(&mut self, entered: Option<u64>) {
        if let (Some(t), Some(entered)) = (&mut self.tracer, entered) {
            t.exit(entered);
        }
    }
}

impl SendComm for StagedSendComm {
    /// The inner comm's sockets carry the staged bytes.
    fn link_stats(&self) -> Vec<crate::transport::LinkStats> {
        self.inner.link_stats()
    }

    fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.staging.register(&mut self.inner, addr, len, kind)
    }

    fn dereg_mr(&mut self, mr: MrHandle) {
        self.staging.deregister(&mut self.inner, mr)
    }

    unsafe fn isend(&mut self, data: *const u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
        let one = [IoSeg { addr: data as usize, len }];
        // SAFETY: per the contract.
        unsafe { self.isendv(&one, &MrRun::all(&one, mr)) }
    }

    /// A device request is gathered into its slot (by the segment kernel when its segments are
    /// many and small, else with one copy per segment); a host one goes to the inner comm as it is.
    unsafe fn isendv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        self.failure.check()?;
        if self.queue.len() >= self.staging.setup.max_requests {
            return Ok(None);
        }
        let mut runs = Vec::new();
        let routed = self.staging.route_segments(mrs, iov, &mut runs)?;
        if let Route::Staged(device) = routed.route
            && self.staging.ring(&mut self.inner, device)?.peek().is_none()
        {
            return Ok(None);
        }
        let entered = self.enter(false);
        let posted = self.post(routed, iov, runs);
        self.exit(entered);
        self.failure.keep(posted)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.failure.check()?;
        let oldest = self.posted - self.queue.len() as u64;
        if req.0 != oldest || self.queue.is_empty() {
            return Err(Error::backend(format!(
                "test of request {} out of order: the oldest untested request is {oldest}",
                req.0
            )));
        }
        let entered = self.enter(true);
        let done = self.finish_oldest();
        self.exit(entered);
        self.failure.keep(done)
    }

    fn make_ahead(&mut self) {
        self.staging.make_ahead();
    }
}

impl Drop for StagedSendComm {
    fn drop(&mut self) {
        // Copies still queued are waited for when the ring goes; they no longer count as work the
        // progress thread must poll for.
        self.staging.setup.copies_changed(false, self.copying);
        let idle = self.queue.is_empty();
        self.staging.close(&mut self.inner, idle);
    }
}
