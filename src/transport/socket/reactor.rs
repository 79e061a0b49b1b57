//! The helper threads one `SocketNet` shares among all of its comms: a pool of senders and a pool
//! of receivers, started as comms are made (one per socket they may open) up to a fixed count, each
//! serving many sockets of many comms. A helper owns its sockets' state, waits in `epoll_wait` on
//! them (edge triggered) and on an eventfd, and runs a socket when the kernel reports it or a
//! posting thread kicks it (work was posted, a partly sent piece was handed over); its epoll set,
//! inbox and kicks are a [`Worker`]'s. Nothing polls on a timer: an idle connection costs no CPU,
//! and the thread count is the pool's bound whatever the number of connections.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::pure::window::Window;
use super::spin::{HelperWaits, Polls, SHORT_SPIN, SpinTurn, WaitCounts};
use crate::error::{Error, Result};
use crate::sys::worker::{Inbox, Serves, Thread, Worker};
use crate::threads::{ThreadKind, panic_text};

/// One socket's work, run by the helper that owns it.
pub(super) trait Task: Send + 'static {
    fn fd(&self) -> RawFd;
    /// epoll events the socket waits for (edge triggered is added).
    fn interest(&self) -> u32;
    /// Moves the socket forward. `Again`: there may be more to do at once (it stopped to let the
    /// helper's other sockets run); `Idle`: it waits for the kernel (it saw `EAGAIN`) or a kick;
    /// `Stop`: its comm failed or closes, and the socket is not to run again.
    fn run(&mut self) -> Next;
    fn window(&self) -> &Arc<Window>;
    /// After an `Idle` run: the socket holds a piece whose receive is not posted yet, so a kick is
    /// close behind.
    fn holds_unposted(&self) -> bool {
        false
    }
    /// Length of the request of the piece this socket finished in its last run, if it finished
    /// one: the helper polls after pieces of small requests only ([`Polls::after_work`]).
    fn finished_request_len(&self) -> Option<u64> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    Again,
    Idle,
    Stop,
}

const EVENTS_PER_WAIT: usize = 64;
/// Rounds over queued sockets between two looks at epoll while some stay queued.
const ROUNDS_PER_LOOK: u32 = 8;

/// What a helper serves: sockets' tasks, taken off in groups a comm waits for, failing their comms
/// should the helper die.
pub(super) struct Sockets<T>(PhantomData<T>);

impl<T: Task> Serves for Sockets<T> {
    type Add = T;
    type Remove = (Vec<usize>, Arc<Detach>);
    type Owner = Weak<Window>;
    fn fail(owner: &Weak<Window>, err: Error) {
        if let Some(window) = owner.upgrade() {
            window.fail(err);
        }
    }
}

pub(super) type Helper<T> = Worker<Sockets<T>>;

/// Where a socket lives: its helper and its slot there.
pub(super) struct Placement<T: Task> {
    pub helper: Arc<Helper<T>>,
    pub token: usize,
}

impl<T: Task> Placement<T> {
    /// Has the helper run the socket soon, waking it if it sleeps.
    pub fn kick(&self) {
        self.helper.kick(self.token);
    }

    /// The helper sleeps in `epoll_wait`: a kick costs an eventfd write and its wake-up.
    pub fn sleeps(&self) -> bool {
        self.helper.sleeps()
    }

    /// Tells the socket's helper apart from others (a comm's sockets may share one).
    pub fn helper_id(&self) -> usize {
        Arc::as_ptr(&self.helper) as usize
    }

    pub fn weak(&self) -> Weak<Helper<T>> {
        Arc::downgrade(&self.helper)
    }
}

struct Entry<T> {
    task: T,
    /// In the helper's run queue already.
    queued: bool,
    /// Out of the epoll set after `Stop` or a panic; kicks are ignored.
    stopped: bool,
    /// Counted in the helper's `Holding`.
    holds: bool,
}

/// A helper's sockets that hold a piece whose receive is not posted, and since the newest of them
/// began to.
struct Holding {
    count: usize,
    since: Instant,
}

impl Holding {
    /// Counts whether `entry` holds such a piece now.
    fn update<T>(&mut self, entry: &mut Entry<T>, holds: bool) {
        if entry.holds == holds {
            return;
        }
        entry.holds = holds;
        if holds {
            // From the newest hold: a socket whose post never comes stops nobody else's poll.
            self.since = Instant::now();
            self.count += 1;
        } else {
            self.count -= 1;
        }
    }

    /// Whether the helper polls for the posts its sockets wait on: for at most `limit` since the
    /// newest of them began to wait.
    fn awaits_post(&self, limit: Duration) -> bool {
        self.count > 0 && self.since.elapsed() < limit
    }
}

/// A helper thread's body.
fn serve<T: Task>(helper: &Helper<T>, polls: Polls, waits: &WaitCounts) {
    let mut turn = SpinTurn::default();
    let mut slab: Vec<Option<Entry<T>>> = Vec::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut inbox = Inbox::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut last_work = Instant::now();
    let mut rounds = 0;
    let mut holding = Holding { count: 0, since: last_work };
    // Length of the request whose piece the helper finished last, of any of its sockets; none
    // yet polls as after a large one.
    let mut last_request = u64::MAX;
    loop {
        if helper.posted() {
            if !helper.take_inbox(&mut inbox) {
                return;
            }
            apply(helper, &mut inbox, &mut slab, &mut queue, &mut holding);
        }
        let ran = !queue.is_empty();
        for _ in 0..queue.len() {
            let Some(token) = queue.pop_front() else { break };
            let Some(Some(entry)) = slab.get_mut(token) else { continue };
            entry.queued = false;
            if entry.stopped {
                continue;
            }
            let next = run_one(helper, entry);
            if let Some(len) = entry.task.finished_request_len() {
                last_request = len;
            }
            holding.update(entry, next == Next::Idle && entry.task.holds_unposted());
            match next {
                Next::Again => {
                    entry.queued = true;
                    queue.push_back(token);
                }
                Next::Idle => {}
                Next::Stop => {
                    entry.stopped = true;
                    helper.unwatch(entry.task.fd());
                }
            }
        }
        if ran {
            last_work = Instant::now();
        }
        // With sockets still queued, look at the kernel's reports only every few rounds: a busy
        // socket takes a round per piece, and its turns need no syscall in between.
        if !queue.is_empty() {
            rounds += 1;
            if rounds < ROUNDS_PER_LOOK {
                continue;
            }
        }
        rounds = 0;
        // More queued work, or a spin after the last bit of work of a small request (a new post is
        // usually close behind): only collect what is ready. Otherwise sleep until the kernel or a
        // kick says. Past `SHORT_SPIN` a helper polls only with one of the process's turns.
        let spinning = queue.is_empty() && {
            let quiet = last_work.elapsed();
            let after_work = polls.after_work(quiet, last_request);
            let for_post = !after_work && holding.awaits_post(polls.held);
            let spinning = (after_work || for_post) && (quiet < SHORT_SPIN || turn.take(polls.spinners));
            waits.waited(spinning, after_work, for_post, holding.count > 0);
            spinning
        };
        if !spinning {
            turn.release();
        }
        let poll = !queue.is_empty() || spinning;
        let woken = match helper.wait(&mut events, poll) {
            Ok(Some(woken)) => woken,
            Ok(None) => continue,
            Err(e) => {
                // Only a programming error makes epoll_wait fail: fail what this helper serves, and
                // mark it dead as a panic would, so that a comm detaching from it stops waiting and
                // its slot is taken over.
                let err = Error::io("wait on data sockets", e);
                fail_all(&slab, err.clone());
                died(helper, err);
                return;
            }
        };
        for ev in &events[..woken.reports] {
            let token = ev.u64 as usize;
            if let Some(Some(entry)) = slab.get_mut(token)
                && !entry.queued
            {
                entry.queued = true;
                queue.push_back(token);
            }
        }
        // A poll that found nothing gives the core up: a thread woken onto this core (the
        // caller, the target's Done, the peer engine's helper) would otherwise wait out the whole
        // poll behind it once every core polls, and the next transfer with it.
        if spinning && woken.reports == 0 && !woken.posted {
            std::thread::yield_now();
        }
    }
}

/// Runs one socket's work, containing a panic there to that socket's comm: the helper goes on
/// serving every other comm.
fn run_one<T: Task>(helper: &Helper<T>, entry: &mut Entry<T>) -> Next {
    match catch_unwind(AssertUnwindSafe(|| entry.task.run())) {
        Ok(next) => next,
        Err(panic) => {
            let err = Error::internal(format!("{} panicked: {}", helper.kind(), panic_text(&*panic)));
            log::error!("{}", err.message());
            entry.task.window().fail(err);
            Next::Stop
        }
    }
}

/// Applies what was posted.
fn apply<T: Task>(
    helper: &Helper<T>,
    inbox: &mut Inbox<Sockets<T>>,
    slab: &mut Vec<Option<Entry<T>>>,
    queue: &mut VecDeque<usize>,
    holding: &mut Holding,
) {
    for (token, task) in inbox.adds.drain(..) {
        if slab.len() <= token {
            slab.resize_with(token + 1, || None);
        }
        let fd = task.fd();
        let events = task.interest() | libc::EPOLLET as u32;
        let mut entry = Entry { task, queued: true, stopped: false, holds: false };
        if let Err(e) = helper.watch(fd, events, token) {
            entry.task.window().fail(Error::io("add a data socket to its helper's epoll set", e));
            entry.stopped = true;
        }
        slab[token] = Some(entry);
        // A new socket runs once at once: data may have come before it was in the set.
        queue.push_back(token);
    }
    for (tokens, detach) in inbox.removes.drain(..) {
        for token in tokens {
            if let Some(mut entry) = slab.get_mut(token).and_then(Option::take) {
                holding.update(&mut entry, false);
                if !entry.stopped {
                    helper.unwatch(entry.task.fd());
                }
                drop(entry);
                helper.forget(token);
                // Only now: a helper whose load reads zero holds no socket's state.
                helper.release();
            }
        }
        detach.done();
    }
    for token in inbox.kicks.drain(..) {
        if let Some(Some(entry)) = slab.get_mut(token)
            && !entry.queued
            && !entry.stopped
        {
            entry.queued = true;
            queue.push_back(token);
        }
    }
}

fn fail_all<T: Task>(slab: &[Option<Entry<T>>], err: Error) {
    for entry in slab.iter().flatten() {
        entry.task.window().fail(err.clone());
    }
}

/// After a helper died: every comm it served fails, and whoever waits to detach stops waiting (the
/// sockets' state went with the thread's stack).
fn died<T: Task>(helper: &Helper<T>, err: Error) {
    for (_, detach) in helper.died(err).removes {
        detach.done();
    }
}

/// A comm waiting for one helper to let go of its sockets.
pub(super) struct Detach {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Detach {
    fn done(&self) {
        *self.done.lock() = true;
        self.cv.notify_all();
    }
}

/// Helpers of one kind, at most `max`: started when a comm is made for the sockets it may open,
/// and as sockets arrive.
pub(super) struct Pool<T: Task> {
    kind: ThreadKind,
    name: &'static str,
    max: usize,
    polls: Polls,
    waits: Arc<WaitCounts>,
    slots: Mutex<Vec<Thread<Sockets<T>>>>,
    /// Sockets the live comms may open in all (changed under the `slots` lock). The pool keeps a
    /// helper per such socket, up to `max`, started when the comm is made: a comm adds sockets at
    /// its first request that has pieces for them, and a helper started there (a thread, an epoll
    /// set and an eventfd) held up the first staged 1 MiB transfer of a GPU process for 12-30 ms
    /// (2 x H200), where the same start at connection took 40-100 us (its descriptors, most
    /// likely, crossing the table's end: `engine::fd_limit`).
    expected: AtomicUsize,
    /// Helper starts tried so far.
    started: AtomicUsize,
}

impl<T: Task> Pool<T> {
    pub fn new(kind: ThreadKind, name: &'static str, max: usize, polls: Polls) -> Pool<T> {
        Pool {
            kind,
            name,
            max: max.max(1),
            polls,
            waits: Arc::default(),
            slots: Mutex::new(Vec::new()),
            expected: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        }
    }

    /// Threads started and alive.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.slots.lock().iter().filter(|s| !s.worker.is_dead()).count()
    }

    /// Helper starts tried since the pool was made.
    #[cfg(test)]
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// A comm that may open `sockets` sockets was made (its first attached): starts helpers until
    /// the pool has one per socket its live comms may open, at most `max`. [`detach`](Self::detach)
    /// takes the same count back. A helper that cannot start now is left to `attach`, which fails
    /// the socket it was for should it still not start.
    pub fn expect(&self, sockets: usize) {
        let mut slots = self.slots.lock();
        let expected = self.expected.load(Ordering::Relaxed) + sockets;
        self.expected.store(expected, Ordering::Relaxed);
        while slots.len() < expected.min(self.max) {
            match self.start() {
                Ok(helper) => slots.push(helper),
                Err(e) => {
                    log::warn!("{} helpers start as sockets arrive: {e}", self.name);
                    return;
                }
            }
        }
    }

    /// Threads alive and not asleep in `epoll_wait` (working or polling).
    #[cfg(test)]
    pub fn awake(&self) -> usize {
        self.slots.lock().iter().filter(|s| !s.worker.is_dead() && !s.worker.sleeps()).count()
    }

    /// Hands each task to a helper: a new one while fewer than `max` run and each has a socket or
    /// serves this comm already (`beside`: the comm's sockets placed before), else the one with
    /// the fewest sockets, preferring helpers that serve none of the comm's. A comm's sockets so
    /// land on different helpers, also those it adds later.
    pub fn attach<'a>(
        &self,
        tasks: Vec<T>,
        beside: impl IntoIterator<Item = &'a Placement<T>>,
    ) -> Result<Vec<Placement<T>>> {
        let mut slots = self.slots.lock();
        let mut placed = Vec::with_capacity(tasks.len());
        let mut serving: Vec<Arc<Helper<T>>> = beside.into_iter().map(|p| p.helper.clone()).collect();
        for task in tasks {
            // A dead helper's slot is taken over by a fresh one.
            if let Some(i) = slots.iter().position(|s| s.worker.is_dead()) {
                let mut old = std::mem::replace(&mut slots[i], self.start()?);
                old.stop();
            }
            let ours = |h: &Arc<Helper<T>>| serving.iter().any(|s| Arc::ptr_eq(s, h));
            let spare = slots.len() < self.max && slots.iter().all(|s| s.worker.load() > 0 || ours(&s.worker));
            if spare {
                slots.push(self.start()?);
            }
            let slot = slots.iter().min_by_key(|s| (ours(&s.worker), s.worker.load())).expect("at least one helper");
            let helper = slot.worker.clone();
            let token = helper.reserve();
            let owner = Arc::downgrade(task.window());
            helper.add(token, task, owner);
            serving.push(helper.clone());
            placed.push(Placement { helper, token });
        }
        Ok(placed)
    }

    /// Takes every socket of a comm off its helpers and returns once none of them runs its work any
    /// more, so that no helper touches the comm's buffers after the comm is gone. `expected`: the
    /// sockets the comm was expected to open ([`expect`](Self::expect)), 0 if none. Helpers left
    /// without a socket and beyond what the live comms may use end: an engine with no connection
    /// runs none.
    pub fn detach<'a>(&self, placements: impl IntoIterator<Item = &'a Placement<T>>, expected: usize) {
        let mut by_helper: Vec<(Arc<Helper<T>>, Vec<usize>)> = Vec::new();
        for p in placements {
            match by_helper.iter_mut().find(|(h, _)| Arc::ptr_eq(h, &p.helper)) {
                Some((_, tokens)) => tokens.push(p.token),
                None => by_helper.push((p.helper.clone(), vec![p.token])),
            }
        }
        let waits: Vec<(Arc<Helper<T>>, Arc<Detach>)> = by_helper
            .into_iter()
            .map(|(helper, tokens)| {
                let detach = Arc::new(Detach { done: Mutex::new(false), cv: Condvar::new() });
                helper.remove((tokens, detach.clone()));
                (helper, detach)
            })
            .collect();
        for (helper, detach) in &waits {
            let mut done = detach.done.lock();
            // A helper that died meanwhile answers no more; its sockets' state went with it.
            while !*done && !helper.is_dead() {
                detach.cv.wait_for(&mut done, Duration::from_millis(50));
            }
        }
        self.trim(expected);
    }

    /// Takes `gone` off the sockets expected, ends the helpers that serve no socket while more run
    /// than the live comms may use, and forgets dead ones. Under the lock `attach` takes, so none
    /// gets a socket meanwhile; a load only drops once its socket's state is gone.
    fn trim(&self, gone: usize) {
        let mut slots = self.slots.lock();
        let expected = self.expected.load(Ordering::Relaxed).saturating_sub(gone);
        self.expected.store(expected, Ordering::Relaxed);
        let keep = expected.min(self.max);
        let mut i = 0;
        while i < slots.len() {
            let helper = &slots[i].worker;
            let spare = helper.load() == 0 && slots.len() > keep;
            if !spare && !helper.is_dead() {
                i += 1;
                continue;
            }
            let mut slot = slots.swap_remove(i);
            slot.stop();
        }
    }

    fn start(&self) -> Result<Thread<Sockets<T>>> {
        self.started.fetch_add(1, Ordering::Relaxed);
        let (polls, waits) = (self.polls, self.waits.clone());
        Thread::start(Worker::new(self.kind, polls.spin)?, self.name, move |helper| serve(helper, polls, &waits), died)
    }

    /// How this pool's helpers waited so far.
    pub fn waits(&self) -> HelperWaits {
        self.waits.snapshot()
    }
}

impl<T: Task> Drop for Pool<T> {
    fn drop(&mut self) {
        // Comms hold the pool: when it goes, no helper serves a socket any more.
        for slot in self.slots.get_mut().iter_mut() {
            slot.stop();
        }
    }
}
