//! Any ncclNet v7 plugin (GPUDirect-TCPX in production, the fake devmem NIC in tests) behind the
//! transport traits.
//!
//! The plugin has no completion callback: it progresses only inside `test`, so the engine keeps
//! polling while [`PluginNet::needs_polling`] says requests are outstanding. Connect and accept are
//! asynchronous state machines polled by the handshake; connect keeps its state in the handle
//! buffer, so each attempt gets its own aligned copy that stays put until the attempt ends. The
//! plugin's C ABI itself is `crate::ncclnet`.

mod comm;
mod copier;
pub mod devices;
pub mod gather;
mod gpu;
mod image;
mod landing;
pub mod loader;
pub mod logger;
pub mod profile;
mod recv;
mod stage;
pub mod tcpx;
pub mod tcpxo;
pub mod unpack;

#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use self::comm::{CommShared, PluginSendComm, plugin_error};
use self::gpu::PluginGpus;
pub use self::loader::Plugin;
use self::recv::PluginRecvComm;
use self::stage::StageBudget;
use self::unpack::UnpackView;
use super::{Caps, ListenComm, Net, NetHandle, Properties, RecvComm, SendComm};
use crate::config::Config;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::ncclnet::{NCCL_NET_HANDLE_MAXSIZE, NCCL_SUCCESS, NcclNetDeviceHandleV7};

/// 8-byte aligned, as the plugin writes a pointer into it.
#[repr(C, align(8))]
struct AlignedHandle([u8; NCCL_NET_HANDLE_MAXSIZE]);

/// One connect attempt in progress: the plugin's copy of the peer's handle and the device-handle
/// out-slot, both at stable addresses for as long as the plugin may use them.
struct PendingConnect {
    peer_handle: NetHandle,
    handle: AlignedHandle,
    dev_handle: *mut NcclNetDeviceHandleV7,
}

// SAFETY: a pending connect is plain data; the pointer slot is only written by the plugin during
// calls made with the registry entry taken out (one thread at a time).
unsafe impl Send for PendingConnect {}

pub struct PluginNet {
    caps: Caps,
    /// With the vendor's rules over the generic driver (`Plugin::profile`: `tcpx.rs`, `tcpxo.rs`).
    plugin: Arc<Plugin>,
    /// `UCCL_TCPX_NET_DEVICES`, which overrides pairing with the GPU.
    explicit: Option<Vec<usize>>,
    /// What channels use until the GPU is known: the explicit list, else every device.
    unpaired: Vec<usize>,
    /// Device of channel `i` once the GPU is known: `paired[i % len]`, or why no device suits it.
    paired: OnceLock<Result<Vec<usize>>>,
    busy: Arc<AtomicUsize>,
    /// Connect attempts in progress, by the address of the caller's handle buffer (the engine keeps
    /// one buffer per attempt for its whole duration). Entries of abandoned attempts stay: the
    /// plugin may still hold their state.
    connects: Mutex<HashMap<usize, Box<PendingConnect>>>,
    gpus: Arc<PluginGpus>,
    /// Receive comms test the plugin's next receive while earlier ones unpack
    /// (`UCCL_TCPX_PLUGIN_TEST_AHEAD`).
    test_ahead: bool,
    /// What the send comms keep idle in staging buffers (`UCCL_TCPX_STAGING_POOL`).
    stage_budget: Arc<StageBudget>,
}

impl PluginNet {
    /// Loads (once per process) and initialises the plugin the configuration names. With
    /// `gpu_pci_path` (a GPU's sysfs path) channels pair with its devices at once; otherwise when
    /// the engine names its GPU ([`Net::set_gpu`]).
    pub fn open(config: &Config, gpu_pci_path: Option<&str>) -> Result<PluginNet> {
        let plugin = loader::load(
            config.plugin_path.as_deref(),
            config.nccl_net_plugin.as_deref(),
            config.transport,
            config.gpu,
        )?;
        let mut net = PluginNet::with_plugin(plugin, config.net_devices.as_deref(), gpu_pci_path)?;
        net.stage_budget = StageBudget::new(config.staging.pool as usize, stage::CALM);
        Ok(net.with_test_ahead(config.plugin_test_ahead))
    }

    /// Whether receive comms keep testing the plugin's next receives while earlier ones unpack (the
    /// default), or test only their oldest receive (the behaviour before, kept for comparison).
    pub fn with_test_ahead(mut self, on: bool) -> PluginNet {
        self.test_ahead = on;
        self
    }

    pub fn with_plugin(
        plugin: Arc<Plugin>,
        explicit: Option<&[usize]>,
        gpu_pci_path: Option<&str>,
    ) -> Result<PluginNet> {
        let unpaired = devices::channel_devices(explicit, &plugin.devices, None)?;
        let profile = plugin.profile;
        let caps = Caps {
            name: plugin.name,
            listen_per_channel: profile.listen_per_channel,
            // ncclNet v7's `regMr` takes an `int` size.
            max_registration: comm::MAX_REGISTRATION,
            // Where no CUDA driver exists there is no device to bind (the fake NIC in host mode,
            // the mock plugin).
            binds_gpu: profile.binds_gpu
                && crate::cuda::available()
                && unpaired.iter().any(|&d| plugin.devices.get(d).is_some_and(|p| p.supports_cuda)),
            reaches_own_host: profile.reaches_own_host,
            // A chunk of many pieces is one request of its bytes: gathered into a registered
            // buffer on the sender (`stage.rs`), scattered from the bounce pool (or, where the
            // plugin writes the buffer posted, from a scratch slot) straight into the pieces on
            // the receiver (`recv.rs`), so a transfer's requests follow its bytes.
            vectored: true,
            // Whatever the plugin: its comms' memory and threads are its own to keep.
            idle_comms_cost: true,
            agreement: plugin.agreement,
        };
        let net = PluginNet {
            caps,
            plugin,
            explicit: explicit.map(<[usize]>::to_vec),
            unpaired,
            paired: OnceLock::new(),
            busy: Arc::default(),
            connects: Mutex::default(),
            gpus: Arc::default(),
            test_ahead: true,
            stage_budget: StageBudget::new(crate::config::StagingConfig::default().pool as usize, stage::CALM),
        };
        if let Some(path) = gpu_pci_path {
            net.pair("the given GPU", Some(path));
        }
        Ok(net)
    }

    /// Chooses, once, the devices channels use for the GPU at `gpu_pci_path`: NCCL's rule (the
    /// CUDA-capable devices closest to it, under its own PCI root), unless the configuration lists
    /// devices, and logs the choice. A GPU whose path is unknown keeps every device, with a warning;
    /// a GPU with no suitable device makes every later listen and connect fail, saying why.
    fn pair(&self, gpu: &str, gpu_pci_path: Option<&str>) {
        self.paired.get_or_init(|| {
            let names = |list: &[usize]| -> String {
                list.iter().map(|&d| format!("{d} ({})", self.plugin.devices[d].name)).collect::<Vec<_>>().join(", ")
            };
            if let Some(list) = &self.explicit {
                log::info!("{gpu}: channels use net devices {} (UCCL_TCPX_NET_DEVICES)", names(list));
                return Ok(list.clone());
            }
            let Some(path) = gpu_pci_path else {
                log::warn!(
                    "{gpu}: its PCI path is unknown, so channels use every net device ({}); set \
                     UCCL_TCPX_NET_DEVICES to the devices next to it",
                    names(&self.unpaired)
                );
                return Ok(self.unpaired.clone());
            };
            let paired = devices::channel_devices(None, &self.plugin.devices, Some(path));
            match &paired {
                Ok(list) => log::info!("{gpu} at {path}: channels use net devices {}", names(list)),
                Err(e) => log::error!("{gpu}: {}", e.message()),
            }
            paired
        });
    }

    /// Why no device suits the engine's GPU, once that is known.
    fn check_paired(&self) -> Result<()> {
        match self.paired.get() {
            Some(Err(e)) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    fn shared(&self, props: Properties) -> CommShared {
        CommShared {
            props,
            busy: self.busy.clone(),
            gpus: self.gpus.clone(),
            test_ahead: self.test_ahead,
            stage_budget: self.stage_budget.clone(),
        }
    }

    fn device(&self, dev: usize) -> Result<&Properties> {
        self.plugin.devices.get(dev).ok_or_else(|| {
            Error::invalid(format!(
                "net plugin {} has {} devices, not device {dev}",
                self.plugin.name,
                self.plugin.devices.len()
            ))
        })
    }
}

impl Net for PluginNet {
    fn caps(&self) -> &Caps {
        &self.caps
    }

    fn devices(&self) -> usize {
        self.plugin.devices.len()
    }

    fn properties(&self, dev: usize) -> Result<Properties> {
        self.device(dev).cloned()
    }

    fn listen(&self, dev: usize) -> Result<(NetHandle, Box<dyn ListenComm>)> {
        self.check_paired()?;
        let props = self.device(dev)?.clone();
        let mut handle = AlignedHandle([0; NCCL_NET_HANDLE_MAXSIZE]);
        let mut listen_comm: *mut c_void = std::ptr::null_mut();
        // TCPX binds the comm to the device current at listen (its pool, its CUDA context).
        let current = self.gpus.enter()?;
        let (rc, since) = self.plugin.call(|t| {
            let listen = t.listen.expect("checked at load");
            let since = logger::mark();
            // SAFETY: a valid device index, a 128-byte aligned handle buffer and an out-pointer.
            (unsafe { listen(dev as i32, handle.0.as_mut_ptr().cast(), &mut listen_comm) }, since)
        });
        if rc != NCCL_SUCCESS {
            return Err(plugin_error(&format!("listen on device {dev} ({})", props.name), rc, since));
        }
        drop(current);
        if listen_comm.is_null() {
            return Err(Error::backend(format!("net plugin listen on device {dev} returned no listen comm")));
        }
        let listen = PluginListen {
            plugin: self.plugin.clone(),
            listen_comm,
            state: AcceptState::Idle,
            dev_handle: Box::new(NcclNetDeviceHandleV7::default()),
            dev_handle_slot: Box::new(std::ptr::null_mut()),
            shared: self.shared(props),
        };
        let mut wire = handle.0;
        // Connect state is local to the connecting process; never ship whatever sits there.
        wire[self.plugin.profile.connect_state.clone()].fill(0);
        Ok((wire, Box::new(listen)))
    }

    fn connect(&self, dev: usize, handle: &mut NetHandle) -> Result<Option<Box<dyn SendComm>>> {
        self.check_paired()?;
        let props = self.device(dev)?.clone();
        let key = handle.as_ptr() as usize;
        let previous = self.connects.lock().remove(&key);
        let mut pending = match previous {
            Some(p) if p.peer_handle == *handle => p,
            stale => {
                // The buffer now holds another peer's handle: the old attempt was abandoned, and the
                // plugin may still hold its state, so it is leaked, not freed.
                if let Some(old) = stale {
                    Box::leak(old);
                }
                // A fresh attempt: a fresh copy with no connect state in it.
                let mut copy = AlignedHandle(*handle);
                copy.0[self.plugin.profile.connect_state.clone()].fill(0);
                Box::new(PendingConnect { peer_handle: *handle, handle: copy, dev_handle: std::ptr::null_mut() })
            }
        };
        let mut send_comm: *mut c_void = std::ptr::null_mut();
        let current = self.gpus.enter()?;
        let (rc, since) = self.plugin.call(|t| {
            let connect = t.connect.expect("checked at load");
            let since = logger::mark();
            // SAFETY: a valid device, this attempt's own handle buffer (same one on every poll) and out-slots.
            let rc = unsafe {
                connect(dev as i32, pending.handle.0.as_mut_ptr().cast(), &mut send_comm, &mut pending.dev_handle)
            };
            (rc, since)
        });
        drop(current);
        if rc != NCCL_SUCCESS {
            return Err(plugin_error(&format!("connect on device {dev} ({})", props.name), rc, since));
        }
        if send_comm.is_null() {
            self.connects.lock().insert(key, pending);
            return Ok(None);
        }
        Ok(Some(Box::new(PluginSendComm::new(self.plugin.clone(), send_comm, self.shared(props)))))
    }

    fn needs_polling(&self) -> bool {
        self.busy.load(Ordering::Acquire) > 0
    }

    fn channel_device(&self, channel: usize) -> usize {
        let list = match self.paired.get() {
            Some(Ok(list)) => list,
            _ => &self.unpaired,
        };
        list[channel % list.len()]
    }

    /// Comms run on the plugin's own threads and are seen done only when tested.
    fn polls_device_copies(&self) -> bool {
        false
    }

    /// A plugin's handles are opaque.
    fn handle_address(&self, _handle: &NetHandle) -> Option<std::net::IpAddr> {
        None
    }

    fn set_handle_address(&self, _handle: &mut NetHandle, ip: std::net::IpAddr) -> Result<()> {
        Err(Error::new(
            crate::error::UcclStatus::ErrNotSupported,
            format!("the {} transport's handles name no address to replace with {ip}", self.caps.name),
        ))
    }

    fn set_gpu(&self, gpu: &Arc<Gpu>) {
        self.gpus.set_engine_gpu(gpu);
        let path = gpu.sysfs_path();
        self.pair(&format!("GPU {} ({})", gpu.ordinal(), gpu.bus_id()), path.as_deref());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptState {
    Idle,
    /// The plugin's accept is running (it returned "not yet" at least once).
    Accepting,
    Accepted,
    Failed,
}

/// A plugin listen comm. TCPX serves exactly one accept per listen comm.
struct PluginListen {
    plugin: Arc<Plugin>,
    listen_comm: *mut c_void,
    state: AcceptState,
    /// Caller-allocated device handle the plugin fills on the accept that completes, and the
    /// pointer to it accept takes the address of: both stay put while the accept is polled.
    dev_handle: Box<NcclNetDeviceHandleV7>,
    dev_handle_slot: Box<*mut NcclNetDeviceHandleV7>,
    shared: CommShared,
}

// SAFETY: used through `&mut self` only, one thread at a time.
unsafe impl Send for PluginListen {}

impl ListenComm for PluginListen {
    fn accept(&mut self) -> Result<Option<Box<dyn RecvComm>>> {
        match self.state {
            AcceptState::Accepted => {
                return Err(Error::backend("a net plugin listen comm serves one accept, which already completed"));
            }
            AcceptState::Failed => return Err(Error::backend("accept on this net plugin listen comm already failed")),
            AcceptState::Idle | AcceptState::Accepting => {}
        }
        *self.dev_handle_slot = &mut *self.dev_handle;
        let mut recv_comm: *mut c_void = std::ptr::null_mut();
        let current = self.shared.gpus.enter()?;
        let (rc, since) = self.plugin.call(|t| {
            let accept = t.accept.expect("checked at load");
            let since = logger::mark();
            // SAFETY: the live listen comm; the device-handle slot points to caller-allocated storage.
            (unsafe { accept(self.listen_comm, &mut recv_comm, &mut *self.dev_handle_slot) }, since)
        });
        drop(current);
        if rc != NCCL_SUCCESS {
            self.state = AcceptState::Failed;
            return Err(plugin_error(&format!("accept on device {}", self.shared.props.name), rc, since));
        }
        if recv_comm.is_null() {
            self.state = AcceptState::Accepting;
            return Ok(None);
        }
        self.state = AcceptState::Accepted;
        let shared = self.shared.clone();
        let mut comm = PluginRecvComm::new(self.plugin.clone(), recv_comm, shared);
        // Dropping `comm` on an error below closes it: nothing is in flight yet.
        if self.shared.props.device_unpack {
            match UnpackView::from_device_handle(&self.dev_handle)? {
                Some(view) => comm.set_unpack(view),
                None => {
                    return Err(Error::backend(format!(
                        "net device {} reports device unpack, but accept filled no unpack device handle",
                        self.shared.props.name
                    )));
                }
            }
        }
        Ok(Some(Box::new(comm)))
    }
}

impl Drop for PluginListen {
    fn drop(&mut self) {
        if self.state == AcceptState::Accepting {
            // The plugin's accept thread still uses the listen comm; closing it would free state
            // under that thread. Leaking one listen comm is the lesser harm.
            log::warn!("leaking a net plugin listen comm whose accept never completed");
            return;
        }
        // TCPXO finds the comm's GPU by the current context here too (`GetShim`).
        let _current = self.shared.gpus.enter();
        let (rc, since) = self.plugin.call(|t| {
            let close = t.close_listen.expect("checked at load");
            let since = logger::mark();
            // SAFETY: the live listen comm, closed once, with no accept running.
            (unsafe { close(self.listen_comm) }, since)
        });
        if rc != NCCL_SUCCESS {
            log::warn!("net plugin closeListen failed with {}{}", loader::rc_text(rc), logger::warning_suffix(since));
        }
    }
}
