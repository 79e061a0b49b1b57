//! When the requests of a call of several vector requests go to the connection (`api.rs` builds
//! them one at a time). The first goes as soon as it is built and the caller posts its first
//! chunks itself, so its bytes move while the rest are built. The others go together once the last
//! is built: one lock take and one write of their messages; the progress thread posts their chunks.
//!
//! Once the first request's bytes move, the progress thread and the control reactor take the
//! connection lock turn after turn. A caller that waited for the lock for every request, and then
//! posted that request's chunks itself in the progress thread's place, took 11 ms to post 100,000
//! pieces in 13 requests on 32 cores, against 4 ms for one post of them all before; waiting at
//! most twice keeps the post near that while the first request still leaves early. Sending each
//! later request as soon as it was built, whenever the lock happened to be free, cost a write per
//! request (on loopback the kernel also delivers it on the caller's time): NIXL reads of 2,048
//! random 16 KiB blocks in 8 requests took 75-84 ns of the caller's CPU a block to post on the
//! 2-core VM, against 68 with the later ones together; building a request of 8,192 pieces takes
//! tens of microseconds, so holding the second one back until the last is built costs little
//! against the first request's bytes.

/// What the caller does once a request is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Take {
    /// Takes the connection lock (waiting for it) and hands over every request waiting: the
    /// call's first request, or its last.
    Wait,
    /// Builds the next request: this one waits for the last.
    Hold,
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

    /// The call's next request is built (`last`: no other follows): whether the requests waiting
    /// go now.
    pub fn built(&mut self, request: R, last: bool) -> Take {
        self.waiting.push(request);
        if self.handed == 0 && self.waiting.len() == 1 || last { Take::Wait } else { Take::Hold }
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

    /// Runs a call of `n` requests through `InTurn`; returns each turn: the request that took it
    /// and what went.
    fn turns(n: usize) -> Vec<(usize, Batch<usize>)> {
        let mut turn = InTurn::new();
        let mut out = Vec::new();
        for i in 0..n {
            if turn.built(i, i + 1 == n) == Take::Wait {
                out.push((i, turn.take()));
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
    fn the_first_request_goes_alone_and_the_rest_together_with_the_last() {
        // Twice the lock, whatever the call's length; only the first request's chunks are the
        // caller's to post.
        assert_eq!(turns(13), [(0, batch(0..1, true)), (12, batch(1..13, false))]);
        assert_eq!(turns(3), [(0, batch(0..1, true)), (2, batch(1..3, false))]);
        assert_eq!(turns(2), [(0, batch(0..1, true)), (1, batch(1..2, false))]);
        // A call of one request: it goes at once, its chunks posted by the caller.
        assert_eq!(turns(1), [(0, batch(0..1, true))]);
    }
}
