//! A peer process of this host, pinned by a pidfd, and copies out of its memory with
//! `process_vm_readv`. Only reads: an engine never writes into another process (see `proof.rs` for
//! why that is the direction that keeps deregistration a fence).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::engine::huge_pages::KnownMappings;
use crate::transport::IoSeg;

/// Bytes one `process_vm_readv` call moves at most: the longest a deregistration waits for a copy
/// under way (about 0.5 ms at memcpy speed), and far above the call's own cost.
pub const PIECE_BYTES: u64 = 4 << 20;
/// Entries per iovec list of one call: the kernel's `IOV_MAX`.
const MAX_IOVECS: usize = 1024;

/// Test support: the process whose probes report the refusal a ptrace-restricted kernel gives
/// (EPERM), as Yama's ptrace scope 1 does between sibling processes, and whose descriptors are
/// taken without `pidfd_getfd` (which the same attach check refuses there); 0 for none. Never
/// needed in use; the C ABI exports nothing that reaches it.
static REFUSED_PID: AtomicU32 = AtomicU32::new(0);

/// Makes probes of process `pid` fail as a kernel refusing access would (0: none).
#[doc(hidden)]
pub fn refuse_process_access(pid: u32) {
    REFUSED_PID.store(pid, Ordering::Release);
}

/// Why a peer's descriptor was not taken.
#[derive(Debug)]
pub enum FdRefusal {
    /// The kernel refuses this process the peer's descriptors (its ptrace rules, at the open of
    /// `/proc/<pid>/fd`): a host policy, the same for every peer.
    Kernel(io::Error),
    /// This descriptor: not open, no memfd, or a file that refuses us (its mode is the peer's).
    Descriptor(io::Error),
}

/// A process we proved to be a peer engine and may read from. The pidfd keeps naming that process
/// even if it exits and its pid is reused: every copy first asks it whether the process still lives.
#[derive(Debug)]
pub struct PeerProcess {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// What its mappings lie on, from the last read of its smaps, made in the background.
    huge: KnownMappings,
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
        Ok(PeerProcess { pid, pidfd, huge: KnownMappings::of_process(Some(pid.unsigned_abs())) })
    }

    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Whether the peer's memory under `segs` (address and length each) lies mostly on huge pages,
    /// as the last read of its smaps said: memory mapped since that read (or before the first)
    /// queues another on the looker thread (milliseconds) and says small pages until its answer
    /// is in; a "small pages" answer from a read a second old or more queues a recheck, so that
    /// pages the peer collapsed in place show. Only a hint for how to copy: a late or stale answer
    /// costs speed.
    pub fn on_huge_pages(&self, segs: impl IntoIterator<Item = (usize, usize)>) -> bool {
        self.huge.on_huge_pages(segs)
    }

    /// The peer says its pages changed size in place (collapsed): its smaps are read again, no
    /// sooner than the gap after the last read allows, instead of at the next recheck.
    pub fn pages_changed(&self) {
        self.huge.refresh();
    }

    /// Whether the pinned process still runs (so its pid still names it).
    pub fn alive(&self) -> io::Result<()> {
        // SAFETY: signal 0 only checks that the process exists; no info, no flags.
        let rc =
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// A descriptor of ours for the peer's descriptor `fd` (its staging area): `pidfd_getfd`,
    /// which the kernel allows only under the ptrace attach check. Where that call is refused
    /// (EPERM: Yama's ptrace scope 1 between siblings, a seccomp profile in a container; ENOSYS:
    /// an old kernel), the same file is reopened through `/proc/<pid>/fd`, which needs only the
    /// read-level check our copies need anyway, and the process must still live afterwards, so the
    /// pid named it throughout. Either way the file must be a regular file on tmpfs (a memfd):
    /// the peer picks the descriptor, and a FIFO, socket, device or FUSE file could block our
    /// open, read or mapping forever, or act on being opened.
    pub fn take_fd(&self, fd: u32) -> Result<OwnedFd, FdRefusal> {
        self.take_fd_from(fd, REFUSED_PID.load(Ordering::Acquire) != self.pid())
    }

    /// [`take_fd`](Self::take_fd), trying `pidfd_getfd` first only when `getfd` is set (the tests
    /// take the `/proc` route on their own process, which `pidfd_getfd` never refuses).
    fn take_fd_from(&self, fd: u32, getfd: bool) -> Result<OwnedFd, FdRefusal> {
        use FdRefusal::Descriptor;
        let fd = i32::try_from(fd).map_err(|_| Descriptor(io::Error::from_raw_os_error(libc::EBADF)))?;
        if getfd {
            // SAFETY: pidfd_getfd takes our pidfd, the peer's descriptor number and no flags, and
            // returns a new descriptor (close-on-exec) or -1.
            let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), fd, 0) };
            if got >= 0 {
                let got = i32::try_from(got).map_err(|_| Descriptor(io::Error::from_raw_os_error(libc::EBADF)))?;
                // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
                let got = unsafe { OwnedFd::from_raw_fd(got) };
                staging_file(&got).map_err(Descriptor)?;
                return Ok(got);
            }
            let err = io::Error::last_os_error();
            if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
                return Err(Descriptor(err));
            }
        }
        // O_PATH only resolves the link: no open of the file itself, so nothing that could block
        // (a FIFO without a writer, FUSE, a device) or act on being opened runs before the checks.
        // Nor does it check the file's mode: a refusal here is the ptrace check on the process.
        let path = open_fd(&format!("/proc/{}/fd/{fd}", self.pid), libc::O_PATH).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
                FdRefusal::Kernel(e)
            } else {
                Descriptor(e)
            }
        })?;
        self.alive().map_err(Descriptor)?;
        staging_file(&path).map_err(Descriptor)?;
        // Our own O_PATH descriptor names that file for good, whatever the peer does meanwhile.
        // This open does check the file's mode, which the peer set: its refusal is that file's.
        open_fd(&format!("/proc/self/fd/{}", path.as_raw_fd()), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY)
            .map_err(Descriptor)
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
        let iov = |s: &IoSeg| libc::iovec { iov_base: s.addr as *mut libc::c_void, iov_len: s.len };
        let mut local: Vec<libc::iovec> = local.iter().map(iov).collect();
        let mut remote: Vec<libc::iovec> = remote.iter().map(iov).collect();
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

/// Opens `path` with `flags` and close-on-exec.
fn open_fd(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path and flags; returns a new descriptor or -1.
    let raw = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Checks that `fd` is a regular file on tmpfs, where a memfd lives: reading or mapping it never
/// blocks and has no side effects. A huge-page memfd (hugetlbfs) is refused too: no staging area
/// is one, so only a peer that lies offers it.
fn staging_file(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: `stat` is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on a descriptor we own (an O_PATH one answers fstat too).
    if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFIFO => Some("a FIFO"),
        libc::S_IFSOCK => Some("a socket"),
        libc::S_IFCHR | libc::S_IFBLK => Some("a device"),
        libc::S_IFDIR => Some("a directory"),
        _ => Some("no regular file"),
    };
    if let Some(kind) = kind {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {kind}, not a memfd")));
    }
    // SAFETY: `statfs` is plain data, filled by the kernel.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above (an O_PATH descriptor answers fstatfs too).
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &raw mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if !is_tmpfs(&fs) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it lies on filesystem {:#x}, not on tmpfs as a memfd does", fs.f_type),
        ));
    }
    Ok(())
}

/// Whether `fs` is a tmpfs (`f_type`'s width differs between C libraries).
#[allow(clippy::unnecessary_cast)]
fn is_tmpfs(fs: &libc::statfs) -> bool {
    fs.f_type as i64 == libc::TMPFS_MAGIC as i64
}

/// Drops the first `n` bytes of an iovec list.
fn advance(iovs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut skip = 0;
    while skip < iovs.len() && n >= iovs[skip].iov_len {
        n -= iovs[skip].iov_len;
        skip += 1;
    }
    let rest = &mut iovs[skip..];
    if let Some(first) = rest.first_mut() {
        first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
        first.iov_len -= n;
    }
    rest
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

    /// Runs `take` on a thread and fails the test unless it returns within two seconds: a take
    /// that blocks (opening a FIFO without a writer) must show up as a failure, not a hang.
    fn promptly(take: impl FnOnce() -> Result<OwnedFd, FdRefusal> + Send + 'static) -> Result<OwnedFd, FdRefusal> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(take());
        });
        rx.recv_timeout(std::time::Duration::from_secs(2)).expect("taking a descriptor blocked")
    }

    /// Takes our own descriptor `fd` through `pidfd_getfd` (`getfd`) or the `/proc` route.
    fn take_own(fd: &impl AsRawFd, getfd: bool) -> Result<OwnedFd, FdRefusal> {
        let fd = fd.as_raw_fd().unsigned_abs();
        promptly(move || PeerProcess::open(std::process::id()).unwrap().take_fd_from(fd, getfd))
    }

    fn refused_as(got: Result<OwnedFd, FdRefusal>, what: &str) {
        let Err(FdRefusal::Descriptor(err)) = got else { panic!("{got:?}: a descriptor that is no memfd is refused") };
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains(what), "{err}");
    }

    /// Clears `caps` from the calling thread's effective capabilities, so that a test thread of a
    /// root process meets file modes and the ptrace check as any other process would.
    fn drop_own_caps(caps: &[u32]) {
        testkit::caps::drop_effective(caps).expect("lowering this thread's capabilities");
    }

    use testkit::caps::{CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE};

    /// A peer's memfd whose mode refuses us (the peer chose it) is that descriptor's refusal,
    /// not the kernel's refusal of every peer's descriptors; a process whose descriptors the
    /// ptrace check keeps from us (not dumpable) is the kernel's.
    #[test]
    fn a_descriptor_refusing_us_is_told_apart_from_the_kernel_refusing_the_process() {
        let area = memfd(libc::MFD_ALLOW_SEALING).unwrap();
        // SAFETY: a plain change of a descriptor we own.
        assert_eq!(unsafe { libc::fchmod(area.as_raw_fd(), 0) }, 0, "{}", io::Error::last_os_error());
        let raw = area.as_raw_fd().unsigned_abs();
        let got = promptly(move || {
            drop_own_caps(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]);
            PeerProcess::open(std::process::id()).unwrap().take_fd_from(raw, false)
        });
        let Err(FdRefusal::Descriptor(err)) = &got else { panic!("{got:?}") };
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");

        // A child that made itself not dumpable, holding one end of a pipe it reports on.
        let mut ends = [0; 2];
        // SAFETY: `ends` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child calls only async-signal-safe functions (prctl, write, pause, _exit).
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "{}", io::Error::last_os_error());
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                libc::prctl(
                    libc::PR_SET_DUMPABLE,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                );
                libc::write(ends[1], [1u8].as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        let mut byte = 0u8;
        // SAFETY: one byte of ours to read into.
        assert_eq!(unsafe { libc::read(ends[0], (&raw mut byte).cast(), 1) }, 1, "the child set itself up");
        let writer = ends[1].unsigned_abs();
        let got = promptly(move || {
            drop_own_caps(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE]);
            PeerProcess::open(child.unsigned_abs()).unwrap().take_fd_from(writer, false)
        });
        // SAFETY: our own child, killed and reaped; then our own pipe's descriptors closed.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::close(ends[0]);
            libc::close(ends[1]);
        }
        let Err(FdRefusal::Kernel(err)) = &got else { panic!("{got:?}") };
        assert!(matches!(err.raw_os_error(), Some(libc::EACCES | libc::EPERM)), "{err}");
    }

    fn inode(fd: &impl AsRawFd) -> (u64, u64) {
        // SAFETY: `stat` is plain data, filled by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on a descriptor the caller holds.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) }, 0);
        (st.st_dev, st.st_ino)
    }

    fn memfd(flags: libc::c_uint) -> io::Result<OwnedFd> {
        // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
        let raw = unsafe { libc::memfd_create(c"process-test".as_ptr(), libc::MFD_CLOEXEC | flags) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just handed us this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    #[test]
    fn a_peer_descriptor_that_is_no_memfd_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("uccl-take-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0, "{}", io::Error::last_os_error());
        // Held open for reading only, as a hostile peer would: a plain open of its /proc link for
        // reading waits for a writer that never comes.
        let reader = open_fd(fifo.to_str().unwrap(), libc::O_RDONLY | libc::O_NONBLOCK).unwrap();
        for getfd in [false, true] {
            refused_as(take_own(&reader, getfd), "a FIFO");
        }
        drop(reader);
        std::fs::remove_dir_all(&dir).unwrap();

        let mut ends = [0; 2];
        // SAFETY: `ends` has room for the two descriptors.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, ends.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: the kernel just handed us these descriptors; nothing else owns them.
        let ends = ends.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        for getfd in [false, true] {
            refused_as(take_own(&ends[0], getfd), "a socket");
        }

        let exe = std::fs::File::open("/proc/self/exe").unwrap();
        // SAFETY: `statfs` is plain data, filled by the kernel.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on a file we hold.
        assert_eq!(unsafe { libc::fstatfs(exe.as_raw_fd(), &raw mut fs) }, 0);
        if is_tmpfs(&fs) {
            eprintln!("the test binary lies on tmpfs: the case of a regular file elsewhere is not run");
        } else {
            for getfd in [false, true] {
                refused_as(take_own(&exe, getfd), "not on tmpfs");
            }
        }

        // A huge-page memfd, where the kernel makes one (it needs no pool to exist).
        match memfd(libc::MFD_HUGETLB) {
            Ok(huge) => {
                for getfd in [false, true] {
                    refused_as(take_own(&huge, getfd), "not on tmpfs");
                }
            }
            Err(e) => eprintln!("no huge-page memfd here ({e}): that case is not run"),
        }
    }

    #[test]
    fn a_memfd_is_taken_by_either_route() {
        let area = memfd(libc::MFD_ALLOW_SEALING).unwrap();
        for getfd in [false, true] {
            let got = take_own(&area, getfd).unwrap();
            assert_eq!(inode(&got), inode(&area), "the same file");
            assert_ne!(got.as_raw_fd(), area.as_raw_fd(), "a descriptor of our own");
        }
        let me = PeerProcess::open(std::process::id()).unwrap();
        let gone = me.take_fd_from(i32::MAX.unsigned_abs(), false);
        assert!(matches!(&gone, Err(FdRefusal::Descriptor(e)) if e.raw_os_error() == Some(libc::ENOENT)), "{gone:?}");
        let bad = me.take_fd(u32::MAX);
        assert!(matches!(&bad, Err(FdRefusal::Descriptor(e)) if e.raw_os_error() == Some(libc::EBADF)), "{bad:?}");
    }
}
