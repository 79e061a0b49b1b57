//! Collapsing a range of this process's memory into huge pages in place (`madvise(MADV_COLLAPSE)`),
//! for registered host memory that a same-host peer copies out of (`Config::host_copy_collapse`,
//! opt-in).
//!
//! What it does to the caller's memory: nothing visible. The kernel copies each 2 MiB extent into
//! a huge page and maps it where the small pages were, contents and addresses unchanged (as
//! khugepaged does on its own with THP `always`). Only extents whose every page is present and
//! written are asked for (`PAGEMAP_SCAN`, Linux 6.7; before it `mincore`, which also counts pages
//! only read, mapped to the shared zero page, that a collapse then backs with memory), so the
//! process does not grow; extents reaching past the range are collapsed whole when the mapping
//! holds them (the pages past the range change size, not content). While the kernel copies an
//! extent it holds this process's mapping lock for writing: mapping calls, faults on that memory
//! and reads of our smaps wait. So the work is paced for the whole process, a slice of extents at
//! a time with three times the slice's length of pause after it; extents busy just then (pinned
//! by a copy under way) are tried again twice, 50 ms apart.
//!
//! It runs on the caller's thread, ends early when `still_wanted` says no (the region was
//! deregistered), when the kernel cannot collapse here (no `MADV_COLLAPSE` before Linux 6.1, THP
//! disabled for the process or the mapping), or when it finds no huge page to collapse into
//! (memory pressure, the memory cgroup's limit). Where the THP mode is `never`, or the huge page
//! size is not 2 MiB (arm64 with 16 or 64 KiB pages: 32 MiB and 512 MiB extents would hold the
//! mapping lock far too long), nothing is asked for.

use std::io;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::system::{self, page_size};

/// `MADV_COLLAPSE` (Linux 6.1), the same on every architecture.
const MADV_COLLAPSE: libc::c_int = 25;
/// The only huge page size collapsed into.
const EXTENT: usize = system::HUGE_PAGE;
/// Bytes asked for per slice: about 6 ms of the kernel's copying.
const SLICE_BYTES: usize = 16 << 20;
/// The pause after a slice, in multiples of the slice's time: a quarter of a core at most.
const PAUSE_PER_SLICE: u32 = 3;
/// Passes over the extents that were busy (pinned) when asked, and the wait before each.
const RETRY_PASSES: u8 = 2;
const RETRY_AFTER: Duration = Duration::from_millis(50);
/// Refusals before any extent collapsed that end the job: an extent rounded out into a
/// neighbouring mapping that refuses huge pages is refused alone; a kernel that refuses every one
/// is found out within a few.
const REFUSALS_BEFORE_GIVING_UP: usize = 4;

/// No slice of any collapse starts before this: the pace is the process's, not each region's.
static NEXT_SLICE: Mutex<Option<Instant>> = Mutex::new(None);

/// How a collapse ended, for the log and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collapsed {
    /// Extents the kernel moved onto a huge page.
    pub extents: usize,
    /// Extents on a huge page already.
    pub already: usize,
    /// Extents left as they were: not every page present and written, busy (pinned) at every try,
    /// or refused.
    pub skipped: usize,
    /// The kernel cannot collapse this memory here, or has no huge page to give: the rest was not
    /// asked for.
    pub unsupported: bool,
    /// `still_wanted` said no before the end.
    pub abandoned: bool,
}

/// Collapses the extents of `[addr, addr + len)` (rounded out to 2 MiB) on this thread, paced;
/// `still_wanted` is asked before each extent.
pub fn collapse(addr: usize, len: usize, still_wanted: impl Fn() -> bool) -> Collapsed {
    let mut job = Job { tally: Collapsed::default(), refusals: 0, busy: Vec::new() };
    if !collapse_allowed() {
        job.tally.unsupported = true;
        return job.tally;
    }
    let start = addr & !(EXTENT - 1);
    let end = addr.saturating_add(len).saturating_add(EXTENT - 1) & !(EXTENT - 1);
    let mut todo: Vec<usize> = (start..end).step_by(EXTENT).collect();
    for pass in 0..=RETRY_PASSES {
        if pass > 0 {
            if todo.is_empty() {
                break;
            }
            std::thread::sleep(RETRY_AFTER);
        }
        for slice in todo.chunks(SLICE_BYTES / EXTENT) {
            if !paced(|| job.slice(slice, &still_wanted)) {
                return job.tally;
            }
        }
        todo = std::mem::take(&mut job.busy);
    }
    job.tally.skipped += todo.len();
    job.tally
}

/// A collapse under way.
struct Job {
    tally: Collapsed,
    /// Extents the kernel refused so far.
    refusals: usize,
    /// Extents busy when asked on this pass, for the next.
    busy: Vec<usize>,
}

impl Job {
    /// Asks for the extents of one slice; whether to go on.
    fn slice(&mut self, extents: &[usize], still_wanted: &impl Fn() -> bool) -> bool {
        for &extent in extents {
            if !still_wanted() {
                self.tally.abandoned = true;
                return false;
            }
            match collapse_extent(extent) {
                Step::Collapsed => self.tally.extents += 1,
                Step::Already => self.tally.already += 1,
                Step::Skipped => self.tally.skipped += 1,
                Step::Busy => self.busy.push(extent),
                Step::Refused(e) => {
                    self.tally.skipped += 1;
                    self.refusals += 1;
                    if self.tally.extents + self.tally.already == 0 && self.refusals >= REFUSALS_BEFORE_GIVING_UP {
                        log::debug!("cannot collapse memory into huge pages here ({e}): it stays on small pages");
                        self.tally.unsupported = true;
                        return false;
                    }
                }
                Step::Stop => {
                    self.tally.unsupported = true;
                    return false;
                }
            }
        }
        true
    }
}

/// Runs one slice once the process's pace allows: slices of every collapse run one at a time,
/// each no sooner than three times the last one's length after it ended.
fn paced<T>(slice: impl FnOnce() -> T) -> T {
    let mut next = NEXT_SLICE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(wait) = next.map(|at| at.saturating_duration_since(Instant::now())) {
        std::thread::sleep(wait);
    }
    let began = Instant::now();
    let result = slice();
    let ended = Instant::now();
    *next = Some(ended + ended.saturating_duration_since(began).saturating_mul(PAUSE_PER_SLICE));
    #[cfg(test)]
    tests::SLICES.lock().unwrap().push((began, ended));
    result
}

/// Whether this process may ask for collapses at all: not where the administrator turned THP off,
/// and only where the huge page size is 2 MiB.
pub fn collapse_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let size = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").ok();
        let two_mib = size.and_then(|text| text.trim().parse::<usize>().ok()) == Some(EXTENT);
        two_mib && !system::thp_never()
    })
}

/// What one extent's turn came to.
enum Step {
    Collapsed,
    Already,
    Skipped,
    /// Pinned or locked just then: worth another try.
    Busy,
    /// The kernel will not collapse this extent's mapping (or anything, on an old kernel).
    Refused(io::Error),
    /// Stop asking: no huge page to give.
    Stop,
}

/// Collapses the 2 MiB extent at `start` if every page of it is present and written.
fn collapse_extent(start: usize) -> Step {
    match pages_of(start) {
        Pages::Ready => {}
        Pages::Huge => return Step::Already,
        Pages::NotReady => return Step::Skipped,
    }
    // SAFETY: MADV_COLLAPSE changes how the range is mapped, never its contents or addresses;
    // over memory not mapped the kernel answers ENOMEM and does nothing.
    if unsafe { libc::madvise(start as *mut libc::c_void, EXTENT, MADV_COLLAPSE) } == 0 {
        return Step::Collapsed;
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Pages pinned (a copy under way) or locked just then.
        Some(libc::EAGAIN) => Step::Busy,
        // Not for this mapping (THP off for it, a special mapping) or this kernel (before 6.1).
        Some(libc::EINVAL) => Step::Refused(e),
        // ENOMEM: no huge page to be had (present a moment ago, so mapped); EBUSY: the memory
        // cgroup would not take the charge. Asking on would only reclaim for nothing.
        _ => {
            log::debug!("no huge page to collapse {start:#x} into ({e}): the rest stays on small pages");
            Step::Stop
        }
    }
}

/// What the pages of one extent are, as far as a collapse cares.
#[derive(Debug, PartialEq, Eq)]
enum Pages {
    /// Every page present and none the shared zero page, not all on a huge page yet.
    Ready,
    /// On a huge page already.
    Huge,
    /// Some page not present (never touched, swapped out, unmapped) or only read (the zero page).
    NotReady,
}

/// What the extent's pages are, from the page tables; `None` where this kernel cannot say.
fn scanned(start: usize, len: usize) -> Option<Pages> {
    if super::pagemap::not_ready(start, len)? {
        return Some(Pages::NotReady);
    }
    Some(if super::pagemap::all_huge(start, len)? { Pages::Huge } else { Pages::Ready })
}

fn pages_of(start: usize) -> Pages {
    match scanned(start, EXTENT) {
        Some(pages) => pages,
        None if fully_resident(start, EXTENT) => Pages::Ready,
        None => Pages::NotReady,
    }
}

/// Whether every page of `[start, start + len)` is resident (and mapped), zero pages counted.
fn fully_resident(start: usize, len: usize) -> bool {
    let mut vec = vec![0u8; len.div_ceil(page_size())];
    // SAFETY: `vec` holds a byte per page of the range; mincore only writes it.
    let status = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    status == 0 && vec.iter().all(|v| v & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::mapping::AlignedMapping;

    /// Whether this host collapses a process's memory: Linux 6.1 or later, THP not off, 2 MiB
    /// huge pages.
    fn collapse_possible() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        collapse_allowed() && version >= (6, 1)
    }

    /// `extents` extents at an extent boundary, touched by `touch` as small pages whatever the THP
    /// mode, in a mapping of their own.
    fn aligned(extents: usize, touch: impl FnOnce(&mut [u8])) -> AlignedMapping {
        AlignedMapping::on_small_pages(extents * EXTENT, touch)
    }

    /// Whether every extent of the memory lies on a huge page: from the page tables where the
    /// kernel tells (smaps counts whole mappings, and the kernel merges a test's mapping with its
    /// neighbours of the same flags), else from smaps.
    fn on_huge_pages(memory: &AlignedMapping) -> bool {
        let extents: Option<Vec<Pages>> =
            (0..memory.len() / EXTENT).map(|i| scanned(memory.addr() + i * EXTENT, EXTENT)).collect();
        match extents {
            Some(extents) => extents.iter().all(|pages| *pages == Pages::Huge),
            None => super::super::on_huge_pages(memory.addr(), memory.len()),
        }
    }

    /// Pages of the memory resident (mapped to memory or to the zero page), from `mincore`.
    fn resident_pages(memory: &AlignedMapping) -> usize {
        let mut vec = vec![0u8; memory.len() / page_size()];
        // SAFETY: one byte per page of the range.
        assert_eq!(unsafe { libc::mincore(memory.addr() as *mut libc::c_void, memory.len(), vec.as_mut_ptr()) }, 0);
        vec.iter().filter(|v| **v & 1 == 1).count()
    }

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 4096) as u8
    }

    #[test]
    fn written_memory_moves_to_huge_pages_with_its_contents() {
        let memory = aligned(4, |b| b.iter_mut().enumerate().for_each(|(i, b)| *b = pattern(i)));
        assert!(!on_huge_pages(&memory), "faulted in as small pages");
        // The range starts a page into the first extent and ends a page short of the last: the
        // extents are rounded out.
        let page = page_size();
        let tally = collapse(memory.addr() + page, memory.len() - 2 * page, || true);
        assert!(memory.iter().enumerate().all(|(i, b)| *b == pattern(i)), "contents unchanged");
        if !collapse_possible() {
            assert!(tally.unsupported && tally.extents == 0, "{tally:?}");
            assert!(!on_huge_pages(&memory));
            return;
        }
        assert_eq!(tally, Collapsed { extents: 4, ..Collapsed::default() });
        assert!(on_huge_pages(&memory), "the range lies on huge pages");
        // Asked again, nothing is left to do.
        assert_eq!(collapse(memory.addr(), memory.len(), || true), Collapsed { already: 4, ..Collapsed::default() });
    }

    #[test]
    fn an_extent_not_wholly_present_is_left_alone() {
        // The first extent wholly, the second's first half only.
        let memory = aligned(2, |b| b[..EXTENT + EXTENT / 2].fill(3));
        let resident = resident_pages(&memory);
        let tally = collapse(memory.addr(), memory.len(), || true);
        assert_eq!(resident_pages(&memory), resident, "no page added to the process");
        if collapse_possible() {
            assert_eq!(tally, Collapsed { extents: 1, skipped: 1, ..Collapsed::default() });
        }
        assert!(memory[..EXTENT + EXTENT / 2].iter().all(|b| *b == 3));
        assert!(memory[EXTENT + EXTENT / 2..].iter().all(|b| *b == 0));
    }

    #[test]
    fn memory_advised_against_huge_pages_is_refused() {
        let memory = aligned(2, |b| b.fill(5));
        memory.advise(libc::MADV_NOHUGEPAGE);
        let tally = collapse(memory.addr(), memory.len(), || true);
        if collapse_possible() {
            assert_eq!(tally, Collapsed { skipped: 2, ..Collapsed::default() });
        }
        assert!(!on_huge_pages(&memory));
    }

    #[test]
    fn memory_only_read_is_left_alone_where_the_kernel_tells_zero_pages_apart() {
        // Read, never written: every page is the shared zero page, resident to mincore.
        let memory = aligned(1, |b| {
            let sum: u64 = b.chunks(4096).map(|page| u64::from(std::hint::black_box(page[0]))).sum();
            assert_eq!(sum, 0);
        });
        let scan_supported = scanned(memory.addr(), EXTENT).is_some();
        let tally = collapse(memory.addr(), memory.len(), || true);
        if !collapse_possible() {
            return assert!(tally.unsupported, "{tally:?}");
        }
        if scan_supported {
            assert_eq!(tally, Collapsed { skipped: 1, ..Collapsed::default() });
            assert_eq!(scanned(memory.addr(), EXTENT), Some(Pages::NotReady), "still the zero page, no memory");
        } else {
            // Before Linux 6.7 the zero pages count as resident: the extent is collapsed (and
            // backed with memory), as the module documents.
            assert_eq!(tally, Collapsed { extents: 1, ..Collapsed::default() });
        }
    }

    #[test]
    fn a_collapse_no_longer_wanted_stops() {
        let memory = aligned(2, |b| b.fill(9));
        let tally = collapse(memory.addr(), memory.len(), || false);
        if collapse_possible() {
            assert_eq!(tally, Collapsed { abandoned: true, ..Collapsed::default() });
        }
        assert!(!on_huge_pages(&memory));
    }

    #[test]
    fn slices_keep_to_the_process_pace() {
        if !collapse_possible() {
            return;
        }
        // Three slices: each starts no sooner than three times the last one's length after it
        // ended (other tests' slices count too: the pace is the process's).
        let extents = 3 * SLICE_BYTES / EXTENT;
        let memory = aligned(extents, |b| b.fill(1));
        let tally = collapse(memory.addr(), memory.len(), || true);
        assert_eq!(tally.extents + tally.already, extents, "{tally:?}");
        let mut slices = SLICES.lock().unwrap().clone();
        slices.sort();
        assert!(slices.len() >= 3, "at least three slices: {}", slices.len());
        for pair in slices.windows(2) {
            let ((start, end), (next, _)) = (pair[0], pair[1]);
            let pause = (end - start) * PAUSE_PER_SLICE;
            assert!(next >= end + pause, "a slice {:?} after one of {:?}", next - end, end - start);
        }
    }

    /// When each slice of any collapse began and ended, in this test process.
    pub(super) static SLICES: Mutex<Vec<(Instant, Instant)>> = Mutex::new(Vec::new());
}
