//! Which items of a one-sided call travel together. Consecutive items between the same local region
//! and the same remote region (a run) become one vector request: one request, one grant or deny,
//! one flow and one Done for all of them, instead of a request and a flow each. A run too short to
//! gain from that keeps the per-item path, where small items ride the control stream inline.
//!
//! The grouper sees each item once, as the call's items are checked, and keeps nothing per item: a
//! call of 100,000 items yields a handful of parts.
//!
//! Where the network is the call's one path, consecutive runs of different regions then go
//! together as one vector over several regions (`requests`): a serving stack's request names every
//! layer's K and V region (64 to 188), and a request and a flow per region made the per-region
//! work, not the bytes, set a transfer's time.

use std::ops::Range;

use crate::proto::{INLINE_LEN_FLOOR, MAX_VECTOR_BYTES, MAX_VECTOR_RUNS, MAX_VECTOR_SEGMENTS};

/// A run of at most this many items whose bytes fit one inline message goes item by item: that is
/// one round trip on the control stream, where a vector takes a request, a grant and a channel
/// hop. Beyond it the per-item messages cost more than the hop.
const INLINE_RUN: usize = 16;

/// Segments this end puts in one vector request (the protocol allows `MAX_VECTOR_SEGMENTS`). A
/// longer run goes as several requests, each its own flow, so the target grants the first (a
/// 33-65 KiB frame to read, decode and authorize) and its data moves while the target still works
/// through the next: with one request of 65536 segments, 100,000 blocks of 4 KiB moved at 0.55 of
/// the same bytes in one piece on 32 cores, the target holding the first grant back for the whole
/// list.
pub(super) const REQUEST_SEGMENTS: usize = 8192;
const _: () = assert!(REQUEST_SEGMENTS <= MAX_VECTOR_SEGMENTS);

/// What items of one run share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunKey {
    pub local_region: u64,
    pub remote_region: u64,
    pub token: u64,
}

/// A finished run: items `items` of the call (`bytes` in all), sent as one vector request or item
/// by item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub items: Range<usize>,
    pub bytes: u64,
    pub vector: bool,
}

/// The call's requests as ranges of its runs: with `spans`, consecutive runs go together while one
/// request's limits allow (segments, bytes, runs) and their regions lie where the first run's do
/// (`P`: the local and the remote region's places; one transport request moves one place's
/// memory); a group of several runs is one vector over several regions. Runs of one item each go
/// too: blocks handed over in an order that alternates between regions (100,000 blocks of 512 B
/// over 64 regions) went as a request per block, at 0.02 of one piece. A group that is no vector as
/// a whole (a few items small enough to go inline) goes run by run, as without `spans`.
pub(super) fn requests<R, P: PartialEq>(runs: &[R], run: impl Fn(&R) -> (&Run, P), spans: bool) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < runs.len() {
        let (first, place) = run(&runs[start]);
        let (mut end, mut items, mut bytes) = (start + 1, first.items.len(), first.bytes);
        while spans && end < runs.len() && end - start < MAX_VECTOR_RUNS {
            let (next, next_place) = run(&runs[end]);
            let fits = next_place == place
                && items + next.items.len() <= REQUEST_SEGMENTS
                && bytes.saturating_add(next.bytes) <= MAX_VECTOR_BYTES;
            if !fits {
                break;
            }
            items += next.items.len();
            bytes += next.bytes;
            end += 1;
        }
        if end - start > 1 && !is_vector(items, bytes) {
            out.extend((start..end).map(|r| r..r + 1));
        } else {
            out.push(start..end);
        }
        start = end;
    }
    out
}

/// Whether `items` items of `bytes` in all go as one vector request rather than one by one.
fn is_vector(items: usize, bytes: u64) -> bool {
    items >= 2 && (bytes > INLINE_LEN_FLOOR as u64 || items > INLINE_RUN)
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
        let vector = is_vector(items.len(), self.bytes);
        (!items.is_empty()).then_some(Run { vector, items, bytes: self.bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(local: u64, remote: u64) -> RunKey {
        RunKey { local_region: local, remote_region: remote, token: 7 }
    }

    /// The runs of items given as `(local, remote, len)`.
    fn full_runs(items: &[(u64, u64, u64)]) -> Vec<Run> {
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

    /// The same, each run as its items and whether it is a vector.
    fn runs(items: &[(u64, u64, u64)]) -> Vec<(Range<usize>, bool)> {
        full_runs(items).into_iter().map(|r| (r.items, r.vector)).collect()
    }

    fn vector(items: Range<usize>) -> (Range<usize>, bool) {
        (items, true)
    }

    fn single(i: usize) -> (Range<usize>, bool) {
        (i..i + 1, false)
    }

    #[test]
    fn runs_of_shared_regions_become_vectors_and_short_small_runs_stay_single() {
        let big = 64 << 10;
        let got = runs(&[(0, 5, big), (0, 5, 1), (1, 5, big), (1, 5, big), (1, 6, 8), (1, 6, 8)]);
        assert_eq!(got, [vector(0..2), vector(2..4), (4..6, false)]);
        assert_eq!(runs(&vec![(2, 1, 8); INLINE_RUN + 1]), [vector(0..INLINE_RUN + 1)]);
        assert_eq!(runs(&vec![(2, 1, 8); INLINE_RUN]), [(0..INLINE_RUN, false)]);
        assert_eq!(runs(&[(0, 1, 1 << 20)]), [single(0)]);
        assert!(runs(&[]).is_empty());
        // The token is part of the key: another capability of the same region is another run.
        let mut g = Grouper::default();
        assert_eq!((g.push(key(0, 1), big), g.push(key(0, 1), big)), (Push::Started(None), Push::Joined));
        let pushed = g.push(RunKey { token: 8, ..key(0, 1) }, big);
        assert_eq!(pushed, Push::Started(Some(Run { items: 0..2, bytes: 2 * big, vector: true })));
    }

    #[test]
    fn runs_of_many_regions_go_as_one_request_where_the_network_is_the_path() {
        // 160 regions x 50 blocks of 16 KiB, region-major, as a serving stack's block table.
        let kv: Vec<_> = (0..160u64).flat_map(|r| (0..50).map(move |_| (r, r + 1000, 16 << 10))).collect();
        let all = full_runs(&kv);
        assert_eq!(all.len(), 160);
        assert_eq!(requests(&all, |r| (r, ()), true), vec![0..160usize], "one request for the whole call");
        assert_eq!(
            requests(&all, |r| (r, ()), false),
            (0..160).map(|i| i..i + 1).collect::<Vec<_>>(),
            "a request per region"
        );
        // The request limits cut: 8 regions of 2,000 blocks make requests of at most 8,192 segments.
        let wide: Vec<_> = (0..8u64).flat_map(|r| (0..2000).map(move |_| (r, r, 4096))).collect();
        assert_eq!(requests(&full_runs(&wide), |r| (r, ()), true), [0..4, 4..8]);
        // Single items and small ones join the request of the runs beside them, one 8 B item
        // next to another keeps its own (inline, one round trip each, no flow).
        let small = [(0, 0, 8), (1, 1, 8), (2, 2, 1 << 20), (3, 3, 64 << 10), (3, 3, 64 << 10)];
        assert_eq!(requests(&full_runs(&small), |r| (r, ()), true), vec![0..4usize]);
        assert_eq!(requests(&full_runs(&small[..2]), |r| (r, ()), true), [0..1, 1..2]);
        assert_eq!(requests(&full_runs(&small), |r| (r, ()), false), [0..1, 1..2, 2..3, 3..4]);
        // Blocks alternating between regions: runs of one block, MAX_VECTOR_RUNS a request.
        let mixed: Vec<_> = (0..10_000u64).map(|i| (i * 7 % 64, i * 7 % 64 + 100, 512)).collect();
        let mixed_runs = full_runs(&mixed);
        assert_eq!(mixed_runs.len(), 10_000);
        let got = requests(&mixed_runs, |r| (r, ()), true);
        assert_eq!(got, [0..MAX_VECTOR_RUNS, MAX_VECTOR_RUNS..2 * MAX_VECTOR_RUNS, 2 * MAX_VECTOR_RUNS..10_000]);
        // An item beyond a vector's bytes goes alone.
        let huge = [(0, 0, 64 << 10), (1, 1, MAX_VECTOR_BYTES + 1), (2, 2, 64 << 10), (3, 3, 64 << 10)];
        assert_eq!(requests(&full_runs(&huge), |r| (r, ()), true), [0..1, 1..2, 2..4]);
        // At most MAX_VECTOR_RUNS runs a request: pairs of items alternating between two regions.
        let alternating: Vec<_> =
            (0..2 * (MAX_VECTOR_RUNS as u64 + 3)).map(|i| (i / 2 % 2, i / 2 % 2, 64 << 10)).collect();
        let (all, most) = (MAX_VECTOR_RUNS + 3, MAX_VECTOR_RUNS);
        assert_eq!(requests(&full_runs(&alternating), |r| (r, ()), true), [0..most, most..all]);
        assert!(requests::<Run, ()>(&[], |r| (r, ()), true).is_empty());
    }

    #[test]
    fn runs_join_only_where_both_ends_regions_lie_in_one_place() {
        // Items alternating between host and GPU memory on one end, then on the other: each place's
        // runs are a request of their own, a run of one place continuing the one before it joins.
        let items: Vec<_> = (0..6u64).map(|r| (r, r + 10, 64 << 10)).collect();
        let all = full_runs(&items);
        let local = ["host", "gpu0", "gpu0", "gpu1", "gpu1", "gpu1"];
        assert_eq!(requests(&all, |r| (r, (local[r.items.start], "host")), true), [0..1, 1..3, 3..6]);
        let remote = ["gpu0", "host", "gpu0", "gpu0", "gpu0", "host"];
        assert_eq!(requests(&all, |r| (r, ("host", remote[r.items.start])), true), [0..1, 1..2, 2..5, 5..6]);
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
