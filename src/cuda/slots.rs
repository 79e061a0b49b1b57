//! A staging ring's host memory: slots page-locked one by one, each at its first copy or ahead of
//! it on the process's slot locker ([`SlotMemory::lock_ahead`]), whichever comes first.
//!
//! Locked all at once, a connection's four rings of 16 MiB took 25-30 ms of its setup on one H200
//! (`cuMemHostAlloc` of 16 MiB 5-9 ms, most of it faulting and zeroing the pages), which a request
//! made right after loading the peer waited for. Locked at first use only, a 2 MiB slot costs its
//! first copy about 0.6 ms, and a first transfer that touches every slot of four rings pays that
//! 32 times on each side. So a ring's slots are locked in the background, from the last down, while
//! copies take them from the first up: SGLang's first push of 8 KiB pages, a second after loading
//! the peer, took 0.85-1.84x a steady one instead of 2.5-3.2x (one H200); one made at once still
//! locks the slots it reaches before the locker. The mapping asks for huge pages (locking them took 0.6x the
//! time of small ones there) and is left out of forked children, which must not share pages the
//! GPU writes.
//!
//! Locking a 2 MiB slot took 0.5-2.4 ms there (faulting 0.3-1.2, then `cuMemHostRegister` 0.1-1.3,
//! which holds a lock every driver call of the process waits for), and a connection makes a ring
//! ahead for each of its comms, both directions: about ten a process, 100 ms of locking. Locked in
//! the order they were made, they had the first copies of a push made right after loading the peer
//! wait 0.7-2.8 ms each for their slot and as long again for the driver. So the locker serves the
//! rings comms hold (moving data) first, and the idle ones only while no comm holds any: SGLang's
//! 8 KiB push made at once, first room 2.1-2.6x a steady one instead of 2.4-5.1x. A comm holds no
//! ring until its first chunk posts, while its GPU registrations (each asks the driver where the
//! memory lies) come first, so idle rings also wait for a while after a staged comm registers GPU
//! memory ([`traffic_coming`]); and a comm takes the idle ring locked furthest (the pool's
//! `take`), not the newest made, which the locker reaches last: 1.2-1.8x.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use parking_lot::{Condvar, Mutex};

use super::{Gpu, check};
use crate::error::{Error, Result};
use crate::host_memory::{HUGE_PAGE, page_size};
use crate::threads::{Look, ThreadKind, WorkQueue, spawn_contained};

/// Which slots are locked, and who is locking one: a copy at the slot's first use, or the locker.
/// Plain bookkeeping over any way of locking, tested without a GPU.
struct SlotLocks {
    /// Read without a lock by every copy.
    locked: Vec<AtomicBool>,
    /// Held while a slot is being locked, so that it is locked once.
    claims: Vec<Mutex<()>>,
}

impl SlotLocks {
    fn new(slots: usize, locked: bool) -> SlotLocks {
        SlotLocks {
            locked: (0..slots).map(|_| AtomicBool::new(locked)).collect(),
            claims: (0..slots).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Locks `slot` with `lock` unless it is; a copy waits here while the locker locks it.
    fn lock(&self, slot: usize, lock: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.locked[slot].load(Ordering::Acquire) {
            return Ok(());
        }
        let _claim = self.claims[slot].lock();
        self.lock_claimed(slot, lock).map(|_| ())
    }

    /// Locks `slot` with `lock` unless it is or someone is locking it now (a copy: the locker
    /// moves on); whether this call locked it.
    fn lock_unclaimed(&self, slot: usize, lock: impl FnOnce() -> Result<()>) -> Result<bool> {
        match self.claims[slot].try_lock() {
            Some(_claim) => self.lock_claimed(slot, lock),
            None => Ok(false),
        }
    }

    fn lock_claimed(&self, slot: usize, lock: impl FnOnce() -> Result<()>) -> Result<bool> {
        if self.locked[slot].load(Ordering::Acquire) {
            return Ok(false);
        }
        lock()?;
        self.locked[slot].store(true, Ordering::Release);
        Ok(true)
    }

    /// The slot the locker locks next: the last one neither locked nor being locked by a copy.
    fn next(&self) -> Option<usize> {
        (0..self.len()).rev().find(|&s| !self.is_locked(s) && !self.claims[s].is_locked())
    }

    fn is_locked(&self, slot: usize) -> bool {
        self.locked[slot].load(Ordering::Acquire)
    }

    fn count(&self) -> usize {
        self.locked.iter().filter(|l| l.load(Ordering::Acquire)).count()
    }

    fn len(&self) -> usize {
        self.locked.len()
    }
}

/// The mapping, shared by its ring and the locker while the locker works on it.
struct Slots {
    gpu: Arc<Gpu>,
    ptr: *mut u8,
    slot_size: usize,
    locks: SlotLocks,
    /// A comm holds the ring ([`SlotMemory::hold`]).
    held: AtomicBool,
    /// The locker failed on a slot: it leaves the rest to the copies, which report the failure.
    ahead_failed: AtomicBool,
}

// SAFETY: a plain mapping; who may touch which bytes when is up to the owner (the staging ring).
// The locker only page-locks slots, which changes no byte, under the slot's claim.
unsafe impl Send for Slots {}
// SAFETY: as above; shared references lock slots through `locks` and hand out addresses only.
unsafe impl Sync for Slots {}

impl Slots {
    /// Whether the slots are locked as one range: slots of part of a page cannot be locked apart.
    fn whole(&self) -> bool {
        !self.slot_size.is_multiple_of(page_size())
    }

    fn len(&self) -> usize {
        self.slot_size * self.locks.len()
    }

    /// Page-locks `len` bytes from `at` of the mapping.
    fn register(&self, at: usize, len: usize) -> Result<()> {
        let _ctx = self.gpu.enter()?;
        check(
            // SAFETY: the range lies in the live mapping (the callers' bounds); the GPU's context is
            // current (entered above).
            unsafe { sys::cuMemHostRegister_v2(self.ptr.add(at).cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) },
            &format!("cuMemHostRegister of {len} bytes of staging slots"),
        )
    }

    /// Page-locks `slot` now, on whatever thread asks. Its pages are faulted in first, outside the
    /// driver: `cuMemHostRegister` holds a lock that every other driver call of the process waits
    /// for (a copy's issue, an event's query, a ring being made), and faulting and zeroing fresh
    /// pages was most of its time (one H200: making a ring beside the locker took 4.5-8.5 ms with
    /// the faults inside the registration, 0.15-1.4 ms with them outside). Populating only maps the
    /// pages writable; it writes no byte, so a slot a socket is filling is safe.
    fn lock_slot(&self, slot: usize) -> Result<()> {
        // Whole pages (else all were locked in `new`): slot < slots, so it lies in the mapping.
        let at = slot * self.slot_size;
        // SAFETY: the range lies in the live mapping; the advice changes no byte. A kernel before
        // 5.14 refuses it, and the registration faults the pages in as before.
        unsafe { libc::madvise(self.ptr.add(at).cast(), self.slot_size, libc::MADV_POPULATE_WRITE) };
        self.register(at, self.slot_size)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if let Ok(_ctx) = self.gpu.enter() {
            let starts = if self.whole() { 0..1 } else { 0..self.locks.len() };
            for slot in starts.filter(|&s| self.locks.is_locked(s)) {
                // SAFETY: registered once by lock_slot or new, unregistered once here, as the last
                // holder lets go (the ring, which made sure no copy still uses it, or the locker
                // done with a slot of a ring already dropped).
                let _ = unsafe { sys::cuMemHostUnregister(self.ptr.add(slot * self.slot_size).cast()) };
            }
        }
        // SAFETY: the range mapped in new(), unmapped once here.
        unsafe { libc::munmap(self.ptr.cast(), self.len()) };
    }
}

/// Host memory cut into slots, each page-locked before its first copy uses it. Frees itself on
/// drop (after the locker let go of it).
pub struct SlotMemory {
    slots: Arc<Slots>,
}

impl SlotMemory {
    pub fn new(gpu: &Arc<Gpu>, slot_size: usize, slots: usize) -> Result<SlotMemory> {
        let len = slot_size
            .checked_mul(slots)
            .filter(|&n| n > 0 && n <= isize::MAX as usize - HUGE_PAGE)
            .ok_or_else(|| Error::invalid(format!("{slots} staging slots of {slot_size} bytes")))?;
        // Mapped a huge page longer, then trimmed to a huge-page-aligned range.
        let over = len + HUGE_PAGE;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::backend(format!(
                "mmap of {over} bytes for staging slots: {}",
                std::io::Error::last_os_error()
            )));
        }
        let (raw, start) = (raw as usize, (raw as usize).next_multiple_of(HUGE_PAGE));
        // SAFETY: both ranges lie in the mapping made above and outside [start, start + len).
        unsafe {
            if start > raw {
                libc::munmap(raw as *mut libc::c_void, start - raw);
            }
            libc::munmap((start + len) as *mut libc::c_void, raw + over - start - len);
            // Advice only: a kernel without transparent huge pages keeps small ones.
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTFORK);
        }
        let mut memory = Slots {
            gpu: gpu.clone(),
            ptr: start as *mut u8,
            slot_size,
            locks: SlotLocks::new(slots, false),
            held: AtomicBool::new(false),
            ahead_failed: AtomicBool::new(false),
        };
        if memory.whole() {
            memory.register(0, len)?;
            memory.locks = SlotLocks::new(slots, true);
        }
        Ok(SlotMemory { slots: Arc::new(memory) })
    }

    /// Page-locks `slot` unless it is already, so that copies between it and the GPU run
    /// asynchronously; waits while the locker is locking it.
    pub fn pin(&self, slot: usize) -> Result<()> {
        let slots = &self.slots;
        slots.locks.lock(slot, || slots.lock_slot(slot))
    }

    /// Has the process's slot locker lock every slot not yet locked, from the last down, on its
    /// own thread. A slot it fails on is left to its first copy, which reports the failure.
    pub fn lock_ahead(&self) {
        if self.slots.locks.count() == self.slots.locks.len() {
            return;
        }
        let mut queue = LOCKER.lock();
        if queue.push(Arc::downgrade(&self.slots)) {
            drop(queue);
            start_locker();
        } else {
            LOCKER_WAITS.notify_one();
        }
    }

    /// A comm takes the ring (`true`) or gives it back (`false`). The locker serves held rings
    /// first, and idle ones only while no ring of the process is held; a ring taken with slots
    /// left to lock wakes it.
    pub fn hold(&self, held: bool) {
        if self.slots.held.swap(held, Ordering::AcqRel) == held {
            return;
        }
        if !held {
            // Idle rings wait for a look with no ring held (`RECHECK`): a wake-up at every
            // give-back would cost a stream of small transfers one each.
            HELD.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        HELD.fetch_add(1, Ordering::AcqRel);
        if self.slots.locks.count() < self.slots.locks.len() {
            let mut queue = LOCKER.lock();
            if queue.wake() {
                drop(queue);
                start_locker();
            } else {
                LOCKER_WAITS.notify_one();
            }
        }
    }

    /// Slots page-locked so far.
    pub fn pinned(&self) -> usize {
        self.slots.locks.count()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.slots.ptr
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.locks.len() == 0
    }
}

impl Drop for SlotMemory {
    fn drop(&mut self) {
        // A ring dropped while held (with its comm) holds nothing any more.
        self.hold(false);
    }
}

/// Rings whose slots wait to be locked ahead, served by one thread: locking is the driver's and
/// the kernel's work (faulting, zeroing, pinning pages), which more threads did not hide.
static LOCKER: Mutex<WorkQueue<Weak<Slots>>> = Mutex::new(WorkQueue::new());

/// Where the locker waits while only idle rings are left and a ring is held.
static LOCKER_WAITS: Condvar = Condvar::new();

/// Slots the locker locked, for tests.
static LOCKED_AHEAD: AtomicU64 = AtomicU64::new(0);

/// Rings of the process held by comms now.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// When a staged comm of the process last registered GPU memory, in microseconds from the first
/// such registration plus one (0: never).
static COMING_AT: AtomicU64 = AtomicU64::new(0);

/// The clock of [`COMING_AT`].
fn clock_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let us = EPOCH.get_or_init(Instant::now).elapsed().as_micros();
    u64::try_from(us).unwrap_or(u64::MAX - 1) + 1
}

/// A staged comm registered GPU memory: its transfers are about to take rings. The locker leaves
/// idle rings alone for [`QUIET`] after it, so that the registrations and the first copies do not
/// wait on the driver behind an idle ring's `cuMemHostRegister` (a comm holds no ring until its
/// first chunk posts, so [`HELD`] alone leaves that stretch to idle rings).
pub fn traffic_coming() {
    COMING_AT.store(clock_us(), Ordering::Release);
}

/// How long after traffic was last announced idle rings wait.
const QUIET: Duration = RECHECK;

/// Whether traffic was announced within [`QUIET`] before `now` (`coming`: when it last was).
fn traffic_near(now: u64, coming: u64) -> bool {
    coming != 0 && now.saturating_sub(coming) < QUIET.as_micros() as u64
}

/// Whether a comm moves data now or is about to: idle rings wait.
fn traffic() -> bool {
    HELD.load(Ordering::Acquire) > 0 || traffic_near(clock_us(), COMING_AT.load(Ordering::Acquire))
}

/// Starts the locker's thread (the queue said none serves it).
fn start_locker() {
    let builder = std::thread::Builder::new().name("uccl-slot-lock".into());
    // A panic leaves the queued slots to their first copies.
    let on_panic = |_| {
        LOCKER.lock().abandon();
    };
    if let Err(e) = spawn_contained(builder, ThreadKind::SlotLocker, on_panic, lock_while_doable) {
        LOCKER.lock().abandon();
        log::debug!("no thread to lock staging slots ahead: {e}");
    }
}

/// How often the locker looks again while idle rings wait for no ring to be held; a ring taken
/// meanwhile wakes it at once.
const RECHECK: Duration = Duration::from_millis(10);

/// The locker: one slot at a time, the next by [`choose`], until none is to be locked now or
/// later. The queue is held only to choose (and to wait); a ring dropped meanwhile is freed at its
/// drop.
fn lock_while_doable() {
    loop {
        let next = {
            let mut queue = LOCKER.lock();
            loop {
                match choose(&mut queue, traffic(), look_at) {
                    Next::Lock(s, slot) => break Some((s, slot)),
                    Next::Later => {
                        LOCKER_WAITS.wait_for(&mut queue, RECHECK);
                    }
                    Next::Nothing => {
                        queue.stop();
                        break None;
                    }
                }
            }
        };
        let Some((s, slot)) = next else { return };
        match s.locks.lock_unclaimed(slot, || s.lock_slot(slot)) {
            Ok(locked) => {
                LOCKED_AHEAD.fetch_add(u64::from(locked), Ordering::Relaxed);
            }
            Err(e) => {
                log::debug!("staging slot not locked ahead, left to its first copy: {}", e.message());
                // And the ring's other slots: it leaves the queue.
                s.ahead_failed.store(true, Ordering::Release);
            }
        }
    }
}

fn look_at(ring: &Weak<Slots>) -> Ring<Arc<Slots>> {
    let Some(s) = ring.upgrade().filter(|s| !s.ahead_failed.load(Ordering::Acquire)) else {
        return Ring::Gone;
    };
    match s.locks.next() {
        Some(slot) => Ring::Lock { held: s.held.load(Ordering::Acquire), slot, ring: s },
        None if s.locks.count() == s.locks.len() => Ring::Gone,
        None => Ring::Busy,
    }
}

/// A queued ring as the locker sees it.
enum Ring<R> {
    /// Dropped, or every slot locked.
    Gone,
    /// Its unlocked slots are being locked by copies.
    Busy,
    Lock {
        held: bool,
        slot: usize,
        ring: R,
    },
}

/// What the locker does next.
#[derive(Debug, PartialEq)]
enum Next<R> {
    Lock(R, usize),
    /// Only idle rings wait, while there is traffic.
    Later,
    Nothing,
}

/// The locker's next slot: one of a ring a comm holds, else, while no comm holds any or is about
/// to ([`traffic`] false), one of an idle ring, whose locking would otherwise hold the driver
/// against the comms' registrations and copies. Oldest ring first; gone rings leave the queue.
fn choose<T, R>(queue: &mut WorkQueue<T>, traffic: bool, look: impl Fn(&T) -> Ring<R>) -> Next<R> {
    let look = &look;
    let pass = |held_only: bool| {
        move |item: &T| match look(item) {
            Ring::Gone => Look::Spent,
            Ring::Busy => Look::Skip,
            Ring::Lock { held, slot, ring } if held || !held_only => Look::Take((ring, slot)),
            Ring::Lock { .. } => Look::Skip,
        }
    };
    if let Some((ring, slot)) = queue.find(pass(true)) {
        return Next::Lock(ring, slot);
    }
    match queue.find(pass(false)) {
        Some((ring, slot)) if !traffic => Next::Lock(ring, slot),
        Some(_) => Next::Later,
        None => Next::Nothing,
    }
}

/// Slots the process's locker has locked ahead of their first copy so far.
pub fn locked_ahead() -> u64 {
    LOCKED_AHEAD.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{Next, QUIET, Ring, SlotLocks, choose, traffic_near};
    use crate::error::Error;
    use crate::threads::WorkQueue;

    /// The locker's next slot is the last one neither locked nor claimed by a copy.
    #[test]
    fn the_locker_takes_the_last_slot_no_one_has() {
        let locks = SlotLocks::new(4, false);
        assert_eq!(locks.next(), Some(3));
        assert!(locks.lock_unclaimed(3, || Ok(())).unwrap(), "this call locked it");
        assert!(!locks.lock_unclaimed(3, || panic!("locked again")).unwrap());
        assert_eq!(locks.next(), Some(2));
        let claim = locks.claims[2].lock();
        assert_eq!(locks.next(), Some(1), "a copy is locking slot 2");
        drop(claim);
        (0..3).for_each(|s| locks.lock(s, || Ok(())).unwrap());
        assert_eq!(locks.next(), None);
    }

    /// Held rings are locked first, oldest first; idle rings only while no ring is held; rings
    /// gone leave the queue and rings whose slots copies are locking wait.
    #[test]
    fn held_rings_go_first_and_idle_ones_wait_for_no_traffic() {
        #[derive(Clone, Copy)]
        enum Fake {
            Idle(usize),
            Held(usize),
            Busy,
            Gone,
        }
        let look = |f: &Fake| match *f {
            Fake::Idle(slot) => Ring::Lock { held: false, slot, ring: 'i' },
            Fake::Held(slot) => Ring::Lock { held: true, slot, ring: 'h' },
            Fake::Busy => Ring::Busy,
            Fake::Gone => Ring::Gone,
        };
        let mut queue = WorkQueue::new();
        for f in [Fake::Gone, Fake::Idle(7), Fake::Busy, Fake::Held(3), Fake::Held(5)] {
            queue.push(f);
        }
        assert_eq!(choose(&mut queue, true, look), Next::Lock('h', 3), "the oldest held ring, before older idle ones");
        assert_eq!(choose(&mut queue, false, look), Next::Lock('h', 3), "held first without traffic too");
        assert_eq!(queue.abandon(), 4, "the gone ring left the queue");
        for f in [Fake::Busy, Fake::Idle(7), Fake::Idle(2)] {
            queue.push(f);
        }
        assert_eq!(choose(&mut queue, true, look), Next::Later, "idle rings wait while a ring is held");
        assert_eq!(choose(&mut queue, false, look), Next::Lock('i', 7), "and are locked once none is");
        assert_eq!(queue.abandon(), 3);
        queue.push(Fake::Busy);
        assert_eq!(choose(&mut queue, true, look), Next::Nothing, "copies lock the rest");
        queue.push(Fake::Gone);
        assert_eq!(choose(&mut queue, false, look), Next::Nothing);
        assert_eq!(queue.abandon(), 1, "the gone ring left, the busy one waits");
    }

    /// Traffic announced keeps idle rings waiting for QUIET after it, and none announced never.
    #[test]
    fn announced_traffic_is_near_for_the_quiet_time() {
        let quiet = QUIET.as_micros() as u64;
        assert!(!traffic_near(5, 0), "never announced");
        assert!(traffic_near(100, 100) && traffic_near(100 + quiet - 1, 100));
        assert!(!traffic_near(100 + quiet, 100), "quiet once QUIET passed");
        assert!(traffic_near(50, 100), "announced after the locker read its clock");
    }

    /// A copy and the locker going at the same slots from both ends lock each exactly once, and
    /// every slot ends locked.
    #[test]
    fn each_slot_is_locked_once_whoever_gets_there_first() {
        const SLOTS: usize = 64;
        for _ in 0..50 {
            let locks = SlotLocks::new(SLOTS, false);
            let calls: Vec<AtomicUsize> = (0..SLOTS).map(|_| AtomicUsize::new(0)).collect();
            let lock = |slot: usize| {
                calls[slot].fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
                Ok(())
            };
            std::thread::scope(|s| {
                s.spawn(|| {
                    (0..SLOTS).rev().for_each(|i| {
                        let _ = locks.lock_unclaimed(i, || lock(i)).unwrap();
                    })
                });
                s.spawn(|| (0..SLOTS).for_each(|i| locks.lock(i, || lock(i)).unwrap()));
                s.spawn(|| (0..SLOTS).for_each(|i| locks.lock(i, || lock(i)).unwrap()));
            });
            assert_eq!(locks.count(), SLOTS);
            assert!(calls.iter().all(|c| c.load(Ordering::Relaxed) == 1), "a slot locked twice or never");
        }
    }

    /// A failed lock leaves its slot unlocked and says why; the next copy tries again. The locker
    /// skips a slot a copy holds, and locks nothing already locked.
    #[test]
    fn a_failed_lock_is_reported_and_tried_again() {
        let locks = SlotLocks::new(2, false);
        let err = locks.lock(0, || Err(Error::backend("no memory to lock"))).unwrap_err();
        assert!(err.message().contains("no memory to lock"));
        assert_eq!(locks.count(), 0);
        locks.lock(0, || Ok(())).unwrap();
        locks.lock(0, || panic!("locked again")).unwrap();
        assert!(!locks.lock_unclaimed(0, || panic!("locked again")).unwrap());
        let claim = locks.claims[1].lock();
        assert!(!locks.lock_unclaimed(1, || panic!("the locker took a slot a copy holds")).unwrap());
        drop(claim);
        assert_eq!(locks.count(), 1);
        assert!(locks.lock_unclaimed(1, || Ok(())).unwrap());
        assert_eq!(locks.count(), 2);
    }
}
