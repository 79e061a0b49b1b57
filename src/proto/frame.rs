//! The 8-byte header in front of every message: `u16 FRAME_MAGIC, u8 kind, u8 flags, u32 body_len`.
//!
//! The header alone is enough to reject an unknown kind or an oversized body, so a reader
//! never has to buffer (or wait for) a body the protocol would not accept anyway.

use super::wire::{Reader, Writer, put_at};
use super::{
    IPC_HANDLE_LEN, MAX_CHANNELS, MAX_INLINE_LEN, MAX_IPC_WINDOWS, MAX_NAME_LEN, MAX_NOTIFY_MSG_LEN, MAX_REASON_LEN,
    MAX_SEG_WIRE_LEN, MAX_VECTOR_RUNS, MAX_VECTOR_SEGMENTS, NET_HANDLE_SIZE, ProtoError, SEG_LIST_HEAD_LEN,
    VECTOR_RUN_LEN,
};

pub(crate) const FRAME_HEADER_LEN: usize = 8;
pub(crate) const FRAME_MAGIC: u16 = 0x5443;
/// Generous cap for Hello/Welcome/Refuse, whose real sizes are a few hundred bytes.
pub(crate) const MAX_HANDSHAKE_BODY_LEN: usize = 4096;

/// Frame kind codes. Handshake kinds sit below 16 so the two families never collide.
pub mod kind {
    pub(crate) const HELLO: u8 = 1;
    pub(crate) const WELCOME: u8 = 2;
    pub(crate) const REFUSE: u8 = 3;
    pub(crate) const AUTH_HELLO: u8 = 4;
    pub(crate) const AUTH_CHALLENGE: u8 = 5;
    pub(crate) const AUTH_PROOF: u8 = 6;
    pub(crate) const SEND_ANNOUNCE: u8 = 16;
    pub(crate) const WRITE_REQUEST: u8 = 17;
    pub(crate) const READ_REQUEST: u8 = 18;
    pub(crate) const GRANT: u8 = 19;
    pub(crate) const DENY: u8 = 20;
    pub(crate) const DATA: u8 = 21;
    pub(crate) const DONE: u8 = 22;
    pub(crate) const NOTIFY: u8 = 23;
    pub(crate) const CLOSE: u8 = 24;
    pub(crate) const INLINE_WRITE: u8 = 25;
    pub(crate) const READ_SMALL: u8 = 26;
    pub(crate) const READ_DATA: u8 = 27;
    pub(crate) const INLINE_SEND: u8 = 28;
    pub(crate) const RESUME: u8 = 29;
    pub(crate) const WRITE_VECTOR: u8 = 30;
    pub(crate) const READ_VECTOR: u8 = 31;
    pub(crate) const IPC_REQUEST: u8 = 32;
    pub(crate) const IPC_GRANT: u8 = 33;
    pub(crate) const IPC_REVOKE: u8 = 34;
    pub(crate) const IPC_REVOKED: u8 = 35;
    pub(crate) const PROCESS_HELLO: u8 = 40;
    pub(crate) const PROCESS_ACK: u8 = 41;
    pub(crate) const DIRECT_WRITE: u8 = 42;
    pub(crate) const DIRECT_READ: u8 = 43;
    pub(crate) const DIRECT_GRANT: u8 = 44;
    pub(crate) const DIRECT_DONE: u8 = 45;
    pub(crate) const EAGER_SEND: u8 = 46;
    pub(crate) const IPC_SEND: u8 = 47;
    pub(crate) const WRITE_RUNS: u8 = 48;
    pub(crate) const READ_RUNS: u8 = 49;
    pub(crate) const PARK_CHANNELS: u8 = 50;
    pub(crate) const CHANNELS_PARKED: u8 = 51;
    pub(crate) const WANT_CHANNELS: u8 = 52;
    pub(crate) const OPEN_CHANNELS: u8 = 53;
}

/// Largest segment list of `n` segments.
const fn max_seg_list(n: usize) -> usize {
    SEG_LIST_HEAD_LEN + MAX_SEG_WIRE_LEN * n
}
/// Largest vector request body: three ids, the segment list.
const MAX_VECTOR_BODY: usize = 24 + max_seg_list(MAX_VECTOR_SEGMENTS);
/// Largest vector-of-runs body: the id, the run count, the runs (region, token, segment count), the
/// segment list.
const MAX_RUNS_BODY: usize = 8 + 4 + VECTOR_RUN_LEN * MAX_VECTOR_RUNS + max_seg_list(MAX_VECTOR_SEGMENTS);
/// Largest IPC grant body: two ids, the handle, the allocation's range, the windows' list.
const MAX_IPC_GRANT_BODY: usize = 16 + IPC_HANDLE_LEN + 16 + max_seg_list(MAX_IPC_WINDOWS);
/// Largest DirectWrite body: a vector request plus one source address per segment and the
/// sources' page size.
const MAX_DIRECT_WRITE_BODY: usize = MAX_VECTOR_BODY + 8 * MAX_VECTOR_SEGMENTS + 4;

#[derive(Clone, Copy)]
enum BodySize {
    UpTo(usize),
    Exactly(usize),
}

/// The error label and permitted size of each kind's body, or `None` for an unknown kind.
fn body_spec(kind: u8) -> Option<(&'static str, BodySize)> {
    use BodySize::{Exactly, UpTo};
    let spec = match kind {
        kind::HELLO => ("Hello body", UpTo(MAX_HANDSHAKE_BODY_LEN)),
        kind::WELCOME => ("Welcome body", UpTo(MAX_HANDSHAKE_BODY_LEN)),
        kind::REFUSE => ("Refuse body", UpTo(MAX_HANDSHAKE_BODY_LEN)),
        // Bounded like Hello rather than exact, so that a peer of another version whose bodies differ
        // still reaches the version check and hears why it was refused.
        kind::AUTH_HELLO => ("AuthHello body", UpTo(MAX_HANDSHAKE_BODY_LEN)),
        kind::AUTH_CHALLENGE => ("AuthChallenge body", UpTo(MAX_HANDSHAKE_BODY_LEN)),
        kind::AUTH_PROOF => ("AuthProof body", UpTo(MAX_HANDSHAKE_BODY_LEN)),
        kind::SEND_ANNOUNCE => ("SendAnnounce body", Exactly(16)),
        kind::EAGER_SEND => ("EagerSend body", Exactly(16)),
        kind::WRITE_REQUEST => ("WriteRequest body", Exactly(40)),
        kind::READ_REQUEST => ("ReadRequest body", Exactly(40)),
        kind::GRANT => ("Grant body", Exactly(16)),
        kind::DENY => ("Deny body", UpTo(8 + 4 + 4 + MAX_REASON_LEN)),
        kind::DATA => ("Data body", Exactly(16)),
        kind::DONE => ("Done body", Exactly(16)),
        kind::NOTIFY => ("Notify body", UpTo(4 + MAX_NAME_LEN + 4 + MAX_NOTIFY_MSG_LEN)),
        kind::CLOSE => ("Close body", Exactly(0)),
        kind::INLINE_WRITE => ("InlineWrite body", UpTo(32 + 4 + MAX_INLINE_LEN)),
        kind::READ_SMALL => ("ReadSmall body", Exactly(40)),
        kind::READ_DATA => ("ReadData body", UpTo(8 + 4 + MAX_INLINE_LEN)),
        kind::INLINE_SEND => ("InlineSend body", UpTo(8 + 4 + MAX_INLINE_LEN)),
        kind::RESUME => ("Resume body", Exactly(8)),
        kind::WRITE_VECTOR => ("WriteVector body", UpTo(MAX_VECTOR_BODY)),
        kind::READ_VECTOR => ("ReadVector body", UpTo(MAX_VECTOR_BODY)),
        kind::WRITE_RUNS => ("WriteRuns body", UpTo(MAX_RUNS_BODY)),
        kind::READ_RUNS => ("ReadRuns body", UpTo(MAX_RUNS_BODY)),
        kind::IPC_REQUEST => ("IpcRequest body", UpTo(MAX_VECTOR_BODY)),
        kind::IPC_GRANT => ("IpcGrant body", UpTo(MAX_IPC_GRANT_BODY)),
        kind::IPC_REVOKE => ("IpcRevoke body", Exactly(8)),
        kind::IPC_REVOKED => ("IpcRevoked body", Exactly(8)),
        kind::IPC_SEND => ("IpcSend body", Exactly(32 + IPC_HANDLE_LEN + 16)),
        kind::PROCESS_HELLO => ("ProcessHello body", Exactly(8)),
        kind::PROCESS_ACK => ("ProcessAck body", Exactly(4)),
        kind::DIRECT_WRITE => ("DirectWrite body", UpTo(MAX_DIRECT_WRITE_BODY)),
        kind::DIRECT_READ => ("DirectRead body", UpTo(MAX_VECTOR_BODY)),
        kind::DIRECT_GRANT => ("DirectGrant body", Exactly(12)),
        kind::DIRECT_DONE => ("DirectDone body", Exactly(8)),
        kind::PARK_CHANNELS => ("ParkChannels body", Exactly(8)),
        kind::CHANNELS_PARKED => ("ChannelsParked body", Exactly(12)),
        kind::WANT_CHANNELS => ("WantChannels body", Exactly(8)),
        kind::OPEN_CHANNELS => ("OpenChannels body", UpTo(12 + NET_HANDLE_SIZE * MAX_CHANNELS as usize)),
        _ => return None,
    };
    Some(spec)
}

/// Largest body the protocol accepts for `kind`, or `None` when the kind is unknown.
pub fn max_body_len(kind: u8) -> Option<usize> {
    body_spec(kind).map(|(_, size)| match size {
        BodySize::UpTo(max) | BodySize::Exactly(max) => max,
    })
}

pub fn is_handshake_kind(kind: u8) -> bool {
    matches!(
        kind,
        kind::HELLO | kind::WELCOME | kind::REFUSE | kind::AUTH_HELLO | kind::AUTH_CHALLENGE | kind::AUTH_PROOF
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses and validates a header: magic, zero flags, known kind, body length in bounds.
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, ProtoError> {
        let mut r = Reader::new(bytes, "frame header");
        let magic = r.u16()?;
        if magic != FRAME_MAGIC {
            return Err(ProtoError::BadMagic { found: magic.into() });
        }
        let kind = r.u8()?;
        let flags = r.u8()?;
        let body_len = r.u32()?;
        r.finish()?;
        if flags != 0 {
            return Err(ProtoError::BadFlags(flags));
        }
        let header = FrameHeader { kind, body_len };
        header.validate()?;
        Ok(header)
    }

    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        put_at(&mut out, 0, &FRAME_MAGIC.to_le_bytes());
        put_at(&mut out, 2, &[self.kind, 0]);
        put_at(&mut out, 4, &self.body_len.to_le_bytes());
        out
    }

    /// Checks kind and body length; decoders re-run this because the fields are public and a
    /// header may have been built by hand rather than parsed.
    pub fn validate(&self) -> Result<(), ProtoError> {
        self.body_label().map(drop)
    }

    fn body_len_usize(&self) -> usize {
        usize::try_from(self.body_len).unwrap_or(usize::MAX)
    }

    fn body_label(&self) -> Result<&'static str, ProtoError> {
        let (what, size) = body_spec(self.kind).ok_or(ProtoError::UnknownKind(self.kind))?;
        let len = self.body_len_usize();
        match size {
            BodySize::UpTo(max) | BodySize::Exactly(max) if len > max => Err(ProtoError::TooLong { what, len, max }),
            BodySize::Exactly(exact) if len < exact => Err(ProtoError::Truncated { what }),
            _ => Ok(what),
        }
    }

    /// Validates the header and that `body` is exactly the body it announces; returns the
    /// label that body-level errors should carry.
    pub(super) fn check_body(&self, body: &[u8]) -> Result<&'static str, ProtoError> {
        let what = self.body_label()?;
        let expected = self.body_len_usize();
        match body.len().checked_sub(expected) {
            None => Err(ProtoError::Truncated { what }),
            Some(0) => Ok(what),
            Some(extra) => Err(ProtoError::TrailingBytes { what, extra }),
        }
    }

    /// The body length announced by a header that has passed `validate`.
    pub(super) fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN.saturating_add(self.body_len_usize())
    }
}

/// Appends a header for `kind` and the body produced by `body`, then back-fills the length so
/// callers never have to compute body sizes by hand.
pub(super) fn write_frame(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Writer<'_>)) {
    let start = out.len();
    out.extend_from_slice(&FrameHeader { kind, body_len: 0 }.to_bytes());
    body(&mut Writer::new(out));
    let body_len = out.len().saturating_sub(start + FRAME_HEADER_LEN);
    // Past u32::MAX the peer rejects the frame as too long instead of desynchronising.
    let body_len = u32::try_from(body_len).unwrap_or(u32::MAX);
    if let Some(slot) = out.get_mut(start + 4..start + FRAME_HEADER_LEN) {
        slot.copy_from_slice(&body_len.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::testutil::XorShift;

    const KNOWN: [u8; 40] = [
        kind::HELLO,
        kind::WELCOME,
        kind::REFUSE,
        kind::AUTH_HELLO,
        kind::AUTH_CHALLENGE,
        kind::AUTH_PROOF,
        kind::SEND_ANNOUNCE,
        kind::WRITE_REQUEST,
        kind::READ_REQUEST,
        kind::GRANT,
        kind::DENY,
        kind::DATA,
        kind::DONE,
        kind::NOTIFY,
        kind::CLOSE,
        kind::INLINE_WRITE,
        kind::READ_SMALL,
        kind::READ_DATA,
        kind::INLINE_SEND,
        kind::RESUME,
        kind::WRITE_VECTOR,
        kind::READ_VECTOR,
        kind::WRITE_RUNS,
        kind::READ_RUNS,
        kind::IPC_REQUEST,
        kind::IPC_GRANT,
        kind::IPC_REVOKE,
        kind::IPC_REVOKED,
        kind::PROCESS_HELLO,
        kind::PROCESS_ACK,
        kind::DIRECT_WRITE,
        kind::DIRECT_READ,
        kind::DIRECT_GRANT,
        kind::DIRECT_DONE,
        kind::EAGER_SEND,
        kind::IPC_SEND,
        kind::PARK_CHANNELS,
        kind::CHANNELS_PARKED,
        kind::WANT_CHANNELS,
        kind::OPEN_CHANNELS,
    ];

    fn raw(magic: u16, kind: u8, flags: u8, body_len: u32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&magic.to_le_bytes());
        b[2] = kind;
        b[3] = flags;
        b[4..].copy_from_slice(&body_len.to_le_bytes());
        b
    }

    #[test]
    fn layout_is_magic_kind_flags_len_little_endian() {
        let h = FrameHeader { kind: kind::GRANT, body_len: 0x0102_0304 };
        assert_eq!(h.to_bytes(), [0x43, 0x54, 19, 0, 0x04, 0x03, 0x02, 0x01]);
    }

    #[test]
    fn every_known_kind_round_trips_at_its_maximum() {
        for k in KNOWN {
            let max = max_body_len(k).unwrap();
            let h = FrameHeader { kind: k, body_len: u32::try_from(max).unwrap() };
            assert_eq!(FrameHeader::parse(&h.to_bytes()), Ok(h));
            assert_eq!(h.frame_len(), FRAME_HEADER_LEN + max);
        }
    }

    #[test]
    fn maximum_body_sizes_match_the_spec() {
        assert_eq!(max_body_len(kind::HELLO), Some(4096));
        assert_eq!(max_body_len(kind::REFUSE), Some(4096));
        assert_eq!(max_body_len(kind::AUTH_HELLO), Some(4096));
        assert_eq!(max_body_len(kind::AUTH_CHALLENGE), Some(4096));
        assert_eq!(max_body_len(kind::AUTH_PROOF), Some(4096));
        assert_eq!(max_body_len(kind::SEND_ANNOUNCE), Some(16));
        assert_eq!(max_body_len(kind::WRITE_REQUEST), Some(40));
        assert_eq!(max_body_len(kind::READ_REQUEST), Some(40));
        assert_eq!(max_body_len(kind::GRANT), Some(16));
        assert_eq!(max_body_len(kind::DENY), Some(1040));
        assert_eq!(max_body_len(kind::DATA), Some(16));
        assert_eq!(max_body_len(kind::DONE), Some(16));
        assert_eq!(max_body_len(kind::NOTIFY), Some(263 + (64 << 20)));
        assert_eq!(max_body_len(kind::CLOSE), Some(0));
        assert_eq!(max_body_len(kind::INLINE_WRITE), Some(36 + 262_144));
        assert_eq!(max_body_len(kind::READ_SMALL), Some(40));
        assert_eq!(max_body_len(kind::READ_DATA), Some(12 + 262_144));
        assert_eq!(max_body_len(kind::INLINE_SEND), Some(12 + 262_144));
        assert_eq!(max_body_len(kind::WRITE_VECTOR), Some(29 + 20 * 65536));
        assert_eq!(max_body_len(kind::READ_VECTOR), Some(29 + 20 * 65536));
        assert_eq!(max_body_len(kind::PROCESS_HELLO), Some(8));
        assert_eq!(max_body_len(kind::PROCESS_ACK), Some(4));
        assert_eq!(max_body_len(kind::DIRECT_WRITE), Some(33 + 28 * 65536));
        assert_eq!(max_body_len(kind::DIRECT_READ), Some(29 + 20 * 65536));
        assert_eq!(max_body_len(kind::DIRECT_GRANT), Some(12));
        assert_eq!(max_body_len(kind::DIRECT_DONE), Some(8));
        assert_eq!(max_body_len(kind::EAGER_SEND), Some(16));
        assert_eq!(max_body_len(kind::IPC_REQUEST), Some(29 + 20 * 65536));
        assert_eq!(max_body_len(kind::IPC_GRANT), Some(101 + 20 * 4096));
        assert_eq!(max_body_len(kind::IPC_REVOKE), Some(8));
        assert_eq!(max_body_len(kind::IPC_REVOKED), Some(8));
        assert_eq!(max_body_len(kind::IPC_SEND), Some(112));
    }

    #[test]
    fn oversized_bodies_are_rejected_from_the_header_alone() {
        for k in KNOWN {
            let max = max_body_len(k).unwrap();
            for len in [max + 1, u32::MAX as usize] {
                let b = raw(FRAME_MAGIC, k, 0, u32::try_from(len).unwrap());
                match FrameHeader::parse(&b) {
                    Err(ProtoError::TooLong { len: l, max: m, .. }) => {
                        assert_eq!((l, m), (len, max));
                    }
                    other => panic!("kind {k} len {len}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn fixed_size_kinds_reject_short_bodies() {
        for k in [
            kind::SEND_ANNOUNCE,
            kind::EAGER_SEND,
            kind::WRITE_REQUEST,
            kind::READ_REQUEST,
            kind::GRANT,
            kind::DATA,
            kind::DONE,
            kind::IPC_REVOKE,
            kind::IPC_REVOKED,
            kind::IPC_SEND,
            kind::PROCESS_HELLO,
            kind::PROCESS_ACK,
            kind::DIRECT_GRANT,
            kind::DIRECT_DONE,
        ] {
            let max = u32::try_from(max_body_len(k).unwrap()).unwrap();
            for len in 0..max {
                assert!(matches!(FrameHeader::parse(&raw(FRAME_MAGIC, k, 0, len)), Err(ProtoError::Truncated { .. })));
            }
        }
    }

    #[test]
    fn variable_kinds_accept_short_bodies_in_the_header() {
        for k in [kind::HELLO, kind::DENY, kind::NOTIFY] {
            assert!(FrameHeader::parse(&raw(FRAME_MAGIC, k, 0, 0)).is_ok());
        }
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        for k in 0..=u8::MAX {
            let result = FrameHeader::parse(&raw(FRAME_MAGIC, k, 0, 0));
            if KNOWN.contains(&k) {
                assert_ne!(result, Err(ProtoError::UnknownKind(k)));
            } else {
                assert_eq!(result, Err(ProtoError::UnknownKind(k)));
            }
        }
    }

    #[test]
    fn nonzero_flags_are_rejected() {
        for flags in 1..=u8::MAX {
            assert_eq!(FrameHeader::parse(&raw(FRAME_MAGIC, kind::CLOSE, flags, 0)), Err(ProtoError::BadFlags(flags)));
        }
    }

    #[test]
    fn bad_magic_is_reported_before_anything_else() {
        assert_eq!(FrameHeader::parse(&raw(0x4354, 200, 7, u32::MAX)), Err(ProtoError::BadMagic { found: 0x4354 }));
    }

    #[test]
    fn handshake_kinds_are_exactly_hello_welcome_refuse_and_authentication() {
        let hs: Vec<u8> = (0..=u8::MAX).filter(|&k| is_handshake_kind(k)).collect();
        let auth = [kind::AUTH_HELLO, kind::AUTH_CHALLENGE, kind::AUTH_PROOF];
        assert_eq!(hs, [[kind::HELLO, kind::WELCOME, kind::REFUSE].as_slice(), &auth].concat());
    }

    #[test]
    fn check_body_requires_the_announced_length() {
        let h = FrameHeader { kind: kind::DENY, body_len: 20 };
        assert_eq!(h.check_body(&[0; 20]), Ok("Deny body"));
        assert_eq!(h.check_body(&[0; 19]), Err(ProtoError::Truncated { what: "Deny body" }));
        assert_eq!(h.check_body(&[0; 23]), Err(ProtoError::TrailingBytes { what: "Deny body", extra: 3 }));
        let hand_made = FrameHeader { kind: kind::GRANT, body_len: 17 };
        assert!(matches!(hand_made.check_body(&[0; 17]), Err(ProtoError::TooLong { .. })));
    }

    #[test]
    fn write_frame_back_fills_the_body_length() {
        let mut out = vec![0xaa];
        write_frame(&mut out, kind::DENY, |w| w.bytes(&[1, 2, 3]));
        assert_eq!(out.len(), 1 + FRAME_HEADER_LEN + 3);
        let header: [u8; 8] = out[1..9].try_into().unwrap();
        assert_eq!(FrameHeader::parse(&header), Ok(FrameHeader { kind: kind::DENY, body_len: 3 }));
        assert_eq!(&out[9..], &[1, 2, 3]);
    }

    #[test]
    fn fuzz_random_headers_never_panic() {
        let mut rng = XorShift::new(0x5eed_f4a3);
        let mut accepted = 0;
        for i in 0..10_000 {
            let bytes: [u8; 8] = if i % 2 == 0 {
                rng.bytes(8).try_into().unwrap()
            } else {
                // Valid magic and flags so the kind and length checks are exercised too.
                let k = KNOWN[rng.below(KNOWN.len())];
                let len = u32::try_from(rng.below(80)).unwrap();
                raw(FRAME_MAGIC, k, 0, len)
            };
            if let Ok(h) = FrameHeader::parse(&bytes) {
                accepted += 1;
                assert_eq!(h.to_bytes(), bytes);
                assert!(h.body_len as usize <= max_body_len(h.kind).unwrap());
            }
        }
        assert!(accepted > 0);
    }
}
