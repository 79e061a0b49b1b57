//! The process-wide notification queue: like UCCL, `get_notifs` drains what every engine and
//! connection of the process received.

use std::collections::VecDeque;

use parking_lot::Mutex;

/// Bytes of name and message kept per entry (UCCL's MSG_SIZE).
pub(crate) const NOTIFY_FIELD_SIZE: usize = 256;
/// Entries kept before the oldest are dropped (with an error log); 32 MiB of fixed-size entries.
const MAX_QUEUED: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// At most 255 bytes, no NUL.
    pub name: Vec<u8>,
    /// Truncated to 256 bytes.
    pub msg: Vec<u8>,
}

static QUEUE: Mutex<VecDeque<Notification>> = Mutex::new(VecDeque::new());

pub fn push(name: &[u8], msg: &[u8]) {
    let entry = Notification {
        name: name[..name.len().min(NOTIFY_FIELD_SIZE - 1)].to_vec(),
        msg: msg[..msg.len().min(NOTIFY_FIELD_SIZE)].to_vec(),
    };
    let mut q = QUEUE.lock();
    if q.len() >= MAX_QUEUED {
        q.pop_front();
        log::error!("notification queue full ({MAX_QUEUED} entries): dropped the oldest; call get_notifs more often");
    }
    q.push_back(entry);
}

pub fn drain(max: usize) -> Vec<Notification> {
    let mut q = QUEUE.lock();
    let n = max.min(q.len());
    q.drain(..n).collect()
}
