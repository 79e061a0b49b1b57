//! Result lines in UCCL's benchmark format, the summary against the baselines, and JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::anchor::Anchor;
use crate::args::Op;
use crate::rounds::{Spread, median_duration};

/// The run's setup; its field names are the JSON report's (scripts/gpu_bench.sh reads them).
#[derive(Serialize)]
pub struct RunInfo {
    /// Both ends are GPU buffers of one host: one-sided transfers take the same-host path (device
    /// copies), and the points carry device-copy anchors.
    pub same_host: bool,
    /// Each end's memory as [`crate::memory::BenchMemory::describe`] names it.
    pub client_memory: String,
    pub server_memory: String,
    pub channels: u16,
    pub sockets_per_comm: usize,
    pub helpers_per_direction: usize,
    pub raw_streams: usize,
    pub depth: usize,
    pub num_iovs: usize,
    /// The regions a KV transfer's blocks fall in (`--kv-regions`; 1 without `--kv`).
    #[serde(skip_serializing_if = "is_one")]
    pub kv_regions: usize,
    /// Whether a KV transfer over several regions lists its blocks region by region (`--kv-order`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kv_region_major: bool,
    pub chunk_size: u32,
    /// `--rounds`: how many times each point and its anchors were measured, alternately (left out
    /// at 1, the report of one measurement each).
    #[serde(skip_serializing_if = "is_one")]
    pub rounds: usize,
    /// Host memory between two processes of one host: which directions the same-host path copies
    /// directly (null for other runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `--same-host` with host memory: the threads the parallel memcpy anchor copies on, as many as
    /// the library's same-host copies take (UCCL_TCPX_HOST_COPY_THREADS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub par_memcpy_threads: Option<usize>,
    /// Transfers compared byte for byte with what was sent, all equal (a mismatch ends the run
    /// with an error); known once the run is over.
    #[serde(skip)]
    pub checked: usize,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl RunInfo {
    fn on_gpu(&self) -> bool {
        self.client_memory != "host" || self.server_memory != "host"
    }
}

pub struct Point {
    pub op: Op,
    pub size: usize,
    pub iters: usize,
    /// Mean time per transfer (the run's elapsed time over `iters` when several are in flight).
    pub avg: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub baseline: Option<Baseline>,
    /// GB/s of the same bytes in one piece, measured in the same run just before (vector runs).
    pub contiguous_gbs: Option<f64>,
    /// Median time the post call took (one-sided and send ops).
    pub post_p50: Option<Duration>,
    /// The first transfer of the size, checked and untimed otherwise (one-sided and send ops).
    pub first: Option<Duration>,
    /// The same bytes copied between the same GPUs, one copy and one wait each (same-host runs).
    pub anchor: Option<Anchor>,
    /// `--same-host` (host memory): the loopback TCP path and memcpy of the same size on one thread
    /// and on the library's copy threads, same run.
    pub host_anchors: Option<HostAnchors>,
    /// `--rounds` above 1: the rounds this point's medians are taken over.
    pub rounds: Option<Rounds>,
}

/// The rounds of one point, each measured with its own anchors right after it.
pub struct Rounds {
    /// The rounds' own points, in the order measured.
    pub each: Vec<Point>,
    /// Median of the rounds' GB/s (not bytes over a median time, which differs for an even count).
    gbs: f64,
    /// Each ratio every round has, by its JSON name: the spread of the rounds' own ratios.
    ratios: BTreeMap<&'static str, Spread>,
}

impl Rounds {
    /// A ratio's median and range over the rounds, by its JSON name.
    pub fn ratio(&self, name: &str) -> Option<Spread> {
        self.ratios.get(name).copied()
    }
}

type RatioOf = fn(&Point) -> Option<f64>;

/// Every ratio a point may carry: its JSON name, its label on the per-round line, and how a single
/// measurement computes it.
const RATIOS: [(&str, &str, RatioOf); 8] = [
    ("bw_ratio", "/raw", Point::bw_ratio),
    ("msg_ratio", "/msg", Point::msg_ratio),
    ("lat_ratio", "p50/ping-pong", Point::lat_ratio),
    ("vector_ratio", "/1-piece", Point::vector_ratio),
    ("tcp_ratio", "/TCP", Point::tcp_ratio),
    ("par_memcpy_ratio", "/par memcpy", Point::par_memcpy_ratio),
    ("anchor_ratio", "/anchor", Point::anchor_ratio),
    ("anchor_lat_ratio", "p50/anchor p50", Point::anchor_lat_ratio),
];

/// What a same-host host-memory point is measured against, for one size.
#[derive(Clone, Copy, Debug)]
pub struct HostAnchors {
    /// GB/s of the same transfers over loopback TCP (an engine with UCCL_TCPX_DISABLE_IPC=1).
    pub tcp_gbs: f64,
    /// GB/s of memcpy of the same size within one process, on one thread.
    pub memcpy_gbs: f64,
    /// GB/s of the same memcpy split over as many threads as the library copies on: what the
    /// host's memory can copy at all, where one thread's figure is below what the library does.
    pub par_memcpy_gbs: f64,
}

/// Raw TCP between the same two processes, for one size.
#[derive(Clone, Copy, Debug)]
pub struct Baseline {
    /// GB/s of the same streams writing without message ends (the ceiling).
    pub stream_gbs: f64,
    /// GB/s of the same streams carrying acknowledged messages of this size, as many in flight as
    /// the transfers.
    pub message_gbs: f64,
    /// Median round trip of a one-connection ping-pong of this size.
    pub pingpong: Duration,
}

impl Point {
    pub fn new(op: Op, size: usize, iters: usize, samples: &[Duration], baseline: Option<Baseline>) -> Point {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let total: Duration = samples.iter().sum();
        let at = |q: usize| sorted.get((sorted.len() * q / 100).min(sorted.len().saturating_sub(1))).copied();
        Point {
            op,
            size,
            iters,
            avg: total / samples.len().max(1) as u32,
            p50: at(50).unwrap_or_default(),
            p99: at(99).unwrap_or_default(),
            baseline,
            contiguous_gbs: None,
            post_p50: None,
            first: None,
            anchor: None,
            host_anchors: None,
            rounds: None,
        }
    }

    /// One point from the rounds measured of it (`None` for none): every figure the median of the
    /// rounds' (a figure only some rounds have is left out), every ratio the median of the ratios
    /// each round had, ours against the anchors measured next to it. One round is that round.
    pub fn from_rounds(mut each: Vec<Point>) -> Option<Point> {
        if each.len() <= 1 {
            return each.pop();
        }
        let f = |get: fn(&Point) -> Option<f64>| Spread::of_each(each.iter().map(get)).map(|s| s.median);
        let d = |get: fn(&Point) -> Option<Duration>| {
            let all: Option<Vec<Duration>> = each.iter().map(get).collect();
            median_duration(all?)
        };
        let baseline = match (f(|p| p.baseline.map(|b| b.stream_gbs)), f(|p| p.baseline.map(|b| b.message_gbs))) {
            (Some(stream_gbs), Some(message_gbs)) => {
                d(|p| p.baseline.map(|b| b.pingpong)).map(|pingpong| Baseline { stream_gbs, message_gbs, pingpong })
            }
            _ => None,
        };
        let anchor = d(|p| p.anchor.map(|a| a.avg)).zip(d(|p| p.anchor.map(|a| a.p50)));
        let host_anchors = f(|p| p.host_anchors.map(|a| a.tcp_gbs))
            .zip(f(|p| p.host_anchors.map(|a| a.memcpy_gbs)))
            .zip(f(|p| p.host_anchors.map(|a| a.par_memcpy_gbs)))
            .map(|((tcp_gbs, memcpy_gbs), par_memcpy_gbs)| HostAnchors { tcp_gbs, memcpy_gbs, par_memcpy_gbs });
        let ratios = RATIOS
            .iter()
            .filter_map(|&(name, _, get)| Spread::of_each(each.iter().map(get)).map(|s| (name, s)))
            .collect();
        let gbs = f(|p| Some(p.gbs())).unwrap_or_default();
        Some(Point {
            op: each[0].op,
            size: each[0].size,
            iters: each[0].iters,
            avg: d(|p| Some(p.avg)).unwrap_or_default(),
            p50: d(|p| Some(p.p50)).unwrap_or_default(),
            p99: d(|p| Some(p.p99)).unwrap_or_default(),
            baseline,
            contiguous_gbs: f(|p| p.contiguous_gbs),
            post_p50: d(|p| p.post_p50),
            first: d(|p| p.first),
            anchor: anchor.map(|(avg, p50)| Anchor { avg, p50 }),
            host_anchors,
            rounds: Some(Rounds { each, gbs, ratios }),
        })
    }

    pub fn gbs(&self) -> f64 {
        match &self.rounds {
            Some(r) => r.gbs,
            None => self.size as f64 / self.avg.as_secs_f64().max(1e-12) / 1e9,
        }
    }

    /// A ratio by its JSON name: the median of the rounds' own where there were rounds (never the
    /// ratio of two medians), else `own` of this measurement.
    fn ratio(&self, name: &str, own: impl FnOnce() -> Option<f64>) -> Option<f64> {
        match &self.rounds {
            Some(r) => r.ratio(name).map(|s| s.median),
            None => own(),
        }
    }

    pub fn bw_ratio(&self) -> Option<f64> {
        self.ratio("bw_ratio", || self.baseline.map(|b| self.gbs() / b.stream_gbs))
    }

    pub fn msg_ratio(&self) -> Option<f64> {
        self.ratio("msg_ratio", || self.baseline.map(|b| self.gbs() / b.message_gbs))
    }

    /// Ours over the same bytes in one piece.
    pub fn vector_ratio(&self) -> Option<f64> {
        self.ratio("vector_ratio", || self.contiguous_gbs.map(|c| self.gbs() / c))
    }

    pub fn anchor_gbs(&self) -> Option<f64> {
        self.anchor.map(|a| a.gbs(self.size))
    }

    /// Ours over the device copies' bandwidth.
    pub fn anchor_ratio(&self) -> Option<f64> {
        self.ratio("anchor_ratio", || self.anchor_gbs().map(|a| self.gbs() / a))
    }

    /// Our median round trip over one device copy's launch and wait.
    pub fn anchor_lat_ratio(&self) -> Option<f64> {
        self.ratio("anchor_lat_ratio", || self.anchor.map(|a| self.p50.as_secs_f64() / a.p50.as_secs_f64().max(1e-12)))
    }

    /// Ours over the same transfers over loopback TCP.
    pub fn tcp_ratio(&self) -> Option<f64> {
        self.ratio("tcp_ratio", || self.host_anchors.map(|a| self.gbs() / a.tcp_gbs))
    }

    /// Ours over memcpy of the same size on the library's copy threads.
    pub fn par_memcpy_ratio(&self) -> Option<f64> {
        self.ratio("par_memcpy_ratio", || self.host_anchors.map(|a| self.gbs() / a.par_memcpy_gbs))
    }

    pub fn lat_ratio(&self) -> Option<f64> {
        self.ratio("lat_ratio", || self.baseline.map(|b| self.p50.as_secs_f64() / b.pingpong.as_secs_f64().max(1e-12)))
    }
}

/// How many rounds the points' figures are medians of (1: single measurements).
fn rounds_of(points: &[Point]) -> usize {
    points.iter().find_map(|p| p.rounds.as_ref().map(|r| r.each.len())).unwrap_or(1)
}

/// The summary headers' note on rounds: empty for single measurements.
fn medians_note(points: &[Point]) -> String {
    match rounds_of(points) {
        1 => String::new(),
        n => format!(", medians of {n} alternated rounds"),
    }
}

/// With rounds, the line under a point's that shows their spread: ours per round, then each ratio
/// per round with its median and range.
pub fn rounds_line(p: &Point) -> Option<String> {
    let r = p.rounds.as_ref()?;
    let list = |v: &mut dyn Iterator<Item = f64>| v.map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
    let mut out = format!("#   {} rounds: GB/s {}", r.each.len(), list(&mut r.each.iter().map(Point::gbs)));
    for (name, label, get) in RATIOS {
        if let Some(s) = r.ratio(name) {
            let each = list(&mut r.each.iter().filter_map(get));
            out += &format!(" | {label} {each} (median {:.2}, {:.2}-{:.2})", s.median, s.min, s.max);
        }
    }
    Some(out)
}

pub fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 30 && n.is_multiple_of(1 << 30) => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n.is_multiple_of(1 << 20) => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n.is_multiple_of(1 << 10) => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

pub fn header(info: &RunInfo, mode: &str) -> String {
    let mut head = header_lines(info, mode);
    if let Some(path) = &info.host_path {
        head += &format!("\n# host memory between the two processes: {path}");
    }
    if let Some(threads) = info.par_memcpy_threads {
        let threads = if threads == 1 { "1 thread".into() } else { format!("{threads} threads") };
        head += &format!(
            "\n# anchors: loopback TCP (UCCL_TCPX_DISABLE_IPC=1), memcpy on one thread, par memcpy on {threads} \
             (the library's UCCL_TCPX_HOST_COPY_THREADS)"
        );
    }
    head
}

fn header_lines(info: &RunInfo, mode: &str) -> String {
    let memory = if info.same_host {
        format!(
            "GPU memory (client {}, server {}), one-sided transfers over the same-host path (device copies; CUDA \
             IPC between the two processes), sends staged through pinned host memory",
            info.client_memory, info.server_memory
        )
    } else if info.on_gpu() {
        format!(
            "GPU memory (client {}, server {}) staged through pinned host memory",
            info.client_memory, info.server_memory
        )
    } else {
        "host memory".into()
    };
    let baseline_memory = if info.on_gpu() { "host-memory buffers of the same size" } else { "same buffers" };
    format!(
        "# uccl-tcpx-bench: socket transport, {memory}, {mode}\n# {} channels x {} sockets ({} shared helper threads \
         per direction), chunk {}, {} in flight, {} iov(s){}; baseline: raw TCP, {} streams with a thread each, \
         {baseline_memory}; msg = the same streams (at most one per 64 KiB of message), each message acknowledged, as \
         many in flight",
        info.channels,
        info.sockets_per_comm,
        info.helpers_per_direction,
        human(info.chunk_size as usize),
        info.depth,
        info.num_iovs,
        match (info.kv_regions, info.kv_region_major) {
            (1, _) => String::new(),
            (n, true) => format!(" in {n} registered regions, listed region by region"),
            (n, false) => format!(" in {n} registered regions, listed in any order"),
        },
        info.raw_streams
    )
}

/// `[Client] size : Gbps | GB/s | us`, UCCL's per-size line; same-host runs add the anchor.
pub fn line(p: &Point) -> String {
    let gbs = p.gbs();
    let mut out = format!(
        "[Client] {:>8} : {:6.2} Gbps | {:6.2} GB/s | {:8.2} us   ({})",
        human(p.size),
        gbs * 8.0,
        gbs,
        p.avg.as_secs_f64() * 1e6,
        p.op.name()
    );
    if let (Some(a), Some(ratio)) = (p.anchor_gbs(), p.anchor_ratio()) {
        out += &format!("   anchor {a:.2} GB/s ({ratio:.2})");
    }
    out
}

/// 64 MiB one-sided transfers reach this share of the device copies' bandwidth.
const GOAL_BANDWIDTH_SHARE: f64 = 0.90;
/// An 8-byte write's round trip stays within this many times one device copy's launch and wait.
const GOAL_LATENCY_RATIO: f64 = 1.5;

/// The same-host table: ours against the device copies, and the goals.
fn anchor_summary(points: &[Point]) -> String {
    let mut s = format!(
        "\n# Same-host path against device copies of the same bytes between the same GPUs (cuMemcpyPeerAsync \
         across GPUs, cuMemcpyDtoDAsync on one), one copy and one cuStreamSynchronize each{}\n",
        medians_note(points)
    );
    s += &format!(
        "{:<9} {:>9} {:>10} {:>12} {:>7} {:>10} {:>14} {:>7}\n",
        "op", "size", "GB/s", "anchor GB/s", "ratio", "p50 us", "anchor p50 us", "ratio"
    );
    let fmt = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into());
    let mut goals = String::new();
    for p in points.iter().filter(|p| p.anchor.is_some()) {
        s += &format!(
            "{:<9} {:>9} {:>10.2} {:>12} {:>7} {:>10.1} {:>14} {:>7}\n",
            p.op.name(),
            human(p.size),
            p.gbs(),
            fmt(p.anchor_gbs(), 2),
            fmt(p.anchor_ratio(), 2),
            p.p50.as_secs_f64() * 1e6,
            fmt(p.anchor.map(|a| a.p50.as_secs_f64() * 1e6), 1),
            fmt(p.anchor_lat_ratio(), 2),
        );
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        if p.size == 64 << 20
            && let Some(r) = p.anchor_ratio()
        {
            goals += &format!(
                "# goal: 64 MiB {} at >= {GOAL_BANDWIDTH_SHARE:.2} of the anchor's GB/s: {r:.2}, {}\n",
                p.op.name(),
                met(r >= GOAL_BANDWIDTH_SHARE)
            );
        }
        if p.size == 8
            && p.op == Op::Write
            && let Some(r) = p.anchor_lat_ratio()
        {
            goals += &format!(
                "# goal: 8 B write round trip <= {GOAL_LATENCY_RATIO:.1}x the anchor's launch+sync: {r:.2}x, {}\n",
                met(r <= GOAL_LATENCY_RATIO)
            );
        }
    }
    s + &goals
}

/// The line that says the run's bytes were compared: the exit status alone says so only to a script.
pub fn checked_line(info: &RunInfo) -> String {
    match info.checked {
        0 => "# bytes checked: none (no op of this run moves a buffer)".into(),
        n => format!("# bytes checked: {n} transfers (the first of each measurement), all equal"),
    }
}

pub fn summary(points: &[Point]) -> String {
    let mut s = format!(
        "\n# Summary{} (ratio = ours / raw TCP with the same streams: streaming without message ends, and \
         acknowledged messages of the size with the same depth; latency: median round trip, ours vs a raw \
         ping-pong of the same size; first: the size's first transfer, timed alone)\n",
        medians_note(points)
    );
    s += &format!(
        "{:<9} {:>9} {:>10} {:>10} {:>7} {:>10} {:>7} {:>12} {:>12} {:>7} {:>10}\n",
        "op", "size", "GB/s", "raw GB/s", "ratio", "msg GB/s", "ratio", "p50 us", "raw p50 us", "ratio", "first us"
    );
    let vectors = points.iter().any(|p| p.contiguous_gbs.is_some());
    if vectors {
        s.pop();
        s += &format!(" {:>12} {:>10} {:>10}\n", "1-piece GB/s", "vec ratio", "post us");
    }
    let host = points.iter().any(|p| p.host_anchors.is_some());
    if host {
        s.pop();
        s += &format!(
            " {:>10} {:>9} {:>11} {:>15} {:>7}\n",
            "TCP GB/s", "x TCP", "memcpy GB/s", "par memcpy GB/s", "x par"
        );
    }
    let fmt = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into());
    for p in points {
        let b = p.baseline;
        s += &format!(
            "{:<9} {:>9} {:>10.2} {:>10} {:>7} {:>10} {:>7} {:>12.1} {:>12} {:>7} {:>10}",
            p.op.name(),
            human(p.size),
            p.gbs(),
            fmt(b.map(|b| b.stream_gbs), 2),
            fmt(p.bw_ratio(), 2),
            fmt(b.map(|b| b.message_gbs), 2),
            fmt(p.msg_ratio(), 2),
            p.p50.as_secs_f64() * 1e6,
            fmt(b.map(|b| b.pingpong.as_secs_f64() * 1e6), 1),
            fmt(p.lat_ratio(), 2),
            fmt(p.first.map(|d| d.as_secs_f64() * 1e6), 1),
        );
        if vectors {
            let post = p.post_p50.map(|d| d.as_secs_f64() * 1e6);
            s += &format!(" {:>12} {:>10} {:>10}", fmt(p.contiguous_gbs, 2), fmt(p.vector_ratio(), 2), fmt(post, 1));
        }
        if host {
            let a = p.host_anchors;
            let (tcp, memcpy, par) = (a.map(|a| a.tcp_gbs), a.map(|a| a.memcpy_gbs), a.map(|a| a.par_memcpy_gbs));
            s += &format!(
                " {:>10} {:>9} {:>11} {:>15} {:>7}",
                fmt(tcp, 2),
                fmt(p.tcp_ratio(), 2),
                fmt(memcpy, 2),
                fmt(par, 2),
                fmt(p.par_memcpy_ratio(), 2)
            );
        }
        s.push('\n');
    }
    if points.iter().any(|p| p.anchor.is_some()) {
        s += &anchor_summary(points);
    }
    s
}

/// The JSON report: the run's setup, then one entry per point. Field names are the interface
/// (scripts/gpu_bench.sh and the docs read them).
#[derive(Serialize)]
struct JsonReport<'a> {
    mode: &'a str,
    device: &'static str,
    #[serde(flatten)]
    info: &'a RunInfo,
    results: Vec<JsonPoint>,
}

/// One point in the JSON report; the baseline fields are null where no baseline ran.
#[derive(Serialize)]
struct JsonPoint {
    op: &'static str,
    size: usize,
    iters: usize,
    gbps: f64,
    gb_per_s: f64,
    avg_us: f64,
    p50_us: f64,
    p99_us: f64,
    raw_gb_per_s: Option<f64>,
    bw_ratio: Option<f64>,
    raw_msg_gb_per_s: Option<f64>,
    msg_ratio: Option<f64>,
    raw_pingpong_p50_us: Option<f64>,
    lat_ratio: Option<f64>,
    contiguous_gb_per_s: Option<f64>,
    vector_ratio: Option<f64>,
    post_p50_us: Option<f64>,
    /// The first transfer of the size alone: on a fresh connection, with what opens on demand.
    first_us: Option<f64>,
    anchor_gb_per_s: Option<f64>,
    anchor_ratio: Option<f64>,
    anchor_p50_us: Option<f64>,
    anchor_lat_ratio: Option<f64>,
    /// `--same-host` (host memory) only: the anchors of the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memcpy_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    par_memcpy_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    par_memcpy_ratio: Option<f64>,
    /// `--rounds` above 1 only: each round's own figures, in the order measured (the fields above
    /// are their medians, ratios the medians of the rounds' ratios).
    #[serde(skip_serializing_if = "Option::is_none")]
    rounds: Option<Vec<JsonPoint>>,
    /// `--rounds` above 1 only: each ratio's [min, max] over the rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_ranges: Option<BTreeMap<&'static str, [f64; 2]>>,
}

impl JsonPoint {
    fn new(p: &Point) -> JsonPoint {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        JsonPoint {
            op: p.op.name(),
            size: p.size,
            iters: p.iters,
            gbps: p.gbs() * 8.0,
            gb_per_s: p.gbs(),
            avg_us: us(p.avg),
            p50_us: us(p.p50),
            p99_us: us(p.p99),
            raw_gb_per_s: p.baseline.map(|b| b.stream_gbs),
            bw_ratio: p.bw_ratio(),
            raw_msg_gb_per_s: p.baseline.map(|b| b.message_gbs),
            msg_ratio: p.msg_ratio(),
            raw_pingpong_p50_us: p.baseline.map(|b| us(b.pingpong)),
            lat_ratio: p.lat_ratio(),
            contiguous_gb_per_s: p.contiguous_gbs,
            vector_ratio: p.vector_ratio(),
            post_p50_us: p.post_p50.map(us),
            first_us: p.first.map(us),
            anchor_gb_per_s: p.anchor_gbs(),
            anchor_ratio: p.anchor_ratio(),
            anchor_p50_us: p.anchor.map(|a| us(a.p50)),
            anchor_lat_ratio: p.anchor_lat_ratio(),
            tcp_gb_per_s: p.host_anchors.map(|a| a.tcp_gbs),
            tcp_ratio: p.tcp_ratio(),
            memcpy_gb_per_s: p.host_anchors.map(|a| a.memcpy_gbs),
            par_memcpy_gb_per_s: p.host_anchors.map(|a| a.par_memcpy_gbs),
            par_memcpy_ratio: p.par_memcpy_ratio(),
            rounds: p.rounds.as_ref().map(|r| r.each.iter().map(JsonPoint::new).collect()),
            ratio_ranges: p.rounds.as_ref().map(|r| r.ratios.iter().map(|(&k, s)| (k, [s.min, s.max])).collect()),
        }
    }
}

/// The report as one line of JSON.
pub fn json(info: &RunInfo, mode: &str, points: &[Point]) -> Result<String, serde_json::Error> {
    serde_json::to_string(&JsonReport {
        mode,
        device: if info.on_gpu() { "gpu" } else { "cpu" },
        info,
        results: points.iter().map(JsonPoint::new).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(client: &str, server: &str) -> RunInfo {
        RunInfo {
            same_host: false,
            channels: 4,
            sockets_per_comm: 2,
            helpers_per_direction: 2,
            raw_streams: 8,
            depth: 1,
            num_iovs: 1,
            kv_regions: 1,
            kv_region_major: false,
            chunk_size: 1 << 20,
            rounds: 1,
            client_memory: client.into(),
            server_memory: server.into(),
            host_path: None,
            par_memcpy_threads: None,
            checked: 0,
        }
    }

    #[test]
    fn header_names_the_memory_and_the_baselines_memory() {
        let host = header(&info("host", "host"), "loopback");
        assert!(host.starts_with("# uccl-tcpx-bench: socket transport, host memory, loopback"), "{host}");
        assert!(host.contains("same buffers; msg = "), "{host}");
        let gpu = header(&info("gpu0@a", "gpu1@b"), "loopback");
        assert!(gpu.contains("GPU memory (client gpu0@a, server gpu1@b)"), "{gpu}");
        assert!(gpu.contains("host-memory buffers of the same size; msg = "), "{gpu}");
    }

    #[test]
    fn point_statistics_and_formats() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let baseline = Baseline { stream_gbs: 1.0, message_gbs: 0.5, pingpong: Duration::from_micros(25) };
        let p = Point::new(Op::Write, 1000, 100, &samples, Some(baseline));
        assert_eq!(p.p50, Duration::from_micros(51));
        assert_eq!(p.avg, Duration::from_nanos(50_500));
        assert!((p.gbs() - 1000.0 / 50.5e-6 / 1e9).abs() < 1e-9);
        assert!((p.lat_ratio().unwrap() - 51.0 / 25.0).abs() < 1e-9);
        assert!((p.msg_ratio().unwrap() - 2.0 * p.bw_ratio().unwrap()).abs() < 1e-9);
        let table = summary(std::slice::from_ref(&p));
        let row: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(&row[..4], ["write", "1000", "B", "0.02"], "{table}");
        assert_eq!(&row[4..], ["1.00", "0.02", "0.50", "0.04", "51.0", "25.0", "2.04", "-"], "{table}");
        let mut first = Point::new(Op::Write, 1000, 100, &samples, Some(baseline));
        first.first = Some(Duration::from_micros(700));
        let table = summary(&[first]);
        assert_eq!(table.lines().last().unwrap().split_whitespace().last(), Some("700.0"), "{table}");
        assert!(line(&p).starts_with("[Client]   1000 B :"), "{}", line(&p));
        assert!(!table.contains("vec ratio"), "no vector columns without a one-piece figure: {table}");
        let mut v = Point::new(Op::Read, 1000, 100, &samples, None);
        v.contiguous_gbs = Some(0.04);
        v.post_p50 = Some(Duration::from_micros(12));
        let table = summary(&[v]);
        assert!(table.lines().nth(2).unwrap().ends_with("1-piece GB/s  vec ratio    post us"), "{table}");
        let row: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(&row[row.len() - 3..], ["0.04", "0.50", "12.0"], "{table}");
        assert_eq!(human(8), "8 B");
        assert_eq!(human(256 << 20), "256 MiB");
        assert_eq!(human(3 << 10), "3 KiB");
    }

    fn parsed(info: &RunInfo, mode: &str, points: &[Point]) -> serde_json::Value {
        let text = json(info, mode, points).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn names(v: &serde_json::Value) -> Vec<&str> {
        let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn checked_line_counts_the_compared_transfers() {
        let mut run = info("host", "host");
        assert_eq!(checked_line(&run), "# bytes checked: none (no op of this run moves a buffer)");
        run.checked = 12;
        assert_eq!(checked_line(&run), "# bytes checked: 12 transfers (the first of each measurement), all equal");
        let v = parsed(&run, "loopback, 2 processes", &[]);
        assert!(v.get("checked").is_none(), "the count is printed, not part of the JSON report");
    }

    #[test]
    fn json_report_keeps_its_field_names_and_values() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let baseline = Baseline { stream_gbs: 1.0, message_gbs: 0.5, pingpong: Duration::from_micros(25) };
        let mut measured = Point::new(Op::Write, 1000, 100, &samples, Some(baseline));
        measured.contiguous_gbs = Some(0.04);
        measured.post_p50 = Some(Duration::from_micros(3));
        measured.first = Some(Duration::from_micros(700));
        let bare = Point::new(Op::Transport, 8, 3, &samples[..3], None);
        let mut run = info("gpu0@0000:4a:00.0", "gpu1@0000:5b:00.0");
        run.channels = 2;
        let v = parsed(&run, "loopback, 2 processes", &[measured, bare]);
        // The names scripts/gpu_bench.sh and the docs read; a rename has to show up here.
        assert_eq!(
            names(&v),
            [
                "channels",
                "chunk_size",
                "client_memory",
                "depth",
                "device",
                "helpers_per_direction",
                "mode",
                "num_iovs",
                "raw_streams",
                "results",
                "same_host",
                "server_memory",
                "sockets_per_comm"
            ]
        );
        assert_eq!((v["mode"].as_str(), v["device"].as_str()), (Some("loopback, 2 processes"), Some("gpu")));
        assert_eq!(v["client_memory"], "gpu0@0000:4a:00.0");
        assert_eq!(v["server_memory"], "gpu1@0000:5b:00.0");
        assert_eq!((v["channels"].as_u64(), v["raw_streams"].as_u64()), (Some(2), Some(8)));
        assert_eq!(v["chunk_size"].as_u64(), Some(1 << 20));
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        let p = &results[0];
        assert_eq!(
            names(p),
            [
                "anchor_gb_per_s",
                "anchor_lat_ratio",
                "anchor_p50_us",
                "anchor_ratio",
                "avg_us",
                "bw_ratio",
                "contiguous_gb_per_s",
                "first_us",
                "gb_per_s",
                "gbps",
                "iters",
                "lat_ratio",
                "msg_ratio",
                "op",
                "p50_us",
                "p99_us",
                "post_p50_us",
                "raw_gb_per_s",
                "raw_msg_gb_per_s",
                "raw_pingpong_p50_us",
                "size",
                "vector_ratio"
            ]
        );
        let f = |key: &str| p[key].as_f64().unwrap_or_else(|| panic!("{key} in {p}"));
        assert_eq!((p["op"].as_str(), p["size"].as_u64(), p["iters"].as_u64()), (Some("write"), Some(1000), Some(100)));
        let gbs = 1000.0 / 50.5e-6 / 1e9;
        for (key, want) in [
            ("gb_per_s", gbs),
            ("gbps", gbs * 8.0),
            ("avg_us", 50.5),
            ("p50_us", 51.0),
            ("p99_us", 100.0),
            ("raw_gb_per_s", 1.0),
            ("bw_ratio", gbs),
            ("raw_msg_gb_per_s", 0.5),
            ("msg_ratio", gbs / 0.5),
            ("raw_pingpong_p50_us", 25.0),
            ("lat_ratio", 51.0 / 25.0),
            ("contiguous_gb_per_s", 0.04),
            ("vector_ratio", gbs / 0.04),
            ("post_p50_us", 3.0),
            ("first_us", 700.0),
        ] {
            assert!((f(key) - want).abs() < 1e-9, "{key}: {} against {want}", f(key));
        }
        let q = &results[1];
        assert_eq!((q["op"].as_str(), q["size"].as_u64()), (Some("transport"), Some(8)));
        for key in [
            "raw_gb_per_s",
            "bw_ratio",
            "raw_msg_gb_per_s",
            "msg_ratio",
            "raw_pingpong_p50_us",
            "lat_ratio",
            "contiguous_gb_per_s",
            "vector_ratio",
            "post_p50_us",
            "first_us",
            "anchor_gb_per_s",
            "anchor_ratio",
            "anchor_p50_us",
            "anchor_lat_ratio",
        ] {
            assert!(q[key].is_null(), "no baseline ran: {key} in {q}");
        }
    }

    #[test]
    fn same_host_host_memory_points_report_their_anchors() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let mut p = Point::new(Op::Write, 1 << 20, 100, &samples, None);
        let par = p.gbs() * 2.0;
        p.host_anchors = Some(HostAnchors { tcp_gbs: p.gbs() / 4.0, memcpy_gbs: 30.0, par_memcpy_gbs: par });
        let table = summary(std::slice::from_ref(&p));
        assert!(
            table.lines().nth(2).unwrap().ends_with("TCP GB/s     x TCP memcpy GB/s par memcpy GB/s   x par"),
            "{table}"
        );
        let row: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(&row[row.len() - 4..], ["4.00", "30.00", &format!("{par:.2}"), "0.50"], "{table}");
        let mut run = info("host", "host");
        run.host_path = Some("reads copied directly, writes copied directly".into());
        run.par_memcpy_threads = Some(6);
        let head = header(&run, "loopback");
        let lines: Vec<&str> = head.lines().collect();
        assert_eq!(
            lines[lines.len() - 2..],
            [
                "# host memory between the two processes: reads copied directly, writes copied directly",
                "# anchors: loopback TCP (UCCL_TCPX_DISABLE_IPC=1), memcpy on one thread, par memcpy on 6 threads \
                 (the library's UCCL_TCPX_HOST_COPY_THREADS)"
            ],
            "{head}"
        );
        let v = parsed(&run, "loopback", std::slice::from_ref(&p));
        assert_eq!(v["host_path"].as_str(), run.host_path.as_deref());
        assert_eq!(v["par_memcpy_threads"].as_u64(), Some(6));
        let q = &v["results"][0];
        assert!((q["tcp_ratio"].as_f64().unwrap() - 4.0).abs() < 1e-9, "{q}");
        assert_eq!(q["memcpy_gb_per_s"].as_f64(), Some(30.0));
        assert_eq!(q["par_memcpy_gb_per_s"].as_f64(), Some(par));
        assert!((q["par_memcpy_ratio"].as_f64().unwrap() - 0.5).abs() < 1e-9, "{q}");
        let plain = parsed(&info("host", "host"), "loopback", &[Point::new(Op::Write, 8, 1, &samples[..1], None)]);
        assert!(plain["host_path"].is_null() && plain["results"][0]["tcp_gb_per_s"].is_null(), "{plain}");
        assert!(plain["par_memcpy_threads"].is_null(), "{plain}");
        assert!(plain["results"][0]["par_memcpy_gb_per_s"].is_null(), "{plain}");
        assert!(plain["results"][0]["par_memcpy_ratio"].is_null(), "{plain}");
        assert!(!header(&info("host", "host"), "loopback").contains("par memcpy"));
        run.par_memcpy_threads = Some(1);
        let one = header(&run, "loopback");
        assert!(one.contains(" par memcpy on 1 thread (the library's "), "{one}");
    }

    #[test]
    fn rounds_take_the_parallel_memcpy_ratio_within_each_round() {
        // Ours 1, 0.5, 0.25 GB/s against parallel memcpy 4, 0.25, 0.5: ratios 0.25, 2, 0.5, whose
        // median (0.5) is not the ratio of the medians (0.5 / 0.5).
        let rounds = [(1, 4.0), (2, 0.25), (4, 0.5)].map(|(us, par_memcpy_gbs)| {
            let mut p = Point::new(Op::Read, 1000, 4, &[Duration::from_micros(us); 4], None);
            p.host_anchors = Some(HostAnchors { tcp_gbs: 1.0, memcpy_gbs: 1.0, par_memcpy_gbs });
            p
        });
        let p = Point::from_rounds(rounds.into()).unwrap();
        assert_eq!(p.host_anchors.map(|a| a.par_memcpy_gbs), Some(0.5));
        assert!((p.par_memcpy_ratio().unwrap() - 0.5).abs() < 1e-12, "{:?}", p.par_memcpy_ratio());
        let spread = p.rounds.as_ref().unwrap().ratio("par_memcpy_ratio").unwrap();
        assert!((spread.min - 0.25).abs() < 1e-12 && (spread.max - 2.0).abs() < 1e-12, "{spread:?}");
        let line = rounds_line(&p).unwrap();
        assert!(line.contains(" | /par memcpy 0.25 2.00 0.50 (median 0.50, 0.25-2.00)"), "{line}");
    }

    #[test]
    fn same_host_points_report_the_anchor_and_the_goals() {
        let us = |n: u64| vec![Duration::from_micros(n); 10];
        let mut big = Point::new(Op::Write, 64 << 20, 10, &us(200), None);
        big.anchor = Some(Anchor { avg: Duration::from_micros(190), p50: Duration::from_micros(190) });
        let mut slow = Point::new(Op::Read, 64 << 20, 10, &us(400), None);
        slow.anchor = Some(Anchor { avg: Duration::from_micros(190), p50: Duration::from_micros(190) });
        let mut small = Point::new(Op::Write, 8, 10, &us(12), None);
        small.anchor = Some(Anchor { avg: Duration::from_micros(10), p50: Duration::from_micros(10) });
        let plain = Point::new(Op::Send, 8, 10, &us(30), None);
        assert!((big.anchor_ratio().unwrap() - 0.95).abs() < 1e-9);
        assert!((small.anchor_lat_ratio().unwrap() - 1.2).abs() < 1e-9);
        assert!(line(&big).ends_with("anchor 353.20 GB/s (0.95)"), "{}", line(&big));
        assert!(!line(&plain).contains("anchor"));
        let table = summary(&[big, slow, small, plain]);
        assert!(table.contains("# goal: 64 MiB write at >= 0.90 of the anchor's GB/s: 0.95, met"), "{table}");
        assert!(table.contains("# goal: 64 MiB read at >= 0.90 of the anchor's GB/s: 0.48, MISSED"), "{table}");
        assert!(table.contains("# goal: 8 B write round trip <= 1.5x the anchor's launch+sync: 1.20x, met"), "{table}");
        assert_eq!(table.matches("# goal").count(), 3, "{table}");
        assert!(!summary(&[Point::new(Op::Send, 8, 10, &us(30), None)]).contains("anchor"));
    }

    /// A round of 1000-byte writes at `us` per transfer (1000 / us / 1000 GB/s) against a baseline
    /// streaming `raw` GB/s.
    fn round(us: u64, raw: f64) -> Point {
        let baseline = Baseline { stream_gbs: raw, message_gbs: raw / 2.0, pingpong: Duration::from_micros(us) };
        Point::new(Op::Write, 1000, 4, &[Duration::from_micros(us); 4], Some(baseline))
    }

    #[test]
    fn rounds_report_medians_and_ratios_taken_within_each_round() {
        // Ours 1, 0.5, 0.25 GB/s against raw 1, 0.25, 1: ratios 1, 2, 0.25, whose median (1) is
        // not the ratio of the medians (0.5 / 1).
        let odd = Point::from_rounds(vec![round(1, 1.0), round(2, 0.25), round(4, 1.0)]).unwrap();
        assert!((odd.gbs() - 0.5).abs() < 1e-12, "{}", odd.gbs());
        assert_eq!(odd.baseline.map(|b| b.stream_gbs), Some(1.0));
        assert_eq!(odd.baseline.map(|b| b.pingpong), Some(Duration::from_micros(2)));
        assert_eq!((odd.p50, odd.avg), (Duration::from_micros(2), Duration::from_micros(2)));
        assert!((odd.bw_ratio().unwrap() - 1.0).abs() < 1e-12, "{:?}", odd.bw_ratio());
        assert!((odd.msg_ratio().unwrap() - 2.0).abs() < 1e-12, "{:?}", odd.msg_ratio());
        let r = odd.rounds.as_ref().unwrap();
        assert_eq!(r.each.len(), 3);
        let bw = r.ratio("bw_ratio").unwrap();
        assert!((bw.min - 0.25).abs() < 1e-12 && (bw.max - 2.0).abs() < 1e-12, "{bw:?}");
        assert_eq!((r.ratio("tcp_ratio"), r.ratio("anchor_ratio")), (None, None), "no round had them");
        // A fourth round of 0.125 GB/s against 0.0625: ratios 0.25, 1, 2, 2 (median 1.5); ours
        // 0.375 and raw 0.625 as medians of an even count, whose ratio would be 0.6.
        let even = Point::from_rounds(vec![round(1, 1.0), round(2, 0.25), round(4, 1.0), round(8, 0.0625)]).unwrap();
        assert!((even.gbs() - 0.375).abs() < 1e-12, "{}", even.gbs());
        assert!((even.baseline.unwrap().stream_gbs - 0.625).abs() < 1e-12);
        assert!((even.bw_ratio().unwrap() - 1.5).abs() < 1e-12, "{:?}", even.bw_ratio());
        assert_eq!(even.p50, Duration::from_micros(3));
        // The table holds the medians and says so; the line under the point shows each round.
        let table = summary(std::slice::from_ref(&odd));
        assert!(table.contains("# Summary, medians of 3 alternated rounds (ratio = "), "{table}");
        let row: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(&row[3..8], ["0.50", "1.00", "1.00", "0.50", "2.00"], "{table}");
        let line = rounds_line(&odd).unwrap();
        assert!(
            line.starts_with("#   3 rounds: GB/s 1.00 0.50 0.25 | /raw 1.00 2.00 0.25 (median 1.00, 0.25-2.00)"),
            "{line}"
        );
        // The JSON carries every round and each ratio's range; one round stays as it was.
        let mut run = info("host", "host");
        run.rounds = 3;
        let v = parsed(&run, "loopback", std::slice::from_ref(&odd));
        assert_eq!(v["rounds"].as_u64(), Some(3));
        let q = &v["results"][0];
        let each = q["rounds"].as_array().unwrap();
        assert_eq!(each.iter().map(|e| e["gb_per_s"].as_f64().unwrap()).collect::<Vec<_>>(), [1.0, 0.5, 0.25]);
        assert!(each.iter().all(|e| e.get("rounds").is_none()), "{q}");
        assert_eq!(q["ratio_ranges"]["bw_ratio"].as_array().map(Vec::len), Some(2), "{q}");
        assert!((q["bw_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{q}");
        let one = Point::from_rounds(vec![round(2, 0.25)]).unwrap();
        assert!(one.rounds.is_none() && rounds_line(&one).is_none());
        assert!((one.bw_ratio().unwrap() - 2.0).abs() < 1e-12);
        let plain = parsed(&info("host", "host"), "loopback", &[one]);
        assert!(plain.get("rounds").is_none() && plain["results"][0].get("ratio_ranges").is_none(), "{plain}");
        assert!(!summary(&[round(2, 0.25)]).contains("medians"));
        assert!(Point::from_rounds(Vec::new()).is_none());
    }

    #[test]
    fn json_report_escapes_strings_and_names_host_runs_cpu() {
        let odd = "a \"quoted\" mode\\with a backslash\nand a line";
        let v = parsed(&info("host", "host"), odd, &[]);
        assert_eq!((v["mode"].as_str(), v["device"].as_str()), (Some(odd), Some("cpu")));
        assert_eq!(v["results"].as_array().map(Vec::len), Some(0));
    }
}
