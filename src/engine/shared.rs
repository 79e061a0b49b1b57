//! What connections share with the engine: configuration, transport, the region and transfer
//! tables, the progress thread's waker, the GPU the engine serves. Never the connection list itself,
//! so that the engine, its connections and the progress thread that drives them do not import each
//! other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

use parking_lot::RwLock;

use super::mapping;
use super::region::{self, RegionTable};
use super::served_gpu::ServedGpu;
use super::transfer::TransferTable;
use crate::config::Config;
use crate::cuda::{self, Location};
use crate::error::{Error, Result, UcclStatus};
use crate::proto::AuthKey;
use crate::transport::{MemKind, Net};

pub(crate) struct EngineCore {
    pub(super) config: Config,
    pub(super) net: Arc<dyn Net>,
    pub(super) regions: RegionTable,
    pub(super) transfers: TransferTable,
    pub(super) waker: Arc<Waker>,
    pub(super) next_conn: AtomicU64,
    /// The GPU this engine serves (see `served_gpu` for how it is chosen).
    pub(super) gpu: ServedGpu,
    /// The key peers must prove, read by every handshake as it starts.
    pub(super) auth: RwLock<Option<Arc<AuthKey>>>,
}

impl EngineCore {
    pub(super) fn auth_key(&self) -> Option<Arc<AuthKey>> {
        self.auth.read().clone()
    }

    pub(super) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// What `[addr, addr + len)` is, refusing memory this engine's transport cannot move.
    pub(super) fn memory_kind(&self, addr: usize, len: usize) -> Result<MemKind> {
        region::check_range(addr, len)?;
        match cuda::locate(addr, len)? {
            Location::Host => {
                mapping::check_host_range(addr, len)?;
                Ok(MemKind::Host)
            }
            Location::Device { ordinal } => {
                if !self.net.properties(0)?.supports_cuda {
                    return Err(Error::new(
                        UcclStatus::ErrNotSupported,
                        format!("the {} transport cannot move GPU memory", self.net.name()),
                    ));
                }
                self.gpu.serve(ordinal, &*self.net)?;
                Ok(MemKind::Cuda { device: ordinal })
            }
        }
    }
}

/// Unparks the progress thread: for posts, and for transports' completions (their `Wake`).
#[derive(Default)]
pub struct Waker {
    pub(super) thread: OnceLock<Thread>,
}

impl Waker {
    pub fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}
