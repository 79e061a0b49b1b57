//! Whether a range of this process's memory lies mostly on huge pages, from `/proc/self/smaps`.
//!
//! The kernel builds smaps as it is read, walking the page tables of each mapping it lists (about
//! 12 ms per GiB resident on small pages), so the read stops at the first mapping past the range:
//! mappings above it cost nothing. Anything that cannot be read or parsed reads as small pages,
//! which costs speed, never correctness.

use std::io::{self, BufRead, BufReader};

use super::system;

/// Share of the resident bytes that must lie on huge pages, in tenths: below it enough 4 KiB pages
/// remain for their pinning to dominate the copy.
const HUGE_TENTHS: u64 = 9;

/// Whether at least 90 % of the resident bytes of `[addr, addr + len)` lie on huge pages
/// (transparent or hugetlbfs): counted over the range's own pages where the kernel can scan them
/// (`pagemap`), else over the mappings smaps lists that overlap the range.
pub fn on_huge_pages(addr: usize, len: usize) -> bool {
    if !system::huge_pages_possible() {
        return false;
    }
    if let Some((present, huge)) = super::pagemap::present_and_huge(addr, len) {
        return Tally { resident: present, huge }.huge();
    }
    let read = std::fs::File::open("/proc/self/smaps").and_then(|file| tally(BufReader::new(file), addr, len));
    match read {
        Ok(tally) => tally.huge(),
        Err(e) => {
            log::debug!("cannot read /proc/self/smaps ({e}): memory counts as on small pages");
            false
        }
    }
}

/// Resident and huge-page bytes of the mappings a range overlaps.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    resident: u64,
    huge: u64,
}

impl Tally {
    fn huge(&self) -> bool {
        self.resident > 0 && self.huge.saturating_mul(10) >= self.resident.saturating_mul(HUGE_TENTHS)
    }
}

/// The counters of the mapping being parsed, as its lines come.
#[derive(Debug, Default)]
struct Counters {
    rss: Option<u64>,
    anon_huge: u64,
    hugetlb: u64,
}

impl Counters {
    /// Adds this mapping's counters to `tally`. hugetlbfs pages are counted apart from Rss; a
    /// mapping without an Rss line (and no hugetlbfs pages) says nothing.
    fn add_to(&self, tally: &mut Tally) {
        let rss = self.rss.unwrap_or(0);
        if self.rss.is_none() && self.hugetlb == 0 {
            return;
        }
        tally.resident = tally.resident.saturating_add(rss).saturating_add(self.hugetlb);
        tally.huge = tally.huge.saturating_add(self.anon_huge.min(rss)).saturating_add(self.hugetlb);
    }
}

/// Tallies the mappings of smaps text that overlap `[addr, addr + len)`: each a header line
/// (`start-end perms ...`) and its `Name: N kB` lines. Stops at the first header at or past the
/// range's end (the kernel lists mappings in address order). Streamed, a line at a time.
fn tally(mut text: impl BufRead, addr: usize, len: usize) -> io::Result<Tally> {
    let end = addr.saturating_add(len);
    let mut tally = Tally::default();
    let mut current: Option<Counters> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        if text.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        // A path that is not UTF-8 must not hide its header.
        let line = String::from_utf8_lossy(&line);
        if let Some((start, stop)) = header(&line) {
            if let Some(counters) = current.take() {
                counters.add_to(&mut tally);
            }
            if start >= end {
                break;
            }
            current = (stop > addr).then(Counters::default);
        } else if let (Some(counters), Some((name, bytes))) = (current.as_mut(), counter(&line)) {
            match name {
                "Rss" => counters.rss = Some(bytes),
                "AnonHugePages" => counters.anon_huge = bytes,
                "Shared_Hugetlb" | "Private_Hugetlb" => counters.hugetlb = counters.hugetlb.saturating_add(bytes),
                _ => {}
            }
        }
    }
    if let Some(counters) = current {
        counters.add_to(&mut tally);
    }
    Ok(tally)
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

    fn huge_in(text: &str, addr: usize, len: usize) -> bool {
        tally(text.as_bytes(), addr, len).unwrap().huge()
    }

    #[test]
    fn the_mappings_overlapping_a_range_decide() {
        assert!(huge_in(SMAPS, BASE + M, M), "inside one mapping on huge pages");
        assert!(huge_in(SMAPS, BASE, 4 * M), "the whole of it, not the next mapping it ends at");
        assert!(!huge_in(SMAPS, BASE + 4 * M, M), "half of the resident bytes is not enough");
        assert!(!huge_in(SMAPS, BASE + 3 * M, 2 * M), "partial overlap of two mappings");
        assert!(!huge_in(SMAPS, BASE + 8 * M, 4096), "small pages only");
        assert!(!huge_in(SMAPS, BASE + 10 * M, 4096), "nothing resident");
        assert!(huge_in(SMAPS, BASE + 12 * M, 2 * M), "hugetlbfs pages count as huge");
        assert!(!huge_in(SMAPS, 0x1000, 4096), "no mapping");
        assert!(!huge_in(SMAPS, BASE, 16 * M), "five adjacent mappings, mostly small pages");
        let mostly = |huge_kib: u32| {
            let text =
                format!("7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 4096 kB\nAnonHugePages: {huge_kib} kB\n");
            huge_in(&text, BASE, M)
        };
        assert!(mostly(3800), "93 % on huge pages is enough");
        assert!(!mostly(3600), "88 % is not");
    }

    #[test]
    fn the_read_stops_at_the_first_mapping_past_the_range() {
        struct Counted<'a> {
            text: &'a [u8],
            handed: usize,
        }
        impl io::Read for Counted<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7).min(self.text.len());
                buf[..n].copy_from_slice(&self.text[..n]);
                self.text = &self.text[n..];
                self.handed += n;
                Ok(n)
            }
        }
        let mut reader = Counted { text: SMAPS.as_bytes(), handed: 0 };
        let got = tally(BufReader::with_capacity(16, &mut reader), BASE + M, M).unwrap();
        assert_eq!(got, Tally { resident: 4 << 20, huge: 4 << 20 }, "the one mapping overlapped");
        let stop = SMAPS.find("7f0000800000-").unwrap();
        assert!(
            reader.handed < stop + 40,
            "read {} bytes, the next mapping past the range starts at {stop}",
            reader.handed
        );
    }

    #[test]
    fn missing_fields_and_garbage_read_as_small_pages() {
        let no_rss = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nAnonHugePages:      4096 kB\n";
        assert!(!huge_in(no_rss, BASE, M), "without Rss nothing is known");
        let no_huge = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss:                4096 kB\n";
        assert!(!huge_in(no_huge, BASE, M), "without AnonHugePages nothing is on huge pages");
        let lying = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss: 4 kB\nAnonHugePages: 4096 kB\n";
        assert!(huge_in(lying, BASE, M), "more huge than resident bytes counts the resident ones");
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
            assert!(!huge_in(garbage, BASE, M), "{garbage:?}");
        }
        let huge_counters = "Rss: 4096 kB\nAnonHugePages: 4096 kB\n";
        let orphan =
            format!("{huge_counters}7f0000000000-7f0000400000 rw-p 0 00:00 0\nRss: 8 kB\nAnonHugePages: 0 kB\n");
        assert!(!huge_in(&orphan, BASE, M), "counters before any header belong to no mapping");
        assert!(!huge_in(SMAPS, usize::MAX - 10, 100), "a range past the address space");
        let mut not_utf8 = b"7f0000000000-7f0000400000 rw-p 0 00:00 0 /tmp/\xff\xfe\n".to_vec();
        not_utf8.extend_from_slice(b"Rss: 4096 kB\nAnonHugePages: 4096 kB\n");
        assert!(tally(&not_utf8[..], BASE, M).unwrap().huge(), "a path that is not UTF-8 keeps its header");
        struct Failing;
        impl io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ESRCH))
            }
        }
        assert!(tally(BufReader::new(Failing), BASE, M).is_err(), "a read that fails midway says so");
    }

    #[test]
    fn a_buffer_of_this_process_reads_as_what_the_kernel_gave_it() {
        let small = AlignedMapping::new(4 * M, libc::MADV_NOHUGEPAGE, 0x5a);
        assert!(!on_huge_pages(small.addr(), 4 * M), "a mapping refusing huge pages");
        let asked = AlignedMapping::new(4 * M, libc::MADV_HUGEPAGE, 0x5a);
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if mode.contains("[never]") || mode.is_empty() {
            assert!(!on_huge_pages(asked.addr(), 4 * M), "THP is off ({mode:?}), yet the buffer reads as huge");
        }
        // Elsewhere the kernel may or may not have found huge pages: both answers are true ones.
    }
}
