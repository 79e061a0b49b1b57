//! How far a staging slot's copy in parts got: a chunk copied into its slot in parts
//! (`UCCL_TCPX_STAGING_PIPELINE`) records an event after each part, so its owner can send the
//! first parts while the later ones still copy. Copies on one stream finish in order, so the
//! events are polled oldest first and the bytes seen copied are the end of the last one that
//! fired. Events come from a pool the ring keeps, grown to the most parts ever in flight at once
//! (a chunk's parts with one copy queued per comm) and reused.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Gpu;
use super::stream::{Event, Stream};
use crate::error::Result;

pub(super) struct PartMarks {
    /// Events no part uses now.
    spare: Vec<Event>,
    /// Per slot: parts recorded and not yet seen finished, oldest first, with the slot offset
    /// each ends at.
    pending: Vec<VecDeque<(Event, usize)>>,
    /// Per slot: leading bytes seen copied.
    seen: Vec<usize>,
}

impl PartMarks {
    pub fn new(slots: usize) -> PartMarks {
        PartMarks { spare: Vec::new(), pending: (0..slots).map(|_| VecDeque::new()).collect(), seen: vec![0; slots] }
    }

    /// A new copy in parts into `slot` begins: what an earlier one there left is forgotten.
    pub fn start(&mut self, slot: usize) {
        self.spare.extend(self.pending[slot].drain(..).map(|(event, _)| event));
        self.seen[slot] = 0;
    }

    /// Marks the end of a part that ends at slot offset `end`, queued on `stream` (its GPU bound).
    pub fn record(&mut self, gpu: &Arc<Gpu>, slot: usize, stream: &Stream, end: usize) -> Result<()> {
        let event = match self.spare.pop() {
            Some(event) => event,
            None => Event::new(gpu)?,
        };
        if let Err(e) = event.record(stream) {
            self.spare.push(event);
            return Err(e);
        }
        self.pending[slot].push_back((event, end));
        Ok(())
    }

    /// Leading bytes of `slot` seen copied so far (its GPU bound).
    pub fn seen(&mut self, slot: usize) -> Result<usize> {
        while let Some((event, end)) = self.pending[slot].front() {
            if !event.done()? {
                break;
            }
            self.seen[slot] = *end;
            let (event, _) = self.pending[slot].pop_front().expect("looked at the front");
            self.spare.push(event);
        }
        Ok(self.seen[slot])
    }
}
