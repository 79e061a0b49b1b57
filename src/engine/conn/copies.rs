//! Device copies the state started for inline payloads (`Action::AfterCopy`) and what waits for
//! each, in the order they started. The control reader starts one and reads on while it runs; the
//! connection carries out what follows a copy once it is done, and waits for all of them before
//! its reader goes idle, before a deregistration returns and when it fails, so no copy outlives
//! the memory it touches unwatched.

use std::collections::VecDeque;

use super::state::{Action, AfterCopy};
use crate::error::{Error, Result};
use crate::proto::Control;

#[derive(Default)]
pub(super) struct StartedCopies {
    queue: VecDeque<AfterCopy>,
}

impl StartedCopies {
    pub fn push(&mut self, copy: AfterCopy) {
        self.queue.push_back(copy);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// What follows the copies at the front that are done, in order (every copy's, waiting for
    /// them, with `wait`). A copy's error is returned with it kept: the connection fails, and
    /// `abandon` fails its parts.
    pub fn settle(&mut self, wait: bool) -> Result<Vec<Action>> {
        let mut out = Vec::new();
        while let Some(front) = self.queue.front() {
            let done = if wait { front.copy.wait().map(|()| true) } else { front.copy.done() };
            if !done.map_err(|e| e.context("a device copy of an inline payload"))? {
                break;
            }
            let AfterCopy { copy, then, read_answer } = self.queue.pop_front().expect("non-empty");
            out.extend(then);
            if let Some(xfer) = read_answer {
                out.push(Action::Send(Control::ReadData { xfer, payload: copy.loaded().to_vec() }));
            }
        }
        Ok(out)
    }

    /// After the connection failed with `err`: waits for every copy and finishes the parts that
    /// waited for one, with their outcome where the copy landed and with `err` where it did not.
    /// Nothing is sent any more.
    pub fn abandon(&mut self, err: &Error) {
        for AfterCopy { copy, then, .. } in self.queue.drain(..) {
            let landed = copy.wait().is_ok();
            for action in then {
                if let Action::Finish(t, outcome) = action {
                    t.finish_part(if landed { outcome } else { Err(err.clone()) });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;
    use crate::engine::conn::state::Copying;
    use crate::engine::transfer::TransferTable;
    use crate::error::UcclStatus;

    /// A copy a test finishes: 0 running, 1 done, 2 failed; `wait` finishes a running one.
    #[derive(Debug)]
    struct Fake {
        state: Arc<AtomicU8>,
        bytes: Vec<u8>,
    }

    impl Copying for Fake {
        fn done(&self) -> Result<bool> {
            match self.state.load(Ordering::SeqCst) {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(Error::backend("copy failed")),
            }
        }

        fn wait(&self) -> Result<()> {
            let _ = self.state.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
            self.done().map(|_| ())
        }

        fn loaded(&self) -> &[u8] {
            &self.bytes
        }
    }

    fn copy(then: Vec<Action>, read_answer: Option<u64>, bytes: &[u8]) -> (AfterCopy, Arc<AtomicU8>) {
        let state = Arc::new(AtomicU8::new(0));
        let copy = Box::new(Fake { state: state.clone(), bytes: bytes.to_vec() });
        (AfterCopy { copy, then, read_answer }, state)
    }

    fn done_xfers(out: &[Action]) -> Vec<u64> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send(Control::Done { xfer, .. } | Control::ReadData { xfer, .. }) => Some(*xfer),
                _ => None,
            })
            .collect()
    }

    /// Answers leave in the order the copies started, a later copy's waiting for an earlier one
    /// still running; a load's answer carries the bytes it brought; `wait` settles them all.
    #[test]
    fn answers_follow_their_copies_in_order() {
        let mut copies = StartedCopies::default();
        let (a, a_state) = copy(vec![Action::Send(Control::Done { xfer: 1, len: 4 })], None, &[]);
        let (b, b_state) = copy(Vec::new(), Some(2), b"read");
        let (c, _) = copy(vec![Action::Send(Control::Done { xfer: 3, len: 4 })], None, &[]);
        [a, b, c].into_iter().for_each(|c| copies.push(c));

        assert!(copies.settle(false).unwrap().is_empty(), "nothing is done yet");
        b_state.store(1, Ordering::SeqCst);
        assert!(copies.settle(false).unwrap().is_empty(), "the second waits for the first");
        a_state.store(1, Ordering::SeqCst);
        let out = copies.settle(false).unwrap();
        assert_eq!(done_xfers(&out), [1, 2]);
        assert!(matches!(&out[1], Action::Send(Control::ReadData { payload, .. }) if payload == b"read"));
        assert!(!copies.is_empty());
        assert_eq!(done_xfers(&copies.settle(true).unwrap()), [3]);
        assert!(copies.is_empty());
    }

    /// A failed copy is the connection's error and stays queued; abandoning finishes the part of
    /// a copy that landed with its outcome and the failed copy's part with the connection's error.
    #[test]
    fn a_failed_copy_fails_the_connection_and_every_waiting_part_ends() {
        let transfers = TransferTable::default();
        let (landed_t, failed_t) = (transfers.create(1, 1, None), transfers.create(1, 1, None));
        let mut copies = StartedCopies::default();
        let (failed, failed_state) = copy(vec![Action::Finish(failed_t.clone(), Ok(8))], None, &[]);
        let (landed, _) = copy(vec![Action::Finish(landed_t.clone(), Ok(8))], None, &[]);
        copies.push(failed);
        copies.push(landed);
        failed_state.store(2, Ordering::SeqCst);
        let err = copies.settle(false).unwrap_err();
        assert!(err.message().contains("device copy"), "{err}");
        assert!(!copies.is_empty());

        copies.abandon(&Error::new(UcclStatus::ErrCanceled, "connection failed"));
        assert!(copies.is_empty());
        assert_eq!(transfers.poll(1, landed_t.id).unwrap(), Some(8));
        assert_eq!(transfers.poll(1, failed_t.id).unwrap_err().status(), UcclStatus::ErrCanceled);
    }
}
