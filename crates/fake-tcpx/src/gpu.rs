//! GPU mode: receive memory where TCPX has it. The bounce pool and the `unpackNetDeviceHandle` are
//! device memory (`cuMemAlloc`), `netUnpackMeta` is mapped pinned host memory
//! (`cuMemHostAlloc(DEVICEMAP | PORTABLE)`, cached, read by GPU kernels over PCIe). Received bytes
//! are staged in pinned host memory and copied into their scattered pool pages before `test` can
//! report the receive done. By default the whole message goes to device scratch memory in one copy
//! and a small kernel scatters it into the pages: one copy-engine operation per 4 KiB page (even
//! batched with `cuMemcpyBatchAsync`) made GPU mode 8-10x slower than the staged path. Then one
//! stream synchronisation. Sends from CUDA registrations are staged by `staging.rs`.
//!
//! Every CUDA call runs with the comm's context pushed on the calling thread and popped after, so
//! the caller's current context is left as it was.

use std::any::Any;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUcontext, CUdevice, CUdeviceptr, CUstream};
use uccl_tcpx::internal::ncclnet::{LoadMeta, NetUnpackMeta, UnpackDeviceHandle};

use crate::config::GpuCopy;
use crate::fail::{Fail, Result};
use crate::fragment::{MAX_FRAGMENTS, PAGE};
use crate::memory::RxMemory;
use crate::pool::SharedPool;
use crate::topology::GpuPlace;

pub fn cuda(what: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| Fail::internal(format!("{what}: {e:?}")))
}

/// The GPU a comm is bound to, in its primary context (retained while this value lives): TCPX
/// works in each GPU's primary context (`NCCL_GPUDIRECTTCPX_CUDA_USE_PRIMARY_CTX`, default 1).
pub struct GpuContext {
    ctx: CUcontext,
    device: CUdevice,
}

// SAFETY: CUDA contexts may be used from any thread; this value only pushes/pops it.
unsafe impl Send for GpuContext {}
// SAFETY: as above; shared references only push and pop the context.
unsafe impl Sync for GpuContext {}

impl GpuContext {
    /// The GPU current on the calling thread, which TCPX binds a comm to at `call`
    /// (`gpu/cuda_wrapper.cu` `gpu_current_dev`: `cudaGetDevice`). With no context current,
    /// `cudaGetDevice` answers device 0 whatever GPU the process works on, and TCPX binds the comm
    /// (its bounce pool, its flow-steering target) there silently; the fake refuses instead.
    pub fn current(call: &str) -> Result<GpuContext> {
        uccl_tcpx::internal::cuda::driver().map_err(|e| Fail::internal(e.to_string()))?;
        let current = result::ctx::get_current().map_err(|e| Fail::internal(format!("cuCtxGetCurrent: {e:?}")))?;
        if current.is_none() {
            return Err(Fail::internal(format!(
                "{call} with no CUDA context current on the calling thread: TCPX binds the comm to \
                 cudaGetDevice() (gpu/cuda_wrapper.cu gpu_current_dev), which then answers device 0 whatever GPU \
                 this process works on. Make the GPU's context current (cudaSetDevice, cuCtxSetCurrent) around \
                 listen, connect, accept and CUDA regMr"
            )));
        }
        let mut device: CUdevice = 0;
        // SAFETY: a context is current; cuCtxGetDevice writes its device.
        cuda("cuCtxGetDevice", unsafe { sys::cuCtxGetDevice(&mut device) })?;
        GpuContext::of_device(device)
    }

    /// GPU `device`'s primary context, retained.
    pub fn of_device(device: CUdevice) -> Result<GpuContext> {
        // SAFETY: retaining a primary context of a device the driver reported (a bad ordinal fails).
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| Fail::internal(format!("cuDevicePrimaryCtxRetain({device}): {e:?}")))?;
        Ok(GpuContext { ctx, device })
    }

    /// Another reference to the same GPU.
    pub fn retain(&self) -> Result<GpuContext> {
        GpuContext::of_device(self.device)
    }

    pub fn ordinal(&self) -> i32 {
        self.device
    }

    /// The GPU's PCI bus id as sysfs spells it.
    pub fn bus_id(&self) -> Result<String> {
        bus_id(self.device)
    }

    /// Runs `f` with this context current on the calling thread.
    pub fn with<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: a valid context; popped below whatever `f` returns.
        cuda("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.ctx) })?;
        let out = f();
        let mut popped: CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        out
    }
}

impl Drop for GpuContext {
    fn drop(&mut self) {
        // SAFETY: releases the reference retained when this value was made.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

/// GPU `device`'s PCI bus id as sysfs spells it (`0000:04:00.0`): the driver writes upper-case hex
/// and a domain of varying width.
pub fn bus_id(device: CUdevice) -> Result<String> {
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: the driver writes a NUL-terminated string of at most `len` bytes into buf.
    cuda("cuDeviceGetPCIBusId", unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device) })?;
    buf[buf.len() - 1] = 0;
    // SAFETY: NUL-terminated above at the latest.
    let raw = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    let parsed = (|| {
        let (domain, rest) = raw.trim().split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (dev, function) = rest.split_once('.')?;
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        Some(format!("{:04x}:{:02x}:{:02x}.{:x}", hex(domain)?, hex(bus)?, hex(dev)?, hex(function)?))
    })();
    parsed.ok_or_else(|| Fail::internal(format!("cuDeviceGetPCIBusId({device}) gave {raw:?}")))
}

/// The GPUs the driver shows.
pub fn count() -> Result<i32> {
    let mut count = 0;
    // SAFETY: writes one int; the driver was initialised by init.
    cuda("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
    Ok(count)
}

/// Every GPU of the host and where sysfs places it, in ordinal order.
pub fn places() -> Result<Vec<GpuPlace>> {
    (0..count()?)
        .map(|d| {
            let bus_id = bus_id(d)?;
            let sysfs = std::fs::canonicalize(format!("/sys/bus/pci/devices/{bus_id}"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
            Ok(GpuPlace { bus_id, sysfs })
        })
        .collect()
}

/// The GPU whose device memory `ptr` is: a CUDA registration must name device memory in GPU mode
/// (it is read with CUDA copies), and the fake checks receives against the comm's GPU with it.
pub fn device_of_pointer(ptr: usize) -> Result<i32> {
    let attribute = |attr: sys::CUpointer_attribute, what: &str| -> Result<u32> {
        let mut value: u32 = 0;
        // SAFETY: MEMORY_TYPE and DEVICE_ORDINAL each write one 32-bit integer.
        cuda(what, unsafe { sys::cuPointerGetAttribute((&mut value as *mut u32).cast(), attr, ptr as CUdeviceptr) })
            .map_err(|e| Fail::internal(format!("CUDA regMr of {ptr:#x}, which is not device memory ({})", e.msg)))?;
        Ok(value)
    };
    let kind = attribute(sys::CUpointer_attribute_enum::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, "cuPointerGetAttribute")?;
    if kind != sys::CUmemorytype_enum::CU_MEMORYTYPE_DEVICE as u32 {
        return Err(Fail::internal(format!("CUDA regMr of {ptr:#x}, which is not device memory (type {kind})")));
    }
    let ordinal =
        attribute(sys::CUpointer_attribute_enum::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, "cuPointerGetAttribute")?;
    Ok(ordinal as i32)
}

/// GPU mode's pool memory: `bytes` zeroed bytes of device memory in the GPU's primary context, and
/// the value owning them (with a reference to the context).
pub fn device_pool(gpu: &GpuContext, bytes: usize) -> Result<(usize, Box<dyn Any + Send + Sync>)> {
    let mut owner = DevicePool { ctx: gpu.retain()?, ptr: 0 };
    let ptr = &mut owner.ptr;
    // On failure `owner` is dropped, freeing what was allocated.
    owner.ctx.with(|| {
        // SAFETY: an out-pointer to a field; the memset covers exactly the allocation.
        unsafe {
            cuda("cuMemAlloc(bounce pool)", sys::cuMemAlloc_v2(ptr, bytes))?;
            cuda("cuMemsetD8(bounce pool)", sys::cuMemsetD8_v2(*ptr, 0, bytes))
        }
    })?;
    Ok((owner.ptr as usize, Box::new(owner)))
}

/// Device memory of a pool, freed with its context current.
struct DevicePool {
    ctx: GpuContext,
    ptr: CUdeviceptr,
}

impl Drop for DevicePool {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let ptr = self.ptr;
            // SAFETY: frees what device_pool allocated, in its context.
            let _ = self.ctx.with(|| cuda("cuMemFree", unsafe { sys::cuMemFree_v2(ptr) }));
        }
    }
}

/// Staging holds the largest receive that passes the fragment limit (2048 fragments of ≤ 4 KiB).
const STAGING_BYTES: usize = MAX_FRAGMENTS * PAGE;

pub struct GpuRx {
    ctx: GpuContext,
    meta_host: *mut c_void,
    /// The GPU's bounce pool, shared with the other receive comms bound to it.
    pool: Arc<SharedPool>,
    handle: CUdeviceptr,
    staging: *mut c_void,
    batch: Option<BatchCopy>,
    scatter: Option<ScatterKernel>,
    device: CUdevice,
    /// Per receive: the merged copies, reused.
    dsts: Vec<CUdeviceptr>,
    srcs: Vec<CUdeviceptr>,
    sizes: Vec<usize>,
}

// SAFETY: owned CUDA allocations, used under the comm's lock.
unsafe impl Send for GpuRx {}

/// A receive comm's memory on GPU `gpu`, whose bounce pool is `pool`.
pub fn rx_memory(gpu: GpuContext, pool: Arc<SharedPool>, copy: GpuCopy) -> Result<Box<dyn RxMemory>> {
    let mut rx = GpuRx {
        ctx: gpu,
        meta_host: std::ptr::null_mut(),
        pool,
        handle: 0,
        staging: std::ptr::null_mut(),
        scatter: None,
        batch: match copy {
            GpuCopy::Batch | GpuCopy::Kernel => {
                let batch = BatchCopy::load();
                if batch.is_none() {
                    crate::log::info("the driver has no cuMemcpyBatchAsync: GPU mode copies fragment by fragment");
                }
                batch
            }
            GpuCopy::Each => None,
        },
        device: 0,
        dsts: Vec::new(),
        srcs: Vec::new(),
        sizes: Vec::new(),
    };
    // On failure `rx` is dropped, freeing whatever was allocated so far.
    rx.ctx.with(|| {
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        let meta_bytes = size_of::<NetUnpackMeta>();
        // SAFETY: out-pointers to locals/fields; sizes as documented.
        unsafe {
            cuda("cuCtxGetDevice", sys::cuCtxGetDevice(&mut rx.device))?;
            cuda("cuMemHostAlloc(meta)", sys::cuMemHostAlloc(&mut rx.meta_host, meta_bytes, flags))?;
            std::ptr::write_bytes(rx.meta_host.cast::<u8>(), 0, meta_bytes);
            let mut meta_dev: CUdeviceptr = 0;
            cuda("cuMemHostGetDevicePointer", sys::cuMemHostGetDevicePointer_v2(&mut meta_dev, rx.meta_host, 0))?;
            cuda("cuMemAlloc(unpack handle)", sys::cuMemAlloc_v2(&mut rx.handle, size_of::<UnpackDeviceHandle>()))?;
            let h = UnpackDeviceHandle {
                meta: meta_dev as *mut NetUnpackMeta,
                bounce_buf: rx.pool.base() as *mut c_void,
                head: u64::MAX,
            };
            cuda(
                "cuMemcpyHtoD(unpack handle)",
                sys::cuMemcpyHtoD_v2(
                    rx.handle,
                    (&h as *const UnpackDeviceHandle).cast(),
                    size_of::<UnpackDeviceHandle>(),
                ),
            )?;
            cuda(
                "cuMemHostAlloc(staging)",
                sys::cuMemHostAlloc(&mut rx.staging, STAGING_BYTES, sys::CU_MEMHOSTALLOC_PORTABLE),
            )?;
        }
        if copy == GpuCopy::Kernel {
            match ScatterKernel::new() {
                Ok(k) => rx.scatter = Some(k),
                Err(e) => crate::log::info(&format!("{}: GPU mode copies with cuMemcpyBatchAsync", e.msg)),
            }
        }
        Ok(())
    })?;
    Ok(Box::new(rx))
}

impl RxMemory for GpuRx {
    fn meta(&self) -> *mut NetUnpackMeta {
        self.meta_host.cast()
    }

    fn unpack_handle(&self) -> *mut c_void {
        self.handle as *mut c_void
    }

    fn staging(&mut self, size: usize) -> Result<*mut u8> {
        if size > STAGING_BYTES {
            return Err(Fail::internal(format!("a {size}-byte receive exceeds the {STAGING_BYTES}-byte staging")));
        }
        Ok(self.staging.cast())
    }

    fn scatter(&mut self, frags: &[LoadMeta]) -> Result<()> {
        let (staging, pool) = (self.staging as CUdeviceptr, self.pool.base() as CUdeviceptr);
        self.dsts.clear();
        self.srcs.clear();
        self.sizes.clear();
        for f in frags {
            let (src, dst, len) = (f.dst_off as usize, f.src_off as usize, f.len as usize);
            if src + len > STAGING_BYTES || dst + len > self.pool.bytes() {
                return Err(Fail::internal(format!("fragment {f:?} outside staging or pool")));
            }
            if len == 0 {
                continue;
            }
            let (src, dst) = (staging + src as CUdeviceptr, pool + dst as CUdeviceptr);
            match (self.dsts.last(), self.srcs.last(), self.sizes.last_mut()) {
                (Some(&d), Some(&s), Some(n)) if d + *n as CUdeviceptr == dst && s + *n as CUdeviceptr == src => {
                    *n += len;
                }
                _ => {
                    self.dsts.push(dst);
                    self.srcs.push(src);
                    self.sizes.push(len);
                }
            }
        }
        if self.sizes.is_empty() {
            return Ok(());
        }
        let ctx = &self.ctx;
        if let Some(kernel) = &mut self.scatter {
            let staging = self.staging;
            let (dsts, srcs, sizes) = (&self.dsts, &self.srcs, &self.sizes);
            return ctx.with(|| {
                with_stream(ctx, |stream| {
                    // SAFETY: every range was checked above; the context is current.
                    unsafe { kernel.scatter(staging, STAGING_BYTES, dsts, srcs, sizes, stream) }?;
                    // SAFETY: a stream this call holds.
                    cuda("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })
                })
            });
        }
        let device = self.device;
        let (dsts, srcs, sizes, batch) = (&mut self.dsts, &mut self.srcs, &mut self.sizes, &mut self.batch);
        ctx.with(|| {
            with_stream(ctx, |stream| {
                let batched = match batch {
                    // SAFETY: every range was checked above; staging is pinned (host pointers are valid
                    // device addresses under unified addressing) and stays untouched until the
                    // synchronize below.
                    Some(b) => match unsafe { b.copy(dsts, srcs, sizes, device, stream) } {
                        Ok(()) => true,
                        Err(e) => {
                            // Copies are idempotent: whatever part of the batch was queued is redone.
                            crate::log::warn(&format!("{}; copying fragment by fragment from now on", e.msg));
                            *batch = None;
                            false
                        }
                    },
                    None => false,
                };
                if !batched {
                    for ((&dst, &src), &len) in dsts.iter().zip(srcs.iter()).zip(sizes.iter()) {
                        // SAFETY: as above.
                        cuda("cuMemcpyHtoDAsync", unsafe {
                            sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, stream)
                        })?;
                    }
                }
                // SAFETY: a stream this call holds.
                cuda("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })
            })
        })
    }
}

/// Streams the comms borrow while they copy, per context, never destroyed. TCPX makes no CUDA
/// stream (it only allocates), and a stream's GPU memory (0.5-1 MiB) stays with the driver once
/// the stream is destroyed: comms with streams of their own left the GPU memory of the most comms
/// that ever lived at once, which an engine's closed idle channels would then seem to hold.
static STREAMS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn streams() -> std::sync::MutexGuard<'static, Vec<(usize, usize)>> {
    STREAMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stream of `ctx` that nothing else uses until [`give_stream`]; `ctx` is current.
pub fn take_stream(ctx: &GpuContext) -> Result<CUstream> {
    let key = ctx.ctx as usize;
    let idle = {
        let mut all = streams();
        all.iter().position(|&(c, _)| c == key).map(|at| all.swap_remove(at).1)
    };
    if let Some(stream) = idle {
        return Ok(stream as CUstream);
    }
    let mut stream: CUstream = std::ptr::null_mut();
    // SAFETY: an out-pointer to a local; the context is current.
    cuda("cuStreamCreate", unsafe {
        sys::cuStreamCreate(&mut stream, 1 /* non-blocking */)
    })?;
    Ok(stream)
}

/// Waits for what was queued on `stream` and gives it back for another comm; a stream whose work
/// failed is destroyed instead. NULL is a no-op; `ctx` is current.
///
/// # Safety
/// `stream` came from [`take_stream`] for `ctx` and is not used by the caller afterwards.
pub unsafe fn give_stream(ctx: &GpuContext, stream: CUstream) {
    if stream.is_null() {
        return;
    }
    // SAFETY: per the contract.
    if unsafe { sys::cuStreamSynchronize(stream) } == sys::CUresult::CUDA_SUCCESS {
        streams().push((ctx.ctx as usize, stream as usize));
    } else {
        // SAFETY: per the contract; nothing else holds it.
        let _ = unsafe { sys::cuStreamDestroy_v2(stream) };
    }
}

/// Runs `f` on a borrowed stream of `ctx`, which is current, and gives the stream back after it.
pub fn with_stream<T>(ctx: &GpuContext, f: impl FnOnce(CUstream) -> Result<T>) -> Result<T> {
    let stream = take_stream(ctx)?;
    let out = f(stream);
    // SAFETY: taken above for `ctx`, not used past this point.
    unsafe { give_stream(ctx, stream) };
    out
}

impl Drop for GpuRx {
    fn drop(&mut self) {
        let _ = self.ctx.with(|| {
            // SAFETY: frees only what this value allocated (zero/NULL fields were never allocated);
            // no copy of it is queued (each waited for its stream).
            unsafe {
                drop(self.scatter.take());
                if self.handle != 0 {
                    let _ = sys::cuMemFree_v2(self.handle);
                }
                if !self.meta_host.is_null() {
                    let _ = sys::cuMemFreeHost(self.meta_host);
                }
                if !self.staging.is_null() {
                    let _ = sys::cuMemFreeHost(self.staging);
                }
            }
            Ok(())
        });
    }
}

/// `CUmemcpyAttributes` of cuda.h (CUDA 12.8+), declared here because the bindings' version of it
/// for CUDA 13 is an opaque blob.
#[repr(C)]
struct MemcpyAttributes {
    src_access_order: u32,
    src_loc_type: u32,
    src_loc_id: i32,
    dst_loc_type: u32,
    dst_loc_id: i32,
    flags: u32,
}

const _: () = assert!(size_of::<MemcpyAttributes>() == 24);

const SRC_ACCESS_ORDER_STREAM: u32 = 1;
const LOCATION_DEVICE: u32 = 1;
const LOCATION_HOST: u32 = 2;

type BatchV2 = unsafe extern "C" fn(
    *mut CUdeviceptr,
    *mut CUdeviceptr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    CUstream,
) -> sys::CUresult;
type BatchV1 = unsafe extern "C" fn(
    *mut CUdeviceptr,
    *mut CUdeviceptr,
    *mut usize,
    usize,
    *mut MemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    CUstream,
) -> sys::CUresult;

/// `cuMemcpyBatchAsync` as the driver exports it: the CUDA 13 signature, else CUDA 12.8's (with a
/// failure index), looked up once.
#[derive(Clone, Copy)]
enum BatchCopy {
    V2(BatchV2),
    V1(BatchV1),
}

impl BatchCopy {
    fn load() -> Option<BatchCopy> {
        // SAFETY: symbol lookups in the driver library (present: GPU mode initialised the driver);
        // the types are cuda.h's prototypes of these entry points.
        unsafe {
            let lib = sys::culib();
            if let Ok(f) = lib.get::<BatchV2>(b"cuMemcpyBatchAsync_v2") {
                return Some(BatchCopy::V2(*f));
            }
            lib.get::<BatchV1>(b"cuMemcpyBatchAsync").ok().map(|f| BatchCopy::V1(*f))
        }
    }

    /// Host-to-device copies `srcs[i] -> dsts[i]` of `sizes[i]` bytes, in stream order.
    ///
    /// # Safety
    /// Every range is valid pinned host memory (source) and device memory (destination) until the
    /// stream has finished them; the three slices are equally long; the context is current.
    unsafe fn copy(
        &self,
        dsts: &mut [CUdeviceptr],
        srcs: &mut [CUdeviceptr],
        sizes: &mut [usize],
        device: CUdevice,
        stream: CUstream,
    ) -> Result<()> {
        let mut attrs = MemcpyAttributes {
            src_access_order: SRC_ACCESS_ORDER_STREAM,
            src_loc_type: LOCATION_HOST,
            src_loc_id: 0,
            dst_loc_type: LOCATION_DEVICE,
            dst_loc_id: device,
            flags: 0,
        };
        let mut first_index = 0usize;
        let count = sizes.len();
        let (d, s, n) = (dsts.as_mut_ptr(), srcs.as_mut_ptr(), sizes.as_mut_ptr());
        // SAFETY: arrays of `count` entries, one attribute applying from index 0; the rest is the
        // caller's contract.
        let rc = unsafe {
            match self {
                BatchCopy::V2(f) => f(d, s, n, count, &mut attrs, &mut first_index, 1, stream),
                BatchCopy::V1(f) => {
                    let mut fail_index = usize::MAX;
                    f(d, s, n, count, &mut attrs, &mut first_index, 1, &mut fail_index, stream)
                }
            }
        };
        cuda("cuMemcpyBatchAsync", rc)
    }
}

const SCATTER_SOURCE: &str = r#"
// Fragment i: frags[2i] = staging offset | length << 32, frags[2i + 1] = pool address.
extern "C" __global__ void fake_scatter(const volatile unsigned long long* frags, unsigned int n,
                                        const unsigned char* scratch) {
    for (unsigned int f = blockIdx.x; f < n; f += gridDim.x) {
        const unsigned long long a = frags[2 * f];
        const unsigned char* s = scratch + (unsigned int)a;
        unsigned char* d = (unsigned char*)frags[2 * f + 1];
        const unsigned int len = (unsigned int)(a >> 32);
        if ((((unsigned long long)s | (unsigned long long)d | len) & 15) == 0) {
            for (unsigned int i = threadIdx.x; i < len / 16; i += blockDim.x) ((uint4*)d)[i] = ((const uint4*)s)[i];
        } else {
            for (unsigned int i = threadIdx.x; i < len; i += blockDim.x) d[i] = s[i];
        }
    }
}
"#;

/// PTX of the scatter kernel, compiled once per process.
fn scatter_ptx() -> std::result::Result<&'static str, String> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(SCATTER_SOURCE).map(|p| p.to_src()).map_err(|e| format!("NVRTC: {e:?}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(Clone::clone)
}

/// Device scratch for one message, a mapped fragment list and the loaded kernel, per receive comm.
struct ScatterKernel {
    module: sys::CUmodule,
    function: sys::CUfunction,
    scratch: CUdeviceptr,
    frags: *mut u64,
    frags_device: CUdeviceptr,
}

impl ScatterKernel {
    /// In the comm's context (current).
    fn new() -> Result<ScatterKernel> {
        let ptx = std::ffi::CString::new(scatter_ptx().map_err(Fail::internal)?).expect("PTX has no NUL");
        let mut k = ScatterKernel {
            module: std::ptr::null_mut(),
            function: std::ptr::null_mut(),
            scratch: 0,
            frags: std::ptr::null_mut(),
            frags_device: 0,
        };
        // SAFETY: out-pointers to fields; sizes as documented; on failure Drop frees what was made.
        unsafe {
            cuda("cuModuleLoadData", sys::cuModuleLoadData(&mut k.module, ptx.as_ptr().cast()))?;
            cuda("cuModuleGetFunction", sys::cuModuleGetFunction(&mut k.function, k.module, c"fake_scatter".as_ptr()))?;
            cuda("cuMemAlloc(scratch)", sys::cuMemAlloc_v2(&mut k.scratch, STAGING_BYTES))?;
            let mut host: *mut c_void = std::ptr::null_mut();
            cuda(
                "cuMemHostAlloc(fragments)",
                sys::cuMemHostAlloc(&mut host, MAX_FRAGMENTS * 16, sys::CU_MEMHOSTALLOC_DEVICEMAP),
            )?;
            k.frags = host.cast();
            cuda("cuMemHostGetDevicePointer", sys::cuMemHostGetDevicePointer_v2(&mut k.frags_device, host, 0))?;
        }
        Ok(k)
    }

    /// Copies staging[..used] to the scratch buffer, then each run `srcs[i]` (a staging address)
    /// to `dsts[i]`.
    ///
    /// # Safety
    /// Context current; every run lies in staging and in device memory; the caller synchronises the
    /// stream before the next call or before staging is written again.
    unsafe fn scatter(
        &mut self,
        staging: *mut c_void,
        staging_len: usize,
        dsts: &[CUdeviceptr],
        srcs: &[CUdeviceptr],
        sizes: &[usize],
        stream: CUstream,
    ) -> Result<()> {
        let base = staging as CUdeviceptr;
        let mut used = 0usize;
        for (i, ((&dst, &src), &len)) in dsts.iter().zip(srcs).zip(sizes).enumerate() {
            let from = (src - base) as usize;
            used = used.max(from + len);
            // SAFETY: i < runs <= fragments <= MAX_FRAGMENTS, the buffer's capacity.
            unsafe {
                self.frags.add(2 * i).write_volatile(from as u64 | (len as u64) << 32);
                self.frags.add(2 * i + 1).write_volatile(dst);
            }
        }
        debug_assert!(used <= staging_len && sizes.len() <= MAX_FRAGMENTS);
        let n = sizes.len() as u32;
        // SAFETY: staging is pinned and `used` bytes long; scratch holds STAGING_BYTES.
        cuda("cuMemcpyHtoDAsync(scratch)", unsafe { sys::cuMemcpyHtoDAsync_v2(self.scratch, staging, used, stream) })?;
        let (mut frags, mut count, mut scratch) = (self.frags_device, n, self.scratch);
        let mut args: [*mut c_void; 3] = [(&raw mut frags).cast(), (&raw mut count).cast(), (&raw mut scratch).cast()];
        // SAFETY: arguments match `fake_scatter`; the fragment list is written before the launch.
        cuda("cuLaunchKernel(fake_scatter)", unsafe {
            sys::cuLaunchKernel(
                self.function,
                n.min(1024),
                1,
                1,
                256,
                1,
                1,
                0,
                stream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for ScatterKernel {
    fn drop(&mut self) {
        // SAFETY: frees only what new made (null/zero fields were never allocated); the owner
        // waited for every scatter and runs this with the context current.
        unsafe {
            if self.scratch != 0 {
                let _ = sys::cuMemFree_v2(self.scratch);
            }
            if !self.frags.is_null() {
                let _ = sys::cuMemFreeHost(self.frags.cast());
            }
            if !self.module.is_null() {
                let _ = sys::cuModuleUnload(self.module);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The scatter kernel compiles wherever NVRTC is installed, GPU or not.
    #[test]
    fn scatter_kernel_compiles() {
        // SAFETY: only dlopens candidate library names.
        if testkit::skip_without("NVRTC", unsafe { cudarc::nvrtc::sys::is_culib_present() }) {
            return;
        }
        let ptx = super::scatter_ptx().unwrap();
        assert!(ptx.contains(".entry fake_scatter"), "{ptx}");
    }
}
