//! Opt-in timeline of one-sided transfers over the channels (`UCCL_TCPX_TRACE_FLOW=<prefix>`), to
//! find which hand-over a mid-size write or read spends its time in. Each end marks the steps it
//! sees of every write and read that takes the channels (not the inline kinds, not the same-host
//! paths) in CLOCK_MONOTONIC nanoseconds, which every process of a host shares: the initiator its
//! post and its post call's return, its request written (or queued), the flow's chunks queued, the
//! first chunk handed to the transport, the last chunk seen complete, the reply (Done for a write,
//! the Data marker for a read) read from the stream and then handled, which waits for the
//! connection's lock (the file says which thread read it), and the transfer seen complete by its
//! caller; the target the request read, the chunks queued, the first posted, the last complete and
//! its reply written. A record is keyed by the handshake nonce (both ends of a connection know it),
//! the kind, which end of the connection initiated (its connector or its acceptor: each end numbers
//! its own flows from 0, so a write each way can share a number) and the flow's number in its
//! direction (both ends number a direction's flows alike), so the two ends' files join. Records
//! that never end (a refused request, a failed connection) and post marks of calls that never
//! complete make way for newer ones, oldest first. The process keeps the last `KEPT` records and
//! writes them at exit to `<prefix>.<pid>.tsv`, printing one line to stderr;
//! `scripts/diag/flow_timeline.py` joins the files and says which leg is large.
//!
//! Off, connections hold no tracer and each step pays one branch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::hash::Hash;
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
const STEPS: [&str; 11] = [
    "post",
    "returned",
    "request_sent",
    "request_read",
    "queued",
    "first_posted",
    "last_chunk",
    "reply_sent",
    "reply_arrived",
    "reply_read",
    "complete",
];

#[derive(Clone, Copy)]
enum Step {
    Post,
    /// The post call returned to its caller.
    Returned,
    RequestSent,
    RequestRead,
    Queued,
    FirstPosted,
    LastChunk,
    ReplySent,
    /// The read that brought the reply returned, before its handling waited for the connection.
    ReplyArrived,
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
    /// Whether the initiating end is the connection's connector (else its acceptor).
    from_connector: bool,
    /// The flow's number in its direction, once its chunks were queued.
    seq: Option<u64>,
    bytes: u64,
    /// The caller's transfer (initiator only).
    transfer: u64,
    /// Our flow id, and whether it receives.
    flow: Option<(u64, bool)>,
    chunks: usize,
    done: usize,
    /// Which thread read the reply: `c` the caller, `r` a control reactor, `p` the progress
    /// thread, `-` none yet.
    reader: char,
    marks: [u64; STEPS.len()],
}

impl Record {
    fn mark(&mut self, step: Step, at: u64) {
        let m = &mut self.marks[step as usize];
        if *m == 0 {
            *m = at;
        }
    }

    /// The reply was read from the stream at `arrived` and handled at `at`, on this thread.
    fn reply_read(&mut self, arrived: u64, at: u64) {
        self.mark(Step::ReplyArrived, arrived);
        self.mark(Step::ReplyRead, at);
        if self.reader == '-' {
            self.reader = match std::thread::current().name() {
                Some(n) if n.starts_with("uccl-progress") => 'p',
                Some(n) if n.starts_with("uccl-ctrl") => 'r',
                _ => 'c',
            };
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

/// A map that holds at most `bound` entries, letting the oldest inserted go to make room.
struct Bounded<K, V> {
    bound: usize,
    entries: HashMap<K, (u64, V)>,
    /// Keys by when they were inserted.
    order: BTreeMap<u64, K>,
    next: u64,
}

impl<K: Copy + Eq + Hash, V> Bounded<K, V> {
    fn new(bound: usize) -> Self {
        Bounded { bound, entries: HashMap::new(), order: BTreeMap::new(), next: 0 }
    }

    /// Inserts (or replaces) `key`'s entry; returns the entries let go to make room.
    fn insert(&mut self, key: K, value: V) -> Vec<(K, V)> {
        self.remove(&key);
        let mut evicted = Vec::new();
        while self.entries.len() >= self.bound {
            let Some((_, old)) = self.order.pop_first() else { break };
            if let Some((_, v)) = self.entries.remove(&old) {
                evicted.push((old, v));
            }
        }
        self.order.insert(self.next, key);
        self.entries.insert(key, (self.next, value));
        self.next += 1;
        evicted
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        let (at, v) = self.entries.remove(key)?;
        self.order.remove(&at);
        Some(v)
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(_, v)| v)
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(_, v)| v)
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, (_, v))| (k, v))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

struct Book {
    /// When each traced call was entered, by transfer id.
    posts: Bounded<u64, u64>,
    /// When each traced call returned, by transfer id.
    returns: Bounded<u64, u64>,
    open: Bounded<Key, Record>,
    flows: HashMap<u64, Key>,
    /// Receiving flows queued since the last pass, whose first receives that pass posts.
    unposted: Vec<Key>,
}

/// One connection's marks (`Connection::flow_tracer`).
pub(super) struct FlowTracer {
    nonce: u64,
    /// Whether this end dialed the connection (else it accepted it).
    connector: bool,
    book: Mutex<Book>,
}

static PREFIX: OnceLock<String> = OnceLock::new();
static FINISHED: Mutex<VecDeque<Record>> = Mutex::new(VecDeque::new());

impl FlowTracer {
    /// `nonce`: the connection's handshake nonce, which its peer knows too; `connector`: whether
    /// this end dialed it.
    pub(super) fn new(prefix: &str, nonce: u64, connector: bool) -> FlowTracer {
        PREFIX.get_or_init(|| prefix.to_owned());
        report_at_exit(report);
        FlowTracer::unreported(nonce, connector)
    }

    fn unreported(nonce: u64, connector: bool) -> FlowTracer {
        FlowTracer { nonce, connector, book: Mutex::new(Book::new()) }
    }

    /// A caller entered a post of `transfer` at `at`.
    pub(super) fn posted(&self, transfer: u64, at: u64) {
        self.book.lock().posts.insert(transfer, at);
    }

    /// The post call of `transfer` returned to its caller.
    pub(super) fn returned(&self, transfer: u64) {
        let at = clock_ns();
        self.book.lock().returns.insert(transfer, at);
    }

    /// The post of `transfer` failed before anything of it reached the wire and its id was
    /// forgotten: no caller will see it complete.
    pub(super) fn discarded(&self, transfer: u64) {
        let mut book = self.book.lock();
        book.posts.remove(&transfer);
        book.returns.remove(&transfer);
        let keys: Vec<Key> =
            book.open.iter().filter(|(_, r)| r.initiator && r.transfer == transfer).map(|(k, _)| *k).collect();
        for key in keys {
            book.drop_open(key);
        }
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

    /// The peer's message `seen` was handled at `at`, read from the stream at `arrived`; `out`:
    /// what the state answered.
    pub(super) fn heard(&self, seen: Seen, arrived: u64, at: u64, out: &[Action], chunking: Chunking) {
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
                    r.reply_read(arrived, at);
                }
            }
            Seen::Data(flow) => {
                let key = Key::Ours(flow);
                if let Some(r) = book.open.get_mut(&key) {
                    r.reply_read(arrived, at);
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
        let returned = book.returns.remove(&transfer);
        let keys: Vec<Key> =
            book.open.iter().filter(|(_, r)| r.initiator && r.transfer == transfer).map(|(k, _)| *k).collect();
        for key in keys {
            if let Some(at) = returned {
                book.mark(key, Step::Returned, at);
            }
            book.mark(key, Step::Complete, at);
        }
    }

    fn record(&self, initiator: bool, write: bool) -> Record {
        Record {
            nonce: self.nonce,
            write,
            initiator,
            // The initiator is this end, or the target's peer.
            from_connector: initiator == self.connector,
            seq: None,
            bytes: 0,
            transfer: 0,
            flow: None,
            chunks: 0,
            done: 0,
            reader: '-',
            marks: [0; STEPS.len()],
        }
    }
}

impl Book {
    fn new() -> Book {
        Book {
            posts: Bounded::new(OPEN),
            returns: Bounded::new(OPEN),
            open: Bounded::new(OPEN),
            flows: HashMap::new(),
            unposted: Vec::new(),
        }
    }

    fn open(&mut self, key: Key, r: Record) {
        // Records that never ended (a refused request, a failed connection) are let go, oldest
        // first, so that the ones in flight keep their marks.
        self.drop_open(key);
        for (old, r) in self.open.insert(key, r) {
            self.forget(old, &r);
        }
    }

    fn drop_open(&mut self, key: Key) {
        if let Some(r) = self.open.remove(&key) {
            self.forget(key, &r);
        }
    }

    /// Lets go of what points at `r`, which left `open` without ending.
    fn forget(&mut self, key: Key, r: &Record) {
        if let Some((flow, _)) = r.flow
            && self.flows.get(&flow) == Some(&key)
        {
            self.flows.remove(&flow);
        }
        self.unposted.retain(|k| *k != key);
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
    let mut s = String::from("nonce\top\tfrom\tend\tseq\treader\tbytes");
    for step in STEPS {
        let _ = write!(s, "\t{step}");
    }
    s.push('\n');
    for r in records {
        let op = if r.write { "write" } else { "read" };
        let from = if r.from_connector { "connector" } else { "acceptor" };
        let end = if r.initiator { "initiator" } else { "target" };
        let seq = r.seq.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let _ = write!(s, "{:016x}\t{op}\t{from}\t{end}\t{seq}\t{}\t{}", r.nonce, r.reader, r.bytes);
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
        let t = FlowTracer::unreported(7, true);
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
        assert!(row.starts_with("0000000000000007\twrite\tconnector\tinitiator\t-\t-\t0\t0\t"), "{row}");
        assert_eq!(lines.lines().next().unwrap().split('\t').count(), row.split('\t').count());
    }

    #[test]
    fn the_initiating_end_is_named_alike_at_both_ends() {
        let dialer = FlowTracer::unreported(7, true);
        let acceptor = FlowTracer::unreported(7, false);
        assert!(dialer.record(true, true).from_connector, "the connector's own write");
        assert!(acceptor.record(false, true).from_connector, "the connector's write, served");
        assert!(!acceptor.record(true, false).from_connector, "the acceptor's own read");
        assert!(!dialer.record(false, false).from_connector, "the acceptor's read, served");
    }

    #[test]
    fn past_the_bound_the_oldest_go_and_a_transfer_in_flight_keeps_its_marks() {
        let t = FlowTracer::unreported(7, false);
        // A transfer in flight: its post, its request out; older records and posts that never
        // end (refused, failed) come before it.
        let stale = OPEN - 1;
        for i in 0..stale as u64 {
            t.posted(1_000_000 + i, 1);
            t.book.lock().open(Key::Ours(1_000_000 + i), t.record(true, true));
        }
        t.posted(5, 10);
        let mut r = t.record(true, true);
        r.transfer = 5;
        r.mark(Step::Post, 10);
        t.book.lock().open(Key::Ours(5), r);
        let extra = 100u64;
        for i in 0..extra {
            t.posted(2_000_000 + i, 1);
            t.book.lock().open(Key::Peers(2_000_000 + i), t.record(false, true));
        }
        {
            let book = t.book.lock();
            assert_eq!((book.posts.len(), book.open.len()), (OPEN, OPEN), "each map stays at its bound");
            for i in 0..extra {
                assert!(book.posts.get(&(2_000_000 + i)).is_some(), "newest post {i} kept");
                assert!(book.open.get(&Key::Peers(2_000_000 + i)).is_some(), "newest record {i} kept");
            }
            for i in 0..extra {
                assert!(book.posts.get(&(1_000_000 + i)).is_none(), "oldest post {i} let go");
                assert!(book.open.get(&Key::Ours(1_000_000 + i)).is_none(), "oldest record {i} let go");
            }
            assert_eq!(book.posts.get(&5), Some(&10), "the transfer in flight keeps its post");
            let r = book.open.get(&Key::Ours(5)).expect("the record in flight is kept");
            assert_eq!(r.marks[Step::Post as usize], 10, "and keeps its marks");
        }
        // Its caller sees it complete: the kept post lets the record end.
        t.completed(5);
        let book = t.book.lock();
        assert!(book.open.get(&Key::Ours(5)).is_none(), "the record ended");
        assert!(book.posts.get(&5).is_none());
    }

    #[test]
    fn a_discarded_post_leaves_nothing_behind() {
        let t = FlowTracer::unreported(7, true);
        t.posted(3, 1);
        let mut r = t.record(true, false);
        r.transfer = 3;
        t.book.lock().open(Key::Ours(30), r);
        t.posted(4, 2);
        t.discarded(3);
        let book = t.book.lock();
        assert!(book.posts.get(&3).is_none() && book.open.get(&Key::Ours(30)).is_none());
        assert_eq!(book.posts.get(&4), Some(&2), "another call's post is untouched");
    }
}
