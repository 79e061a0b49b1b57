//! The rings of one staged net (one engine): a comm holds a ring only while it has requests
//! outstanding, and gives it back here when it has none; the pool keeps idle rings for the next
//! comm that needs one. Up to its bound, the smaller of `UCCL_TCPX_STAGING_POOL` bytes and one ring
//! per live comm, it keeps them for good; past it, a ring is freed once it sat here unused for
//! [`LINGER`]. So an idle connection holds no staging memory, what an engine pins follows the most
//! its comms moved at once in the last moments, and a connection's first transfer takes a ring made
//! ahead (a new comm warms the pool while it holds fewer rings than the bound) instead of pinning
//! megabytes on its critical path.
//!
//! Making a ring (pinned slots, streams, events, bounce buffers) takes milliseconds, so a load
//! wider than the bound must not free and make rings round after round: freed at once past the
//! bound, 16 connections each writing 1 MiB of GPU memory at once ran at 0.11 GB/s against 5.95
//! for one (2 x H100); freed after half a second unused, 64 connections still did (0.12 GB/s),
//! since rounds slowed by making rings left rings unused that long. So nothing past the bound is
//! freed within [`CALM`] of a comm finding the pool empty, and then only rings unused for
//! [`LINGER`]. Rings past the bound are freed by the engine's progress thread as it parks
//! ([`Pool::next_trim`]), or at the pool's next use.
//!
//! A comm never waits for a ring: one that finds the pool empty makes its own, so no comm's
//! progress depends on another's giving back (two engines sending to each other from full pools
//! would otherwise each wait for the other's receives).
//!
//! The policy is [`Pool`], plain bookkeeping over any ring type and a clock the caller reads,
//! tested without a GPU.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a ring past the pool's bound stays idle before it is freed: longer than the gaps of a
/// steady load, short enough that a burst's rings are gone within seconds of it.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// How long after the pool last ran short (a comm made a ring) nothing past the bound is freed.
pub(super) const CALM: Duration = Duration::from_secs(5);

/// Idle rings, each with when it was given back, and the counts the policy needs.
pub(super) struct Pool<R> {
    /// Oldest first: the back is taken next (the most recently used), the front freed first.
    idle: VecDeque<(R, Instant)>,
    /// Rings made and not freed: idle here or held by a comm.
    live: usize,
    /// Staged comms alive: the pool keeps no more idle rings for good than comms to take them.
    comms: usize,
    /// Idle rings kept for good at most (`UCCL_TCPX_STAGING_POOL` over a ring's bytes).
    keep: usize,
    /// When a comm last found the pool empty.
    short: Option<Instant>,
}

impl<R> Pool<R> {
    pub(super) fn new(keep: usize) -> Pool<R> {
        Pool { idle: VecDeque::new(), live: 0, comms: 0, keep, short: None }
    }

    /// The most idle rings kept for good now.
    fn bound(&self) -> usize {
        self.keep.min(self.comms)
    }

    /// A comm was made.
    pub(super) fn comm_made(&mut self) {
        self.comms += 1;
    }

    /// Whether a ring should be made into the pool now, for a comm whose first transfers will
    /// stage (the pool holds fewer rings in all than the bound), so that they find one.
    pub(super) fn wants_ring(&self) -> bool {
        self.live < self.bound()
    }

    /// A ring made ahead on [`Pool::wants_ring`]'s answer joins the idle ones.
    pub(super) fn warmed(&mut self, ring: R, now: Instant) {
        self.live += 1;
        self.idle.push_back((ring, now));
    }

    /// A comm is gone (after giving back its ring, if it held one): with none left, every idle
    /// ring, else those due ([`Pool::trim`]), for the caller to free outside the lock.
    pub(super) fn comm_dropped(&mut self, now: Instant) -> Vec<R> {
        self.comms = self.comms.saturating_sub(1);
        if self.comms == 0 {
            self.live -= self.idle.len();
            return self.idle.drain(..).map(|(r, _)| r).collect();
        }
        self.trim(now)
    }

    /// An idle ring for a comm about to stage, if the pool holds one: the one with the most slots
    /// page-locked (`locked`), the most recently used of those; else the comm makes its own and
    /// reports it with [`Pool::made`]. Rings made ahead are locked oldest first by the process's
    /// locker, so a comm taking the newest, as the most recently used, took the one least locked.
    pub(super) fn take(&mut self, locked: impl Fn(&R) -> usize) -> Option<R> {
        let at = (0..self.idle.len()).max_by_key(|&at| (locked(&self.idle[at].0), at))?;
        self.idle.remove(at).map(|(r, _)| r)
    }

    /// A comm made a ring of its own (the pool was empty).
    pub(super) fn made(&mut self, now: Instant) {
        self.live += 1;
        self.short = Some(now);
    }

    /// When rings past the bound may be freed again: [`CALM`] after the pool last ran short.
    fn calm_from(&self) -> Option<Instant> {
        self.short.map(|t| t + CALM)
    }

    /// A comm with nothing outstanding gives its ring back; the rings now due are returned for
    /// the caller to free outside the lock.
    pub(super) fn give(&mut self, ring: R, now: Instant) -> Vec<R> {
        self.idle.push_back((ring, now));
        self.trim(now)
    }

    /// The idle rings past the bound that sat unused for [`LINGER`], oldest first; none within
    /// [`CALM`] of the pool running short.
    pub(super) fn trim(&mut self, now: Instant) -> Vec<R> {
        let mut due = Vec::new();
        if self.calm_from().is_some_and(|calm| now < calm) {
            return due;
        }
        while self.idle.len() > self.bound()
            && self.idle.front().is_some_and(|(_, since)| now.saturating_duration_since(*since) >= LINGER)
        {
            due.extend(self.idle.pop_front().map(|(r, _)| r));
        }
        self.live -= due.len();
        due
    }

    /// When the next idle ring past the bound is due to be freed; `None` while none is past it.
    pub(super) fn next_trim(&self, now: Instant) -> Option<Duration> {
        if self.idle.len() <= self.bound() {
            return None;
        }
        let (_, since) = self.idle.front()?;
        let lingered = LINGER.saturating_sub(now.saturating_duration_since(*since));
        let calm = self.calm_from().map_or(Duration::ZERO, |calm| calm.saturating_duration_since(now));
        Some(lingered.max(calm))
    }

    /// A ring that cannot go back (its comm failed with copies in flight) is freed by its comm.
    pub(super) fn lost(&mut self) {
        self.live = self.live.saturating_sub(1);
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.live, self.idle.len())
    }
}

/// What the staged nets of this process did with their rings: for tests and the benchmark, which
/// have no other view of what an engine pins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounts {
    /// Rings made ahead into a pool as a comm was made.
    pub at_connect: u64,
    /// Rings made by a comm that found its pool empty at a registration or post of device memory.
    pub on_first_use: u64,
    /// Rings a comm took from its pool.
    pub taken: u64,
    /// Rings given back to a pool (kept or freed).
    pub given_back: u64,
    /// Rings freed: given back past the bound, or their comm gone.
    pub freed: u64,
    /// Lanes added to a ring for memory of another GPU.
    pub lanes_added: u64,
}

pub(super) struct Counters {
    pub(super) at_connect: AtomicU64,
    pub(super) on_first_use: AtomicU64,
    pub(super) taken: AtomicU64,
    pub(super) given_back: AtomicU64,
    pub(super) freed: AtomicU64,
    pub(super) lanes_added: AtomicU64,
}

pub(super) static COUNTS: Counters = Counters {
    at_connect: AtomicU64::new(0),
    on_first_use: AtomicU64::new(0),
    taken: AtomicU64::new(0),
    given_back: AtomicU64::new(0),
    freed: AtomicU64::new(0),
    lanes_added: AtomicU64::new(0),
};

pub(super) fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

impl RingCounts {
    /// Rings of the process made and not freed, idle in a pool or held by a comm.
    pub fn live(&self) -> u64 {
        (self.at_connect + self.on_first_use).saturating_sub(self.freed)
    }
}

pub fn ring_counts() -> RingCounts {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = &COUNTS;
    RingCounts {
        at_connect: get(&c.at_connect),
        on_first_use: get(&c.on_first_use),
        taken: get(&c.taken),
        given_back: get(&c.given_back),
        freed: get(&c.freed),
        lanes_added: get(&c.lanes_added),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{CALM, LINGER, Pool};

    /// Comms warm the pool one ring each up to the bound; past it, new comms make nothing.
    #[test]
    fn new_comms_warm_one_ring_each_up_to_the_bound() {
        let (mut pool, now) = (Pool::<u32>::new(3), Instant::now());
        let mut warmed = 0;
        for _ in 0..10 {
            pool.comm_made();
            if pool.wants_ring() {
                pool.warmed(warmed, now);
                warmed += 1;
            }
        }
        assert_eq!(warmed, 3, "three rings made ahead for ten comms");
        assert_eq!(pool.counts(), (3, 3));
    }

    /// Busy comms past the pool make rings of their own without waiting; given back, those past
    /// the bound stay through a steady load's gaps and are freed once they sat unused for LINGER.
    #[test]
    fn rings_past_the_bound_linger_then_go() {
        let (mut pool, t0) = (Pool::<u32>::new(2), Instant::now());
        for _ in 0..8 {
            pool.comm_made();
            if pool.wants_ring() {
                pool.warmed(0, t0);
            }
        }
        // Rounds further apart than LINGER, within CALM of the first, which ran short: each round
        // finds the rings the one before gave back.
        let gap = LINGER + LINGER / 2;
        for round in 0..3u32 {
            let now = t0 + gap * round;
            let mut held = Vec::new();
            for k in 0..8 {
                held.push(pool.take(|_| 0).unwrap_or_else(|| {
                    pool.made(now);
                    100 + k
                }));
            }
            assert_eq!(pool.counts(), (8, 0), "round {round}: eight busy comms, eight rings, none waited");
            let freed: usize = held.into_iter().map(|r| pool.give(r, now).len()).sum();
            assert_eq!(freed, 0, "round {round}: nothing freed within a steady load");
        }
        let last = t0 + gap * 2;
        assert!(pool.trim(t0 + CALM - Duration::from_millis(1)).is_empty(), "within CALM of running short");
        assert_eq!(pool.next_trim(last), Some(LINGER), "due once calm and lingered");
        assert_eq!(pool.trim(last + LINGER).len(), 6, "all but the bound freed then");
        assert_eq!((pool.counts(), pool.next_trim(last + LINGER)), ((2, 2), None));
    }

    /// Past the bound and calm, a ring given back goes once it lingered unused.
    #[test]
    fn a_ring_past_the_bound_goes_once_it_lingered() {
        let (mut pool, t0) = (Pool::<u32>::new(1), Instant::now());
        pool.comm_made();
        assert!(pool.wants_ring());
        pool.warmed(1, t0);
        pool.comm_made();
        assert!(!pool.wants_ring(), "the bound of one is warm");
        let first = pool.take(|_| 0).unwrap();
        pool.made(t0);
        let calm = t0 + CALM;
        assert!(pool.give(first, calm).is_empty() && pool.give(2, calm).is_empty());
        assert_eq!(pool.next_trim(calm), Some(LINGER));
        assert_eq!(pool.trim(calm + LINGER), vec![1], "the oldest idle ring goes first");
        assert_eq!(pool.counts(), (1, 1));
    }

    /// A comm takes the idle ring with the most slots locked, the most recently used of equals:
    /// rings made ahead are locked oldest first, given-back ones are warmest last.
    #[test]
    fn a_comm_takes_the_most_locked_ring_then_the_most_recent() {
        let (mut pool, now) = (Pool::<(u32, usize)>::new(4), Instant::now());
        for ring in [(1, 8), (2, 3), (3, 0), (4, 0)] {
            pool.comm_made();
            pool.warmed(ring, now);
        }
        let locked = |r: &(u32, usize)| r.1;
        assert_eq!(pool.take(locked), Some((1, 8)), "the oldest made ahead, locked furthest");
        assert_eq!(pool.take(locked), Some((2, 3)));
        assert_eq!(pool.take(locked), Some((4, 0)), "of equals, the back");
        assert!(pool.give((1, 8), now).is_empty() && pool.give((5, 8), now).is_empty());
        assert_eq!(pool.take(locked), Some((5, 8)), "of locked ones, the most recently given back");
        assert_eq!(pool.take(locked), Some((1, 8)));
        assert_eq!(pool.take(locked), Some((3, 0)));
        assert_eq!(pool.take(locked), None);
    }

    /// Closing comms shrinks the bound; with no comm left every ring goes at once.
    #[test]
    fn closing_comms_free_what_the_bound_no_longer_covers() {
        let (mut pool, now) = (Pool::<u32>::new(4), Instant::now());
        for _ in 0..4 {
            pool.comm_made();
            if pool.wants_ring() {
                pool.warmed(1, now);
            }
        }
        let later = now + LINGER;
        assert_eq!(pool.comm_dropped(later).len(), 1, "one past the new bound, due");
        assert_eq!(pool.comm_dropped(now).len(), 0, "one past the new bound, not due yet");
        assert_eq!(pool.counts(), (3, 3));
        assert_eq!(pool.next_trim(now + Duration::from_millis(1)), Some(LINGER - Duration::from_millis(1)));
        assert_eq!(pool.comm_dropped(now).len(), 0);
        assert_eq!(pool.comm_dropped(now).len(), 3, "the last comm gone: every ring at once");
        assert_eq!(pool.counts(), (0, 0));
    }

    /// A pool of nothing frees every ring once it lingered; a lost ring leaves the count.
    #[test]
    fn a_pool_of_nothing_keeps_nothing_for_good() {
        let (mut pool, now) = (Pool::<u32>::new(0), Instant::now());
        pool.comm_made();
        assert!(!pool.wants_ring(), "nothing made ahead");
        assert!(pool.take(|_| 0).is_none());
        pool.made(now);
        assert!(pool.give(7, now).is_empty());
        assert!(pool.trim(now + LINGER).is_empty(), "calm first");
        assert_eq!(pool.trim(now + CALM), vec![7]);
        pool.made(now);
        pool.lost();
        assert_eq!(pool.counts(), (0, 0));
    }
}
