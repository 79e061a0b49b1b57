//! What this process's threads do and hold, for tests that hold a library to a fixed cost: how
//! often its threads woke (an idle connection should wake none), its open descriptors and its
//! descriptor table. Counts the kernel keeps, not CPU time: a loaded host changes the time a
//! thread gets, not how often it goes to sleep.

/// Voluntary context switches so far of this process's threads whose name starts with `prefix`:
/// every time one went to sleep (a blocking call, a timed wait), which is every time it woke and
/// then slept again. Threads that exited meanwhile drop out of the sum.
pub fn wakeups(prefix: &str) -> u64 {
    let mut sum = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let named = std::fs::read_to_string(task.path().join("comm")).is_ok_and(|n| n.starts_with(prefix));
        let status =
            if named { std::fs::read_to_string(task.path().join("status")).unwrap_or_default() } else { String::new() };
        let switches = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"));
        sum += switches.and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    sum
}

/// How many descriptors this process has open (the listing's own included).
pub fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

/// This process's resident memory now (`VmRSS`, KiB).
pub fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS in /proc/self/status");
    rss.trim().trim_end_matches("kB").trim().parse().expect("VmRSS is a number")
}

/// How many descriptors this process's table holds now (`FDSize`). The kernel grows it, never
/// shrinks it: a test that reads it before and after some work learns whether the work grew it.
pub fn descriptor_table() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let size = status.lines().find_map(|l| l.strip_prefix("FDSize:")).expect("FDSize in /proc/self/status");
    size.trim().parse().expect("FDSize is a number")
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Each sleep of a named thread counts once, and no thread of another name counts.
    #[test]
    fn a_thread_that_sleeps_counts_its_wakeups() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("cost-sleeper".into())
            .spawn(move || {
                for _ in 0..5 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                go_rx.recv().unwrap();
            })
            .unwrap();
        crate::wait_until("five sleeps counted", crate::PATIENCE, || wakeups("cost-sleeper") >= 5);
        assert_eq!(wakeups("no-such-thread"), 0);
        go_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
