//! Where recorded events wait until the process exits, and the file they are written to.
//!
//! Each thread appends to a buffer of its own (a lock nobody else takes but the writer at exit),
//! and hands it over whole to the process's list every `CHUNK` events; the list keeps the newest
//! `MAX_EVENTS`, letting the oldest chunks go. A thread that ends hands over what it holds. At exit
//! the events are sorted by time and written as `<prefix>.<pid>.tsv`: `#` lines with the format,
//! the schema of every event, the codes of coded fields and the names of the threads, then a row
//! per event: label, ns, thread id, the fields' values.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use super::events::{CODES, Event, SCHEMA};

/// Events a thread gathers before it hands them over.
const CHUNK: usize = 8192;
/// Events a process keeps (about 100 bytes each): the newest, once more were recorded.
const MAX_EVENTS: usize = 1 << 21;
/// The head line: what the scripts check before they read a file.
pub const FORMAT: &str = "# uccl-tcpx trace 1";

#[derive(Clone, Copy)]
struct Rec {
    at: u64,
    tid: u32,
    event: Event,
}

struct Local {
    recs: Vec<Rec>,
}

struct Thread {
    tid: u32,
    name: String,
    local: Arc<Mutex<Local>>,
}

/// Thread ids and names.
type Names = Vec<(u32, String)>;

#[derive(Default)]
struct Kept {
    chunks: VecDeque<Vec<Rec>>,
    events: usize,
    dropped: u64,
    /// Threads that ended, by id and name.
    gone: Names,
}

static THREADS: Mutex<Vec<Thread>> = Mutex::new(Vec::new());
static KEPT: Mutex<Option<Kept>> = Mutex::new(None);
static PREFIX: OnceLock<String> = OnceLock::new();

/// This thread's buffer, registered with the process's list of threads on first use and handed
/// over when the thread ends.
struct Handle {
    tid: u32,
    local: Arc<Mutex<Local>>,
}

impl Handle {
    fn new() -> Handle {
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let local = Arc::new(Mutex::new(Local { recs: Vec::with_capacity(CHUNK) }));
        let name = std::thread::current().name().unwrap_or("-").to_owned();
        THREADS.lock().push(Thread { tid, name, local: local.clone() });
        Handle { tid, local }
    }
}

// Locks are taken in one order, KEPT, THREADS, then a thread's own: events leaving a thread's
// buffer reach KEPT under KEPT's lock, so `gather`, which holds it throughout, finds them in one
// place or the other, never in neither (a filing recorded before its acknowledgement was once
// missing from a read made after the acknowledgement arrived).
impl Drop for Handle {
    fn drop(&mut self) {
        let mut kept = KEPT.lock();
        let mut threads = THREADS.lock();
        let name = threads.iter().position(|t| Arc::ptr_eq(&t.local, &self.local)).map(|i| threads.remove(i).name);
        drop(threads);
        let recs = std::mem::take(&mut self.local.lock().recs);
        let kept = kept.get_or_insert_with(Kept::default);
        kept.gone.push((self.tid, name.unwrap_or_default()));
        stash(kept, recs);
    }
}

thread_local! {
    static MINE: Handle = Handle::new();
}

fn stash(kept: &mut Kept, recs: Vec<Rec>) {
    if recs.is_empty() {
        return;
    }
    kept.events += recs.len();
    kept.chunks.push_back(recs);
    while kept.events > MAX_EVENTS {
        let Some(old) = kept.chunks.pop_front() else { break };
        kept.events -= old.len();
        kept.dropped += old.len() as u64;
    }
}

/// Keeps `event` of time `at` in this thread's buffer (dropped while the thread is ending).
pub(super) fn push(at: u64, event: Event) {
    let _ = MINE.try_with(|h| {
        let mut local = h.local.lock();
        local.recs.push(Rec { at, tid: h.tid, event });
        if local.recs.len() >= CHUNK {
            // In the locks' order (above): KEPT first.
            drop(local);
            let mut kept = KEPT.lock();
            let full = std::mem::replace(&mut h.local.lock().recs, Vec::with_capacity(CHUNK));
            stash(kept.get_or_insert_with(Kept::default), full);
        }
    });
}

/// Writes the events to `<prefix>.<pid>.tsv` when the process exits.
pub(super) fn write_at_exit(prefix: &str) {
    if PREFIX.set(prefix.to_owned()).is_ok() {
        // SAFETY: registers a plain function; it runs once at process exit.
        unsafe { libc::atexit(write_now) };
    }
}

extern "C" fn write_now() {
    // Nothing may unwind out of an atexit handler.
    let _ = std::panic::catch_unwind(|| {
        let Some(prefix) = PREFIX.get() else { return };
        let path = format!("{prefix}.{}.tsv", std::process::id());
        eprintln!("{}", write(&path));
    });
}

/// Every event kept so far, by time, and the names of the threads that recorded them; none is
/// taken away. A lock still held at exit (a thread recording) is waited for a little, then given up.
fn gather() -> Option<(Vec<Rec>, Names, u64)> {
    let wait = Duration::from_millis(200);
    let mut recs = Vec::new();
    let mut names = Vec::new();
    let kept = KEPT.try_lock_for(wait)?;
    {
        let threads = THREADS.try_lock_for(wait)?;
        for t in threads.iter() {
            names.push((t.tid, t.name.clone()));
            if let Some(local) = t.local.try_lock_for(wait) {
                recs.extend_from_slice(&local.recs);
            }
        }
    }
    let dropped = kept.as_ref().map_or(0, |k| k.dropped);
    if let Some(kept) = kept.as_ref() {
        recs.extend(kept.chunks.iter().flatten().copied());
        names.extend(kept.gone.iter().cloned());
    }
    drop(kept);
    recs.sort_by_key(|r| r.at);
    names.sort();
    names.dedup_by_key(|(tid, _)| *tid);
    Some((recs, names, dropped))
}

/// Every event kept so far with its time, by time.
#[cfg(test)]
pub(super) fn kept_events() -> Vec<(u64, Event)> {
    gather().map(|(recs, _, _)| recs.iter().map(|r| (r.at, r.event)).collect()).unwrap_or_default()
}

/// Writes the file; returns the line to print.
fn write(path: &str) -> String {
    let pid = std::process::id();
    let Some((recs, names, dropped)) = gather() else {
        return format!("trace[{pid}]: busy at exit, nothing written to {path}");
    };
    let text = render(&recs, &names, dropped);
    match std::fs::write(path, text) {
        Ok(()) => format!("trace[{pid}]: {} events ({dropped} older ones let go) in {path}", recs.len()),
        Err(e) => format!("trace[{pid}]: nothing written to {path}: {e}"),
    }
}

fn render(recs: &[Rec], names: &[(u32, String)], dropped: u64) -> String {
    let mut out = String::with_capacity(64 * recs.len() + 4096);
    let _ = writeln!(out, "{FORMAT}");
    let _ = writeln!(out, "# pid\t{}\n# dropped\t{dropped}", std::process::id());
    for s in SCHEMA {
        let _ = writeln!(out, "# event\t{}\t{}", s.label, s.fields.join("\t"));
    }
    for (field, value, name) in CODES {
        let _ = writeln!(out, "# code\t{field}\t{value}\t{name}");
    }
    for (tid, name) in names {
        let _ = writeln!(out, "# thread\t{tid}\t{name}");
    }
    let mut values = Vec::with_capacity(16);
    for r in recs {
        let _ = write!(out, "{}\t{}\t{}", SCHEMA[r.event.index()].label, r.at, r.tid);
        values.clear();
        r.event.values(&mut values);
        for v in &values {
            let _ = write!(out, "\t{v}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_schema_and_name_their_threads() {
        let e = Event::SockSent { comm: 0xab, seq: 3, socket: 1, bytes: 4096 };
        let recs = [Rec { at: 10, tid: 42, event: e }];
        let text = render(&recs, &[(42, "uccl-sock-tx0".into())], 5);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], FORMAT);
        assert!(lines.contains(&"# dropped\t5"));
        assert!(lines.contains(&"# event\tsock_sent\tcomm\tseq\tsocket\tbytes"), "{text}");
        assert!(lines.contains(&"# code\tby\t2\tprogress"), "{text}");
        assert!(lines.contains(&"# thread\t42\tuccl-sock-tx0"));
        assert_eq!(*lines.last().unwrap(), "sock_sent\t10\t42\t171\t3\t1\t4096");
    }

    #[test]
    fn past_the_bound_the_oldest_chunks_go() {
        let mut kept = Kept::default();
        let rec = Rec { at: 1, tid: 1, event: Event::FlowPass { conn: 1, side: 1 } };
        for _ in 0..(MAX_EVENTS / CHUNK + 2) {
            stash(&mut kept, vec![rec; CHUNK]);
        }
        assert_eq!(kept.events, MAX_EVENTS);
        assert_eq!(kept.dropped, 2 * CHUNK as u64);
        stash(&mut kept, Vec::new());
        assert_eq!(kept.chunks.len(), MAX_EVENTS / CHUNK, "an empty hand-over keeps nothing");
    }

    #[test]
    fn a_thread_that_ends_hands_its_events_over() {
        // An id no other test records.
        let comm = 0x7e57_0000_0000_0001;
        std::thread::spawn(move || push(5, Event::SockTake { comm, seq: 0, socket: 0 })).join().unwrap();
        let (recs, _, _) = gather().unwrap();
        assert!(recs.iter().any(|r| r.event == Event::SockTake { comm, seq: 0, socket: 0 }));
    }
}
