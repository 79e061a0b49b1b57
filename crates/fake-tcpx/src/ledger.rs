//! TCPXO's requests of one comm. There is no bound: `isend`/`irecv` allocate each request
//! (`fo/nccl_shim.cc` `GetRequest` L515-531) and the NIC client keeps its op in a map
//! (`dxs/dxs-client.cc` `RegisterSendOp` L533). Any request may be tested at any time, in any
//! order: each op reads its own state (`dxs/send-op.h` `Test` L54, `dxs/linearized-recv-op.h`
//! `Test` L56). A request `test` reported done is freed (`fo/nccl_shim.cc` `Test` L728), so the
//! fake forgets it (a later test of it is caught in `lib.rs`); one whose test failed is kept in
//! error state, and every later test of it fails again (`fo/fastrak_plugin.cc` `Test` L232).

use std::collections::HashMap;
use std::ffi::c_void;

use crate::addresses;
use crate::fail::{Fail, Result};
use crate::pointers;

#[derive(Default)]
pub struct Ledger {
    posted: u64,
    /// Requests handed out and not reported done, by sequence number.
    live: HashMap<u64, Entry>,
}

struct Entry {
    addr: usize,
    failed: bool,
}

impl Ledger {
    /// A new request of the comm the caller knows as `comm`: its sequence number (`posted` before
    /// the call) and the pointer handed out for it, which the registry maps back to the comm.
    pub fn post(&mut self, comm: usize) -> Result<(u64, *mut c_void)> {
        let addr = addresses::next()?;
        let k = self.posted;
        self.posted += 1;
        self.live.insert(k, Entry { addr, failed: false });
        pointers::add(addr, comm, k);
        Ok((k, addr as *mut c_void))
    }

    /// Request `k` if it may be tested: it is live and not in error state.
    pub fn testable(&self, k: u64) -> Result<u64> {
        match self.live.get(&k) {
            Some(e) if e.failed => Err(Fail::system(
                "Request is in error state (fo/fastrak_plugin.cc Test L232): its test already failed; TCPXO fails \
                 every later test of it and never frees it",
            )),
            Some(_) => Ok(k),
            None => Err(Fail::internal(format!("test called with request {k}, which this comm does not hold"))),
        }
    }

    /// `test` reported request `k` done: it is gone.
    pub fn done(&mut self, k: u64) {
        if let Some(e) = self.live.remove(&k) {
            pointers::remove(e.addr);
        }
    }

    /// `test` of request `k` failed: it stays, in error state.
    pub fn failed(&mut self, k: u64) {
        if let Some(e) = self.live.get_mut(&k) {
            e.failed = true;
        }
    }

    /// Requests handed out so far.
    pub fn posted(&self) -> u64 {
        self.posted
    }

    /// Requests handed out and not reported done (failed ones included).
    pub fn in_flight(&self) -> u64 {
        self.live.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbounded_any_order_and_error_state() {
        let mut l = Ledger::default();
        let posted: Vec<(u64, *mut c_void)> = (0..100).map(|_| l.post(0x4000).unwrap()).collect();
        assert_eq!((l.posted(), l.in_flight()), (100, 100), "no bound");
        assert_eq!(l.testable(57).unwrap(), 57, "any request, in any order");
        l.done(57);
        assert!(l.testable(57).is_err(), "gone once done");
        assert!(pointers::get(posted[57].1 as usize).is_none());
        assert!(addresses::issued(posted[57].1 as usize), "still known as handed out");
        l.failed(3);
        assert!(l.testable(3).unwrap_err().msg.contains("error state"));
        assert_eq!(l.in_flight(), 99, "a failed request stays");
        for k in 0..100 {
            l.done(k);
        }
        assert_eq!(l.in_flight(), 0);
    }
}
