//! Receives into host memory on a comm whose bounce pool is device memory (TCPX).
//!
//! TCPX steers every data socket of a receive comm into GPU memory at accept, and its HOST-type
//! receive is a plain `recv()` that can never read such a payload. So a receive into host memory is
//! posted as a CUDA receive against the anchor, a small device buffer registered on the comm (TCPX
//! never writes a CUDA receive's buffer: the bytes stay in its pool and `loadMeta.dst_off` is
//! relative to the request), the GPU unpack gathers its fragments into a slot of pinned host memory
//! mapped into the device, batched with the GPU receives of every comm, and the GPU's copier threads
//! copy the slot into the destination (`copier.rs`). Slots belong to the GPU and are shared by all
//! its receive comms: one is taken when the plugin completed a receive and its turn to be unpacked
//! came, and goes back as soon as its bytes were copied out. A comm may hold several, so that its
//! next receives unpack and copy while earlier ones still copy.

use std::sync::Arc;

use parking_lot::Mutex;

use super::copier::{self, Copier, CopyOut};
use crate::cuda::Gpu;
use crate::cuda::memory::{DeviceBuffer, MappedBuffer};
use crate::cuda::unpack::DstPiece;
use crate::error::Result;
use crate::ncclnet::UNPACK_MAX_SLICE_SIZE;

/// Host-destination receives of one GPU between their unpack and the end of their copy out.
pub const SLOTS: usize = 16;
/// Slots one comm's receives hold at most unless its oldest receive needs one, so that four comms
/// (a connection's usual channels) keep their pipelines full together and the oldest receive of
/// any comm still finds a slot once some come back.
pub const PER_COMM: usize = SLOTS / 4;

pub struct HostLanding {
    /// What host-destination receives are posted against (the fake checks the posted range lies
    /// inside the registration; TCPX only uses the address as the base of `dst_off`).
    anchor: DeviceBuffer,
    slots: MappedBuffer,
    free: Mutex<Vec<usize>>,
    copier: Copier,
}

impl HostLanding {
    pub fn new(gpu: &Arc<Gpu>) -> Result<HostLanding> {
        let anchor = DeviceBuffer::new(gpu.ordinal(), UNPACK_MAX_SLICE_SIZE)?;
        let slots = MappedBuffer::new(gpu, SLOTS * UNPACK_MAX_SLICE_SIZE)?;
        let copier = Copier::start(&format!("uccl-landing{}", gpu.ordinal()), copier::default_threads())?;
        Ok(HostLanding { anchor, slots, free: Mutex::new((0..SLOTS).rev().collect()), copier })
    }

    /// The anchor's device address and length.
    pub fn anchor(&self) -> (usize, usize) {
        (self.anchor.addr(), self.anchor.len())
    }

    /// A free slot, if any.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let index = self.free.lock().pop()?;
        Some(Slot { landing: self.clone(), index })
    }
}

/// One slot of [`UNPACK_MAX_SLICE_SIZE`] bytes; goes back to its GPU's free list on drop.
pub struct Slot {
    landing: Arc<HostLanding>,
    index: usize,
}

impl Slot {
    fn offset(&self) -> usize {
        self.index * UNPACK_MAX_SLICE_SIZE
    }

    /// Where the unpack kernel writes the slot.
    pub fn device_ptr(&self) -> u64 {
        self.landing.slots.device_ptr() + self.offset() as u64
    }

    /// Starts copying the slot's first `len` bytes to `dst` on the GPU's copier threads, which
    /// give the slot back once the bytes are out.
    ///
    /// # Safety
    /// `len` ≤ [`UNPACK_MAX_SLICE_SIZE`]; the kernel that filled the slot finished; `[dst, dst + len)` is
    /// writable host memory nobody else touches until the copy finished.
    pub unsafe fn copy_out(self, dst: *mut u8, len: usize) -> CopyOut {
        debug_assert!(len <= UNPACK_MAX_SLICE_SIZE);
        // SAFETY: the slot lies inside the mapped buffer.
        let src = unsafe { self.landing.slots.as_ptr().add(self.offset()) };
        let landing = self.landing.clone();
        // SAFETY: the slot's bytes stay put while the copy holds the slot; the caller vouches for
        // the destination; pinned host memory and the caller's buffer never overlap.
        unsafe { landing.copier.submit(src, dst, len, Box::new(self)) }
    }

    /// [`copy_out`](Self::copy_out) into the pieces of a vectored receive: the slot's first `len`
    /// bytes, message byte `p.at` on to `p.addr`.
    ///
    /// # Safety
    /// As `copy_out`, for every piece; the pieces tile `[0, len')` for some `len'` ≥ `len`.
    pub unsafe fn copy_out_pieces(self, pieces: &[DstPiece], len: usize) -> CopyOut {
        debug_assert!(len <= UNPACK_MAX_SLICE_SIZE);
        // SAFETY: the slot lies inside the mapped buffer.
        let src = unsafe { self.landing.slots.as_ptr().add(self.offset()) };
        let copies: Vec<(*const u8, *mut u8, usize)> = pieces
            .iter()
            .take_while(|p| (p.at as usize) < len)
            .map(|p| {
                // SAFETY: `p.at` < `len`, inside the slot.
                let from = unsafe { src.add(p.at as usize) }.cast_const();
                (from, p.addr as *mut u8, (p.len as usize).min(len - p.at as usize))
            })
            .collect();
        let landing = self.landing.clone();
        // SAFETY: as in `copy_out`, for every piece, which do not overlap each other.
        unsafe { landing.copier.submit_list(&copies, Box::new(self)) }
    }

    /// The GPU's unpack failed with this slot's kernel in an unknown state: the slot is never
    /// handed out again, so no later receive can be overwritten by a late write.
    pub fn retire(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.landing.free.lock().push(self.index);
    }
}
