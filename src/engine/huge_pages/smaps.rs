//! What `/proc/<pid>/smaps` says about a range of a process's memory: whether the mappings
//! overlapping it lie mostly on huge pages, and which addresses they cover.

/// Share of the resident bytes that must lie on huge pages, in tenths: below it enough 4 KiB pages
/// remain for their pinning to dominate the copy.
const HUGE_TENTHS: u64 = 9;

/// What the mappings overlapping a range say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// At least 90 % of the resident bytes of the overlapping mappings lie on huge pages (and some
    /// are resident).
    pub huge: bool,
    /// The addresses those mappings cover together with the range: the answer holds for any range
    /// inside it while the mappings stay.
    pub span: (usize, usize),
}

/// One mapping of smaps, with the counters that matter here (bytes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    rss: Option<u64>,
    anon_huge: u64,
    /// hugetlbfs pages, which smaps counts apart from Rss.
    hugetlb: u64,
}

impl Mapping {
    fn resident(&self) -> u64 {
        self.rss.unwrap_or(0).saturating_add(self.hugetlb)
    }

    fn huge(&self) -> u64 {
        self.anon_huge.min(self.rss.unwrap_or(0)).saturating_add(self.hugetlb)
    }

    /// Whether its counters were read (a mapping without an Rss line says nothing).
    fn known(&self) -> bool {
        self.rss.is_some() || self.hugetlb > 0
    }
}

/// Whether `[addr, addr + len)` of process `pid` (`None`: this process) lies on huge pages.
pub fn range_on_huge_pages(pid: Option<u32>, addr: usize, len: usize) -> Answer {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/smaps"),
        None => "/proc/self/smaps".to_owned(),
    };
    match std::fs::read(&path) {
        Ok(bytes) => answer_in(&String::from_utf8_lossy(&bytes), addr, len),
        Err(e) => {
            log::debug!("cannot read {path} ({e}): its memory counts as on small pages");
            unknown(addr, len)
        }
    }
}

/// The answer for a range nothing is known about: small pages, for the range alone.
pub(super) fn unknown(addr: usize, len: usize) -> Answer {
    Answer { huge: false, span: (addr, addr.saturating_add(len)) }
}

/// The answer for `[addr, addr + len)` from smaps text.
fn answer_in(smaps: &str, addr: usize, len: usize) -> Answer {
    let end = addr.saturating_add(len);
    let (mut resident, mut huge, mut span) = (0u64, 0u64, (addr, end));
    for m in mappings(smaps).filter(|m| m.start < end && addr < m.end && m.known()) {
        resident = resident.saturating_add(m.resident());
        huge = huge.saturating_add(m.huge());
        span = (span.0.min(m.start), span.1.max(m.end));
    }
    let huge = resident > 0 && huge.saturating_mul(10) >= resident.saturating_mul(HUGE_TENTHS);
    Answer { huge, span }
}

/// The mappings of smaps text, each a header line (`start-end perms ...`) and its `Name: N kB`
/// lines. Lines that fit neither are skipped; a header that does not parse drops its counters.
fn mappings(smaps: &str) -> impl Iterator<Item = Mapping> + '_ {
    let mut lines = smaps.lines().peekable();
    std::iter::from_fn(move || {
        loop {
            let line = lines.next()?;
            let Some((start, end)) = header(line) else { continue };
            let mut m = Mapping { start, end, ..Mapping::default() };
            while let Some(next) = lines.peek() {
                if header(next).is_some() {
                    break;
                }
                if let Some((name, bytes)) = counter(next) {
                    match name {
                        "Rss" => m.rss = Some(bytes),
                        "AnonHugePages" => m.anon_huge = bytes,
                        "Shared_Hugetlb" | "Private_Hugetlb" => m.hugetlb = m.hugetlb.saturating_add(bytes),
                        _ => {}
                    }
                }
                lines.next();
            }
            return Some(m);
        }
    })
}

/// A mapping's first line: `start-end perms offset dev inode [path]`, addresses in hex.
fn header(line: &str) -> Option<(usize, usize)> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
    (start < end).then_some((start, end))
}

/// A counter line: `Name:   N kB`, as bytes.
fn counter(line: &str) -> Option<(&str, u64)> {
    let (name, rest) = line.split_once(':')?;
    let mut value = rest.split_ascii_whitespace();
    let kib = value.next()?.parse::<u64>().ok()?;
    (value.next()? == "kB").then(|| (name, kib.saturating_mul(1024)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::mapping::AlignedMapping;

    const SMAPS: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
Size:                328 kB
Rss:                 300 kB
AnonHugePages:         0 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
KernelPageSize:        4 kB
Rss:                4096 kB
Pss:                4096 kB
AnonHugePages:      4096 kB
VmFlags: rd wr mr mw me ac hg
7f0000400000-7f0000800000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:      2048 kB
7f0000800000-7f0000a00000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                 200 kB
AnonHugePages:         0 kB
7f0000a00000-7f0000c00000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                   0 kB
AnonHugePages:         0 kB
7f0000c00000-7f0001000000 rw-s 00000000 00:0f 1234        /anon_hugepage (deleted)
Size:               4096 kB
KernelPageSize:     2048 kB
Rss:                   0 kB
Shared_Hugetlb:     4096 kB
Private_Hugetlb:       0 kB
";

    const M: usize = 1 << 20;
    const BASE: usize = 0x7f00_0000_0000;

    #[test]
    fn the_mappings_overlapping_a_range_decide() {
        let huge = answer_in(SMAPS, BASE + M, M);
        assert_eq!(huge, Answer { huge: true, span: (BASE, BASE + 4 * M) }, "inside one mapping on huge pages");
        let half = answer_in(SMAPS, BASE + 4 * M, M);
        assert!(!half.huge, "half of the resident bytes on huge pages is not enough");
        let both = answer_in(SMAPS, BASE + 3 * M, 2 * M);
        assert_eq!(both, Answer { huge: false, span: (BASE, BASE + 8 * M) }, "partial overlap of two mappings");
        assert!(!answer_in(SMAPS, BASE + 8 * M, 4096).huge, "small pages only");
        assert!(!answer_in(SMAPS, BASE + 10 * M, 4096).huge, "nothing resident: not known");
        assert!(answer_in(SMAPS, BASE + 12 * M, 2 * M).huge, "hugetlbfs pages count as huge");
        let outside = answer_in(SMAPS, 0x1000, 4096);
        assert_eq!(outside, Answer { huge: false, span: (0x1000, 0x2000) }, "no mapping: the range itself");
        let mostly = |huge_kib: u32| {
            let text =
                format!("7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: {huge_kib} kB\n");
            answer_in(&text, BASE, M).huge
        };
        assert!(mostly(3800), "93 % on huge pages is enough");
        assert!(!mostly(3600), "88 % is not");
        let end_of_huge = answer_in(SMAPS, BASE, 4 * M);
        assert!(end_of_huge.huge, "a range ending where the next mapping starts does not overlap it");
    }

    #[test]
    fn missing_fields_and_garbage_read_as_small_pages() {
        let no_rss = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nAnonHugePages:      4096 kB\n";
        assert!(!answer_in(no_rss, BASE, M).huge, "without Rss nothing is known");
        let no_huge = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss:                4096 kB\n";
        assert!(!answer_in(no_huge, BASE, M).huge, "without AnonHugePages nothing is on huge pages");
        let lying = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss: 4 kB\nAnonHugePages: 4096 kB\n";
        assert!(answer_in(lying, BASE, M).huge, "more huge than resident bytes counts the resident ones");
        for garbage in [
            "",
            "\0\0\0",
            "not smaps at all",
            "7f0000400000-7f0000000000 rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: 4096 kB\n",
            "zz-7f0000400000 rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: 4096 kB\n",
            "7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: lots kB\nAnonHugePages: 4096 kB\n",
            "7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 4096 MB\nAnonHugePages: 4096 kB\n",
            "7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 99999999999999999999999 kB\nAnonHugePages: 1 kB\n",
        ] {
            assert!(!answer_in(garbage, BASE, M).huge, "{garbage:?}");
        }
        let huge_counters = "Rss: 4096 kB\nAnonHugePages: 4096 kB\n";
        let orphan =
            format!("{huge_counters}7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 8 kB\nAnonHugePages: 0 kB\n");
        assert!(!answer_in(&orphan, BASE, M).huge, "counters before any header belong to no mapping");
        assert!(!answer_in(SMAPS, usize::MAX - 10, 100).huge, "a range past the address space");
        assert!(!range_on_huge_pages(Some(u32::MAX), BASE, M).huge, "no such process");
    }

    #[test]
    fn a_buffer_of_this_process_reads_as_what_the_kernel_gave_it() {
        let small = AlignedMapping::new(4 * M, libc::MADV_NOHUGEPAGE, 0x5a);
        assert!(!range_on_huge_pages(None, small.addr(), 4 * M).huge, "a mapping refusing huge pages");
        let pid = Some(std::process::id());
        assert!(!range_on_huge_pages(pid, small.addr(), 4 * M).huge, "the same through our pid");
        let asked = AlignedMapping::new(4 * M, libc::MADV_HUGEPAGE, 0x5a);
        let answer = range_on_huge_pages(None, asked.addr(), 4 * M);
        assert!(answer.span.0 <= asked.addr() && asked.addr() + 4 * M <= answer.span.1, "{answer:?}");
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if mode.contains("[never]") || mode.is_empty() {
            assert!(!answer.huge, "THP is off ({mode:?}), yet the buffer reads as on huge pages");
        }
        // Elsewhere the kernel may or may not have found huge pages: both answers are true ones.
    }
}
