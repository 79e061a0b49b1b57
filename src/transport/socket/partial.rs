//! Sends that are only partly there: a send may be posted before all of its bytes are ready (the
//! staged GPU path copies a chunk into host memory in parts). Its ready watermark says how many
//! leading bytes the sockets may send, and a piece is cut only once every byte of it lies below
//! the watermark ([`cuttable`]). The wire does not change: the receiver sees the same pieces.

use super::wire::PieceCut;

/// How many pieces of a request of `len` bytes with `ready` bytes ready may be sent: those that
/// end at or below the watermark (all of them once it reached `len`).
pub fn cuttable(cut: PieceCut, len: u64, ready: u64) -> u64 {
    if ready >= len {
        return cut.pieces(len);
    }
    ready / cut.piece_len(len)
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
}
