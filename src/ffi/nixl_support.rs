//! What a NIXL backend needs beyond UCCL's calls: an engine configured from the backend's
//! parameters instead of the environment, each engine's own notifications, registrations of 4 GiB
//! and more advertised in windows, giving up on a transfer that is still in flight, setting up a
//! same-host peer's memory before its first transfer, and one-sided calls given as runs of pieces
//! (items already grouped by region and capability).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_int};
use std::sync::Arc;

use super::conn::{conn_ref, uccl_conn_t};
use super::engine::{ENGINES, uccl_engine_t};
use super::fifo::FifoItem;
use super::memory::uccl_mr_t;
use super::notify::{hand_out, uccl_notif_v_t};
use super::{c_str_arg, ffi_fn, non_null};
use crate::config::Config;
use crate::engine::{Engine, Piece, PieceRun, notify};
use crate::error::{Error, Result};

/// The window size `uccl_tcpx_advertise_region` advertises a region in: 2 GiB, so that every
/// window and every item inside one fits the u32 size of a FifoItem and of a wire segment.
pub const UCCL_TCPX_ADVERTISE_WINDOW: u64 = 0x8000_0000;

/// Windows one region may advertise (the engine's bound); with 2 GiB windows, 8 TiB.
const MAX_WINDOWS: u64 = 4096;

/// Creates an engine as `uccl_engine_create` does, with settings from `n` key/value pairs taking
/// precedence over the environment. A key is a setting's environment name (`UCCL_TCPX_NUM_CHANNELS`)
/// or the same without the `UCCL_TCPX_` prefix in any case (`num_channels`); an empty value leaves
/// the setting to the environment. An unknown key or a bad value fails the call (NULL, with the
/// reason in `uccl_engine_last_error`); so do NULL arrays while `n` > 0 and a NULL entry.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_engine_create_with(
    keys: *const *const c_char,
    values: *const *const c_char,
    n: libc::size_t,
) -> *mut uccl_engine_t {
    crate::config::init_logging();
    ffi_fn!("uccl_tcpx_engine_create_with", {
        let mut params = Vec::with_capacity(n);
        if n > 0 {
            non_null!(keys);
            non_null!(values);
            // SAFETY: both checked non-NULL; the caller's arrays hold `n` entries each.
            let (keys, values) =
                unsafe { (std::slice::from_raw_parts(keys, n), std::slice::from_raw_parts(values, n)) };
            for (i, (&k, &v)) in keys.iter().zip(values).enumerate() {
                let key = c_str_arg(k, &format!("keys[{i}]"))?;
                let value = c_str_arg(v, &format!("values[{i}]"))?;
                params.push((setting_name(key)?, value.to_owned()));
            }
        }
        let engine = Engine::new(config_with(&params)?)?;
        log::debug!("engine created with {} parameters: {}", params.len(), engine.metadata());
        Ok(ENGINES.insert(Arc::new(engine)))
    })
}

/// The environment name a parameter key stands for.
fn setting_name(key: &str) -> Result<String> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::invalid(format!("parameter key {key:?} is not a setting name")));
    }
    let upper = key.to_ascii_uppercase();
    Ok(if upper.starts_with("UCCL_TCPX_") || upper == "NCCL_NET_PLUGIN" { upper } else { format!("UCCL_TCPX_{upper}") })
}

/// The configuration with `params` over the environment; a parameter no setting reads is an error,
/// so that a misspelt key does not pass unnoticed.
fn config_with(params: &[(String, String)]) -> Result<Config> {
    let asked = RefCell::new(BTreeSet::new());
    let config = Config::from_env_with(|name| {
        asked.borrow_mut().insert(name.to_owned());
        params.iter().rev().find(|(k, v)| k == name && !v.trim().is_empty()).map(|(_, v)| v.clone())
    })
    .map_err(|e| {
        // The settings' messages speak of the environment; say where a parameter's value came from.
        match params.iter().find(|(k, v)| !v.trim().is_empty() && e.message().contains(&format!("variable {k}="))) {
            Some((k, _)) => Error::new(
                e.status(),
                e.message().replace(&format!("environment variable {k}="), &format!("parameter {k}=")),
            ),
            None => e,
        }
    })?;
    let asked = asked.into_inner();
    if let Some((k, _)) = params.iter().find(|(k, _)| !asked.contains(k)) {
        return Err(Error::invalid(format!("unknown parameter {k}: no engine setting has that name")));
    }
    Ok(config)
}

/// Like `uccl_engine_get_notifs_v`, but only the notifications that connections of `engine`
/// received, so that several engines of one process (one per NIXL agent, say) each get their own.
/// The others stay queued, in order, for their engines and for `uccl_engine_get_notifs_v`. Returns
/// how many entries were filled (0 with a last error for a bad engine or a NULL `out` while
/// `capacity` > 0); release each with `uccl_engine_free_notif_v`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_engine_get_notifs_v(
    engine: *mut uccl_engine_t,
    out: *mut uccl_notif_v_t,
    capacity: libc::size_t,
) -> libc::size_t {
    ffi_fn!("uccl_tcpx_engine_get_notifs_v", {
        let key = ENGINES.get(engine)?.notify_key();
        if capacity == 0 {
            return Ok(0);
        }
        if out.is_null() {
            return Err(Error::invalid("argument `out` is NULL while capacity > 0"));
        }
        // SAFETY: the caller's array holds `capacity` entries, at least as many as drained.
        unsafe { hand_out(notify::drain_engine(key, capacity), out) }
    })
}

/// Gives up on transfer `transfer_id` of `conn` without waiting for it: it still runs to its end
/// (or its connection's failure), but nobody polls it, and its id is unknown from now on. The
/// memory it touches stays safe to free only after `uccl_engine_mr_destroy` of its regions, which
/// fences every transfer. 0, or -4 for an id this connection does not know (never issued, already
/// reported finished, or already forgotten), -2 for a bad handle.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_forget(conn: *mut uccl_conn_t, transfer_id: u64) -> c_int {
    ffi_fn!("uccl_tcpx_forget", {
        conn_ref(conn)?.forget(transfer_id)?;
        Ok(0)
    })
}

/// Sets up now what a first write or read into the peer's `item` would set up on its way: between
/// processes of one host, the owner's grant and the mapping of its GPU allocation (hundreds of
/// microseconds to milliseconds, once per region and allocation), so that a NIXL backend can take
/// them off an agent's first request once its memory is known. Blocks for the owner's answer.
/// `*mapped` (may be NULL) tells whether a mapping now serves `item`; it is false, and the call
/// still succeeds, where no transfer would map anything (a peer on another host, memory without a
/// CUDA IPC handle, an engine without a GPU). A capability the owner refuses fails with its status.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_prepare(conn: *mut uccl_conn_t, item: *const FifoItem, mapped: *mut bool) -> c_int {
    ffi_fn!("uccl_tcpx_prepare", {
        non_null!(item);
        let conn = conn_ref(conn)?;
        // SAFETY: checked non-NULL; the caller's FifoItem is readable and only read.
        let done = conn.prepare(unsafe { &*item })?;
        if !mapped.is_null() {
            // SAFETY: checked non-NULL; the caller's bool is writable.
            unsafe { *mapped = done };
        }
        Ok(0)
    })
}

/// Advertises `[addr, addr + len)` of region `mr`, of any size up to 8 TiB, as consecutive windows
/// of `UCCL_TCPX_ADVERTISE_WINDOW` bytes starting at `addr` (the last one shorter), and writes to
/// `*item` the capability for the first window. Its padding (region and token) serves every window:
/// a peer reaches byte `addr + k * window + o` with an item of that address, the same padding and
/// a size that stays inside window `k`, so an item must not cross a window boundary (the owner
/// refuses it). `*window` (may be NULL) receives the window size.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_advertise_region(
    engine: *mut uccl_engine_t,
    mr: uccl_mr_t,
    addr: libc::uintptr_t,
    len: libc::size_t,
    item: *mut FifoItem,
    window: *mut u64,
) -> c_int {
    ffi_fn!("uccl_tcpx_advertise_region", {
        non_null!(item);
        if len == 0 {
            return Err(Error::invalid("len is 0"));
        }
        let count = (len as u64).div_ceil(UCCL_TCPX_ADVERTISE_WINDOW);
        if count > MAX_WINDOWS {
            return Err(Error::invalid(format!(
                "{len} bytes need {count} windows of 2 GiB; a region advertises at most {MAX_WINDOWS}"
            )));
        }
        let engine = ENGINES.get(engine)?;
        let mut first = None;
        for k in 0..count as usize {
            let start = k * UCCL_TCPX_ADVERTISE_WINDOW as usize;
            let size = (len - start).min(UCCL_TCPX_ADVERTISE_WINDOW as usize);
            let at = addr.checked_add(start).ok_or_else(|| Error::invalid("addr + len wraps around"))?;
            let minted = engine.prepare_fifo(mr, at, size)?;
            first.get_or_insert(minted);
        }
        // SAFETY: checked non-NULL; the caller's FifoItem is writable. `first` is set: count >= 1.
        unsafe { *item = first.expect("at least one window") };
        if !window.is_null() {
            // SAFETY: checked non-NULL; the caller's u64 is writable.
            unsafe { *window = UCCL_TCPX_ADVERTISE_WINDOW };
        }
        Ok(0)
    })
}

/// One piece of `uccl_tcpx_write_pieces` / `uccl_tcpx_read_pieces`: `len` bytes at `local_addr`
/// (in its run's region) and at `remote_addr` (at the peer, inside what its run's FifoItem grants).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct uccl_tcpx_piece_t {
    pub local_addr: u64,
    pub remote_addr: u64,
    pub len: u64,
}

/// `num_pieces` consecutive pieces of a call between local region `mr` and the peer range
/// `remote` grants: `[remote.addr, remote.addr + remote.size)` bounds every piece's remote range,
/// and its padding names the target's capability (one advertising window of it, say).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct uccl_tcpx_run_t {
    pub mr: uccl_mr_t,
    pub remote: FifoItem,
    pub num_pieces: u64,
}

// The engine reads the caller's pieces in place: the same three u64 fields in the same order.
const _: () = {
    use crate::engine::Piece;
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<uccl_tcpx_piece_t>() == size_of::<Piece>());
    assert!(align_of::<uccl_tcpx_piece_t>() == align_of::<Piece>());
    assert!(offset_of!(uccl_tcpx_piece_t, local_addr) == offset_of!(Piece, local));
    assert!(offset_of!(uccl_tcpx_piece_t, remote_addr) == offset_of!(Piece, remote));
    assert!(offset_of!(uccl_tcpx_piece_t, len) == offset_of!(Piece, len));
};

/// Writes `num_pieces` pieces under one transfer id, which `runs` (`num_runs` of them, each
/// covering its `num_pieces` pieces in order) divide among local regions and peer capabilities:
/// the form of `uccl_engine_write_vector` for a caller that already grouped its items, such as a
/// NIXL backend. It is checked as that call is (every local range inside its registration, every
/// remote range inside what its run's FifoItem grants; the target checks its side) with one
/// registration lookup and one capability per run, and the pieces are read in place.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_write_pieces(
    conn: *mut uccl_conn_t,
    runs: *const uccl_tcpx_run_t,
    num_runs: libc::size_t,
    pieces: *const uccl_tcpx_piece_t,
    num_pieces: libc::size_t,
    transfer_id: *mut u64,
) -> c_int {
    ffi_fn!("uccl_tcpx_write_pieces", { post_pieces(conn, runs, num_runs, pieces, num_pieces, transfer_id, true) })
}

/// Reads into `num_pieces` pieces under one transfer id, as `uccl_tcpx_write_pieces` writes.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_tcpx_read_pieces(
    conn: *mut uccl_conn_t,
    runs: *const uccl_tcpx_run_t,
    num_runs: libc::size_t,
    pieces: *const uccl_tcpx_piece_t,
    num_pieces: libc::size_t,
    transfer_id: *mut u64,
) -> c_int {
    ffi_fn!("uccl_tcpx_read_pieces", { post_pieces(conn, runs, num_runs, pieces, num_pieces, transfer_id, false) })
}

fn post_pieces(
    conn: *mut uccl_conn_t,
    runs: *const uccl_tcpx_run_t,
    num_runs: usize,
    pieces: *const uccl_tcpx_piece_t,
    num_pieces: usize,
    transfer_id: *mut u64,
    write: bool,
) -> Result<c_int> {
    non_null!(transfer_id);
    if num_runs == 0 || num_pieces == 0 {
        return Err(Error::invalid("nothing to transfer: zero runs or zero pieces"));
    }
    non_null!(runs);
    non_null!(pieces);
    // SAFETY: both checked non-NULL; the caller's arrays hold `num_runs` and `num_pieces` entries.
    // `uccl_tcpx_piece_t` and `Piece` have one layout (asserted above), so the pieces are read as
    // the engine's without a copy.
    let (c_runs, pieces) = unsafe {
        (std::slice::from_raw_parts(runs, num_runs), std::slice::from_raw_parts(pieces.cast::<Piece>(), num_pieces))
    };
    let runs = c_runs
        .iter()
        .map(|r| {
            let n = usize::try_from(r.num_pieces).map_err(|_| Error::invalid("a run's num_pieces overflows"))?;
            Ok(PieceRun { mr: r.mr, remote: r.remote, pieces: n })
        })
        .collect::<Result<Vec<_>>>()?;
    let conn = conn_ref(conn)?;
    let id = if write { conn.write_pieces(&runs, pieces)? } else { conn.read_pieces(&runs, pieces)? };
    // SAFETY: checked non-NULL above.
    unsafe { *transfer_id = id };
    Ok(0)
}
