//! A fake devmem NIC: a shared library exporting `ncclNetPlugin_v7` that any ncclNet v7 consumer can
//! dlopen in place of Google's GPUDirect-TCPX plugin. It runs on the socket transport of uccl-tcpx
//! (plain TCP, any host) and reproduces TCPX's observable behaviour: asynchronous connect/accept, an
//! UNPACK device handle, 16 requests per comm with receives held until `irecvConsumed`, progress only
//! inside `test`, `test` valid only on the oldest request, `*size` never written, the sender's size
//! replacing the receiver's, and received bytes scattered over a bounce pool described by
//! `loadMeta` lists. Knobs and differences from TCPX: README.md of this crate.

mod config;
mod connect;
mod entry;
mod fail;
mod fatal;
mod fragment;
mod gpu;
mod handle;
mod health;
mod host;
mod listen;
mod log;
mod memory;
mod mr;
mod plugin;
mod pool;
mod recv;
mod registry;
mod request;
mod send;
mod setup;
mod staging;
mod threads;
mod topology;
mod wire;

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uccl_tcpx::internal::ncclnet::{NcclDebugLogger, NcclNetDeviceHandleV7, NcclNetPropertiesV7, NcclNetV7};
use uccl_tcpx::internal::transport::Net;

use config::Mode;
use entry::{guard, non_null};
use fail::{Fail, Result};
use registry::Object;
use threads::Scope;

/// The plugin table, a data symbol as in TCPX.
#[allow(non_upper_case_globals)]
#[unsafe(no_mangle)]
pub static ncclNetPlugin_v7: NcclNetV7 = NcclNetV7 {
    name: c"FakeDevmemTCPX_v7".as_ptr(),
    init: Some(fake_init),
    devices: Some(fake_devices),
    get_properties: Some(fake_get_properties),
    listen: Some(fake_listen),
    connect: Some(fake_connect),
    accept: Some(fake_accept),
    reg_mr: Some(fake_reg_mr),
    reg_mr_dma_buf: None,
    dereg_mr: Some(fake_dereg_mr),
    isend: Some(fake_isend),
    irecv: Some(fake_irecv),
    iflush: Some(fake_iflush),
    test: Some(fake_test),
    close_send: Some(fake_close),
    close_recv: Some(fake_close),
    close_listen: Some(fake_close_listen),
    get_device_mr: Some(fake_get_device_mr),
    irecv_consumed: Some(fake_irecv_consumed),
};

/// Requests `isend` and `irecv` handed out in this process, over every comm.
static SENDS_POSTED: AtomicU64 = AtomicU64::new(0);
static RECEIVES_POSTED: AtomicU64 = AtomicU64::new(0);

/// Test hook, not part of the ncclNet table: the send and receive requests the plugin handed out
/// in this process so far, so that a consumer's tests can count what a transfer cost in requests
/// (TCPX holds 16 per comm, each with its own control message and unpack). A NULL pointer is skipped.
///
/// # Safety
/// Each pointer is NULL or points to a writable `u64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fake_tcpx_requests(sends: *mut u64, receives: *mut u64) {
    // SAFETY: per the contract.
    unsafe {
        if let Some(s) = sends.as_mut() {
            *s = SENDS_POSTED.load(Ordering::Relaxed);
        }
        if let Some(r) = receives.as_mut() {
            *r = RECEIVES_POSTED.load(Ordering::Relaxed);
        }
    }
}

unsafe extern "C" fn fake_init(logger: NcclDebugLogger) -> c_int {
    guard("init", || Scope::Control(0), || plugin::init(logger))
}

unsafe extern "C" fn fake_devices(ndev: *mut c_int) -> c_int {
    guard(
        "devices",
        || Scope::Free,
        || {
            let p = plugin::get()?;
            // SAFETY: checked non-NULL; the caller provides an int.
            unsafe { non_null(ndev, "ndev")?.write(p.devices() as c_int) };
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_get_properties(dev: c_int, props: *mut NcclNetPropertiesV7) -> c_int {
    guard(
        "getProperties",
        || Scope::Free,
        || {
            let p = plugin::get()?;
            let dev = p.check_dev(dev)?;
            // SAFETY: checked non-NULL; the caller provides a 56-byte v7 properties struct.
            unsafe { non_null(props, "props")?.write(p.properties(dev)) };
            Ok(())
        },
    )
}

/// Per-listen seeds, so that comms of one process shuffle their pools differently.
fn next_comm_seed(base: u64) -> u64 {
    static COMMS: AtomicU64 = AtomicU64::new(0);
    base ^ COMMS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

unsafe extern "C" fn fake_listen(dev: c_int, handle: *mut c_void, listen_comm: *mut *mut c_void) -> c_int {
    guard(
        "listen",
        || Scope::Control(0),
        || {
            let p = plugin::get()?;
            let dev = p.check_dev(dev)?;
            let handle = non_null(handle, "handle")?.cast::<u8>();
            let listen_comm = non_null(listen_comm, "listenComm")?;
            // TCPX binds the listen comm to the current GPU, whose pool its flows are steered into.
            let gpu = p.bind_gpu("listen")?;
            let (mut h, inner) = p.net(dev).listen(0).map_err(|e| Fail::system(format!("listen: {e}")))?;
            handle::mark(&mut h, dev, p.cfg.setup.data_sockets);
            let comm = Arc::new(Mutex::new(listen::FakeListen::new(inner, dev, next_comm_seed(p.cfg.seed), gpu)));
            let key = Arc::as_ptr(&comm) as usize;
            registry::add(key, Object::Listen(comm), None);
            // SAFETY: checked non-NULL; the caller provides NCCL_NET_HANDLE_MAXSIZE bytes and a pointer slot.
            unsafe {
                std::ptr::copy_nonoverlapping(h.as_ptr(), handle, h.len());
                listen_comm.write(key as *mut c_void);
            }
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_connect(
    dev: c_int,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
    _send_dev_comm: *mut *mut NcclNetDeviceHandleV7,
) -> c_int {
    guard(
        "connect",
        || Scope::Control(0),
        || {
            let p = plugin::get()?;
            let dev = p.check_dev(dev)?;
            let handle = non_null(handle, "handle")?.cast::<u8>();
            let send_comm = non_null(send_comm, "sendComm")?;
            // SAFETY: checked non-NULL; the caller passes its 128-byte handle buffer.
            unsafe { send_comm.write(std::ptr::null_mut()) };
            // SAFETY: handle is non-NULL (checked above) and is the caller's 128-byte handle buffer.
            let h = unsafe { handle::read(handle) };
            let state = handle::connect_state(&h);
            if state == 0 {
                let c = connect::Connecting::start(p, dev, h, p.bind_gpu("connect")?)?;
                let key = registry::add_connect(c);
                // SAFETY: as above; bytes 80..88 of the caller's handle hold the state, as in TCPX.
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
                    "connect handle bytes 80..88 hold no connect in progress: start every connect from a fresh \
                 copy of the listen handle (TCPX would read freed memory here)",
                )
            })?;
            let Some(outcome) = c.poll() else { return Ok(()) };
            registry::remove_connect(state);
            let inner = outcome?;
            let comm = Arc::new(Mutex::new(send::FakeSend::new(inner, &p.cfg, c.take_gpu())?));
            let key = Arc::as_ptr(&comm) as usize;
            let ring = {
                let mut c = registry::lock(&comm)?;
                c.set_key(key);
                c.ring_base()
            };
            registry::add(key, Object::Send(comm), Some(ring));
            log::trace(|| format!("connect: send comm {key:#x} on device {dev}"));
            // SAFETY: as above.
            unsafe { send_comm.write(key as *mut c_void) };
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_accept(
    listen_comm: *mut c_void,
    recv_comm: *mut *mut c_void,
    recv_dev_comm: *mut *mut NcclNetDeviceHandleV7,
) -> c_int {
    guard(
        "accept",
        || Scope::Control(listen_comm as usize),
        || {
            let p = plugin::get()?;
            let recv_comm = non_null(recv_comm, "recvComm")?;
            // SAFETY: checked non-NULL.
            unsafe { recv_comm.write(std::ptr::null_mut()) };
            let recv_dev_comm = non_null(recv_dev_comm, "recvDevComm (TCPX needs it to build the unpack queue)")?;
            // SAFETY: checked non-NULL; points at the caller's pointer slot.
            let dev_handle = unsafe { recv_dev_comm.read() };
            let dev_handle = non_null(
                dev_handle,
                "*recvDevComm: it must point at a caller-allocated ncclNetDeviceHandle_v7_t (TCPX segfaults)",
            )?;
            let Some(Object::Listen(l)) = registry::get(listen_comm as usize) else {
                return Err(Fail::internal(format!("accept on {listen_comm:p}, which is not a listen comm")));
            };
            let accepted = registry::lock(&l)?.accept(p, dev_handle)?;
            if let Some(comm) = accepted {
                let key = Arc::as_ptr(&comm) as usize;
                let ring = {
                    let mut c = registry::lock(&comm)?;
                    c.set_key(key);
                    c.ring_base()
                };
                registry::add(key, Object::Recv(comm), Some(ring));
                log::trace(|| {
                    // SAFETY: accept wrote the caller's device handle just above; a plain read.
                    let h = unsafe { dev_handle.read() };
                    format!("accept: recv comm {key:#x}, unpack handle {:p} (in device memory in GPU mode)", h.handle)
                });
                // SAFETY: checked non-NULL.
                unsafe { recv_comm.write(key as *mut c_void) };
            }
            Ok(())
        },
    )
}

/// Runs `f` on the send or receive comm `comm` names.
fn with_comm<T>(
    comm: *mut c_void,
    what: &str,
    on_send: impl FnOnce(&mut send::FakeSend) -> Result<T>,
    on_recv: impl FnOnce(&mut recv::FakeRecv) -> Result<T>,
) -> Result<T> {
    match registry::get(comm as usize) {
        Some(Object::Send(c)) => on_send(&mut *registry::lock(&c)?),
        Some(Object::Recv(c)) => on_recv(&mut *registry::lock(&c)?),
        _ => Err(Fail::internal(format!("{what} on {comm:p}, which is not a send or receive comm"))),
    }
}

unsafe extern "C" fn fake_reg_mr(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    ty: c_int,
    mhandle: *mut *mut c_void,
) -> c_int {
    guard(
        "regMr",
        || Scope::Control(comm as usize),
        || {
            let p = plugin::get()?;
            let mhandle = non_null(mhandle, "mhandle")?;
            // GPU mode: TCPX makes the dma-buf in the current GPU's context, and the fake reads CUDA
            // registrations with CUDA copies, so they must be device memory; it records whose.
            let locate = || match p.cfg.mode {
                Mode::Gpu => {
                    p.bind_gpu("CUDA regMr")?;
                    gpu::device_of_pointer(data as usize).map(Some)
                }
                Mode::Host => Ok(None),
            };
            let h = with_comm(
                comm,
                "regMr",
                |c| c.regs().register(data, size, ty, locate),
                |c| c.regs().register(data, size, ty, locate),
            )?;
            // SAFETY: checked non-NULL.
            unsafe { mhandle.write(h) };
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_dereg_mr(comm: *mut c_void, mhandle: *mut c_void) -> c_int {
    guard(
        "deregMr",
        || Scope::Control(comm as usize),
        || with_comm(comm, "deregMr", |c| c.regs().deregister(mhandle), |c| c.regs().deregister(mhandle)),
    )
}

unsafe extern "C" fn fake_isend(
    send_comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    _tag: c_int,
    mhandle: *mut c_void,
    request: *mut *mut c_void,
) -> c_int {
    guard(
        "isend",
        || Scope::Comm(send_comm as usize),
        || {
            let request = non_null(request, "request")?;
            let Some(Object::Send(c)) = registry::get(send_comm as usize) else {
                return Err(Fail::internal(format!("isend on {send_comm:p}, which is not a send comm")));
            };
            let req = registry::lock(&c)?.isend(data, size, mhandle)?;
            if !req.is_null() {
                SENDS_POSTED.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: checked non-NULL.
            unsafe { request.write(req) };
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_irecv(
    recv_comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut c_int,
    _tags: *mut c_int,
    mhandles: *mut *mut c_void,
    request: *mut *mut c_void,
) -> c_int {
    guard(
        "irecv",
        || Scope::Comm(recv_comm as usize),
        || {
            if n != 1 {
                return Err(Fail::internal(format!("irecv with n = {n}: this plugin receives one buffer per request")));
            }
            let request = non_null(request, "request")?;
            let (data, sizes, mhandles) =
                (non_null(data, "data")?, non_null(sizes, "sizes")?, non_null(mhandles, "mhandles")?);
            let Some(Object::Recv(c)) = registry::get(recv_comm as usize) else {
                return Err(Fail::internal(format!("irecv on {recv_comm:p}, which is not a receive comm")));
            };
            // SAFETY: checked non-NULL; n == 1 so each array has one element.
            let (data, size, mhandle) = unsafe { (data.read(), sizes.read(), mhandles.read()) };
            let req = registry::lock(&c)?.irecv(data, size, mhandle)?;
            if !req.is_null() {
                RECEIVES_POSTED.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: checked non-NULL.
            unsafe { request.write(req) };
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_iflush(
    _recv_comm: *mut c_void,
    _n: c_int,
    _data: *mut *mut c_void,
    _sizes: *mut c_int,
    _mhandles: *mut *mut c_void,
    _request: *mut *mut c_void,
) -> c_int {
    guard(
        "iflush",
        || Scope::Free,
        || Err(Fail::internal("iflush is not supported: TCPX's is broken and NCCL never calls it for this plugin")),
    )
}

/// A request is a call on its comm; one no comm owns fails the call anyway.
fn request_scope(request: *mut c_void) -> Scope {
    registry::request(request as usize).map_or(Scope::Free, |(key, _, _)| Scope::Comm(key))
}

unsafe extern "C" fn fake_test(request: *mut c_void, done: *mut c_int, _size: *mut c_int) -> c_int {
    // `*size` is never written, as in TCPX: the size is the sender's, found at offset 36 of the
    // request or as the sum of the loadMeta lengths.
    guard(
        "test",
        || request_scope(request),
        || {
            let done = non_null(done, "done")?;
            let Some((_, object, slot)) = registry::request(request as usize) else {
                return Err(Fail::internal(format!("test called with invalid request {request:p}")));
            };
            let mut d = 0;
            let r = match object {
                Object::Send(c) => registry::lock(&c)?.test(slot, &mut d),
                Object::Recv(c) => registry::lock(&c)?.test(slot, &mut d),
                Object::Listen(_) => Err(Fail::internal("test called with invalid request")),
            };
            // SAFETY: checked non-NULL.
            unsafe { done.write(d) };
            r
        },
    )
}

unsafe extern "C" fn fake_irecv_consumed(recv_comm: *mut c_void, n: c_int, request: *mut c_void) -> c_int {
    guard(
        "irecvConsumed",
        || Scope::Comm(recv_comm as usize),
        || {
            if n != 1 {
                return Err(Fail::internal(format!("irecvConsumed with n = {n}: only n == 1 is supported")));
            }
            let Some((key, object, slot)) = registry::request(request as usize) else {
                return Err(Fail::internal(format!("irecvConsumed called with invalid request {request:p}")));
            };
            match object {
                Object::Send(_) => {
                    log::warn("irecvConsumed called with a send request; ignored");
                    Ok(())
                }
                Object::Recv(c) if key == recv_comm as usize => registry::lock(&c)?.consumed(slot),
                _ => Err(Fail::internal("irecvConsumed called with a request of another comm")),
            }
        },
    )
}

unsafe extern "C" fn fake_close(comm: *mut c_void) -> c_int {
    guard(
        "close",
        || Scope::Control(comm as usize),
        || {
            let is_comm = |o: &Object| matches!(o, Object::Send(_) | Object::Recv(_));
            match registry::remove_if(comm as usize, is_comm) {
                Some((Object::Send(c), true)) => {
                    if registry::lock(&c).map(|c| c.has_outstanding()).unwrap_or(false) {
                        log::warn("close: send comm closed with requests in flight");
                    }
                    Ok(())
                }
                Some((Object::Recv(c), true)) => {
                    if let Ok(c) = registry::lock(&c) {
                        if c.unconsumed() > 0 {
                            log::warn(&format!(
                                "close: {} completed receives were never consumed: some pages not yet freed?",
                                c.unconsumed()
                            ));
                        }
                        if c.has_outstanding() {
                            log::warn("close: receive comm closed with requests in flight");
                        }
                    }
                    Ok(())
                }
                Some(_) => Err(Fail::internal("closeSend/closeRecv called on a listen comm")),
                None => Err(Fail::internal(format!("close of {comm:p}, which is not an open comm"))),
            }
        },
    )
}

unsafe extern "C" fn fake_close_listen(listen_comm: *mut c_void) -> c_int {
    guard(
        "closeListen",
        || Scope::Control(listen_comm as usize),
        || match registry::remove_if(listen_comm as usize, |o| matches!(o, Object::Listen(_))) {
            Some((_, true)) => Ok(()),
            Some((_, false)) => Err(Fail::internal("closeListen called on a send or receive comm")),
            None => Err(Fail::internal(format!("closeListen of {listen_comm:p}, which is not an open listen comm"))),
        },
    )
}

unsafe extern "C" fn fake_get_device_mr(_comm: *mut c_void, _mhandle: *mut c_void, _dptr: *mut *mut c_void) -> c_int {
    // TCPX writes nothing here either.
    0
}
