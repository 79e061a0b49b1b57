//! Process-wide state created by `init`: the knobs, the devices (`topology.rs`) with their property
//! strings (static storage, as TCPX's are) and the socket transport each one's comms run on, bound
//! to its address.

use std::ffi::{CString, c_char, c_int};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use uccl_tcpx::internal::ncclnet::{
    NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NCCL_PTR_CUDA, NCCL_PTR_HOST, NcclDebugLogger,
    NcclNetPropertiesV7,
};
use uccl_tcpx::internal::transport::socket::SocketNet;

use crate::config::{Config, Mode};
use crate::fail::{Fail, Result};
use crate::gpu::{self, GpuContext};
use crate::topology::{self, Nic};
use crate::{fatal, log, threads};

/// TCPX retries a refused connect for about 20 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// One A3 GPU NIC: 200 Gbps.
const SPEED_MBPS: c_int = 200_000;
const MAX_COMMS: c_int = 65536;

pub struct Plugin {
    pub cfg: Config,
    devices: Vec<Device>,
}

struct Device {
    nic: Nic,
    name: CString,
    pci_path: CString,
    /// Listens bind to the device's address and put it into their handles.
    net: SocketNet,
}

static PLUGIN: OnceLock<Plugin> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

pub fn get() -> Result<&'static Plugin> {
    PLUGIN.get().ok_or_else(|| Fail::internal("called before a successful init"))
}

pub fn init(logger: NcclDebugLogger) -> Result<()> {
    if logger.is_none() {
        // TCPX stores it and crashes at its first message; refusing leaves the image uninitialised.
        return Err(Fail::internal("init needs a logger, got NULL"));
    }
    let _serial = INIT.lock().unwrap_or_else(|p| p.into_inner());
    // tcpxInit's first statement replaces the logger (net_tcpx.cc), so a second consumer's init
    // takes over every later message of the first consumer's comms, although it then fails.
    log::install(logger);
    if PLUGIN.get().is_some() {
        return Err(Fail::internal(
            "gpu lib init twice (gpu/cuda_wrapper.cu gpu_init): init runs once per loaded image of this library, \
             whoever calls it, and another consumer in this process ran it first; the plugin now logs through \
             this consumer's logger",
        ));
    }
    let cfg = Config::from_env()?;
    if cfg.mode == Mode::Gpu {
        uccl_tcpx::internal::cuda::driver().map_err(|e| Fail::internal(format!("FAKE_TCPX_MODE=gpu: {e}")))?;
    }
    fatal::configure(cfg.on_fatal);
    threads::configure(cfg.thread_check);
    log::set_trace(cfg.trace);
    let specs = match (&cfg.topology, cfg.mode) {
        (Some(listed), _) => listed.clone(),
        (None, Mode::Host) => topology::host_default(cfg.devices.unwrap_or(2)),
        (None, Mode::Gpu) => topology::gpu_default(cfg.devices, &gpu::places()?),
    };
    let nics = topology::finish(specs, cfg.ip, cfg.ifname.as_deref()).map_err(Fail::internal)?;
    let devices = nics
        .into_iter()
        .map(|nic| Device {
            name: CString::new(nic.name.clone()).expect("parsed names have no NUL"),
            pci_path: CString::new(nic.pci_path.clone()).expect("parsed paths have no NUL"),
            net: SocketNet::new(nic.addr, CONNECT_TIMEOUT, IO_TIMEOUT, Arc::new(|| {})).with_bind(nic.addr),
            nic,
        })
        .collect::<Vec<_>>();
    log::info(&format!("init: {cfg:?}"));
    for (i, d) in devices.iter().enumerate() {
        log::info(&format!("device {i}: {:?}", d.nic));
    }
    let _ = PLUGIN.set(Plugin { cfg, devices });
    Ok(())
}

impl Plugin {
    /// GPU mode: the GPU current on the calling thread, which TCPX binds what `call` makes to.
    pub fn bind_gpu(&self, call: &str) -> Result<Option<GpuContext>> {
        match self.cfg.mode {
            Mode::Gpu => GpuContext::current(call).map(Some),
            Mode::Host => Ok(None),
        }
    }

    pub fn check_dev(&self, dev: c_int) -> Result<usize> {
        usize::try_from(dev)
            .ok()
            .filter(|d| *d < self.devices.len())
            .ok_or_else(|| Fail::argument(format!("device {dev} does not exist ({} devices)", self.devices.len())))
    }

    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Device `dev` (checked by `check_dev`).
    pub fn nic(&self, dev: usize) -> &Nic {
        &self.devices[dev].nic
    }

    /// The socket transport of device `dev`'s comms.
    pub fn net(&self, dev: usize) -> &SocketNet {
        &self.devices[dev].net
    }

    /// TCPX reports every interface alike, whatever its devmem queues: `ptrSupport` is HOST|CUDA
    /// unless the plugin was built `HOST_PTR_ONLY` (`net_tcpx.cc` `tcpxGetProperties`; `macro.h`
    /// does not define it), so only its PCI path tells a device without devmem apart.
    pub fn properties(&self, dev: usize) -> NcclNetPropertiesV7 {
        let d = &self.devices[dev];
        NcclNetPropertiesV7 {
            name: d.name.as_ptr() as *mut c_char,
            pci_path: d.pci_path.as_ptr() as *mut c_char,
            guid: dev as u64,
            ptr_support: NCCL_PTR_HOST | NCCL_PTR_CUDA,
            speed: SPEED_MBPS,
            port: 0,
            latency: 0.0,
            max_comms: MAX_COMMS,
            max_recvs: 1,
            net_device_type: NCCL_NET_DEVICE_UNPACK,
            net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
        }
    }
}
