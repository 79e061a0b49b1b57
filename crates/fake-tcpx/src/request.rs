//! The request ring of a comm. Request pointers handed to the caller point at 128-byte entries laid
//! out like TCPX's `tcpxRequest` (public source), so a consumer that peeks at the size (offset 36) or
//! the unpack slot (offsets 56-88) finds what it would find in TCPX. Requests are created and
//! retired in posting order, so request `k` of a comm always lives in entry `k % 16`.

use std::ffi::{c_int, c_void};
use std::mem::{offset_of, size_of};

use uccl_tcpx::internal::ncclnet::{LoadMeta, UNPACK_QUEUE_DEPTH};

use crate::fail::{Fail, Result};

/// TCPX's `MAX_REQUESTS` per comm.
pub const MAX_REQUESTS: usize = 16;
const _: () = assert!(MAX_REQUESTS == UNPACK_QUEUE_DEPTH);

pub const OP_SEND: c_int = 0;
pub const OP_RECV: c_int = 1;

#[repr(C)]
#[derive(Debug)]
pub struct RequestEntry {
    pub comm: *mut c_void,
    pub data: *mut c_void,
    pub op: c_int,
    pub mem_type: c_int,
    pub next_sock_id: c_int,
    pub next_size: c_int,
    pub offset: c_int,
    /// The sender's size once known (the receiver's posted size until then).
    pub size: c_int,
    pub size_pending: c_int,
    pub gpu_mem_fd: c_int,
    pub gpu_mem_off: u64,
    pub unpack_active: bool,
    pub unpack_idx: u64,
    pub unpack_mem: *mut LoadMeta,
    pub unpack_cnt: *mut u64,
    pub unpack_cnt_cache: u64,
    pub reserved: [*mut c_void; 4],
}

const _: () = {
    assert!(size_of::<RequestEntry>() == 128);
    assert!(offset_of!(RequestEntry, op) == 16);
    assert!(offset_of!(RequestEntry, size) == 36);
    assert!(offset_of!(RequestEntry, gpu_mem_off) == 48);
    assert!(offset_of!(RequestEntry, unpack_active) == 56);
    assert!(offset_of!(RequestEntry, unpack_idx) == 64);
    assert!(offset_of!(RequestEntry, unpack_mem) == 72);
    assert!(offset_of!(RequestEntry, unpack_cnt) == 80);
    assert!(offset_of!(RequestEntry, unpack_cnt_cache) == 88);
};

impl RequestEntry {
    fn empty() -> RequestEntry {
        RequestEntry {
            comm: std::ptr::null_mut(),
            data: std::ptr::null_mut(),
            op: 0,
            mem_type: 0,
            next_sock_id: 0,
            next_size: 0,
            offset: 0,
            size: 0,
            size_pending: 0,
            gpu_mem_fd: -1,
            gpu_mem_off: 0,
            unpack_active: false,
            unpack_idx: 0,
            unpack_mem: std::ptr::null_mut(),
            unpack_cnt: std::ptr::null_mut(),
            unpack_cnt_cache: 0,
            reserved: [std::ptr::null_mut(); 4],
        }
    }
}

/// Counters over the comm's request sequence: `[released, tested)` completed but still holding an
/// entry (receives awaiting `irecvConsumed`), `[tested, posted)` in flight.
pub struct Ring {
    entries: Box<[RequestEntry; MAX_REQUESTS]>,
    pub posted: u64,
    pub tested: u64,
    pub released: u64,
}

// SAFETY: the raw pointers in the entries are plain values for the caller to read; the ring never
// dereferences them.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new() -> Ring {
        Ring { entries: Box::new(std::array::from_fn(|_| RequestEntry::empty())), posted: 0, tested: 0, released: 0 }
    }

    /// Address of the entry array, which the registry maps back to this comm.
    pub fn base(&self) -> usize {
        self.entries.as_ptr() as usize
    }

    pub fn span() -> usize {
        MAX_REQUESTS * size_of::<RequestEntry>()
    }

    /// Takes the next entry for an `op` request of the comm the caller knows as `comm`; its sequence
    /// number is `posted` before the call.
    pub fn post(
        &mut self,
        comm: usize,
        op: c_int,
        data: *mut c_void,
        mem_type: c_int,
        size: c_int,
    ) -> Result<(u64, &mut RequestEntry)> {
        if self.posted - self.released >= MAX_REQUESTS as u64 {
            return Err(Fail::internal(format!(
                "unable to allocate requests: {MAX_REQUESTS} requests are outstanding on this comm \
                 ({} completed receives not yet consumed)",
                self.tested - self.released
            )));
        }
        let k = self.posted;
        self.posted += 1;
        let e = &mut self.entries[k as usize % MAX_REQUESTS];
        *e = RequestEntry { comm: comm as *mut c_void, data, op, mem_type, size, ..RequestEntry::empty() };
        Ok((k, e))
    }

    pub fn entry(&mut self, k: u64) -> &mut RequestEntry {
        &mut self.entries[k as usize % MAX_REQUESTS]
    }

    pub fn pointer(&self, k: u64) -> *mut c_void {
        &self.entries[k as usize % MAX_REQUESTS] as *const RequestEntry as *mut c_void
    }

    /// The sequence number of the live request in entry `slot`, if any.
    fn live(&self, slot: usize) -> Option<u64> {
        (self.released..self.posted).find(|k| *k as usize % MAX_REQUESTS == slot)
    }

    /// `test` is valid only on the oldest in-flight request.
    pub fn check_test(&self, slot: usize) -> Result<u64> {
        match self.live(slot) {
            Some(k) if k == self.tested => Ok(k),
            Some(k) if k < self.tested => {
                Err(Fail::internal(format!("test called with invalid request: request {k} was already reported done")))
            }
            Some(k) => Err(Fail::internal(format!(
                "test called with invalid request: request {k} is not the oldest in flight ({})",
                self.tested
            ))),
            None => Err(Fail::internal("test called with invalid request: no request lives in that entry")),
        }
    }

    /// `irecvConsumed` is valid only on the oldest completed, unconsumed receive.
    pub fn check_consume(&self, slot: usize) -> Result<u64> {
        match self.live(slot) {
            Some(k) if k == self.released && k < self.tested => Ok(k),
            Some(k) if k >= self.tested => Err(Fail::internal(format!(
                "irecvConsumed called with invalid request: request {k} has not been reported done"
            ))),
            Some(k) => Err(Fail::internal(format!(
                "irecvConsumed called with invalid request: request {k} is not the oldest unconsumed ({})",
                self.released
            ))),
            None => Err(Fail::internal("irecvConsumed called with invalid request: no request lives in that entry")),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.posted - self.tested
    }

    pub fn unconsumed(&self) -> u64 {
        self.tested - self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_rules() {
        let mut r = Ring::new();
        let post = |r: &mut Ring| r.post(0x40, OP_SEND, std::ptr::null_mut(), 0, 1).map(|(k, _)| k);
        for _ in 0..MAX_REQUESTS {
            post(&mut r).unwrap();
        }
        assert!(post(&mut r).unwrap_err().msg.contains("unable to allocate requests"));
        assert!(r.check_test(1).is_err());
        assert_eq!(r.check_test(0).unwrap(), 0);
        assert!(r.check_consume(0).is_err(), "not yet done");
        r.tested = 2;
        assert!(r.check_test(0).is_err(), "already done");
        assert!(r.check_consume(1).is_err(), "not the oldest");
        assert_eq!(r.check_consume(0).unwrap(), 0);
        r.released = 1;
        assert_eq!(post(&mut r).unwrap(), 16);
        assert_eq!(r.live(0), Some(16));
        assert_eq!(r.pointer(16), r.pointer(0));
    }

    /// A posted entry holds what the post names and nothing of the request that used it before.
    #[test]
    fn post_fills_a_fresh_entry() {
        let mut r = Ring::new();
        let mut data = [0u8; 8];
        let (_, used) = r.post(0x40, OP_SEND, data.as_mut_ptr().cast(), 2, 8).unwrap();
        used.gpu_mem_off = 4096;
        used.unpack_active = true;
        used.unpack_cnt_cache = 7;
        for _ in 1..MAX_REQUESTS {
            r.post(0x40, OP_SEND, std::ptr::null_mut(), 0, 0).unwrap();
        }
        r.tested = MAX_REQUESTS as u64;
        r.released = MAX_REQUESTS as u64;
        let (k, e) = r.post(0x80, OP_RECV, std::ptr::null_mut(), 1, 512).unwrap();
        assert_eq!(k, MAX_REQUESTS as u64);
        assert_eq!((e.comm as usize, e.data, e.op, e.mem_type, e.size), (0x80, std::ptr::null_mut(), OP_RECV, 1, 512));
        assert_eq!((e.gpu_mem_off, e.unpack_active, e.unpack_cnt_cache, e.gpu_mem_fd), (0, false, 0, -1));
    }
}
