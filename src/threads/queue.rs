//! Work served in turn by one thread that lives only while there is any: the process's background
//! jobs (collapsing regions into huge pages, locking staging slots ahead of their first copy) each
//! keep one of these under a lock and start a worker when [`WorkQueue::push`] says none serves it.

use std::collections::VecDeque;

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

#[cfg(test)]
mod tests {
    use super::WorkQueue;

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
