//! uccl-tcpx: moves host and GPU buffers between processes over GPUDirect-TCPX or plain TCP, behind
//! a C ABI that mirrors UCCL's `uccl_engine.h`.
//!
//! Layers, each calling only downwards: [`ffi`] (the C ABI) -> [`engine`] -> [`proto`] (the wire),
//! [`transport`] (ncclNet-shaped comms).

pub mod config;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod proto;
pub mod threads;
pub mod transport;

pub use config::Config;
pub use engine::{Connection, Engine};
pub use error::{Error, Result, UcclStatus};

/// Sets up logging from `UCCL_TCPX_LOG` (else `RUST_LOG`); quiet (errors only) by default. Safe to
/// call repeatedly and alongside another logger in the process.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter =
            std::env::var("UCCL_TCPX_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| "error".into());
        let _ = env_logger::Builder::new().parse_filters(&filter).try_init();
    });
}
