//! A receive helper thread: reads piece headers from each of its sockets, has the window admit them,
//! and reads payloads straight into the posted buffer. A header small enough arrives with its payload
//! in one `recv` into a 4 KiB staging area, so a small message costs one syscall; large payloads are
//! read in place and only their first few KiB pass through staging.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::iov::{self, MAX_IOV};
use super::park;
use super::sender::MAX_SLEEP;
use super::window::{Admission, Piece, PieceMem, Window};
use super::wire::{PIECE_HEADER_LEN, PieceHeader};
use crate::error::{Error, Result};
use crate::threads::{self, ThreadKind};

const STAGE_LEN: usize = 4096;
/// A thread waiting for more than this much of a piece sleeps at once instead of spinning.
const BULK_WAIT: usize = 64 << 10;

enum Phase {
    Header,
    /// A header for a request not posted yet; the socket is not read until it is.
    Held(PieceHeader),
    Payload {
        piece: Piece,
        mem: PieceMem,
        landed: usize,
    },
}

struct Incoming {
    stage: Box<[u8; STAGE_LEN]>,
    start: usize,
    end: usize,
    phase: Phase,
}

impl Incoming {
    /// Payload bytes of the current piece still to arrive.
    fn awaited(&self) -> usize {
        match &self.phase {
            Phase::Payload { piece, landed, .. } => piece.len - landed,
            _ => 0,
        }
    }
}

enum Step {
    Moved,
    Stalled,
}

pub(super) struct RecvThread {
    pub index: usize,
    pub sockets: Vec<usize>,
    pub streams: Arc<[TcpStream]>,
    pub window: Arc<Window>,
    pub spin: Duration,
    /// The thread's one socket is in blocking mode: instead of polling, wait inside `recv`.
    pub blocking: bool,
}

impl RecvThread {
    pub fn run(self) {
        let mut ins: Vec<Incoming> = self
            .sockets
            .iter()
            .map(|_| Incoming { stage: Box::new([0; STAGE_LEN]), start: 0, end: 0, phase: Phase::Header })
            .collect();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.sockets.len() + 1);
        let mut idle_since: Option<Instant> = None;
        while !self.window.closing() {
            let mut moved = false;
            for (k, inc) in ins.iter_mut().enumerate() {
                match self.drive(self.sockets[k], inc, false) {
                    Ok(Step::Moved) => moved = true,
                    Ok(Step::Stalled) => {}
                    Err(e) => return self.window.fail(e),
                }
            }
            if moved {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            // The rest of a large piece takes longer to arrive than a wake-up costs, and on a busy
            // host a spinning helper takes the core that a copying thread needs.
            let bulk = ins.iter().any(|i| i.awaited() > BULK_WAIT);
            if !bulk && since.elapsed() < self.spin {
                if let Err(e) = self.spin_until_ready(&ins, &mut fds, since) {
                    return self.window.fail(Error::io("wait for channel sockets", e));
                }
                continue;
            }
            if self.blocking && !matches!(ins[0].phase, Phase::Held(_)) {
                // Only a post (which a held header waits for) or closing would come through the
                // eventfd; the comm's drop shuts the socket down and `fail` is seen after the
                // socket's timeout.
                if let Err(e) = self.drive(self.sockets[0], &mut ins[0], true) {
                    return self.window.fail(e);
                }
                continue;
            }
            let seen = self.window.posted();
            self.window.parking.announce_sleep(self.index);
            let held_ready = ins.iter().any(|i| matches!(i.phase, Phase::Held(h) if h.seq < self.window.posted()));
            if held_ready || self.window.posted() != seen || self.window.closing() {
                self.window.parking.cancel_sleep(self.index);
                continue;
            }
            self.poll_set(&ins, &mut fds);
            if let Err(e) = park::wait(&mut fds, MAX_SLEEP) {
                return self.window.fail(Error::io("wait for channel sockets", e));
            }
            self.window.parking.cancel_sleep(self.index);
            if fds[0].revents != 0 {
                self.window.parking.drain(self.index);
            }
        }
    }

    /// The thread's eventfd and every socket that is not holding a header.
    fn poll_set(&self, ins: &[Incoming], fds: &mut Vec<libc::pollfd>) {
        fds.clear();
        fds.push(libc::pollfd { fd: self.window.parking.event_fd(self.index), events: libc::POLLIN, revents: 0 });
        for (k, inc) in ins.iter().enumerate() {
            if !matches!(inc.phase, Phase::Held(_)) {
                let fd = self.streams[self.sockets[k]].as_raw_fd();
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            }
        }
    }

    /// Spins until a socket is readable, a request is posted or the spin time is over. Readiness is
    /// checked with a zero-timeout poll, not by reading: a read takes the socket's lock, which the
    /// sending side needs to deliver (on loopback, on its own thread) the very data we wait for.
    fn spin_until_ready(&self, ins: &[Incoming], fds: &mut Vec<libc::pollfd>, since: Instant) -> std::io::Result<()> {
        let seen = self.window.posted();
        self.poll_set(ins, fds);
        while since.elapsed() < self.spin && self.window.posted() == seen && !self.window.closing() {
            park::wait(fds, Duration::ZERO)?;
            if fds.iter().any(|f| f.revents != 0) {
                break;
            }
            std::hint::spin_loop();
        }
        if fds[0].revents != 0 {
            self.window.parking.drain(self.index);
        }
        Ok(())
    }

    /// Moves one socket forward until it would block or finished a piece (so one busy socket does not
    /// starve the others of this thread). `wait`: block for data (a socket in blocking mode, up to its
    /// receive timeout), and for the whole rest of a payload at once.
    fn drive(&self, socket: usize, inc: &mut Incoming, wait: bool) -> Result<Step> {
        let (header_flags, payload_flags) =
            if wait { (0, libc::MSG_WAITALL) } else { (libc::MSG_DONTWAIT, libc::MSG_DONTWAIT) };
        let fd = self.streams[socket].as_raw_fd();
        let mut moved = false;
        loop {
            match &mut inc.phase {
                Phase::Held(h) => {
                    let h = *h;
                    if h.seq >= self.window.posted() {
                        return Ok(if moved { Step::Moved } else { Step::Stalled });
                    }
                    self.admit(inc, h)?;
                    moved = true;
                }
                Phase::Header => {
                    if inc.end - inc.start >= PIECE_HEADER_LEN {
                        let h = PieceHeader::decode(&inc.stage[inc.start..inc.end], self.window.subchunk as u32)?;
                        inc.start += PIECE_HEADER_LEN;
                        self.admit(inc, h)?;
                        moved = true;
                        continue;
                    }
                    if inc.start > 0 {
                        inc.stage.copy_within(inc.start..inc.end, 0);
                        inc.end -= inc.start;
                        inc.start = 0;
                    }
                    let end = inc.end;
                    match recv(fd, &mut inc.stage[end..], header_flags)? {
                        Some(n) => {
                            inc.end += n;
                            moved = true;
                        }
                        None => return Ok(if moved { Step::Moved } else { Step::Stalled }),
                    }
                }
                Phase::Payload { piece, mem, landed } => {
                    let staged = inc.end - inc.start;
                    if staged > 0 {
                        let n = staged.min(piece.len - *landed);
                        // SAFETY: the window admitted this piece's memory inside a posted receive
                        // that only this piece writes; `landed + n <= len`.
                        unsafe { iov::scatter(&inc.stage[inc.start..inc.start + n], mem.segs(), *landed) };
                        inc.start += n;
                        *landed += n;
                    }
                    while *landed < piece.len {
                        // SAFETY: as above, the rest of the admitted memory.
                        match unsafe { recv_into(fd, mem, *landed, payload_flags)? } {
                            Some(n) => {
                                *landed += n;
                                moved = true;
                            }
                            None => return Ok(if moved { Step::Moved } else { Step::Stalled }),
                        }
                    }
                    let piece = *piece;
                    inc.phase = Phase::Header;
                    self.window.finish(&piece);
                    return Ok(Step::Moved);
                }
            }
        }
    }

    fn admit(&self, inc: &mut Incoming, h: PieceHeader) -> Result<()> {
        inc.phase = match self.window.admit(h.seq, h.total, h.offset, h.len as u64)? {
            Admission::Land(piece, mem) => Phase::Payload { piece, mem, landed: 0 },
            Admission::NotPosted => Phase::Held(h),
        };
        if matches!(inc.phase, Phase::Payload { .. }) {
            threads::point(ThreadKind::SocketReceiver);
        }
        Ok(())
    }
}

/// Reads into `mem` from byte `landed` of it on: one `recv` into a single range, one `recvmsg`
/// over the segments of a piece that spans several.
///
/// # Safety
/// `mem` is writable memory nobody else accesses meanwhile.
unsafe fn recv_into(fd: i32, mem: &PieceMem, landed: usize, flags: i32) -> Result<Option<usize>> {
    if let PieceMem::One(seg) = mem {
        // SAFETY: per the contract.
        let dst = unsafe { std::slice::from_raw_parts_mut((seg.addr + landed) as *mut u8, seg.len - landed) };
        return recv(fd, dst, flags);
    }
    let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
    let n_iov = iov::fill(mem.segs(), landed, &mut iovs);
    loop {
        // SAFETY: an all-zero msghdr is valid; we point it at our iovecs only.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = n_iov;
        // SAFETY: the iovecs cover writable memory per the contract.
        let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
        if let Some(done) = received(n)? {
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

/// `Some(n)` bytes read, `None` when nothing is there yet (or came before a blocking socket's
/// timeout); end of stream is an error.
fn recv(fd: i32, buf: &mut [u8], flags: i32) -> Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if let Some(done) = received(n)? {
            return Ok(done);
        }
    }
}
