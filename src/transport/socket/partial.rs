//! Requests that are only partly there, on either end. A send may be posted before all of its
//! bytes are ready (the staged GPU path copies a chunk into host memory in parts): its ready
//! watermark says how many leading bytes the sockets may send, and a piece is cut only once every
//! byte of it lies below the watermark ([`cuttable`]). A receive comm asked to track them reports
//! how many leading bytes of a request landed ([`Landed`]), so that the staged path copies them out
//! while the rest arrives: its pieces come on several sockets in any order, each sets its bit
//! without a lock, and the prefix is the run of set bits from the first piece on. Neither changes
//! the wire.

use std::sync::atomic::{AtomicU64, Ordering};

use super::wire::PieceCut;

/// Pieces of one request whose landing is tracked: 1024 pieces hold a 4 MiB request (the largest
/// chunk) in the smallest pieces (4 KiB) and a 256 MiB one in the default 256 KiB pieces. A request
/// of more pieces reports a prefix of at most this many until it completes.
pub const TRACKED_PIECES: usize = 1024;
const WORDS: usize = TRACKED_PIECES / 64;

const UNKNOWN: u64 = u64::MAX;

/// How many pieces of a request of `len` bytes with `ready` bytes ready may be sent: those that
/// end at or below the watermark (all of them once it reached `len`).
pub fn cuttable(cut: PieceCut, len: u64, ready: u64) -> u64 {
    if ready >= len {
        return cut.pieces(len);
    }
    ready / cut.piece_len(len)
}

/// One request slot's landed pieces (receive side): the sender's size and one bit per piece index.
/// Receiving threads set bits without a lock; the comm's owner reads the prefix. A slot is begun
/// again when a request takes it, which happens only once the previous request there completed
/// (every piece of it landed). Aligned to a cache line, so that helpers landing requests of
/// neighbouring slots do not write one line.
#[repr(align(64))]
pub struct Landed {
    /// The sender's size once a piece told it, else `UNKNOWN`: with the piece size, it bounds the
    /// bits the request can have set.
    total: AtomicU64,
    bits: [AtomicU64; WORDS],
}

impl Default for Landed {
    fn default() -> Landed {
        Landed { total: AtomicU64::new(UNKNOWN), bits: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl Landed {
    /// A new request takes the slot: forgets the previous one's pieces, clearing only the words
    /// they can have set (a small request does not pay for the whole bitmap). The caller publishes
    /// the post after this (no receiving thread lands a piece of it before it saw the post).
    pub fn begin(&self, cut: PieceCut) {
        let total = self.total.load(Ordering::Relaxed);
        if total != UNKNOWN {
            let used = cut.pieces(total).div_ceil(64).min(WORDS as u64) as usize;
            for word in &self.bits[..used] {
                word.store(0, Ordering::Relaxed);
            }
            self.total.store(UNKNOWN, Ordering::Relaxed);
        }
    }

    /// The request's first admitted piece told its size; every bit set later lies below its
    /// pieces. Release: a reader that sees a bit sees the size.
    pub fn sized(&self, total: u64) {
        self.total.store(total, Ordering::Release);
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

    /// Leading bytes of the request in place, for requests cut by `cut`.
    pub fn bytes(&self, cut: PieceCut) -> u64 {
        // The bits first: a set bit's piece was admitted, and so the size stored, before it.
        let pieces = self.prefix();
        let total = self.total.load(Ordering::Acquire);
        if pieces == 0 || total == UNKNOWN {
            return 0;
        }
        prefix_bytes(cut, total, pieces)
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
        // One socket, 4 KiB pieces: piece index i holds bytes [4 KiB * i, 4 KiB * (i + 1)).
        let cut = PieceCut::new(4096, 1);
        let landed = Landed::default();
        assert_eq!(landed.prefix(), 0);
        let total = (TRACKED_PIECES as u64 + 10) * 4096;
        landed.sized(total);
        for index in [1, 2, 5] {
            landed.mark(index);
        }
        assert_eq!(landed.prefix(), 0, "piece 0 missing");
        assert_eq!(landed.bytes(cut), 0);
        landed.mark(0);
        assert_eq!(landed.prefix(), 3);
        assert_eq!(landed.bytes(cut), 3 * 4096);
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
        landed.begin(cut);
        assert_eq!(landed.prefix(), 0, "every word the request used is cleared");
        assert_eq!(landed.bytes(cut), 0);

        let cut = PieceCut::new(64 << 10, 1);
        assert_eq!(prefix_bytes(cut, 200_000, 0), 0);
        assert_eq!(prefix_bytes(cut, 200_000, 2), 128 << 10);
        assert_eq!(prefix_bytes(cut, 200_000, 4), 200_000, "the short last piece ends at the total");
    }

    /// A request that takes the slot after a longer one starts from nothing, though only the words
    /// the longer one could have set are cleared: bits past them were never set.
    #[test]
    fn a_new_request_sees_none_of_the_last_ones_pieces() {
        let cut = PieceCut::new(4096, 1);
        let landed = Landed::default();
        landed.begin(cut);
        // 130 pieces: three words.
        landed.sized(130 * 4096);
        for index in (0..130).rev() {
            landed.mark(index);
        }
        assert_eq!(landed.prefix(), 130);
        landed.begin(cut);
        assert_eq!(landed.bytes(cut), 0, "size forgotten too");
        // 70 pieces, the last short, every one but 65 landed, backwards: bits 65 and 70..130 of
        // the last request would have closed the gap.
        let total = 69 * 4096 + 100;
        landed.sized(total);
        for index in (0..70).rev().filter(|&i| i != 65) {
            landed.mark(index);
        }
        assert_eq!(landed.prefix(), 65);
        assert_eq!(landed.bytes(cut), 65 * 4096);
        landed.mark(65);
        assert_eq!(landed.bytes(cut), total, "the short last piece ends at the total");
        // An empty request lands no bits; the one after it still starts clean.
        landed.begin(cut);
        landed.sized(0);
        landed.begin(cut);
        landed.sized(3 * 4096);
        landed.mark(1);
        assert_eq!(landed.prefix(), 0);
    }
}
