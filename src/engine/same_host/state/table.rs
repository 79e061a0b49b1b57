//! What the same-host path keeps per connection (`state.rs` is what it does with it): the
//! initiator's requests waiting for their answer, the host worker's queue, copies waiting for the
//! target's word, and the target's leases on its memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::engine::region::Region;
use crate::engine::transfer::Transfer;
use crate::error::Error;
use crate::proto::RemoteSeg;
use crate::transport::IoSeg;

/// Work a peer may queue here (copies of its writes, leases of its reads) before it is treated as
/// hostile.
pub(super) const MAX_DIRECT_PENDING: usize = 1 << 16;

/// What the connection's host worker does next, outside the connection lock.
pub(crate) enum HostTask {
    /// Check the peer's ProcessHello and probe the kernel (`same_host::prove`).
    Prove {
        pid: u32,
        fd: u32,
    },
    Copy(CopyJob),
}

/// One copy out of the peer's process into memory of ours.
pub(crate) struct CopyJob {
    /// The peer's write op (answered with Done when copied) or our read op (followed by DirectDone).
    pub op: u64,
    /// `None` for the peer's write.
    pub read: Option<OurRead>,
    /// The region the bytes land in, ours.
    pub region: Arc<Region>,
    pub local: Vec<IoSeg>,
    /// Where the same bytes lie in the peer.
    pub remote: Vec<IoSeg>,
    /// The peer said its memory there lies on huge pages: a hint for the copy's piece size only.
    pub remote_huge: bool,
    pub len: u64,
    /// Set when the region was cut off before the copy ran: nothing is copied, the op fails.
    pub error: Option<Error>,
    /// When it was queued, in CLOCK_MONOTONIC ns (for the `host` trace; 0 when it is off).
    pub queued: u64,
}

impl CopyJob {
    /// Our read's part; `None` for the peer's write.
    pub fn transfer(&self) -> Option<&Arc<Transfer>> {
        self.read.as_ref().map(|read| &read.transfer)
    }
}

/// Our read that a copy job carries out.
pub(crate) struct OurRead {
    pub transfer: Arc<Transfer>,
    /// The remote region and token the read was asked for with, so that a copy out of the peer
    /// that the kernel refuses is asked for again over the channels (`ConnState::copy_refused`).
    pub ask: (u64, u64),
}

/// Our direct read waiting in `inbound` for the target's answer: what it asked for.
pub(super) struct AskedRead {
    pub(super) region: u64,
    pub(super) token: u64,
    pub(super) segs: Vec<RemoteSeg>,
}

impl AskedRead {
    /// The read a copy job carries for this ask, given the part of our transfer it fills (`None`
    /// leaves the job without one).
    pub(super) fn read_for(&self, transfer: Option<&Arc<Transfer>>) -> Option<OurRead> {
        transfer.map(|t| OurRead { transfer: t.clone(), ask: (self.region, self.token) })
    }
}

/// Our read, copied, waiting for the target's Done.
pub(super) struct Copied {
    pub(super) transfer: Arc<Transfer>,
    pub(super) len: u64,
    pub(super) region: u64,
    pub(super) error: Option<Error>,
}

/// The peer's read we authorized, until its DirectDone.
pub(super) struct Lease {
    pub(super) region: Arc<Region>,
    pub(super) len: u64,
}

/// How far the same-host path got on this connection, for the caller's inspection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPath {
    /// Both checks are through: ours of the peer's process, and the peer's of ours (its answer
    /// arrived). Until then requests take the network path.
    pub checked: bool,
    /// We proved the peer's process and the kernel lets us read it: our reads copy directly, and
    /// so do the peer's writes into us.
    pub reads_peer: bool,
    /// The peer said the same of us: our writes ask to be copied in directly.
    pub peer_reads_us: bool,
    /// One-sided requests this end started that completed through the direct copy.
    pub direct_ops: u64,
    /// Copies of our reads that the caller waiting or polling on them took up on its own thread
    /// rather than leaving them to the connection's host worker.
    pub caller_copies: u64,
}

#[derive(Default)]
pub(crate) struct SameHost {
    /// The handshake found the peer on this host (another process).
    pub(super) same_host: bool,
    /// Transfers longer than the first bound and shorter than the second take the network path
    /// (`Config::host_copy_network_band`).
    pub(super) network_band: Option<(u64, u64)>,
    /// Transfers whose source lies on huge pages skip the band (`Config::host_copy_huge_pages`).
    pub(super) huge_pages: bool,
    /// Our regions the peer copies out of are collapsed into huge pages
    /// (`Config::host_copy_collapse`).
    pub(super) collapse: bool,
    pub(super) hello_seen: bool,
    pub(super) ack_seen: bool,
    pub(super) proved: bool,
    /// What our ProcessAck told the peer: whether we can copy out of it. It may grant our reads
    /// for a copy only after a yes, and it never hears that the kernel refused a copy later.
    pub(super) announced_reads_peer: Option<bool>,
    pub(super) path: HostPath,
    /// Our direct writes waiting in `awaiting_grant`: a Done may answer them without a Grant.
    pub(super) writes: HashSet<u64>,
    /// Our direct reads waiting in `inbound` for DirectGrant.
    pub(super) reads: HashMap<u64, AskedRead>,
    /// Our reads whose copy the kernel refused, asked for again over the channels under another
    /// op id, with the bytes the target's lease covers: the target's answer to their DirectDone
    /// only ends its lease.
    pub(super) retried: HashMap<u64, u64>,
    pub(super) work: VecDeque<HostTask>,
    /// The part of our read the worker is copying now: failing the connection fails it too.
    pub(super) running: Option<Arc<Transfer>>,
    pub(super) copied: HashMap<u64, Copied>,
    pub(super) leases: HashMap<u64, Lease>,
    /// Host-copy tracing is on: jobs record when they were queued.
    pub(super) timed: bool,
}

impl SameHost {
    /// Whether a request of ours in that direction may ask for the direct path.
    pub(super) fn usable(&self, write: bool) -> bool {
        if write { self.path.peer_reads_us } else { self.path.reads_peer }
    }

    pub(super) fn pending(&self) -> usize {
        self.work.len() + self.leases.len()
    }

    /// The host worker's queue, for tests.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> &VecDeque<HostTask> {
        &self.work
    }

    /// The peer's reads we lease our memory to, for tests.
    #[cfg(test)]
    pub(crate) fn leases(&self) -> usize {
        self.leases.len()
    }
}
