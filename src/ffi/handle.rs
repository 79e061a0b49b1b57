//! Handles given to C are keys into a table, not addresses of Rust objects: a handle used after its
//! destroy call (or a pointer that was never a handle) is found missing and reported, never
//! dereferenced. Keys are never reused, so a stale handle cannot reach a newer object.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::error::{Error, Result};

pub struct HandleTable<T> {
    kind: &'static str,
    tag: usize,
    live: RwLock<BTreeMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> HandleTable<T> {
    /// `tag` (1..=15) keeps the handle kinds apart, so an engine passed as a connection is rejected.
    pub const fn new(kind: &'static str, tag: usize) -> HandleTable<T> {
        HandleTable { kind, tag, live: RwLock::new(BTreeMap::new()), next: AtomicU64::new(0) }
    }

    pub fn insert<C>(&self, value: Arc<T>) -> *mut C {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.live.write().insert(id, value);
        std::ptr::without_provenance_mut((id as usize) << 8 | self.tag << 4)
    }

    fn key<C>(&self, handle: *const C) -> Result<u64> {
        let raw = handle.addr();
        if raw == 0 {
            return Err(Error::invalid(format!("{} handle is NULL", self.kind)));
        }
        if raw & 0xff != self.tag << 4 {
            return Err(Error::invalid(format!("{raw:#x} is not a {} handle", self.kind)));
        }
        Ok((raw >> 8) as u64)
    }

    pub fn get<C>(&self, handle: *const C) -> Result<Arc<T>> {
        let key = self.key(handle)?;
        self.live.read().get(&key).cloned().ok_or_else(|| self.stale(handle.addr()))
    }

    pub fn remove<C>(&self, handle: *const C) -> Result<Arc<T>> {
        let key = self.key(handle)?;
        self.live.write().remove(&key).ok_or_else(|| self.stale(handle.addr()))
    }

    fn stale(&self, raw: usize) -> Error {
        Error::not_found(format!("{} handle {raw:#x} was destroyed or never created", self.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UcclStatus;

    #[test]
    fn stale_foreign_and_null_handles_are_errors() {
        let engines: HandleTable<u32> = HandleTable::new("engine", 1);
        let conns: HandleTable<u32> = HandleTable::new("connection", 2);
        let e = engines.insert::<u8>(Arc::new(5));
        assert_eq!(*engines.get(e).unwrap(), 5);
        assert_eq!(conns.get(e).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        assert_eq!(engines.get::<u8>(std::ptr::null()).unwrap_err().status(), UcclStatus::ErrInvalidParam);
        engines.remove(e).unwrap();
        assert_eq!(engines.get(e).unwrap_err().status(), UcclStatus::ErrNotFound);
        let e2 = engines.insert::<u8>(Arc::new(6));
        assert_ne!(e, e2, "keys are not reused");
    }
}
