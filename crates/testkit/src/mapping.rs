//! Anonymous memory at a 2 MiB boundary with a page-size advice, for tests of what the engine does
//! with memory on huge pages: the kernel can back each 2 MiB of it with one huge page when advised
//! (`MADV_HUGEPAGE`, and a THP mode of `madvise` or `always`), or is kept from it (`MADV_NOHUGEPAGE`).

const HUGE: usize = 2 << 20;

/// `len` bytes at a 2 MiB boundary, advised before they were first touched, filled with one byte.
pub struct AlignedMapping {
    raw: *mut libc::c_void,
    raw_len: usize,
    at: *mut u8,
    len: usize,
}

impl AlignedMapping {
    /// `advice` is an `madvise` advice (`libc::MADV_HUGEPAGE`, `libc::MADV_NOHUGEPAGE`); a kernel
    /// that refuses it leaves small pages, which is one of the outcomes such tests accept.
    pub fn new(len: usize, advice: libc::c_int, fill: u8) -> AlignedMapping {
        let raw_len = len.next_multiple_of(HUGE) + HUGE;
        // SAFETY: a fresh private anonymous mapping; no memory of ours is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        // SAFETY: advice over the mapping made above; its answer is only advice.
        unsafe { libc::madvise(raw, raw_len, advice) };
        let at = (raw as usize).next_multiple_of(HUGE) as *mut u8;
        // SAFETY: `[at, at + len)` lies inside the mapping; touching it faults its pages in.
        unsafe { std::ptr::write_bytes(at, fill, len) };
        AlignedMapping { raw, raw_len, at, len }
    }

    pub fn addr(&self) -> usize {
        self.at as usize
    }
}

impl std::ops::Deref for AlignedMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes of our mapping, borrowed with `self`.
        unsafe { std::slice::from_raw_parts(self.at, self.len) }
    }
}

impl std::ops::DerefMut for AlignedMapping {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}
