//! Property tests of every wire decoder reachable through the public API: `FrameHeader::parse`,
//! `Control::decode`, `control::decode_frame`, `Handshake::decode`, `ChannelHello::from_bytes`,
//! `FifoItem::from_bytes` and `FifoItem::capability`.
//!
//! Inputs are random bytes, mutated valid encodings (bit flips, byte overwrites, truncation,
//! extension, inserted and removed ranges, splices of two samples, boundary integers written over
//! length and id fields) and structured random messages, drawn by proptest. Every decoder must
//! return instead of panicking, and anything that decodes must re-encode to exactly the bytes it
//! came from (the codec is canonical); for structured messages `validate()` succeeds exactly when
//! the message round-trips. A failure is shrunk to a small input, reported with it, and saved under
//! `tests/proptest-regressions/` so the next run tries it first. `UCCL_TCPX_FUZZ_SCALE` multiplies
//! the case counts for longer local runs (the defaults keep the file to seconds in a debug build on
//! two cores). Coverage-guided fuzzing of the same decoders lives in `fuzz/` (docs/TESTING.md).
//!
//! `UCCL_TCPX_WRITE_FUZZ_CORPUS=1 cargo test --test fuzz_proto seed_corpus` rewrites the checked-in
//! seed corpus under `fuzz/corpus/`; without it that test checks every checked-in seed still decodes.

use std::cell::Cell;
use std::fmt::Debug;
use std::path::PathBuf;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config as RunnerConfig, FileFailurePersistence, TestRunner};
use uccl_tcpx::FifoItem;
use uccl_tcpx::internal::proto::control::decode_frame;
use uccl_tcpx::internal::proto::frame::{is_handshake_kind, max_body_len};
use uccl_tcpx::internal::proto::{
    AuthChallenge, AuthHello, AuthProof, Capability, ChannelHello, Control, FrameHeader, Handshake, Hello,
    HostIdentity, Place, Refuse, RemoteSeg, VectorRun, Welcome,
};

/// `proto::FRAME_HEADER_LEN` is crate-private; `FrameHeader::to_bytes` pins the same number.
const HEADER_LEN: usize = 8;
/// `proto::PROTOCOL_VERSION` is crate-private; the handshake tests below prove it is 27.
const VERSION: u16 = 27;
const CHANNEL_HELLO_LEN: usize = 16;
const FIFO_LEN: usize = 64;
/// Protocol limits (crate-private in `proto`); `limits_match_the_codec` checks each against the codec.
const MAX_NAME_LEN: usize = 255;
const MAX_REASON_LEN: usize = 1024;
/// `proto::MAX_INLINE_LEN`; the size-limit tests below prove it.
const MAX_INLINE: usize = 256 << 10;
/// `proto::INLINE_LEN_FLOOR`: an eager send is longer.
const INLINE_FLOOR: u64 = 64 << 10;
const MAX_ID_LEN: usize = 64;
const MAX_TRANSPORT_NAME_LEN: usize = 32;
/// `proto::MAX_VECTOR_SEGMENTS` and `MAX_VECTOR_BYTES`; `limits_match_the_codec` proves them.
const MAX_VECTOR_SEGMENTS: usize = 1 << 16;
const MAX_VECTOR_BYTES: u64 = 1 << 32;

// ---------------------------------------------------------------------------------------------
// Running properties.

/// Checks `check` on `cases` values of `strategy` (times `UCCL_TCPX_FUZZ_SCALE`); returns how many
/// it accepted (returned true for) and how many it saw. A panic inside, a decoder's or a failed
/// assertion's, fails the test with the shrunk input.
fn run<S>(what: &str, cases: u32, strategy: S, check: impl Fn(&S::Value) -> bool) -> (u32, u32)
where
    S: Strategy,
    S::Value: Debug,
{
    let scale = std::env::var("UCCL_TCPX_FUZZ_SCALE").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1).max(1);
    let config = RunnerConfig {
        cases: cases * scale,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        source_file: Some(file!()),
        ..RunnerConfig::default()
    };
    let (accepted, seen) = (Cell::new(0u32), Cell::new(0u32));
    let result = TestRunner::new(config).run(&strategy, |value| {
        seen.set(seen.get() + 1);
        if check(&value) {
            accepted.set(accepted.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
    eprintln!("{what}: {} inputs, {} accepted", seen.get(), accepted.get());
    (accepted.get(), seen.get())
}

/// A value biased towards the boundaries decoders get wrong.
fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1u64),
        Just(u64::MAX),
        (0u64..4).prop_map(|d| u64::MAX - d),
        (0u64..3).prop_map(|d| u64::from(u32::MAX) + d - 1),
        (0u32..64).prop_map(|b| 1u64 << b),
        0u64..300,
        any::<u64>(),
    ]
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(u32::MAX), (0u32..32).prop_map(|b| 1u32 << b), 0u32..5000, any::<u32>(), any::<u32>()]
}

/// One edit of an encoding; positions are drawn as fractions of whatever length the bytes have by then.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    Remove(Index, Index),
    Insert(Index, Vec<u8>),
    /// Overwrites a (possible) length or id field with a boundary value.
    Write16(Index, u16),
    Write32(Index, u32),
    Write64(Index, u64),
    /// Our head, another sample's tail: (cut, which sample, from where in it).
    Splice(Index, Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let u16s = select(vec![0u16, 1, 0xff, 0x100, u16::MAX, 7, 64, 65]);
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, v)| Mutation::SetByte(at, v)),
        any::<Index>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..=16).prop_map(Mutation::Extend),
        (any::<Index>(), any::<Index>()).prop_map(|(at, n)| Mutation::Remove(at, n)),
        (any::<Index>(), vec(any::<u8>(), 1..=8)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        (any::<Index>(), u16s).prop_map(|(at, v)| Mutation::Write16(at, v)),
        (any::<Index>(), interesting_u32()).prop_map(|(at, v)| Mutation::Write32(at, v)),
        (any::<Index>(), interesting_u64()).prop_map(|(at, v)| Mutation::Write64(at, v)),
        (any::<Index>(), any::<Index>(), any::<Index>()).prop_map(|(c, o, f)| Mutation::Splice(c, o, f)),
    ]
}

fn apply(m: &Mutation, out: &mut Vec<u8>, pool: &[Vec<u8>]) {
    let len = out.len();
    let mut write = |at: &Index, bytes: &[u8]| {
        if len >= bytes.len() {
            let at = at.index(len - bytes.len() + 1);
            out[at..at + bytes.len()].copy_from_slice(bytes);
        }
    };
    match m {
        Mutation::FlipBit(at, bit) if len > 0 => out[at.index(len)] ^= 1 << bit,
        Mutation::SetByte(at, v) if len > 0 => out[at.index(len)] = *v,
        Mutation::Truncate(at) => out.truncate(at.index(len + 1)),
        Mutation::Extend(bytes) => out.extend_from_slice(bytes),
        Mutation::Remove(at, n) if len > 0 => {
            let at = at.index(len);
            let n = 1 + n.index(len - at);
            out.drain(at..at + n);
        }
        Mutation::Insert(at, bytes) => {
            let at = at.index(len + 1);
            out.splice(at..at, bytes.iter().copied());
        }
        Mutation::Write16(at, v) => write(at, &v.to_le_bytes()),
        Mutation::Write32(at, v) => write(at, &v.to_le_bytes()),
        Mutation::Write64(at, v) => write(at, &v.to_le_bytes()),
        Mutation::Splice(cut, which, from) if !pool.is_empty() => {
            let other = &pool[which.index(pool.len())];
            out.truncate(cut.index(len + 1));
            out.extend_from_slice(&other[from.index(other.len() + 1)..]);
        }
        _ => {}
    }
}

/// 1 to 4 stacked mutations.
fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(), 1..=4)
}

fn mutate(base: &[u8], ms: &[Mutation], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut out = base.to_vec();
    for m in ms {
        apply(m, &mut out, pool);
    }
    out
}

/// A mutated copy of a member of `pool`.
fn mutated(pool: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (any::<Index>(), mutations()).prop_map(move |(which, ms)| mutate(&pool[which.index(pool.len())], &ms, &pool))
}

/// A frame whose header parses, with a random body of exactly the announced length; the kind is
/// mostly one of `kinds`.
fn framed(kinds: Vec<u8>, max_body: usize) -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![7 => select(kinds), 1 => any::<u8>()];
    (kind, vec(any::<u8>(), 0..max_body)).prop_map(|(kind, body)| {
        let mut f = FrameHeader { kind, body_len: body.len() as u32 }.to_bytes().to_vec();
        f.extend(body);
        f
    })
}

/// A string of up to about `max_bytes` (a few bytes more at times) of one- to four-byte characters.
fn utf8_string(max_bytes: usize) -> impl Strategy<Value = String> {
    const CHARS: [char; 8] = ['a', 'Z', '0', '-', ':', 'é', '€', '𝄞'];
    let target = prop_oneof![0..=max_bytes, (max_bytes.saturating_sub(2))..=max_bytes];
    (target, vec(select(&CHARS[..]), 1..=8)).prop_map(|(target, chars)| {
        let mut s = String::new();
        for c in chars.iter().cycle() {
            if s.len() >= target {
                break;
            }
            s.push(*c);
        }
        s
    })
}

fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(96).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 96 { format!("{shown}… ({} bytes)", bytes.len()) } else { shown }
}

// ---------------------------------------------------------------------------------------------
// Valid samples (the seeds for mutation and for the checked-in corpus).

fn net_handle(seed: u8) -> [u8; 128] {
    core::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
}

fn sample_controls() -> Vec<(&'static str, Control)> {
    vec![
        ("send_announce", Control::SendAnnounce { xfer: 1, len: 4096 }),
        ("eager_send", Control::EagerSend { xfer: 3, len: (64 << 10) + 1 }),
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
        ("resume", Control::Resume { xfer: 22 }),
        (
            "write_vector",
            Control::WriteVector {
                xfer: 22,
                region: 23,
                token: 24,
                segs: vec![RemoteSeg { addr: 0x1000, len: 4096 }, RemoteSeg { addr: 0x9000, len: 17 }],
            },
        ),
        (
            "read_vector",
            Control::ReadVector {
                xfer: 25,
                region: 26,
                token: 27,
                segs: vec![RemoteSeg { addr: u64::MAX - 8, len: 8 }],
            },
        ),
        (
            "write_runs",
            Control::WriteRuns {
                xfer: 30,
                runs: vec![VectorRun { region: 31, token: 32, segs: 1 }, VectorRun { region: 33, token: 34, segs: 2 }],
                segs: vec![
                    RemoteSeg { addr: 0x1000, len: 4096 },
                    RemoteSeg { addr: 0x9000, len: 17 },
                    RemoteSeg { addr: 0x4000, len: 16 << 10 },
                ],
            },
        ),
        (
            "read_runs",
            Control::ReadRuns {
                xfer: 35,
                runs: vec![VectorRun { region: 36, token: 37, segs: 1 }, VectorRun { region: 36, token: 38, segs: 1 }],
                segs: vec![RemoteSeg { addr: 0x2000, len: 8 }, RemoteSeg { addr: u64::MAX - 8, len: 8 }],
            },
        ),
        (
            "ipc_request",
            Control::IpcRequest {
                xfer: (1 << 63) | 1,
                region: 28,
                token: 29,
                segs: vec![RemoteSeg { addr: 0x7f00_0000_1000, len: 8 }],
            },
        ),
        (
            "ipc_grant",
            Control::IpcGrant {
                xfer: (1 << 63) | 1,
                region: 28,
                handle: [0x5a; 64],
                alloc_base: 0x7f00_0000_0000,
                alloc_len: 2 << 20,
                windows: vec![RemoteSeg { addr: 0x7f00_0000_1000, len: 4096 }],
            },
        ),
        (
            "ipc_send",
            Control::IpcSend {
                xfer: 31,
                len: 4099,
                region: 32,
                addr: 0x7f00_0000_1003,
                handle: [0x3c; 64],
                alloc_base: 0x7f00_0000_0000,
                alloc_len: 2 << 20,
            },
        ),
        ("ipc_revoke", Control::IpcRevoke { region: 30 }),
        ("ipc_revoked", Control::IpcRevoked { region: 30 }),
        ("process_hello", Control::ProcessHello { pid: 4321, fd: 9 }),
        ("process_ack", Control::ProcessAck { readable: true }),
        (
            "direct_write",
            Control::DirectWrite {
                xfer: 28,
                region: 29,
                token: 30,
                segs: vec![RemoteSeg { addr: 0x1000, len: 4096 }, RemoteSeg { addr: 0x9000, len: 17 }],
                src: vec![0x7f00_0000_0000, 0x20],
                huge: false,
            },
        ),
        (
            "direct_read",
            Control::DirectRead { xfer: 31, region: 32, token: 33, segs: vec![RemoteSeg { addr: 0x4000, len: 8 }] },
        ),
        ("direct_grant", Control::DirectGrant { xfer: 34, huge: true }),
        ("direct_done", Control::DirectDone { xfer: 35 }),
        ("park_channels", Control::ParkChannels { epoch: 1 }),
        ("channels_parked", Control::ChannelsParked { epoch: 1, parked: true }),
        ("want_channels", Control::WantChannels { epoch: 1 }),
        ("open_channels", Control::OpenChannels { epoch: 2, handles: vec![net_handle(5), net_handle(6)] }),
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
        host: HostIdentity { boot_id: [0x5b; 16], netns: 4_026_531_840, pid: 1234 },
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
        host: HostIdentity::default(),
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
        ("auth_hello", Handshake::AuthHello(AuthHello { challenge: std::array::from_fn(|i| i as u8) })),
        (
            "auth_challenge",
            Handshake::AuthChallenge(AuthChallenge {
                challenge: [0xa5; 32],
                proof: std::array::from_fn(|i| !(i as u8)),
            }),
        ),
        ("auth_proof", Handshake::AuthProof(AuthProof { proof: [0x5a; 32] })),
    ]
}

fn sample_channel_hellos() -> Vec<(&'static str, ChannelHello)> {
    vec![
        ("first", ChannelHello { channel: 0, nonce: 0x1122_3344_5566_7788 }),
        ("last", ChannelHello { channel: 63, nonce: u64::MAX }),
    ]
}

fn sample_fifo_items() -> Vec<(&'static str, FifoItem)> {
    let cap = Capability { region: 3, token: 0xa1a2_a3a4_a5a6_a7a8, place: Place::gpu(1) };
    let mut patched = FifoItem::with_capability(0x7f12_3456_0000, 1 << 20, cap);
    patched.addr += 4096;
    patched.size -= 4096;
    vec![
        ("minted", FifoItem::with_capability(0x7f12_3456_0000, 1 << 20, cap)),
        ("patched", patched),
        (
            "max_size",
            FifoItem::with_capability(1, u32::MAX, Capability { region: u64::MAX, token: 0, place: Place::host() }),
        ),
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
fn decode_control_frame(frame: &[u8]) -> Option<Result<Control, uccl_tcpx::internal::proto::ProtoError>> {
    split_frame(frame).map(|(h, body)| Control::decode(&h, body))
}

fn decode_handshake_frame(frame: &[u8]) -> Option<Result<Handshake, uccl_tcpx::internal::proto::ProtoError>> {
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
            assert_eq!(
                FifoItem {
                    rkey: item.rkey,
                    nmsgs: item.nmsgs,
                    rid: item.rid,
                    idx: item.idx,
                    engine_offset: item.engine_offset,
                    ..minted
                },
                item
            );
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
    let eager = |len: u64| Control::EagerSend { xfer: 1, len };
    assert!(eager(INLINE_FLOOR).validate().is_err() && eager(INLINE_FLOOR + 1).validate().is_ok());
    let vector = |n: usize, len: u32| Control::WriteVector {
        xfer: 1,
        region: 1,
        token: 1,
        segs: (0..n as u64).map(|i| RemoteSeg { addr: i << 12, len }).collect(),
    };
    assert!(vector(MAX_VECTOR_SEGMENTS, 1).validate().is_ok());
    assert!(vector(MAX_VECTOR_SEGMENTS + 1, 1).validate().is_err());
    assert!(vector(0, 1).validate().is_err());
    let per = u32::try_from(MAX_VECTOR_BYTES / 4).unwrap();
    assert!(vector(4, per).validate().is_ok());
    assert!(
        Control::ReadVector {
            xfer: 1,
            region: 1,
            token: 1,
            segs: vec![
                RemoteSeg { addr: 0, len: per },
                RemoteSeg { addr: 0, len: per },
                RemoteSeg { addr: 0, len: per },
                RemoteSeg { addr: 0, len: per },
                RemoteSeg { addr: 0, len: 1 }
            ]
        }
        .validate()
        .is_err()
    );
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
    let seeds: Vec<Vec<u8>> = sample_controls()
        .iter()
        .map(|(_, m)| control_frame(m)[..HEADER_LEN].to_vec())
        .chain(sample_handshakes().iter().map(|(_, m)| handshake_frame(m)[..HEADER_LEN].to_vec()))
        .collect();
    let input = prop_oneof![1 => vec(any::<u8>(), HEADER_LEN), 2 => mutated(seeds)].prop_map(|mut m| {
        m.resize(HEADER_LEN, 0);
        <[u8; HEADER_LEN]>::try_from(m).unwrap()
    });
    let (accepted, seen) = run("FrameHeader::parse", 20_000, input, |bytes| match FrameHeader::parse(bytes) {
        Ok(h) => {
            assert_eq!(&h.to_bytes(), bytes, "header re-encodes differently");
            assert_eq!(h.validate(), Ok(()));
            assert!(h.body_len as usize <= max_body_len(h.kind).expect("a parsed kind is known"));
            true
        }
        Err(_) => false,
    });
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
    assert!(accepted > seen / 20, "only {accepted} of {seen} headers parsed");
}

/// Decoding `body` under a hand-built header whose length may disagree with it: refused, or (when
/// the lengths agree) canonical.
fn check_hand_built<T>(
    kind: u8,
    body_len: u32,
    body: &[u8],
    decode: impl Fn(&FrameHeader, &[u8]) -> Result<T, uccl_tcpx::internal::proto::ProtoError>,
    encode: impl Fn(&T) -> Vec<u8>,
) {
    let header = FrameHeader { kind, body_len };
    if let Ok(msg) = decode(&header, body) {
        assert_eq!(header.body_len as usize, body.len());
        let mut expect = header.to_bytes().to_vec();
        expect.extend_from_slice(body);
        assert_eq!(encode(&msg), expect, "input {}", hex(&expect));
    }
}

#[test]
fn control_frames_random_and_mutated() {
    let seeds: Vec<Vec<u8>> = sample_controls().iter().map(|(_, m)| control_frame(m)).collect();
    let kinds: Vec<u8> = sample_controls().iter().map(|(_, m)| m.kind()).collect();
    let frame = prop_oneof![1 => framed(kinds, 64), 1 => vec(any::<u8>(), 0..80), 2 => mutated(seeds)];
    let (accepted, seen) = run("Control::decode", 20_000, (frame, interesting_u32()), |(frame, hand_len)| {
        // Hand-built headers whose fields disagree with the body must be refused, not trusted.
        if frame.len() >= HEADER_LEN {
            check_hand_built(frame[2], *hand_len, &frame[HEADER_LEN..], Control::decode, control_frame);
        }
        check_control(frame)
    });
    assert!(accepted > seen / 50, "only {accepted} of {seen} control frames decoded");
}

#[test]
fn control_stream_decoder_on_random_splits() {
    let samples: Vec<Control> = sample_controls().into_iter().map(|(_, m)| m).collect();
    let seeds: Vec<Vec<u8>> = samples.iter().map(control_frame).collect();
    // A stream of valid frames, possibly mutated somewhere, possibly cut at some point.
    let stream = (
        vec(select(samples), 1..=6),
        proptest::option::of(mutations()),
        proptest::option::weighted(0.33, any::<Index>()),
    );
    let complete = Cell::new(0u32);
    run("control::decode_frame", 4_000, stream, |(msgs, muts, cut)| {
        let mut stream: Vec<u8> = msgs.iter().flat_map(control_frame).collect();
        if let Some(ms) = muts {
            stream = mutate(&stream, ms, &seeds);
        }
        let cut = cut.as_ref().map_or(stream.len(), |c| c.index(stream.len() + 1));
        let mut rest = &stream[..cut];
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
        let intact = muts.is_none() && cut == stream.len();
        if intact {
            assert!(rest.is_empty());
            assert_eq!(&decoded, msgs);
            complete.set(complete.get() + 1);
        }
        intact
    });
    assert!(complete.get() > 0, "no intact stream was fully decoded");
}

#[test]
fn handshake_frames_random_and_mutated() {
    let seeds: Vec<Vec<u8>> = sample_handshakes().iter().map(|(_, m)| handshake_frame(m)).collect();
    let kinds: Vec<u8> = sample_handshakes().iter().map(|(_, m)| m.kind()).collect();
    let frame = prop_oneof![1 => framed(kinds, 400), 1 => vec(any::<u8>(), 0..400), 2 => mutated(seeds)];
    let (accepted, seen) = run("Handshake::decode", 10_000, (frame, interesting_u32()), |(frame, hand_len)| {
        if frame.len() >= HEADER_LEN {
            check_hand_built(frame[2], *hand_len, &frame[HEADER_LEN..], Handshake::decode, handshake_frame);
        }
        check_handshake(frame)
    });
    assert!(accepted > seen / 50, "only {accepted} of {seen} handshake frames decoded");
}

/// Inline payloads: any length up to past the limit, the boundaries often.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![0..MAX_INLINE + 8, select(vec![0, 1, MAX_INLINE - 1, MAX_INLINE, MAX_INLINE + 1])];
    (len, any::<u8>()).prop_map(|(n, b)| vec![b; n])
}

fn request() -> impl Strategy<Value = (u64, u64, u64, u64)> {
    (any::<u64>(), interesting_u64(), any::<u64>(), interesting_u64())
}

fn control() -> impl Strategy<Value = Control> {
    let name_len = prop_oneof![3 => 0usize..40, 1 => (MAX_NAME_LEN - 1)..=(MAX_NAME_LEN + 1)];
    let name = (name_len.prop_flat_map(|n| vec(b'a'..=b'z', n)), proptest::option::weighted(0.25, any::<Index>()))
        .prop_map(|(mut name, nul)| {
            if let Some(at) = nul
                && !name.is_empty()
            {
                let at = at.index(name.len());
                name[at] = 0;
            }
            name
        });
    let small_len = prop_oneof![(0..MAX_INLINE as u64 + 8), interesting_u64()];
    prop_oneof![
        (interesting_u64(), interesting_u64()).prop_map(|(xfer, len)| Control::SendAnnounce { xfer, len }),
        (interesting_u64(), interesting_u64()).prop_map(|(xfer, len)| Control::EagerSend { xfer, len }),
        (request(), interesting_u64()).prop_map(|((xfer, region, token, addr), len)| Control::WriteRequest {
            xfer,
            region,
            token,
            addr,
            len
        }),
        (request(), interesting_u64()).prop_map(|((xfer, region, token, addr), len)| Control::ReadRequest {
            xfer,
            region,
            token,
            addr,
            len
        }),
        (interesting_u64(), interesting_u64()).prop_map(|(xfer, flow)| Control::Grant { xfer, flow }),
        (any::<u64>(), interesting_u32(), utf8_string(MAX_REASON_LEN + 8))
            .prop_map(|(xfer, status, reason)| Control::Deny { xfer, status: status as i32, reason }),
        (interesting_u64(), interesting_u64()).prop_map(|(flow, len)| Control::Data { flow, len }),
        (interesting_u64(), interesting_u64()).prop_map(|(xfer, len)| Control::Done { xfer, len }),
        (name, vec(any::<u8>(), 0..600)).prop_map(|(name, msg)| Control::Notify { name, msg }),
        (request(), payload()).prop_map(|((xfer, region, token, addr), payload)| Control::InlineWrite {
            xfer,
            region,
            token,
            addr,
            payload
        }),
        (request(), small_len).prop_map(|((xfer, region, token, addr), len)| Control::ReadSmall {
            xfer,
            region,
            token,
            addr,
            len
        }),
        (any::<u64>(), payload()).prop_map(|(xfer, payload)| Control::ReadData { xfer, payload }),
        interesting_u64().prop_map(|xfer| Control::Resume { xfer }),
        (request(), segments(), any::<bool>()).prop_map(|((xfer, region, token, _), segs, write)| if write {
            Control::WriteVector { xfer, region, token, segs }
        } else {
            Control::ReadVector { xfer, region, token, segs }
        }),
        // The segments in runs of 0 to 3 segments (a run of none, or counts that do not add up,
        // is invalid), each its region and token.
        (request(), segments(), vec(0u32..4, 0..40), any::<bool>()).prop_map(
            |((xfer, region, token, _), segs, counts, write)| {
                let runs = counts
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| VectorRun { region: region ^ i as u64, token, segs: n })
                    .collect();
                if write { Control::WriteRuns { xfer, runs, segs } } else { Control::ReadRuns { xfer, runs, segs } }
            }
        ),
        Just(Control::Close),
    ]
}

/// A vector request's segments: usually a few, now and then around the count limit; addresses and
/// lengths from the boundary values (wrapping, zero, past the byte limit together).
fn segments() -> impl Strategy<Value = Vec<RemoteSeg>> {
    let seg = (interesting_u64(), prop_oneof![0u32..(1 << 20), interesting_u32()])
        .prop_map(|(addr, len)| RemoteSeg { addr, len });
    let count = prop_oneof![200 => 0usize..9, 1 => (MAX_VECTOR_SEGMENTS - 1)..=(MAX_VECTOR_SEGMENTS + 1)];
    (count, vec(seg, 1..9)).prop_map(|(n, pool)| (0..n).map(|i| pool[i % pool.len()]).collect())
}

fn handshake() -> impl Strategy<Value = Handshake> {
    let version = prop_oneof![7 => Just(VERSION), 1 => any::<u16>()];
    let channels = select(vec![0u16, 1, 2, 63, 64, 65, u16::MAX]);
    let chunk = prop_oneof![1 => Just(0u32), 7 => interesting_u32()];
    let common = (version, any::<u64>(), channels, chunk, any::<i32>(), any::<u8>());
    let id = || utf8_string(MAX_ID_LEN + 4);
    let transport = || utf8_string(MAX_TRANSPORT_NAME_LEN + 4);
    prop_oneof![
        (common.clone(), any::<u64>(), id(), id(), transport()).prop_map(
            |(
                (version, capabilities, num_channels, chunk_size, gpu_index, h),
                nonce,
                gpu_id,
                requested_gpu,
                transport,
            )| {
                Handshake::Hello(Hello {
                    version,
                    capabilities,
                    nonce,
                    num_channels,
                    chunk_size,
                    gpu_index,
                    gpu_id,
                    requested_gpu,
                    transport,
                    net_handle: net_handle(h),
                    host: HostIdentity { boot_id: [h; 16], netns: u64::from(h), pid: u32::from(h) },
                })
            }
        ),
        (common, id(), transport()).prop_map(
            |((version, capabilities, num_channels, chunk_size, gpu_index, h), gpu_id, transport)| {
                Handshake::Welcome(Welcome {
                    version,
                    capabilities,
                    num_channels,
                    chunk_size,
                    gpu_index,
                    gpu_id,
                    transport,
                    net_handle: net_handle(h),
                    host: HostIdentity { boot_id: [h; 16], netns: u64::from(h), pid: u32::from(h) },
                })
            }
        ),
        (any::<i32>(), utf8_string(MAX_REASON_LEN + 8))
            .prop_map(|(status, reason)| Handshake::Refuse(Refuse { status, reason })),
        any::<[u8; 32]>().prop_map(|challenge| Handshake::AuthHello(AuthHello { challenge })),
        (any::<[u8; 32]>(), any::<[u8; 32]>())
            .prop_map(|(challenge, proof)| Handshake::AuthChallenge(AuthChallenge { challenge, proof })),
        any::<[u8; 32]>().prop_map(|proof| Handshake::AuthProof(AuthProof { proof })),
    ]
}

#[test]
fn structured_messages_round_trip_exactly_when_valid() {
    let (valid, seen) = run("Control round trip", 6_000, control(), |msg| {
        let frame = control_frame(msg);
        let decoded =
            decode_control_frame(&frame).unwrap_or(Err(uccl_tcpx::internal::proto::ProtoError::Invalid("header")));
        match msg.validate() {
            Ok(()) => {
                assert_eq!(decoded, Ok(msg.clone()));
                assert_eq!(decode_frame(&frame), Ok(Some((msg.clone(), frame.len()))));
                true
            }
            Err(_) => {
                assert!(decoded.is_err(), "{msg:?} fails validate but decodes");
                assert!(decode_frame(&frame).is_err());
                false
            }
        }
    });
    let invalid = seen - valid;
    assert!(valid > 100 && invalid > 100, "valid {valid}, invalid {invalid}");
    let (valid, seen) = run("Handshake round trip", 6_000, handshake(), |hs| {
        let frame = handshake_frame(hs);
        let decoded =
            decode_handshake_frame(&frame).unwrap_or(Err(uccl_tcpx::internal::proto::ProtoError::Invalid("header")));
        match hs.validate() {
            Ok(()) => {
                assert_eq!(decoded, Ok(hs.clone()));
                true
            }
            Err(_) => {
                assert!(decoded.is_err(), "{hs:?} fails validate but decodes");
                false
            }
        }
    });
    assert!(valid > 100 && seen - valid > 100, "valid {valid} of {seen} handshakes");
}

#[test]
fn channel_hellos_random_and_mutated() {
    let seeds: Vec<Vec<u8>> = sample_channel_hellos().iter().map(|(_, c)| c.to_bytes().to_vec()).collect();
    let input = prop_oneof![vec(any::<u8>(), 0..CHANNEL_HELLO_LEN + 8), mutated(seeds.clone())];
    let (accepted, seen) = run("ChannelHello::from_bytes", 20_000, input, |bytes| check_channel_hello(bytes));
    // Every channel and reserved value with a valid magic: only reserved == 0 passes.
    let mut b = seeds[0].clone();
    for reserved in [0u16, 1, 0x100, u16::MAX] {
        for channel in [0u16, 1, 64, u16::MAX] {
            b[4..6].copy_from_slice(&channel.to_le_bytes());
            b[6..8].copy_from_slice(&reserved.to_le_bytes());
            assert_eq!(ChannelHello::from_bytes(&b).is_ok(), reserved == 0);
        }
    }
    assert!(accepted > seen / 50, "only {accepted} of {seen} channel hellos decoded");
}

#[test]
fn fifo_items_random_and_mutated() {
    let seeds: Vec<Vec<u8>> = sample_fifo_items().iter().map(|(_, f)| f.to_bytes().to_vec()).collect();
    let input = prop_oneof![vec(any::<u8>(), FIFO_LEN), mutated(seeds)].prop_map(|mut m| {
        m.resize(FIFO_LEN, 0);
        <[u8; FIFO_LEN]>::try_from(m).unwrap()
    });
    let (accepted, _) = run("FifoItem::from_bytes + capability", 20_000, input, check_fifo_item);
    // Any single bit flipped in the capability trailer (magic, version, reserved tail) is refused;
    // the place (bytes 58..60) is the capability's own, like region and token.
    let minted = sample_fifo_items()[0].1.to_bytes();
    for byte in (52..58).chain(60..FIFO_LEN) {
        for bit in 0..8 {
            let mut b = minted;
            b[byte] ^= 1 << bit;
            assert!(!check_fifo_item(&b), "byte {byte} bit {bit} went unnoticed");
        }
    }
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
