//! GPU mode under a consumer whose kernels wait for the plugin, as NCCL's do: NCCL's proxy thread
//! calls isend, irecv and test while its kernels run on the same GPU, spinning until those calls
//! complete the step they wait for. A plugin call that waits for the device to go idle (freeing or
//! allocating pinned memory does) then never returns. TCPX makes no such call on its data path.
//!
//! Here a kernel spins on the comms' GPU until the host releases it (or its own deadline passes,
//! so that a regression fails instead of hanging), while the plugin moves messages of growing
//! sizes. Needs a CUDA driver, a GPU and NVRTC; skipped without them (a failure where
//! UCCL_TCPX_REQUIRE_GPU=1).

mod common;

use std::ffi::c_void;
use std::time::{Duration, Instant};

use common::{Plugin, pattern};
use cudarc::driver::{result, sys};
use uccl_tcpx::internal::ncclnet::*;

/// Spins until `*release` is set or `limit_ns` passed; `*outcome` says which (1: released, 2: timed
/// out), after 3 once it runs.
const WAITER: &str = r#"
extern "C" __global__ void wait_for_host(const volatile unsigned int* release, unsigned long long limit_ns,
                                         volatile unsigned int* outcome) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    *outcome = 3;
    __threadfence_system();
    do {
        if (*release) { *outcome = 1; return; }
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < limit_ns);
    *outcome = 2;
}
"#;

/// How long the kernel waits for the transfers: far more than they take, far less than the
/// harness's own deadline for one of them.
const KERNEL_LIMIT: Duration = Duration::from_secs(30);

fn check(what: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
}

/// Makes device 0's primary context current, as a consumer does before it calls the plugin.
fn use_gpu_0() {
    uccl_tcpx::internal::cuda::driver().expect("cuInit");
    let dev = result::device::get(0).unwrap();
    // SAFETY: dev is device 0, which the driver just initialised (cuInit) reported.
    let ctx = unsafe { result::primary_ctx::retain(dev) }.unwrap();
    // SAFETY: ctx was just retained and stays retained for the rest of the process.
    unsafe { result::ctx::set_current(ctx) }.unwrap();
}

/// The waiting kernel, its stream and the two host-mapped words it reads and writes.
struct Waiter {
    function: sys::CUfunction,
    stream: sys::CUstream,
    /// `[release, outcome]`, mapped for the device.
    words: *mut u32,
    words_device: sys::CUdeviceptr,
}

impl Waiter {
    fn new() -> Waiter {
        let ptx = cudarc::nvrtc::compile_ptx(WAITER).expect("NVRTC compiles the waiting kernel").to_src();
        let ptx = std::ffi::CString::new(ptx).unwrap();
        let mut w = Waiter {
            function: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            words: std::ptr::null_mut(),
            words_device: 0,
        };
        let mut module = std::ptr::null_mut();
        let mut host: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointers to locals and fields; the PTX is NUL-terminated; 8 bytes hold both
        // words. All of it is allocated before any transfer, as a consumer sets up before it runs.
        unsafe {
            check("cuModuleLoadData", sys::cuModuleLoadData(&mut module, ptx.as_ptr().cast()));
            check("cuModuleGetFunction", sys::cuModuleGetFunction(&mut w.function, module, c"wait_for_host".as_ptr()));
            check("cuStreamCreate", sys::cuStreamCreate(&mut w.stream, 1 /* non-blocking */));
            let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
            check("cuMemHostAlloc", sys::cuMemHostAlloc(&mut host, 8, flags));
            check("cuMemHostGetDevicePointer", sys::cuMemHostGetDevicePointer_v2(&mut w.words_device, host, 0));
        }
        w.words = host.cast();
        w
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: words holds two aligned u32 in pinned memory that lives as long as the process;
        // the kernel writes them too, hence the atomic view.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.words.add(i)) }
    }

    /// Launches the kernel and waits until it runs.
    fn launch(&self) {
        self.word(0).store(0, std::sync::atomic::Ordering::SeqCst);
        self.word(1).store(0, std::sync::atomic::Ordering::SeqCst);
        let (mut release, mut limit, mut outcome) =
            (self.words_device, KERNEL_LIMIT.as_nanos() as u64, self.words_device + 4);
        let mut args: [*mut c_void; 3] =
            [(&raw mut release).cast(), (&raw mut limit).cast(), (&raw mut outcome).cast()];
        // SAFETY: the arguments match wait_for_host's parameters; one thread is enough.
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                self.function,
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                self.stream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        });
        testkit::wait_until("the waiting kernel runs", Duration::from_secs(20), || {
            self.word(1).load(std::sync::atomic::Ordering::SeqCst) != 0
        });
    }

    /// Releases the kernel and returns whether it was still waiting (rather than timed out).
    fn release(&self) -> bool {
        self.word(0).store(1, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: a stream this value created.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.stream) });
        self.word(1).load(std::sync::atomic::Ordering::SeqCst) == 1
    }
}

/// Device memory whose usable part starts on a 4 KiB boundary (CUDA regMr requires it).
struct DeviceBuf {
    raw: sys::CUdeviceptr,
    ptr: sys::CUdeviceptr,
}

impl DeviceBuf {
    fn new(len: usize) -> DeviceBuf {
        // SAFETY: cuMemAlloc only allocates; the primary context is current (use_gpu_0).
        let raw = unsafe { result::malloc_sync(len + 8192) }.unwrap();
        DeviceBuf { raw, ptr: (raw + 4095) & !4095 }
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: raw came from cuMemAlloc in new() and is freed once, after its transfers completed.
        unsafe { result::free_sync(self.raw) }.unwrap();
    }
}

/// The `size` bytes of the receive in `slot`, gathered from the GPU's pool along its loadMeta list.
fn gather(h: &UnpackDeviceHandle, slot: usize, size: usize) -> Vec<u8> {
    let meta = h.meta;
    // SAFETY: meta is the receive comm's live mapped NetUnpackMeta (host and device addresses are
    // one under unified addressing); cnt was published with Release before test reported done.
    let cnt = unsafe { std::sync::atomic::AtomicU64::from_ptr(std::ptr::addr_of_mut!((*meta).cnt[slot])) }
        .load(std::sync::atomic::Ordering::Acquire) as usize;
    assert!(cnt <= UNPACK_MAX_SLICE_PAGES);
    let mut got = vec![0u8; size];
    for i in 0..cnt {
        // SAFETY: i < cnt <= 2048, inside mem[slot] of the live metadata block.
        let m = unsafe { std::ptr::addr_of!((*meta).mem[slot][i]).read() };
        let (src, len, dst) = (m.src_off as u64, m.len as usize, m.dst_off as usize);
        assert!(dst + len <= size, "{m:?} beyond {size}");
        // SAFETY: dst + len <= size; the fragment lies in the comm's pool (the fake checks that).
        unsafe { result::memcpy_dtoh_sync(&mut got[dst..dst + len], h.bounce_buf as sys::CUdeviceptr + src) }.unwrap();
    }
    got
}

/// Sends on one request slot grow from 4 KiB to 4 MiB while a kernel on the GPU waits for them to
/// complete, as NCCL's kernels wait for their proxy thread: every transfer completes while the
/// kernel still waits.
#[test]
fn transfers_complete_while_a_kernel_waits_for_them() {
    let name = "transfers_complete_while_a_kernel_waits_for_them";
    let env = [("FAKE_TCPX_MODE", "gpu")];
    if common::no_gpu()
        // SAFETY: only dlopens candidate library names.
        || testkit::skip_without("NVRTC", unsafe { cudarc::nvrtc::sys::is_culib_present() })
        || common::spawn_in_child(name, &env)
    {
        return;
    }
    use_gpu_0();
    let p = Plugin::init();
    let pair = p.pair(0);
    let mut raw = [0u8; 24];
    // SAFETY: the device handle is a live 24-byte UnpackDeviceHandle in device memory.
    unsafe { result::memcpy_dtoh_sync(&mut raw, pair.dev_handle.handle as sys::CUdeviceptr) }.unwrap();
    // SAFETY: raw holds the 24 bytes of an UnpackDeviceHandle, plain integers and pointers.
    let h: UnpackDeviceHandle = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };

    let cap = 4 << 20;
    let (src, dst) = (DeviceBuf::new(cap), DeviceBuf::new(cap));
    let smh = p.reg(pair.send, src.ptr as *const u8, cap, NCCL_PTR_CUDA).unwrap();
    let rmh = p.reg(pair.recv, dst.ptr as *const u8, cap, NCCL_PTR_CUDA).unwrap();
    let waiter = Waiter::new();

    // Every request slot first carries a 4 KiB message with no kernel running.
    let small = pattern(4096, 1);
    // SAFETY: src holds cap >= 4096 bytes.
    unsafe { result::memcpy_htod_sync(src.ptr, &small) }.unwrap();
    for k in 0..16 {
        let r = p.irecv(pair.recv, dst.ptr as *mut u8, cap, rmh).unwrap();
        let s = p.isend(pair.send, src.ptr as *const u8, 4096, smh).unwrap();
        p.wait_both(s, r).unwrap();
        assert!(gather(&h, k, 4096) == small, "4 KiB message {k}");
        assert_eq!(p.consume(pair.recv, r), 0);
    }

    // Then larger ones on the same slots, sizes not multiples of a page among them, while the GPU
    // is busy with a kernel that waits for them. The data goes in before the kernel starts.
    let sizes = [256 << 10, (1 << 20) + 4095, 17, 4 << 20];
    let mut offsets = Vec::new();
    let mut at = 0usize;
    for &size in &sizes {
        offsets.push(at);
        at += size;
    }
    let all = pattern(at, 2);
    let src2 = DeviceBuf::new(at);
    // SAFETY: src2 holds at bytes.
    unsafe { result::memcpy_htod_sync(src2.ptr, &all) }.unwrap();
    let smh2 = p.reg(pair.send, src2.ptr as *const u8, at.div_ceil(4096) * 4096, NCCL_PTR_CUDA).unwrap();

    waiter.launch();
    let started = Instant::now();
    let mut receives = Vec::new();
    for (&size, &off) in sizes.iter().zip(&offsets) {
        let r = p.irecv(pair.recv, dst.ptr as *mut u8, cap, rmh).unwrap();
        let s = p.isend(pair.send, (src2.ptr as usize + off) as *const u8, size, smh2).unwrap();
        p.wait_both(s, r).unwrap();
        receives.push(r);
    }
    let took = started.elapsed();
    let still_waiting = waiter.release();
    assert!(
        still_waiting,
        "the transfers completed only after the waiting kernel gave up ({took:?}): a call inside the plugin \
         waited for the GPU to go idle, which deadlocks a consumer whose kernels wait for the plugin (NCCL)"
    );

    // Every byte arrived: slots 0..4 again (requests 16..20).
    for (i, (&size, &off)) in sizes.iter().zip(&offsets).enumerate() {
        assert!(gather(&h, i, size) == all[off..off + size], "message of {size} B differs");
    }
    for r in receives {
        assert_eq!(p.consume(pair.recv, r), 0);
    }

    // The staging is fixed at connect: a device send larger than it is refused at isend (no
    // receive could take it: more than 2048 fragments).
    let big = (16 << 20) + 4096;
    let huge = DeviceBuf::new(big);
    let hmh = p.reg(pair.send, huge.ptr as *const u8, big, NCCL_PTR_CUDA).unwrap();
    assert_eq!(p.isend(pair.send, huge.ptr as *const u8, big, hmh), Err(NCCL_INTERNAL_ERROR));
    common::assert_warned("send staging");
}
