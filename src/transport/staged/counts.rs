//! Chunks that pipelined staging (`UCCL_TCPX_STAGING_PIPELINE`) moved in parts, over every staged
//! comm of the process: for tests, which see only the bytes arrive and would not notice chunks
//! that quietly went whole.

use std::sync::atomic::{AtomicU64, Ordering};

/// Chunks moved in parts so far, by end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartCounts {
    /// Device chunks sent whose copy into their slot was queued in parts, to be handed to the
    /// inner comm as the parts land.
    pub sent: u64,
    /// Device receives of which a part was copied out of the slot before the whole receive landed.
    pub received: u64,
}

static SENT: AtomicU64 = AtomicU64::new(0);
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Chunks every staged comm of this process moved in parts.
pub fn part_counts() -> PartCounts {
    PartCounts { sent: SENT.load(Ordering::Relaxed), received: RECEIVED.load(Ordering::Relaxed) }
}

pub(super) fn sent_in_parts() {
    SENT.fetch_add(1, Ordering::Relaxed);
}

pub(super) fn received_in_parts() {
    RECEIVED.fetch_add(1, Ordering::Relaxed);
}
