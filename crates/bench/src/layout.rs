//! Where the pieces of one transfer lie in the bench's buffer (the same offsets on both ends): side
//! by side, or (`--scatter`) spread over a region, as the blocks of a KV cache are, so that neither
//! end sees two pieces next to each other. Every transfer in flight has its own slot. With `--kv`
//! the pieces follow block tables: piece k lies in block `table(k)` of the region, a different
//! shuffle on each end, as a serving stack's random block tables are, region by region
//! (`--kv-order region`) or in any order.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per transfer.
    pub size: usize,
    /// Pieces per transfer.
    pub iovs: usize,
    /// Distance between the starts of consecutive blocks; 0: side by side.
    pub stride: usize,
    /// Which block each piece lies in (scattered layouts only).
    pub table: Table,
}

/// A block table: piece k lies in block `(k * mult + add) % iovs`. The multiplier is coprime to
/// the block count, so every block is used once; far from 1 and from the count, so that no two
/// pieces consecutive in the transfer are neighbours in memory, nor in address order. The
/// initiator's and the target's tables differ, so a piece never sits at the same offset on both.
///
/// Region by region (`regions` > 1, as serving stacks list a request: every block of one layer's
/// tensor, then the next's), the pieces of region r ([`Layout::regions`]'s r-th share of the
/// blocks) are shuffled among that region's blocks alone, on both ends: a piece's local and remote
/// regions are the r-th of each end's. With `regions` 1 the whole table is one shuffle, and a
/// transfer over several regions hops between them at almost every piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    mult: usize,
    add: usize,
    regions: usize,
}

impl Table {
    /// Piece k in block k.
    pub const IN_ORDER: Table = Table { mult: 1, add: 0, regions: 1 };

    /// The initiator's table (`target`: the target's) for `n` blocks, shuffled within each of
    /// `regions` shares of them. The target's multiplier is also picked so that at most about one
    /// piece in a hundred has the same block on both ends.
    pub fn shuffled(n: usize, target: bool, regions: usize) -> Table {
        let regions = regions.clamp(1, n.max(1));
        // The shares hold n / regions blocks or one more: the multiplier is coprime to both.
        let (n, other) = if regions > 1 { (n / regions, n / regions + 1) } else { (n, 1) };
        let coprime_from = |from: usize, ok: &dyn Fn(usize) -> bool| {
            let mut mult = from.max(1);
            while gcd(mult, n) != 1 || gcd(mult, other) != 1 || !ok(mult) && mult < from + n {
                mult += 1;
            }
            mult
        };
        let initiator = coprime_from(n * 5 / 8, &|_| true);
        if !target {
            return Table { mult: initiator, add: 0, regions };
        }
        // k * (m1 - m2) = add (mod n) has gcd(m1 - m2, n) solutions if that divides add, else none.
        let add = (n / 2) | 1;
        let few = |mult: usize| {
            let g = gcd(initiator.abs_diff(mult), n);
            !add.is_multiple_of(g) || g <= (n / 128).max(1)
        };
        Table { mult: coprime_from(n * 3 / 8, &few), add, regions }
    }

    /// The shares of the blocks this table shuffles within (1: all of them at once).
    pub fn regions(self) -> usize {
        self.regions
    }

    fn block(self, k: usize, n: usize) -> usize {
        if self == Table::IN_ORDER {
            return k;
        }
        let (start, len) = if self.regions > 1 { share(k, n, self.regions) } else { (0, n) };
        start + ((((k - start) as u128) * self.mult as u128 + self.add as u128) % len as u128) as usize
    }
}

/// The first block and the block count of the share of `n` blocks cut in `regions` that holds
/// block `k`: share r starts at block `r * n / regions`, as [`Layout::regions`] cuts them.
fn share(k: usize, n: usize, regions: usize) -> (usize, usize) {
    let start = |r: usize| r * n / regions;
    let mut r = k * regions / n;
    while r + 1 < regions && start(r + 1) <= k {
        r += 1;
    }
    while start(r) > k {
        r -= 1;
    }
    (start(r), start(r + 1) - start(r))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Scattered pieces start on page boundaries where the region leaves room, as the blocks of a KV
/// cache (slices of one large tensor) do, else on 64-byte boundaries; piece lengths stay what the
/// split gives (not necessarily page multiples). A 4 KiB piece that straddles two pages costs the
/// kernel's copies about half as much again (loopback, 2-core VM).
const PAGE: usize = 4096;
const SCATTER_ALIGN: usize = 64;

impl Layout {
    /// `size` bytes in `iovs` pieces, spread over `scatter` bytes if given, with `depth` slots.
    pub fn new(size: usize, iovs: usize, scatter: Option<usize>, depth: usize) -> Result<Layout, String> {
        if iovs == 0 || iovs > size || depth == 0 {
            return Err(format!("{size} bytes cannot be cut into {iovs} pieces"));
        }
        let Some(scatter) = scatter else { return Ok(Layout { size, iovs, stride: 0, table: Table::IN_ORDER }) };
        let room = |align: usize| Layout { size, iovs, stride: scatter / iovs / align * align, table: Table::IN_ORDER };
        let paged = room(PAGE);
        let layout = if paged.stride >= depth * paged.max_piece() { paged } else { room(SCATTER_ALIGN) };
        if layout.stride < depth * layout.max_piece() {
            return Err(format!(
                "--scatter {scatter} is too small: {iovs} pieces of up to {} bytes x {depth} in flight need {} bytes",
                layout.max_piece(),
                iovs * depth * layout.max_piece().next_multiple_of(SCATTER_ALIGN)
            ));
        }
        Ok(layout)
    }

    /// The layout carried by the bench's control protocol (`stride` as sent, 0 for side by side).
    pub fn from_wire(size: usize, iovs: usize, stride: usize, depth: usize) -> Result<Layout, String> {
        let layout = Layout { size, iovs, stride, table: Table::IN_ORDER };
        if iovs == 0 || iovs > size || (stride != 0 && stride < depth * layout.max_piece()) {
            return Err(format!("no layout of {size} bytes in {iovs} pieces {stride} bytes apart"));
        }
        Ok(layout)
    }

    /// The same layout following the block tables of `--kv`: this end's (`target`: the target's),
    /// region by region over `regions` shares of the blocks (1: one shuffle of them all). Side by
    /// side pieces have no blocks to shuffle.
    pub fn with_tables(self, target: bool, regions: usize) -> Layout {
        let table = if self.stride == 0 { Table::IN_ORDER } else { Table::shuffled(self.iovs, target, regions) };
        Layout { table, ..self }
    }

    /// Whether the pieces follow block tables.
    pub fn shuffled(&self) -> bool {
        self.table != Table::IN_ORDER
    }

    /// Where the other end of a transfer keeps its pieces: the target's tables for a shuffled
    /// layout (the initiator's), else the same offsets.
    pub fn peer(self) -> Layout {
        if self.shuffled() { self.with_tables(true, self.table.regions) } else { self }
    }

    fn max_piece(&self) -> usize {
        self.size.div_ceil(self.iovs)
    }

    /// Bytes `[start, end)` of the transfer that piece `k` carries.
    fn part(&self, k: usize) -> Range<usize> {
        k * self.size / self.iovs..(k + 1) * self.size / self.iovs
    }

    /// Where piece `k` of slot `slot` lies in the buffer.
    pub fn piece(&self, slot: usize, k: usize) -> Range<usize> {
        let part = self.part(k);
        let start = if self.stride == 0 {
            slot * self.size + part.start
        } else {
            self.table.block(k, self.iovs) * self.stride + slot * self.max_piece()
        };
        start..start + part.len()
    }

    /// The pieces of slot `slot`, in transfer order.
    pub fn pieces(&self, slot: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.iovs).map(move |k| self.piece(slot, k))
    }

    /// The buffer's bytes cut into `regions` registrations at block boundaries (region `r` holds
    /// blocks `r * iovs / regions` up to the next region's first), so that every piece of every slot
    /// lies in one; the last ends with `depth` slots' span. One region, the span, for pieces side by
    /// side or `regions` of 1.
    pub fn regions(&self, regions: usize, depth: usize) -> Vec<Range<usize>> {
        let span = self.span(depth);
        if self.stride == 0 || regions <= 1 {
            return std::iter::once(0..span).collect();
        }
        let regions = regions.min(self.iovs);
        let start = |r: usize| r * self.iovs / regions * self.stride;
        (0..regions).map(|r| start(r)..if r + 1 == regions { span } else { start(r + 1) }).collect()
    }

    /// Buffer bytes that `depth` slots touch.
    pub fn span(&self, depth: usize) -> usize {
        if self.stride == 0 { self.size * depth } else { (self.iovs - 1) * self.stride + depth * self.max_piece() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disjoint(mut ranges: Vec<Range<usize>>) -> bool {
        ranges.sort_by_key(|r| r.start);
        ranges.windows(2).all(|w| w[0].end <= w[1].start)
    }

    #[test]
    fn side_by_side_pieces_tile_each_slot() {
        let l = Layout::new(10, 3, None, 2).unwrap();
        assert_eq!(l.pieces(0).collect::<Vec<_>>(), [0..3, 3..6, 6..10]);
        assert_eq!(l.pieces(1).collect::<Vec<_>>(), [10..13, 13..16, 16..20]);
        assert_eq!(l.span(2), 20);
    }

    #[test]
    fn scattered_pieces_are_apart_disjoint_and_inside_the_region() {
        let l = Layout::new(16 << 20, 1024, Some(1 << 30), 2).unwrap();
        assert_eq!(l.stride, 1 << 20);
        let all: Vec<_> = (0..2).flat_map(|s| l.pieces(s).collect::<Vec<_>>()).collect();
        assert!(all.iter().all(|r| r.len() == 16 << 10));
        assert!(disjoint(all.clone()));
        assert!(all.iter().all(|r| r.end <= l.span(2)) && l.span(2) <= 1 << 30);
        // No two pieces of a slot touch.
        assert!(l.pieces(0).zip(l.pieces(0).skip(1)).all(|(a, b)| a.end < b.start));
        let paged = Layout::new(409_600_000, 100_000, Some(1 << 30), 1).unwrap();
        assert_eq!(paged.stride, 8192, "pieces on page boundaries where the region leaves room");
        assert!(paged.span(1) <= 1 << 30);
        // 5000-byte pieces 8000 bytes apart: a page-aligned stride (4096) would overlap them.
        let odd = Layout::new(500_000_000, 100_000, Some(800_000_000), 1).unwrap();
        assert_eq!((odd.stride, odd.stride.is_multiple_of(PAGE)), (8000, false), "else on 64-byte ones");
        assert!(odd.span(1) <= 800_000_000);
        assert_eq!(odd.pieces(0).map(|r| r.len()).sum::<usize>(), 500_000_000);
        let uneven = Layout::new(1000, 7, Some(4096), 3).unwrap();
        assert_eq!(uneven.pieces(1).map(|r| r.len()).sum::<usize>(), 1000);
        assert!(disjoint((0..3).flat_map(|s| uneven.pieces(s).collect::<Vec<_>>()).collect()));
    }

    /// Region by region, piece k of both ends lies in the region holding block k (the same
    /// region index at both ends), every block once, the two ends' blocks mostly apart; in any
    /// order, consecutive pieces mostly change region.
    #[test]
    fn region_by_region_tables_keep_each_piece_in_its_own_region_at_both_ends() {
        for (iovs, regions) in [(8192, 64), (8320, 160), (100, 7), (98_304, 64), (10, 10), (12, 5)] {
            let l = Layout::new(iovs * 4096, iovs, Some(iovs * 16384), 1).unwrap().with_tables(false, regions);
            let peer = l.peer();
            assert_eq!(peer.table.regions(), regions, "the peer's table keeps the shares");
            let bounds = l.regions(regions, 1);
            let region_of = |at: usize| bounds.iter().position(|b| b.start <= at && at < b.end).unwrap();
            let (mine, theirs): (Vec<_>, Vec<_>) = (l.pieces(0).collect(), peer.pieces(0).collect());
            let mut used = vec![false; iovs];
            let mut same = 0;
            for k in 0..iovs {
                let want = bounds.iter().position(|b| b.start <= k * l.stride && k * l.stride < b.end).unwrap();
                assert_eq!(
                    (region_of(mine[k].start), region_of(theirs[k].start)),
                    (want, want),
                    "{iovs}/{regions}: piece {k}"
                );
                let block = mine[k].start / l.stride;
                assert!(!std::mem::replace(&mut used[block], true), "{iovs}/{regions}: block {block} twice");
                same += usize::from(mine[k].start == theirs[k].start);
            }
            // Shares of a few blocks leave no room to keep the ends apart.
            if iovs / regions >= 16 {
                assert!(same * 50 <= iovs, "{iovs}/{regions}: {same} pieces at the same offset on both ends");
            }
        }
        let any = Layout::new(8192 * 4096, 8192, Some(8192 * 16384), 1).unwrap().with_tables(false, 1);
        let bounds = any.regions(64, 1);
        let region_of = |at: usize| bounds.iter().position(|b| b.start <= at && at < b.end).unwrap();
        let pieces: Vec<_> = any.pieces(0).collect();
        let hops = pieces.windows(2).filter(|w| region_of(w[0].start) != region_of(w[1].start)).count();
        assert!(hops * 10 >= 9 * 8191, "in any order the region changes at almost every piece: {hops}");
    }

    #[test]
    fn regions_cut_at_blocks_hold_every_piece_of_every_slot() {
        for (iovs, regions, depth) in [(8192, 64, 2), (8320, 160, 1), (100, 7, 3), (16, 64, 1)] {
            let l = Layout::new(iovs * 4096, iovs, Some(iovs * 16384), depth).unwrap().with_tables(true, 1);
            let bounds = l.regions(regions, depth);
            assert_eq!(bounds.len(), regions.min(iovs), "{iovs} blocks in {regions} regions");
            assert!(bounds.windows(2).all(|w| w[0].end == w[1].start && w[0].start < w[0].end));
            assert_eq!((bounds[0].start, bounds.last().unwrap().end), (0, l.span(depth)));
            for slot in 0..depth {
                for p in l.pieces(slot) {
                    assert_eq!(bounds.iter().filter(|b| b.start <= p.start && p.end <= b.end).count(), 1, "{p:?}");
                }
            }
        }
        let side = Layout::new(1 << 20, 16, None, 2).unwrap();
        let one = side.regions(64, 2);
        assert_eq!((one.len(), one[0].clone()), (1, 0..2 << 20), "pieces side by side: one region");
    }

    #[test]
    fn a_region_too_small_or_a_bad_wire_layout_is_refused() {
        assert!(Layout::new(16 << 20, 1024, Some(16 << 20), 2).unwrap_err().contains("too small"));
        assert!(Layout::new(4, 8, None, 1).is_err());
        assert!(Layout::from_wire(16, 4, 2, 1).is_err(), "pieces of 4 bytes 2 apart overlap");
        assert!(Layout::from_wire(16, 0, 0, 1).is_err());
        assert_eq!(
            Layout::from_wire(16, 4, 64, 2),
            Ok(Layout { size: 16, iovs: 4, stride: 64, table: Table::IN_ORDER })
        );
    }

    #[test]
    fn block_tables_use_every_block_once_and_differ_between_the_ends() {
        for (iovs, depth) in [(1usize, 1usize), (2, 1), (7, 3), (2048, 1), (100_000, 2)] {
            let plain = Layout::new(iovs * 64, iovs, Some(iovs * 64 * depth * 2), depth).unwrap();
            let (ours, theirs) = (plain.with_tables(false, 1), plain.with_tables(true, 1));
            for l in [ours, theirs] {
                let mut blocks: Vec<usize> = l.pieces(0).map(|r| r.start / l.stride).collect();
                blocks.sort_unstable();
                assert_eq!(blocks, (0..iovs).collect::<Vec<_>>(), "{iovs} pieces: every block once");
                assert!(disjoint((0..depth).flat_map(|s| l.pieces(s).collect::<Vec<_>>()).collect()));
                assert_eq!(l.span(depth), plain.span(depth));
            }
            if iovs >= 7 {
                let same = ours.pieces(0).zip(theirs.pieces(0)).filter(|(a, b)| a == b).count();
                assert!(same <= (iovs / 100).max(1), "{iovs} pieces: {same} at the same offset on both ends");
                let next = ours
                    .pieces(0)
                    .zip(ours.pieces(0).skip(1))
                    .filter(|(a, b)| a.end + plain.stride > b.start && a.start < b.start)
                    .count();
                assert_eq!(next, 0, "{iovs} pieces: consecutive pieces are not neighbours in address order");
            }
        }
        assert_eq!(Layout::new(64, 4, None, 1).unwrap().with_tables(true, 1).table, Table::IN_ORDER);
    }
}
