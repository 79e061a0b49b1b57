//! The client end: drives every op and size against the server, checks one transfer of each point
//! byte for byte before timing it, and measures the raw TCP baselines of the same sizes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::{Config, Connection, Engine, FifoItem, Locality, OneSided};

use crate::anchor::Anchor;
use crate::args::{Args, Op};
use crate::ctl::{self, Ctl, field};
use crate::host_buffer::HostBuffer;
use crate::layout::Layout;
use crate::memory::BenchMemory;
use crate::parallel_copy::ParallelCopy;
use crate::progress::Progress;
use crate::raw;
use crate::report::{Baseline, HostAnchors, Point, RunInfo};
use crate::server::wait;
use crate::transport_ping;

type Io<T> = std::io::Result<T>;

/// Called after every measured point, with the progress bar to clear before printing.
pub type OnPoint<'a> = &'a mut dyn FnMut(&RunInfo, &Point, &mut Progress);

pub fn run(args: &Args, server: IpAddr, port: u16, on_point: OnPoint) -> Io<(RunInfo, Vec<Point>)> {
    let mut ctl = Ctl::new(TcpStream::connect(SocketAddr::new(server, port))?)?;
    let mut config = Config::from_env().map_err(std::io::Error::other)?;
    // Without --same-host the bench measures the network path, whose anchors are raw TCP and NCCL:
    // a server on this host would otherwise be reached by the same-host path. An explicit
    // UCCL_TCPX_DISABLE_IPC is the operator's to set either way.
    if !args.same_host && std::env::var_os("UCCL_TCPX_DISABLE_IPC").is_none() {
        config.disable_ipc = true;
    }
    if let Some(c) = args.channels {
        config.num_channels = Some(c);
    }
    if server.is_loopback() {
        config.ip = Some(server);
    }
    let bytes = args.buffer_bytes();
    // --same-host with host memory connects a second time, over loopback TCP (its anchor).
    let tcp_anchored = args.same_host && !args.uses_gpu();
    let connections = if tcp_anchored { 2 } else { 1 };
    // 0: unset, the server's engine takes its transport's default as this one does.
    ctl.send(&format!("SETUP {bytes} {} {connections}", config.num_channels.unwrap_or(0)))?;
    let ready = ctl.expect("READY")?;
    let engine_port: u16 = field(&ready, 1)?;
    let fifo_bytes = ready.get(2).and_then(|h| ctl::unhex(h)).filter(|b| b.len() == 64);
    let fifo = FifoItem::from_bytes(
        &fifo_bytes.ok_or_else(|| std::io::Error::other("malformed FifoItem from the server"))?.try_into().unwrap(),
    );
    let server_memory = ready.get(3).cloned().unwrap_or_else(|| "host".into());
    let engine = Engine::new(config.clone()).map_err(std::io::Error::other)?;
    let mut mem = BenchMemory::for_args(args, bytes)?;
    let mr = engine.register(mem.addr(), bytes).map_err(std::io::Error::other)?;
    // A GPU server names its GPU (`gpuN@<bus id>`); host-memory engines answer to "0".
    let remote_gpu = server_memory.split_once('@').map_or("0", |(_, bus)| bus);
    let conn = engine.connect(&server.to_string(), remote_gpu, engine_port).map_err(std::io::Error::other)?;
    if args.prepare {
        let mapped = conn.prepare(&fifo).map_err(std::io::Error::other)?;
        eprintln!(
            "uccl-tcpx-bench: --prepare: {}",
            if mapped { "the server's buffer is mapped" } else { "nothing to map" }
        );
    }
    if conn.peer.channels != engine.transport() {
        // A plugin engine sends a peer on its own host over sockets: the figures are not the plugin's.
        eprintln!(
            "uccl-tcpx-bench: the server shares this host, so the data moves over the {} transport, not {}; \
             UCCL_TCPX_LOCAL_PEERS=plugin (with FAKE_TCPX_SAME_HOST=allow for the fake NIC) benches the plugin here",
            conn.peer.channels,
            engine.transport()
        );
    }
    // --same-host, host memory: the anchor connection over loopback TCP, from an engine with the
    // path off (GPU buffers have device-copy anchors instead).
    let mut tcp_anchor = if tcp_anchored {
        let network = Engine::new(Config { disable_ipc: true, ..config.clone() }).map_err(std::io::Error::other)?;
        let mr = network.register(mem.addr(), bytes).map_err(std::io::Error::other)?;
        let conn = network.connect(&server.to_string(), remote_gpu, engine_port).map_err(std::io::Error::other)?;
        let mut src = crate::memory::prefaulted(bytes, args.huge_pages)?;
        src.fill(1);
        let copy = (src, crate::memory::prefaulted(bytes, args.huge_pages)?);
        let parallel = ParallelCopy::new(config.host_copy_threads)?;
        Some(TcpAnchor { engine: network, conn, mr, copy, parallel })
    } else {
        None
    };
    // Host memory of another process of this host: say which path it takes.
    let host_path = (conn.peer.locality == Locality::SameHost && mem.gpu().is_none())
        .then(|| crate::same_host::describe_path(&conn));
    let streams = engine.num_channels() as usize * config.socket.sockets_per_comm();
    // Two GPU ends of one host: one-sided transfers take the same-host path (device copies), and
    // the device-copy anchors are measured next to them.
    let peer_gpu = crate::anchor::server_gpu(&server_memory);
    let same_host_gpus = match (conn.peer.locality.is_local(), mem.gpu(), peer_gpu) {
        (true, Some(ours), Some(theirs)) => Some((ours, theirs)),
        _ => None,
    };
    let info = RunInfo {
        same_host: same_host_gpus.is_some(),
        channels: engine.num_channels(),
        sockets_per_comm: config.socket.sockets_per_comm(),
        helpers_per_direction: config.socket.helpers_per_direction(),
        raw_streams: streams,
        depth: args.depth,
        num_iovs: args.num_iovs,
        kv_regions: args.regions(),
        kv_region_major: args.table_regions() > 1,
        chunk_size: config.chunk_size,
        rounds: args.rounds,
        client_memory: mem.describe(),
        server_memory,
        host_path,
        par_memcpy_threads: tcp_anchor.as_ref().map(|a| a.parallel.threads()),
        checked: 0,
    };
    let vectors = args.num_iovs > 1;
    let rounds = args.rounds;
    // One round measures each point's baselines and device-copy anchors once per size and shares
    // them between the ops; alternated rounds measure them next to every round of every op.
    let shared_anchors = rounds == 1;
    let measured_points = rounds * args.ops.len() * args.sizes.len();
    let (baseline_steps, device_copy_steps) =
        if shared_anchors { (args.sizes.len(), 2 * args.sizes.len()) } else { (measured_points, measured_points) };
    let steps = measured_points * (1 + usize::from(vectors) + usize::from(tcp_anchored))
        + if args.baseline { baseline_steps } else { 0 }
        + if same_host_gpus.is_some() { device_copy_steps } else { 0 };
    let mut progress = Progress::new(steps);
    let mut baselines: HashMap<usize, Baseline> = HashMap::new();
    let mut anchors: HashMap<(bool, usize), Anchor> = HashMap::new();
    let mut points = Vec::new();
    let mut seed = 1u64;
    // Transfers compared byte for byte (the first of every measurement); a mismatch ends the run.
    let mut checked = 0usize;
    for &op in &args.ops {
        for &size in &args.sizes {
            let mut each = Vec::with_capacity(rounds);
            for round in 1..=rounds {
                let what = |what: String| if rounds == 1 { what } else { format!("{what}, round {round}/{rounds}") };
                progress.step(&what(format!("{} {}", op.name(), crate::report::human(size))));
                seed += 1;
                let iters = args.iters_for(size);
                let layout = args.layout(size, args.num_iovs).map_err(std::io::Error::other)?;
                let mut contiguous = None;
                let timed = if op == Op::Transport {
                    let samples = transport_ping::round_trips(size, iters, &config)?;
                    Timed { samples, posts: Vec::new(), first: None }
                } else {
                    let mut measure = |layout, seed| {
                        let split = None;
                        let (ctl, mem) = (&mut ctl, &mut mem);
                        Run { args, ctl, engine: &engine, conn: &conn, mr, mem, fifo, op, layout, seed, split }
                            .measure(iters)
                    };
                    if vectors {
                        // The same bytes in one piece, same run: what the vector is compared with.
                        let whole = args.layout(size, 1).map_err(std::io::Error::other)?;
                        let one = measure(whole, seed)?;
                        checked += 1;
                        contiguous = Some(Point::new(op, size, iters, &one.samples, None).gbs());
                        let pieces =
                            format!("{} {} in {} pieces", op.name(), crate::report::human(size), args.num_iovs);
                        progress.step(&what(pieces));
                        seed += 1;
                    }
                    let timed = measure(layout, seed)?;
                    checked += 1;
                    timed
                };
                let baseline = match baselines.get(&size) {
                    _ if !args.baseline => None,
                    Some(&known) if shared_anchors => Some(known),
                    _ => {
                        progress.step(&what(format!("raw TCP {}", crate::report::human(size))));
                        let host = &mut mem.host()[..size];
                        let stream_gbs = raw::streams_client(&mut ctl, server, host, streams, iters)?;
                        let message_gbs = raw::messages_client(
                            &mut ctl,
                            server,
                            host,
                            raw::message_streams(size, streams),
                            iters,
                            args.depth,
                        )?;
                        let ping = raw::pingpong_client(&mut ctl, server, host, iters.min(1000))?;
                        let measured = Baseline { stream_gbs, message_gbs, pingpong: median(ping) };
                        baselines.insert(size, measured);
                        Some(measured)
                    }
                };
                let anchor = match (op, same_host_gpus) {
                    // Only where the transfers did take the device path (a region without an IPC
                    // handle moves over the network, against which this anchor says nothing).
                    // A send the receiver copied out over CUDA IPC is held against the same copy
                    // as a write.
                    (Op::Write | Op::Read | Op::Send, Some((ours, theirs)))
                        if (op == Op::Send && conn.sends_copied_by_peer() > 0)
                            || (op != Op::Send && conn.device_copy_batches() > 0) =>
                    {
                        let write = op != Op::Read;
                        let (src, dst) = if write { (ours, theirs) } else { (theirs, ours) };
                        match anchors.get(&(write, size)) {
                            Some(&known) if shared_anchors => Some(known),
                            _ => {
                                progress.step(&what(format!("anchor {}", crate::report::human(size))));
                                let measured = crate::anchor::device_copy(src, dst, size, iters)?;
                                anchors.insert((write, size), measured);
                                Some(measured)
                            }
                        }
                    }
                    _ => None,
                };
                let host_anchors = match &mut tcp_anchor {
                    Some(a) => {
                        let label = format!("{} {} over loopback TCP", op.name(), crate::report::human(size));
                        progress.step(&what(label));
                        seed += 1;
                        let (engine, conn, mr) = (&a.engine, &a.conn, a.mr);
                        let mut run = Run {
                            args,
                            ctl: &mut ctl,
                            engine,
                            conn,
                            mr,
                            mem: &mut mem,
                            fifo,
                            op,
                            layout,
                            seed,
                            split: None,
                        };
                        let tcp_gbs = Point::new(op, size, iters, &run.measure(iters)?.samples, None).gbs();
                        checked += 1;
                        let memcpy_gbs = crate::same_host::memcpy_gbs(&a.copy.0, &mut a.copy.1, size, iters);
                        let par_memcpy_gbs = a.parallel.gbs(&a.copy.0, &mut a.copy.1, size, iters)?;
                        Some(HostAnchors { tcp_gbs, memcpy_gbs, par_memcpy_gbs })
                    }
                    None => None,
                };
                let mut point = Point::new(op, size, iters, &timed.samples, baseline);
                point.anchor = anchor;
                point.host_anchors = host_anchors;
                point.contiguous_gbs = contiguous;
                point.post_p50 = (!timed.posts.is_empty()).then(|| median(timed.posts));
                point.first = timed.first;
                each.push(point);
            }
            let point = Point::from_rounds(each).ok_or_else(|| std::io::Error::other("no round was measured"))?;
            on_point(&info, &point, &mut progress);
            points.push(point);
        }
    }
    progress.finish();
    if vectors && mem.gpu().is_some() && same_host_gpus.is_none() {
        // Which way this process's staged GPU chunks of several pieces went (a write's gathers, a
        // read's scatters): the figures above say how fast, this says which path they measured.
        let counts = uccl_tcpx::internal::cuda::ring::segment_copy_counts();
        eprintln!(
            "uccl-tcpx-bench: staged GPU chunks of several pieces in this process (UCCL_TCPX_STAGING_GATHER={:?}): \
             {} by the segment kernel, {} by one copy per piece",
            config.staging.gather, counts.by_kernel, counts.by_copies
        );
    }
    ctl.send("QUIT")?;
    drop(conn);
    if let Some(a) = tcp_anchor {
        drop(a.conn);
        a.engine.shutdown();
    }
    engine.shutdown();
    let info = RunInfo { checked, ..info };
    Ok((info, points))
}

/// `--same-host`: the loopback TCP connection, the memcpy buffers and the threads of the parallel
/// memcpy measured next to ours.
struct TcpAnchor {
    engine: Engine,
    conn: Arc<Connection>,
    mr: u64,
    copy: (HostBuffer, HostBuffer),
    parallel: ParallelCopy,
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

struct Run<'a> {
    args: &'a Args,
    ctl: &'a mut Ctl,
    engine: &'a Engine,
    conn: &'a Arc<Connection>,
    mr: u64,
    mem: &'a mut BenchMemory,
    fifo: FifoItem,
    op: Op,
    layout: Layout,
    seed: u64,
    /// With block tables over several regions (`--kv-regions`): each end's registrations of them,
    /// made for the run.
    split: Option<Split>,
}

/// The buffer cut into regions at block boundaries ([`Layout::regions`]), the same on both ends:
/// this end's registration of each and the server's FifoItem of each.
struct Split {
    bounds: Vec<std::ops::Range<usize>>,
    mrs: Vec<u64>,
    fifos: Vec<FifoItem>,
}

impl Split {
    /// The region holding buffer offset `at`.
    fn of(&self, at: usize) -> usize {
        self.bounds.partition_point(|b| b.end <= at)
    }
}

/// One transfer's items.
enum Items {
    OneSided(Vec<OneSided>),
    Send(Vec<(u64, usize, usize)>),
}

/// Per transfer at depth 1: the round trip (from the post call on) and the time the call took.
struct Timed {
    samples: Vec<Duration>,
    posts: Vec<Duration>,
    /// The first, checked transfer of the size, alone: on a fresh connection it pays what opens on
    /// demand (the data sockets a large transfer asks for).
    first: Option<Duration>,
}

impl Run<'_> {
    /// Checks one transfer, warms up, then times `iters` transfers with `depth` in flight. Returns
    /// one sample per transfer at depth 1, else the mean repeated (there is no per-transfer time).
    fn measure(&mut self, iters: usize) -> Io<Timed> {
        // At least one pass over every slot of the pipeline, so no slot is first used while timed.
        let warmup = (iters / 10).clamp(1, 10).max(self.args.depth);
        let (depth, seed) = (self.args.depth, self.seed);
        let Layout { size, iovs, stride, .. } = self.layout;
        let count = 1 + warmup + iters;
        let kv = u8::from(self.layout.shuffled());
        let regions = if self.layout.shuffled() && self.op != Op::Send { self.args.regions() } else { 1 };
        let shares = self.layout.table.regions();
        let op = self.op.name();
        self.ctl.send(&format!("OP {op} {size} {count} {depth} {iovs} {seed} {stride} {kv} {regions} {shares}"))?;
        let go = self.ctl.expect("GO")?;
        if regions > 1 {
            self.split = Some(self.split(&go, regions)?);
        }
        let timed = self.measured(warmup, iters);
        if let Some(split) = self.split.take() {
            for mr in split.mrs {
                let _ = self.engine.deregister(mr);
            }
            // Every transfer ended: the server may let go of its regions.
            if timed.is_ok() {
                self.ctl.send("FREE")?;
                self.verdict()?;
            }
        }
        timed
    }

    /// This end's registrations of the regions, and the server's FifoItems of them from its `GO`.
    fn split(&self, go: &[String], regions: usize) -> Io<Split> {
        let bounds = self.layout.regions(regions, self.args.depth);
        let fifos = go
            .get(1)
            .map(|list| list.split(',').map(|h| ctl::unhex(h).and_then(|b| <[u8; 64]>::try_from(b).ok())).collect())
            .and_then(|all: Option<Vec<[u8; 64]>>| all)
            .filter(|all| all.len() == bounds.len())
            .ok_or_else(|| std::io::Error::other(format!("the server's GO lacks {} FifoItems", bounds.len())))?;
        let base = self.mem.addr();
        let mut mrs = Vec::with_capacity(bounds.len());
        for b in &bounds {
            match self.engine.register(base + b.start, b.len()) {
                Ok(mr) => mrs.push(mr),
                Err(e) => {
                    for mr in mrs {
                        let _ = self.engine.deregister(mr);
                    }
                    return Err(std::io::Error::other(format!("registering a region: {e}")));
                }
            }
        }
        Ok(Split { bounds, mrs, fifos: fifos.iter().map(FifoItem::from_bytes).collect() })
    }

    /// `measure` once the server is ready: the checked transfer, the warm-up and the timed ones.
    fn measured(&mut self, warmup: usize, iters: usize) -> Io<Timed> {
        let seed = self.seed;
        match self.op {
            Op::Read => self.mem.zero(&self.layout)?,
            _ => self.mem.fill(&self.layout, seed)?,
        }
        let started = Instant::now();
        let first = self.post(&self.items(0))?;
        wait(self.conn, first)?;
        let first = started.elapsed();
        match self.op {
            Op::Write => {
                self.ctl.send("CHECK")?;
                self.verdict()?;
            }
            Op::Read if !self.mem.check(&self.layout, seed)? => return Err(self.wrong_data()),
            _ => {}
        }
        self.pipeline(warmup)?;
        if matches!(self.op, Op::Write | Op::Read) {
            self.settle()?;
        }
        let timed = Timed { first: Some(first), ..self.pipeline(iters)? };
        match self.op {
            Op::Read => {
                self.ctl.send("END")?;
                self.verdict()?;
            }
            Op::Send => self.verdict()?,
            _ => {}
        }
        Ok(timed)
    }

    /// Lets the collapses into huge pages (`UCCL_TCPX_HOST_COPY_COLLAPSE`) that the checked and
    /// warm-up transfers started on either end finish before the timed ones: they should see the
    /// pages a long-running process has.
    fn settle(&mut self) -> Io<()> {
        crate::same_host::settle_collapses("client");
        self.ctl.send("SETTLE")?;
        self.verdict()
    }

    fn verdict(&mut self) -> Io<()> {
        match self.ctl.recv()?.first().map(String::as_str) {
            Some("OK") => Ok(()),
            _ => Err(self.wrong_data()),
        }
    }

    fn wrong_data(&self) -> std::io::Error {
        let Layout { size, iovs, .. } = self.layout;
        std::io::Error::other(format!("{} of {size} bytes in {iovs} pieces delivered wrong data", self.op.name()))
    }

    fn pipeline(&mut self, iters: usize) -> Io<Timed> {
        let depth = self.args.depth;
        let mut samples = Vec::with_capacity(if depth == 1 { iters } else { 1 });
        let mut posts = Vec::with_capacity(iters);
        let start = Instant::now();
        let mut inflight = std::collections::VecDeque::with_capacity(depth);
        for i in 0..iters {
            if inflight.len() == depth {
                wait(self.conn, inflight.pop_front().expect("non-empty"))?;
            }
            let items = self.items(i % depth);
            let t = Instant::now();
            inflight.push_back(self.post(&items)?);
            posts.push(t.elapsed());
            if depth == 1 {
                wait(self.conn, inflight.pop_front().expect("just posted"))?;
                samples.push(t.elapsed());
            }
        }
        while let Some(id) = inflight.pop_front() {
            wait(self.conn, id)?;
        }
        if depth > 1 {
            samples = vec![start.elapsed() / iters.max(1) as u32; iters];
        }
        Ok(Timed { samples, posts, first: None })
    }

    /// The item list of slot `slot`, as a caller builds its descriptors before it posts them.
    fn items(&self, slot: usize) -> Items {
        let base = self.mem.addr();
        match self.op {
            Op::Write | Op::Read => Items::OneSided(
                self.layout
                    .pieces(slot)
                    .zip(self.layout.peer().pieces(slot))
                    .map(|(r, theirs)| {
                        let (mr, mut remote) = match &self.split {
                            None => (self.mr, FifoItem { addr: self.fifo.addr + theirs.start as u64, ..self.fifo }),
                            Some(split) => {
                                let (ours, at) = (split.of(r.start), split.of(theirs.start));
                                let fifo = split.fifos[at];
                                let offset = (theirs.start - split.bounds[at].start) as u64;
                                (split.mrs[ours], FifoItem { addr: fifo.addr + offset, ..fifo })
                            }
                        };
                        remote.size = r.len() as u32;
                        OneSided { mr, addr: base + r.start, len: r.len(), remote }
                    })
                    .collect(),
            ),
            Op::Send => Items::Send(self.layout.pieces(slot).map(|r| (self.mr, base + r.start, r.len())).collect()),
            Op::Transport => unreachable!("transport round trips do not use the engine"),
        }
    }

    /// Posts `items`; the post call is what `post us` times.
    fn post(&self, items: &Items) -> Io<u64> {
        let posted = match items {
            Items::OneSided(ops) if self.op == Op::Write => self.conn.write(ops),
            Items::OneSided(ops) => self.conn.read(ops),
            Items::Send(msgs) => self.conn.send(msgs),
        };
        posted.map_err(|e| std::io::Error::other(format!("{} post: {e}", self.op.name())))
    }
}
