//! Which path a transfer takes, decided here and nowhere else (as NCCL's `selectTransport` decides
//! a peer's): an engine of this process, a GPU copy to another process of this host, the host copy
//! to one, the control stream (inline), or the channels. Plain functions of what the caller knows
//! before any lock is taken or any byte moves, so they are tested without sockets.
//!
//! A call's paths come as a list tried in order ([`call_paths`]): every path but the last may still
//! decline at run time on what only it can see (the peer engine closed, the far end's memory of
//! another kind, the copies too costly one by one), and the call then takes the next. The last,
//! the connection, never declines; on it each request is inline, asks for the same-host host copy,
//! or goes over the channels ([`request_path`]), and the same-host peer may still refuse that copy.

use crate::config::{Config, LocalPeers};
use crate::engine::locality::Locality;
use crate::proto::INLINE_LEN_FLOOR;
use crate::transport::MemKind;

/// A transfer's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// An engine of this process, host memory at this end: copied at once under both
    /// connections' locks (`same_host/local_copy.rs`).
    SameProcess,
    /// GPU memory at either end, the peer on this host (in this process or another): device copies
    /// over CUDA IPC or within the process (`same_host/device_copy.rs`).
    SameHostGpu,
    /// The connection: the control stream and the channels, one request at a time
    /// ([`request_path`]).
    Connection,
    /// Another process of this host, host memory: the target copies with `process_vm_readv`
    /// (`same_host/state.rs`), asked per request.
    SameHostHostCopy,
    /// The request's bytes ride the control stream.
    Inline,
    /// The request's bytes go over the channels.
    Network,
}

/// What a call's path depends on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call {
    pub locality: Locality,
    /// `UCCL_TCPX_LOCAL_PEERS`: with `plugin`, same-host peers take the network path for GPU memory.
    pub local_peers: LocalPeers,
    /// Every local region the call names is host memory.
    pub local_host: bool,
}

/// Whether GPU memory may move between a connection's ends by device copies
/// ([`Path::SameHostGpu`]): its peer shares this host, and `UCCL_TCPX_LOCAL_PEERS` is not `plugin`.
/// What a connection sets up for that path ahead of its first transfer follows the same answer.
pub(crate) fn same_host_gpu(locality: Locality, local_peers: LocalPeers) -> bool {
    locality.is_local() && local_peers != LocalPeers::Plugin
}

/// Whether a call's vectors may run over several regions (one request and one flow for the pieces
/// of many regions, `WriteRuns` / `ReadRuns`): where the network is the call's one path, a peer on
/// another host, or one on this host with `UCCL_TCPX_LOCAL_PEERS=plugin` (the plugin path's tests).
/// The same-host copies authorize, map and copy per region.
pub(crate) fn spans_regions(locality: Locality, local_peers: LocalPeers) -> bool {
    locality == Locality::Remote || locality == Locality::SameHost && local_peers == LocalPeers::Plugin
}

/// The paths a one-sided call tries, in order; the last is always [`Path::Connection`].
pub(crate) fn call_paths(call: Call) -> Vec<Path> {
    let mut paths = Vec::with_capacity(3);
    if call.locality == Locality::SameProcess && call.local_host {
        paths.push(Path::SameProcess);
    }
    if same_host_gpu(call.locality, call.local_peers) {
        paths.push(Path::SameHostGpu);
    }
    paths.push(Path::Connection);
    paths
}

/// What a two-sided message's path depends on, at the sending end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Message {
    pub locality: Locality,
    pub local_peers: LocalPeers,
    pub kind: MemKind,
    /// The message's region has a CUDA IPC handle (`Region::ipc_export`).
    pub ipc_handle: bool,
}

/// A message's path: GPU memory whose receiver is an engine of this process, or of another
/// process of this host where the memory has an IPC handle, is offered for the receiver to copy
/// out itself ([`Path::SameHostGpu`]: by address within the process, over CUDA IPC between
/// processes; the receiver may still take it over the channels), at every length as a one-sided
/// call of GPU memory is ([`call_paths`]): its copy costs one event where an inline message costs
/// a synchronous copy at each end. Anything else takes the connection ([`request_path`]'s inline
/// or the channels).
pub(crate) fn message_path(m: Message) -> Path {
    let gpu = matches!(m.kind, MemKind::Cuda { .. });
    let reachable = match m.locality {
        Locality::SameProcess => true,
        Locality::SameHost => m.ipc_handle,
        Locality::Remote => false,
    };
    if m.local_peers != LocalPeers::Plugin && gpu && reachable { Path::SameHostGpu } else { Path::Connection }
}

/// What one request's path on the connection depends on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    pub len: u64,
    pub kind: MemKind,
    /// The connection's inline bound for host memory ([`inline_max`]).
    pub inline_max: u64,
    /// Inline bytes the call may still carry (the state's bound on unanswered ones).
    pub inline_left: u64,
    /// A single item: a vector request never rides the control stream.
    pub item: bool,
    /// A write's payload was read (a write goes inline only with it); always true for a read.
    pub payload: bool,
    /// Every local region of the call is host memory, so the same-host host copy may be asked.
    pub host_copy: bool,
}

/// A request's path on the connection: inline when small, else the same-host host copy when the
/// call may ask for it and the request's length fits a segment, else the channels.
pub(crate) fn request_path(r: Request) -> Path {
    if inline(r) {
        Path::Inline
    } else if r.host_copy && (!r.item || u32::try_from(r.len).is_ok()) {
        Path::SameHostHostCopy
    } else {
        Path::Network
    }
}

/// Whether a request rides the control stream: one round trip instead of a request, a grant and a
/// channel hop (for device memory also instead of two staged copies), while the inline bytes in
/// flight stay bounded.
fn inline(r: Request) -> bool {
    r.item && r.payload && r.len <= inline_limit(r.inline_max, r.kind).min(r.inline_left)
}

/// Whether the caller reads the payload of a write or send of `len` bytes of `kind` memory before
/// the lock, `left` inline bytes remaining to the call: what may go inline.
pub(crate) fn reads_payload(len: u64, kind: MemKind, inline_max: u64, left: u64) -> bool {
    len <= inline_limit(inline_max, kind).min(left)
}

/// The longest transfer of `kind` memory that rides the control stream, the connection's bound
/// for host memory being `max`: device memory always the floor (its synchronous copies are fast
/// up to it).
pub(crate) fn inline_limit(max: u64, kind: MemKind) -> u64 {
    match kind {
        MemKind::Host => max,
        MemKind::Cuda { .. } => INLINE_LEN_FLOOR as u64,
    }
}

/// The longest host-memory transfer a connection sends inline: the engine's bound toward other
/// hosts, the floor toward this host's processes (whose larger transfers take the direct copy).
pub(crate) fn inline_max(config: &Config, locality: Locality) -> u64 {
    match locality {
        Locality::Remote => config.inline_max.into(),
        Locality::SameHost | Locality::SameProcess => INLINE_LEN_FLOOR as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCALITIES: [Locality; 3] = [Locality::Remote, Locality::SameHost, Locality::SameProcess];

    #[test]
    fn a_call_tries_the_local_paths_its_peer_allows_then_the_connection() {
        let paths = |locality, local_peers, local_host| call_paths(Call { locality, local_peers, local_host });
        use Path::*;
        for local_peers in [LocalPeers::Socket, LocalPeers::Plugin] {
            for local_host in [true, false] {
                assert_eq!(paths(Locality::Remote, local_peers, local_host), [Connection], "a remote peer");
            }
        }
        assert_eq!(paths(Locality::SameProcess, LocalPeers::Socket, true), [SameProcess, SameHostGpu, Connection]);
        assert_eq!(paths(Locality::SameProcess, LocalPeers::Socket, false), [SameHostGpu, Connection]);
        assert_eq!(paths(Locality::SameProcess, LocalPeers::Plugin, true), [SameProcess, Connection]);
        assert_eq!(paths(Locality::SameProcess, LocalPeers::Plugin, false), [Connection]);
        for local_host in [true, false] {
            assert_eq!(paths(Locality::SameHost, LocalPeers::Socket, local_host), [SameHostGpu, Connection]);
            assert_eq!(paths(Locality::SameHost, LocalPeers::Plugin, local_host), [Connection]);
        }
    }

    #[test]
    fn vectors_span_regions_only_where_every_call_takes_the_connection() {
        for local_peers in [LocalPeers::Socket, LocalPeers::Plugin] {
            for locality in LOCALITIES {
                let only_connection = [true, false]
                    .iter()
                    .all(|&local_host| call_paths(Call { locality, local_peers, local_host }) == [Path::Connection]);
                let spans = spans_regions(locality, local_peers);
                assert!(!spans || only_connection, "{locality:?} {local_peers:?}");
            }
        }
        assert!(spans_regions(Locality::Remote, LocalPeers::Socket));
        assert!(spans_regions(Locality::SameHost, LocalPeers::Plugin));
        assert!(!spans_regions(Locality::SameHost, LocalPeers::Socket));
        assert!(!spans_regions(Locality::SameProcess, LocalPeers::Plugin));
    }

    #[test]
    fn a_gpu_message_to_an_engine_of_this_host_is_offered_for_its_copy_else_takes_the_connection() {
        let gpu = MemKind::Cuda { device: 1 };
        let path =
            |locality, local_peers, kind, ipc_handle| message_path(Message { locality, local_peers, kind, ipc_handle });
        assert_eq!(path(Locality::SameHost, LocalPeers::Socket, gpu, true), Path::SameHostGpu);
        assert_eq!(path(Locality::SameHost, LocalPeers::Socket, gpu, false), Path::Connection, "no handle");
        assert_eq!(path(Locality::SameHost, LocalPeers::Socket, MemKind::Host, false), Path::Connection, "host");
        assert_eq!(path(Locality::SameHost, LocalPeers::Plugin, gpu, true), Path::Connection, "plugin");
        assert_eq!(path(Locality::SameProcess, LocalPeers::Socket, gpu, false), Path::SameHostGpu, "by address");
        assert_eq!(path(Locality::SameProcess, LocalPeers::Plugin, gpu, false), Path::Connection, "plugin");
        assert_eq!(path(Locality::SameProcess, LocalPeers::Socket, MemKind::Host, false), Path::Connection);
        assert_eq!(path(Locality::Remote, LocalPeers::Socket, gpu, true), Path::Connection, "remote");
    }

    fn request(len: u64, kind: MemKind) -> Request {
        Request { len, kind, inline_max: 64 << 10, inline_left: 8 << 20, item: true, payload: true, host_copy: false }
    }

    #[test]
    fn a_request_goes_inline_up_to_its_bounds_then_to_the_host_copy_or_the_channels() {
        let gpu = MemKind::Cuda { device: 0 };
        assert_eq!(request_path(request(64 << 10, MemKind::Host)), Path::Inline);
        assert_eq!(request_path(request((64 << 10) + 1, MemKind::Host)), Path::Network);
        assert_eq!(request_path(request(INLINE_LEN_FLOOR as u64, gpu)), Path::Inline);
        assert_eq!(request_path(Request { inline_max: 1 << 20, ..request(256 << 10, gpu) }), Path::Network);
        assert_eq!(request_path(Request { inline_max: 1 << 20, ..request(256 << 10, MemKind::Host) }), Path::Inline);
        assert_eq!(request_path(Request { inline_left: 99, ..request(100, MemKind::Host) }), Path::Network, "budget");
        assert_eq!(request_path(Request { payload: false, ..request(100, MemKind::Host) }), Path::Network);
        assert_eq!(request_path(Request { item: false, ..request(100, MemKind::Host) }), Path::Network, "a vector");
        let copy = |r: Request| request_path(Request { host_copy: true, ..r });
        assert_eq!(copy(request(100, MemKind::Host)), Path::Inline, "inline before the host copy");
        assert_eq!(copy(request(1 << 20, MemKind::Host)), Path::SameHostHostCopy);
        assert_eq!(copy(request(1 << 32, MemKind::Host)), Path::Network, "longer than a segment");
        assert_eq!(copy(Request { item: false, ..request(1 << 32, MemKind::Host) }), Path::SameHostHostCopy);
    }

    #[test]
    fn the_inline_bound_is_the_engines_toward_other_hosts_and_the_floor_here() {
        let config = Config { inline_max: 256 << 10, ..Config::default() };
        for locality in LOCALITIES {
            let want = if locality == Locality::Remote { 256 << 10 } else { INLINE_LEN_FLOOR as u64 };
            assert_eq!(inline_max(&config, locality), want, "{locality:?}");
        }
        assert!(reads_payload(256 << 10, MemKind::Host, 256 << 10, 1 << 20));
        assert!(!reads_payload(256 << 10, MemKind::Cuda { device: 1 }, 256 << 10, 1 << 20));
        assert!(!reads_payload(10, MemKind::Host, 256 << 10, 9), "past what the call may still carry");
    }
}
