//! Socket comms: a request window and the comm's data sockets, each socket served by one of the
//! net's shared helper threads. Requests are numbered in posting order; `test` reads a completion
//! flag without locking.

use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use super::reactor::{Placement, Pool};
use super::receiver::{RecvSockets, RecvTask};
use super::sender::{INLINE_MAX, Inline, SendSockets, SendTask};
use super::window::{MAX_REQUESTS, Window};
use super::wire::PieceCut;
use super::zerocopy::{self, Counters};
use crate::error::{Error, Result};
use crate::threads::ThreadKind;
use crate::transport::Wake;
use crate::transport::{IoSeg, MemKind, MrHandle, RecvComm, RequestId, SendComm};

/// How a comm moves its pieces.
#[derive(Clone, Copy, Debug)]
pub struct Threading {
    pub subchunk: usize,
    /// Send comms: pieces of at least this many bytes go out with MSG_ZEROCOPY; 0 = never.
    pub zerocopy_threshold: usize,
}

/// The helper threads of one net: senders and receivers, each pool at most `helpers` threads.
/// Every comm holds them, so they outlive the last comm even if the net goes first.
pub struct Helpers {
    send: Pool<SendTask>,
    recv: Pool<RecvTask>,
}

impl Helpers {
    pub fn new(helpers: usize, spin: Duration) -> Helpers {
        Helpers {
            send: Pool::new(ThreadKind::SocketSender, "uccl-sock-tx", helpers, spin),
            recv: Pool::new(ThreadKind::SocketReceiver, "uccl-sock-rx", helpers, spin),
        }
    }

    /// Helper threads running now, senders and receivers.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.send.threads() + self.recv.threads()
    }
}

enum Side {
    Send(Arc<SendSockets>, Vec<Placement<SendTask>>),
    Recv(Arc<RecvSockets>, Vec<Placement<RecvTask>>),
}

/// What both comm kinds share: the window, the sockets' placements, and the caller's view of the
/// requests.
struct CommCore {
    window: Arc<Window>,
    side: Side,
    inline_max: usize,
    helpers: Arc<Helpers>,
    posted: u64,
    /// Requests whose slot was given back (send: tested done; receive: consumed).
    released: u64,
    tested: u64,
}

impl CommCore {
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
        let alone = self.window.post(id, iov);
        match &self.side {
            Side::Send(shared, placements) => {
                let inline = if alone && len <= self.inline_max { shared.send_inline() } else { Inline::NoSocket };
                match inline {
                    Inline::Done => {}
                    Inline::HandedOver(k) => placements[k].kick(),
                    Inline::NoSocket => {
                        // As many idle sockets as the request has pieces; busy ones pull the rest
                        // when they finish their piece.
                        let mut pieces = self.window.cut.pieces(len as u64);
                        for (k, p) in placements.iter().enumerate() {
                            if pieces == 0 {
                                break;
                            }
                            if shared.idle(k) {
                                p.kick();
                                pieces -= 1;
                            }
                        }
                    }
                }
            }
            Side::Recv(shared, placements) => {
                // Only a socket holding a header for this request waits for the post; the others
                // run when data comes.
                for (k, p) in placements.iter().enumerate() {
                    if shared.waits_for_post(k) {
                        p.kick();
                    }
                }
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
        // Tells the peer at once; the descriptors close once the helpers let go of them below.
        let streams = match &self.side {
            Side::Send(s, _) => &s.streams,
            Side::Recv(s, _) => &s.streams,
        };
        for s in streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Waiting for the helpers guarantees none touches caller memory after the drop returns.
        match &self.side {
            Side::Send(_, placements) => self.helpers.send.detach(placements),
            Side::Recv(_, placements) => self.helpers.recv.detach(placements),
        }
    }
}

pub struct SocketSendComm(CommCore);

impl SocketSendComm {
    pub fn new(
        streams: Vec<TcpStream>,
        wake: Wake,
        how: Threading,
        helpers: Arc<Helpers>,
        counters: Arc<Counters>,
    ) -> Result<SocketSendComm> {
        let zerocopy: Vec<bool> = if how.zerocopy_threshold > 0 {
            streams.iter().map(|s| zerocopy::enable(s.as_raw_fd(), &counters)).collect()
        } else {
            vec![false; streams.len()]
        };
        nonblocking(&streams)?;
        let n = streams.len();
        let window = Arc::new(Window::new(PieceCut::new(how.subchunk, n), wake));
        let shared = Arc::new(SendSockets::new(streams, window.clone(), zerocopy, how.zerocopy_threshold, counters));
        let placements = helpers.send.attach((0..n).map(|k| SendTask::new(shared.clone(), k)).collect())?;
        Ok(SocketSendComm(CommCore {
            window,
            side: Side::Send(shared, placements),
            inline_max: INLINE_MAX.min(how.subchunk),
            helpers,
            posted: 0,
            released: 0,
            tested: 0,
        }))
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
    pub fn new(streams: Vec<TcpStream>, wake: Wake, how: Threading, helpers: Arc<Helpers>) -> Result<SocketRecvComm> {
        nonblocking(&streams)?;
        let n = streams.len();
        let window = Arc::new(Window::new(PieceCut::new(how.subchunk, n), wake));
        let shared = Arc::new(RecvSockets::new(streams, window.clone()));
        let placements = helpers.recv.attach((0..n).map(|k| RecvTask::new(shared.clone(), k)).collect())?;
        Ok(SocketRecvComm(CommCore {
            window,
            side: Side::Recv(shared, placements),
            inline_max: 0,
            helpers,
            posted: 0,
            released: 0,
            tested: 0,
        }))
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

/// Helpers wait in epoll for many sockets at once, so no call on a data socket may block.
fn nonblocking(streams: &[TcpStream]) -> Result<()> {
    for s in streams {
        s.set_nonblocking(true).map_err(|e| Error::io("configure data socket", e))?;
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
