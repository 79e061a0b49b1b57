//! `ioctl(PAGEMAP_SCAN)` on `/proc/self/pagemap` (Linux 6.7): what the pages of a range of this
//! process are (present, the zero page, on huge pages), read from the page tables without touching
//! a byte. The walk covers the range alone, so it costs the same in a process that maps terabytes
//! as in a small one (smaps, the fallback, walks every mapping below the range). `None` wherever
//! this kernel cannot say (before 6.7, or `/proc/self/pagemap` not readable).

use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// `struct pm_scan_arg` of `linux/fs.h`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16) | ((b'f' as libc::c_ulong) << 8) | 16;

/// Whether any page of the range matches, its categories flipped by `inverted`, all of
/// `mask` and any of `anyof`; `None` where the scan is not supported.
fn any(pagemap: &std::fs::File, start: usize, len: usize, inverted: u64, mask: u64, anyof: u64) -> Option<bool> {
    let mut found = PageRegion::default();
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start: start as u64,
        end: (start + len) as u64,
        vec: (&raw mut found) as u64,
        vec_len: 1,
        category_inverted: inverted,
        category_mask: mask,
        category_anyof_mask: anyof,
        return_mask: mask | anyof,
        ..PmScanArg::default()
    };
    // SAFETY: `arg` is a pm_scan_arg of its own size whose vector is one page_region, both
    // alive across the call; the kernel writes `arg.walk_end` and at most that one region.
    let regions = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &raw mut arg) };
    (regions >= 0).then_some(regions > 0)
}

fn pagemap() -> Option<&'static std::fs::File> {
    static PAGEMAP: OnceLock<Option<std::fs::File>> = OnceLock::new();
    PAGEMAP.get_or_init(|| std::fs::File::open("/proc/self/pagemap").ok()).as_ref()
}

/// Whether some page of the range is not present or is the zero page (a collapse would add memory
/// or find a hole there).
pub fn not_ready(start: usize, len: usize) -> Option<bool> {
    any(pagemap()?, start, len, PAGE_IS_PRESENT, 0, PAGE_IS_PRESENT | PAGE_IS_PFNZERO)
}

/// Whether every page of the range lies on a huge page (pages not present count as not).
pub fn all_huge(start: usize, len: usize) -> Option<bool> {
    any(pagemap()?, start, len, PAGE_IS_HUGE, PAGE_IS_HUGE, 0).map(|not_huge| !not_huge)
}

/// Bytes of the range that are present, and of those the bytes on huge pages (transparent or
/// hugetlbfs).
pub fn present_and_huge(start: usize, len: usize) -> Option<(u64, u64)> {
    const RUNS: usize = 64;
    let pagemap = pagemap()?;
    let end = start.checked_add(len)? as u64;
    let (mut at, mut present, mut huge) = (start as u64, 0u64, 0u64);
    while at < end {
        let mut runs: [PageRegion; RUNS] = std::array::from_fn(|_| PageRegion::default());
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: runs.as_mut_ptr() as u64,
            vec_len: RUNS as u64,
            category_mask: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_HUGE,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a pm_scan_arg of its own size whose vector holds RUNS page_regions, all
        // alive across the call; the kernel writes `arg.walk_end` and at most RUNS regions.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &raw mut arg) };
        let n = usize::try_from(n).ok()?.min(RUNS);
        for run in &runs[..n] {
            let bytes = run.end.saturating_sub(run.start);
            present += bytes;
            if run.categories & PAGE_IS_HUGE != 0 {
                huge += bytes;
            }
        }
        // A walk that stopped with its vector full goes on from where it ended; one that made no
        // progress would loop forever, so it ends the question.
        if arg.walk_end <= at {
            return None;
        }
        at = arg.walk_end;
    }
    Some((present, huge))
}
