//! Memory registration, capabilities (FifoItems) and IPC information.

use std::ffi::{c_char, c_void};

use super::engine::{ENGINES, uccl_engine_t};
use super::{FIFO_SIZE, IPC_INFO_SIZE, ffi_fn, non_null};
use crate::error::Error;
use std::ffi::c_int;

/// A registered memory region's id.
pub type uccl_mr_t = u64;

/// Byte offsets inside the IPC info buffer (UCCL's layout: handle, offset, size, GPU index).
const IPC_OFFSET_AT: usize = 64;
const IPC_SIZE_AT: usize = 72;

/// Registers `[data, data + size)` for transfers and writes its id to `*mr_id`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_reg(
    engine: *mut uccl_engine_t,
    data: libc::uintptr_t,
    size: libc::size_t,
    mr_id: *mut uccl_mr_t,
) -> c_int {
    ffi_fn!("uccl_engine_reg", {
        non_null!(mr_id);
        let id = ENGINES.get(engine)?.register(data, size)?;
        // SAFETY: checked non-NULL.
        unsafe { *mr_id = id };
        Ok(0)
    })
}

/// Deregisters a region. Capabilities minted for it stop working, and once this returns no engine
/// thread reads or writes the region again: transfers using it are cut off and fail with
/// `UCCL_STATUS_ERR_NOT_ALLOWED` (a peer's write or read into it included), so the memory may be
/// freed at once. Waits up to `UCCL_TCPX_FENCE_TIMEOUT_MS` for requests already handed to the
/// transport, then fails the connections still holding some. An unknown id is reported through
/// `uccl_engine_last_error`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_mr_destroy(engine: *mut uccl_engine_t, mr: uccl_mr_t) {
    ffi_fn!("uccl_engine_mr_destroy", { ENGINES.get(engine)?.deregister(mr) })
}

/// Writes to `fifo_buf` (64 bytes) the capability a peer needs to write or read `[data, data + size)`
/// of region `mr`. Hand it to the peer out of band.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_prepare_fifo(
    engine: *mut uccl_engine_t,
    mr: uccl_mr_t,
    data: *const c_void,
    size: libc::size_t,
    fifo_buf: *mut c_char,
) -> c_int {
    ffi_fn!("uccl_engine_prepare_fifo", {
        non_null!(fifo_buf);
        let item = ENGINES.get(engine)?.prepare_fifo(mr, data as usize, size)?;
        // SAFETY: the caller provides FIFO_SIZE writable bytes at fifo_buf.
        unsafe { std::ptr::copy_nonoverlapping(item.to_bytes().as_ptr(), fifo_buf.cast::<u8>(), FIFO_SIZE) };
        Ok(0)
    })
}

/// For a registered address: fills `ipc_buf` (128 bytes) and sets `*has_ipc`. No IPC transport exists
/// yet, so `*has_ipc` is false and the buffer is zeroed.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_get_ipc_info(
    engine: *mut uccl_engine_t,
    addr: libc::uintptr_t,
    ipc_buf: *mut c_char,
    has_ipc: *mut bool,
) -> c_int {
    ffi_fn!("uccl_engine_get_ipc_info", {
        non_null!(ipc_buf);
        non_null!(has_ipc);
        let available = ENGINES.get(engine)?.ipc_available(addr)?;
        // SAFETY: the caller provides IPC_INFO_SIZE writable bytes and a writable bool.
        unsafe {
            std::ptr::write_bytes(ipc_buf, 0, IPC_INFO_SIZE);
            *has_ipc = available;
        }
        Ok(0)
    })
}

/// Re-targets IPC info at `addr` inside the allocation starting at `base_addr`: offset += addr - base,
/// size = `size`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_update_ipc_info(
    ipc_buf: *mut c_char,
    addr: libc::uintptr_t,
    base_addr: libc::uintptr_t,
    size: libc::size_t,
) -> c_int {
    ffi_fn!("uccl_engine_update_ipc_info", {
        non_null!(ipc_buf);
        let delta = addr
            .checked_sub(base_addr)
            .ok_or_else(|| Error::invalid(format!("addr {addr:#x} lies below base_addr {base_addr:#x}")))?;
        let buf = ipc_buf.cast::<u8>();
        // SAFETY: the caller provides IPC_INFO_SIZE bytes; unaligned accesses inside them.
        unsafe {
            let offset_ptr = buf.add(IPC_OFFSET_AT).cast::<u64>();
            let offset = offset_ptr
                .read_unaligned()
                .checked_add(delta as u64)
                .ok_or_else(|| Error::invalid("IPC offset overflows"))?;
            offset_ptr.write_unaligned(offset);
            buf.add(IPC_SIZE_AT).cast::<u64>().write_unaligned(size as u64);
        }
        Ok(0)
    })
}
