//! What the same-host paths tell their connection's opt-in traces (`UCCL_TCPX_TRACE_DEVICE_COPY`,
//! `UCCL_TCPX_TRACE_HOST_COPY`): plain marks behind traits the connection implements over its
//! tracers, so that nothing here names them.

use std::sync::Arc;

/// Who noticed that a batch of device copies finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seer {
    /// The caller's own poll (`poll`, `xfer_status`).
    Poll,
    /// The caller's own wait, blocked on the event.
    Wait,
    /// The engine's progress thread.
    Progress,
    /// The connection failed and waited for its copies.
    Failure,
}

/// What a transfer's post did before its device copies were queued.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Post {
    /// When the call entered the connection, in CLOCK_MONOTONIC ns.
    pub at: u64,
    /// Asks the call waited for (once per region and token, or again for a window outside the grant).
    pub asks: u32,
    /// Time those asks took, in ns (the round trip and the mapping).
    pub ask_ns: u64,
}

/// The same-host GPU path's timeline.
pub(crate) trait CopyTrace: Send + Sync {
    /// A transfer's batches were queued: `batches` of them, `bytes` in all.
    fn issued(&self, transfer: u64, write: bool, bytes: u64, batches: u32, post: Post);
    /// A batch of `transfer` was seen finished, by `by`.
    fn seen(&self, transfer: u64, by: Seer);
}

/// The steps of one host copy job, marked by the threads that copy it.
pub(crate) trait JobTrace: Send + Sync {
    /// The job was offered to the process's copy helpers.
    fn offered(&self);
    /// A helper joined the job.
    fn joined(&self);
    /// A piece of `bytes` started at `start` (CLOCK_MONOTONIC ns) is done.
    fn piece(&self, start: u64, bytes: u64);
}

/// One traced host copy job, from the moment the worker or a caller picked it up.
pub(crate) trait TracedJob {
    /// Where the job's threads mark their steps.
    fn marks(&self) -> Arc<dyn JobTrace>;
    /// The job ended, `len` bytes of `transfer`'s read (`None`: the peer's write); `times`: when
    /// it was queued and when picked up (CLOCK_MONOTONIC ns); `by_caller`: on a caller's thread
    /// rather than the worker's.
    fn copied(self: Box<Self>, transfer: Option<u64>, len: u64, times: (u64, u64), by_caller: bool);
}
