//! A shared staging area between two processes of this host: memory both map, through which one
//! pushes bytes with a plain copy and the other drains them with another, neither pinning the
//! other's pages (`process_vm_readv` pins a small-page source page by page, and threads copying
//! neighbouring megabytes contend on it).
//!
//! Each end creates one **outbound area** per connection ([`OutboundArea`]): a sealed memfd of a
//! header and `pieces` pieces of [`STAGE_PIECE`] bytes, mapped read-write by its creator only. The
//! peer maps it read-only ([`PeerArea`]), after taking the descriptor out of the creator's process
//! with `pidfd_getfd` and checking its seals and size. The creator hands out ranges of pieces
//! ([`Range`]), each with a generation of its own, and pushes a transfer's bytes into one piece by
//! piece; after each piece it stores the range's generation into that piece's mark (release), or
//! the generation with [`ABORTED`] when it cannot copy the piece. The peer waits for each mark
//! (acquire) before it copies the piece out. A generation is never reused while the area lives,
//! so a mark left by an earlier use of a piece never passes for the current one.
//!
//! What the seals buy: with shrinking and growing sealed (and the seals themselves), neither end
//! can truncate the file under the other's mapping, so a read of the area never faults (SIGBUS).
//! What the area exposes: only bytes the creator pushed for transfers with this peer, and its
//! marks; nothing of the creator's own memory. A peer that scribbles on the area (it holds a
//! writable descriptor) can only spoil bytes meant for itself: the creator never reads it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::process::{FdRefusal, PeerProcess};
use crate::error::{Error, Result, UcclStatus};
use crate::transport::IoSeg;

/// Bytes of one piece: the unit of a mark, of a range and of one copy. Large enough that a
/// mark's store and load cost nothing beside the copy, small enough that a drain starts soon
/// after its push did.
pub const STAGE_PIECE: u64 = 256 << 10;
/// The high bit of a mark: the pusher gave up on the piece (its source was deregistered, or its
/// connection failed).
pub const ABORTED: u64 = 1 << 63;
/// The smallest and largest data size of an area.
pub const MIN_AREA_BYTES: u64 = 1 << 20;
pub const MAX_AREA_BYTES: u64 = 1 << 30;
/// The marks take whole pages, so the data starts page-aligned.
const HEADER_ALIGN: u64 = 4096;
/// `MFD_NOEXEC_SEAL` (Linux 6.3), which the libc crate may not name yet.
const MFD_NOEXEC_SEAL: libc::c_uint = 0x0008;
/// How long a drain sleeps between looks once its spin is over.
const NAP: Duration = Duration::from_micros(50);
/// How often a waiting drain asks whether the connection and the peer still live.
const CHECK_EVERY: Duration = Duration::from_millis(1);

/// The file's size for `pieces` pieces: the marks, rounded to a page, then the data.
pub fn area_len(pieces: u32) -> u64 {
    header_len(pieces) + u64::from(pieces) * STAGE_PIECE
}

fn header_len(pieces: u32) -> u64 {
    (u64::from(pieces) * 8).next_multiple_of(HEADER_ALIGN)
}

/// The pieces of an area whose file is `len` bytes, if `len` is a size an area can have. The
/// header is smaller than a piece up to the largest area, so the division finds them.
fn pieces_of(len: u64) -> Option<u32> {
    let pieces = u32::try_from(len / STAGE_PIECE).ok()?;
    let fits = (1..=MAX_AREA_BYTES / STAGE_PIECE).contains(&u64::from(pieces));
    (fits && area_len(pieces) == len).then_some(pieces)
}

/// The file size of an area of `data_bytes` data bytes (rounded up to whole pieces).
pub fn file_len_for(data_bytes: u64) -> u64 {
    let pieces = u32::try_from(pieces_for(data_bytes)).unwrap_or(u32::MAX);
    area_len(pieces)
}

/// Pieces a transfer of `len` bytes takes.
pub fn pieces_for(len: u64) -> u64 {
    len.div_ceil(STAGE_PIECE)
}

/// A run of pieces handed out for one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub first_piece: u32,
    pub pieces: u32,
    /// This use's generation: never 0, never with [`ABORTED`] set, never repeated in one area.
    pub generation: u64,
}

/// What a piece's mark said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Pushed,
    Aborted,
}

/// How long a drain waits for a mark, and what it checks meanwhile.
pub struct Patience<'a> {
    /// Looks without sleeping for this long first: a push under way lands within microseconds.
    pub spin: Duration,
    /// Gives up after this long (what is left of the job's deadline: the connection's io timeout
    /// from the job's start).
    pub limit: Duration,
    /// Asked every millisecond or so once the spin is over: an error ends the wait with it (the
    /// connection failed, the peer exited).
    pub healthy: &'a dyn Fn() -> Result<()>,
}

/// `len` bytes mapped shared, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics (the marks) or
// through copies whose exclusivity the area's users arrange (a range is one transfer's).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: &OwnedFd, len: u64, writable: bool) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh mapping of a file we hold; the kernel picks the address.
        let at = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(at.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Mapping { base, len })
    }

    /// Piece `piece`'s mark; `piece` is below the area's piece count, whose marks the header holds.
    fn mark(&self, piece: u32) -> &AtomicU64 {
        let at = piece as usize * 8;
        assert!(at + 8 <= self.len, "mark {piece} outside the mapping");
        // SAFETY: inside the mapping (checked), 8-aligned (the mapping is page-aligned), and only
        // ever accessed atomically by either process.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(at).cast()) }
    }

    fn data(&self, header: u64, piece: u32) -> *mut u8 {
        let at = header + u64::from(piece) * STAGE_PIECE;
        assert!(at + STAGE_PIECE <= self.len as u64, "piece {piece} outside the mapping");
        // SAFETY: inside the mapping (checked).
        unsafe { self.base.as_ptr().add(at as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once; nothing refers into it past its owner's life.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Which pieces are handed out, and the next generation.
struct Pieces {
    used: Vec<bool>,
    next_generation: u64,
}

impl Pieces {
    /// The first run of `n` free pieces, taken.
    fn take(&mut self, n: usize) -> Option<usize> {
        let mut run = 0;
        for k in 0..self.used.len() {
            run = if self.used[k] { 0 } else { run + 1 };
            if run == n {
                let first = k + 1 - n;
                self.used[first..=k].fill(true);
                return Some(first);
            }
        }
        None
    }
}

/// This process's area for one peer: created on first use, mapped read-write here only.
pub struct OutboundArea {
    map: Mapping,
    pieces: u32,
    /// Kept open until the peer took its copy (`pidfd_getfd` reads it out of this process).
    fd: Mutex<Option<OwnedFd>>,
    fd_num: u32,
    alloc: Mutex<Pieces>,
}

impl std::fmt::Debug for OutboundArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundArea").field("pieces", &self.pieces).field("fd", &self.fd_num).finish()
    }
}

impl OutboundArea {
    /// An area of `data_bytes` (a multiple of [`STAGE_PIECE`] within the area bounds).
    pub fn create(data_bytes: u64) -> Result<OutboundArea> {
        if !(MIN_AREA_BYTES..=MAX_AREA_BYTES).contains(&data_bytes) || !data_bytes.is_multiple_of(STAGE_PIECE) {
            return Err(Error::new(
                UcclStatus::ErrInvalidParam,
                format!(
                    "a staging area of {data_bytes} bytes: it takes whole {STAGE_PIECE}-byte pieces, 1 MiB to 1 GiB"
                ),
            ));
        }
        let pieces = u32::try_from(data_bytes / STAGE_PIECE).expect("at most 4096 pieces");
        let fail = |what: &str| Error::io(format!("staging area: {what}"), io::Error::last_os_error());
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // Never executable, which kernels with `vm.memfd_noexec=2` require; kernels before 6.3 do
        // not know the flag (EINVAL) and make it without.
        // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
        let mut raw = unsafe { libc::memfd_create(c"uccl-tcpx-staging".as_ptr(), flags | MFD_NOEXEC_SEAL) };
        if raw < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // SAFETY: as above.
            raw = unsafe { libc::memfd_create(c"uccl-tcpx-staging".as_ptr(), flags) };
        }
        if raw < 0 {
            return Err(fail("memfd_create"));
        }
        // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = area_len(pieces);
        // SAFETY: plain calls on a descriptor we own.
        if unsafe { libc::ftruncate(raw, len as libc::off_t) } != 0 {
            return Err(fail("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) } != 0 {
            return Err(fail("sealing"));
        }
        let map = Mapping::new(&fd, len, true).map_err(|e| Error::io("staging area: mmap", e))?;
        let fd_num = raw.unsigned_abs();
        let alloc = Pieces { used: vec![false; pieces as usize], next_generation: 1 };
        Ok(OutboundArea { map, pieces, fd: Mutex::new(Some(fd)), fd_num, alloc: Mutex::new(alloc) })
    }

    /// The descriptor number to announce: the peer takes it out of this process.
    pub fn fd(&self) -> u32 {
        self.fd_num
    }

    /// The file's size, as announced.
    pub fn len(&self) -> u64 {
        area_len(self.pieces)
    }

    #[cfg(test)]
    pub fn pieces(&self) -> u32 {
        self.pieces
    }

    /// The peer answered (it holds its own descriptor, or never will): ours closes, the mapping stays.
    pub fn close_fd(&self) {
        self.fd.lock().take();
    }

    /// A range for `len` bytes (at least one), or `None` when no run of free pieces fits.
    pub fn alloc(&self, len: u64) -> Option<Range> {
        let n = usize::try_from(pieces_for(len.max(1))).ok()?;
        let mut alloc = self.alloc.lock();
        let first = alloc.take(n)?;
        let generation = alloc.next_generation;
        // 2^63 generations: the area never lives that long.
        alloc.next_generation += 1;
        Some(Range { first_piece: first as u32, pieces: n as u32, generation })
    }

    /// Hands `range` back: neither end touches its pieces for it any more.
    pub fn free(&self, range: Range) {
        let mut alloc = self.alloc.lock();
        let (first, n) = (range.first_piece as usize, range.pieces as usize);
        debug_assert!(alloc.used[first..first + n].iter().all(|&u| u), "freeing pieces not handed out");
        alloc.used[first..first + n].fill(false);
    }

    /// Pieces handed out now.
    #[cfg(test)]
    pub fn pieces_in_use(&self) -> usize {
        self.alloc.lock().used.iter().filter(|&&u| u).count()
    }

    /// Copies `src` into piece `k` of `range` and marks it pushed.
    ///
    /// # Safety
    /// Every `src` segment is readable memory of this process that stays so during the call, and
    /// this thread is the only one pushing piece `k` of `range`.
    pub unsafe fn push_piece(&self, range: &Range, k: u32, src: &[IoSeg]) -> Result<()> {
        let piece = self.piece_of(range, k)?;
        let total: usize = src.iter().map(|s| s.len).sum();
        if total as u64 > STAGE_PIECE {
            return Err(Error::internal(format!("{total} bytes pushed into one {STAGE_PIECE}-byte piece")));
        }
        let mut at = self.map.data(header_len(self.pieces), piece);
        for s in src {
            // SAFETY: `src` is readable (the caller's contract); the piece is inside our mapping
            // (checked) with room for all of it (checked), and this range is the caller's alone.
            unsafe {
                std::ptr::copy_nonoverlapping(s.addr as *const u8, at, s.len);
                at = at.add(s.len);
            }
        }
        self.map.mark(piece).store(range.generation, Ordering::Release);
        Ok(())
    }

    /// Marks piece `k` of `range` as one the drain must not wait for: its bytes never come.
    pub fn abort_piece(&self, range: &Range, k: u32) -> Result<()> {
        let piece = self.piece_of(range, k)?;
        self.map.mark(piece).store(range.generation | ABORTED, Ordering::Release);
        Ok(())
    }

    /// Marks every piece of `range` aborted: a push that will never run (its connection failed
    /// with it still queued) must not leave the peer's drain waiting for bytes that never come.
    pub fn abort_range(&self, range: &Range) {
        for k in 0..range.pieces {
            // Within the range by construction: the only error `abort_piece` knows.
            let _ = self.abort_piece(range, k);
        }
    }

    fn piece_of(&self, range: &Range, k: u32) -> Result<u32> {
        match range.first_piece.checked_add(k) {
            Some(piece) if k < range.pieces && piece < self.pieces => Ok(piece),
            _ => Err(Error::internal(format!("piece {k} of {range:?} outside the staging area"))),
        }
    }
}

/// The peer's area for this connection, mapped read-only here.
pub struct PeerArea {
    map: Mapping,
    pieces: u32,
}

impl PeerArea {
    /// Takes descriptor `fd` out of the proven peer `process`, checks it is a sealed area of
    /// `len` bytes, and maps it; the descriptor is closed again. Fails with `ErrNotSupported` when
    /// the kernel refuses us the descriptor (a host policy, the same for every peer), else with
    /// `ErrNotAllowed` for an area we may not map.
    pub fn open(process: &PeerProcess, fd: u32, len: u64) -> Result<PeerArea> {
        let pieces = pieces_of(len).ok_or_else(|| refused(format!("{len} bytes is no staging area's size")))?;
        let fd = process.take_fd(fd).map_err(|e| match e {
            FdRefusal::Kernel(e) => Error::new(
                UcclStatus::ErrNotSupported,
                format!("the kernel refuses this process the same-host peer's staging area descriptor {fd}: {e}"),
            ),
            FdRefusal::Descriptor(e) => refused(format!("taking descriptor {fd} of the peer: {e}")),
        })?;
        // SAFETY: a plain query of a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(refused(format!("its seals: {}", io::Error::last_os_error())));
        }
        let needed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals & needed != needed {
            return Err(refused("it can still shrink or grow under our mapping".into()));
        }
        // The size is read once the seals are known: until they were set the peer could resize
        // the file, so the look `take_fd` took before opening it (on a path descriptor, which
        // answers no seals) does not tell.
        // SAFETY: `stat` is plain data, filled by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } != 0 {
            return Err(refused(format!("its size: {}", io::Error::last_os_error())));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 != len {
            return Err(refused(format!("it is not a {len}-byte file")));
        }
        let map = Mapping::new(&fd, len, false).map_err(|e| refused(format!("mapping it: {e}")))?;
        Ok(PeerArea { map, pieces })
    }

    #[cfg(test)]
    pub fn pieces(&self) -> u32 {
        self.pieces
    }

    /// The data's size: the largest transfer the peer can stage in it.
    pub fn data_bytes(&self) -> u64 {
        u64::from(self.pieces) * STAGE_PIECE
    }

    /// Checks a range the peer names on the wire against the mapping.
    pub fn check(&self, first_piece: u32, pieces: u32) -> Result<()> {
        match first_piece.checked_add(pieces) {
            Some(end) if pieces > 0 && end <= self.pieces => Ok(()),
            _ => Err(Error::backend(format!(
                "protocol violation: staged pieces {first_piece}+{pieces} outside the peer's {}-piece area",
                self.pieces
            ))),
        }
    }

    /// Waits until the peer pushed piece `piece` for generation `generation`, or gave up on it.
    pub fn wait(&self, piece: u32, generation: u64, patience: &Patience<'_>) -> Result<Mark> {
        self.check(piece, 1)?;
        let mark = self.map.mark(piece);
        let start = Instant::now();
        let mut checked = start;
        loop {
            let now = mark.load(Ordering::Acquire);
            if now == generation {
                return Ok(Mark::Pushed);
            }
            if now == generation | ABORTED {
                return Ok(Mark::Aborted);
            }
            let waited = start.elapsed();
            if waited < patience.spin {
                std::hint::spin_loop();
                continue;
            }
            if checked.elapsed() >= CHECK_EVERY {
                (patience.healthy)()?;
                checked = Instant::now();
            }
            if waited > patience.limit {
                return Err(Error::timeout(format!(
                    "the peer did not push staged piece {piece} within {} ms",
                    patience.limit.as_millis()
                )));
            }
            std::thread::sleep(NAP);
        }
    }

    /// Copies piece `piece` (its first `dst`'s total bytes) into `dst`.
    ///
    /// # Safety
    /// Every `dst` segment is writable memory of this process that nothing else accesses meanwhile.
    pub unsafe fn drain_piece(&self, piece: u32, dst: &[IoSeg]) -> Result<()> {
        self.check(piece, 1)?;
        let total: usize = dst.iter().map(|s| s.len).sum();
        if total as u64 > STAGE_PIECE {
            return Err(Error::internal(format!("{total} bytes drained from one {STAGE_PIECE}-byte piece")));
        }
        let mut at = self.map.data(header_len(self.pieces), piece).cast_const();
        for s in dst {
            // SAFETY: the piece lies inside our mapping (checked) and holds `total` bytes; `dst`
            // is ours to write (the caller's contract). The peer may write the piece meanwhile,
            // which can only change the bytes it sends us.
            unsafe {
                std::ptr::copy_nonoverlapping(at, s.addr as *mut u8, s.len);
                at = at.add(s.len);
            }
        }
        Ok(())
    }
}

fn refused(why: String) -> Error {
    Error::new(UcclStatus::ErrNotAllowed, format!("the peer's staging area is refused: {why}"))
}

/// A transfer's segments cut at the pieces' boundaries: two allocations whatever the pieces.
#[derive(Debug, Default)]
pub struct PieceCut {
    segs: Vec<IoSeg>,
    /// Where each piece's segments end in `segs`.
    ends: Vec<usize>,
}

impl PieceCut {
    /// Pieces cut.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes piece `k` of a range holds, as segments.
    pub fn piece(&self, k: usize) -> &[IoSeg] {
        let start = k.checked_sub(1).map_or(0, |prev| self.ends[prev]);
        &self.segs[start..self.ends[k]]
    }
}

/// Cuts `len` bytes of `segs` into runs of one piece each: run `k` is the bytes piece `k` of a
/// range holds. Shorter than `len` when the segments are.
pub fn cut_pieces(segs: &[IoSeg], len: u64) -> PieceCut {
    let pieces = usize::try_from(pieces_for(len)).unwrap_or(0);
    // A segment is split once per piece boundary inside it: at most one more per piece.
    let mut out = PieceCut { segs: Vec::with_capacity(segs.len() + pieces), ends: Vec::with_capacity(pieces) };
    let (mut left, mut room) = (len, 0u64);
    for s in segs {
        let (mut addr, mut n) = (s.addr, (s.len as u64).min(left));
        left -= n;
        while n > 0 {
            if room == 0 {
                out.ends.push(out.segs.len());
                room = STAGE_PIECE;
            }
            let take = n.min(room);
            out.segs.push(IoSeg { addr, len: take as usize });
            *out.ends.last_mut().expect("pushed above") = out.segs.len();
            addr += take as usize;
            n -= take;
            room -= take;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = STAGE_PIECE as usize;

    fn seg(addr: usize, len: usize) -> IoSeg {
        IoSeg { addr, len }
    }

    fn me() -> PeerProcess {
        PeerProcess::open(std::process::id()).unwrap()
    }

    fn patience(limit_ms: u64, healthy: &dyn Fn() -> Result<()>) -> Patience<'_> {
        Patience { spin: Duration::from_micros(20), limit: Duration::from_millis(limit_ms), healthy }
    }

    #[test]
    fn sizes_and_bounds() {
        assert_eq!(area_len(128), 4096 + 128 * STAGE_PIECE);
        assert_eq!(pieces_of(area_len(128)), Some(128));
        assert_eq!(pieces_of(area_len(4096)), Some(4096));
        assert_eq!(pieces_of(area_len(4097)), None, "above the largest area");
        assert_eq!(pieces_of(area_len(128) + 1), None);
        assert_eq!(pieces_of(128 * STAGE_PIECE), None, "no header");
        assert_eq!(pieces_of(0), None);
        assert_eq!(pieces_for(1), 1);
        assert_eq!(pieces_for(STAGE_PIECE), 1);
        assert_eq!(pieces_for(STAGE_PIECE + 1), 2);
        for bad in [0, MIN_AREA_BYTES - STAGE_PIECE, MIN_AREA_BYTES + 1, MAX_AREA_BYTES + STAGE_PIECE] {
            let err = OutboundArea::create(bad).err().unwrap();
            assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{bad}");
        }
    }

    #[test]
    fn ranges_are_first_fit_with_fresh_generations() {
        let area = OutboundArea::create(MIN_AREA_BYTES).unwrap();
        assert_eq!(area.pieces(), 4);
        let a = area.alloc(1).unwrap();
        let b = area.alloc(STAGE_PIECE + 1).unwrap();
        assert_eq!((a.first_piece, a.pieces), (0, 1));
        assert_eq!((b.first_piece, b.pieces), (1, 2));
        assert_ne!(a.generation, 0);
        assert!(b.generation > a.generation);
        assert!(area.alloc(2 * STAGE_PIECE).is_none(), "one piece left");
        assert_eq!(area.pieces_in_use(), 3);
        area.free(a);
        // Two free pieces, but not side by side.
        assert!(area.alloc(2 * STAGE_PIECE).is_none());
        let c = area.alloc(STAGE_PIECE).unwrap();
        assert_eq!(c.first_piece, 0, "first fit");
        assert!(c.generation > b.generation, "a reused piece gets a new generation");
        area.free(b);
        area.free(c);
        let all = area.alloc(4 * STAGE_PIECE).unwrap();
        assert_eq!((all.first_piece, all.pieces), (0, 4));
        assert!(area.alloc(1).is_none());
        area.free(all);
        assert_eq!(area.pieces_in_use(), 0);
        assert!(area.alloc(4 * STAGE_PIECE + 1).is_none(), "larger than the area");
    }

    #[test]
    fn pushed_bytes_drain_through_the_peers_mapping() {
        let area = OutboundArea::create(MIN_AREA_BYTES).unwrap();
        let peer = PeerArea::open(&me(), area.fd(), area.len()).unwrap();
        area.close_fd();
        assert_eq!(peer.pieces(), 4);
        let _skip = area.alloc(1).unwrap();
        let range = area.alloc(2 * STAGE_PIECE).unwrap();
        // Source in two segments, destination in three, neither on the piece boundary.
        let src: Vec<u8> = (0..P + 1000).map(|i| (i % 253) as u8).collect();
        let (s1, s2) = src.split_at(5000);
        let srcs = [seg(s1.as_ptr() as usize, s1.len()), seg(s2.as_ptr() as usize, s2.len())];
        let mut dst = vec![0u8; src.len()];
        let base = dst.as_mut_ptr() as usize;
        let dsts = [seg(base, 10), seg(base + 10, P), seg(base + 10 + P, 990)];
        let len = src.len() as u64;
        let (from, into) = (cut_pieces(&srcs, len), cut_pieces(&dsts, len));
        assert_eq!((from.len(), into.len()), (2, 2));
        let ok = || Ok(());
        for k in 0..from.len() {
            // SAFETY: `src` is live and read-only here.
            unsafe { area.push_piece(&range, k as u32, from.piece(k)) }.unwrap();
        }
        for k in 0..into.len() {
            let at = range.first_piece + k as u32;
            assert_eq!(peer.wait(at, range.generation, &patience(1000, &ok)).unwrap(), Mark::Pushed);
            // SAFETY: `dst` is ours and untouched meanwhile.
            unsafe { peer.drain_piece(at, into.piece(k)) }.unwrap();
        }
        assert_eq!(dst, src);
        // A push outside the range is refused, not written.
        // SAFETY: as above.
        assert!(unsafe { area.push_piece(&range, 2, from.piece(0)) }.is_err());
        let big = vec![0u8; P + 1];
        // SAFETY: as above.
        assert!(unsafe { area.push_piece(&range, 0, &[seg(big.as_ptr() as usize, big.len())]) }.is_err());
    }

    #[test]
    fn a_drain_sees_an_abort_and_times_out_on_a_piece_never_pushed() {
        let area = OutboundArea::create(MIN_AREA_BYTES).unwrap();
        let peer = PeerArea::open(&me(), area.fd(), area.len()).unwrap();
        let old = area.alloc(STAGE_PIECE).unwrap();
        let src = [7u8; 64];
        // SAFETY: `src` is live.
        unsafe { area.push_piece(&old, 0, &[seg(src.as_ptr() as usize, 64)]) }.unwrap();
        area.free(old);
        let range = area.alloc(2 * STAGE_PIECE).unwrap();
        assert_eq!(range.first_piece, 0, "reuses the piece the old range marked");
        area.abort_piece(&range, 0).unwrap();
        let ok = || Ok(());
        assert_eq!(peer.wait(0, range.generation, &patience(1000, &ok)).unwrap(), Mark::Aborted);
        // The old generation's mark does not pass for this one: the wait runs out.
        let start = Instant::now();
        let err = peer.wait(1, range.generation, &patience(30, &ok)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrTimeout);
        assert!(start.elapsed() >= Duration::from_millis(30));
        // A failed health check ends the wait with its error, long before the limit.
        let start = Instant::now();
        let gone = || Err(Error::new(UcclStatus::ErrCanceled, "the connection failed"));
        let err = peer.wait(1, range.generation, &patience(10_000, &gone)).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrCanceled);
        assert!(start.elapsed() < Duration::from_secs(5));
        // A push from another thread ends a wait under way.
        let pusher = std::thread::scope(|s| {
            let waiter = s.spawn(|| peer.wait(1, range.generation, &patience(10_000, &ok)));
            std::thread::sleep(Duration::from_millis(5));
            // SAFETY: `src` is live.
            unsafe { area.push_piece(&range, 1, &[seg(src.as_ptr() as usize, 64)]) }.unwrap();
            waiter.join().unwrap()
        });
        assert_eq!(pusher.unwrap(), Mark::Pushed);
    }

    #[test]
    fn ranges_the_peer_names_are_bounds_checked() {
        let area = OutboundArea::create(2 * MIN_AREA_BYTES).unwrap();
        let peer = PeerArea::open(&me(), area.fd(), area.len()).unwrap();
        assert_eq!(peer.pieces(), 8);
        peer.check(0, 8).unwrap();
        peer.check(7, 1).unwrap();
        for (first, n) in [(0, 9), (8, 1), (7, 2), (0, 0), (u32::MAX, 2), (1, u32::MAX)] {
            assert!(peer.check(first, n).is_err(), "{first}+{n}");
        }
        let ok = || Ok(());
        assert!(peer.wait(8, 1, &patience(1000, &ok)).is_err());
        let mut dst = [0u8; 8];
        // SAFETY: `dst` is ours.
        assert!(unsafe { peer.drain_piece(8, &[seg(dst.as_mut_ptr() as usize, 8)]) }.is_err());
    }

    #[test]
    fn unsealed_or_missized_files_are_refused() {
        let me = me();
        // A memfd that can still shrink under a mapping.
        // SAFETY: plain calls creating and sizing a descriptor we own.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = area_len(4);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ftruncate(raw, len as libc::off_t) }, 0);
        let err = PeerArea::open(&me, raw.unsigned_abs(), len).err().unwrap();
        assert!(err.message().contains("shrink or grow"), "{}", err.message());
        drop(fd);

        let area = OutboundArea::create(MIN_AREA_BYTES).unwrap();
        let err = PeerArea::open(&me, area.fd(), area_len(8)).err().unwrap();
        assert!(err.message().contains("not a"), "{}", err.message());
        let err = PeerArea::open(&me, area.fd(), area.len() + 1).err().unwrap();
        assert!(err.message().contains("no staging area's size"), "{}", err.message());
        // A descriptor that is no file of that kind, or none at all.
        let err = PeerArea::open(&me, 0, area.len()).err().unwrap();
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed);
        // A number no descriptor has (tests running beside this one may take any low one).
        let err = PeerArea::open(&me, i32::MAX.unsigned_abs(), area.len()).err().unwrap();
        assert!(err.message().contains("taking descriptor"), "{}", err.message());
    }

    #[test]
    fn cut_pieces_follow_piece_boundaries() {
        let segs = [seg(0, 100), seg(1000, P), seg(1 << 30, P)];
        let cut = cut_pieces(&segs, (2 * P + 50) as u64);
        assert_eq!(cut.len(), 3);
        assert_eq!(cut.piece(0), [seg(0, 100), seg(1000, P - 100)]);
        assert_eq!(cut.piece(1), [seg(1000 + P - 100, 100), seg(1 << 30, P - 100)]);
        assert_eq!(cut.piece(2), [seg((1 << 30) + P - 100, 50)], "cut at the length, not the segments' end");
        let whole = cut_pieces(&[seg(0, 2 * P)], 2 * P as u64);
        assert_eq!((whole.piece(0), whole.piece(1)), (&[seg(0, P)][..], &[seg(P, P)][..]), "split on the boundary");
        assert_eq!(cut_pieces(&segs, 0).len(), 0);
        assert_eq!(cut_pieces(&[], 10).len(), 0);
    }
}
