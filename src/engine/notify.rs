//! The process-wide notification queue: like UCCL, `get_notifs` drains what every engine and
//! connection of the process received. Messages are kept whole (the wire bounds each at 64 MiB);
//! the fixed-size C form truncates when it copies out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Name bytes kept per entry: UCCL's MSG_SIZE less the NUL (the wire already bounds names so).
const MAX_NAME: usize = 255;
/// Entries kept before the oldest are dropped (with an error log).
const MAX_QUEUED: usize = 65_536;
/// Name and message bytes kept before the oldest entries are dropped: 16 messages of the largest
/// size the wire carries, so a peer notifying faster than the application drains cannot exhaust
/// memory, while any single message fits.
const MAX_QUEUED_BYTES: usize = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The engine whose connection received it (`next_engine_key`), so that one engine's
    /// notifications can be drained apart from another's in the same process.
    pub engine: u64,
    /// At most 255 bytes, no NUL.
    pub name: Vec<u8>,
    /// The whole message.
    pub msg: Vec<u8>,
}

impl Notification {
    fn bytes(&self) -> usize {
        self.name.len() + self.msg.len()
    }
}

/// A bounded FIFO of notifications: at most `max_entries` entries and `max_bytes` name and message
/// bytes, the oldest dropped first to make room.
#[derive(Debug)]
struct Queue {
    entries: VecDeque<Notification>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl Queue {
    const fn new(max_entries: usize, max_bytes: usize) -> Self {
        Queue { entries: VecDeque::new(), bytes: 0, max_entries, max_bytes }
    }

    /// Appends `entry`, first dropping as many of the oldest as needed; returns how many were dropped.
    /// An entry larger than the whole byte bound is kept alone.
    fn push(&mut self, entry: Notification) -> usize {
        let mut dropped = 0;
        while !self.entries.is_empty()
            && (self.entries.len() >= self.max_entries || self.bytes + entry.bytes() > self.max_bytes)
        {
            self.pop();
            dropped += 1;
        }
        self.bytes += entry.bytes();
        self.entries.push_back(entry);
        dropped
    }

    fn pop(&mut self) -> Option<Notification> {
        let entry = self.entries.pop_front()?;
        self.bytes -= entry.bytes();
        Some(entry)
    }

    fn drain(&mut self, max: usize) -> Vec<Notification> {
        let n = max.min(self.entries.len());
        let out: Vec<Notification> = self.entries.drain(..n).collect();
        self.bytes -= out.iter().map(Notification::bytes).sum::<usize>();
        out
    }

    /// Up to `max` of the oldest entries of `engine`, the others left in their order.
    fn drain_engine(&mut self, engine: u64, max: usize) -> Vec<Notification> {
        if max == 0 || !self.entries.iter().any(|e| e.engine == engine) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for entry in self.entries.drain(..) {
            if entry.engine == engine && out.len() < max {
                out.push(entry);
            } else {
                kept.push_back(entry);
            }
        }
        self.entries = kept;
        self.bytes -= out.iter().map(Notification::bytes).sum::<usize>();
        out
    }

    /// Puts drained entries back at the front, in their order, ahead of anything queued since. The
    /// bounds are not applied: these were already counted once.
    fn requeue_front(&mut self, entries: Vec<Notification>) {
        for entry in entries.into_iter().rev() {
            self.bytes += entry.bytes();
            self.entries.push_front(entry);
        }
    }
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue::new(MAX_QUEUED, MAX_QUEUED_BYTES));

static NEXT_ENGINE_KEY: AtomicU64 = AtomicU64::new(1);

/// A key for a new engine's notifications; never reused, so a destroyed engine's leftovers cannot
/// reach a later one.
pub fn next_engine_key() -> u64 {
    NEXT_ENGINE_KEY.fetch_add(1, Ordering::Relaxed)
}

pub fn push(engine: u64, name: &[u8], msg: &[u8]) {
    let entry = Notification { engine, name: name[..name.len().min(MAX_NAME)].to_vec(), msg: msg.to_vec() };
    let dropped = QUEUE.lock().push(entry);
    if dropped > 0 {
        log::error!(
            "notification queue full ({MAX_QUEUED} entries or {} MiB): dropped the {dropped} oldest; call get_notifs more often",
            MAX_QUEUED_BYTES >> 20
        );
    }
}

/// Removes and returns up to `max` of the oldest notifications.
pub fn drain(max: usize) -> Vec<Notification> {
    QUEUE.lock().drain(max)
}

/// Removes and returns up to `max` of the oldest notifications the connections of `engine` received.
pub fn drain_engine(engine: u64, max: usize) -> Vec<Notification> {
    QUEUE.lock().drain_engine(engine, max)
}

/// Returns drained notifications that could not be handed out to the front of the queue, oldest
/// first, so the next drain sees them again in order.
pub fn requeue_front(entries: Vec<Notification>) {
    if !entries.is_empty() {
        QUEUE.lock().requeue_front(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str, len: usize) -> Notification {
        Notification { engine: 1, name: name.as_bytes().to_vec(), msg: vec![7; len] }
    }

    fn names(q: &mut Queue) -> Vec<String> {
        q.drain(usize::MAX).into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect()
    }

    #[test]
    fn keeps_whole_messages_in_order() {
        let mut q = Queue::new(8, 1 << 20);
        assert_eq!(q.push(n("a", 1000)), 0);
        assert_eq!(q.push(n("b", 0)), 0);
        let got = q.drain(1);
        assert_eq!(got, vec![n("a", 1000)]);
        assert_eq!(q.bytes, 1);
        assert_eq!(names(&mut q), ["b"]);
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn an_engines_drain_takes_its_own_and_keeps_the_rest_in_order() {
        let mut q = Queue::new(8, 1 << 20);
        let of = |engine, name: &str, len| Notification { engine, ..n(name, len) };
        for (engine, name) in [(1, "a1"), (2, "b1"), (1, "a2"), (2, "b2"), (1, "a3")] {
            q.push(of(engine, name, 10));
        }
        let names =
            |v: Vec<Notification>| v.into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect::<Vec<_>>();
        assert_eq!(names(q.drain_engine(1, 2)), ["a1", "a2"]);
        assert_eq!(q.bytes, 3 * 12);
        assert!(q.drain_engine(3, 8).is_empty(), "an engine with nothing queued");
        assert!(q.drain_engine(2, 0).is_empty());
        assert_eq!(names(q.drain(8)), ["b1", "b2", "a3"]);
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn drops_oldest_beyond_either_bound() {
        let mut q = Queue::new(3, 100);
        for name in ["a", "b", "c"] {
            assert_eq!(q.push(n(name, 9)), 0);
        }
        assert_eq!(q.push(n("d", 9)), 1, "the entry bound");
        assert_eq!(q.push(n("e", 89)), 2, "the byte bound: 30 + 90 > 100 until two are gone");
        assert_eq!(q.bytes, 100);
        assert_eq!(names(&mut q), ["d", "e"]);
        // A message larger than the whole bound is still delivered, alone.
        q.push(n("f", 10));
        assert_eq!(q.push(n("g", 500)), 1);
        assert_eq!(names(&mut q), ["g"]);
    }

    #[test]
    fn requeued_entries_come_back_first_in_order() {
        let mut q = Queue::new(8, 1 << 20);
        for name in ["a", "b", "c"] {
            q.push(n(name, 10));
        }
        let taken = q.drain(2);
        q.push(n("d", 10));
        q.requeue_front(taken);
        assert_eq!(q.bytes, 44);
        assert_eq!(names(&mut q), ["a", "b", "c", "d"]);
    }
}
