//! The fake's own framing on top of the socket transport: every request is a 32-byte header (the
//! role of TCPX's ctrl message: it tells the receiver the sender's size before any data, and here
//! also the sender's host and process, which a NIC would make plain) followed by the payload as a
//! second message.

use uccl_tcpx::internal::transport::{MrHandle, RecvComm, RequestId};

use crate::fail::{Fail, Result};
use crate::health::closed;
use crate::host::Origin;

pub const HEADER_LEN: usize = 32;
const MAGIC: u32 = 0x5854_4B46; // "FKTX"

pub fn encode(seq: u64, size: u32, origin: Origin) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&size.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&origin.host.to_le_bytes());
    h[24..28].copy_from_slice(&origin.pid.to_le_bytes());
    h
}

/// The payload size the header announces and where its sender runs, checked to belong to request
/// `seq`.
pub fn decode(h: &[u8], seq: u64) -> Result<(usize, Origin)> {
    if h.len() != HEADER_LEN {
        return Err(Fail::internal(format!("peer sent a {}-byte ctrl message, expected {HEADER_LEN}", h.len())));
    }
    let field = |r: std::ops::Range<usize>| -> u64 {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    let magic = field(0..4) as u32;
    if magic != MAGIC {
        return Err(Fail::internal(format!("peer sent a ctrl message with bad magic {magic:#x}")));
    }
    let size = field(4..8) as u32;
    let got = field(8..16);
    if got != seq {
        return Err(Fail::internal(format!("peer sent the ctrl message of request {got}, expected {seq}")));
    }
    if size > i32::MAX as u32 {
        return Err(Fail::internal(format!("peer announced {size} bytes, more than an int")));
    }
    Ok((size as usize, Origin { host: field(16..24), pid: field(24..28) as u32 }))
}

/// The header of message `seq` on `inner`, into `buf`: posts its receive while `posted` is None,
/// tests it after; the sender's length and origin once it arrived (the receive consumed).
pub fn poll_header(
    inner: &mut dyn RecvComm,
    buf: &mut [u8; HEADER_LEN],
    posted: &mut Option<RequestId>,
    seq: u64,
) -> Result<Option<(usize, Origin)>> {
    let id = match *posted {
        Some(id) => id,
        // SAFETY: `buf` lives in the comm, whose drop drops `inner` (joining its thread) first.
        None => match unsafe { inner.irecv(buf.as_mut_ptr(), HEADER_LEN, MrHandle(0)) }.map_err(closed)? {
            Some(id) => *posted.insert(id),
            None => return Ok(None),
        },
    };
    let Some(n) = inner.test(id).map_err(closed)? else { return Ok(None) };
    inner.irecv_consumed(id).map_err(closed)?;
    *posted = None;
    decode(&buf[..n.min(HEADER_LEN)], seq).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let o = Origin { host: 0x1234_5678_9abc_def0, pid: 4321 };
        assert_eq!(decode(&encode(5, 123, o), 5).unwrap(), (123, o));
        assert!(decode(&encode(5, 123, o), 6).is_err());
        assert!(decode(&encode(5, u32::MAX, o), 5).is_err());
        let mut bad = encode(1, 1, o);
        bad[0] ^= 1;
        assert!(decode(&bad, 1).is_err());
        assert!(decode(&bad[..8], 1).is_err());
    }
}
