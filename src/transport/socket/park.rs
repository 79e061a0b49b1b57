//! Sleeping and waking helper threads. Each thread owns an eventfd it polls together with its sockets;
//! a poster writes it only when that thread announced it is about to sleep, so a busy comm costs no
//! syscall per post.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

pub struct Parking {
    sleeping: Vec<AtomicBool>,
    events: Vec<OwnedFd>,
}

impl Parking {
    pub fn new(threads: usize) -> Result<Parking> {
        let mut events = Vec::with_capacity(threads);
        for _ in 0..threads {
            // SAFETY: eventfd takes no pointers; a non-negative result is a fresh descriptor we own.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(Error::io("create eventfd for a socket helper thread", std::io::Error::last_os_error()));
            }
            // SAFETY: fd is valid and owned by nobody else.
            events.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(Parking { sleeping: (0..threads).map(|_| AtomicBool::new(false)).collect(), events })
    }

    pub fn event_fd(&self, thread: usize) -> RawFd {
        self.events[thread].as_raw_fd()
    }

    /// Called by thread `thread` before its last look for work; SeqCst pairs with `wake_sleepers`.
    pub fn announce_sleep(&self, thread: usize) {
        self.sleeping[thread].store(true, Ordering::SeqCst);
    }

    pub fn cancel_sleep(&self, thread: usize) {
        self.sleeping[thread].store(false, Ordering::Relaxed);
    }

    /// After publishing work (with a SeqCst store): wakes every thread that may have missed it.
    pub fn wake_sleepers(&self) {
        for (i, flag) in self.sleeping.iter().enumerate() {
            if flag.load(Ordering::SeqCst) && flag.swap(false, Ordering::SeqCst) {
                signal(self.event_fd(i));
            }
        }
    }

    /// Wakes one thread whatever it is doing (it re-checks its sockets on the way).
    pub fn wake(&self, thread: usize) {
        signal(self.event_fd(thread));
    }

    pub fn wake_all(&self) {
        for i in 0..self.events.len() {
            signal(self.event_fd(i));
        }
    }

    pub fn drain(&self, thread: usize) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from our non-blocking eventfd; failure (nothing pending) is fine.
        unsafe { libc::read(self.event_fd(thread), (&mut v as *mut u64).cast(), 8) };
    }
}

fn signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from `one` to an eventfd we own; a full counter only means already signaled.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Waits until one of `fds` is ready or `timeout` passes. EINTR counts as a wake-up: callers re-check.
pub fn wait(fds: &mut [libc::pollfd], timeout: Duration) -> std::io::Result<()> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid slice of pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}
