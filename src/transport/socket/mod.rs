//! Built-in TCP transport: one TCP stream per comm, a helper thread per comm doing blocking I/O
//! straight from and into the caller's buffers, completions reported through counters the engine
//! polls, and a wake callback so an idle progress thread can sleep instead of spinning.

mod comm;
pub mod iface;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use super::{ListenComm, Net, NetHandle, Properties, RecvComm, SendComm};
use crate::error::{Error, Result};

use comm::MAX_REQUESTS;

/// Called by helper threads whenever a request completes or a comm fails.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

const HANDLE_MAGIC: u32 = 0x4B53_5455;
const STREAM_HELLO_MAGIC: u32 = 0x5353_5455;

pub struct SocketNet {
    ip: IpAddr,
    connect_timeout: Duration,
    /// Unacknowledged data older than this fails the stream (TCP_USER_TIMEOUT).
    io_timeout: Duration,
    wake: Wake,
}

impl SocketNet {
    pub fn new(ip: IpAddr, connect_timeout: Duration, io_timeout: Duration, wake: Wake) -> SocketNet {
        SocketNet { ip, connect_timeout, io_timeout, wake }
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

fn stream_hello(nonce: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&STREAM_HELLO_MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&nonce.to_le_bytes());
    b
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
        let bind = SocketAddr::new(if self.ip.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() }, 0);
        let listener = TcpListener::bind(bind).map_err(|e| Error::io("bind channel listener", e))?;
        listener.set_nonblocking(true).map_err(|e| Error::io("channel listener", e))?;
        let port = listener.local_addr().map_err(|e| Error::io("channel listener", e))?.port();
        let handle = SocketHandle { addr: SocketAddr::new(self.ip, port), nonce: random_u64() };
        let listen = SocketListen {
            listener,
            nonce: handle.nonce,
            timeout: self.connect_timeout,
            io_timeout: self.io_timeout,
            wake: self.wake.clone(),
            pending: Vec::new(),
        };
        Ok((handle.encode(), Box::new(listen)))
    }

    fn connect(&self, dev: usize, handle: &mut NetHandle) -> Result<Option<Box<dyn SendComm>>> {
        self.properties(dev)?;
        let h = SocketHandle::decode(handle)?;
        let ctx = || format!("connect channel to {}", h.addr);
        let mut stream = TcpStream::connect_timeout(&h.addr, self.connect_timeout).map_err(|e| Error::io(ctx(), e))?;
        tune_stream(&stream, self.io_timeout)?;
        stream.write_all(&stream_hello(h.nonce)).map_err(|e| Error::io(ctx(), e))?;
        Ok(Some(Box::new(comm::SocketSendComm::new(stream, self.wake.clone())?)))
    }
}

struct SocketListen {
    listener: TcpListener,
    nonce: u64,
    timeout: Duration,
    io_timeout: Duration,
    wake: Wake,
    /// Accepted streams whose 12-byte hello has not fully arrived; read without blocking so that a
    /// silent stranger cannot hold up the real connections queued behind it.
    pending: Vec<PendingStream>,
}

struct PendingStream {
    stream: TcpStream,
    peer: SocketAddr,
    hello: [u8; 12],
    got: usize,
    since: std::time::Instant,
}

/// Streams waiting for their hello at once; more are refused until some finish or time out.
const MAX_PENDING_STREAMS: usize = 256;

impl SocketListen {
    fn take_new_streams(&mut self) -> Result<()> {
        while self.pending.len() < MAX_PENDING_STREAMS {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Error::io("accept channel", e)),
            };
            stream.set_nonblocking(true).map_err(|e| Error::io(format!("accept channel from {peer}"), e))?;
            self.pending.push(PendingStream { stream, peer, hello: [0; 12], got: 0, since: std::time::Instant::now() });
        }
        Ok(())
    }

    /// Reads what has arrived of a pending hello: Some(true) complete and valid, Some(false) to drop.
    fn poll_hello(p: &mut PendingStream, expected: &[u8; 12], timeout: Duration) -> Option<bool> {
        loop {
            match p.stream.read(&mut p.hello[p.got..]) {
                Ok(0) => return Some(false),
                Ok(n) => {
                    p.got += n;
                    if p.got == p.hello.len() {
                        return Some(&p.hello == expected);
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

impl ListenComm for SocketListen {
    fn accept(&mut self) -> Result<Option<Box<dyn RecvComm>>> {
        self.take_new_streams()?;
        let expected = stream_hello(self.nonce);
        let mut i = 0;
        while i < self.pending.len() {
            match Self::poll_hello(&mut self.pending[i], &expected, self.timeout) {
                None => i += 1,
                Some(false) => {
                    let p = self.pending.swap_remove(i);
                    log::warn!("ignoring a connection from {} that does not carry this listener's nonce", p.peer);
                }
                Some(true) => {
                    let p = self.pending.swap_remove(i);
                    let io = |e| Error::io(format!("accept channel from {}", p.peer), e);
                    p.stream.set_nonblocking(false).map_err(io)?;
                    tune_stream(&p.stream, self.io_timeout)?;
                    return Ok(Some(Box::new(comm::SocketRecvComm::new(p.stream, self.wake.clone())?)));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
