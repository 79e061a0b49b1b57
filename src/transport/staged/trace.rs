//! Opt-in timeline of staged chunks (`UCCL_TCPX_TRACE_STAGING=1`), to find where a transfer's time
//! goes: every chunk of every staged comm gets a timestamp per stage, and the gaps between the
//! progress thread's visits to a comm are counted. Chunks are grouped into bursts (from the first
//! chunk posted while none was in flight to the moment none is again: one transfer at depth 1),
//! and consecutive bursts of the same shape into groups. At exit each process prints, per group,
//! the burst durations and one typical burst's (the one nearest the median duration) per-comm
//! first..last time of every stage (relative to
//! the burst's start, whose CLOCK_MONOTONIC time is printed so the two ends of a loopback pair line
//! up) plus the mean time between consecutive stages. A send chunk copied in parts
//! (`UCCL_TCPX_STAGING_PIPELINE`) also marks when its first part was seen landed (it is handed
//! over then, before its copy finished), a receive copied out in parts has its copy issued before
//! its inner receive ends, and the comm's line says how many parts its chunks took.
//!
//! Off, the comms hold no tracer and pay one branch per call.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::trace::clock_ns;
use crate::trace::{Spread, report_at_exit};

#[derive(Clone, Copy, Debug)]
pub(super) enum Mark {
    /// The engine's isend / irecv was accepted.
    Posted,
    /// The chunk's copy was queued (device-to-host for a send, host-to-device for a receive).
    CopyIssued,
    /// The progress thread saw the copy finished.
    CopySeen,
    /// A send copied in parts: the progress thread saw the first part landed.
    FirstPartSeen,
    /// Handed to the inner comm (a receive: the inner irecv was posted).
    Handed,
    /// The inner comm reported the request done.
    InnerDone,
    /// Reported done to the engine.
    Reported,
}

const MARKS: usize = 7;
const NAMES: [&str; MARKS] =
    ["posted", "copy-issued", "copy-seen", "first-part-seen", "handed", "inner-done", "reported"];
/// The order a send's stages happen in, a send's copied in parts, and a receive's.
const SEND_ORDER: &[Mark] =
    &[Mark::Posted, Mark::CopyIssued, Mark::CopySeen, Mark::Handed, Mark::InnerDone, Mark::Reported];
const SEND_PARTS_ORDER: &[Mark] = &[
    Mark::Posted,
    Mark::CopyIssued,
    Mark::FirstPartSeen,
    Mark::Handed,
    Mark::CopySeen,
    Mark::InnerDone,
    Mark::Reported,
];
/// A receive copied out in parts: its first part's copy is queued before the inner receive ends.
const RECV_PARTS_ORDER: &[Mark] =
    &[Mark::Posted, Mark::Handed, Mark::CopyIssued, Mark::InnerDone, Mark::CopySeen, Mark::Reported];
const RECV_ORDER: &[Mark] =
    &[Mark::Posted, Mark::Handed, Mark::InnerDone, Mark::CopyIssued, Mark::CopySeen, Mark::Reported];
/// Bursts whose durations a group keeps; later ones only count.
const MAX_DURATIONS: usize = 100_000;
const MAX_GROUPS: usize = 256;
const MAX_MEDIAN_BURSTS: usize = 256;
/// Gap histogram bounds between a comm's consecutive `test` calls, in microseconds.
const GAP_BOUNDS_US: [u64; 4] = [5, 20, 100, 1000];

#[derive(Clone, Debug, Default)]
pub(super) struct ChunkTrace {
    t: [u64; MARKS],
    len: usize,
    staged: bool,
    /// Time spent queueing the copy (the CUDA calls), in ns.
    issue_ns: u64,
    /// Copies the chunk's bytes took into (or out of) its slot: parts, or 1 for a whole copy.
    parts: u32,
}

impl ChunkTrace {
    pub(super) fn mark(&mut self, mark: Mark) {
        self.t[mark as usize] = clock_ns();
    }

    pub(super) fn set_staged(&mut self) {
        self.staged = true;
    }

    pub(super) fn add_issue(&mut self, since: u64) {
        self.issue_ns += clock_ns().saturating_sub(since);
    }

    /// The chunk's copy was queued as `parts` copies.
    pub(super) fn add_parts(&mut self, parts: usize) {
        self.parts = self.parts.saturating_add(parts.min(u32::MAX as usize) as u32);
    }
}

/// How the progress thread visited one comm during a burst.
#[derive(Clone, Copy, Debug, Default)]
struct CallStats {
    tests: u64,
    max_gap_ns: u64,
    gaps: [u64; GAP_BOUNDS_US.len() + 1],
    busy_ns: u64,
    max_call_ns: u64,
}

/// A staged comm's tracer; exists only while tracing is on.
pub(super) struct CommTracer {
    id: u32,
    send: bool,
    burst: u64,
    last_test: u64,
    stats: CallStats,
}

static NEXT_COMM: AtomicU32 = AtomicU32::new(0);
static BURST: AtomicU64 = AtomicU64::new(0);
static COLLECTOR: Mutex<Collector> = Mutex::new(Collector::new());

impl CommTracer {
    pub(super) fn new(send: bool) -> CommTracer {
        report_at_exit(report);
        CommTracer {
            id: NEXT_COMM.fetch_add(1, Ordering::Relaxed),
            send,
            burst: u64::MAX,
            last_test: 0,
            stats: CallStats::default(),
        }
    }

    /// A new chunk of `len` bytes, posted now.
    pub(super) fn posted(&mut self, len: usize) -> ChunkTrace {
        let mut chunk = ChunkTrace { len, ..ChunkTrace::default() };
        chunk.mark(Mark::Posted);
        COLLECTOR.lock().begin_chunk(chunk.t[Mark::Posted as usize]);
        self.sync_burst();
        chunk
    }

    fn sync_burst(&mut self) {
        let burst = BURST.load(Ordering::Relaxed);
        if burst != self.burst {
            self.burst = burst;
            self.stats = CallStats::default();
            self.last_test = 0;
        }
    }

    /// Start of a call from the engine; `test` calls measure the gaps between progress passes.
    pub(super) fn enter(&mut self, test: bool) -> u64 {
        let now = clock_ns();
        self.sync_burst();
        if test {
            if self.last_test != 0 {
                let gap = now - self.last_test;
                self.stats.max_gap_ns = self.stats.max_gap_ns.max(gap);
                let bucket = GAP_BOUNDS_US.iter().position(|&b| gap < b * 1000).unwrap_or(GAP_BOUNDS_US.len());
                self.stats.gaps[bucket] += 1;
            }
            self.last_test = now;
            self.stats.tests += 1;
        }
        now
    }

    pub(super) fn exit(&mut self, entered: u64) {
        let took = clock_ns().saturating_sub(entered);
        self.stats.busy_ns += took;
        self.stats.max_call_ns = self.stats.max_call_ns.max(took);
    }

    pub(super) fn reported(&mut self, mut chunk: ChunkTrace) {
        chunk.mark(Mark::Reported);
        COLLECTOR.lock().end_chunk(self.id, self.send, chunk, self.stats);
    }
}

#[derive(Default)]
struct CommBurst {
    send: bool,
    chunks: Vec<ChunkTrace>,
    stats: CallStats,
}

struct Burst {
    t0: u64,
    end: u64,
    comms: BTreeMap<u32, CommBurst>,
}

impl Burst {
    /// Bytes, send chunks, receive chunks, staged chunks: bursts of one shape form a group.
    fn shape(&self) -> (usize, usize, usize, usize) {
        let mut shape = (0, 0, 0, 0);
        for comm in self.comms.values() {
            for c in &comm.chunks {
                shape.0 += c.len;
                if comm.send {
                    shape.1 += 1;
                } else {
                    shape.2 += 1;
                }
                shape.3 += c.staged as usize;
            }
        }
        shape
    }
}

struct Group {
    shape: (usize, usize, usize, usize),
    bursts: u64,
    durations: Vec<u64>,
    /// The burst shown: the one nearest the median duration.
    last: Burst,
}

struct Collector {
    in_flight: usize,
    open: Option<Burst>,
    groups: Vec<Group>,
    dropped_groups: u64,
}

impl Collector {
    const fn new() -> Collector {
        Collector { in_flight: 0, open: None, groups: Vec::new(), dropped_groups: 0 }
    }

    fn begin_chunk(&mut self, at: u64) {
        if self.in_flight == 0 && self.open.is_none() {
            self.open = Some(Burst { t0: at, end: at, comms: BTreeMap::new() });
            BURST.fetch_add(1, Ordering::Relaxed);
        }
        self.in_flight += 1;
    }

    fn end_chunk(&mut self, comm: u32, send: bool, chunk: ChunkTrace, stats: CallStats) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(burst) = &mut self.open else { return };
        burst.end = burst.end.max(chunk.t[Mark::Reported as usize]);
        let entry = burst.comms.entry(comm).or_default();
        entry.send = send;
        entry.stats = stats;
        entry.chunks.push(chunk);
        if self.in_flight == 0 {
            let burst = self.open.take().expect("open burst");
            self.close(burst);
        }
    }

    fn close(&mut self, burst: Burst) {
        let shape = burst.shape();
        let duration = burst.end - burst.t0;
        let full = self.groups.len() >= MAX_GROUPS;
        match self.groups.last_mut() {
            Some(group) if group.shape == shape => {
                group.bursts += 1;
                if group.durations.len() < MAX_DURATIONS {
                    group.durations.push(duration);
                }
                // Keep the burst nearest the median so far (a first, cold one is no example); past
                // a few hundred bursts finding the median costs more than it tells.
                let keep = if group.durations.len() <= MAX_MEDIAN_BURSTS {
                    let mut d = group.durations.clone();
                    let mid = d.len() / 2;
                    let median = *d.select_nth_unstable(mid).1;
                    duration.abs_diff(median) <= (group.last.end - group.last.t0).abs_diff(median)
                } else {
                    true
                };
                if keep {
                    group.last = burst;
                }
            }
            _ if full => self.dropped_groups += 1,
            _ => self.groups.push(Group { shape, bursts: 1, durations: vec![duration], last: burst }),
        }
    }

    fn report(&self) -> String {
        let pid = std::process::id();
        let mut out = String::new();
        for (i, group) in self.groups.iter().enumerate() {
            let Some(d) = Spread::of(group.durations.iter().copied()) else { continue };
            let (bytes, sends, recvs, staged) = group.shape;
            let _ = writeln!(
                out,
                "staging-trace[{pid}] group {i}: {} bursts of {bytes} B ({sends} send + {recvs} recv chunks, \
                 {staged} staged); us p50 (min-max) {d}",
                group.bursts,
            );
            render_burst(&mut out, pid, &group.last);
        }
        if let Some(open) = &self.open {
            let _ = writeln!(out, "staging-trace[{pid}] unfinished burst ({} chunks in flight):", self.in_flight);
            render_burst(&mut out, pid, open);
        }
        if self.dropped_groups > 0 {
            let _ = writeln!(out, "staging-trace[{pid}] {} later groups not kept", self.dropped_groups);
        }
        out
    }
}

fn render_burst(out: &mut String, pid: u32, burst: &Burst) {
    let rel = |t: u64| (t.saturating_sub(burst.t0)) as f64 / 1000.0;
    let (mut busy, mut issue, mut calls) = (0u64, 0u64, 0u64);
    for comm in burst.comms.values() {
        busy += comm.stats.busy_ns;
        calls += comm.stats.tests;
        issue += comm.chunks.iter().map(|c| c.issue_ns).sum::<u64>();
    }
    let _ = writeln!(
        out,
        "staging-trace[{pid}]   typical: t0 {:.1} us, {:.1} us long; inside staged calls {:.1} us ({calls} tests), \
         issuing copies {:.1} us",
        burst.t0 as f64 / 1000.0,
        rel(burst.end),
        busy as f64 / 1000.0,
        issue as f64 / 1000.0,
    );
    for (id, comm) in &burst.comms {
        let in_parts = match comm.send {
            true => comm.chunks.iter().any(|c| c.t[Mark::FirstPartSeen as usize] != 0),
            false => comm.chunks.iter().any(|c| c.parts > 1),
        };
        let order = match (comm.send, in_parts) {
            (true, true) => SEND_PARTS_ORDER,
            (true, false) => SEND_ORDER,
            (false, true) => RECV_PARTS_ORDER,
            (false, false) => RECV_ORDER,
        };
        let mut line = format!(
            "staging-trace[{pid}]   comm {id} {} {} x {} KiB:",
            if comm.send { "send" } else { "recv" },
            comm.chunks.len(),
            comm.chunks.first().map_or(0, |c| c.len >> 10)
        );
        for &mark in order {
            let times: Vec<u64> = comm.chunks.iter().map(|c| c.t[mark as usize]).filter(|&t| t != 0).collect();
            if let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) {
                let _ = write!(line, " {} {:.0}-{:.0}", NAMES[mark as usize], rel(*first), rel(*last));
            }
        }
        line.push_str(" | mean step us:");
        for pair in order.windows(2) {
            let steps: Vec<u64> = comm
                .chunks
                .iter()
                .filter(|c| c.t[pair[0] as usize] != 0 && c.t[pair[1] as usize] != 0)
                .map(|c| c.t[pair[1] as usize].saturating_sub(c.t[pair[0] as usize]))
                .collect();
            if !steps.is_empty() {
                let mean = steps.iter().sum::<u64>() as f64 / steps.len() as f64 / 1000.0;
                let _ = write!(line, " {}>{} {mean:.1}", short(pair[0]), short(pair[1]));
            }
        }
        let issue: Vec<u64> = comm.chunks.iter().filter(|c| c.staged).map(|c| c.issue_ns).collect();
        if !issue.is_empty() {
            let _ = write!(
                line,
                " | issue mean {:.1} max {:.1} us",
                issue.iter().sum::<u64>() as f64 / issue.len() as f64 / 1000.0,
                *issue.iter().max().unwrap_or(&0) as f64 / 1000.0
            );
        }
        let parts: Vec<u32> = comm.chunks.iter().filter(|c| c.parts > 1).map(|c| c.parts).collect();
        if !parts.is_empty() {
            let mean = parts.iter().map(|&p| p as f64).sum::<f64>() / parts.len() as f64;
            let _ = write!(line, " | {} chunks copied in parts, {mean:.1} parts each", parts.len());
        }
        let s = &comm.stats;
        let _ = write!(
            line,
            " | {} tests, gap max {:.1} us, gaps <5/<20/<100/<1000/more us {:?}, busy {:.1} us, longest call {:.1} us",
            s.tests,
            s.max_gap_ns as f64 / 1000.0,
            s.gaps,
            s.busy_ns as f64 / 1000.0,
            s.max_call_ns as f64 / 1000.0
        );
        let _ = writeln!(out, "{line}");
    }
}

fn short(mark: Mark) -> &'static str {
    match mark {
        Mark::Posted => "post",
        Mark::CopyIssued => "issue",
        Mark::CopySeen => "seen",
        Mark::FirstPartSeen => "first",
        Mark::Handed => "hand",
        Mark::InnerDone => "inner",
        Mark::Reported => "done",
    }
}

/// The report printed at exit.
fn report() -> String {
    // The progress thread may still hold the lock at exit; a report is not worth a hang.
    COLLECTOR.try_lock_for(Duration::from_millis(200)).map(|c| c.report()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_group_by_shape_and_report_every_stage() {
        let mut c = Collector::new();
        for round in 0..3u64 {
            let base = 1_000_000 * (round + 1);
            c.begin_chunk(base);
            c.begin_chunk(base + 10);
            for (comm, send) in [(7, true), (8, false)] {
                let mut chunk = ChunkTrace { len: 4096, staged: true, issue_ns: 3000, ..ChunkTrace::default() };
                for (i, mark) in SEND_ORDER.iter().enumerate() {
                    chunk.t[*mark as usize] = base + 1000 * i as u64 + 1;
                }
                c.end_chunk(comm, send, chunk, CallStats { tests: 5, ..CallStats::default() });
            }
        }
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.groups[0].bursts, 3);
        assert_eq!(c.groups[0].shape, (8192, 1, 1, 2));
        assert!(c.open.is_none());
        let report = c.report();
        assert!(report.contains("3 bursts of 8192 B (1 send + 1 recv chunks, 2 staged)"), "{report}");
        assert!(report.contains("comm 7 send 1 x 4 KiB: posted 0-0 copy-issued 1-1"), "{report}");
        assert!(report.contains("issue mean 3.0"), "{report}");
        // A burst of another shape starts a new group; one left open is reported as such.
        c.begin_chunk(9_000_000);
        c.begin_chunk(9_000_001);
        c.end_chunk(
            1,
            true,
            ChunkTrace { len: 1, t: [9_000_002; MARKS], ..ChunkTrace::default() },
            CallStats::default(),
        );
        assert_eq!(c.groups.len(), 1);
        assert!(c.report().contains("unfinished burst (1 chunks in flight)"));
    }

    #[test]
    fn a_chunk_copied_in_parts_reports_its_first_part_and_its_parts() {
        let mut c = Collector::new();
        c.begin_chunk(1_000);
        let mut chunk = ChunkTrace { len: 1 << 20, staged: true, parts: 8, ..ChunkTrace::default() };
        for (i, mark) in SEND_PARTS_ORDER.iter().enumerate() {
            chunk.t[*mark as usize] = 1_000 + 1000 * i as u64;
        }
        c.end_chunk(3, true, chunk, CallStats::default());
        let report = c.report();
        assert!(
            report.contains("copy-issued 1-1 first-part-seen 2-2 handed 3-3 copy-seen 4-4 inner-done 5-5"),
            "stages in the order they happen: {report}"
        );
        assert!(report.contains("issue>first 1.0 first>hand 1.0 hand>seen 1.0 seen>inner 1.0"), "{report}");
        assert!(report.contains("1 chunks copied in parts, 8.0 parts each"), "{report}");

        c.begin_chunk(5_000);
        let mut chunk = ChunkTrace { len: 1 << 20, staged: true, parts: 3, ..ChunkTrace::default() };
        for (i, mark) in RECV_PARTS_ORDER.iter().enumerate() {
            chunk.t[*mark as usize] = 5_000 + 1000 * i as u64;
        }
        c.end_chunk(4, false, chunk, CallStats::default());
        let report = c.report();
        assert!(
            report.contains("handed 1-1 copy-issued 2-2 inner-done 3-3 copy-seen 4-4"),
            "a receive's first copy before its inner receive ends: {report}"
        );
        assert!(report.contains("1 chunks copied in parts, 3.0 parts each"), "{report}");
    }
}
