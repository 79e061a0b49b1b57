//! Opt-in timeline of the same-host GPU path (`UCCL_TCPX_TRACE_DEVICE_COPY=1`), to find where a
//! transfer's time goes between its post and the moment its caller learns the outcome: per
//! transfer the post, the asks it waited for, the copies queued behind their event, the event seen
//! fired (and by whom: the caller's poll, the caller's wait, the progress thread, or a failing
//! connection) and the outcome handed to the caller. At exit each process prints, per direction and
//! size, the median, min and max of every step, who saw the events, and the timestamps of the
//! transfer nearest the median (`=2`: of every transfer kept), in CLOCK_MONOTONIC microseconds so
//! that the two ends of a run line up.
//!
//! Off, connections hold no tracer and pay one branch per call.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;

use crate::trace::clock_ns;
use crate::trace::{Spread, report_at_exit};

/// Who noticed that a batch's event fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seer {
    /// The caller's own poll (`poll`, `xfer_status`).
    Poll,
    /// The caller's own wait, blocked on the event.
    Wait,
    /// The engine's progress thread.
    Progress,
    /// The connection failed and waited for its copies.
    Failure,
}

const SEERS: [Seer; 4] = [Seer::Poll, Seer::Wait, Seer::Progress, Seer::Failure];

/// What a transfer's post did before its copies were queued.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Post {
    /// When the call entered the connection, in CLOCK_MONOTONIC ns.
    pub at: u64,
    /// Asks the call waited for (once per region and token, or again for a window outside the grant).
    pub asks: u32,
    /// Time those asks took, in ns (the round trip and the mapping).
    pub ask_ns: u64,
}

/// One transfer's timeline, in CLOCK_MONOTONIC ns.
#[derive(Clone, Copy, Debug)]
struct Stamps {
    write: bool,
    bytes: u64,
    post: Post,
    /// The last batch's event was recorded.
    issued: u64,
    /// The last batch was seen finished.
    seen: u64,
    seen_by: Seer,
    /// The outcome was handed to the caller.
    reported: u64,
    batches_left: u32,
}

impl Stamps {
    /// post > issued, issued > seen, seen > reported, post > reported.
    fn steps(&self) -> [u64; 4] {
        [
            self.issued.saturating_sub(self.post.at),
            self.seen.saturating_sub(self.issued),
            self.reported.saturating_sub(self.seen),
            self.reported.saturating_sub(self.post.at),
        ]
    }
}

const STEPS: [&str; 4] = ["post>issued", "issued>seen", "seen>reported", "total"];
/// Transfers a connection keeps between issue and report (a caller that never collects its outcome
/// leaves them); later ones go untraced.
const MAX_PENDING: usize = 4096;
/// Transfers a group keeps for the report; later ones only count.
const MAX_KEPT: usize = 100_000;

/// A connection's tracer; exists only while tracing is on.
pub(super) struct CopyTracer {
    pending: Mutex<HashMap<u64, Stamps>>,
}

static COLLECTOR: Mutex<Collector> = Mutex::new(Collector::new());

impl CopyTracer {
    /// `every`: the report lists every transfer kept, not only the typical one.
    pub(super) fn new(every: bool) -> CopyTracer {
        report_at_exit(report);
        if every {
            COLLECTOR.lock().every = true;
        }
        CopyTracer { pending: Mutex::new(HashMap::new()) }
    }

    /// `batches` batches of `transfer`, `bytes` in all, were queued just now. Called under the
    /// connection lock, as `seen` is, so a batch is never seen before it was issued.
    pub(super) fn issued(&self, transfer: u64, write: bool, bytes: u64, batches: u32, post: Post) {
        if batches == 0 {
            return;
        }
        let mut pending = self.pending.lock();
        if pending.len() >= MAX_PENDING {
            return;
        }
        let now = clock_ns();
        pending.insert(
            transfer,
            Stamps {
                write,
                bytes,
                post,
                issued: now,
                seen: 0,
                seen_by: Seer::Failure,
                reported: 0,
                batches_left: batches,
            },
        );
    }

    /// A batch of `transfer` was seen finished by `by`.
    pub(super) fn seen(&self, transfer: u64, by: Seer) {
        if let Some(s) = self.pending.lock().get_mut(&transfer) {
            s.batches_left = s.batches_left.saturating_sub(1);
            if s.batches_left == 0 {
                (s.seen, s.seen_by) = (clock_ns(), by);
            }
        }
    }

    /// The caller was handed `transfer`'s outcome.
    pub(super) fn reported(&self, transfer: u64) {
        let Some(mut s) = self.pending.lock().remove(&transfer) else { return };
        s.reported = clock_ns();
        COLLECTOR.lock().add(s);
    }
}

struct Group {
    count: u64,
    seen_by: [u64; SEERS.len()],
    asks: u64,
    ask_ns: u64,
    kept: Vec<Stamps>,
}

struct Collector {
    groups: BTreeMap<(bool, u64), Group>,
    every: bool,
}

impl Collector {
    const fn new() -> Collector {
        Collector { groups: BTreeMap::new(), every: false }
    }

    fn add(&mut self, s: Stamps) {
        let group = self.groups.entry((s.write, s.bytes)).or_insert_with(|| Group {
            count: 0,
            seen_by: [0; SEERS.len()],
            asks: 0,
            ask_ns: 0,
            kept: Vec::new(),
        });
        group.count += 1;
        group.seen_by[SEERS.iter().position(|&b| b == s.seen_by).unwrap_or(0)] += 1;
        group.asks += u64::from(s.post.asks);
        group.ask_ns += s.post.ask_ns;
        if group.kept.len() < MAX_KEPT {
            group.kept.push(s);
        }
    }

    fn report(&self) -> String {
        let pid = std::process::id();
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut out = String::new();
        for (&(write, bytes), g) in &self.groups {
            let verb = if write { "write" } else { "read" };
            let mut line = format!(
                "device-copy-trace[{pid}] {verb} {bytes} B: {} transfers; seen by poll {} wait {} progress {} \
                 failure {}; {} asks ({:.1} us); us p50 (min-max):",
                g.count,
                g.seen_by[0],
                g.seen_by[1],
                g.seen_by[2],
                g.seen_by[3],
                g.asks,
                us(g.ask_ns)
            );
            for (i, name) in STEPS.iter().enumerate() {
                if let Some(spread) = Spread::of(g.kept.iter().map(|s| s.steps()[i])) {
                    let _ = write!(line, " {name} {spread}");
                }
            }
            let _ = writeln!(out, "{line}");
            let mut by_total: Vec<&Stamps> = g.kept.iter().collect();
            by_total.sort_unstable_by_key(|s| s.steps()[3]);
            let typical = by_total[by_total.len() / 2];
            let _ = writeln!(out, "device-copy-trace[{pid}]   typical: {}", render(typical));
            if self.every {
                for s in &g.kept {
                    let _ = writeln!(out, "device-copy-trace[{pid}]   {}", render(s));
                }
            }
        }
        out
    }
}

/// One transfer's timestamps: the post in CLOCK_MONOTONIC us, the rest relative to it.
fn render(s: &Stamps) -> String {
    let rel = |t: u64| t.saturating_sub(s.post.at) as f64 / 1000.0;
    format!(
        "posted {:.1} us, {} asks {:.1} us, issued +{:.1}, seen +{:.1} by {:?}, reported +{:.1}",
        s.post.at as f64 / 1000.0,
        s.post.asks,
        s.post.ask_ns as f64 / 1000.0,
        rel(s.issued),
        rel(s.seen),
        s.seen_by,
        rel(s.reported)
    )
}

/// The report printed at exit.
fn report() -> String {
    // A connection may still hold the lock at exit; a report is not worth a hang.
    COLLECTOR.try_lock_for(Duration::from_millis(200)).map(|c| c.report()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_are_timed_from_post_to_report_and_grouped_by_direction_and_size() {
        let tracer = CopyTracer { pending: Mutex::new(HashMap::new()) };
        let post = Post { at: clock_ns(), asks: 1, ask_ns: 2_000 };
        tracer.issued(7, true, 4096, 2, post);
        tracer.issued(8, true, 4096, 0, post);
        assert_eq!(tracer.pending.lock().len(), 1, "a transfer without batches is not traced");
        tracer.seen(7, Seer::Progress);
        assert_eq!(tracer.pending.lock()[&7].seen, 0, "one of two batches seen");
        std::thread::sleep(Duration::from_millis(1));
        tracer.seen(7, Seer::Wait);
        tracer.seen(99, Seer::Poll);
        let s = tracer.pending.lock()[&7];
        assert_eq!(s.seen_by, Seer::Wait, "the last batch's seer counts");
        assert!(s.seen >= s.issued + 1_000_000 && s.issued >= post.at);

        let mut c = Collector::new();
        for (i, total) in [(0u64, 30_000u64), (1, 10_000), (2, 20_000)] {
            let mut t = Stamps { reported: post.at + total, ..s };
            t.seen_by = if i == 0 { Seer::Poll } else { Seer::Wait };
            c.add(t);
        }
        c.add(Stamps { write: false, reported: post.at + 5_000, ..s });
        let report = c.report();
        assert!(
            report.contains("write 4096 B: 3 transfers; seen by poll 1 wait 2 progress 0 failure 0; 3 asks (6.0 us)")
        );
        assert!(report.contains("read 4096 B: 1 transfers"), "{report}");
        assert!(report.contains("total 20.0 (10.0-30.0)"), "{report}");
        assert!(report.contains("typical: posted"), "{report}");
        assert!(report.contains("seen +") && report.contains("by Wait, reported +20.0"), "{report}");
        assert_eq!(report.lines().count(), 4, "a summary and a typical transfer per group: {report}");
        c.every = true;
        assert_eq!(c.report().lines().count(), 8, "and every transfer kept");
    }

    #[test]
    fn a_report_without_an_issue_or_past_the_bound_is_ignored() {
        let tracer = CopyTracer { pending: Mutex::new(HashMap::new()) };
        tracer.reported(5);
        for id in 0..MAX_PENDING as u64 + 10 {
            tracer.issued(id, false, 8, 1, Post::default());
        }
        assert_eq!(tracer.pending.lock().len(), MAX_PENDING);
    }
}
