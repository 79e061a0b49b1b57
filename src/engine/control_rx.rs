//! The receiving half of a control stream, shared by two kinds of reader: the connection's reader
//! thread, and a caller blocked waiting for a reply that can only arrive on this stream (an inline
//! write, read or send). Such a caller reads the socket itself, so the reply wakes the thread that
//! wants it instead of a reader thread that would then have to wake it: one wake-up per round trip
//! fewer, the largest part of a small transfer's latency.
//!
//! Whoever holds the buffer lock is the reader. The reader thread waits in a level-triggered epoll
//! registration, which a caller disarms while it reads and re-arms when it leaves; arming reports
//! bytes already queued, so nothing that arrives during the hand-back is missed.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::proto::{Control, decode_frame};

/// The longest a waiting caller's read blocks before it re-checks its transfer.
const WAIT_SLICE: Duration = Duration::from_millis(20);
/// Read granularity; a frame larger than this (a Notify) grows the buffer only as its bytes arrive.
const READ_CHUNK: usize = 64 << 10;

pub struct ControlRx {
    stream: TcpStream,
    epoll: OwnedFd,
    buffer: Mutex<RxBuffer>,
}

#[derive(Default)]
pub struct RxBuffer {
    bytes: Vec<u8>,
    start: usize,
}

/// What one drain of the socket found.
pub enum Drained {
    /// The stream is open; everything queued was read.
    Open,
    /// A buffer's worth was read and more may be queued: handle what is buffered, then drain again
    /// (a peer sending faster than we handle cannot grow the buffer without bound).
    More,
    /// The peer closed or the stream failed; frames read before that are still buffered.
    Closed(Error),
}

impl ControlRx {
    pub fn new(stream: TcpStream) -> Result<ControlRx> {
        // Bounds a waiting caller's blocking read (SO_RCVTIMEO; every other read is non-blocking), so
        // that it notices a reply delivered some other way, such as a failure.
        stream.set_read_timeout(Some(WAIT_SLICE)).map_err(|e| Error::io("control stream", e))?;
        // SAFETY: plain syscall; the result is checked and owned at once.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(Error::io("control stream epoll", io::Error::last_os_error()));
        }
        // SAFETY: `epfd` is a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
        let rx = ControlRx { stream, epoll, buffer: Mutex::new(RxBuffer::default()) };
        rx.epoll_ctl(libc::EPOLL_CTL_ADD, ARMED)?;
        Ok(rx)
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

    pub fn try_lock(&self) -> Option<MutexGuard<'_, RxBuffer>> {
        self.buffer.try_lock()
    }

    /// Reads what the socket holds, up to about a buffer's worth. With `wait`, the first read blocks
    /// for at most `WAIT_SLICE` (a caller waiting for its reply: one syscall instead of a poll and a
    /// read); every other read is non-blocking per call (MSG_DONTWAIT), since the descriptor is
    /// shared with the writer thread, which writes in blocking mode.
    pub fn drain(&self, buf: &mut RxBuffer, wait: bool) -> Drained {
        buf.compact();
        let limit = buf.bytes.len() + READ_CHUNK;
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
