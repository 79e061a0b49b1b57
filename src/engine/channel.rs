//! A channel: one send comm and one receive comm to the same peer, with the queue of chunks waiting
//! for a request slot and the window of chunks in flight. Both peers derive the same chunk plan, so
//! per-channel FIFO order is the only matching rule the transport needs (tags are ignored).
//!
//! Each comm gets its own registration of every region a chunk of this channel touches (TCPX binds a
//! registration to the comm's NIC), made when the first such chunk is queued and released once the
//! region was deregistered and no flow holds it any more, or when the channel closes. A region larger
//! than one registration may cover (TCPX's `regMr` takes an `int` size) is registered in windows,
//! each made when a chunk first falls into it.
//!
//! A chunk whose region was deregistered before it was posted is redirected to scratch memory: it is
//! still sent (zeros) or received (into a scratch buffer), so both ends keep the same chunk plan, but
//! the region is never touched again. The chunks of a peer's write we refused arrive the same way.
//! A scratch receive takes a chunk-sized buffer, at most one per receive posted, and a few are kept
//! for the next ones, so a peer streaming refused writes costs a window of buffers, reused.
//!
//! A comm may decline a post (`None`: try again later). When it declines with nothing of ours in
//! flight on it, no completion will wake the progress thread for it, so the channel says so
//! (`needs_retry`) and the thread keeps polling instead of parking.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

// Keyed by region ids and window indices of our own: `region.rs` says why not SipHash.
use rustc_hash::FxHashMap as IdMap;

use super::plan::{Chunk, ChunkMem};
use super::region::Region;
use crate::error::{Error, Result};
use crate::threads::{self, ThreadKind};
use crate::transport::{IoSeg, LinkStats, MrHandle, MrRun, RecvComm, RequestId, SendComm};

/// The region id of a chunk that moves through scratch memory instead of a region (ids start at 1).
pub(super) const SCRATCH: u64 = 0;

/// Moves `chunk` through scratch memory, with the same lengths, instead of its region's bytes: a
/// send of zeros, a receive into scratch.
pub(super) fn to_scratch(chunk: &mut Chunk) {
    chunk.region = SCRATCH;
    chunk.mem = ChunkMem::At(0);
}

/// A region's registrations with this channel's two comms, by window, made on first use in each
/// direction.
struct Registration {
    region: Weak<Region>,
    /// Touching segments of a chunk may go as one range (`Chunk::segments`): host memory, or
    /// device memory inside one allocation.
    joins: bool,
    send: IdMap<usize, MrHandle>,
    recv: IdMap<usize, MrHandle>,
}

/// A chunk never ends further than this past the start of its window's span.
const WINDOW_OVERLAP: usize = crate::config::MAX_CHUNK_SIZE as usize;
/// Slack for a transport that widens a registration to whole pages at both ends.
const PAGE_SLACK: usize = 2 * 4096;

/// Whether touching segments of a queued chunk of `region` may go as one range (its registration
/// was made when it was queued).
fn joins_touching(registrations: &IdMap<u64, Registration>, region: u64) -> bool {
    registrations.get(&region).is_some_and(|r| r.joins)
}

/// How regions are cut into registrations a transport accepts. Window `k` of a region starts `k`
/// spans into it and reaches one chunk further than the next window's start, so every chunk lies
/// inside the window its first byte falls in: `[k * span, min(len, (k + 1) * span + overlap))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// The largest registration the transport takes, in bytes.
    max: usize,
    span: usize,
}

impl Windows {
    pub fn new(max_registration: usize) -> Windows {
        let room = max_registration.saturating_sub(WINDOW_OVERLAP + PAGE_SLACK).max(1);
        // A power of two, so window starts keep the alignment of the region's base.
        let span = 1usize << (usize::BITS - 1 - room.leading_zeros());
        Windows { max: max_registration, span }
    }

    /// The window of the region `[base, base + len)` that holds `chunk`. Where the chunk lies is
    /// looked at only for a region of several windows: a spanning chunk's bounds take a walk over
    /// its segments, which every chunk of a vector would pay for nothing. A spanning chunk whose
    /// segments lie in several windows (KV-cache blocks scattered over a region larger than a
    /// registration) names the window of its first segment: a vectored request's other segments
    /// need only lie in the same region (the transport rule of `isendv` / `irecvv`).
    fn of_chunk(&self, base: usize, len: usize, chunk: &Chunk) -> Result<(usize, usize, usize)> {
        if len.saturating_add(PAGE_SLACK) <= self.max {
            return Ok((0, base, len));
        }
        let (addr, reach) = chunk.hull();
        match self.locate(base, len, addr, reach) {
            Err(_) if matches!(chunk.mem, ChunkMem::Spans { .. }) => {
                let first = chunk.regions().next().map_or(IoSeg { addr, len: 0 }, |(_, s)| s);
                self.locate(base, len, first.addr, first.len)
            }
            window => window,
        }
    }

    /// The window of the region `[base, base + len)` that holds `[addr, addr + chunk)`: its index,
    /// start and length. A region that fits one registration is one window.
    fn locate(&self, base: usize, len: usize, addr: usize, chunk: usize) -> Result<(usize, usize, usize)> {
        if len.saturating_add(PAGE_SLACK) <= self.max {
            return Ok((0, base, len));
        }
        let index = (addr - base) / self.span;
        let start = index * self.span;
        let end = len.min(start + self.span + WINDOW_OVERLAP);
        if addr - base + chunk > end {
            return Err(Error::new(
                crate::error::UcclStatus::ErrInternal,
                format!("a {chunk}-byte chunk at offset {} crosses its registration window", addr - base),
            ));
        }
        Ok((index, base + start, end - start))
    }
}

/// Receives a channel keeps posted per chunk of its send window. A receiving socket whose next
/// piece belongs to a chunk not posted yet stops reading (the peer never picks where bytes land);
/// with equal windows, once a peer's sends ran a window ahead of our oldest unfinished receive, one
/// slow socket held every other socket of the comm (on 16 cores, a fifth of the receiving helpers'
/// time at 4 transfers in flight). Twice the window keeps the peer's whole send window posted
/// here; the comm's own bound on outstanding requests still applies.
const RECV_WINDOW_FACTOR: usize = 2;

/// Scratch receive buffers kept for reuse once their receive completed.
const SPARE_SCRATCH: usize = 4;

/// A chunk handed to a comm, with the scratch memory it moves through when it has no region (kept
/// until the comm reports the request done; the comms are dropped before the queues).
type Posted = (RequestId, Chunk, Option<Box<[u8]>>);

/// The registrations a queued chunk goes out with: one, or one per region for a chunk that
/// crosses from one region into the next (in the order of [`Chunk::regions`]).
#[derive(Debug)]
enum Mrs {
    One(MrHandle),
    Runs(Box<[MrHandle]>),
}

impl Mrs {
    /// The runs of a request whose segments came in `counts` per region.
    fn runs(&self, counts: &[usize], out: &mut Vec<MrRun>) -> Result<()> {
        out.clear();
        match self {
            Mrs::One(mr) => out.push(MrRun { segs: counts.iter().sum(), mr: *mr }),
            Mrs::Runs(mrs) if mrs.len() == counts.len() => {
                out.extend(counts.iter().zip(mrs.iter()).map(|(&segs, &mr)| MrRun { segs, mr }))
            }
            Mrs::Runs(mrs) => {
                return Err(Error::backend(format!(
                    "internal: a chunk over {} regions was registered for {}",
                    counts.len(),
                    mrs.len()
                )));
            }
        }
        Ok(())
    }
}

/// A chunk's segments as a comm takes them, filled at each post into lists kept for the next: the
/// segments, their count per region and the runs of registrations they make.
#[derive(Default)]
struct Spelled {
    iov: Vec<IoSeg>,
    counts: Vec<usize>,
    mr_runs: Vec<MrRun>,
}

impl Spelled {
    /// Fills in `chunk`'s segments and the runs of `mrs` they make; where they joined into one
    /// segment of one registration, that segment and its registration.
    fn fill(&mut self, chunk: &Chunk, mrs: &Mrs, regs: &IdMap<u64, Registration>) -> Result<Option<(IoSeg, MrHandle)>> {
        let joins = |region| joins_touching(regs, region);
        self.iov.clear();
        self.counts.clear();
        chunk.segments(&mut self.iov, &mut self.counts, &joins);
        mrs.runs(&self.counts, &mut self.mr_runs)?;
        Ok(match (&self.iov[..], &self.mr_runs[..]) {
            ([one], [run]) => Some((*one, run.mr)),
            _ => None,
        })
    }
}

pub struct Channel {
    // Declared first so they drop first: dropping a comm ends its I/O, after which the scratch
    // buffers of requests still posted may go.
    send: Box<dyn SendComm>,
    recv: Box<dyn RecvComm>,
    window: usize,
    recv_window: usize,
    windows: Windows,
    registrations: IdMap<u64, Registration>,
    /// The region table's removal count when the cache was last swept.
    removals_seen: u64,
    removals: Arc<AtomicU64>,
    /// A removed region is still held by a flow; sweep again on later passes.
    sweep_pending: bool,
    /// Queued chunks with the registrations they go out with (NONE for scratch).
    send_queue: VecDeque<(Chunk, Mrs)>,
    /// Flows whose send chunks wait (a served read cut off, until its reader took note); chunks
    /// queued behind one wait with it, keeping the channel's order.
    held: Vec<u64>,
    send_inflight: VecDeque<Posted>,
    recv_queue: VecDeque<(Chunk, Mrs)>,
    recv_inflight: VecDeque<Posted>,
    /// The segments of the chunk being posted.
    spelled: Spelled,
    /// Scratch receive buffers whose receive completed, for the next scratch receives.
    spare: Vec<Box<[u8]>>,
    /// A comm declined a post on the last pass with nothing of ours in flight on it.
    declined: bool,
}

impl Channel {
    /// What the send comm's and the receive comm's data sockets carried, by link.
    pub fn link_stats(&self) -> (Vec<LinkStats>, Vec<LinkStats>) {
        (self.send.link_stats(), self.recv.link_stats())
    }

    pub fn new(
        send: Box<dyn SendComm>,
        recv: Box<dyn RecvComm>,
        window: usize,
        windows: Windows,
        removals: Arc<AtomicU64>,
    ) -> Channel {
        Channel {
            send,
            recv,
            window,
            recv_window: window * RECV_WINDOW_FACTOR,
            windows,
            registrations: IdMap::default(),
            removals_seen: removals.load(Ordering::Acquire),
            removals,
            sweep_pending: false,
            send_queue: VecDeque::new(),
            held: Vec::new(),
            send_inflight: VecDeque::new(),
            recv_queue: VecDeque::new(),
            recv_inflight: VecDeque::new(),
            spelled: Spelled::default(),
            spare: Vec::new(),
            declined: false,
        }
    }

    /// Whether a comm declined a post on the last pass while nothing of ours was in flight on it:
    /// only polling again gets the chunk posted.
    pub fn needs_retry(&self) -> bool {
        self.declined
    }

    /// Whether a drive would find nothing to do: no chunk queued or posted, no declined post to
    /// retry, no registration of a deregistered region to release.
    pub fn quiet(&self) -> bool {
        self.send_queue.is_empty()
            && self.send_inflight.is_empty()
            && self.recv_queue.is_empty()
            && self.recv_inflight.is_empty()
            && !self.declined
            && !self.sweep_pending
            && self.removals.load(Ordering::Acquire) == self.removals_seen
    }

    /// Whether a chunk was handed to a comm and is not complete yet.
    pub fn has_posted(&self) -> bool {
        !self.send_inflight.is_empty() || !self.recv_inflight.is_empty()
    }

    /// Bytes of the chunks handed to the comms and not complete yet.
    pub fn posted_bytes(&self) -> usize {
        self.send_inflight.iter().chain(&self.recv_inflight).map(|(_, chunk, _)| chunk.len).sum()
    }

    /// A scratch buffer of at least `len` bytes for a receive.
    fn take_scratch(&mut self, len: usize) -> Box<[u8]> {
        match self.spare.iter().position(|b| b.len() >= len) {
            Some(i) => self.spare.swap_remove(i),
            None => vec![0u8; len].into_boxed_slice(),
        }
    }

    fn keep_scratch(&mut self, buf: Box<[u8]>) {
        if self.spare.len() < SPARE_SCRATCH {
            self.spare.push(buf);
        }
    }

    /// Queues a chunk of the `regions` it lies in (registering their windows with the send comm
    /// first where needed), or of scratch memory when there are none.
    pub fn queue_send(&mut self, chunk: Chunk, regions: &[Arc<Region>]) -> Result<()> {
        let mrs = self.registered(&chunk, regions, true)?;
        self.send_queue.push_back((chunk, mrs));
        Ok(())
    }

    /// Queues a chunk of the `regions` it lies in (registering their windows with the receive
    /// comm first where needed), or of scratch memory when there are none.
    pub fn queue_recv(&mut self, chunk: Chunk, regions: &[Arc<Region>]) -> Result<()> {
        let mrs = self.registered(&chunk, regions, false)?;
        self.recv_queue.push_back((chunk, mrs));
        Ok(())
    }

    /// The registrations `chunk` goes out with: of the window of each region that holds its first
    /// segment there (the transport rule for vectored requests), made on first use. `regions`
    /// holds every region the chunk touches (a flow's runs may repeat one).
    fn registered(&mut self, chunk: &Chunk, regions: &[Arc<Region>], send: bool) -> Result<Mrs> {
        let window = |this: &mut Self, region: &Arc<Region>, (index, start, len)| -> Result<MrHandle> {
            let entry = Self::entry(&mut this.registrations, region);
            let cache = if send { &mut entry.send } else { &mut entry.recv };
            if let Some(mr) = cache.get(&index) {
                return Ok(*mr);
            }
            let mr = match send {
                true => this.send.reg_mr(start, len, region.kind)?,
                false => this.recv.reg_mr(start, len, region.kind)?,
            };
            cache.insert(index, mr);
            Ok(mr)
        };
        match regions {
            [] => Ok(Mrs::One(MrHandle::NONE)),
            [region] => {
                debug_assert_eq!(chunk.region, region.id);
                let at = self.windows.of_chunk(region.base, region.len, chunk)?;
                Ok(Mrs::One(window(self, region, at)?))
            }
            _ => {
                let mut mrs = Vec::with_capacity(regions.len());
                for (k, (id, first)) in chunk.regions().enumerate() {
                    // `regions` are the chunk's runs' in order: the k-th is the one, unless a run
                    // had no byte in the chunk.
                    let region = match regions.get(k) {
                        Some(r) if r.id == id => r,
                        _ => regions.iter().find(|r| r.id == id).ok_or_else(|| {
                            Error::backend(format!("internal: a chunk of region {id} was queued without it"))
                        })?,
                    };
                    let at = self.windows.locate(region.base, region.len, first.addr, first.len)?;
                    mrs.push(window(self, region, at)?);
                }
                Ok(match mrs[..] {
                    [one] => Mrs::One(one),
                    _ => Mrs::Runs(mrs.into()),
                })
            }
        }
    }

    /// Sends zeros instead of, and receives into scratch memory instead of, every queued chunk
    /// with bytes in `region` (without its registration: the transport registers scratch per
    /// request); chunks already posted keep their memory until they complete (`posted_on`). A
    /// chunk over several regions goes whole: its flow fails with the region anyway.
    pub fn redirect(&mut self, region: u64) {
        for (chunk, mrs) in self.send_queue.iter_mut().chain(self.recv_queue.iter_mut()) {
            if chunk.touches(region) {
                to_scratch(chunk);
                *mrs = Mrs::One(MrHandle::NONE);
            }
        }
    }

    pub fn hold(&mut self, flow: u64) {
        self.held.push(flow);
    }

    pub fn release(&mut self, flow: u64) {
        self.held.retain(|&f| f != flow);
    }

    /// Whether queued sends could go to the send comm now: its window has room and the first of
    /// them is not held back.
    pub fn sends_waiting(&self) -> bool {
        self.send_inflight.len() < self.window
            && self.send_queue.front().is_some_and(|(chunk, _)| !self.held.contains(&chunk.flow))
    }

    /// Whether a request posted to a comm still uses memory of `region`.
    pub fn posted_on(&self, region: u64) -> bool {
        self.send_inflight.iter().chain(&self.recv_inflight).any(|(_, chunk, _)| chunk.touches(region))
    }

    fn entry<'a>(registrations: &'a mut IdMap<u64, Registration>, region: &Arc<Region>) -> &'a mut Registration {
        registrations.entry(region.id).or_insert_with(|| Registration {
            region: Arc::downgrade(region),
            joins: region.in_one_allocation(),
            send: IdMap::default(),
            recv: IdMap::default(),
        })
    }

    /// Releases the registrations of regions that were deregistered and are no longer held by any
    /// flow; a removed region still in use is looked at again on later passes.
    fn sweep_registrations(&mut self) {
        let removals = self.removals.load(Ordering::Acquire);
        if removals == self.removals_seen && !self.sweep_pending {
            return;
        }
        self.removals_seen = removals;
        self.sweep_pending = false;
        let (send, recv) = (&mut self.send, &mut self.recv);
        let mut pending = false;
        self.registrations.retain(|_, reg| {
            if let Some(region) = reg.region.upgrade() {
                pending |= region.is_removed();
                return true;
            }
            for mr in reg.send.values() {
                send.dereg_mr(*mr);
            }
            for mr in reg.recv.values() {
                recv.dereg_mr(*mr);
            }
            false
        });
        self.sweep_pending = pending;
    }

    #[cfg(test)]
    fn registered_regions(&self) -> usize {
        self.registrations.len()
    }

    /// Posts queued chunks while the window has room and reaps finished ones (oldest first, the
    /// only order `test` allows). The flow of each send handed to the comm is appended to `sent`,
    /// finished chunks to `done`; returns whether anything moved.
    #[cfg(test)]
    pub fn drive(&mut self, sent: &mut Vec<u64>, done: &mut Vec<Chunk>) -> Result<bool> {
        self.drive_limited(sent, done, usize::MAX)
    }

    /// `drive`, handing the send comm no more sends once this call posted `send_bytes` bytes of
    /// them (a send that starts below the bound goes whole); receives are all posted, since a
    /// peer's piece of a chunk not posted here stalls its socket. `sends_waiting` then says
    /// whether sends were left for a later drive.
    pub fn drive_limited(&mut self, sent: &mut Vec<u64>, done: &mut Vec<Chunk>, send_bytes: usize) -> Result<bool> {
        self.sweep_registrations();
        self.declined = false;
        let mut moved = false;
        let mut posted_bytes = 0usize;
        while self.send_inflight.len() < self.window && posted_bytes < send_bytes {
            let Some((chunk, mrs)) = self.send_queue.front() else { break };
            if !self.held.is_empty() && self.held.contains(&chunk.flow) {
                break;
            }
            let scratch = (chunk.region == SCRATCH).then(|| vec![0u8; chunk.len].into_boxed_slice());
            let posted = match (&scratch, &chunk.mem, mrs) {
                // SAFETY: scratch memory is kept with the request until it completes.
                (Some(s), _, Mrs::One(mr)) => unsafe { self.send.isend(s.as_ptr(), chunk.len, *mr)? },
                // SAFETY: chunks point into registered regions the flow keeps alive, which a
                // deregistration redirects before returning (waiting for posted ones); the
                // connection drops this channel (joining its I/O) before any flow is reported
                // finished on failure.
                (None, ChunkMem::At(addr), Mrs::One(mr)) => unsafe {
                    self.send.isend(*addr as *const u8, chunk.len, *mr)?
                },
                _ => match self.spelled.fill(chunk, mrs, &self.registrations)? {
                    // Segments side by side, joined: a contiguous request.
                    // SAFETY: as for a contiguous chunk.
                    Some((one, mr)) => unsafe { self.send.isend(one.addr as *const u8, one.len, mr)? },
                    // SAFETY: as for a contiguous chunk, for every segment.
                    None => unsafe { self.send.isendv(&self.spelled.iov, &self.spelled.mr_runs)? },
                },
            };
            let Some(req) = posted else {
                self.declined |= self.send_inflight.is_empty();
                break;
            };
            let (chunk, _) = self.send_queue.pop_front().expect("looked at the front");
            posted_bytes = posted_bytes.saturating_add(chunk.len);
            sent.push(chunk.flow);
            self.send_inflight.push_back((req, chunk, scratch));
            moved = true;
        }
        while let Some((req, _, _)) = self.send_inflight.front() {
            if self.send.test(*req)?.is_none() {
                break;
            }
            let (_, chunk, _) = self.send_inflight.pop_front().expect("looked at the front");
            done.push(chunk);
            moved = true;
        }
        while self.recv_inflight.len() < self.recv_window {
            let Some((chunk, _)) = self.recv_queue.front() else { break };
            let scratch_len = (chunk.region == SCRATCH).then_some(chunk.len);
            let mut scratch = scratch_len.map(|len| self.take_scratch(len));
            let (chunk, mrs) = self.recv_queue.front().expect("looked at the front");
            let posted = match (&mut scratch, &chunk.mem, mrs) {
                // SAFETY: scratch memory is kept with the request until it completes.
                (Some(s), _, Mrs::One(mr)) => unsafe { self.recv.irecv(s.as_mut_ptr(), chunk.len, *mr)? },
                // SAFETY: as for sends; the destination is exclusively ours until the flow finishes.
                (None, ChunkMem::At(addr), Mrs::One(mr)) => unsafe {
                    self.recv.irecv(*addr as *mut u8, chunk.len, *mr)?
                },
                _ => match self.spelled.fill(chunk, mrs, &self.registrations)? {
                    // SAFETY: as for a contiguous destination.
                    Some((one, mr)) => unsafe { self.recv.irecv(one.addr as *mut u8, one.len, mr)? },
                    // SAFETY: as for a contiguous destination, for every segment.
                    None => unsafe { self.recv.irecvv(&self.spelled.iov, &self.spelled.mr_runs)? },
                },
            };
            let Some(req) = posted else {
                self.declined |= self.recv_inflight.is_empty();
                if let Some(buf) = scratch {
                    self.keep_scratch(buf);
                }
                break;
            };
            let (chunk, _) = self.recv_queue.pop_front().expect("looked at the front");
            self.recv_inflight.push_back((req, chunk, scratch));
            moved = true;
        }
        while let Some((req, chunk, _)) = self.recv_inflight.front() {
            let (req, len) = (*req, chunk.len);
            let Some(size) = self.recv.test(req)? else { break };
            if size != len {
                return Err(Error::backend(format!(
                    "protocol violation: peer sent a {size}-byte chunk where the chunk plan expects {len} bytes"
                )));
            }
            threads::point(ThreadKind::Progress);
            // Host memory is final once the receive completes, so the slot goes back at once.
            self.recv.irecv_consumed(req)?;
            let (_, chunk, scratch) = self.recv_inflight.pop_front().expect("looked at the front");
            if let Some(buf) = scratch {
                self.keep_scratch(buf);
            }
            done.push(chunk);
            moved = true;
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::region::RegionTable;
    use crate::transport::MemKind;
    use parking_lot::Mutex;

    /// A comm that completes everything at once and logs registrations and the handles it is given.
    struct LoggingComm {
        log: Arc<Mutex<Vec<String>>>,
        next: usize,
        /// Whether `test` reports requests done.
        completes: bool,
    }

    impl LoggingComm {
        fn reg(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
            self.next += 1;
            self.log.lock().push(format!("reg {addr:#x}+{len} {kind:?} -> {}", self.next));
            Ok(MrHandle(self.next))
        }
    }

    impl SendComm for LoggingComm {
        fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
            self.reg(addr, len, kind)
        }
        fn dereg_mr(&mut self, mr: MrHandle) {
            self.log.lock().push(format!("dereg {}", mr.0));
        }
        unsafe fn isend(&mut self, data: *const u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
            self.log.lock().push(format!("isend {:#x}+{len} mr {}", data as usize, mr.0));
            Ok(Some(RequestId(len as u64)))
        }
        unsafe fn isendv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
            self.log.lock().push(format!("isendv {} mr {}", segs(iov), runs(mrs)));
            Ok(Some(RequestId(iov.iter().map(|s| s.len as u64).sum())))
        }
        fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
            Ok(self.completes.then_some(req.0 as usize))
        }
    }

    impl RecvComm for LoggingComm {
        fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
            self.reg(addr, len, kind)
        }
        fn dereg_mr(&mut self, mr: MrHandle) {
            self.log.lock().push(format!("dereg {}", mr.0));
        }
        unsafe fn irecv(&mut self, data: *mut u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
            self.log.lock().push(format!("irecv {:#x}+{len} mr {}", data as usize, mr.0));
            Ok(Some(RequestId(len as u64)))
        }
        unsafe fn irecvv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
            self.log.lock().push(format!("irecvv {} mr {}", segs(iov), runs(mrs)));
            Ok(Some(RequestId(iov.iter().map(|s| s.len as u64).sum())))
        }
        fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
            Ok(self.completes.then_some(req.0 as usize))
        }
        fn irecv_consumed(&mut self, _req: RequestId) -> Result<()> {
            Ok(())
        }
    }

    fn segs(iov: &[IoSeg]) -> String {
        iov.iter().map(|s| format!("{:#x}+{}", s.addr, s.len)).collect::<Vec<_>>().join(",")
    }

    /// `mr 7` for one registration, `mr 7x2,8x1` for runs of segments in several.
    fn runs(mrs: &[MrRun]) -> String {
        match mrs {
            [one] => one.mr.0.to_string(),
            _ => mrs.iter().map(|r| format!("{}x{}", r.mr.0, r.segs)).collect::<Vec<_>>().join(","),
        }
    }

    /// A channel over two logging comms (send handles from 101, receive handles from 201).
    fn logging_channel(window: usize, completes: bool) -> (Channel, Arc<Mutex<Vec<String>>>, RegionTable) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let table = RegionTable::default();
        let send = Box::new(LoggingComm { log: log.clone(), next: 100, completes });
        let recv = Box::new(LoggingComm { log: log.clone(), next: 200, completes });
        (Channel::new(send, recv, window, Windows::new(usize::MAX), table.removals()), log, table)
    }

    #[test]
    fn regions_are_registered_once_per_comm_and_released_after_removal() {
        let (mut ch, log, table) = logging_channel(4, true);
        let id = table.register(0x10000, 0x1000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        for (flow, off) in [(1, 0), (2, 0x800)] {
            let chunk = Chunk { flow, region: id, mem: ChunkMem::At(0x10000 + off), len: 0x800 };
            ch.queue_send(chunk.clone(), std::slice::from_ref(&region)).unwrap();
            ch.queue_recv(chunk, std::slice::from_ref(&region)).unwrap();
        }
        let mut done = Vec::new();
        assert!(ch.drive(&mut Vec::new(), &mut done).unwrap());
        assert_eq!(done.len(), 4);
        assert_eq!(
            *log.lock(),
            [
                "reg 0x10000+4096 Host -> 101",
                "reg 0x10000+4096 Host -> 201",
                "isend 0x10000+2048 mr 101",
                "isend 0x10800+2048 mr 101",
                "irecv 0x10000+2048 mr 201",
                "irecv 0x10800+2048 mr 201",
            ]
        );
        log.lock().clear();

        // Removed while a flow still holds the region: kept until the last holder lets go.
        table.remove(id).unwrap();
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        assert!(log.lock().is_empty(), "{:?}", log.lock());
        assert_eq!(ch.registered_regions(), 1);
        drop(region);
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        assert_eq!(*log.lock(), ["dereg 101", "dereg 201"]);
        assert_eq!(ch.registered_regions(), 0);
    }

    #[test]
    fn int_sized_windows_cover_every_chunk_of_a_six_gib_region() {
        const GIB: usize = 1 << 30;
        let windows = Windows::new(i32::MAX as usize);
        assert_eq!(windows.span, GIB);
        let base = 0x7f00_0000_0000usize;
        let len = 6 * GIB;
        // Window k covers [k GiB, (k + 1) GiB + 4 MiB), cut at the region's end.
        assert_eq!(windows.locate(base, len, base, 4096).unwrap(), (0, base, GIB + (4 << 20)));
        assert_eq!(windows.locate(base, len, base + GIB - 10, 4 << 20).unwrap().0, 0, "a chunk crossing 1 GiB");
        assert_eq!(windows.locate(base, len, base + 5 * GIB + 7, 100).unwrap(), (5, base + 5 * GIB, GIB));
        assert!(windows.locate(base, len, base + GIB - 10, (4 << 20) + 11).is_err(), "longer than any chunk");
        assert_eq!(windows.locate(base, 100, base + 50, 50).unwrap(), (0, base, 100), "small regions: one window");
        assert_eq!(Windows::new(usize::MAX).locate(base, len, base + 5 * GIB, 100).unwrap(), (0, base, len));

        let log = Arc::new(Mutex::new(Vec::new()));
        let table = RegionTable::default();
        let send = Box::new(LoggingComm { log: log.clone(), next: 100, completes: true });
        let recv = Box::new(LoggingComm { log: log.clone(), next: 200, completes: true });
        let mut ch = Channel::new(send, recv, 4, windows, table.removals());
        let id = table.register(base, len, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        let offsets = [0, GIB - 10, 3 * GIB + 5, 5 * GIB + (GIB - 100), 10];
        for (flow, off) in offsets.into_iter().enumerate() {
            let chunk = Chunk { flow: flow as u64, region: id, mem: ChunkMem::At(base + off), len: 100 };
            ch.queue_send(chunk.clone(), std::slice::from_ref(&region)).unwrap();
            ch.queue_recv(chunk, std::slice::from_ref(&region)).unwrap();
        }
        let mut done = Vec::new();
        while ch.drive(&mut Vec::new(), &mut done).unwrap() {}
        assert_eq!(done.len(), 2 * offsets.len());
        let lines = log.lock().clone();
        let regs: Vec<&String> = lines.iter().filter(|l| l.starts_with("reg ")).collect();
        assert_eq!(
            regs,
            [
                &format!("reg {base:#x}+{} Host -> 101", GIB + (4 << 20)),
                &format!("reg {base:#x}+{} Host -> 201", GIB + (4 << 20)),
                &format!("reg {:#x}+{} Host -> 102", base + 3 * GIB, GIB + (4 << 20)),
                &format!("reg {:#x}+{} Host -> 202", base + 3 * GIB, GIB + (4 << 20)),
                &format!("reg {:#x}+{GIB} Host -> 103", base + 5 * GIB),
                &format!("reg {:#x}+{GIB} Host -> 203", base + 5 * GIB),
            ],
            "one registration per touched window and direction, reused by later chunks"
        );
        for (off, mr) in [(0, 101), (GIB - 10, 101), (3 * GIB + 5, 102), (5 * GIB + (GIB - 100), 103), (10, 101)] {
            assert!(lines.contains(&format!("isend {:#x}+100 mr {mr}", base + off)), "{lines:?}");
        }
        // A spanning chunk goes with the window of its lowest byte, wherever its first segment lies.
        let segs: Arc<[IoSeg]> =
            [IoSeg { addr: base + 3 * GIB + 0x2000, len: 50 }, IoSeg { addr: base + 3 * GIB + 0x1000, len: 50 }].into();
        let spanning =
            Chunk { flow: 9, region: id, mem: ChunkMem::Spans { segs, first: 0, offset: 0, runs: None }, len: 100 };
        ch.queue_send(spanning, std::slice::from_ref(&region)).unwrap();
        while ch.drive(&mut Vec::new(), &mut done).unwrap() {}
        let expected = format!("isendv {:#x}+50,{:#x}+50 mr 102", base + 3 * GIB + 0x2000, base + 3 * GIB + 0x1000);
        assert_eq!(log.lock().last(), Some(&expected));
        // One whose segments lie further apart than any window reaches goes with the window of its
        // first segment (blocks scattered over the region).
        let segs: Arc<[IoSeg]> = [IoSeg { addr: base + 2 * GIB, len: 50 }, IoSeg { addr: base, len: 50 }].into();
        let wide =
            Chunk { flow: 10, region: id, mem: ChunkMem::Spans { segs, first: 0, offset: 0, runs: None }, len: 100 };
        ch.queue_send(wide, std::slice::from_ref(&region)).unwrap();
        while ch.drive(&mut Vec::new(), &mut done).unwrap() {}
        let expected = format!("isendv {:#x}+50,{base:#x}+50 mr 104", base + 2 * GIB);
        assert_eq!(log.lock().last(), Some(&expected));
        log.lock().clear();
        table.remove(id).unwrap();
        drop(region);
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        let mut released = log.lock().clone();
        released.sort();
        assert_eq!(
            released,
            ["dereg 101", "dereg 102", "dereg 103", "dereg 104", "dereg 201", "dereg 202", "dereg 203"]
        );
    }

    /// Touching segments of a host chunk go as one range, a contiguous request when they all join
    /// up; those of a device chunk whose region the driver does not place in one allocation (here:
    /// no driver at all) go as they are, since side by side they may still lie in two allocations,
    /// which one copy must not cross.
    #[test]
    fn touching_segments_are_joined_in_host_memory_and_single_allocations_only() {
        let (mut ch, log, table) = logging_channel(8, true);
        let mut done = Vec::new();
        let host = table.local(table.register(0x10000, 0x10000, MemKind::Host).unwrap(), 0x10000, 0x10000).unwrap();
        let device = table
            .local(table.register(0x40000, 0x10000, MemKind::Cuda { device: 0 }).unwrap(), 0x40000, 0x10000)
            .unwrap();
        let side_by_side =
            |base: usize| -> Arc<[IoSeg]> { (0..4).map(|i| IoSeg { addr: base + i * 0x100, len: 0x100 }).collect() };
        let spans = |flow, region: &Arc<Region>, segs| Chunk {
            flow,
            region: region.id,
            mem: ChunkMem::Spans { segs, first: 0, offset: 0, runs: None },
            len: 0x400,
        };
        ch.queue_send(spans(1, &host, side_by_side(0x10000)), std::slice::from_ref(&host)).unwrap();
        ch.queue_recv(spans(2, &host, side_by_side(0x12000)), std::slice::from_ref(&host)).unwrap();
        ch.queue_send(spans(3, &device, side_by_side(0x40000)), std::slice::from_ref(&device)).unwrap();
        ch.queue_recv(spans(4, &device, side_by_side(0x42000)), std::slice::from_ref(&device)).unwrap();
        // Two runs with a gap between them: two iovecs.
        let gapped: Arc<[IoSeg]> =
            [0x10000, 0x10100, 0x10400, 0x10500].iter().map(|&addr| IoSeg { addr, len: 0x100 }).collect();
        ch.queue_send(spans(5, &host, gapped), std::slice::from_ref(&host)).unwrap();
        while ch.drive(&mut Vec::new(), &mut done).unwrap() {}
        let lines: Vec<String> = log.lock().iter().filter(|l| !l.starts_with("reg")).cloned().collect();
        let each = |op: &str, base: usize, mr| {
            let segs: Vec<String> = (0..4).map(|i| format!("{:#x}+256", base + i * 0x100)).collect();
            format!("{op} {} mr {mr}", segs.join(","))
        };
        for expected in [
            "isend 0x10000+1024 mr 101".to_string(),
            "irecv 0x12000+1024 mr 201".to_string(),
            each("isendv", 0x40000, 102),
            each("irecvv", 0x42000, 202),
            "isendv 0x10000+512,0x10400+512 mr 101".to_string(),
        ] {
            assert!(lines.contains(&expected), "{expected} in {lines:?}");
        }
    }

    /// A chunk that crosses from one region into the next goes as one request with a run of
    /// segments per region, each with its own region's registration, touching segments joined
    /// only inside a run; a redirect or a fence of either region takes the whole chunk.
    #[test]
    fn a_chunk_over_several_regions_names_each_regions_registration() {
        use crate::engine::plan::{self, Chunking, Cut, Extent};
        let (mut ch, log, table) = logging_channel(8, false);
        // Two host regions side by side in the address space: pieces of both never join.
        let ids = [0x10000, 0x20000, 0x30000].map(|base| table.register(base, 0x10000, MemKind::Host).unwrap());
        let regions: Vec<Arc<Region>> = ids.iter().map(|&id| table.get(id).unwrap()).collect();
        // Run 0: three 0x100 pieces ending at the top of region 1; run 1: two at the bottom of
        // region 2 (touching run 0's last); run 2: one in region 3.
        let segs = [0x1fd00, 0x1fe00, 0x1ff00, 0x20000, 0x20100, 0x30000].map(|addr| IoSeg { addr, len: 0x100 });
        let extent = Extent::scattered_runs(segs, Arc::from([3, 2, 1]));
        let chunking = Chunking { size: 0x400, channels: 1, cut: Cut::Spanning };
        let chunks: Vec<_> = plan::plan(1, &ids, &extent, chunking, 0).collect();
        assert_eq!(
            chunks.iter().map(|(_, runs, c)| (runs.clone(), c.len)).collect::<Vec<_>>(),
            [(0..2, 0x400), (1..3, 0x200)]
        );
        for (_, runs, chunk) in &chunks {
            ch.queue_send(chunk.clone(), &regions[runs.clone()]).unwrap();
            ch.queue_recv(chunk.clone(), &regions[runs.clone()]).unwrap();
        }
        let mut done = Vec::new();
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        let lines: Vec<String> = log.lock().clone();
        for expected in [
            "isendv 0x1fd00+768,0x20000+256 mr 101x1,102x1",
            "isendv 0x20100+256,0x30000+256 mr 102x1,103x1",
            "irecvv 0x1fd00+768,0x20000+256 mr 201x1,202x1",
        ] {
            assert!(lines.iter().any(|l| l == expected), "{expected} in {lines:?}");
        }
        // Posted: each chunk is on the regions it touches, and only those.
        assert!(ch.posted_on(ids[0]) && ch.posted_on(ids[1]) && ch.posted_on(ids[2]));
        let (_, runs, chunk) = &chunks[1];
        assert!(!chunk.touches(ids[0]) && chunk.touches(ids[2]));
        // Queued behind them, a redirect of region 3 sends the whole of the second chunk from
        // scratch and leaves the first alone.
        ch.queue_send(chunks[0].2.clone(), &regions[chunks[0].1.clone()]).unwrap();
        ch.queue_send(chunk.clone(), &regions[runs.clone()]).unwrap();
        ch.redirect(ids[2]);
        let queued: Vec<_> = ch.send_queue.iter().map(|(c, mrs)| (c.region, matches!(mrs, Mrs::Runs(_)))).collect();
        assert_eq!(queued, [(ids[0], true), (SCRATCH, false)]);
    }

    #[test]
    fn receives_are_posted_twice_as_far_ahead_as_sends() {
        let (mut ch, log, table) = logging_channel(3, false);
        let id = table.register(0x10000, 0x10000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        for i in 0..10 {
            let chunk = Chunk { flow: 1, region: id, mem: ChunkMem::At(0x10000 + i * 0x100), len: 0x100 };
            ch.queue_send(chunk.clone(), std::slice::from_ref(&region)).unwrap();
            ch.queue_recv(chunk, std::slice::from_ref(&region)).unwrap();
        }
        let mut done = Vec::new();
        assert!(ch.drive(&mut Vec::new(), &mut done).unwrap());
        assert!(done.is_empty());
        let count = |op: &str| log.lock().iter().filter(|l| l.starts_with(op)).count();
        assert_eq!((count("isend"), count("irecv")), (3, 6));
        assert!(ch.has_posted());
        assert_eq!(ch.posted_bytes(), 9 * 0x100, "the bytes of the three sends and six receives posted");
        assert!(!ch.drive(&mut Vec::new(), &mut done).unwrap(), "nothing more fits either window");
    }

    #[test]
    fn a_limited_drive_posts_sends_up_to_its_bytes_and_every_receive() {
        let (mut ch, log, table) = logging_channel(8, false);
        let id = table.register(0x10000, 0x10000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        for i in 0..5 {
            let chunk = Chunk { flow: 1, region: id, mem: ChunkMem::At(0x10000 + i * 0x800), len: 0x800 };
            ch.queue_send(chunk.clone(), std::slice::from_ref(&region)).unwrap();
            ch.queue_recv(chunk, std::slice::from_ref(&region)).unwrap();
        }
        let count = |op: &str| log.lock().iter().filter(|l| l.starts_with(op)).count();
        let (mut sent, mut done) = (Vec::new(), Vec::new());
        assert!(ch.sends_waiting(), "queued, window empty");
        // Two sends reach 0x1000 bytes; the third is left although the window has room.
        assert!(ch.drive_limited(&mut sent, &mut done, 0x1000).unwrap());
        assert_eq!((count("isend"), count("irecv"), sent.len()), (2, 5, 2));
        assert!(ch.sends_waiting());
        // A send that starts below the bound goes whole.
        ch.drive_limited(&mut sent, &mut done, 1).unwrap();
        assert_eq!(count("isend"), 3);
        assert!(!ch.drive_limited(&mut sent, &mut done, 0).unwrap(), "no bytes: no send");
        assert_eq!(count("isend"), 3);
        ch.drive(&mut sent, &mut done).unwrap();
        assert_eq!((count("isend"), sent.len()), (5, 5));
        assert!(!ch.sends_waiting(), "nothing queued");

        // A full window, or a held flow at the head, leaves nothing a drive could post.
        let (mut ch, _log, table) = logging_channel(1, false);
        let id = table.register(0x10000, 0x1000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        for off in [0, 0x100] {
            ch.queue_send(
                Chunk { flow: 3, region: id, mem: ChunkMem::At(0x10000 + off), len: 0x100 },
                std::slice::from_ref(&region),
            )
            .unwrap();
        }
        ch.hold(3);
        assert!(!ch.sends_waiting(), "held");
        ch.release(3);
        assert!(ch.sends_waiting());
        ch.drive_limited(&mut Vec::new(), &mut Vec::new(), usize::MAX).unwrap();
        assert!(!ch.sends_waiting(), "the window of one is full");
    }

    #[test]
    fn redirected_chunks_move_through_scratch_and_posted_ones_are_reported() {
        let (mut ch, log, table) = logging_channel(1, true);
        let id = table.register(0x10000, 0x10000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        for i in 0..3 {
            let chunk = Chunk { flow: 1, region: id, mem: ChunkMem::At(0x10000 + i * 0x100), len: 0x100 };
            ch.queue_send(chunk.clone(), std::slice::from_ref(&region)).unwrap();
            ch.queue_recv(chunk, std::slice::from_ref(&region)).unwrap();
        }
        let mut done = Vec::new();
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        assert_eq!(done.len(), 3, "one send and two receives fit the windows");
        ch.redirect(id);
        log.lock().clear();
        while done.len() < 6 {
            ch.drive(&mut Vec::new(), &mut done).unwrap();
        }
        // The rest went out and came in through scratch memory, without the region's registration.
        let posts: Vec<_> = log.lock().clone();
        assert_eq!(posts.len(), 3, "{posts:?}");
        for line in &posts {
            let addr = usize::from_str_radix(
                line.split(' ').nth(1).unwrap().split('+').next().unwrap().trim_start_matches("0x"),
                16,
            )
            .unwrap();
            assert!(!(0x10000..0x20000).contains(&addr), "{line}: the region was used after the redirect");
            assert!(line.ends_with("mr 0"), "{line}");
        }
        assert!(done.iter().all(|c| c.flow == 1), "scratch chunks still finish their flow");

        // Requests posted and not complete are reported for their region only.
        let (mut ch, _log, table) = logging_channel(2, false);
        let id = table.register(0x10000, 0x1000, MemKind::Host).unwrap();
        let other = table.register(0x20000, 0x1000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        ch.queue_recv(
            Chunk { flow: 1, region: id, mem: ChunkMem::At(0x10000), len: 16 },
            std::slice::from_ref(&region),
        )
        .unwrap();
        assert!(!ch.posted_on(id), "queued is not posted");
        ch.drive(&mut Vec::new(), &mut Vec::new()).unwrap();
        assert!(ch.posted_on(id) && !ch.posted_on(other));
        ch.redirect(id);
        assert!(ch.posted_on(id), "a redirect cannot take back what the transport holds");
    }

    #[test]
    fn a_held_flow_keeps_its_send_chunks_and_those_behind_them_until_released() {
        let (mut ch, log, table) = logging_channel(4, true);
        let id = table.register(0x10000, 0x1000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        for (flow, off) in [(7, 0), (8, 0x100), (7, 0x200)] {
            ch.queue_send(
                Chunk { flow, region: id, mem: ChunkMem::At(0x10000 + off), len: 0x100 },
                std::slice::from_ref(&region),
            )
            .unwrap();
        }
        ch.hold(7);
        let (mut sent, mut done) = (Vec::new(), Vec::new());
        assert!(!ch.drive(&mut sent, &mut done).unwrap(), "flow 8 waits behind held flow 7");
        assert!(sent.is_empty() && !log.lock().iter().any(|l| l.starts_with("isend")));
        ch.release(7);
        ch.drive(&mut sent, &mut done).unwrap();
        assert_eq!(sent, [7, 8, 7], "posted in queue order once released");
        assert_eq!(done.len(), 3);
    }

    #[test]
    fn a_chunk_spanning_segments_is_one_vectored_request_and_scratch_after_a_redirect() {
        let (mut ch, log, table) = logging_channel(4, true);
        let id = table.register(0x10000, 0x10000, MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        let segs: Arc<[IoSeg]> = [
            IoSeg { addr: 0x10000, len: 0x80 },
            IoSeg { addr: 0x18000, len: 0x100 },
            IoSeg { addr: 0x12000, len: 0x40 },
        ]
        .into();
        let spanning = Chunk {
            flow: 1,
            region: id,
            mem: ChunkMem::Spans { segs, first: 0, offset: 0x40, runs: None },
            len: 0x100,
        };
        assert_eq!(spanning.hull(), (0x10040, 0x18000 + 0xc0 - 0x10040));
        ch.queue_send(spanning.clone(), std::slice::from_ref(&region)).unwrap();
        ch.queue_recv(spanning.clone(), std::slice::from_ref(&region)).unwrap();
        let mut done = Vec::new();
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        assert_eq!(done.len(), 2);
        let lines = log.lock().clone();
        assert!(lines.contains(&"isendv 0x10040+64,0x18000+192 mr 101".to_string()), "{lines:?}");
        assert!(lines.contains(&"irecvv 0x10040+64,0x18000+192 mr 201".to_string()), "{lines:?}");
        // Cut off before it was posted, it moves through scratch as one plain request of its length.
        log.lock().clear();
        ch.queue_send(spanning, std::slice::from_ref(&region)).unwrap();
        ch.redirect(id);
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        let lines = log.lock().clone();
        assert!(lines.len() == 1 && lines[0].starts_with("isend ") && lines[0].ends_with("+256 mr 0"), "{lines:?}");
    }

    /// A comm whose posts and completions the test switches by hand, recording where posts point.
    #[derive(Clone, Default)]
    struct Switched(Arc<Mutex<SwitchedState>>);

    #[derive(Default)]
    struct SwitchedState {
        /// Posts are declined (`None`) while set.
        declines: bool,
        /// `test` reports requests done while set.
        completes: bool,
        /// Addresses of the requests posted, in order.
        posted: Vec<usize>,
    }

    impl Switched {
        fn post(&self, addr: usize, len: usize) -> Option<RequestId> {
            let mut st = self.0.lock();
            if st.declines {
                return None;
            }
            st.posted.push(addr);
            Some(RequestId(len as u64))
        }
        fn set(&self, declines: bool, completes: bool) {
            let mut st = self.0.lock();
            (st.declines, st.completes) = (declines, completes);
        }
        fn done(&self, req: RequestId) -> Option<usize> {
            self.0.lock().completes.then_some(req.0 as usize)
        }
    }

    impl SendComm for Switched {
        fn reg_mr(&mut self, _: usize, _: usize, _: MemKind) -> Result<MrHandle> {
            Ok(MrHandle(1))
        }
        fn dereg_mr(&mut self, _: MrHandle) {}
        unsafe fn isend(&mut self, data: *const u8, len: usize, _: MrHandle) -> Result<Option<RequestId>> {
            Ok(self.post(data as usize, len))
        }
        fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
            Ok(self.done(req))
        }
    }

    impl RecvComm for Switched {
        fn reg_mr(&mut self, _: usize, _: usize, _: MemKind) -> Result<MrHandle> {
            Ok(MrHandle(1))
        }
        fn dereg_mr(&mut self, _: MrHandle) {}
        unsafe fn irecv(&mut self, data: *mut u8, len: usize, _: MrHandle) -> Result<Option<RequestId>> {
            Ok(self.post(data as usize, len))
        }
        fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
            Ok(self.done(req))
        }
        fn irecv_consumed(&mut self, _req: RequestId) -> Result<()> {
            Ok(())
        }
    }

    fn switched_channel(window: usize) -> (Channel, Switched, Switched) {
        let (send, recv) = (Switched::default(), Switched::default());
        let table = RegionTable::default();
        let ch = Channel::new(
            Box::new(send.clone()),
            Box::new(recv.clone()),
            window,
            Windows::new(usize::MAX),
            table.removals(),
        );
        (ch, send, recv)
    }

    fn scratch_chunk(flow: u64, len: usize) -> Chunk {
        Chunk { flow, region: SCRATCH, mem: ChunkMem::At(0), len }
    }

    #[test]
    fn scratch_receives_reuse_a_few_buffers_instead_of_allocating_one_per_chunk() {
        let (mut ch, _send, recv) = switched_channel(3);
        recv.set(false, false);
        for _ in 0..2 * 3 * RECV_WINDOW_FACTOR {
            ch.queue_recv(scratch_chunk(1, 0x1000), &[]).unwrap();
        }
        let mut done = Vec::new();
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        let first: Vec<usize> = recv.0.lock().posted.clone();
        assert_eq!(first.len(), 3 * RECV_WINDOW_FACTOR, "a window of scratch receives, each its own buffer");
        let mut distinct = first.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), first.len());
        // They complete: a few buffers are kept, the rest freed; the next receives take the kept ones.
        recv.set(false, true);
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        assert_eq!(done.len(), 3 * RECV_WINDOW_FACTOR);
        assert_eq!(ch.spare.len(), SPARE_SCRATCH);
        recv.set(false, false);
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        let second: Vec<usize> = recv.0.lock().posted[first.len()..].to_vec();
        assert_eq!(second.len(), 3 * RECV_WINDOW_FACTOR);
        let reused = second.iter().filter(|a| first.contains(a)).count();
        assert!(reused >= SPARE_SCRATCH, "kept buffers are reused: {reused} of {second:?} in {first:?}");
        assert!(ch.spare.is_empty(), "every kept buffer is in use again");
        recv.set(false, true);
        ch.drive(&mut Vec::new(), &mut done).unwrap();
        assert_eq!(done.len(), 2 * 3 * RECV_WINDOW_FACTOR);
        assert_eq!(ch.spare.len(), SPARE_SCRATCH, "at most a few buffers stay");
    }

    #[test]
    fn a_post_declined_with_nothing_in_flight_asks_to_be_retried() {
        let (mut ch, send, recv) = switched_channel(2);
        for flow in 1..=3 {
            ch.queue_send(scratch_chunk(flow, 64), &[]).unwrap();
            ch.queue_recv(scratch_chunk(flow, 64), &[]).unwrap();
        }
        send.set(true, false);
        recv.set(true, false);
        let (mut sent, mut done) = (Vec::new(), Vec::new());
        assert!(!ch.drive(&mut sent, &mut done).unwrap());
        assert!(ch.needs_retry(), "nothing in flight would wake the progress thread");
        // The receive side takes its posts; the send side still declines: still a retry.
        recv.set(false, false);
        assert!(ch.drive(&mut sent, &mut done).unwrap());
        assert!(ch.needs_retry());
        send.set(false, false);
        ch.drive(&mut sent, &mut done).unwrap();
        assert_eq!(sent, [1, 2], "posted in order once accepted");
        assert!(!ch.needs_retry());
        // Declined behind a request in flight: its completion wakes the thread, no retry needed.
        send.set(true, false);
        ch.drive(&mut sent, &mut done).unwrap();
        assert!(!ch.needs_retry());
        send.set(false, true);
        recv.set(false, true);
        for _ in 0..10 {
            ch.drive(&mut sent, &mut done).unwrap();
        }
        assert_eq!(done.len(), 6, "three sends and three receives");
        assert_eq!(sent, [1, 2, 3]);
        assert!(!ch.needs_retry());
    }
}
