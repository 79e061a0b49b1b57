//! What callers do with a connection: post transfers, poll and wait for them, notify, close is in
//! `mod.rs`. Posting checks the caller's buffers, reads small payloads before taking the lock,
//! registers the parts with the state machine under it and sends the requests after releasing it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as IdMap;

use super::flow_trace::{trace_direct, trace_requests};
use super::reader;
use super::state::{
    Action, ConnState, IpcOffer, MAX_INLINE_ONE_SIDED, Memory, OneSidedItem, OneSidedRequest, SendItem, VectorRequest,
    VectorRuns,
};
use super::turn::{Batch, InTurn, Take};
use super::vector::{self, Grouper, Push, Run, RunKey};

use super::{Connection, Held, Inner, OneSided};
use crate::engine::locality::Locality;
use crate::engine::path::{self, Path};
use crate::engine::plan::Extent;
use crate::engine::region::{Region, check_range};
use crate::engine::same_host::device_copy::DevicePath;
use crate::engine::same_host::local_copy::LocalCopy;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{
    Capability, Control, FifoItem, IPC_HANDLE_LEN, MAX_INLINE_SEND_BACKLOG, Place, RemoteSeg, VectorRun,
};
use crate::trace::{self, SeenBy as Seer, clock_ns};
use crate::transport::{IoSeg, MemKind};

/// How long a caller waiting on its chunks parks before it looks again unwoken (a safety net: a
/// completion or the transfer's end unparks it).
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// How often `wait_within` polls a connection with same-host device copies outstanding.
const DEVICE_POLL_SLICE: Duration = Duration::from_millis(1);
/// How long `wait_within` polls same-host device copies (yielding the CPU between looks) before it
/// parks: copies that end within it are seen at once instead of after a wake-up, which is most of
/// a short copy's time. UCCL's benchmark_uccl.py over the Python package, one H100, two rounds:
/// 256 KiB 11.6 against 9.6-10.0 GB/s, 16 MiB 506-541 against 451-473. Not for host memory, whose
/// copies run on the library's threads: there the polling caller took their cores (1 MiB 1.7-9.6
/// against 8.6-11.0 GB/s).
const WAIT_SPIN: Duration = Duration::from_micros(50);

impl Connection {
    /// UCCL's start_listener: control messages are always served here; this only records the call so
    /// that a second call without a `stop_listener` between is reported like UCCL does.
    pub fn start_listener(&self) -> Result<()> {
        self.inner.lock().state.check_open()?;
        if self.listener_started.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                UcclStatus::ErrRepostActive,
                "the listener of this connection is already started (stop_listener first to restart it)",
            ));
        }
        Ok(())
    }

    /// UCCL's stop_listener, which lets a later start_listener succeed again. It stops nothing that
    /// moves data: the connection keeps serving its peer's control messages, transfers and
    /// notifications (UCCL's own engine also keeps those going, on its other channels), and the
    /// engine's listener and accept loop are untouched, so its metadata still reaches it. Stopping a
    /// listener that is not started, or on a closed connection, is not an error, as in UCCL.
    pub fn stop_listener(&self) {
        self.listener_started.store(false, Ordering::Release);
    }

    pub fn write(&self, ops: &[OneSided]) -> Result<u64> {
        self.traced_return(self.one_sided(ops, true))
    }

    pub fn read(&self, ops: &[OneSided]) -> Result<u64> {
        self.traced_return(self.one_sided(ops, false))
    }

    /// Marks when a traced post call returned its transfer to the caller.
    pub(super) fn traced_return(&self, posted: Result<u64>) -> Result<u64> {
        if let Ok(transfer) = posted {
            trace::event!(FlowReturned { conn: self.trace.conn, side: self.trace.side, transfer });
        }
        posted
    }

    /// Checks every item and groups them into runs (`vector`) in one pass over the caller's list,
    /// which keeps nothing per item; only then are the runs' segment lists built, each straight
    /// into an allocation of its exact size. Between two engines of this process the requests are
    /// copied at once (`local_copy`); otherwise the payloads of small single writes are read
    /// (before the state lock: a device copy must not stall the control reactor and progress
    /// threads) and the requests go to the peer: several vector requests over the network one by
    /// one (`post_in_turn`), anything else together.
    fn one_sided(&self, ops: &[OneSided], write: bool) -> Result<u64> {
        // Refused here for every path alike: a same-host copy would otherwise make a transfer of
        // no parts, which never ends.
        if ops.is_empty() {
            return Err(Error::invalid("nothing to transfer: zero items"));
        }
        let verb = if write { "write" } else { "read" };
        let posted = trace::on(trace::DEVICE | trace::FLOW).then(clock_ns);
        let runs = self.check_items(ops, verb)?;
        self.post_runs(ops, &runs, write, posted, verb)
    }

    /// Posts a call's checked runs: the tail both list forms share (`one_sided`, `pieces.rs`).
    pub(super) fn post_runs(
        &self,
        ops: &(impl ItemList + ?Sized),
        runs: &[CheckedRun],
        write: bool,
        posted: Option<u64>,
        verb: &str,
    ) -> Result<u64> {
        let spans = path::spans_regions(self.link.locality, self.core.config.local_peers);
        let groups = vector::requests(runs, |r| (&r.run, (r.head.region.place(), r.head.remote_place)), spans);
        let is_vector = |g: &std::ops::Range<usize>| g.len() > 1 || runs[g.start].run.vector;
        if self.link.locality == Locality::Remote && groups.len() > 1 && groups.iter().all(is_vector) {
            return self.post_in_turn(ops, runs, &groups, write, posted);
        }
        let mut requests = Vec::new();
        for group in &groups {
            match &runs[group.clone()] {
                [run] => run.push_requests(ops, &mut requests),
                several => requests.push(vector(several, ops)),
            }
        }
        let local_host = requests.iter().all(|r| r.local_region().kind == MemKind::Host);
        let call = path::Call { locality: self.link.locality, local_peers: self.core.config.local_peers, local_host };
        for path in path::call_paths(call) {
            // Each same-host path declines (None) what it cannot carry; the connection takes the rest.
            let done = match path {
                Path::SameProcess => self.try_local_one_sided(&requests, write),
                Path::SameHostGpu => self.try_device_one_sided(&requests, write, posted),
                _ => break,
            };
            if let Some(done) = done {
                return done;
            }
        }
        if write {
            let mem = self.memory();
            let inline_max = path::inline_max(&self.core.config, self.link.locality);
            // The state keeps at most this many inline bytes unanswered and sends the rest as
            // requests, so a call of many items reads no more than that.
            let mut inline_left = MAX_INLINE_ONE_SIDED;
            for request in requests.iter_mut() {
                if let OneSidedRequest::Item(item) = request
                    && path::reads_payload(item.len, item.region.kind, inline_max, inline_left)
                {
                    inline_left -= item.len;
                    // SAFETY: the range was checked to lie in this live registration.
                    let payload = unsafe { mem.load(&item.region, item.addr, item.len as usize) };
                    item.payload = Some(payload.map_err(|e| e.context(verb))?);
                }
            }
        }
        self.post(requests.len(), write, posted, |st, transfer, out| st.post_one_sided(transfer, write, requests, out))
    }

    /// The checks of every item (its local range in a live registration, its capability, its
    /// remote range), and the runs the items form.
    fn check_items(&self, ops: &[OneSided], verb: &str) -> Result<Vec<CheckedRun>> {
        let mut grouper = Grouper::default();
        let mut open: Option<RunHead> = None;
        let mut runs = Vec::new();
        // Vectors name one region and one capability over and over: an item is checked against the
        // run's region first (the region table is locked about once a run), and a capability is
        // parsed again only when its bytes differ from the last one's.
        let mut last_cap: Option<([std::ffi::c_char; 28], Capability)> = None;
        // Items that hop between regions (blocks listed in any order) find each region here after
        // its first lookup, without the table's lock; as within a run, the region stays checked
        // for the rest of the call (a deregistration meanwhile is caught when the call is posted).
        let mut found: IdMap<u64, Arc<Region>> = IdMap::default();
        for (i, op) in ops.iter().enumerate() {
            let ctx = |e: Error| e.context(format!("{verb} item {i}"));
            let in_run = open.as_ref().is_some_and(|run| {
                run.region.id == op.mr && check_range(op.addr, op.len).is_ok() && run.region.contains(op.addr, op.len)
            });
            let looked_up = if in_run {
                None
            } else if let Some(region) =
                found.get(&op.mr).filter(|r| check_range(op.addr, op.len).is_ok() && r.contains(op.addr, op.len))
            {
                Some(region.clone())
            } else {
                let region = self.core.regions.local(op.mr, op.addr, op.len).map_err(ctx)?;
                self.channels_take(&region).map_err(ctx)?;
                found.insert(op.mr, region.clone());
                Some(region)
            };
            let cap = match last_cap {
                Some((padding, cap)) if padding == op.remote.padding => cap,
                _ => {
                    let cap = op.remote.capability().map_err(|e| ctx(Error::invalid(e.to_string())))?;
                    last_cap = Some((op.remote.padding, cap));
                    cap
                }
            };
            if op.remote.addr.checked_add(op.len as u64).is_none() {
                return Err(ctx(Error::invalid(format!(
                    "remote range {:#x} + {} bytes wraps around",
                    op.remote.addr, op.len
                ))));
            }
            if op.len as u64 > op.remote.size as u64 {
                return Err(ctx(Error::invalid(format!(
                    "{} bytes exceed the {} bytes the FifoItem grants",
                    op.len, op.remote.size
                ))));
            }
            let region_id =
                looked_up.as_ref().or(open.as_ref().map(|run| &run.region)).expect("an item has a region").id;
            let key = RunKey { local_region: region_id, remote_region: cap.region, token: cap.token };
            if let Push::Started(finished) = grouper.push(key, op.len as u64) {
                let region = looked_up.or_else(|| open.as_ref().map(|run| run.region.clone())).expect("checked above");
                let token = self.wire_token(cap.region, cap.token);
                let started = RunHead { region, remote_region: cap.region, remote_place: cap.place, token };
                if let (Some(head), Some(run)) = (open.replace(started), finished) {
                    runs.push(CheckedRun { head, run });
                }
            }
        }
        if let (Some(head), Some(run)) = (open, grouper.finish()) {
            runs.push(CheckedRun { head, run });
        }
        Ok(runs)
    }

    /// Posts a call of several vector requests over the network: the first as soon as its segment
    /// lists are built, so its bytes move while this thread builds the rest (posting 100,000 items
    /// as one batch held the first byte back for the whole pass, milliseconds on a transfer of a
    /// few more), the rest together once built (`turn`). Only the first request's chunks are
    /// posted by this thread. Every item was checked before, so bad input still fails the call with nothing
    /// sent. A failure once a request is out (the connection failing, a local region deregistered
    /// meanwhile) fails the transfer instead, whose id the caller gets: its earlier requests may
    /// still be moving the caller's bytes.
    fn post_in_turn(
        &self,
        ops: &(impl ItemList + ?Sized),
        runs: &[CheckedRun],
        groups: &[std::ops::Range<usize>],
        write: bool,
        entered: Option<u64>,
    ) -> Result<u64> {
        // Every group here is a vector: one request, one part.
        let parts = groups.len();
        let transfer = self.new_transfer(parts, write);
        if let Some(entered) = entered {
            trace::event!(FlowCall { conn: self.trace.conn, side: self.trace.side, transfer: transfer.id, entered });
        }
        let mut turn = InTurn::new();
        for (i, group) in groups.iter().enumerate() {
            if turn.built(vector(&runs[group.clone()], ops), i + 1 == parts) == Take::Hold {
                continue;
            }
            let mut inner = self.inner.lock();
            let taken = turn.take();
            let post_chunks_here = taken.post_chunks_here();
            let Batch { requests: batch, first_part } = taken;
            let sent = first_part + batch.len();
            let mut registered = false;
            let posted = self
                .register_locked(&mut inner, &transfer, post_chunks_here, |st, transfer, out| {
                    st.post_one_sided(transfer, write, batch, out)?;
                    registered = true;
                    Ok(())
                })
                .and_then(|(msgs, behind)| {
                    drop(inner);
                    self.send_posted(&msgs, behind)
                });
            if let Err(e) = posted {
                if first_part == 0 {
                    self.discard(transfer.id, &e);
                    return Err(e);
                }
                // Requests that were registered are failed with the connection; the ones never
                // posted are failed here.
                let unposted = if registered { sent } else { first_part };
                for _ in unposted..parts {
                    transfer.finish_part(Err(e.clone()));
                }
                return Ok(transfer.id);
            }
        }
        Ok(transfer.id)
    }

    /// Each `(mr, addr, len)` is one message, matched by one receive the peer posts.
    pub fn send(&self, msgs: &[(u64, usize, usize)]) -> Result<u64> {
        let mem = self.memory();
        let inline_max = path::inline_max(&self.core.config, self.link.locality);
        // The state sends at most this many bytes of unanswered messages inline and announces the
        // rest, so a call of many messages copies no more than that.
        let mut inline_left = MAX_INLINE_SEND_BACKLOG;
        let mut items = Vec::with_capacity(msgs.len());
        for (i, &(mr, addr, len)) in msgs.iter().enumerate() {
            let region = self.core.regions.local(mr, addr, len).map_err(|e| e.context(format!("send item {i}")))?;
            self.channels_take(&region).map_err(|e| e.context(format!("send item {i}")))?;
            // Up to the engine's inline bound, as one-sided transfers: on a small host an eager
            // message's hops (a helper at each end, the Done) cost more than an inline one's copies
            // (one at each end, two more where it arrives before its receive).
            let ipc = self.ipc_offer(&region, addr, len);
            let payload = if ipc.is_none() && path::reads_payload(len as u64, region.kind, inline_max, inline_left) {
                inline_left -= len as u64;
                // SAFETY: `regions.local` checked that the range lies in a live registration.
                Some(unsafe { mem.load(&region, addr, len) }.map_err(|e| e.context(format!("send item {i}")))?)
            } else {
                None
            };
            items.push(SendItem { region, addr, len: len as u64, payload, ipc });
        }
        self.post(msgs.len(), true, None, |st, transfer, out| st.post_send(transfer, items, out))
    }

    /// How the message of `len` bytes at `addr` of `region` is offered for the receiver to copy
    /// out itself, when its path is that one (`path::message_path`): over CUDA IPC to another
    /// process, by address to an engine of this process (which checks the range against our
    /// registration; no handle, the allocation named being the message's own range).
    fn ipc_offer(&self, region: &Region, addr: usize, len: usize) -> Option<IpcOffer> {
        let (locality, local_peers) = (self.link.locality, self.core.config.local_peers);
        // The handle is made only where it could be used: it opens the allocation to the host.
        let maybe = locality == Locality::SameHost && matches!(region.kind, MemKind::Cuda { .. });
        let export = maybe.then(|| region.ipc_export()).flatten();
        let message = path::Message { locality, local_peers, kind: region.kind, ipc_handle: export.is_some() };
        if path::message_path(message) != Path::SameHostGpu {
            return None;
        }
        let (handle, alloc_base, alloc_len) = match export {
            Some(e) => (e.handle, e.base, e.len),
            None => ([0; IPC_HANDLE_LEN], addr as u64, len as u64),
        };
        Some(IpcOffer { region: region.id, handle, alloc_base, alloc_len })
    }

    /// Posts a receive of up to `max` bytes at `addr`, which must start inside region `mr`; only
    /// the message that arrives must fit the region (see `Regions::receive`).
    pub fn recv(&self, mr: u64, addr: usize, max: usize) -> Result<u64> {
        let region = self.core.regions.receive(mr, addr, max)?;
        self.channels_take(&region)?;
        let mem = self.memory();
        self.post(1, false, None, |st, transfer, out| st.post_recv(transfer, region, addr, max as u64, &mem, out))
    }

    /// Creates the transfer and registers its parts under the state lock, then sends the resulting
    /// control messages after releasing it: the reply can come back before the send call returns,
    /// and the reader must not find the lock held by a thread still inside that call. A post that
    /// started flows (writes, whose chunks follow their requests at once, or go first up to
    /// `Config::early_chunk_bytes`) sends under the lock
    /// instead, since the peer numbers flows in their messages' order; their replies come only
    /// after the chunks, which move once the lock is released. A failure before anything reached
    /// the wire forgets the id again. `entered`: when the caller's call began, if a trace wants it.
    fn post(
        &self,
        parts: usize,
        out: bool,
        entered: Option<u64>,
        post: impl FnOnce(&mut ConnState, &Arc<Transfer>, &mut Vec<Action>) -> Result<()>,
    ) -> Result<u64> {
        if parts == 0 {
            return Err(Error::invalid("nothing to transfer: zero items"));
        }
        let posted = trace::on(trace::HOST).then(clock_ns);
        let transfer = self.new_transfer(parts, out);
        let (conn, side) = (self.trace.conn, self.trace.side);
        trace::event!(FlowCall { conn, side, transfer: transfer.id, entered: entered.unwrap_or_else(clock_ns) });
        let sent = self.register_parts(&transfer, post).and_then(|(msgs, hand_over)| {
            if let Some(at) = posted {
                trace_direct(self.trace, transfer.id, &msgs, at);
            }
            self.send_posted(&msgs, hand_over)
        });
        if let Err(e) = sent {
            self.discard(transfer.id, &e);
            return Err(e);
        }
        Ok(transfer.id)
    }

    /// Forgets `transfer`, whose post failed before anything of it reached the wire.
    fn discard(&self, transfer: u64, why: &Error) {
        self.core.transfers.discard(transfer, why);
        trace::event!(FlowDiscarded { conn: self.trace.conn, side: self.trace.side, transfer });
    }

    /// Sends the messages `register_parts` returned; failing to queue them fails the connection.
    /// `behind`: the connection had inline transfers unanswered when they were posted, so the
    /// caller is pipelining and its next post (a device copy) overlaps a payload's socket write
    /// (`send_pipelined`).
    fn send_posted(&self, msgs: &[Control], behind: bool) -> Result<()> {
        self.send_pipelined(msgs, behind).inspect_err(|e| self.fail(&mut self.inner.lock(), e.clone()))
    }

    /// `post`'s part under the lock: the state registers the parts (or refuses before registering
    /// any), parts that finished at once (a receive matched an inline send) are finished, and the
    /// control messages are returned for sending, unless flows were started: then everything is
    /// carried out here, in order, and this thread posts their first chunks.
    fn register_parts(
        &self,
        transfer: &Arc<Transfer>,
        post: impl FnOnce(&mut ConnState, &Arc<Transfer>, &mut Vec<Action>) -> Result<()>,
    ) -> Result<(Vec<Control>, bool)> {
        self.register_locked(&mut self.inner.lock(), transfer, true, post)
    }

    /// `register_parts` under a lock the caller holds; `post_chunks`: whether this thread posts the
    /// first chunks of the flows it starts, or leaves them to the progress thread (which their
    /// queueing wakes). Returned with the messages: whether inline transfers were unanswered
    /// before this post (`send_posted`'s `behind`).
    fn register_locked(
        &self,
        inner: &mut Inner,
        transfer: &Arc<Transfer>,
        post_chunks: bool,
        post: impl FnOnce(&mut ConnState, &Arc<Transfer>, &mut Vec<Action>) -> Result<()>,
    ) -> Result<(Vec<Control>, bool)> {
        let behind = inner.state.inline_unanswered();
        inner.state.begin_post(Instant::now())?;
        let mut out = Vec::new();
        post(&mut inner.state, transfer, &mut out)?;
        if trace::on(trace::FLOW) {
            trace_requests(self.trace, transfer.id, &out, inner.state.chunking());
        }
        if out.iter().any(|a| matches!(a, Action::Queue(_))) {
            // A short write's chunks go to the channels before the requests that announce them
            // are written.
            let mut held = Held::default();
            if let Err(e) = self.apply_held(inner, out, &mut held).and_then(|()| held.send_unless_chunks_first(self)) {
                self.fail(inner, e.clone());
                return Err(e);
            }
            if post_chunks {
                self.pass_if_queued(inner);
            }
            if inner.state.failure().is_some() {
                // The pass failed the connection, and with it the parts registered here.
                return Ok((Vec::new(), behind));
            }
            if let Err(e) = self.release(inner, held) {
                self.fail(inner, e.clone());
                return Err(e);
            }
            return Ok((Vec::new(), behind));
        }
        let mut msgs = Vec::new();
        let mut rest = Vec::new();
        for action in out {
            match action {
                Action::Send(msg) => msgs.push(msg),
                other => rest.push(other),
            }
        }
        if let Err(e) = self.apply(inner, rest) {
            // Parts already registered are failed (and their ids forgotten) with the connection.
            self.fail(inner, e.clone());
            return Err(e);
        }
        Ok((msgs, behind))
    }

    /// Stops tracking `transfer` for the caller, who will not poll it again (see
    /// `TransferTable::forget`); a transfer of another connection, or unknown, is an error.
    pub fn forget(&self, transfer: u64) -> Result<()> {
        if self.core.transfers.forget(self.id, transfer) {
            Ok(())
        } else {
            Err(Error::not_found(format!("transfer id {transfer} is unknown on this connection")))
        }
    }

    /// Also finishes device copies of the same-host path whose event fired, so that a caller
    /// polling for one learns of it without waiting for the progress thread's next pass.
    /// And runs the copy of a read of ours that the target granted, if the connection's worker has
    /// not taken it up yet: a caller polling for its read copies it rather than waiting for the
    /// worker's wake-up (the poll then returns after the copy).
    pub fn poll(&self, transfer: u64) -> Result<Option<u64>> {
        self.same_host.host.run_waiting(transfer);
        if self.same_host.device_copies() {
            let mut inner = self.inner.lock();
            if let Err(e) = self.drive_device_copies(&mut inner.ipc, Seer::Poll) {
                self.fail(&mut inner, e);
            }
        }
        let polled = self.core.transfers.poll(self.id, transfer);
        if !matches!(polled, Ok(None)) {
            trace::event!(CallDone { conn: self.trace.conn, side: self.trace.side, transfer });
        }
        polled
    }

    /// How many times this connection asked a same-host owner for a grant (one round trip and,
    /// granted, a mapping each): tells tests what a transfer set up on its way.
    pub fn ipc_asks(&self) -> u64 {
        self.inner.lock().ipc.asked()
    }

    /// Sets up now what a first write or read into the peer's `remote` would set up on its way:
    /// between processes of one host, the owner's grant for the capability and the mapping of its
    /// GPU allocation (one round trip and `cuIpcOpenMemHandle`, hundreds of microseconds to
    /// milliseconds, once per region and allocation). Whether a mapping now serves `remote`; false
    /// where no transfer would map anything (a peer on another host or in this process, memory
    /// without a CUDA IPC handle, an engine without a GPU), which is not an error. A capability
    /// the owner refuses fails here as its transfers would. Blocks for the owner's answer.
    pub fn prepare(&self, remote: &FifoItem) -> Result<bool> {
        self.inner.lock().state.check_open()?;
        self.prepare_device(remote)
    }

    /// How many batches of device copies this connection issued on the same-host GPU path (one per
    /// call that took it): tells tests and benchmarks which path their transfers took.
    pub fn device_copy_batches(&self) -> u64 {
        self.inner.lock().ipc.issued()
    }

    /// Of those, the batches of many small copies on one GPU that its kernel moved.
    pub fn device_copy_kernel_batches(&self) -> u64 {
        self.inner.lock().ipc.issued_by_kernel()
    }

    /// Our two-sided messages the peer copied out over CUDA IPC (its Done ended them, no chunk
    /// went over the channels): tells tests and benchmarks which path our sends took.
    pub fn sends_copied_by_peer(&self) -> u64 {
        self.inner.lock().state.sends_copied()
    }

    /// Of those, the batches that copied a peer's two-sided message offered over CUDA IPC into a
    /// receive of ours (one per message): tells tests and benchmarks that its bytes took no socket.
    pub fn device_recv_batches(&self) -> u64 {
        self.inner.lock().ipc.issued_recvs()
    }

    /// A transfer that completes on the control stream (inline items, and writes over the channels,
    /// which end with the peer's Done) is read for by the caller itself, one of the same-host GPU
    /// path waits on its copies' events itself: either way the caller learns of it without a hop
    /// through another thread.
    pub fn wait(&self, transfer: u64) -> Result<u64> {
        let t = self.core.transfers.get(self.id, transfer)?;
        if t.completes_on_control() {
            let _copies_here = self.same_host.host.caller_waits();
            reader::read_until_finished(self, &t);
        } else if self.same_host.device_copies() {
            self.wait_device_copies(transfer);
        } else if self.core.config.caller_completes && t.ends_on_chunks() {
            self.wait_on_chunks(&t, None);
        }
        let waited = self.core.transfers.wait(self.id, transfer);
        trace::event!(CallDone { conn: self.trace.conn, side: self.trace.side, transfer });
        waited
    }

    /// `wait`, giving up after `limit`: `Ok(None)` while the transfer is still in progress then
    /// (the id stays valid). The engine's threads finish every transfer without the caller's help,
    /// so the caller reads its answer itself (one that completes on the control stream) or tests
    /// its chunks itself (one that ends on them) only until the limit, polls (which runs this
    /// transfer's waiting copies, as `poll` does) and sleeps until the transfer's end wakes it; a
    /// caller that must stay responsive (to a signal) waits in such slices. Same-host GPU copies
    /// of the transfer in flight are waited for on their events, as `wait` does, even past the
    /// limit (a copy's own time at most): polled every slice instead, a 64 MiB write ended about
    /// 0.7 ms after its copy (the Python package waits in 50 ms slices).
    pub fn wait_within(&self, transfer: u64, limit: Duration) -> Result<Option<u64>> {
        let start = Instant::now();
        let t = self.core.transfers.get(self.id, transfer)?;
        let deadline = start + limit;
        if t.completes_on_control() {
            let _copies_here = self.same_host.host.caller_waits();
            reader::read_until(self, &t, deadline);
        } else if !self.same_host.device_copies() && self.core.config.caller_completes && t.ends_on_chunks() {
            self.wait_on_chunks(&t, Some(deadline));
        }
        drop(t);
        let spin = if self.same_host.device_copies() { WAIT_SPIN.min(limit) } else { Duration::ZERO };
        let spin_until = start + spin;
        loop {
            if let Some(bytes) = self.poll(transfer)? {
                return Ok(Some(bytes));
            }
            if self.same_host.device_copies() && self.wait_device_copies(transfer) {
                continue;
            }
            let now = Instant::now();
            if now < spin_until {
                std::thread::yield_now();
                continue;
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(None);
            }
            // Copies of the same-host GPU path finish when a poll sees their event, so those are
            // looked at every millisecond; anything else wakes the parked caller when it ends.
            let slice = if self.same_host.device_copies() { DEVICE_POLL_SLICE.min(left) } else { left };
            self.core.transfers.get(self.id, transfer)?.park_until_finished(slice);
        }
    }

    /// A transfer that ends on its own chunks (reads over the channels) is finished by whoever
    /// tests its last one: the caller, woken by the transport's completion in the progress
    /// thread's place (`Waker::io_done`), tests its connection itself, so that completion wakes it
    /// once where the progress thread's wake-up and then its hand-over to the caller cost two.
    /// Should the progress thread get there first, finishing the transfer unparks the caller. Until
    /// `deadline` if one is given (`wait_within`).
    fn wait_on_chunks(&self, t: &Transfer, deadline: Option<Instant>) {
        let counted = self.core.waker.waiting_caller();
        while !t.is_finished() {
            self.pass_here(&mut self.inner.lock(), usize::MAX);
            if t.is_finished() {
                break;
            }
            let slice = match deadline.map(|end| end.saturating_duration_since(Instant::now())) {
                None => WAIT_SLICE,
                Some(left) if left.is_zero() => break,
                Some(left) => left.min(WAIT_SLICE),
            };
            counted.looked();
            // A park cut short by the caller's own limit is not a wake-up that went missing.
            if t.park_until_finished(slice) && slice == WAIT_SLICE {
                t.slice_ran_out();
            }
        }
        // Dropping `counted` wakes the progress thread for whatever else completed.
    }

    pub fn notify(&self, name: &[u8], msg: &[u8]) -> Result<()> {
        if name.len() > crate::proto::MAX_NAME_LEN || name.contains(&0) {
            return Err(Error::invalid(format!(
                "notification name must be at most {} bytes without NUL",
                crate::proto::MAX_NAME_LEN
            )));
        }
        if msg.len() > crate::proto::MAX_NOTIFY_MSG_LEN {
            return Err(Error::invalid(format!(
                "notification message of {} bytes exceeds {} bytes",
                msg.len(),
                crate::proto::MAX_NOTIFY_MSG_LEN
            )));
        }
        self.inner.lock().state.check_open()?;
        self.writer.send(&Control::Notify { name: name.to_vec(), msg: msg.to_vec() })
    }
}

/// A call's items as either list form gives them (`OneSided` items, or pieces of runs): item `i`'s
/// local buffer and the peer address it meets.
pub(super) trait ItemList {
    fn local(&self, i: usize) -> IoSeg;
    fn remote_addr(&self, i: usize) -> u64;
}

impl ItemList for [OneSided] {
    fn local(&self, i: usize) -> IoSeg {
        IoSeg { addr: self[i].addr, len: self[i].len }
    }

    fn remote_addr(&self, i: usize) -> u64 {
        self[i].remote.addr
    }
}

/// What the items of a run share, known from its first item.
pub(super) struct RunHead {
    pub region: Arc<Region>,
    pub remote_region: u64,
    /// Where the remote region's memory lies, as its capability says.
    pub remote_place: Place,
    /// The capability's token as this connection's requests carry it.
    pub token: u64,
}

/// A run of a call's items, every one checked.
pub(super) struct CheckedRun {
    pub head: RunHead,
    pub run: Run,
}

impl CheckedRun {
    /// Adds the run's requests to `out`: one vector, or one request per item.
    fn push_requests(&self, ops: &(impl ItemList + ?Sized), out: &mut Vec<OneSidedRequest>) {
        let RunHead { region, remote_region, token, .. } = &self.head;
        let (remote_region, token) = (*remote_region, *token);
        if self.run.vector {
            out.push(vector(std::slice::from_ref(self), ops));
            return;
        }
        out.extend(self.run.items.clone().map(|i| {
            let local = ops.local(i);
            OneSidedRequest::Item(OneSidedItem {
                region: region.clone(),
                addr: local.addr,
                len: local.len as u64,
                remote_region,
                token,
                remote_addr: ops.remote_addr(i),
                payload: None,
            })
        }));
    }
}

/// Consecutive runs of a call as one vector request: one request, one flow; over several regions
/// its chunks cross from one region into the next (`plan.rs`). The segment lists are collected from exact-size iterators, each into
/// one allocation of its final size.
fn vector(runs: &[CheckedRun], ops: &(impl ItemList + ?Sized)) -> OneSidedRequest {
    let items = runs[0].run.items.start..runs[runs.len() - 1].run.items.end;
    let pieces = items.clone().map(|i| ops.local(i));
    let local = match runs {
        [_] => Extent::scattered(pieces),
        _ => Extent::scattered_runs(pieces, runs.iter().map(|r| r.run.items.len()).collect()),
    };
    // Each length was checked against the u32 size of its FifoItem.
    let segs = items.map(|i| RemoteSeg { addr: ops.remote_addr(i), len: ops.local(i).len as u32 }).collect();
    let several = (runs.len() > 1).then(|| {
        let remote = runs
            .iter()
            .map(|r| VectorRun { region: r.head.remote_region, token: r.head.token, segs: r.run.items.len() as u32 })
            .collect();
        Box::new(VectorRuns { local: runs.iter().map(|r| r.head.region.clone()).collect(), remote })
    });
    let first = &runs[0].head;
    OneSidedRequest::Vector(VectorRequest {
        region: first.region.clone(),
        local,
        remote_region: first.remote_region,
        token: first.token,
        segs,
        runs: several,
    })
}
