//! Whether a range of a process's memory lies mostly on huge pages, from `/proc/<pid>/smaps`. The
//! same-host host path copies a source on huge pages differently (`Config::host_copy_huge_pages`):
//! the kernel pins it in a few steps, so more threads may copy neighbouring megabytes.
//!
//! Reading smaps makes the kernel walk the page tables of every mapping of the process (about
//! 12 ms per GiB resident on small pages), so no transfer waits for it: answers are cached by their
//! users in [`KnownSpans`] (per local region in `region.rs`, per span of a peer's memory in
//! `local/process.rs`), and the read behind a missing answer runs on the looker thread
//! (`looker.rs`) while the asker goes on as if the memory lay on small pages. An answer is only a
//! hint: a late, stale or wrong one costs speed, never correctness, and anything that cannot be
//! read or parsed reads as small pages.

mod known;
mod looker;
mod smaps;

pub use known::KnownSpans;
#[doc(hidden)]
pub use looker::looks_settled;
pub use smaps::{Answer, range_on_huge_pages};
