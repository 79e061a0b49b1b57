//! What `/proc/<pid>/smaps` says about a process's memory: each mapping's resident bytes and how
//! many of them lie on huge pages, kept from one read, so that any range inside those mappings can
//! be answered without reading again.

use std::io::{self, BufRead, BufReader};

/// Share of the resident bytes that must lie on huge pages, in tenths: below it enough 4 KiB pages
/// remain for their pinning to dominate the copy.
const HUGE_TENTHS: u64 = 9;

/// Mappings one read keeps at most (32 bytes each, so 2 MiB): a process with more keeps its lowest
/// ones, and ranges above them read as small pages.
pub(super) const MAX_MAPPINGS: usize = 1 << 16;

/// One mapping of smaps, with the counters that matter here (bytes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    /// Resident bytes, hugetlbfs pages included (smaps counts those apart from Rss); 0 for a
    /// mapping without an Rss line, which says nothing.
    resident: u64,
    /// Of those, the bytes on huge pages.
    huge: u64,
}

/// The counters of the mapping being parsed, as its lines come.
#[derive(Debug, Default)]
struct Counters {
    rss: Option<u64>,
    anon_huge: u64,
    hugetlb: u64,
}

impl Counters {
    fn mapping(&self, (start, end): (usize, usize)) -> Mapping {
        let rss = self.rss.unwrap_or(0);
        let resident = if self.rss.is_some() || self.hugetlb > 0 { rss.saturating_add(self.hugetlb) } else { 0 };
        let huge = if resident > 0 { self.anon_huge.min(rss).saturating_add(self.hugetlb) } else { 0 };
        Mapping { start, end, resident, huge }
    }
}

/// The mappings of one read of a process's smaps, sorted by address.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    mappings: Vec<Mapping>,
    /// The read stopped at `MAX_MAPPINGS`: nothing is known above the last mapping kept, and
    /// reading again would not tell more.
    truncated: bool,
}

/// Resident and huge-page bytes of the mappings that ranges overlap, summed over them.
#[derive(Debug, Default)]
pub(super) struct Tally {
    resident: u64,
    huge: u64,
    /// The mapping counted last, so that consecutive ranges in one mapping count it once.
    last: Option<usize>,
}

impl Tally {
    /// At least 90 % of the resident bytes lie on huge pages, and some are resident.
    pub(super) fn huge(&self) -> bool {
        self.resident > 0 && self.huge.saturating_mul(10) >= self.resident.saturating_mul(HUGE_TENTHS)
    }
}

impl Snapshot {
    /// Adds the mappings overlapping `[addr, addr + len)` to `tally`; whether the snapshot covers
    /// the range, that is whether every byte of it lies in a mapping it knows (or above what a
    /// truncated read kept). A range it does not cover lies in memory mapped since, or in none.
    pub(super) fn tally(&self, addr: usize, len: usize, tally: &mut Tally) -> bool {
        let end = addr.saturating_add(len);
        let mut i = self.mappings.partition_point(|m| m.end <= addr);
        let mut at = addr;
        while at < end {
            let Some(m) = self.mappings.get(i) else { return self.truncated };
            if m.start > at {
                return false;
            }
            if tally.last != Some(i) {
                tally.resident = tally.resident.saturating_add(m.resident);
                tally.huge = tally.huge.saturating_add(m.huge);
                tally.last = Some(i);
            }
            at = at.max(m.end);
            i += 1;
        }
        true
    }

    /// Whether `[addr, addr + len)` lies on huge pages; `None` where the snapshot does not cover it.
    pub(super) fn on_huge_pages(&self, addr: usize, len: usize) -> Option<bool> {
        let mut tally = Tally::default();
        self.tally(addr, len, &mut tally).then(|| tally.huge())
    }

    /// The snapshot of smaps text (none where it does not parse), as tests describe a process.
    #[cfg(test)]
    pub(crate) fn from_text(text: &str) -> Snapshot {
        parse(text.as_bytes(), MAX_MAPPINGS).unwrap_or_default()
    }

    /// Mappings known.
    pub(super) fn len(&self) -> usize {
        self.mappings.len()
    }
}

/// Reads the smaps of process `pid` (`None`: this process), a line at a time; `None` where it
/// cannot be read.
pub(crate) fn read(pid: Option<u32>) -> Option<Snapshot> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/smaps"),
        None => "/proc/self/smaps".to_owned(),
    };
    let read = std::fs::File::open(&path).and_then(|file| parse(BufReader::new(file), MAX_MAPPINGS));
    read.map_err(|e| log::debug!("cannot read {path} ({e}): its memory counts as on small pages")).ok()
}

/// Whether `[addr, addr + len)` of process `pid` (`None`: this process) lies on huge pages, from
/// a read of its smaps now; small pages where it cannot be read or does not cover the range.
pub fn range_on_huge_pages(pid: Option<u32>, addr: usize, len: usize) -> bool {
    read(pid).and_then(|snapshot| snapshot.on_huge_pages(addr, len)).unwrap_or(false)
}

/// The mappings of smaps text, each a header line (`start-end perms ...`) and its `Name: N kB`
/// lines, at most `cap` of them. Lines that fit neither are skipped, as are counters before the
/// first header. Streamed: a process with many mappings has megabytes of smaps, none of it kept.
fn parse(mut text: impl BufRead, cap: usize) -> io::Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    let mut current: Option<((usize, usize), Counters)> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        if text.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        // A path that is not UTF-8 must not hide its header.
        let line = String::from_utf8_lossy(&line);
        if let Some(range) = header(&line) {
            if let Some((range, counters)) = current.take() {
                snapshot.mappings.push(counters.mapping(range));
            }
            if snapshot.mappings.len() >= cap {
                snapshot.truncated = true;
                break;
            }
            current = Some((range, Counters::default()));
        } else if let (Some((_, counters)), Some((name, bytes))) = (current.as_mut(), counter(&line)) {
            match name {
                "Rss" => counters.rss = Some(bytes),
                "AnonHugePages" => counters.anon_huge = bytes,
                "Shared_Hugetlb" | "Private_Hugetlb" => counters.hugetlb = counters.hugetlb.saturating_add(bytes),
                _ => {}
            }
        }
    }
    if let Some((range, counters)) = current {
        snapshot.mappings.push(counters.mapping(range));
    }
    // The kernel lists mappings in address order; sorting makes the lookups hold for any text.
    snapshot.mappings.sort_unstable_by_key(|m| m.start);
    Ok(snapshot)
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

    fn snapshot(text: &str) -> Snapshot {
        parse(text.as_bytes(), MAX_MAPPINGS).unwrap()
    }

    /// The answer for a range from smaps text: `None` where its mappings do not cover it.
    fn answer_in(text: &str, addr: usize, len: usize) -> Option<bool> {
        snapshot(text).on_huge_pages(addr, len)
    }

    #[test]
    fn the_mappings_overlapping_a_range_decide() {
        assert_eq!(answer_in(SMAPS, BASE + M, M), Some(true), "inside one mapping on huge pages");
        assert_eq!(answer_in(SMAPS, BASE, 4 * M), Some(true), "the whole of it");
        assert_eq!(answer_in(SMAPS, BASE + 4 * M, M), Some(false), "half of the resident bytes is not enough");
        assert_eq!(answer_in(SMAPS, BASE + 3 * M, 2 * M), Some(false), "partial overlap of two mappings");
        assert_eq!(answer_in(SMAPS, BASE + 8 * M, 4096), Some(false), "small pages only");
        assert_eq!(answer_in(SMAPS, BASE + 10 * M, 4096), Some(false), "nothing resident: not known");
        assert_eq!(answer_in(SMAPS, BASE + 12 * M, 2 * M), Some(true), "hugetlbfs pages count as huge");
        assert_eq!(answer_in(SMAPS, 0x1000, 4096), None, "no mapping: not covered");
        assert_eq!(answer_in(SMAPS, 0x400000, 0x52000), Some(false), "the first mapping, exactly");
        assert_eq!(answer_in(SMAPS, 0x451000, 0x2000), None, "running past a mapping into a gap");
        assert_eq!(answer_in(SMAPS, BASE, 16 * M), Some(false), "five adjacent mappings, mostly small pages");
        assert_eq!(answer_in(SMAPS, BASE + 15 * M, 2 * M), None, "running past the last mapping");
        let mostly = |huge_kib: u32| {
            let text =
                format!("7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: {huge_kib} kB\n");
            answer_in(&text, BASE, M).unwrap()
        };
        assert!(mostly(3800), "93 % on huge pages is enough");
        assert!(!mostly(3600), "88 % is not");
        let end_of_huge = answer_in(SMAPS, BASE, 4 * M);
        assert_eq!(end_of_huge, Some(true), "a range ending where the next mapping starts does not overlap it");
        let all = snapshot(SMAPS);
        assert_eq!(all.len(), 6);
        let mut tally = Tally::default();
        for i in 0..4 {
            assert!(all.tally(BASE + i * M, M, &mut tally), "ranges in one mapping");
        }
        assert!(all.tally(BASE + 12 * M, M, &mut tally));
        assert_eq!((tally.resident, tally.huge), (8 << 20, 8 << 20), "each mapping counted once");
    }

    #[test]
    fn missing_fields_and_garbage_read_as_small_pages() {
        let no_rss = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nAnonHugePages:      4096 kB\n";
        assert_eq!(answer_in(no_rss, BASE, M), Some(false), "without Rss nothing is known");
        let no_huge = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss:                4096 kB\n";
        assert_eq!(answer_in(no_huge, BASE, M), Some(false), "without AnonHugePages nothing is on huge pages");
        let lying = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss: 4 kB\nAnonHugePages: 4096 kB\n";
        assert_eq!(answer_in(lying, BASE, M), Some(true), "more huge than resident bytes counts the resident ones");
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
            assert!(!answer_in(garbage, BASE, M).unwrap_or(false), "{garbage:?}");
        }
        let huge_counters = "Rss: 4096 kB\nAnonHugePages: 4096 kB\n";
        let orphan =
            format!("{huge_counters}7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 8 kB\nAnonHugePages: 0 kB\n");
        assert_eq!(answer_in(&orphan, BASE, M), Some(false), "counters before any header belong to no mapping");
        assert_eq!(answer_in(SMAPS, usize::MAX - 10, 100), None, "a range past the address space");
        let mut not_utf8 = b"7f0000000000-7f0000400000 rw-p 0 00:00 0 /tmp/\xff\xfe\n".to_vec();
        not_utf8.extend_from_slice(b"Rss: 4096 kB\nAnonHugePages: 4096 kB\n");
        let read = parse(&not_utf8[..], MAX_MAPPINGS).unwrap();
        assert_eq!(read.on_huge_pages(BASE, M), Some(true), "a path that is not UTF-8 keeps its header");
        let overlapping = "7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 4096 kB\n\
                           7f0000100000-7f0000200000 rw-p 0 00:00 0\nRss: 4096 kB\n";
        assert_eq!(
            answer_in(overlapping, BASE, 4 * M),
            Some(false),
            "overlapping mappings count each, and the walk ends"
        );
        assert!(!range_on_huge_pages(Some(u32::MAX), BASE, M), "no such process");
        assert!(read_none(), "no such process: no snapshot");
    }

    fn read_none() -> bool {
        super::read(Some(u32::MAX)).is_none()
    }

    #[test]
    fn the_parse_streams_and_keeps_at_most_its_cap() {
        // Read a line at a time from a reader that hands out a few bytes per call: nothing needs
        // the whole text at once.
        struct Trickle<'a>(&'a [u8]);
        impl io::Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let trickled = parse(BufReader::with_capacity(16, Trickle(SMAPS.as_bytes())), MAX_MAPPINGS).unwrap();
        assert_eq!(trickled.mappings, snapshot(SMAPS).mappings, "the same mappings however the text arrives");
        let kept = parse(SMAPS.as_bytes(), 3).unwrap();
        assert_eq!(kept.len(), 3);
        assert!(kept.truncated);
        assert_eq!(kept.on_huge_pages(BASE + M, M), Some(true), "what was kept answers");
        assert_eq!(kept.on_huge_pages(BASE + 8 * M, M), Some(false), "above it small pages, and no read again");
        assert_eq!(kept.on_huge_pages(0x1000, 4096), None, "a gap below it is still a gap");
        struct Failing;
        impl io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ESRCH))
            }
        }
        assert!(parse(BufReader::new(Failing), MAX_MAPPINGS).is_err(), "a read that fails midway says so");
    }

    #[test]
    fn a_buffer_of_this_process_reads_as_what_the_kernel_gave_it() {
        let small = AlignedMapping::new(4 * M, libc::MADV_NOHUGEPAGE, 0x5a);
        assert!(!range_on_huge_pages(None, small.addr(), 4 * M), "a mapping refusing huge pages");
        let pid = Some(std::process::id());
        assert!(!range_on_huge_pages(pid, small.addr(), 4 * M), "the same through our pid");
        let asked = AlignedMapping::new(4 * M, libc::MADV_HUGEPAGE, 0x5a);
        let ours = super::read(None).expect("our own smaps reads");
        let answer = ours.on_huge_pages(asked.addr(), 4 * M);
        assert!(answer.is_some(), "a mapping made before the read is covered by it");
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if mode.contains("[never]") || mode.is_empty() {
            assert_eq!(answer, Some(false), "THP is off ({mode:?}), yet the buffer reads as on huge pages");
        }
        // Elsewhere the kernel may or may not have found huge pages: both answers are true ones.
    }
}
