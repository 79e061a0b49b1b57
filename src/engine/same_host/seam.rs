//! What the same-host I/O paths need of the connection they serve: its lock, with what it guards
//! for them (the connection state, with the same-host sub-state in it, and the GPU path's grants
//! and copies), its control stream, and its engine. The connection implements it
//! (`conn/same_host_io.rs`); nothing in this folder names the connection.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Condvar;

use super::LocalLink;
use super::host_worker::{HostCopy, HostServed};
use super::ipc::IpcState;
use super::state::{CopyJob, SameHost};
use crate::engine::shared::EngineCore;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{Control, TokenBinding};
use crate::trace::ConnTag;

/// A connection, as its same-host paths see it.
pub(crate) trait Conn: Send + Sync + Sized + 'static {
    /// The connection's lock, held.
    type Locked<'a>: Locked
    where
        Self: 'a;

    fn lock(&self) -> Self::Locked<'_>;

    /// This connection's lock and its in-process peer's, taken in one order by both ends, so two
    /// engines copying toward each other at once cannot deadlock.
    fn lock_with_peer<'a>(&'a self, peer: &'a Self) -> (Self::Locked<'a>, Self::Locked<'a>);

    /// Waits, the lock let go meanwhile, until an answer to an IPC ask arrived or the connection
    /// failed ([`Conn::answered`] wakes it), or `deadline`; true when the deadline passed.
    fn wait_answered(&self, locked: &mut Self::Locked<'_>, deadline: Instant) -> bool;

    /// Wakes the callers waiting for an answer to an IPC ask.
    fn answered(&self);

    /// The engine: its configuration, region table, GPU and progress thread.
    fn core(&self) -> &EngineCore;

    /// Where the peer runs and how its connection is found in this process.
    fn link(&self) -> &LocalLink;

    /// On an authenticated connection, region tokens travel bound to it.
    fn binding(&self) -> Option<&TokenBinding>;

    fn peer_addr(&self) -> SocketAddr;

    /// The control stream, whose other end a same-host peer proves it holds.
    fn control(&self) -> &TcpStream;

    /// Hands `msg` to the control stream's writer.
    fn send(&self, msg: &Control) -> Result<()>;

    /// A new transfer of the caller's of `parts` parts, counted the way its bytes go.
    fn new_transfer(&self, parts: usize, write: bool) -> Arc<Transfer>;

    /// The host worker's handle.
    fn host(&self) -> &HostCopy;

    /// Which end of which connection its trace events name.
    fn trace(&self) -> ConnTag;
}

/// What the connection's lock guards, for the same-host paths.
pub(crate) trait Locked {
    /// Ok while the connection works; its failure afterwards.
    fn check_open(&self) -> Result<()>;

    fn failure(&self) -> Option<Error>;

    /// The same-host sub-state machine.
    fn same_host(&mut self) -> &mut SameHost;

    /// The same-host GPU path's grants, asks and copies in flight.
    fn ipc(&mut self) -> &mut IpcState;

    /// The host worker checked the peer's ProcessHello: the state answers, and the connection
    /// carries the answer out (failing on error).
    fn proved(&mut self, reads_peer: bool);

    /// The host worker finished `job`, as [`Locked::proved`].
    fn copy_finished(&mut self, job: CopyJob, copied: Result<()>);

    /// The kernel refused `job`'s copy out of the peer, as [`Locked::proved`].
    fn copy_refused(&mut self, job: CopyJob, err: Error);

    /// Makes `err` the connection's failure.
    fn fail(&mut self, err: Error);
}

/// What a connection keeps for its same-host paths outside its lock (the GPU path's grants and
/// copies are under it: `ipc::IpcState`).
pub(crate) struct SameHostIo {
    /// The host worker (proof and copies), for a peer in another process of this host.
    pub host: HostCopy,
    /// Signalled (under the lock) when an owner answers an IPC ask, or the connection fails.
    pub ipc_answered: Condvar,
    /// Device-copy batches in flight (`ipc.rs` keeps it): a caller's poll drives them only then.
    device_batches: Arc<AtomicUsize>,
}

impl SameHostIo {
    /// `conn`: the connection its host worker serves; `device_batches`: the GPU path's count of
    /// batches in flight (`IpcState::in_flight`).
    pub fn new(conn: Weak<dyn HostServed>, device_batches: Arc<AtomicUsize>) -> SameHostIo {
        SameHostIo { host: HostCopy::new(conn), ipc_answered: Condvar::new(), device_batches }
    }

    /// Whether device-copy batches are in flight, looked at without the connection lock.
    pub fn device_copies(&self) -> bool {
        self.device_batches.load(Ordering::Acquire) > 0
    }
}
