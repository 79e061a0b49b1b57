//! The C ABI. Thin by design: check arguments, turn handles into engine objects, call the engine,
//! turn the outcome into a status and this thread's last error. Nothing here knows about sockets or
//! the wire. Every exported function runs inside `boundary`, so no panic reaches the caller.
// Exported functions take raw pointers from C by design (as rustls-ffi does); each dereference is
// preceded by a NULL check and documented at the call.
#![allow(non_camel_case_types, clippy::not_unsafe_ptr_arg_deref)]

mod conn;
mod conn_stats;
mod engine;
mod fifo;
mod handle;
mod memory;
mod nixl_support;
mod notify;
mod python_support;
mod status;
mod xfer;

pub use conn::*;
pub use conn_stats::*;
pub use engine::*;
pub use fifo::*;
pub use memory::*;
pub use nixl_support::*;
pub use notify::*;
pub use python_support::*;
pub use status::*;
pub use xfer::*;

use std::cell::RefCell;
use std::ffi::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::{Error, Result, UcclStatus};

/// Size of `notify_msg_t`'s fields.
pub const MSG_SIZE: usize = 256;
/// Size of a serialized FifoItem.
pub const FIFO_SIZE: usize = 64;
/// Size of the buffer `uccl_engine_get_ipc_info` fills.
pub const IPC_INFO_SIZE: usize = 128;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

pub(crate) fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// What an exported function returns when it fails.
pub(crate) trait FfiReturn {
    fn failure(status: UcclStatus) -> Self;
}

impl FfiReturn for c_int {
    fn failure(status: UcclStatus) -> c_int {
        status as c_int
    }
}

impl<T> FfiReturn for *mut T {
    fn failure(_: UcclStatus) -> *mut T {
        std::ptr::null_mut()
    }
}

impl FfiReturn for bool {
    fn failure(_: UcclStatus) -> bool {
        false
    }
}

impl FfiReturn for usize {
    fn failure(_: UcclStatus) -> usize {
        0
    }
}

impl FfiReturn for () {
    fn failure(_: UcclStatus) {}
}

/// Runs `body`, recording an error or a caught panic as this thread's last error.
pub(crate) fn boundary<R: FfiReturn>(function: &str, body: impl FnOnce() -> Result<R>) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(err)) => {
            set_last_error(format!("{function}: {}", err.message()));
            R::failure(err.status())
        }
        Err(panic) => {
            let what = crate::threads::panic_text(&*panic);
            log::error!("{function}: internal panic caught at the C boundary: {what}");
            set_last_error(format!("{function}: internal error (panic: {what})"));
            R::failure(UcclStatus::ErrInternal)
        }
    }
}

/// Wraps an exported function's body in the panic boundary, naming the function in errors.
macro_rules! ffi_fn {
    ($name:literal, $body:block) => {
        $crate::ffi::boundary($name, || -> $crate::error::Result<_> { $body })
    };
}
pub(crate) use ffi_fn;

/// Rejects a NULL pointer argument with a message naming it.
macro_rules! non_null {
    ($ptr:ident) => {
        if $ptr.is_null() {
            return Err($crate::error::Error::invalid(concat!("argument `", stringify!($ptr), "` is NULL")));
        }
    };
}
pub(crate) use non_null;

/// Reads a caller's C string argument (non-NULL, valid UTF-8).
pub(crate) fn c_str_arg<'a>(ptr: *const std::ffi::c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("argument `{name}` is NULL")));
    }
    // SAFETY: the caller passes a NUL-terminated string that outlives this call.
    unsafe { std::ffi::CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| Error::invalid(format!("argument `{name}` is not valid UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_turns_errors_and_panics_into_statuses() {
        let ok: c_int = boundary("f", || Ok(7));
        assert_eq!(ok, 7);
        let err: c_int = boundary("f", || Err(Error::not_allowed("nope")));
        assert_eq!(err, UcclStatus::ErrNotAllowed as c_int);
        assert_eq!(last_error(), "f: nope");
        let panicked: *mut u8 = boundary("g", || panic!("boom"));
        assert!(panicked.is_null());
        assert!(last_error().contains("g: internal error (panic: boom)"), "{}", last_error());
        let flag: bool = boundary("h", || -> Result<bool> { panic!("{}", String::from("owned")) });
        assert!(!flag);
        assert!(last_error().contains("owned"));
    }
}
