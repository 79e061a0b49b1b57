//! A cache of page-size answers about one process's memory, kept per span of its mappings, filled
//! in the background: a region lies within its mappings, so each region costs one read of smaps,
//! whichever of its ranges asks, and no asker waits for that read.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::looker::{self, Look};
use super::smaps::{Answer, unknown};
use crate::threads::{ThreadKind, run_contained};

/// Spans a cache remembers; past it the oldest goes (a peer registers few regions).
const MAX_SPANS: usize = 64;

#[derive(Debug, Default)]
struct Spans {
    answers: Vec<Answer>,
    /// A look of this cache is queued or under way. One at a time: a read of smaps answers for
    /// the span of the mappings it was asked about, which the next asks of a transfer most likely
    /// lie in, so a second look queued behind it would mostly read the same thing again.
    looking: bool,
}

impl Spans {
    fn settle(&mut self, answer: Answer) {
        if self.answers.len() >= MAX_SPANS {
            self.answers.remove(0);
        }
        self.answers.push(answer);
        self.looking = false;
    }
}

/// Answers about a process's memory (a peer's, or this one's for a region), per span of its
/// mappings.
#[derive(Debug, Default)]
pub struct KnownSpans {
    spans: Arc<Mutex<Spans>>,
}

impl KnownSpans {
    /// Whether `[addr, addr + len)` lies on huge pages, as far as is known now: a cached span
    /// holding it answers. Otherwise `read` is queued for the looker thread (unless a look of this
    /// cache is under way already) and the answer is small pages until its answer is in; what it
    /// answers is kept, a failed or panicking read as small pages for the range.
    pub fn on_huge_pages(&self, addr: usize, len: usize, read: impl FnOnce() -> Answer + Send + 'static) -> bool {
        let end = addr.saturating_add(len);
        {
            let mut spans = self.spans.lock();
            if let Some(known) = spans.answers.iter().find(|a| a.span.0 <= addr && end <= a.span.1) {
                return known.huge;
            }
            if spans.looking {
                return false;
            }
            spans.looking = true;
        }
        looker::submit(Box::new(Pending { spans: Arc::downgrade(&self.spans), addr, len, read }));
        false
    }

    /// A look of this cache is queued or under way.
    #[cfg(test)]
    pub(crate) fn looking(&self) -> bool {
        self.spans.lock().looking
    }
}

/// A look on its way to the looker thread. It holds its cache weakly: a cache dropped meanwhile
/// (its region deregistered, its peer gone) is not read for.
struct Pending<R> {
    spans: Weak<Mutex<Spans>>,
    addr: usize,
    len: usize,
    read: R,
}

impl<R: FnOnce() -> Answer + Send> Look for Pending<R> {
    fn run(self: Box<Self>) {
        let Pending { spans, addr, len, read } = *self;
        if spans.strong_count() == 0 {
            return;
        }
        let answer = run_contained(ThreadKind::PageLook, read).unwrap_or_else(|_| unknown(addr, len));
        if let Some(spans) = spans.upgrade() {
            spans.lock().settle(answer);
        }
    }

    fn give_up(self: Box<Self>) {
        if let Some(spans) = self.spans.upgrade() {
            spans.lock().settle(unknown(self.addr, self.len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use testkit::PATIENCE;

    const M: usize = 1 << 20;
    const BASE: usize = 0x7f00_0000_0000;

    fn settled(known: &KnownSpans) {
        testkit::wait_until("the look settles", PATIENCE, || !known.looking());
    }

    /// A read that counts its calls and answers `huge` for `span`.
    fn counted(reads: &Arc<AtomicUsize>, huge: bool, span: (usize, usize)) -> impl FnOnce() -> Answer + Send + 'static {
        let reads = reads.clone();
        move || {
            reads.fetch_add(1, Ordering::SeqCst);
            Answer { huge, span }
        }
    }

    #[test]
    fn the_first_ask_returns_before_the_read_and_answers_small_pages() {
        let known = KnownSpans::default();
        let (release, gate) = mpsc::channel::<()>();
        let (started, finished) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let read = {
            let (started, finished) = (started.clone(), finished.clone());
            move || {
                started.store(true, Ordering::SeqCst);
                let _ = gate.recv_timeout(PATIENCE);
                finished.store(true, Ordering::SeqCst);
                Answer { huge: true, span: (BASE, BASE + 4 * M) }
            }
        };
        assert!(!known.on_huge_pages(BASE + M, M, read), "nothing known yet: small pages");
        assert!(!finished.load(Ordering::SeqCst), "the ask did not wait for the read");
        let reads = Arc::new(AtomicUsize::new(0));
        assert!(!known.on_huge_pages(BASE + M, M, counted(&reads, false, (0, 0))), "still looking: small pages");
        assert!(known.looking());
        // The read blocks until released: the looker thread really holds it, the asker does not.
        testkit::wait_until("the look starts", PATIENCE, || started.load(Ordering::SeqCst));
        assert!(!finished.load(Ordering::SeqCst));
        release.send(()).unwrap();
        settled(&known);
        assert!(finished.load(Ordering::SeqCst));
        assert!(known.on_huge_pages(BASE, 4 * M, counted(&reads, false, (0, 0))), "the looked-up answer");
        assert_eq!(reads.load(Ordering::SeqCst), 0, "asks while a look is pending or answered start none");
    }

    #[test]
    fn concurrent_asks_start_one_look() {
        let known = Arc::new(KnownSpans::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let askers: Vec<_> = (0..8)
            .map(|i| {
                let (known, reads, gate, barrier) = (known.clone(), reads.clone(), gate.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    known.on_huge_pages(BASE + i * M, M, move || {
                        reads.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.lock().recv_timeout(PATIENCE);
                        Answer { huge: true, span: (BASE, BASE + 8 * M) }
                    })
                })
            })
            .collect();
        for asker in askers {
            assert!(!asker.join().unwrap(), "every ask before the answer says small pages");
        }
        release.send(()).unwrap();
        settled(&known);
        assert_eq!(reads.load(Ordering::SeqCst), 1, "eight concurrent asks, one look");
        let more = Arc::new(AtomicUsize::new(0));
        for i in 0..8 {
            assert!(known.on_huge_pages(BASE + i * M, M, counted(&more, false, (0, 0))), "the answer is cached");
        }
        assert_eq!(more.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failing_look_caches_small_pages() {
        let known = KnownSpans::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let gone = {
            let reads = reads.clone();
            move || {
                reads.fetch_add(1, Ordering::SeqCst);
                super::super::smaps::range_on_huge_pages(Some(u32::MAX), BASE, M)
            }
        };
        assert!(!known.on_huge_pages(BASE, M, gone));
        settled(&known);
        assert!(!known.on_huge_pages(BASE, M, counted(&reads, true, (BASE, BASE + M))), "no such process: small pages");
        assert_eq!(reads.load(Ordering::SeqCst), 1, "and that answer is kept");

        let panicking = {
            let reads = reads.clone();
            move || -> Answer {
                reads.fetch_add(1, Ordering::SeqCst);
                panic!("a read that fails hard")
            }
        };
        assert!(!known.on_huge_pages(BASE + 2 * M, M, panicking));
        settled(&known);
        assert!(!known.on_huge_pages(BASE + 2 * M, M, counted(&reads, true, (BASE, BASE + 4 * M))));
        assert_eq!(reads.load(Ordering::SeqCst), 2, "a panicking read is kept as small pages too");
        let after = Arc::new(AtomicUsize::new(0));
        assert!(!known.on_huge_pages(BASE + 8 * M, M, counted(&after, true, (BASE + 8 * M, BASE + 9 * M))));
        settled(&known);
        assert!(known.on_huge_pages(BASE + 8 * M, M, counted(&after, false, (0, 0))), "the thread went on");
        assert_eq!(after.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_span_is_read_once_and_the_cache_stays_bounded() {
        let known = KnownSpans::default();
        let reads = Arc::new(AtomicUsize::new(0));
        let ask = |addr, len, huge| {
            let answer = known.on_huge_pages(addr, len, counted(&reads, huge, (BASE, BASE + 4 * M)));
            settled(&known);
            answer
        };
        assert!(!ask(BASE + M, M, true), "the first ask only starts the look");
        assert!(ask(BASE + M, M, false), "then the looked-up answer");
        assert!(ask(BASE, 4 * M, false), "inside the known span: the cached answer");
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(!ask(BASE + 4 * M, M, true), "outside it: another look");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        for i in 0..2 * MAX_SPANS {
            known.on_huge_pages(i * 8 * M, M, move || Answer { huge: false, span: (i * 8 * M, i * 8 * M + M) });
            settled(&known);
        }
        assert_eq!(known.spans.lock().answers.len(), MAX_SPANS, "the cache stays bounded");
    }

    #[test]
    fn a_dropped_cache_is_not_read_for() {
        let (release, gate) = mpsc::channel::<()>();
        let holder = KnownSpans::default();
        holder.on_huge_pages(BASE, M, move || {
            let _ = gate.recv_timeout(PATIENCE);
            unknown(BASE, M)
        });
        let reads = Arc::new(AtomicUsize::new(0));
        let dropped = KnownSpans::default();
        dropped.on_huge_pages(BASE, M, counted(&reads, true, (BASE, BASE + M)));
        drop(dropped);
        release.send(()).unwrap();
        settled(&holder);
        assert!(looker::looks_settled(PATIENCE));
        assert_eq!(reads.load(Ordering::SeqCst), 0, "the look of a cache gone went without reading");
    }
}
