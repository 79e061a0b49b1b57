//! uccl-tcpx: moves host and GPU buffers between processes over GPUDirect-TCPX or plain TCP, behind
//! a C ABI that mirrors UCCL's `uccl_engine.h`.
//!
//! Layers, each importing only from those below it (docs/ARCHITECTURE.md; `tests/module_graph.rs`
//! checks): [`ffi`] (the C ABI) -> [`engine`] -> [`transport`] (ncclNet-shaped comms) -> [`cuda`]
//! -> [`ncclnet`] (the plugin ABI) -> [`threads`] -> [`config`] -> [`error`] -> [`proto`] (the wire).

pub mod config;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod ncclnet;
pub mod proto;
pub mod threads;
pub mod transport;

pub use config::{Config, init_logging};
pub use engine::{Connection, Engine};
pub use error::{Error, Result, UcclStatus};
