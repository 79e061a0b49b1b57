//! Sending sockets: each socket that has nothing in flight cuts the next piece from the comm's
//! window, so whichever socket drains first takes more (a slow flow never gates a request). Header
//! and payload leave in one `sendmsg` straight from the caller's buffer (runs of small segments
//! gathered first into the thread's bounce buffer, `iov`). A socket's work runs on the shared
//! helper that owns it (`reactor`), or on the posting thread for a small request. A socket the comm
//! added after connect pulls nothing until it joined (`grow`). On an acknowledged comm every socket
//! keeps the pieces it carried until the receiver acknowledged their requests; a socket that fails,
//! or whose link stops answering ([`SendSockets::check_links`]), is declared dead and its pieces
//! are cut again for the others.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::fanout::Relay;
use super::grow::Joining;
use super::iov::{self, MAX_IOV};
use super::pace::Pace;
use super::pure::counts::Counts;
use super::pure::link_tally::Tallies;
use super::pure::window::{Piece, PieceMem, Window};
use super::pure::wire::{DONE_LEN, PIECE_HEADER_LEN, PieceHeader};
use super::reactor::{Next, Task};
use crate::error::{Error, UcclStatus};
use crate::threads::{self, ThreadKind};
use crate::trace;

mod kept;
#[cfg(test)]
mod kept_tests;

/// Requests at most this large (and a single piece) are written by the posting thread itself when
/// nothing older is waiting, saving the wake-up of a helper thread on the latency path.
pub(super) const INLINE_MAX: usize = 16 << 10;
struct Outgoing {
    piece: Piece,
    mem: PieceMem,
    header: [u8; PIECE_HEADER_LEN],
    /// Header and payload bytes already accepted by the kernel.
    written: usize,
}

impl Outgoing {
    fn new((piece, mem): (Piece, PieceMem)) -> Outgoing {
        let header =
            PieceHeader { seq: piece.seq, total: piece.total, offset: piece.offset, len: piece.len as u32 }.encode();
        Outgoing { piece, mem, header, written: 0 }
    }

    /// Payload bytes the kernel has not accepted yet.
    fn payload_left(&self) -> usize {
        (PIECE_HEADER_LEN + self.piece.len - self.written).min(self.piece.len)
    }
}

/// A send comm's sockets and who is writing on each: a piece is written by whoever claimed the
/// socket (its helper, or the posting thread for an inline send), so bytes never interleave.
pub(super) struct SendSockets {
    /// One slot per socket the comm may open, filled as it opens them.
    pub streams: Vec<OnceLock<TcpStream>>,
    /// Per socket: it may carry pieces (connected, and acknowledged if added after connect).
    open: Vec<AtomicBool>,
    pub window: Arc<Window>,
    claimed: Vec<AtomicBool>,
    /// A partly written inline piece left for the socket's helper to finish (the claim moves with it).
    handoff: Vec<Mutex<Option<Outgoing>>>,
    handed: Vec<AtomicBool>,
    sockets: Arc<Counts>,
    /// An added socket was given up already: later ones are logged quietly.
    gave_up: AtomicBool,
    /// Kicks a post left for the comm's running sockets to pass on.
    pub relay: Relay<SendTask>,
    /// The comm's id, which both ends' hellos carry, in its trace events.
    pub trace: u64,
    /// What each socket carried, for the per-link counters.
    pub tally: Tallies,
    /// Sockets over data links: their rates, so that a slow one leaves the last pieces to faster ones.
    pace: Option<Pace>,
    /// Acknowledged comms, per socket: pieces out and not acknowledged, and whether it died.
    inflight: Vec<Mutex<Inflight>>,
    /// Acknowledged comms: sockets declared dead, one bit each; those the comm has not replaced
    /// yet in `to_replace`.
    dead: AtomicU64,
    to_replace: AtomicU64,
}

/// A socket's pieces not acknowledged yet, and whether it died.
#[derive(Default)]
struct Inflight {
    pieces: Vec<Piece>,
    dead: bool,
}

/// What an inline send did.
pub(super) enum Inline {
    /// Every socket was busy: their helpers cut the request next (kick the idle ones).
    NoSocket,
    /// Written, or taken meanwhile by a helper that was running anyway.
    Done,
    /// Partly written on this socket: kick its helper to finish it.
    HandedOver(usize),
}

impl SendSockets {
    /// Room for `n` sockets, none placed yet; each running socket passes up to `kick_fanout` owed
    /// kicks on. `paced`: the sockets run over data links, their unsent bytes bounded.
    pub fn new(
        n: usize,
        window: Arc<Window>,
        kick_fanout: usize,
        sockets: Arc<Counts>,
        trace: u64,
        paced: bool,
    ) -> SendSockets {
        SendSockets {
            streams: (0..n).map(|_| OnceLock::new()).collect(),
            open: (0..n).map(|_| AtomicBool::new(false)).collect(),
            window,
            claimed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            handoff: (0..n).map(|_| Mutex::new(None)).collect(),
            handed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            sockets,
            gave_up: AtomicBool::new(false),
            relay: Relay::new(n, kick_fanout),
            trace,
            tally: Tallies::new(n),
            pace: paced.then(|| Pace::new(n)),
            inflight: (0..n).map(|_| Mutex::default()).collect(),
            dead: AtomicU64::new(0),
            to_replace: AtomicU64::new(0),
        }
    }

    /// Puts socket `k`'s stream in its slot, before any task for it exists.
    pub fn place(&self, k: usize, stream: TcpStream) {
        if self.streams[k].set(stream).is_err() {
            unreachable!("socket {k} placed twice");
        }
    }

    pub fn stream(&self, k: usize) -> &TcpStream {
        self.streams[k].get().expect("a task exists only for a placed socket")
    }

    /// Socket `k` may carry pieces from now on. SeqCst: a poster that published a request after
    /// this sees the socket open (and kicks it), or the socket sees the request when it looks.
    pub fn opened(&self, k: usize) {
        self.open[k].store(true, Ordering::SeqCst);
        self.sockets.opened_sending(1);
    }

    /// Sockets that carry pieces now.
    pub fn open_count(&self) -> usize {
        self.open.iter().filter(|o| o.load(Ordering::Relaxed)).count()
    }

    /// An added socket that will never carry a piece: the comm goes on with the others.
    fn give_up(&self, k: usize, e: &std::io::Error) {
        if self.window.is_acked() && std::mem::replace(&mut self.inflight[k].lock().dead, true) {
            return;
        }
        self.sockets.gave_up();
        self.tally.error(k);
        let _ = self.stream(k).shutdown(std::net::Shutdown::Both);
        if self.window.is_acked() {
            trace::event!(SockDead { comm: self.trace, socket: k as u64, why: trace::DeadWhy::NotJoined as u64 });
            // Its link may come back: the comm tries it again later.
            self.dead.fetch_or(1 << k, Ordering::AcqRel);
            self.to_replace.fetch_or(1 << k, Ordering::AcqRel);
            self.window.wake();
        }
        if self.gave_up.swap(true, Ordering::Relaxed) {
            log::debug!("data socket {k} of a send comm was not added: {e}");
        } else {
            log::warn!("a send comm goes on with fewer data sockets: socket {k} was not added: {e}");
        }
    }

    /// SeqCst: pairs with the poster's look at `idle` after publishing a request.
    fn claim(&self, k: usize) -> bool {
        !self.claimed[k].load(Ordering::Relaxed)
            && self.claimed[k].compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed).is_ok()
    }

    /// Socket `k` took a piece of request `seq`.
    fn traced_cut(&self, k: usize, seq: u64) {
        trace::event!(SockTake { comm: self.trace, seq, socket: k as u64 });
    }

    /// Socket `k` wrote all of `piece`.
    fn traced_sent(&self, k: usize, piece: &Piece) {
        self.tally.piece(k, piece.len);
        trace::event!(SockSent { comm: self.trace, seq: piece.seq, socket: k as u64, bytes: piece.len as u64 });
    }

    fn release(&self, k: usize) {
        self.claimed[k].store(false, Ordering::SeqCst);
    }

    /// Whether socket `k` waits for work (open, and nobody writes on it): a post must kick its
    /// helper.
    pub fn idle(&self, k: usize) -> bool {
        self.open[k].load(Ordering::SeqCst) && !self.claimed[k].load(Ordering::SeqCst)
    }

    fn take_handoff(&self, k: usize) -> Option<Outgoing> {
        if !self.handed[k].load(Ordering::Acquire) {
            return None;
        }
        self.handed[k].store(false, Ordering::Relaxed);
        self.handoff[k].lock().take()
    }

    /// The posting thread writes the next piece on a free socket.
    pub fn send_inline(&self) -> Inline {
        for k in 0..self.streams.len() {
            if !self.open[k].load(Ordering::Acquire) || !self.claim(k) {
                continue;
            }
            let Some(cut) = self.window.cut() else {
                // A running helper took it already.
                self.release(k);
                return Inline::Done;
            };
            if !self.took(k, &cut.0) {
                self.release(k);
                return Inline::Done;
            }
            self.traced_cut(k, cut.0.seq);
            let mut o = Outgoing::new(cut);
            match self.write(k, &mut o) {
                Ok(Step::Finished) => {
                    self.traced_sent(k, &o.piece);
                    self.release(k);
                    self.window.finish(&o.piece);
                }
                Ok(Step::Partial | Step::Blocked) => {
                    *self.handoff[k].lock() = Some(o);
                    self.handed[k].store(true, Ordering::Release);
                    return Inline::HandedOver(k);
                }
                Err(e) => {
                    self.release(k);
                    let e = Error::io("channel send", e);
                    if self.window.is_acked() {
                        let why = dead_why(&e);
                        self.socket_failed(k, e, why);
                    } else {
                        self.tally.error(k);
                        self.window.fail(e);
                    }
                }
            }
            return Inline::Done;
        }
        Inline::NoSocket
    }
}

/// One sending socket, run by its helper.
pub(super) struct SendTask {
    pub shared: Arc<SendSockets>,
    pub k: usize,
    out: Option<Outgoing>,
    /// An added socket on its way in; `None` once it may carry pieces.
    joining: Option<Box<Joining>>,
    /// Length of the request of the piece this socket finished in its last run.
    finished_request_len: Option<u64>,
    /// Acknowledged comms: an acknowledgement partly read.
    ack: [u8; DONE_LEN],
    ack_got: usize,
}

impl SendTask {
    /// The task of placed socket `k`: open already, or `joining`.
    pub fn new(shared: Arc<SendSockets>, k: usize, joining: Option<Joining>) -> SendTask {
        SendTask {
            shared,
            k,
            out: None,
            joining: joining.map(Box::new),
            finished_request_len: None,
            ack: [0; DONE_LEN],
            ack_got: 0,
        }
    }

    /// Moves an added socket on until it joined: `Some(next)` while it may not pull pieces yet.
    fn join(&mut self) -> Option<Next> {
        let joining = self.joining.as_mut()?;
        let step = joining.advance(self.shared.stream(self.k));
        if self.shared.window.is_acked() && self.shared.inflight[self.k].lock().dead {
            // Abandoned (`SendSockets::abandon`): it never carries a piece.
            return Some(Next::Stop);
        }
        match step {
            Ok(false) => Some(Next::Idle),
            Ok(true) => {
                if !self.shared.open_if_alive(self.k) {
                    return Some(Next::Stop);
                }
                trace::event!(SockOpened { comm: self.shared.trace, socket: self.k as u64 });
                self.joining = None;
                None
            }
            Err(e) => {
                self.shared.give_up(self.k, &e);
                Some(Next::Stop)
            }
        }
    }

    /// The next piece for this socket: one handed over by the posting thread, else a fresh cut if
    /// nobody else writes on it.
    fn next_piece(&mut self) -> Option<Outgoing> {
        let s = &*self.shared;
        if let Some(o) = s.take_handoff(self.k) {
            return Some(o);
        }
        loop {
            let seen = s.window.send_work();
            if !s.claim(self.k) {
                return None;
            }
            if let Some(cut) = self.cut() {
                if !s.took(self.k, &cut.0) {
                    s.release(self.k);
                    return None;
                }
                threads::point(ThreadKind::SocketSender);
                s.traced_cut(self.k, cut.0.seq);
                return Some(Outgoing::new(cut));
            }
            s.release(self.k);
            // A request posted (or pieces requeued) after the cut looked, whose poster saw this
            // socket claimed and so kicked nobody: look once more.
            if s.window.send_work() == seen {
                return None;
            }
        }
    }

    /// A fresh piece for this socket, unless it leaves it to a faster one (`pace`). Then it also
    /// wakes the fastest idle one, which a post may not have kicked (it kicks as many idle sockets
    /// as the request has pieces, slow ones among them).
    fn cut(&self) -> Option<(Piece, PieceMem)> {
        let s = &*self.shared;
        let Some(pace) = &s.pace else { return s.window.cut() };
        // Outside the window's lock: weighing may ask the kernel for the socket's backlog.
        let weighed = pace.weigh(self.k, s.stream(self.k).as_raw_fd(), |j| s.open[j].load(Ordering::Relaxed));
        let mut declined = None;
        let cut = match &weighed {
            None => s.window.cut(),
            Some(w) => s.window.cut_unless(|len, uncut| {
                let no = w.declines(len, uncut());
                declined = no.then_some(len);
                no
            }),
        };
        match cut {
            Some(cut) => {
                pace.left(self.k, cut.0.len);
                Some(cut)
            }
            None => {
                if let Some(bytes) = declined {
                    trace::event!(SockDeclined { comm: s.trace, socket: self.k as u64, bytes });
                    if let Some(j) = pace.faster_idle(self.k, |j| s.idle(j)) {
                        s.relay.kick(j);
                    }
                }
                None
            }
        }
    }

    fn step(&mut self) -> Result<Next, Error> {
        if self.out.is_none() {
            self.out = self.next_piece();
        }
        let Some(o) = self.out.as_mut() else { return Ok(Next::Idle) };
        let s = &*self.shared;
        match s.write(self.k, o).map_err(|e| Error::io("channel send", e))? {
            Step::Finished => {
                let o = self.out.take().expect("a piece in flight");
                if let Some(pace) = &s.pace {
                    pace.wrote(self.k, s.stream(self.k).as_raw_fd());
                }
                s.traced_sent(self.k, &o.piece);
                self.finished_request_len = Some(o.piece.total);
                s.window.finish(&o.piece);
                s.release(self.k);
                // Let the helper's other sockets run before this one takes another piece.
                Ok(Next::Again)
            }
            // The socket is full: EPOLLOUT comes when it drains.
            Step::Partial | Step::Blocked => {
                if let Some(pace) = &s.pace {
                    pace.left(self.k, o.payload_left());
                }
                Ok(Next::Idle)
            }
        }
    }
}

impl Task for SendTask {
    fn fd(&self) -> RawFd {
        self.shared.stream(self.k).as_raw_fd()
    }

    /// A joining socket also waits for the peer's acknowledgement, and every socket of an
    /// acknowledged comm for the receiver's.
    fn interest(&self) -> u32 {
        if self.joining.is_some() || self.shared.window.is_acked() {
            (libc::EPOLLOUT | libc::EPOLLIN | libc::EPOLLRDHUP) as u32
        } else {
            libc::EPOLLOUT as u32
        }
    }

    fn window(&self) -> &Arc<Window> {
        &self.shared.window
    }

    fn finished_request_len(&self) -> Option<u64> {
        self.finished_request_len
    }

    fn run(&mut self) -> Next {
        self.finished_request_len = None;
        if self.shared.window.closing() {
            self.shared.relay.forgive();
            return Next::Stop;
        }
        // Before its own piece: the sockets it wakes start while it sends. Also when it finds no
        // piece, so that no owed kick waits for a socket that has one.
        self.shared.relay.pass_on(self.k);
        if let Some(next) = self.join() {
            return next;
        }
        let acked = self.shared.window.is_acked();
        let mut acks_left = false;
        if acked {
            if self.shared.inflight[self.k].lock().dead {
                return Next::Stop;
            }
            match self.read_acks() {
                Ok(left) => acks_left = left,
                Err((true, e)) => {
                    self.shared.window.fail(e);
                    self.shared.relay.forgive();
                    return Next::Stop;
                }
                Err((false, e)) => {
                    let why = dead_why(&e);
                    self.shared.socket_failed(self.k, e, why);
                    return Next::Stop;
                }
            }
        }
        match self.step() {
            // Acknowledgements left unread raise no new edge: the helper runs the socket again
            // after its other sockets.
            Ok(Next::Idle) if acks_left => Next::Again,
            Ok(next) => next,
            Err(e) if acked => {
                let why = dead_why(&e);
                self.shared.socket_failed(self.k, e, why);
                Next::Stop
            }
            Err(e) => {
                self.shared.tally.error(self.k);
                self.shared.window.fail(e);
                self.shared.relay.forgive();
                Next::Stop
            }
        }
    }
}

/// Why a socket whose send or read failed with `e` is dead: its connection ended (the end of its
/// stream, a reset), or another error.
fn dead_why(e: &Error) -> trace::DeadWhy {
    if e.status() == UcclStatus::ErrRemoteDisconnect { trace::DeadWhy::Closed } else { trace::DeadWhy::Failed }
}

enum Step {
    Finished,
    Partial,
    Blocked,
}

/// Writes what the socket takes of `o`: header and payload in one `sendmsg` while both remain. The
/// socket is non-blocking; every call also says so. A payload with small segments goes through
/// this thread's bounce buffer (`iov`); what the socket did not take of it is gathered again on
/// the next call, so nothing of the piece stays in the buffer between calls.
fn write(stream: &TcpStream, o: &mut Outgoing) -> std::io::Result<Step> {
    if iov::has_small(o.mem.segs()) {
        return iov::with_bounce(o.payload_left(), |bounce| write_from(stream, o, bounce));
    }
    write_from(stream, o, &mut [])
}

/// [`write`], with `bounce` for the small segments.
fn write_from(stream: &TcpStream, o: &mut Outgoing, bounce: &mut [u8]) -> std::io::Result<Step> {
    let fd = stream.as_raw_fd();
    let total = PIECE_HEADER_LEN + o.piece.len;
    let start = o.written;
    while o.written < total {
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
        let mut n_iov = 0;
        if o.written < PIECE_HEADER_LEN {
            iov[0] = libc::iovec {
                iov_base: o.header[o.written..].as_ptr() as *mut libc::c_void,
                iov_len: PIECE_HEADER_LEN - o.written,
            };
            n_iov = 1;
        }
        let payload_done = o.written.saturating_sub(PIECE_HEADER_LEN);
        if payload_done < o.piece.len {
            // SAFETY: the request's contract keeps its segments valid and unmodified until it
            // completes (or the comm's drop, which joins this thread).
            n_iov += unsafe { iov::gather(o.mem.segs(), payload_done, &mut iov[n_iov..], bounce) };
        }
        // SAFETY: an all-zero msghdr is valid; we point it at our iovecs only.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n_iov;
        // SAFETY: the iovecs cover our header array, the bounce buffer and the caller's payload
        // segments, which the request's contract keeps valid (see above). MSG_NOSIGNAL: a closed
        // peer must be an error, not SIGPIPE in the host process.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    return Ok(if o.written == start { Step::Blocked } else { Step::Partial });
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        o.written += n as usize;
    }
    Ok(Step::Finished)
}
