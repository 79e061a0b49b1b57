//! Pushing bytes of ours into our staging area (`local::staging_area`, `state/staging.rs`): a
//! staged write's source on its posting thread, a staged read's on the connection's worker, a
//! large one shared with the process's copy helpers (`local::copiers`) as copies are. Each piece
//! is counted on its source region (`Region::push_started`), so a deregistration waits for the
//! pieces under way and no piece starts after it, and passes the connection's push gate, which
//! its failure closes; every piece left is then marked aborted, so the peer's drain stops at once
//! instead of waiting for bytes that never come. Every piece of a push ends marked, pushed or
//! aborted, before the push returns.
//!
//! Why not the worker's gate (`host_worker.rs`): it follows one job at a time, while pushes run on
//! any number of posting threads at once, each from its own region; a count on the region needs
//! no lock shared by them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::state::PushJob;
use crate::engine::local::copiers::{self, Turns};
use crate::engine::local::staging_area::{PieceCut, cut_pieces};
use crate::engine::region::Region;
use crate::error::{Error, Result, UcclStatus};
use crate::threads::panic_text;

/// Whether the connection's pushes may still start pieces.
#[derive(Default)]
pub(super) struct PushGate {
    closed: AtomicBool,
}

/// A piece under way from a region (see [`PushGate::enter`]).
struct Inside<'a>(&'a Region);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.push_ended();
    }
}

impl PushGate {
    /// Announces a piece from `region`; `None` (nothing announced) when the region was
    /// deregistered or the connection failed.
    fn enter<'a>(&self, region: &'a Region) -> Option<Inside<'a>> {
        if self.is_closed() || !region.push_started() {
            return None;
        }
        Some(Inside(region))
    }

    /// The connection failed: no piece starts any more (pushes read only our memory, so the
    /// pieces under way need no wait).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// One push's pieces and how far they got, shared by the threads pushing it.
struct SharedPush {
    job: PushJob,
    pieces: PieceCut,
    gate: Arc<PushGate>,
    /// Who takes which piece, and when all are marked, pushed or aborted (after a failure the
    /// rest are marked aborted).
    turns: Turns,
    failure: Mutex<Option<Error>>,
}

impl SharedPush {
    /// Takes pieces until none is left; after a failure the rest are only marked aborted.
    fn take_pieces(&self) {
        while let Some(k) = self.turns.claim() {
            let pushed = if self.turns.stopped() {
                Err(None)
            } else {
                catch_unwind(AssertUnwindSafe(|| self.piece(k))).unwrap_or_else(|panic| {
                    let err = Error::internal(format!("a staging push panicked: {}", panic_text(&*panic)));
                    log::error!("{}", err.message());
                    Err(Some(err))
                })
            };
            if let Err(failure) = pushed {
                if let Some(e) = failure {
                    self.failure.lock().get_or_insert(e);
                }
                self.turns.stop();
                // Within the range by construction: the only error `abort_piece` knows.
                let _ = self.job.area.abort_piece(&self.job.range, k as u32);
            }
            self.turns.done();
        }
    }

    /// Pushes piece `k` through the gate.
    fn piece(&self, k: usize) -> std::result::Result<(), Option<Error>> {
        let Some(_inside) = self.gate.enter(&self.job.region) else {
            return Err(Some(if self.gate.is_closed() {
                Error::new(UcclStatus::ErrCanceled, "the connection failed during the transfer")
            } else {
                Error::not_allowed("the memory region was deregistered during the transfer")
            }));
        };
        // SAFETY: the piece lies in `job.region`, a live registration of ours (checked at post,
        // or authorized for the peer's read), and the gate keeps its deregistration from returning
        // until the piece is done; piece `k` is this thread's alone.
        let pushed = unsafe { self.job.area.push_piece(&self.job.range, k as u32, self.pieces.piece(k)) };
        #[cfg(test)]
        AFTER_PIECE.with_borrow_mut(|hook| {
            if let Some(hook) = hook {
                hook(k);
            }
        });
        pushed.map_err(Some)
    }
}

#[cfg(test)]
type PieceHook = Box<dyn FnMut(usize)>;

#[cfg(test)]
thread_local! {
    /// Called on this thread with `k` after its push of piece `k`, the piece's count still held:
    /// lets a test fail the connection at a chosen point of a push instead of racing the pushing
    /// thread. Per thread, so that the other tests' pushes, run in parallel, never reach it.
    static AFTER_PIECE: std::cell::RefCell<Option<PieceHook>> = const { std::cell::RefCell::new(None) };
}

impl copiers::Shared for SharedPush {
    fn help(&self) {
        self.take_pieces();
    }

    fn open(&self) -> bool {
        self.turns.open()
    }
}

/// Pushes `job` through `gate` on this thread, with up to `threads - 1` copy helpers for a large
/// one (which look for the next job for `spin` afterwards), and returns once every piece is
/// marked. The peer learns of a failure from the aborted marks alone.
pub(super) fn push(job: PushJob, gate: &Arc<PushGate>, threads: usize, spin: Duration) -> Result<()> {
    let pieces = cut_pieces(&job.src, job.len);
    let threads = copiers::threads_for(job.len, threads);
    let helpers = (threads - 1).min(pieces.len().saturating_sub(1));
    let turns = Turns::new(pieces.len());
    let shared = Arc::new(SharedPush { job, pieces, gate: gate.clone(), turns, failure: Mutex::new(None) });
    let offer = (helpers > 0).then(|| copiers::offer(shared.clone(), helpers, spin));
    shared.take_pieces();
    drop(offer);
    shared.turns.wait_all();
    shared.failure.lock().take().map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::local::PeerProcess;
    use crate::engine::local::staging_area::{Mark, OutboundArea, Patience, PeerArea, STAGE_PIECE};
    use crate::engine::region::RegionTable;
    use crate::transport::{IoSeg, MemKind};

    const P: usize = STAGE_PIECE as usize;

    /// A push of `src` (in `table`'s region `id`) into a fresh range of `area`.
    fn job(area: &Arc<OutboundArea>, table: &RegionTable, id: u64, src: &[u8]) -> PushJob {
        let range = area.alloc(src.len() as u64).unwrap();
        let region = table.get(id).unwrap();
        let len = src.len() as u64;
        let src = vec![IoSeg { addr: src.as_ptr() as usize, len: src.len() }];
        PushJob { op: 1, write: true, area: area.clone(), range, region, src, len }
    }

    fn marks(peer: &PeerArea, job_first: u32, pieces: u32, generation: u64) -> Vec<Mark> {
        let ok = || Ok(());
        let patience = Patience { spin: Duration::ZERO, limit: Duration::from_secs(5), healthy: &ok };
        (0..pieces).map(|k| peer.wait(job_first + k, generation, &patience).unwrap()).collect()
    }

    #[test]
    fn a_large_push_is_shared_and_every_piece_lands_marked() {
        let area = Arc::new(OutboundArea::create(4 << 20).unwrap());
        let peer = PeerArea::open(&PeerProcess::open(std::process::id()).unwrap(), area.fd(), area.len()).unwrap();
        let table = RegionTable::default();
        let src: Vec<u8> = (0..3 * P + 17).map(|i| (i % 247) as u8).collect();
        let id = table.register(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
        let job = job(&area, &table, id, &src);
        let (range, len) = (job.range, job.len);
        let gate = Arc::new(PushGate::default());
        push(job, &gate, 4, Duration::ZERO).unwrap();
        assert_eq!(marks(&peer, range.first_piece, range.pieces, range.generation), [Mark::Pushed; 4]);
        let mut back = vec![0u8; src.len()];
        let dst = [IoSeg { addr: back.as_mut_ptr() as usize, len: back.len() }];
        let into = cut_pieces(&dst, len);
        for k in 0..into.len() {
            // SAFETY: `back` is ours and untouched meanwhile.
            unsafe { peer.drain_piece(range.first_piece + k as u32, into.piece(k)) }.unwrap();
        }
        assert_eq!(back, src);
        assert_eq!(table.get(id).unwrap().pushes_in_flight(), 0, "no piece left announced");
    }

    #[test]
    fn a_deregistered_source_or_a_closed_gate_marks_every_piece_aborted() {
        let area = Arc::new(OutboundArea::create(4 << 20).unwrap());
        let peer = PeerArea::open(&PeerProcess::open(std::process::id()).unwrap(), area.fd(), area.len()).unwrap();
        let table = RegionTable::default();
        let src = vec![3u8; 2 * P];
        let id = table.register(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
        let gate = Arc::new(PushGate::default());

        let closed = job(&area, &table, id, &src);
        let range = closed.range;
        let shut = Arc::new(PushGate::default());
        shut.close();
        let err = push(closed, &shut, 4, Duration::ZERO).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrCanceled);
        assert_eq!(marks(&peer, range.first_piece, range.pieces, range.generation), [Mark::Aborted; 2]);

        let gone = job(&area, &table, id, &src);
        let range = gone.range;
        table.remove(id).unwrap().wait_for_pushes();
        let err = push(gone, &gate, 4, Duration::ZERO).unwrap_err();
        assert!(err.message().contains("deregistered"), "{err}");
        assert_eq!(marks(&peer, range.first_piece, range.pieces, range.generation), [Mark::Aborted; 2]);
    }

    /// The connection failing during a push, then the source's deregistration: the failure stops
    /// the pieces not started (aborted, the push failing as canceled), the piece under way ends,
    /// nothing stays counted on the region, and its deregistration returns. The region is removed
    /// only once the push returned, so that the closed gate alone cuts the push: removed earlier,
    /// the removal would refuse the next piece just as well.
    #[test]
    fn a_deregistration_returns_on_a_push_of_a_failed_connection() {
        const PIECES: usize = 64;
        let area = Arc::new(OutboundArea::create((PIECES * P) as u64).unwrap());
        let peer = PeerArea::open(&PeerProcess::open(std::process::id()).unwrap(), area.fd(), area.len()).unwrap();
        let table = RegionTable::default();
        let src = vec![5u8; PIECES * P];
        let id = table.register(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        let gate = Arc::new(PushGate::default());
        let job = job(&area, &table, id, &src);
        let range = job.range;
        let (parked, at_piece_0) = std::sync::mpsc::channel();
        // Dropped if the test fails first, which releases the pusher too.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let pushing = std::thread::spawn({
            let gate = gate.clone();
            move || {
                AFTER_PIECE.set(Some(Box::new(move |k| {
                    if k == 0 {
                        let _ = parked.send(());
                        let _ = released.recv();
                    }
                })));
                push(job, &gate, 1, Duration::ZERO)
            }
        });
        at_piece_0.recv_timeout(Duration::from_secs(10)).expect("piece 0 was pushed");
        assert_eq!(region.pushes_in_flight(), 1, "piece 0 is under way when the connection fails");
        gate.close();
        release.send(()).unwrap();
        let err = pushing.join().unwrap().expect_err("the push stops at the closed gate");
        assert_eq!(err.status(), UcclStatus::ErrCanceled, "{err}");
        assert_eq!(region.pushes_in_flight(), 0, "piece 0 ended, no later one was counted");
        let marks = marks(&peer, range.first_piece, range.pieces, range.generation);
        assert_eq!(marks[0], Mark::Pushed);
        assert_eq!(marks[1..], [Mark::Aborted; PIECES - 1], "no piece was pushed after the failure");

        let removed = table.remove(id).unwrap();
        let (done, waited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            removed.wait_for_pushes();
            let _ = done.send(());
        });
        waited.recv_timeout(Duration::from_secs(10)).expect("the deregistration returned");
    }
}
