//! The same-host GPU path: one-sided GPU->GPU transfers between engines of one host move with
//! device copies, no byte on a socket (except calls of many small pieces the GPU's kernel cannot
//! take, which the network carries). Between engines of one process the target's addresses are
//! copied to directly; between processes the owner hands its region's CUDA IPC handle to the
//! initiator, which maps the allocation once and copies into and out of it. Covered here: both, on
//! one GPU and across two, single items and vectors, writes and reads at odd offsets checked byte
//! for byte, requests the owner did not authorize (refused, the target untouched), the IPC info of
//! `uccl_engine_get_ipc_info` opened by another process at a sub-range, memory of the CUDA virtual
//! memory API (no handle: the network path), deregistration as a fence on both sides, a peer's
//! capability prepared before the first transfer, and a peer process that exits while its buffer is
//! mapped here.
//!
//! Every test checks that its transfers took the path under test (`device_copy_batches`). Without
//! a CUDA driver each prints "SKIPPED: no CUDA driver" (and fails under UCCL_TCPX_REQUIRE_GPU=1);
//! tests needing two GPUs say so on hosts with one.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys;
use uccl_tcpx::internal::transport::MemKind;
use uccl_tcpx::{Config, Connection, Engine, FifoItem, IpcInfo, Locality, OneSided, Piece, PieceRun, UcclStatus};

mod common;
use common::gpu::{Mem, fewer_gpus_than, no_gpu};
use common::{ChildTest, PATIENCE, TRANSFER_LIMIT, assert_same, pattern, same_host, wait, within};

const LEN: usize = (16 << 20) + 4096;
const SEED: u64 = 91;

fn item(engine: &Engine, mr: u64, mem: &Mem) -> FifoItem {
    engine.prepare_fifo(mr, mem.addr(), mem.len()).unwrap()
}

fn at(item: FifoItem, offset: usize) -> FifoItem {
    FifoItem { addr: item.addr + offset as u64, ..item }
}

/// `conn.wait(id)`, which on the device path blocks on the copies' event itself, bounded by
/// [`TRANSFER_LIMIT`] (a hang fails the test).
fn waited(conn: &Arc<Connection>, id: u64) -> uccl_tcpx::Result<u64> {
    let conn = conn.clone();
    within(TRANSFER_LIMIT, "Connection::wait on the device path", move || conn.wait(id))
}

/// Writes and reads between `conn`'s local GPU buffer and the remote region `remote` holds,
/// whose bytes start as `pattern(remote_len, SEED)`: a read of almost all of it at odd offsets on
/// both ends, a write into its middle read back, a vector of three pieces each way, and one of 512
/// small pieces each way, which the issuing GPU's kernel moves in one batch where it addresses both
/// ends (`kernel_reach`: one GPU's memory, or a peer's allocation that CUDA IPC mapped into its
/// context, wherever that lives). The vectors are waited for with `Connection::wait`, the rest
/// polled for.
fn exercise(conn: &Arc<Connection>, local: &mut Mem, mr: u64, remote: FifoItem, remote_len: usize, kernel_reach: bool) {
    let expected = pattern(remote_len, SEED);
    let batches = conn.device_copy_batches();
    let len = remote_len - 64;
    let r = conn.read(&[OneSided { mr, addr: local.addr() + 3, len, remote: at(remote, 5) }]).unwrap();
    assert_eq!(wait(conn, r).unwrap(), len as u64);
    assert_same(&local.read(3, len), &expected[5..5 + len], "read");

    let wlen = (3 << 20) + 7;
    let fresh = pattern(wlen, 5);
    local.write(1, &fresh);
    let w =
        conn.write(&[OneSided { mr, addr: local.addr() + 1, len: wlen, remote: at(remote, (1 << 20) + 1) }]).unwrap();
    assert_eq!(wait(conn, w).unwrap(), wlen as u64);
    local.clear();
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len: wlen + 2, remote: at(remote, 1 << 20) }]).unwrap();
    assert_eq!(wait(conn, r).unwrap(), (wlen + 2) as u64);
    let got = local.read(0, wlen + 2);
    assert_same(&got[1..=wlen], &fresh, "write read back");
    assert_eq!(got[0], expected[1 << 20], "the byte before the write is untouched");
    assert_eq!(got[wlen + 1], expected[(1 << 20) + 1 + wlen], "the byte after it too");

    // A vector: three pieces of different sizes, scattered on both ends, one transfer id.
    let pieces = [(7usize, 8 << 20, 1usize), (70_000, 9 << 20, 4096), ((1 << 20) + 3, 12 << 20, 8)];
    let vdata: Vec<Vec<u8>> = pieces.iter().enumerate().map(|(i, &(n, _, _))| pattern(n, 60 + i as u64)).collect();
    let mut loff = 0;
    let mut items = Vec::new();
    for (&(n, roff, gap), d) in pieces.iter().zip(&vdata) {
        local.write(loff, d);
        items.push(OneSided { mr, addr: local.addr() + loff, len: n, remote: at(remote, roff) });
        loff += n + gap;
    }
    let w = conn.write(&items).unwrap();
    assert_eq!(waited(conn, w).unwrap(), pieces.iter().map(|p| p.0 as u64).sum::<u64>());
    local.clear();
    let back: Vec<OneSided> = items.iter().map(|i| OneSided { addr: i.addr + 1, ..*i }).collect();
    let r = conn.read(&back).unwrap();
    assert_eq!(waited(conn, r).unwrap(), pieces.iter().map(|p| p.0 as u64).sum::<u64>());
    for ((item, d), i) in back.iter().zip(&vdata).zip(0..) {
        assert_same(&local.read(item.addr - local.addr(), d.len()), d, &format!("vector piece {i}"));
    }

    // KV-cache blocks: 512 small pieces at odd places, the remote ones in reverse order. The
    // registration of the local buffer built its GPU's kernel (or found it cannot be built).
    let ordinal = match local.kind() {
        MemKind::Cuda { device } => device as usize,
        MemKind::Host => unreachable!("the local buffer is GPU memory"),
    };
    let built = uccl_tcpx::internal::cuda::unpack::UnpackKernels::if_built(ordinal);
    assert!(built.is_some(), "registering GPU {ordinal}'s memory built its kernel");
    let kernel = kernel_reach && built.is_some_and(|b| b.is_ok());
    let kernel_batches = conn.device_copy_kernel_batches();
    let (n, stride) = (512usize, 8192usize);
    let many: Vec<(usize, usize, usize)> =
        (0..n).map(|i| (i * stride + i % 5, (n - 1 - i) * stride + 16 + i % 3, 4096 + i % 11)).collect();
    let mdata = pattern(n * stride + 64, 77);
    local.write(0, &mdata);
    let items: Vec<OneSided> = many
        .iter()
        .map(|&(lo, ro, len)| OneSided { mr, addr: local.addr() + lo, len, remote: at(remote, ro) })
        .collect();
    let total: u64 = many.iter().map(|p| p.2 as u64).sum();
    let w = conn.write(&items).unwrap();
    assert_eq!(waited(conn, w).unwrap(), total);
    local.clear();
    let r = conn.read(&items).unwrap();
    assert_eq!(waited(conn, r).unwrap(), total);
    let back = local.read(0, n * stride + 64);
    for (i, &(lo, _, len)) in many.iter().enumerate() {
        assert_same(&back[lo..lo + len], &mdata[lo..lo + len], &format!("small piece {i}"));
    }
    assert_eq!(
        conn.device_copy_kernel_batches(),
        kernel_batches + if kernel { 2 } else { 0 },
        "the small pieces went through the kernel exactly where it addresses both ends"
    );
    // Where the kernel cannot take the small pieces (another GPU's memory in this process), they
    // would be copied one by one at about 4 us each: the network carries those two calls instead.
    assert_eq!(
        conn.device_copy_batches(),
        batches + if kernel { 7 } else { 5 },
        "every call took the device path, one batch each, but the small pieces the kernel cannot take"
    );
}

/// Engine `a` on GPU `ga` connected to engine `b` on GPU `gb`, both in this process.
fn same_process(ga: i32, gb: i32) {
    same_process_with_memory((ga, gb), (ga, gb));
}

/// Engines of GPUs `engines` in this process, their memory on GPUs `memory`: in one process the
/// copies are issued on the local memory's own GPU, whichever GPU its engine serves.
fn same_process_with_memory(engines: (i32, i32), memory: (i32, i32)) {
    let a = Arc::new(Engine::new(Config { gpu: Some(engines.0), ..same_host() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(engines.1), ..same_host() }).unwrap());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let _ba = common::accept(&b).unwrap();
    assert_eq!(ab.peer.locality, Locality::SameProcess);
    let mut target = Mem::on_gpu(memory.1, LEN);
    target.write(0, &pattern(LEN, SEED));
    let tmr = b.register(target.addr(), LEN).unwrap();
    let mut local = Mem::on_gpu(memory.0, LEN);
    let lmr = a.register(local.addr(), LEN).unwrap();
    exercise(&ab, &mut local, lmr, item(&b, tmr, &target), LEN, memory.0 == memory.1);
    assert_eq!((a.gpu().unwrap().ordinal(), b.gpu().unwrap().ordinal()), engines, "the engines' GPUs stay");
}

#[test]
fn same_process_one_gpu() {
    if no_gpu() {
        return;
    }
    same_process(0, 0);
}

#[test]
fn same_process_two_gpus() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    same_process(0, 1);
    same_process(1, 0);
}

/// Memory of a GPU other than its engine's, as UCCL's two-GPU tests register it (both ranks
/// allocate on GPU 0 while one endpoint serves GPU 1): registered, and moved byte for byte.
#[test]
fn same_process_memory_of_other_gpus() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    same_process_with_memory((0, 1), (0, 0));
    same_process_with_memory((1, 0), (0, 1));
    same_process_with_memory((1, 1), (0, 0));
}

#[test]
fn same_process_host_and_gpu_ends() {
    if no_gpu() {
        return;
    }
    let p = common::pair(same_host());
    let mut host = Mem::new(common::gpu::Side::Host, 1 << 20);
    host.write(0, &pattern(1 << 20, 3));
    let hmr = p.a.register(host.addr(), host.len()).unwrap();
    let gpu = Mem::on_gpu(0, 1 << 20);
    let gmr = p.b.register(gpu.addr(), gpu.len()).unwrap();
    let w =
        p.ab.write(&[OneSided { mr: hmr, addr: host.addr(), len: 1 << 20, remote: item(&p.b, gmr, &gpu) }]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), 1 << 20);
    assert_same(&gpu.read(0, 1 << 20), &pattern(1 << 20, 3), "host -> GPU of the other engine");
    assert_eq!(p.ab.device_copy_batches(), 1);
}

/// Between host and GPU memory every piece is a copy of its own: a vector of many small pieces
/// takes the network path instead (each copy would cost the poster about 4 us), while a few small
/// pieces, or many large ones, are still copied on the device path.
#[test]
fn same_process_many_small_host_pieces_take_the_network() {
    if no_gpu() {
        return;
    }
    let p = common::pair(same_host());
    const LEN: usize = 8 << 20;
    let mut host = Mem::new(common::gpu::Side::Host, LEN);
    host.write(0, &pattern(LEN, 4));
    let hmr = p.a.register(host.addr(), LEN).unwrap();
    let gpu = Mem::on_gpu(0, LEN);
    let gmr = p.b.register(gpu.addr(), LEN).unwrap();
    let remote = item(&p.b, gmr, &gpu);
    // (pieces, piece length, whether the device path copies them)
    for (pieces, len, device) in [(256usize, 16usize << 10, false), (63, 16 << 10, true), (64, 64 << 10, true)] {
        let batches = p.ab.device_copy_batches();
        let stride = LEN / pieces;
        let items: Vec<OneSided> = (0..pieces)
            .map(|i| OneSided { mr: hmr, addr: host.addr() + i * stride + 1, len, remote: at(remote, i * stride + 3) })
            .collect();
        let w = p.ab.write(&items).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), (pieces * len) as u64);
        let got = gpu.read(0, LEN);
        for i in 0..pieces {
            let (src, dst) = (i * stride + 1, i * stride + 3);
            assert_same(&got[dst..dst + len], &host.read(src, len), &format!("{pieces} x {len}: piece {i}"));
        }
        // And back: the GPU's pieces read into host memory, just past each source piece's start.
        let back: Vec<OneSided> = items.iter().map(|i| OneSided { addr: i.addr - 1 + len, ..*i }).collect();
        let r = p.ab.read(&back).unwrap();
        assert_eq!(wait(&p.ab, r).unwrap(), (pieces * len) as u64);
        for i in 0..pieces {
            let (src, dst) = (i * stride + 3, i * stride + len);
            assert_same(&host.read(dst, len), &got[src..src + len], &format!("{pieces} x {len}: piece {i} read"));
        }
        let on_device = p.ab.device_copy_batches() - batches;
        assert_eq!(on_device, if device { 2 } else { 0 }, "{pieces} pieces of {len} bytes: on the device path");
    }
}

/// One call whose copies go to two GPUs' queues (a GPU source of this engine's GPU, a host source
/// copied by the target's GPU) is two batches under one transfer id: `Connection::wait` returns
/// once both landed, and a wait for a refused call (no batch at all) still reports the refusal.
#[test]
fn same_process_wait_covers_a_call_on_two_gpus() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    let a = Arc::new(Engine::new(Config { gpu: Some(0), ..same_host() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(1), ..same_host() }).unwrap());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let _ba = common::accept(&b).unwrap();
    assert_eq!(ab.peer.locality, Locality::SameProcess);
    let target = Mem::on_gpu(1, 2 * LEN);
    let tmr = b.register(target.addr(), target.len()).unwrap();
    let remote = item(&b, tmr, &target);
    let mut gpu_src = Mem::on_gpu(0, LEN);
    gpu_src.write(0, &pattern(LEN, 21));
    let gmr = a.register(gpu_src.addr(), LEN).unwrap();
    let mut host_src = Mem::new(common::gpu::Side::Host, LEN);
    host_src.write(0, &pattern(LEN, 22));
    let hmr = a.register(host_src.addr(), LEN).unwrap();
    let batches = ab.device_copy_batches();
    let w = ab
        .write(&[
            OneSided { mr: gmr, addr: gpu_src.addr(), len: LEN, remote },
            OneSided { mr: hmr, addr: host_src.addr(), len: LEN, remote: at(remote, LEN) },
        ])
        .unwrap();
    assert_eq!(waited(&ab, w).unwrap(), 2 * LEN as u64);
    assert_eq!(ab.device_copy_batches(), batches + 2, "one batch per issuing GPU");
    assert_same(&target.read(0, LEN), &pattern(LEN, 21), "from GPU 0");
    assert_same(&target.read(LEN, LEN), &pattern(LEN, 22), "from host memory, copied by GPU 1");
    let outside = FifoItem { addr: remote.addr + 2 * LEN as u64 - 8, size: 16, ..remote };
    let refused = ab.write(&[OneSided { mr: gmr, addr: gpu_src.addr(), len: 16, remote: outside }]).unwrap();
    assert_eq!(waited(&ab, refused).unwrap_err().status(), UcclStatus::ErrNotAllowed);
}

/// Requests the target did not advertise are refused on the device path as on the network path,
/// and leave the target as it was.
#[test]
fn same_process_refuses_what_was_not_advertised() {
    if no_gpu() {
        return;
    }
    let p = common::pair(same_host());
    let target = Mem::on_gpu(0, 1 << 20);
    let tmr = p.b.register(target.addr(), target.len()).unwrap();
    let window = p.b.prepare_fifo(tmr, target.addr() + 4096, 4096).unwrap();
    let mut src = Mem::on_gpu(0, 1 << 20);
    src.write(0, &[0xee; 1 << 20]);
    let smr = p.a.register(src.addr(), src.len()).unwrap();
    assert_refusals(&p.ab, smr, &src, window);
    assert!(target.read(0, 1 << 20).iter().all(|&b| b == 0), "the target is untouched");
}

/// Before the window, past it, and a forged token: each fails with NOT_ALLOWED.
fn assert_refusals(conn: &Connection, mr: u64, src: &Mem, window: FifoItem) {
    let mut forged = window.to_bytes();
    forged[40] ^= 1;
    for (what, remote, len) in [
        ("before the window", FifoItem { addr: window.addr - 1, ..window }, 16),
        ("past the window", at(window, 4090), 16),
        ("a forged token", FifoItem::from_bytes(&forged), 16),
    ] {
        for write in [true, false] {
            let op = OneSided { mr, addr: src.addr(), len, remote };
            let posted = if write { conn.write(&[op]) } else { conn.read(&[op]) };
            let err = posted.and_then(|id| wait(conn, id)).unwrap_err();
            assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what} (write {write}): {err}");
        }
    }
}

/// Deregistering the target, or the source, while a large device copy between them runs returns
/// only once the copy landed: the bytes do not change afterwards, and all of them are there.
#[test]
fn same_process_deregistration_waits_for_the_copy() {
    if no_gpu() {
        return;
    }
    let p = common::pair(same_host());
    let len = 256 << 20;
    let target = Mem::on_gpu(0, len);
    let mut src = Mem::on_gpu(0, len);
    src.write(0, &pattern(len, 8));
    for deregister_target in [true, false] {
        let tmr = p.b.register(target.addr(), len).unwrap();
        let smr = p.a.register(src.addr(), len).unwrap();
        let remote = p.b.prepare_fifo(tmr, target.addr(), len).unwrap();
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len, remote }]).unwrap();
        let (engine, mr, other, other_mr) =
            if deregister_target { (&p.b, tmr, &p.a, smr) } else { (&p.a, smr, &p.b, tmr) };
        engine.deregister(mr).unwrap();
        let first = target.read(0, len);
        std::thread::sleep(Duration::from_millis(50));
        let what = if deregister_target { "target" } else { "source" };
        assert!(first == target.read(0, len), "the target changed after the {what}'s deregistration returned");
        assert_same(&first, &pattern(len, 8), &format!("all of it landed before the {what}'s deregistration returned"));
        assert_eq!(wait(&p.ab, w).unwrap(), len as u64, "the copy was under way and completed");
        other.deregister(other_mr).unwrap();
    }
    assert_eq!(p.ab.device_copy_batches(), 2);
}

/// Two engines of this process, a GPU 0 buffer of `len` bytes each: the source registered on `a`,
/// the target advertised by `b`. Transfer `k` writes the whole buffer (even `k`) or reads it (odd).
struct Alternating {
    p: common::Pair,
    src: Mem,
    target: Mem,
    item: [OneSided; 1],
}

impl Alternating {
    fn new(len: usize) -> Alternating {
        let p = common::pair(same_host());
        let (src, target) = (Mem::on_gpu(0, len), Mem::on_gpu(0, len));
        let (smr, tmr) = (p.a.register(src.addr(), len).unwrap(), p.b.register(target.addr(), len).unwrap());
        let remote = p.b.prepare_fifo(tmr, target.addr(), len).unwrap();
        let item = [OneSided { mr: smr, addr: src.addr(), len, remote }];
        Alternating { p, src, target, item }
    }

    /// Puts `data` at transfer `k`'s source and posts it.
    fn post(&mut self, k: u64, data: &[u8]) -> u64 {
        if k.is_multiple_of(2) {
            self.src.write(0, data);
            self.p.ab.write(&self.item).unwrap()
        } else {
            self.target.write(0, data);
            self.p.ab.read(&self.item).unwrap()
        }
    }

    /// The bytes at transfer `k`'s destination.
    fn landed(&self, k: u64) -> Vec<u8> {
        let len = self.item[0].len;
        if k.is_multiple_of(2) { self.target.read(0, len) } else { self.src.read(0, len) }
    }
}

/// Copies only their caller awaits are the caller's to finish: a caller's writes and reads, polled
/// to their end, never have the progress thread poll beside it (no wake-up per post, no second
/// thread querying the events), and every byte lands.
#[test]
fn same_process_the_caller_finishes_its_own_copies() {
    if no_gpu() {
        return;
    }
    let len = 1 << 20;
    let mut t = Alternating::new(len);
    let p = &t.p;
    let (batches, idle) = (p.ab.device_copy_batches(), p.a.idle_waits());
    for k in 0..40u64 {
        let data = pattern(len, k);
        let id = t.post(k, &data);
        assert_eq!(wait(&t.p.ab, id).unwrap(), len as u64);
        assert_same(&t.landed(k), &data, &format!("transfer {k}"));
    }
    let p = &t.p;
    assert_eq!(p.ab.device_copy_batches(), batches + 40, "every transfer took the device path");
    let now = p.a.idle_waits();
    assert_eq!(now.polled, idle.polled, "the progress thread polled beside the caller");
    // Its look a millisecond (for copies nobody polls) may find a copy done before its caller
    // looked again (`wait` sleeps 100 us between polls): finishing that is no work of its own to
    // spin on, which would start it polling the connection beside the caller.
    assert!(now.spun - idle.spun < 64, "the progress thread spun {} idle passes", now.spun - idle.spun);
}

/// A connection holds a copy queue (a stream, which costs its GPU 0.5-1 MiB that the driver keeps
/// for the next stream even once this one is destroyed) only while its copies are in flight: 16
/// connections of one engine writing one after another make at most one queue between them, and
/// the queue waits among the process's idle ones once each write ended. Every byte is read back.
#[test]
fn idle_connections_hold_no_copy_queue() {
    use uccl_tcpx::internal::cuda::device_copy::CopyQueue;
    if no_gpu() {
        return;
    }
    const CONNS: usize = 16;
    let a = Arc::new(Engine::new(Config { gpu: Some(0), ..same_host() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(0), ..same_host() }).unwrap());
    let target = Mem::on_gpu(0, LEN);
    let tmr = b.register(target.addr(), LEN).unwrap();
    let window = item(&b, tmr, &target);
    let mut local = Mem::on_gpu(0, LEN);
    let lmr = a.register(local.addr(), LEN).unwrap();
    let data = pattern(CONNS * 4096, SEED);
    local.write(0, &data);
    let made = CopyQueue::made();
    let mut accepted = Vec::new();
    let conns: Vec<Arc<Connection>> = (0..CONNS)
        .map(|_| {
            let c = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
            accepted.push(common::accept(&b).unwrap());
            assert_eq!(c.peer.locality, Locality::SameProcess);
            c
        })
        .collect();
    for (i, conn) in conns.iter().enumerate() {
        let (addr, remote) = (local.addr() + i * 4096, at(window, i * 4096));
        let id = conn.write(&[OneSided { mr: lmr, addr, len: 4096, remote }]).unwrap();
        assert_eq!(waited(conn, id).unwrap(), 4096);
        assert_eq!(conn.device_copy_batches(), 1, "connection {i} took the device path");
        assert!(CopyQueue::idle(0) >= 1, "connection {i}'s queue went back once its write ended");
    }
    assert!(
        CopyQueue::made() - made <= 1,
        "{} copy queues made for {CONNS} connections writing one after another",
        CopyQueue::made() - made
    );
    assert_same(&target.read(0, CONNS * 4096), &data, "what the connections wrote");
}

/// A wait in slices (`wait_within`, as the Python package and `uccl_tcpx_wait` with a timeout wait)
/// waits for the transfer's copies in flight on their event, past its limit if need be, rather
/// than parking a slice and looking again: a 64 MiB write and read waited with a limit of 1 us
/// each end in the first call, every byte landed.
#[test]
fn same_process_a_wait_in_slices_waits_for_the_copies_in_flight() {
    if no_gpu() {
        return;
    }
    let len = 64 << 20;
    let mut t = Alternating::new(len);
    // The region's first requests ask its owner for the grant: a round trip before any copy.
    for id in [t.p.ab.write(&t.item).unwrap(), t.p.ab.read(&t.item).unwrap()] {
        assert_eq!(wait(&t.p.ab, id).unwrap(), len as u64);
    }
    let batches = t.p.ab.device_copy_batches();
    for k in 0..4u64 {
        let data = pattern(len, k + 7);
        let id = t.post(k, &data);
        let got = t.p.ab.wait_within(id, Duration::from_micros(1)).unwrap();
        assert_eq!(got, Some(len as u64), "transfer {k} ended in the first slice");
        assert_same(&t.landed(k), &data, &format!("transfer {k}"));
    }
    let p = &t.p;
    assert_eq!(p.ab.device_copy_batches(), batches + 4, "every transfer took the device path");
}

// ---- another process of this host --------------------------------------------------------------

/// The owner: an engine with a GPU region of `LEN` bytes holding `pattern(LEN, SEED)` on the GPU
/// UCCL_TCPX_TEST_PEER_GPU names (from the virtual memory API when UCCL_TCPX_TEST_PEER_VMM=1),
/// advertised whole. Prints its port and FifoItem, serves its one connection, and on the
/// notification "deregister" deregisters the region, checks that its bytes no longer change and
/// prints "DEREGISTERED <unchanged>"; parks until killed.
#[test]
#[ignore = "started by the cross-process tests as their peer process"]
fn gpu_ipc_owner_process() {
    assert!(common::is_child("gpu_ipc_owner_process"), "runs as the peer process of the cross-process tests");
    let gpu: i32 = std::env::var("UCCL_TCPX_TEST_PEER_GPU").unwrap().parse().unwrap();
    // The engine's GPU, where it is not the memory's.
    let served = std::env::var("UCCL_TCPX_TEST_PEER_ENGINE_GPU").map_or(gpu, |g| g.parse().unwrap());
    let engine = Arc::new(Engine::new(Config { gpu: Some(served), ..same_host() }).unwrap());
    let region = if std::env::var("UCCL_TCPX_TEST_PEER_VMM").as_deref() == Ok("1") {
        let vmm = VmmBuffer::new(LEN);
        vmm.write(&pattern(LEN, SEED));
        OwnerRegion::Vmm(vmm)
    } else {
        let mut mem = Mem::on_gpu(gpu, LEN);
        mem.write(0, &pattern(LEN, SEED));
        OwnerRegion::Mem(mem)
    };
    let addr = region.addr();
    let mr = engine.register(addr, LEN).unwrap();
    let item = engine.prepare_fifo(mr, addr, LEN).unwrap();
    println!("OWNER {} {}", engine.address().port(), common::engine::fifo_to_hex(&item));
    let conn = common::accept(&engine).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    let cmd = common::eventually("the deregister command", Duration::from_secs(600), || {
        uccl_tcpx::drain_notifications(usize::MAX).into_iter().find(|n| n.name == b"gpu-ipc-test")
    });
    assert_eq!(cmd.msg, b"deregister");
    engine.deregister(mr).unwrap();
    let first = region.read();
    std::thread::sleep(Duration::from_millis(100));
    println!("DEREGISTERED {}", first == region.read());
    testkit::child::park_until_killed()
}

/// The owner's GPU region: `cuMemAlloc` memory or the virtual memory API's.
enum OwnerRegion {
    Mem(Mem),
    Vmm(VmmBuffer),
}

impl OwnerRegion {
    fn addr(&self) -> usize {
        match self {
            OwnerRegion::Mem(m) => m.addr(),
            OwnerRegion::Vmm(v) => v.ptr as usize,
        }
    }

    fn read(&self) -> Vec<u8> {
        match self {
            OwnerRegion::Mem(m) => m.read(0, LEN),
            OwnerRegion::Vmm(v) => v.read(LEN),
        }
    }
}

struct Owner {
    process: testkit::child::Peer,
    port: u16,
    item: FifoItem,
}

impl Owner {
    fn spawn(gpu: i32) -> Owner {
        Owner::spawn_with(gpu, false)
    }

    fn spawn_with(gpu: i32, vmm: bool) -> Owner {
        Owner::spawn_on(gpu, gpu, vmm)
    }

    /// The owner's memory on GPU `gpu`, its engine on GPU `engine`.
    fn spawn_on(gpu: i32, engine: i32, vmm: bool) -> Owner {
        let mut process = ChildTest::new("gpu_ipc_owner_process")
            .ignored()
            .env("UCCL_TCPX_TEST_PEER_GPU", gpu.to_string())
            .env("UCCL_TCPX_TEST_PEER_ENGINE_GPU", engine.to_string())
            .env("UCCL_TCPX_TEST_PEER_VMM", if vmm { "1" } else { "0" })
            .spawn();
        let line = process.announcement("OWNER ", Duration::from_secs(120));
        let (port, hex) = line.trim().split_once(' ').expect("port and FifoItem");
        Owner { process, port: port.parse().unwrap(), item: common::engine::fifo_from_hex(hex) }
    }
}

/// This process on GPU `ours`, the owner on GPU `theirs`.
fn cross_process(ours: i32, theirs: i32) {
    let owner = Owner::spawn(theirs);
    let engine = Engine::new(Config { gpu: Some(ours), ..same_host() }).unwrap();
    let mut local = Mem::on_gpu(ours, LEN);
    let mr = engine.register(local.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    assert_eq!(conn.peer.locality, Locality::SameHost);
    // The owner's allocation is mapped into this GPU's context, wherever it lives.
    exercise(&conn, &mut local, mr, owner.item, LEN, true);
    kv_blocks_through_the_mapping(&conn, &mut local, mr, owner.item);
}

/// KV-cache traffic between processes: 100,000 blocks of an odd size at odd offsets, written from
/// random local slots into random slots of the owner's region and read back into the same local
/// slots, through the kernel in one batch each (more pieces than one list of the piece kernel
/// holds, so several launches). Every byte of the local buffer checked: each block back in its
/// slot, nothing between.
fn kv_blocks_through_the_mapping(conn: &Arc<Connection>, local: &mut Mem, mr: u64, remote: FifoItem) {
    let kv = KvBlocks::shuffled(100_000, "ipc-kv");
    let items = kv.items(mr, local.addr(), remote);
    let data = pattern(LEN, 404);
    local.write(0, &data);
    let (batches, kernel_batches) = (conn.device_copy_batches(), conn.device_copy_kernel_batches());
    let w = conn.write(&items).unwrap();
    assert_eq!(waited(conn, w).unwrap(), kv.bytes(), "write of {} blocks", kv.count());
    local.clear();
    let r = conn.read(&items).unwrap();
    assert_eq!(waited(conn, r).unwrap(), kv.bytes(), "read of {} blocks", kv.count());
    // Each block back in its local slot, zeros between.
    let back: Vec<(usize, usize)> = kv.pairs().map(|(l, _)| (l, l)).collect();
    assert_same(&local.read(0, LEN), &KvBlocks::moved(&vec![0u8; LEN], &data, &back), "100,000 blocks there and back");
    assert_eq!(conn.device_copy_batches(), batches + 2, "one batch a call");
    assert_eq!(conn.device_copy_kernel_batches(), kernel_batches + 2, "both through the kernel");

    // The NIXL backend's form of the same call: runs of pieces (several runs of one region and
    // capability, as a backend cuts them), copied from the checked runs in one batch each way.
    let (runs, pieces) = kv.pieces(mr, local.addr(), remote, 7_001);
    let fresh = pattern(LEN, 405);
    local.write(0, &fresh);
    let (batches, kernel_batches) = (conn.device_copy_batches(), conn.device_copy_kernel_batches());
    let w = conn.write_pieces(&runs, &pieces).unwrap();
    assert_eq!(waited(conn, w).unwrap(), kv.bytes(), "write of {} pieces", kv.count());
    local.clear();
    let r = conn.read_pieces(&runs, &pieces).unwrap();
    assert_eq!(waited(conn, r).unwrap(), kv.bytes(), "read of {} pieces", kv.count());
    assert_same(&local.read(0, LEN), &KvBlocks::moved(&vec![0u8; LEN], &fresh, &back), "100,000 pieces there and back");
    assert_eq!(conn.device_copy_batches(), batches + 2, "one batch a pieces call");
    assert_eq!(conn.device_copy_kernel_batches(), kernel_batches + 2, "both pieces calls through the kernel");

    // A piece past the capability's end fails the call at the post, before anything is copied.
    let mut bad = pieces.clone();
    bad[50_000].remote = remote.addr + u64::from(remote.size) - 10;
    local.write(0, &fresh);
    for write in [true, false] {
        let posted = if write { conn.write_pieces(&runs, &bad) } else { conn.read_pieces(&runs, &bad) };
        let err = posted.unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "write {write}: {err}");
        assert!(err.to_string().contains("piece 50000"), "write {write}: {err}");
    }
    assert_same(&local.read(0, LEN), &fresh, "nothing read by the refused call");
    assert_eq!(conn.device_copy_batches(), batches + 2, "the refused calls queued nothing");
}

/// KV blocks as these tests lay them out: `count` blocks of an odd size at odd offsets, block `i`
/// in local slot `mine[i]` and remote slot `theirs[i]` of two shuffled tables.
struct KvBlocks {
    mine: Vec<usize>,
    theirs: Vec<usize>,
}

impl KvBlocks {
    const SLOT: usize = 160;
    const BLOCK: usize = 131;
    const FIRST: usize = 3;

    fn shuffled(count: usize, stream: &str) -> KvBlocks {
        KvBlocks {
            mine: block_table(count, &format!("{stream}-local")),
            theirs: block_table(count, &format!("{stream}-remote")),
        }
    }

    fn count(&self) -> usize {
        self.mine.len()
    }

    fn bytes(&self) -> u64 {
        (self.count() * Self::BLOCK) as u64
    }

    /// Each block's (local, remote) offset.
    fn pairs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let at = |slot: usize| Self::FIRST + slot * Self::SLOT;
        self.mine.iter().zip(&self.theirs).map(move |(&m, &t)| (at(m), at(t)))
    }

    fn items(&self, mr: u64, local: usize, remote: FifoItem) -> Vec<OneSided> {
        self.pairs().map(|(l, r)| OneSided { mr, addr: local + l, len: Self::BLOCK, remote: at(remote, r) }).collect()
    }

    /// The blocks as runs of pieces of local region `mr` and the capability `remote`, a run every
    /// `per_run` pieces.
    fn pieces(&self, mr: u64, local: usize, remote: FifoItem, per_run: usize) -> (Vec<PieceRun>, Vec<Piece>) {
        let pieces: Vec<Piece> = self
            .pairs()
            .map(|(l, r)| Piece { local: (local + l) as u64, remote: remote.addr + r as u64, len: Self::BLOCK as u64 })
            .collect();
        let runs = pieces.chunks(per_run).map(|c| PieceRun { mr, remote, pieces: c.len() }).collect();
        (runs, pieces)
    }

    /// `before` with each block of `src` at the first offset of `moves` copied to the second.
    fn moved(before: &[u8], src: &[u8], moves: &[(usize, usize)]) -> Vec<u8> {
        let mut out = before.to_vec();
        for &(from, to) in moves {
            out[to..to + Self::BLOCK].copy_from_slice(&src[from..from + Self::BLOCK]);
        }
        out
    }
}

#[test]
fn cross_process_one_gpu() {
    if no_gpu() {
        return;
    }
    cross_process(0, 0);
}

#[test]
fn cross_process_two_gpus() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    cross_process(0, 1);
}

/// Memory of a GPU other than its engine's on both ends of two processes, as UCCL's
/// `test_engine_onesided_ipc.py` has it: the owner's IPC handle is exported in its memory's GPU's
/// context, mapped into our engine's GPU, and our local end, on the other GPU, is copied from and
/// into there; the small pieces the kernel cannot take go over the staged network path, through
/// the local memory's own GPU. Byte for byte.
#[test]
fn cross_process_memory_of_other_gpus() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    // (our engine, our memory, the owner's engine, its memory)
    for (ours, ours_mem, theirs, theirs_mem) in [(1, 0, 0, 0), (1, 0, 0, 1), (0, 1, 1, 0)] {
        let owner = Owner::spawn_on(theirs_mem, theirs, false);
        let engine = Engine::new(Config { gpu: Some(ours), ..same_host() }).unwrap();
        let mut local = Mem::on_gpu(ours_mem, LEN);
        let mr = engine.register(local.addr(), LEN).unwrap();
        let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
        assert_eq!(conn.peer.locality, Locality::SameHost);
        exercise(&conn, &mut local, mr, owner.item, LEN, ours == ours_mem);
        assert_eq!(engine.gpu().unwrap().ordinal(), ours, "our engine still serves GPU {ours}");
    }
}

#[test]
fn cross_process_refuses_what_was_not_advertised() {
    if no_gpu() {
        return;
    }
    let owner = Owner::spawn(0);
    let engine = Engine::new(same_host()).unwrap();
    let mut local = Mem::on_gpu(0, LEN);
    local.write(0, &[0xee; LEN]);
    let mr = engine.register(local.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    // Granted first (so the refusals below are the initiator's own checks against the grant as
    // well as the owner's), then refused outside the window and with a forged token.
    let mut small = owner.item;
    small.size = 4096;
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len: 4096, remote: small }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), 4096);
    let beyond = at(owner.item, LEN - 8);
    for write in [true, false] {
        let op = OneSided { mr, addr: local.addr(), len: 16, remote: FifoItem { size: 16, ..beyond } };
        let posted = if write { conn.write(&[op]) } else { conn.read(&[op]) };
        let err = posted.and_then(|id| wait(&conn, id)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "past the region (write {write}): {err}");
    }
    let mut forged = owner.item.to_bytes();
    forged[40] ^= 1;
    let op = OneSided { mr, addr: local.addr(), len: 16, remote: FifoItem::from_bytes(&forged) };
    let err = conn.write(&[op]).and_then(|id| wait(&conn, id)).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "a forged token: {err}");
    // The owner's bytes are as they were.
    local.clear();
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len: LEN, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_same(&local.read(0, LEN), &pattern(LEN, SEED), "the owner's region after the refusals");
}

/// `Connection::prepare` asks the owner and maps its allocation before any transfer, so that a
/// connection's first write and read ask nothing on their way (`ipc_asks`, the round trips to the
/// owner, does not move), make no copy queue (the connection made it) and move the right bytes;
/// preparing again asks nothing; a forged token is refused by the owner at `prepare` as a transfer
/// would be, and asks once.
#[test]
fn a_prepared_capability_spares_the_first_transfers_their_ask() {
    use uccl_tcpx::internal::cuda::device_copy::CopyQueue;
    if no_gpu() {
        return;
    }
    let owner = Owner::spawn(0);
    let engine = Engine::new(same_host()).unwrap();
    let mut local = Mem::on_gpu(0, LEN);
    let mr = engine.register(local.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    assert!(CopyQueue::idle(0) >= 1, "the connection readied a copy queue and left it idle for its transfers");
    let queues = CopyQueue::made();
    assert_eq!(conn.ipc_asks(), 0);
    assert!(conn.prepare(&owner.item).unwrap(), "a GPU allocation of a same-host owner is mapped");
    assert_eq!(conn.ipc_asks(), 1);
    assert!(conn.prepare(&FifoItem { size: 4096, ..at(owner.item, 4096) }).unwrap());
    assert_eq!(conn.ipc_asks(), 1, "prepared already: no second ask");

    let len = 1 << 20;
    let r = conn.read(&[OneSided { mr, addr: local.addr() + 1, len, remote: at(owner.item, 3) }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), len as u64);
    assert_same(&local.read(1, len), &pattern(LEN, SEED)[3..3 + len], "the first read");
    let w = conn.write(&[OneSided { mr, addr: local.addr() + 1, len, remote: at(owner.item, 2 * len) }]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), len as u64);
    local.clear();
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len, remote: at(owner.item, 2 * len) }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), len as u64);
    assert_same(&local.read(0, len), &pattern(LEN, SEED)[3..3 + len], "the first write, read back");
    assert_eq!(conn.device_copy_batches(), 3, "every transfer took the device path");
    assert_eq!(conn.ipc_asks(), 1, "the first transfers asked nothing");
    assert_eq!(CopyQueue::made(), queues, "nor made a copy queue");

    let mut forged = owner.item.to_bytes();
    forged[40] ^= 1;
    let err = conn.prepare(&FifoItem::from_bytes(&forged)).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "a forged token: {err}");
    assert_eq!(conn.ipc_asks(), 2);
}

/// Callers racing into a region nothing mapped yet share one ask: eight threads writing to it at
/// once and one preparing it make one round trip to the owner between them (`ipc_asks`, whatever
/// order they arrive in: each finds the grant mapped or an ask under way and waits for it), and
/// every write lands where it was sent.
#[test]
fn callers_racing_into_a_fresh_region_share_one_ask() {
    if no_gpu() {
        return;
    }
    const CALLERS: usize = 8;
    const PIECE: usize = 64 << 10;
    let owner = Owner::spawn(0);
    let engine = Engine::new(same_host()).unwrap();
    let mut local = Mem::on_gpu(0, LEN);
    let ours = pattern(LEN, SEED + 1);
    local.write(0, &ours);
    let mr = engine.register(local.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    let (base, item) = (local.addr(), owner.item);
    let gate = std::sync::Barrier::new(CALLERS + 1);
    std::thread::scope(|s| {
        for i in 0..CALLERS {
            let (conn, gate) = (&conn, &gate);
            s.spawn(move || {
                gate.wait();
                let one = OneSided { mr, addr: base + i * PIECE, len: PIECE, remote: at(item, i * PIECE) };
                let w = conn.write(&[one]).unwrap();
                assert_eq!(wait(conn, w).unwrap(), PIECE as u64);
            });
        }
        let (conn, gate) = (&conn, &gate);
        s.spawn(move || {
            gate.wait();
            assert!(conn.prepare(&item).unwrap(), "a GPU allocation of a same-host owner is mapped");
        });
    });
    assert_eq!(conn.ipc_asks(), 1, "nine callers into one fresh region asked its owner once");
    assert_eq!(conn.device_copy_batches(), CALLERS as u64, "every write took the device path");
    local.clear();
    let n = CALLERS * PIECE;
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len: n, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), n as u64);
    assert_same(&local.read(0, n), &ours[..n], "the racing writes, read back");
}

/// The owner deregisters its region while a large write into it runs: its deregistration returns
/// only after our copy finished (its bytes do not change afterwards), and our next request for
/// the region is refused. Our own deregistration of a source under a running copy waits for it too.
#[test]
fn cross_process_deregistration_is_a_fence_on_both_sides() {
    if no_gpu() {
        return;
    }
    let mut owner = Owner::spawn(0);
    let engine = Engine::new(same_host()).unwrap();
    let mut local = Mem::on_gpu(0, LEN);
    local.write(0, &pattern(LEN, 4));
    let mr = engine.register(local.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    // Our side: the source deregistered under a running copy.
    let w = conn.write(&[OneSided { mr, addr: local.addr(), len: LEN, remote: owner.item }]).unwrap();
    engine.deregister(mr).unwrap();
    assert_eq!(conn.poll(w).unwrap(), Some(LEN as u64), "the copy finished before deregistration returned");
    let mr = engine.register(local.addr(), LEN).unwrap();
    // The owner's side.
    let w = conn.write(&[OneSided { mr, addr: local.addr(), len: LEN, remote: owner.item }]).unwrap();
    conn.notify(b"gpu-ipc-test", b"deregister").unwrap();
    let stable = owner.process.announcement("DEREGISTERED ", Duration::from_secs(60));
    assert_eq!(stable.trim(), "true", "the owner's region changed after its deregistration returned");
    assert_eq!(wait(&conn, w).unwrap(), LEN as u64);
    let err = conn
        .write(&[OneSided { mr, addr: local.addr(), len: 64, remote: owner.item }])
        .and_then(|id| wait(&conn, id))
        .unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "after the owner deregistered: {err}");
}

/// Under the `device` trace a process records where its transfers on this path spent their time,
/// and `scripts/diag/trace_summary.py` says it per direction and size: every transfer counted,
/// every step timed, no event left to a failure, and the owner asked once for its region (by the
/// first write), not again.
#[test]
fn the_trace_times_every_stage_of_the_path() {
    if no_gpu() {
        return;
    }
    let dir = common::trace::fresh_dir("device");
    let prefix = dir.join("t").to_string_lossy().into_owned();
    ChildTest::new("traced_transfers_process")
        .ignored()
        .env("UCCL_TCPX_TRACE", format!("device:{prefix}"))
        .run_within(TRANSFER_LIMIT);
    let out = common::trace::run_script("trace_summary.py", &[&prefix]);
    let group = |verb: &str| {
        let head = format!("{verb} 1048576 B: 6 transfers;");
        let line = out.lines().find(|l| l.starts_with("device[") && l.contains(&head));
        line.unwrap_or_else(|| panic!("no trace of six {verb}s of 1 MiB:\n{out}")).to_owned()
    };
    let (writes, reads) = (group("write"), group("read"));
    assert!(writes.contains(" failure 0; 1 asks ("), "{writes}");
    assert!(reads.contains(" failure 0; 0 asks ("), "{reads}");
    for step in ["post>issued", "issued>seen", "seen>reported", "total"] {
        assert!(writes.contains(step) && reads.contains(step), "{step} missing:\n{writes}\n{reads}");
    }
    assert_eq!(out.matches("device[").count(), 2, "two groups:\n{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "started by the_trace_times_every_stage_of_the_path"]
fn traced_transfers_process() {
    assert!(common::is_child("traced_transfers_process"));
    let owner = Owner::spawn(0);
    let trace = Some(uccl_tcpx::TraceSetting::parse(&std::env::var("UCCL_TCPX_TRACE").unwrap()).unwrap());
    let engine = Engine::new(Config { trace, ..same_host() }).unwrap();
    let local = Mem::on_gpu(0, LEN);
    let mr = engine.register(local.addr(), LEN).unwrap();
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    let mib = 1 << 20;
    for i in 0..6 {
        let op = OneSided { mr, addr: local.addr() + i * mib, len: mib, remote: at(owner.item, i * mib) };
        let w = conn.write(&[op]).unwrap();
        assert_eq!(waited(&conn, w).unwrap(), mib as u64);
    }
    for i in 0..6 {
        let op = OneSided { mr, addr: local.addr() + i * mib, len: mib, remote: at(owner.item, (i + 6) * mib) };
        let r = conn.read(&[op]).unwrap();
        assert_eq!(wait(&conn, r).unwrap(), mib as u64);
    }
    assert_eq!(conn.device_copy_batches(), 12);
}

/// The owner process dies while its allocation is mapped here: our transfers fail (once the
/// connection notices), nothing crashes, and the GPU serves a fresh owner afterwards.
#[test]
fn an_owner_that_exits_while_mapped_does_not_hurt_us() {
    if no_gpu() {
        return;
    }
    let engine = Engine::new(same_host()).unwrap();
    let mut local = Mem::on_gpu(0, LEN);
    let mr = engine.register(local.addr(), LEN).unwrap();
    let owner = Owner::spawn(0);
    let remote = owner.item;
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len: LEN, remote }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_eq!(conn.device_copy_batches(), 1, "mapped");
    let w = conn.write(&[OneSided { mr, addr: local.addr(), len: LEN, remote }]).unwrap();
    drop(owner);
    // Whatever became of the write in flight, it ends, and the connection fails within the bound.
    let _ = common::wait_done(&conn, w, PATIENCE);
    common::eventually("the connection notices the owner is gone", PATIENCE, || {
        let op = OneSided { mr, addr: local.addr(), len: 4096, remote };
        conn.write(&[op]).and_then(|id| wait(&conn, id)).err()
    });
    engine.close_connection(&conn);
    drop(conn);
    // The GPU and the engine serve a fresh owner.
    local.clear();
    let owner = Owner::spawn(0);
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    let r = conn.read(&[OneSided { mr, addr: local.addr(), len: LEN, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_same(&local.read(0, LEN), &pattern(LEN, SEED), "a fresh owner after the first one died");
    assert_eq!(conn.device_copy_batches(), 1);
}

// ---- IPC info ------------------------------------------------------------------------------------

/// Opens the IPC info in UCCL_TCPX_TEST_IPC_INFO (hex) and checks that the range it describes
/// holds `pattern(size, offset)`-style bytes: the ones the parent wrote there.
#[test]
#[ignore = "started by ipc_info_opens_in_another_process"]
fn ipc_info_reader_process() {
    assert!(common::is_child("ipc_info_reader_process"));
    let hex = std::env::var("UCCL_TCPX_TEST_IPC_INFO").unwrap();
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let info = IpcInfo::from_bytes(&bytes.try_into().unwrap());
    let gpu = uccl_tcpx::internal::cuda::Gpu::open(0).unwrap();
    let mapping = uccl_tcpx::internal::cuda::ipc::Mapping::open(&gpu, &info.handle).unwrap();
    let mut got = vec![0u8; info.size as usize];
    common::gpu::make_current(Some(0));
    // SAFETY: the mapping holds the parent's allocation, `offset + size` inside it.
    let status = unsafe { sys::cuMemcpyDtoH_v2(got.as_mut_ptr().cast(), mapping.ptr() + info.offset, got.len()) };
    assert_eq!(status, sys::CUresult::CUDA_SUCCESS);
    let want: Vec<usize> =
        std::env::var("UCCL_TCPX_TEST_IPC_WANT").unwrap().split(',').map(|s| s.parse().unwrap()).collect();
    assert_eq!(want.len(), 3);
    let expected = &pattern(want[0], 71)[want[1]..want[1] + want[2]];
    assert_same(&got, expected, "the range the IPC info describes");
}

#[test]
fn ipc_info_opens_in_another_process() {
    if no_gpu() {
        return;
    }
    let engine = Engine::new(same_host()).unwrap();
    let len = 4 << 20;
    let mut mem = Mem::on_gpu(0, len);
    mem.write(0, &pattern(len, 71));
    // Registered from 8 KiB in: the info's offset counts from the allocation, its size to the
    // region's end.
    let reg = mem.addr() + 8192;
    engine.register(reg, len - 8192).unwrap();
    let mut info = engine.ipc_info(reg + 100).unwrap().expect("cuMemAlloc memory has IPC info");
    assert_eq!((info.offset, info.size, info.gpu), (8192 + 100, (len - 8192 - 100) as u64, 0));
    assert_ne!(info.handle, [0; 64]);
    // A sub-range of it, as NIXL's prepXfer makes one.
    info.retarget((reg + 100 + 4096) as u64, (reg + 100) as u64, 65_536).unwrap();
    assert_eq!((info.offset, info.size), (8192 + 100 + 4096, 65_536));
    assert!(info.retarget((reg + 100) as u64, (reg + 100) as u64, 65_537).is_err(), "only narrower");
    let hex: String = info.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    ChildTest::new("ipc_info_reader_process")
        .ignored()
        .env("UCCL_TCPX_TEST_IPC_INFO", hex)
        .env("UCCL_TCPX_TEST_IPC_WANT", format!("{len},{},{}", 8192 + 100 + 4096, 65_536))
        .run();
    // Host memory and an unregistered address.
    let host = vec![0u8; 4096];
    engine.register(host.as_ptr() as usize, host.len()).unwrap();
    assert_eq!(engine.ipc_info(host.as_ptr() as usize).unwrap(), None);
    assert_eq!(engine.ipc_info(mem.addr()).unwrap_err().status(), UcclStatus::ErrNotFound, "below the region");
}

// ---- memory of the CUDA virtual memory API -----------------------------------------------------

/// `len` bytes (rounded up to the granularity) of GPU 0 from cuMemCreate + cuMemMap, as PyTorch's
/// expandable segments allocate; unmapped and released on drop.
struct VmmBuffer {
    ptr: sys::CUdeviceptr,
    size: usize,
    handle: sys::CUmemGenericAllocationHandle,
}

impl VmmBuffer {
    fn new(len: usize) -> VmmBuffer {
        common::gpu::make_current(Some(0));
        // SAFETY: plain structs of integers and a null pointer; zero is a valid pattern for them.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = 0;
        let mut gran = 0usize;
        let ok = |status: sys::CUresult, what: &str| assert_eq!(status, sys::CUresult::CUDA_SUCCESS, "{what}");
        // SAFETY: each call writes one out-parameter of the stated type; the sizes are granular.
        unsafe {
            ok(
                sys::cuMemGetAllocationGranularity(
                    &mut gran,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                ),
                "granularity",
            );
            let size = len.div_ceil(gran) * gran;
            let mut handle = 0;
            ok(sys::cuMemCreate(&mut handle, size, &prop, 0), "cuMemCreate");
            let mut ptr = 0;
            ok(sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0), "cuMemAddressReserve");
            ok(sys::cuMemMap(ptr, size, 0, handle, 0), "cuMemMap");
            let access = sys::CUmemAccessDesc {
                location: prop.location,
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            ok(sys::cuMemSetAccess(ptr, size, &access, 1), "cuMemSetAccess");
            VmmBuffer { ptr, size, handle }
        }
    }
}

impl VmmBuffer {
    fn write(&self, data: &[u8]) {
        common::gpu::make_current(Some(0));
        // SAFETY: at most `size` bytes into the mapped range, from a live host slice.
        let status = unsafe { sys::cuMemcpyHtoD_v2(self.ptr, data.as_ptr().cast(), data.len().min(self.size)) };
        assert_eq!(status, sys::CUresult::CUDA_SUCCESS);
    }

    fn read(&self, len: usize) -> Vec<u8> {
        common::gpu::make_current(Some(0));
        let mut out = vec![0u8; len.min(self.size)];
        // SAFETY: out.len() bytes of the mapped range into a live host vector.
        let status = unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr, out.len()) };
        assert_eq!(status, sys::CUresult::CUDA_SUCCESS);
        out
    }
}

impl Drop for VmmBuffer {
    fn drop(&mut self) {
        // SAFETY: mapped and reserved by `new`, released once; no copy uses it any more.
        unsafe {
            sys::cuMemUnmap(self.ptr, self.size);
            sys::cuMemAddressFree(self.ptr, self.size);
            sys::cuMemRelease(self.handle);
        }
    }
}

/// Memory of the virtual memory API has no legacy IPC handle: no IPC info for it, and a peer
/// process's transfers into and out of such a region go over the network path, correctly. As the
/// local end of a transfer it is fine: only the owner's allocation is mapped.
#[test]
fn vmm_memory_has_no_ipc_info_and_takes_the_network_path() {
    if no_gpu() {
        return;
    }
    let engine = Engine::new(same_host()).unwrap();
    let vmm = VmmBuffer::new(LEN);
    let mr = engine.register(vmm.ptr as usize, LEN).unwrap();
    assert_eq!(engine.ipc_info(vmm.ptr as usize).unwrap(), None, "no IPC info for VMM memory");
    assert_eq!(engine.ipc_info(vmm.ptr as usize + 4096).unwrap(), None);

    // The owner's region is VMM memory: the network path carries both directions.
    let owner = Owner::spawn_with(0, true);
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    let r = conn.read(&[OneSided { mr, addr: vmm.ptr as usize, len: LEN, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_same(&vmm.read(LEN), &pattern(LEN, SEED), "read from the owner's VMM region");
    vmm.write(&pattern(LEN, 12));
    let w = conn.write(&[OneSided { mr, addr: vmm.ptr as usize, len: LEN, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), LEN as u64);
    vmm.write(&vec![0; LEN]);
    let r = conn.read(&[OneSided { mr, addr: vmm.ptr as usize, len: LEN, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_same(&vmm.read(LEN), &pattern(LEN, 12), "written into the owner's VMM region and read back");
    assert_eq!(conn.device_copy_batches(), 0, "the network path, not the device path");

    // Our VMM memory against an owner with cuMemAlloc memory: the device path.
    let owner = Owner::spawn(0);
    let conn = engine.connect("127.0.0.1", "0", owner.port).unwrap();
    let r = conn.read(&[OneSided { mr, addr: vmm.ptr as usize, len: LEN, remote: owner.item }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), LEN as u64);
    assert_same(&vmm.read(LEN), &pattern(LEN, SEED), "read into our VMM memory");
    assert_eq!(conn.device_copy_batches(), 1);
}

/// A shuffled block table of `n` blocks.
fn block_table(n: usize, stream: &str) -> Vec<usize> {
    let mut rng = common::Rng::new(stream);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

/// KV-cache traffic on the same-host GPU path between engines of this process, GPU `ga` to GPU
/// `gb`: random block tables on both ends, one block and 100,000 blocks of an odd size at odd
/// offsets, read and written, every byte of both buffers checked (each block in its slot, nothing
/// between), and a table with one block past the window in the middle failed with its status.
/// Each item is a request of its own, refused or copied on its own (as between engines of this
/// process in host memory): the refused block moves nothing, and every byte outside the table's
/// blocks stays as it was; a block the engine copied holds all of its new bytes, never a part.
fn random_block_tables(ga: i32, gb: i32) {
    let a = Arc::new(Engine::new(Config { gpu: Some(ga), ..same_host() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(gb), ..same_host() }).unwrap());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let _ba = common::accept(&b).unwrap();
    let theirs = pattern(LEN, SEED);
    let mut target = Mem::on_gpu(gb, LEN);
    target.write(0, &theirs);
    let tmr = b.register(target.addr(), LEN).unwrap();
    let window = item(&b, tmr, &target);
    let mut local = Mem::on_gpu(ga, LEN);
    let mr = a.register(local.addr(), LEN).unwrap();
    for count in [1usize, 100_000] {
        let kv = KvBlocks::shuffled(count, "gpu-kv");
        let items = kv.items(mr, local.addr(), window);
        local.clear();
        let r = ab.read(&items).unwrap();
        assert_eq!(waited(&ab, r).unwrap(), kv.bytes(), "read of {count} blocks");
        let read: Vec<(usize, usize)> = kv.pairs().map(|(l, r)| (r, l)).collect();
        let expected = KvBlocks::moved(&vec![0u8; LEN], &theirs, &read);
        assert_same(&local.read(0, LEN), &expected, &format!("{count} blocks read"));

        let fresh = pattern(LEN, 300 + count as u64);
        local.write(0, &fresh);
        let w = ab.write(&items).unwrap();
        assert_eq!(waited(&ab, w).unwrap(), kv.bytes(), "write of {count} blocks");
        let written: Vec<(usize, usize)> = kv.pairs().collect();
        assert_same(
            &target.read(0, LEN),
            &KvBlocks::moved(&theirs, &fresh, &written),
            &format!("{count} blocks written"),
        );
        target.write(0, &theirs);
    }
    let (slot, block) = (KvBlocks::SLOT, KvBlocks::BLOCK);
    let table = block_table(10_000, "gpu-kv-bad");
    let mut items: Vec<OneSided> = (0..10_000)
        .map(|i| OneSided { mr, addr: local.addr() + i * slot, len: block, remote: at(window, table[i] * slot) })
        .collect();
    items[5_000].remote = at(window, LEN - 10);
    let mine = pattern(LEN, 500);
    local.write(0, &mine);
    for write in [true, false] {
        let posted = if write { ab.write(&items) } else { ab.read(&items) };
        let err = posted.and_then(|id| waited(&ab, id)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "write {write}: {err}");
        // The side written to: each good block whole from the other side or as it was, the rest
        // (the refused block's slot and the window's end included) as it was.
        let (got, before, from) =
            if write { (target.read(0, LEN), &theirs, &mine) } else { (local.read(0, LEN), &mine, &theirs) };
        let mut expected = before.clone();
        for (i, &slot_index) in table.iter().enumerate().filter(|&(i, _)| i != 5_000) {
            let (l, r) = (i * slot, slot_index * slot);
            let (at, src) = if write { (r, l) } else { (l, r) };
            let block_got = &got[at..at + block];
            assert!(
                block_got == &before[at..at + block] || block_got == &from[src..src + block],
                "write {write}: block {i} holds part of its bytes"
            );
            expected[at..at + block].copy_from_slice(block_got);
        }
        assert_same(&got, &expected, &format!("write {write}: bytes outside the table's good blocks"));
        target.write(0, &theirs);
    }
}

#[test]
fn random_block_tables_one_gpu() {
    if no_gpu() {
        return;
    }
    random_block_tables(0, 0);
}

#[test]
fn random_block_tables_two_gpus() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    random_block_tables(0, 1);
}
