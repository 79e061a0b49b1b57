//! Plugin comms behind the transport traits, enforcing TCPX's rules so the engine cannot break them:
//! `test` only on the oldest request the plugin has not reported done, at most 16 requests per comm
//! (received-but-unconsumed included, checked before the plugin is called), receives ≤ 4 MiB,
//! consumption in order after completion, int-sized registrations and requests, and no plugin call
//! on a comm after it failed. Sizes come from the protocol (`test` never writes them). This file
//! holds what both directions share and the send comm; the receive comm is `recv.rs`.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::gpu::PluginGpus;
use super::loader::{Plugin, rc_text};
use super::logger::{mark, warning_suffix};
use super::stage::{Stage, StageBudget, Staging};
use crate::cuda::Gpu;
use crate::error::{Error, Result, UcclStatus};
use crate::ncclnet::{
    NCCL_PTR_CUDA, NCCL_PTR_HOST, NCCL_SUCCESS, NcclNetV7, UNPACK_MAX_SLICE_SIZE, UNPACK_QUEUE_DEPTH,
};
use crate::transport::{IoSeg, MemKind, MrHandle, MrRun, Properties, RequestId, SendComm, check_runs};

/// Requests per comm, received-but-unconsumed included (TCPX's ring and unpack queue).
pub const MAX_REQUESTS: usize = UNPACK_QUEUE_DEPTH;
/// One request at most: TCPX's 2048 fragments per receive hold 4 MiB; sends keep to the same so a
/// peer's receive can never be asked for more.
pub const MAX_MESSAGE: usize = UNPACK_MAX_SLICE_SIZE;
/// CUDA registrations are page-granular.
const PAGE: usize = 4096;
/// The largest registration, after page rounding: `regMr`'s size is an `int`.
pub const MAX_REGISTRATION: usize = c_int::MAX as usize;

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
pub(super) struct CommCore {
    pub plugin: Arc<Plugin>,
    pub comm: *mut c_void,
    props: Properties,
    regs: HashMap<usize, Registration>,
    next_mr: usize,
    pub failure: Option<Error>,
    /// Requests outstanding on every comm of the net, so the progress thread knows to keep polling.
    busy: Arc<AtomicUsize>,
    /// Requests outstanding on this comm counted into `busy`.
    counted: usize,
    direction: &'static str,
    pub gpus: Arc<PluginGpus>,
}

// SAFETY: the plugin comm and mhandles are only used through `&mut self`, i.e. by one thread at a
// time, which is all TCPX asks (its comms are not thread-safe, not thread-bound).
unsafe impl Send for CommCore {}

impl CommCore {
    pub fn new(plugin: Arc<Plugin>, comm: *mut c_void, shared: CommShared, direction: &'static str) -> Self {
        let CommShared { props, busy, gpus, test_ahead: _, stage_budget: _ } = shared;
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

    pub fn check(&self) -> Result<()> {
        match &self.failure {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Remembers the failure: the plugin is not called on this comm again (except to close it).
    pub fn fail(&mut self, err: Error) -> Error {
        self.failure.get_or_insert(err).clone()
    }

    pub fn count(&mut self, delta: isize) {
        if delta > 0 {
            self.counted += delta as usize;
            self.busy.fetch_add(delta as usize, Ordering::Release);
        } else {
            self.counted -= delta.unsigned_abs();
            self.busy.fetch_sub(delta.unsigned_abs(), Ordering::Release);
        }
    }

    pub fn register(&mut self, addr: usize, len: usize, kind: MemKind, temporary: bool) -> Result<usize> {
        self.check()?;
        let end =
            addr.checked_add(len).ok_or_else(|| Error::invalid(format!("region {addr:#x}+{len} wraps around")))?;
        if kind == MemKind::Host && self.stages_host() {
            // The plugin never sees it (`stages_host`): the registration is the comm's alone.
            return Ok(self.record(Registration {
                mhandle: std::ptr::null_mut(),
                base: addr,
                len,
                kind,
                in_use: 0,
                release_when_idle: temporary,
            }));
        }
        let (base, size, ty) = match kind {
            MemKind::Host if self.props.supports_host => (addr, len, NCCL_PTR_HOST),
            // The plugin maps whole pages (TCPX refuses unaligned CUDA registrations): register
            // the page-aligned superset.
            MemKind::Cuda { device } if self.props.supports_cuda => {
                self.gpus.takes(device)?;
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
        // (the comm's, checked above), else the engine's GPU. Without a
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
        // Requests are checked against what the caller registered, not the page-rounded superset.
        Ok(self.record(Registration { mhandle, base: addr, len, kind, in_use: 0, release_when_idle: temporary }))
    }

    fn record(&mut self, reg: Registration) -> usize {
        let key = self.next_mr;
        self.next_mr += 1;
        self.regs.insert(key, reg);
        key
    }

    /// Host memory goes through a registered GPU buffer, never to the plugin: the vendor refuses it
    /// in requests (TCPXO) and the comm can reach the GPU to stage it (devices then report host
    /// support only where a CUDA driver exists, `devices::from_raw`).
    pub fn stages_host(&self) -> bool {
        self.props.supports_host && !self.plugin.profile.host_requests
    }

    /// The plugin's handle of registration `key`.
    pub fn mhandle(&self, key: usize) -> Option<*mut c_void> {
        self.regs.get(&key).map(|r| r.mhandle)
    }

    fn deregister_now(&mut self, key: usize) {
        let Some(reg) = self.regs.remove(&key) else { return };
        if reg.mhandle.is_null() {
            return;
        }
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

    pub fn deregister(&mut self, mr: MrHandle) {
        match self.regs.get_mut(&mr.0) {
            Some(reg) if reg.in_use > 0 => reg.release_when_idle = true,
            Some(_) => self.deregister_now(mr.0),
            None => log::warn!("dereg_mr of unknown registration {} on a {} comm", mr.0, self.direction),
        }
    }

    /// The registration covering `[data, data + len)` for one request, taken into use: the caller's,
    /// or a host registration made for this request alone when `mr` is NONE.
    pub fn acquire(&mut self, data: usize, len: usize, mr: MrHandle) -> Result<(usize, *mut c_void, MemKind)> {
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

    /// The registration holding the first piece of a vectored request, taken into use once, and
    /// the pieces' total. A vectored request names its registrations (`mrs`): no per-request one
    /// is made. Only a run's first piece is checked against its registration: the others may lie
    /// past it, in other windows of the same engine region (the transport rule for nets with a
    /// registration limit), and the plugin never sees them (the send gathers them, the receive's
    /// unpack scatters into them). Every run's memory is of the first one's kind.
    pub fn acquire_segments(&mut self, iov: &[IoSeg], mrs: &[MrRun], what: &str) -> Result<Segments> {
        if iov.is_empty() || iov.iter().any(|s| s.len == 0) {
            return Err(Error::invalid(format!("a vectored {what} needs at least one segment and no empty one")));
        }
        check_runs(iov, mrs, what)?;
        let total = iov.iter().try_fold(0usize, |t, s| t.checked_add(s.len));
        let total = total.ok_or_else(|| Error::invalid(format!("a vectored {what}'s segments overflow")))?;
        check_size(total, what)?;
        if iov.iter().any(|s| s.addr.checked_add(s.len).is_none()) {
            return Err(Error::invalid(format!("a segment of a vectored {what} wraps around")));
        }
        let (mut at, mut kind, mut room) = (0, None, None);
        for run in mrs {
            let reg = self.regs.get(&run.mr.0).ok_or_else(|| {
                Error::invalid(format!("a vectored {what} needs the registration of its segments, not {}", run.mr.0))
            })?;
            let s = iov[at];
            if s.addr < reg.base || s.addr.checked_add(s.len).is_none_or(|end| end > reg.base + reg.len) {
                return Err(Error::invalid(format!(
                    "the first segment [{:#x}, +{}) of a run of a vectored {what} is not inside its registration \
                     [{:#x}, +{})",
                    s.addr, s.len, reg.base, reg.len
                )));
            }
            if kind.get_or_insert(reg.kind) != &reg.kind {
                return Err(Error::invalid(format!("the pieces of a vectored {what} lie in memory of two kinds")));
            }
            // Where a receive may be posted: `total` bytes inside one of the registrations, near
            // the first piece in the first one.
            if room.is_none() && reg.len >= total {
                let near = if at == 0 { (s.addr - reg.base).min(reg.len - total) } else { 0 };
                room = Some((reg.base + near, run.mr.0));
            }
            at += run.segs;
        }
        let key = mrs[0].mr.0;
        let reg = self.regs.get_mut(&key).expect("looked up above");
        reg.in_use += 1;
        Ok(Segments { key, kind: reg.kind, total, room })
    }

    pub fn release(&mut self, key: usize) {
        let Some(reg) = self.regs.get_mut(&key) else { return };
        reg.in_use -= 1;
        if reg.in_use == 0 && reg.release_when_idle {
            self.deregister_now(key);
        }
    }

    /// Registrations used by requests still in the plugin's hands are leaked rather than freed under it.
    /// `close` picks the table's close entry for this direction.
    pub fn close(&mut self, outstanding: usize, close: fn(&NcclNetV7) -> CloseFn) {
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

/// What [`CommCore::acquire_segments`] found.
pub(super) struct Segments {
    /// The first run's registration, taken into use.
    pub key: usize,
    pub kind: MemKind,
    /// The pieces' total.
    pub total: usize,
    /// An address inside one of the runs' registrations (and its key) where `total` bytes fit
    /// from: what a vectored receive is posted at when no anchor stands in (the plugin only takes
    /// the address as the base of `dst_off` and checks nothing else of it). None when every
    /// registration is smaller (pieces of several small regions).
    pub room: Option<(usize, usize)>,
}

pub(super) fn check_size(len: usize, what: &str) -> Result<c_int> {
    if len > MAX_MESSAGE {
        return Err(Error::invalid(format!(
            "a {what} of {len} bytes exceeds the net plugin's {MAX_MESSAGE}-byte limit"
        )));
    }
    Ok(len as c_int)
}

/// `test` may only be called on the oldest request still in flight.
pub(super) fn out_of_order(req: RequestId, oldest: Option<u64>, what: &str) -> Error {
    Error::backend(format!(
        "{what} of request {} breaks the plugin's order rule: the oldest request in flight is {}",
        req.0,
        oldest.map_or_else(|| "none".to_owned(), |o| o.to_string())
    ))
}

/// What a comm gets from the net that made it.
#[derive(Clone)]
pub(super) struct CommShared {
    pub props: Properties,
    /// Requests outstanding on every comm of the net.
    pub busy: Arc<AtomicUsize>,
    pub gpus: Arc<PluginGpus>,
    /// Receive comms test the plugin's next receive while earlier ones unpack (`recv.rs`).
    pub test_ahead: bool,
    /// What the net's send comms keep idle in staging buffers (`stage.rs`).
    pub stage_budget: Arc<StageBudget>,
}

struct SendReq {
    id: u64,
    request: *mut c_void,
    len: usize,
    mr: usize,
    /// The staging buffer a vectored send went from, given back when it is done.
    stage: Option<Stage>,
}

// SAFETY: a request pointer is an opaque token handed back to the plugin by the comm's one user.
unsafe impl Send for SendReq {}

pub struct PluginSendComm {
    core: CommCore,
    inflight: VecDeque<SendReq>,
    next_id: u64,
    /// Declared after `core`: buffers in flight are freed only once the comm closed.
    staging: Staging,
}

impl PluginSendComm {
    pub(super) fn new(plugin: Arc<Plugin>, comm: *mut c_void, shared: CommShared) -> Self {
        let staging = Staging::new(shared.stage_budget.clone());
        PluginSendComm {
            core: CommCore::new(plugin, comm, shared, "send"),
            inflight: VecDeque::new(),
            next_id: 0,
            staging,
        }
    }

    /// Gives a send's staging buffer back: kept for the next, or deregistered and freed past the
    /// net's bound.
    fn put_stage(&mut self, stage: Stage) {
        if let Some(spare) = self.staging.put(stage) {
            self.core.deregister(MrHandle(spare.key));
        }
    }

    /// Posts the pieces of `iov` (in the registrations `mrs` names) from a staging buffer they are
    /// copied into: of their own kind, or GPU memory for host pieces the plugin is not given
    /// (`CommCore::stages_host`).
    ///
    /// # Safety
    /// As `isendv`.
    unsafe fn post_staged(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        let Segments { key: user, kind, total, .. } = self.core.acquire_segments(iov, mrs, "send")?;
        let into = match (kind, self.core.gpus.engine_ordinal()) {
            (MemKind::Host, Some(device)) if self.core.stages_host() => MemKind::Cuda { device },
            (MemKind::Host, None) if self.core.stages_host() => {
                self.core.release(user);
                return Err(Error::new(
                    UcclStatus::ErrNotSupported,
                    "host memory for a net plugin that takes none in requests, and no engine GPU to stage it through",
                ));
            }
            _ => kind,
        };
        let core = &mut self.core;
        let mut register = |addr, len, kind| core.register(addr, len, kind, false);
        // SAFETY: the caller keeps every piece valid and unmodified (isendv's contract); the
        // pieces lie in registrations of `kind` memory and add up to at most MAX_MESSAGE.
        let filled = unsafe { self.staging.fill(&mut register, kind, into, iov) };
        // The pieces are copied: the caller's registration is free again.
        self.core.release(user);
        let stage = filled.map_err(|e| self.core.fail(e))?;
        let (addr, key) = (stage.addr(), stage.key);
        if let Err(e) = self.core.acquire(addr, total, MrHandle(key)) {
            return Err(self.core.fail(e));
        }
        self.post(addr, total, key, Some(stage))
    }

    /// Posts `len` bytes at `data`, inside registration `key` (taken into use by the caller, and
    /// released here if nothing is posted).
    fn post(&mut self, data: usize, len: usize, key: usize, stage: Option<Stage>) -> Result<Option<RequestId>> {
        let size = len as c_int;
        let mhandle = self.core.mhandle(key).expect("taken into use by the caller");
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
            if let Some(stage) = stage {
                self.put_stage(stage);
            }
            if rc != NCCL_SUCCESS {
                return Err(self.core.fail(plugin_error("isend", rc, since)));
            }
            return Ok(None);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.inflight.push_back(SendReq { id, request, len, mr: key, stage });
        self.core.count(1);
        Ok(Some(RequestId(id)))
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
        check_size(len, "send")?;
        if self.inflight.len() >= MAX_REQUESTS {
            return Ok(None);
        }
        let (key, _, kind) = self.core.acquire(data as usize, len, mr)?;
        if kind == MemKind::Host && self.core.stages_host() {
            let one = ([IoSeg { addr: data as usize, len }], [MrRun { mr: MrHandle(key), segs: 1 }]);
            // SAFETY: per the contract.
            let staged = unsafe { self.post_staged(&one.0, &one.1) };
            self.core.release(key);
            return staged;
        }
        self.post(data as usize, len, key, None)
    }

    /// One request for all the pieces: gathered into a staging buffer of their memory's kind
    /// (`stage.rs`) and sent from there, as one request of their total.
    unsafe fn isendv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        if let ([one], [run]) = (iov, mrs) {
            // SAFETY: per the contract.
            return unsafe { self.isend(one.addr as *const u8, one.len, run.mr) };
        }
        self.core.check()?;
        if self.inflight.len() >= MAX_REQUESTS {
            return Ok(None);
        }
        // SAFETY: per the contract.
        unsafe { self.post_staged(iov, mrs) }
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
        if let Some(stage) = head.stage {
            self.put_stage(stage);
        }
        Ok(Some(head.len))
    }
}

impl Drop for PluginSendComm {
    fn drop(&mut self) {
        self.core.close(self.inflight.len(), |t| t.close_send.expect("checked at load"));
    }
}
