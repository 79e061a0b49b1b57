//! Connection setup: Hello / Welcome / Refuse on the control connection (after AuthHello /
//! AuthChallenge / AuthProof when the connector has a key, see `auth`), and the fixed 16-byte
//! `ChannelHello` that opens every data connection.
//!
//! Every handshake body starts with `u32 MAGIC, u16 version`. The version is checked right
//! after the magic, before any other field is interpreted, because a peer on another
//! version may lay out the remaining fields differently.

use super::auth::{AuthChallenge, AuthHello, AuthProof};
use super::frame::{FrameHeader, kind, write_frame};
use super::wire::{Reader, Writer, check_len, put_at};
use super::{
    MAGIC, MAX_CHANNELS, MAX_ID_LEN, MAX_REASON_LEN, MAX_TRANSPORT_NAME_LEN, NET_HANDLE_SIZE, PROTOCOL_VERSION,
    ProtoError,
};

pub(crate) const CHANNEL_MAGIC: u32 = 0x4C48_4355;
pub(crate) const CHANNEL_HELLO_LEN: usize = 16;

/// Which host, network namespace and process an engine runs in, so that two engines can tell that
/// they share a host (and which path their data may take) without comparing addresses. All zero
/// means "not saying": such a peer is always treated as remote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostIdentity {
    /// The kernel's boot id (or the machine id where there is none): equal only on one host.
    pub boot_id: [u8; 16],
    /// Inode of the network namespace: containers on one host with namespaces of their own do not
    /// see each other's loopback, nor (usually) each other's processes.
    pub netns: u64,
    pub pid: u32,
}

impl HostIdentity {
    pub fn is_unknown(&self) -> bool {
        *self == HostIdentity::default()
    }

    /// Both identities known and naming one host and network namespace.
    pub fn same_host(&self, other: &HostIdentity) -> bool {
        !self.is_unknown() && self.boot_id == other.boot_id && self.netns == other.netns
    }

    /// Both identities known and naming one running kernel, whatever the network namespaces:
    /// traffic between them never leaves the machine, so it never passes a NIC.
    pub fn same_kernel(&self, other: &HostIdentity) -> bool {
        !self.is_unknown() && !other.is_unknown() && self.boot_id == other.boot_id
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.bytes(&self.boot_id);
        w.u64(self.netns);
        w.u32(self.pid);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self { boot_id: r.array()?, netns: r.u64()?, pid: r.u32()? })
    }
}

/// Sent by the connecting side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub capabilities: u64,
    /// Echoed in every `ChannelHello` so data connections can be matched to this session.
    pub nonce: u64,
    pub num_channels: u16,
    pub chunk_size: u32,
    pub gpu_index: i32,
    pub gpu_id: String,
    pub requested_gpu: String,
    pub transport: String,
    pub net_handle: [u8; NET_HANDLE_SIZE],
    pub host: HostIdentity,
}

/// The accepting side's answer when it takes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub capabilities: u64,
    pub num_channels: u16,
    pub chunk_size: u32,
    pub gpu_index: i32,
    pub gpu_id: String,
    pub transport: String,
    pub net_handle: [u8; NET_HANDLE_SIZE],
    pub host: HostIdentity,
}

/// The accepting side's answer when it turns the connection down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub status: i32,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    Hello(Hello),
    Welcome(Welcome),
    Refuse(Refuse),
    AuthHello(AuthHello),
    AuthChallenge(AuthChallenge),
    AuthProof(AuthProof),
}

const NOT_HANDSHAKE: ProtoError = ProtoError::Invalid(
    "expected a handshake message (Hello, Welcome, Refuse or an authentication message) but got a control frame",
);

// The text of the channel-count error below quotes this value.
const _: () = assert!(MAX_CHANNELS == 64);

fn check_version(theirs: u16) -> Result<(), ProtoError> {
    if theirs != PROTOCOL_VERSION {
        return Err(ProtoError::VersionMismatch { ours: PROTOCOL_VERSION, theirs });
    }
    Ok(())
}

fn check_link(num_channels: u16, chunk_size: u32) -> Result<(), ProtoError> {
    if num_channels == 0 {
        return Err(ProtoError::Invalid("the handshake asks for zero data channels"));
    }
    if num_channels > MAX_CHANNELS {
        return Err(ProtoError::Invalid("the handshake asks for more than the maximum of 64 data channels"));
    }
    if chunk_size == 0 {
        return Err(ProtoError::Invalid("the handshake announces a chunk size of zero"));
    }
    Ok(())
}

fn write_preamble(w: &mut Writer<'_>, version: u16) {
    w.u32(MAGIC);
    w.u16(version);
}

/// Reads magic and version, failing on either before any later field is looked at.
fn read_preamble(r: &mut Reader<'_>) -> Result<u16, ProtoError> {
    let magic = r.u32()?;
    if magic != MAGIC {
        return Err(ProtoError::BadMagic { found: magic });
    }
    let version = r.u16()?;
    check_version(version)?;
    Ok(version)
}

impl Hello {
    fn write(&self, w: &mut Writer<'_>) {
        write_preamble(w, self.version);
        w.u64(self.capabilities);
        w.u64(self.nonce);
        w.u16(self.num_channels);
        w.u32(self.chunk_size);
        w.i32(self.gpu_index);
        w.string16(&self.gpu_id);
        w.string16(&self.requested_gpu);
        w.string16(&self.transport);
        w.bytes(&self.net_handle);
        self.host.write(w);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self {
            version: read_preamble(r)?,
            capabilities: r.u64()?,
            nonce: r.u64()?,
            num_channels: r.u16()?,
            chunk_size: r.u32()?,
            gpu_index: r.i32()?,
            gpu_id: r.string16(MAX_ID_LEN, "gpu_id")?,
            requested_gpu: r.string16(MAX_ID_LEN, "requested_gpu")?,
            transport: r.string16(MAX_TRANSPORT_NAME_LEN, "transport name")?,
            net_handle: r.array()?,
            host: HostIdentity::read(r)?,
        })
    }

    pub fn validate(&self) -> Result<(), ProtoError> {
        check_version(self.version)?;
        check_link(self.num_channels, self.chunk_size)?;
        check_len(self.gpu_id.len(), MAX_ID_LEN, "gpu_id")?;
        check_len(self.requested_gpu.len(), MAX_ID_LEN, "requested_gpu")?;
        check_len(self.transport.len(), MAX_TRANSPORT_NAME_LEN, "transport name")
    }
}

impl Welcome {
    fn write(&self, w: &mut Writer<'_>) {
        write_preamble(w, self.version);
        w.u64(self.capabilities);
        w.u16(self.num_channels);
        w.u32(self.chunk_size);
        w.i32(self.gpu_index);
        w.string16(&self.gpu_id);
        w.string16(&self.transport);
        w.bytes(&self.net_handle);
        self.host.write(w);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self {
            version: read_preamble(r)?,
            capabilities: r.u64()?,
            num_channels: r.u16()?,
            chunk_size: r.u32()?,
            gpu_index: r.i32()?,
            gpu_id: r.string16(MAX_ID_LEN, "gpu_id")?,
            transport: r.string16(MAX_TRANSPORT_NAME_LEN, "transport name")?,
            net_handle: r.array()?,
            host: HostIdentity::read(r)?,
        })
    }

    pub fn validate(&self) -> Result<(), ProtoError> {
        check_version(self.version)?;
        check_link(self.num_channels, self.chunk_size)?;
        check_len(self.gpu_id.len(), MAX_ID_LEN, "gpu_id")?;
        check_len(self.transport.len(), MAX_TRANSPORT_NAME_LEN, "transport name")
    }
}

impl Refuse {
    /// Refuse has no version field of its own; it always speaks ours.
    fn write(&self, w: &mut Writer<'_>) {
        write_preamble(w, PROTOCOL_VERSION);
        w.i32(self.status);
        w.string16(&self.reason);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        read_preamble(r)?;
        Ok(Self { status: r.i32()?, reason: r.string16(MAX_REASON_LEN, "refusal reason")? })
    }

    pub fn validate(&self) -> Result<(), ProtoError> {
        check_len(self.reason.len(), MAX_REASON_LEN, "refusal reason")
    }
}

impl Handshake {
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello(_) => kind::HELLO,
            Self::Welcome(_) => kind::WELCOME,
            Self::Refuse(_) => kind::REFUSE,
            Self::AuthHello(_) => kind::AUTH_HELLO,
            Self::AuthChallenge(_) => kind::AUTH_CHALLENGE,
            Self::AuthProof(_) => kind::AUTH_PROOF,
        }
    }

    /// Appends header and body. Encoding does not validate; call [`Handshake::validate`]
    /// first if the fields come from outside, or the peer will refuse the frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_frame(out, self.kind(), |w| match self {
            Self::Hello(m) => m.write(w),
            Self::Welcome(m) => m.write(w),
            Self::Refuse(m) => m.write(w),
            // Like Refuse, the authentication messages always speak our version.
            Self::AuthHello(m) => {
                write_preamble(w, PROTOCOL_VERSION);
                m.write(w);
            }
            Self::AuthChallenge(m) => {
                write_preamble(w, PROTOCOL_VERSION);
                m.write(w);
            }
            Self::AuthProof(m) => {
                write_preamble(w, PROTOCOL_VERSION);
                m.write(w);
            }
        });
    }

    /// Decodes a body that must be exactly `header.body_len` bytes long.
    pub fn decode(header: &FrameHeader, body: &[u8]) -> Result<Handshake, ProtoError> {
        let what = header.check_body(body)?;
        let mut r = Reader::new(body, what);
        let msg = match header.kind {
            kind::HELLO => Self::Hello(Hello::read(&mut r)?),
            kind::WELCOME => Self::Welcome(Welcome::read(&mut r)?),
            kind::REFUSE => Self::Refuse(Refuse::read(&mut r)?),
            kind::AUTH_HELLO => {
                read_preamble(&mut r)?;
                Self::AuthHello(AuthHello::read(&mut r)?)
            }
            kind::AUTH_CHALLENGE => {
                read_preamble(&mut r)?;
                Self::AuthChallenge(AuthChallenge::read(&mut r)?)
            }
            kind::AUTH_PROOF => {
                read_preamble(&mut r)?;
                Self::AuthProof(AuthProof::read(&mut r)?)
            }
            _ => return Err(NOT_HANDSHAKE),
        };
        r.finish()?;
        msg.validate()?;
        Ok(msg)
    }

    /// The semantic checks `decode` applies, usable on the sending side as well.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Self::Hello(m) => m.validate(),
            Self::Welcome(m) => m.validate(),
            Self::Refuse(m) => m.validate(),
            Self::AuthHello(_) | Self::AuthChallenge(_) | Self::AuthProof(_) => Ok(()),
        }
    }
}

/// First message on every data connection: `u32 CHANNEL_MAGIC, u16 channel, u16 reserved (0),
/// u64 nonce`, with the nonce tying the connection to the Hello that set up the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHello {
    pub channel: u16,
    pub nonce: u64,
}

impl ChannelHello {
    pub fn to_bytes(&self) -> [u8; CHANNEL_HELLO_LEN] {
        let mut out = [0u8; CHANNEL_HELLO_LEN];
        put_at(&mut out, 0, &CHANNEL_MAGIC.to_le_bytes());
        put_at(&mut out, 4, &self.channel.to_le_bytes());
        put_at(&mut out, 8, &self.nonce.to_le_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<ChannelHello, ProtoError> {
        const WHAT: &str = "channel hello";
        if let Some(extra) = b.len().checked_sub(CHANNEL_HELLO_LEN) {
            if extra > 0 {
                return Err(ProtoError::TrailingBytes { what: WHAT, extra });
            }
        } else {
            return Err(ProtoError::Truncated { what: WHAT });
        }
        let mut r = Reader::new(b, WHAT);
        let magic = r.u32()?;
        if magic != CHANNEL_MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        let channel = r.u16()?;
        let reserved = r.u16()?;
        let nonce = r.u64()?;
        r.finish()?;
        if reserved != 0 {
            return Err(ProtoError::Invalid("the reserved field of a channel hello must be zero"));
        }
        Ok(ChannelHello { channel, nonce })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FRAME_HEADER_LEN;
    use crate::proto::testutil::XorShift;

    fn handle(seed: u8) -> [u8; NET_HANDLE_SIZE] {
        core::array::from_fn(|i| seed.wrapping_add(u8::try_from(i).unwrap()))
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            capabilities: 0xdead_beef_0000_0001,
            nonce: 0x0123_4567_89ab_cdef,
            num_channels: 8,
            chunk_size: 512 << 10,
            gpu_index: 3,
            gpu_id: "GPU-0000:8a:00.0".into(),
            requested_gpu: "ünïcödé".into(),
            transport: "tcp".into(),
            net_handle: handle(7),
            host: HostIdentity { boot_id: [0xb0; 16], netns: 0x4000_0001, pid: 4242 },
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            version: PROTOCOL_VERSION,
            capabilities: 5,
            num_channels: 64,
            chunk_size: 1,
            gpu_index: -1,
            gpu_id: String::new(),
            transport: "t".repeat(MAX_TRANSPORT_NAME_LEN),
            net_handle: handle(200),
            host: HostIdentity::default(),
        }
    }

    fn samples() -> Vec<Handshake> {
        let max_hello = Hello {
            num_channels: 1,
            gpu_id: "g".repeat(MAX_ID_LEN),
            requested_gpu: "r".repeat(MAX_ID_LEN),
            transport: "x".repeat(MAX_TRANSPORT_NAME_LEN),
            ..hello()
        };
        vec![
            Handshake::Hello(hello()),
            Handshake::Hello(max_hello),
            Handshake::Welcome(welcome()),
            Handshake::Refuse(Refuse { status: -22, reason: "requested GPU does not exist".into() }),
            Handshake::Refuse(Refuse { status: i32::MIN, reason: "é".repeat(MAX_REASON_LEN / 2) }),
            Handshake::AuthHello(AuthHello { challenge: core::array::from_fn(|i| i as u8) }),
            Handshake::AuthChallenge(AuthChallenge {
                challenge: [0xa5; 32],
                proof: core::array::from_fn(|i| !(i as u8)),
            }),
            Handshake::AuthProof(AuthProof { proof: [0; 32] }),
        ]
    }

    fn encode(msg: &Handshake) -> (FrameHeader, Vec<u8>) {
        let mut out = Vec::new();
        msg.encode(&mut out);
        let header = FrameHeader::parse(out[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        (header, out.split_off(FRAME_HEADER_LEN))
    }

    fn decode_hello(h: Hello) -> Result<Handshake, ProtoError> {
        let (header, body) = encode(&Handshake::Hello(h));
        Handshake::decode(&header, &body)
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let (header, body) = encode(&msg);
            assert_eq!(header.kind, msg.kind());
            assert_eq!(header.body_len as usize, body.len());
            assert_eq!(Handshake::decode(&header, &body), Ok(msg));
        }
    }

    #[test]
    fn hello_body_layout_is_field_order_little_endian() {
        let h = hello();
        let (_, body) = encode(&Handshake::Hello(h.clone()));
        let mut expected = Vec::new();
        expected.extend(MAGIC.to_le_bytes());
        expected.extend(PROTOCOL_VERSION.to_le_bytes());
        expected.extend(h.capabilities.to_le_bytes());
        expected.extend(h.nonce.to_le_bytes());
        expected.extend(h.num_channels.to_le_bytes());
        expected.extend(h.chunk_size.to_le_bytes());
        expected.extend(h.gpu_index.to_le_bytes());
        for s in [&h.gpu_id, &h.requested_gpu, &h.transport] {
            expected.extend(u16::try_from(s.len()).unwrap().to_le_bytes());
            expected.extend(s.as_bytes());
        }
        expected.extend(h.net_handle);
        expected.extend(h.host.boot_id);
        expected.extend(h.host.netns.to_le_bytes());
        expected.extend(h.host.pid.to_le_bytes());
        assert_eq!(body, expected);
    }

    #[test]
    fn refuse_body_layout_is_exact() {
        let msg = Handshake::Refuse(Refuse { status: -2, reason: "no".into() });
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(
            out,
            [
                0x43,
                0x54,
                3,
                0,
                14,
                0,
                0,
                0, // header
                0x55,
                0x43,
                0x54,
                0x58,
                PROTOCOL_VERSION as u8,
                0, // magic, version
                0xfe,
                0xff,
                0xff,
                0xff,
                2,
                0,
                b'n',
                b'o', // status, reason
            ]
        );
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        for msg in samples() {
            let (header, body) = encode(&msg);
            let what = match msg.kind() {
                kind::HELLO => "Hello body",
                kind::WELCOME => "Welcome body",
                kind::AUTH_HELLO => "AuthHello body",
                kind::AUTH_CHALLENGE => "AuthChallenge body",
                kind::AUTH_PROOF => "AuthProof body",
                _ => "Refuse body",
            };
            for cut in 0..body.len() {
                let prefix = &body[..cut];
                assert_eq!(Handshake::decode(&header, prefix), Err(ProtoError::Truncated { what }));
                // Also when the header agrees with the short body, so the field reader itself
                // has to notice the missing bytes.
                let short = FrameHeader { body_len: u32::try_from(cut).unwrap(), ..header };
                assert_eq!(Handshake::decode(&short, prefix), Err(ProtoError::Truncated { what }), "cut at {cut}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for msg in samples() {
            let (header, mut body) = encode(&msg);
            body.push(0);
            assert!(matches!(Handshake::decode(&header, &body), Err(ProtoError::TrailingBytes { extra: 1, .. })));
            let longer = FrameHeader { body_len: header.body_len + 1, ..header };
            assert!(matches!(Handshake::decode(&longer, &body), Err(ProtoError::TrailingBytes { extra: 1, .. })));
        }
    }

    #[test]
    fn bad_magic_is_rejected() {
        for msg in samples() {
            let (header, mut body) = encode(&msg);
            body[0] ^= 0x01;
            assert_eq!(Handshake::decode(&header, &body), Err(ProtoError::BadMagic { found: MAGIC ^ 1 }));
        }
    }

    #[test]
    fn version_is_checked_before_the_rest_of_the_body() {
        for msg in samples() {
            let (_, body) = encode(&msg);
            // Keep only magic and a foreign version: a later version's peer may send anything after it.
            let (ours, theirs) = (PROTOCOL_VERSION, PROTOCOL_VERSION + 1);
            let mut short = body[..6].to_vec();
            short[4..6].copy_from_slice(&theirs.to_le_bytes());
            let header = FrameHeader { kind: msg.kind(), body_len: 6 };
            assert_eq!(Handshake::decode(&header, &short), Err(ProtoError::VersionMismatch { ours, theirs }));
        }
        let err = decode_hello(Hello { version: 0, ..hello() });
        assert_eq!(err, Err(ProtoError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: 0 }));
    }

    #[test]
    fn channel_count_and_chunk_size_are_checked() {
        for n in [0, MAX_CHANNELS + 1, u16::MAX] {
            assert!(matches!(decode_hello(Hello { num_channels: n, ..hello() }), Err(ProtoError::Invalid(_))));
            let (header, body) = encode(&Handshake::Welcome(Welcome { num_channels: n, ..welcome() }));
            assert!(matches!(Handshake::decode(&header, &body), Err(ProtoError::Invalid(_))));
        }
        assert!(matches!(decode_hello(Hello { chunk_size: 0, ..hello() }), Err(ProtoError::Invalid(_))));
        assert!(decode_hello(Hello { num_channels: MAX_CHANNELS, chunk_size: u32::MAX, ..hello() }).is_ok());
    }

    #[test]
    fn overlong_strings_are_rejected() {
        let id = "i".repeat(MAX_ID_LEN + 1);
        let tr = "t".repeat(MAX_TRANSPORT_NAME_LEN + 1);
        let cases = [
            (Hello { gpu_id: id.clone(), ..hello() }, "gpu_id", MAX_ID_LEN),
            (Hello { requested_gpu: id, ..hello() }, "requested_gpu", MAX_ID_LEN),
            (Hello { transport: tr, ..hello() }, "transport name", MAX_TRANSPORT_NAME_LEN),
        ];
        for (h, what, max) in cases {
            let too_long = || ProtoError::TooLong { what, len: max + 1, max };
            assert_eq!(Handshake::Hello(h.clone()).validate(), Err(too_long()));
            assert_eq!(decode_hello(h), Err(too_long()));
        }
        let refuse = Handshake::Refuse(Refuse { status: -1, reason: "r".repeat(MAX_REASON_LEN + 1) });
        let (header, body) = encode(&refuse);
        assert_eq!(
            Handshake::decode(&header, &body),
            Err(ProtoError::TooLong { what: "refusal reason", len: MAX_REASON_LEN + 1, max: MAX_REASON_LEN })
        );
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        // gpu_id bytes start after magic(4) version(2) caps(8) nonce(8) channels(2) chunk(4)
        // gpu_index(4) and the u16 length(2).
        let (header, mut body) = encode(&Handshake::Hello(hello()));
        body[34] = 0xff;
        assert_eq!(Handshake::decode(&header, &body), Err(ProtoError::BadUtf8 { what: "gpu_id" }));
        let (header, mut body) = encode(&Handshake::Refuse(Refuse { status: -1, reason: "ab".into() }));
        body[12..14].copy_from_slice(&[0xc3, 0x28]);
        assert_eq!(Handshake::decode(&header, &body), Err(ProtoError::BadUtf8 { what: "refusal reason" }));
    }

    #[test]
    fn non_handshake_kinds_are_rejected() {
        let (header, body) = encode(&Handshake::Hello(hello()));
        let close = FrameHeader { kind: kind::CLOSE, body_len: 0 };
        assert_eq!(Handshake::decode(&close, &[]), Err(NOT_HANDSHAKE));
        let bogus = FrameHeader { kind: 9, ..header };
        assert_eq!(Handshake::decode(&bogus, &body), Err(ProtoError::UnknownKind(9)));
        let huge = FrameHeader { kind: kind::HELLO, body_len: 4097 };
        assert!(matches!(Handshake::decode(&huge, &[0; 4097]), Err(ProtoError::TooLong { max: 4096, .. })));
    }

    #[test]
    fn host_identity_compares_host_and_namespace_never_unknown() {
        let a = HostIdentity { boot_id: [1; 16], netns: 7, pid: 10 };
        assert!(a.same_host(&HostIdentity { pid: 11, ..a }));
        assert!(!a.same_host(&HostIdentity { netns: 8, ..a }));
        assert!(!a.same_host(&HostIdentity { boot_id: [2; 16], ..a }));
        assert!(!a.same_host(&HostIdentity::default()));
        assert!(!HostIdentity::default().same_host(&HostIdentity::default()));
    }

    #[test]
    fn channel_hello_round_trips_with_exact_layout() {
        let ch = ChannelHello { channel: 0x0102, nonce: 0x1122_3344_5566_7788 };
        let bytes = ch.to_bytes();
        assert_eq!(bytes, [0x55, 0x43, 0x48, 0x4c, 0x02, 0x01, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(ChannelHello::from_bytes(&bytes), Ok(ch));
    }

    #[test]
    fn channel_hello_rejects_wrong_length_magic_and_reserved() {
        let bytes = ChannelHello { channel: 3, nonce: 9 }.to_bytes();
        for cut in 0..CHANNEL_HELLO_LEN {
            assert_eq!(ChannelHello::from_bytes(&bytes[..cut]), Err(ProtoError::Truncated { what: "channel hello" }));
        }
        let mut long = bytes.to_vec();
        long.extend([0, 0]);
        assert_eq!(ChannelHello::from_bytes(&long), Err(ProtoError::TrailingBytes { what: "channel hello", extra: 2 }));
        let mut bad = bytes;
        bad[3] = 0;
        assert_eq!(ChannelHello::from_bytes(&bad), Err(ProtoError::BadMagic { found: 0x0048_4355 }));
        for at in [6, 7] {
            let mut bad = bytes;
            bad[at] = 1;
            assert!(matches!(ChannelHello::from_bytes(&bad), Err(ProtoError::Invalid(_))));
        }
    }

    #[test]
    fn fuzz_random_handshake_bodies_never_panic() {
        let encoded: Vec<(FrameHeader, Vec<u8>)> = samples().iter().map(encode).collect();
        let mut rng = XorShift::new(0xface_b00c);
        let mut accepted = 0;
        for i in 0..10_000 {
            let (header, body) = if i % 2 == 0 {
                let kind = *rng.pick(&[kind::HELLO, kind::WELCOME, kind::REFUSE, kind::GRANT]);
                let body = rng.bytes_below(400);
                let body_len = u32::try_from(body.len()).unwrap();
                (FrameHeader { kind, body_len }, body)
            } else {
                let (header, base) = rng.pick(&encoded);
                let body = rng.mutate(base);
                let body_len = u32::try_from(body.len()).unwrap();
                (FrameHeader { body_len, ..*header }, body)
            };
            if let Ok(msg) = Handshake::decode(&header, &body) {
                accepted += 1;
                // Encodings are canonical: whatever decodes must re-encode to the same bytes.
                let (h2, b2) = encode(&msg);
                assert_eq!((h2, b2), (header, body));
            }
        }
        assert!(accepted > 0, "fuzzing never reached a successful decode");
    }

    #[test]
    fn fuzz_random_channel_hellos_never_panic() {
        let mut rng = XorShift::new(0x0dd_ba11);
        let valid = ChannelHello { channel: 1, nonce: 2 }.to_bytes();
        let mut accepted = 0;
        for i in 0..10_000 {
            let bytes = if i % 2 == 0 { rng.bytes_below(24) } else { rng.mutate(&valid) };
            if let Ok(ch) = ChannelHello::from_bytes(&bytes) {
                accepted += 1;
                assert_eq!(ch.to_bytes().as_slice(), bytes.as_slice());
            }
        }
        assert!(accepted > 0);
    }
}
