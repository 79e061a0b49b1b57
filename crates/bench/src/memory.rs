//! The memory transfers move between: host memory, or GPU memory that the engine recognizes as such
//! on registration (the socket transport then stages it through pinned host rings). The data pattern
//! is written and checked on the host, so a GPU buffer keeps a host mirror for that; the mirror also
//! serves the raw TCP baselines, which measure host memory in either case.

use uccl_tcpx::internal::cuda::{self, DeviceBuffer};

use std::ops::Range;

use crate::args::{Args, Device};
use crate::ctl;
use crate::host_buffer::HostBuffer;
use crate::layout::Layout;

type Io<T> = std::io::Result<T>;

fn io(e: uccl_tcpx::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

pub enum BenchMemory {
    Host(HostBuffer),
    Gpu { dev: DeviceBuffer, mirror: HostBuffer },
}

impl BenchMemory {
    /// `len` bytes of host memory, or of GPU `ordinal`'s memory; `huge`: the host memory asks for
    /// transparent huge pages.
    pub fn new(gpu: Option<i32>, len: usize, huge: bool) -> Io<BenchMemory> {
        match gpu {
            None => Ok(BenchMemory::Host(prefaulted(len, huge)?)),
            Some(ordinal) => {
                let dev = DeviceBuffer::new(ordinal, len).map_err(io)?;
                Ok(BenchMemory::Gpu { dev, mirror: prefaulted(len, huge)? })
            }
        }
    }

    /// The transfer end's memory as chosen on its command line.
    pub fn for_args(args: &Args, len: usize) -> Io<BenchMemory> {
        BenchMemory::new((args.device == Device::Gpu).then_some(args.gpu), len, args.huge_pages)
    }

    /// The address the engine registers and transfers use.
    pub fn addr(&self) -> usize {
        match self {
            BenchMemory::Host(v) => v.addr(),
            BenchMemory::Gpu { dev, .. } => dev.addr(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            BenchMemory::Host(v) => v.len(),
            BenchMemory::Gpu { dev, .. } => dev.len(),
        }
    }

    /// The GPU the buffer is on; `None` for host memory.
    pub fn gpu(&self) -> Option<i32> {
        match self {
            BenchMemory::Host(_) => None,
            BenchMemory::Gpu { dev, .. } => Some(dev.gpu().ordinal()),
        }
    }

    /// One word for the control protocol and reports: `host`, or `gpu<ordinal>@<PCI bus id>`.
    pub fn describe(&self) -> String {
        match self {
            BenchMemory::Host(_) => "host".into(),
            BenchMemory::Gpu { dev, .. } => format!("gpu{}@{}", dev.gpu().ordinal(), dev.gpu().bus_id()),
        }
    }

    /// Writes the pattern for `seed` to the pieces of slot 0 (piece `k` with seed `seed + k`).
    pub fn fill(&mut self, layout: &Layout, seed: u64) -> Io<()> {
        let hull = self.check_layout(layout)?;
        match self {
            BenchMemory::Host(v) => fill_pieces(v, layout, seed),
            BenchMemory::Gpu { dev, mirror } => {
                fill_pieces(mirror, layout, seed);
                dev.copy_from_host(hull.start, &mirror[hull]).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Zeroes the pieces of slot 0 (a GPU buffer entirely: one memset costs less than a copy).
    pub fn zero(&mut self, layout: &Layout) -> Io<()> {
        self.check_layout(layout)?;
        match self {
            BenchMemory::Host(v) => layout.pieces(0).for_each(|r| v[r].fill(0)),
            BenchMemory::Gpu { dev, .. } => dev.fill(0).map_err(io)?,
        }
        Ok(())
    }

    /// Whether the pieces of slot 0 hold the pattern for `seed`; GPU bytes are copied back to check.
    pub fn check(&mut self, layout: &Layout, seed: u64) -> Io<bool> {
        let hull = self.check_layout(layout)?;
        let pieces_hold = |v: &[u8]| layout.pieces(0).enumerate().all(|(k, r)| ctl::check(&v[r], piece_seed(seed, k)));
        match self {
            BenchMemory::Host(v) => Ok(pieces_hold(v)),
            BenchMemory::Gpu { dev, mirror } => {
                dev.copy_to_host(hull.start, &mut mirror[hull]).map_err(io)?;
                Ok(pieces_hold(mirror))
            }
        }
    }

    /// Host bytes of the same length for the raw TCP baselines (the mirror of a GPU buffer).
    pub fn host(&mut self) -> &mut [u8] {
        match self {
            BenchMemory::Host(v) => v,
            BenchMemory::Gpu { mirror, .. } => mirror,
        }
    }

    /// The bytes from the first piece of slot 0 to the end of its last, once checked to fit.
    fn check_layout(&self, layout: &Layout) -> Io<Range<usize>> {
        let start = layout.pieces(0).map(|r| r.start).min().unwrap_or(0);
        let end = layout.pieces(0).map(|r| r.end).max().unwrap_or(0);
        if end > self.len() {
            return Err(std::io::Error::other(format!(
                "pieces up to byte {end} do not fit a buffer of {}",
                self.len()
            )));
        }
        Ok(start..end)
    }
}

fn piece_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_add(k as u64)
}

fn fill_pieces(v: &mut [u8], layout: &Layout, seed: u64) {
    for (k, r) in layout.pieces(0).enumerate() {
        ctl::fill(&mut v[r], piece_seed(seed, k));
    }
}

/// Zeroed memory whose pages are all mapped: a fresh large allocation is mapped lazily, so the first
/// transfer into each page would pay a page fault and a page clear inside the timed loop (only slot
/// 0 is touched before timing). With 4 in flight, 64 MiB writes measured first ran at 0.61 of raw TCP
/// and the same writes after sends had mapped the pages at 0.98.
pub fn prefaulted(len: usize, huge: bool) -> Io<HostBuffer> {
    let mut v = HostBuffer::new(len)?;
    if huge {
        ask_huge_pages(&v);
    }
    for page in v.chunks_mut(4096) {
        // Volatile: a plain store of zero into memory known to be zero may be optimized away.
        // SAFETY: `page` is a valid, non-empty, exclusively borrowed slice.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
    }
    if huge && len >= HUGE {
        // Advice only: a kernel that declines leaves small pages, and a run must not be read as
        // one on huge pages then.
        let granted = uccl_tcpx::internal::host_memory::on_huge_pages(v.as_ptr() as usize, len);
        if !granted {
            eprintln!(
                "uccl-tcpx-bench: a {len}-byte host buffer asked for huge pages lies mostly on small pages (kernel THP mode: {})",
                thp_mode().unwrap_or_else(|| "unknown".into())
            );
        }
    }
    Ok(v)
}

const HUGE: usize = 2 << 20;

/// Asks for transparent huge pages over the whole 2 MiB extents inside `v` (its edges stay small
/// pages), before any of them is touched: the kernel backs a fault there with a huge page when its
/// THP mode allows. Advice only: a kernel that refuses leaves small pages, which the report's THP
/// mode line explains.
fn ask_huge_pages(v: &[u8]) {
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + v.len()) / HUGE * HUGE;
    if end > start {
        // SAFETY: advice over whole pages of this allocation; it changes no content.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// The kernel's transparent huge page mode (the bracketed word of
/// /sys/kernel/mm/transparent_hugepage/enabled), if it says.
pub fn thp_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// GPUs a `--device gpu` run may use: probes the driver, counts the devices and checks the ordinals.
/// Returns the server end's GPU for a loopback run: `--peer-gpu`, else the next GPU when there are
/// two or more (so each process has its own), else the same one.
pub fn resolve_gpus(args: &Args) -> Result<Option<i32>, String> {
    if !args.uses_gpu() {
        return Ok(None);
    }
    cuda::driver().map_err(|e| format!("--device gpu needs a CUDA driver: {e}"))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| format!("--device gpu: counting CUDA devices failed: {e:?}"))?;
    peer_gpu(args.gpu, args.peer_gpu, count).map(Some)
}

pub fn peer_gpu(gpu: i32, peer: Option<i32>, count: i32) -> Result<i32, String> {
    if count <= 0 {
        return Err("--device gpu: the CUDA driver sees no GPU".into());
    }
    let exists = |g: i32| (0..count).contains(&g);
    if !exists(gpu) {
        return Err(format!("--gpu {gpu} does not exist: {count} GPU(s) are visible"));
    }
    let peer = peer.unwrap_or(if count >= 2 { (gpu + 1) % count } else { gpu });
    if !exists(peer) {
        return Err(format!("--peer-gpu {peer} does not exist: {count} GPU(s) are visible"));
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_gpu_defaults_to_another_gpu_when_there_is_one() {
        assert_eq!(peer_gpu(0, None, 1), Ok(0));
        assert_eq!(peer_gpu(0, None, 2), Ok(1));
        assert_eq!(peer_gpu(1, None, 2), Ok(0));
        assert_eq!(peer_gpu(3, None, 8), Ok(4));
        assert_eq!(peer_gpu(0, Some(0), 2), Ok(0));
        assert!(peer_gpu(1, None, 1).unwrap_err().contains("--gpu 1 does not exist"));
        assert!(peer_gpu(0, Some(2), 2).unwrap_err().contains("--peer-gpu 2 does not exist"));
        assert!(peer_gpu(0, None, 0).is_err());
    }

    #[test]
    fn host_memory_fills_zeroes_and_checks() {
        let mut m = BenchMemory::new(None, 100, false).unwrap();
        assert_eq!(m.describe(), "host");
        let whole = Layout::new(64, 1, None, 1).unwrap();
        m.fill(&whole, 7).unwrap();
        assert!(m.check(&whole, 7).unwrap());
        assert!(!m.check(&whole, 8).unwrap());
        m.zero(&whole).unwrap();
        assert!(!m.check(&whole, 7).unwrap());
        assert!(m.fill(&Layout::new(101, 1, None, 1).unwrap(), 7).is_err(), "past the buffer: an error, not a panic");
        assert_eq!(m.host().len(), 100);
        // Scattered pieces: only they are written, and each is checked.
        let spread = Layout { size: 20, iovs: 4, stride: 24, table: crate::layout::Table::IN_ORDER };
        m.host().fill(0xee);
        m.fill(&spread, 3).unwrap();
        assert!(m.check(&spread, 3).unwrap());
        assert!(m.host()[5..24].iter().all(|&b| b == 0xee), "the gaps are untouched");
        m.host()[72] ^= 1;
        assert!(!m.check(&spread, 3).unwrap(), "a flipped byte of the last piece is seen");
    }

    /// Huge-page advice changes no content: the buffer is zeroed and whole, whatever the kernel
    /// granted; the THP mode, where the kernel says, is one of its three words.
    #[test]
    fn huge_page_buffers_are_plain_zeroed_memory() {
        for len in [100, 3 << 20, (4 << 20) + 123] {
            let v = prefaulted(len, true).unwrap();
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&b| b == 0), "{len} bytes");
        }
        if let Some(mode) = thp_mode() {
            assert!(["always", "madvise", "never"].contains(&mode.as_str()), "{mode}");
        }
    }

    /// Without a driver a GPU buffer is a clear error; with one, the pattern goes through the device.
    #[test]
    fn gpu_memory_or_a_clear_error() {
        match BenchMemory::new(Some(0), 4096, false) {
            Err(e) => {
                assert!(!cuda::available());
                assert!(e.to_string().contains("CUDA unavailable"), "{e}");
            }
            Ok(mut m) => {
                assert!(m.describe().starts_with("gpu0@"));
                let spread = Layout { size: 2048, iovs: 4, stride: 1024, table: crate::layout::Table::IN_ORDER };
                m.fill(&spread, 3).unwrap();
                m.host().fill(0);
                assert!(m.check(&spread, 3).unwrap(), "the pattern came back from the device");
                m.zero(&spread).unwrap();
                assert!(!m.check(&spread, 3).unwrap());
            }
        }
    }
}
