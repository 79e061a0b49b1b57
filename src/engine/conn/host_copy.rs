//! The work of a connection's host worker (`host_worker.rs`): it checks the peer's ProcessHello
//! and runs the copies of the same-host path (`state/direct.rs`) outside the connection lock, so a
//! copy of gigabytes stalls neither the progress thread nor the reader. A copy lands in a region of
//! ours in pieces of at most `local::PIECE_BYTES`, each entered through the worker's gate, which
//! keeps deregistration and failure fences; the worker copies nothing else into our memory.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::host_worker::{HostCopy, HostServed};
use super::state::{CopyJob, HostTask};
use super::{Connection, Inner};
use crate::engine::local::{self, PIECE_BYTES, PeerProcess};
use crate::error::{Error, UcclStatus};
use crate::threads::{self, ThreadKind};

/// Jobs from this size on are copied by several threads (`copy_threads`).
const PARALLEL_BYTES: u64 = 8 << 20;

/// Threads that copy one large job: a quarter of the CPUs the process may use, at least two where
/// there are two and at most eight. One thread reading another process leaves most of the memory
/// bandwidth unused (on a 32-core host one thread moved 4-6 GB/s where loopback TCP over 16
/// sockets moved 36), while every CPU copying at once would starve the peer and the network.
fn copy_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 { 1 } else { (cpus / 4).clamp(2, 8) }
    })
}

impl HostServed for Connection {
    fn serve_host_work(&self, process: &mut Option<PeerProcess>) {
        Connection::serve_host_work(self, process);
    }

    fn fail_with(&self, err: Error) {
        Connection::fail_with(self, err);
    }

    fn host(&self) -> &HostCopy {
        &self.host
    }
}

impl Connection {
    /// Runs the queued host work in order until none is left or the connection failed.
    fn serve_host_work(&self, process: &mut Option<PeerProcess>) {
        loop {
            let task = {
                let mut inner = self.inner.lock();
                if inner.state.failure().is_some() {
                    return;
                }
                inner.state.next_host_task()
            };
            let mut out = Vec::new();
            match task {
                None => return,
                Some(HostTask::Prove { pid, fd }) => {
                    let proven = local::prove(pid, fd, &self.control);
                    if let Err(refusal) = &proven {
                        refusal.log(self.peer.addr);
                    } else {
                        log::debug!("same-host peer {} is process {pid}: host memory moves directly", self.peer.addr);
                    }
                    let reads_peer = proven.is_ok();
                    *process = proven.ok();
                    let mut inner = self.inner.lock();
                    inner.state.proved(reads_peer, &mut out);
                    self.finish_host_work(&mut inner, out);
                }
                Some(HostTask::Copy(job)) => {
                    threads::point(ThreadKind::HostCopier);
                    let copied = self.copy_in(process.as_ref(), &job);
                    let mut inner = self.inner.lock();
                    let copied = copied.map_err(|(e, refused)| {
                        if let Some(refused) = refused {
                            local::Refusal::Kernel(refused).log(self.peer.addr);
                            inner.state.lost_peer_access();
                        }
                        e
                    });
                    inner.state.copy_finished(job, copied, &mut out);
                    self.finish_host_work(&mut inner, out);
                }
            }
        }
    }

    fn finish_host_work(&self, inner: &mut Inner, out: Vec<super::state::Action>) {
        if let Err(e) = self.apply(inner, out) {
            self.fail(inner, e);
        }
    }

    /// Copies `job` out of the peer's process, piece by piece through the gate. An error carries the
    /// kernel's refusal when it took our access away (the path is then off for this connection).
    fn copy_in(
        &self,
        process: Option<&PeerProcess>,
        job: &CopyJob,
    ) -> std::result::Result<(), (Error, Option<std::io::Error>)> {
        if job.error.is_some() {
            // Cut off before it ran: `copy_finished` reports the cut.
            return Ok(());
        }
        let Some(process) = process else {
            return Err((Error::internal("a direct copy without a proven peer process"), None));
        };
        let lost = |e: std::io::Error| {
            let err = Error::new(
                UcclStatus::ErrBackend,
                format!("copying {} bytes from peer process {}: {e}", job.len, process.pid()),
            );
            let refused = matches!(e.raw_os_error(), Some(libc::EPERM | libc::ESRCH | libc::ENOSYS)).then_some(e);
            (err, refused)
        };
        process.alive().map_err(lost)?;
        let pieces = local::pieces(&job.local, &job.remote, PIECE_BYTES);
        let next = AtomicUsize::new(0);
        let gate = &self.host.gate;
        gate.begin(&job.region);
        // Takes pieces in order until none is left or one failed: one copying thread, or
        // `copy_threads()` of them for a large job.
        let copier = || -> std::result::Result<(), (Error, Option<std::io::Error>)> {
            while let Some((local, remote)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                if !gate.enter(&job.region) {
                    next.store(pieces.len(), Ordering::Relaxed);
                    let why = if gate.is_closed() {
                        Error::new(UcclStatus::ErrCanceled, "the connection failed during the transfer")
                    } else {
                        Error::not_allowed("the memory region was deregistered during the transfer")
                    };
                    return Err((why, None));
                }
                // SAFETY: `local` lies in `job.region`, a live registration of this engine (the
                // target's window authorized by the region table, or the caller's buffer checked at
                // post), and the gate keeps its deregistration from returning until the piece is
                // done. The kernel writes it; segments a peer names twice get either copy's bytes,
                // as overlapping chunks of the network path would.
                let read = unsafe { process.read_piece(local, remote) };
                gate.leave();
                if let Err(e) = read {
                    next.store(pieces.len(), Ordering::Relaxed);
                    return Err(lost(e));
                }
            }
            Ok(())
        };
        let threads = copy_threads().min(pieces.len());
        if job.len < PARALLEL_BYTES || threads < 2 {
            return copier();
        }
        // A panic in a helper reaches this thread at the scope's end, and this thread's own
        // containment fails the connection.
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(copier)).collect();
            let mut outcome = copier();
            for helper in helpers {
                let theirs = helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                outcome = outcome.and(theirs);
            }
            outcome
        })
    }
}
