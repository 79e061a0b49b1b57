//! GPU mode (FAKE_TCPX_MODE=gpu): pool and unpack handle in device memory, metadata in mapped pinned
//! memory, and every data socket steered into device memory, so a host receive fails its comm.
//! Needs a CUDA driver and a GPU; without one the GPU tests report themselves skipped (a failure
//! where UCCL_TCPX_REQUIRE_GPU=1 says the host has one) and only the init failure is checked.

mod common;

use common::{Plugin, assert_warned, pattern};
use cudarc::driver::{result, sys};
use uccl_tcpx::internal::ncclnet::*;

/// Whether GPU test `name` returns without running: the parent decides (see `common::no_gpu`), and
/// its child then runs the test.
fn skip_without_gpu(name: &str) -> bool {
    !testkit::child::is_child(name) && common::no_gpu()
}

/// Makes device 0's primary context current, as a consumer does before it calls the plugin.
fn use_gpu_0() {
    use_gpu(0);
}

/// Makes device `n`'s primary context current on the calling thread.
fn use_gpu(n: i32) {
    uccl_tcpx::internal::cuda::driver().expect("cuInit");
    let dev = result::device::get(n).unwrap();
    // SAFETY: dev is a device the driver (initialised by cuInit) reported.
    let ctx = unsafe { result::primary_ctx::retain(dev) }.unwrap();
    // SAFETY: ctx was just retained and stays retained for the rest of the process.
    unsafe { result::ctx::set_current(ctx) }.unwrap();
}

/// Leaves the calling thread with no current context, as a thread that never touched CUDA has.
fn use_no_gpu() {
    // SAFETY: cuCtxSetCurrent(NULL) unbinds the calling thread's context; nothing is freed.
    let rc = unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) };
    assert_eq!(rc, sys::CUresult::CUDA_SUCCESS);
}

/// Whether a test needing `n` GPUs must stand down: fewer are visible (it says so). Single-GPU
/// hosts run the GPU suite too, so this is a skip even where GPUs are required.
fn fewer_gpus_than(n: usize) -> bool {
    uccl_tcpx::internal::cuda::driver().expect("cuInit");
    let count = result::device::get_count().unwrap() as usize;
    if count < n {
        println!("SKIPPED: needs {n} GPUs, {count} visible");
    }
    count < n
}

/// In the parent: runs test `name` in a child with `env` and a topology of one NIC per GPU, device
/// `n` (`nicNN`) serving GPU `n` alone, so that a test moving data with several GPUs knows which
/// device each may use; returns true. In that child: returns false.
fn spawn_with_a_nic_per_gpu(name: &str, env: &[(&str, &str)]) -> bool {
    if testkit::child::is_child(name) {
        return false;
    }
    uccl_tcpx::internal::cuda::driver().expect("cuInit");
    let count = result::device::get_count().unwrap();
    let nics: Vec<String> = (0..count)
        .map(|n| {
            let bus_id = uccl_tcpx::internal::cuda::Gpu::open(n).unwrap().bus_id().to_owned();
            let root = 0xe0 + n;
            format!("nic{n:02} /sys/devices/pci0000:{root:02x}/0000:{root:02x}:00.0 {bus_id}")
        })
        .collect();
    let topology = nics.join("; ");
    let mut all = env.to_vec();
    all.push(("FAKE_TCPX_TOPOLOGY", &topology));
    common::spawn_in_child(name, &all)
}

/// The GPU whose device memory `ptr` is.
fn gpu_of(ptr: u64) -> i32 {
    let mut ordinal: i32 = -1;
    // SAFETY: DEVICE_ORDINAL writes one int; ptr is device memory of a live allocation.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            sys::CUpointer_attribute_enum::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    assert_eq!(rc, sys::CUresult::CUDA_SUCCESS);
    ordinal
}

/// The unpack handle of a receive comm, read from device memory once, as a consumer reads it.
fn unpack_handle(pair: &common::Pair) -> UnpackDeviceHandle {
    let mut raw = [0u8; 24];
    // SAFETY: the receive comm's device handle is a live 24-byte UnpackDeviceHandle in device memory, the
    // size of raw; the primary context is current (use_gpu_0).
    unsafe { result::memcpy_dtoh_sync(&mut raw, pair.dev_handle.handle as sys::CUdeviceptr) }.unwrap();
    // SAFETY: raw holds 24 bytes, the size of UnpackDeviceHandle, whose fields are plain integers and
    // pointers (any bits are valid); read_unaligned as raw is a byte array.
    unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) }
}

/// The `size` bytes of the receive in `slot`, gathered from the device pool along its loadMeta list.
fn gather(h: &UnpackDeviceHandle, slot: usize, size: usize, pool_bytes: usize) -> Vec<u8> {
    let (meta, pool) = (h.meta, h.bounce_buf as sys::CUdeviceptr);
    // SAFETY: meta is the receive comm's mapped pinned NetUnpackMeta (with unified addressing its device
    // pointer is the host pointer), live while the comm is; the fake updates cnt atomically, hence the atomic
    // view; slot < 16.
    let cnt = unsafe { std::sync::atomic::AtomicU64::from_ptr(std::ptr::addr_of_mut!((*meta).cnt[slot])) }
        .load(std::sync::atomic::Ordering::Acquire) as usize;
    assert!(cnt <= 2048);
    let mut got = vec![0u8; size];
    let mut covered = 0usize;
    for i in 0..cnt {
        // SAFETY: i < cnt <= 2048, the size of mem[slot], and meta is the comm's live mapped NetUnpackMeta;
        // the fake finished writing these entries before publishing cnt with Release.
        let m = unsafe { std::ptr::addr_of!((*meta).mem[slot][i]).read() };
        let (so, len, dofs) = (m.src_off as usize, m.len as usize, m.dst_off as usize);
        assert!(dofs + len <= size && so + len <= pool_bytes, "{m:?}");
        // SAFETY: dofs + len <= size and so + len <= pool_bytes (asserted above), so the copy stays inside
        // got and the comm's device bounce pool.
        unsafe { result::memcpy_dtoh_sync(&mut got[dofs..dofs + len], pool + so as u64) }.unwrap();
        covered += len;
    }
    assert_eq!(covered, size);
    got
}

#[test]
fn gpu_mode_needs_a_driver() {
    if uccl_tcpx::internal::cuda::available() {
        println!("SKIPPED: a CUDA driver is present");
        return;
    }
    if common::spawn_in_child("gpu_mode_needs_a_driver", &[("FAKE_TCPX_MODE", "gpu")]) {
        return;
    }
    let p = Plugin::load();
    // SAFETY: a fresh plugin with no init yet; the logger is this test's own.
    assert_eq!(unsafe { p.t.init.unwrap()(common::logger()) }, NCCL_INTERNAL_ERROR);
    assert_warned("CUDA unavailable");
}

/// A device buffer whose usable part starts on a 4 KiB boundary (CUDA regMr requires it), on the
/// GPU current when it was made.
struct DeviceBuf {
    raw: sys::CUdeviceptr,
    ptr: sys::CUdeviceptr,
    ctx: sys::CUcontext,
}

impl DeviceBuf {
    fn new(len: usize, fill: u8) -> DeviceBuf {
        let ctx = result::ctx::get_current().unwrap().expect("a GPU is current");
        // SAFETY: cuMemAlloc only allocates; the tests make a primary context current (use_gpu) first.
        let raw = unsafe { result::malloc_sync(len + 8192) }.unwrap();
        // SAFETY: raw was just allocated with len + 8192 bytes.
        unsafe { result::memset_d8_sync(raw, fill, len + 8192) }.unwrap();
        DeviceBuf { raw, ptr: (raw + 4095) & !4095, ctx }
    }
    fn host(&self) -> *const u8 {
        self.ptr as *const u8
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if len > 0 {
            // SAFETY: len > 0 and every caller reads inside the usable len bytes after ptr, which leave the
            // allocation's 8192 spare bytes as room for rounding ptr up.
            unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr + off as u64) }.unwrap();
        }
        out
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: ctx is the primary context raw was allocated in, retained for the whole process; it is
        // popped again below.
        assert_eq!(unsafe { sys::cuCtxPushCurrent_v2(self.ctx) }, sys::CUresult::CUDA_SUCCESS);
        // SAFETY: raw came from cuMemAlloc in new() and is freed once, here, in its own context, after the
        // test's transfers into it completed.
        unsafe { result::free_sync(self.raw) }.unwrap();
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

fn round_up(n: usize) -> usize {
    n.div_ceil(4096).max(1) * 4096
}

#[test]
fn gpu_mode_transfer() {
    transfer_in_gpu_mode("gpu_mode_transfer", "kernel");
}

/// The same with the receive's copies as one cuMemcpyBatchAsync.
#[test]
fn gpu_mode_transfer_batching_copies() {
    transfer_in_gpu_mode("gpu_mode_transfer_batching_copies", "batch");
}

/// The same with one copy per run of fragments instead of one batch per receive.
#[test]
fn gpu_mode_transfer_copying_each_fragment() {
    transfer_in_gpu_mode("gpu_mode_transfer_copying_each_fragment", "each");
}

fn transfer_in_gpu_mode(name: &str, copy: &str) {
    if skip_without_gpu(name) {
        return;
    }
    let env = [
        ("FAKE_TCPX_MODE", "gpu"),
        ("FAKE_TCPX_FRAGMENT", "random"),
        ("FAKE_TCPX_POOL_MIB", "32"),
        ("FAKE_TCPX_GPU_COPY", copy),
    ];
    if common::spawn_in_child(name, &env) {
        return;
    }
    use_gpu_0();
    let p = Plugin::init();
    let pair = p.pair(0);
    // The unpack handle lives in device memory: read it as a consumer would, once.
    let h = unpack_handle(&pair);
    assert_eq!(h.head, u64::MAX);
    assert!(!h.meta.is_null() && !h.bounce_buf.is_null());
    // meta is mapped pinned memory: with unified addressing its device pointer is the host pointer.
    let meta = h.meta;

    let cap = 4 << 20;
    let dst = DeviceBuf::new(cap, 0xEE);
    let rmh = p.reg(pair.recv, dst.host(), cap, NCCL_PTR_CUDA).unwrap();
    let sizes = [0usize, 1, 4095, 3 * 4096 + 17, 1 << 20, 4 << 20];
    for (k, &size) in sizes.iter().enumerate() {
        let data = pattern(size, k as u64);
        // Device senders (copied to the host by the fake) and host senders alternate.
        let src = DeviceBuf::new(round_up(size), 0);
        let (sptr, smh) = if k % 2 == 0 {
            if size > 0 {
                // SAFETY: src was allocated with round_up(size) >= size bytes and data has size bytes.
                unsafe { result::memcpy_htod_sync(src.ptr, &data) }.unwrap();
            }
            (src.host(), p.reg(pair.send, src.host(), round_up(size), NCCL_PTR_CUDA).unwrap())
        } else {
            (data.as_ptr(), p.reg(pair.send, data.as_ptr(), size, NCCL_PTR_HOST).unwrap())
        };
        let r = p.irecv(pair.recv, dst.host() as *mut u8, cap, rmh).unwrap();
        let s = p.isend(pair.send, sptr, size, smh).unwrap();
        p.wait_both(s, r).unwrap();
        let slot = k % 16;
        let got = gather(&h, slot, size, 32 << 20);
        // SAFETY: meta is the receive comm's live mapped NetUnpackMeta, updated atomically by the fake; slot
        // < 16.
        let cnt = unsafe { std::sync::atomic::AtomicU64::from_ptr(std::ptr::addr_of_mut!((*meta).cnt[slot])) }
            .load(std::sync::atomic::Ordering::Acquire) as usize;
        // The metadata is device-mapped: what a kernel reads through `meta` is what the host sees.
        let mut via_device = [0u64; 1];
        let cnt_off = std::mem::offset_of!(NetUnpackMeta, cnt) + slot * 8;
        // SAFETY: cnt[slot] is 8 bytes inside the comm's live mapped NetUnpackMeta (its device address equals
        // its host one).
        unsafe { result::memcpy_dtoh_sync(&mut via_device, meta as sys::CUdeviceptr + cnt_off as u64) }.unwrap();
        assert_eq!(via_device[0] as usize, cnt);
        if cnt > 0 {
            let mut first = [0u8; 16];
            let mem_off = slot * 2048 * 16;
            // SAFETY: mem[slot][0] is 16 bytes inside the comm's live mapped NetUnpackMeta (its device
            // address equals its host one).
            unsafe { result::memcpy_dtoh_sync(&mut first, meta as sys::CUdeviceptr + mem_off as u64) }.unwrap();
            // SAFETY: cnt > 0, so mem[slot][0] was written and published before the receive completed; meta
            // is the comm's live mapped NetUnpackMeta.
            let host = unsafe { std::ptr::addr_of!((*meta).mem[slot][0]).read() };
            assert_eq!(u32::from_le_bytes(first[0..4].try_into().unwrap()), host.src_off);
            assert_eq!(u64::from_le_bytes(first[8..16].try_into().unwrap()), host.dst_off);
        }
        assert!(got == data, "size {size}: bytes gathered from the device pool differ");
        assert!(dst.read(0, size.min(8192)).iter().all(|b| *b == 0xEE), "the posted buffer is never written");
        assert_eq!(p.consume(pair.recv, r), 0);
        // SAFETY: pair.send is this plugin's live send comm and smh its live registration on it (the fake
        // looks both up in its registry anyway).
        assert_eq!(unsafe { p.t.dereg_mr.unwrap()(pair.send, smh) }, 0);
    }
    // A batch copy the driver offers must have worked: a failed one falls back with a warning.
    let warnings = common::take_warnings();
    assert!(!warnings.iter().any(|w| w.contains("cuMemcpyBatchAsync")), "{warnings:?}");

    // In GPU mode a CUDA registration must be device memory.
    let host = common::Aligned::new(4096);
    assert_eq!(p.reg(pair.send, host.ptr(), 4096, NCCL_PTR_CUDA), Err(NCCL_INTERNAL_ERROR));
    assert_warned("not device memory");
    for (f, c) in [(p.t.close_send, pair.send), (p.t.close_recv, pair.recv), (p.t.close_listen, pair.listen)] {
        // SAFETY: each comm of the pair is live and closed once, with the close of its own kind.
        assert_eq!(unsafe { f.unwrap()(c) }, 0);
    }
}

/// Posts one receive into host memory registered as HOST on a GPU-mode receive comm and sends
/// 100 000 bytes to it: the rc of the refused irecv, or the bytes gathered (and checked) from the
/// device pool.
fn host_receive_in_gpu_mode() -> Result<Vec<u8>, i32> {
    use_gpu_0();
    let p = Plugin::init();
    let pair = p.pair(0);
    let h = unpack_handle(&pair);
    let data = pattern(100_000, 9);
    let smh = p.reg(pair.send, data.as_ptr(), data.len(), NCCL_PTR_HOST).unwrap();
    // Registering host memory on a receive comm is fine: TCPX records the pointer.
    let mut host = vec![0u8; data.len()];
    let hmh = p.reg(pair.recv, host.as_mut_ptr(), host.len(), NCCL_PTR_HOST).unwrap();
    let s = p.isend(pair.send, data.as_ptr(), data.len(), smh).unwrap();
    let r = match p.irecv(pair.recv, host.as_mut_ptr(), host.len(), hmh) {
        Ok(r) => r,
        Err(rc) => {
            assert_warned("requested receive on host mem buffer");
            // The comm has failed: a device receive posted after it never completes either.
            let dst = DeviceBuf::new(data.len(), 0);
            let dmh = p.reg(pair.recv, dst.host(), round_up(data.len()), NCCL_PTR_CUDA).unwrap();
            let r = p.irecv(pair.recv, dst.host() as *mut u8, data.len(), dmh).unwrap();
            assert_eq!(p.wait_both(s, r), Err(NCCL_INTERNAL_ERROR));
            assert_warned("host mem buffer");
            return Err(rc);
        }
    };
    p.wait_both(s, r).unwrap();
    let got = gather(&h, 0, data.len(), 1 << 30);
    assert_eq!(p.consume(pair.recv, r), 0);
    assert!(got == data, "bytes gathered from the device pool differ");
    Ok(got)
}

#[test]
fn gpu_mode_host_receive_fails_the_comm() {
    let name = "gpu_mode_host_receive_fails_the_comm";
    if skip_without_gpu(name) || common::spawn_in_child(name, &[("FAKE_TCPX_MODE", "gpu")]) {
        return;
    }
    // TCPX steered every data socket into device memory at accept: a plain recv() cannot read it.
    assert_eq!(host_receive_in_gpu_mode().err(), Some(NCCL_INTERNAL_ERROR));
}

#[test]
fn gpu_mode_host_receive_allowed_by_knob() {
    let env = [("FAKE_TCPX_MODE", "gpu"), ("FAKE_TCPX_HOST_RECV", "allow")];
    let name = "gpu_mode_host_receive_allowed_by_knob";
    if skip_without_gpu(name) || common::spawn_in_child(name, &env) {
        return;
    }
    // Let through, the receive lands in the device pool like every other.
    assert_eq!(host_receive_in_gpu_mode().map(|got| got.len()), Ok(100_000));
}

/// Sends `data` from host memory over `pair` into a receive registered as CUDA memory at `dst`,
/// without consuming it: the receive request.
fn receive_held(p: &Plugin, pair: &common::Pair, data: &[u8], dst: &DeviceBuf, cap: usize) -> *mut std::ffi::c_void {
    let smh = p.reg(pair.send, data.as_ptr(), data.len(), NCCL_PTR_HOST).unwrap();
    let rmh = p.reg(pair.recv, dst.host(), cap, NCCL_PTR_CUDA).unwrap();
    let r = p.irecv(pair.recv, dst.host() as *mut u8, data.len(), rmh).unwrap();
    let s = p.isend(pair.send, data.as_ptr(), data.len(), smh).unwrap();
    p.wait_both(s, r).unwrap();
    r
}

#[test]
fn gpu_mode_one_pool_per_gpu_shared_by_its_comms() {
    let name = "gpu_mode_one_pool_per_gpu_shared_by_its_comms";
    // 1 MiB = 256 pages per GPU.
    let env = [("FAKE_TCPX_MODE", "gpu"), ("FAKE_TCPX_POOL_MIB", "1")];
    if skip_without_gpu(name) || spawn_with_a_nic_per_gpu(name, &env) {
        return;
    }
    use_gpu_0();
    let p = Plugin::init();
    let (x, y) = (p.pair(0), p.pair(0));
    let (hx, hy) = (unpack_handle(&x), unpack_handle(&y));
    assert_eq!(hx.bounce_buf, hy.bounce_buf, "both receive comms of GPU 0 hand out its one pool");
    assert_eq!(gpu_of(hx.bounce_buf as u64), 0, "the pool is GPU 0's memory");
    let cap = 256 * 4096;
    let (dx, dy) = (DeviceBuf::new(cap, 0), DeviceBuf::new(cap, 0));
    let a = pattern(192 * 4096, 1);
    let b = pattern(128 * 4096, 2);

    // X holds 192 pages and does not consume: Y's 128-page receive waits, without error.
    let ra = receive_held(&p, &x, &a, &dx, cap);
    let smh = p.reg(y.send, b.as_ptr(), b.len(), NCCL_PTR_HOST).unwrap();
    let rmh = p.reg(y.recv, dy.host(), cap, NCCL_PTR_CUDA).unwrap();
    let rb = p.irecv(y.recv, dy.host() as *mut u8, b.len(), rmh).unwrap();
    let sb = p.isend(y.send, b.as_ptr(), b.len(), smh).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
    let mut sent = false;
    while std::time::Instant::now() < until {
        assert_eq!(p.test(rb), Ok(false), "Y waits while X holds the pages it needs");
        if !sent {
            sent = p.test(sb).unwrap();
        }
    }
    assert!(common::take_warnings().is_empty(), "waiting for pages is not an error");
    assert!(gather(&hx, 0, a.len(), cap) == a, "X's pages are intact while it holds them");
    assert_eq!(p.consume(x.recv, ra), 0);
    if sent {
        p.wait(rb).unwrap();
    } else {
        p.wait_both(sb, rb).unwrap();
    }
    assert!(gather(&hy, 0, b.len(), cap) == b);
    assert_eq!(p.consume(y.recv, rb), 0);

    if fewer_gpus_than(2) {
        return;
    }
    // Another GPU has a pool of its own, which GPU 0's hoarder does not drain.
    let held = receive_held(&p, &x, &a, &dx, cap);
    use_gpu(1);
    let z = p.pair(1);
    let hz = unpack_handle(&z);
    assert_ne!(hz.bounce_buf, hx.bounce_buf);
    assert_eq!(gpu_of(hz.bounce_buf as u64), 1, "a comm accepted with GPU 1 current gets GPU 1's pool");
    let dz = DeviceBuf::new(cap, 0);
    let c = pattern(200 * 4096, 3);
    let rc = receive_held(&p, &z, &c, &dz, cap);
    assert!(gather(&hz, 0, c.len(), cap) == c);
    assert_eq!(p.consume(z.recv, rc), 0);
    use_gpu_0();
    assert_eq!(p.consume(x.recv, held), 0);
}

#[test]
fn gpu_mode_comms_need_a_current_gpu() {
    let name = "gpu_mode_comms_need_a_current_gpu";
    if skip_without_gpu(name) || common::spawn_in_child(name, &[("FAKE_TCPX_MODE", "gpu")]) {
        return;
    }
    // A thread that never made a GPU current: TCPX's cudaGetDevice() would answer 0 for it.
    let p = Plugin::init();
    let mut handle = [0u8; 128];
    let mut lc = std::ptr::null_mut();
    // SAFETY: handle is a 128-byte buffer and lc a writable local.
    let rc = unsafe { p.t.listen.unwrap()(0, handle.as_mut_ptr().cast(), &mut lc) };
    assert_eq!(rc, NCCL_INTERNAL_ERROR);
    assert_warned("listen with no CUDA context current");

    use_gpu_0();
    let (handle, lc) = p.listen(0);
    let dev = DeviceBuf::new(4096, 0);
    use_no_gpu();
    let mut h = handle;
    let mut sc = std::ptr::null_mut();
    // SAFETY: h is the handle listen wrote, sc a writable local.
    let rc = unsafe { p.t.connect.unwrap()(0, h.as_mut_ptr().cast(), &mut sc, std::ptr::null_mut()) };
    assert_eq!(rc, NCCL_INTERNAL_ERROR);
    assert_warned("connect with no CUDA context current");
    let mut dh = NcclNetDeviceHandleV7::default();
    let mut dhp: *mut NcclNetDeviceHandleV7 = &mut dh;
    let mut rcomm = std::ptr::null_mut();
    // SAFETY: lc came from listen; rcomm is a writable local and dhp points at dh.
    assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rcomm, &mut dhp) }, NCCL_INTERNAL_ERROR);
    assert_warned("accept with no CUDA context current");
    // SAFETY: lc came from listen and no accept is running; closed once.
    assert_eq!(unsafe { p.t.close_listen.unwrap()(lc) }, 0);

    // Nothing was started: with the GPU current everything works, and a CUDA regMr still needs it.
    use_gpu_0();
    let pair = p.pair(0);
    use_no_gpu();
    assert_eq!(p.reg(pair.send, dev.host(), 4096, NCCL_PTR_CUDA), Err(NCCL_INTERNAL_ERROR));
    assert_warned("CUDA regMr with no CUDA context current");
    let host = [0u8; 64];
    assert!(p.reg(pair.send, host.as_ptr(), 64, NCCL_PTR_HOST).is_ok(), "a HOST regMr binds no GPU");
    use_gpu_0();
    assert!(p.reg(pair.send, dev.host(), 4096, NCCL_PTR_CUDA).is_ok());
}

#[test]
fn gpu_mode_comms_bind_to_the_gpu_current_when_made() {
    let name = "gpu_mode_comms_bind_to_the_gpu_current_when_made";
    if skip_without_gpu(name) || spawn_with_a_nic_per_gpu(name, &[("FAKE_TCPX_MODE", "gpu")]) {
        return;
    }
    if fewer_gpus_than(2) {
        return;
    }
    let p = Plugin::init();
    // Listen on GPU 0, accept on GPU 1: TCPX would steer into GPU 0's pool and hand out GPU 1's.
    use_gpu_0();
    let (_, lc) = p.listen(1);
    use_gpu(1);
    let mut dh = NcclNetDeviceHandleV7::default();
    let mut dhp: *mut NcclNetDeviceHandleV7 = &mut dh;
    let mut rcomm = std::ptr::null_mut();
    // SAFETY: lc came from listen; rcomm is a writable local and dhp points at dh.
    assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rcomm, &mut dhp) }, NCCL_INTERNAL_ERROR);
    let warnings = common::take_warnings();
    assert!(
        warnings.iter().any(|w| w.contains("accept with GPU 1 current on a listen comm made with GPU 0 current")),
        "{warnings:?}"
    );
    // SAFETY: lc came from listen and no accept is running; closed once.
    assert_eq!(unsafe { p.t.close_listen.unwrap()(lc) }, 0);

    // A pair made with GPU 1 current over its NIC: its pool is GPU 1's, and receives into GPU 1
    // memory work.
    let pair = p.pair(1);
    let h = unpack_handle(&pair);
    assert_eq!(gpu_of(h.bounce_buf as u64), 1);
    let cap = 64 * 4096;
    let on_1 = DeviceBuf::new(cap, 0);
    let data = pattern(100_000, 4);
    let r = receive_held(&p, &pair, &data, &on_1, cap);
    assert!(gather(&h, 0, data.len(), 1 << 30) == data);
    assert_eq!(p.consume(pair.recv, r), 0);

    // GPU 0's memory registers on that receive comm, as in TCPX, but a receive into it fails: the
    // pool is mapped for GPU 1 alone, so GPU 0 could not unpack it.
    use_gpu_0();
    let on_0 = DeviceBuf::new(cap, 0);
    let mh = p.reg(pair.recv, on_0.host(), cap, NCCL_PTR_CUDA).expect("TCPX registers any GPU's memory");
    assert_eq!(p.irecv(pair.recv, on_0.host() as *mut u8, cap, mh), Err(NCCL_INTERNAL_ERROR));
    assert_warned("receive into memory of GPU 0 on a receive comm bound to GPU 1");

    // A send from GPU 0's memory over a send comm bound to GPU 1 works (TCPX makes the dma-buf
    // for the memory's own GPU).
    // SAFETY: on_0 holds cap >= data.len() bytes.
    unsafe { result::memcpy_htod_sync(on_0.ptr, &data) }.unwrap();
    let smh = p.reg(pair.send, on_0.host(), cap, NCCL_PTR_CUDA).unwrap();
    use_gpu(1);
    let rmh = p.reg(pair.recv, on_1.host(), cap, NCCL_PTR_CUDA).unwrap();
    let r = p.irecv(pair.recv, on_1.host() as *mut u8, data.len(), rmh).unwrap();
    let s = p.isend(pair.send, on_0.host(), data.len(), smh).unwrap();
    p.wait_both(s, r).unwrap();
    assert!(gather(&h, 1, data.len(), 1 << 30) == data);
    assert_eq!(p.consume(pair.recv, r), 0);
}

#[test]
fn gpu_mode_devices_sit_next_to_their_gpus() {
    let name = "gpu_mode_devices_sit_next_to_their_gpus";
    // The default topology, eth0 included.
    let env = [("FAKE_TCPX_MODE", "gpu"), ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "")];
    if skip_without_gpu(name) || common::spawn_in_child(name, &env) {
        return;
    }
    let p = Plugin::init();
    let devices: Vec<(String, String)> = {
        let mut n = 0;
        // SAFETY: n is a writable local.
        assert_eq!(unsafe { p.t.devices.unwrap()(&mut n) }, 0);
        (0..n)
            .map(|d| {
                let mut props = NcclNetPropertiesV7::default();
                // SAFETY: props is a writable local; d < n.
                assert_eq!(unsafe { p.t.get_properties.unwrap()(d, &mut props) }, 0);
                // SAFETY: getProperties wrote pointers to its static NUL-terminated strings.
                let text =
                    |s: *mut std::ffi::c_char| unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy().into_owned();
                (text(props.name), text(props.pci_path))
            })
            .collect()
    };
    println!("devices: {devices:?}");
    assert_eq!(devices[0].0, "eth0");
    let root = |path: &str| path.split('/').find(|c| c.starts_with("pci")).unwrap_or_default().to_owned();
    let count = result::device::get_count().unwrap();
    for n in 0..count {
        let gpu = uccl_tcpx::internal::cuda::Gpu::open(n).unwrap();
        let Some(path) = gpu.sysfs_path() else {
            println!("GPU {n} ({}) has no sysfs path: its NIC sits under a root of its bus", gpu.bus_id());
            continue;
        };
        assert_ne!(root(&devices[0].1), root(&path), "eth0 shares no PCI root with GPU {n}");
        let parent = path.rsplit_once('/').unwrap().0;
        let next: Vec<usize> =
            (1..devices.len()).filter(|&d| devices[d].1.rsplit_once('/').unwrap().0 == parent).collect();
        assert!(!next.is_empty(), "no NIC next to GPU {n} at {path}: {devices:?}");

        // A receive into GPU n's memory over its own NIC works.
        use_gpu(n);
        let pair = p.pair(next[0] as i32);
        let h = unpack_handle(&pair);
        let cap = 64 * 4096;
        let dst = DeviceBuf::new(cap, 0);
        let data = pattern(100_000, n as u64);
        let r = receive_held(&p, &pair, &data, &dst, cap);
        assert!(gather(&h, 0, data.len(), 1 << 30) == data, "GPU {n} over device {}", next[0]);
        assert_eq!(p.consume(pair.recv, r), 0);
    }
}

/// Receives 100 000 bytes into GPU 0's memory over device `dev`, which must not steer them there:
/// the process exits as TCPX does, with `needle` in its output.
fn unsteered_receive_exits(name: &str, env: &[(&str, &str)], dev: i32, needle: &str) {
    if skip_without_gpu(name) {
        return;
    }
    if let Some((status, text)) = common::child_outcome(name, env) {
        assert_eq!(status.code(), Some(1), "the child should have exited with status 1:\n{text}");
        assert!(text.contains("data landed on host memory") && text.contains(needle), "{text}");
        return;
    }
    use_gpu_0();
    let p = Plugin::init();
    let pair = p.pair(dev);
    let dst = DeviceBuf::new(64 * 4096, 0);
    let r = receive_held(&p, &pair, &pattern(100_000, 1), &dst, 64 * 4096);
    panic!("a receive over device {dev} completed ({r:p}) where TCPX exits the process");
}

#[test]
fn gpu_mode_receive_over_eth0_exits() {
    let env = [("FAKE_TCPX_MODE", "gpu"), ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "")];
    unsteered_receive_exits("gpu_mode_receive_over_eth0_exits", &env, 0, "(eth0) has no devmem rx queues");
}

#[test]
fn gpu_mode_receive_over_another_gpus_nic_exits() {
    // A NIC whose queues serve a GPU this host does not have, never GPU 0.
    let env =
        [("FAKE_TCPX_MODE", "gpu"), ("FAKE_TCPX_TOPOLOGY", "nic /sys/devices/pci0000:e0/0000:e0:00.0 ffff:ff:1f.7")];
    unsteered_receive_exits("gpu_mode_receive_over_another_gpus_nic_exits", &env, 0, "bound to the pools of GPUs");
}
