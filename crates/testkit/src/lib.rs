//! What the workspace's integration tests share, so that each way of waiting, spawning a child test
//! process, lowering a test thread's capabilities, drawing random numbers, measuring what the
//! process spends, mapping memory at a huge-page boundary, making test hosts in network namespaces
//! or deciding to skip a GPU test is written once. Nothing here knows the engine: the tests' own
//! `common` modules build engine pairs and comms on top.

pub mod caps;
pub mod child;
pub mod cost;
pub mod data;
pub mod gpu;
pub mod mapping;
pub mod netns;
pub mod poll;
pub mod rng;
pub mod threads;

pub use data::{assert_same, fill, pattern};
pub use gpu::{skip_without, skip_without_gpu};
pub use poll::{PATIENCE, drive, eventually, wait_until, within};
pub use rng::Rng;
