//! Collapsing a range of this process's memory into huge pages in place (`madvise(MADV_COLLAPSE)`),
//! in the background, for registered host memory that a same-host peer copies out of.
//!
//! Why: such a peer copies with `process_vm_readv`, which pins the source page by page; on small
//! pages one thread pins at 11-14 GB/s and threads copying neighbouring megabytes contend on the
//! page tables they share, while on huge pages the kernel pins a 2 MiB extent in one step and the
//! threads scale. Memory the caller allocated with plain `malloc` lies on small pages unless it
//! asked for huge ones, so the engine asks for it, once per region, the first time a peer of this
//! host is to copy out of it.
//!
//! What it does to the caller's memory: nothing visible. The kernel copies each 2 MiB extent into
//! a huge page and maps it where the small pages were, contents and addresses unchanged (as
//! khugepaged does on its own with THP `always`). Only extents whose every page is resident are
//! asked for (mincore), so no memory is added to the process; extents reaching past the region are
//! collapsed whole when the mapping holds them (the pages past the region change size, not
//! content). While the kernel copies an extent, this process's faults on it wait; so the work is
//! paced, a slice of extents at a time, at most a quarter of the looker thread's time.
//!
//! It runs on the looker thread (`looker.rs`) between page-size looks, a slice per turn, and ends
//! early when the region is deregistered (`still_wanted`), when the kernel cannot collapse here
//! (no `MADV_COLLAPSE` before Linux 6.1, THP disabled for the process), or when it finds no huge
//! page to collapse into (memory pressure).

use std::io;
use std::time::{Duration, Instant};

use super::looker::{self, Look};
use crate::threads::{ThreadKind, run_contained};

/// `MADV_COLLAPSE` (Linux 6.1), the same on every architecture.
const MADV_COLLAPSE: libc::c_int = 25;
/// Bytes asked for per turn of the looker thread: about 6 ms of the kernel's copying, so a page-size
/// look queued behind waits no longer than that.
const SLICE_BYTES: usize = 16 << 20;
/// The pause after a slice, in multiples of the slice's time: a quarter of a core at most.
const PAUSE_PER_SLICE: u32 = 3;

/// How a collapse ended, for the log and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collapsed {
    /// Extents now on a huge page (those that were already count too).
    pub extents: usize,
    /// Extents left as they were: not every page resident, unmapped, or busy (pinned) just then.
    pub skipped: usize,
    /// The kernel cannot collapse this memory, or has no huge page to give: the rest was not
    /// asked for.
    pub unsupported: bool,
    /// The region was deregistered before the end.
    pub abandoned: bool,
}

type StillWanted = Box<dyn Fn() -> bool + Send>;
type Finished = Box<dyn FnOnce(Collapsed) + Send>;

/// Queues the collapse of `[addr, addr + len)`'s extents (rounded out to the extent size) for the
/// looker thread, and returns at once. `still_wanted` is asked before each extent; `finished` runs
/// on that thread at the end, also when the thread gives the work up.
pub fn collapse_in_background(
    addr: usize,
    len: usize,
    still_wanted: impl Fn() -> bool + Send + 'static,
    finished: impl FnOnce(Collapsed) + Send + 'static,
) {
    let extent = extent_size();
    let start = addr & !(extent - 1);
    let end = addr.saturating_add(len).saturating_add(extent - 1) & !(extent - 1);
    let job = Collapse {
        next: start,
        end,
        extent,
        tally: Collapsed::default(),
        refusals: 0,
        still_wanted: Box::new(still_wanted),
        finished: Some(Box::new(finished)),
    };
    looker::submit(Box::new(job), Instant::now());
}

/// The huge page size extents are collapsed into: the THP size the kernel reports, else 2 MiB.
fn extent_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .filter(|size| size.is_power_of_two() && *size >= page_size())
            .unwrap_or(2 << 20)
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

struct Collapse {
    /// The next extent's start.
    next: usize,
    end: usize,
    extent: usize,
    tally: Collapsed,
    /// Extents the kernel refused so far.
    refusals: usize,
    still_wanted: StillWanted,
    finished: Option<Finished>,
}

/// What one extent's turn came to.
enum Step {
    Collapsed,
    Skipped,
    /// The kernel will not collapse this extent's mapping (or anything, on an old kernel).
    Refused(io::Error),
    /// Stop asking: no huge page to give.
    Stop,
}

/// Refusals before any extent collapsed that end the job: an extent rounded out into
/// a neighbouring mapping that refuses huge pages is refused alone; a kernel that refuses every
/// one is found out within a few.
const REFUSALS_BEFORE_GIVING_UP: usize = 4;

impl Collapse {
    /// Asks for the extents of one slice; whether extents are left.
    fn slice(&mut self) -> bool {
        let mut asked = 0;
        while self.next < self.end && asked < SLICE_BYTES {
            if !(self.still_wanted)() {
                self.tally.abandoned = true;
                return false;
            }
            match collapse_extent(self.next, self.extent) {
                Step::Collapsed => self.tally.extents += 1,
                Step::Skipped => self.tally.skipped += 1,
                Step::Refused(e) => {
                    self.tally.skipped += 1;
                    self.refusals += 1;
                    if self.tally.extents == 0 && self.refusals >= REFUSALS_BEFORE_GIVING_UP {
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
            self.next += self.extent;
            asked += self.extent;
        }
        self.next < self.end
    }

    fn finish(mut self) {
        if let Some(finished) = self.finished.take() {
            finished(self.tally);
        }
    }
}

impl Look for Collapse {
    fn run(mut self: Box<Self>) {
        let began = Instant::now();
        match run_contained(ThreadKind::PageLook, || self.slice()) {
            Ok(true) => {
                let pause = began.elapsed().saturating_mul(PAUSE_PER_SLICE).max(Duration::from_micros(100));
                looker::submit(self, Instant::now() + pause);
            }
            Ok(false) => (*self).finish(),
            Err(_) => {
                self.tally.unsupported = true;
                (*self).finish();
            }
        }
    }

    fn give_up(self: Box<Self>) {
        (*self).finish();
    }
}

/// Collapses the extent at `start` if every page of it is resident.
fn collapse_extent(start: usize, extent: usize) -> Step {
    if !fully_resident(start, extent) {
        return Step::Skipped;
    }
    // SAFETY: MADV_COLLAPSE changes how the range is mapped, never its contents or addresses;
    // over memory not mapped the kernel answers ENOMEM and does nothing.
    if unsafe { libc::madvise(start as *mut libc::c_void, extent, MADV_COLLAPSE) } == 0 {
        return Step::Collapsed;
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Pages pinned or locked just then: the next extent may do.
        Some(libc::EAGAIN | libc::EBUSY) => Step::Skipped,
        // Not for this mapping (THP off for it, a special mapping) or this kernel (before 6.1).
        Some(libc::EINVAL) => Step::Refused(e),
        // Resident a moment ago, so mapped: no huge page to be had.
        _ => {
            log::debug!("no huge page to collapse {start:#x} into ({e}): the rest stays on small pages");
            Step::Stop
        }
    }
}

/// Whether every page of `[start, start + len)` is resident (and mapped).
fn fully_resident(start: usize, len: usize) -> bool {
    let mut vec = vec![0u8; len.div_ceil(page_size())];
    // SAFETY: `vec` holds a byte per page of the range; mincore only writes it.
    let status = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    status == 0 && vec.iter().all(|v| v & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    use testkit::PATIENCE;

    /// An anonymous private mapping of `extents` extents starting on an extent boundary, unmapped
    /// at drop.
    struct Aligned {
        map: usize,
        map_len: usize,
        addr: usize,
        len: usize,
    }

    impl Aligned {
        fn new(extents: usize) -> Aligned {
            let extent = extent_size();
            let (len, map_len) = (extents * extent, (extents + 1) * extent);
            // SAFETY: a fresh anonymous mapping, nothing else refers to it.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(map, libc::MAP_FAILED);
            let map = map as usize;
            Aligned { map, map_len, addr: (map + extent - 1) & !(extent - 1), len }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping lives as long as self, borrowed mutably with it.
            unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
        }

        fn resident_pages(&self) -> usize {
            let mut vec = vec![0u8; self.len / page_size()];
            // SAFETY: one byte per page of the range.
            assert_eq!(unsafe { libc::mincore(self.addr as *mut libc::c_void, self.len, vec.as_mut_ptr()) }, 0);
            vec.iter().filter(|v| **v & 1 == 1).count()
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: the mapping made in new(), unmapped once.
            unsafe { libc::munmap(self.map as *mut libc::c_void, self.map_len) };
        }
    }

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 4096) as u8
    }

    /// Whether this host can collapse a process's memory: a kernel with THP, Linux 6.1 or later
    /// (MADV_COLLAPSE does not follow the THP mode: `never` leaves it working).
    fn collapse_possible() -> bool {
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        thp && version >= (6, 1)
    }

    fn collapse(addr: usize, len: usize, still_wanted: impl Fn() -> bool + Send + 'static) -> Collapsed {
        let (done, finished) = mpsc::channel();
        collapse_in_background(addr, len, still_wanted, move |tally| {
            let _ = done.send(tally);
        });
        finished.recv_timeout(PATIENCE).expect("the collapse finished")
    }

    #[test]
    fn resident_memory_moves_to_huge_pages_with_its_contents() {
        let _reading = looker::TEST_FAULTS.read();
        let mut memory = Aligned::new(4);
        memory.bytes().iter_mut().enumerate().for_each(|(i, b)| *b = pattern(i));
        // The region starts a page into the first extent and ends a page short of the last: the
        // extents are rounded out.
        let page = page_size();
        let tally = collapse(memory.addr + page, memory.len - 2 * page, || true);
        assert!(memory.bytes().iter().enumerate().all(|(i, b)| *b == pattern(i)), "contents unchanged");
        if !collapse_possible() {
            assert_eq!(
                tally,
                Collapsed { skipped: REFUSALS_BEFORE_GIVING_UP, unsupported: true, ..Collapsed::default() }
            );
            return;
        }
        assert_eq!(tally, Collapsed { extents: 4, ..Collapsed::default() });
        assert!(super::super::range_on_huge_pages(None, memory.addr, memory.len), "smaps counts the range as huge");
    }

    #[test]
    fn an_extent_not_wholly_resident_is_left_alone() {
        let _reading = looker::TEST_FAULTS.read();
        let mut memory = Aligned::new(2);
        let extent = extent_size();
        // The first extent wholly, the second's first half only.
        memory.bytes()[..extent + extent / 2].fill(3);
        let resident = memory.resident_pages();
        let tally = collapse(memory.addr, memory.len, || true);
        assert_eq!(memory.resident_pages(), resident, "no page added to the process");
        if collapse_possible() {
            assert_eq!(tally, Collapsed { extents: 1, skipped: 1, ..Collapsed::default() });
        }
        assert!(memory.bytes()[..extent + extent / 2].iter().all(|b| *b == 3));
        assert!(memory.bytes()[extent + extent / 2..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_region_deregistered_meanwhile_is_no_longer_asked_for() {
        let _reading = looker::TEST_FAULTS.read();
        let mut memory = Aligned::new(2);
        memory.bytes().fill(9);
        let wanted = Arc::new(AtomicBool::new(false));
        let tally = collapse(memory.addr, memory.len, {
            let wanted = wanted.clone();
            move || wanted.load(Ordering::SeqCst)
        });
        assert_eq!(tally, Collapsed { abandoned: true, ..Collapsed::default() });
        assert!(!super::super::range_on_huge_pages(None, memory.addr, memory.len));
    }
}
