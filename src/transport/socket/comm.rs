//! Socket comms. Each message on the stream is an 8-byte little-endian length followed by the
//! payload; the receiver refuses a length larger than the posted buffer. Requests complete strictly
//! in posting order, so completion is a counter and per-slot sizes, read without locks by `test`.

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::Wake;
use crate::error::{Error, Result};
use crate::transport::{MemKind, MrHandle, RecvComm, RequestId, SendComm};

/// Outstanding requests per comm, the same bound TCPX imposes.
pub(crate) const MAX_REQUESTS: usize = 16;

#[derive(Clone, Copy)]
struct Work {
    addr: usize,
    len: usize,
}

#[derive(Default)]
struct Queue {
    work: VecDeque<Work>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Requests finished so far; request `i` is done when `completed > i`.
    completed: AtomicU64,
    sizes: [AtomicU64; MAX_REQUESTS],
    failure: Mutex<Option<Error>>,
    /// Set with `failure`, so that polling a healthy comm takes no lock.
    failed: AtomicBool,
    wake: Wake,
}

impl Shared {
    fn new(wake: Wake) -> Arc<Shared> {
        Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            completed: AtomicU64::new(0),
            sizes: Default::default(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            wake,
        })
    }

    fn next_work(&self) -> Option<Work> {
        let mut q = self.queue.lock();
        loop {
            if q.closing {
                return None;
            }
            if let Some(w) = q.work.pop_front() {
                return Some(w);
            }
            self.ready.wait(&mut q);
        }
    }

    fn complete(&self, index: u64, size: usize) {
        self.sizes[index as usize % MAX_REQUESTS].store(size as u64, Ordering::Relaxed);
        self.completed.store(index + 1, Ordering::Release);
        (self.wake)();
    }

    fn fail(&self, err: Error) {
        self.failure.lock().get_or_insert(err);
        self.failed.store(true, Ordering::Release);
        (self.wake)();
    }

    fn check(&self) -> Result<()> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.failure.lock() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// The part both comm kinds share: the helper thread, its queue and the request window.
struct CommCore {
    stream: TcpStream,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    posted: u64,
    /// Requests whose slot was given back (send: tested done; receive: consumed).
    released: u64,
    tested: u64,
}

impl CommCore {
    fn start(stream: TcpStream, wake: Wake, name: &str, run: fn(TcpStream, Arc<Shared>)) -> Result<CommCore> {
        let shared = Shared::new(wake);
        let io_stream = stream.try_clone().map_err(|e| Error::io("clone channel stream", e))?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(io_stream, thread_shared))
            .map_err(|e| Error::io("spawn channel thread", e))?;
        Ok(CommCore { stream, shared, thread: Some(thread), posted: 0, released: 0, tested: 0 })
    }

    fn post(&mut self, addr: usize, len: usize) -> Result<Option<RequestId>> {
        self.shared.check()?;
        if self.posted - self.released >= MAX_REQUESTS as u64 {
            return Ok(None);
        }
        self.shared.queue.lock().work.push_back(Work { addr, len });
        self.shared.ready.notify_one();
        let id = self.posted;
        self.posted += 1;
        Ok(Some(RequestId(id)))
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        if req.0 != self.tested || req.0 >= self.posted {
            return Err(Error::backend(format!(
                "test of request {} out of order: the oldest untested request is {}",
                req.0, self.tested
            )));
        }
        if self.shared.completed.load(Ordering::Acquire) > req.0 {
            self.tested += 1;
            return Ok(Some(self.shared.sizes[req.0 as usize % MAX_REQUESTS].load(Ordering::Relaxed) as usize));
        }
        self.shared.check()?;
        Ok(None)
    }
}

impl Drop for CommCore {
    fn drop(&mut self) {
        self.shared.queue.lock().closing = true;
        self.shared.ready.notify_all();
        // Unblocks a helper thread stuck in read/write so that it stops touching caller memory before
        // the drop returns.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct SocketSendComm(CommCore);

impl SocketSendComm {
    pub fn new(stream: TcpStream, wake: Wake) -> Result<SocketSendComm> {
        Ok(SocketSendComm(CommCore::start(stream, wake, "uccl-sock-tx", run_sender)?))
    }
}

impl SendComm for SocketSendComm {
    fn reg_mr(&mut self, _addr: usize, _len: usize, kind: MemKind) -> Result<MrHandle> {
        host_only(kind)
    }
    fn dereg_mr(&mut self, _mr: MrHandle) {}

    unsafe fn isend(&mut self, data: *const u8, len: usize, _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(data as usize, len)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        let done = self.0.test(req)?;
        if done.is_some() {
            self.0.released += 1;
        }
        Ok(done)
    }
}

pub struct SocketRecvComm(CommCore);

impl SocketRecvComm {
    pub fn new(stream: TcpStream, wake: Wake) -> Result<SocketRecvComm> {
        Ok(SocketRecvComm(CommCore::start(stream, wake, "uccl-sock-rx", run_receiver)?))
    }
}

impl RecvComm for SocketRecvComm {
    fn reg_mr(&mut self, _addr: usize, _len: usize, kind: MemKind) -> Result<MrHandle> {
        host_only(kind)
    }
    fn dereg_mr(&mut self, _mr: MrHandle) {}

    unsafe fn irecv(&mut self, data: *mut u8, len: usize, _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(data as usize, len)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.0.test(req)
    }

    fn irecv_consumed(&mut self, req: RequestId) -> Result<()> {
        if req.0 != self.0.released || req.0 >= self.0.tested {
            return Err(Error::backend(format!(
                "irecv_consumed of request {} out of order: next to consume is {}, {} completed",
                req.0, self.0.released, self.0.tested
            )));
        }
        self.0.released += 1;
        Ok(())
    }
}

fn host_only(kind: MemKind) -> Result<MrHandle> {
    match kind {
        MemKind::Host => Ok(MrHandle::NONE),
        MemKind::Cuda { .. } => Err(Error::new(
            crate::error::UcclStatus::ErrNotSupported,
            "the socket transport moves host memory only; GPU buffers need staging",
        )),
    }
}

fn run_sender(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut index = 0u64;
    while let Some(w) = shared.next_work() {
        // SAFETY: isend's contract keeps [addr, addr+len) valid until completion or comm drop, and
        // the drop joins this thread first.
        let payload = unsafe { std::slice::from_raw_parts(w.addr as *const u8, w.len) };
        let header = (w.len as u64).to_le_bytes();
        if let Err(e) = write_all_vectored(&mut stream, &header, payload) {
            return shared.fail(Error::io("channel send", e));
        }
        shared.complete(index, w.len);
        index += 1;
    }
}

fn run_receiver(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut index = 0u64;
    while let Some(w) = shared.next_work() {
        let mut header = [0u8; 8];
        if let Err(e) = stream.read_exact(&mut header) {
            return shared.fail(Error::io("channel receive", e));
        }
        let size = u64::from_le_bytes(header);
        if size > w.len as u64 {
            return shared
                .fail(Error::backend(format!("peer sent a {size}-byte message into a {}-byte receive", w.len)));
        }
        // SAFETY: irecv's contract gives this thread exclusive use of [addr, addr+len) until
        // completion or comm drop, and the drop joins this thread first; size <= len.
        let buf = unsafe { std::slice::from_raw_parts_mut(w.addr as *mut u8, size as usize) };
        if let Err(e) = stream.read_exact(buf) {
            return shared.fail(Error::io("channel receive", e));
        }
        shared.complete(index, size as usize);
        index += 1;
    }
}

/// One syscall for header and payload in the common case, so a small message is one TCP segment.
fn write_all_vectored(stream: &mut TcpStream, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let total = header.len() + payload.len();
    let mut written = 0;
    while written < total {
        let n = match if written < header.len() {
            stream.write_vectored(&[IoSlice::new(&header[written..]), IoSlice::new(payload)])
        } else {
            stream.write(&payload[written - header.len()..])
        } {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}
