//! A peer process of this host, pinned by a pidfd, and copies out of its memory with
//! `process_vm_readv`. Only reads: an engine never writes into another process (see `proof.rs` for
//! why that is the direction that keeps deregistration a fence).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys::iovec::advance;
use crate::transport::IoSeg;

/// Bytes one `process_vm_readv` call moves at most: the longest a deregistration waits for a copy
/// under way (about 0.5 ms at memcpy speed), and far above the call's own cost.
pub const PIECE_BYTES: u64 = 4 << 20;
/// Entries per iovec list of one call: the kernel's `IOV_MAX`.
const MAX_IOVECS: usize = 1024;

/// Test support: the process whose probes report the refusal a ptrace-restricted kernel gives
/// (EPERM), as Yama's ptrace scope 1 does between sibling processes; 0 for none. Never
/// needed in use; the C ABI exports nothing that reaches it.
static REFUSED_PID: AtomicU32 = AtomicU32::new(0);

/// Makes probes of process `pid` fail as a kernel refusing access would (0: none).
#[doc(hidden)]
pub fn refuse_process_access(pid: u32) {
    REFUSED_PID.store(pid, Ordering::Release);
}

/// A process we proved to be a peer engine and may read from. The pidfd keeps naming that process
/// even if it exits and its pid is reused: every copy first asks it whether the process still lives.
#[derive(Debug)]
pub struct PeerProcess {
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

impl PeerProcess {
    /// Pins process `pid` (which must exist now).
    pub fn open(pid: u32) -> io::Result<PeerProcess> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        if pid <= 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PeerProcess { pid, pidfd })
    }

    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Whether the pinned process still runs (so its pid still names it).
    pub fn alive(&self) -> io::Result<()> {
        // SAFETY: signal 0 only checks that the process exists; no info, no flags.
        let rc =
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Whether the kernel lets this process read the peer's memory: a one-byte read at address 0
    /// fails with EFAULT once the access check passed, and with EPERM (ptrace rules, Yama) or ESRCH
    /// before it.
    pub fn probe(&self) -> io::Result<()> {
        if REFUSED_PID.load(Ordering::Acquire) == self.pid() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut byte = 0u8;
        let local = libc::iovec { iov_base: (&raw mut byte).cast(), iov_len: 1 };
        let remote = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 1 };
        // SAFETY: one valid local byte; the remote address is only looked up in the peer.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        let err = io::Error::last_os_error();
        match (n, err.raw_os_error()) {
            (-1, Some(libc::EFAULT)) => Ok(()),
            (-1, _) => Err(err),
            // Address 0 readable in the peer: odd, but the access check passed.
            _ => Ok(()),
        }
    }

    /// Copies one piece (see [`pieces`]): the peer's `remote` bytes into our `local` ones, in order.
    ///
    /// # Safety
    /// Every `local` segment is writable memory of this process that nothing else accesses meanwhile.
    pub unsafe fn read_piece(&self, local: &[IoSeg], remote: &[IoSeg]) -> io::Result<()> {
        let (mut local, mut remote) = (joined(local), joined(remote));
        let (mut l, mut r) = (&mut local[..], &mut remote[..]);
        while !l.is_empty() {
            let (lc, rc) = (l.len() as libc::c_ulong, r.len() as libc::c_ulong);
            // SAFETY: the local iovecs are writable memory of ours (the caller's contract); the
            // kernel checks the remote ones against the peer's mappings.
            let n = unsafe { libc::process_vm_readv(self.pid, l.as_ptr(), lc, r.as_ptr(), rc, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EFAULT));
            }
            // A short count means a later element failed; the next call reports why.
            l = advance(l, n.unsigned_abs());
            r = advance(r, n.unsigned_abs());
        }
        Ok(())
    }
}

/// `segs` as an iovec list, each run of segments that follow one another in memory as one entry:
/// the kernel pins a remote entry's pages with a call of its own (about 1 us for a 16 KiB block on
/// a 2-core VM, as much as copying it), and either side's list may be joined on its own, since the
/// call pairs the two lists' bytes in order, not their entries.
fn joined(segs: &[IoSeg]) -> Vec<libc::iovec> {
    let mut out: Vec<libc::iovec> = Vec::with_capacity(segs.len());
    for s in segs {
        match out.last_mut() {
            Some(last) if last.iov_base as usize + last.iov_len == s.addr => last.iov_len += s.len,
            _ => out.push(libc::iovec { iov_base: s.addr as *mut libc::c_void, iov_len: s.len }),
        }
    }
    out
}

/// Cuts two segment lists holding the same number of bytes into pieces of at most `max_bytes` and
/// at most `IOV_MAX` segments on either side: piece `k` is the same byte range of both lists.
pub fn pieces(a: &[IoSeg], b: &[IoSeg], max_bytes: u64) -> Vec<(Vec<IoSeg>, Vec<IoSeg>)> {
    let (mut ca, mut cb) = (Cursor::new(a), Cursor::new(b));
    let mut out = Vec::new();
    loop {
        let n = ca.reach(max_bytes).min(cb.reach(max_bytes));
        if n == 0 {
            return out;
        }
        out.push((ca.take(n), cb.take(n)));
    }
}

/// A position in a segment list.
struct Cursor<'a> {
    segs: &'a [IoSeg],
    idx: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [IoSeg]) -> Cursor<'a> {
        Cursor { segs, idx: 0, off: 0 }
    }

    /// Bytes from here that fit `max_bytes` and `MAX_IOVECS` segments.
    fn reach(&self, max_bytes: u64) -> u64 {
        let mut total = 0u64;
        for (i, s) in self.segs.iter().skip(self.idx).take(MAX_IOVECS).enumerate() {
            let left = (s.len - if i == 0 { self.off } else { 0 }) as u64;
            total += left;
            if total >= max_bytes {
                return max_bytes;
            }
        }
        total
    }

    /// The next `n` bytes (at most what `reach` allowed) as segments.
    fn take(&mut self, mut n: u64) -> Vec<IoSeg> {
        let mut out = Vec::new();
        while n > 0 {
            let s = &self.segs[self.idx];
            let len = ((s.len - self.off) as u64).min(n) as usize;
            out.push(IoSeg { addr: s.addr + self.off, len });
            n -= len as u64;
            self.off += len;
            if self.off == s.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: usize, len: usize) -> IoSeg {
        IoSeg { addr, len }
    }

    #[test]
    fn pieces_cover_both_lists_alike_within_both_limits() {
        let a = [seg(0, 10), seg(100, 5), seg(200, 20)];
        let b = [seg(1000, 3), seg(2000, 32)];
        let got = pieces(&a, &b, 8);
        let flat = |list: &[IoSeg]| list.iter().flat_map(|s| s.addr..s.addr + s.len).collect::<Vec<_>>();
        let (mut all_a, mut all_b) = (Vec::new(), Vec::new());
        for (pa, pb) in &got {
            let (na, nb) = (pa.iter().map(|s| s.len).sum::<usize>(), pb.iter().map(|s| s.len).sum::<usize>());
            assert_eq!(na, nb, "a piece is the same bytes of both lists");
            assert!(na <= 8 && na > 0);
            all_a.extend(flat(pa));
            all_b.extend(flat(pb));
        }
        assert_eq!(all_a, flat(&a));
        assert_eq!(all_b, flat(&b));
        assert_eq!(got.len(), 5, "35 bytes in pieces of 8");
    }

    #[test]
    fn pieces_respect_the_iovec_limit() {
        let many: Vec<IoSeg> = (0..2500).map(|i| seg(i * 16, 4)).collect();
        let one = [seg(1 << 20, 10_000)];
        let got = pieces(&many, &one, PIECE_BYTES);
        assert_eq!(got.iter().map(|(a, _)| a.len()).collect::<Vec<_>>(), [1024, 1024, 452]);
        assert!(got.iter().all(|(_, b)| b.len() == 1));
        assert!(pieces(&[], &[], 8).is_empty());
    }

    #[test]
    fn segments_that_follow_one_another_are_joined_on_each_side_alone() {
        let got = |segs: &[IoSeg]| joined(segs).iter().map(|v| (v.iov_base as usize, v.iov_len)).collect::<Vec<_>>();
        assert_eq!(got(&[seg(0, 16), seg(16, 16), seg(64, 8), seg(72, 8), seg(32, 4)]), [(0, 32), (64, 16), (32, 4)]);
        assert_eq!(got(&[seg(100, 5)]), [(100, 5)]);
        assert!(got(&[]).is_empty());
        // Joined remote blocks, scattered local ones: the bytes land as the items say.
        let me = PeerProcess::open(std::process::id()).unwrap();
        let src: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        let mut dst = vec![0u8; 8192];
        let (s, d) = (src.as_ptr() as usize, dst.as_mut_ptr() as usize);
        let local = [seg(d + 5000, 1000), seg(d + 1, 1000), seg(d + 3000, 2000)];
        let remote = [seg(s, 1000), seg(s + 1000, 1000), seg(s + 2000, 2000)];
        // SAFETY: `dst` is ours and untouched meanwhile.
        unsafe { me.read_piece(&local, &remote) }.unwrap();
        assert_eq!(&dst[5000..6000], &src[..1000]);
        assert_eq!(&dst[1..1001], &src[1000..2000]);
        assert_eq!(&dst[3000..5000], &src[2000..4000]);
        assert_eq!(dst[0], 0);
        assert!(dst[1001..3000].iter().all(|&b| b == 0) && dst[6000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_from_a_pinned_process_and_refuses_a_gone_one() {
        let me = PeerProcess::open(std::process::id()).unwrap();
        me.alive().unwrap();
        me.probe().unwrap();
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; 10_000];
        let (l, r) = (seg(dst.as_mut_ptr() as usize, dst.len()), seg(src.as_ptr() as usize, src.len()));
        for (pl, pr) in pieces(&[l], &[r], 4096) {
            // SAFETY: `dst` is ours and untouched meanwhile.
            unsafe { me.read_piece(&pl, &pr) }.unwrap();
        }
        assert_eq!(dst, src);
        // A remote range that is not mapped fails, it does not crash anything.
        // SAFETY: as above.
        let bad = unsafe { me.read_piece(&[seg(dst.as_mut_ptr() as usize, 8)], &[seg(8, 8)]) };
        assert_eq!(bad.unwrap_err().raw_os_error(), Some(libc::EFAULT));

        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let gone = PeerProcess::open(child.id()).unwrap();
        gone.probe().unwrap();
        refuse_process_access(child.id());
        assert_eq!(gone.probe().unwrap_err().raw_os_error(), Some(libc::EPERM), "the test hook");
        refuse_process_access(0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(gone.alive().unwrap_err().raw_os_error(), Some(libc::ESRCH));
        assert!(PeerProcess::open(0).is_err());
        assert!(PeerProcess::open(u32::MAX).is_err());
    }
}
