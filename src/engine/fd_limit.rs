//! The process's descriptors. Every connection holds a control socket and, per channel and
//! direction, its data sockets; with the usual soft limit of 1024 an agent with a few dozen peers
//! runs out. The engine raises the soft limit to the hard limit once per process, as servers
//! commonly do: the hard limit is the administrator's bound, the soft one only a default.
//!
//! It also grows the descriptor table ahead of use. The kernel grows the table when a descriptor
//! past its end is opened, and in a process with several threads it waits for an RCU grace period
//! first (`expand_fdtable`), while any other thread opening a descriptor waits for it too. A GPU
//! process holds many descriptors of the driver's, so the data sockets and helper threads a comm
//! adds at its first large transfer crossed the table's end there: 11-15 ms of stalls inside the
//! first staged 16 MiB write on 2 x H200. Grown when an engine or a connection is made, the table
//! stays grown (the kernel never shrinks it).

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors the table reaches past those in use when a connection is made: its data sockets
/// (up to 8 channels x 16 sockets x 2 directions), the helpers' epoll sets and eventfds, listeners.
const HEADROOM: usize = 1024;
/// The smallest table an engine's process keeps.
const MIN_TABLE: usize = 4096;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, once per process. A refusal is logged and
/// otherwise ignored: the engine still works up to the old limit, and a socket refused for it
/// reports the limit (see `Error::io`).
pub fn raise_once() {
    static RAISED: Once = Once::new();
    RAISED.call_once(|| {
        let Some((soft, hard)) = crate::error::open_file_limit() else { return };
        if soft >= hard {
            return;
        }
        let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::info!("open-file limit raised from {soft} to the hard limit {hard}");
        } else {
            log::warn!("cannot raise the open-file limit from {soft} to {hard}: {}", std::io::Error::last_os_error());
        }
    });
}

/// Descriptors the table was grown to hold, by this module.
static COVERED: AtomicUsize = AtomicUsize::new(0);

/// How many descriptors the table should hold, given the lowest free one (about the count in use),
/// what it was grown to before and the soft limit: `None` while it holds enough. It doubles at
/// least, so that a process making many connections grows it a few times only.
fn wanted(lowest_free: usize, covered: usize, limit: usize) -> Option<usize> {
    let want = (lowest_free + HEADROOM).max(MIN_TABLE).min(limit);
    (want > covered).then(|| want.max(covered.saturating_mul(2)).min(limit))
}

/// Grows the descriptor table to hold [`HEADROOM`] descriptors past those in use (at least
/// [`MIN_TABLE`], at most the soft limit), unless it holds them already. Called when an engine or a
/// connection is made; a failure only leaves the growth to the kernel.
pub fn keep_table_ahead() {
    // SAFETY: plain syscalls on descriptors opened here and closed before returning.
    unsafe {
        // The lowest free descriptor, which an eventfd takes.
        let probe = libc::eventfd(0, libc::EFD_CLOEXEC);
        if probe < 0 {
            return;
        }
        let limit = crate::error::open_file_limit().map_or(0, |(soft, _)| soft.min(i32::MAX as libc::rlim_t) as usize);
        if let Some(n) = wanted(probe as usize, COVERED.load(Ordering::Relaxed), limit) {
            // The lowest free descriptor at or above n - 1: the table then holds n.
            let far = libc::fcntl(probe, libc::F_DUPFD_CLOEXEC, (n - 1) as libc::c_int);
            if far >= 0 {
                libc::close(far);
                COVERED.fetch_max(n, Ordering::Relaxed);
            } else {
                log::debug!("cannot grow the descriptor table to {n}: {}", std::io::Error::last_os_error());
            }
        }
        libc::close(probe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        super::raise_once();
        let (soft, hard) = crate::error::open_file_limit().expect("getrlimit");
        assert_eq!(soft, hard);
    }

    #[test]
    fn the_table_grows_ahead_of_the_descriptors_in_use() {
        raise_once();
        keep_table_ahead();
        let (soft, _) = crate::error::open_file_limit().unwrap();
        let floor = MIN_TABLE.min(soft as usize);
        assert!(
            testkit::cost::descriptor_table() >= floor,
            "FDSize {} below {floor}",
            testkit::cost::descriptor_table()
        );
    }

    #[test]
    fn the_table_doubles_within_the_limit_and_only_when_short() {
        assert_eq!(wanted(10, 0, 1 << 20), Some(MIN_TABLE), "a fresh process");
        assert_eq!(wanted(10, MIN_TABLE, 1 << 20), None, "enough already");
        assert_eq!(wanted(MIN_TABLE - HEADROOM + 1, MIN_TABLE, 1 << 20), Some(2 * MIN_TABLE), "doubles");
        assert_eq!(wanted(20_000, MIN_TABLE, 1 << 20), Some(20_000 + HEADROOM), "past double");
        assert_eq!(wanted(10, 0, 1024), Some(1024), "the soft limit bounds it");
        assert_eq!(wanted(900, 1024, 1024), None, "nothing past the limit");
    }
}
