//! Connection setup: the versioned handshake on the control stream (the acceptor's accept loop has
//! read and checked the Hello, and with a key run the challenge-response, before any of this runs:
//! `admission`), then the channels. Both sides
//! listen for their receive direction and connect their send direction at once, polling connect and
//! accept together (plugin transports complete both asynchronously). Channels pair by handle order
//! when each has its own listen, else by a ChannelHello that opens every data comm, so accept order
//! does not matter.
//!
//! Channel `i` listens and connects on the transport's device for `i`. A transport whose listen comm
//! serves one accept (TCPX) needs a listen per channel: Hello and Welcome carry channel 0's handle,
//! and each side then sends one more Hello (connector) or Welcome (acceptor) per further channel,
//! identical but for the handle.
//!
//! Which transport the channels use is decided once both ends' host identities and capabilities are
//! known (`route`): a plugin engine moves a same-host peer's channels over the socket transport. The
//! acceptor knows it from the Hello and listens there for its Welcome; the connector's Hello carried a
//! handle of its own transport, so it sends one more Hello with a handle of the socket transport.
//!
//! A side that gives up after Hello tells the other why with a Refuse, and each side watches for
//! one while it waits, so both ends report the same cause instead of one of them seeing only a
//! closed stream or a timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::establish::{Establishing, Listens, Renewal, Step};
use super::locality::LocalLink;
use super::path;
use super::plan::{Chunking, Cut};
use super::route::{Route, Routes};
use super::same_host::{self, PendingHello};
use super::shared::EngineCore;
use crate::config::{ChannelTransport, LocalPeers};
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{
    CAP_SPANNING_CHUNKS, FRAME_HEADER_LEN, FrameHeader, Handshake, Hello, HostIdentity, MAX_REASON_LEN,
    NET_HANDLE_SIZE, ProtoError, Refuse, Welcome,
};
use crate::transport::{Net, NetHandle};

/// What both ends agreed on.
pub struct Agreement {
    pub num_channels: u16,
    pub chunk_size: u32,
    pub nonce: u64,
    pub peer_gpu_index: i32,
    pub peer_gpu_id: String,
    /// The peer's listen handle for each channel (all the same when one listen serves every channel).
    pub peer_handles: Vec<NetHandle>,
    /// Whether the peer shares this host or process, and the key its connection is found by.
    pub link: LocalLink,
    /// How scattered flows are cut: spanning segments only when both ends' transports take
    /// vectored requests.
    pub cut: Cut,
    /// Which transport the channels use, and that transport.
    pub route: Route,
    pub net: Arc<dyn Net>,
}

/// The capabilities this engine's transport gives it.
fn capabilities(net: &dyn Net) -> u64 {
    if net.caps().vectored { CAP_SPANNING_CHUNKS } else { 0 }
}

fn agreed_cut(net: &dyn Net, peer_capabilities: u64) -> Cut {
    if capabilities(net) & peer_capabilities & CAP_SPANNING_CHUNKS != 0 { Cut::Spanning } else { Cut::PerSegment }
}

/// The cut of a connection on `route`. Capabilities describe each end's own transport; on the
/// same-host route both ends use the socket transport, which takes vectored requests (what the
/// route's capability bit promises).
fn route_cut(route: Route, net: &dyn Net, peer_capabilities: u64) -> Cut {
    match route {
        Route::Transport => agreed_cut(net, peer_capabilities),
        Route::LocalSockets => agreed_cut(net, CAP_SPANNING_CHUNKS),
    }
}

/// The link and route the acceptor takes for a Hello, before it listens (its Welcome carries a
/// handle of the route's transport).
pub struct Routing {
    pub link: LocalLink,
    pub route: Route,
    pub net: Arc<dyn Net>,
}

/// The acceptor's routing of Hello `h`: where the peer runs, and so where its channels go.
pub fn accepted_routing(local: &Local, h: &Hello) -> Result<Routing> {
    let link = LocalLink {
        locality: same_host::accepted_locality(&local.host, &h.host, h.nonce),
        nonce: h.nonce,
        connector: false,
    };
    let same_kernel = link.locality.is_local() || local.host.same_kernel(&h.host);
    let route = local.routes.decide(same_kernel, h.capabilities)?;
    Ok(Routing { link, route, net: local.routes.net(route)? })
}

impl Agreement {
    /// How this connection cuts flows into chunks.
    pub fn chunking(&self) -> Chunking {
        Chunking { size: self.chunk_size as usize, channels: self.num_channels as usize, cut: self.cut }
    }
}

pub struct Local<'a> {
    /// The engine's transport: the connector's first listen is on it, before the peer is known.
    pub net: &'a dyn Net,
    /// Where a connection's channels go once the peer is known.
    pub routes: &'a Routes,
    /// The channels offered in Hello / Welcome: those of the engine's transport.
    pub num_channels: u16,
    /// The channels taken for a same-host peer whose channels leave a plugin for the socket
    /// transport: that transport's (its sockets per comm are the socket transport's too).
    pub socket_channels: u16,
    pub chunk_size: u32,
    pub gpu_index: i32,
    pub gpu_id: &'a str,
    pub window: usize,
    /// The region table's removal counter, watched by each channel's registration cache.
    pub removals: Arc<AtomicU64>,
    /// Announced in Hello / Welcome; all zero when same-host paths are disabled.
    pub host: HostIdentity,
    /// The engine's GPU as of now, told to the route's transport before it makes comms (a staged
    /// one makes a ring ahead for each of a connection whose GPU memory takes its channels).
    pub gpu: Option<Arc<crate::cuda::Gpu>>,
    /// Whether same-host peers keep the plugin (`UCCL_TCPX_LOCAL_PEERS`), which decides where a
    /// same-host connection's GPU memory goes.
    pub local_peers: LocalPeers,
}

impl<'a> Local<'a> {
    /// The most channels this end takes on `route`. Only the acceptor knows the route before it
    /// agrees (the connector's Hello went out first), so it applies it; the connector takes any
    /// count up to its offer.
    fn channels_on(&self, route: Route) -> u16 {
        match route {
            Route::Transport => self.num_channels,
            Route::LocalSockets => self.socket_channels,
        }
    }

    /// What the engine announces and offers, as of now (the GPU may be chosen later).
    pub fn of(core: &'a EngineCore) -> Local<'a> {
        let (gpu_index, gpu_id) = core.gpu.identity();
        Local {
            net: &*core.net,
            routes: &core.routes,
            num_channels: core.num_channels,
            socket_channels: core.config.channels_for(ChannelTransport::Socket),
            chunk_size: core.config.chunk_size,
            gpu_index,
            gpu_id,
            window: core.config.window,
            removals: core.regions.removals(),
            host: same_host::own_identity(core.config.disable_ipc),
            gpu: core.gpu.get().cloned(),
            local_peers: core.config.local_peers,
        }
    }
}

/// Bounds the handshake: a peer that connects and goes silent cannot hold a thread forever. Also
/// grows the descriptor table for the connection's sockets now rather than at a transfer.
pub fn prepare_control(stream: &TcpStream, deadline: Instant, io_timeout: Duration) -> Result<()> {
    super::fd_limit::keep_table_ahead();
    crate::sys::tcp::tune_stream(stream, io_timeout)?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(|e| Error::io("control stream", e))?;
    stream.set_write_timeout(Some(left)).map_err(|e| Error::io("control stream", e))
}

pub fn send_frame(stream: &mut TcpStream, msg: &Handshake) -> Result<()> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    stream.write_all(&buf).map_err(|e| Error::io("handshake write", e))
}

pub fn read_frame(stream: &mut TcpStream) -> Result<Handshake> {
    let mut body = Vec::new();
    let header = read_raw_frame(stream, &mut body, "handshake read")?;
    Ok(Handshake::decode(&header, &body)?)
}

/// The capabilities this engine announces.
fn announced(local: &Local) -> u64 {
    capabilities(local.net) | local.routes.capabilities()
}

/// Connector side: Hello out, Welcome (or Refuse) back. `listens` holds the first listen on the
/// engine's transport; when the peer turns out to share the host and the channels leave that
/// transport, it is replaced by a listen on theirs, whose handle follows in one more Hello.
pub fn hello(stream: &mut TcpStream, local: &Local, requested_gpu: &str, listens: &mut Listens) -> Result<Agreement> {
    let nonce = crate::sys::random::random_u64();
    let pending = PendingHello::register(nonce);
    let transport = local.net.caps().handshake_name();
    let hello = |net_handle| Hello {
        version: crate::proto::PROTOCOL_VERSION,
        capabilities: announced(local),
        nonce,
        num_channels: local.num_channels,
        chunk_size: local.chunk_size,
        gpu_index: local.gpu_index,
        gpu_id: local.gpu_id.to_owned(),
        requested_gpu: requested_gpu.to_owned(),
        transport: transport.clone(),
        net_handle,
        host: local.host,
    };
    send_frame(stream, &Handshake::Hello(hello(listens.first_handle())))?;
    match read_frame(stream)? {
        Handshake::Welcome(w) => {
            if w.num_channels == 0 || w.num_channels > local.num_channels || w.chunk_size > local.chunk_size {
                return Err(refuse(
                    stream,
                    Error::backend(format!(
                        "peer agreed to {} channels of {} bytes, more than the {} of {} bytes offered",
                        w.num_channels, w.chunk_size, local.num_channels, local.chunk_size
                    )),
                ));
            }
            if w.transport != transport {
                return Err(refuse(
                    stream,
                    Error::new(
                        UcclStatus::ErrNotSupported,
                        format!("peer uses transport {:?}, this engine {transport:?}", w.transport),
                    ),
                ));
            }
            let n = w.num_channels as usize;
            let link = LocalLink { locality: pending.locality(&local.host, &w.host), nonce, connector: true };
            let same_kernel = link.locality.is_local() || local.host.same_kernel(&w.host);
            let route = local.routes.decide(same_kernel, w.capabilities).map_err(|e| refuse(stream, e))?;
            let net = local.routes.net(route).map_err(|e| refuse(stream, e))?;
            if let Some(gpu) = &local.gpu {
                net.set_gpu(gpu);
            }
            let mut agreed = Agreement {
                num_channels: w.num_channels,
                chunk_size: w.chunk_size,
                nonce,
                peer_gpu_index: w.gpu_index,
                peer_gpu_id: w.gpu_id,
                peer_handles: vec![w.net_handle],
                link,
                cut: route_cut(route, &*net, w.capabilities),
                route,
                net,
            };
            let net = agreed.net.clone();
            let net = &*net;
            if route == Route::LocalSockets {
                *listens = Listens::first(net).map_err(|e| refuse(stream, e))?;
                send_frame(stream, &Handshake::Hello(hello(listens.first_handle())))?;
            }
            let handles = listens.open_rest(net, n).map_err(|e| refuse(stream, e))?.to_vec();
            for handle in handles {
                send_frame(stream, &Handshake::Hello(hello(handle)))?;
            }
            for _ in 0..extra_handles(net, n) {
                let extra = match read_frame(stream)? {
                    Handshake::Welcome(extra) if extra.num_channels == w.num_channels => extra,
                    Handshake::Refuse(r) => return Err(refused(r)),
                    _ => {
                        return Err(refuse(
                            stream,
                            Error::backend("protocol violation: expected a Welcome carrying a channel handle"),
                        ));
                    }
                };
                agreed.peer_handles.push(extra.net_handle);
            }
            agreed.fill_shared_handles(n);
            Ok(agreed)
        }
        Handshake::Refuse(r) => Err(refused(r)),
        other => Err(refuse(
            stream,
            Error::backend(format!("protocol violation: peer answered Hello with frame kind {}", other.kind())),
        )),
    }
}

/// The error a peer's Refuse stands for.
pub fn refused(r: Refuse) -> Error {
    let status = UcclStatus::from_code(r.status).filter(|s| (*s as i32) < 0).unwrap_or(UcclStatus::ErrUnknown);
    Error::new(status, format!("peer refused the connection: {}", r.reason))
}

/// Tells the peer why this side gives up on the connection (best effort: the stream may be gone
/// already), and hands the error back for the caller to report.
pub fn refuse(stream: &mut TcpStream, err: Error) -> Error {
    let mut reason = err.message().to_owned();
    if reason.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let _ = send_frame(stream, &Handshake::Refuse(Refuse { status: err.status() as i32, reason }));
    err
}

/// Whether this engine can serve a peer's Hello: the transport must match. Checked when the Hello
/// arrives (`admission`), before anything is spent on the peer.
pub fn check_hello(h: &Hello, transport: &str) -> Result<()> {
    if h.transport != transport {
        return Err(Error::new(
            UcclStatus::ErrNotSupported,
            format!("peer uses transport {:?}, this engine {transport:?}", h.transport),
        ));
    }
    Ok(())
}

/// The Refuse a peer speaking another protocol version gets: magic + our version first, so a peer
/// of any version can tell why it was turned away.
pub fn version_refusal(e: &ProtoError) -> Option<Error> {
    matches!(e, ProtoError::VersionMismatch { .. }).then(|| Error::new(UcclStatus::ErrNotSupported, e.to_string()))
}

/// Acceptor side, once the Hello `h` was read and checked (`admission`) and routed
/// (`accepted_routing`, whose transport `listens` is on): answers Welcome.
pub fn welcome(
    stream: &mut TcpStream,
    local: &Local,
    listens: &mut Listens,
    h: Hello,
    routing: Routing,
) -> Result<Agreement> {
    // The GPU a peer names comes from metadata it may have read before this engine knew its GPU
    // (NIXL reads it once, right after creating the engine), and one port reaches one engine
    // anyway: the name is advisory, and this engine serves its own GPU.
    if !gpu_matches(&h.requested_gpu, local.gpu_index, local.gpu_id) {
        log::debug!(
            "peer asked for GPU {:?}; this engine serves GPU {} ({}), which it serves this connection",
            h.requested_gpu,
            local.gpu_index,
            local.gpu_id
        );
    }
    let mut agreed = Agreement {
        num_channels: h.num_channels.min(local.channels_on(routing.route)),
        chunk_size: h.chunk_size.min(local.chunk_size),
        nonce: h.nonce,
        peer_gpu_index: h.gpu_index,
        peer_gpu_id: h.gpu_id,
        peer_handles: vec![h.net_handle],
        link: routing.link,
        cut: route_cut(routing.route, &*routing.net, h.capabilities),
        route: routing.route,
        net: routing.net,
    };
    let transport = local.net.caps().handshake_name();
    let welcome = |net_handle| Welcome {
        version: crate::proto::PROTOCOL_VERSION,
        capabilities: announced(local),
        num_channels: agreed.num_channels,
        chunk_size: agreed.chunk_size,
        gpu_index: local.gpu_index,
        gpu_id: local.gpu_id.to_owned(),
        transport: transport.clone(),
        net_handle,
        host: local.host,
    };
    send_frame(stream, &Handshake::Welcome(welcome(listens.first_handle())))?;
    let n = agreed.num_channels as usize;
    let net = agreed.net.clone();
    let net = &*net;
    let handles = listens.open_rest(net, n).map_err(|e| refuse(stream, e))?.to_vec();
    for handle in handles {
        send_frame(stream, &Handshake::Welcome(welcome(handle)))?;
    }
    // The Hello's handle is of the connector's own transport; on the same-host route the connector
    // sends its first handle on the socket transport again.
    let replaced = agreed.route == Route::LocalSockets;
    if replaced {
        agreed.peer_handles.clear();
    }
    for _ in 0..extra_handles(net, n) + usize::from(replaced) {
        let extra = match read_frame(stream)? {
            Handshake::Hello(extra) if extra.nonce == agreed.nonce => extra,
            Handshake::Refuse(r) => return Err(refused(r)),
            _ => {
                return Err(refuse(
                    stream,
                    Error::backend("protocol violation: expected a Hello carrying a channel handle"),
                ));
            }
        };
        agreed.peer_handles.push(extra.net_handle);
    }
    agreed.fill_shared_handles(n);
    Ok(agreed)
}

/// Handles each side sends after Hello / Welcome: one per channel beyond the first, when each
/// channel has its own listen on `net`.
fn extra_handles(net: &dyn Net, n: usize) -> usize {
    if net.caps().listen_per_channel { n.saturating_sub(1) } else { 0 }
}

impl Agreement {
    /// With one listen serving every channel, every channel connects to the one handle.
    fn fill_shared_handles(&mut self, n: usize) {
        let first = self.peer_handles[0];
        self.peer_handles.resize(n, first);
    }
}

/// Whether a peer's GPU name (an index such as "3", or an identity string: a PCI BDF once GPUs
/// are known) names this engine's GPU. Only logged: see `welcome`.
pub fn gpu_matches(requested: &str, index: i32, id: &str) -> bool {
    let requested = requested.trim();
    requested.eq_ignore_ascii_case(id) || requested.parse::<i32>().is_ok_and(|i| i == index)
}

/// Opens `n` send comms to the peer's handles and accepts `n` receive comms on `listens`, pairing
/// them into channels. Bounded by `deadline`; ends early when the peer gives up on `control`.
pub fn establish_channels(
    local: &Local,
    listens: &mut Listens,
    agreed: &Agreement,
    deadline: Instant,
    control: &mut TcpStream,
) -> Result<Vec<Channel>> {
    let n = agreed.num_channels as usize;
    let mut setup =
        Establishing::new(agreed.net.clone(), std::mem::take(listens), agreed.peer_handles.clone(), n, agreed.nonce)?;
    loop {
        match setup.step()? {
            Step::Done => break,
            Step::Moved => continue,
            Step::Waiting => {}
        }
        if Instant::now() >= deadline {
            return Err(setup.timed_out());
        }
        watch_control(control)?;
        std::thread::sleep(Duration::from_micros(200));
    }
    let ahead = !path::same_host_gpu(agreed.link.locality, local.local_peers);
    setup.into_channels(local.window, &local.removals, ahead)
}

/// What a connection agreed on makes new channels with, once idle ones closed.
pub fn renewal(core: &EngineCore, agreed: &Agreement) -> Renewal {
    Renewal {
        net: agreed.net.clone(),
        nonce: agreed.nonce,
        ahead: !path::same_host_gpu(agreed.link.locality, core.config.local_peers),
        idle_close: Renewal::idle_close(core.config.idle_close, &*agreed.net),
    }
}

/// During channel setup the control stream carries nothing but a Refuse (the peer gave up, and
/// says why) or the first control messages of a peer that finished its side already, which stay
/// unread for the connection. A closed stream means the peer gave up without a word.
fn watch_control(stream: &mut TcpStream) -> Result<()> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    // SAFETY: peeks at most `header.len()` bytes into `header`, without blocking or consuming.
    let got = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(&*stream),
            header.as_mut_ptr().cast(),
            header.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if got < 0 {
        let err = std::io::Error::last_os_error();
        return match err.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(()),
            _ => Err(Error::io("control stream during channel setup", err)),
        };
    }
    if got == 0 {
        return Err(Error::disconnected("peer closed the connection during channel setup"));
    }
    let refusing = got as usize == FRAME_HEADER_LEN
        && FrameHeader::parse(&header).is_ok_and(|h| h.kind == crate::proto::frame::kind::REFUSE);
    if !refusing {
        return Ok(());
    }
    match read_frame(stream)? {
        Handshake::Refuse(r) => Err(refused(r)),
        _ => Err(Error::backend("internal: a peeked Refuse header read back as another frame")),
    }
}

const _: () = assert!(NET_HANDLE_SIZE == 128);

/// Reads one frame's header and body into `body` (the handshake's blocking reads).
fn read_raw_frame(reader: &mut impl Read, body: &mut Vec<u8>, what: &str) -> Result<FrameHeader> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    reader.read_exact(&mut header).map_err(|e| Error::io(what, e))?;
    let header = FrameHeader::parse(&header)?;
    body.clear();
    // The header parser bounded body_len for this kind. Memory grows only as bytes arrive, so a
    // header announcing a maximal Notify costs nothing until the peer really sends it.
    let want = u64::from(header.body_len);
    let got = reader.by_ref().take(want).read_to_end(body).map_err(|e| Error::io(what, e))?;
    if got as u64 != want {
        return Err(Error::io(what, std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;
    use crate::engine::plan::{Chunk, ChunkMem};
    use crate::engine::region::RegionTable;
    use crate::proto::Control;
    use crate::transport::MemKind;
    use crate::transport::plugin::{PluginNet, mock};

    fn stream_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (far, _) = listener.accept().unwrap();
        (near, far)
    }

    fn local<'a>(net: &'a dyn Net, routes: &'a Routes, removals: &Arc<AtomicU64>) -> Local<'a> {
        Local {
            net,
            routes,
            num_channels: 3,
            socket_channels: 2,
            chunk_size: 1 << 20,
            gpu_index: 0,
            gpu_id: "0",
            window: 16,
            removals: removals.clone(),
            host: HostIdentity::default(),
            gpu: None,
            local_peers: LocalPeers::Socket,
        }
    }

    /// A plugin engine's same-host peer gets the socket transport's channel count, which its
    /// channels run on; every other connection the engine's own.
    #[test]
    fn the_acceptor_takes_the_channels_of_the_routes_transport() {
        let net: Arc<dyn Net> = Arc::new(PluginNet::with_plugin(mock::plugin(), None, None).unwrap());
        let routes = Routes::new(net.clone(), crate::config::LocalPeers::Socket, Box::new(|| unreachable!()));
        let removals = Arc::new(AtomicU64::new(0));
        let local = local(&*net, &routes, &removals);
        assert_eq!((local.num_channels, local.socket_channels), (3, 2));
        assert_eq!(local.channels_on(Route::Transport), 3);
        assert_eq!(local.channels_on(Route::LocalSockets), 2);
    }

    #[test]
    fn chunks_span_segments_only_when_both_ends_take_vectored_requests() {
        let socket = crate::transport::socket::SocketNet::new(
            "127.0.0.1".parse().unwrap(),
            Duration::from_secs(1),
            Duration::from_secs(1),
            Arc::new(|| {}),
        );
        assert_eq!(capabilities(&socket), CAP_SPANNING_CHUNKS);
        assert_eq!(agreed_cut(&socket, CAP_SPANNING_CHUNKS), Cut::Spanning);
        assert_eq!(agreed_cut(&socket, 0), Cut::PerSegment, "a peer without the bit");
        assert_eq!(agreed_cut(&socket, !CAP_SPANNING_CHUNKS), Cut::PerSegment, "other bits do not count");
        let plugin = PluginNet::with_plugin(mock::plugin(), None, None).unwrap();
        // ncclNet v7 takes one buffer per request; the plugin transport gathers a chunk's pieces
        // into one (and the peer's unpack scatters them), so its chunks span pieces too.
        assert_eq!(capabilities(&plugin), CAP_SPANNING_CHUNKS);
        assert_eq!(agreed_cut(&plugin, CAP_SPANNING_CHUNKS), Cut::Spanning);
        assert_eq!(agreed_cut(&plugin, 0), Cut::PerSegment, "a peer without the bit");
    }

    #[test]
    fn plugin_channels_pair_by_handle_order_and_no_byte_moves_during_setup() {
        // TCPX flow-steers a receive comm's sockets into GPU memory at accept: a host receive of a
        // channel hello could never complete there. The mock counts every call per connection.
        let net: Arc<dyn Net> = Arc::new(PluginNet::with_plugin(mock::plugin(), None, None).unwrap());
        let routes = Routes::new(net.clone(), crate::config::LocalPeers::Socket, Box::new(|| unreachable!()));
        let (n, table) = (3usize, RegionTable::default());
        let removals = table.removals();
        let (mut sides, handles): (Vec<Listens>, Vec<Vec<NetHandle>>) =
            (0..2).map(|_| Listens::for_channels(&*net, n).unwrap()).unzip();
        let agreement = |peer: usize| Agreement {
            num_channels: n as u16,
            chunk_size: 1 << 20,
            nonce: 7,
            peer_gpu_index: 0,
            peer_gpu_id: "0".into(),
            link: LocalLink::remote(),
            peer_handles: handles[peer].clone(),
            cut: Cut::PerSegment,
            route: Route::Transport,
            net: net.clone(),
        };
        let deadline = Instant::now() + testkit::PATIENCE;
        let (a_side, b_side) = sides.split_at_mut(1);
        let (mut a_control, mut b_control) = stream_pair();
        let (mut a, mut b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                establish_channels(
                    &local(&*net, &routes, &removals),
                    &mut a_side[0],
                    &agreement(1),
                    deadline,
                    &mut a_control,
                )
            });
            let b = s.spawn(|| {
                establish_channels(
                    &local(&*net, &routes, &removals),
                    &mut b_side[0],
                    &agreement(0),
                    deadline,
                    &mut b_control,
                )
            });
            (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
        });
        for pair in handles.iter().flatten().map(mock::pair_of_handle) {
            mock::pair(pair, |p| {
                assert!(p.violations.is_empty(), "{:?}", p.violations);
                let moved = ["irecv", "isend", "test"].map(|e| p.calls.get(e).copied().unwrap_or(0));
                assert_eq!(moved, [0, 0, 0], "irecv, isend and test calls during setup");
            });
        }

        // Channel i of one side reaches channel i of the other: each carries its own bytes.
        let src: Vec<u8> = (0..n * 1000).map(|i| (i / 1000) as u8 + 1).collect();
        let mut dst = vec![0u8; src.len()];
        let smr = table.register(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
        let dmr = table.register(dst.as_mut_ptr() as usize, dst.len(), MemKind::Host).unwrap();
        let (sreg, dreg) = (table.get(smr).unwrap(), table.get(dmr).unwrap());
        for i in 0..n {
            let off = i * 1000;
            let at = ChunkMem::At(src.as_ptr() as usize + off);
            a[i].queue_send(Chunk { flow: 1, region: smr, mem: at, len: 1000 }, std::slice::from_ref(&sreg)).unwrap();
            let chunk = Chunk { flow: 1, region: dmr, mem: ChunkMem::At(dst.as_mut_ptr() as usize + off), len: 1000 };
            b[i].queue_recv(chunk, std::slice::from_ref(&dreg)).unwrap();
        }
        let mut done = Vec::new();
        for _ in 0..1000 {
            for ch in a.iter_mut().chain(b.iter_mut()) {
                ch.drive(&mut Vec::new(), &mut done).unwrap();
            }
            if done.len() == 2 * n {
                break;
            }
        }
        assert_eq!(done.len(), 2 * n, "every chunk finished");
        assert_eq!(dst, src);
    }

    #[test]
    fn channel_setup_sees_a_refusal_or_a_hang_up_and_leaves_control_traffic_alone() {
        // Nothing arrived: keep waiting.
        let (mut near, mut far) = stream_pair();
        watch_control(&mut near).unwrap();

        // A peer that finished its side may send control messages already: they stay unread.
        let mut close = Vec::new();
        Control::Close.encode(&mut close);
        far.write_all(&close).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        watch_control(&mut near).unwrap();
        let mut peeked = vec![0u8; close.len()];
        assert_eq!(near.peek(&mut peeked).unwrap(), close.len());
        assert_eq!(peeked, close, "control bytes consumed");

        // A peer that gave up says why, with its status.
        let (mut near, mut far) = stream_pair();
        let long = "x".repeat(5000);
        let err = refuse(&mut far, Error::timeout(format!("channel setup on the far side failed {long}")));
        assert_eq!(err.status(), UcclStatus::ErrTimeout);
        let err = loop {
            if let Err(e) = watch_control(&mut near) {
                break e;
            }
        };
        assert_eq!(err.status(), UcclStatus::ErrTimeout, "{err}");
        assert!(
            err.message().starts_with("peer refused the connection: channel setup on the far side failed"),
            "{err}"
        );

        // One that hung up without a word.
        let (mut near, far) = stream_pair();
        drop(far);
        let err = loop {
            if let Err(e) = watch_control(&mut near) {
                break e;
            }
        };
        assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");
    }

    #[test]
    fn gpu_identity_by_index_or_id() {
        assert!(gpu_matches("0", 0, "0"));
        assert!(gpu_matches(" 2 ", 2, "0000:4a:00.0"));
        assert!(gpu_matches("0000:4A:00.0", 2, "0000:4a:00.0"));
        assert!(!gpu_matches("1", 0, "0"));
        assert!(!gpu_matches("0000:4b:00.0", 2, "0000:4a:00.0"));
        assert!(!gpu_matches("", 0, "0000:4a:00.0"));
    }
}
