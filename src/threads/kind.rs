//! The kinds of thread the library starts, and of work a shared thread runs for one connection at
//! a time (`run_contained`), as errors and the fault hook name them.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The engine's progress thread (drives every connection's channels).
    Progress,
    /// The engine's accept loop (takes control connections, starts handshakes).
    Accept,
    /// One incoming peer's handshake.
    Handshake,
    /// Reading one connection's control stream, on a control reactor thread.
    ControlReader,
    /// Writing one connection's queued control messages, on a control reactor thread.
    ControlWriter,
    /// A socket-transport helper sending a comm's pieces.
    SocketSender,
    /// A socket-transport helper receiving a comm's pieces.
    SocketReceiver,
    /// The socket transport's thread that takes the data sockets comms add after connect.
    SocketAcceptor,
    /// Copies a GPU's landed host-memory receives out of their slots (plugin transport).
    LandingCopier,
    /// A same-host connection's worker: proves the peer's process, copies host memory out of it.
    HostCopier,
    /// One of the engine's control reactor threads, which read and write the control streams of
    /// many connections (outside any one connection's work).
    ControlReactor,
    /// One of the process's helpers that take pieces of large same-host copies.
    HostCopyHelper,
    /// A thread collapsing one region's memory into huge pages (`Region::collapse_into_huge_pages`).
    Collapse,
    /// The thread locking staging slots ahead of their first copy (`cuda::slots`).
    SlotLocker,
}

impl ThreadKind {
    pub fn describe(self) -> &'static str {
        match self {
            ThreadKind::Progress => "progress thread",
            ThreadKind::Accept => "accept thread",
            ThreadKind::Handshake => "handshake thread",
            ThreadKind::ControlReader => "control reader",
            ThreadKind::ControlWriter => "control writer",
            ThreadKind::SocketSender => "socket sender thread",
            ThreadKind::SocketReceiver => "socket receiver thread",
            ThreadKind::SocketAcceptor => "socket acceptor thread",
            ThreadKind::LandingCopier => "landing copier thread",
            ThreadKind::HostCopier => "host copy thread",
            ThreadKind::ControlReactor => "control reactor thread",
            ThreadKind::HostCopyHelper => "host copy helper thread",
            ThreadKind::Collapse => "huge-page collapse thread",
            ThreadKind::SlotLocker => "staging slot locking thread",
        }
    }

    pub(super) fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}
