//! Where a receive comm's received bytes and metadata live: host memory (runs anywhere) or, in GPU
//! mode, device memory and mapped pinned memory as on TCPX (see `gpu.rs`). The bounce pool itself
//! is its GPU's, shared with the other comms bound there (`pool.rs`).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::any::Any;
use std::ffi::c_void;
use std::sync::Arc;

use uccl_tcpx::internal::ncclnet::{LoadMeta, NetUnpackMeta, UnpackDeviceHandle};

use crate::fail::{Fail, Result};
use crate::fragment::PAGE;
use crate::pool::SharedPool;

pub trait RxMemory: Send {
    /// Host address of the comm's `netUnpackMeta` (the fake writes it, the consumer reads it).
    fn meta(&self) -> *mut NetUnpackMeta;
    /// What `ncclNetDeviceHandle_v7_t::handle` points at: the comm's `unpackNetDeviceHandle`.
    fn unpack_handle(&self) -> *mut c_void;
    /// A host buffer of at least `size` bytes that the next message is received into. It must not
    /// move until that receive completed.
    fn staging(&mut self, size: usize) -> Result<*mut u8>;
    /// Copies the staged message to the pool: `len` bytes at staging offset `dst_off` go to pool
    /// offset `src_off`, for each fragment.
    fn scatter(&mut self, frags: &[LoadMeta]) -> Result<()>;
}

/// A zeroed heap block, freed on drop.
pub struct HostBlock {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: an owned allocation; access is governed by its owner.
unsafe impl Send for HostBlock {}
// SAFETY: a shared HostBlock only hands out its address; who writes through it is governed by the
// owner (pool pages belong to one receive at a time).
unsafe impl Sync for HostBlock {}

impl HostBlock {
    pub fn zeroed(bytes: usize, align: usize, what: &str) -> Result<HostBlock> {
        let layout = Layout::from_size_align(bytes.max(1), align)
            .map_err(|_| Fail::internal(format!("bad layout for the {what} ({bytes} bytes)")))?;
        // SAFETY: the layout has a non-zero size. Large zeroed blocks come from calloc/mmap, so pool
        // pages cost nothing until written.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Fail::internal(format!("cannot allocate the {what} ({bytes} bytes)")));
        }
        Ok(HostBlock { ptr, layout })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for HostBlock {
    fn drop(&mut self) {
        // SAFETY: allocated by alloc_zeroed with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// Host mode's pool memory: `bytes` zeroed bytes of host memory, and the value owning them.
pub fn host_pool(bytes: usize) -> Result<(usize, Box<dyn Any + Send + Sync>)> {
    let block = HostBlock::zeroed(bytes, PAGE, "bounce pool")?;
    Ok((block.ptr() as usize, Box::new(block)))
}

/// Host mode: pool, metadata and unpack handle are plain host memory.
pub struct HostRx {
    meta: HostBlock,
    pool: Arc<SharedPool>,
    handle: Box<UnpackDeviceHandle>,
    staging: Vec<u8>,
}

// SAFETY: the raw pointers in `handle` point into the metadata block this value owns and the pool
// it holds a reference to.
unsafe impl Send for HostRx {}

impl HostRx {
    pub fn new(pool: Arc<SharedPool>) -> Result<HostRx> {
        let meta =
            HostBlock::zeroed(size_of::<NetUnpackMeta>(), align_of::<NetUnpackMeta>().max(64), "unpack metadata")?;
        let handle = Box::new(UnpackDeviceHandle {
            meta: meta.ptr().cast(),
            bounce_buf: pool.base() as *mut c_void,
            head: u64::MAX,
        });
        Ok(HostRx { meta, pool, handle, staging: Vec::new() })
    }
}

impl RxMemory for HostRx {
    fn meta(&self) -> *mut NetUnpackMeta {
        self.meta.ptr().cast()
    }

    fn unpack_handle(&self) -> *mut c_void {
        &*self.handle as *const UnpackDeviceHandle as *mut c_void
    }

    fn staging(&mut self, size: usize) -> Result<*mut u8> {
        if self.staging.len() < size {
            self.staging.resize(size, 0);
        }
        Ok(self.staging.as_mut_ptr())
    }

    fn scatter(&mut self, frags: &[LoadMeta]) -> Result<()> {
        for f in frags {
            let (src, dst, len) = (f.dst_off as usize, f.src_off as usize, f.len as usize);
            if src + len > self.staging.len() || dst + len > self.pool.bytes() {
                return Err(Fail::internal(format!("fragment {f:?} outside staging or pool")));
            }
            let pool = self.pool.base() as *mut u8;
            // SAFETY: both ranges were just checked; staging and pool are distinct allocations, and
            // the pages written belong to the receive being landed, which holds them.
            unsafe { std::ptr::copy_nonoverlapping(self.staging.as_ptr().add(src), pool.add(dst), len) };
        }
        Ok(())
    }
}
