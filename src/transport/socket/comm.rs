//! Socket comms: a request window and the comm's data sockets, each socket served by one of the
//! net's shared helper threads. A comm starts with one socket; a send comm opens the others as its
//! requests ask for them, and a receive comm takes them as they arrive. Requests are numbered in
//! posting order; `test` reads a completion flag without locking.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::fanout::{self, Idle};
use super::grow::Dialer;
use super::pure::counts::Counts;
use super::pure::failover::{Failover, Redial};
use super::pure::link_tally;
use super::pure::window::{MAX_REQUESTS, Window};
use super::pure::wire::{CommShape, PieceCut, attach_ack};
use super::reactor::{Placement, Pool};
use super::receiver::{RecvSockets, RecvTask};
use super::sender::{INLINE_MAX, Inline, SendSockets, SendTask};
use super::spin::{HelperWaits, Polls};
use crate::error::{Error, Result};
use crate::sys::epoll::EventFd;
use crate::threads::ThreadKind;
use crate::trace;
use crate::transport::Wake;
use crate::transport::{IoSeg, LinkStats, MemKind, MrHandle, MrRun, RecvComm, RequestId, SendComm};

/// How a comm moves its pieces.
#[derive(Clone, Copy, Debug)]
pub struct Threading {
    pub subchunk: usize,
    /// Send comms: sleeping helpers a post wakes itself, the rest woken by those (`fanout`); 0 = all.
    pub kick_fanout: usize,
}

/// The helper threads of one net: senders and receivers, each pool at most `helpers` threads.
/// Every comm holds them, so they outlive the last comm even if the net goes first.
pub struct Helpers {
    send: Pool<SendTask>,
    recv: Pool<RecvTask>,
}

impl Helpers {
    pub fn new(helpers: usize, polls: Polls) -> Helpers {
        Helpers {
            send: Pool::new(ThreadKind::SocketSender, "uccl-sock-tx", helpers, polls),
            recv: Pool::new(ThreadKind::SocketReceiver, "uccl-sock-rx", helpers, polls),
        }
    }

    /// Helper threads running now, senders and receivers.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.send.threads() + self.recv.threads()
    }

    /// Helper threads started so far, senders and receivers.
    #[cfg(test)]
    pub fn starts(&self) -> usize {
        self.send.started() + self.recv.started()
    }

    /// Helper threads not asleep now, senders and receivers.
    #[cfg(test)]
    pub fn awake(&self) -> usize {
        self.send.awake() + self.recv.awake()
    }

    /// How the helpers waited so far, senders and receivers.
    pub fn waits(&self) -> HelperWaits {
        self.send.waits() + self.recv.waits()
    }
}

enum Side {
    Send(Box<SendSide>),
    Recv(Arc<RecvJoin>),
}

/// A send comm's sockets, their placements (socket `k` is `placements[k]`), and what opens the
/// sockets it has not opened yet.
struct SendSide {
    shared: Arc<SendSockets>,
    placements: Vec<Placement<SendTask>>,
    /// The sockets the cut counts (the others are spares of an acknowledged comm).
    base: usize,
    /// `None` once every socket was tried and none can be replaced.
    dialer: Option<Dialer>,
    /// The comm opens more of its `base` sockets: not once adding one failed before its connect
    /// started.
    growing: bool,
    sockets: Arc<Counts>,
    /// Acknowledged comms: checking links and dialing dead ones again.
    failover: Option<Failover>,
}

impl SendSide {
    /// Kicks idle sockets for `pieces` pieces that may be cut now; busy ones pull the rest when
    /// they finish their piece. Kicks of sleeping helpers past the fan-out are owed to the comm's
    /// running sockets, which pass them on; owed before any kick goes out, so that the sockets it
    /// runs find them.
    fn kick_idle(&self, pieces: u64) {
        let shared = &self.shared;
        let fan = shared.relay.fanout();
        let idle = self.placements.iter().enumerate().filter(|&(k, _)| shared.idle(k));
        let idle = idle.take(pieces.min(usize::MAX as u64) as usize).map(|(k, p)| Idle {
            k,
            helper: p.helper_id(),
            sleeps: fan > 0 && p.sleeps(),
        });
        let (now, owed) = fanout::split(idle, fan);
        if owed != 0 {
            shared.relay.owe(owed);
        }
        for k in fanout::sockets(now) {
            self.placements[k].kick();
        }
    }

    /// Sockets the comm wants for a request of `pieces` pieces: as many as it has pieces, and one
    /// more than it has when older pieces still wait and no open socket is free to take them.
    fn wanted(&self, pieces: u64, alone: bool) -> usize {
        let placed = self.placements.len();
        let queued = !alone && (0..placed).all(|k| !self.shared.idle(k));
        let want = (pieces.min(usize::MAX as u64) as usize).max(if queued { placed + 1 } else { 0 });
        want.min(self.base)
    }

    /// Starts opening sockets until `want` were tried. Their connects finish on their helpers, and
    /// each pulls pieces once the peer acknowledged it; a socket that cannot even start connecting
    /// ends the growth of this comm, which goes on with the sockets it has.
    fn grow_to(&mut self, want: usize, helpers: &Helpers) {
        while self.growing && self.placements.len() < want.min(self.base) {
            let k = self.placements.len();
            trace::event!(SockDial { comm: self.shared.trace, socket: k as u64 });
            if let Err(e) = self.open(k, k as u8, helpers) {
                log::warn!("a send comm goes on with {k} data sockets: adding one failed: {e}");
                self.sockets.gave_up();
                self.growing = false;
            }
        }
        if self.placements.len() == self.base {
            self.growing = false;
        }
        if !self.growing && self.failover.is_none() {
            self.dialer = None;
        }
    }

    /// Starts opening socket `k` (the next slot) over the link of socket `route_of`.
    fn open(&mut self, k: usize, route_of: u8, helpers: &Helpers) -> Result<()> {
        let Some(dialer) = &self.dialer else { return Err(Error::backend("the comm opens no more sockets")) };
        let (stream, joining) = dialer.start_as(k as u8, route_of)?;
        self.shared.place(k, stream);
        let task = SendTask::new(self.shared.clone(), k, Some(joining));
        let mut placed = match helpers.send.attach(vec![task], &self.placements) {
            Ok(placed) => placed,
            Err(e) => {
                // Slot `k` holds a stream no task serves: no socket may take it again.
                self.dialer = None;
                return Err(e);
            }
        };
        let placement = placed.pop().expect("one task, one placement");
        self.shared.relay.place(k, &placement);
        self.placements.push(placement);
        self.sockets.added();
        Ok(())
    }

    /// Acknowledged comms, whenever the comm is posted to or tested without completing: checks
    /// the links now and then, schedules dead sockets' links to be dialed again, and dials those
    /// due from a spare slot.
    fn watch(&mut self, helpers: &Helpers) {
        let Some(f) = &mut self.failover else { return };
        let now = Instant::now();
        if f.check_due(now) {
            let delivered = self.shared.check_links(f.dead_after);
            if f.acks_overdue(self.shared.window.acked_upto(), delivered, now) && self.shared.ask_again() {
                log::debug!("a send comm asks again for an acknowledgement overdue");
            }
            for (k, late) in f.joining(now).collect::<Vec<_>>() {
                if self.shared.is_open(k) {
                    if let Some((link, attempt)) = f.joined(k) {
                        Redialed::Joined.trace(self.shared.trace, k, link, attempt);
                    }
                } else if late {
                    self.shared.abandon(k);
                }
            }
        }
        for k in fanout::sockets(self.shared.take_dead()) {
            if let Some((link, attempt)) = f.dead(k, now) {
                Redialed::Failed.trace(self.shared.trace, k, link, attempt);
            }
        }
        while let Some(redial) = self.failover.as_mut().and_then(|f| f.due(now)) {
            self.redial(redial, now, helpers);
        }
    }

    /// Opens a spare slot over the link of `redial`. With none left, or nothing to dial with (a
    /// helper could not take a socket before), no link is dialed again for the rest of the comm.
    fn redial(&mut self, redial: Redial, now: Instant, helpers: &Helpers) {
        self.grow_to(self.base, helpers);
        let k = self.placements.len();
        if k >= self.shared.streams.len() {
            self.stop_redials("it has no spare socket left");
            return;
        }
        if self.dialer.is_none() {
            self.stop_redials("it opens no more sockets");
            return;
        }
        match self.open(k, redial.route, helpers) {
            Ok(()) => {
                log::info!(
                    "a send comm dials the link of its socket {} again (attempt {})",
                    redial.route,
                    redial.attempt
                );
                if let Some(f) = &mut self.failover {
                    f.started(k, redial, now);
                }
                Redialed::Started.trace(self.shared.trace, k, redial.route, redial.attempt);
            }
            Err(e) if self.dialer.is_none() => {
                log::warn!("a send comm could not dial the link of its socket {} again: {e}", redial.route);
                Redialed::Failed.trace(self.shared.trace, k, redial.route, redial.attempt);
                self.stop_redials("it opens no more sockets");
            }
            Err(e) => {
                log::warn!("a send comm could not dial the link of its socket {} again: {e}", redial.route);
                Redialed::Failed.trace(self.shared.trace, k, redial.route, redial.attempt);
                if let Some(f) = &mut self.failover {
                    // As a slot that failed to join: the next attempt backs off further.
                    f.started(k, redial, now);
                    f.dead(k, now);
                }
            }
        }
    }

    /// No dead link is dialed again (`why`): the re-dial due and those scheduled are dropped,
    /// said once.
    fn stop_redials(&mut self, why: &str) {
        if let Some(pending) = self.failover.as_mut().and_then(Failover::stop_redials) {
            log::warn!(
                "a send comm dials no dead link again ({why}): {} re-dials dropped; its dead links stay unused until the next connection",
                pending + 1
            );
        }
    }
}

/// How far a re-dial got, for the trace.
#[derive(Clone, Copy)]
enum Redialed {
    Started,
    Joined,
    Failed,
}

impl Redialed {
    /// Comm `comm`'s re-dial of `link` (its attempt `attempt`) from slot `k` got this far.
    fn trace(self, comm: u64, k: usize, link: u8, attempt: u32) {
        let (link, attempt, socket) = (u64::from(link), u64::from(attempt), k as u64);
        match self {
            Redialed::Started => trace::event!(SockRedial { comm, link, attempt, socket }),
            Redialed::Joined => trace::event!(SockRejoined { comm, link, attempt, socket }),
            Redialed::Failed => trace::event!(SockRedialFailed { comm, link, attempt, socket }),
        }
    }
}

/// A receive comm's sockets and their placements, which sockets arriving after the comm was handed
/// out join: a listener (or the acceptor holding it since) attaches them here, any time until the
/// comm closes.
pub(super) struct RecvJoin {
    sockets: Arc<RecvSockets>,
    helpers: Arc<Helpers>,
    placements: Vec<OnceLock<Placement<RecvTask>>>,
    /// Set by the comm's drop; attaching checks it under the same lock, so no socket joins a comm
    /// that has begun to close.
    closed: Mutex<bool>,
    counts: Arc<Counts>,
    /// Signaled when the comm closes, so that whoever keeps its listener open for it looks again.
    on_close: Option<Arc<EventFd>>,
}

impl RecvJoin {
    /// Sockets the sender may open.
    pub fn count(&self) -> usize {
        self.sockets.streams.len()
    }

    pub fn has(&self, k: usize) -> bool {
        self.sockets.streams.get(k).is_some_and(|s| s.get().is_some())
    }

    /// Every socket arrived: nothing more can join.
    pub fn full(&self) -> bool {
        (0..self.count()).all(|k| self.has(k))
    }

    pub fn closed(&self) -> bool {
        *self.closed.lock()
    }

    /// Adds socket `k` (non-blocking, tuned) to the comm and acknowledges it to the sender, which
    /// puts pieces on it only then. Refused, with the reason, when the comm is closing, `k` is out
    /// of range or taken; the stream is closed then.
    pub fn attach(&self, k: usize, stream: TcpStream) -> std::result::Result<(), &'static str> {
        let closed = self.closed.lock();
        if *closed {
            return Err("its comm is closed");
        }
        if k >= self.count() {
            return Err("its index is past its comm's sockets");
        }
        if !self.sockets.place(k, stream) {
            return Err("its comm has that socket already");
        }
        let task = RecvTask::new(self.sockets.clone(), k);
        match self.helpers.recv.attach(vec![task], self.placements.iter().filter_map(OnceLock::get)) {
            Ok(mut placed) => {
                let _ = self.placements[k].set(placed.pop().expect("one task, one placement"));
            }
            Err(e) => {
                log::warn!("a receive comm goes without data socket {k}: {e}");
                // Nobody reads it: the sender sees the end of the stream instead of an acknowledgement.
                let _ = self.sockets.stream(k).shutdown(Shutdown::Both);
                return Err("no helper could take it");
            }
        }
        self.counts.opened_receiving(1);
        drop(closed);
        // Before the acknowledgement, which the sender's `sock_opened` follows.
        trace::event!(SockFiled { comm: self.sockets.trace, socket: k as u64, taken: 1 });
        // Eight bytes into a fresh socket's empty buffer; should the kernel take fewer, the sender
        // just never uses the socket (it waits for the whole acknowledgement).
        let ack = attach_ack(k as u8);
        if !matches!(self.sockets.stream(k).write(&ack), Ok(n) if n == ack.len()) {
            log::warn!("could not acknowledge data socket {k} of a receive comm; the sender will not use it");
        }
        Ok(())
    }
}

/// What both comm kinds share: the window, the sockets' placements, and the caller's view of the
/// requests.
struct CommCore {
    window: Arc<Window>,
    side: Side,
    inline_max: usize,
    helpers: Arc<Helpers>,
    /// Sockets the comm may open, which its helpers were started for (`Pool::expect`).
    expected: usize,
    posted: u64,
    /// Requests whose slot was given back (send: tested done; receive: consumed).
    released: u64,
    tested: u64,
    /// Receive: memory whose receives are written back from the CPU's caches as they land
    /// (`RecvComm::write_back_received`), as (start, end).
    write_back: Vec<(usize, usize)>,
}

impl CommCore {
    fn post(&mut self, iov: &[IoSeg]) -> Result<Option<RequestId>> {
        self.window.check()?;
        if iov.is_empty() {
            return Err(Error::invalid("a vectored request needs at least one segment"));
        }
        if self.posted - self.released >= MAX_REQUESTS as u64 {
            return Ok(None);
        }
        let id = self.posted;
        let len = iov.iter().map(|s| s.len).sum::<usize>();
        let inside = |seg: &IoSeg| {
            self.write_back.iter().any(|&(start, end)| start <= seg.addr && seg.addr.saturating_add(seg.len) <= end)
        };
        let write_back = !self.write_back.is_empty() && iov.iter().all(inside);
        let alone = self.window.post(id, iov, write_back);
        match &mut self.side {
            Side::Send(send) => {
                let pieces = self.window.cut.pieces(len as u64);
                let inline = if alone && len <= self.inline_max { send.shared.send_inline() } else { Inline::NoSocket };
                match inline {
                    Inline::Done => {}
                    Inline::HandedOver(k) => send.placements[k].kick(),
                    // As many idle sockets as the request has pieces.
                    Inline::NoSocket => send.kick_idle(pieces),
                }
                let want = send.wanted(pieces, alone);
                if want > send.placements.len() {
                    send.grow_to(want, &self.helpers);
                }
                send.watch(&self.helpers);
            }
            Side::Recv(join) => {
                // Only a socket holding a header for this request waits for the post; the others
                // run when data comes.
                for (k, p) in join.placements.iter().enumerate() {
                    if let Some(p) = p.get()
                        && join.sockets.waits_for_post(k)
                    {
                        p.kick();
                    }
                }
            }
        }
        self.posted += 1;
        Ok(Some(RequestId(id)))
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        if req.0 != self.tested || req.0 >= self.posted {
            return Err(Error::backend(format!(
                "test of request {} out of order: the oldest untested request is {}",
                req.0, self.tested
            )));
        }
        if let Some(size) = self.window.done(req.0) {
            self.tested += 1;
            return Ok(Some(size));
        }
        self.window.check()?;
        Ok(None)
    }
}

impl Drop for CommCore {
    fn drop(&mut self) {
        self.window.close();
        // Shutting the sockets down tells the peer at once; the descriptors close once the helpers
        // let go of them. Waiting for the helpers guarantees none touches caller memory after the
        // drop returns.
        match &self.side {
            Side::Send(send) => {
                shut_down(&send.shared.streams);
                self.helpers.send.detach(&send.placements, self.expected);
                send.sockets.closed_sending(send.shared.open_count() as u64);
                if log::log_enabled!(log::Level::Info) {
                    link_tally::log_closed("send", &send.shared.tally.by_link(placed_links(&send.shared.streams)));
                }
            }
            Side::Recv(join) => {
                // No socket joins from here on; those that did are all placed.
                *join.closed.lock() = true;
                shut_down(&join.sockets.streams);
                self.helpers.recv.detach(join.placements.iter().filter_map(OnceLock::get), self.expected);
                let placed = join.placements.iter().filter(|p| p.get().is_some()).count();
                join.counts.closed_receiving(placed as u64);
                if log::log_enabled!(log::Level::Info) {
                    link_tally::log_closed("receive", &join.sockets.tally.by_link(placed_links(&join.sockets.streams)));
                }
                if let Some(wake) = &join.on_close {
                    wake.signal();
                }
            }
        }
    }
}

fn shut_down(streams: &[OnceLock<TcpStream>]) {
    for s in streams.iter().filter_map(OnceLock::get) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// How a send comm adds sockets after its first.
pub struct Growth {
    pub dialer: Dialer,
    /// Open them as traffic asks (else all of them at once, right after the first).
    pub lazy: bool,
}

pub struct SocketSendComm(CommCore);

impl SocketSendComm {
    /// A comm of `count` sockets whose first, `first`, is connected and introduced; `growth` opens
    /// the others.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        first: TcpStream,
        count: usize,
        growth: Growth,
        wake: Wake,
        how: Threading,
        helpers: Arc<Helpers>,
        sockets: Arc<Counts>,
        trace: u64,
    ) -> Result<SocketSendComm> {
        first.set_nonblocking(true).map_err(|e| Error::io("configure data socket", e))?;
        let hello = growth.dialer.hello;
        let (slots, cut) = (hello.slots(), PieceCut::new(how.subchunk, count));
        let window = Arc::new(if hello.acked { Window::acked(cut, wake, slots) } else { Window::new(cut, wake) });
        let paced = growth.dialer.routes.over_links();
        let shared = Arc::new(SendSockets::new(slots, window.clone(), how.kick_fanout, sockets.clone(), trace, paced));
        shared.place(0, first);
        let placements = helpers.send.attach(vec![SendTask::new(shared.clone(), 0, None)], [])?;
        helpers.send.expect(count);
        shared.relay.place(0, &placements[0]);
        shared.opened(0);
        // A socket whose link acknowledged nothing for a quarter of the stall timeout is dead, so
        // that its pieces go again over the others well before the connection would fail.
        let dead_after = (growth.dialer.io_timeout / 4).max(Duration::from_millis(50));
        let failover = hello.acked.then(|| Failover::new(count, slots, dead_after, Instant::now()));
        let mut send = SendSide {
            shared,
            placements,
            base: count,
            dialer: (slots > 1).then_some(growth.dialer),
            growing: count > 1,
            sockets,
            failover,
        };
        if !growth.lazy {
            send.grow_to(count, &helpers);
        }
        Ok(SocketSendComm(CommCore {
            window,
            side: Side::Send(Box::new(send)),
            inline_max: INLINE_MAX.min(how.subchunk),
            helpers,
            expected: count,
            posted: 0,
            released: 0,
            tested: 0,
            write_back: Vec::new(),
        }))
    }
}

#[cfg(test)]
impl SocketSendComm {
    /// The kicks the comm's posts owe.
    pub fn relay(&self) -> &super::fanout::Relay<SendTask> {
        match &self.0.side {
            Side::Send(send) => &send.shared.relay,
            Side::Recv(_) => unreachable!("a send comm has a sending side"),
        }
    }

    /// Shuts down an open socket over `link` as if it failed; returns its index.
    pub fn kill_socket_on(&self, link: std::net::IpAddr) -> usize {
        let Side::Send(send) = &self.0.side else { unreachable!("a send comm has a sending side") };
        let shared = &send.shared;
        let k = (0..send.placements.len())
            .find(|&k| shared.is_open(k) && shared.stream(k).local_addr().is_ok_and(|a| a.ip() == link))
            .expect("an open socket over the link");
        let _ = shared.stream(k).shutdown(Shutdown::Both);
        k
    }

    /// The comm's id, which its trace events carry.
    pub fn comm_id(&self) -> u64 {
        let Side::Send(send) = &self.0.side else { unreachable!("a send comm has a sending side") };
        send.shared.trace
    }

    /// Takes the comm's dialer away, as when a helper could not take a socket it opened.
    pub fn forget_dialer(&mut self) {
        let Side::Send(send) = &mut self.0.side else { unreachable!("a send comm has a sending side") };
        send.dialer = None;
    }

    /// Re-dials of dead links waiting for their time.
    pub fn redials_pending(&self) -> usize {
        let Side::Send(send) = &self.0.side else { unreachable!("a send comm has a sending side") };
        send.failover.as_ref().map_or(0, |f| f.pending())
    }

    /// Sockets that carry pieces now.
    pub fn open_sockets(&self) -> usize {
        let Side::Send(send) = &self.0.side else { unreachable!("a send comm has a sending side") };
        send.shared.open_count()
    }
}

impl SendComm for SocketSendComm {
    fn reg_mr(&mut self, _addr: usize, _len: usize, kind: MemKind) -> Result<MrHandle> {
        host_only(kind)
    }
    fn dereg_mr(&mut self, _mr: MrHandle) {}

    unsafe fn isend(&mut self, data: *const u8, len: usize, _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(&[IoSeg { addr: data as usize, len }])
    }

    unsafe fn isendv(&mut self, iov: &[IoSeg], _mrs: &[MrRun]) -> Result<Option<RequestId>> {
        self.0.post(iov)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        let done = self.0.test(req)?;
        if done.is_some() {
            self.0.released += 1;
        } else if let Side::Send(send) = &mut self.0.side {
            send.watch(&self.0.helpers);
        }
        Ok(done)
    }

    fn link_stats(&self) -> Vec<LinkStats> {
        match &self.0.side {
            Side::Send(send) => send.shared.tally.by_link(placed_links(&send.shared.streams)),
            Side::Recv(_) => unreachable!("a send comm has a sending side"),
        }
    }
}

pub struct SocketRecvComm(CommCore);

impl SocketRecvComm {
    /// A comm whose sender may open `count` sockets, of which `first` (socket 0, non-blocking and
    /// tuned) arrived; the others join through [`SocketRecvComm::join`]. `on_close` is signaled
    /// when the comm goes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        first: TcpStream,
        shape: CommShape,
        wake: Wake,
        how: Threading,
        helpers: Arc<Helpers>,
        counts: Arc<Counts>,
        on_close: Option<Arc<EventFd>>,
        trace: u64,
    ) -> Result<SocketRecvComm> {
        first.set_nonblocking(true).map_err(|e| Error::io("configure data socket", e))?;
        let (count, cut) = (shape.slots(), PieceCut::new(how.subchunk, shape.count as usize));
        let window = Arc::new(if shape.acked { Window::acked(cut, wake, count) } else { Window::new(cut, wake) });
        let sockets = Arc::new(RecvSockets::new(count, window.clone(), trace));
        sockets.place(0, first);
        let placed = helpers.recv.attach(vec![RecvTask::new(sockets.clone(), 0)], [])?;
        let expected = shape.count as usize;
        helpers.recv.expect(expected);
        let placements: Vec<OnceLock<Placement<RecvTask>>> = (0..count).map(|_| OnceLock::new()).collect();
        let _ = placements[0].set(placed.into_iter().next().expect("one task, one placement"));
        counts.opened_receiving(1);
        let join = Arc::new(RecvJoin {
            sockets,
            helpers: helpers.clone(),
            placements,
            closed: Mutex::new(false),
            counts,
            on_close,
        });
        Ok(SocketRecvComm(CommCore {
            window,
            side: Side::Recv(join),
            inline_max: 0,
            helpers,
            expected,
            posted: 0,
            released: 0,
            tested: 0,
            write_back: Vec::new(),
        }))
    }

    /// Where the comm's later sockets attach.
    pub fn join(&self) -> Arc<RecvJoin> {
        match &self.0.side {
            Side::Recv(join) => join.clone(),
            Side::Send(_) => unreachable!("a receive comm has a receiving side"),
        }
    }
}

impl RecvComm for SocketRecvComm {
    fn reg_mr(&mut self, _addr: usize, _len: usize, kind: MemKind) -> Result<MrHandle> {
        host_only(kind)
    }
    fn dereg_mr(&mut self, _mr: MrHandle) {}

    unsafe fn irecv(&mut self, data: *mut u8, len: usize, _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(&[IoSeg { addr: data as usize, len }])
    }

    unsafe fn irecvv(&mut self, iov: &[IoSeg], _mrs: &[MrRun]) -> Result<Option<RequestId>> {
        self.0.post(iov)
    }

    /// Only where the CPU has an instruction for it (`write_back.rs`).
    fn write_back_received(&mut self, addr: usize, len: usize) -> bool {
        if !super::write_back::supported() {
            return false;
        }
        self.0.write_back.push((addr, addr.saturating_add(len)));
        true
    }

    fn stop_write_back(&mut self, addr: usize, len: usize) {
        let range = (addr, addr.saturating_add(len));
        self.0.write_back.retain(|&r| r != range);
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.0.test(req)
    }

    fn link_stats(&self) -> Vec<LinkStats> {
        match &self.0.side {
            Side::Recv(join) => join.sockets.tally.by_link(placed_links(&join.sockets.streams)),
            Side::Send(_) => unreachable!("a receive comm has a receiving side"),
        }
    }

    fn irecv_consumed(&mut self, req: RequestId) -> Result<()> {
        if req.0 != self.0.released || req.0 >= self.0.tested {
            return Err(Error::backend(format!(
                "irecv_consumed of request {} out of order: next to consume is {}, {} completed",
                req.0, self.0.released, self.0.tested
            )));
        }
        self.0.released += 1;
        Ok(())
    }
}

fn host_only(kind: MemKind) -> Result<MrHandle> {
    match kind {
        MemKind::Host => Ok(MrHandle::NONE),
        MemKind::Cuda { .. } => Err(Error::new(
            crate::error::UcclStatus::ErrNotSupported,
            "the socket transport moves host memory only; GPU buffers need staging",
        )),
    }
}

/// The placed sockets of `streams` with their local addresses (`None` where it cannot be read),
/// for the per-link counts.
fn placed_links(streams: &[OnceLock<TcpStream>]) -> impl Iterator<Item = (usize, Option<std::net::IpAddr>)> + '_ {
    streams.iter().enumerate().filter_map(|(k, s)| s.get().map(|s| (k, s.local_addr().map(|a| a.ip()).ok())))
}
