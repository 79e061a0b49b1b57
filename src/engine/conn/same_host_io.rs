//! The connection's side of the seam to the same-host paths (`engine::same_host`): what they may
//! use of it (`seam::Conn`, `seam::Locked`, and the host worker's `HostServed`).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::MutexGuard;

use super::state::{Action, ConnState};
use super::{Connection, Inner};
use crate::engine::locality::LocalLink;
use crate::engine::same_host::PeerProcess;
use crate::engine::same_host::host_copy::HostWork;
use crate::engine::same_host::host_worker::{HostCopy, HostServed};
use crate::engine::same_host::ipc::IpcState;
use crate::engine::same_host::seam::{Conn, Locked};
use crate::engine::same_host::state::{CopyJob, SameHost};
use crate::engine::shared::EngineCore;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{Control, TokenBinding};
use crate::trace::ConnTag;

/// The connection's lock, held, as the same-host paths see it.
pub(crate) struct ConnLocked<'a> {
    conn: &'a Connection,
    inner: MutexGuard<'a, Inner>,
}

impl ConnLocked<'_> {
    /// Carries out what a step of the state asked for; failing that fails the connection.
    fn step(&mut self, f: impl FnOnce(&mut ConnState, &mut Vec<Action>)) {
        let mut out = Vec::new();
        f(&mut self.inner.state, &mut out);
        if let Err(e) = self.conn.apply(&mut self.inner, out) {
            self.conn.fail(&mut self.inner, e);
        }
    }
}

impl Locked for ConnLocked<'_> {
    fn check_open(&self) -> Result<()> {
        self.inner.state.check_open()
    }

    fn failure(&self) -> Option<Error> {
        self.inner.state.failure().cloned()
    }

    fn same_host(&mut self) -> &mut SameHost {
        self.inner.state.same_host_mut()
    }

    fn ipc(&mut self) -> &mut IpcState {
        &mut self.inner.ipc
    }

    fn proved(&mut self, reads_peer: bool) {
        self.step(|state, out| state.proved(reads_peer, out));
    }

    fn copy_finished(&mut self, job: CopyJob, copied: Result<()>) {
        self.step(|state, out| state.copy_finished(job, copied, out));
    }

    fn copy_refused(&mut self, job: CopyJob, err: Error) {
        self.step(|state, out| state.copy_refused(job, err, out));
    }

    fn fail(&mut self, err: Error) {
        self.conn.fail(&mut self.inner, err);
    }
}

impl Conn for Connection {
    type Locked<'a> = ConnLocked<'a>;

    fn lock(&self) -> ConnLocked<'_> {
        ConnLocked { conn: self, inner: self.inner.lock() }
    }

    fn lock_with_peer<'a>(&'a self, peer: &'a Connection) -> (ConnLocked<'a>, ConnLocked<'a>) {
        let (ours, theirs) = Connection::lock_with_peer(self, peer);
        (ConnLocked { conn: self, inner: ours }, ConnLocked { conn: peer, inner: theirs })
    }

    fn wait_answered(&self, locked: &mut ConnLocked<'_>, deadline: Instant) -> bool {
        self.same_host.ipc_answered.wait_until(&mut locked.inner, deadline).timed_out()
    }

    fn answered(&self) {
        self.same_host.ipc_answered.notify_all();
    }

    fn core(&self) -> &EngineCore {
        &self.core
    }

    fn link(&self) -> &LocalLink {
        &self.link
    }

    fn binding(&self) -> Option<&TokenBinding> {
        self.binding.as_ref()
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer.addr
    }

    fn control(&self) -> &TcpStream {
        &self.control
    }

    fn send(&self, msg: &Control) -> Result<()> {
        self.writer.send(msg)
    }

    fn new_transfer(&self, parts: usize, write: bool) -> Arc<Transfer> {
        Connection::new_transfer(self, parts, write)
    }

    fn host(&self) -> &HostCopy {
        &self.same_host.host
    }

    fn trace(&self) -> ConnTag {
        self.trace
    }
}

impl HostServed for Connection {
    fn serve_host_work(&self, process: &mut Option<Arc<PeerProcess>>, only: Option<u64>) {
        HostWork::serve_host_work(self, process, only);
    }

    fn has_host_work(&self) -> bool {
        self.host_work_queued()
    }

    fn fail_with(&self, err: Error) {
        Connection::fail_with(self, err);
    }

    fn host(&self) -> &HostCopy {
        &self.same_host.host
    }

    fn spin(&self) -> std::time::Duration {
        self.core.config.host_copy_spin
    }
}
