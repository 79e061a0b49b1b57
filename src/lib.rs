//! uccl-tcpx: moves host and GPU buffers between processes over GPUDirect-TCPX or plain TCP, behind
//! a C ABI that mirrors UCCL's `uccl_engine.h`.
//!
//! Layers, each importing only from those below it (docs/ARCHITECTURE.md; `tests/module_graph.rs`
//! checks): [`ffi`] (the C ABI) -> [`engine`] -> [`transport`] (ncclNet-shaped comms) -> [`cuda`]
//! -> [`ncclnet`] (the plugin ABI) -> [`trace`] (what the opt-in traces share) -> [`sys`] (epoll, workers,
//! interfaces, TCP settings, randomness) -> [`threads`] ->
//! [`config`] -> [`error`] -> [`proto`] (the wire) -> [`host_memory`] (this process's pages).

// The C header (include/uccl_engine.h) is cbindgen's reading of `ffi` and of the two types its
// functions take from below: `error`'s status enum and `proto`'s FifoItem (whose other items are
// crate-private). `cbindgen:ignore` keeps every other module out, so nothing public there
// (constants, the plugin ABI's types, the C logger shim's entry points) leaks into C.

/// cbindgen:ignore
pub mod config;
/// cbindgen:ignore
pub mod cuda;
/// cbindgen:ignore
pub mod engine;
pub mod error;
pub mod ffi;
/// cbindgen:ignore
pub mod host_memory;
/// cbindgen:ignore
pub mod ncclnet;
pub mod proto;
/// cbindgen:ignore
pub mod sys;
/// cbindgen:ignore
pub mod threads;
/// cbindgen:ignore
pub mod trace;
/// cbindgen:ignore
pub mod transport;

pub use config::{Config, init_logging};
pub use engine::{Connection, Engine};
pub use error::{Error, Result, UcclStatus};
