//! One copy job of a connection (`host_copy.rs`), shared among threads: the job is cut into pieces
//! that the thread running it (the connection's worker, or a caller: `host_worker.rs`) and the
//! process's copy helpers (`local::copiers`) take in turn, each piece entering the connection's
//! gate, so deregistration and failure stay fences however many threads copy. The running thread
//! returns from a job only once every piece is done, and a helper takes a piece only before that,
//! so no piece of a job runs after the connection moved on.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::host_trace::JobMarks;
use super::host_worker::Gate;
use super::state::StagedSource;
use crate::engine::local::copiers::{self, Turns};
use crate::engine::local::staging_area::{Mark, Patience, PieceCut, cut_pieces};
use crate::engine::local::{PIECE_BYTES, PeerProcess, pieces};
use crate::engine::region::Region;
use crate::error::{Error, UcclStatus};
use crate::threads::{self, ThreadKind, panic_text};
use crate::trace::clock_ns;
use crate::transport::IoSeg;

/// Why a drain fails on a piece its pusher marked aborted (`host_push.rs`).
const ABORTED_PUSH: &str =
    "the push of the source stopped: it was deregistered during the transfer, or the pushing end's connection failed";

/// A smallest piece for the tests of the cut (the configured one is `Config::host_copy_min_piece`):
/// a `process_vm_readv` call costs about 1.5 us besides its copy, 2-7 % of a 256 KiB piece
/// (measured in cache, where the copy is fastest), so no piece is smaller.
#[cfg(test)]
const MIN_PIECE: u64 = 256 << 10;
/// Pieces per copying thread, so that threads that finish early take up the slack of slow ones.
const PIECES_PER_THREAD: u64 = 2;
/// Jobs up to this size whose source lies on huge pages take the smaller pieces of
/// `Config::host_copy_huge_min_piece`: with the source pinned in few steps more threads help
/// without contending; from 16 MiB on the larger pieces stay faster (measured on 32 cores).
const HUGE_PIECES_UP_TO: u64 = 8 << 20;

/// Why a job failed.
pub(super) enum Failure {
    /// The copy failed (the region was deregistered, the connection failed, a bad address).
    Copy(Error),
    /// The kernel took our access to the peer away (EPERM, ESRCH, ENOSYS): the path is off.
    Refused(Error, io::Error),
    /// A copying thread panicked: the connection fails, as it does for its worker's panic.
    Panicked(Error),
}

/// A job's pieces and how far they got.
pub(super) struct SharedJob {
    pieces: Vec<(Vec<IoSeg>, Vec<IoSeg>)>,
    /// Who takes which piece, and when all are done (copied, failed, or skipped after a failure).
    turns: Turns,
    failure: Mutex<Option<Failure>>,
    gate: Arc<Gate>,
    region: Arc<Region>,
    process: Arc<PeerProcess>,
    len: u64,
    /// Where its threads mark their steps, while traced (`host_trace.rs`).
    marks: Option<Arc<JobMarks>>,
    /// The peer staged the bytes: piece `k` is its area's piece `first_piece + k`, waited for,
    /// then copied out of the area (`remote` is empty then).
    staged: Option<Staged>,
}

/// How a staged job's pieces are waited for, and where each lands.
struct Staged {
    source: StagedSource,
    /// Our segments, cut at the area's pieces.
    local: PieceCut,
    /// Looked at without a nap this long first.
    spin: Duration,
    /// The connection's io timeout, for the error.
    limit: Duration,
    /// When every piece's wait ends: the job's start plus `limit`. One deadline for the whole job,
    /// so a peer pushing each piece just inside the limit cannot keep a drain going pieces times
    /// the limit.
    deadline: Instant,
}

impl SharedJob {
    /// Cuts `len` bytes, `local` (ours, in `region`) from `remote` (the peer's), into pieces for up
    /// to `threads` threads, of at least `min_piece` bytes. Called on the thread that runs it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        local: &[IoSeg],
        remote: &[IoSeg],
        len: u64,
        threads: usize,
        min_piece: u64,
        gate: Arc<Gate>,
        region: Arc<Region>,
        process: Arc<PeerProcess>,
    ) -> SharedJob {
        let pieces = pieces(local, remote, piece_bytes(len, threads, min_piece));
        SharedJob {
            turns: Turns::new(pieces.len()),
            pieces,
            failure: Mutex::new(None),
            gate,
            region,
            process,
            len,
            marks: None,
            staged: None,
        }
    }

    /// A job whose `len` bytes the peer staged in `source`: cut into the area's pieces, each
    /// waited for (looking without a nap for `spin`, all of them together at most `limit` from
    /// now) and then copied into `local`.
    #[allow(clippy::too_many_arguments)]
    pub fn staged(
        local: &[IoSeg],
        len: u64,
        (source, spin, limit): (StagedSource, Duration, Duration),
        gate: Arc<Gate>,
        region: Arc<Region>,
        process: Arc<PeerProcess>,
    ) -> SharedJob {
        let local = cut_pieces(local, len);
        let job = SharedJob::new(&[], &[], len, 1, 0, gate, region, process);
        let turns = Turns::new(local.len());
        let staged = Staged { source, local, spin, limit, deadline: Instant::now() + limit };
        SharedJob { turns, staged: Some(staged), ..job }
    }

    /// Marks the job's steps in `marks` (none: untraced).
    pub fn traced(self, marks: Option<Arc<JobMarks>>) -> SharedJob {
        SharedJob { marks, ..self }
    }

    /// Copies the job on this thread with up to `threads - 1` helpers, which look for the next job
    /// for `spin` afterwards; returns once every piece is done.
    pub fn run(self: Arc<Self>, threads: usize, spin: Duration) -> Result<(), Failure> {
        let pieces = self.staged.as_ref().map_or(self.pieces.len(), |staged| staged.local.len());
        let helpers = threads.saturating_sub(1).min(pieces.saturating_sub(1));
        if let (Some(marks), true) = (&self.marks, helpers > 0) {
            marks.offered();
        }
        let offer = (helpers > 0).then(|| copiers::offer(self.clone(), helpers, spin));
        self.take_pieces();
        drop(offer);
        self.turns.wait_all();
        self.failure.lock().take().map_or(Ok(()), Err)
    }

    /// Takes pieces until none is left; after a failure the rest are only counted.
    fn take_pieces(&self) {
        while let Some(k) = self.turns.claim() {
            if !self.turns.stopped() {
                let copied = catch_unwind(AssertUnwindSafe(|| self.piece(k))).unwrap_or_else(|panic| {
                    let kind = if self.turns.on_runner() { ThreadKind::HostCopier } else { ThreadKind::HostCopyHelper };
                    let err = Error::internal(format!("{kind} panicked: {}", panic_text(&*panic)));
                    log::error!("{}", err.message());
                    Err(Failure::Panicked(err))
                });
                if let Err(failure) = copied {
                    self.fail(failure);
                }
            }
            self.turns.done();
        }
    }

    /// Copies piece `k` through the gate.
    fn piece(&self, k: usize) -> Result<(), Failure> {
        let start = self.marks.as_ref().map(|_| clock_ns());
        let (local, remote): (&[IoSeg], &[IoSeg]) = match &self.staged {
            Some(staged) => (staged.local.piece(k), &[]),
            None => (&self.pieces[k].0, &self.pieces[k].1),
        };
        if let Some(staged) = &self.staged {
            // Waited for outside the gate: a deregistration of our region must not wait on the
            // peer's push.
            self.wait_pushed(staged, k)?;
        }
        let Some(_inside) = self.gate.enter(&self.region) else {
            let why = if self.gate.is_closed() {
                Error::new(UcclStatus::ErrCanceled, "the connection failed during the transfer")
            } else {
                Error::not_allowed("the memory region was deregistered during the transfer")
            };
            return Err(Failure::Copy(why));
        };
        threads::point(ThreadKind::HostCopyHelper);
        // `local` lies in `self.region`, a live registration of this engine (the target's window
        // authorized by the region table, or the caller's buffer checked at post), and the gate
        // keeps its deregistration from returning until the piece is done.
        let copied = match &self.staged {
            Some(Staged { source, .. }) => {
                let piece = source.first_piece + k as u32;
                // SAFETY: as said above; the area's piece lies inside its mapping (checked there).
                unsafe { source.area.drain_piece(piece, local) }.map_err(Failure::Copy)
            }
            // SAFETY: as said above. The kernel writes it; segments a peer names twice get either
            // copy's bytes, as overlapping chunks of the network path would.
            None => unsafe { self.process.read_piece(local, remote) }.map_err(|e| self.lost(e)),
        };
        if let (Some(marks), Some(start)) = (&self.marks, start) {
            marks.piece(start, local.iter().map(|s| s.len as u64).sum());
        }
        copied
    }

    /// Waits until the peer pushed staged piece `k`: an aborted piece, a failed connection, an
    /// exited peer, another piece's failure or the job's deadline fail it.
    fn wait_pushed(&self, staged: &Staged, k: usize) -> Result<(), Failure> {
        let healthy = || {
            // The job failed: its result is known, and the running thread waits for this piece.
            if self.turns.stopped() {
                return Err(Error::new(UcclStatus::ErrCanceled, "another piece of the transfer failed"));
            }
            if self.gate.is_closed() {
                return Err(Error::new(UcclStatus::ErrCanceled, "the connection failed during the transfer"));
            }
            self.process.alive().map_err(|e| {
                Error::new(UcclStatus::ErrBackend, format!("peer process {} is gone: {e}", self.process.pid()))
            })
        };
        let source = &staged.source;
        let piece = source.first_piece + k as u32;
        let left = staged.deadline.saturating_duration_since(Instant::now());
        let patience = Patience { spin: staged.spin.min(left), limit: left, healthy: &healthy };
        match source.area.wait(piece, source.generation, &patience) {
            Ok(Mark::Pushed) => Ok(()),
            // The mark carries no reason: either of the pusher's two reasons to stop is told.
            Ok(Mark::Aborted) => Err(Failure::Copy(Error::not_allowed(ABORTED_PUSH))),
            Err(e) if e.status() == UcclStatus::ErrTimeout => Err(Failure::Copy(Error::timeout(format!(
                "the peer did not push staged piece {piece} within {} ms of the transfer's start",
                staged.limit.as_millis()
            )))),
            Err(e) => Err(Failure::Copy(e)),
        }
    }

    /// The first failure is the job's, except that a panic outranks any other. The job stops
    /// only once its failure is in: a piece that gives up because it stopped then finds the
    /// failure that stopped it already recorded, and cannot take its place.
    fn fail(&self, failure: Failure) {
        let mut slot = self.failure.lock();
        if slot.is_none() || matches!(failure, Failure::Panicked(_)) && !matches!(*slot, Some(Failure::Panicked(_))) {
            *slot = Some(failure);
        }
        self.turns.stop();
    }

    /// A failed `process_vm_readv` (or liveness check) as the job's failure.
    fn lost(&self, e: io::Error) -> Failure {
        lost(&self.process, self.len, e)
    }
}

/// A failed `process_vm_readv` of a `len`-byte job (or the peer's liveness check) as its failure.
pub(super) fn lost(process: &PeerProcess, len: u64, e: io::Error) -> Failure {
    let err =
        Error::new(UcclStatus::ErrBackend, format!("copying {len} bytes from peer process {}: {e}", process.pid()));
    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ESRCH | libc::ENOSYS)) {
        Failure::Refused(err, e)
    } else {
        Failure::Copy(err)
    }
}

impl copiers::Shared for SharedJob {
    fn help(&self) {
        if let Some(marks) = &self.marks {
            marks.joined();
        }
        self.take_pieces();
    }

    fn open(&self) -> bool {
        self.turns.open()
    }
}

/// Bytes per piece of a `len`-byte job copied by up to `threads` threads: `PIECES_PER_THREAD`
/// pieces for each, in 64 KiB steps, at least `min_piece` and at most `PIECE_BYTES` (which bounds
/// how long a deregistration waits for a piece under way).
fn piece_bytes(len: u64, threads: usize, min_piece: u64) -> u64 {
    let even = len.div_ceil(threads.max(1) as u64 * PIECES_PER_THREAD);
    even.next_multiple_of(64 << 10).clamp(min_piece.min(PIECE_BYTES), PIECE_BYTES)
}

/// The smallest piece of a `len`-byte job: `huge_min` (set with `Config::host_copy_huge_pages`)
/// for a job of at most `HUGE_PIECES_UP_TO` whose source `on_huge_pages` says lies on huge pages,
/// else `min_piece`. The source is asked about only when its answer could matter: a peer's first
/// answer reads its smaps.
pub(super) fn smallest_piece(
    len: u64,
    min_piece: u32,
    huge_min: Option<u32>,
    on_huge_pages: impl FnOnce() -> bool,
) -> u64 {
    match huge_min {
        Some(huge_min) if len <= HUGE_PIECES_UP_TO && on_huge_pages() => u64::from(huge_min),
        _ => u64::from(min_piece),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::local::staging_area::{MIN_AREA_BYTES, OutboundArea, PeerArea, STAGE_PIECE};
    use crate::engine::region::RegionTable;
    use crate::transport::MemKind;

    /// A staged job of `pieces` pieces drained into a buffer of ours from an area of this process
    /// (standing in for the peer's), with the area to push into, the range and the buffer (bound
    /// whole by each test: the job copies into it until it ends).
    struct Drain {
        job: Arc<SharedJob>,
        area: Arc<OutboundArea>,
        range: crate::engine::local::staging_area::Range,
        _dst: Vec<u8>,
        _table: RegionTable,
    }

    fn drain(pieces: u32, limit: Duration) -> Drain {
        let me = Arc::new(PeerProcess::open(std::process::id()).unwrap());
        let area = Arc::new(OutboundArea::create(MIN_AREA_BYTES).unwrap());
        let peer = Arc::new(PeerArea::open(&me, area.fd(), area.len()).unwrap());
        let len = u64::from(pieces) * STAGE_PIECE;
        let range = area.alloc(len).unwrap();
        let mut dst = vec![0u8; len as usize];
        let table = RegionTable::default();
        let id = table.register(dst.as_mut_ptr() as usize, dst.len(), MemKind::Host).unwrap();
        let region = table.get(id).unwrap();
        let gate = Arc::new(Gate::default());
        gate.begin(&region);
        let source = StagedSource { area: peer, first_piece: range.first_piece, generation: range.generation };
        let local = [IoSeg { addr: dst.as_mut_ptr() as usize, len: dst.len() }];
        let job = SharedJob::staged(&local, len, (source, Duration::ZERO, limit), gate, region, me);
        Drain { job: Arc::new(job), area, range, _dst: dst, _table: table }
    }

    fn failure_text(result: Result<(), Failure>) -> (UcclStatus, String) {
        match result {
            Err(Failure::Copy(e)) => (e.status(), e.message().to_owned()),
            Err(Failure::Refused(e, _) | Failure::Panicked(e)) => panic!("an unexpected failure: {}", e.message()),
            Ok(()) => panic!("the job succeeded"),
        }
    }

    #[test]
    fn a_peer_pushing_each_piece_just_inside_the_limit_fails_the_job_at_the_limit() {
        const PIECES: u32 = 4;
        let limit = Duration::from_millis(400);
        let Drain { job, area, range, _dst, _table } = drain(PIECES, limit);
        let start = Instant::now();
        // Each piece lands three quarters of the limit after the one before: every wait alone
        // stays inside the limit, the job as a whole (three limits) does not.
        let pusher = std::thread::spawn(move || {
            let src = vec![7u8; STAGE_PIECE as usize];
            let seg = [IoSeg { addr: src.as_ptr() as usize, len: src.len() }];
            for k in 0..PIECES {
                std::thread::sleep(limit * 3 / 4);
                // SAFETY: `src` is ours and untouched meanwhile; this thread alone pushes.
                unsafe { area.push_piece(&range, k, &seg) }.unwrap();
            }
        });
        let (status, why) = failure_text(job.run(1, Duration::ZERO));
        let took = start.elapsed();
        assert_eq!(status, UcclStatus::ErrTimeout, "{why}");
        assert!(why.contains("of the transfer's start"), "{why}");
        assert!(took >= limit, "not before the limit: {took:?}");
        // A late wake-up on a loaded machine stretches this; a wait per piece takes twice as long.
        assert!(took < limit * 3, "the job outlived its limit: {took:?}");
        pusher.join().unwrap();
    }

    #[test]
    fn a_job_whose_marks_never_come_fails_at_the_limit_however_late_a_piece_began() {
        let limit = Duration::from_secs(1);
        let Drain { job, _dst, _table, .. } = drain(4, limit);
        let start = Instant::now();
        let first = testkit::poll::background({
            let job = job.clone();
            move || job.take_pieces()
        });
        // A helper joining late (most of the limit later) waits only for what is left of it.
        std::thread::sleep(limit * 4 / 5);
        let late = testkit::poll::background({
            let job = job.clone();
            move || job.take_pieces()
        });
        first.finish(testkit::PATIENCE, "the first waiter");
        late.finish(testkit::PATIENCE, "the late waiter");
        let took = start.elapsed();
        assert!(took >= limit, "not before the limit: {took:?}");
        // A wait of its own would end the late piece at 1.8 limits.
        assert!(took < limit * 3 / 2, "a piece outlived the job's limit: {took:?}");
        assert_eq!(job.turns.done_count(), 4, "every piece counted");
        let failure = job.failure.lock().take();
        let (status, why) = failure_text(failure.map_or(Ok(()), Err));
        assert_eq!(status, UcclStatus::ErrTimeout, "{why}");
    }

    #[test]
    fn one_failing_piece_releases_the_pieces_still_waiting() {
        const PIECES: u32 = 4;
        // Far beyond the test's bound: only the job's stop can end the other waits in time.
        let Drain { job, area, range, _dst, _table } = drain(PIECES, Duration::from_secs(60));
        let waiters: Vec<_> = (0..PIECES)
            .map(|_| {
                let job = job.clone();
                std::thread::spawn(move || job.take_pieces())
            })
            .collect();
        // Every piece taken, so every thread waits on a mark of its own.
        testkit::wait_until("every piece taken", testkit::PATIENCE, || job.turns.claimed() >= PIECES as usize);
        area.abort_piece(&range, 2).unwrap();
        testkit::within(Duration::from_secs(10), "the pieces still waiting", move || {
            waiters.into_iter().for_each(|waiter| waiter.join().unwrap());
        });
        assert_eq!(job.turns.done_count(), PIECES as usize);
        let failure = job.failure.lock().take();
        let (status, why) = failure_text(failure.map_or(Ok(()), Err));
        assert_eq!(status, UcclStatus::ErrNotAllowed, "the aborted piece's failure is the job's: {why}");
        assert!(why.contains("deregistered"), "{why}");
    }

    #[test]
    fn small_jobs_on_huge_pages_take_the_huge_pages_piece() {
        const K: u32 = 1 << 10;
        const M: u64 = 1 << 20;
        let asked = std::cell::Cell::new(0);
        let source = |huge: bool| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                huge
            }
        };
        assert_eq!(smallest_piece(4 * M, 1024 * K, Some(256 * K), source(true)), 256 << 10);
        assert_eq!(smallest_piece(8 * M, 1024 * K, Some(128 * K), source(true)), 128 << 10, "8 MiB included");
        assert_eq!(smallest_piece(4 * M, 1024 * K, Some(256 * K), source(false)), 1 << 20, "small pages");
        assert_eq!(asked.get(), 3);
        assert_eq!(smallest_piece(8 * M + 1, 1024 * K, Some(256 * K), source(true)), 1 << 20, "above 8 MiB");
        assert_eq!(smallest_piece(4 * M, 512 * K, None, source(true)), 512 << 10, "the knob off");
        assert_eq!(asked.get(), 3, "the source is not asked about where its answer cannot matter");
        // What the cut makes of it: 4 MiB on 16 threads in 256 KiB pieces rather than four of 1 MiB.
        assert_eq!(piece_bytes(4 * M, 16, smallest_piece(4 * M, 1024 * K, Some(256 * K), || true)), 256 << 10);
        assert_eq!(piece_bytes(4 * M, 16, smallest_piece(4 * M, 1024 * K, None, || true)), M);
    }

    #[test]
    fn pieces_grow_with_the_job_within_their_bounds() {
        const K: u64 = 1 << 10;
        const M: u64 = 1 << 20;
        assert_eq!(piece_bytes(M, 16, MIN_PIECE), 256 * K, "1 MiB on 16 threads: four pieces of the minimum");
        assert_eq!(piece_bytes(16 * M, 16, MIN_PIECE), 512 * K, "two pieces per thread");
        assert_eq!(piece_bytes(64 * M, 16, MIN_PIECE), 2 * M);
        assert_eq!(piece_bytes(256 * M, 16, MIN_PIECE), PIECE_BYTES, "never above the deregistration bound");
        assert_eq!(piece_bytes(64 * M, 1, MIN_PIECE), PIECE_BYTES);
        assert_eq!(piece_bytes(100 * K, 2, MIN_PIECE), MIN_PIECE);
        assert_eq!(piece_bytes(3 * M + 1, 2, MIN_PIECE), 832 * K, "rounded up to 64 KiB steps");
        assert_eq!(piece_bytes(0, 0, MIN_PIECE), MIN_PIECE);
        assert_eq!(piece_bytes(16 * M, 16, 2 * M), 2 * M, "a larger minimum: eight pieces of 2 MiB");
        assert_eq!(piece_bytes(16 * M, 16, 64 * M), PIECE_BYTES, "the bound holds whatever the minimum");
    }
}
