//! Control messages exchanged on the control connection once the handshake is done.
//!
//! Fixed-size messages are their fields in declaration order (`u64`/`i32`, little-endian);
//! Deny and Notify carry `u32`-length-prefixed byte strings, and Close has an empty body. The
//! vector requests carry a segment list (`write_segments`: mostly 4 bytes a segment); IpcRequest
//! is laid out like them, and IpcGrant lists the region's windows the same way after the handle
//! (64 bytes) and the allocation's `u64 base, u64 len`. A DirectWrite follows its segments with
//! one `u64` source address per segment, then, as DirectGrant does after its id, a `u32` 0 or 1
//! (as ProcessAck's): whether the memory the receiver copies out of lies on huge pages.

use super::frame::{FRAME_HEADER_LEN, FrameHeader, is_handshake_kind, kind, write_frame};
use super::wire::{Reader, Writer, check_len};
use super::{
    INLINE_LEN_FLOOR, IPC_HANDLE_LEN, MAX_CHANNELS, MAX_EAGER_LEN, MAX_INLINE_LEN, MAX_IPC_WINDOWS, MAX_NAME_LEN,
    MAX_NOTIFY_MSG_LEN, MAX_REASON_LEN, MAX_VECTOR_BYTES, MAX_VECTOR_RUNS, MAX_VECTOR_SEGMENTS, NET_HANDLE_SIZE,
    ProtoError, SEG_NEW_BASE, SEG_SHARED_LEN, VECTOR_RUN_LEN,
};

/// One piece of a remote region that a vector request names: `len` bytes at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSeg {
    pub addr: u64,
    pub len: u32,
}

/// One run of a vector over several regions: its next `segs` segments lie in `region`, which the
/// capability's `token` grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VectorRun {
    pub region: u64,
    pub token: u64,
    pub segs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    SendAnnounce {
        xfer: u64,
        len: u64,
    },
    /// A two-sided message of `INLINE_LEN_FLOOR` to `MAX_EAGER_LEN` bytes whose chunks follow at
    /// once, as the sender's next flow (a write's way): the receiver takes them into its oldest
    /// posted receive, or lands them in its own memory until one is posted, then answers Done or
    /// Deny. Counted against `MAX_INLINE_SEND_BACKLOG` in landing slots (`eager_landing_bytes`).
    EagerSend {
        xfer: u64,
        len: u64,
    },
    /// A write whose chunks follow at once on the channels, as the sender's next flow: the target
    /// receives them into the range when it authorizes it and into scratch memory when it refuses
    /// it, then answers Done or Deny. At most `MAX_VECTOR_BYTES`, which bounds what a refusal
    /// makes the target receive.
    WriteRequest {
        xfer: u64,
        region: u64,
        token: u64,
        addr: u64,
        len: u64,
    },
    ReadRequest {
        xfer: u64,
        region: u64,
        token: u64,
        addr: u64,
        len: u64,
    },
    Grant {
        xfer: u64,
        flow: u64,
    },
    /// `status` is a negative error code.
    Deny {
        xfer: u64,
        status: i32,
        reason: String,
    },
    Data {
        flow: u64,
        len: u64,
    },
    Done {
        xfer: u64,
        len: u64,
    },
    /// `name` is at most `MAX_NAME_LEN` bytes with no NUL, so the receiver can hand it to C
    /// as a NUL-terminated string.
    Notify {
        name: Vec<u8>,
        msg: Vec<u8>,
    },
    Close,
    /// A write small enough to carry its payload; answered with Done or Deny.
    InlineWrite {
        xfer: u64,
        region: u64,
        token: u64,
        addr: u64,
        payload: Vec<u8>,
    },
    /// A read of at most `MAX_INLINE_LEN` bytes; answered with ReadData or Deny.
    ReadSmall {
        xfer: u64,
        region: u64,
        token: u64,
        addr: u64,
        len: u64,
    },
    ReadData {
        xfer: u64,
        payload: Vec<u8>,
    },
    /// A two-sided message small enough to carry its payload; matched like a SendAnnounce and
    /// answered with Done or Deny.
    InlineSend {
        xfer: u64,
        payload: Vec<u8>,
    },
    /// The reader of the running read `xfer` took note of its Deny (the region it reads was
    /// deregistered): the server may send the rest of its chunks, which carry no data.
    Resume {
        xfer: u64,
    },
    /// A write into several pieces of one region: one flow whose bytes fill `segs` in order,
    /// following at once like a WriteRequest's; answered with one Done (every segment authorized)
    /// or one Deny.
    WriteVector {
        xfer: u64,
        region: u64,
        token: u64,
        segs: Vec<RemoteSeg>,
    },
    /// A read of several pieces of one region as one flow, in segment order; answered with Data
    /// (every segment authorized) or Deny.
    ReadVector {
        xfer: u64,
        region: u64,
        token: u64,
        segs: Vec<RemoteSeg>,
    },
    /// A WriteVector over several regions: `runs` divide `segs` among regions and capabilities in
    /// order; one flow, whose chunks never cross from one run into the next. Authorized all or
    /// nothing, every run against its own region.
    WriteRuns {
        xfer: u64,
        runs: Vec<VectorRun>,
        segs: Vec<RemoteSeg>,
    },
    /// A ReadVector over several regions, divided as a WriteRuns'.
    ReadRuns {
        xfer: u64,
        runs: Vec<VectorRun>,
        segs: Vec<RemoteSeg>,
    },
    /// Between processes of one host: asks for the CUDA IPC handle of a GPU region, presenting its
    /// token and the segments about to be copied (every one authorized as a vector request's);
    /// answered with IpcGrant, or Deny (NOT_SUPPORTED when the region has no IPC handle: the
    /// network path carries it instead).
    IpcRequest {
        xfer: u64,
        region: u64,
        token: u64,
        segs: Vec<RemoteSeg>,
    },
    /// The handle of the allocation holding the region, that allocation's range in the owner's
    /// address space, and the windows advertised for the region: the requester may copy into and
    /// out of those windows until the owner revokes the grant.
    IpcGrant {
        xfer: u64,
        region: u64,
        handle: [u8; IPC_HANDLE_LEN],
        alloc_base: u64,
        alloc_len: u64,
        windows: Vec<RemoteSeg>,
    },
    /// The owner deregistered `region`: copy no more into or out of it, and answer IpcRevoked
    /// once no copy that uses it is in flight.
    IpcRevoke {
        region: u64,
    },
    IpcRevoked {
        region: u64,
    },
    /// The connector's channels moved nothing for a while (`UCCL_TCPX_IDLE_CLOSE_MS`): it asks the
    /// acceptor to close both ends' channels, the control stream staying up. `epoch` counts the
    /// channels' lifetimes on this connection (0: the handshake's).
    ParkChannels {
        epoch: u64,
    },
    /// The acceptor's answer: it closed its channels (`parked`), or keeps them, having work.
    ChannelsParked {
        epoch: u64,
        parked: bool,
    },
    /// The acceptor has work for parked channels: the connector opens new ones.
    WantChannels {
        epoch: u64,
    },
    /// Listen handles for the channels of lifetime `epoch`, one a channel (the same one repeated
    /// where one listen serves them all): the connector's offer, then the acceptor's answer. Each
    /// end then connects to the other's and accepts on its own, as at the handshake.
    OpenChannels {
        epoch: u64,
        handles: Vec<[u8; NET_HANDLE_SIZE]>,
    },
    /// Between processes of one host: a two-sided message of GPU memory offered for the receiver
    /// to copy out itself, matched like a SendAnnounce. `[addr, addr + len)` of the sender's
    /// `region` lies in the allocation the handle names (`alloc_base`, `alloc_len`): the receiver
    /// maps it and copies out of that range only, then answers Done (or Deny), and the sender
    /// revokes the region with IpcRevoke when it is deregistered, as for an IpcGrant. The receiver
    /// may answer with Grant instead: the sender then sends the chunks as for a SendAnnounce.
    IpcSend {
        xfer: u64,
        len: u64,
        region: u64,
        addr: u64,
        handle: [u8; IPC_HANDLE_LEN],
        alloc_base: u64,
        alloc_len: u64,
    },
    /// Same-host peers: the sender's process id and the number of its end of this control
    /// connection's socket in that process, for the receiver to check (`engine::same_host::proof`).
    ProcessHello {
        pid: u32,
        fd: u32,
    },
    /// The answer to a ProcessHello: whether the sender proved the claim and the kernel lets it
    /// read the peer's memory, so the peer's writes may ask to be copied in directly.
    ProcessAck {
        readable: bool,
    },
    /// A write of host memory the target may copy in itself from the sender's process: `segs` in the
    /// target's region (authorized like a WriteVector) and, per segment, where the same bytes lie in
    /// the sender, and whether the sender's region holding them lies on huge pages (which only
    /// sizes the target's copy pieces). Answered with Done once copied, with Grant when the target
    /// takes the network path instead, or with Deny.
    DirectWrite {
        xfer: u64,
        region: u64,
        token: u64,
        segs: Vec<RemoteSeg>,
        src: Vec<u64>,
        huge: bool,
    },
    /// A read of host memory the sender may copy out of the target's process itself: answered with
    /// DirectGrant (authorized like a ReadVector), with Data when the target serves it over the
    /// network, or with Deny.
    DirectRead {
        xfer: u64,
        region: u64,
        token: u64,
        segs: Vec<RemoteSeg>,
    },
    /// The target authorized the direct read `xfer`: the reader may copy the segments now. `huge`:
    /// the target's region lies on huge pages (which only sizes the reader's copy pieces).
    DirectGrant {
        xfer: u64,
        huge: bool,
    },
    /// The reader finished copying the direct read `xfer`; the target answers Done, or Deny when
    /// the region was deregistered meanwhile (what was copied cannot be vouched for).
    DirectDone {
        xfer: u64,
    },
}

const HANDSHAKE_AFTER_SETUP: ProtoError =
    ProtoError::Invalid("received a handshake message (Hello, Welcome or Refuse) where a control message was expected");

fn nonzero_len(len: u64) -> Result<(), ProtoError> {
    if len == 0 {
        return Err(ProtoError::Invalid("a transfer length of zero is not allowed"));
    }
    Ok(())
}

/// A remote range must be addressable as a whole, or the access check on the other end
/// could be bypassed by wrap-around.
fn check_range(addr: u64, len: u64) -> Result<(), ProtoError> {
    nonzero_len(len)?;
    match addr.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(ProtoError::Invalid("the requested memory range runs past the end of the address space")),
    }
}

/// A write's chunks follow its request whether or not the target accepts it, so its length bounds
/// what a peer can make the target receive into scratch memory: one advertised window's worth.
fn check_write_len(len: u64) -> Result<(), ProtoError> {
    if len > MAX_VECTOR_BYTES {
        return Err(ProtoError::Invalid("a WriteRequest asks for more than MAX_VECTOR_BYTES"));
    }
    Ok(())
}

fn check_eager_len(len: u64) -> Result<(), ProtoError> {
    if len <= INLINE_LEN_FLOOR as u64 || len > MAX_EAGER_LEN {
        return Err(ProtoError::Invalid(
            "an eager send must be longer than INLINE_LEN_FLOOR and at most MAX_EAGER_LEN",
        ));
    }
    Ok(())
}

fn check_inline(addr: u64, len: usize) -> Result<(), ProtoError> {
    check_len(len, MAX_INLINE_LEN, "inline payload")?;
    check_range(addr, len as u64)
}

/// A non-empty list of at most `MAX_IPC_WINDOWS` windows, each non-empty and inside the allocation.
fn check_grant(alloc_base: u64, alloc_len: u64, windows: &[RemoteSeg]) -> Result<(), ProtoError> {
    if windows.is_empty() {
        return Err(ProtoError::Invalid("an IPC grant must list at least one window"));
    }
    check_len(windows.len(), MAX_IPC_WINDOWS, "IPC grant window list")?;
    check_range(alloc_base, alloc_len)?;
    let alloc_end = alloc_base + alloc_len;
    for w in windows {
        check_range(w.addr, u64::from(w.len))?;
        if w.addr < alloc_base || w.addr + u64::from(w.len) > alloc_end {
            return Err(ProtoError::Invalid("an IPC grant lists a window outside the granted allocation"));
        }
    }
    Ok(())
}

/// An offered message lies inside the allocation its handle names: the receiver copies out of
/// `mapping + (addr - alloc_base)`, so a range past the allocation would have it read past the map.
fn check_ipc_send(addr: u64, len: u64, alloc_base: u64, alloc_len: u64) -> Result<(), ProtoError> {
    check_range(addr, len)?;
    check_range(alloc_base, alloc_len)?;
    if addr < alloc_base || addr + len > alloc_base + alloc_len {
        return Err(ProtoError::Invalid("an IpcSend's range lies outside the allocation it names"));
    }
    Ok(())
}

/// At most `MAX_VECTOR_SEGMENTS` segments and `MAX_VECTOR_BYTES` in all, none empty or wrapping.
fn check_vector(segs: &[RemoteSeg]) -> Result<(), ProtoError> {
    if segs.is_empty() {
        return Err(ProtoError::Invalid("a vector request must name at least one segment"));
    }
    check_len(segs.len(), MAX_VECTOR_SEGMENTS, "vector segment list")?;
    let mut total = 0u64;
    for seg in segs {
        check_range(seg.addr, u64::from(seg.len))?;
        total += u64::from(seg.len);
    }
    if total > MAX_VECTOR_BYTES {
        return Err(ProtoError::Invalid("a vector request asks for more than MAX_VECTOR_BYTES in all"));
    }
    Ok(())
}

/// The runs of a WriteRuns or ReadRuns: at least two (one run is a WriteVector or ReadVector), none
/// empty, together exactly the segments.
fn check_runs(runs: &[VectorRun], segs: usize) -> Result<(), ProtoError> {
    if runs.len() < 2 {
        return Err(ProtoError::Invalid("a vector over several regions must name at least two runs"));
    }
    check_len(runs.len(), MAX_VECTOR_RUNS, "vector run list")?;
    if runs.iter().any(|r| r.segs == 0) {
        return Err(ProtoError::Invalid("a run of a vector over several regions must hold a segment"));
    }
    if runs.iter().map(|r| r.segs as usize).sum::<usize>() != segs {
        return Err(ProtoError::Invalid("the runs of a vector over several regions must add up to its segments"));
    }
    Ok(())
}

/// A `u32` that must say 0 or 1.
fn flag(r: &mut Reader<'_>, invalid: &'static str) -> Result<bool, ProtoError> {
    match r.u32()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtoError::Invalid(invalid)),
    }
}

/// A DirectWrite names one source address per segment, and every source range is addressable.
fn check_sources(segs: &[RemoteSeg], src: &[u64]) -> Result<(), ProtoError> {
    if segs.len() != src.len() {
        return Err(ProtoError::Invalid("a DirectWrite must name one source address per segment"));
    }
    for (seg, &addr) in segs.iter().zip(src) {
        check_range(addr, u64::from(seg.len))?;
    }
    Ok(())
}

fn check_deny(status: i32, reason: &str) -> Result<(), ProtoError> {
    if status >= 0 {
        return Err(ProtoError::Invalid("a Deny message must carry a negative error status"));
    }
    check_len(reason.len(), MAX_REASON_LEN, "Deny reason")
}

fn check_notify(name: &[u8], msg: &[u8]) -> Result<(), ProtoError> {
    check_len(name.len(), MAX_NAME_LEN, "notification name")?;
    check_len(msg.len(), MAX_NOTIFY_MSG_LEN, "notification message")?;
    if name.contains(&0) {
        return Err(ProtoError::Invalid("a notification name must not contain a NUL byte"));
    }
    Ok(())
}

impl Control {
    pub fn kind(&self) -> u8 {
        match self {
            Self::SendAnnounce { .. } => kind::SEND_ANNOUNCE,
            Self::EagerSend { .. } => kind::EAGER_SEND,
            Self::WriteRequest { .. } => kind::WRITE_REQUEST,
            Self::ReadRequest { .. } => kind::READ_REQUEST,
            Self::Grant { .. } => kind::GRANT,
            Self::Deny { .. } => kind::DENY,
            Self::Data { .. } => kind::DATA,
            Self::Done { .. } => kind::DONE,
            Self::Notify { .. } => kind::NOTIFY,
            Self::Close => kind::CLOSE,
            Self::InlineWrite { .. } => kind::INLINE_WRITE,
            Self::ReadSmall { .. } => kind::READ_SMALL,
            Self::ReadData { .. } => kind::READ_DATA,
            Self::InlineSend { .. } => kind::INLINE_SEND,
            Self::Resume { .. } => kind::RESUME,
            Self::WriteVector { .. } => kind::WRITE_VECTOR,
            Self::ReadVector { .. } => kind::READ_VECTOR,
            Self::WriteRuns { .. } => kind::WRITE_RUNS,
            Self::ReadRuns { .. } => kind::READ_RUNS,
            Self::IpcRequest { .. } => kind::IPC_REQUEST,
            Self::IpcGrant { .. } => kind::IPC_GRANT,
            Self::IpcRevoke { .. } => kind::IPC_REVOKE,
            Self::IpcRevoked { .. } => kind::IPC_REVOKED,
            Self::IpcSend { .. } => kind::IPC_SEND,
            Self::ProcessHello { .. } => kind::PROCESS_HELLO,
            Self::ProcessAck { .. } => kind::PROCESS_ACK,
            Self::DirectWrite { .. } => kind::DIRECT_WRITE,
            Self::DirectRead { .. } => kind::DIRECT_READ,
            Self::DirectGrant { .. } => kind::DIRECT_GRANT,
            Self::DirectDone { .. } => kind::DIRECT_DONE,
            Self::ParkChannels { .. } => kind::PARK_CHANNELS,
            Self::ChannelsParked { .. } => kind::CHANNELS_PARKED,
            Self::WantChannels { .. } => kind::WANT_CHANNELS,
            Self::OpenChannels { .. } => kind::OPEN_CHANNELS,
        }
    }

    /// Appends header and body. Encoding does not validate; call [`Control::validate`] first
    /// if the fields come from outside, or the peer will reject the frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_frame(out, self.kind(), |w| self.write_body(w));
    }

    /// The inline payload a message carries (empty for other kinds).
    pub fn inline_payload(&self) -> &[u8] {
        match self {
            Self::InlineWrite { payload, .. } | Self::ReadData { payload, .. } | Self::InlineSend { payload, .. } => {
                payload
            }
            _ => &[],
        }
    }

    /// Appends header and body but for an inline payload, which it returns for the caller to send
    /// right behind (the frame's length counts it): one copy of a large payload fewer. Other kinds
    /// are appended whole and return nothing.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> &[u8] {
        let payload = self.inline_payload();
        if payload.is_empty() {
            // No payload to leave out (an empty one encodes the same whole).
            self.encode(out);
            return &[];
        }
        let start = out.len();
        write_frame(out, self.kind(), |w| self.write_body_head(w));
        let body_len = out.len() - start - FRAME_HEADER_LEN + payload.len();
        // Past u32::MAX the peer rejects the frame as too long, as `write_frame` has it.
        let body_len = u32::try_from(body_len).unwrap_or(u32::MAX);
        out[start + 4..start + FRAME_HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
        payload
    }

    /// The body of an inline kind up to its payload's length field.
    fn write_body_head(&self, w: &mut Writer<'_>) {
        match self {
            Self::InlineWrite { xfer, region, token, addr, payload } => {
                for v in [xfer, region, token, addr] {
                    w.u64(*v);
                }
                w.u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            }
            Self::ReadData { xfer, payload } | Self::InlineSend { xfer, payload } => {
                w.u64(*xfer);
                w.u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            }
            _ => self.write_body(w),
        }
    }

    fn write_body(&self, w: &mut Writer<'_>) {
        match self {
            Self::SendAnnounce { xfer: a, len: b }
            | Self::EagerSend { xfer: a, len: b }
            | Self::Grant { xfer: a, flow: b }
            | Self::Data { flow: a, len: b }
            | Self::Done { xfer: a, len: b } => {
                w.u64(*a);
                w.u64(*b);
            }
            Self::WriteRequest { xfer, region, token, addr, len }
            | Self::ReadRequest { xfer, region, token, addr, len }
            | Self::ReadSmall { xfer, region, token, addr, len } => {
                for v in [xfer, region, token, addr, len] {
                    w.u64(*v);
                }
            }
            Self::InlineWrite { xfer, region, token, addr, payload } => {
                for v in [xfer, region, token, addr] {
                    w.u64(*v);
                }
                w.bytes32(payload);
            }
            Self::ReadData { xfer, payload } | Self::InlineSend { xfer, payload } => {
                w.u64(*xfer);
                w.bytes32(payload);
            }
            Self::Deny { xfer, status, reason } => {
                w.u64(*xfer);
                w.i32(*status);
                w.bytes32(reason.as_bytes());
            }
            Self::Notify { name, msg } => {
                w.bytes32(name);
                w.bytes32(msg);
            }
            Self::Resume { xfer } | Self::DirectDone { xfer } => w.u64(*xfer),
            Self::DirectGrant { xfer, huge } => {
                w.u64(*xfer);
                w.u32(u32::from(*huge));
            }
            Self::IpcRevoke { region } | Self::IpcRevoked { region } => w.u64(*region),
            Self::ParkChannels { epoch } | Self::WantChannels { epoch } => w.u64(*epoch),
            Self::ChannelsParked { epoch, parked } => {
                w.u64(*epoch);
                w.u32(u32::from(*parked));
            }
            Self::OpenChannels { epoch, handles } => {
                w.u64(*epoch);
                w.u32(u32::try_from(handles.len()).unwrap_or(u32::MAX));
                for h in handles {
                    w.bytes(h);
                }
            }
            Self::Close => {}
            Self::WriteVector { xfer, region, token, segs }
            | Self::ReadVector { xfer, region, token, segs }
            | Self::IpcRequest { xfer, region, token, segs }
            | Self::DirectRead { xfer, region, token, segs } => {
                for v in [xfer, region, token] {
                    w.u64(*v);
                }
                write_segments(w, segs);
            }
            Self::WriteRuns { xfer, runs, segs } | Self::ReadRuns { xfer, runs, segs } => {
                w.u64(*xfer);
                w.u32(u32::try_from(runs.len()).unwrap_or(u32::MAX));
                for run in runs {
                    w.u64(run.region);
                    w.u64(run.token);
                    w.u32(run.segs);
                }
                write_segments(w, segs);
            }
            Self::DirectWrite { xfer, region, token, segs, src, huge } => {
                for v in [xfer, region, token] {
                    w.u64(*v);
                }
                write_segments(w, segs);
                for addr in src {
                    w.u64(*addr);
                }
                w.u32(u32::from(*huge));
            }
            Self::ProcessHello { pid, fd } => {
                w.u32(*pid);
                w.u32(*fd);
            }
            Self::ProcessAck { readable } => w.u32(u32::from(*readable)),
            Self::IpcSend { xfer, len, region, addr, handle, alloc_base, alloc_len } => {
                for v in [xfer, len, region, addr] {
                    w.u64(*v);
                }
                w.bytes(handle);
                w.u64(*alloc_base);
                w.u64(*alloc_len);
            }
            Self::IpcGrant { xfer, region, handle, alloc_base, alloc_len, windows } => {
                w.u64(*xfer);
                w.u64(*region);
                w.bytes(handle);
                w.u64(*alloc_base);
                w.u64(*alloc_len);
                write_segments(w, windows);
            }
        }
    }

    /// Decodes a body that must be exactly `header.body_len` bytes long.
    pub fn decode(header: &FrameHeader, body: &[u8]) -> Result<Control, ProtoError> {
        let what = header.check_body(body)?;
        if is_handshake_kind(header.kind) {
            return Err(HANDSHAKE_AFTER_SETUP);
        }
        let mut r = Reader::new(body, what);
        let msg = Self::read_body(header.kind, &mut r)?;
        r.finish()?;
        msg.validate()?;
        Ok(msg)
    }

    fn read_body(kind: u8, r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        // Struct-literal fields are evaluated in the order written, which is the wire order.
        let msg = match kind {
            kind::SEND_ANNOUNCE => Self::SendAnnounce { xfer: r.u64()?, len: r.u64()? },
            kind::EAGER_SEND => Self::EagerSend { xfer: r.u64()?, len: r.u64()? },
            kind::WRITE_REQUEST => {
                Self::WriteRequest { xfer: r.u64()?, region: r.u64()?, token: r.u64()?, addr: r.u64()?, len: r.u64()? }
            }
            kind::READ_REQUEST => {
                Self::ReadRequest { xfer: r.u64()?, region: r.u64()?, token: r.u64()?, addr: r.u64()?, len: r.u64()? }
            }
            kind::GRANT => Self::Grant { xfer: r.u64()?, flow: r.u64()? },
            kind::DENY => {
                Self::Deny { xfer: r.u64()?, status: r.i32()?, reason: r.string32(MAX_REASON_LEN, "Deny reason")? }
            }
            kind::DATA => Self::Data { flow: r.u64()?, len: r.u64()? },
            kind::DONE => Self::Done { xfer: r.u64()?, len: r.u64()? },
            kind::NOTIFY => Self::Notify {
                name: r.bytes32(MAX_NAME_LEN, "notification name")?.to_vec(),
                msg: r.bytes32(MAX_NOTIFY_MSG_LEN, "notification message")?.to_vec(),
            },
            kind::CLOSE => Self::Close,
            kind::INLINE_WRITE => Self::InlineWrite {
                xfer: r.u64()?,
                region: r.u64()?,
                token: r.u64()?,
                addr: r.u64()?,
                payload: r.bytes32(MAX_INLINE_LEN, "inline payload")?.to_vec(),
            },
            kind::READ_SMALL => {
                Self::ReadSmall { xfer: r.u64()?, region: r.u64()?, token: r.u64()?, addr: r.u64()?, len: r.u64()? }
            }
            kind::READ_DATA => {
                Self::ReadData { xfer: r.u64()?, payload: r.bytes32(MAX_INLINE_LEN, "inline payload")?.to_vec() }
            }
            kind::INLINE_SEND => {
                Self::InlineSend { xfer: r.u64()?, payload: r.bytes32(MAX_INLINE_LEN, "inline payload")?.to_vec() }
            }
            kind::RESUME => Self::Resume { xfer: r.u64()? },
            kind::WRITE_VECTOR => {
                let (xfer, region, token) = (r.u64()?, r.u64()?, r.u64()?);
                Self::WriteVector { xfer, region, token, segs: read_segments(r)? }
            }
            kind::READ_VECTOR => {
                let (xfer, region, token) = (r.u64()?, r.u64()?, r.u64()?);
                Self::ReadVector { xfer, region, token, segs: read_segments(r)? }
            }
            kind::WRITE_RUNS => {
                let xfer = r.u64()?;
                Self::WriteRuns { xfer, runs: read_runs(r)?, segs: read_segments(r)? }
            }
            kind::READ_RUNS => {
                let xfer = r.u64()?;
                Self::ReadRuns { xfer, runs: read_runs(r)?, segs: read_segments(r)? }
            }
            kind::IPC_REQUEST => {
                let (xfer, region, token) = (r.u64()?, r.u64()?, r.u64()?);
                Self::IpcRequest { xfer, region, token, segs: read_segments(r)? }
            }
            kind::IPC_GRANT => {
                let (xfer, region) = (r.u64()?, r.u64()?);
                let handle: [u8; IPC_HANDLE_LEN] = r.array()?;
                let (alloc_base, alloc_len) = (r.u64()?, r.u64()?);
                Self::IpcGrant { xfer, region, handle, alloc_base, alloc_len, windows: read_segments(r)? }
            }
            kind::IPC_REVOKE => Self::IpcRevoke { region: r.u64()? },
            kind::IPC_REVOKED => Self::IpcRevoked { region: r.u64()? },
            kind::IPC_SEND => {
                let (xfer, len, region, addr) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let handle: [u8; IPC_HANDLE_LEN] = r.array()?;
                Self::IpcSend { xfer, len, region, addr, handle, alloc_base: r.u64()?, alloc_len: r.u64()? }
            }
            kind::PROCESS_HELLO => Self::ProcessHello { pid: r.u32()?, fd: r.u32()? },
            kind::PROCESS_ACK => Self::ProcessAck {
                readable: match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(ProtoError::Invalid("a ProcessAck must say 0 or 1")),
                },
            },
            kind::DIRECT_WRITE => {
                let (xfer, region, token) = (r.u64()?, r.u64()?, r.u64()?);
                let segs = read_segments(r)?;
                // The count was bounded by read_segments; the bytes must be present before the
                // list is allocated.
                let raw = r.bytes(segs.len() * 8)?;
                let src = raw.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
                let huge = flag(r, "a DirectWrite's page size must say 0 or 1")?;
                Self::DirectWrite { xfer, region, token, segs, src, huge }
            }
            kind::DIRECT_READ => {
                let (xfer, region, token) = (r.u64()?, r.u64()?, r.u64()?);
                Self::DirectRead { xfer, region, token, segs: read_segments(r)? }
            }
            kind::DIRECT_GRANT => {
                Self::DirectGrant { xfer: r.u64()?, huge: flag(r, "a DirectGrant's page size must say 0 or 1")? }
            }
            kind::DIRECT_DONE => Self::DirectDone { xfer: r.u64()? },
            kind::PARK_CHANNELS => Self::ParkChannels { epoch: r.u64()? },
            kind::CHANNELS_PARKED => {
                Self::ChannelsParked { epoch: r.u64()?, parked: flag(r, "a ChannelsParked must say 0 or 1")? }
            }
            kind::WANT_CHANNELS => Self::WantChannels { epoch: r.u64()? },
            kind::OPEN_CHANNELS => {
                let epoch = r.u64()?;
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_CHANNELS as usize {
                    return Err(ProtoError::Invalid("an OpenChannels must name 1 to MAX_CHANNELS handles"));
                }
                let handles = (0..n).map(|_| r.array()).collect::<Result<_, _>>()?;
                Self::OpenChannels { epoch, handles }
            }
            other => return Err(ProtoError::UnknownKind(other)),
        };
        Ok(msg)
    }

    /// The semantic checks `decode` applies, usable on the sending side as well.
    pub fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Self::SendAnnounce { len, .. } | Self::Data { len, .. } | Self::Done { len, .. } => nonzero_len(*len),
            Self::EagerSend { len, .. } => check_eager_len(*len),
            Self::WriteRequest { addr, len, .. } => check_range(*addr, *len).and_then(|()| check_write_len(*len)),
            Self::ReadRequest { addr, len, .. } => check_range(*addr, *len),
            Self::Deny { status, reason, .. } => check_deny(*status, reason),
            Self::Notify { name, msg } => check_notify(name, msg),
            Self::InlineWrite { addr, payload, .. } => check_inline(*addr, payload.len()),
            Self::ReadSmall { addr, len, .. } => check_inline(*addr, usize::try_from(*len).unwrap_or(usize::MAX))
                .map_err(|_| {
                    ProtoError::Invalid("a ReadSmall must ask for 1 to MAX_INLINE_LEN bytes of a valid range")
                }),
            Self::ReadData { payload, .. } | Self::InlineSend { payload, .. } => {
                nonzero_len(payload.len() as u64)?;
                check_len(payload.len(), MAX_INLINE_LEN, "inline payload")
            }
            Self::WriteVector { segs, .. }
            | Self::ReadVector { segs, .. }
            | Self::IpcRequest { segs, .. }
            | Self::DirectRead { segs, .. } => check_vector(segs),
            Self::WriteRuns { runs, segs, .. } | Self::ReadRuns { runs, segs, .. } => {
                check_vector(segs).and_then(|()| check_runs(runs, segs.len()))
            }
            Self::DirectWrite { segs, src, .. } => check_vector(segs).and_then(|()| check_sources(segs, src)),
            Self::IpcGrant { alloc_base, alloc_len, windows, .. } => check_grant(*alloc_base, *alloc_len, windows),
            Self::IpcSend { len, addr, alloc_base, alloc_len, .. } => {
                check_ipc_send(*addr, *len, *alloc_base, *alloc_len)
            }
            Self::Grant { .. }
            | Self::Resume { .. }
            | Self::IpcRevoke { .. }
            | Self::IpcRevoked { .. }
            | Self::ProcessHello { .. }
            | Self::ProcessAck { .. }
            | Self::DirectGrant { .. }
            | Self::DirectDone { .. }
            | Self::ParkChannels { .. }
            | Self::ChannelsParked { .. }
            | Self::WantChannels { .. }
            | Self::Close => Ok(()),
            Self::OpenChannels { handles, .. } => {
                if handles.is_empty() || handles.len() > MAX_CHANNELS as usize {
                    return Err(ProtoError::Invalid("an OpenChannels must name 1 to MAX_CHANNELS handles"));
                }
                Ok(())
            }
        }
    }
}

/// A segment list (protocol 26): the `u32` count, a flags byte, then each segment's address as a
/// `u32` offset from a running base (0 at first); [`SEG_NEW_BASE`] in place of an offset says a
/// `u64` base follows, then the offset from it. With [`SEG_SHARED_LEN`] one `u32` length after the
/// flags is every segment's; otherwise each offset is followed by its segment's `u32` length. A KV
/// request's blocks (one length, a region's blocks within 2 GiB of each other) take 4 bytes a
/// segment and 12 more a region, against 12 a segment as `u64 addr, u32 len`: 8,192 blocks are a
/// 35 KiB frame the posting thread writes itself and the peer's reader has 34-61 us later on 2 x
/// H100, where 98 KiB went through the control reactor and took 189-297 us (same call).
/// Past u32::MAX the count is wrong and the peer rejects the frame.
fn write_segments(w: &mut Writer<'_>, segs: &[RemoteSeg]) {
    w.u32(u32::try_from(segs.len()).unwrap_or(u32::MAX));
    let shared = shared_len(segs);
    w.u8(if shared.is_some() { SEG_SHARED_LEN } else { 0 });
    if let Some(len) = shared {
        w.u32(len);
    }
    let mut base = 0u64;
    for seg in segs {
        if needs_base(base, seg.addr) {
            base = base_for(seg.addr);
            w.u32(SEG_NEW_BASE);
            w.u64(base);
        }
        w.u32((seg.addr - base) as u32);
        if shared.is_none() {
            w.u32(seg.len);
        }
    }
}

/// The one length every segment has, if there are segments and they have one.
fn shared_len(segs: &[RemoteSeg]) -> Option<u32> {
    segs.first().map(|s| s.len).filter(|&len| segs.iter().all(|s| s.len == len))
}

/// Whether `addr` lies out of an offset's reach from `base`.
fn needs_base(base: u64, addr: u64) -> bool {
    addr < base || addr - base >= u64::from(SEG_NEW_BASE)
}

/// The base a segment out of reach starts: half the offsets' reach below it, so that the blocks
/// of one region listed in any order stay within reach of the first one's base.
fn base_for(addr: u64) -> u64 {
    addr.saturating_sub(1 << 31)
}

/// A run count, checked against its limit and against the bytes present before anything is
/// allocated for it, then the runs.
fn read_runs(r: &mut Reader<'_>) -> Result<Vec<VectorRun>, ProtoError> {
    let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
    check_len(count, MAX_VECTOR_RUNS, "vector run list")?;
    let raw = r.bytes(count * VECTOR_RUN_LEN)?;
    Ok(raw
        .chunks_exact(VECTOR_RUN_LEN)
        .map(|b| VectorRun {
            region: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            token: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            segs: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
        })
        .collect())
}

/// A segment list that is not as `write_segments` would write its segments: refused, so that what
/// decodes re-encodes to the same bytes.
const SEG_NOT_CANONICAL: ProtoError = ProtoError::Invalid("a segment list is not in its one encoding");
const SEG_TRUNCATED: ProtoError = ProtoError::Truncated { what: "vector segment list" };

/// A segment list as [`write_segments`] lays it out: the count checked against its limit and
/// against the bytes present (at least 4 a segment) before anything is allocated for it.
fn read_segments(r: &mut Reader<'_>) -> Result<Vec<RemoteSeg>, ProtoError> {
    let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
    check_len(count, MAX_VECTOR_SEGMENTS, "vector segment list")?;
    let flags = r.u8()?;
    if flags & !SEG_SHARED_LEN != 0 {
        return Err(ProtoError::Invalid("a segment list has unknown flags"));
    }
    let shared = if flags & SEG_SHARED_LEN != 0 { Some(r.u32()?) } else { None };
    if r.rest().len() < count * if shared.is_some() { 4 } else { 8 } {
        return Err(SEG_TRUNCATED);
    }
    let mut segs = vec![RemoteSeg { addr: 0, len: 0 }; count];
    let at = match shared {
        Some(len) => read_segment_words::<true>(r.rest(), len, &mut segs)?,
        None => read_segment_words::<false>(r.rest(), 0, &mut segs)?,
    };
    r.bytes(at)?;
    // One length for all is said once, and only for a list that has segments.
    let canonical = match shared {
        Some(_) => count > 0,
        None => shared_len(&segs).is_none(),
    };
    if !canonical {
        return Err(SEG_NOT_CANONICAL);
    }
    Ok(segs)
}

/// Fills `segs` from the front of `rest` as `read_segments` reads a list, each segment `len` long
/// where `SHARED`; how many bytes they took. Read as the u32 words the list is made of, one loop
/// per form: through the reader's checked calls a KV request's 8,192 segments took 21-27 us on the
/// 2-core VM, this 12 (the 12-byte form before them: 9).
fn read_segment_words<const SHARED: bool>(rest: &[u8], len: u32, segs: &mut [RemoteSeg]) -> Result<usize, ProtoError> {
    let (chunks, _) = rest.as_chunks::<4>();
    let words = chunks.len();
    let word = |i: usize| u32::from_le_bytes(chunks[i]);
    let per_seg = if SHARED { 1 } else { 2 };
    let (mut i, mut base) = (0usize, 0u64);
    for seg in segs.iter_mut() {
        if i + per_seg > words {
            return Err(SEG_TRUNCATED);
        }
        let mut offset = word(i);
        i += 1;
        if offset == SEG_NEW_BASE {
            if i + 2 + per_seg > words {
                return Err(SEG_TRUNCATED);
            }
            let new = u64::from(word(i)) | u64::from(word(i + 1)) << 32;
            offset = word(i + 2);
            i += 3;
            // Encodings are canonical: a base only where the last one is out of reach, and where
            // the encoder puts it.
            let addr = new.checked_add(u64::from(offset)).ok_or(SEG_NOT_CANONICAL)?;
            if !needs_base(base, addr) || new != base_for(addr) {
                return Err(SEG_NOT_CANONICAL);
            }
            base = new;
        }
        let addr = base.checked_add(u64::from(offset)).ok_or(ProtoError::Invalid("a segment's address overflows"))?;
        let len = if SHARED {
            len
        } else {
            i += 1;
            word(i - 1)
        };
        *seg = RemoteSeg { addr, len };
    }
    Ok(4 * i)
}

/// Decodes one control frame from the front of a stream buffer.
///
/// Returns `Ok(None)` while `buf` holds less than a whole frame, and otherwise the message and
/// the number of bytes it occupied. The header is validated as soon as it is complete, so an
/// oversized or unknown frame fails immediately instead of waiting for its body.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Control, usize)>, ProtoError> {
    let Some((head, _)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head)?;
    if is_handshake_kind(header.kind) {
        return Err(HANDSHAKE_AFTER_SETUP);
    }
    let frame_len = header.frame_len();
    let Some(body) = buf.get(FRAME_HEADER_LEN..frame_len) else {
        return Ok(None);
    };
    let msg = Control::decode(&header, body)?;
    Ok(Some((msg, frame_len)))
}

/// A whole message of the stream, where an inline write, send or a read's answer leaves its
/// payload in the reader's buffer: the receiver stores it from there, a copy fewer than through a
/// message.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Whole(Control),
    InlineWrite { xfer: u64, region: u64, token: u64, addr: u64, payload: &'a [u8] },
    ReadData { xfer: u64, payload: &'a [u8] },
    InlineSend { xfer: u64, payload: &'a [u8] },
}

impl Frame<'_> {
    /// The message the frame holds, its payload copied.
    pub fn into_control(self) -> Control {
        match self {
            Frame::Whole(msg) => msg,
            Frame::InlineWrite { xfer, region, token, addr, payload } => {
                Control::InlineWrite { xfer, region, token, addr, payload: payload.to_vec() }
            }
            Frame::ReadData { xfer, payload } => Control::ReadData { xfer, payload: payload.to_vec() },
            Frame::InlineSend { xfer, payload } => Control::InlineSend { xfer, payload: payload.to_vec() },
        }
    }
}

/// [`decode_frame`], but an InlineWrite, ReadData or InlineSend lends its payload from `buf`;
/// accepts and refuses exactly what `decode_frame` does.
pub fn decode_frame_lent(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, ProtoError> {
    let Some((head, _)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head)?;
    if ![kind::INLINE_WRITE, kind::READ_DATA, kind::INLINE_SEND].contains(&header.kind) {
        return Ok(decode_frame(buf)?.map(|(msg, used)| (Frame::Whole(msg), used)));
    }
    let frame_len = header.frame_len();
    let Some(body) = buf.get(FRAME_HEADER_LEN..frame_len) else {
        return Ok(None);
    };
    let mut r = Reader::new(body, header.check_body(body)?);
    // Read and checked in the order and with the checks of `Control::decode`.
    let (xfer, into) = inline_fields(header.kind, &mut r)?;
    let payload = r.bytes32(MAX_INLINE_LEN, "inline payload")?;
    r.finish()?;
    check_inline_payload(into, payload.len())?;
    let frame = match into {
        InlineInto::Write { region, token, addr } => Frame::InlineWrite { xfer, region, token, addr, payload },
        InlineInto::ReadAnswer => Frame::ReadData { xfer, payload },
        InlineInto::Send => Frame::InlineSend { xfer, payload },
    };
    Ok(Some((frame, frame_len)))
}

/// The fields of an InlineWrite, ReadData or InlineSend body before its payload, in `decode`'s
/// order: the transfer, and where the payload goes.
fn inline_fields(kind: u8, r: &mut Reader<'_>) -> Result<(u64, InlineInto), ProtoError> {
    let xfer = r.u64()?;
    let into = match kind {
        kind::INLINE_WRITE => InlineInto::Write { region: r.u64()?, token: r.u64()?, addr: r.u64()? },
        kind::READ_DATA => InlineInto::ReadAnswer,
        _ => InlineInto::Send,
    };
    Ok((xfer, into))
}

/// What decoding checks of an inline payload's length (and of a write's range): the same checks
/// whether the frame is decoded whole or its payload landed from its head.
fn check_inline_payload(into: InlineInto, len: usize) -> Result<(), ProtoError> {
    match into {
        InlineInto::Write { addr, .. } => check_inline(addr, len),
        InlineInto::ReadAnswer | InlineInto::Send => {
            nonzero_len(len as u64)?;
            check_len(len, MAX_INLINE_LEN, "inline payload")
        }
    }
}

/// The head of an inline write or a small read's answer whose payload may not be all here yet:
/// what a reader needs to land the payload straight in its destination as it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InlineHead {
    pub xfer: u64,
    pub into: InlineInto,
    pub len: usize,
    /// Where the payload starts in the frame.
    pub payload_at: usize,
}

/// Where an inline payload goes: the peer's write names it, a read's answer goes where the read
/// asked it to, a message into the receive it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InlineInto {
    Write { region: u64, token: u64, addr: u64 },
    ReadAnswer,
    Send,
}

/// The head of the InlineWrite, ReadData or InlineSend frame `buf` starts with, once its fixed
/// fields are in, checked as [`decode_frame_lent`] checks them; `None` for any other frame or a
/// head not all here.
/// The frame the head announces is then exactly `payload_at + len` bytes.
pub fn peek_inline_head(buf: &[u8]) -> Result<Option<InlineHead>, ProtoError> {
    let Some((head, _)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head)?;
    // The fields before the payload and its u32 length.
    let fixed_len = match header.kind {
        kind::INLINE_WRITE => 4 * 8 + 4,
        kind::READ_DATA | kind::INLINE_SEND => 8 + 4,
        _ => return Ok(None),
    };
    let Some(fixed) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + fixed_len) else {
        return Ok(None);
    };
    let mut r = Reader::new(fixed, "inline payload head");
    let (xfer, into) = inline_fields(header.kind, &mut r)?;
    let len = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
    r.finish()?;
    check_inline_payload(into, len)?;
    // The body is the fixed fields and the payload, nothing more: a frame announcing another
    // length would fail its decoding, so it must not be landed either.
    if header.body_len as usize != fixed_len + len {
        return Err(ProtoError::Invalid("an inline frame's body length disagrees with its payload length"));
    }
    Ok(Some(InlineHead { xfer, into, len, payload_at: FRAME_HEADER_LEN + fixed_len }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::max_body_len;
    use crate::proto::testutil::XorShift;

    fn samples() -> Vec<Control> {
        vec![
            Control::SendAnnounce { xfer: 1, len: 4096 },
            Control::EagerSend { xfer: 1, len: INLINE_LEN_FLOOR as u64 + 1 },
            Control::EagerSend { xfer: u64::MAX, len: MAX_EAGER_LEN },
            Control::WriteRequest {
                xfer: 2,
                region: 3,
                token: 0xffff_ffff_ffff_ffff,
                addr: 0x7f00_0000_0000,
                len: 1 << 20,
            },
            Control::ReadRequest { xfer: 4, region: 5, token: 6, addr: u64::MAX - 1, len: 1 },
            Control::Grant { xfer: 7, flow: 8 },
            Control::Deny { xfer: 9, status: -12, reason: "région not registered".into() },
            Control::Deny { xfer: 10, status: i32::MIN, reason: String::new() },
            Control::Data { flow: 11, len: u64::MAX },
            Control::Done { xfer: 12, len: 13 },
            Control::Notify { name: b"checkpoint".to_vec(), msg: vec![0, 1, 2, 0xff] },
            Control::Notify { name: vec![b'n'; MAX_NAME_LEN], msg: Vec::new() },
            Control::Notify { name: Vec::new(), msg: vec![0xab; 3000] },
            Control::Close,
            Control::InlineWrite { xfer: 14, region: 15, token: 16, addr: 0x1000, payload: vec![7; 8] },
            Control::InlineWrite { xfer: 17, region: 1, token: 2, addr: 3, payload: vec![0x5a; MAX_INLINE_LEN] },
            Control::ReadSmall { xfer: 18, region: 19, token: 20, addr: 0x2000, len: MAX_INLINE_LEN as u64 },
            Control::ReadData { xfer: 21, payload: vec![1, 2, 3] },
            Control::InlineSend { xfer: 22, payload: vec![9; MAX_INLINE_LEN] },
            Control::Resume { xfer: u64::MAX },
            Control::WriteVector {
                xfer: 23,
                region: 24,
                token: 25,
                segs: vec![RemoteSeg { addr: 0x1000, len: 4096 }, RemoteSeg { addr: 0x9000, len: 1 }],
            },
            Control::ReadVector {
                xfer: 26,
                region: 27,
                token: 28,
                segs: vec![RemoteSeg { addr: u64::MAX - 1, len: 1 }],
            },
            Control::WriteRuns {
                xfer: 37,
                runs: vec![VectorRun { region: 1, token: 2, segs: 1 }, VectorRun { region: 3, token: 4, segs: 2 }],
                segs: vec![
                    RemoteSeg { addr: 0x1000, len: 16 },
                    RemoteSeg { addr: 0x9000, len: 4096 },
                    RemoteSeg { addr: 0x5000, len: 1 },
                ],
            },
            Control::ReadRuns {
                xfer: 38,
                runs: vec![
                    VectorRun { region: 5, token: u64::MAX, segs: 1 },
                    VectorRun { region: 5, token: 6, segs: 1 },
                ],
                segs: vec![RemoteSeg { addr: 0x2000, len: 8 }, RemoteSeg { addr: 0x2000, len: 8 }],
            },
            Control::IpcRequest {
                xfer: 1 << 63,
                region: 29,
                token: 30,
                segs: vec![RemoteSeg { addr: 0x7000, len: 8 }],
            },
            Control::IpcGrant {
                xfer: (1 << 63) + 1,
                region: 31,
                handle: core::array::from_fn(|i| i as u8),
                alloc_base: 0x7f00_0000_0000,
                alloc_len: 1 << 30,
                windows: vec![
                    RemoteSeg { addr: 0x7f00_0000_0000, len: 4096 },
                    RemoteSeg { addr: 0x7f00_0000_0000 + (1 << 30) - 1, len: 1 },
                ],
            },
            Control::IpcRevoke { region: 32 },
            Control::IpcRevoked { region: u64::MAX },
            Control::IpcSend {
                xfer: 37,
                len: 1 << 24,
                region: 38,
                addr: 0x7f00_0000_1000,
                handle: core::array::from_fn(|i| 255 - i as u8),
                alloc_base: 0x7f00_0000_0000,
                alloc_len: 1 << 30,
            },
            Control::IpcSend {
                xfer: 39,
                len: 1,
                region: 0,
                addr: u64::MAX - 1,
                handle: [0; 64],
                alloc_base: u64::MAX - 1,
                alloc_len: 1,
            },
            Control::ProcessHello { pid: 4242, fd: 17 },
            Control::ProcessAck { readable: true },
            Control::ProcessAck { readable: false },
            Control::DirectWrite {
                xfer: 29,
                region: 30,
                token: 31,
                segs: vec![RemoteSeg { addr: 0x1000, len: 4096 }, RemoteSeg { addr: 0x8000, len: 7 }],
                src: vec![0x7f00_0000_0000, 0x10],
                huge: true,
            },
            Control::DirectRead {
                xfer: 32,
                region: 33,
                token: 34,
                segs: vec![RemoteSeg { addr: 0x3000, len: 1 << 20 }],
            },
            Control::DirectGrant { xfer: 35, huge: true },
            Control::DirectGrant { xfer: 36, huge: false },
            Control::DirectDone { xfer: u64::MAX },
            Control::ParkChannels { epoch: 1 },
            Control::ChannelsParked { epoch: 2, parked: true },
            Control::ChannelsParked { epoch: u64::MAX, parked: false },
            Control::WantChannels { epoch: 3 },
            Control::OpenChannels { epoch: 4, handles: vec![[0xa5; NET_HANDLE_SIZE]] },
            Control::OpenChannels {
                epoch: 5,
                handles: (0..MAX_CHANNELS).map(|i| [i as u8; NET_HANDLE_SIZE]).collect(),
            },
        ]
    }

    fn vector(segs: Vec<RemoteSeg>) -> Control {
        Control::WriteVector { xfer: 1, region: 2, token: 3, segs }
    }

    fn variable_size(msg: &Control) -> bool {
        matches!(
            msg,
            Control::Deny { .. }
                | Control::Notify { .. }
                | Control::InlineWrite { .. }
                | Control::ReadData { .. }
                | Control::InlineSend { .. }
                | Control::WriteVector { .. }
                | Control::ReadVector { .. }
                | Control::WriteRuns { .. }
                | Control::ReadRuns { .. }
                | Control::IpcRequest { .. }
                | Control::IpcGrant { .. }
                | Control::DirectWrite { .. }
                | Control::DirectRead { .. }
                | Control::OpenChannels { .. }
        )
    }

    fn encode(msg: &Control) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out);
        out
    }

    fn split(frame: &[u8]) -> (FrameHeader, &[u8]) {
        let (head, body) = frame.split_first_chunk::<FRAME_HEADER_LEN>().unwrap();
        (FrameHeader::parse(head).unwrap(), body)
    }

    /// Builds a frame by hand so decoders can be fed bodies our encoder would never produce.
    fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = FrameHeader { kind, body_len: u32::try_from(body.len()).unwrap() }.to_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn decode_raw(kind: u8, body: &[u8]) -> Result<Option<(Control, usize)>, ProtoError> {
        decode_frame(&raw_frame(kind, body))
    }

    #[test]
    fn every_message_round_trips_through_the_stream_decoder() {
        for msg in samples() {
            let frame = encode(&msg);
            assert_eq!(decode_frame(&frame), Ok(Some((msg.clone(), frame.len()))));
            let (header, body) = split(&frame);
            assert_eq!(header.kind, msg.kind());
            assert_eq!(Control::decode(&header, body), Ok(msg));
        }
    }

    #[test]
    fn a_head_and_the_payload_it_leaves_out_are_the_whole_frame() {
        let mut inline = 0;
        for msg in samples() {
            let mut head = vec![0xee];
            let tail = msg.encode_head(&mut head).to_vec();
            inline += usize::from(!tail.is_empty());
            head.extend_from_slice(&tail);
            assert_eq!(head[1..], encode(&msg)[..], "{msg:?}");
        }
        assert!(inline >= 3, "the samples carry inline payloads");
    }

    #[test]
    fn inline_payloads_are_lent_from_the_buffer_and_everything_else_decodes_whole() {
        let mut lent = 0;
        for msg in samples() {
            let frame = encode(&msg);
            let (decoded, used) = decode_frame_lent(&frame).unwrap().unwrap();
            assert_eq!(used, frame.len());
            match &decoded {
                Frame::Whole(whole) => {
                    assert!(
                        !matches!(
                            whole,
                            Control::InlineWrite { .. } | Control::ReadData { .. } | Control::InlineSend { .. }
                        ),
                        "{whole:?}"
                    )
                }
                Frame::InlineWrite { payload, .. }
                | Frame::ReadData { payload, .. }
                | Frame::InlineSend { payload, .. } => {
                    lent += 1;
                    let at = payload.as_ptr() as usize - frame.as_ptr() as usize;
                    assert_eq!(&frame[at..at + payload.len()], *payload, "a slice of the frame itself");
                }
            }
            assert_eq!(decoded.into_control(), msg);
            for cut in [0, FRAME_HEADER_LEN.min(frame.len() - 1), frame.len() - 1] {
                assert_eq!(decode_frame_lent(&frame[..cut]), Ok(None), "{cut} bytes of {msg:?}");
            }
        }
        assert!(lent >= 3);
        // Refused alike: a payload past the bound, an empty answer, a range that wraps.
        let bad = [
            Control::ReadData { xfer: 1, payload: vec![] },
            Control::InlineWrite { xfer: 1, region: 2, token: 3, addr: u64::MAX, payload: vec![1; 2] },
            Control::ReadData { xfer: 1, payload: vec![1; MAX_INLINE_LEN + 1] },
            Control::InlineSend { xfer: 1, payload: vec![] },
            Control::InlineSend { xfer: 1, payload: vec![1; MAX_INLINE_LEN + 1] },
        ];
        for msg in bad {
            let frame = encode(&msg);
            let err = decode_frame(&frame).unwrap_err();
            assert_eq!(decode_frame_lent(&frame).unwrap_err(), err, "{err:?}");
        }
    }

    #[test]
    fn an_inline_payloads_head_is_read_before_the_payload_and_checked_as_its_frame_is() {
        let write = Control::InlineWrite { xfer: 7, region: 8, token: 9, addr: 0x4000, payload: vec![3; 5000] };
        let into = InlineInto::Write { region: 8, token: 9, addr: 0x4000 };
        let answer = Control::ReadData { xfer: 10, payload: vec![4; 70_000] };
        let message = Control::InlineSend { xfer: 11, payload: vec![5; 3] };
        for (msg, head) in [
            (write, InlineHead { xfer: 7, into, len: 5000, payload_at: 44 }),
            (answer, InlineHead { xfer: 10, into: InlineInto::ReadAnswer, len: 70_000, payload_at: 20 }),
            (message, InlineHead { xfer: 11, into: InlineInto::Send, len: 3, payload_at: 20 }),
        ] {
            let frame = encode(&msg);
            for cut in [head.payload_at, head.payload_at + 1, frame.len()] {
                assert_eq!(peek_inline_head(&frame[..cut]), Ok(Some(head)), "{cut} bytes of {msg:?}");
            }
            assert_eq!(frame.len(), head.payload_at + head.len);
            assert!(frame[head.payload_at..].iter().all(|b| *b == frame[head.payload_at]));
            for cut in [0, FRAME_HEADER_LEN, head.payload_at - 1] {
                assert_eq!(peek_inline_head(&frame[..cut]), Ok(None), "{cut} bytes");
            }
            let mut bad_magic = frame.clone();
            bad_magic[0] ^= 1;
            assert!(peek_inline_head(&bad_magic).is_err());
            // A body length that disagrees with the payload's would fail decoding: never landed.
            let mut longer = frame.clone();
            longer[4..8].copy_from_slice(&((frame.len() - FRAME_HEADER_LEN + 1) as u32).to_le_bytes());
            longer.push(0);
            assert!(decode_frame_lent(&longer).is_err());
            assert!(peek_inline_head(&longer).is_err());
        }
        // Other frames have no landable payload, whole or not.
        let landable = |m: &Control| {
            matches!(m, Control::InlineWrite { .. } | Control::ReadData { .. } | Control::InlineSend { .. })
        };
        for other in samples().into_iter().filter(|m| !landable(m)) {
            assert_eq!(peek_inline_head(&encode(&other)), Ok(None), "{other:?}");
        }
        // Refused as decoding refuses them: a wrapping range, a payload past the bound, an empty answer.
        for bad in [
            Control::InlineWrite { xfer: 1, region: 2, token: 3, addr: u64::MAX, payload: vec![1; 2] },
            Control::InlineWrite { xfer: 1, region: 2, token: 3, addr: 0, payload: vec![1; MAX_INLINE_LEN + 1] },
            Control::ReadData { xfer: 1, payload: vec![] },
            Control::ReadData { xfer: 1, payload: vec![1; MAX_INLINE_LEN + 1] },
            Control::InlineSend { xfer: 1, payload: vec![] },
            Control::InlineSend { xfer: 1, payload: vec![1; MAX_INLINE_LEN + 1] },
        ] {
            let frame = encode(&bad);
            assert!(decode_frame_lent(&frame).is_err());
            assert!(peek_inline_head(&frame[..frame.len().min(44)]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fixed_bodies_have_their_declared_sizes() {
        for msg in samples() {
            let frame = encode(&msg);
            let body_len = frame.len() - FRAME_HEADER_LEN;
            assert!(body_len <= max_body_len(msg.kind()).unwrap());
            if !variable_size(&msg) {
                assert_eq!(Some(body_len), max_body_len(msg.kind()), "{msg:?}");
            }
        }
    }

    #[test]
    fn byte_layouts_are_exact() {
        let grant = encode(&Control::Grant { xfer: 0x0102, flow: 0x0304 });
        assert_eq!(grant, [0x43, 0x54, 19, 0, 16, 0, 0, 0, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0x04, 0x03, 0, 0, 0, 0, 0, 0]);
        let deny = encode(&Control::Deny { xfer: 1, status: -1, reason: "x".into() });
        assert_eq!(&deny[FRAME_HEADER_LEN..], [1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, b'x']);
        let notify = encode(&Control::Notify { name: b"ab".to_vec(), msg: b"c".to_vec() });
        assert_eq!(&notify[FRAME_HEADER_LEN..], [2, 0, 0, 0, b'a', b'b', 1, 0, 0, 0, b'c']);
        assert_eq!(encode(&Control::Close), [0x43, 0x54, 24, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn back_to_back_frames_decode_in_order() {
        let msgs = samples();
        let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut rest = stream.as_slice();
        let mut decoded = Vec::new();
        while let Some((msg, used)) = decode_frame(rest).unwrap() {
            decoded.push(msg);
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(decoded, msgs);
    }

    #[test]
    fn every_prefix_needs_more_bytes_and_every_short_body_is_truncated() {
        for msg in samples() {
            let frame = encode(&msg);
            for cut in 0..frame.len() {
                assert_eq!(decode_frame(&frame[..cut]), Ok(None), "{msg:?} cut at {cut}");
            }
            let (header, body) = split(&frame);
            for cut in 0..body.len() {
                assert!(matches!(Control::decode(&header, &body[..cut]), Err(ProtoError::Truncated { .. })));
                // With a header that agrees with the short body the failure must still be
                // truncation, found either by the header's size rule or by the field reader.
                let short = FrameHeader { body_len: u32::try_from(cut).unwrap(), ..header };
                assert!(matches!(Control::decode(&short, &body[..cut]), Err(ProtoError::Truncated { .. })));
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for msg in samples() {
            let frame = encode(&msg);
            let (header, body) = split(&frame);
            let mut longer = body.to_vec();
            longer.push(0);
            assert!(matches!(Control::decode(&header, &longer), Err(ProtoError::TrailingBytes { extra: 1, .. })));
            let result = decode_raw(header.kind, &longer);
            if variable_size(&msg) && body.len() < max_body_len(header.kind).unwrap() {
                assert!(matches!(result, Err(ProtoError::TrailingBytes { extra: 1, .. })));
            } else {
                // Fixed-size kinds are caught by the header before the body is read.
                assert!(matches!(result, Err(ProtoError::TooLong { .. })));
            }
        }
    }

    #[test]
    fn oversized_frames_fail_from_the_header_alone() {
        for (kind, max) in [
            (kind::NOTIFY, 4 + MAX_NAME_LEN + 4 + MAX_NOTIFY_MSG_LEN),
            (kind::DENY, 16 + MAX_REASON_LEN),
            (kind::GRANT, 16),
            (kind::RESUME, 8),
            (kind::CLOSE, 0),
        ] {
            let header = FrameHeader { kind, body_len: u32::try_from(max + 1).unwrap() };
            assert_eq!(
                decode_frame(&header.to_bytes()).unwrap_err(),
                ProtoError::TooLong {
                    what: match kind {
                        kind::NOTIFY => "Notify body",
                        kind::DENY => "Deny body",
                        kind::GRANT => "Grant body",
                        kind::RESUME => "Resume body",
                        _ => "Close body",
                    },
                    len: max + 1,
                    max
                }
            );
        }
    }

    #[test]
    fn oversized_inner_lengths_fail_before_their_bytes_arrive() {
        let mut body = Vec::new();
        body.extend(u32::try_from(MAX_NAME_LEN + 1).unwrap().to_le_bytes());
        assert_eq!(
            decode_raw(kind::NOTIFY, &body),
            Err(ProtoError::TooLong { what: "notification name", len: MAX_NAME_LEN + 1, max: MAX_NAME_LEN })
        );
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend(u32::MAX.to_le_bytes());
        assert_eq!(
            decode_raw(kind::NOTIFY, &body),
            Err(ProtoError::TooLong { what: "notification message", len: u32::MAX as usize, max: MAX_NOTIFY_MSG_LEN })
        );
        let mut body = vec![0; 8];
        body.extend((-1i32).to_le_bytes());
        body.extend(u32::try_from(MAX_REASON_LEN + 1).unwrap().to_le_bytes());
        assert_eq!(
            decode_raw(kind::DENY, &body),
            Err(ProtoError::TooLong { what: "Deny reason", len: MAX_REASON_LEN + 1, max: MAX_REASON_LEN })
        );
    }

    #[test]
    fn largest_notification_round_trips() {
        let msg = Control::Notify { name: vec![b'n'; MAX_NAME_LEN], msg: vec![7; MAX_NOTIFY_MSG_LEN] };
        let frame = encode(&msg);
        assert_eq!(frame.len(), FRAME_HEADER_LEN + max_body_len(kind::NOTIFY).unwrap());
        assert_eq!(decode_frame(&frame), Ok(Some((msg, frame.len()))));
    }

    #[test]
    fn an_ipc_send_lies_inside_the_allocation_it_names() {
        let send = |addr, len, alloc_base, alloc_len| Control::IpcSend {
            xfer: 1,
            len,
            region: 2,
            addr,
            handle: [3; IPC_HANDLE_LEN],
            alloc_base,
            alloc_len,
        };
        let ok = send(0x1000, 0x1000, 0x1000, 0x1000);
        assert_eq!(ok.validate(), Ok(()), "the whole allocation");
        let frame = encode(&ok);
        assert_eq!(frame[2], kind::IPC_SEND);
        assert_eq!(frame.len(), FRAME_HEADER_LEN + 112);
        assert_eq!(frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 8], 1u64.to_le_bytes());
        assert_eq!(frame[FRAME_HEADER_LEN + 32..FRAME_HEADER_LEN + 96], [3; IPC_HANDLE_LEN]);
        assert_eq!(frame[FRAME_HEADER_LEN + 96..FRAME_HEADER_LEN + 104], 0x1000u64.to_le_bytes());
        for (bad, why) in [
            (send(0x1000, 0, 0x1000, 0x1000), "zero"),
            (send(0x0fff, 1, 0x1000, 0x1000), "outside"),
            (send(0x1fff, 2, 0x1000, 0x1000), "outside"),
            (send(0x1000, 1, 0x1000, 0), "zero"),
            (send(u64::MAX, 1, u64::MAX - 1, 2), "address space"),
            (send(0x1000, 1, u64::MAX - 1, 2), "address space"),
        ] {
            assert!(matches!(bad.validate(), Err(ProtoError::Invalid(w)) if w.contains(why)), "{bad:?}");
            assert_eq!(decode_frame(&encode(&bad)), Err(bad.validate().unwrap_err()), "{bad:?}");
        }
    }

    #[test]
    fn an_eager_send_is_longer_than_the_inline_floor_and_at_most_max_eager_len() {
        for len in [0, 1, INLINE_LEN_FLOOR as u64, MAX_EAGER_LEN + 1, u64::MAX] {
            let msg = Control::EagerSend { xfer: 1, len };
            assert!(matches!(msg.validate(), Err(ProtoError::Invalid(why)) if why.contains("eager")), "{len}");
            assert_eq!(decode_frame(&encode(&msg)), Err(msg.validate().unwrap_err()));
        }
        // Past the floor an engine that inlines less than its peer still sends eagerly.
        for len in [INLINE_LEN_FLOOR as u64 + 1, MAX_INLINE_LEN as u64, MAX_EAGER_LEN] {
            let msg = Control::EagerSend { xfer: 1, len };
            assert_eq!(decode_frame(&encode(&msg)).unwrap().unwrap().0, msg, "{len}");
        }
        // No frame carries more than MAX_INLINE_LEN inline.
        let big = Control::InlineSend { xfer: 1, payload: vec![1; MAX_INLINE_LEN + 1] };
        assert!(decode_frame(&encode(&big)).is_err());
    }

    #[test]
    fn zero_lengths_are_invalid() {
        for msg in [
            Control::SendAnnounce { xfer: 1, len: 0 },
            Control::Data { flow: 1, len: 0 },
            Control::Done { xfer: 1, len: 0 },
            Control::WriteRequest { xfer: 1, region: 1, token: 1, addr: 1, len: 0 },
            Control::ReadRequest { xfer: 1, region: 1, token: 1, addr: 1, len: 0 },
        ] {
            assert!(matches!(msg.validate(), Err(ProtoError::Invalid(_))));
            assert_eq!(decode_frame(&encode(&msg)), Err(msg.validate().unwrap_err()));
        }
    }

    #[test]
    fn a_write_request_moves_at_most_one_windows_worth_and_a_read_request_is_not_bounded_so() {
        let write = |len| Control::WriteRequest { xfer: 1, region: 2, token: 3, addr: 0x1000, len };
        assert_eq!(
            decode_frame(&encode(&write(MAX_VECTOR_BYTES))).map(|m| m.map(|(m, _)| m)),
            Ok(Some(write(MAX_VECTOR_BYTES)))
        );
        let over = write(MAX_VECTOR_BYTES + 1);
        assert!(matches!(over.validate(), Err(ProtoError::Invalid(why)) if why.contains("MAX_VECTOR_BYTES")));
        assert_eq!(decode_frame(&encode(&over)), Err(over.validate().unwrap_err()));
        // A read queues nothing before the target authorized it.
        let read = Control::ReadRequest { xfer: 1, region: 2, token: 3, addr: 0x1000, len: MAX_VECTOR_BYTES + 1 };
        assert_eq!(read.validate(), Ok(()));
    }

    #[test]
    fn wrapping_ranges_are_invalid() {
        let make = |addr, len| Control::ReadRequest { xfer: 1, region: 2, token: 3, addr, len };
        assert!(make(u64::MAX - 1, 1).validate().is_ok());
        for (addr, len) in [(u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX)] {
            let read = make(addr, len);
            assert!(matches!(decode_frame(&encode(&read)), Err(ProtoError::Invalid(_))));
            let write = Control::WriteRequest { xfer: 1, region: 2, token: 3, addr, len };
            assert!(matches!(decode_frame(&encode(&write)), Err(ProtoError::Invalid(_))));
        }
    }

    #[test]
    fn vector_layout_is_ids_then_a_segment_list() {
        let layout = |segs: Vec<RemoteSeg>, list: &[&[u8]]| {
            let frame = encode(&vector(segs));
            let mut body = Vec::new();
            for v in [1u64, 2, 3] {
                body.extend(v.to_le_bytes());
            }
            body.extend(list.concat());
            assert_eq!(&frame[FRAME_HEADER_LEN..], &body[..]);
            assert_eq!(frame[2], kind::WRITE_VECTOR);
        };
        let (u32b, u64b) = (|v: u32| v.to_le_bytes().to_vec(), |v: u64| v.to_le_bytes().to_vec());
        // One length, one base: the count, the flags, the length, an offset a segment.
        let seg = |addr, len| RemoteSeg { addr, len };
        layout(
            vec![seg(0x0102, 0x0304), seg(0x9000, 0x0304)],
            &[&u32b(2), &[SEG_SHARED_LEN], &u32b(0x0304), &u32b(0x0102), &u32b(0x9000)],
        );
        // Lengths of their own; a segment out of reach starts a base 2 GiB below it, and one
        // below the base starts another.
        let high = 0x7f00_0000_0000u64;
        layout(
            vec![seg(high, 8), seg(high - 0x1000, 16), seg(0x1000, 8)],
            &[
                &u32b(3),
                &[0],
                &u32b(SEG_NEW_BASE),
                &u64b(high - (1 << 31)),
                &u32b(1 << 31),
                &u32b(8),
                &u32b((1 << 31) - 0x1000),
                &u32b(16),
                &u32b(SEG_NEW_BASE),
                &u64b(0),
                &u32b(0x1000),
                &u32b(8),
            ],
        );
    }

    /// A KV request's blocks, one length in regions gigabytes apart, listed in any order within
    /// each: 4 bytes a block and 12 a region.
    #[test]
    fn blocks_of_one_length_take_an_offset_each_and_a_base_a_region() {
        let mut rng = XorShift::new(26);
        let (regions, blocks) = (160u64, 52u64);
        let mut segs = Vec::new();
        for r in 0..regions {
            let base = 0x7f00_0000_0000 + r * (3 << 30);
            let mut picks: Vec<u64> = (0..(1 << 30) / (16 << 10)).collect();
            for b in 0..blocks as usize {
                let j = b + rng.below(picks.len() - b);
                picks.swap(b, j);
                segs.push(RemoteSeg { addr: base + picks[b] * (16 << 10), len: 16 << 10 });
            }
        }
        let msg = Control::ReadVector { xfer: 1, region: 2, token: 3, segs };
        let frame = encode(&msg);
        assert_eq!(frame.len(), FRAME_HEADER_LEN + 24 + 9 + 4 * (regions * blocks) as usize + 12 * regions as usize);
        assert_eq!(decode_frame(&frame), Ok(Some((msg, frame.len()))));
    }

    #[test]
    fn largest_vector_round_trips_and_one_more_segment_does_not() {
        // Every segment on a base of its own and with its own length: the largest list.
        let segs: Vec<RemoteSeg> = (0..MAX_VECTOR_SEGMENTS as u64)
            .map(|i| RemoteSeg { addr: ((i + 1) % 2) << 60 | i << 12, len: 4096 - (i % 2) as u32 })
            .collect();
        let msg = Control::ReadVector { xfer: 1, region: 2, token: 3, segs };
        let frame = encode(&msg);
        assert_eq!(frame.len(), FRAME_HEADER_LEN + max_body_len(kind::READ_VECTOR).unwrap());
        assert_eq!(decode_frame(&frame), Ok(Some((msg.clone(), frame.len()))));
        let Control::ReadVector { mut segs, .. } = msg else { unreachable!() };
        segs.push(RemoteSeg { addr: 0, len: 1 });
        let over = vector(segs);
        assert!(matches!(over.validate(), Err(ProtoError::TooLong { what: "vector segment list", .. })));
        assert!(matches!(decode_frame(&encode(&over)), Err(ProtoError::TooLong { .. })), "too long from the header");
    }

    #[test]
    fn hostile_vectors_are_refused() {
        let seg = |addr, len| RemoteSeg { addr, len };
        for (segs, why) in [
            (vec![], "empty"),
            (vec![seg(0x1000, 8), seg(0x2000, 0)], "an empty segment"),
            (vec![seg(u64::MAX, 1)], "a wrapping segment"),
            (vec![seg(u64::MAX - 10, 20)], "a wrapping segment"),
            (vec![seg(0x1000, u32::MAX), seg(0x1000, u32::MAX)], "more than MAX_VECTOR_BYTES in all"),
        ] {
            let msg = vector(segs);
            assert!(msg.validate().is_err(), "{why}");
            assert_eq!(decode_frame(&encode(&msg)).unwrap_err(), msg.validate().unwrap_err(), "{why}");
        }
        assert_eq!(vector(vec![seg(0x1000, u32::MAX), seg(0x1000, 1)]).validate(), Ok(()), "exactly the limit");
        // Segment lists the decoder refuses, after the three ids.
        let raw = |parts: &[&[u8]]| [&[0u8; 24][..], &parts.concat()].concat();
        let (u32b, u64b) = (|v: u32| v.to_le_bytes().to_vec(), |v: u64| v.to_le_bytes().to_vec());
        let shared: &[u8] = &[SEG_SHARED_LEN];
        let own: &[u8] = &[0];
        let new_base = u32b(SEG_NEW_BASE);
        for (body, why) in [
            (raw(&[&u32b(2), shared, &u32b(8), &u32b(0x1000)]), "more segments than the body holds"),
            (raw(&[&u32b(1), own, &u32b(0x1000)]), "a segment without its length"),
            (raw(&[&u32b(1), shared, &u32b(8), &new_base, &u32b(5)]), "a base cut short"),
        ] {
            assert!(matches!(decode_raw(kind::WRITE_VECTOR, &body), Err(ProtoError::Truncated { .. })), "{why}");
        }
        let high = 0x7f00_0000_0000u64;
        for (body, why) in [
            (raw(&[&u32b(1), &[2], &u32b(0x1000)]), "unknown flags"),
            (raw(&[&u32b(1), own, &u32b(0x1000), &u32b(8)]), "one length not shared"),
            (raw(&[&u32b(0), shared, &u32b(8)]), "a shared length of no segment"),
            (raw(&[&u32b(1), shared, &u32b(8), &new_base, &u64b(0), &u32b(0x1000)]), "a base not needed"),
            (raw(&[&u32b(1), shared, &u32b(8), &new_base, &u64b(high), &u32b(0)]), "a base not where it goes"),
            (raw(&[&u32b(1), shared, &u32b(8), &new_base, &u64b(u64::MAX), &u32b(1)]), "a base past the end"),
            (
                raw(&[
                    &u32b(2),
                    shared,
                    &u32b(8),
                    &new_base,
                    &u64b(u64::MAX - (1 << 31)),
                    &u32b(1 << 31),
                    &u32b(1 << 31),
                ]),
                "an offset past the end",
            ),
        ] {
            assert!(matches!(decode_raw(kind::WRITE_VECTOR, &body), Err(ProtoError::Invalid(_))), "{why}");
        }
        assert!(matches!(
            decode_raw(kind::READ_VECTOR, &raw(&[&u32b(u32::MAX)])),
            Err(ProtoError::TooLong { what: "vector segment list", .. })
        ));
        // A count that claims fewer: the rest is trailing.
        let body = raw(&[&u32b(0), own, &[0u8; 12]]);
        assert!(matches!(decode_raw(kind::WRITE_VECTOR, &body), Err(ProtoError::TrailingBytes { extra: 12, .. })));
    }

    fn grant(alloc_base: u64, alloc_len: u64, windows: Vec<RemoteSeg>) -> Control {
        Control::IpcGrant { xfer: 1, region: 2, handle: [7; IPC_HANDLE_LEN], alloc_base, alloc_len, windows }
    }

    #[test]
    fn ipc_grant_layout_is_ids_handle_allocation_then_windows() {
        let frame = encode(&grant(0x1000, 0x2000, vec![RemoteSeg { addr: 0x1800, len: 0x10 }]));
        let mut body = Vec::new();
        body.extend(1u64.to_le_bytes());
        body.extend(2u64.to_le_bytes());
        body.extend([7u8; 64]);
        body.extend(0x1000u64.to_le_bytes());
        body.extend(0x2000u64.to_le_bytes());
        body.extend(1u32.to_le_bytes());
        body.push(SEG_SHARED_LEN);
        body.extend(0x10u32.to_le_bytes());
        body.extend(0x1800u32.to_le_bytes());
        assert_eq!(&frame[FRAME_HEADER_LEN..], &body[..]);
        assert_eq!(frame[2], kind::IPC_GRANT);
        assert_eq!(encode(&Control::IpcRevoked { region: 5 })[FRAME_HEADER_LEN..], 5u64.to_le_bytes());
    }

    #[test]
    fn ipc_grants_list_only_windows_inside_the_allocation() {
        let w = |addr, len| RemoteSeg { addr, len };
        let full = (0..MAX_IPC_WINDOWS as u64).map(|i| w(0x1000 + i, 1)).collect::<Vec<_>>();
        assert_eq!(grant(0x1000, 0x2000, full.clone()).validate(), Ok(()));
        let msg = grant(0x1000, 0x2000, full.clone());
        assert_eq!(decode_frame(&encode(&msg)), Ok(Some((msg, FRAME_HEADER_LEN + 105 + 4 * MAX_IPC_WINDOWS))));
        let mut over = full;
        over.push(w(0x1000, 1));
        for (msg, why) in [
            (grant(0x1000, 0x2000, vec![]), "no window"),
            (grant(0x1000, 0x2000, over), "too many windows"),
            (grant(0x1000, 0, vec![w(0x1000, 1)]), "an empty allocation"),
            (grant(u64::MAX - 4, 8, vec![w(u64::MAX - 4, 1)]), "a wrapping allocation"),
            (grant(0x1000, 0x2000, vec![w(0xfff, 2)]), "a window starting before the allocation"),
            (grant(0x1000, 0x2000, vec![w(0x2fff, 2)]), "a window ending after it"),
            (grant(0x1000, 0x2000, vec![w(0x1000, 0)]), "an empty window"),
        ] {
            assert!(msg.validate().is_err(), "{why}");
            if why != "too many windows" {
                assert_eq!(decode_frame(&encode(&msg)).unwrap_err(), msg.validate().unwrap_err(), "{why}");
            }
        }
        assert!(
            matches!(decode_frame(&encode(&grant(0x1000, 0x2000, over_max()))), Err(ProtoError::TooLong { .. })),
            "one window too many is too long from the header"
        );
    }

    fn over_max() -> Vec<RemoteSeg> {
        (0..=MAX_IPC_WINDOWS as u64).map(|i| RemoteSeg { addr: 0x1000 + i, len: 1 }).collect()
    }

    #[test]
    fn direct_writes_name_one_valid_source_per_segment() {
        let seg = RemoteSeg { addr: 0x1000, len: 16 };
        let write = |src: Vec<u64>| Control::DirectWrite {
            xfer: 1,
            region: 2,
            token: 3,
            segs: vec![seg, seg],
            src,
            huge: false,
        };
        assert_eq!(write(vec![0x10, 0x20]).validate(), Ok(()));
        for (src, why) in
            [(vec![0x10], "too few"), (vec![0x10, 0x20, 0x30], "too many"), (vec![0x10, u64::MAX], "wraps")]
        {
            let msg = write(src);
            assert!(matches!(msg.validate(), Err(ProtoError::Invalid(_))), "{why}");
            // Too many sources are trailing bytes to the decoder, the others fail its checks.
            assert!(decode_frame(&encode(&msg)).is_err(), "{why}");
        }
        // The layout: a vector request's, then the sources, then the page size.
        let one = Control::DirectWrite { xfer: 1, region: 2, token: 3, segs: vec![seg], src: vec![0x0a0b], huge: true };
        let frame = encode(&one);
        let mut body =
            encode(&Control::ReadVector { xfer: 1, region: 2, token: 3, segs: vec![seg] })[FRAME_HEADER_LEN..].to_vec();
        body.extend(0x0a0bu64.to_le_bytes());
        body.extend(1u32.to_le_bytes());
        assert_eq!(&frame[FRAME_HEADER_LEN..], &body[..]);
        // A ProcessAck, and the page size of a DirectWrite or DirectGrant, say 0 or 1, nothing else.
        assert!(matches!(decode_raw(kind::PROCESS_ACK, &2u32.to_le_bytes()), Err(ProtoError::Invalid(_))));
        let n = body.len();
        body[n - 4..].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(decode_raw(kind::DIRECT_WRITE, &body), Err(ProtoError::Invalid(_))));
        let grant = [&7u64.to_le_bytes()[..], &2u32.to_le_bytes()].concat();
        assert!(matches!(decode_raw(kind::DIRECT_GRANT, &grant), Err(ProtoError::Invalid(_))));
        let grant = [&7u64.to_le_bytes()[..], &1u32.to_le_bytes()].concat();
        assert_eq!(
            decode_raw(kind::DIRECT_GRANT, &grant).unwrap().unwrap().0,
            Control::DirectGrant { xfer: 7, huge: true }
        );
    }

    #[test]
    fn deny_requires_negative_status_and_utf8_reason() {
        for status in [0, 1, i32::MAX] {
            let deny = Control::Deny { xfer: 1, status, reason: "r".into() };
            assert!(matches!(decode_frame(&encode(&deny)), Err(ProtoError::Invalid(_))));
        }
        let mut frame = encode(&Control::Deny { xfer: 1, status: -1, reason: "ok".into() });
        let n = frame.len();
        frame[n - 2] = 0xff;
        assert_eq!(decode_frame(&frame), Err(ProtoError::BadUtf8 { what: "Deny reason" }));
    }

    #[test]
    fn notify_name_must_not_contain_nul() {
        let msg = Control::Notify { name: b"a\0b".to_vec(), msg: b"payload".to_vec() };
        assert!(matches!(msg.validate(), Err(ProtoError::Invalid(_))));
        assert!(matches!(decode_frame(&encode(&msg)), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn handshake_and_unknown_kinds_are_rejected() {
        for k in [kind::HELLO, kind::WELCOME, kind::REFUSE] {
            assert_eq!(decode_raw(k, &[0; 10]), Err(HANDSHAKE_AFTER_SETUP));
            // Rejected from the header, without waiting for the body.
            assert_eq!(decode_frame(&raw_frame(k, &[0; 10])[..FRAME_HEADER_LEN]), Err(HANDSHAKE_AFTER_SETUP));
            let header = FrameHeader { kind: k, body_len: 0 };
            assert_eq!(Control::decode(&header, &[]), Err(HANDSHAKE_AFTER_SETUP));
        }
        assert_eq!(decode_raw(0, &[]), Err(ProtoError::UnknownKind(0)));
        assert_eq!(decode_raw(36, &[]), Err(ProtoError::UnknownKind(36)));
        assert_eq!(decode_raw(54, &[]), Err(ProtoError::UnknownKind(54)));
    }

    /// A channel lifetime's messages: a flag is 0 or 1, and a set of channels has 1 to
    /// MAX_CHANNELS handles, each whole.
    #[test]
    fn channel_lifetime_messages_are_bounded() {
        let mut body = 7u64.to_le_bytes().to_vec();
        body.extend(2u32.to_le_bytes());
        assert!(matches!(decode_raw(kind::CHANNELS_PARKED, &body), Err(ProtoError::Invalid(_))));
        for n in [0, MAX_CHANNELS as usize + 1] {
            let msg = Control::OpenChannels { epoch: 1, handles: vec![[3; NET_HANDLE_SIZE]; n] };
            assert!(matches!(msg.validate(), Err(ProtoError::Invalid(_))), "{n} handles");
            assert!(decode_frame(&encode(&msg)).is_err(), "{n} handles");
        }
        let whole = encode(&Control::OpenChannels { epoch: 1, handles: vec![[3; NET_HANDLE_SIZE]; 2] });
        let (header, body) = split(&whole);
        let cut = &body[..body.len() - 1];
        assert!(
            Control::decode(&FrameHeader { body_len: cut.len() as u32, ..header }, cut).is_err(),
            "a handle cut short"
        );
    }

    #[test]
    fn bad_magic_and_flags_are_rejected() {
        let mut frame = encode(&Control::Close);
        frame[3] = 0x80;
        assert_eq!(decode_frame(&frame), Err(ProtoError::BadFlags(0x80)));
        let mut frame = encode(&Control::Close);
        frame[0] = 0;
        assert_eq!(decode_frame(&frame), Err(ProtoError::BadMagic { found: 0x5400 }));
    }

    #[test]
    fn validate_accepts_every_sample() {
        for msg in samples() {
            assert_eq!(msg.validate(), Ok(()), "{msg:?}");
        }
    }

    #[test]
    fn fuzz_random_streams_never_panic() {
        let frames: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        let mut rng = XorShift::new(0xc0ff_ee00_1234);
        let mut accepted = 0;
        for i in 0..10_000 {
            let buf = match i % 3 {
                0 => rng.bytes_below(64),
                1 => {
                    // A plausible header so the body decoders see random input too.
                    let kind = u8::try_from(16 + rng.below(32)).unwrap();
                    raw_frame(kind, &rng.bytes_below(48))
                }
                _ => {
                    let base = rng.pick(&frames);
                    rng.mutate(base)
                }
            };
            let lent = decode_frame_lent(&buf).map(|f| f.map(|(frame, used)| (frame.into_control(), used)));
            assert_eq!(lent, decode_frame(&buf), "the lending decoder differs on {buf:?}");
            match decode_frame(&buf) {
                Ok(Some((msg, used))) => {
                    accepted += 1;
                    assert!(used <= buf.len());
                    // Encodings are canonical: what decodes must re-encode to the same bytes.
                    assert_eq!(encode(&msg), &buf[..used]);
                }
                Ok(None) => assert!(
                    buf.len() < FRAME_HEADER_LEN || {
                        let (h, _) = split(&buf);
                        h.frame_len() > buf.len()
                    }
                ),
                Err(_) => {}
            }
        }
        assert!(accepted > 0, "fuzzing never reached a successful decode");
    }
}
