//! Receiving sockets: each reads piece headers, has the window admit them, and reads payloads
//! straight into the posted buffer (runs of small segments through the thread's bounce buffer,
//! `iov`). A header small enough arrives with its payload in one `recv` into a 4 KiB staging area,
//! so a small message costs one syscall; large payloads are read in place and only their first few
//! KiB pass through staging. A socket's work runs on the shared helper that owns it (`reactor`),
//! whenever the kernel reports data or a post kicks it. Pieces of any request may come on any
//! socket of the comm, including sockets added after it was handed out. On an acknowledged comm a
//! socket whose landing completed requests writes the count back ([`Ack`]), a piece that comes
//! twice is read past or taken over (`acked`), and a socket that fails only takes itself out while
//! others live.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use super::iov::{self, MAX_IOV};
use super::pure::link_tally::Tallies;
use super::pure::window::{Admission, Piece, PieceMem, Window};
use super::pure::wire::{Ack, DONE_LEN, PIECE_HEADER_LEN, PieceHeader};
use super::reactor::{Next, Task};
use super::write_back;
use crate::error::{Error, Result};
use crate::threads::{self, ThreadKind};
use crate::trace;
use crate::transport::IoSeg;

const STAGE_LEN: usize = 4096;
/// How long a socket taking over a piece waits for the socket that had it to stop running: that
/// one runs without blocking, so only a helper that hangs makes this fail the comm.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

enum Phase {
    Header,
    /// A header for a request not posted yet; the socket is not read until it is.
    Held(PieceHeader),
    Payload {
        piece: Piece,
        mem: PieceMem,
        landed: usize,
        write_back: bool,
    },
    /// Acknowledged comms: the rest of a piece that landed already (or was taken over) is read
    /// past; then `ack` is written back, if any.
    Discard {
        left: u64,
        ack: Option<u64>,
    },
}

struct Incoming {
    stage: Box<[u8; STAGE_LEN]>,
    start: usize,
    end: usize,
    phase: Phase,
    /// Length of the request of the piece that landed in the socket's last run.
    finished_request_len: Option<u64>,
    /// Acknowledged comms: the completed count to write back on this socket.
    ack_due: Option<u64>,
}

/// An acknowledgement on its way out of one socket (only its own task writes there).
struct AckOut {
    buf: [u8; DONE_LEN],
    /// Bytes of `buf` written; `DONE_LEN` when none waits.
    written: usize,
    sent: u64,
}

impl AckOut {
    /// Writes what waits, then `due` if it says more than what went; a full socket keeps the rest
    /// for the next run (the sender asks again on another socket if it never comes).
    fn flush(&mut self, fd: RawFd, due: &mut Option<u64>) -> Result<()> {
        loop {
            if self.written < DONE_LEN {
                let rest = &self.buf[self.written..];
                // SAFETY: `rest` is readable for its length. MSG_NOSIGNAL: a reset is an error.
                let n = unsafe {
                    libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.kind() {
                        std::io::ErrorKind::Interrupted => continue,
                        std::io::ErrorKind::WouldBlock => return Ok(()),
                        _ => return Err(Error::io("acknowledge on a data socket", e)),
                    }
                }
                self.written += n as usize;
                continue;
            }
            match due.take() {
                Some(n) if n > self.sent => {
                    self.buf = Ack { completed: n }.encode();
                    self.written = 0;
                    self.sent = n;
                }
                _ => return Ok(()),
            }
        }
    }
}

enum Step {
    /// A piece landed; the socket may hold more.
    Finished,
    /// The socket has nothing more for now (`EAGAIN`).
    Blocked,
    /// A header for request `seq`, not posted yet, waits.
    Held(u64),
}

/// A receive comm's sockets, shared by their tasks and the posting thread.
pub(super) struct RecvSockets {
    /// One slot per socket the sender may open, filled as they arrive.
    pub streams: Vec<OnceLock<TcpStream>>,
    pub window: Arc<Window>,
    /// Per socket: it holds a header for a request not posted yet, so a post must kick it.
    held: Vec<AtomicBool>,
    /// The comm's id, which both ends' hellos carry, in its trace events.
    pub trace: u64,
    /// What each socket carried, for the per-link counters.
    pub tally: Tallies,
    /// Acknowledged comms, per socket: held while its task runs, so that a socket taking its piece
    /// over knows when it can no longer be writing it.
    running: Vec<Mutex<()>>,
    /// Acknowledged comms: sockets that failed, one bit each.
    dead: AtomicU64,
}

impl RecvSockets {
    /// Room for `n` sockets, none placed yet.
    pub fn new(n: usize, window: Arc<Window>, trace: u64) -> RecvSockets {
        RecvSockets {
            streams: (0..n).map(|_| OnceLock::new()).collect(),
            window,
            held: (0..n).map(|_| AtomicBool::new(false)).collect(),
            trace,
            tally: Tallies::new(n),
            running: (0..n).map(|_| Mutex::new(())).collect(),
            dead: AtomicU64::new(0),
        }
    }

    /// Acknowledged comms: socket `k` failed with `e`. The comm goes on while another placed
    /// socket lives (the sender sends the pieces again there), and fails with `e` otherwise.
    fn socket_failed(&self, k: usize, e: Error) {
        self.window.drop_socket(k);
        let dead = self.dead.fetch_or(1 << k, Ordering::AcqRel) | (1 << k);
        let _ = self.stream(k).shutdown(std::net::Shutdown::Both);
        let placed = self.streams.iter().enumerate().filter(|(_, s)| s.get().is_some());
        let alive = placed.filter(|&(i, _)| dead & (1 << i) == 0).count();
        if alive == 0 {
            self.window.fail(e);
        } else if !self.window.closing() {
            log::warn!("data socket {k} of a receive comm failed ({e}); {alive} others go on");
        }
    }

    /// Puts socket `k` in its slot; false if it is taken.
    pub fn place(&self, k: usize, stream: TcpStream) -> bool {
        self.streams[k].set(stream).is_ok()
    }

    pub fn stream(&self, k: usize) -> &TcpStream {
        self.streams[k].get().expect("a task exists only for a placed socket")
    }

    /// SeqCst: pairs with the task's look at `posted` after it said it waits.
    pub fn waits_for_post(&self, k: usize) -> bool {
        self.held[k].load(Ordering::SeqCst)
    }
}

/// One receiving socket, run by its helper.
pub(super) struct RecvTask {
    pub shared: Arc<RecvSockets>,
    pub k: usize,
    inc: Incoming,
    ack: AckOut,
}

impl RecvTask {
    pub fn new(shared: Arc<RecvSockets>, k: usize) -> RecvTask {
        let inc = Incoming {
            stage: Box::new([0; STAGE_LEN]),
            start: 0,
            end: 0,
            phase: Phase::Header,
            finished_request_len: None,
            ack_due: None,
        };
        RecvTask { shared, k, inc, ack: AckOut { buf: [0; DONE_LEN], written: DONE_LEN, sent: 0 } }
    }
}

impl Task for RecvTask {
    fn fd(&self) -> RawFd {
        self.shared.stream(self.k).as_raw_fd()
    }

    fn interest(&self) -> u32 {
        (libc::EPOLLIN | libc::EPOLLRDHUP) as u32
    }

    fn window(&self) -> &Arc<Window> {
        &self.shared.window
    }

    fn holds_unposted(&self) -> bool {
        self.shared.held[self.k].load(Ordering::Relaxed)
    }

    fn finished_request_len(&self) -> Option<u64> {
        self.inc.finished_request_len
    }

    fn run(&mut self) -> Next {
        let s = &*self.shared;
        self.inc.finished_request_len = None;
        if s.window.closing() {
            return Next::Stop;
        }
        s.held[self.k].store(false, Ordering::Relaxed);
        let acked = s.window.is_acked();
        let _running = acked.then(|| s.running[self.k].lock());
        let mut step = drive(s, self.k, &mut self.inc);
        if acked && (self.inc.ack_due.is_some() || self.ack.written < DONE_LEN) {
            let fd = s.stream(self.k).as_raw_fd();
            if let Err(e) = self.ack.flush(fd, &mut self.inc.ack_due) {
                step = step.and(Err(e));
            }
        }
        match step {
            Ok(Step::Finished) => Next::Again,
            Ok(Step::Blocked) => Next::Idle,
            Ok(Step::Held(seq)) => {
                s.held[self.k].store(true, Ordering::SeqCst);
                // Posted meanwhile by a poster that saw no flag yet: go on at once.
                if s.window.posted() > seq { Next::Again } else { Next::Idle }
            }
            Err(e) => {
                // The end of the stream between two pieces is how a send comm closes, not a failure
                // of its link: the comm still fails, but the link counts no error for it.
                let between_pieces = matches!(self.inc.phase, Phase::Header) && self.inc.start == self.inc.end;
                if !(between_pieces && e.status() == crate::error::UcclStatus::ErrRemoteDisconnect) {
                    s.tally.error(self.k);
                }
                if acked {
                    s.socket_failed(self.k, e);
                } else {
                    s.window.fail(e);
                }
                Next::Stop
            }
        }
    }
}

/// Moves one socket forward until it would block, waits for a post, or finished a piece (so one busy
/// socket does not starve the helper's others).
fn drive(s: &RecvSockets, socket: usize, inc: &mut Incoming) -> Result<Step> {
    let flags = libc::MSG_DONTWAIT;
    let fd = s.stream(socket).as_raw_fd();
    loop {
        match &mut inc.phase {
            Phase::Held(h) => {
                let h = *h;
                if h.seq >= s.window.posted() {
                    return Ok(Step::Held(h.seq));
                }
                admit(s, socket, inc, h)?;
            }
            Phase::Header => {
                if inc.end - inc.start >= PIECE_HEADER_LEN {
                    let h = PieceHeader::decode(&inc.stage[inc.start..inc.end], s.window.cut)?;
                    inc.start += PIECE_HEADER_LEN;
                    trace::event!(SockHeader { comm: s.trace, seq: h.seq, socket: socket as u64 });
                    admit(s, socket, inc, h)?;
                    continue;
                }
                if inc.start > 0 {
                    inc.stage.copy_within(inc.start..inc.end, 0);
                    inc.end -= inc.start;
                    inc.start = 0;
                }
                let end = inc.end;
                match recv(fd, &mut inc.stage[end..], flags)? {
                    Some(n) => inc.end += n,
                    None => return Ok(Step::Blocked),
                }
            }
            Phase::Payload { piece, mem, landed, write_back } => {
                if s.window.is_acked() && s.window.revoked(socket) {
                    // Another socket lands this piece now: the rest of this copy is read past.
                    inc.phase = Phase::Discard { left: (piece.len - *landed) as u64, ack: None };
                    continue;
                }
                let staged = inc.end - inc.start;
                if staged > 0 {
                    let n = staged.min(piece.len - *landed);
                    // SAFETY: the window admitted this piece's memory inside a posted receive that
                    // only this piece writes; `landed + n <= len`.
                    unsafe { iov::scatter(&inc.stage[inc.start..inc.start + n], mem.segs(), *landed) };
                    inc.start += n;
                    *landed += n;
                }
                while *landed < piece.len {
                    if s.window.is_acked() && s.window.revoked(socket) {
                        break;
                    }
                    // SAFETY: as above, the rest of the admitted memory.
                    match unsafe { recv_into(fd, mem, *landed, flags)? } {
                        Some(n) => *landed += n,
                        None => return Ok(Step::Blocked),
                    }
                }
                if *write_back && write_back::wanted(piece.seq, s.window.posted()) {
                    // Here, while the lines are still in this core's cache, and before the piece
                    // counts as landed: its request's copy up may be issued right after.
                    // SAFETY: the admitted memory of a posted receive, which stays mapped and ours
                    // until the request completes, which it cannot before this piece counts.
                    unsafe { write_back::write_back_landed(mem.segs()) };
                }
                if *landed < piece.len {
                    // Taken over meanwhile: the check at the top reads the rest past.
                    continue;
                }
                let piece = *piece;
                inc.phase = Phase::Header;
                inc.finished_request_len = Some(piece.total);
                s.tally.piece(socket, piece.len);
                trace::event!(SockLanded {
                    comm: s.trace,
                    seq: piece.seq,
                    socket: socket as u64,
                    bytes: piece.len as u64
                });
                if s.window.is_acked() {
                    if let Some(n) = s.window.landed_acked(socket, &piece) {
                        inc.ack_due = inc.ack_due.max(Some(n));
                    }
                } else {
                    s.window.finish(&piece);
                }
                return Ok(Step::Finished);
            }
            Phase::Discard { left, ack } => {
                let staged = ((inc.end - inc.start) as u64).min(*left);
                inc.start += staged as usize;
                *left -= staged;
                while *left > 0 {
                    inc.start = 0;
                    inc.end = 0;
                    let n = (*left).min(STAGE_LEN as u64) as usize;
                    match recv(fd, &mut inc.stage[..n], flags)? {
                        Some(got) => *left -= got as u64,
                        None => return Ok(Step::Blocked),
                    }
                }
                inc.ack_due = inc.ack_due.max(*ack);
                inc.phase = Phase::Header;
                return Ok(Step::Finished);
            }
        }
    }
}

fn admit(s: &RecvSockets, socket: usize, inc: &mut Incoming, h: PieceHeader) -> Result<()> {
    let admission = if s.window.is_acked() {
        s.window.admit_acked(socket, h.seq, h.total, h.offset, h.len as u64)?
    } else {
        s.window.admit(h.seq, h.total, h.offset, h.len as u64)?
    };
    inc.phase = match admission {
        Admission::Land(piece, mem, write_back) => Phase::Payload { piece, mem, landed: 0, write_back },
        Admission::NotPosted => Phase::Held(h),
        Admission::TakeOver(piece, mem, write_back, from) => {
            // Once `from` no longer runs, it saw the takeover before writing again.
            if s.running[from].try_lock_for(TAKEOVER_WAIT).is_none() {
                return Err(Error::internal(format!(
                    "data socket {from} kept running {TAKEOVER_WAIT:?} while its piece was taken over"
                )));
            }
            Phase::Payload { piece, mem, landed: 0, write_back }
        }
        Admission::Discard(left, ack) => Phase::Discard { left, ack },
    };
    if matches!(inc.phase, Phase::Payload { .. }) {
        trace::event!(SockAdmit { comm: s.trace, seq: h.seq, socket: socket as u64 });
        threads::point(ThreadKind::SocketReceiver);
    }
    Ok(())
}

/// Reads into `mem` from byte `landed` of it on: one `recv` into a single range, one `recvmsg`
/// over the segments of a piece that spans several, its small ones through this thread's bounce
/// buffer (`iov`), copied to their place before this returns.
///
/// # Safety
/// `mem` is writable memory nobody else accesses meanwhile.
unsafe fn recv_into(fd: i32, mem: &PieceMem, landed: usize, flags: i32) -> Result<Option<usize>> {
    let segs = match mem {
        PieceMem::One(seg) => {
            // SAFETY: per the contract.
            let dst = unsafe { std::slice::from_raw_parts_mut((seg.addr + landed) as *mut u8, seg.len - landed) };
            return recv(fd, dst, flags);
        }
        PieceMem::Many(segs) => segs,
    };
    if !iov::has_small(segs) {
        // SAFETY: per the contract.
        return unsafe { recv_segs(fd, segs, landed, flags, &mut []) };
    }
    let left = segs.iter().map(|s| s.len).sum::<usize>().saturating_sub(landed);
    // SAFETY: per the contract.
    iov::with_bounce(left, |bounce| unsafe { recv_segs(fd, segs, landed, flags, bounce) })
}

/// One `recvmsg` into `segs` from byte `landed` of them on, with `bounce` for the small ones.
///
/// # Safety
/// As [`recv_into`].
unsafe fn recv_segs(fd: i32, segs: &[IoSeg], landed: usize, flags: i32, bounce: &mut [u8]) -> Result<Option<usize>> {
    let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
    let n_iov = iov::walk(segs, landed, usize::MAX, &mut iovs, bounce, |_, _, _| {});
    loop {
        // SAFETY: an all-zero msghdr is valid; we point it at our iovecs only.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = n_iov;
        // SAFETY: the iovecs cover writable memory per the contract, and the bounce buffer.
        let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
        if let Some(done) = received(n)? {
            if let Some(got) = done {
                // SAFETY: per the contract; `got` bytes of the walk above arrived.
                unsafe { iov::unbounce(segs, landed, got, &mut iovs, bounce) };
            }
            return Ok(done);
        }
    }
}

/// What a `recv`-like call's result means: `Some(answer)`, or `None` to retry (interrupted).
fn received(n: isize) -> Result<Option<Option<usize>>> {
    if n > 0 {
        return Ok(Some(Some(n as usize)));
    }
    if n == 0 {
        return Err(Error::disconnected("channel receive: the peer closed the data socket"));
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::Interrupted => Ok(None),
        std::io::ErrorKind::WouldBlock => Ok(Some(None)),
        _ => Err(Error::io("channel receive", e)),
    }
}

/// `Some(n)` bytes read, `None` when nothing is there yet; end of stream is an error.
fn recv(fd: i32, buf: &mut [u8], flags: i32) -> Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if let Some(done) = received(n)? {
            return Ok(done);
        }
    }
}
