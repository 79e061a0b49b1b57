//! FifoItem helpers. The struct itself is the wire type in `proto::fifo`.

use std::ffi::{c_char, c_int};

use super::{FIFO_SIZE, ffi_fn, non_null};
use crate::error::Error;
pub use crate::proto::FifoItem;

/// Points the item at `remote_addr` for `size` (> 0) bytes; the peer still checks the range against
/// what it advertised.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_update_fifo(fifo_item: *mut FifoItem, remote_addr: u64, size: u32) -> c_int {
    ffi_fn!("uccl_engine_update_fifo", {
        non_null!(fifo_item);
        if size == 0 {
            return Err(Error::invalid("size is 0"));
        }
        if remote_addr.checked_add(size as u64).is_none() {
            return Err(Error::invalid(format!("remote range {remote_addr:#x} + {size} wraps around")));
        }
        // SAFETY: checked non-NULL; the caller's FifoItem is writable.
        let item = unsafe { &mut *fifo_item };
        item.addr = remote_addr;
        item.size = size;
        Ok(0)
    })
}

/// Writes the 64-byte wire form of `item` to `buf`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_serialize_fifo_item(item: *const FifoItem, buf: *mut c_char) {
    ffi_fn!("uccl_engine_serialize_fifo_item", {
        non_null!(item);
        non_null!(buf);
        // SAFETY: checked non-NULL; `buf` holds FIFO_SIZE writable bytes.
        unsafe {
            let bytes = (*item).to_bytes();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), FIFO_SIZE);
        }
        Ok(())
    })
}

/// Reads a 64-byte wire form from `buf` into `*item`.
#[unsafe(no_mangle)]
pub extern "C" fn uccl_engine_deserialize_fifo_item(buf: *const c_char, item: *mut FifoItem) {
    ffi_fn!("uccl_engine_deserialize_fifo_item", {
        non_null!(buf);
        non_null!(item);
        // SAFETY: checked non-NULL; `buf` holds FIFO_SIZE readable bytes.
        unsafe {
            let bytes = &*buf.cast::<[u8; FIFO_SIZE]>();
            *item = FifoItem::from_bytes(bytes);
        }
        Ok(())
    })
}
