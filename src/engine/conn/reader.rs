//! Reading the control stream: the control reactor's turn for this connection, and a caller that
//! reads the stream itself while it waits for an inline reply. Both hand what they read to the
//! connection they serve (`Served`), which applies it under its lock.

use std::time::Instant;

use crate::engine::control_reactor::Next;
use crate::engine::control_rx::{ControlRx, Drained, RxBuffer};
use crate::engine::transfer::{Answers, Transfer};

/// What handling a read left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Handled {
    /// The connection failed: nothing more will be read.
    Failed,
    /// Handled, and no chunk of the connection's is with its data sockets.
    Settled,
    /// Handled, and chunks (posted by this read or before) are with the data sockets' helpers.
    ChunksOut,
}

/// What the reading paths need from the connection they serve.
pub(super) trait Served {
    fn rx(&self) -> &ControlRx;

    /// Handles the whole messages a read that `drained` describes brought into `buf`.
    /// `leave_copies`: the reader comes back at once (the reactor with more to read), so the device
    /// copies started for inline payloads may run on instead of being waited for.
    fn handle_read(&self, buf: &mut RxBuffer, drained: Drained, leave_copies: bool) -> Handled;

    /// Whether device copies started for inline payloads are left for a reader to finish.
    fn copies_started(&self) -> bool;

    /// Whether work waits that a waiting caller may run (the copy of a read of ours).
    fn work_waiting(&self) -> bool;

    /// Runs that work on the caller's thread if it is `transfer`'s, and hands the rest to the
    /// worker.
    fn run_waiting(&self, transfer: u64);
}

/// The reactor's turn: reads a buffer's worth and handles it. `Again` when more may be queued (the
/// reactor comes back after its other connections had a turn), `Empty` when nothing was there,
/// `Handed` when chunks are left with the data sockets, `Stop` once the connection failed. A caller
/// reading the stream meanwhile keeps it (`Taken`): it re-arms the reactor when it leaves.
pub(super) fn serve_readable(conn: &impl Served) -> Next {
    let rx = conn.rx();
    let Some(mut buf) = rx.try_lock() else { return Next::Taken };
    let drained = rx.drain(&mut buf, false);
    let next = match drained {
        Drained::More => Next::Again,
        Drained::Empty => Next::Empty,
        Drained::Open | Drained::Closed(_) => Next::Idle,
    };
    // With more to read at once (`Again`), the copies started for inline payloads run while the
    // reactor reads on; otherwise they are waited for. An empty read still answers for those left
    // running by the last one.
    if next == Next::Empty && !conn.copies_started() {
        return next;
    }
    after_handling(next, conn.handle_read(&mut buf, drained, next == Next::Again))
}

/// The reactor's next step once what its read brought was handled.
fn after_handling(next: Next, handled: Handled) -> Next {
    match handled {
        Handled::Failed => Next::Stop,
        Handled::ChunksOut if next == Next::Idle => Next::Handed,
        Handled::ChunksOut | Handled::Settled => next,
    }
}

/// Reads what the control stream holds, blocking a bounded time for something (never past
/// `deadline`), and handles every whole message; false once the connection failed or the deadline
/// passed. A read that came back empty ran out its slice waiting for `t`'s answer
/// (`Transfer::slice_ran_out`).
fn pump_for(conn: &impl Served, buf: &mut RxBuffer, t: &Transfer, deadline: Option<Instant>) -> bool {
    let drained = match deadline {
        None => conn.rx().drain(buf, true),
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            conn.rx().drain_within(buf, left)
        }
    };
    if matches!(drained, Drained::Empty) {
        t.slice_ran_out();
    }
    conn.handle_read(buf, drained, false) != Handled::Failed
}

/// Reads the control stream in the caller's thread while `t` waits for the peer's answer to one of
/// its parts (for inline transfers and same-host reads polling for the spin time first, then in
/// bounded blocking reads), unless another thread is reading it: then that thread delivers the
/// reply, which the caller watches for during the spin time and afterwards sleeps on. A part
/// answered while its own chunks are still being tested is finished by the progress thread: the
/// caller sleeps on that. Work left to the caller by what it or another thread read (a copy of ours
/// the target granted) runs with the stream given back, so the connection's other messages are
/// read meanwhile; then the caller reads again.
pub(super) fn read_until_finished(conn: &impl Served, t: &Transfer) {
    read_for_answer(conn, t, None);
}

/// The same for a caller that waits until `deadline` (`wait_within`): its reads after the spin
/// wait for bytes no later than the deadline, so that the caller is back within its slice (the
/// Python package's 50 ms, to see signals), then it leaves the stream to the reactor and sleeps
/// until the transfer's end wakes it. Parked at once instead, a caller learnt of its answer
/// through the reactor's wake-up: a 4 KiB write 1.1-1.3x the time of polling for it, a 1 MiB write
/// over the channels 1.08-1.28x (the Python package).
pub(super) fn read_until(conn: &impl Served, t: &Transfer, deadline: Instant) {
    read_for_answer(conn, t, Some(deadline));
}

/// Reads for `t`'s answer: in blocking reads with no deadline, else in waits ending by it.
fn read_for_answer(conn: &impl Served, t: &Transfer, deadline: Option<Instant>) {
    let rx = conn.rx();
    let spin = if t.answers() == Answers::Inline { rx.spin() } else { std::time::Duration::ZERO };
    loop {
        // The stream may be held for a moment by a control reactor's poll: try again during the
        // spin time, watching for the reply (or work left to us) meanwhile.
        let until = Instant::now() + spin;
        let taken = loop {
            if let Some(buf) = rx.take() {
                break Some(buf);
            }
            if t.is_finished() || conn.work_waiting() || Instant::now() >= until {
                break None;
            }
            std::thread::yield_now();
        };
        if let Some(mut buf) = taken {
            // The reactor no longer reads the stream once a caller took it: the copies it left
            // running (the one our answer waits for, perhaps) are answered for here first. None
            // is left while we hold it: our own reads wait for theirs, as every other path does.
            let alive = !conn.copies_started() || conn.handle_read(&mut buf, Drained::Empty, false) != Handled::Failed;
            if alive && spin_until_finished(conn, &mut buf, t, spin) {
                // Each blocking read is bounded, so a reply delivered some other way (a failure)
                // is noticed.
                while !t.is_finished()
                    && t.awaits_answer()
                    && !conn.work_waiting()
                    && pump_for(conn, &mut buf, t, deadline)
                {}
            }
        }
        if t.is_finished() || !conn.work_waiting() {
            return;
        }
        conn.run_waiting(t.id);
    }
}

/// Polls the stream without blocking, for at most `spin`, while `t` waits for an answer and no
/// work was left to the caller; false once the connection failed. Frames are handled only when
/// bytes came, so polling takes no lock.
fn spin_until_finished(conn: &impl Served, buf: &mut RxBuffer, t: &Transfer, spin: std::time::Duration) -> bool {
    let rx = conn.rx();
    let until = Instant::now() + spin;
    while !t.is_finished() && t.awaits_answer() && !conn.work_waiting() && Instant::now() < until {
        let drained = rx.drain(buf, false);
        if !matches!(drained, Drained::Empty) && conn.handle_read(buf, drained, false) == Handled::Failed {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{Handled, Next, after_handling};

    /// A turn that left chunks with the data sockets says so unless more is to be read at once
    /// (the reactor comes back then anyway); a failure stops the connection whatever was read.
    #[test]
    fn a_turn_names_chunks_left_with_the_data_sockets() {
        assert_eq!(after_handling(Next::Idle, Handled::ChunksOut), Next::Handed);
        assert_eq!(after_handling(Next::Idle, Handled::Settled), Next::Idle);
        assert_eq!(after_handling(Next::Again, Handled::ChunksOut), Next::Again);
        assert_eq!(after_handling(Next::Again, Handled::Settled), Next::Again);
        for next in [Next::Idle, Next::Again] {
            assert_eq!(after_handling(next, Handled::Failed), Next::Stop);
        }
    }
}
