//! The operating system under the transports and the engine, as mio keeps its `sys/unix`: epoll
//! sets and eventfds, the worker threads that serve descriptors from them, iovec lists, network
//! interfaces, the settings every TCP stream takes and the control listener, and random numbers.
//! Nothing here knows about comms, connections or the wire; both the socket transport and the
//! engine build on it.

pub mod epoll;
pub mod iface;
pub mod iovec;
pub mod random;
pub mod tcp;
pub mod worker;
