//! The process's looker thread: it runs the smaps reads that answer caches of page sizes, one at a
//! time, off every transfer's path, each no sooner than its cache allows.
//!
//! Why one thread of the process, serving a queue, and not a thread per look: a look reads a whole
//! process's smaps, for which the kernel walks every page table of that process under its mapping
//! lock, so looks run side by side would only contend on that lock and on the same cores the
//! copies want, and the first answer would come no sooner. One thread also bounds what looks can
//! cost however many regions and peers ask at once. The thread starts with the first look and
//! ends after `IDLE_EXIT` without one, so an idle process holds none; nothing joins it, so neither
//! an engine's shutdown nor the process's exit waits for a look.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::threads::{self, ThreadKind, spawn_contained};

/// How long the thread waits for a look before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(1);

/// A read to run on the looker thread, with where its answer goes.
pub(super) trait Look: Send {
    /// Reads and settles the answer. Never panics.
    fn run(self: Box<Self>);
    /// Settles without reading, as an unreadable smaps would: no thread could run it.
    fn give_up(self: Box<Self>);
}

/// A look and the earliest it may run.
struct Queued {
    due: Instant,
    look: Box<dyn Look>,
}

struct State {
    queue: VecDeque<Queued>,
    /// The thread runs (or is starting).
    running: bool,
    /// The thread is inside a look.
    busy: bool,
}

static STATE: Mutex<State> = Mutex::new(State { queue: VecDeque::new(), running: false, busy: false });
static QUEUED: Condvar = Condvar::new();

/// Queues `look` for the looker thread to run once `due` has come, starting the thread if none
/// runs. Returns at once.
pub(super) fn submit(look: Box<dyn Look>, due: Instant) {
    let start = {
        let mut state = STATE.lock();
        state.queue.push_back(Queued { due, look });
        let start = !state.running;
        state.running = true;
        start
    };
    if start {
        let thread = std::thread::Builder::new().name("uccl-page-look".into());
        // Looks contain their own panics (`Look::run`); one here is the loop's own.
        if let Err(e) = spawn_contained(thread, ThreadKind::PageLook, |_| give_up_all(), serve) {
            log::warn!("cannot start the page-size look thread ({e}): sources count as on small pages");
            give_up_all();
        }
    } else {
        QUEUED.notify_one();
    }
}

/// Ends the thread's turn: every look still queued settles as unread, and the next submit starts
/// a thread again.
fn give_up_all() {
    let looks: Vec<_> = {
        let mut state = STATE.lock();
        (state.running, state.busy) = (false, false);
        state.queue.drain(..).collect()
    };
    for queued in looks {
        queued.look.give_up();
    }
}

/// The thread: runs queued looks that are due, oldest first, the lock released around each, waits
/// for the next one due otherwise, and ends once none came for `IDLE_EXIT`.
fn serve() {
    let mut state = STATE.lock();
    loop {
        let now = Instant::now();
        if let Some(i) = state.queue.iter().position(|queued| queued.due <= now) {
            // With the look still queued: a panic here gives it up with the rest (`give_up_all`).
            threads::point(ThreadKind::PageLook);
            let Some(Queued { look, .. }) = state.queue.remove(i) else { continue };
            state.busy = true;
            MutexGuard::unlocked(&mut state, || look.run());
            state.busy = false;
            continue;
        }
        let next_due = state.queue.iter().map(|queued| queued.due).min();
        let wait = next_due.map_or(IDLE_EXIT, |due| due.saturating_duration_since(now));
        if QUEUED.wait_for(&mut state, wait).timed_out() && state.queue.is_empty() {
            state.running = false;
            return;
        }
    }
}

/// Waits until no look is queued (due or not) or under way, at most `limit`; whether that came. For tests that
/// assert what a looked-up answer made happen, and for the bench, which times what a long-running
/// process sees; never needed in use, and the C ABI exports nothing that reaches it.
pub fn looks_settled(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        {
            let state = STATE.lock();
            if state.queue.is_empty() && !state.busy {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Held shared by the tests that need the looker thread to read, and exclusively by the one that
/// makes that thread panic, whose panic would otherwise give up their looks.
#[cfg(test)]
pub(crate) static TEST_FAULTS: parking_lot::RwLock<()> = parking_lot::RwLock::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    struct Counted {
        runs: Arc<AtomicUsize>,
        done: mpsc::Sender<&'static str>,
    }

    impl Look for Counted {
        fn run(self: Box<Self>) {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let _ = self.done.send("run");
        }
        fn give_up(self: Box<Self>) {
            let _ = self.done.send("given up");
        }
    }

    #[test]
    fn queued_looks_run_on_a_thread_that_ends_when_idle() {
        let _reading = TEST_FAULTS.read();
        let runs = Arc::new(AtomicUsize::new(0));
        let (done, finished) = mpsc::channel();
        for _ in 0..5 {
            submit(Box::new(Counted { runs: runs.clone(), done: done.clone() }), Instant::now());
        }
        for _ in 0..5 {
            assert_eq!(finished.recv_timeout(testkit::PATIENCE), Ok("run"));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 5);
        assert!(looks_settled(testkit::PATIENCE));
        testkit::wait_until("the look thread ends", IDLE_EXIT + testkit::PATIENCE, || !STATE.lock().running);
    }

    #[test]
    fn a_look_runs_no_sooner_than_it_is_due_and_does_not_hold_up_the_others() {
        let _reading = TEST_FAULTS.read();
        let runs = Arc::new(AtomicUsize::new(0));
        let (done, finished) = mpsc::channel();
        let queued = Instant::now();
        let later = Duration::from_secs(1);
        submit(Box::new(Counted { runs: runs.clone(), done: done.clone() }), queued + later);
        submit(Box::new(Counted { runs: runs.clone(), done }), queued);
        assert_eq!(finished.recv_timeout(testkit::PATIENCE), Ok("run"));
        assert!(queued.elapsed() < later, "the look due now ran before the later one");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(finished.recv_timeout(testkit::PATIENCE), Ok("run"));
        assert!(queued.elapsed() >= later, "the later one waited until it was due");
        assert!(looks_settled(testkit::PATIENCE));
    }
}
