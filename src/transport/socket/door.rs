//! A data listener's side of the socket hello: it accepts connections, reads their hellos without
//! blocking, and files each socket. The first socket of a comm (index 0) makes a new receive comm;
//! a socket that comes later joins its comm while the comm lives, and only when it names a comm of
//! this listener (whose nonce its hello carries), comes from the host of that comm's first socket,
//! agrees with it on the socket count and piece size, and is not there yet. Anything else is
//! closed. While its listen comm lives, sockets that overtook their comm's first one wait for it;
//! once the listen comm is gone (channel setup is over), the listener lives on only for the comms
//! that may still grow. A door is read by its listen comm's `accept` and, while it has comms that
//! may grow, by the net's acceptor thread (which queues new comms for `accept` to hand out).

use std::collections::VecDeque;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::comm::RecvJoin;
use super::pure::counts::Counts;
use super::pure::wire::{CommShape, HELLO_LEN, SocketHello};
use crate::error::{Error, Result};
use crate::sys::epoll::Epoll;
use crate::sys::tcp::tune_stream;
use crate::trace;

/// Streams held at once (waiting for a hello, or for the first socket of their comm); more wait in
/// the kernel's backlog until some finish or time out.
pub(super) const MAX_PENDING_STREAMS: usize = 256;

struct PendingStream {
    stream: TcpStream,
    peer: SocketAddr,
    hello: [u8; HELLO_LEN],
    got: usize,
    since: Instant,
}

/// Sockets of a comm whose first socket has not been read yet.
struct SocketGroup {
    comm_id: u64,
    peer: IpAddr,
    shape: CommShape,
    streams: Vec<Option<TcpStream>>,
    arrived: usize,
    since: Instant,
}

/// A comm handed out that may still take sockets, and what a socket joining it must match.
struct LiveComm {
    comm_id: u64,
    peer: IpAddr,
    shape: CommShape,
    join: Weak<RecvJoin>,
}

impl LiveComm {
    /// Why `hello`, from `peer`, may not join this comm (`None`: it may). `taken`: the comm has the
    /// socket it names; `closed`: the comm closes or is gone.
    fn refusal(
        &self,
        hello: &SocketHello,
        peer: IpAddr,
        any_link: bool,
        taken: bool,
        closed: bool,
    ) -> Option<&'static str> {
        if closed {
            Some("its comm is closed")
        } else if !any_link && peer.to_canonical() != self.peer {
            Some("it comes from another host than its comm's first socket")
        } else if hello.shape() != self.shape {
            Some("it contradicts its comm's first socket")
        } else if hello.index == 0 || taken {
            Some("its comm has that socket already")
        } else {
            None
        }
    }
}

/// The first socket of a new comm, with those of its other sockets that came before it.
pub(super) struct NewComm {
    pub comm_id: u64,
    pub peer: IpAddr,
    pub shape: CommShape,
    pub first: TcpStream,
    pub early: Vec<(usize, TcpStream)>,
}

pub(super) struct Doorway {
    listener: TcpListener,
    nonce: u64,
    /// How long a stream may take to send its hello, and a comm's early sockets to see its first.
    timeout: Duration,
    io_timeout: Duration,
    /// Accepted streams whose hello has not fully arrived; read without blocking so that a silent
    /// stranger cannot hold up the real connections queued behind it.
    pending: Vec<PendingStream>,
    groups: Vec<SocketGroup>,
    live: Vec<LiveComm>,
    /// New comms the acceptor read, for `accept` to hand out.
    ready: VecDeque<NewComm>,
    /// Its listen comm lives: new comms are handed out.
    listening: bool,
    /// The acceptor's epoll set and this door's token there, while the acceptor reads it.
    watch: Option<(Arc<Epoll>, u64)>,
    counts: Arc<Counts>,
    /// This host's data links. The sockets of one comm come from several addresses of the peer,
    /// one per link: a later socket that arrived on one of these links may come from another
    /// address than its comm's first; its hello's nonce and comm id are then the check (they
    /// travel unencrypted, so on a data link the host check is only as good as that network).
    links: Vec<std::net::Ipv4Addr>,
}

impl Doorway {
    pub fn new(
        listener: TcpListener,
        nonce: u64,
        timeout: Duration,
        io_timeout: Duration,
        counts: Arc<Counts>,
    ) -> Self {
        Doorway {
            listener,
            nonce,
            timeout,
            io_timeout,
            pending: Vec::new(),
            groups: Vec::new(),
            live: Vec::new(),
            ready: VecDeque::new(),
            listening: true,
            watch: None,
            counts,
            links: Vec::new(),
        }
    }

    /// The data links the listener serves (`SocketNet::with_data_links`).
    pub fn across_links(mut self, links: Vec<std::net::Ipv4Addr>) -> Self {
        self.links = links;
        self
    }

    /// Whether `stream` arrived on one of this host's data links.
    fn on_a_link(&self, stream: &TcpStream) -> bool {
        !self.links.is_empty()
            && stream.local_addr().is_ok_and(|a| match a.ip().to_canonical() {
                IpAddr::V4(ip) => self.links.contains(&ip),
                IpAddr::V6(_) => false,
            })
    }

    fn held_streams(&self) -> usize {
        self.pending.len() + self.groups.iter().map(|g| g.arrived).sum::<usize>()
    }

    fn take_new_streams(&mut self) -> Result<()> {
        while self.held_streams() < MAX_PENDING_STREAMS {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("accept channel", e)),
            };
            stream.set_nonblocking(true).map_err(|e| Error::io(format!("accept channel from {peer}"), e))?;
            if let Some((epoll, token)) = &self.watch
                && let Err(e) = epoll.add(stream.as_raw_fd(), (libc::EPOLLIN | libc::EPOLLET) as u32, *token)
            {
                log::warn!("dropping a data connection from {peer}: cannot watch it: {e}");
                continue;
            }
            self.pending.push(PendingStream { stream, peer, hello: [0; HELLO_LEN], got: 0, since: Instant::now() });
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

    /// The next new comm for the listen comm to hand out: one the acceptor read, else what the
    /// listener has now.
    pub fn next(&mut self) -> Result<Option<NewComm>> {
        match self.ready.pop_front() {
            Some(new) => Ok(Some(new)),
            None => self.poll(),
        }
    }

    /// The acceptor's turn: reads everything that came, queueing new comms for the listen comm.
    pub fn pump(&mut self) -> Result<()> {
        while let Some(new) = self.poll()? {
            self.ready.push_back(new);
        }
        Ok(())
    }

    /// Accepts what the listener has, reads the hellos that came and files their sockets: attaches
    /// late ones to their live comms and, while listening, returns the first socket of a new comm.
    /// Streams accepted while the acceptor watches the door are added to its epoll set, and taken
    /// out when they leave.
    fn poll(&mut self) -> Result<Option<NewComm>> {
        self.take_new_streams()?;
        let timeout = self.timeout;
        self.groups.retain(|g| {
            let alive = g.since.elapsed() <= timeout;
            if !alive {
                log::warn!("dropping {} data sockets whose comm's first socket did not arrive in time", g.arrived);
            }
            alive
        });
        let mut i = 0;
        while i < self.pending.len() {
            let complete = match Self::poll_hello(&mut self.pending[i], timeout) {
                None => {
                    i += 1;
                    continue;
                }
                Some(complete) => complete,
            };
            let p = self.pending.swap_remove(i);
            if let Some((epoll, _)) = &self.watch {
                epoll.remove(p.stream.as_raw_fd());
            }
            if !complete {
                log::warn!("ignoring a connection from {} that sent no hello", p.peer);
                continue;
            }
            let hello = match SocketHello::decode(&p.hello, self.nonce) {
                Ok(h) => h,
                Err(e) => {
                    log::warn!("ignoring a connection from {}: {e}", p.peer);
                    continue;
                }
            };
            if let Err(e) = tune_stream(&p.stream, self.io_timeout) {
                log::warn!("ignoring a data socket from {}: {e}", p.peer);
                continue;
            }
            if let Some(new) = self.file(hello, p.stream, p.peer) {
                return Ok(Some(new));
            }
        }
        Ok(None)
    }

    /// Files a socket whose hello checked out: see the module's description.
    fn file(&mut self, hello: SocketHello, stream: TcpStream, peer: SocketAddr) -> Option<NewComm> {
        let from = peer.ip().to_canonical();
        let on_a_link = self.on_a_link(&stream);
        if let Some(pos) = self.live.iter().position(|c| c.comm_id == hello.comm_id) {
            self.join_live(pos, hello, stream, peer);
            return None;
        }
        if !self.listening {
            self.refuse(peer, "it names no comm this listener serves");
            return None;
        }
        if let Some(new) = self.ready.iter_mut().find(|n| n.comm_id == hello.comm_id) {
            // Read by the acceptor and not handed out yet: it joins with the comm.
            let index = hello.index as usize;
            let fits = (on_a_link || new.peer == from) && new.shape == hello.shape();
            if fits && index != 0 && new.early.iter().all(|(k, _)| *k != index) {
                new.early.push((index, stream));
            } else {
                self.refuse(peer, "it contradicts its comm's other sockets");
            }
            return None;
        }
        let pos = match self.groups.iter().position(|g| g.comm_id == hello.comm_id) {
            Some(pos) => pos,
            None => {
                self.groups.push(SocketGroup {
                    comm_id: hello.comm_id,
                    peer: from,
                    shape: hello.shape(),
                    streams: (0..hello.slots()).map(|_| None).collect(),
                    arrived: 0,
                    since: Instant::now(),
                });
                self.groups.len() - 1
            }
        };
        let same_peer = on_a_link || self.groups[pos].peer == from;
        let g = &mut self.groups[pos];
        let fits = g.shape == hello.shape() && same_peer;
        if !fits || g.streams[hello.index as usize].is_some() {
            log::warn!("dropping a data socket from {peer} that contradicts the other sockets of its comm");
            return None;
        }
        g.streams[hello.index as usize] = Some(stream);
        g.arrived += 1;
        if hello.index != 0 {
            return None;
        }
        let g = self.groups.swap_remove(pos);
        let mut streams = g.streams.into_iter().enumerate();
        let first = streams.next().and_then(|(_, s)| s).expect("socket 0 just arrived");
        Some(NewComm {
            comm_id: g.comm_id,
            peer: g.peer,
            shape: g.shape,
            first,
            early: streams.filter_map(|(k, s)| Some((k, s?))).collect(),
        })
    }

    fn join_live(&mut self, pos: usize, hello: SocketHello, stream: TcpStream, peer: SocketAddr) {
        let comm = &self.live[pos];
        let join = comm.join.upgrade();
        let closed = join.as_ref().is_none_or(|j| j.closed());
        let taken = join.as_ref().is_some_and(|j| j.has(hello.index as usize));
        let on_a_link = self.on_a_link(&stream);
        // Taken, the comm traces it as it acknowledges it (`RecvJoin::attach`).
        let refused = || trace::event!(SockFiled { comm: hello.comm_id, socket: hello.index as u64, taken: 0 });
        if let Some(why) = comm.refusal(&hello, peer.ip(), on_a_link, taken, closed) {
            refused();
            self.refuse(peer, why);
            return;
        }
        let join = join.expect("a comm that is not closed is alive");
        if let Err(why) = join.attach(hello.index as usize, stream) {
            refused();
            self.refuse(peer, why);
        }
        if join.full() {
            self.live.swap_remove(pos);
        }
    }

    fn refuse(&self, peer: SocketAddr, why: &str) {
        self.counts.refused();
        log::warn!("refusing a data socket from {peer}: {why}");
    }

    /// Keeps the listener for a comm just handed out whose sender may open more sockets.
    pub fn register(&mut self, comm_id: u64, peer: IpAddr, shape: CommShape, join: &Arc<RecvJoin>) {
        if !join.full() {
            self.live.push(LiveComm { comm_id, peer, shape, join: Arc::downgrade(join) });
        }
    }

    /// Forgets comms that are gone, closing or complete; says whether one may still take a socket.
    pub fn prune(&mut self) -> bool {
        self.live.retain(|c| c.join.upgrade().is_some_and(|j| !j.closed() && !j.full()));
        !self.live.is_empty()
    }

    /// The listen comm is gone: comms whose first socket did not come, or that were read and not
    /// handed out, never will be.
    pub fn stop_listening(&mut self) {
        self.listening = false;
        self.groups.clear();
        self.ready.clear();
    }

    /// When the oldest pending stream or waiting group times out.
    pub fn deadline(&self) -> Option<Instant> {
        let pending = self.pending.iter().map(|p| p.since);
        pending.chain(self.groups.iter().map(|g| g.since)).min().map(|t| t + self.timeout)
    }

    pub fn watched(&self) -> bool {
        self.watch.is_some()
    }

    /// Puts the listener and the pending streams in the acceptor's epoll set under `token`.
    pub fn watch(&mut self, epoll: Arc<Epoll>, token: u64) -> std::io::Result<()> {
        for fd in self.fds() {
            if let Err(e) = epoll.add(fd, (libc::EPOLLIN | libc::EPOLLET) as u32, token) {
                for added in self.fds().into_iter().take_while(|&f| f != fd) {
                    epoll.remove(added);
                }
                return Err(e);
            }
        }
        self.watch = Some((epoll, token));
        Ok(())
    }

    /// Takes the door's descriptors out of the acceptor's epoll set.
    pub fn unwatch(&mut self) {
        if let Some((epoll, _)) = self.watch.take() {
            for fd in self.fds() {
                epoll.remove(fd);
            }
        }
    }

    fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.listener.as_raw_fd()).chain(self.pending.iter().map(|p| p.stream.as_raw_fd())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm() -> LiveComm {
        LiveComm { comm_id: 9, peer: "10.0.0.1".parse().unwrap(), shape: hello(0).shape(), join: Weak::new() }
    }

    fn hello(index: u8) -> SocketHello {
        SocketHello { listen_nonce: 5, comm_id: 9, index, count: 4, subchunk: 256 << 10, acked: false, spare: 0 }
    }

    #[test]
    fn a_late_socket_joins_only_a_live_comm_it_fits() {
        let c = comm();
        let from: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(c.refusal(&hello(1), from, false, false, false), None);
        assert_eq!(c.refusal(&hello(3), from, false, false, false), None);
        // The same host reached over a dual-stack socket.
        assert_eq!(c.refusal(&hello(2), "::ffff:10.0.0.1".parse().unwrap(), false, false, false), None);
        let refused = [
            (c.refusal(&hello(1), from, false, false, true), "closed"),
            (c.refusal(&hello(1), "10.0.0.2".parse().unwrap(), false, false, false), "another host"),
            (c.refusal(&SocketHello { count: 8, ..hello(1) }, from, false, false, false), "contradicts"),
            (c.refusal(&SocketHello { subchunk: 64 << 10, ..hello(1) }, from, false, false, false), "contradicts"),
            (c.refusal(&SocketHello { acked: true, spare: 4, ..hello(1) }, from, false, false, false), "contradicts"),
            (c.refusal(&hello(0), from, false, false, false), "already"),
            (c.refusal(&hello(2), from, false, true, false), "already"),
        ];
        for (i, (why, expected)) in refused.iter().enumerate() {
            assert!(why.is_some_and(|w| w.contains(expected)), "case {i}: {why:?}");
        }
        // Over data links a comm's sockets come from the peer's several addresses.
        assert_eq!(c.refusal(&hello(1), "10.0.0.2".parse().unwrap(), true, false, false), None);
        // A closed comm is refused whatever else the socket claims.
        assert_eq!(c.refusal(&hello(0), "10.0.0.2".parse().unwrap(), false, true, true), Some("its comm is closed"));
    }
}
