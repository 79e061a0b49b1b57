//! Socket comms: a request window shared with helper threads, each serving some of the comm's data
//! sockets. Requests are numbered in posting order; `test` reads a completion flag without locking.

use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::receiver::RecvThread;
use super::sender::{INLINE_MAX, MAX_SLEEP, SendSockets, SendThread};
use super::window::{MAX_REQUESTS, Window};
use super::zerocopy::{self, Counters};
use crate::error::{Error, Result};
use crate::threads::{ThreadKind, spawn_contained};
use crate::transport::Wake;
use crate::transport::{IoSeg, MemKind, MrHandle, RecvComm, RequestId, SendComm};

/// How a comm spreads its sockets over helper threads.
#[derive(Clone, Copy, Debug)]
pub struct Threading {
    pub threads: usize,
    pub subchunk: usize,
    pub spin: Duration,
    /// Send comms: pieces of at least this many bytes go out with MSG_ZEROCOPY; 0 = never.
    pub zerocopy_threshold: usize,
    /// Threads serving a single socket wait in blocking calls on it (see `blocking_mode`).
    pub blocking: bool,
}

/// What both comm kinds share: the threads, their window, and the caller's view of the requests.
struct CommCore {
    streams: Arc<[TcpStream]>,
    window: Arc<Window>,
    /// Send comms: socket claims shared with the helpers, for inline sends.
    send_sockets: Option<Arc<SendSockets>>,
    inline_max: usize,
    threads: Vec<JoinHandle<()>>,
    posted: u64,
    /// Requests whose slot was given back (send: tested done; receive: consumed).
    released: u64,
    tested: u64,
}

enum Role {
    Send(Arc<Counters>),
    Recv,
}

impl CommCore {
    fn start(streams: Vec<TcpStream>, wake: Wake, how: Threading, role: Role) -> Result<CommCore> {
        let threads = how.threads.clamp(1, streams.len().max(1));
        let zerocopy: Vec<bool> = match &role {
            Role::Send(counters) if how.zerocopy_threshold > 0 => {
                streams.iter().map(|s| zerocopy::enable(s.as_raw_fd(), counters)).collect()
            }
            _ => vec![false; streams.len()],
        };
        // Socket k goes to thread k % threads, NCCL's layout of nsocks_per_thread per thread.
        let layout: Vec<Vec<usize>> = (0..threads).map(|t| (t..streams.len()).step_by(threads).collect()).collect();
        let blocking: Vec<bool> = layout.iter().map(|s| how.blocking && s.len() == 1 && !zerocopy[s[0]]).collect();
        for (t, sockets) in layout.iter().enumerate() {
            for &k in sockets {
                blocking_mode(&streams[k], blocking[t]).map_err(|e| Error::io("configure data socket", e))?;
            }
        }
        let streams: Arc<[TcpStream]> = streams.into();
        let window = Arc::new(Window::new(how.subchunk, threads, wake)?);
        let send_sockets = matches!(role, Role::Send(_)).then(|| Arc::new(SendSockets::new(streams.clone(), threads)));
        let mut core = CommCore {
            streams: streams.clone(),
            window: window.clone(),
            send_sockets: send_sockets.clone(),
            inline_max: INLINE_MAX.min(how.subchunk),
            threads: Vec::new(),
            posted: 0,
            released: 0,
            tested: 0,
        };
        for (t, sockets) in layout.into_iter().enumerate() {
            let blocking = blocking[t];
            let (streams, window, send_sockets) = (streams.clone(), window.clone(), send_sockets.clone());
            // A dead helper fails its comm, which the progress thread sees at its next `test` and
            // the comm's other helpers within their sleep.
            let failing = window.clone();
            let spawned = match (send_sockets, &role) {
                (Some(shared), Role::Send(counters)) => {
                    // The kernel may still hold pages of caller buffers for zero-copy pieces this
                    // thread sent: reset those sockets when they close, as a failing helper does.
                    let zerocopy_sockets: Vec<usize> = sockets.iter().copied().filter(|&k| zerocopy[k]).collect();
                    let all = streams.clone();
                    let on_panic = move |err| {
                        for k in zerocopy_sockets {
                            let _ = socket2::SockRef::from(&all[k]).set_linger(Some(Duration::ZERO));
                        }
                        failing.fail(err);
                    };
                    let sender = SendThread {
                        index: t,
                        zerocopy: sockets.iter().map(|&k| zerocopy[k]).collect(),
                        sockets,
                        shared,
                        window,
                        spin: how.spin,
                        zerocopy_threshold: how.zerocopy_threshold,
                        counters: counters.clone(),
                        blocking,
                    };
                    spawn_contained(
                        std::thread::Builder::new().name(format!("uccl-sock-tx{t}")),
                        ThreadKind::SocketSender,
                        on_panic,
                        move || sender.run(),
                    )
                }
                _ => spawn_contained(
                    std::thread::Builder::new().name(format!("uccl-sock-rx{t}")),
                    ThreadKind::SocketReceiver,
                    move |err| failing.fail(err),
                    move || RecvThread { index: t, sockets, streams, window, spin: how.spin, blocking }.run(),
                ),
            };
            // On error the partly built core's drop stops the threads already started.
            core.threads.push(spawned.map_err(|e| Error::io("spawn channel thread", e))?);
        }
        Ok(core)
    }

    fn post(&mut self, iov: &[IoSeg]) -> Result<Option<RequestId>> {
        self.window.check()?;
        if iov.is_empty() {
            return Err(Error::invalid("a vectored request needs at least one segment"));
        }
        if self.posted - self.released >= MAX_REQUESTS as u64 {
            return Ok(None);
        }
        let id = self.posted;
        let len = iov.iter().map(|s| s.len).sum::<usize>();
        let inline = self.send_sockets.as_ref().filter(|_| len <= self.inline_max);
        if self.window.post(id, iov, inline.is_some()) {
            let sent = inline.is_some_and(|s| s.send_inline(&self.window));
            if !sent {
                self.window.wake_helpers();
            }
        }
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
        if let Some(size) = self.window.done(req.0) {
            self.tested += 1;
            return Ok(Some(size));
        }
        self.window.check()?;
        Ok(None)
    }
}

impl Drop for CommCore {
    fn drop(&mut self) {
        self.window.close();
        // Unblocks nothing (sockets are non-blocking) but tells the peer at once, and makes a thread
        // that is mid-poll see an event.
        for s in self.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Joining first guarantees no helper touches caller memory after the drop returns.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct SocketSendComm(CommCore);

impl SocketSendComm {
    pub fn new(streams: Vec<TcpStream>, wake: Wake, how: Threading, counters: Arc<Counters>) -> Result<SocketSendComm> {
        Ok(SocketSendComm(CommCore::start(streams, wake, how, Role::Send(counters))?))
    }
}

impl SendComm for SocketSendComm {
    fn reg_mr(&mut self, _addr: usize, _len: usize, kind: MemKind) -> Result<MrHandle> {
        host_only(kind)
    }
    fn dereg_mr(&mut self, _mr: MrHandle) {}

    unsafe fn isend(&mut self, data: *const u8, len: usize, _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(&[IoSeg { addr: data as usize, len }])
    }

    unsafe fn isendv(&mut self, iov: &[IoSeg], _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(iov)
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
    pub fn new(streams: Vec<TcpStream>, wake: Wake, how: Threading) -> Result<SocketRecvComm> {
        Ok(SocketRecvComm(CommCore::start(streams, wake, how, Role::Recv)?))
    }
}

impl RecvComm for SocketRecvComm {
    fn reg_mr(&mut self, _addr: usize, _len: usize, kind: MemKind) -> Result<MrHandle> {
        host_only(kind)
    }
    fn dereg_mr(&mut self, _mr: MrHandle) {}

    unsafe fn irecv(&mut self, data: *mut u8, len: usize, _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(&[IoSeg { addr: data as usize, len }])
    }

    unsafe fn irecvv(&mut self, iov: &[IoSeg], _mr: MrHandle) -> Result<Option<RequestId>> {
        self.0.post(iov)
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

/// A thread with one socket waits best inside the kernel: a blocking `recv` with `MSG_WAITALL`
/// returns once per piece instead of once per arriving segment, and a blocking `sendmsg` sleeps in
/// the socket's own memory wait, where `poll` + non-blocking calls cost two extra syscalls and a
/// wake-up per segment. The timeouts bound how long such a call can miss the comm closing (the
/// comm's drop shuts the sockets down, which ends the call at once). Every other call on a data
/// socket (inline sends, readiness checks, zero-copy completions) passes `MSG_DONTWAIT`.
fn blocking_mode(stream: &TcpStream, blocking: bool) -> std::io::Result<()> {
    stream.set_nonblocking(!blocking)?;
    if blocking {
        stream.set_read_timeout(Some(MAX_SLEEP))?;
        stream.set_write_timeout(Some(MAX_SLEEP))?;
    }
    Ok(())
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
