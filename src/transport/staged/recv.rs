//! Staged receive comm: a receive into device memory lands in a slot through the inner comm, is
//! copied up, and is reported done once that copy finished. The inner receive is consumed as soon
//! as it completes (its data is in the slot, or in the caller's host buffer); the slot itself stays
//! busy until the copy is done.
//!
//! Pipelined (`UCCL_TCPX_STAGING_PIPELINE`, over an inner comm that agrees to `track_landed`, which
//! the comm asks only with the knob on: tracking costs the inner comm every piece), a contiguous
//! device receive longer than a part that is posted while the comm has no other request is copied
//! out in parts as its landed prefix grows: `advance` queues a copy for every whole part below the
//! prefix, and the rest once the inner receive completed; the request is done when that last copy
//! finished (copies on the slot's stream finish in order, so the slot's event covers all of them).
//! Only such a receive: with requests behind it the copy of each already overlaps the arrival of
//! the next, and parts would only cost the copy engine time, as for sends. A receive of several
//! segments is scattered whole once it completed (by the segment kernel or a copy per segment).

use std::collections::VecDeque;

use super::counts;
use super::regions::{Route, Staging};
use super::setup::{Setup, StickyFailure};
use crate::error::{Error, Result};
use crate::trace::{StageMark as Mark, StagedChunk as ChunkTrace, StagedComm as CommTracer, clock_ns};
use crate::transport::{IoSeg, MemKind, MrHandle, RecvComm, RequestId};

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
    slot: Option<usize>,
    stage: Stage,
    trace: Option<ChunkTrace>,
    /// Bytes per part of its copy out of the slot, queued as its landed prefix grows; 0: one copy
    /// once the inner receive completed.
    part: usize,
    /// Leading bytes whose copy out of the slot is queued.
    issued: usize,
}

pub struct StagedRecvComm {
    // Declared first so it drops first: its I/O stops writing slots before the ring goes.
    inner: Box<dyn RecvComm>,
    /// Bytes per part of a pipelined copy out; 0: receives are copied out whole (the knob is off,
    /// or the inner comm reports no landed bytes).
    part: usize,
    /// This comm's receives copied out in parts whose inner receive has not completed.
    watched: usize,
    staging: Staging,
    /// Requests not yet reported done, oldest first.
    queue: VecDeque<Request>,
    posted: u64,
    tested: u64,
    consumed: u64,
    /// Copies queued and not yet seen finished.
    copying: usize,
    failure: StickyFailure,
    tracer: Option<CommTracer>,
}

impl StagedRecvComm {
    pub(crate) fn new(mut inner: Box<dyn RecvComm>, setup: Setup) -> StagedRecvComm {
        let part = setup.params.pipeline();
        let part = if part > 0 && inner.track_landed() { part } else { 0 };
        let mut comm = StagedRecvComm {
            inner,
            part,
            watched: 0,
            tracer: CommTracer::new(false),
            staging: Staging::new(setup),
            queue: VecDeque::new(),
            posted: 0,
            tested: 0,
            consumed: 0,
            copying: 0,
            failure: StickyFailure::default(),
        };
        comm.staging.prepare(&mut comm.inner);
        comm
    }

    fn post(&mut self, route: Route, iov: &[IoSeg]) -> Result<Option<RequestId>> {
        let (addr, len) = (iov[0].addr, iov.iter().map(|s| s.len).sum());
        let (target, mr, slot) = match route {
            Route::Direct(mr) => (addr, mr, None),
            Route::Staged(_) => {
                let ring = self.staging.ring_mut()?;
                let Some(slot) = ring.peek() else { return Ok(None) };
                (ring.slot_ptr(slot) as usize, self.staging.ring_mr, Some(slot))
            }
        };
        let posted = match slot {
            // SAFETY: host segments are the caller's until this request is done (irecvv's contract).
            None if iov.len() > 1 => unsafe { self.inner.irecvv(iov, mr)? },
            // SAFETY: a host destination is the caller's until this request is done (irecv's
            // contract); a slot is ours until the copy out of it finished.
            _ => unsafe { self.inner.irecv(target as *mut u8, len, mr)? },
        };
        let Some(inner) = posted else { return Ok(None) };
        let segs = (slot.is_some() && iov.len() > 1).then(|| iov.to_vec());
        if let Route::Staged(device) = route {
            self.staging.ring_mut()?.take_for(device)?;
        }
        // Alone: no earlier receive of this comm is outstanding, whose arrival or copy would
        // overlap this one's copy anyway.
        let part = if slot.is_some() && segs.is_none() && self.part > 0 && len > self.part && self.queue.is_empty() {
            self.watched += 1;
            self.staging.setup.watched_changed(true, 1);
            self.part
        } else {
            0
        };
        let trace = self.tracer.as_mut().map(|t| t.posted(len, slot.is_some()));
        if let Some(trace) = &trace {
            trace.mark(Mark::Handed);
        }
        self.queue.push_back(Request {
            addr,
            len,
            segs,
            slot,
            stage: Stage::Receiving { inner },
            trace,
            part,
            issued: 0,
        });
        let id = RequestId(self.posted);
        self.posted += 1;
        Ok(Some(id))
    }

    /// Completes inner receives in order and starts the copies out of their slots; copies out
    /// the landed parts of a receive copied in parts meanwhile.
    fn advance(&mut self) -> Result<()> {
        for i in 0..self.queue.len() {
            let Stage::Receiving { inner } = self.queue[i].stage else { continue };
            match self.inner.test(inner)? {
                Some(size) => self.received(i, inner, size)?,
                None => {
                    if self.queue[i].part > 0 {
                        let landed = self.inner.landed(inner)?;
                        self.copy_out_parts(i, landed)?;
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Queues the copy out of `[req.issued, req.issued + len)` of request `i`'s slot, the whole
    /// receive when `whole`; counts the request's first copy as one in flight.
    fn copy_out(&mut self, i: usize, len: usize, whole: bool) -> Result<()> {
        let req = &mut self.queue[i];
        let slot = req.slot.ok_or_else(|| Error::backend("copying out a receive without a slot"))?;
        let started = req.trace.as_ref().map(|_| clock_ns());
        let ring = self.staging.ring.as_mut().ok_or_else(|| Error::backend("staging ring missing"))?;
        match &req.segs {
            // SAFETY: the destination is exclusively ours until this request is reported done or
            // the comm dropped, and the drop waits for the copy; the range's bytes of the slot are
            // final (the inner receive completed, or they lie below its landed prefix).
            None if !whole => unsafe { ring.copy_out_range(slot, req.issued, req.addr + req.issued, len)? },
            // SAFETY: as above.
            None => unsafe { ring.copy_out(slot, req.addr, len)? },
            // SAFETY: as above, for every segment; `len` is at most their total.
            Some(segs) => unsafe { ring.scatter(slot, len, segs.iter().map(|s| (s.addr, s.len)))? },
        }
        let first = req.issued == 0;
        req.issued += len;
        if let (Some(trace), Some(started)) = (&mut req.trace, started) {
            trace.issued(started, 1);
            if first {
                trace.mark(Mark::CopyIssued);
            }
        }
        if first {
            self.copying += 1;
            self.staging.setup.copies_changed(true, 1);
        }
        Ok(())
    }

    /// Queues the copies out of every whole part of request `i` below `landed` bytes.
    fn copy_out_parts(&mut self, i: usize, landed: usize) -> Result<()> {
        let (part, len) = (self.queue[i].part, self.queue[i].len);
        if self.queue[i].issued == 0 && part <= landed.min(len) {
            counts::received_in_parts();
        }
        while self.queue[i].issued + part <= landed.min(len) {
            self.copy_out(i, part, false)?;
        }
        Ok(())
    }

    /// Inner receive `inner` of request `i` completed with `size` bytes: the rest of its copy out
    /// is queued (all of it, unless copied in parts).
    fn received(&mut self, i: usize, inner: RequestId, size: usize) -> Result<()> {
        self.inner.irecv_consumed(inner)?;
        let req = &mut self.queue[i];
        if let Some(trace) = &mut req.trace {
            trace.mark(Mark::InnerDone);
        }
        if size > req.len {
            return Err(Error::backend(format!("{size} bytes arrived for a {}-byte receive", req.len)));
        }
        if req.issued > size {
            return Err(Error::backend(format!("{} bytes landed of a {size}-byte message", req.issued)));
        }
        if req.part > 0 {
            self.watched -= 1;
            self.staging.setup.watched_changed(false, 1);
        }
        let (slot, issued, whole) = (req.slot, req.issued, req.part == 0);
        if slot.is_some() && size > issued {
            self.copy_out(i, size - issued, whole)?;
        }
        let copied = slot.is_some() && size > 0;
        self.queue[i].stage = if copied { Stage::Copying { size } } else { Stage::Landed { size } };
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
        if let (Some(tracer), Some(trace)) = (&mut self.tracer, done.trace) {
            if done.slot.is_some() {
                trace.mark(Mark::CopySeen);
            }
            tracer.reported(trace);
        }
        if done.slot.is_some() {
            self.staging.ring_mut()?.give_back();
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
        // SAFETY: per the contract.
        unsafe { self.irecvv(&[IoSeg { addr: data as usize, len }], mr) }
    }

    /// A device request lands in its slot and is scattered out of it (by the segment kernel when
    /// its segments are many and small, else with one copy per segment); a host one goes to the
    /// inner comm as it is.
    unsafe fn irecvv(&mut self, iov: &[IoSeg], mr: MrHandle) -> Result<Option<RequestId>> {
        self.failure.check()?;
        if (self.posted - self.consumed) as usize >= self.staging.setup.max_requests {
            return Ok(None);
        }
        let route = self.staging.route_segments(&mut self.inner, mr, iov)?;
        let entered = self.tracer.as_mut().map(|t| t.enter(false));
        let posted = self.post(route, iov);
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
        self.staging.setup.watched_changed(false, self.watched);
        let idle = self.queue.is_empty();
        self.staging.release_ring_registration(&mut self.inner, idle);
    }
}
