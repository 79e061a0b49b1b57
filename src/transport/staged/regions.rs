//! The part both staged comm kinds share: the registrations handed out (each says whether its
//! memory is host, passed to the inner comm, or device, staged) and the comm's staging ring while
//! it holds one. A comm takes a ring from its net's pool (`pool.rs`) when it first stages after
//! being idle and gives it back once nothing it posted is outstanding; memory of another GPU of the
//! process gets a lane of that GPU's streams and events in the ring when it is registered or
//! staged (the lane stays with the ring).

use std::time::Instant;

use super::pool::{COUNTS, count};
use super::setup::Setup;
use crate::cuda::unpack::addressable;
use crate::cuda::{self, Gpu, Location, StagingRing};
use crate::error::{Error, Result, UcclStatus};
use crate::transport::{IoSeg, MemKind, MrHandle, MrRun, RecvComm, SendComm, check_runs};

/// Registration calls of the wrapped comm, whichever direction it moves.
pub(super) trait InnerRegistry {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle>;
    fn deregister(&mut self, mr: MrHandle);
    /// Asks a receiving comm to write what lands in `[addr, addr + len)` back from the CPU's
    /// caches, for the copies up that read it next ([`RecvComm::write_back_received`]); a
    /// sending comm's slots are written by the copy engine and need nothing.
    fn read_by_dma(&mut self, _addr: usize, _len: usize) -> bool {
        false
    }
    /// Ends `read_by_dma` for a range no receive is posted into.
    fn not_read_by_dma(&mut self, _addr: usize, _len: usize) {}
}

impl InnerRegistry for Box<dyn SendComm> {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.reg_mr(addr, len, kind)
    }
    fn deregister(&mut self, mr: MrHandle) {
        self.dereg_mr(mr)
    }
}

impl InnerRegistry for Box<dyn RecvComm> {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.reg_mr(addr, len, kind)
    }
    fn deregister(&mut self, mr: MrHandle) {
        self.dereg_mr(mr)
    }
    fn read_by_dma(&mut self, addr: usize, len: usize) -> bool {
        self.write_back_received(addr, len)
    }
    fn not_read_by_dma(&mut self, addr: usize, len: usize) {
        self.stop_write_back(addr, len)
    }
}

#[derive(Clone, Copy, Debug)]
enum Registered {
    /// Host memory: the inner comm's own handle for it.
    Host {
        inner: MrHandle,
    },
    Device {
        base: usize,
        len: usize,
        device: i32,
    },
}

/// How one posted buffer travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// Straight through the inner comm, with its handle.
    Direct(MrHandle),
    /// Through a staging slot, copied on the lane of this GPU (the memory's own).
    Staged(i32),
}

impl Route {
    pub(super) fn staged(self) -> bool {
        matches!(self, Route::Staged(_))
    }
}

/// A vectored request as routing found it, in one pass over its segments: how it travels, its
/// bytes, and whether the segment kernel's tiles can name every segment (`unpack::addressable`).
/// The ring takes the last two from here rather than walking the segments again: at 512 B blocks
/// each pass over a chunk's 4,096 segments cost an H200 host's engine thread 6-14 us, on a path
/// whose thread the staging trace shows busy through the whole transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Routed {
    pub(super) route: Route,
    pub(super) len: usize,
    pub(super) addressable: bool,
}

/// The segment lists of a busy comm's done requests, kept for its next ones: a staged chunk of 512
/// B blocks keeps a copy of its 4,096 segments (64 KiB) until its copy is queued, which otherwise
/// came from the allocator and went back at each request. A steady stream gives one back for each
/// it takes, so two are kept; an idle comm keeps none (`clear`).
#[derive(Default)]
pub(super) struct SpareSegments(Vec<Vec<IoSeg>>);

impl SpareSegments {
    const KEPT: usize = 2;

    /// A copy of `iov`, in a kept list if there is one.
    pub(super) fn copy(&mut self, iov: &[IoSeg]) -> Vec<IoSeg> {
        let mut segs = self.0.pop().unwrap_or_default();
        segs.clear();
        segs.extend_from_slice(iov);
        segs
    }

    /// A done request's list, kept if fewer than two are.
    pub(super) fn give(&mut self, segs: Option<Vec<IoSeg>>) {
        if let Some(segs) = segs.filter(|_| self.0.len() < Self::KEPT) {
            self.0.push(segs);
        }
    }

    pub(super) fn clear(&mut self) {
        self.0 = Vec::new();
    }
}

pub(super) struct Staging {
    pub(super) setup: Setup,
    /// The registrations handed out, by handle. Handles only grow, so pushing keeps the list
    /// sorted and a lookup is a binary search, without hashing: a request over blocks alternating
    /// between regions looks one up per run, and std's SipHash there was ~1.4 % of a
    /// 98,304-block write's samples (2-core VM).
    registered: Vec<(usize, Registered)>,
    next_handle: usize,
    /// Held from a comm's first staged post after being idle until nothing it posted is
    /// outstanding; `ring_mr` is its registration with the inner comm meanwhile.
    pub(super) ring: Option<StagingRing>,
    pub(super) ring_mr: MrHandle,
    /// Whether the ring's range is written back by the inner comm (`read_by_dma`).
    ring_written_back: bool,
}

impl Staging {
    pub(super) fn new(setup: Setup) -> Staging {
        setup.pool.lock().comm_made();
        Staging {
            setup,
            registered: Vec::new(),
            next_handle: 1,
            ring: None,
            ring_mr: MrHandle::NONE,
            ring_written_back: false,
        }
    }

    /// The comm's share of its net's pool (`SendComm::make_ahead`): while the pool holds fewer rings
    /// than its bound, one is made now for the engine's GPU (when the engine names one), so that a
    /// connection's first device transfer pins nothing. A failure leaves it to the first use, which
    /// reports it. Same-host connections, whose GPU memory takes device copies, never ask: rings
    /// made as their channels came up took 25-30 ms from the first request of SGLang's push between
    /// two GPUs of one host (2 x H100).
    pub(super) fn make_ahead(&self) {
        let warm = self.setup.pool.lock().wants_ring();
        if let (true, Some(gpu)) = (warm, self.setup.gpu.get().cloned()) {
            match self.setup.make_ring(&gpu) {
                Ok(ring) => {
                    self.setup.pool.lock().warmed(ring, Instant::now());
                    count(&COUNTS.at_connect, 1);
                }
                Err(e) => log::warn!("staging ring for GPU {} not made ahead: {e}", gpu.ordinal()),
            }
        }
    }

    pub(super) fn register(
        &mut self,
        inner: &mut dyn InnerRegistry,
        addr: usize,
        len: usize,
        kind: MemKind,
    ) -> Result<MrHandle> {
        let entry = match kind {
            MemKind::Host => {
                // The inner comm would read or write it from the CPU: device memory there is a crash.
                if let Location::Device { ordinal } = cuda::locate(addr, len)? {
                    return Err(Error::invalid(format!(
                        "[{addr:#x}, +{len}) was registered as host memory but is memory of GPU {ordinal}"
                    )));
                }
                Registered::Host { inner: inner.register(addr, len, kind)? }
            }
            MemKind::Cuda { device } => {
                cuda::slots::traffic_coming();
                cuda::driver().map_err(|e| e.context("cannot register GPU memory"))?;
                let found = cuda::locate(addr, len)?;
                if found != (Location::Device { ordinal: device }) {
                    return Err(Error::invalid(format!(
                        "[{addr:#x}, +{len}) was registered as memory of GPU {device} but is {found:?}"
                    )));
                }
                // Opened now, so that a post into it later cannot fail there; the comm's ring gets
                // a lane of it when it first stages it.
                Gpu::open(device)?;
                Registered::Device { base: addr, len, device }
            }
        };
        // Never 0: that is MrHandle::NONE.
        let handle = self.next_handle;
        self.next_handle += 1;
        self.registered.push((handle, entry));
        Ok(MrHandle(handle))
    }

    pub(super) fn deregister(&mut self, inner: &mut dyn InnerRegistry, mr: MrHandle) {
        let Some(at) = self.position(mr) else { return };
        if let (_, Registered::Host { inner: handle }) = self.registered.remove(at) {
            inner.deregister(handle);
        }
    }

    fn position(&self, mr: MrHandle) -> Option<usize> {
        position(&self.registered, mr)
    }

    /// How `[addr, addr + len)` posted with `mr` travels. With no handle (the engine's own small
    /// buffers, or callers that never register) the pointer itself says, when a driver exists.
    pub(super) fn route(&mut self, mr: MrHandle, addr: usize, len: usize) -> Result<Route> {
        let device = if mr == MrHandle::NONE {
            match cuda::locate(addr, len.max(1))? {
                Location::Host => return Ok(Route::Direct(MrHandle::NONE)),
                Location::Device { ordinal } => ordinal,
            }
        } else {
            match self.position(mr).map(|at| &self.registered[at].1) {
                None => return Err(Error::invalid(format!("memory registration {} is unknown to this comm", mr.0))),
                Some(&Registered::Host { inner }) => return Ok(Route::Direct(inner)),
                Some(&Registered::Device { base, len: region_len, device }) => {
                    inside(addr, len, base, region_len)?;
                    device
                }
            }
        };
        let slot_size = self.setup.params.slot_size;
        if len > slot_size {
            return Err(Error::invalid(format!(
                "a {len}-byte GPU chunk exceeds the {slot_size}-byte staging slot (UCCL_TCPX_CHUNK_SIZE)"
            )));
        }
        Ok(Route::Staged(device))
    }

    /// How a run of segments posted with `mr` travels: as its first one, the others checked
    /// against the same registration, looked up once a run (a chunk of 512 B blocks is 4,096
    /// segments). A host registration's segments are not checked: the inner comm checks nothing
    /// per segment either. Without a handle each segment's own pointer says. The run's bytes and
    /// whether the segment kernel can name them all are taken in the same pass ([`Routed`]).
    fn route_run(&mut self, mr: MrHandle, segs: &[IoSeg]) -> Result<Routed> {
        let route = self.route(mr, segs[0].addr, segs[0].len)?;
        let registered = self.position(mr).map(|at| &self.registered[at].1);
        let (mut len, mut all) = (segs[0].len, addressable(segs[0].addr as u64, segs[0].len as u64));
        match (mr, registered) {
            (MrHandle::NONE, _) => {
                for seg in &segs[1..] {
                    if self.route(mr, seg.addr, seg.len)? != route {
                        return Err(mixed());
                    }
                    len = len.saturating_add(seg.len);
                    all &= addressable(seg.addr as u64, seg.len as u64);
                }
            }
            (_, Some(&Registered::Device { base, len: region_len, .. })) => {
                for seg in &segs[1..] {
                    inside(seg.addr, seg.len, base, region_len)?;
                    len = len.saturating_add(seg.len);
                    all &= addressable(seg.addr as u64, seg.len as u64);
                }
            }
            _ => len = segs.iter().fold(0usize, |n, s| n.saturating_add(s.len)),
        }
        Ok(Routed { route, len, addressable: all })
    }

    /// How the segments of a vectored request posted with `mrs` travel: all of them the same way,
    /// in one slot when staged (on the GPU of all of them). Host segments go straight to the inner
    /// comm, whose handles for their runs are left in `inner`.
    pub(super) fn route_segments(&mut self, mrs: &[MrRun], iov: &[IoSeg], inner: &mut Vec<MrRun>) -> Result<Routed> {
        check_runs(iov, mrs, "request")?;
        inner.clear();
        let mut routed: Option<Routed> = None;
        let mut at = 0;
        for run in mrs {
            let segs = &iov[at..at + run.segs];
            at += run.segs;
            let this = self.route_run(run.mr, segs)?;
            routed = Some(match routed {
                None => this,
                Some(r) => {
                    match (r.route, this.route) {
                        (Route::Direct(_), Route::Direct(_)) => {}
                        (Route::Staged(a), Route::Staged(b)) if a == b => {}
                        _ => return Err(mixed()),
                    }
                    let len = r.len.saturating_add(this.len);
                    Routed { route: r.route, len, addressable: r.addressable && this.addressable }
                }
            });
            if let Route::Direct(mr) = this.route {
                inner.push(MrRun { segs: run.segs, mr });
            }
        }
        let routed = routed.ok_or_else(|| Error::invalid("a vectored request needs at least one segment"))?;
        let slot_size = self.setup.params.slot_size;
        if routed.route.staged() && routed.len > slot_size {
            return Err(Error::invalid(format!(
                "a {}-byte GPU chunk exceeds the {slot_size}-byte staging slot (UCCL_TCPX_CHUNK_SIZE)",
                routed.len
            )));
        }
        Ok(routed)
    }

    /// The ring, staging memory of GPU `device`: taken from the pool (or made, where it holds
    /// none) when the comm holds none, given a lane of `device` where it has none.
    pub(super) fn ring(&mut self, inner: &mut dyn InnerRegistry, device: i32) -> Result<&mut StagingRing> {
        if self.ring.is_none() {
            let pooled = self.setup.pool.lock().take(StagingRing::pinned_slots);
            let ring = match pooled {
                Some(ring) => {
                    count(&COUNTS.taken, 1);
                    ring
                }
                None => {
                    let ring = self.setup.make_ring(&Gpu::open(device)?)?;
                    self.setup.pool.lock().made(Instant::now());
                    count(&COUNTS.on_first_use, 1);
                    ring
                }
            };
            ring.hold(true);
            let (base, len) = ring.host_range();
            self.ring = Some(ring);
            if let Err(e) = self.register_ring_range(inner, base, len) {
                self.give_back_ring(inner);
                return Err(e);
            }
        }
        let ring = self.ring.as_mut().ok_or_else(|| Error::new(UcclStatus::ErrInternal, "staging ring missing"))?;
        if !ring.stages(device) {
            ring.add_gpu(&Gpu::open(device)?)?;
            ring.prepare_kernels();
            count(&COUNTS.lanes_added, 1);
        }
        Ok(ring)
    }

    pub(super) fn ring_mut(&mut self) -> Result<&mut StagingRing> {
        self.ring.as_mut().ok_or_else(|| Error::new(UcclStatus::ErrInternal, "staged request without a staging ring"))
    }

    /// Registers the ring's host range `[base, base + len)` with the inner comm, and asks a
    /// receiving one to write what lands there back from the CPU's caches (with the knob on).
    pub(super) fn register_ring_range(&mut self, inner: &mut dyn InnerRegistry, base: usize, len: usize) -> Result<()> {
        self.ring_mr = inner.register(base, len, MemKind::Host)?;
        self.ring_written_back = self.setup.params.tuning.write_back && inner.read_by_dma(base, len);
        Ok(())
    }

    /// Once nothing the comm posted is outstanding (`idle`): its ring goes back to the pool, its
    /// registration with the inner comm with it. A ring some request still holds a slot of stays.
    pub(super) fn idle(&mut self, inner: &mut dyn InnerRegistry) {
        if self.ring.as_ref().is_some_and(|r| r.in_use() == 0) {
            self.give_back_ring(inner);
        }
    }

    fn give_back_ring(&mut self, inner: &mut dyn InnerRegistry) {
        let Some(ring) = self.ring.take() else { return };
        let (base, len) = ring.host_range();
        if self.ring_written_back {
            inner.not_read_by_dma(base, len);
            self.ring_written_back = false;
        }
        inner.deregister(std::mem::replace(&mut self.ring_mr, MrHandle::NONE));
        count(&COUNTS.given_back, 1);
        ring.hold(false);
        let freed = self.setup.pool.lock().give(ring, Instant::now());
        count(&COUNTS.freed, freed.len());
    }

    /// The comm closes: an idle ring goes back to the pool, one with requests outstanding (a
    /// failed comm's, copies perhaps still queued) goes with the comm, whose drop waits for them;
    /// the pool then frees what is due under its smaller bound (all of it with no comm left).
    pub(super) fn close(&mut self, inner: &mut dyn InnerRegistry, idle: bool) {
        if idle {
            self.idle(inner);
        }
        let mut pool = self.setup.pool.lock();
        if self.ring.is_some() {
            pool.lost();
        }
        let freed = pool.comm_dropped(Instant::now());
        drop(pool);
        count(&COUNTS.freed, freed.len() + usize::from(self.ring.is_some()));
    }
}

/// Where the registration `mr` is in `registered` (sorted by handle). Handles are distinct and
/// increasing, so the entry of `mr` lies at most `mr - first handle` entries in: exactly there
/// until a registration below it is released, which most comms never do while moving data; only
/// otherwise is the list searched (a binary search per run was still ~1.6 % of a 98,304-block
/// write's samples).
fn position(registered: &[(usize, Registered)], mr: MrHandle) -> Option<usize> {
    let first = registered.first()?.0;
    let most = mr.0.checked_sub(first)?.min(registered.len() - 1);
    if registered[most].0 == mr.0 {
        return Some(most);
    }
    registered[..most].binary_search_by_key(&mr.0, |&(handle, _)| handle).ok()
}

/// `[addr, addr + len)` within the GPU registration `[base, base + region_len)`.
fn inside(addr: usize, len: usize, base: usize, region_len: usize) -> Result<()> {
    if addr >= base && addr.checked_add(len).is_some_and(|end| end <= base + region_len) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "buffer [{addr:#x}, +{len}) lies outside its GPU registration [{base:#x}, +{region_len})"
    )))
}

fn mixed() -> Error {
    Error::invalid("the segments of one request lie in host memory and GPU memory, or on two GPUs")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(handle: usize) -> (usize, Registered) {
        (handle, Registered::Host { inner: MrHandle(handle * 10) })
    }

    #[test]
    fn a_handle_is_found_where_it_is_with_or_without_releases_below_it() {
        let mut registered: Vec<_> = (1..=100).map(host).collect();
        let found = |list: &[(usize, Registered)], mr: usize| position(list, MrHandle(mr)).map(|at| list[at].0);
        assert!((1..=100).all(|mr| found(&registered, mr) == Some(mr)), "no release: each at its own place");
        // Released handles leave holes: the rest are still found, the released ones never.
        for gone in [1, 7, 8, 50, 100] {
            let at = position(&registered, MrHandle(gone)).unwrap();
            registered.remove(at);
        }
        for mr in 0..=102 {
            let live = (1..=100).contains(&mr) && ![1, 7, 8, 50, 100].contains(&mr);
            assert_eq!(found(&registered, mr), live.then_some(mr), "handle {mr}");
        }
        assert_eq!(position(&[], MrHandle(1)), None);
        assert_eq!(found(&[host(5)], 4), None, "below the first handle");
    }

    #[test]
    fn a_busy_comm_reuses_two_segment_lists_and_an_idle_one_keeps_none() {
        let mut spare = SpareSegments::default();
        let iov: Vec<_> = (0..4096).map(|i| IoSeg { addr: 0x1000 + i * 1024, len: 512 }).collect();
        let lists: Vec<_> = (0..3).map(|_| spare.copy(&iov)).collect();
        assert!(lists.iter().all(|l| *l == iov));
        let held: Vec<_> = lists.iter().map(|l| l.as_ptr()).collect();
        for list in lists {
            spare.give(Some(list));
        }
        assert_eq!(spare.0.len(), SpareSegments::KEPT, "the third list is freed");
        let again = spare.copy(&iov[..10]);
        assert_eq!(again, iov[..10]);
        assert!(held.contains(&again.as_ptr()), "a kept list is reused");
        spare.give(None);
        spare.clear();
        assert!(spare.0.is_empty() && spare.0.capacity() == 0);
    }

    #[test]
    fn every_segment_of_a_run_lies_in_its_registration() {
        let mut staging = Staging::new(Setup::new(super::super::StagingParams::new(4 << 20, 4), 16));
        let (base, len) = (0x10_0000, 0x80_0000);
        staging.registered = vec![(1, Registered::Device { base, len, device: 3 }), host(2)];
        staging.next_handle = 3;
        let seg = |addr, len| IoSeg { addr, len };
        let (mut inner, gpu, host_mr) = (Vec::new(), MrHandle(1), MrHandle(2));
        // 4,096 blocks of 512 B, 1 KiB apart: staged on the registration's GPU.
        let blocks: Vec<_> = (0..4096).map(|i| seg(base + i * 1024, 512)).collect();
        let routed = staging.route_segments(&[MrRun { segs: blocks.len(), mr: gpu }], &blocks, &mut inner);
        assert_eq!(routed.unwrap(), Routed { route: Route::Staged(3), len: 4096 * 512, addressable: true });
        // Two runs of one registration: their bytes add up, and one segment past what a tile can
        // name (here the registration's own range, made to reach that far) makes the request
        // unaddressable for the kernel.
        let halves = [MrRun { segs: 2048, mr: gpu }, MrRun { segs: 2048, mr: gpu }];
        assert_eq!(staging.route_segments(&halves, &blocks, &mut inner).unwrap().len, 4096 * 512);
        let far = 1usize << crate::cuda::unpack::plan::ADDRESS_BITS;
        staging.registered[0].1 = Registered::Device { base, len: far, device: 3 };
        let mut reaching = blocks.clone();
        reaching[3000] = seg(far - 256, 512);
        let routed = staging.route_segments(&halves, &reaching, &mut inner).unwrap();
        assert_eq!((routed.route, routed.addressable), (Route::Staged(3), false));
        staging.registered[0].1 = Registered::Device { base, len, device: 3 };
        // One block past the end, anywhere in the run, refuses the request.
        for at in [1, 2000, 4095] {
            let mut bad = blocks.clone();
            bad[at] = seg(base + len - 256, 512);
            let err = staging.route_segments(&[MrRun { segs: bad.len(), mr: gpu }], &bad, &mut inner).unwrap_err();
            assert!(err.to_string().contains("outside its GPU registration"), "{err}");
            bad[at] = seg(base - 512, 512);
            assert!(staging.route_segments(&[MrRun { segs: bad.len(), mr: gpu }], &bad, &mut inner).is_err());
        }
        // A run of the host registration goes straight through with its inner handle; mixing it
        // with a staged run is refused.
        let host_segs = [seg(0x9000_0000, 64), seg(0x9000_1000, 64)];
        let routed = staging.route_segments(&[MrRun { segs: 2, mr: host_mr }], &host_segs, &mut inner).unwrap();
        assert_eq!(
            (routed.route, routed.len, inner.as_slice()),
            (Route::Direct(MrHandle(20)), 128, &[MrRun { segs: 2, mr: MrHandle(20) }][..])
        );
        let both = [blocks[0], host_segs[0]];
        let runs = [MrRun { segs: 1, mr: gpu }, MrRun { segs: 1, mr: host_mr }];
        assert!(staging.route_segments(&runs, &both, &mut inner).is_err());
        // A chunk larger than a slot (4 MiB here) is refused.
        let big: Vec<_> = (0..3).map(|i| seg(base + i * (2 << 20), 2 << 20)).collect();
        assert!(staging.route_segments(&[MrRun { segs: 3, mr: gpu }], &big, &mut inner).is_err());
    }
}
