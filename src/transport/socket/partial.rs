//! Requests that are only partly there, on either end. A send may be posted before all of its
//! bytes are ready (the staged GPU path copies a chunk into host memory in parts): its ready
//! watermark says how many leading bytes the sockets may send, and a piece is cut only once every
//! byte of it lies below the watermark ([`cuttable`]). A receive reports how many leading bytes
//! landed ([`Landed`]), so that the staged path copies them out while the rest arrives: its pieces
//! come on several sockets in any order, each sets its bit without a lock, and the prefix is the
//! run of set bits from the first piece on. Neither changes the wire.

use std::sync::atomic::{AtomicU64, Ordering};

use super::wire::PieceCut;

/// Pieces of one request whose landing is tracked: 1024 pieces hold a 4 MiB request (the largest
/// chunk) in the smallest pieces (4 KiB) and a 256 MiB one in the default 256 KiB pieces. A request
/// of more pieces reports a prefix of at most this many until it completes.
pub const TRACKED_PIECES: usize = 1024;
const WORDS: usize = TRACKED_PIECES / 64;

/// How many pieces of a request of `len` bytes with `ready` bytes ready may be sent: those that
/// end at or below the watermark (all of them once it reached `len`).
pub fn cuttable(cut: PieceCut, len: u64, ready: u64) -> u64 {
    if ready >= len {
        return cut.pieces(len);
    }
    ready / cut.piece_len(len)
}

/// One request slot's landed pieces (receive side), one bit per piece index. Receiving threads set
/// bits without a lock; the comm's owner reads the prefix. Cleared when a request takes the slot,
/// which happens only once the previous request there completed (every piece of it landed).
pub struct Landed {
    bits: [AtomicU64; WORDS],
}

impl Default for Landed {
    fn default() -> Landed {
        Landed { bits: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl Landed {
    /// Forgets every piece: a new request takes the slot. The caller publishes the post after
    /// this (no receiving thread lands a piece of it before it saw the post).
    pub fn clear(&self) {
        for word in &self.bits {
            word.store(0, Ordering::Relaxed);
        }
    }

    /// Piece `index` landed: its bytes are written. Release: whoever sees the bit sees them.
    pub fn mark(&self, index: u64) {
        if let Some(word) = self.bits.get((index / 64) as usize) {
            word.fetch_or(1 << (index % 64), Ordering::Release);
        }
    }

    /// Pieces landed from the first on without a gap.
    pub fn prefix(&self) -> u64 {
        let mut n = 0;
        for word in &self.bits {
            let ones = word.load(Ordering::Acquire).trailing_ones() as u64;
            n += ones;
            if ones < 64 {
                break;
            }
        }
        n
    }
}

/// Leading bytes of a `total`-byte request held by its first `pieces` pieces.
pub fn prefix_bytes(cut: PieceCut, total: u64, pieces: u64) -> u64 {
    pieces.saturating_mul(cut.piece_len(total)).min(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_is_cuttable_only_below_the_watermark() {
        // 1 MiB on 4 sockets: 256 KiB pieces.
        let cut = PieceCut::new(256 << 10, 4);
        let len = 1u64 << 20;
        assert_eq!(cuttable(cut, len, 0), 0);
        assert_eq!(cuttable(cut, len, (256 << 10) - 1), 0, "one byte short of the first piece");
        assert_eq!(cuttable(cut, len, 256 << 10), 1);
        assert_eq!(cuttable(cut, len, (768 << 10) + 5), 3);
        assert_eq!(cuttable(cut, len, len), 4);
        assert_eq!(cuttable(cut, len, u64::MAX), 4, "past the end is the end");
        // The last piece is short: it goes once the whole request is ready, not before.
        let odd = (1 << 20) + 100;
        assert_eq!(cut.pieces(odd), 5);
        assert_eq!(cuttable(cut, odd, odd - 1), 4);
        assert_eq!(cuttable(cut, odd, odd), 5);
        // An empty request's one empty piece is always ready.
        assert_eq!(cuttable(cut, 0, 0), 1);
    }

    #[test]
    fn the_prefix_is_the_run_of_pieces_from_the_first() {
        let landed = Landed::default();
        assert_eq!(landed.prefix(), 0);
        for index in [1, 2, 5] {
            landed.mark(index);
        }
        assert_eq!(landed.prefix(), 0, "piece 0 missing");
        landed.mark(0);
        assert_eq!(landed.prefix(), 3);
        landed.mark(4);
        landed.mark(3);
        assert_eq!(landed.prefix(), 6);
        // Across words, and up to the tracked end; pieces past it are not recorded.
        for index in 6..TRACKED_PIECES as u64 + 10 {
            if index != 700 {
                landed.mark(index);
            }
        }
        assert_eq!(landed.prefix(), 700);
        landed.mark(700);
        assert_eq!(landed.prefix(), TRACKED_PIECES as u64);
        landed.clear();
        assert_eq!(landed.prefix(), 0);

        let cut = PieceCut::new(64 << 10, 1);
        assert_eq!(prefix_bytes(cut, 200_000, 0), 0);
        assert_eq!(prefix_bytes(cut, 200_000, 2), 128 << 10);
        assert_eq!(prefix_bytes(cut, 200_000, 4), 200_000, "the short last piece ends at the total");
    }
}
