//! A comm's staging ring: `slots` pinned host buffers of `slot_size` bytes in one allocation, one
//! or more copy streams (slot `i` copies on stream `i % streams`) and one event per slot, all made
//! once when the comm first meets device memory. Slots are taken and given back in FIFO order,
//! which is the order a comm's requests complete in.
//!
//! Nothing signals a finished copy: its owner polls the slot's event ([`StagingRing::copied`]). A
//! driver host function per copy that woke the engine instead was measured: under load the driver
//! ran those up to about 1.5 ms late, and the parked engine with them.

use std::sync::Arc;

use cudarc::driver::sys;

use super::memory::PinnedBuffer;
use super::stream::{Event, Stream};
use super::{Gpu, check};
use crate::error::{Error, Result};

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host, so traces of the two
/// ends of a loopback transfer line up.
pub fn clock_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct StagingRing {
    // Drop order matters: the streams synchronize first (no copy still reads or writes a slot or
    // user memory), then the events and the slots go.
    streams: Vec<Stream>,
    events: Vec<Event>,
    host: PinnedBuffer,
    slot_size: usize,
    /// Slots handed out and given back so far; slot `i` of the sequence is `i % slots`.
    taken: u64,
    returned: u64,
}

impl StagingRing {
    /// `slots` slots of `slot_size` bytes copying on `streams` streams (at most one per slot).
    pub fn new(gpu: &Arc<Gpu>, slot_size: usize, slots: usize, streams: usize) -> Result<StagingRing> {
        if slot_size == 0 || slots == 0 || streams == 0 {
            return Err(Error::invalid(format!(
                "a staging ring of {slots} slots of {slot_size} bytes on {streams} streams"
            )));
        }
        let total = slot_size
            .checked_mul(slots)
            .ok_or_else(|| Error::invalid(format!("{slots} staging slots of {slot_size} bytes overflow")))?;
        let host = PinnedBuffer::new(gpu, total)?;
        let streams = (0..streams.min(slots)).map(|_| Stream::new(gpu)).collect::<Result<Vec<_>>>()?;
        let events = (0..slots).map(|_| Event::new(gpu)).collect::<Result<Vec<_>>>()?;
        Ok(StagingRing { streams, events, host, slot_size, taken: 0, returned: 0 })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        self.streams[0].gpu()
    }

    fn stream(&self, slot: usize) -> &Stream {
        &self.streams[slot % self.streams.len()]
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub fn slots(&self) -> usize {
        self.events.len()
    }

    /// The pinned bytes of all slots, for a transport that wants them registered.
    pub fn host_range(&self) -> (usize, usize) {
        (self.host.as_ptr() as usize, self.host.len())
    }

    pub fn in_use(&self) -> usize {
        (self.taken - self.returned) as usize
    }

    /// The slot the next `take` returns, if one is free.
    pub fn peek(&self) -> Option<usize> {
        (self.in_use() < self.slots()).then_some((self.taken % self.slots() as u64) as usize)
    }

    pub fn take(&mut self) -> Option<usize> {
        let slot = self.peek()?;
        self.taken += 1;
        Some(slot)
    }

    /// Gives back the oldest slot taken.
    pub fn give_back(&mut self) {
        debug_assert!(self.returned < self.taken, "staging slot returned twice");
        self.returned = (self.returned + 1).min(self.taken);
    }

    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < self.slots());
        // In bounds: slot < slots and the allocation holds slots * slot_size bytes.
        self.host.as_ptr().wrapping_add(slot * self.slot_size)
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len > self.slot_size {
            return Err(Error::invalid(format!(
                "a {len}-byte device chunk exceeds the {}-byte staging slot (UCCL_TCPX_CHUNK_SIZE)",
                self.slot_size
            )));
        }
        Ok(())
    }

    /// Queues the copy of `len` device bytes at `src` into `slot`; `copied(slot)` tells when it is
    /// there, and the wake runs then.
    ///
    /// # Safety
    /// `[src, src + len)` is device memory of this ring's GPU that stays valid until the copy is
    /// reported done or the ring is dropped; `slot` is taken and not otherwise in use.
    pub unsafe fn copy_in(&mut self, slot: usize, src: usize, len: usize) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { self.gather(slot, len, [(src, len)]) }
    }

    /// Queues the copies of the device segments `(addr, len)` of `segs`, `len` bytes in all,
    /// concatenated into `slot` (one copy per segment, one completion for all of them).
    ///
    /// # Safety
    /// As `copy_in`, for every segment.
    pub unsafe fn gather(
        &mut self,
        slot: usize,
        len: usize,
        segs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<()> {
        self.check_len(len)?;
        self.gpu().bind()?;
        let mut at = 0;
        for (addr, seg_len) in segs {
            if at + seg_len > len {
                return Err(Error::invalid("staging segments exceed the length they were announced with"));
            }
            check(
                // SAFETY: the caller vouches for each device source and the taken slot; the slot
                // holds slot_size >= len >= at + seg_len bytes (check_len above), and the GPU is
                // bound on this thread.
                unsafe {
                    sys::cuMemcpyDtoHAsync_v2(
                        self.slot_ptr(slot).add(at).cast(),
                        addr as sys::CUdeviceptr,
                        seg_len,
                        self.stream(slot).raw(),
                    )
                },
                "cuMemcpyDtoHAsync into a staging slot",
            )?;
            at += seg_len;
        }
        self.mark(slot)
    }

    /// Queues the copy of the first `len` bytes of `slot` to device memory at `dst`.
    ///
    /// # Safety
    /// `[dst, dst + len)` is device memory of this ring's GPU that nobody else accesses until the
    /// copy is reported done or the ring is dropped; the slot's bytes are final.
    pub unsafe fn copy_out(&mut self, slot: usize, dst: usize, len: usize) -> Result<()> {
        // SAFETY: per the contract.
        unsafe { self.scatter(slot, len, [(dst, len)]) }
    }

    /// Queues the copies of the first `len` bytes of `slot` into the device segments `(addr,
    /// len)` of `segs`, in order (one copy per segment reached, one completion for all of them).
    ///
    /// # Safety
    /// As `copy_out`, for every segment; `len` is at most their total.
    pub unsafe fn scatter(
        &mut self,
        slot: usize,
        len: usize,
        segs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<()> {
        self.check_len(len)?;
        self.gpu().bind()?;
        let mut at = 0;
        for (addr, seg_len) in segs {
            let n = seg_len.min(len - at);
            if n == 0 {
                break;
            }
            check(
                // SAFETY: the caller vouches for each device destination and the slot's final
                // bytes; `at + n <= len <= slot_size` (check_len above), and the GPU is bound on
                // this thread.
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        addr as sys::CUdeviceptr,
                        self.slot_ptr(slot).add(at).cast(),
                        n,
                        self.stream(slot).raw(),
                    )
                },
                "cuMemcpyHtoDAsync from a staging slot",
            )?;
            at += n;
        }
        self.mark(slot)
    }

    fn mark(&mut self, slot: usize) -> Result<()> {
        self.events[slot].record(self.stream(slot))
    }

    /// Whether the last copy queued for `slot` finished.
    pub fn copied(&self, slot: usize) -> Result<bool> {
        self.gpu().bind()?;
        self.events[slot].done()
    }
}
