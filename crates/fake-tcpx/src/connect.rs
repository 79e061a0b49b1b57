//! Asynchronous connect: the first call starts a connecting thread and stores its state in the
//! caller's handle, where the plugin being stood in for keeps its own (TCPX: bytes 80..88; TCPXO:
//! the stage at 88..104, `handle.rs`); later calls with the same handle bytes poll it. A handle
//! whose state is unknown (reused after a completed TCPX connect, or corrupted) is an error, where
//! TCPX would read freed memory. The thread first spends the setup time (`setup.rs`).

use std::sync::{Arc, Mutex};

use uccl_tcpx::internal::transport::{Net, NetHandle, SendComm};

use crate::fail::{Fail, Result};
use crate::gpu::GpuContext;
use crate::handle;
use crate::health::closed;
use crate::plugin::Plugin;

pub struct Connecting {
    outcome: Mutex<Option<Result<Box<dyn SendComm>>>>,
    /// GPU mode: the GPU current at the first connect call, which the send comm is bound to.
    gpu: Mutex<Option<GpuContext>>,
}

impl Connecting {
    /// Starts connecting from device `dev` to the listener of handle `h`.
    pub fn start(
        plugin: &'static Plugin,
        dev: usize,
        h: NetHandle,
        gpu: Option<GpuContext>,
    ) -> Result<Arc<Connecting>> {
        let kind = plugin.cfg.kind;
        handle::check(kind, &h)?;
        let setup = plugin.cfg.setup.connect_time(handle::data_sockets(kind, &h));
        let mut h = handle::transport(kind, &h);
        let c = Arc::new(Connecting { outcome: Mutex::new(None), gpu: Mutex::new(gpu) });
        let thread_c = c.clone();
        std::thread::Builder::new()
            .name("fake-tcpx-connect".into())
            .spawn(move || {
                std::thread::sleep(setup);
                // Each fake device has one socket transport, whose only device is 0.
                let outcome = match plugin.net(dev).connect(0, &mut h) {
                    Ok(Some(comm)) => Ok(comm),
                    Ok(None) => Err(Fail::internal("socket transport connect did not complete")),
                    Err(e) => Err(closed(e)),
                };
                *thread_c.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
            })
            .map_err(|e| Fail::system(format!("cannot start a connect thread: {e}")))?;
        Ok(c)
    }

    /// The connect's outcome once it finished.
    pub fn poll(&self) -> Option<Result<Box<dyn SendComm>>> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The GPU the send comm is bound to (GPU mode), once.
    pub fn take_gpu(&self) -> Option<GpuContext> {
        self.gpu.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
