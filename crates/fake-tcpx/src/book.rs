//! The requests of a send comm under either plugin's rules: TCPX's ring of 16, tested oldest
//! first (`request.rs`), or TCPXO's unbounded ledger, tested in any order (`ledger.rs`). The send
//! path itself (staging, the wire, progress inside `test`) is the same for both.

use std::ffi::{c_int, c_void};

use crate::fail::Result;
use crate::ledger::Ledger;
use crate::profile::Kind;
use crate::request::{OP_SEND, Ring};

pub enum Book {
    Ring(Ring),
    Ledger(Ledger),
}

impl Book {
    pub fn new(kind: Kind) -> Book {
        match kind {
            Kind::Tcpx => Book::Ring(Ring::new()),
            Kind::Tcpxo => Book::Ledger(Ledger::default()),
        }
    }

    /// A new send request of the comm the caller knows as `comm`, `offset` bytes into its
    /// registration: its sequence number and the pointer handed out.
    pub fn post(
        &mut self,
        comm: usize,
        data: *mut c_void,
        mem_type: c_int,
        size: c_int,
        offset: u64,
    ) -> Result<(u64, *mut c_void)> {
        match self {
            Book::Ring(r) => {
                let (k, entry) = r.post(comm, OP_SEND, data, mem_type, size)?;
                entry.gpu_mem_off = offset;
                Ok((k, r.pointer(k)))
            }
            Book::Ledger(l) => l.post(comm),
        }
    }

    /// The request that `id` (what the registry found the pointer to be) names, if it may be
    /// tested now.
    pub fn testable(&self, id: usize) -> Result<u64> {
        match self {
            Book::Ring(r) => r.check_test(id),
            Book::Ledger(l) => l.testable(id as u64),
        }
    }

    /// Request `k` was reported done; a send holds nothing after that.
    pub fn done(&mut self, k: u64) {
        match self {
            Book::Ring(r) => {
                r.tested += 1;
                r.released += 1;
            }
            Book::Ledger(l) => l.done(k),
        }
    }

    /// The test of request `k` failed.
    pub fn failed(&mut self, k: u64) {
        if let Book::Ledger(l) = self {
            l.failed(k);
        }
    }

    pub fn posted(&self) -> u64 {
        match self {
            Book::Ring(r) => r.posted,
            Book::Ledger(l) => l.posted(),
        }
    }

    pub fn in_flight(&self) -> u64 {
        match self {
            Book::Ring(r) => r.in_flight(),
            Book::Ledger(l) => l.in_flight(),
        }
    }

    /// The address range the registry maps back to the comm (TCPX's ring).
    pub fn ring_base(&self) -> Option<usize> {
        match self {
            Book::Ring(r) => Some(r.base()),
            Book::Ledger(_) => None,
        }
    }
}

/// What one `test` call found of a request.
#[derive(Debug)]
pub enum Tested {
    Pending,
    /// Done, with the size the request moved.
    Done(c_int),
    /// The request failed now (the comm's failure).
    Failed(crate::fail::Fail),
}
