//! Engine handles: create, destroy, metadata, connect, accept.

use std::ffi::{CString, c_char, c_int};
use std::sync::Arc;

use super::conn::{CONNS, ConnEntry, uccl_conn_t};
use super::handle::HandleTable;
use super::{c_str_arg, ffi_fn, non_null};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::Error;
use crate::proto::AuthKey;

/// An engine: one control listener, memory registrations and the connections it made or accepted.
pub struct uccl_engine {
    _private: [u8; 0],
}
pub type uccl_engine_t = uccl_engine;

pub(crate) static ENGINES: HandleTable<Engine> = HandleTable::new("engine", 1);

/// Smallest `ip_addr_buf_len` accepted by `uccl_engine_accept` (INET6_ADDRSTRLEN).
pub const UCCL_IP_ADDR_BUF_MIN: usize = 46;

/// Creates an engine listening on `UCCL_TCPX_PORT` (any free port by default). `num_cpus` and
/// `in_python` are accepted for compatibility; `num_cpus` must not be negative. Returns NULL on failure.
///
/// The engine serves one GPU: `UCCL_TCPX_GPU`, else the GPU whose CUDA context is current on the
/// calling thread (after `cudaSetDevice(n)`, say), else the GPU of the first device registration.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_create(num_cpus: c_int, in_python: bool) -> *mut uccl_engine_t {
    crate::config::init_logging();
    ffi_fn!("uccl_engine_create", {
        if num_cpus < 0 {
            return Err(Error::invalid(format!("num_cpus is {num_cpus}, must not be negative")));
        }
        let engine = Engine::new(Config::from_env()?)?;
        log::debug!("engine created (num_cpus {num_cpus}, in_python {in_python}): {}", engine.metadata());
        Ok(ENGINES.insert(Arc::new(engine)))
    })
}

/// Closes every connection of the engine (their handles then report errors) and frees it. NULL is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_destroy(engine: *mut uccl_engine_t) {
    ffi_fn!("uccl_engine_destroy", {
        if engine.is_null() {
            return Ok(());
        }
        ENGINES.remove(engine)?.shutdown();
        Ok(())
    })
}

/// `*metadata_str` receives "ip:port?gpu", to be released with `uccl_engine_free_string`. `gpu` is
/// the PCI bus id of the engine's GPU when it is known at the first call, else "0". Every call
/// returns the same string, so peers may keep it for the engine's life; the GPU part is advisory
/// (a peer that connects naming another GPU is served by this engine's own).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_get_metadata(engine: *mut uccl_engine_t, metadata_str: *mut *mut c_char) -> c_int {
    ffi_fn!("uccl_engine_get_metadata", {
        non_null!(metadata_str);
        let engine = ENGINES.get(engine)?;
        let text = CString::new(engine.metadata()).map_err(|_| Error::backend("metadata contains NUL"))?;
        // SAFETY: checked non-NULL; the caller provides a writable char*.
        unsafe { *metadata_str = text.into_raw() };
        Ok(0)
    })
}

/// Frees a string this library returned. NULL is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_free_string(s: *mut c_char) {
    ffi_fn!("uccl_engine_free_string", {
        if !s.is_null() {
            // SAFETY: the string came from CString::into_raw in this library, per the contract.
            drop(unsafe { CString::from_raw(s) });
        }
        Ok(())
    })
}

/// A connect call's peer: its IP, GPU and port, checked.
fn peer_args<'a>(
    ip_addr: *const c_char,
    remote_gpu: *const c_char,
    remote_port: c_int,
) -> crate::error::Result<(&'a str, &'a str, u16)> {
    let ip = c_str_arg(ip_addr, "ip_addr")?;
    let gpu = c_str_arg(remote_gpu, "remote_gpu")?;
    let port = u16::try_from(remote_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::invalid(format!("remote_port {remote_port} is outside 1..=65535")))?;
    Ok((ip, gpu, port))
}

/// Connects to the engine at `ip_addr:remote_port`. `remote_gpu` is the part after '?' in its
/// metadata (an index or a PCI BDF); it is advisory, since the port names the engine, and a name
/// that differs from the GPU the engine serves does not fail the connection. Blocks for the
/// handshake (bounded by UCCL_TCPX_CONNECT_TIMEOUT_MS).
/// `same_process` is accepted for compatibility; such connections use the network path too.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_connect(
    engine: *mut uccl_engine_t,
    ip_addr: *const c_char,
    remote_gpu: *const c_char,
    remote_port: c_int,
    same_process: bool,
) -> *mut uccl_conn_t {
    ffi_fn!("uccl_engine_connect", {
        let engine_ref = ENGINES.get(engine)?;
        let (ip, gpu, port) = peer_args(ip_addr, remote_gpu, remote_port)?;
        let conn = engine_ref.connect(ip, gpu, port)?;
        log::debug!("connected to {ip}:{port} (same_process {same_process})");
        Ok(CONNS.insert(Arc::new(ConnEntry { conn, engine: Arc::downgrade(&engine_ref) })))
    })
}

/// `uccl_engine_connect` (with `same_process` false) that tells the peer `local_gpu_idx` as this
/// side's GPU index, which the peer's `uccl_engine_accept` reports; -1 tells the index of the GPU
/// the engine serves, as `uccl_engine_connect` does (0 for a host-only engine). Any other negative
/// index is refused. For callers that number GPUs themselves, such as UCCL's engine.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_connect_from_gpu(
    engine: *mut uccl_engine_t,
    ip_addr: *const c_char,
    remote_gpu: *const c_char,
    remote_port: c_int,
    local_gpu_idx: c_int,
) -> *mut uccl_conn_t {
    ffi_fn!("uccl_engine_connect_from_gpu", {
        let engine_ref = ENGINES.get(engine)?;
        let (ip, gpu, port) = peer_args(ip_addr, remote_gpu, remote_port)?;
        let local_gpu = match local_gpu_idx {
            -1 => None,
            g if g >= 0 => Some(g),
            g => return Err(Error::invalid(format!("local_gpu_idx {g} is neither -1 nor a GPU index"))),
        };
        let conn = engine_ref.connect_as(ip, gpu, port, local_gpu)?;
        Ok(CONNS.insert(Arc::new(ConnEntry { conn, engine: Arc::downgrade(&engine_ref) })))
    })
}

/// Blocks until a peer connects (or `uccl_engine_stop_accept`). Writes the peer's IP as a C string
/// into `ip_addr_buf` (at least 46 bytes) and its GPU index into `*remote_gpu_idx`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_accept(
    engine: *mut uccl_engine_t,
    ip_addr_buf: *mut c_char,
    ip_addr_buf_len: libc::size_t,
    remote_gpu_idx: *mut c_int,
) -> *mut uccl_conn_t {
    ffi_fn!("uccl_engine_accept", {
        non_null!(ip_addr_buf);
        non_null!(remote_gpu_idx);
        if ip_addr_buf_len < UCCL_IP_ADDR_BUF_MIN {
            return Err(Error::invalid(format!(
                "ip_addr_buf_len is {ip_addr_buf_len}; at least {UCCL_IP_ADDR_BUF_MIN} bytes are needed for any address"
            )));
        }
        let engine_ref = ENGINES.get(engine)?;
        let conn = engine_ref.accept()?;
        let ip = conn.peer.addr.ip().to_string();
        // SAFETY: the caller's buffer holds ip_addr_buf_len >= 46 bytes; an IP string is at most 45 + NUL.
        unsafe {
            std::ptr::copy_nonoverlapping(ip.as_ptr(), ip_addr_buf.cast::<u8>(), ip.len());
            *ip_addr_buf.add(ip.len()) = 0;
            *remote_gpu_idx = conn.peer.gpu_index;
        }
        Ok(CONNS.insert(Arc::new(ConnEntry { conn, engine: Arc::downgrade(&engine_ref) })))
    })
}

/// Requires every later connection of `engine`, made or accepted, to prove the `len`-byte `key`
/// (16 to 4096 bytes, the same on every peer) in a mutual challenge-response before anything else,
/// and binds region tokens to the connection that carries them. A peer without the key is refused
/// and both sides log why. Connections made before keep what they had, so call this right after
/// `uccl_engine_create`, before handing out the metadata. `UCCL_TCPX_AUTH_KEY_FILE` does the same
/// at creation. Returns 0, or -2 for a NULL or wrongly sized key.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_set_auth_key(engine: *mut uccl_engine_t, key: *const u8, len: libc::size_t) -> c_int {
    ffi_fn!("uccl_engine_set_auth_key", {
        non_null!(key);
        let engine = ENGINES.get(engine)?;
        if len > crate::proto::auth::MAX_KEY_LEN {
            return Err(Error::invalid(format!(
                "len is {len}; a key has at most {} bytes",
                crate::proto::auth::MAX_KEY_LEN
            )));
        }
        // SAFETY: checked non-NULL; the caller's buffer holds `len` bytes, at most MAX_KEY_LEN.
        let bytes = unsafe { std::slice::from_raw_parts(key, len) };
        engine.set_auth_key(AuthKey::new(bytes).map_err(|why| Error::invalid(format!("key: {why}")))?);
        Ok(0)
    })
}

/// Makes a blocked `uccl_engine_accept` (and every later one) return NULL promptly.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_stop_accept(engine: *mut uccl_engine_t) {
    ffi_fn!("uccl_engine_stop_accept", {
        ENGINES.get(engine)?.stop_accept();
        Ok(())
    })
}
