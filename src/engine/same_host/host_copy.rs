//! The work of a connection's host worker (`host_worker.rs`): it checks the peer's ProcessHello
//! and runs the copies of the same-host path (`state.rs`) outside the connection lock, so a
//! copy of gigabytes stalls neither the progress thread nor the reader. A copy lands in a region of
//! ours in pieces of at most `same_host::PIECE_BYTES`, each entered through the worker's gate, which
//! keeps deregistration and failure fences (`host_job.rs`: a large job's pieces are shared with the
//! process's copy helpers); nothing else copies into our memory.

use std::sync::Arc;

use super::host_job::{self, Failure, SharedJob};
use super::host_worker::Gate;
use super::seam::{Conn, Locked};
use super::state::{CopyJob, HostTask};
use super::{PeerProcess, Refusal, prove};
use crate::config::Config;
use crate::error::Error;
use crate::threads::{self, ThreadKind};
use crate::trace::{self, clock_ns};

/// The host work of a connection: what its worker, or a caller waiting on it, runs.
pub(crate) trait HostWork: Conn {
    /// Whether host work is queued and the connection has not failed.
    fn host_work_queued(&self) -> bool {
        let mut inner = self.lock();
        inner.failure().is_none() && inner.same_host().has_host_task()
    }

    /// Runs the queued host work in order until none is left or the connection failed; with
    /// `only`, just the copies of that transfer's reads, and none before the peer is proven.
    fn serve_host_work(&self, process: &mut Option<Arc<PeerProcess>>, only: Option<u64>) {
        loop {
            let task = {
                let mut inner = self.lock();
                if inner.failure().is_some() {
                    return;
                }
                match only {
                    None => inner.same_host().next_host_task(),
                    Some(_) if process.is_none() => None,
                    Some(transfer) => inner.same_host().next_host_copy_of(transfer),
                }
            };
            match task {
                None => return,
                Some(HostTask::Prove { pid, fd }) => {
                    let reads_peer = match prove(pid, fd, self.control()) {
                        Ok(proven) => {
                            *process = Some(proven.process);
                            match proven.readable {
                                Ok(()) => {
                                    let addr = self.peer_addr();
                                    log::debug!("same-host peer {addr} is process {pid}: host memory moves directly");
                                    true
                                }
                                Err(refused) => {
                                    Refusal::Kernel(refused).log(self.peer_addr());
                                    false
                                }
                            }
                        }
                        Err(refusal) => {
                            refusal.log(self.peer_addr());
                            false
                        }
                    };
                    self.lock().proved(reads_peer);
                }
                Some(HostTask::Copy(job)) => {
                    let traced = trace::on(trace::HOST).then(|| (clock_ns(), trace::next_id()));
                    threads::point(ThreadKind::HostCopier);
                    let marks = traced.map(|t| t.1);
                    let copied = copy(&job, process.as_ref(), &self.host().gate, &self.core().config, marks);
                    let (transfer, len, queued) = (job.transfer().map(|t| t.id), job.len, job.queued);
                    // A refused job copied nothing: its read or write takes the channels, or fails.
                    let refused = matches!(copied, Err(Failure::Refused(..)));
                    let mut inner = self.lock();
                    match copied {
                        Ok(()) => inner.copy_finished(job, Ok(())),
                        Err(Failure::Copy(e)) => inner.copy_finished(job, Err(e)),
                        Err(Failure::Refused(e, refused)) => {
                            Refusal::Kernel(refused).log(self.peer_addr());
                            inner.copy_refused(job, e);
                        }
                        Err(Failure::Panicked(e)) => {
                            // As for a panic of this thread itself: what the copy left is unknown.
                            inner.fail(e);
                            return;
                        }
                    }
                    if let (Some((picked, job)), false) = (traced, refused) {
                        // Under the lock, which the reply's handling takes: the event comes before
                        // the caller can be handed the outcome.
                        let (conn, side, by_caller) =
                            (self.trace().conn, self.trace().side, u64::from(self.host().on_caller()));
                        trace::event!(HostCopied {
                            job,
                            conn,
                            side,
                            transfer: transfer.unwrap_or(0),
                            bytes: len,
                            queued,
                            picked,
                            by_caller
                        });
                    }
                }
            }
        }
    }
}

impl<C: Conn> HostWork for C {}

/// Copies `job` into our memory, out of the peer's process, piece by piece
/// through `gate`, on this thread and for a large job with the process's copy helpers.
/// Apart from the connection so that the state machine's tests run the copies the worker runs.
pub(crate) fn copy(
    job: &CopyJob,
    process: Option<&Arc<PeerProcess>>,
    gate: &Arc<Gate>,
    config: &Config,
    marks: Option<u64>,
) -> Result<(), Failure> {
    if job.error.is_some() {
        // Cut off before it ran: `copy_finished` reports the cut.
        return Ok(());
    }
    let Some(process) = process else {
        return Err(Failure::Copy(Error::internal("a direct copy without a proven peer process")));
    };
    process.alive().map_err(|e| host_job::lost(process, job.len, e))?;
    // Shared with the process's copy helpers from `copiers::threads_for`'s size on, in pieces of
    // at least `Config::host_copy_min_piece`.
    let threads = super::copiers::threads_for(job.len, config.host_copy_threads);
    gate.begin(&job.region);
    // One thread copies a small job whole: its source's pages do not matter then.
    let huge_min = (config.host_copy_huge_pages && threads > 1).then_some(config.host_copy_huge_min_piece);
    let min_piece = host_job::smallest_piece(job.len, config.host_copy_min_piece, huge_min, job.remote_huge);
    let shared = SharedJob::new(
        &job.local,
        &job.remote,
        job.len,
        threads,
        min_piece,
        gate.clone(),
        job.region.clone(),
        process.clone(),
    )
    .traced(marks);
    Arc::new(shared).run(threads, config.host_copy_spin)
}
