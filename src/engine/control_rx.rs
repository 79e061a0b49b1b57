//! The receiving half of a control stream, shared by two kinds of reader: the engine's control
//! reactor, and a caller blocked waiting for a reply that can only arrive on this stream (an inline
//! write, read or send). Such a caller reads the socket itself, so the reply wakes the thread that
//! wants it instead of a reactor thread that would then have to wake it: one wake-up per round trip
//! fewer, the largest part of a small transfer's latency.
//!
//! Whoever holds the buffer lock is the reader. The reactor waits for the socket in its epoll set
//! (edge triggered) and only ever tries the lock: a caller reading meanwhile owns the bytes. A caller
//! takes the buffer and disarms the reactor's interest while it reads, so that bytes it reads itself
//! wake no reactor thread; once it let go of the buffer it arms it again, and arming reports bytes
//! already queued, so nothing that arrived during the hand-back is missed.
//!
//! Both kinds of reader poll for `spin` before they block when they expect bytes soon (a caller its
//! reply, the reactor the next message after one arrived): a reply that arrives meanwhile then
//! costs no sleep and no wake-up.
//!
//! A large inline payload whose destination is known once its head arrived (`Landing`: a write
//! authorized then, the answer to a small read of ours, a message matching a posted receive) has
//! the rest read straight into its destination, a copy fewer than through the buffer.
//! Its `LandingGate` is how the connection stops it: once the gate is closed (the region was
//! deregistered, the connection failed) nothing more is written there, and the payload's remaining
//! bytes are read and dropped so the stream stays in step.

use std::io;
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use super::control_reactor::Registration;
use crate::error::{Error, Result};
use crate::proto::{Frame, InlineHead, InlineInto, decode_frame_lent, peek_inline_head};
use crate::threads::{self, ThreadKind};

/// The longest one blocking read of a waiting caller lasts before it re-checks its transfer. A
/// failing or closing connection shuts the stream down, which ends such a read at once; this is only
/// the backstop. Idle connections never read this way.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Read granularity: room for a whole inline frame (its payload and header) and what follows; a
/// larger frame (a Notify) grows the buffer only as its bytes arrive.
const READ_CHUNK: usize = crate::proto::MAX_INLINE_LEN + (64 << 10);

pub struct ControlRx {
    stream: Arc<TcpStream>,
    reactor: Arc<Registration>,
    buffer: Mutex<RxBuffer>,
    /// How long a reader expecting bytes polls before it blocks (`Config::control_spin`).
    spin: Duration,
}

#[derive(Default)]
pub struct RxBuffer {
    bytes: Vec<u8>,
    start: usize,
    /// The payload being read straight into its destination, until the connection took its end.
    landing: Option<Landing>,
}

/// An inline payload read from the socket straight into its destination: `len` bytes at `dest`,
/// the first `done` of them there (or dropped, once the gate closed).
pub struct Landing {
    pub xfer: u64,
    pub into: InlineInto,
    dest: usize,
    len: usize,
    done: usize,
    gate: Arc<LandingGate>,
    /// Where bytes past a closed gate go.
    dropped: Vec<u8>,
}

/// Whether a landing may still write into its destination. Closing waits for a read into it in
/// progress (a non-blocking `recv`), so once `close` returns nothing lands there any more.
#[derive(Default)]
pub struct LandingGate {
    closed: Mutex<bool>,
}

impl LandingGate {
    pub fn close(&self) {
        *self.closed.lock() = true;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.lock()
    }
}

impl Landing {
    /// The landing of `len` payload bytes at `dest`, of which `already` were just copied there.
    ///
    /// # Safety
    /// `[dest, dest + len)` must be writable memory that stays so until `gate` is closed or the
    /// landing ends.
    pub unsafe fn new(head: &InlineHead, dest: usize, already: usize, gate: Arc<LandingGate>) -> Landing {
        debug_assert!(already < head.len);
        let (xfer, into, len) = (head.xfer, head.into, head.len);
        Landing { xfer, into, dest, len, done: already, gate, dropped: Vec::new() }
    }

    pub fn payload_len(&self) -> usize {
        self.len
    }

    fn finished(&self) -> bool {
        self.done == self.len
    }

    /// Reads what the socket holds of the payload, without blocking: `Ok(n)` bytes (0 once the
    /// socket had none), or the stream's end or failure. Past a closed gate the bytes are dropped.
    fn read(&mut self, fd: i32) -> std::result::Result<usize, Drained> {
        let want = self.len - self.done;
        let n = loop {
            let closed = self.gate.closed.lock();
            let to = if *closed {
                self.dropped.reserve(want);
                self.dropped.spare_capacity_mut().as_mut_ptr().cast::<u8>()
            } else {
                (self.dest + self.done) as *mut u8
            };
            // SAFETY: either the open gate keeps `[dest + done, dest + len)` writable (`new`), or
            // `to` is `want` bytes of spare capacity; recv writes at most `want` bytes.
            let n = unsafe { libc::recv(fd, to.cast(), want, libc::MSG_DONTWAIT) };
            if n >= 0 {
                break Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                break Err(err);
            }
        };
        match n {
            Ok(0) => Err(Drained::Closed(Error::io("control stream", io::ErrorKind::UnexpectedEof.into()))),
            Ok(n) => {
                threads::point(ThreadKind::ControlReader);
                self.done += n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(Drained::Closed(Error::io("control stream", e))),
        }
    }
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

/// A caller's hold on the stream: the reactor's interest is disarmed while it lasts and armed again
/// once the buffer is let go.
pub struct Taken<'a> {
    rx: &'a ControlRx,
    buf: Option<MutexGuard<'a, RxBuffer>>,
}

impl ControlRx {
    pub fn new(stream: Arc<TcpStream>, reactor: Arc<Registration>, spin: Duration) -> Result<ControlRx> {
        // Bounds a waiting caller's blocking read (SO_RCVTIMEO; every other read is non-blocking),
        // so that it looks at its transfer again now and then.
        stream.set_read_timeout(Some(WAIT_SLICE)).map_err(|e| Error::io("control stream", e))?;
        Ok(ControlRx { stream, reactor, buffer: Mutex::new(RxBuffer::default()), spin })
    }

    pub fn spin(&self) -> Duration {
        self.spin
    }

    /// The reactor's attempt to read: `None` while a caller reads the stream (it arms the reactor
    /// again when it leaves, which reports what it left).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, RxBuffer>> {
        self.buffer.try_lock()
    }

    /// A caller's attempt to read the stream itself; `None` when another thread reads it, which
    /// then delivers the caller's reply.
    pub fn take(&self) -> Option<Taken<'_>> {
        let buf = self.buffer.try_lock()?;
        self.reactor.arm_read(false);
        Some(Taken { rx: self, buf: Some(buf) })
    }

    /// Whether the socket holds bytes not read yet (an error says no).
    pub fn bytes_waiting(&self) -> bool {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to the pointer given; the descriptor is the stream's.
        let rc = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::FIONREAD, &mut n) };
        rc == 0 && n > 0
    }

    /// Reads what the socket holds, up to about a buffer's worth. With `wait`, the first read blocks
    /// for at most `WAIT_SLICE` (one syscall instead of a wait and a read); every other read is
    /// non-blocking per call (MSG_DONTWAIT): the socket itself stays blocking for that one read.
    pub fn drain(&self, buf: &mut RxBuffer, wait: bool) -> Drained {
        if let Some(landing) = buf.landing.as_mut().filter(|l| !l.finished()) {
            return self.drain_landing(landing, wait);
        }
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
            let n = unsafe { libc::recv(self.stream.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), flags) };
            flags = libc::MSG_DONTWAIT;
            if n > 0 {
                threads::point(ThreadKind::ControlReader);
                let short = (n as usize) < spare.len();
                // SAFETY: recv initialised the first `n` bytes of the spare capacity.
                unsafe { buf.bytes.set_len(buf.bytes.len() + n as usize) };
                if short {
                    // All there was: whatever comes later is a new edge for the reactor, and a caller
                    // reads again anyway, so skip the EAGAIN round trip.
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
                // A signal cut the waiting read short: wait again rather than report an empty stream.
                io::ErrorKind::Interrupted => {
                    if wait && buf.bytes.len() == start {
                        flags = 0;
                    }
                    continue;
                }
                _ => return Drained::Closed(Error::io("control stream", err)),
            }
        }
    }

    /// `drain` after waiting up to `left` (at most `WAIT_SLICE`) for bytes: for a caller whose wait
    /// is limited, which must be back within its slice. Sleeps in the kernel, as a blocking read
    /// does, and wakes on the answer itself rather than through the reactor.
    pub fn drain_within(&self, buf: &mut RxBuffer, left: Duration) -> Drained {
        let left = left.min(WAIT_SLICE);
        let mut pfd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let timeout = libc::timespec { tv_sec: left.as_secs() as libc::time_t, tv_nsec: left.subsec_nanos() as _ };
        // SAFETY: one valid pollfd and a valid timespec; no signal mask is changed. A timeout or a
        // signal just leads to a read that finds nothing.
        unsafe { libc::ppoll(&mut pfd, 1, &timeout, std::ptr::null()) };
        self.drain(buf, false)
    }

    /// `drain` while a payload lands: reads only the payload (what follows it is read once the
    /// connection took the landing's end). `More` once the payload is all in, so that its reader
    /// hands it on and comes back for what follows.
    fn drain_landing(&self, landing: &mut Landing, wait: bool) -> Drained {
        let fd = self.stream.as_raw_fd();
        if wait {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd. A timeout or a signal just leads to a read that finds nothing.
            unsafe { libc::poll(&mut pfd, 1, WAIT_SLICE.as_millis() as i32) };
        }
        let mut got = 0;
        loop {
            match landing.read(fd) {
                Err(closed) => return closed,
                Ok(0) => return if got == 0 { Drained::Empty } else { Drained::Open },
                Ok(n) => got += n,
            }
            if landing.finished() {
                return Drained::More;
            }
        }
    }
}

impl Deref for Taken<'_> {
    type Target = RxBuffer;

    fn deref(&self) -> &RxBuffer {
        self.buf.as_ref().expect("held until dropped")
    }
}

impl DerefMut for Taken<'_> {
    fn deref_mut(&mut self) -> &mut RxBuffer {
        self.buf.as_mut().expect("held until dropped")
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        // Let go first: arming reports queued bytes at once, and the reactor must then find the
        // buffer free (it only tries the lock, and a turn that misses it is not repeated).
        drop(self.buf.take());
        self.rx.reactor.arm_read(true);
    }
}

impl RxBuffer {
    /// The landing that read its whole payload, taken (its reader goes on with what follows).
    pub fn landed(&mut self) -> Option<(Landing, bool)> {
        if !self.landing.as_ref().is_some_and(Landing::finished) {
            return None;
        }
        let landing = self.landing.take()?;
        let closed = landing.gate.is_closed();
        Some((landing, !closed))
    }

    pub fn landing(&self) -> bool {
        self.landing.is_some()
    }

    /// The head of the inline payload's frame the buffer starts with, when the payload is not all
    /// here, and the part that is.
    pub fn partial_inline(&self) -> Result<Option<(InlineHead, &[u8])>> {
        let rest = &self.bytes[self.start..];
        Ok(peek_inline_head(rest)?.filter(|h| rest.len() < h.payload_at + h.len).map(|h| (h, &rest[h.payload_at..])))
    }

    /// Lands the rest of the partial inline payload the buffer starts with: its buffered bytes
    /// (already copied to the destination by the caller) are consumed.
    pub fn start_landing(&mut self, landing: Landing) {
        debug_assert!(self.landing.is_none());
        self.start = self.bytes.len();
        self.landing = Some(landing);
    }

    /// The next whole frame, if buffered, an inline payload lent from the buffer until the next
    /// call; a malformed frame is an error as soon as its header is in.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>> {
        match decode_frame_lent(&self.bytes[self.start..])? {
            Some((frame, used)) => {
                self.start += used;
                Ok(Some(frame))
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
    use crate::engine::control_reactor::{ControlEndpoint, ControlReactor, Next};
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::Weak;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Reads as the reactor does, keeping what it read.
    struct Reader {
        rx: ControlRx,
        turns: AtomicUsize,
        got: Mutex<Vec<u8>>,
    }

    impl ControlEndpoint for Reader {
        fn readable(&self) -> Next {
            self.turns.fetch_add(1, Ordering::SeqCst);
            let Some(mut buf) = self.rx.try_lock() else { return Next::Idle };
            let drained = self.rx.drain(&mut buf, false);
            let start = buf.start;
            self.got.lock().extend_from_slice(&buf.bytes[start..]);
            buf.start = buf.bytes.len();
            match drained {
                Drained::More => Next::Again,
                Drained::Closed(_) => Next::Stop,
                _ => Next::Idle,
            }
        }
        fn writable(&self) -> Next {
            Next::Idle
        }
        fn fail_with(&self, _: Error) {}
    }

    fn reader() -> (ControlReactor, Arc<Reader>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let ours = Arc::new(listener.accept().unwrap().0);
        let reactor = ControlReactor::new(1, Duration::ZERO, true);
        let registration = reactor.attach(ours.as_raw_fd()).unwrap();
        let rx = ControlRx::new(ours, registration.clone(), Duration::ZERO).unwrap();
        let reader = Arc::new(Reader { rx, turns: AtomicUsize::new(0), got: Mutex::default() });
        registration.start(Arc::downgrade(&reader) as Weak<dyn ControlEndpoint>).unwrap();
        (reactor, reader, peer)
    }

    /// Takes the stream once the reactor let go of it: its turn counts itself before it ends.
    fn take(rx: &ControlRx) -> Taken<'_> {
        let deadline = std::time::Instant::now() + testkit::PATIENCE;
        loop {
            if let Some(taken) = rx.take() {
                return taken;
            }
            assert!(std::time::Instant::now() < deadline, "the reactor never let go of the stream");
            std::thread::yield_now();
        }
    }

    fn until(what: &str, cond: impl Fn() -> bool) {
        testkit::wait_until(what, testkit::PATIENCE, cond);
    }

    /// The reactor reads what arrives; a caller that takes the stream reads it instead and wakes no
    /// reactor turn meanwhile; bytes that arrive after its last read are reported to the reactor
    /// once it lets go.
    #[test]
    fn a_caller_takes_the_stream_from_the_reactor_and_hands_back_what_it_left() {
        let (_reactor, reader, mut peer) = reader();
        until("the first turn", || reader.turns.load(Ordering::SeqCst) == 1);
        peer.write_all(b"one").unwrap();
        until("the reactor read it", || reader.got.lock().as_slice() == b"one");
        let turns = reader.turns.load(Ordering::SeqCst);
        let mut taken = take(&reader.rx);
        assert!(reader.rx.take().is_none(), "one reader at a time");
        peer.write_all(b"two").unwrap();
        let mut drained = reader.rx.drain(&mut taken, true);
        while matches!(drained, Drained::Empty) {
            drained = reader.rx.drain(&mut taken, true);
        }
        assert!(matches!(drained, Drained::Open));
        assert_eq!(&taken.bytes[taken.start..], b"two");
        taken.start = taken.bytes.len();
        // Left for the reactor: the caller does not read again.
        peer.write_all(b"three").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(reader.turns.load(Ordering::SeqCst), turns, "no reactor turn while the caller reads");
        drop(taken);
        until("the reactor read what the caller left", || reader.got.lock().as_slice() == b"onethree");
    }

    fn frame(msg: &crate::proto::Control) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out);
        out
    }

    /// Reads with `wait` until the landing's payload is all in (or dropped), then takes its end.
    fn land(rx: &ControlRx, buf: &mut RxBuffer) -> (Landing, bool) {
        let deadline = std::time::Instant::now() + testkit::PATIENCE;
        loop {
            if let Some(done) = buf.landed() {
                return done;
            }
            assert!(!matches!(rx.drain(buf, true), Drained::Closed(_)), "the stream stays open");
            assert!(std::time::Instant::now() < deadline, "the payload never landed");
        }
    }

    /// The next whole message on the stream, read as it comes.
    fn next_message(rx: &ControlRx, buf: &mut RxBuffer) -> crate::proto::Control {
        loop {
            if let Some(frame) = buf.next_frame().unwrap() {
                return frame.into_control();
            }
            assert!(!matches!(rx.drain(buf, true), Drained::Closed(_)), "the stream stays open");
        }
    }

    /// Starts landing the inline write whose head (and first payload bytes) `buf` holds into
    /// `dest`, as the connection does: the buffered part copied, the rest read straight there.
    fn start(rx: &ControlRx, buf: &mut RxBuffer, dest: &mut [u8], gate: &Arc<LandingGate>) {
        let head = loop {
            if let Some((head, have)) = buf.partial_inline().unwrap() {
                dest[..have.len()].copy_from_slice(have);
                break (head, have.len());
            }
            rx.drain(buf, true);
        };
        assert_eq!(head.0.len, dest.len());
        // SAFETY: `dest` outlives the landing (the test lands it before returning).
        let landing = unsafe { Landing::new(&head.0, dest.as_mut_ptr() as usize, head.1, gate.clone()) };
        buf.start_landing(landing);
    }

    /// An inline write's payload read straight into its destination as it arrives in pieces; what
    /// follows it on the stream is read into the buffer as ever once it is all in.
    #[test]
    fn an_inline_payload_lands_in_its_destination_and_the_stream_goes_on_after_it() {
        use crate::proto::Control;
        let (_reactor, reader, mut peer) = reader();
        until("the first turn", || reader.turns.load(Ordering::SeqCst) == 1);
        let rx = &reader.rx;
        let mut buf = take(rx);
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let write =
            frame(&Control::InlineWrite { xfer: 5, region: 1, token: 2, addr: 0x1000, payload: payload.clone() });
        let after = frame(&Control::Done { xfer: 9, len: 4 });
        peer.write_all(&write[..10_000]).unwrap();
        let mut dest = vec![0u8; payload.len()];
        let gate = Arc::new(LandingGate::default());
        start(rx, &mut buf, &mut dest, &gate);
        assert!(buf.next_frame().unwrap().is_none(), "the partial frame left the buffer");
        for piece in write[10_000..].chunks(30_000) {
            peer.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        peer.write_all(&after).unwrap();
        let (landing, whole) = land(rx, &mut buf);
        assert!(whole);
        assert_eq!((landing.xfer, landing.payload_len()), (5, payload.len()));
        assert!(dest == payload, "every byte landed where it belongs");
        let next = next_message(rx, &mut buf);
        assert_eq!(next, Control::Done { xfer: 9, len: 4 });
    }

    /// Once the gate is closed nothing more is written to the destination: the payload's other
    /// bytes are read and dropped, and the stream stays in step.
    #[test]
    fn a_closed_gate_drops_the_rest_of_the_payload_and_leaves_the_destination_alone() {
        use crate::proto::Control;
        let (_reactor, reader, mut peer) = reader();
        until("the first turn", || reader.turns.load(Ordering::SeqCst) == 1);
        let rx = &reader.rx;
        let mut buf = take(rx);
        let payload = vec![0xa5u8; 150_000];
        // A read's answer this time: it lands the same way.
        let write = frame(&Control::ReadData { xfer: 6, payload });
        let after = frame(&Control::Close);
        peer.write_all(&write[..60_000]).unwrap();
        let mut dest = vec![0u8; 150_000];
        let gate = Arc::new(LandingGate::default());
        start(rx, &mut buf, &mut dest, &gate);
        // Read what is there, then close: no later byte may land.
        while !matches!(rx.drain(&mut buf, false), Drained::Empty) {}
        gate.close();
        let landed_before = dest.iter().take_while(|b| **b == 0xa5).count();
        assert!(landed_before >= 60_000 - 20, "what arrived before the gate closed landed");
        peer.write_all(&write[60_000..]).unwrap();
        peer.write_all(&after).unwrap();
        let (landing, whole) = land(rx, &mut buf);
        assert!(!whole, "a landing past its closed gate is not whole");
        assert_eq!((landing.xfer, landing.into), (6, InlineInto::ReadAnswer));
        assert!(dest[landed_before..].iter().all(|b| *b == 0), "nothing landed after the gate closed");
        let next = next_message(rx, &mut buf);
        assert_eq!(next, Control::Close);
    }

    #[test]
    fn a_blocking_read_returns_what_arrives_and_reports_a_timeout_as_empty() {
        let (_reactor, reader, mut peer) = reader();
        until("the first turn", || reader.turns.load(Ordering::SeqCst) == 1);
        let rx = &reader.rx;
        let mut buf = take(rx);
        peer.write_all(b"hello").unwrap();
        // A blocking read may still come back empty once (a wake-up with nothing readable yet on a
        // loaded host); it must then return the bytes on a later call, never lose them.
        let mut drained = rx.drain(&mut buf, true);
        while matches!(drained, Drained::Empty) {
            drained = rx.drain(&mut buf, true);
        }
        assert!(matches!(drained, Drained::Open));
        assert_eq!(&buf.bytes[buf.start..], b"hello");
        // Nothing more comes: blocking reads come back empty, having waited (a loaded host may end
        // one early, as above, so a few may add up to the wait).
        let t = std::time::Instant::now();
        for _ in 0..3 {
            assert!(matches!(rx.drain(&mut buf, true), Drained::Empty));
            if t.elapsed() >= WAIT_SLICE / 2 {
                break;
            }
        }
        assert!(t.elapsed() >= WAIT_SLICE / 2, "blocking reads waited for more");
        drop(peer);
        assert!(matches!(rx.drain(&mut buf, true), Drained::Closed(_)));
        assert!(matches!(rx.drain(&mut buf, false), Drained::Closed(_)));
    }
}
