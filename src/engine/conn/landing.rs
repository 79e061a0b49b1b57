//! Where a connection lands the peer's eager messages that arrive before their receives: host
//! memory of its own, cut into slots, and what lies in them (`state/eager.rs` has the protocol).

use std::collections::HashMap;
use std::sync::Arc;

use crate::engine::plan::Extent;
use crate::engine::region::{Region, RegionTable};
use crate::error::{Error, Result};
use crate::proto::{EAGER_SLOT, MAX_INLINE_SEND_BACKLOG};
use crate::transport::IoSeg;

/// Landing slots: as many as the backlog a sender may hold unanswered.
const SLOTS: usize = (MAX_INLINE_SEND_BACKLOG / EAGER_SLOT) as usize;
const LANDING_LEN: usize = SLOTS * EAGER_SLOT as usize;

/// Host memory a connection lands eager messages in, registered with its channels like a caller's
/// region but never advertised. The connection keeps it until its channels are closed, so no
/// transport writes into it once freed.
pub(crate) struct LandingMemory {
    /// Reached only through raw pointers: the transport writes it, the state copies out of it.
    mem: *mut [u8],
    region: Arc<Region>,
}

// SAFETY: plain bytes behind a pointer this type alone frees; who touches which slot when is
// ordered by the connection lock (a slot is handed to one flow at a time).
unsafe impl Send for LandingMemory {}
// SAFETY: as above; `&LandingMemory` hands out nothing but the region and the base address.
unsafe impl Sync for LandingMemory {}

impl LandingMemory {
    pub fn new(regions: &RegionTable) -> Result<Arc<LandingMemory>> {
        // Zeroed pages cost nothing until a message lands in them.
        let mem = Box::into_raw(vec![0u8; LANDING_LEN].into_boxed_slice());
        match regions.internal(mem as *mut u8 as usize, LANDING_LEN) {
            Ok(region) => Ok(Arc::new(LandingMemory { mem, region })),
            Err(e) => {
                // SAFETY: made by `Box::into_raw` just above and not shared.
                drop(unsafe { Box::from_raw(mem) });
                Err(e)
            }
        }
    }

    fn slot(&self, slot: u16) -> usize {
        self.region.base + slot as usize * EAGER_SLOT as usize
    }
}

impl Drop for LandingMemory {
    fn drop(&mut self) {
        // SAFETY: made by `Box::into_raw` in `new`, freed once, here.
        drop(unsafe { Box::from_raw(self.mem) });
    }
}

/// The landing slots of one connection and the messages in them, by the flow that brings each;
/// `R` is what a message is matched to (a posted receive).
pub(super) struct Landings<R> {
    memory: Arc<LandingMemory>,
    /// Free slots, the lowest last: a message mostly lands in adjacent slots, ascending, and is
    /// copied out in one piece.
    free: Vec<u16>,
    by_flow: HashMap<u64, Landing<R>>,
    /// Our own eager messages not answered yet: op id -> what each holds of the inline-send backlog.
    pub sent: HashMap<u64, u64>,
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
    pub fn new(memory: Arc<LandingMemory>) -> Landings<R> {
        Landings { memory, free: all_slots(), by_flow: HashMap::new(), sent: HashMap::new() }
    }

    /// Landing memory the peer's messages hold, in bytes.
    pub fn held(&self) -> u64 {
        (SLOTS - self.free.len()) as u64 * EAGER_SLOT
    }

    /// The region the channels receive landing chunks into.
    pub fn region(&self) -> &Arc<Region> {
        &self.memory.region
    }

    /// Takes slots for the peer's message `peer_op` of `len` bytes, brought by `flow`: where its
    /// bytes go, or None when too few slots are free.
    pub fn take(&mut self, flow: u64, peer_op: u64, len: u64) -> Option<Extent> {
        let need = len.div_ceil(EAGER_SLOT) as usize;
        if need > self.free.len() {
            return None;
        }
        let mut slots = self.free.split_off(self.free.len() - need);
        slots.reverse();
        let segs = slots.iter().enumerate().map(|(i, &s)| IoSeg {
            addr: self.memory.slot(s),
            len: (len - i as u64 * EAGER_SLOT).min(EAGER_SLOT) as usize,
        });
        let extent = Extent::scattered(segs);
        self.by_flow.insert(flow, Landing { peer_op, len, slots, arrived: false, fate: Fate::Waiting });
        Some(extent)
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
    /// slots of at most `max_run` bytes at a time, up to its first error.
    ///
    /// # Safety
    /// Every chunk of the message landed: no transport writes its slots any more.
    pub unsafe fn copy_out(
        &self,
        landing: &Landing<R>,
        max_run: usize,
        mut store: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        for (at, n, first) in runs(&landing.slots, landing.len, max_run) {
            // SAFETY: the slots are the message's, inside the memory this keeps alive, and no one
            // writes them (the contract).
            let bytes = unsafe { std::slice::from_raw_parts(self.memory.slot(first) as *const u8, n) };
            store(at, bytes)?;
        }
        Ok(())
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

/// A message of `len` bytes in `slots` as runs of adjacent slots, each at most `max_run` bytes
/// long (or one slot where that is less): (offset in the message, length, first slot).
fn runs(slots: &[u16], len: u64, max_run: usize) -> Vec<(usize, usize, u16)> {
    let mut runs: Vec<(usize, usize, u16)> = Vec::new();
    for (i, &slot) in slots.iter().enumerate() {
        let at = i as u64 * EAGER_SLOT;
        let n = (len - at).min(EAGER_SLOT) as usize;
        match runs.last_mut() {
            Some((_, run, first))
                if *first as usize + *run / EAGER_SLOT as usize == slot as usize && *run + n <= max_run =>
            {
                *run += n
            }
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
        let all = usize::MAX;
        assert_eq!(runs(&[3, 4, 5], 2 * EAGER_SLOT + 7, all), [(0, 2 * slot + 7, 3)]);
        assert_eq!(runs(&[3, 9, 10], 3 * EAGER_SLOT, all), [(0, slot, 3), (slot, 2 * slot, 9)]);
        assert_eq!(runs(&[5, 4], EAGER_SLOT + 1, all), [(0, slot, 5), (slot, 1, 4)], "descending is two runs");
        assert_eq!(runs(&[0], 1, all), [(0, 1, 0)]);
    }

    #[test]
    fn runs_stop_growing_at_their_limit() {
        let slot = EAGER_SLOT as usize;
        assert_eq!(
            runs(&[3, 4, 5], 2 * EAGER_SLOT + 7, slot),
            [(0, slot, 3), (slot, slot, 4), (2 * slot, 7, 5)],
            "one slot each"
        );
        assert_eq!(runs(&[3, 4, 5, 6], 4 * EAGER_SLOT, 2 * slot + 1), [(0, 2 * slot, 3), (2 * slot, 2 * slot, 5)]);
        assert_eq!(runs(&[3, 4], EAGER_SLOT + 9, slot + 9), [(0, slot + 9, 3)], "a short tail fits");
    }

    #[test]
    fn slots_are_taken_lowest_first_ascending_and_come_back() {
        let memory = LandingMemory::new(&RegionTable::default()).unwrap();
        let base = memory.region.base;
        let mut l: Landings<()> = Landings::new(memory);
        let slot = EAGER_SLOT as usize;
        let Some(Extent::Scattered { segs, .. }) = l.take(1, 7, 2 * EAGER_SLOT + 1) else { panic!("scattered") };
        let at: Vec<_> = segs.iter().map(|s| (s.addr - base, s.len)).collect();
        assert_eq!(at, [(0, slot), (slot, slot), (2 * slot, 1)]);
        assert_eq!(l.held(), 3 * EAGER_SLOT);
        assert!(l.take(2, 8, MAX_INLINE_SEND_BACKLOG).is_none(), "more than is free");
        let first = l.remove(1).unwrap();
        l.release(first);
        assert_eq!(l.held(), 0);
        let Some(Extent::Scattered { segs, .. }) = l.take(3, 9, EAGER_SLOT) else { panic!("scattered") };
        assert_eq!(segs[0].addr, base, "the lowest slot again");
    }
}
