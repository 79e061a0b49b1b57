//! Messages go to the logger `init` received, as TCPX's do. The logger is C-variadic: it is always
//! called with the format "%s" and one C string, so no caller text is ever interpreted as a format.

use std::ffi::{CString, c_int, c_ulong};
use std::sync::Mutex;

use uccl_tcpx::ncclnet::{NCCL_LOG_INFO, NCCL_LOG_WARN, NcclDebugLogger};

/// `NCCL_NET`, the subsystem flag of every message.
const SUBSYSTEM_NET: c_ulong = 16;

static LOGGER: Mutex<NcclDebugLogger> = Mutex::new(None);

/// Makes `logger` the one every later message goes to. Every `init` call does this first, the
/// failing second one included, as TCPX's does.
pub fn install(logger: NcclDebugLogger) {
    *LOGGER.lock().unwrap_or_else(|p| p.into_inner()) = logger;
}

pub fn warn(msg: &str) {
    emit(NCCL_LOG_WARN, msg);
}

pub fn info(msg: &str) {
    emit(NCCL_LOG_INFO, msg);
}

fn emit(level: c_int, msg: &str) {
    // Copied out: the logger runs without the lock held, so it may call back into the plugin.
    let logger = *LOGGER.lock().unwrap_or_else(|p| p.into_inner());
    call(logger, level, msg);
}

fn call(logger: NcclDebugLogger, level: c_int, msg: &str) {
    let Some(f) = logger else { return };
    let text = CString::new(format!("NET/FakeTCPX : {msg}").replace('\0', "\\0")).expect("NULs were replaced");
    // SAFETY: the logger follows ncclDebugLogger_t; "%s" consumes exactly the one C string passed,
    // and both strings outlive the call.
    unsafe { f(level, SUBSYSTEM_NET, c"fake-tcpx".as_ptr(), 0, c"%s".as_ptr(), text.as_ptr()) };
}
