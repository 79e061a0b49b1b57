//! Where this process's host memory lies, as the kernel reports it to the process itself: whether a
//! range sits on huge pages (`pagemap.rs`: the range's page tables, where the kernel offers
//! `PAGEMAP_SCAN`; else `smaps.rs`, a read of `/proc/self/smaps`) and
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
mod pagemap;
mod smaps;
mod system;

pub use collapse::{Collapsed, collapse, collapse_allowed};
pub use smaps::on_huge_pages;

pub(crate) use system::{HUGE_PAGE, page_size};

/// Whether `on_huge_pages` counts a range's own pages (cheap, in proportion to the range) rather
/// than reading smaps (in proportion to everything the process maps below the range).
pub fn scans_page_tables() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        // A page of this library's own data, mapped for the process's life.
        static PROBE: u8 = 0;
        let page = (&raw const PROBE as usize) & !4095;
        pagemap::present_and_huge(page, 4096).is_some()
    })
}
