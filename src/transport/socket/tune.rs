//! A data socket's own options: its buffer sizes, which must be set before it connects, and how
//! much it keeps unsent on one of several links. The settings every stream takes are `sys::tcp`'s.

use socket2::SockRef;

use crate::error::{Error, Result};

/// Unsent bytes a data socket over one of several links holds at most (TCP_NOTSENT_LOWAT): a socket
/// pulls its next piece once its current one is in the kernel, so with the kernel's own send buffer
/// (megabytes) every socket would take pieces at once, whatever its link's rate, and a transfer
/// would end with its slowest link's backlog. Bounded, a socket takes pieces as its link drains.
pub(super) const LINK_UNSENT_BYTES: u32 = 128 << 10;

/// Bounds what `sock` keeps unsent (see [`LINK_UNSENT_BYTES`]).
pub(super) fn pace_to_link(sock: &socket2::Socket) -> Result<()> {
    let bytes = LINK_UNSENT_BYTES as libc::c_int;
    // SAFETY: a valid socket descriptor and an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::io("set TCP_NOTSENT_LOWAT on a data socket", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// SO_SNDBUF / SO_RCVBUF of a data socket or listener; 0 leaves the kernel's autotuning. Before
/// connecting, for the window scale to account for them.
pub(super) fn set_buffers(sock: SockRef<'_>, sndbuf: u32, rcvbuf: u32) -> Result<()> {
    let io = |e| Error::io("set data socket buffer size", e);
    if sndbuf > 0 {
        sock.set_send_buffer_size(sndbuf as usize).map_err(io)?;
    }
    if rcvbuf > 0 {
        sock.set_recv_buffer_size(rcvbuf as usize).map_err(io)?;
    }
    Ok(())
}
