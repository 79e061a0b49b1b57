//! Registered memory and the capabilities advertised for it. A peer's one-sided request is honoured
//! only when it names a region of this engine, carries that region's random token, and lies inside a
//! window that `prepare_fifo` advertised.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
// Maps keyed by the engine's own ids (in sequence) and windows of its own addresses: a peer's id
// is only looked up, never inserted, so std's guard against chosen collisions buys nothing here,
// and SipHash was ~6 % of a 98,304-block write's samples (2-core VM), asked once per segment run.
use rustc_hash::FxHashMap as IdMap;

use crate::cuda::ipc::Export;
use crate::error::{Error, Result};
use crate::proto::{Capability, FifoItem, Place, RemoteSeg, TokenBinding};
use crate::threads::{ThreadKind, WorkQueue, serve, spawn_contained};
use crate::transport::MemKind;

/// Distinct windows a region may advertise; callers normally advertise once per registration.
const MAX_WINDOWS_PER_REGION: usize = crate::proto::MAX_IPC_WINDOWS;
/// How long an answer of small pages stands before `Region::on_huge_pages` looks again.
const HUGE_RECHECK_NS: u64 = 1_000_000_000;

/// Collapses of regions' memory asked for and not yet ended in this process
/// (`Region::collapse_into_huge_pages`).
static COLLAPSING: AtomicUsize = AtomicUsize::new(0);

/// Regions waiting for their collapse. One thread takes them in turn: the process's pace
/// (`host_memory::collapse`) lets one slice run at a time anyway, so a thread per region would only
/// add threads waiting on that pace.
static COLLAPSES: Mutex<WorkQueue<Weak<Region>>> = Mutex::new(WorkQueue::new());

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
    /// Its host memory lies mostly on huge pages, as this process's own page tables or smaps said
    /// (`host_memory`). Said to same-host peers copying out of it.
    huge: AtomicBool,
    /// When `huge` was last looked up (`trace::clock_ns`); 0: not yet, `u64::MAX`: never again.
    huge_checked: AtomicU64,
    /// A collapse of its memory was asked for (`collapse_into_huge_pages`), once per region.
    collapse_asked: AtomicBool,
}

impl Region {
    /// Where its memory lies, as its capability says.
    pub fn place(&self) -> Place {
        match self.kind {
            MemKind::Host => Place::host(),
            MemKind::Cuda { device } => Place::gpu(device),
        }
    }

    fn new(id: u64, base: usize, len: usize, kind: MemKind) -> Region {
        Region {
            id,
            base,
            len,
            kind,
            token: crate::sys::random::random_u64(),
            windows: Mutex::new(Vec::new()),
            removed: AtomicBool::new(false),
            device_copies: AtomicUsize::new(0),
            ipc: OnceLock::new(),
            one_allocation: OnceLock::new(),
            huge: AtomicBool::new(false),
            huge_checked: AtomicU64::new(0),
            collapse_asked: AtomicBool::new(false),
        }
    }

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

    /// Whether the region's host memory lies mostly on huge pages; device memory never does here.
    /// Memory registered before it was written reads as small pages then, and the kernel may put
    /// it on huge pages later (khugepaged, or our collapse), so an answer of small pages is looked
    /// up again, at most once a second, where the kernel scans the region's own page tables (a
    /// cost in proportion to the region). Without that scan smaps is read once, at the first
    /// question rather than at registration: it walks every mapping below the region.
    pub fn on_huge_pages(&self) -> bool {
        if self.huge.load(Ordering::Relaxed) {
            return true;
        }
        if self.kind != MemKind::Host {
            return false;
        }
        let (last, now) = (self.huge_checked.load(Ordering::Relaxed), crate::trace::clock_ns());
        let scans = crate::host_memory::scans_page_tables();
        let due = if scans { now.saturating_sub(last) >= HUGE_RECHECK_NS } else { last == 0 };
        let next = if scans { now } else { u64::MAX };
        // One asker looks; the others take the answer they have.
        if !due || self.huge_checked.compare_exchange(last, next, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return false;
        }
        let huge = crate::host_memory::on_huge_pages(self.base, self.len);
        self.huge.store(huge, Ordering::Relaxed);
        huge
    }

    /// Sets what `on_huge_pages` says from now on, as a test's memory would have it.
    #[cfg(test)]
    pub(crate) fn set_huge_pages(&self, huge: bool) {
        self.huge_checked.store(u64::MAX, Ordering::Relaxed);
        self.huge.store(huge, Ordering::Relaxed);
    }

    /// Asks for its host memory to be collapsed into huge pages in place, once, on the process's
    /// collapse worker (`host_memory::collapse`): called, with `Config::host_copy_collapse`, when a
    /// peer of this host is to copy out of it, which pins its pages one by one on small pages. The
    /// work stops at deregistration; then our page tables are read again for the region, so that
    /// later transfers out of it are told what the collapse achieved.
    pub fn collapse_into_huge_pages(self: &Arc<Self>) {
        if self.kind != MemKind::Host || self.on_huge_pages() || self.collapse_asked.swap(true, Ordering::AcqRel) {
            return;
        }
        COLLAPSING.fetch_add(1, Ordering::AcqRel);
        if !COLLAPSES.lock().push(Arc::downgrade(self)) {
            return;
        }
        let builder = std::thread::Builder::new().name("uccl-collapse".into());
        // A panic leaves the region it served and those waiting on small pages, counted out.
        let on_panic = |_| {
            let forgotten = COLLAPSES.lock().abandon();
            COLLAPSING.fetch_sub(forgotten + 1, Ordering::AcqRel);
        };
        let spawned = spawn_contained(builder, ThreadKind::Collapse, on_panic, || {
            serve(&COLLAPSES, |next| {
                collapse_region(next);
                COLLAPSING.fetch_sub(1, Ordering::AcqRel);
            });
        });
        if let Err(e) = spawned {
            let forgotten = COLLAPSES.lock().abandon();
            COLLAPSING.fetch_sub(forgotten, Ordering::AcqRel);
            log::debug!("no thread to collapse regions into huge pages: {e}");
        }
    }

    /// Whether a collapse may still be asked for: the posting path asks this before it hands one
    /// on, so a region's later transfers cost one load.
    pub fn collapse_due(&self) -> bool {
        self.kind == MemKind::Host && !self.on_huge_pages() && !self.collapse_asked.load(Ordering::Relaxed)
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

/// Collapses `region`'s memory unless it was deregistered meanwhile, then says what it is on.
fn collapse_region(region: Weak<Region>) {
    let wanted = || region.upgrade().is_some_and(|r| !r.is_removed());
    let Some((base, len)) = region.upgrade().filter(|r| !r.is_removed()).map(|r| (r.base, r.len)) else { return };
    let collapsed = crate::host_memory::collapse(base, len, wanted);
    log::debug!("region at {base:#x} (+{len}): {collapsed:?}");
    if let Some(r) = region.upgrade().filter(|_| collapsed.extents > 0) {
        r.huge.store(crate::host_memory::on_huge_pages(base, len), Ordering::Relaxed);
        r.huge_checked.store(crate::trace::clock_ns(), Ordering::Relaxed);
    }
}

/// Waits up to `limit` for every collapse of this process to end; whether they did. For the
/// benchmark and tests, whose timed transfers should see the pages a collapse left.
#[doc(hidden)]
pub fn collapses_settled(limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while COLLAPSING.load(Ordering::Acquire) > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
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
    regions: RwLock<IdMap<u64, Arc<Region>>>,
    next_id: AtomicU64,
    /// Regions of the engine's own memory made so far (`internal`).
    internal_ids: AtomicU64,
    /// Counts removals, so channels notice cheaply that a registration cache may hold dead regions.
    removals: Arc<AtomicU64>,
}

impl Default for RegionTable {
    fn default() -> RegionTable {
        RegionTable {
            regions: RwLock::default(),
            next_id: AtomicU64::new(0),
            internal_ids: AtomicU64::new(0),
            removals: Arc::default(),
        }
    }
}

impl RegionTable {
    /// Registers `[addr, addr + len)`. Where the kernel scans a range's page tables, host memory
    /// has its page size looked up here (in proportion to the region); else at its first question
    /// (`Region::on_huge_pages`).
    pub fn register(&self, addr: usize, len: usize, kind: MemKind) -> Result<u64> {
        check_range(addr, len)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let region = Region::new(id, addr, len, kind);
        if kind == MemKind::Host && crate::host_memory::scans_page_tables() {
            region.on_huge_pages();
        }
        self.regions.write().insert(id, Arc::new(region));
        Ok(id)
    }

    /// A region of the engine's own host memory, numbered from the top so that the channels
    /// register it apart from the caller's (whose ids stay as they were), and kept out of the
    /// table: no request is ever authorized for it, no post names it, it is never deregistered.
    pub fn internal(&self, addr: usize, len: usize) -> Result<Arc<Region>> {
        check_range(addr, len)?;
        let id = u64::MAX - self.internal_ids.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Region::new(id, addr, len, MemKind::Host)))
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

    /// A region outside the table (`internal`) went: channels sweep their registrations as after
    /// a removal.
    pub fn note_removal(&self) {
        self.removals.fetch_add(1, Ordering::Release);
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

    /// As [`local`](Self::local), the region counted for a device copy (`Region::copy_started`)
    /// under the table's lock, which its removal takes: either the copy is counted before the
    /// region is removed, and the deregistration waits for it, or the region is not found. For a
    /// copy out of another engine's region, whose deregistration takes no lock the copier holds.
    /// The caller ends the count (`copy_ended`) once the copy is over or was not queued.
    pub fn local_counted(&self, id: u64, addr: usize, len: usize) -> Result<Arc<Region>> {
        check_range(addr, len)?;
        let regions = self.regions.read();
        let region = regions
            .get(&id)
            .ok_or_else(|| Error::not_found(format!("memory region {id} is not registered with this engine")))?;
        if !region.contains(addr, len) {
            return Err(Error::invalid(format!(
                "buffer [{addr:#x}, +{len}) lies outside memory region {id} [{:#x}, +{})",
                region.base, region.len
            )));
        }
        region.copy_started();
        Ok(region.clone())
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
        Ok(FifoItem::with_capability(
            addr as u64,
            size,
            Capability { region: id, token: region.token, place: region.place() },
        ))
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
    fn a_counted_lookup_counts_a_live_range_only() {
        let t = RegionTable::default();
        let id = t.register(0x1000, 0x100, MemKind::Cuda { device: 0 }).unwrap();
        assert_eq!(t.local_counted(id, 0x10ff, 2).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        let region = t.local_counted(id, 0x1080, 0x80).unwrap();
        assert_eq!(region.copies_in_flight(), 1, "counted by the lookup");
        let removed = t.remove(id).unwrap();
        assert_eq!(removed.copies_in_flight(), 1, "what the deregistration waits for");
        region.copy_ended();
        assert_eq!(t.local_counted(id, 0x1080, 1).unwrap_err().status(), UcclStatus::ErrNotFound);
        assert_eq!(removed.copies_in_flight(), 0, "a refused lookup counts nothing");
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

    /// A region reads its page size from our smaps at registration; a collapse asked for once
    /// moves a written small-page region to huge pages where the kernel can, with its contents,
    /// and the region then says so.
    #[test]
    fn a_region_knows_its_page_size_and_a_collapse_updates_it() {
        const LEN: usize = 4 << 20;
        let memory = testkit::mapping::AlignedMapping::on_small_pages(LEN, |b| b.fill(7));
        let t = RegionTable::default();
        let region = t.get(t.register(memory.addr(), LEN, MemKind::Host).unwrap()).unwrap();
        assert!(!region.on_huge_pages(), "faulted in on small pages");
        assert!(region.collapse_due());
        region.collapse_into_huge_pages();
        assert!(!region.collapse_due(), "asked once");
        assert!(collapses_settled(testkit::PATIENCE), "the collapse ends");
        let kernel_says = crate::host_memory::on_huge_pages(memory.addr(), LEN);
        assert_eq!(region.on_huge_pages(), kernel_says, "the region says what the kernel does");
        if crate::host_memory::collapse_allowed() && kernel_says {
            assert!(!region.collapse_due(), "nothing left to ask for");
        }
        assert!(memory.iter().all(|b| *b == 7), "contents kept");
        let device = t.register(memory.addr(), LEN, MemKind::Cuda { device: 0 }).unwrap();
        let device = t.get(device).unwrap();
        assert!(!device.on_huge_pages() && !device.collapse_due(), "device memory is never looked at");
    }

    /// Several regions asked for at once all end collapsed or left as the kernel allows, contents
    /// kept, each saying what the kernel does.
    #[test]
    fn queued_collapses_each_end_with_their_contents() {
        const LEN: usize = 4 << 20;
        let memory: Vec<_> =
            (0..6).map(|i| testkit::mapping::AlignedMapping::on_small_pages(LEN, |b| b.fill(i as u8 + 1))).collect();
        let t = RegionTable::default();
        let regions: Vec<_> =
            memory.iter().map(|m| t.get(t.register(m.addr(), LEN, MemKind::Host).unwrap()).unwrap()).collect();
        for r in &regions {
            r.collapse_into_huge_pages();
        }
        assert!(collapses_settled(testkit::PATIENCE), "every collapse ends");
        for (i, (m, r)) in memory.iter().zip(&regions).enumerate() {
            assert!(m.iter().all(|b| *b == i as u8 + 1), "region {i}'s contents kept");
            assert_eq!(r.on_huge_pages(), crate::host_memory::on_huge_pages(m.addr(), LEN), "region {i}");
        }
    }

    /// Memory registered before it is written reads as small pages (nothing is there yet); once
    /// written, where the kernel scans page tables, the region looks again after a second and says
    /// what the kernel does (huge pages where THP gives them to memory advised for them).
    #[test]
    fn memory_written_after_registration_is_looked_at_again() {
        const LEN: usize = 4 << 20;
        let mut memory = testkit::mapping::AlignedMapping::on_small_pages(LEN, |_| {});
        memory.advise(libc::MADV_HUGEPAGE);
        let t = RegionTable::default();
        let region = t.get(t.register(memory.addr(), LEN, MemKind::Host).unwrap()).unwrap();
        assert!(!region.on_huge_pages(), "nothing written yet");
        memory.fill(3);
        assert!(!region.on_huge_pages(), "an answer of small pages stands for a second");
        std::thread::sleep(Duration::from_millis(1100));
        let kernel_says = crate::host_memory::on_huge_pages(memory.addr(), LEN);
        if crate::host_memory::scans_page_tables() {
            assert_eq!(region.on_huge_pages(), kernel_says, "looked at again");
        } else {
            assert!(!region.on_huge_pages(), "smaps is read once, at the first question");
        }
    }

    /// Counting a range's pages from its page tables agrees with smaps, and costs nothing like
    /// smaps in a process that maps much below the range.
    #[test]
    fn the_page_table_scan_agrees_with_smaps() {
        const LEN: usize = 4 << 20;
        let small = testkit::mapping::AlignedMapping::on_small_pages(LEN, |b| b.fill(1));
        assert!(!crate::host_memory::on_huge_pages(small.addr(), LEN), "faulted in on small pages");
        let advised = testkit::mapping::AlignedMapping::new(LEN, libc::MADV_HUGEPAGE, 2);
        let scanned = crate::host_memory::on_huge_pages(advised.addr(), LEN);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if crate::host_memory::scans_page_tables() && !thp.contains("[never]") {
            // Where the kernel gave huge pages, the scan must see them as smaps does.
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let start = format!("{:x}-", advised.addr());
            let anon_huge = smaps
                .split(&start)
                .nth(1)
                .and_then(|m| m.lines().find(|l| l.starts_with("AnonHugePages:")))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok());
            if let Some(kib) = anon_huge {
                assert_eq!(scanned, kib * 1024 >= (LEN as u64) * 9 / 10, "scan {scanned}, smaps {kib} KiB huge");
            }
        }
    }
}
