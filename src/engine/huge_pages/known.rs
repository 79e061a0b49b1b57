//! A cache of page-size answers about one process's memory: the mappings of its last smaps read,
//! which answer any range inside them, filled in the background. One per process looked at (this
//! one's is shared by every region, each peer's is its `PeerProcess`'s), so a read serves every
//! range of every region there, and only memory mapped since the last read asks for another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::looker::{self, Look};
use super::smaps::{self, Snapshot, Tally};
use super::system;
use crate::threads::{ThreadKind, run_contained};

/// The least time between the end of one read of a process's smaps and the start of the next.
const MIN_GAP: Duration = Duration::from_millis(100);
/// Reads wait this many times as long as the last one took: a read walks every page table of the
/// process, so a large one (about 12 ms per GiB resident on small pages) is kept to a tenth of a
/// core however often new mappings are asked about.
const GAP_PER_READ: u32 = 10;
/// The most that rule makes a read wait, so that one freak read (a process stopped meanwhile)
/// does not keep a process's new mappings unanswered for long.
const MAX_READ_GAP: Duration = Duration::from_secs(60);

type Reader = Box<dyn Fn() -> Option<Snapshot> + Send + Sync>;

#[derive(Debug, Default)]
struct State {
    /// The mappings of the last read that succeeded.
    known: Snapshot,
    /// A read is queued or under way. One at a time: it reads every mapping there is.
    looking: bool,
    /// No read starts before this (`MIN_GAP`, `GAP_PER_READ`).
    not_before: Option<Instant>,
    /// A range asked about while a read was under way that the snapshot did not cover; if the
    /// read's own snapshot misses it too (it began before that memory was mapped), the next read
    /// is queued at once rather than at the next ask, which would go as on small pages.
    missed: Option<(usize, usize)>,
    /// Reads that ran.
    reads: u64,
}

struct Shared {
    read: Reader,
    /// Whether looking can ever find huge pages (`system.rs`); without, nothing is read.
    possible: bool,
    min_gap: Duration,
    state: Mutex<State>,
    /// Counts the reads settled (from 1): an answer given at one count stays true until the next,
    /// so an asker may keep it that long without the lock ([`KnownMappings::generation`]).
    generation: AtomicU64,
}

/// Answers about one process's memory (this one's, or a peer's).
pub struct KnownMappings {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KnownMappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("KnownMappings").field("mappings", &state.known.len()).field("reads", &state.reads).finish()
    }
}

impl KnownMappings {
    /// The cache of this process's memory, shared by every region of every engine in it.
    pub fn ours() -> Arc<KnownMappings> {
        static OURS: OnceLock<Arc<KnownMappings>> = OnceLock::new();
        OURS.get_or_init(|| Arc::new(KnownMappings::of_process(None))).clone()
    }

    /// A cache of process `pid`'s memory (`None`: this process; see [`KnownMappings::ours`]).
    pub fn of_process(pid: Option<u32>) -> KnownMappings {
        KnownMappings::new(system::huge_pages_possible(), MIN_GAP, Box::new(move || smaps::read(pid)))
    }

    fn new(possible: bool, min_gap: Duration, read: Reader) -> KnownMappings {
        let state = Mutex::new(State::default());
        KnownMappings { shared: Arc::new(Shared { read, possible, min_gap, state, generation: AtomicU64::new(1) }) }
    }

    /// A cache reading with `read`, at most once per `min_gap`.
    #[cfg(test)]
    pub(crate) fn with_reader(
        min_gap: Duration,
        read: impl Fn() -> Option<Snapshot> + Send + Sync + 'static,
    ) -> KnownMappings {
        KnownMappings::new(true, min_gap, Box::new(read))
    }

    /// Whether the memory under `ranges` (address and length each) lies mostly on huge pages (at
    /// least 90 % of the resident bytes of the mappings they overlap), as far as the last read
    /// knows. A range it does not cover (memory mapped since) queues a new read for the looker
    /// thread, unless one is queued or under way already, to run once the last read is far
    /// enough behind, and the answer is small pages until then: the asker never waits. The
    /// ranges are walked once, never collected: a vector may list thousands.
    pub fn on_huge_pages(&self, ranges: impl IntoIterator<Item = (usize, usize)>) -> bool {
        if !self.shared.possible {
            return false;
        }
        let due = {
            let mut state = self.shared.state.lock();
            let mut tally = Tally::default();
            let Some(uncovered) = ranges.into_iter().find(|&(addr, len)| !state.known.tally(addr, len, &mut tally))
            else {
                return tally.huge();
            };
            if state.looking {
                state.missed = Some(uncovered);
                return false;
            }
            state.looking = true;
            state.not_before.unwrap_or_else(Instant::now)
        };
        looker::submit(Box::new(Pending { shared: Arc::downgrade(&self.shared) }), due);
        false
    }

    /// How many reads settled so far (from 1): an answer of [`on_huge_pages`](Self::on_huge_pages)
    /// about a range stays what it would be now as long as this stays the same, since only a
    /// settled read changes what is known (read the count before asking).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// A read is queued or under way.
    #[cfg(test)]
    pub(crate) fn looking(&self) -> bool {
        self.shared.state.lock().looking
    }

    /// Reads that ran.
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.shared.state.lock().reads
    }
}

impl Shared {
    /// Takes in what a read that began at `began` found (`None`: it failed, and what was known
    /// stays) and sets when the next may start; queues that one at once if a range asked about
    /// meanwhile is still not covered.
    fn settle(self: &Arc<Self>, read: Option<Snapshot>, began: Instant) {
        let now = Instant::now();
        let took = now.saturating_duration_since(began);
        let not_before = now + self.min_gap.max(took.saturating_mul(GAP_PER_READ).min(MAX_READ_GAP));
        let again = {
            let mut state = self.state.lock();
            if let Some(known) = read {
                state.known = known;
            }
            // Also after a failed read: an asker told "small pages" for want of a read asks again,
            // which may queue the next one.
            self.generation.fetch_add(1, Ordering::AcqRel);
            state.not_before = Some(not_before);
            let missed = state.missed.take();
            state.looking = missed.is_some_and(|(addr, len)| !state.known.tally(addr, len, &mut Tally::default()));
            state.looking
        };
        if again {
            looker::submit(Box::new(Pending { shared: Arc::downgrade(self) }), not_before);
        }
    }
}

/// A read on its way to the looker thread. It holds its cache weakly: a cache dropped meanwhile
/// (its peer gone) is not read for.
struct Pending {
    shared: Weak<Shared>,
}

impl Look for Pending {
    fn run(self: Box<Self>) {
        let Some(shared) = self.shared.upgrade() else { return };
        let began = Instant::now();
        let read = run_contained(ThreadKind::PageLook, || (shared.read)()).ok().flatten();
        shared.state.lock().reads += 1;
        shared.settle(read, began);
    }

    fn give_up(self: Box<Self>) {
        if let Some(shared) = self.shared.upgrade() {
            shared.settle(None, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use testkit::PATIENCE;

    const M: usize = 1 << 20;
    const BASE: usize = 0x7f00_0000_0000;
    /// Longer than any test waits between asks that must not read again.
    const LONG: Duration = Duration::from_secs(3600);

    /// smaps text of `n` mappings of 4 MiB from `BASE`, each 8 MiB apart, the even ones on huge
    /// pages.
    fn mappings(n: usize) -> String {
        (0..n)
            .map(|i| {
                let (start, huge) = (BASE + i * 8 * M, if i % 2 == 0 { 4096 } else { 0 });
                format!("{start:x}-{:x} rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: {huge} kB\n", start + 4 * M)
            })
            .collect()
    }

    /// A process whose mappings a test adds to, with a reader that counts its reads.
    #[derive(Clone)]
    struct Process {
        mapped: Arc<AtomicUsize>,
        reads: Arc<AtomicUsize>,
    }

    impl Process {
        fn new(mapped: usize) -> Process {
            Process { mapped: Arc::new(AtomicUsize::new(mapped)), reads: Arc::new(AtomicUsize::new(0)) }
        }

        fn cache(&self, min_gap: Duration) -> KnownMappings {
            let me = self.clone();
            KnownMappings::with_reader(min_gap, move || {
                me.reads.fetch_add(1, Ordering::SeqCst);
                Some(Snapshot::from_text(&mappings(me.mapped.load(Ordering::SeqCst))))
            })
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }
    }

    /// Mapping `i`'s first `len` bytes.
    fn mapping(i: usize, len: usize) -> [(usize, usize); 1] {
        [(BASE + i * 8 * M, len)]
    }

    fn settled(known: &KnownMappings) {
        testkit::wait_until("the look settles", PATIENCE, || !known.looking());
    }

    #[test]
    fn the_first_ask_returns_before_the_read_and_answers_small_pages() {
        let _reading = looker::TEST_FAULTS.read();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let (started, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let known = {
            let (started, finished) = (started.clone(), finished.clone());
            KnownMappings::with_reader(LONG, move || {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = gate.lock().recv_timeout(PATIENCE);
                finished.fetch_add(1, Ordering::SeqCst);
                Some(Snapshot::from_text(&mappings(1)))
            })
        };
        assert!(!known.on_huge_pages(mapping(0, M)), "nothing known yet: small pages");
        assert_eq!(finished.load(Ordering::SeqCst), 0, "the ask did not wait for the read");
        assert!(!known.on_huge_pages(mapping(0, 2 * M)), "still looking: small pages");
        assert!(known.looking());
        // The read blocks until released: the looker thread really holds it, the asker does not.
        testkit::wait_until("the look starts", PATIENCE, || started.load(Ordering::SeqCst) == 1);
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
        settled(&known);
        assert!(known.on_huge_pages(mapping(0, 4 * M)), "the looked-up answer");
        assert_eq!(started.load(Ordering::SeqCst), 1, "asks while a read is pending or answered start none");
        assert_eq!(known.reads(), 1);
    }

    #[test]
    fn concurrent_asks_start_one_read() {
        let _reading = looker::TEST_FAULTS.read();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let process = Process::new(8);
        let known = {
            let process = process.clone();
            Arc::new(KnownMappings::with_reader(LONG, move || {
                process.reads.fetch_add(1, Ordering::SeqCst);
                let _ = gate.lock().recv_timeout(PATIENCE);
                Some(Snapshot::from_text(&mappings(8)))
            }))
        };
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let askers: Vec<_> = (0..8)
            .map(|i| {
                let (known, barrier) = (known.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    known.on_huge_pages(mapping(i, M))
                })
            })
            .collect();
        for asker in askers {
            assert!(!asker.join().unwrap(), "every ask before the answer says small pages");
        }
        release.send(()).unwrap();
        settled(&known);
        for i in 0..8 {
            assert_eq!(known.on_huge_pages(mapping(i, M)), i % 2 == 0, "the answer of mapping {i}");
        }
        assert_eq!(process.reads(), 1, "eight concurrent asks, one read");
    }

    #[test]
    fn ranges_in_known_mappings_share_one_read_and_are_weighed_together() {
        let _reading = looker::TEST_FAULTS.read();
        let process = Process::new(4);
        let known = process.cache(LONG);
        assert!(!known.on_huge_pages(mapping(0, M)), "the first region's first ask starts the read");
        settled(&known);
        assert!(known.on_huge_pages(mapping(0, M)), "the first region");
        assert!(known.on_huge_pages([(BASE + M, 2 * M)]), "a second region in the same mapping");
        assert!(!known.on_huge_pages(mapping(1, M)), "a region in another mapping, on small pages");
        assert!(known.on_huge_pages(mapping(2, 4 * M)));
        // Two mappings on huge pages and one on small pages: a third of the resident bytes is small.
        assert!(!known.on_huge_pages([mapping(0, M)[0], mapping(1, M)[0], mapping(2, M)[0]]));
        let thousand = (0..1000).map(|i| (BASE + i * 4096, 4096));
        assert!(known.on_huge_pages(thousand), "many ranges in one mapping count it once");
        assert_eq!(process.reads(), 1, "one read answered them all");
    }

    #[test]
    fn a_range_in_a_new_mapping_reads_again_no_sooner_than_the_gap() {
        let _reading = looker::TEST_FAULTS.read();
        const GAP: Duration = Duration::from_millis(300);
        let process = Process::new(1);
        let known = process.cache(GAP);
        let first = Instant::now();
        known.on_huge_pages(mapping(0, M));
        settled(&known);
        assert!(known.on_huge_pages(mapping(0, M)));
        process.mapped.store(3, Ordering::SeqCst);
        assert!(!known.on_huge_pages(mapping(2, M)), "mapped since the read: small pages, and a read queued");
        assert!(!known.on_huge_pages(mapping(2, M)), "one read queued at a time");
        assert!(known.looking());
        testkit::wait_until("the second read", PATIENCE, || process.reads() == 2);
        assert!(first.elapsed() >= GAP, "the second read waited for the gap ({:?})", first.elapsed());
        settled(&known);
        assert!(known.on_huge_pages(mapping(2, M)), "the new mapping's answer");
        assert!(!known.on_huge_pages(mapping(1, M)));
        assert_eq!(process.reads(), 2);
        assert!(!known.on_huge_pages([(0x1000, 4096)]), "memory mapped nowhere: small pages");
        testkit::wait_until("the third read", PATIENCE, || process.reads() == 3);
        settled(&known);
        assert_eq!(process.reads(), 3, "asked once, read once, however long it stays unmapped");
    }

    #[test]
    fn a_long_read_makes_the_next_wait_ten_times_as_long() {
        let _reading = looker::TEST_FAULTS.read();
        const TAKES: Duration = Duration::from_millis(60);
        let process = Process::new(1);
        let ended = Arc::new(Mutex::new(None::<Instant>));
        let known = {
            let (process, ended) = (process.clone(), ended.clone());
            KnownMappings::with_reader(Duration::from_millis(1), move || {
                process.reads.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(TAKES);
                *ended.lock() = Some(Instant::now());
                Some(Snapshot::from_text(&mappings(process.mapped.load(Ordering::SeqCst))))
            })
        };
        known.on_huge_pages(mapping(0, M));
        settled(&known);
        let first_ended = ended.lock().expect("the first read ran");
        process.mapped.store(2, Ordering::SeqCst);
        assert!(!known.on_huge_pages(mapping(1, M)));
        testkit::wait_until("the second read", PATIENCE, || process.reads() == 2);
        let waited = Instant::now().saturating_duration_since(first_ended);
        assert!(waited >= TAKES * GAP_PER_READ, "the second read began {waited:?} after the first ended");
        settled(&known);
        assert!(!known.on_huge_pages(mapping(1, M)), "the new mapping, on small pages");
        assert!(!known.looking(), "known now: no read queued");
        assert!(known.on_huge_pages(mapping(0, M)));
        assert_eq!(process.reads(), 2);
    }

    #[test]
    fn a_peer_asked_in_rotation_over_many_mappings_is_read_once() {
        let _reading = looker::TEST_FAULTS.read();
        let process = Process::new(300);
        let known = process.cache(LONG);
        known.on_huge_pages(mapping(0, M));
        settled(&known);
        for _ in 0..3 {
            for i in 0..300 {
                assert_eq!(known.on_huge_pages(mapping(i, 4 * M)), i % 2 == 0, "mapping {i}");
            }
        }
        assert_eq!(process.reads(), 1);
        assert!(!known.looking());
    }

    #[test]
    fn an_ask_missed_by_the_read_under_way_reads_again_by_itself() {
        let _reading = looker::TEST_FAULTS.read();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let process = Process::new(1);
        let known = {
            let process = process.clone();
            KnownMappings::with_reader(Duration::from_millis(1), move || {
                let n = process.reads.fetch_add(1, Ordering::SeqCst);
                let text = mappings(process.mapped.load(Ordering::SeqCst));
                if n == 0 {
                    let _ = gate.lock().recv_timeout(PATIENCE);
                }
                Some(Snapshot::from_text(&text))
            })
        };
        known.on_huge_pages(mapping(0, M));
        testkit::wait_until("the first read begins", PATIENCE, || process.reads() == 1);
        // Mapped after that read looked: it cannot know the new mapping.
        process.mapped.store(3, Ordering::SeqCst);
        assert!(!known.on_huge_pages(mapping(2, M)));
        release.send(()).unwrap();
        testkit::wait_until("the second read", PATIENCE, || process.reads() == 2);
        settled(&known);
        assert!(known.on_huge_pages(mapping(2, M)), "known without another ask");
        assert_eq!(process.reads(), 2);
    }

    #[test]
    fn a_failing_read_answers_small_pages_and_a_later_one_reads_again() {
        let _reading = looker::TEST_FAULTS.read();
        let outcome = Arc::new(AtomicUsize::new(0));
        let known = {
            let outcome = outcome.clone();
            KnownMappings::with_reader(Duration::from_millis(1), move || match outcome.load(Ordering::SeqCst) {
                0 => None,
                1 => panic!("a read that fails hard"),
                _ => Some(Snapshot::from_text(&mappings(1))),
            })
        };
        assert!(!known.on_huge_pages(mapping(0, M)));
        settled(&known);
        assert!(!known.on_huge_pages(mapping(0, M)), "unreadable: small pages, and a read queued again");
        settled(&known);
        assert_eq!(known.reads(), 2);
        outcome.store(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!known.on_huge_pages(mapping(0, M)));
        settled(&known);
        assert_eq!(known.reads(), 3, "a panicking read counts as one that failed");
        outcome.store(2, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!known.on_huge_pages(mapping(0, M)));
        settled(&known);
        assert!(known.on_huge_pages(mapping(0, M)), "the thread went on and read");
        assert_eq!(known.reads(), 4);
    }

    #[test]
    fn where_huge_pages_are_impossible_nothing_is_read() {
        let process = Process::new(1);
        let me = process.clone();
        let known = KnownMappings::new(
            false,
            Duration::ZERO,
            Box::new(move || {
                me.reads.fetch_add(1, Ordering::SeqCst);
                Some(Snapshot::from_text(&mappings(me.mapped.load(Ordering::SeqCst))))
            }),
        );
        for _ in 0..3 {
            assert!(!known.on_huge_pages(mapping(0, M)));
            assert!(!known.looking(), "no read queued");
        }
        assert!(looker::looks_settled(PATIENCE));
        assert_eq!(process.reads(), 0);
    }

    #[test]
    fn a_dropped_cache_is_not_read_for() {
        let _reading = looker::TEST_FAULTS.read();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let holder = KnownMappings::with_reader(LONG, move || {
            let _ = gate.lock().recv_timeout(PATIENCE);
            None
        });
        holder.on_huge_pages(mapping(0, M));
        let process = Process::new(1);
        let dropped = process.cache(LONG);
        dropped.on_huge_pages(mapping(0, M));
        drop(dropped);
        release.send(()).unwrap();
        settled(&holder);
        assert!(looker::looks_settled(PATIENCE));
        assert_eq!(process.reads(), 0, "the read of a cache gone went without reading");
    }

    #[test]
    fn a_looker_thread_that_panics_gives_up_its_queue_and_the_next_ask_starts_another() {
        let _alone = looker::TEST_FAULTS.write();
        assert!(looker::looks_settled(PATIENCE));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let busy = Process::new(1);
        let blocking = {
            let busy = busy.clone();
            KnownMappings::with_reader(LONG, move || {
                busy.reads.fetch_add(1, Ordering::SeqCst);
                let _ = gate.lock().recv_timeout(PATIENCE);
                Some(Snapshot::from_text(&mappings(1)))
            })
        };
        blocking.on_huge_pages(mapping(0, M));
        testkit::wait_until("the thread is inside a read", PATIENCE, || busy.reads() == 1);
        // The next look the thread takes up panics; both of these are queued by then.
        crate::threads::inject_panic(ThreadKind::PageLook);
        let queued: Vec<(Process, KnownMappings)> = (0..2)
            .map(|_| {
                let process = Process::new(1);
                let known = process.cache(Duration::from_millis(1));
                assert!(!known.on_huge_pages(mapping(0, M)));
                (process, known)
            })
            .collect();
        release.send(()).unwrap();
        for (process, known) in &queued {
            settled(known);
            assert_eq!(process.reads(), 0, "given up, not read");
            assert!(!known.on_huge_pages(mapping(0, M)), "small pages, and another read queued");
        }
        assert!(!crate::threads::panic_pending(ThreadKind::PageLook), "the point fired");
        settled(&blocking);
        assert!(blocking.on_huge_pages(mapping(0, M)), "the read under way finished first");
        for (process, known) in &queued {
            settled(known);
            assert_eq!(process.reads(), 1, "read on a new thread");
            assert!(known.on_huge_pages(mapping(0, M)), "and answered");
        }
        crate::threads::clear_panic(ThreadKind::PageLook);
    }
}
