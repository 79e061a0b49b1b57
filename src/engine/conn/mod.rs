//! A connection: one control stream plus N channels around the per-connection state machine
//! (`state.rs`). The caller threads post (`api.rs`), the engine's control reactor or a caller
//! waiting for its reply (inline items, a write's Done) reads the control stream (`reader.rs`) and
//! feeds the peer's messages to the state, the engine's progress thread moves chunks; all meet under
//! the connection's lock, held only for non-blocking work. Each channel has a lock of its own, taken
//! after it: the progress thread posts and tests a channel's chunks holding only that one, while
//! other threads handle messages or post on another channel (what the state asks of a channel
//! being driven waits, in order, for its next drive). The state answers with actions, which this
//! module carries out: control messages to the writer, chunks to the channels, finished parts to
//! their transfers.

mod api;
mod copies;
mod flow_trace;
pub(super) mod landing;
pub(super) mod life;
mod memory;
mod pieces;
mod reader;
mod renew;
mod same_host_io;
mod state;
mod turn;
mod vector;

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::channel::{self, Channel};
use super::control_reactor::{ControlEndpoint, Next, Registration};
use super::control_rx::{ControlRx, Drained, Landing, LandingGate, RxBuffer};
use super::establish::Renewal;
use super::locality::{LocalLink, Locality};
use super::notify;
use super::plan::{self, Chunk, ChunkMem, Chunking, Cut};
use super::same_host;
pub use super::same_host::HostPath;
use super::same_host::device_copy::DevicePath;
use super::same_host::device_recv::{self, Received};
use super::same_host::host_worker::HostServed;
use super::same_host::ipc::IpcState;
use super::same_host::seam::SameHostIo;
use super::shared::{EngineCore, LiveConnection};
use super::stats::{ConnStats, LinkTotals, StatsCell, Way, link_totals};
use super::transfer::{Counted, Transfer};
use super::writer::ControlWriter;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, FifoItem, Frame, InlineInto, TokenBinding};
use crate::trace::{self, SeenBy as Seer};
use crate::transport::MemKind;
use copies::StartedCopies;
use flow_trace::{flow_msg, lent_msg, trace_heard};
use landing::LandingMemory;
use life::{ChannelLife, IdleTime};
use memory::EngineMemory;
pub(crate) use memory::Reach;
pub use pieces::{Piece, PieceRun};
use reader::Handled;
use state::{Action, ConnState, DeviceRecv, Direction, FlowPlan, IpcSource, Memory, Regions};

/// How long closing waits for queued control messages (the Close among them) to leave.
const LINGER_ON_CLOSE: Duration = Duration::from_secs(1);
/// How often a deregistration looks again at the requests it waits for: a chunk takes about this
/// long at 10 GB/s, and the progress thread completes them meanwhile.
const FENCE_POLL: Duration = Duration::from_micros(100);
/// The smallest inline payload read straight into its destination. A landing costs its reader a
/// turn of its own, which a copy fewer pays for from 128 KiB: on two CPUs 128-256 KiB writes took
/// 15-22 % less time (p50), while on 16 CPUs 64 KiB writes took 7 % more.
const LAND_FROM: usize = 128 << 10;

#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub gpu_index: i32,
    pub gpu_id: String,
    /// Whether the peer runs on this host (in this process), as the handshake proved it.
    pub locality: Locality,
    /// The transport carrying the channels: the engine's, or "socket" for a same-host peer of a
    /// net-plugin engine (a plugin cannot reach its own host).
    pub channels: &'static str,
}

/// One local buffer of a one-sided call and the remote capability it targets.
pub struct OneSided {
    pub mr: u64,
    pub addr: usize,
    pub len: usize,
    pub remote: FifoItem,
}

/// What the connection lock guards: the state machine, and what it asked of each channel while
/// another thread was driving it.
struct Inner {
    state: ConnState,
    /// Per channel, chunks queued, held or released while that channel was being driven without
    /// this lock (`Connection::progress`), in order: applied first by whoever next drives it
    /// holding this lock too.
    deferred: Vec<Vec<ChannelOp>>,
    /// Reused by each progress pass.
    finished_chunks: Vec<Chunk>,
    sent_chunks: Vec<u64>,
    /// The same-host GPU path: grants, asks, device copies in flight (`same_host/ipc.rs`).
    ipc: IpcState,
    /// A channel's comm declined a post with nothing in flight to wake us: counted as polled work,
    /// so the progress thread polls instead of parking until the post went through.
    retrying: bool,
    /// Some channel has chunks posted to the transport and not complete, at most
    /// `Config::progress_poll_bytes` of them: counted by the waker, so that the idle progress thread
    /// may poll for their completion (`UCCL_TCPX_PROGRESS_POLL_US`). A wake-up saved is worth a core
    /// only against a short transfer: on the 32-core host, polling through 16-64 MiB transfers made
    /// them 5-15 % slower (the thread took a core and the connection's lock from the ones moving the
    /// bytes), while 64 KiB-1 MiB round trips got 5-15 % shorter. A large transfer's tail still
    /// polls once its last chunks are all that is in flight.
    chunks_out: bool,
    /// Chunks were queued (or released) since the last pass over the channels.
    queued: bool,
    /// The channels' per-link counts when the connection failed and dropped them.
    final_links: Vec<LinkTotals>,
    /// The region an inline payload (the peer's write or message, the answer to our read) is being
    /// read straight into, and the gate that stops it (`ControlRx`): closed by a fence on that region
    /// and by a failure.
    inline_landing: Option<(u64, Arc<LandingGate>)>,
    /// The channels' lifetime (`life.rs`), and the listens made for the next ones until the
    /// peer's handles come.
    life: ChannelLife,
    idle_time: IdleTime,
    listens: Option<(u64, super::establish::Listens)>,
    /// Device copies of inline payloads started and what waits for each (`copies.rs`).
    copies: StartedCopies,
}

/// What the state asks of one channel, kept while another thread drives it.
enum ChannelOp {
    Queue(Direction, Chunk, Vec<Arc<super::region::Region>>),
    Hold(u64),
    Release(u64),
}

impl ChannelOp {
    fn apply(self, ch: &mut Channel) -> Result<()> {
        match self {
            ChannelOp::Queue(dir, chunk, regions) => queue_chunk(ch, dir, chunk, &regions)?,
            ChannelOp::Hold(flow) => ch.hold(flow),
            ChannelOp::Release(flow) => ch.release(flow),
        }
        Ok(())
    }
}

/// Queues `chunk` on `ch` in direction `dir`, registering its regions there first.
fn queue_chunk(ch: &mut Channel, dir: Direction, chunk: Chunk, regions: &[Arc<super::region::Region>]) -> Result<()> {
    match dir {
        Direction::Send => ch.queue_send(chunk, regions),
        Direction::Recv => ch.queue_recv(chunk, regions),
    }
}

/// One channel's place: `None` once the connection failed and dropped it.
type Slot = Mutex<Option<Channel>>;

/// What drives of the channels found, for the pass to settle under the connection's lock.
#[derive(Default)]
struct Driven {
    /// Some channel was not driven (being driven elsewhere): the flags below say nothing of it.
    partial: bool,
    moved: bool,
    error: Option<Error>,
    retry: bool,
    /// Some chunk is posted and not complete, and how many bytes of them.
    posted: bool,
    posted_bytes: usize,
    sends_left: bool,
}

impl Driven {
    /// Posts, tests and finishes chunks on `ch`, which gets sends until `send_bytes` of them went
    /// (`Channel::drive_limited`).
    fn drive(&mut self, ch: &mut Channel, sent: &mut Vec<u64>, finished: &mut Vec<Chunk>, send_bytes: usize) {
        if self.error.is_some() {
            return;
        }
        match ch.drive_limited(sent, finished, send_bytes) {
            Ok(m) => self.moved |= m,
            Err(e) => self.error = Some(e),
        }
        self.retry |= ch.needs_retry();
        self.posted |= ch.has_posted();
        self.posted_bytes += ch.posted_bytes();
        self.sends_left |= send_bytes != usize::MAX && ch.sends_waiting();
    }
}

/// The smallest inline payload a pipelined poster or reader hands to the control reactor instead
/// of writing it itself (`Connection::send_pipelined`). 64 KiB GPU writes at 4 in flight (2 x
/// H100): 1.71-1.84 GB/s -> 2.31-2.46 with the write handed over from 4 KiB or 32 KiB on; 4 KiB
/// writes 0.18-0.23 -> 0.29-0.33 from 4 KiB on, unchanged from 32 KiB on.
const HAND_OVER_MIN: usize = 4 << 10;

/// How long a reader handles the peer's messages under the connection's lock before it sends what
/// they answered and lets a thread waiting for the lock in (`Connection::let_others_in`): short
/// against a large request's check and plan (about 150 us), long against a small one's, so that
/// small messages still go out in few writes.
const HANDLE_SLICE: Duration = Duration::from_micros(50);

/// Control messages of actions carried out and not sent yet, and whether (and how many bytes)
/// those actions queued chunks (`Connection::apply_held`).
#[derive(Default)]
struct Held {
    msgs: Vec<Control>,
    queued: bool,
    queued_bytes: u64,
    /// The control reader comes back at once (`reader::serve_readable`): the device copies
    /// started for inline payloads run on meanwhile instead of being waited for.
    leave_copies: bool,
}

impl Held {
    /// Sends the held messages now unless the chunks queued are few enough to go first
    /// (`Config::early_chunk_bytes`). Below the bound the bytes leave first and the message's write
    /// (and the peer's reading it) overlaps them: on the 32-core host 256 KiB round trips got 10-15 %
    /// shorter. Above, the message goes first: the peer posts its receives only once it read it,
    /// and the kicks of a large post's sockets held it back by tens of microseconds (16 MiB
    /// transfers 8-15 % slower).
    fn send_unless_chunks_first(&mut self, conn: &Connection) -> Result<()> {
        if self.queued_bytes <= conn.core.config.early_chunk_bytes as u64 || self.msgs.is_empty() {
            return Ok(());
        }
        conn.send_all(&std::mem::take(&mut self.msgs))
    }
}

pub struct Connection {
    pub id: u64,
    pub peer: PeerInfo,
    core: Arc<EngineCore>,
    writer: ControlWriter,
    rx: ControlRx,
    /// The control stream: the one descriptor of the connection's control path.
    control: Arc<TcpStream>,
    /// The connection's place on the engine's control reactor, which reads the stream and writes
    /// what callers leave.
    reactor: Arc<Registration>,
    /// The channels, each under a lock of its own, taken after the connection's and never the
    /// other way: the progress thread drives them holding only theirs, one at a time, so that the
    /// peer's messages are handled and a caller or the control thread posts on another channel
    /// meanwhile (a chunk of 4,096 blocks of 512 B took about 80 us to post on an H200 host).
    /// Declared before `inner`, so that they stop writing into the eager landing memory before it
    /// goes.
    channels: Box<[Slot]>,
    inner: Mutex<Inner>,
    closed: AtomicBool,
    /// `Inner::copies` holds copies: a reader finding the stream empty waits for them.
    copying: AtomicBool,
    listener_started: AtomicBool,
    /// How an in-process peer's connection is found (see `engine::same_host`).
    link: LocalLink,
    /// On an authenticated connection, region tokens travel bound to it (see `proto::auth`).
    binding: Option<TokenBinding>,
    /// What its channels can move (`memory::Reach`).
    reach: Reach,
    /// Which end of which connection its trace events name.
    trace: trace::ConnTag,
    /// The same-host paths' host worker and what they keep outside the lock.
    same_host: SameHostIo,
    /// What the caller's transfers on this connection moved and how they ended.
    stats: Arc<StatsCell>,
    /// What new channels are made with, after idle ones closed (`renew.rs`).
    renewal: Renewal,
    /// This connection, for the setup of its new channels to come back to.
    me: Weak<dyn super::setup_thread::SetupOwner>,
    #[cfg(test)]
    hooks: TestHooks,
}

/// Where tests hold a connection's threads, and what they count of them.
#[cfg(test)]
#[derive(Default)]
struct TestHooks {
    gate: DriveGate,
    /// Readers' hand-overs of the lock between messages (`let_others_in`).
    lets_in: std::sync::atomic::AtomicU64,
    /// A reader hands the lock over before every message but the first of a read.
    slice_zero: AtomicBool,
    /// Reads whose chunks the reader left to the progress thread (`reader_pass`).
    left_to_progress: std::sync::atomic::AtomicU64,
    /// The progress thread drives the channels with the connection's lock let go: what it took
    /// of the connection's marks is in its hands (`sends_stranded`). Changed under that lock.
    driving: AtomicBool,
}

/// Where the progress thread's drive of channel 0 stops while a test keeps it closed: that
/// channel's lock held, the connection's let go.
#[cfg(test)]
#[derive(Default)]
pub(super) struct DriveGate {
    /// Closed, and reached by the drive.
    state: Mutex<(bool, bool)>,
    changed: parking_lot::Condvar,
}

#[cfg(test)]
impl DriveGate {
    pub(super) fn close(&self) {
        *self.state.lock() = (true, false);
    }

    pub(super) fn open(&self) {
        self.state.lock().0 = false;
        self.changed.notify_all();
    }

    /// Whether a drive waits at the gate now.
    pub(super) fn reached(&self) -> bool {
        self.state.lock().1
    }

    fn pass(&self) {
        let mut state = self.state.lock();
        state.1 |= state.0;
        while state.0 {
            self.changed.wait(&mut state);
        }
    }
}

impl Connection {
    /// This connection's lock and its in-process peer's, taken in one order by both ends (the
    /// connector's first), so two engines copying toward each other at once cannot deadlock.
    fn lock_with_peer<'a>(&'a self, peer: &'a Connection) -> (MutexGuard<'a, Inner>, MutexGuard<'a, Inner>) {
        if self.link.connector {
            let ours = self.inner.lock();
            (ours, peer.inner.lock())
        } else {
            let theirs = peer.inner.lock();
            (self.inner.lock(), theirs)
        }
    }

    /// `reach`: what the channels can move.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        core: Arc<EngineCore>,
        control: TcpStream,
        peer: PeerInfo,
        channels: Vec<Channel>,
        chunking: Chunking,
        link: LocalLink,
        binding: Option<TokenBinding>,
        reach: Reach,
        renewal: Renewal,
    ) -> Result<Arc<Connection>> {
        let io = |e| Error::io("control stream", e);
        control.set_read_timeout(None).map_err(io)?;
        control.set_write_timeout(None).map_err(io)?;
        let control = Arc::new(control);
        let reactor = core.control.attach(control.as_raw_fd())?;
        let writer = ControlWriter::new(control.clone(), reactor.clone());
        let rx = ControlRx::new(control.clone(), reactor.clone(), core.config.control_spin)?;
        let tag = trace::ConnTag { conn: link.nonce, side: u64::from(link.connector) };
        let ipc = IpcState::new(trace::on(trace::DEVICE).then_some(tag));
        // A peer on this host may take the same-host GPU path: a copy queue is readied now rather
        // than at the first transfer (a stream, an event and the stream's first operation), and
        // left among the process's idle ones for it.
        if super::path::same_host_gpu(link.locality, core.config.local_peers)
            && let Some(gpu) = core.gpu.get()
            && let Err(e) = IpcState::ready_queue(gpu)
        {
            log::debug!("no copy queue for GPU {} yet ({e}): made at the first same-host transfer", gpu.ordinal());
        }
        let device_batches = ipc.in_flight();
        let mut state = ConnState::new(chunking, Instant::now());
        state.set_inline_max(super::path::inline_max(&core.config, link.locality));
        // Eager messages land in host memory, which a transport may not move (TCPXO without a GPU).
        if chunking.cut == Cut::Spanning && reach.host {
            let core = core.clone();
            state.send_eagerly_with(Box::new(move || LandingMemory::new(&core.regions, core.gpu.get())));
        }
        let on_host = link.locality == Locality::SameHost;
        if link.locality.is_local() {
            state.accept_ipc_sends();
        }
        if on_host {
            state.same_host_mut().set_same_host(core.config.host_copy_network_band, core.config.host_copy_huge_pages);
            if core.config.host_copy_collapse {
                state.same_host_mut().set_collapse_sources();
            }
        }
        if trace::on(trace::HOST) {
            state.same_host_mut().set_timed_copies();
        }
        let conn = Arc::new_cyclic(|weak| Connection {
            id: core.next_conn_id(),
            peer,
            core,
            writer,
            rx,
            control,
            reactor,
            inner: Mutex::new(Inner {
                state,
                deferred: channels.iter().map(|_| Vec::new()).collect(),
                finished_chunks: Vec::new(),
                sent_chunks: Vec::new(),
                ipc,
                retrying: false,
                chunks_out: false,
                queued: false,
                final_links: Vec::new(),
                inline_landing: None,
                life: ChannelLife::new(link.connector),
                idle_time: IdleTime::new(renewal.idle_close),
                listens: None,
                copies: StartedCopies::default(),
            }),
            channels: channels.into_iter().map(|ch| Mutex::new(Some(ch))).collect(),
            closed: AtomicBool::new(false),
            copying: AtomicBool::new(false),
            listener_started: AtomicBool::new(false),
            link,
            binding,
            reach,
            trace: tag,
            same_host: SameHostIo::new(weak.clone() as Weak<dyn HostServed>, device_batches),
            stats: Arc::default(),
            renewal,
            me: weak.clone() as Weak<dyn super::setup_thread::SetupOwner>,
            #[cfg(test)]
            hooks: TestHooks::default(),
        });
        // Known to the engine before it reads a byte: a deregistration must reach every connection
        // that could authorize a request for the region.
        let live: Weak<Connection> = Arc::downgrade(&conn);
        conn.core.adopt(live)?;
        same_host::register_connection(&link, &conn);
        // From here on the reactor reads the stream.
        conn.reactor.start(Arc::downgrade(&conn) as Weak<dyn ControlEndpoint>)?;
        if on_host {
            // The peer checks that this process holds the other end of the control connection
            // (`same_host::prove`) before it copies anything out of our memory.
            let fd = u32::try_from(conn.control.as_raw_fd()).map_err(|_| Error::internal("negative descriptor"))?;
            conn.writer.send(&Control::ProcessHello { pid: std::process::id(), fd })?;
        }
        Ok(conn)
    }

    /// The data channels both ends agreed on in the handshake (the smaller of their offers).
    pub fn num_channels(&self) -> usize {
        self.inner.lock().state.chunking().channels
    }

    /// How far the same-host host-memory path got on this connection.
    pub fn host_path(&self) -> HostPath {
        self.inner.lock().state.same_host().host_path()
    }

    fn memory(&self) -> EngineMemory<'_> {
        EngineMemory::new(&self.core, self.binding.as_ref(), self.reach)
    }

    /// Whether this connection's channels can move `region` (see `reach`).
    fn channels_take(&self, region: &super::region::Region) -> Result<()> {
        memory::channels_take(self.reach, region)
    }

    /// What stands for a region's token in this connection's requests.
    fn wire_token(&self, region: u64, token: u64) -> u64 {
        match &self.binding {
            Some(b) => b.bind(region, token),
            None => token,
        }
    }

    /// Handles every whole message in `buf` after a read that `drained` describes (at most a
    /// buffer's worth: whoever reads comes back for more, so that a busy stream keeps neither a
    /// waiting caller past its own reply nor a reactor thread from its other connections).
    fn handle_read(&self, buf: &mut RxBuffer, drained: Drained, leave_copies: bool) -> Handled {
        let arrived = if trace::on(trace::FLOW) { trace::clock_ns() } else { 0 };
        let mut inner = self.inner.lock();
        if inner.state.failure().is_some() {
            // The channels are gone; nothing the peer says can be acted on any more.
            return Handled::Failed;
        }
        let mut handled = Ok(());
        let mut held = Held::default();
        if buf.landing() {
            inner.state.heard(Instant::now());
        }
        if let Some((landing, whole)) = buf.landed() {
            // Its write or read is done, or failed if its region was deregistered meanwhile.
            inner.inline_landing = None;
            let (xfer, len) = (landing.xfer, landing.payload_len() as u64);
            let mut out = Vec::new();
            let ended = match landing.into {
                InlineInto::Write { .. } => {
                    inner.state.inline_landed(xfer, len, whole, &mut out);
                    Ok(())
                }
                InlineInto::ReadAnswer => inner.state.read_answer_landed(xfer, len, whole, &mut out),
                InlineInto::Send => inner.state.inline_send_landed(xfer, len, whole, &mut out),
            };
            handled = ended.and_then(|()| self.apply_held(&mut inner, out, &mut held));
        }
        let mut slice = Instant::now();
        while handled.is_ok() {
            let frame = match buf.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    handled = Err(e);
                    break;
                }
            };
            if slice.elapsed() >= self.handle_slice() {
                handled = self.let_others_in(&mut inner, std::mem::take(&mut held));
                if handled.is_err() {
                    break;
                }
                if inner.state.failure().is_some() {
                    return Handled::Failed;
                }
                slice = Instant::now();
            }
            match frame {
                Frame::Whole(msg) => {
                    inner.state.heard(Instant::now());
                    handled = self.handle(&mut inner, msg, &mut held, arrived);
                }
                lent => {
                    // An inline write or send, or a small read's answer: stored from the buffer.
                    // None concerns the same-host GPU path.
                    inner.state.heard(Instant::now());
                    if let Some((id, kind)) = trace::on(trace::FLOW).then(|| lent_msg(&lent)).flatten() {
                        let (conn, side) = (self.trace.conn, self.trace.side);
                        trace::event!(FlowMsgIn { conn, side, id, kind: kind as u64, arrived });
                    }
                    let mut out = Vec::new();
                    let stored = inner.state.handle_frame(lent, &self.memory(), &mut out);
                    handled = stored.and(self.apply_held(&mut inner, out, &mut held));
                }
            }
        }
        if handled.is_ok() && !buf.landing() {
            handled = self.start_landing(&mut inner, buf);
        }
        if handled.is_ok() {
            handled = self.end_stretch(&mut inner, held, leave_copies, false);
        }
        let outcome = match (handled, drained) {
            (Err(e), _) | (Ok(()), Drained::Closed(e)) => e,
            (Ok(()), Drained::Empty | Drained::Open | Drained::More) => {
                return if self.chunks_posted() { Handled::ChunksOut } else { Handled::Settled };
            }
        };
        if !self.is_closed() {
            self.fail(&mut inner, outcome);
        }
        Handled::Failed
    }

    /// Ends a stretch of messages a reader handled under the lock: what they answered sent, what
    /// they queued posted by the reader or left to the progress thread (`reader_pass`; always
    /// left while the reader holds the next message, `in_hand`). `leave_copies`: the reader comes
    /// back at once, so copies started for inline payloads run on meanwhile.
    fn end_stretch(&self, inner: &mut Inner, mut held: Held, leave_copies: bool, in_hand: bool) -> Result<()> {
        // A short read's bytes leave before the Data message that announces them.
        held.send_unless_chunks_first(self)?;
        if !in_hand {
            self.reader_pass(inner, held.queued_bytes);
        }
        held.leave_copies = leave_copies;
        self.release(inner, held)
    }

    /// Ends the stretch of [`handle_read`](Self::handle_read) so far (`end_stretch`) and hands the
    /// connection's lock to a thread waiting for it, if any, before the next message. A peer's
    /// request of 7,815 blocks of 512 B took about 150 us to check and plan; a read of six of them
    /// held the lock for a millisecond, in which the progress thread saw no finished copy and
    /// posted no chunk.
    fn let_others_in(&self, inner: &mut MutexGuard<'_, Inner>, held: Held) -> Result<()> {
        self.end_stretch(inner, held, true, true)?;
        #[cfg(test)]
        self.hooks.lets_in.fetch_add(1, Ordering::Relaxed);
        MutexGuard::bump(inner);
        Ok(())
    }

    /// A reader's pass over the chunks the messages it handled queued (`queued` bytes of them;
    /// `pass_if_queued`), unless they are more than a chunk and more of the peer's messages wait
    /// in the stream: the progress thread, woken by `release`, then posts them while the reader
    /// goes on. A request of 7,815 blocks of 512 B is two chunks, each 70-120 us to post on an H200
    /// host; read, checked, planned and posted by the reader, the requests of a read of 100,032
    /// blocks came one every 300 us. Otherwise the reader posts as before: a transfer's chunks
    /// leave without the progress thread's wake-up (a notification behind each request must not
    /// make every transfer wait for one), and its posts run beside the progress thread's.
    fn reader_pass(&self, inner: &mut Inner, queued: u64) {
        if queued > inner.state.chunking().size as u64 && self.rx.bytes_waiting() {
            #[cfg(test)]
            self.hooks.left_to_progress.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pass_if_queued(inner);
    }

    /// How long a reader handles messages under the connection's lock before it lets others in.
    fn handle_slice(&self) -> Duration {
        #[cfg(test)]
        if self.hooks.slice_zero.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        HANDLE_SLICE
    }

    /// Reads the rest of the inline payload whose head `buf` holds straight into its destination,
    /// when that is host memory: an inline write's range the peer may write (authorized now as the
    /// whole frame would be), where our small read asked its answer to go, or the receive an
    /// inline message matches. Anything else waits for the whole frame and is handled as ever, a
    /// refusal included.
    fn start_landing(&self, inner: &mut Inner, buf: &mut RxBuffer) -> Result<()> {
        let Some((head, have)) = buf.partial_inline()? else { return Ok(()) };
        if head.len < LAND_FROM {
            return Ok(());
        }
        let dest = match head.into {
            InlineInto::Write { region, token, addr } => {
                match self.memory().authorize(region, token, addr, head.len as u64) {
                    Ok(r) if r.kind == MemKind::Host => Some((addr as usize, r.id)),
                    _ => None,
                }
            }
            InlineInto::ReadAnswer => inner.state.read_answer_destination(head.xfer, head.len as u64),
            InlineInto::Send => inner.state.inline_send_destination(head.xfer, head.len as u64)?,
        };
        let Some((addr, region)) = dest else { return Ok(()) };
        let already = have.len();
        // SAFETY: the whole payload's range lies in a live region: authorized for the peer's
        // write, checked against its registration when our read was posted and not cut since, or
        // the receive's room in its region; `have` is at most the payload.
        unsafe { std::ptr::copy_nonoverlapping(have.as_ptr(), addr as *mut u8, already) };
        let gate = Arc::new(LandingGate::default());
        // SAFETY: as above; a deregistration of the region fences this connection, which closes
        // the gate before it returns, and so does a failure.
        let landing = unsafe { Landing::new(&head, addr, already, gate.clone()) };
        buf.start_landing(landing);
        inner.inline_landing = Some((region, gate));
        Ok(())
    }

    /// Feeds one message of the peer to the same-host GPU path or the state machine, and carries
    /// out the latter's answer.
    /// Every answer, the IPC path's too, stays in `held`, in the order of what it answers.
    /// `arrived`: when the read that brought it returned (for the flow trace).
    fn handle(&self, inner: &mut Inner, msg: Control, held: &mut Held, arrived: u64) -> Result<()> {
        let msg = match msg {
            msg @ (Control::ParkChannels { .. }
            | Control::ChannelsParked { .. }
            | Control::WantChannels { .. }
            | Control::OpenChannels { .. }) => return self.handle_life(inner, msg, held),
            msg => msg,
        };
        let Some(msg) = self.handle_ipc(&mut inner.ipc, msg, &mut held.msgs)? else { return Ok(()) };
        let seen = if trace::on(trace::FLOW) { flow_msg(&msg) } else { None };
        if let Some((id, kind)) = seen {
            trace::event!(FlowMsgIn { conn: self.trace.conn, side: self.trace.side, id, kind: kind as u64, arrived });
        }
        let mut out = Vec::new();
        let handled = inner.state.handle(msg, &self.memory(), &mut out);
        if let Some((id, kind)) = seen {
            trace_heard(self.trace, id, kind, &out, inner.state.chunking());
        }
        let applied = self.apply_held(inner, out, held);
        handled.and(applied)
    }

    /// Carries out the state machine's actions in order; the control messages leave together, in
    /// one write, once everything else was done.
    fn apply(&self, inner: &mut Inner, actions: impl IntoIterator<Item = Action>) -> Result<()> {
        let mut held = Held::default();
        let applied = self.apply_held(inner, actions, &mut held);
        applied.and_then(|()| self.release(inner, held))
    }

    /// Carries out the actions but the control messages, which it adds to `held` for [`release`]:
    /// a caller that is about to post chunks posts them first, so that the bytes do not wait for
    /// the write of the message that announces them (the peer keeps a piece that comes before its
    /// announcement until it posts the receive). Messages keep their order among themselves, and
    /// flows their queueing order, which is all the peer matches on. After a failure only the
    /// parts are still finished: they are no longer the state's, so failing the connection would
    /// not reach them.
    ///
    /// [`release`]: Self::release
    fn apply_held(&self, inner: &mut Inner, actions: impl IntoIterator<Item = Action>, held: &mut Held) -> Result<()> {
        let mut result = Ok(());
        for action in actions {
            match action {
                Action::Finish(t, outcome) => t.finish_part(outcome),
                // A matched receive is no longer the state's: failing the connection misses it.
                Action::DeviceRecv(recv) if result.is_err() => {
                    recv.transfer.finish_part(Err(result.clone().expect_err("checked")));
                }
                // Kept after a failure too: the failure waits for the copy and ends its parts.
                Action::AfterCopy(copy) => inner.copies.push(copy),
                _ if result.is_err() => {}
                Action::Send(msg) => held.msgs.push(msg),
                Action::Queue(plan) => {
                    trace::event!(FlowQueued { conn: self.trace.conn, side: self.trace.side, flow: plan.flow });
                    result = self.queue(inner, &plan);
                    inner.queued = true;
                    held.queued = true;
                    held.queued_bytes += plan.extent.len();
                }
                Action::Notify { name, msg } => notify::push(self.core.notify_key, &name, &msg),
                Action::Hold(flow) => {
                    result = (0..self.channels.len()).try_for_each(|k| self.channel_op(inner, k, ChannelOp::Hold(flow)))
                }
                Action::Release(flow) => {
                    result =
                        (0..self.channels.len()).try_for_each(|k| self.channel_op(inner, k, ChannelOp::Release(flow)));
                    inner.queued = true;
                    held.queued = true;
                }
                Action::HostWork { ours } => result = self.same_host.host.wake(ours),
                Action::Collapse(region) => region.collapse_into_huge_pages(),
                Action::GrantIpc(region) => inner.ipc.record_grant(region),
                Action::DeviceRecv(recv) => result = self.device_recv(inner, recv, held),
            }
        }
        result.and_then(|()| self.need_channels(inner, held))
    }

    /// Copies the peer's offered message into its matched receive over CUDA IPC
    /// (`same_host/device_recv.rs`), or grants it over the channels when no copy can be queued.
    fn device_recv(&self, inner: &mut Inner, recv: DeviceRecv, held: &mut Held) -> Result<()> {
        let IpcSource { region, addr, handle, alloc_base, alloc_len } = recv.src;
        let src = device_recv::Source { region, addr, handle, alloc_base, alloc_len };
        let offered = device_recv::Offered {
            peer_op: recv.peer_op,
            len: recv.len,
            addr: recv.addr,
            region: &recv.region,
            transfer: &recv.transfer,
            src,
        };
        let received = match self.link.locality {
            // Within the process the range is checked against the sender's live registration,
            // counted for the copy at once, as its deregistration waits for.
            Locality::SameProcess => match same_host::peer_connection::<Connection>(&self.link) {
                None => Received::Declined,
                Some(peer) => match peer.core.regions.local_counted(region, addr as usize, recv.len as usize) {
                    Ok(source) => device_recv::receive_in_process(&mut inner.ipc, offered, source, &self.core),
                    Err(e) => Received::Failed(e),
                },
            },
            _ => device_recv::receive(&mut inner.ipc, &self.core, offered),
        };
        match received {
            Received::Issued => Ok(()),
            Received::Declined => {
                let mut out = Vec::new();
                inner.state.recv_by_network(recv, &mut out);
                self.apply_held(inner, out, held)
            }
            Received::Failed(e) => {
                held.msgs.push(Control::Deny {
                    xfer: recv.peer_op,
                    status: e.status() as i32,
                    reason: e.message().to_owned(),
                });
                recv.transfer.finish_part(Err(e));
                Ok(())
            }
        }
    }

    /// Sends what [`apply_held`](Self::apply_held) held back and wakes the progress thread for the
    /// chunks it queued, or that a pass left queued (`pass_if_queued`).
    fn release(&self, inner: &mut Inner, mut held: Held) -> Result<()> {
        self.settle_copies(inner, &mut held)?;
        // A reader with more to read leaves a large answer (a small read's data) for the
        // reactor's write turn and reads on first.
        let sent = self.send_pipelined(&held.msgs, held.leave_copies);
        if held.queued || inner.queued {
            self.core.waker.wake();
        } else if self.core.waker.parked_untimed() && self.owes_us(&inner.state) {
            // Every change of the state is carried out here, so this is where a wait on the peer
            // starts that a progress thread parked without a timer must watch. Only then: waking it
            // for every message would cost each small round trip a thread wake-up and its spins.
            self.core.waker.activity();
        }
        sent
    }

    /// Carries out what follows the device copies started for inline payloads that are done, in
    /// order; waits for all of them unless the reader comes back at once (`leave_copies`), so
    /// that a copy is never left without a reader about to look at it.
    fn settle_copies(&self, inner: &mut Inner, held: &mut Held) -> Result<()> {
        if inner.copies.is_empty() {
            return Ok(());
        }
        let out = inner.copies.settle(!held.leave_copies)?;
        self.apply_held(inner, out, held)?;
        self.copying.store(!inner.copies.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Hands `msgs` to the control stream's writer (marking them for the flow trace).
    fn send_all(&self, msgs: &[Control]) -> Result<()> {
        self.traced_send(msgs, self.writer.send_all(msgs))
    }

    /// `send_all`, unless the caller has more to do at once (`pipelined`: a poster behind
    /// unanswered inline transfers, a reader with more to read): then a large inline payload goes
    /// to the control reactor's write turn whatever the queue holds, so that the socket write
    /// overlaps that work rather than add to it. Alone, the caller writes it itself, which saves
    /// the reactor's wake-up.
    fn send_pipelined(&self, msgs: &[Control], pipelined: bool) -> Result<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        if pipelined && msgs.iter().any(|m| m.inline_payload().len() >= HAND_OVER_MIN) {
            self.traced_send(msgs, self.writer.hand_over(msgs))
        } else {
            self.send_all(msgs)
        }
    }

    fn traced_send(&self, msgs: &[Control], sent: Result<()>) -> Result<()> {
        if trace::on(trace::FLOW) {
            for (id, kind) in msgs.iter().filter_map(flow_msg) {
                trace::event!(FlowMsgOut { conn: self.trace.conn, side: self.trace.side, id, kind: kind as u64 });
            }
        }
        sent
    }

    /// Whether the peer's engine owes this connection something, so that the stall timeout must be
    /// watched (asked by the progress thread before it parks).
    pub(super) fn waits_on_peer(&self) -> bool {
        self.owes_us(&self.inner.lock().state)
    }

    fn owes_us(&self, state: &ConnState) -> bool {
        state.failure().is_none() && state.waits_on_peer()
    }

    /// Cuts the deregistered `region` off this connection, returning once no transport request uses
    /// it: queued chunks are redirected to scratch memory at once, and requests already posted are
    /// waited for until `deadline`, after which the connection fails (dropping the channels joins
    /// their I/O, so nothing touches the region afterwards either). The region must already be out
    /// of the table, so that nothing on this connection can start using it after this took the lock.
    pub(super) fn fence(&self, region: u64, deadline: Instant) {
        {
            let mut guard = self.inner.lock();
            let inner = &mut *guard;
            if let Some((_, gate)) = inner.inline_landing.as_ref().filter(|(r, _)| *r == region) {
                gate.close();
            }
            if inner.state.failure().is_some() {
                return;
            }
            let err = Error::not_allowed(format!("memory region {region} was deregistered during the transfer"));
            let mut out = Vec::new();
            let cut = inner.state.cut(region, &err, &mut out);
            // A peer process granted the region maps it: it must stop and say so.
            if inner.ipc.start_revoke(region) {
                out.push(Action::Send(Control::IpcRevoke { region }));
            }
            // Chunks queued before the cut are redirected, deferred ones too.
            let redirected = (0..self.channels.len()).try_for_each(|k| {
                self.channel_now(inner, k).map(|mut slot| {
                    if let Some(ch) = slot.as_mut() {
                        ch.redirect(region);
                    }
                    // What waits for channels that are not open.
                    redirect_deferred(&mut inner.deferred[k], region);
                })
            });
            if let Err(e) = cut.and(redirected).and_then(|()| self.apply(inner, out)) {
                self.fail(inner, e);
                return;
            }
        }
        self.core.waker.wake();
        // A same-host copy into the region ends within one piece, and none starts after this (a
        // push out of it is the region's own count, waited for by the engine).
        self.same_host.host.wait_clear(region);
        loop {
            {
                let mut inner = self.inner.lock();
                let busy = self.channels.iter().any(|slot| slot.lock().as_ref().is_some_and(|c| c.posted_on(region)))
                    || inner.ipc.revoke_pending(region);
                if inner.state.failure().is_some() || !busy {
                    return;
                }
                if Instant::now() >= deadline {
                    let why = format!(
                        "memory region {region} was deregistered while the transport still held requests on it, or \
                         a peer process still had it mapped, after UCCL_TCPX_FENCE_TIMEOUT_MS ({} ms); the \
                         connection fails so that no request of it can touch the region",
                        self.core.config.fence_timeout.as_millis()
                    );
                    self.fail(&mut inner, Error::not_allowed(why));
                    return;
                }
            }
            std::thread::sleep(FENCE_POLL);
        }
    }

    /// Tells the peer, stops all I/O on the caller's memory and fails what is still pending.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            // Answers held back for a pass (`apply_held`) are written under the connection lock:
            // taking it first puts the Close behind them, so a part the user saw finish is not
            // reported cancelled to the peer.
            let _inner = self.inner.lock();
            let _ = self.writer.send(&Control::Close);
        }
        self.writer.finish(LINGER_ON_CLOSE);
        let _ = self.control.shutdown(Shutdown::Both);
        {
            let mut inner = self.inner.lock();
            self.fail(&mut inner, Error::new(UcclStatus::ErrCanceled, "the connection was closed locally"));
        }
        self.reactor.detach();
        self.same_host.host.join();
        self.same_host.host.release_peer();
        log::info!("connection {} to {} closed: {}", self.id, self.peer.addr, self.stats());
    }

    /// A reading of the connection's counters.
    pub fn stats(&self) -> ConnStats {
        let (landed, (idle_closes, reopens)) = {
            let inner = self.inner.lock();
            (inner.state.eager_landed(), inner.life.counts())
        };
        ConnStats { landed, idle_closes, reopens, ..self.stats.snapshot() }
    }

    /// What the channels' data sockets carried, by link (none where the transport keeps no such
    /// counts, as a net plugin).
    pub fn link_stats(&self) -> Vec<LinkTotals> {
        let inner = self.inner.lock();
        if inner.state.failure().is_some() {
            return inner.final_links.clone();
        }
        self.links()
    }

    /// The channels' per-link counts, each channel's taken under its lock.
    fn links(&self) -> Vec<LinkTotals> {
        let (sent, received): (Vec<_>, Vec<_>) =
            self.channels.iter().filter_map(|slot| slot.lock().as_ref().map(Channel::link_stats)).unzip();
        link_totals(sent.iter().flatten(), received.iter().flatten())
    }

    /// A new transfer of the caller's on this connection, counted the way its bytes go.
    fn new_transfer(&self, parts: usize, write: bool) -> Arc<Transfer> {
        let way = if write { Way::Out } else { Way::In };
        self.core.transfers.create(self.id, parts, Some(Counted { stats: self.stats.clone(), way }))
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Fails the connection from outside its own paths: a library thread serving it died.
    pub(super) fn fail_with(&self, err: Error) {
        self.fail(&mut self.inner.lock(), err);
    }

    /// Makes the failure permanent: stops the channels (their I/O on caller memory ends before this
    /// returns), then fails every pending part with `err`.
    fn fail(&self, inner: &mut Inner, err: Error) {
        if inner.state.failure().is_some() {
            return;
        }
        // Once the user closed the connection, whatever breaks while it winds down (the peer hanging
        // up in answer to our Close, say) is the cancellation they asked for.
        let err = if self.is_closed() {
            Error::new(UcclStatus::ErrCanceled, "the connection was closed locally")
        } else {
            err
        };
        if err.status() != UcclStatus::ErrCanceled {
            log::warn!("connection to {} failed: {err}", self.peer.addr);
        }
        let failed = inner.state.fail(err.clone());
        if let Some((_, gate)) = inner.inline_landing.take() {
            gate.close();
        }
        inner.copies.abandon(&err);
        self.copying.store(false, Ordering::Release);
        // Kept: after a failure the per-link counts are what tells which link failed it.
        inner.final_links = self.links();
        // Each waits for a drive of it under way to end: no channel's I/O touches caller memory
        // past this.
        for slot in self.channels.iter() {
            drop(slot.lock().take());
        }
        inner.deferred.iter_mut().for_each(Vec::clear);
        inner.listens = None;
        self.set_retrying(inner, false);
        self.core.waker.chunks_out.set(&mut inner.chunks_out, false);
        // No same-host copy lands in our memory after this returns either.
        self.same_host.host.stop();
        inner.ipc.fail(&err, &self.core.waker);
        self.same_host.ipc_answered.notify_all();
        let _ = self.control.shutdown(Shutdown::Both);
        self.writer.stop(err.clone());
        for t in failed {
            t.finish_part(Err(err.clone()));
        }
    }

    /// Whether a channel holds sends its comm would take now with nothing set to post them: no
    /// pass due (the connection not marked queued, so no release wakes the progress thread for
    /// it), no comm that declined one, and no drive by the progress thread under way (which took
    /// the mark). Outside a pass this must never hold.
    #[cfg(test)]
    pub(super) fn sends_stranded(&self) -> bool {
        let inner = self.inner.lock();
        !inner.queued
            && !inner.retrying
            && !self.hooks.driving.load(Ordering::Relaxed)
            && self.channels.iter().any(|slot| slot.lock().as_ref().is_some_and(Channel::sends_waiting))
    }

    /// The gate the progress thread's drive of channel 0 stops at while a test holds it closed.
    #[cfg(test)]
    pub(super) fn gate(&self) -> &DriveGate {
        &self.hooks.gate
    }

    /// Makes readers hand the lock over before every message of a read but the first.
    #[cfg(test)]
    pub(super) fn hand_over_every_message(&self) {
        self.hooks.slice_zero.store(true, Ordering::Relaxed);
    }

    /// How often readers handed the lock over between messages.
    #[cfg(test)]
    pub(super) fn lets_in(&self) -> u64 {
        self.hooks.lets_in.load(Ordering::Relaxed)
    }

    /// How often a reader left the chunks it queued to the progress thread.
    #[cfg(test)]
    pub(super) fn left_to_progress(&self) -> u64 {
        self.hooks.left_to_progress.load(Ordering::Relaxed)
    }

    /// Keeps the control stream from its readers until the guard goes (which lets the reactor read
    /// again): what the peer sends meanwhile piles up in the socket.
    #[cfg(test)]
    pub(super) fn hold_reads(&self) -> impl Drop + '_ {
        loop {
            if let Some(taken) = self.rx.take() {
                return taken;
            }
            std::thread::yield_now();
        }
    }

    /// Whether the progress thread's pass would pass this connection over now (`quiet`).
    #[cfg(test)]
    pub(super) fn is_quiet(&self) -> bool {
        self.quiet(&self.inner.lock())
    }

    /// Requests of the state waiting for their channel's next drive.
    #[cfg(test)]
    pub(super) fn deferred_ops(&self) -> usize {
        self.inner.lock().deferred.iter().map(Vec::len).sum()
    }

    /// One pass of the progress engine over this connection; returns whether anything moved. Each
    /// channel is driven with the connection's lock let go and only its own held: meanwhile the
    /// peer's messages are read and handled and calls posted, and a thread holding the
    /// connection's lock may drive another channel (`pass`).
    pub(super) fn progress(&self) -> bool {
        let mut inner = self.inner.lock();
        if self.quiet(&inner) {
            MutexGuard::unlock_fair(inner);
            return false;
        }
        let Some(mut pass) = self.start_pass(&mut inner) else { return false };
        let mut driven = Driven::default();
        // What waits for a channel is applied under both locks before it is driven.
        for k in 0..self.channels.len() {
            if !inner.deferred[k].is_empty()
                && let Err(e) = self.channel_now(&mut inner, k)
            {
                driven.error = Some(e);
            }
        }
        if pass.result.is_ok() && driven.error.is_none() {
            let (sent, finished) = (&mut pass.sent, &mut pass.finished);
            #[cfg(test)]
            self.hooks.driving.store(true, Ordering::Relaxed);
            MutexGuard::unlocked_fair(&mut inner, || {
                for slot in self.channels.iter() {
                    if let Some(ch) = slot.lock().as_mut() {
                        #[cfg(test)]
                        if std::ptr::eq(slot, &self.channels[0]) {
                            self.hooks.gate.pass();
                        }
                        driven.drive(ch, sent, finished, usize::MAX);
                    }
                }
            });
            #[cfg(test)]
            self.hooks.driving.store(false, Ordering::Relaxed);
        }
        let moved = if inner.state.failure().is_some() {
            // Failed while the channels were driven: the failure ended their chunks' flows.
            pass.discard(&mut inner);
            true
        } else {
            self.settle(&mut inner, pass, driven)
        };
        // A polling progress thread comes back for the lock at once: a fair unlock hands it to a
        // thread waiting for it (the control reactor with the peer's reply, a caller), which an
        // ordinary one lets lose to the next pass until the lock's own fairness timer (0.5 ms).
        MutexGuard::unlock_fair(inner);
        moved
    }

    /// Runs a pass now if chunks were queued since the last one: the thread that queued them (a
    /// poster, or the one handling the message that started their flow) posts the first ones
    /// itself instead of waiting for the progress thread to wake, a wake-up off every transfer's
    /// start at each end.
    ///
    /// Of the sends it posts about one full chunk's bytes per channel, what sets every socket of
    /// the channel's comm moving, and leaves the rest queued for the progress thread, which the
    /// `release` that follows wakes: each further send cost this thread (a caller, before its post
    /// returned) the transport's post of a segment list and kicks of socket helpers not running
    /// yet, while its bytes would wait behind the first chunk's anyway.
    fn pass_if_queued(&self, inner: &mut Inner) {
        if inner.queued {
            let first_sends = inner.state.chunking().size;
            self.pass_here(inner, first_sends);
        }
    }

    /// A pass on a thread other than the progress thread (a caller posting or waiting, the control
    /// reactor). This may be the user's thread, whose current CUDA context is theirs, while a
    /// staged chunk's copy binds the engine's GPU: it is put back afterwards. Should that fail, the
    /// pass is left to the progress thread (woken when chunks were queued or completed).
    /// `send_bytes`: the sends it posts per channel (see `pass`).
    fn pass_here(&self, inner: &mut Inner, send_bytes: usize) {
        let _restore = match self.core.gpu.get().map(|gpu| gpu.enter()) {
            None => None,
            Some(Ok(restore)) => Some(restore),
            Some(Err(e)) => {
                log::debug!("leaving the chunks to the progress thread: {}", e.message());
                return;
            }
        };
        self.pass(inner, send_bytes);
    }

    /// Posts, tests and finishes chunks on every channel no other thread is driving (and the device
    /// copies of the same-host path); returns whether anything moved. Each channel gets sends until
    /// `send_bytes` of them went (`Channel::drive_limited`); sends left waiting keep the connection
    /// marked queued, and so does a channel being driven elsewhere (whose driver settles it).
    fn pass(&self, inner: &mut Inner, send_bytes: usize) -> bool {
        let Some(mut pass) = self.start_pass(inner) else { return false };
        let mut driven = Driven::default();
        if pass.result.is_ok() {
            for k in 0..self.channels.len() {
                let Some(mut slot) = self.channels[k].try_lock() else {
                    (driven.partial, inner.queued) = (true, true);
                    continue;
                };
                let Some(ch) = slot.as_mut() else { continue };
                // Parking: nothing goes on the channels until the peer answers.
                let applied = if inner.life.is_open() { apply_deferred(&mut inner.deferred[k], ch) } else { Ok(()) };
                match applied {
                    Ok(()) => driven.drive(ch, &mut pass.sent, &mut pass.finished, send_bytes),
                    Err(e) => driven.error = Some(e),
                }
            }
        }
        self.settle(inner, pass, driven)
    }

    /// A pass's start under the connection's lock: the same-host path's device copies driven, the
    /// lists the channels fill taken. `None` once the connection failed.
    fn start_pass(&self, inner: &mut Inner) -> Option<Pass> {
        if inner.state.failure().is_some() {
            return None;
        }
        let newly_queued = std::mem::take(&mut inner.queued);
        let (moved, result) = match self.drive_device_copies(&mut inner.ipc, Seer::Progress) {
            Ok(moved) => (moved, Ok(())),
            Err(e) => (false, Err(e)),
        };
        let (sent, finished) = (std::mem::take(&mut inner.sent_chunks), std::mem::take(&mut inner.finished_chunks));
        Some(Pass { newly_queued, moved, result, sent, finished })
    }

    /// Carries out what drives of the channels found: the chunks posted and finished reported to
    /// the state, their answers sent, the waker's counts kept; returns whether anything moved.
    fn settle(&self, inner: &mut Inner, pass: Pass, driven: Driven) -> bool {
        let Pass { newly_queued, moved, result, mut sent, mut finished } = pass;
        let moved = moved || driven.moved;
        let mut result = result.and(driven.error.map_or(Ok(()), Err));
        if !driven.partial {
            self.set_retrying(inner, result.is_ok() && driven.retry);
            // Counted in the waker only when first or last, and looked at only when the poll is on.
            if !self.core.config.progress_poll.is_zero() {
                let chunks_out = driven.posted && driven.posted_bytes <= self.core.config.progress_poll_bytes as usize;
                self.core.waker.chunks_out.set(&mut inner.chunks_out, chunks_out);
            }
        }
        if trace::on(trace::FLOW) {
            let (conn, side) = (self.trace.conn, self.trace.side);
            for &flow in &sent {
                trace::event!(FlowChunkPosted { conn, side, flow });
            }
            if newly_queued {
                trace::event!(FlowPass { conn, side });
            }
        }
        let mut out = Vec::new();
        for flow in sent.drain(..) {
            inner.state.chunk_sent(flow);
        }
        inner.sent_chunks = sent;
        // The answers of every flow that finished leave in one write.
        let mut held = Held::default();
        for chunk in finished.drain(..) {
            trace::event!(FlowChunkDone { conn: self.trace.conn, side: self.trace.side, flow: chunk.flow });
            if result.is_ok() {
                result = inner.state.chunk_finished(chunk.flow, &self.memory(), &mut out);
                let applied = self.apply_held(inner, out.drain(..), &mut held);
                result = result.and(applied);
            }
        }
        if result.is_ok() {
            result = self.release(inner, held);
        }
        inner.finished_chunks = finished;
        if moved {
            inner.state.heard(Instant::now());
        } else if result.is_ok() && inner.state.stalled(Instant::now(), self.core.config.timeout) {
            result = Err(Error::timeout(format!(
                "the peer is unreachable: it showed no progress for {} ms while transfers were pending (UCCL_TCPX_TIMEOUT_MS)",
                self.core.config.timeout.as_millis()
            )));
        }
        if let Err(e) = result {
            self.fail(inner, e);
            return true;
        }
        // Set past this pass's own release, so that the wake-up waits for the caller's (after its
        // request's write), not to find the lock still held.
        inner.queued |= driven.sends_left;
        moved
    }

    /// Whether some chunk was handed to a channel's comm and is not complete yet; a channel being
    /// driven elsewhere is taken as having one.
    fn chunks_posted(&self) -> bool {
        self.channels.iter().any(|slot| slot.try_lock().is_none_or(|ch| ch.as_ref().is_some_and(Channel::has_posted)))
    }

    /// Channel `k`, once what waits for it in `Inner::deferred` was applied; waits for a drive of
    /// it under way. An error is the connection's.
    fn channel_now<'a>(&'a self, inner: &mut Inner, k: usize) -> Result<MutexGuard<'a, Option<Channel>>> {
        let mut slot = self.channels[k].lock();
        if let Some(ch) = slot.as_mut().filter(|_| inner.life.is_open()) {
            apply_deferred(&mut inner.deferred[k], ch)?;
        }
        Ok(slot)
    }

    /// Does what the state asks of channel `k`, or, while another thread drives it (or earlier
    /// requests wait), leaves it for whoever drives it next under the connection's lock, in order.
    fn channel_op(&self, inner: &mut Inner, k: usize, op: ChannelOp) -> Result<()> {
        match self.free_channel(inner, k) {
            Some(mut slot) => op.apply(open_channel(&mut slot)?),
            None => {
                inner.deferred[k].push(op);
                Ok(())
            }
        }
    }

    /// Channel `k` if it may be asked now: the channels are open, nothing waits for it and no
    /// other thread drives it.
    fn free_channel(&self, inner: &Inner, k: usize) -> Option<MutexGuard<'_, Option<Channel>>> {
        if inner.deferred[k].is_empty() && inner.life.is_open() { self.channels[k].try_lock() } else { None }
    }

    /// Cuts a flow into chunks and queues each on its channel (registering its region there first).
    fn queue(&self, inner: &mut Inner, flow_plan: &FlowPlan) -> Result<()> {
        let chunking = inner.state.chunking();
        if self.channels.len() != chunking.channels {
            return Err(Error::backend(format!(
                "internal: a flow planned for {} channels was started on a connection with {}",
                chunking.channels,
                self.channels.len()
            )));
        }
        let FlowPlan { dir, flow, ref region, ref extent, seq } = *flow_plan;
        // The region of each run, and its id for the plan (no list for a flow in one region).
        let (one, many);
        let (runs, ids): (&[Arc<crate::engine::region::Region>], &[u64]) = match region {
            None => (&[], &[channel::SCRATCH]),
            Some(Regions::One(r)) => {
                one = [r.id];
                (std::slice::from_ref(r), &one)
            }
            Some(Regions::Runs(rs)) => {
                many = rs.iter().map(|r| r.id).collect::<Vec<_>>();
                (rs, &many)
            }
        };
        for (c, touched, chunk) in plan::plan(flow, ids, extent, chunking, seq) {
            // A flow whose region is gone moves through scratch memory with the same chunk lengths.
            let regions = runs.get(touched).unwrap_or(&[]);
            let chunk = if regions.is_empty() { Chunk { mem: ChunkMem::At(0), ..chunk } } else { chunk };
            // The regions are copied only for a chunk that must wait for its channel.
            match self.free_channel(inner, c) {
                Some(mut slot) => queue_chunk(open_channel(&mut slot)?, dir, chunk, regions)?,
                None => inner.deferred[c].push(ChannelOp::Queue(dir, chunk, regions.to_vec())),
            }
        }
        Ok(())
    }

    /// Whether a pass would find nothing to do: nothing queued, deferred, posted or to report, no
    /// device copy out (an inline payload's included), no registration to release, and the peer
    /// owing nothing whose stall a pass would watch. Such a connection is passed over at the cost
    /// of its lock: the progress thread visits every connection of its engine on each pass, and a
    /// busy connection's 1 MiB writes took 1.5x as long beside 255 idle ones driven in full (2-core
    /// VM, `perf-log/fan-out.md`).
    fn quiet(&self, inner: &Inner) -> bool {
        !inner.queued
            && !inner.retrying
            && !inner.chunks_out
            && inner.sent_chunks.is_empty()
            && inner.finished_chunks.is_empty()
            && inner.deferred.iter().all(Vec::is_empty)
            && inner.copies.is_empty()
            && !inner.ipc.has_pending()
            && !self.owes_us(&inner.state)
            && self.channels.iter().all(|slot| slot.try_lock().is_some_and(|ch| ch.as_ref().is_none_or(Channel::quiet)))
    }

    /// Keeps the progress thread polling while a comm declined a post with nothing in flight to
    /// wake it (a plugin may decline a send until its peer posted the receive).
    fn set_retrying(&self, inner: &mut Inner, retry: bool) {
        if retry && !inner.retrying {
            self.stats.retried();
        }
        if self.core.waker.polled.set(&mut inner.retrying, retry) {
            self.core.waker.wake();
        }
    }
}

/// A pass's own state between its start and its settling.
struct Pass {
    newly_queued: bool,
    moved: bool,
    result: Result<()>,
    sent: Vec<u64>,
    finished: Vec<Chunk>,
}

impl Pass {
    /// Gives the lists back unused.
    fn discard(self, inner: &mut Inner) {
        let Pass { mut sent, mut finished, .. } = self;
        sent.clear();
        finished.clear();
        (inner.sent_chunks, inner.finished_chunks) = (sent, finished);
    }
}

/// The channel in `slot`, or the error of a connection whose channels were dropped.
fn open_channel<'a>(slot: &'a mut MutexGuard<'_, Option<Channel>>) -> Result<&'a mut Channel> {
    slot.as_mut().ok_or_else(|| Error::backend("the connection's channels are closed"))
}

/// `Channel::redirect` for chunks waiting in `deferred`: those with bytes in `region` move
/// through scratch memory, with the same lengths.
fn redirect_deferred(deferred: &mut [ChannelOp], region: u64) {
    for op in deferred {
        if let ChannelOp::Queue(_, chunk, regions) = op
            && chunk.touches(region)
        {
            channel::to_scratch(chunk);
            regions.clear();
        }
    }
}

/// Applies what waits for a channel to it, in order.
fn apply_deferred(deferred: &mut Vec<ChannelOp>, ch: &mut Channel) -> Result<()> {
    for op in deferred.drain(..) {
        op.apply(ch)?;
    }
    Ok(())
}

impl LiveConnection for Connection {
    fn fence(&self, region: u64, deadline: Instant) {
        Connection::fence(self, region, deadline);
    }

    fn close(&self) {
        Connection::close(self);
    }
}

impl ControlEndpoint for Connection {
    fn readable(&self) -> Next {
        reader::serve_readable(self)
    }

    fn writable(&self) -> Next {
        self.writer.write_some()
    }

    fn fail_with(&self, err: Error) {
        Connection::fail_with(self, err);
    }
}

impl reader::Served for Connection {
    fn rx(&self) -> &ControlRx {
        &self.rx
    }

    fn copies_started(&self) -> bool {
        self.copying.load(Ordering::Acquire)
    }

    fn handle_read(&self, buf: &mut RxBuffer, drained: Drained, leave_copies: bool) -> Handled {
        Connection::handle_read(self, buf, drained, leave_copies)
    }

    fn work_waiting(&self) -> bool {
        self.same_host.host.work_waiting()
    }

    fn run_waiting(&self, transfer: u64) {
        self.same_host.host.run_waiting(transfer);
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("id", &self.id).field("peer", &self.peer).finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}
