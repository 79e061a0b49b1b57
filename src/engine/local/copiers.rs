//! The process's copy helpers: threads that take pieces of large same-host copies alongside the
//! connection workers that run them (`conn/host_job.rs` is such a job).
//!
//! Why threads of the process and not of each job: one thread reading another process moves a few
//! GB/s (it pins every source page and copies it at one core's memory bandwidth), so a large copy
//! needs many threads, and starting one costs tens of microseconds (50-80 us with its join on the
//! 2-core VM), serially, on the thread that waits for the copy: for 15 helpers that is much of a
//! 16 MiB job on a host where 16 threads copy it in about 0.3 ms. Kept here, they are started
//! once, woken in microseconds, and shared: however many connections copy at once, the process
//! runs only as many helpers as its largest job asked for. A helper that found no job for
//! `IDLE_EXIT` ends, so an idle process holds none.
//!
//! A job never waits for a helper: its own thread takes pieces too, so a job offered while every
//! helper is busy elsewhere still finishes, on its own thread alone.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::config::MAX_HOST_COPY_THREADS;
use crate::threads::{ThreadKind, spawn_contained};

/// How long a helper waits for a job before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(1);

/// Work that helpers may share.
pub(crate) trait Shared: Send + Sync {
    /// Takes pieces of the job until none is left to take. Never panics.
    fn help(&self);
    /// Whether pieces are left to take.
    fn open(&self) -> bool;
}

#[derive(Default)]
struct State {
    /// Jobs offered and not withdrawn, oldest first.
    jobs: Vec<Arc<dyn Shared>>,
    /// Helpers running, and how many of them wait for a job.
    threads: usize,
    idle: usize,
}

struct Pool {
    state: Mutex<State>,
    work: Condvar,
}

static POOL: Pool = Pool { state: Mutex::new(State { jobs: Vec::new(), threads: 0, idle: 0 }), work: Condvar::new() };

/// A job offered to the helpers; withdrawn when dropped (a helper inside it finishes its piece).
pub(crate) struct Offer {
    job: Arc<dyn Shared>,
}

impl Drop for Offer {
    fn drop(&mut self) {
        POOL.state.lock().jobs.retain(|j| !Arc::ptr_eq(j, &self.job));
    }
}

/// Offers `job` to `helpers` helpers, starting those missing: the process runs as many helpers as
/// its largest job asked for (`Config::host_copy_threads` less the job's own thread), at most
/// `MAX_HOST_COPY_THREADS - 1`. A helper that cannot be started is logged and the job runs with
/// fewer.
pub(crate) fn offer(job: Arc<dyn Shared>, helpers: usize) -> Offer {
    let helpers = helpers.min(MAX_HOST_COPY_THREADS - 1);
    let start = {
        let mut state = POOL.state.lock();
        state.jobs.push(job.clone());
        let wake = helpers.min(state.idle);
        for _ in 0..wake {
            POOL.work.notify_one();
        }
        let start = helpers.saturating_sub(state.threads);
        state.threads += start;
        start
    };
    start_helpers(start);
    Offer { job }
}

/// Starts `n` helpers, one after another: each starts the next before it serves, so the job's
/// own thread pays for one thread start, not for `n`.
fn start_helpers(n: usize) {
    if n == 0 {
        return;
    }
    let thread = std::thread::Builder::new().name("uccl-copy-helper".into());
    // `help` contains its own panics (they fail the job they hit); one here is the pool's own and
    // only takes this helper away.
    let on_panic = |_| POOL.state.lock().threads -= 1;
    let started = spawn_contained(thread, ThreadKind::HostCopyHelper, on_panic, move || {
        start_helpers(n - 1);
        serve();
    });
    if let Err(e) = started {
        POOL.state.lock().threads -= n;
        log::warn!("cannot start a host copy helper thread ({e}); large copies use fewer threads");
    }
}

/// A helper: serves the oldest open job, then the next, and ends after `IDLE_EXIT` without one.
fn serve() {
    let mut state = POOL.state.lock();
    loop {
        state.jobs.retain(|j| j.open());
        if let Some(job) = state.jobs.first().cloned() {
            parking_lot::MutexGuard::unlocked(&mut state, || job.help());
            continue;
        }
        state.idle += 1;
        let timed_out = POOL.work.wait_for(&mut state, IDLE_EXIT).timed_out();
        state.idle -= 1;
        if timed_out && state.jobs.is_empty() {
            state.threads -= 1;
            return;
        }
    }
}

/// Helpers running now (tests).
#[cfg(test)]
pub(crate) fn helpers_running() -> usize {
    POOL.state.lock().threads
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A job of `n` unit pieces that records which threads took them.
    struct Count {
        n: usize,
        next: AtomicUsize,
        done: AtomicUsize,
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl Shared for Count {
        fn help(&self) {
            while self.next.fetch_add(1, Ordering::Relaxed) < self.n {
                self.threads.lock().push(std::thread::current().id());
                std::thread::sleep(Duration::from_millis(1));
                self.done.fetch_add(1, Ordering::Release);
            }
        }

        fn open(&self) -> bool {
            self.next.load(Ordering::Relaxed) < self.n
        }
    }

    #[test]
    fn helpers_share_a_job_and_end_when_idle() {
        let n = 200;
        let job =
            Arc::new(Count { n, next: AtomicUsize::new(0), done: AtomicUsize::new(0), threads: Mutex::default() });
        let offer = offer(job.clone(), 3);
        let me = std::thread::current().id();
        testkit::wait_until("a helper took a piece", testkit::PATIENCE, || job.threads.lock().iter().any(|t| *t != me));
        job.help();
        drop(offer);
        testkit::wait_until("every piece done", testkit::PATIENCE, || job.done.load(Ordering::Acquire) == n);
        let mut threads = job.threads.lock().clone();
        assert_eq!(threads.len(), n, "every piece taken exactly once");
        threads.sort_unstable_by_key(|t| format!("{t:?}"));
        threads.dedup();
        assert!(
            (2..=4).contains(&threads.len()),
            "{} threads took pieces: this one and up to 3 helpers",
            threads.len()
        );
        assert!(helpers_running() <= 3, "no more helpers than asked for");
        // Nothing is offered any more: the helpers end on their own.
        testkit::wait_until("idle helpers end", testkit::PATIENCE, || helpers_running() == 0);
    }
}
