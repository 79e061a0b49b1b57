//! The fake's own framing on top of the socket transport: every request is a 16-byte header (the
//! role of TCPX's ctrl message: it tells the receiver the sender's size before any data) followed
//! by the payload as a second message.

use crate::fail::{Fail, Result};

pub const HEADER_LEN: usize = 16;
const MAGIC: u32 = 0x5854_4B46; // "FKTX"

pub fn encode(seq: u64, size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&size.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h
}

/// The payload size the header announces, checked to belong to request `seq`.
pub fn decode(h: &[u8], seq: u64) -> Result<usize> {
    if h.len() != HEADER_LEN {
        return Err(Fail::internal(format!("peer sent a {}-byte ctrl message, expected {HEADER_LEN}", h.len())));
    }
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(Fail::internal(format!("peer sent a ctrl message with bad magic {magic:#x}")));
    }
    let size = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let got = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if got != seq {
        return Err(Fail::internal(format!("peer sent the ctrl message of request {got}, expected {seq}")));
    }
    if size > i32::MAX as u32 {
        return Err(Fail::internal(format!("peer announced {size} bytes, more than an int")));
    }
    Ok(size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        assert_eq!(decode(&encode(5, 123), 5).unwrap(), 123);
        assert!(decode(&encode(5, 123), 6).is_err());
        assert!(decode(&encode(5, u32::MAX), 5).is_err());
        let mut bad = encode(1, 1);
        bad[0] ^= 1;
        assert!(decode(&bad, 1).is_err());
        assert!(decode(&bad[..8], 1).is_err());
    }
}
