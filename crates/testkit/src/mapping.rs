//! Anonymous memory at a 2 MiB boundary with a page-size advice, for tests of what the engine does
//! with memory on huge pages: the kernel can back each 2 MiB of it with one huge page when advised
//! (`MADV_HUGEPAGE`, and a THP mode of `madvise` or `always`), or is kept from it (`MADV_NOHUGEPAGE`);
//! or memory faulted in on small pages whatever the THP mode, for tests of what collapses it.

const HUGE: usize = 2 << 20;

/// `len` bytes at a 2 MiB boundary of an anonymous mapping, advised before they were first touched.
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
        let mut mapping = AlignedMapping::map(len);
        // Its answer is only advice.
        mapping.advise_or_not(advice);
        mapping.fill(fill);
        mapping
    }

    /// `len` bytes in a mapping of their own, which `touch` faults in while they can only be small
    /// pages, whatever the THP mode: for tests of what collapses them. The mapping is kept apart by
    /// an advice no other memory has (`MADV_DONTFORK`): the kernel merges neighbouring mappings of
    /// the same flags, and smaps counts whole mappings. Where THP is `always` the pages are advised
    /// against huge ones while touched and for them afterwards, so that a collapse may move them;
    /// elsewhere they stay unadvised, which khugepaged leaves alone (in `madvise` mode it collapses
    /// only memory advised for huge pages), so that only the collapse under test changes them.
    pub fn on_small_pages(len: usize, touch: impl FnOnce(&mut [u8])) -> AlignedMapping {
        let mut mapping = AlignedMapping::map(len);
        mapping.advise(libc::MADV_DONTFORK);
        mapping.touch_on_small_pages(touch);
        mapping
    }

    /// Runs `touch` on the bytes while pages it faults in can only be small, whatever the THP
    /// mode (see [`on_small_pages`](Self::on_small_pages)): memory written after a collapse.
    pub fn touch_on_small_pages(&mut self, touch: impl FnOnce(&mut [u8])) {
        let always = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]"));
        if always {
            self.advise(libc::MADV_NOHUGEPAGE);
        }
        touch(self);
        if always {
            self.advise(libc::MADV_HUGEPAGE);
        }
    }

    /// `advice` over the whole mapping, which must take it.
    pub fn advise(&self, advice: libc::c_int) {
        assert_eq!(self.advise_or_not(advice), 0, "madvise({advice}): {}", std::io::Error::last_os_error());
    }

    fn advise_or_not(&self, advice: libc::c_int) -> libc::c_int {
        // SAFETY: advice over the mapping made in `map`; it changes no content.
        unsafe { libc::madvise(self.raw, self.raw_len, advice) }
    }

    /// `len` bytes at a 2 MiB boundary of a fresh anonymous mapping, none touched yet.
    fn map(len: usize) -> AlignedMapping {
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
        let at = (raw as usize).next_multiple_of(HUGE) as *mut u8;
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
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}
