//! What the staged GPU path's primitives cost on this machine: small synchronous copies in each
//! mode of the small copier (the inline transfers), the host-side cost of issuing a staging copy
//! and its notification, and how device-to-host copies share the bus across streams (which
//! decides how long a staged transfer takes to fill and drain its pipeline).
//!
//!   gpu_small_copy [GPU] [ITERS]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cudarc::driver::sys;
use uccl_tcpx::internal::cuda::memory::PinnedBuffer;
use uccl_tcpx::internal::cuda::small_copy::{SmallCopier, SmallCopyMode};
use uccl_tcpx::internal::cuda::stream::Stream;
use uccl_tcpx::internal::cuda::{DeviceBuffer, Gpu};

fn pct(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    (samples[samples.len() / 2], samples[samples.len() * 99 / 100])
}

fn ok(status: sys::CUresult, what: &str) {
    assert_eq!(status, sys::CUresult::CUDA_SUCCESS, "{what}");
}

fn main() {
    if !uccl_tcpx::internal::cuda::available() {
        println!("SKIPPED: no CUDA driver");
        return;
    }
    let mut args = std::env::args().skip(1);
    let ordinal: i32 = args.next().map_or(0, |s| s.parse().expect("GPU ordinal"));
    let iters: usize = args.next().map_or(3000, |s| s.parse().expect("iterations"));
    let gpu = Gpu::open(ordinal).unwrap();
    let mut dev = DeviceBuffer::new(ordinal, 64 << 20).unwrap();
    dev.fill(0x5a).unwrap();

    println!("small copies, GPU {ordinal}, {iters} each: p50 / p99 us");
    for mode in [SmallCopyMode::Legacy, SmallCopyMode::Dma] {
        let copier = SmallCopier::new(&gpu, mode).unwrap();
        for (len, offset) in [(8usize, 0usize), (8, 3), (1, 5), (64, 0), (4096, 0), (8192, 1), (16384, 0), (65536, 0)] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len + offset) as u8).collect();
            let mut back = vec![0u8; len];
            let (mut put, mut get) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
            for i in 0..iters + 50 {
                let t = Instant::now();
                // SAFETY: offset + len is at most 65536, far inside dev's 64 MiB, and only this thread uses
                // dev.
                unsafe { copier.to_device(dev.addr() + offset, &payload).unwrap() };
                let t_put = t.elapsed().as_secs_f64() * 1e6;
                let t = Instant::now();
                // SAFETY: offset + len is at most 65536, inside dev's 64 MiB.
                unsafe { copier.from_device(&mut back, dev.addr() + offset).unwrap() };
                let t_get = t.elapsed().as_secs_f64() * 1e6;
                assert_eq!(back, payload, "{mode:?} {len} B at +{offset}");
                if i >= 50 {
                    put.push(t_put);
                    get.push(t_get);
                }
            }
            let (pp, pp99) = pct(&mut put);
            let (gp, gp99) = pct(&mut get);
            println!(
                "small-copy mode={:<6} len={len:>5} off={offset}: to_device {pp:6.2} / {pp99:6.2}   from_device {gp:6.2} / {gp99:6.2}",
                format!("{:?}", copier.mode())
            );
        }
    }

    // A thread's first copy against its next ones: whatever the driver sets up per thread (a
    // connection's reader makes its first copy on a thread that never touched the GPU).
    let copier = std::sync::Arc::new(SmallCopier::new(&gpu, SmallCopyMode::Dma).unwrap());
    for round in 0..3 {
        let (copier, at) = (copier.clone(), dev.addr());
        let times = std::thread::spawn(move || {
            (0..4)
                .map(|_| {
                    let t = Instant::now();
                    // SAFETY: 4 KiB at the start of dev's 64 MiB; only this thread copies meanwhile.
                    unsafe { copier.to_device(at, &[1u8; 4096]).unwrap() };
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        println!("a new thread's 4 KiB copies to the device (round {round}), us: {times:.1?}");
    }

    // Host-side cost of what the staging ring issues per chunk.
    let stream = Stream::new(&gpu).unwrap();
    let pinned = PinnedBuffer::new(&gpu, 32 << 20).unwrap();
    // The raw calls below need the GPU's primary context current on this thread.
    let mut device: sys::CUdevice = 0;
    let mut primary: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: device is a local the call writes; ordinal is the GPU that Gpu::open accepted above.
    ok(unsafe { sys::cuDeviceGet(&mut device, ordinal) }, "device");
    // SAFETY: primary is a local the call writes; device came from cuDeviceGet just above.
    ok(unsafe { sys::cuDevicePrimaryCtxRetain(&mut primary, device) }, "primary context");
    // SAFETY: primary was retained just above and stays retained (never released) for the rest of main.
    ok(unsafe { sys::cuCtxSetCurrent(primary) }, "set context");
    let mut ev: sys::CUevent = std::ptr::null_mut();
    // SAFETY: ev is a local the call writes; the primary context is current (set above).
    ok(unsafe { sys::cuEventCreate(&mut ev, 2) }, "event");
    static CALLS: AtomicU64 = AtomicU64::new(0);
    unsafe extern "C" fn cb(_: *mut std::ffi::c_void) {
        CALLS.fetch_add(1, Ordering::Release);
    }
    let n = 200;
    let (mut t_copy, mut t_rec, mut t_host) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        ok(
            // SAFETY: pinned holds 32 MiB and dev 64 MiB, so the 1 MiB copy fits both; stream is live, and
            // both buffers outlive the stream.synchronize() below.
            unsafe { sys::cuMemcpyDtoHAsync_v2(pinned.as_ptr().cast(), dev.addr() as u64, 1 << 20, stream.raw()) },
            "d2h",
        );
        t_copy.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        // SAFETY: ev was created above and stream is live, both in the current primary context.
        ok(unsafe { sys::cuEventRecord(ev, stream.raw()) }, "record");
        t_rec.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        // SAFETY: cb only bumps an atomic and ignores its null argument; stream is live.
        ok(unsafe { sys::cuLaunchHostFunc(stream.raw(), Some(cb), std::ptr::null_mut()) }, "hostfunc");
        t_host.push(t.elapsed().as_secs_f64() * 1e6);
    }
    stream.synchronize().unwrap();
    let (a, _) = pct(&mut t_copy);
    let (b, _) = pct(&mut t_rec);
    let (c, _) = pct(&mut t_host);
    println!("issue cost p50 us: cuMemcpyDtoHAsync(1 MiB) {a:.2}, cuEventRecord {b:.2}, cuLaunchHostFunc {c:.2}");

    // Latency from an idle stream's host function being queued to it running, and from a copy's
    // end to its event being seen by a spinning poller.
    let mut lat = Vec::new();
    for _ in 0..n {
        let before = CALLS.load(Ordering::Acquire);
        let t = Instant::now();
        // SAFETY: cb only bumps an atomic and ignores its null argument; stream is live.
        ok(unsafe { sys::cuLaunchHostFunc(stream.raw(), Some(cb), std::ptr::null_mut()) }, "hostfunc");
        while CALLS.load(Ordering::Acquire) == before {
            std::hint::spin_loop();
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p, p99) = pct(&mut lat);
    println!("host function on an idle stream, queued -> ran: p50 {p:.2} us, p99 {p99:.2} us");
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: the 8-byte copy fits pinned (32 MiB) and dev (64 MiB), both live until main ends; stream is
        // live.
        ok(unsafe { sys::cuMemcpyDtoHAsync_v2(pinned.as_ptr().cast(), dev.addr() as u64, 8, stream.raw()) }, "d2h");
        // SAFETY: ev was created above and stream is live, both in the current primary context.
        ok(unsafe { sys::cuEventRecord(ev, stream.raw()) }, "record");
        // SAFETY: ev is live and was recorded just above.
        while unsafe { sys::cuEventQuery(ev) } != sys::CUresult::CUDA_SUCCESS {
            std::hint::spin_loop();
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (p, p99) = pct(&mut lat);
    println!("8 B cuMemcpyDtoHAsync + event, spinning on cuEventQuery: p50 {p:.2} us, p99 {p99:.2} us");

    // Bus sharing: 8 streams each copying 4 MiB at once against one stream copying 8 x 4 MiB in
    // order: when does the first chunk land, when the last.
    let streams: Vec<Stream> = (0..8).map(|_| Stream::new(&gpu).unwrap()).collect();
    let events: Vec<sys::CUevent> = (0..8)
        .map(|_| {
            let mut e: sys::CUevent = std::ptr::null_mut();
            // SAFETY: e is a local the call writes; the primary context is current.
            ok(unsafe { sys::cuEventCreate(&mut e, 2) }, "event");
            e
        })
        .collect();
    for (label, chunk) in [("4 MiB", 4usize << 20), ("1 MiB", 1 << 20), ("512 KiB", 512 << 10)] {
        for h2d in [false, true] {
            for parallel in [true, false] {
                let mut firsts = Vec::new();
                let mut lasts = Vec::new();
                for _ in 0..20 {
                    let t = Instant::now();
                    for i in 0..8 {
                        let s = if parallel { streams[i].raw() } else { streams[0].raw() };
                        // SAFETY: i < 8 and chunk <= 4 MiB, so i * chunk stays inside pinned's 32 MiB.
                        let host = unsafe { pinned.as_ptr().add(i * chunk) };
                        let d = dev.addr() as u64 + (i * chunk) as u64;
                        if h2d {
                            // SAFETY: host and d name chunk bytes inside pinned (32 MiB) and dev (64 MiB),
                            // live until main ends; each round waits for every event below before the buffers
                            // are reused.
                            ok(unsafe { sys::cuMemcpyHtoDAsync_v2(d, host.cast(), chunk, s) }, "h2d");
                        } else {
                            // SAFETY: host and d name chunk bytes inside pinned (32 MiB) and dev (64 MiB),
                            // live until main ends; each round waits for every event below before the buffers
                            // are reused.
                            ok(unsafe { sys::cuMemcpyDtoHAsync_v2(host.cast(), d, chunk, s) }, "d2h");
                        }
                        // SAFETY: events[i] was created above and s is one of the live streams.
                        ok(unsafe { sys::cuEventRecord(events[i], s) }, "record");
                    }
                    let mut pending: Vec<usize> = (0..8).collect();
                    let mut first = None;
                    while !pending.is_empty() {
                        // SAFETY: every event in events was created above and has been recorded on a live
                        // stream.
                        pending.retain(|&i| unsafe { sys::cuEventQuery(events[i]) } != sys::CUresult::CUDA_SUCCESS);
                        if pending.len() < 8 && first.is_none() {
                            first = Some(t.elapsed().as_secs_f64() * 1e6);
                        }
                    }
                    firsts.push(first.unwrap());
                    lasts.push(t.elapsed().as_secs_f64() * 1e6);
                }
                let (f, _) = pct(&mut firsts);
                let (l, _) = pct(&mut lasts);
                println!(
                    "bus {} 8 x {label} on {}: first lands {f:7.1} us, last {l:7.1} us ({:.1} GB/s)",
                    if h2d { "H2D" } else { "D2H" },
                    if parallel { "8 streams" } else { "1 stream " },
                    (8 * chunk) as f64 / (l * 1e3)
                );
            }
        }
    }
}
