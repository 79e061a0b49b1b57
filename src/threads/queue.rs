//! Work served in turn by one thread that lives only while there is any: the process's background
//! jobs (collapsing regions into huge pages, locking staging slots ahead of their first copy) each
//! keep one of these under a lock and start a worker when [`WorkQueue::push`] says none serves it.
//! A worker that chooses what to serve ([`WorkQueue::find`]) may also end with work left for
//! later, and [`WorkQueue::wake`] starts the next one.

use std::collections::VecDeque;

use parking_lot::Mutex;

/// What a choosing worker makes of a waiting item ([`WorkQueue::find`]).
pub(crate) enum Look<R> {
    /// Serve this now (the item stays queued).
    Take(R),
    /// Not now.
    Skip,
    /// Nothing left to do for it: it leaves the queue.
    Spent,
}

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

    /// For a worker that chooses what to serve: the first waiting item `look` takes something
    /// from, left waiting; items `look` finds spent leave the queue, those it skips stay.
    pub fn find<R>(&mut self, mut look: impl FnMut(&T) -> Look<R>) -> Option<R> {
        let mut found = None;
        self.waiting.retain(|item| {
            if found.is_some() {
                return true;
            }
            match look(item) {
                Look::Take(r) => {
                    found = Some(r);
                    true
                }
                Look::Skip => true,
                Look::Spent => false,
            }
        });
        found
    }

    /// The worker ends with nothing to do now; what waits stays for the next one, which
    /// [`wake`](Self::wake) or a push starts.
    pub fn stop(&mut self) {
        self.worker = false;
    }

    /// Whether a worker must be started because what waits may have become doable: something
    /// waits and none serves the queue.
    pub fn wake(&mut self) -> bool {
        !self.waiting.is_empty() && !std::mem::replace(&mut self.worker, true)
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

    use super::{Look, WorkQueue, serve};

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

    /// A choosing worker takes the first item it can serve, leaves the others waiting, drops the
    /// spent ones; once it stops, only a wake with items waiting starts another.
    #[test]
    fn a_choosing_worker_keeps_what_it_skips_and_drops_what_is_spent() {
        let mut q = WorkQueue::new();
        assert!(q.push(1));
        for i in 2..=5 {
            assert!(!q.push(i));
        }
        let look = |odd: bool| {
            move |&i: &i32| match i {
                1 => Look::Spent,
                i if (i % 2 == 1) == odd => Look::Take(i * 10),
                _ => Look::Skip,
            }
        };
        assert_eq!(q.find(look(true)), Some(30), "1 is spent, 2 skipped, 3 taken");
        assert_eq!(q.find(look(false)), Some(20));
        assert_eq!(q.waiting, [2, 3, 4, 5], "taken and skipped items stay, in order");
        q.stop();
        assert!(q.wake(), "items wait and no worker serves them");
        assert!(!q.wake(), "one worker at a time");
        assert_eq!(q.abandon(), 4);
        assert!(!q.wake(), "nothing waits");
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
