//! Wire protocol: the byte layout of every message exchanged between peers.
//!
//! This module is pure: it never touches sockets, threads or clocks, so every decoder can be
//! exercised exhaustively and fed hostile input in tests. All integers are little-endian.
//! Every decoder validates lengths against the limits below before looking at the bytes they
//! describe, so a peer cannot make us allocate or wait for more than a bounded amount.

pub mod auth;
pub mod control;
pub mod fifo;
pub mod frame;
pub mod handshake;
/// cbindgen:ignore
pub mod ipc;
mod wire;

pub use auth::{AuthChallenge, AuthHello, AuthKey, AuthProof, Session, TokenBinding};
pub use control::{
    Control, Frame, InlineHead, InlineInto, RemoteSeg, VectorRun, decode_frame, decode_frame_lent, peek_inline_head,
};
pub use fifo::{Capability, FifoItem, Place};
pub(crate) use frame::FRAME_HEADER_LEN;
pub use frame::FrameHeader;
pub use handshake::{ChannelHello, Handshake, Hello, HostIdentity, Refuse, Welcome};
pub use ipc::{IPC_HANDLE_LEN, IPC_INFO_SIZE, IpcInfo};

/// Protocol magic, the first field of Hello, Welcome and Refuse bodies.
pub(crate) const MAGIC: u32 = 0x5854_4355;
/// 21: two-sided messages up to `MAX_EAGER_LEN` go eagerly (`Control::EagerSend`) on connections
/// whose chunks span segments. 22: inline payloads up to `MAX_INLINE_LEN` (256 KiB, was 64).
/// 23: vectors over several regions (`Control::WriteRuns` / `ReadRuns`), chunks cut per run.
/// 24: spanning chunks of such vectors cross from one run into the next. 25: a FifoItem's
/// capability names where its region's memory lies (capability version 3), and such vectors join
/// only regions of one place on each end. 26: segment lists as offsets from a running base, with
/// one length for all where they share it (`control::write_segments`).
pub(crate) const PROTOCOL_VERSION: u16 = 27;
pub(crate) const NET_HANDLE_SIZE: usize = 128;
/// Notification name bytes, NUL terminator excluded.
pub(crate) const MAX_NAME_LEN: usize = 255;
pub(crate) const MAX_NOTIFY_MSG_LEN: usize = 64 << 20;
pub(crate) const MAX_REASON_LEN: usize = 1024;
/// Transfers up to this size travel on the control stream on every engine (one round trip, no
/// channel), and device memory never further; eager sends are longer. At 64 KiB a write still takes
/// half the time of request, grant, a channel hop and done (loopback: 10 against 20 us on one core).
/// Other control messages wait behind such a frame: about 5 us on loopback, 50 us at 10 Gb/s.
pub(crate) const INLINE_LEN_FLOOR: usize = 64 << 10;
/// Longest inline payload a frame may carry. How far above the floor an engine inlines host memory
/// is its own choice (`UCCL_TCPX_INLINE_MAX`): on a host with few cores the hops a channel costs
/// weigh more than the copies through the control stream.
pub(crate) const MAX_INLINE_LEN: usize = 256 << 10;
/// Inline-send payload bytes a sender may have unacknowledged; the receiver buffers at most this
/// much for sends that arrive before their receives.
pub(crate) const MAX_INLINE_SEND_BACKLOG: u64 = 4 << 20;
/// Two-sided messages up to this size go eagerly: their chunks follow the message at once, the
/// receiver landing them in its own memory when no receive is posted yet. Past it the rendezvous
/// round trip (announce, grant) is a small part of the transfer, and landing would cost a copy.
pub(crate) const MAX_EAGER_LEN: u64 = 1 << 20;
/// An eager send lands in slots of this size, not necessarily adjacent.
pub(crate) const EAGER_SLOT: u64 = 64 << 10;

/// What an eager send of `len` bytes counts against `MAX_INLINE_SEND_BACKLOG`: the landing slots
/// it would take, so that the backlog bounds the receiver's landing memory whatever the lengths.
pub(crate) fn eager_landing_bytes(len: u64) -> u64 {
    len.div_ceil(EAGER_SLOT) * EAGER_SLOT
}
/// Segments one vector request may name: a frame of 256 KiB for blocks of one length, 512 KiB
/// otherwise, 1.25 MiB at most (each segment on a base of its own). A call with more items sends
/// several requests.
pub(crate) const MAX_VECTOR_SEGMENTS: usize = 1 << 16;
/// Most wire bytes a segment of a segment list takes: a new base (the marker and a `u64`), its
/// offset and its own length.
pub(crate) const MAX_SEG_WIRE_LEN: usize = 20;
/// A segment list's bytes before its segments at most, with no shared length: the count and the
/// flags (a shared length takes 4 bytes more there and 4 fewer from every segment).
pub(crate) const SEG_LIST_HEAD_LEN: usize = 5;
/// A segment list's flag: one length, after the flags, is every segment's.
pub(crate) const SEG_SHARED_LEN: u8 = 1;
/// In place of a segment's offset: a new `u64` base follows, then the offset from it.
pub(crate) const SEG_NEW_BASE: u32 = u32::MAX;
/// Runs (regions) one `WriteRuns` / `ReadRuns` may name: a serving stack registers one region per
/// layer and K/V (160 for Llama-70B, 188 for Qwen3-235B), so a request names that many; a call
/// whose items alternate between regions more often goes as several requests.
pub(crate) const MAX_VECTOR_RUNS: usize = 4096;
/// Wire bytes per run of a vector over several regions: `u64 region, u64 token, u32 segments`.
pub(crate) const VECTOR_RUN_LEN: usize = 20;
/// Bytes one vector request, or one WriteRequest, may move, as much as one advertised window can
/// hold: bounds the chunks a peer can make us queue for one flow, whatever its segments repeat (a
/// write's chunks are received even when it is refused).
pub(crate) const MAX_VECTOR_BYTES: u64 = 1 << 32;
/// Windows one IPC grant may list: as many as a region may advertise.
pub(crate) const MAX_IPC_WINDOWS: usize = 4096;
/// Handshake capability bit: the engine's transport takes vectored requests, so the chunks of a
/// vector flow may span segments (one request per chunk). A connection uses spanning chunks only
/// when both ends set it; otherwise no chunk crosses a segment.
pub(crate) const CAP_SPANNING_CHUNKS: u64 = 1;
/// Handshake capability bit: when this engine's transport cannot reach its own host (a net plugin),
/// it moves a same-host peer's channels over the built-in socket transport instead (which takes
/// vectored requests). Both ends of a same-host plugin connection must set it, or both not.
pub(crate) const CAP_LOCAL_PEERS_ON_SOCKETS: u64 = 2;
/// Limit for the `gpu_id` and `requested_gpu` strings.
pub(crate) const MAX_ID_LEN: usize = 64;
pub(crate) const MAX_TRANSPORT_NAME_LEN: usize = 32;
pub(crate) const MAX_CHANNELS: u16 = 64;

/// Everything that can be wrong with bytes received from a peer.
///
/// The messages reach end users through the C API's last-error string, so they are written
/// as plain sentences rather than debug dumps.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic number 0x{found:08x}: the peer is not speaking this protocol")]
    BadMagic { found: u32 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame flags must be zero, got 0x{0:02x}")]
    BadFlags(u8),
    #[error("{what} is {len} bytes long, over the limit of {max} bytes")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("protocol version mismatch: we speak version {ours}, the peer speaks version {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    /// A well-formed message whose contents break a protocol rule; the text is a full sentence.
    #[error("{0}")]
    Invalid(&'static str),
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic generator so fuzz failures reproduce exactly.
    pub(crate) struct XorShift(u64);

    impl XorShift {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed.max(1))
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub(crate) fn below(&mut self, bound: usize) -> usize {
            usize::try_from(self.next_u64() % bound as u64).unwrap()
        }

        pub(crate) fn byte(&mut self) -> u8 {
            self.next_u64().to_le_bytes()[0]
        }

        pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.byte()).collect()
        }

        /// Between zero and `max_len - 1` random bytes.
        pub(crate) fn bytes_below(&mut self, max_len: usize) -> Vec<u8> {
            let len = self.below(max_len);
            self.bytes(len)
        }

        pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }

        /// Flips, truncates or extends `base` so fuzzing reaches past the first validity check.
        pub(crate) fn mutate(&mut self, base: &[u8]) -> Vec<u8> {
            let mut out = base.to_vec();
            match self.below(4) {
                0 => {
                    for _ in 0..=self.below(3) {
                        if !out.is_empty() {
                            let at = self.below(out.len());
                            out[at] ^= 1 << self.below(8);
                        }
                    }
                }
                1 => out.truncate(self.below(base.len() + 1)),
                2 => {
                    let extra = 1 + self.below(8);
                    out.extend(self.bytes(extra));
                }
                _ => {
                    if !out.is_empty() {
                        let at = self.below(out.len());
                        out[at] = self.byte();
                    }
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_readable_sentences() {
        let cases = [
            (
                ProtoError::BadMagic { found: 0x1234 },
                "bad magic number 0x00001234: the peer is not speaking this protocol",
            ),
            (ProtoError::UnknownKind(99), "unknown frame kind 99"),
            (ProtoError::BadFlags(3), "frame flags must be zero, got 0x03"),
            (
                ProtoError::TooLong { what: "gpu_id", len: 65, max: 64 },
                "gpu_id is 65 bytes long, over the limit of 64 bytes",
            ),
            (ProtoError::Truncated { what: "Hello body" }, "Hello body is truncated"),
            (ProtoError::TrailingBytes { what: "Grant body", extra: 2 }, "Grant body has 2 unexpected trailing bytes"),
            (ProtoError::BadUtf8 { what: "reason" }, "reason is not valid UTF-8"),
            (
                ProtoError::VersionMismatch { ours: 1, theirs: 2 },
                "protocol version mismatch: we speak version 1, the peer speaks version 2",
            ),
            (ProtoError::Invalid("a sentence."), "a sentence."),
        ];
        for (err, text) in cases {
            assert_eq!(err.to_string(), text);
        }
    }

    #[test]
    fn xorshift_is_deterministic_and_varied() {
        let mut a = testutil::XorShift::new(7);
        let mut b = testutil::XorShift::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut distinct = xs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), xs.len());
    }
}
