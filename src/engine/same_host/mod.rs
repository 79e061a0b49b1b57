//! The same-host wing of the engine: everything a connection does differently when its peer runs
//! on this host or in this process, where no byte needs a socket. The network path
//! (`engine/conn/`) reaches it through two seams only:
//!
//! - `state.rs`: the same-host sub-state machine (I/O-free, like the connection state that owns it
//!   and hands it the same-host messages), with `state::Network`, the connection state's network
//!   path as the sub-state sees it;
//! - `seam.rs`: the connection as the wing's I/O sees it (`Conn`, `Locked`), which the connection
//!   implements; the wing's entry points are traits over it (`device_copy::DevicePath`,
//!   `local_copy::LocalCopy`, `host_copy::HostWork`).
//!
//! The rest: who this engine is and whether a peer shares its host or process (`identity.rs`,
//! `registry.rs`; the answer, `Locality`, is the engine's: `engine/locality.rs`), the proof of a peer process and its handle (`proof.rs`, `peers.rs`,
//! `process.rs`), host copies between processes (`host_worker.rs`, `host_copy.rs`, `host_job.rs`,
//! `copiers.rs`), GPU copies over CUDA IPC (`device_copy.rs`, `device_recv.rs` for two-sided messages, `ipc.rs`), host copies within the
//! process (`local_copy.rs`).
//!
//! The host identity travels in Hello and Welcome. A peer's claim to share our process is never
//! taken on its word: the connector records its Hello nonce in this process before sending it, and
//! an acceptor counts as in-process only when it finds that nonce here and marks it; the connector
//! in turn counts the acceptor as in-process only when its mark is there. A process elsewhere
//! cannot write into these tables, so a peer that lies about its process id stays remote.
//!
//! Between processes of the host, host memory moves with `process_vm_readv` once the peer proved
//! which process it is (`proof.rs`); an engine only ever reads another process's memory
//! (`process.rs`), and the kernel's ptrace rules decide whether it may.

pub(crate) mod copiers;
pub(crate) mod device_copy;
pub(crate) mod device_recv;
pub(crate) mod host_copy;
pub(crate) mod host_job;
pub(crate) mod host_worker;
mod identity;
pub(crate) mod ipc;
pub(crate) mod local_copy;
mod peers;
mod process;
mod proof;
mod registry;
pub(crate) mod seam;
pub(crate) mod state;

pub use identity::own_identity;
#[doc(hidden)]
pub use process::refuse_process_access;
pub(crate) use process::{PIECE_BYTES, PeerProcess, pieces};
pub(crate) use proof::{Refusal, prove};
pub(crate) use registry::{PendingHello, accepted_locality, peer_connection, register_connection};
pub use state::HostPath;
// Where a peer runs is the engine's to say (`engine/locality.rs`); the wing's files read it here.
pub(crate) use super::locality::{LocalLink, Locality};
