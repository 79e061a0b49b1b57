//! A process's own figures for `--scale`: threads, descriptors, resident memory, CPU time,
//! voluntary context switches, the staging rings its engine holds, and with a GPU that GPU's memory
//! in use. The /proc files they come from are opened once, before any
//! connection: a process serving many connections can sit at its open-file limit (a comm opens its
//! later data sockets as traffic asks and goes on with fewer when the kernel refuses one), and
//! there opening a /proc file fails, while reading one already open needs no descriptor. A reading
//! that fails anyway says why instead of passing for zero.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// A process's threads, descriptors, resident memory, CPU time, voluntary context switches, staging
/// rings made and not freed, and its GPU's memory in use (KiB, every process's; `None` without one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub threads: usize,
    pub fds: usize,
    pub rss_kib: u64,
    pub cpu_us: u64,
    pub switches: i64,
    pub rings: u64,
    pub gpu_kib: Option<u64>,
}

/// The figures, or why they could not be read.
pub type Reading = Result<Stats, String>;

/// This process's /proc/self/status and /proc/self/fd, held open.
pub struct Probe {
    status: File,
    fd_dir: NonNull<libc::DIR>,
    /// The GPU whose memory in use is read, one process per GPU.
    pub gpu: Option<std::sync::Arc<uccl_tcpx::internal::cuda::Gpu>>,
}

/// The descriptors a probe holds itself (the status file and the directory), left out of the count.
const OWN_FDS: usize = 2;

impl Probe {
    pub fn open() -> std::io::Result<Probe> {
        let status = File::open("/proc/self/status")?;
        let dir = File::open("/proc/self/fd")?;
        // SAFETY: `dir` is an open directory, whose descriptor the DIR takes over (closedir closes it).
        let fd_dir =
            NonNull::new(unsafe { libc::fdopendir(dir.as_raw_fd()) }).ok_or_else(std::io::Error::last_os_error)?;
        let _ = dir.into_raw_fd();
        Ok(Probe { status, fd_dir, gpu: None })
    }

    /// The figures now.
    pub fn read(&self) -> Reading {
        let status = self.status().map_err(|e| format!("reading /proc/self/status: {e}"))?;
        let field = |name: &str| -> Result<u64, String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| format!("/proc/self/status has no {name}"))
        };
        let (threads, rss_kib) = (field("Threads:")? as usize, field("VmRSS:")?);
        let fds = self.entries().map_err(|e| format!("listing /proc/self/fd: {e}"))?;
        // SAFETY: an all-zero rusage is valid, and getrusage writes only into it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is writable for the call.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
            return Err(format!("getrusage: {}", std::io::Error::last_os_error()));
        }
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        let gpu_kib = match &self.gpu {
            Some(gpu) => Some(gpu.memory_in_use().map_err(|e| format!("GPU memory in use: {e}"))? >> 10),
            None => None,
        };
        Ok(Stats {
            threads,
            fds: fds.saturating_sub(OWN_FDS),
            rss_kib,
            cpu_us: us(ru.ru_utime) + us(ru.ru_stime),
            switches: ru.ru_nvcsw,
            rings: uccl_tcpx::internal::transport::staged::ring_counts().live(),
            gpu_kib,
        })
    }

    /// The status file's current text: procfs makes it anew for a read from its start.
    fn status(&self) -> std::io::Result<String> {
        let mut text = Vec::with_capacity(4096);
        let mut buf = [0u8; 4096];
        loop {
            let n = self.status.read_at(&mut buf, text.len() as u64)?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(text).map_err(std::io::Error::other)
    }

    /// The open descriptors, listed from the start of the held directory.
    fn entries(&self) -> std::io::Result<usize> {
        let dir = self.fd_dir.as_ptr();
        // SAFETY: `dir` is the open DIR this probe owns.
        unsafe { libc::rewinddir(dir) };
        let mut count = 0;
        loop {
            // SAFETY: errno is this thread's; cleared so that an end of listing tells from an error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: as above; the entry is read before the next call on `dir`.
            let entry = unsafe { libc::readdir(dir) };
            if entry.is_null() {
                let e = std::io::Error::last_os_error();
                return if e.raw_os_error() == Some(0) { Ok(count) } else { Err(e) };
            }
            // SAFETY: readdir returned an entry, whose name is NUL-terminated.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
            if name != c"." && name != c".." {
                count += 1;
            }
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: the DIR is this probe's and closed once, here.
        unsafe { libc::closedir(self.fd_dir.as_ptr()) };
    }
}

/// The figures as one line of the bench's control protocol: `STATS` and the seven numbers (-1: no
/// GPU), or
/// `STATS n/a` and why not.
pub fn to_line(reading: &Reading) -> String {
    match reading {
        Ok(s) => format!(
            "STATS {} {} {} {} {} {} {}",
            s.threads,
            s.fds,
            s.rss_kib,
            s.cpu_us,
            s.switches,
            s.rings,
            s.gpu_kib.map_or(-1, |k| k as i64)
        ),
        Err(why) => format!("STATS n/a {why}"),
    }
}

pub fn from_words(w: &[String]) -> std::io::Result<Reading> {
    use crate::ctl::field;
    if w.get(1).map(String::as_str) == Some("n/a") {
        return Ok(Err(w[2..].join(" ")));
    }
    Ok(Ok(Stats {
        threads: field(w, 1)?,
        fds: field(w, 2)?,
        rss_kib: field(w, 3)?,
        cpu_us: field(w, 4)?,
        switches: field(w, 5)?,
        rings: field(w, 6)?,
        gpu_kib: u64::try_from(field::<i64>(w, 7)?).ok(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> libc::rlimit {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `l` is writable for the call.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        l
    }

    /// A probe opened before the process reaches its open-file limit still reads there, and counts
    /// what is open. Runs alone in a child process: it lowers the process's limit.
    #[test]
    fn reads_at_the_open_file_limit() {
        if std::env::var_os("PROBE_AT_LIMIT").is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args(["--exact", "probe::tests::reads_at_the_open_file_limit", "--nocapture", "--test-threads=1"])
                .env("PROBE_AT_LIMIT", "1")
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{said}");
            assert!(said.contains("1 passed"), "the child ran the test: {said}");
            return;
        }
        let probe = Probe::open().unwrap();
        let before = probe.read().unwrap();
        assert!(before.threads >= 1 && before.rss_kib > 0 && before.fds >= 3, "{before:?}");
        let old = limit();
        let low = libc::rlimit { rlim_cur: before.fds as libc::rlim_t + 40, rlim_max: old.rlim_max };
        // SAFETY: a valid rlimit that outlives the call.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let mut files = Vec::new();
        let full = loop {
            match File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(e) => break e,
            }
            assert!(files.len() <= 64, "the lowered limit never stopped opening");
        };
        assert_eq!(full.raw_os_error(), Some(libc::EMFILE));
        assert!(std::fs::read_dir("/proc/self/fd").is_err(), "a fresh listing fails at the limit");
        let at = probe.read().unwrap();
        assert_eq!(at.fds, before.fds + files.len(), "{before:?} then {at:?} with {} more files", files.len());
        assert!(at.threads >= 1 && at.rss_kib > 0, "{at:?}");
    }

    #[test]
    fn a_reading_crosses_the_control_protocol() {
        let words = |line: String| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let stats =
            Stats { threads: 9, fds: 321, rss_kib: 15_900, cpu_us: 1_234_567, switches: 42, rings: 3, gpu_kib: None };
        assert_eq!(from_words(&words(to_line(&Ok(stats)))).unwrap(), Ok(stats));
        let on_gpu = Stats { gpu_kib: Some(1 << 20), ..stats };
        assert_eq!(from_words(&words(to_line(&Ok(on_gpu)))).unwrap(), Ok(on_gpu));
        let failed: Reading = Err("listing /proc/self/fd: Too many open files".into());
        assert_eq!(from_words(&words(to_line(&failed))).unwrap(), failed);
        assert!(from_words(&words("STATS 9 x 1 2 3".into())).is_err());
    }
}
