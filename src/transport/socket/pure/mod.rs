//! The socket transport's bookkeeping without I/O: what goes on the wire and how it is checked
//! (`wire`), the request window its helpers share (`window`, with an acknowledged comm's book,
//! `acked`), when a comm over several links checks them and dials a dead one again (`failover`),
//! and the counts it keeps (`counts`, `link_tally`). No socket, no syscall but the clock, no
//! thread: the I/O part of `socket/` (the helpers, sockets and epoll over `sys::worker`) drives
//! these, and nothing here imports from it (`tests/module_graph.rs`).

pub(super) mod acked;
pub(super) mod counts;
pub(super) mod failover;
pub(super) mod link_tally;
pub(super) mod window;
pub(super) mod wire;

#[cfg(test)]
mod ack_tests;
