//! GPU mode's send staging: sends from CUDA registrations are copied to pinned host memory before
//! they go on the wire, each with an asynchronous copy and an event, so a request's copy overlaps
//! the socket writes of the ones before it and the calling thread never waits for it.
//!
//! All of that memory is allocated when the send comm is made, and nothing is allocated or freed
//! after. A consumer like NCCL calls `isend` and `test` from a proxy thread while its kernels run on
//! the same GPU and wait for exactly what those calls complete; `cuMemFreeHost` (and allocations
//! that map memory for the device) wait for the device to go idle, so one of them inside `test`
//! never returns. TCPX makes no CUDA call on this path (its sends leave the registered dma-buf by
//! `sendmsg`, `sock/tcpx.h` `gpudirectTCPXPostSend`).
//!
//! The buffer is a ring: requests take their bytes in posting order and give them back in the
//! same order once they are on the wire, the order in which a comm completes sends.

use std::collections::VecDeque;
use std::ffi::c_void;

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

use crate::fail::Result;
use crate::fragment::{MAX_FRAGMENTS, PAGE};
use crate::gpu::{GpuContext, cuda, give_stream, take_stream};

/// Room for two of the largest messages the fake can receive (2048 fragments of a page each, past
/// which TCPX's receiver exits), so one can be copied while the other is written to the socket.
pub const SEND_STAGING_BYTES: usize = 2 * MAX_FRAGMENTS * PAGE;

/// The bytes of a ring handed out first in, first out.
#[derive(Debug)]
pub struct RingSpace {
    cap: usize,
    /// Where the next piece starts when it fits before the end.
    head: usize,
    /// Bytes taken, including the ends skipped where a piece did not fit before wrapping.
    used: usize,
    /// What each live piece took, oldest first.
    live: VecDeque<usize>,
}

impl RingSpace {
    pub fn new(cap: usize) -> RingSpace {
        RingSpace { cap, head: 0, used: 0, live: VecDeque::new() }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The offset of `len` contiguous bytes, or `None` while the live pieces leave no such room
    /// (`len` up to the capacity always fits once every older piece was given back).
    pub fn take(&mut self, len: usize) -> Option<usize> {
        let free = self.cap - self.used;
        // A piece never wraps: if it does not fit before the end, it starts at 0 and the end it
        // skipped stays taken until the piece is given back.
        let (off, need) = if self.head + len <= self.cap { (self.head, len) } else { (0, self.cap - self.head + len) };
        if need > free {
            return None;
        }
        self.used += need;
        self.head = (off + len) % self.cap;
        self.live.push_back(need);
        Some(off)
    }

    /// Gives back the oldest live piece.
    pub fn give_back(&mut self) {
        if let Some(need) = self.live.pop_front() {
            self.used -= need;
        }
        if self.live.is_empty() {
            self.head = 0;
        }
    }

    pub fn live(&self) -> usize {
        self.live.len()
    }
}

/// The pinned ring, one event per request slot, and a stream borrowed while copies are in the
/// ring (`gpu::take_stream`: the comm holds none while idle).
pub struct SendStaging {
    ctx: GpuContext,
    stream: CUstream,
    ring: *mut c_void,
    space: RingSpace,
    slots: Vec<StagingSlot>,
}

struct StagingSlot {
    off: usize,
    event: sys::CUevent,
}

// SAFETY: owned CUDA objects and pinned memory, used under the comm's lock.
unsafe impl Send for SendStaging {}

impl SendStaging {
    /// Staging for a send comm with `slots` request slots, in `ctx`.
    pub fn new(ctx: GpuContext, slots: usize) -> Result<SendStaging> {
        let mut staging = SendStaging {
            ctx,
            stream: std::ptr::null_mut(),
            ring: std::ptr::null_mut(),
            space: RingSpace::new(SEND_STAGING_BYTES),
            slots: Vec::with_capacity(slots),
        };
        let (ring, list) = (&mut staging.ring, &mut staging.slots);
        // On failure `staging` is dropped, freeing whatever was created so far.
        staging.ctx.with(|| {
            // SAFETY: out-pointers to fields/locals; the ring is SEND_STAGING_BYTES long.
            unsafe {
                cuda("cuMemHostAlloc(send staging)", sys::cuMemHostAlloc(ring, SEND_STAGING_BYTES, 0))?;
                for _ in 0..slots {
                    let mut event = std::ptr::null_mut();
                    cuda("cuEventCreate", sys::cuEventCreate(&mut event, 2 /* disable timing */))?;
                    list.push(StagingSlot { off: 0, event });
                }
            }
            Ok(())
        })?;
        Ok(staging)
    }

    /// The largest send it can stage.
    pub fn capacity(&self) -> usize {
        self.space.capacity()
    }

    /// Starts copying `len` bytes of device memory at `src` into ring space for slot `slot`, and
    /// returns its offset in the ring; `None` while older sends hold the room it needs (nothing
    /// started). Its bytes are valid once [`ready`](Self::ready) says so. Copies are started and
    /// [given back](Self::give_back) in posting order.
    pub fn start(&mut self, slot: usize, src: usize, len: usize) -> Result<Option<usize>> {
        let Some(off) = self.space.take(len) else { return Ok(None) };
        let (ctx, held) = (&self.ctx, &mut self.stream);
        let s = &mut self.slots[slot];
        s.off = off;
        let dst = self.ring.wrapping_byte_add(off);
        ctx.with(|| {
            if held.is_null() {
                *held = take_stream(ctx)?;
            }
            let stream = *held;
            // SAFETY: [off, off + len) lies in the ring, taken for this request until it is given
            // back; `src` is inside a CUDA registration the caller keeps valid until the send
            // completes; the event is recorded right after on the same stream.
            unsafe {
                if len > 0 {
                    cuda("cuMemcpyDtoHAsync", sys::cuMemcpyDtoHAsync_v2(dst, src as CUdeviceptr, len, stream))?;
                }
                cuda("cuEventRecord", sys::cuEventRecord(s.event, stream))
            }
        })?;
        Ok(Some(off))
    }

    /// Slot `slot`'s bytes in the ring, valid once [`ready`](Self::ready).
    pub fn buffer(&self, slot: usize) -> *const u8 {
        self.ring.wrapping_byte_add(self.slots[slot].off).cast_const().cast()
    }

    /// Whether slot `slot`'s copy finished; a failed copy is an error.
    pub fn ready(&self, slot: usize) -> Result<bool> {
        let event = self.slots[slot].event;
        self.ctx.with(|| {
            // SAFETY: a live event of this context.
            match unsafe { sys::cuEventQuery(event) } {
                sys::CUresult::CUDA_SUCCESS => Ok(true),
                sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                rc => cuda("copying a CUDA send to the host", rc).map(|()| false),
            }
        })
    }

    /// The oldest started send's bytes are on the wire: its ring space is free again, and the
    /// stream goes back once the ring is empty.
    pub fn give_back(&mut self) {
        self.space.give_back();
        if self.space.live() == 0 {
            self.release_stream();
        }
    }

    fn release_stream(&mut self) {
        let stream = std::mem::replace(&mut self.stream, std::ptr::null_mut());
        let ctx = &self.ctx;
        let _ = ctx.with(|| {
            // SAFETY: taken for this context by `start` (or NULL), no longer used here.
            unsafe { give_stream(ctx, stream) };
            Ok(())
        });
    }

    /// Sends whose bytes are in the ring.
    pub fn in_ring(&self) -> usize {
        self.space.live()
    }
}

impl Drop for SendStaging {
    fn drop(&mut self) {
        // Waits for its copies (a failed start may have left one) before the ring goes.
        self.release_stream();
        let _ = self.ctx.with(|| {
            // SAFETY: frees only what this value created, after its copies finished.
            unsafe {
                if !self.ring.is_null() {
                    let _ = sys::cuMemFreeHost(self.ring);
                }
                for s in &self.slots {
                    let _ = sys::cuEventDestroy_v2(s.event);
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_come_and_go_in_order() {
        let mut r = RingSpace::new(100);
        assert_eq!(r.take(40), Some(0));
        assert_eq!(r.take(40), Some(40));
        // 20 left at the end, none at the start: a 30-byte piece waits.
        assert_eq!(r.take(30), None);
        assert_eq!(r.take(20), Some(80));
        assert_eq!(r.take(1), None, "full");
        r.give_back();
        // The oldest piece's 40 bytes at the start are free; the piece does not straddle the end.
        assert_eq!(r.take(30), Some(0));
        assert_eq!(r.take(11), None, "only 10 left before the second piece");
        assert_eq!(r.take(10), Some(30));
        r.give_back();
        r.give_back();
        r.give_back();
        r.give_back();
        assert_eq!(r.live(), 0);
        // Empty again: the whole capacity fits, from the start.
        assert_eq!(r.take(100), Some(0));
        assert_eq!(r.take(0), Some(0), "an empty piece takes no room");
        r.give_back();
        r.give_back();
        assert_eq!(r.take(101), None, "larger than the ring never fits");
    }

    #[test]
    fn a_skipped_end_stays_taken_until_its_piece_goes() {
        let mut r = RingSpace::new(100);
        assert_eq!(r.take(70), Some(0));
        assert_eq!(r.take(20), Some(70));
        r.give_back();
        // 10 free at the end, 70 at the start: 50 wraps to 0 and takes the end's 10 with it.
        assert_eq!(r.take(50), Some(0));
        assert_eq!(r.take(21), None, "20 left between the wrapped piece and the live one");
        assert_eq!(r.take(20), Some(50));
        r.give_back();
        // The 20 at 70 are free again, the skipped end is not: it goes with the wrapped piece.
        assert_eq!(r.take(30), None);
        assert_eq!(r.take(20), Some(70));
        r.give_back();
        // Now the end is free too.
        assert_eq!(r.take(10), Some(90));
        // The 20 at 50, the 20 at 70 and the 10 at 90 are live: 50 free before them.
        assert_eq!(r.take(50), Some(0));
        assert_eq!(r.take(1), None);
    }

    /// Random traffic never hands out overlapping live pieces or pieces past the end, and a piece
    /// of any size up to the capacity fits once everything older was given back.
    #[test]
    fn random_traffic_keeps_pieces_apart() {
        let mut rng = crate::fragment::Rng::new(11);
        let cap = 1000;
        let mut r = RingSpace::new(cap);
        let mut live: VecDeque<(usize, usize)> = VecDeque::new();
        for _ in 0..100_000 {
            if live.is_empty() || rng.below(3) != 0 {
                let len = rng.below(cap / 3);
                if let Some(off) = r.take(len) {
                    assert!(off + len <= cap);
                    for &(o, l) in &live {
                        assert!(off + len <= o || o + l <= off || len == 0 || l == 0, "{off}+{len} overlaps {o}+{l}");
                    }
                    live.push_back((off, len));
                } else {
                    assert!(!live.is_empty(), "an empty ring refused {len} bytes");
                }
            } else {
                live.pop_front();
                r.give_back();
            }
        }
        while live.pop_front().is_some() {
            r.give_back();
        }
        assert_eq!(r.take(cap), Some(0));
    }
}
