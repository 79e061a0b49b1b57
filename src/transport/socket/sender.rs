//! A send helper thread: each of its sockets that has nothing in flight cuts the next piece from the
//! comm's window, so whichever socket drains first takes more (a slow flow never gates a request).
//! Header and payload leave in one `sendmsg` straight from the caller's buffer.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::park;
use super::window::{Piece, Window};
use super::wire::{PIECE_HEADER_LEN, PieceHeader};
use crate::error::Error;

/// Upper bound on one sleep, so a lost wake-up (there should be none) costs latency, never a hang.
pub(super) const MAX_SLEEP: Duration = Duration::from_millis(100);

struct Outgoing {
    piece: Piece,
    header: [u8; PIECE_HEADER_LEN],
    /// Header and payload bytes already accepted by the kernel.
    written: usize,
}

pub(super) struct SendThread {
    pub index: usize,
    pub sockets: Vec<usize>,
    pub streams: Arc<[TcpStream]>,
    pub window: Arc<Window>,
    pub spin: Duration,
}

enum Step {
    Finished,
    Partial,
    Blocked,
}

impl SendThread {
    pub fn run(self) {
        let mut out: Vec<Option<Outgoing>> = self.sockets.iter().map(|_| None).collect();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.sockets.len() + 1);
        let mut idle_since: Option<Instant> = None;
        while !self.window.closing() {
            let mut moved = false;
            let mut blocked = false;
            for (k, slot) in out.iter_mut().enumerate() {
                if slot.is_none() {
                    *slot = self.window.cut().map(|piece| Outgoing {
                        header: PieceHeader {
                            seq: piece.seq,
                            total: piece.total,
                            offset: piece.offset,
                            len: piece.len as u32,
                        }
                        .encode(),
                        piece,
                        written: 0,
                    });
                }
                let Some(o) = slot else { continue };
                match self.write(self.sockets[k], o) {
                    Ok(Step::Finished) => {
                        self.window.finish(&o.piece);
                        *slot = None;
                        moved = true;
                    }
                    Ok(Step::Partial) => moved = true,
                    Ok(Step::Blocked) => blocked = true,
                    Err(e) => return self.window.fail(Error::io("channel send", e)),
                }
            }
            if moved {
                idle_since = None;
                continue;
            }
            if blocked {
                // Waiting on the peer to drain: sleep on the sockets, no spinning.
                fds.clear();
                fds.push(pollin(self.window.parking.event_fd(self.index)));
                for (k, o) in out.iter().enumerate() {
                    if o.is_some() {
                        let fd = self.streams[self.sockets[k]].as_raw_fd();
                        fds.push(libc::pollfd { fd, events: libc::POLLOUT, revents: 0 });
                    }
                }
                if let Err(e) = park::wait(&mut fds, MAX_SLEEP) {
                    return self.window.fail(Error::io("wait for channel sockets", e));
                }
                if fds[0].revents != 0 {
                    self.window.parking.drain(self.index);
                }
                continue;
            }
            // No work at all: spin a little (a new post is usually close behind), then sleep.
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            self.sleep_until_posted(&mut fds);
        }
    }

    fn sleep_until_posted(&self, fds: &mut Vec<libc::pollfd>) {
        let seen = self.window.posted();
        self.window.parking.announce_sleep(self.index);
        if self.window.posted() != seen || self.window.closing() || self.window.has_uncut() {
            self.window.parking.cancel_sleep(self.index);
            return;
        }
        fds.clear();
        fds.push(pollin(self.window.parking.event_fd(self.index)));
        if let Err(e) = park::wait(fds, MAX_SLEEP) {
            return self.window.fail(Error::io("wait for channel work", e));
        }
        self.window.parking.cancel_sleep(self.index);
        self.window.parking.drain(self.index);
    }

    fn write(&self, socket: usize, o: &mut Outgoing) -> std::io::Result<Step> {
        let fd = self.streams[socket].as_raw_fd();
        let total = PIECE_HEADER_LEN + o.piece.len;
        let start = o.written;
        while o.written < total {
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2];
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
                iov[n_iov] = libc::iovec {
                    iov_base: (o.piece.addr + payload_done) as *mut libc::c_void,
                    iov_len: o.piece.len - payload_done,
                };
                n_iov += 1;
            }
            // SAFETY: an all-zero msghdr is valid; we point it at our iovecs only.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n_iov;
            // SAFETY: the iovecs cover our header array and the caller's payload, which isend's contract
            // keeps valid until the request completes (or the comm's drop, which joins this thread).
            // MSG_NOSIGNAL: a closed peer must be an error, not SIGPIPE in the host process.
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
}

fn pollin(fd: i32) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}
