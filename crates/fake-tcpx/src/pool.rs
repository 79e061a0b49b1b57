//! The pages of a receive comm's bounce pool. Free pages form a stack: pages given back by
//! `irecvConsumed` are the first handed to the next receive, so a consumer that reads a receive's
//! pages after consuming it reads someone else's bytes, as it would on the NIC.

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
}
