//! Receives into host memory on a comm whose bounce pool is device memory (TCPX).
//!
//! TCPX steers every data socket of a receive comm into GPU memory at accept, and its HOST-type
//! receive is a plain `recv()` that can never read such a payload. So a receive into host memory is
//! posted as a CUDA receive against the anchor, a small device buffer registered on the comm (TCPX
//! never writes a CUDA receive's buffer: the bytes stay in its pool and `loadMeta.dst_off` is
//! relative to the request), the GPU unpack gathers its fragments into a slot of pinned host memory
//! mapped into the device, batched with the GPU receives of every comm, and the CPU copies the
//! slot into the destination. Slots belong to the GPU and are shared by all its receive comms: one
//! is taken when the plugin completed a receive and comes back once its bytes were copied out.

use std::sync::Arc;

use parking_lot::Mutex;

use super::comm::MAX_MESSAGE;
use crate::cuda::Gpu;
use crate::cuda::memory::{DeviceBuffer, MappedBuffer};
use crate::error::Result;

/// Host-destination receives of one GPU between the plugin's completion and the copy out. A comm
/// has at most one receive there (only its oldest is tested), so this many comms land in parallel
/// and the others wait their turn.
pub const SLOTS: usize = 16;

pub struct HostLanding {
    /// What host-destination receives are posted against (the fake checks the posted range lies
    /// inside the registration; TCPX only uses the address as the base of `dst_off`).
    anchor: DeviceBuffer,
    slots: MappedBuffer,
    free: Mutex<Vec<usize>>,
}

impl HostLanding {
    pub fn new(gpu: &Arc<Gpu>) -> Result<HostLanding> {
        let anchor = DeviceBuffer::new(gpu.ordinal(), MAX_MESSAGE)?;
        let slots = MappedBuffer::new(gpu, SLOTS * MAX_MESSAGE)?;
        Ok(HostLanding { anchor, slots, free: Mutex::new((0..SLOTS).rev().collect()) })
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

/// One slot of [`MAX_MESSAGE`] bytes; goes back to its GPU's free list on drop.
pub struct Slot {
    landing: Arc<HostLanding>,
    index: usize,
}

impl Slot {
    fn offset(&self) -> usize {
        self.index * MAX_MESSAGE
    }

    /// Where the unpack kernel writes the slot.
    pub fn device_ptr(&self) -> u64 {
        self.landing.slots.device_ptr() + self.offset() as u64
    }

    /// Copies the slot's first `len` bytes to `dst`.
    ///
    /// # Safety
    /// `len` ≤ [`MAX_MESSAGE`]; the kernel that filled the slot finished; `[dst, dst + len)` is
    /// writable host memory nobody else touches meanwhile.
    pub unsafe fn copy_out(&self, dst: *mut u8, len: usize) {
        debug_assert!(len <= MAX_MESSAGE);
        // SAFETY: the slot lies inside the mapped buffer; the rest is the caller's promise.
        unsafe { std::ptr::copy_nonoverlapping(self.landing.slots.as_ptr().add(self.offset()), dst, len) };
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
