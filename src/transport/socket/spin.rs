//! When socket helpers poll for more work after their last piece, and how many of the process's
//! may at once.
//!
//! A helper that just sent or received a piece polls its sockets for `SOCKET_SPIN_US` before it
//! sleeps, so that the next piece finds it awake: a kick to a sleeping helper is an eventfd write on
//! the posting thread (about 2 us each, one per socket a request rides) and a wake-up on the
//! helper's side. But every polling helper holds a core: two engines of 16 + 16 helpers polling for
//! 400 us on a 32-core host made a 1 MiB round trip five times slower (the threads with work waited
//! for cores), while 256 KiB ones got faster. So polling is a turn the process hands out: at most
//! `limit` helpers poll at once, the rest sleep at once. The first `SHORT_SPIN` of a poll needs no
//! turn.
//!
//! And a helper polls only after a piece of a small request (`max_request`): a transfer of a few
//! hundred KiB is over in tens of microseconds, where a wake-up is a fair part of it, while the
//! pieces of a larger one keep their helpers busy and a poll after them holds cores that those
//! helpers need (on a 16-core host, polling after every piece took 8-34 % off the GB/s of 1-64 MiB
//! transfers).
//!
//! A poll that finds nothing yields its core (`reactor::serve`): once every core polls, a thread
//! woken onto one (the caller, the thread writing the target's Done) otherwise waits out that
//! helper's poll, and every transfer with it; polling after 256 KiB requests without the yield
//! took 256 KiB-1 MiB transfers to a third of their speed on the 16-core host.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How a net's socket helpers poll before they sleep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Polls {
    /// After their last work (`UCCL_TCPX_SOCKET_SPIN_US`).
    pub spin: Duration,
    /// While one of their sockets holds a piece whose receive is not posted yet
    /// (`UCCL_TCPX_SOCKET_HELD_SPIN_US`): its post is close behind, and a kick to a sleeping helper
    /// costs the poster a system call and the piece a wake-up.
    pub held: Duration,
    /// Helpers of the process that may poll at once past `SHORT_SPIN` (`SpinTurn`).
    pub spinners: usize,
    /// Polling after work follows only pieces of requests of at most this many bytes
    /// (`UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST`).
    pub max_request: u64,
}

impl Polls {
    /// Whether a helper quiet for `quiet` since its last work, whose last piece belonged to a
    /// request of `last_request` bytes, polls for more (turns aside).
    pub fn after_work(&self, quiet: Duration, last_request: u64) -> bool {
        quiet < self.spin && last_request <= self.max_request
    }
}

/// What a pool's helpers did each time they ran out of work: counted, so that a test sees a helper
/// poll or sleep by the event itself, not by the CPU time it took (which a loaded host bends). On
/// a cache line of its own: polling helpers bump it on every poll.
#[derive(Default)]
#[repr(align(128))]
pub(super) struct WaitCounts {
    after_work: AtomicU64,
    holding: AtomicU64,
    slept_holding: AtomicU64,
}

/// A snapshot of [`WaitCounts`], summed over a net's helpers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HelperWaits {
    /// Waits that polled after a piece of a small request (`UCCL_TCPX_SOCKET_SPIN_US`).
    pub polled_after_work: u64,
    /// Waits that polled only for the post of a piece a socket holds
    /// (`UCCL_TCPX_SOCKET_HELD_SPIN_US`).
    pub polled_holding: u64,
    /// Waits that slept while a socket held such a piece.
    pub slept_holding: u64,
}

impl WaitCounts {
    /// A helper with nothing queued waits: polling (`polled`) or asleep; it wanted to poll after
    /// work (`after_work`) or for a held piece's post (`for_post`), and `holding` pieces.
    pub fn waited(&self, polled: bool, after_work: bool, for_post: bool, holding: bool) {
        let count = match (polled, after_work, for_post) {
            (true, true, _) => &self.after_work,
            (true, false, true) => &self.holding,
            (false, ..) if holding => &self.slept_holding,
            _ => return,
        };
        count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HelperWaits {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HelperWaits {
            polled_after_work: get(&self.after_work),
            polled_holding: get(&self.holding),
            slept_holding: get(&self.slept_holding),
        }
    }
}

impl std::ops::Add for HelperWaits {
    type Output = HelperWaits;
    fn add(self, o: HelperWaits) -> HelperWaits {
        HelperWaits {
            polled_after_work: self.polled_after_work + o.polled_after_work,
            polled_holding: self.polled_holding + o.polled_holding,
            slept_holding: self.slept_holding + o.slept_holding,
        }
    }
}

/// The poll any helper may do after work without a turn.
pub(super) const SHORT_SPIN: Duration = Duration::from_micros(20);

/// Helpers of the process polling now, whatever their net.
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// One helper's hold on a polling turn of a count (the process's, `POLLING`, outside tests);
/// released when it stops polling or goes.
pub(super) struct SpinTurn {
    count: &'static AtomicUsize,
    held: bool,
}

impl Default for SpinTurn {
    fn default() -> SpinTurn {
        SpinTurn { count: &POLLING, held: false }
    }
}

impl SpinTurn {
    /// Whether this helper may poll now: it holds a turn already, or takes one while fewer than
    /// `limit` are held.
    pub fn take(&mut self, limit: usize) -> bool {
        if !self.held {
            self.held =
                self.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_ok();
        }
        self.held
    }

    /// Gives the turn back (if held): the helper stops polling.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for SpinTurn {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::{Polls, SpinTurn};

    /// A helper polls within the spin after pieces of requests up to the bound, never past the
    /// spin, and not at all after a piece of a larger request.
    #[test]
    fn helpers_poll_only_after_pieces_of_small_requests() {
        let us = Duration::from_micros;
        let polls = Polls { spin: us(20), held: Duration::ZERO, spinners: 4, max_request: 256 << 10 };
        assert!(polls.after_work(us(5), 0), "after an empty request");
        assert!(!polls.after_work(us(5), u64::MAX), "a helper that finished no piece yet does not poll");
        assert!(polls.after_work(us(5), 256 << 10));
        assert!(!polls.after_work(us(5), (256 << 10) + 1));
        assert!(!polls.after_work(us(20), 64 << 10), "past the spin");
        let off = Polls { spin: Duration::ZERO, ..polls };
        assert!(!off.after_work(Duration::ZERO, 0), "no spin, no poll");
    }

    /// With the default bound a helper polls after the pieces of the requests a flow of up to 1
    /// MiB is spread into (256-512 KiB per channel), whose next transfer comes within a poll, but
    /// not after those of a whole chunk (1-2 MiB), whose helpers stay busy.
    #[test]
    fn the_default_bound_polls_after_spread_chunks_only() {
        let us = Duration::from_micros;
        let d = crate::config::SocketConfig::default();
        let polls =
            Polls { spin: us(20), held: Duration::ZERO, spinners: 4, max_request: u64::from(d.spin_max_request) };
        for small in [64 << 10, 128 << 10, 256 << 10, 512 << 10] {
            assert!(polls.after_work(us(5), small), "{small}");
        }
        assert!(!polls.after_work(us(5), 1 << 20), "a whole chunk's pieces are followed by a poll");
        assert!(!polls.after_work(us(20), 128 << 10), "the poll ends");
    }

    fn turn(count: &'static AtomicUsize) -> SpinTurn {
        SpinTurn { count, held: false }
    }

    /// Beyond the limit a helper is refused until a turn is given back; a holder keeps its turn
    /// whatever the count; a dropped holder gives its turn back.
    #[test]
    fn at_most_the_limit_of_helpers_poll_at_once() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let (mut a, mut b, mut c) = (turn(&COUNT), turn(&COUNT), turn(&COUNT));
        assert!(a.take(2) && b.take(2));
        assert!(!c.take(2), "a third helper polls beside two with a limit of two");
        assert!(a.take(2), "a holder keeps its turn");
        assert_eq!(COUNT.load(Ordering::Acquire), 2);
        a.release();
        a.release();
        assert_eq!(COUNT.load(Ordering::Acquire), 1, "a turn is given back once");
        assert!(c.take(2));
        drop(b);
        drop(c);
        assert_eq!(COUNT.load(Ordering::Acquire), 0);
    }
}
