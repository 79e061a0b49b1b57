//! A send comm: requests are queued by `isend` and moved onto the socket transport only inside
//! `test`, the one progress engine of a comm as in TCPX. Each request becomes a header message and a
//! payload message on the underlying stream.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};

use uccl_tcpx::internal::ncclnet::NCCL_PTR_CUDA;
use uccl_tcpx::internal::transport::{MrHandle, RequestId, SendComm};

use crate::config::Config;
use crate::fail::{Fail, Result};
use crate::gpu::GpuContext;
use crate::health::{AfterCompletion, Health, closed};
use crate::host;
use crate::log;
use crate::mr::Registrations;
use crate::request::{MAX_REQUESTS, OP_SEND, Ring};
use crate::staging::SendStaging;
use crate::wire::{self, HEADER_LEN};

/// The socket transport's own request window.
const INNER_WINDOW: usize = 16;

#[derive(Default)]
struct SendSlot {
    data: usize,
    len: usize,
    /// Device memory in GPU mode: copied to the slot's pinned staging buffer before it goes on
    /// the wire.
    device: bool,
    /// The staging copy was started (device sends only).
    copying: bool,
    sent: bool,
}

struct InnerRequest {
    seq: u64,
    payload: bool,
    id: RequestId,
}

pub struct FakeSend {
    /// First field: dropped (closing the stream, joining its helper thread) before the buffers below.
    inner: Option<Box<dyn SendComm>>,
    key: usize,
    /// GPU mode: the context and the pinned buffers CUDA sends are copied out of device memory with.
    gpu: Option<SendStaging>,
    /// Requests whose staging copy was started (device sends) or that need none.
    staged: u64,
    ring: Ring,
    regs: Registrations,
    health: Health,
    headers: Box<[[u8; HEADER_LEN]; MAX_REQUESTS]>,
    slots: [SendSlot; MAX_REQUESTS],
    /// Requests handed to the socket transport so far.
    submitted: u64,
    inner_queue: VecDeque<InnerRequest>,
    /// The request whose staging copy waits for ring space, once traced.
    staging_wait_traced: Option<u64>,
}

impl FakeSend {
    /// A send comm over `inner`, bound to `gpu` in GPU mode.
    pub fn new(inner: Box<dyn SendComm>, cfg: &Config, gpu: Option<GpuContext>) -> Result<FakeSend> {
        let health = Health::new(cfg.fault);
        let inner = (!health.drops_at_start()).then_some(inner);
        let gpu = gpu.map(|g| SendStaging::new(g, MAX_REQUESTS)).transpose()?;
        Ok(FakeSend {
            inner,
            key: 0,
            gpu,
            staged: 0,
            ring: Ring::new(),
            regs: Registrations::default(),
            health,
            headers: Box::new([[0; HEADER_LEN]; MAX_REQUESTS]),
            slots: Default::default(),
            submitted: 0,
            inner_queue: VecDeque::new(),
            staging_wait_traced: None,
        })
    }

    /// The address the caller knows this comm by, recorded in its request entries.
    pub fn set_key(&mut self, key: usize) {
        self.key = key;
    }

    pub fn ring_base(&self) -> usize {
        self.ring.base()
    }

    pub fn regs(&mut self) -> &mut Registrations {
        &mut self.regs
    }

    pub fn isend(&mut self, data: *mut c_void, size: c_int, mhandle: *mut c_void) -> Result<*mut c_void> {
        let len = usize::try_from(size).map_err(|_| Fail::internal(format!("isend size {size} is negative")))?;
        let mr = self.regs.covering(mhandle, data as usize, len)?;
        let (kind, base) = (mr.kind, mr.base);
        let device = kind == NCCL_PTR_CUDA && self.gpu.is_some();
        if let (true, Some(gpu)) = (device, &self.gpu)
            && len > gpu.capacity()
        {
            return Err(Fail::internal(format!(
                "a {len}-byte send from GPU memory exceeds the fake's {}-byte send staging; no receive can take \
                 it anyway (TCPX's receiver exits past 2048 fragments of 4 KiB, sock/tcpx.h process_recv_cmsg)",
                gpu.capacity()
            )));
        }
        let (k, entry) = self.ring.post(self.key, OP_SEND, data, kind, size)?;
        entry.gpu_mem_off = (data as usize - base) as u64;
        self.slots[k as usize % MAX_REQUESTS] =
            SendSlot { data: data as usize, len, device, copying: false, sent: false };
        let key = self.key;
        log::trace(|| {
            let mem = if kind == NCCL_PTR_CUDA { "CUDA" } else { "HOST" };
            format!(
                "send {key:#x} isend k={k} slot={} size={len} from {data:p} ({mem} registration)",
                k % MAX_REQUESTS as u64
            )
        });
        Ok(self.ring.pointer(k))
    }

    pub fn test(&mut self, slot: usize, done: &mut c_int) -> Result<()> {
        let k = self.ring.check_test(slot)?;
        *done = 0;
        if !self.health.may_progress()? {
            return Ok(());
        }
        if let Err(f) = self.progress() {
            return Err(self.health.fail(f));
        }
        let s = &mut self.slots[k as usize % MAX_REQUESTS];
        if !s.sent {
            return Ok(());
        }
        *s = SendSlot::default();
        self.ring.tested += 1;
        self.ring.released += 1;
        *done = 1;
        let key = self.key;
        log::trace(|| format!("send {key:#x} test k={k} slot={slot} done"));
        if self.health.completed() == AfterCompletion::Drop {
            self.inner = None;
        }
        Ok(())
    }

    pub fn has_outstanding(&self) -> bool {
        self.ring.in_flight() > 0
    }

    fn progress(&mut self) -> Result<()> {
        let inner = self.inner.as_mut().ok_or_else(|| Fail::system("Connection closed by remote peer"))?;
        // Start the staging copies of every posted device send that has ring space, so they run
        // while the requests before them are written to the socket.
        while self.staged < self.ring.posted {
            let k = self.staged;
            let i = k as usize % MAX_REQUESTS;
            let s = &mut self.slots[i];
            if let (true, Some(gpu)) = (s.device, &mut self.gpu) {
                let Some(off) = gpu.start(i, s.data, s.len)? else {
                    // Not an error: sends on the wire give their space back.
                    if self.staging_wait_traced != Some(k) {
                        self.staging_wait_traced = Some(k);
                        let (key, len, held) = (self.key, s.len, gpu.in_ring());
                        log::trace(|| {
                            format!("send {key:#x} k={k} ({len} B) waits for staging room ({held} sends hold it)")
                        });
                    }
                    break;
                };
                s.copying = true;
                let (key, len) = (self.key, s.len);
                log::trace(|| format!("send {key:#x} k={k} slot={i} copies {len} B to staging offset {off}"));
            }
            self.staged += 1;
        }
        // Only staged requests: a device send whose copy has no ring space yet waits, and so do the
        // requests after it, which must reach the wire after it.
        while self.submitted < self.staged && self.inner_queue.len() + 2 <= INNER_WINDOW {
            let seq = self.submitted;
            let i = seq as usize % MAX_REQUESTS;
            let s = &mut self.slots[i];
            let payload = match (s.copying, &mut self.gpu) {
                (true, Some(gpu)) => {
                    if !gpu.ready(i)? {
                        break;
                    }
                    gpu.buffer(i)
                }
                _ => s.data as *const u8,
            };
            self.headers[i] = wire::encode(seq, s.len as u32, host::local());
            // SAFETY: the header lives in this comm and the payload is caller memory that isend's
            // contract keeps valid until test reports done; dropping `inner` first joins its thread.
            let header_id =
                unsafe { inner.isend(self.headers[i].as_ptr(), HEADER_LEN, MrHandle(0)) }.map_err(closed)?;
            // SAFETY: as for the header: the payload is caller memory (or this comm's staging copy)
            // that isend's contract keeps valid until test reports done.
            let payload_id = unsafe { inner.isend(payload, s.len, MrHandle(0)) }.map_err(closed)?;
            let (Some(h), Some(p)) = (header_id, payload_id) else {
                return Err(Fail::internal("socket transport refused a request inside its window"));
            };
            self.inner_queue.push_back(InnerRequest { seq, payload: false, id: h });
            self.inner_queue.push_back(InnerRequest { seq, payload: true, id: p });
            self.submitted += 1;
        }
        while let Some(front) = self.inner_queue.front() {
            if inner.test(front.id).map_err(closed)?.is_none() {
                break;
            }
            if front.payload {
                let s = &mut self.slots[front.seq as usize % MAX_REQUESTS];
                s.sent = true;
                if let (true, Some(gpu)) = (s.copying, &mut self.gpu) {
                    // Requests reach the wire in posting order, the order their copies took space.
                    gpu.give_back();
                }
            }
            self.inner_queue.pop_front();
        }
        Ok(())
    }
}
