//! What a connection keeps for the same-host GPU path, under its lock (see `device_copy.rs` for
//! the path itself).
//!
//! As the initiator: the owner's grants, by the region and token the requests present (each with
//! the windows the owner advertised and this process's mapping of its allocation), the asks in
//! flight, and the batches of copies in flight (one event each). As the owner: the regions this
//! connection granted, and the revocations sent for deregistered ones and not answered yet.
//!
//! The owner's deregistration revokes a grant and waits for the answer; the initiator answers once
//! no copy of its own into or out of the region is in flight. Copies that touch a region of this
//! process are also counted on the region itself (`Region::copy_started`), which is what a
//! deregistration in this process waits for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cuda::Gpu;
use crate::cuda::device_copy::CopyQueue;
use crate::cuda::ipc::Mapping;
use crate::cuda::stream::Event;
use crate::engine::region::Region;
use crate::engine::shared::Waker;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{IPC_HANDLE_LEN, RemoteSeg};
use crate::trace::{self, ConnTag, SeenBy as Seer};

/// Ask ids carry this bit, so that their Deny cannot be taken for one of the state machine's ops
/// (whose ids count up from 1).
pub(crate) const ASK_BIT: u64 = 1 << 63;

/// A grant's key: the owner's region and the token as this connection's requests present it.
pub(crate) type GrantKey = (u64, u64);

/// What the owner said about a region.
pub(crate) enum Grant {
    /// It has no IPC handle, or its allocation cannot be mapped here: requests for it take the
    /// network path.
    Unavailable,
    Granted {
        handle: [u8; IPC_HANDLE_LEN],
        /// The windows advertised for the region when it was granted, `(addr, len)`.
        windows: Vec<(u64, u64)>,
        alloc_base: u64,
        alloc_len: u64,
        /// None until an asking caller mapped the allocation (outside the lock).
        mapping: Option<Mapping>,
    },
}

/// The owner's answer to an ask.
pub(crate) enum Answer {
    Granted { handle: [u8; IPC_HANDLE_LEN], alloc_base: u64, alloc_len: u64 },
    Refused(Error),
}

struct Ask {
    key: GrantKey,
    answer: Option<Answer>,
}

/// Copies issued together for one call, marked by one event.
pub(crate) struct Batch {
    /// Shared with a caller waiting for the batch's transfer, who blocks on it outside the lock.
    pub event: Arc<Event>,
    /// Which of `queues` issued it.
    pub queue: usize,
    pub transfer: Arc<Transfer>,
    /// Bytes of each part the batch finishes.
    pub parts: Vec<u64>,
    /// Regions of this process it touches, each counted once by `copy_started`.
    pub regions: Vec<Arc<Region>>,
    /// The owner's regions it touches, on another process.
    pub remote_regions: Vec<u64>,
    /// Keeps the peers' allocations mapped until the copies finished.
    pub mappings: Vec<Mapping>,
    /// The peer's offered message the batch copies (`device_recv.rs`): answered with Done, or
    /// Deny, once the copies finished.
    pub answer: Option<u64>,
}

/// What a batch holds until its copies are over, besides its event: see [`Batch`].
pub(crate) struct Hold {
    pub transfer: Arc<Transfer>,
    pub parts: Vec<u64>,
    /// Counted by `IpcState::issue` before the first copy.
    pub regions: Vec<Arc<Region>>,
    /// Counted by the caller already; their counts end with the batch, or stay the caller's to
    /// end when nothing was queued.
    pub counted: Vec<Arc<Region>>,
    pub remote_regions: Vec<u64>,
    pub mappings: Vec<Mapping>,
    pub answer: Option<u64>,
}

/// Why `IpcState::issue` queued nothing.
pub(crate) enum NotIssued {
    /// The GPU's copy queue could not be made.
    NoQueue(Error),
    /// Queuing the copies failed (those queued before the failure were waited for).
    Failed(Error),
}

/// A peer's allocation mapped for its offered messages (IpcSend), by its region and the GPU that
/// maps it.
struct SentMap {
    handle: [u8; IPC_HANDLE_LEN],
    alloc_base: u64,
    alloc_len: u64,
    mapping: Mapping,
}

#[derive(Default)]
pub(crate) struct IpcState {
    grants: HashMap<GrantKey, Grant>,
    /// Counts changes of `grants`: coverage found under one hold of the connection's lock still
    /// holds under a later one if this did not move in between.
    generation: u64,
    asks: HashMap<u64, Ask>,
    /// Asks started since the connection started (each is one round trip to the owner).
    next_ask: u64,
    /// Grants a caller is asking for and mapping now: another caller needing one waits for that
    /// ask instead of sending its own (a transfer racing `prepare` on another thread).
    asking: HashSet<GrantKey>,
    batches: Vec<Batch>,
    /// The copy queues of the batches in flight (`Batch::queue` indexes it), taken from the
    /// process's idle queues at a first batch and given back once none is in flight
    /// (`CopyQueue::take`): an idle connection holds no stream.
    queues: HeldQueues,
    /// Batches through a GPU's kernel on queues given back.
    by_kernel: u64,
    /// Owner's regions revoked while batches used them: answered once those finished.
    revoking: HashSet<u64>,
    /// As the owner: regions granted on this connection.
    granted: HashSet<u64>,
    /// As the owner: revocations sent and not yet answered.
    revokes: HashSet<u64>,
    /// Batches in flight, readable without the connection lock (a caller's poll looks first).
    in_flight: Arc<AtomicUsize>,
    /// Batches issued since the connection started.
    issued: u64,
    /// As a receiver: the peer's allocations its offered messages were copied out of, mapped.
    sent_maps: HashMap<(u64, i32), SentMap>,
    /// Answers to offered messages whose batch finished, for the connection to send.
    answers: Vec<crate::proto::Control>,
    /// Of the batches issued, those that copied an offered message.
    issued_recvs: u64,
    /// Which connection's batches are seen finished, while the `device` trace runs.
    tracer: Option<ConnTag>,
}

/// A connection's copy queues, given back when it ends too (copies still queued on one only make
/// the next holder's wait behind them).
#[derive(Default)]
struct HeldQueues(Vec<CopyQueue>);

impl Drop for HeldQueues {
    fn drop(&mut self) {
        for queue in self.0.drain(..) {
            queue.give_back();
        }
    }
}

/// A grant whose allocation is mapped here.
pub(crate) struct MappedGrant<'a> {
    windows: &'a [(u64, u64)],
    alloc_base: u64,
    pub mapping: &'a Mapping,
}

impl MappedGrant<'_> {
    /// Whether the windows cover every one of `segs`: once it said so, under the connection's lock
    /// held on, each of them is mapped at its address plus [`offset`](Self::offset).
    pub fn covers(&self, segs: &[RemoteSeg]) -> bool {
        covers(self.windows, segs)
    }

    /// What turns an owner's address inside the windows into its mapped address here (wrapping
    /// arithmetic: the mapping may lie below the owner's allocation).
    pub fn offset(&self) -> u64 {
        self.mapping.ptr().wrapping_sub(self.alloc_base)
    }

    /// Whether every window's mapped range satisfies `reach` (a kernel's address limit).
    pub fn mapped_within(&self, reach: impl Fn(u64, u64) -> bool) -> bool {
        self.windows.iter().all(|&(base, len)| reach(base.wrapping_add(self.offset()), len))
    }
}

/// Whether `segs` all lie inside one of `windows`.
fn covers(windows: &[(u64, u64)], segs: &[RemoteSeg]) -> bool {
    segs.iter().all(|s| {
        windows.iter().any(|&(base, len)| s.addr >= base && s.addr.saturating_add(u64::from(s.len)) <= base + len)
    })
}

/// What a request's segments find in the grant table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Coverage {
    /// Granted, mapped, and inside the windows.
    Covered,
    /// The region has no IPC path.
    Unavailable,
    /// Nothing (or nothing that covers them) yet: ask.
    Missing,
}

impl IpcState {
    pub fn new(tracer: Option<ConnTag>) -> IpcState {
        IpcState { tracer, ..IpcState::default() }
    }

    pub fn coverage(&self, key: GrantKey, segs: &[RemoteSeg]) -> Coverage {
        match self.grants.get(&key) {
            Some(Grant::Unavailable) => Coverage::Unavailable,
            Some(Grant::Granted { windows, mapping: Some(_), .. }) if covers(windows, segs) => Coverage::Covered,
            _ => Coverage::Missing,
        }
    }

    /// The mapped grant for `key`, if any: looked up once for all of a request's pieces.
    pub fn mapped(&self, key: GrantKey) -> Option<MappedGrant<'_>> {
        match self.grants.get(&key) {
            Some(Grant::Granted { windows, alloc_base, mapping: Some(mapping), .. }) => {
                Some(MappedGrant { windows, alloc_base: *alloc_base, mapping })
            }
            _ => None,
        }
    }

    /// See `generation`.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn mark_unavailable(&mut self, key: GrantKey) {
        self.generation += 1;
        self.grants.insert(key, Grant::Unavailable);
    }

    /// Asks started since the connection started.
    pub fn asked(&self) -> u64 {
        self.next_ask
    }

    /// Whether a caller is asking for `key`'s grant (and mapping it) now.
    pub fn asking(&self, key: GrantKey) -> bool {
        self.asking.contains(&key)
    }

    /// A caller takes on asking for `key`'s grant; [`asked_for`](Self::asked_for) once it is done,
    /// whatever the outcome.
    pub fn ask_for(&mut self, key: GrantKey) {
        self.asking.insert(key);
    }

    /// The ask for `key`'s grant is over: callers waiting for it look at the grant table again.
    pub fn asked_for(&mut self, key: GrantKey) {
        self.asking.remove(&key);
    }

    /// Starts an ask for `key`; the caller sends the IpcRequest with this id.
    pub fn new_ask(&mut self, key: GrantKey) -> u64 {
        self.next_ask += 1;
        let id = ASK_BIT | self.next_ask;
        self.asks.insert(id, Ask { key, answer: None });
        id
    }

    /// The answer to ask `id` once it arrived (the ask is then over).
    pub fn take_answer(&mut self, id: u64) -> Option<Answer> {
        self.asks.get(&id)?.answer.as_ref()?;
        self.asks.remove(&id).and_then(|a| a.answer)
    }

    /// Gives up on ask `id` (its caller stopped waiting).
    pub fn forget_ask(&mut self, id: u64) {
        self.asks.remove(&id);
    }

    /// The owner's IpcGrant for ask `id`: recorded as a grant without a mapping yet. False for an
    /// ask nobody waits for any more (it is dropped).
    pub fn granted(
        &mut self,
        id: u64,
        region: u64,
        handle: [u8; IPC_HANDLE_LEN],
        alloc_base: u64,
        alloc_len: u64,
        windows: &[RemoteSeg],
    ) -> Result<bool> {
        let Some(ask) = self.asks.get_mut(&id) else { return Ok(false) };
        if ask.key.0 != region {
            return Err(Error::backend(format!(
                "protocol violation: IpcGrant for ask {id} names region {region}, region {} was asked for",
                ask.key.0
            )));
        }
        // Copies are aimed at `mapping + (addr - alloc_base)` for addresses the windows cover, and
        // the same-host kernel (unlike a driver copy) checks nothing: a window must lie inside the
        // allocation it was granted in.
        let alloc_end = alloc_base.checked_add(alloc_len);
        if let Some(w) = windows
            .iter()
            .find(|w| w.addr < alloc_base || alloc_end.is_none_or(|end| w.addr.saturating_add(u64::from(w.len)) > end))
        {
            return Err(Error::backend(format!(
                "protocol violation: IpcGrant for region {region} has window {:#x}+{} outside its allocation {alloc_base:#x}+{alloc_len}",
                w.addr, w.len
            )));
        }
        ask.answer = Some(Answer::Granted { handle, alloc_base, alloc_len });
        let key = ask.key;
        self.generation += 1;
        let windows: Vec<(u64, u64)> = windows.iter().map(|w| (w.addr, u64::from(w.len))).collect();
        // The same allocation granted again (an ask for a window advertised since, or two callers
        // asking at once): the mapping stays, the windows are the owner's latest.
        if let Some(Grant::Granted { handle: h, alloc_base: b, alloc_len: l, windows: w, .. }) =
            self.grants.get_mut(&key)
            && (*h, *b, *l) == (handle, alloc_base, alloc_len)
        {
            *w = windows;
            return Ok(true);
        }
        self.grants.insert(key, Grant::Granted { handle, windows, alloc_base, alloc_len, mapping: None });
        Ok(true)
    }

    /// The owner's Deny for ask `id`; false for an ask nobody waits for any more.
    pub fn refused(&mut self, id: u64, err: Error) -> bool {
        match self.asks.get_mut(&id) {
            Some(ask) => {
                ask.answer = Some(Answer::Refused(err));
                true
            }
            None => false,
        }
    }

    /// Attaches the mapping of `handle` to the grant of `key`, unless the grant was revoked, or
    /// replaced by another allocation's, meanwhile, or another caller attached one already. A
    /// mapping smaller than the grant's allocation is refused (the owner would have us copy past it).
    pub fn attach(&mut self, key: GrantKey, handle: &[u8; IPC_HANDLE_LEN], mapping: Mapping) -> Result<()> {
        self.generation += 1;
        let Some(Grant::Granted { handle: granted, alloc_len, mapping: slot, .. }) = self.grants.get_mut(&key) else {
            return Ok(());
        };
        if granted != handle || slot.is_some() {
            return Ok(());
        }
        if mapping.mapped_len().is_some_and(|len| (len as u64) < *alloc_len) {
            let err = Error::backend(format!(
                "the owner of region {} granted a {alloc_len}-byte allocation whose handle maps {:?} bytes",
                key.0,
                mapping.mapped_len()
            ));
            self.grants.insert(key, Grant::Unavailable);
            return Err(err);
        }
        *slot = Some(mapping);
        Ok(())
    }

    /// The mapping of the peer's allocation for an offered message out of its `region`, in `gpu`'s
    /// context: kept from an earlier message of the same allocation, else opened (which takes the
    /// driver a while once per allocation) and kept until the region is revoked. A mapping smaller
    /// than the allocation the peer named is refused (the peer would have us copy past it).
    pub fn sent_mapping(
        &mut self,
        region: u64,
        gpu: &Arc<Gpu>,
        (handle, alloc_base, alloc_len): ([u8; IPC_HANDLE_LEN], u64, u64),
    ) -> Result<Mapping> {
        let key = (region, gpu.ordinal());
        if let Some(m) = self.sent_maps.get(&key)
            && (m.handle, m.alloc_base, m.alloc_len) == (handle, alloc_base, alloc_len)
        {
            return Ok(m.mapping.clone());
        }
        let mapping = Mapping::open(gpu, &handle)?;
        if mapping.mapped_len().is_some_and(|len| (len as u64) < alloc_len) {
            return Err(Error::backend(format!(
                "the peer offered a message of a {alloc_len}-byte allocation whose handle maps {:?} bytes",
                mapping.mapped_len()
            )));
        }
        self.sent_maps.insert(key, SentMap { handle, alloc_base, alloc_len, mapping: mapping.clone() });
        Ok(mapping)
    }

    /// Of the batches issued, those that copied a peer's offered message.
    pub fn issued_recvs(&self) -> u64 {
        self.issued_recvs
    }

    /// Answers to the peer's offered messages whose copies finished, to send in this order.
    pub fn take_answers(&mut self) -> Vec<crate::proto::Control> {
        std::mem::take(&mut self.answers)
    }

    /// Readies a copy queue of `gpu` (`CopyQueue::ready`) ahead of the first batch, among the
    /// process's idle ones.
    pub fn ready_queue(gpu: &Arc<Gpu>) -> Result<()> {
        let mut queue = CopyQueue::take(gpu)?;
        let readied = queue.ready();
        queue.give_back();
        readied
    }

    /// The copy queue of `gpu` this connection holds, taken on first use.
    fn queue(&mut self, gpu: &Arc<Gpu>) -> Result<(usize, &mut CopyQueue)> {
        let queues = &mut self.queues.0;
        let at = match queues.iter().position(|q| q.gpu().ordinal() == gpu.ordinal()) {
            Some(at) => at,
            None => {
                queues.push(CopyQueue::take(gpu)?);
                queues.len() - 1
            }
        };
        Ok((at, &mut queues[at]))
    }

    /// Gives the copy queues back once no batch is in flight.
    fn give_back_queues(&mut self) {
        if !self.batches.is_empty() {
            return;
        }
        for mut queue in self.queues.0.drain(..) {
            self.by_kernel += queue.take_batches_by_kernel();
            queue.give_back();
        }
    }

    /// The copy queues this connection holds now.
    #[cfg(test)]
    pub fn queues_held(&self) -> usize {
        self.queues.0.len()
    }

    /// Queues copies on `gpu`'s queue with `queue_copies`, which returns the event behind them,
    /// and records the batch that holds `hold` until it fired. `hold.regions` are counted before the
    /// first copy (a deregistration that removed one of them now waits for it) and the counts
    /// undone when nothing was queued.
    pub fn issue(
        &mut self,
        gpu: &Arc<Gpu>,
        hold: Hold,
        waker: &Waker,
        queue_copies: impl FnOnce(&mut CopyQueue) -> Result<Event>,
    ) -> std::result::Result<(), NotIssued> {
        let Hold { transfer, parts, regions, counted, remote_regions, mappings, answer } = hold;
        let (queue, q) = self.queue(gpu).map_err(NotIssued::NoQueue)?;
        for r in &regions {
            r.copy_started();
        }
        match queue_copies(q) {
            Ok(event) => {
                let regions = regions.into_iter().chain(counted).collect();
                let event = Arc::new(event);
                let batch = Batch { event, queue, transfer, parts, regions, remote_regions, mappings, answer };
                self.push(batch, waker);
                Ok(())
            }
            Err(e) => {
                for r in &regions {
                    r.copy_ended();
                }
                self.give_back_queues();
                Err(NotIssued::Failed(e))
            }
        }
    }

    /// Records a batch in flight; the caller counted its regions. A batch only its caller awaits
    /// wakes the progress thread only from a park for good (`Waker::caller_copies`); one that
    /// answers the peer wakes it to be polled.
    fn push(&mut self, batch: Batch, waker: &Waker) {
        if batch.answer.is_some() {
            waker.device_copies.add();
            waker.wake();
        } else {
            waker.caller_copies.add();
            waker.activity();
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.issued += 1;
        self.issued_recvs += u64::from(batch.answer.is_some());
        self.batches.push(batch);
    }

    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// Of the batches issued, those whose copies went through a GPU's kernel.
    pub fn issued_by_kernel(&self) -> u64 {
        self.by_kernel + self.queues.0.iter().map(CopyQueue::batches_by_kernel).sum::<u64>()
    }

    /// The count of batches in flight, shared with the connection.
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// The event of a batch in flight for `transfer`, for its caller to wait on outside the lock;
    /// `None` once none is (or the transfer has none: it took another path).
    pub fn event_of(&self, transfer: u64) -> Option<Arc<Event>> {
        self.batches.iter().find(|b| b.transfer.id == transfer).map(|b| b.event.clone())
    }

    /// Whether batches are in flight or revocations wait for them.
    pub fn has_pending(&self) -> bool {
        !self.batches.is_empty() || !self.revoking.is_empty()
    }

    /// Finishes every batch whose event fired (a failed copy fails its parts); returns whether
    /// one the peer awaits did (its answer is queued), and the owner's regions whose revocation
    /// can now be answered. `by`: who looks. A batch only its caller awaits is not counted: that
    /// caller's own poll or wait would have finished it, so the progress thread that saw it first
    /// moved nothing it is there for (counted, it kept polling beside callers for good).
    pub fn poll(&mut self, waker: &Waker, by: Seer) -> (bool, Vec<u64>) {
        let mut answered = false;
        let mut at = 0;
        while at < self.batches.len() {
            let outcome = match self.batches[at].event.done() {
                Ok(false) => {
                    at += 1;
                    continue;
                }
                Ok(true) => Ok(()),
                Err(e) => Err(e),
            };
            let batch = self.batches.swap_remove(at);
            answered |= batch.answer.is_some();
            self.finish(batch, outcome, waker, by);
        }
        self.give_back_queues();
        (answered, self.answerable_revokes())
    }

    fn finish(&mut self, batch: Batch, outcome: Result<()>, waker: &Waker, by: Seer) {
        let Batch { event, queue, transfer, parts, regions, mappings, answer, .. } = batch;
        let tally = if answer.is_some() { &waker.device_copies } else { &waker.caller_copies };
        if let Some(xfer) = answer {
            let len = parts.iter().sum();
            self.answers.push(match &outcome {
                Ok(()) => crate::proto::Control::Done { xfer, len },
                Err(e) => {
                    crate::proto::Control::Deny { xfer, status: e.status() as i32, reason: e.message().to_owned() }
                }
            });
        }
        if let Some(t) = self.tracer {
            trace::event!(DeviceSeen { conn: t.conn, side: t.side, transfer: transfer.id, by: by as u64 });
        }
        // The copies are over: a mapping whose grant is gone may close now.
        drop(mappings);
        // The parts first: a deregistration that waited for the regions' count returns knowing
        // the transfer is reported.
        for bytes in parts {
            transfer.finish_part(outcome.clone().map(|()| bytes));
        }
        for r in &regions {
            r.copy_ended();
        }
        tally.remove();
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        // An event a waiting caller still holds is not recorded again under it: it goes with the
        // caller's reference instead.
        if outcome.is_ok()
            && let Some(q) = self.queues.0.get_mut(queue)
            && let Ok(event) = Arc::try_unwrap(event)
        {
            q.recycle(event);
        }
    }

    /// Revocations whose region no batch in flight touches any more.
    fn answerable_revokes(&mut self) -> Vec<u64> {
        let busy = |r: &u64| self.batches.iter().any(|b| b.remote_regions.contains(r));
        let ready: Vec<u64> = self.revoking.iter().copied().filter(|r| !busy(r)).collect();
        for r in &ready {
            self.revoking.remove(r);
        }
        ready
    }

    /// The owner revoked `region`: no new copy may use it. True when the answer can go at once,
    /// false when it waits for batches in flight (`poll` returns it then).
    pub fn revoke(&mut self, region: u64) -> bool {
        self.generation += 1;
        self.grants.retain(|&(r, _), _| r != region);
        self.sent_maps.retain(|&(r, _), _| r != region);
        if self.batches.iter().any(|b| b.remote_regions.contains(&region)) {
            self.revoking.insert(region);
            return false;
        }
        true
    }

    /// As the owner: `region` was granted on this connection.
    pub fn record_grant(&mut self, region: u64) {
        self.granted.insert(region);
    }

    /// As the owner, on deregistering `region`: true when this connection granted it, which now
    /// waits for the peer's IpcRevoked (the caller sends the IpcRevoke).
    pub fn start_revoke(&mut self, region: u64) -> bool {
        if self.granted.remove(&region) {
            self.revokes.insert(region);
            return true;
        }
        false
    }

    pub fn revoke_pending(&self, region: u64) -> bool {
        self.revokes.contains(&region)
    }

    /// As the owner: the peer's IpcRevoked. An answer to nothing we asked is a protocol violation.
    pub fn revoke_answered(&mut self, region: u64) -> Result<()> {
        if self.revokes.remove(&region) {
            return Ok(());
        }
        Err(Error::backend(format!("protocol violation: IpcRevoked for region {region}, which was not revoked")))
    }

    /// The connection failed: waits for every batch in flight (no copy may touch memory once the
    /// failure is reported) and fails its parts, drops the grants (unmapping what nothing else
    /// holds) and forgets asks and revocations.
    pub fn fail(&mut self, err: &Error, waker: &Waker) {
        for batch in std::mem::take(&mut self.batches) {
            let _ = batch.event.synchronize();
            self.finish(batch, Err(err.clone()), waker, Seer::Failure);
        }
        self.give_back_queues();
        self.generation += 1;
        self.grants.clear();
        self.sent_maps.clear();
        self.answers.clear();
        self.asks.clear();
        self.revoking.clear();
        self.granted.clear();
        self.revokes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UcclStatus;

    fn seg(addr: u64, len: u32) -> RemoteSeg {
        RemoteSeg { addr, len }
    }

    #[test]
    fn windows_cover_only_what_lies_inside_one_of_them() {
        let windows = [(0x1000, 0x1000), (0x8000, 0x10)];
        assert!(covers(&windows, &[seg(0x1000, 0x1000), seg(0x8008, 8)]));
        assert!(!covers(&windows, &[seg(0x1000, 0x1001)]));
        assert!(!covers(&windows, &[seg(0x1fff, 2)]), "spanning two windows' gap");
        assert!(!covers(&windows, &[seg(0x1000, 8), seg(0x7fff, 1)]), "one segment outside refuses all");
        assert!(!covers(&windows, &[seg(u64::MAX, 1)]));
    }

    #[test]
    fn asks_are_answered_once_and_unknown_answers_are_dropped() {
        let mut st = IpcState::default();
        let key = (7, 0xabc);
        let id = st.new_ask(key);
        assert_ne!(id & ASK_BIT, 0);
        assert!(st.take_answer(id).is_none(), "no answer yet");
        assert_eq!(st.coverage(key, &[seg(0x1000, 8)]), Coverage::Missing);
        let windows = [seg(0x1000, 0x100)];
        assert!(st.granted(id, 7, [1; 64], 0x1000, 0x1000, &windows).unwrap());
        // Granted, but not mapped yet: not usable.
        assert_eq!(st.coverage(key, &[seg(0x1000, 8)]), Coverage::Missing);
        assert!(matches!(st.take_answer(id), Some(Answer::Granted { alloc_base: 0x1000, .. })));
        assert!(st.take_answer(id).is_none(), "taken once");
        assert!(!st.granted(id, 7, [1; 64], 0x1000, 0x1000, &windows).unwrap(), "a late answer is dropped");
        let other = st.new_ask(key);
        assert!(st.granted(other, 8, [1; 64], 0x1000, 0x1000, &windows).is_err(), "the wrong region");
        // Windows must lie inside the granted allocation: below it, past its end, or an allocation
        // whose end wraps are protocol violations, and the ask stays unanswered.
        for (base, len, window) in [
            (0x1000, 0x1000, seg(0x800, 0x100)),
            (0x1000, 0x1000, seg(0x1f00, 0x101)),
            (u64::MAX - 0x10, 0x100, seg(u64::MAX - 0x10, 0x8)),
        ] {
            let err = st.granted(other, 7, [1; 64], base, len, &[window]).unwrap_err();
            assert!(err.message().contains("outside its allocation"), "{err}");
            assert!(st.take_answer(other).is_none());
        }
        assert!(st.granted(other, 7, [1; 64], 0x1000, 0x1000, &[seg(0x1f00, 0x100)]).unwrap(), "up to its end");
        let refused = st.new_ask((9, 1));
        assert!(st.refused(refused, Error::not_allowed("no")));
        assert!(matches!(st.take_answer(refused), Some(Answer::Refused(e)) if e.status() == UcclStatus::ErrNotAllowed));
        let forgotten = st.new_ask(key);
        st.forget_ask(forgotten);
        assert!(!st.refused(forgotten, Error::not_allowed("late")));
        st.mark_unavailable((9, 1));
        assert_eq!(st.coverage((9, 1), &[seg(1, 1)]), Coverage::Unavailable);
    }

    #[test]
    fn a_second_grant_of_the_same_allocation_refreshes_the_windows_only() {
        let mut st = IpcState::default();
        let key = (4, 9);
        let first = st.new_ask(key);
        let second = st.new_ask(key);
        assert!(st.granted(first, 4, [3; 64], 0x1000, 0x4000, &[seg(0x1000, 0x100)]).unwrap());
        assert!(st.granted(second, 4, [3; 64], 0x1000, 0x4000, &[seg(0x1000, 0x100), seg(0x3000, 0x10)]).unwrap());
        let Some(Grant::Granted { windows, alloc_base, .. }) = st.grants.get(&key) else { panic!("no grant") };
        assert_eq!((windows.len(), *alloc_base), (2, 0x1000), "the entry stays, with the latest windows");
        // Another allocation under the same key replaces it.
        let third = st.new_ask(key);
        st.granted(third, 4, [5; 64], 0x9000, 0x1000, &[seg(0x9000, 0x10)]).unwrap();
        let Some(Grant::Granted { handle, alloc_base, .. }) = st.grants.get(&key) else { panic!("no grant") };
        assert_eq!((*handle, *alloc_base), ([5; 64], 0x9000));
    }

    #[test]
    fn revocations_wait_for_nothing_when_nothing_is_in_flight() {
        let mut st = IpcState::default();
        let id = st.new_ask((3, 1));
        st.granted(id, 3, [2; 64], 0x1000, 0x1000, &[seg(0x1000, 0x10)]).unwrap();
        assert!(st.revoke(3), "no batch uses it: answered at once");
        assert!(st.grants.is_empty(), "the grant is gone");
        assert_eq!(st.poll(&Waker::default(), Seer::Progress), (false, vec![]));
    }

    /// A caller waiting for its transfer gets that transfer's event, not another's, and holds it
    /// while the batch finishes: a held event is not recycled (a later batch would record it again
    /// under the waiter), an unheld one is.
    #[test]
    fn a_waiter_gets_its_own_batchs_event_and_keeps_it() {
        use crate::cuda::DeviceBuffer;
        use crate::cuda::device_copy::DeviceCopy;
        use crate::engine::transfer::TransferTable;

        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let gpu = Gpu::open(0).unwrap();
        let (src, dst) = (DeviceBuffer::new(0, 8 << 20).unwrap(), DeviceBuffer::new(0, 8 << 20).unwrap());
        let (waker, transfers) = (Waker::default(), TransferTable::default());
        let mut st = IpcState::default();
        let issue = |st: &mut IpcState, len: usize| {
            let transfer = transfers.create(1, 1, None);
            let copy =
                DeviceCopy { dst: dst.addr() as u64, dst_gpu: Some(0), src: src.addr() as u64, src_gpu: Some(0), len };
            let hold = Hold {
                transfer: transfer.clone(),
                parts: vec![len as u64],
                regions: Vec::new(),
                counted: Vec::new(),
                remote_regions: Vec::new(),
                mappings: Vec::new(),
                answer: None,
            };
            // SAFETY: both buffers live until the end of the test, after every batch was waited for.
            let issued = st.issue(&gpu, hold, &waker, |q| unsafe { q.issue(&[copy]) });
            assert!(issued.is_ok(), "the copy was queued");
            transfer
        };
        let (first, second) = (issue(&mut st, 8 << 20), issue(&mut st, 4096));
        // Batches only their callers await: counted apart from those the progress thread polls.
        assert!(waker.caller_copies.any() && !waker.device_copies.any());
        let held = st.event_of(first.id).expect("the first transfer's batch is in flight");
        assert!(st.event_of(first.id + second.id + 1).is_none(), "no batch of an unknown transfer");
        let theirs = st.event_of(second.id).unwrap();
        assert!(!Arc::ptr_eq(&held, &theirs), "each transfer waits on its own batch");
        drop(theirs);
        // Queued behind the first on the same stream: both are done once the second is.
        st.event_of(second.id).unwrap().synchronize().unwrap();
        assert!(held.done().unwrap());
        assert_eq!(st.poll(&waker, Seer::Wait), (false, vec![]), "batches only their callers await answer nobody");
        assert!(st.event_of(first.id).is_none() && st.event_of(second.id).is_none());
        assert!(first.is_finished() && second.is_finished());
        assert!(!waker.device_copies.any() && !waker.caller_copies.any());
        assert_eq!(st.queues_held(), 0, "nothing in flight: the queue went back");
        let queue = CopyQueue::take(&gpu).unwrap();
        assert_eq!(queue.spare_events(), 1, "only the unheld event went back to the queue");
    }

    #[test]
    fn the_owner_waits_for_the_revocations_it_sent() {
        let mut st = IpcState::default();
        assert!(!st.start_revoke(5), "never granted: nothing to revoke");
        st.record_grant(5);
        assert!(st.start_revoke(5));
        assert!(st.revoke_pending(5));
        assert!(!st.start_revoke(5), "revoked once");
        st.revoke_answered(5).unwrap();
        assert!(!st.revoke_pending(5));
        assert!(st.revoke_answered(5).is_err(), "a second answer is a protocol violation");
        st.record_grant(6);
        st.fail(&Error::disconnected("gone"), &Waker::default());
        assert!(!st.start_revoke(6), "a failed connection revokes nothing");
    }
}
