//! Staged receive comm: a receive into device memory lands in a slot through the inner comm, is
//! copied up, and is reported done once that copy finished. The inner receive is consumed as soon
//! as it completes (its data is in the slot, or in the caller's host buffer); the slot itself stays
//! busy until the copy is done. A receive of several segments is scattered once it completed (by
//! the segment kernel or a copy per segment).

use std::collections::VecDeque;

use super::regions::{Route, Routed, SpareSegments, Staging};
use super::setup::{Setup, StickyFailure};
use crate::error::{Error, Result};
use crate::trace::{StageMark as Mark, StagedChunk as ChunkTrace, StagedComm as CommTracer, clock_ns};
use crate::transport::{IoSeg, MemKind, MrHandle, MrRun, RecvComm, RequestId};

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Waiting for the inner receive.
    Receiving { inner: RequestId },
    /// `size` bytes are being copied from the slot to the destination.
    Copying { size: usize },
    /// `size` bytes are in place.
    Landed { size: usize },
}

struct Request {
    addr: usize,
    len: usize,
    /// A staged vectored receive's segments, filled from the slot in order; `None` for one buffer.
    segs: Option<Vec<IoSeg>>,
    /// Whether the segment kernel can name every segment (as routing found them).
    addressable: bool,
    slot: Option<usize>,
    stage: Stage,
    trace: Option<ChunkTrace>,
}

pub struct StagedRecvComm {
    // Declared first so it drops first: its I/O stops writing slots before the ring goes.
    inner: Box<dyn RecvComm>,
    staging: Staging,
    /// Requests not yet reported done, oldest first.
    queue: VecDeque<Request>,
    posted: u64,
    tested: u64,
    consumed: u64,
    /// Copies queued and not yet seen finished.
    copying: usize,
    /// A host vector's runs of registrations with the inner comm; reused.
    runs: Vec<MrRun>,
    spare: SpareSegments,
    failure: StickyFailure,
    tracer: Option<CommTracer>,
}

impl StagedRecvComm {
    pub(crate) fn new(inner: Box<dyn RecvComm>, setup: Setup) -> StagedRecvComm {
        StagedRecvComm {
            inner,
            tracer: CommTracer::new(false),
            staging: Staging::new(setup),
            queue: VecDeque::new(),
            posted: 0,
            tested: 0,
            consumed: 0,
            copying: 0,
            runs: Vec::new(),
            spare: SpareSegments::default(),
            failure: StickyFailure::default(),
        }
    }

    /// Posts `iov`; a host vector goes to the inner comm in `runs` of its registrations.
    fn post(&mut self, routed: Routed, iov: &[IoSeg], runs: &[MrRun]) -> Result<Option<RequestId>> {
        let (route, addr, len) = (routed.route, iov[0].addr, routed.len);
        let (target, mr, slot) = match route {
            Route::Direct(mr) => (addr, mr, None),
            Route::Staged(device) => {
                let ring = self.staging.ring(&mut self.inner, device)?;
                let Some(slot) = ring.peek() else { return Ok(None) };
                (ring.slot_ptr(slot) as usize, self.staging.ring_mr, Some(slot))
            }
        };
        let posted = match slot {
            // SAFETY: host segments are the caller's until this request is done (irecvv's contract).
            None if iov.len() > 1 => unsafe { self.inner.irecvv(iov, runs)? },
            // SAFETY: a host destination is the caller's until this request is done (irecv's
            // contract); a slot is ours until the copy out of it finished.
            _ => unsafe { self.inner.irecv(target as *mut u8, len, mr)? },
        };
        let Some(inner) = posted else { return Ok(None) };
        let segs = (slot.is_some() && iov.len() > 1).then(|| self.spare.copy(iov));
        if let Route::Staged(device) = route {
            self.staging.ring_mut()?.take_for(device)?;
        }
        let trace = self.tracer.as_mut().map(|t| t.posted(len, slot.is_some()));
        if let Some(trace) = &trace {
            trace.mark(Mark::Handed);
        }
        let addressable = routed.addressable;
        self.queue.push_back(Request { addr, len, segs, addressable, slot, stage: Stage::Receiving { inner }, trace });
        let id = RequestId(self.posted);
        self.posted += 1;
        Ok(Some(id))
    }

    /// Completes inner receives in order and starts the copies out of their slots.
    fn advance(&mut self) -> Result<()> {
        for i in 0..self.queue.len() {
            let Stage::Receiving { inner } = self.queue[i].stage else { continue };
            match self.inner.test(inner)? {
                Some(size) => self.received(i, inner, size)?,
                None => break,
            }
        }
        Ok(())
    }

    /// Inner receive `inner` of request `i` completed with `size` bytes: its copy out is queued.
    fn received(&mut self, i: usize, inner: RequestId, size: usize) -> Result<()> {
        self.inner.irecv_consumed(inner)?;
        let req = &mut self.queue[i];
        if let Some(trace) = &mut req.trace {
            trace.mark(Mark::InnerDone);
        }
        if size > req.len {
            return Err(Error::backend(format!("{size} bytes arrived for a {}-byte receive", req.len)));
        }
        let copied = req.slot.is_some() && size > 0;
        if copied {
            self.copy_out(i, size)?;
        }
        self.queue[i].stage = if copied { Stage::Copying { size } } else { Stage::Landed { size } };
        Ok(())
    }

    /// Queues the copy of the first `len` bytes of request `i`'s slot to its destination.
    fn copy_out(&mut self, i: usize, len: usize) -> Result<()> {
        let req = &mut self.queue[i];
        let slot = req.slot.ok_or_else(|| Error::backend("copying out a receive without a slot"))?;
        let started = req.trace.as_ref().map(|_| clock_ns());
        let ring = self.staging.ring.as_mut().ok_or_else(|| Error::backend("staging ring missing"))?;
        match &req.segs {
            // SAFETY: the destination is exclusively ours until this request is reported done or
            // the comm dropped, and the drop waits for the copy; the slot's bytes are final (the
            // inner receive completed).
            None => unsafe { ring.copy_out(slot, req.addr, len)? },
            // SAFETY: as above, for every segment; `len` is at most their total (the inner receive
            // reported at most the request's length, which routing measured), and `addressable` is
            // what routing found.
            Some(segs) => unsafe { ring.scatter(slot, len, segs.iter().map(|s| (s.addr, s.len)), req.addressable)? },
        }
        if let (Some(trace), Some(started)) = (&mut req.trace, started) {
            trace.issued(started, 1);
            trace.mark(Mark::CopyIssued);
        }
        self.copying += 1;
        self.staging.setup.copies_changed(true, 1);
        Ok(())
    }

    fn exit(&mut self, entered: Option<u64>) {
        if let (Some(t), Some(entered)) = (&mut self.tracer, entered) {
            t.exit(entered);
        }
    }

    fn finish_oldest(&mut self) -> Result<Option<usize>> {
        self.advance()?;
        let Some(front) = self.queue.front() else { return Ok(None) };
        let size = match front.stage {
            Stage::Receiving { .. } => return Ok(None),
            Stage::Landed { size } => size,
            Stage::Copying { size } => {
                let slot = front.slot.ok_or_else(|| Error::backend("copying request without a slot"))?;
                if !self.staging.ring_mut()?.copied(slot)? {
                    return Ok(None);
                }
                self.copying -= 1;
                self.staging.setup.copies_changed(false, 1);
                size
            }
        };
        let done = self.queue.pop_front().expect("front request");
        self.spare.give(done.segs);
        if let (Some(tracer), Some(trace)) = (&mut self.tracer, done.trace) {
            if done.slot.is_some() {
                trace.mark(Mark::CopySeen);
            }
            tracer.reported(trace);
        }
        if done.slot.is_some() {
            self.staging.ring_mut()?.give_back();
        }
        if self.queue.is_empty() {
            self.staging.idle(&mut self.inner);
            self.spare.clear();
        }
        self.tested += 1;
        Ok(Some(size))
    }
}

impl RecvComm for StagedRecvComm {
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

    unsafe fn irecv(&mut self, data: *mut u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
        let one = [IoSeg { addr: data as usize, len }];
        // SAFETY: per the contract.
        unsafe { self.irecvv(&one, &MrRun::all(&one, mr)) }
    }

    /// A device request lands in its slot and is scattered out of it (by the segment kernel when
    /// its segments are many and small, else with one copy per segment); a host one goes to the
    /// inner comm as it is.
    unsafe fn irecvv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        self.failure.check()?;
        if (self.posted - self.consumed) as usize >= self.staging.setup.max_requests {
            return Ok(None);
        }
        let mut runs = std::mem::take(&mut self.runs);
        let routed = match self.staging.route_segments(mrs, iov, &mut runs) {
            Ok(routed) => routed,
            Err(e) => {
                self.runs = runs;
                return Err(e);
            }
        };
        let entered = self.tracer.as_mut().map(|t| t.enter(false));
        let posted = self.post(routed, iov, &runs);
        self.runs = runs;
        self.exit(entered);
        self.failure.keep(posted)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.failure.check()?;
        if req.0 != self.tested || req.0 >= self.posted {
            return Err(Error::backend(format!(
                "test of request {} out of order: the oldest untested request is {}",
                req.0, self.tested
            )));
        }
        let entered = self.tracer.as_mut().map(|t| t.enter(true));
        let done = self.finish_oldest();
        self.exit(entered);
        self.failure.keep(done)
    }

    fn make_ahead(&mut self) {
        self.staging.make_ahead();
    }

    fn irecv_consumed(&mut self, req: RequestId) -> Result<()> {
        if req.0 != self.consumed || req.0 >= self.tested {
            return Err(Error::backend(format!(
                "irecv_consumed of request {} out of order: next to consume is {}, {} completed",
                req.0, self.consumed, self.tested
            )));
        }
        self.consumed += 1;
        Ok(())
    }
}

impl Drop for StagedRecvComm {
    fn drop(&mut self) {
        self.staging.setup.copies_changed(false, self.copying);
        let idle = self.queue.is_empty();
        self.staging.close(&mut self.inner, idle);
    }
}
