//! What this process spends, for tests that hold a library to a fixed cost: the CPU time and
//! voluntary context switches of all its threads over an idle span (an idle connection should cost
//! neither), and its open descriptors.

use std::time::Duration;

/// CPU time (user and system, every thread) and voluntary context switches, as `getrusage` counts them.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu: Duration,
    pub switches: i64,
}

/// What this process used so far.
pub fn usage() -> Usage {
    // SAFETY: an all-zero rusage is valid, and getrusage writes only into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is writable for the call.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Usage { cpu: tv(ru.ru_utime) + tv(ru.ru_stime), switches: ru.ru_nvcsw }
}

/// What this process used while the calling thread slept for `span`, measured after `settle` so
/// that work started just before (a thread finishing its last wake-up) is not counted. The
/// caller's own sleep is one voluntary switch.
pub fn idle(settle: Duration, span: Duration) -> Usage {
    std::thread::sleep(settle);
    let before = usage();
    std::thread::sleep(span);
    let after = usage();
    Usage { cpu: after.cpu - before.cpu, switches: after.switches - before.switches }
}

/// How many descriptors this process has open (the listing's own included).
pub fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinning_shows_as_cpu_time() {
        let before = usage().cpu;
        let deadline = std::time::Instant::now() + crate::PATIENCE;
        let mut spins = 0u64;
        while usage().cpu < before + Duration::from_millis(20) {
            assert!(std::time::Instant::now() < deadline, "{spins} spins never added 20 ms of CPU time");
            spins = std::hint::black_box(spins + 1);
        }
    }

    /// Other tests of this binary open and close files meanwhile, a few at a time: the count is
    /// checked within that much.
    #[test]
    fn opened_descriptors_are_counted() {
        // Other tests of this process open and close descriptors meanwhile (pipes to children): a
        // count they disturbed is taken again, and only a count off every time fails.
        let mut counts = Vec::new();
        for _ in 0..20 {
            let open = descriptors();
            let files: Vec<_> = (0..100).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
            let with = descriptors();
            drop(files);
            let after = descriptors();
            if (95..=105).contains(&(with as isize - open as isize)) && after < with - 90 {
                return;
            }
            counts.push((open, with, after));
        }
        panic!("100 files opened then closed, counts (before, with, after): {counts:?}");
    }

    #[test]
    fn an_idle_span_counts_the_sleep_as_a_switch() {
        let spent = idle(Duration::ZERO, Duration::from_millis(20));
        assert!(spent.switches >= 1, "{spent:?}");
    }
}
