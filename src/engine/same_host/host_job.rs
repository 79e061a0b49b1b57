//! One copy job of a connection (`host_copy.rs`), shared among threads: the job is cut into pieces
//! that the thread running it (the connection's worker, or a caller: `host_worker.rs`) and the
//! process's copy helpers (`same_host::copiers`) take in turn, each piece entering the connection's
//! gate, so deregistration and failure stay fences however many threads copy. The running thread
//! returns from a job only once every piece is done, and a helper takes a piece only before that,
//! so no piece of a job runs after the connection moved on.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::copiers::{self, Turns};
use super::host_worker::Gate;
use super::{PIECE_BYTES, PeerProcess, pieces};
use crate::engine::region::Region;
use crate::error::{Error, UcclStatus};
use crate::threads::{self, ThreadKind, panic_text};
use crate::trace::{self, clock_ns};
use crate::transport::IoSeg;

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
pub(crate) enum Failure {
    /// The copy failed (the region was deregistered, the connection failed, a bad address).
    Copy(Error),
    /// The kernel took our access to the peer away (EPERM, ESRCH, ENOSYS): the path is off.
    Refused(Error, io::Error),
    /// A copying thread panicked: the connection fails, as it does for its worker's panic.
    Panicked(Error),
}

/// A job's pieces and how far they got.
pub(crate) struct SharedJob {
    pieces: Vec<(Vec<IoSeg>, Vec<IoSeg>)>,
    /// Who takes which piece, and when all are done (copied, failed, or skipped after a failure).
    turns: Turns,
    failure: Mutex<Option<Failure>>,
    gate: Arc<Gate>,
    region: Arc<Region>,
    process: Arc<PeerProcess>,
    len: u64,
    /// Its id in the trace's events, while the `host` trace runs.
    marks: Option<u64>,
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
        let sorted = in_remote_order(local, remote);
        let (local, remote) = sorted.as_ref().map_or((local, remote), |(l, r)| (&l[..], &r[..]));
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
        }
    }

    /// Marks the job's steps as the trace's job `marks` (none: untraced).
    pub fn traced(self, marks: Option<u64>) -> SharedJob {
        SharedJob { marks, ..self }
    }

    /// Copies the job on this thread with up to `threads - 1` helpers, which look for the next job
    /// for `spin` afterwards; returns once every piece is done.
    pub fn run(self: Arc<Self>, threads: usize, spin: Duration) -> Result<(), Failure> {
        let pieces = self.pieces.len();
        let helpers = threads.saturating_sub(1).min(pieces.saturating_sub(1));
        if let (Some(job), true) = (self.marks, helpers > 0) {
            trace::event!(HostOffered { job });
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
        let (local, remote) = (&self.pieces[k].0, &self.pieces[k].1);
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
        // SAFETY: as said above. The kernel writes it; segments a peer names twice get either
        // copy's bytes, as overlapping chunks of the network path would.
        let copied = unsafe { self.process.read_piece(local, remote) }.map_err(|e| self.lost(e));
        if let (Some(job), Some(start)) = (self.marks, start) {
            trace::event!(HostPiece { job, start, bytes: local.iter().map(|s| s.len as u64).sum() });
        }
        copied
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
pub(crate) fn lost(process: &PeerProcess, len: u64, e: io::Error) -> Failure {
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
        if let Some(job) = self.marks {
            trace::event!(HostJoined { job });
        }
        self.take_pieces();
    }

    fn open(&self) -> bool {
        self.turns.open()
    }
}

/// The pairs of a job whose lists pair up one to one (item by item, as a block table's do), in
/// ascending order of the peer's addresses, or None where they do not pair up or are in that order
/// already. The kernel pins each remote iovec's pages with a call of its own, which costs about
/// what copying a 16 KiB block does; in address order the blocks a request holds side by side in
/// the peer's memory become one iovec (`process::joined`), and the peer's memory is read forward.
/// The copy's outcome is the same in any order: segments a peer names twice get either copy's
/// bytes, as on the network path.
fn in_remote_order(local: &[IoSeg], remote: &[IoSeg]) -> Option<(Vec<IoSeg>, Vec<IoSeg>)> {
    if local.len() != remote.len() || local.len() < 2 || remote.is_sorted_by_key(|s| s.addr) {
        return None;
    }
    if local.iter().zip(remote).any(|(l, r)| l.len != r.len) {
        return None;
    }
    let mut order: Vec<u32> = (0..u32::try_from(remote.len()).ok()?).collect();
    order.sort_unstable_by_key(|&i| remote[i as usize].addr);
    Some((order.iter().map(|&i| local[i as usize]).collect(), order.iter().map(|&i| remote[i as usize]).collect()))
}

/// Bytes per piece of a `len`-byte job copied by up to `threads` threads: `PIECES_PER_THREAD`
/// pieces for each, in 64 KiB steps, at least `min_piece` and at most `PIECE_BYTES` (which bounds
/// how long a deregistration waits for a piece under way).
fn piece_bytes(len: u64, threads: usize, min_piece: u64) -> u64 {
    let even = len.div_ceil(threads.max(1) as u64 * PIECES_PER_THREAD);
    even.next_multiple_of(64 << 10).clamp(min_piece.min(PIECE_BYTES), PIECE_BYTES)
}

/// The smallest piece of a `len`-byte job: `huge_min` (set with `Config::host_copy_huge_pages`)
/// for a job of at most `HUGE_PIECES_UP_TO` whose source the peer says lies on huge pages, else
/// `min_piece`. Both bounds are ours: the peer's word only picks between them.
pub(crate) fn smallest_piece(len: u64, min_piece: u32, huge_min: Option<u32>, source_on_huge_pages: bool) -> u64 {
    match huge_min {
        Some(huge_min) if len <= HUGE_PIECES_UP_TO && source_on_huge_pages => u64::from(huge_min),
        _ => u64::from(min_piece),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_jobs_on_huge_pages_take_the_huge_pages_piece() {
        const K: u32 = 1 << 10;
        const M: u64 = 1 << 20;
        assert_eq!(smallest_piece(4 * M, 1024 * K, Some(256 * K), true), 256 << 10);
        assert_eq!(smallest_piece(8 * M, 1024 * K, Some(128 * K), true), 128 << 10, "8 MiB included");
        assert_eq!(smallest_piece(4 * M, 1024 * K, Some(256 * K), false), 1 << 20, "small pages");
        assert_eq!(smallest_piece(8 * M + 1, 1024 * K, Some(256 * K), true), 1 << 20, "above 8 MiB");
        assert_eq!(smallest_piece(4 * M, 512 * K, None, true), 512 << 10, "the knob off");
        // What the cut makes of it: 4 MiB on 16 threads in 256 KiB pieces rather than four of 1 MiB,
        // and whatever the peer says, never outside the cut's own bounds.
        assert_eq!(piece_bytes(4 * M, 16, smallest_piece(4 * M, 1024 * K, Some(256 * K), true)), 256 << 10);
        assert_eq!(piece_bytes(4 * M, 16, smallest_piece(4 * M, 1024 * K, None, true)), M);
        assert!(piece_bytes(4 * M, 16, smallest_piece(4 * M, 1024 * K, Some(256 * K), true)) <= PIECE_BYTES);
    }

    #[test]
    fn item_pairs_go_in_the_peers_address_order_and_the_rest_as_they_are() {
        let seg = |addr: usize, len: usize| IoSeg { addr, len };
        let local = [seg(500, 4), seg(100, 8), seg(300, 2)];
        let remote = [seg(90, 4), seg(10, 8), seg(50, 2)];
        let (l, r) = in_remote_order(&local, &remote).unwrap();
        assert_eq!(r, [seg(10, 8), seg(50, 2), seg(90, 4)]);
        assert_eq!(l, [seg(100, 8), seg(300, 2), seg(500, 4)], "each local segment stays with its remote one");
        assert!(in_remote_order(&l, &r).is_none(), "already in order");
        assert!(in_remote_order(&local, &remote[..2]).is_none(), "lists that do not pair up");
        assert!(in_remote_order(&[seg(0, 4), seg(4, 8)], &[seg(8, 8), seg(0, 4)]).is_none(), "lengths differ");
        assert!(in_remote_order(&local[..1], &remote[..1]).is_none());
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
