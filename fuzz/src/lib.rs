//! Properties shared by the fuzz targets: every decoder returns instead of panicking, and what
//! decodes re-encodes to exactly the input (the codec is canonical). The same properties are checked
//! by the bounded, CI-run `tests/fuzz_proto.rs`; the seed corpus in `corpus/` comes from there.

use uccl_tcpx::FifoItem;
use uccl_tcpx::internal::proto::control::decode_frame;
use uccl_tcpx::internal::proto::frame::{is_handshake_kind, max_body_len};
use uccl_tcpx::internal::proto::{ChannelHello, Control, FrameHeader, Handshake};

/// `proto::FRAME_HEADER_LEN` (crate-private).
pub const HEADER_LEN: usize = 8;
/// Size of the C `FifoItem` (crate-private `FIFO_ITEM_SIZE`).
pub const FIFO_LEN: usize = 64;

/// Input: 8 header bytes (shorter inputs are zero-padded, longer ones cut).
pub fn frame_header(data: &[u8]) {
    let mut bytes = [0u8; HEADER_LEN];
    let n = data.len().min(HEADER_LEN);
    bytes[..n].copy_from_slice(&data[..n]);
    if let Ok(h) = FrameHeader::parse(&bytes) {
        assert_eq!(h.to_bytes(), bytes);
        assert_eq!(h.validate(), Ok(()));
        assert!(h.body_len as usize <= max_body_len(h.kind).expect("parsed kinds are known"));
    }
}

/// Input: one frame, header then body. Also decodes the body under a header built from the
/// input's own kind byte and a length taken from the input, which need not agree with the body.
pub fn control(data: &[u8]) {
    let Some((head, body)) = data.split_first_chunk::<HEADER_LEN>() else { return };
    if let Ok(h) = FrameHeader::parse(head)
        && let Ok(msg) = Control::decode(&h, body)
    {
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, data, "{msg:?} re-encodes differently");
        assert_eq!(msg.validate(), Ok(()));
        assert!(!is_handshake_kind(msg.kind()));
    }
    let hand_made = FrameHeader { kind: head[2], body_len: u32::from_le_bytes([head[4], head[5], head[6], head[7]]) };
    if let Ok(msg) = Control::decode(&hand_made, body) {
        let mut expect = hand_made.to_bytes().to_vec();
        expect.extend_from_slice(body);
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, expect, "{msg:?} re-encodes differently");
    }
}

/// Input: a byte stream holding any number of control frames, decoded the way the engine does.
pub fn control_stream(data: &[u8]) {
    let mut rest = data;
    loop {
        match decode_frame(rest) {
            Ok(Some((msg, used))) => {
                assert!((HEADER_LEN..=rest.len()).contains(&used));
                let mut out = Vec::new();
                msg.encode(&mut out);
                assert_eq!(out, &rest[..used], "{msg:?} re-encodes differently");
                rest = &rest[used..];
            }
            Ok(None) => {
                if let Some((head, _)) = rest.split_first_chunk::<HEADER_LEN>() {
                    let h = FrameHeader::parse(head).expect("a pending frame has a valid header");
                    assert!(HEADER_LEN + h.body_len as usize > rest.len());
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// Input: one handshake frame, header then body.
pub fn handshake(data: &[u8]) {
    let Some((head, body)) = data.split_first_chunk::<HEADER_LEN>() else { return };
    if let Ok(h) = FrameHeader::parse(head)
        && let Ok(msg) = Handshake::decode(&h, body)
    {
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, data, "{msg:?} re-encodes differently");
        assert_eq!(msg.validate(), Ok(()));
        assert!(is_handshake_kind(msg.kind()));
    }
    let hand_made = FrameHeader { kind: head[2], body_len: u32::from_le_bytes([head[4], head[5], head[6], head[7]]) };
    if let Ok(msg) = Handshake::decode(&hand_made, body) {
        let mut expect = hand_made.to_bytes().to_vec();
        expect.extend_from_slice(body);
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out, expect, "{msg:?} re-encodes differently");
    }
}

/// Input: the bytes a data connection opens with (any length).
pub fn channel_hello(data: &[u8]) {
    if let Ok(ch) = ChannelHello::from_bytes(data) {
        assert_eq!(ch.to_bytes().as_slice(), data);
    }
}

/// Input: 64 bytes of a C `FifoItem` (shorter inputs are zero-padded, longer ones cut).
pub fn fifo_item(data: &[u8]) {
    let mut bytes = [0u8; FIFO_LEN];
    let n = data.len().min(FIFO_LEN);
    bytes[..n].copy_from_slice(&data[..n]);
    let item = FifoItem::from_bytes(&bytes);
    assert_eq!(item.to_bytes(), bytes);
    if let Ok(cap) = item.capability() {
        let minted = FifoItem::with_capability(item.addr, item.size, cap);
        assert_eq!(minted.padding, item.padding, "a second encoding of the capability was accepted");
        assert_eq!(minted.capability(), Ok(cap));
    }
}
