//! What the opt-in traces share (`UCCL_TCPX_TRACE_STAGING`, `_DEVICE_COPY`, `_HOST_COPY`, `_FLOW`): one
//! way to summarize a step's times (median, min and max), and one exit hook that prints every
//! trace's report to stderr.

use std::fmt;
use std::sync::Once;

use parking_lot::Mutex;

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host, so traces of the two
/// ends of a loopback transfer line up.
pub fn clock_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The median, min and max of a set of times, in ns; shown in microseconds as `p50 (min-max)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    pub median: u64,
    pub min: u64,
    pub max: u64,
}

impl Spread {
    /// The spread of `times` (ns); `None` when there are none. The median of an even count is the
    /// upper of the middle two.
    pub fn of(times: impl IntoIterator<Item = u64>) -> Option<Spread> {
        let mut v: Vec<u64> = times.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(Spread { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] })
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |ns: u64| ns as f64 / 1000.0;
        write!(f, "{:.1} ({:.1}-{:.1})", us(self.median), us(self.min), us(self.max))
    }
}

/// Reports printed at exit, in the order they were registered.
static REPORTS: Mutex<Vec<fn() -> String>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

/// Prints `report()` to stderr when the process exits (once per function, however often it is
/// registered). A report must not block: a thread of the library may still hold its lock at exit
/// (take it with a timeout and give up).
pub fn report_at_exit(report: fn() -> String) {
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain function; it runs once at process exit.
        unsafe { libc::atexit(print_at_exit) };
    });
    let mut reports = REPORTS.lock();
    if !reports.iter().any(|r| std::ptr::fn_addr_eq(*r, report)) {
        reports.push(report);
    }
}

extern "C" fn print_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Some(reports) = REPORTS.try_lock_for(std::time::Duration::from_millis(200)) else { return };
        for report in reports.iter() {
            eprint!("{}", report());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_median_min_and_max_in_microseconds() {
        assert_eq!(Spread::of([]), None);
        let s = Spread::of([30_000, 10_000, 20_000, 45_500]).unwrap();
        assert_eq!(s, Spread { median: 30_000, min: 10_000, max: 45_500 });
        assert_eq!(s.to_string(), "30.0 (10.0-45.5)");
        assert_eq!(Spread::of([7]).unwrap().to_string(), "0.0 (0.0-0.0)");
    }

    fn one() -> String {
        "one\n".into()
    }

    #[test]
    fn a_report_is_registered_once() {
        report_at_exit(one);
        report_at_exit(one);
        let count = REPORTS.lock().iter().filter(|r| std::ptr::fn_addr_eq(**r, one as fn() -> String)).count();
        assert_eq!(count, 1);
    }
}
