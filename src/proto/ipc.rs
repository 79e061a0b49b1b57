//! The 128-byte IPC information of UCCL's API (`uccl_engine_get_ipc_info` fills it, NIXL ships it
//! to its peers, `uccl_engine_update_ipc_info` points it at a sub-range): a CUDA IPC handle of the
//! allocation holding a registered GPU buffer, the buffer's offset from the allocation's start, its
//! size, and the owner's GPU index. The layout is UCCL's: handle at 0 (64 bytes), offset at 64
//! (u64), size at 72 (u64), GPU index at 80 (i32), the rest zero; integers little-endian, which is
//! what UCCL's field-wise `memcpy` writes on the hosts it runs on.

use super::ProtoError;
use super::wire::{get_at, put_at};

pub const IPC_INFO_SIZE: usize = 128;
/// Bytes of a CUDA IPC memory handle (`CUipcMemHandle`).
pub const IPC_HANDLE_LEN: usize = 64;

const OFFSET_AT: usize = 64;
const SIZE_AT: usize = 72;
const GPU_AT: usize = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcInfo {
    pub handle: [u8; IPC_HANDLE_LEN],
    /// Where the described range starts, from the start of the allocation the handle names.
    pub offset: u64,
    pub size: u64,
    /// The owner's CUDA device index (in the owner's numbering).
    pub gpu: i32,
}

impl Default for IpcInfo {
    fn default() -> IpcInfo {
        IpcInfo { handle: [0; IPC_HANDLE_LEN], offset: 0, size: 0, gpu: 0 }
    }
}

impl IpcInfo {
    pub fn to_bytes(&self) -> [u8; IPC_INFO_SIZE] {
        let mut out = [0u8; IPC_INFO_SIZE];
        put_at(&mut out, 0, &self.handle);
        put_at(&mut out, OFFSET_AT, &self.offset.to_le_bytes());
        put_at(&mut out, SIZE_AT, &self.size.to_le_bytes());
        put_at(&mut out, GPU_AT, &self.gpu.to_le_bytes());
        out
    }

    /// Reads the fields; bytes past the GPU index are ignored, as UCCL does.
    pub fn from_bytes(b: &[u8; IPC_INFO_SIZE]) -> IpcInfo {
        IpcInfo {
            handle: get_at(b, 0),
            offset: u64::from_le_bytes(get_at(b, OFFSET_AT)),
            size: u64::from_le_bytes(get_at(b, SIZE_AT)),
            gpu: i32::from_le_bytes(get_at(b, GPU_AT)),
        }
    }

    /// UCCL's `update_ipc_info`: the info of the range at `base` now describes `size` bytes at
    /// `addr` (offset grows by `addr - base`). Info that describes a range (size above zero) can
    /// only be narrowed: the new range must lie inside the old one, so a caller cannot stretch
    /// what an owner handed out. Zeroed info (no IPC path) describes nothing and is rewritten
    /// as UCCL rewrites it.
    pub fn retarget(&mut self, addr: u64, base: u64, size: u64) -> Result<(), ProtoError> {
        let delta = addr.checked_sub(base).ok_or(ProtoError::Invalid("addr lies below base_addr"))?;
        let offset = self.offset.checked_add(delta).ok_or(ProtoError::Invalid("the IPC offset overflows"))?;
        if self.size > 0 {
            if size == 0 {
                return Err(ProtoError::Invalid("a sub-range of IPC info must not be empty"));
            }
            if delta.checked_add(size).is_none_or(|end| end > self.size) {
                return Err(ProtoError::Invalid("the new range runs past the range the IPC info describes"));
            }
        }
        self.offset = offset;
        self.size = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IpcInfo {
        IpcInfo { handle: core::array::from_fn(|i| i as u8 + 1), offset: 0x1_0000, size: 4 << 20, gpu: 3 }
    }

    #[test]
    fn layout_is_uccls() {
        let b = sample().to_bytes();
        assert_eq!(b.len(), 128);
        assert_eq!(&b[..64], &sample().handle);
        assert_eq!(&b[64..72], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&b[72..80], &[0, 0, 0x40, 0, 0, 0, 0, 0]);
        assert_eq!(&b[80..84], &[3, 0, 0, 0]);
        assert!(b[84..].iter().all(|&x| x == 0), "the tail is zero");
    }

    #[test]
    fn round_trips_and_ignores_the_tail() {
        let info = sample();
        assert_eq!(IpcInfo::from_bytes(&info.to_bytes()), info);
        let mut b = info.to_bytes();
        b[100] = 0xee;
        assert_eq!(IpcInfo::from_bytes(&b), info);
        let negative = IpcInfo { gpu: -1, ..info };
        assert_eq!(IpcInfo::from_bytes(&negative.to_bytes()).gpu, -1);
    }

    #[test]
    fn retarget_narrows_inside_the_described_range() {
        let mut info = sample();
        info.retarget(0x7000_0100, 0x7000_0000, 1024).unwrap();
        assert_eq!((info.offset, info.size), (0x1_0100, 1024));
        assert_eq!(info.handle, sample().handle, "the handle stays");
        // The whole range, and its very last byte.
        let mut whole = sample();
        whole.retarget(0x1000, 0x1000, 4 << 20).unwrap();
        assert_eq!((whole.offset, whole.size), (0x1_0000, 4 << 20));
        let mut last = sample();
        last.retarget(0x1000 + (4 << 20) - 1, 0x1000, 1).unwrap();
        assert_eq!(last.offset, 0x1_0000 + (4 << 20) - 1);
    }

    #[test]
    fn retarget_refuses_what_leaves_the_range() {
        for (addr, base, size, why) in [
            (0x0fff, 0x1000, 16, "below"),
            (0x1000, 0x1000, (4 << 20) + 1, "past"),
            (0x1000 + (4 << 20), 0x1000, 1, "past"),
            (0x1001, 0x1000, u64::MAX, "past"),
            (0x1000, 0x1000, 0, "empty"),
        ] {
            let mut info = sample();
            let err = info.retarget(addr, base, size).unwrap_err();
            assert!(err.to_string().contains(why), "{addr:#x} {base:#x} {size}: {err}");
            assert_eq!(info, sample(), "a refused update changes nothing");
        }
        let mut near_end = IpcInfo { offset: u64::MAX - 1, ..sample() };
        assert!(near_end.retarget(0x10, 0, 1).unwrap_err().to_string().contains("overflows"));
    }

    #[test]
    fn zeroed_info_is_rewritten_like_uccl_does() {
        let mut info = IpcInfo::default();
        info.retarget(0x1064, 0x1000, 1 << 20).unwrap();
        assert_eq!((info.offset, info.size, info.handle), (0x64, 1 << 20, [0; 64]));
        assert!(IpcInfo::default().retarget(0x10, 0x20, 1).is_err(), "below base stays an error");
    }
}
