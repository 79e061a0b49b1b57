//! Transfer ids handed to callers. An id names one call (a vector call is one id over several
//! parts); it is reported finished exactly once, after which it is unknown. Parts finish only when
//! no transport still touches their memory, so a reported failure frees the caller's buffers too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::stats::{StatsCell, Way};
use crate::error::{Error, Result};

pub struct Transfer {
    pub id: u64,
    conn: u64,
    state: Mutex<Progress>,
    finished: Condvar,
    /// The call's parts; when every one ends with the peer's message on the control stream, a
    /// waiting caller may read that stream itself (`answers`).
    parts: usize,
    /// Parts registered as ending with the peer's answer (a call posted in turns registers its
    /// parts in several goes), and whether some of them are answered only after their chunks.
    answered_parts: AtomicUsize,
    after_data: AtomicBool,
    /// Registered parts whose answer was not handled yet.
    unanswered: AtomicUsize,
    /// Parts registered as ending on their own chunks with no message from the peer (reads over
    /// the channels).
    chunk_parts: AtomicUsize,
    /// The callers parked until the transfer finished (`park_until_finished`): every one, so that
    /// two threads waiting on one transfer both wake at its end.
    parked: Mutex<Vec<std::thread::Thread>>,
    /// The engine's count of callers' waits that ran out their slice (`TransferTable::run_out`).
    run_out: Arc<AtomicU64>,
}

/// How the parts of a transfer end, as far as a waiting caller is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answers {
    /// Some part ends without a message from the peer (a read's chunks, a receive): the caller
    /// waits to be told.
    Elsewhere,
    /// Every part is answered on the control stream promptly (inline transfers): the caller polls
    /// the stream for the spin time before it blocks on it.
    Inline,
    /// Every part is answered on the control stream, some only after their chunks landed (writes
    /// over the channels): the caller blocks on the stream at once, and the peer's answer wakes it
    /// where a reactor thread's read and a hand-over to the caller would cost two wake-ups.
    AfterData,
}

struct Progress {
    remaining: usize,
    bytes: u64,
    error: Option<Error>,
    /// The connection counters the transfer reports to when it ends (taken then, so once).
    counted: Option<Counted>,
}

/// Where a transfer is counted: its connection's counters and the way its bytes go.
pub struct Counted {
    pub stats: Arc<StatsCell>,
    pub way: Way,
}

impl Transfer {
    pub fn finish_part(&self, outcome: Result<u64>) {
        let mut p = self.state.lock();
        debug_assert!(p.remaining > 0);
        match outcome {
            Ok(bytes) => p.bytes += bytes,
            Err(e) => {
                p.error.get_or_insert(e);
            }
        }
        p.remaining = p.remaining.saturating_sub(1);
        if p.remaining == 0 {
            if let Some(Counted { stats, way }) = p.counted.take() {
                stats.ended(way, p.error.as_ref().map_or(Ok(p.bytes), Err));
            }
            self.finished.notify_all();
            for t in std::mem::take(&mut *self.parked.lock()) {
                t.unpark();
            }
        }
    }

    /// `n` parts being posted end with the peer's answer on the control stream, some only after
    /// their chunks landed when `after_data`. Called under the connection lock before their
    /// requests leave, so no answer is handled before it is expected.
    pub fn expect_answers(&self, n: usize, after_data: bool) {
        if after_data {
            self.after_data.store(true, Ordering::Release);
        }
        self.unanswered.fetch_add(n, Ordering::AcqRel);
        self.answered_parts.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` parts being posted end on their own chunks, with no message from the peer at their end.
    pub fn expect_chunk_ends(&self, n: usize) {
        self.chunk_parts.fetch_add(n, Ordering::AcqRel);
    }

    /// Every part ends on its own chunks (a read over the channels): a waiting caller may test its
    /// connection itself.
    pub fn ends_on_chunks(&self) -> bool {
        self.chunk_parts.load(Ordering::Acquire) == self.parts
    }

    pub fn completes_on_control(&self) -> bool {
        self.answers() != Answers::Elsewhere
    }

    pub fn answers(&self) -> Answers {
        if self.answered_parts.load(Ordering::Acquire) != self.parts {
            Answers::Elsewhere
        } else if self.after_data.load(Ordering::Acquire) {
            Answers::AfterData
        } else {
            Answers::Inline
        }
    }

    /// The peer's answer for one part was handled (the part may still wait for its own chunks).
    pub fn answered(&self) {
        let _ = self.unanswered.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether a part still waits for an answer on the control stream: only then does reading the
    /// stream bring the transfer closer to its end.
    pub fn awaits_answer(&self) -> bool {
        self.completes_on_control() && self.unanswered.load(Ordering::Acquire) > 0
    }

    /// Parks the calling thread for at most `limit`, or until the transfer finished (whoever
    /// finishes it unparks the thread) or anything else unparks it. True when it waited out all of
    /// `limit` and the transfer is still in progress.
    pub fn park_until_finished(&self, limit: Duration) -> bool {
        let me = std::thread::current();
        let id = me.id();
        self.parked.lock().push(me);
        let start = Instant::now();
        if !self.is_finished() {
            std::thread::park_timeout(limit);
        }
        self.parked.lock().retain(|t| t.id() != id);
        !self.is_finished() && start.elapsed() >= limit
    }

    /// A caller's wait for this transfer (a slice of it: a park, a blocking read of the control
    /// stream) ran out with nothing that ends it: counted, because a wake-up or a hand-over that
    /// was lost shows as such waits, which tests look for by the count instead of by the time.
    pub fn slice_ran_out(&self) {
        self.run_out.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().remaining == 0
    }

    /// `None` while parts are outstanding, else the byte count or the first error.
    fn outcome(&self) -> Option<Result<u64>> {
        let p = self.state.lock();
        (p.remaining == 0).then(|| p.error.clone().map_or(Ok(p.bytes), Err))
    }

    fn wait(&self, timeout: Duration) -> bool {
        let mut p = self.state.lock();
        if p.remaining > 0 {
            let timed_out = self.finished.wait_for(&mut p, timeout).timed_out();
            if timed_out && p.remaining > 0 {
                self.slice_ran_out();
            }
        }
        p.remaining == 0
    }
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer").field("id", &self.id).finish_non_exhaustive()
    }
}

#[derive(Default)]
pub struct TransferTable {
    live: Mutex<HashMap<u64, Arc<Transfer>>>,
    next_id: AtomicU64,
    /// Callers' waits on this engine's transfers that ran out their slice (`Transfer::slice_ran_out`).
    run_out: Arc<AtomicU64>,
}

impl TransferTable {
    /// A transfer of `parts` parts on connection `conn`, reported to `counted` when it ends.
    /// Callers' waits that ran out their slice so far (`Transfer::slice_ran_out`).
    pub fn slices_run_out(&self) -> u64 {
        self.run_out.load(Ordering::Relaxed)
    }

    pub fn create(&self, conn: u64, parts: usize, counted: Option<Counted>) -> Arc<Transfer> {
        debug_assert!(parts > 0, "a transfer of no parts would never end");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(c) = &counted {
            c.stats.started();
        }
        let t = Arc::new(Transfer {
            id,
            conn,
            state: Mutex::new(Progress { remaining: parts, bytes: 0, error: None, counted }),
            finished: Condvar::new(),
            parts,
            answered_parts: AtomicUsize::new(0),
            after_data: AtomicBool::new(false),
            unanswered: AtomicUsize::new(0),
            chunk_parts: AtomicUsize::new(0),
            parked: Mutex::default(),
            run_out: self.run_out.clone(),
        });
        self.live.lock().insert(id, t.clone());
        t
    }

    /// Forgets a transfer that never reached the wire: its post failed with `why`.
    pub fn discard(&self, id: u64, why: &Error) {
        let Some(t) = self.live.lock().remove(&id) else { return };
        if let Some(Counted { stats, way }) = t.state.lock().counted.take() {
            stats.ended(way, Err(why));
        }
    }

    /// Drops the caller's claim on a transfer: it runs to its end (or its connection's failure)
    /// unobserved, and its id is unknown from now on. False if the id was not known here.
    pub fn forget(&self, conn: u64, id: u64) -> bool {
        let mut live = self.live.lock();
        match live.get(&id) {
            Some(t) if t.conn == conn => live.remove(&id).is_some(),
            _ => false,
        }
    }

    /// `Ok(None)` in progress; `Ok(Some(bytes))` or `Err` once, then the id is gone.
    pub fn poll(&self, conn: u64, id: u64) -> Result<Option<u64>> {
        let mut live = self.live.lock();
        let t = match live.get(&id) {
            Some(t) if t.conn == conn => t.clone(),
            _ => return Err(unknown(id)),
        };
        let outcome = t.outcome();
        if outcome.is_some() {
            live.remove(&id);
        }
        outcome.transpose()
    }

    pub fn get(&self, conn: u64, id: u64) -> Result<Arc<Transfer>> {
        match self.live.lock().get(&id) {
            Some(t) if t.conn == conn => Ok(t.clone()),
            _ => Err(unknown(id)),
        }
    }

    /// Blocks until the transfer finished (the connection failing finishes it too), then polls it.
    pub fn wait(&self, conn: u64, id: u64) -> Result<u64> {
        let t = self.get(conn, id)?;
        while !t.wait(Duration::from_millis(100)) {}
        self.poll(conn, id)?.ok_or_else(|| Error::backend("transfer finished but has no outcome"))
    }
}

fn unknown(id: u64) -> Error {
    Error::not_found(format!(
        "transfer id {id} is unknown on this connection (never issued here, or already reported finished)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UcclStatus;

    #[test]
    fn reports_once_then_unknown() {
        let t = TransferTable::default();
        let x = t.create(7, 2, None);
        assert_eq!(t.poll(7, x.id).unwrap(), None);
        x.finish_part(Ok(10));
        assert_eq!(t.poll(7, x.id).unwrap(), None);
        x.finish_part(Ok(5));
        assert_eq!(t.poll(8, x.id).unwrap_err().status(), UcclStatus::ErrNotFound, "other connection");
        assert_eq!(t.poll(7, x.id).unwrap(), Some(15));
        assert_eq!(t.poll(7, x.id).unwrap_err().status(), UcclStatus::ErrNotFound);
        assert_eq!(t.poll(7, 12345).unwrap_err().status(), UcclStatus::ErrNotFound);
    }

    #[test]
    fn a_counted_transfer_reports_to_its_connection_once_when_its_last_part_ends() {
        let t = TransferTable::default();
        let stats = Arc::new(StatsCell::default());
        let counted = |way| Some(Counted { stats: stats.clone(), way });
        let write = t.create(1, 2, counted(Way::Out));
        let read = t.create(1, 1, counted(Way::In));
        let refused = t.create(1, 1, counted(Way::Out));
        assert_eq!(stats.snapshot().in_flight, 3);
        write.finish_part(Ok(10));
        assert_eq!(stats.snapshot().out.transfers, 0, "one part of two ended");
        write.finish_part(Ok(5));
        read.finish_part(Err(Error::disconnected("peer gone")));
        let refused_why = Error::disconnected("the connection failed before the request left");
        t.discard(refused.id, &refused_why);
        t.discard(refused.id, &refused_why);
        let s = stats.snapshot();
        assert_eq!((s.out.transfers, s.out.bytes, s.inbound.transfers), (1, 15, 0));
        assert_eq!((s.in_flight, s.failed, s.errors[10]), (0, 2, 2), "each counted once");
    }

    #[test]
    fn first_error_wins_after_all_parts() {
        let t = TransferTable::default();
        let x = t.create(1, 3, None);
        x.finish_part(Err(Error::not_allowed("first")));
        x.finish_part(Err(Error::backend("second")));
        assert_eq!(t.poll(1, x.id).unwrap(), None, "a part is still outstanding");
        x.finish_part(Ok(1));
        let err = t.poll(1, x.id).unwrap_err();
        assert_eq!((err.status(), err.message()), (UcclStatus::ErrNotAllowed, "first"));
    }

    #[test]
    fn wait_wakes_on_completion() {
        let t = Arc::new(TransferTable::default());
        let x = t.create(1, 1, None);
        let id = x.id;
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            x.finish_part(Ok(3));
        });
        assert_eq!(t.wait(1, id).unwrap(), 3);
        h.join().unwrap();
    }

    /// A caller parked on a transfer is unparked by whoever finishes its last part, never by its
    /// limit (a park that ran out says so, and counts); once finished, it does not park at all.
    #[test]
    fn a_parked_caller_wakes_when_the_last_part_finishes() {
        let t = TransferTable::default();
        let x = t.create(1, 2, None);
        // Waits that nothing ends run out, and say so (the table counts them).
        assert!(x.park_until_finished(Duration::from_millis(1)), "a park nothing ended");
        x.slice_ran_out();
        assert!(!x.wait(Duration::from_millis(1)), "a wait nothing ended");
        assert_eq!(t.slices_run_out(), 2, "the ran-out slice and the wait, not the park itself");
        x.finish_part(Ok(1));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                x.finish_part(Ok(2));
            });
            while !x.is_finished() {
                assert!(!x.park_until_finished(Duration::from_secs(20)), "woken by the limit, not the finish");
            }
        });
        // A park of a finished transfer that waited would outlast the test's patience.
        let finished = x.clone();
        testkit::within(testkit::PATIENCE, "a park of a finished transfer", move || {
            finished.park_until_finished(Duration::from_secs(3600))
        });
        assert_eq!(t.poll(1, x.id).unwrap(), Some(3));
        assert_eq!(t.slices_run_out(), 2, "no wait ran out once the finish woke it");
    }

    /// Two callers parked on one transfer both wake when it finishes, long before their limit.
    #[test]
    fn every_caller_parked_on_a_transfer_wakes_at_its_end() {
        let t = TransferTable::default();
        let x = t.create(1, 1, None);
        let parking = std::sync::atomic::AtomicUsize::new(0);
        let waited = std::thread::scope(|s| {
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        parking.fetch_add(1, Ordering::SeqCst);
                        let mut ran_out = 0;
                        while !x.is_finished() {
                            ran_out += usize::from(x.park_until_finished(Duration::from_secs(20)));
                        }
                        ran_out
                    })
                })
                .collect();
            testkit::wait_until("both callers park", testkit::PATIENCE, || parking.load(Ordering::SeqCst) == 2);
            // Both are parked by now unless the machine is very slow; a late one finds it finished.
            std::thread::sleep(Duration::from_millis(30));
            x.finish_part(Ok(1));
            waiters.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
        });
        assert_eq!(waited, [0, 0], "parks that ran out their limit: woken by the limit, not the finish");
    }

    /// Which parts end how is counted as they are posted, possibly in several goes.
    #[test]
    fn answers_and_chunk_ends_are_counted_per_part() {
        let t = TransferTable::default();
        let x = t.create(1, 3, None);
        x.expect_answers(2, false);
        assert_eq!(x.answers(), Answers::Elsewhere, "two parts of three");
        x.expect_answers(1, true);
        assert_eq!(x.answers(), Answers::AfterData);
        assert!(!x.ends_on_chunks());
        x.answered();
        x.answered();
        assert!(x.awaits_answer());
        x.answered();
        assert!(!x.awaits_answer());
        x.answered();
        assert!(!x.awaits_answer(), "an answer too many does not wrap around");
        let r = t.create(1, 2, None);
        r.expect_chunk_ends(1);
        assert!(!r.ends_on_chunks());
        r.expect_chunk_ends(1);
        assert!(r.ends_on_chunks() && !r.completes_on_control() && !r.awaits_answer());
        let inline = t.create(1, 1, None);
        inline.expect_answers(1, false);
        assert_eq!(inline.answers(), Answers::Inline);
    }
}
