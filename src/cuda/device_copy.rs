//! Asynchronous copies of the same-host path: the copies of one call go back to back on a stream of
//! the issuing GPU and one event marks their end, which the engine polls (no library thread waits
//! on a copy; a caller waiting for its own transfer blocks on the event). Between GPUs of this process a copy names both primary contexts (`cuMemcpyPeerAsync`);
//! everything else (one GPU, host memory, a peer's allocation mapped here) is a unified-address
//! `cuMemcpyAsync`. Peer access is never enabled on the user's contexts: peer copies use the
//! GPUs' direct link without it.

use std::sync::Arc;

use cudarc::driver::sys;

use super::stream::{Event, Stream};
use super::{Gpu, check};
use crate::error::Result;

/// One copy: `len` bytes from `src` to `dst`. An address with a GPU is device memory of that GPU
/// in this process; one without is host memory or memory mapped into the issuing GPU's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCopy {
    pub dst: u64,
    pub dst_gpu: Option<i32>,
    pub src: u64,
    pub src_gpu: Option<i32>,
    pub len: usize,
}

/// Events kept for reuse per queue: one per batch in flight, so this bounds nothing but the spares.
const SPARE_EVENTS: usize = 64;

pub struct CopyQueue {
    stream: Stream,
    spare: Vec<Event>,
}

impl CopyQueue {
    pub fn new(gpu: &Arc<Gpu>) -> Result<CopyQueue> {
        Ok(CopyQueue { stream: Stream::new(gpu)?, spare: Vec::new() })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        self.stream.gpu()
    }

    /// Queues `copies` in order and returns the event that fires once all of them finished. On an
    /// error the copies queued before it have been waited for, so nothing touches their memory.
    ///
    /// # Safety
    /// Every range is memory that stays valid and reserved to these copies until the event fired
    /// (or, on error, until this returned).
    pub unsafe fn issue(&mut self, copies: &[DeviceCopy]) -> Result<Event> {
        let gpu = self.stream.gpu().clone();
        let _ctx = gpu.enter()?;
        // SAFETY: per the contract.
        let queued = copies.iter().try_for_each(|c| unsafe { self.queue_one(c) });
        let marked = queued.and_then(|()| {
            let event = match self.spare.pop() {
                Some(e) => e,
                None => Event::new(&gpu)?,
            };
            event.record(&self.stream).map(|()| event)
        });
        if marked.is_err() {
            let _ = self.stream.synchronize();
        }
        marked
    }

    /// Takes back a fired event for later batches.
    pub fn recycle(&mut self, event: Event) {
        if self.spare.len() < SPARE_EVENTS {
            self.spare.push(event);
        }
    }

    /// Events kept for later batches.
    #[cfg(test)]
    pub(crate) fn spare_events(&self) -> usize {
        self.spare.len()
    }

    /// Waits for every copy queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()
    }

    /// # Safety
    /// As for `issue`; the issuing GPU's context is current.
    unsafe fn queue_one(&self, c: &DeviceCopy) -> Result<()> {
        let stream = self.stream.raw();
        match (c.dst_gpu, c.src_gpu) {
            (Some(d), Some(s)) if d != s => {
                let (dst_gpu, src_gpu) = (Gpu::open(d)?, Gpu::open(s)?);
                check(
                    // SAFETY: both ranges are device memory of the named GPUs (the contract); the
                    // contexts are those GPUs' primary contexts, retained for the process's life.
                    unsafe {
                        sys::cuMemcpyPeerAsync(
                            c.dst,
                            dst_gpu.raw_context(),
                            c.src,
                            src_gpu.raw_context(),
                            c.len,
                            stream,
                        )
                    },
                    "cuMemcpyPeerAsync",
                )
            }
            // SAFETY: per the contract; unified addressing tells the driver what each end is.
            _ => check(unsafe { sys::cuMemcpyAsync(c.dst, c.src, c.len, stream) }, "cuMemcpyAsync"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::DeviceBuffer;

    #[test]
    fn a_batch_lands_in_order_and_its_event_fires() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let gpu = Gpu::open(0).unwrap();
        let mut src = DeviceBuffer::new(0, 1 << 20).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        src.copy_from_host(0, &data).unwrap();
        let mut dst = DeviceBuffer::new(0, 1 << 20).unwrap();
        dst.fill(0).unwrap();
        let mut host = vec![0u8; 4096];
        let mut queue = CopyQueue::new(&gpu).unwrap();
        let (s, d) = (src.addr() as u64, dst.addr() as u64);
        let copies = [
            DeviceCopy { dst: d, dst_gpu: Some(0), src: s + 4096, src_gpu: Some(0), len: (1 << 20) - 4096 },
            DeviceCopy { dst: d + (1 << 20) - 4096, dst_gpu: Some(0), src: s, src_gpu: Some(0), len: 4096 },
            DeviceCopy { dst: host.as_mut_ptr() as u64, dst_gpu: None, src: s + 8, src_gpu: Some(0), len: 4096 },
        ];
        // SAFETY: every range lies in a live buffer of this test, untouched until the event fired.
        let event = unsafe { queue.issue(&copies) }.unwrap();
        event.synchronize().unwrap();
        assert!(event.done().unwrap());
        let got = dst.to_vec().unwrap();
        assert_eq!(&got[..(1 << 20) - 4096], &data[4096..]);
        assert_eq!(&got[(1 << 20) - 4096..], &data[..4096]);
        assert_eq!(&host[..], &data[8..4104]);
        queue.recycle(event);
        assert_eq!(queue.spare.len(), 1);
    }
}
