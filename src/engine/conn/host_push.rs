//! Pushing bytes of ours into our staging area (`local::staging_area`, `state/staging.rs`): a
//! staged write's source on its posting thread, a staged read's on the connection's worker. Each
//! piece enters the push gate for its source region, so a deregistration waits for the piece under
//! way and no piece starts after it; the pieces left are then marked aborted, so the peer's drain
//! stops at once instead of waiting for bytes that never come.
//!
//! Why a gate of its own: the worker's gate (`host_worker.rs`) follows one job at a time, while
//! pushes run on any number of posting threads at once, each from its own region.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::state::PushJob;
use crate::engine::local::staging_area::cut_pieces;
use crate::error::{Error, Result};

/// How often a deregistration looks again at a push under way.
const GATE_POLL: Duration = Duration::from_micros(50);

/// The pieces being pushed, by source region.
#[derive(Default)]
pub(super) struct PushGate {
    /// Region id and pieces under way from it. A few entries at most: one per pushing thread.
    active: Mutex<Vec<(u64, usize)>>,
    closed: AtomicBool,
}

/// A piece under way from a region (see [`PushGate::enter`]).
struct Inside<'a> {
    gate: &'a PushGate,
    region: u64,
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let mut active = self.gate.active.lock();
        if let Some(at) = active.iter().position(|&(r, _)| r == self.region) {
            active[at].1 -= 1;
            if active[at].1 == 0 {
                active.swap_remove(at);
            }
        }
    }
}

impl PushGate {
    /// Announces a piece from `region`; `None` (nothing announced) when the region was
    /// deregistered or the connection failed. The count is taken under the lock that
    /// `wait_clear` reads it under, after the region was marked removed: either this sees the
    /// mark, or the deregistration sees the piece.
    fn enter(&self, region: &crate::engine::region::Region) -> Option<Inside<'_>> {
        {
            let mut active = self.active.lock();
            match active.iter_mut().find(|(r, _)| *r == region.id) {
                Some((_, n)) => *n += 1,
                None => active.push((region.id, 1)),
            }
        }
        let inside = Inside { gate: self, region: region.id };
        if self.closed.load(Ordering::Acquire) || region.is_removed() {
            return None;
        }
        Some(inside)
    }

    /// Returns once no piece from `region` (marked removed already) is under way.
    pub fn wait_clear(&self, region: u64) {
        while self.active.lock().iter().any(|&(r, _)| r == region) {
            std::thread::sleep(GATE_POLL);
        }
    }

    /// The connection failed: no piece starts any more (pushes read only our memory, so the
    /// pieces under way need no wait).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Pushes `job` piece by piece through `gate`; after a refusal (or a failed piece) marks every
/// piece left aborted. The peer learns of the outcome from the marks alone.
pub(super) fn push(job: &PushJob, gate: &PushGate) -> Result<()> {
    let pieces = cut_pieces(&job.src, job.len);
    let mut failed = None;
    for (k, piece) in pieces.iter().enumerate() {
        let k = u32::try_from(k).map_err(|_| Error::internal("a push of more than 2^32 pieces"))?;
        if failed.is_none() {
            let Some(_inside) = gate.enter(&job.region) else {
                failed = Some(Error::not_allowed("the memory region was deregistered during the transfer"));
                job.area.abort_piece(&job.range, k)?;
                continue;
            };
            // SAFETY: `piece` lies in `job.region`, a live registration of ours (checked at post,
            // or authorized for the peer's read), and the gate keeps its deregistration from
            // returning until the piece is done; this thread alone pushes this range.
            match unsafe { job.area.push_piece(&job.range, k, piece) } {
                Ok(()) => continue,
                Err(e) => failed = Some(e),
            }
        }
        job.area.abort_piece(&job.range, k)?;
    }
    failed.map_or(Ok(()), Err)
}
