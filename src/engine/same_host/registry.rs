//! The process-wide tables behind the in-process proof and the peer lookup (see `mod.rs`).

use std::any::Any;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::{LocalLink, Locality};
use crate::proto::HostIdentity;

/// Hello nonces of connects in flight in this process, and whether an acceptor of this process
/// took the Hello.
static PENDING: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);

/// In-process connections by (nonce, connector end), so each end finds the other. Kept as `Any`:
/// this file names no connection, its callers say which type they look for.
type ConnTable = HashMap<(u64, bool), Weak<dyn Any + Send + Sync>>;
static CONNS: Mutex<Option<ConnTable>> = Mutex::new(None);

/// A connect's Hello nonce, recorded until the handshake ends.
pub(crate) struct PendingHello {
    nonce: u64,
    /// False when the nonce was taken already (a 64-bit random collision): the connect is then
    /// never proven in-process.
    owned: bool,
}

impl PendingHello {
    pub fn register(nonce: u64) -> PendingHello {
        let mut pending = PENDING.lock();
        let owned = match pending.get_or_insert_with(HashMap::new).entry(nonce) {
            Entry::Vacant(v) => {
                v.insert(false);
                true
            }
            Entry::Occupied(_) => false,
        };
        PendingHello { nonce, owned }
    }

    /// The peer's locality once its Welcome arrived.
    pub fn locality(&self, ours: &HostIdentity, theirs: &HostIdentity) -> Locality {
        let by_identity = Locality::from_identities(ours, theirs);
        let marked = self.owned && PENDING.lock().as_ref().and_then(|p| p.get(&self.nonce).copied()) == Some(true);
        if by_identity == Locality::SameHost && theirs.pid == ours.pid && marked {
            Locality::SameProcess
        } else {
            by_identity
        }
    }
}

impl Drop for PendingHello {
    fn drop(&mut self) {
        if self.owned
            && let Some(p) = PENDING.lock().as_mut()
        {
            p.remove(&self.nonce);
        }
    }
}

/// The acceptor's view of a Hello: in-process only when this process sent it (and no other
/// acceptor took it already).
pub(crate) fn accepted_locality(ours: &HostIdentity, theirs: &HostIdentity, nonce: u64) -> Locality {
    let by_identity = Locality::from_identities(ours, theirs);
    if by_identity != Locality::SameHost || theirs.pid != ours.pid {
        return by_identity;
    }
    match PENDING.lock().as_mut().and_then(|p| p.get_mut(&nonce)) {
        Some(mark) if !*mark => {
            *mark = true;
            Locality::SameProcess
        }
        _ => by_identity,
    }
}

/// Makes an in-process connection findable by its peer; a slot already held by a live
/// connection stays with it (that peer then simply finds no partner and takes the network path).
pub(crate) fn register_connection<C: Send + Sync + 'static>(link: &LocalLink, conn: &Arc<C>) {
    if link.locality != Locality::SameProcess {
        return;
    }
    let mut conns = CONNS.lock();
    let conns = conns.get_or_insert_with(HashMap::new);
    conns.retain(|_, c| c.strong_count() > 0);
    conns.entry((link.nonce, link.connector)).or_insert_with(|| Arc::downgrade(conn) as Weak<dyn Any + Send + Sync>);
}

/// The other end of an in-process connection, while it lives.
pub(crate) fn peer_connection<C: Send + Sync + 'static>(link: &LocalLink) -> Option<Arc<C>> {
    if link.locality != Locality::SameProcess {
        return None;
    }
    let peer = CONNS.lock().as_ref()?.get(&(link.nonce, !link.connector))?.upgrade()?;
    peer.downcast::<C>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pid: u32) -> HostIdentity {
        HostIdentity { boot_id: [9; 16], netns: 3, pid }
    }

    #[test]
    fn in_process_needs_this_process_to_have_sent_the_hello() {
        let me = id(std::process::id());
        // A peer claiming our pid with a nonce nobody here sent stays a same-host peer.
        assert_eq!(accepted_locality(&me, &me, 0x1111_2222_3333_4444), Locality::SameHost);
        let pending = PendingHello::register(0x5555_6666_7777_8888);
        assert_eq!(pending.locality(&me, &me), Locality::SameHost, "no acceptor marked it yet");
        assert_eq!(accepted_locality(&me, &me, 0x5555_6666_7777_8888), Locality::SameProcess);
        // One acceptor per Hello: a replay of the nonce is not in-process.
        assert_eq!(accepted_locality(&me, &me, 0x5555_6666_7777_8888), Locality::SameHost);
        assert_eq!(pending.locality(&me, &me), Locality::SameProcess);
        assert_eq!(pending.locality(&me, &id(me.pid + 1)), Locality::SameHost);
        assert_eq!(pending.locality(&me, &HostIdentity { netns: 4, ..me }), Locality::Remote);
        drop(pending);
        assert_eq!(accepted_locality(&me, &me, 0x5555_6666_7777_8888), Locality::SameHost);
    }

    #[test]
    fn unknown_identities_are_remote() {
        let me = id(std::process::id());
        assert_eq!(accepted_locality(&me, &HostIdentity::default(), 1), Locality::Remote);
        assert_eq!(accepted_locality(&HostIdentity::default(), &me, 1), Locality::Remote);
    }
}
