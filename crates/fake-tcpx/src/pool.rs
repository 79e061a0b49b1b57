//! The bounce pool of a GPU, shared by every receive comm of the process bound to that GPU, as TCPX
//! imports one RxDM pool per GPU (`gpu/cuda_wrapper.cu` `gpu_get_rxmem`, cached in the GPU's
//! `gpuDev`) and every comm's flows land in it. A receive takes its pages when its header arrives
//! and holds them until `irecvConsumed`; a receive that finds too few free waits without error, so
//! a consumer that never consumes starves every other comm of the GPU, as the NIC's page pool does.
//!
//! Free pages form a stack: pages given back by `irecvConsumed` are the first handed to the next
//! receive, so a consumer that reads a receive's pages after consuming it reads someone else's
//! bytes, as it would on the NIC.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::fail::Result;
use crate::fragment::{PAGE, Rng};

pub struct PagePool {
    free: Vec<u32>,
    total: usize,
}

impl PagePool {
    pub fn new(bytes: usize, rng: &mut Rng) -> PagePool {
        let total = bytes / PAGE;
        let mut free: Vec<u32> = (0..total as u32).collect();
        rng.shuffle(&mut free);
        PagePool { free, total }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// `n` pages in shuffled order, or `None` while fewer are free.
    pub fn take(&mut self, n: usize, rng: &mut Rng) -> Option<Vec<u32>> {
        if self.free.len() < n {
            return None;
        }
        let mut pages = self.free.split_off(self.free.len() - n);
        rng.shuffle(&mut pages);
        Some(pages)
    }

    pub fn give_back(&mut self, pages: Vec<u32>) {
        self.free.extend(pages);
    }
}

/// Which pool a receive comm draws from: its GPU's (GPU mode, by device ordinal), or the one pool
/// host mode stands in for device memory with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKey {
    Host,
    Gpu(i32),
}

/// A pool's pages and the memory they live in.
pub struct SharedPool {
    /// Address of page 0: host memory, or a device address of the GPU's primary context.
    base: usize,
    bytes: usize,
    total: usize,
    pages: Mutex<PagePool>,
    /// Owns the memory at `base` (never dropped while a comm holds the pool).
    _memory: Box<dyn Any + Send + Sync>,
}

impl SharedPool {
    pub fn base(&self) -> usize {
        self.base
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// `n` pages, or `None` while fewer are free.
    pub fn take(&self, n: usize, rng: &mut Rng) -> Option<Vec<u32>> {
        self.lock().take(n, rng)
    }

    pub fn give_back(&self, pages: Vec<u32>) {
        if !pages.is_empty() {
            self.lock().give_back(pages);
        }
    }

    /// Pages not held by any receive.
    #[cfg(test)]
    pub fn free(&self) -> usize {
        self.lock().free.len()
    }

    fn lock(&self) -> MutexGuard<'_, PagePool> {
        // A free list is valid after any panic in between its own calls.
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every pool of the process, made by the first receive comm of its GPU and kept for the life of
/// the process, as TCPX keeps its imported pool.
static POOLS: LazyLock<Mutex<HashMap<PoolKey, Arc<SharedPool>>>> = LazyLock::new(Default::default);

/// The pool of `key`; the first call for a key allocates it with `alloc`, which returns the base
/// address of `bytes` bytes and the value that owns them.
pub fn of(
    key: PoolKey,
    bytes: usize,
    seed: u64,
    alloc: impl FnOnce() -> Result<(usize, Box<dyn Any + Send + Sync>)>,
) -> Result<Arc<SharedPool>> {
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = pools.get(&key) {
        return Ok(pool.clone());
    }
    let (base, memory) = alloc()?;
    let pages = PagePool::new(bytes, &mut Rng::new(seed));
    let pool = Arc::new(SharedPool { base, bytes, total: pages.total(), pages: Mutex::new(pages), _memory: memory });
    pools.insert(key, pool.clone());
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycles_last_freed_pages_first() {
        let mut rng = Rng::new(3);
        let mut pool = PagePool::new(16 * PAGE, &mut rng);
        let a = pool.take(10, &mut rng).unwrap();
        assert!(pool.take(7, &mut rng).is_none());
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10);
        pool.give_back(a.clone());
        let mut b = pool.take(10, &mut rng).unwrap();
        b.sort();
        assert_eq!(b, sorted);
    }

    #[test]
    fn one_pool_per_key() {
        let block = |n: usize| move || Ok((n, Box::new(()) as Box<dyn Any + Send + Sync>));
        let a = of(PoolKey::Gpu(1000), 8 * PAGE, 1, block(0x1000)).unwrap();
        let b = of(PoolKey::Gpu(1000), 8 * PAGE, 1, || panic!("the pool exists")).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = of(PoolKey::Gpu(1001), 4 * PAGE, 1, block(0x9000)).unwrap();
        assert_eq!((c.base(), c.total()), (0x9000, 4));
        let mut rng = Rng::new(5);
        let held = a.take(6, &mut rng).unwrap();
        assert!(b.take(3, &mut rng).is_none(), "pages held through one handle are gone for all");
        assert_eq!(c.free(), 4, "another GPU's pool is untouched");
        a.give_back(held);
        assert_eq!(b.free(), 8);
    }
}
