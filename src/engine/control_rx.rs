//! The receiving half of a control stream, shared by two kinds of reader: the connection's reader
//! thread, and a caller blocked waiting for a reply that can only arrive on this stream (an inline
//! write, read or send). Such a caller reads the socket itself, so the reply wakes the thread that
//! wants it instead of a reader thread that would then have to wake it: one wake-up per round trip
//! fewer, the largest part of a small transfer's latency.
//!
//! Whoever holds the buffer lock is the reader. The reader thread waits in one of two ways
//! (`ReaderWait`). Shared: in a level-triggered epoll registration, which a caller disarms while it
//! reads and re-arms when it leaves; arming reports bytes already queued, so nothing that arrives
//! during the hand-back is missed. Blocking: in `recv` itself, holding the buffer, which saves the
//! epoll wait on every message of a connection whose callers never wait here (the serving side of
//! one-sided traffic). A caller that finds the buffer held says so (`try_take` sets `wanted`) and
//! waits for the reader thread to deliver its reply; that reply wakes the reader, which then goes
//! back to shared waits. The reader returns to blocking waits after `QUIET_BATCHES` reads in a row
//! that no caller took part in.
//!
//! Both kinds of reader poll the socket for `spin` before they block when they expect bytes soon (a
//! caller its reply, the reader thread the next message after one arrived): a reply that arrives
//! meanwhile then costs no sleep and no wake-up.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::proto::{Control, decode_frame};
use crate::threads::{self, ThreadKind};

/// The longest one blocking read lasts (a waiting caller's, or the reader thread's in blocking
/// mode) before its thread re-checks its transfer or connection. A failing or closing connection
/// shuts the stream down, which ends such a read at once; this is only the backstop.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Reads by the reader thread, with no caller taking the stream in between, after which it waits in
/// `recv` instead of epoll.
const QUIET_BATCHES: u32 = 32;
/// Read granularity: room for a whole inline frame (64 KiB of payload and its header); a larger frame
/// (a Notify) grows the buffer only as its bytes arrive.
const READ_CHUNK: usize = 128 << 10;

pub struct ControlRx {
    stream: TcpStream,
    epoll: OwnedFd,
    buffer: Mutex<RxBuffer>,
    /// A caller found the buffer held by the reader thread in blocking mode.
    wanted: AtomicBool,
    /// How many times a caller took the stream; the reader thread compares it across its reads.
    takes: AtomicU64,
    /// How long a reader expecting bytes polls before it blocks (`Config::control_spin`).
    spin: Duration,
}

/// How the reader thread waits for the next bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderWait {
    /// In epoll, so that callers may take the stream.
    Shared { quiet: u32, takes: u64 },
    /// In `recv`, holding the buffer.
    Blocking,
}

#[derive(Default)]
pub struct RxBuffer {
    bytes: Vec<u8>,
    start: usize,
}

/// What one drain of the socket found.
pub enum Drained {
    /// The stream is open and had nothing (a poll that found no bytes, a blocking read that timed
    /// out): there is nothing to handle.
    Empty,
    /// The stream is open; everything queued was read.
    Open,
    /// A buffer's worth was read and more may be queued: handle what is buffered, then drain again
    /// (a peer sending faster than we handle cannot grow the buffer without bound).
    More,
    /// The peer closed or the stream failed; frames read before that are still buffered.
    Closed(Error),
}

impl ControlRx {
    pub fn new(stream: TcpStream, spin: Duration) -> Result<ControlRx> {
        // Bounds every blocking read (SO_RCVTIMEO; a waiting caller's, the reader thread's in blocking
        // mode; every other read is non-blocking), so that its thread looks at its transfer or
        // connection again now and then.
        stream.set_read_timeout(Some(WAIT_SLICE)).map_err(|e| Error::io("control stream", e))?;
        // SAFETY: plain syscall; the result is checked and owned at once.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(Error::io("control stream epoll", io::Error::last_os_error()));
        }
        // SAFETY: `epfd` is a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        let rx = ControlRx {
            stream,
            epoll,
            buffer: Mutex::new(RxBuffer::default()),
            wanted: AtomicBool::new(false),
            takes: AtomicU64::new(0),
            spin,
        };
        rx.epoll_ctl(libc::EPOLL_CTL_ADD, ARMED)?;
        Ok(rx)
    }

    pub fn spin(&self) -> Duration {
        self.spin
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn epoll_ctl(&self, op: libc::c_int, events: u32) -> Result<()> {
        let mut ev = libc::epoll_event { events, u64: 0 };
        // SAFETY: both descriptors are owned by `self`; `ev` outlives the call.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, self.fd(), &mut ev) };
        if rc < 0 {
            return Err(Error::io("control stream epoll_ctl", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The reader thread's wait: true when the stream has something (bytes, EOF or an error) and no
    /// caller has disarmed it.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: a valid epoll descriptor and room for one event.
        unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, ms) > 0 }
    }

    /// Lets the reader thread see the stream again (at once, if bytes are already queued).
    pub fn arm(&self) {
        if let Err(e) = self.epoll_ctl(libc::EPOLL_CTL_MOD, ARMED) {
            log::error!("{e}");
        }
    }

    /// Keeps the reader thread from waking for bytes a caller is about to read itself.
    pub fn disarm(&self) {
        if let Err(e) = self.epoll_ctl(libc::EPOLL_CTL_MOD, 0) {
            log::error!("{e}");
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, RxBuffer> {
        self.buffer.lock()
    }

    /// The reader thread's attempt to poll the stream while no caller holds it.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, RxBuffer>> {
        self.buffer.try_lock()
    }

    /// A caller's attempt to read the stream itself; `None` (and the reader thread told to share
    /// the stream from its next read on) when another thread reads it.
    pub fn try_take(&self) -> Option<MutexGuard<'_, RxBuffer>> {
        match self.buffer.try_lock() {
            Some(buf) => {
                self.takes.fetch_add(1, Ordering::Relaxed);
                Some(buf)
            }
            None => {
                self.wanted.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// The reader thread's next way of waiting, after a read in `wait` mode.
    pub fn next_wait(&self, wait: ReaderWait) -> ReaderWait {
        match wait {
            ReaderWait::Blocking if self.wanted.swap(false, Ordering::Relaxed) => self.shared_wait(),
            ReaderWait::Blocking => ReaderWait::Blocking,
            ReaderWait::Shared { quiet, takes } => {
                let now = self.takes.load(Ordering::Relaxed);
                if now != takes {
                    ReaderWait::Shared { quiet: 0, takes: now }
                } else if quiet + 1 >= QUIET_BATCHES {
                    self.wanted.store(false, Ordering::Relaxed);
                    ReaderWait::Blocking
                } else {
                    ReaderWait::Shared { quiet: quiet + 1, takes }
                }
            }
        }
    }

    /// Where the reader thread starts: sharing, so that a connection's first callers read their own
    /// replies.
    pub fn shared_wait(&self) -> ReaderWait {
        ReaderWait::Shared { quiet: 0, takes: self.takes.load(Ordering::Relaxed) }
    }

    /// Reads what the socket holds, up to about a buffer's worth. With `wait`, the first read blocks
    /// for at most `WAIT_SLICE` (one syscall instead of a wait and a read); every other read is
    /// non-blocking per call (MSG_DONTWAIT), since the descriptor is shared with the writer thread,
    /// which writes in blocking mode.
    pub fn drain(&self, buf: &mut RxBuffer, wait: bool) -> Drained {
        buf.compact();
        let start = buf.bytes.len();
        let limit = start + READ_CHUNK;
        let mut flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        loop {
            if buf.bytes.len() >= limit {
                return Drained::More;
            }
            if buf.bytes.capacity() - buf.bytes.len() < READ_CHUNK / 4 {
                buf.bytes.reserve(READ_CHUNK);
            }
            let spare = buf.bytes.spare_capacity_mut();
            // SAFETY: `spare` is writable memory of the given length that recv fills from the front.
            let n = unsafe { libc::recv(self.fd(), spare.as_mut_ptr().cast(), spare.len(), flags) };
            flags = libc::MSG_DONTWAIT;
            if n > 0 {
                threads::point(ThreadKind::ControlReader);
                let short = (n as usize) < spare.len();
                // SAFETY: recv initialised the first `n` bytes of the spare capacity.
                unsafe { buf.bytes.set_len(buf.bytes.len() + n as usize) };
                if short {
                    // Most likely all there was; whatever came since keeps the stream readable
                    // (both waits are level-triggered), so skip the EAGAIN round trip.
                    return Drained::Open;
                }
                continue;
            }
            if n == 0 {
                return Drained::Closed(Error::io("control stream", io::ErrorKind::UnexpectedEof.into()));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock if buf.bytes.len() == start => return Drained::Empty,
                io::ErrorKind::WouldBlock => return Drained::Open,
                io::ErrorKind::Interrupted => continue,
                _ => return Drained::Closed(Error::io("control stream", err)),
            }
        }
    }
}

const ARMED: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

impl RxBuffer {
    /// The next whole frame, if buffered; a malformed one is an error as soon as its header is in.
    pub fn next_frame(&mut self) -> Result<Option<Control>> {
        match decode_frame(&self.bytes[self.start..])? {
            Some((msg, used)) => {
                self.start += used;
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        // A large frame (a Notify) is gone once consumed; do not keep its memory.
        if self.bytes.is_empty() && self.bytes.capacity() > 4 * READ_CHUNK {
            self.bytes = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn rx() -> (ControlRx, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (ControlRx::new(ours, Duration::ZERO).unwrap(), peer)
    }

    #[test]
    fn reader_blocks_after_quiet_reads_and_shares_again_when_a_caller_asks() {
        let (rx, _peer) = rx();
        let mut wait = rx.shared_wait();
        for i in 1..QUIET_BATCHES {
            wait = rx.next_wait(wait);
            assert_eq!(wait, ReaderWait::Shared { quiet: i, takes: 0 });
        }
        // A caller reading the stream itself in between starts the count again.
        drop(rx.try_take().expect("nobody holds the buffer"));
        wait = rx.next_wait(wait);
        assert_eq!(wait, ReaderWait::Shared { quiet: 0, takes: 1 });
        for _ in 0..QUIET_BATCHES {
            wait = rx.next_wait(wait);
        }
        assert_eq!(wait, ReaderWait::Blocking);
        assert_eq!(rx.next_wait(wait), ReaderWait::Blocking, "no caller asked");
        // The reader thread holds the buffer while it waits in recv: a caller is refused and says so.
        let held = rx.lock();
        assert!(rx.try_take().is_none());
        drop(held);
        wait = rx.next_wait(wait);
        assert_eq!(wait, ReaderWait::Shared { quiet: 0, takes: 1 });
        assert_eq!(rx.next_wait(ReaderWait::Blocking), ReaderWait::Blocking, "the request is used up");
    }

    #[test]
    fn a_blocking_read_returns_what_arrives_and_reports_a_timeout_as_empty() {
        use std::io::Write;
        let (rx, mut peer) = rx();
        let mut buf = rx.lock();
        peer.write_all(b"hello").unwrap();
        assert!(matches!(rx.drain(&mut buf, true), Drained::Open));
        assert_eq!(&buf.bytes[buf.start..], b"hello");
        let t = std::time::Instant::now();
        assert!(matches!(rx.drain(&mut buf, true), Drained::Empty));
        assert!(t.elapsed() >= WAIT_SLICE / 2, "the second read waited for more");
        drop(peer);
        assert!(matches!(rx.drain(&mut buf, true), Drained::Closed(_)));
        assert!(matches!(rx.drain(&mut buf, false), Drained::Closed(_)));
    }
}
