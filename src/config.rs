//! Every environment knob, parsed once per engine into a plain struct (the log filter, once per
//! process). A malformed value is an error that names the variable, never a silent default.
//!
//! The knobs are one table, the `knobs!` invocation below: a line per knob gives its field, type,
//! variable, kind of value (which bounds it), default and meaning. Parsing, `Default`, the field
//! docs and the reference page docs/CONFIG.md all come from it (`scripts/gen_config_doc.sh`
//! rewrites the page).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::{AuthKey, INLINE_LEN_FLOOR, MAX_INLINE_LEN};
use crate::trace::Setting;

mod knob;
mod retired;

pub use knob::parse_bytes;
use knob::{Band, Choice, FilePath, Flag, Indices, Int, KeyFile, List, Micros, Millis, Opt, Size, Text, TraceSetting};

pub(crate) const MAX_CHANNELS: u16 = crate::proto::MAX_CHANNELS;
/// TCPX receives are capped at 4 MiB; the socket transport keeps the same cap so one chunk plan fits both.
pub(crate) const MAX_CHUNK_SIZE: u32 = 4 << 20;
pub(crate) const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// TCPX allows 16 outstanding requests per comm, received-but-unconsumed ones included.
pub(crate) const MAX_WINDOW: usize = 16;
/// Bound on UCCL_TCPX_GPU; the device count is checked when the engine opens the GPU.
const MAX_GPU_ORDINAL: i32 = 1023;
/// Bound on UCCL_TCPX_HOST_COPY_THREADS: the process's copy helpers are at most one fewer.
pub(crate) const MAX_HOST_COPY_THREADS: usize = 64;
/// More plugin devices than any host has NICs; bounds what `UCCL_TCPX_NET_DEVICES` may list.
pub(crate) const MAX_NET_DEVICES: usize = 64;
/// Most data sockets one comm may open (NCCL's MAX_SOCKETS); also what an accepting side allows.
pub(crate) const MAX_SOCKETS_PER_COMM: usize = 64;
pub(crate) const MAX_SOCKET_THREADS: u8 = 16;
/// Bound on `UCCL_TCPX_SOCKET_HELPERS`.
pub(crate) const MAX_SOCKET_HELPERS: u8 = 64;
/// Bound on `UCCL_TCPX_CONTROL_THREADS`.
const MAX_CONTROL_THREADS: u8 = 64;
/// Bound on `UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST`.
const MAX_SPIN_MAX_REQUEST: u32 = 1 << 30;
/// Bound on the polling knobs given in microseconds: a second.
const MAX_SPIN_US: u64 = 1_000_000;
/// At most this many blocks in `UCCL_TCPX_ALLOW_DIAL`: a longer list is a mistake, and every dial
/// checks them all.
const MAX_CIDRS: usize = 256;

/// Declares config structs whose fields are knobs, one line each:
/// `field: Type = "VARIABLE", kind, default [=> "default as the reference page says it"], "meaning";`
/// The kind (a `knob::Kind`) parses the variable's text and bounds it; the default is the value
/// when the variable is unset or empty (a default that depends on the host is shown in words). A
/// struct's `@nested` fields hold another such struct, read by its own `from_lookup`.
macro_rules! knobs {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(@nested { $($nested:ident: $nty:ty),* $(,)? })?
            $($field:ident: $ty:ty = $env:literal, $kind:expr, $default:expr $(=> $shown:literal)?, $meaning:literal;)*
        }
    )*) => {$(
        $(#[$meta])*
        pub struct $name {
            $($(pub $nested: $nty,)*)?
            $(#[doc = concat!("`", $env, "`: ", $meaning)] pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> $name {
                $name { $($($nested: <$nty>::default(),)*)? $($field: $default,)* }
            }
        }

        impl $name {
            fn read_knobs(get: &impl Fn(&str) -> Option<String>) -> Result<$name> {
                Ok($name {
                    $($field: knob::read(get, $env, &$kind, || $default)?,)*
                    $($($nested: <$nty>::from_lookup(get)?,)*)?
                })
            }

            /// The rows of the reference page for this struct's own knobs, in table order.
            fn knob_docs() -> Vec<knob::Doc> {
                use knob::Kind as _;
                vec![$({
                    let kind = $kind;
                    let default = knobs!(@shown kind, $default $(, $shown)?);
                    knob::Doc { name: $env, default, values: kind.values(), meaning: $meaning }
                }),*]
            }
        }
    )*};
    (@shown $kind:ident, $default:expr) => { $kind.show(&$default) };
    (@shown $kind:ident, $default:expr, $shown:literal) => { String::from($shown) };
}

knobs! {
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Config {
        @nested { socket: SocketConfig, staging: StagingConfig }
        num_channels: Option<u16> = "UCCL_TCPX_NUM_CHANNELS", Opt(Int(1, MAX_CHANNELS)), None => "2; 4 from 16 cores on a net plugin", "data channels per connection; peers use the smaller of their values. Unset: the transport's default, 2 on the built-in socket transport (from 16 cores 2 of 8 sockets each), 2 below 16 cores and 4 from 16 on a net plugin (whose same-host peers, carried over sockets, take the socket transport's)";
        chunk_size: u32 = "UCCL_TCPX_CHUNK_SIZE", Size(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE), default_chunk_size(available_cores()) => "1M; 2M from 16 cores", "largest payload chunk; peers use the smaller. Chunks go round-robin over the channels; a transfer smaller than a chunk per channel is cut into a share per channel";
        window: usize = "UCCL_TCPX_WINDOW", Int(1, MAX_WINDOW), 8, "chunks in flight per channel direction; receives are posted up to twice as far ahead, within the transport's own bound";
        port: u16 = "UCCL_TCPX_PORT", Int(0, u16::MAX), 0, "control listener port; 0 takes any free one";
        ip: Option<IpAddr> = "UCCL_TCPX_IP", Opt(knob::Ip), None, "address to advertise in metadata and channel handles; when set, also the only address the control and data listeners bind";
        ifname: Option<String> = "UCCL_TCPX_IFNAME", Opt(Text("interface name")), None, "interface whose address to advertise and bind, so peers' data sockets arrive on it (else the first up, non-loopback IPv4 one, else 127.0.0.1, and the listeners bind every interface)";
        auth_key: Option<AuthKey> = "UCCL_TCPX_AUTH_KEY_FILE", Opt(KeyFile), None, "file holding a key every peer must share (16–4096 bytes, one trailing newline dropped; refused if other users may read it): each connection starts with a mutual HMAC-SHA256 challenge-response, a peer without the key is refused (−6) before anything is spent on it, and region tokens are bound to their connection. From C: `uccl_engine_set_auth_key`; threat model: docs/SECURITY.md";
        allow_dial: Vec<Cidr> = "UCCL_TCPX_ALLOW_DIAL", CIDRS, Vec::new(), "addresses or CIDR blocks (`10.0.0.0/8,fd00::/8`) the engine may dial for a peer's channels when the peer's handle names them; any other named address is replaced by the address the control connection runs between (socket transport; a plugin's handles are opaque)";
        connect_timeout: Duration = "UCCL_TCPX_CONNECT_TIMEOUT_MS", Millis(1, 3_600_000), Duration::from_secs(10), "bound on TCP connect + handshake + channel setup";
        timeout: Duration = "UCCL_TCPX_TIMEOUT_MS", Millis(100, 86_400_000), Duration::from_secs(30), "a connection with transfers pending that hears nothing from the peer's engine this long fails them with `-14` (stalled peer); also the sockets' `TCP_USER_TIMEOUT`; over several data links a socket whose link answers nothing for a quarter of it is failed over (docs/FAILOVER.md)";
        fence_timeout: Duration = "UCCL_TCPX_FENCE_TIMEOUT_MS", Millis(0, 60_000), DEFAULT_FENCE_TIMEOUT, "how long `uccl_engine_mr_destroy` waits for transport requests already posted on the region (transfers using it are cut off with `-6`); a connection still holding some then is failed, so none touches the memory once the call returns";
        idle_close: Option<Duration> = "UCCL_TCPX_IDLE_CLOSE_MS", Opt(Millis(0, 86_400_000)), None => "60000 on a plugin, else 0", "channels that moved nothing this long close (the connection stays) and the next transfer waits for new ones (TCPX: about 0.8 s); 0 never. The connector's decides, and doubles it for a connection whose channels were wanted again within it (up to 16x). Unset: 60 s on a net plugin, whose idle comms hold buffers and threads (TCPX: 67 MiB a side a connection)";
        gpu: Option<i32> = "UCCL_TCPX_GPU", Opt(Int(0, MAX_GPU_ORDINAL)), None, "CUDA ordinal of the GPU the engine serves, opened at creation (needs a CUDA driver); unset: the GPU current on the creating thread, else that of the first device-memory registration (docs/C_API.md, \"Which GPU an engine serves\")";
        transport: TransportChoice = "UCCL_TCPX_TRANSPORT", Choice(TransportChoice::NAMES, ""), TransportChoice::Auto, "`auto`: the net plugin if it loads, else the built-in socket transport (with a warning saying why); `tcpx`: the plugin or engine creation fails; `tcpxo`: GPUDirect-TCPXO's plugin (A3-Mega), which `auto` never loads since its failed init ends the process (docs/TCPXO.md); `socket`: never load a plugin";
        local_peers: LocalPeers = "UCCL_TCPX_LOCAL_PEERS", Choice(LocalPeers::NAMES, " (plugin only for tests on one host)"), LocalPeers::Socket, "where a plugin engine moves the channels of a peer on its own host: `socket`, the socket transport (GPU memory staged), since TCPX exits the process on traffic that never reached the NIC; `plugin`, **for tests against the fake NIC on one host only** (`FAKE_TCPX_SAME_HOST=allow`). Ends that differ refuse the connection";
        disable_ipc: bool = "UCCL_TCPX_DISABLE_IPC", Flag, false, "`1`: same-host peers move data over the network path like remote ones (UCCL's `UCCL_P2P_DISABLE_IPC`): the engine announces no host identity and hands out no CUDA IPC handles";
        plugin_path: Option<PathBuf> = "UCCL_TCPX_PLUGIN", Opt(FilePath), None, "the ncclNet v7 plugin; unset: `libnccl-net-$NCCL_NET_PLUGIN.so` (if set), then `libnccl-net.so`. In a process whose NCCL already loaded it, the engine loads a private copy of the file (docs/TCPX.md)";
        nccl_net_plugin: Option<String> = "NCCL_NET_PLUGIN", Opt(Text("name")), None, "NCCL's own: with `UCCL_TCPX_PLUGIN` unset, `libnccl-net-<name>.so` is tried before `libnccl-net.so`";
        net_devices: Option<Vec<usize>> = "UCCL_TCPX_NET_DEVICES", Opt(Indices(MAX_NET_DEVICES)), None => "the devices next to the GPU", "plugin devices the channels use, channel `i` on entry `i mod n`. Unset: the CUDA-capable devices under the engine's GPU's PCI root that are closest to it (NCCL's rule), or every device for an engine without a GPU";
        plugin_test_ahead: bool = "UCCL_TCPX_PLUGIN_TEST_AHEAD", Flag, true, "`1`: a net plugin's receive comm tests its next receives while earlier ones are still unpacked or copied out (the plugin progresses only inside `test`); `0`: only the oldest, to measure against";
        control_spin: Duration = "UCCL_TCPX_CONTROL_SPIN_US", Micros(MAX_SPIN_US), default_control_spin() => "200 on ≥ 8 CPUs, 20 on 2–7, else 0", "how long a thread expecting control-stream bytes (a caller waiting for an inline transfer, a control reactor thread after a turn that did work, unless it left chunks to helpers that do not poll) polls for them, yielding, before it sleeps; a reply caught meanwhile costs no wake-up";
        inline_max: u32 = "UCCL_TCPX_INLINE_MAX", Size(INLINE_LEN_FLOOR as u32, MAX_INLINE_LEN as u32), default_inline_max() => "64K on ≥ 8 CPUs, 256K below", "the longest host-memory write, read or send toward another host that rides the control stream (one round trip, the connection's reader landing it) instead of the channels (a request or an eager message, socket helpers, a Done); toward processes of this host and for device memory always 64K. The peer's setting does not matter";
        control_threads: u8 = "UCCL_TCPX_CONTROL_THREADS", Int(0, MAX_CONTROL_THREADS), 0 => "0 (one per core, at most 4)", "threads serving the engine's connections' control streams (its control reactor), each waiting in one epoll set over many connections, started as connections arrive and ended with the last one it serves";
        caller_completes: bool = "UCCL_TCPX_CALLER_COMPLETES", Flag, default_caller_completes() => "1 on ≥ 8 CPUs, else 0", "a caller blocked in `wait` on a read over the channels is woken by the transport's completions in the progress thread's place and finishes the read itself (one thread wake-up to the caller instead of two); writes always end so";
        copy_poll_spin: bool = "UCCL_TCPX_COPY_POLL_SPIN", Flag, available_cores() >= 4 => "1 on ≥ 4 CPUs, else 0", "while device copies are in flight (staged GPU chunks, same-host GPU copies of offered sends; a caller's own same-host copies are its poll's or wait's) the progress thread polls them, yielding, instead of napping 25 µs between looks (napping, a 30 µs staging copy was seen done 90-110 µs after its issue on 32 cores)";
        progress_poll: Duration = "UCCL_TCPX_PROGRESS_POLL_US", Micros(MAX_SPIN_US), default_progress_poll(available_cores()) => "200 on ≥ 8 CPUs, else 0", "while a connection has at most `UCCL_TCPX_PROGRESS_POLL_BYTES` of network chunks in flight, the idle progress thread polls (yielding) this long since it last moved something before it parks, so the last chunk's completion finds it awake: a wake-up saved per transfer, for a core per engine";
        progress_poll_bytes: u32 = "UCCL_TCPX_PROGRESS_POLL_BYTES", Size(0, 1 << 30), 1 << 20, "the most bytes of network chunks in flight on a connection for which the progress thread polls (`UCCL_TCPX_PROGRESS_POLL_US`); past it, polling took a core and the connection's lock from the threads moving a large transfer";
        early_chunk_bytes: u32 = "UCCL_TCPX_EARLY_CHUNK_BYTES", Size(0, 1 << 30), 1 << 20, "a write (or a read's target) whose chunks come to at most this posts them before it writes the control message announcing them; above, the message goes first, since the peer posts its receives only once it read it (0: messages always first)";
        host_copy_threads: usize = "UCCL_TCPX_HOST_COPY_THREADS", Int(1, MAX_HOST_COPY_THREADS), default_host_copy_threads() => "¾ of the CPUs, 1–24", "threads copying one same-host host-memory transfer of 512 KiB or more out of the peer process (`process_vm_readv`): a connection worker (at most half the CPUs' worth a process, 2 to 8) and the process's shared copy helpers, started on demand, ended after a second without work";
        host_copy_spin: Duration = "UCCL_TCPX_HOST_COPY_SPIN_US", Micros(MAX_SPIN_US), Duration::ZERO, "how long the host copy workers and helpers look for the next same-host copy before they sleep (yielding between looks), so that copies in close succession find them awake; meant for hosts with cores to spare, not measured there yet";
        host_copy_min_piece: u32 = "UCCL_TCPX_HOST_COPY_MIN_PIECE", Size(64 << 10, 4 << 20), 1 << 20, "smallest piece a shared same-host copy is cut into (two pieces per copying thread, at most 4 MiB each): fewer threads on a mid-size copy pinning pages under one page table (on 32 cores 16 MiB copies moved 30-50 % more than with 256K)";
        host_copy_network_band: Option<(u64, u64)> = "UCCL_TCPX_HOST_COPY_NETWORK_BAND", Band, default_host_copy_network_band(available_cores()) => "768K-12M on ≥ 16 CPUs, else 0", "one-sided host transfers to another process of the host longer than LO and shorter than HI take the channels over loopback TCP instead of the direct copy, which is slower there on a many-core host";
        host_copy_huge_pages: bool = "UCCL_TCPX_HOST_COPY_HUGE_PAGES", Flag, true, "the same-host host path heeds whether a transfer's source lies on transparent huge pages (the memory's owner reads its `/proc/self/smaps` at registration and tells the copying peer): such a transfer skips the network band and, up to 8 MiB, is cut into pieces of `UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE` (32 cores: 1.5-2.9x loopback TCP at 1-8 MiB, against 1.0-1.9x); a peer's word only picks the piece size within our bounds";
        host_copy_collapse: bool = "UCCL_TCPX_HOST_COPY_COLLAPSE", Flag, false, "`1`: a host region a peer process of this host copies out of (or the network band kept to the channels) is collapsed into huge pages in place, once per registration, by one thread a process (`madvise(MADV_COLLAPSE)`, Linux 6.1+; whole written 2 MiB extents, paced to a quarter of a core), since the peer's copy pins small pages one by one: 16 cores, 1-16 MiB went from about 1x to 1.3-2.7x loopback TCP. Off by default: it changes how the caller's memory is mapped";
        host_copy_huge_min_piece: u32 = "UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE", Size(64 << 10, 4 << 20), 256 << 10, "with `UCCL_TCPX_HOST_COPY_HUGE_PAGES`, the smallest piece of a same-host copy of at most 8 MiB whose source lies on huge pages, in place of `UCCL_TCPX_HOST_COPY_MIN_PIECE`";
        trace: Option<Setting> = "UCCL_TCPX_TRACE", Opt(TraceSetting), None, "`<path prefix>` or `<category>,...:<path prefix>` (categories `flow`, `socket`, `host`, `device`, `staging`; all when none is named): the process records those events (docs/TRACE.md) with time and thread, keeping the newest 2M, and writes them at exit to `<prefix>.<pid>.tsv` for `scripts/diag/`. The first engine naming a trace starts it; off, a traced step costs one relaxed load. A diagnostic";
    }

    /// Knobs of the built-in TCP transport. The socket layout keeps NCCL's names so that operators
    /// can map them: each comm opens `nthreads x nsocks_per_thread` data sockets. The threads moving
    /// them are an engine's shared helpers, `helpers` senders and as many receivers whatever the
    /// number of connections.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct SocketConfig {
        nthreads: u8 = "UCCL_TCPX_SOCKET_NTHREADS", Int(0, MAX_SOCKET_THREADS), 0 => "0 (cores / 4, at least 1; 8 from 16 cores)", "NCCL's thread count of a comm of the built-in TCP transport (`NCCL_SOCKET_NTHREADS`): with `UCCL_TCPX_NSOCKS_PERTHREAD` its data sockets, NTHREADS × NSOCKS_PERTHREAD ≤ 64. The engine's shared helpers move them";
        nsocks_per_thread: u8 = "UCCL_TCPX_NSOCKS_PERTHREAD", Int(1, 64), 1, "data sockets per NCCL thread; the connecting side's count wins";
        helpers: u8 = "UCCL_TCPX_SOCKET_HELPERS", Int(0, MAX_SOCKET_HELPERS), 0 => "0 (one per core, at most 16)", "helper threads an engine moves its data sockets with, per direction: that many senders and as many receivers serve every connection's sockets, started with the comms, one per socket they may open (so that sockets added at a transfer find them running), ended with the last comm";
        failover: bool = "UCCL_TCPX_SOCKET_FAILOVER", Flag, true, "`1`: a comm whose sockets span several data links (`UCCL_TCPX_SOCKET_IFNAME`) has the receiver acknowledge each request, so that a link that fails costs the comm that link only (docs/FAILOVER.md); `0`: no acknowledgements, and a failing link fails the connection. The connecting side's setting wins";
        lazy: bool = "UCCL_TCPX_SOCKET_LAZY", Flag, true, "`1`: a comm connects one data socket and opens the others when a request would use them, so an idle or lightly used connection holds one socket per comm and direction; `0`: every socket right after the first";
        sndbuf: u32 = "UCCL_TCPX_SOCKET_SNDBUF", Size(0, 1 << 30), 0 => "0 (kernel autotuning)", "`SO_SNDBUF` of data sockets; setting it turns the kernel's autotuning off";
        rcvbuf: u32 = "UCCL_TCPX_SOCKET_RCVBUF", Size(0, 1 << 30), 0 => "0 (kernel autotuning)", "`SO_RCVBUF` of data sockets; setting it turns the kernel's autotuning off";
        subchunk: u32 = "UCCL_TCPX_SOCKET_SUBCHUNK", Size(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE), 256 << 10, "largest piece a request is cut into (smaller requests are shared over the comm's sockets in pieces of at least 64 KiB); free sockets pull the next piece, so a slow flow takes fewer";
        spin: Duration = "UCCL_TCPX_SOCKET_SPIN_US", Micros(MAX_SPIN_US), default_spin() => "100 on ≥ 8 cores, else 0", "how long a helper that just did some work polls for more before sleeping in `epoll_wait`, past its first 20 µs only with a polling turn (`UCCL_TCPX_SOCKET_SPINNERS`); an idle connection wakes nothing. At 0 a control reactor thread does not poll either after a turn that left chunks with the data sockets";
        spin_max_request: u32 = "UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST", Size(0, MAX_SPIN_MAX_REQUEST), DEFAULT_SPIN_MAX_REQUEST, "a helper polls after work only after a piece of a request of at most this size, and sleeps at once after a larger one's, whose helpers need the cores (0: only after empty requests; the engine's requests are at most 4 MiB, so 4M: after every piece)";
        held_spin: Duration = "UCCL_TCPX_SOCKET_HELD_SPIN_US", Micros(MAX_SPIN_US), Duration::ZERO, "how long a receiving helper polls while one of its sockets holds a piece whose receive is not posted yet, past its first 20 µs only with a polling turn; 0 sleeps until the post kicks it";
        spinners: u16 = "UCCL_TCPX_SOCKET_SPINNERS", Int(1, 1024), default_spinners() => "½ of the CPUs, at least 1", "socket helpers of the process that may poll at once past the first 20 µs after their last piece; each holds a core, so more than the cores can spare slow down the helpers with work";
        kick_fanout: u8 = "UCCL_TCPX_SOCKET_KICK_FANOUT", Int(0, MAX_SOCKETS_PER_COMM as u8), DEFAULT_KICK_FANOUT, "sleeping helpers a send comm's posting thread wakes itself for one request; each socket that runs then wakes up to as many of the others, spreading the wake-ups (about 2 µs each on 32 cores) over the helpers. 0: the poster wakes every one";
        data_ifname: Option<String> = "UCCL_TCPX_SOCKET_IFNAME", Opt(Text("`NCCL_SOCKET_IFNAME` grammar")), None, "the built-in TCP transport's data links (name prefixes, `^` to exclude, `=` exact; up IPv4 interfaces, loopback only by name, at most 8): each comm opens a socket per link or more, link k to the peer's link k, faster links carrying more, failing over (docs/FAILOVER.md); the control stream stays on the engine's address. A list naming nothing fails `Engine::new`";
    }

    /// Knobs of the staged GPU path (GPU memory over a transport that moves host memory only).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct StagingConfig {
        streams: u8 = "UCCL_TCPX_STAGING_STREAMS", Int(1, 8), 2, "copy streams per staging ring; slot `i` copies on stream `i mod n`. Two let one chunk's gather or scatter kernel run beside another chunk's copy (a send comm keeps as many gathered chunks queued, whatever `UCCL_TCPX_STAGING_AHEAD` says): 8,192 scattered 16 KiB blocks went from 0.53-0.62 to 0.86-1.02 of one piece on an H100";
        ahead: u8 = "UCCL_TCPX_STAGING_AHEAD", Int(0, MAX_WINDOW as u8), 1, "device-to-host copies one send comm keeps queued (0: no limit). The copy engine drains one stream's queue before the next, so with no limit the last channel's first chunk lands after every other channel's share; 1 makes the channels' copies alternate";
        write_back: bool = "UCCL_TCPX_STAGING_WRITE_BACK", Flag, true, "receiving sockets write what lands in a staging slot back from the CPU's caches before the slot is copied up to the GPU (only the last two receives posted on a comm): a copy of lines other cores hold modified runs at a third of its speed";
        pool: u32 = "UCCL_TCPX_STAGING_POOL", Size(0, 1 << 31), 256 << 20, "staging an engine keeps idle. Over sockets, rings (pinned slots, device bounce buffers) for GPU transfers: a connection holds one only while it moves GPU memory; rings past the bound are freed once the pool has not run short for 5 s and they sat unused for 2 s. Over a net plugin, the buffers its send comms gather vectored sends into: one given back past the bound is freed once no comm made one for 5 s";
        gather: StagingGather = "UCCL_TCPX_STAGING_GATHER", Choice(StagingGather::NAMES, ""), StagingGather::Auto, "how a staged GPU chunk of several segments gets into and out of its pinned slot: `auto`, a gather/scatter kernel when the segments average below 256 KiB, else (or without the kernel) a copy per segment; `kernel`, the kernel always; `copies`, a copy per segment";
    }
}

const CIDRS: List<Cidr> = List {
    max: MAX_CIDRS,
    expected: "addresses or CIDR blocks (10.0.0.0/8, fd00::/8)",
    values: "comma list of addresses or CIDR blocks",
    item: std::marker::PhantomData,
};

/// Variables read outside [`Config`], for the reference page: (variable, default, values, meaning).
#[rustfmt::skip]
const ELSEWHERE: &[(&str, &str, &str, &str)] = &[
    ("UCCL_TCPX_LOG", "`error`", "env_logger filter", "log filter, set once per process (`init_logging`); falls back to `RUST_LOG`"),
    ("UCCL_TCPX_ADAPTER_ERRORS", "unset", "`report`, `abort`", "what the C++ `RDMAEndpoint` adapter does with a hard error of a post or a transfer, read when an endpoint is constructed; unset, `report` for `uccl::TcpxEndpoint` and `abort` for the `uccl::RDMAEndpoint` of `rdma_compat/transport.h` (docs/UCCL_ENGINE.md)"),
    ("UCCL_NUM_ENGINES", "4", "1–256", "UCCL's own, read by `rdma_compat/transport.h` for UCCL's engine (`ucclParam*()`); a value that is not an integer in range is refused by name (docs/UCCL_ENGINE.md)"),
    ("UCCL_RCMODE", "1", "0–1", "UCCL's own, as `UCCL_NUM_ENGINES`"),
    ("UCCL_NUM_GPU_RT_STREAMS", "4", "1–64", "UCCL's own, as `UCCL_NUM_ENGINES`"),
    ("UCCL_TCPX_LIB", "the package's", "path", "the library the Python package loads (docs/PYTHON.md)"),
    ("UCCL_TCPX_RENDEZVOUS_DIR", "`/dev/shm`", "path", "where the Python package's same-host rendezvous (`connect_local`) keeps its entries (docs/PYTHON.md)"),
    ("UCCL_TCPX_NIXL_PLUGIN_ROOT", "the installed one", "path", "`uccl-tcpx-nixl-plugin-dir`'s `--plugin-root`: the folder of `<version>/libplugin_TCPX.so` it links from (docs/NIXL.md)"),
    ("UCCL_TCPX_NIXL_CALL_TIMES", "unset", "path", "NIXL's backend appends to this file, per request at its release, the calls NIXL made into it, their time and whether its lists were a released request's (`scripts/nixl_plugin_bench.py --breakdown`, docs/perf-log/nixl.md)"),
    ("UCCL_TCPX_ALIAS_QUIET", "unset", "`1`", "silences the notice of the Python package's `uccl.p2p` alias (docs/PYTHON.md)"),
];

const DOC_INTRO: &str = "# Configuration

<!-- Generated from the knob table in src/config.rs by scripts/gen_config_doc.sh: edit the table, not this page. -->

Every knob is an environment variable, read when an engine is created; an empty value is the same
as unset. A malformed or out-of-range value makes `uccl_engine_create` fail with a message naming
the variable. Sizes are byte counts with optional K, M or G suffixes (binary). NIXL's backend and
the Python package take the same settings as parameters (docs/NIXL.md, docs/PYTHON.md). A variable
that was removed is named in the log (at error level, once per process) with what became of it
(`src/config/retired.rs`), instead of being ignored in silence.
";

const DOC_OUTRO: &str = "
The net plugin reads its own `NCCL_*` variables. Before its `init` the transport sets those of
`src/transport/plugin/tcpx.rs` that are unset (`NCCL_DYNAMIC_CHUNK_SIZE=524288`,
`NCCL_NSOCKS_PERTHREAD=2`, `NCCL_SOCKET_NTHREADS=1`,
`NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS=500000`, `NCCL_GPUDIRECTTCPX_FORCE_ACK=0`,
`NCCL_GPUDIRECTTCPX_TX_COMPLETION_NANOSLEEP=1000` and, if `/run/tcpx` exists,
`NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX=/run/tcpx`); NIC selection (`NCCL_GPUDIRECTTCPX_SOCKET_IFNAME`,
`_CTRL_DEV`) is left to the deployment.
";

/// The knobs' reference page (docs/CONFIG.md), rendered from the table.
pub fn reference_page() -> String {
    let elsewhere = ELSEWHERE
        .iter()
        .map(|(name, default, values, meaning)| knob::Doc {
            name,
            default: (*default).into(),
            values: (*values).into(),
            meaning,
        })
        .collect();
    let mut page = knob::render(
        DOC_INTRO,
        &[
            ("Engine", Config::knob_docs()),
            ("Built-in TCP transport", SocketConfig::knob_docs()),
            ("GPU memory staged through host memory", StagingConfig::knob_docs()),
            ("Read elsewhere", elsewhere),
        ],
    );
    page.push_str(DOC_OUTRO);
    page
}

/// Where a net-plugin engine moves the channels of a peer on its own host. `UCCL_TCPX_LOCAL_PEERS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalPeers {
    /// The built-in socket transport: TCPX never sees traffic between two ends of one host (loopback
    /// does not reach the NIC, so nothing steers it into GPU memory) and exits the process at its
    /// first receive.
    #[default]
    Socket,
    /// The net plugin, like remote peers. For tests and benchmarks of the plugin path on one host
    /// against the fake NIC only (with its `FAKE_TCPX_SAME_HOST=allow`): real TCPX cannot carry it.
    Plugin,
}

impl LocalPeers {
    const NAMES: &[(&str, LocalPeers)] = &[("socket", LocalPeers::Socket), ("plugin", LocalPeers::Plugin)];
}

/// Which transport an engine moves data with. `UCCL_TCPX_TRANSPORT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// The net plugin if one loads, else the built-in socket transport (with a warning saying why).
    #[default]
    Auto,
    /// The built-in socket transport; no plugin is ever loaded.
    Socket,
    /// The net plugin, GPUDirect-TCPX's or another's but TCPXO's; failing to load it fails
    /// engine creation.
    Tcpx,
    /// GPUDirect-TCPXO's net plugin (A3-Mega), whose failed `init` ends the process, so `auto`
    /// never loads it; failing to load it fails engine creation.
    Tcpxo,
}

impl TransportChoice {
    const NAMES: &[(&str, TransportChoice)] = &[
        ("auto", TransportChoice::Auto),
        ("socket", TransportChoice::Socket),
        ("tcpx", TransportChoice::Tcpx),
        ("tcpxo", TransportChoice::Tcpxo),
    ];

    /// The knob's value for this choice.
    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, c)| *c == self).map_or("auto", |(n, _)| n)
    }
}

/// How the staged path moves a chunk made of several device segments between them and its pinned
/// slot. `UCCL_TCPX_STAGING_GATHER` = auto | kernel | copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StagingGather {
    /// The kernel for chunks of small segments, one copy per segment otherwise (and wherever the
    /// kernel cannot be built).
    #[default]
    Auto,
    /// The kernel for every chunk of two or more segments, whatever their size: to measure where
    /// it stops paying.
    Kernel,
    /// One copy per segment always, as where the kernel cannot be built: to compare against.
    Copies,
}

impl StagingGather {
    const NAMES: &[(&str, StagingGather)] =
        &[("auto", StagingGather::Auto), ("kernel", StagingGather::Kernel), ("copies", StagingGather::Copies)];
}

/// An address block such as `10.0.0.0/8` or `fd00::/8`; a bare address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer reached through a dual-stack socket shows up as ::ffff:a.b.c.d.
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_matches(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_matches(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_matches(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let (whole, bits) = (prefix as usize / 8, prefix % 8);
    if net[..whole] != ip[..whole] {
        return false;
    }
    bits == 0 || (net[whole] ^ ip[whole]) >> (8 - bits) == 0
}

impl std::str::FromStr for Cidr {
    type Err = ();

    fn from_str(s: &str) -> std::result::Result<Cidr, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(drop)?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or(())?,
            None => max,
        };
        // An IPv4-mapped block (::ffff:10.0.0.0/104) is the IPv4 block it maps.
        match (net, net.to_canonical()) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) => Ok(Cidr { net: v4, prefix: prefix.checked_sub(96).ok_or(())? }),
            _ => Ok(Cidr { net, prefix }),
        }
    }
}

impl StagingConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<StagingConfig> {
        StagingConfig::read_knobs(get)
    }
}

/// The kind of transport a connection's channels run on, where their defaults differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelTransport {
    /// The built-in socket transport (staged or not).
    Socket,
    /// A net plugin (TCPX): a channel is one plugin comm pair, spread over the NICs.
    Plugin,
}

/// From this many cores a host gets the large layout (more sockets, larger chunks).
const LARGE_HOST_CORES: usize = 16;

/// Channels per connection when `UCCL_TCPX_NUM_CHANNELS` is unset. Below 16 cores 2, where they
/// already keep more helper threads busy than there are cores. From 16 cores the socket transport
/// takes 2 channels of 8 sockets: flows rotate over channels, so with 4 channels each channel's
/// helpers had slept through three transfers when the next came. On a 32-core 2 x H200 host 2 x 8
/// against 4 x 4 (the same 16 sockets) took 256 KiB host transfers from 96-110 to 58-72 us p50 and
/// 1 MiB GPU0->GPU1 transfers at 4 in flight from 8.22-9.23 to 9.65-11.41 GB/s, for 256 MiB host
/// writes at 31.6-34.1 GB/s instead of 35.3-37.6. A plugin keeps 4: that measurement covered the
/// socket transport only (docs/DEFAULTS.md).
fn default_channels(transport: ChannelTransport, cores: usize) -> u16 {
    match transport {
        _ if cores < LARGE_HOST_CORES => 2,
        ChannelTransport::Socket => 2,
        ChannelTransport::Plugin => 4,
    }
}

/// Chunk size: 1 MiB below 16 cores; 2 MiB from 16, which with the larger layout took 64 MiB
/// GPU->GPU writes at 1 in flight on a 32-core host from 15.4 to 20.8 GB/s and host-memory writes
/// from 24.9 to 37.3 GB/s (docs/perf-log/socket-host-memory.md, "Default layout").
fn default_chunk_size(cores: usize) -> u32 {
    if cores >= LARGE_HOST_CORES { 2 << 20 } else { 1 << 20 }
}

/// NCCL's thread count of a socket comm when `UCCL_TCPX_SOCKET_NTHREADS` is unset (one socket each
/// by default). A transfer in one direction keeps a sending and a receiving helper busy per socket
/// on each host of a loopback pair, so below 16 cores a quarter of them (2 cores: 1 per comm); from
/// 16 cores 8, so that the 2 channels still carry 16 sockets per direction, which raw TCP needs there
/// (21-27 GB/s at 8 streams against 31-41 at 16).
fn default_socket_threads(cores: usize) -> usize {
    if cores >= LARGE_HOST_CORES { 8 } else { (cores / 4).max(1) }
}

/// A receive window's worth of posted chunks (16 per channel: 32 MiB with the small-host layout,
/// 128 MiB with a plugin's four channels of 2 MiB) drains in about 110 ms even at 10 Gb/s, so a peer that is
/// sending at all finishes them within the bound.
const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_millis(200);

fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Four: the poster wakes four sleeping helpers and the sixteen sockets of a 1 MiB write are all
/// awake after two rounds. On the 32-core host (both engines on it), over 0, 256 KiB-16 MiB round
/// trips were as fast or up to 5 % shorter (medians of eight alternated rounds); with four or fewer
/// sockets per comm (small hosts) the poster wakes them all itself, as with 0.
const DEFAULT_KICK_FANOUT: u8 = 4;

/// On a host with few cores every thread a transfer passes through costs a wake-up on a busy CPU:
/// over the channels a mid-size write passes the poster's kick, a sending helper, the target's
/// reader of the request, a receiving helper and the Done; inline only the caller and the target's
/// reader, for a copy more at each end. On the 2-core VM (nine invocations of three alternated
/// rounds against 64 KiB, msg ratio) 128 KiB reads went from .39-.52 to .73-1.06, 128 KiB writes
/// from .42-.67 to .65-.93, 256 KiB writes from .44-.56 (once .97) to .56-.70, with the target
/// copying the payload twice; stored from the read buffer since, 128 KiB writes .70-.89 and 256
/// KiB .64-.73 (four invocations against that build). 512 KiB-1 MiB stayed within their spread.
/// On a 16-core H100 host 256 KiB inline lost (256 KiB writes .57, reads .44 against .71-1.02), so
/// from 8 CPUs the floor.
fn default_inline_max() -> u32 {
    if available_cores() >= 8 { INLINE_LEN_FLOOR as u32 } else { 256 << 10 }
}

/// A reply that comes back while its reader polls costs no sleep and no wake-up on either side,
/// which is most of a small round trip (2-core VM, unpinned: 8-byte write 9.4 -> 3.1 us). With a
/// single CPU the poller would hold the core its peer needs (43.7 us on one core), so none there.
/// From 8 CPUs 200 us: on the 32-core host (both engines on it; medians of eight alternated rounds,
/// with the progress thread's poll and the kick fan-out) 64 KiB-1 MiB round trips reached .79-.87
/// of the acknowledged-message baseline against .64-.81 with 20 us and no poll; one thread per
/// engine polls, and only after a turn that did work.
fn default_control_spin() -> Duration {
    match available_cores() {
        8.. => Duration::from_micros(200),
        2.. => Duration::from_micros(20),
        _ => Duration::ZERO,
    }
}

/// A wake-up saved pays where a thread waking costs tens of microseconds on an idle core; on the
/// 2-core VM, where the woken caller and the progress thread compete with the helpers for two
/// cores, 256 KiB reads got 5-10 % slower instead (p50 over alternated rounds), so off there.
fn default_caller_completes() -> bool {
    available_cores() >= 8
}

/// One thread reading another process with `process_vm_readv` moves a few GB/s, bound by its own
/// core (the kernel pins every source page and copies page by page), so a large copy takes many:
/// on a 32-core host one moved 4-6 GB/s and eight 27, where loopback TCP moved 36 with 32 threads.
/// While one process copies, its peer mostly waits, so three quarters of the CPUs copy: on the
/// 32-core host 24 threads moved 64-256 MiB 10-25 % faster than 16 in three alternated rounds (32
/// no faster than 24). On the 2-CPU VM a second thread moved no more bytes at any size (its vCPUs
/// share one core's throughput) and made 1 MiB copies 20 % slower by its wake-up, so one thread
/// copies there.
fn default_host_copy_threads() -> usize {
    (available_cores() * 3 / 4).clamp(1, 24)
}

/// What the progress thread polls for while at most 1 MiB of network chunks is in flight, on a host
/// with cores to spare: with it (and 200 us of control-stream polling) 256 KiB round trips on the
/// 32-core host went from .64 / .68 to .77 / .81 of the acknowledged-message baseline (write /
/// read, medians of eight alternated rounds).
const PROGRESS_POLL_MANY_CORES: Duration = Duration::from_micros(200);

/// Polling for chunks pays only where the polling thread takes no core the transfer needs: below 8
/// CPUs the socket helpers moving the chunks (and the peer's, on a loopback pair) compete with it,
/// as they did with the socket helpers' own spin there, so nothing.
fn default_progress_poll(cores: usize) -> Duration {
    if cores >= 8 { PROGRESS_POLL_MANY_CORES } else { Duration::ZERO }
}

/// On the 32-core host (three alternated rounds, `uccl-tcpx-bench --same-host`), the direct copy
/// against our loopback TCP path, write / read: 1 MiB 1.66 / 0.83, 2 MiB 0.74 / 0.82, 3 MiB 0.55 /
/// 0.65, 4 MiB 0.64 / 0.67, 6 MiB 0.65 / 0.74, 8 MiB 0.78 / 0.79, 12 MiB 1.02 / 1.01, 16 MiB 1.22 /
/// 1.23, 64 MiB 2.0. On the 2-CPU VM the direct copy was 1.7-2.6x loopback TCP from 1 to 64 MiB
/// (the channels' helpers have no cores to spread over), so no band below 16 CPUs. Once a 512 KiB
/// chunk rode four sockets instead of eight (protocol v15), the channels took 1 MiB too (three
/// alternated rounds, GB/s write / read: 1 MiB 10.3-11.7 / 8.6-10.1 direct against 13.6-15.4 /
/// 13.2-14.1 over them), while 768 KiB stays faster direct (9.8-12.4 / 8.4-10.7 against 7.6-9.3 /
/// 6.8-7.5), so the band starts above 768 KiB.
fn default_host_copy_network_band(cores: usize) -> Option<(u64, u64)> {
    (cores >= 16).then_some((768 << 10, 12 << 20))
}

/// Half of the CPUs: two engines of one host (a loopback run) may then poll on all of them, but
/// only after pieces of small requests (`DEFAULT_SPIN_MAX_REQUEST`), whose helpers are few. On the
/// 16-core H100 host with 100 us of polling, a quarter (4 turns per engine) kept a 128 KiB
/// transfer's helpers awake in one invocation and not in the next (128 KiB reads .94, then .34 of
/// the message baseline); 8 and 16 did in most (docs/perf-log/socket-midsize.md).
fn default_spinners() -> u16 {
    (available_cores() / 2).clamp(1, 1024) as u16
}

/// Spinning pays only with cores to spare: on a small host a spinning helper takes the core that
/// the thread it waits for needs (on 2 cores, 20 us of spin made an 8-byte round trip 5x slower).
/// From 8 cores 100 us: a 128 KiB transfer at one in flight comes back every 40-55 us, so after
/// 20 us its helpers slept and each transfer paid their wake-ups on both ends. On the 16-core H100
/// host, 128 KiB write / read / send over the message baseline: .28-.83 / .69-.84 / .68-.81 in
/// twelve invocations of three rounds at 20 us, .90-1.06 / .61-1.14 / .82-.96 in ten at 100 us
/// (8 or 16 polling turns); 64 KiB-16 MiB within their spread. Polling follows only pieces of
/// small requests (`DEFAULT_SPIN_MAX_REQUEST`): once every piece was followed by a poll, 400 us
/// made 16-64 MiB transfers 15-35 % slower on the 32-core host, the polling helpers holding cores
/// the busy ones needed.
fn default_spin() -> Duration {
    if available_cores() >= 8 { Duration::from_micros(100) } else { Duration::ZERO }
}

/// Polling after the pieces of larger requests holds cores their busy helpers need. On a 16-core
/// H200 host (both engines on it; two invocations of three alternated rounds, medians, msg ratio
/// write / read at one in flight), polling only after pieces of requests up to 256 KiB against
/// after every piece: 1 MiB 1.29-1.43 / 1.32-1.52 against 1.05-1.08 / 1.11-1.22, 4 MiB .99-1.05 /
/// 1.00-1.02 against .76-.78 / .78-.82, 64 MiB .88-.89 / .86-.91 against .81-.82 / .82-.86; GPU at
/// four in flight 1-16 MiB mostly faster (1 MiB writes 12.3-12.4 against 11.0-11.2 GB/s). A staged
/// 256 KiB GPU write at one in flight stays polled for: 99.8-104 against 90.5-100.6 us p50 (no
/// poll at all made it 131-134 against 93-99 on a 32-core host).
///
/// 128 KiB since: the engine cuts a flow of 256-512 KiB into 256 KiB chunks, one per channel
/// (`engine::plan::MIN_SPREAD_CHUNK`), so with a 256 KiB bound every piece of a 512 KiB transfer
/// was followed by a poll, eight sending and eight receiving helpers per end with the 16-core
/// layout: with both engines on one 16-core H100 host that is every core, held while the threads
/// that finish the transfer (the target's Done, the caller) waited for one. Polling after requests
/// up to 128 KiB, six alternated rounds in two invocations: 512 KiB writes .50-.57 -> .70-.82 of
/// the acknowledged-message baseline (p50 98-109 -> 68-77 us), reads .59-.63 -> .67-.81; 128 KiB
/// to 4 MiB level; a staged 256 KiB GPU write at one in flight 116-132 us p50 against 112-129
/// (docs/perf-log/socket-midsize.md).
///
/// 512 KiB since the helpers yield between polls that find nothing: what held the transfer back
/// was not the cores polling but the threads woken onto them, which waited out each poll. With
/// the yield, polling after requests up to 512 KiB, four invocations of three rounds on the
/// 16-core H100 host against the 128 KiB bound without it: 256 KiB write / read / send .50-1.00 /
/// .74-.98 / .71-.91 against .41-.78 / .59-.82 / .73-.78, 512 KiB 1.04-1.19 / .96-1.22 / .80-.86
/// against .68-.84 / .70-.74 / .71-.79, 1 MiB .95-1.70 against 1.18-1.34; 64 KiB, 128 KiB and
/// 4-16 MiB within their spread. Without the yield the same bound took 256 KiB-1 MiB to .19-.92.
const DEFAULT_SPIN_MAX_REQUEST: u32 = 512 << 10;

impl SocketConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<SocketConfig> {
        let socket = SocketConfig::read_knobs(get)?;
        let (nthreads, nsocks_per_thread) = (socket.nthreads, socket.nsocks_per_thread);
        if nthreads as usize * nsocks_per_thread as usize > MAX_SOCKETS_PER_COMM {
            return Err(Error::invalid(format!(
                "UCCL_TCPX_SOCKET_NTHREADS={nthreads} x UCCL_TCPX_NSOCKS_PERTHREAD={nsocks_per_thread} \
                 exceeds {MAX_SOCKETS_PER_COMM} sockets per comm"
            )));
        }
        Ok(socket)
    }

    /// NCCL's thread count of a comm: the knob, else a quarter of the cores below 16 cores and 8
    /// from 16 ([`default_socket_threads`]).
    pub fn threads_per_comm(&self) -> usize {
        if self.nthreads != 0 {
            return self.nthreads as usize;
        }
        default_socket_threads(available_cores())
    }

    pub fn spinners(&self) -> usize {
        self.spinners as usize
    }

    pub fn kick_fanout(&self) -> usize {
        self.kick_fanout as usize
    }

    /// Data sockets per comm, capped like NCCL at 64.
    pub fn sockets_per_comm(&self) -> usize {
        (self.threads_per_comm() * self.nsocks_per_thread as usize).min(MAX_SOCKETS_PER_COMM)
    }

    /// Helper threads per direction: the knob, else one per core up to 16. One connection's
    /// default layout (channels x sockets per comm: 2 on 2 cores, 16 from 16 cores) then still has
    /// a helper per socket, as it had when every comm started its own.
    pub fn helpers_per_direction(&self) -> usize {
        if self.helpers != 0 {
            return self.helpers as usize;
        }
        available_cores().clamp(1, 16)
    }
}

impl Config {
    /// The channels a connection of an engine whose channels run on `transport` offers: the knob,
    /// else that transport's default for this host.
    pub fn channels_for(&self, transport: ChannelTransport) -> u16 {
        self.num_channels.unwrap_or_else(|| default_channels(transport, available_cores()))
    }

    /// How many control reactor threads an engine may run (`control_threads`, resolved).
    pub fn control_threads_per_engine(&self) -> usize {
        if self.control_threads != 0 { self.control_threads as usize } else { available_cores().min(4) }
    }

    /// Whether a control reactor thread polls (`control_spin`) after a turn that left chunks with
    /// the data sockets: only where their helpers poll too (`UCCL_TCPX_SOCKET_SPIN_US`, from 8
    /// cores). Where they sleep instead, cores are few, and a reactor polling beside the helpers
    /// it just woke delays them (docs/perf-log/socket-midsize.md).
    pub fn control_polls_past_chunks(&self) -> bool {
        !self.socket.spin.is_zero()
    }

    pub fn from_env() -> Result<Config> {
        report_retired();
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// The environment's settings with `overrides` (by setting name) taking precedence.
    pub fn from_env_with(overrides: impl Fn(&str) -> Option<String>) -> Result<Config> {
        report_retired();
        Config::from_lookup(|name| overrides(name).or_else(|| std::env::var(name).ok()))
    }

    /// Every knob as `lookup` has it; a value that is empty once trimmed is unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let get = |name: &str| lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        Config::read_knobs(&get)
    }
}

/// Logs the environment's removed variables (`retired.rs`), the first time an engine's settings are
/// read from it.
fn report_retired() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for line in retired::set_in(|name| std::env::var(name).ok()) {
            // Error, not warn: the default log level shows errors only, and this must be seen.
            log::error!("{line}");
        }
    });
}

/// Sets up logging from `UCCL_TCPX_LOG` (else `RUST_LOG`); quiet (errors only) by default. Safe to
/// call repeatedly and alongside another logger in the process.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = log_filter(|name| std::env::var(name).ok());
        let _ = env_logger::Builder::new().parse_filters(&filter).try_init();
    });
}

/// Logging is set up once per process, not per engine, so this knob is not part of [`Config`].
fn log_filter(lookup: impl Fn(&str) -> Option<String>) -> String {
    lookup("UCCL_TCPX_LOG").or_else(|| lookup("RUST_LOG")).unwrap_or_else(|| "error".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_when_unset_or_empty() {
        assert_eq!(cfg(&[]).unwrap(), Config::default());
        assert_eq!(cfg(&[("UCCL_TCPX_NUM_CHANNELS", " ")]).unwrap(), Config::default());
    }

    #[test]
    fn parses_every_knob() {
        let c = cfg(&[
            ("UCCL_TCPX_NUM_CHANNELS", "4"),
            ("UCCL_TCPX_CHUNK_SIZE", "512K"),
            ("UCCL_TCPX_WINDOW", "16"),
            ("UCCL_TCPX_PORT", "6000"),
            ("UCCL_TCPX_IP", "127.0.0.1"),
            ("UCCL_TCPX_IFNAME", "lo"),
            ("UCCL_TCPX_CONNECT_TIMEOUT_MS", "250"),
            ("UCCL_TCPX_TIMEOUT_MS", "1500"),
            ("UCCL_TCPX_FENCE_TIMEOUT_MS", "0"),
            ("UCCL_TCPX_GPU", "3"),
            ("UCCL_TCPX_TRANSPORT", "TCPX"),
            ("UCCL_TCPX_PLUGIN", "/opt/tcpx/libnccl-net.so"),
            ("NCCL_NET_PLUGIN", "tcpx"),
            ("UCCL_TCPX_NET_DEVICES", "1, 3,1"),
            ("UCCL_TCPX_CONTROL_SPIN_US", "75"),
            ("UCCL_TCPX_ALLOW_DIAL", "10.0.0.0/8, 192.168.1.7,fd00::/8"),
            ("UCCL_TCPX_DISABLE_IPC", "1"),
            ("UCCL_TCPX_LOCAL_PEERS", "Plugin"),
            ("UCCL_TCPX_PLUGIN_TEST_AHEAD", "0"),
            ("UCCL_TCPX_HOST_COPY_THREADS", "24"),
        ])
        .unwrap();
        let ips = |list: &[&str]| list.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
        let allowed = |ip: IpAddr| c.allow_dial.iter().any(|b| b.contains(ip));
        for ip in ips(&["10.0.0.1", "10.255.255.255", "192.168.1.7", "fd12::1", "::ffff:10.1.2.3"]) {
            assert!(allowed(ip), "{ip} should be allowed");
        }
        for ip in ips(&["11.0.0.1", "9.255.255.255", "192.168.1.8", "fe80::1", "::1", "127.0.0.1"]) {
            assert!(!allowed(ip), "{ip} should not be allowed");
        }
        assert_eq!(c.transport, TransportChoice::Tcpx);
        assert_eq!(c.plugin_path.as_deref(), Some(std::path::Path::new("/opt/tcpx/libnccl-net.so")));
        assert_eq!(c.nccl_net_plugin.as_deref(), Some("tcpx"));
        assert_eq!(c.net_devices, Some(vec![1, 3, 1]));
        assert_eq!(cfg(&[("UCCL_TCPX_TRANSPORT", "socket")]).unwrap().transport, TransportChoice::Socket);
        assert_eq!(cfg(&[("UCCL_TCPX_TRANSPORT", "auto")]).unwrap().transport, TransportChoice::Auto);
        assert_eq!(c.num_channels, Some(4));
        assert_eq!(c.chunk_size, 512 << 10);
        assert_eq!(c.window, 16);
        assert_eq!(c.port, 6000);
        assert_eq!(c.ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.ifname.as_deref(), Some("lo"));
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.fence_timeout, Duration::ZERO);
        assert_eq!(c.gpu, Some(3));
        assert_eq!(c.control_spin, Duration::from_micros(75));
        assert!(c.disable_ipc);
        assert!(!cfg(&[]).unwrap().disable_ipc);
        assert_eq!(c.local_peers, LocalPeers::Plugin);
        assert_eq!(cfg(&[]).unwrap().local_peers, LocalPeers::Socket);
        assert_eq!(cfg(&[("UCCL_TCPX_LOCAL_PEERS", "socket")]).unwrap().local_peers, LocalPeers::Socket);
        assert!(!c.plugin_test_ahead);
        assert_eq!(c.host_copy_threads, 24);
        let cores = available_cores();
        let default = cfg(&[]).unwrap().host_copy_threads;
        assert_eq!(default, (cores * 3 / 4).clamp(1, 24), "three quarters of {cores} cores, 1 to 24");
        assert!(cfg(&[]).unwrap().plugin_test_ahead);
        assert_eq!(cfg(&[("UCCL_TCPX_CONTROL_SPIN_US", "0")]).unwrap().control_spin, Duration::ZERO);
        assert_eq!(cfg(&[]).unwrap().control_polls_past_chunks(), cores >= 8, "{cores} cores");
        assert!(cfg(&[("UCCL_TCPX_SOCKET_SPIN_US", "50")]).unwrap().control_polls_past_chunks());
        assert!(!cfg(&[("UCCL_TCPX_SOCKET_SPIN_US", "0")]).unwrap().control_polls_past_chunks());
        assert_eq!(cfg(&[]).unwrap().caller_completes, cores >= 8, "{cores} cores");
        assert!(cfg(&[("UCCL_TCPX_CALLER_COMPLETES", "1")]).unwrap().caller_completes);
        assert!(!cfg(&[("UCCL_TCPX_CALLER_COMPLETES", "0")]).unwrap().caller_completes);
        assert_eq!(cfg(&[]).unwrap().copy_poll_spin, cores >= 4, "{cores} cores");
        assert_eq!(cfg(&[]).unwrap().socket.spinners(), (cores / 2).max(1), "{cores} cores");
        assert_eq!(cfg(&[("UCCL_TCPX_SOCKET_SPINNERS", "3")]).unwrap().socket.spinners(), 3);
        assert_eq!(cfg(&[]).unwrap().socket.kick_fanout(), DEFAULT_KICK_FANOUT as usize);
        assert_eq!(cfg(&[("UCCL_TCPX_SOCKET_KICK_FANOUT", "4")]).unwrap().socket.kick_fanout(), 4);
        assert_eq!(cfg(&[("UCCL_TCPX_SOCKET_KICK_FANOUT", "0")]).unwrap().socket.kick_fanout(), 0);
        assert!(cfg(&[("UCCL_TCPX_COPY_POLL_SPIN", "1")]).unwrap().copy_poll_spin);
        assert!(!cfg(&[("UCCL_TCPX_COPY_POLL_SPIN", "0")]).unwrap().copy_poll_spin);
        assert_eq!(cfg(&[]).unwrap().progress_poll, default_progress_poll(cores));
        assert_eq!(default_progress_poll(7), Duration::ZERO, "no polling for chunks below 8 CPUs");
        let poll = cfg(&[("UCCL_TCPX_PROGRESS_POLL_US", "300")]).unwrap().progress_poll;
        assert_eq!(poll, Duration::from_micros(300));
        assert_eq!(cfg(&[("UCCL_TCPX_PROGRESS_POLL_US", "0")]).unwrap().progress_poll, Duration::ZERO);
        assert_eq!((cfg(&[]).unwrap().progress_poll_bytes, cfg(&[]).unwrap().early_chunk_bytes), (1 << 20, 1 << 20));
        assert_eq!(cfg(&[("UCCL_TCPX_PROGRESS_POLL_BYTES", "4M")]).unwrap().progress_poll_bytes, 4 << 20);
        assert_eq!(cfg(&[("UCCL_TCPX_EARLY_CHUNK_BYTES", "0")]).unwrap().early_chunk_bytes, 0);
        assert_eq!(cfg(&[("UCCL_TCPX_EARLY_CHUNK_BYTES", "256K")]).unwrap().early_chunk_bytes, 256 << 10);
        for bad in ["2G", "lots", "-1"] {
            assert!(cfg(&[("UCCL_TCPX_EARLY_CHUNK_BYTES", bad)]).is_err(), "{bad}");
            assert!(cfg(&[("UCCL_TCPX_PROGRESS_POLL_BYTES", bad)]).is_err(), "{bad}");
        }
        assert_eq!(cfg(&[("UCCL_TCPX_CONTROL_THREADS", "3")]).unwrap().control_threads_per_engine(), 3);
        assert_eq!(cfg(&[]).unwrap().control_threads_per_engine(), available_cores().min(4));
        assert!(cfg(&[("UCCL_TCPX_CONTROL_THREADS", "65")]).is_err());
        assert_eq!(cfg(&[("UCCL_TCPX_CHUNK_SIZE", "4M")]).unwrap().chunk_size, 4 << 20);
    }

    #[test]
    fn parses_staging_knobs() {
        let c = cfg(&[("UCCL_TCPX_STAGING_STREAMS", "2"), ("UCCL_TCPX_STAGING_AHEAD", "3")]).unwrap().staging;
        assert_eq!(
            c,
            StagingConfig { streams: 2, ahead: 3, gather: StagingGather::Auto, write_back: true, pool: 256 << 20 }
        );
        assert!(!cfg(&[("UCCL_TCPX_STAGING_WRITE_BACK", "0")]).unwrap().staging.write_back);
        assert!(cfg(&[("UCCL_TCPX_STAGING_WRITE_BACK", "2")]).is_err());
        assert_eq!(cfg(&[("UCCL_TCPX_STAGING_AHEAD", "0")]).unwrap().staging.ahead, 0);
        for (value, gather) in
            [("auto", StagingGather::Auto), ("Kernel", StagingGather::Kernel), ("copies", StagingGather::Copies)]
        {
            assert_eq!(cfg(&[("UCCL_TCPX_STAGING_GATHER", value)]).unwrap().staging.gather, gather);
        }
        assert_eq!(cfg(&[]).unwrap().trace, None);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE", "")]).unwrap().trace, None);
        let traced = cfg(&[("UCCL_TCPX_TRACE", "socket,flow:/tmp/t")]).unwrap().trace.unwrap();
        assert_eq!((traced.prefix.as_str(), traced.categories), ("/tmp/t", crate::trace::FLOW | crate::trace::SOCKET));
        let err = cfg(&[("UCCL_TCPX_TRACE", "flows:/tmp/t")]).unwrap_err();
        assert!(err.message().contains("UCCL_TCPX_TRACE") && err.message().contains("`flows`"), "{err}");
        assert_eq!(cfg(&[("UCCL_TCPX_HOST_COPY_SPIN_US", "0")]).unwrap().host_copy_spin, Duration::ZERO);
        assert_eq!(cfg(&[("UCCL_TCPX_HOST_COPY_SPIN_US", "75")]).unwrap().host_copy_spin, Duration::from_micros(75));
        assert_eq!(cfg(&[]).unwrap().host_copy_min_piece, 1 << 20);
        assert_eq!(cfg(&[]).unwrap().host_copy_network_band, default_host_copy_network_band(available_cores()));
        assert_eq!(default_host_copy_network_band(2), None, "the direct copy wins everywhere on 2 CPUs");
        assert_eq!(default_host_copy_network_band(32), Some((768 << 10, 12 << 20)));
        let band = |v: &str| cfg(&[("UCCL_TCPX_HOST_COPY_NETWORK_BAND", v)]).map(|c| c.host_copy_network_band);
        assert_eq!(band("2M-8M").unwrap(), Some((2 << 20, 8 << 20)));
        assert_eq!(band(" 512K - 1G ").unwrap(), Some((512 << 10, 1 << 30)));
        assert_eq!(band("0").unwrap(), None);
        for wrong in ["8M-2M", "4M-4M", "4M", "-4M", "1M-", "x-2M"] {
            let err = band(wrong).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_HOST_COPY_NETWORK_BAND"), "{wrong:?}: {err}");
        }
        assert_eq!(cfg(&[("UCCL_TCPX_HOST_COPY_MIN_PIECE", "2M")]).unwrap().host_copy_min_piece, 2 << 20);
        for bad in ["32K", "8M", "x"] {
            let err = cfg(&[("UCCL_TCPX_HOST_COPY_MIN_PIECE", bad)]).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_HOST_COPY_MIN_PIECE"), "{err}");
        }
        assert!(cfg(&[]).unwrap().host_copy_huge_pages, "on by default");
        assert!(cfg(&[("UCCL_TCPX_HOST_COPY_HUGE_PAGES", "1")]).unwrap().host_copy_huge_pages);
        assert!(!cfg(&[("UCCL_TCPX_HOST_COPY_HUGE_PAGES", "0")]).unwrap().host_copy_huge_pages);
        assert!(!cfg(&[]).unwrap().host_copy_collapse, "opt-in");
        assert!(cfg(&[("UCCL_TCPX_HOST_COPY_COLLAPSE", "1")]).unwrap().host_copy_collapse);
        assert!(!cfg(&[("UCCL_TCPX_HOST_COPY_COLLAPSE", "0")]).unwrap().host_copy_collapse);
        assert!(
            cfg(&[("UCCL_TCPX_HOST_COPY_COLLAPSE", "2")])
                .unwrap_err()
                .message()
                .contains("UCCL_TCPX_HOST_COPY_COLLAPSE")
        );
        for bad in ["2", "yes", "-1"] {
            let err = cfg(&[("UCCL_TCPX_HOST_COPY_HUGE_PAGES", bad)]).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_HOST_COPY_HUGE_PAGES"), "{bad:?}: {err}");
        }
        assert_eq!(cfg(&[]).unwrap().host_copy_huge_min_piece, 256 << 10);
        assert_eq!(cfg(&[("UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE", "512K")]).unwrap().host_copy_huge_min_piece, 512 << 10);
        for bad in ["32K", "8M", "x"] {
            let err = cfg(&[("UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE", bad)]).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE"), "{bad:?}: {err}");
        }
        for (name, value) in [
            ("UCCL_TCPX_TRACE", "host,gpu:/tmp/t"),
            ("UCCL_TCPX_STAGING_STREAMS", "0"),
            ("UCCL_TCPX_STAGING_STREAMS", "9"),
            ("UCCL_TCPX_STAGING_AHEAD", "17"),
            ("UCCL_TCPX_STAGING_GATHER", "each"),
        ] {
            let err = cfg(&[(name, value)]).unwrap_err();
            assert!(err.message().contains(name), "{err}");
        }
    }

    #[test]
    fn parses_socket_knobs() {
        let c = cfg(&[
            ("UCCL_TCPX_SOCKET_NTHREADS", "4"),
            ("UCCL_TCPX_NSOCKS_PERTHREAD", "2"),
            ("UCCL_TCPX_SOCKET_SNDBUF", "4M"),
            ("UCCL_TCPX_SOCKET_RCVBUF", "8M"),
            ("UCCL_TCPX_SOCKET_SUBCHUNK", "128K"),
            ("UCCL_TCPX_SOCKET_SPIN_US", "0"),
            ("UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST", "1M"),
            ("UCCL_TCPX_SOCKET_HELPERS", "3"),
            ("UCCL_TCPX_SOCKET_LAZY", "0"),
        ])
        .unwrap()
        .socket;
        assert!(!c.lazy);
        assert!(SocketConfig::default().lazy, "sockets open as traffic needs them by default");
        assert_eq!((c.helpers, c.helpers_per_direction()), (3, 3));
        assert_eq!((c.nthreads, c.nsocks_per_thread), (4, 2));
        assert_eq!((c.threads_per_comm(), c.sockets_per_comm()), (4, 8));
        assert_eq!((c.sndbuf, c.rcvbuf), (4 << 20, 8 << 20));
        assert_eq!((c.subchunk, c.spin), (128 << 10, Duration::ZERO));
        assert_eq!(c.spin_max_request, 1 << 20);
        assert_eq!(SocketConfig::default().spin_max_request, 512 << 10);
        let auto = SocketConfig::default();
        assert_eq!(auto.threads_per_comm(), default_socket_threads(available_cores()));
        assert_eq!(auto.sockets_per_comm(), auto.threads_per_comm());
        assert!((1..=16).contains(&auto.helpers_per_direction()), "auto picks 1 to 16 helpers");
        let err = cfg(&[("UCCL_TCPX_SOCKET_NTHREADS", "16"), ("UCCL_TCPX_NSOCKS_PERTHREAD", "8")]).unwrap_err();
        assert!(err.message().contains("64 sockets"), "{}", err.message());
    }

    /// The layout each host size gets with the knobs unset, per transport. From 16 cores the socket
    /// transport keeps 16 sockets per direction in 2 channels of 8; a plugin keeps 4 channels.
    #[test]
    fn layout_defaults_by_core_count_and_transport() {
        use ChannelTransport::{Plugin, Socket};
        // (cores, socket channels, plugin channels, chunk, socket threads per comm)
        for (cores, socket, plugin, chunk, threads) in [
            (1, 2, 2, 1 << 20, 1),
            (2, 2, 2, 1 << 20, 1),
            (4, 2, 2, 1 << 20, 1),
            (8, 2, 2, 1 << 20, 2),
            (15, 2, 2, 1 << 20, 3),
            (16, 2, 4, 2 << 20, 8),
            (32, 2, 4, 2 << 20, 8),
            (192, 2, 4, 2 << 20, 8),
        ] {
            assert_eq!(default_channels(Socket, cores), socket, "{cores} cores, socket transport");
            assert_eq!(default_channels(Plugin, cores), plugin, "{cores} cores, plugin");
            assert_eq!(default_chunk_size(cores), chunk, "{cores} cores");
            assert_eq!(default_socket_threads(cores), threads, "{cores} cores");
        }
        // Unset until the transport is known; then the transport's default, on this host too.
        let unset = cfg(&[]).unwrap();
        assert_eq!(unset.num_channels, None);
        assert_eq!(unset.chunk_size, default_chunk_size(available_cores()));
        for kind in [Socket, Plugin] {
            assert_eq!(unset.channels_for(kind), default_channels(kind, available_cores()));
            // The knob wins over either transport's default, also where it equals neither.
            for n in ["1", "3", "4", "64"] {
                let set = cfg(&[("UCCL_TCPX_NUM_CHANNELS", n)]).unwrap();
                assert_eq!(set.channels_for(kind).to_string(), n, "{kind:?}");
            }
        }
    }

    #[test]
    fn rejects_out_of_range_and_garbage_naming_the_variable() {
        for (k, v) in [
            ("UCCL_TCPX_NUM_CHANNELS", "0"),
            ("UCCL_TCPX_NUM_CHANNELS", "65"),
            ("UCCL_TCPX_NUM_CHANNELS", "two"),
            ("UCCL_TCPX_CHUNK_SIZE", "5M"),
            ("UCCL_TCPX_CHUNK_SIZE", "1K"),
            ("UCCL_TCPX_CHUNK_SIZE", "99999999999999999999M"),
            ("UCCL_TCPX_WINDOW", "17"),
            ("UCCL_TCPX_PORT", "70000"),
            ("UCCL_TCPX_IP", "not-an-ip"),
            ("UCCL_TCPX_CONNECT_TIMEOUT_MS", "0"),
            ("UCCL_TCPX_TIMEOUT_MS", "99"),
            ("UCCL_TCPX_FENCE_TIMEOUT_MS", "60001"),
            ("UCCL_TCPX_SOCKET_NTHREADS", "17"),
            ("UCCL_TCPX_NSOCKS_PERTHREAD", "0"),
            ("UCCL_TCPX_SOCKET_SNDBUF", "2G"),
            ("UCCL_TCPX_SOCKET_SUBCHUNK", "1K"),
            ("UCCL_TCPX_SOCKET_LAZY", "2"),
            ("UCCL_TCPX_SOCKET_SUBCHUNK", "x"),
            ("UCCL_TCPX_SOCKET_SPIN_US", "-1"),
            ("UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST", "2G"),
            ("UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST", "some"),
            ("UCCL_TCPX_CONTROL_SPIN_US", "-1"),
            ("UCCL_TCPX_CONTROL_SPIN_US", "2000000"),
            ("UCCL_TCPX_CALLER_COMPLETES", "2"),
            ("UCCL_TCPX_COPY_POLL_SPIN", "2"),
            ("UCCL_TCPX_PROGRESS_POLL_US", "1000001"),
            ("UCCL_TCPX_PROGRESS_POLL_US", "-5"),
            ("UCCL_TCPX_SOCKET_SPINNERS", "0"),
            ("UCCL_TCPX_SOCKET_SPINNERS", "1025"),
            ("UCCL_TCPX_SOCKET_KICK_FANOUT", "65"),
            ("UCCL_TCPX_SOCKET_KICK_FANOUT", "-1"),
            ("UCCL_TCPX_SOCKET_HELPERS", "65"),
            ("UCCL_TCPX_DISABLE_IPC", "2"),
            ("UCCL_TCPX_DISABLE_IPC", "yes"),
            ("UCCL_TCPX_PLUGIN_TEST_AHEAD", "2"),
            ("UCCL_TCPX_HOST_COPY_THREADS", "0"),
            ("UCCL_TCPX_HOST_COPY_THREADS", "65"),
            ("UCCL_TCPX_GPU", "-1"),
            ("UCCL_TCPX_GPU", "gpu0"),
            ("UCCL_TCPX_GPU", "0000:4a:00.0"),
            ("UCCL_TCPX_TRANSPORT", "rdma"),
            ("UCCL_TCPX_LOCAL_PEERS", "loopback"),
            ("UCCL_TCPX_NET_DEVICES", "0,,1"),
            ("UCCL_TCPX_NET_DEVICES", "-1"),
            ("UCCL_TCPX_NET_DEVICES", "64"),
            ("UCCL_TCPX_NET_DEVICES", "eth1"),
            ("UCCL_TCPX_ALLOW_DIAL", "10.0.0.0/33"),
            ("UCCL_TCPX_ALLOW_DIAL", "10.0.0.0/8,,"),
            ("UCCL_TCPX_ALLOW_DIAL", "host.example"),
            ("UCCL_TCPX_ALLOW_DIAL", "fd00::/129"),
        ] {
            let err = cfg(&[(k, v)]).unwrap_err();
            assert_eq!(err.status(), crate::error::UcclStatus::ErrInvalidParam);
            assert!(err.message().contains(k), "{k}={v}: {}", err.message());
        }
    }

    /// The messages of the table's kinds, word for word as each knob's own parser wrote them.
    #[test]
    fn refusals_say_what_was_expected() {
        let message = |k: &str, v: &str| cfg(&[(k, v)]).unwrap_err().message().to_owned();
        for (k, v, expected) in [
            ("UCCL_TCPX_WINDOW", "17", "an integer in 1..=16"),
            ("UCCL_TCPX_NUM_CHANNELS", "two", "an integer in 1..=64"),
            ("UCCL_TCPX_GPU", "-1", "an integer in 0..=1023"),
            ("UCCL_TCPX_DISABLE_IPC", "yes", "an integer in 0..=1"),
            ("UCCL_TCPX_TIMEOUT_MS", "99", "an integer in 100..=86400000"),
            ("UCCL_TCPX_SOCKET_SPIN_US", "-1", "an integer in 0..=1000000"),
            ("UCCL_TCPX_CHUNK_SIZE", "5M", "a size in 4096..=4194304 bytes (K, M and G suffixes allowed)"),
            ("UCCL_TCPX_TRANSPORT", "rdma", "auto, socket, tcpx or tcpxo"),
            ("UCCL_TCPX_LOCAL_PEERS", "loopback", "socket or plugin (plugin only for tests on one host)"),
            ("UCCL_TCPX_STAGING_GATHER", "each", "auto, kernel or copies"),
            ("UCCL_TCPX_IP", "not-an-ip", "an IPv4 or IPv6 address"),
            ("UCCL_TCPX_NET_DEVICES", "0,,1", "a comma-separated list of 1..=64 device indices below 64"),
            (
                "UCCL_TCPX_ALLOW_DIAL",
                "host.example",
                "a comma-separated list of up to 256 addresses or CIDR blocks (10.0.0.0/8, fd00::/8)",
            ),
            ("UCCL_TCPX_HOST_COPY_NETWORK_BAND", "8M-2M", "LO-HI with LO below HI (K, M and G suffixes allowed), or 0"),
        ] {
            assert_eq!(message(k, v), format!("environment variable {k}={v:?} is invalid: expected {expected}"));
        }
    }

    /// What the engine ran with before the knobs became a table, read through it: a change of a
    /// default shows up here as well as on the reference page.
    #[test]
    fn defaults_are_the_values_the_engine_ran_with() {
        let c = Config::default();
        assert_eq!(cfg(&[]).unwrap(), c, "unset knobs read as the defaults");
        assert_eq!((c.num_channels, c.window, c.port, c.ip, c.ifname.as_deref()), (None, 8, 0, None, None));
        assert_eq!(c.connect_timeout, Duration::from_millis(10_000));
        assert_eq!(c.timeout, Duration::from_millis(30_000));
        assert_eq!(c.fence_timeout, Duration::from_millis(200));
        assert_eq!((c.gpu, c.transport, c.local_peers), (None, TransportChoice::Auto, LocalPeers::Socket));
        assert_eq!((c.plugin_path, c.nccl_net_plugin, c.net_devices), (None, None, None));
        assert!(c.plugin_test_ahead && !c.disable_ipc && c.allow_dial.is_empty() && c.auth_key.is_none());
        assert_eq!((c.progress_poll_bytes, c.early_chunk_bytes, c.control_threads), (1 << 20, 1 << 20, 0));
        assert_eq!(c.trace, None);
        assert_eq!((c.host_copy_spin, c.host_copy_min_piece), (Duration::ZERO, 1 << 20));
        assert!(c.host_copy_huge_pages && !c.host_copy_collapse);
        assert_eq!(c.host_copy_huge_min_piece, 256 << 10);
        let s = &c.socket;
        assert_eq!((s.nthreads, s.nsocks_per_thread, s.helpers, s.sndbuf, s.rcvbuf), (0, 1, 0, 0, 0));
        assert_eq!((s.subchunk, s.spin_max_request, s.held_spin), (256 << 10, 512 << 10, Duration::ZERO));
        assert_eq!((s.kick_fanout, s.lazy, s.data_ifname.as_deref()), (4, true, None));
        let staging =
            StagingConfig { streams: 2, ahead: 1, gather: StagingGather::Auto, write_back: true, pool: 256 << 20 };
        assert_eq!(c.staging, staging);
        // The defaults that follow the host, on this host and on the sizes they were measured on.
        let cores = available_cores();
        assert_eq!(c.chunk_size, if cores >= 16 { 2 << 20 } else { 1 << 20 });
        assert_eq!(
            c.control_spin,
            Duration::from_micros(if cores >= 8 {
                200
            } else if cores >= 2 {
                20
            } else {
                0
            })
        );
        assert_eq!((c.caller_completes, c.copy_poll_spin), (cores >= 8, cores >= 4));
        assert_eq!(c.progress_poll, Duration::from_micros(if cores >= 8 { 200 } else { 0 }));
        assert_eq!(c.host_copy_threads, (cores * 3 / 4).clamp(1, 24));
        assert_eq!(c.host_copy_network_band, (cores >= 16).then_some((768 << 10, 12 << 20)));
        assert_eq!(s.spin, Duration::from_micros(if cores >= 8 { 100 } else { 0 }));
        assert_eq!(s.spinners, (cores / 2).clamp(1, 1024) as u16);
        assert_eq!([2, 32].map(default_chunk_size), [1 << 20, 2 << 20]);
        assert_eq!([2, 32].map(default_host_copy_network_band), [None, Some((768 << 10, 12 << 20))]);
    }

    /// The table is the whole configuration: parsing asks for exactly the variables the reference
    /// page lists for it, each once.
    #[test]
    fn the_table_names_every_variable_parsing_reads() {
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            None
        })
        .unwrap();
        let mut asked = asked.into_inner();
        asked.sort();
        let mut listed: Vec<String> = [Config::knob_docs(), SocketConfig::knob_docs(), StagingConfig::knob_docs()]
            .into_iter()
            .flatten()
            .map(|d| d.name.to_owned())
            .collect();
        listed.sort();
        assert_eq!(asked, listed);
        let unique: std::collections::BTreeSet<&String> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "a variable listed twice");
        for (name, ..) in ELSEWHERE {
            assert!(
                !listed.iter().any(|l| l == name),
                "{name} is parsed by the table and also listed as read elsewhere"
            );
        }
    }

    #[test]
    fn no_removed_variable_is_read_again() {
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            None
        })
        .unwrap();
        let docs = [Config::knob_docs(), SocketConfig::knob_docs(), StagingConfig::knob_docs()];
        assert!(!asked.borrow().is_empty() && docs.iter().all(|d| !d.is_empty()));
        for (name, _) in retired::RETIRED {
            assert!(!asked.borrow().iter().any(|a| a == name), "{name} is retired and still read");
            assert!(docs.iter().flatten().all(|d| d.name != *name), "{name} is retired and still documented");
        }
    }

    /// docs/CONFIG.md as it was when this test binary was built: the test compares that, so a
    /// binary copied off its build tree (the GPU suite's bundle) checks the same page.
    const REFERENCE_PAGE: &str = include_str!("../docs/CONFIG.md");

    /// docs/CONFIG.md is the table rendered; `scripts/gen_config_doc.sh` rewrites it (in the source
    /// tree this was built from: the next build embeds the new page).
    #[test]
    fn reference_page_is_the_table_rendered() {
        let page = reference_page();
        if std::env::var_os("REGENERATE_CONFIG_DOC").is_some() {
            std::fs::write(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"), &page).unwrap();
            return;
        }
        assert!(
            REFERENCE_PAGE == page,
            "docs/CONFIG.md is not the knob table of src/config.rs rendered: run scripts/gen_config_doc.sh and commit it"
        );
        assert!(page.len() < 20 << 10, "the reference page grew to {} bytes; keep meanings short", page.len());
        for row in page.lines().filter(|l| l.starts_with("| `")) {
            assert_eq!(row.matches(" | ").count(), 3, "four cells, a `|` in a cell escaped: {row}");
        }
    }

    /// A variable read in C++, Python or Rust outside this module is on the reference page too.
    /// The sources are scanned when the library is built (build.rs), so the test needs no source
    /// tree where it runs.
    #[test]
    fn variables_read_elsewhere_are_on_the_reference_page() {
        let read: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/env_reads.rs"));
        assert!(read.iter().any(|&(_, file)| file.starts_with("python/")), "the scan reads Python too: {read:?}");
        // `"UCCL_" env` in UCCL's `UCCL_PARAM` macro is a prefix, not a variable.
        let library: Vec<_> =
            read.iter().filter(|(name, _)| name.starts_with("UCCL_") && !name.ends_with('_')).collect();
        assert!(library.iter().any(|(n, _)| *n == "UCCL_TCPX_ADAPTER_ERRORS"), "the scan finds the C++ header's read");
        let page = reference_page();
        for (name, file) in library {
            assert!(page.contains(&format!("| `{name}` |")), "{file} reads {name}, which docs/CONFIG.md does not list");
        }
    }

    #[test]
    fn cidr_prefixes_cut_at_any_bit() {
        let block = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(block("10.1.2.0/23").contains(ip("10.1.3.255")));
        assert!(!block("10.1.2.0/23").contains(ip("10.1.4.0")));
        assert!(block("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!block("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(block("127.0.0.2").contains(ip("127.0.0.2")));
        assert!(!block("127.0.0.2").contains(ip("127.0.0.1")));
        assert!(block("2001:db8::/33").contains(ip("2001:db8:7fff::1")));
        assert!(!block("2001:db8::/33").contains(ip("2001:db8:8000::1")));
        assert!(block("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")), "an IPv4-mapped block is an IPv4 block");
    }

    #[test]
    fn log_filter_prefers_its_own_variable_then_rust_log_then_errors_only() {
        let both = |n: &str| Some(if n == "UCCL_TCPX_LOG" { "debug" } else { "trace" }.to_owned());
        assert_eq!(log_filter(both), "debug");
        assert_eq!(log_filter(|n: &str| (n == "RUST_LOG").then(|| "info".to_owned())), "info");
        assert_eq!(log_filter(|_: &str| None), "error");
    }

    #[test]
    fn byte_counts_take_binary_suffixes_in_either_case() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("512k"), Some(512 << 10));
        assert_eq!(parse_bytes("4M"), Some(4 << 20));
        assert_eq!(parse_bytes("2g"), Some(2 << 30));
        assert_eq!(parse_bytes("0"), Some(0));
        for bad in ["", "K", "1.5M", "-1", "1T", "1 M", "M1", "99999999999999999999", "17179869184G"] {
            assert_eq!(parse_bytes(bad), None, "{bad:?}");
        }
        let err = cfg(&[("UCCL_TCPX_SOCKET_SNDBUF", "2G")]).unwrap_err();
        assert!(err.message().contains("G suffixes"), "{err}");
    }

    #[test]
    fn auth_key_file_is_read_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("uccl-tcpx-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let key = |path: &str| cfg(&[("UCCL_TCPX_AUTH_KEY_FILE", path)]);
        let hex = "00112233445566778899aabbccddeeff";
        let with_newline = key(&write("nl", format!("{hex}\n").as_bytes(), 0o600)).unwrap();
        assert_eq!(with_newline.auth_key, Some(AuthKey::new(hex.as_bytes()).unwrap()));
        let binary = key(&write("bin", &[0u8; 32], 0o640)).unwrap();
        assert_eq!(binary.auth_key, Some(AuthKey::new(&[0u8; 32]).unwrap()));
        assert!(format!("{binary:?}").contains("AuthKey(32 bytes)"), "the key stays out of Debug output");
        for (path, needle) in [
            (write("short", b"0123456789abcde", 0o600), "15 bytes"),
            (write("long", &[b'k'; 4097], 0o600), "4097 bytes"),
            (write("open", hex.as_bytes(), 0o604), "other users"),
            (dir.join("missing").to_str().unwrap().to_owned(), "cannot open"),
        ] {
            let err = key(&path).unwrap_err();
            assert_eq!(err.status(), crate::error::UcclStatus::ErrInvalidParam);
            assert!(err.message().contains("UCCL_TCPX_AUTH_KEY_FILE") && err.message().contains(needle), "{err}");
            assert!(!err.message().contains(hex), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
