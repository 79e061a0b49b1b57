//! Every object handed to the caller (listen comms, send and receive comms, connects in progress),
//! keyed by the address the caller holds. Each incoming pointer is looked up here first, so a stale,
//! foreign or wrong-kind pointer is an error rather than a crash. Request pointers are mapped to
//! their comm through the address range of the comm's request ring (TCPX), or one by one while
//! the request lives (TCPXO, `pointers.rs`).
//!
//! The registry lock is held only to clone an `Arc` or update a map; it is never held while a comm
//! is locked (a comm may take it, to record or forget a request pointer).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::connect::Connecting;
use crate::fail::{Fail, Result};
use crate::linear::LinearRecv;
use crate::listen::FakeListen;
use crate::pointers;
use crate::recv::FakeRecv;
use crate::request::{RequestEntry, Ring};
use crate::send::FakeSend;

#[derive(Clone)]
pub enum Object {
    Listen(Arc<Mutex<FakeListen>>),
    Send(Arc<Mutex<FakeSend>>),
    Recv(Arc<Mutex<FakeRecv>>),
    /// TCPXO's receive comm.
    Linear(Arc<Mutex<LinearRecv>>),
}

#[derive(Default)]
struct Registry {
    objects: HashMap<usize, Object>,
    /// Ring base address -> comm key.
    rings: BTreeMap<usize, usize>,
    connects: HashMap<usize, Arc<Connecting>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks a comm; a comm whose lock was poisoned by a panic is reported, not used.
pub fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| Fail::internal("comm is unusable after an earlier internal failure"))
}

pub fn add(key: usize, object: Object, ring_base: Option<usize>) {
    let mut r = registry();
    r.objects.insert(key, object);
    if let Some(base) = ring_base {
        r.rings.insert(base, key);
    }
}

pub fn get(key: usize) -> Option<Object> {
    registry().objects.get(&key).cloned()
}

/// Removes the object if `wanted` accepts its kind; the object is returned either way.
pub fn remove_if(key: usize, wanted: impl Fn(&Object) -> bool) -> Option<(Object, bool)> {
    let mut r = registry();
    let object = r.objects.get(&key)?.clone();
    if !wanted(&object) {
        return Some((object, false));
    }
    r.objects.remove(&key);
    r.rings.retain(|_, k| *k != key);
    drop(r);
    pointers::forget_comm(key);
    Some((object, true))
}

/// The comm a request pointer belongs to and its entry index (TCPX) or sequence number (TCPXO).
pub fn request(ptr: usize) -> Option<(usize, Object, usize)> {
    if let Some((key, seq)) = pointers::get(ptr) {
        return Some((key, registry().objects.get(&key)?.clone(), seq as usize));
    }
    let r = registry();
    let (&base, &key) = r.rings.range(..=ptr).next_back()?;
    let off = ptr - base;
    let entry = size_of::<RequestEntry>();
    if off >= Ring::span() || !off.is_multiple_of(entry) {
        return None;
    }
    Some((key, r.objects.get(&key)?.clone(), off / entry))
}

pub fn add_connect(c: Arc<Connecting>) -> usize {
    let key = Arc::as_ptr(&c) as usize;
    registry().connects.insert(key, c);
    key
}

pub fn get_connect(key: usize) -> Option<Arc<Connecting>> {
    registry().connects.get(&key).cloned()
}

pub fn remove_connect(key: usize) {
    registry().connects.remove(&key);
}
