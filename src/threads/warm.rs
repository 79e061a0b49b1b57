//! Work a library thread that may touch a GPU does when it starts: the CUDA driver sets up each
//! thread at its first call (a new thread's first 4 KiB copy took 28-40 us on an H100 against
//! 7-9 us for its next ones), which would otherwise fall on the first transfer that thread serves
//! (a connection's first inline write, read by a control reactor thread started as it connected).
//! The CUDA module registers the work once a GPU is in use; without one, threads start as before.

use std::sync::OnceLock;

use super::ThreadKind;

static ON_START: OnceLock<fn()> = OnceLock::new();

/// Registers what a GPU-touching thread runs when it starts (the first registration stays).
pub fn on_start(work: fn()) {
    let _ = ON_START.set(work);
}

/// Runs the registered work if `kind` of thread may touch a GPU.
pub(super) fn starting(kind: ThreadKind) {
    if touches_gpu(kind)
        && let Some(work) = ON_START.get()
    {
        work();
    }
}

/// The threads that issue device copies or query their events: inline payloads (control
/// reactors), staged chunks (progress thread, socket helpers, landing copiers), same-host copies.
fn touches_gpu(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::Progress
            | ThreadKind::ControlReactor
            | ThreadKind::SocketSender
            | ThreadKind::SocketReceiver
            | ThreadKind::LandingCopier
            | ThreadKind::HostCopier
    )
}
