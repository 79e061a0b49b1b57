//! Where a connection's peer runs, as far as the engine can prove it, and the key of a connection
//! between engines of one process. The route, the connection and the crate's API read these as
//! well as the same-host wing (`same_host/`, which proves them), so they sit beside the wing rather
//! than inside it: nothing here imports from the engine.

use crate::proto::HostIdentity;

/// Where a connection's peer runs, as far as the engine can prove it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locality {
    /// Another host or network namespace, or a peer (or this engine) that announces no identity.
    #[default]
    Remote,
    /// Another process of this host and network namespace.
    SameHost,
    /// An engine of this process.
    SameProcess,
}

impl Locality {
    pub fn is_local(self) -> bool {
        self != Locality::Remote
    }

    /// What the identities alone say, before the in-process proof.
    pub(crate) fn from_identities(ours: &HostIdentity, theirs: &HostIdentity) -> Locality {
        if ours.same_host(theirs) { Locality::SameHost } else { Locality::Remote }
    }
}

/// A connection's key in the in-process table: the Hello nonce both ends share, and which end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLink {
    pub locality: Locality,
    pub nonce: u64,
    pub connector: bool,
}

impl LocalLink {
    pub fn remote() -> LocalLink {
        LocalLink { locality: Locality::Remote, nonce: 0, connector: false }
    }
}
