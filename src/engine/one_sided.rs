//! A caller's one-sided requests as every path takes them: the connection state sends them to the
//! peer, the same-host paths copy them.

use std::sync::Arc;

use crate::engine::plan::Extent;
use crate::engine::region::Region;
use crate::proto::{Place, RemoteSeg, VectorRun};

/// `len` bytes at `local` in a run's region and at `remote` in the peer's, where the run's
/// capability grants them (the NIXL backend's form of a call: runs of these).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// A run of a call's pieces, every one checked: inside `region` and inside `granted`, the peer's
/// range that its capability names (region and token as this connection's requests carry them).
pub(crate) struct CheckedPieces<'a> {
    pub region: Arc<Region>,
    pub remote_region: u64,
    pub token: u64,
    pub remote_place: Place,
    pub granted: RemoteSeg,
    pub pieces: &'a [Piece],
    /// The pieces' bytes.
    pub bytes: u64,
}

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
/// (the flow's extent here) and the peer's, in the same order with the same lengths. With `runs`,
/// the items of several pairs of regions in one request (`WriteRuns` / `ReadRuns`, one flow): the
/// fields above it then describe its first run, which is all a path that copies per region (the
/// same-host ones, which never get such a request) could authorize.
pub(crate) struct VectorRequest {
    pub region: Arc<Region>,
    pub local: Extent,
    pub remote_region: u64,
    pub token: u64,
    pub segs: Vec<RemoteSeg>,
    pub runs: Option<Box<VectorRuns>>,
}

/// The runs of a vector over several regions, in order: this end's region of each (`local`), and
/// the peer's region, token and segment count of each (`remote`).
pub(crate) struct VectorRuns {
    pub local: Arc<[Arc<Region>]>,
    pub remote: Vec<VectorRun>,
}

/// The registrations a flow's memory lies in: one region, or one per run of its segments.
#[derive(Clone, Debug)]
pub(crate) enum Regions {
    One(Arc<Region>),
    Runs(Arc<[Arc<Region>]>),
}

impl Regions {
    /// The region of the flow's first run: all of a flow in one region.
    pub fn first(&self) -> &Arc<Region> {
        match self {
            Regions::One(r) => r,
            Regions::Runs(runs) => &runs[0],
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Region>> {
        let (one, runs) = match self {
            Regions::One(r) => (Some(r), None),
            Regions::Runs(runs) => (None, Some(runs.iter())),
        };
        one.into_iter().chain(runs.into_iter().flatten())
    }

    /// Whether region `id` holds any of the flow's memory.
    pub fn has(&self, id: u64) -> bool {
        self.iter().any(|r| r.id == id)
    }
}

impl From<Arc<Region>> for Regions {
    fn from(region: Arc<Region>) -> Regions {
        Regions::One(region)
    }
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
