//! Test-only fault hook: makes the next thread of a chosen kind panic at that kind's fault point,
//! or fail its next epoll wait (the epoll threads' failure path, which only a programming error
//! takes otherwise).
//!
//! A runtime switch rather than a cargo feature: integration tests link the library as it is built
//! for users, and a feature enabled for them would reach every build that unifies features with
//! the tests. Unused, a fault point costs one relaxed load of a static that nothing writes (no
//! cache line bounces) and a predicted branch. The switch is a Rust function only; the C ABI
//! exports nothing that reaches it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

use super::kind::ThreadKind;

/// One bit per `ThreadKind` armed and not yet fired.
static ARMED: AtomicU32 = AtomicU32::new(0);
/// One bit per `ThreadKind` whose next epoll wait is to fail, not yet fired.
static WAIT_FAILS: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// The kind of library thread this is (`None` in callers' threads), so that a point shared
    /// with callers' code paths only ever fires in the thread kind it stands for.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Makes the next `kind` thread (of any engine in the process) that reaches its fault point
/// panic, once. Test support; never needed in use.
pub fn inject_panic(kind: ThreadKind) {
    ARMED.fetch_or(kind.bit(), Ordering::AcqRel);
}

/// Withdraws a panic injected for `kind` that has not fired yet, so that a test which ended
/// before its panic fired leaves no armed fault point to the next test of the process.
pub fn clear_panic(kind: ThreadKind) {
    ARMED.fetch_and(!kind.bit(), Ordering::AcqRel);
}

/// Whether a panic injected for `kind` has not fired yet.
pub fn panic_pending(kind: ThreadKind) -> bool {
    armed(kind)
}

/// Makes the next epoll wait of a `kind` thread (a socket helper or control reactor thread, of any
/// engine in the process) fail with EBADF, once. Test support; never needed in use.
pub fn inject_wait_failure(kind: ThreadKind) {
    WAIT_FAILS.fetch_or(kind.bit(), Ordering::AcqRel);
}

/// Withdraws a wait failure injected for `kind` that has not fired yet, as `clear_panic` does for
/// a panic.
pub fn clear_wait_failure(kind: ThreadKind) {
    WAIT_FAILS.fetch_and(!kind.bit(), Ordering::AcqRel);
}

/// Whether a wait failure injected for `kind` has not fired yet.
pub fn wait_failure_pending(kind: ThreadKind) -> bool {
    WAIT_FAILS.load(Ordering::Relaxed) & kind.bit() != 0
}

/// A wait fault point of `kind`'s threads: whether this wait is to fail, once a failure was
/// injected for `kind` and this is such a thread.
#[inline]
pub(crate) fn wait_fails(kind: ThreadKind) -> bool {
    WAIT_FAILS.load(Ordering::Relaxed) != 0 && take(&WAIT_FAILS, kind)
}

pub(crate) fn armed(kind: ThreadKind) -> bool {
    ARMED.load(Ordering::Relaxed) & kind.bit() != 0
}

/// Records which kind of library thread the calling thread is.
pub(super) fn enter(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// Makes the calling thread `kind` until it says otherwise; returns what it was.
pub(super) fn swap_kind(kind: Option<ThreadKind>) -> Option<ThreadKind> {
    KIND.with(|k| k.replace(kind))
}

/// A fault point of `kind`'s threads: panics here if a panic was injected for `kind` and this is
/// such a thread.
#[inline]
pub(crate) fn point(kind: ThreadKind) {
    if ARMED.load(Ordering::Relaxed) != 0 {
        fire(kind);
    }
}

#[cold]
#[inline(never)]
fn fire(kind: ThreadKind) {
    if take(&ARMED, kind) {
        panic!("injected panic in the {kind}");
    }
}

/// Disarms `kind` in `armed` if this is a `kind` thread; whether it was armed.
#[cold]
#[inline(never)]
fn take(armed: &AtomicU32, kind: ThreadKind) -> bool {
    KIND.with(Cell::get) == Some(kind) && armed.fetch_and(!kind.bit(), Ordering::AcqRel) & kind.bit() != 0
}
