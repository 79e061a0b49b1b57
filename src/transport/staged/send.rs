//! Staged send comm: a device chunk is copied into a slot, and handed to the inner comm once the
//! copy finished; host chunks go straight to the inner comm. The inner comm sees every request in
//! posting order (its stream order is what the receiver matches), so a host chunk posted behind a
//! copying device chunk waits for it.

use std::collections::VecDeque;

use super::Setup;
use super::regions::{InnerRegistry, Route, Staging};
use crate::error::{Error, Result};
use crate::transport::{MemKind, MrHandle, RequestId, SendComm};

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Host data not yet handed to the inner comm.
    Waiting { addr: usize, mr: MrHandle },
    /// Device data being copied into `slot`.
    Copying { slot: usize },
    /// Handed to the inner comm as this request.
    Sent { inner: RequestId, slot: Option<usize> },
}

struct Request {
    len: usize,
    stage: Stage,
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
    failure: Option<Error>,
}

struct Inner<'a>(&'a mut dyn SendComm);

impl InnerRegistry for Inner<'_> {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.0.reg_mr(addr, len, kind)
    }
    fn deregister(&mut self, mr: MrHandle) {
        self.0.dereg_mr(mr)
    }
}

impl StagedSendComm {
    pub(crate) fn new(inner: Box<dyn SendComm>, setup: Setup) -> StagedSendComm {
        StagedSendComm {
            inner,
            staging: Staging::new(setup),
            queue: VecDeque::new(),
            posted: 0,
            unsent: 0,
            failure: None,
        }
    }

    fn healthy(&self) -> Result<()> {
        self.failure.clone().map_or(Ok(()), Err)
    }

    /// Failures past argument checks leave requests half done: the comm stays failed.
    fn sticky<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.failure.get_or_insert_with(|| e.clone());
        }
        result
    }

    /// Hands requests to the inner comm in order while their data is ready and it has room.
    fn advance(&mut self) -> Result<()> {
        while self.unsent < self.queue.len() {
            let req = &self.queue[self.unsent];
            let (addr, mr, slot) = match req.stage {
                Stage::Waiting { addr, mr } => (addr, mr, None),
                Stage::Copying { slot } => {
                    let ring = self.staging.ring_mut()?;
                    if !ring.copied(slot)? {
                        break;
                    }
                    (ring.slot_ptr(slot) as usize, self.staging.ring_mr, Some(slot))
                }
                Stage::Sent { .. } => {
                    self.unsent += 1;
                    continue;
                }
            };
            // SAFETY: host data stays valid until this request is reported done (the caller's
            // isend contract); a slot stays ours until then too.
            let Some(inner) = (unsafe { self.inner.isend(addr as *const u8, req.len, mr)? }) else { break };
            self.queue[self.unsent].stage = Stage::Sent { inner, slot };
            self.unsent += 1;
        }
        Ok(())
    }

    fn post(&mut self, route: Route, addr: usize, len: usize) -> Result<Option<RequestId>> {
        let stage = match route {
            Route::Direct(mr) => Stage::Waiting { addr, mr },
            Route::Staged => {
                let ring = self.staging.ring_mut()?;
                let Some(slot) = ring.take() else { return Ok(None) };
                // SAFETY: the device source stays valid until the request is reported done or the
                // comm dropped (isend's contract), and the drop waits for the copy.
                unsafe { ring.copy_in(slot, addr, len)? };
                Stage::Copying { slot }
            }
        };
        self.queue.push_back(Request { len, stage });
        let id = RequestId(self.posted);
        self.posted += 1;
        self.advance()?;
        Ok(Some(id))
    }

    fn finish_oldest(&mut self) -> Result<Option<usize>> {
        self.advance()?;
        let Some(Request { stage: Stage::Sent { inner, slot }, .. }) = self.queue.front() else { return Ok(None) };
        let (inner, slot) = (*inner, *slot);
        let Some(size) = self.inner.test(inner)? else { return Ok(None) };
        self.queue.pop_front();
        self.unsent -= 1;
        if slot.is_some() {
            self.staging.ring_mut()?.give_back();
        }
        Ok(Some(size))
    }
}

impl SendComm for StagedSendComm {
    fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.staging.register(&mut Inner(&mut *self.inner), addr, len, kind)
    }

    fn dereg_mr(&mut self, mr: MrHandle) {
        self.staging.deregister(&mut Inner(&mut *self.inner), mr)
    }

    unsafe fn isend(&mut self, data: *const u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
        self.healthy()?;
        if self.queue.len() >= self.staging.setup.max_requests {
            return Ok(None);
        }
        let route = self.staging.route(&mut Inner(&mut *self.inner), mr, data as usize, len)?;
        if route == Route::Staged && self.staging.ring_mut()?.peek().is_none() {
            return Ok(None);
        }
        let posted = self.post(route, data as usize, len);
        self.sticky(posted)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.healthy()?;
        let oldest = self.posted - self.queue.len() as u64;
        if req.0 != oldest || self.queue.is_empty() {
            return Err(Error::backend(format!(
                "test of request {} out of order: the oldest untested request is {oldest}",
                req.0
            )));
        }
        let done = self.finish_oldest();
        self.sticky(done)
    }
}

impl Drop for StagedSendComm {
    fn drop(&mut self) {
        let idle = self.queue.is_empty();
        self.staging.release_ring_registration(&mut Inner(&mut *self.inner), idle);
    }
}
