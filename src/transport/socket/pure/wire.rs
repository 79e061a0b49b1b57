//! What the socket transport puts on its data sockets: a hello per socket that ties it to a comm, then
//! a stream of pieces, each a 32-byte header and its payload. A socket a comm adds after its first
//! waits for the accepting side's [`attach_ack`] before it carries a piece. On a comm whose sockets
//! span several data links (`SocketHello::acked`) the receiver also writes [`Ack`]s back: how many
//! requests it completed, so that the sender keeps every piece until then and can send a piece
//! again on another socket when its own one dies. Decoders check everything the peer controls; the
//! receiver checks the rest against its posted requests.

use crate::config::{MAX_CHUNK_SIZE, MAX_SOCKETS_PER_COMM, MIN_CHUNK_SIZE};
use crate::error::{Error, Result};

const HELLO_MAGIC: u32 = 0x5353_5455;
const PIECE_MAGIC: u32 = 0x4350_5455;
const ACK_MAGIC: u32 = 0x4B41_5455;
const DONE_MAGIC: u32 = 0x4E44_5455;
/// 3: pieces follow [`PieceCut`] (a request shared over the sockets) instead of fixed sizes.
/// 4: a comm is handed out with its first socket and takes the others whenever they come, each
/// acknowledged, so a sender opens them as its traffic needs them.
/// 5: a mid-size request takes pieces of at least a quarter of it, up to 128 KiB.
/// 6: the hello says whether the receiver acknowledges completed requests ([`Ack`]) and how many
/// spare sockets the sender may open to replace dead ones; a piece may come twice.
const VERSION: u16 = 6;
/// Hello flag: the receiver writes [`Ack`]s, and tolerates a piece sent again.
const HELLO_ACKED: u8 = 1;

pub const HELLO_LEN: usize = 32;
pub const PIECE_HEADER_LEN: usize = 32;
pub const ACK_LEN: usize = 8;
pub const DONE_LEN: usize = 16;

/// What the receiver of an acknowledged comm writes on a data socket: it completed every request
/// below `completed`. Cumulative, so a lost or reordered one is made good by the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub completed: u64,
}

impl Ack {
    pub fn encode(&self) -> [u8; DONE_LEN] {
        let mut b = [0u8; DONE_LEN];
        b[0..4].copy_from_slice(&DONE_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.completed.to_le_bytes());
        b
    }

    /// Checks the magic, version and padding; the count is checked against the sender's posts.
    pub fn decode(b: &[u8]) -> Result<Ack> {
        if b.len() != DONE_LEN
            || le32(&b[0..4]) != DONE_MAGIC
            || u16::from_le_bytes([b[4], b[5]]) != VERSION
            || b[6..8] != [0, 0]
        {
            return Err(Error::backend("protocol violation: a data socket carried a malformed acknowledgement"));
        }
        Ok(Ack { completed: le64(&b[8..16]) })
    }
}

/// What the accepting side writes on a socket it added to a live comm (the only bytes a receiver
/// ever writes): the sender puts no piece on that socket before it read them, so a socket the
/// receiver refused or never took loses nothing.
pub fn attach_ack(index: u8) -> [u8; ACK_LEN] {
    let mut b = [0u8; ACK_LEN];
    b[0..4].copy_from_slice(&ACK_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6] = index;
    b
}

/// First bytes on every data socket of a comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketHello {
    /// The listener's nonce: proves the connector read this listener's handle.
    pub listen_nonce: u64,
    /// Random per connecting comm: groups the sockets of one comm on the accepting side.
    pub comm_id: u64,
    pub index: u8,
    pub count: u8,
    /// The largest piece the sender cuts; with `count` it gives the receiver the sender's cut.
    pub subchunk: u32,
    /// The receiver acknowledges completed requests ([`Ack`]): the comm spans several links.
    pub acked: bool,
    /// Sockets past `count` the sender may open to replace dead ones (indices `count..count +
    /// spare`); they do not change the cut. Only on an acknowledged comm.
    pub spare: u8,
}

impl SocketHello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.index;
        b[7] = self.count;
        b[8..16].copy_from_slice(&self.listen_nonce.to_le_bytes());
        b[16..24].copy_from_slice(&self.comm_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.subchunk.to_le_bytes());
        b[28] = if self.acked { HELLO_ACKED } else { 0 };
        b[29] = self.spare;
        b
    }

    /// Sockets the comm may hold in all: its cut's sockets and the spares.
    pub fn slots(&self) -> usize {
        self.count as usize + self.spare as usize
    }

    /// What every socket of one comm says alike.
    pub fn shape(&self) -> CommShape {
        CommShape { count: self.count, spare: self.spare, acked: self.acked, subchunk: self.subchunk }
    }

    pub fn decode(b: &[u8; HELLO_LEN], listen_nonce: u64) -> Result<SocketHello> {
        let h = SocketHello {
            listen_nonce: le64(&b[8..16]),
            comm_id: le64(&b[16..24]),
            index: b[6],
            count: b[7],
            subchunk: le32(&b[24..28]),
            acked: b[28] & HELLO_ACKED != 0,
            spare: b[29],
        };
        if le32(&b[0..4]) != HELLO_MAGIC || h.listen_nonce != listen_nonce {
            return Err(Error::invalid("data socket hello does not carry this listener's magic and nonce"));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(Error::invalid(format!("data socket speaks version {version}, this side {VERSION}")));
        }
        if b[28] & !HELLO_ACKED != 0 || b[30..32] != [0, 0] || (h.spare > 0 && !h.acked) {
            return Err(Error::invalid("data socket hello has unknown flags"));
        }
        if h.count == 0 || h.slots() > MAX_SOCKETS_PER_COMM || h.index as usize >= h.slots() {
            return Err(Error::invalid(format!(
                "data socket hello claims socket {} of {} and {} spare (at most {MAX_SOCKETS_PER_COMM} per comm)",
                h.index, h.count, h.spare
            )));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&h.subchunk) {
            return Err(Error::invalid(format!("data socket hello has a piece size of {} bytes", h.subchunk)));
        }
        Ok(h)
    }
}

/// What the hellos of one comm's sockets must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommShape {
    pub count: u8,
    pub spare: u8,
    pub acked: bool,
    pub subchunk: u32,
}

impl CommShape {
    pub fn slots(&self) -> usize {
        self.count as usize + self.spare as usize
    }
}

/// The smallest piece a request is cut into to share it over the comm's sockets: below it a piece's
/// fixed cost (a header, a `sendmsg`, a helper's turn) outweighs moving it beside the others.
pub const MIN_SHARED_PIECE: u64 = 64 << 10;
/// Pieces a mid-size request is shared into at most, until they reach [`FEW_PIECES_UP_TO`]: each
/// further piece wakes another socket's helper, which costs the posting thread a system call and
/// the piece a helper's start, more than its bytes gain by moving beside the others. A 512 KiB
/// request on eight sockets went as eight 64 KiB pieces; as four of 128 KiB a 1 MiB write over two
/// such comms took 77 us at one in flight against 96, four staged GPU writes in flight 16.9 GB/s
/// against 12.4, while a 256 KiB request keeps four pieces (two of 128 KiB took 59 us against 48).
const FEW_PIECES: u64 = 4;
const FEW_PIECES_UP_TO: u64 = 128 << 10;
/// Shared pieces are whole pages, so a page-aligned request's pieces stay page-aligned.
const PIECE_ALIGN: u64 = 4 << 10;

/// How a comm cuts requests into pieces, known to both ends from the sockets' hellos: a request of
/// `total` bytes takes pieces of its page-rounded share per socket, at least [`MIN_SHARED_PIECE`]
/// and at least a [`FEW_PIECES`]th of it up to [`FEW_PIECES_UP_TO`], at most `subchunk`. A 256 KiB
/// request on four sockets so rides all four, a 512 KiB one on eight sockets four of them, while
/// large requests keep `subchunk` pieces (smaller pieces for every size cost large transfers
/// bandwidth). Both ends must cut alike: a change of the rule is a change of the protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceCut {
    subchunk: u64,
    sockets: u64,
}

impl PieceCut {
    pub fn new(subchunk: usize, sockets: usize) -> PieceCut {
        PieceCut { subchunk: subchunk.max(1) as u64, sockets: sockets.max(1) as u64 }
    }

    /// Bytes per piece of a request of `total` bytes (the last piece may be shorter). Any `total`
    /// a header may claim is fine: the result never exceeds `subchunk`.
    pub fn piece_len(&self, total: u64) -> u64 {
        let share = total.div_ceil(self.sockets);
        if share >= self.subchunk {
            return self.subchunk;
        }
        let few = total.div_ceil(FEW_PIECES).min(FEW_PIECES_UP_TO);
        share.max(MIN_SHARED_PIECE).max(few).next_multiple_of(PIECE_ALIGN).min(self.subchunk)
    }

    /// Pieces of a request of `total` bytes; an empty request still sends one (empty) piece.
    pub fn pieces(&self, total: u64) -> u64 {
        total.div_ceil(self.piece_len(total)).max(1)
    }
}

/// One piece of a request: `len` bytes at `offset` of request `seq`, whose total size is `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceHeader {
    pub seq: u64,
    pub total: u64,
    pub offset: u64,
    pub len: u32,
}

impl PieceHeader {
    pub fn encode(&self) -> [u8; PIECE_HEADER_LEN] {
        let mut b = [0u8; PIECE_HEADER_LEN];
        b[0..4].copy_from_slice(&PIECE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.total.to_le_bytes());
        b
    }

    /// Checks what a header must satisfy on its own: the magic, and that it is exactly the piece the
    /// sender's cut produces at its offset for its total, so pieces of one request can never overlap.
    pub fn decode(b: &[u8], cut: PieceCut) -> Result<PieceHeader> {
        let h = PieceHeader {
            len: le32(&b[4..8]),
            seq: le64(&b[8..16]),
            offset: le64(&b[16..24]),
            total: le64(&b[24..32]),
        };
        if le32(&b[0..4]) != PIECE_MAGIC {
            return Err(Error::backend("protocol violation: data socket piece header has a bad magic"));
        }
        let piece = cut.piece_len(h.total);
        let expected_len = h.total.saturating_sub(h.offset).min(piece);
        let in_range = h.offset < h.total || (h.offset == 0 && h.total == 0);
        if !in_range || !h.offset.is_multiple_of(piece) || h.len as u64 != expected_len {
            return Err(Error::backend(format!(
                "protocol violation: piece of request {} claims {} bytes at offset {} of {} (its pieces are {} bytes)",
                h.seq, h.len, h.offset, h.total, piece
            )));
        }
        Ok(h)
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_rejections() {
        let h = SocketHello {
            listen_nonce: 5,
            comm_id: 9,
            index: 2,
            count: 4,
            subchunk: 256 << 10,
            acked: false,
            spare: 0,
        };
        assert_eq!(SocketHello::decode(&h.encode(), 5).unwrap(), h);
        assert!(SocketHello::decode(&h.encode(), 6).is_err(), "wrong nonce");
        let acked = SocketHello { acked: true, spare: 8, index: 11, ..h };
        assert_eq!(SocketHello::decode(&acked.encode(), 5).unwrap(), acked);
        for bad in [
            SocketHello { index: 4, ..h },
            SocketHello { count: 0, index: 0, ..h },
            SocketHello { count: 65, ..h },
            SocketHello { subchunk: 100, ..h },
            SocketHello { subchunk: 8 << 20, ..h },
            SocketHello { index: 12, ..acked },
            SocketHello { count: 60, ..acked },
            SocketHello { acked: false, ..acked },
        ] {
            assert!(SocketHello::decode(&bad.encode(), 5).is_err(), "{bad:?}");
        }
        for (at, bits) in [(28, 2u8), (30, 1), (31, 0x80)] {
            let mut flags = h.encode();
            flags[at] |= bits;
            assert!(SocketHello::decode(&flags, 5).unwrap_err().message().contains("flags"), "byte {at}");
        }
        for old in [3u8, 4, 5] {
            let mut version = h.encode();
            version[4] = old;
            let err = SocketHello::decode(&version, 5).unwrap_err();
            assert!(err.message().contains(&format!("version {old}")), "{err:?}");
        }
    }

    #[test]
    fn completion_acks_round_trip_and_reject_garbage() {
        let a = Ack { completed: 0x0102_0304_0506_0708 };
        assert_eq!(Ack::decode(&a.encode()).unwrap(), a);
        for (at, bits) in [(0, 1u8), (4, 1), (6, 1), (7, 0x80)] {
            let mut bad = a.encode();
            bad[at] ^= bits;
            assert!(Ack::decode(&bad).is_err(), "byte {at}");
        }
        assert!(Ack::decode(&a.encode()[..8]).is_err(), "short");
        assert_ne!(&a.encode()[..4], &attach_ack(0)[..4], "not taken for an attach acknowledgement");
    }

    #[test]
    fn acks_name_their_socket() {
        assert_ne!(attach_ack(1), attach_ack(2));
        assert_eq!(&attach_ack(3)[..4], &ACK_MAGIC.to_le_bytes());
        assert_eq!(attach_ack(3)[6], 3);
    }

    #[test]
    fn piece_header_must_match_the_cut() {
        // Pieces below the shared minimum: every request is cut in 4 KiB pieces, whatever its size.
        let sub = PieceCut::new(4096, 4);
        let ok = [
            PieceHeader { seq: 1, total: 10_000, offset: 0, len: 4096 },
            PieceHeader { seq: 1, total: 10_000, offset: 8192, len: 1808 },
            PieceHeader { seq: 3, total: 0, offset: 0, len: 0 },
            PieceHeader { seq: 3, total: 1, offset: 0, len: 1 },
        ];
        for h in ok {
            assert_eq!(PieceHeader::decode(&h.encode(), sub).unwrap(), h);
        }
        let bad = [
            PieceHeader { seq: 1, total: 10_000, offset: 100, len: 4096 },
            PieceHeader { seq: 1, total: 10_000, offset: 8192, len: 4096 },
            PieceHeader { seq: 1, total: 10_000, offset: 12_288, len: 0 },
            PieceHeader { seq: 1, total: 10_000, offset: 0, len: 4000 },
            PieceHeader { seq: 1, total: u64::MAX, offset: u64::MAX - 1, len: 1 },
            PieceHeader { seq: 1, total: 0, offset: 4096, len: 0 },
        ];
        for h in bad {
            assert!(PieceHeader::decode(&h.encode(), sub).is_err(), "{h:?}");
        }
        let mut magic = ok[0].encode();
        magic[0] ^= 0xff;
        assert!(PieceHeader::decode(&magic, sub).unwrap_err().message().contains("magic"));
    }

    const K: u64 = 1 << 10;

    #[test]
    fn mid_size_requests_take_few_pieces_of_up_to_128_kib() {
        let eight = PieceCut::new(256 << 10, 8);
        for (total, piece, pieces) in [
            (256 * K, 64 * K, 4),
            (256 * K + 1, 68 * K, 4),
            (384 * K, 96 * K, 4),
            (512 * K, 128 * K, 4),
            (768 * K, 128 * K, 6),
            (1 << 20, 128 * K, 8),
            (2 << 20, 256 * K, 8),
            (128 * K, 64 * K, 2),
        ] {
            assert_eq!((eight.piece_len(total), eight.pieces(total)), (piece, pieces), "{total} bytes");
        }
    }

    #[test]
    fn requests_are_shared_over_the_sockets_down_to_the_minimum() {
        let four = PieceCut::new(256 << 10, 4);
        for (total, piece) in [
            (256 * K, 64 * K),
            (1 << 20, 256 * K),
            (2 << 20, 256 * K),
            (100 * K, 64 * K),
            // 75 KiB a socket, rounded up to pages.
            (300 * K, 76 * K),
            (0, 64 * K),
            (1, 64 * K),
            (u64::MAX, 256 * K),
        ] {
            assert_eq!(four.piece_len(total), piece, "{total} bytes");
        }
        assert_eq!(four.pieces(256 * K), 4);
        assert_eq!(four.pieces(300 * K), 4);
        assert_eq!(four.pieces(0), 1);
        assert_eq!(four.pieces(2 << 20), 8);
        let one = PieceCut::new(256 << 10, 1);
        assert_eq!(one.piece_len(100 * K), 100 * K);
        assert_eq!(one.piece_len(100 * K + 1), 104 * K);
        assert_eq!(one.piece_len(1 << 20), 256 * K);
        // A piece size below the minimum is never exceeded.
        assert_eq!(PieceCut::new(16 << 10, 8).piece_len(1 << 20), 16 * K);
        // Headers of the adaptive cut decode; the fixed cut's do not where they differ.
        let h = PieceHeader { seq: 0, total: 256 * K, offset: 192 * K, len: 64 << 10 };
        assert_eq!(PieceHeader::decode(&h.encode(), four).unwrap(), h);
        assert!(PieceHeader::decode(&PieceHeader { len: 256 << 10, offset: 0, ..h }.encode(), four).is_err());
        assert!(PieceHeader::decode(&h.encode(), one).is_err(), "one socket cuts 256 KiB in one piece");
    }

    /// The cut of the requests the engine hands a comm with each default layout (2 MiB chunks on
    /// two comms of eight sockets from 16 cores, 1 MiB chunks on two comms of one socket below):
    /// (request bytes, piece bytes, pieces). With eight sockets a request up to 512 KiB rides one
    /// socket per 64 KiB (capped at four pieces from 256 KiB on), as many streams as the
    /// acknowledged-message baseline gives the same bytes, and large requests keep 256 KiB pieces.
    #[test]
    fn default_layouts_cut_each_request_size_so() {
        let eight = PieceCut::new(256 << 10, 8);
        for (total, piece, pieces) in [
            (64 * K, 64 * K, 1),
            (128 * K, 64 * K, 2),
            (256 * K, 64 * K, 4),
            (512 * K, 128 * K, 4),
            (1 << 20, 128 * K, 8),
            (2 << 20, 256 * K, 8),
        ] {
            assert_eq!((eight.piece_len(total), eight.pieces(total)), (piece, pieces), "8 sockets, {total} bytes");
            let baseline_streams = total.div_ceil(64 * K).min(16);
            assert!(pieces <= baseline_streams, "{total} bytes ride no more sockets than the baseline's streams");
        }
        let one = PieceCut::new(256 << 10, 1);
        for (total, piece, pieces) in [
            (64 * K, 64 * K, 1),
            (128 * K, 128 * K, 1),
            (256 * K, 256 * K, 1),
            (512 * K, 256 * K, 2),
            (1 << 20, 256 * K, 4),
        ] {
            assert_eq!((one.piece_len(total), one.pieces(total)), (piece, pieces), "1 socket, {total} bytes");
        }
    }

    use proptest::prelude::*;

    fn runner() -> ProptestConfig {
        ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() }
    }

    proptest! {
        #![proptest_config(runner())]

        /// Every piece the cut makes decodes as exactly that piece; the pieces tile the request;
        /// any other offset or length at the same total is refused; a shared request never takes
        /// more pieces than sockets.
        #[test]
        fn the_cut_is_what_the_receiver_accepts(
            total in prop_oneof![0u64..=(8 << 20), Just(256 << 10), Just(1 << 20), Just(2 << 20)],
            subchunk in prop_oneof![Just(256usize << 10), (4usize << 10)..=(4 << 20)],
            sockets in 1usize..=64,
            shift in 1u64..4096,
        ) {
            let cut = PieceCut::new(subchunk, sockets);
            let piece = cut.piece_len(total);
            prop_assert!(piece <= subchunk as u64 && piece >= MIN_SHARED_PIECE.min(subchunk as u64));
            prop_assert!(piece == subchunk as u64 || piece.is_multiple_of(PIECE_ALIGN));
            if piece < subchunk as u64 && total > 0 {
                prop_assert!(cut.pieces(total) <= sockets as u64);
                prop_assert!(cut.pieces(total) <= FEW_PIECES.max(total.div_ceil(FEW_PIECES_UP_TO)));
            }
            let mut covered = 0;
            for i in 0..cut.pieces(total) {
                let offset = i * piece;
                let len = (total - offset).min(piece);
                let h = PieceHeader { seq: 7, total, offset, len: len as u32 };
                prop_assert_eq!(PieceHeader::decode(&h.encode(), cut).unwrap(), h);
                let moved = PieceHeader { offset: offset + shift.min(piece - 1).max(1), ..h };
                prop_assert!(piece == 1 || PieceHeader::decode(&moved.encode(), cut).is_err());
                for bad in [len + 1, len.wrapping_sub(1)] {
                    if bad != len && bad <= u32::MAX as u64 {
                        let wrong = PieceHeader { len: bad as u32, ..h };
                        prop_assert!(PieceHeader::decode(&wrong.encode(), cut).is_err());
                    }
                }
                covered += len;
            }
            prop_assert_eq!(covered, total);
            let past = PieceHeader { seq: 7, total, offset: cut.pieces(total) * piece, len: 0 };
            prop_assert!(PieceHeader::decode(&past.encode(), cut).is_err());
        }
    }
}
