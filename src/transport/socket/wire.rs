//! What the socket transport puts on its data sockets: a hello per socket that ties it to a comm, then
//! a stream of pieces, each a 32-byte header and its payload. Decoders check everything the peer
//! controls; the receiver checks the rest against its posted requests.

use crate::config::{MAX_CHUNK_SIZE, MAX_SOCKETS_PER_COMM, MIN_CHUNK_SIZE};
use crate::error::{Error, Result};

const HELLO_MAGIC: u32 = 0x5353_5455;
const PIECE_MAGIC: u32 = 0x4350_5455;
const VERSION: u16 = 2;

pub const HELLO_LEN: usize = 32;
pub const PIECE_HEADER_LEN: usize = 32;

/// First bytes on every data socket of a comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketHello {
    /// The listener's nonce: proves the connector read this listener's handle.
    pub listen_nonce: u64,
    /// Random per connecting comm: groups the sockets of one comm on the accepting side.
    pub comm_id: u64,
    pub index: u8,
    pub count: u8,
    /// Bytes per piece the sender cuts requests into; the receiver checks piece boundaries with it.
    pub subchunk: u32,
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
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN], listen_nonce: u64) -> Result<SocketHello> {
        let h = SocketHello {
            listen_nonce: le64(&b[8..16]),
            comm_id: le64(&b[16..24]),
            index: b[6],
            count: b[7],
            subchunk: le32(&b[24..28]),
        };
        if le32(&b[0..4]) != HELLO_MAGIC || h.listen_nonce != listen_nonce {
            return Err(Error::invalid("data socket hello does not carry this listener's magic and nonce"));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(Error::invalid(format!("data socket speaks version {version}, this side {VERSION}")));
        }
        if h.count == 0 || h.count as usize > MAX_SOCKETS_PER_COMM || h.index >= h.count {
            return Err(Error::invalid(format!(
                "data socket hello claims socket {} of {} (at most {MAX_SOCKETS_PER_COMM} per comm)",
                h.index, h.count
            )));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&h.subchunk) {
            return Err(Error::invalid(format!("data socket hello has a piece size of {} bytes", h.subchunk)));
        }
        Ok(h)
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
    /// sender's cut (`subchunk`) produces at its offset, so pieces of one request can never overlap.
    pub fn decode(b: &[u8], subchunk: u32) -> Result<PieceHeader> {
        let h = PieceHeader {
            len: le32(&b[4..8]),
            seq: le64(&b[8..16]),
            offset: le64(&b[16..24]),
            total: le64(&b[24..32]),
        };
        if le32(&b[0..4]) != PIECE_MAGIC {
            return Err(Error::backend("protocol violation: data socket piece header has a bad magic"));
        }
        let expected_len = h.total.saturating_sub(h.offset).min(subchunk as u64);
        let in_range = h.offset < h.total || (h.offset == 0 && h.total == 0);
        if !in_range || !h.offset.is_multiple_of(subchunk as u64) || h.len as u64 != expected_len {
            return Err(Error::backend(format!(
                "protocol violation: piece of request {} claims {} bytes at offset {} of {} (pieces are {} bytes)",
                h.seq, h.len, h.offset, h.total, subchunk
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
        let h = SocketHello { listen_nonce: 5, comm_id: 9, index: 2, count: 4, subchunk: 256 << 10 };
        assert_eq!(SocketHello::decode(&h.encode(), 5).unwrap(), h);
        assert!(SocketHello::decode(&h.encode(), 6).is_err(), "wrong nonce");
        for bad in [
            SocketHello { index: 4, ..h },
            SocketHello { count: 0, index: 0, ..h },
            SocketHello { count: 65, ..h },
            SocketHello { subchunk: 100, ..h },
            SocketHello { subchunk: 8 << 20, ..h },
        ] {
            assert!(SocketHello::decode(&bad.encode(), 5).is_err(), "{bad:?}");
        }
        let mut version = h.encode();
        version[4] = 9;
        assert!(SocketHello::decode(&version, 5).unwrap_err().message().contains("version"));
    }

    #[test]
    fn piece_header_must_match_the_cut() {
        let sub = 4096;
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
}
