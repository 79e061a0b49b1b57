//! A channel: one send comm and one receive comm to the same peer, with the queue of chunks waiting
//! for a request slot and the window of chunks in flight. Both peers derive the same chunk plan, so
//! per-channel FIFO order is the only matching rule the transport needs (tags are ignored).

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::transport::{MrHandle, RecvComm, RequestId, SendComm};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flow: u64,
    pub addr: usize,
    pub len: usize,
}

/// Cuts `[addr, addr + len)` into chunks; chunk `i` of the flow with direction sequence number `seq`
/// rides channel `(seq + i) % channels`, so small flows spread over channels too.
pub fn plan(
    flow: u64,
    addr: usize,
    len: usize,
    chunk_size: usize,
    seq: u64,
    channels: usize,
) -> impl Iterator<Item = (usize, Chunk)> {
    let count = len.div_ceil(chunk_size);
    (0..count).map(move |i| {
        let off = i * chunk_size;
        let chunk = Chunk { flow, addr: addr + off, len: chunk_size.min(len - off) };
        (((seq % channels as u64) as usize + i) % channels, chunk)
    })
}

pub fn chunk_count(len: u64, chunk_size: usize) -> usize {
    len.div_ceil(chunk_size as u64) as usize
}

pub struct Channel {
    send: Box<dyn SendComm>,
    recv: Box<dyn RecvComm>,
    window: usize,
    send_queue: VecDeque<Chunk>,
    send_inflight: VecDeque<(RequestId, Chunk)>,
    recv_queue: VecDeque<Chunk>,
    recv_inflight: VecDeque<(RequestId, Chunk)>,
}

impl Channel {
    pub fn new(send: Box<dyn SendComm>, recv: Box<dyn RecvComm>, window: usize) -> Channel {
        Channel {
            send,
            recv,
            window,
            send_queue: VecDeque::new(),
            send_inflight: VecDeque::new(),
            recv_queue: VecDeque::new(),
            recv_inflight: VecDeque::new(),
        }
    }

    pub fn queue_send(&mut self, chunk: Chunk) {
        self.send_queue.push_back(chunk);
    }

    pub fn queue_recv(&mut self, chunk: Chunk) {
        self.recv_queue.push_back(chunk);
    }

    /// Posts queued chunks while the window has room and reaps finished ones (oldest first, the
    /// only order `test` allows). Finished chunks are appended to `done`; returns whether anything moved.
    pub fn drive(&mut self, done: &mut Vec<Chunk>) -> Result<bool> {
        let mut moved = false;
        while self.send_inflight.len() < self.window {
            let Some(&chunk) = self.send_queue.front() else { break };
            // SAFETY: chunks point into registered regions the flow keeps alive; the connection
            // drops this channel (joining its I/O) before any flow is reported finished on failure.
            let posted = unsafe { self.send.isend(chunk.addr as *const u8, chunk.len, MrHandle::NONE)? };
            let Some(req) = posted else { break };
            self.send_queue.pop_front();
            self.send_inflight.push_back((req, chunk));
            moved = true;
        }
        while let Some(&(req, chunk)) = self.send_inflight.front() {
            if self.send.test(req)?.is_none() {
                break;
            }
            self.send_inflight.pop_front();
            done.push(chunk);
            moved = true;
        }
        while self.recv_inflight.len() < self.window {
            let Some(&chunk) = self.recv_queue.front() else { break };
            // SAFETY: as above; the destination is exclusively ours until the flow finishes.
            let posted = unsafe { self.recv.irecv(chunk.addr as *mut u8, chunk.len, MrHandle::NONE)? };
            let Some(req) = posted else { break };
            self.recv_queue.pop_front();
            self.recv_inflight.push_back((req, chunk));
            moved = true;
        }
        while let Some(&(req, chunk)) = self.recv_inflight.front() {
            let Some(size) = self.recv.test(req)? else { break };
            if size != chunk.len {
                return Err(Error::backend(format!(
                    "protocol violation: peer sent a {size}-byte chunk where the chunk plan expects {} bytes",
                    chunk.len
                )));
            }
            // Host memory is final once the receive completes, so the slot goes back at once.
            self.recv.irecv_consumed(req)?;
            self.recv_inflight.pop_front();
            done.push(chunk);
            moved = true;
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_byte_once_and_rotates() {
        let chunks: Vec<_> = plan(9, 1000, 10, 4, 1, 3).collect();
        assert_eq!(
            chunks,
            vec![
                (1, Chunk { flow: 9, addr: 1000, len: 4 }),
                (2, Chunk { flow: 9, addr: 1004, len: 4 }),
                (0, Chunk { flow: 9, addr: 1008, len: 2 }),
            ]
        );
        assert_eq!(chunk_count(10, 4), 3);
        assert_eq!(chunk_count(8, 4), 2);
        let one: Vec<_> = plan(1, 0, 1, 4096, 5, 2).collect();
        assert_eq!(one, vec![(1, Chunk { flow: 1, addr: 0, len: 1 })]);
    }
}
