//! A connection: one control stream plus N channels. The caller threads post, the reader thread
//! (or a caller waiting for an inline reply) applies the peer's control messages, the engine's
//! progress thread moves chunks; all meet in `ConnState` under one lock, held only for
//! non-blocking work.

use std::collections::{HashMap, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::EngineCore;
use super::channel::{self, Channel, Chunk};
use super::control_rx::{ControlRx, Drained, ReaderWait, RxBuffer};
use super::notify;
use super::region::Region;
use super::transfer::Transfer;
use super::writer::ControlWriter;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, FifoItem, MAX_INLINE_LEN, MAX_INLINE_SEND_BACKLOG};
use crate::transport::MemKind;

/// Announced sends the peer may queue ahead of our receives before it is treated as hostile.
const MAX_UNMATCHED_ANNOUNCES: usize = 1 << 16;
/// How long closing waits for queued control messages (the Close among them) to leave.
const LINGER_ON_CLOSE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub gpu_index: i32,
    pub gpu_id: String,
}

/// One local buffer of a one-sided call and the remote capability it targets.
pub struct OneSided {
    pub mr: u64,
    pub addr: usize,
    pub len: usize,
    pub remote: FifoItem,
}

/// What finishing a flow means.
enum OnDone {
    /// A part of the caller's transfer.
    Part(Arc<Transfer>),
    /// Tell the peer its send or write landed.
    Ack(u64),
    /// A matched two-sided receive: both.
    PartAndAck(Arc<Transfer>, u64),
    /// Serving a peer's read: nothing to report.
    Nothing,
}

impl OnDone {
    fn transfer(&self) -> Option<&Arc<Transfer>> {
        match self {
            OnDone::Part(t) | OnDone::PartAndAck(t, _) => Some(t),
            OnDone::Ack(_) | OnDone::Nothing => None,
        }
    }
}

struct Flow {
    /// Chunks still in flight, plus one while the peer's Done is outstanding.
    remaining: usize,
    len: u64,
    on_done: OnDone,
    /// Keeps the registration (and so the caller's promise about the memory) alive while in flight.
    _region: Arc<Region>,
}

/// Memory a flow sends from.
struct Source {
    addr: usize,
    len: u64,
    region: Arc<Region>,
}

struct Outbound {
    src: Source,
    transfer: Arc<Transfer>,
    /// The peer's engine answers at once (a write); a send waits for the peer's user to post a receive.
    prompt: bool,
}

struct Inbound {
    addr: usize,
    len: u64,
    region: Arc<Region>,
    on_done: OnDone,
    /// Bytes of `inline_one_sided` this small read holds until its ReadData (zero otherwise).
    inline: u64,
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

/// Inline write and small-read bytes a connection keeps unanswered; further small one-sided items
/// take the request path. Bounds what either end's control writer can be asked to queue for the
/// other (a vector of 8192 reads of 64 KiB would otherwise queue 512 MiB of ReadData at once).
const MAX_INLINE_ONE_SIDED: u64 = 8 << 20;

/// A send the peer announced (or carried inline) that no receive has matched yet.
struct Announced {
    peer_op: u64,
    len: u64,
    payload: Option<Vec<u8>>,
}

struct PostedRecv {
    addr: usize,
    max: u64,
    region: Arc<Region>,
    transfer: Arc<Transfer>,
}

struct ConnState {
    channels: Vec<Channel>,
    chunk_size: usize,
    next_id: u64,
    /// Flows started in each direction; seeds each flow's channel rotation identically on both ends.
    out_seq: u64,
    in_seq: u64,
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
    /// Granted destinations waiting for the peer's Data marker, by our flow id.
    inbound: HashMap<u64, Inbound>,
    posted_recvs: VecDeque<PostedRecv>,
    /// The peer's announced sends not yet matched to a receive, in the order it sent them.
    announces: VecDeque<Announced>,
    /// Payload bytes held in `announces`.
    announced_inline: u64,
    flows: HashMap<u64, Flow>,
    failure: Option<Error>,
    finished_chunks: Vec<Chunk>,
    /// Last time the peer showed life: a control message or a finished chunk.
    last_heard: Instant,
}

pub struct Connection {
    pub id: u64,
    pub peer: PeerInfo,
    core: Arc<EngineCore>,
    writer: ControlWriter,
    rx: Arc<ControlRx>,
    control: TcpStream,
    state: Mutex<ConnState>,
    closed: AtomicBool,
    listener_started: AtomicBool,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Connection {
    pub(super) fn start(
        core: Arc<EngineCore>,
        control: TcpStream,
        peer: PeerInfo,
        channels: Vec<Channel>,
        chunk_size: u32,
    ) -> Result<Arc<Connection>> {
        let io = |e| Error::io("control stream", e);
        control.set_read_timeout(None).map_err(io)?;
        control.set_write_timeout(None).map_err(io)?;
        let writer = ControlWriter::start(control.try_clone().map_err(io)?)?;
        let rx = Arc::new(ControlRx::new(control.try_clone().map_err(io)?, core.config.control_spin)?);
        let conn = Arc::new(Connection {
            id: core.next_conn_id(),
            peer,
            core,
            writer,
            rx: rx.clone(),
            control,
            state: Mutex::new(ConnState {
                channels,
                chunk_size: chunk_size as usize,
                next_id: 0,
                out_seq: 0,
                in_seq: 0,
                awaiting_grant: HashMap::new(),
                awaiting_done: HashMap::new(),
                inline_ops: HashMap::new(),
                inline_send_backlog: 0,
                inline_one_sided: 0,
                inbound: HashMap::new(),
                posted_recvs: VecDeque::new(),
                announces: VecDeque::new(),
                announced_inline: 0,
                flows: HashMap::new(),
                failure: None,
                finished_chunks: Vec::new(),
                last_heard: Instant::now(),
            }),
            closed: AtomicBool::new(false),
            listener_started: AtomicBool::new(false),
            reader: Mutex::new(None),
        });
        let weak = Arc::downgrade(&conn);
        let thread = std::thread::Builder::new()
            .name("uccl-ctrl-rx".into())
            .spawn(move || read_control(&rx, weak))
            .map_err(|e| Error::io("spawn control reader", e))?;
        *conn.reader.lock() = Some(thread);
        Ok(conn)
    }

    /// UCCL's start_listener: control messages are always served here; this only records the call so
    /// that a second call is reported like UCCL does.
    pub fn start_listener(&self) -> Result<()> {
        if let Some(e) = &self.state.lock().failure {
            return Err(e.clone());
        }
        if self.listener_started.swap(true, Ordering::AcqRel) {
            return Err(Error::new(UcclStatus::ErrRepostActive, "the listener of this connection is already started"));
        }
        Ok(())
    }

    pub fn write(&self, ops: &[OneSided]) -> Result<u64> {
        self.one_sided(ops, true)
    }

    pub fn read(&self, ops: &[OneSided]) -> Result<u64> {
        self.one_sided(ops, false)
    }

    fn one_sided(&self, ops: &[OneSided], write: bool) -> Result<u64> {
        let verb = if write { "write" } else { "read" };
        let mut checked = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let ctx = |e: Error| e.context(format!("{verb} item {i}"));
            let region = self.core.regions.local(op.mr, op.addr, op.len).map_err(ctx)?;
            let cap = op.remote.capability().map_err(|e| ctx(Error::invalid(e.to_string())))?;
            if op.remote.addr.checked_add(op.len as u64).is_none() {
                return Err(ctx(Error::invalid(format!(
                    "remote range {:#x} + {} bytes wraps around",
                    op.remote.addr, op.len
                ))));
            }
            if op.len as u64 > op.remote.size as u64 {
                return Err(ctx(Error::invalid(format!(
                    "{} bytes exceed the {} bytes the FifoItem grants",
                    op.len, op.remote.size
                ))));
            }
            checked.push((region, cap));
        }
        // Inline payloads are read before the state lock: a device copy must not stall the reader
        // and progress threads.
        let mut payloads = Vec::with_capacity(ops.len());
        for (op, (region, _)) in ops.iter().zip(&checked) {
            payloads.push(if write && op.len <= MAX_INLINE_LEN {
                // SAFETY: `regions.local` checked that the range lies in a live registration.
                Some(unsafe { self.load_inline(region, op.addr, op.len) }.map_err(|e| e.context(verb))?)
            } else {
                None
            });
        }
        self.post(ops.len(), |st, transfer, out| {
            let mut inline_parts = 0;
            for ((op, (region, cap)), payload) in ops.iter().zip(checked).zip(payloads) {
                let id = st.take_id();
                let (addr, len, token) = (op.remote.addr, op.len as u64, cap.token);
                // Small transfers ride the control stream: one round trip instead of a request, a
                // grant and a channel hop (for device memory also instead of two staged copies),
                // while the inline bytes in flight stay bounded.
                let inline = op.len <= MAX_INLINE_LEN && st.inline_one_sided + len <= MAX_INLINE_ONE_SIDED;
                if inline {
                    st.inline_one_sided += len;
                    inline_parts += 1;
                }
                out.push(if let (Some(payload), true) = (payload, inline) {
                    let kind = InlineKind::Write;
                    st.inline_ops
                        .insert(id, InlineOp { transfer: transfer.clone(), len, backlog: len, kind, prompt: true });
                    Control::InlineWrite { xfer: id, region: cap.region, token, addr, payload }
                } else if inline {
                    let on_done = OnDone::Part(transfer.clone());
                    st.inbound.insert(id, Inbound { addr: op.addr, len, region, on_done, inline: len });
                    Control::ReadSmall { xfer: id, region: cap.region, token, addr, len }
                } else if write {
                    let src = Source { addr: op.addr, len, region };
                    st.awaiting_grant.insert(id, Outbound { src, transfer: transfer.clone(), prompt: true });
                    Control::WriteRequest { xfer: id, region: cap.region, token, addr, len }
                } else {
                    let on_done = OnDone::Part(transfer.clone());
                    st.inbound.insert(id, Inbound { addr: op.addr, len, region, on_done, inline: 0 });
                    Control::ReadRequest { xfer: id, region: cap.region, token, addr, len }
                });
            }
            if inline_parts == ops.len() {
                transfer.set_completes_on_control();
            }
            Ok(())
        })
    }

    /// Each `(mr, addr, len)` is one message, matched by one receive the peer posts.
    pub fn send(&self, msgs: &[(u64, usize, usize)]) -> Result<u64> {
        let mut sources = Vec::with_capacity(msgs.len());
        for (i, &(mr, addr, len)) in msgs.iter().enumerate() {
            let region = self.core.regions.local(mr, addr, len).map_err(|e| e.context(format!("send item {i}")))?;
            let payload = if len <= MAX_INLINE_LEN {
                // SAFETY: `regions.local` checked that the range lies in a live registration.
                Some(unsafe { self.load_inline(&region, addr, len) }.map_err(|e| e.context(format!("send item {i}")))?)
            } else {
                None
            };
            sources.push((Source { addr, len: len as u64, region }, payload));
        }
        let parts = msgs.len();
        self.post(parts, |st, transfer, out| {
            let mut inline_parts = 0;
            for (src, payload) in sources {
                let id = st.take_id();
                let len = src.len;
                // A small message carries its payload unless the peer could be left buffering too
                // much for receives not yet posted; then it is announced like a large one.
                match payload {
                    Some(payload) if st.inline_send_backlog + len <= MAX_INLINE_SEND_BACKLOG => {
                        inline_parts += 1;
                        st.inline_send_backlog += len;
                        let kind = InlineKind::Send;
                        st.inline_ops.insert(
                            id,
                            InlineOp { transfer: transfer.clone(), len, backlog: len, kind, prompt: false },
                        );
                        out.push(Control::InlineSend { xfer: id, payload });
                    }
                    _ => {
                        st.awaiting_grant.insert(id, Outbound { src, transfer: transfer.clone(), prompt: false });
                        out.push(Control::SendAnnounce { xfer: id, len });
                    }
                }
            }
            if inline_parts == parts {
                transfer.set_completes_on_control();
            }
            Ok(())
        })
    }

    pub fn recv(&self, mr: u64, addr: usize, max: usize) -> Result<u64> {
        let region = self.core.regions.local(mr, addr, max)?;
        self.post(1, |st, transfer, out| {
            st.posted_recvs.push_back(PostedRecv { addr, max: max as u64, region, transfer: transfer.clone() });
            self.match_recvs(st, out);
            Ok(())
        })
    }

    /// Creates the transfer and registers its parts under the state lock, then sends the resulting
    /// control messages after releasing it: the reply can come back before the send call returns,
    /// and the reader must not find the lock held by a thread still inside that call. A failure
    /// before anything reached the wire forgets the id again.
    fn post(
        &self,
        parts: usize,
        post: impl FnOnce(&mut ConnState, &Arc<Transfer>, &mut Vec<Control>) -> Result<()>,
    ) -> Result<u64> {
        if parts == 0 {
            return Err(Error::invalid("nothing to transfer: zero items"));
        }
        let transfer = self.core.transfers.create(self.id, parts);
        let mut out = Vec::new();
        let posted = {
            let mut st = self.state.lock();
            if !st.waits_on_peer() {
                // The peer owed us nothing until now, so its silence so far is not a stall.
                st.last_heard = Instant::now();
            }
            let posted = match &st.failure {
                Some(e) => Err(e.clone()),
                None => post(&mut st, &transfer, &mut out),
            };
            if let Err(e) = &posted {
                // Parts already registered are failed (and their ids forgotten) with the connection.
                self.fail(&mut st, e.clone());
            }
            posted
        };
        let sent = posted.and_then(|()| self.writer.send_all(&out));
        if let Err(e) = sent {
            self.fail(&mut self.state.lock(), e.clone());
            self.core.transfers.discard(transfer.id);
            return Err(e);
        }
        Ok(transfer.id)
    }

    pub fn poll(&self, transfer: u64) -> Result<Option<u64>> {
        self.core.transfers.poll(self.id, transfer)
    }

    pub fn wait(&self, transfer: u64) -> Result<u64> {
        let t = self.core.transfers.get(self.id, transfer)?;
        if t.completes_on_control() {
            self.read_until_finished(&t);
        }
        self.core.transfers.wait(self.id, transfer)
    }

    /// Reads the control stream in the caller's thread until `t` finished (polling for the spin time,
    /// then in bounded blocking reads), unless another thread is reading it: then that thread
    /// delivers the reply, which the caller watches for during the spin time and afterwards sleeps on.
    fn read_until_finished(&self, t: &Transfer) {
        let Some(mut buf) = self.rx.try_take() else {
            // Another thread reads the stream and delivers the reply: watch for it before sleeping.
            let until = Instant::now() + self.rx.spin();
            while !t.is_finished() && Instant::now() < until {
                std::thread::yield_now();
            }
            return;
        };
        self.rx.disarm();
        if self.spin_until_finished(&mut buf, t) {
            // Each blocking read is bounded, so a reply delivered some other way (a failure) is noticed.
            while !t.is_finished() && self.pump(&mut buf, true) {}
        }
        self.rx.arm();
    }

    /// Polls the stream without blocking, for at most the spin time, while `t` is unfinished; false
    /// once the connection failed. Frames are handled only when bytes came, so polling takes no lock.
    fn spin_until_finished(&self, buf: &mut RxBuffer, t: &Transfer) -> bool {
        let until = Instant::now() + self.rx.spin();
        while !t.is_finished() && Instant::now() < until {
            let drained = self.rx.drain(buf, false);
            // Handled as a waiting caller: back here after a buffer's worth, to look at `t` again.
            if !matches!(drained, Drained::Empty) && !self.handle_read(buf, drained, true) {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Reads what the control stream holds and handles every whole message; false once the
    /// connection failed (nothing more will be read). A waiting caller (`wait`) blocks a bounded
    /// time for something and returns after one buffer's worth, so that a busy stream does not keep
    /// it past its own reply; the reader thread drains until the socket is empty.
    fn pump(&self, buf: &mut RxBuffer, wait: bool) -> bool {
        let drained = self.rx.drain(buf, wait);
        self.handle_read(buf, drained, wait)
    }

    /// `pump` after its first read.
    fn handle_read(&self, buf: &mut RxBuffer, mut drained: Drained, wait: bool) -> bool {
        loop {
            let mut st = self.state.lock();
            if st.failure.is_some() {
                // The channels are gone; nothing the peer says can be acted on any more.
                return false;
            }
            let mut handled = Ok(());
            while handled.is_ok() {
                match buf.next_frame() {
                    Ok(Some(msg)) => {
                        st.last_heard = Instant::now();
                        handled = self.handle(&mut st, msg);
                    }
                    Ok(None) => break,
                    Err(e) => handled = Err(e),
                }
            }
            let outcome = match (handled, drained) {
                (Err(e), _) | (Ok(()), Drained::Closed(e)) => e,
                (Ok(()), Drained::Empty | Drained::Open) => return true,
                (Ok(()), Drained::More) if wait => return true,
                (Ok(()), Drained::More) => {
                    drop(st);
                    drained = self.rx.drain(buf, false);
                    continue;
                }
            };
            if !self.is_closed() {
                self.fail(&mut st, outcome);
            }
            return false;
        }
    }

    pub fn notify(&self, name: &[u8], msg: &[u8]) -> Result<()> {
        if name.len() > crate::proto::MAX_NAME_LEN || name.contains(&0) {
            return Err(Error::invalid(format!(
                "notification name must be at most {} bytes without NUL",
                crate::proto::MAX_NAME_LEN
            )));
        }
        if msg.len() > crate::proto::MAX_NOTIFY_MSG_LEN {
            return Err(Error::invalid(format!(
                "notification message of {} bytes exceeds {} bytes",
                msg.len(),
                crate::proto::MAX_NOTIFY_MSG_LEN
            )));
        }
        if let Some(e) = &self.state.lock().failure {
            return Err(e.clone());
        }
        self.writer.send(&Control::Notify { name: name.to_vec(), msg: msg.to_vec() })
    }

    /// Tells the peer, stops all I/O on the caller's memory and fails what is still pending.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.writer.send(&Control::Close);
        self.writer.finish(LINGER_ON_CLOSE);
        let _ = self.control.shutdown(Shutdown::Both);
        {
            let mut st = self.state.lock();
            self.fail(&mut st, Error::new(UcclStatus::ErrCanceled, "the connection was closed locally"));
        }
        if let Some(t) = self.reader.lock().take() {
            // The reader may hold the last reference and be the one dropping us.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// One pass of the progress engine over this connection; returns whether anything moved.
    pub(super) fn progress(&self) -> bool {
        let mut st = self.state.lock();
        if st.failure.is_some() {
            return false;
        }
        let mut finished = std::mem::take(&mut st.finished_chunks);
        let mut moved = false;
        let mut result = Ok(());
        for ch in st.channels.iter_mut() {
            match ch.drive(&mut finished) {
                Ok(m) => moved |= m,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        for chunk in finished.drain(..) {
            if result.is_ok() {
                result = self.chunk_finished(&mut st, chunk.flow);
            }
        }
        st.finished_chunks = finished;
        // On an idle pass the clock goes first: `waits_on_peer` scans the pending ops.
        if moved {
            st.last_heard = Instant::now();
        } else if result.is_ok() && st.last_heard.elapsed() > self.core.config.timeout && st.waits_on_peer() {
            result = Err(Error::timeout(format!(
                "the peer showed no progress for {} ms while transfers were pending (UCCL_TCPX_TIMEOUT_MS)",
                self.core.config.timeout.as_millis()
            )));
        }
        if let Err(e) = result {
            self.fail(&mut st, e);
            return true;
        }
        moved
    }

    fn chunk_finished(&self, st: &mut ConnState, flow: u64) -> Result<()> {
        let Some(f) = st.flows.get_mut(&flow) else {
            return Err(Error::backend(format!("internal: chunk of unknown flow {flow}")));
        };
        f.remaining -= 1;
        if f.remaining == 0 {
            self.flow_finished(st, flow)?;
        }
        Ok(())
    }

    fn flow_finished(&self, st: &mut ConnState, flow: u64) -> Result<()> {
        let Some(f) = st.flows.remove(&flow) else { return Ok(()) };
        match f.on_done {
            OnDone::Part(t) => t.finish_part(Ok(f.len)),
            OnDone::Ack(peer_op) => self.writer.send(&Control::Done { xfer: peer_op, len: f.len })?,
            OnDone::PartAndAck(t, peer_op) => {
                t.finish_part(Ok(f.len));
                self.writer.send(&Control::Done { xfer: peer_op, len: f.len })?;
            }
            OnDone::Nothing => {}
        }
        Ok(())
    }

    /// Pairs posted receives with announced sends, oldest first; the answers go to `out`.
    fn match_recvs(&self, st: &mut ConnState, out: &mut Vec<Control>) {
        while !st.posted_recvs.is_empty() && !st.announces.is_empty() {
            let recv = st.posted_recvs.pop_front().expect("non-empty");
            let Announced { peer_op, len, payload } = st.announces.pop_front().expect("non-empty");
            if payload.is_some() {
                st.announced_inline -= len;
            }
            if len > recv.max {
                let why = format!("a {len}-byte message does not fit the posted {}-byte receive", recv.max);
                recv.transfer.finish_part(Err(Error::new(UcclStatus::ErrMismatch, why.clone())));
                out.push(Control::Deny { xfer: peer_op, status: UcclStatus::ErrMismatch as i32, reason: why });
                continue;
            }
            if let Some(payload) = payload {
                // SAFETY: the receive was checked against its registration when posted, for `max`
                // bytes, and its region is kept alive by `recv`.
                let stored = unsafe { self.store_inline(&recv.region, recv.addr, &payload) };
                out.push(match &stored {
                    Ok(()) => Control::Done { xfer: peer_op, len },
                    Err(e) => {
                        Control::Deny { xfer: peer_op, status: e.status() as i32, reason: e.message().to_owned() }
                    }
                });
                recv.transfer.finish_part(stored.map(|()| len));
                continue;
            }
            let flow = st.take_id();
            let on_done = OnDone::PartAndAck(recv.transfer, peer_op);
            st.inbound.insert(flow, Inbound { addr: recv.addr, len, region: recv.region, on_done, inline: 0 });
            out.push(Control::Grant { xfer: peer_op, flow });
        }
    }

    /// Sends answers produced while handling the peer's messages.
    fn answer(&self, out: &[Control]) -> Result<()> {
        if out.is_empty() { Ok(()) } else { self.writer.send_all(out) }
    }

    /// Starts sending `len` bytes at `addr` as the peer's flow `peer_flow`.
    fn start_outbound(
        &self,
        st: &mut ConnState,
        peer_flow: u64,
        src: Source,
        extra: usize,
        on_done: OnDone,
    ) -> Result<u64> {
        let flow = st.take_id();
        let (chunk_size, nch, seq) = (st.chunk_size, st.channels.len(), st.out_seq);
        st.out_seq += 1;
        let remaining = channel::chunk_count(src.len, chunk_size) + extra;
        let region = src.region.clone();
        // Recorded before anything fallible: a failing connection must still find (and fail) the part.
        st.flows.insert(flow, Flow { remaining, len: src.len, on_done, _region: src.region });
        for (c, chunk) in channel::plan(flow, region.id, src.addr, src.len as usize, chunk_size, seq, nch) {
            st.channels[c].queue_send(chunk, &region)?;
        }
        self.writer.send(&Control::Data { flow: peer_flow, len: src.len })?;
        self.core.waker.wake();
        Ok(flow)
    }

    fn announced(&self, st: &mut ConnState, send: Announced) -> Result<()> {
        if st.announces.len() >= MAX_UNMATCHED_ANNOUNCES {
            return Err(Error::backend(format!(
                "peer announced more than {MAX_UNMATCHED_ANNOUNCES} sends without matching receives"
            )));
        }
        st.announces.push_back(send);
        let mut out = Vec::new();
        self.match_recvs(st, &mut out);
        self.answer(&out)
    }

    fn handle(&self, st: &mut ConnState, msg: Control) -> Result<()> {
        match msg {
            Control::SendAnnounce { xfer, len } => self.announced(st, Announced { peer_op: xfer, len, payload: None }),
            Control::InlineSend { xfer, payload } => {
                let len = payload.len() as u64;
                if st.announced_inline + len > MAX_INLINE_SEND_BACKLOG {
                    return Err(Error::backend(format!(
                        "protocol violation: the peer's unmatched inline sends exceed {MAX_INLINE_SEND_BACKLOG} bytes"
                    )));
                }
                st.announced_inline += len;
                self.announced(st, Announced { peer_op: xfer, len, payload: Some(payload) })
            }
            Control::WriteRequest { xfer, region, token, addr, len } => {
                match self.core.regions.authorize(region, token, addr, len) {
                    Err(e) => self.deny(xfer, e),
                    Ok(region) => {
                        let flow = st.take_id();
                        st.inbound.insert(
                            flow,
                            Inbound { addr: addr as usize, len, region, on_done: OnDone::Ack(xfer), inline: 0 },
                        );
                        self.writer.send(&Control::Grant { xfer, flow })
                    }
                }
            }
            Control::ReadRequest { xfer, region, token, addr, len } => {
                match self.core.regions.authorize(region, token, addr, len) {
                    Err(e) => self.deny(xfer, e),
                    Ok(region) => {
                        let src = Source { addr: addr as usize, len, region };
                        self.start_outbound(st, xfer, src, 0, OnDone::Nothing).map(|_| ())
                    }
                }
            }
            Control::InlineWrite { xfer, region, token, addr, payload } => {
                let len = payload.len() as u64;
                let authorized = self.core.regions.authorize(region, token, addr, len);
                // SAFETY: `authorize` proved the range lies in a live, advertised region.
                match authorized.and_then(|r| unsafe { self.store_inline(&r, addr as usize, &payload) }) {
                    Err(e) => self.deny(xfer, e),
                    Ok(()) => self.writer.send(&Control::Done { xfer, len }),
                }
            }
            Control::ReadSmall { xfer, region, token, addr, len } => {
                let authorized = self.core.regions.authorize(region, token, addr, len);
                // SAFETY: as above; `len` is at most MAX_INLINE_LEN (checked by the decoder).
                match authorized.and_then(|r| unsafe { self.load_inline(&r, addr as usize, len as usize) }) {
                    Err(e) => self.deny(xfer, e),
                    Ok(payload) => self.writer.send(&Control::ReadData { xfer, payload }),
                }
            }
            Control::ReadData { xfer, payload } => {
                let dst = st.inbound.get(&xfer).ok_or_else(|| unknown_op("ReadData", xfer))?;
                if payload.len() as u64 != dst.len {
                    return Err(Error::backend(format!(
                        "protocol violation: ReadData for op {xfer} carries {} bytes, {} were asked for",
                        payload.len(),
                        dst.len
                    )));
                }
                let dst = st.inbound.remove(&xfer).expect("checked above");
                st.inline_one_sided -= dst.inline;
                // SAFETY: the destination was checked against its registration when the read was posted
                // and the region is kept alive by `dst`.
                let stored = unsafe { self.store_inline(&dst.region, dst.addr, &payload) };
                if let Some(t) = dst.on_done.transfer() {
                    // A failed local copy fails this read only; the connection is fine.
                    t.finish_part(stored.map(|()| dst.len));
                }
                Ok(())
            }
            Control::Grant { xfer, flow } => {
                let out = st.awaiting_grant.remove(&xfer).ok_or_else(|| unknown_op("Grant", xfer))?;
                let local = self.start_outbound(st, flow, out.src, 1, OnDone::Part(out.transfer))?;
                st.awaiting_done.insert(xfer, local);
                Ok(())
            }
            Control::Deny { xfer, status, reason } => {
                let status =
                    UcclStatus::from_code(status).filter(|s| (*s as i32) < 0).unwrap_or(UcclStatus::ErrUnknown);
                let err = Error::new(status, format!("peer refused: {reason}"));
                if let Some(out) = st.awaiting_grant.remove(&xfer) {
                    out.transfer.finish_part(Err(err));
                } else if let Some(op) = st.inline_ops.remove(&xfer) {
                    st.release_inline(&op);
                    op.transfer.finish_part(Err(err));
                } else if let Some(read) = st.inbound.remove(&xfer) {
                    st.inline_one_sided -= read.inline;
                    if let Some(t) = read.on_done.transfer() {
                        t.finish_part(Err(err));
                    }
                } else {
                    return Err(unknown_op("Deny", xfer));
                }
                Ok(())
            }
            Control::Data { flow, len } => {
                let granted = st.inbound.get(&flow).ok_or_else(|| unknown_op("Data", flow))?.len;
                if len != granted {
                    // Left in `inbound`, so failing the connection fails the part too.
                    return Err(Error::backend(format!(
                        "protocol violation: Data for flow {flow} carries {len} bytes, {granted} were granted"
                    )));
                }
                let dst = st.inbound.remove(&flow).expect("checked above");
                // A peer answering a small read with Data instead of ReadData still frees its share.
                st.inline_one_sided -= dst.inline;
                let (chunk_size, nch, seq) = (st.chunk_size, st.channels.len(), st.in_seq);
                st.in_seq += 1;
                let remaining = channel::chunk_count(len, chunk_size);
                let region = dst.region.clone();
                st.flows.insert(flow, Flow { remaining, len, on_done: dst.on_done, _region: dst.region });
                for (c, chunk) in channel::plan(flow, region.id, dst.addr, len as usize, chunk_size, seq, nch) {
                    st.channels[c].queue_recv(chunk, &region)?;
                }
                self.core.waker.wake();
                Ok(())
            }
            Control::Done { xfer, len } => {
                if let Some(op) = st.inline_ops.get(&xfer) {
                    if len != op.len {
                        // Left in `inline_ops`, so failing the connection fails the part too.
                        return Err(Error::backend(format!(
                            "protocol violation: Done for inline op {xfer} reports {len} bytes, expected {}",
                            op.len
                        )));
                    }
                    let op = st.inline_ops.remove(&xfer).expect("checked above");
                    st.release_inline(&op);
                    op.transfer.finish_part(Ok(len));
                    return Ok(());
                }
                let flow = st.awaiting_done.remove(&xfer).ok_or_else(|| unknown_op("Done", xfer))?;
                let expected = st.flows.get(&flow).map(|f| f.len);
                if expected != Some(len) {
                    return Err(Error::backend(format!(
                        "protocol violation: Done for op {xfer} reports {len} bytes, expected {expected:?}"
                    )));
                }
                self.chunk_finished(st, flow)
            }
            Control::Notify { name, msg } => {
                notify::push(&name, &msg);
                Ok(())
            }
            Control::Close => Err(Error::disconnected("the peer closed the connection")),
        }
    }

    /// Puts an inline payload into a local region: a CPU copy for host memory, a synchronous copy
    /// for device memory (at most 64 KiB, cheaper than a staged pass).
    ///
    /// # Safety
    /// `[addr, addr + payload.len())` lies inside `region`, which is live.
    unsafe fn store_inline(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<()> {
        match region.kind {
            // SAFETY: per the contract.
            MemKind::Host => unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), addr as *mut u8, payload.len()) },
            // SAFETY: per the contract; registration proved the range is memory of the engine's GPU.
            MemKind::Cuda { .. } => unsafe {
                crate::cuda::memory::copy_to_device_sync(self.region_gpu(region)?, addr, payload)?
            },
        }
        Ok(())
    }

    /// Reads an inline payload out of a local region.
    ///
    /// # Safety
    /// `[addr, addr + len)` lies inside `region`, which is live.
    unsafe fn load_inline(&self, region: &Region, addr: usize, len: usize) -> Result<Vec<u8>> {
        match region.kind {
            // SAFETY: per the contract.
            MemKind::Host => Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()),
            MemKind::Cuda { .. } => {
                let mut out = vec![0u8; len];
                // SAFETY: per the contract.
                unsafe { crate::cuda::memory::copy_from_device_sync(self.region_gpu(region)?, &mut out, addr)? };
                Ok(out)
            }
        }
    }

    fn region_gpu(&self, region: &Region) -> Result<&crate::cuda::Gpu> {
        match (self.core.gpu.get(), region.kind) {
            (Some(gpu), MemKind::Cuda { device }) if gpu.ordinal() == device => Ok(gpu),
            _ => Err(Error::new(
                UcclStatus::ErrInternal,
                format!("region {} is device memory of no GPU this engine serves", region.id),
            )),
        }
    }

    fn deny(&self, xfer: u64, e: Error) -> Result<()> {
        log::debug!("connection to {}: refusing op {xfer}: {}", self.peer.addr, e.message());
        self.writer.send(&Control::Deny { xfer, status: e.status() as i32, reason: e.message().to_owned() })
    }

    /// Makes the failure permanent: stops the channels (their I/O on caller memory ends before this
    /// returns), then fails every pending part with `err`.
    fn fail(&self, st: &mut ConnState, err: Error) {
        if st.failure.is_some() {
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
        st.failure = Some(err.clone());
        st.channels.clear();
        let _ = self.control.shutdown(Shutdown::Both);
        let mut failed: Vec<Arc<Transfer>> = Vec::new();
        failed.extend(st.awaiting_grant.drain().map(|(_, o)| o.transfer));
        failed.extend(st.inline_ops.drain().map(|(_, op)| op.transfer));
        st.inline_send_backlog = 0;
        st.inline_one_sided = 0;
        failed.extend(st.inbound.drain().filter_map(|(_, i)| i.on_done.transfer().cloned()));
        failed.extend(st.posted_recvs.drain(..).map(|r| r.transfer));
        failed.extend(st.flows.drain().filter_map(|(_, f)| f.on_done.transfer().cloned()));
        st.awaiting_done.clear();
        st.announces.clear();
        st.announced_inline = 0;
        for t in failed {
            t.finish_part(Err(err.clone()));
        }
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

impl ConnState {
    /// Returns what an answered inline op held of its bound.
    fn release_inline(&mut self, op: &InlineOp) {
        match op.kind {
            InlineKind::Send => self.inline_send_backlog -= op.backlog,
            InlineKind::Write => self.inline_one_sided -= op.backlog,
        }
    }

    /// Whether something pending needs the peer's engine (not its user) to act soon.
    fn waits_on_peer(&self) -> bool {
        !self.flows.is_empty()
            || !self.awaiting_done.is_empty()
            || self.inline_ops.values().any(|o| o.prompt)
            || !self.inbound.is_empty()
            || self.awaiting_grant.values().any(|o| o.prompt)
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

fn unknown_op(what: &str, id: u64) -> Error {
    Error::backend(format!("protocol violation: {what} for unknown id {id}"))
}

/// The shared-mode reader's poll after a read: the next message often follows at once (the reply to
/// a polling caller's next request), and polling catches it without a wake-up. Stops when a caller
/// holds the stream or after the spin time without bytes; false once the connection failed.
fn poll_while_busy(rx: &ControlRx, conn: &Connection) -> bool {
    let mut until = Instant::now() + rx.spin();
    while Instant::now() < until {
        let Some(mut buf) = rx.try_lock() else { return true };
        let drained = rx.drain(&mut buf, false);
        if !matches!(drained, Drained::Empty) {
            if !conn.handle_read(&mut buf, drained, false) {
                return false;
            }
            until = Instant::now() + rx.spin();
        }
        drop(buf);
        std::thread::yield_now();
    }
    true
}

/// The reader thread: waits for the stream to have something, then reads it (after a waiting
/// caller that holds the stream let go of it). Waits are bounded so that a connection dropped
/// without a close still lets this thread go; it holds the connection only while handling bytes.
fn read_control(rx: &ControlRx, conn: std::sync::Weak<Connection>) {
    let mut wait = rx.shared_wait();
    loop {
        wait = match wait {
            ReaderWait::Shared { .. } => {
                let ready = rx.wait_ready(Duration::from_millis(100));
                let Some(conn) = conn.upgrade() else { return };
                if !ready {
                    if conn.state.lock().failure.is_some() {
                        return;
                    }
                    continue;
                }
                if !conn.pump(&mut rx.lock(), false) || !poll_while_busy(rx, &conn) {
                    return;
                }
                rx.next_wait(wait)
            }
            ReaderWait::Blocking => {
                let mut buf = rx.lock();
                // After a message the next one often follows at once (a caller's next request):
                // poll for it before blocking again.
                let mut poll_until = Instant::now();
                loop {
                    let block = Instant::now() >= poll_until;
                    let drained = rx.drain(&mut buf, block);
                    match drained {
                        Drained::Empty if !block => {
                            std::thread::yield_now();
                            continue;
                        }
                        Drained::Empty => {}
                        _ => poll_until = Instant::now() + rx.spin(),
                    }
                    let Some(conn) = conn.upgrade() else { return };
                    if !conn.handle_read(&mut buf, drained, false) {
                        return;
                    }
                    let next = rx.next_wait(ReaderWait::Blocking);
                    if next != ReaderWait::Blocking {
                        break next;
                    }
                }
            }
        };
    }
}
