//! A caller's one-sided requests as every path takes them: the connection state sends them to the
//! peer, the same-host paths copy them.

use std::sync::Arc;

use crate::engine::plan::Extent;
use crate::engine::region::Region;
use crate::proto::RemoteSeg;

/// One item of a caller's write or read: the local buffer and the peer's capability it targets.
pub(crate) struct OneSidedItem {
    pub region: Arc<Region>,
    pub addr: usize,
    pub len: u64,
    pub remote_region: u64,
    pub token: u64,
    pub remote_addr: u64,
    /// The bytes of a small write, read before the state lock.
    pub payload: Option<Vec<u8>>,
}

/// Items of a caller's write or read that share both regions, as one request: this end's segments
/// (the flow's extent here) and the peer's, in the same order with the same lengths.
pub(crate) struct VectorRequest {
    pub region: Arc<Region>,
    pub local: Extent,
    pub remote_region: u64,
    pub token: u64,
    pub segs: Vec<RemoteSeg>,
}

/// One request of a caller's write or read.
pub(crate) enum OneSidedRequest {
    Item(OneSidedItem),
    Vector(VectorRequest),
}

impl OneSidedRequest {
    /// The caller's registration the request reads from or writes into.
    pub fn local_region(&self) -> &Arc<Region> {
        match self {
            OneSidedRequest::Item(item) => &item.region,
            OneSidedRequest::Vector(vector) => &vector.region,
        }
    }
}
