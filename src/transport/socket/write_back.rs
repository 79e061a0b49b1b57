//! Writing received bytes back from the CPU's caches to memory, for receives a DMA engine reads
//! next (the staged path's slots, copied up to the GPU as soon as they land).
//!
//! Why: a socket receive leaves its bytes modified in the private cache of the core that ran it,
//! and a host-to-device copy of lines held modified in many cores' caches crawls. Measured on the
//! 2 x H200 host (32 cores, 2 MiB of private cache each), a 2 MiB copy up of pinned memory: 44 us
//! from memory, 125-136 us after 8-16 threads received it from sockets, 45-62 us when each of
//! those threads wrote its part back (`clwb`) right after its receive; 8 MiB: 158 / 275-341 /
//! 159-165 us. The write-back costs its thread about 36 us per 256 KiB, spread over the receiving
//! helpers and overlapping the rest of the chunk's arrival, where the copy up it saves sits on
//! every staged chunk's path.
//!
//! `clwb` keeps the lines cached (clean), `clflushopt` evicts them; either ends the snoops of
//! modified lines. Other CPUs, and x86 ones with neither, get no write-back ([`supported`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::transport::IoSeg;

const LINE: usize = 64;

/// Bytes of received pieces written back so far, process-wide: lets tests see that receives
/// really were. Counted by the receiving sockets, not by [`write_back`], whose own tests would
/// move it.
static WRITTEN_BACK: AtomicU64 = AtomicU64::new(0);

/// Bytes this process's receiving sockets wrote back from its caches ([`write_back`]).
pub fn written_back_bytes() -> u64 {
    WRITTEN_BACK.load(Ordering::Relaxed)
}

/// Writes back the landed piece `segs` ([`write_back`]) and counts it.
///
/// # Safety
/// As [`write_back`].
pub(super) unsafe fn write_back_landed(segs: &[IoSeg]) {
    // SAFETY: per the caller.
    unsafe { write_back(segs) };
    WRITTEN_BACK.fetch_add(segs.iter().map(|s| s.len as u64).sum(), Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Instruction {
    Clwb,
    ClflushOpt,
    None,
}

fn instruction() -> Instruction {
    static FOUND: OnceLock<Instruction> = OnceLock::new();
    *FOUND.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Instruction {
    // Safe functions from Rust 1.94 on, unsafe before (the crate builds from 1.88).
    #[allow(unused_unsafe)]
    // SAFETY: cpuid exists on every x86_64 CPU; leaf 7 is asked only where leaf 0 reports it.
    let max_leaf = unsafe { core::arch::x86_64::__cpuid(0) }.eax;
    if max_leaf < 7 {
        return Instruction::None;
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above.
    let ebx = unsafe { core::arch::x86_64::__cpuid_count(7, 0) }.ebx;
    if ebx & (1 << 24) != 0 {
        Instruction::Clwb
    } else if ebx & (1 << 23) != 0 {
        Instruction::ClflushOpt
    } else {
        Instruction::None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Instruction {
    Instruction::None
}

/// Receives posted after a piece's own, at most, for the piece to be written back. With more
/// behind it the stream is busy: those receives' arrival hides this one's copy up, and the
/// write-back's time on the receiving helpers is what the stream loses (2 x H200 host, GPU to
/// GPU, three alternated rounds, GB/s write / read: four 64 MiB transfers in flight 37.9 / 37.6
/// without write-back, 24.7 / 25.8 writing back every piece, 39.0 / 34.9 with this bound; 16 MiB
/// 36.0 / 34.8, 29.2 / 31.5, 32.6 / 33.0; 4 MiB 19.7 / 18.0, 24.3 / 24.0, 21.7 / 22.0; one 4 MiB
/// transfer 7.2 / 6.7, 10.5 / 10.5, 10.6 / 10.9).
pub const MAX_POSTED_BEHIND: u64 = 1;

/// Whether a landed piece of receive `seq` is written back, `posted` receives having been posted
/// on its comm so far (this one included).
pub fn wanted(seq: u64, posted: u64) -> bool {
    posted.saturating_sub(seq + 1) <= MAX_POSTED_BEHIND
}

/// Whether this CPU can write lines back ([`write_back`] is a no-op otherwise).
pub fn supported() -> bool {
    instruction() != Instruction::None
}

/// Writes the cache lines of `segs` back to memory. The memory stays as it was: only where its
/// bytes live changes.
///
/// # Safety
/// Every segment is mapped memory of this process (the instructions fault on unmapped addresses).
unsafe fn write_back(segs: &[IoSeg]) {
    let how = instruction();
    if how == Instruction::None {
        return;
    }
    for seg in segs.iter().filter(|s| s.len > 0) {
        let first = seg.addr & !(LINE - 1);
        let end = seg.addr.saturating_add(seg.len);
        for line in (first..end).step_by(LINE) {
            // SAFETY: the line holds bytes of `seg`, mapped memory of ours (the caller's
            // contract); neither instruction changes its contents or faults on mapped memory.
            unsafe { line_back(how, line) };
        }
    }
    fence();
}

#[cfg(target_arch = "x86_64")]
unsafe fn line_back(how: Instruction, line: usize) {
    // SAFETY: per the caller; the instruction was found by cpuid.
    unsafe {
        match how {
            Instruction::Clwb => core::arch::asm!("clwb [{}]", in(reg) line, options(nostack, preserves_flags)),
            Instruction::ClflushOpt => {
                core::arch::asm!("clflushopt [{}]", in(reg) line, options(nostack, preserves_flags))
            }
            Instruction::None => {}
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn line_back(_how: Instruction, _line: usize) {}

/// Orders the write-backs before what the thread does next (completing the piece): the copy up is
/// issued only after another thread sees the receive complete.
fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no operands and no other effect.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_back_leaves_every_byte_as_it_was() {
        let mut buf: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let expect = buf.clone();
        let base = buf.as_mut_ptr() as usize;
        // Unaligned starts and ends, a segment inside one line, an empty one.
        let segs = [
            IoSeg { addr: base + 3, len: 100_000 },
            IoSeg { addr: base + 100_010, len: 5 },
            IoSeg { addr: base + 100_100, len: 0 },
            IoSeg { addr: base + 150_001, len: 149_999 },
        ];
        // SAFETY: every segment lies in `buf`.
        unsafe { write_back(&segs) };
        assert_eq!(buf, expect);
        buf[299_999] ^= 0xff;
        // SAFETY: as above.
        unsafe { write_back(&segs[3..]) };
        assert_ne!(buf, expect, "the buffer stays ours to change");
    }

    #[test]
    fn only_the_last_receives_posted_are_written_back() {
        assert!(wanted(0, 1), "the only receive");
        assert!(wanted(4, 6), "one posted behind it");
        assert!(!wanted(4, 7), "two posted behind it");
        assert!(!wanted(0, 16), "the first of a full window");
        assert!(wanted(15, 16), "its last");
    }

    #[test]
    fn this_x86_host_finds_an_instruction() {
        // Every x86_64 server CPU of the last decade has clflushopt (Skylake, Zen); a build host
        // without it would make the staged path skip the write-back, which this test reports.
        if cfg!(target_arch = "x86_64") {
            assert!(supported(), "neither clwb nor clflushopt found by cpuid: {:?}", instruction());
        }
    }
}
