//! Status names and the per-thread last error.

use std::ffi::{c_char, c_int};

use super::ffi_fn;
use crate::error::UcclStatus as S;

/// The status numbers the functions of this library return (as `int`).
pub type uccl_status_t = crate::error::UcclStatus;

/// A static description of a status number ("unrecognized status" for unknown numbers); never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_status_str(status: c_int) -> *const c_char {
    S::from_code(status).map_or(c"unrecognized status", S::c_text).as_ptr()
}

/// Copies this thread's last error message into `buf` (NUL-terminated, truncated to `len - 1`
/// bytes) and returns its full length, so a caller can retry with a larger buffer.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_last_error(buf: *mut c_char, len: libc::size_t) -> libc::size_t {
    let message = super::last_error();
    ffi_fn!("uccl_engine_last_error", {
        if !buf.is_null() && len > 0 {
            let n = message.len().min(len - 1);
            // SAFETY: the caller's buffer holds `len` bytes; n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        Ok(message.len())
    })
}
