//! The panic boundary, thread check and pointer checks shared by every exported entry point.

use std::ffi::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind};

use uccl_tcpx::internal::ncclnet::{NCCL_INTERNAL_ERROR, NCCL_SUCCESS};

use crate::fail::{Fail, Result};
use crate::log;
use crate::profile;
use crate::threads::{self, Scope};

/// Runs an entry point's body with the calling thread recorded inside `entry` on `scope` (computed
/// first): a `Fail` becomes a WARN and its rc as the plugin stood in for reports it (`profile.rs`),
/// a panic becomes rc 3 (a panic must never unwind into the C caller).
pub fn guard(entry: &'static str, scope: impl FnOnce() -> Scope, body: impl FnOnce() -> Result<()>) -> c_int {
    let run = || {
        let _inside = threads::enter(entry, scope())?;
        body()
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) => NCCL_SUCCESS,
        Ok(Err(fail)) => {
            log::warn(&format!("{entry}: {}", fail.msg));
            profile::kind().rc(fail.rc)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // Logging itself must not panic out of here either.
            let _ = catch_unwind(|| log::warn(&format!("{entry}: internal failure: {what}")));
            NCCL_INTERNAL_ERROR
        }
    }
}

/// A NULL out-pointer is a caller bug TCPX would crash on; the fake reports it.
pub fn non_null<T>(p: *mut T, what: &str) -> Result<*mut T> {
    if p.is_null() { Err(Fail::internal(format!("{what} is NULL"))) } else { Ok(p) }
}
