//! Live TCPXO request pointers, each mapped to its comm and sequence number while its request
//! lives: `ledger.rs` records and forgets them, the registry looks a pointer up. Apart from the
//! registry so that the comms that record them need not import it (the registry holds the comms).
//! Its lock is taken alone, never with the registry's.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};

static POINTERS: LazyLock<Mutex<HashMap<usize, (usize, u64)>>> = LazyLock::new(Default::default);

fn pointers() -> MutexGuard<'static, HashMap<usize, (usize, u64)>> {
    POINTERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a live request pointer of comm `key`.
pub fn add(ptr: usize, key: usize, seq: u64) {
    pointers().insert(ptr, (key, seq));
}

/// Forgets a request pointer (its request was reported done).
pub fn remove(ptr: usize) {
    pointers().remove(&ptr);
}

/// The comm and sequence number of a live request pointer.
pub fn get(ptr: usize) -> Option<(usize, u64)> {
    pointers().get(&ptr).copied()
}

/// Forgets every request pointer of comm `key` (it was closed).
pub fn forget_comm(key: usize) {
    pointers().retain(|_, (k, _)| *k != key);
}
