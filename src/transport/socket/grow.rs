//! A send comm's sockets after its first: opened without blocking when its traffic asks for them,
//! each finished by the helper that will serve it. An added socket connects, sends its hello (which
//! names the comm and the socket's index) and waits for the accepting side's acknowledgement; only
//! then does it pull pieces, so a socket the peer refused or never took carries nothing.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::SockRef;

use super::links::Routes;
use super::pure::wire::{ACK_LEN, HELLO_LEN, SocketHello, attach_ack};
use super::tune::set_buffers;
use crate::error::{Error, Result};
use crate::sys::tcp::tune;

/// Where and how a send comm opens its further sockets.
pub(super) struct Dialer {
    /// Where each socket goes: over the data links in turn, where both hosts have them.
    pub routes: Routes,
    /// The comm's hello; each socket sends it with its own index.
    pub hello: SocketHello,
    pub sndbuf: u32,
    pub rcvbuf: u32,
    pub io_timeout: Duration,
}

impl Dialer {
    /// Starts connecting socket `index` without waiting for it: the connect finishes on the helper
    /// that serves the socket ([`Joining`]), so a post never waits on the network.
    #[cfg(test)]
    pub fn start(&self, index: u8) -> Result<(TcpStream, Joining)> {
        self.start_as(index, index)
    }

    /// As [`start`](Self::start), over the link of socket `route_of` (a spare replacing it).
    pub fn start_as(&self, index: u8, route_of: u8) -> Result<(TcpStream, Joining)> {
        let route = self.routes.route(route_of);
        let ctx = || format!("connect channel socket {index} to {}", route.to);
        let sock = socket2::Socket::new(socket2::Domain::for_address(route.to), socket2::Type::STREAM, None)
            .map_err(|e| Error::io(ctx(), e))?;
        set_buffers(SockRef::from(&sock), self.sndbuf, self.rcvbuf)?;
        tune(SockRef::from(&sock), self.io_timeout)?;
        route.bind(&sock)?;
        sock.set_nonblocking(true).map_err(|e| Error::io(ctx(), e))?;
        match sock.connect(&route.to.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(Error::io(ctx(), e)),
        }
        let hello = SocketHello { index, ..self.hello }.encode();
        Ok((TcpStream::from(sock), Joining { hello, written: 0, ack: [0; ACK_LEN], got: 0, index }))
    }
}

/// How far an added socket got: connected once the kernel says so, then its hello out, then the
/// acknowledgement in.
pub(super) struct Joining {
    hello: [u8; HELLO_LEN],
    written: usize,
    ack: [u8; ACK_LEN],
    got: usize,
    index: u8,
}

impl Joining {
    /// Moves the socket on without blocking: `Ok(true)` once it may carry pieces, `Ok(false)`
    /// while it waits for the kernel or the peer (its helper runs it again on the next event); an
    /// error gives the socket up.
    pub fn advance(&mut self, stream: &TcpStream) -> std::io::Result<bool> {
        let fd = stream.as_raw_fd();
        if self.written == 0 && !connected(stream)? {
            return Ok(false);
        }
        while self.written < HELLO_LEN {
            let rest = &self.hello[self.written..];
            // SAFETY: `rest` is readable for its length. MSG_NOSIGNAL: a reset is an error, not SIGPIPE.
            let send =
                || unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            let Some(n) = nonblocking(send)? else { return Ok(false) };
            self.written += n;
        }
        while self.got < ACK_LEN {
            let rest = &mut self.ack[self.got..];
            // SAFETY: `rest` is writable for its length.
            let recv = || unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) };
            let Some(n) = nonblocking(recv)? else { return Ok(false) };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "the peer closed the socket instead of acknowledging it",
                ));
            }
            self.got += n;
        }
        if self.ack != attach_ack(self.index) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the peer acknowledged with wrong bytes"));
        }
        Ok(true)
    }
}

/// Runs one non-blocking `send` or `recv` (`call`, retried when interrupted): the bytes it moved,
/// `None` when the socket has no room or no bytes yet, an error otherwise.
fn nonblocking(mut call: impl FnMut() -> isize) -> std::io::Result<Option<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Whether a non-blocking connect finished: a failure is the socket's pending error; a socket not
/// connected yet has no peer address.
fn connected(stream: &TcpStream) -> std::io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn dialer(addr: std::net::SocketAddr) -> Dialer {
        let hello = SocketHello {
            listen_nonce: 7,
            comm_id: 9,
            index: 0,
            count: 4,
            subchunk: 256 << 10,
            acked: false,
            spare: 0,
        };
        let routes = Routes::new(addr, Vec::new(), Vec::new(), 0);
        Dialer { routes, hello, sndbuf: 0, rcvbuf: 0, io_timeout: Duration::from_secs(5) }
    }

    /// Runs `advance` until it answers, as a helper would on each event.
    fn settle(j: &mut Joining, s: &TcpStream) -> std::io::Result<bool> {
        let deadline = std::time::Instant::now() + testkit::PATIENCE;
        loop {
            if j.advance(s)? {
                return Ok(true);
            }
            assert!(std::time::Instant::now() < deadline, "the socket neither joined nor failed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs `advance` until the hello is out, and reads it on the accepted end.
    fn hello_out(j: &mut Joining, s: &TcpStream, theirs: &mut TcpStream) -> SocketHello {
        let deadline = std::time::Instant::now() + testkit::PATIENCE;
        while j.written < HELLO_LEN {
            assert!(!j.advance(s).unwrap(), "open before the ack");
            assert!(std::time::Instant::now() < deadline, "the hello never left");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut hello = [0u8; HELLO_LEN];
        theirs.read_exact(&mut hello).unwrap();
        SocketHello::decode(&hello, 7).unwrap()
    }

    #[test]
    fn an_added_socket_sends_its_hello_and_opens_on_the_ack() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (stream, mut joining) = dialer(listener.local_addr().unwrap()).start(2).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        let h = hello_out(&mut joining, &stream, &mut theirs);
        assert_eq!((h.index, h.count, h.comm_id), (2, 4, 9));
        // Not open before the ack, however often it runs.
        for _ in 0..3 {
            assert!(!joining.advance(&stream).unwrap());
        }
        theirs.write_all(&attach_ack(2)[..3]).unwrap();
        assert!(!joining.advance(&stream).unwrap(), "part of an ack");
        theirs.write_all(&attach_ack(2)[3..]).unwrap();
        assert!(settle(&mut joining, &stream).unwrap());
    }

    #[test]
    fn a_refused_closed_or_wrongly_acknowledged_socket_is_given_up() {
        // Nobody listens: the connect fails.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (stream, mut joining) = dialer(port).start(1).unwrap();
        assert!(settle(&mut joining, &stream).is_err(), "connect to a closed port");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        for (answer, kind) in [
            (None, std::io::ErrorKind::ConnectionRefused),
            (Some(attach_ack(3)), std::io::ErrorKind::InvalidData),
            (Some([0xee; ACK_LEN]), std::io::ErrorKind::InvalidData),
        ] {
            let (stream, mut joining) = dialer(listener.local_addr().unwrap()).start(1).unwrap();
            let (mut theirs, _) = listener.accept().unwrap();
            hello_out(&mut joining, &stream, &mut theirs);
            if let Some(ack) = answer {
                theirs.write_all(&ack).unwrap();
            }
            drop(theirs);
            let err = settle(&mut joining, &stream).unwrap_err();
            assert_eq!(err.kind(), kind, "{answer:?}: {err}");
        }
    }
}
