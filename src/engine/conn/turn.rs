//! When the requests of a call of several vector requests go to the connection (`api.rs` builds
//! them one at a time). The first goes as soon as it is built and the caller posts its first
//! chunks itself, so its bytes move while the rest are built. A later one goes once built if the
//! connection lock is free at that moment, else with the next request that finds it free, or with
//! the last, for which the caller waits; the progress thread posts their chunks.
//!
//! Once the first request's bytes move, the progress thread and the control reactor take the
//! connection lock turn after turn. A caller that waited for the lock for every request, and then
//! posted that request's chunks itself in the progress thread's place, took 11 ms to post 100,000
//! pieces in 13 requests on 32 cores, against 4 ms for one post of them all before; waiting at
//! most twice keeps the post near that while the first request still leaves early.

/// How the caller takes the connection lock for the requests waiting to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Wait for it: the call's first request, or its last.
    Wait,
    /// Only if it is free now; otherwise the requests wait for a later turn.
    Try,
}

/// Requests to register under the lock, in the call's order.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Batch<R> {
    pub requests: Vec<R>,
    /// The call's part the first of them is (parts count from 0 in the call's order).
    pub first_part: usize,
}

impl<R> Batch<R> {
    /// Whether the caller posts the first chunks of their flows itself, before it lets go of the
    /// lock (the call's first request only); otherwise the progress thread, woken by their
    /// queueing, does.
    pub fn post_chunks_here(&self) -> bool {
        self.first_part == 0
    }
}

/// The requests of one call built so far and not yet handed to the connection.
pub(super) struct InTurn<R> {
    waiting: Vec<R>,
    /// Requests handed to the connection so far.
    handed: usize,
}

impl<R> InTurn<R> {
    pub fn new() -> InTurn<R> {
        InTurn { waiting: Vec::new(), handed: 0 }
    }

    /// The call's next request is built (`last`: no other follows): how to take the lock for it
    /// and those still waiting.
    pub fn built(&mut self, request: R, last: bool) -> Take {
        self.waiting.push(request);
        if self.handed == 0 && self.waiting.len() == 1 || last { Take::Wait } else { Take::Try }
    }

    /// The lock is held: every waiting request goes under it.
    pub fn take(&mut self) -> Batch<R> {
        let requests = std::mem::take(&mut self.waiting);
        let first_part = self.handed;
        self.handed += requests.len();
        Batch { requests, first_part }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a call of `n` requests through `InTurn`, the lock free at the requests `free` names;
    /// returns each turn: the request that took it, how, and what went.
    fn turns(n: usize, free: &[usize]) -> Vec<(usize, Take, Batch<usize>)> {
        let mut turn = InTurn::new();
        let mut out = Vec::new();
        for i in 0..n {
            let take = turn.built(i, i + 1 == n);
            if take == Take::Wait || free.contains(&i) {
                out.push((i, take, turn.take()));
            }
        }
        out
    }

    /// The batch of `requests`, whose chunks the caller posts (`here`) or leaves to the progress
    /// thread.
    fn batch(requests: std::ops::Range<usize>, here: bool) -> Batch<usize> {
        let batch = Batch { first_part: requests.start, requests: requests.collect() };
        assert_eq!(batch.post_chunks_here(), here, "{batch:?}");
        batch
    }

    #[test]
    fn only_the_first_request_goes_with_its_chunks_posted_by_the_caller() {
        // The lock always free: every request goes once built, the caller waiting only for the
        // first and the last, and posting only the first request's chunks.
        let all: Vec<usize> = (0..13).collect();
        let got = turns(13, &all);
        assert_eq!(got.len(), 13);
        for (i, (at, take, went)) in got.into_iter().enumerate() {
            let expected = if i == 0 || i == 12 { Take::Wait } else { Take::Try };
            assert_eq!((at, take), (i, expected));
            assert_eq!(went, batch(i..i + 1, i == 0), "request {i}");
        }
    }

    #[test]
    fn requests_that_find_the_lock_taken_go_with_a_later_one_in_order() {
        // Never free after the first: the caller waits twice, whatever the call's length.
        assert_eq!(turns(13, &[]), [(0, Take::Wait, batch(0..1, true)), (12, Take::Wait, batch(1..13, false))]);
        // Free at request 4 only: 1..=4 go then, the rest with the last.
        let got = turns(8, &[4]);
        assert_eq!(
            got,
            [
                (0, Take::Wait, batch(0..1, true)),
                (4, Take::Try, batch(1..5, false)),
                (7, Take::Wait, batch(5..8, false))
            ]
        );
        // The first request found the lock busy and waited for it: it still posts its chunks itself.
        assert_eq!(turns(1, &[]), [(0, Take::Wait, batch(0..1, true))]);
        assert_eq!(turns(2, &[]), [(0, Take::Wait, batch(0..1, true)), (1, Take::Wait, batch(1..2, false))]);
    }
}
