//! Registered memory and the capabilities advertised for it. A peer's one-sided request is honoured
//! only when it names a region of this engine, carries that region's random token, and lies inside a
//! window that `prepare_fifo` advertised.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::huge_pages::{self, KnownMappings};
use crate::cuda::ipc::Export;
use crate::error::{Error, Result};
use crate::proto::{Capability, FifoItem, RemoteSeg, TokenBinding};
use crate::transport::MemKind;

/// Distinct windows a region may advertise; callers normally advertise once per registration.
const MAX_WINDOWS_PER_REGION: usize = crate::proto::MAX_IPC_WINDOWS;

/// The least wait, after a collapse of a region left extents on small pages (memory not written
/// yet, as in a KV-cache pool filled block by block, or pinned by a copy at every try), before a
/// transfer out of the region asks for them again.
const RECOLLAPSE_AFTER: Duration = Duration::from_secs(10);
/// That wait in multiples of the last collapse's length, so that going over a large region again
/// (its huge extents cost a look each) keeps to a hundredth of the looker thread.
const RECOLLAPSE_GAP_PER_RUN: u32 = 100;
/// The most that rule makes the wait.
const MAX_RECOLLAPSE_GAP: Duration = Duration::from_secs(600);
/// `Region::collapse_due`: never asked yet, and not to be asked (again).
const COLLAPSE_NOW: u64 = 0;
const COLLAPSE_NOT_AGAIN: u64 = u64::MAX;

#[derive(Debug)]
pub struct Region {
    pub id: u64,
    pub base: usize,
    pub len: usize,
    pub kind: MemKind,
    token: u64,
    windows: Mutex<Vec<(usize, usize)>>,
    /// Set by `mr_destroy`; transport registrations are released once no flow holds the region.
    removed: AtomicBool,
    /// Device copies of the same-host path in flight on it, from any engine of this process; a
    /// deregistration returns only once none is left.
    device_copies: AtomicUsize,
    /// The CUDA IPC handle of the allocation holding a device region, asked for once.
    ipc: OnceLock<Option<Export>>,
    /// A device region lies inside one allocation, asked for once (`in_one_allocation`).
    one_allocation: OnceLock<bool>,
    /// What this process's mappings lie on, shared by every region of the process
    /// (`huge_pages/`).
    pages: Arc<KnownMappings>,
    /// The last answer of `pages` about this region, with the cache's generation it was given at
    /// (`generation << 1 | huge`; 0: none yet): a post asks once per settled read, not under the
    /// process-wide cache's lock every time.
    huge_answer: AtomicU64,
    /// The first generation of `pages` whose read began after the registration: an answer of an
    /// earlier one may describe memory unmapped since, whose addresses this region's reuses.
    fresh_from: u64,
    /// When the collapse of its memory into huge pages may be asked for (`collapse_into_huge_pages`):
    /// `COLLAPSE_NOW` until the first ask, `COLLAPSE_NOT_AGAIN` while one runs and after one that
    /// left nothing to gain, else the CLOCK_MONOTONIC ns from which extents it left small are
    /// asked for again.
    collapse_due: AtomicU64,
    /// The least wait before that (`RECOLLAPSE_AFTER`; shorter in tests).
    recollapse_after: Duration,
}

impl Region {
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        range_within(addr, len, self.base, self.len)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Counts a device copy that reads or writes the region until `copy_ended`. Callers hold a
    /// lock that the region's deregistration takes after removing it (a connection's), and check
    /// `is_removed` under it first, so a deregistration that returns has seen every such copy.
    pub fn copy_started(&self) {
        self.device_copies.fetch_add(1, Ordering::AcqRel);
    }

    pub fn copy_ended(&self) {
        self.device_copies.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn copies_in_flight(&self) -> usize {
        self.device_copies.load(Ordering::Acquire)
    }

    /// The windows advertised for the region so far.
    pub fn windows(&self) -> Vec<(usize, usize)> {
        self.windows.lock().clone()
    }

    /// Whether the region's host memory lies mostly on huge pages, as `/proc/self/smaps` said at
    /// its last read: memory mapped since that read queues another on the looker thread and, until
    /// its answer is in, says small pages (as does memory whose pages changed size in place until
    /// the read `KnownMappings::refresh` queued is in); device memory never lies on huge pages here.
    /// A "huge pages" answer from a read that began before the registration queues a new read,
    /// and holds until it is in.
    pub fn on_huge_pages(&self) -> bool {
        if self.kind != MemKind::Host {
            return false;
        }
        let generation = self.pages.generation();
        let last = self.huge_answer.load(Ordering::Acquire);
        if last != 0 && last >> 1 == generation {
            return last & 1 == 1;
        }
        let huge = self.pages.on_huge_pages([(self.base, self.len)]);
        self.huge_answer.store(generation << 1 | u64::from(huge), Ordering::Release);
        // A source thought huge skips the network band and is never collapsed, so a "huge" that
        // may be of memory mapped here before has the cache read again (once per generation:
        // the answer above is kept until the next read settles).
        if huge && generation < self.fresh_from {
            self.pages.refresh();
        }
        huge
    }

    /// Asks for its host memory to be collapsed into huge pages in place, in the background
    /// (`huge_pages/collapse.rs`): called when a peer of this host is to copy out of it, which pins
    /// its pages one by one on small pages. Once per region, and again for extents a collapse left
    /// small, from `RECOLLAPSE_AFTER` (or a hundred times that collapse's length) after it ended.
    /// The work stops at deregistration; when it collapsed extents, this process's page-size
    /// answers are read afresh.
    pub fn collapse_into_huge_pages(self: &Arc<Self>) {
        let due = self.collapse_due.load(Ordering::Acquire);
        if self.kind != MemKind::Host
            || !collapse_due_at(due)
            || self.collapse_due.compare_exchange(due, COLLAPSE_NOT_AGAIN, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return;
        }
        let began = crate::trace::clock_ns();
        let (wanted, done) = (Arc::downgrade(self), Arc::downgrade(self));
        let pages = self.pages.clone();
        let (base, len) = (self.base, self.len);
        huge_pages::collapse_in_background(
            base,
            len,
            move || wanted.upgrade().is_some_and(|r| !r.is_removed()),
            move |collapsed| {
                log::debug!("region at {base:#x} (+{len}): {collapsed:?}");
                if collapsed.extents > 0 {
                    pages.refresh();
                }
                if let Some(region) = done.upgrade()
                    && collapsed.left_small()
                {
                    let now = crate::trace::clock_ns();
                    let took = Duration::from_nanos(now.saturating_sub(began));
                    let gap = region
                        .recollapse_after
                        .max(took.saturating_mul(RECOLLAPSE_GAP_PER_RUN).min(MAX_RECOLLAPSE_GAP));
                    let again =
                        now.saturating_add(gap.as_nanos().try_into().unwrap_or(u64::MAX)).min(COLLAPSE_NOT_AGAIN - 1);
                    region.collapse_due.store(again, Ordering::Release);
                }
            },
        );
    }

    /// `collapse_due` itself, for tests.
    #[cfg(test)]
    fn collapse_due_ns(&self) -> u64 {
        self.collapse_due.load(Ordering::Acquire)
    }

    /// Whether a collapse may be asked for now: the posting path asks this before it hands one on,
    /// so a region's later transfers cost one load (and a clock read while extents wait to be
    /// asked for again).
    pub fn collapse_due(&self) -> bool {
        collapse_due_at(self.collapse_due.load(Ordering::Relaxed))
    }

    /// Whether one copy may run over any range of the region: host memory, or device memory
    /// inside one allocation (the driver refuses a copy that runs from one allocation into the
    /// next, however close they lie). Asked for once, on first use; an allocation the driver does
    /// not describe counts as several.
    pub fn in_one_allocation(&self) -> bool {
        let MemKind::Cuda { device } = self.kind else { return true };
        *self.one_allocation.get_or_init(|| {
            let end = self.base as u64 + self.len as u64;
            match crate::cuda::Gpu::open(device).and_then(|gpu| crate::cuda::pointer::allocation_of(&gpu, self.base)) {
                Ok((base, len)) => base <= self.base as u64 && end <= base.saturating_add(len),
                Err(e) => {
                    log::debug!(
                        "memory region {}: no allocation range ({e}); its segments are copied one by one",
                        self.id
                    );
                    false
                }
            }
        })
    }

    /// The CUDA IPC handle of the allocation holding this device region, made on first use; `None`
    /// for host memory, for allocations without one (see `cuda::ipc::export`) and for a region
    /// that runs past its allocation.
    pub fn ipc_export(&self) -> Option<Export> {
        *self.ipc.get_or_init(|| {
            let MemKind::Cuda { device } = self.kind else { return None };
            // A registration running on into a neighbouring allocation cannot be reached through
            // one handle.
            if !self.in_one_allocation() {
                log::info!("memory region {} spans more than one CUDA allocation: no IPC handle", self.id);
                return None;
            }
            let exported = crate::cuda::Gpu::open(device).and_then(|gpu| crate::cuda::ipc::export(&gpu, self.base));
            exported.unwrap_or_else(|e| {
                log::warn!("no CUDA IPC handle for memory region {}: {e}", self.id);
                None
            })
        })
    }
}

fn collapse_due_at(due: u64) -> bool {
    due == COLLAPSE_NOW || (due != COLLAPSE_NOT_AGAIN && crate::trace::clock_ns() >= due)
}

fn range_within(addr: usize, len: usize, base: usize, base_len: usize) -> bool {
    match (addr.checked_add(len), base.checked_add(base_len)) {
        (Some(end), Some(base_end)) => addr >= base && end <= base_end,
        _ => false,
    }
}

pub fn check_range(addr: usize, len: usize) -> Result<()> {
    if addr == 0 {
        return Err(Error::invalid("buffer address is NULL"));
    }
    if len == 0 {
        return Err(Error::invalid("size is 0"));
    }
    if addr.checked_add(len).is_none() {
        return Err(Error::invalid(format!("buffer {addr:#x} + {len} bytes wraps around the address space")));
    }
    Ok(())
}

pub struct RegionTable {
    regions: RwLock<HashMap<u64, Arc<Region>>>,
    next_id: AtomicU64,
    /// Counts removals, so channels notice cheaply that a registration cache may hold dead regions.
    removals: Arc<AtomicU64>,
    /// What this process's memory lies on, handed to every region.
    pages: Arc<KnownMappings>,
    /// Handed to every region (`RECOLLAPSE_AFTER`).
    recollapse_after: Duration,
}

impl Default for RegionTable {
    fn default() -> RegionTable {
        RegionTable::with_pages(KnownMappings::ours())
    }
}

impl RegionTable {
    pub(crate) fn with_pages(pages: Arc<KnownMappings>) -> RegionTable {
        RegionTable {
            regions: RwLock::default(),
            next_id: AtomicU64::new(0),
            removals: Arc::default(),
            pages,
            recollapse_after: RECOLLAPSE_AFTER,
        }
    }

    /// Regions registered from now on ask for extents a collapse left small again after `gap`.
    #[cfg(test)]
    fn recollapsing_after(mut self, gap: Duration) -> RegionTable {
        self.recollapse_after = gap;
        self
    }

    pub fn register(&self, addr: usize, len: usize, kind: MemKind) -> Result<u64> {
        check_range(addr, len)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let region = Region {
            id,
            base: addr,
            len,
            kind,
            token: crate::transport::socket::random_u64(),
            windows: Mutex::new(Vec::new()),
            removed: AtomicBool::new(false),
            device_copies: AtomicUsize::new(0),
            ipc: OnceLock::new(),
            one_allocation: OnceLock::new(),
            pages: self.pages.clone(),
            huge_answer: AtomicU64::new(0),
            fresh_from: self.pages.generation_read_after_now(),
            collapse_due: AtomicU64::new(COLLAPSE_NOW),
            recollapse_after: self.recollapse_after,
        };
        self.regions.write().insert(id, Arc::new(region));
        Ok(id)
    }

    /// Takes the region out of the table: from now on no request is authorized for it and no post
    /// accepts it (a post that looked it up earlier finds it removed under its connection lock).
    /// Cutting off what already uses it is the engine's part, after this returned.
    pub fn remove(&self, id: u64) -> Result<Arc<Region>> {
        let mut regions = self.regions.write();
        let region =
            regions.remove(&id).ok_or_else(|| Error::not_found(format!("memory region {id} is not registered")))?;
        region.removed.store(true, Ordering::Release);
        drop(regions);
        self.removals.fetch_add(1, Ordering::Release);
        Ok(region)
    }

    pub fn removals(&self) -> Arc<AtomicU64> {
        self.removals.clone()
    }

    pub fn get(&self, id: u64) -> Result<Arc<Region>> {
        self.regions
            .read()
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("memory region {id} is not registered with this engine")))
    }

    /// A local buffer the caller hands us must lie inside the region it names.
    pub fn local(&self, id: u64, addr: usize, len: usize) -> Result<Arc<Region>> {
        check_range(addr, len)?;
        let region = self.get(id)?;
        if !region.contains(addr, len) {
            return Err(Error::invalid(format!(
                "buffer [{addr:#x}, +{len}) lies outside memory region {id} [{:#x}, +{})",
                region.base, region.len
            )));
        }
        Ok(region)
    }

    /// A receive's buffer, posted for up to `max` bytes: it must start inside region `id` but may
    /// run past the region's end, as an RDMA receive may (UCCL's tests post receives larger than
    /// their registration). What keeps writes inside the registration is the check when a message
    /// is matched to it: the bytes that arrive must fit ([`Region::contains`]).
    pub fn receive(&self, id: u64, addr: usize, max: usize) -> Result<Arc<Region>> {
        check_range(addr, max)?;
        let region = self.get(id)?;
        if !region.contains(addr, 1) {
            return Err(Error::invalid(format!(
                "receive buffer {addr:#x} does not start inside memory region {id} [{:#x}, +{})",
                region.base, region.len
            )));
        }
        Ok(region)
    }

    pub fn find_containing(&self, addr: usize) -> Option<Arc<Region>> {
        self.regions.read().values().find(|r| r.contains(addr, 1)).cloned()
    }

    /// Mints the capability for `[addr, addr + len)` of region `id`.
    pub fn advertise(&self, id: u64, addr: usize, len: usize) -> Result<FifoItem> {
        let region = self.local(id, addr, len)?;
        let size = u32::try_from(len).map_err(|_| {
            Error::invalid(format!(
                "cannot advertise {len} bytes in one FifoItem: its size field holds at most 4 GiB - 1"
            ))
        })?;
        let mut windows = region.windows.lock();
        if !windows.contains(&(addr, len)) {
            if windows.len() >= MAX_WINDOWS_PER_REGION {
                return Err(Error::invalid(format!(
                    "memory region {id} already advertises {MAX_WINDOWS_PER_REGION} windows; advertise the whole region once instead"
                )));
            }
            windows.push((addr, len));
        }
        Ok(FifoItem::with_capability(addr as u64, size, Capability { region: id, token: region.token }))
    }

    /// Decides a peer's one-sided request. Every failure is NOT_ALLOWED and names no secret. On an
    /// authenticated connection (`binding`) the request carries the region's token bound to that
    /// connection, so a value seen on another connection's wire matches nothing here.
    pub fn authorize(
        &self,
        region: u64,
        token: u64,
        addr: u64,
        len: u64,
        binding: Option<&TokenBinding>,
    ) -> Result<Arc<Region>> {
        let deny = |why: &str| Error::not_allowed(format!("remote access to [{addr:#x}, +{len}) refused: {why}"));
        let (Ok(addr), Ok(len)) = (usize::try_from(addr), usize::try_from(len)) else {
            return Err(deny("address out of range"));
        };
        let Some(r) = self.regions.read().get(&region).cloned() else {
            return Err(deny("the region is not registered (or was deregistered)"));
        };
        let expected = match binding {
            Some(b) => b.bind(region, r.token),
            None => r.token,
        };
        if expected != token {
            return Err(deny("the capability token does not match the region"));
        }
        if len == 0 || !r.windows.lock().iter().any(|&(base, wlen)| range_within(addr, len, base, wlen)) {
            return Err(deny("the range is outside every window advertised for the region"));
        }
        Ok(r)
    }

    /// Decides a peer's vector request: every segment must lie inside a window advertised for the
    /// region, or the whole request is refused (NOT_ALLOWED, naming the first bad segment). The
    /// tables are locked once for all segments.
    pub fn authorize_segments(
        &self,
        region: u64,
        token: u64,
        segs: &[RemoteSeg],
        binding: Option<&TokenBinding>,
    ) -> Result<Arc<Region>> {
        let deny = |why: String| Error::not_allowed(format!("remote vector access refused: {why}"));
        let Some(r) = self.regions.read().get(&region).cloned() else {
            return Err(deny("the region is not registered (or was deregistered)".into()));
        };
        let expected = match binding {
            Some(b) => b.bind(region, r.token),
            None => r.token,
        };
        if expected != token {
            return Err(deny("the capability token does not match the region".into()));
        }
        let windows = r.windows.lock();
        // Neighbouring segments (a layer's blocks) mostly share a window: the one the previous
        // segment fell in is tried first, so a region advertised in many windows costs one check a
        // segment, not one per window.
        let mut last = 0;
        for (i, seg) in segs.iter().enumerate() {
            let inside = usize::try_from(seg.addr).is_ok_and(|addr| {
                let within = |&(base, wlen): &(usize, usize)| range_within(addr, seg.len as usize, base, wlen);
                seg.len > 0
                    && (windows.get(last).is_some_and(within)
                        || windows.iter().position(within).inspect(|&k| last = k).is_some())
            });
            if !inside {
                return Err(deny(format!(
                    "segment {i}, [{:#x}, +{}), is outside every window advertised for the region",
                    seg.addr, seg.len
                )));
            }
        }
        drop(windows);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UcclStatus;

    #[test]
    fn register_validates_ranges() {
        let t = RegionTable::default();
        assert_eq!(t.register(0, 8, MemKind::Host).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        assert_eq!(t.register(64, 0, MemKind::Host).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        assert_eq!(t.register(usize::MAX - 3, 8, MemKind::Host).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        let a = t.register(0x1000, 0x100, MemKind::Host).unwrap();
        let b = t.register(0x1000, 0x100, MemKind::Host).unwrap();
        assert_ne!(a, b);
        assert!(t.local(a, 0x10ff, 1).is_ok());
        assert_eq!(t.local(a, 0x10ff, 2).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        assert_eq!(t.local(999, 0x1000, 1).unwrap_err().status(), UcclStatus::ErrNotFound);
        t.remove(a).unwrap();
        assert_eq!(t.remove(a).unwrap_err().status(), UcclStatus::ErrNotFound);
    }

    #[test]
    fn authorize_requires_token_and_advertised_window() {
        let t = RegionTable::default();
        let id = t.register(0x10000, 0x1000, MemKind::Host).unwrap();
        let item = t.advertise(id, 0x10100, 0x100).unwrap();
        let cap = item.capability().unwrap();
        assert_eq!((cap.region, item.addr, item.size), (id, 0x10100, 0x100));
        assert!(t.authorize(id, cap.token, 0x10100, 0x100, None).is_ok());
        assert!(t.authorize(id, cap.token, 0x10180, 0x80, None).is_ok());
        for (region, token, addr, len) in [
            (id, cap.token ^ 1, 0x10100, 0x10),
            (id, cap.token, 0x10000, 0x10),
            (id, cap.token, 0x101f0, 0x11),
            (id, cap.token, 0x10100, 0),
            (id, cap.token, u64::MAX, 2),
            (id + 1, cap.token, 0x10100, 0x10),
        ] {
            let err = t.authorize(region, token, addr, len, None).unwrap_err();
            assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{err}");
        }
        t.remove(id).unwrap();
        assert!(t.authorize(id, cap.token, 0x10100, 0x10, None).is_err());
    }

    #[test]
    fn bound_connections_take_only_their_own_binding_of_the_token() {
        let t = RegionTable::default();
        let id = t.register(0x10000, 0x1000, MemKind::Host).unwrap();
        let cap = t.advertise(id, 0x10000, 0x1000).unwrap().capability().unwrap();
        let key = crate::proto::AuthKey::new(&[9; 32]).unwrap();
        let ours = key.session(&[1; 32], &[2; 32]).token_binding();
        let theirs = key.session(&[1; 32], &[3; 32]).token_binding();
        assert!(t.authorize(id, ours.bind(id, cap.token), 0x10000, 8, Some(&ours)).is_ok());
        for (what, presented) in [("the raw token", cap.token), ("another connection's", theirs.bind(id, cap.token))] {
            let err = t.authorize(id, presented, 0x10000, 8, Some(&ours)).unwrap_err();
            assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what}: {err}");
        }
        assert!(t.authorize(id, ours.bind(id, cap.token), 0x10000, 8, None).is_err(), "a bound value is no token");
    }

    #[test]
    fn a_vector_is_authorized_only_when_every_segment_is_inside_a_window() {
        let t = RegionTable::default();
        let id = t.register(0x10000, 0x10000, MemKind::Host).unwrap();
        let cap = t.advertise(id, 0x10000, 0x1000).unwrap().capability().unwrap();
        t.advertise(id, 0x18000, 0x1000).unwrap();
        let seg = |addr, len| RemoteSeg { addr, len };
        let good = [seg(0x10000, 0x1000), seg(0x18800, 0x800), seg(0x10010, 1)];
        assert_eq!(t.authorize_segments(id, cap.token, &good, None).unwrap().id, id);
        for (segs, bad) in [
            (vec![seg(0x10000, 0x1000), seg(0x11000, 1)], "segment 1,"),
            (vec![seg(0x17fff, 2)], "segment 0,"),
            (vec![seg(0x10f00, 0x200)], "segment 0,"),
            (vec![seg(0x10000, 0)], "segment 0,"),
            (vec![seg(u64::MAX - 1, 1)], "segment 0,"),
        ] {
            let err = t.authorize_segments(id, cap.token, &segs, None).unwrap_err();
            assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{err}");
            assert!(err.message().contains(bad), "{err}");
        }
        assert!(t.authorize_segments(id, cap.token ^ 1, &good, None).unwrap_err().message().contains("token"));
        // Runs of segments in one window, then in another, then back, then one outside every
        // window after a run inside one.
        for k in 1..8 {
            t.advertise(id, 0x10000 + k * 0x2000, 0x1000).unwrap();
        }
        let mut runs: Vec<RemoteSeg> =
            (0..8u64).flat_map(|k| (0..4).map(move |j| seg(0x10000 + k * 0x2000 + j * 0x400, 0x400))).collect();
        runs.extend((0..4).map(|j| seg(0x14000 + j * 0x400, 0x400)));
        assert!(runs.iter().all(|s| !(0x11000..0x12000).contains(&s.addr)));
        assert_eq!(t.authorize_segments(id, cap.token, &runs, None).unwrap().id, id);
        runs.push(seg(0x14c00, 0x401));
        let err = t.authorize_segments(id, cap.token, &runs, None).unwrap_err();
        assert!(err.message().contains(&format!("segment {},", runs.len() - 1)), "{err}");
        runs.pop();
        runs.push(seg(0x11000, 1));
        assert!(t.authorize_segments(id, cap.token, &runs, None).is_err(), "between two windows");
        t.remove(id).unwrap();
        assert_eq!(t.authorize_segments(id, cap.token, &good, None).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    }

    #[test]
    fn advertise_rejects_oversized_and_outside() {
        let t = RegionTable::default();
        let id = t.register(0x1000, 0x1000, MemKind::Host).unwrap();
        assert!(t.advertise(id, 0x1800, 0x1000).is_err());
        let huge = t.register(1 << 40, 1 << 33, MemKind::Host).unwrap();
        assert!(t.advertise(huge, 1 << 40, 1 << 33).unwrap_err().message().contains("4 GiB"));
    }

    /// A collapse leaves extents not written yet on small pages. Once written, they are collapsed
    /// at a later transfer's ask, but not before the wait since that collapse ended; a collapse that
    /// left nothing small is not asked for again.
    #[test]
    fn extents_a_collapse_left_small_are_asked_for_again_after_the_wait() {
        use crate::engine::huge_pages::{collapse_possible, extent_on_huge_page, looks_settled};
        let _reading = crate::engine::huge_pages::TEST_FAULTS.read();
        const EXTENT: usize = 2 << 20;
        let settle = || assert!(looks_settled(testkit::PATIENCE), "the looker thread settles");
        // Two extents, the first written, the second not touched yet.
        let first_only = || testkit::mapping::AlignedMapping::on_small_pages(2 * EXTENT, |b| b[..EXTENT].fill(1));
        let write_second = |m: &mut testkit::mapping::AlignedMapping| m.touch_on_small_pages(|b| b[EXTENT..].fill(2));

        // A wait of an hour: the second extent, written after the first collapse, stays small.
        let mut memory = first_only();
        let table = RegionTable::default().recollapsing_after(Duration::from_secs(3600));
        let region = table.get(table.register(memory.addr(), 2 * EXTENT, MemKind::Host).unwrap()).unwrap();
        assert!(region.collapse_due(), "never asked yet");
        let asked = crate::trace::clock_ns();
        region.collapse_into_huge_pages();
        assert!(!region.collapse_due(), "not while it runs");
        settle();
        if !collapse_possible() {
            assert_eq!(region.collapse_due_ns(), COLLAPSE_NOT_AGAIN, "nothing to gain here, ever");
            return;
        }
        assert!(extent_on_huge_page(memory.addr()), "the written extent was collapsed");
        assert!(!extent_on_huge_page(memory.addr() + EXTENT), "the untouched one left alone");
        let due = region.collapse_due_ns();
        assert!(due >= asked + 3600 * 1_000_000_000 && due < COLLAPSE_NOT_AGAIN, "asked for again in an hour: {due}");
        write_second(&mut memory);
        assert!(!region.collapse_due());
        region.collapse_into_huge_pages();
        settle();
        assert!(!extent_on_huge_page(memory.addr() + EXTENT), "not asked for again before the wait");
        assert_eq!(region.collapse_due_ns(), due);

        // No wait: the next ask after the collapse ended takes the second extent too, and then
        // nothing is left to ask for.
        let mut memory = first_only();
        let table = RegionTable::default().recollapsing_after(Duration::ZERO);
        let region = table.get(table.register(memory.addr(), 2 * EXTENT, MemKind::Host).unwrap()).unwrap();
        region.collapse_into_huge_pages();
        settle();
        assert!(extent_on_huge_page(memory.addr()) && !extent_on_huge_page(memory.addr() + EXTENT));
        write_second(&mut memory);
        assert!(!extent_on_huge_page(memory.addr() + EXTENT), "written on small pages");
        testkit::wait_until("the collapse is due again", testkit::PATIENCE, || region.collapse_due());
        region.collapse_into_huge_pages();
        settle();
        assert!(extent_on_huge_page(memory.addr() + EXTENT), "collapsed at the second ask");
        assert!(memory[..EXTENT].iter().all(|b| *b == 1) && memory[EXTENT..].iter().all(|b| *b == 2), "contents kept");
        assert_eq!(region.collapse_due_ns(), COLLAPSE_NOT_AGAIN, "nothing left small: not asked for again");
        assert!(!region.collapse_due());
    }

    #[test]
    fn regions_in_one_mapping_share_one_read_of_its_page_size() {
        let _reading = crate::engine::huge_pages::TEST_FAULTS.read();
        const LEN: usize = 4 << 20;
        let mapping = testkit::mapping::AlignedMapping::new(LEN, libc::MADV_HUGEPAGE, 0x5a);
        let reads = Arc::new(AtomicUsize::new(0));
        // The read waits for both asks: a preempted test thread would otherwise see it settle
        // between them.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let pages = {
            let reads = reads.clone();
            KnownMappings::with_reader(std::time::Duration::from_secs(3600), move || {
                reads.fetch_add(1, Ordering::SeqCst);
                let _ = gate.lock().recv_timeout(testkit::PATIENCE);
                crate::engine::huge_pages::read_smaps(None)
            })
        };
        let t = RegionTable::with_pages(Arc::new(pages));
        let half = LEN / 2;
        let first = t.register(mapping.addr(), half, MemKind::Host).unwrap();
        let second = t.register(mapping.addr() + half, half, MemKind::Host).unwrap();
        let first = t.local(first, mapping.addr(), half).unwrap();
        let second = t.local(second, mapping.addr() + half, half).unwrap();
        let before = crate::engine::huge_pages::range_on_huge_pages(None, mapping.addr(), LEN);
        assert!(!first.on_huge_pages(), "the first ask says small pages and starts the read");
        assert!(!second.on_huge_pages(), "so does the other region's while it runs");
        release.send(()).unwrap();
        testkit::wait_until("the read settles", testkit::PATIENCE, || !t.pages.looking());
        let after = crate::engine::huge_pages::range_on_huge_pages(None, mapping.addr(), LEN);
        if before == after {
            // Where the kernel changed its mind meanwhile both answers are true ones.
            assert_eq!(first.on_huge_pages(), after, "the looked-up answer");
            assert_eq!(second.on_huge_pages(), after, "the same for the other region");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1, "one read for both regions");
        assert!(Arc::ptr_eq(&RegionTable::default().pages, &RegionTable::default().pages), "one cache a process");
        let device = t.register(mapping.addr(), LEN, MemKind::Cuda { device: 0 }).unwrap();
        let device = t.local(device, mapping.addr(), LEN).unwrap();
        assert!(!device.on_huge_pages());
        assert!(!t.pages.looking(), "device memory is never looked up");
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    /// Memory unmapped and mapped again at the same addresses: a region registered there after
    /// the cache read the old, huge, memory is told huge pages at first, but that answer has the
    /// cache read again, after which it is told the truth. A region registered after a read gets
    /// its answer without another.
    #[test]
    fn a_huge_answer_older_than_the_registration_is_read_again() {
        let _reading = crate::engine::huge_pages::TEST_FAULTS.read();
        const BASE: usize = 0x7e00_0000_0000;
        let mapping = |huge_kib: usize| {
            format!("{BASE:x}-{:x} rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: {huge_kib} kB\n", BASE + (4 << 20))
        };
        let text = Arc::new(Mutex::new(mapping(4096)));
        let reads = Arc::new(AtomicUsize::new(0));
        let pages = {
            let (text, reads) = (text.clone(), reads.clone());
            KnownMappings::with_reader(std::time::Duration::ZERO, move || {
                reads.fetch_add(1, Ordering::SeqCst);
                Some(crate::engine::huge_pages::Snapshot::from_text(&text.lock()))
            })
        };
        let t = RegionTable::with_pages(Arc::new(pages));
        let settled = |what: &str| testkit::wait_until(what, testkit::PATIENCE, || !t.pages.looking());
        let old = t.register(BASE, 4 << 20, MemKind::Host).unwrap();
        let old = t.local(old, BASE, 4 << 20).unwrap();
        assert!(!old.on_huge_pages(), "nothing read yet: small pages, and a read queued");
        settled("the first read");
        assert!(old.on_huge_pages());
        assert_eq!(reads.load(Ordering::SeqCst), 1, "an answer of a read after the registration stands");

        // Unmapped and mapped again on small pages; the cache has not read since.
        *text.lock() = mapping(0);
        let new = t.register(BASE, 4 << 20, MemKind::Host).unwrap();
        let new = t.local(new, BASE, 4 << 20).unwrap();
        assert!(new.on_huge_pages(), "the old read answers at first");
        settled("the read the stale answer queued");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert!(!new.on_huge_pages(), "the new read tells small pages");
        assert!(!old.on_huge_pages(), "for every region of that memory");
        assert_eq!(reads.load(Ordering::SeqCst), 2, "a small answer queues nothing");
    }
}
