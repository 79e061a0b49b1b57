//! A send comm: requests are queued by `isend` and moved onto the socket transport only inside
//! `test`, the one progress engine of a comm as in TCPX (TCPXO's NIC client is polled inside `test`
//! too: `dxs/send-op.h` `Test` L56). Each request becomes a header message and a payload message on
//! the underlying stream, in posting order, so the k-th send meets the k-th receive. Which requests
//! may be tested, and how many may be outstanding, is the plugin's rule (`book.rs`).

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};

use uccl_tcpx::internal::ncclnet::{NCCL_PTR_CUDA, NCCL_PTR_HOST};
use uccl_tcpx::internal::transport::{MrHandle, RequestId, SendComm};

use crate::book::{Book, Tested};
use crate::config::Config;
use crate::fail::{Fail, Result};
use crate::footprint::Footprint;
use crate::gpu::GpuContext;
use crate::health::{AfterCompletion, Health, closed};
use crate::host;
use crate::log;
use crate::mr::Registrations;
use crate::profile::Kind;
use crate::request::MAX_REQUESTS;
use crate::staging::SendStaging;
use crate::wire::{self, HEADER_LEN};

/// The socket transport's own request window.
const INNER_WINDOW: usize = 16;

struct SendSlot {
    /// The request's ctrl message, boxed so that it stays put while the transport sends it.
    header: Box<[u8; HEADER_LEN]>,
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
    kind: Kind,
    /// GPU mode: the context and the pinned buffers CUDA sends are copied out of device memory with.
    gpu: Option<SendStaging>,
    /// Requests whose staging copy was started (device sends) or that need none.
    staged: u64,
    book: Book,
    regs: Registrations,
    health: Health,
    /// Requests posted and not yet reported done, by sequence number.
    slots: HashMap<u64, SendSlot>,
    /// Requests handed to the socket transport so far.
    submitted: u64,
    /// Requests whose payload the socket transport has taken, in posting order; their staging
    /// copies were given back.
    on_wire: u64,
    inner_queue: VecDeque<InnerRequest>,
    /// The request whose staging copy waits for ring space, once traced.
    staging_wait_traced: Option<u64>,
    /// What TCPX holds for a comm (`footprint.rs`).
    _footprint: Footprint,
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
            kind: cfg.kind,
            gpu,
            staged: 0,
            book: Book::new(cfg.kind),
            regs: Registrations::default(),
            health,
            slots: HashMap::new(),
            submitted: 0,
            on_wire: 0,
            inner_queue: VecDeque::new(),
            staging_wait_traced: None,
            _footprint: Footprint::of(cfg, false),
        })
    }

    /// The address the caller knows this comm by, recorded in its request entries.
    pub fn set_key(&mut self, key: usize) {
        self.key = key;
    }

    /// The address range of its request pointers, where the registry finds them (TCPX).
    pub fn ring_base(&self) -> Option<usize> {
        self.book.ring_base()
    }

    pub fn regs(&mut self) -> &mut Registrations {
        &mut self.regs
    }

    pub fn isend(&mut self, data: *mut c_void, size: c_int, mhandle: *mut c_void) -> Result<*mut c_void> {
        let len = usize::try_from(size).map_err(|_| Fail::internal(format!("isend size {size} is negative")))?;
        let mr = self.regs.covering(mhandle, data as usize, len)?;
        let (kind, base) = (mr.kind, mr.base);
        if self.kind == Kind::Tcpxo && kind & NCCL_PTR_HOST != 0 && len > 0 {
            return Err(host_payload("Send", len, self.key));
        }
        let device = kind == NCCL_PTR_CUDA && self.gpu.is_some();
        if let (true, Some(gpu)) = (device, &self.gpu)
            && len > gpu.capacity()
        {
            let why = match self.kind {
                Kind::Tcpx => {
                    "no receive can take it anyway (TCPX's receiver exits past 2048 fragments of 4 KiB, \
                               sock/tcpx.h process_recv_cmsg)"
                }
                Kind::Tcpxo => "a limit of the fake, not of TCPXO: keep GPU-mode requests within it",
            };
            return Err(Fail::internal(format!(
                "a {len}-byte send from GPU memory exceeds the fake's {}-byte send staging; {why}",
                gpu.capacity()
            )));
        }
        let (k, request) = self.book.post(self.key, data, kind, size, (data as usize - base) as u64)?;
        let slot = SendSlot {
            header: Box::new([0; HEADER_LEN]),
            data: data as usize,
            len,
            device,
            copying: false,
            sent: false,
        };
        self.slots.insert(k, slot);
        let key = self.key;
        log::trace(|| {
            let mem = if kind == NCCL_PTR_CUDA { "CUDA" } else { "HOST" };
            format!(
                "send {key:#x} isend k={k} slot={} size={len} from {data:p} ({mem} registration)",
                k % MAX_REQUESTS as u64
            )
        });
        Ok(request)
    }

    /// One `test` of the request `id` names (the registry's view of its pointer). Only here does
    /// the comm progress.
    pub fn test(&mut self, id: usize) -> Result<Tested> {
        let k = self.book.testable(id)?;
        let sent = match self.advance(k) {
            Ok(sent) => sent,
            Err(f) => {
                let f = self.health.fail(f);
                self.book.failed(k);
                return Ok(Tested::Failed(f));
            }
        };
        if !sent {
            return Ok(Tested::Pending);
        }
        let len = self.slots.remove(&k).map_or(0, |s| s.len);
        self.book.done(k);
        let key = self.key;
        log::trace(|| format!("send {key:#x} test k={k} slot={} done", k % MAX_REQUESTS as u64));
        if self.health.completed() == AfterCompletion::Drop {
            self.inner = None;
        }
        Ok(Tested::Done(len as c_int))
    }

    /// Progresses the comm, unless it stalled; whether request `k` is on the wire.
    fn advance(&mut self, k: u64) -> Result<bool> {
        if !self.health.may_progress()? {
            return Ok(false);
        }
        self.progress()?;
        Ok(self.slots.get(&k).is_some_and(|s| s.sent))
    }

    pub fn has_outstanding(&self) -> bool {
        self.book.in_flight() > 0
    }

    fn progress(&mut self) -> Result<()> {
        let inner = self.inner.as_mut().ok_or_else(|| Fail::system("Connection closed by remote peer"))?;
        // Start the staging copies of every posted device send that has ring space, so they run
        // while the requests before them are written to the socket. A copy holds staging slot
        // k % 16 until its bytes are on the wire, so at most 16 are started ahead of the wire
        // (TCPX's window of 16 requests already keeps it so; TCPXO's comms have no window).
        while self.staged < self.book.posted() && self.staged - self.on_wire < MAX_REQUESTS as u64 {
            let k = self.staged;
            let i = k as usize % MAX_REQUESTS;
            let s = self.slots.get_mut(&k).expect("a posted request keeps its slot until it is on the wire");
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
            let s = self.slots.get_mut(&seq).expect("a posted request keeps its slot until it is on the wire");
            let payload = match (s.copying, &mut self.gpu) {
                (true, Some(gpu)) => {
                    if !gpu.ready(i)? {
                        break;
                    }
                    gpu.buffer(i)
                }
                _ => s.data as *const u8,
            };
            *s.header = wire::encode(seq, s.len as u32, host::local());
            // SAFETY: the header is boxed in the slot, which stays until the request is reported
            // done, after its payload left; the payload is caller memory that isend's contract keeps
            // valid until test reports done; dropping `inner` first joins its thread.
            let header_id = unsafe { inner.isend(s.header.as_ptr(), HEADER_LEN, MrHandle(0)) }.map_err(closed)?;
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
                let s = self.slots.get_mut(&front.seq).expect("a request keeps its slot until it is reported done");
                s.sent = true;
                if let (true, Some(gpu)) = (s.copying, &mut self.gpu) {
                    // Requests reach the wire in posting order, the order their copies took space.
                    gpu.give_back();
                }
                self.on_wire += 1;
            }
            self.inner_queue.pop_front();
        }
        Ok(())
    }
}

/// TCPXO refuses payload in host memory (`fo/nccl_shim.cc` `GetRequest` L517-524): its NIC's
/// transfer service reaches only registered GPU memory, though `ptrSupport` lists HOST.
pub fn host_payload(what: &str, len: usize, comm: usize) -> Fail {
    Fail::system(format!(
        "Attempted to {what} {len} bytes from host buffer on comm {comm:#x} (fo/nccl_shim.cc GetRequest): TCPXO \
         moves only GPU memory registered as NCCL_PTR_CUDA, and only 0-byte requests may name host memory"
    ))
}
