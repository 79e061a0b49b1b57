//! Registration's check of host memory: every byte of a region must be mapped readable and writable
//! when it is registered. A peer's write into a hole or a `PROT_NONE` page would otherwise kill the
//! target process with SIGSEGV on the first remote access, where RDMA's registration would have
//! failed (it pins the pages and refuses ranges it cannot write).
//!
//! The source is `/proc/self/maps`: a snapshot, so memory unmapped after `reg` is the caller's
//! error as with any registered buffer freed before `mr_destroy`.

use std::sync::Once;

use crate::error::{Error, Result};

/// One line of `/proc/<pid>/maps` that matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    readable: bool,
    writable: bool,
}

/// Fails unless `[addr, addr + len)` is covered by readable and writable mappings without a hole.
/// Where the process's mappings cannot be read (no procfs), registration goes ahead unchecked and
/// says so once.
pub fn check_host_range(addr: usize, len: usize) -> Result<()> {
    match std::fs::read_to_string("/proc/self/maps") {
        Ok(maps) => check_in(&maps, addr, len),
        Err(e) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| log::warn!("cannot read /proc/self/maps ({e}): host registrations are not checked"));
            Ok(())
        }
    }
}

fn check_in(maps: &str, addr: usize, len: usize) -> Result<()> {
    let end = addr
        .checked_add(len)
        .ok_or_else(|| Error::invalid(format!("buffer {addr:#x} + {len} bytes wraps around the address space")))?;
    let mut cursor = addr;
    // The kernel lists mappings in address order and never overlapping.
    for m in maps.lines().filter_map(parse_line) {
        if m.end <= cursor {
            continue;
        }
        if m.start > cursor {
            break;
        }
        if !(m.readable && m.writable) {
            return Err(Error::invalid(format!(
                "buffer [{addr:#x}, +{len}) is not registrable: [{:#x}, {:#x}) is mapped without {} access",
                m.start,
                m.end,
                if m.readable { "write" } else { "read" }
            )));
        }
        cursor = m.end;
        if cursor >= end {
            return Ok(());
        }
    }
    Err(Error::invalid(format!("buffer [{addr:#x}, +{len}) is not registrable: {cursor:#x} is not mapped")))
}

/// `start-end perms offset dev inode [path]`, addresses in hex.
fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    Some(Mapping {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        readable: perms.first() == Some(&b'r'),
        writable: perms.get(1) == Some(&b'w'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/app
7f0000000000-7f0000010000 rw-p 00000000 00:00 0
7f0000010000-7f0000020000 rw-p 00000000 00:00 0 [heap]
7f0000020000-7f0000030000 ---p 00000000 00:00 0
7f0000040000-7f0000050000 rw-s 00000000 00:05 9 /dev/shm/x
";

    #[test]
    fn adjacent_writable_mappings_cover_a_range() {
        check_in(MAPS, 0x7f00_0000_0000, 0x2_0000).unwrap();
        check_in(MAPS, 0x7f00_0000_fff0, 0x20).unwrap();
        check_in(MAPS, 0x7f00_0004_0000, 0x1_0000).unwrap();
    }

    #[test]
    fn holes_and_protected_pages_are_refused() {
        let no_access = check_in(MAPS, 0x7f00_0001_f000, 0x2000).unwrap_err();
        assert!(no_access.message().contains("without read access"), "{no_access}");
        let read_only = check_in(MAPS, 0x0040_0000, 16).unwrap_err();
        assert!(read_only.message().contains("without write access"), "{read_only}");
        let hole = check_in(MAPS, 0x7f00_0003_0000, 0x1_0001).unwrap_err();
        assert!(hole.message().contains("0x7f0000030000 is not mapped"), "{hole}");
        let tail = check_in(MAPS, 0x7f00_0004_0000, 0x1_0001).unwrap_err();
        assert!(tail.message().contains("0x7f0000050000 is not mapped"), "{tail}");
        assert!(check_in(MAPS, 0x10, 1).is_err());
        assert!(check_in(MAPS, usize::MAX, 2).is_err());
    }

    #[test]
    fn garbled_lines_are_skipped() {
        let maps = "garbage\n7f0000000000-zz rw-p\n7f0000000000-7f0000001000 rw-p 0 0 0\n";
        check_in(maps, 0x7f00_0000_0000, 0x1000).unwrap();
    }

    #[test]
    fn this_process_heap_passes_and_an_unmapped_page_does_not() {
        let heap = vec![0u8; 1 << 16];
        check_host_range(heap.as_ptr() as usize, heap.len()).unwrap();
        assert!(check_host_range(8, 8).is_err());
    }
}
