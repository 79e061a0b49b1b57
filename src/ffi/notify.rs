//! Notifications: small messages on a connection's control stream, collected process-wide.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use super::conn::{conn_ref, uccl_conn_t};
use super::{MSG_SIZE, ffi_fn, non_null};
use crate::engine::{Notification, notify};
use crate::error::Error;

/// A received (or to be sent) notification: `name` is a C string, `msg` 256 binary bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct notify_msg {
    pub name: [c_char; MSG_SIZE],
    pub msg: [c_char; MSG_SIZE],
}
pub type notify_msg_t = notify_msg;

/// Sends `name` (NUL-terminated within 256 bytes) and all 256 bytes of `msg`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_send_notif(conn: *mut uccl_conn_t, notify_msg: *mut notify_msg_t) -> c_int {
    ffi_fn!("uccl_engine_send_notif", {
        non_null!(notify_msg);
        // SAFETY: checked non-NULL; the caller's struct is readable.
        let m = unsafe { &*notify_msg };
        let name: &[u8] = bytes_of(&m.name);
        let len = name
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| Error::invalid("notify_msg->name is not NUL-terminated within 256 bytes"))?;
        conn_ref(conn)?.notify(&name[..len], bytes_of(&m.msg))?;
        Ok(0)
    })
}

/// Sends a name of `name_len` bytes (at most 255, no NUL) and a message of any length up to 64 MiB;
/// receivers get it whole from `uccl_engine_get_notifs_v` (`uccl_engine_get_notifs` keeps 256 bytes).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_send_notif_v(
    conn: *mut uccl_conn_t,
    name: *const c_char,
    name_len: libc::size_t,
    msg: *const c_void,
    msg_len: libc::size_t,
) -> c_int {
    ffi_fn!("uccl_engine_send_notif_v", {
        if name_len > 0 {
            non_null!(name);
        }
        if msg_len > 0 {
            non_null!(msg);
        }
        // SAFETY: non-empty ranges were checked non-NULL; the caller provides that many bytes.
        let (name, msg) = unsafe {
            (
                if name_len == 0 { &[][..] } else { std::slice::from_raw_parts(name.cast::<u8>(), name_len) },
                if msg_len == 0 { &[][..] } else { std::slice::from_raw_parts(msg.cast::<u8>(), msg_len) },
            )
        };
        conn_ref(conn)?.notify(name, msg)?;
        Ok(0)
    })
}

/// Moves up to `capacity` received notifications (of every engine in the process) into `out`;
/// returns how many. `msg` is truncated to 256 bytes and zero padded (`uccl_engine_get_notifs_v`
/// returns messages whole).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_get_notifs(out: *mut notify_msg_t, capacity: libc::size_t) -> libc::size_t {
    ffi_fn!("uccl_engine_get_notifs", {
        if capacity == 0 {
            return Ok(0);
        }
        if out.is_null() {
            return Err(Error::invalid("argument `out` is NULL while capacity > 0"));
        }
        let drained = notify::drain(capacity);
        for (i, n) in drained.iter().enumerate() {
            let mut entry = notify_msg { name: [0; MSG_SIZE], msg: [0; MSG_SIZE] };
            copy_into(&mut entry.name, &n.name);
            copy_into(&mut entry.msg, &n.msg);
            // SAFETY: i < capacity; the caller's array holds `capacity` entries.
            unsafe { out.add(i).write(entry) };
        }
        Ok(drained.len())
    })
}

/// A received notification, whole: `name` holds `name_len` bytes and `msg` holds `msg_len` bytes
/// (any values, zeros included), each followed by a NUL that is not counted, so text reads as a C
/// string. Both are allocated by this library: release them with `uccl_engine_free_notif_v`.
#[repr(C)]
pub struct uccl_notif_v {
    pub name: *mut c_char,
    pub name_len: libc::size_t,
    pub msg: *mut c_char,
    pub msg_len: libc::size_t,
}
pub type uccl_notif_v_t = uccl_notif_v;

/// Moves up to `capacity` received notifications (of every engine in the process, the same queue as
/// `uccl_engine_get_notifs`) into `out`, messages whole (up to 64 MiB each); returns how many. Each
/// entry filled must be released with `uccl_engine_free_notif_v`. Should memory run out, the
/// notifications not handed out stay queued, in order, for the next call (0 and a last error if
/// none could be).
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_get_notifs_v(out: *mut uccl_notif_v_t, capacity: libc::size_t) -> libc::size_t {
    ffi_fn!("uccl_engine_get_notifs_v", {
        if capacity == 0 {
            return Ok(0);
        }
        if out.is_null() {
            return Err(Error::invalid("argument `out` is NULL while capacity > 0"));
        }
        // SAFETY: the caller's array holds `capacity` entries, at least as many as drained.
        unsafe { hand_out(notify::drain(capacity), out) }
    })
}

/// Copies `drained` into `out` in order; those that cannot be copied (memory ran out) go back to
/// the front of the queue, in order, for the next call. How many were handed out, or an error if
/// not even the first could be.
///
/// # Safety
/// `out` holds at least `drained.len()` writable entries.
pub(super) unsafe fn hand_out(drained: Vec<Notification>, out: *mut uccl_notif_v_t) -> crate::error::Result<usize> {
    let mut drained = drained.into_iter();
    let mut filled = 0;
    while let Some(n) = drained.next() {
        let Some(entry) = to_c(&n) else {
            let size = n.msg.len();
            notify::requeue_front(std::iter::once(n).chain(drained).collect());
            if filled == 0 {
                return Err(Error::internal(format!("out of memory copying out a notification of {size} bytes")));
            }
            break;
        };
        // SAFETY: filled < drained.len(), which the caller's array holds.
        unsafe { out.add(filled).write(entry) };
        filled += 1;
    }
    Ok(filled)
}

/// Frees what `uccl_engine_get_notifs_v` allocated for one entry and clears it, so a second call is
/// a no-op. NULL is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_free_notif_v(notif: *mut uccl_notif_v_t) {
    ffi_fn!("uccl_engine_free_notif_v", {
        if notif.is_null() {
            return Ok(());
        }
        // SAFETY: checked non-NULL; the entry was filled by uccl_engine_get_notifs_v (or cleared).
        let n = unsafe { &mut *notif };
        // SAFETY: both pointers are NULL or came from libc::malloc in copy_out.
        unsafe {
            libc::free(n.name.cast());
            libc::free(n.msg.cast());
        }
        *n = uccl_notif_v { name: ptr::null_mut(), name_len: 0, msg: ptr::null_mut(), msg_len: 0 };
        Ok(())
    })
}

/// The C form of `n`, or None when memory ran out (nothing is then left allocated).
pub(super) fn to_c(n: &Notification) -> Option<uccl_notif_v> {
    let name = copy_out(&n.name)?;
    let Some(msg) = copy_out(&n.msg) else {
        // SAFETY: `name` came from libc::malloc just above.
        unsafe { libc::free(name.cast()) };
        return None;
    };
    Some(uccl_notif_v { name, name_len: n.name.len(), msg, msg_len: n.msg.len() })
}

/// `bytes` and a NUL in memory from libc::malloc (so C can reason about it), or None.
fn copy_out(bytes: &[u8]) -> Option<*mut c_char> {
    // SAFETY: a plain allocation; checked for NULL below.
    let p = unsafe { libc::malloc(bytes.len() + 1) }.cast::<u8>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` holds bytes.len() + 1 bytes and does not overlap `bytes`.
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        p.add(bytes.len()).write(0);
    }
    Some(p.cast())
}

fn bytes_of(field: &[c_char; MSG_SIZE]) -> &[u8] {
    // SAFETY: c_char and u8 have the same size and alignment.
    unsafe { std::slice::from_raw_parts(field.as_ptr().cast::<u8>(), MSG_SIZE) }
}

fn copy_into(field: &mut [c_char; MSG_SIZE], bytes: &[u8]) {
    for (dst, src) in field.iter_mut().zip(bytes) {
        *dst = *src as c_char;
    }
}
