//! How a received message is cut into devmem fragments. TCPX's fragments are what the NIC's page
//! pool hands out: mostly whole 4 KiB pages, partial at the edges of the chunks the sender cut the
//! message into. Random mode adds arbitrary lengths and in-page offsets so that a consumer meets
//! every alignment.

use crate::config::Fragmentation;

pub const PAGE: usize = 4096;
/// `NET_UNPACK_MAX_SLICE_PAGES`: fragments one receive may have (TCPX's
/// `TCPX_UNPACK_MAX_SLICE_PAGES`, `devcomm/unpack_defs1.h`).
pub const MAX_FRAGMENTS: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Offset of the fragment's bytes within the message.
    pub dst_off: u64,
    pub len: u32,
    /// Where in its pool page the fragment starts.
    pub page_off: u32,
}

/// splitmix64: small, seedable, good enough to shuffle pages and draw lengths.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Why a receive cannot be described in one unpack slot; TCPX exits the process on either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failstop {
    /// One chunk (a TCPX task) filled the socket's scatter list: `sock/tcpx.h` `process_recv_cmsg`
    /// stops at `cnt_cache >= 2048`.
    Task,
    /// The whole request needs this many fragments, more than 2048: `net_tcpx.cc` `tcpxTest`.
    Request(usize),
}

/// The fragments of a `size`-byte message, or the failstop TCPX would hit receiving it (checked
/// per chunk first, as the chunks arrive, then for the request when `test` completes it).
pub fn plan(size: usize, chunk: usize, mode: Fragmentation, rng: &mut Rng) -> Result<Vec<Fragment>, Failstop> {
    let mut frags = Vec::new();
    // Fragments beyond what a slot holds are counted, not kept, so a huge size costs no memory.
    let mut beyond = 0usize;
    let mut chunk_start = 0;
    while chunk_start < size {
        let chunk_end = size.min(chunk_start.saturating_add(chunk));
        let mut in_chunk = 0;
        let mut off = chunk_start;
        while off < chunk_end {
            let left = chunk_end - off;
            let (len, page_off) = match mode {
                Fragmentation::Page => (left.min(PAGE), 0),
                Fragmentation::Random => {
                    // Half whole pages, half random lengths: every length and alignment shows up while
                    // a 4 MiB receive stays well under 2048 fragments, as on the real NIC.
                    let want = if rng.next() & 1 == 0 { PAGE } else { 1 + rng.below(PAGE - 1) };
                    let len = want.min(left);
                    (len, rng.below(PAGE - len + 1))
                }
            };
            in_chunk += 1;
            if in_chunk >= MAX_FRAGMENTS {
                return Err(Failstop::Task);
            }
            if frags.len() < MAX_FRAGMENTS {
                frags.push(Fragment { dst_off: off as u64, len: len as u32, page_off: page_off as u32 });
            } else {
                beyond += 1;
            }
            off += len;
        }
        chunk_start = chunk_end;
    }
    if beyond > 0 {
        return Err(Failstop::Request(MAX_FRAGMENTS + beyond));
    }
    Ok(frags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers_exactly(frags: &[Fragment], size: usize) {
        let mut next = 0u64;
        for f in frags {
            assert_eq!(f.dst_off, next);
            assert!(f.len >= 1 && f.len as usize <= PAGE);
            assert!(f.page_off as usize + f.len as usize <= PAGE);
            next += f.len as u64;
        }
        assert_eq!(next, size as u64);
    }

    #[test]
    fn page_mode_cuts_at_pages_and_chunk_edges() {
        let mut rng = Rng::new(1);
        assert_eq!(plan(0, 4096, Fragmentation::Page, &mut rng).unwrap(), vec![]);
        let f = plan(10_000, 6000, Fragmentation::Page, &mut rng).unwrap();
        covers_exactly(&f, 10_000);
        let lens: Vec<u32> = f.iter().map(|f| f.len).collect();
        assert_eq!(lens, vec![4096, 1904, 4000]);
        assert!(f.iter().all(|f| f.page_off == 0));
        assert_eq!(plan(8 << 20, 512 << 10, Fragmentation::Page, &mut rng).unwrap().len(), 2048);
        let over = plan((8 << 20) + 1, 512 << 10, Fragmentation::Page, &mut rng);
        assert_eq!(over, Err(Failstop::Request(2049)));
        assert_eq!(plan(12 << 20, 512 << 10, Fragmentation::Page, &mut rng), Err(Failstop::Request(3072)));
        // One chunk of 2048 pages fills a task's scatter list even though the request holds 2048.
        assert_eq!(plan(8 << 20, 8 << 20, Fragmentation::Page, &mut rng), Err(Failstop::Task));
        assert_eq!(plan((8 << 20) - 4096, 8 << 20, Fragmentation::Page, &mut rng).unwrap().len(), 2047);
    }

    #[test]
    fn random_mode_covers_and_varies() {
        let mut rng = Rng::new(7);
        for size in [1, 4095, 4097, 1 << 20, 4 << 20] {
            let f = plan(size, 512 << 10, Fragmentation::Random, &mut rng).unwrap();
            covers_exactly(&f, size);
        }
        let f = plan(1 << 20, 512 << 10, Fragmentation::Random, &mut rng).unwrap();
        assert!(f.iter().any(|f| f.page_off % 16 != 0), "some fragments are misaligned");
        assert!(f.iter().any(|f| f.len as usize == PAGE), "some fragments are whole pages");
    }
}
