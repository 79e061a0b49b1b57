//! Opt-in timeline of one-sided transfers over the channels (`UCCL_TCPX_TRACE_FLOW=<prefix>`), to
//! find which hand-over a mid-size write or read spends its time in. Each end marks the steps it
//! sees of every write and read that takes the channels (not the inline kinds, not the same-host
//! paths) in CLOCK_MONOTONIC nanoseconds, which every process of a host shares: the initiator its
//! post, its request written (or queued), the flow's chunks queued, the first chunk handed to the
//! transport, the last chunk seen complete, the reply read (Done for a write, the Data marker for a
//! read) and the transfer seen complete by its caller; the target the request read, the chunks
//! queued, the first posted, the last complete and its reply written. A record is keyed by the
//! handshake nonce (both ends of a connection know it), the kind and the flow's number in its
//! direction (both ends number flows alike), so the two ends' files join. The process keeps the
//! last `KEPT` records and writes them at exit to `<prefix>.<pid>.tsv`, printing one line to stderr;
//! `scripts/diag/flow_timeline.py` joins the files and says which leg is large.
//!
//! Off, connections hold no tracer and each step pays one branch.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use super::state::{Action, Direction, FlowPlan};
use crate::engine::plan::{Chunking, chunk_count};
use crate::proto::Control;
use crate::trace::{Spread, clock_ns, report_at_exit};

/// Records the process keeps (the last ones finished), and transfers or records it follows at once.
const KEPT: usize = 4096;
const OPEN: usize = 4096;

/// The steps, in the order of the file's columns.
const STEPS: [&str; 9] = [
    "post",
    "request_sent",
    "request_read",
    "queued",
    "first_posted",
    "last_chunk",
    "reply_sent",
    "reply_read",
    "complete",
];

#[derive(Clone, Copy)]
enum Step {
    Post,
    RequestSent,
    RequestRead,
    Queued,
    FirstPosted,
    LastChunk,
    ReplySent,
    ReplyRead,
    Complete,
}

/// Our request (by our op id) or the peer's (by its op id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Ours(u64),
    Peers(u64),
}

#[derive(Clone, Debug)]
struct Record {
    nonce: u64,
    write: bool,
    initiator: bool,
    /// The flow's number in its direction, once its chunks were queued.
    seq: Option<u64>,
    bytes: u64,
    /// The caller's transfer (initiator only).
    transfer: u64,
    /// Our flow id, and whether it receives.
    flow: Option<(u64, bool)>,
    chunks: usize,
    done: usize,
    marks: [u64; STEPS.len()],
}

impl Record {
    fn mark(&mut self, step: Step, at: u64) {
        let m = &mut self.marks[step as usize];
        if *m == 0 {
            *m = at;
        }
    }

    fn has(&self, step: Step) -> bool {
        self.marks[step as usize] != 0
    }

    /// A target's record ends with its last step: Done after a write's chunks, a read's last
    /// chunk after its Data marker. An initiator's ends when its caller saw the transfer complete.
    fn ended(&self) -> bool {
        match (self.initiator, self.write) {
            (true, _) => self.has(Step::Complete),
            (false, true) => self.has(Step::ReplySent),
            (false, false) => self.has(Step::ReplySent) && self.chunks > 0 && self.done >= self.chunks,
        }
    }
}

/// A peer's message worth a mark, taken before the state consumes it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Seen {
    Request { xfer: u64, write: bool },
    Done(u64),
    Data(u64),
}

#[derive(Default)]
struct Book {
    /// When each traced call was entered, by transfer id.
    posts: HashMap<u64, u64>,
    open: HashMap<Key, Record>,
    flows: HashMap<u64, Key>,
    /// Receiving flows queued since the last pass, whose first receives that pass posts.
    unposted: Vec<Key>,
}

/// One connection's marks (`Connection::flow_tracer`).
pub(super) struct FlowTracer {
    nonce: u64,
    book: Mutex<Book>,
}

static PREFIX: OnceLock<String> = OnceLock::new();
static FINISHED: Mutex<VecDeque<Record>> = Mutex::new(VecDeque::new());

impl FlowTracer {
    /// `nonce`: the connection's handshake nonce, which its peer knows too.
    pub(super) fn new(prefix: &str, nonce: u64) -> FlowTracer {
        PREFIX.get_or_init(|| prefix.to_owned());
        report_at_exit(report);
        FlowTracer { nonce, book: Mutex::new(Book::default()) }
    }

    /// A caller entered a post of `transfer` at `at`.
    pub(super) fn posted(&self, transfer: u64, at: u64) {
        let mut book = self.book.lock();
        if book.posts.len() >= OPEN {
            book.posts.clear();
        }
        book.posts.insert(transfer, at);
    }

    /// The actions of a post of `transfer`: its requests, then its writes' flows in the same order.
    pub(super) fn requests(&self, transfer: u64, out: &[Action], chunking: Chunking) {
        let mut book = self.book.lock();
        let post = book.posts.get(&transfer).copied().unwrap_or(0);
        let mut writes = VecDeque::new();
        for action in out {
            match action {
                Action::Send(msg) => {
                    let (xfer, write) = match *msg {
                        Control::WriteRequest { xfer, .. } | Control::WriteVector { xfer, .. } => (xfer, true),
                        Control::ReadRequest { xfer, .. } | Control::ReadVector { xfer, .. } => (xfer, false),
                        _ => continue,
                    };
                    let mut r = self.record(true, write);
                    r.transfer = transfer;
                    r.mark(Step::Post, post);
                    book.open(Key::Ours(xfer), r);
                    if write {
                        writes.push_back(xfer);
                    }
                }
                Action::Queue(plan) if plan.dir == Direction::Send => {
                    if let Some(xfer) = writes.pop_front() {
                        book.bind(Key::Ours(xfer), plan, chunking);
                    }
                }
                _ => {}
            }
        }
    }

    /// What of the peer's `msg` is marked, if anything.
    pub(super) fn seen(msg: &Control) -> Option<Seen> {
        Some(match *msg {
            Control::WriteRequest { xfer, .. } | Control::WriteVector { xfer, .. } => {
                Seen::Request { xfer, write: true }
            }
            Control::ReadRequest { xfer, .. } | Control::ReadVector { xfer, .. } => {
                Seen::Request { xfer, write: false }
            }
            Control::Done { xfer, .. } => Seen::Done(xfer),
            Control::Data { flow, .. } => Seen::Data(flow),
            _ => return None,
        })
    }

    /// The peer's message `seen` was read at `at`; `out`: what the state answered.
    pub(super) fn heard(&self, seen: Seen, at: u64, out: &[Action], chunking: Chunking) {
        let mut book = self.book.lock();
        let queued = |dir: Direction, flow: Option<u64>| {
            out.iter().find_map(|a| match a {
                Action::Queue(plan) if plan.dir == dir && flow.is_none_or(|f| f == plan.flow) => Some(plan),
                _ => None,
            })
        };
        match seen {
            Seen::Request { xfer, write } => {
                let mut r = self.record(false, write);
                r.mark(Step::RequestRead, at);
                book.open(Key::Peers(xfer), r);
                let dir = if write { Direction::Recv } else { Direction::Send };
                if let Some(plan) = queued(dir, None) {
                    book.bind(Key::Peers(xfer), plan, chunking);
                }
            }
            Seen::Done(xfer) => {
                if let Some(r) = book.open.get_mut(&Key::Ours(xfer)) {
                    r.mark(Step::ReplyRead, at);
                }
            }
            Seen::Data(flow) => {
                let key = Key::Ours(flow);
                if let Some(r) = book.open.get_mut(&key) {
                    r.mark(Step::ReplyRead, at);
                    if let Some(plan) = queued(Direction::Recv, Some(flow)) {
                        book.bind(key, plan, chunking);
                    }
                }
            }
        }
    }

    /// `msgs` were written to the control stream (or queued for the control reactor) just now.
    pub(super) fn sent(&self, msgs: &[Control]) {
        let at = clock_ns();
        let mut book = self.book.lock();
        for msg in msgs {
            let (key, step) = match *msg {
                Control::WriteRequest { xfer, .. }
                | Control::WriteVector { xfer, .. }
                | Control::ReadRequest { xfer, .. }
                | Control::ReadVector { xfer, .. } => (Key::Ours(xfer), Step::RequestSent),
                Control::Done { xfer, .. } => (Key::Peers(xfer), Step::ReplySent),
                Control::Data { flow, .. } => (Key::Peers(flow), Step::ReplySent),
                _ => continue,
            };
            book.mark(key, step, at);
        }
    }

    /// The chunks of our flow `flow` are being queued on the channels.
    pub(super) fn queued(&self, flow: u64) {
        let at = clock_ns();
        let mut book = self.book.lock();
        if let Some(&key) = book.flows.get(&flow) {
            book.mark(key, Step::Queued, at);
            if book.open.get(&key).is_some_and(|r| matches!(r.flow, Some((_, true)))) {
                book.unposted.push(key);
            }
        }
    }

    /// A pass over the channels handed the send chunks of `sent` to the transport and posted the
    /// receives it could: the first of each flow's is marked.
    pub(super) fn passed(&self, sent: &[u64]) {
        let at = clock_ns();
        let mut book = self.book.lock();
        for flow in sent {
            if let Some(&key) = book.flows.get(flow) {
                book.mark(key, Step::FirstPosted, at);
            }
        }
        for key in std::mem::take(&mut book.unposted) {
            book.mark(key, Step::FirstPosted, at);
        }
    }

    /// A chunk of our flow `flow` completed just now.
    pub(super) fn chunk_done(&self, flow: u64) {
        let at = clock_ns();
        let mut book = self.book.lock();
        let Some(&key) = book.flows.get(&flow) else { return };
        if let Some(r) = book.open.get_mut(&key) {
            r.done += 1;
            r.marks[Step::LastChunk as usize] = at;
        }
        book.end_if_ended(key);
    }

    /// The caller saw `transfer` complete (or fail) just now.
    pub(super) fn completed(&self, transfer: u64) {
        let at = clock_ns();
        let mut book = self.book.lock();
        if book.posts.remove(&transfer).is_none() {
            return;
        }
        let keys: Vec<Key> =
            book.open.iter().filter(|(_, r)| r.initiator && r.transfer == transfer).map(|(k, _)| *k).collect();
        for key in keys {
            book.mark(key, Step::Complete, at);
        }
    }

    fn record(&self, initiator: bool, write: bool) -> Record {
        Record {
            nonce: self.nonce,
            write,
            initiator,
            seq: None,
            bytes: 0,
            transfer: 0,
            flow: None,
            chunks: 0,
            done: 0,
            marks: [0; STEPS.len()],
        }
    }
}

impl Book {
    fn open(&mut self, key: Key, r: Record) {
        if self.open.len() >= OPEN {
            // Records that never ended (a refused request, a failed connection) are let go.
            self.open.clear();
            self.flows.clear();
            self.unposted.clear();
        }
        self.open.insert(key, r);
    }

    fn bind(&mut self, key: Key, plan: &FlowPlan, chunking: Chunking) {
        let Some(r) = self.open.get_mut(&key) else { return };
        r.seq = Some(plan.seq);
        r.bytes = plan.extent.len();
        r.flow = Some((plan.flow, plan.dir == Direction::Recv));
        r.chunks = chunk_count(&plan.extent, chunking);
        self.flows.insert(plan.flow, key);
    }

    fn mark(&mut self, key: Key, step: Step, at: u64) {
        if let Some(r) = self.open.get_mut(&key) {
            r.mark(step, at);
        }
        self.end_if_ended(key);
    }

    fn end_if_ended(&mut self, key: Key) {
        if !self.open.get(&key).is_some_and(Record::ended) {
            return;
        }
        let r = self.open.remove(&key).expect("looked up above");
        if let Some((flow, _)) = r.flow {
            self.flows.remove(&flow);
        }
        let mut kept = FINISHED.lock();
        if kept.len() >= KEPT {
            kept.pop_front();
        }
        kept.push_back(r);
    }
}

/// The file's header and one line per record.
fn table(records: &VecDeque<Record>) -> String {
    let mut s = String::from("nonce\top\tend\tseq\tbytes");
    for step in STEPS {
        let _ = write!(s, "\t{step}");
    }
    s.push('\n');
    for r in records {
        let op = if r.write { "write" } else { "read" };
        let end = if r.initiator { "initiator" } else { "target" };
        let seq = r.seq.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let _ = write!(s, "{:016x}\t{op}\t{end}\t{seq}\t{}", r.nonce, r.bytes);
        for m in r.marks {
            let _ = write!(s, "\t{m}");
        }
        s.push('\n');
    }
    s
}

/// Writes the records to `<prefix>.<pid>.tsv`; returns the line printed at exit.
fn report() -> String {
    let pid = std::process::id();
    let Some(records) = FINISHED.try_lock_for(Duration::from_millis(200)) else {
        return format!("flow-trace[{pid}]: busy at exit, nothing written\n");
    };
    let Some(prefix) = PREFIX.get() else { return String::new() };
    let path = format!("{prefix}.{pid}.tsv");
    let written = match std::fs::write(&path, table(&records)) {
        Ok(()) => path,
        Err(e) => format!("nothing written to {path}: {e}"),
    };
    let mut line = format!("flow-trace[{pid}]: {} records", records.len());
    let mut sizes: Vec<(bool, u64)> = records.iter().filter(|r| r.initiator).map(|r| (r.write, r.bytes)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for (write, bytes) in sizes {
        let ends = records.iter().filter(|r| r.initiator && r.write == write && r.bytes == bytes);
        let times = ends.filter(|r| r.has(Step::Post)).map(|r| r.marks[Step::Complete as usize] - r.marks[0]);
        if let Some(spread) = Spread::of(times) {
            let op = if write { "write" } else { "read" };
            let _ = write!(line, "; {op} {bytes} B end-to-end us {spread}");
        }
    }
    let _ = writeln!(line, "; {written}");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_ends_at_its_last_step() {
        let t = FlowTracer { nonce: 7, book: Mutex::new(Book::default()) };
        let mut r = t.record(false, false);
        r.mark(Step::ReplySent, 5);
        r.chunks = 2;
        r.done = 1;
        assert!(!r.ended(), "a served read ends with its last chunk");
        r.done = 2;
        assert!(r.ended());
        let mut w = t.record(true, true);
        w.mark(Step::ReplyRead, 3);
        assert!(!w.ended(), "an initiator's record ends when its caller saw it complete");
        w.mark(Step::Complete, 4);
        w.mark(Step::Complete, 9);
        assert!(w.ended());
        assert_eq!(w.marks[Step::Complete as usize], 4, "a step keeps its first mark");
        let lines = table(&VecDeque::from([w]));
        let row = lines.lines().nth(1).unwrap();
        assert!(row.starts_with("0000000000000007\twrite\tinitiator\t-\t0\t0\t"), "{row}");
        assert_eq!(lines.lines().next().unwrap().split('\t').count(), row.split('\t').count());
    }
}
