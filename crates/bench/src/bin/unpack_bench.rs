//! GPU unpack benchmark: the crate's unpack kernel against two anchors measured in the same run on
//! the same stream and timed the same way (CUDA events around back-to-back repetitions):
//! a device-to-device memcpy of the same number of bytes (the ceiling), and a one-warp-per-fragment
//! kernel written from the description of NCCL's unpack (metadata read from mapped host memory,
//! 16-byte elements when source and destination are aligned, else the largest common power of two,
//! byte tail). Every kernel's output is checked against a CPU gather before it is timed. Then the
//! latency a 512 KiB receive adds, from submit to the unpacker reporting it done, measured on the
//! host (one kernel per receive, completion seen through the word its last block writes to mapped
//! host memory, or through an event), with anchors that split the time into planning, launch and
//! completion detection.

use std::ffi::{CString, c_void};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use cudarc::driver::{CudaContext, CudaFunction, result, sys};
use cudarc::nvrtc;
use uccl_tcpx::internal::cuda::unpack::{
    BulkTiles, Completion, CompletionSignal, InlineTiles, PlanError, ReceiveLayout, Submit, Tile, UnpackKernels,
    Unpacker, UnpackerConfig, plan_receive,
};
use uccl_tcpx::internal::ncclnet::LoadMeta;

#[path = "../kernel_bench.rs"]
mod kernel_bench;
use kernel_bench::{Rng, check, fail};

/// GPU unpack kernel against a device memcpy and an NCCL-style unpack, then the latency a 512 KiB
/// receive adds.
#[derive(Parser)]
#[command(name = "unpack_bench")]
struct Options {
    /// Back-to-back repetitions per timed kernel (a quarter of it above 8 MiB; at least 10)
    #[arg(long, value_name = "N", default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Receives timed one at a time in each latency measurement
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    latency_iters: u32,
}

const POOL_BYTES: usize = 256 << 20;
const CHUNK: usize = 512 << 10;

struct DeviceBuffer(sys::CUdeviceptr);
impl DeviceBuffer {
    fn new(len: usize) -> DeviceBuffer {
        // SAFETY: cuMemAlloc only allocates; main made the device's primary context current before any buffer
        // is made.
        DeviceBuffer(check("cuMemAlloc", unsafe { result::malloc_sync(len) }))
    }
}
impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: self.0 came from cuMemAlloc in new() and is freed once, here; every launch using it is
        // synchronized before the bench drops its buffers.
        let _ = unsafe { result::free_sync(self.0) };
    }
}

/// A receive of the batch: its destination offset in the batch and its fragments.
struct Receive {
    dst_at: usize,
    metas: Vec<LoadMeta>,
}

struct Scenario {
    name: &'static str,
    bytes: usize,
    receives: Vec<Receive>,
}

impl Scenario {
    fn fragments(&self) -> usize {
        self.receives.iter().map(|r| r.metas.len()).sum()
    }

    /// The batch as one flat fragment list relative to one destination base (the reference's input).
    fn flat_metas(&self) -> Vec<LoadMeta> {
        let mut out = Vec::new();
        for r in &self.receives {
            out.extend(r.metas.iter().map(|m| LoadMeta { dst_off: m.dst_off + r.dst_at as u64, ..*m }));
        }
        out
    }
}

/// `bytes` of 512 KiB receives, each 128 whole 4 KiB pages drawn from distinct random pool pages,
/// in shuffled arrival order.
fn shuffled_pages(name: &'static str, bytes: usize, rng: &mut Rng) -> Scenario {
    let mut pages: Vec<usize> = (0..POOL_BYTES / 4096).collect();
    rng.shuffle(&mut pages);
    let mut next_page = pages.into_iter();
    let receives = (0..bytes / CHUNK)
        .map(|r| {
            let mut metas: Vec<LoadMeta> = (0..CHUNK / 4096)
                .map(|k| LoadMeta {
                    src_off: (next_page.next().unwrap() * 4096) as u32,
                    len: 4096,
                    dst_off: (k * 4096) as u64,
                })
                .collect();
            rng.shuffle(&mut metas);
            Receive { dst_at: r * CHUNK, metas }
        })
        .collect();
    Scenario { name, bytes, receives }
}

/// `bytes` of 512 KiB receives made of fragments of random length (1024..4096 bytes) at random
/// source offsets of any alignment, packed back to back in the destination, so source and
/// destination are misaligned, differently, for nearly every fragment.
fn misaligned_fragments(name: &'static str, bytes: usize, rng: &mut Rng) -> Scenario {
    let receives = (0..bytes / CHUNK)
        .map(|r| {
            let mut metas = Vec::new();
            let mut at = 0;
            while at < CHUNK {
                let len = (1024 + rng.below(3073)).min(CHUNK - at);
                let src = rng.below(POOL_BYTES - len);
                metas.push(LoadMeta { src_off: src as u32, len: len as u32, dst_off: at as u64 });
                at += len;
            }
            rng.shuffle(&mut metas);
            Receive { dst_at: r * CHUNK, metas }
        })
        .collect();
    Scenario { name, bytes, receives }
}

const REFERENCE_SOURCE: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;

// One warp per fragment. Metadata is read from mapped host memory (over PCIe), one 16-byte volatile
// load per fragment. Each lane moves 16 bytes per iteration at lane*16 + k*512, as 16/E volatile
// loads of E bytes followed by their stores; E = 16 when source and destination are both 16-byte
// aligned, else the largest power of two dividing both. Lanes below len % 16 copy the tail bytes.

template <int E> struct Elem;
template <> struct Elem<8> { typedef u64 T; };
template <> struct Elem<4> { typedef u32 T; };
template <> struct Elem<2> { typedef unsigned short T; };
template <> struct Elem<1> { typedef unsigned char T; };

template <int E>
__device__ __forceinline__ void move16(const char* s, char* d) {
    typedef typename Elem<E>::T T;
    T v[16 / E];
#pragma unroll
    for (int j = 0; j < 16 / E; ++j) v[j] = ((const volatile T*)s)[j];
#pragma unroll
    for (int j = 0; j < 16 / E; ++j) ((T*)d)[j] = v[j];
}

template <>
__device__ __forceinline__ void move16<16>(const char* s, char* d) {
    u32 a, b, c, e;
    asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(e) : "l"(s));
    asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" :: "l"(d), "r"(a), "r"(b), "r"(c), "r"(e) : "memory");
}

template <int E>
__device__ __forceinline__ void copy_fragment(const char* s, char* d, u32 len, u32 lane) {
    const u32 body = len & ~15u;
    for (u32 off = lane * 16; off < body; off += 512) move16<E>(s + off, d + off);
    if (lane < (len & 15u)) d[body + lane] = ((const volatile char*)s)[body + lane];
}

// Launch-overhead anchor.
extern "C" __global__ void empty_kernel() {}

extern "C" __global__ void reference_unpack(const u64* metas, u32 count, const char* pool, char* dst) {
    const u32 lane = threadIdx.x & 31;
    const u32 warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (warp >= count) return;
    u32 a = 0, b = 0, c = 0, e = 0;
    if (lane == 0)
        asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(e) : "l"(metas + 2 * warp));
    a = __shfl_sync(0xffffffffu, a, 0);
    b = __shfl_sync(0xffffffffu, b, 0);
    c = __shfl_sync(0xffffffffu, c, 0);
    e = __shfl_sync(0xffffffffu, e, 0);
    const char* s = pool + a;
    char* d = dst + ((u64)e << 32 | c);
    const u32 mis = ((u32)(u64)s | (u32)(u64)d) & 15u;
    switch (mis == 0 ? 16u : (mis & (0u - mis))) {
    case 16: copy_fragment<16>(s, d, b, lane); break;
    case 8: copy_fragment<8>(s, d, b, lane); break;
    case 4: copy_fragment<4>(s, d, b, lane); break;
    case 2: copy_fragment<2>(s, d, b, lane); break;
    default: copy_fragment<1>(s, d, b, lane); break;
    }
}
"#;

fn compile_reference(ctx: &Arc<CudaContext>) -> (CudaFunction, CudaFunction) {
    let (major, minor) = check("compute capability", ctx.compute_capability());
    let source = CString::new(REFERENCE_SOURCE).unwrap();
    let prog = check("nvrtc create", nvrtc::result::create_program(&source, Some(c"reference.cu")));
    let opts = [format!("--gpu-architecture=sm_{major}{minor}"), "-std=c++17".to_owned()];
    // SAFETY: prog is the live program nvrtc created just above; opts are owned strings that outlive the
    // call.
    if let Err(e) = unsafe { nvrtc::result::compile_program(prog, &opts) } {
        // SAFETY: prog is still live (destroyed below) and its compile has just run, so it has a log.
        let log = unsafe { nvrtc::result::get_program_log(prog) }.unwrap_or_default();
        let log: String = log.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect();
        fail(&format!("reference kernel: {e:?}: {log}"));
    }
    let mut size = 0usize;
    // SAFETY: prog compiled successfully above; size is a local the call writes.
    check("cubin size", unsafe { nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size) }.result());
    let mut cubin = vec![0u8; size];
    // SAFETY: cubin holds exactly the size nvrtcGetCUBINSize reported for this same compiled prog.
    check("cubin", unsafe { nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }.result());
    // SAFETY: prog is not used after this; the cubin was copied out into an owned Vec first.
    let _ = unsafe { nvrtc::result::destroy_program(prog) };
    let module = check("load reference module", ctx.load_module(nvrtc::Ptx::from_binary(cubin)));
    (
        check("reference function", module.load_function("reference_unpack")),
        check("empty function", module.load_function("empty_kernel")),
    )
}

/// Mean microseconds per repetition of `op`, from events around `reps` back-to-back repetitions
/// (after a warm-up), all on `stream`.
fn time_us(stream: sys::CUstream, reps: usize, mut op: impl FnMut()) -> f64 {
    for _ in 0..reps.div_ceil(10).max(3) {
        op();
    }
    let start = check("event", result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let end = check("event", result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT));
    // SAFETY: start is the event created above and stream is the bench's live stream of the current context.
    check("record", unsafe { result::event::record(start, stream) });
    for _ in 0..reps {
        op();
    }
    // SAFETY: end is the event created above, on the same live stream.
    check("record", unsafe { result::event::record(end, stream) });
    // SAFETY: end was created above and has just been recorded.
    check("sync", unsafe { result::event::synchronize(end) });
    // SAFETY: both events were created above and recorded in order on the stream, and end has completed.
    let ms = check("elapsed", unsafe { result::event::elapsed(start, end) });
    // SAFETY: both events were created in this function, are complete (end was synchronized) and are used no
    // more.
    unsafe {
        let _ = result::event::destroy(start);
        let _ = result::event::destroy(end);
    }
    f64::from(ms) * 1000.0 / reps as f64
}

fn gbps(bytes: usize, us: f64) -> f64 {
    bytes as f64 / us / 1000.0
}

struct Bench {
    kernels: Arc<UnpackKernels>,
    reference: CudaFunction,
    empty: CudaFunction,
    stream: sys::CUstream,
    pool: DeviceBuffer,
    pool_host: Vec<u8>,
    dst: DeviceBuffer,
    dst_len: usize,
    /// Tiles resident in device memory, and a pinned, device-mapped staging copy of them.
    tiles_dev: DeviceBuffer,
    tiles_pinned: *mut Tile,
    tiles_mapped: sys::CUdeviceptr,
    tiles_capacity: usize,
    metas_host: *mut LoadMeta,
    metas_capacity: usize,
    params: Box<InlineTiles>,
    reps: usize,
}

/// Microseconds per repetition of each way of running the same batch.
struct Row {
    name: &'static str,
    bytes: usize,
    fragments: usize,
    tiles: usize,
    memcpy: f64,
    resident: f64,
    inline: Option<f64>,
    copied: f64,
    mapped: f64,
    reference: f64,
    unpacker: f64,
}

impl Bench {
    fn plan(&self, s: &Scenario) -> Vec<Tile> {
        let mut tiles = vec![Tile::default(); s.fragments() * 2 + s.bytes / 4096];
        let mut used = 0;
        for r in &s.receives {
            let layout = self.layout(r.dst_at, CHUNK);
            match plan_receive(&layout, &r.metas, &mut tiles, &mut used) {
                Ok(_) => {}
                Err(PlanError::Invalid(e)) => fail(&format!("plan: {e}")),
                Err(PlanError::NoRoom { needed }) => fail(&format!("plan: no room for {needed} tiles")),
            }
        }
        tiles.truncate(used);
        tiles
    }

    fn layout(&self, dst_at: usize, len: usize) -> ReceiveLayout {
        ReceiveLayout {
            pool: self.pool.0,
            pool_len: POOL_BYTES as u64,
            dst: self.dst.0 + dst_at as u64,
            dst_len: len as u64,
        }
    }

    fn clear_dst(&self) {
        // SAFETY: self.dst is a live allocation of dst_len bytes (Bench is built with dst_len for it).
        check("memset", unsafe { result::memset_d8_sync(self.dst.0, 0, self.dst_len) });
    }

    fn verify(&self, s: &Scenario, who: &str) {
        // SAFETY: self.stream is the bench's live stream, destroyed only at the end of main.
        check("sync", unsafe { result::stream::synchronize(self.stream) });
        let mut expected = vec![0u8; s.bytes];
        for r in &s.receives {
            for m in &r.metas {
                let (src, at, n) = (m.src_off as usize, r.dst_at + m.dst_off as usize, m.len as usize);
                expected[at..at + n].copy_from_slice(&self.pool_host[src..src + n]);
            }
        }
        let mut actual = vec![0u8; s.bytes];
        // SAFETY: actual has s.bytes bytes, and main's largest scenario (32 MiB) fits the dst_len
        // (32 MiB) destination buffer.
        check("download", unsafe { result::memcpy_dtoh_sync(&mut actual, self.dst.0) });
        if let Some(at) = actual.iter().zip(&expected).position(|(a, e)| a != e) {
            fail(&format!("{who} produced wrong bytes for '{}' at offset {at}", s.name));
        }
        self.clear_dst();
    }

    fn launch_inline(&mut self, tiles: &[Tile]) {
        self.params.count = tiles.len() as u32;
        self.params.tiles[..tiles.len()].copy_from_slice(tiles);
        // SAFETY: params' tiles come from plan_receive against this bench's layouts, so they name ranges
        // inside the live pool and dst buffers; self.stream is a live stream of the current primary context.
        check("launch", unsafe { self.kernels.launch_inline(self.stream, &self.params) });
    }

    fn launch_from(&self, tiles: sys::CUdeviceptr, count: usize) {
        // SAFETY: the count tiles at `tiles` were written by run() from plan_receive against this bench's
        // layouts (ranges inside the live pool and dst) and stay there until the launch is synchronized; the
        // signal is unset.
        check("launch", unsafe {
            self.kernels.launch_device_tiles(self.stream, tiles, count as u32, CompletionSignal::default())
        });
    }

    fn launch_copied(&self, count: usize) {
        // SAFETY: tiles_pinned is a pinned allocation of tiles_capacity tiles and run() wrote the first count
        // (count <= tiles_capacity, checked there); nothing writes it while this slice lives.
        let pinned = unsafe { std::slice::from_raw_parts(self.tiles_pinned, count) };
        // SAFETY: tiles_dev holds tiles_capacity tiles, pinned holds count <= that, and the pinned source is
        // not rewritten until verify/time_us synchronize the stream.
        check("upload", unsafe { result::memcpy_htod_async(self.tiles_dev.0, pinned, self.stream) });
        self.launch_from(self.tiles_dev.0, count);
    }

    fn launch_reference(&self, count: usize) {
        let mut metas = self.metas_host as u64;
        let mut count = count as u32;
        let mut pool = self.pool.0;
        let mut dst = self.dst.0;
        let mut args: [*mut c_void; 4] =
            [(&raw mut metas).cast(), (&raw mut count).cast(), (&raw mut pool).cast(), (&raw mut dst).cast()];
        let grid = count.div_ceil(4);
        // SAFETY: args points at the four locals above, matching the reference kernel's (metas, count, pool,
        // dst) parameters; metas_host is mapped host memory holding the count metas run() copied in, whose
        // ranges lie inside the pool and dst.
        check("launch reference", unsafe {
            result::launch_kernel(self.reference.cu_function(), (grid, 1, 1), (128, 1, 1), 0, self.stream, &mut args)
        });
    }

    fn run(&mut self, s: &Scenario, unpacker: &mut Unpacker) -> Row {
        let reps = if s.bytes > (8 << 20) { self.reps / 4 } else { self.reps }.max(10);
        let tiles = self.plan(s);
        let n = tiles.len();
        if n > self.tiles_capacity {
            fail("too many tiles for the staging buffers");
        }
        // SAFETY: run() checked n <= tiles_capacity just above, and tiles_pinned is a pinned allocation of
        // tiles_capacity tiles that no launch is reading (every earlier launch was synchronized by verify or
        // time_us).
        unsafe { std::ptr::copy_nonoverlapping(tiles.as_ptr(), self.tiles_pinned, n) };
        // SAFETY: tiles_dev holds tiles_capacity tiles and tiles has n <= tiles_capacity of them (checked
        // above).
        check("upload tiles", unsafe { result::memcpy_htod_sync(self.tiles_dev.0, &tiles) });
        let flat = s.flat_metas();
        if flat.len() > self.metas_capacity {
            fail("too many fragments for the mapped metadata buffer");
        }
        // SAFETY: flat.len() <= metas_capacity was checked just above, and metas_host is a mapped allocation
        // of metas_capacity metas that no launch is reading now.
        unsafe { std::ptr::copy_nonoverlapping(flat.as_ptr(), self.metas_host, flat.len()) };

        // Every way of running the batch must produce the CPU gather's bytes before it is timed.
        self.clear_dst();
        let fits_inline = n <= self.kernels.max_inline();
        if fits_inline {
            self.launch_inline(&tiles);
            self.verify(s, "unpack kernel (inline tiles)");
        }
        self.launch_from(self.tiles_dev.0, n);
        self.verify(s, "unpack kernel (resident tiles)");
        self.launch_copied(n);
        self.verify(s, "unpack kernel (copied tiles)");
        self.launch_from(self.tiles_mapped, n);
        self.verify(s, "unpack kernel (mapped tiles)");
        self.launch_reference(flat.len());
        self.verify(s, "reference kernel");
        for r in &s.receives {
            submit(unpacker, &self.layout(r.dst_at, CHUNK), &r.metas);
        }
        check("finish", unpacker.finish());
        self.verify(s, "Unpacker");

        let stream = self.stream;
        let (dst, pool, bytes) = (self.dst.0, self.pool.0, s.bytes);
        let memcpy = time_us(stream, reps, || {
            // SAFETY: dst (32 MiB) and pool (256 MiB) are live device buffers at least as large as
            // main's largest scenario (32 MiB), on the bench's live stream.
            check("memcpy", unsafe { result::memcpy_dtod_async(dst, pool, bytes, stream) });
        });
        let resident = time_us(stream, reps, || self.launch_from(self.tiles_dev.0, n));
        let inline = fits_inline.then(|| time_us(stream, reps, || self.launch_inline(&tiles)));
        let copied = time_us(stream, reps, || self.launch_copied(n));
        let mapped = time_us(stream, reps, || self.launch_from(self.tiles_mapped, n));
        let reference = time_us(stream, reps, || self.launch_reference(flat.len()));

        // The whole host path per repetition (validate, merge, plan, launch), host wall clock.
        let host_path = |u: &mut Unpacker| {
            let start = Instant::now();
            for _ in 0..reps {
                for r in &s.receives {
                    submit(u, &self.layout(r.dst_at, CHUNK), &r.metas);
                }
                check("launch", u.launch());
            }
            check("finish", u.finish());
            start.elapsed().as_secs_f64() * 1e6 / reps as f64
        };
        let unpacker_us = host_path(unpacker);

        Row {
            name: s.name,
            bytes: s.bytes,
            fragments: s.fragments(),
            tiles: n,
            memcpy,
            resident,
            inline,
            copied,
            mapped,
            reference,
            unpacker: unpacker_us,
        }
    }
}

fn submit(unpacker: &mut Unpacker, layout: &ReceiveLayout, metas: &[LoadMeta]) -> u64 {
    loop {
        // SAFETY: the pool and destination outlive the unpacker's work (finish before they drop).
        match check("submit", unsafe { unpacker.submit(layout, metas) }) {
            Submit::Queued(ticket) => return ticket,
            Submit::Full => {
                check("poll", unpacker.poll());
            }
        }
    }
}

struct Spread {
    p50: f64,
    p90: f64,
    p99: f64,
}

fn spread(mut samples: Vec<f64>) -> Spread {
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Spread { p50: at(0.5), p90: at(0.9), p99: at(0.99) }
}

/// Host-measured microseconds from `issue` (which starts GPU work and returns a token) until
/// `done(token)` holds, one at a time, after a tenth as many warm-up rounds; also the median time
/// `issue` itself took.
fn one_at_a_time<S>(
    iters: usize,
    state: &mut S,
    mut issue: impl FnMut(&mut S) -> u64,
    mut done: impl FnMut(&mut S, u64) -> bool,
) -> (Spread, f64) {
    let mut total = Vec::with_capacity(iters);
    let mut issuing = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let start = Instant::now();
        let token = issue(state);
        let issued = start.elapsed();
        while !done(state, token) {
            std::hint::spin_loop();
        }
        if i >= iters / 10 {
            total.push(start.elapsed().as_secs_f64() * 1e6);
            issuing.push(issued.as_secs_f64() * 1e6);
        }
    }
    (spread(total), spread(issuing).p50)
}

fn event_done(event: sys::CUevent) -> bool {
    // SAFETY: event is one of main's live events (created before any latency loop and destroyed after them).
    unsafe { result::event::query(event) }.is_ok()
}

fn main() {
    let options = Options::parse();
    let (reps, latency_iters) = (options.reps as usize, options.latency_iters as usize);
    if !uccl_tcpx::internal::cuda::available() {
        println!("SKIPPED: no CUDA driver");
        return;
    }
    let kernels = check("unpack kernels", UnpackKernels::for_device(0));
    let ctx = kernels.context().clone();
    check("bind", ctx.bind_to_thread());
    let stream = check("stream", result::stream::create(result::stream::StreamKind::NonBlocking));
    let (major, minor) = check("cc", ctx.compute_capability());
    let mut driver = 0;
    // SAFETY: driver is a local the call writes.
    unsafe { sys::cuDriverGetVersion(&mut driver) };
    println!(
        "device 0: {} (sm_{major}{minor}), driver {}.{}, kernel target {}, inline capacity {} tiles",
        check("name", ctx.name()),
        driver / 1000,
        driver % 1000 / 10,
        kernels.target(),
        kernels.max_inline()
    );

    let mut rng = Rng(0x0dd_ba11);
    let pool_host: Vec<u8> = (0..POOL_BYTES).map(|_| rng.next() as u8).collect();
    let pool = DeviceBuffer::new(POOL_BYTES);
    // SAFETY: pool is a POOL_BYTES device buffer and pool_host has POOL_BYTES bytes.
    check("upload pool", unsafe { result::memcpy_htod_sync(pool.0, &pool_host) });
    let dst_len = 32 << 20;
    let metas_capacity = 32 << 10;
    let mapped_flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    let metas_host =
        // SAFETY: an allocation call with a size and flags only; main's context is current (bound above).
        check("mapped metas", unsafe { result::malloc_host(metas_capacity * 16, mapped_flags) }).cast::<LoadMeta>();
    let tiles_capacity = 64 << 10;
    // SAFETY: an allocation call with a size and flags only; main's context is current (bound above).
    let tiles_pinned = check("pinned tiles", unsafe {
        result::malloc_host(tiles_capacity * std::mem::size_of::<Tile>(), mapped_flags)
    })
    .cast::<Tile>();
    let mut tiles_mapped = 0;
    check(
        "map tiles",
        // SAFETY: tiles_pinned was just allocated with CU_MEMHOSTALLOC_DEVICEMAP, so it has a device mapping;
        // tiles_mapped is a local the call writes.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut tiles_mapped, tiles_pinned.cast(), 0) }.result(),
    );
    let (reference, empty) = compile_reference(&ctx);
    let mut bench = Bench {
        kernels,
        reference,
        empty,
        stream,
        pool,
        pool_host,
        dst: DeviceBuffer::new(dst_len),
        dst_len,
        tiles_dev: DeviceBuffer::new(tiles_capacity * std::mem::size_of::<Tile>()),
        tiles_pinned,
        tiles_mapped,
        tiles_capacity,
        metas_host,
        metas_capacity,
        params: InlineTiles::boxed(),
        reps,
    };
    let mut unpacker = check("unpacker", Unpacker::new(UnpackerConfig::default()));
    println!("Unpacker e2e uses {:?}", UnpackerConfig::default());

    let scenarios = [
        shuffled_pages("512 KiB, shuffled 4 KiB pages", 512 << 10, &mut rng),
        shuffled_pages("4 MiB, shuffled 4 KiB pages", 4 << 20, &mut rng),
        shuffled_pages("32 MiB, shuffled 4 KiB pages", 32 << 20, &mut rng),
        misaligned_fragments("4 MiB, misaligned 1-4 KiB fragments", 4 << 20, &mut rng),
        misaligned_fragments("32 MiB, misaligned 1-4 KiB fragments", 32 << 20, &mut rng),
    ];
    let rows: Vec<Row> = scenarios.iter().map(|s| bench.run(s, &mut unpacker)).collect();
    println!("every path verified byte for byte against a CPU gather before timing");
    println!();
    println!("GPU time per batch (CUDA events around back-to-back repetitions), and ratio memcpy time / our time:");
    println!(
        "| case | frags | tiles | memcpy D2D | kernel, tiles resident | tiles in params | tiles copied H2D | tiles mapped | Unpacker e2e (host clock) | NCCL-style reference | resident vs reference |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let cell = |us: f64| format!("{us:.1} us ({:.2})", r.memcpy / us);
        println!(
            "| {} | {} | {} | {:.1} us, {:.0} GB/s | {} | {} | {} | {} | {} | {:.1} us, {:.0} GB/s | {:.1}x |",
            r.name,
            r.fragments,
            r.tiles,
            r.memcpy,
            gbps(r.bytes, r.memcpy),
            cell(r.resident),
            r.inline.map_or("-".to_owned(), cell),
            cell(r.copied),
            cell(r.mapped),
            cell(r.unpacker),
            r.reference,
            gbps(r.bytes, r.reference),
            r.reference / r.resident,
        );
    }
    println!();

    // Latency of one 512 KiB receive at a time, submit to event complete, against what an empty
    // kernel and a 512 KiB memcpy cost the same way.
    let stream = bench.stream;
    let done = check("event", result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING));
    let empty = bench.empty.cu_function();
    let (empty_kernel, empty_issue) = one_at_a_time(
        latency_iters,
        &mut (),
        |_| {
            let mut no_args: [*mut c_void; 0] = [];
            // SAFETY: empty is a function of the module loaded above taking no parameters, so no_args is its
            // full argument list; stream is the bench's live stream.
            check("launch", unsafe { result::launch_kernel(empty, (1, 1, 1), (32, 1, 1), 0, stream, &mut no_args) });
            // SAFETY: done and stream are live (created above, destroyed at the end of main).
            check("record", unsafe { result::event::record(done, stream) });
            0
        },
        |_, _| event_done(done),
    );
    let (dst, pool) = (bench.dst.0, bench.pool.0);
    let (memcpy_chunk, memcpy_issue) = one_at_a_time(
        latency_iters,
        &mut (),
        |_| {
            // SAFETY: dst and pool are live device buffers of at least CHUNK bytes, on the bench's live
            // stream.
            check("memcpy", unsafe { result::memcpy_dtod_async(dst, pool, CHUNK, stream) });
            // SAFETY: done and stream are live (created above, destroyed at the end of main).
            check("record", unsafe { result::event::record(done, stream) });
            0
        },
        |_, _| event_done(done),
    );
    println!(
        "latency anchors: empty kernel + event median {:.1} us (p99 {:.1}, host issue {empty_issue:.1} us); \
         512 KiB memcpy + event median {:.1} us (p99 {:.1}, host issue {memcpy_issue:.1} us)",
        empty_kernel.p50, empty_kernel.p99, memcpy_chunk.p50, memcpy_chunk.p99
    );
    let pages = &scenarios[0].receives[0].metas;
    let odd = &scenarios[3].receives[0].metas;
    let layout = bench.layout(0, CHUNK);
    // The default launch path without its host planning: 128 pre-planned tiles in the parameters,
    // then an event; completion seen by spinning on cuEventQuery, or by cuEventSynchronize.
    let mut preplanned = vec![Tile::default(); 4096];
    let mut used = 0;
    check("plan", plan_receive(&layout, pages, &mut preplanned, &mut used).map_err(|_| "plan"));
    let mut params = InlineTiles::boxed();
    params.count = used as u32;
    params.tiles[..used].copy_from_slice(&preplanned[..used]);
    let kernels = bench.kernels.clone();
    let launch_preplanned = || {
        // SAFETY: params' tiles were planned against this bench's layout (ranges inside the live pool and
        // dst); stream is live and current.
        check("launch", unsafe { kernels.launch_inline(stream, &params) });
        // SAFETY: done and stream are live (created above, destroyed at the end of main).
        check("record", unsafe { result::event::record(done, stream) });
        0
    };
    let (query_spin, query_issue) =
        one_at_a_time(latency_iters, &mut (), |_| launch_preplanned(), |_, _| event_done(done));
    let (synchronized, _) = one_at_a_time(
        latency_iters,
        &mut (),
        |_| launch_preplanned(),
        |_, _| {
            // SAFETY: done is live and was recorded by the launch just before.
            check("event sync", unsafe { result::event::synchronize(done) });
            true
        },
    );
    println!(
        "latency anchors: 128 pre-planned tiles in params + event: cuEventQuery spin median {:.1} us (p90 {:.1}, host issue {query_issue:.1} us); cuEventSynchronize median {:.1} us (p90 {:.1})",
        query_spin.p50, query_spin.p90, synchronized.p50, synchronized.p90
    );
    // The same launches reporting through a completion word instead of an event, and a one-tile
    // (16-byte) launch the same way: the floor of launch + word.
    let word_host =
        // SAFETY: an allocation call with a size and flags only; main's context is current.
        check("mapped word", unsafe { result::malloc_host(8, sys::CU_MEMHOSTALLOC_DEVICEMAP) }).cast::<u64>();
    // SAFETY: word_host is the 8-byte mapped allocation just made, so it is valid and aligned for one u64.
    unsafe { word_host.write_volatile(0) };
    let mut word_dev = 0;
    // SAFETY: word_host was allocated with CU_MEMHOSTALLOC_DEVICEMAP, so it has a device mapping; word_dev is
    // a local the call writes.
    check("map word", unsafe { sys::cuMemHostGetDevicePointer_v2(&mut word_dev, word_host.cast(), 0) }.result());
    let counter = DeviceBuffer::new(4);
    // SAFETY: counter is a live 4-byte device buffer.
    check("zero counter", unsafe { result::memset_d8_sync(counter.0, 0, 4) });
    // SAFETY: word_host is a live, aligned 8-byte mapped allocation (freed only after the stream is
    // synchronized below); the kernel writes it, hence the volatile read.
    let word_done = |seq: u64| unsafe { std::ptr::read_volatile(word_host) } >= seq;
    let mut seq = 0u64;
    let mut one_tile = InlineTiles::boxed();
    one_tile.count = 1;
    one_tile.tiles[0] = Tile::new(bench.pool.0, bench.dst.0, 16);
    let mut word_params = InlineTiles::boxed();
    word_params.count = params.count;
    word_params.tiles[..used].copy_from_slice(&preplanned[..used]);
    let launch_signalled = |p: &mut InlineTiles, seq: &mut u64| {
        *seq += 1;
        p.signal = CompletionSignal { seq: *seq, counter: counter.0, word: word_dev };
        // SAFETY: p's tiles were planned against this bench's layout; its signal names the zeroed counter and
        // the mapped word, which no other launch uses at the same time (each launch is waited for before the
        // next).
        check("launch", unsafe { kernels.launch_inline(stream, p) });
        *seq
    };
    let (word_spin, word_issue) =
        one_at_a_time(latency_iters, &mut seq, |seq| launch_signalled(&mut word_params, seq), |_, t| word_done(t));
    let (word_floor, floor_issue) =
        one_at_a_time(latency_iters, &mut seq, |seq| launch_signalled(&mut one_tile, seq), |_, t| word_done(t));
    // SAFETY: stream is the bench's live stream.
    check("sync", unsafe { result::stream::synchronize(stream) });
    println!(
        "latency anchors: 128 pre-planned tiles in params + completion word: median {:.1} us (p90 {:.1}, host issue {word_issue:.1} us); one 16-byte tile + completion word median {:.1} us (p90 {:.1}, host issue {floor_issue:.1} us)",
        word_spin.p50, word_spin.p90, word_floor.p50, word_floor.p90
    );
    // SAFETY: word_host came from malloc_host above and the stream that wrote it was synchronized, so nothing
    // uses it any more.
    unsafe {
        let _ = result::free_host(word_host.cast());
    }
    drop(counter);
    let mut scratch = vec![Tile::default(); 4096];
    for (what, metas) in [("128 shuffled pages", pages), ("misaligned fragments", odd)] {
        let rounds = 20_000;
        let start = Instant::now();
        for _ in 0..rounds {
            let mut used = 0;
            check(
                "plan",
                plan_receive(&layout, std::hint::black_box(metas), &mut scratch, &mut used).map_err(|_| "plan"),
            );
            std::hint::black_box(&scratch);
        }
        println!(
            "host planning (validate, merge, tile) of 512 KiB of {what} ({} frags): {:.2} us",
            metas.len(),
            start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
        );
    }
    let configs = [
        ("default (tiles in params)", UnpackerConfig::default()),
        ("event completion", UnpackerConfig { completion: Completion::Event, ..UnpackerConfig::default() }),
        ("tiles copied", UnpackerConfig { inline_tiles: 0, bulk: BulkTiles::Copy, ..UnpackerConfig::default() }),
        ("tiles mapped", UnpackerConfig { inline_tiles: 0, bulk: BulkTiles::Mapped, ..UnpackerConfig::default() }),
    ];
    let mut medians = Vec::new();
    // A receive without fragments: the completion round trip alone (no kernel: the host writes the
    // word, or records the event).
    let nothing: &Vec<LoadMeta> = &Vec::new();
    for (path, config) in configs {
        let mut unpacker = check("unpacker", Unpacker::new(config));
        for (what, metas) in [("128 shuffled pages", pages), ("misaligned fragments", odd), ("no fragments", nothing)] {
            let (total, issue) = one_at_a_time(
                latency_iters,
                &mut unpacker,
                |u| {
                    let ticket = submit(u, &layout, metas);
                    check("launch", u.launch());
                    ticket
                },
                |u, ticket| check("poll", u.poll()) > ticket,
            );
            println!(
                "latency, 512 KiB of {what} ({} frags), {path}: submit -> poll reports done median {:.1} us, p90 {:.1} us, p99 {:.1} us; host submit+launch median {issue:.1} us",
                metas.len(),
                total.p50,
                total.p90,
                total.p99
            );
            medians.push((path, what, total.p50, total.p90));
        }
        let counts = unpacker.completion_counts();
        println!(
            "{path}: {:?} completion, launches seen finished by their own signal {}, by a stream check {}",
            unpacker.completion(),
            counts.signalled,
            counts.by_stream_check
        );
    }
    println!();
    println!(
        "| 512 KiB receive, submit -> done (median / p90) | launch mode, completion word (default) | launch mode, event | tiles mapped, word | tiles copied, word |"
    );
    println!("|---|---|---|---|---|");
    for what in ["128 shuffled pages", "misaligned fragments", "no fragments"] {
        let cell = |path: &str| {
            medians
                .iter()
                .find(|m| m.0 == path && m.1 == what)
                .map_or("-".to_owned(), |m| format!("{:.1} / {:.1} us", m.2, m.3))
        };
        println!(
            "| {what} | {} | {} | {} | {} |",
            cell("default (tiles in params)"),
            cell("event completion"),
            cell("tiles mapped"),
            cell("tiles copied")
        );
    }
    // SAFETY: done, the stream and both host allocations were made in main, every launch on them has finished
    // (the stream was synchronized), and none is used after this.
    unsafe {
        let _ = result::event::destroy(done);
        let _ = result::stream::destroy(bench.stream);
        let _ = result::free_host(bench.metas_host.cast());
        let _ = result::free_host(bench.tiles_pinned.cast());
    }
}
