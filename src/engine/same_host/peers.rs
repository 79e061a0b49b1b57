//! One [`PeerProcess`] per peer process, shared by every connection of this process to it: one
//! pidfd, dropped with the last connection that holds it.
//!
//! Keyed by pid, and a recycled pid never aliases: a proof pins its process with a pidfd of its
//! own (`proof.rs`) before it looks here, and shares the entry only when both pidfds name live
//! processes at once. Two live processes never hold one pid, and the entry's process held it from
//! before that pin until now, so both name one process; a dead entry is replaced.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::process::PeerProcess;

static PEERS: Mutex<BTreeMap<u32, Weak<PeerProcess>>> = Mutex::new(BTreeMap::new());

/// The shared handle of the process `fresh` pins: the one other connections hold if it is the
/// same process, else `fresh`, kept for the next.
pub fn shared(fresh: PeerProcess) -> Arc<PeerProcess> {
    let mut peers = PEERS.lock();
    // Entries whose connections all closed (their handles are gone already) go with any change.
    peers.retain(|_, known| known.strong_count() > 0);
    let pid = fresh.pid();
    if let Some(known) = peers.get(&pid).and_then(Weak::upgrade)
        && known.alive().is_ok()
    {
        // A fresh pin that died since its proof may have named another process than the entry:
        // it is handed back on its own, and every use of it fails on its own check that the
        // process lives; the entry stays for the live one.
        return if fresh.alive().is_ok() { known } else { Arc::new(fresh) };
    }
    let fresh = Arc::new(fresh);
    peers.insert(pid, Arc::downgrade(&fresh));
    fresh
}

/// How many handles of the shared entry of process `pid` are held (0: none, or no entry).
#[cfg(test)]
fn holders(pid: u32) -> usize {
    PEERS.lock().get(&pid).map_or(0, Weak::strong_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep").arg("30").spawn().unwrap()
    }

    #[test]
    fn one_handle_per_live_process_until_its_last_holder_lets_go() {
        let (mut one, mut other) = (sleeper(), sleeper());
        let first = shared(PeerProcess::open(one.id()).unwrap());
        let second = shared(PeerProcess::open(one.id()).unwrap());
        assert!(Arc::ptr_eq(&first, &second), "two connections to one process share its handle");
        assert_eq!(holders(one.id()), 2);
        let elsewhere = shared(PeerProcess::open(other.id()).unwrap());
        assert!(!Arc::ptr_eq(&first, &elsewhere), "another process has its own");
        assert_eq!((holders(one.id()), holders(other.id())), (2, 1));
        drop(first);
        assert_eq!(holders(one.id()), 1);
        drop(second);
        assert_eq!(holders(one.id()), 0, "dropped with its last holder");
        let more = shared(PeerProcess::open(other.id()).unwrap());
        assert!(Arc::ptr_eq(&more, &elsewhere));
        assert!(!PEERS.lock().contains_key(&one.id()), "the spent entry went with the next change");
        let again = shared(PeerProcess::open(one.id()).unwrap());
        assert_eq!(holders(one.id()), 1, "a later connection pins it afresh");

        // A process that exited is never handed out again, not even to a pin of its pid.
        one.kill().unwrap();
        one.wait().unwrap();
        assert!(again.alive().is_err());
        let stale = PeerProcess::open(other.id()).unwrap();
        PEERS.lock().insert(other.id(), Arc::downgrade(&again));
        let replaced = shared(stale);
        assert!(!Arc::ptr_eq(&replaced, &again), "the dead entry under that pid is replaced");
        assert_eq!(replaced.pid(), other.id());
        drop((again, elsewhere, more, replaced));
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
