//! Opt-in timeline of the same-host host-memory path (`UCCL_TCPX_TRACE_HOST_COPY=1`), to find where
//! a copy's time goes: per job the caller's post (when this process posted it), the job queued for
//! the worker (the request or grant handled), the worker picking it up, the offer to the copy
//! helpers, the first and last helper joining, every piece's copy time and bytes and the thread
//! that took it, the last piece done, the worker done (the reply handed to the control stream) and
//! the outcome handed to the caller. The copying process reports the jobs it ran (a write's target,
//! a read's initiator); a write's initiator reports its post and outcome. At exit each process
//! prints, per role and size, the median, min and max of every step, what the pieces and threads
//! did, and the marks of the job nearest the median (`=2`: of every job kept), in CLOCK_MONOTONIC
//! microseconds so that the two ends of a run line up.
//!
//! Off, connections hold no tracer, jobs no marks, and each pays one branch per step.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::ThreadId;
use std::time::Duration;

use parking_lot::Mutex;

use crate::trace::clock_ns;
use crate::trace::{Spread, report_at_exit};

/// Which end of a transfer a record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// The peer's write, copied in here.
    CopiedWrite,
    /// Our read, copied here: post to outcome in one process.
    CopiedRead,
    /// Our write, copied in by the peer: only post and outcome are seen here.
    PostedWrite,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::CopiedWrite => "write copied here",
            Role::CopiedRead => "read copied here",
            Role::PostedWrite => "write posted here",
        }
    }
}

/// One piece copied: when it began and ended, its bytes, and the thread that copied it.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: u64,
    end: u64,
    bytes: u64,
    thread: ThreadId,
}

/// What a job's copying threads mark while it runs (`host_job.rs`).
#[derive(Debug, Default)]
pub(super) struct JobMarks {
    offered: AtomicU64,
    /// When each helper first took part, in the order they came.
    joins: Mutex<Vec<u64>>,
    pieces: Mutex<Vec<Piece>>,
}

impl JobMarks {
    /// The job was offered to the helpers just now.
    pub(super) fn offered(&self) {
        self.offered.store(clock_ns(), Ordering::Relaxed);
    }

    /// A helper came to take pieces of the job just now.
    pub(super) fn joined(&self) {
        self.joins.lock().push(clock_ns());
    }

    /// A piece of `bytes` that began at `start` ended just now on this thread.
    pub(super) fn piece(&self, start: u64, bytes: u64) {
        let piece = Piece { start, end: clock_ns(), bytes, thread: std::thread::current().id() };
        self.pieces.lock().push(piece);
    }
}

/// A job's or a posted write's marks, in CLOCK_MONOTONIC ns (0: not seen in this process).
#[derive(Clone, Debug)]
struct Record {
    role: Role,
    bytes: u64,
    posted: u64,
    queued: u64,
    picked: u64,
    offered: u64,
    first_join: u64,
    last_join: u64,
    last_piece: u64,
    finished: u64,
    reported: u64,
    /// Run by a waiting caller rather than the worker.
    by_caller: bool,
    /// Helpers that joined, and threads that took pieces (the worker's included).
    joined: u32,
    threads: u32,
    /// (duration, bytes) of each piece.
    pieces: Vec<(u64, u64)>,
}

impl Record {
    fn posted_only(role: Role, bytes: u64, posted: u64) -> Record {
        Record {
            role,
            bytes,
            posted,
            queued: 0,
            picked: 0,
            offered: 0,
            first_join: 0,
            last_join: 0,
            last_piece: 0,
            finished: 0,
            reported: 0,
            by_caller: false,
            joined: 0,
            threads: 0,
            pieces: Vec::new(),
        }
    }

    fn mark(&self, m: Mark) -> u64 {
        match m {
            Mark::Posted => self.posted,
            Mark::Queued => self.queued,
            Mark::Picked => self.picked,
            Mark::Offered => self.offered,
            Mark::FirstJoin => self.first_join,
            Mark::LastJoin => self.last_join,
            Mark::LastPiece => self.last_piece,
            Mark::Finished => self.finished,
            Mark::Reported => self.reported,
        }
    }

    /// From the earliest mark seen here to the latest.
    fn total(&self) -> u64 {
        let first = [self.posted, self.queued].into_iter().find(|&t| t != 0).unwrap_or(0);
        let last = [self.reported, self.finished].into_iter().find(|&t| t != 0).unwrap_or(0);
        last.saturating_sub(first)
    }
}

#[derive(Clone, Copy, Debug)]
enum Mark {
    Posted,
    Queued,
    Picked,
    Offered,
    FirstJoin,
    LastJoin,
    LastPiece,
    Finished,
    Reported,
}

const MARKS: [(Mark, &str); 9] = [
    (Mark::Posted, "posted"),
    (Mark::Queued, "queued"),
    (Mark::Picked, "picked"),
    (Mark::Offered, "offered"),
    (Mark::FirstJoin, "first-join"),
    (Mark::LastJoin, "last-join"),
    (Mark::LastPiece, "last-piece"),
    (Mark::Finished, "finished"),
    (Mark::Reported, "reported"),
];

/// The steps summarized, each counted only over the records that saw both of its marks.
const STEPS: [(&str, Mark, Mark); 8] = [
    ("post>queued", Mark::Posted, Mark::Queued),
    ("queued>picked", Mark::Queued, Mark::Picked),
    ("picked>offered", Mark::Picked, Mark::Offered),
    ("offered>first-join", Mark::Offered, Mark::FirstJoin),
    ("offered>last-join", Mark::Offered, Mark::LastJoin),
    ("picked>last-piece", Mark::Picked, Mark::LastPiece),
    ("last-piece>finished", Mark::LastPiece, Mark::Finished),
    ("finished>reported", Mark::Finished, Mark::Reported),
];

/// Posts and copies a connection keeps until their outcome is reported (a caller that never
/// collects one leaves them); later ones go untraced.
const MAX_PENDING: usize = 4096;
/// Records a group keeps for the report; later ones only count.
const MAX_KEPT: usize = 100_000;

/// A connection's tracer; exists only while tracing is on.
pub(super) struct HostTracer {
    /// Our direct requests by transfer: write or read, bytes, when posted.
    posted: Mutex<HashMap<u64, (bool, u64, u64)>>,
    /// Our reads, copied, until their outcome is reported.
    copied: Mutex<HashMap<u64, Record>>,
}

static COLLECTOR: Mutex<Collector> = Mutex::new(Collector::new());

impl HostTracer {
    /// `every`: the report lists every job kept, not only the typical one.
    pub(super) fn new(every: bool) -> HostTracer {
        report_at_exit(report);
        if every {
            COLLECTOR.lock().every = true;
        }
        HostTracer { posted: Mutex::new(HashMap::new()), copied: Mutex::new(HashMap::new()) }
    }

    /// `transfer` asked for the direct path (`bytes`, a write or a read), posted at `at`.
    pub(super) fn posted(&self, transfer: u64, write: bool, bytes: u64, at: u64) {
        let mut posted = self.posted.lock();
        if posted.len() < MAX_PENDING {
            posted.insert(transfer, (write, bytes, at));
        }
    }

    /// A job of `bytes` ran: our read `transfer`, or the peer's write (`None`), queued, picked up
    /// and finished at those times, its copying threads having left `marks`.
    pub(super) fn copied(&self, transfer: Option<u64>, bytes: u64, times: JobTimes, marks: &JobMarks) {
        let pieces = marks.pieces.lock().clone();
        let joins = marks.joins.lock().clone();
        let mut threads: Vec<ThreadId> = pieces.iter().map(|p| p.thread).collect();
        threads.sort_unstable_by_key(|t| format!("{t:?}"));
        threads.dedup();
        let role = if transfer.is_some() { Role::CopiedRead } else { Role::CopiedWrite };
        let posted = transfer.and_then(|t| self.posted.lock().remove(&t)).map_or(0, |(_, _, at)| at);
        let record = Record {
            queued: times.queued,
            picked: times.picked,
            offered: marks.offered.load(Ordering::Relaxed),
            first_join: joins.iter().copied().min().unwrap_or(0),
            last_join: joins.iter().copied().max().unwrap_or(0),
            last_piece: pieces.iter().map(|p| p.end).max().unwrap_or(0),
            finished: times.finished,
            by_caller: times.by_caller,
            joined: joins.len() as u32,
            threads: threads.len() as u32,
            pieces: pieces.iter().map(|p| (p.end.saturating_sub(p.start), p.bytes)).collect(),
            ..Record::posted_only(role, bytes, posted)
        };
        match transfer {
            None => COLLECTOR.lock().add(record),
            Some(t) => {
                let mut copied = self.copied.lock();
                if copied.len() < MAX_PENDING {
                    copied.insert(t, record);
                }
            }
        }
    }

    /// The caller was handed `transfer`'s outcome.
    pub(super) fn reported(&self, transfer: u64) {
        if let Some(r) = self.take_reported(transfer) {
            COLLECTOR.lock().add(r);
        }
    }

    /// `transfer`'s record, complete now that its outcome was handed to the caller; `None` when
    /// it is not traced here (a read that went the network way after all included).
    fn take_reported(&self, transfer: u64) -> Option<Record> {
        let now = clock_ns();
        let record = match self.copied.lock().remove(&transfer) {
            Some(r) => Some(r),
            None => self
                .posted
                .lock()
                .remove(&transfer)
                .and_then(|(write, bytes, at)| write.then(|| Record::posted_only(Role::PostedWrite, bytes, at))),
        };
        record.map(|r| Record { reported: now, ..r })
    }
}

/// When a job was queued, picked up by the thread that ran it, and finished, in CLOCK_MONOTONIC ns.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct JobTimes {
    pub queued: u64,
    pub picked: u64,
    pub finished: u64,
    /// Run by a caller waiting on the connection, not by its worker.
    pub by_caller: bool,
}

struct Group {
    count: u64,
    kept: Vec<Record>,
}

struct Collector {
    groups: BTreeMap<(Role, u64), Group>,
    every: bool,
}

impl Collector {
    const fn new() -> Collector {
        Collector { groups: BTreeMap::new(), every: false }
    }

    fn add(&mut self, r: Record) {
        let group = self.groups.entry((r.role, r.bytes)).or_insert_with(|| Group { count: 0, kept: Vec::new() });
        group.count += 1;
        if group.kept.len() < MAX_KEPT {
            group.kept.push(r);
        }
    }

    fn report(&self) -> String {
        let pid = std::process::id();
        let mut out = String::new();
        for (&(role, bytes), g) in &self.groups {
            let mut line =
                format!("host-copy-trace[{pid}] {} {bytes} B: {} jobs; us p50 (min-max):", role.name(), g.count);
            for (name, from, to) in STEPS {
                let steps = g.kept.iter().filter(|r| r.mark(from) != 0 && r.mark(to) != 0);
                if let Some(spread) = Spread::of(steps.map(|r| r.mark(to).saturating_sub(r.mark(from)))) {
                    let _ = write!(line, " {name} {spread}");
                }
            }
            if let Some(total) = Spread::of(g.kept.iter().map(Record::total)) {
                let _ = write!(line, " total {total}");
            }
            let _ = writeln!(out, "{line}");
            if role != Role::PostedWrite {
                let _ = writeln!(out, "host-copy-trace[{pid}]   {}", pieces_line(&g.kept));
            }
            let mut by_total: Vec<&Record> = g.kept.iter().collect();
            by_total.sort_unstable_by_key(|r| r.total());
            if let Some(typical) = by_total.get(by_total.len() / 2) {
                let _ = writeln!(out, "host-copy-trace[{pid}]   typical: {}", render(typical));
            }
            if self.every {
                for r in &g.kept {
                    let _ = writeln!(out, "host-copy-trace[{pid}]   {}", render(r));
                }
            }
        }
        out
    }
}

/// What the pieces of a group's jobs did: how many and how large, each one's copy time, how many
/// threads took them, the GB/s of one thread while it copies, and how much of the jobs' copying
/// span (pick-up to last piece, times the threads that took part) went into copying.
fn pieces_line(kept: &[Record]) -> String {
    let count = |v: &dyn Fn(&Record) -> u64| {
        Spread::of(kept.iter().map(v)).map_or("-".into(), |s| format!("{} ({}-{})", s.median, s.min, s.max))
    };
    let callers = kept.iter().filter(|r| r.by_caller).count();
    let mut line = format!(
        "run by caller {callers} worker {}; pieces per job {}, helpers joined {}, threads took pieces {}",
        kept.len() - callers,
        count(&|r| r.pieces.len() as u64),
        count(&|r| u64::from(r.joined)),
        count(&|r| u64::from(r.threads))
    );
    if let Some(size) = Spread::of(kept.iter().flat_map(|r| r.pieces.iter().map(|p| p.1))) {
        let _ = write!(line, ", piece KiB {} ({}-{})", size.median >> 10, size.min >> 10, size.max >> 10);
    }
    if let Some(time) = Spread::of(kept.iter().flat_map(|r| r.pieces.iter().map(|p| p.0))) {
        let _ = write!(line, ", piece us {time}");
    }
    let (ns, bytes): (u64, u64) = kept.iter().flat_map(|r| &r.pieces).fold((0, 0), |(n, b), p| (n + p.0, b + p.1));
    if ns > 0 {
        let _ = write!(line, ", {:.2} GB/s per thread copying", bytes as f64 / ns as f64);
    }
    let span: u64 = kept
        .iter()
        .filter(|r| r.picked != 0 && r.last_piece != 0)
        .map(|r| r.last_piece.saturating_sub(r.picked) * u64::from(r.threads))
        .sum();
    if span > 0 {
        let _ = write!(line, ", {:.0} % of the threads' span copying", 100.0 * ns as f64 / span as f64);
    }
    line
}

/// One record's marks: its first in CLOCK_MONOTONIC us, the others relative to it.
fn render(r: &Record) -> String {
    let Some(first) = MARKS.iter().map(|(m, _)| r.mark(*m)).find(|&t| t != 0) else { return "no marks".into() };
    let mut line = format!("at {:.1} us:", first as f64 / 1000.0);
    for (m, name) in MARKS {
        let t = r.mark(m);
        if t != 0 {
            let _ = write!(line, " {name} +{:.1}", t.saturating_sub(first) as f64 / 1000.0);
        }
    }
    if !r.pieces.is_empty() {
        let _ = write!(line, "; {} pieces on {} threads", r.pieces.len(), r.threads);
    }
    line
}

/// The report printed at exit.
fn report() -> String {
    // A connection may still hold the lock at exit; a report is not worth a hang.
    COLLECTOR.try_lock_for(Duration::from_millis(200)).map(|c| c.report()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer() -> HostTracer {
        HostTracer { posted: Mutex::new(HashMap::new()), copied: Mutex::new(HashMap::new()) }
    }

    #[test]
    fn a_read_is_timed_from_post_through_its_pieces_to_its_report() {
        let t = tracer();
        let posted = clock_ns();
        t.posted(5, false, 3 << 20, posted);
        let marks = JobMarks::default();
        let queued = clock_ns();
        let picked = clock_ns();
        marks.offered();
        let helper = std::thread::scope(|s| {
            s.spawn(|| {
                marks.joined();
                let start = clock_ns();
                marks.piece(start, 1 << 20);
                std::thread::current().id()
            })
            .join()
            .unwrap()
        });
        let start = clock_ns();
        std::thread::sleep(Duration::from_millis(1));
        marks.piece(start, 2 << 20);
        t.copied(Some(5), 3 << 20, JobTimes { queued, picked, finished: clock_ns(), by_caller: true }, &marks);
        assert!(t.posted.lock().is_empty(), "the post joined the job's record");
        let r = t.copied.lock()[&5].clone();
        assert_eq!((r.role, r.posted, r.queued, r.picked), (Role::CopiedRead, posted, queued, picked));
        assert!(r.by_caller);
        assert_eq!((r.joined, r.threads), (1, 2), "one helper joined; it and this thread took pieces");
        assert_ne!(helper, std::thread::current().id());
        assert_eq!(r.pieces.iter().map(|p| p.1).sum::<u64>(), 3 << 20);
        assert!(r.pieces.iter().any(|p| p.0 >= 1_000_000), "the slept piece lasted 1 ms or more");
        assert!(r.offered >= picked && r.first_join >= r.offered && r.last_piece >= start + 1_000_000);
        assert!(r.finished >= r.last_piece);
        let done = t.take_reported(5).expect("the read is recorded");
        assert!(done.reported >= r.finished && done.total() == done.reported - posted);
        assert!(t.take_reported(5).is_none(), "once");
    }

    fn record(role: Role, base: u64, total: u64) -> Record {
        Record {
            queued: base + 1_000,
            picked: base + 3_000,
            offered: base + 4_000,
            first_join: base + 6_000,
            last_join: base + 9_000,
            last_piece: base + total - 2_000,
            finished: base + total - 1_000,
            reported: if role == Role::CopiedRead { base + total } else { 0 },
            by_caller: role == Role::CopiedRead,
            joined: 2,
            threads: 3,
            pieces: vec![(10_000, 256 << 10), (20_000, 256 << 10), (30_000, 512 << 10)],
            ..Record::posted_only(role, 1 << 20, if role == Role::CopiedRead { base } else { 0 })
        }
    }

    #[test]
    fn the_report_summarizes_every_step_per_role_and_size() {
        let mut c = Collector::new();
        for total in [50_000, 70_000, 60_000] {
            c.add(record(Role::CopiedRead, 1_000_000, total));
        }
        c.add(record(Role::CopiedWrite, 2_000_000, 40_000));
        c.add(Record { reported: 3_020_000, ..Record::posted_only(Role::PostedWrite, 1 << 20, 3_000_000) });
        let report = c.report();
        assert!(report.contains("write copied here 1048576 B: 1 jobs"), "{report}");
        assert!(report.contains("read copied here 1048576 B: 3 jobs; us p50 (min-max): post>queued 1.0 (1.0-1.0)"));
        assert!(report.contains("offered>first-join 2.0 (2.0-2.0) offered>last-join 5.0 (5.0-5.0)"), "{report}");
        assert!(report.contains("finished>reported 1.0 (1.0-1.0) total 60.0 (50.0-70.0)"), "{report}");
        assert!(!report.contains("write copied here 1048576 B: 1 jobs; us p50 (min-max): post>queued"), "{report}");
        assert!(report.contains("write posted here 1048576 B: 1 jobs; us p50 (min-max): total 20.0 (20.0-20.0)"));
        assert!(report.contains("run by caller 3 worker 0; pieces per job 3 (3-3), helpers joined 2 (2-2)"));
        assert!(report.contains("run by caller 0 worker 1; pieces per job 3 (3-3)"), "{report}");
        assert!(report.contains("threads took pieces 3 (3-3)"), "{report}");
        assert!(report.contains("piece KiB 256 (256-512), piece us 20.0 (10.0-30.0), 17.48 GB/s per thread"));
        assert!(report.contains("typical: at 1000.0 us: posted +0.0 queued +1.0"), "{report}");
        assert!(report.contains("reported +60.0; 3 pieces on 3 threads"), "{report}");
        // Three groups: a summary and a typical line each, and a pieces line for the copies.
        assert_eq!(report.lines().count(), 8, "{report}");
        c.every = true;
        assert_eq!(c.report().lines().count(), 13);
    }

    #[test]
    fn reads_that_went_the_network_way_and_posts_past_the_bound_are_not_recorded() {
        let t = tracer();
        t.posted(1, false, 1 << 20, clock_ns());
        t.posted(2, true, 1 << 20, 77);
        assert!(t.take_reported(1).is_none(), "a read never copied here");
        let w = t.take_reported(2).expect("a write posted here");
        assert_eq!((w.role, w.posted, w.picked), (Role::PostedWrite, 77, 0));
        assert!(t.take_reported(3).is_none());
        for id in 0..MAX_PENDING as u64 + 10 {
            t.posted(id, true, 8, 0);
        }
        assert_eq!(t.posted.lock().len(), MAX_PENDING);
    }
}
