//! The per-connection state machine: what each end asked for, granted and still owes. It takes the
//! peer's decoded control messages and the caller's requests and answers with actions (control
//! messages to send, flows to queue on channels, transfer parts to finish); it never touches a
//! socket, a thread or a channel, so every exchange is unit-tested as plain calls. `Connection`
//! holds it under its lock and carries the actions out.
//!
//! Flows are numbered per direction, and both ends queue them on the channels in that order (the
//! number seeds the chunk plan's channel rotation). The sending end numbers a flow when it puts the
//! message that starts it on the control stream, under the connection lock, and the receiving end
//! when it reads that message: a write's own request (its chunks follow at once, without a grant, or
//! are posted just before it when short: the stream's order of messages and of queued flows is the
//! same either way),
//! the Data marker of a granted send or a served read. So the stream's order is the flows' order.
//!
//! A deregistered region is cut off here (`cut`): flows on it finish through scratch memory, so both
//! ends keep their chunk plans, and end in failure: a local part with -6, a peer's write with a Deny
//! instead of its Done. A peer's write we refuse is received through scratch memory the same way. A read we serve has no answer at its end (the reader completes on the
//! chunks), so a cut one is denied at once and its remaining chunks are held until the reader's
//! Resume says it took note: it can then no longer complete on chunks that carry no data.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod eager;
mod ipc_send;
mod offer;
mod seam;

use super::landing::Landings;
pub(super) use crate::engine::one_sided::{OneSidedItem, OneSidedRequest, Regions, VectorRequest, VectorRuns};
use crate::engine::path::{self, Path};
use crate::engine::plan::{Chunking, Extent, chunk_count};
use crate::engine::region::Region;
use crate::engine::same_host::state::SameHost;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, Frame, INLINE_LEN_FLOOR, MAX_INLINE_LEN, MAX_INLINE_SEND_BACKLOG, RemoteSeg, VectorRun};
use crate::transport::{IoSeg, MemKind};
pub(crate) use offer::{DeviceRecv, IpcOffer, IpcSource};

/// Announced sends the peer may queue ahead of our receives before it is treated as hostile.
const MAX_UNMATCHED_ANNOUNCES: usize = 1 << 16;

/// Ended reads remembered for a late Deny: the Deny leaves at the cut, within the drive pass that
/// sent the last chunks, so only the reads ending while it crosses the control stream need it.
const ENDED_READS_KEPT: usize = 64;

/// Chunks of the peer's refused writes we may be receiving into scratch memory at once. A write's
/// chunks follow its request unasked, so a peer holding no capability could otherwise make us queue
/// chunks without end; this is room for two maximal requests at the smallest chunk size (a queued
/// chunk costs about 64 bytes), far beyond what a deregistration racing a peer's writes leaves.
const MAX_REFUSED_CHUNKS: usize = 2 << 20;

/// Inline write and small-read bytes a connection keeps unanswered; further small one-sided items
/// take the request path. Bounds what either end's control writer can be asked to queue for the
/// other (a vector of 8192 reads of 64 KiB would otherwise queue 512 MiB of ReadData at once).
pub(super) const MAX_INLINE_ONE_SIDED: u64 = 8 << 20;

/// What the state machine asks its connection to do, in order.
#[derive(Debug)]
pub(super) enum Action {
    /// Put a control message on the wire.
    Send(Control),
    /// Cut a flow into chunks and queue them on the channels.
    Queue(FlowPlan),
    /// Finish one part of a caller's transfer.
    Finish(Arc<Transfer>, Result<u64>),
    /// Hand the peer's notification to the process-wide queue.
    Notify { name: Vec<u8>, msg: Vec<u8> },
    /// Post no more send chunks of this flow (and so none queued behind them on its channels).
    Hold(u64),
    /// Post them again.
    Release(u64),
    /// Wake the connection's host worker: a same-host proof or copy is queued (`same_host/state.rs`).
    /// `ours`: the copy of a read of ours, which a caller waiting on the connection may run on its
    /// own thread instead.
    HostWork { ours: bool },
    /// The peer is to copy out of this region of ours with `process_vm_readv`: collapse it into
    /// huge pages in the background, once (`Region::collapse_into_huge_pages`).
    Collapse(Arc<Region>),
    /// The peer may map this region of ours (an IpcSend offered a message out of it): revoke it
    /// when it is deregistered (`IpcState::record_grant`).
    GrantIpc(u64),
    /// Copy the peer's offered message into a matched receive over CUDA IPC (`ipc_send.rs`); the
    /// connection hands it back with `recv_by_network` when it cannot.
    DeviceRecv(DeviceRecv),
    /// Carry out what follows a device copy the state started (an inline payload's store, the load
    /// answering the peer's small read) once the copy is done.
    AfterCopy(AfterCopy),
}

/// What waits for a started device copy: actions, and for a load the peer's read it answers. The
/// connection carries them out in the order the copies started; a copy that fails once started
/// fails the connection (the GPU's context is then most likely lost), its parts with it.
#[derive(Debug)]
pub(super) struct AfterCopy {
    pub copy: Box<dyn Copying>,
    pub then: Vec<Action>,
    /// The peer's small read whose ReadData carries the bytes the copy loaded.
    pub read_answer: Option<u64>,
}

/// A device copy started by `Memory::start_store` or `start_load`, finished by its connection.
pub(super) trait Copying: Send + std::fmt::Debug {
    /// Whether it finished; never blocks. An error is the copy's own.
    fn done(&self) -> Result<bool>;
    /// Returns once it finished.
    fn wait(&self) -> Result<()>;
    /// What a load brought, once done.
    fn loaded(&self) -> &[u8];
}

/// A store or load done at once, or a device copy started.
pub(super) enum Started<T> {
    Now(T),
    Later(Box<dyn Copying>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    Send,
    Recv,
}

/// A flow to cut into chunks: `seq` is its number in its direction, which seeds its channel
/// rotation identically on both ends. Without a region the chunks move through scratch memory (the
/// flow's region was deregistered before it started).
#[derive(Debug)]
pub(super) struct FlowPlan {
    pub dir: Direction,
    pub flow: u64,
    pub region: Option<Regions>,
    pub extent: Extent,
    pub seq: u64,
}

/// Local memory as the state machine sees it: the peer's one-sided requests are decided here, and
/// the inline kinds copy through it.
pub(super) trait Memory {
    /// Decides a peer's request for `[addr, addr + len)` of region `region` presenting `token`.
    fn authorize(&self, region: u64, token: u64, addr: u64, len: u64) -> Result<Arc<Region>>;

    /// Decides a peer's vector request: every segment, or none.
    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>>;

    /// Puts `payload` at `addr`.
    ///
    /// # Safety
    /// `[addr, addr + payload.len())` lies inside `region`, which is live.
    unsafe fn store(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<()>;

    /// Reads `len` bytes at `addr`.
    ///
    /// # Safety
    /// `[addr, addr + len)` lies inside `region`, which is live.
    unsafe fn load(&self, region: &Region, addr: usize, len: usize) -> Result<Vec<u8>>;

    /// `store`, or for device memory its start: nothing may answer for the range before the copy
    /// is done.
    ///
    /// # Safety
    /// As `store`; the range stays live until the copy is done (a deregistration fences the
    /// connection, which waits for its copies).
    unsafe fn start_store(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<Started<()>> {
        // SAFETY: per the contract.
        unsafe { self.store(region, addr, payload) }.map(Started::Now)
    }

    /// `load`, or for device memory its start.
    ///
    /// # Safety
    /// As `load` and `start_store`.
    unsafe fn start_load(&self, region: &Region, addr: usize, len: usize) -> Result<Started<Vec<u8>>> {
        // SAFETY: per the contract.
        unsafe { self.load(region, addr, len) }.map(Started::Now)
    }
}

/// One message of a caller's send.
pub(super) struct SendItem {
    pub region: Arc<Region>,
    pub addr: usize,
    pub len: u64,
    /// The bytes of a small message, read before the state lock.
    pub payload: Option<Vec<u8>>,
    /// GPU memory the peer may copy out itself over CUDA IPC (`path::message_path`).
    pub ipc: Option<IpcOffer>,
}

/// What finishing a flow means.
enum OnDone {
    /// A part of the caller's transfer.
    Part(Arc<Transfer>),
    /// Tell the peer its send or write landed (Done, or Deny after a cut).
    Ack(u64),
    /// A matched two-sided receive: both.
    PartAndAck(Arc<Transfer>, u64),
    /// Serving the peer's read `op`: nothing to report at the end.
    Served(u64),
    /// The peer's eager message into landing slots (`eager.rs`), which a receive may take later.
    Landing,
}

impl OnDone {
    fn transfer(&self) -> Option<&Arc<Transfer>> {
        match self {
            OnDone::Part(t) | OnDone::PartAndAck(t, _) => Some(t),
            OnDone::Ack(_) | OnDone::Served(_) | OnDone::Landing => None,
        }
    }
}

struct Flow {
    /// Chunks still in flight, plus one while the peer's Done (or Deny) is outstanding.
    remaining: usize,
    len: u64,
    on_done: OnDone,
    /// Keeps the registrations alive while in flight; None for a flow that moves through scratch.
    region: Option<Regions>,
    /// How the flow ends once its chunks are through, when not in success: its region was cut off,
    /// or the peer refused it.
    error: Option<Error>,
    /// Our two-sided send: the receiver completes on our chunks alone, so a cut cannot be told to it.
    uncuttable: bool,
    /// Our eager send: once its chunks are out, its answer waits for the peer's user to post a
    /// receive, which is no stall.
    answer_from_user: bool,
    /// Send chunks not yet handed to the transport. A chunk handed over is read from the region
    /// before a deregistration returns (or the connection fails), so a read we serve cut after its
    /// last chunk left still delivers the region's bytes, and needs no Deny.
    unsent: usize,
    /// A read we serve, cut: its chunks wait for the reader's Resume.
    held: bool,
    /// The peer's write we refused: chunks it holds of `refused_chunks`.
    refused: usize,
}

impl Flow {
    /// A flow of `len` bytes in `remaining` chunks (plus any answer it waits for), cuttable, none
    /// of them held back or refused: callers override what differs.
    fn new(remaining: usize, len: u64, on_done: OnDone, region: Option<Regions>, error: Option<Error>) -> Flow {
        Flow {
            remaining,
            len,
            on_done,
            region,
            error,
            uncuttable: false,
            answer_from_user: false,
            unsent: 0,
            held: false,
            refused: 0,
        }
    }

    /// Whether only the peer's user keeps it from ending.
    fn waits_on_user(&self) -> bool {
        self.answer_from_user && self.remaining == 1 && self.unsent == 0
    }
}

/// Memory a flow sends from.
struct Source {
    extent: Extent,
    region: Regions,
}

struct Outbound {
    src: Source,
    transfer: Arc<Transfer>,
    /// The peer's engine answers at once (a write); a send waits for the peer's user to post a receive.
    prompt: bool,
    /// The source was deregistered before the Grant: the flow will send zeros and fail.
    error: Option<Error>,
    /// Offered over CUDA IPC (IpcSend): the receiver's Done may end it without a Grant.
    offered: bool,
}

struct Inbound {
    extent: Extent,
    region: Regions,
    on_done: OnDone,
    /// Bytes of `inline_one_sided` this small read holds until its ReadData (zero otherwise).
    inline: u64,
    /// The destination was deregistered before the data came: it lands in scratch and fails.
    error: Option<Error>,
    /// The peer's answer on the control stream is still counted in the transfer's unanswered
    /// parts (a small read's ReadData, a direct read's DirectGrant or Data, either's Deny): a read
    /// over the channels expects none, and a direct read served over them had its answer already.
    awaits_answer: bool,
}

impl Inbound {
    /// A destination that ends on its own data: no inline bytes held, no answer awaited.
    fn new(extent: Extent, region: impl Into<Regions>, on_done: OnDone) -> Inbound {
        Inbound { extent, region: region.into(), on_done, inline: 0, error: None, awaits_answer: false }
    }

    /// The peer answered this read on the control stream: counted once, whichever message it was.
    fn answer_once(&mut self) {
        if std::mem::take(&mut self.awaits_answer)
            && let Some(t) = self.on_done.transfer()
        {
            t.answered();
        }
    }
}

/// A part waiting for the peer's Done or Deny of an inline write or send.
struct InlineOp {
    transfer: Arc<Transfer>,
    len: u64,
    /// Bytes this op holds of the peer's inline-send buffer (sends), or of `inline_one_sided`
    /// (writes).
    backlog: u64,
    /// Which of the two `backlog` counts against.
    kind: InlineKind,
    /// The peer's engine answers at once (a write); a send waits for the peer's user to post a
    /// receive, which is not a stall.
    prompt: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum InlineKind {
    Write,
    Send,
}

/// A send the peer announced (or carried inline, or sent eagerly) that no receive has matched yet.
struct Announced {
    peer_op: u64,
    len: u64,
    body: Body,
}

/// Where an unmatched message's bytes are.
enum Body {
    /// Still with the peer, until granted.
    Announced,
    Inline(Vec<u8>),
    /// Landing (or landed) by this flow of ours (`eager.rs`).
    Landing(u64),
    /// In the peer's GPU memory, offered for us to copy out over CUDA IPC (`ipc_send.rs`).
    Ipc(IpcSource),
}

struct PostedRecv {
    addr: usize,
    max: u64,
    region: Arc<Region>,
    transfer: Arc<Transfer>,
    /// The region was deregistered: the part failed then, and the send this receive matches is
    /// refused with this error.
    cut: Option<Error>,
}

pub(super) struct ConnState {
    /// The chunk size and how scattered flows are cut, agreed with the peer at the handshake.
    chunking: Chunking,
    /// The receive an inline message of the peer's (its op) is being read straight into by the
    /// connection's reader: taken from `posted_recvs`, ended by `inline_send_landed`.
    landing_recv: Option<(u64, PostedRecv)>,
    next_id: u64,
    /// Flows started in each direction; seeds each flow's channel rotation identically on both ends.
    out_seq: u64,
    in_seq: u64,
    /// Chunks of the peer's refused writes still to be received into scratch memory (bounded by
    /// MAX_REFUSED_CHUNKS).
    refused_chunks: usize,
    /// Our sends and writes waiting for the peer's Grant or Deny, by op id.
    awaiting_grant: HashMap<u64, Outbound>,
    /// Our running sends and writes waiting for the peer's Done: op id -> flow id.
    awaiting_done: HashMap<u64, u64>,
    /// Our inline writes and sends waiting for the peer's Done or Deny, by op id.
    inline_ops: HashMap<u64, InlineOp>,
    /// Payload bytes of our inline sends the peer has not answered yet (bounded by
    /// MAX_INLINE_SEND_BACKLOG, so the peer never buffers more than that for us).
    inline_send_backlog: u64,
    /// Payload bytes of our inline writes and small reads the peer has not answered yet (bounded by
    /// MAX_INLINE_ONE_SIDED).
    inline_one_sided: u64,
    /// The longest host-memory transfer we send inline (`Config::inline_max`).
    inline_max: u64,
    /// Granted destinations waiting for the peer's Data marker, by our flow id.
    inbound: HashMap<u64, Inbound>,
    posted_recvs: VecDeque<PostedRecv>,
    /// The peer's announced sends not yet matched to a receive, in the order it sent them.
    announces: VecDeque<Announced>,
    /// Payload bytes held in `announces`.
    announced_inline: u64,
    /// Eager sending (`eager.rs`), on connections whose chunks span segments.
    eager: Option<Landings<PostedRecv>>,
    flows: HashMap<u64, Flow>,
    /// Reads we serve, by the peer's op id: flow id.
    serving: HashMap<u64, u64>,
    /// Served reads we denied that ended before the reader's Resume came (their last chunks were
    /// already with the transport when the hold was asked): that Resume is owed, not a violation.
    resume_owed: HashSet<u64>,
    /// Our reads whose data is coming (flow id = op id); the server may deny one until it ends.
    reading: HashSet<u64>,
    /// The last reads of ours that ended (at most `ENDED_READS_KEPT`): a Deny the server sent
    /// before it saw their last chunks go may still come.
    ended_reads: VecDeque<u64>,
    failure: Option<Error>,
    /// Last time the peer showed life: a control message or a finished chunk.
    last_heard: Instant,
    /// The same-host sub-state machine: its requests, copies and leases.
    same_host: SameHost,
    /// The peer is an engine of this host: its messages may be offered for us to copy.
    ipc_sends: bool,
    /// Our offered messages the peer copied over CUDA IPC (ended by its Done, with no Grant).
    sends_copied: u64,
}

impl ConnState {
    pub fn new(chunking: Chunking, now: Instant) -> ConnState {
        ConnState {
            chunking,
            landing_recv: None,
            next_id: 0,
            out_seq: 0,
            in_seq: 0,
            refused_chunks: 0,
            awaiting_grant: HashMap::new(),
            awaiting_done: HashMap::new(),
            inline_ops: HashMap::new(),
            inline_send_backlog: 0,
            inline_one_sided: 0,
            inline_max: INLINE_LEN_FLOOR as u64,
            inbound: HashMap::new(),
            posted_recvs: VecDeque::new(),
            announces: VecDeque::new(),
            announced_inline: 0,
            eager: None,
            flows: HashMap::new(),
            serving: HashMap::new(),
            resume_owed: HashSet::new(),
            reading: HashSet::new(),
            ended_reads: VecDeque::new(),
            failure: None,
            last_heard: now,
            same_host: SameHost::default(),
            ipc_sends: false,
            sends_copied: 0,
        }
    }

    pub fn chunking(&self) -> Chunking {
        self.chunking
    }

    /// Sends host-memory transfers of up to `max` bytes inline (within the protocol's bounds).
    pub fn set_inline_max(&mut self, max: u64) {
        self.inline_max = max.clamp(INLINE_LEN_FLOOR as u64, MAX_INLINE_LEN as u64);
    }

    /// The error that ended the connection, once it failed.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.as_ref()
    }

    /// Ok while the connection works; its failure afterwards.
    pub fn check_open(&self) -> Result<()> {
        self.failure.as_ref().map_or(Ok(()), |e| Err(e.clone()))
    }

    /// Opens a caller's post: checks the connection, and restarts the stall clock when the peer
    /// owed us nothing until now (its silence so far was no stall).
    pub fn begin_post(&mut self, now: Instant) -> Result<()> {
        if !self.waits_on_peer() {
            self.last_heard = now;
        }
        self.check_open()
    }

    /// The peer showed life: a control message arrived or a chunk moved.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// When the peer last showed life, or a chunk last moved.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// Whether no flow of either direction is under way, to be answered, or owed its chunks: the
    /// channels may close (`life.rs`). Messages still unmatched are no flow yet.
    pub fn moves_nothing(&self) -> bool {
        self.flows.is_empty()
            && self.inbound.is_empty()
            && self.awaiting_done.is_empty()
            && self.serving.is_empty()
            && self.reading.is_empty()
            && self.refused_chunks == 0
    }

    /// Whether the peer's engine owes us something and has been silent for longer than `timeout`.
    /// The clock goes first: `waits_on_peer` scans the pending ops.
    pub fn stalled(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.last_heard) > timeout && self.waits_on_peer()
    }

    /// Whether something pending needs the peer's engine (not its user) to act soon.
    pub fn waits_on_peer(&self) -> bool {
        self.flows.values().any(|f| !f.waits_on_user())
            || self.awaiting_done.values().any(|flow| !self.flows.get(flow).is_some_and(Flow::waits_on_user))
            || self.inline_ops.values().any(|o| o.prompt)
            || !self.inbound.is_empty()
            || self.awaiting_grant.values().any(|o| o.prompt)
            || self.same_host.waits_on_peer()
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Registers the requests of one write or read call as parts of `transfer`, one part each, and
    /// pushes the messages to send, then the writes' flows to queue (their chunks follow the
    /// requests at once, or are posted just before them when short). Nothing is registered when a
    /// local region was deregistered since the caller looked it up. When flows were queued, the messages must reach the wire before the
    /// connection lock is released: the peer numbers the flows in their requests' order.
    pub fn post_one_sided(
        &mut self,
        transfer: &Arc<Transfer>,
        write: bool,
        requests: Vec<OneSidedRequest>,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        live(requests.iter().flat_map(|r| {
            let (first, runs) = match r {
                OneSidedRequest::Item(item) => (&item.region, None),
                OneSidedRequest::Vector(vector) => (&vector.region, vector.runs.as_ref()),
            };
            std::iter::once(first).chain(runs.into_iter().flat_map(|runs| runs.local.iter()))
        }))?;
        // Processes of one host copy host memory directly (`same_host/state.rs`); the target still
        // decides.
        let direct = requests.iter().all(|r| r.local_region().kind == MemKind::Host);
        // The requests go out together, ahead of the flows: the peer can start on them while
        // this end cuts the chunks.
        let mut flows = Vec::new();
        // Parts the peer answers on the control stream: inline ones and same-host reads promptly
        // (a read's DirectGrant, then our copy, then the target's Done); writes over the channels
        // after their chunks, same-host writes after the target's copy (Done, or Deny).
        let (mut prompt_parts, mut later_parts, mut read_parts) = (0, 0, 0);
        for request in requests {
            let before = flows.len();
            let (msg, inline, direct) = match request {
                OneSidedRequest::Item(item) => self.post_item(transfer, write, item, direct, &mut flows),
                OneSidedRequest::Vector(vector) => {
                    let (msg, direct) = self.post_vector(transfer, write, vector, direct, &mut flows);
                    (msg, false, direct)
                }
            };
            if inline || direct && !write {
                prompt_parts += 1;
            } else if direct || flows.len() > before {
                later_parts += 1;
            }
            // A read over the channels ends on its own chunks, with no answer.
            read_parts += usize::from(matches!(
                msg,
                Control::ReadRequest { .. } | Control::ReadVector { .. } | Control::ReadRuns { .. }
            ));
            out.push(Action::Send(msg));
        }
        out.append(&mut flows);
        transfer.expect_answers(prompt_parts + later_parts, later_parts > 0);
        transfer.expect_chunk_ends(read_parts);
        Ok(())
    }

    /// One item as its own request; also says whether it went inline and whether it asked for the
    /// same-host copy. `direct`: it may ask for that. A write's flow is pushed to `flows`.
    fn post_item(
        &mut self,
        transfer: &Arc<Transfer>,
        write: bool,
        item: OneSidedItem,
        direct: bool,
        flows: &mut Vec<Action>,
    ) -> (Control, bool, bool) {
        let id = self.take_id();
        let OneSidedItem { region, addr: local, len, remote_region, token, remote_addr: addr, payload } = item;
        // A write goes inline only with its payload read.
        let path = path::request_path(path::Request {
            len,
            kind: region.kind,
            inline_max: self.inline_max,
            inline_left: MAX_INLINE_ONE_SIDED.saturating_sub(self.inline_one_sided),
            item: true,
            payload: payload.is_some() || !write,
            host_copy: direct,
        });
        let inline = path == Path::Inline;
        if inline {
            self.inline_one_sided += len;
        }
        let extent = Extent::Contiguous { addr: local, len };
        let direct = match (path, u32::try_from(len)) {
            (Path::SameHostHostCopy, Ok(seg_len)) => {
                let seg = RemoteSeg { addr, len: seg_len };
                self.same_host_request((id, write), (&extent, &region), (remote_region, token), &[seg], flows)
            }
            _ => None,
        };
        let asked = direct.is_some();
        let msg = if let (Some(payload), true) = (payload, inline) {
            let kind = InlineKind::Write;
            self.inline_ops.insert(id, InlineOp { transfer: transfer.clone(), len, backlog: len, kind, prompt: true });
            Control::InlineWrite { xfer: id, region: remote_region, token, addr, payload }
        } else if inline {
            let on_done = OnDone::Part(transfer.clone());
            self.inbound
                .insert(id, Inbound { inline: len, awaits_answer: true, ..Inbound::new(extent, region, on_done) });
            Control::ReadSmall { xfer: id, region: remote_region, token, addr, len }
        } else if write {
            let request = Control::WriteRequest { xfer: id, region: remote_region, token, addr, len };
            self.post_write(id, Source { extent, region: region.into() }, transfer, direct, request, flows)
        } else {
            let request = Control::ReadRequest { xfer: id, region: remote_region, token, addr, len };
            self.post_read(id, extent, region.into(), transfer, direct, request)
        };
        (msg, inline, asked)
    }

    /// Items sharing both regions as one vector request: the local segments are the flow's extent
    /// on this end, the remote ones travel in the request. A write's flow is pushed to `flows`.
    fn post_vector(
        &mut self,
        transfer: &Arc<Transfer>,
        write: bool,
        vector: VectorRequest,
        direct: bool,
        flows: &mut Vec<Action>,
    ) -> (Control, bool) {
        let id = self.take_id();
        let VectorRequest { region, local: extent, remote_region, token, segs, runs } = vector;
        if let Some(runs) = runs {
            // Several regions, one flow over the channels: never the same-host copy, which goes
            // per region (a call is grouped so only where its one path is the network).
            let VectorRuns { local, remote } = *runs;
            let src = Source { extent, region: Regions::Runs(local) };
            let msg = if write {
                let request = Control::WriteRuns { xfer: id, runs: remote, segs };
                self.post_write(id, src, transfer, None, request, flows)
            } else {
                let request = Control::ReadRuns { xfer: id, runs: remote, segs };
                self.post_read(id, src.extent, src.region, transfer, None, request)
            };
            return (msg, false);
        }
        let len = segs.iter().map(|s| u64::from(s.len)).sum();
        let path = path::request_path(path::Request {
            len,
            kind: region.kind,
            inline_max: self.inline_max,
            inline_left: 0,
            item: false,
            payload: true,
            host_copy: direct,
        });
        let direct = if path == Path::SameHostHostCopy {
            self.same_host_request((id, write), (&extent, &region), (remote_region, token), &segs, flows)
        } else {
            None
        };
        let asked = direct.is_some();
        let msg = if write {
            let request = Control::WriteVector { xfer: id, region: remote_region, token, segs };
            self.post_write(id, Source { extent, region: region.into() }, transfer, direct, request, flows)
        } else {
            let request = Control::ReadVector { xfer: id, region: remote_region, token, segs };
            self.post_read(id, extent, region.into(), transfer, direct, request)
        };
        (msg, asked)
    }

    /// Our write `id` of `src` over the channels or, when it asked for the same-host copy
    /// (`direct`), held until the peer grants or refuses that; returns the message to send.
    fn post_write(
        &mut self,
        id: u64,
        src: Source,
        transfer: &Arc<Transfer>,
        direct: Option<Control>,
        request: Control,
        flows: &mut Vec<Action>,
    ) -> Control {
        match direct {
            Some(msg) => {
                let pending = Outbound { src, transfer: transfer.clone(), prompt: true, error: None, offered: false };
                self.awaiting_grant.insert(id, pending);
                msg
            }
            None => {
                self.start_write(id, src, transfer, flows);
                request
            }
        }
    }

    /// Our read `id` into `extent`, by the same-host copy when it asked for one (`direct`), else by
    /// the peer's flow; returns the message to send.
    fn post_read(
        &mut self,
        id: u64,
        extent: Extent,
        region: Regions,
        transfer: &Arc<Transfer>,
        direct: Option<Control>,
        request: Control,
    ) -> Control {
        let on_done = OnDone::Part(transfer.clone());
        let awaits_answer = direct.is_some();
        self.inbound.insert(id, Inbound { awaits_answer, ..Inbound::new(extent, region, on_done) });
        direct.unwrap_or(request)
    }

    /// Registers the messages of one send call as parts of `transfer` and pushes what to send:
    /// the messages, then the eager ones' flows (which, as writes' do, reach the wire under the
    /// lock). Nothing is registered when a local region was deregistered since the caller looked
    /// it up.
    pub fn post_send(&mut self, transfer: &Arc<Transfer>, items: Vec<SendItem>, out: &mut Vec<Action>) -> Result<()> {
        live(items.iter().map(|i| &i.region))?;
        let parts = items.len();
        let mut flows = Vec::new();
        let (mut inline_parts, mut eager_parts, mut offered_parts) = (0, 0, 0);
        for SendItem { region, addr, len, payload, ipc } in items {
            let id = self.take_id();
            let src = Source { extent: Extent::Contiguous { addr, len }, region: region.into() };
            if let Some(offer) = ipc {
                offered_parts += 1;
                self.offer_ipc(id, (src, addr as u64), transfer, offer, out);
                continue;
            }
            // A small message carries its payload, a mid-size one its chunks at once, unless the
            // peer could be left holding too much for receives not yet posted; then it is
            // announced like a large one.
            let msg = match payload {
                Some(payload) if self.inline_send_backlog + len <= MAX_INLINE_SEND_BACKLOG => {
                    inline_parts += 1;
                    self.inline_send_backlog += len;
                    let kind = InlineKind::Send;
                    self.inline_ops
                        .insert(id, InlineOp { transfer: transfer.clone(), len, backlog: len, kind, prompt: false });
                    Control::InlineSend { xfer: id, payload }
                }
                None if self.goes_eagerly(len) => {
                    eager_parts += 1;
                    self.send_eagerly(id, src, transfer, &mut flows)
                }
                _ => {
                    let pending =
                        Outbound { src, transfer: transfer.clone(), prompt: false, error: None, offered: false };
                    self.awaiting_grant.insert(id, pending);
                    Control::SendAnnounce { xfer: id, len }
                }
            };
            out.push(Action::Send(msg));
        }
        out.append(&mut flows);
        // An announced send ends with a Done too, but only once the peer's user posted a receive.
        // An offered one ends with the receiver's Done after its copy, or its Deny, as a same-host
        // write does: after its bytes moved.
        if inline_parts + eager_parts + offered_parts == parts {
            transfer.expect_answers(parts, eager_parts + offered_parts > 0);
        }
        Ok(())
    }

    /// Posts a receive of at most `max` bytes at `addr` and matches it against announced sends.
    pub fn post_recv(
        &mut self,
        transfer: &Arc<Transfer>,
        region: Arc<Region>,
        addr: usize,
        max: u64,
        mem: &impl Memory,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        live([&region])?;
        self.posted_recvs.push_back(PostedRecv { addr, max, region, transfer: transfer.clone(), cut: None });
        self.match_recvs(mem, out);
        Ok(())
    }

    /// Cuts `region` off: nothing this connection does touches it any more once the channels
    /// redirected its queued chunks and its posted ones completed. Running and granted flows on it
    /// finish through scratch memory and then fail (the peer's write or read with a Deny, a local
    /// part with `err`); a posted receive fails now and refuses the send it will match. An error
    /// means the connection must fail: one of our sends was reading the region, and its receiver
    /// completes on our chunks alone, so it could not be told.
    pub fn cut(&mut self, region: u64, err: &Error, out: &mut Vec<Action>) -> Result<()> {
        let on = |r: &Arc<Region>| r.id == region;
        let mut uncuttable = false;
        for (&flow, f) in self.flows.iter_mut().filter(|(_, f)| f.region.as_ref().is_some_and(|r| r.has(region))) {
            f.error.get_or_insert_with(|| err.clone());
            uncuttable |= f.uncuttable;
            if let OnDone::Served(peer_op) = f.on_done
                && f.unsent > 0
                && !f.held
            {
                f.held = true;
                out.push(Action::Hold(flow));
                out.push(Action::Send(deny_msg(peer_op, err)));
            }
        }
        for o in self.awaiting_grant.values_mut().filter(|o| o.src.region.has(region)) {
            o.error.get_or_insert_with(|| err.clone());
            uncuttable |= !o.prompt;
        }
        for i in self.inbound.values_mut().filter(|i| i.region.has(region)) {
            i.error.get_or_insert_with(|| err.clone());
        }
        let landing = self.landing_recv.iter_mut().map(|(_, r)| r);
        for r in self.posted_recvs.iter_mut().chain(landing).filter(|r| on(&r.region) && r.cut.is_none()) {
            r.cut = Some(err.clone());
            out.push(Action::Finish(r.transfer.clone(), Err(err.clone())));
        }
        self.cut_landings(region, err, out);
        self.same_host.cut(region, err);
        if uncuttable {
            return Err(Error::not_allowed(format!(
                "memory region {region} was deregistered while a send from it was unfinished; its receiver \
                 cannot be told, so the connection fails"
            )));
        }
        Ok(())
    }

    /// Whether inline transfers of ours wait for their answers (writes, sends, small reads).
    pub fn inline_unanswered(&self) -> bool {
        !self.inline_ops.is_empty() || self.inline_one_sided > 0
    }

    /// Applies one message as `handle` does, an inline payload stored straight from the reader's
    /// buffer.
    pub fn handle_frame(&mut self, frame: Frame<'_>, mem: &impl Memory, out: &mut Vec<Action>) -> Result<()> {
        match frame {
            Frame::Whole(msg) => self.handle(msg, mem, out),
            Frame::InlineWrite { xfer, region, token, addr, payload } => {
                self.inline_write(xfer, (region, token, addr), payload, mem, out);
                Ok(())
            }
            Frame::ReadData { xfer, payload } => self.read_data(xfer, payload, mem, out),
            Frame::InlineSend { xfer, payload } => self.inline_send(xfer, payload, mem, out),
        }
    }

    /// The peer's inline message `xfer`: stored from the reader's buffer into the oldest posted
    /// receive when no older message waits for one, else held (copied) until a receive is posted.
    fn inline_send(&mut self, xfer: u64, payload: &[u8], mem: &impl Memory, out: &mut Vec<Action>) -> Result<()> {
        if !self.announces.is_empty() || self.posted_recvs.is_empty() {
            return self.handle(Control::InlineSend { xfer, payload: payload.to_vec() }, mem, out);
        }
        self.admit_inline_send(payload.len() as u64)?;
        let recv = self.posted_recvs.pop_front().expect("non-empty");
        let answer = match fit(recv, payload.len() as u64, out) {
            Ok(recv) => deliver_inline(recv, xfer, payload, mem, out),
            Err(e) => Some(deny_msg(xfer, &e)),
        };
        out.extend(answer.map(Action::Send));
        Ok(())
    }

    /// Refuses an inline message that would leave the peer's unmatched sends holding more than
    /// their bound here (the peer's own accounting keeps it under).
    fn admit_inline_send(&self, len: u64) -> Result<()> {
        if self.held_for_peer() + len > MAX_INLINE_SEND_BACKLOG {
            return Err(Error::backend(format!(
                "protocol violation: the peer's unmatched sends would hold more than {MAX_INLINE_SEND_BACKLOG} bytes here"
            )));
        }
        Ok(())
    }

    /// The peer's inline write of `payload` to `addr` of its capability `(region, token)`: stored
    /// and done, or denied.
    fn inline_write(
        &mut self,
        xfer: u64,
        (region, token, addr): (u64, u64, u64),
        payload: &[u8],
        mem: &impl Memory,
        out: &mut Vec<Action>,
    ) {
        let len = payload.len() as u64;
        let authorized = mem.authorize(region, token, addr, len);
        // SAFETY: `authorize` proved the range lies in a live, advertised region.
        match authorized.and_then(|r| unsafe { mem.start_store(&r, addr as usize, payload) }) {
            Err(e) => deny(xfer, e, out),
            Ok(Started::Now(())) => out.push(Action::Send(Control::Done { xfer, len })),
            Ok(Started::Later(copy)) => {
                let then = vec![Action::Send(Control::Done { xfer, len })];
                out.push(Action::AfterCopy(AfterCopy { copy, then, read_answer: None }));
            }
        }
    }

    /// The peer's inline write `xfer`, its `len` bytes read straight into their destination
    /// (`whole`), or cut off there because the region was deregistered meanwhile.
    pub fn inline_landed(&mut self, xfer: u64, len: u64, whole: bool, out: &mut Vec<Action>) {
        if whole {
            out.push(Action::Send(Control::Done { xfer, len }));
        } else {
            deny(xfer, landing_cut(), out);
        }
    }

    /// Where the answer to our small read `xfer` of `len` bytes goes, and its region, when it can
    /// be read straight there: host memory not cut off. `None` leaves the answer to `read_data`,
    /// which also refuses one of the wrong length.
    pub fn read_answer_destination(&self, xfer: u64, len: u64) -> Option<(usize, u64)> {
        let dst = self.inbound.get(&xfer)?;
        match dst.extent {
            Extent::Contiguous { addr, len: asked }
                if asked == len && dst.error.is_none() && dst.region.first().kind == MemKind::Host =>
            {
                Some((addr, dst.region.first().id))
            }
            _ => None,
        }
    }

    /// The answer to our small read `xfer`, its `len` bytes read straight into the destination
    /// (`whole`), or cut off there because the region was deregistered meanwhile: the read ends.
    pub fn read_answer_landed(&mut self, xfer: u64, len: u64, whole: bool, out: &mut Vec<Action>) -> Result<()> {
        let mut dst = self.inbound.remove(&xfer).ok_or_else(|| unknown_op("ReadData", xfer))?;
        self.inline_one_sided -= dst.inline;
        dst.answer_once();
        let landed = match dst.error {
            Some(e) => Err(e),
            None if whole => Ok(len),
            None => Err(landing_cut()),
        };
        if let Some(t) = dst.on_done.transfer() {
            out.push(Action::Finish(t.clone(), landed));
        }
        Ok(())
    }

    /// Where the peer's inline message `xfer` of `len` bytes goes, and its region, when it can be
    /// read straight there: into the oldest posted receive, as `inline_send` would store it, when
    /// no older message waits and the receive is host memory that takes it whole. The receive is
    /// taken for it until `inline_send_landed`. `None` leaves the message to `inline_send`; an
    /// error is the protocol violation that would fail the connection there.
    pub fn inline_send_destination(&mut self, xfer: u64, len: u64) -> Result<Option<(usize, u64)>> {
        if !self.announces.is_empty() || self.landing_recv.is_some() {
            return Ok(None);
        }
        let Some(recv) = self.posted_recvs.front() else { return Ok(None) };
        let room = (recv.region.base + recv.region.len).saturating_sub(recv.addr) as u64;
        if recv.cut.is_some() || len > recv.max || len > room || recv.region.kind != MemKind::Host {
            return Ok(None);
        }
        self.admit_inline_send(len)?;
        let recv = self.posted_recvs.pop_front().expect("looked at above");
        let dest = (recv.addr, recv.region.id);
        self.landing_recv = Some((xfer, recv));
        Ok(Some(dest))
    }

    /// The peer's inline message `xfer`, its `len` bytes read straight into the receive taken for
    /// it (`whole`), or cut off there because the region was deregistered meanwhile: both ends of
    /// the send end.
    pub fn inline_send_landed(&mut self, xfer: u64, len: u64, whole: bool, out: &mut Vec<Action>) -> Result<()> {
        if self.landing_recv.as_ref().is_none_or(|(op, _)| *op != xfer) {
            return Err(unknown_op("InlineSend", xfer));
        }
        let (_, recv) = self.landing_recv.take().expect("checked above");
        let answer = match recv.cut {
            // The cut failed the receive already.
            Some(e) => deny_msg(xfer, &e),
            None if whole => {
                out.push(Action::Finish(recv.transfer, Ok(len)));
                Control::Done { xfer, len }
            }
            None => {
                let e = landing_cut();
                out.push(Action::Finish(recv.transfer, Err(e.clone())));
                deny_msg(xfer, &e)
            }
        };
        out.push(Action::Send(answer));
        Ok(())
    }

    /// The answer to our small read `xfer`: stored into its destination, which finishes the read.
    fn read_data(&mut self, xfer: u64, payload: &[u8], mem: &impl Memory, out: &mut Vec<Action>) -> Result<()> {
        let dst = self.inbound.get(&xfer).ok_or_else(|| unknown_op("ReadData", xfer))?;
        let addr = match dst.extent {
            Extent::Contiguous { addr, len } if payload.len() as u64 == len => addr,
            _ => {
                return Err(Error::backend(format!(
                    "protocol violation: ReadData for op {xfer} carries {} bytes, {} were asked for",
                    payload.len(),
                    dst.extent.len()
                )));
            }
        };
        let mut dst = self.inbound.remove(&xfer).expect("checked above");
        self.inline_one_sided -= dst.inline;
        dst.answer_once();
        let stored = match dst.error {
            Some(e) => Err(e),
            // SAFETY: the destination was checked against its registration when the read was
            // posted, is not cut off, and the region is kept alive by `dst`.
            None => unsafe { mem.start_store(dst.region.first(), addr, payload) },
        };
        let len = payload.len() as u64;
        let finish = dst.on_done.transfer().map(|t| Action::Finish(t.clone(), Ok(len)));
        match stored {
            Ok(Started::Now(())) => out.extend(finish),
            Ok(Started::Later(copy)) => {
                out.push(Action::AfterCopy(AfterCopy { copy, then: finish.into_iter().collect(), read_answer: None }))
            }
            // A failed local copy fails this read only; the connection is fine.
            Err(e) => out.extend(dst.on_done.transfer().map(|t| Action::Finish(t.clone(), Err(e)))),
        }
        Ok(())
    }

    /// Applies one control message from the peer. An error is a protocol violation (or the peer
    /// closing): the connection must fail.
    pub fn handle(&mut self, msg: Control, mem: &impl Memory, out: &mut Vec<Action>) -> Result<()> {
        match msg {
            Control::SendAnnounce { xfer, len } => {
                self.announced(Announced { peer_op: xfer, len, body: Body::Announced })?;
                self.match_recvs(mem, out);
                Ok(())
            }
            Control::EagerSend { xfer, len } => self.eager_arrived(xfer, len, out),
            Control::IpcSend { xfer, len, region, addr, handle, alloc_base, alloc_len } => {
                let src = IpcSource { region, addr, handle, alloc_base, alloc_len };
                self.ipc_send_arrived(xfer, len, src)?;
                self.match_recvs(mem, out);
                Ok(())
            }
            Control::InlineSend { xfer, payload } => {
                let len = payload.len() as u64;
                self.admit_inline_send(len)?;
                self.announced_inline += len;
                self.announced(Announced { peer_op: xfer, len, body: Body::Inline(payload) })?;
                self.match_recvs(mem, out);
                Ok(())
            }
            Control::WriteRequest { xfer, region, token, addr, len } => {
                let authorized = mem.authorize(region, token, addr, len).map(Regions::One);
                self.receive_write(xfer, Extent::Contiguous { addr: addr as usize, len }, authorized, out)
            }
            Control::WriteVector { xfer, region, token, segs } => {
                let authorized = mem.authorize_segments(region, token, &segs).map(Regions::One);
                self.receive_write(xfer, local_segments(&segs), authorized, out)
            }
            Control::ReadVector { xfer, region, token, segs } => {
                match mem.authorize_segments(region, token, &segs) {
                    Err(e) => deny(xfer, e, out),
                    Ok(region) => {
                        self.serve(xfer, Source { extent: local_segments(&segs), region: region.into() }, out)?
                    }
                }
                Ok(())
            }
            Control::WriteRuns { xfer, runs, segs } => {
                let authorized = authorize_runs(mem, &runs, &segs);
                self.receive_write(xfer, run_segments(&runs, &segs), authorized, out)
            }
            Control::ReadRuns { xfer, runs, segs } => {
                match authorize_runs(mem, &runs, &segs) {
                    Err(e) => deny(xfer, e, out),
                    Ok(region) => self.serve(xfer, Source { extent: run_segments(&runs, &segs), region }, out)?,
                }
                Ok(())
            }
            Control::ReadRequest { xfer, region, token, addr, len } => {
                match mem.authorize(region, token, addr, len) {
                    Err(e) => deny(xfer, e, out),
                    Ok(region) => {
                        let extent = Extent::Contiguous { addr: addr as usize, len };
                        self.serve(xfer, Source { extent, region: region.into() }, out)?
                    }
                }
                Ok(())
            }
            Control::InlineWrite { xfer, region, token, addr, payload } => {
                self.inline_write(xfer, (region, token, addr), &payload, mem, out);
                Ok(())
            }
            Control::ReadSmall { xfer, region, token, addr, len } => {
                let authorized = mem.authorize(region, token, addr, len);
                // SAFETY: as above; `len` is at most MAX_INLINE_LEN (checked by the decoder).
                match authorized.and_then(|r| unsafe { mem.start_load(&r, addr as usize, len as usize) }) {
                    Err(e) => deny(xfer, e, out),
                    Ok(Started::Now(payload)) => out.push(Action::Send(Control::ReadData { xfer, payload })),
                    Ok(Started::Later(copy)) => {
                        out.push(Action::AfterCopy(AfterCopy { copy, then: Vec::new(), read_answer: Some(xfer) }))
                    }
                }
                Ok(())
            }
            Control::ReadData { xfer, payload } => self.read_data(xfer, &payload, mem, out),
            Control::Grant { xfer, flow } => {
                self.network_answered(xfer);
                let granted = self.awaiting_grant.remove(&xfer).ok_or_else(|| unknown_op("Grant", xfer))?;
                let Outbound { src, transfer, prompt, error, .. } = granted;
                let local = self.start_outbound(flow, src, 1, OnDone::Part(transfer), error, out);
                if let Some(f) = self.flows.get_mut(&local) {
                    f.uncuttable = !prompt;
                }
                self.awaiting_done.insert(xfer, local);
                Ok(())
            }
            Control::Deny { xfer, status, reason } => {
                let status =
                    UcclStatus::from_code(status).filter(|s| (*s as i32) < 0).unwrap_or(UcclStatus::ErrUnknown);
                let err = Error::new(status, format!("peer refused: {reason}"));
                self.network_answered(xfer);
                if let Some(refused) = self.awaiting_grant.remove(&xfer) {
                    refused.transfer.answered();
                    out.push(Action::Finish(refused.transfer, Err(err)));
                } else if let Some(op) = self.inline_ops.remove(&xfer) {
                    self.release_inline(&op);
                    op.transfer.answered();
                    out.push(Action::Finish(op.transfer, Err(err)));
                } else if let Some(mut read) = self.inbound.remove(&xfer) {
                    self.inline_one_sided -= read.inline;
                    read.answer_once();
                    if let Some(t) = read.on_done.transfer() {
                        out.push(Action::Finish(t.clone(), Err(err)));
                    }
                } else if let Some(flow) = self.awaiting_done.remove(&xfer) {
                    self.eager_answered(xfer);
                    // The peer cut the flow off (its region was deregistered): the chunks still
                    // run their course, then the part fails.
                    let running = self.flows.get_mut(&flow).ok_or_else(|| unknown_flow(flow))?;
                    running.error.get_or_insert(err);
                    if let Some(t) = running.on_done.transfer() {
                        t.answered();
                    }
                    self.chunk_finished(flow, mem, out)?;
                } else if self.reading.remove(&xfer) {
                    // The server cut our read off and holds its remaining chunks (they carry no
                    // data) until we have taken note, so the read cannot complete on them.
                    self.flows.get_mut(&xfer).ok_or_else(|| unknown_flow(xfer))?.error.get_or_insert(err);
                    out.push(Action::Send(Control::Resume { xfer }));
                } else if !self.with_same_host(out, |sh, net| sh.denied(xfer, err, net)) {
                    let Some(at) = self.ended_reads.iter().position(|&r| r == xfer) else {
                        return Err(unknown_op("Deny", xfer));
                    };
                    // A read of ours that ended on chunks the server's transport had taken before
                    // the cut (the server counts chunks sent after its channels do): its bytes left
                    // before the region went, and the server holds the flow's Resume owed.
                    self.ended_reads.remove(at);
                    out.push(Action::Send(Control::Resume { xfer }));
                }
                Ok(())
            }
            Control::Data { flow, len } => {
                self.network_answered(flow);
                let granted = self.inbound.get(&flow).ok_or_else(|| unknown_op("Data", flow))?.extent.len();
                if len != granted {
                    // Left in `inbound`, so failing the connection fails the part too.
                    return Err(Error::backend(format!(
                        "protocol violation: Data for flow {flow} carries {len} bytes, {granted} were granted"
                    )));
                }
                let mut read = self.inbound.remove(&flow).expect("checked above");
                // A peer answering a small read with Data instead of ReadData answered it too, and
                // still frees its share.
                read.answer_once();
                let Inbound { extent, region, on_done, inline, error, .. } = read;
                self.inline_one_sided -= inline;
                let seq = self.in_seq;
                self.in_seq += 1;
                if matches!(on_done, OnDone::Part(_)) {
                    self.reading.insert(flow);
                }
                let remaining = chunk_count(&extent, self.chunking);
                let region = if error.is_some() { None } else { Some(region) };
                let f = Flow::new(remaining, len, on_done, region, error);
                self.queue_flow(Direction::Recv, (flow, seq), extent, f, out);
                Ok(())
            }
            Control::Done { xfer, len } => {
                if let Some(op) = self.inline_ops.get(&xfer) {
                    if len != op.len {
                        // Left in `inline_ops`, so failing the connection fails the part too.
                        return Err(Error::backend(format!(
                            "protocol violation: Done for inline op {xfer} reports {len} bytes, expected {}",
                            op.len
                        )));
                    }
                    let op = self.inline_ops.remove(&xfer).expect("checked above");
                    self.release_inline(&op);
                    op.transfer.answered();
                    out.push(Action::Finish(op.transfer, Ok(len)));
                    return Ok(());
                }
                if self.same_host.may_answer_done(xfer)
                    && let Some(answered) = self.with_same_host(out, |sh, net| sh.done(xfer, len, net))
                {
                    return answered;
                }
                if let Some(answered) = self.ipc_send_done(xfer, len, out) {
                    return answered;
                }
                let flow = self.awaiting_done.remove(&xfer).ok_or_else(|| unknown_op("Done", xfer))?;
                self.eager_answered(xfer);
                let f = self.flows.get(&flow);
                let expected = f.map(|f| f.len);
                if expected != Some(len) {
                    return Err(Error::backend(format!(
                        "protocol violation: Done for op {xfer} reports {len} bytes, expected {expected:?}"
                    )));
                }
                if let Some(t) = f.and_then(|f| f.on_done.transfer()) {
                    t.answered();
                }
                self.chunk_finished(flow, mem, out)
            }
            Control::Resume { xfer } => {
                if self.resume_owed.remove(&xfer) {
                    return Ok(());
                }
                let flow = *self.serving.get(&xfer).ok_or_else(|| unknown_op("Resume", xfer))?;
                let f = self.flows.get_mut(&flow).ok_or_else(|| unknown_flow(flow))?;
                if !f.held {
                    return Err(Error::backend(format!(
                        "protocol violation: Resume for read {xfer}, which was not denied"
                    )));
                }
                f.held = false;
                out.push(Action::Release(flow));
                Ok(())
            }
            Control::Notify { name, msg } => {
                out.push(Action::Notify { name, msg });
                Ok(())
            }
            Control::Close => Err(Error::disconnected("the peer closed the connection")),
            msg @ (Control::ProcessHello { .. }
            | Control::ProcessAck { .. }
            | Control::DirectWrite { .. }
            | Control::DirectRead { .. }
            | Control::DirectGrant { .. }
            | Control::DirectDone { .. }) => self.same_host_message(msg, mem, out),
            Control::IpcRequest { .. }
            | Control::IpcGrant { .. }
            | Control::IpcRevoke { .. }
            | Control::IpcRevoked { .. } => {
                Err(Error::backend("internal: an IPC message reached the transfer state machine"))
            }
            Control::ParkChannels { .. }
            | Control::ChannelsParked { .. }
            | Control::WantChannels { .. }
            | Control::OpenChannels { .. } => {
                Err(Error::backend("internal: a channel lifetime message reached the transfer state machine"))
            }
        }
    }

    /// One send chunk of `flow` was handed to the transport (from the region, or from scratch
    /// after a cut).
    pub fn chunk_sent(&mut self, flow: u64) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.unsent = f.unsent.saturating_sub(1);
        }
    }

    /// One chunk of `flow` (or the peer's Done for it) finished.
    pub fn chunk_finished(&mut self, flow: u64, mem: &impl Memory, out: &mut Vec<Action>) -> Result<()> {
        let f = self.flows.get_mut(&flow).ok_or_else(|| unknown_flow(flow))?;
        f.remaining -= 1;
        if f.remaining == 0 {
            let f = self.flows.remove(&flow).expect("looked up above");
            self.refused_chunks -= f.refused;
            let outcome = f.error.clone().map_or(Ok(f.len), Err);
            let answer = |peer_op| match &f.error {
                None => Control::Done { xfer: peer_op, len: f.len },
                Some(e) => deny_msg(peer_op, e),
            };
            match f.on_done {
                OnDone::Part(t) => {
                    if self.reading.remove(&flow) {
                        if self.ended_reads.len() == ENDED_READS_KEPT {
                            self.ended_reads.pop_front();
                        }
                        self.ended_reads.push_back(flow);
                    }
                    out.push(Action::Finish(t, outcome));
                }
                OnDone::Served(peer_op) => {
                    self.serving.remove(&peer_op);
                    if f.held {
                        self.resume_owed.insert(peer_op);
                    }
                }
                OnDone::Ack(peer_op) => out.push(Action::Send(answer(peer_op))),
                OnDone::PartAndAck(ref t, peer_op) => {
                    out.push(Action::Finish(t.clone(), outcome));
                    out.push(Action::Send(answer(peer_op)));
                }
                OnDone::Landing => self.landed(flow, mem, out),
            }
        }
        Ok(())
    }

    /// Makes `err` the connection's failure and returns every pending part, which the caller
    /// fails once no transport can touch their memory any more. Empty when it had failed already.
    pub fn fail(&mut self, err: Error) -> Vec<Arc<Transfer>> {
        if self.failure.is_some() {
            return Vec::new();
        }
        self.failure = Some(err);
        let mut failed: Vec<Arc<Transfer>> = Vec::new();
        failed.extend(self.awaiting_grant.drain().map(|(_, o)| o.transfer));
        failed.extend(self.inline_ops.drain().map(|(_, op)| op.transfer));
        self.inline_send_backlog = 0;
        self.inline_one_sided = 0;
        self.refused_chunks = 0;
        failed.extend(self.inbound.drain().filter_map(|(_, i)| i.on_done.transfer().cloned()));
        // A cut receive failed when it was cut.
        failed.extend(self.posted_recvs.drain(..).filter(|r| r.cut.is_none()).map(|r| r.transfer));
        failed.extend(self.landing_recv.take().filter(|(_, r)| r.cut.is_none()).map(|(_, r)| r.transfer));
        failed.extend(self.flows.drain().filter_map(|(_, f)| f.on_done.transfer().cloned()));
        failed.extend(self.same_host.fail());
        failed.extend(self.fail_landings());
        self.awaiting_done.clear();
        self.serving.clear();
        self.reading.clear();
        self.ended_reads = VecDeque::new();
        self.announces.clear();
        self.announced_inline = 0;
        failed
    }

    /// Returns what an answered inline op held of its bound.
    fn release_inline(&mut self, op: &InlineOp) {
        match op.kind {
            InlineKind::Send => self.inline_send_backlog -= op.backlog,
            InlineKind::Write => self.inline_one_sided -= op.backlog,
        }
    }

    fn announced(&mut self, send: Announced) -> Result<()> {
        if self.announces.len() >= MAX_UNMATCHED_ANNOUNCES {
            return Err(Error::backend(format!(
                "peer announced more than {MAX_UNMATCHED_ANNOUNCES} sends without matching receives"
            )));
        }
        self.announces.push_back(send);
        Ok(())
    }

    /// Pairs posted receives with announced sends, oldest first. The parts finish first, then the
    /// answers go out together.
    fn match_recvs(&mut self, mem: &impl Memory, out: &mut Vec<Action>) {
        let mut answers = Vec::new();
        while !self.posted_recvs.is_empty() && !self.announces.is_empty() {
            let recv = self.posted_recvs.pop_front().expect("non-empty");
            let Announced { peer_op, len, body } = self.announces.pop_front().expect("non-empty");
            if let Body::Inline(_) = body {
                self.announced_inline -= len;
            }
            let fitted = fit(recv, len, out);
            let recv = match (body, fitted) {
                (Body::Landing(flow), fitted) => {
                    self.match_landing(flow, fitted, mem, &mut answers, out);
                    continue;
                }
                (_, Err(e)) => {
                    answers.push(deny_msg(peer_op, &e));
                    continue;
                }
                (Body::Inline(payload), Ok(recv)) => {
                    answers.extend(deliver_inline(recv, peer_op, &payload, mem, out));
                    continue;
                }
                (Body::Ipc(src), Ok(recv)) => {
                    out.push(Action::DeviceRecv(DeviceRecv::new(peer_op, len, src, recv)));
                    continue;
                }
                (Body::Announced, Ok(recv)) => recv,
            };
            answers.push(self.grant_recv(peer_op, len, recv));
        }
        out.extend(answers.into_iter().map(Action::Send));
    }

    /// Grants the peer's announced message `peer_op` of `len` bytes into `recv`, which `fit`
    /// admitted: it sends the chunks after the Grant this returns.
    fn grant_recv(&mut self, peer_op: u64, len: u64, recv: PostedRecv) -> Control {
        let flow = self.take_id();
        let (extent, region) = (Extent::Contiguous { addr: recv.addr, len }, recv.region);
        let on_done = OnDone::PartAndAck(recv.transfer, peer_op);
        self.inbound.insert(flow, Inbound::new(extent, region, on_done));
        Control::Grant { xfer: peer_op, flow }
    }

    /// Starts sending `src` as the peer's flow `peer_flow`: the chunks, then the Data marker; from
    /// scratch memory when the source was cut off (`error`). Returns the local flow id.
    fn start_outbound(
        &mut self,
        peer_flow: u64,
        src: Source,
        extra: usize,
        on_done: OnDone,
        error: Option<Error>,
        out: &mut Vec<Action>,
    ) -> u64 {
        let len = src.extent.len();
        let flow = self.start_sending(src, extra, on_done, error, out);
        out.push(Action::Send(Control::Data { flow: peer_flow, len }));
        flow
    }

    /// Records flow `flow` (the `seq`th in its direction) and queues its chunks over `extent`; they
    /// keep the flow's region alive.
    fn queue_flow(&mut self, dir: Direction, (flow, seq): (u64, u64), extent: Extent, f: Flow, out: &mut Vec<Action>) {
        let region = f.region.clone();
        self.flows.insert(flow, f);
        out.push(Action::Queue(FlowPlan { dir, flow, region, extent, seq }));
    }

    /// Numbers a flow of ours and queues its chunks: whatever starts it must reach the wire before
    /// the next flow is numbered. Returns the local flow id.
    fn start_sending(
        &mut self,
        src: Source,
        extra: usize,
        on_done: OnDone,
        error: Option<Error>,
        out: &mut Vec<Action>,
    ) -> u64 {
        let flow = self.take_id();
        let seq = self.out_seq;
        self.out_seq += 1;
        let Source { extent, region } = src;
        let (unsent, len) = (chunk_count(&extent, self.chunking), extent.len());
        let region = if error.is_some() { None } else { Some(region) };
        // Recorded before anything fallible: a failing connection must still find (and fail) the part.
        let remaining = unsent + extra;
        let f = Flow { unsent, ..Flow::new(remaining, len, on_done, region, error) };
        self.queue_flow(Direction::Send, (flow, seq), extent, f, out);
        flow
    }

    /// Starts our write `id` of `src`: its chunks go at once, and it ends with the peer's Done (or
    /// Deny), which counts as one more chunk.
    fn start_write(&mut self, id: u64, src: Source, transfer: &Arc<Transfer>, out: &mut Vec<Action>) {
        let flow = self.start_sending(src, 1, OnDone::Part(transfer.clone()), None, out);
        self.awaiting_done.insert(id, flow);
    }

    /// Receives the peer's write (or eager message) `xfer`, whose chunks are on their way: into
    /// `extent` when authorized, else into scratch memory, answered with a Deny once through. An
    /// error means the connection must fail (the peer's refused writes passed their bound).
    fn receive_write(
        &mut self,
        xfer: u64,
        extent: Extent,
        authorized: Result<Regions>,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        let (region, extent, error) = match authorized {
            Ok(region) => (Some(region), extent, None),
            Err(e) => {
                log::debug!(
                    "refusing the peer's write or message {xfer}, receiving it into scratch memory: {}",
                    e.message()
                );
                (None, scratch(&extent), Some(e))
            }
        };
        let chunks = chunk_count(&extent, self.chunking);
        let refused = if region.is_some() { 0 } else { chunks };
        if self.refused_chunks + refused > MAX_REFUSED_CHUNKS {
            return Err(Error::backend(format!(
                "protocol violation: the peer's refused writes would have more than {MAX_REFUSED_CHUNKS} chunks \
                 received into scratch memory at once"
            )));
        }
        self.refused_chunks += refused;
        let (flow, seq) = self.number_inbound();
        let f = Flow { refused, ..Flow::new(chunks, extent.len(), OnDone::Ack(xfer), region, error) };
        self.queue_flow(Direction::Recv, (flow, seq), extent, f, out);
        Ok(())
    }

    /// A flow id and the direction sequence number of the peer's next flow.
    fn number_inbound(&mut self) -> (u64, u64) {
        let seq = self.in_seq;
        self.in_seq += 1;
        (self.take_id(), seq)
    }

    /// Grants the peer's authorized direct write into `extent` as a network write
    /// (`same_host/state.rs`): the flow it will send as, after its Data marker.
    fn grant(&mut self, xfer: u64, extent: Extent, region: Arc<Region>, out: &mut Vec<Action>) {
        let flow = self.take_id();
        let on_done = OnDone::Ack(xfer);
        self.inbound.insert(flow, Inbound::new(extent, region, on_done));
        out.push(Action::Send(Control::Grant { xfer, flow }));
    }

    /// Serves the peer's authorized read `xfer` from `src`.
    fn serve(&mut self, xfer: u64, src: Source, out: &mut Vec<Action>) -> Result<()> {
        if self.serving.contains_key(&xfer) {
            return Err(Error::backend(format!(
                "protocol violation: a read request reuses op id {xfer} of a read still being served"
            )));
        }
        let flow = self.start_outbound(xfer, src, 0, OnDone::Served(xfer), None, out);
        self.serving.insert(xfer, flow);
        Ok(())
    }
}

/// Stores the peer's inline message `peer_op` into `recv`, which `fit` admitted, finishes the
/// receive and returns the answer for the peer; or, where the store is a device copy started,
/// leaves both to follow the copy and returns nothing.
fn deliver_inline(
    recv: PostedRecv,
    peer_op: u64,
    payload: &[u8],
    mem: &impl Memory,
    out: &mut Vec<Action>,
) -> Option<Control> {
    let len = payload.len() as u64;
    // SAFETY: the message fits the registration from `recv.addr` on (`fit`), and its region is
    // kept alive by `recv`.
    let stored = unsafe { mem.start_store(&recv.region, recv.addr, payload) };
    let (finish, answer) = match stored {
        Ok(Started::Now(())) => (Ok(len), Control::Done { xfer: peer_op, len }),
        Err(e) => {
            let answer = deny_msg(peer_op, &e);
            (Err(e), answer)
        }
        Ok(Started::Later(copy)) => {
            // The receive finishes and the peer hears of it once the bytes are in place.
            let then = vec![Action::Finish(recv.transfer, Ok(len)), Action::Send(Control::Done { xfer: peer_op, len })];
            out.push(Action::AfterCopy(AfterCopy { copy, then, read_answer: None }));
            return None;
        }
    };
    out.push(Action::Finish(recv.transfer, finish));
    Some(answer)
}

/// How a payload whose landing from the socket was cut off ends: its region was deregistered
/// (the fence closed the landing) while it arrived.
fn landing_cut() -> Error {
    Error::not_allowed("the memory region was deregistered during the transfer")
}

/// Whether `recv` may take the peer's message of `len` bytes: the receive back, or the error to
/// refuse the message with (the receive failed in `out`, unless a cut failed it already).
fn fit(recv: PostedRecv, len: u64, out: &mut Vec<Action>) -> Result<PostedRecv> {
    if let Some(e) = &recv.cut {
        return Err(e.clone());
    }
    if len > recv.max {
        let why = format!("a {len}-byte message does not fit the posted {}-byte receive", recv.max);
        out.push(Action::Finish(recv.transfer, Err(Error::new(UcclStatus::ErrMismatch, why.clone()))));
        return Err(Error::new(UcclStatus::ErrMismatch, why));
    }
    // A receive may be posted past its region's end; the message that arrives may not.
    let room = (recv.region.base + recv.region.len).saturating_sub(recv.addr) as u64;
    if len > room {
        let local = format!(
            "a {len}-byte message would land outside memory region {} [{:#x}, +{}): the receive at {:#x} was posted \
             for {} bytes, {room} of them registered",
            recv.region.id, recv.region.base, recv.region.len, recv.addr, recv.max
        );
        let remote = format!(
            "the {len}-byte message does not fit the receiver's registered memory ({room} bytes from where its \
             receive starts)"
        );
        out.push(Action::Finish(recv.transfer, Err(Error::not_allowed(local))));
        return Err(Error::not_allowed(remote));
    }
    Ok(recv)
}

/// A vector request's segments as this end's memory (authorized, so they are addresses here).
fn local_segments(segs: &[RemoteSeg]) -> Extent {
    Extent::scattered(segs.iter().map(|s| IoSeg { addr: s.addr as usize, len: s.len as usize }))
}

/// The segments of the peer's vector over several regions as our extent, cut into its runs.
fn run_segments(runs: &[VectorRun], segs: &[RemoteSeg]) -> Extent {
    let counts: Arc<[usize]> = runs.iter().map(|r| r.segs as usize).collect();
    Extent::scattered_runs(segs.iter().map(|s| IoSeg { addr: s.addr as usize, len: s.len as usize }), counts)
}

/// Every run of the peer's vector authorized against its own region (validation proved the runs
/// add up to the segments): the regions in run order, or the first refusal.
fn authorize_runs(mem: &impl Memory, runs: &[VectorRun], segs: &[RemoteSeg]) -> Result<Regions> {
    let mut at = 0;
    let mut regions = Vec::with_capacity(runs.len());
    for (i, run) in runs.iter().enumerate() {
        let end = at + run.segs as usize;
        let Some(run_segs) = segs.get(at..end) else {
            return Err(Error::invalid("the runs of a vector over several regions exceed its segments"));
        };
        regions
            .push(mem.authorize_segments(run.region, run.token, run_segs).map_err(|e| e.context(format!("run {i}")))?);
        at = end;
    }
    Ok(Regions::Runs(regions.into()))
}

/// The same lengths with no address in them: what a refused write is received as. The chunk plan
/// needs only the lengths, and the channels give each scratch chunk memory of its own.
fn scratch(extent: &Extent) -> Extent {
    match extent {
        Extent::Contiguous { len, .. } => Extent::Contiguous { addr: 0, len: *len },
        // The runs too: they cut the chunks.
        Extent::Scattered { segs, runs, .. } => match runs {
            Some(runs) => Extent::scattered_runs(segs.iter().map(|s| IoSeg { addr: 0, len: s.len }), runs.clone()),
            None => Extent::scattered(segs.iter().map(|s| IoSeg { addr: 0, len: s.len })),
        },
    }
}

fn deny(xfer: u64, e: Error, out: &mut Vec<Action>) {
    log::debug!("refusing the peer's op {xfer}: {}", e.message());
    out.push(Action::Send(deny_msg(xfer, &e)));
}

fn deny_msg(xfer: u64, e: &Error) -> Control {
    Control::Deny { xfer, status: e.status() as i32, reason: e.message().to_owned() }
}

/// Refuses a post whose local region was deregistered after the caller looked it up (and so,
/// possibly, after the deregistration cut this connection's flows off).
fn live<'a>(regions: impl IntoIterator<Item = &'a Arc<Region>>) -> Result<()> {
    match regions.into_iter().find(|r| r.is_removed()) {
        Some(r) => Err(Error::not_found(format!("memory region {} was deregistered", r.id))),
        None => Ok(()),
    }
}

fn unknown_flow(flow: u64) -> Error {
    Error::backend(format!("internal: chunk of unknown flow {flow}"))
}

fn unknown_op(what: &str, id: u64) -> Error {
    Error::backend(format!("protocol violation: {what} for unknown id {id}"))
}

#[cfg(test)]
mod tests;
