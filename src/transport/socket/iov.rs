//! A piece's memory as the kernel's scatter/gather lists: header and payload segments go out in one
//! `sendmsg`, and a payload spread over segments arrives with one `recvmsg`.

use crate::transport::IoSeg;

/// iovecs one call takes at most: 64 segments of 4 KiB fill a 256 KiB piece in one call, and a
/// piece of more (smaller) segments just takes more calls. On the stack, so no call allocates.
pub const MAX_IOV: usize = 128;

/// Fills `out` with the bytes of `segs` from byte `skip` of their concatenation on, as many
/// segments as fit; returns how many entries it filled.
pub fn fill(segs: &[IoSeg], mut skip: usize, out: &mut [libc::iovec]) -> usize {
    let mut n = 0;
    for seg in segs {
        if n == out.len() {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        out[n] = libc::iovec { iov_base: (seg.addr + skip) as *mut libc::c_void, iov_len: seg.len - skip };
        skip = 0;
        n += 1;
    }
    n
}

/// Copies `src` into the concatenation of `segs`, starting at byte `at` of it.
///
/// # Safety
/// Every segment is writable memory nobody else accesses meanwhile, and `at + src.len()` is at
/// most their total length.
pub unsafe fn scatter(src: &[u8], segs: &[IoSeg], mut at: usize) {
    let mut src = src;
    for seg in segs {
        if src.is_empty() {
            break;
        }
        if at >= seg.len {
            at -= seg.len;
            continue;
        }
        let n = (seg.len - at).min(src.len());
        // SAFETY: per the contract, `[seg.addr + at, + n)` lies inside a writable segment.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (seg.addr + at) as *mut u8, n) };
        src = &src[n..];
        at = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> [libc::iovec; 4] {
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 4]
    }

    #[test]
    fn fill_skips_what_was_moved_and_stops_when_full() {
        let segs = [IoSeg { addr: 100, len: 10 }, IoSeg { addr: 500, len: 5 }, IoSeg { addr: 900, len: 7 }];
        let mut out = empty();
        assert_eq!(fill(&segs, 0, &mut out), 3);
        assert_eq!((out[0].iov_base as usize, out[0].iov_len), (100, 10));
        assert_eq!(fill(&segs, 12, &mut out), 2);
        assert_eq!((out[0].iov_base as usize, out[0].iov_len), (502, 3));
        assert_eq!((out[1].iov_base as usize, out[1].iov_len), (900, 7));
        assert_eq!(fill(&segs, 22, &mut out), 0, "all moved");
        assert_eq!(fill(&segs, 3, &mut out[..1]), 1);
        assert_eq!((out[0].iov_base as usize, out[0].iov_len), (103, 7));
    }

    #[test]
    fn scatter_lands_bytes_across_segments() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 3];
        let segs = [IoSeg { addr: a.as_mut_ptr() as usize, len: 4 }, IoSeg { addr: b.as_mut_ptr() as usize, len: 3 }];
        // SAFETY: both arrays are live and 2 + 4 <= 7.
        unsafe { scatter(&[1, 2, 3, 4], &segs, 2) };
        assert_eq!((a, b), ([0, 0, 1, 2], [3, 4, 0]));
    }
}
