//! The sending half of a control stream. Messages are encoded into a buffer and written by a
//! dedicated thread, so neither callers nor the reader thread ever block on the network (two readers
//! blocked writing to each other would deadlock the connection).

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, MAX_NOTIFY_MSG_LEN};
use crate::threads::{self, ThreadKind, spawn_contained};

/// Control bytes that may wait for a peer that does not read: twice the largest message (a maximal
/// Notify), so only a peer that stopped reading its control stream reaches it, and such a peer
/// (one that keeps asking for small reads, say) cannot grow our memory without bound.
const MAX_QUEUED: usize = 2 * (MAX_NOTIFY_MSG_LEN + 4096);

/// Control bytes the posting thread writes to the socket itself: an inline message and a little.
const DIRECT_WRITE_MAX: usize = crate::proto::MAX_INLINE_LEN + 4096;

struct Pending {
    bytes: Vec<u8>,
    writing: bool,
    closing: bool,
    error: Option<Error>,
    /// `error` is the writer thread's panic.
    panicked: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    changed: Condvar,
}

pub struct ControlWriter {
    shared: Arc<Shared>,
    stream: TcpStream,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ControlWriter {
    pub fn start(stream: TcpStream) -> Result<ControlWriter> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                writing: false,
                closing: false,
                error: None,
                panicked: false,
            }),
            changed: Condvar::new(),
        });
        let clone = || stream.try_clone().map_err(|e| Error::io("clone control stream", e));
        let (io, to_shut) = (clone()?, clone()?);
        let thread_shared = shared.clone();
        let failing = shared.clone();
        let thread = spawn_contained(
            std::thread::Builder::new().name("uccl-ctrl-tx".into()),
            ThreadKind::ControlWriter,
            move |err| {
                // What was queued never leaves, and the stream may hold half a frame: later sends
                // fail, `finish` stops waiting, and the shutdown ends the connection's reads.
                {
                    let mut p = failing.pending.lock();
                    p.bytes.clear();
                    p.writing = false;
                    p.error = Some(err);
                    p.panicked = true;
                }
                failing.changed.notify_all();
                let _ = to_shut.shutdown(Shutdown::Both);
            },
            move || run(io, thread_shared),
        )
        .map_err(|e| Error::io("spawn control writer", e))?;
        Ok(ControlWriter { shared, stream, thread: Mutex::new(Some(thread)) })
    }

    pub fn send(&self, msg: &Control) -> Result<()> {
        self.send_all(std::slice::from_ref(msg))
    }

    /// Queues `msgs` in order, back to back (one socket write when nothing is queued ahead).
    pub fn send_all(&self, msgs: &[Control]) -> Result<()> {
        let mut p = self.shared.pending.lock();
        if let Some(e) = &p.error {
            return Err(e.clone());
        }
        if p.closing {
            return Err(Error::new(UcclStatus::ErrCanceled, "the connection is closing"));
        }
        if p.bytes.len() > MAX_QUEUED {
            return Err(Error::new(
                UcclStatus::ErrBackend,
                format!(
                    "the peer has not read {} bytes of control messages queued for it: it stopped reading its control stream",
                    p.bytes.len()
                ),
            ));
        }
        // An injected writer panic (tests) takes every message through the thread, so that the panic
        // happens with one in flight.
        let idle = p.bytes.is_empty() && !p.writing && !threads::armed(ThreadKind::ControlWriter);
        for msg in msgs {
            msg.encode(&mut p.bytes);
        }
        // A large batch (a vector request's segment list) is the writer thread's: on loopback the
        // kernel delivers what the caller writes on the caller's own time, a millisecond for a
        // megabyte, and the thread costs one wake-up.
        if idle && p.bytes.len() <= DIRECT_WRITE_MAX {
            // Nothing queued ahead of us: try the socket directly and save the writer thread's wake-up
            // (most of a small message's latency). Non-blocking, so a full send buffer (a peer not
            // reading) still never blocks the caller; the rest goes to the thread.
            let sent = send_nonblocking(&self.stream, &p.bytes);
            p.bytes.drain(..sent);
            if p.bytes.is_empty() {
                return Ok(());
            }
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The writer thread's panic, once it died of one.
    pub fn panicked(&self) -> Option<Error> {
        let p = self.shared.pending.lock();
        if p.panicked { p.error.clone() } else { None }
    }

    /// Writes what is queued (waiting at most `linger`), then closes the stream and joins the thread.
    pub fn finish(&self, linger: Duration) {
        let deadline = Instant::now() + linger;
        {
            let mut p = self.shared.pending.lock();
            p.closing = true;
            self.shared.changed.notify_all();
            while (p.writing || !p.bytes.is_empty()) && p.error.is_none() {
                if self.shared.changed.wait_until(&mut p, deadline).timed_out() {
                    break;
                }
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// Writes what the socket takes without blocking; errors are left for the writer thread to report.
fn send_nonblocking(stream: &TcpStream, mut bytes: &[u8]) -> usize {
    let mut sent = 0;
    while !bytes.is_empty() {
        // SAFETY: a valid socket and a valid buffer; MSG_NOSIGNAL keeps a closed peer from raising
        // SIGPIPE in a host process that did not ignore it.
        let n = unsafe {
            libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n <= 0 {
            break;
        }
        sent += n as usize;
        bytes = &bytes[n as usize..];
    }
    sent
}

fn run(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut batch = Vec::new();
    loop {
        {
            let mut p = shared.pending.lock();
            p.writing = false;
            shared.changed.notify_all();
            while p.bytes.is_empty() && !p.closing {
                shared.changed.wait(&mut p);
            }
            if p.bytes.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut p.bytes);
            p.writing = true;
        }
        threads::point(ThreadKind::ControlWriter);
        let written = stream.write_all(&batch);
        batch.clear();
        if let Err(e) = written {
            let mut p = shared.pending.lock();
            p.error = Some(Error::io("control stream write", e));
            p.writing = false;
            shared.changed.notify_all();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A peer that never reads gets the connection failed once the queue passes its bound, instead
    /// of our memory growing with every answer we owe it.
    #[test]
    fn a_peer_that_never_reads_is_cut_off_at_the_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_silent, _) = listener.accept().unwrap();
        let writer = ControlWriter::start(ours).unwrap();
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
}
