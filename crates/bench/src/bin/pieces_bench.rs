//! The piece kernel (`cuda::pieces`) between two GPUs as the same-host path drives it for a KV
//! request: N pieces of S bytes side by side, at random blocks of both ends, or region after region
//! (random blocks of each, as NIXL lists a request), pulled (source on the peer GPU, the kernel on
//! the local one) and pushed, against one `cuMemcpyDtoDAsync` of the same bytes between the same
//! GPUs in the same run. `--ipc` puts the peer's end in another process, mapped through CUDA IPC as
//! the same-host path maps a peer's registrations; `--gap-us` idles before each timed copy, as a
//! caller's requests come apart (after 100 ms or more both the kernel and the copy run slower).
//!
//! Each case is timed two ways: through `PieceCopier` from the first piece listed to the stream
//! done (what a request's post to DONE holds), and as one launch of a list already in device memory
//! (the kernel alone, CUDA events). Every layout's bytes are checked before it is timed.

use std::time::Instant;

use clap::Parser;
use cudarc::driver::{CudaContext, result, sys};
use uccl_tcpx::internal::cuda::pieces::{Piece, PieceCopier};
use uccl_tcpx::internal::cuda::stream::Stream;
use uccl_tcpx::internal::cuda::unpack::UnpackKernels;
use uccl_tcpx::internal::cuda::{DeviceBuffer, Gpu};

#[path = "../kernel_bench.rs"]
mod kernel_bench;
use kernel_bench::{Rng, check, fail};

#[derive(Parser)]
#[command(name = "pieces_bench")]
struct Options {
    /// The GPU that runs the kernel
    #[arg(long, default_value_t = 0)]
    gpu: i32,
    /// The GPU that holds the other end (the same GPU copies within one)
    #[arg(long, default_value_t = 1)]
    peer: i32,
    /// Pieces a request
    #[arg(long, default_value_t = 8192)]
    pieces: usize,
    /// Bytes a piece
    #[arg(long, default_value_t = 16 << 10)]
    size: usize,
    /// Blocks of `size` each end's buffer holds; random layouts pick `pieces` of them
    #[arg(long, default_value_t = 32768)]
    blocks: usize,
    /// Timed repetitions of each case
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Regions of the `regions` layout: each holds blocks / regions blocks, and a request takes
    /// pieces / regions random ones of each, region after region, on both ends (as NIXL lists a
    /// KV request)
    #[arg(long, default_value_t = 64)]
    regions: usize,
    /// The peer's end lives in a child process and is mapped through CUDA IPC, as the same-host
    /// path maps a peer process's registrations
    #[arg(long)]
    ipc: bool,
    /// Idle microseconds before each timed copy, as a caller's requests come with gaps between
    /// them (the GPU's clocks may fall while it idles)
    #[arg(long, default_value_t = 0)]
    gap_us: u64,
}

/// Median, min and max of microsecond samples.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The child's end of `--ipc`: allocates `span` bytes on GPU `peer`, writes the allocation's IPC
/// handle to `tx` and keeps it until `rx` closes (the parent exits or is done). Runs before this
/// process touches CUDA, in a fork.
fn ipc_child(peer: i32, span: usize, tx: i32, rx: i32) -> ! {
    let _ctx = check("child context", CudaContext::new(peer as usize));
    // SAFETY: an allocation call; the context is current.
    let addr = check("child alloc", unsafe { result::malloc_sync(span) });
    let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
    // SAFETY: writes one handle for a live allocation of the current context.
    let status = unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), addr) };
    if status != sys::CUresult::CUDA_SUCCESS {
        fail(&format!("cuIpcGetMemHandle: {status:?}"));
    }
    // SAFETY: initialized by the call above.
    let handle = unsafe { handle.assume_init() };
    let bytes = &handle.reserved;
    // SAFETY: writes the handle's bytes to our pipe, then blocks reading the parent's until EOF.
    unsafe {
        libc::write(tx, bytes.as_ptr().cast(), bytes.len());
        let mut b = 0u8;
        while libc::read(rx, (&raw mut b).cast(), 1) > 0 {}
        libc::_exit(0)
    }
}

/// The peer's end through `--ipc`: forks the owner before any CUDA call of this process and maps
/// what it allocated. The returned descriptor keeps the child alive while open.
fn ipc_end(peer: i32, span: usize) -> (i32, sys::CUipcMemHandle) {
    let (mut up, mut down) = ([0i32; 2], [0i32; 2]);
    // SAFETY: plain pipe and fork calls; the child runs `ipc_child` only and exits.
    unsafe {
        if libc::pipe(up.as_mut_ptr()) != 0 || libc::pipe(down.as_mut_ptr()) != 0 {
            fail("pipe");
        }
        match libc::fork() {
            0 => {
                libc::close(up[0]);
                libc::close(down[1]);
                ipc_child(peer, span, up[1], down[0])
            }
            -1 => fail("fork"),
            _ => {}
        }
        libc::close(up[1]);
        libc::close(down[0]);
        let mut handle: sys::CUipcMemHandle = std::mem::zeroed();
        let want = handle.reserved.len();
        let got = libc::read(up[0], handle.reserved.as_mut_ptr().cast(), want);
        if got != want as isize {
            fail("the IPC child sent no handle");
        }
        (down[1], handle)
    }
}

fn upload(addr: u64, data: &[u8]) {
    // SAFETY: `addr` is device memory of at least `data.len()` bytes (one of the two ends).
    check("upload", unsafe { result::memcpy_htod_sync(addr, data) });
}

fn download(addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: as for `upload`.
    check("download", unsafe { result::memcpy_dtoh_sync(&mut v, addr) });
    v
}

fn main() {
    let o = Options::parse();
    if o.pieces == 0 || o.size == 0 || o.blocks < o.pieces || o.regions == 0 || o.blocks % o.regions != 0 {
        fail("need pieces > 0, size > 0, blocks >= pieces and a multiple of regions");
    }
    let span = o.blocks * o.size;
    // SAFETY: only tries to dlopen the driver's names; nothing in it is called, so a fork may follow.
    if !unsafe { sys::is_culib_present() } {
        println!("SKIPPED: no CUDA driver");
        return;
    }
    // The owner first: a fork must come before this process's first CUDA call.
    let ipc = (o.ipc && o.peer != o.gpu).then(|| ipc_end(o.peer, span));
    if !uccl_tcpx::internal::cuda::available() {
        println!("SKIPPED: no CUDA driver");
        return;
    }
    let local = check("open GPU", Gpu::open(o.gpu));
    check("open peer GPU", Gpu::open(o.peer));
    let peer_ctx = check("peer context", CudaContext::new(o.peer as usize));
    // The local GPU's primary context stays current on this thread from here on.
    let ctx = check("context", CudaContext::new(o.gpu as usize));
    check("bind", ctx.bind_to_thread());
    if o.peer != o.gpu && ipc.is_none() {
        let peer_ctx = peer_ctx.cu_ctx();
        // SAFETY: both contexts are live primary contexts; the local one is current.
        let status = unsafe { sys::cuCtxEnablePeerAccess(peer_ctx, 0) };
        if !matches!(status, sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) {
            fail(&format!("GPU {} cannot reach GPU {}: {status:?}", o.gpu, o.peer));
        }
    }
    let kernels = check("piece kernel", UnpackKernels::for_device(o.gpu as usize));
    let bytes = o.pieces * o.size;
    let here = check("buffer", DeviceBuffer::new(o.gpu, span));
    let peer_buffer;
    let there = match &ipc {
        Some((_, handle)) => {
            let mut addr = 0;
            let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
            // SAFETY: a handle the owner sent; writes one address; the local context is current.
            let status = unsafe { sys::cuIpcOpenMemHandle_v2(&mut addr, *handle, flags) };
            if status != sys::CUresult::CUDA_SUCCESS {
                fail(&format!("cuIpcOpenMemHandle: {status:?}"));
            }
            addr
        }
        None => {
            peer_buffer = check("peer buffer", DeviceBuffer::new(o.peer, span));
            peer_buffer.addr() as u64
        }
    };
    let here = here.addr() as u64;
    let stream = check("stream", Stream::new(&local));
    let mut copier = check("copier", PieceCopier::if_built(&local).expect("built above"));
    let mut list = check("list buffer", DeviceBuffer::new(o.gpu, o.pieces * 24 * o.size.div_ceil(16 << 10)));
    let (start, end) = {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        (check("event", result::event::create(flags)), check("event", result::event::create(flags)))
    };
    let mut rng = Rng(0x5eed_cafe);
    let seed: Vec<u8> = (0..span).map(|_| rng.next() as u8).collect();
    println!(
        "GPU {} <- -> GPU {}{}: {} pieces of {} B ({} MiB), ends of {} MiB, {} regions; {} us idle before each copy; kernel target {}",
        o.gpu,
        o.peer,
        if ipc.is_some() { " (CUDA IPC)" } else { "" },
        o.pieces,
        o.size,
        bytes >> 20,
        span >> 20,
        o.regions,
        o.gap_us,
        kernels.target()
    );
    println!(
        "{:<8} {:<8} {:>24} {:>24} {:>20}",
        "way", "layout", "copier us (x memcpy)", "one launch us (x)", "memcpy us (GB/s)"
    );
    for pull in [true, false] {
        let (s, d) = if pull { (there, here) } else { (here, there) };
        for layout in ["side", "random", "regions"] {
            let (from, to) = table(layout, &o, &mut rng);
            let pieces: Vec<(u64, u64)> =
                from.iter().zip(&to).map(|(&f, &t)| (s + (f * o.size) as u64, d + (t * o.size) as u64)).collect();
            let moved = pieces.len() * o.size;
            // Checked once: the source seeded, the destination zeroed, the copier's call, each
            // destination block equal to its source block and nothing else written.
            upload(s, &seed);
            upload(d, &vec![0u8; span]);
            copy_all(&mut copier, &stream, &pieces, o.size);
            let got = download(d, span);
            let mut want = vec![0u8; span];
            for (&f, &t) in from.iter().zip(&to) {
                want[t * o.size..(t + 1) * o.size].copy_from_slice(&seed[f * o.size..(f + 1) * o.size]);
            }
            if got != want {
                fail(&format!("{} {layout}: bytes differ", if pull { "pull" } else { "push" }));
            }
            // The list for one launch, split as the copier splits.
            let mut listed = Vec::new();
            for &(s, d) in &pieces {
                let mut at = 0;
                while at < o.size as u64 {
                    let n = (o.size as u64 - at).min(16 << 10);
                    listed.push(Piece { src: s + at, dst: d + at, len: n });
                    at += n;
                }
            }
            let raw: Vec<u8> = listed.iter().flat_map(|p| [p.src, p.dst, p.len]).flat_map(u64::to_le_bytes).collect();
            check("upload list", list.copy_from_host(0, &raw));
            let (mut ours, mut one, mut anchor) = (Vec::new(), Vec::new(), Vec::new());
            let gap = std::time::Duration::from_micros(o.gap_us);
            for _ in 0..o.reps {
                std::thread::sleep(gap);
                let t = Instant::now();
                copy_all(&mut copier, &stream, &pieces, o.size);
                ours.push(t.elapsed().as_secs_f64() * 1e6);
                std::thread::sleep(gap);
                // SAFETY: the events and stream are live, of the current context; the list holds
                // `listed` pieces within both live buffers.
                let ms = unsafe {
                    check("record", result::event::record(start, stream.raw()));
                    check("launch", kernels.launch_pieces(stream.raw(), list.addr() as u64, listed.len() as u32));
                    check("record", result::event::record(end, stream.raw()));
                    check("sync", stream.synchronize());
                    check("elapsed", result::event::elapsed(start, end))
                };
                one.push(ms as f64 * 1e3);
                std::thread::sleep(gap);
                let t = Instant::now();
                // SAFETY: both ranges lie in live buffers of this run; context current.
                let status = unsafe { sys::cuMemcpyDtoDAsync_v2(d, s, moved, stream.raw()) };
                if status != sys::CUresult::CUDA_SUCCESS {
                    fail(&format!("memcpy: {status:?}"));
                }
                check("sync", stream.synchronize());
                anchor.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let ((a, _, _), (b, bmin, bmax), (c, cmin, cmax)) = (spread(anchor), spread(ours), spread(one));
            println!(
                "{:<8} {:<8} {:>9.0} [{:.0}-{:.0}] ({:.2}) {:>7.0} [{:.0}-{:.0}] ({:.2}) {:>9.0} ({:.0})",
                if pull { "pull" } else { "push" },
                layout,
                b,
                bmin,
                bmax,
                a / b,
                c,
                cmin,
                cmax,
                a / c,
                a,
                moved as f64 / a / 1e3
            );
        }
    }
    println!("every layout's bytes checked before timing; launches {}", copier.launches());
    if let Some((keep, _)) = ipc {
        // SAFETY: closing our end of the pipe lets the owner exit.
        unsafe { libc::close(keep) };
    }
}

/// `n` distinct values below `of`, in random order.
fn pick(rng: &mut Rng, n: usize, of: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..of).collect();
    rng.shuffle(&mut all);
    all.truncate(n);
    all
}

/// Source and destination block numbers of a request of `layout`.
fn table(layout: &str, o: &Options, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    match layout {
        "side" => ((0..o.pieces).collect(), (0..o.pieces).collect()),
        "random" => (pick(rng, o.pieces, o.blocks), pick(rng, o.pieces, o.blocks)),
        _ => {
            let (per, each) = (o.blocks / o.regions, o.pieces.div_ceil(o.regions));
            let (mut from, mut to) = (Vec::new(), Vec::new());
            for r in 0..o.regions {
                let n = each.min(o.pieces - from.len()).min(per);
                from.extend(pick(rng, n, per).into_iter().map(|b| r * per + b));
                to.extend(pick(rng, n, per).into_iter().map(|b| r * per + b));
            }
            (from, to)
        }
    }
}

/// One request's pieces through the copier, to the stream done.
fn copy_all(copier: &mut PieceCopier, stream: &Stream, pieces: &[(u64, u64)], size: usize) {
    for &(s, d) in pieces {
        // SAFETY: both ranges lie in live buffers of this run, untouched until the stream passed
        // the copies; the GPU's context is current.
        check("push", unsafe { copier.push(stream, s, d, size as u64) });
    }
    // SAFETY: as above.
    check("finish", unsafe { copier.finish(stream) });
    check("sync", stream.synchronize());
}
