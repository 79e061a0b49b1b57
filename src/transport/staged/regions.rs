//! The part both staged comm kinds share: the registrations handed out (each says whether its
//! memory is host, passed to the inner comm, or device, staged) and the comm's staging ring. The
//! ring is made as the comm is, for the engine's GPU when one is known (`Staging::prepare`), so a
//! connection's first device transfer allocates and pins nothing; memory of another GPU of the
//! process gets a lane of that GPU's streams and events in the same ring when it is registered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::setup::Setup;
use crate::cuda::{self, Gpu, Location, StagingRing};
use crate::error::{Error, Result, UcclStatus};
use crate::transport::{IoSeg, MemKind, MrHandle, RecvComm, SendComm};

/// Registration calls of the wrapped comm, whichever direction it moves.
pub(super) trait InnerRegistry {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle>;
    fn deregister(&mut self, mr: MrHandle);
    /// Asks a receiving comm to write what lands in `[addr, addr + len)` back from the CPU's
    /// caches, for the copies up that read it next ([`RecvComm::write_back_received`]); a
    /// sending comm's slots are written by the copy engine and need nothing.
    fn read_by_dma(&mut self, _addr: usize, _len: usize) -> bool {
        false
    }
}

impl InnerRegistry for Box<dyn SendComm> {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.reg_mr(addr, len, kind)
    }
    fn deregister(&mut self, mr: MrHandle) {
        self.dereg_mr(mr)
    }
}

impl InnerRegistry for Box<dyn RecvComm> {
    fn register(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle> {
        self.reg_mr(addr, len, kind)
    }
    fn deregister(&mut self, mr: MrHandle) {
        self.dereg_mr(mr)
    }
    fn read_by_dma(&mut self, addr: usize, len: usize) -> bool {
        self.write_back_received(addr, len)
    }
}

#[derive(Clone, Copy, Debug)]
enum Registered {
    /// Host memory: the inner comm's own handle for it.
    Host {
        inner: MrHandle,
    },
    Device {
        base: usize,
        len: usize,
        device: i32,
    },
}

/// How one posted buffer travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// Straight through the inner comm, with its handle.
    Direct(MrHandle),
    /// Through a staging slot, copied on the lane of this GPU (the memory's own).
    Staged(i32),
}

impl Route {
    pub(super) fn staged(self) -> bool {
        matches!(self, Route::Staged(_))
    }
}

/// What staged comms of this process set up, and when: for tests, which have no other view of
/// whether a connection's first transfer allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounts {
    /// Rings made as their comm was.
    pub at_connect: u64,
    /// Rings made by a comm's first registration or post of device memory.
    pub on_first_use: u64,
    /// Lanes added to a ring for memory of another GPU.
    pub lanes_added: u64,
}

static AT_CONNECT: AtomicU64 = AtomicU64::new(0);
static ON_FIRST_USE: AtomicU64 = AtomicU64::new(0);
static LANES_ADDED: AtomicU64 = AtomicU64::new(0);

pub fn ring_counts() -> RingCounts {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    RingCounts { at_connect: get(&AT_CONNECT), on_first_use: get(&ON_FIRST_USE), lanes_added: get(&LANES_ADDED) }
}

pub(super) struct Staging {
    pub(super) setup: Setup,
    registered: HashMap<usize, Registered>,
    next_handle: usize,
    /// Made on first use of device memory; `ring_mr` is its registration with the inner comm.
    pub(super) ring: Option<StagingRing>,
    pub(super) ring_mr: MrHandle,
}

impl Staging {
    pub(super) fn new(setup: Setup) -> Staging {
        Staging { setup, registered: HashMap::new(), next_handle: 1, ring: None, ring_mr: MrHandle::NONE }
    }

    /// Makes the ring for the engine's GPU now, as the comm is made, when the engine names one:
    /// its pinned slots, streams and events would otherwise cost the connection's first device
    /// transfer milliseconds. A failure leaves it to the first use, which reports it.
    pub(super) fn prepare(&mut self, inner: &mut dyn InnerRegistry) {
        let Some(gpu) = self.setup.gpu.get().cloned() else { return };
        match self.make_ring(inner, &gpu) {
            Ok(()) => {
                AT_CONNECT.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("staging ring for GPU {} not made with its comm: {e}", gpu.ordinal()),
        }
    }

    pub(super) fn register(
        &mut self,
        inner: &mut dyn InnerRegistry,
        addr: usize,
        len: usize,
        kind: MemKind,
    ) -> Result<MrHandle> {
        let entry = match kind {
            MemKind::Host => {
                // The inner comm would read or write it from the CPU: device memory there is a crash.
                if let Location::Device { ordinal } = cuda::locate(addr, len)? {
                    return Err(Error::invalid(format!(
                        "[{addr:#x}, +{len}) was registered as host memory but is memory of GPU {ordinal}"
                    )));
                }
                Registered::Host { inner: inner.register(addr, len, kind)? }
            }
            MemKind::Cuda { device } => {
                cuda::driver().map_err(|e| e.context("cannot register GPU memory"))?;
                let found = cuda::locate(addr, len)?;
                if found != (Location::Device { ordinal: device }) {
                    return Err(Error::invalid(format!(
                        "[{addr:#x}, +{len}) was registered as memory of GPU {device} but is {found:?}"
                    )));
                }
                self.ring(inner, device)?;
                Registered::Device { base: addr, len, device }
            }
        };
        // Never 0: that is MrHandle::NONE.
        let handle = self.next_handle;
        self.next_handle += 1;
        self.registered.insert(handle, entry);
        Ok(MrHandle(handle))
    }

    pub(super) fn deregister(&mut self, inner: &mut dyn InnerRegistry, mr: MrHandle) {
        if let Some(Registered::Host { inner: handle }) = self.registered.remove(&mr.0) {
            inner.deregister(handle);
        }
    }

    /// How `[addr, addr + len)` posted with `mr` travels. With no handle (the engine's own small
    /// buffers, or callers that never register) the pointer itself says, when a driver exists.
    pub(super) fn route(
        &mut self,
        inner: &mut dyn InnerRegistry,
        mr: MrHandle,
        addr: usize,
        len: usize,
    ) -> Result<Route> {
        let device = if mr == MrHandle::NONE {
            match cuda::locate(addr, len.max(1))? {
                Location::Host => return Ok(Route::Direct(MrHandle::NONE)),
                Location::Device { ordinal } => ordinal,
            }
        } else {
            match self.registered.get(&mr.0) {
                None => return Err(Error::invalid(format!("memory registration {} is unknown to this comm", mr.0))),
                Some(Registered::Host { inner }) => return Ok(Route::Direct(*inner)),
                Some(&Registered::Device { base, len: region_len, device }) => {
                    let inside = addr >= base && addr.checked_add(len).is_some_and(|end| end <= base + region_len);
                    if !inside {
                        return Err(Error::invalid(format!(
                            "buffer [{addr:#x}, +{len}) lies outside its GPU registration [{base:#x}, +{region_len})"
                        )));
                    }
                    device
                }
            }
        };
        let slot_size = self.ring(inner, device)?.slot_size();
        if len > slot_size {
            return Err(Error::invalid(format!(
                "a {len}-byte GPU chunk exceeds the {slot_size}-byte staging slot (UCCL_TCPX_CHUNK_SIZE)"
            )));
        }
        Ok(Route::Staged(device))
    }

    /// How the segments of a vectored request posted with `mr` travel: all of them the same way
    /// (one registration holds them), in one slot when staged.
    pub(super) fn route_segments(
        &mut self,
        inner: &mut dyn InnerRegistry,
        mr: MrHandle,
        iov: &[IoSeg],
    ) -> Result<Route> {
        let Some((first, rest)) = iov.split_first() else {
            return Err(Error::invalid("a vectored request needs at least one segment"));
        };
        let route = self.route(inner, mr, first.addr, first.len)?;
        if matches!(route, Route::Direct(_)) && mr != MrHandle::NONE {
            // A host registration: the inner comm checks nothing per segment either.
            return Ok(route);
        }
        for seg in rest {
            if self.route(inner, mr, seg.addr, seg.len)? != route {
                return Err(Error::invalid(
                    "the segments of one request lie in host memory and GPU memory, or on two GPUs",
                ));
            }
        }
        let total = iov.iter().map(|s| s.len).sum::<usize>();
        if route.staged() && total > self.ring_mut()?.slot_size() {
            return Err(Error::invalid(format!(
                "a {total}-byte GPU chunk exceeds the {}-byte staging slot (UCCL_TCPX_CHUNK_SIZE)",
                self.ring_mut()?.slot_size()
            )));
        }
        Ok(route)
    }

    /// The ring, staging memory of GPU `device`: made on first use where the comm was made
    /// without it (the engine named no GPU then), given a lane of `device` where it has none.
    fn ring(&mut self, inner: &mut dyn InnerRegistry, device: i32) -> Result<&mut StagingRing> {
        match &mut self.ring {
            Some(ring) if ring.stages(device) => {}
            Some(ring) => {
                ring.add_gpu(&Gpu::open(device)?)?;
                ring.prepare_kernels();
                LANES_ADDED.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.make_ring(inner, &Gpu::open(device)?)?;
                ON_FIRST_USE.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ring.as_mut().ok_or_else(|| Error::new(UcclStatus::ErrInternal, "staging ring missing"))
    }

    fn make_ring(&mut self, inner: &mut dyn InnerRegistry, gpu: &Arc<Gpu>) -> Result<()> {
        let params = self.setup.params;
        let mut ring = StagingRing::new(gpu, params.slot_size, params.slots, params.streams())?;
        ring.set_gather(params.tuning.gather);
        ring.prepare_kernels();
        let (base, len) = ring.host_range();
        self.register_ring_range(inner, base, len)?;
        self.ring = Some(ring);
        Ok(())
    }

    pub(super) fn ring_mut(&mut self) -> Result<&mut StagingRing> {
        self.ring.as_mut().ok_or_else(|| Error::new(UcclStatus::ErrInternal, "staged request without a staging ring"))
    }

    /// Registers the ring's host range `[base, base + len)` with the inner comm, and asks a
    /// receiving one to write what lands there back from the CPU's caches (with the knob on).
    pub(super) fn register_ring_range(&mut self, inner: &mut dyn InnerRegistry, base: usize, len: usize) -> Result<()> {
        self.ring_mr = inner.register(base, len, MemKind::Host)?;
        if self.setup.params.tuning.write_back {
            // For the inner comm's life: the ring is released only as the comm closes.
            inner.read_by_dma(base, len);
        }
        Ok(())
    }

    /// Lets go of the ring's inner registration before the comm closes, if nothing uses it.
    pub(super) fn release_ring_registration(&mut self, inner: &mut dyn InnerRegistry, idle: bool) {
        if idle && self.ring.is_some() {
            inner.deregister(std::mem::replace(&mut self.ring_mr, MrHandle::NONE));
        }
    }
}
