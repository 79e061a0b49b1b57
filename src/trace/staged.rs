//! What a staged comm keeps while its chunks are traced: its number and the ids of its chunks, and
//! how the engine's calls visited it (`Event::StageCalls`), counted in place, since the progress
//! thread may test a comm every microsecond and an event per call would drown the rest; the comm
//! emits the counts each time a chunk of it ends.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Event, STAGING, StageMark, clock_ns, event, next_id, on, record};

static NEXT_COMM: AtomicU64 = AtomicU64::new(0);

/// A staged comm's part of the trace; exists only while staging is traced.
pub struct StagedComm {
    comm: u64,
    send: bool,
    clock: CallClock,
}

/// A staged chunk's ids in its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedChunk {
    comm: u64,
    chunk: u64,
}

impl StagedComm {
    /// A send (or receive) comm's tracer, while staging is traced.
    pub fn new(send: bool) -> Option<StagedComm> {
        on(STAGING).then(|| StagedComm { comm: NEXT_COMM.fetch_add(1, Relaxed), send, clock: CallClock::default() })
    }

    /// A chunk of `len` bytes was accepted just now; `staged`: it goes through a pinned slot.
    pub fn posted(&mut self, len: usize, staged: bool) -> StagedChunk {
        let chunk = StagedChunk { comm: self.comm, chunk: next_id() };
        let (send, bytes, staged) = (u64::from(self.send), len as u64, u64::from(staged));
        event!(StageChunk { comm: self.comm, chunk: chunk.chunk, send, bytes, staged });
        chunk
    }

    /// A call from the engine begins (`test`: a test call); returns its start.
    pub fn enter(&mut self, test: bool) -> u64 {
        self.clock.enter(test)
    }

    pub fn exit(&mut self, entered: u64) {
        self.clock.exit(entered);
    }

    /// The chunk was reported done to the engine just now.
    pub fn reported(&mut self, chunk: StagedChunk) {
        chunk.mark(StageMark::Reported);
        if on(STAGING) {
            record(self.clock.take(self.comm));
        }
    }
}

impl StagedChunk {
    /// The chunk reached `step` just now.
    pub fn mark(&self, step: StageMark) {
        event!(StageStep { comm: self.comm, chunk: self.chunk, step: step as u64 });
    }

    /// Its copy was queued as `parts` copies, which took since `started`.
    pub fn issued(&self, started: u64, parts: usize) {
        let issue_ns = clock_ns().saturating_sub(started);
        event!(StageIssue { comm: self.comm, chunk: self.chunk, issue_ns, parts: parts as u64 });
    }
}

/// Bounds of the gaps between consecutive test calls, in microseconds.
const GAP_BOUNDS_US: [u64; 4] = [5, 20, 100, 1000];

#[derive(Clone, Copy, Debug, Default)]
pub struct CallClock {
    last_test: u64,
    tests: u64,
    max_gap_ns: u64,
    gaps: [u64; GAP_BOUNDS_US.len() + 1],
    busy_ns: u64,
    max_call_ns: u64,
}

impl CallClock {
    /// A call begins; `test` calls measure the gaps between progress passes. Returns its start.
    pub fn enter(&mut self, test: bool) -> u64 {
        let now = clock_ns();
        if test {
            if self.last_test != 0 {
                let gap = now.saturating_sub(self.last_test);
                self.max_gap_ns = self.max_gap_ns.max(gap);
                let bucket = GAP_BOUNDS_US.iter().position(|&b| gap < b * 1000).unwrap_or(GAP_BOUNDS_US.len());
                self.gaps[bucket] += 1;
            }
            self.last_test = now;
            self.tests += 1;
        }
        now
    }

    /// The call that began at `entered` ends.
    pub fn exit(&mut self, entered: u64) {
        let took = clock_ns().saturating_sub(entered);
        self.busy_ns += took;
        self.max_call_ns = self.max_call_ns.max(took);
    }

    /// The counts since the last take, as comm `comm`'s event; counting starts over (the gap to
    /// the next test still counts).
    pub fn take(&mut self, comm: u64) -> Event {
        let c = std::mem::replace(self, CallClock { last_test: self.last_test, ..CallClock::default() });
        Event::StageCalls {
            comm,
            tests: c.tests,
            busy_ns: c.busy_ns,
            max_gap_ns: c.max_gap_ns,
            max_call_ns: c.max_call_ns,
            gaps_5: c.gaps[0],
            gaps_20: c.gaps[1],
            gaps_100: c.gaps[2],
            gaps_1000: c.gaps[3],
            gaps_more: c.gaps[4],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_are_counted_with_their_gaps_and_counting_starts_over() {
        let mut c = CallClock::default();
        let t = c.enter(true);
        c.exit(t);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let t = c.enter(true);
        c.exit(t);
        let t = c.enter(false);
        c.exit(t);
        let Event::StageCalls { comm, tests, max_gap_ns, gaps_more, gaps_5, .. } = c.take(7) else { unreachable!() };
        assert_eq!((comm, tests, gaps_more, gaps_5), (7, 2, 1, 0), "one gap past 1 ms");
        assert!(max_gap_ns >= 2_000_000);
        let Event::StageCalls { tests, busy_ns, .. } = c.take(7) else { unreachable!() };
        assert_eq!((tests, busy_ns), (0, 0));
    }
}
