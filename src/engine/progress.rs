//! The engine's one progress thread: drives every connection's channels, spins briefly when idle,
//! then parks until a transport completion or a new post wakes it. Parked, it wakes on no timer
//! unless a connection waits on its peer's engine (a Grant, Data or Done owed): then it looks again
//! a sixteenth of the stall timeout later, so that a peer gone silent is failed in time, and an
//! engine whose connections owe each other nothing sleeps until something happens. Work that may
//! start such a wait while it parks untimed wakes it (`Waker::activity`). A transport that
//! progresses only while polled (a net plugin) never wakes it, so while such a transport has
//! requests outstanding (or device copies of the same-host path are in flight) the thread naps
//! briefly instead of parking; while the outstanding work is device copies (staged chunks, the
//! same-host GPU path's copies a peer awaits), which no thread of ours moves, it keeps polling
//! instead (`IdleWait::Poll`, from 4 CPUs): a nap's wake-up came tens of microseconds after the
//! copy ended, on every chunk. Same-host copies only their caller awaits are the caller's to poll:
//! their post does not wake the thread, which parks a millisecond at a time while any is in flight.
//! While network chunks are in flight it may keep polling too, for a bounded time since it last
//! moved something or woke (`UCCL_TCPX_PROGRESS_POLL_US`), so that the last chunk's completion finds
//! it awake; a chunk that never completes (a peer gone) costs that bound per wake-up, not a core.
//! Should the thread panic, every connection fails with an internal
//! error and the engine refuses new ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::conn::Connection;
use super::shared::Waker;
use crate::error::{Error, Result};
use crate::threads::{ThreadKind, spawn_contained};

/// Idle passes before parking; a completion usually arrives within a few of them under load.
const IDLE_SPINS: u32 = 64;
/// Idle nap while a polled transport has work: short against a 512 KiB chunk's ~40 us at 12.5 GB/s,
/// long enough to leave the core to the plugin's helper threads.
const POLL_NAP: Duration = Duration::from_micros(25);
/// How long a park lasts at most while callers' device copies are in flight (`Waker::caller_copies`):
/// their callers finish them, so this only bounds how late one nobody polls ends; a look a
/// millisecond costs nothing beside a caller polling every few microseconds.
const CALLER_COPY_WATCH: Duration = Duration::from_millis(1);
/// Timer slack of the progress thread, in nanoseconds.
const POLL_NAP_SLACK_NS: libc::c_ulong = 1_000;

/// What the progress thread does once idle passes found nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleWait {
    /// Park until woken (or a connection's stall watch).
    Park,
    /// Park as `Park`, for this long at most: then idle staging memory is due to be freed
    /// (`Routes::trim_staging`, asked again at the next park).
    ParkFor(Duration),
    /// Sleep `POLL_NAP` and look again: a transport progresses only while polled, and its own
    /// threads need the core.
    Nap,
    /// Look again at once, yielding the core between passes: device copies are in flight, or
    /// network chunks whose completion the thread is asked to catch awake.
    Poll,
}

/// The connections the progress thread drives; the generation lets it refresh its copy only when
/// the set changed, so a pass allocates nothing.
#[derive(Default)]
pub struct ConnList {
    members: Mutex<Members>,
    generation: AtomicU64,
}

#[derive(Default)]
struct Members {
    conns: Vec<Arc<Connection>>,
    /// Set once the progress thread died: no connection can be driven any more.
    failure: Option<Error>,
}

impl ConnList {
    /// Adds `conn` unless the progress thread died (then its error).
    pub fn add(&self, conn: Arc<Connection>) -> Result<()> {
        let mut members = self.members.lock();
        if let Some(e) = &members.failure {
            return Err(e.clone());
        }
        members.conns.push(conn);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub fn remove(&self, id: u64) -> Option<Arc<Connection>> {
        let mut members = self.members.lock();
        let pos = members.conns.iter().position(|c| c.id == id)?;
        let conn = members.conns.swap_remove(pos);
        self.generation.fetch_add(1, Ordering::Release);
        Some(conn)
    }

    pub fn take_all(&self) -> Vec<Arc<Connection>> {
        let all = std::mem::take(&mut self.members.lock().conns);
        self.generation.fetch_add(1, Ordering::Release);
        all
    }

    /// Why no connection can be added any more, once the progress thread died.
    pub fn failure(&self) -> Option<Error> {
        self.members.lock().failure.clone()
    }

    /// Fails every connection with `err` and refuses new ones. Recording the failure and taking
    /// the list happen under one lock, so a connection added concurrently is either failed here or
    /// refused by `add`.
    fn fail_all(&self, err: Error) {
        let conns = {
            let mut members = self.members.lock();
            members.failure.get_or_insert_with(|| err.clone());
            members.conns.clone()
        };
        for conn in conns {
            conn.fail_with(err.clone());
        }
    }

    fn refresh(&self, seen: &mut u64, local: &mut Vec<Arc<Connection>>) {
        let current = self.generation.load(Ordering::Acquire);
        if current != *seen {
            let members = self.members.lock();
            local.clear();
            local.extend(members.conns.iter().cloned());
            *seen = current;
        }
    }
}

/// How the progress thread waited once idle passes found nothing, so far (`Engine::idle_waits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleWaits {
    /// Idle waits that polled (`IdleWait::Poll`).
    pub polled: u64,
    /// Parks, timed (a connection waits on its peer) or not.
    pub parked: u64,
    /// Idle passes (yielding) after a pass that moved something, before the idle wait is asked.
    pub spun: u64,
}

pub struct ProgressThread {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressThread {
    /// Starts the thread. Should it panic, every connection of `conns` fails with the internal
    /// error (nothing drives their transfers or watches them for stalls any more), later ones are
    /// refused, and `on_panic` gets the error to stop the rest of the engine the same way. Once idle
    /// passes found nothing, `idle_wait` is asked what to do, given when the thread last moved
    /// something or woke from a park.
    pub fn start(
        conns: Arc<ConnList>,
        waker: Arc<Waker>,
        stall_timeout: Duration,
        idle_wait: impl Fn(Instant) -> IdleWait + Send + 'static,
        on_panic: impl FnOnce(Error) + Send + 'static,
    ) -> std::io::Result<ProgressThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let failing = conns.clone();
        let thread = spawn_contained(
            std::thread::Builder::new().name("uccl-progress".into()),
            ThreadKind::Progress,
            move |err| {
                on_panic(err.clone());
                failing.fail_all(err);
            },
            {
                let waker = waker.clone();
                let watch = stall_watch(stall_timeout);
                move || run(&conns, &thread_stop, &waker, watch, &idle_wait)
            },
        )?;
        let _ = waker.thread.set(thread.thread().clone());
        Ok(ProgressThread { stop, waker, thread: Some(thread) })
    }
}

impl Drop for ProgressThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a parked thread looks at connections that wait on their peer's engine: a sixteenth of
/// the stall timeout (at least 1 ms), so a stall fails within that much past its timeout.
fn stall_watch(timeout: Duration) -> Duration {
    (timeout / 16).max(Duration::from_millis(1))
}

fn run(list: &ConnList, stop: &AtomicBool, waker: &Waker, watch: Duration, idle_wait: &dyn Fn(Instant) -> IdleWait) {
    // A sleeping thread's wake-up may come this much late (50 us unless set), which would turn every
    // POLL_NAP into about 75 us; the nap is what a staged copy or a plugin request waits on.
    // SAFETY: plain prctl on the calling thread; a failure leaves the default slack. The unused
    // arguments are passed as zeros of the kernel's width: the call is variadic, and the kernel
    // reads all five.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            POLL_NAP_SLACK_NS,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    let mut local = Vec::new();
    let mut seen = u64::MAX;
    let mut idle = 0u32;
    // Since when the thread found nothing to move: read on the first idle pass, not on every pass
    // that moved something. A wake-up restarts it, so that a thread woken by a post or a completion
    // may poll for the chunks still out; chunks that never complete cost one bound per wake-up.
    let mut idle_since = Instant::now();
    // The last idle wait was a poll: wake-ups meanwhile left the thread's park token set.
    let mut polled = false;
    // When idle channels are next looked at while the thread has not parked for long: a busy
    // connection keeps it from parking, and must not keep idle ones open.
    let mut passes = 0u32;
    let mut closes_due = Instant::now() + watch;
    while !stop.load(Ordering::Acquire) {
        list.refresh(&mut seen, &mut local);
        let mut moved = false;
        for conn in &local {
            moved |= conn.progress();
        }
        passes = passes.wrapping_add(1);
        if passes.is_multiple_of(CLOSE_CHECK_PASSES) && Instant::now() >= closes_due {
            closes_due = Instant::now() + idle_closes(&local).map_or(watch, |until| until.min(watch));
        }
        if moved {
            idle = 0;
        } else if idle < IDLE_SPINS {
            if idle == 0 {
                idle_since = Instant::now();
            }
            idle += 1;
            waker.idle.spins.fetch_add(1, Ordering::Relaxed);
            std::thread::yield_now();
        } else {
            match idle_wait(idle_since) {
                IdleWait::Poll => {
                    waker.idle.polls.fetch_add(1, Ordering::Relaxed);
                    polled = true;
                    std::thread::yield_now();
                }
                IdleWait::Nap => std::thread::sleep(POLL_NAP),
                // A token left by a wake-up while polling would end the park at once and start
                // another bound, though the passes since saw what it announced: it is taken here,
                // and one more pass covers a wake-up that came after the last one.
                IdleWait::Park | IdleWait::ParkFor(_) if polled => {
                    polled = false;
                    std::thread::park_timeout(Duration::ZERO);
                }
                IdleWait::Park => {
                    park(&local, waker, watch, idle_closes(&local));
                    idle_since = Instant::now();
                }
                IdleWait::ParkFor(limit) => {
                    let limit = idle_closes(&local).map_or(limit, |until| until.min(limit));
                    park(&local, waker, watch, Some(limit));
                    idle_since = Instant::now();
                }
            }
        }
    }
}

/// Passes between looks at the clock for idle memory and channels while the thread does not park.
const CLOSE_CHECK_PASSES: u32 = 4096;

/// Has the connections that stayed idle long enough give back their landing memory and the
/// connectors among them close their channels (`Connection::idle_pass`); how long until the next
/// may.
fn idle_closes(conns: &[Arc<Connection>]) -> Option<Duration> {
    let now = Instant::now();
    conns.iter().filter_map(|c| c.idle_pass(now)).min().map(|due| due.saturating_duration_since(now))
}

/// Parks until woken: for at most [`CALLER_COPY_WATCH`] while callers' device copies are in flight,
/// for at most `watch` while a connection waits on its peer's engine, else until `limit` or for
/// good. The waker
/// hears of an untimed park before the copies and connections are asked, so work that starts such
/// a wait meanwhile (counted first, or under the connection's lock, which the asking takes too)
/// either is seen here or wakes the thread.
fn park(conns: &[Arc<Connection>], waker: &Waker, watch: Duration, limit: Option<Duration>) {
    waker.idle.parks.fetch_add(1, Ordering::Relaxed);
    waker.parking_untimed(true);
    let limit = limit.unwrap_or(Duration::MAX);
    if waker.caller_copies.any() {
        waker.parking_untimed(false);
        std::thread::park_timeout(watch.min(CALLER_COPY_WATCH).min(limit));
    } else if conns.iter().any(|c| c.waits_on_peer()) {
        waker.parking_untimed(false);
        std::thread::park_timeout(watch.min(limit));
    } else {
        // Until `limit` (idle staging to free, idle channels to close: tens of seconds), and as an
        // untimed park for the wakers: a connection that starts waiting on its peer meanwhile
        // wakes it (`Waker::activity`), so no stall watch is needed until then.
        if limit < Duration::MAX {
            std::thread::park_timeout(limit);
        } else {
            std::thread::park();
        }
        waker.parking_untimed(false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::{ConnList, IdleWait, ProgressThread};
    use crate::engine::shared::Waker;

    /// Voluntary context switches of the calling thread so far: each time it went to sleep.
    fn sleeps_of_this_thread() -> u64 {
        // SAFETY: an all-zero rusage is valid, and getrusage writes only into it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is writable for the call.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0, "getrusage");
        ru.ru_nvcsw as u64
    }

    /// Starts an idle progress thread whose idle wait is `wait`; once it asked `asks` times or
    /// `limit` passed, returns how often it asked, the shortest gap between two asks, and how often
    /// the thread slept between its first ask and its last.
    fn ask_until(wait: IdleWait, asks: usize, limit: Duration) -> (usize, Duration, u64) {
        let asked = Arc::new(AtomicUsize::new(0));
        let shortest = Arc::new(AtomicU64::new(u64::MAX));
        let slept = Arc::new(AtomicU64::new(0));
        let (counter, gap, sleeps) = (asked.clone(), shortest.clone(), slept.clone());
        let origin = Instant::now();
        let last = AtomicU64::new(u64::MAX);
        let first_sleeps = AtomicU64::new(u64::MAX);
        let thread = ProgressThread::start(
            Arc::new(ConnList::default()),
            Arc::new(Waker::default()),
            Duration::from_secs(30),
            move |_| {
                let now = origin.elapsed().as_nanos() as u64;
                let before = last.swap(now, Ordering::Relaxed);
                if before != u64::MAX {
                    gap.fetch_min(now - before, Ordering::Relaxed);
                }
                let so_far = sleeps_of_this_thread();
                let first = first_sleeps.load(Ordering::Relaxed).min(so_far);
                first_sleeps.store(first, Ordering::Relaxed);
                sleeps.store(so_far - first, Ordering::Relaxed);
                counter.fetch_add(1, Ordering::Relaxed);
                wait
            },
            |_| {},
        )
        .expect("progress thread");
        while asked.load(Ordering::Relaxed) < asks && origin.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(thread);
        let shortest = Duration::from_nanos(shortest.load(Ordering::Relaxed));
        (asked.load(Ordering::Relaxed), shortest, slept.load(Ordering::Relaxed))
    }

    /// An idle thread with device copies in flight looks again at once; with only a polled
    /// transport it naps between looks; with neither it parks and asks no more. What holds on a
    /// loaded host: no two looks of a napping thread come closer than its 25 us nap, and it sleeps
    /// between nearly every two, while a polling thread only yields (which the kernel does not
    /// count as going to sleep), however long each yield takes.
    #[test]
    fn the_idle_wait_decides_how_often_an_idle_thread_looks() {
        let (parked, _, _) = ask_until(IdleWait::Park, usize::MAX, Duration::from_millis(100));
        assert!(parked <= 2, "a parked thread asked {parked} times");
        let (napping, gap, slept) = ask_until(IdleWait::Nap, 200, testkit::PATIENCE);
        assert!(napping >= 200, "a napping thread asked {napping} times");
        assert!(gap >= Duration::from_micros(25), "two naps of 25 us {gap:?} apart");
        // Nearly every nap sleeps: one whose timer expired before the thread got to block (a
        // preemption between arming it and sleeping) counts no switch, so not every one.
        assert!(slept * 10 >= napping as u64 * 9, "a napping thread slept {slept} times between {napping} looks");
        let (polling, _, slept) = ask_until(IdleWait::Poll, 2000, testkit::PATIENCE);
        assert!(polling >= 2000, "a polling thread asked {polling} times");
        assert!(slept < polling as u64 / 10, "a polling thread slept {slept} times between {polling} looks");
    }

    /// While callers' device copies are in flight the idle thread parks a millisecond at a time and
    /// looks again with no wake-up, so that one nobody polls still ends; once none is, it parks for
    /// good. A post of one wakes a thread parked for good.
    #[test]
    fn callers_copies_keep_the_thread_looking_without_wake_ups() {
        let waker = Arc::new(Waker::default());
        let parks = || waker.idle.parks.load(Ordering::Relaxed);
        let thread = ProgressThread::start(
            Arc::new(ConnList::default()),
            waker.clone(),
            Duration::from_secs(30),
            |_| IdleWait::Park,
            |_| {},
        )
        .expect("progress thread");
        testkit::wait_until("the idle thread parks for good", testkit::PATIENCE, || waker.parked_untimed());
        let before = parks();
        waker.caller_copies.add();
        // As a post does: only this wakes the thread parked for good; it then parks timed.
        waker.activity();
        testkit::wait_until("timed parks, one after another", testkit::PATIENCE, || parks() >= before + 5);
        waker.caller_copies.remove();
        testkit::wait_until("a park for good once none is in flight", testkit::PATIENCE, || waker.parked_untimed());
        // A timed park decided just before the count fell may still end once; parked a
        // millisecond at a time, the thread would park dozens of times meanwhile.
        let settled = parks();
        std::thread::sleep(Duration::from_millis(50));
        assert!(parks() <= settled + 1, "parked for good, the thread looked again: {} parks after {settled}", parks());
        drop(thread);
    }

    /// The thread tells its idle wait since when it found nothing to move, so that a wait which
    /// polls for a bounded time (for chunks that may never complete) ends in a park, which wake-ups
    /// that came while it polled do not cut short; a wake-up of the parked thread starts another
    /// bounded poll, which ends the same way.
    #[test]
    fn a_poll_bounded_from_when_the_thread_went_idle_ends_in_a_park() {
        // Long against the idle passes before the first ask, which a loaded host may stretch.
        let bound = Duration::from_secs(1);
        let (polls, parks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // The polls counted when the first park was asked for.
        let polls_then = Arc::new(AtomicUsize::new(usize::MAX));
        let waker = Arc::new(Waker::default());
        let thread = {
            let (polls, parks, polls_then) = (polls.clone(), parks.clone(), polls_then.clone());
            ProgressThread::start(
                Arc::new(ConnList::default()),
                waker.clone(),
                Duration::from_secs(30),
                move |idle_since: Instant| {
                    if idle_since.elapsed() < bound {
                        polls.fetch_add(1, Ordering::Relaxed);
                        IdleWait::Poll
                    } else {
                        if parks.fetch_add(1, Ordering::Relaxed) == 0 {
                            polls_then.store(polls.load(Ordering::Relaxed), Ordering::Relaxed);
                        }
                        IdleWait::Park
                    }
                },
                |_| {},
            )
            .expect("progress thread")
        };
        // Once the thread asked for its `parks`th park, it asks nothing more.
        let settled = |parks_wanted: usize| {
            testkit::wait_until("the thread parks", testkit::PATIENCE, || {
                parks.load(Ordering::Relaxed) >= parks_wanted
            });
            let seen = (polls.load(Ordering::Relaxed), parks.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!((polls.load(Ordering::Relaxed), parks.load(Ordering::Relaxed)), seen, "still asking");
            seen
        };
        // Wake-ups while it polls start no second bound once the first ended.
        for _ in 0..3 {
            waker.wake();
        }
        let (polled, parked) = settled(2);
        assert!(polled >= 2, "polled {polled} times before parking");
        assert_eq!(polls_then.load(Ordering::Relaxed), polled, "polled on after the bound");
        assert_eq!(parked, 2, "the park that takes the wake-ups' token, then one for good");
        // A wake-up of the parked thread starts another bound, which ends the same way.
        waker.wake();
        let (polled_again, parked_again) = settled(4);
        assert!(polled_again >= polled + 2, "a wake-up polls again: {polled} then {polled_again} polls");
        assert_eq!(parked_again, 4, "and parks again the same way");
        drop(thread);
    }
}
