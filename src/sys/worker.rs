//! One epoll thread's shared half, for the socket helpers and the engine's control reactor alike:
//! the epoll set it waits in (edge triggered) and the eventfd that wakes it, the inbox through which
//! other threads hand it slots to serve, kicks and removals, its slot numbers (tokens), its load,
//! and what it fails should it die. What runs in a slot, and how the thread orders its turns, is
//! the user's: this is the protocol by which neither side misses the other.
//!
//! A post fills the inbox, raises `pending`, and writes the eventfd only when the thread said it
//! sleeps: the thread raises `sleeping` and then looks at `pending` before it waits, the poster
//! raises `pending` and then looks at `sleeping`, both SeqCst, so at least one of them sees the other.

use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use parking_lot::Mutex;

use super::epoll::{Epoll, EventFd};
use crate::error::{Error, Result};
use crate::threads::ThreadKind;

/// What one kind of worker serves.
pub(crate) trait Serves: 'static {
    /// What a poster hands the thread for a slot.
    type Add: Send;
    /// What a poster hands the thread to take slots away.
    type Remove: Send;
    /// What fails, by slot, should the thread die outside any slot's work (its slots' state went
    /// with its stack); kept outside the thread.
    type Owner: Clone + Send;
    fn fail(owner: &Self::Owner, err: Error);
}

/// What posters handed the thread since it last looked. The thread swaps it with one of its own,
/// so that neither allocates once grown.
pub(crate) struct Inbox<S: Serves> {
    pub adds: Vec<(usize, S::Add)>,
    /// Slots to run soon.
    pub kicks: Vec<usize>,
    pub removes: Vec<S::Remove>,
    /// The thread is to end.
    pub exit: bool,
}

impl<S: Serves> Default for Inbox<S> {
    fn default() -> Inbox<S> {
        Inbox { adds: Vec::new(), kicks: Vec::new(), removes: Vec::new(), exit: false }
    }
}

/// The eventfd's token in the epoll set; slots use their numbers.
const WAKE_TOKEN: u64 = u64::MAX;

/// Tokens handed out by posters, so that a slot's owner knows it before the thread saw it, and
/// given back by the thread once it dropped the slot, so that no event it collected already names
/// a reused one.
#[derive(Default)]
struct Tokens {
    free: Vec<usize>,
    next: usize,
}

pub(crate) struct Worker<S: Serves> {
    kind: ThreadKind,
    epoll: Epoll,
    wake: EventFd,
    /// The thread is about to wait or waits: a post must write the eventfd. SeqCst with `pending`.
    sleeping: AtomicBool,
    /// The inbox holds something.
    pending: AtomicBool,
    inbox: Mutex<Inbox<S>>,
    tokens: Mutex<Tokens>,
    /// Slots reserved and not released.
    load: AtomicUsize,
    /// The thread ended outside any slot's work: everything it served failed.
    dead: AtomicBool,
    owners: Mutex<Vec<Option<S::Owner>>>,
    spin: Duration,
    thread: OnceLock<ThreadId>,
    _serves: PhantomData<fn() -> S>,
}

/// What one wait collected.
pub(crate) struct Woken {
    /// The kernel's reports for slots, in `events[..reports]`.
    pub reports: usize,
    /// A post woke the thread.
    pub posted: bool,
}

impl<S: Serves> Worker<S> {
    /// A worker for a thread of `kind` that polls `spin` after work before it sleeps.
    pub fn new(kind: ThreadKind, spin: Duration) -> Result<Worker<S>> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new()?;
        epoll
            .add(wake.fd(), (libc::EPOLLIN | libc::EPOLLET) as u32, WAKE_TOKEN)
            .map_err(|e| Error::io(format!("add an eventfd to a {kind}'s epoll set"), e))?;
        Ok(Worker {
            kind,
            epoll,
            wake,
            sleeping: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            inbox: Mutex::default(),
            tokens: Mutex::default(),
            load: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            owners: Mutex::new(Vec::new()),
            spin,
            thread: OnceLock::new(),
            _serves: PhantomData,
        })
    }

    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    pub fn spin(&self) -> Duration {
        self.spin
    }

    /// Registers a slot's descriptor: events `events`, reported under `token`.
    pub fn watch(&self, fd: RawFd, events: u32, token: usize) -> std::io::Result<()> {
        self.epoll.add(fd, events, token as u64)
    }

    /// Changes what a slot's descriptor waits for; the kernel reports at once what is ready already.
    pub fn rewatch(&self, fd: RawFd, events: u32, token: usize) -> std::io::Result<()> {
        self.epoll.modify(fd, events, token as u64)
    }

    pub fn unwatch(&self, fd: RawFd) {
        self.epoll.remove(fd);
    }

    pub fn load(&self) -> usize {
        self.load.load(Ordering::Acquire)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether the calling thread is this worker's.
    pub fn on_thread(&self) -> bool {
        self.thread.get() == Some(&std::thread::current().id())
    }

    /// Takes a slot number, counted in the load until [`release`](Self::release).
    pub fn reserve(&self) -> usize {
        self.load.fetch_add(1, Ordering::AcqRel);
        let mut t = self.tokens.lock();
        t.free.pop().unwrap_or_else(|| {
            t.next += 1;
            t.next - 1
        })
    }

    pub fn release(&self) {
        self.load.fetch_sub(1, Ordering::AcqRel);
    }

    /// Hands the thread slot `token`'s work; `owner` fails should the thread die.
    pub fn add(&self, token: usize, add: S::Add, owner: S::Owner) {
        {
            let mut owners = self.owners.lock();
            if owners.len() <= token {
                owners.resize(token + 1, None);
            }
            owners[token] = Some(owner);
        }
        self.post(|inbox| inbox.adds.push((token, add)));
    }

    /// Has the thread run slot `token` soon.
    pub fn kick(&self, token: usize) {
        self.post(|inbox| inbox.kicks.push(token));
    }

    pub fn remove(&self, remove: S::Remove) {
        self.post(|inbox| inbox.removes.push(remove));
    }

    /// Tells the thread to end, even if it waits on nothing but its eventfd.
    pub fn exit(&self) {
        self.post(|inbox| inbox.exit = true);
        self.wake.signal();
    }

    /// Whether a post would write the eventfd now (the thread sleeps or is about to): a moment's
    /// view, for a poster weighing what its kicks cost.
    pub fn sleeps(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }

    /// Fills the inbox, then wakes the thread if it sleeps (or is about to).
    fn post(&self, fill: impl FnOnce(&mut Inbox<S>)) {
        fill(&mut self.inbox.lock());
        self.pending.store(true, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake.signal();
        }
    }

    /// For the thread: whether anything was posted since it last took the inbox.
    pub fn posted(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// For the thread: swaps what was posted into `inbox` (left empty by the last round); false
    /// when the thread is to end.
    pub fn take_inbox(&self, inbox: &mut Inbox<S>) -> bool {
        self.pending.store(false, Ordering::SeqCst);
        std::mem::swap(&mut *self.inbox.lock(), inbox);
        !inbox.exit
    }

    /// For the thread, once it dropped slot `token`: the number may be handed out again.
    pub fn forget(&self, token: usize) {
        if let Some(owner) = self.owners.lock().get_mut(token) {
            *owner = None;
        }
        self.tokens.lock().free.push(token);
    }

    /// For the thread: collects the kernel's reports into `events`, at once with `poll`, else
    /// sleeping until one comes or something is posted. `None`: something was posted as the thread
    /// was about to sleep, so it did not (the caller looks at its inbox first). The eventfd's own
    /// reports are taken out.
    pub fn wait(&self, events: &mut [libc::epoll_event], poll: bool) -> std::io::Result<Option<Woken>> {
        if crate::threads::wait_fails(self.kind) {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        let timeout = if poll {
            Some(Duration::ZERO)
        } else {
            self.sleeping.store(true, Ordering::SeqCst);
            if self.pending.load(Ordering::SeqCst) {
                self.sleeping.store(false, Ordering::Relaxed);
                return Ok(None);
            }
            None
        };
        let n = self.epoll.wait(events, timeout)?;
        self.sleeping.store(false, Ordering::Relaxed);
        let mut woken = Woken { reports: 0, posted: false };
        for i in 0..n {
            if events[i].u64 == WAKE_TOKEN {
                self.wake.drain();
                woken.posted = true;
            } else {
                events[woken.reports] = events[i];
                woken.reports += 1;
            }
        }
        Ok(Some(woken))
    }

    /// The thread died outside any slot's work: every owner fails (outside the lock, so that an
    /// owner may detach), and no post is answered any more. Returns what was posted and not taken.
    pub fn died(&self, err: Error) -> Inbox<S> {
        self.dead.store(true, Ordering::Release);
        let owners: Vec<S::Owner> = self.owners.lock().iter().flatten().cloned().collect();
        for owner in &owners {
            S::fail(owner, err.clone());
        }
        std::mem::take(&mut *self.inbox.lock())
    }
}

/// A worker and its running thread.
pub(crate) struct Thread<S: Serves> {
    pub worker: std::sync::Arc<Worker<S>>,
    handle: Option<JoinHandle<()>>,
}

impl<S: Serves> Thread<S>
where
    Worker<S>: Send + Sync,
{
    /// Starts `serve` on a thread named `name`, its panic contained: `died` then fails what it served.
    pub fn start(
        worker: Worker<S>,
        name: &str,
        serve: impl FnOnce(&Worker<S>) + Send + 'static,
        died: impl FnOnce(&Worker<S>, Error) + Send + 'static,
    ) -> Result<Thread<S>> {
        let worker = std::sync::Arc::new(worker);
        let kind = worker.kind;
        let (body, failing) = (worker.clone(), worker.clone());
        let handle = crate::threads::spawn_contained(
            std::thread::Builder::new().name(name.into()),
            kind,
            move |err| died(&failing, err),
            move || serve(&body),
        )
        .map_err(|e| Error::io(format!("start a {kind}"), e))?;
        let _ = worker.thread.set(handle.thread().id());
        Ok(Thread { worker, handle: Some(handle) })
    }

    /// Tells the thread to end and waits for it, unless the caller is that thread (it ends once
    /// back in its loop): then its handle comes back, for another thread to join.
    pub fn stop(&mut self) -> Option<JoinHandle<()>> {
        self.worker.exit();
        let handle = self.handle.take()?;
        if handle.thread().id() == std::thread::current().id() {
            return Some(handle);
        }
        let _ = handle.join();
        None
    }
}
