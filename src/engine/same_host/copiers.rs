//! The process's copy helpers: threads that take pieces of large same-host copies alongside the
//! threads that run them, connection workers or callers (`host_job.rs` is such a job).
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
//! Why a job is handed to waiting helpers and they are woken in a cascade: woken through one
//! condition variable and one lock, they came out of the lock one after another, each paying the
//! scheduling delay of the one before (fifteen in a row for sixteen threads); woken by one thread,
//! that thread would pay fifteen system calls before it copies.
//!
//! A job never waits for a helper: its own thread takes pieces too, so a job offered while every
//! helper is busy elsewhere still finishes, on its own thread alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::MAX_HOST_COPY_THREADS;
use crate::threads::{ThreadKind, spawn_contained};

/// Jobs from this size on are shared with the helpers: below it one thread copies in 50-100 us,
/// of which a helper's wake-up would be a large part.
const PARALLEL_BYTES: u64 = 512 << 10;

/// The threads a job of `len` bytes takes, its own included, out of `threads` allowed.
pub(crate) fn threads_for(len: u64, threads: usize) -> usize {
    if len < PARALLEL_BYTES { 1 } else { threads.max(1) }
}

/// How long a helper waits for a job before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(1);
/// Helpers each woken helper wakes in turn (and the offering thread first): a wake-up costs the
/// waker a system call and the woken thread its scheduling delay, so a fan-out of a few wakes
/// sixteen helpers in two rounds, while the offering thread pays for four calls only.
const FANOUT: usize = 4;

/// The turns of a job's `n` pieces shared with helpers: each thread claims the next piece, counts
/// it done however it ended, and the thread running the job, woken by the last piece, returns
/// only once every piece is done. After a failure (`stop`) pieces are still claimed and counted,
/// only no longer worked on.
pub(crate) struct Turns {
    n: usize,
    /// Pieces handed out (may run past `n`: each thread's last claim finds none).
    next: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
    /// The thread running the job (a worker, a caller, a posting thread).
    runner: Thread,
}

impl Turns {
    /// Turns for `n` pieces, run by the calling thread.
    pub fn new(n: usize) -> Turns {
        Turns {
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            runner: std::thread::current(),
        }
    }

    /// The next piece to take, if any is left.
    pub fn claim(&self) -> Option<usize> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.n).then_some(k)
    }

    /// A claimed piece is done (worked on, failed or skipped): the last one wakes the runner. The
    /// runner, which may be a user's thread, gets no wake-up token from its own last piece.
    pub fn done(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.n && !self.on_runner() {
            self.runner.unpark();
        }
    }

    /// Whether the calling thread is the one running the job.
    pub fn on_runner(&self) -> bool {
        std::thread::current().id() == self.runner.id()
    }

    /// No piece is worked on from now on (record the failure first, so that a piece that gives
    /// up because of it finds it).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Pieces are left to claim and the job did not stop ([`Shared::open`]).
    pub fn open(&self) -> bool {
        self.next.load(Ordering::Relaxed) < self.n && !self.stop.load(Ordering::Relaxed)
    }

    /// On the runner, after it took pieces until none was left: waits for the pieces helpers still
    /// work on, at most one each (the timeout only guards against a lost wake-up).
    pub fn wait_all(&self) {
        while self.done.load(Ordering::Acquire) < self.n {
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }
}

/// Work that helpers may share.
pub(crate) trait Shared: Send + Sync {
    /// Takes pieces of the job until none is left to take. Never panics.
    fn help(&self);
    /// Whether pieces are left to take.
    fn open(&self) -> bool;
}

/// One helper's place: the job handed to it while it waited, and its thread to wake.
struct Slot {
    thread: Thread,
    handed: Mutex<Option<Arc<Offered>>>,
}

/// A job handed to waiting helpers, and who of them is woken yet.
struct Offered {
    job: Arc<dyn Shared>,
    /// How long a helper looks for the next job after this one before it sleeps.
    spin: Duration,
    woken: Vec<Arc<Slot>>,
    next: AtomicUsize,
}

impl Offered {
    /// Wakes up to `FANOUT` of the helpers not woken yet.
    fn wake_some(&self) {
        for _ in 0..FANOUT {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.woken.get(k) else { return };
            slot.thread.unpark();
        }
    }
}

struct State {
    /// Jobs offered and not withdrawn, oldest first: a helper that comes back from one job finds
    /// the next here.
    jobs: Vec<Arc<dyn Shared>>,
    /// Helpers running.
    threads: usize,
    /// Helpers waiting for a job, the last to finish one last.
    idle: Vec<Arc<Slot>>,
}

static POOL: Mutex<State> = Mutex::new(State { jobs: Vec::new(), threads: 0, idle: Vec::new() });

/// A job offered to the helpers; withdrawn when dropped (a helper inside it finishes its piece).
pub(crate) struct Offer {
    job: Arc<dyn Shared>,
}

impl Drop for Offer {
    fn drop(&mut self) {
        POOL.lock().jobs.retain(|j| !Arc::ptr_eq(j, &self.job));
    }
}

/// Offers `job` to `helpers` helpers, starting those missing: the process runs as many helpers as
/// its largest job asked for (`Config::host_copy_threads` less the job's own thread), at most
/// `MAX_HOST_COPY_THREADS - 1`. Waiting helpers are handed the job and woken in a cascade, none of
/// them taking the pool's lock to find it; helpers that come back from other work find it in the
/// pool. After a job a helper looks for the next for `spin` before it sleeps. A helper that cannot
/// be started is logged and the job runs with fewer.
pub(crate) fn offer(job: Arc<dyn Shared>, helpers: usize, spin: Duration) -> Offer {
    let helpers = helpers.min(MAX_HOST_COPY_THREADS - 1);
    let (offered, start) = {
        let mut state = POOL.lock();
        state.jobs.push(job.clone());
        let wake = helpers.min(state.idle.len());
        let at = state.idle.len() - wake;
        let woken = state.idle.split_off(at);
        let offered = Arc::new(Offered { job: job.clone(), spin, woken, next: AtomicUsize::new(0) });
        for slot in &offered.woken {
            *slot.handed.lock() = Some(offered.clone());
        }
        let start = helpers.saturating_sub(state.threads);
        state.threads += start;
        (offered, start)
    };
    offered.wake_some();
    start_helpers(start, spin);
    Offer { job }
}

/// Starts `n` helpers, one after another: each starts the next before it serves, so the job's
/// own thread pays for one thread start, not for `n`.
fn start_helpers(n: usize, spin: Duration) {
    if n == 0 {
        return;
    }
    let thread = std::thread::Builder::new().name("uccl-copy-helper".into());
    // `help` contains its own panics (they fail the job they hit); one here is the pool's own and
    // only takes this helper away.
    let on_panic = |_| POOL.lock().threads -= 1;
    let started = spawn_contained(thread, ThreadKind::HostCopyHelper, on_panic, move || {
        start_helpers(n - 1, spin);
        serve(spin);
    });
    if let Err(e) = started {
        POOL.lock().threads -= n;
        log::warn!("cannot start a host copy helper thread ({e}); large copies use fewer threads");
    }
}

/// A helper: serves the job handed to it or the oldest open one in the pool, looks for the next
/// for the spin time, then waits to be handed one, and ends after `IDLE_EXIT` without one.
fn serve(mut spin: Duration) {
    let slot = Arc::new(Slot { thread: std::thread::current(), handed: Mutex::new(None) });
    let mut idle_since = Instant::now();
    loop {
        if let Some(offered) = slot.handed.lock().take() {
            offered.wake_some();
            spin = offered.spin;
            offered.job.help();
            idle_since = Instant::now();
            continue;
        }
        let pooled = {
            let mut state = POOL.lock();
            state.jobs.retain(|j| j.open());
            let job = state.jobs.first().cloned();
            if job.is_none() {
                // Not listed here otherwise: a helper leaves the list when a job is handed to it.
                state.idle.push(slot.clone());
            }
            job
        };
        if let Some(job) = pooled {
            job.help();
            idle_since = Instant::now();
            continue;
        }
        if !wait_handed(&slot, idle_since, spin) {
            let mut state = POOL.lock();
            // Handed a job meanwhile: serve it; else end.
            if slot.handed.lock().is_none() {
                state.idle.retain(|s| !Arc::ptr_eq(s, &slot));
                state.threads -= 1;
                return;
            }
        }
    }
}

/// Waits until a job is handed to `slot`, first looking for the spin time after `since` (yielding
/// between looks), then parked; false once `IDLE_EXIT` passed since `since` without one.
fn wait_handed(slot: &Slot, since: Instant, spin: Duration) -> bool {
    while since.elapsed() < spin {
        if slot.handed.lock().is_some() {
            return true;
        }
        std::thread::yield_now();
    }
    loop {
        if slot.handed.lock().is_some() {
            return true;
        }
        let waited = since.elapsed();
        if waited >= IDLE_EXIT {
            return false;
        }
        std::thread::park_timeout(IDLE_EXIT - waited);
    }
}

/// Helpers running now (tests).
#[cfg(test)]
pub(crate) fn helpers_running() -> usize {
    POOL.lock().threads
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A job of `n` unit pieces that records which threads took them. With `gather`, each piece
    /// waits (for a bounded time) until that many threads took one, so that no thread finishes the
    /// job before the others had the CPU to join it.
    struct Count {
        n: usize,
        gather: usize,
        next: AtomicUsize,
        done: AtomicUsize,
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl Count {
        fn new(n: usize, gather: usize) -> Arc<Count> {
            Arc::new(Count {
                n,
                gather,
                next: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                threads: Mutex::default(),
            })
        }

        fn distinct(&self) -> usize {
            let mut threads = self.threads.lock().clone();
            threads.sort_unstable_by_key(|t| format!("{t:?}"));
            threads.dedup();
            threads.len()
        }
    }

    impl Shared for Count {
        fn help(&self) {
            while self.next.fetch_add(1, Ordering::Relaxed) < self.n {
                self.threads.lock().push(std::thread::current().id());
                std::thread::sleep(Duration::from_millis(1));
                let until = std::time::Instant::now() + testkit::PATIENCE;
                while self.distinct() < self.gather && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
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
        let job = Count::new(n, 0);
        let offer = offer(job.clone(), 3, Duration::ZERO);
        let me = std::thread::current().id();
        testkit::wait_until("a helper took a piece", testkit::PATIENCE, || job.threads.lock().iter().any(|t| *t != me));
        job.help();
        drop(offer);
        testkit::wait_until("every piece done", testkit::PATIENCE, || job.done.load(Ordering::Acquire) == n);
        assert_eq!(job.threads.lock().len(), n, "every piece taken exactly once");
        // The pool's own count would also see helpers of other tests running meanwhile.
        let distinct = job.distinct();
        assert!((2..=4).contains(&distinct), "{distinct} threads took pieces: this one and up to 3 helpers");

        // Helpers waiting for a job are handed the next and woken one by another: every one of
        // them takes part without this thread copying at all.
        testkit::wait_until("the helpers wait", testkit::PATIENCE, || {
            let (threads, idle) = {
                let state = POOL.lock();
                (state.threads, state.idle.len())
            };
            if threads < 3 && idle == threads {
                // Some ended after a second without work before this thread looked (a loaded
                // host): a job for three starts them again.
                let warm = Count::new(3, 3);
                let again = super::offer(warm.clone(), 3, Duration::ZERO);
                testkit::wait_until("the helpers ran again", 2 * testkit::PATIENCE, || {
                    warm.done.load(Ordering::Acquire) == 3
                });
                drop(again);
            }
            threads == 3 && idle == 3
        });
        // One piece each, held until all three joined: a helper left asleep shows as a job done by
        // two threads, however slowly the others get the CPU. (The waiting list is not looked at
        // right after the offer: on a loaded two-core host that look once found a helper listed.)
        let job = Count::new(3, 3);
        let offer = super::offer(job.clone(), 3, Duration::from_millis(5));
        testkit::wait_until("every piece done", 2 * testkit::PATIENCE, || job.done.load(Ordering::Acquire) == 3);
        drop(offer);
        assert_eq!(job.distinct(), 3, "the three helpers took the pieces");
        assert!(!job.threads.lock().contains(&me));
        // Nothing is offered any more: the helpers end on their own.
        testkit::wait_until("idle helpers end", testkit::PATIENCE, || helpers_running() == 0);
    }
}
