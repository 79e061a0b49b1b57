//! Buffers on either side of the PCIe bus for the GPU tests, and their skip rule.

use std::sync::Arc;

use uccl_tcpx::internal::cuda::{self, DeviceBuffer};
use uccl_tcpx::internal::transport::MemKind;
use uccl_tcpx::{Connection, Engine, OneSided};

use super::engine::{Pair, wait};
use testkit::{Rng, assert_same, pattern};

/// Where a test buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Host,
    Gpu,
}

/// Whether a GPU test must return without running: no CUDA driver here, and none required
/// (`UCCL_TCPX_REQUIRE_GPU=1` makes a missing driver a failure instead; see `testkit::gpu`).
pub fn no_gpu() -> bool {
    testkit::skip_without_gpu(cuda::available())
}

/// Whether a test of the kernels must return without running: no NVRTC to build them with here,
/// and no GPU required (a GPU host without NVRTC fails the test instead). Where it runs, GPU 0's
/// kernels are built (if they can be) before it returns, as an engine builds them when it
/// registers GPU memory: the paths under a connection's lock, and a staging ring used on its
/// own, only take kernels already built, and move bytes without them otherwise.
pub fn no_nvrtc() -> bool {
    // SAFETY: only dlopens candidate library names.
    if testkit::skip_without("NVRTC", unsafe { cudarc::nvrtc::sys::is_culib_present() }) {
        return true;
    }
    if cuda::available() {
        uccl_tcpx::internal::cuda::segments::TileCopier::build(&cuda::Gpu::open(0).expect("GPU 0"));
    }
    false
}

/// Whether a test that needs `n` GPUs must return without running: fewer are visible (it says
/// so). Single-GPU hosts run the GPU suite too, so this is a skip even where GPUs are required.
pub fn fewer_gpus_than(n: i32) -> bool {
    cudarc::driver::result::init().expect("cuInit");
    let count = cudarc::driver::result::device::get_count().expect("cuDeviceGetCount");
    if count >= n {
        return false;
    }
    println!("SKIPPED: needs {n} GPUs, {count} visible");
    true
}

/// Makes GPU `ordinal`'s primary context current on the calling thread, as `cudaSetDevice` (and
/// so PyTorch's `torch.cuda.set_device`) does, or leaves the thread with no current context.
pub fn make_current(ordinal: Option<i32>) {
    let ctx = match ordinal {
        Some(n) => {
            // A child test process may get here before anything initialised the driver.
            cudarc::driver::result::init().expect("cuInit");
            let dev = cudarc::driver::result::device::get(n).expect("cuDeviceGet");
            // SAFETY: `dev` came from cuDeviceGet. The reference is kept for the life of the test
            // process, as the library keeps its own.
            unsafe { cudarc::driver::result::primary_ctx::retain(dev) }.expect("cuDevicePrimaryCtxRetain")
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: a retained primary context, or none.
    unsafe { cudarc::driver::result::ctx::set_current(ctx) }.expect("cuCtxSetCurrent");
}

/// Connects `engine` to the engine whose metadata string ("ip:port?gpu") is `metadata`, exactly as
/// NIXL does with what it cached: the GPU part goes to connect as it stands.
pub fn connect_by_metadata(engine: &Engine, metadata: &str) -> Arc<Connection> {
    let (addr, gpu) = metadata.rsplit_once('?').unwrap_or_else(|| panic!("metadata {metadata:?} has no '?'"));
    let (ip, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("metadata {metadata:?} has no port"));
    let port = port.parse().unwrap_or_else(|_| panic!("metadata {metadata:?}: bad port"));
    engine.connect(ip, gpu, port).unwrap_or_else(|e| panic!("connect with cached metadata {metadata:?}: {e}"))
}

pub enum Mem {
    Host(Vec<u8>),
    Device(DeviceBuffer),
}

impl Mem {
    /// `len` zeroed bytes on `side` (GPU 0).
    pub fn new(side: Side, len: usize) -> Mem {
        match side {
            Side::Host => Mem::Host(vec![0u8; len]),
            Side::Gpu => {
                let mut buf = DeviceBuffer::new(0, len).expect("allocate device memory");
                buf.fill(0).expect("clear device memory");
                Mem::Device(buf)
            }
        }
    }

    /// `len` zeroed bytes of device memory on GPU `ordinal`.
    pub fn on_gpu(ordinal: i32, len: usize) -> Mem {
        let mut buf = DeviceBuffer::new(ordinal, len).expect("allocate device memory");
        buf.fill(0).expect("clear device memory");
        Mem::Device(buf)
    }

    pub fn side(&self) -> Side {
        match self {
            Mem::Host(_) => Side::Host,
            Mem::Device(_) => Side::Gpu,
        }
    }

    pub fn kind(&self) -> MemKind {
        match self {
            Mem::Host(_) => MemKind::Host,
            Mem::Device(d) => MemKind::Cuda { device: d.gpu().ordinal() },
        }
    }

    pub fn addr(&self) -> usize {
        match self {
            Mem::Host(v) => v.as_ptr() as usize,
            Mem::Device(d) => d.addr(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Mem::Host(v) => v.len(),
            Mem::Device(d) => d.len(),
        }
    }

    pub fn write(&mut self, offset: usize, data: &[u8]) {
        match self {
            Mem::Host(v) => v[offset..offset + data.len()].copy_from_slice(data),
            Mem::Device(d) => d.copy_from_host(offset, data).expect("copy to device"),
        }
    }

    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        match self {
            Mem::Host(v) => v[offset..offset + len].to_vec(),
            Mem::Device(d) => {
                let mut out = vec![0u8; len];
                d.copy_to_host(offset, &mut out).expect("copy from device");
                out
            }
        }
    }

    pub fn clear(&mut self) {
        match self {
            Mem::Host(v) => v.fill(0),
            Mem::Device(d) => d.fill(0).expect("clear device memory"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    SendRecv,
    Write,
    Read,
}

/// Moves `len` bytes from `src[soff..]` on engine `a` to `dst[doff..]` on engine `b` (for reads,
/// `a` pulls from `b`: the data still goes src -> dst).
pub fn move_bytes(p: &Pair, kind: Kind, src: (&Mem, u64, usize), dst: (&Mem, u64, usize), len: usize) {
    let (smem, smr, soff) = src;
    let (dmem, dmr, doff) = dst;
    let (saddr, daddr) = (smem.addr() + soff, dmem.addr() + doff);
    match kind {
        Kind::SendRecv => {
            let r = p.ba.recv(dmr, daddr, len).unwrap();
            let s = p.ab.send(&[(smr, saddr, len)]).unwrap();
            assert_eq!(wait(&p.ab, s).unwrap(), len as u64);
            assert_eq!(wait(&p.ba, r).unwrap(), len as u64);
        }
        Kind::Write => {
            let fifo = p.b.prepare_fifo(dmr, dmem.addr(), dmem.len()).unwrap();
            let mut remote = fifo;
            remote.addr = daddr as u64;
            let w = p.ab.write(&[OneSided { mr: smr, addr: saddr, len, remote }]).unwrap();
            assert_eq!(wait(&p.ab, w).unwrap(), len as u64);
        }
        Kind::Read => {
            // Here the source is on b and the destination on a.
            let fifo = p.b.prepare_fifo(smr, smem.addr(), smem.len()).unwrap();
            let mut remote = fifo;
            remote.addr = saddr as u64;
            let r = p.ab.read(&[OneSided { mr: dmr, addr: daddr, len, remote }]).unwrap();
            assert_eq!(wait(&p.ab, r).unwrap(), len as u64);
        }
    }
}

/// Every transfer kind, GPU->GPU, GPU->host and host->GPU, each of `sizes` at unaligned offsets on
/// both ends: byte for byte, and the bytes either side of each destination untouched.
pub fn every_kind_every_direction(p: &Pair, sizes: &[usize]) {
    let max = *sizes.iter().max().unwrap() + 64;
    for (from, to) in [(Side::Gpu, Side::Gpu), (Side::Gpu, Side::Host), (Side::Host, Side::Gpu)] {
        for kind in [Kind::SendRecv, Kind::Write, Kind::Read] {
            let mut src = Mem::new(from, max);
            let mut dst = Mem::new(to, max);
            // For reads the source lives on b, the destination on a.
            let (src_engine, dst_engine) = match kind {
                Kind::Read => (&p.b, &p.a),
                _ => (&p.a, &p.b),
            };
            let smr = src_engine.register(src.addr(), src.len()).unwrap();
            let dmr = dst_engine.register(dst.addr(), dst.len()).unwrap();
            for (k, &len) in sizes.iter().enumerate() {
                let (soff, doff) = (1 + (k * 3) % 13, 5 + k % 3);
                let data = pattern(len, (k * 10 + kind as usize) as u64);
                src.write(soff, &data);
                dst.clear();
                move_bytes(p, kind, (&src, smr, soff), (&dst, dmr, doff), len);
                let got = dst.read(doff - 1, len + 2);
                let what = format!("{kind:?} {from:?}->{to:?} {len} bytes at +{soff} -> +{doff}");
                assert_same(&got[1..=len], &data, &what);
                assert_eq!((got[0], got[len + 1]), (0, 0), "{what}: neighbours untouched");
            }
            src_engine.deregister(smr).unwrap();
            dst_engine.deregister(dmr).unwrap();
            println!("{kind:?} {from:?}->{to:?}: {} sizes checked", sizes.len());
        }
    }
}

/// Three items (1 MiB + 3, 5 and 3 MiB + 11 bytes) from memory on `src_sides` (engine a) to memory
/// on `dst_sides` (engine b), each at an unaligned offset, moved every vector way: one send of the
/// three as messages into three receives, a vector write of the three, then a vector read of them
/// back into the cleared sources; byte for byte.
pub fn three_items_every_vector_way(p: &Pair, src_sides: [Side; 3], dst_sides: [Side; 3]) {
    let lens = [(1 << 20) + 3, 5, (3 << 20) + 11];
    let mut srcs: Vec<Mem> = src_sides.iter().zip(lens).map(|(&s, l)| Mem::new(s, l + 16)).collect();
    let mut dsts: Vec<Mem> = dst_sides.iter().zip(lens).map(|(&s, l)| Mem::new(s, l + 16)).collect();
    let data: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &l)| pattern(l, 40 + i as u64)).collect();
    for (m, d) in srcs.iter_mut().zip(&data) {
        m.write(3, d);
    }
    let smrs: Vec<u64> = srcs.iter().map(|m| p.a.register(m.addr(), m.len()).unwrap()).collect();
    let dmrs: Vec<u64> = dsts.iter().map(|m| p.b.register(m.addr(), m.len()).unwrap()).collect();

    // Two-sided: one send of three messages, three receives.
    let recvs: Vec<u64> =
        dsts.iter().zip(&dmrs).map(|(m, &mr)| p.ba.recv(mr, m.addr() + 1, m.len() - 1).unwrap()).collect();
    let msgs: Vec<(u64, usize, usize)> =
        srcs.iter().zip(&smrs).zip(lens).map(|((m, &mr), l)| (mr, m.addr() + 3, l)).collect();
    let s = p.ab.send(&msgs).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), lens.iter().sum::<usize>() as u64);
    for (i, r) in recvs.into_iter().enumerate() {
        assert_eq!(wait(&p.ba, r).unwrap(), lens[i] as u64);
        assert_same(&dsts[i].read(1, lens[i]), &data[i], &format!("vector send item {i}"));
    }

    // One-sided: a vector write of the three items, then a vector read back into cleared sources.
    for d in dsts.iter_mut() {
        d.clear();
    }
    let items = |local: &[Mem], local_mrs: &[u64], local_off: usize, remote: &[Mem], remote_mrs: &[u64]| {
        (0..3)
            .map(|i| {
                let mut item = p.b.prepare_fifo(remote_mrs[i], remote[i].addr(), remote[i].len()).unwrap();
                item.addr = (remote[i].addr() + 9) as u64;
                OneSided { mr: local_mrs[i], addr: local[i].addr() + local_off, len: lens[i], remote: item }
            })
            .collect::<Vec<_>>()
    };
    let w = p.ab.write(&items(&srcs, &smrs, 3, &dsts, &dmrs)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), lens.iter().sum::<usize>() as u64);
    for i in 0..3 {
        assert_same(&dsts[i].read(9, lens[i]), &data[i], &format!("vector write item {i}"));
    }
    for s in srcs.iter_mut() {
        s.clear();
    }
    let r = p.ab.read(&items(&srcs, &smrs, 2, &dsts, &dmrs)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), lens.iter().sum::<usize>() as u64);
    for i in 0..3 {
        assert_same(&srcs[i].read(2, lens[i]), &data[i], &format!("vector read item {i}"));
    }
}

/// `count` pieces of `len` bytes, `stride` bytes apart from `start` on: KV-cache blocks, as
/// `(offset, len)` in their buffer.
pub fn blocks(count: usize, len: usize, stride: usize, start: usize) -> Vec<(usize, usize)> {
    (0..count).map(|i| (start + i * stride, len)).collect()
}

/// `count` pieces of 1 to `max_len` bytes at odd offsets, each a few bytes after the one before (one
/// in eight right after it, so that neighbours continue each other), from offset 1 on.
pub fn odd_pieces(rng: &mut Rng, count: usize, max_len: usize) -> Vec<(usize, usize)> {
    let mut at = 1;
    (0..count)
        .map(|_| {
            let len = 1 + rng.below(max_len);
            let piece = (at, len);
            at += len + if rng.chance(8) { 0 } else { 1 + 2 * rng.below(32) };
            piece
        })
        .collect()
}

/// Bytes a buffer needs to hold `pieces`.
pub fn span(pieces: &[(usize, usize)]) -> usize {
    pieces.iter().map(|&(at, len)| at + len).max().unwrap_or(0)
}

/// What a buffer holds after `pieces` of `src` (its whole contents) landed at `dst_pieces` of a
/// zeroed buffer of `len` bytes, in order, as one stream of bytes (the two lists may cut it
/// differently).
pub fn landed(src: &[u8], pieces: &[(usize, usize)], dst_pieces: &[(usize, usize)], len: usize) -> Vec<u8> {
    let stream: Vec<u8> = pieces.iter().flat_map(|&(at, n)| src[at..at + n].iter().copied()).collect();
    let mut out = vec![0u8; len];
    let mut from = 0;
    for &(at, n) in dst_pieces {
        let n = n.min(stream.len() - from);
        out[at..at + n].copy_from_slice(&stream[from..from + n]);
        from += n;
    }
    out
}
