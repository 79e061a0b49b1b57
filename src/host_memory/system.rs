//! Whether this host can put any memory on huge pages that smaps would count: where it cannot,
//! every answer is small pages, and no smaps is read for one. Also the page sizes the crate uses.

use std::sync::OnceLock;

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
const MEMINFO: &str = "/proc/meminfo";

/// Whether memory of processes of this host may lie on huge pages, read once per process (the
/// THP mode and the hugetlbfs pool are host settings an administrator rarely changes; a change
/// after the first look costs speed, never correctness).
pub(super) fn huge_pages_possible() -> bool {
    static POSSIBLE: OnceLock<bool> = OnceLock::new();
    *POSSIBLE.get_or_init(|| {
        let thp = std::fs::read_to_string(THP_ENABLED).ok();
        let meminfo = std::fs::read_to_string(MEMINFO).ok();
        let possible = possible(thp.as_deref(), meminfo.as_deref());
        if !possible {
            log::debug!("THP is off and no hugetlbfs pages exist: no smaps is read for page sizes");
        }
        possible
    })
}

/// Whether the administrator turned transparent huge pages off (`[never]`), read once per process;
/// unreadable counts as off too (no THP support built, or no sysfs to ask).
pub(super) fn thp_never() -> bool {
    static NEVER: OnceLock<bool> = OnceLock::new();
    *NEVER.get_or_init(|| std::fs::read_to_string(THP_ENABLED).map_or(true, |mode| mode.contains("[never]")))
}

/// Whether huge pages are possible given the THP mode (`enabled`'s text) and `/proc/meminfo`'s
/// text, `None` where unreadable. Only a mode of `[never]` with no hugetlbfs pool rules them out:
/// smaps counts anonymous THP and hugetlbfs pages only (shmem THP, governed by another switch,
/// never reads as huge here anyway), and anything unknown leaves the looks on.
pub(super) fn possible(thp_enabled: Option<&str>, meminfo: Option<&str>) -> bool {
    let never = thp_enabled.is_some_and(|mode| mode.contains("[never]"));
    let Some(meminfo) = meminfo.filter(|_| never) else { return true };
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            value.split_ascii_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let listed = |name: &str| meminfo.lines().any(|line| line.starts_with(name));
    let (pool, hugetlb) = (field("HugePages_Total"), field("Hugetlb"));
    let understood = listed("MemTotal:")
        && (pool.is_some() || !listed("HugePages_Total:"))
        && (hugetlb.is_some() || !listed("Hugetlb:"));
    // HugePages_Total counts the default size's pool, Hugetlb (newer kernels) the memory of
    // every size's; a kernel without hugetlbfs lists neither.
    !understood || pool.unwrap_or(0) > 0 || hugetlb.unwrap_or(0) > 0
}

/// The huge page size this library asks for (and collapses into): 2 MiB.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// The kernel's base page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO_NO_POOL: &str = "MemTotal:       65826296 kB\nAnonHugePages:         0 kB\n\
                                   HugePages_Total:       0\nHugePages_Free:        0\nHugepagesize:       2048 kB\n\
                                   Hugetlb:               0 kB\n";

    #[test]
    fn only_thp_never_without_a_hugetlbfs_pool_rules_huge_pages_out() {
        let never = Some("always madvise [never]\n");
        assert!(!possible(never, Some(MEMINFO_NO_POOL)), "THP off, no pool");
        let pool = MEMINFO_NO_POOL.replace("HugePages_Total:       0", "HugePages_Total:      16");
        assert!(possible(never, Some(&pool)), "a hugetlbfs pool of the default size");
        let other_size = MEMINFO_NO_POOL.replace("Hugetlb:               0 kB", "Hugetlb:         1048576 kB");
        assert!(possible(never, Some(&other_size)), "a pool of 1 GiB pages only");
        let old_kernel = "MemTotal:       65826296 kB\nHugePages_Total:       0\n";
        assert!(!possible(never, Some(old_kernel)), "no Hugetlb line: the default pool decides");
        let no_hugetlbfs = "MemTotal:       65826296 kB\nMemFree:        1000 kB\n";
        assert!(!possible(never, Some(no_hugetlbfs)), "a kernel without hugetlbfs");
        for mode in ["[always] madvise never\n", "always [madvise] never\n"] {
            assert!(possible(Some(mode), Some(MEMINFO_NO_POOL)), "{mode:?}");
        }
        assert!(possible(None, Some(MEMINFO_NO_POOL)), "THP mode unreadable: look");
        assert!(possible(never, None), "meminfo unreadable: look");
        assert!(possible(never, Some("garbage")), "meminfo not understood: look");
        assert!(possible(never, Some("MemTotal: 1 kB\nHugePages_Total: lots\n")), "a pool not understood: look");
    }
}
