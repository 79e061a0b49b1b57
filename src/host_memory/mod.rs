//! Where this process's host memory lies, as the kernel reports it to the process itself: whether a
//! range sits on huge pages (`smaps.rs`, one read of `/proc/self/smaps` per question) and
//! collapsing a range into huge pages in place (`collapse.rs`).
//!
//! Why the same-host host path cares: `process_vm_readv` pins its source page by page, so on small
//! pages one thread pins at 11-14 GB/s and threads copying neighbouring megabytes contend on the
//! page tables they share, while on huge pages the kernel pins a 2 MiB extent in one step and the
//! threads scale. Only the owner of the memory asks: a registration reads its own pages once, and
//! its engine tells a same-host peer in the requests and grants that already name the region. No
//! process reads another's smaps.
//!
//! Imports nothing from the crate: the engine above decides when to ask.

mod collapse;
mod smaps;
mod system;

pub use collapse::{Collapsed, collapse, collapse_allowed};
pub use smaps::on_huge_pages;
