//! Memory registration, capabilities (FifoItems) and IPC information.

use std::ffi::{c_char, c_void};

use super::engine::{ENGINES, uccl_engine_t};
use super::{FIFO_SIZE, IPC_INFO_SIZE, ffi_fn, non_null};
use crate::error::Error;
use crate::proto::IpcInfo;
use std::ffi::c_int;

/// A registered memory region's id.
pub type uccl_mr_t = u64;

/// Bytes of the IPC info that hold its fields (handle, offset, size, GPU index); the rest is padding.
const IPC_INFO_FIELDS_LEN: usize = 84;

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

/// For a registered address: fills `ipc_buf` (128 bytes, UCCL's layout: the CUDA IPC handle of the
/// allocation holding `addr`, the offset of `addr` in it, the bytes from `addr` to the end of its
/// registration, the GPU index) and sets `*has_ipc`. False, with the buffer zeroed, for host
/// memory, for GPU memory without a legacy IPC handle (the CUDA virtual memory API's, such as
/// PyTorch's expandable segments: those travel over the network path), and under
/// UCCL_TCPX_DISABLE_IPC=1. The handle opens the whole allocation to any process of this host
/// that holds it; this engine's own peers do not need it (they ask the owner, which authorizes
/// every access), so hand it only to processes that may reach that whole allocation.
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
        let info = ENGINES.get(engine)?.ipc_info(addr)?;
        let bytes = info.map_or([0u8; IPC_INFO_SIZE], |i| i.to_bytes());
        // SAFETY: the caller provides IPC_INFO_SIZE writable bytes and a writable bool.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), ipc_buf.cast::<u8>(), IPC_INFO_SIZE);
            *has_ipc = info.is_some();
        }
        Ok(0)
    })
}

/// Re-targets IPC info at `addr` inside the range that starts at `base_addr`: offset += addr -
/// base, size = `size`. Info that describes a range can only be narrowed (the new range must lie
/// inside it); zeroed info (no IPC path) is rewritten as UCCL rewrites it.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_update_ipc_info(
    ipc_buf: *mut c_char,
    addr: libc::uintptr_t,
    base_addr: libc::uintptr_t,
    size: libc::size_t,
) -> c_int {
    ffi_fn!("uccl_engine_update_ipc_info", {
        non_null!(ipc_buf);
        let mut bytes = [0u8; IPC_INFO_SIZE];
        // SAFETY: the caller provides IPC_INFO_SIZE readable and writable bytes at ipc_buf.
        unsafe { std::ptr::copy_nonoverlapping(ipc_buf.cast::<u8>(), bytes.as_mut_ptr(), IPC_INFO_SIZE) };
        let mut info = IpcInfo::from_bytes(&bytes);
        info.retarget(addr as u64, base_addr as u64, size as u64).map_err(|e| Error::invalid(e.to_string()))?;
        // Only the fields are rewritten, so whatever the caller keeps past them stays.
        let fields = &info.to_bytes()[..IPC_INFO_FIELDS_LEN];
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(fields.as_ptr(), ipc_buf.cast::<u8>(), IPC_INFO_FIELDS_LEN) };
        Ok(0)
    })
}

const _: () = assert!(IPC_INFO_SIZE == crate::proto::IPC_INFO_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UcclStatus;

    fn call(buf: &mut [u8; IPC_INFO_SIZE], addr: usize, base: usize, size: usize) -> c_int {
        uccl_engine_update_ipc_info(buf.as_mut_ptr().cast(), addr, base, size)
    }

    #[test]
    fn update_ipc_info_narrows_keeps_the_padding_and_refuses_to_widen() {
        let info = IpcInfo { handle: [9; 64], offset: 4096, size: 1 << 20, gpu: 1 };
        let mut buf = info.to_bytes();
        buf[100] = 0x77;
        assert_eq!(call(&mut buf, 0x10_0100, 0x10_0000, 512), 0);
        let got = IpcInfo::from_bytes(&buf);
        assert_eq!((got.handle, got.offset, got.size, got.gpu), ([9; 64], 4096 + 0x100, 512, 1));
        assert_eq!(buf[100], 0x77, "bytes past the fields are the caller's");
        let before = buf;
        assert_eq!(call(&mut buf, 0x10_0100, 0x10_0100, 513), UcclStatus::ErrInvalidParam as c_int);
        assert!(crate::ffi::last_error().contains("runs past"), "{}", crate::ffi::last_error());
        assert_eq!(call(&mut buf, 0x0f_ffff, 0x10_0000, 1), UcclStatus::ErrInvalidParam as c_int);
        assert!(crate::ffi::last_error().contains("below base_addr"), "{}", crate::ffi::last_error());
        assert_eq!(buf, before, "a refused update leaves the buffer as it was");
        assert_eq!(uccl_engine_update_ipc_info(std::ptr::null_mut(), 1, 0, 1), UcclStatus::ErrInvalidParam as c_int);
    }
}
