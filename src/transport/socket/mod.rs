//! Built-in TCP transport in the shape of NCCL's socket transport: each comm has several data
//! sockets, served by helper threads the net shares among all of its comms; a comm starts with one
//! and its sender opens the others when its requests would use them (`grow`, `door`). A request is cut into
//! pieces that free sockets pull in order (dynamic load balancing, as Google's Fast Socket does),
//! each piece carries a header with its request number and offset, and the receiver lands it
//! straight in the posted buffer. Completions are flags the engine polls, plus a wake callback so
//! an idle progress thread can sleep.

mod acceptor;
mod comm;
mod door;
mod fanout;
mod grow;
mod iov;
mod links;
mod pace;
mod pure;
mod reactor;
mod receiver;
mod sender;
mod spin;
mod tune;
mod write_back;

pub use pure::counts::DataSocketStats;
pub use spin::HelperWaits;
#[cfg(test)]
pub(crate) use write_back::supported as writes_back;
pub use write_back::written_back_bytes;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::SockRef;

use super::{Caps, ListenComm, Net, NetHandle, Properties, RecvComm, SendComm, Wake};
use crate::error::{Error, Result};

use crate::config::{self, SocketConfig};
use crate::sys::random::random_u64;
use crate::sys::tcp::tune_stream;
use crate::trace;
use acceptor::Acceptor;
use comm::{Growth, Helpers, Threading};
use door::{Doorway, MAX_PENDING_STREAMS};
use grow::Dialer;
use links::{Route, Routes};
use pure::counts::Counts;
use pure::failover::SPARE_SOCKETS;
use pure::window::MAX_REQUESTS;
use pure::wire::SocketHello;
use spin::Polls;
use tune::set_buffers;

const HANDLE_MAGIC: u32 = 0x4B53_5455;
/// Where a handle lists the listener's data links: a 2-byte mark, the count, a zero byte, then the
/// addresses. Bytes 0..32 hold the rest; 32..88 are left to whoever wraps this transport (the fake
/// NIC keeps its mark and state there), so the links sit at the end.
const LINKS_AT: usize = 88;
const LINKS_MARK: [u8; 2] = *b"DL";
const _: () = assert!(LINKS_AT + 4 + 4 * MAX_DATA_LINKS <= crate::proto::NET_HANDLE_SIZE);
/// Data links a handle names at most (`UCCL_TCPX_SOCKET_IFNAME`): an A3 VM has four data NICs.
pub const MAX_DATA_LINKS: usize = 8;

pub struct SocketNet {
    ip: IpAddr,
    /// Where channel listeners bind: the engine's configured address, else every interface.
    bind: IpAddr,
    connect_timeout: Duration,
    /// Unacknowledged data older than this fails the stream (TCP_USER_TIMEOUT).
    io_timeout: Duration,
    wake: Wake,
    options: SocketConfig,
    /// Sender and receiver threads every comm of this net shares.
    helpers: Arc<Helpers>,
    /// Keeps listeners open for comms that may still take sockets once their listen comm is gone.
    acceptor: Arc<Acceptor>,
    sockets: Arc<Counts>,
    /// This host's data links (`with_data_links`); empty: data sockets use `ip`.
    data: Vec<Ipv4Addr>,
    /// Where the next send comm's first socket goes among the data links, so that the comms of
    /// every connection start on different links.
    next_link: AtomicUsize,
}

impl SocketNet {
    pub fn new(ip: IpAddr, connect_timeout: Duration, io_timeout: Duration, wake: Wake) -> SocketNet {
        let bind = if ip.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() };
        let options = SocketConfig::default();
        let helpers = Arc::new(Helpers::new(options.helpers_per_direction(), polls(&options)));
        let (acceptor, sockets) = (Arc::default(), Arc::default());
        SocketNet {
            ip,
            bind,
            connect_timeout,
            io_timeout,
            wake,
            options,
            helpers,
            acceptor,
            sockets,
            data: Vec::new(),
            next_link: AtomicUsize::new(0),
        }
    }

    /// Data sockets run over `links` (this host's addresses, in the order the peer lists its own:
    /// socket k of a comm goes from link k to the peer's link k, modulo their counts), and listeners
    /// accept on every interface, where the peer's links arrive. The first [`MAX_DATA_LINKS`] count.
    pub fn with_data_links(mut self, links: Vec<IpAddr>) -> SocketNet {
        if self.ip.is_ipv6() {
            // The links are IPv4 addresses and their listeners would bind IPv4 only, where peers
            // without links dial the engine's IPv6 address.
            log::warn!("data links are ignored: the engine's address {} is IPv6", self.ip);
            return self;
        }
        self.data = links
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .take(MAX_DATA_LINKS)
            .collect();
        if !self.data.is_empty() {
            self.bind = Ipv4Addr::UNSPECIFIED.into();
        }
        self
    }

    /// Channel listeners accept on `bind` alone (by default every interface of `ip`'s family), so an
    /// operator who names the engine's address or interface gets no data port anywhere else.
    pub fn with_bind(mut self, bind: IpAddr) -> SocketNet {
        self.bind = bind;
        self
    }

    /// The data sockets this net's comms hold now, and what became of those they added later.
    pub fn data_socket_stats(&self) -> DataSocketStats {
        self.sockets.snapshot()
    }

    /// How this net's helpers waited once out of work (polling or asleep) so far: what tests
    /// observe instead of the CPU time a poll takes.
    pub fn helper_waits(&self) -> HelperWaits {
        self.helpers.waits()
    }

    /// Socket counts, buffer sizes and thread tuning (`Config::socket`).
    pub fn with_options(mut self, options: SocketConfig) -> SocketNet {
        // No comm exists yet, so no helper runs: the new pools take their place.
        self.helpers = Arc::new(Helpers::new(options.helpers_per_direction(), polls(&options)));
        self.options = options;
        self
    }

    /// Helper threads running now, senders and receivers.
    #[cfg(test)]
    fn helper_threads(&self) -> usize {
        self.helpers.threads()
    }

    /// Helper threads started so far, senders and receivers.
    #[cfg(test)]
    fn helper_starts(&self) -> usize {
        self.helpers.starts()
    }

    /// Helper threads not asleep now (working or polling).
    #[cfg(test)]
    fn awake_helpers(&self) -> usize {
        self.helpers.awake()
    }

    /// Acceptor threads running now (0 or 1).
    #[cfg(test)]
    fn acceptor_threads(&self) -> usize {
        self.acceptor.threads()
    }

    fn threading(&self) -> Threading {
        Threading { subchunk: self.options.subchunk as usize, kick_fanout: self.options.kick_fanout() }
    }

    fn set_buffers(&self, sock: SockRef<'_>) -> Result<()> {
        set_buffers(sock, self.options.sndbuf, self.options.rcvbuf)
    }

    fn connect_one(&self, route: Route, hello: &SocketHello) -> Result<TcpStream> {
        let ctx = || format!("connect channel to {}", route.to);
        let sock = socket2::Socket::new(socket2::Domain::for_address(route.to), socket2::Type::STREAM, None)
            .map_err(|e| Error::io(ctx(), e))?;
        // Buffer sizes must be set before connecting for the window scale to account for them.
        self.set_buffers(SockRef::from(&sock))?;
        route.bind(&sock)?;
        sock.connect_timeout(&route.to.into(), self.connect_timeout).map_err(|e| Error::io(ctx(), e))?;
        let mut stream = TcpStream::from(sock);
        tune_stream(&stream, self.io_timeout)?;
        stream.write_all(&hello.encode()).map_err(|e| Error::io(ctx(), e))?;
        Ok(stream)
    }
}

/// What a socket listen handle carries: where to connect, the listener's data links (empty where
/// it has none), and a nonce that proves the connector read this handle (so a stray connection to
/// the port is not taken for a channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketHandle {
    addr: SocketAddr,
    nonce: u64,
    links: [Ipv4Addr; MAX_DATA_LINKS],
    nlinks: usize,
}

impl SocketHandle {
    /// A handle naming `links` (at most [`MAX_DATA_LINKS`]) besides its address.
    fn new(addr: SocketAddr, nonce: u64, data: &[Ipv4Addr]) -> SocketHandle {
        let mut links = [Ipv4Addr::UNSPECIFIED; MAX_DATA_LINKS];
        let nlinks = data.len().min(MAX_DATA_LINKS);
        links[..nlinks].copy_from_slice(&data[..nlinks]);
        SocketHandle { addr, nonce, links, nlinks }
    }

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
        if self.nlinks > 0 {
            h[LINKS_AT..LINKS_AT + 2].copy_from_slice(&LINKS_MARK);
            h[LINKS_AT + 2] = self.nlinks as u8;
            for (i, link) in self.links[..self.nlinks].iter().enumerate() {
                let at = LINKS_AT + 4 + 4 * i;
                h[at..at + 4].copy_from_slice(&link.octets());
            }
        }
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
        let nlinks = if h[LINKS_AT..LINKS_AT + 2] == LINKS_MARK { h[LINKS_AT + 2] as usize } else { 0 };
        if nlinks > MAX_DATA_LINKS {
            return Err(Error::invalid(format!(
                "socket transport handle names {nlinks} data links, at most {MAX_DATA_LINKS} are allowed"
            )));
        }
        let mut links = [Ipv4Addr::UNSPECIFIED; MAX_DATA_LINKS];
        for (i, link) in links[..nlinks].iter_mut().enumerate() {
            let at = LINKS_AT + 4 + 4 * i;
            *link = Ipv4Addr::from(<[u8; 4]>::try_from(&h[at..at + 4]).expect("4 bytes"));
            if link.is_unspecified() || link.is_broadcast() || link.is_multicast() {
                return Err(Error::invalid(format!("socket transport handle names data link {link}")));
            }
        }
        Ok(SocketHandle { addr: SocketAddr::new(ip, port), nonce, links, nlinks })
    }
}

/// One device, every comm of any size, peers on this host as well as others.
const CAPS: Caps = Caps {
    name: "socket",
    listen_per_channel: false,
    max_registration: usize::MAX,
    binds_gpu: false,
    reaches_own_host: true,
    // Pieces go out with `sendmsg` and land with `recvmsg`, so a request may as well be a list.
    vectored: true,
    // Its sockets open as traffic needs them and its helper threads are the net's.
    idle_comms_cost: false,
    agreement: "",
};

impl Net for SocketNet {
    fn caps(&self) -> &Caps {
        &CAPS
    }

    fn devices(&self) -> usize {
        1
    }

    /// Helper threads move every piece and wake the engine on a completion.
    fn needs_polling(&self) -> bool {
        false
    }

    fn polls_device_copies(&self) -> bool {
        false
    }

    fn channel_device(&self, _channel: usize) -> usize {
        0
    }

    /// Host memory only: no comm binds a GPU.
    fn set_gpu(&self, _gpu: &Arc<crate::cuda::Gpu>) {}

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
        let handle = SocketHandle::new(SocketAddr::new(self.ip, port), random_u64(), &self.data);
        let door = Doorway::new(listener, handle.nonce, self.connect_timeout, self.io_timeout, self.sockets.clone())
            .across_links(self.data.clone());
        let listen = SocketListen {
            door: Arc::new(parking_lot::Mutex::new(door)),
            wake: self.wake.clone(),
            threading: self.threading(),
            helpers: self.helpers.clone(),
            acceptor: self.acceptor.clone(),
            sockets: self.sockets.clone(),
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
        Ok(Some(Box::new(self.connect_comm(dev, handle)?)))
    }
}

impl SocketNet {
    /// A send comm to the listener of `handle`, its first socket connected and introduced.
    fn connect_comm(&self, dev: usize, handle: &NetHandle) -> Result<comm::SocketSendComm> {
        self.properties(dev)?;
        let h = SocketHandle::decode(handle)?;
        let first_link = self.next_link.fetch_add(1, Ordering::Relaxed);
        let routes = Routes::new(h.addr, self.data.clone(), h.links[..h.nlinks].to_vec(), first_link);
        // Every link carries at least one socket of every comm.
        let count = self.options.sockets_per_comm().max(routes.links()).min(config::MAX_SOCKETS_PER_COMM);
        // Over several links the receiver acknowledges requests, so that a link that fails costs
        // the comm that link only, and spare slots let a link that comes back be used again.
        let acked = routes.links() >= 2 && self.options.failover;
        let spare = if acked { SPARE_SOCKETS.min(config::MAX_SOCKETS_PER_COMM - count) } else { 0 };
        let hello = SocketHello {
            listen_nonce: h.nonce,
            comm_id: random_u64(),
            index: 0,
            count: count as u8,
            subchunk: self.options.subchunk,
            acked,
            spare: spare as u8,
        };
        let first = match self.connect_one(routes.route(0), &hello) {
            Ok(first) => first,
            // A link that does not reach the peer must not cost the connection: socket 0 then
            // goes to the peer's address, and the later sockets try their links.
            Err(e) if routes.over_links() => {
                log::warn!("data socket 0 over its link failed ({e}); it goes to {} instead", h.addr);
                self.connect_one(Route { to: h.addr, from: None }, &hello)?
            }
            Err(e) => return Err(e),
        };
        let dialer = Dialer {
            routes,
            hello,
            sndbuf: self.options.sndbuf,
            rcvbuf: self.options.rcvbuf,
            io_timeout: self.io_timeout,
        };
        comm::SocketSendComm::new(
            first,
            count,
            Growth { dialer, lazy: self.options.lazy },
            self.wake.clone(),
            self.threading(),
            self.helpers.clone(),
            self.sockets.clone(),
            hello.comm_id,
        )
    }
}

struct SocketListen {
    /// The listener and its hellos, shared with the acceptor while a comm of it may grow.
    door: acceptor::Door,
    wake: Wake,
    threading: Threading,
    helpers: Arc<Helpers>,
    acceptor: Arc<Acceptor>,
    sockets: Arc<Counts>,
}

impl ListenComm for SocketListen {
    fn accept(&mut self) -> Result<Option<Box<dyn RecvComm>>> {
        let mut door = self.door.lock();
        let Some(new) = door.next()? else { return Ok(None) };
        let threading = Threading { subchunk: new.shape.subchunk as usize, ..self.threading };
        let on_close = if new.shape.slots() > 1 { self.acceptor.waker() } else { None };
        let recv = comm::SocketRecvComm::new(
            new.first,
            new.shape,
            self.wake.clone(),
            threading,
            self.helpers.clone(),
            self.sockets.clone(),
            on_close,
            new.comm_id,
        )?;
        let join = recv.join();
        for (k, stream) in new.early {
            if let Err(why) = join.attach(k, stream) {
                trace::event!(SockFiled { comm: new.comm_id, socket: k as u64, taken: 0 });
                self.sockets.refused();
                log::warn!("refusing data socket {k} of a new receive comm: {why}");
            }
        }
        door.register(new.comm_id, new.peer, new.shape, &join);
        // Its later sockets are read whether or not this listen comm is polled again.
        let grows = door.prune() && !door.watched();
        drop(door);
        if grows {
            self.acceptor.watch(&self.door);
        }
        Ok(Some(Box::new(recv)))
    }
}

impl Drop for SocketListen {
    fn drop(&mut self) {
        let mut door = self.door.lock();
        door.stop_listening();
        let orphaned = door.prune() && !door.watched();
        drop(door);
        if orphaned {
            self.acceptor.watch(&self.door);
        } else {
            // The acceptor lets the door go (and with it the listener) if no comm of it can grow.
            self.acceptor.nudge();
        }
    }
}

/// The helpers' polls that `options` ask for.
fn polls(options: &SocketConfig) -> Polls {
    Polls {
        spin: options.spin,
        held: options.held_spin,
        spinners: options.spinners(),
        max_request: u64::from(options.spin_max_request),
    }
}

#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod tests;
