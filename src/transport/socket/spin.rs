//! How many socket helpers of the process may poll for more work at once after their last piece.
//!
//! A helper that just sent or received a piece polls its sockets for `SOCKET_SPIN_US` before it
//! sleeps, so that the next piece finds it awake: a kick to a sleeping helper is an eventfd write on
//! the posting thread (about 2 us each, one per socket a request rides) and a wake-up on the
//! helper's side. But every polling helper holds a core: two engines of 16 + 16 helpers polling for
//! 400 us on a 32-core host made a 1 MiB round trip five times slower (the threads with work waited
//! for cores), while 256 KiB ones got faster. So polling is a turn the process hands out: at most
//! `limit` helpers poll at once, the rest sleep at once. The first `SHORT_SPIN` of a poll needs no
//! turn: every helper polled that long before turns existed, which large transfers run best with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How a net's socket helpers poll before they sleep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Polls {
    /// After their last work (`UCCL_TCPX_SOCKET_SPIN_US`).
    pub after_work: Duration,
    /// While one of their sockets holds a piece whose receive is not posted yet
    /// (`UCCL_TCPX_SOCKET_HELD_SPIN_US`): its post is close behind, and a kick to a sleeping helper
    /// costs the poster a system call and the piece a wake-up.
    pub held: Duration,
    /// Helpers of the process that may poll at once past `SHORT_SPIN` (`SpinTurn`).
    pub spinners: usize,
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

    use super::SpinTurn;

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
