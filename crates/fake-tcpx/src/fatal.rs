//! Where TCPX calls `exit(1)` the fake ends the process too, after the WARN with TCPX's message:
//! more than 2048 fragments in one receive (`net_tcpx.cc` `tcpxTest`, `sock/tcpx.h`
//! `process_recv_cmsg`: "failstop"), and payload that reached the socket outside device memory
//! ("data landed on host memory", "no cmsg", "no data", "cmsg truncated": `sock/tcpx.h`, fatal
//! because `macro.h` defines `EXIT_ON_CMSG_ERRORS`). `FAKE_TCPX_ON_FATAL=rc` turns each into rc 3
//! from the call, with the comm left failed, for tests that want to observe it in-process.
//!
//! TCPXO ends the process with `LOG(FATAL)` (an abort) where `init` fails, and reads freed memory
//! where a request it reported done is tested again; the fake ends the process there too, with
//! status 1, and its rc is TCPXO's 2 (`profile.rs`).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::OnFatal;
use crate::fail::Fail;
use crate::log;
use crate::profile::{self, Kind};

/// Exit until `init` read the knob: a fatal condition before that is one anyway.
static RETURN_RC: AtomicBool = AtomicBool::new(false);

pub fn configure(mode: OnFatal) {
    RETURN_RC.store(mode == OnFatal::Rc, Ordering::Relaxed);
}

/// Exits the process with status 1 after logging `msg`, or (FAKE_TCPX_ON_FATAL=rc) returns the
/// rc-3 failure for the caller to report.
pub fn fatal(msg: String) -> Fail {
    if RETURN_RC.load(Ordering::Relaxed) {
        return Fail::internal(msg);
    }
    let text = match profile::kind() {
        Kind::Tcpx => {
            format!("{msg} (exiting the process with status 1 as TCPX does; FAKE_TCPX_ON_FATAL=rc returns rc 3)")
        }
        Kind::Tcpxo => format!(
            "{msg} (exiting the process with status 1, where TCPXO aborts or reads freed memory; \
             FAKE_TCPX_ON_FATAL=rc returns rc 2)"
        ),
    };
    log::warn(&text);
    // The consumer's logger may filter or buffer WARNs; the reason a process vanished must show.
    eprintln!("NET/FakeTCPX : {text}");
    std::process::exit(1)
}
