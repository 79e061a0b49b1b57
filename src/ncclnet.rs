//! The ncclNet v7 plugin ABI: `repr(C)` mirrors of NCCL's net-plugin v7 table and of the unpack
//! structures a devmem plugin fills. Its own module below both the plugin transport that calls a
//! plugin and the GPU unpack that reads what one wrote (and the fake NIC that implements one).
//! Layouts are those of NCCL 2.19's `nccl_net.h` / `net_device.h` / `unpack_defs.h` on x86-64 LP64;
//! the assertions below fail the build if a field moves.

use std::ffi::{c_char, c_int, c_ulong, c_void};
use std::mem::{align_of, offset_of, size_of};

/// `ncclResult_t`.
pub type NcclResult = c_int;
pub const NCCL_SUCCESS: NcclResult = 0;
pub const NCCL_UNHANDLED_CUDA_ERROR: NcclResult = 1;
pub const NCCL_SYSTEM_ERROR: NcclResult = 2;
pub const NCCL_INTERNAL_ERROR: NcclResult = 3;
pub const NCCL_INVALID_ARGUMENT: NcclResult = 4;
pub const NCCL_INVALID_USAGE: NcclResult = 5;
pub const NCCL_REMOTE_ERROR: NcclResult = 6;
pub const NCCL_IN_PROGRESS: NcclResult = 7;

pub const NCCL_PTR_HOST: c_int = 0x1;
pub const NCCL_PTR_CUDA: c_int = 0x2;
pub const NCCL_PTR_DMABUF: c_int = 0x4;

pub const NCCL_NET_HANDLE_MAXSIZE: usize = 128;
pub const NCCL_NET_DEVICE_HOST: c_int = 0;
pub const NCCL_NET_DEVICE_UNPACK: c_int = 1;
pub const NCCL_NET_DEVICE_UNPACK_VERSION: c_int = 0x7;

/// Log levels of `ncclDebugLogLevel`.
pub const NCCL_LOG_NONE: c_int = 0;
pub const NCCL_LOG_VERSION: c_int = 1;
pub const NCCL_LOG_WARN: c_int = 2;
pub const NCCL_LOG_INFO: c_int = 3;
pub const NCCL_LOG_ABORT: c_int = 4;
pub const NCCL_LOG_TRACE: c_int = 5;

/// Unpack queue geometry (`unpack_defs.h`).
pub const UNPACK_QUEUE_DEPTH: usize = 16;
pub const UNPACK_MAX_SLICE_SIZE: usize = 4 * 1024 * 1024;
pub const UNPACK_PAGE_SIZE: usize = 4096;
pub const UNPACK_MAX_SLICE_PAGES: usize = UNPACK_MAX_SLICE_SIZE / UNPACK_PAGE_SIZE * 2;

/// `ncclDebugLogger_t`: `void (*)(ncclDebugLogLevel, unsigned long, const char*, int, const char*, ...)`.
/// Variadic, so only C can define one; see `logger.c`.
pub type NcclDebugLogger = Option<
    unsafe extern "C" fn(level: c_int, flags: c_ulong, file: *const c_char, line: c_int, fmt: *const c_char, ...),
>;

/// `ncclNetProperties_v7_t`; the plugin writes all 56 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NcclNetPropertiesV7 {
    pub name: *mut c_char,
    pub pci_path: *mut c_char,
    pub guid: u64,
    pub ptr_support: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: f32,
    pub max_comms: c_int,
    pub max_recvs: c_int,
    pub net_device_type: c_int,
    pub net_device_version: c_int,
}

impl Default for NcclNetPropertiesV7 {
    fn default() -> Self {
        NcclNetPropertiesV7 {
            name: std::ptr::null_mut(),
            pci_path: std::ptr::null_mut(),
            guid: 0,
            ptr_support: 0,
            speed: 0,
            port: 0,
            latency: 0.0,
            max_comms: 0,
            max_recvs: 0,
            net_device_type: 0,
            net_device_version: 0,
        }
    }
}

/// `ncclNetDeviceHandle_v7_t`: allocated by the caller of `accept`, filled by the plugin.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NcclNetDeviceHandleV7 {
    pub net_device_type: c_int,
    pub net_device_version: c_int,
    /// Device pointer to an [`UnpackDeviceHandle`] for UNPACK plugins.
    pub handle: *mut c_void,
    pub size: usize,
    pub needs_proxy_progress: c_int,
}

impl Default for NcclNetDeviceHandleV7 {
    fn default() -> Self {
        NcclNetDeviceHandleV7 {
            net_device_type: 0,
            net_device_version: 0,
            handle: std::ptr::null_mut(),
            size: 0,
            needs_proxy_progress: 0,
        }
    }
}

/// One received fragment: `len` bytes at `bounce_buf + src_off` belong at `destination + dst_off`,
/// `dst_off` counted from the start of the receive request.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadMeta {
    pub src_off: u32,
    pub len: u32,
    pub dst_off: u64,
}

/// `netUnpackMeta`: per receive comm, one fragment list and count per unpack slot. `cnt[slot]` is
/// published (release) when the receive's `test` reports done.
#[repr(C)]
pub struct NetUnpackMeta {
    pub mem: [[LoadMeta; UNPACK_MAX_SLICE_PAGES]; UNPACK_QUEUE_DEPTH],
    pub cnt: [u64; UNPACK_QUEUE_DEPTH],
}

/// `unpackNetDeviceHandle`, which lives in device memory (or host memory for a host-mode fake).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnpackDeviceHandle {
    pub meta: *mut NetUnpackMeta,
    pub bounce_buf: *mut c_void,
    pub head: u64,
}

type Fn0<A> = Option<unsafe extern "C" fn(A) -> NcclResult>;

/// `ncclNet_v7_t`: a name and 18 entry points. Copied out of the plugin's data symbol once.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NcclNetV7 {
    pub name: *const c_char,
    pub init: Fn0<NcclDebugLogger>,
    pub devices: Fn0<*mut c_int>,
    pub get_properties: Option<unsafe extern "C" fn(dev: c_int, props: *mut NcclNetPropertiesV7) -> NcclResult>,
    pub listen:
        Option<unsafe extern "C" fn(dev: c_int, handle: *mut c_void, listen_comm: *mut *mut c_void) -> NcclResult>,
    pub connect: Option<
        unsafe extern "C" fn(
            dev: c_int,
            handle: *mut c_void,
            send_comm: *mut *mut c_void,
            send_dev_comm: *mut *mut NcclNetDeviceHandleV7,
        ) -> NcclResult,
    >,
    pub accept: Option<
        unsafe extern "C" fn(
            listen_comm: *mut c_void,
            recv_comm: *mut *mut c_void,
            recv_dev_comm: *mut *mut NcclNetDeviceHandleV7,
        ) -> NcclResult,
    >,
    pub reg_mr: Option<
        unsafe extern "C" fn(
            comm: *mut c_void,
            data: *mut c_void,
            size: c_int,
            ty: c_int,
            mhandle: *mut *mut c_void,
        ) -> NcclResult,
    >,
    pub reg_mr_dma_buf: Option<
        unsafe extern "C" fn(
            comm: *mut c_void,
            data: *mut c_void,
            size: usize,
            ty: c_int,
            offset: u64,
            fd: c_int,
            mhandle: *mut *mut c_void,
        ) -> NcclResult,
    >,
    pub dereg_mr: Option<unsafe extern "C" fn(comm: *mut c_void, mhandle: *mut c_void) -> NcclResult>,
    pub isend: Option<
        unsafe extern "C" fn(
            send_comm: *mut c_void,
            data: *mut c_void,
            size: c_int,
            tag: c_int,
            mhandle: *mut c_void,
            request: *mut *mut c_void,
        ) -> NcclResult,
    >,
    pub irecv: Option<
        unsafe extern "C" fn(
            recv_comm: *mut c_void,
            n: c_int,
            data: *mut *mut c_void,
            sizes: *mut c_int,
            tags: *mut c_int,
            mhandles: *mut *mut c_void,
            request: *mut *mut c_void,
        ) -> NcclResult,
    >,
    pub iflush: Option<
        unsafe extern "C" fn(
            recv_comm: *mut c_void,
            n: c_int,
            data: *mut *mut c_void,
            sizes: *mut c_int,
            mhandles: *mut *mut c_void,
            request: *mut *mut c_void,
        ) -> NcclResult,
    >,
    pub test: Option<unsafe extern "C" fn(request: *mut c_void, done: *mut c_int, sizes: *mut c_int) -> NcclResult>,
    pub close_send: Fn0<*mut c_void>,
    pub close_recv: Fn0<*mut c_void>,
    pub close_listen: Fn0<*mut c_void>,
    pub get_device_mr: Option<
        unsafe extern "C" fn(comm: *mut c_void, mhandle: *mut c_void, dptr_mhandle: *mut *mut c_void) -> NcclResult,
    >,
    pub irecv_consumed:
        Option<unsafe extern "C" fn(recv_comm: *mut c_void, n: c_int, request: *mut c_void) -> NcclResult>,
}

// SAFETY: the table is plain function pointers and a pointer to a static name string.
unsafe impl Send for NcclNetV7 {}
// SAFETY: a shared table is only read, and its function pointers and static name never change.
unsafe impl Sync for NcclNetV7 {}

/// The symbol a v7 plugin exports (a data symbol holding an `NcclNetV7`).
pub const PLUGIN_SYMBOL_V7: &[u8] = b"ncclNetPlugin_v7\0";

const _: () = {
    assert!(size_of::<NcclNetV7>() == 152);
    assert!(align_of::<NcclNetV7>() == 8);
    assert!(offset_of!(NcclNetV7, init) == 8);
    assert!(offset_of!(NcclNetV7, listen) == 32);
    assert!(offset_of!(NcclNetV7, reg_mr) == 56);
    assert!(offset_of!(NcclNetV7, reg_mr_dma_buf) == 64);
    assert!(offset_of!(NcclNetV7, isend) == 80);
    assert!(offset_of!(NcclNetV7, test) == 104);
    assert!(offset_of!(NcclNetV7, close_listen) == 128);
    assert!(offset_of!(NcclNetV7, irecv_consumed) == 144);

    assert!(size_of::<NcclNetPropertiesV7>() == 56);
    assert!(offset_of!(NcclNetPropertiesV7, pci_path) == 8);
    assert!(offset_of!(NcclNetPropertiesV7, guid) == 16);
    assert!(offset_of!(NcclNetPropertiesV7, ptr_support) == 24);
    assert!(offset_of!(NcclNetPropertiesV7, speed) == 28);
    assert!(offset_of!(NcclNetPropertiesV7, latency) == 36);
    assert!(offset_of!(NcclNetPropertiesV7, max_comms) == 40);
    assert!(offset_of!(NcclNetPropertiesV7, max_recvs) == 44);
    assert!(offset_of!(NcclNetPropertiesV7, net_device_type) == 48);
    assert!(offset_of!(NcclNetPropertiesV7, net_device_version) == 52);

    assert!(size_of::<NcclNetDeviceHandleV7>() == 32);
    assert!(offset_of!(NcclNetDeviceHandleV7, handle) == 8);
    assert!(offset_of!(NcclNetDeviceHandleV7, size) == 16);
    assert!(offset_of!(NcclNetDeviceHandleV7, needs_proxy_progress) == 24);

    assert!(size_of::<LoadMeta>() == 16);
    assert!(align_of::<LoadMeta>() == 16);
    assert!(offset_of!(LoadMeta, len) == 4);
    assert!(offset_of!(LoadMeta, dst_off) == 8);

    assert!(UNPACK_MAX_SLICE_PAGES == 2048);
    assert!(size_of::<NetUnpackMeta>() == 524_416);
    assert!(offset_of!(NetUnpackMeta, cnt) == 524_288);

    assert!(size_of::<UnpackDeviceHandle>() == 24);
    assert!(offset_of!(UnpackDeviceHandle, bounce_buf) == 8);
    assert!(offset_of!(UnpackDeviceHandle, head) == 16);
};
