//! How a post wakes a send comm's sleeping helpers: waking one costs the waker an eventfd write and
//! the woken thread's start, and a posting thread that woke sixteen in a row held the last piece
//! back by sixteen of those. With a fan-out `F`, the poster kicks every idle socket whose helper is
//! awake (no system call) and at most `F` whose helpers sleep, and owes the other kicks to the
//! comm; every socket of the comm that runs then passes up to `F` of them on before it sends, so
//! the sleepers are woken in a cascade, each level `F` times wider than the one before.
//!
//! Owed kicks are one bit per socket (a comm has at most 64): owing one is a `fetch_or`, passing
//! some on a compare-and-swap, and neither allocates. They only speed the request up: busy sockets
//! pull every piece left anyway, and the poster always kicks at least one socket itself when any
//! is idle, so no piece waits for a kick that never comes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, Weak};

use super::reactor::{Helper, Placement, Task};
use crate::config::MAX_SOCKETS_PER_COMM;

/// An idle socket a post would kick.
#[derive(Clone, Copy, Debug)]
pub(super) struct Idle {
    pub k: usize,
    /// Names the socket's helper: sockets sharing one are told apart from those that do not.
    pub helper: usize,
    /// The helper sleeps in `epoll_wait`: a kick must wake it.
    pub sleeps: bool,
}

/// Splits a post's kicks into those the poster makes now and those it owes, as socket masks:
/// every awake helper's socket and the first `fanout` sleeping helpers' are kicked now (also a
/// sleeper on a helper already woken now: that kick costs nothing more), the others owed. A
/// fan-out of 0 kicks every one now.
pub(super) fn split(idle: impl IntoIterator<Item = Idle>, fanout: usize) -> (u64, u64) {
    let (mut now, mut owed) = (0u64, 0u64);
    let mut woken = [0usize; MAX_SOCKETS_PER_COMM];
    let mut n_woken = 0;
    for s in idle {
        let bit = 1u64 << s.k;
        if fanout == 0 || !s.sleeps || woken[..n_woken].contains(&s.helper) {
            now |= bit;
        } else if n_woken < fanout {
            woken[n_woken] = s.helper;
            n_woken += 1;
            now |= bit;
        } else {
            owed |= bit;
        }
    }
    (now, owed)
}

/// The sockets of `mask`, lowest first.
pub(super) fn sockets(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let k = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(k)
    })
}

/// What socket `me` takes out of the owed mask `owed` when it runs: its own kick (it runs
/// already) and up to `fanout` others, lowest first.
fn pick(owed: u64, me: usize, fanout: usize) -> u64 {
    let mine = owed & (1u64 << me);
    let mut rest = owed & !mine;
    let mut taken = mine;
    for _ in 0..fanout {
        if rest == 0 {
            break;
        }
        let low = rest & rest.wrapping_neg();
        taken |= low;
        rest &= !low;
    }
    taken
}

/// Where a socket's kick goes. Weak: the comm's state must not keep a helper alive, which may hold
/// that state in turn (a socket's task in its inbox).
struct Kicker<T: Task> {
    helper: Weak<Helper<T>>,
    token: usize,
}

/// A send comm's owed kicks and where each socket's goes.
pub(super) struct Relay<T: Task> {
    fanout: usize,
    owed: AtomicU64,
    kickers: Vec<OnceLock<Kicker<T>>>,
    /// Kicks owed and settled (passed on, or dropped by the socket they named, which ran): the
    /// tests tell by them that no owed kick was lost.
    #[cfg(test)]
    pub counted: (AtomicU64, AtomicU64),
}

impl<T: Task> Relay<T> {
    /// For a comm of `sockets` sockets, passing `fanout` kicks on per run (0: none are ever owed).
    pub fn new(sockets: usize, fanout: usize) -> Relay<T> {
        assert!(sockets <= MAX_SOCKETS_PER_COMM, "a comm has at most {MAX_SOCKETS_PER_COMM} sockets");
        Relay {
            fanout,
            owed: AtomicU64::new(0),
            kickers: (0..sockets).map(|_| OnceLock::new()).collect(),
            #[cfg(test)]
            counted: Default::default(),
        }
    }

    pub fn fanout(&self) -> usize {
        self.fanout
    }

    /// Socket `k` lives at `p`; before any kick is owed to it.
    pub fn place(&self, k: usize, p: &Placement<T>) {
        let _ = self.kickers[k].set(Kicker { helper: p.weak(), token: p.token });
    }

    /// Owes the kicks of `mask`, before the poster kicks anyone itself: whichever socket its kicks
    /// run then finds them. SeqCst: published before those kicks' inbox posts.
    pub fn owe(&self, mask: u64) {
        let _before = self.owed.fetch_or(mask, Ordering::SeqCst);
        #[cfg(test)]
        self.counted.0.fetch_add((mask & !_before).count_ones() as u64, Ordering::Relaxed);
    }

    /// For socket `me`, as it runs: passes up to `fanout` owed kicks on (and drops its own).
    pub fn pass_on(&self, me: usize) {
        let mut owed = self.owed.load(Ordering::Relaxed);
        let taken = loop {
            if owed == 0 {
                return;
            }
            let taken = pick(owed, me, self.fanout);
            match self.owed.compare_exchange_weak(owed, owed & !taken, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break taken,
                Err(now) => owed = now,
            }
        };
        #[cfg(test)]
        self.counted.1.fetch_add(taken.count_ones() as u64, Ordering::Relaxed);
        for k in sockets(taken & !(1u64 << me)) {
            let Some(kicker) = self.kickers.get(k).and_then(OnceLock::get) else { continue };
            // A helper gone is one whose comms failed: nobody needs the kick any more.
            if let Some(helper) = kicker.helper.upgrade() {
                helper.kick(kicker.token);
            }
        }
    }

    /// Kicks socket `k` itself (placed, or nothing happens).
    pub fn kick(&self, k: usize) {
        if let Some(helper) = self.kickers.get(k).and_then(OnceLock::get).and_then(|c| c.helper.upgrade()) {
            helper.kick(self.kickers[k].get().expect("just read").token);
        }
    }

    /// The comm closes or failed: nobody is to run for it any more.
    pub fn forgive(&self) {
        let _dropped = self.owed.swap(0, Ordering::AcqRel);
        #[cfg(test)]
        self.counted.1.fetch_add(_dropped.count_ones() as u64, Ordering::Relaxed);
    }

    /// Kicks owed now.
    #[cfg(test)]
    pub fn owed(&self) -> u64 {
        self.owed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::RawFd;
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::pure::window::Window;
    use super::super::reactor::{Next, Sockets};
    use super::*;
    use crate::sys::worker::{Inbox, Worker};
    use crate::threads::ThreadKind;

    fn idle(list: &[(usize, usize, bool)]) -> Vec<Idle> {
        list.iter().map(|&(k, helper, sleeps)| Idle { k, helper, sleeps }).collect()
    }

    fn mask(ks: &[usize]) -> u64 {
        ks.iter().fold(0, |m, k| m | 1 << k)
    }

    #[test]
    fn the_poster_kicks_the_awake_and_a_few_sleepers_and_owes_the_rest() {
        // Sockets 0-7 on helpers 10-17; 1, 4 and 6 are awake.
        let list = idle(&[
            (0, 10, true),
            (1, 11, false),
            (2, 12, true),
            (3, 13, true),
            (4, 14, false),
            (5, 15, true),
            (6, 16, false),
            (7, 17, true),
        ]);
        assert_eq!(split(list.clone(), 2), (mask(&[0, 1, 2, 4, 6]), mask(&[3, 5, 7])));
        assert_eq!(split(list.clone(), 1), (mask(&[0, 1, 4, 6]), mask(&[2, 3, 5, 7])));
        assert_eq!(split(list.clone(), 0), (mask(&[0, 1, 2, 3, 4, 5, 6, 7]), 0), "no fan-out: every kick now");
        assert_eq!(split(list.clone(), 8), (mask(&[0, 1, 2, 3, 4, 5, 6, 7]), 0), "few enough sleepers");
        // Every helper awake: nothing is owed whatever the fan-out.
        let awake = idle(&[(0, 1, false), (5, 2, false), (63, 3, false)]);
        assert_eq!(split(awake, 1), (mask(&[0, 5, 63]), 0));
        // A sleeper on a helper woken now is kicked now too; one on a helper not woken is owed.
        let shared = idle(&[(0, 7, true), (1, 8, true), (2, 7, true), (3, 9, true), (4, 8, true)]);
        assert_eq!(split(shared, 1), (mask(&[0, 2]), mask(&[1, 3, 4])));
        assert_eq!(split(Vec::new(), 4), (0, 0));
    }

    #[test]
    fn a_running_socket_takes_its_own_kick_and_at_most_the_fanout() {
        let owed = mask(&[1, 2, 5, 9, 40]);
        assert_eq!(pick(owed, 5, 2), mask(&[1, 2, 5]), "its own and the two lowest others");
        assert_eq!(pick(owed, 3, 2), mask(&[1, 2]), "not owed itself");
        assert_eq!(pick(owed, 9, 0), mask(&[9]));
        assert_eq!(pick(owed, 0, 64), owed);
        assert_eq!(sockets(mask(&[0, 7, 63])).collect::<Vec<_>>(), [0, 7, 63]);
    }

    /// A task there is none of: the relay only needs helpers' inboxes.
    enum Nothing {}

    impl Task for Nothing {
        fn fd(&self) -> RawFd {
            match *self {}
        }
        fn interest(&self) -> u32 {
            match *self {}
        }
        fn run(&mut self) -> Next {
            match *self {}
        }
        fn window(&self) -> &Arc<Window> {
            match *self {}
        }
    }

    fn kicked(helper: &Worker<Sockets<Nothing>>) -> Vec<usize> {
        let mut inbox = Inbox::default();
        helper.take_inbox(&mut inbox);
        inbox.kicks
    }

    #[test]
    fn owed_kicks_reach_their_helpers_a_few_per_run_until_none_is_left() {
        let helpers: Vec<Arc<Helper<Nothing>>> =
            (0..6).map(|_| Arc::new(Worker::new(ThreadKind::SocketSender, Duration::ZERO).unwrap())).collect();
        let relay = Relay::<Nothing>::new(6, 2);
        for (k, h) in helpers.iter().enumerate() {
            relay.place(k, &Placement { helper: h.clone(), token: 100 + k });
        }
        relay.owe(mask(&[1, 2, 3, 4, 5]));
        relay.pass_on(2);
        assert_eq!(relay.owed(), mask(&[4, 5]), "socket 2 dropped its own kick and passed 1 and 3 on");
        let got: Vec<Vec<usize>> = helpers.iter().map(|h| kicked(h)).collect();
        assert_eq!(got, [vec![], vec![101], vec![], vec![103], vec![], vec![]]);
        relay.pass_on(0);
        assert_eq!(relay.owed(), 0);
        assert_eq!(kicked(&helpers[4]), [104]);
        assert_eq!(kicked(&helpers[5]), [105]);
        relay.pass_on(1);
        assert!(helpers.iter().all(|h| !h.posted()), "nothing owed, nothing kicked");
        let (owed, settled) = (&relay.counted.0, &relay.counted.1);
        assert_eq!((owed.load(Ordering::Relaxed), settled.load(Ordering::Relaxed)), (5, 5));

        // Owing a kick that is owed already counts it once; a closing comm drops what is left.
        relay.owe(mask(&[3]));
        relay.owe(mask(&[3, 4]));
        relay.forgive();
        assert_eq!(relay.owed(), 0);
        assert_eq!((owed.load(Ordering::Relaxed), settled.load(Ordering::Relaxed)), (7, 7));
        assert!(helpers.iter().all(|h| !h.posted()), "a forgiven kick is never sent");

        // A helper gone takes its kicks with it.
        let gone = helpers[1].clone();
        drop(helpers);
        drop(gone);
        relay.owe(mask(&[1]));
        relay.pass_on(0);
        assert_eq!(relay.owed(), 0);
    }

    /// What the poster reads: a helper waiting in `epoll_wait` says it sleeps, and a kick wakes it.
    #[test]
    fn a_helper_waiting_for_work_reads_as_asleep_until_kicked() {
        let helper: Arc<Helper<Nothing>> = Arc::new(Worker::new(ThreadKind::SocketSender, Duration::ZERO).unwrap());
        let p = Placement { helper: helper.clone(), token: 3 };
        assert!(!p.sleeps(), "a helper that never waited is not asleep");
        let waiter = {
            let helper = helper.clone();
            std::thread::spawn(move || {
                let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 4];
                // `None`: the kick came as it was about to sleep.
                while let Some(woken) = helper.wait(&mut events, false).unwrap() {
                    if woken.posted {
                        return;
                    }
                }
            })
        };
        testkit::wait_until("the helper sleeps", testkit::PATIENCE, || p.sleeps());
        p.kick();
        waiter.join().unwrap();
        assert!(!p.sleeps());
        assert_eq!(kicked(&helper), [3]);
    }
}
