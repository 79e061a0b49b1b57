//! A send helper thread: each of its sockets that has nothing in flight cuts the next piece from the
//! comm's window, so whichever socket drains first takes more (a slow flow never gates a request).
//! Header and payload leave in one `sendmsg` straight from the caller's buffer; with zero-copy on,
//! a large enough payload leaves in its own MSG_ZEROCOPY `sendmsg` and its piece only finishes once
//! the socket's error queue reports the kernel done with the pages.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::iov::{self, MAX_IOV};
use super::park;
use super::window::{Piece, PieceMem, Window};
use super::wire::{PIECE_HEADER_LEN, PieceHeader};
use super::zerocopy::{Counters, ZcSocket};
use crate::error::Error;
use crate::threads::{self, ThreadKind};

/// Upper bound on one sleep, so a lost wake-up (there should be none) costs latency, never a hang.
pub(super) const MAX_SLEEP: Duration = Duration::from_millis(100);

/// Requests at most this large (and a single piece) are written by the posting thread itself when
/// nothing older is waiting, saving the wake-up of a helper thread on the latency path.
pub(super) const INLINE_MAX: usize = 16 << 10;

struct Outgoing {
    piece: Piece,
    mem: PieceMem,
    header: [u8; PIECE_HEADER_LEN],
    /// Header and payload bytes already accepted by the kernel.
    written: usize,
    /// The payload goes out with MSG_ZEROCOPY (the header, which lives here and moves, never does).
    zerocopy: bool,
    /// Zero-copy sends of this piece the kernel accepted.
    zc_sends: u32,
}

impl Outgoing {
    fn new((piece, mem): (Piece, PieceMem), zerocopy: bool) -> Outgoing {
        let header =
            PieceHeader { seq: piece.seq, total: piece.total, offset: piece.offset, len: piece.len as u32 }.encode();
        Outgoing { piece, mem, header, written: 0, zerocopy, zc_sends: 0 }
    }
}

/// A send comm's sockets and who is writing on each: a piece is written by whoever claimed the
/// socket (its helper thread, or the posting thread for an inline send), so bytes never interleave.
pub(super) struct SendSockets {
    pub streams: Arc<[TcpStream]>,
    claimed: Vec<AtomicBool>,
    /// A partly written inline piece left for the socket's helper thread to finish (the claim moves
    /// with it).
    handoff: Vec<Mutex<Option<Outgoing>>>,
    handed: Vec<AtomicBool>,
    threads: usize,
}

impl SendSockets {
    pub fn new(streams: Arc<[TcpStream]>, threads: usize) -> SendSockets {
        let n = streams.len();
        SendSockets {
            streams,
            claimed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            handoff: (0..n).map(|_| Mutex::new(None)).collect(),
            handed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            threads,
        }
    }

    fn claim(&self, k: usize) -> bool {
        !self.claimed[k].load(Ordering::Relaxed)
            && self.claimed[k].compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    fn release(&self, k: usize) {
        self.claimed[k].store(false, Ordering::Release);
    }

    fn take_handoff(&self, k: usize) -> Option<Outgoing> {
        if !self.handed[k].load(Ordering::Acquire) {
            return None;
        }
        self.handed[k].store(false, Ordering::Relaxed);
        self.handoff[k].lock().take()
    }

    /// The posting thread writes the next piece on a free socket. Returns false if no socket was free
    /// (the helpers, busy on them, cut it next) so the caller wakes them.
    pub fn send_inline(&self, window: &Window) -> bool {
        for k in 0..self.streams.len() {
            if !self.claim(k) {
                continue;
            }
            let Some(cut) = window.cut() else {
                // A running helper took it already.
                self.release(k);
                return true;
            };
            // Inline pieces are at most 16 KiB: too small for zero-copy to pay for its notification.
            let mut o = Outgoing::new(cut, false);
            match write(&self.streams[k], &mut o, None, false) {
                Ok(Step::Finished) => {
                    self.release(k);
                    window.finish(&o.piece);
                }
                Ok(Step::Partial | Step::Blocked) => {
                    *self.handoff[k].lock() = Some(o);
                    self.handed[k].store(true, Ordering::Release);
                    window.parking.wake(k % self.threads);
                }
                Err(e) => {
                    self.release(k);
                    window.fail(Error::io("channel send", e));
                }
            }
            return true;
        }
        false
    }
}

pub(super) struct SendThread {
    pub index: usize,
    pub sockets: Vec<usize>,
    pub shared: Arc<SendSockets>,
    pub window: Arc<Window>,
    pub spin: Duration,
    /// Pieces of at least this many bytes go out zero-copy on sockets that accepted SO_ZEROCOPY; 0 = never.
    pub zerocopy_threshold: usize,
    /// Per socket of `sockets`: whether SO_ZEROCOPY is on.
    pub zerocopy: Vec<bool>,
    pub counters: Arc<Counters>,
    /// The thread's one socket is in blocking mode: `sendmsg` waits for buffer space itself.
    pub blocking: bool,
}

enum Step {
    Finished,
    Partial,
    Blocked,
}

impl SendThread {
    pub fn run(self) {
        let mut zc: Vec<ZcSocket> = self.zerocopy.iter().map(|&on| ZcSocket::new(on)).collect();
        if let Err(e) = self.serve(&mut zc) {
            // Pieces held for zero-copy completions stay readable by the kernel until the comm is
            // dropped (its sockets are reset then, below): a failed request's buffer is only free
            // once the comm is gone, which is the order the engine keeps (channels first, then
            // failing the transfers).
            self.window.fail(e);
        }
        for (k, z) in zc.iter_mut().enumerate() {
            if z.has_pending() {
                z.abandon(&self.counters);
                // The kernel still holds pages of caller buffers that the comm's owner gets back
                // once the comm is gone: reset instead of letting an orphaned socket send from them.
                let _ = socket2::SockRef::from(&self.shared.streams[self.sockets[k]]).set_linger(Some(Duration::ZERO));
            }
        }
    }

    fn serve(&self, zc: &mut [ZcSocket]) -> Result<(), Error> {
        let mut out: Vec<Option<Outgoing>> = self.sockets.iter().map(|_| None).collect();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.sockets.len() + 1);
        let mut idle_since: Option<Instant> = None;
        while !self.window.closing() {
            let mut moved = false;
            let mut blocked = false;
            for (k, slot) in out.iter_mut().enumerate() {
                let sock = self.sockets[k];
                if slot.is_none() {
                    *slot = self.shared.take_handoff(sock);
                }
                if slot.is_none() && self.shared.claim(sock) {
                    *slot = self.window.cut().map(|cut| {
                        let zerocopy =
                            zc[k].enabled && self.zerocopy_threshold > 0 && cut.0.len >= self.zerocopy_threshold;
                        Outgoing::new(cut, zerocopy)
                    });
                    if slot.is_none() {
                        self.shared.release(sock);
                    }
                    if slot.is_some() {
                        threads::point(ThreadKind::SocketSender);
                    }
                }
                let Some(o) = slot else {
                    // An idle socket still owes completions: collect them (one syscall) so its
                    // requests finish while the thread's other sockets are busy.
                    if zc[k].has_pending() {
                        moved |= self.reap(sock, &mut zc[k])?;
                    }
                    continue;
                };
                let stream = &self.shared.streams[sock];
                match write(stream, o, Some((&mut zc[k], &self.counters)), self.blocking)
                    .map_err(|e| Error::io("channel send", e))?
                {
                    Step::Finished => {
                        let used_zerocopy = o.zc_sends > 0;
                        if used_zerocopy {
                            zc[k].hold(o.piece, &self.counters);
                        } else {
                            self.window.finish(&o.piece);
                        }
                        *slot = None;
                        self.shared.release(sock);
                        if used_zerocopy || zc[k].has_pending() {
                            self.reap(sock, &mut zc[k])?;
                        }
                        moved = true;
                    }
                    Step::Partial => moved = true,
                    Step::Blocked => {
                        // Completions keep the socket's error queue non-empty, and poll reports
                        // POLLERR for that whatever was asked: reap them, or the park below
                        // returns at once for as long as the peer's window stays shut.
                        if zc[k].has_pending() {
                            moved |= self.reap(sock, &mut zc[k])?;
                        }
                        blocked = true;
                    }
                }
            }
            if moved {
                idle_since = None;
                continue;
            }
            if blocked && self.blocking {
                // The blocking `sendmsg` already waited its timeout for room: look at the window
                // (closing, failure) and go again, without a second wait in `poll`.
                continue;
            }
            if blocked {
                // Waiting on the peer to drain: sleep on the sockets, no spinning.
                fds.clear();
                fds.push(pollin(self.window.parking.event_fd(self.index)));
                self.push_socket_fds(&out, zc, &mut fds);
                park::wait(&mut fds, MAX_SLEEP).map_err(|e| Error::io("wait for channel sockets", e))?;
                if fds[0].revents != 0 {
                    self.window.parking.drain(self.index);
                }
                continue;
            }
            // No work at all: spin a little (a new post is usually close behind), then sleep.
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.spin {
                self.spin_until_posted(since, zc);
                continue;
            }
            self.sleep_until_posted(&out, zc, &mut fds)?;
        }
        Ok(())
    }

    /// Spins on atomics only until something is posted or handed over (re-scanning would take the
    /// window's lock, which the posting thread needs). Sockets owing completions end the spin at
    /// once: the loop collects them.
    fn spin_until_posted(&self, since: Instant, zc: &[ZcSocket]) {
        if zc.iter().any(ZcSocket::has_pending) {
            return;
        }
        let seen = self.window.posted();
        while since.elapsed() < self.spin && self.window.posted() == seen && !self.window.closing() {
            if self.sockets.iter().any(|&k| self.shared.handed[k].load(Ordering::Acquire)) {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Collects the socket's zero-copy completions and finishes the pieces they release.
    fn reap(&self, sock: usize, zc: &mut ZcSocket) -> Result<bool, Error> {
        let fd = self.shared.streams[sock].as_raw_fd();
        let any = zc.reap(fd, &self.counters).map_err(|e| Error::io("read zero-copy completions", e))?;
        for piece in zc.released(&self.counters) {
            self.window.finish(&piece);
        }
        Ok(any)
    }

    /// Sockets to wake up for: writable for a piece in progress, and (POLLERR, always reported) a
    /// completion for one that owes some.
    fn push_socket_fds(&self, out: &[Option<Outgoing>], zc: &[ZcSocket], fds: &mut Vec<libc::pollfd>) {
        for (k, o) in out.iter().enumerate() {
            let events = if o.is_some() { libc::POLLOUT } else { 0 };
            if o.is_some() || zc[k].has_pending() {
                let fd = self.shared.streams[self.sockets[k]].as_raw_fd();
                fds.push(libc::pollfd { fd, events, revents: 0 });
            }
        }
    }

    fn sleep_until_posted(
        &self,
        out: &[Option<Outgoing>],
        zc: &[ZcSocket],
        fds: &mut Vec<libc::pollfd>,
    ) -> Result<(), Error> {
        let seen = self.window.posted();
        self.window.parking.announce_sleep(self.index);
        let handed = self.sockets.iter().any(|&k| self.shared.handed[k].load(Ordering::Acquire));
        if self.window.posted() != seen || self.window.closing() || self.window.has_uncut() || handed {
            self.window.parking.cancel_sleep(self.index);
            return Ok(());
        }
        fds.clear();
        fds.push(pollin(self.window.parking.event_fd(self.index)));
        self.push_socket_fds(out, zc, fds);
        let waited = park::wait(fds, MAX_SLEEP);
        self.window.parking.cancel_sleep(self.index);
        waited.map_err(|e| Error::io("wait for channel work", e))?;
        self.window.parking.drain(self.index);
        Ok(())
    }
}

/// Writes what the socket takes of `o`. With `zc` and `o.zerocopy`, the header goes first as a copy
/// (MSG_MORE holds it for the payload) and the payload with MSG_ZEROCOPY, each accepted call taking
/// the socket's next notification id; ENOBUFS (notifications exhausted the socket's option memory)
/// sends the rest of the piece as a copy. `wait`: the call may block (on a socket in blocking mode,
/// up to its send timeout).
fn write(
    stream: &TcpStream,
    o: &mut Outgoing,
    mut zc: Option<(&mut ZcSocket, &Counters)>,
    wait: bool,
) -> std::io::Result<Step> {
    let fd = stream.as_raw_fd();
    let total = PIECE_HEADER_LEN + o.piece.len;
    let start = o.written;
    while o.written < total {
        let zerocopy_payload = o.zerocopy && zc.is_some() && o.written >= PIECE_HEADER_LEN;
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
        let mut n_iov = 0;
        let mut flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
        if o.written < PIECE_HEADER_LEN {
            iov[0] = libc::iovec {
                iov_base: o.header[o.written..].as_ptr() as *mut libc::c_void,
                iov_len: PIECE_HEADER_LEN - o.written,
            };
            n_iov = 1;
        }
        let payload_done = o.written.saturating_sub(PIECE_HEADER_LEN);
        if o.zerocopy && n_iov == 1 {
            if o.piece.len > 0 {
                flags |= libc::MSG_MORE;
            }
        } else if payload_done < o.piece.len {
            n_iov += iov::fill(o.mem.segs(), payload_done, &mut iov[n_iov..]);
        }
        if zerocopy_payload {
            flags |= libc::MSG_ZEROCOPY;
        }
        // SAFETY: an all-zero msghdr is valid; we point it at our iovecs only.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n_iov;
        let injected = zerocopy_payload && zc.as_ref().is_some_and(|(_, c)| c.inject_enobufs());
        // SAFETY: the iovecs cover our header array and the caller's payload segments, which the
        // request's contract keeps valid until it completes (or the comm's drop, which joins this
        // thread); a zero-copy payload's request completes only after the kernel reported the pages released.
        // MSG_NOSIGNAL: a closed peer must be an error, not SIGPIPE in the host process.
        let n = if injected { -1 } else { unsafe { libc::sendmsg(fd, &msg, flags) } };
        if n < 0 {
            let e = if injected {
                std::io::Error::from_raw_os_error(libc::ENOBUFS)
            } else {
                std::io::Error::last_os_error()
            };
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    return Ok(if o.written == start { Step::Blocked } else { Step::Partial });
                }
                _ if zerocopy_payload && e.raw_os_error() == Some(libc::ENOBUFS) => {
                    if let Some((_, counters)) = &zc {
                        counters.fell_back();
                    }
                    o.zerocopy = false;
                    continue;
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if zerocopy_payload && let Some((z, counters)) = zc.as_mut() {
            z.sent(counters);
            o.zc_sends += 1;
        }
        o.written += n as usize;
    }
    Ok(Step::Finished)
}

fn pollin(fd: i32) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}
