//! Messages go to the logger `init` received, as TCPX's do. The logger is C-variadic: it is always
//! called with the format "%s" and one C string, so no caller text is ever interpreted as a format.
//!
//! The request trace (`FAKE_TCPX_DEBUG=1`) goes to stderr instead: a consumer's logger may drop
//! INFO lines (NCCL prints them only with `NCCL_DEBUG=INFO` and the NET subsystem), and the trace
//! must reach the terminal of a run that hangs.

use std::ffi::{CString, c_int, c_ulong};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use uccl_tcpx::internal::ncclnet::{NCCL_LOG_INFO, NCCL_LOG_WARN, NcclDebugLogger};

/// `NCCL_NET`, the subsystem flag of every message.
const SUBSYSTEM_NET: c_ulong = 16;

static LOGGER: Mutex<NcclDebugLogger> = Mutex::new(None);
static TRACE: AtomicBool = AtomicBool::new(false);
static TRACE_START: OnceLock<Instant> = OnceLock::new();

/// Makes `logger` the one every later message goes to. Every `init` call does this first, the
/// failing second one included, as TCPX's does.
pub fn install(logger: NcclDebugLogger) {
    *LOGGER.lock().unwrap_or_else(|p| p.into_inner()) = logger;
}

/// Turns the request trace on or off (`init` does, from `FAKE_TCPX_DEBUG`).
pub fn set_trace(on: bool) {
    TRACE_START.get_or_init(Instant::now);
    TRACE.store(on, Ordering::Relaxed);
}

pub fn tracing() -> bool {
    TRACE.load(Ordering::Relaxed)
}

/// One line of the request trace, if it is on; `msg` is formatted only then. Each line carries the
/// process id and the seconds since `init`, so the two ends' traces interleave by time, and a gap
/// shows where a call blocked.
pub fn trace(msg: impl FnOnce() -> String) {
    if !tracing() {
        return;
    }
    let t = TRACE_START.get_or_init(Instant::now).elapsed().as_secs_f64();
    let line = format!("fake-tcpx[{}] {t:.6} {}\n", std::process::id(), msg());
    // One write per line, so lines of concurrent threads do not interleave; a failed write to
    // stderr is no reason to fail the call being traced.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
