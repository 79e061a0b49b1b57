//! The sending half of a control stream. Messages are encoded into a queue; the posting thread
//! writes a small batch to the socket itself when nothing is queued ahead of it, and hands the rest
//! (a large batch, what the socket did not take) to the connection's control reactor thread, which
//! writes it without blocking as the socket takes it. So neither callers nor the thread reading the
//! stream ever block on the network (two readers blocked writing to each other would deadlock the
//! connection), and no thread waits on one connection's writes.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::control_reactor::{Next, Registration};
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, MAX_NOTIFY_MSG_LEN};
use crate::sys::iovec::advance;
use crate::threads::{self, ThreadKind};

/// Control bytes that may wait for a peer that does not read: twice the largest message (a maximal
/// Notify), so only a peer that stopped reading its control stream reaches it, and such a peer
/// (one that keeps asking for small reads, say) cannot grow our memory without bound.
const MAX_QUEUED: usize = 2 * (MAX_NOTIFY_MSG_LEN + 4096);

/// Control bytes the posting thread writes to the socket itself: an inline message and a little.
/// A larger batch (a vector request's segment list) is the reactor's: on loopback the kernel
/// delivers what the caller writes on the caller's own time, a millisecond for a megabyte.
const DIRECT_WRITE_MAX: usize = crate::proto::MAX_INLINE_LEN + 4096;
/// Of those, the bytes other than inline payloads: what an inline message of the floor and a little
/// come to, so a segment list past that stays the reactor's whatever the inline bound.
const DIRECT_HEADS_MAX: usize = crate::proto::INLINE_LEN_FLOOR + 4096;

/// Bytes the reactor writes for one connection before its other connections get a turn.
const WRITE_TURN: usize = 256 << 10;

struct Queue {
    bytes: Vec<u8>,
    /// The reactor holds the queue's head: posters append and leave the writing to it.
    handed: bool,
    /// Bytes the reactor took from the queue and has not written yet.
    in_flight: usize,
    closing: bool,
    error: Option<Error>,
}

/// What the reactor took from the queue, and how much of it left.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    sent: usize,
}

pub struct ControlWriter {
    stream: Arc<TcpStream>,
    reactor: Arc<Registration>,
    queue: Mutex<Queue>,
    /// Signalled when the reactor let go of the queue (written or failed).
    drained: Condvar,
    batch: Mutex<Batch>,
}

impl ControlWriter {
    pub fn new(stream: Arc<TcpStream>, reactor: Arc<Registration>) -> ControlWriter {
        ControlWriter {
            stream,
            reactor,
            queue: Mutex::new(Queue { bytes: Vec::new(), handed: false, in_flight: 0, closing: false, error: None }),
            drained: Condvar::new(),
            batch: Mutex::default(),
        }
    }

    pub fn send(&self, msg: &Control) -> Result<()> {
        self.send_all(std::slice::from_ref(msg))
    }

    /// Queues `msgs` in order, back to back (one socket write when nothing is queued ahead).
    pub fn send_all(&self, msgs: &[Control]) -> Result<()> {
        self.queue_msgs(msgs, true)
    }

    /// Queues `msgs` for the reactor to write, even when nothing is queued ahead: the caller has
    /// better things to do than the socket write (`Connection::send_posted`).
    pub fn hand_over(&self, msgs: &[Control]) -> Result<()> {
        self.queue_msgs(msgs, false)
    }

    fn queue_msgs(&self, msgs: &[Control], direct: bool) -> Result<()> {
        let mut q = self.queue.lock();
        Self::open(&q)?;
        let waiting = q.bytes.len() + q.in_flight;
        if waiting > MAX_QUEUED {
            return Err(Error::new(
                UcclStatus::ErrBackend,
                format!(
                    "the peer has not read {waiting} bytes of control messages queued for it: it stopped reading its control stream"
                ),
            ));
        }
        // An injected writer panic (tests) takes every message through the reactor, so that the
        // panic happens with one in flight.
        let idle = direct && q.bytes.is_empty() && !q.handed && !threads::armed(ThreadKind::ControlWriter);
        if idle {
            // Nothing queued ahead of us: try the socket directly and save the reactor's wake-up (most
            // of a small message's latency). Non-blocking, so a full send buffer (a peer not
            // reading) still never blocks the caller; the rest goes to the reactor. Inline payloads
            // go from the messages themselves and are copied only if the socket leaves them.
            let mut payloads = Vec::new();
            for msg in msgs {
                let payload = msg.encode_head(&mut q.bytes);
                if !payload.is_empty() {
                    payloads.push((q.bytes.len(), payload));
                }
            }
            if payloads.is_empty() {
                // The common case: one buffer, written as it is.
                let sent =
                    if q.bytes.len() <= DIRECT_HEADS_MAX { write_nonblocking(&self.stream, &q.bytes).0 } else { 0 };
                q.bytes.drain(..sent);
            } else {
                let parts = interleave(&q.bytes, &payloads);
                let total: usize = parts.iter().map(|p| p.len()).sum();
                let direct = total <= DIRECT_WRITE_MAX && q.bytes.len() <= DIRECT_HEADS_MAX;
                let sent = if direct { send_parts_nonblocking(&self.stream, &parts) } else { 0 };
                // What the socket left goes to the reactor as one buffer.
                let rest = unsent(&parts, sent);
                if rest.is_empty() {
                    // Kept for the next message's head.
                    q.bytes.clear();
                } else {
                    q.bytes = rest;
                }
            }
            if q.bytes.is_empty() {
                return Ok(());
            }
        } else {
            // Encoded with the queue let go: an inline payload's copy under the lock held the
            // reactor off its own writes (2 x H100, 64 KiB GPU writes at 4 in flight: the client's
            // reactor slept on this lock about 15,000 times a second). Messages racing from other
            // threads had no order among them anyway; each thread's own stay in its order. An
            // empty queue lends its buffer, so a payload's encoding allocates nothing.
            let mut encoded = if q.bytes.is_empty() { std::mem::take(&mut q.bytes) } else { Vec::new() };
            drop(q);
            for msg in msgs {
                msg.encode(&mut encoded);
            }
            q = self.queue.lock();
            Self::open(&q)?;
            if q.bytes.is_empty() {
                q.bytes = encoded;
            } else {
                q.bytes.extend_from_slice(&encoded);
            }
        }
        if !q.handed {
            q.handed = true;
            drop(q);
            self.reactor.kick_write();
        }
        Ok(())
    }

    /// Whether the queue still takes messages.
    fn open(q: &Queue) -> Result<()> {
        if let Some(e) = &q.error {
            return Err(e.clone());
        }
        if q.closing {
            return Err(Error::new(UcclStatus::ErrCanceled, "the connection is closing"));
        }
        Ok(())
    }

    /// The reactor's turn: writes what the socket takes of the queue, at most `WRITE_TURN` bytes.
    pub fn write_some(&self) -> Next {
        let mut batch = self.batch.lock();
        if batch.sent == batch.bytes.len() {
            batch.bytes.clear();
            batch.sent = 0;
            let mut q = self.queue.lock();
            if q.bytes.is_empty() || q.error.is_some() {
                q.handed = false;
                q.in_flight = 0;
                drop(q);
                self.drained.notify_all();
                self.reactor.wait_writable(false);
                return Next::Idle;
            }
            std::mem::swap(&mut batch.bytes, &mut q.bytes);
            q.in_flight = batch.bytes.len();
        }
        threads::point(ThreadKind::ControlWriter);
        let end = batch.bytes.len().min(batch.sent + WRITE_TURN);
        let (sent, outcome) = {
            let Batch { bytes, sent } = &mut *batch;
            let (n, outcome) = write_nonblocking(&self.stream, &bytes[*sent..end]);
            *sent += n;
            (*sent, outcome)
        };
        let left = batch.bytes.len() - sent;
        let mut q = self.queue.lock();
        q.in_flight = left;
        match outcome {
            Written::All => Next::Again,
            Written::Full => {
                drop(q);
                // The socket reports when it takes more.
                self.reactor.wait_writable(true);
                Next::Idle
            }
            Written::Failed(e) => {
                q.error.get_or_insert_with(|| Error::io("control stream write", e));
                q.bytes.clear();
                q.handed = false;
                q.in_flight = 0;
                drop(q);
                batch.bytes.clear();
                batch.sent = 0;
                self.drained.notify_all();
                Next::Idle
            }
        }
    }

    /// The connection failed: nothing queued will leave, later sends fail with `err`, and `finish`
    /// stops waiting.
    pub fn stop(&self, err: Error) {
        {
            let mut q = self.queue.lock();
            q.error.get_or_insert(err);
            q.bytes.clear();
        }
        self.drained.notify_all();
    }

    /// Refuses further messages and waits (at most `linger`) until what is queued left. On the
    /// connection's own reactor thread, which would be waiting for itself, it only writes what the
    /// socket takes at once.
    pub fn finish(&self, linger: Duration) {
        let deadline = Instant::now() + linger;
        self.queue.lock().closing = true;
        if self.reactor.on_reactor_thread() {
            while self.write_some() == Next::Again {}
            return;
        }
        let mut q = self.queue.lock();
        while (q.handed || !q.bytes.is_empty()) && q.error.is_none() {
            if self.drained.wait_until(&mut q, deadline).timed_out() {
                break;
            }
        }
    }
}

/// The bytes of `heads` with each payload put at its offset into them, in order.
fn interleave<'a>(heads: &'a [u8], payloads: &[(usize, &'a [u8])]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(2 * payloads.len() + 1);
    let mut from = 0;
    for &(at, payload) in payloads {
        parts.push(&heads[from..at]);
        parts.push(payload);
        from = at;
    }
    parts.push(&heads[from..]);
    parts.retain(|p| !p.is_empty());
    parts
}

/// What is left of `parts` past their first `sent` bytes, as one buffer.
fn unsent(parts: &[&[u8]], mut sent: usize) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut rest = Vec::with_capacity(total.saturating_sub(sent));
    for part in parts {
        let skip = sent.min(part.len());
        sent -= skip;
        rest.extend_from_slice(&part[skip..]);
    }
    rest
}

/// Writes what the socket takes of `parts` without blocking, in one `sendmsg` when it takes all;
/// returns the bytes written. Errors are left for the reactor to report.
fn send_parts_nonblocking(stream: &TcpStream, parts: &[&[u8]]) -> usize {
    let mut iovs: Vec<libc::iovec> =
        parts.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }).collect();
    let mut left = &mut iovs[..];
    let mut sent = 0;
    while !left.is_empty() {
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = left.as_mut_ptr();
        msg.msg_iovlen = left.len() as _;
        // SAFETY: a valid socket; the iovecs point into `parts`, alive and unchanged for the call.
        // MSG_NOSIGNAL as in `write_nonblocking`.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        sent += n as usize;
        left = advance(left, n as usize);
    }
    sent
}

enum Written {
    All,
    /// The socket's send buffer is full.
    Full,
    Failed(std::io::Error),
}

fn write_nonblocking(stream: &TcpStream, mut bytes: &[u8]) -> (usize, Written) {
    let mut sent = 0;
    while !bytes.is_empty() {
        // SAFETY: a valid socket and a valid buffer; MSG_NOSIGNAL keeps a closed peer from raising
        // SIGPIPE in a host process that did not ignore it.
        let n = unsafe {
            libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return (sent, Written::Full),
                _ => return (sent, Written::Failed(e)),
            }
        }
        sent += n as usize;
        bytes = &bytes[n as usize..];
    }
    (sent, Written::All)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::control_reactor::{ControlEndpoint, ControlReactor};
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::Weak;

    struct Endpoint(ControlWriter);

    impl ControlEndpoint for Endpoint {
        fn readable(&self) -> Next {
            Next::Idle
        }
        fn writable(&self) -> Next {
            self.0.write_some()
        }
        fn fail_with(&self, err: Error) {
            self.0.stop(err);
        }
    }

    /// Everything the peer end will read until the stream is shut down, read on a thread.
    fn read_to_end(mut peer: TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        })
    }

    fn writer() -> (ControlReactor, Arc<Endpoint>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = Arc::new(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        let (peer, _) = listener.accept().unwrap();
        let reactor = ControlReactor::new(1, Duration::ZERO, true);
        let registration = reactor.attach(ours.as_raw_fd()).unwrap();
        let endpoint = Arc::new(Endpoint(ControlWriter::new(ours, registration.clone())));
        let weak: Weak<dyn ControlEndpoint> = Arc::downgrade(&endpoint) as Weak<dyn ControlEndpoint>;
        registration.start(weak).unwrap();
        (reactor, endpoint, peer)
    }

    /// A peer that never reads gets the connection failed once the queue passes its bound, instead
    /// of our memory growing with every answer we owe it.
    #[test]
    fn a_peer_that_never_reads_is_cut_off_at_the_bound() {
        let (_reactor, endpoint, _silent) = writer();
        let writer = &endpoint.0;
        let msg = Control::Notify { name: b"n".to_vec(), msg: vec![7; 16 << 20] };
        let mut sent = 0usize;
        let err = loop {
            match writer.send(&msg) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent <= MAX_QUEUED / (16 << 20) + 4, "{sent} messages of 16 MiB queued without a bound");
        };
        assert!(sent >= MAX_QUEUED / (16 << 20), "cut off after {sent} messages, below the bound");
        assert_eq!(err.status(), UcclStatus::ErrBackend);
        assert!(err.message().contains("stopped reading"), "{}", err.message());
        writer.finish(Duration::from_millis(10));
    }

    /// Inline payloads the caller sends straight from its messages arrive whole and in order with
    /// the frames around them, whether the socket takes them at once, in part (the rest queued),
    /// or not at all (queued behind earlier bytes). A slow reader with a small buffer makes the
    /// socket take part of a batch again and again.
    #[test]
    fn inline_payloads_leave_whole_when_the_socket_takes_part_of_them() {
        let (_reactor, endpoint, peer) = writer();
        socket2::SockRef::from(&*endpoint.0.stream).set_send_buffer_size(16 << 10).unwrap();
        socket2::SockRef::from(&peer).set_recv_buffer_size(16 << 10).unwrap();
        let mut expected = Vec::new();
        let batches: Vec<[Control; 4]> = (0..60u8)
            .map(|i| {
                let len = [1, 30 << 10, 60 << 10, 100 << 10][i as usize % 4];
                [
                    Control::Done { xfer: i.into(), len: 1 },
                    Control::InlineWrite { xfer: i.into(), region: 2, token: 3, addr: 4, payload: vec![i; len] },
                    Control::ReadData { xfer: i.into(), payload: vec![!i; len / 2 + 1] },
                    Control::InlineSend { xfer: i.into(), payload: vec![i ^ 0x55; 7] },
                ]
            })
            .collect();
        for msg in batches.iter().flatten() {
            msg.encode(&mut expected);
        }
        let want = expected.len();
        let reading = std::thread::spawn(move || {
            let mut peer = peer;
            let mut got = vec![0; want];
            for piece in got.chunks_mut(8 << 10) {
                peer.read_exact(piece).unwrap();
                std::thread::sleep(Duration::from_micros(50));
            }
            got
        });
        for batch in &batches {
            endpoint.0.send_all(batch).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        endpoint.0.finish(testkit::PATIENCE);
        let got = reading.join().unwrap();
        assert!(got == expected, "the bytes that arrived differ from the frames sent");
    }

    /// Batches larger than the socket takes at once leave whole and in order through the reactor,
    /// which waits for room instead of blocking, and `finish` returns once they left.
    /// Messages handed over to the reactor and messages written directly, interleaved, leave
    /// whole and in the order they were queued.
    #[test]
    fn handed_over_messages_keep_their_place_among_direct_ones() {
        let (_reactor, endpoint, peer) = writer();
        let reading = read_to_end(peer);
        let mut expected = Vec::new();
        for i in 0..64u64 {
            let payload = vec![i as u8; 4096 + i as usize * 997];
            let msg = Control::InlineWrite { xfer: i, region: 1, token: 2, addr: 3, payload };
            msg.encode(&mut expected);
            if i % 2 == 0 { endpoint.0.hand_over(&[msg]) } else { endpoint.0.send(&msg) }.unwrap();
        }
        endpoint.0.finish(testkit::PATIENCE);
        endpoint.0.stream.shutdown(std::net::Shutdown::Both).unwrap();
        let got = reading.join().unwrap();
        assert!(got == expected, "{} bytes arrived, {} sent", got.len(), expected.len());
    }

    #[test]
    fn large_batches_leave_in_order_through_the_reactor() {
        let (reactor, endpoint, peer) = writer();
        assert_eq!(reactor.threads(), 1);
        let reading = read_to_end(peer);
        let mut expected = Vec::new();
        for i in 0..24u8 {
            // Small ones the caller writes itself, large ones (and whatever follows while they
            // wait) the reactor.
            let len = if i % 3 == 0 { 3 << 20 } else { 100 + i as usize };
            let msg = Control::Notify { name: vec![b'a' + i], msg: vec![i; len] };
            msg.encode(&mut expected);
            endpoint.0.send(&msg).unwrap();
        }
        endpoint.0.finish(testkit::PATIENCE);
        assert!(
            endpoint.0.queue.lock().bytes.is_empty() && !endpoint.0.queue.lock().handed,
            "finish waited for the queue"
        );
        endpoint.0.stream.shutdown(std::net::Shutdown::Both).unwrap();
        let got = reading.join().unwrap();
        assert!(got == expected, "{} bytes arrived, {} sent", got.len(), expected.len());
        assert!(endpoint.0.send(&Control::Close).is_err(), "a finished writer takes nothing more");
        // Its registration goes with it, and with the last one the reactor's thread.
        drop(endpoint);
        assert_eq!(reactor.threads(), 0);
    }
}
