//! Listen comms and accept. Like TCPX's and TCPXO's, accept is asynchronous (the first call only
//! starts it and returns no comm), takes the setup time (`setup.rs`) and is allowed once per listen
//! comm; the receive comm comes with its device handle written into the caller's
//! `ncclNetDeviceHandle_v7_t`: TCPX's unpack queue, or TCPXO's HOST handle.
//!
//! GPU mode: TCPX binds the listen comm to the GPU current at listen and steers the accepted flows
//! into that GPU's pool (`connect.cc`: the accept thread's `args->gpu = lComm->gpu`), but makes the
//! receive comm at the first accept call, bound to the GPU current then (`common.cc`
//! `tcpxCommNew`), whose pool the device handle hands out (`devcomm/nccl/unpack1.cu`
//! `gpu_get_rxmem`). Two different GPUs there would give every receive the other GPU's pages; the
//! fake refuses the accept instead.

use std::time::Instant;

use uccl_tcpx::internal::ncclnet::{
    NCCL_NET_DEVICE_HOST, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NcclNetDeviceHandleV7,
};
use uccl_tcpx::internal::transport::{ListenComm, RecvComm};

use crate::fail::{Fail, Result};
use crate::gpu::{self, GpuContext};
use crate::health::closed;
use crate::land::Landing;
use crate::linear::LinearRecv;
use crate::memory::{self, HostRx, RxMemory};
use crate::plugin::Plugin;
use crate::pool::{self, PoolKey};
use crate::profile::Kind;
use crate::recv::FakeRecv;
use crate::topology::Devmem;

/// The receive comm an accept made: TCPX's, or TCPXO's; the caller registers it.
pub enum Accepted {
    Recv(Box<FakeRecv>),
    Linear(Box<LinearRecv>),
}

pub struct FakeListen {
    inner: Box<dyn ListenComm>,
    started: Option<Instant>,
    /// The peer's connection, held until the setup time has passed.
    arrived: Option<(Box<dyn RecvComm>, Instant)>,
    accepted: bool,
    /// The device listened on, whose devmem queues the accepted flows arrive through.
    dev: usize,
    /// Distinguishes the page shuffles of comms accepted in one process.
    seed: u64,
    /// GPU mode: the GPU current at listen, where the accepted flows are steered.
    gpu: Option<GpuContext>,
}

impl FakeListen {
    pub fn new(inner: Box<dyn ListenComm>, dev: usize, seed: u64, gpu: Option<GpuContext>) -> FakeListen {
        FakeListen { inner, started: None, arrived: None, accepted: false, dev, seed, gpu }
    }

    /// `Some(receive comm)` once a connection arrived, with `*dev_handle` filled (TCPXO: where it
    /// is not NULL); the caller registers the comm.
    pub fn accept(&mut self, plugin: &Plugin, dev_handle: *mut NcclNetDeviceHandleV7) -> Result<Option<Accepted>> {
        if self.accepted {
            return Err(Fail::internal(match plugin.cfg.kind {
                Kind::Tcpx => "accept called again: one accept per listen comm (TCPX reuses freed state)",
                // TCPXO's own message, which names Connect (fo/nccl_shim.cc Accept L505-509).
                Kind::Tcpxo => {
                    "NcclShim::Connect should not be called in state 3 (fo/nccl_shim.cc Accept L505-509): TCPXO \
                     accepts one connection per listen comm, then its stage is done"
                }
            }));
        }
        let now = Instant::now();
        let Some(started) = self.started else {
            self.check_accept_gpu(plugin)?;
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

    /// The first accept call binds the receive comm to the current GPU, which must be the one its
    /// flows are steered to.
    fn check_accept_gpu(&self, plugin: &Plugin) -> Result<()> {
        let (Some(listen), Some(now)) = (&self.gpu, plugin.bind_gpu("accept")?) else { return Ok(()) };
        if listen.ordinal() == now.ordinal() {
            return Ok(());
        }
        let (l, a) = (listen.ordinal(), now.ordinal());
        if plugin.cfg.kind == Kind::Tcpxo {
            return Err(Fail::internal(format!(
                "accept with GPU {a} current on a listen comm made with GPU {l} current: TCPXO makes the receive \
                 comm for the listen comm's GPU {l} (fo/nccl_shim.cc Accept L429) through the per-GPU state of the \
                 current GPU {a} (fo/fastrak_plugin.cc GetShim L104), whose NIC's buffer manager then registers its \
                 buffers. Keep the same GPU current from listen through accept"
            )));
        }
        Err(Fail::internal(format!(
            "accept with GPU {a} current on a listen comm made with GPU {l} current: TCPX steers the accepted \
             flows into GPU {l}'s bounce pool (connect.cc, the listen comm's GPU) but binds the receive comm to \
             GPU {a} (common.cc tcpxCommNew) and hands out GPU {a}'s pool in its device handle \
             (devcomm/nccl/unpack1.cu gpu_get_rxmem), so every receive would describe pages of the wrong GPU. \
             Keep the same GPU current from listen through accept"
        )))
    }

    /// Why the accepted flows never reach GPU memory, if they do not: RxDM installs a flow's rule on
    /// the NIC of the comm's GPU (`tcpgpudmarxd` `src/rx_rule_manager.cc` `ConfigFlowSteering`), so
    /// flows that arrive over a device without devmem queues, or over one whose queues serve other
    /// GPUs, land in host memory.
    fn unsteered(&self, plugin: &Plugin) -> Result<Option<String>> {
        let nic = plugin.nic(self.dev);
        let bus_id = self.gpu.as_ref().map(GpuContext::bus_id).transpose()?;
        if nic.devmem.serves(bus_id.as_deref()) {
            return Ok(None);
        }
        let (name, dev) = (&nic.name, self.dev);
        Ok(Some(match &nic.devmem {
            Devmem::Gpus(served) => format!(
                "device {dev} ({name}) has its devmem rx queues bound to the pools of GPUs {served:?}, not to GPU \
                 {} at {}, and RxDM steers a GPU's flows on that GPU's own NIC (tcpgpudmarxd rx_rule_manager.cc \
                 ConfigFlowSteering); use a NIC next to the GPU",
                self.gpu.as_ref().map_or(-1, GpuContext::ordinal),
                bus_id.as_deref().unwrap_or("?")
            ),
            _ => format!(
                "device {dev} ({name}) has no devmem rx queues, so nothing steers its flows into GPU memory \
                 (like A3's eth0, which TCPX lists when NCCL_GPUDIRECTTCPX_SOCKET_IFNAME is unset)"
            ),
        }))
    }

    fn finish(
        &mut self,
        plugin: &Plugin,
        inner: Box<dyn RecvComm>,
        dev_handle: *mut NcclNetDeviceHandleV7,
    ) -> Result<Option<Accepted>> {
        if plugin.cfg.kind == Kind::Tcpxo {
            return self.finish_linear(plugin, inner, dev_handle);
        }
        let cfg = &plugin.cfg;
        let (bytes, seed) = (cfg.pool_bytes, cfg.seed);
        let (mem, gpu, pool): (Box<dyn RxMemory>, _, _) = match &self.gpu {
            None => {
                let pool = pool::of(PoolKey::Host, bytes, seed, || memory::host_pool(bytes))?;
                (Box::new(HostRx::new(pool.clone())?), None, pool)
            }
            Some(g) => {
                let pool = pool::of(PoolKey::Gpu(g.ordinal()), bytes, seed, || gpu::device_pool(g, bytes))?;
                (gpu::rx_memory(g.retain()?, pool.clone(), cfg.gpu_copy)?, Some(g.retain()?), pool)
            }
        };
        let unsteered = self.unsteered(plugin)?;
        let comm = FakeRecv::new(inner, mem, gpu, pool, unsteered, cfg, self.seed);
        // The handle lives in the comm's pool memory, which stays put when the comm moves.
        let unpack = comm.unpack_handle();
        // SAFETY: the caller checked dev_handle non-NULL; it points at caller-allocated storage.
        unsafe {
            dev_handle.write(NcclNetDeviceHandleV7 {
                net_device_type: NCCL_NET_DEVICE_UNPACK,
                net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
                handle: unpack,
                size: size_of::<uccl_tcpx::internal::ncclnet::UnpackDeviceHandle>(),
                needs_proxy_progress: 1,
            })
        };
        self.accepted = true;
        Ok(Some(Accepted::Recv(Box::new(comm))))
    }

    /// TCPXO's receive comm: bytes land in the posted buffers, and the device handle, where the
    /// caller passes one, is HOST (`fo/nccl_shim.cc` `createRecvDevComm` L240-254;
    /// `fo/fastrak_plugin.cc` `Accept` L183 writes it only when `*recvDevComm` is not NULL).
    fn finish_linear(
        &mut self,
        plugin: &Plugin,
        inner: Box<dyn RecvComm>,
        dev_handle: *mut NcclNetDeviceHandleV7,
    ) -> Result<Option<Accepted>> {
        let landing = match &self.gpu {
            None => Landing::host(),
            Some(g) => Landing::gpu(g.retain()?)?,
        };
        let comm = LinearRecv::new(inner, landing, &plugin.cfg);
        if !dev_handle.is_null() {
            // SAFETY: not NULL; the caller's *recvDevComm points at its ncclNetDeviceHandle_v7_t.
            unsafe { dev_handle.write(host_device_handle()) };
        }
        self.accepted = true;
        Ok(Some(Accepted::Linear(Box::new(comm))))
    }
}

/// TCPXO's device handle of either end: no device code, no proxy progress (`fo/nccl_shim.cc`
/// `createSendDevComm` L227-238, `createRecvDevComm` L240-254).
pub fn host_device_handle() -> NcclNetDeviceHandleV7 {
    NcclNetDeviceHandleV7 {
        net_device_type: NCCL_NET_DEVICE_HOST,
        net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
        handle: std::ptr::null_mut(),
        size: 0,
        needs_proxy_progress: 0,
    }
}
