//! Batches completed receives into kernel launches and reports when they are finished.
//!
//! Built for a transport's progress thread: `submit` each receive whose `test` reported done,
//! `launch` when a batch is worth sending or nothing else is pending, and `poll` (one load of a
//! word in host memory per launch still running) to learn which receives may now be handed back
//! to the plugin with `irecv_consumed`.
//!
//! Receives get consecutive tickets in submission order, and launches run in that order on one
//! stream, so completion is a single watermark: every receive with a ticket below
//! [`Unpacker::poll`]'s value is finished. The caller consumes them in ticket order, which is
//! posting order per comm as long as it submits them in that order.
//!
//! Everything a launch needs is allocated once: a ring of slots, each with a pinned, device-mapped
//! tile buffer, a device tile buffer, a device block counter and a completion word in mapped host
//! memory (or an event, [`Completion::Event`]). The open batch is planned straight into the
//! next slot's pinned buffer. A launch of up to [`UnpackerConfig::inline_tiles`] tiles carries
//! them in the kernel parameters; a larger one lets the kernel read the pinned buffer through its
//! mapping ([`BulkTiles::Mapped`]) or copies it to the device first ([`BulkTiles::Copy`]). A slot
//! is reused only after its launch reported completion, so neither buffer is overwritten while the
//! GPU may read it.
//!
//! Completion ([`Completion::Word`], the default): each launch carries its sequence number and its
//! slot's counter and word; the last block to finish writes the number to the word after a
//! system-scope fence (kernel.cu), and `poll` reads the words in launch order. That replaces an
//! event record per launch and a `cuEventQuery` per poll, which cost about as much as the copy of
//! a 512 KiB receive on the H200 VM of docs/PERFORMANCE.md. A kernel that failed never writes its
//! word, so after every [`HEALTH_CHECK_EVERY`] polls without progress `poll` asks the driver about
//! the stream: an error fails the unpacker; an idle stream retires every launch (counted in
//! [`CompletionCounts::by_stream_check`], which stays 0 when the words work). A batch without
//! tiles launches nothing; the host writes its word itself and it still completes in order.
//!
//! The defaults follow measurements on H200 (docs/PERFORMANCE.md): a parameter block costs GPU
//! time roughly in proportion to its size (about +1 us for 128 tiles, +2 us for 1024, +3.6 us for
//! the 32 KiB block), a mapped read costs about one PCIe round trip (+1 to +3 us) whatever the count, and a
//! copy-engine upload +5 to +14 us. Parameters win on latency for one receive (one 512 KiB receive
//! of whole pages is 128 tiles), so launches of up to 254 tiles go inline and larger ones mapped.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use cudarc::driver::{result, sys};

use super::kernels::{CompletionSignal, InlineTiles, UnpackKernels};
use super::memory::{DeviceBytes, DeviceTiles, Event, MappedWords, PinnedTiles, driver_error};
use super::plan::{DstPiece, PlanError, PlanStats, ReceiveLayout, plan_receive_pieces};
use crate::error::{Error, Result};
use crate::ncclnet::LoadMeta;

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
    /// the driver allows, [`UnpackKernels::max_inline`]). Default: 254, the small variant (4 KiB of parameters); 128 or fewer use the 2 KiB tiny one.
    pub inline_tiles: usize,
    /// How larger launches get their tiles. Default: mapped.
    pub bulk: BulkTiles,
    /// How the unpacker learns that a launch finished.
    pub completion: Completion,
}

/// How the unpacker learns that a launch finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The launch's last block writes its sequence number to the slot's word in mapped host
    /// memory; `poll` loads it. The default.
    Word,
    /// An event recorded after each launch; `poll` queries it. Kept to measure against.
    Event,
}

/// How the launches retired so far were seen to finish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionCounts {
    /// By their own signal: completion word or event.
    pub signalled: u64,
    /// By a stream check that found the stream idle while their word was still missing.
    pub by_stream_check: u64,
}

/// Polls without progress between two checks of the unpack stream for a failed launch.
pub const HEALTH_CHECK_EVERY: u32 = 1024;

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
            completion: Completion::Word,
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
    /// [`Completion::Event`] only.
    event: Option<Event>,
    /// The launch's sequence number, which its completion word reports.
    seq: u64,
    /// Receives with tickets below this are finished once the slot's batch completed.
    finishes_below: u64,
}

/// Per-slot completion state of [`Completion::Word`]: slot i's launches count their blocks in
/// `counters[i]` and report in `words[i]`.
struct CompletionWords {
    words: MappedWords,
    counters: DeviceBytes,
}

impl CompletionWords {
    fn new(slots: usize) -> Result<CompletionWords> {
        let counters = DeviceBytes::new(slots * size_of::<u32>())?;
        // SAFETY: fresh device memory of this size in the current context.
        unsafe { result::memset_d8_sync(counters.ptr(), 0, counters.len()) }
            .map_err(|e| driver_error("zero completion counters", e))?;
        Ok(CompletionWords { words: MappedWords::new(slots)?, counters })
    }

    fn signal(&self, slot: usize, seq: u64) -> CompletionSignal {
        CompletionSignal {
            seq,
            counter: self.counters.ptr() + (slot * size_of::<u32>()) as u64,
            word: self.words.device_ptr() + (slot * size_of::<u64>()) as u64,
        }
    }

    fn reported(&self, slot: usize, seq: u64) -> bool {
        self.words.word(slot).load(std::sync::atomic::Ordering::Acquire) >= seq
    }
}

pub struct Unpacker {
    // Declared before `stream` and `kernels` so that they drop while the context is still alive.
    slots: Vec<Slot>,
    /// [`Completion::Word`] only.
    words: Option<CompletionWords>,
    params: Box<InlineTiles>,
    stream: Arc<CudaStream>,
    kernels: Arc<UnpackKernels>,
    /// Sequence number of the next launch.
    next_seq: u64,
    idle_polls: u32,
    counts: CompletionCounts,
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
                event: match config.completion {
                    Completion::Event => Some(Event::new()?),
                    Completion::Word => None,
                },
                seq: 0,
                finishes_below: 0,
            });
        }
        let words = match config.completion {
            Completion::Word => Some(CompletionWords::new(slots.len())?),
            Completion::Event => None,
        };
        Ok(Unpacker {
            words,
            // Completion words start at 0, so launch sequence numbers start at 1.
            next_seq: 1,
            idle_polls: 0,
            counts: CompletionCounts::default(),
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

    /// How completion is detected.
    pub fn completion(&self) -> Completion {
        if self.words.is_some() { Completion::Word } else { Completion::Event }
    }

    /// How the launches retired so far were seen to finish.
    pub fn completion_counts(&self) -> CompletionCounts {
        self.counts
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
        // SAFETY: forwarded.
        unsafe { self.submit_pieces(layout, &[], metas) }
    }

    /// [`submit`](Self::submit) for a receive whose bytes go to `pieces` (`plan_receive_pieces`).
    ///
    /// # Safety
    /// As `submit`, for every piece instead of `layout.dst .. + dst_len`.
    pub unsafe fn submit_pieces(
        &mut self,
        layout: &ReceiveLayout,
        pieces: &[DstPiece],
        metas: &[LoadMeta],
    ) -> Result<Submit> {
        self.check_failed()?;
        if !self.open_slot_free()? {
            return Ok(Submit::Full);
        }
        match self.plan_into_open(layout, pieces, metas) {
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
                match self.plan_into_open(layout, pieces, metas) {
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
        pieces: &[DstPiece],
        metas: &[LoadMeta],
    ) -> std::result::Result<PlanStats, PlanError> {
        let slot = &mut self.slots[self.next];
        plan_receive_pieces(layout, pieces, metas, slot.host.as_mut_slice(), &mut self.open_tiles)
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

    /// Launches the open batch (one kernel, or none for a batch of empty receives; then one event
    /// with [`Completion::Event`]).
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
        let seq = self.next_seq;
        let signal = self.words.as_ref().map_or(CompletionSignal::default(), |w| w.signal(self.next, seq));
        let slot = &mut self.slots[self.next];
        let tiles = &slot.host.as_slice()[..self.open_tiles];
        if tiles.is_empty() {
            if let Some(words) = &self.words {
                // Nothing to copy: the batch is done once every launch before it is, which the
                // in-order poll already waits for.
                words.words.word(self.next).store(seq, std::sync::atomic::Ordering::Release);
            }
        } else if tiles.len() <= self.inline_tiles {
            self.params.count = tiles.len() as u32;
            self.params.signal = signal;
            self.params.tiles[..tiles.len()].copy_from_slice(tiles);
            // SAFETY: the stream is ours and the context is current; the submit contract covers
            // the tiles' ranges; the slot's counter and word are not used by a running launch
            // (the slot is reused only after its launch completed).
            unsafe { self.kernels.launch_inline(stream, &self.params) }?;
        } else if let Some(device) = &slot.device {
            // SAFETY: pinned source and device destination both hold `tiles.len()` tiles and stay
            // untouched until this slot's launch completes.
            unsafe { result::memcpy_htod_async(device.ptr(), tiles, stream) }
                .map_err(|e| driver_error("copy tiles to the device", e))?;
            // SAFETY: as for the inline launch; the device tiles were just copied on this stream.
            unsafe { self.kernels.launch_device_tiles(stream, device.ptr(), tiles.len() as u32, signal) }?;
        } else {
            // The tiles were written with plain stores; order them before the launch's doorbell
            // on weakly ordered hosts too.
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            // SAFETY: as for the inline launch; the pinned slot is not written again before this
            // slot's launch completes.
            unsafe { self.kernels.launch_device_tiles(stream, slot.host.device_ptr(), tiles.len() as u32, signal) }?;
        }
        if let Some(event) = &slot.event {
            event.record(stream)?;
        }
        slot.seq = seq;
        self.next_seq += 1;
        self.close_open();
        Ok(())
    }

    /// The open batch was handed to the GPU: its slot is in flight, the next one opens.
    fn close_open(&mut self) {
        self.slots[self.next].finishes_below = self.submitted;
        self.in_flight += 1;
        self.next = (self.next + 1) % self.slots.len();
        self.open_tiles = 0;
        self.open_receives = 0;
    }

    /// Retires finished launches (oldest first, one completion-word load or event query each) and
    /// returns the completion watermark: every receive whose ticket is below it is finished, and
    /// its bounce pages may be returned. Receives not yet launched are never reported finished.
    pub fn poll(&mut self) -> Result<u64> {
        self.check_failed()?;
        if let Err(e) = self.retire_finished() {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(self.completed)
    }

    fn oldest_in_flight(&self) -> usize {
        (self.next + self.slots.len() - self.in_flight) % self.slots.len()
    }

    fn retire_oldest(&mut self, oldest: usize) {
        self.completed = self.slots[oldest].finishes_below;
        self.in_flight -= 1;
    }

    /// Retires launches in order while their own signal says they finished.
    fn retire_signalled(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            let oldest = self.oldest_in_flight();
            let slot = &self.slots[oldest];
            let done = if let Some(words) = &self.words {
                words.reported(oldest, slot.seq)
            } else {
                slot.event.as_ref().expect("launch mode without words has events").is_complete()?
            };
            if !done {
                break;
            }
            self.retire_oldest(oldest);
            self.counts.signalled += 1;
        }
        Ok(())
    }

    fn retire_finished(&mut self) -> Result<()> {
        let before = self.in_flight;
        self.retire_signalled()?;
        if self.in_flight < before {
            self.idle_polls = 0;
            return Ok(());
        }
        if self.in_flight == 0 {
            return Ok(());
        }
        if self.words.is_some() {
            self.idle_polls += 1;
            if self.idle_polls.is_multiple_of(HEALTH_CHECK_EVERY) {
                self.check_stream()?;
            }
        }
        Ok(())
    }

    /// A failed launch never writes its word: the stream reports the failure instead. An idle
    /// stream means every launch finished, so whatever is still in flight is retired.
    fn check_stream(&mut self) -> Result<()> {
        self.kernels.context().bind_to_thread().map_err(|e| driver_error("bind context", e))?;
        // SAFETY: a live stream of the current context.
        match unsafe { sys::cuStreamQuery(self.stream.cu_stream()) } {
            sys::CUresult::CUDA_SUCCESS => {
                // Words written before the stream went idle are visible now.
                self.retire_signalled()?;
                if self.in_flight > 0 {
                    log::warn!("unpack: {} launches finished without their completion word", self.in_flight);
                }
                while self.in_flight > 0 {
                    self.retire_oldest(self.oldest_in_flight());
                    self.counts.by_stream_check += 1;
                }
                Ok(())
            }
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(()),
            rc => Err(driver_error("unpack launch failed", result::DriverError(rc))),
        }
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
        if self.words.is_some() {
            while self.in_flight > 0 {
                self.poll()?;
                std::hint::spin_loop();
            }
            return Ok(self.completed);
        }
        if self.in_flight > 0 {
            let newest = (self.next + self.slots.len() - 1) % self.slots.len();
            let event = self.slots[newest].event.as_ref().expect("launch mode without words has events");
            if let Err(e) = event.synchronize() {
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
