//! The plugin's receive comm: posts receives, keeps the plugin progressing, brings what it received
//! to the destination (gathered on the CPU from a host pool, by the GPU unpacker from a device
//! pool, through a landing slot for a host destination of a device pool) and reports receives done
//! and hands them back to the plugin strictly in posting order.
//!
//! TCPX progresses a comm only inside `test` (`tcpxTest` → `tcpxCommProgress`), and `test` may only
//! name the oldest request the plugin has not reported done. A receive the plugin finished but
//! whose bytes are still being unpacked is not that request any more: every `test` of the oldest
//! receive therefore also tests the plugin's oldest unfinished one, so the next chunks keep arriving
//! while earlier ones unpack, and each receive the plugin finishes goes to the unpacker (or its
//! landing slot) at once, in posting order, without waiting for the receives before it to be
//! reported. `UCCL_TCPX_PLUGIN_TEST_AHEAD=0` restores testing only the oldest receive, for comparison.
//!
//! A plugin without a pool writes each receive into the buffer posted (TCPXO), so a chunk of many
//! pieces is posted into a slot of the comm's own GPU scratch ([`Scratch`]) and the unpacker, given
//! one fragment of the whole slot, scatters it into the pieces as it gathers a pool's fragments.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

use super::comm::{CommCore, CommShared, check_size, out_of_order, plugin_error};
use super::copier::CopyOut;
use super::gather::{self, Run};
use super::gpu::SharedUnpack;
use super::landing::{HostLanding, PER_COMM, Slot};
use super::loader::Plugin;
use super::logger::mark;
use super::unpack::{DevicePool, UnpackView};
use crate::cuda::Gpu;
use crate::cuda::memory::DeviceBuffer;
use crate::cuda::unpack::{DstPiece, ReceiveLayout, Submit};
use crate::error::{Error, Result, UcclStatus};
use crate::ncclnet::{LoadMeta, NCCL_SUCCESS, UNPACK_QUEUE_DEPTH};
use crate::transport::{IoSeg, MemKind, MrHandle, MrRun, RecvComm, RequestId};

use super::comm::{MAX_MESSAGE, MAX_REQUESTS};

/// Tiles (4 KiB each at most) at which a waiting batch launches even while an earlier launch runs:
/// one 4 MiB receive of whole pages.
const BATCH_TILES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvState {
    /// The plugin has not reported it done.
    Posted,
    /// The plugin reported it done; its fragments are read when its turn to be unpacked comes
    /// (room in the unpacker, a landing slot, every earlier receive of the comm handed over).
    Completed,
    /// In the unpacker: finished once `ticket` is below its watermark, not before, so the pages the
    /// kernel reads are never handed back to the plugin under it.
    Unpacking { ticket: u64, total: usize },
    /// Unpacked into its landing slot, which the copier threads copy into the destination.
    CopyingOut { total: usize },
    /// The bytes are in place; reported when it is the oldest receive tested.
    Ready { total: usize },
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
    /// The landing slot its fragments are gathered into, until the copy out takes it.
    slot: Option<Slot>,
    /// The copy out of its slot, once started.
    copy: Option<CopyOut>,
    /// A vectored receive's destination pieces (`data` is then the first one's address, `len`
    /// their total); posted at a window of their registration, or against the anchor when it
    /// lands (host pieces, device pool), or into a scratch slot where there is no pool.
    pieces: Option<Box<[DstPiece]>>,
    /// The scratch slot it was posted into, held until it is consumed.
    scratch: Option<usize>,
    state: RecvState,
}

// SAFETY: a request pointer is an opaque token handed back to the plugin by the comm's one user;
// `data` is the caller's buffer, only written under the irecv contract.
unsafe impl Send for RecvReq {}

impl RecvReq {
    /// Whether it holds a landing slot (with its copy out: until the copier gives it back).
    fn holds_slot(&self) -> bool {
        self.slot.is_some() || matches!(self.state, RecvState::CopyingOut { .. })
    }
}

/// How a receive the plugin reported done reaches its buffer.
enum Landing {
    /// The bytes are in place: a message of this size.
    Landed(usize),
    /// The fragments go through the GPU unpacker.
    Unpack { total: usize },
}

/// Where a plugin that writes receives into the posted buffer lands a chunk of many device pieces:
/// [`SCRATCH_SLOTS`] slots of a whole request each, in one allocation of the pieces' GPU that the
/// comm registers on its first such receive and keeps until it closes.
struct Scratch {
    memory: DeviceBuffer,
    /// The comm's registration of `memory`.
    key: usize,
    free: Vec<usize>,
}

/// Scratch slots per comm: receives of many pieces in flight at once beyond these wait for one.
const SCRATCH_SLOTS: usize = 4;

impl Scratch {
    fn pool(&self) -> DevicePool {
        let m = &self.memory;
        DevicePool { addr: m.addr() as u64, len: m.len() as u64, ordinal: m.gpu().ordinal() }
    }
}

/// The GPU side of a receive comm whose pool is device memory, set up on its first GPU receive.
struct DeviceUnpack {
    /// None for a unit test's stand-in unpacker, which needs no GPU.
    gpu: Option<Arc<Gpu>>,
    pool: DevicePool,
    unpacker: SharedUnpack,
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
    spare: Option<(Box<[u8]>, usize)>,
    scratch: Option<Scratch>,
    metas: Vec<LoadMeta>,
    runs: Vec<Run>,
    /// Test the plugin's oldest unfinished receive whenever the oldest receive is tested, and move
    /// every finished one on at once (the default); off, only the oldest receive moves.
    ahead: bool,
}

impl PluginRecvComm {
    pub(super) fn new(plugin: Arc<Plugin>, comm: *mut c_void, shared: CommShared) -> PluginRecvComm {
        let ahead = shared.test_ahead;
        PluginRecvComm {
            core: CommCore::new(plugin, comm, shared, "receive"),
            queue: VecDeque::new(),
            next_id: 0,
            unpack: None,
            device: None,
            anchor: None,
            spare: None,
            scratch: None,
            metas: Vec::new(),
            runs: Vec::new(),
            ahead,
        }
    }

    pub(super) fn set_unpack(&mut self, view: UnpackView) {
        #[cfg(test)]
        let view = {
            let mut view = view;
            if let Some(len) = self.core.gpus.stand_in_pool_len() {
                view.pretend_device_pool(len);
            }
            view
        };
        self.unpack = Some(view);
    }

    /// The plugin's own device pool, where it has one.
    fn plugin_pool(&self) -> Option<DevicePool> {
        self.unpack.as_ref().and_then(UnpackView::device_pool)
    }

    /// The device memory this comm's receives are unpacked from: the plugin's pool, else the
    /// comm's scratch once made.
    fn device_pool(&self) -> Option<DevicePool> {
        self.plugin_pool().or_else(|| self.scratch.as_ref().map(Scratch::pool))
    }

    /// Tests the plugin's oldest unfinished receive, and while it reports one done, the next: each
    /// `test` progresses the whole comm. `head` is the oldest receive not reported to the caller.
    fn test_plugin(&mut self, head: usize) -> Result<()> {
        let Some(mut idx) = self.queue.iter().position(|r| r.state == RecvState::Posted) else { return Ok(()) };
        if !self.ahead && idx != head {
            return Ok(());
        }
        while idx < self.queue.len() {
            let (mut done, mut size): (c_int, c_int) = (0, -1);
            let request = self.queue[idx].request;
            let (rc, since) = self.core.plugin.call(|t| {
                let test = t.test.expect("checked at load");
                let since = mark();
                // SAFETY: the oldest receive of this live comm the plugin has not reported done.
                (unsafe { test(request, &mut done, &mut size) }, since)
            });
            if rc != NCCL_SUCCESS {
                return Err(plugin_error("test of a receive", rc, since));
            }
            if done == 0 {
                return Ok(());
            }
            self.queue[idx].state = RecvState::Completed;
            if !self.ahead {
                return Ok(());
            }
            idx += 1;
        }
        Ok(())
    }

    /// Reads and checks the fragments of the receive at `idx`, which the plugin reported done, and
    /// gathers them on the CPU when both pool and destination are host memory.
    fn land(&mut self, idx: usize) -> Result<Landing> {
        let Some(view) = &self.unpack else {
            let r = &self.queue[idx];
            // The plugin wrote the buffer posted, at its size: the pieces' scratch slot, as one
            // fragment for the unpacker to scatter, or the destination itself.
            let Some(slot) = r.scratch else { return Ok(Landing::Landed(r.len)) };
            let src_off = u32::try_from(slot * MAX_MESSAGE).map_err(|_| Error::internal("scratch offset"))?;
            self.metas.clear();
            self.metas.push(LoadMeta { src_off, len: r.len as u32, dst_off: 0 });
            return Ok(Landing::Unpack { total: r.len });
        };
        let r = &self.queue[idx];
        // Slots are taken in posting order, one per receive, and freed in order by consumption.
        let slot = (r.id % UNPACK_QUEUE_DEPTH as u64) as usize;
        let count = gather::check_count(view.fragment_count(slot))?;
        if count == 0 {
            // Nothing went through the pool: a zero-byte message, or (a plugin's host receive)
            // bytes that landed in the buffer directly, whose size the plugin does not report. A
            // vectored receive is posted against an anchor, never straight into its pieces.
            let direct = matches!(r.kind, MemKind::Host) && !r.lands && r.pieces.is_none();
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
                // SAFETY: `plan` checked every run against the pool and the posted length (the
                // pieces' total for a vectored receive); the pool is the plugin's, whose pages
                // stay this receive's until `irecv_consumed`, and the destination is ours by the
                // irecv contract.
                unsafe {
                    match &r.pieces {
                        Some(pieces) => gather::copy_runs_to_pieces(pool, pieces, &self.runs),
                        None => gather::copy_runs(pool, r.data as *mut u8, &self.runs),
                    }
                };
                Ok(Landing::Landed(total))
            }
        }
    }

    /// Host memory a vectored receive of a host pool is posted against when none of its
    /// registrations holds its total, and this comm's registration of it, made on first use.
    /// Never written (pieces are gathered from the pool), so its pages are never touched.
    fn spare(&mut self) -> Result<(usize, *mut c_void)> {
        if self.spare.is_none() {
            let buf = vec![0u8; MAX_MESSAGE].into_boxed_slice();
            let key = self.core.register(buf.as_ptr() as usize, buf.len(), MemKind::Host, false)?;
            self.spare = Some((buf, key));
        }
        let (buf, key) = self.spare.as_ref().expect("set above");
        let mhandle = self.core.mhandle(*key).expect("the spare stays registered until close");
        Ok((buf.as_ptr() as usize, mhandle))
    }

    /// Posts a receive into a scratch slot (made on first use), or declines while every slot is
    /// taken: a chunk of many device pieces, or a host destination the plugin is not given
    /// (`CommCore::stages_host`), which then lands through a landing slot. `key` (the
    /// destination's registration, taken into use) is released here if nothing is posted.
    fn post_scratch(
        &mut self,
        key: usize,
        kind: MemKind,
        data: usize,
        len: usize,
        pieces: Option<Box<[DstPiece]>>,
    ) -> Result<Option<RequestId>> {
        let device = match kind {
            MemKind::Cuda { device } => Some(device),
            MemKind::Host => self.core.gpus.engine_ordinal().filter(|_| self.core.stages_host()),
        };
        let taken = match device {
            Some(device) => self.scratch_slot(device),
            None => Err(Error::new(
                UcclStatus::ErrNotSupported,
                "a receive into host memory from a net plugin that writes the buffer posted, with no GPU to stage \
                 it through",
            )),
        };
        let (slot, at, mhandle) = match taken {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                self.core.release(key);
                return Ok(None);
            }
            Err(e) => {
                self.core.release(key);
                return Err(self.core.fail(e));
            }
        };
        let lands = kind == MemKind::Host;
        self.post((at as *mut c_void, mhandle), data, len, key, kind, lands, pieces, Some(slot))
    }

    /// A free scratch slot's index and address and the scratch's registration, the scratch made on
    /// first use on GPU `device`; `None` while every slot is taken.
    fn scratch_slot(&mut self, device: i32) -> Result<Option<(usize, usize, *mut c_void)>> {
        if self.scratch.is_none() {
            let memory = DeviceBuffer::new(device, SCRATCH_SLOTS * MAX_MESSAGE)?;
            let key = self.core.register(memory.addr(), memory.len(), MemKind::Cuda { device }, false)?;
            self.scratch = Some(Scratch { memory, key, free: (0..SCRATCH_SLOTS).rev().collect() });
        }
        let scratch = self.scratch.as_mut().expect("set above");
        let on = scratch.memory.gpu().ordinal();
        if on != device {
            return Err(Error::new(
                UcclStatus::ErrNotSupported,
                format!("pieces on GPU {device} for a receive comm whose scratch is on GPU {on}"),
            ));
        }
        let Some(slot) = scratch.free.pop() else { return Ok(None) };
        let (addr, key) = (scratch.memory.addr() + slot * MAX_MESSAGE, scratch.key);
        let mhandle = self.core.mhandle(key).expect("the scratch stays registered until close");
        Ok(Some((slot, addr, mhandle)))
    }

    /// The landing slots this comm's host destinations go through: the anchor's GPU's, else the
    /// scratch's.
    fn landing_slots(&self) -> Result<Arc<HostLanding>> {
        match (&self.anchor, &self.scratch) {
            (Some((landing, _)), _) => Ok(landing.clone()),
            (None, Some(scratch)) => self.core.gpus.landing(scratch.memory.gpu().ordinal()),
            (None, None) => Err(Error::internal("a host destination landing on a comm without a device pool")),
        }
    }

    /// The anchor's address and this comm's registration of it, made on first use.
    fn anchor(&mut self) -> Result<(usize, *mut c_void)> {
        if self.anchor.is_none() {
            let pool = self.plugin_pool().ok_or_else(|| {
                Error::new(UcclStatus::ErrInternal, "landing a host receive on a comm without a device pool")
            })?;
            let landing = self.core.gpus.landing(pool.ordinal)?;
            let (addr, len) = landing.anchor();
            let key = self.core.register(addr, len, MemKind::Cuda { device: pool.ordinal }, false)?;
            self.anchor = Some((landing, key));
        }
        let (landing, key) = self.anchor.as_ref().expect("set above");
        let mhandle = self.core.mhandle(*key).expect("the anchor stays registered until close");
        Ok((landing.anchor().0, mhandle))
    }

    /// Posts one receive of `len` bytes at `ptr` with `mhandle` for the request whose destination
    /// is `data` (registration `key`, taken into use by the caller and released here if nothing is
    /// posted), or `pieces`.
    #[allow(clippy::too_many_arguments)]
    fn post(
        &mut self,
        (mut ptr, mut mhandle): (*mut c_void, *mut c_void),
        data: usize,
        len: usize,
        key: usize,
        kind: MemKind,
        lands: bool,
        pieces: Option<Box<[DstPiece]>>,
        scratch: Option<usize>,
    ) -> Result<Option<RequestId>> {
        let mut size = len as c_int;
        let mut tag: c_int = 0;
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
            if let (Some(slot), Some(s)) = (scratch, self.scratch.as_mut()) {
                s.free.push(slot);
            }
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
            data,
            len,
            mr: key,
            kind,
            lands,
            slot: None,
            copy: None,
            pieces,
            scratch,
            state: RecvState::Posted,
        });
        self.core.count(1);
        Ok(Some(RequestId(id)))
    }

    /// This comm's pool, GPU and (shared) unpacker, set up on first use.
    fn device_unpack(&mut self) -> Result<&DeviceUnpack> {
        if self.device.is_none() {
            let pool = self.device_pool().ok_or_else(|| {
                Error::new(UcclStatus::ErrInternal, "GPU unpack of a receive comm without a device pool")
            })?;
            let (gpu, unpacker) = self.core.gpus.unpack_device(pool.ordinal)?;
            self.device = Some(DeviceUnpack { gpu, pool, unpacker });
        }
        Ok(self.device.as_ref().expect("set above"))
    }

    /// Moves every receive from `head` on (only `head` without `ahead`) that the plugin finished
    /// towards its destination: gathered on the CPU from a host pool; from a device pool, submitted
    /// to the unpacker in posting order, launched when the GPU has nothing else to do or the batch
    /// is large, copied out of its landing slot once unpacked, and ready once its bytes are in place.
    ///
    /// Launching only while no earlier launch runs batches receives of all comms that complete
    /// meanwhile into one kernel, and adds no latency when the GPU is idle.
    fn settle(&mut self, head: usize) -> Result<()> {
        let end = if self.ahead { self.queue.len() } else { head + 1 };
        if self.device_pool().is_none() {
            for idx in head..end {
                if self.queue[idx].state != RecvState::Completed {
                    continue;
                }
                match self.land(idx)? {
                    Landing::Landed(total) => self.queue[idx].state = RecvState::Ready { total },
                    Landing::Unpack { .. } => {
                        return Err(Error::internal("a receive from a host pool asked for the GPU unpack"));
                    }
                }
            }
            return Ok(());
        }
        if !self.queue.range(head..end).any(|r| {
            matches!(r.state, RecvState::Completed | RecvState::Unpacking { .. } | RecvState::CopyingOut { .. })
        }) {
            return Ok(());
        }
        let (gpu, pool, unpacker) = {
            let d = self.device_unpack()?;
            (d.gpu.clone(), d.pool, d.unpacker.clone())
        };
        let _current = gpu.as_ref().map(|g| g.enter()).transpose()?;
        let mut unpacker = unpacker.lock();
        let watermark = unpacker.poll()?;
        // Receives are handed to the unpacker in posting order: the first that has to wait holds
        // back the ones after it.
        let mut held_back = false;
        for idx in head..end {
            match self.queue[idx].state {
                RecvState::Completed if !held_back => {
                    held_back = !self.submit(idx, head, pool, &mut *unpacker)?;
                }
                RecvState::Unpacking { ticket, total } if ticket < watermark => {
                    let r = &mut self.queue[idx];
                    r.state = match r.slot.take() {
                        Some(slot) => {
                            // SAFETY: the kernel that gathered `total` ≤ posted bytes into the slot
                            // finished (its ticket is below the watermark); the destination (the
                            // pieces of a vectored receive) is ours by the irecv contract until
                            // the copy finished.
                            r.copy = Some(unsafe {
                                match &r.pieces {
                                    Some(pieces) => slot.copy_out_pieces(pieces, total),
                                    None => slot.copy_out(r.data as *mut u8, total),
                                }
                            });
                            RecvState::CopyingOut { total }
                        }
                        None => RecvState::Ready { total },
                    };
                }
                _ => {}
            }
            let r = &mut self.queue[idx];
            if let RecvState::CopyingOut { total } = r.state
                && r.copy.as_ref().expect("set with the state").finished()?
            {
                r.copy = None;
                r.state = RecvState::Ready { total };
            }
        }
        let launched_below = unpacker.submitted() - unpacker.pending_receives() as u64;
        let waiting = self
            .queue
            .range(head..end)
            .any(|r| matches!(r.state, RecvState::Unpacking { ticket, .. } if ticket >= launched_below));
        if waiting && (unpacker.launches_in_flight() == 0 || unpacker.pending_tiles() >= BATCH_TILES) {
            unpacker.launch()?;
        }
        Ok(())
    }

    /// Hands the receive at `idx`, which the plugin finished, to the unpacker; false when it has to
    /// wait (no landing slot, or no room in the unpacker).
    fn submit(
        &mut self,
        idx: usize,
        head: usize,
        pool: DevicePool,
        unpacker: &mut dyn super::gpu::BatchUnpack,
    ) -> Result<bool> {
        let total = match self.land(idx)? {
            Landing::Landed(total) => {
                self.queue[idx].state = RecvState::Ready { total };
                return Ok(true);
            }
            Landing::Unpack { total } => total,
        };
        if self.queue[idx].lands && self.queue[idx].slot.is_none() {
            // The oldest receive always may take a slot; later ones only a few, so that other
            // comms' oldest receives find one.
            let held = self.queue.range(head..idx).filter(|r| r.holds_slot()).count();
            if idx != head && held >= PER_COMM {
                return Ok(false);
            }
            let landing = self.landing_slots()?;
            match landing.take() {
                Some(slot) => self.queue[idx].slot = Some(slot),
                None => return Ok(false),
            }
        }
        let r = &self.queue[idx];
        let (dst, dst_len) = match &r.slot {
            Some(slot) => (slot.device_ptr(), r.len as u64),
            None => (r.data as u64, r.len as u64),
        };
        let layout = ReceiveLayout { pool: pool.addr, pool_len: pool.len, dst, dst_len };
        // A device destination of pieces: the fragment list composed with them, every tile
        // straight from the pool into its piece. Into a slot, the message goes whole.
        let pieces = match (&r.slot, &r.pieces) {
            (None, Some(pieces)) => &pieces[..],
            _ => &[],
        };
        // SAFETY: the pool is the plugin's device memory on this GPU, valid until the comm closes
        // (which waits for the unpacker first), and its pages stay the receive's until
        // `irecv_consumed`, which the caller may only call after it was reported done; the
        // destination (each piece of a vectored one) is device memory of the same GPU that the
        // irecv contract gives us, or the receive's landing slot.
        match unsafe { unpacker.submit(&layout, pieces, &self.metas)? } {
            Submit::Queued(ticket) => {
                self.queue[idx].state = RecvState::Unpacking { ticket, total };
                Ok(true)
            }
            Submit::Full => Ok(false),
        }
    }

    /// Hands the oldest receive back to the plugin, which then reuses its slot and pages (where
    /// its receives are consumed at all: TCPXO's are not).
    fn consume_head(&mut self) -> Result<()> {
        let head = self.queue.pop_front().expect("checked by the caller");
        let comm = self.core.comm;
        let (rc, since) = match self.core.plugin.profile.consumes_receives {
            true => self.core.plugin.call(|t| {
                let consumed = t.irecv_consumed.expect("checked at load");
                let since = mark();
                // SAFETY: the oldest completed, unconsumed receive of this live comm.
                (unsafe { consumed(comm, 1, head.request) }, since)
            }),
            false => (NCCL_SUCCESS, 0),
        };
        self.core.release(head.mr);
        self.core.count(-1);
        if let (Some(slot), Some(s)) = (head.scratch, self.scratch.as_mut()) {
            s.free.push(slot);
        }
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
        check_size(len, "receive")?;
        if self.queue.len() >= MAX_REQUESTS {
            return Ok(None);
        }
        let (key, mhandle, kind) = self.core.acquire(data as usize, len, mr)?;
        if kind == MemKind::Host && self.core.stages_host() {
            return self.post_scratch(key, kind, data as usize, len, None);
        }
        // A host destination with a GPU pool never reaches the plugin as a host receive (which
        // TCPX's steered sockets cannot serve): it is posted against the anchor instead.
        let lands = matches!(kind, MemKind::Host) && self.plugin_pool().is_some();
        let target = match lands {
            true => match self.anchor() {
                Ok((addr, anchor_mhandle)) => (addr as *mut c_void, anchor_mhandle),
                Err(e) => {
                    self.core.release(key);
                    return Err(self.core.fail(e));
                }
            },
            false => (data.cast(), mhandle),
        };
        self.post(target, data as usize, len, key, kind, lands, None, None)
    }

    /// One request for all the pieces, posted for their total at a window of their registration
    /// (TCPX never writes a CUDA receive's buffer: the bytes stay in its pool and `dst_off` counts
    /// from the request), or against the landing anchor for host pieces with a device pool. Its
    /// fragments are then composed with the pieces: the unpack kernel (or the CPU, from a host
    /// pool) copies each straight from the pool into the piece it belongs to, and host pieces with
    /// a device pool land whole in a slot that is copied out piece by piece.
    unsafe fn irecvv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        if let ([one], [run]) = (iov, mrs) {
            // SAFETY: per the contract.
            return unsafe { self.irecv(one.addr as *mut u8, one.len, run.mr) };
        }
        self.core.check()?;
        if self.queue.len() >= MAX_REQUESTS {
            return Ok(None);
        }
        let segs = self.core.acquire_segments(iov, mrs, "receive")?;
        let (key, kind, total) = (segs.key, segs.kind, segs.total);
        if self.unpack.is_none() {
            // The plugin writes the buffer posted: the pieces land in a scratch slot first.
            let pieces = gather::pieces(iov.iter().map(|s| (s.addr, s.len))).into_boxed_slice();
            return self.post_scratch(key, kind, iov[0].addr, total, Some(pieces));
        }
        let lands = matches!(kind, MemKind::Host) && self.plugin_pool().is_some();
        // Pieces of several regions none of which holds their total: posted against memory of the
        // comm's own of their kind, which the plugin never writes either.
        let stand_in = !lands && segs.room.is_none() && mrs.len() > 1;
        let target = match (lands, segs.room) {
            (true, _) => self.anchor(),
            (false, Some((at, room_key))) => self.core.mhandle(room_key).map(|m| (at, m)).ok_or_else(|| {
                Error::new(UcclStatus::ErrInternal, format!("registration {room_key} has no plugin handle"))
            }),
            (false, None) if stand_in && matches!(kind, MemKind::Cuda { .. }) => self.anchor(),
            (false, None) if stand_in => self.spare(),
            (false, None) => Err(Error::invalid(format!(
                "the {total} bytes of a vectored receive's pieces exceed their registration: pieces overlap"
            ))),
        };
        let target = match target {
            Ok((at, mhandle)) => (at as *mut c_void, mhandle),
            Err(e) => {
                self.core.release(key);
                return Err(if lands || stand_in { self.core.fail(e) } else { e });
            }
        };
        let pieces = gather::pieces(iov.iter().map(|s| (s.addr, s.len))).into_boxed_slice();
        self.post(target, iov[0].addr, total, key, kind, lands, Some(pieces), None)
    }

    fn test(&mut self, req: RequestId) -> Result<Option<usize>> {
        self.core.check()?;
        let head = self.queue.iter().position(|r| r.state != RecvState::Done);
        let Some(head) = head.filter(|i| self.queue[*i].id == req.0) else {
            return Err(out_of_order(req, head.map(|i| self.queue[i].id), "test"));
        };
        if let Err(e) = self.test_plugin(head).and_then(|()| self.settle(head)) {
            return Err(self.core.fail(e));
        }
        match self.queue[head].state {
            RecvState::Ready { total } => {
                self.queue[head].state = RecvState::Done;
                Ok(Some(total))
            }
            _ => Ok(None),
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
            let _current = device.gpu.as_ref().map(|g| g.enter());
            if let Err(e) = device.unpacker.lock().finish() {
                log::warn!("closing a net plugin receive comm: the GPU unpack failed: {e}");
                unpacked = false;
            }
        }
        // The copiers write destinations the caller gets back once this returns.
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
            // ... nor read the scratch, which is never freed.
            if let Some(scratch) = self.scratch.take() {
                std::mem::forget(scratch.memory);
            }
        }
        // Completed receives go back first, so the plugin does not close over unreturned pages.
        while self.core.failure.is_none()
            && self.queue.front().is_some_and(|r| match r.state {
                RecvState::Posted => false,
                RecvState::Unpacking { .. } => unpacked,
                RecvState::Completed | RecvState::CopyingOut { .. } | RecvState::Ready { .. } | RecvState::Done => true,
            })
        {
            if self.consume_head().is_err() {
                break;
            }
        }
        self.core.close(self.queue.len(), |t| t.close_recv.expect("checked at load"));
    }
}
