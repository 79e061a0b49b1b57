//! The state machine without sockets: two `ConnState`s exchange their control messages directly,
//! and a simulated channel moves each flow's bytes between real buffers in per-direction order.
//! The same-host path's work runs the connection's own code (`host_copy::copy`) by hand, both
//! "processes" being this one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::super::copies::StartedCopies;
use super::super::vector::{self, Grouper, Push, REQUEST_SEGMENTS, RunKey};
use super::*;
use crate::config::Config;
use crate::engine::conn::landing::LandingMemory;
use crate::engine::path::inline_limit;
use crate::engine::plan::{self, Cut};
use crate::engine::region::RegionTable;
use crate::engine::same_host::PeerProcess;
use crate::engine::same_host::host_copy;
use crate::engine::same_host::host_job::Failure;
use crate::engine::same_host::host_worker::Gate;
use crate::engine::same_host::state::{HostPath, HostTask};
use crate::engine::transfer::{Answers, TransferTable};
use crate::proto::{Capability, MAX_EAGER_LEN};
use crate::transport::MemKind;

const CHUNK: usize = 64 << 10;
const CONN: u64 = 1;

/// Host memory behind a region table, as the engine's memory is. With `start_device_copies`,
/// stores and loads of (simulated) device memory start a copy its end finishes later
/// (`End::finish_copies`), as the engine's GPU copier does.
#[derive(Default)]
struct HostMemory {
    regions: RegionTable,
    start_device_copies: bool,
    /// The length of every synchronous store into (simulated) device memory, in order.
    device_stores: std::sync::Mutex<Vec<usize>>,
}

/// A simulated device copy: the bytes move when it starts, `done` holds once it was waited for.
#[derive(Debug)]
struct SimulatedCopy {
    loaded: Vec<u8>,
    waited: std::sync::atomic::AtomicBool,
}

impl Copying for SimulatedCopy {
    fn done(&self) -> Result<bool> {
        Ok(self.waited.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn wait(&self) -> Result<()> {
        self.waited.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn loaded(&self) -> &[u8] {
        &self.loaded
    }
}

impl HostMemory {
    fn starts_copy(&self, region: &Region) -> bool {
        self.start_device_copies && matches!(region.kind, MemKind::Cuda { .. })
    }
}

impl Memory for HostMemory {
    fn authorize(&self, region: u64, token: u64, addr: u64, len: u64) -> Result<Arc<Region>> {
        self.regions.authorize(region, token, addr, len, None)
    }

    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>> {
        self.regions.authorize_segments(region, token, segs, None)
    }

    unsafe fn store(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<()> {
        assert!(region.contains(addr, payload.len()));
        if matches!(region.kind, MemKind::Cuda { .. }) {
            self.device_stores.lock().unwrap().push(payload.len());
        }
        // SAFETY: per the contract; test buffers are live boxes.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), addr as *mut u8, payload.len()) };
        Ok(())
    }

    unsafe fn load(&self, region: &Region, addr: usize, len: usize) -> Result<Vec<u8>> {
        assert!(region.contains(addr, len));
        // SAFETY: as above.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec())
    }

    unsafe fn start_store(&self, region: &Region, addr: usize, payload: &[u8]) -> Result<Started<()>> {
        // SAFETY: per the contract.
        unsafe { self.store(region, addr, payload) }?;
        Ok(match self.starts_copy(region) {
            true => Started::Later(Box::new(SimulatedCopy { loaded: Vec::new(), waited: Default::default() })),
            false => Started::Now(()),
        })
    }

    unsafe fn start_load(&self, region: &Region, addr: usize, len: usize) -> Result<Started<Vec<u8>>> {
        // SAFETY: per the contract.
        let loaded = unsafe { self.load(region, addr, len) }?;
        Ok(match self.starts_copy(region) {
            true => Started::Later(Box::new(SimulatedCopy { loaded, waited: Default::default() })),
            false => Started::Now(loaded),
        })
    }
}

/// A registered buffer, advertised whole.
struct Buf {
    bytes: Box<[u8]>,
    region: Arc<Region>,
    cap: Capability,
}

impl Buf {
    fn addr(&self) -> usize {
        self.bytes.as_ptr() as usize
    }
}

/// One end: its state machine, memory and transfers, and what its actions asked for.
struct End {
    st: ConnState,
    mem: HostMemory,
    transfers: TransferTable,
    /// Control messages for the peer, in order.
    outbox: VecDeque<Control>,
    /// Flows queued on the (simulated) channels, by direction sequence number.
    sending: BTreeMap<u64, FlowPlan>,
    receiving: BTreeMap<u64, FlowPlan>,
    /// Flows whose send chunks the (simulated) channels hold.
    held: Vec<u64>,
    notes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Same-host work was queued for the host worker (`direct` tests run it by hand).
    host_work: bool,
    /// Regions asked to be collapsed into huge pages, in order.
    collapsed: Vec<u64>,
    /// The gate a deregistration and a failure close on the connection's copies.
    copy_gate: Arc<Gate>,
    /// The peer's process, as the worker's proof finds it: this one.
    process: Arc<PeerProcess>,
    /// Regions of ours the peer may map (offered messages out of them), in order.
    ipc_granted: Vec<u64>,
    /// Matched receives of the peer's offered messages, for the test to copy (`ipc_send` tests).
    device_recvs: VecDeque<DeviceRecv>,
    /// Device copies started and what waits for them, as the connection keeps them.
    copies: StartedCopies,
}

impl End {
    fn new() -> End {
        End::with_cut(Cut::Spanning)
    }

    fn with_cut(cut: Cut) -> End {
        let mut end = End::without_eager_sends(cut);
        // Its own table: landing regions are internal, never entered in one.
        let table = RegionTable::default();
        end.st.send_eagerly_with(Box::new(move || LandingMemory::new(&table, None)));
        end
    }

    /// An end as a connection makes it, except that mid-size messages are announced.
    fn without_eager_sends(cut: Cut) -> End {
        End {
            st: ConnState::new(Chunking { size: CHUNK, channels: 3, cut }, Instant::now()),
            mem: HostMemory::default(),
            transfers: TransferTable::default(),
            outbox: VecDeque::new(),
            sending: BTreeMap::new(),
            receiving: BTreeMap::new(),
            held: Vec::new(),
            notes: Vec::new(),
            host_work: false,
            collapsed: Vec::new(),
            copy_gate: Arc::default(),
            process: Arc::new(PeerProcess::open(std::process::id()).unwrap()),
            ipc_granted: Vec::new(),
            device_recvs: VecDeque::new(),
            copies: StartedCopies::default(),
        }
    }

    fn buffer(&self, len: usize, fill: impl Fn(usize) -> u8) -> Buf {
        let bytes: Box<[u8]> = (0..len).map(fill).collect();
        let id = self.mem.regions.register(bytes.as_ptr() as usize, len, MemKind::Host).unwrap();
        let item = self.mem.regions.advertise(id, bytes.as_ptr() as usize, len).unwrap();
        Buf { bytes, region: self.mem.regions.get(id).unwrap(), cap: item.capability().unwrap() }
    }

    /// A buffer registered as GPU memory of device 0, as the target of a device region would hold
    /// it; host bytes underneath, which only the (simulated) channels touch.
    fn device_buffer(&self, len: usize) -> Buf {
        let bytes: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let id = self.mem.regions.register(bytes.as_ptr() as usize, len, MemKind::Cuda { device: 0 }).unwrap();
        let item = self.mem.regions.advertise(id, bytes.as_ptr() as usize, len).unwrap();
        Buf { bytes, region: self.mem.regions.get(id).unwrap(), cap: item.capability().unwrap() }
    }

    /// A buffer of this end whose capability names `target`'s region with a wrong token: what a
    /// peer forging access to memory it was not given would send.
    fn forged(&self, target: &Buf) -> Buf {
        let mut forged = self.buffer(16, |_| 0);
        forged.cap = Capability { token: target.cap.token ^ 1, ..target.cap };
        forged
    }

    fn take(&mut self, out: Vec<Action>) {
        for action in out {
            match action {
                Action::Send(msg) => self.outbox.push_back(msg),
                Action::Queue(plan) => {
                    let queue = match plan.dir {
                        Direction::Send => &mut self.sending,
                        Direction::Recv => &mut self.receiving,
                    };
                    assert!(queue.insert(plan.seq, plan).is_none(), "two flows with one sequence number");
                }
                Action::Finish(t, outcome) => t.finish_part(outcome),
                Action::Notify { name, msg } => self.notes.push((name, msg)),
                Action::Hold(flow) => self.held.push(flow),
                Action::Release(flow) => self.held.retain(|&f| f != flow),
                Action::HostWork { .. } => self.host_work = true,
                Action::Collapse(region) => self.collapsed.push(region.id),
                Action::GrantIpc(region) => self.ipc_granted.push(region),
                Action::DeviceRecv(recv) => self.device_recvs.push_back(recv),
                Action::AfterCopy(copy) => self.copies.push(copy),
            }
        }
    }

    /// Waits for the device copies started so far, as the connection's reader does before it
    /// goes idle, and carries out what waited for them.
    fn finish_copies(&mut self) {
        let out = self.copies.settle(true).unwrap();
        self.take(out);
    }

    /// Applies `msg` as the connection does: an inline write, send or a small read's answer through
    /// the wire, its payload lent from the bytes read.
    fn handle(&mut self, msg: Control) -> Result<()> {
        let mut out = Vec::new();
        let handled =
            if matches!(msg, Control::InlineWrite { .. } | Control::ReadData { .. } | Control::InlineSend { .. }) {
                let mut wire = Vec::new();
                msg.encode(&mut wire);
                let (frame, used) = crate::proto::decode_frame_lent(&wire).unwrap().unwrap();
                assert!(used == wire.len() && !matches!(frame, Frame::Whole(_)));
                self.st.handle_frame(frame, &self.mem, &mut out)
            } else {
                self.st.handle(msg, &self.mem, &mut out)
            };
        self.take(out);
        handled
    }

    fn transfer(&self, parts: usize) -> Arc<Transfer> {
        self.transfers.create(CONN, parts, None)
    }

    /// A write (or read) of `len` bytes between `local` at `off` and `remote` at `roff`, per item;
    /// items are grouped into requests as the connection groups them.
    fn one_sided(&mut self, write: bool, items: &[(&Buf, usize, &Buf, usize, usize)]) -> Arc<Transfer> {
        self.one_sided_in(write, items, false)
    }

    /// `one_sided`; with `spans`, runs of several regions go together as the network path groups
    /// them (`vector::requests`), as vectors over several regions.
    fn one_sided_in(&mut self, write: bool, items: &[(&Buf, usize, &Buf, usize, usize)], spans: bool) -> Arc<Transfer> {
        let mut grouper = Grouper::default();
        let mut runs = Vec::new();
        for &(local, _, remote, _, len) in items {
            let key =
                RunKey { local_region: local.region.id, remote_region: remote.cap.region, token: remote.cap.token };
            if let Push::Started(Some(run)) = grouper.push(key, len as u64) {
                runs.push(run);
            }
        }
        runs.extend(grouper.finish());
        let item = |(local, off, remote, roff, len): (&Buf, usize, &Buf, usize, usize)| {
            OneSidedRequest::Item(OneSidedItem {
                region: local.region.clone(),
                addr: local.addr() + off,
                len: len as u64,
                remote_region: remote.cap.region,
                token: remote.cap.token,
                remote_addr: (remote.addr() + roff) as u64,
                payload: (write && len as u64 <= inline_limit(self.st.inline_max, local.region.kind))
                    .then(|| local.bytes[off..off + len].to_vec()),
            })
        };
        let mut parts = Vec::new();
        for group in vector::requests(&runs, |r| (r, ()), spans) {
            if group.len() > 1 {
                let all = &items[runs[group.start].items.start..runs[group.end - 1].items.end];
                let counts: Arc<[usize]> = runs[group.clone()].iter().map(|r| r.items.len()).collect();
                let heads: Vec<_> = runs[group.clone()].iter().map(|r| items[r.items.start]).collect();
                let (local, _, remote, _, _) = heads[0];
                parts.push(OneSidedRequest::Vector(VectorRequest {
                    region: local.region.clone(),
                    local: Extent::scattered_runs(
                        all.iter().map(|&(l, o, _, _, n)| IoSeg { addr: l.addr() + o, len: n }),
                        counts,
                    ),
                    remote_region: remote.cap.region,
                    token: remote.cap.token,
                    segs: all
                        .iter()
                        .map(|&(_, _, r, ro, n)| RemoteSeg { addr: (r.addr() + ro) as u64, len: n as u32 })
                        .collect(),
                    runs: Some(Box::new(VectorRuns {
                        local: heads.iter().map(|h| h.0.region.clone()).collect(),
                        remote: runs[group.clone()]
                            .iter()
                            .zip(&heads)
                            .map(|(r, h)| VectorRun {
                                region: h.2.cap.region,
                                token: h.2.cap.token,
                                segs: r.items.len() as u32,
                            })
                            .collect(),
                    })),
                }));
                continue;
            }
            let run = runs[group.start].clone();
            let run_items = &items[run.items];
            let (local, _, remote, _, _) = run_items[0];
            if !run.vector {
                parts.extend(run_items.iter().copied().map(item));
                continue;
            }
            parts.push(OneSidedRequest::Vector(VectorRequest {
                region: local.region.clone(),
                local: Extent::scattered(run_items.iter().map(|&(l, o, _, _, n)| IoSeg { addr: l.addr() + o, len: n })),
                remote_region: remote.cap.region,
                token: remote.cap.token,
                segs: run_items
                    .iter()
                    .map(|&(_, _, r, ro, n)| RemoteSeg { addr: (r.addr() + ro) as u64, len: n as u32 })
                    .collect(),
                runs: None,
            }));
        }
        let t = self.transfer(parts.len());
        self.st.begin_post(Instant::now()).unwrap();
        let mut out = Vec::new();
        self.st.post_one_sided(&t, write, parts, &mut out).unwrap();
        self.take(out);
        t
    }

    fn send(&mut self, items: &[(&Buf, usize, usize)]) -> Arc<Transfer> {
        let items = items
            .iter()
            .map(|&(buf, off, len)| SendItem {
                region: buf.region.clone(),
                addr: buf.addr() + off,
                len: len as u64,
                payload: (len as u64 <= inline_limit(self.st.inline_max, buf.region.kind))
                    .then(|| buf.bytes[off..off + len].to_vec()),
                ipc: None,
            })
            .collect();
        self.post_sends(items)
    }

    /// Posts `items` as one send call.
    fn post_sends(&mut self, items: Vec<SendItem>) -> Arc<Transfer> {
        let t = self.transfer(items.len());
        self.st.begin_post(Instant::now()).unwrap();
        let mut out = Vec::new();
        self.st.post_send(&t, items, &mut out).unwrap();
        self.take(out);
        t
    }

    fn recv(&mut self, buf: &Buf, max: usize) -> Arc<Transfer> {
        let t = self.transfer(1);
        let mut out = Vec::new();
        self.st.begin_post(Instant::now()).unwrap();
        self.st.post_recv(&t, buf.region.clone(), buf.addr(), max as u64, &self.mem, &mut out).unwrap();
        self.take(out);
        t
    }

    fn outcome(&self, t: &Transfer) -> Option<Result<u64>> {
        self.transfers.poll(CONN, t.id).transpose()
    }

    /// Deregisters `buf` as the engine does: out of the table, cut off here, and the (simulated)
    /// channels' queued chunks redirected to scratch.
    fn cut(&mut self, buf: &Buf) -> Result<()> {
        let id = buf.region.id;
        self.mem.regions.remove(id).unwrap();
        let mut out = Vec::new();
        let err = Error::not_allowed(format!("memory region {id} was deregistered during the transfer"));
        let cut = self.st.cut(id, &err, &mut out);
        self.take(out);
        for plan in self.sending.values_mut().chain(self.receiving.values_mut()) {
            if plan.region.as_ref().is_some_and(|r| r.has(id)) {
                plan.region = None;
            }
        }
        cut
    }
}

/// Delivers every message one way; the first handling error is returned.
fn deliver(from: &mut End, to: &mut End) -> Result<bool> {
    let moved = !from.outbox.is_empty();
    while let Some(msg) = from.outbox.pop_front() {
        to.handle(msg)?;
    }
    Ok(moved)
}

/// Moves the bytes of flows both ends queued (the n-th sending flow of one end is the n-th
/// receiving flow of the other) and reports every chunk finished on both ends.
fn move_data(from: &mut End, to: &mut End) -> bool {
    let mut moved = false;
    while let (Some((&s, plan)), Some((&r, _))) = (from.sending.first_key_value(), to.receiving.first_key_value()) {
        assert_eq!(s, r, "flows pair up in order");
        if from.held.contains(&plan.flow) {
            // Held, and everything behind it with it.
            break;
        }
        let src = from.sending.remove(&s).unwrap();
        let dst = to.receiving.remove(&r).unwrap();
        assert_eq!(src.extent.len(), dst.extent.len(), "both ends plan the same flow");
        // Both ends cut the flow into the same chunks on the same channels, whatever their memory.
        let shape = |p: &FlowPlan, chunking| {
            plan::plan(p.flow, &[1], &p.extent, chunking, p.seq).map(|(ch, _, c)| (ch, c.len)).collect::<Vec<_>>()
        };
        let chunks = shape(&src, from.st.chunking());
        assert_eq!(chunks, shape(&dst, to.st.chunking()), "both ends cut the flow alike");
        assert_eq!(chunks.len(), chunk_count(&src.extent, from.st.chunking()));
        // Scratch sends zeros; a scratch receive lands nowhere.
        let bytes = match src.region {
            // SAFETY: the plan lies in a live test buffer the state checked against its region.
            Some(_) => unsafe { gather(&src.extent) },
            None => vec![0; src.extent.len() as usize],
        };
        if dst.region.is_some() {
            // SAFETY: as above, for the destination.
            unsafe { scatter(&dst.extent, &bytes) };
        }
        for _ in 0..chunks.len() {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            from.st.chunk_sent(src.flow);
            from.st.chunk_finished(src.flow, &from.mem, &mut a).unwrap();
            to.st.chunk_finished(dst.flow, &to.mem, &mut b).unwrap();
            from.take(a);
            to.take(b);
        }
        moved = true;
    }
    moved
}

/// The bytes of `extent`, in flow order.
///
/// # Safety
/// The extent lies in live memory.
unsafe fn gather(extent: &Extent) -> Vec<u8> {
    let segs = match extent {
        Extent::Contiguous { addr, len } => vec![IoSeg { addr: *addr, len: *len as usize }],
        Extent::Scattered { segs, .. } => segs.to_vec(),
    };
    // SAFETY: per the contract.
    segs.iter().flat_map(|s| unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.len) }.to_vec()).collect()
}

/// Writes `bytes` over `extent`, in flow order.
///
/// # Safety
/// The extent lies in live memory nobody else uses, and holds `bytes.len()` bytes.
unsafe fn scatter(extent: &Extent, bytes: &[u8]) {
    let segs = match extent {
        Extent::Contiguous { addr, len } => vec![IoSeg { addr: *addr, len: *len as usize }],
        Extent::Scattered { segs, .. } => segs.to_vec(),
    };
    let mut at = 0;
    for s in segs {
        // SAFETY: per the contract.
        unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), s.addr as *mut u8, s.len) };
        at += s.len;
    }
    assert_eq!(at, bytes.len());
}

/// Runs both ends until nothing moves.
fn pump(a: &mut End, b: &mut End) {
    loop {
        let mut moved = deliver(a, b).unwrap();
        moved |= deliver(b, a).unwrap();
        moved |= move_data(a, b);
        moved |= move_data(b, a);
        moved |= run_host_work(a);
        moved |= run_host_work(b);
        if !moved {
            return;
        }
    }
}

/// Runs every queued host task of `end` as the worker would: a proof that holds, copies that copy
/// unless cut. Returns whether there was any.
fn run_host_work(end: &mut End) -> bool {
    end.host_work = false;
    let mut ran = false;
    while let Some(task) = end.st.same_host_mut().next_host_task() {
        ran = true;
        let mut out = Vec::new();
        run_task(end, task, &mut out);
        end.take(out);
    }
    ran
}

/// The configuration the connection's copies run with: a short io timeout, so a copy that hangs
/// fails a test within seconds.
fn host_config() -> Config {
    Config::from_lookup(|name| (name == "UCCL_TCPX_TIMEOUT_MS").then(|| "2000".to_owned())).unwrap()
}

/// One host task, as the worker runs it (`host_copy.rs`): a proof that holds, the connection's
/// own copies.
fn run_task(end: &mut End, task: HostTask, out: &mut Vec<Action>) {
    match task {
        HostTask::Prove { .. } => end.st.proved(true, out),
        HostTask::Copy(job) => {
            let config = host_config();
            let copied = match host_copy::copy(&job, Some(&end.process), &end.copy_gate, &config, None) {
                Ok(()) => Ok(()),
                Err(Failure::Copy(e)) => Err(e),
                Err(Failure::Refused(e, _) | Failure::Panicked(e)) => panic!("a copy of this process failed: {e}"),
            };
            end.st.copy_finished(job, copied, out);
        }
    }
}

mod device_copies;
mod direct;
mod eager;
mod ipc_send;
mod runs;

fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(31).wrapping_add(seed)
}

fn status(outcome: Option<Result<u64>>) -> UcclStatus {
    outcome.expect("finished").expect_err("failed").status()
}

#[test]
fn a_write_sends_its_chunks_with_its_request_then_done() {
    let (mut a, mut b) = (End::new(), End::new());
    let len = 3 * CHUNK + 5;
    let src = a.buffer(len, pattern(1));
    let dst = b.buffer(len + 100, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 100, len)]);
    assert_eq!(t.answers(), Answers::AfterData, "a waiting caller reads the Done itself");
    let xfer = match a.outbox.make_contiguous() {
        [Control::WriteRequest { xfer, region, token, addr, len: l }] => {
            assert_eq!(
                (*region, *token, *addr, *l),
                (dst.cap.region, dst.cap.token, dst.addr() as u64 + 100, len as u64)
            );
            *xfer
        }
        other => panic!("expected one WriteRequest, got {other:?}"),
    };
    assert_eq!(a.sending.len(), 1, "the chunks are queued with the request, no grant awaited");
    deliver(&mut a, &mut b).unwrap();
    assert!(b.outbox.is_empty(), "nothing to answer before the bytes landed: {:?}", b.outbox);
    assert_eq!(b.receiving.len(), 1, "the target receives the flow the request announced");
    assert!(move_data(&mut a, &mut b));
    // Every local chunk went out, but the write completes only with the peer's Done.
    assert!(a.outcome(&t).is_none());
    assert!(t.awaits_answer());
    assert_eq!(b.outbox, [Control::Done { xfer, len: len as u64 }]);
    deliver(&mut b, &mut a).unwrap();
    assert!(!t.awaits_answer());
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(&dst.bytes[100..], &src.bytes[..]);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

#[test]
fn done_before_the_last_local_chunk_waits_for_it() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(2 * CHUNK, pattern(2));
    let dst = b.buffer(2 * CHUNK, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 2 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    let plan = a.sending.pop_first().unwrap().1;
    let peer = b.receiving.pop_first().unwrap().1;
    let mut out = Vec::new();
    for _ in 0..2 {
        b.st.chunk_finished(peer.flow, &b.mem, &mut out).unwrap();
    }
    b.take(out);
    assert!(t.awaits_answer());
    deliver(&mut b, &mut a).unwrap();
    assert!(a.outcome(&t).is_none(), "a local chunk send is still in flight");
    // Nothing more comes on the control stream for it: a caller reading the stream stops there and
    // sleeps until the progress thread finishes the chunks.
    assert!(!t.awaits_answer());
    for _ in 0..2 {
        let mut out = Vec::new();
        a.st.chunk_finished(plan.flow, &a.mem, &mut out).unwrap();
        a.take(out);
    }
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 2 * CHUNK as u64);
}

/// Runs one transfer to its end and names every control message either end sent for it, in the
/// order they were handled.
fn messages_of(write: bool, len: usize) -> Vec<String> {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(len, pattern(4));
    let remote = b.buffer(len, pattern(5));
    let t = a.one_sided(write, &[(&local, 0, &remote, 0, len)]);
    let mut names = Vec::new();
    let mut deliver_named = |from: &mut End, to: &mut End| {
        let moved = !from.outbox.is_empty();
        while let Some(msg) = from.outbox.pop_front() {
            names.push(format!("{msg:?}").split([' ', '{']).next().unwrap_or_default().to_owned());
            to.handle(msg).unwrap();
        }
        moved
    };
    loop {
        let mut moved = deliver_named(&mut a, &mut b);
        moved |= deliver_named(&mut b, &mut a);
        moved |= move_data(&mut a, &mut b) | move_data(&mut b, &mut a);
        if !moved {
            break;
        }
    }
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert_eq!(local.bytes, remote.bytes);
    names
}

/// A read over the channels costs the same control messages as a write: one request, and one
/// message back (a write's Done after its bytes landed, a read's Data marker ahead of its bytes),
/// with no Grant on either; a read's bytes move right after its request, a write's with it.
#[test]
fn a_read_moves_with_as_many_control_messages_as_a_write() {
    for len in [INLINE_LEN_FLOOR + 1, 4 * CHUNK, 4 * CHUNK + 3, 40 * CHUNK] {
        let (write, read) = (messages_of(true, len), messages_of(false, len));
        assert_eq!(write, ["WriteRequest", "Done"], "{len} bytes");
        assert_eq!(read, ["ReadRequest", "Data"], "{len} bytes");
    }
}

/// How a waiting caller learns of the end: on the control stream when every part is answered
/// there (inline items, writes over the channels), else from whoever finishes the last part.
#[test]
fn a_caller_reads_the_control_stream_only_for_answered_parts() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(8 * CHUNK, pattern(6));
    let remotes = [b.buffer(8 * CHUNK, |_| 0), b.buffer(8 * CHUNK, |_| 0)];
    let big = 2 * CHUNK;
    // Alternate remote regions, so that the items stay separate requests.
    let write_and_inline =
        a.one_sided(true, &[(&local, 0, &remotes[0], 0, big), (&local, big, &remotes[1], big, INLINE_LEN_FLOOR)]);
    assert_eq!(write_and_inline.answers(), Answers::AfterData);
    assert!(!write_and_inline.ends_on_chunks());
    let read = a.one_sided(false, &[(&local, 0, &remotes[0], 0, big)]);
    assert_eq!(read.answers(), Answers::Elsewhere, "a read ends on its chunks");
    assert!(!read.awaits_answer());
    assert!(read.ends_on_chunks(), "its caller tests the connection itself");
    let small_read = a.one_sided(false, &[(&local, 0, &remotes[0], 0, 10)]);
    assert_eq!(small_read.answers(), Answers::Inline);
    assert!(!small_read.ends_on_chunks());
    let mixed = a.one_sided(false, &[(&local, 0, &remotes[0], 0, big), (&local, big, &remotes[1], big, 10)]);
    assert!(!mixed.ends_on_chunks() && !mixed.completes_on_control(), "a big read and a small one");
    let large = a.buffer(MAX_EAGER_LEN as usize + 1, pattern(6));
    let send = a.send(&[(&large, 0, MAX_EAGER_LEN as usize + 1)]);
    assert_eq!(send.answers(), Answers::Elsewhere, "a send waits for the peer's user");
    assert!(!send.ends_on_chunks());
    let eager = a.send(&[(&local, 0, big)]);
    assert_eq!(eager.answers(), Answers::AfterData, "an eager send is answered after its bytes");
    assert!(write_and_inline.awaits_answer() && small_read.awaits_answer());
    // Answers are counted per part: the write's parts are through once both were answered.
    pump_messages_only(&mut a, &mut b);
    assert!(write_and_inline.awaits_answer(), "the big write's Done comes after its bytes");
    assert!(!small_read.awaits_answer() && a.outcome(&small_read).is_some());
    pump(&mut a, &mut b);
    assert!(!write_and_inline.awaits_answer());
    assert_eq!(a.outcome(&write_and_inline).unwrap().unwrap(), (big + INLINE_LEN_FLOOR) as u64);
    assert_eq!(a.outcome(&read).unwrap().unwrap(), big as u64);
    assert_eq!(a.outcome(&mixed).unwrap().unwrap(), big as u64 + 10);
    let item = |cap: Capability, at: usize| {
        vec![OneSidedRequest::Item(OneSidedItem {
            region: local.region.clone(),
            addr: local.addr() + at,
            len: big as u64,
            remote_region: cap.region,
            token: cap.token,
            remote_addr: (remotes[0].addr() + at) as u64,
            payload: None,
        })]
    };
    // A call posted in turns (a request at a time) reads the stream once every part is in.
    let turns = a.transfer(2);
    let mut out = Vec::new();
    a.st.post_one_sided(&turns, true, item(remotes[0].cap, 0), &mut out).unwrap();
    assert_eq!(turns.answers(), Answers::Elsewhere, "one part of two is posted");
    a.st.post_one_sided(&turns, true, item(remotes[0].cap, big), &mut out).unwrap();
    a.take(out);
    assert_eq!(turns.answers(), Answers::AfterData);
    pump(&mut a, &mut b);
    assert!(!turns.awaits_answer());
    assert_eq!(a.outcome(&turns).unwrap().unwrap(), 2 * big as u64);
    // A write the peer refuses is answered too (its bytes still land in the peer's scratch memory).
    let stale = Capability { token: remotes[0].cap.token ^ 1, ..remotes[0].cap };
    let w = a.transfer(1);
    let mut out = Vec::new();
    a.st.post_one_sided(&w, true, item(stale, 0), &mut out).unwrap();
    a.take(out);
    assert!(w.awaits_answer());
    pump(&mut a, &mut b);
    assert!(!w.awaits_answer());
    assert_eq!(status(a.outcome(&w)), UcclStatus::ErrNotAllowed);
}

#[test]
fn read_runs_request_then_data() {
    let (mut a, mut b) = (End::new(), End::new());
    let len = 5 * CHUNK;
    let dst = a.buffer(len, |_| 0);
    let src = b.buffer(len, pattern(3));
    let t = a.one_sided(false, &[(&dst, 0, &src, 0, len)]);
    let Some(&Control::ReadRequest { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.outbox, [Control::Data { flow: xfer, len: len as u64 }]);
    deliver(&mut b, &mut a).unwrap();
    assert!(move_data(&mut b, &mut a));
    // The read completes with its last chunk; the server has nothing more to say.
    assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
    assert!(b.outbox.is_empty(), "{:?}", b.outbox);
    assert_eq!(dst.bytes, src.bytes);
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
}

#[test]
fn a_read_whose_chunks_all_left_before_the_cut_still_succeeds() {
    let (mut a, mut b) = (End::new(), End::new());
    let dst = a.buffer(2 * CHUNK, |_| 0);
    let src = b.buffer(2 * CHUNK, pattern(31));
    let t = a.one_sided(false, &[(&dst, 0, &src, 0, 2 * CHUNK)]);
    pump_messages_only(&mut a, &mut b);
    let served = b.sending.first_key_value().unwrap().1.flow;
    for _ in 0..2 {
        b.st.chunk_sent(served);
    }
    // Deregistered with both chunks with the transport (which the fence waits for): they carry the
    // region's bytes, so the read stands: no Deny, nothing held.
    let mut out = Vec::new();
    b.st.cut(src.region.id, &Error::not_allowed("cut"), &mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 2 * CHUNK as u64);
    assert_eq!(dst.bytes, src.bytes);
}

#[test]
fn sends_match_receives_in_order_whichever_comes_first() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(8 * CHUNK, pattern(4));
    let d1 = b.buffer(4 * CHUNK, |_| 0);
    let d2 = b.buffer(4 * CHUNK, |_| 0);
    let d3 = b.buffer(100, |_| 0);
    // First two announced before any receive, the third (inline) after all receives.
    let s1 = a.send(&[(&src, 0, 3 * CHUNK)]);
    let s2 = a.send(&[(&src, CHUNK, 4 * CHUNK)]);
    pump(&mut a, &mut b);
    assert!(a.outcome(&s1).is_none() && a.outcome(&s2).is_none());
    assert!(!a.st.waits_on_peer(), "waiting for the peer's user to post a receive is no stall");
    let r1 = b.recv(&d1, 4 * CHUNK);
    let r2 = b.recv(&d2, 4 * CHUNK);
    let r3 = b.recv(&d3, 100);
    let s3 = a.send(&[(&src, 7, 100)]);
    assert!(matches!(a.outbox.front(), Some(Control::InlineSend { .. })));
    assert!(s3.completes_on_control());
    pump(&mut a, &mut b);
    for (s, r, n) in [(&s1, &r1, 3 * CHUNK), (&s2, &r2, 4 * CHUNK), (&s3, &r3, 100)] {
        assert_eq!(a.outcome(s).unwrap().unwrap(), n as u64);
        assert_eq!(b.outcome(r).unwrap().unwrap(), n as u64);
    }
    assert_eq!(&d1.bytes[..3 * CHUNK], &src.bytes[..3 * CHUNK]);
    assert_eq!(&d2.bytes[..], &src.bytes[CHUNK..5 * CHUNK]);
    assert_eq!(&d3.bytes[..], &src.bytes[7..107]);
}

#[test]
fn a_message_larger_than_its_receive_fails_both_with_mismatch() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(4 * CHUNK, pattern(5));
    let dst = b.buffer(4 * CHUNK, |_| 0);
    for len in [4 * CHUNK, 200] {
        let r = b.recv(&dst, len - 1);
        let s = a.send(&[(&src, 0, len)]);
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&s)), UcclStatus::ErrMismatch);
        assert_eq!(status(b.outcome(&r)), UcclStatus::ErrMismatch);
    }
    assert!(dst.bytes.iter().all(|&x| x == 0));
    // The next pair still matches.
    let r = b.recv(&dst, 4 * CHUNK);
    let s = a.send(&[(&src, 0, 4 * CHUNK)]);
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&s).unwrap().unwrap(), b.outcome(&r).unwrap().unwrap());
}

#[test]
fn refused_requests_of_every_kind_are_denied_not_allowed() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(4 * CHUNK, pattern(6));
    let target = b.buffer(4 * CHUNK, |_| 0);
    let forged = b.forged(&target);
    for write in [true, false] {
        for len in [100, 4 * CHUNK] {
            let t = a.one_sided(write, &[(&local, 0, &forged, 0, len)]);
            pump(&mut a, &mut b);
            assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed, "write {write}, {len} bytes");
        }
    }
    assert!(target.bytes.iter().all(|&x| x == 0));
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert_eq!((a.st.inline_one_sided, a.st.inline_send_backlog), (0, 0), "refusals free the inline bound");
}

#[test]
fn small_writes_and_reads_ride_the_control_stream() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(2 * INLINE_LEN_FLOOR, pattern(7));
    let remote = b.buffer(2 * INLINE_LEN_FLOOR, pattern(8));
    let w = a.one_sided(true, &[(&local, 0, &remote, 0, INLINE_LEN_FLOOR)]);
    assert!(matches!(a.outbox.front(), Some(Control::InlineWrite { .. })));
    assert!(w.completes_on_control());
    let r = a.one_sided(false, &[(&local, INLINE_LEN_FLOOR, &remote, INLINE_LEN_FLOOR, 10)]);
    assert!(matches!(a.outbox.back(), Some(Control::ReadSmall { len: 10, .. })));
    pump(&mut a, &mut b);
    assert!(a.sending.is_empty() && b.receiving.is_empty(), "no flow on a channel");
    assert_eq!(a.outcome(&w).unwrap().unwrap(), INLINE_LEN_FLOOR as u64);
    assert_eq!(a.outcome(&r).unwrap().unwrap(), 10);
    assert_eq!(&remote.bytes[..INLINE_LEN_FLOOR], &local.bytes[..INLINE_LEN_FLOOR]);
    assert_eq!(
        &local.bytes[INLINE_LEN_FLOOR..INLINE_LEN_FLOOR + 10],
        &remote.bytes[INLINE_LEN_FLOOR..INLINE_LEN_FLOOR + 10]
    );
    // One byte more than the inline limit takes the request path.
    let big = a.one_sided(true, &[(&local, 0, &remote, 0, INLINE_LEN_FLOOR + 1)]);
    assert!(matches!(a.outbox.front(), Some(Control::WriteRequest { .. })));
    assert_eq!((w.answers(), r.answers(), big.answers()), (Answers::Inline, Answers::Inline, Answers::AfterData));
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&big).unwrap().unwrap(), INLINE_LEN_FLOOR as u64 + 1);
}

/// Inline transfers unanswered (what makes a poster hand its payload to the reactor) are seen from
/// the post of an inline write or small read until its answer, and not for a request over the
/// channels.
#[test]
fn inline_transfers_are_unanswered_from_their_post_to_their_answer() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(4 * INLINE_LEN_FLOOR, pattern(2));
    let remote = b.buffer(4 * INLINE_LEN_FLOOR, pattern(3));
    for (write, len) in [(true, 4096), (false, 4096)] {
        assert!(!a.st.inline_unanswered());
        let t = a.one_sided(write, &[(&local, 0, &remote, 0, len)]);
        assert!(a.st.inline_unanswered(), "write: {write}");
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), len as u64);
        assert!(!a.st.inline_unanswered(), "answered (write: {write})");
    }
    let big = a.one_sided(true, &[(&local, 0, &remote, 0, 2 * INLINE_LEN_FLOOR)]);
    assert!(matches!(a.outbox.front(), Some(Control::WriteRequest { .. })));
    assert!(!a.st.inline_unanswered(), "a request over the channels is no inline transfer");
    pump(&mut a, &mut b);
    assert!(a.outcome(&big).unwrap().is_ok());
}

/// Payloads the connection's reader lands straight from the socket: a small read's answer is
/// offered its destination only while that is whole and uncut, and ends the read as its frame
/// would; one cut off meanwhile fails -6. A landed inline write is answered Done, or Deny -6.
#[test]
fn inline_payloads_landed_from_the_socket_end_their_transfers() {
    let (mut a, b) = (End::new(), End::new());
    let local = a.buffer(4096, |_| 0);
    let remote = b.buffer(4096, pattern(8));
    let small_read = |a: &mut End, off: usize| {
        let t = a.one_sided(false, &[(&local, off, &remote, off, 10)]);
        let Some(Control::ReadSmall { xfer, .. }) = a.outbox.pop_back() else { panic!("not a small read") };
        (t, xfer)
    };
    let (r, xfer) = small_read(&mut a, 0);
    assert_eq!(a.st.read_answer_destination(xfer, 11), None, "an answer of another length");
    assert_eq!(a.st.read_answer_destination(xfer + 100, 10), None, "an unknown read");
    assert_eq!(a.st.read_answer_destination(xfer, 10), Some((local.addr(), local.region.id)));
    let mut out = Vec::new();
    a.st.read_answer_landed(xfer, 10, true, &mut out).unwrap();
    a.take(out);
    assert_eq!(a.outcome(&r).unwrap().unwrap(), 10);
    assert!(a.st.read_answer_landed(xfer, 10, true, &mut Vec::new()).is_err(), "ended once, then unknown");

    let (r, xfer) = small_read(&mut a, 16);
    assert!(a.st.read_answer_destination(xfer, 10).is_some());
    a.cut(&local).unwrap();
    assert_eq!(a.st.read_answer_destination(xfer, 10), None, "a cut destination is not offered");
    // Landing had begun before the cut: its reader dropped the rest and says so.
    let mut out = Vec::new();
    a.st.read_answer_landed(xfer, 10, false, &mut out).unwrap();
    a.take(out);
    assert_eq!(status(a.outcome(&r)), UcclStatus::ErrNotAllowed);

    let mut out = Vec::new();
    a.st.inline_landed(5, 100, true, &mut out);
    a.st.inline_landed(6, 100, false, &mut out);
    a.take(out);
    assert_eq!(a.outbox.pop_front(), Some(Control::Done { xfer: 5, len: 100 }));
    assert!(matches!(a.outbox.pop_front(), Some(Control::Deny { xfer: 6, status: -6, .. })));
}

/// An inline message landed from the socket takes the oldest posted receive, as its frame would,
/// only when that receive holds it whole in host memory and no older message waits; the receive
/// and the send end together, a cut receive fails once, and a failure fails a receive taken.
#[test]
fn an_inline_message_landed_from_the_socket_takes_the_oldest_receive() {
    let mut b = End::new();
    let dst = b.buffer(8192, |_| 0);
    assert_eq!(b.st.inline_send_destination(1, 100).unwrap(), None, "no receive posted");
    let r = b.recv(&dst, 4096);
    assert_eq!(b.st.inline_send_destination(1, 4097).unwrap(), None, "larger than the receive");
    assert_eq!(b.st.inline_send_destination(1, 100).unwrap(), Some((dst.addr(), dst.region.id)));
    assert_eq!(b.st.inline_send_destination(2, 100).unwrap(), None, "one landing at a time");
    let mut out = Vec::new();
    assert!(b.st.inline_send_landed(2, 100, true, &mut out).is_err(), "not the message landing");
    b.st.inline_send_landed(1, 100, true, &mut out).unwrap();
    b.take(out);
    assert_eq!(b.outcome(&r).unwrap().unwrap(), 100);
    assert_eq!(b.outbox.pop_front(), Some(Control::Done { xfer: 1, len: 100 }));

    // Cut while its message lands: the receive fails at the cut, the send when the landing ends.
    let r = b.recv(&dst, 4096);
    assert!(b.st.inline_send_destination(3, 200).unwrap().is_some());
    b.cut(&dst).unwrap();
    assert_eq!(status(b.outcome(&r)), UcclStatus::ErrNotAllowed);
    let mut out = Vec::new();
    b.st.inline_send_landed(3, 200, false, &mut out).unwrap();
    b.take(out);
    assert!(matches!(b.outbox.pop_front(), Some(Control::Deny { xfer: 3, status: -6, .. })));

    // A connection failing while a message lands fails the receive taken for it.
    let dst = b.buffer(8192, |_| 0);
    let r = b.recv(&dst, 4096);
    assert!(b.st.inline_send_destination(4, 300).unwrap().is_some());
    let failed = b.st.fail(Error::backend("gone"));
    assert!(failed.iter().any(|t| t.id == r.id), "the receive taken is failed with the rest");
}

#[test]
fn an_engine_inlining_more_sends_host_transfers_up_to_its_bound_inline() {
    let (mut a, mut b) = (End::new(), End::new());
    a.st.set_inline_max(u64::MAX);
    assert_eq!(a.st.inline_max, MAX_INLINE_LEN as u64, "clamped to what a frame carries");
    let len = MAX_INLINE_LEN;
    let local = a.buffer(2 * len + 1, pattern(11));
    let remote = b.buffer(2 * len + 1, pattern(12));
    let w = a.one_sided(true, &[(&local, 0, &remote, 0, len)]);
    assert!(matches!(a.outbox.front(), Some(Control::InlineWrite { payload, .. }) if payload.len() == len));
    let r = a.one_sided(false, &[(&local, len, &remote, len, len)]);
    assert!(matches!(a.outbox.back(), Some(Control::ReadSmall { len: l, .. }) if *l == len as u64));
    pump(&mut a, &mut b);
    assert!(a.sending.is_empty() && b.receiving.is_empty(), "no flow on a channel");
    assert_eq!(a.outcome(&w).unwrap().unwrap(), len as u64);
    assert_eq!(a.outcome(&r).unwrap().unwrap(), len as u64);
    assert_eq!(&remote.bytes[..len], &local.bytes[..len]);
    assert_eq!(&local.bytes[len..2 * len], &remote.bytes[len..2 * len]);
    // Past the bound, and for the peer whatever its own bound, the request path.
    let big = a.one_sided(true, &[(&local, 0, &remote, 0, len + 1)]);
    assert!(matches!(a.outbox.front(), Some(Control::WriteRequest { .. })));
    let back = b.one_sided(true, &[(&remote, 0, &local, 0, INLINE_LEN_FLOOR + 1)]);
    assert!(matches!(b.outbox.front(), Some(Control::WriteRequest { .. })));
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&big).unwrap().unwrap(), len as u64 + 1);
    assert_eq!(b.outcome(&back).unwrap().unwrap(), INLINE_LEN_FLOOR as u64 + 1);
    // Sends follow the same bound: up to it inline, whether the receive comes first or second,
    // past it eagerly over the channels.
    let dsts: Vec<_> = (0..3).map(|_| b.buffer(len + 1, |_| 0)).collect();
    let first = b.recv(&dsts[0], len + 1);
    let s = a.send(&[(&local, 1, len), (&local, 2, len), (&local, 3, len + 1)]);
    assert!(
        matches!(&a.outbox.iter().collect::<Vec<_>>()[..], [
            Control::InlineSend { payload: p0, .. },
            Control::InlineSend { payload: p1, .. },
            Control::EagerSend { len: l2, .. },
        ] if p0.len() == len && p1.len() == len && *l2 == len as u64 + 1),
        "two inline sends of the bound, then an eager one"
    );
    deliver(&mut a, &mut b).unwrap();
    let later: Vec<_> = dsts[1..].iter().map(|d| b.recv(d, len + 1)).collect();
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&s).unwrap().unwrap(), 3 * len as u64 + 1);
    for (i, (r, d)) in std::iter::once(&first).chain(&later).zip(&dsts).enumerate() {
        let n = if i == 2 { len + 1 } else { len };
        assert_eq!(b.outcome(r).unwrap().unwrap(), n as u64, "receive {i}");
        assert_eq!(&d.bytes[..n], &local.bytes[1 + i..1 + i + n], "receive {i}");
    }
    assert_eq!((a.st.inline_send_backlog, b.st.announced_inline), (0, 0));
    // A bound below the floor is the floor, and device memory never goes past it.
    a.st.set_inline_max(0);
    assert_eq!(a.st.inline_max, INLINE_LEN_FLOOR as u64);
    assert_eq!(inline_limit(u64::MAX, MemKind::Cuda { device: 0 }), INLINE_LEN_FLOOR as u64);
}

#[test]
fn unanswered_inline_one_sided_bytes_are_bounded() {
    let (mut a, mut b) = (End::new(), End::new());
    let n = (MAX_INLINE_ONE_SIDED / INLINE_LEN_FLOOR as u64) as usize;
    let local = a.buffer(INLINE_LEN_FLOOR, pattern(9));
    let remotes = [b.buffer(INLINE_LEN_FLOOR, |_| 0), b.buffer(INLINE_LEN_FLOOR, |_| 0)];
    // A call of writes and reads, item by item (alternate remote regions: no two items form a
    // vector): the first `n` fill the bound, the rest take the request path.
    let items: Vec<_> = (0..n + 2).map(|i| (&local, 0, &remotes[i % 2], 0, INLINE_LEN_FLOOR)).collect();
    let w = a.one_sided(true, &items[..n - 1]);
    let r = a.one_sided(false, &items[..3]);
    let kinds: Vec<_> = a.outbox.iter().map(std::mem::discriminant).collect();
    let inline_write =
        std::mem::discriminant(&Control::InlineWrite { xfer: 0, region: 0, token: 0, addr: 0, payload: vec![] });
    assert!(kinds[..n - 1].iter().all(|k| *k == inline_write));
    assert!(matches!(a.outbox[n - 1], Control::ReadSmall { .. }), "the last inline byte goes to a small read");
    assert!(
        matches!(a.outbox[n], Control::ReadRequest { .. }) && matches!(a.outbox[n + 1], Control::ReadRequest { .. })
    );
    assert_eq!(a.st.inline_one_sided, MAX_INLINE_ONE_SIDED);
    assert!(w.completes_on_control() && !r.completes_on_control());
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&w).unwrap().unwrap(), ((n - 1) * INLINE_LEN_FLOOR) as u64);
    assert_eq!(a.outcome(&r).unwrap().unwrap(), (3 * INLINE_LEN_FLOOR) as u64);
    assert_eq!(a.st.inline_one_sided, 0, "answers give the bound back");
    a.one_sided(true, &items[..1]);
    assert!(matches!(a.outbox.back(), Some(Control::InlineWrite { .. })));
}

#[test]
fn unanswered_inline_sends_are_bounded_at_both_ends() {
    let (mut a, mut b) = (End::new(), End::new());
    let n = (MAX_INLINE_SEND_BACKLOG / INLINE_LEN_FLOOR as u64) as usize;
    let src = a.buffer(INLINE_LEN_FLOOR, pattern(10));
    let items: Vec<_> = (0..n + 1).map(|_| (&src, 0, INLINE_LEN_FLOOR)).collect();
    let s = a.send(&items);
    assert!(a.outbox.iter().take(n).all(|m| matches!(m, Control::InlineSend { .. })));
    assert!(matches!(a.outbox[n], Control::SendAnnounce { .. }), "past the bound a small send is announced");
    assert!(!s.completes_on_control());
    // The receiver buffers exactly the bound for receives not posted yet.
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.st.announced_inline, MAX_INLINE_SEND_BACKLOG);
    let dsts: Vec<_> = (0..n + 1).map(|_| b.buffer(INLINE_LEN_FLOOR, |_| 0)).collect();
    let recvs: Vec<_> = dsts.iter().map(|d| b.recv(d, INLINE_LEN_FLOOR)).collect();
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&s).unwrap().unwrap(), ((n + 1) * INLINE_LEN_FLOOR) as u64);
    for (r, d) in recvs.iter().zip(&dsts) {
        assert_eq!(b.outcome(r).unwrap().unwrap(), INLINE_LEN_FLOOR as u64);
        assert_eq!(d.bytes, src.bytes);
    }
    assert_eq!((a.st.inline_send_backlog, b.st.announced_inline), (0, 0));

    // A peer ignoring the bound is cut off.
    let payload = vec![0u8; INLINE_LEN_FLOOR];
    for xfer in 0..n as u64 {
        b.handle(Control::InlineSend { xfer, payload: payload.clone() }).unwrap();
    }
    let err = b.handle(Control::InlineSend { xfer: 99, payload: vec![1] }).unwrap_err();
    assert!(err.message().contains("unmatched sends would hold more than"), "{err}");
}

#[test]
fn unknown_ids_and_wrong_lengths_fail_the_connection() {
    let mut a = End::new();
    for msg in [
        Control::Grant { xfer: 7, flow: 1 },
        Control::Deny { xfer: 7, status: -6, reason: "no".into() },
        Control::Data { flow: 7, len: 1 },
        Control::Done { xfer: 7, len: 1 },
        Control::ReadData { xfer: 7, payload: vec![1] },
        Control::Resume { xfer: 7 },
    ] {
        let err = a.handle(msg.clone()).unwrap_err();
        assert!(err.message().contains("for unknown id 7"), "{msg:?}: {err}");
    }
    let b = End::new();
    let local = a.buffer(4 * CHUNK, |_| 0);
    let remote = b.buffer(4 * CHUNK, |_| 0);
    let read = a.one_sided(false, &[(&local, 0, &remote, 0, 4 * CHUNK)]);
    let small = a.one_sided(false, &[(&local, 0, &remote, 0, 8)]);
    let write = a.one_sided(true, &[(&local, 0, &remote, 0, 8)]);
    let ids: Vec<u64> = a
        .outbox
        .iter()
        .map(|m| match m {
            Control::ReadRequest { xfer, .. } | Control::ReadSmall { xfer, .. } | Control::InlineWrite { xfer, .. } => {
                *xfer
            }
            other => panic!("{other:?}"),
        })
        .collect();
    for (msg, what) in [
        (Control::Data { flow: ids[0], len: 4 * CHUNK as u64 + 1 }, "were granted"),
        (Control::ReadData { xfer: ids[1], payload: vec![0; 9] }, "were asked for"),
        (Control::Done { xfer: ids[2], len: 9 }, "expected 8"),
    ] {
        let err = a.handle(msg).unwrap_err();
        assert!(err.message().contains(what), "{err}");
    }
    // Still pending, so failing the connection fails them.
    let failed = a.st.fail(Error::backend("violation"));
    let mut ids: Vec<_> = failed.iter().map(|t| t.id).collect();
    ids.sort();
    assert_eq!(ids, [read.id, small.id, write.id]);
}

#[test]
fn too_many_unmatched_announces_fail_the_connection() {
    let mut b = End::new();
    for xfer in 0..MAX_UNMATCHED_ANNOUNCES as u64 {
        b.handle(Control::SendAnnounce { xfer, len: 1 << 20 }).unwrap();
    }
    let err = b.handle(Control::SendAnnounce { xfer: u64::MAX, len: 1 }).unwrap_err();
    assert!(err.message().contains("without matching receives"), "{err}");
}

#[test]
fn close_fails_the_connection_and_every_pending_part_once() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(8 * CHUNK, pattern(11));
    let remote = b.buffer(8 * CHUNK, |_| 0);
    let delivered_write = a.one_sided(true, &[(&local, 0, &remote, 0, 4 * CHUNK)]);
    pump_messages_only(&mut a, &mut b);
    assert_eq!(b.receiving.len(), 1, "the write runs");
    let posted_write = a.one_sided(true, &[(&local, 0, &remote, 0, 4 * CHUNK)]);
    let inline = a.one_sided(true, &[(&local, 0, &remote, 0, 10)]);
    let read = a.one_sided(false, &[(&local, 0, &remote, 0, 4 * CHUNK)]);
    let send = a.send(&[(&local, 0, 10)]);
    let recv = a.recv(&local, CHUNK);
    let err = a.handle(Control::Close).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect);
    let failed = a.st.fail(err.clone());
    let mut ids: Vec<_> = failed.iter().map(|t| t.id).collect();
    ids.sort();
    let mut expected = vec![delivered_write.id, posted_write.id, inline.id, read.id, send.id, recv.id];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(a.st.failure(), Some(&err));
    assert_eq!(a.st.begin_post(Instant::now()).unwrap_err(), err);
    assert!(a.st.fail(Error::backend("again")).is_empty(), "the first failure stays");
    assert!(!a.st.waits_on_peer());
}

/// Exchanges control messages both ways until none is left, moving no data.
fn pump_messages_only(a: &mut End, b: &mut End) {
    while deliver(a, b).unwrap() | deliver(b, a).unwrap() {}
}

#[test]
fn only_what_the_peers_engine_owes_can_stall() {
    let (mut a, mut b) = (End::new(), End::new());
    let timeout = Duration::from_millis(10);
    let start = Instant::now();
    let later = start + Duration::from_secs(1);
    let local = a.buffer(4 * CHUNK, pattern(12));
    let large = a.buffer(MAX_EAGER_LEN as usize + 1, pattern(12));
    let remote = b.buffer(4 * CHUNK, |_| 0);
    a.send(&[(&large, 0, MAX_EAGER_LEN as usize + 1)]);
    a.send(&[(&local, 0, 10)]);
    assert!(!a.st.stalled(later, timeout), "a send waits for the peer's user");
    // An eager send waits for the peer's engine until its bytes are out, then for its user.
    a.send(&[(&local, 0, 4 * CHUNK)]);
    assert!(a.st.stalled(later, timeout), "its chunks are owed to the peer's engine");
    deliver(&mut a, &mut b).unwrap();
    assert!(move_data(&mut a, &mut b));
    assert!(!a.st.stalled(later, timeout), "landed, it waits for a receive");
    assert!(!b.st.stalled(later, timeout), "and so does its receiver");
    a.one_sided(true, &[(&local, 0, &remote, 0, 4 * CHUNK)]);
    assert!(a.st.stalled(later, timeout), "a write waits for the peer's engine");
    a.st.heard(later);
    assert!(!a.st.stalled(later + timeout, timeout));
    assert!(a.st.stalled(later + 2 * timeout, timeout));
    pump(&mut a, &mut b);
}

#[test]
fn notifications_are_handed_on() {
    let mut a = End::new();
    a.handle(Control::Notify { name: b"n".to_vec(), msg: b"hello".to_vec() }).unwrap();
    assert_eq!(a.notes, [(b"n".to_vec(), b"hello".to_vec())]);
}

#[test]
fn flows_rotate_identically_on_both_ends() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(4 * CHUNK, pattern(13));
    let dst = b.buffer(4 * CHUNK, |_| 0);
    let ts: Vec<_> = (0..3).map(|i| a.one_sided(true, &[(&src, i * CHUNK, &dst, i * CHUNK, CHUNK + 1)])).collect();
    pump_messages_only(&mut a, &mut b);
    let seqs = |m: &BTreeMap<u64, FlowPlan>| m.values().map(|p| (p.seq, p.extent.len())).collect::<Vec<_>>();
    assert_eq!(seqs(&a.sending), seqs(&b.receiving));
    assert_eq!(seqs(&a.sending).iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2]);
    pump(&mut a, &mut b);
    for t in ts {
        assert_eq!(a.outcome(&t).unwrap().unwrap(), CHUNK as u64 + 1);
    }
}

fn not_allowed(outcome: Option<Result<u64>>) -> String {
    let err = outcome.expect("finished").expect_err("failed");
    assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{err}");
    err.message().to_owned()
}

#[test]
fn a_write_cut_at_the_target_drains_into_scratch_and_is_denied() {
    // Cut at two points: after the request arrived (its chunks are coming), and before.
    for stage in 0..2 {
        let (mut a, mut b) = (End::new(), End::new());
        let src = a.buffer(4 * CHUNK, pattern(20));
        let dst = b.buffer(4 * CHUNK, |_| 0);
        let t = a.one_sided(true, &[(&src, 0, &dst, 0, 4 * CHUNK)]);
        if stage == 0 {
            deliver(&mut a, &mut b).unwrap();
            assert_eq!(b.receiving.len(), 1);
        }
        b.cut(&dst).unwrap();
        pump(&mut a, &mut b);
        let why = not_allowed(a.outcome(&t));
        assert!(why.contains("deregistered"), "stage {stage}: {why}");
        assert!(dst.bytes.iter().all(|&x| x == 0), "stage {stage}: bytes landed after the cut");
        assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer(), "stage {stage}: something is left");
        assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    }
}

/// A read of four chunks of `b`'s buffer (bytes `pattern(seed)`) into `a`'s, its request taken:
/// `b` serves it as flow `served`, its chunks queued and none sent.
struct ServedRead {
    a: End,
    b: End,
    dst: Buf,
    src: Buf,
    t: Arc<Transfer>,
    xfer: u64,
    served: u64,
}

fn served_read(seed: u8) -> ServedRead {
    let (mut a, mut b) = (End::new(), End::new());
    let dst = a.buffer(4 * CHUNK, |_| 0);
    let src = b.buffer(4 * CHUNK, pattern(seed));
    let t = a.one_sided(false, &[(&dst, 0, &src, 0, 4 * CHUNK)]);
    let Some(&Control::ReadRequest { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    pump_messages_only(&mut a, &mut b);
    let served = b.sending.first_key_value().unwrap().1.flow;
    ServedRead { a, b, dst, src, t, xfer, served }
}

/// Every chunk of `b`'s four-chunk flow `served` goes to the transport and finishes there.
fn all_chunks_go(b: &mut End, served: u64) {
    let mut out = Vec::new();
    for _ in 0..4 {
        b.st.chunk_sent(served);
        b.st.chunk_finished(served, &b.mem, &mut out).unwrap();
    }
    b.take(out);
}

#[test]
fn a_read_cut_at_the_server_is_denied_before_its_remaining_chunks_go() {
    let ServedRead { mut a, mut b, dst, src, t, xfer, served } = served_read(21);
    // One chunk already went to the transport from the region; three have not.
    b.st.chunk_sent(served);
    b.cut(&src).unwrap();
    assert_eq!(b.held, [served]);
    assert!(matches!(b.outbox.front(), Some(Control::Deny { xfer: x, status: -6, .. }) if *x == xfer));
    // Held: the chunks cannot reach the reader before it saw the Deny.
    assert!(!move_data(&mut b, &mut a));
    deliver(&mut b, &mut a).unwrap();
    assert_eq!(a.outbox, [Control::Resume { xfer }]);
    assert!(a.outcome(&t).is_none(), "the chunks are still to come");
    deliver(&mut a, &mut b).unwrap();
    assert!(b.held.is_empty());
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&t));
    assert!(dst.bytes.iter().all(|&x| x == 0), "bytes of the cut region were served");
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    // A Resume for a read that is not held, or unknown, is a violation.
    let err = b.handle(Control::Resume { xfer }).unwrap_err();
    assert!(err.message().contains("unknown id"), "{err}");
    // Cut before the request arrived: refused outright.
    let src2 = b.buffer(4 * CHUNK, pattern(22));
    let t2 = a.one_sided(false, &[(&dst, 0, &src2, 0, 4 * CHUNK)]);
    b.cut(&src2).unwrap();
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&t2));
}

/// A cut read whose last chunks were already with the transport when the hold was asked ends at
/// the server before the reader's Resume comes: that Resume is owed and taken, once; a second is a
/// violation.
#[test]
fn a_resume_for_a_denied_read_that_ended_meanwhile_is_taken() {
    let ServedRead { a: _a, mut b, dst: _dst, src, xfer, served, .. } = served_read(24);
    b.cut(&src).unwrap();
    assert_eq!(b.held, [served]);
    // The channel had every chunk already: they all finish, and the flow with them.
    all_chunks_go(&mut b, served);
    b.handle(Control::Resume { xfer }).expect("the Resume the Deny asked for");
    let err = b.handle(Control::Resume { xfer }).unwrap_err();
    assert!(err.message().contains("unknown id"), "{err}");
}

/// The reader's twin: the server counted chunks unsent that its transport had taken, so its Deny
/// reaches a reader whose read already ended on them. The reader answers with the Resume the server
/// owes itself, and both ends stay open; a Deny for an id never made stays a violation.
#[test]
fn a_deny_for_a_read_that_ended_on_chunks_already_sent_is_answered() {
    let ServedRead { mut a, mut b, dst, src, t, xfer, served } = served_read(25);
    // The transport took every chunk from the region; the reader gets them all before the cut.
    let (_, plan) = a.receiving.pop_first().unwrap();
    let (r, plan_extent) = (plan.flow, plan.extent);
    // SAFETY: both extents lie in live test buffers of the same length.
    unsafe { scatter(&plan_extent, &gather(&b.sending.first_key_value().unwrap().1.extent)) };
    for _ in 0..4 {
        let mut out = Vec::new();
        a.st.chunk_finished(r, &a.mem, &mut out).unwrap();
        a.take(out);
    }
    assert_eq!(a.outcome(&t).expect("finished").expect("read"), 4 * CHUNK as u64);
    b.cut(&src).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::Deny { xfer: x, .. }) if *x == xfer));
    deliver(&mut b, &mut a).expect("a late Deny of an ended read");
    assert_eq!(a.outbox, [Control::Resume { xfer }]);
    all_chunks_go(&mut b, served);
    deliver(&mut a, &mut b).expect("the owed Resume");
    assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok());
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    assert!((0..4 * CHUNK).all(|i| dst.bytes[i] == pattern(25)(i)), "the read's bytes");
    let err = a.handle(Control::Deny { xfer: xfer + 1000, status: -6, reason: "no".into() }).unwrap_err();
    assert!(err.message().contains("unknown id"), "{err}");
}

#[test]
fn a_peer_reusing_a_served_read_id_or_resuming_unasked_fails_the_connection() {
    let (mut a, mut b) = (End::new(), End::new());
    let dst = a.buffer(4 * CHUNK, |_| 0);
    let src = b.buffer(4 * CHUNK, pattern(23));
    a.one_sided(false, &[(&dst, 0, &src, 0, 4 * CHUNK)]);
    let Some(Control::ReadRequest { xfer, region, token, addr, len }) = a.outbox.front().cloned() else { panic!() };
    deliver(&mut a, &mut b).unwrap();
    let err = b.handle(Control::Resume { xfer }).unwrap_err();
    assert!(err.message().contains("was not denied"), "{err}");
    let err = b.handle(Control::ReadRequest { xfer, region, token, addr, len }).unwrap_err();
    assert!(err.message().contains("reuses op id"), "{err}");
}

#[test]
fn small_reads_and_writes_see_the_cut() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(100, pattern(22));
    let remote = b.buffer(100, |_| 7);
    let r = a.one_sided(false, &[(&local, 0, &remote, 0, 100)]);
    deliver(&mut a, &mut b).unwrap();
    assert!(matches!(b.outbox.front(), Some(Control::ReadData { .. })));
    // The reply is on its way when the reader's own destination is cut: it is not stored.
    a.cut(&local).unwrap();
    deliver(&mut b, &mut a).unwrap();
    not_allowed(a.outcome(&r));
    assert!(local.bytes.iter().enumerate().all(|(i, &x)| x == pattern(22)(i)), "a cut destination was written");
    // An inline write reaching a cut region is refused before anything is stored.
    let src = a.buffer(100, pattern(23));
    let w = a.one_sided(true, &[(&src, 0, &remote, 0, 100)]);
    b.cut(&remote).unwrap();
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&w));
    assert!(remote.bytes.iter().all(|&x| x == 7));
}

#[test]
fn a_cut_receive_fails_at_once_and_refuses_its_send() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(4 * CHUNK, pattern(24));
    let cut = b.buffer(4 * CHUNK, |_| 0);
    let next = b.buffer(4 * CHUNK, |_| 0);
    let r1 = b.recv(&cut, 4 * CHUNK);
    let r2 = b.recv(&next, 4 * CHUNK);
    b.cut(&cut).unwrap();
    assert!(b.outcome(&r1).is_some(), "a cut receive fails at once");
    let s1 = a.send(&[(&src, 0, 4 * CHUNK)]);
    let s2 = a.send(&[(&src, 0, 100)]);
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&s1));
    assert_eq!(a.outcome(&s2).unwrap().unwrap(), 100, "the next send matches the next receive");
    assert_eq!(b.outcome(&r2).unwrap().unwrap(), 100);
    assert!(cut.bytes.iter().all(|&x| x == 0));
    // Failing the connection later does not finish the cut receive twice.
    assert!(b.st.fail(Error::backend("later")).is_empty());
}

#[test]
fn a_receive_cut_while_its_send_lands_fails_both() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(4 * CHUNK, pattern(25));
    let dst = b.buffer(4 * CHUNK, |_| 0);
    let r = b.recv(&dst, 4 * CHUNK);
    let s = a.send(&[(&src, 0, 4 * CHUNK)]);
    pump_messages_only(&mut a, &mut b);
    assert_eq!(b.receiving.len(), 1);
    b.cut(&dst).unwrap();
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&s));
    not_allowed(b.outcome(&r));
    assert!(dst.bytes.iter().all(|&x| x == 0));
}

#[test]
fn local_sources_and_destinations_cut_mid_transfer() {
    // Our write's source: the rest goes out as zeros and the write fails.
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(4 * CHUNK, pattern(26));
    let dst = b.buffer(4 * CHUNK, |_| 0);
    let w = a.one_sided(true, &[(&src, 0, &dst, 0, 4 * CHUNK)]);
    pump_messages_only(&mut a, &mut b);
    a.cut(&src).unwrap();
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&w));
    assert!(dst.bytes.iter().all(|&x| x == 0), "bytes of the cut source went out");
    // Our read's destination: nothing lands, the read fails.
    let rd = a.buffer(4 * CHUNK, |_| 0);
    let rs = b.buffer(4 * CHUNK, pattern(27));
    let r = a.one_sided(false, &[(&rd, 0, &rs, 0, 4 * CHUNK)]);
    a.cut(&rd).unwrap();
    pump(&mut a, &mut b);
    not_allowed(a.outcome(&r));
    assert!(rd.bytes.iter().all(|&x| x == 0));
    // Our send's source, announced or running: its receiver could not be told, so the connection
    // must fail.
    for (len, running) in [(2 << 20, false), (2 << 20, true), (4 * CHUNK, true)] {
        let (mut a, mut b) = (End::new(), End::new());
        let src = a.buffer(len, pattern(28));
        let dst = b.buffer(len, |_| 0);
        a.send(&[(&src, 0, len)]);
        if running && len > MAX_EAGER_LEN as usize {
            b.recv(&dst, len);
        }
        pump_messages_only(&mut a, &mut b);
        assert_eq!(a.sending.len(), usize::from(running), "{len}");
        let err = a.cut(&src).unwrap_err();
        assert!(err.message().contains("connection fails"), "{err}");
    }
}

#[test]
fn posts_naming_a_deregistered_region_register_nothing() {
    let (mut a, b) = (End::new(), End::new());
    let buf = a.buffer(4 * CHUNK, pattern(29));
    let remote = b.buffer(4 * CHUNK, |_| 0);
    a.mem.regions.remove(buf.region.id).unwrap();
    let t = a.transfer(1);
    let item = |payload| OneSidedItem {
        region: buf.region.clone(),
        addr: buf.addr(),
        len: 10,
        remote_region: remote.cap.region,
        token: remote.cap.token,
        remote_addr: remote.addr() as u64,
        payload,
    };
    let mut out = Vec::new();
    let err =
        a.st.post_one_sided(&t, true, vec![OneSidedRequest::Item(item(Some(vec![0; 10])))], &mut out).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrNotFound);
    let send = SendItem { region: buf.region.clone(), addr: buf.addr(), len: 10, payload: None, ipc: None };
    assert!(a.st.post_send(&t, vec![send], &mut Vec::new()).is_err());
    assert!(a.st.post_recv(&t, buf.region.clone(), buf.addr(), 10, &a.mem, &mut out).is_err());
    assert!(out.is_empty() && !a.st.waits_on_peer() && a.st.fail(Error::backend("x")).is_empty());
}

#[test]
fn a_peer_denying_a_running_write_fails_it_after_its_chunks() {
    let (mut a, mut b) = (End::new(), End::new());
    let src = a.buffer(4 * CHUNK, pattern(30));
    let dst = b.buffer(4 * CHUNK, |_| 0);
    let t = a.one_sided(true, &[(&src, 0, &dst, 0, 4 * CHUNK)]);
    let Some(&Control::WriteRequest { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    pump_messages_only(&mut a, &mut b);
    a.handle(Control::Deny { xfer, status: -6, reason: "cut".into() }).unwrap();
    assert!(a.outcome(&t).is_none(), "the local chunks are still in flight");
    let plan = a.sending.pop_first().unwrap().1;
    for _ in 0..4 {
        let mut out = Vec::new();
        a.st.chunk_finished(plan.flow, &a.mem, &mut out).unwrap();
        a.take(out);
    }
    let why = not_allowed(a.outcome(&t));
    assert!(why.contains("peer refused: cut"), "{why}");
    // A second answer for the same op is a protocol violation.
    assert!(a.handle(Control::Done { xfer, len: 4 * CHUNK as u64 }).is_err());
}

/// Items of the given lengths, scattered: the local ones `lgap` bytes apart, the remote ones
/// `rgap` apart, in buffers big enough.
fn scattered_items<'a>(
    local: &'a Buf,
    remote: &'a Buf,
    lens: &[usize],
    lgap: usize,
    rgap: usize,
) -> Vec<(&'a Buf, usize, &'a Buf, usize, usize)> {
    let (mut lo, mut ro) = (0, 0);
    lens.iter()
        .map(|&len| {
            let item = (local, lo, remote, ro, len);
            lo += len + lgap;
            ro += len + rgap;
            assert!(lo <= local.bytes.len() + lgap && ro <= remote.bytes.len() + rgap, "test buffers too small");
            item
        })
        .collect()
}

/// Whether every item's remote bytes equal its local bytes (`write`) or the other way round.
fn items_match(items: &[(&Buf, usize, &Buf, usize, usize)]) -> bool {
    items.iter().all(|&(l, lo, r, ro, len)| l.bytes[lo..lo + len] == r.bytes[ro..ro + len])
}

/// Odd sizes: below and above a page, not page multiples, a chunk and a bit, crossing chunk
/// boundaries of the flow at odd offsets.
const ODD_LENS: [usize; 9] = [1, 4095, 4097, 16 << 10, CHUNK + 3, 777, 3 * CHUNK - 1, 64 << 10, 12_345];

#[test]
fn a_vector_write_is_one_request_and_one_flow_into_every_segment() {
    for cut in [Cut::Spanning, Cut::PerSegment] {
        let (mut a, mut b) = (End::with_cut(cut), End::with_cut(cut));
        let total: usize = ODD_LENS.iter().sum();
        let local = a.buffer(total + ODD_LENS.len() * 100, pattern(21));
        let remote = b.buffer(total + ODD_LENS.len() * 4099, |_| 0);
        let items = scattered_items(&local, &remote, &ODD_LENS, 100, 4099);
        let t = a.one_sided(true, &items);
        let [Control::WriteVector { segs, region, token, .. }] = a.outbox.make_contiguous() else {
            panic!("one request for the whole vector: {:?}", a.outbox.len())
        };
        assert_eq!((*region, *token, segs.len()), (remote.cap.region, remote.cap.token, ODD_LENS.len()));
        assert_eq!(segs[1], RemoteSeg { addr: (remote.addr() + 1 + 4099) as u64, len: 4095 });
        assert_eq!(a.sending.len(), 1, "one flow, queued with the request");
        deliver(&mut a, &mut b).unwrap();
        assert!(b.outbox.is_empty(), "{:?}", b.outbox);
        assert_eq!(b.receiving.values().map(|p| p.extent.len()).collect::<Vec<_>>(), [total as u64]);
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), total as u64, "{cut:?}");
        assert!(items_match(&items), "{cut:?}");
        // Only the segments were written.
        let mut covered = vec![false; remote.bytes.len()];
        for &(_, _, _, ro, len) in &items {
            covered[ro..ro + len].fill(true);
        }
        assert!(remote.bytes.iter().zip(&covered).all(|(&x, &c)| c || x == 0), "{cut:?}");
        assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    }
}

#[test]
fn a_vector_read_is_one_request_and_one_flow_back() {
    for cut in [Cut::Spanning, Cut::PerSegment] {
        let (mut a, mut b) = (End::with_cut(cut), End::with_cut(cut));
        let total: usize = ODD_LENS.iter().sum();
        let local = a.buffer(total + ODD_LENS.len() * 33, |_| 0);
        let remote = b.buffer(total + ODD_LENS.len() * 5000, pattern(22));
        let items = scattered_items(&local, &remote, &ODD_LENS, 33, 5000);
        let t = a.one_sided(false, &items);
        assert!(
            matches!(a.outbox.make_contiguous(), [Control::ReadVector { segs, .. }] if segs.len() == ODD_LENS.len())
        );
        deliver(&mut a, &mut b).unwrap();
        assert!(matches!(b.outbox.make_contiguous(), [Control::Data { len, .. }] if *len == total as u64));
        assert_eq!(b.sending.len(), 1, "one flow");
        pump(&mut a, &mut b);
        assert_eq!(a.outcome(&t).unwrap().unwrap(), total as u64, "{cut:?}");
        assert!(items_match(&items), "{cut:?}");
    }
}

#[test]
fn a_vector_with_one_segment_outside_the_window_fails_whole_and_touches_nothing() {
    for write in [true, false] {
        let (mut a, mut b) = (End::new(), End::new());
        let local = a.buffer(64 << 10, pattern(23));
        let remote = b.buffer(64 << 10, |_| 0);
        let before = local.bytes.clone();
        let mut items = scattered_items(&local, &remote, &[1024; 20], 0, 1024);
        // The last segment runs past the advertised window (the whole buffer).
        items.push((&local, 40 << 10, &remote, (64 << 10) - 100, 4096));
        let t = a.one_sided(write, &items);
        assert_eq!(a.outbox.len(), 1);
        deliver(&mut a, &mut b).unwrap();
        if write {
            // The chunks are on their way: received into scratch memory, nowhere in the region.
            let [(_, plan)] = b.receiving.iter().collect::<Vec<_>>()[..] else { panic!("{:?}", b.receiving) };
            assert!(plan.region.is_none(), "a refused write lands in scratch memory");
            let Extent::Scattered { segs, len, .. } = &plan.extent else { panic!("{:?}", plan.extent) };
            assert!(segs.iter().all(|s| s.addr == 0) && *len == (20 * 1024 + 4096) as u64, "{segs:?}");
            assert!(b.outbox.is_empty(), "the Deny waits for the chunks");
        } else {
            assert!(b.receiving.is_empty() && b.sending.is_empty(), "no flow was started");
        }
        pump(&mut a, &mut b);
        assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed, "write {write}");
        assert!(remote.bytes.iter().all(|&x| x == 0), "the target is untouched");
        assert_eq!(local.bytes, before, "nothing was read into the local buffer either");
        assert_eq!(b.st.refused_chunks, 0, "the scratch flow is through");
        assert!(a.st.check_open().is_ok() && b.st.check_open().is_ok(), "a refusal is not a protocol error");
        assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer());
    }
}

#[test]
fn a_call_over_two_remote_regions_is_two_vectors_of_one_transfer() {
    let (mut a, mut b) = (End::new(), End::new());
    let local = a.buffer(256 << 10, pattern(24));
    let (r1, r2) = (b.buffer(256 << 10, |_| 0), b.buffer(256 << 10, |_| 0));
    let mut items = scattered_items(&local, &r1, &[20_000; 4], 100, 7);
    items.extend(
        scattered_items(&local, &r2, &[30_000; 3], 200, 9)
            .into_iter()
            .map(|(l, lo, r, ro, n)| (l, lo + 100_000, r, ro, n)),
    );
    let t = a.one_sided(true, &items);
    assert_eq!(a.outbox.len(), 2, "one request per remote region");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), 170_000);
    assert!(items_match(&items));
}

#[test]
fn a_hundred_thousand_items_post_a_few_requests_and_no_entry_per_item() {
    let (mut a, mut b) = (End::new(), End::new());
    let n = 100_000;
    let local = a.buffer(n * 8, pattern(25));
    let remote = b.buffer(n * 16, |_| 0);
    let items = scattered_items(&local, &remote, &vec![8; n], 0, 8);
    let t = a.one_sided(true, &items);
    let counts: Vec<usize> = a
        .outbox
        .iter()
        .map(|m| match m {
            Control::WriteVector { segs, .. } => segs.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    let requests = n.div_ceil(REQUEST_SEGMENTS);
    assert_eq!(counts.len(), requests);
    assert!(counts.iter().all(|&c| c <= REQUEST_SEGMENTS) && counts.iter().sum::<usize>() == n);
    assert_eq!((a.st.awaiting_done.len(), a.st.inline_ops.len(), a.st.inbound.len()), (requests, 0, 0));
    assert_eq!(a.sending.len(), requests, "one flow per request, started with it");
    pump(&mut a, &mut b);
    assert_eq!(a.outcome(&t).unwrap().unwrap(), (n * 8) as u64);
    assert!(items_match(&items));
}

#[test]
fn data_for_a_vector_flow_must_carry_its_total() {
    let (mut a, b) = (End::new(), End::new());
    let local = a.buffer(1 << 20, |_| 0);
    let remote = b.buffer(1 << 20, pattern(26));
    let items = scattered_items(&local, &remote, &[100_000; 3], 10, 10);
    let t = a.one_sided(false, &items);
    let Some(&Control::ReadVector { xfer, .. }) = a.outbox.front() else { panic!("{:?}", a.outbox) };
    let err = a.handle(Control::Data { flow: xfer, len: 100_000 }).unwrap_err();
    assert!(err.message().contains("300000 were granted"), "{err}");
    let failed = a.st.fail(err);
    assert_eq!(failed.iter().map(|f| f.id).collect::<Vec<_>>(), [t.id], "failing the connection fails the read");
    assert!(a.receiving.is_empty(), "nothing was queued for the wrong length");
}

/// What one end does in an interleaving script.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A writes to B (a flow A -> B, numbered when A posts it).
    AWrites,
    /// A writes a vector of two items to B (one flow A -> B).
    AWritesVector,
    /// A writes 100 bytes inline (no flow).
    AWritesInline,
    /// B reads from A (a flow A -> B, numbered when A serves the request).
    BReads,
    /// B posts a receive and A a send (a flow A -> B, numbered when A handles B's Grant).
    ASends,
    /// B writes to A (a flow B -> A).
    BWrites,
    /// The messages one end has queued reach the other.
    DeliverAtoB,
    DeliverBtoA,
}

/// Runs `script` between two fresh ends, then lets everything finish, and checks that every flow
/// paired with its own counterpart (lengths differ per kind, bytes per pattern) and every
/// transfer delivered its bytes.
fn run_interleaving(script: &[Step]) {
    use Step::*;
    let (mut a, mut b) = (End::new(), End::new());
    let a_src = a.buffer(16 * CHUNK, pattern(50));
    let a_dst = a.buffer(16 * CHUNK, |_| 0);
    let b_src = b.buffer(16 * CHUNK, pattern(51));
    let b_dst = b.buffer(16 * CHUNK, |_| 0);
    let b_back = b.buffer(16 * CHUNK, |_| 0);
    let b_recv = b.buffer(16 * CHUNK, |_| 0);
    let mut done: Vec<Expected> = Vec::new();
    for &step in script {
        match step {
            AWrites => {
                let len = 3 * CHUNK + 1;
                let t = a.one_sided(true, &[(&a_src, 0, &b_dst, 0, len)]);
                done.push(Expected::new(true, t, [(a_src.addr(), b_dst.addr(), len)]));
            }
            AWritesVector => {
                let items =
                    [(&a_src, CHUNK, &b_dst, 5 * CHUNK, CHUNK + 7), (&a_src, 9, &b_dst, 8 * CHUNK, 2 * CHUNK + 3)];
                let t = a.one_sided(true, &items);
                assert!(matches!(a.outbox.back(), Some(Control::WriteVector { .. })), "{:?}", a.outbox);
                let (s, d) = (a_src.addr(), b_dst.addr());
                let ranges = [(s + CHUNK, d + 5 * CHUNK, CHUNK + 7), (s + 9, d + 8 * CHUNK, 2 * CHUNK + 3)];
                done.push(Expected::new(true, t, ranges));
            }
            AWritesInline => {
                let t = a.one_sided(true, &[(&a_src, 77, &b_dst, 12 * CHUNK, 100)]);
                done.push(Expected::new(true, t, [(a_src.addr() + 77, b_dst.addr() + 12 * CHUNK, 100)]));
            }
            BReads => {
                let len = 2 * CHUNK + 5;
                let t = b.one_sided(false, &[(&b_back, 0, &a_src, 3, len)]);
                done.push(Expected::new(false, t, [(a_src.addr() + 3, b_back.addr(), len)]));
            }
            ASends => {
                let len = 4 * CHUNK + 9;
                b.recv(&b_recv, 8 * CHUNK);
                let t = a.send(&[(&a_src, 11, len)]);
                done.push(Expected::new(true, t, [(a_src.addr() + 11, b_recv.addr(), len)]));
            }
            BWrites => {
                let len = 5 * CHUNK + 2;
                let t = b.one_sided(true, &[(&b_src, 0, &a_dst, 0, len)]);
                done.push(Expected::new(false, t, [(b_src.addr(), a_dst.addr(), len)]));
            }
            DeliverAtoB => {
                deliver(&mut a, &mut b).unwrap();
            }
            DeliverBtoA => {
                deliver(&mut b, &mut a).unwrap();
            }
        }
    }
    pump_messages_only(&mut a, &mut b);
    // Both ends numbered the same flows alike, in each direction.
    let shape = |m: &BTreeMap<u64, FlowPlan>| m.values().map(|p| (p.seq, p.extent.len())).collect::<Vec<_>>();
    assert_eq!(shape(&a.sending), shape(&b.receiving), "{script:?}");
    assert_eq!(shape(&b.sending), shape(&a.receiving), "{script:?}");
    pump(&mut a, &mut b);
    for e in &done {
        let end = if e.on_a { &a } else { &b };
        let len: usize = e.ranges.iter().map(|r| r.2).sum();
        assert_eq!(end.outcome(&e.transfer).expect("finished").expect("succeeded"), len as u64, "{script:?}");
        for &(src, dst, n) in &e.ranges {
            assert!(same(src, dst, n), "{script:?}: transfer {} moved the wrong bytes", e.transfer.id);
        }
    }
    assert!(!a.st.waits_on_peer() && !b.st.waits_on_peer(), "{script:?}");
}

/// A transfer of an interleaving script: which end posted it, and the byte ranges it was to move,
/// `(source, destination, length)`.
struct Expected {
    on_a: bool,
    transfer: Arc<Transfer>,
    ranges: Vec<(usize, usize, usize)>,
}

impl Expected {
    fn new<const N: usize>(on_a: bool, transfer: Arc<Transfer>, ranges: [(usize, usize, usize); N]) -> Expected {
        Expected { on_a, transfer, ranges: ranges.to_vec() }
    }
}

/// Whether `len` bytes at `a` and at `b` (in live test buffers) are equal.
fn same(a: usize, b: usize, len: usize) -> bool {
    // SAFETY: both ranges lie in test buffers that outlive the check.
    unsafe { std::slice::from_raw_parts(a as *const u8, len) == std::slice::from_raw_parts(b as *const u8, len) }
}

#[test]
fn flows_of_every_kind_pair_up_whichever_order_their_messages_cross() {
    use Step::*;
    let scripts: &[&[Step]] = &[
        // A's write numbered before the read it serves and the send B grants, and after them.
        &[AWrites, BReads, ASends, DeliverBtoA, DeliverAtoB, DeliverBtoA, AWritesVector],
        &[BReads, ASends, DeliverBtoA, DeliverAtoB, DeliverBtoA, AWrites, AWritesVector],
        // The Grant and the ReadRequest reach A between two of its writes; B writes meanwhile.
        &[ASends, DeliverAtoB, BReads, BWrites, AWrites, DeliverBtoA, AWritesVector, AWritesInline, DeliverAtoB],
        &[ASends, DeliverAtoB, AWritesVector, BWrites, BReads, AWritesInline, DeliverBtoA, AWrites],
        // Writes crossing in both directions, each end's requests arriving after its peer posted.
        &[AWrites, BWrites, BReads, DeliverAtoB, AWritesVector, DeliverBtoA, ASends, DeliverBtoA],
        &[BWrites, BReads, AWrites, DeliverBtoA, DeliverAtoB, AWritesInline, ASends, AWritesVector],
    ];
    for script in scripts {
        run_interleaving(script);
    }
}

#[test]
fn a_peer_whose_refused_writes_pass_their_bound_is_cut_off() {
    let mut b = End::new();
    let target = b.buffer(4096, |_| 0);
    let (region, token) = (target.cap.region, target.cap.token ^ 1);
    let per_request = crate::proto::MAX_VECTOR_BYTES.div_ceil(CHUNK as u64) as usize;
    let fits = MAX_REFUSED_CHUNKS / per_request;
    for xfer in 0..fits as u64 {
        let write = Control::WriteRequest { xfer, region, token, addr: 1 << 40, len: crate::proto::MAX_VECTOR_BYTES };
        b.handle(write).unwrap();
    }
    assert_eq!(b.st.refused_chunks, fits * per_request);
    assert!(b.receiving.values().all(|p| p.region.is_none()), "every chunk goes to scratch memory");
    assert!(b.outbox.is_empty(), "each Deny waits for its chunks");
    let err =
        b.handle(Control::WriteRequest { xfer: 999, region, token, addr: 1 << 40, len: CHUNK as u64 }).unwrap_err();
    assert!(err.message().contains("refused writes"), "{err}");
    // Draining a refused write gives its room back and answers it with a Deny.
    let (mut b, mut a) = (End::new(), End::new());
    let target = b.buffer(4096, |_| 0);
    let src = a.buffer(2 * CHUNK, pattern(52));
    let forged = b.forged(&target);
    let t = a.one_sided(true, &[(&src, 0, &forged, 0, 2 * CHUNK)]);
    deliver(&mut a, &mut b).unwrap();
    assert_eq!(b.st.refused_chunks, 2);
    pump(&mut a, &mut b);
    assert_eq!(b.st.refused_chunks, 0);
    assert_eq!(status(a.outcome(&t)), UcclStatus::ErrNotAllowed);
    assert!(target.bytes.iter().all(|&x| x == 0) && forged.bytes.iter().all(|&x| x == 0));
}
