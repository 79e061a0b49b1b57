//! A fake devmem NIC: a shared library exporting `ncclNetPlugin_v7` that any ncclNet v7 consumer can
//! dlopen in place of Google's GPUDirect-TCPX plugin. It runs on the socket transport of uccl-tcpx
//! (plain TCP, any host) and reproduces TCPX's observable behaviour: asynchronous connect/accept, an
//! UNPACK device handle, 16 requests per comm with receives held until `irecvConsumed`, progress only
//! inside `test`, `test` valid only on the oldest request, `*size` never written, the sender's size
//! replacing the receiver's, and received bytes scattered over a bounce pool described by
//! `loadMeta` lists. With `FAKE_TCPX_PLUGIN_KIND=tcpxo` it stands in for GPUDirect-TCPXO instead
//! (`profile.rs`): a HOST device, no `irecvConsumed`, unbounded requests tested in any order, and
//! received bytes written into the posted buffer. Knobs and differences: README.md of this crate.

mod addresses;
mod book;
mod config;
mod connect;
mod dial;
mod entry;
mod fail;
mod fatal;
mod footprint;
mod fragment;
mod gpu;
mod handle;
mod health;
mod host;
mod land;
mod ledger;
mod linear;
mod listen;
mod log;
mod memory;
mod mr;
mod plugin;
mod pointers;
mod pool;
mod profile;
mod recv;
mod registry;
mod request;
mod send;
mod setup;
mod staging;
mod threads;
mod topology;
mod wire;

use std::cell::UnsafeCell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uccl_tcpx::internal::ncclnet::{NcclDebugLogger, NcclNetDeviceHandleV7, NcclNetPropertiesV7, NcclNetV7};
use uccl_tcpx::internal::transport::Net;

use book::Tested;
use config::Mode;
use entry::{guard, non_null};
use fail::{Fail, Result};
use profile::Kind;
use registry::Object;
use threads::Scope;

/// The exported table: a data symbol, as in TCPX and TCPXO. It is TCPX's unless the library was
/// loaded with `FAKE_TCPX_PLUGIN_KIND=tcpxo`, when the constructor below puts TCPXO's in its place
/// before `dlopen` returns, so before any consumer can copy it.
#[repr(transparent)]
pub struct Table(UnsafeCell<NcclNetV7>);

// SAFETY: written only by the load-time constructor, which runs before `dlopen` returns and so
// before anything else can reach the table; read only after that.
unsafe impl Sync for Table {}

#[allow(non_upper_case_globals)]
#[unsafe(no_mangle)]
pub static ncclNetPlugin_v7: Table = Table(UnsafeCell::new(TCPX_TABLE));

/// Runs when the library is loaded (`.init_array`): the one knob read before `init`.
#[used]
#[unsafe(link_section = ".init_array")]
static SELECT_AT_LOAD: extern "C" fn() = select_at_load;

extern "C" fn select_at_load() {
    let value = std::env::var(profile::VAR).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    // A malformed value leaves TCPX's table; init then fails naming the variable, as for any knob.
    if let Ok(Kind::Tcpxo) = Kind::parse(value.as_deref()) {
        profile::select(Kind::Tcpxo);
        // SAFETY: nothing else can reach the table before `dlopen` returns (see `Table`).
        unsafe { *ncclNetPlugin_v7.0.get() = TCPXO_TABLE };
    }
}

/// TCPX's table (`nccl_plugin.cc`).
const TCPX_TABLE: NcclNetV7 = NcclNetV7 {
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

/// TCPXO's table (`fo/fastrak_plugin.cc` L358-378): `iflush` does nothing, `irecvConsumed` is NULL.
/// Its `regMrDmaBuf` is left NULL here (see README.md).
const TCPXO_TABLE: NcclNetV7 =
    NcclNetV7 { name: c"FakeFasTrak".as_ptr(), iflush: Some(fake_iflush_nothing), irecv_consumed: None, ..TCPX_TABLE };

/// Requests `isend` and `irecv` handed out in this process, over every comm.
static SENDS_POSTED: AtomicU64 = AtomicU64::new(0);
static RECEIVES_POSTED: AtomicU64 = AtomicU64::new(0);

/// Test hook, not part of the ncclNet table: the comms that hold TCPX's per-comm host memory in
/// this process now (`footprint.rs`), the bytes they hold, and the comms that ever held it. A NULL
/// pointer is skipped.
///
/// # Safety
/// Each pointer is NULL or points to a writable `u64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fake_tcpx_comms(held: *mut u64, bytes: *mut u64, made: *mut u64) {
    // SAFETY: per the contract.
    unsafe {
        if let Some(h) = held.as_mut() {
            *h = footprint::HELD_COMMS.load(Ordering::Relaxed);
        }
        if let Some(b) = bytes.as_mut() {
            *b = footprint::HELD_BYTES.load(Ordering::Relaxed);
        }
        if let Some(m) = made.as_mut() {
            *m = footprint::MADE_COMMS.load(Ordering::Relaxed);
        }
    }
}

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
            if p.cfg.kind == Kind::Tcpxo {
                // TCPXO finds the current GPU's state first (fo/fastrak_plugin.cc GetProperties L291-292).
                non_null(props, "props may not be null.")?;
                p.bind_gpu("getProperties")?;
            }
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
            // TCPX binds the listen comm to the current GPU, whose pool its flows are steered into;
            // TCPXO to the current GPU's state, whose FasTrak index goes into the handle.
            let gpu = p.bind_gpu("listen")?;
            let index = match p.cfg.kind {
                Kind::Tcpx => 0,
                Kind::Tcpxo => p.fastrak_index(gpu.as_ref())?,
            };
            let (t, inner) = p.net(dev).listen(0).map_err(|e| Fail::system(format!("listen: {e}")))?;
            let h = handle::write(p.cfg.kind, &t, dev, p.cfg.setup.data_sockets, index);
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
    send_dev_comm: *mut *mut NcclNetDeviceHandleV7,
) -> c_int {
    guard(
        "connect",
        || Scope::Control(0),
        || {
            let p = plugin::get()?;
            match p.cfg.kind {
                Kind::Tcpx => {
                    let dev = p.check_dev(dev)?;
                    let handle = non_null(handle, "handle")?.cast::<u8>();
                    let send_comm = non_null(send_comm, "sendComm")?;
                    // SAFETY: checked non-NULL; the caller passes its 128-byte handle buffer and a
                    // pointer slot.
                    unsafe { dial::poll_tcpx(p, dev, handle, send_comm) }
                }
                Kind::Tcpxo => {
                    let handle = non_null(handle, "opaqueHandle may not be null.")?.cast::<u8>();
                    let send_comm = non_null(send_comm, "sendComm may not be null.")?;
                    let send_dev_comm = non_null(send_dev_comm, "sendDevComm may not be null.")?;
                    // SAFETY: checked non-NULL; the caller passes its 128-byte handle buffer and
                    // pointer slots, *sendDevComm NULL or its device handle.
                    unsafe { dial::poll_tcpxo(p, dev, handle, send_comm, send_dev_comm) }
                }
            }
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
            let dev_handle = match p.cfg.kind {
                Kind::Tcpx => {
                    // SAFETY: checked non-NULL.
                    unsafe { recv_comm.write(std::ptr::null_mut()) };
                    let recv_dev_comm =
                        non_null(recv_dev_comm, "recvDevComm (TCPX needs it to build the unpack queue)")?;
                    // SAFETY: checked non-NULL; points at the caller's pointer slot.
                    let dev_handle = unsafe { recv_dev_comm.read() };
                    non_null(
                        dev_handle,
                        "*recvDevComm: it must point at a caller-allocated ncclNetDeviceHandle_v7_t (TCPX segfaults)",
                    )?
                }
                Kind::Tcpxo => {
                    // TCPXO finds the current GPU's state first (fo/fastrak_plugin.cc Accept L174),
                    // and writes a device handle only where *recvDevComm is not NULL (L183).
                    p.bind_gpu("accept")?;
                    let recv_dev_comm = non_null(recv_dev_comm, "recvDevComm may not be null.")?;
                    // SAFETY: checked non-NULL; points at the caller's pointer slot.
                    unsafe { recv_dev_comm.read() }
                }
            };
            let Some(Object::Listen(l)) = registry::get(listen_comm as usize) else {
                return Err(Fail::internal(format!("accept on {listen_comm:p}, which is not a listen comm")));
            };
            let Some(accepted) = registry::lock(&l)?.accept(p, dev_handle)? else { return Ok(()) };
            let accepted = match accepted {
                listen::Accepted::Recv(comm) => Object::Recv(Arc::new(Mutex::new(*comm))),
                listen::Accepted::Linear(comm) => Object::Linear(Arc::new(Mutex::new(*comm))),
            };
            let key = match &accepted {
                Object::Recv(comm) => {
                    let key = Arc::as_ptr(comm) as usize;
                    let ring = {
                        let mut c = registry::lock(comm)?;
                        c.set_key(key);
                        c.ring_base()
                    };
                    registry::add(key, accepted, Some(ring));
                    log::trace(|| {
                        // SAFETY: accept wrote the caller's device handle just above; a plain read.
                        let h = unsafe { dev_handle.read() };
                        format!(
                            "accept: recv comm {key:#x}, unpack handle {:p} (in device memory in GPU mode)",
                            h.handle
                        )
                    });
                    key
                }
                Object::Linear(comm) => {
                    let key = Arc::as_ptr(comm) as usize;
                    registry::lock(comm)?.set_key(key);
                    registry::add(key, accepted, None);
                    log::trace(|| format!("accept: recv comm {key:#x}"));
                    key
                }
                _ => return Err(Fail::internal("accept made something other than a receive comm")),
            };
            // SAFETY: checked non-NULL.
            unsafe { recv_comm.write(key as *mut c_void) };
            Ok(())
        },
    )
}

/// Runs `f` on the registrations of the send or receive comm `comm` names.
fn with_regs<T>(comm: *mut c_void, what: &str, f: impl FnOnce(&mut mr::Registrations) -> Result<T>) -> Result<T> {
    match registry::get(comm as usize) {
        Some(Object::Send(c)) => f(registry::lock(&c)?.regs()),
        Some(Object::Recv(c)) => f(registry::lock(&c)?.regs()),
        Some(Object::Linear(c)) => f(registry::lock(&c)?.regs()),
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
            let h = with_regs(comm, "regMr", |r| r.register(data, size, ty, locate))?;
            // SAFETY: checked non-NULL.
            unsafe { mhandle.write(h) };
            Ok(())
        },
    )
}

unsafe extern "C" fn fake_dereg_mr(comm: *mut c_void, mhandle: *mut c_void) -> c_int {
    guard("deregMr", || Scope::Control(comm as usize), || with_regs(comm, "deregMr", |r| r.deregister(mhandle)))
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
                return Err(Fail::internal(match profile::kind() {
                    Kind::Tcpx => format!("irecv with n = {n}: this plugin receives one buffer per request"),
                    Kind::Tcpxo => {
                        format!("PXN is not supported (fo/fastrak_plugin.cc Irecv L205): irecv with n = {n}")
                    }
                }));
            }
            let request = non_null(request, "request")?;
            let (data, sizes, mhandles) =
                (non_null(data, "data")?, non_null(sizes, "sizes")?, non_null(mhandles, "mhandles")?);
            // SAFETY: checked non-NULL; n == 1 so each array has one element.
            let (data, size, mhandle) = unsafe { (data.read(), sizes.read(), mhandles.read()) };
            let req = match registry::get(recv_comm as usize) {
                Some(Object::Recv(c)) => registry::lock(&c)?.irecv(data, size, mhandle)?,
                Some(Object::Linear(c)) => registry::lock(&c)?.irecv(data, size, mhandle)?,
                _ => return Err(Fail::internal(format!("irecv on {recv_comm:p}, which is not a receive comm"))),
            };
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

/// TCPXO's `iflush` (`fo/fastrak_plugin.cc` `Iflush` L320-324): succeeds and writes nothing, not even
/// `*request`.
unsafe extern "C" fn fake_iflush_nothing(
    _recv_comm: *mut c_void,
    _n: c_int,
    _data: *mut *mut c_void,
    _sizes: *mut c_int,
    _mhandles: *mut *mut c_void,
    _request: *mut *mut c_void,
) -> c_int {
    0
}

/// A request is a call on its comm; one no comm owns fails the call anyway.
fn request_scope(request: *mut c_void) -> Scope {
    registry::request(request as usize).map_or(Scope::Free, |(key, _, _)| Scope::Comm(key))
}

unsafe extern "C" fn fake_test(request: *mut c_void, done: *mut c_int, size: *mut c_int) -> c_int {
    guard(
        "test",
        || request_scope(request),
        || match profile::kind() {
            // SAFETY: the caller's pointers, checked before use.
            Kind::Tcpx => unsafe { test_tcpx(request, done) },
            // SAFETY: as above.
            Kind::Tcpxo => unsafe { test_tcpxo(request, done, size) },
        },
    )
}

/// TCPX's `test`: `*done` always written, `*size` never: the size is the sender's, found at offset
/// 36 of the request or as the sum of the loadMeta lengths.
///
/// # Safety
/// `done` is NULL or points at a writable int.
unsafe fn test_tcpx(request: *mut c_void, done: *mut c_int) -> Result<()> {
    let done = non_null(done, "done")?;
    let Some((_, object, slot)) = registry::request(request as usize) else {
        return Err(Fail::internal(format!("test called with invalid request {request:p}")));
    };
    let mut d = 0;
    let r = match object {
        Object::Send(c) => match registry::lock(&c)?.test(slot) {
            Ok(Tested::Done(_)) => {
                d = 1;
                Ok(())
            }
            Ok(Tested::Pending) => Ok(()),
            Ok(Tested::Failed(f)) | Err(f) => Err(f),
        },
        Object::Recv(c) => registry::lock(&c)?.test(slot, &mut d),
        _ => Err(Fail::internal("test called with invalid request")),
    };
    // SAFETY: checked non-NULL.
    unsafe { done.write(d) };
    r
}

/// TCPXO's `test` (`fo/fastrak_plugin.cc` `Test` L228-246): `*done` and, where not NULL, `*size`
/// (0 while pending, the size moved once done); a failure sets `*done` 1 and `*size` 0 and returns
/// 2, and every later test of that request returns 2 writing nothing. A request reported done was
/// freed: testing it again ends the process here.
///
/// # Safety
/// `done` is NULL or points at a writable int; `size` likewise.
unsafe fn test_tcpxo(request: *mut c_void, done: *mut c_int, size: *mut c_int) -> Result<()> {
    if request.is_null() {
        return Err(Fail::internal("request may not be null."));
    }
    let done = non_null(done, "done may not be null.")?;
    let Some((_, object, seq)) = registry::request(request as usize) else {
        if addresses::issued(request as usize) {
            return Err(fatal::fatal(format!(
                "test of request {request:p}, which test already reported done or whose comm was closed: TCPXO \
                 freed it then (fo/nccl_shim.cc Test L728, Close L975) and would read freed memory now. Test each \
                 request until it is done, and no more"
            )));
        }
        return Err(Fail::internal(format!("test called with invalid request {request:p}")));
    };
    let tested = match object {
        Object::Send(c) => registry::lock(&c)?.test(seq)?,
        Object::Linear(c) => registry::lock(&c)?.test(seq as u64)?,
        _ => return Err(Fail::internal("test called with invalid request")),
    };
    let (d, n, r) = match tested {
        Tested::Pending => (0, 0, Ok(())),
        Tested::Done(n) => (1, n, Ok(())),
        Tested::Failed(f) => (1, 0, Err(f)),
    };
    // SAFETY: `done` checked non-NULL; `size` written only where not NULL, as TCPXO does.
    unsafe {
        done.write(d);
        if !size.is_null() {
            size.write(n);
        }
    }
    r
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
            let is_comm = |o: &Object| matches!(o, Object::Send(_) | Object::Recv(_) | Object::Linear(_));
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
                // TCPXO closes without a word (fo/nccl_shim.cc Close L975); a test of one of its
                // requests after this ends the process (test_tcpxo).
                Some((Object::Linear(_), true)) => Ok(()),
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
        || {
            let p = plugin::get()?;
            if p.cfg.kind == Kind::Tcpxo {
                // TCPXO finds the current GPU's state first (fo/fastrak_plugin.cc CloseListen L307).
                p.bind_gpu("closeListen")?;
            }
            match registry::remove_if(listen_comm as usize, |o| matches!(o, Object::Listen(_))) {
                Some((_, true)) => Ok(()),
                Some((_, false)) => Err(Fail::internal("closeListen called on a send or receive comm")),
                None => {
                    Err(Fail::internal(format!("closeListen of {listen_comm:p}, which is not an open listen comm")))
                }
            }
        },
    )
}

unsafe extern "C" fn fake_get_device_mr(_comm: *mut c_void, _mhandle: *mut c_void, _dptr: *mut *mut c_void) -> c_int {
    // TCPX writes nothing here either, nor does TCPXO (fo/fastrak_plugin.cc GetDeviceMr L315).
    0
}
