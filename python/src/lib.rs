//! `uccl_tcpx._engine`: the engine's C ABI as Python functions over plain integers (engine and
//! connection handles, addresses, ids), for `uccl_tcpx.p2p` to build UCCL's `Endpoint` on.
//!
//! The engine library is not linked: `load` opens the `libuccl_tcpx.so.0` the package carries (or
//! the one `UCCL_TCPX_LIB` names), so that this module and every other user of that library in the
//! process (a NIXL plugin) share its process-wide state: one CUDA IPC table, one connection
//! registry, one notification queue. Handles are checked by the library (a stale or foreign handle
//! is an error, never a dereference), so passing integers across is safe.
//!
//! Every call that can block runs with the GIL released, and the long ones (accept, connect, the
//! wait for a transfer) in slices of at most `SLICE_MS`, checking for signals between slices, so
//! that Ctrl-C interrupts them promptly.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
// Borrowed in place: a Vec<u8> would be filled from the bytes object one element at a time.
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

/// How long one blocking slice lasts before signals are checked again.
const SLICE_MS: c_int = 50;
const FIFO_LEN: usize = 64;
/// INET6_ADDRSTRLEN, the engine's minimum for an address buffer.
const IP_BUF_LEN: usize = 46;
const IN_PROGRESS: c_int = 1;

// The 64-byte wire form of a FifoItem is its in-memory layout on a little-endian machine, which is
// what lets the blobs Python holds be handed to the C ABI as FifoItem arrays without conversion.
#[cfg(not(target_endian = "little"))]
compile_error!("the FifoItem blobs are passed through as the C struct: little-endian targets only");

/// One FifoItem as the C ABI takes it (64 bytes, 8-byte aligned).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Fifo([u8; FIFO_LEN]);

type Engine = *mut c_void;

/// `uccl_tcpx_link_stats_t` of include/uccl_engine.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LinkStats {
    link: [c_char; IP_BUF_LEN],
    reserved: [u8; 2],
    out_sockets: u32,
    in_sockets: u32,
    out_bytes: u64,
    out_pieces: u64,
    out_errors: u64,
    in_bytes: u64,
    in_pieces: u64,
    in_errors: u64,
}

/// `uccl_tcpx_conn_stats_t` of include/uccl_engine.h. The call is told this size and writes no
/// more; fields past what an older library fills stay zero.
#[repr(C)]
#[derive(Default)]
struct ConnStats {
    out_transfers: u64,
    out_bytes: u64,
    in_transfers: u64,
    in_bytes: u64,
    in_flight: u64,
    failed: u64,
    errors: [u64; 16],
    retries: u64,
    last_error: i32,
    reserved: u32,
    landed: u64,
    idle_closes: u64,
    reopens: u64,
}
type Conn = *mut c_void;

/// The C functions used, resolved once from the opened library.
struct Api {
    last_error: unsafe extern "C" fn(*mut c_char, usize) -> usize,
    status_str: unsafe extern "C" fn(c_int) -> *const c_char,
    create_on: unsafe extern "C" fn(c_int) -> Engine,
    destroy: unsafe extern "C" fn(Engine),
    get_metadata: unsafe extern "C" fn(Engine, *mut *mut c_char) -> c_int,
    free_string: unsafe extern "C" fn(*mut c_char),
    connect: unsafe extern "C" fn(Engine, *const c_char, *const c_char, c_int, bool) -> Conn,
    accept_timeout: unsafe extern "C" fn(Engine, c_int, *mut c_char, usize, *mut c_int, *mut Conn) -> c_int,
    stop_accept: unsafe extern "C" fn(Engine),
    conn_destroy: unsafe extern "C" fn(Conn),
    conn_is_local: unsafe extern "C" fn(Conn) -> bool,
    reg: unsafe extern "C" fn(Engine, usize, usize, *mut u64) -> c_int,
    mr_destroy: unsafe extern "C" fn(Engine, u64),
    prepare_fifo: unsafe extern "C" fn(Engine, u64, *const c_void, usize, *mut c_char) -> c_int,
    write_vector: VectorFn,
    read_vector: VectorFn,
    send_vector: unsafe extern "C" fn(Conn, *const u64, *const *const c_void, *const usize, c_int, *mut u64) -> c_int,
    recv_async: unsafe extern "C" fn(Conn, u64, *mut c_void, usize, *mut u64) -> c_int,
    poll: unsafe extern "C" fn(Conn, u64, *mut usize) -> c_int,
    wait: unsafe extern "C" fn(Conn, u64, c_int, *mut usize) -> c_int,
    gpu_count: unsafe extern "C" fn() -> c_int,
    default_ip: unsafe extern "C" fn(*mut c_char, usize) -> c_int,
    conn_stats: unsafe extern "C" fn(Conn, *mut ConnStats, usize) -> c_int,
    conn_link_stats: unsafe extern "C" fn(Conn, *mut LinkStats, usize, usize) -> c_int,
    prepare: unsafe extern "C" fn(Conn, *const Fifo, *mut bool) -> c_int,
}

type VectorFn = unsafe extern "C" fn(
    Conn,
    *const u64,
    *const *mut c_void,
    *const usize,
    *const Fifo,
    c_int,
    *mut u64,
    *const *mut c_char,
) -> c_int;

static API: OnceLock<Api> = OnceLock::new();

fn api() -> PyResult<&'static Api> {
    API.get().ok_or_else(|| PyRuntimeError::new_err("the uccl-tcpx engine library is not loaded"))
}

/// This thread's last error from the engine library, prefixed by the status's name.
fn engine_error(api: &Api, status: c_int) -> String {
    let mut buf = vec![0 as c_char; 1024];
    // SAFETY: the buffer holds buf.len() bytes; the function writes at most that, NUL included.
    let full = unsafe { (api.last_error)(buf.as_mut_ptr(), buf.len()) };
    if full >= buf.len() {
        buf = vec![0 as c_char; full + 1];
        // SAFETY: as above, with room for the whole message.
        unsafe { (api.last_error)(buf.as_mut_ptr(), buf.len()) };
    }
    // SAFETY: the library NUL-terminated the buffer.
    let message = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    if status >= 0 {
        return message;
    }
    // SAFETY: the library returns a static string for any number.
    let name = unsafe { CStr::from_ptr((api.status_str)(status)) }.to_string_lossy();
    format!("{message} ({name})")
}

pyo3::create_exception!(
    _engine,
    EngineError,
    PyRuntimeError,
    "A call into the engine failed; `status` holds its (negative) status, or None where the call returns a handle."
);

/// A failed engine call's status and message, read on the thread that made the call (the library
/// keeps the last error per thread), to be raised once the GIL is held again.
struct Failure(Option<c_int>, String);

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        let err = EngineError::new_err(f.1);
        Python::attach(|py| match err.value(py).setattr("status", f.0) {
            Ok(()) => err,
            Err(e) => e,
        })
    }
}

fn check(api: &Api, rc: c_int) -> Result<c_int, Failure> {
    if rc < 0 { Err(Failure(Some(rc), engine_error(api, rc))) } else { Ok(rc) }
}

fn c_string(s: &str, what: &str) -> PyResult<CString> {
    CString::new(s).map_err(|_| PyValueError::new_err(format!("{what} contains a NUL byte")))
}

fn as_engine(handle: usize) -> Engine {
    handle as Engine
}

fn as_conn(handle: usize) -> Conn {
    handle as Conn
}

fn fifo_of(meta: &[u8]) -> PyResult<Fifo> {
    let bytes: [u8; FIFO_LEN] = meta.try_into().map_err(|_| {
        PyValueError::new_err(format!("meta must be exactly 64 bytes (serialized FifoItem), got {}", meta.len()))
    })?;
    Ok(Fifo(bytes))
}

/// Opens the engine library at `path` (once per process; later calls must name the same file).
#[pyfunction]
fn load(path: &str) -> PyResult<()> {
    if API.get().is_some() {
        return Ok(());
    }
    // SAFETY: the library's initializers are the Rust runtime's and its logger's; opening it runs
    // nothing else.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| PyRuntimeError::new_err(format!("cannot open the uccl-tcpx engine library {path}: {e}")))?;
    // The library stays mapped for the process's life (it is built with -z nodelete anyway), so
    // the function pointers below never dangle.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: each symbol is declared above with the signature include/uccl_engine.h gives it.
            *unsafe { lib.get($name) }.map_err(|e| {
                PyRuntimeError::new_err(format!(
                    "{path} lacks {}: {e} (an engine library older than this package?)",
                    String::from_utf8_lossy(&$name[..$name.len() - 1])
                ))
            })?
        };
    }
    let api = Api {
        last_error: sym!(b"uccl_engine_last_error\0"),
        status_str: sym!(b"uccl_engine_status_str\0"),
        create_on: sym!(b"uccl_tcpx_engine_create_on\0"),
        destroy: sym!(b"uccl_engine_destroy\0"),
        get_metadata: sym!(b"uccl_engine_get_metadata\0"),
        free_string: sym!(b"uccl_engine_free_string\0"),
        connect: sym!(b"uccl_engine_connect\0"),
        accept_timeout: sym!(b"uccl_tcpx_accept_timeout\0"),
        stop_accept: sym!(b"uccl_engine_stop_accept\0"),
        conn_destroy: sym!(b"uccl_engine_conn_destroy\0"),
        conn_is_local: sym!(b"uccl_engine_conn_is_local\0"),
        reg: sym!(b"uccl_engine_reg\0"),
        mr_destroy: sym!(b"uccl_engine_mr_destroy\0"),
        prepare_fifo: sym!(b"uccl_engine_prepare_fifo\0"),
        write_vector: sym!(b"uccl_engine_write_vector\0"),
        read_vector: sym!(b"uccl_engine_read_vector\0"),
        send_vector: sym!(b"uccl_engine_send_vector\0"),
        recv_async: sym!(b"uccl_engine_recv_async\0"),
        poll: sym!(b"uccl_engine_poll\0"),
        wait: sym!(b"uccl_tcpx_wait\0"),
        gpu_count: sym!(b"uccl_tcpx_gpu_count\0"),
        default_ip: sym!(b"uccl_tcpx_default_ip\0"),
        conn_stats: sym!(b"uccl_tcpx_conn_stats\0"),
        prepare: sym!(b"uccl_tcpx_prepare\0"),
        conn_link_stats: sym!(b"uccl_tcpx_conn_link_stats\0"),
    };
    let _ = API.set(api);
    Ok(())
}

/// The number of CUDA devices visible; 0 without a CUDA driver.
#[pyfunction]
fn gpu_count(py: Python<'_>) -> PyResult<i32> {
    let api = api()?;
    // SAFETY: no arguments; never fails. Detached: loading the CUDA driver takes a moment.
    Ok(py.detach(|| unsafe { (api.gpu_count)() }))
}

/// The IP an engine created now would advertise.
#[pyfunction]
fn default_ip() -> PyResult<String> {
    let api = api()?;
    let mut buf = [0 as c_char; IP_BUF_LEN];
    // SAFETY: the buffer holds IP_BUF_LEN bytes, the minimum the function asks for.
    check(api, unsafe { (api.default_ip)(buf.as_mut_ptr(), buf.len()) })?;
    // SAFETY: NUL-terminated by the call on success.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Creates an engine for GPU `gpu` (-1: the default rules, -2: none until a device registration).
#[pyfunction]
fn create(py: Python<'_>, gpu: i32) -> PyResult<usize> {
    let api = api()?;
    let made = py.detach(|| {
        // SAFETY: plain integer argument.
        let e = unsafe { (api.create_on)(gpu) };
        if e.is_null() { Err(Failure(None, engine_error(api, 0))) } else { Ok(e as usize) }
    })?;
    Ok(made)
}

/// Destroys an engine (closing its connections). Unknown handles are ignored.
#[pyfunction]
fn destroy(py: Python<'_>, engine: usize) -> PyResult<()> {
    let api = api()?;
    // SAFETY: the library checks the handle.
    py.detach(|| unsafe { (api.destroy)(as_engine(engine)) });
    Ok(())
}

/// The engine's metadata string, `ip:port?gpu`.
#[pyfunction]
fn metadata(engine: usize) -> PyResult<String> {
    let api = api()?;
    let mut text: *mut c_char = std::ptr::null_mut();
    // SAFETY: the library checks the handle and writes a string it allocated.
    check(api, unsafe { (api.get_metadata)(as_engine(engine), &mut text) })?;
    // SAFETY: a NUL-terminated string from the library, freed right after the copy.
    let s = unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned();
    // SAFETY: as above.
    unsafe { (api.free_string)(text) };
    Ok(s)
}

/// Connects to `ip:port`; returns the connection handle. Runs on a helper thread, so that a
/// signal interrupts the caller's wait; a connection that completes after that is closed.
#[pyfunction]
fn connect(py: Python<'_>, engine: usize, ip: &str, remote_gpu: &str, port: i32) -> PyResult<usize> {
    let api = api()?;
    let (ip, gpu) = (c_string(ip, "remote_ip_addr")?, c_string(remote_gpu, "remote_gpu")?);
    // A rendezvous channel: an outcome is never left buffered in it, so a connection is either
    // taken here or handed back to the thread (a send fails once the receiver is gone) to close.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<usize, Failure>>(0);
    std::thread::Builder::new()
        .name("uccl-connect".into())
        .spawn(move || {
            // SAFETY: valid C strings; the library checks the handle.
            let c = unsafe { (api.connect)(as_engine(engine), ip.as_ptr(), gpu.as_ptr(), port, false) };
            let outcome = if c.is_null() { Err(Failure(None, engine_error(api, 0))) } else { Ok(c as usize) };
            if let Err(std::sync::mpsc::SendError(Ok(c))) = tx.send(outcome) {
                // SAFETY: the handle just made; nobody else holds it.
                unsafe { (api.conn_destroy)(as_conn(c)) };
            }
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start a connect thread: {e}")))?;
    let mut rx = rx;
    loop {
        // The receiver is moved in and out: it may be used from one thread at a time only.
        let (got, back) = py.detach(move || (rx.recv_timeout(Duration::from_millis(SLICE_MS as u64)), rx));
        rx = back;
        match got {
            Ok(outcome) => return Ok(outcome?),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(interrupted) = py.check_signals() {
                    // The connect may have completed since the timeout, its thread waiting to hand
                    // the connection over: it is nobody's once this returns, so it is closed here.
                    if let Ok(Ok(c)) = rx.try_recv() {
                        // SAFETY: the handle the connect thread made; nobody else holds it.
                        py.detach(|| unsafe { (api.conn_destroy)(as_conn(c)) });
                    }
                    return Err(interrupted);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err("the connect thread ended without an outcome"));
            }
        }
    }
}

/// When a wait of `timeout_ms` started now ends; None for no limit, or for one so far off that
/// the clock cannot represent it.
fn deadline_after(timeout_ms: Option<u64>) -> Option<std::time::Instant> {
    timeout_ms.and_then(|ms| std::time::Instant::now().checked_add(Duration::from_millis(ms)))
}

/// Waits for a peer: `(conn, ip, gpu_idx)`, or None when `timeout_ms` (None: no limit) passed
/// first. Raises when accepting was stopped or failed.
#[pyfunction]
#[pyo3(signature = (engine, timeout_ms=None))]
fn accept(py: Python<'_>, engine: usize, timeout_ms: Option<u64>) -> PyResult<Option<(usize, String, i32)>> {
    let api = api()?;
    let deadline = deadline_after(timeout_ms);
    loop {
        let slice = match deadline {
            None => SLICE_MS,
            Some(d) => {
                d.saturating_duration_since(std::time::Instant::now()).as_millis().min(SLICE_MS as u128) as c_int
            }
        };
        let got = py.detach(|| {
            let mut ip = [0 as c_char; IP_BUF_LEN];
            let (mut gpu, mut conn): (c_int, Conn) = (0, std::ptr::null_mut());
            // SAFETY: buffers of the sizes given; the library checks the handle.
            let rc = unsafe {
                (api.accept_timeout)(as_engine(engine), slice, ip.as_mut_ptr(), ip.len(), &mut gpu, &mut conn)
            };
            check(api, rc)?;
            if rc == IN_PROGRESS {
                return Ok(None);
            }
            // SAFETY: NUL-terminated by the call on success.
            let ip = unsafe { CStr::from_ptr(ip.as_ptr()) }.to_string_lossy().into_owned();
            Ok::<_, Failure>(Some((conn as usize, ip, gpu)))
        })?;
        if got.is_some() {
            return Ok(got);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(None);
        }
        py.check_signals()?;
    }
}

/// Makes accepts of this engine (blocked or later) fail promptly.
#[pyfunction]
fn stop_accept(engine: usize) -> PyResult<()> {
    let api = api()?;
    // SAFETY: the library checks the handle.
    unsafe { (api.stop_accept)(as_engine(engine)) };
    Ok(())
}

/// Closes a connection. Unknown handles are ignored.
#[pyfunction]
fn conn_destroy(py: Python<'_>, conn: usize) -> PyResult<()> {
    let api = api()?;
    // SAFETY: the library checks the handle.
    py.detach(|| unsafe { (api.conn_destroy)(as_conn(conn)) });
    Ok(())
}

/// Whether the peer of `conn` runs on this host.
#[pyfunction]
fn conn_is_local(conn: usize) -> PyResult<bool> {
    let api = api()?;
    // SAFETY: the library checks the handle.
    Ok(unsafe { (api.conn_is_local)(as_conn(conn)) })
}

/// Registers `[ptr, ptr + size)`; returns the region id.
#[pyfunction]
fn reg(py: Python<'_>, engine: usize, ptr: usize, size: usize) -> PyResult<u64> {
    let api = api()?;
    let mr = py.detach(|| {
        let mut mr = 0u64;
        // SAFETY: the library checks the handle and the range; `mr` is writable.
        check(api, unsafe { (api.reg)(as_engine(engine), ptr, size, &mut mr) }).map(|_| mr)
    })?;
    Ok(mr)
}

/// Deregisters a region (a fence: afterwards no engine thread touches it).
#[pyfunction]
fn dereg(py: Python<'_>, engine: usize, mr: u64) -> PyResult<()> {
    let api = api()?;
    // SAFETY: the library checks the handle and the id.
    py.detach(|| unsafe { (api.mr_destroy)(as_engine(engine), mr) });
    Ok(())
}

/// The 64-byte capability for `[ptr, ptr + size)` of region `mr`.
#[pyfunction]
fn prepare_fifo<'py>(
    py: Python<'py>,
    engine: usize,
    mr: u64,
    ptr: usize,
    size: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let api = api()?;
    let mut out = [0u8; FIFO_LEN];
    // SAFETY: `out` holds the 64 bytes the call writes; the library checks the rest.
    check(api, unsafe {
        (api.prepare_fifo)(as_engine(engine), mr, ptr as *const c_void, size, out.as_mut_ptr().cast())
    })?;
    Ok(PyBytes::new(py, &out))
}

fn post_vector(
    py: Python<'_>,
    conn: usize,
    write: bool,
    mrs: &[u64],
    ptrs: &[usize],
    sizes: &[usize],
    fifos: &[Fifo],
) -> PyResult<u64> {
    let api = api()?;
    let n = mrs.len();
    if n == 0 || ptrs.len() != n || sizes.len() != n || fifos.len() != n {
        return Err(PyValueError::new_err(format!(
            "every list must have the same, non-zero length (got {n}, {}, {}, {})",
            ptrs.len(),
            sizes.len(),
            fifos.len()
        )));
    }
    let count =
        c_int::try_from(n).map_err(|_| PyValueError::new_err(format!("{n} items are too many for one call")))?;
    let f = if write { api.write_vector } else { api.read_vector };
    let post = || {
        let mut id = 0u64;
        // SAFETY: four arrays of `n` elements each; the pointers are the caller's registered
        // memory, which the engine checks against its registrations.
        let rc = unsafe {
            f(
                as_conn(conn),
                mrs.as_ptr(),
                ptrs.as_ptr().cast(),
                sizes.as_ptr(),
                fifos.as_ptr(),
                count,
                &mut id,
                std::ptr::null(),
            )
        };
        check(api, rc).map(|_| id)
    };
    // Detached even for one item: on a same-host connection the engine may copy the data inside
    // the post, and a copy of gigabytes must not stop every other Python thread.
    Ok(py.detach(post)?)
}

/// Posts one one-sided write (`write=True`) or read of `size` bytes at `ptr` against the remote
/// range the 64-byte `meta` describes; returns the transfer id.
#[pyfunction]
fn post(py: Python<'_>, conn: usize, write: bool, mr: u64, ptr: usize, size: usize, meta: &[u8]) -> PyResult<u64> {
    post_vector(py, conn, write, &[mr], &[ptr], &[size], &[fifo_of(meta)?])
}

/// Posts one-sided writes or reads of several items under one transfer id.
#[pyfunction]
fn postv(
    py: Python<'_>,
    conn: usize,
    write: bool,
    mrs: Vec<u64>,
    ptrs: Vec<usize>,
    sizes: Vec<usize>,
    metas: Vec<PyBackedBytes>,
) -> PyResult<u64> {
    let fifos = metas.iter().map(|m| fifo_of(m)).collect::<PyResult<Vec<_>>>()?;
    post_vector(py, conn, write, &mrs, &ptrs, &sizes, &fifos)
}

/// `post` for a caller that checked its arguments already (the one-item fast path of
/// `write_async` and its kin): the 64-byte `meta` is sent with its size field set to `size`, as
/// UCCL's one-sided calls do, without Python building that copy.
#[pyfunction]
fn post_sized(
    py: Python<'_>,
    conn: usize,
    write: bool,
    mr: u64,
    ptr: usize,
    size: usize,
    meta: &[u8],
) -> PyResult<u64> {
    let mut fifo = fifo_of(meta)?;
    let size32 = u32::try_from(size)
        .map_err(|_| PyRuntimeError::new_err(format!("size {size} exceeds a FifoItem's 32-bit size field")))?;
    fifo.0[8..12].copy_from_slice(&size32.to_le_bytes());
    post_vector(py, conn, write, &[mr], &[ptr], &[size], &[fifo])
}

/// `poll` reduced to one object: the status (1 in progress, 0 done) as an int, or, for a failed
/// transfer, the engine's message as a str. No tuple is built for the common answers.
#[pyfunction]
fn poll_status(py: Python<'_>, conn: usize, id: u64) -> PyResult<Py<PyAny>> {
    let api = api()?;
    // Detached: on a same-host connection the engine copies inside the poll.
    let (rc, error) = py.detach(|| {
        let mut bytes = 0usize;
        // SAFETY: the library checks the handle and the id; `bytes` is writable.
        let rc = unsafe { (api.poll)(as_conn(conn), id, &mut bytes) };
        if rc == IN_PROGRESS {
            std::thread::yield_now();
        }
        (rc, (rc < 0).then(|| engine_error(api, rc)))
    });
    Ok(match error {
        Some(message) => message.into_pyobject(py)?.into_any().unbind(),
        None => rc.into_pyobject(py)?.into_any().unbind(),
    })
}

/// The numpy array interface (`__array_struct__`'s PyArrayInterface, numpy's ABI since 1.0).
#[repr(C)]
struct ArrayInterface {
    two: c_int,
    nd: c_int,
    typekind: c_char,
    itemsize: c_int,
    flags: c_int,
    shape: *const isize,
    strides: *const isize,
    data: *mut c_void,
    descr: *mut pyo3::ffi::PyObject,
}

/// NPY_ARRAY_WRITEABLE.
const NPY_WRITEABLE: c_int = 0x0400;

/// `(address, bytes)` of a writable, C-contiguous numeric array of exactly `ndarray`'s type, read
/// from its `__array_struct__` capsule; None for anything else (which the caller then examines
/// the slow way, with its exact messages). Never raises.
fn array_range(obj: &Bound<'_, PyAny>, ndarray: &Bound<'_, PyAny>) -> Option<(usize, usize)> {
    if !obj.get_type().is(ndarray) {
        return None;
    }
    let capsule = obj.getattr(pyo3::intern!(obj.py(), "__array_struct__")).ok()?;
    let capsule = capsule.cast::<pyo3::types::PyCapsule>().ok()?;
    let ptr = capsule.pointer_checked(None).ok()?;
    // SAFETY: numpy's __array_struct__ capsule holds a PyArrayInterface that lives as long as the
    // capsule, which is held here.
    let ai = unsafe { &*(ptr.as_ptr() as *const ArrayInterface) };
    // Only kinds whose typestr carries the item size in bytes (as the slow path reads it).
    if ai.two != 2 || ai.flags & NPY_WRITEABLE == 0 || !b"biufc".contains(&(ai.typekind as u8)) || ai.itemsize <= 0 {
        return None;
    }
    let nd = usize::try_from(ai.nd).ok()?;
    if nd > 0 && ai.shape.is_null() {
        return None;
    }
    // SAFETY: `nd` entries, per the interface (strides may be NULL: C order).
    let shape = if nd == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(ai.shape, nd) } };
    let strides = if ai.strides.is_null() || nd == 0 {
        None
    } else {
        // SAFETY: `nd` entries, per the interface, when not NULL.
        Some(unsafe { std::slice::from_raw_parts(ai.strides, nd) })
    };
    let mut size = ai.itemsize as usize;
    for &d in shape {
        size = size.checked_mul(usize::try_from(d).ok()?)?;
    }
    if let Some(strides) = strides
        && !shape.contains(&0)
    {
        let mut expected = ai.itemsize as isize;
        for (&d, &s) in shape.iter().zip(strides).rev() {
            if d != 1 && s != expected {
                return None;
            }
            expected = expected.checked_mul(d)?;
        }
    }
    Some((ai.data as usize, size))
}

/// For each object of `objs`: `(address, bytes)` where it is a plain writable C-contiguous numpy
/// array (`ndarray` is numpy's type, or None), else None. One call for a whole list.
#[pyfunction]
fn array_ranges<'py>(
    py: Python<'py>,
    ndarray: Bound<'py, PyAny>,
    objs: Bound<'py, pyo3::types::PyList>,
) -> PyResult<Bound<'py, pyo3::types::PyList>> {
    let out = pyo3::types::PyList::empty(py);
    for obj in objs.iter() {
        match array_range(&obj, &ndarray) {
            Some(r) => out.append(r)?,
            None => out.append(py.None())?,
        }
    }
    Ok(out)
}

/// Reads `obj.name` as an integer of type T; None when absent or not one.
fn int_attr<'py, T: for<'a> FromPyObject<'a, 'py>>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, pyo3::types::PyString>,
) -> Option<T> {
    let v = obj.getattr(name).ok()?;
    if !v.is_exact_instance_of::<pyo3::types::PyInt>() {
        return None;
    }
    v.extract::<T>().ok()
}

/// Eight u32 keys from a list of exactly eight ints; None otherwise.
fn keys8(v: &Bound<'_, PyAny>) -> Option<[u32; 8]> {
    let list = v.cast_exact::<pyo3::types::PyList>().ok()?;
    if list.len() != 8 {
        return None;
    }
    let mut keys = [0u32; 8];
    for (k, item) in keys.iter_mut().zip(list.iter()) {
        if !item.is_exact_instance_of::<pyo3::types::PyInt>() {
            return None;
        }
        *k = item.extract().ok()?;
    }
    Some(keys)
}

/// UCCL's serialized form of descriptors that all carry eight keys each way and no IPC part
/// (what register_memory and deserialize_descs give): count (u64) then, per descriptor, addr,
/// size, 8 (u64 each), the lkeys and rkeys (u32 each) and an empty IPC part (u64 0). None when
/// any descriptor is otherwise, for the caller's general path.
#[pyfunction]
fn serialize_descs<'py>(
    py: Python<'py>,
    descs: Bound<'py, pyo3::types::PyList>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let DescAttrs { addr, size, lkeys, rkeys, ipc, .. } = DescAttrs::new(py);
    let mut out = Vec::with_capacity(8 + descs.len() * DESC_LEN);
    out.extend_from_slice(&(descs.len() as u64).to_le_bytes());
    for d in descs.iter() {
        let empty_ipc =
            d.getattr(ipc).ok().and_then(|v| v.cast_exact::<PyBytes>().ok().map(|b| b.as_bytes().is_empty()));
        let (Some(a), Some(s), Some(l), Some(r), Some(true)) = (
            int_attr::<u64>(&d, addr),
            int_attr::<u64>(&d, size),
            d.getattr(lkeys).ok().as_ref().and_then(keys8),
            d.getattr(rkeys).ok().as_ref().and_then(keys8),
            empty_ipc,
        ) else {
            return Ok(None);
        };
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&8u64.to_le_bytes());
        for k in l.iter().chain(r.iter()) {
            out.extend_from_slice(&k.to_le_bytes());
        }
        out.extend_from_slice(&0u64.to_le_bytes());
    }
    Ok(Some(PyBytes::new(py, &out)))
}

/// The descriptor list of a blob `serialize_descs` could have written (every descriptor with eight
/// keys each way and no IPC part): each one made by `new(cls)` and given `addr`, `size`,
/// `mr_id` 0, `lkeys`, `rkeys` and an empty `_ipc_info`. None, making nothing, for any other
/// blob (empty, short, or holding other descriptors), which the caller parses itself.
#[pyfunction]
fn deserialize_descs<'py>(
    py: Python<'py>,
    blob: &[u8],
    new: Bound<'py, PyAny>,
    cls: Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, pyo3::types::PyList>>> {
    let u64_at = |at: usize| u64::from_le_bytes(blob[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(blob[at..at + 4].try_into().expect("4 bytes"));
    if blob.len() < 8 {
        return Ok(None);
    }
    let n = u64_at(0);
    // Every descriptor must be there in full: checked before anything is made.
    if n > ((blob.len() - 8) / DESC_LEN) as u64 {
        return Ok(None);
    }
    let n = n as usize;
    for i in 0..n {
        let at = 8 + i * DESC_LEN;
        if u64_at(at + 16) != 8 || u64_at(at + DESC_LEN - 8) != 0 {
            return Ok(None);
        }
    }
    let DescAttrs { addr: addr_s, size: size_s, mr_id: mr_id_s, lkeys: lkeys_s, rkeys: rkeys_s, ipc: ipc_s } =
        DescAttrs::new(py);
    let empty = PyBytes::new(py, b"");
    let zero = 0u64.into_pyobject(py)?;
    let out = pyo3::types::PyList::empty(py);
    // The descriptors of one registration carry the same keys, and lkeys and rkeys are equal in
    // ours: their int objects (immutable) are made once and shared; every list is its own.
    let mut cached: Vec<([u32; 8], Vec<Bound<'py, pyo3::types::PyInt>>)> = Vec::new();
    let mut keys_at = |from: usize| -> PyResult<Bound<'py, pyo3::types::PyList>> {
        let mut keys = [0u32; 8];
        for (k, key) in keys.iter_mut().enumerate() {
            *key = u32_at(from + 4 * k);
        }
        if let Some((_, ints)) = cached.iter().find(|(k, _)| *k == keys) {
            return pyo3::types::PyList::new(py, ints);
        }
        let ints = keys.iter().map(|k| k.into_pyobject(py)).collect::<Result<Vec<_>, _>>()?;
        let list = pyo3::types::PyList::new(py, &ints);
        // A few key sets are kept (a blob may alternate between registrations).
        if cached.len() == 4 {
            cached.remove(0);
        }
        cached.push((keys, ints));
        list
    };
    for i in 0..n {
        let at = 8 + i * DESC_LEN;
        let d = new.call1((&cls,))?;
        d.setattr(addr_s, u64_at(at))?;
        d.setattr(size_s, u64_at(at + 8))?;
        d.setattr(mr_id_s, &zero)?;
        d.setattr(lkeys_s, keys_at(at + 24)?)?;
        d.setattr(rkeys_s, keys_at(at + 56)?)?;
        d.setattr(ipc_s, &empty)?;
        out.append(d)?;
    }
    Ok(Some(out))
}

/// register_memory's descriptors, one per `(addr, size)` of `ranges` with the registration at the
/// same index of `regions` (a `_Region`, or None where registering failed). Each is made by
/// `new(cls)`; one with a registration gets the next id of `ids` (an iterator of ints) as its
/// `mr_id`, entered in `mrs` as `(region.mr, region)`, and copies of `region.keys` as `lkeys` and
/// `rkeys`; one without gets `mr_id` 2**64-1 and no keys. The caller holds the endpoint's lock.
#[pyfunction]
fn make_descs<'py>(
    py: Python<'py>,
    new: Bound<'py, PyAny>,
    cls: Bound<'py, PyAny>,
    ranges: Bound<'py, pyo3::types::PyList>,
    regions: Bound<'py, pyo3::types::PyList>,
    mrs: Bound<'py, pyo3::types::PyDict>,
    ids: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, pyo3::types::PyList>> {
    if ranges.len() != regions.len() {
        return Err(PyValueError::new_err("ranges and regions must have the same length"));
    }
    let DescAttrs { addr: addr_s, size: size_s, mr_id: mr_id_s, lkeys: lkeys_s, rkeys: rkeys_s, ipc: ipc_s } =
        DescAttrs::new(py);
    let (mr_s, keys_s) = (pyo3::intern!(py, "mr"), pyo3::intern!(py, "keys"));
    let empty = PyBytes::new(py, b"");
    let no_mr = u64::MAX.into_pyobject(py)?;
    let out = pyo3::types::PyList::empty(py);
    for (range, region) in ranges.iter().zip(regions.iter()) {
        let d = new.call1((&cls,))?;
        d.setattr(addr_s, range.get_item(0)?)?;
        d.setattr(size_s, range.get_item(1)?)?;
        d.setattr(ipc_s, &empty)?;
        if region.is_none() {
            d.setattr(mr_id_s, &no_mr)?;
            d.setattr(lkeys_s, pyo3::types::PyList::empty(py))?;
            d.setattr(rkeys_s, pyo3::types::PyList::empty(py))?;
        } else {
            let id = ids.call_method0(pyo3::intern!(py, "__next__"))?;
            mrs.set_item(&id, (region.getattr(mr_s)?, &region))?;
            d.setattr(mr_id_s, id)?;
            let keys = region.getattr(keys_s)?;
            let keys = keys.cast::<pyo3::types::PyList>()?;
            d.setattr(lkeys_s, keys.get_slice(0, keys.len()))?;
            d.setattr(rkeys_s, keys.get_slice(0, keys.len()))?;
        }
        out.append(d)?;
    }
    Ok(out)
}

/// Bytes of one serialized descriptor with eight keys each way and no IPC part.
const DESC_LEN: usize = 8 * 3 + 4 * 16 + 8;

/// The attribute names of UCCL's `XferDesc`, interned once per call of the functions that read or
/// make descriptors.
struct DescAttrs<'py> {
    addr: &'py Bound<'py, pyo3::types::PyString>,
    size: &'py Bound<'py, pyo3::types::PyString>,
    mr_id: &'py Bound<'py, pyo3::types::PyString>,
    lkeys: &'py Bound<'py, pyo3::types::PyString>,
    rkeys: &'py Bound<'py, pyo3::types::PyString>,
    ipc: &'py Bound<'py, pyo3::types::PyString>,
}

impl<'py> DescAttrs<'py> {
    fn new(py: Python<'py>) -> DescAttrs<'py> {
        DescAttrs {
            addr: pyo3::intern!(py, "addr"),
            size: pyo3::intern!(py, "size"),
            mr_id: pyo3::intern!(py, "mr_id"),
            lkeys: pyo3::intern!(py, "lkeys"),
            rkeys: pyo3::intern!(py, "rkeys"),
            ipc: pyo3::intern!(py, "_ipc_info"),
        }
    }
}

/// The arrays of a `transfer()`: for each pair, the local descriptor's engine region (looked up
/// by its `mr_id` in `mrs`, whose values are `(engine mr, ...)`), address and size, and the
/// FifoItem the remote descriptor stands for (its address, its size capped at 32 bits, its eight
/// rkeys). Posts them as one vector transfer and returns its id; None, posting nothing, when any
/// pair is not of that plain form, for the caller's general path and its messages.
#[pyfunction]
fn post_descs(
    py: Python<'_>,
    conn: usize,
    write: bool,
    locals: Bound<'_, pyo3::types::PyList>,
    remotes: Bound<'_, pyo3::types::PyList>,
    mrs: Bound<'_, pyo3::types::PyDict>,
) -> PyResult<Option<u64>> {
    let n = locals.len();
    if n == 0 || remotes.len() != n {
        return Ok(None);
    }
    let DescAttrs { addr: addr_s, size: size_s, mr_id: mr_id_s, rkeys: rkeys_s, .. } = DescAttrs::new(py);
    let (mut mr_v, mut ptr_v, mut size_v, mut fifo_v) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (local, remote) in locals.iter().zip(remotes.iter()) {
        let Some(entry) = local.getattr(mr_id_s).ok().and_then(|id| mrs.get_item(id).ok().flatten()) else {
            return Ok(None);
        };
        let Some(mr) = entry
            .cast_exact::<pyo3::types::PyTuple>()
            .ok()
            .and_then(|t| t.get_item(0).ok())
            .and_then(|m| m.extract::<u64>().ok())
        else {
            return Ok(None);
        };
        let (Some(ptr), Some(size), Some(raddr), Some(rsize), Some(keys)) = (
            int_attr::<usize>(&local, addr_s),
            int_attr::<usize>(&local, size_s),
            int_attr::<u64>(&remote, addr_s),
            int_attr::<u64>(&remote, size_s),
            remote.getattr(rkeys_s).ok().as_ref().and_then(keys8),
        ) else {
            return Ok(None);
        };
        let mut fifo = [0u8; FIFO_LEN];
        fifo[0..8].copy_from_slice(&raddr.to_le_bytes());
        fifo[8..12].copy_from_slice(&(rsize.min(u32::MAX as u64) as u32).to_le_bytes());
        for (i, k) in keys.iter().enumerate() {
            fifo[32 + 4 * i..36 + 4 * i].copy_from_slice(&k.to_le_bytes());
        }
        mr_v.push(mr);
        ptr_v.push(ptr);
        size_v.push(size);
        fifo_v.push(Fifo(fifo));
    }
    post_vector(py, conn, write, &mr_v, &ptr_v, &size_v, &fifo_v).map(Some)
}

/// The arrays of a `writev`/`readv` in their plain form, handled here in one pass: `mr_ids`
/// (looked up in `mrs`, whose values are `(engine mr, ...)`), `ptrs` and `sizes` lists of ints,
/// `metas` a list of 64-byte `bytes`, each sent with its size field set to its item's size, as
/// UCCL's vector calls do. Posts them as one vector transfer and returns its id; None, posting
/// nothing, when any entry is not of that form (or a size exceeds 32 bits), for the caller's
/// general path and its messages.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the Python call's own arguments, one each
fn postv_plain(
    py: Python<'_>,
    conn: usize,
    write: bool,
    mrs: Bound<'_, pyo3::types::PyDict>,
    mr_ids: Bound<'_, PyAny>,
    ptrs: Bound<'_, PyAny>,
    sizes: Bound<'_, PyAny>,
    metas: Bound<'_, PyAny>,
) -> PyResult<Option<u64>> {
    use pyo3::types::{PyBytes, PyInt, PyList, PyTuple};
    let lists = (mr_ids.cast_exact::<PyList>(), ptrs.cast_exact::<PyList>(), sizes.cast_exact::<PyList>());
    let (Ok(mr_ids), Ok(ptrs), Ok(sizes), Ok(metas)) = (lists.0, lists.1, lists.2, metas.cast_exact::<PyList>()) else {
        return Ok(None);
    };
    let n = mr_ids.len();
    if n == 0 || ptrs.len() != n || sizes.len() != n || metas.len() != n {
        return Ok(None);
    }
    let int = |v: Bound<'_, PyAny>| v.cast_exact::<PyInt>().ok().and_then(|i| i.extract::<u64>().ok());
    let (mut mr_v, mut ptr_v, mut size_v, mut fifo_v) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    // The last id and its engine region: a vector names one region over and over.
    let mut last: Option<(u64, u64)> = None;
    for i in 0..n {
        let (Some(id), Some(ptr), Some(size)) =
            (int(mr_ids.get_item(i)?), int(ptrs.get_item(i)?), int(sizes.get_item(i)?))
        else {
            return Ok(None);
        };
        let mr = match last {
            Some((known, mr)) if known == id => mr,
            _ => {
                let Some(mr) = mrs
                    .get_item(id)?
                    .as_ref()
                    .and_then(|e| e.cast_exact::<PyTuple>().ok())
                    .and_then(|t| t.get_item(0).ok())
                    .and_then(|m| m.extract::<u64>().ok())
                else {
                    return Ok(None);
                };
                last = Some((id, mr));
                mr
            }
        };
        let meta = metas.get_item(i)?;
        let (Ok(meta), Ok(size32), Ok(ptr), Ok(size)) =
            (meta.cast_exact::<PyBytes>(), u32::try_from(size), usize::try_from(ptr), usize::try_from(size))
        else {
            return Ok(None);
        };
        let Ok(mut fifo) = <[u8; FIFO_LEN]>::try_from(meta.as_bytes()) else {
            return Ok(None);
        };
        fifo[8..12].copy_from_slice(&size32.to_le_bytes());
        mr_v.push(mr);
        ptr_v.push(ptr);
        size_v.push(size);
        fifo_v.push(Fifo(fifo));
    }
    post_vector(py, conn, write, &mr_v, &ptr_v, &size_v, &fifo_v).map(Some)
}

/// Sends messages (each matched by one peer receive) under one transfer id.
#[pyfunction]
fn send(py: Python<'_>, conn: usize, mrs: Vec<u64>, ptrs: Vec<usize>, sizes: Vec<usize>) -> PyResult<u64> {
    let api = api()?;
    let n = mrs.len();
    if n == 0 || ptrs.len() != n || sizes.len() != n {
        return Err(PyValueError::new_err("mrs, ptrs and sizes must have the same, non-zero length"));
    }
    let count =
        c_int::try_from(n).map_err(|_| PyValueError::new_err(format!("{n} items are too many for one call")))?;
    let id = py.detach(|| {
        let mut id = 0u64;
        // SAFETY: three arrays of `n` elements; the engine checks the memory against its registrations.
        let rc = unsafe {
            (api.send_vector)(as_conn(conn), mrs.as_ptr(), ptrs.as_ptr().cast(), sizes.as_ptr(), count, &mut id)
        };
        check(api, rc).map(|_| id)
    })?;
    Ok(id)
}

/// Posts a receive of at most `size` bytes into `ptr`; returns the transfer id.
#[pyfunction]
fn recv(py: Python<'_>, conn: usize, mr: u64, ptr: usize, size: usize) -> PyResult<u64> {
    let api = api()?;
    // Detached: a receive that matches a message already announced stores it inside the call.
    let id = py.detach(|| {
        let mut id = 0u64;
        // SAFETY: the engine checks the memory against its registrations; `id` is writable.
        check(api, unsafe { (api.recv_async)(as_conn(conn), mr, ptr as *mut c_void, size, &mut id) }).map(|_| id)
    })?;
    Ok(id)
}

/// `(status, bytes, error)`: status 1 in progress, 0 done (the id is forgotten), negative failed
/// (also forgotten; `error` says why).
///
/// An unfinished transfer yields the CPU before returning: callers poll in tight loops (UCCL's
/// benchmarks and tests do), and where cores are short such a loop would otherwise keep the
/// engine's own threads, which finish the transfer, off the CPU for whole scheduler slices.
#[pyfunction]
fn poll(py: Python<'_>, conn: usize, id: u64) -> PyResult<(i32, usize, Option<String>)> {
    let api = api()?;
    // Detached: on a same-host connection the engine copies inside the poll.
    Ok(py.detach(|| {
        let mut bytes = 0usize;
        // SAFETY: the library checks the handle and the id; `bytes` is writable.
        let rc = unsafe { (api.poll)(as_conn(conn), id, &mut bytes) };
        if rc == IN_PROGRESS {
            std::thread::yield_now();
        }
        (rc, bytes, (rc < 0).then(|| engine_error(api, rc)))
    }))
}

/// Waits for a transfer to end: `(status, bytes, error)` as `poll` gives them, with status 1 only
/// when `timeout_ms` (None: no limit) passed first. Signals are checked between slices; one
/// raises here (KeyboardInterrupt) and leaves the transfer running.
#[pyfunction]
#[pyo3(signature = (conn, id, timeout_ms=None))]
fn wait(py: Python<'_>, conn: usize, id: u64, timeout_ms: Option<u64>) -> PyResult<(i32, usize, Option<String>)> {
    let api = api()?;
    let deadline = deadline_after(timeout_ms);
    loop {
        let slice = match deadline {
            None => SLICE_MS,
            Some(d) => {
                d.saturating_duration_since(std::time::Instant::now()).as_millis().min(SLICE_MS as u128) as c_int
            }
        };
        let (rc, bytes, error) = py.detach(|| {
            let mut bytes = 0usize;
            // SAFETY: the library checks the handle and the id; `bytes` is writable.
            let rc = unsafe { (api.wait)(as_conn(conn), id, slice, &mut bytes) };
            (rc, bytes, (rc < 0).then(|| engine_error(api, rc)))
        });
        if rc != IN_PROGRESS || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok((rc, bytes, error));
        }
        py.check_signals()?;
    }
}

/// Sets up what a first write or read into the peer's `meta` would set up on its way
/// (`uccl_tcpx_prepare`): whether a mapping now serves it. Blocks, the GIL let go, for the
/// owner's answer.
#[pyfunction]
fn prepare(py: Python<'_>, conn: usize, meta: &[u8]) -> PyResult<bool> {
    let api = api()?;
    let fifo = fifo_of(meta)?;
    let mut mapped = false;
    // SAFETY: the library checks the handle, only reads the FifoItem and writes one bool.
    let rc = py.detach(|| unsafe { (api.prepare)(as_conn(conn), &fifo, &mut mapped) });
    check(api, rc)?;
    Ok(mapped)
}

/// A connection's counters as a dict: transfers and bytes each way, in flight, failed, failures
/// by status (only statuses seen), retries, the last failure's status, messages landed before
/// their receive, idle channel closes and reopenings.
#[pyfunction]
fn conn_stats(py: Python<'_>, conn: usize) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let api = api()?;
    let mut s = ConnStats::default();
    // SAFETY: the library checks the handle and writes at most size_of::<ConnStats>() bytes.
    check(api, unsafe { (api.conn_stats)(as_conn(conn), &mut s, size_of::<ConnStats>()) })?;
    let d = pyo3::types::PyDict::new(py);
    d.set_item("out_transfers", s.out_transfers)?;
    d.set_item("out_bytes", s.out_bytes)?;
    d.set_item("in_transfers", s.in_transfers)?;
    d.set_item("in_bytes", s.in_bytes)?;
    d.set_item("in_flight", s.in_flight)?;
    d.set_item("failed", s.failed)?;
    let errors = pyo3::types::PyDict::new(py);
    for (slot, n) in s.errors.iter().enumerate().filter(|(_, n)| **n > 0) {
        errors.set_item(-(slot as i32), *n)?;
    }
    d.set_item("errors", errors)?;
    d.set_item("retries", s.retries)?;
    d.set_item("last_error", s.last_error)?;
    d.set_item("landed", s.landed)?;
    d.set_item("idle_closes", s.idle_closes)?;
    d.set_item("reopens", s.reopens)?;
    Ok(d)
}

/// What a connection's data sockets carried per link, as a list of dicts (`link`, then
/// `sockets`, `bytes`, `pieces`, `errors` for `out` and for `in`).
#[pyfunction]
fn conn_link_stats(py: Python<'_>, conn: usize) -> PyResult<Bound<'_, pyo3::types::PyList>> {
    let api = api()?;
    let mut links = Vec::new();
    // The link count can grow between the two calls (a later socket on a new link): ask again
    // with room for what the last answer said until it fits.
    loop {
        let room = links.capacity();
        // SAFETY: `links` has room for `room` entries; the library writes at most that many.
        let n = check(api, unsafe {
            (api.conn_link_stats)(as_conn(conn), links.as_mut_ptr(), room, size_of::<LinkStats>())
        })? as usize;
        if n <= room {
            // SAFETY: the call wrote the first n entries.
            unsafe { links.set_len(n) };
            break;
        }
        links.reserve_exact(n);
    }
    let out = pyo3::types::PyList::empty(py);
    for l in &links {
        let d = pyo3::types::PyDict::new(py);
        // SAFETY: NUL-terminated by the library within the array.
        d.set_item("link", unsafe { CStr::from_ptr(l.link.as_ptr()) }.to_string_lossy())?;
        for (way, sockets, bytes, pieces, errors) in [
            ("out", l.out_sockets, l.out_bytes, l.out_pieces, l.out_errors),
            ("in", l.in_sockets, l.in_bytes, l.in_pieces, l.in_errors),
        ] {
            let w = pyo3::types::PyDict::new(py);
            w.set_item("sockets", sockets)?;
            w.set_item("bytes", bytes)?;
            w.set_item("pieces", pieces)?;
            w.set_item("errors", errors)?;
            d.set_item(way, w)?;
        }
        out.append(d)?;
    }
    Ok(out)
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_count, m)?)?;
    m.add_function(wrap_pyfunction!(default_ip, m)?)?;
    m.add_function(wrap_pyfunction!(create, m)?)?;
    m.add_function(wrap_pyfunction!(destroy, m)?)?;
    m.add_function(wrap_pyfunction!(metadata, m)?)?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(accept, m)?)?;
    m.add_function(wrap_pyfunction!(stop_accept, m)?)?;
    m.add_function(wrap_pyfunction!(conn_destroy, m)?)?;
    m.add_function(wrap_pyfunction!(conn_is_local, m)?)?;
    m.add_function(wrap_pyfunction!(reg, m)?)?;
    m.add_function(wrap_pyfunction!(dereg, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_fifo, m)?)?;
    m.add_function(wrap_pyfunction!(post, m)?)?;
    m.add_function(wrap_pyfunction!(postv, m)?)?;
    m.add_function(wrap_pyfunction!(send, m)?)?;
    m.add_function(wrap_pyfunction!(post_sized, m)?)?;
    m.add_function(wrap_pyfunction!(poll_status, m)?)?;
    m.add_function(wrap_pyfunction!(array_ranges, m)?)?;
    m.add_function(wrap_pyfunction!(serialize_descs, m)?)?;
    m.add_function(wrap_pyfunction!(post_descs, m)?)?;
    m.add_function(wrap_pyfunction!(postv_plain, m)?)?;
    m.add_function(wrap_pyfunction!(deserialize_descs, m)?)?;
    m.add_function(wrap_pyfunction!(make_descs, m)?)?;
    m.add_function(wrap_pyfunction!(recv, m)?)?;
    m.add_function(wrap_pyfunction!(poll, m)?)?;
    m.add_function(wrap_pyfunction!(wait, m)?)?;
    m.add_function(wrap_pyfunction!(conn_stats, m)?)?;
    m.add_function(wrap_pyfunction!(prepare, m)?)?;
    m.add_function(wrap_pyfunction!(conn_link_stats, m)?)?;
    m.add("SLICE_MS", SLICE_MS)?;
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    Ok(())
}
