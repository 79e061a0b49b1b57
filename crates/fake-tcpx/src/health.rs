//! A comm's failure state and the injected faults (FAKE_TCPX_FAULT), counted in completed requests.

use crate::config::Fault;
use crate::fail::{Fail, Result};

pub struct Health {
    fault: Fault,
    completed: u64,
    failed: Option<Fail>,
    stalled: bool,
}

/// What the caller must do after a completion.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterCompletion {
    Continue,
    /// Drop the connection now.
    Drop,
}

impl Health {
    pub fn new(fault: Fault) -> Health {
        let stalled = fault == Fault::Stall(0);
        let mut h = Health { fault, completed: 0, failed: None, stalled };
        if fault == Fault::Drop(0) {
            h.failed = Some(dropped(0));
        }
        h
    }

    /// Whether the comm may progress; a failure is sticky and reported on every later test.
    pub fn may_progress(&self) -> Result<bool> {
        match &self.failed {
            Some(f) => Err(f.clone()),
            None => Ok(!self.stalled),
        }
    }

    pub fn fail(&mut self, f: Fail) -> Fail {
        self.failed.get_or_insert(f).clone()
    }

    pub fn completed(&mut self) -> AfterCompletion {
        self.completed += 1;
        match self.fault {
            Fault::Drop(n) if self.completed == n => {
                self.failed = Some(dropped(n));
                AfterCompletion::Drop
            }
            Fault::Stall(n) if self.completed == n => {
                self.stalled = true;
                AfterCompletion::Continue
            }
            _ => AfterCompletion::Continue,
        }
    }

    /// Whether a drop-at-start fault asks for the connection to be dropped right away.
    pub fn drops_at_start(&self) -> bool {
        self.fault == Fault::Drop(0)
    }
}

fn dropped(n: u64) -> Fail {
    Fail::system(format!("Connection closed by remote peer (FAKE_TCPX_FAULT=drop:{n} dropped it after {n} requests)"))
}

/// How socket transport errors surface: TCPX reports socket failures as rc 2.
pub fn closed(e: uccl_tcpx::Error) -> Fail {
    Fail::system(format!("Connection closed by remote peer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_after_n() {
        let mut h = Health::new(Fault::Drop(2));
        assert!(h.may_progress().unwrap());
        assert_eq!(h.completed(), AfterCompletion::Continue);
        assert_eq!(h.completed(), AfterCompletion::Drop);
        assert_eq!(h.may_progress().unwrap_err().rc, 2);
    }

    #[test]
    fn stall_after_n() {
        let mut h = Health::new(Fault::Stall(1));
        assert!(h.may_progress().unwrap());
        h.completed();
        assert!(!h.may_progress().unwrap());
        assert!(!Health::new(Fault::Stall(0)).may_progress().unwrap());
    }
}
