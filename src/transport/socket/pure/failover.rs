//! When a send comm over several data links checks its links and dials a dead socket's link again.
//! Its sockets are checked a few times per bound while it waits for acknowledgements; a socket
//! declared dead has its link dialed again from a spare slot after the bound, then after twice,
//! four, eight and sixteen times the bound for each attempt that fails, as long as spare slots
//! last (`SPARE_SOCKETS`): a link that comes back is used again, and one that does not costs one
//! connect attempt per back-off. A re-dialed socket that has not joined within [`JOIN_BOUNDS`]
//! bounds is abandoned (its SYN may be unanswered for minutes otherwise).

use std::time::{Duration, Instant};

/// Spare slots an acknowledged comm keeps for replacing dead sockets.
pub(crate) const SPARE_SOCKETS: usize = 8;
/// Bounds a re-dialed socket may take to join.
const JOIN_BOUNDS: u32 = 4;
/// The back-off doubles this many times at most.
const MAX_DOUBLINGS: u32 = 4;

/// A dead socket's link, to dial again once `due`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Redial {
    /// The first socket of that link: its route.
    pub route: u8,
    /// Attempts made for this link since it last carried pieces.
    pub attempt: u32,
    due: Instant,
}

pub(crate) struct Failover {
    /// A socket with bytes out whose link acknowledged none for this long is dead.
    pub dead_after: Duration,
    next_check: Instant,
    /// Per slot: the socket whose route it takes, and the attempt that opened it (0: a first).
    route_of: Vec<(u8, u32)>,
    pending: Vec<Redial>,
    /// Re-dialed slots still joining, and when they are abandoned.
    joining: Vec<(usize, Instant)>,
    /// Requests acknowledged when last looked, and since when that count stands (or a piece was
    /// last sent again to ask for an acknowledgement).
    acked: (u64, Instant),
    /// Pieces sent again to ask for the acknowledgement of that count.
    asked: u32,
    /// The comm can open no socket any more: nothing is dialed again.
    stopped: bool,
}

impl Failover {
    /// For a comm of `count` sockets and `slots` slots in all.
    pub fn new(count: usize, slots: usize, dead_after: Duration, now: Instant) -> Failover {
        let route_of = (0..slots).map(|k| ((k.min(count.saturating_sub(1))) as u8, 0)).collect();
        Failover {
            dead_after,
            next_check: now,
            route_of,
            pending: Vec::new(),
            joining: Vec::new(),
            acked: (0, now),
            asked: 0,
            stopped: false,
        }
    }

    /// Whether to check the links now: a few times per bound.
    pub fn check_due(&mut self, now: Instant) -> bool {
        if now < self.next_check {
            return false;
        }
        self.next_check = now + self.dead_after / 4;
        true
    }

    /// Whether to ask for an acknowledgement again: the count stood at `upto` for two bounds while
    /// every byte out reached the peer (`delivered`), then for twice as long after each ask for
    /// that count: a receiver that is slow to post lost nothing, and gets few duplicate pieces.
    /// A count that moved starts over at two bounds.
    pub fn acks_overdue(&mut self, upto: u64, delivered: bool, now: Instant) -> bool {
        if upto != self.acked.0 {
            self.asked = 0;
        }
        if upto != self.acked.0 || !delivered {
            self.acked = (upto, now);
            return false;
        }
        if now < self.acked.1 + self.dead_after * (2 << self.asked.min(MAX_DOUBLINGS)) {
            return false;
        }
        self.acked.1 = now;
        self.asked = self.asked.saturating_add(1);
        true
    }

    /// Slot `k` died (or did not join): its link is dialed again after a back-off. Returns the
    /// link and attempt of a re-dialed slot that was still joining: that attempt failed.
    pub fn dead(&mut self, k: usize, now: Instant) -> Option<(u8, u32)> {
        let failed = self.take_joining(k);
        let (route, attempt) = self.route_of[k];
        if self.stopped || self.pending.iter().any(|r| r.route == route) {
            return failed;
        }
        let backoff = self.dead_after * (1 << attempt.min(MAX_DOUBLINGS));
        self.pending.push(Redial { route, attempt: attempt + 1, due: now + backoff });
        failed
    }

    /// Slot `k` no longer joins; its link and attempt if it was.
    fn take_joining(&mut self, k: usize) -> Option<(u8, u32)> {
        let i = self.joining.iter().position(|&(j, _)| j == k)?;
        self.joining.swap_remove(i);
        Some(self.route_of[k])
    }

    /// The comm can open no socket any more (no spare slot, or nothing to dial with): re-dials
    /// pending are dropped and dead sockets schedule none. Returns the re-dials dropped, `None`
    /// when stopped already.
    pub fn stop_redials(&mut self) -> Option<usize> {
        if std::mem::replace(&mut self.stopped, true) {
            return None;
        }
        let dropped = self.pending.len();
        self.pending.clear();
        Some(dropped)
    }

    /// Re-dials waiting for their time.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A re-dial due now, taken.
    pub fn due(&mut self, now: Instant) -> Option<Redial> {
        let i = self.pending.iter().position(|r| r.due <= now)?;
        Some(self.pending.swap_remove(i))
    }

    /// Slot `k` was opened for `redial`.
    pub fn started(&mut self, k: usize, redial: Redial, now: Instant) {
        self.route_of[k] = (redial.route, redial.attempt);
        self.joining.push((k, now + self.dead_after * JOIN_BOUNDS));
    }

    /// Slot `k` joined: its link works again, and a later failure starts the back-off anew.
    /// Returns its link and the attempt that opened it.
    pub fn joined(&mut self, k: usize) -> Option<(u8, u32)> {
        let joined = self.take_joining(k);
        self.route_of[k].1 = 0;
        joined
    }

    /// Re-dialed slots still joining, each with whether it is past its time at `now`.
    pub fn joining(&self, now: Instant) -> impl Iterator<Item = (usize, bool)> + '_ {
        self.joining.iter().map(move |&(k, by)| (k, now >= by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acknowledgement_is_asked_for_again_with_a_doubling_back_off() {
        let t0 = Instant::now();
        let bound = Duration::from_millis(100);
        let mut f = Failover::new(2, 10, bound, t0);
        assert!(!f.acks_overdue(3, true, t0));
        assert!(!f.acks_overdue(3, true, t0 + bound), "one bound is not overdue");
        assert!(!f.acks_overdue(3, false, t0 + bound * 3), "bytes still on their way");
        assert!(!f.acks_overdue(3, true, t0 + bound * 4), "two bounds from when they arrived");
        assert!(f.acks_overdue(3, true, t0 + bound * 5));
        assert!(!f.acks_overdue(3, true, t0 + bound * 8), "asking again waits twice as long");
        assert!(f.acks_overdue(3, true, t0 + bound * 9));
        assert!(!f.acks_overdue(3, true, t0 + bound * 16));
        assert!(f.acks_overdue(3, true, t0 + bound * 17), "then four times");
        // Bytes on their way start the wait anew, without undoing the back-off.
        assert!(!f.acks_overdue(3, false, t0 + bound * 18));
        assert!(!f.acks_overdue(3, true, t0 + bound * 33));
        assert!(f.acks_overdue(3, true, t0 + bound * 34), "then eight times");
        // The back-off stops doubling at 32 bounds.
        let mut at = t0 + bound * 34;
        for _ in 0..3 {
            assert!(!f.acks_overdue(3, true, at + bound * 31));
            at += bound * 32;
            assert!(f.acks_overdue(3, true, at));
        }
        assert!(!f.acks_overdue(4, true, at + bound), "an acknowledgement came");
        assert!(!f.acks_overdue(4, true, at + bound * 2), "a new count waits two bounds");
        assert!(f.acks_overdue(4, true, at + bound * 3), "only two: the back-off starts over");
    }

    #[test]
    fn a_dead_link_is_dialed_again_with_a_doubling_back_off() {
        let t0 = Instant::now();
        let bound = Duration::from_millis(100);
        let mut f = Failover::new(4, 12, bound, t0);
        assert!(f.check_due(t0));
        assert!(!f.check_due(t0 + bound / 8), "a few checks per bound");
        assert!(f.check_due(t0 + bound / 4));
        f.dead(2, t0);
        f.dead(2, t0);
        assert_eq!(f.due(t0 + bound / 2), None, "not before the bound");
        let r = f.due(t0 + bound).expect("due after the bound");
        assert_eq!((r.route, r.attempt), (2, 1));
        assert_eq!(f.due(t0 + bound), None, "one re-dial per dead link");
        // Slot 4 tries link 2 and fails: the next attempt waits twice as long, then four times.
        f.started(4, r, t0 + bound);
        assert_eq!(f.joining(t0 + bound).collect::<Vec<_>>(), vec![(4, false)]);
        let late = t0 + bound + bound * JOIN_BOUNDS;
        assert_eq!(f.joining(late).collect::<Vec<_>>(), vec![(4, true)], "past its time to join");
        assert_eq!(f.dead(4, t0 + bound), Some((2, 1)), "the attempt that failed");
        assert_eq!(f.due(t0 + bound * 2), None);
        let r = f.due(t0 + bound * 3).expect("after twice the bound");
        assert_eq!((r.route, r.attempt), (2, 2));
        f.started(5, r, t0);
        f.dead(5, t0);
        assert!(f.due(t0 + bound * 3).is_none() && f.due(t0 + bound * 4).is_some());
        // The back-off stops doubling.
        f.started(6, Redial { route: 2, attempt: 9, due: t0 }, t0);
        f.dead(6, t0);
        assert!(f.due(t0 + bound * 15).is_none() && f.due(t0 + bound * 16).is_some());
        // A slot that joined starts over.
        f.started(7, Redial { route: 1, attempt: 3, due: t0 }, t0);
        assert_eq!(f.joined(7), Some((1, 3)), "the attempt that joined");
        assert_eq!(f.joining(t0).count(), 0);
        assert_eq!(f.dead(7, t0), None, "a socket that carried pieces: no attempt failed");
        let r = f.due(t0 + bound).expect("after one bound again");
        assert_eq!((r.route, r.attempt), (1, 1));
    }

    #[test]
    fn stopped_re_dials_are_dropped_and_none_is_scheduled_after() {
        let t0 = Instant::now();
        let bound = Duration::from_millis(100);
        let mut f = Failover::new(4, 12, bound, t0);
        f.dead(1, t0);
        f.dead(2, t0);
        assert_eq!(f.stop_redials(), Some(2), "both pending re-dials dropped");
        assert_eq!(f.stop_redials(), None, "said once");
        assert_eq!(f.due(t0 + bound * 100), None);
        f.dead(3, t0);
        assert_eq!((f.pending(), f.due(t0 + bound * 100)), (0, None), "a later death schedules nothing");
    }
}
