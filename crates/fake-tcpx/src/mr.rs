//! Memory registrations of a comm. The mhandle given to the caller is the address of a boxed
//! record; every use is checked against this comm's set, so a stale or foreign handle is an error.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};

use uccl_tcpx::internal::ncclnet::{NCCL_PTR_CUDA, NCCL_PTR_HOST};

use crate::fail::{Fail, Result};
use crate::profile::{self, Kind};

const DEVMEM_PAGE: usize = 4096;

/// Why a size wraps: `tcpxRegMr(void* comm, void* data, int size, ...)` (net_tcpx.cc).
const INT_SIZE: &str = "regMr takes an int size, so a region of 2 GiB or more cannot be registered in one \
                        call: register windows below 2 GiB";

#[derive(Debug)]
pub struct Mr {
    pub base: usize,
    pub len: usize,
    pub kind: c_int,
    /// GPU mode, CUDA registrations: the GPU whose memory it is.
    pub device: Option<i32>,
}

#[derive(Default)]
pub struct Registrations {
    by_handle: HashMap<usize, Box<Mr>>,
}

impl Registrations {
    /// Records a registration; `locate` names the GPU of a CUDA registration that passed TCPX's
    /// checks (GPU mode), or refuses it.
    pub fn register(
        &mut self,
        data: *mut c_void,
        size: c_int,
        kind: c_int,
        locate: impl FnOnce() -> Result<Option<i32>>,
    ) -> Result<*mut c_void> {
        let len =
            usize::try_from(size).map_err(|_| Fail::internal(format!("regMr size {size} is negative: {INT_SIZE}")))?;
        match kind {
            NCCL_PTR_HOST => {}
            // TCPX asks CUDA for a dma-buf of the range (gpu/cuda_wrapper.cu gpu_tx_reg_mr), which
            // an empty range cannot have: this is where a 4 GiB region truncated to int lands.
            NCCL_PTR_CUDA if len == 0 => {
                return Err(Fail::internal(format!(
                    "gpu_tx_reg_mr failed: CUDA regMr of 0 bytes at {data:p}; {INT_SIZE}"
                )));
            }
            // TCPXO registers the whole pages around any range (fo/nccl_shim.cc RegMrDmaBuf L817-821).
            NCCL_PTR_CUDA if profile::kind() == Kind::Tcpxo => {}
            NCCL_PTR_CUDA => {
                // TCPX builds a dma-buf of whole pages for GPU memory.
                if !(data as usize).is_multiple_of(DEVMEM_PAGE) || !len.is_multiple_of(DEVMEM_PAGE) {
                    return Err(Fail::internal(format!(
                        "data not aligned: CUDA regMr needs a 4 KiB-aligned address and a size multiple of \
                         4096 (got {data:p}, {len} bytes)"
                    )));
                }
            }
            other => {
                return Err(Fail::internal(format!("regMr type {other} is neither NCCL_PTR_HOST nor NCCL_PTR_CUDA")));
            }
        }
        if data.is_null() && len > 0 {
            return Err(Fail::internal("regMr of a NULL address"));
        }
        let device = if kind == NCCL_PTR_CUDA { locate()? } else { None };
        let mr = Box::new(Mr { base: data as usize, len, kind, device });
        let handle = &*mr as *const Mr as usize;
        self.by_handle.insert(handle, mr);
        Ok(handle as *mut c_void)
    }

    pub fn deregister(&mut self, handle: *mut c_void) -> Result<()> {
        self.by_handle
            .remove(&(handle as usize))
            .map(drop)
            .ok_or_else(|| Fail::internal(format!("deregMr of {handle:p}, which is not a registration of this comm")))
    }

    /// The registration `handle` names, checked to cover `[data, data + len)`.
    pub fn covering(&self, handle: *mut c_void, data: usize, len: usize) -> Result<&Mr> {
        if handle.is_null() {
            return Err(Fail::internal("mhandle is NULL"));
        }
        let mr = self
            .by_handle
            .get(&(handle as usize))
            .ok_or_else(|| Fail::internal(format!("mhandle {handle:p} is not a registration of this comm")))?;
        let inside = data >= mr.base && data.checked_add(len).is_some_and(|end| end <= mr.base + mr.len);
        if !inside {
            return Err(Fail::internal(format!(
                "buffer {data:#x}+{len} lies outside its registration {:#x}+{}",
                mr.base, mr.len
            )));
        }
        Ok(mr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_rules() {
        let none = || Ok(None);
        let mut regs = Registrations::default();
        let mut buf = vec![0u8; 64];
        let p = buf.as_mut_ptr().cast::<c_void>();
        assert!(regs.register(p, -1, NCCL_PTR_HOST, none).is_err());
        assert!(regs.register(p, 64, 4, none).is_err());
        assert!(
            regs.register(0x1001 as *mut c_void, 4096, NCCL_PTR_CUDA, none).unwrap_err().msg.contains("not aligned")
        );
        assert!(
            regs.register(0x1000 as *mut c_void, 100, NCCL_PTR_CUDA, none).unwrap_err().msg.contains("not aligned")
        );
        // Sizes of 2 GiB and more, as a C caller's int holds them: negative or wrapped to 0.
        for size in [(2u64 << 30) as c_int, (4u64 << 30) as c_int, (6u64 << 30) as c_int] {
            let err = regs.register(0x1000 as *mut c_void, size, NCCL_PTR_CUDA, none).unwrap_err();
            assert!(err.msg.contains("int size"), "{size}: {}", err.msg);
        }
        assert!(regs.register(0x1000 as *mut c_void, (2u64 << 30) as c_int, NCCL_PTR_HOST, none).is_err());
        assert!(
            regs.register(0x1000 as *mut c_void, c_int::MAX - 4095, NCCL_PTR_CUDA, none).is_ok(),
            "2 GiB - 4 KiB fits"
        );
        let h = regs.register(p, 64, NCCL_PTR_HOST, none).unwrap();
        let base = p as usize;
        assert!(regs.covering(h, base + 10, 54).is_ok());
        assert!(regs.covering(h, base + 10, 55).is_err());
        assert!(regs.covering(h, base - 1, 1).is_err());
        assert!(regs.covering(std::ptr::null_mut(), base, 1).is_err());
        regs.deregister(h).unwrap();
        assert!(regs.covering(h, base, 1).is_err());
        assert!(regs.deregister(h).is_err());
    }

    #[test]
    fn cuda_registrations_are_located_after_tcpx_checks() {
        let mut regs = Registrations::default();
        let page = 0x10000 as *mut c_void;
        let h = regs.register(page, 4096, NCCL_PTR_CUDA, || Ok(Some(1))).unwrap();
        assert_eq!(regs.covering(h, 0x10000, 4096).unwrap().device, Some(1));
        let refused = regs.register(page, 4096, NCCL_PTR_CUDA, || Err(Fail::internal("no GPU current")));
        assert_eq!(refused.unwrap_err().msg, "no GPU current");
        assert_eq!(regs.by_handle.len(), 1, "a refused registration records nothing");
        let host = regs.register(page, 64, NCCL_PTR_HOST, || panic!("HOST memory is never located")).unwrap();
        assert_eq!(regs.covering(host, 0x10000, 64).unwrap().device, None);
        let unaligned = regs.register(0x10001 as *mut c_void, 4096, NCCL_PTR_CUDA, || panic!("checked first"));
        assert!(unaligned.unwrap_err().msg.contains("not aligned"));
    }
}
