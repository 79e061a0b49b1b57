//! GPU memory over a transport that moves host memory only: a decorator around any [`Net`] whose
//! properties lack CUDA support. A chunk of a device region is copied into a pinned host slot
//! (`cuMemcpyDtoHAsync` on the comm's stream) and sent from there once the copy's event fired; a
//! receive into a device region lands in a slot and is copied up (`cuMemcpyHtoDAsync`), and is
//! reported done only when that copy finished. Host memory passes straight through. The engine's
//! channel logic sees the same comms and rules as without staging.
//!
//! A comm stages through a ring of `window` slots of `chunk size` bytes, with its copy stream(s) and
//! one event per slot, which it holds only while it has requests outstanding: it takes one from the
//! net's pool (`pool.rs`, made ahead as comms are made, within a bound) and gives it back once idle
//! (a chunk of
//! many small device segments is gathered or scattered by a kernel through a device bounce buffer,
//! `cuda::segments`, readied with the ring). Several slots
//! are in flight at once, so copies overlap the network. A send comm keeps only `ahead` copies
//! queued (default 1): the copy engine drains one stream before the next, so without the limit the
//! last channel waited for every other channel's whole share before its first chunk landed. Nothing
//! signals a finished copy, so the net asks the progress thread to keep polling while any copy is
//! in flight (`needs_polling`): a driver callback per copy that woke it instead ran up to 1.5 ms
//! late under load.

mod pool;
mod recv;
mod regions;
mod send;
mod setup;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Caps, ListenComm, Net, NetHandle, Properties, RecvComm, SendComm};
use crate::error::{Error, Result};

pub use pool::{RingCounts, ring_counts};
pub use recv::StagedRecvComm;
pub use send::StagedSendComm;
use setup::Setup;
pub use setup::StagingParams;

/// The ring every staged comm allocates on first use of device memory.
pub struct StagedNet {
    inner: Arc<dyn Net>,
    /// The inner transport's: staging changes nothing on the wire, so a staged engine and an
    /// unstaged one still agree on the transport in their handshake; a vectored device request is
    /// gathered into (or scattered from) its one slot.
    caps: Caps,
    setup: Setup,
}

impl StagedNet {
    /// `inner` itself when it moves GPU memory already; otherwise `inner` behind staging.
    pub fn wrap(inner: Arc<dyn Net>, params: StagingParams) -> Result<Arc<dyn Net>> {
        params.validate()?;
        let props = inner.properties(0)?;
        if props.supports_cuda {
            return Ok(inner);
        }
        if !props.supports_host {
            return Err(Error::invalid(format!("transport {:?} moves neither host nor GPU memory", inner.caps().name)));
        }
        let setup = Setup::new(params, props.max_requests.max(1));
        Ok(Arc::new(StagedNet { caps: inner.caps().clone(), inner, setup }))
    }
}

impl Net for StagedNet {
    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn devices(&self) -> usize {
        self.inner.devices()
    }

    fn properties(&self, dev: usize) -> Result<Properties> {
        let mut props = self.inner.properties(dev)?;
        props.supports_cuda = true;
        Ok(props)
    }

    /// Nothing tells the progress thread a copy finished: it polls while any is in flight.
    fn needs_polling(&self) -> bool {
        self.inner.needs_polling() || self.polls_device_copies()
    }

    fn polls_device_copies(&self) -> bool {
        self.setup.copies_in_flight.load(Ordering::Relaxed) > 0
    }

    /// Frees the pool's idle rings past its bound that are due; when the next one is.
    fn trim_staging(&self) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        let mut pool = self.setup.pool.lock();
        let freed = pool.trim(now);
        let next = pool.next_trim(now);
        drop(pool);
        pool::count(&pool::COUNTS.freed, freed.len());
        next
    }

    fn channel_device(&self, channel: usize) -> usize {
        self.inner.channel_device(channel)
    }

    fn set_gpu(&self, gpu: &Arc<crate::cuda::Gpu>) {
        let _ = self.setup.gpu.set(gpu.clone());
        self.inner.set_gpu(gpu)
    }

    fn handle_address(&self, handle: &NetHandle) -> Option<std::net::IpAddr> {
        self.inner.handle_address(handle)
    }

    fn set_handle_address(&self, handle: &mut NetHandle, ip: std::net::IpAddr) -> Result<()> {
        self.inner.set_handle_address(handle, ip)
    }

    fn listen(&self, dev: usize) -> Result<(NetHandle, Box<dyn ListenComm>)> {
        let (handle, inner) = self.inner.listen(dev)?;
        Ok((handle, Box::new(StagedListen { inner, setup: self.setup.clone() })))
    }

    fn connect(&self, dev: usize, handle: &mut NetHandle) -> Result<Option<Box<dyn SendComm>>> {
        Ok(self
            .inner
            .connect(dev, handle)?
            .map(|comm| Box::new(StagedSendComm::new(comm, self.setup.clone())) as Box<dyn SendComm>))
    }
}

struct StagedListen {
    inner: Box<dyn ListenComm>,
    setup: Setup,
}

impl ListenComm for StagedListen {
    fn accept(&mut self) -> Result<Option<Box<dyn RecvComm>>> {
        Ok(self
            .inner
            .accept()?
            .map(|comm| Box::new(StagedRecvComm::new(comm, self.setup.clone())) as Box<dyn RecvComm>))
    }
}

#[cfg(test)]
mod tests;
