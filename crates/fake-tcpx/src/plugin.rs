//! Process-wide state created by `init`: the knobs, the devices (`topology.rs`) with their property
//! strings (static storage, as TCPX's and TCPXO's are) and the socket transport each one's comms
//! run on, bound to its address. How `init` may be called again, and what failing it costs, is the
//! plugin's rule: TCPX refuses a second call, TCPXO shares the first one's outcome and ends the
//! process where it fails.

use std::ffi::{CString, c_char, c_int};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use uccl_tcpx::internal::ncclnet::{
    NCCL_NET_DEVICE_HOST, NCCL_NET_DEVICE_UNPACK, NCCL_NET_DEVICE_UNPACK_VERSION, NCCL_PTR_CUDA, NCCL_PTR_HOST,
    NcclDebugLogger, NcclNetPropertiesV7,
};
use uccl_tcpx::internal::transport::socket::SocketNet;

use crate::config::{Config, Mode};
use crate::fail::{Fail, Result};
use crate::fatal::fatal;
use crate::gpu::{self, GpuContext};
use crate::handle::TCPXO_NO_INDEX;
use crate::profile::{self, Kind};
use crate::topology::{self, Nic};
use crate::{fatal, log, threads};

/// TCPX retries a refused connect for about 20 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// One A3 GPU NIC: 200 Gbps.
const SPEED_MBPS: c_int = 200_000;
const MAX_COMMS: c_int = 65536;
/// TCPXO's speed where `/sys/class/net/<name>/speed` gives none (`fo/common.cc` `GetSpeed` L203-207).
const TCPXO_DEFAULT_SPEED: c_int = 10_000;
/// TCPXO's `kMaxGpuDevices` (`nccl_cuda/cuda_defs.h` L18).
const TCPXO_MAX_GPUS: i32 = 8;

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
    match profile::kind() {
        Kind::Tcpx => init_once(logger),
        Kind::Tcpxo => init_shared(logger),
    }
}

/// TCPX's: once per loaded image, whoever calls it (`gpu/cuda_wrapper.cu` `gpu_init`).
fn init_once(logger: NcclDebugLogger) -> Result<()> {
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
    let _ = PLUGIN.set(open(Config::from_env()?)?);
    Ok(())
}

/// TCPXO's: the core runs once per image (`absl::call_once`, `fo/init.cc` `PluginCoreInit` L140),
/// with the first caller's logger (`InitOnce` L104-107); a later call gets the first outcome and
/// keeps that logger. Every call then sets up the GPU current on its thread (`fo/fastrak_plugin.cc`
/// `Init` L83-99). Any failure there is `LOG(FATAL)`: the process ends, so that NCCL cannot fall
/// back to another transport (L75-80).
fn init_shared(logger: NcclDebugLogger) -> Result<()> {
    let _serial = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if PLUGIN.get().is_none() {
        if logger.is_none() {
            return Err(fatal(
                "init with a NULL logger: TCPXO installs the first caller's logger before anything else \
                 (fo/init.cc InitOnce L107) and calls it for its first message"
                    .into(),
            ));
        }
        log::install(logger);
        let plugin = Config::from_env().and_then(open).map_err(|f| {
            fatal(format!(
                "Plug-in core initialization failed ({}), aborting... (fo/fastrak_plugin.cc Init L78)",
                f.msg
            ))
        })?;
        let _ = PLUGIN.set(plugin);
    }
    get()?.current_gpu_for_init()
}

/// The plugin `cfg` describes, its process-wide settings applied.
fn open(cfg: Config) -> Result<Plugin> {
    if cfg.kind != profile::kind() {
        return Err(Fail::internal(format!(
            "{}={} at init, but this library was loaded as {}: the kind shapes the exported table, which is \
             fixed when the library is loaded; set {} before loading it",
            profile::VAR,
            cfg.kind.label(),
            profile::kind().label(),
            profile::VAR
        )));
    }
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
    let ifname = cfg.ifname.as_ref().map(|(var, list)| (*var, list.as_str()));
    let mut nics = topology::finish(specs, cfg.ip, ifname).map_err(Fail::internal)?;
    if cfg.kind == Kind::Tcpxo {
        topology::sort_by_pci_address(&mut nics);
    }
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
    Ok(Plugin { cfg, devices })
}

impl Plugin {
    /// GPU mode: the GPU current on the calling thread, which TCPX binds what `call` makes to.
    pub fn bind_gpu(&self, call: &str) -> Result<Option<GpuContext>> {
        match self.cfg.mode {
            Mode::Gpu => GpuContext::current(call).map(Some),
            Mode::Host => Ok(None),
        }
    }

    /// TCPXO's `init` finds the per-GPU state of the GPU current on the calling thread
    /// (`cuCtxGetDevice`, `nccl_cuda/cuda_common.cc` `GetDeviceIndex` L56) and ends the process
    /// without one, or with an ordinal of 8 or more (`fo/fastrak_plugin.cc` `Init` L83-89), or with
    /// more than 8 GPUs (`checkDeviceCount`, `nccl_cuda/cuda_common.cc` L89-96, from `NcclShim::Create`
    /// L175). Host mode has no GPU: it stands in for one.
    fn current_gpu_for_init(&self) -> Result<()> {
        if self.cfg.mode != Mode::Gpu {
            return Ok(());
        }
        let gpu = GpuContext::current("init").map_err(|f| {
            fatal(format!(
                "Failed to get device index for current GPU -1, aborting... (fo/fastrak_plugin.cc Init L86): every \
                 init call needs a CUDA context current on its thread ({})",
                f.msg
            ))
        })?;
        if gpu.ordinal() >= TCPXO_MAX_GPUS {
            return Err(fatal(format!(
                "Failed to get device index for current GPU {}, aborting... (fo/fastrak_plugin.cc Init L86)",
                gpu.ordinal()
            )));
        }
        let count = gpu::count()?;
        if count > TCPXO_MAX_GPUS {
            return Err(fatal(format!(
                "Failed to initialize nccl shim on device:{} (NET/FasTrak: Number of GPUs ({count}) is larger than \
                 maximum number: {TCPXO_MAX_GPUS}), aborting... (fo/fastrak_plugin.cc Init L96)",
                gpu.ordinal()
            )));
        }
        Ok(())
    }

    /// The FasTrak index `listen` puts in a TCPXO handle: the rank of the listener's GPU by PCI
    /// address among the host's GPUs (`fo/common.cc` `GetPciAddrToFastrakIdxMap` L211-245, which
    /// counts H100s; the fake counts every GPU); 0 in host mode.
    pub fn fastrak_index(&self, gpu: Option<&GpuContext>) -> Result<u8> {
        let Some(gpu) = gpu else { return Ok(0) };
        let me = gpu.bus_id()?;
        let mut all: Vec<String> = gpu::places()?.into_iter().map(|p| p.bus_id).collect();
        all.sort();
        let index = all.iter().position(|b| *b == me).unwrap_or(0);
        Ok(u8::try_from(index).ok().filter(|i| *i != TCPXO_NO_INDEX).unwrap_or(0))
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
        if self.cfg.kind == Kind::Tcpxo {
            return tcpxo_properties(dev, d);
        }
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

/// TCPXO's properties (`fo/nccl_shim.cc` `GetProperties` L950-973): HOST|CUDA (`HOST_PTR_ONLY` is
/// defined nowhere in its build), the speed its interface reports, no latency, 65536 comms, one
/// receive per request, and a HOST device: no device code, no proxy progress.
fn tcpxo_properties(dev: usize, d: &Device) -> NcclNetPropertiesV7 {
    NcclNetPropertiesV7 {
        name: d.name.as_ptr() as *mut c_char,
        pci_path: d.pci_path.as_ptr() as *mut c_char,
        guid: dev as u64,
        ptr_support: NCCL_PTR_HOST | NCCL_PTR_CUDA,
        speed: tcpxo_speed(&d.nic.name),
        port: 0,
        latency: 0.0,
        max_comms: MAX_COMMS,
        max_recvs: 1,
        net_device_type: NCCL_NET_DEVICE_HOST,
        net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
    }
}

/// TCPXO's `GetSpeed` (`fo/common.cc` L192-209), read at every `getProperties`: the first 8 bytes
/// of `/sys/class/net/<name>/speed` as a number, else (no such interface, or not positive) 10 Gbps.
/// The fake's devices are not the host's interfaces, so most read the default.
pub fn tcpxo_speed(name: &str) -> c_int {
    let read = std::fs::read(format!("/sys/class/net/{name}/speed")).unwrap_or_default();
    let text = String::from_utf8_lossy(&read[..read.len().min(8)]).into_owned();
    let text = text.trim_start();
    let end = text.char_indices().find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))));
    let number = &text[..end.map_or(text.len(), |(i, _)| i)];
    number.parse::<c_int>().ok().filter(|s| *s > 0).unwrap_or(TCPXO_DEFAULT_SPEED)
}
