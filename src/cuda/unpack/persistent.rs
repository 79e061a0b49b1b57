//! Host side of the resident unpack kernel (`unpack_resident` in kernel.cu, which documents the
//! protocol): publishing batches through a doorbell in mapped pinned memory, learning of finished
//! ones from per-slot completion words the kernel writes there, and (re)starting the kernel, which
//! leaves on its own after a while without work.
//!
//! A batch then costs a few stores to host memory instead of a kernel launch and an event record,
//! and its completion is one load instead of a `cuEventQuery`: the launch floor (empty kernel +
//! event, 8-9 us on the H200 VM of docs/PERFORMANCE.md) is replaced by two PCIe crossings.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cudarc::driver::{result, sys};

use super::kernels::{RESIDENT_MAX_SLOTS, ResidentParams, UnpackKernels};
use super::memory::{DeviceBytes, MappedWords, driver_error};
use crate::error::{Error, Result};

// Word indices; they mirror the UNPACK_HOST_* / UNPACK_DEV_* definitions in kernel.cu.
const HOST_STOP: usize = 1;
const HOST_EXIT_EPOCH: usize = 8;
const HOST_EXIT_SEQ: usize = 9;
const HOST_DOORBELLS: usize = 16;
const HOST_COMPLETED: usize = 48;
const HOST_WORDS: usize = HOST_COMPLETED + RESIDENT_MAX_SLOTS;
const DEV_WORDS: usize = 40 + RESIDENT_MAX_SLOTS;

/// A batch's tile count + 1 shares its doorbell word with its sequence number (24 bits).
pub const MAX_TILES_PER_BATCH: usize = (1 << 24) - 2;

/// Threads per block of the resident kernel: eight warps, one tile each per round.
pub const RESIDENT_THREADS: u32 = 256;

/// Unproductive polls between two checks of the kernel's stream for a launch error.
const HEALTH_CHECK_EVERY: u32 = 1024;

pub(super) struct Resident {
    // Dropped only after the kernel stopped (the owner calls `stop` first).
    host: MappedWords,
    dev: DeviceBytes,
    kernels: Arc<UnpackKernels>,
    stream: sys::CUstream,
    params: ResidentParams,
    blocks: u32,
    /// Launch number of the kernel started last; 0 before the first start.
    epoch: u64,
    /// Highest sequence number published (`first_seq - 1` before the first).
    posted: u64,
    idle_polls: u32,
}

// SAFETY: the raw stream belongs to the owning Unpacker, which is Send and serialises all use.
unsafe impl Send for Resident {}

impl Resident {
    /// `slot_tiles`: the device address of each ring slot's mapped tile buffer; batch `seq` uses
    /// slot `seq % slot_tiles.len()`. `stream` serves only this kernel.
    pub(super) fn new(
        kernels: Arc<UnpackKernels>,
        stream: sys::CUstream,
        slot_tiles: &[u64],
        blocks: u32,
        idle_us: u64,
    ) -> Result<Resident> {
        if slot_tiles.is_empty() || slot_tiles.len() > RESIDENT_MAX_SLOTS {
            return Err(Error::invalid(format!(
                "unpack: the persistent kernel serves 1 to {RESIDENT_MAX_SLOTS} launches in flight, not {}",
                slot_tiles.len()
            )));
        }
        if blocks == 0 || blocks > 1024 {
            return Err(Error::invalid(format!("unpack: {blocks} persistent blocks (1 to 1024)")));
        }
        let host = MappedWords::new(HOST_WORDS)?;
        let dev = DeviceBytes::new(DEV_WORDS * 8)?;
        let mut params = ResidentParams {
            host: host.device_ptr(),
            dev: dev.ptr(),
            idle_ns: idle_us.saturating_mul(1000).max(1000),
            slots: slot_tiles.len() as u32,
            ..ResidentParams::default()
        };
        params.slot_tiles[..slot_tiles.len()].copy_from_slice(slot_tiles);
        let posted = u64::from(params.slots) - 1;
        Ok(Resident { host, dev, kernels, stream, params, blocks, epoch: 0, posted, idle_polls: 0 })
    }

    /// The sequence number of the first batch (slot 0).
    pub(super) fn first_seq(&self) -> u64 {
        u64::from(self.params.slots)
    }

    /// Publishes batch `seq` (the next one) of `count` tiles, already written to its slot's
    /// buffer, and makes sure a kernel runs to take it.
    pub(super) fn post(&mut self, seq: u64, count: usize) -> Result<()> {
        debug_assert!(seq == self.posted + 1 && count <= MAX_TILES_PER_BATCH);
        let slot = (seq % u64::from(self.params.slots)) as usize;
        // Release: the tiles (plain stores) are visible before the doorbell is.
        self.host.word(HOST_DOORBELLS + slot).store(seq << 24 | (count as u64 + 1), Ordering::Release);
        self.posted = seq;
        self.ensure_running()
    }

    /// Whether batch `seq` finished: its bytes are in place, visible to any later GPU work.
    pub(super) fn is_complete(&self, seq: u64) -> bool {
        let slot = (seq % u64::from(self.params.slots)) as usize;
        self.host.word(HOST_COMPLETED + slot).load(Ordering::Acquire) >= seq
    }

    /// Called while batches are outstanding and none finished: restarts a kernel that left, and
    /// now and then asks the driver whether the kernel failed.
    pub(super) fn keep_alive(&mut self) -> Result<()> {
        self.ensure_running()?;
        self.idle_polls += 1;
        if self.idle_polls.is_multiple_of(HEALTH_CHECK_EVERY) {
            // SAFETY: a live stream of the current context.
            match unsafe { sys::cuStreamQuery(self.stream) } {
                sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_NOT_READY => {}
                rc => return Err(driver_error("persistent unpack kernel failed", result::DriverError(rc))),
            }
        }
        Ok(())
    }

    /// Called after a batch finished.
    pub(super) fn progressed(&mut self) {
        self.idle_polls = 0;
    }

    /// Kernels started so far.
    pub(super) fn starts(&self) -> u64 {
        self.epoch
    }

    fn left(&self) -> bool {
        self.epoch == 0 || self.host.word(HOST_EXIT_EPOCH).load(Ordering::Acquire) == self.epoch
    }

    /// Starts a kernel when none runs and a published batch waits for one. The previous kernel
    /// reported where it stopped; the new one starts there, queued behind it on the stream.
    fn ensure_running(&mut self) -> Result<()> {
        if !self.left() {
            return Ok(());
        }
        let start =
            if self.epoch == 0 { self.first_seq() } else { self.host.word(HOST_EXIT_SEQ).load(Ordering::Relaxed) };
        if start > self.posted {
            return Ok(());
        }
        self.kernels.context().bind_to_thread().map_err(|e| driver_error("bind context", e))?;
        // SAFETY: device words of this context, zeroed in stream order after the previous kernel.
        unsafe { sys::cuMemsetD8Async(self.dev.ptr(), 0, self.dev.len(), self.stream) }
            .result()
            .map_err(|e| driver_error("reset persistent kernel state", e))?;
        self.epoch += 1;
        self.params.start_seq = start;
        self.params.epoch = self.epoch;
        // SAFETY: the stream serves only this kernel; the words and slot buffers outlive it (stop
        // joins it before they drop); the tiles are the submit contract's.
        unsafe { self.kernels.launch_resident(self.stream, &self.params, self.blocks, RESIDENT_THREADS) }
    }

    /// Asks the kernel to leave once it has taken every published batch, and waits for it.
    pub(super) fn stop(&mut self) -> Result<()> {
        self.host.word(HOST_STOP).store(1, Ordering::Release);
        if self.epoch == 0 {
            return Ok(());
        }
        self.kernels.context().bind_to_thread().map_err(|e| driver_error("bind context", e))?;
        // SAFETY: a live stream of this context.
        unsafe { sys::cuStreamSynchronize(self.stream) }
            .result()
            .map_err(|e| driver_error("stop persistent unpack kernel", e))
    }
}
