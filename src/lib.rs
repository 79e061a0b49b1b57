//! uccl-tcpx: moves host and GPU buffers between processes over GPUDirect-TCPX or plain TCP, behind
//! a C ABI that mirrors UCCL's `uccl_engine.h`.
//!
//! The Rust API is what this page lists: an [`Engine`] hands out [`Connection`]s, both configured by
//! a [`Config`], failing with an [`Error`] that carries a [`UcclStatus`], and the plain types their
//! calls take and return. [`ffi`] is the C ABI (`include/uccl_engine.h` is cbindgen's reading of it).
//!
//! Layers, each importing only from those below it (docs/ARCHITECTURE.md; `tests/module_graph.rs`
//! checks): `ffi` (the C ABI) -> `engine` -> `transport` (ncclNet-shaped comms) -> `cuda`
//! -> `ncclnet` (the plugin ABI) -> `sys` (epoll, workers, interfaces, TCP settings, randomness) ->
//! `threads` -> `config` -> `trace` (the opt-in trace: its events and their file) -> `error` ->
//! `proto` (the wire) -> `host_memory` (this process's pages). All but `ffi`
//! are private to the crate; the workspace's own benchmarks, fake NIC, test kit, fuzz targets and
//! tests reach them through the hidden module `internal`, which is no part of the API.

// The C header (include/uccl_engine.h) is cbindgen's reading of `ffi` and of the two types its
// functions take from below: `error`'s status enum and `proto`'s FifoItem (whose other items are
// crate-private). `cbindgen:ignore` keeps every other module out, so nothing public there
// (constants, the plugin ABI's types, the C logger shim's entry points) leaks into C.

/// cbindgen:ignore
pub(crate) mod config;
/// cbindgen:ignore
pub(crate) mod cuda;
/// cbindgen:ignore
pub(crate) mod engine;
pub(crate) mod error;
pub mod ffi;
/// cbindgen:ignore
pub(crate) mod host_memory;
/// cbindgen:ignore
pub(crate) mod ncclnet;
pub(crate) mod proto;
/// cbindgen:ignore
pub(crate) mod sys;
/// cbindgen:ignore
pub(crate) mod threads;
/// cbindgen:ignore
pub(crate) mod trace;
/// cbindgen:ignore
pub(crate) mod transport;

pub use config::{
    ChannelTransport, Cidr, Config, LocalPeers, SocketConfig, StagingConfig, StagingGather, TransportChoice,
    init_logging,
};
pub use engine::locality::Locality;
pub use engine::notify::{Notification, drain as drain_notifications};
pub use engine::stats::{ConnStats, LinkTotals, LinkWay, Moved};
pub use engine::{Connection, Engine, HostPath, OneSided, PeerInfo, Piece, PieceRun};
pub use error::{Error, Result, UcclStatus};
pub use proto::{AuthKey, FifoItem, IpcInfo};
pub use trace::Setting as TraceSetting;

/// cbindgen:ignore
///
/// Not an API: no stability promise, no semver. The crate's modules as they are, for the
/// workspace's own benchmarks (`crates/bench`), fake NIC (`crates/fake-tcpx`), test kit
/// (`crates/testkit`), fuzz targets and tests, which reach below the Rust API. Code outside this
/// repository uses the crate root's items and the C ABI instead.
///
/// Each module here re-exports the items its namesake makes `pub`, under the same paths:
/// `crate::cuda::ring::SegmentCopyCounts` is `uccl_tcpx::internal::cuda::ring::SegmentCopyCounts`.
#[doc(hidden)]
pub mod internal {
    pub mod config {
        pub use crate::config::*;
    }
    pub mod cuda {
        pub use crate::cuda::*;
    }
    pub mod engine {
        pub use crate::engine::*;
    }
    pub mod error {
        pub use crate::error::*;
    }
    pub mod host_memory {
        pub use crate::host_memory::*;
    }
    pub mod ncclnet {
        pub use crate::ncclnet::*;
    }
    pub mod proto {
        pub use crate::proto::*;
    }
    pub mod sys {
        pub use crate::sys::*;
    }
    pub mod threads {
        pub use crate::threads::*;
    }
    pub mod trace {
        pub use crate::trace::*;
    }
    pub mod transport {
        pub use crate::transport::*;
    }
}
