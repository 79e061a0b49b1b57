//! A sending socket of an acknowledged comm reads a bounded number of acknowledgements per run,
//! and asks its helper to run it again while some are left: the helper's poll is edge triggered,
//! so bytes left unread would raise no new event.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::kept::ACK_READS_PER_RUN;
use super::{SendSockets, SendTask};
use crate::transport::socket::pure::counts::Counts;
use crate::transport::socket::pure::window::Window;
use crate::transport::socket::pure::wire::{Ack, DONE_LEN, PieceCut};
use crate::transport::socket::reactor::{Next, Task};

/// A connected pair over loopback: ours non-blocking, the peer's blocking.
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    (ours, peer)
}

/// Bytes waiting to be read on `stream`.
fn unread(stream: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given, on a valid descriptor.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

#[test]
fn a_flood_of_stale_acknowledgements_is_read_a_bounded_number_at_a_time() {
    let (ours, mut peer) = pair();
    let window = Arc::new(Window::acked(PieceCut::new(64 << 10, 1), Arc::new(|| {}), 1));
    let shared = Arc::new(SendSockets::new(1, window.clone(), 0, Arc::new(Counts::default()), 0, false));
    shared.place(0, ours);
    shared.opened(0);
    let mut task = SendTask::new(shared.clone(), 0, None);
    // Valid but old: nothing was ever acknowledged, and these acknowledge nothing either.
    let acks = 10 * ACK_READS_PER_RUN + 5;
    let flood: Vec<u8> = (0..acks).flat_map(|_| Ack { completed: 0 }.encode()).collect();
    peer.write_all(&flood).unwrap();
    let start = Instant::now();
    while unread(shared.stream(0)) < flood.len() {
        assert!(start.elapsed() < testkit::PATIENCE, "the flood never arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
    // One read per acknowledgement here (each read asks for the rest of one).
    assert_eq!(task.run(), Next::Again, "acknowledgements left: the socket asks to run again");
    assert_eq!(unread(shared.stream(0)), flood.len() - ACK_READS_PER_RUN * DONE_LEN, "a bounded number read");
    let mut runs = 1;
    loop {
        runs += 1;
        if task.run() != Next::Again {
            break;
        }
        assert!(runs <= acks, "the socket kept asking to run again");
    }
    assert_eq!(runs, acks.div_ceil(ACK_READS_PER_RUN), "every run but the last read its bound");
    assert_eq!(unread(shared.stream(0)), 0, "every acknowledgement read");
    assert!(window.check().is_ok() && window.acked_upto() == 0, "stale acknowledgements change nothing");
    // Nothing left and nothing to send: the socket waits for the kernel.
    assert_eq!(task.run(), Next::Idle);
}
