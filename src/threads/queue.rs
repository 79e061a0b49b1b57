//! Work served in turn by one thread that lives only while there is any: the process's background
//! jobs (collapsing regions into huge pages, locking staging slots ahead of their first copy) each
//! keep one of these under a lock and start a worker when [`WorkQueue::push`] says none serves it.

use std::collections::VecDeque;

use parking_lot::Mutex;

pub(crate) struct WorkQueue<T> {
    waiting: VecDeque<T>,
    worker: bool,
}

impl<T> WorkQueue<T> {
    pub const fn new() -> WorkQueue<T> {
        WorkQueue { waiting: VecDeque::new(), worker: false }
    }

    /// Queues `item`; whether a worker must be started for it (none serves the queue yet).
    pub fn push(&mut self, item: T) -> bool {
        self.waiting.push_back(item);
        !std::mem::replace(&mut self.worker, true)
    }

    /// The next item for the worker, or `None` when the queue is empty, after which the worker
    /// must end: the next push starts another.
    pub fn pop(&mut self) -> Option<T> {
        let next = self.waiting.pop_front();
        if next.is_none() {
            self.worker = false;
        }
        next
    }

    /// Forgets every waiting item and the worker (it died, or could not be started); how many
    /// were waiting.
    pub fn abandon(&mut self) -> usize {
        self.worker = false;
        let n = self.waiting.len();
        self.waiting.clear();
        n
    }
}

/// The worker's loop: `work` on each item of `queue` in turn until it is empty. The queue's lock is
/// held only to take the next item, never during `work`: a `while let` over `queue.lock().pop()`
/// would hold it through the body, and every push meanwhile (a registration, a ring being made)
/// would wait for the work (the slot locker's 8 slots: 7-8 ms).
pub fn serve<T>(queue: &Mutex<WorkQueue<T>>, mut work: impl FnMut(T)) {
    loop {
        let next = queue.lock().pop();
        let Some(item) = next else { return };
        work(item);
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::{WorkQueue, serve};

    /// The worker takes every item in order and ends on the empty queue, and the queue is free
    /// while it works: an item pushed during the work is served by the same worker.
    #[test]
    fn the_worker_holds_the_queue_only_to_take_an_item() {
        let queue = Mutex::new(WorkQueue::new());
        assert!(queue.lock().push(1));
        let mut seen = Vec::new();
        serve(&queue, |item| {
            let mut q = queue.try_lock().expect("the queue is locked during the work");
            if item == 1 {
                assert!(!q.push(2), "the running worker serves it");
            }
            drop(q);
            seen.push(item);
        });
        assert_eq!(seen, [1, 2]);
        assert!(queue.lock().push(3), "the worker ended: the next item starts another");
    }

    #[test]
    fn one_worker_serves_the_queue_until_it_runs_dry() {
        let mut q = WorkQueue::new();
        assert!(q.push(1), "the first item starts a worker");
        assert!(!q.push(2), "a second one is served by the same worker");
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(1), Some(2), None));
        assert!(q.push(3), "the worker ended on the empty queue: the next item starts another");
        assert!(!q.push(4));
        assert_eq!(q.abandon(), 2);
        assert!(q.push(5), "an abandoned queue has no worker");
    }
}
