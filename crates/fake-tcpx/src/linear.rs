//! A TCPXO receive comm. The k-th receive takes the k-th send: TCPXO deals both ends' requests
//! round-robin over the same flows, which "must have coherent current flow ID"
//! (`fo/nccl_shim.cc` `GetRequest` L593-598), and here one ordered stream carries them. The bytes
//! land in the posted buffer (`land.rs`), and `test` reports the size that arrived
//! (`fo/nccl_shim.cc` `Test` L718-721). There is no unpack, no bounce pool and no `irecvConsumed`.
//! Requests follow TCPXO's rules (`ledger.rs`): no bound, any order.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};

use uccl_tcpx::internal::ncclnet::{NCCL_PTR_CUDA, NCCL_PTR_HOST};
use uccl_tcpx::internal::transport::{MrHandle, RecvComm, RequestId};

use crate::book::Tested;
use crate::config::Config;
use crate::fail::{Fail, Result};
use crate::health::{AfterCompletion, Health, closed};
use crate::host::{self, Origin};
use crate::land::Landing;
use crate::ledger::Ledger;
use crate::log;
use crate::mr::Registrations;
use crate::send::host_payload;
use crate::wire::{self, HEADER_LEN};

struct Posted {
    data: usize,
    len: usize,
    /// Device memory (a CUDA registration in GPU mode).
    device: bool,
    /// The size that arrived, once it is in the posted buffer.
    arrived: Option<usize>,
}

/// Where the one receive being filled stands: messages arrive in order on one stream.
enum Rx {
    /// Waiting for the next message's header: its receive, once posted.
    Header(Option<RequestId>),
    Payload {
        seq: u64,
        len: usize,
        id: RequestId,
    },
}

pub struct LinearRecv {
    /// First field: dropped (closing the stream, joining its helper thread) before the buffers below.
    inner: Option<Box<dyn RecvComm>>,
    landing: Landing,
    key: usize,
    same_host_allowed: bool,
    ledger: Ledger,
    regs: Registrations,
    health: Health,
    /// Receives posted and not yet reported done, by sequence number.
    posted: HashMap<u64, Posted>,
    rx: Rx,
    /// Sequence number of the receive whose header comes next.
    next_header: u64,
    header: Box<[u8; HEADER_LEN]>,
}

impl LinearRecv {
    pub fn new(inner: Box<dyn RecvComm>, landing: Landing, cfg: &Config) -> LinearRecv {
        let health = Health::new(cfg.fault);
        let inner = (!health.drops_at_start()).then_some(inner);
        LinearRecv {
            inner,
            landing,
            key: 0,
            same_host_allowed: cfg.same_host_allowed,
            ledger: Ledger::default(),
            regs: Registrations::default(),
            health,
            posted: HashMap::new(),
            rx: Rx::Header(None),
            next_header: 0,
            header: Box::new([0; HEADER_LEN]),
        }
    }

    /// The address the caller knows this comm by.
    pub fn set_key(&mut self, key: usize) {
        self.key = key;
    }

    pub fn regs(&mut self) -> &mut Registrations {
        &mut self.regs
    }

    pub fn irecv(&mut self, data: *mut c_void, size: c_int, mhandle: *mut c_void) -> Result<*mut c_void> {
        let len = usize::try_from(size).map_err(|_| Fail::internal(format!("irecv size {size} is negative")))?;
        let mr = self.regs.covering(mhandle, data as usize, len)?;
        if mr.kind & NCCL_PTR_HOST != 0 && len > 0 {
            return Err(host_payload("Recv", len, self.key));
        }
        let device = mr.kind == NCCL_PTR_CUDA && self.landing.context().is_some();
        if let (Some(gpu), Some(owner)) = (self.landing.context(), mr.device)
            && owner != gpu.ordinal()
        {
            let g = gpu.ordinal();
            return Err(Fail::internal(format!(
                "receive into memory of GPU {owner} on a receive comm of GPU {g} (the device current at accept): \
                 TCPXO registers a buffer with the RxDM of its comm's NIC (fo/nccl_shim.cc RegMrDmaBuf L816), and \
                 whether its transfer service writes another GPU's memory is not in its source; the fake refuses. \
                 Receive GPU {owner}'s data on a comm accepted with GPU {owner} current"
            )));
        }
        if let Some(limit) = self.landing.device_limit().filter(|l| device && len > *l) {
            return Err(Fail::internal(format!(
                "a {len}-byte receive into GPU memory exceeds the fake's {limit}-byte staging (a limit of the fake, \
                 not of TCPXO): keep GPU-mode requests within it"
            )));
        }
        let (k, request) = self.ledger.post(self.key)?;
        self.posted.insert(k, Posted { data: data as usize, len, device, arrived: None });
        let key = self.key;
        log::trace(|| {
            let mem = if device { "device" } else { "host" };
            format!("recv {key:#x} irecv k={k} size={len} into {data:p} ({mem} memory)")
        });
        Ok(request)
    }

    /// One `test` of receive `k`. Only here does the comm progress.
    pub fn test(&mut self, k: u64) -> Result<Tested> {
        let k = self.ledger.testable(k)?;
        let arrived = match self.advance(k) {
            Ok(arrived) => arrived,
            Err(f) => {
                let f = self.health.fail(f);
                self.ledger.failed(k);
                return Ok(Tested::Failed(f));
            }
        };
        let Some(n) = arrived else { return Ok(Tested::Pending) };
        self.posted.remove(&k);
        self.ledger.done(k);
        let key = self.key;
        log::trace(|| format!("recv {key:#x} test k={k} done: {n} bytes in the posted buffer"));
        if self.health.completed() == AfterCompletion::Drop {
            self.inner = None;
        }
        Ok(Tested::Done(n as c_int))
    }

    /// Progresses the comm, unless it stalled; the size that arrived for receive `k`, once it did.
    fn advance(&mut self, k: u64) -> Result<Option<usize>> {
        if !self.health.may_progress()? {
            return Ok(None);
        }
        self.progress()?;
        Ok(self.posted.get(&k).and_then(|p| p.arrived))
    }

    fn progress(&mut self) -> Result<()> {
        loop {
            let inner = self.inner.as_mut().ok_or_else(|| Fail::system("Connection closed by remote peer"))?;
            self.rx = match std::mem::replace(&mut self.rx, Rx::Header(None)) {
                Rx::Header(mut id) => {
                    if id.is_none() && self.next_header >= self.ledger.posted() {
                        self.rx = Rx::Header(None);
                        return Ok(());
                    }
                    let seq = self.next_header;
                    let Some((len, origin)) = wire::poll_header(&mut **inner, &mut self.header, &mut id, seq)? else {
                        self.rx = Rx::Header(id);
                        return Ok(());
                    };
                    let p = self.posted.get(&seq).ok_or_else(|| Fail::internal("a posted receive lost its record"))?;
                    check_arrival(seq, len, p.len, origin, self.same_host_allowed)?;
                    let (dst, device) = (p.data, p.device);
                    let target = self.landing.target(dst, len, device)?;
                    let inner = self.inner.as_mut().expect("checked above");
                    // SAFETY: `target` is the posted buffer (at least `len` bytes: checked above),
                    // which the irecv contract keeps valid until the receive is reported done, or
                    // this comm's own staging, which does not move while the comm lives; dropping
                    // `inner` first joins its thread.
                    match unsafe { inner.irecv(target, len, MrHandle(0)) }.map_err(closed)? {
                        Some(id) => Rx::Payload { seq, len, id },
                        None => return Err(Fail::internal("socket transport refused a request inside its window")),
                    }
                }
                Rx::Payload { seq, len, id } => {
                    let Some(n) = inner.test(id).map_err(closed)? else {
                        self.rx = Rx::Payload { seq, len, id };
                        return Ok(());
                    };
                    inner.irecv_consumed(id).map_err(closed)?;
                    if n != len {
                        return Err(Fail::internal(format!("peer announced {len} bytes and sent {n}")));
                    }
                    let p =
                        self.posted.get_mut(&seq).ok_or_else(|| Fail::internal("a posted receive lost its record"))?;
                    self.landing.finish(p.data, len, p.device)?;
                    p.arrived = Some(len);
                    self.next_header += 1;
                    Rx::Header(None)
                }
            };
        }
    }
}

/// Whether the sender's message may land in receive `seq`, posted for `posted` bytes. Either
/// failure ends the comm: the stream then stands before bytes nobody may read.
fn check_arrival(seq: u64, len: usize, posted: usize, origin: Origin, same_host_allowed: bool) -> Result<()> {
    if let Some(ends) = host::same_host_ends(origin).filter(|_| len > 0 && !same_host_allowed) {
        return Err(Fail::system(format!(
            "receive {seq}: {ends}. Whether TCPXO's transfer service serves a VM's traffic to itself is not in its \
             source (its connect answers include kNotServingVM, dxs/client/control-command.h ConnectAckMessage \
             L224), so the fake refuses it: reach a same-host peer without the plugin (FAKE_TCPX_SAME_HOST=allow \
             permits it in tests)"
        )));
    }
    if len > posted {
        return Err(Fail::system(format!(
            "receive {seq}: the sender's {len} bytes exceed the {posted} posted. TCPXO writes into the posted buffer \
             and its transfer service answers a mismatch with kSendRecvSizeMismatch (dxs/client/control-command.h \
             L307); which mismatches it refuses is not in the source, so the fake refuses a larger send (a smaller \
             one arrives, and test reports its size)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_that_cannot_land() {
        let me = host::local();
        let other = Origin { host: me.host ^ 1, pid: 7 };
        assert!(check_arrival(0, 100, 100, other, false).is_ok());
        assert!(check_arrival(0, 10, 100, other, false).is_ok(), "smaller than posted");
        assert!(check_arrival(0, 101, 100, other, false).unwrap_err().msg.contains("kSendRecvSizeMismatch"));
        assert!(check_arrival(0, 1, 100, me, false).unwrap_err().msg.contains("same-host"));
        assert!(check_arrival(0, 0, 100, me, false).is_ok(), "no payload");
        assert!(check_arrival(0, 1, 100, me, true).is_ok());
        assert_eq!(check_arrival(0, 101, 100, other, false).unwrap_err().rc, 2);
    }
}
