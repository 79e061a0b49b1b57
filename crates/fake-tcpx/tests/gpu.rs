//! GPU mode (FAKE_TCPX_MODE=gpu): pool and unpack handle in device memory, metadata in mapped pinned
//! memory, and every data socket steered into device memory, so a host receive fails its comm.
//! Needs a CUDA driver and a GPU; without one the GPU tests report themselves skipped (a failure
//! where UCCL_TCPX_REQUIRE_GPU=1 says the host has one) and only the init failure is checked.

mod common;

use common::{Plugin, assert_warned, pattern};
use cudarc::driver::{result, sys};
use uccl_tcpx::ncclnet::*;

/// Whether GPU test `name` returns without running: the parent decides (see `common::no_gpu`), and
/// its child then runs the test.
fn skip_without_gpu(name: &str) -> bool {
    !testkit::child::is_child(name) && common::no_gpu()
}

/// Makes device 0's primary context current, as a consumer does before it calls the plugin.
fn use_gpu_0() {
    uccl_tcpx::cuda::driver().expect("cuInit");
    let dev = result::device::get(0).unwrap();
    // SAFETY: dev is device 0, which the driver just initialised (cuInit) reported.
    let ctx = unsafe { result::primary_ctx::retain(dev) }.unwrap();
    // SAFETY: ctx was just retained and stays retained for the rest of the process.
    unsafe { result::ctx::set_current(ctx) }.unwrap();
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
    if uccl_tcpx::cuda::available() {
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

/// A device buffer whose usable part starts on a 4 KiB boundary (CUDA regMr requires it).
struct DeviceBuf {
    raw: sys::CUdeviceptr,
    ptr: sys::CUdeviceptr,
}

impl DeviceBuf {
    fn new(len: usize, fill: u8) -> DeviceBuf {
        // SAFETY: cuMemAlloc only allocates; the tests make the primary context current (use_gpu_0) first.
        let raw = unsafe { result::malloc_sync(len + 8192) }.unwrap();
        // SAFETY: raw was just allocated with len + 8192 bytes.
        unsafe { result::memset_d8_sync(raw, fill, len + 8192) }.unwrap();
        DeviceBuf { raw, ptr: (raw + 4095) & !4095 }
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
        // SAFETY: raw came from cuMemAlloc in new() and is freed once, here, after the test's transfers into
        // it completed.
        unsafe { result::free_sync(self.raw) }.unwrap();
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
        ("FAKE_TCPX_POOL_MB", "32"),
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
    let got = gather(&h, 0, data.len(), 64 << 20);
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
