//! Status names and the per-thread last error.

use std::ffi::{c_char, c_int};

use super::ffi_fn;
use crate::error::UcclStatus as S;

/// The status numbers the functions of this library return (as `int`).
pub type uccl_status_t = crate::error::UcclStatus;

/// A static description of a status number ("unrecognized status" for unknown numbers); never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_status_str(status: c_int) -> *const c_char {
    let text: &'static std::ffi::CStr = match S::from_code(status) {
        Some(S::InProgress) => c"UCCL_STATUS_IN_PROGRESS: in progress",
        Some(S::Ok) => c"UCCL_STATUS_OK: success",
        Some(S::ErrNotPosted) => c"UCCL_STATUS_ERR_NOT_POSTED: not posted",
        Some(S::ErrInvalidParam) => c"UCCL_STATUS_ERR_INVALID_PARAM: invalid parameter",
        Some(S::ErrBackend) => c"UCCL_STATUS_ERR_BACKEND: transport error",
        Some(S::ErrNotFound) => c"UCCL_STATUS_ERR_NOT_FOUND: not found",
        Some(S::ErrMismatch) => c"UCCL_STATUS_ERR_MISMATCH: size mismatch",
        Some(S::ErrNotAllowed) => c"UCCL_STATUS_ERR_NOT_ALLOWED: not allowed",
        Some(S::ErrRepostActive) => c"UCCL_STATUS_ERR_REPOST_ACTIVE: already active",
        Some(S::ErrUnknown) => c"UCCL_STATUS_ERR_UNKNOWN: unknown error",
        Some(S::ErrNotSupported) => c"UCCL_STATUS_ERR_NOT_SUPPORTED: not supported",
        Some(S::ErrRemoteDisconnect) => c"UCCL_STATUS_ERR_REMOTE_DISCONNECT: remote disconnected",
        Some(S::ErrCanceled) => c"UCCL_STATUS_ERR_CANCELED: canceled",
        Some(S::ErrTimeout) => c"UCCL_STATUS_ERR_TIMEOUT: timed out",
        Some(S::ErrInternal) => c"UCCL_STATUS_ERR_INTERNAL: internal error",
        None => c"unrecognized status",
    };
    text.as_ptr()
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
