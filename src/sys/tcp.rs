//! What every TCP stream of an engine takes (control and data): no Nagle delay, keepalive and a
//! user timeout; and the engine's control listener.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::error::{Error, Result};

/// Settings shared by control and data streams: no Nagle delay on small frames; keepalive and a user
/// timeout so that a vanished host (no RST ever arrives) turns into an error instead of a hang.
pub fn tune_stream(stream: &TcpStream, io_timeout: Duration) -> Result<()> {
    tune(SockRef::from(stream), io_timeout)
}

pub fn tune(sock: SockRef<'_>, io_timeout: Duration) -> Result<()> {
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
pub const CONTROL_BACKLOG: i32 = 4096;

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

/// The kernel's view of the TCP connection of `fd`, and how many of its bytes the kernel filled
/// in (older kernels report fewer fields); `None` where it gives none.
pub fn info(fd: std::os::fd::RawFd) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: tcp_info is plain data, valid all zero.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a buffer of the length given; a descriptor that is not an open socket only fails.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    (rc == 0).then_some((info, len as usize))
}

/// Bytes `fd` holds in the kernel that its peer has not acknowledged, sent or not (SIOCOUTQ); 0
/// where the kernel does not say.
pub fn unacked_bytes(fd: std::os::fd::RawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int; a descriptor that is not an open socket only fails.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut n) };
    if rc == 0 { n.max(0) as u64 } else { 0 }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::*;

    /// A burst of connecting peers waits in the control listener's queue rather than being dropped:
    /// nothing accepts here, so every connect beyond the backlog would stay unanswered (std's 128).
    #[test]
    fn control_listener_queues_a_burst_of_six_hundred_connects() {
        let somaxconn: i32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
        let burst = 600.min(somaxconn as usize - 1);
        assert!(burst > 200, "net.core.somaxconn {somaxconn} caps every backlog: this host cannot tell");
        let listener = control_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let streams: Vec<TcpStream> = (0..burst)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .unwrap_or_else(|e| panic!("connect {i} of {burst} in the burst: {e}"))
            })
            .collect();
        eprintln!("{} connects queued in {:?}", streams.len(), started.elapsed());
        drop(listener);
    }
}
