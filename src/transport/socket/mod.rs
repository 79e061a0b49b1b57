//! Built-in TCP transport in the shape of NCCL's socket transport: each comm opens several data
//! sockets, served by helper threads the net shares among all of its comms. A request is cut into
//! pieces that free sockets pull in order (dynamic load balancing, as Google's Fast Socket does),
//! each piece carries a header with its request number and offset, and the receiver lands it
//! straight in the posted buffer. Completions are flags the engine polls, plus a wake callback so
//! an idle progress thread can sleep.

mod comm;
pub(crate) mod epoll;
pub mod iface;
mod iov;
mod reactor;
mod receiver;
mod sender;
mod window;
mod wire;
mod zerocopy;

pub use zerocopy::ZeroCopyStats;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use super::{ListenComm, Net, NetHandle, Properties, RecvComm, SendComm, Wake};
use crate::error::{Error, Result};

use crate::config::{MAX_SOCKETS_PER_COMM, SocketConfig};
use comm::{Helpers, Threading};
use window::MAX_REQUESTS;
use wire::{HELLO_LEN, SocketHello};

const HANDLE_MAGIC: u32 = 0x4B53_5455;

pub struct SocketNet {
    ip: IpAddr,
    /// Where channel listeners bind: the engine's configured address, else every interface.
    bind: IpAddr,
    connect_timeout: Duration,
    /// Unacknowledged data older than this fails the stream (TCP_USER_TIMEOUT).
    io_timeout: Duration,
    wake: Wake,
    options: SocketConfig,
    zerocopy: Arc<zerocopy::Counters>,
    /// Sender and receiver threads every comm of this net shares.
    helpers: Arc<Helpers>,
}

impl SocketNet {
    pub fn new(ip: IpAddr, connect_timeout: Duration, io_timeout: Duration, wake: Wake) -> SocketNet {
        let zerocopy = Arc::default();
        let bind = if ip.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() };
        let options = SocketConfig::default();
        let helpers = Arc::new(Helpers::new(options.helpers_per_direction(), options.spin));
        SocketNet { ip, bind, connect_timeout, io_timeout, wake, options, zerocopy, helpers }
    }

    /// Channel listeners accept on `bind` alone (by default every interface of `ip`'s family), so an
    /// operator who names the engine's address or interface gets no data port anywhere else.
    pub fn with_bind(mut self, bind: IpAddr) -> SocketNet {
        self.bind = bind;
        self
    }

    /// What the zero-copy path did so far, over every send comm this net connected.
    pub fn zerocopy_stats(&self) -> ZeroCopyStats {
        self.zerocopy.snapshot()
    }

    #[cfg(test)]
    fn zerocopy_counters(&self) -> &zerocopy::Counters {
        &self.zerocopy
    }

    /// Socket counts, buffer sizes and thread tuning (`Config::socket`).
    pub fn with_options(mut self, options: SocketConfig) -> SocketNet {
        // No comm exists yet, so no helper runs: the new pools take their place.
        self.helpers = Arc::new(Helpers::new(options.helpers_per_direction(), options.spin));
        self.options = options;
        self
    }

    /// Helper threads running now, senders and receivers.
    #[cfg(test)]
    fn helper_threads(&self) -> usize {
        self.helpers.threads()
    }

    fn threading(&self) -> Threading {
        Threading {
            subchunk: self.options.subchunk as usize,
            zerocopy_threshold: self.options.zerocopy_threshold as usize,
        }
    }

    fn set_buffers(&self, sock: SockRef<'_>) -> Result<()> {
        let io = |e| Error::io("set data socket buffer size", e);
        if self.options.sndbuf > 0 {
            sock.set_send_buffer_size(self.options.sndbuf as usize).map_err(io)?;
        }
        if self.options.rcvbuf > 0 {
            sock.set_recv_buffer_size(self.options.rcvbuf as usize).map_err(io)?;
        }
        Ok(())
    }

    fn connect_one(&self, h: &SocketHandle, hello: &SocketHello) -> Result<TcpStream> {
        let ctx = || format!("connect channel to {}", h.addr);
        let sock = socket2::Socket::new(socket2::Domain::for_address(h.addr), socket2::Type::STREAM, None)
            .map_err(|e| Error::io(ctx(), e))?;
        // Buffer sizes must be set before connecting for the window scale to account for them.
        self.set_buffers(SockRef::from(&sock))?;
        sock.connect_timeout(&h.addr.into(), self.connect_timeout).map_err(|e| Error::io(ctx(), e))?;
        let mut stream = TcpStream::from(sock);
        tune_stream(&stream, self.io_timeout)?;
        stream.write_all(&hello.encode()).map_err(|e| Error::io(ctx(), e))?;
        Ok(stream)
    }
}

/// What a socket listen handle carries: where to connect and a nonce that proves the connector read
/// this handle (so a stray connection to the port is not taken for a channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketHandle {
    addr: SocketAddr,
    nonce: u64,
}

impl SocketHandle {
    fn encode(&self) -> NetHandle {
        let mut h = [0u8; crate::proto::NET_HANDLE_SIZE];
        h[0..4].copy_from_slice(&HANDLE_MAGIC.to_le_bytes());
        h[6..8].copy_from_slice(&self.addr.port().to_le_bytes());
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                h[4] = 4;
                h[8..12].copy_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                h[4] = 6;
                h[8..24].copy_from_slice(&ip.octets());
            }
        }
        h[24..32].copy_from_slice(&self.nonce.to_le_bytes());
        h
    }

    fn decode(h: &NetHandle) -> Result<SocketHandle> {
        let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        if le32(&h[0..4]) != HANDLE_MAGIC {
            return Err(Error::invalid("socket transport handle has a bad magic: not produced by this transport"));
        }
        let port = u16::from_le_bytes([h[6], h[7]]);
        let ip = match h[4] {
            4 => IpAddr::from(<[u8; 4]>::try_from(&h[8..12]).expect("4 bytes")),
            6 => IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).expect("16 bytes")),
            other => return Err(Error::invalid(format!("socket transport handle has address family {other}"))),
        };
        if port == 0 || ip.is_unspecified() {
            return Err(Error::invalid("socket transport handle has no usable address"));
        }
        let nonce = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
        Ok(SocketHandle { addr: SocketAddr::new(ip, port), nonce })
    }
}

/// Settings shared by control and data streams: no Nagle delay on small frames; keepalive and a user
/// timeout so that a vanished host (no RST ever arrives) turns into an error instead of a hang.
pub fn tune_stream(stream: &TcpStream, io_timeout: Duration) -> Result<()> {
    let sock = SockRef::from(stream);
    let probe = (io_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let ka = TcpKeepalive::new().with_time(probe).with_interval(probe).with_retries(3);
    sock.set_tcp_nodelay(true)
        .and_then(|_| sock.set_tcp_keepalive(&ka))
        .and_then(|_| sock.set_tcp_user_timeout(Some(io_timeout)))
        .map_err(|e| Error::io("configure TCP stream", e))
}

/// Pending connections the control listener queues before the accept loop takes them: std's 128
/// overflowed under bursts of 200 connecting peers (a legitimate connect once reset), while the
/// engine serves up to 1024 handshakes at once. The kernel caps it at `net.core.somaxconn`.
pub(crate) const CONTROL_BACKLOG: i32 = 4096;

/// The engine's control listener on `addr`, with a backlog sized for bursts of connecting peers.
pub fn control_listener(addr: SocketAddr) -> Result<TcpListener> {
    let ctx = |e| Error::io(format!("listen on {addr}"), e);
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(ctx)?;
    // As std's bind does: a restarted engine can take its fixed port back while old connections linger.
    sock.set_reuse_address(true).map_err(ctx)?;
    sock.bind(&addr.into()).map_err(ctx)?;
    sock.listen(CONTROL_BACKLOG).map_err(ctx)?;
    Ok(TcpListener::from(sock))
}

pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n != 8 {
        // getrandom only fails on ancient kernels; a time-derived value still keeps nonces distinct.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ (std::process::id() as u64) << 32;
    }
    u64::from_le_bytes(v)
}

impl Net for SocketNet {
    fn name(&self) -> &'static str {
        "socket"
    }

    fn devices(&self) -> usize {
        1
    }

    /// Pieces go out with `sendmsg` and land with `recvmsg`, so a request may as well be a list.
    fn vectored(&self) -> bool {
        true
    }

    fn properties(&self, dev: usize) -> Result<Properties> {
        if dev != 0 {
            return Err(Error::invalid(format!("socket transport has one device, not device {dev}")));
        }
        Ok(Properties {
            name: self.ip.to_string(),
            pci_path: None,
            supports_host: true,
            supports_cuda: false,
            speed_mbps: 0,
            device_unpack: false,
            max_requests: MAX_REQUESTS,
        })
    }

    fn listen(&self, dev: usize) -> Result<(NetHandle, Box<dyn ListenComm>)> {
        self.properties(dev)?;
        let bind = SocketAddr::new(self.bind, 0);
        let sock = socket2::Socket::new(socket2::Domain::for_address(bind), socket2::Type::STREAM, None)
            .map_err(|e| Error::io("channel listener", e))?;
        // Accepted sockets inherit buffer sizes from the listener, in time for the handshake.
        self.set_buffers(SockRef::from(&sock))?;
        sock.bind(&bind.into()).map_err(|e| Error::io("bind channel listener", e))?;
        sock.listen(MAX_PENDING_STREAMS as i32).map_err(|e| Error::io("listen for channels", e))?;
        let listener = TcpListener::from(sock);
        listener.set_nonblocking(true).map_err(|e| Error::io("channel listener", e))?;
        let port = listener.local_addr().map_err(|e| Error::io("channel listener", e))?.port();
        let handle = SocketHandle { addr: SocketAddr::new(self.ip, port), nonce: random_u64() };
        let listen = SocketListen {
            listener,
            nonce: handle.nonce,
            timeout: self.connect_timeout,
            io_timeout: self.io_timeout,
            wake: self.wake.clone(),
            threading: self.threading(),
            helpers: self.helpers.clone(),
            pending: Vec::new(),
            groups: Vec::new(),
        };
        Ok((handle.encode(), Box::new(listen)))
    }

    fn handle_address(&self, handle: &NetHandle) -> Option<IpAddr> {
        SocketHandle::decode(handle).ok().map(|h| h.addr.ip())
    }

    fn set_handle_address(&self, handle: &mut NetHandle, ip: IpAddr) -> Result<()> {
        let mut h = SocketHandle::decode(handle)?;
        h.addr.set_ip(ip);
        *handle = h.encode();
        Ok(())
    }

    fn connect(&self, dev: usize, handle: &mut NetHandle) -> Result<Option<Box<dyn SendComm>>> {
        self.properties(dev)?;
        let h = SocketHandle::decode(handle)?;
        let count = self.options.sockets_per_comm();
        let comm_id = random_u64();
        let mut streams = Vec::with_capacity(count);
        for index in 0..count {
            let hello = SocketHello {
                listen_nonce: h.nonce,
                comm_id,
                index: index as u8,
                count: count as u8,
                subchunk: self.options.subchunk,
            };
            streams.push(self.connect_one(&h, &hello)?);
        }
        let send = comm::SocketSendComm::new(
            streams,
            self.wake.clone(),
            self.threading(),
            self.helpers.clone(),
            self.zerocopy.clone(),
        )?;
        Ok(Some(Box::new(send)))
    }
}

struct SocketListen {
    listener: TcpListener,
    nonce: u64,
    timeout: Duration,
    io_timeout: Duration,
    wake: Wake,
    threading: Threading,
    helpers: Arc<Helpers>,
    /// Accepted streams whose hello has not fully arrived; read without blocking so that a silent
    /// stranger cannot hold up the real connections queued behind it.
    pending: Vec<PendingStream>,
    /// Comms some of whose sockets arrived, waiting for the rest.
    groups: Vec<SocketGroup>,
}

struct PendingStream {
    stream: TcpStream,
    peer: SocketAddr,
    hello: [u8; HELLO_LEN],
    got: usize,
    since: std::time::Instant,
}

struct SocketGroup {
    comm_id: u64,
    subchunk: u32,
    streams: Vec<Option<TcpStream>>,
    arrived: usize,
    since: std::time::Instant,
}

/// Streams held at once (waiting for a hello, or for the rest of their comm); more wait in the
/// kernel's backlog until some finish or time out.
const MAX_PENDING_STREAMS: usize = 256;

impl SocketListen {
    fn held_streams(&self) -> usize {
        self.pending.len() + self.groups.iter().map(|g| g.arrived).sum::<usize>()
    }

    fn take_new_streams(&mut self) -> Result<()> {
        while self.held_streams() < MAX_PENDING_STREAMS {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::io("accept channel", e)),
            };
            stream.set_nonblocking(true).map_err(|e| Error::io(format!("accept channel from {peer}"), e))?;
            self.pending.push(PendingStream {
                stream,
                peer,
                hello: [0; HELLO_LEN],
                got: 0,
                since: std::time::Instant::now(),
            });
        }
        Ok(())
    }

    /// Reads what has arrived of a pending hello: Some(true) complete, Some(false) to drop.
    fn poll_hello(p: &mut PendingStream, timeout: Duration) -> Option<bool> {
        loop {
            match p.stream.read(&mut p.hello[p.got..]) {
                Ok(0) => return Some(false),
                Ok(n) => {
                    p.got += n;
                    if p.got == p.hello.len() {
                        return Some(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return (p.since.elapsed() > timeout).then_some(false);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Some(false),
            }
        }
    }
}

impl SocketListen {
    /// Files a socket under its comm; returns the comm's sockets once all of them arrived.
    fn file(&mut self, hello: SocketHello, stream: TcpStream, peer: SocketAddr) -> Option<SocketGroup> {
        let pos = match self.groups.iter().position(|g| g.comm_id == hello.comm_id) {
            Some(pos) => pos,
            None => {
                self.groups.push(SocketGroup {
                    comm_id: hello.comm_id,
                    subchunk: hello.subchunk,
                    streams: (0..hello.count).map(|_| None).collect(),
                    arrived: 0,
                    since: std::time::Instant::now(),
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[pos];
        let fits = g.streams.len() == hello.count as usize && g.subchunk == hello.subchunk;
        if !fits || g.streams[hello.index as usize].is_some() {
            log::warn!("dropping a data socket from {peer} that contradicts the other sockets of its comm");
            return None;
        }
        g.streams[hello.index as usize] = Some(stream);
        g.arrived += 1;
        (g.arrived == g.streams.len()).then(|| self.groups.swap_remove(pos))
    }
}

impl ListenComm for SocketListen {
    fn accept(&mut self) -> Result<Option<Box<dyn RecvComm>>> {
        self.take_new_streams()?;
        let timeout = self.timeout;
        self.groups.retain(|g| {
            let alive = g.since.elapsed() <= timeout;
            if !alive {
                log::warn!(
                    "dropping a channel whose {} of {} data sockets arrived in time",
                    g.arrived,
                    g.streams.len()
                );
            }
            alive
        });
        let mut i = 0;
        while i < self.pending.len() {
            match Self::poll_hello(&mut self.pending[i], timeout) {
                None => i += 1,
                Some(false) => {
                    let p = self.pending.swap_remove(i);
                    log::warn!("ignoring a connection from {} that sent no hello", p.peer);
                }
                Some(true) => {
                    let p = self.pending.swap_remove(i);
                    let hello = match SocketHello::decode(&p.hello, self.nonce) {
                        Ok(h) => h,
                        Err(e) => {
                            log::warn!("ignoring a connection from {}: {e}", p.peer);
                            continue;
                        }
                    };
                    tune_stream(&p.stream, self.io_timeout)?;
                    if let Some(group) = self.file(hello, p.stream, p.peer) {
                        debug_assert!(group.streams.len() <= MAX_SOCKETS_PER_COMM);
                        let streams: Vec<TcpStream> = group.streams.into_iter().flatten().collect();
                        let threading = Threading { subchunk: group.subchunk as usize, ..self.threading };
                        let recv =
                            comm::SocketRecvComm::new(streams, self.wake.clone(), threading, self.helpers.clone())?;
                        return Ok(Some(Box::new(recv)));
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
