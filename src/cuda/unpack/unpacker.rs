//! Batches completed receives into kernel launches and reports when they are finished.
//!
//! Built for a transport's progress thread: `submit` each receive whose `test` reported done,
//! `launch` when a batch is worth sending or nothing else is pending, and `poll` (one
//! `cuEventQuery` per launch still running) to learn which receives may now be handed back to
//! the plugin with `irecv_consumed`.
//!
//! Receives get consecutive tickets in submission order, and launches run in that order on one
//! stream, so completion is a single watermark: every receive with a ticket below
//! [`Unpacker::poll`]'s value is finished. The caller consumes them in ticket order, which is
//! posting order per comm as long as it submits them in that order.
//!
//! Everything a launch needs is allocated once: a ring of slots, each with a pinned, device-mapped
//! tile buffer, a device tile buffer and an event. The open batch is planned straight into the
//! next slot's pinned buffer. A launch of up to [`UnpackerConfig::inline_tiles`] tiles carries
//! them in the kernel parameters; a larger one lets the kernel read the pinned buffer through its
//! mapping ([`BulkTiles::Mapped`]) or copies it to the device first ([`BulkTiles::Copy`]). A slot
//! is reused only after its event completed, so neither buffer is overwritten while the GPU may
//! read it.
//!
//! The defaults follow measurements on H200 (docs/PERFORMANCE.md): a parameter block costs GPU
//! time roughly in proportion to its size (about +1 us for 128 tiles, +2 us for 1024, +3.6 us for
//! the 32 KiB block), a mapped read costs about one PCIe round trip (+1 to +3 us) whatever the count, and a
//! copy-engine upload +5 to +14 us. Parameters win on latency for one receive (one 512 KiB receive
//! of whole pages is 128 tiles), so launches of up to 255 tiles go inline and larger ones mapped.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::kernels::{InlineTiles, UnpackKernels};
use super::memory::{DeviceTiles, Event, PinnedTiles, driver_error};
use super::plan::{PlanError, PlanStats, ReceiveLayout, plan_receive};
use crate::error::{Error, Result};
use crate::transport::plugin::abi::LoadMeta;

/// Sizes of the unpacker's preallocated ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackerConfig {
    /// CUDA device (its primary context is used).
    pub ordinal: usize,
    /// Tiles (4 KiB each at most) one launch can carry; 16384 holds 64 MiB of whole pages.
    pub tiles_per_launch: usize,
    /// Launches that may be running before `submit` reports [`Submit::Full`].
    pub launches_in_flight: usize,
    /// Launches of at most this many tiles carry them in the kernel parameters (capped at what
    /// the driver allows, [`UnpackKernels::max_inline`]). Default: 255, the small variant (4 KiB of parameters).
    pub inline_tiles: usize,
    /// How larger launches get their tiles. Default: mapped.
    pub bulk: BulkTiles,
}

/// How the tiles of a launch too large for its parameters reach the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkTiles {
    /// One host-to-device copy from the pinned slot into the slot's device buffer, on the
    /// unpack stream just before the kernel. Measured slower than `Mapped`: the copy engine's
    /// start-up dominates a few hundred KiB of tiles.
    Copy,
    /// The kernel reads the pinned slot through its device mapping: one PCIe read per tile,
    /// issued by all warps at once, and no copy operation to wait for.
    Mapped,
}

impl Default for UnpackerConfig {
    fn default() -> UnpackerConfig {
        UnpackerConfig {
            ordinal: 0,
            tiles_per_launch: 16384,
            launches_in_flight: 8,
            inline_tiles: super::kernels::INLINE_SMALL,
            bulk: BulkTiles::Mapped,
        }
    }
}

/// What [`Unpacker::submit`] did with a receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// Planned into the open batch; the ticket orders it among all receives of this unpacker.
    Queued(u64),
    /// Every slot is still running: nothing was queued. Poll, then submit again.
    Full,
}

struct Slot {
    host: PinnedTiles,
    /// Only for [`BulkTiles::Copy`].
    device: Option<DeviceTiles>,
    event: Event,
    /// Receives with tickets below this are finished once `event` completed.
    finishes_below: u64,
}

pub struct Unpacker {
    // Declared before `stream` and `kernels` so that they drop while the context is still alive.
    slots: Vec<Slot>,
    params: Box<InlineTiles>,
    stream: Arc<CudaStream>,
    kernels: Arc<UnpackKernels>,
    inline_tiles: usize,
    /// Slot of the open batch.
    next: usize,
    /// Launched slots whose events have not been seen complete: the `in_flight` slots before `next`.
    in_flight: usize,
    open_tiles: usize,
    open_receives: usize,
    submitted: u64,
    completed: u64,
    failed: Option<Error>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker")
            .field("kernels", &self.kernels)
            .field("slots", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .field("open_receives", &self.open_receives)
            .field("submitted", &self.submitted)
            .field("completed", &self.completed)
            .finish()
    }
}

impl Unpacker {
    pub fn new(config: UnpackerConfig) -> Result<Unpacker> {
        if config.tiles_per_launch == 0 || config.launches_in_flight == 0 {
            return Err(Error::invalid("unpack: tiles_per_launch and launches_in_flight must be at least 1"));
        }
        if config.tiles_per_launch > u32::MAX as usize / 2 {
            return Err(Error::invalid(format!("unpack: tiles_per_launch {} is too large", config.tiles_per_launch)));
        }
        let kernels = UnpackKernels::for_device(config.ordinal)?;
        let context = kernels.context().clone();
        context.bind_to_thread().map_err(|e| driver_error("bind context", e))?;
        let stream = context.new_stream().map_err(|e| driver_error("create stream", e))?;
        let mut slots = Vec::with_capacity(config.launches_in_flight);
        for _ in 0..config.launches_in_flight {
            slots.push(Slot {
                host: PinnedTiles::new(config.tiles_per_launch)?,
                device: match config.bulk {
                    BulkTiles::Copy => Some(DeviceTiles::new(config.tiles_per_launch)?),
                    BulkTiles::Mapped => None,
                },
                event: Event::new()?,
                finishes_below: 0,
            });
        }
        Ok(Unpacker {
            slots,
            params: InlineTiles::boxed(),
            inline_tiles: config.inline_tiles.min(kernels.max_inline()),
            stream,
            kernels,
            next: 0,
            in_flight: 0,
            open_tiles: 0,
            open_receives: 0,
            submitted: 0,
            completed: 0,
            failed: None,
        })
    }

    pub fn kernels(&self) -> &Arc<UnpackKernels> {
        &self.kernels
    }

    /// Checks and plans one completed receive into the open batch, launching that batch first if
    /// the receive does not fit. An invalid fragment list is an error and queues nothing; the
    /// unpacker stays usable.
    ///
    /// # Safety
    /// `layout.pool .. + pool_len` and `layout.dst .. + dst_len` must be device memory of this
    /// unpacker's device (or mapped into it) that stays valid until the receive is finished, and
    /// nothing else may write the destination range meanwhile.
    pub unsafe fn submit(&mut self, layout: &ReceiveLayout, metas: &[LoadMeta]) -> Result<Submit> {
        self.check_failed()?;
        if !self.open_slot_free()? {
            return Ok(Submit::Full);
        }
        match self.plan_into_open(layout, metas) {
            Ok(_) => {}
            Err(PlanError::Invalid(e)) => return Err(e),
            Err(PlanError::NoRoom { needed }) => {
                let capacity = self.slots[0].host.as_slice().len();
                if self.open_receives == 0 {
                    return Err(too_large(needed, capacity));
                }
                self.launch()?;
                if !self.open_slot_free()? {
                    return Ok(Submit::Full);
                }
                match self.plan_into_open(layout, metas) {
                    Ok(_) => {}
                    Err(PlanError::Invalid(e)) => return Err(e),
                    Err(PlanError::NoRoom { needed }) => return Err(too_large(needed, capacity)),
                }
            }
        }
        let ticket = self.submitted;
        self.submitted += 1;
        self.open_receives += 1;
        Ok(Submit::Queued(ticket))
    }

    fn plan_into_open(
        &mut self,
        layout: &ReceiveLayout,
        metas: &[LoadMeta],
    ) -> std::result::Result<PlanStats, PlanError> {
        let slot = &mut self.slots[self.next];
        plan_receive(layout, metas, slot.host.as_mut_slice(), &mut self.open_tiles)
    }

    /// Whether the open batch's slot is free, retiring finished launches if it is not.
    fn open_slot_free(&mut self) -> Result<bool> {
        if self.in_flight < self.slots.len() {
            return Ok(true);
        }
        self.poll()?;
        Ok(self.in_flight < self.slots.len())
    }

    /// Receives submitted but not yet launched.
    pub fn pending_receives(&self) -> usize {
        self.open_receives
    }

    /// Tiles of the open batch.
    pub fn pending_tiles(&self) -> usize {
        self.open_tiles
    }

    /// Launches still running as of the last poll.
    pub fn launches_in_flight(&self) -> usize {
        self.in_flight
    }

    /// Launches the open batch (one kernel, or none for a batch of empty receives, then one event).
    /// Returns false when nothing was pending. A failed launch leaves the unpacker failed: its
    /// receives' pages may be in any state and every later call returns the error.
    pub fn launch(&mut self) -> Result<bool> {
        self.check_failed()?;
        if self.open_receives == 0 {
            return Ok(false);
        }
        if let Err(e) = self.launch_open() {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(true)
    }

    fn launch_open(&mut self) -> Result<()> {
        self.kernels.context().bind_to_thread().map_err(|e| driver_error("bind context", e))?;
        let stream = self.stream.cu_stream();
        let slot = &mut self.slots[self.next];
        let tiles = &slot.host.as_slice()[..self.open_tiles];
        if !tiles.is_empty() {
            if tiles.len() <= self.inline_tiles {
                self.params.count = tiles.len() as u32;
                self.params.tiles[..tiles.len()].copy_from_slice(tiles);
                // SAFETY: the stream is ours and the context is current; the submit contract covers
                // the tiles' ranges.
                unsafe { self.kernels.launch_inline(stream, &self.params) }?;
            } else if let Some(device) = &slot.device {
                // SAFETY: pinned source and device destination both hold `tiles.len()` tiles and stay
                // untouched until this slot's event completes.
                unsafe { cudarc::driver::result::memcpy_htod_async(device.ptr(), tiles, stream) }
                    .map_err(|e| driver_error("copy tiles to the device", e))?;
                // SAFETY: as for the inline launch; the device tiles were just copied on this stream.
                unsafe { self.kernels.launch_device_tiles(stream, device.ptr(), tiles.len() as u32) }?;
            } else {
                // The tiles were written with plain stores; order them before the launch's doorbell
                // on weakly ordered hosts too.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
                // SAFETY: as for the inline launch; the pinned slot is not written again before this
                // slot's event completes.
                unsafe { self.kernels.launch_device_tiles(stream, slot.host.device_ptr(), tiles.len() as u32) }?;
            }
        }
        slot.event.record(stream)?;
        slot.finishes_below = self.submitted;
        self.in_flight += 1;
        self.next = (self.next + 1) % self.slots.len();
        self.open_tiles = 0;
        self.open_receives = 0;
        Ok(())
    }

    /// Retires finished launches (oldest first, one event query each) and returns the completion
    /// watermark: every receive whose ticket is below it is finished, and its bounce pages may be
    /// returned. Receives not yet launched are never reported finished.
    pub fn poll(&mut self) -> Result<u64> {
        self.check_failed()?;
        while self.in_flight > 0 {
            let oldest = (self.next + self.slots.len() - self.in_flight) % self.slots.len();
            match self.slots[oldest].event.is_complete() {
                Ok(true) => {
                    self.completed = self.slots[oldest].finishes_below;
                    self.in_flight -= 1;
                }
                Ok(false) => break,
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(self.completed)
    }

    /// The watermark as of the last poll, without querying anything.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Tickets handed out so far (the next receive gets this one).
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Launches whatever is pending and blocks until every submitted receive is finished; returns
    /// the watermark (then equal to [`submitted`](Self::submitted)). For teardown and tests, not
    /// for a progress loop.
    pub fn finish(&mut self) -> Result<u64> {
        self.launch()?;
        if self.in_flight > 0 {
            let newest = (self.next + self.slots.len() - 1) % self.slots.len();
            if let Err(e) = self.slots[newest].event.synchronize() {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        self.poll()
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(e.clone().context("unpacker failed earlier")),
            None => Ok(()),
        }
    }
}

fn too_large(needed: usize, capacity: usize) -> Error {
    Error::invalid(format!(
        "unpack: receive needs at least {needed} tiles, more than one launch holds ({capacity}); raise tiles_per_launch"
    ))
}

impl Drop for Unpacker {
    fn drop(&mut self) {
        // The GPU may still read the tile buffers and write destinations: wait before freeing.
        let _ = self.kernels.context().bind_to_thread();
        let _ = self.stream.synchronize();
    }
}

const _: () = {
    fn assert_send<T: Send>() {}
    let _ = assert_send::<Unpacker>;
};
