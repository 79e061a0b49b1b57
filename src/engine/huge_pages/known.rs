//! A cache of page-size answers about one process's memory: the mappings of its last smaps read,
//! which answer any range inside them, filled in the background. One per process looked at (this
//! one's is shared by every region, each peer's is its `PeerProcess`'s), so a read serves every
//! range of every region there, and only memory mapped since the last read asks for another.
//!
//! Memory can also change page size in place, without a new mapping: the kernel collapses small
//! pages into huge ones (`MADV_COLLAPSE`, khugepaged) or splits them. The process that changed its
//! own pages says so with [`KnownMappings::refresh`], which queues a read at once (what is known
//! answers until it is in, a read under way that began earlier is followed by another, and a read
//! that fails is tried again a few times); so does a peer's cache when the peer says it collapsed
//! memory a read of ours was served from (`OnHugePages`). Otherwise a peer's cache rechecks: a
//! "small pages" answer from a read a second old or more queues another read, kept further apart
//! than the reads for new mappings since memory that stays on small pages would repeat them for as
//! long as it is asked about. "Huge pages" answers are never rechecked: going back to small pages
//! costs only speed, and the next new mapping reads anyway.

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
/// How old the read behind a "small pages" answer about a peer's memory may grow before an ask
/// queues a recheck, and the least time between the end of one read and a recheck.
const RECHECK_SMALL_AFTER: Duration = Duration::from_secs(1);
/// Rechecks wait this many times as long as the last read took: unlike new mappings, which stop
/// coming, memory that stays on small pages is rechecked for as long as transfers ask about it,
/// so they are kept to a hundredth of a core.
const RECHECK_GAP_PER_READ: u32 = 100;
/// The most that rule makes a recheck wait. Longer than `MAX_READ_GAP`: a late recheck only
/// leaves a collapse unseen a while longer, while at this cap a read of 3 s (250 GiB resident on
/// small pages) still keeps to a hundredth of a core.
const MAX_RECHECK_GAP: Duration = Duration::from_secs(300);
/// Reads after a refresh that may fail in a row before the refresh is given up: each waits out
/// the gap, so a process whose smaps stays unreadable costs a few reads, not a loop; the next
/// refresh, or an ask about memory mapped since, reads again.
const REFRESH_RETRIES: u32 = 3;

type Reader = Box<dyn Fn() -> Option<Snapshot> + Send + Sync>;

#[derive(Debug, Default)]
struct State {
    /// The mappings of the last read that succeeded.
    known: Snapshot,
    /// A read is queued or under way. One at a time: it reads every mapping there is.
    looking: bool,
    /// No read starts before this (`MIN_GAP`, `GAP_PER_READ`).
    not_before: Option<Instant>,
    /// No "small pages" answer queues a recheck before this (`RECHECK_SMALL_AFTER`,
    /// `RECHECK_GAP_PER_READ`); `None` where the cache never rechecks, or before any read.
    recheck_not_before: Option<Instant>,
    /// A range asked about while a read was under way that the snapshot did not cover; if the
    /// read's own snapshot misses it too (it began before that memory was mapped), the next read
    /// is queued at once rather than at the next ask, which would go as on small pages.
    missed: Option<(usize, usize)>,
    /// Counts [`KnownMappings::refresh`] calls: a read that began at another count may have looked
    /// before the change it was told of.
    refreshes: u64,
    /// `refreshes` when the last read that succeeded began: the refreshes after it are unanswered.
    refreshes_answered: u64,
    /// Reads that failed since the last one that succeeded, or the last refresh.
    failed_in_row: u32,
    /// Reads that ran.
    reads: u64,
}

struct Shared {
    read: Reader,
    /// Whether looking can ever find huge pages (`system.rs`); without, nothing is read.
    possible: bool,
    min_gap: Duration,
    /// How old a read may grow before a "small pages" answer from it queues a recheck; `None`:
    /// never (this process's own cache, [`KnownMappings::ours`]).
    recheck_small_after: Option<Duration>,
    state: Mutex<State>,
    /// Counts the reads settled (from 1): an answer given at one count stays true
    /// until the next, so an asker may keep it that long without the lock
    /// ([`KnownMappings::generation`]).
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
    ///
    /// Only a peer's cache rechecks "small pages" answers. This process collapses its own memory
    /// itself and then calls [`refresh`](Self::refresh). What khugepaged collapses of it meanwhile
    /// comes slowly (it scans some 16 MiB per 10 s by default) and shows at the next read made
    /// for any other reason. A recheck would also rarely be asked for: a region keeps its answer
    /// until the generation moves (`Region::on_huge_pages`), so it asks again only after some other
    /// read, and catching the recheck's time would cost every post a clock read.
    pub fn of_process(pid: Option<u32>) -> KnownMappings {
        let recheck_small_after = pid.map(|_| RECHECK_SMALL_AFTER);
        KnownMappings::new(
            system::huge_pages_possible(),
            MIN_GAP,
            recheck_small_after,
            Box::new(move || smaps::read(pid)),
        )
    }

    fn new(possible: bool, min_gap: Duration, recheck_small_after: Option<Duration>, read: Reader) -> KnownMappings {
        let state = Mutex::new(State::default());
        let generation = AtomicU64::new(1);
        KnownMappings { shared: Arc::new(Shared { read, possible, min_gap, recheck_small_after, state, generation }) }
    }

    /// A cache reading with `read`, at most once per `min_gap`, that never rechecks (as this
    /// process's own).
    #[cfg(test)]
    pub(crate) fn with_reader(
        min_gap: Duration,
        read: impl Fn() -> Option<Snapshot> + Send + Sync + 'static,
    ) -> KnownMappings {
        KnownMappings::new(true, min_gap, None, Box::new(read))
    }

    /// A cache reading with `read`, at most once per `min_gap`, that rechecks "small pages"
    /// answers from reads `recheck_small_after` old (as a peer's, with a delay a test can wait out).
    #[cfg(test)]
    pub(crate) fn rechecking_with_reader(
        min_gap: Duration,
        recheck_small_after: Duration,
        read: impl Fn() -> Option<Snapshot> + Send + Sync + 'static,
    ) -> KnownMappings {
        KnownMappings::new(true, min_gap, Some(recheck_small_after), Box::new(read))
    }

    /// Whether the memory under `ranges` (address and length each) lies mostly on huge pages (at
    /// least 90 % of the resident bytes of the mappings they overlap), as far as the last read
    /// knows. A range it does not cover (memory mapped since) queues a new read for the looker thread, unless one is queued or
    /// under way already, to run once the last read is far enough behind, and the answer is small
    /// pages until then: the asker never waits. In a cache that rechecks, a "small pages" answer
    /// from a read old enough queues a read as well, answering from what is known meanwhile. The
    /// ranges are walked once, never collected: a vector may list thousands.
    pub fn on_huge_pages(&self, ranges: impl IntoIterator<Item = (usize, usize)>) -> bool {
        if !self.shared.possible {
            return false;
        }
        let due = {
            let mut state = self.shared.state.lock();
            let mut tally = Tally::default();
            match ranges.into_iter().find(|&(addr, len)| !state.known.tally(addr, len, &mut tally)) {
                None if tally.huge() => return true,
                None => {
                    // The clock is read only here, where a recheck may be due, and the lock is the
                    // one the answer took anyway.
                    let (Some(recheck_not_before), false) = (state.recheck_not_before, state.looking) else {
                        return false;
                    };
                    let now = Instant::now();
                    if now < recheck_not_before {
                        return false;
                    }
                    state.looking = true;
                    state.not_before.map_or(now, |not_before| not_before.max(now))
                }
                Some(uncovered) => {
                    if state.looking {
                        state.missed = Some(uncovered);
                        return false;
                    }
                    state.looking = true;
                    state.not_before.unwrap_or_else(Instant::now)
                }
            }
        };
        looker::submit(Box::new(Pending { shared: Arc::downgrade(&self.shared) }), due);
        false
    }

    /// Pages changed size in place (collapsed into huge pages, or split) without any mapping
    /// changing, which only a new read shows: queues one now (to run no sooner than the last
    /// one's gap allows), unless one is queued already, and answers from what is known until it
    /// settles; a read under way, which may have begun before the change, is followed by another.
    /// Memory that was on huge pages before keeps its answer meanwhile.
    pub fn refresh(&self) {
        if !self.shared.possible {
            return;
        }
        let due = {
            let mut state = self.shared.state.lock();
            state.refreshes += 1;
            // Each refresh gets its own retries, whatever failed before it.
            state.failed_in_row = 0;
            if std::mem::replace(&mut state.looking, true) {
                return;
            }
            state.not_before.unwrap_or_else(Instant::now)
        };
        looker::submit(Box::new(Pending { shared: Arc::downgrade(&self.shared) }), due);
    }

    /// How many reads settled so far (from 1): an answer of
    /// [`on_huge_pages`](Self::on_huge_pages) about a range stays what it would be now as long as
    /// this stays the same, since only a settled read changes what is known (read the count before
    /// asking).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// The first generation whose read surely begins after this call (the next when none is
    /// queued or under way, else the one after it): an answer of an earlier generation may
    /// describe memory mapped at the same addresses before, since unmapped.
    pub fn generation_read_after_now(&self) -> u64 {
        let state = self.shared.state.lock();
        self.shared.generation.load(Ordering::Acquire) + 1 + u64::from(state.looking)
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

    /// The earliest a "small pages" answer queues a recheck (`None`: none will).
    #[cfg(test)]
    fn recheck_not_before(&self) -> Option<Instant> {
        self.shared.state.lock().recheck_not_before
    }
}

/// What one read found (`None`: it failed, or never ran), with the count of refreshes when it
/// began.
struct Read {
    snapshot: Option<Snapshot>,
    refreshes_before: u64,
}

impl Shared {
    /// Takes in what a read that began at `began` found (a failed one leaves what was known) and
    /// sets when the next may start; queues that one at once if a range asked about meanwhile is
    /// still not covered, if a refresh came after the read began, or if the read failed with a
    /// refresh unanswered (at most `REFRESH_RETRIES` times in a row).
    fn settle(self: &Arc<Self>, read: Read, began: Instant) {
        let now = Instant::now();
        let took = now.saturating_duration_since(began);
        let not_before = now + self.min_gap.max(took.saturating_mul(GAP_PER_READ).min(MAX_READ_GAP));
        let recheck_not_before = self
            .recheck_small_after
            .map(|after| now + after.max(took.saturating_mul(RECHECK_GAP_PER_READ).min(MAX_RECHECK_GAP)));
        let again = {
            let mut state = self.state.lock();
            let again = match read.snapshot {
                // A read that began before a refresh may have looked before the change it told of:
                // its snapshot, newer than what is known, answers until the next read, queued now.
                Some(snapshot) => {
                    state.known = snapshot;
                    state.refreshes_answered = read.refreshes_before;
                    state.failed_in_row = 0;
                    read.refreshes_before != state.refreshes
                }
                // Nothing else would read again for a refresh: asks about known memory answer
                // from what is known, and this process's own cache never rechecks.
                None => {
                    state.failed_in_row += 1;
                    state.refreshes != state.refreshes_answered && state.failed_in_row <= REFRESH_RETRIES
                }
            };
            // Also after a failed read: an asker told "small pages" for want of a read asks again,
            // which may queue the next one.
            self.generation.fetch_add(1, Ordering::AcqRel);
            state.not_before = Some(not_before);
            state.recheck_not_before = recheck_not_before;
            let missed = state.missed.take();
            state.looking =
                again || missed.is_some_and(|(addr, len)| !state.known.tally(addr, len, &mut Tally::default()));
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
        // Counted before the read begins: a refresh from here on may have come after the pages
        // this read sees, so the read counts as stale (`settle`).
        let refreshes_before = shared.state.lock().refreshes;
        let began = Instant::now();
        let snapshot = run_contained(ThreadKind::PageLook, || (shared.read)()).ok().flatten();
        shared.state.lock().reads += 1;
        shared.settle(Read { snapshot, refreshes_before }, began);
    }

    fn give_up(self: Box<Self>) {
        if let Some(shared) = self.shared.upgrade() {
            let refreshes_before = shared.state.lock().refreshes;
            shared.settle(Read { snapshot: None, refreshes_before }, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use testkit::PATIENCE;

    const M: usize = 1 << 20;
    const BASE: usize = 0x7f00_0000_0000;
    /// Longer than any test waits between asks that must not read again.
    const LONG: Duration = Duration::from_secs(3600);

    /// smaps text of `n` mappings of 4 MiB from `BASE`, each 8 MiB apart, the even ones on huge
    /// pages.
    fn mappings(n: usize) -> String {
        mappings_collapsed(n, 0)
    }

    /// As [`mappings`], with the odd mappings whose bit is set in `collapsed` on huge pages too.
    fn mappings_collapsed(n: usize, collapsed: u64) -> String {
        (0..n)
            .map(|i| {
                let on_huge = i % 2 == 0 || (i < 64 && collapsed & 1 << i != 0);
                let (start, huge) = (BASE + i * 8 * M, if on_huge { 4096 } else { 0 });
                format!("{start:x}-{:x} rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: {huge} kB\n", start + 4 * M)
            })
            .collect()
    }

    /// A process whose mappings a test adds to, or collapses onto huge pages in place, with a
    /// reader that counts its reads and notes when each began and ended.
    #[derive(Clone)]
    struct Process {
        mapped: Arc<AtomicUsize>,
        collapsed: Arc<AtomicU64>,
        reads: Arc<AtomicUsize>,
        spans: Arc<Mutex<Vec<(Instant, Instant)>>>,
        /// How long each read takes.
        takes: Duration,
    }

    impl Process {
        fn new(mapped: usize) -> Process {
            Process {
                mapped: Arc::new(AtomicUsize::new(mapped)),
                collapsed: Arc::new(AtomicU64::new(0)),
                reads: Arc::new(AtomicUsize::new(0)),
                spans: Arc::default(),
                takes: Duration::ZERO,
            }
        }

        /// Mapping `i` (an odd one, on small pages) now lies on huge pages, as after
        /// `MADV_COLLAPSE`: the same mappings, other counters.
        fn collapse(&self, i: usize) {
            assert!(i % 2 == 1 && i < 64, "mapping {i} cannot be collapsed");
            self.collapsed.fetch_or(1 << i, Ordering::SeqCst);
        }

        fn read(&self) -> Option<Snapshot> {
            let began = Instant::now();
            let text = mappings_collapsed(self.mapped.load(Ordering::SeqCst), self.collapsed.load(Ordering::SeqCst));
            // Counted once the pages are looked at: a change a test makes after seeing the count
            // is not in this read.
            self.reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.takes);
            self.spans.lock().push((began, Instant::now()));
            Some(Snapshot::from_text(&text))
        }

        fn cache(&self, min_gap: Duration) -> KnownMappings {
            let me = self.clone();
            KnownMappings::with_reader(min_gap, move || me.read())
        }

        fn rechecking_cache(&self, min_gap: Duration, recheck_small_after: Duration) -> KnownMappings {
            let me = self.clone();
            KnownMappings::rechecking_with_reader(min_gap, recheck_small_after, move || me.read())
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }

        /// When each read so far began and ended.
        fn spans(&self) -> Vec<(Instant, Instant)> {
            self.spans.lock().clone()
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
        let known = KnownMappings::new(false, Duration::ZERO, Some(Duration::ZERO), Box::new(move || me.read()));
        for _ in 0..3 {
            assert!(!known.on_huge_pages(mapping(0, M)));
            assert!(!known.looking(), "no read queued");
            known.refresh();
            assert!(!known.on_huge_pages(mapping(1, M)), "nor after a refresh, nor to recheck");
            assert!(!known.looking(), "no read queued");
            std::thread::sleep(Duration::from_millis(1));
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

    #[test]
    fn a_refresh_reads_again_at_once_and_sees_pages_collapsed_in_place() {
        let _reading = looker::TEST_FAULTS.read();
        let process = Process::new(2);
        let known = process.cache(Duration::from_millis(1));
        known.on_huge_pages(mapping(1, M));
        settled(&known);
        assert!(!known.on_huge_pages(mapping(1, M)), "on small pages");
        process.collapse(1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!known.on_huge_pages(mapping(1, M)), "the mapping is still known: the collapse goes unseen");
        assert_eq!(process.reads(), 1, "and no ask reads again");
        let before = known.generation();
        known.refresh();
        settled(&known);
        assert_eq!(process.reads(), 2, "the refresh read, unasked");
        assert!(known.generation() > before);
        assert!(known.on_huge_pages(mapping(1, M)), "the collapse, seen by the refresh's read");
        assert!(known.on_huge_pages(mapping(0, M)));
        assert_eq!(process.reads(), 2);
    }

    #[test]
    fn a_refresh_whose_read_fails_reads_again_by_itself_a_bounded_number_of_times() {
        let _reading = looker::TEST_FAULTS.read();
        let process = Process::new(2);
        // Reads that fail while this is above zero, counting it down.
        let failing = Arc::new(AtomicUsize::new(0));
        let known = {
            let (process, failing) = (process.clone(), failing.clone());
            KnownMappings::with_reader(Duration::from_millis(1), move || {
                let read = process.read();
                let left = failing.load(Ordering::SeqCst);
                if left == 0 {
                    return read;
                }
                failing.store(left - 1, Ordering::SeqCst);
                None
            })
        };
        known.on_huge_pages(mapping(1, M));
        settled(&known);
        assert!(!known.on_huge_pages(mapping(1, M)), "on small pages");

        process.collapse(1);
        failing.store(2, Ordering::SeqCst);
        known.refresh();
        settled(&known);
        assert_eq!(process.reads(), 4, "the refresh's read and two more after it failed twice, none asked for");
        assert!(known.on_huge_pages(mapping(1, M)), "the collapse, seen by the read that succeeded");

        // A refresh whose reads keep failing stops after its retries; what was known answers.
        failing.store(usize::MAX, Ordering::SeqCst);
        known.refresh();
        settled(&known);
        assert_eq!(process.reads(), 4 + 1 + REFRESH_RETRIES as usize);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!known.looking(), "no read is queued once the retries are spent");
        assert_eq!(process.reads(), 4 + 1 + REFRESH_RETRIES as usize);
        assert!(known.on_huge_pages(mapping(1, M)), "failed reads leave what was known");

        // A new refresh gets retries of its own.
        known.refresh();
        settled(&known);
        assert_eq!(process.reads(), 4 + 2 * (1 + REFRESH_RETRIES as usize), "the next refresh tried again as often");

        // A failure without a refresh behind it is not retried (the next ask reads again).
        failing.store(0, Ordering::SeqCst);
        known.refresh();
        settled(&known);
        let reads = process.reads();
        failing.store(1, Ordering::SeqCst);
        process.mapped.store(4, Ordering::SeqCst);
        assert!(!known.on_huge_pages(mapping(3, M)), "a new mapping: unknown, read for");
        settled(&known);
        assert_eq!(process.reads(), reads + 1, "one read, failed, and not tried again unasked");
    }

    #[test]
    fn a_refresh_answers_from_what_is_known_until_its_read_settles() {
        let _reading = looker::TEST_FAULTS.read();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let process = Process::new(2);
        let gated = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let known = {
            let (process, gated) = (process.clone(), gated.clone());
            KnownMappings::with_reader(Duration::from_millis(1), move || {
                let read = process.read();
                if gated.load(Ordering::SeqCst) {
                    let _ = gate.lock().recv_timeout(PATIENCE);
                }
                read
            })
        };
        known.on_huge_pages(mapping(0, M));
        settled(&known);
        let before = known.generation();
        gated.store(true, Ordering::SeqCst);
        process.collapse(1);
        known.refresh();
        testkit::wait_until("the refresh's read looks", PATIENCE, || process.reads() == 2);
        assert_eq!(known.generation(), before, "nothing settled yet");
        assert!(known.on_huge_pages(mapping(0, M)), "huge pages known before keep their answer meanwhile");
        assert!(!known.on_huge_pages(mapping(1, M)), "the collapse is not known yet");
        known.refresh();
        release.send(()).unwrap();
        // The second refresh came after the read began: another follows, unasked.
        testkit::wait_until("a third read", PATIENCE, || process.reads() == 3);
        release.send(()).unwrap();
        settled(&known);
        assert!(known.on_huge_pages(mapping(1, M)), "the collapse, seen");
        assert_eq!(process.reads(), 3);
    }

    #[test]
    fn a_refresh_during_a_read_under_way_reads_again_after_it() {
        let _reading = looker::TEST_FAULTS.read();
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let process = Process::new(2);
        let known = {
            let process = process.clone();
            KnownMappings::with_reader(Duration::from_millis(1), move || {
                // The pages are looked at first; the read then holds until released.
                let read = process.read();
                let _ = gate.lock().recv_timeout(PATIENCE);
                read
            })
        };
        known.on_huge_pages(mapping(1, M));
        testkit::wait_until("the first read looks", PATIENCE, || process.reads() == 1);
        // Collapsed, and told, after that read looked.
        process.collapse(1);
        known.refresh();
        release.send(()).unwrap();
        testkit::wait_until("a second read, unasked", PATIENCE, || process.reads() == 2);
        assert!(!known.on_huge_pages(mapping(1, M)), "the first read, older than the collapse, answers meanwhile");
        assert!(known.on_huge_pages(mapping(0, M)));
        release.send(()).unwrap();
        settled(&known);
        assert!(known.on_huge_pages(mapping(1, M)), "the second read saw the collapse");
        assert_eq!(process.reads(), 2);
    }

    #[test]
    fn a_refresh_with_a_read_queued_that_has_not_begun_adds_none() {
        let _reading = looker::TEST_FAULTS.read();
        let process = Process::new(2);
        let known = process.cache(Duration::from_millis(500));
        known.on_huge_pages(mapping(0, M));
        settled(&known);
        process.mapped.store(4, Ordering::SeqCst);
        assert!(!known.on_huge_pages(mapping(3, M)), "a new mapping queues a read, due after the gap");
        process.collapse(3);
        known.refresh();
        assert_eq!(process.reads(), 1, "the read has not begun");
        settled(&known);
        assert!(known.on_huge_pages(mapping(3, M)), "it began after the refresh and answers");
        assert_eq!(process.reads(), 2);
    }

    #[test]
    fn a_small_answer_older_than_the_recheck_delay_reads_again_and_sees_a_collapse() {
        let _reading = looker::TEST_FAULTS.read();
        const AFTER: Duration = Duration::from_millis(20);
        let process = Process::new(2);
        let known = process.rechecking_cache(Duration::from_millis(1), AFTER);
        known.on_huge_pages(mapping(1, M));
        settled(&known);
        process.collapse(1);
        let recheck_at = known.recheck_not_before().expect("a peer's cache rechecks");
        testkit::wait_until("the recheck is due", PATIENCE, || Instant::now() >= recheck_at);
        assert_eq!(process.reads(), 1, "no read without an ask");
        assert!(!known.on_huge_pages(mapping(1, M)), "answered from what is known, without waiting");
        testkit::wait_until("the recheck", PATIENCE, || process.reads() == 2);
        settled(&known);
        assert!(known.on_huge_pages(mapping(1, M)), "the recheck saw the collapse");
        assert_eq!(process.reads(), 2);
        let spans = process.spans();
        let rested = spans[1].0.saturating_duration_since(spans[0].1);
        assert!(rested >= AFTER, "the recheck began {rested:?} after the read before ended");
    }

    #[test]
    fn a_huge_answer_is_not_rechecked() {
        let _reading = looker::TEST_FAULTS.read();
        let process = Process::new(2);
        let known = process.rechecking_cache(Duration::from_millis(1), Duration::from_millis(5));
        known.on_huge_pages(mapping(0, M));
        settled(&known);
        let recheck_at = known.recheck_not_before().expect("a peer's cache rechecks");
        testkit::wait_until("a recheck would be due", PATIENCE, || Instant::now() >= recheck_at);
        for _ in 0..100 {
            assert!(known.on_huge_pages(mapping(0, M)));
        }
        assert!(looker::looks_settled(PATIENCE));
        assert_eq!(process.reads(), 1, "huge pages: no recheck");
        assert!(!known.on_huge_pages([mapping(0, M)[0], mapping(1, M)[0]]), "half on small pages");
        testkit::wait_until("a small answer, at the same age, rechecks", PATIENCE, || process.reads() == 2);
        settled(&known);
        assert_eq!(process.reads(), 2);
    }

    #[test]
    fn rechecks_of_memory_that_stays_small_keep_to_their_gap() {
        let _reading = looker::TEST_FAULTS.read();
        const AFTER: Duration = Duration::from_millis(30);
        const TAKES: Duration = Duration::from_millis(2);
        let process = Process { takes: TAKES, ..Process::new(2) };
        let known = process.rechecking_cache(Duration::from_millis(1), AFTER);
        let asking = Instant::now();
        let mut asks = 0;
        while process.reads() < 4 && asking.elapsed() < PATIENCE {
            assert!(!known.on_huge_pages(mapping(1, M)), "always small pages");
            asks += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        let asked_for = asking.elapsed();
        settled(&known);
        let spans = process.spans();
        assert!(spans.len() >= 4, "{} reads over {asks} asks: the rechecks came", spans.len());
        // A read takes at least `TAKES`, so each recheck waits at least a hundred times that.
        let gap = AFTER.max(TAKES * RECHECK_GAP_PER_READ);
        for (before, after) in spans.iter().zip(&spans[1..]) {
            let rested = after.0.saturating_duration_since(before.1);
            assert!(rested >= gap, "a recheck began {rested:?} after the read before ended");
        }
        let most = 1 + asked_for.as_nanos() / gap.as_nanos();
        assert!(spans.len() as u128 <= most, "{} reads over {asks} asks in {asked_for:?}", spans.len());
    }
}
