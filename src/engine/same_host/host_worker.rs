//! The host work of a connection (`host_copy.rs` is the work): the process's connection workers,
//! threads that run the queued work of whichever connection has some, the runner token that lets
//! one thread at a time run a connection's queued work, and the gate through which every piece of
//! a copy into our memory passes.
//!
//! Workers are the process's, not a thread per connection, so that an engine with many same-host
//! peers runs a bounded number of threads ([`max_workers`]); a connection with work queued waits in
//! the ready queue for the next free worker, which runs its queue and goes on to the next. Started
//! as work comes, a worker that found none for [`IDLE_EXIT`] ends, so an idle process holds none.
//!
//! The copy of a read of ours need not wait for the worker: a caller waiting on the connection,
//! reading its control stream, runs it on its own thread when it finds the target's grant
//! (`caller_waits`), which saves the worker's wake-up on the read's critical path and leaves the
//! caller's core copying rather than waiting. A caller runs only the copies of the transfer it
//! waits for, so its wait or poll is bounded by its own transfer; the rest of the queue (the
//! proof, the peer's writes, other transfers' reads) is the worker's, which the caller wakes for
//! whatever it leaves queued. One thread at a time holds the runner token; the worker, finding it
//! taken, leaves, and the caller holding it wakes the worker again after letting go, so no work is
//! left behind.
//!
//! Deregistration marks the region removed and then waits until the gate holds no piece for it; the
//! worker checks the mark after announcing its piece. Both sides store, fence (SeqCst), then load,
//! so at least one sees the other: either the piece does not start, or the fence waits for it.
//! Failing the connection closes the gate the same way, so nothing lands after that either.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::PeerProcess;
use crate::engine::region::Region;
use crate::error::{Error, Result};
use crate::threads::{ThreadKind, run_contained, spawn_contained};

/// What the worker serves: a connection, through this trait so that this file names none.
pub(crate) trait HostServed: Send + Sync {
    /// Runs the queued host work until none is left or the connection failed; with `only`, just
    /// the copies of that transfer's reads (a caller's own), once the peer's process is proven.
    fn serve_host_work(&self, process: &mut Option<Arc<PeerProcess>>, only: Option<u64>);
    /// Whether host work is queued (and the connection has not failed).
    fn has_host_work(&self) -> bool;
    /// A thread running host work panicked.
    fn fail_with(&self, err: Error);
    /// How long the worker looks for more work after some before it sleeps.
    fn spin(&self) -> Duration;
    fn host(&self) -> &HostCopy;
}

thread_local! {
    /// The host copy (by address) whose own reads' copies this thread, a caller waiting on its
    /// connection, runs itself; and whether such a copy was queued for it and not run yet.
    static CALLER: Cell<(usize, bool)> = const { Cell::new((0, false)) };
    /// The host copy (by address) whose worker this thread is; 0 on every other thread. Kept here
    /// rather than read from the worker's handle, whose lock `join` may hold while the worker
    /// finishes its last copy.
    static WORKER_OF: Cell<usize> = const { Cell::new(0) };
}

/// How often a deregistration or a failing connection looks again at a piece under way.
const GATE_POLL: Duration = Duration::from_micros(50);

/// The pieces under way, as deregistration and failure see them. The worker copies one job at a
/// time, so every piece under way lands in one region (a job's pieces may run on several threads:
/// the worker's and the process's copy helpers, which take a job's pieces only until the worker
/// returns from it).
#[derive(Default)]
pub(crate) struct Gate {
    /// Id of the region the current job copies into (region ids start at 1); set while no piece
    /// is under way.
    region: AtomicU64,
    /// Pieces under way.
    active: AtomicUsize,
    closed: AtomicBool,
}

impl Gate {
    /// Starts a job into `region`: no piece of an earlier job is under way any more.
    pub fn begin(&self, region: &Region) {
        self.region.store(region.id, Ordering::SeqCst);
    }

    /// Announces a piece into the job's `region`, under way until the returned guard drops (a
    /// panic in the piece unwinds through it too); `None` (and nothing announced) when the region
    /// was deregistered or the connection failed.
    pub fn enter(&self, region: &Region) -> Option<Inside<'_>> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let inside = Inside(self);
        fence(Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) || region.is_removed() {
            return None;
        }
        Some(inside)
    }

    /// Returns once no piece into `region` is under way; the caller marked it removed before.
    fn wait_clear(&self, region: u64) {
        fence(Ordering::SeqCst);
        while self.active.load(Ordering::SeqCst) > 0 && self.region.load(Ordering::SeqCst) == region {
            std::thread::sleep(GATE_POLL);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Lets no piece start any more and returns once none is under way.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while self.active.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(GATE_POLL);
        }
    }
}

/// A piece under way (see [`Gate::enter`]).
pub(crate) struct Inside<'a>(&'a Gate);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a worker waits for a connection with work before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(1);

/// The most connection workers the process runs: half its CPUs, 2 to 8. A worker runs one
/// connection's queue at a time, and a large copy's pieces go to the copy helpers besides
/// (`copiers.rs`), so more workers add threads, not copying.
fn max_workers() -> usize {
    // Read once: the standard library reads the cgroup's quota files for it.
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get() / 2).clamp(2, 8))
}

/// The connections with work queued, in order, and the workers serving them.
struct Workers {
    ready: VecDeque<Weak<dyn HostServed>>,
    threads: usize,
    idle: usize,
}

static WORKERS: Mutex<Workers> = Mutex::new(Workers { ready: VecDeque::new(), threads: 0, idle: 0 });
static READY: Condvar = Condvar::new();

/// Connection workers running now: for tests and the benchmark.
pub fn workers_running() -> usize {
    WORKERS.lock().threads
}

pub(crate) struct HostCopy {
    conn: Weak<dyn HostServed>,
    pub gate: Arc<Gate>,
    /// In the ready queue: queued once however often it is woken before a worker takes it up.
    queued: AtomicBool,
    /// Workers running this connection's queue (at most one; the runner token says so too).
    serving: AtomicUsize,
    /// Held by the thread running the queued work (the worker or a waiting caller): one job at a
    /// time, as the gate requires. Holds the peer's process once proven.
    runner: Mutex<Option<Arc<PeerProcess>>>,
    /// The copy of a read of ours was queued for the worker since the queue was last taken up: a
    /// caller polling or waiting on the connection may run it before the worker wakes.
    ours_queued: AtomicBool,
}

/// While alive, the thread that made it runs the copies of its connection's reads that it finds
/// granted itself ([`HostCopy::caller_waits`]).
pub(crate) struct CallerWaits<'a> {
    host: &'a HostCopy,
    before: (usize, bool),
}

impl Drop for CallerWaits<'_> {
    fn drop(&mut self) {
        // A copy left to this thread and not run (its wait ended first) is another transfer's: the
        // worker runs it.
        if CALLER.get() == (self.host.id(), true) {
            self.host.wake_worker();
        }
        CALLER.set(self.before);
    }
}

impl HostCopy {
    pub fn new(conn: Weak<dyn HostServed>) -> HostCopy {
        HostCopy {
            conn,
            gate: Arc::default(),
            queued: AtomicBool::new(false),
            serving: AtomicUsize::new(0),
            runner: Mutex::new(None),
            ours_queued: AtomicBool::new(false),
        }
    }

    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// This thread waits on the connection and reads its control stream: the copies of our reads
    /// that it finds granted are left to it (`ours` in [`HostCopy::wake`]) until the guard drops.
    pub fn caller_waits(&self) -> CallerWaits<'_> {
        CallerWaits { host: self, before: CALLER.replace((self.id(), false)) }
    }

    /// Whether this thread is a caller of the connection (not its worker).
    pub fn on_caller(&self) -> bool {
        WORKER_OF.get() != self.id()
    }

    /// Whether the copy of a read of ours waits for a thread: left to this one, or queued for the
    /// worker, which a caller polling or waiting may beat to it.
    pub fn work_waiting(&self) -> bool {
        CALLER.get() == (self.id(), true) || self.ours_queued.load(Ordering::Relaxed)
    }

    /// Runs the queued copies of `transfer`'s reads on this caller's thread if a copy of a read of
    /// ours waits for a thread (`work_waiting`) and no other thread runs the queue, and wakes the
    /// worker for anything else queued; call it holding no lock of the connection.
    pub fn run_waiting(&self, transfer: u64) {
        if !self.work_waiting() {
            return;
        }
        if CALLER.get().0 == self.id() {
            CALLER.set((self.id(), false));
        }
        // Cleared before trying the token: should another thread hold it, the copy is left to the
        // worker (woken by whoever lets go of the token with work queued), and this caller goes
        // back to waiting instead of trying again and again.
        self.ours_queued.store(false, Ordering::Relaxed);
        let Some(conn) = self.conn.upgrade() else { return };
        if let Some(mut process) = self.runner.try_lock() {
            // As on the worker: a panic fails the connection (and its transfers, so the caller's
            // wait ends), not the caller's thread.
            let served = run_contained(ThreadKind::HostCopier, || conn.serve_host_work(&mut process, Some(transfer)));
            drop(process);
            if let Err(e) = served {
                conn.fail_with(e);
                return;
            }
        }
        if conn.has_host_work() {
            self.wake_worker();
        }
    }

    /// Wakes the worker for work a caller left queued.
    fn wake_worker(&self) {
        if let Err(e) = self.wake(false)
            && let Some(conn) = self.conn.upgrade()
        {
            conn.fail_with(e);
        }
    }

    /// Runs the queued work on the worker unless another thread holds the runner token: a worker
    /// looks at the queue again once it lets go, a caller wakes the worker if work is left, so
    /// nothing queued meanwhile waits.
    fn run_queued(&self, conn: &dyn HostServed) {
        loop {
            let Some(mut process) = self.runner.try_lock() else { return };
            self.ours_queued.store(false, Ordering::Relaxed);
            conn.serve_host_work(&mut process, None);
            drop(process);
            if !conn.has_host_work() {
                return;
            }
        }
    }

    /// Work was queued: hands the connection to the process's workers, starting one where none
    /// waits and fewer than [`max_workers`] run; or leaves the copy of a read of ours (`ours`) to
    /// the caller waiting on this thread (`caller_waits`).
    pub fn wake(&self, ours: bool) -> Result<()> {
        if ours && CALLER.get().0 == self.id() {
            CALLER.set((self.id(), true));
            return Ok(());
        }
        if ours {
            self.ours_queued.store(true, Ordering::Relaxed);
        }
        if self.gate.closed.load(Ordering::Acquire) || self.queued.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut workers = WORKERS.lock();
        workers.ready.push_back(self.conn.clone());
        if workers.idle > 0 {
            READY.notify_one();
        } else if workers.threads < max_workers() {
            workers.threads += 1;
            drop(workers);
            let started = spawn_contained(
                std::thread::Builder::new().name("uccl-host-copy".into()),
                ThreadKind::HostCopier,
                // A panic in a connection's work fails that connection (`serve_one`); one here
                // is the worker's own, whose place the next wake-up takes.
                |_| {
                    WORKERS.lock().threads -= 1;
                },
                serve,
            );
            if let Err(e) = started {
                WORKERS.lock().threads -= 1;
                // Left queued: a running worker takes it up; with none, the connection fails.
                if workers_running() == 0 {
                    return Err(Error::io("spawn host copy thread", e));
                }
            }
        }
        Ok(())
    }

    /// Returns once no copy into `region` (marked removed already) is under way.
    pub fn wait_clear(&self, region: u64) {
        self.gate.wait_clear(region);
    }

    /// Stops all copying: returns once no piece is under way, and none starts afterwards.
    pub fn stop(&self) {
        self.gate.close();
    }

    /// Returns (after `stop`) once no worker runs the connection's queue, unless this is the
    /// worker itself letting go of the connection: its run ends with the closed gate.
    pub fn join(&self) {
        if WORKER_OF.get() == self.id() {
            return;
        }
        while self.serving.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(GATE_POLL);
        }
    }

    /// Lets go of the peer's process (after `stop`: nothing copies any more), so that the handle
    /// the connections to that process share closes with the last of them, not with the last
    /// reference to a closed connection. A thread still holding the runner token (a caller's
    /// run, ending on the failure) keeps it until the connection is dropped: never waited for.
    pub fn release_peer(&self) {
        if let Some(mut runner) = self.runner.try_lock() {
            runner.take();
        }
    }
}

/// A worker: takes the next connection with work queued and runs its queue, until it found none
/// for [`IDLE_EXIT`]. After work it looks for more for that connection's spin time
/// (`Config::host_copy_spin`) before it sleeps, so that a copy following closely does not wait for
/// its wake-up.
fn serve() {
    let mut spin = Duration::ZERO;
    loop {
        let until = Instant::now() + spin;
        let next = loop {
            let mut workers = WORKERS.lock();
            if let Some(conn) = workers.ready.pop_front() {
                break conn;
            }
            if Instant::now() < until {
                drop(workers);
                std::thread::yield_now();
                continue;
            }
            workers.idle += 1;
            let timed_out = READY.wait_for(&mut workers, IDLE_EXIT).timed_out();
            workers.idle -= 1;
            if timed_out && workers.ready.is_empty() {
                workers.threads -= 1;
                return;
            }
        };
        if let Some(conn) = next.upgrade() {
            spin = serve_one(&*conn);
        }
    }
}

/// Runs one connection's queued work on this worker; its spin time.
fn serve_one(conn: &dyn HostServed) -> Duration {
    let host = conn.host();
    // Cleared before the queue is looked at: work queued from now on queues the connection again.
    host.queued.store(false, Ordering::SeqCst);
    // Counted before the gate is read, both sequentially consistent, as `stop` then `join` close
    // it and then read the count: either this run sees the gate closed, or `join` waits for it.
    // Uncounted by a guard, so that no unwinding leaves `join` waiting.
    struct Serving<'a>(&'a AtomicUsize);
    impl Drop for Serving<'_> {
        fn drop(&mut self) {
            WORKER_OF.set(0);
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    host.serving.fetch_add(1, Ordering::SeqCst);
    let _serving = Serving(&host.serving);
    if !host.gate.closed.load(Ordering::SeqCst) {
        WORKER_OF.set(host.id());
        // A panic in the work fails the connection (and its transfers), not the worker.
        if let Err(e) = run_contained(ThreadKind::HostCopier, || host.run_queued(conn)) {
            conn.fail_with(e);
        }
    }
    conn.spin()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::mpsc;

    use super::*;

    /// A connection whose host work is a queue of jobs, each recording the thread that ran it and
    /// the first one waiting for the test's word before it ends.
    struct Fake {
        host: HostCopy,
        queue: Mutex<VecDeque<u32>>,
        ran: Mutex<Vec<(u32, std::thread::ThreadId)>>,
        hold: Mutex<Option<mpsc::Receiver<()>>>,
        /// What `on_caller` said on the thread of each job, once it ran.
        callers: Mutex<Vec<bool>>,
    }

    fn fake(queue: &[u32], hold: mpsc::Receiver<()>) -> Arc<Fake> {
        Arc::new_cyclic(|weak: &Weak<Fake>| Fake {
            host: HostCopy::new(weak.clone() as Weak<dyn HostServed>),
            queue: Mutex::new(queue.iter().copied().collect()),
            ran: Mutex::default(),
            hold: Mutex::new(Some(hold)),
            callers: Mutex::default(),
        })
    }

    impl HostServed for Fake {
        fn serve_host_work(&self, _process: &mut Option<Arc<PeerProcess>>, only: Option<u64>) {
            loop {
                let job = {
                    let mut queue = self.queue.lock();
                    match only {
                        None => queue.pop_front(),
                        Some(id) => queue.iter().position(|&j| u64::from(j) == id).and_then(|at| queue.remove(at)),
                    }
                };
                let Some(job) = job else { return };
                if let Some(hold) = self.hold.lock().take() {
                    hold.recv().unwrap();
                }
                self.ran.lock().push((job, std::thread::current().id()));
                self.callers.lock().push(self.host.on_caller());
            }
        }

        fn has_host_work(&self) -> bool {
            !self.queue.lock().is_empty()
        }

        fn fail_with(&self, err: Error) {
            panic!("{err}");
        }

        fn host(&self) -> &HostCopy {
            &self.host
        }

        fn spin(&self) -> Duration {
            Duration::ZERO
        }
    }

    /// A caller that finds a granted read while another thread runs the queue leaves it to that
    /// thread, which runs it once done with its own job, and goes back to waiting: it neither runs
    /// a second job at once nor keeps finding work waiting.
    #[test]
    fn a_caller_leaves_queued_work_to_the_thread_running_the_queue() {
        let (release, hold) = mpsc::channel();
        let fake = fake(&[1], hold);
        let runner = {
            let fake = fake.clone();
            std::thread::spawn(move || {
                fake.host.run_queued(&*fake);
                std::thread::current().id()
            })
        };
        testkit::wait_until("the runner holds the token", testkit::PATIENCE, || fake.host.runner.is_locked());
        // Our read, granted meanwhile; this thread polls.
        fake.queue.lock().push_back(2);
        fake.host.wake(true).unwrap();
        assert!(fake.host.work_waiting());
        fake.host.run_waiting(2);
        assert!(!fake.host.work_waiting(), "the caller does not find the same work again");
        assert!(fake.ran.lock().is_empty(), "nothing ran on the caller's thread");
        release.send(()).unwrap();
        let runner = runner.join().unwrap();
        testkit::wait_until("both jobs ran", testkit::PATIENCE, || fake.ran.lock().len() == 2);
        let ran = fake.ran.lock().clone();
        assert_eq!(ran.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
        assert!(ran.iter().all(|r| r.1 != std::thread::current().id()), "{ran:?}");
        assert_eq!(ran[0].1, runner);
        fake.host.stop();
        fake.host.join();
    }

    /// With the token free, a caller that waits on the connection runs the read it finds itself,
    /// and no worker is woken for it. A connection of its own: a worker woken for earlier work
    /// could otherwise still come by late and take the read.
    #[test]
    fn a_waiting_caller_runs_the_read_it_finds_itself() {
        let (release, hold) = mpsc::channel();
        release.send(()).unwrap();
        let fake = fake(&[], hold);
        let before = fake.ran.lock().len();
        let waits = fake.host.caller_waits();
        fake.queue.lock().push_back(3);
        fake.host.wake(true).unwrap();
        assert!(fake.host.work_waiting());
        fake.host.run_waiting(3);
        drop(waits);
        let ran = fake.ran.lock().clone();
        assert_eq!(ran.len(), before + 1);
        assert_eq!(ran[before], (3, std::thread::current().id()));
        fake.host.stop();
        fake.host.join();
    }

    /// A caller runs the copies of its own transfer only: another transfer's, queued ahead of it
    /// or left to the caller when its wait ends, go to the worker, so a wait or poll is bounded by
    /// the caller's own transfer.
    #[test]
    fn a_caller_runs_only_its_own_transfers_copies() {
        let (release, hold) = mpsc::channel();
        release.send(()).unwrap();
        let fake = fake(&[5, 7], hold);
        let waits = fake.host.caller_waits();
        fake.host.wake(true).unwrap();
        fake.host.run_waiting(7);
        let me = std::thread::current().id();
        assert_eq!(fake.ran.lock()[0], (7, me), "the caller's own copy ran first, on its thread");
        testkit::wait_until("the worker ran the other copy", testkit::PATIENCE, || fake.ran.lock().len() == 2);
        let other = fake.ran.lock()[1];
        assert!(other.0 == 5 && other.1 != me, "{other:?}");
        assert!(!fake.host.work_waiting());

        // Left to this thread by a read it handled, then its wait ended: the worker runs it.
        fake.queue.lock().push_back(9);
        fake.host.wake(true).unwrap();
        assert!(fake.host.work_waiting());
        drop(waits);
        testkit::wait_until("the worker ran the copy left behind", testkit::PATIENCE, || fake.ran.lock().len() == 3);
        let left = fake.ran.lock()[2];
        assert!(left.0 == 9 && left.1 != me, "{left:?}");
        fake.host.stop();
        fake.host.join();
    }

    /// However many connections have work, the process runs at most `max_workers` workers: with
    /// every worker held in a job, the other connections wait in the ready queue, and all run once
    /// released.
    #[test]
    fn many_connections_share_a_bounded_number_of_workers() {
        let (mut releases, mut fakes) = (Vec::new(), Vec::new());
        for k in 0..24 {
            let (release, hold) = mpsc::channel();
            releases.push(release);
            fakes.push(fake(&[k], hold));
        }
        for f in &fakes {
            f.host.wake(false).unwrap();
        }
        // A job under way holds its connection's runner token (and its `hold` lock: not looked at).
        let started = || fakes.iter().filter(|f| f.host.runner.is_locked()).count();
        let max = max_workers();
        testkit::wait_until("every worker holds a job", testkit::PATIENCE, || started() == max);
        assert!(workers_running() <= max, "{} workers", workers_running());
        for release in &releases {
            release.send(()).unwrap();
        }
        testkit::wait_until("every connection's job ran", testkit::PATIENCE, || {
            fakes.iter().all(|f| f.ran.lock().len() == 1)
        });
        assert!(workers_running() <= max);
        for f in &fakes {
            f.host.stop();
            f.host.join();
        }
    }

    /// Closing joins the worker while it finishes a job cut short: the worker, asking whether it
    /// is a caller as a traced copy does, must not wait for the handle the closing thread joins.
    #[test]
    fn closing_joins_a_worker_finishing_its_job() {
        let (release, hold) = mpsc::channel();
        let fake = fake(&[1], hold);
        fake.host.wake(false).unwrap();
        testkit::wait_until("the worker runs the job", testkit::PATIENCE, || fake.host.runner.is_locked());
        let closer = {
            let fake = fake.clone();
            std::thread::spawn(move || {
                fake.host.stop();
                fake.host.join();
            })
        };
        // Let the closer reach the join before the job ends.
        std::thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        testkit::wait_until("the worker was joined", testkit::PATIENCE, || closer.is_finished());
        closer.join().unwrap();
        assert_eq!(*fake.callers.lock(), [false], "the job ran on the worker");
        assert!(fake.host.on_caller(), "the test's thread is a caller");
    }
}
