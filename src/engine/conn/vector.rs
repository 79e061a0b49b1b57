//! Which items of a one-sided call travel together. Consecutive items between the same local region
//! and the same remote region (a run) become one vector request: one request, one grant or deny,
//! one flow and one Done for all of them, instead of a request and a flow each. A run too short to
//! gain from that keeps the per-item path, where small items ride the control stream inline.
//!
//! The grouper sees each item once, as the call's items are checked, and keeps nothing per item: a
//! call of 100,000 items yields a handful of parts.

use std::ops::Range;

use crate::proto::{INLINE_LEN_FLOOR, MAX_VECTOR_BYTES, MAX_VECTOR_SEGMENTS};

/// A run of at most this many items whose bytes fit one inline message goes item by item: that is
/// one round trip on the control stream, where a vector takes a request, a grant and a channel
/// hop. Beyond it the per-item messages cost more than the hop.
const INLINE_RUN: usize = 16;

/// Segments this end puts in one vector request (the protocol allows `MAX_VECTOR_SEGMENTS`). A
/// longer run goes as several requests, each its own flow, so the target grants the first (a 96 KiB
/// frame to read, decode and authorize) and its data moves while the target still works through
/// the next: with one request of 65536 segments, 100,000 blocks of 4 KiB moved at 0.55 of the same
/// bytes in one piece on 32 cores, the target holding the first grant back for the whole list.
pub(super) const REQUEST_SEGMENTS: usize = 8192;
const _: () = assert!(REQUEST_SEGMENTS <= MAX_VECTOR_SEGMENTS);

/// What items of one run share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunKey {
    pub local_region: u64,
    pub remote_region: u64,
    pub token: u64,
}

/// A finished run: items `items` of the call, sent as one vector request or item by item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub items: Range<usize>,
    pub vector: bool,
}

/// What adding an item did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Push {
    /// The item joined the current run.
    Joined,
    /// The item starts a new run; the one before it, if any, is finished.
    Started(Option<Run>),
}

/// Cuts a call's items into requests as they come: maximal runs of items sharing a key, each split
/// at `REQUEST_SEGMENTS` items and at the protocol's byte limit. It keeps nothing per item.
#[derive(Default)]
pub(super) struct Grouper {
    key: Option<RunKey>,
    start: usize,
    next: usize,
    bytes: u64,
}

impl Grouper {
    /// Adds the next item.
    pub fn push(&mut self, key: RunKey, len: u64) -> Push {
        let fits = self.key == Some(key)
            && self.next - self.start < REQUEST_SEGMENTS
            && self.bytes.saturating_add(len) <= MAX_VECTOR_BYTES;
        let push = if fits {
            Push::Joined
        } else {
            let finished = self.run();
            self.key = Some(key);
            self.start = self.next;
            self.bytes = 0;
            Push::Started(finished)
        };
        self.bytes = self.bytes.saturating_add(len);
        self.next += 1;
        push
    }

    /// The last run, once every item was added.
    pub fn finish(self) -> Option<Run> {
        self.run()
    }

    fn run(&self) -> Option<Run> {
        let items = self.start..self.next;
        let vector = items.len() >= 2 && (self.bytes > INLINE_LEN_FLOOR as u64 || items.len() > INLINE_RUN);
        (!items.is_empty()).then_some(Run { items, vector })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(local: u64, remote: u64) -> RunKey {
        RunKey { local_region: local, remote_region: remote, token: 7 }
    }

    /// The runs of items given as `(local, remote, len)`.
    fn runs(items: &[(u64, u64, u64)]) -> Vec<Run> {
        let mut g = Grouper::default();
        let mut out = Vec::new();
        for &(l, r, len) in items {
            if let Push::Started(Some(run)) = g.push(key(l, r), len) {
                out.push(run);
            }
        }
        out.extend(g.finish());
        out
    }

    fn vector(items: Range<usize>) -> Run {
        Run { items, vector: true }
    }

    fn single(i: usize) -> Run {
        Run { items: i..i + 1, vector: false }
    }

    #[test]
    fn runs_of_shared_regions_become_vectors_and_short_small_runs_stay_single() {
        let big = 64 << 10;
        let got = runs(&[(0, 5, big), (0, 5, 1), (1, 5, big), (1, 5, big), (1, 6, 8), (1, 6, 8)]);
        assert_eq!(got, [vector(0..2), vector(2..4), Run { items: 4..6, vector: false }]);
        assert_eq!(runs(&vec![(2, 1, 8); INLINE_RUN + 1]), [vector(0..INLINE_RUN + 1)]);
        assert_eq!(runs(&vec![(2, 1, 8); INLINE_RUN]), [Run { items: 0..INLINE_RUN, vector: false }]);
        assert_eq!(runs(&[(0, 1, 1 << 20)]), [single(0)]);
        assert!(runs(&[]).is_empty());
        // The token is part of the key: another capability of the same region is another run.
        let mut g = Grouper::default();
        assert_eq!((g.push(key(0, 1), big), g.push(key(0, 1), big)), (Push::Started(None), Push::Joined));
        assert_eq!(g.push(RunKey { token: 8, ..key(0, 1) }, big), Push::Started(Some(vector(0..2))));
    }

    #[test]
    fn vectors_respect_the_segment_and_byte_limits() {
        let (r, n) = (REQUEST_SEGMENTS, 2 * REQUEST_SEGMENTS + 20);
        assert_eq!(runs(&vec![(0, 1, 4096); n]), [vector(0..r), vector(r..2 * r), vector(2 * r..n)]);
        let quarter = MAX_VECTOR_BYTES / 4;
        assert_eq!(runs(&[(0, 1, quarter); 6]), [vector(0..4), vector(4..6)]);
        let got = runs(&[(0, 1, MAX_VECTOR_BYTES + 1), (0, 1, 8), (0, 1, u64::MAX)]);
        assert_eq!(got, [single(0), single(1), single(2)], "an oversized item goes alone");
    }
}
