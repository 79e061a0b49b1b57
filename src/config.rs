//! Every environment knob, parsed once per engine into a plain struct (the log filter, once per
//! process). A malformed value is an error that names the variable, never a silent default.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::AuthKey;

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

/// Which transport an engine moves data with. `UCCL_TCPX_TRANSPORT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// The net plugin if one loads, else the built-in socket transport (with a warning saying why).
    #[default]
    Auto,
    /// The built-in socket transport; no plugin is ever loaded.
    Socket,
    /// The net plugin; failing to load it fails engine creation.
    Tcpx,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Data channels per connection (each a pair of one-way comms). `UCCL_TCPX_NUM_CHANNELS`; unset,
    /// the default of the transport the engine ends up with ([`Config::channels_for`]).
    pub num_channels: Option<u16>,
    /// Payload is cut into chunks of at most this many bytes (a flow smaller than a chunk per
    /// channel into a share per channel), spread round-robin over channels. `UCCL_TCPX_CHUNK_SIZE`.
    pub chunk_size: u32,
    /// Requests in flight per comm. `UCCL_TCPX_WINDOW`.
    pub window: usize,
    /// Control listener port; 0 picks a free one. `UCCL_TCPX_PORT`.
    pub port: u16,
    /// Address advertised in metadata and channel handles. `UCCL_TCPX_IP`, else the address of
    /// `UCCL_TCPX_IFNAME`, else the first non-loopback IPv4 interface that is up.
    pub ip: Option<IpAddr>,
    pub ifname: Option<String>,
    /// Bound on connection setup (TCP connect, handshake, channel establishment). `UCCL_TCPX_CONNECT_TIMEOUT_MS`.
    pub connect_timeout: Duration,
    /// A connection with work outstanding that hears nothing from its peer for this long fails with
    /// TIMEOUT (a stalled or vanished peer); also the sockets' TCP_USER_TIMEOUT. `UCCL_TCPX_TIMEOUT_MS`.
    pub timeout: Duration,
    /// How long deregistering a region waits for transport requests already posted on it (receives
    /// the peer is still filling, sends still leaving) before it fails the connections holding them,
    /// so that none can touch the memory after the call returns. `UCCL_TCPX_FENCE_TIMEOUT_MS`.
    pub fence_timeout: Duration,
    /// Built-in TCP transport tuning (`UCCL_TCPX_SOCKET_*`, `UCCL_TCPX_NSOCKS_PERTHREAD`, ...).
    pub socket: SocketConfig,
    /// CUDA device ordinal the engine serves, chosen at creation. Unset: the GPU of the first
    /// device-memory registration. `UCCL_TCPX_GPU`.
    pub gpu: Option<i32>,
    /// `UCCL_TCPX_TRANSPORT` = auto | socket | tcpx.
    pub transport: TransportChoice,
    /// Where a plugin engine's channels to a peer on its own host go (socket | plugin; socket by
    /// default, plugin only for tests on one host). Both ends must choose alike: a connection
    /// between an engine that keeps such peers on the plugin and one that does not is refused.
    /// `UCCL_TCPX_LOCAL_PEERS`.
    pub local_peers: LocalPeers,
    /// The net plugin to load. `UCCL_TCPX_PLUGIN`; when unset, the names NCCL tries.
    pub plugin_path: Option<PathBuf>,
    /// NCCL's `NCCL_NET_PLUGIN`: try `libnccl-net-<name>.so` before `libnccl-net.so`.
    pub nccl_net_plugin: Option<String>,
    /// Plugin device indices channels use, channel `i` on entry `i % len`. `UCCL_TCPX_NET_DEVICES`;
    /// when unset, every device the plugin reports, closest to the GPU first.
    pub net_devices: Option<Vec<usize>>,
    /// How GPU memory is staged through host memory (`UCCL_TCPX_STAGING_*`, `UCCL_TCPX_TRACE_STAGING`).
    pub staging: StagingConfig,
    /// A net plugin's receive comm tests the plugin's next receives while earlier ones are still
    /// unpacked or copied out, so the plugin keeps progressing; false tests only the oldest receive
    /// (the behaviour before, for comparison). `UCCL_TCPX_PLUGIN_TEST_AHEAD` (0 or 1, default 1).
    pub plugin_test_ahead: bool,
    /// How long a thread that expects control-stream bytes polls before it sleeps: a caller
    /// waiting for an inline transfer's reply, and a control reactor thread after a turn that did
    /// work. Default 200 us when this process may run on 8 or more CPUs, 20 us on 2 to 7, else 0.
    /// `UCCL_TCPX_CONTROL_SPIN_US`.
    pub control_spin: Duration,
    /// Whether a caller waiting on a read over the channels is woken by the transport's
    /// completions in the progress thread's place and finishes the read itself (one thread
    /// wake-up between the last byte and the caller instead of two). Default on when this process
    /// may run on 8 or more CPUs, else off. `UCCL_TCPX_CALLER_COMPLETES` (0 or 1).
    pub caller_completes: bool,
    /// While device copies are in flight (staged GPU chunks, the same-host GPU path), whose end no
    /// thread is told of, the progress thread polls them without pause, yielding its core between
    /// passes, instead of napping 25 us between looks: napping, a staging copy was seen done 90-110
    /// us after it was issued on a 32-core VM, where one takes about 30. Default on when this
    /// process may run on 4 or more CPUs, else off. `UCCL_TCPX_COPY_POLL_SPIN` (0 or 1).
    pub copy_poll_spin: bool,
    /// While a connection of the engine has network chunks posted to its channels' transport and
    /// not complete, at most 1 MiB of them (a wake-up saved matters only to a short transfer), the
    /// idle progress thread keeps polling, yielding its core between passes, for
    /// up to this long since it last moved something or woke, then parks as before: the last
    /// chunk's completion then finds it awake instead of waking it (a futex wake-up and the thread's
    /// scheduling, several us on a VM, on every transfer's path at the end that finishes it). The
    /// price is one core per engine busy while transfers move, which on a small host is a core the
    /// transport's own threads need. Default 200 us when this process may run on 8 or more CPUs,
    /// else 0 (parks at once). `UCCL_TCPX_PROGRESS_POLL_US` (0 to 1,000,000).
    pub progress_poll: Duration,
    /// The most bytes of chunks in flight (all of a connection's channels) for which the idle
    /// progress thread polls (`progress_poll`). Default 1 MiB. `UCCL_TCPX_PROGRESS_POLL_BYTES`
    /// (0 to 1 GiB).
    pub progress_poll_bytes: u32,
    /// The most bytes a thread queues and posts to the channels before it writes the control
    /// messages that announce them (a write's request, a read's Data); above, the message goes
    /// first. Default 1 MiB. `UCCL_TCPX_EARLY_CHUNK_BYTES` (0 to 1 GiB; 0 = messages always first).
    pub early_chunk_bytes: u32,
    /// Threads an engine reads and writes its connections' control streams with (its control
    /// reactor), started as connections arrive and ended with the last one; 0 = one per core, at
    /// most 4. `UCCL_TCPX_CONTROL_THREADS` (0 to 64).
    pub control_threads: u8,
    /// Addresses the engine may dial for a peer's channels besides the address its control connection
    /// came from (multi-homed peers whose data interface differs). `UCCL_TCPX_ALLOW_DIAL`, a
    /// comma-separated list of CIDR blocks or single addresses; empty by default.
    pub allow_dial: Vec<Cidr>,
    /// Record the stage times of every transfer of the same-host GPU path (post, asks, copies
    /// queued, event seen fired and by whom, outcome handed to the caller) and print a summary per
    /// direction and size to stderr at exit; 2 also lists every transfer. A diagnostic, off (0) by
    /// default. `UCCL_TCPX_TRACE_DEVICE_COPY` = 0 | 1 | 2.
    pub trace_device_copy: u8,
    /// Record the steps of every copy of the same-host host-memory path (post, job queued, picked
    /// up, offered to the copy helpers, helpers joining, each piece's time and bytes, last piece,
    /// reply handed on, outcome handed to the caller) and print a summary per role and size to
    /// stderr at exit; 2 also lists every job. A diagnostic, off (0) by default.
    /// `UCCL_TCPX_TRACE_HOST_COPY` = 0 | 1 | 2.
    pub trace_host_copy: u8,
    /// Every engine marks each step of its writes and reads over the channels (post, request
    /// written and read, chunks queued and posted, last chunk, reply written and read, complete) in
    /// CLOCK_MONOTONIC time and writes the last few thousand to `<prefix>.<pid>.tsv` at exit, for
    /// `scripts/diag/flow_timeline.py` to join across the two ends. A diagnostic, off (unset or
    /// empty) by default. `UCCL_TCPX_TRACE_FLOW` = path prefix.
    pub trace_flow: Option<String>,
    /// Same-host peers move data over the network path like remote ones (UCCL's
    /// `UCCL_P2P_DISABLE_IPC`): the engine announces no host identity, so neither end of a
    /// connection takes it for local. `UCCL_TCPX_DISABLE_IPC` (0 or 1).
    pub disable_ipc: bool,
    /// Threads that copy one same-host host-memory job of 512 KiB or more: the connection's worker
    /// and the process's copy helpers. Default three quarters of the CPUs the process may use, 1 to 24.
    /// `UCCL_TCPX_HOST_COPY_THREADS` (1 to 64).
    pub host_copy_threads: usize,
    /// How long a connection's host worker and the copy helpers look for the next same-host copy
    /// after one before they sleep, so that copies following each other closely find them awake
    /// (a sleeping thread's wake-up is on the copy's critical path); they yield between looks.
    /// Default 0 (not measured yet where helpers run: 2-core hosts copy on one thread).
    /// `UCCL_TCPX_HOST_COPY_SPIN_US`.
    pub host_copy_spin: Duration,
    /// The smallest piece a shared same-host copy is cut into (two pieces per copying thread,
    /// within this and 4 MiB). Default 1 MiB: on a 32-core host 16 MiB copies moved 30-50 % more
    /// than with 256 KiB pieces, where sixteen threads pinning 512 KiB pieces share the peer's page
    /// tables. `UCCL_TCPX_HOST_COPY_MIN_PIECE` (64K to 4M, K/M suffixes).
    pub host_copy_min_piece: u32,
    /// One-sided host transfers to a peer process of this host longer than the first bound and
    /// shorter than the second take the channels (loopback TCP) instead of the direct copy, which
    /// is slower there on a many-core host: every copying thread pins the peer's pages, and a few
    /// MiB span too few of its page tables for many threads to help, while the channels' helpers
    /// copy in parallel in both processes. Default 768 KiB to 12 MiB from 16 CPUs, none below.
    /// `UCCL_TCPX_HOST_COPY_NETWORK_BAND` (`LO-HI` with K/M/G suffixes, or 0 for none).
    pub host_copy_network_band: Option<(u64, u64)>,
    /// Whether the same-host host path looks at the page size of a transfer's source memory
    /// (`/proc/<pid>/smaps`, once per process and change of its mappings): a source mostly on transparent huge pages skips
    /// `host_copy_network_band` and, up to 8 MiB, is cut into pieces of `host_copy_huge_min_piece`,
    /// since on huge pages the kernel pins a source in few steps and threads copying neighbouring
    /// megabytes no longer contend. On a 32-core host, three alternated rounds, huge-page sources
    /// moved 1-8 MiB at 1.5-2.9x loopback TCP with it against 1.0-1.9x without, small-page ones as
    /// without it. Default on: the read of smaps (the kernel walks the page tables of every
    /// mapping of the process looked at, about 12 ms per GiB resident on small pages) runs on a
    /// thread of its own, once per process and change of its mappings, the asking thread never
    /// waits for it, and transfers until its answer is in go as on small pages.
    /// `UCCL_TCPX_HOST_COPY_HUGE_PAGES` (0 or 1).
    pub host_copy_huge_pages: bool,
    /// A host region that a peer of this host is to copy out of (`process_vm_readv`) is collapsed
    /// into huge pages in place, once, in the background (`engine::huge_pages::collapse`): on
    /// small pages the kernel pins the source page by page, and the copying threads contend on
    /// the page tables. Only 2 MiB extents whose pages are all present and written; paced to a
    /// quarter of a core for the process; contents and addresses unchanged. `UCCL_TCPX_HOST_COPY_COLLAPSE` (0 or 1, default 1).
    pub host_copy_collapse: bool,
    /// The smallest piece of a same-host copy of at most 8 MiB whose source lies on huge pages,
    /// with `host_copy_huge_pages`. Default 256 KiB: 1-8 MiB copies on huge pages moved 1.4-3x
    /// loopback TCP with it on a 32-core host. `UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE` (64K to 4M).
    pub host_copy_huge_min_piece: u32,
    /// One-sided host transfers to a peer process of this host move through a staging area the
    /// two processes share (`engine::local::staging_area`): the end whose memory is read copies
    /// it into its area, the other copies it out, two plain copies without the page pinning of
    /// `process_vm_readv`. A transfer that fits the area and whose source is not on huge pages
    /// takes it before `host_copy_network_band` and the direct copy; larger ones, and those that
    /// find it full, choose as before. Default off until measured on a 32-core host.
    /// `UCCL_TCPX_HOST_COPY_STAGING` (0 or 1).
    pub host_copy_staging: bool,
    /// The data size of each connection's staging area, its largest staged transfer. Default
    /// 32 MiB. `UCCL_TCPX_HOST_COPY_STAGING_BYTES` (1M to 1G, a multiple of the area's 256 KiB
    /// piece).
    pub host_copy_staging_bytes: u32,
    /// The key peers must share: when set, every connection starts with a mutual challenge-response
    /// and strangers are refused before anything is spent on them. Read from the file named by
    /// `UCCL_TCPX_AUTH_KEY_FILE` (its bytes, less one trailing newline; 16 to 4096 bytes; not
    /// readable or writable by other users).
    pub auth_key: Option<AuthKey>,
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

/// Knobs of the staged GPU path (GPU memory over a transport that moves host memory only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Record per-chunk timestamps of every staged comm and print a summary per burst of transfers
    /// to stderr at exit. `UCCL_TCPX_TRACE_STAGING` = 0 | 1.
    pub trace: bool,
    /// Copy streams per comm; slot `i` copies on stream `i % streams`. `UCCL_TCPX_STAGING_STREAMS`.
    pub streams: u8,
    /// Device-to-host copies one send comm keeps issued but unfinished; later chunks wait for one
    /// to finish. The copy engine drains one stream's queue before it turns to the next, so with no
    /// limit (0) the last channel's first chunk lands only after every other channel's whole share;
    /// with 1 the channels' copies alternate. `UCCL_TCPX_STAGING_AHEAD`.
    pub ahead: u8,
    /// How a chunk of many device segments gets into and out of its slot. `UCCL_TCPX_STAGING_GATHER`.
    pub gather: StagingGather,
    /// Sub-copy size of pipelined staging, in bytes; 0 (the default) copies every chunk whole. A
    /// contiguous device chunk longer than this that its channel moves alone (nothing of the
    /// channel ahead of a send, nothing else posted with a receive) is copied into (or out of) its
    /// slot in copies of this size, and its bytes move on as each copy lands instead of after the
    /// whole chunk: the copies overlap the socket sends (and the receives). Later chunks of a
    /// transfer keep whole copies, which overlap the chunks ahead already. 0, or 4 KiB to 4 MiB.
    /// `UCCL_TCPX_STAGING_PIPELINE`.
    pub pipeline: u32,
    /// Receiving sockets write each piece that lands in a staging slot back from the CPU's caches
    /// before the slot is copied up to the GPU: a copy of lines that other cores hold modified
    /// runs at a third of its speed. Only pieces of the last two receives posted on a comm, whose
    /// copy up nothing later hides (measured in `transport/socket/write_back.rs`). On by default;
    /// 0 to measure without. `UCCL_TCPX_STAGING_WRITE_BACK` = 0 | 1.
    pub write_back: bool,
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

impl Default for StagingConfig {
    fn default() -> StagingConfig {
        StagingConfig { trace: false, streams: 1, ahead: 1, gather: StagingGather::Auto, pipeline: 0, write_back: true }
    }
}

impl StagingConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<StagingConfig> {
        let d = StagingConfig::default();
        Ok(StagingConfig {
            trace: parse_in(get, "UCCL_TCPX_TRACE_STAGING", 0u8, 0, 1)? == 1,
            streams: parse_in(get, "UCCL_TCPX_STAGING_STREAMS", d.streams, 1, 8)?,
            ahead: parse_in(get, "UCCL_TCPX_STAGING_AHEAD", d.ahead, 0, MAX_WINDOW as u8)?,
            gather: parse_gather(get)?,
            pipeline: parse_pipeline(get)?,
            write_back: parse_in(get, "UCCL_TCPX_STAGING_WRITE_BACK", u8::from(d.write_back), 0, 1)? == 1,
        })
    }
}

/// Bounds of `UCCL_TCPX_STAGING_PIPELINE` when on: a sub-copy of less than a page costs its
/// issue more than it overlaps, and one of a whole chunk is no pipelining.
pub(crate) const STAGING_PIPELINE_RANGE: std::ops::RangeInclusive<u32> = MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE;

/// Whether `bytes` is a valid sub-copy size: 0 (off) or a size in [`STAGING_PIPELINE_RANGE`].
pub(crate) fn valid_staging_pipeline(bytes: u32) -> bool {
    bytes == 0 || STAGING_PIPELINE_RANGE.contains(&bytes)
}

fn parse_pipeline(get: &impl Fn(&str) -> Option<String>) -> Result<u32> {
    let name = "UCCL_TCPX_STAGING_PIPELINE";
    let Some(raw) = get(name) else { return Ok(0) };
    match parse_bytes(&raw).and_then(|v| u32::try_from(v).ok()) {
        Some(v) if valid_staging_pipeline(v) => Ok(v),
        _ => Err(bad(
            name,
            &raw,
            &format!(
                "0 (whole-chunk copies) or a sub-copy size in {}..={} bytes (K, M and G suffixes allowed)",
                STAGING_PIPELINE_RANGE.start(),
                STAGING_PIPELINE_RANGE.end()
            ),
        )),
    }
}

fn parse_gather(get: &impl Fn(&str) -> Option<String>) -> Result<StagingGather> {
    let name = "UCCL_TCPX_STAGING_GATHER";
    let Some(raw) = get(name) else { return Ok(StagingGather::Auto) };
    match raw.to_ascii_lowercase().as_str() {
        "auto" => Ok(StagingGather::Auto),
        "kernel" => Ok(StagingGather::Kernel),
        "copies" => Ok(StagingGather::Copies),
        _ => Err(bad(name, &raw, "auto, kernel or copies")),
    }
}

/// Most data sockets one comm may open (NCCL's MAX_SOCKETS); also what an accepting side allows.
pub(crate) const MAX_SOCKETS_PER_COMM: usize = 64;
pub(crate) const MAX_SOCKET_THREADS: u8 = 16;
/// Bound on `UCCL_TCPX_SOCKET_HELPERS`.
pub(crate) const MAX_SOCKET_HELPERS: u8 = 64;
/// Bound on `UCCL_TCPX_CONTROL_THREADS`.
const MAX_CONTROL_THREADS: u8 = 64;

/// Knobs of the built-in TCP transport. The socket layout keeps NCCL's names so that operators can
/// map them: each comm opens `nthreads x nsocks_per_thread` data sockets. The threads moving them
/// are an engine's shared helpers, `helpers` senders and as many receivers whatever the number of
/// connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketConfig {
    /// NCCL's thread count of a comm, which with `nsocks_per_thread` gives its data sockets; 0 =
    /// pick from the core count. `UCCL_TCPX_SOCKET_NTHREADS`.
    pub nthreads: u8,
    /// Data sockets per NCCL thread. `UCCL_TCPX_NSOCKS_PERTHREAD`.
    pub nsocks_per_thread: u8,
    /// Helper threads an engine moves data sockets with, per direction (senders, receivers), each
    /// serving many sockets; 0 = one per core, at most 16. `UCCL_TCPX_SOCKET_HELPERS`.
    pub helpers: u8,
    /// SO_SNDBUF / SO_RCVBUF of data sockets in bytes; 0 leaves the kernel's autotuning on (setting
    /// a size turns autotuning off). `UCCL_TCPX_SOCKET_SNDBUF`, `UCCL_TCPX_SOCKET_RCVBUF`.
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// A request is cut into pieces of at most this many bytes (smaller requests into a share per
    /// socket of at least 64 KiB); free sockets pull the next piece, so a slow flow takes fewer of
    /// them. `UCCL_TCPX_SOCKET_SUBCHUNK`.
    pub subchunk: u32,
    /// How long a helper that just did some work polls for more before it sleeps, if it gets a
    /// polling turn (`spinners`) past its first 20 us; default 20 us on 8 or more cores, else 0.
    /// `UCCL_TCPX_SOCKET_SPIN_US`.
    pub spin: Duration,
    /// A helper polls after work (`spin`) only after a piece of a request of at most this many
    /// bytes; after a piece of a larger one it sleeps at once. Default 128 KiB
    /// (`DEFAULT_SPIN_MAX_REQUEST`). `UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST` (0 to 1G, K/M/G suffixes;
    /// requests of the engine are chunks of at most 4 MiB, so 4M polls after every piece).
    pub spin_max_request: u32,
    /// How long a helper polls while one of its sockets holds a piece whose receive is not posted
    /// yet (the peer's bytes came before the request that announces them was read), if it gets a
    /// polling turn past its first 20 us; default 0 (sleep and be kicked by the post).
    /// `UCCL_TCPX_SOCKET_HELD_SPIN_US`.
    pub held_spin: Duration,
    /// Socket helpers of the process that may poll at once after work (the rest sleep at once):
    /// every polling helper holds a core. Default a quarter of the CPUs, at least 1.
    /// `UCCL_TCPX_SOCKET_SPINNERS` (1 to 1024).
    pub spinners: u16,
    /// Sleeping helpers a send comm's posting thread wakes itself for one request; each socket of
    /// the comm that runs then wakes up to as many of the rest before it sends its piece (helpers
    /// that are polling are kicked at no cost either way). Every wake-up the poster hands on saves
    /// it an eventfd write and the woken thread's start (about 2 us each on the 32-core host, so
    /// a 1 MiB write's last piece of 16 reached its socket some 32 us after it was queued), and
    /// each level of the cascade puts one more such wake-up, on a woken helper's thread, before the
    /// sockets it wakes (with 2: the poster wakes two, they wake four, and so on); 0 has the poster
    /// wake every one itself. Default 4 (`DEFAULT_KICK_FANOUT`). `UCCL_TCPX_SOCKET_KICK_FANOUT`
    /// (0 to 64).
    pub kick_fanout: u8,
    /// A send comm connects one data socket and opens the others when a request would use them
    /// (cut in more than one piece, or queued behind busy sockets), so an idle or lightly used
    /// connection holds one socket per comm; false opens all of them right after the first.
    /// `UCCL_TCPX_SOCKET_LAZY` (0 or 1, default 1).
    pub lazy: bool,
    /// Every comm records when each of its sockets began and finished its share of each of its
    /// last 256 requests and writes them at its drop to `<prefix>.<pid>.<comm id>.<send|recv>.tsv`
    /// (`scripts/diag/socket_timeline.py`); unset (or empty) by default. `UCCL_TCPX_TRACE_SOCKETS`
    /// = path prefix.
    pub trace: Option<String>,
    /// The interfaces data sockets run over, in NCCL_SOCKET_IFNAME's grammar (name prefixes, `^`
    /// to exclude, `=` for exact names): a comm's sockets go out over them in turn, each from one
    /// of this host's links to the peer's link of the same rank, while the control stream stays on
    /// the engine's address. Unset: every data socket goes to the peer's advertised address.
    /// `UCCL_TCPX_SOCKET_IFNAME`.
    pub data_ifname: Option<String>,
}

impl Default for SocketConfig {
    fn default() -> SocketConfig {
        SocketConfig {
            nthreads: 0,
            nsocks_per_thread: 1,
            helpers: 0,
            sndbuf: 0,
            rcvbuf: 0,
            subchunk: 256 << 10,
            spin: default_spin(),
            spin_max_request: DEFAULT_SPIN_MAX_REQUEST,
            held_spin: Duration::ZERO,
            spinners: default_spinners(),
            kick_fanout: DEFAULT_KICK_FANOUT,
            lazy: true,
            trace: None,
            data_ifname: None,
        }
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
/// socket transport only (docs/PERFORMANCE.md, "Defaults and the measurements that chose them").
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

/// A quarter of the CPUs: two engines of one host (a loopback run) then poll on half of them.
fn default_spinners() -> u16 {
    (available_cores() / 4).clamp(1, 1024) as u16
}

/// Spinning pays only with cores to spare: on a small host a spinning helper takes the core that
/// the thread it waits for needs (on 2 cores, 20 us of spin made an 8-byte round trip 5x slower).
/// From 8 cores 20 us. Longer trades large transfers for mid-size ones: on the 32-core host with
/// both engines on it, 400 us (within the polling turns) made 256 KiB-4 MiB round trips 15-30 %
/// shorter and GPU 256 KiB at four in flight 25 % faster, but 16-64 MiB transfers 15-35 % slower,
/// the polling helpers holding cores the busy ones needed.
fn default_spin() -> Duration {
    if available_cores() >= 8 { Duration::from_micros(20) } else { Duration::ZERO }
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
const DEFAULT_SPIN_MAX_REQUEST: u32 = 128 << 10;
/// Bound on `UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST`.
const MAX_SPIN_MAX_REQUEST: u32 = 1 << 30;

impl SocketConfig {
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

impl Default for Config {
    fn default() -> Config {
        Config {
            num_channels: None,
            chunk_size: default_chunk_size(available_cores()),
            window: 8,
            port: 0,
            ip: None,
            ifname: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            fence_timeout: DEFAULT_FENCE_TIMEOUT,
            socket: SocketConfig::default(),
            gpu: None,
            transport: TransportChoice::Auto,
            local_peers: LocalPeers::Socket,
            plugin_path: None,
            nccl_net_plugin: None,
            net_devices: None,
            staging: StagingConfig::default(),
            plugin_test_ahead: true,
            control_spin: default_control_spin(),
            caller_completes: default_caller_completes(),
            copy_poll_spin: available_cores() >= 4,
            progress_poll: default_progress_poll(available_cores()),
            progress_poll_bytes: 1 << 20,
            early_chunk_bytes: 1 << 20,
            control_threads: 0,
            allow_dial: Vec::new(),
            trace_device_copy: 0,
            trace_host_copy: 0,
            trace_flow: None,
            disable_ipc: false,
            host_copy_threads: default_host_copy_threads(),
            host_copy_spin: Duration::ZERO,
            host_copy_min_piece: 1 << 20,
            host_copy_network_band: default_host_copy_network_band(available_cores()),
            host_copy_huge_pages: true,
            host_copy_collapse: true,
            host_copy_huge_min_piece: 256 << 10,
            host_copy_staging: false,
            host_copy_staging_bytes: 32 << 20,
            auth_key: None,
        }
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

    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// The environment's settings with `overrides` (by setting name) taking precedence.
    pub fn from_env_with(overrides: impl Fn(&str) -> Option<String>) -> Result<Config> {
        Config::from_lookup(|name| overrides(name).or_else(|| std::env::var(name).ok()))
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let d = Config::default();
        let get = |name: &str| lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        Ok(Config {
            num_channels: get("UCCL_TCPX_NUM_CHANNELS")
                .map(|_| parse_in(&get, "UCCL_TCPX_NUM_CHANNELS", 1, 1, MAX_CHANNELS))
                .transpose()?,
            chunk_size: parse_size(&get, "UCCL_TCPX_CHUNK_SIZE", d.chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)?,
            window: parse_in(&get, "UCCL_TCPX_WINDOW", d.window, 1, MAX_WINDOW)?,
            port: parse_in(&get, "UCCL_TCPX_PORT", d.port, 0, u16::MAX)?,
            ip: get("UCCL_TCPX_IP")
                .map(|v| v.parse().map_err(|_| bad("UCCL_TCPX_IP", &v, "an IPv4 or IPv6 address")))
                .transpose()?,
            ifname: get("UCCL_TCPX_IFNAME"),
            connect_timeout: parse_millis(&get, "UCCL_TCPX_CONNECT_TIMEOUT_MS", d.connect_timeout, 1, 3_600_000)?,
            timeout: parse_millis(&get, "UCCL_TCPX_TIMEOUT_MS", d.timeout, 100, 86_400_000)?,
            fence_timeout: parse_millis(&get, "UCCL_TCPX_FENCE_TIMEOUT_MS", d.fence_timeout, 0, 60_000)?,
            transport: parse_transport(&get)?,
            local_peers: parse_local_peers(&get)?,
            plugin_path: get("UCCL_TCPX_PLUGIN").map(PathBuf::from),
            nccl_net_plugin: get("NCCL_NET_PLUGIN"),
            net_devices: parse_devices(&get, "UCCL_TCPX_NET_DEVICES")?,
            gpu: get("UCCL_TCPX_GPU").map(|_| parse_in(&get, "UCCL_TCPX_GPU", 0, 0, MAX_GPU_ORDINAL)).transpose()?,
            socket: SocketConfig::from_lookup(&get)?,
            staging: StagingConfig::from_lookup(&get)?,
            plugin_test_ahead: parse_in(&get, "UCCL_TCPX_PLUGIN_TEST_AHEAD", 1u8, 0, 1)? == 1,
            control_spin: parse_micros(&get, "UCCL_TCPX_CONTROL_SPIN_US", d.control_spin, 1_000_000)?,
            caller_completes: parse_in(&get, "UCCL_TCPX_CALLER_COMPLETES", d.caller_completes as u8, 0, 1)? == 1,
            copy_poll_spin: parse_in(&get, "UCCL_TCPX_COPY_POLL_SPIN", d.copy_poll_spin as u8, 0, 1)? == 1,
            progress_poll: parse_micros(&get, "UCCL_TCPX_PROGRESS_POLL_US", d.progress_poll, 1_000_000)?,
            progress_poll_bytes: parse_size(&get, "UCCL_TCPX_PROGRESS_POLL_BYTES", d.progress_poll_bytes, 0, 1 << 30)?,
            early_chunk_bytes: parse_size(&get, "UCCL_TCPX_EARLY_CHUNK_BYTES", d.early_chunk_bytes, 0, 1 << 30)?,
            control_threads: parse_in(&get, "UCCL_TCPX_CONTROL_THREADS", d.control_threads, 0, MAX_CONTROL_THREADS)?,
            allow_dial: parse_cidrs(&get, "UCCL_TCPX_ALLOW_DIAL")?,
            trace_device_copy: parse_in(&get, "UCCL_TCPX_TRACE_DEVICE_COPY", 0u8, 0, 2)?,
            trace_host_copy: parse_in(&get, "UCCL_TCPX_TRACE_HOST_COPY", 0u8, 0, 2)?,
            trace_flow: get("UCCL_TCPX_TRACE_FLOW").filter(|p| !p.is_empty()),
            disable_ipc: parse_in(&get, "UCCL_TCPX_DISABLE_IPC", 0u8, 0, 1)? == 1,
            host_copy_threads: parse_in(
                &get,
                "UCCL_TCPX_HOST_COPY_THREADS",
                d.host_copy_threads,
                1,
                MAX_HOST_COPY_THREADS,
            )?,
            host_copy_spin: parse_micros(&get, "UCCL_TCPX_HOST_COPY_SPIN_US", d.host_copy_spin, 1_000_000)?,
            host_copy_min_piece: parse_size(
                &get,
                "UCCL_TCPX_HOST_COPY_MIN_PIECE",
                d.host_copy_min_piece,
                64 << 10,
                4 << 20,
            )?,
            host_copy_network_band: parse_band(&get, "UCCL_TCPX_HOST_COPY_NETWORK_BAND", d.host_copy_network_band)?,
            host_copy_staging: parse_in(&get, "UCCL_TCPX_HOST_COPY_STAGING", d.host_copy_staging as u8, 0, 1)? == 1,
            host_copy_staging_bytes: parse_staging_bytes(&get, d.host_copy_staging_bytes)?,
            host_copy_huge_pages: parse_in(&get, "UCCL_TCPX_HOST_COPY_HUGE_PAGES", d.host_copy_huge_pages as u8, 0, 1)?
                == 1,
            host_copy_collapse: parse_in(&get, "UCCL_TCPX_HOST_COPY_COLLAPSE", d.host_copy_collapse as u8, 0, 1)? == 1,
            host_copy_huge_min_piece: parse_size(
                &get,
                "UCCL_TCPX_HOST_COPY_HUGE_MIN_PIECE",
                d.host_copy_huge_min_piece,
                64 << 10,
                4 << 20,
            )?,
            auth_key: get("UCCL_TCPX_AUTH_KEY_FILE")
                .map(|path| read_key_file("UCCL_TCPX_AUTH_KEY_FILE", &path))
                .transpose()?,
        })
    }
}

impl SocketConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<SocketConfig> {
        let d = SocketConfig::default();
        let nthreads = parse_in(get, "UCCL_TCPX_SOCKET_NTHREADS", d.nthreads, 0, MAX_SOCKET_THREADS)?;
        let nsocks_per_thread = parse_in(get, "UCCL_TCPX_NSOCKS_PERTHREAD", d.nsocks_per_thread, 1, 64)?;
        if nthreads as usize * nsocks_per_thread as usize > MAX_SOCKETS_PER_COMM {
            return Err(Error::invalid(format!(
                "UCCL_TCPX_SOCKET_NTHREADS={nthreads} x UCCL_TCPX_NSOCKS_PERTHREAD={nsocks_per_thread} \
                 exceeds {MAX_SOCKETS_PER_COMM} sockets per comm"
            )));
        }
        let buf = |name| parse_size(get, name, 0, 0, 1 << 30);
        Ok(SocketConfig {
            nthreads,
            nsocks_per_thread,
            helpers: parse_in(get, "UCCL_TCPX_SOCKET_HELPERS", d.helpers, 0, MAX_SOCKET_HELPERS)?,
            sndbuf: buf("UCCL_TCPX_SOCKET_SNDBUF")?,
            rcvbuf: buf("UCCL_TCPX_SOCKET_RCVBUF")?,
            subchunk: parse_size(get, "UCCL_TCPX_SOCKET_SUBCHUNK", d.subchunk, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)?,
            spin: parse_micros(get, "UCCL_TCPX_SOCKET_SPIN_US", d.spin, 1_000_000)?,
            spin_max_request: parse_size(
                get,
                "UCCL_TCPX_SOCKET_SPIN_MAX_REQUEST",
                d.spin_max_request,
                0,
                MAX_SPIN_MAX_REQUEST,
            )?,
            held_spin: parse_micros(get, "UCCL_TCPX_SOCKET_HELD_SPIN_US", d.held_spin, 1_000_000)?,
            spinners: parse_in(get, "UCCL_TCPX_SOCKET_SPINNERS", d.spinners, 1, 1024)?,
            kick_fanout: parse_in(get, "UCCL_TCPX_SOCKET_KICK_FANOUT", d.kick_fanout, 0, MAX_SOCKETS_PER_COMM as u8)?,
            lazy: parse_in(get, "UCCL_TCPX_SOCKET_LAZY", d.lazy as u8, 0, 1)? == 1,
            trace: get("UCCL_TCPX_TRACE_SOCKETS").filter(|p| !p.is_empty()),
            data_ifname: get("UCCL_TCPX_SOCKET_IFNAME").filter(|p| !p.trim().is_empty()),
        })
    }
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

fn parse_transport(get: &impl Fn(&str) -> Option<String>) -> Result<TransportChoice> {
    let name = "UCCL_TCPX_TRANSPORT";
    let Some(raw) = get(name) else { return Ok(TransportChoice::Auto) };
    match raw.to_ascii_lowercase().as_str() {
        "auto" => Ok(TransportChoice::Auto),
        "socket" => Ok(TransportChoice::Socket),
        "tcpx" => Ok(TransportChoice::Tcpx),
        _ => Err(bad(name, &raw, "auto, socket or tcpx")),
    }
}

fn parse_local_peers(get: &impl Fn(&str) -> Option<String>) -> Result<LocalPeers> {
    let name = "UCCL_TCPX_LOCAL_PEERS";
    let Some(raw) = get(name) else { return Ok(LocalPeers::Socket) };
    match raw.to_ascii_lowercase().as_str() {
        "socket" => Ok(LocalPeers::Socket),
        "plugin" => Ok(LocalPeers::Plugin),
        _ => Err(bad(name, &raw, "socket or plugin (plugin only for tests on one host)")),
    }
}

/// A comma-separated list of device indices, e.g. "0,2"; duplicates are allowed (they weight a device).
fn parse_devices(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<Vec<usize>>> {
    let Some(raw) = get(name) else { return Ok(None) };
    let expected = format!("a comma-separated list of 1..={MAX_NET_DEVICES} device indices below {MAX_NET_DEVICES}");
    let list: Option<Vec<usize>> =
        raw.split(',').map(|d| d.trim().parse::<usize>().ok().filter(|d| *d < MAX_NET_DEVICES)).collect();
    match list {
        Some(list) if !list.is_empty() && list.len() <= MAX_NET_DEVICES => Ok(Some(list)),
        _ => Err(bad(name, &raw, &expected)),
    }
}

/// A key file as `openssl rand -hex 32 > key` or `head -c 32 /dev/urandom > key` writes it. A file
/// other users may read is refused, as ssh refuses such private keys: the key opens this engine's
/// memory to whoever holds it.
fn read_key_file(name: &str, path: &str) -> Result<AuthKey> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let fail = |why: String| Error::invalid(format!("environment variable {name}={path:?}: {why}"));
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot open the key file: {e}")))?;
    let mode = file.metadata().map_err(|e| fail(format!("cannot stat the key file: {e}")))?.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(fail(format!(
            "the key file is accessible to other users (mode {:o}); chmod o-rwx it",
            mode & 0o777
        )));
    }
    let mut bytes = Vec::new();
    // One byte past the largest key tells a too-long file from a key of exactly the limit.
    let limit = crate::proto::auth::MAX_KEY_LEN as u64 + 2;
    file.take(limit).read_to_end(&mut bytes).map_err(|e| fail(format!("cannot read the key file: {e}")))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    AuthKey::new(&bytes).map_err(|why| fail(format!("the file holds {why}")))
}

/// At most this many blocks in a list knob: a longer list is a mistake, and every dial checks them all.
const MAX_CIDRS: usize = 256;

fn parse_cidrs(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Vec<Cidr>> {
    let Some(raw) = get(name) else { return Ok(Vec::new()) };
    let expected =
        format!("a comma-separated list of up to {MAX_CIDRS} addresses or CIDR blocks (10.0.0.0/8, fd00::/8)");
    let list: std::result::Result<Vec<Cidr>, ()> = raw.split(',').map(str::parse).collect();
    match list {
        Ok(list) if list.len() <= MAX_CIDRS => Ok(list),
        _ => Err(bad(name, &raw, &expected)),
    }
}

fn bad(name: &str, value: &str, expected: &str) -> Error {
    Error::invalid(format!("environment variable {name}={value:?} is invalid: expected {expected}"))
}

/// A duration knob given in milliseconds.
fn parse_millis(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: Duration,
    min_ms: u64,
    max_ms: u64,
) -> Result<Duration> {
    Ok(Duration::from_millis(parse_in(get, name, default.as_millis() as u64, min_ms, max_ms)?))
}

/// A duration knob given in microseconds, from 0.
fn parse_micros(get: &impl Fn(&str) -> Option<String>, name: &str, default: Duration, max_us: u64) -> Result<Duration> {
    Ok(Duration::from_micros(parse_in(get, name, default.as_micros() as u64, 0, max_us)?))
}

fn parse_in<T>(get: &impl Fn(&str) -> Option<String>, name: &str, default: T, min: T, max: T) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(raw) = get(name) else { return Ok(default) };
    match raw.parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(bad(name, &raw, &format!("an integer in {min}..={max}"))),
    }
}

/// A size knob: a byte count in `min..=max`, in [`parse_bytes`]'s notation.
/// `LO-HI` (sizes, LO below HI) or `0` for none.
fn parse_band(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: Option<(u64, u64)>,
) -> Result<Option<(u64, u64)>> {
    let Some(raw) = get(name) else { return Ok(default) };
    if raw.trim() == "0" {
        return Ok(None);
    }
    let band = raw.split_once('-').and_then(|(lo, hi)| Some((parse_bytes(lo.trim())?, parse_bytes(hi.trim())?)));
    match band {
        Some((lo, hi)) if lo < hi => Ok(Some((lo, hi))),
        _ => Err(bad(name, &raw, "LO-HI with LO below HI (K, M and G suffixes allowed), or 0")),
    }
}

fn parse_size(get: &impl Fn(&str) -> Option<String>, name: &str, default: u32, min: u32, max: u32) -> Result<u32> {
    let Some(raw) = get(name) else { return Ok(default) };
    match parse_bytes(&raw) {
        Some(v) if (min as u64..=max as u64).contains(&v) => Ok(v as u32),
        _ => Err(bad(name, &raw, &format!("a size in {min}..={max} bytes (K, M and G suffixes allowed)"))),
    }
}

/// The staging area's data size: whole pieces of 256 KiB (the area's piece, which the engine's
/// `staging_area` module owns), 1 MiB to 1 GiB.
fn parse_staging_bytes(get: &impl Fn(&str) -> Option<String>, default: u32) -> Result<u32> {
    const NAME: &str = "UCCL_TCPX_HOST_COPY_STAGING_BYTES";
    let bytes = parse_size(get, NAME, default, 1 << 20, 1 << 30)?;
    if !bytes.is_multiple_of(256 << 10) {
        return Err(bad(NAME, &bytes.to_string(), "a multiple of 256K"));
    }
    Ok(bytes)
}

/// A byte count: digits, optionally with a K, M or G suffix (binary units, either case), e.g.
/// "512K", "1M", "1048576". `None` for anything else and for counts beyond `u64`. The one size
/// notation of the library's knobs and the benchmark's flags.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let (digits, unit) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
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
        assert_eq!(cfg(&[]).unwrap().caller_completes, cores >= 8, "{cores} cores");
        assert!(cfg(&[("UCCL_TCPX_CALLER_COMPLETES", "1")]).unwrap().caller_completes);
        assert!(!cfg(&[("UCCL_TCPX_CALLER_COMPLETES", "0")]).unwrap().caller_completes);
        assert_eq!(cfg(&[]).unwrap().copy_poll_spin, cores >= 4, "{cores} cores");
        assert_eq!(cfg(&[]).unwrap().socket.spinners(), (cores / 4).max(1), "{cores} cores");
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
        let c = cfg(&[
            ("UCCL_TCPX_TRACE_STAGING", "1"),
            ("UCCL_TCPX_STAGING_STREAMS", "2"),
            ("UCCL_TCPX_STAGING_AHEAD", "3"),
        ])
        .unwrap()
        .staging;
        assert_eq!(
            c,
            StagingConfig {
                trace: true,
                streams: 2,
                ahead: 3,
                gather: StagingGather::Auto,
                pipeline: 0,
                write_back: true
            }
        );
        assert!(!cfg(&[("UCCL_TCPX_STAGING_WRITE_BACK", "0")]).unwrap().staging.write_back);
        assert!(cfg(&[("UCCL_TCPX_STAGING_WRITE_BACK", "2")]).is_err());
        let pipeline = |v: &str| cfg(&[("UCCL_TCPX_STAGING_PIPELINE", v)]).map(|c| c.staging.pipeline);
        assert_eq!(pipeline("128K").unwrap(), 128 << 10);
        assert_eq!(pipeline("4096").unwrap(), 4096);
        assert_eq!(pipeline("4M").unwrap(), 4 << 20);
        assert_eq!(pipeline("100001").unwrap(), 100_001, "any size in range, not only powers of two");
        assert_eq!(pipeline("0").unwrap(), 0, "0 is off");
        assert_eq!(pipeline(" ").unwrap(), 0, "empty is unset");
        for wrong in ["1K", "4095", "5M", "4G", "-1", "128KB", "x", "99999999999999999999"] {
            let err = pipeline(wrong).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_STAGING_PIPELINE"), "{wrong:?}: {err}");
            assert!(err.message().contains("sub-copy size"), "{wrong:?}: {err}");
        }
        assert_eq!(cfg(&[("UCCL_TCPX_STAGING_AHEAD", "0")]).unwrap().staging.ahead, 0);
        for (value, gather) in
            [("auto", StagingGather::Auto), ("Kernel", StagingGather::Kernel), ("copies", StagingGather::Copies)]
        {
            assert_eq!(cfg(&[("UCCL_TCPX_STAGING_GATHER", value)]).unwrap().staging.gather, gather);
        }
        assert_eq!(cfg(&[]).unwrap().trace_device_copy, 0);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE_DEVICE_COPY", "2")]).unwrap().trace_device_copy, 2);
        assert_eq!(cfg(&[]).unwrap().trace_host_copy, 0);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE_HOST_COPY", "1")]).unwrap().trace_host_copy, 1);
        assert_eq!(cfg(&[]).unwrap().trace_flow, None);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE_FLOW", "")]).unwrap().trace_flow, None);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE_FLOW", "/tmp/f")]).unwrap().trace_flow.as_deref(), Some("/tmp/f"));
        assert_eq!(cfg(&[]).unwrap().socket.trace, None);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE_SOCKETS", "")]).unwrap().socket.trace, None);
        assert_eq!(cfg(&[("UCCL_TCPX_TRACE_SOCKETS", "/tmp/s")]).unwrap().socket.trace.as_deref(), Some("/tmp/s"));
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
        assert!(cfg(&[]).unwrap().host_copy_collapse, "on by default");
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
        assert!(!cfg(&[]).unwrap().host_copy_staging, "off until measured");
        assert!(cfg(&[("UCCL_TCPX_HOST_COPY_STAGING", "1")]).unwrap().host_copy_staging);
        assert!(!cfg(&[("UCCL_TCPX_HOST_COPY_STAGING", "0")]).unwrap().host_copy_staging);
        assert_eq!(cfg(&[]).unwrap().host_copy_staging_bytes, 32 << 20);
        let staging = |v: &str| cfg(&[("UCCL_TCPX_HOST_COPY_STAGING_BYTES", v)]).map(|c| c.host_copy_staging_bytes);
        assert_eq!(staging("1M").unwrap(), 1 << 20);
        assert_eq!(staging("1G").unwrap(), 1 << 30);
        assert_eq!(staging("1280K").unwrap(), 1280 << 10);
        for bad in ["2", "yes"] {
            let err = cfg(&[("UCCL_TCPX_HOST_COPY_STAGING", bad)]).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_HOST_COPY_STAGING"), "{bad:?}: {err}");
        }
        for bad in ["768K", "2G", "1100K", "x", "0"] {
            let err = staging(bad).unwrap_err();
            assert!(err.message().contains("UCCL_TCPX_HOST_COPY_STAGING_BYTES"), "{bad:?}: {err}");
        }
        for (name, value) in [
            ("UCCL_TCPX_TRACE_STAGING", "2"),
            ("UCCL_TCPX_TRACE_DEVICE_COPY", "3"),
            ("UCCL_TCPX_TRACE_HOST_COPY", "3"),
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
        assert_eq!(SocketConfig::default().spin_max_request, 128 << 10);
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
