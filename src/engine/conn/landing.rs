//! Where a connection lands the peer's eager messages that arrive before their receives: host
//! memory of its own, cut into slots, and what lies in them (`state/eager.rs` has the protocol).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cuda::Gpu;
use crate::cuda::memory::PinnedBuffer;
use crate::engine::plan::Extent;
use crate::engine::region::{Region, RegionTable};
use crate::error::{Error, Result};
use crate::proto::{EAGER_SLOT, MAX_INLINE_SEND_BACKLOG};
use crate::transport::IoSeg;

/// Landing slots: as many as the backlog a sender may hold unanswered.
const SLOTS: usize = (MAX_INLINE_SEND_BACKLOG / EAGER_SLOT) as usize;
const LANDING_LEN: usize = SLOTS * EAGER_SLOT as usize;
/// How long a connection that heard nothing from its peer keeps landing memory no message is in:
/// then it goes (4 MiB, page-locked on a GPU engine's first 64 connections), made again by the
/// next message to land.
pub(crate) const LANDING_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Page-locked landing memory one process holds at most: 64 connections' worth. Later
/// connections land in heap pages (committed only as messages land), whose copies to a device go
/// through the driver's own staging, so an engine serving a GPU with thousands of connections
/// does not pin gigabytes it mostly never uses.
const PINNED_LANDINGS_MAX: usize = 64 * LANDING_LEN;

/// Bytes of page-locked landing memory the process holds.
static PINNED_LANDINGS: PinBudget = PinBudget::new(PINNED_LANDINGS_MAX);

/// A bound on bytes held, taken and given back without a lock.
struct PinBudget {
    held: AtomicUsize,
    max: usize,
}

impl PinBudget {
    const fn new(max: usize) -> PinBudget {
        PinBudget { held: AtomicUsize::new(0), max }
    }

    /// Takes `len` bytes if they fit under the bound.
    fn take(&self, len: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(len).filter(|&after| after <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, len: usize) {
        self.held.fetch_sub(len, Ordering::AcqRel);
    }
}

/// Host memory a connection lands eager messages in, registered with its channels like a caller's
/// region but never advertised. The connection keeps it while a message is in it or on its way
/// (the only time a channel receives into it), so no transport writes into it once freed. On an
/// engine serving a GPU it is page-locked (within [`PINNED_LANDINGS_MAX`]): a message landed for a
/// receive in device memory then goes there in one DMA per run of slots.
pub(crate) struct LandingMemory {
    _backing: Backing,
    region: Arc<Region>,
}

/// Reached only through raw pointers: the transport writes it, the state copies out of it.
enum Backing {
    Heap(HeapBytes),
    Pinned(PinnedLanding),
}

/// Zeroed heap bytes, freed on drop.
struct HeapBytes(*mut [u8]);

impl Drop for HeapBytes {
    fn drop(&mut self) {
        // SAFETY: made by `Box::into_raw` in `LandingMemory::new`, freed once, here.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// Page-locked bytes counted in [`PINNED_LANDINGS`] until freed.
struct PinnedLanding(PinnedBuffer);

impl Drop for PinnedLanding {
    fn drop(&mut self) {
        PINNED_LANDINGS.give_back(self.0.len());
    }
}

// SAFETY: plain bytes behind a pointer this type alone frees; who touches which slot when is
// ordered by the connection lock (a slot is handed to one flow at a time).
unsafe impl Send for LandingMemory {}
// SAFETY: as above; `&LandingMemory` hands out nothing but the region and the base address.
unsafe impl Sync for LandingMemory {}

impl LandingMemory {
    /// Page-locked through `gpu` where one is given, the process's bound leaves room and the driver
    /// grants it; else heap pages (zeroed pages cost nothing until a message lands in them).
    pub fn new(regions: &RegionTable, gpu: Option<&Arc<Gpu>>) -> Result<Arc<LandingMemory>> {
        let pinned = gpu.filter(|_| PINNED_LANDINGS.take(LANDING_LEN)).and_then(|gpu| {
            PinnedBuffer::new(gpu, LANDING_LEN)
                .inspect_err(|e| {
                    PINNED_LANDINGS.give_back(LANDING_LEN);
                    log::warn!("eager messages land in pageable memory: {}", e.message());
                })
                .ok()
        });
        let backing = match pinned {
            Some(pinned) => Backing::Pinned(PinnedLanding(pinned)),
            None => Backing::Heap(HeapBytes(Box::into_raw(vec![0u8; LANDING_LEN].into_boxed_slice()))),
        };
        let base = match &backing {
            Backing::Heap(bytes) => bytes.0 as *mut u8 as usize,
            Backing::Pinned(pinned) => pinned.0.as_ptr() as usize,
        };
        let region = regions.internal(base, LANDING_LEN)?;
        Ok(Arc::new(LandingMemory { _backing: backing, region }))
    }

    /// Whether the slots are page-locked.
    #[cfg(test)]
    pub fn pinned(&self) -> bool {
        matches!(self._backing, Backing::Pinned(_))
    }

    fn slot(&self, slot: u16) -> usize {
        self.region.base + slot as usize * EAGER_SLOT as usize
    }
}

/// Makes a connection's landing memory, when the first of the peer's messages must land.
pub(crate) type MakeLanding = Box<dyn Fn() -> Result<Arc<LandingMemory>> + Send>;

/// The landing slots of one connection and the messages in them, by the flow that brings each;
/// `R` is what a message is matched to (a posted receive). The memory is made when a message first
/// lands, not with the connection: most connections never land one (NIXL's only write and read),
/// and on an engine serving a GPU it is 4 MiB page-locked, which idle connections would hold.
pub(super) struct Landings<R> {
    memory: Option<Arc<LandingMemory>>,
    make: MakeLanding,
    /// Free slots, the lowest last: a message mostly lands in adjacent slots, ascending, and is
    /// copied out in one piece.
    free: Vec<u16>,
    by_flow: HashMap<u64, Landing<R>>,
    /// Our own eager messages not answered yet: op id -> what each holds of the inline-send backlog.
    pub sent: HashMap<u64, u64>,
    /// The peer's messages landed so far (`ConnStats::landed`).
    landed: u64,
}

/// A message in landing slots.
pub(super) struct Landing<R> {
    pub peer_op: u64,
    pub len: u64,
    slots: Vec<u16>,
    /// Its last chunk came in.
    pub arrived: bool,
    pub fate: Fate<R>,
}

pub(super) enum Fate<R> {
    /// No receive took it yet.
    Waiting,
    /// A receive took it before the bytes were all in.
    Matched(R),
    /// Refused when matched (or its receive was cut off): answered with this once landed.
    Refused(Error),
}

impl<R> Landings<R> {
    pub fn new(make: MakeLanding) -> Landings<R> {
        Landings { memory: None, make, free: all_slots(), by_flow: HashMap::new(), sent: HashMap::new(), landed: 0 }
    }

    /// Whether the landing memory is made.
    pub fn has_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// The peer's messages that arrived before their receive, so far.
    pub fn landed(&self) -> u64 {
        self.landed
    }

    /// Landing memory the peer's messages hold, in bytes.
    pub fn held(&self) -> u64 {
        (SLOTS - self.free.len()) as u64 * EAGER_SLOT
    }

    /// Takes slots for the peer's message `peer_op` of `len` bytes, brought by `flow`: where its
    /// bytes go and the region the channels receive them into, or None when too few slots are free.
    pub fn take(&mut self, flow: u64, peer_op: u64, len: u64) -> Result<Option<(Extent, Arc<Region>)>> {
        let need = len.div_ceil(EAGER_SLOT) as usize;
        if need > self.free.len() {
            return Ok(None);
        }
        if self.memory.is_none() {
            self.memory = Some((self.make)()?);
        }
        let memory = self.memory.as_ref().expect("made above");
        let mut slots = self.free.split_off(self.free.len() - need);
        slots.reverse();
        let segs = slots
            .iter()
            .enumerate()
            .map(|(i, &s)| IoSeg { addr: memory.slot(s), len: (len - i as u64 * EAGER_SLOT).min(EAGER_SLOT) as usize });
        let extent = Extent::scattered(segs);
        self.by_flow.insert(flow, Landing { peer_op, len, slots, arrived: false, fate: Fate::Waiting });
        self.landed += 1;
        Ok(Some((extent, memory.region.clone())))
    }

    pub fn get_mut(&mut self, flow: u64) -> Option<&mut Landing<R>> {
        self.by_flow.get_mut(&flow)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Landing<R>> {
        self.by_flow.values_mut()
    }

    /// Takes the message of `flow` out; its slots stay taken until `release`.
    pub fn remove(&mut self, flow: u64) -> Option<Landing<R>> {
        self.by_flow.remove(&flow)
    }

    /// Hands `landing`'s bytes to `store` as (offset in the message, bytes), a run of adjacent
    /// slots at a time, up to its first error.
    ///
    /// # Safety
    /// Every chunk of the message landed: no transport writes its slots any more.
    pub unsafe fn copy_out(
        &self,
        landing: &Landing<R>,
        mut store: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let memory = self.memory.as_ref().ok_or_else(|| Error::backend("internal: a landed message without memory"))?;
        for (at, n, first) in runs(&landing.slots, landing.len) {
            // SAFETY: the slots are the message's, inside the memory this keeps alive, and no one
            // writes them (the contract).
            let bytes = unsafe { std::slice::from_raw_parts(memory.slot(first) as *const u8, n) };
            store(at, bytes)?;
        }
        Ok(())
    }

    /// Lets the memory go when no message is in it or on its way: the next message to land makes
    /// it again. Whether it went.
    pub fn give_back(&mut self) -> bool {
        if !self.by_flow.is_empty() || self.free.len() != SLOTS {
            return false;
        }
        self.memory.take().is_some()
    }

    /// Frees the slots of a message taken out.
    pub fn release(&mut self, landing: Landing<R>) {
        self.free.extend(landing.slots.into_iter().rev());
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// The connection failed: every message goes, every slot is free (nothing is received into
    /// them any more); returns what messages were matched to.
    pub fn fail(&mut self) -> Vec<R> {
        self.sent.clear();
        self.free = all_slots();
        self.by_flow
            .drain()
            .filter_map(|(_, l)| match l.fate {
                Fate::Matched(r) => Some(r),
                Fate::Waiting | Fate::Refused(_) => None,
            })
            .collect()
    }
}

fn all_slots() -> Vec<u16> {
    (0..SLOTS as u16).rev().collect()
}

/// A message of `len` bytes in `slots` as runs of adjacent slots: (offset in the message, length,
/// first slot).
fn runs(slots: &[u16], len: u64) -> Vec<(usize, usize, u16)> {
    let mut runs: Vec<(usize, usize, u16)> = Vec::new();
    for (i, &slot) in slots.iter().enumerate() {
        let at = i as u64 * EAGER_SLOT;
        let n = (len - at).min(EAGER_SLOT) as usize;
        match runs.last_mut() {
            Some((_, run, first)) if *first as usize + *run / EAGER_SLOT as usize == slot as usize => *run += n,
            _ => runs.push((at as usize, n, slot)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_slots_are_copied_as_one_run() {
        let slot = EAGER_SLOT as usize;
        assert_eq!(runs(&[3, 4, 5], 2 * EAGER_SLOT + 7), [(0, 2 * slot + 7, 3)]);
        assert_eq!(runs(&[3, 9, 10], 3 * EAGER_SLOT), [(0, slot, 3), (slot, 2 * slot, 9)]);
        assert_eq!(runs(&[5, 4], EAGER_SLOT + 1), [(0, slot, 5), (slot, 1, 4)], "descending is two runs");
        assert_eq!(runs(&[0], 1), [(0, 1, 0)]);
    }

    /// On an engine serving a GPU the slots are page-locked (the driver says so), and a message
    /// landed in adjacent slots goes into device memory whole, in one copy, byte for byte.
    #[test]
    fn a_gpu_engines_landing_is_page_locked_and_a_run_goes_to_the_device_in_one_copy() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let gpu = Gpu::open(0).unwrap();
        let memory = LandingMemory::new(&RegionTable::default(), Some(&gpu)).unwrap();
        assert!(memory.pinned());
        let mut flags = 0u32;
        let found = {
            let _ctx = gpu.enter().unwrap();
            // SAFETY: `flags` is a live local; the pointer is the landing's base.
            unsafe { cudarc::driver::sys::cuMemHostGetFlags(&mut flags, memory.region.base as *mut _) }
        };
        assert_eq!(found, cudarc::driver::sys::CUresult::CUDA_SUCCESS, "page-locked memory the driver knows");

        let len = 3 * EAGER_SLOT as usize + 5;
        let data = testkit::pattern(len, 77);
        let made = memory.clone();
        let mut l: Landings<()> = Landings::new(Box::new(move || Ok(made.clone())));
        let Some((Extent::Scattered { segs, .. }, _)) = l.take(1, 9, len as u64).unwrap() else { panic!("scattered") };
        let mut at = 0;
        for seg in segs.iter() {
            // SAFETY: the message's own slots, which nothing else writes.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), seg.addr as *mut u8, seg.len) };
            at += seg.len;
        }
        let landing = l.remove(1).unwrap();
        let dst = crate::cuda::DeviceBuffer::new(0, len).unwrap();
        let mut copies = 0;
        // SAFETY: every byte of the message was written above; the destination is a live device
        // buffer of `len` bytes.
        unsafe {
            l.copy_out(&landing, |off, bytes| {
                copies += 1;
                crate::cuda::small_copy::copy_to_device_sync(&gpu, dst.addr() + off, bytes)
            })
        }
        .unwrap();
        assert_eq!(copies, 1, "adjacent slots are one run");
        assert!(dst.to_vec().unwrap() == data, "the bytes on the device are the message's");
        l.release(landing);
    }

    /// The bound on page-locked landings: taken while it fits, refused past it without changing
    /// what is held, and room again once given back.
    #[test]
    fn pinned_landings_stay_within_their_bound() {
        let budget = PinBudget::new(3 * LANDING_LEN);
        assert!((0..3).all(|_| budget.take(LANDING_LEN)));
        assert!(!budget.take(LANDING_LEN), "a fourth does not fit");
        assert!(!budget.take(usize::MAX), "nor an overflowing one");
        assert_eq!(budget.held.load(Ordering::Acquire), 3 * LANDING_LEN, "a refusal holds nothing");
        budget.give_back(LANDING_LEN);
        assert!(budget.take(LANDING_LEN));
    }

    #[test]
    fn slots_are_taken_lowest_first_ascending_and_come_back() {
        let memory = LandingMemory::new(&RegionTable::default(), None).unwrap();
        let base = memory.region.base;
        let made = memory.clone();
        let mut l: Landings<()> = Landings::new(Box::new(move || Ok(made.clone())));
        let slot = EAGER_SLOT as usize;
        let Some((Extent::Scattered { segs, .. }, region)) = l.take(1, 7, 2 * EAGER_SLOT + 1).unwrap() else {
            panic!("scattered")
        };
        assert!(Arc::ptr_eq(&region, &memory.region), "received into the landing's region");
        let at: Vec<_> = segs.iter().map(|s| (s.addr - base, s.len)).collect();
        assert_eq!(at, [(0, slot), (slot, slot), (2 * slot, 1)]);
        assert_eq!(l.held(), 3 * EAGER_SLOT);
        assert!(l.take(2, 8, MAX_INLINE_SEND_BACKLOG).unwrap().is_none(), "more than is free");
        let first = l.remove(1).unwrap();
        l.release(first);
        assert_eq!(l.held(), 0);
        let Some((Extent::Scattered { segs, .. }, _)) = l.take(3, 9, EAGER_SLOT).unwrap() else { panic!("scattered") };
        assert_eq!(segs[0].addr, base, "the lowest slot again");
    }
}
