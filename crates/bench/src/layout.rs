//! Where the pieces of one transfer lie in the bench's buffer (the same offsets on both ends): side
//! by side, or (`--scatter`) spread over a region, as the blocks of a KV cache are, so that neither
//! end sees two pieces next to each other. Every transfer in flight has its own slot.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per transfer.
    pub size: usize,
    /// Pieces per transfer.
    pub iovs: usize,
    /// Distance between the starts of consecutive pieces; 0: side by side.
    pub stride: usize,
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
        let Some(scatter) = scatter else { return Ok(Layout { size, iovs, stride: 0 }) };
        let room = |align: usize| Layout { size, iovs, stride: scatter / iovs / align * align };
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
        let layout = Layout { size, iovs, stride };
        if iovs == 0 || iovs > size || (stride != 0 && stride < depth * layout.max_piece()) {
            return Err(format!("no layout of {size} bytes in {iovs} pieces {stride} bytes apart"));
        }
        Ok(layout)
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
        let start =
            if self.stride == 0 { slot * self.size + part.start } else { k * self.stride + slot * self.max_piece() };
        start..start + part.len()
    }

    /// The pieces of slot `slot`, in transfer order.
    pub fn pieces(&self, slot: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.iovs).map(move |k| self.piece(slot, k))
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

    #[test]
    fn a_region_too_small_or_a_bad_wire_layout_is_refused() {
        assert!(Layout::new(16 << 20, 1024, Some(16 << 20), 2).unwrap_err().contains("too small"));
        assert!(Layout::new(4, 8, None, 1).is_err());
        assert!(Layout::from_wire(16, 4, 2, 1).is_err(), "pieces of 4 bytes 2 apart overlap");
        assert!(Layout::from_wire(16, 0, 0, 1).is_err());
        assert_eq!(Layout::from_wire(16, 4, 64, 2), Ok(Layout { size: 16, iovs: 4, stride: 64 }));
    }
}
