//! The `connect` entry's work: starting a connect (`connect.rs`) and keeping it in the caller's
//! handle, polling it on later calls, and registering the send comm it made. Apart from
//! `connect.rs` because the registry holds connects in progress: the connect itself need not know
//! the registry.

use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex};

use uccl_tcpx::internal::ncclnet::{NCCL_REMOTE_ERROR, NcclNetDeviceHandleV7};
use uccl_tcpx::internal::transport::SendComm;

use crate::connect::Connecting;
use crate::fail::{Fail, Result};
use crate::gpu::GpuContext;
use crate::listen::host_device_handle;
use crate::plugin::Plugin;
use crate::registry::{self, Object};
use crate::send::FakeSend;
use crate::{handle, log};

/// One TCPX `connect` call on the caller's `handle` from device `dev`: the first starts the
/// connect and stores it at bytes 80..88, later ones poll it; `*send_comm` is NULL until it is
/// done.
///
/// # Safety
/// `handle` points at the caller's 128 handle bytes, `send_comm` at a writable pointer slot.
pub unsafe fn poll_tcpx(p: &'static Plugin, dev: usize, handle: *mut u8, send_comm: *mut *mut c_void) -> Result<()> {
    // SAFETY: per the contract.
    unsafe { send_comm.write(std::ptr::null_mut()) };
    // SAFETY: per the contract.
    let h = unsafe { handle::read(handle) };
    let state = handle::connect_state(&h);
    if state == 0 {
        let c = Connecting::start(p, dev, h, p.bind_gpu("connect")?)?;
        let key = registry::add_connect(c);
        // SAFETY: per the contract; bytes 80..88 of the caller's handle hold the state, as in TCPX.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (key as u64).to_le_bytes().as_ptr(),
                handle.add(handle::CONNECT_STATE.start),
                8,
            )
        };
        return Ok(());
    }
    let c = registry::get_connect(state).ok_or_else(|| {
        Fail::internal(
            "connect handle bytes 80..88 hold no connect in progress: start every connect from a fresh copy of the \
             listen handle (TCPX would read freed memory here)",
        )
    })?;
    let Some(outcome) = c.poll() else { return Ok(()) };
    registry::remove_connect(state);
    let key = register(p, outcome?, c.take_gpu())?;
    log::trace(|| format!("connect: send comm {key:#x} on device {dev}"));
    // SAFETY: per the contract.
    unsafe { send_comm.write(key as *mut c_void) };
    Ok(())
}

/// One TCPXO `connect` call (`fo/fastrak_plugin.cc` `Connect` L139-170, `fo/nccl_shim.cc`
/// `Connect` L332-421): the handle must be version 1 with a FasTrak index (else rc 6); its stage
/// at bytes 88..104 goes from start (0) to connecting (1, with the comm being connected) on the
/// first call, which polls at once, and to done (3, NULL) when the comm comes back; a call in any
/// other state fails. `*sendDevComm`, where not NULL, gets the HOST device handle.
///
/// # Safety
/// `handle` points at the caller's 128 handle bytes, `send_comm` at a writable pointer slot, and
/// `send_dev_comm` at a readable pointer slot whose value is NULL or points at a writable
/// `ncclNetDeviceHandle_v7_t`.
pub unsafe fn poll_tcpxo(
    p: &'static Plugin,
    dev: c_int,
    handle: *mut u8,
    send_comm: *mut *mut c_void,
    send_dev_comm: *mut *mut NcclNetDeviceHandleV7,
) -> Result<()> {
    // Every call first finds the current GPU's state (GetShim, L141).
    let gpu = p.bind_gpu("connect")?;
    // SAFETY: per the contract.
    let h = unsafe { handle::read(handle) };
    if h[0] != handle::TCPXO_VERSION {
        return Err(remote(format!(
            "VERSION MISMATCH: Received Connect request with ncclSocketHandle version {}, but this plugin is \
             version {} (fo/fastrak_plugin.cc Connect L152)",
            h[0],
            handle::TCPXO_VERSION
        )));
    }
    if h[1] == handle::TCPXO_NO_INDEX {
        return Err(remote(
            "SEVERE: FasTrak index is uninitialized in the ncclSocketHandle. Remote rank is misbehaving. \
             (fo/fastrak_plugin.cc Connect L159)",
        ));
    }
    let dev = p.check_dev(dev)?;
    let (state, key) = match handle::tcpxo_stage(&h) {
        (handle::TCPXO_START, _) => {
            let c = Connecting::start(p, dev, h, gpu)?;
            let key = registry::add_connect(c);
            // SAFETY: per the contract.
            unsafe { handle::set_tcpxo_stage(handle, handle::TCPXO_CONNECTING, key) };
            (handle::TCPXO_CONNECTING, key)
        }
        stage => stage,
    };
    if state != handle::TCPXO_CONNECTING {
        return Err(Fail::internal(format!(
            "NcclShim::Connect should not be called in state {state} (fo/nccl_shim.cc Connect L416-419): a \
             completed connect leaves its handle in state 3; connect again from a fresh copy of the listen handle"
        )));
    }
    let c = registry::get_connect(key).ok_or_else(|| {
        Fail::internal("connect handle bytes 96..104 hold no connect in progress (TCPXO would read freed memory here)")
    })?;
    let Some(outcome) = c.poll() else { return Ok(()) };
    registry::remove_connect(key);
    let comm = register(p, outcome?, c.take_gpu())?;
    log::trace(|| format!("connect: send comm {comm:#x} on device {dev}"));
    // SAFETY: per the contract.
    unsafe {
        handle::set_tcpxo_stage(handle, handle::TCPXO_DONE, 0);
        send_comm.write(comm as *mut c_void);
        let dev_handle = send_dev_comm.read();
        if !dev_handle.is_null() {
            dev_handle.write(host_device_handle());
        }
    }
    Ok(())
}

/// TCPXO's handle checks report `ncclRemoteError`.
fn remote(msg: impl Into<String>) -> Fail {
    Fail { rc: NCCL_REMOTE_ERROR, msg: msg.into() }
}

/// Registers the send comm a completed connect made; its key.
fn register(p: &Plugin, inner: Box<dyn SendComm>, gpu: Option<GpuContext>) -> Result<usize> {
    let comm = Arc::new(Mutex::new(FakeSend::new(inner, &p.cfg, gpu)?));
    let key = Arc::as_ptr(&comm) as usize;
    let ring = {
        let mut c = registry::lock(&comm)?;
        c.set_key(key);
        c.ring_base()
    };
    registry::add(key, Object::Send(comm), ring);
    Ok(key)
}
