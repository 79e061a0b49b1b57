//! Which memory an address names: host, or device memory of which GPU. Without a CUDA driver
//! every address is host memory (no device memory can exist in the process).

use cudarc::driver::sys::{self, CUpointer_attribute, CUresult};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Ordinary, pinned or otherwise CPU-addressable memory.
    Host,
    /// Device (or managed) memory of the GPU with this ordinal: reachable only through CUDA copies.
    Device { ordinal: i32 },
}

/// Where `[addr, addr + len)` lives. Both ends must agree, so a range that runs from a device
/// allocation into host memory (or into another GPU) is refused here, not found out by a copy.
pub fn locate(addr: usize, len: usize) -> Result<Location> {
    if super::driver().is_err() {
        return Ok(Location::Host);
    }
    let first = locate_one(addr)?;
    if len > 1 {
        let last_byte = addr
            .checked_add(len - 1)
            .ok_or_else(|| Error::invalid(format!("buffer {addr:#x} + {len} bytes wraps around the address space")))?;
        let last = locate_one(last_byte)?;
        if last != first {
            return Err(Error::invalid(format!(
                "buffer [{addr:#x}, +{len}) starts in {} but ends in {}: it must lie in one allocation",
                describe(first),
                describe(last)
            )));
        }
    }
    Ok(first)
}

fn describe(location: Location) -> String {
    match location {
        Location::Host => "host memory".into(),
        Location::Device { ordinal } => format!("memory of GPU {ordinal}"),
    }
}

/// The allocation of `gpu` holding device address `addr`: its base and length, as the driver
/// reports them. A copy must not run past it, even into an allocation that follows at once.
pub fn allocation_of(gpu: &super::Gpu, addr: usize) -> Result<(u64, u64)> {
    let _ctx = gpu.enter()?;
    let (mut base, mut len): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: two writable locals; the driver only reads `addr`.
    let status = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut len, addr as sys::CUdeviceptr) };
    super::check(status, "cuMemGetAddressRange")?;
    Ok((base, len as u64))
}

fn locate_one(addr: usize) -> Result<Location> {
    match query(addr) {
        // No context is needed for this query on the drivers we know; should one insist, any
        // context will do, and GPU 0's primary context exists wherever a driver does.
        Err(CUresult::CUDA_ERROR_INVALID_CONTEXT | CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED) => {
            let gpu = super::Gpu::open(0)?;
            let _ctx = gpu.enter()?;
            query(addr).map_err(|status| super::driver_error(status, "cuPointerGetAttributes"))
        }
        found => found.map_err(|status| super::driver_error(status, "cuPointerGetAttributes")),
    }
}

fn query(addr: usize) -> std::result::Result<Location, CUresult> {
    // Zeroed 8-byte cells whatever width the driver writes (a 4-byte enum, an int), so a narrower
    // write still reads back right on little-endian hosts.
    let mut memory_type = 0u64;
    let mut ordinal = 0u64;
    let mut attributes = [
        CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
    ];
    let mut data: [*mut std::ffi::c_void; 2] = [(&raw mut memory_type).cast(), (&raw mut ordinal).cast()];
    // SAFETY: two attributes, two writable cells each at least as wide as the attribute's type.
    // cuPointerGetAttributes needs no current context and, unlike cuPointerGetAttribute, reports
    // memory CUDA does not know (plain host memory) as success with a zero memory type.
    let status =
        unsafe { sys::cuPointerGetAttributes(2, attributes.as_mut_ptr(), data.as_mut_ptr(), addr as sys::CUdeviceptr) };
    match status {
        CUresult::CUDA_SUCCESS => {}
        // Older drivers answer unknown host addresses this way.
        CUresult::CUDA_ERROR_INVALID_VALUE => return Ok(Location::Host),
        other => return Err(other),
    }
    const DEVICE: u64 = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u64;
    const UNIFIED: u64 = sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u64;
    match memory_type as u32 as u64 {
        DEVICE | UNIFIED => {
            // A negative ordinal (no owning GPU) cannot be staged; INVALID_DEVICE says so below.
            let ordinal = ordinal as u32 as i32;
            if ordinal < 0 {
                return Err(CUresult::CUDA_ERROR_INVALID_DEVICE);
            }
            Ok(Location::Device { ordinal })
        }
        _ => Ok(Location::Host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_host_with_or_without_a_driver() {
        let heap = vec![7u8; 4096];
        let stack = [0u8; 64];
        assert_eq!(locate(heap.as_ptr() as usize, heap.len()).unwrap(), Location::Host);
        assert_eq!(locate(stack.as_ptr() as usize, stack.len()).unwrap(), Location::Host);
        if !crate::cuda::available() {
            // No driver: nothing is device memory, not even an address that could never be host.
            assert_eq!(locate(0x7f00_0000_0000, 1 << 20).unwrap(), Location::Host);
        }
    }
}
