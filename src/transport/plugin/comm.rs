//! Plugin comms behind the transport traits, enforcing TCPX's rules so the engine cannot break them:
//! `test` only on the oldest outstanding request, at most 16 requests per comm (received-but-
//! unconsumed included, checked before the plugin is called), receives ≤ 4 MiB, consumption in
//! order after completion, int-sized registrations and requests, and no plugin call on a comm after
//! it failed. Sizes come from the protocol (`test` never writes them).

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::gather::{self, Run};
use super::gpu::PluginGpus;
use super::landing::{CopyOut, HostLanding, Slot};
use super::loader::{Plugin, rc_text};
use super::logger::{mark, warning_suffix};
use super::unpack::{DevicePool, UnpackView};
use crate::cuda::Gpu;
use crate::cuda::unpack::{ReceiveLayout, Submit, Unpacker};
use crate::error::{Error, Result, UcclStatus};
use crate::ncclnet::{
    LoadMeta, NCCL_PTR_CUDA, NCCL_PTR_HOST, NCCL_SUCCESS, NcclNetV7, UNPACK_MAX_SLICE_SIZE, UNPACK_QUEUE_DEPTH,
};
use crate::transport::{MemKind, MrHandle, Properties, RecvComm, RequestId, SendComm};

/// Requests per comm, received-but-unconsumed included (TCPX's ring and unpack queue).
pub const MAX_REQUESTS: usize = UNPACK_QUEUE_DEPTH;
/// One request at most: TCPX's 2048 fragments per receive hold 4 MiB; sends keep to the same so a
/// peer's receive can never be asked for more.
pub const MAX_MESSAGE: usize = UNPACK_MAX_SLICE_SIZE;
/// CUDA registrations are page-granular.
const PAGE: usize = 4096;
/// The largest registration, after page rounding: `regMr`'s size is an `int`.
pub const MAX_REGISTRATION: usize = c_int::MAX as usize;
/// Tiles (4 KiB each at most) at which a waiting batch launches even while an earlier launch runs:
/// one 4 MiB receive of whole pages.
const BATCH_TILES: usize = 1024;

/// "net plugin test failed with rc 2 (system error); the plugin said: ..." for a call that started
/// when the logger's counter read `mark`. TCPX's rc 2 is its socket-error code (a peer that went away).
pub(super) fn plugin_error(what: &str, rc: c_int, mark: u64) -> Error {
    let status =
        if rc == crate::ncclnet::NCCL_SYSTEM_ERROR { UcclStatus::ErrRemoteDisconnect } else { UcclStatus::ErrBackend };
    Error::new(status, format!("net plugin {what} failed with {}{}", rc_text(rc), warning_suffix(mark)))
}

/// A comm's close entry (`closeSend` / `closeRecv`).
type CloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;

struct Registration {
    mhandle: *mut c_void,
    base: usize,
    len: usize,
    kind: MemKind,
    /// Requests using it; a deregistration waits for them.
    in_use: usize,
    /// Made for one `MrHandle::NONE` request, or deregistered by the caller while in use: goes when
    /// `in_use` drops to zero.
    release_when_idle: bool,
}

/// What send and receive comms share: the plugin comm, its registrations and its failure state.
struct CommCore {
    plugin: Arc<Plugin>,
    comm: *mut c_void,
    props: Properties,
    regs: HashMap<usize, Registration>,
    next_mr: usize,
    failure: Option<Error>,
    /// Requests outstanding on every comm of the net, so the progress thread knows to keep polling.
    busy: Arc<AtomicUsize>,
    /// Requests outstanding on this comm counted into `busy`.
    counted: usize,
    direction: &'static str,
    gpus: Arc<PluginGpus>,
}

// SAFETY: the plugin comm and mhandles are only used through `&mut self`, i.e. by one thread at a
// time, which is all TCPX asks (its comms are not thread-safe, not thread-bound).
unsafe impl Send for CommCore {}

impl CommCore {
    fn new(plugin: Arc<Plugin>, comm: *mut c_void, shared: CommShared, direction: &'static str) -> Self {
        let CommShared { props, busy, gpus } = shared;
        CommCore {
            plugin,
            comm,
            props,
            regs: HashMap::new(),
            next_mr: 1,
            failure: None,
            busy,
            counted: 0,
            direction,
            gpus,
        }
    }

    fn check(&self) -> Result<()> {
        match &self.failure {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Remembers the failure: the plugin is not called on this comm again (except to close it).
    fn fail(&mut self, err: Error) -> Error {
        self.failure.get_or_insert(err).clone()
    }

    fn count(&mut self, delta: isize) {
        if delta > 0 {
            self.counted += delta as usize;
            self.busy.fetch_add(delta as usize, Ordering::Release);
        } else {
            self.counted -= delta.unsigned_abs();
            self.busy.fetch_sub(delta.unsigned_abs(), Ordering::Release);
        }
    }

    fn register(&mut self, addr: usize, len: usize, kind: MemKind, temporary: bool) -> Result<usize> {
        self.check()?;
        let end =
            addr.checked_add(len).ok_or_else(|| Error::invalid(format!("region {addr:#x}+{len} wraps around")))?;
        let (base, size, ty) = match kind {
            MemKind::Host if self.props.supports_host => (addr, len, NCCL_PTR_HOST),
            // The plugin maps whole pages (TCPX refuses unaligned CUDA registrations): register
            // the page-aligned superset.
            MemKind::Cuda { .. } if self.props.supports_cuda => {
                let base = addr & !(PAGE - 1);
                let end = end
                    .checked_next_multiple_of(PAGE)
                    .ok_or_else(|| Error::invalid("region ends past the address space"))?;
                (base, end - base, NCCL_PTR_CUDA)
            }
            _ => {
                return Err(Error::new(
                    UcclStatus::ErrNotSupported,
                    format!("net device {} cannot register {kind:?} memory", self.props.name),
                ));
            }
        };
        let size_int = c_int::try_from(size).map_err(|_| {
            Error::invalid(format!("registration of {size} bytes exceeds the net plugin's 2 GiB (int) limit"))
        })?;
        // TCPX maps CUDA registrations with the device current at regMr: the memory's own GPU
        // (the engine refuses memory of any GPU but its own), else the engine's GPU. Without a
        // driver no device memory exists (the mock plugin's tests pass made-up addresses), so
        // there is nothing to bind.
        let _current = match kind {
            MemKind::Cuda { device } if crate::cuda::available() => Some(Gpu::open(device)?.enter()?),
            _ => self.gpus.enter()?,
        };
        let mut mhandle: *mut c_void = std::ptr::null_mut();
        let comm = self.comm;
        let (rc, since) = self.plugin.call(|t| {
            let reg_mr = t.reg_mr.expect("checked at load");
            let since = mark();
            // SAFETY: a live comm; the plugin records (host) or maps (CUDA) the range the caller vouches for.
            (unsafe { reg_mr(comm, base as *mut c_void, size_int, ty, &mut mhandle) }, since)
        });
        if rc != NCCL_SUCCESS {
            return Err(plugin_error(&format!("regMr of {size} bytes of {kind:?} memory"), rc, since));
        }
        if mhandle.is_null() {
            return Err(Error::backend("net plugin regMr succeeded but returned no handle"));
        }
        let key = self.next_mr;
        self.next_mr += 1;
        // Requests are checked against what the caller registered, not the page-rounded superset.
        let reg = Registration { mhandle, base: addr, len, kind, in_use: 0, release_when_idle: temporary };
        self.regs.insert(key, reg);
        Ok(key)
    }

    fn deregister_now(&mut self, key: usize) {
        let Some(reg) = self.regs.remove(&key) else { return };
        let comm = self.comm;
        let (rc, since) = self.plugin.call(|t| {
            let dereg = t.dereg_mr.expect("checked at load");
            let since = mark();
            // SAFETY: a handle this comm's regMr returned, used by no outstanding request.
            (unsafe { dereg(comm, reg.mhandle) }, since)
        });
        if rc != NCCL_SUCCESS {
            log::warn!("net plugin deregMr failed with {}{}", rc_text(rc), warning_suffix(since));
        }
    }

    fn deregister(&mut self, mr: MrHandle) {
        match self.regs.get_mut(&mr.0) {
            Some(reg) if reg.in_use > 0 => reg.release_when_idle = true,
            Some(_) => self.deregister_now(mr.0),
            None => log::warn!("dereg_mr of unknown registration {} on a {} comm", mr.0, self.direction),
        }
    }

    /// The registration covering `[data, data + len)` for one request, taken into use: the caller's,
    /// or a host registration made for this request alone when `mr` is NONE.
    fn acquire(&mut self, data: usize, len: usize, mr: MrHandle) -> Result<(usize, *mut c_void, MemKind)> {
        let key = if mr == MrHandle::NONE { self.register(data, len, MemKind::Host, true)? } else { mr.0 };
        let reg = self.regs.get_mut(&key).ok_or_else(|| Error::invalid(format!("unknown registration {}", mr.0)))?;
        let inside = data >= reg.base && data.checked_add(len).is_some_and(|end| end <= reg.base + reg.len);
        if !inside {
            return Err(Error::invalid(format!(
                "request [{data:#x}, +{len}) is not inside its registration [{:#x}, +{})",
                reg.base, reg.len
            )));
        }
        reg.in_use += 1;
        Ok((key, reg.mhandle, reg.kind))
    }

    fn release(&mut self, key: usize) {
        let Some(reg) = self.regs.get_mut(&key) else { return };
        reg.in_use -= 1;
        if reg.in_use == 0 && reg.release_when_idle {
            self.deregister_now(key);
        }
    }

    /// Registrations used by requests still in the plugin's hands are leaked rather than freed under it.
    /// `close` picks the table's close entry for this direction.
    fn close(&mut self, outstanding: usize, close: fn(&NcclNetV7) -> CloseFn) {
        if outstanding > 0 {
            log::warn!("closing a net plugin {} comm with {outstanding} requests outstanding", self.direction);
        }
        let idle: Vec<usize> = self.regs.iter().filter(|(_, r)| r.in_use == 0).map(|(k, _)| *k).collect();
        for key in idle {
            self.deregister_now(key);
        }
        let counted = self.counted;
        if counted > 0 {
            self.count(-(counted as isize));
        }
        let comm = self.comm;
        let (rc, since) = self.plugin.call(|t| {
            let since = mark();
            // SAFETY: closing the live comm once; nothing uses it afterwards.
            (unsafe { close(t)(comm) }, since)
        });
        if rc != NCCL_SUCCESS {
            log::warn!(
                "net plugin close of a {} comm failed with {}{}",
                self.direction,
                rc_text(rc),
                warning_suffix(since)
            );
        }
    }
}

fn check_size(len: usize, what: &str) -> Result<c_int> {
    if len > MAX_MESSAGE {
        return Err(Error::invalid(format!(
            "a {what} of {len} bytes exceeds the net plugin's {MAX_MESSAGE}-byte limit"
        )));
    }
    Ok(len as c_int)
}

/// `test` may only be called on the oldest request still in flight.
fn out_of_order(req: RequestId, oldest: Option<u64>, what: &str) -> Error {
    Error::backend(format!(
        "{what} of request {} breaks the plugin's order rule: the oldest request in flight is {}",
        req.0,
        oldest.map_or_else(|| "none".to_owned(), |o| o.to_string())
    ))
}

/// What a comm gets from the net that made it.
pub(super) struct CommShared {
    pub props: Properties,
    /// Requests outstanding on every comm of the net.
    pub busy: Arc<AtomicUsize>,
    pub gpus: Arc<PluginGpus>,
}

struct SendReq {
    id: u64,
    request: *mut c_void,
    len: usize,
    mr: usize,
}

// SAFETY: a request pointer is an opaque token handed back to the plugin by the comm's one user.
unsafe impl Send for SendReq {}

pub struct PluginSendComm {
    core: CommCore,
    inflight: VecDeque<SendReq>,
    next_id: u64,
}

impl PluginSendComm {
    pub(super) fn new(plugin: Arc<Plugin>, comm: *mut c_void, shared: CommShared) -> Self {
        PluginSendComm { core: CommCore::new(plugin, comm, shared, "send"), inflight: VecDeque::new(), next_id: 0 }
    }
}

impl SendComm for PluginSendComm {
    fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.core.register(addr, len, kind, false).map(MrHandle)
    }

    fn dereg_mr(&mut self, mr: MrHandle) {
        self.core.deregister(mr);
    }

    unsafe fn isend(&mut self, data: *const u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
        self.core.check()?;
        let size = check_size(len, "send")?;
        if self.inflight.len() >= MAX_REQUESTS {
            return Ok(None);
        }
        let (key, mhandle, _) = self.core.acquire(data as usize, len, mr)?;
        let mut request: *mut c_void = std::ptr::null_mut();
        let comm = self.core.comm;
        let (rc, since) = self.core.plugin.call(|t| {
            let isend = t.isend.expect("checked at load");
            let since = mark();
            // SAFETY: a live comm with a free request slot; the caller keeps `data` valid until done.
            (unsafe { isend(comm, data as *mut c_void, size, 0, mhandle, &mut request) }, since)
        });
        if rc != NCCL_SUCCESS || request.is_null() {
            self.core.release(key);
            if rc != NCCL_SUCCESS {
                return Err(self.core.fail(plugin_error("isend", rc, since)));
            }
            return Ok(None);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.inflight.push_back(SendReq { id, request, len, mr: key });
        self.core.count(1);
        Ok(Some(RequestId(id)))
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.core.check()?;
        let Some(head) = self.inflight.front().filter(|h| h.id == req.0) else {
            return Err(out_of_order(req, self.inflight.front().map(|h| h.id), "test"));
        };
        let (mut done, mut size): (c_int, c_int) = (0, -1);
        let (rc, since) = self.core.plugin.call(|t| {
            let test = t.test.expect("checked at load");
            let since = mark();
            // SAFETY: the oldest in-flight request of this live comm, never tested done before.
            (unsafe { test(head.request, &mut done, &mut size) }, since)
        });
        if rc != NCCL_SUCCESS {
            return Err(self.core.fail(plugin_error("test of a send", rc, since)));
        }
        if done == 0 {
            return Ok(None);
        }
        let head = self.inflight.pop_front().expect("checked above");
        self.core.release(head.mr);
        self.core.count(-1);
        Ok(Some(head.len))
    }
}

impl Drop for PluginSendComm {
    fn drop(&mut self) {
        self.core.close(self.inflight.len(), |t| t.close_send.expect("checked at load"));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvState {
    Posted,
    /// The plugin completed it and its fragments (in `PluginRecvComm::metas`) wait for room in the
    /// unpacker. At most one receive per comm is here or unpacking: only the oldest is tested.
    Unsubmitted {
        total: usize,
    },
    /// In the unpacker: done once `ticket` is below its watermark, not before, so the pages the
    /// kernel reads are never handed back to the plugin under it.
    Unpacking {
        ticket: u64,
        total: usize,
    },
    /// Unpacked into its landing slot, which the copier thread copies into the destination.
    CopyingOut {
        total: usize,
    },
    /// Reported done to the caller; waits for `irecv_consumed`.
    Done,
}

struct RecvReq {
    id: u64,
    request: *mut c_void,
    data: usize,
    len: usize,
    mr: usize,
    kind: MemKind,
    /// A host destination posted against the anchor: it lands through a slot (`landing.rs`).
    lands: bool,
    /// The landing slot its fragments are gathered into, from submission to the copy out.
    slot: Option<Slot>,
    /// The copy out of `slot`, once started.
    copy: Option<CopyOut>,
    state: RecvState,
}

// SAFETY: as for SendReq; `data` is the caller's buffer, only written under the irecv contract.
unsafe impl Send for RecvReq {}

/// How a receive the plugin reported done reaches its buffer.
enum Landing {
    /// The bytes are in place: a message of this size.
    Landed(usize),
    /// The fragments go through the GPU unpacker.
    Unpack { total: usize },
}

/// The GPU side of a receive comm whose pool is device memory, set up on its first GPU receive.
struct DeviceUnpack {
    gpu: Arc<Gpu>,
    pool: DevicePool,
    unpacker: Arc<Mutex<Unpacker>>,
}

pub struct PluginRecvComm {
    core: CommCore,
    /// Posted and done-but-unconsumed receives, oldest first.
    queue: VecDeque<RecvReq>,
    next_id: u64,
    unpack: Option<UnpackView>,
    device: Option<DeviceUnpack>,
    /// The pool's GPU's landing slots and this comm's registration of their anchor, made by the
    /// first receive into host memory.
    anchor: Option<(Arc<HostLanding>, usize)>,
    metas: Vec<LoadMeta>,
    runs: Vec<Run>,
}

impl PluginRecvComm {
    pub(super) fn new(plugin: Arc<Plugin>, comm: *mut c_void, shared: CommShared) -> PluginRecvComm {
        PluginRecvComm {
            core: CommCore::new(plugin, comm, shared, "receive"),
            queue: VecDeque::new(),
            next_id: 0,
            unpack: None,
            device: None,
            anchor: None,
            metas: Vec::new(),
            runs: Vec::new(),
        }
    }

    pub(super) fn set_unpack(&mut self, view: UnpackView) {
        self.unpack = Some(view);
    }

    /// Gathers the receive at `idx`, which the plugin just reported done, when its bytes sit in a
    /// bounce pool: on the CPU for host destinations, or by handing it to the GPU unpacker.
    fn land(&mut self, idx: usize) -> Result<Landing> {
        let Some(view) = &self.unpack else {
            // A host-type plugin received straight into the buffer and does not say how much.
            return Ok(Landing::Landed(self.queue[idx].len));
        };
        let r = &self.queue[idx];
        // Slots are taken in posting order, one per receive, and freed in order by consumption.
        let slot = (r.id % UNPACK_QUEUE_DEPTH as u64) as usize;
        let count = gather::check_count(view.fragment_count(slot))?;
        if count == 0 {
            // Nothing went through the pool: a zero-byte message, or (a plugin's host receive)
            // bytes that landed in the buffer directly, whose size the plugin does not report.
            let direct = matches!(r.kind, MemKind::Host) && !r.lands;
            return Ok(Landing::Landed(if direct { r.len } else { 0 }));
        }
        view.copy_fragments(slot, count, &mut self.metas);
        let device_pool = view.device_pool();
        let pool_len = device_pool.map_or(gather::MAX_POOL_LEN, |p| p.len);
        let total = gather::plan(&self.metas, r.len, pool_len, &mut self.runs)?;
        match (r.kind, device_pool) {
            (MemKind::Cuda { device }, Some(pool)) => {
                if device != pool.ordinal {
                    return Err(Error::new(
                        UcclStatus::ErrNotSupported,
                        format!(
                            "a receive into GPU {device} from a bounce pool on GPU {}: the net device must be bound to the destination's GPU",
                            pool.ordinal
                        ),
                    ));
                }
                Ok(Landing::Unpack { total })
            }
            (MemKind::Cuda { .. }, None) => Err(Error::new(
                UcclStatus::ErrNotSupported,
                "a receive into GPU memory from a host bounce pool is not supported (the net plugin keeps its pool in host memory)",
            )),
            // Posted against the anchor by `irecv`: the kernel gathers it into a landing slot.
            (MemKind::Host, Some(_)) if r.lands => Ok(Landing::Unpack { total }),
            (MemKind::Host, Some(_)) => Err(Error::new(
                UcclStatus::ErrInternal,
                "a receive into host memory from a GPU bounce pool was not posted against the landing anchor",
            )),
            (MemKind::Host, None) => {
                let pool = view.host_pool()?;
                // SAFETY: as above, for a host pool.
                unsafe { gather::copy_runs(pool, r.data as *mut u8, &self.runs) };
                Ok(Landing::Landed(total))
            }
        }
    }

    /// The anchor's address and this comm's registration of it, made on first use.
    fn anchor(&mut self) -> Result<(usize, *mut c_void)> {
        if self.anchor.is_none() {
            let pool = self.unpack.as_ref().and_then(UnpackView::device_pool).ok_or_else(|| {
                Error::new(UcclStatus::ErrInternal, "landing a host receive on a comm without a device pool")
            })?;
            let landing = self.core.gpus.landing(pool.ordinal)?;
            let (addr, len) = landing.anchor();
            let key = self.core.register(addr, len, MemKind::Cuda { device: pool.ordinal }, false)?;
            self.anchor = Some((landing, key));
        }
        let (landing, key) = self.anchor.as_ref().expect("set above");
        let mhandle = self.core.regs.get(key).expect("the anchor stays registered until close").mhandle;
        Ok((landing.anchor().0, mhandle))
    }

    /// This comm's pool, GPU and (shared) unpacker, set up on first use.
    fn device_unpack(&mut self) -> Result<&DeviceUnpack> {
        if self.device.is_none() {
            let pool = self.unpack.as_ref().and_then(UnpackView::device_pool).ok_or_else(|| {
                Error::new(UcclStatus::ErrInternal, "GPU unpack of a receive comm without a device pool")
            })?;
            let gpu = Gpu::open(pool.ordinal)?;
            let unpacker = self.core.gpus.unpacker(pool.ordinal)?;
            self.device = Some(DeviceUnpack { gpu, pool, unpacker });
        }
        Ok(self.device.as_ref().expect("set above"))
    }

    /// Moves the receive at `idx` through the unpacker: submits it when it is not yet, launches
    /// its batch when the GPU has nothing else to do or the batch is large, and returns its size
    /// once its kernel finished.
    ///
    /// Launching only while no earlier launch runs batches receives of all comms that complete
    /// meanwhile into one kernel, and adds no latency when the GPU is idle.
    fn unpack_step(&mut self, idx: usize) -> Result<Option<usize>> {
        let (gpu, pool, unpacker) = {
            let d = self.device_unpack()?;
            (d.gpu.clone(), d.pool, d.unpacker.clone())
        };
        let _current = gpu.enter()?;
        let mut unpacker = unpacker.lock();
        let r = &mut self.queue[idx];
        let state = r.state;
        if r.lands && r.slot.is_none() {
            let landing = &self.anchor.as_ref().expect("set by the irecv that posted it").0;
            match landing.take() {
                Some(slot) => r.slot = Some(slot),
                None => {
                    // Every slot of this GPU is busy: keep the unpacker moving, try again later.
                    unpacker.poll()?;
                    return Ok(None);
                }
            }
        }
        let (dst, dst_len) = match &r.slot {
            Some(slot) => (slot.device_ptr(), r.len as u64),
            None => (r.data as u64, r.len as u64),
        };
        let (ticket, total) = match state {
            RecvState::Unsubmitted { total } => {
                let layout = ReceiveLayout { pool: pool.addr, pool_len: pool.len, dst, dst_len };
                // SAFETY: the pool is the plugin's device memory on this GPU, valid until the comm
                // closes (which waits for the unpacker first), and its pages stay the receive's until
                // `irecv_consumed`, which the caller may only call after this reported done; the
                // destination is device memory of the same GPU that the irecv contract gives us.
                match unsafe { unpacker.submit(&layout, &self.metas)? } {
                    Submit::Queued(ticket) => (ticket, total),
                    Submit::Full => {
                        unpacker.poll()?;
                        return Ok(None);
                    }
                }
            }
            RecvState::Unpacking { ticket, total } => (ticket, total),
            other => {
                return Err(Error::new(
                    UcclStatus::ErrInternal,
                    format!("unpack step of a receive in state {other:?}"),
                ));
            }
        };
        self.queue[idx].state = RecvState::Unpacking { ticket, total };
        if ticket < unpacker.poll()? {
            let r = &mut self.queue[idx];
            if let Some(slot) = &r.slot {
                // SAFETY: the kernel that gathered `total` ≤ posted bytes into the slot finished
                // (its ticket is below the watermark); the destination is ours by the irecv
                // contract, and the slot stays with the receive until the copy finished.
                r.copy = Some(unsafe { slot.copy_out(r.data as *mut u8, total) });
                r.state = RecvState::CopyingOut { total };
                drop(unpacker);
                return self.copy_step(idx);
            }
            r.state = RecvState::Done;
            return Ok(Some(total));
        }
        let launched_below = unpacker.submitted() - unpacker.pending_receives() as u64;
        if ticket >= launched_below && (unpacker.launches_in_flight() == 0 || unpacker.pending_tiles() >= BATCH_TILES) {
            unpacker.launch()?;
        }
        Ok(None)
    }

    /// A landed receive whose copy out is running: done once the bytes are in place.
    fn copy_step(&mut self, idx: usize) -> Result<Option<usize>> {
        let r = &mut self.queue[idx];
        let RecvState::CopyingOut { total } = r.state else {
            return Err(Error::new(UcclStatus::ErrInternal, format!("copy step of a receive in state {:?}", r.state)));
        };
        if !r.copy.as_ref().expect("set with the state").finished()? {
            return Ok(None);
        }
        (r.copy, r.slot) = (None, None);
        r.state = RecvState::Done;
        Ok(Some(total))
    }

    /// Hands the oldest receive back to the plugin, which then reuses its slot and pages.
    fn consume_head(&mut self) -> Result<()> {
        let head = self.queue.pop_front().expect("checked by the caller");
        let comm = self.core.comm;
        let (rc, since) = self.core.plugin.call(|t| {
            let consumed = t.irecv_consumed.expect("checked at load");
            let since = mark();
            // SAFETY: the oldest completed, unconsumed receive of this live comm.
            (unsafe { consumed(comm, 1, head.request) }, since)
        });
        self.core.release(head.mr);
        self.core.count(-1);
        if rc != NCCL_SUCCESS {
            return Err(self.core.fail(plugin_error("irecvConsumed", rc, since)));
        }
        Ok(())
    }
}

impl RecvComm for PluginRecvComm {
    fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.core.register(addr, len, kind, false).map(MrHandle)
    }

    fn dereg_mr(&mut self, mr: MrHandle) {
        self.core.deregister(mr);
    }

    unsafe fn irecv(&mut self, data: *mut u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>> {
        self.core.check()?;
        let mut size = check_size(len, "receive")?;
        if self.queue.len() >= MAX_REQUESTS {
            return Ok(None);
        }
        let (key, mut mhandle, kind) = self.core.acquire(data as usize, len, mr)?;
        let (mut ptr, mut tag): (*mut c_void, c_int) = (data.cast(), 0);
        // A host destination with a GPU pool never reaches the plugin as a host receive (which
        // TCPX's steered sockets cannot serve): it is posted against the anchor instead.
        let lands = matches!(kind, MemKind::Host) && self.unpack.as_ref().and_then(UnpackView::device_pool).is_some();
        if lands {
            match self.anchor() {
                Ok((addr, anchor_mhandle)) => (ptr, mhandle) = (addr as *mut c_void, anchor_mhandle),
                Err(e) => {
                    self.core.release(key);
                    return Err(self.core.fail(e));
                }
            }
        }
        let mut request: *mut c_void = std::ptr::null_mut();
        let comm = self.core.comm;
        let (rc, since) = self.core.plugin.call(|t| {
            let irecv = t.irecv.expect("checked at load");
            let since = mark();
            // SAFETY: one receive (n = 1) on a live comm with a free slot; the caller keeps the buffer ours.
            (unsafe { irecv(comm, 1, &mut ptr, &mut size, &mut tag, &mut mhandle, &mut request) }, since)
        });
        if rc != NCCL_SUCCESS || request.is_null() {
            self.core.release(key);
            if rc != NCCL_SUCCESS {
                return Err(self.core.fail(plugin_error("irecv", rc, since)));
            }
            return Ok(None);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back(RecvReq {
            id,
            request,
            data: data as usize,
            len,
            mr: key,
            kind,
            lands,
            slot: None,
            copy: None,
            state: RecvState::Posted,
        });
        self.core.count(1);
        Ok(Some(RequestId(id)))
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.core.check()?;
        let idx = self.queue.iter().position(|r| r.state != RecvState::Done);
        let Some(idx) = idx.filter(|i| self.queue[*i].id == req.0) else {
            return Err(out_of_order(req, idx.map(|i| self.queue[i].id), "test"));
        };
        match self.queue[idx].state {
            RecvState::Posted => {}
            // The plugin finished it; the copy out of its landing slot has not.
            RecvState::CopyingOut { .. } => return self.copy_step(idx).map_err(|e| self.core.fail(e)),
            // The plugin finished it; the unpack has not.
            _ => return self.unpack_step(idx).map_err(|e| self.core.fail(e)),
        }
        let (mut done, mut size): (c_int, c_int) = (0, -1);
        let request = self.queue[idx].request;
        let (rc, since) = self.core.plugin.call(|t| {
            let test = t.test.expect("checked at load");
            let since = mark();
            // SAFETY: the oldest in-flight receive of this live comm, never tested done before.
            (unsafe { test(request, &mut done, &mut size) }, since)
        });
        if rc != NCCL_SUCCESS {
            return Err(self.core.fail(plugin_error("test of a receive", rc, since)));
        }
        if done == 0 {
            return Ok(None);
        }
        match self.land(idx) {
            Ok(Landing::Landed(size)) => {
                self.queue[idx].state = RecvState::Done;
                Ok(Some(size))
            }
            Ok(Landing::Unpack { total }) => {
                self.queue[idx].state = RecvState::Unsubmitted { total };
                self.unpack_step(idx).map_err(|e| self.core.fail(e))
            }
            Err(e) => {
                // Its pages hold nothing anyone reads: it may go back to the plugin.
                self.queue[idx].state = RecvState::Done;
                Err(self.core.fail(e))
            }
        }
    }

    fn irecv_consumed(&mut self, req: RequestId) -> Result<()> {
        self.core.check()?;
        match self.queue.front() {
            Some(head) if head.id == req.0 && head.state == RecvState::Done => {}
            head => {
                return Err(Error::backend(format!(
                    "irecv_consumed of request {} out of order: the oldest unconsumed receive is {}",
                    req.0,
                    head.map_or_else(
                        || "none".to_owned(),
                        |h| format!("{} ({})", h.id, if h.state == RecvState::Done { "done" } else { "in flight" })
                    )
                )));
            }
        }
        self.consume_head()
    }
}

impl Drop for PluginRecvComm {
    fn drop(&mut self) {
        // The kernel may still read this comm's pages (and write the destinations): it finishes
        // before any page goes back or the pool is closed.
        let unpacking = self.queue.iter().any(|r| matches!(r.state, RecvState::Unpacking { .. }));
        let mut unpacked = true;
        if unpacking && let Some(device) = &self.device {
            let _current = device.gpu.enter();
            if let Err(e) = device.unpacker.lock().finish() {
                log::warn!("closing a net plugin receive comm: the GPU unpack failed: {e}");
                unpacked = false;
            }
        }
        // The copier writes destinations the caller gets back once this returns.
        for r in self.queue.iter() {
            if let Some(copy) = &r.copy {
                copy.wait();
            }
        }
        if !unpacked {
            // A kernel may still write these slots: they are never handed out again.
            for r in self.queue.iter_mut() {
                if let Some(slot) = r.slot.take() {
                    slot.retire();
                }
            }
        }
        // Completed receives go back first, so the plugin does not close over unreturned pages.
        while self.core.failure.is_none()
            && self.queue.front().is_some_and(|r| match r.state {
                RecvState::Posted => false,
                RecvState::Unpacking { .. } => unpacked,
                RecvState::Unsubmitted { .. } | RecvState::CopyingOut { .. } | RecvState::Done => true,
            })
        {
            if self.consume_head().is_err() {
                break;
            }
        }
        self.core.close(self.queue.len(), |t| t.close_recv.expect("checked at load"));
    }
}
