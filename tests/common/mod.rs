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

use std::time::Duration;

pub use engine::{Pair, TRANSFER_LIMIT, accept, loopback, pair, same_host, wait, wait_done};
pub use testkit::child::{ChildTest, is_child};
pub use testkit::{PATIENCE, Rng, assert_same, drive, eventually, fill, pattern, wait_until, within};

/// Threads the library started in this process (all are named `uccl-*`). Counting only those keeps
/// the test harness's own threads, which come and go with other tests, out of the figure.
pub fn threads() -> usize {
    testkit::threads::count_named("uccl")
}

/// Waits until the thread count is back to `baseline`, failing after `limit`.
pub fn threads_settle(baseline: usize, limit: Duration) {
    if testkit::poll::poll(limit, || (threads() <= baseline).then_some(())).is_none() {
        let names = testkit::threads::names();
        panic!("{} threads, {baseline} expected after {limit:?}: threads leaked: {names:?}", threads());
    }
}
