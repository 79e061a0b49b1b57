//! Whether a range of a process's memory lies mostly on huge pages, from `/proc/<pid>/smaps`. The
//! same-host host path copies a source on huge pages differently (`Config::host_copy_huge_pages`):
//! the kernel pins it in a few steps, so more threads may copy neighbouring megabytes.
//!
//! Reading smaps makes the kernel walk the page tables of every mapping of the process looked at
//! (about 12 ms per GiB resident on small pages, under that process's mapping lock for reading),
//! so it is done once per process and change of its mappings, and the asking thread never waits
//! for it: [`KnownMappings`] keeps the mappings of the last read of a process (one shared by every
//! region for this process, one per peer in `local/process.rs`) and answers any range inside them;
//! a range outside (memory mapped since) queues a new read for the looker thread (`looker.rs`),
//! at most one per process at a time and rate-bounded, while the asker goes on as if the memory
//! lay on small pages. Pages that change size in place (collapsed into huge pages by
//! `MADV_COLLAPSE` or khugepaged, without a new mapping) show only at a new read: this process,
//! having collapsed its own memory (`collapse.rs`), has its cache read again at once
//! ([`KnownMappings::refresh`]); a peer's cache, which nobody can tell, rechecks a "small pages"
//! answer from a read a second old or more, further apart than reads for new mappings (at least a
//! hundred times the last read's length). Where THP is off and no hugetlbfs pool exists
//! (`system.rs`) nothing is read at all. An answer is only a hint: a late, stale or wrong one
//! costs speed, never correctness, and anything that cannot be read or parsed reads as small
//! pages.

mod collapse;
mod known;
mod looker;
mod smaps;
mod system;

pub use collapse::{Collapsed, collapse_in_background};
#[cfg(test)]
pub(crate) use collapse::{collapse_possible, extent_on_huge_page};
pub use known::KnownMappings;
#[cfg(test)]
pub(crate) use looker::TEST_FAULTS;
#[doc(hidden)]
pub use looker::looks_settled;
#[cfg(test)]
pub(crate) use smaps::Snapshot;
pub use smaps::range_on_huge_pages;
#[cfg(test)]
pub(crate) use smaps::read as read_smaps;
