//! The integration tests' one harness: engine pairs (`engine`), transport comms (`comm`, `socket`), GPU
//! buffers and the GPU skip rule (`gpu`), the fake NIC plugin (`plugin`), and, from `testkit`
//! (shared with the fake NIC's tests), bounded waits, child test processes, seeded randomness and
//! test data. Each test binary uses a subset.
#![allow(dead_code, unused_imports)]

pub mod comm;
pub mod engine;
pub mod gpu;
pub mod plugin;
pub mod socket;
pub mod trace;

use std::time::Duration;

pub use engine::{Pair, TRANSFER_LIMIT, accept, loopback, pair, same_host, wait, wait_done};
pub use testkit::child::{ChildTest, is_child};
pub use testkit::{PATIENCE, Rng, assert_same, drive, eventually, fill, pattern, wait_until, within};

/// Threads the library started in this process (all are named `uccl-*`). Counting only those keeps
/// the test harness's own threads, which come and go with other tests, out of the figure.
pub fn threads() -> usize {
    testkit::threads::count_named("uccl")
}

/// The socket transport's helper threads (senders and receivers) running in this process.
pub fn socket_helpers() -> usize {
    testkit::threads::count_named("uccl-sock-tx") + testkit::threads::count_named("uccl-sock-rx")
}

/// How often the library's threads woke (and slept again) over `idle`, counted by the kernel
/// once every one of them sleeps: a loaded host may delay a thread's last work, but adds no wake-up.
pub fn library_wakeups_while_idle(idle: Duration) -> u64 {
    let asleep = || {
        let names = testkit::threads::named("uccl");
        names.iter().all(|&tid| testkit::threads::state(tid).is_none_or(|s| s != 'R'))
    };
    wait_until("every library thread sleeps", PATIENCE, asleep);
    let before = testkit::cost::wakeups("uccl");
    std::thread::sleep(idle);
    testkit::cost::wakeups("uccl").saturating_sub(before)
}

/// Waits until the thread count is back to `baseline`, failing after `limit`.
pub fn threads_settle(baseline: usize, limit: Duration) {
    if testkit::poll::poll(limit, || (threads() <= baseline).then_some(())).is_none() {
        let names = testkit::threads::names();
        panic!("{} threads, {baseline} expected after {limit:?}: threads leaked: {names:?}", threads());
    }
}

/// TCP sockets this process has listening (LISTEN state, IPv4 and IPv6): the inodes behind its
/// descriptors looked up in the kernel's socket tables.
pub fn listening_sockets() -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...; state 0A is LISTEN.
            let listening = fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]);
            // Keyed by inode: a read racing with sockets of other tests can list an entry twice.
            listening.then(|| fields[9].to_owned())
        })
        .collect::<std::collections::HashSet<String>>()
        .len()
}
