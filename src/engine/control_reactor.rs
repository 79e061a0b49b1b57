//! The engine's control reactor: a few threads, shared by all of its connections, that serve their
//! control streams. Each thread waits in one epoll set (edge triggered) over the control sockets of
//! the connections it serves and an eventfd, and runs a connection's reading when its socket
//! reports bytes (an end, an error) and its writing when queued control bytes may leave (a poster
//! handed them over, or the socket took more after `EAGAIN`). After work it polls for the spin time
//! before it sleeps. The epoll set, the inbox, the kicks and the sleep protocol are the socket
//! transport's [`Worker`], which the socket helpers run too; what a turn is, is this file's. Nothing runs on a timer: an idle connection costs no CPU and no thread of its
//! own, and an engine runs at most `max` of these threads (`UCCL_TCPX_CONTROL_THREADS`), started
//! as connections arrive and ended when the last connection they serve goes.
//!
//! A panic in one connection's work is caught there and fails that connection only (the thread goes
//! on serving the others); a thread that dies outside such work fails every connection it serves and
//! is replaced at the next attach.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::sys::worker::{Inbox, Serves, Thread, Worker};
use crate::threads::{self, ThreadKind, run_contained};

/// What a reactor thread serves: one connection's control stream, through this trait so that this
/// file names no connection type.
pub(super) trait ControlEndpoint: Send + Sync {
    /// The socket reported bytes, an end or an error: read and handle some.
    fn readable(&self) -> Next;
    /// Queued control bytes may leave: write some.
    fn writable(&self) -> Next;
    /// Work of this connection panicked on a reactor thread, or the thread serving it died.
    fn fail_with(&self, err: Error);
}

/// What a connection's turn left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// More to do at once: it stopped to let the thread's other connections run.
    Again,
    /// Did some work, and waits for the kernel or a kick.
    Idle,
    /// Found nothing to do (the kernel's report was about bytes someone else read).
    Empty,
    /// A caller reads the stream itself: the thread has nothing to poll it for meanwhile.
    Taken,
    /// The connection failed: nothing is to run for it any more.
    Stop,
    /// Did some work, and chunks are left with the data sockets' helpers: what the peer says next
    /// waits on them.
    Handed,
}

const EVENTS_PER_WAIT: usize = 64;
const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
const WRITE_EVENTS: u32 = libc::EPOLLOUT as u32;
/// Reported whatever the mask: a broken socket is news to both halves.
const BROKEN: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
/// While polling the connection that read last, one look at the epoll set (the thread's other
/// connections, kicks) per this many polls of its socket.
const POLLS_PER_LOOK: u32 = 4;

/// What a reactor thread serves: connections' control streams, each failed should the thread die.
struct Connections;

impl Serves for Connections {
    type Add = Weak<dyn ControlEndpoint>;
    /// A slot whose connection was detached.
    type Remove = usize;
    type Owner = Weak<dyn ControlEndpoint>;
    fn fail(owner: &Weak<dyn ControlEndpoint>, err: Error) {
        if let Some(endpoint) = owner.upgrade() {
            endpoint.fail_with(err);
        }
    }
}

type Reactor = Worker<Connections>;

/// Threads of one engine, started as connections arrive, at most `max`.
pub(super) struct ControlReactor {
    pool: Arc<Pool>,
}

struct Pool {
    max: usize,
    spin: Duration,
    past_chunks: bool,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    live: Vec<Thread<Connections>>,
    /// Threads told to end by themselves (their last connection went on their own thread), joined
    /// by the next trim on another thread or when the reactor goes.
    retired: Vec<JoinHandle<()>>,
}

impl ControlReactor {
    /// `max` threads at most (at least one); each polls `spin` after work before it sleeps, and
    /// after a turn that left chunks with the data sockets only if `past_chunks`.
    pub fn new(max: usize, spin: Duration, past_chunks: bool) -> ControlReactor {
        ControlReactor { pool: Arc::new(Pool { max: max.max(1), spin, past_chunks, slots: Mutex::default() }) }
    }

    /// Threads started and alive.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.pool.slots.lock().live.iter().filter(|s| !s.worker.is_dead()).count()
    }

    /// Places a control socket on a thread: a new one while fewer than `max` run and each serves a
    /// connection, else the one serving the fewest. Nothing runs for it before `start`.
    pub fn attach(&self, fd: RawFd) -> Result<Arc<Registration>> {
        let mut slots = self.pool.slots.lock();
        let mut dead = Vec::new();
        // A dead thread's place goes to a fresh one.
        while let Some(i) = slots.live.iter().position(|s| s.worker.is_dead()) {
            dead.push(slots.live.swap_remove(i));
        }
        let spare = slots.live.len() < self.pool.max && slots.live.iter().all(|s| s.worker.load() > 0);
        if spare || slots.live.is_empty() {
            slots.live.push(self.pool.start()?);
        }
        let slot = slots.live.iter().min_by_key(|s| s.worker.load()).expect("at least one thread");
        let worker = slot.worker.clone();
        // Under the lock, so that a trim never ends a thread just chosen.
        let token = worker.reserve();
        drop(slots);
        for mut slot in dead {
            let _ = slot.stop();
        }
        Ok(Arc::new(Registration {
            pool: self.pool.clone(),
            worker,
            token,
            fd,
            interest: Mutex::new(Interest { read: true, write: false, registered: false, detached: false }),
        }))
    }
}

impl Drop for ControlReactor {
    fn drop(&mut self) {
        let (live, retired) = {
            let mut slots = self.pool.slots.lock();
            (std::mem::take(&mut slots.live), std::mem::take(&mut slots.retired))
        };
        for mut slot in live {
            let _ = slot.stop();
        }
        for t in retired {
            join_unless_current(t);
        }
    }
}

impl Pool {
    fn start(&self) -> Result<Thread<Connections>> {
        let worker = Worker::new(ThreadKind::ControlReactor, self.spin)?;
        let past_chunks = self.past_chunks;
        Thread::start(
            worker,
            "uccl-ctrl",
            move |worker| serve(worker, past_chunks),
            |worker, err| drop(worker.died(err)),
        )
    }

    /// Ends the threads that serve no connection any more, and forgets dead ones. A thread's load
    /// changes only under this lock or by a detach, which trims afterwards.
    fn trim(&self) {
        let (mut ending, retired) = {
            let mut slots = self.slots.lock();
            let mut ending = Vec::new();
            let mut i = 0;
            while i < slots.live.len() {
                let w = &slots.live[i].worker;
                if w.load() > 0 && !w.is_dead() {
                    i += 1;
                    continue;
                }
                ending.push(slots.live.swap_remove(i));
            }
            (ending, std::mem::take(&mut slots.retired))
        };
        // A thread cannot join itself: it ends once back in its loop, and someone else joins it.
        let mut kept: Vec<_> = ending.iter_mut().filter_map(Thread::stop).collect();
        for t in retired {
            if t.thread().id() == std::thread::current().id() {
                kept.push(t);
            } else {
                let _ = t.join();
            }
        }
        if !kept.is_empty() {
            self.slots.lock().retired.extend(kept);
        }
    }
}

fn join_unless_current(t: JoinHandle<()>) {
    if t.thread().id() != std::thread::current().id() {
        let _ = t.join();
    }
}

/// One connection's place on a reactor thread. The registration in the thread's epoll set follows
/// `Interest`: reading while no caller reads the stream itself, writing while queued bytes wait for
/// room.
pub(super) struct Registration {
    pool: Arc<Pool>,
    worker: Arc<Reactor>,
    token: usize,
    fd: RawFd,
    interest: Mutex<Interest>,
}

struct Interest {
    /// No caller reads the stream itself.
    read: bool,
    write: bool,
    /// In the epoll set (after `start`, until `detach`).
    registered: bool,
    detached: bool,
}

impl Interest {
    fn events(&self) -> u32 {
        let mut events = libc::EPOLLET as u32;
        if self.read {
            events |= READ_EVENTS;
        }
        if self.write {
            events |= WRITE_EVENTS;
        }
        events
    }
}

impl Registration {
    /// Starts serving `endpoint`: the thread runs its reading and writing once at once (something
    /// may have come before), then as the socket reports or a kick asks.
    pub fn start(&self, endpoint: Weak<dyn ControlEndpoint>) -> Result<()> {
        let mut interest = self.interest.lock();
        if interest.detached {
            return Ok(());
        }
        self.worker.add(self.token, endpoint.clone(), endpoint);
        self.worker
            .watch(self.fd, interest.events(), self.token)
            .map_err(|e| Error::io("add a control stream to its reactor's epoll set", e))?;
        interest.registered = true;
        Ok(())
    }

    /// Whether the thread reads the stream when it reports bytes: not while a caller reads it
    /// itself. Arming reports at once what is queued already.
    pub fn arm_read(&self, armed: bool) {
        let mut interest = self.interest.lock();
        if interest.read != armed {
            interest.read = armed;
            self.update(&interest);
        }
    }

    /// Has the thread write the connection's queued control bytes soon.
    pub fn kick_write(&self) {
        self.worker.kick(self.token);
    }

    /// Whether the thread waits for the socket to take more (after `EAGAIN`), or not (the queue
    /// emptied). Called by the writing turn, on the connection's thread.
    pub fn wait_writable(&self, wait: bool) {
        let mut interest = self.interest.lock();
        if interest.write != wait {
            interest.write = wait;
            self.update(&interest);
        }
    }

    fn update(&self, interest: &Interest) {
        if interest.registered
            && !interest.detached
            && let Err(e) = self.worker.rewatch(self.fd, interest.events(), self.token)
        {
            log::error!("control stream epoll_ctl: {e}");
        }
    }

    /// Whether the calling thread is the one serving this connection (which must not wait for
    /// itself).
    pub fn on_reactor_thread(&self) -> bool {
        self.worker.on_thread()
    }

    /// Takes the connection off its thread: no event of it is reported from now on, and a thread
    /// left without a connection ends. The thread may still be running a turn of it, which finds
    /// it failed or gone. Idempotent.
    pub fn detach(&self) {
        {
            let mut interest = self.interest.lock();
            if interest.detached {
                return;
            }
            interest.detached = true;
            if interest.registered {
                self.worker.unwatch(self.fd);
            }
        }
        // Off the load at once (a trim may end the thread), while the thread drops the slot at its
        // next look at its inbox.
        self.worker.release();
        self.worker.remove(self.token);
        self.pool.trim();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A connection's state on its thread.
struct Entry {
    endpoint: Weak<dyn ControlEndpoint>,
    read: bool,
    write: bool,
    /// In the run queue already.
    queued: bool,
    /// Failed: events and kicks are ignored until it is detached.
    stopped: bool,
}

/// A reactor thread's body; `past_chunks`: see `ControlReactor::new`.
fn serve(worker: &Reactor, past_chunks: bool) {
    let mut slab: Vec<Option<Entry>> = Vec::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut inbox = Inbox::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    // The connection whose reading last found bytes, polled until `spin` after that: the next
    // message often follows at once (the reply to a polling caller's next request), and a poll
    // of its socket catches it without a wake-up or a look at epoll first.
    let mut hot: Option<(usize, Instant)> = None;
    let mut polls = 0u32;
    loop {
        if worker.posted() {
            if !worker.take_inbox(&mut inbox) {
                return;
            }
            apply(worker, &mut inbox, &mut slab, &mut queue);
        }
        for _ in 0..queue.len() {
            let Some(token) = queue.pop_front() else { break };
            let Some(Some(entry)) = slab.get_mut(token) else { continue };
            entry.queued = false;
            if entry.stopped {
                continue;
            }
            // A connection being dropped is detached right after; nothing to do for it.
            let Some(endpoint) = entry.endpoint.upgrade() else { continue };
            let read = turn(entry, &*endpoint);
            note_read(&mut hot, token, read, past_chunks);
            if (entry.read || entry.write) && !entry.stopped {
                entry.queued = true;
                queue.push_back(token);
            }
            // Possibly the last reference: the connection then closes on this thread.
            drop(endpoint);
        }
        let spinning = hot.filter(|&(_, since)| since.elapsed() < worker.spin());
        if queue.is_empty()
            && let Some((token, _)) = spinning
        {
            // Yield the CPU between polls, so that on a small host the thread that must act
            // next still runs.
            std::thread::yield_now();
            polls += 1;
            if !polls.is_multiple_of(POLLS_PER_LOOK) {
                if let Some(Some(entry)) = slab.get_mut(token)
                    && !entry.stopped
                    && let Some(endpoint) = entry.endpoint.upgrade()
                {
                    entry.read = true;
                    let read = turn(entry, &*endpoint);
                    note_read(&mut hot, token, read, past_chunks);
                    if entry.read && !entry.stopped && !entry.queued {
                        entry.queued = true;
                        queue.push_back(token);
                    }
                    drop(endpoint);
                } else {
                    hot = None;
                }
                continue;
            }
        }
        // More queued or still polling: only collect what is ready. Otherwise sleep until the
        // kernel or a kick says.
        let poll = !queue.is_empty() || spinning.is_some();
        if !poll {
            hot = None;
        }
        let woken = match worker.wait(&mut events, poll) {
            Ok(Some(woken)) => woken,
            Ok(None) => continue,
            Err(e) => {
                // Only a programming error makes epoll_wait fail: fail what this thread serves.
                drop(worker.died(Error::io("wait on control streams", e)));
                return;
            }
        };
        if woken.reports > 0 || woken.posted {
            threads::point(ThreadKind::ControlReactor);
        }
        for ev in &events[..woken.reports] {
            let token = ev.u64 as usize;
            let Some(Some(entry)) = slab.get_mut(token) else { continue };
            if entry.stopped {
                continue;
            }
            entry.read |= ev.events & (READ_EVENTS | BROKEN) != 0;
            entry.write |= ev.events & (WRITE_EVENTS | BROKEN) != 0;
            if !entry.queued && (entry.read || entry.write) {
                entry.queued = true;
                queue.push_back(token);
            }
        }
    }
}

/// Applies what was posted: new connections run once at once (bytes may have come before they
/// were in the set), detached ones are dropped, kicked ones write.
fn apply(worker: &Reactor, inbox: &mut Inbox<Connections>, slab: &mut Vec<Option<Entry>>, queue: &mut VecDeque<usize>) {
    for (token, endpoint) in inbox.adds.drain(..) {
        if slab.len() <= token {
            slab.resize_with(token + 1, || None);
        }
        slab[token] = Some(Entry { endpoint, read: true, write: true, queued: true, stopped: false });
        queue.push_back(token);
    }
    for token in inbox.removes.drain(..) {
        if let Some(entry) = slab.get_mut(token) {
            *entry = None;
        }
        worker.forget(token);
    }
    for token in inbox.kicks.drain(..) {
        if let Some(Some(entry)) = slab.get_mut(token)
            && !entry.stopped
        {
            entry.write = true;
            if !entry.queued {
                entry.queued = true;
                queue.push_back(token);
            }
        }
    }
}

/// After a turn: the connection becomes the one polled if its reading found bytes, and stops being
/// it once a caller reads its stream (its bytes no longer come here). A turn that left chunks with
/// the data sockets counts as one that found bytes only with `past_chunks`: where their helpers
/// sleep instead of polling, cores are few, and a reactor polling beside the helpers it just woke
/// delays them, and so the message it polls for.
fn note_read(hot: &mut Option<(usize, Instant)>, token: usize, read: Option<Next>, past_chunks: bool) {
    match read {
        Some(Next::Again | Next::Idle) => *hot = Some((token, Instant::now())),
        Some(Next::Handed) if past_chunks => *hot = Some((token, Instant::now())),
        Some(Next::Taken | Next::Stop | Next::Handed) if hot.is_some_and(|(t, _)| t == token) => *hot = None,
        _ => {}
    }
}

/// Runs a connection's reading, then its writing, each contained: a panic fails that connection
/// alone. Returns what the reading found, if it ran.
fn turn(entry: &mut Entry, endpoint: &dyn ControlEndpoint) -> Option<Next> {
    let mut read = None;
    if entry.read {
        let next = run(ThreadKind::ControlReader, entry, || endpoint.readable(), endpoint);
        entry.read = next == Next::Again;
        read = Some(next);
    }
    if entry.write && !entry.stopped {
        entry.write = run(ThreadKind::ControlWriter, entry, || endpoint.writable(), endpoint) == Next::Again;
    }
    read
}

/// One half's work, contained.
fn run(kind: ThreadKind, entry: &mut Entry, work: impl FnOnce() -> Next, endpoint: &dyn ControlEndpoint) -> Next {
    match run_contained(kind, work) {
        Ok(Next::Stop) => {
            entry.stopped = true;
            Next::Stop
        }
        Ok(next) => next,
        Err(err) => {
            entry.stopped = true;
            endpoint.fail_with(err);
            Next::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts its writing turns; panics in them if told to.
    #[derive(Default)]
    struct Probe {
        writes: AtomicUsize,
        panics: bool,
        failed: Mutex<Option<Error>>,
    }

    impl ControlEndpoint for Probe {
        fn readable(&self) -> Next {
            Next::Idle
        }
        fn writable(&self) -> Next {
            self.writes.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panics, "boom");
            Next::Idle
        }
        fn fail_with(&self, err: Error) {
            *self.failed.lock() = Some(err);
        }
    }

    /// Drains its stream on every reading turn, counts the turns, and answers `next` to every turn,
    /// writing ones included: the stream's first writable report is a turn too, and one answered
    /// "other work" would start the polling the test looks for after a handed turn.
    struct Reader {
        stream: TcpStream,
        next: Next,
        reads: AtomicUsize,
        /// The number of the (last) turn that read bytes, 0 before any: the message's turn, not
        /// one before it (a turn as the stream is armed may come first).
        read_in: AtomicUsize,
    }

    impl ControlEndpoint for Reader {
        fn readable(&self) -> Next {
            let mut buf = [0u8; 64];
            let mut got = false;
            while let Ok(1..) = (&self.stream).read(&mut buf) {
                got = true;
            }
            let turn = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
            if got {
                self.read_in.store(turn, Ordering::SeqCst);
            }
            self.next
        }
        fn writable(&self) -> Next {
            self.next
        }
        fn fail_with(&self, _: Error) {}
    }

    /// Whether a connection whose reactor polls up to 10 s after work gets more than the one
    /// reading turn of one message. Polling shows as a second turn, waited for; its absence is
    /// looked for over 50 ms after the message's turn (a loaded machine can only hide a poll that
    /// should not happen, never make one appear).
    fn polled_after_one_message(next: Next, past_chunks: bool) -> bool {
        let reactor = ControlReactor::new(1, Duration::from_secs(10), past_chunks);
        let (ours, mut peer) = socket();
        ours.set_nonblocking(true).unwrap();
        let reg = reactor.attach(ours.as_raw_fd()).unwrap();
        let reader = Arc::new(Reader { stream: ours, next, reads: AtomicUsize::new(0), read_in: AtomicUsize::new(0) });
        reg.start(Arc::downgrade(&reader) as Weak<dyn ControlEndpoint>).unwrap();
        peer.write_all(b"x").unwrap();
        until("the message's turn", || reader.read_in.load(Ordering::SeqCst) > 0);
        let after = reader.read_in.load(Ordering::SeqCst);
        let polled = if matches!(next, Next::Handed) && !past_chunks {
            std::thread::sleep(Duration::from_millis(50));
            reader.reads.load(Ordering::SeqCst) > after
        } else {
            until("a polling turn", || reader.reads.load(Ordering::SeqCst) > after);
            true
        };
        reg.detach();
        polled
    }

    /// After a turn that left chunks with the data sockets the reactor polls the stream only where
    /// it was told to (where the helpers poll too); after other work it polls either way.
    #[test]
    fn polling_after_chunks_left_with_the_data_sockets_follows_the_policy() {
        assert!(!polled_after_one_message(Next::Handed, false), "no poll after chunks");
        assert!(polled_after_one_message(Next::Handed, true), "polled past chunks");
        assert!(polled_after_one_message(Next::Idle, false), "polled after other work");
    }

    #[test]
    fn a_handed_turn_ends_only_its_own_connections_poll() {
        let mut hot = Some((3, Instant::now()));
        note_read(&mut hot, 5, Some(Next::Handed), false);
        assert_eq!(hot.map(|(t, _)| t), Some(3), "another connection stays polled");
        note_read(&mut hot, 3, Some(Next::Handed), false);
        assert_eq!(hot, None);
        note_read(&mut hot, 3, Some(Next::Handed), true);
        assert_eq!(hot.map(|(t, _)| t), Some(3));
    }

    fn socket() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (ours, listener.accept().unwrap().0)
    }

    fn until(what: &str, cond: impl Fn() -> bool) {
        testkit::wait_until(what, testkit::PATIENCE, cond);
    }

    #[test]
    fn threads_are_bounded_shared_and_end_with_the_last_connection() {
        let reactor = ControlReactor::new(2, Duration::ZERO, true);
        assert_eq!(reactor.threads(), 0, "no connection, no thread");
        let sockets: Vec<_> = (0..5).map(|_| socket()).collect();
        let mut regs: Vec<_> = sockets.iter().map(|(s, _)| reactor.attach(s.as_raw_fd()).unwrap()).collect();
        assert_eq!(reactor.threads(), 2);
        let on_first = regs.iter().filter(|r| Arc::ptr_eq(&r.worker, &regs[0].worker)).count();
        assert_eq!(on_first, 3, "the connections are spread over both threads");
        let probes: Vec<_> = regs
            .iter()
            .map(|r| {
                let probe = Arc::new(Probe::default());
                r.start(Arc::downgrade(&probe) as Weak<dyn ControlEndpoint>).unwrap();
                probe
            })
            .collect();
        until("every connection's first turn", || probes.iter().all(|p| p.writes.load(Ordering::SeqCst) == 1));
        regs[4].kick_write();
        until("the kicked connection's turn", || probes[4].writes.load(Ordering::SeqCst) == 2);
        assert!(probes[..4].iter().all(|p| p.writes.load(Ordering::SeqCst) == 1), "only the kicked one ran");
        while regs.len() > 1 {
            regs.pop().unwrap().detach();
            assert!(reactor.threads() >= 1);
        }
        // Dropping the last registration detaches it, and its thread ends with it.
        drop(regs);
        assert_eq!(reactor.threads(), 0);
        let again = reactor.attach(sockets[0].0.as_raw_fd()).unwrap();
        assert_eq!(reactor.threads(), 1, "a later connection starts one again");
        drop(again);
        assert_eq!(reactor.threads(), 0);
    }

    #[test]
    fn a_panic_in_one_connections_work_fails_that_connection_alone() {
        let reactor = ControlReactor::new(1, Duration::ZERO, true);
        let (a, _pa) = socket();
        let (b, _pb) = socket();
        let (bad, good) = (Arc::new(Probe { panics: true, ..Probe::default() }), Arc::new(Probe::default()));
        let bad_reg = reactor.attach(a.as_raw_fd()).unwrap();
        let good_reg = reactor.attach(b.as_raw_fd()).unwrap();
        assert!(Arc::ptr_eq(&bad_reg.worker, &good_reg.worker), "one thread serves both");
        bad_reg.start(Arc::downgrade(&bad) as Weak<dyn ControlEndpoint>).unwrap();
        good_reg.start(Arc::downgrade(&good) as Weak<dyn ControlEndpoint>).unwrap();
        until("the panicking connection failed", || bad.failed.lock().is_some());
        let err = bad.failed.lock().clone().unwrap();
        assert_eq!(err.status(), crate::error::UcclStatus::ErrInternal);
        assert_eq!(err.message(), "control writer panicked: boom");
        // The thread lives on: the other connection is served, the failed one no more.
        until("the good connection's first turn", || good.writes.load(Ordering::SeqCst) == 1);
        bad_reg.kick_write();
        good_reg.kick_write();
        until("the good connection's kicked turn", || good.writes.load(Ordering::SeqCst) == 2);
        assert_eq!(bad.writes.load(Ordering::SeqCst), 1, "a failed connection's work does not run again");
        assert!(good.failed.lock().is_none());
        assert_eq!(reactor.threads(), 1);
    }
}
