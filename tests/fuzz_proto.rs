//! Bounded randomized fuzzing of every wire decoder reachable through the public API:
//! `FrameHeader::parse`, `Control::decode`, `control::decode_frame`, `Handshake::decode`,
//! `ChannelHello::from_bytes`, `FifoItem::from_bytes` and `FifoItem::capability`.
//!
//! Inputs are purely random bytes, mutated valid encodings (bit flips, truncation, extension,
//! splices, "interesting" integers written over length fields) and structured random messages.
//! Every decoder must return instead of panicking, and anything that decodes must re-encode to
//! exactly the bytes it came from (the codec is canonical). Runs are deterministic: the seed is
//! fixed unless `UCCL_TCPX_FUZZ_SEED` is set, and `UCCL_TCPX_FUZZ_SCALE` multiplies the iteration
//! counts for longer local runs (the defaults keep the whole file well under 20 s in a debug build
//! on two cores). Coverage-guided fuzzing of the same decoders lives in `fuzz/` (docs/RELIABILITY.md).
//!
//! `UCCL_TCPX_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_proto seed_corpus` rewrites the checked-in
//! seed corpus under `fuzz/corpus/`; without it that test checks every checked-in seed still decodes.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use uccl_tcpx::proto::control::decode_frame;
use uccl_tcpx::proto::frame::{is_handshake_kind, max_body_len};
use uccl_tcpx::proto::{Capability, ChannelHello, Control, FifoItem, FrameHeader, Handshake, Hello, Refuse, Welcome};

/// `proto::FRAME_HEADER_LEN` is crate-private; `FrameHeader::to_bytes` pins the same number.
const HEADER_LEN: usize = 8;
/// `proto::PROTOCOL_VERSION` is crate-private; the handshake tests below prove it is 5.
const VERSION: u16 = 5;
const CHANNEL_HELLO_LEN: usize = 16;
const FIFO_LEN: usize = 64;
/// Protocol limits (crate-private in `proto`); `limits_match_the_codec` checks each against the codec.
const MAX_NAME_LEN: usize = 255;
const MAX_REASON_LEN: usize = 1024;
/// `proto::MAX_INLINE_LEN`; the size-limit tests below prove it.
const MAX_INLINE: usize = 64 << 10;
const MAX_ID_LEN: usize = 64;
const MAX_TRANSPORT_NAME_LEN: usize = 32;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness and mutation.

struct Rng(u64);

impl Rng {
    fn new(stream: u64) -> Rng {
        let base = std::env::var("UCCL_TCPX_FUZZ_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0x5eed);
        // splitmix64 of (seed, stream) so every test gets an independent sequence.
        let mut z = base ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)).max(1))
    }

    fn u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.u64() % n as u64) as usize }
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn byte(&mut self) -> u8 {
        self.u64() as u8
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    fn bytes_below(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len);
        self.bytes(len)
    }

    /// A mutated copy of a random member of `pool`.
    fn mutate_seed(&mut self, pool: &[Vec<u8>]) -> Vec<u8> {
        let base = self.pick(pool).clone();
        self.mutate(&base, pool)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A value biased towards the boundaries decoders get wrong.
    fn interesting_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX - self.below(4) as u64,
            4 => u64::from(u32::MAX) + self.below(3) as u64 - 1,
            5 => 1 << self.below(64),
            6 => self.below(300) as u64,
            _ => self.u64(),
        }
    }

    fn interesting_u32(&mut self) -> u32 {
        match self.below(6) {
            0 => 0,
            1 => u32::MAX,
            2 => 1 << self.below(32),
            3 => self.below(5000) as u32,
            _ => self.u64() as u32,
        }
    }

    /// Applies 1 to 4 stacked mutations to `base`; `pool` supplies material for splices.
    fn mutate(&mut self, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
        let mut out = base.to_vec();
        for _ in 0..1 + self.below(4) {
            match self.below(10) {
                0 if !out.is_empty() => {
                    let at = self.below(out.len());
                    out[at] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let at = self.below(out.len());
                    out[at] = self.byte();
                }
                2 => out.truncate(self.below(out.len() + 1)),
                3 => {
                    let extra = 1 + self.below(16);
                    let bytes = self.bytes(extra);
                    out.extend(bytes);
                }
                4 if !out.is_empty() => {
                    // Remove a range.
                    let at = self.below(out.len());
                    let n = 1 + self.below(out.len() - at);
                    out.drain(at..at + n);
                }
                5 => {
                    // Insert random bytes.
                    let at = self.below(out.len() + 1);
                    let n = 1 + self.below(8);
                    let bytes = self.bytes(n);
                    out.splice(at..at, bytes);
                }
                6 if out.len() >= 4 => {
                    // Overwrite a (possible) length or id field with a boundary value.
                    let at = self.below(out.len() - 3);
                    let v = self.interesting_u32().to_le_bytes();
                    out[at..at + 4].copy_from_slice(&v);
                }
                7 if out.len() >= 2 => {
                    let at = self.below(out.len() - 1);
                    let v = [0u16, 1, 0xff, 0x100, u16::MAX, self.below(70) as u16][self.below(6)];
                    out[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
                8 if out.len() >= 8 => {
                    let at = self.below(out.len() - 7);
                    let v = self.interesting_u64().to_le_bytes();
                    out[at..at + 8].copy_from_slice(&v);
                }
                9 if !pool.is_empty() => {
                    // Splice: our head, another seed's tail.
                    let other = self.pick(pool).clone();
                    let cut = self.below(out.len() + 1);
                    let from = self.below(other.len() + 1);
                    out.truncate(cut);
                    out.extend_from_slice(&other[from..]);
                }
                _ => {}
            }
        }
        out
    }

    fn utf8_string(&mut self, max_bytes: usize) -> String {
        const CHARS: [char; 8] = ['a', 'Z', '0', '-', ':', 'é', '€', '𝄞'];
        let mut s = String::new();
        let target = self.below(max_bytes + 1);
        while s.len() < target {
            s.push(*self.pick(&CHARS));
        }
        s
    }
}

fn scale() -> usize {
    std::env::var("UCCL_TCPX_FUZZ_SCALE").ok().and_then(|s| s.parse::<usize>().ok()).unwrap_or(1).max(1)
}

fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(96).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 96 { format!("{shown}… ({} bytes)", bytes.len()) } else { shown }
}

/// Runs one check, turning a panic inside a decoder into a failure that names the input.
fn guarded(what: &str, iteration: usize, input: &[u8], check: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(check)) {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{what}: iteration {iteration} failed on input {}: {msg}", hex(input));
    }
}

// ---------------------------------------------------------------------------------------------
// Valid samples (the seeds for mutation and for the checked-in corpus).

fn net_handle(seed: u8) -> [u8; 128] {
    core::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
}

fn sample_controls() -> Vec<(&'static str, Control)> {
    vec![
        ("send_announce", Control::SendAnnounce { xfer: 1, len: 4096 }),
        (
            "write_request",
            Control::WriteRequest { xfer: 2, region: 3, token: u64::MAX, addr: 0x7f00_0000_0000, len: 1 },
        ),
        ("read_request", Control::ReadRequest { xfer: 4, region: 5, token: 6, addr: u64::MAX - 8, len: 8 }),
        ("grant", Control::Grant { xfer: 7, flow: 8 }),
        ("deny", Control::Deny { xfer: 9, status: -6, reason: "région refused".into() }),
        ("deny_empty", Control::Deny { xfer: 10, status: i32::MIN, reason: String::new() }),
        ("data", Control::Data { flow: 11, len: u64::MAX }),
        ("done", Control::Done { xfer: 12, len: 13 }),
        ("notify", Control::Notify { name: b"checkpoint".to_vec(), msg: vec![0, 1, 2, 0xff] }),
        ("notify_long_name", Control::Notify { name: vec![b'n'; MAX_NAME_LEN], msg: vec![7; 300] }),
        ("close", Control::Close),
        ("inline_write", Control::InlineWrite { xfer: 14, region: 15, token: 16, addr: 0x1000, payload: vec![9; 8] }),
        ("read_small", Control::ReadSmall { xfer: 17, region: 18, token: 19, addr: 0x2000, len: 64 }),
        ("read_data", Control::ReadData { xfer: 20, payload: vec![1, 2, 3] }),
        ("inline_send", Control::InlineSend { xfer: 21, payload: vec![4; 8192] }),
    ]
}

fn sample_hello() -> Hello {
    Hello {
        version: VERSION,
        capabilities: 0,
        nonce: 0x0123_4567_89ab_cdef,
        num_channels: 4,
        chunk_size: 1 << 20,
        gpu_index: 0,
        gpu_id: "0".into(),
        requested_gpu: "0".into(),
        transport: "socket".into(),
        net_handle: net_handle(1),
    }
}

fn sample_handshakes() -> Vec<(&'static str, Handshake)> {
    let welcome = Welcome {
        version: VERSION,
        capabilities: 5,
        num_channels: 64,
        chunk_size: 4096,
        gpu_index: -1,
        gpu_id: "0000:8a:00.0".into(),
        transport: "socket".into(),
        net_handle: net_handle(2),
    };
    let long_hello = Hello {
        num_channels: 1,
        gpu_id: "g".repeat(MAX_ID_LEN),
        requested_gpu: "r".repeat(MAX_ID_LEN),
        transport: "t".repeat(MAX_TRANSPORT_NAME_LEN),
        ..sample_hello()
    };
    vec![
        ("hello", Handshake::Hello(sample_hello())),
        ("hello_max_strings", Handshake::Hello(long_hello)),
        ("welcome", Handshake::Welcome(welcome)),
        ("refuse", Handshake::Refuse(Refuse { status: -9, reason: "peer uses transport \"tcpx\"".into() })),
        ("refuse_long", Handshake::Refuse(Refuse { status: -4, reason: "é".repeat(MAX_REASON_LEN / 2) })),
    ]
}

fn sample_channel_hellos() -> Vec<(&'static str, ChannelHello)> {
    vec![
        ("first", ChannelHello { channel: 0, nonce: 0x1122_3344_5566_7788 }),
        ("last", ChannelHello { channel: 63, nonce: u64::MAX }),
    ]
}

fn sample_fifo_items() -> Vec<(&'static str, FifoItem)> {
    let cap = Capability { region: 3, token: 0xa1a2_a3a4_a5a6_a7a8 };
    let mut patched = FifoItem::with_capability(0x7f12_3456_0000, 1 << 20, cap);
    patched.addr += 4096;
    patched.size -= 4096;
    vec![
        ("minted", FifoItem::with_capability(0x7f12_3456_0000, 1 << 20, cap)),
        ("patched", patched),
        ("max_size", FifoItem::with_capability(1, u32::MAX, Capability { region: u64::MAX, token: 0 })),
    ]
}

fn control_frame(msg: &Control) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

fn handshake_frame(msg: &Handshake) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

/// Splits a frame into header and body, parsing the header; `None` when it does not parse.
fn split_frame(frame: &[u8]) -> Option<(FrameHeader, &[u8])> {
    let (head, body) = frame.split_first_chunk::<HEADER_LEN>()?;
    FrameHeader::parse(head).ok().map(|h| (h, body))
}

/// Header plus body, the way the engine reads a frame from a stream: a header that parses, then
/// exactly `body_len` bytes.
fn decode_control_frame(frame: &[u8]) -> Option<Result<Control, uccl_tcpx::proto::ProtoError>> {
    split_frame(frame).map(|(h, body)| Control::decode(&h, body))
}

fn decode_handshake_frame(frame: &[u8]) -> Option<Result<Handshake, uccl_tcpx::proto::ProtoError>> {
    split_frame(frame).map(|(h, body)| Handshake::decode(&h, body))
}

// Every checked property of a decoded value, shared by the random loops and the corpus check.

fn check_control(frame: &[u8]) -> bool {
    match decode_control_frame(frame) {
        Some(Ok(msg)) => {
            assert_eq!(control_frame(&msg), frame, "decoded {msg:?} re-encodes differently");
            assert_eq!(msg.validate(), Ok(()));
            assert!(!is_handshake_kind(msg.kind()));
            true
        }
        _ => false,
    }
}

fn check_handshake(frame: &[u8]) -> bool {
    match decode_handshake_frame(frame) {
        Some(Ok(msg)) => {
            assert_eq!(handshake_frame(&msg), frame, "decoded {msg:?} re-encodes differently");
            assert_eq!(msg.validate(), Ok(()));
            assert!(is_handshake_kind(msg.kind()));
            true
        }
        _ => false,
    }
}

fn check_channel_hello(bytes: &[u8]) -> bool {
    match ChannelHello::from_bytes(bytes) {
        Ok(ch) => {
            assert_eq!(ch.to_bytes().as_slice(), bytes);
            true
        }
        Err(_) => false,
    }
}

/// `from_bytes` is total and exact; returns whether the capability in the padding is accepted.
fn check_fifo_item(bytes: &[u8; FIFO_LEN]) -> bool {
    let item = FifoItem::from_bytes(bytes);
    assert_eq!(&item.to_bytes(), bytes, "FifoItem bytes do not round-trip");
    match item.capability() {
        Ok(cap) => {
            // Only the capability lives in the padding: minting the same capability again must
            // reproduce the padding byte for byte (no second encoding is accepted).
            let minted = FifoItem::with_capability(item.addr, item.size, cap);
            assert_eq!(minted.padding, item.padding);
            assert_eq!(FifoItem { rkey: item.rkey, nmsgs: item.nmsgs, rid: item.rid, idx: item.idx, ..minted }, item);
            assert_eq!(minted.capability(), Ok(cap));
            true
        }
        Err(e) => {
            assert!(e.to_string().contains("FifoItem"), "{e}");
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn limits_match_the_codec() {
    // Kind codes and sizes of the crate-private constants this file relies on, derived through
    // the public API so a change in the codec shows up here first.
    assert_eq!(FrameHeader { kind: 0, body_len: 0 }.to_bytes().len(), HEADER_LEN);
    assert_eq!(ChannelHello { channel: 0, nonce: 0 }.to_bytes().len(), CHANNEL_HELLO_LEN);
    assert_eq!(FifoItem::default().to_bytes().len(), FIFO_LEN);
    let name_ok = Control::Notify { name: vec![b'x'; MAX_NAME_LEN], msg: vec![] };
    let name_long = Control::Notify { name: vec![b'x'; MAX_NAME_LEN + 1], msg: vec![] };
    assert!(name_ok.validate().is_ok() && name_long.validate().is_err());
    let deny = |n| Control::Deny { xfer: 1, status: -1, reason: "r".repeat(n) };
    assert!(deny(MAX_REASON_LEN).validate().is_ok() && deny(MAX_REASON_LEN + 1).validate().is_err());
    let hello = |id: usize, tr: usize| {
        Handshake::Hello(Hello { gpu_id: "i".repeat(id), transport: "t".repeat(tr), ..sample_hello() })
    };
    assert!(hello(MAX_ID_LEN, MAX_TRANSPORT_NAME_LEN).validate().is_ok());
    assert!(hello(MAX_ID_LEN + 1, 1).validate().is_err());
    assert!(hello(1, MAX_TRANSPORT_NAME_LEN + 1).validate().is_err());
    assert!(Handshake::Hello(Hello { version: VERSION + 1, ..sample_hello() }).validate().is_err());
    let inline = |n: usize| Control::InlineWrite { xfer: 1, region: 1, token: 1, addr: 64, payload: vec![1; n] };
    assert!(inline(MAX_INLINE).validate().is_ok());
    assert!(inline(MAX_INLINE + 1).validate().is_err());
    assert!(inline(0).validate().is_err());
    let small = |len: u64| Control::ReadSmall { xfer: 1, region: 1, token: 1, addr: 64, len };
    assert!(small(MAX_INLINE as u64).validate().is_ok());
    assert!(small(MAX_INLINE as u64 + 1).validate().is_err());
    // Exactly the handshake kinds are handshake kinds, and every known kind has a size limit.
    let control_kinds: Vec<u8> = sample_controls().iter().map(|(_, m)| m.kind()).collect();
    let hs_kinds: Vec<u8> = sample_handshakes().iter().map(|(_, m)| m.kind()).collect();
    for k in 0..=u8::MAX {
        let known = control_kinds.contains(&k) || hs_kinds.contains(&k);
        assert_eq!(max_body_len(k).is_some(), known, "kind {k}");
        assert_eq!(is_handshake_kind(k), hs_kinds.contains(&k), "kind {k}");
    }
}

#[test]
fn frame_headers_random_mutated_and_exhaustive_kinds() {
    let mut rng = Rng::new(1);
    let seeds: Vec<Vec<u8>> = sample_controls()
        .iter()
        .map(|(_, m)| control_frame(m)[..HEADER_LEN].to_vec())
        .chain(sample_handshakes().iter().map(|(_, m)| handshake_frame(m)[..HEADER_LEN].to_vec()))
        .collect();
    let mut accepted = 0usize;
    let iterations = 1_200_000 * scale();
    for i in 0..iterations {
        let bytes: [u8; HEADER_LEN] = if i % 3 == 0 {
            rng.bytes(HEADER_LEN).try_into().unwrap()
        } else {
            let mut m = rng.mutate_seed(&seeds);
            m.resize(HEADER_LEN, 0);
            m.try_into().unwrap()
        };
        guarded("FrameHeader::parse", i, &bytes, || {
            if let Ok(h) = FrameHeader::parse(&bytes) {
                accepted += 1;
                assert_eq!(h.to_bytes(), bytes, "header re-encodes differently");
                assert_eq!(h.validate(), Ok(()));
                assert!(h.body_len as usize <= max_body_len(h.kind).expect("a parsed kind is known"));
            }
        });
    }
    // Every kind with boundary lengths, including hand-built headers `validate` must judge alone.
    for kind in 0..=u8::MAX {
        for body_len in [0, 1, 15, 16, 17, 40, 41, 1040, 1041, 4096, 4097, u32::MAX / 2, u32::MAX] {
            let h = FrameHeader { kind, body_len };
            let parsed = FrameHeader::parse(&h.to_bytes());
            assert_eq!(parsed.is_ok(), h.validate().is_ok(), "{h:?}");
            if let Ok(p) = parsed {
                assert_eq!(p, h);
            }
        }
    }
    eprintln!("FrameHeader::parse: {iterations} inputs, {accepted} parsed");
    assert!(accepted > iterations / 20, "only {accepted} of {iterations} headers parsed");
}

#[test]
fn control_frames_random_and_mutated() {
    let mut rng = Rng::new(2);
    let seeds: Vec<Vec<u8>> = sample_controls().iter().map(|(_, m)| control_frame(m)).collect();
    let kinds: Vec<u8> = sample_controls().iter().map(|(_, m)| m.kind()).collect();
    let mut accepted = 0usize;
    let iterations = 1_200_000 * scale();
    for i in 0..iterations {
        let frame = match i % 4 {
            0 => {
                // A header that parses, random body of exactly the announced length.
                let kind = if rng.chance(8) { rng.byte() } else { *rng.pick(&kinds) };
                let body = rng.bytes_below(64);
                let mut f = FrameHeader { kind, body_len: body.len() as u32 }.to_bytes().to_vec();
                f.extend(body);
                f
            }
            1 => rng.bytes_below(80),
            _ => rng.mutate_seed(&seeds),
        };
        guarded("Control::decode", i, &frame, || {
            if check_control(&frame) {
                accepted += 1;
            }
        });
        // Hand-built headers whose fields disagree with the body must be refused, not trusted.
        if frame.len() >= HEADER_LEN {
            let header = FrameHeader { kind: frame[2], body_len: rng.interesting_u32() };
            let body = &frame[HEADER_LEN..];
            guarded("Control::decode (hand-built header)", i, &frame, || {
                if let Ok(msg) = Control::decode(&header, body) {
                    assert_eq!(header.body_len as usize, body.len());
                    let mut expect = header.to_bytes().to_vec();
                    expect.extend_from_slice(body);
                    assert_eq!(control_frame(&msg), expect);
                }
            });
        }
    }
    eprintln!("Control::decode: {iterations} frames (+ as many hand-built headers), {accepted} decoded");
    assert!(accepted > iterations / 50, "only {accepted} of {iterations} control frames decoded");
}

#[test]
fn control_stream_decoder_on_random_splits() {
    let mut rng = Rng::new(3);
    let samples: Vec<Control> = sample_controls().into_iter().map(|(_, m)| m).collect();
    let seeds: Vec<Vec<u8>> = samples.iter().map(control_frame).collect();
    let iterations = 160_000 * scale();
    let mut complete_streams = 0usize;
    for i in 0..iterations {
        // A stream of valid frames, possibly mutated somewhere, cut at a random point.
        let count = 1 + rng.below(6);
        let msgs: Vec<&Control> = (0..count).map(|_| rng.pick(&samples)).collect();
        let mut stream: Vec<u8> = msgs.iter().flat_map(|m| control_frame(m)).collect();
        let mutated = rng.chance(2);
        if mutated {
            stream = rng.mutate(&stream, &seeds);
        }
        let cut = if rng.chance(3) { rng.below(stream.len() + 1) } else { stream.len() };
        let buf = &stream[..cut];
        guarded("control::decode_frame", i, buf, || {
            let mut rest = buf;
            let mut decoded = Vec::new();
            loop {
                match decode_frame(rest) {
                    Ok(Some((msg, used))) => {
                        assert!((HEADER_LEN..=rest.len()).contains(&used));
                        assert_eq!(control_frame(&msg), &rest[..used], "stream frame re-encodes differently");
                        decoded.push(msg);
                        rest = &rest[used..];
                    }
                    Ok(None) => {
                        // Only a genuinely incomplete frame may ask for more bytes.
                        if let Some((head, _)) = rest.split_first_chunk::<HEADER_LEN>() {
                            let h = FrameHeader::parse(head).expect("a pending frame has a valid header");
                            assert!(HEADER_LEN + h.body_len as usize > rest.len());
                        }
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !mutated && cut == stream.len() {
                assert!(rest.is_empty());
                assert_eq!(decoded.iter().collect::<Vec<_>>(), msgs);
                complete_streams += 1;
            }
        });
    }
    eprintln!("control::decode_frame: {iterations} streams, {complete_streams} intact ones fully decoded");
    assert!(complete_streams > 0);
}

#[test]
fn handshake_frames_random_and_mutated() {
    let mut rng = Rng::new(4);
    let seeds: Vec<Vec<u8>> = sample_handshakes().iter().map(|(_, m)| handshake_frame(m)).collect();
    let kinds: Vec<u8> = sample_handshakes().iter().map(|(_, m)| m.kind()).collect();
    let mut accepted = 0usize;
    let iterations = 600_000 * scale();
    for i in 0..iterations {
        let frame = match i % 4 {
            0 => {
                let kind = if rng.chance(8) { rng.byte() } else { *rng.pick(&kinds) };
                let body = rng.bytes_below(400);
                let mut f = FrameHeader { kind, body_len: body.len() as u32 }.to_bytes().to_vec();
                f.extend(body);
                f
            }
            1 => rng.bytes_below(400),
            _ => rng.mutate_seed(&seeds),
        };
        guarded("Handshake::decode", i, &frame, || {
            if check_handshake(&frame) {
                accepted += 1;
            }
        });
        if frame.len() >= HEADER_LEN {
            let header = FrameHeader { kind: frame[2], body_len: rng.interesting_u32() };
            let body = &frame[HEADER_LEN..];
            guarded("Handshake::decode (hand-built header)", i, &frame, || {
                if let Ok(msg) = Handshake::decode(&header, body) {
                    assert_eq!(header.body_len as usize, body.len());
                    let mut expect = header.to_bytes().to_vec();
                    expect.extend_from_slice(body);
                    assert_eq!(handshake_frame(&msg), expect);
                }
            });
        }
    }
    eprintln!("Handshake::decode: {iterations} frames (+ as many hand-built headers), {accepted} decoded");
    assert!(accepted > iterations / 50, "only {accepted} of {iterations} handshake frames decoded");
}

fn random_control(rng: &mut Rng) -> Control {
    match rng.below(12) {
        0 => Control::SendAnnounce { xfer: rng.interesting_u64(), len: rng.interesting_u64() },
        1 => Control::WriteRequest {
            xfer: rng.u64(),
            region: rng.interesting_u64(),
            token: rng.u64(),
            addr: rng.interesting_u64(),
            len: rng.interesting_u64(),
        },
        2 => Control::ReadRequest {
            xfer: rng.u64(),
            region: rng.interesting_u64(),
            token: rng.u64(),
            addr: rng.interesting_u64(),
            len: rng.interesting_u64(),
        },
        3 => Control::Grant { xfer: rng.interesting_u64(), flow: rng.interesting_u64() },
        4 => Control::Deny {
            xfer: rng.u64(),
            status: rng.interesting_u32() as i32,
            reason: rng.utf8_string(MAX_REASON_LEN + 8),
        },
        5 => Control::Data { flow: rng.interesting_u64(), len: rng.interesting_u64() },
        6 => Control::Done { xfer: rng.interesting_u64(), len: rng.interesting_u64() },
        7 => {
            let name_len = if rng.chance(4) { MAX_NAME_LEN - 1 + rng.below(3) } else { rng.below(40) };
            let mut name: Vec<u8> = (0..name_len).map(|_| b'a' + rng.below(26) as u8).collect();
            if rng.chance(4) && !name.is_empty() {
                let at = rng.below(name.len());
                name[at] = 0;
            }
            Control::Notify { name, msg: rng.bytes_below(600) }
        }
        8 => Control::InlineWrite {
            xfer: rng.u64(),
            region: rng.interesting_u64(),
            token: rng.u64(),
            addr: rng.interesting_u64(),
            payload: rng.bytes_below(MAX_INLINE + 8),
        },
        9 => Control::ReadSmall {
            xfer: rng.u64(),
            region: rng.interesting_u64(),
            token: rng.u64(),
            addr: rng.interesting_u64(),
            len: if rng.chance(2) { rng.below(MAX_INLINE + 8) as u64 } else { rng.interesting_u64() },
        },
        10 => Control::ReadData { xfer: rng.u64(), payload: rng.bytes_below(MAX_INLINE + 8) },
        _ => Control::Close,
    }
}

fn random_handshake(rng: &mut Rng) -> Handshake {
    let version = if rng.chance(8) { rng.u64() as u16 } else { VERSION };
    let num_channels = [0u16, 1, 2, 63, 64, 65, u16::MAX][rng.below(7)];
    let chunk_size = if rng.chance(8) { 0 } else { rng.interesting_u32() };
    let id = |rng: &mut Rng| rng.utf8_string(MAX_ID_LEN + 4);
    match rng.below(3) {
        0 => Handshake::Hello(Hello {
            version,
            capabilities: rng.u64(),
            nonce: rng.u64(),
            num_channels,
            chunk_size,
            gpu_index: rng.u64() as i32,
            gpu_id: id(rng),
            requested_gpu: id(rng),
            transport: rng.utf8_string(MAX_TRANSPORT_NAME_LEN + 4),
            net_handle: net_handle(rng.byte()),
        }),
        1 => Handshake::Welcome(Welcome {
            version,
            capabilities: rng.u64(),
            num_channels,
            chunk_size,
            gpu_index: rng.u64() as i32,
            gpu_id: id(rng),
            transport: rng.utf8_string(MAX_TRANSPORT_NAME_LEN + 4),
            net_handle: net_handle(rng.byte()),
        }),
        _ => Handshake::Refuse(Refuse { status: rng.u64() as i32, reason: rng.utf8_string(MAX_REASON_LEN + 8) }),
    }
}

#[test]
fn structured_messages_round_trip_exactly_when_valid() {
    let mut rng = Rng::new(5);
    let (mut valid, mut invalid) = (0usize, 0usize);
    for i in 0..120_000 * scale() {
        let msg = random_control(&mut rng);
        let frame = control_frame(&msg);
        guarded("Control round trip", i, &frame, || {
            let decoded = decode_control_frame(&frame).unwrap_or(Err(uccl_tcpx::proto::ProtoError::Invalid("header")));
            match msg.validate() {
                Ok(()) => {
                    assert_eq!(decoded, Ok(msg.clone()));
                    assert_eq!(decode_frame(&frame), Ok(Some((msg.clone(), frame.len()))));
                    valid += 1;
                }
                Err(_) => {
                    assert!(decoded.is_err(), "{msg:?} fails validate but decodes");
                    assert!(decode_frame(&frame).is_err());
                    invalid += 1;
                }
            }
        });
        let hs = random_handshake(&mut rng);
        let frame = handshake_frame(&hs);
        guarded("Handshake round trip", i, &frame, || {
            let decoded =
                decode_handshake_frame(&frame).unwrap_or(Err(uccl_tcpx::proto::ProtoError::Invalid("header")));
            match hs.validate() {
                Ok(()) => assert_eq!(decoded, Ok(hs.clone())),
                Err(_) => assert!(decoded.is_err(), "{hs:?} fails validate but decodes"),
            }
        });
    }
    eprintln!(
        "structured: {} Control + as many Handshake values; Control valid {valid}, invalid {invalid}",
        valid + invalid
    );
    assert!(valid > 100 && invalid > 100, "valid {valid}, invalid {invalid}");
}

#[test]
fn channel_hellos_random_and_mutated() {
    let mut rng = Rng::new(6);
    let seeds: Vec<Vec<u8>> = sample_channel_hellos().iter().map(|(_, c)| c.to_bytes().to_vec()).collect();
    let mut accepted = 0usize;
    let iterations = 1_200_000 * scale();
    for i in 0..iterations {
        let bytes = if i % 2 == 0 { rng.bytes_below(CHANNEL_HELLO_LEN + 8) } else { rng.mutate(&seeds[0], &seeds) };
        guarded("ChannelHello::from_bytes", i, &bytes, || {
            if check_channel_hello(&bytes) {
                accepted += 1;
            }
        });
    }
    // Every channel and reserved value with a valid magic: only reserved == 0 passes.
    let mut b = seeds[0].clone();
    for reserved in [0u16, 1, 0x100, u16::MAX] {
        for channel in [0u16, 1, 64, u16::MAX] {
            b[4..6].copy_from_slice(&channel.to_le_bytes());
            b[6..8].copy_from_slice(&reserved.to_le_bytes());
            assert_eq!(ChannelHello::from_bytes(&b).is_ok(), reserved == 0);
        }
    }
    eprintln!("ChannelHello::from_bytes: {iterations} inputs, {accepted} decoded");
    assert!(accepted > iterations / 50, "only {accepted} of {iterations} channel hellos decoded");
}

#[test]
fn fifo_items_random_and_mutated() {
    let mut rng = Rng::new(7);
    let seeds: Vec<Vec<u8>> = sample_fifo_items().iter().map(|(_, f)| f.to_bytes().to_vec()).collect();
    let mut accepted = 0usize;
    let iterations = 1_200_000 * scale();
    for i in 0..iterations {
        let mut bytes = if i % 2 == 0 { rng.bytes(FIFO_LEN) } else { rng.mutate_seed(&seeds) };
        bytes.resize(FIFO_LEN, 0);
        let bytes: [u8; FIFO_LEN] = bytes.try_into().unwrap();
        guarded("FifoItem::from_bytes/capability", i, &bytes, || {
            if check_fifo_item(&bytes) {
                accepted += 1;
            }
        });
    }
    // Any single bit flipped in the capability trailer (magic, version, reserved tail) is refused.
    let minted = sample_fifo_items()[0].1.to_bytes();
    for byte in 48..FIFO_LEN {
        for bit in 0..8 {
            let mut b = minted;
            b[byte] ^= 1 << bit;
            assert!(!check_fifo_item(&b), "byte {byte} bit {bit} went unnoticed");
        }
    }
    eprintln!("FifoItem::from_bytes + capability: {iterations} inputs, {accepted} capabilities accepted");
    assert!(accepted > 0, "no mutated FifoItem kept a valid capability");
}

// ---------------------------------------------------------------------------------------------
// The seed corpus of the coverage-guided harness in fuzz/.

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus")
}

/// Every seed, by fuzz target: the targets read exactly these byte layouts.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, msg) in sample_controls() {
        let frame = control_frame(&msg);
        out.push(("frame_header", format!("{name}.bin"), frame[..HEADER_LEN].to_vec()));
        out.push(("control", format!("{name}.bin"), frame.clone()));
    }
    let stream: Vec<u8> = sample_controls().iter().flat_map(|(_, m)| control_frame(m)).collect();
    out.push(("control_stream", "all_kinds.bin".into(), stream));
    out.push((
        "control_stream",
        "grant_data_done.bin".into(),
        [Control::Grant { xfer: 1, flow: 2 }, Control::Data { flow: 2, len: 9 }, Control::Done { xfer: 1, len: 9 }]
            .iter()
            .flat_map(control_frame)
            .collect(),
    ));
    for (name, msg) in sample_handshakes() {
        let frame = handshake_frame(&msg);
        out.push(("frame_header", format!("{name}.bin"), frame[..HEADER_LEN].to_vec()));
        out.push(("handshake", format!("{name}.bin"), frame));
    }
    for (name, ch) in sample_channel_hellos() {
        out.push(("channel_hello", format!("{name}.bin"), ch.to_bytes().to_vec()));
    }
    for (name, item) in sample_fifo_items() {
        out.push(("fifo_item", format!("{name}.bin"), item.to_bytes().to_vec()));
    }
    out
}

fn seed_is_valid(target: &str, bytes: &[u8]) -> bool {
    match target {
        "frame_header" => bytes.try_into().ok().is_some_and(|h: [u8; HEADER_LEN]| FrameHeader::parse(&h).is_ok()),
        "control" => check_control(bytes),
        "control_stream" => {
            let mut rest = bytes;
            while let Ok(Some((_, used))) = decode_frame(rest) {
                rest = &rest[used..];
            }
            rest.is_empty() && !bytes.is_empty()
        }
        "handshake" => check_handshake(bytes),
        "channel_hello" => check_channel_hello(bytes),
        "fifo_item" => bytes.try_into().ok().is_some_and(|b: [u8; FIFO_LEN]| check_fifo_item(&b)),
        other => panic!("unknown fuzz target {other}"),
    }
}

#[test]
fn seed_corpus_is_valid_and_complete() {
    let dir = corpus_dir();
    if std::env::var_os("UCCL_TCPX_WRITE_FUZZ_CORPUS").is_some() {
        for (target, name, bytes) in seeds() {
            let d = dir.join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), bytes).unwrap();
        }
    }
    for (target, name, bytes) in seeds() {
        assert!(seed_is_valid(target, &bytes), "generated seed {target}/{name} does not decode");
        let path = dir.join(target).join(&name);
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with UCCL_TCPX_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_proto",
                path.display()
            )
        });
        assert_eq!(on_disk, bytes, "{} is stale: regenerate it", path.display());
    }
    // No checked-in seed (`*.bin`) may have stopped decoding either. Files a fuzzing run adds
    // (hash-named, ignored by git) are arbitrary inputs and are not checked.
    for target in ["frame_header", "control", "control_stream", "handshake", "channel_hello", "fifo_item"] {
        for entry in std::fs::read_dir(dir.join(target)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "bin") {
                let bytes = std::fs::read(&path).unwrap();
                assert!(seed_is_valid(target, &bytes), "{} no longer decodes", path.display());
            }
        }
    }
}
