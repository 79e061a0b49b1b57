//! Reading the control stream: the connection's reader thread, and a caller that reads the stream
//! itself while it waits for an inline reply. Both hand what they read to the connection they
//! serve (`Served`), which applies it under its lock.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::engine::control_rx::{ControlRx, Drained, ReaderWait, RxBuffer};
use crate::engine::transfer::Transfer;

/// What the reading loops need from the connection they serve.
pub(super) trait Served {
    fn rx(&self) -> &ControlRx;

    /// Handles the whole messages a read that `drained` describes brought into `buf`; false once
    /// the connection failed (nothing more will be read).
    fn handle_read(&self, buf: &mut RxBuffer, drained: Drained, wait: bool) -> bool;

    fn has_failed(&self) -> bool;
}

/// Reads what the control stream holds and handles every whole message; false once the
/// connection failed. A waiting caller (`wait`) blocks a bounded time for something and returns
/// after one buffer's worth, so that a busy stream does not keep it past its own reply; the reader
/// thread drains until the socket is empty.
fn pump(conn: &impl Served, buf: &mut RxBuffer, wait: bool) -> bool {
    let drained = conn.rx().drain(buf, wait);
    conn.handle_read(buf, drained, wait)
}

/// Reads the control stream in the caller's thread until `t` finished (polling for the spin time,
/// then in bounded blocking reads), unless another thread is reading it: then that thread delivers
/// the reply, which the caller watches for during the spin time and afterwards sleeps on.
pub(super) fn read_until_finished(conn: &impl Served, t: &Transfer) {
    let rx = conn.rx();
    let Some(mut buf) = rx.try_take() else {
        // Another thread reads the stream and delivers the reply: watch for it before sleeping.
        let until = Instant::now() + rx.spin();
        while !t.is_finished() && Instant::now() < until {
            std::thread::yield_now();
        }
        return;
    };
    rx.disarm();
    if spin_until_finished(conn, &mut buf, t) {
        // Each blocking read is bounded, so a reply delivered some other way (a failure) is noticed.
        while !t.is_finished() && pump(conn, &mut buf, true) {}
    }
    rx.arm();
}

/// Polls the stream without blocking, for at most the spin time, while `t` is unfinished; false
/// once the connection failed. Frames are handled only when bytes came, so polling takes no lock.
fn spin_until_finished(conn: &impl Served, buf: &mut RxBuffer, t: &Transfer) -> bool {
    let rx = conn.rx();
    let until = Instant::now() + rx.spin();
    while !t.is_finished() && Instant::now() < until {
        let drained = rx.drain(buf, false);
        // Handled as a waiting caller: back here after a buffer's worth, to look at `t` again.
        if !matches!(drained, Drained::Empty) && !conn.handle_read(buf, drained, true) {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// The shared-mode reader's poll after a read: the next message often follows at once (the reply to
/// a polling caller's next request), and polling catches it without a wake-up. Stops when a caller
/// holds the stream or after the spin time without bytes; false once the connection failed.
fn poll_while_busy(rx: &ControlRx, conn: &impl Served) -> bool {
    let mut until = Instant::now() + rx.spin();
    while Instant::now() < until {
        let Some(mut buf) = rx.try_lock() else { return true };
        let drained = rx.drain(&mut buf, false);
        if !matches!(drained, Drained::Empty) {
            if !conn.handle_read(&mut buf, drained, false) {
                return false;
            }
            until = Instant::now() + rx.spin();
        }
        drop(buf);
        std::thread::yield_now();
    }
    true
}

/// The reader thread: waits for the stream to have something, then reads it (after a waiting
/// caller that holds the stream let go of it). Waits are bounded so that a connection dropped
/// without a close still lets this thread go; it holds the connection only while handling bytes.
pub(super) fn read_control<C: Served>(rx: &ControlRx, conn: Weak<C>) {
    let mut wait = rx.shared_wait();
    loop {
        wait = match wait {
            ReaderWait::Shared { .. } => {
                let ready = rx.wait_ready(Duration::from_millis(100));
                let Some(conn) = conn.upgrade() else { return };
                if !ready {
                    if conn.has_failed() {
                        return;
                    }
                    continue;
                }
                if !pump(&*conn, &mut rx.lock(), false) || !poll_while_busy(rx, &*conn) {
                    return;
                }
                rx.next_wait(wait)
            }
            ReaderWait::Blocking => {
                let mut buf = rx.lock();
                // After a message the next one often follows at once (a caller's next request):
                // poll for it before blocking again.
                let mut poll_until = Instant::now();
                loop {
                    let block = Instant::now() >= poll_until;
                    let drained = rx.drain(&mut buf, block);
                    match drained {
                        Drained::Empty if !block => {
                            std::thread::yield_now();
                            continue;
                        }
                        Drained::Empty => {}
                        _ => poll_until = Instant::now() + rx.spin(),
                    }
                    let Some(conn) = conn.upgrade() else { return };
                    if !conn.handle_read(&mut buf, drained, false) {
                        return;
                    }
                    let next = rx.next_wait(ReaderWait::Blocking);
                    if next != ReaderWait::Blocking {
                        break next;
                    }
                }
            }
        };
    }
}
