//! Listen comms and accept. Like TCPX, accept is asynchronous (the first call only starts it and
//! returns no comm), takes TCPX's setup time (`setup.rs`) and is allowed once per listen comm; the
//! receive comm comes with its device handle written into the caller's `ncclNetDeviceHandle_v7_t`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use uccl_tcpx::ncclnet::{NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NcclNetDeviceHandleV7};
use uccl_tcpx::transport::{ListenComm, RecvComm};

use crate::config::Mode;
use crate::fail::{Fail, Result};
use crate::gpu::{self, GpuContext};
use crate::health::closed;
use crate::memory::{HostRx, RxMemory};
use crate::plugin::Plugin;
use crate::recv::FakeRecv;

pub struct FakeListen {
    inner: Box<dyn ListenComm>,
    started: Option<Instant>,
    /// The peer's connection, held until the setup time has passed.
    arrived: Option<(Box<dyn RecvComm>, Instant)>,
    accepted: bool,
    /// Distinguishes the pool shuffles of comms accepted in one process.
    seed: u64,
}

impl FakeListen {
    pub fn new(inner: Box<dyn ListenComm>, seed: u64) -> FakeListen {
        FakeListen { inner, started: None, arrived: None, accepted: false, seed }
    }

    /// `Some(receive comm)` once a connection arrived, with `*dev_handle` filled; the caller
    /// registers the comm.
    pub fn accept(
        &mut self,
        plugin: &Plugin,
        dev_handle: *mut NcclNetDeviceHandleV7,
    ) -> Result<Option<Arc<Mutex<FakeRecv>>>> {
        if self.accepted {
            return Err(Fail::internal("accept called again: one accept per listen comm (TCPX reuses freed state)"));
        }
        let now = Instant::now();
        let Some(started) = self.started else {
            self.started = Some(now);
            return Ok(None);
        };
        if self.arrived.is_none() {
            let Some(inner) = self.inner.accept().map_err(closed)? else { return Ok(None) };
            self.arrived = Some((inner, plugin.cfg.setup.accept_ready(started, now)));
        }
        match self.arrived.take() {
            Some((inner, ready)) if now >= ready => self.finish(plugin, inner, dev_handle),
            waiting => {
                self.arrived = waiting;
                Ok(None)
            }
        }
    }

    fn finish(
        &mut self,
        plugin: &Plugin,
        inner: Box<dyn RecvComm>,
        dev_handle: *mut NcclNetDeviceHandleV7,
    ) -> Result<Option<Arc<Mutex<FakeRecv>>>> {
        let (mem, gpu): (Box<dyn RxMemory>, _) = match plugin.cfg.mode {
            Mode::Host => (Box::new(HostRx::new(plugin.cfg.pool_bytes)?), None),
            Mode::Gpu => (gpu::rx_memory(plugin.cfg.pool_bytes, plugin.cfg.gpu_copy)?, Some(GpuContext::acquire()?)),
        };
        let comm = FakeRecv::new(inner, mem, gpu, &plugin.cfg, self.seed);
        // The handle lives in the comm's pool memory, which stays put when the comm moves.
        let unpack = comm.unpack_handle();
        // SAFETY: the caller checked dev_handle non-NULL; it points at caller-allocated storage.
        unsafe {
            dev_handle.write(NcclNetDeviceHandleV7 {
                net_device_type: NCCL_NET_DEVICE_UNPACK,
                net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
                handle: unpack,
                size: size_of::<uccl_tcpx::ncclnet::UnpackDeviceHandle>(),
                needs_proxy_progress: 1,
            })
        };
        self.accepted = true;
        Ok(Some(Arc::new(Mutex::new(comm))))
    }
}
