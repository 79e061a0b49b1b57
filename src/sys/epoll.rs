//! The two kernel objects a helper thread sleeps on: an epoll set holding its sockets (edge
//! triggered, so a socket reports again only once something new happened on it) and an eventfd that
//! posting threads write to wake it (`worker.rs`, for the socket helpers and the engine's control
//! reactor alike), and the epoll sets of the acceptor and the listeners' doors.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::error::{Error, Result};

pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a fresh descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("create an epoll set for a helper thread", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is valid and owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the call; both descriptors are open.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Changes what `fd` waits for; the kernel reports at once what is ready already.
    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the call; both descriptors are open.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Takes `fd` out of the set; a descriptor already gone from it is no error.
    pub fn remove(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `ev` is valid (kernels before 2.6.9 required it for DEL); failure leaves nothing to undo.
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits for events (`None`: for good; zero: just collects what is ready). EINTR reads as no
    /// event: callers look again.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout: Option<Duration>) -> std::io::Result<usize> {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `events` is writable for its length, which the kernel is told.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted { Ok(0) } else { Err(e) }
    }
}

pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a fresh descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("create an eventfd for a helper thread", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is valid and owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to an eventfd we own; a full counter only means already signaled.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from our non-blocking eventfd; failure (nothing pending) is fine.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
}
