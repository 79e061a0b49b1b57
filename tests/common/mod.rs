//! Helpers shared by the integration tests. Each test binary uses a subset.
#![allow(dead_code)]

pub mod socket;

use std::time::{Duration, Instant};

use uccl_tcpx::Connection;

/// Polls `id` until it finished; fails the test if it is still in progress after `limit`.
pub fn wait_done(conn: &Connection, id: u64, limit: Duration) -> uccl_tcpx::Result<u64> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(n) = conn.poll(id)? {
            return Ok(n);
        }
        assert!(Instant::now() < deadline, "transfer {id} still in progress after {limit:?}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Deterministic bytes that differ per position and per seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(0x9e37_79b9).wrapping_add(seed) >> 3) as u8).collect()
}

/// xorshift64: reproducible randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Threads the library started in this process (all are named `uccl-*`). Counting only those keeps
/// the test harness's own threads, which come and go with other tests, out of the figure.
pub fn threads() -> usize {
    thread_names().iter().filter(|n| n.starts_with("uccl")).count()
}

/// Waits until the thread count is back to `baseline`, failing after `limit`.
pub fn threads_settle(baseline: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = threads();
        if now <= baseline {
            return;
        }
        assert!(Instant::now() < deadline, "{now} threads, {baseline} expected: threads leaked: {:?}", thread_names());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names of this process's threads, for failure messages.
pub fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
            names.push(name.trim().to_owned());
        }
    }
    names
}
