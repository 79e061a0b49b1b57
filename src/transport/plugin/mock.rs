//! An in-process ncclNet v7 table for unit tests, written in Rust: loopback comms that enforce
//! TCPX's rules and record every violation instead of crashing. Receives land in a host bounce pool
//! in reversed fragments with `loadMeta`s, like a devmem NIC. Handles, comms and requests are ids,
//! never pointers, so a misbehaving caller cannot make the mock touch freed memory.
//!
//! Every entry notes the thread inside it for a moment longer than its work takes, and a second
//! thread arriving meanwhile is recorded in [`overlaps`]: TCPX takes no lock of its own, so a
//! consumer must never have two threads inside the plugin at once.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::gather::{self, Run};
use super::gpu::BatchUnpack;
use super::loader::Plugin;
use crate::cuda::unpack::{DstPiece, ReceiveLayout, Submit};
use crate::ncclnet::*;

const HANDLE_MAGIC: u64 = 0x4D4F_434B_4E45_5431;
const CONNECT_MARK: u64 = 0xC0FF_EE00_C0FF_EE00;
/// Bytes of pool per unpack slot; the mock's messages stay below it.
pub const SLOT_POOL: usize = 64 << 10;
/// Fragment length: not a page, so fragments start at every alignment.
const FRAGMENT: usize = 1000;

#[derive(Default)]
pub struct Pair {
    /// Messages sent and not yet received, oldest first.
    wire: VecDeque<Vec<u8>>,
    connect_polls: u32,
    connected: bool,
    accept_polls: u32,
    accepted: bool,
    pub violations: Vec<String>,
    /// Calls the caller made, by entry name.
    pub calls: HashMap<&'static str, usize>,
    /// The next receive test fails with this rc after logging a warning.
    pub fail_next_recv_test: Option<c_int>,
    /// When set, a send test reports done only after this many polls.
    pub send_polls_to_finish: u32,
    pub live_mrs: usize,
    pub cuda_regs: Vec<(usize, usize)>,
    pub closed_with_outstanding: usize,
    pub listen_closed: bool,
}

struct Req {
    id: u64,
    recv: bool,
    done: bool,
    polls: u32,
}

struct Comm {
    pair: u64,
    requests: VecDeque<Req>,
    next_req: u64,
    /// Receives only: the unpack queue, its device handle and the pool.
    meta: Box<NetUnpackMeta>,
    handle: Box<UnpackDeviceHandle>,
    pool: Vec<u8>,
}

// SAFETY: the device handle points into the same comm's own boxed queue and pool; all of it is
// only touched under STATE's lock.
unsafe impl Send for Comm {}

#[derive(Default)]
struct State {
    pairs: HashMap<u64, Pair>,
    /// Listen comm id -> pair id.
    listens: HashMap<u64, u64>,
    comms: HashMap<u64, Comm>,
    logger: NcclDebugLogger,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
/// Threads inside an entry right now.
static INSIDE: AtomicUsize = AtomicUsize::new(0);
/// One line per entry that found another thread already inside.
static OVERLAPS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// How long an entry keeps its thread inside beyond its work: wide enough that unserialised callers
/// meet there (each entry's real work is a few microseconds under one lock).
const DWELL: Duration = Duration::from_micros(30);

/// A thread inside entry `name` until dropped.
struct Inside(&'static str);

impl Inside {
    fn enter(name: &'static str) -> Inside {
        let before = INSIDE.fetch_add(1, Ordering::AcqRel);
        if before > 0 {
            OVERLAPS.lock().push(format!("{name} entered while {before} other call(s) were inside the plugin"));
        }
        Inside(name)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        std::thread::sleep(DWELL);
        let after = INSIDE.fetch_sub(1, Ordering::AcqRel) - 1;
        if after > 0 {
            OVERLAPS.lock().push(format!("{} left while {after} other call(s) were inside the plugin", self.0));
        }
    }
}

/// Every time two threads were inside the mock at once, since the process started.
pub fn overlaps() -> Vec<String> {
    OVERLAPS.lock().clone()
}
static NEXT_ID: AtomicU64 = AtomicU64::new(0x1000);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    f(STATE.lock().get_or_insert_with(State::default))
}

/// Runs `f` on the pair's record (a test inspects or arms it).
pub fn pair<R>(id: u64, f: impl FnOnce(&mut Pair) -> R) -> R {
    with(|s| f(s.pairs.get_mut(&id).expect("known pair")))
}

/// The pair a listen handle belongs to.
pub fn pair_of_handle(handle: &[u8; 128]) -> u64 {
    u64::from_le_bytes(handle[8..16].try_into().unwrap())
}

fn warn(s: &State, msg: &str) {
    if let Some(log) = s.logger {
        let text = std::ffi::CString::new(msg).unwrap();
        // SAFETY: the logger given to init; "%s" with one C string.
        unsafe { log(NCCL_LOG_WARN, 16, c"mock.rs".as_ptr(), 1, c"%s".as_ptr(), text.as_ptr()) };
    }
}

fn violation(s: &mut State, pair: u64, what: String) -> NcclResult {
    warn(s, &format!("mock violation: {what}"));
    if let Some(p) = s.pairs.get_mut(&pair) {
        p.violations.push(what);
    }
    NCCL_INTERNAL_ERROR
}

fn count(s: &mut State, pair: u64, entry: &'static str) {
    if let Some(p) = s.pairs.get_mut(&pair) {
        *p.calls.entry(entry).or_default() += 1;
    }
}

unsafe extern "C" fn init(logger: NcclDebugLogger) -> NcclResult {
    let _inside = Inside::enter("init");
    with(|s| s.logger = logger);
    NCCL_SUCCESS
}

unsafe extern "C" fn devices(n: *mut c_int) -> NcclResult {
    let _inside = Inside::enter("devices");
    // SAFETY: the ncclNet v7 contract gives devices a writable int; the plugin adapter passes a local.
    unsafe { *n = 1 };
    NCCL_SUCCESS
}

unsafe extern "C" fn get_properties(dev: c_int, props: *mut NcclNetPropertiesV7) -> NcclResult {
    let _inside = Inside::enter("get_properties");
    if dev != 0 {
        return NCCL_INVALID_ARGUMENT;
    }
    // SAFETY: dev is 0 (checked above) and v7 gives getProperties a writable properties struct of the
    // caller's.
    unsafe {
        *props = NcclNetPropertiesV7 {
            name: c"mock0".as_ptr().cast_mut(),
            pci_path: std::ptr::null_mut(),
            guid: 0,
            ptr_support: NCCL_PTR_HOST | NCCL_PTR_CUDA,
            speed: 100_000,
            port: 0,
            latency: 0.0,
            max_comms: 1024,
            max_recvs: 1,
            net_device_type: NCCL_NET_DEVICE_UNPACK,
            net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
        }
    };
    NCCL_SUCCESS
}

unsafe extern "C" fn listen(_dev: c_int, handle: *mut c_void, lc: *mut *mut c_void) -> NcclResult {
    let _inside = Inside::enter("listen");
    let (pair, listen) = (next_id(), next_id());
    with(|s| {
        s.pairs.insert(pair, Pair::default());
        s.listens.insert(listen, pair);
    });
    let h = handle.cast::<u8>();
    // SAFETY: v7's listen gets a 128-byte (NCCL_NET_HANDLE_MAXSIZE) handle buffer and a writable listen-comm
    // slot; every write here lies in the first 88 bytes.
    unsafe {
        std::ptr::write_bytes(h, 0, 128);
        std::ptr::copy_nonoverlapping(HANDLE_MAGIC.to_le_bytes().as_ptr(), h, 8);
        std::ptr::copy_nonoverlapping(pair.to_le_bytes().as_ptr(), h.add(8), 8);
        // TCPX ships a pointer-sized field here; make it non-zero so a copy that keeps it is caught.
        std::ptr::copy_nonoverlapping(0xDEADu64.to_le_bytes().as_ptr(), h.add(80), 8);
        *lc = listen as *mut c_void;
    }
    NCCL_SUCCESS
}

unsafe extern "C" fn connect(
    _dev: c_int,
    handle: *mut c_void,
    sc: *mut *mut c_void,
    _dev_comm: *mut *mut NcclNetDeviceHandleV7,
) -> NcclResult {
    let _inside = Inside::enter("connect");
    let h = handle.cast::<u8>();
    // SAFETY: h is the caller's 128-byte connect handle and off is 0, 8 or 80, so each 8-byte read stays
    // inside it; read_unaligned because alignment is only checked below.
    let read = |off: usize| unsafe { std::ptr::read_unaligned(h.add(off).cast::<u64>()) };
    let (magic, pair, state) = (read(0), read(8), read(80));
    with(|s| {
        count(s, pair, "connect");
        if magic != HANDLE_MAGIC || !s.pairs.contains_key(&pair) {
            return violation(s, pair, "connect with a handle no listen produced".into());
        }
        if !(handle as usize).is_multiple_of(8) {
            return violation(s, pair, "connect handle is not 8-byte aligned".into());
        }
        let p = s.pairs.get_mut(&pair).unwrap();
        match (p.connect_polls, state) {
            (0, 0) => {}
            (0, _) => {
                return violation(s, pair, format!("first connect on a handle with state {state:#x} at offset 80"));
            }
            (_, CONNECT_MARK) => {}
            (_, _) => return violation(s, pair, "connect polled with a different handle buffer".into()),
        }
        p.connect_polls += 1;
        // SAFETY: h is the caller's 128-byte handle, so bytes 80..88 lie inside it (alignment is not
        // assumed).
        unsafe { std::ptr::write_unaligned(h.add(80).cast::<u64>(), CONNECT_MARK) };
        // Asynchronous, like TCPX: the first poll only starts the connection.
        if p.connect_polls < 2 {
            // SAFETY: v7's connect gets a writable send-comm slot from its caller.
            unsafe { *sc = std::ptr::null_mut() };
            return NCCL_SUCCESS;
        }
        p.connected = true;
        let id = next_id();
        s.comms.insert(id, new_comm(pair));
        // SAFETY: v7's connect gets a writable send-comm slot from its caller.
        unsafe { *sc = id as *mut c_void };
        NCCL_SUCCESS
    })
}

fn new_comm(pair: u64) -> Comm {
    // SAFETY: NetUnpackMeta is plain integers; all-zero is a valid value. Boxed: 512 KiB.
    let meta: Box<NetUnpackMeta> = unsafe {
        let layout = std::alloc::Layout::new::<NetUnpackMeta>();
        Box::from_raw(std::alloc::alloc_zeroed(layout).cast())
    };
    let mut c = Comm {
        pair,
        requests: VecDeque::new(),
        next_req: 0,
        meta,
        handle: Box::new(UnpackDeviceHandle {
            meta: std::ptr::null_mut(),
            bounce_buf: std::ptr::null_mut(),
            head: u64::MAX,
        }),
        pool: vec![0u8; SLOT_POOL * UNPACK_QUEUE_DEPTH],
    };
    c.handle.meta = &mut *c.meta;
    c.handle.bounce_buf = c.pool.as_mut_ptr().cast();
    c
}

unsafe extern "C" fn accept(
    lc: *mut c_void,
    rc: *mut *mut c_void,
    dev_comm: *mut *mut NcclNetDeviceHandleV7,
) -> NcclResult {
    let _inside = Inside::enter("accept");
    with(|s| {
        let pair = *s.listens.get(&(lc as u64)).expect("a listen comm this mock made");
        count(s, pair, "accept");
        // SAFETY: dev_comm is non-null (checked first in this condition) and v7 passes it pointing at the
        // caller's handle pointer.
        if dev_comm.is_null() || unsafe { (*dev_comm).is_null() } {
            return violation(s, pair, "accept without caller-allocated device handle storage".into());
        }
        let p = s.pairs.get_mut(&pair).unwrap();
        p.accept_polls += 1;
        if !p.connected || p.accept_polls < 2 {
            // SAFETY: v7's accept gets a writable receive-comm slot from its caller.
            unsafe { *rc = std::ptr::null_mut() };
            return NCCL_SUCCESS;
        }
        p.accepted = true;
        let id = next_id();
        let mut comm = new_comm(pair);
        // SAFETY: *dev_comm is non-null (checked above): the caller-allocated handle storage v7 requires; rc
        // is the caller's writable receive-comm slot.
        unsafe {
            **dev_comm = NcclNetDeviceHandleV7 {
                net_device_type: NCCL_NET_DEVICE_UNPACK,
                net_device_version: NCCL_NET_DEVICE_UNPACK_VERSION,
                handle: (&mut *comm.handle as *mut UnpackDeviceHandle).cast(),
                size: size_of::<UnpackDeviceHandle>(),
                needs_proxy_progress: 1,
            };
            *rc = id as *mut c_void;
        }
        s.comms.insert(id, comm);
        NCCL_SUCCESS
    })
}

struct Mr {
    base: usize,
    size: usize,
}

unsafe extern "C" fn reg_mr(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    ty: c_int,
    mh: *mut *mut c_void,
) -> NcclResult {
    let _inside = Inside::enter("reg_mr");
    with(|s| {
        let pair = s.comms.get(&(comm as u64)).expect("known comm").pair;
        count(s, pair, "regMr");
        let (base, len) = (data as usize, size as usize);
        match ty {
            NCCL_PTR_HOST => {}
            NCCL_PTR_CUDA if base.is_multiple_of(4096) && len.is_multiple_of(4096) => {
                s.pairs.get_mut(&pair).unwrap().cuda_regs.push((base, len))
            }
            NCCL_PTR_CUDA => return violation(s, pair, format!("CUDA regMr of unaligned {base:#x}+{len}")),
            _ => return violation(s, pair, format!("regMr with type {ty}")),
        }
        s.pairs.get_mut(&pair).unwrap().live_mrs += 1;
        // SAFETY: v7's regMr gets a writable mhandle slot from its caller.
        unsafe { *mh = Box::into_raw(Box::new(Mr { base, size: len })).cast() };
        NCCL_SUCCESS
    })
}

unsafe extern "C" fn dereg_mr(comm: *mut c_void, mh: *mut c_void) -> NcclResult {
    let _inside = Inside::enter("dereg_mr");
    with(|s| {
        let pair = s.comms.get(&(comm as u64)).expect("known comm").pair;
        count(s, pair, "deregMr");
        s.pairs.get_mut(&pair).unwrap().live_mrs -= 1;
        // SAFETY: the v7 caller deregisters only an mhandle this mock's reg_mr returned (a Box it leaked),
        // once.
        drop(unsafe { Box::from_raw(mh.cast::<Mr>()) });
        NCCL_SUCCESS
    })
}

fn post(s: &mut State, comm: u64, recv: bool, request: *mut *mut c_void) -> NcclResult {
    let c = s.comms.get_mut(&comm).expect("known comm");
    let pair = c.pair;
    if c.requests.len() >= 16 {
        return violation(s, pair, "unable to allocate requests (17th request on a comm)".into());
    }
    let id = (comm << 20) | c.next_req;
    c.next_req += 1;
    c.requests.push_back(Req { id, recv, done: false, polls: 0 });
    // SAFETY: request is the post caller's out-pointer, the writable request slot v7 gives isend and irecv.
    unsafe { *request = id as *mut c_void };
    NCCL_SUCCESS
}

unsafe extern "C" fn isend(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    _tag: c_int,
    mh: *mut c_void,
    request: *mut *mut c_void,
) -> NcclResult {
    let _inside = Inside::enter("isend");
    with(|s| {
        let pair = s.comms.get(&(comm as u64)).expect("known comm").pair;
        count(s, pair, "isend");
        // SAFETY: mh is an mhandle this mock's reg_mr leaked from a Box and dereg_mr has not freed: the v7
        // caller sends only with live registrations.
        let mr = unsafe { &*mh.cast::<Mr>() };
        let (start, len) = (data as usize, size as usize);
        if start < mr.base || start + len > mr.base + mr.size {
            return violation(s, pair, "isend outside its registration".into());
        }
        let rc = post(s, comm as u64, false, request);
        if rc == NCCL_SUCCESS {
            // SAFETY: the caller vouches for [data, data + size) until the send completes.
            let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }.to_vec();
            s.pairs.get_mut(&pair).unwrap().wire.push_back(bytes);
        }
        rc
    })
}

unsafe extern "C" fn irecv(
    comm: *mut c_void,
    n: c_int,
    _data: *mut *mut c_void,
    sizes: *mut c_int,
    _tags: *mut c_int,
    mhs: *mut *mut c_void,
    request: *mut *mut c_void,
) -> NcclResult {
    let _inside = Inside::enter("irecv");
    with(|s| {
        let pair = s.comms.get(&(comm as u64)).expect("known comm").pair;
        count(s, pair, "irecv");
        // SAFETY: v7 passes irecv arrays of n entries; the lazy || reads mhs[0] only if n == 1.
        if n != 1 || unsafe { (*mhs).is_null() } {
            return violation(s, pair, format!("irecv with n = {n} or a NULL mhandle"));
        }
        // SAFETY: n == 1 (checked above), so sizes points at one int of the caller's.
        let _provisional = unsafe { *sizes };
        post(s, comm as u64, true, request)
    })
}

unsafe extern "C" fn test(request: *mut c_void, done: *mut c_int, _size: *mut c_int) -> NcclResult {
    let _inside = Inside::enter("test");
    let id = request as u64;
    let comm_id = id >> 20;
    with(|s| {
        let Some(c) = s.comms.get_mut(&comm_id) else { return NCCL_INTERNAL_ERROR };
        let pair = c.pair;
        count(s, pair, "test");
        let c = s.comms.get_mut(&comm_id).unwrap();
        let Some(idx) = c.requests.iter().position(|r| !r.done).filter(|i| c.requests[*i].id == id) else {
            return violation(s, pair, format!("test called with invalid request {id:#x}"));
        };
        c.requests[idx].polls += 1;
        let (polls, recv) = (c.requests[idx].polls, c.requests[idx].recv);
        let p = s.pairs.get_mut(&pair).unwrap();
        if !recv {
            if polls < p.send_polls_to_finish.max(1) {
                // SAFETY: v7's test gets a writable done flag from its caller.
                unsafe { *done = 0 };
            } else {
                s.comms.get_mut(&comm_id).unwrap().requests.remove(idx);
                // SAFETY: v7's test gets a writable done flag from its caller.
                unsafe { *done = 1 };
            }
            return NCCL_SUCCESS;
        }
        if let Some(rc) = p.fail_next_recv_test.take() {
            warn(s, "mock: Connection closed by remote peer");
            return rc;
        }
        let Some(msg) = p.wire.pop_front() else {
            // SAFETY: v7's test gets a writable done flag from its caller.
            unsafe { *done = 0 };
            return NCCL_SUCCESS;
        };
        if msg.len() > SLOT_POOL {
            return violation(s, pair, format!("a {}-byte message exceeds the mock's slot pool", msg.len()));
        }
        // Like TCPX: the sender's size wins, unchecked; fragments go to the slot's pool, reversed.
        let c = s.comms.get_mut(&comm_id).unwrap();
        let slot = ((id & 0xF_FFFF) % 16) as usize;
        let pieces: Vec<(usize, usize)> =
            (0..msg.len()).step_by(FRAGMENT).map(|o| (o, FRAGMENT.min(msg.len() - o))).collect();
        let mut at = slot * SLOT_POOL;
        for (k, &(off, len)) in pieces.iter().rev().enumerate() {
            c.pool[at..at + len].copy_from_slice(&msg[off..off + len]);
            c.meta.mem[slot][k] = LoadMeta { src_off: at as u32, len: len as u32, dst_off: off as u64 };
            at += len;
        }
        c.meta.cnt[slot] = pieces.len() as u64;
        c.requests[idx].done = true;
        // SAFETY: v7's test gets a writable done flag from its caller.
        unsafe { *done = 1 };
        NCCL_SUCCESS
    })
}

unsafe extern "C" fn irecv_consumed(comm: *mut c_void, n: c_int, request: *mut c_void) -> NcclResult {
    let _inside = Inside::enter("irecv_consumed");
    with(|s| {
        let c = s.comms.get_mut(&(comm as u64)).expect("known comm");
        let pair = c.pair;
        let ok = n == 1 && c.requests.front().is_some_and(|r| r.id == request as u64 && r.done && r.recv);
        if !ok {
            count(s, pair, "irecvConsumed");
            return violation(s, pair, "irecvConsumed called with invalid request".into());
        }
        c.requests.pop_front();
        count(s, pair, "irecvConsumed");
        NCCL_SUCCESS
    })
}

unsafe extern "C" fn close(comm: *mut c_void) -> NcclResult {
    let _inside = Inside::enter("close");
    with(|s| {
        let c = s.comms.remove(&(comm as u64)).expect("known comm, closed once");
        let p = s.pairs.get_mut(&c.pair).unwrap();
        p.closed_with_outstanding += c.requests.len();
        *p.calls.entry("close").or_default() += 1;
        NCCL_SUCCESS
    })
}

unsafe extern "C" fn close_listen(lc: *mut c_void) -> NcclResult {
    let _inside = Inside::enter("close_listen");
    with(|s| {
        let pair = s.listens.remove(&(lc as u64)).expect("known listen comm, closed once");
        let p = s.pairs.get_mut(&pair).unwrap();
        if p.accept_polls > 0 && !p.accepted {
            p.violations.push("closeListen while an accept was running".into());
        }
        p.listen_closed = true;
        NCCL_SUCCESS
    })
}

pub fn table() -> NcclNetV7 {
    NcclNetV7 {
        name: c"MockNet_v7".as_ptr() as *const c_char,
        init: Some(init),
        devices: Some(devices),
        get_properties: Some(get_properties),
        listen: Some(listen),
        connect: Some(connect),
        accept: Some(accept),
        reg_mr: Some(reg_mr),
        reg_mr_dma_buf: None,
        dereg_mr: Some(dereg_mr),
        isend: Some(isend),
        irecv: Some(irecv),
        iflush: None,
        test: Some(test),
        close_send: Some(close),
        close_recv: Some(close),
        close_listen: Some(close_listen),
        get_device_mr: None,
        irecv_consumed: Some(irecv_consumed),
    }
}

/// A stand-in for a GPU's unpacker (`PluginGpus::stand_in`): it gathers on the CPU, but finishes
/// receives only as far as the test lets it, so a test can keep a receive "in the kernel" for as
/// long as it likes.
#[derive(Default)]
pub struct HeldUnpack {
    /// Per submitted receive: destination, its pieces (none: contiguous), pool and the runs to copy.
    receives: Vec<(u64, Vec<DstPiece>, u64, Vec<Run>)>,
    launched: u64,
    completed: u64,
    /// Receives with tickets below this may finish.
    pub release_below: u64,
    pub launches: usize,
}

impl BatchUnpack for HeldUnpack {
    unsafe fn submit(
        &mut self,
        layout: &ReceiveLayout,
        pieces: &[DstPiece],
        metas: &[LoadMeta],
    ) -> crate::error::Result<Submit> {
        let mut runs = Vec::new();
        gather::plan(metas, layout.dst_len as usize, layout.pool_len, &mut runs)?;
        self.receives.push((layout.dst, pieces.to_vec(), layout.pool, runs));
        Ok(Submit::Queued(self.receives.len() as u64 - 1))
    }

    fn launch(&mut self) -> crate::error::Result<bool> {
        if self.launched == self.submitted() {
            return Ok(false);
        }
        self.launched = self.submitted();
        self.launches += 1;
        Ok(true)
    }

    fn poll(&mut self) -> crate::error::Result<u64> {
        while self.completed < self.launched.min(self.release_below) {
            let (dst, pieces, pool, runs) = &self.receives[self.completed as usize];
            // SAFETY: `plan` checked the runs against the pool and the destination, which the
            // submit contract keeps valid until the receive is finished.
            unsafe {
                match pieces.is_empty() {
                    true => gather::copy_runs(*pool as *const u8, *dst as *mut u8, runs),
                    false => gather::copy_runs_to_pieces(*pool as *const u8, pieces, runs),
                }
            };
            self.completed += 1;
        }
        Ok(self.completed)
    }

    fn finish(&mut self) -> crate::error::Result<u64> {
        self.launch()?;
        self.release_below = u64::MAX;
        self.poll()
    }

    fn submitted(&self) -> u64 {
        self.receives.len() as u64
    }

    fn pending_receives(&self) -> usize {
        (self.submitted() - self.launched) as usize
    }

    fn pending_tiles(&self) -> usize {
        0
    }

    fn launches_in_flight(&self) -> usize {
        usize::from(self.launched > self.completed)
    }
}

/// The mock as a loaded plugin, initialised once for the whole test binary.
pub fn plugin() -> Arc<Plugin> {
    static PLUGIN: std::sync::OnceLock<Arc<Plugin>> = std::sync::OnceLock::new();
    PLUGIN.get_or_init(|| Plugin::from_table(table()).expect("mock loads")).clone()
}
