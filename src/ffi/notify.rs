//! Notifications: small messages on a connection's control stream, collected process-wide.

use std::ffi::{c_char, c_int, c_void};

use super::conn::{conn_ref, uccl_conn_t};
use super::{MSG_SIZE, ffi_fn, non_null};
use crate::engine::notify;
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
/// receivers keep the first 256 bytes of the message.
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
/// returns how many. `msg` is truncated to 256 bytes and zero padded.
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

fn bytes_of(field: &[c_char; MSG_SIZE]) -> &[u8] {
    // SAFETY: c_char and u8 have the same size and alignment.
    unsafe { std::slice::from_raw_parts(field.as_ptr().cast::<u8>(), MSG_SIZE) }
}

fn copy_into(field: &mut [c_char; MSG_SIZE], bytes: &[u8]) {
    for (dst, src) in field.iter_mut().zip(bytes) {
        *dst = *src as c_char;
    }
}
