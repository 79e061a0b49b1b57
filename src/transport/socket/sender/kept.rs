//! What a send comm over several data links keeps until the receiver acknowledged it, and what it
//! does when a socket dies: every socket keeps the pieces it carried until their requests are
//! acknowledged; a socket that fails, or whose link stops answering ([`SendSockets::check_links`]),
//! is reset and its pieces are cut again for the others; a burst whose last acknowledgement was
//! lost is asked for again by one piece sent again ([`SendSockets::ask_again`]).

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Outgoing, SendSockets, SendTask, Step, write};
use crate::error::Error;
use crate::trace::{self, DeadWhy, ResendCause};
use crate::transport::IoSeg;
use crate::transport::socket::pure::window::{Piece, PieceMem};
use crate::transport::socket::pure::wire::{Ack, DONE_LEN};

impl SendSockets {
    /// Acknowledged comms: socket `k` takes `piece`, kept until acknowledged. False when `k` died
    /// meanwhile: the piece goes to the others.
    pub(super) fn took(&self, k: usize, piece: &Piece) -> bool {
        if !self.window.is_acked() {
            return true;
        }
        let mut f = self.inflight[k].lock();
        if f.dead {
            drop(f);
            let resent = self.window.resend([*piece]);
            self.traced_resent(k, resent, ResendCause::Dead);
            return false;
        }
        let upto = self.window.acked_upto();
        f.pieces.retain(|p| p.seq >= upto);
        f.pieces.push(*piece);
        true
    }

    /// Acknowledged comms: socket `k` is dead (`why`, traced as `reason`). Its pieces not
    /// acknowledged go out again on the others, which are kicked; the connection is reset, so that
    /// its link carries nothing more of it. With no other socket open the comm fails with `why`.
    pub fn socket_failed(&self, k: usize, why: Error, reason: DeadWhy) {
        let pieces = {
            let mut f = self.inflight[k].lock();
            if f.dead {
                return;
            }
            f.dead = true;
            std::mem::take(&mut f.pieces)
        };
        if self.open[k].swap(false, Ordering::SeqCst) {
            self.sockets.closed_sending(1);
        }
        self.dead.fetch_or(1 << k, Ordering::AcqRel);
        self.tally.error(k);
        trace::event!(SockDead { comm: self.trace, socket: k as u64, why: reason as u64 });
        abort(self.stream(k));
        let resent = self.window.resend(pieces);
        self.traced_resent(k, resent, ResendCause::Dead);
        let again = resent.0;
        let open = self.open_count();
        if open == 0 {
            self.window.fail(Error::new(
                why.status(),
                format!("every data socket of the comm failed, the last: {}", why.message()),
            ));
            return;
        }
        if !self.window.closing() {
            let link = self.stream(k).local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            log::warn!(
                "data socket {k} of a send comm (link {link}) failed: {}; {again} pieces go again over {open} others",
                why.message()
            );
        }
        self.to_replace.fetch_or(1 << k, Ordering::AcqRel);
        for j in (0..self.streams.len()).filter(|&j| self.idle(j)) {
            self.relay.kick(j);
        }
        self.window.wake();
    }

    /// Whether socket `k` carries pieces now.
    pub fn is_open(&self, k: usize) -> bool {
        self.open[k].load(Ordering::Acquire)
    }

    /// Gives up socket `k`, still joining, whose link did not answer in time (an unanswered SYN is
    /// retried for minutes): reset, so that its helper runs and stops it.
    pub fn abandon(&self, k: usize) {
        abort(self.stream(k));
        self.give_up(k, &std::io::Error::new(std::io::ErrorKind::TimedOut, "its link did not answer in time"));
    }

    /// Dead sockets the comm has not replaced yet, taken.
    pub fn take_dead(&self) -> u64 {
        self.to_replace.swap(0, Ordering::AcqRel)
    }

    /// Acknowledged comms: declares dead every open socket with pieces out whose connection is
    /// gone, or, while another socket is open, whose kernel holds bytes for the link but heard no
    /// acknowledgement for `bound` (never under [`LIVE_SILENCE`]) and could send nothing new for
    /// half of it. The peer's kernel answers, not its engine: a slow receiver still acknowledges
    /// what arrived; a socket that just sent after a quiet spell heard nothing for long but sent
    /// just now; a link down at this end leaves its bytes unsent rather than unacknowledged. A peer
    /// whose window is closed (a receiver that posts nothing for a while) is never dead: its bytes
    /// wait unsent too, and the probes of the closed window back off past any bound. The last open
    /// socket is left to the connection's own stall timeout. Returns whether some socket has pieces
    /// out and every such socket's bytes reached the peer's kernel.
    pub fn check_links(&self, bound: Duration) -> bool {
        let upto = self.window.acked_upto();
        let (mut out, mut delivered) = (false, true);
        for k in 0..self.streams.len() {
            if !self.open[k].load(Ordering::Acquire) || !self.inflight[k].lock().pieces.iter().any(|p| p.seq >= upto) {
                continue;
            }
            out = true;
            let Some(info) = tcp_info(self.stream(k)) else { continue };
            let silent = Duration::from_millis(u64::from(info.tcpi_last_ack_recv));
            let stuck = Duration::from_millis(u64::from(info.tcpi_last_data_sent));
            let backlog = info.tcpi_unacked > 0 || info.tcpi_notsent_bytes > 0;
            delivered &= !backlog;
            if info.tcpi_state != TCP_ESTABLISHED {
                self.socket_failed(k, Error::disconnected("the data socket's connection closed"), DeadWhy::Closed);
            } else if backlog
                && silent >= bound.max(LIVE_SILENCE)
                && stuck >= bound / 2
                && self.open_count() > 1
                && !window_closed(self.stream(k), &info)
            {
                self.socket_failed(
                    k,
                    Error::timeout(format!("its link acknowledged nothing for {} ms", silent.as_millis())),
                    DeadWhy::Silent,
                );
            }
        }
        out && delivered
    }

    /// Acknowledged comms: sends a piece of the oldest request not acknowledged again, whose
    /// bytes all reached the peer long ago: its acknowledgement may have been lost with the socket
    /// that carried it, and the receiver acknowledges again on the socket that brings the copy.
    /// Returns whether a piece went.
    pub fn ask_again(&self) -> bool {
        let upto = self.window.acked_upto();
        let piece = (0..self.streams.len())
            .filter(|&k| self.open[k].load(Ordering::Acquire))
            .find_map(|k| Some((k, self.inflight[k].lock().pieces.iter().find(|p| p.seq == upto).copied()?)));
        let Some((k, piece)) = piece else { return false };
        let resent = self.window.resend([piece]);
        if resent.0 == 0 {
            return false;
        }
        self.traced_resent(k, resent, ResendCause::AckOverdue);
        for j in (0..self.streams.len()).filter(|&j| self.idle(j)) {
            self.relay.kick(j);
        }
        true
    }

    /// `(pieces, bytes)` that socket `k` carried go out again.
    fn traced_resent(&self, k: usize, (pieces, bytes): (u64, u64), cause: ResendCause) {
        trace::event!(SockResent { comm: self.trace, socket: k as u64, pieces, bytes, cause: cause as u64 });
    }

    /// Writes what socket `k` takes of `o`. On an acknowledged comm, from the request's memory only
    /// while the request is not acknowledged (a resent copy may still be on its way when another
    /// socket's acknowledgement completes the request): the rest of the piece is then zeros, which
    /// the receiver reads past, since the request completed there.
    pub(super) fn write(&self, k: usize, o: &mut Outgoing) -> std::io::Result<Step> {
        let stream = self.stream(k);
        if !self.window.is_acked() {
            return write(stream, o);
        }
        if !self.window.begin_write(&o.piece) {
            o.mem = zeros(o.piece.len);
            return write(stream, o);
        }
        let step = write(stream, o);
        self.window.end_write(&o.piece, matches!(step, Ok(Step::Finished)));
        step
    }

    /// An added socket joined: it may carry pieces, unless an acknowledged comm abandoned it
    /// meanwhile (checked under the lock that abandoning takes).
    pub(super) fn open_if_alive(&self, k: usize) -> bool {
        if !self.window.is_acked() {
            self.opened(k);
            return true;
        }
        let f = self.inflight[k].lock();
        if !f.dead {
            self.opened(k);
        }
        !f.dead
    }
}

/// Reads of acknowledgements a socket makes per run at most: a peer flooding stale ones (valid,
/// but old) cannot keep the helper from the other sockets it serves.
pub(super) const ACK_READS_PER_RUN: usize = 64;

impl SendTask {
    /// Reads the acknowledgements that came on this socket, at most [`ACK_READS_PER_RUN`] reads:
    /// `Ok(true)` when it stopped there, so more may wait. The helper's poll is edge triggered, so
    /// bytes left unread raise no new event: the caller must run the socket again by itself.
    /// `Err((fatal, e))`: a malformed or impossible acknowledgement fails the comm (`fatal`); a
    /// socket error or its end takes the socket out.
    pub(super) fn read_acks(&mut self) -> Result<bool, (bool, Error)> {
        let fd = self.shared.stream(self.k).as_raw_fd();
        let mut reads = 0;
        while reads < ACK_READS_PER_RUN {
            let rest = &mut self.ack[self.ack_got..];
            // SAFETY: `rest` is writable for its length.
            let n = unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) };
            if n == 0 {
                return Err((false, Error::disconnected("the receiver closed the data socket")));
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err((false, Error::io("channel acknowledgement", e))),
                }
            }
            reads += 1;
            self.ack_got += n as usize;
            if self.ack_got == DONE_LEN {
                self.ack_got = 0;
                let ack = Ack::decode(&self.ack).map_err(|e| (true, e))?;
                self.shared.window.ack(ack.completed).map_err(|e| (true, e))?;
            }
        }
        Ok(true)
    }
}

/// What a piece of an acknowledged request sends in place of its memory.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// `len` zero bytes, as memory to write from.
fn zeros(len: usize) -> PieceMem {
    let segs = (0..len)
        .step_by(ZEROS.len())
        .map(|at| IoSeg { addr: ZEROS.as_ptr() as usize, len: (len - at).min(ZEROS.len()) })
        .collect::<Vec<_>>();
    match segs.as_slice() {
        [one] => PieceMem::One(*one),
        _ => PieceMem::Many(segs),
    }
}

/// The longest a live link stays silent: a segment it lost (a receiver short of memory drops
/// one even on loopback) is sent again one retransmission timeout later, at least the kernel's
/// 200 ms (`TCP_RTO_MIN`), and acknowledged then. Two of them: a link is dead only once a
/// retransmission went unanswered as well.
const LIVE_SILENCE: Duration = Duration::from_millis(400);

/// `tcpi_state` of a connected socket (linux/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;

/// Resets `stream`'s connection (a connect to no address: RST, its queues dropped), so that a
/// socket declared dead sends nothing more, even should its link come back.
fn abort(stream: &TcpStream) {
    // SAFETY: an all-zero sockaddr with family AF_UNSPEC, of its own size.
    let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: a valid descriptor and the address above.
    let _ =
        unsafe { libc::connect(stream.as_raw_fd(), &unspec, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t) };
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Whether the peer of `stream` closed its window, `info` its kernel's view: nothing out
/// unacknowledged, and the window it advertised last too small for a segment. Not the count of
/// window probes: the kernel probes as well when a link down at this end fails every send.
fn window_closed(stream: &TcpStream, info: &libc::tcp_info) -> bool {
    if info.tcpi_unacked > 0 {
        return false;
    }
    let Some((full, len)) = crate::sys::tcp::info(stream.as_raw_fd()) else { return false };
    // A kernel older than the field (5.4) leaves it out: it then says nothing.
    let reported = std::mem::offset_of!(libc::tcp_info, tcpi_snd_wnd) + std::mem::size_of::<u32>();
    len >= reported && full.tcpi_snd_wnd < info.tcpi_snd_mss.max(1)
}

/// The kernel's view of `stream`'s connection, if it gives one.
fn tcp_info(stream: &TcpStream) -> Option<libc::tcp_info> {
    crate::sys::tcp::info(stream.as_raw_fd()).map(|(info, _)| info)
}
