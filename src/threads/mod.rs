//! The threads the library starts, and what happens when one of them panics.
//!
//! Every library thread runs its body through [`spawn_contained`]: a panic ends that thread, is
//! logged once, and is handed to the thread's owner as an internal error, which fails what the
//! thread served and wakes whoever waits on it. Nothing else would: a thread that unwinds silently
//! leaves its waiters blocked for good (a dead progress thread also takes the stall timeout with
//! it). The fault hook ([`inject_panic`]) lets tests make a chosen kind of thread panic at a
//! chosen point.

mod contain;
mod fault;
mod kind;
mod queue;
mod warm;

/// The message of a panic payload, for tools that catch panics of their own threads (the bench).
#[doc(hidden)]
pub use contain::panic_text;
pub(crate) use contain::{run_contained, spawn_contained};
pub(crate) use fault::{armed, point, wait_fails};
#[doc(hidden)]
pub use fault::{
    clear_panic, clear_wait_failure, inject_panic, inject_wait_failure, panic_pending, wait_failure_pending,
};
pub use kind::ThreadKind;
pub(crate) use queue::{Look, WorkQueue, serve};
pub(crate) use warm::on_start;
