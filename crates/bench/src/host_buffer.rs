//! Host memory in an anonymous mapping of its own, starting at a 2 MiB boundary when it is that
//! long: a heap allocation starts a page past its mapping's start, so its first and last 2 MiB
//! extents never lie wholly inside it and stay on small pages whatever the kernel's THP mode, the
//! `--huge-pages` advice or the engine's collapse of a source do. At 8 MiB that is a quarter of the
//! buffer, and a transfer at its start lands there; users' large buffers have such edges too, but
//! a figure measured on them says nothing of the page size it names. The mapping stays its own
//! (the kernel merges neighbouring anonymous mappings, and the engine's page-size look judges a
//! mapping whole), kept apart by an inaccessible page on either side.

use std::ops::{Deref, DerefMut};

const HUGE: usize = 2 << 20;

/// `len` zeroed bytes in a private anonymous mapping of their own.
pub struct HostBuffer {
    at: *mut u8,
    len: usize,
    mapped: usize,
}

// SAFETY: the buffer owns its mapping outright; `&`/`&mut` access goes through Deref as for a Vec.
unsafe impl Send for HostBuffer {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub fn new(len: usize) -> std::io::Result<HostBuffer> {
        let page = page_size();
        let mapped = len.max(1).next_multiple_of(page);
        let align = if len >= HUGE { HUGE } else { page };
        // A guard page before the buffer, room to align it, the buffer, a guard page after.
        let raw_len = page + (align - page) + mapped + page;
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
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let raw = raw as usize;
        let at = (raw + page).next_multiple_of(align);
        let (before, after) = (at - page, at + mapped);
        let end = raw + raw_len;
        // SAFETY: every range lies inside the mapping made above and outside the buffer: the
        // slack goes back, the guard pages become inaccessible.
        unsafe {
            if before > raw {
                libc::munmap(raw as *mut libc::c_void, before - raw);
            }
            if after + page < end {
                libc::munmap((after + page) as *mut libc::c_void, end - (after + page));
            }
            for guard in [before, after] {
                if libc::mprotect(guard as *mut libc::c_void, page, libc::PROT_NONE) != 0 {
                    let e = std::io::Error::last_os_error();
                    libc::munmap(before as *mut libc::c_void, mapped + 2 * page);
                    return Err(e);
                }
            }
        }
        Ok(HostBuffer { at: at as *mut u8, len, mapped })
    }

    pub fn addr(&self) -> usize {
        self.at as usize
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

impl Deref for HostBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes of our mapping (zero-filled by the kernel), borrowed with `self`.
        unsafe { std::slice::from_raw_parts(self.at, self.len) }
    }
}

impl DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        let page = page_size();
        // SAFETY: the mapping and its guard pages are ours and nothing borrows them past `self`.
        unsafe { libc::munmap(self.at.sub(page) as *mut libc::c_void, self.mapped + 2 * page) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_writable_and_start_at_a_huge_page_boundary_from_2_mib() {
        for len in [0, 1, 100, 4096, (2 << 20) - 1, 2 << 20, (5 << 20) + 7] {
            let mut b = HostBuffer::new(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0), "{len} bytes zeroed");
            b.fill(0xa5);
            assert!(b.iter().all(|&x| x == 0xa5));
            let align = if len >= HUGE { HUGE } else { page_size() };
            assert_eq!(b.addr() % align, 0, "{len} bytes at {:#x}", b.addr());
        }
    }

    /// Two buffers made one after the other are two mappings, each exactly its own pages: the
    /// kernel merged neither with its neighbour.
    #[test]
    fn each_buffer_is_a_mapping_of_its_own() {
        let (a, b) = (HostBuffer::new(3 << 20).unwrap(), HostBuffer::new(3 << 20).unwrap());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for buf in [&a, &b] {
            let (start, end) = (buf.addr(), buf.addr() + buf.len().next_multiple_of(page_size()));
            let own = maps
                .lines()
                .filter_map(|l| l.split_whitespace().next()?.split_once('-'))
                .any(|(s, e)| usize::from_str_radix(s, 16) == Ok(start) && usize::from_str_radix(e, 16) == Ok(end));
            assert!(own, "no mapping {start:#x}-{end:#x} of its own in\n{maps}");
        }
    }
}
