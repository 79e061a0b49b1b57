//! The logger handed to the plugin's `init`: the C shim (`logger.c`) formats each message and calls
//! [`sink`], which forwards it to the `log` crate and remembers the latest warning so that errors
//! from plugin calls can quote it (the plugin's return codes alone say almost nothing).

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int, c_ulong};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::ncclnet::{NCCL_LOG_ABORT, NCCL_LOG_INFO, NCCL_LOG_TRACE, NCCL_LOG_VERSION, NCCL_LOG_WARN, NcclDebugLogger};

type Sink = extern "C" fn(level: c_int, flags: c_ulong, file: *const c_char, line: c_int, msg: *const c_char);

unsafe extern "C" {
    fn uccl_tcpx_plugin_log_setup(sink: Sink, max_level: c_int);
    pub(crate) fn uccl_tcpx_plugin_logger(
        level: c_int,
        flags: c_ulong,
        file: *const c_char,
        line: c_int,
        fmt: *const c_char,
        ...
    );
}

/// Numbers warnings, so an error can tell the ones its own call produced from older ones.
static WARNINGS: AtomicU64 = AtomicU64::new(0);
/// The latest WARN or ABORT line any plugin logged, from any thread (helper threads report socket
/// errors that a later `test` only sees as a bare return code).
static LAST_WARNING: Mutex<Option<(u64, String)>> = Mutex::new(None);

thread_local! {
    /// The latest warning logged on this thread: what a failing call itself said.
    static THREAD_WARNING: RefCell<Option<(u64, String)>> = const { RefCell::new(None) };
}

/// The logger to pass to `init`; installs the sink on first use.
pub fn logger() -> NcclDebugLogger {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let max = match log::max_level() {
            log::LevelFilter::Trace => NCCL_LOG_TRACE,
            log::LevelFilter::Debug | log::LevelFilter::Info => NCCL_LOG_INFO,
            _ => NCCL_LOG_WARN,
        };
        // SAFETY: stores a function pointer and an int in the shim's statics.
        unsafe { uccl_tcpx_plugin_log_setup(sink, max) };
    });
    Some(uccl_tcpx_plugin_logger)
}

/// The plugin's latest warning, for error messages.
pub fn last_warning() -> Option<String> {
    LAST_WARNING.lock().as_ref().map(|(_, w)| w.clone())
}

/// Taken before a plugin call, so [`warning_suffix`] can quote what that call logged.
pub fn mark() -> u64 {
    WARNINGS.load(Ordering::Acquire)
}

/// Text to append to a plugin error: the warning this thread logged since `since` (the failing
/// call's own words), else any newer warning (a helper thread's), else the last one, marked older.
pub fn warning_suffix(since: u64) -> String {
    let own = THREAD_WARNING.with(|w| w.borrow().clone()).filter(|(seq, _)| *seq > since);
    let any = LAST_WARNING.lock().clone();
    match (own, any) {
        (Some((_, w)), _) => format!("; the plugin said: {w}"),
        (None, Some((seq, w))) if seq > since => format!("; the plugin said: {w}"),
        (None, Some((_, w))) => format!("; the plugin's last warning, from before this call: {w}"),
        (None, None) => "; the plugin logged no warning".to_owned(),
    }
}

extern "C" fn sink(level: c_int, flags: c_ulong, file: *const c_char, line: c_int, msg: *const c_char) {
    // A panic must not unwind into the plugin's C++ frames; losing one log line is the lesser harm.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: the shim passes NUL-terminated strings (its own buffer, the plugin's file name or NULL).
        let text = |p: *const c_char| (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy());
        let msg = text(msg).unwrap_or_default();
        let file = text(file).unwrap_or_default();
        record(level, flags, &file, line, &msg);
    });
}

fn record(level: c_int, flags: c_ulong, file: &str, line: c_int, msg: &str) {
    let msg = msg.trim_end();
    match level {
        NCCL_LOG_WARN | NCCL_LOG_ABORT => {
            log::warn!(target: "uccl_tcpx::plugin", "{msg} ({file}:{line})");
            let seq = WARNINGS.fetch_add(1, Ordering::AcqRel) + 1;
            THREAD_WARNING.with(|w| *w.borrow_mut() = Some((seq, msg.to_owned())));
            *LAST_WARNING.lock() = Some((seq, msg.to_owned()));
        }
        NCCL_LOG_VERSION | NCCL_LOG_INFO => log::info!(target: "uccl_tcpx::plugin", "{msg} [subsys {flags:#x}]"),
        _ => log::trace!(target: "uccl_tcpx::plugin", "{msg} ({file}:{line})"),
    }
    #[cfg(test)]
    tests::capture(level, file, line, msg);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    static CAPTURED: Mutex<Vec<(c_int, String, c_int, String)>> = Mutex::new(Vec::new());

    pub(super) fn capture(level: c_int, file: &str, line: c_int, msg: &str) {
        CAPTURED.lock().push((level, file.to_owned(), line, msg.to_owned()));
    }

    fn captured(needle: &str) -> Vec<(c_int, String, c_int, String)> {
        CAPTURED.lock().iter().filter(|c| c.3.contains(needle)).cloned().collect()
    }

    #[test]
    fn c_shim_formats_varargs_and_reaches_rust() {
        let log = logger().expect("a logger");
        // SAFETY: NUL-terminated literals and arguments that match the format.
        unsafe {
            log(
                NCCL_LOG_WARN,
                16,
                c"net_tcpx.cc".as_ptr(),
                321,
                c"shim-check %d of %s, %lu pages %5.2f".as_ptr(),
                42 as c_int,
                c"comm 7".as_ptr(),
                9_000_000_000u64 as c_ulong,
                2.5f64,
            );
        }
        let got = captured("shim-check");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got[0],
            (NCCL_LOG_WARN, "net_tcpx.cc".into(), 321, "shim-check 42 of comm 7, 9000000000 pages  2.50".into())
        );
        assert!(last_warning().is_some(), "a WARN is remembered for error messages");
    }

    #[test]
    fn errors_quote_the_warning_of_their_own_call() {
        let log = logger().expect("a logger");
        let before = mark();
        assert!(!warning_suffix(before).contains("quote-check"));
        // SAFETY: literal format without conversions.
        unsafe { log(NCCL_LOG_WARN, 0, c"f".as_ptr(), 1, c"quote-check: peer reset".as_ptr()) };
        assert_eq!(warning_suffix(before), "; the plugin said: quote-check: peer reset");
        // From another thread's point of view it is still newer than `before`, unless newer ones came.
        let elsewhere = std::thread::spawn(move || warning_suffix(before)).join().unwrap();
        assert!(elsewhere.starts_with("; the plugin said: "), "{elsewhere}");
        let later = mark();
        assert!(warning_suffix(later).contains("from before this call"), "{}", warning_suffix(later));
    }

    #[test]
    fn long_messages_are_truncated_not_overflowed_and_null_file_is_fine() {
        let long = "x".repeat(5000);
        let fmt = std::ffi::CString::new("long-check %s").unwrap();
        let arg = std::ffi::CString::new(long).unwrap();
        let log = logger().expect("a logger");
        // SAFETY: valid format and argument; a NULL file is allowed by the shim and the sink.
        unsafe { log(NCCL_LOG_WARN, 0, std::ptr::null(), 0, fmt.as_ptr(), arg.as_ptr()) };
        let got = captured("long-check");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].3.len(), 1023, "formatted into the shim's 1 KiB buffer, NUL included");
        assert_eq!(got[0].1, "");
    }

    #[test]
    fn levels_above_the_filter_are_dropped_before_formatting() {
        let log = logger().expect("a logger");
        // The test binary installs no logger, so log::max_level() is Off: INFO and TRACE are filtered
        // in C; WARN still passes because errors quote it.
        // SAFETY: literal format without conversions.
        unsafe {
            log(NCCL_LOG_TRACE, 0, c"f".as_ptr(), 1, c"filter-check trace".as_ptr());
            log(NCCL_LOG_INFO, 0, c"f".as_ptr(), 1, c"filter-check info".as_ptr());
            log(NCCL_LOG_ABORT, 0, c"f".as_ptr(), 1, c"filter-check abort".as_ptr());
        }
        let got: Vec<String> = captured("filter-check").into_iter().map(|c| c.3).collect();
        assert_eq!(got, vec!["filter-check abort".to_owned()]);
    }
}
