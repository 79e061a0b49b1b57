//! A receive comm: every received byte lands in the bounce pool of the comm's GPU (shared with the
//! GPU's other receive comms), cut into fragments at shuffled pool pages, and is described by
//! `loadMeta` entries in the unpack slot of its request (slot of the k-th receive = k % 16),
//! published when `test` reports the request done. Pool pages and the request entry stay owned by
//! the receive until `irecvConsumed`, or until the comm closes.

use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use uccl_tcpx::internal::ncclnet::{LoadMeta, NCCL_PTR_CUDA, NCCL_PTR_HOST, NetUnpackMeta};
use uccl_tcpx::internal::transport::{MrHandle, RecvComm, RequestId};

use crate::config::{Config, Fragmentation};
use crate::fail::{Fail, Result};
use crate::fatal::fatal;
use crate::footprint::Footprint;
use crate::fragment::{self, Failstop, Fragment, MAX_FRAGMENTS, PAGE, Rng};
use crate::gpu::GpuContext;
use crate::health::{AfterCompletion, Health, closed};
use crate::host::{self, Origin};
use crate::log;
use crate::memory::RxMemory;
use crate::mr::Registrations;
use crate::pool::SharedPool;
use crate::request::{MAX_REQUESTS, OP_RECV, Ring};
use crate::wire::{self, HEADER_LEN};

#[derive(Default)]
struct RecvSlot {
    posted_len: usize,
    /// Fragment count once all bytes are in the pool; published as `cnt[slot]` by `test`.
    arrived: Option<u64>,
    pages: Vec<u32>,
}

/// Where the one receive being filled stands. Messages arrive in order on one stream, so receives
/// are filled one at a time, oldest first.
enum Rx {
    /// Waiting for the next message's header: its receive, once posted.
    Header(Option<RequestId>),
    /// The header arrived; waiting for enough free pool pages.
    Pages {
        seq: u64,
        len: usize,
        frags: Vec<Fragment>,
    },
    Payload {
        seq: u64,
        len: usize,
        frags: Vec<Fragment>,
        pages: Vec<u32>,
        id: RequestId,
    },
}

pub struct FakeRecv {
    /// First field: dropped (closing the stream, joining its helper thread) before the buffers below.
    inner: Option<Box<dyn RecvComm>>,
    mem: Box<dyn RxMemory>,
    /// GPU mode: the GPU the comm was bound to at accept, where its pool lives.
    gpu: Option<GpuContext>,
    key: usize,
    chunk: usize,
    fragmentation: Fragmentation,
    same_host_allowed: bool,
    host_recv_allowed: bool,
    /// Why this comm's flows are never steered into GPU memory, if they are not (`listen.rs`).
    unsteered: Option<String>,
    ring: Ring,
    regs: Registrations,
    health: Health,
    slots: [RecvSlot; MAX_REQUESTS],
    rx: Rx,
    /// Sequence number of the receive whose header comes next.
    next_header: u64,
    pool: Arc<SharedPool>,
    rng: Rng,
    header: Box<[u8; HEADER_LEN]>,
    /// What TCPX holds for a comm (`footprint.rs`).
    _footprint: Footprint,
}

impl FakeRecv {
    pub fn new(
        inner: Box<dyn RecvComm>,
        mem: Box<dyn RxMemory>,
        gpu: Option<GpuContext>,
        pool: Arc<SharedPool>,
        unsteered: Option<String>,
        cfg: &Config,
        seed: u64,
    ) -> FakeRecv {
        let health = Health::new(cfg.fault);
        let inner = (!health.drops_at_start()).then_some(inner);
        let rng = Rng::new(seed);
        FakeRecv {
            inner,
            mem,
            gpu,
            key: 0,
            chunk: cfg.chunk_bytes,
            fragmentation: cfg.fragmentation,
            same_host_allowed: cfg.same_host_allowed,
            host_recv_allowed: cfg.host_recv_allowed,
            unsteered,
            ring: Ring::new(),
            regs: Registrations::default(),
            health,
            slots: Default::default(),
            rx: Rx::Header(None),
            next_header: 0,
            pool,
            rng,
            header: Box::new([0; HEADER_LEN]),
            _footprint: Footprint::of(cfg, true),
        }
    }

    pub fn ring_base(&self) -> usize {
        self.ring.base()
    }

    pub fn unpack_handle(&self) -> *mut c_void {
        self.mem.unpack_handle()
    }

    /// The address the caller knows this comm by, recorded in its request entries.
    pub fn set_key(&mut self, key: usize) {
        self.key = key;
    }

    pub fn regs(&mut self) -> &mut Registrations {
        &mut self.regs
    }

    pub fn irecv(&mut self, data: *mut c_void, size: c_int, mhandle: *mut c_void) -> Result<*mut c_void> {
        let len = usize::try_from(size).map_err(|_| Fail::internal(format!("irecv size {size} is negative")))?;
        let mr = self.regs.covering(mhandle, data as usize, len)?;
        let kind = mr.kind;
        if let (Some(gpu), Some(device)) = (&self.gpu, mr.device)
            && device != gpu.ordinal()
        {
            let g = gpu.ordinal();
            return Err(Fail::internal(format!(
                "receive into memory of GPU {device} on a receive comm bound to GPU {g} (the device current at \
                 accept): its bytes land in GPU {g}'s bounce pool, which TCPX maps for GPU {g} alone (gpu/common.cu \
                 CuIpcMemfdHandle, cuMemSetAccess), so an unpack running on GPU {device} faults. Receive GPU \
                 {device}'s data on a comm accepted with GPU {device} current"
            )));
        }
        // A flow nothing steers arrives in host memory, where a plain recv() reads it.
        if kind == NCCL_PTR_HOST && self.gpu.is_some() && self.unsteered.is_none() && !self.host_recv_allowed {
            return Err(self.health.fail(Fail::internal(
                "requested receive on host mem buffer (net_tcpx.cc taskProgress): TCPX flow-steered every data \
                 socket of this receive comm into GPU memory at accept, so a host recv() cannot read its payload \
                 (it fails with EFAULT, TCPX's helper thread gives up and the request never completes); this comm \
                 has failed. Receive into GPU memory (a CUDA registration) and copy out",
            )));
        }
        let (k, _) = self.ring.post(self.key, OP_RECV, data, kind, size)?;
        self.slots[k as usize % MAX_REQUESTS] = RecvSlot { posted_len: len, arrived: None, pages: Vec::new() };
        let (key, r) = (self.key, &self.ring);
        log::trace(|| {
            let mem = if kind == NCCL_PTR_CUDA { "CUDA" } else { "HOST" };
            format!(
                "recv {key:#x} irecv k={k} slot={} size={len} into {data:p} ({mem} registration; posted {}, done {}, \
                 consumed {})",
                k % MAX_REQUESTS as u64,
                r.posted,
                r.tested,
                r.released
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
        let i = k as usize % MAX_REQUESTS;
        let Some(cnt) = self.slots[i].arrived else { return Ok(()) };
        // SAFETY: `cnt` is an aligned u64 inside the comm's metadata block, written by no one else;
        // the release store orders the loadMeta writes before it for a reader that acquires it.
        unsafe { AtomicU64::from_ptr(cnt_ptr(self.mem.meta(), i)) }.store(cnt, Ordering::Release);
        self.ring.entry(k).unpack_cnt_cache = cnt;
        self.ring.tested += 1;
        *done = 1;
        let key = self.key;
        log::trace(|| format!("recv {key:#x} test k={k} slot={i} done: cnt[{i}]={cnt} published"));
        if self.health.completed() == AfterCompletion::Drop {
            self.inner = None;
        }
        Ok(())
    }

    pub fn consumed(&mut self, slot: usize) -> Result<()> {
        let k = self.ring.check_consume(slot)?;
        let i = k as usize % MAX_REQUESTS;
        let s = std::mem::take(&mut self.slots[i]);
        self.pool.give_back(s.pages);
        self.ring.entry(k).unpack_active = false;
        self.ring.released += 1;
        let (key, r) = (self.key, &self.ring);
        log::trace(|| {
            format!(
                "recv {key:#x} irecvConsumed k={k} slot={i} (posted {}, done {}, consumed {})",
                r.posted, r.tested, r.released
            )
        });
        Ok(())
    }

    /// Completed receives whose pages were never given back.
    pub fn unconsumed(&self) -> u64 {
        self.ring.unconsumed()
    }

    pub fn has_outstanding(&self) -> bool {
        self.ring.in_flight() > 0
    }

    fn progress(&mut self) -> Result<()> {
        loop {
            let inner = self.inner.as_mut().ok_or_else(|| Fail::system("Connection closed by remote peer"))?;
            self.rx = match std::mem::replace(&mut self.rx, Rx::Header(None)) {
                Rx::Header(mut id) => {
                    if id.is_none() && self.next_header >= self.ring.posted {
                        self.rx = Rx::Header(None);
                        return Ok(());
                    }
                    let seq = self.next_header;
                    let Some((len, origin)) = wire::poll_header(&mut **inner, &mut self.header, &mut id, seq)? else {
                        self.rx = Rx::Header(id);
                        return Ok(());
                    };
                    let frags = self.announce(seq, len, origin)?;
                    let (key, n) = (self.key, frags.len());
                    log::trace(|| {
                        let slot = seq % MAX_REQUESTS as u64;
                        format!("recv {key:#x} k={seq} slot={slot}: the sender's {len} B arrive as {n} fragments")
                    });
                    Rx::Pages { seq, len, frags }
                }
                Rx::Pages { seq, len, frags } => {
                    let Some(pages) = self.pool.take(frags.len(), &mut self.rng) else {
                        // Not an error: the receive waits until consumes give pages back.
                        self.rx = Rx::Pages { seq, len, frags };
                        return Ok(());
                    };
                    let staging = self.mem.staging(len)?;
                    let inner = self.inner.as_mut().expect("checked above");
                    // SAFETY: staging holds `len` bytes and does not move until this receive completed.
                    match unsafe { inner.irecv(staging, len, MrHandle(0)) }.map_err(closed)? {
                        Some(id) => Rx::Payload { seq, len, frags, pages, id },
                        None => return Err(Fail::internal("socket transport refused a request inside its window")),
                    }
                }
                Rx::Payload { seq, len, frags, pages, id } => {
                    let Some(n) = inner.test(id).map_err(closed)? else {
                        self.rx = Rx::Payload { seq, len, frags, pages, id };
                        return Ok(());
                    };
                    inner.irecv_consumed(id).map_err(closed)?;
                    if n != len {
                        return Err(Fail::internal(format!("peer announced {len} bytes and sent {n}")));
                    }
                    self.land(seq, &frags, pages)?;
                    self.next_header += 1;
                    Rx::Header(None)
                }
            };
        }
    }

    /// The sender's header arrived: the request takes the sender's size and its unpack slot.
    fn announce(&mut self, seq: u64, len: usize, origin: Origin) -> Result<Vec<Fragment>> {
        let i = seq as usize % MAX_REQUESTS;
        let meta = self.mem.meta();
        let key = self.key;
        let entry = self.ring.entry(seq);
        let devmem = entry.mem_type == NCCL_PTR_CUDA;
        if let Some(ends) = host::same_host_ends(origin).filter(|_| devmem && len > 0 && !self.same_host_allowed) {
            return Err(fatal(format!(
                "fatal, recv comm {key:#x} data landed on host memory 1 times (sock/tcpx.h process_recv_cmsg): \
                 {ends}, and same-host traffic never reaches the NIC, so nothing steers it into device memory. \
                 Reach a same-host peer without the plugin (FAKE_TCPX_SAME_HOST=allow permits it in tests)"
            )));
        }
        if let Some(why) = self.unsteered.as_deref().filter(|_| devmem && len > 0) {
            return Err(fatal(format!(
                "fatal, recv comm {key:#x} data landed on host memory 1 times (sock/tcpx.h process_recv_cmsg): {why}"
            )));
        }
        entry.size = len as c_int;
        entry.unpack_active = true;
        entry.unpack_idx = i as u64;
        // SAFETY: in-bounds field addresses of the comm's metadata block.
        entry.unpack_mem = unsafe { std::ptr::addr_of_mut!((*meta).mem[i]).cast::<LoadMeta>() };
        entry.unpack_cnt = cnt_ptr(meta, i);
        entry.unpack_cnt_cache = 0;
        // SAFETY: as above; the consumer reads cnt[i] only after test reported this request done.
        unsafe { AtomicU64::from_ptr(cnt_ptr(meta, i)) }.store(0, Ordering::Relaxed);
        let posted = self.slots[i].posted_len;
        if len > posted {
            log::info(&format!(
                "receive {seq}: the sender's {len} bytes exceed the posted {posted}; they land in the pool and \
                 loadMeta describes all of them (TCPX does not check either)"
            ));
        }
        let frags = fragment::plan(len, self.chunk, self.fragmentation, &mut self.rng).map_err(|stop| {
            let what = match stop {
                Failstop::Task => format!(
                    "received {MAX_FRAGMENTS}/{MAX_FRAGMENTS} segs, failstop, recv comm {key:#x} (sock/tcpx.h \
                     process_recv_cmsg): one {}-byte chunk of this {len}-byte receive",
                    self.chunk
                ),
                Failstop::Request(n) => {
                    format!("request too many pages {n}, failstop (net_tcpx.cc tcpxTest): this {len}-byte receive")
                }
            };
            fatal(format!(
                "{what} needs more fragments than an unpack slot holds ({MAX_FRAGMENTS}, about 8 MiB of whole \
                 pages); keep each receive within 4 MiB"
            ))
        })?;
        if frags.len() > self.pool.total() {
            return Err(Fail::internal(format!(
                "a {len}-byte receive needs {} pool pages, the bounce pool of its GPU has {} (FAKE_TCPX_POOL_MIB)",
                frags.len(),
                self.pool.total()
            )));
        }
        Ok(frags)
    }

    /// The payload is staged: scatter it to its pages and write the slot's loadMeta entries.
    fn land(&mut self, seq: u64, frags: &[Fragment], pages: Vec<u32>) -> Result<()> {
        let metas: Vec<LoadMeta> = frags
            .iter()
            .zip(&pages)
            .map(|(f, &page)| LoadMeta { src_off: page * PAGE as u32 + f.page_off, len: f.len, dst_off: f.dst_off })
            .collect();
        self.mem.scatter(&metas)?;
        let i = seq as usize % MAX_REQUESTS;
        let meta = self.mem.meta();
        for (j, m) in metas.iter().enumerate() {
            // SAFETY: j < MAX_FRAGMENTS (the plan is capped) and i < 16: in bounds of the metadata
            // block; slot i belongs to this receive until it is consumed.
            unsafe { std::ptr::addr_of_mut!((*meta).mem[i][j]).write(*m) };
        }
        let s = &mut self.slots[i];
        s.arrived = Some(metas.len() as u64);
        s.pages = pages;
        Ok(())
    }
}

impl Drop for FakeRecv {
    /// Closing a comm closes its sockets, and the kernel frees the devmem pages they still hold:
    /// the pages of receives never consumed go back to the GPU's pool.
    fn drop(&mut self) {
        for s in &mut self.slots {
            self.pool.give_back(std::mem::take(&mut s.pages));
        }
        if let Rx::Payload { pages, .. } = std::mem::replace(&mut self.rx, Rx::Header(None)) {
            self.pool.give_back(pages);
        }
    }
}

fn cnt_ptr(meta: *mut NetUnpackMeta, slot: usize) -> *mut u64 {
    // SAFETY: an in-bounds field address; nothing is read.
    unsafe { std::ptr::addr_of_mut!((*meta).cnt[slot]) }
}
