//! The helper threads one `SocketNet` shares among all of its comms: a pool of senders and a pool of
//! receivers, started as sockets need them up to a fixed count, each serving many sockets of many
//! comms. A helper owns its sockets' state, waits in `epoll_wait` on them (edge triggered) and on
//! an eventfd, and runs a socket when the kernel reports it or a posting thread kicks it (work was
//! posted, a partly sent piece was handed over). Nothing polls on a timer: an idle connection costs
//! no CPU, and the thread count is the pool's bound whatever the number of connections.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::epoll::{Epoll, EventFd};
use super::window::Window;
use crate::error::{Error, Result};
use crate::threads::{ThreadKind, panic_text, spawn_contained};

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    Again,
    Idle,
    Stop,
}

/// The eventfd's token in the epoll set; sockets use their slot numbers.
const WAKE_TOKEN: u64 = u64::MAX;
const EVENTS_PER_WAIT: usize = 64;
/// Rounds over queued sockets between two looks at epoll while some stay queued.
const ROUNDS_PER_LOOK: u32 = 8;

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
}

struct Entry<T> {
    task: T,
    /// In the helper's run queue already.
    queued: bool,
    /// Out of the epoll set after `Stop` or a panic; kicks are ignored.
    stopped: bool,
}

struct Inbox<T> {
    adds: Vec<(usize, T)>,
    kicks: Vec<usize>,
    removes: Vec<(Vec<usize>, Arc<Detach>)>,
    exit: bool,
}

impl<T> Default for Inbox<T> {
    fn default() -> Inbox<T> {
        Inbox { adds: Vec::new(), kicks: Vec::new(), removes: Vec::new(), exit: false }
    }
}

/// Tokens (slot numbers) handed out and given back; allocated by attaching threads so that a comm
/// knows where its sockets are before the helper has seen them.
#[derive(Default)]
struct Tokens {
    free: Vec<usize>,
    next: usize,
}

pub(super) struct Helper<T> {
    kind: ThreadKind,
    epoll: Epoll,
    wake: EventFd,
    /// The helper is about to wait or waits: a kick must write the eventfd. SeqCst with `pending`.
    sleeping: AtomicBool,
    /// The inbox holds something.
    pending: AtomicBool,
    inbox: Mutex<Inbox<T>>,
    tokens: Mutex<Tokens>,
    /// Sockets attached and not detached.
    load: AtomicUsize,
    /// The thread ended (a panic outside any socket's work): its sockets were dropped with it.
    dead: AtomicBool,
    /// Windows of the sockets it serves, by token, for failing them all should the thread die.
    served: Mutex<Vec<Option<Weak<Window>>>>,
    spin: Duration,
}

impl<T: Task> Helper<T> {
    fn new(kind: ThreadKind, spin: Duration) -> Result<Helper<T>> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new()?;
        epoll
            .add(wake.fd(), (libc::EPOLLIN | libc::EPOLLET) as u32, WAKE_TOKEN)
            .map_err(|e| Error::io("add an eventfd to a socket helper's epoll set", e))?;
        Ok(Helper {
            kind,
            epoll,
            wake,
            sleeping: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            inbox: Mutex::default(),
            tokens: Mutex::default(),
            load: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            served: Mutex::new(Vec::new()),
            spin,
        })
    }

    fn kick(&self, token: usize) {
        self.inbox.lock().kicks.push(token);
        self.notify();
    }

    /// After filling the inbox: wakes the helper if it sleeps (or is about to).
    fn notify(&self) {
        self.pending.store(true, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake.signal();
        }
    }

    fn attach(&self, task: T) -> usize {
        let token = {
            let mut t = self.tokens.lock();
            t.free.pop().unwrap_or_else(|| {
                t.next += 1;
                t.next - 1
            })
        };
        {
            let mut served = self.served.lock();
            if served.len() <= token {
                served.resize(token + 1, None);
            }
            served[token] = Some(Arc::downgrade(task.window()));
        }
        self.load.fetch_add(1, Ordering::Relaxed);
        self.inbox.lock().adds.push((token, task));
        self.notify();
        token
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The thread's body.
    fn serve(&self) {
        let mut slab: Vec<Option<Entry<T>>> = Vec::new();
        let mut queue: VecDeque<usize> = VecDeque::new();
        // Swapped with the shared inbox, so that neither allocates once grown.
        let mut inbox = Inbox::default();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        let mut last_work = Instant::now();
        let mut rounds = 0;
        loop {
            if self.pending.load(Ordering::Acquire) && !self.take_inbox(&mut inbox, &mut slab, &mut queue) {
                return;
            }
            let ran = !queue.is_empty();
            for _ in 0..queue.len() {
                let Some(token) = queue.pop_front() else { break };
                let Some(Some(entry)) = slab.get_mut(token) else { continue };
                entry.queued = false;
                if entry.stopped {
                    continue;
                }
                match self.run_one(entry) {
                    Next::Again => {
                        entry.queued = true;
                        queue.push_back(token);
                    }
                    Next::Idle => {}
                    Next::Stop => {
                        entry.stopped = true;
                        self.epoll.remove(entry.task.fd());
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
            // More queued work, or a spin after the last bit of work (a new post is usually close
            // behind): only collect what is ready. Otherwise sleep until the kernel or a kick says.
            let timeout =
                if !queue.is_empty() || last_work.elapsed() < self.spin { Some(Duration::ZERO) } else { None };
            if timeout.is_none() {
                self.sleeping.store(true, Ordering::SeqCst);
                if self.pending.load(Ordering::SeqCst) {
                    self.sleeping.store(false, Ordering::Relaxed);
                    continue;
                }
            }
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(e) => {
                    // Only a programming error makes epoll_wait fail: fail what this helper serves.
                    self.fail_all(&slab, Error::io("wait on data sockets", e));
                    return;
                }
            };
            self.sleeping.store(false, Ordering::Relaxed);
            for ev in &events[..n] {
                let token = ev.u64;
                if token == WAKE_TOKEN {
                    self.wake.drain();
                    continue;
                }
                if let Some(Some(entry)) = slab.get_mut(token as usize)
                    && !entry.queued
                {
                    entry.queued = true;
                    queue.push_back(token as usize);
                }
            }
        }
    }

    /// Runs one socket's work, containing a panic there to that socket's comm: the helper goes on
    /// serving every other comm.
    fn run_one(&self, entry: &mut Entry<T>) -> Next {
        match catch_unwind(AssertUnwindSafe(|| entry.task.run())) {
            Ok(next) => next,
            Err(panic) => {
                let err = Error::internal(format!("{} panicked: {}", self.kind, panic_text(&*panic)));
                log::error!("{}", err.message());
                entry.task.window().fail(err);
                Next::Stop
            }
        }
    }

    /// Applies the inbox; false when the pool asked the thread to end.
    fn take_inbox(&self, inbox: &mut Inbox<T>, slab: &mut Vec<Option<Entry<T>>>, queue: &mut VecDeque<usize>) -> bool {
        self.pending.store(false, Ordering::SeqCst);
        std::mem::swap(&mut *self.inbox.lock(), inbox);
        if inbox.exit {
            return false;
        }
        for (token, task) in inbox.adds.drain(..) {
            if slab.len() <= token {
                slab.resize_with(token + 1, || None);
            }
            let fd = task.fd();
            let events = task.interest() | libc::EPOLLET as u32;
            let mut entry = Entry { task, queued: true, stopped: false };
            if let Err(e) = self.epoll.add(fd, events, token as u64) {
                entry.task.window().fail(Error::io("add a data socket to its helper's epoll set", e));
                entry.stopped = true;
            }
            slab[token] = Some(entry);
            // A new socket runs once at once: data may have come before it was in the set.
            queue.push_back(token);
        }
        for (tokens, detach) in inbox.removes.drain(..) {
            for token in tokens {
                if let Some(entry) = slab.get_mut(token).and_then(Option::take) {
                    if !entry.stopped {
                        self.epoll.remove(entry.task.fd());
                    }
                    drop(entry);
                    if let Some(w) = self.served.lock().get_mut(token) {
                        *w = None;
                    }
                    self.tokens.lock().free.push(token);
                    self.load.fetch_sub(1, Ordering::Release);
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
        true
    }

    fn fail_all(&self, slab: &[Option<Entry<T>>], err: Error) {
        for entry in slab.iter().flatten() {
            entry.task.window().fail(err.clone());
        }
    }

    /// After the thread died: every comm it served fails, and whoever waits to detach stops waiting
    /// (the sockets' state went with the thread's stack).
    fn died(&self, err: Error) {
        self.dead.store(true, Ordering::Release);
        for window in self.served.lock().iter().flatten().filter_map(Weak::upgrade) {
            window.fail(err.clone());
        }
        let inbox = std::mem::take(&mut *self.inbox.lock());
        for (_, detach) in inbox.removes {
            detach.done();
        }
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

struct Slot<T> {
    helper: Arc<Helper<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Task> Slot<T> {
    fn stop(&mut self) {
        self.helper.inbox.lock().exit = true;
        self.helper.notify();
        self.helper.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Helpers of one kind, started as sockets arrive, at most `max`.
pub(super) struct Pool<T: Task> {
    kind: ThreadKind,
    name: &'static str,
    max: usize,
    spin: Duration,
    slots: Mutex<Vec<Slot<T>>>,
}

impl<T: Task> Pool<T> {
    pub fn new(kind: ThreadKind, name: &'static str, max: usize, spin: Duration) -> Pool<T> {
        Pool { kind, name, max: max.max(1), spin, slots: Mutex::new(Vec::new()) }
    }

    /// Threads started and alive.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.slots.lock().iter().filter(|s| !s.helper.is_dead()).count()
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
            if let Some(i) = slots.iter().position(|s| s.helper.is_dead()) {
                let mut old = std::mem::replace(&mut slots[i], self.start()?);
                old.stop();
            }
            let ours = |h: &Arc<Helper<T>>| serving.iter().any(|s| Arc::ptr_eq(s, h));
            let spare = slots.len() < self.max
                && slots.iter().all(|s| s.helper.load.load(Ordering::Relaxed) > 0 || ours(&s.helper));
            if spare {
                slots.push(self.start()?);
            }
            let slot = slots
                .iter()
                .min_by_key(|s| (ours(&s.helper), s.helper.load.load(Ordering::Relaxed)))
                .expect("at least one helper");
            let helper = slot.helper.clone();
            let token = helper.attach(task);
            serving.push(helper.clone());
            placed.push(Placement { helper, token });
        }
        Ok(placed)
    }

    /// Takes every socket of a comm off its helpers and returns once none of them runs its work any
    /// more, so that no helper touches the comm's buffers after the comm is gone. Helpers left
    /// without a socket end: an engine with no connection runs none.
    pub fn detach<'a>(&self, placements: impl IntoIterator<Item = &'a Placement<T>>) {
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
                helper.inbox.lock().removes.push((tokens, detach.clone()));
                helper.notify();
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
        self.trim();
    }

    /// Ends the helpers that serve no socket, and forgets dead ones. Under the lock `attach` takes,
    /// so none gets a socket meanwhile; a load only drops once its socket's state is gone.
    fn trim(&self) {
        let mut slots = self.slots.lock();
        let mut i = 0;
        while i < slots.len() {
            let helper = &slots[i].helper;
            if helper.load.load(Ordering::Acquire) > 0 && !helper.is_dead() {
                i += 1;
                continue;
            }
            let mut slot = slots.swap_remove(i);
            slot.stop();
        }
    }

    fn start(&self) -> Result<Slot<T>> {
        let helper = Arc::new(Helper::new(self.kind, self.spin)?);
        let (body, failing) = (helper.clone(), helper.clone());
        let thread = spawn_contained(
            std::thread::Builder::new().name(self.name.into()),
            self.kind,
            move |err| failing.died(err),
            move || body.serve(),
        )
        .map_err(|e| Error::io(format!("start a {}", self.kind), e))?;
        Ok(Slot { helper, thread: Some(thread) })
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
