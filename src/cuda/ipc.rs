//! CUDA IPC between processes of one host: the handle of the allocation that holds a registered
//! buffer (what the owner hands a peer), and this process's mappings of peers' allocations.
//!
//! Only memory from `cuMemAlloc` (`cudaMalloc`, PyTorch's default allocator) has a legacy IPC
//! handle. Memory of the virtual memory API (`cuMemCreate` + `cuMemMap`, PyTorch's expandable
//! segments) does not: [`export`] finds that out through
//! `CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE` and reports no handle, and the engine moves such
//! memory over its network path. (Exporting it would take a shareable POSIX file descriptor, which
//! only allocations made with that handle type have, and which must cross processes over a Unix
//! socket; the network path serves them without that machinery.)
//!
//! A handle names a whole allocation, and opening one twice in a context is refused by some
//! drivers, so each GPU of this process opens a handle once: [`Mapping`]s are counted in one
//! process-wide table and the last one closes it.

use std::ffi::c_char;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUpointer_attribute, CUresult};

use super::{Gpu, check};
use crate::error::Result;
use crate::proto::IPC_HANDLE_LEN;

/// The IPC handle of the allocation around a buffer, and that allocation's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub handle: [u8; IPC_HANDLE_LEN],
    pub base: u64,
    pub len: u64,
}

/// The handle of the allocation holding device address `addr` of `gpu`; `None` when the allocation
/// has none (virtual memory API) or the driver will not make one, which the caller treats as "no
/// IPC path" (logged at info level with the reason).
pub fn export(gpu: &Gpu, addr: usize) -> Result<Option<Export>> {
    let (base, len) = super::pointer::allocation_of(gpu, addr)?;
    let _ctx = gpu.enter()?;
    let ptr = addr as sys::CUdeviceptr;
    // Zeroed and wider than the attribute's boolean, so any width the driver writes reads back.
    let mut capable = 0u64;
    // SAFETY: one writable cell at least as wide as the attribute's type.
    let status = unsafe {
        sys::cuPointerGetAttribute(
            (&raw mut capable).cast(),
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
            ptr,
        )
    };
    match status {
        CUresult::CUDA_SUCCESS if capable == 0 => {
            log::info!(
                "GPU memory at {addr:#x} has no CUDA IPC handle (allocated through the virtual memory API): \
                 same-host peers reach it over the network path"
            );
            return Ok(None);
        }
        CUresult::CUDA_SUCCESS => {}
        // Drivers before CUDA 11.1 do not know the attribute; cuIpcGetMemHandle decides alone.
        other => log::debug!("CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE unavailable ({other:?})"),
    }
    let mut handle = sys::CUipcMemHandle { reserved: [0; IPC_HANDLE_LEN] };
    // SAFETY: one writable handle; `base` is the start of a live allocation of this context.
    let status = unsafe { sys::cuIpcGetMemHandle(&mut handle, base) };
    if status != CUresult::CUDA_SUCCESS {
        let why = super::driver_error(status, "cuIpcGetMemHandle");
        log::info!("GPU memory at {addr:#x} has no CUDA IPC handle ({why}): same-host peers use the network path");
        return Ok(None);
    }
    Ok(Some(Export { handle: handle.reserved.map(char_to_byte), base, len }))
}

fn char_to_byte(c: c_char) -> u8 {
    u8::from_ne_bytes(c.to_ne_bytes())
}

fn byte_to_char(b: u8) -> c_char {
    c_char::from_ne_bytes(b.to_ne_bytes())
}

struct Open {
    ordinal: i32,
    handle: [u8; IPC_HANDLE_LEN],
    ptr: sys::CUdeviceptr,
    /// The mapped allocation's size as this process sees it; 0 where the driver did not say.
    len: usize,
    refs: usize,
}

/// Every handle this process has open, per GPU. Opening and the last close both happen under
/// this lock, so a handle is never open twice in one context.
static OPEN: Mutex<Vec<Open>> = Mutex::new(Vec::new());

fn open_table() -> std::sync::MutexGuard<'static, Vec<Open>> {
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A peer's allocation mapped into this process, in the context of the GPU that opened it: device
/// addresses `[ptr, ptr + len)` there are the owner's `[base, base + len)`. It is opened with peer
/// access to the owner's GPU, so the opening GPU's kernels read and write it wherever the
/// allocation lives (the driver even names the opening GPU as the mapped pointer's device). Clones
/// share the mapping; dropping the last one unmaps it.
pub struct Mapping {
    gpu: Arc<Gpu>,
    handle: [u8; IPC_HANDLE_LEN],
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({:#x}, {} bytes on {:?})", self.ptr, self.len, self.gpu)
    }
}

impl Mapping {
    /// Maps the allocation `handle` names into `gpu`'s context, or shares the mapping already
    /// there. Peer access to the owner's GPU is enabled as copies need it.
    pub fn open(gpu: &Arc<Gpu>, handle: &[u8; IPC_HANDLE_LEN]) -> Result<Mapping> {
        let mut table = open_table();
        if let Some(open) = table.iter_mut().find(|o| o.ordinal == gpu.ordinal() && &o.handle == handle) {
            open.refs += 1;
            return Ok(Mapping { gpu: gpu.clone(), handle: *handle, ptr: open.ptr, len: open.len });
        }
        let _ctx = gpu.enter()?;
        let raw = sys::CUipcMemHandle { reserved: handle.map(byte_to_char) };
        let mut ptr: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: one writable pointer; the handle is passed by value.
        check(unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, raw, flags) }, "cuIpcOpenMemHandle")?;
        let len = match super::pointer::allocation_of(gpu, ptr as usize) {
            Ok((base, len)) if base == ptr => len as usize,
            other => {
                log::debug!("cannot read the size of a mapped IPC allocation ({other:?}); the grant's size stands");
                0
            }
        };
        table.push(Open { ordinal: gpu.ordinal(), handle: *handle, ptr, len, refs: 1 });
        Ok(Mapping { gpu: gpu.clone(), handle: *handle, ptr, len })
    }

    /// Where the owner's allocation starts in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The mapped allocation's size as the driver reports it here; `None` where it did not say.
    pub fn mapped_len(&self) -> Option<usize> {
        (self.len > 0).then_some(self.len)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Clone for Mapping {
    fn clone(&self) -> Mapping {
        let mut table = open_table();
        if let Some(open) = table.iter_mut().find(|o| o.ordinal == self.gpu.ordinal() && o.handle == self.handle) {
            open.refs += 1;
        }
        Mapping { gpu: self.gpu.clone(), handle: self.handle, ptr: self.ptr, len: self.len }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let mut table = open_table();
        let Some(at) = table.iter().position(|o| o.ordinal == self.gpu.ordinal() && o.handle == self.handle) else {
            return;
        };
        table[at].refs -= 1;
        if table[at].refs > 0 {
            return;
        }
        table.swap_remove(at);
        if let Ok(_ctx) = self.gpu.enter() {
            // SAFETY: opened in this context by `open`, closed once, by the last holder, whose
            // copies have all completed (their owners wait for them before letting go). A peer
            // that exited meanwhile makes the call fail, which leaves nothing to undo.
            let status = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
            if status != CUresult::CUDA_SUCCESS {
                log::debug!("cuIpcCloseMemHandle failed ({status:?}); the owner may have exited");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_bytes_survive_the_c_char_round_trip() {
        let bytes: [u8; IPC_HANDLE_LEN] = core::array::from_fn(|i| (i * 5) as u8);
        assert_eq!(bytes.map(byte_to_char).map(char_to_byte), bytes);
    }

    #[test]
    fn a_handle_nobody_exported_is_an_error_not_a_crash() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let gpu = Gpu::open(0).unwrap();
        let err = Mapping::open(&gpu, &[0xa5; IPC_HANDLE_LEN]).unwrap_err();
        assert!(err.message().contains("cuIpcOpenMemHandle"), "{err}");
        assert!(open_table().iter().all(|o| o.handle != [0xa5; IPC_HANDLE_LEN]), "nothing was recorded");
    }

    #[test]
    fn a_cuda_allocation_exports_its_base_and_size() {
        if testkit::skip_without_gpu(crate::cuda::available()) {
            return;
        }
        let buf = crate::cuda::DeviceBuffer::new(0, 3 << 20).unwrap();
        let export = export(buf.gpu(), buf.addr() + 4096).unwrap().expect("cuMemAlloc memory has a handle");
        assert_eq!(export.base, buf.addr() as u64);
        assert!(export.len >= 3 << 20);
        assert_ne!(export.handle, [0; IPC_HANDLE_LEN]);
        assert_eq!(super::export(buf.gpu(), buf.addr()).unwrap(), Some(export), "one handle per allocation");
    }
}
