//! The transport interface the engine drives, shaped like NCCL's `ncclNet` v7 so that the built-in
//! socket transport and a net plugin (TCPX) fit behind the same calls.
//!
//! Rules every implementation follows and the engine relies on:
//! - comms are one-way (a send comm and a receive comm per direction);
//! - `connect`/`accept` may report "not yet" (`Ok(None)`) and are polled again;
//! - `isend`/`irecv` may report "no free request slot" (`Ok(None)`);
//! - `test` is called only on the oldest outstanding request of a comm, never again once it reported done;
//! - a completed receive keeps its slot until `irecv_consumed`, called in posting order;
//! - the size a completed receive reports is the sender's, which may be smaller than what was posted;
//!   a sender larger than the posted buffer is an error, never a truncation;
//! - closing is dropping;
//! - a vectored request (`isendv` / `irecvv`, only on a net that reports `vectored`) is one message
//!   whose bytes are its segments concatenated: it matches one request of the same total on the
//!   other end, vectored or not. Its segments come in runs ([`MrRun`]), each in the registration
//!   it names: one run for a chunk of one region, several for a chunk of KV blocks that crosses
//!   from one region into the next (the regions need not be of one allocation, so no two runs are
//!   joined into one copy). On a net with a registration limit (`max_registration`) only a run's
//!   first segment need lie in its registration, the others anywhere in the same engine region
//!   (whose windows the engine registers), since blocks scattered over a larger region span
//!   several windows.

pub mod caps;
pub mod open;
pub mod plugin;
pub mod socket;
pub mod staged;
#[cfg(test)]
pub(crate) mod testutil;

use std::net::IpAddr;

use crate::error::Result;
pub use caps::{Caps, Properties};

/// Opaque bytes a listener hands to the connecting side out of band (NCCL's `NCCL_NET_HANDLE_MAXSIZE`).
pub type NetHandle = [u8; crate::proto::NET_HANDLE_SIZE];

/// Wakes the engine's progress thread: a transport calls it from its own threads whenever a request
/// completes or a comm fails, so the engine can park instead of polling.
pub type Wake = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Identifies a posted request within its comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// A registration of memory with a comm (ncclNet `mhandle`). Transports without registration use `NONE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MrHandle(pub usize);

impl MrHandle {
    pub(crate) const NONE: MrHandle = MrHandle(0);
}

/// One segment of a vectored request: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoSeg {
    pub addr: usize,
    pub len: usize,
}

/// A run of a vectored request's segments: the next `segs` of them lie in registration `mr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MrRun {
    pub segs: usize,
    pub mr: MrHandle,
}

impl MrRun {
    /// Every segment of `iov` in `mr`.
    pub fn all(iov: &[IoSeg], mr: MrHandle) -> [MrRun; 1] {
        [MrRun { segs: iov.len(), mr }]
    }
}

/// Checks that `mrs` are runs of all of `iov`'s segments, none empty.
pub(crate) fn check_runs(iov: &[IoSeg], mrs: &[MrRun], what: &str) -> Result<()> {
    let covered = mrs.iter().try_fold(0usize, |n, r| if r.segs == 0 { None } else { n.checked_add(r.segs) });
    if covered != Some(iov.len()) || mrs.is_empty() {
        return Err(crate::error::Error::invalid(format!(
            "the registrations of a vectored {what} cover {} of its {} segments",
            mrs.iter().map(|r| r.segs).sum::<usize>(),
            iov.len()
        )));
    }
    Ok(())
}

/// What a comm's data sockets on one link carried so far ([`SendComm::link_stats`],
/// [`RecvComm::link_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStats {
    /// The sockets' local address: their data link where the transport has links, else the
    /// engine's own address (the unspecified address for a socket whose address could not be read).
    pub link: IpAddr,
    /// Sockets of the comm on this link.
    pub sockets: u32,
    /// Payload bytes of whole pieces moved (headers not counted).
    pub bytes: u64,
    /// Pieces moved whole.
    pub pieces: u64,
    /// Sockets that failed: an I/O error, a protocol violation, a socket the comm gave up adding.
    pub errors: u64,
}

fn unvectored<T>(what: &str) -> Result<T> {
    Err(crate::error::Error::new(
        crate::error::UcclStatus::ErrNotSupported,
        format!("this transport takes one buffer per {what}, not a list of segments"),
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    Host,
    Cuda { device: i32 },
}

pub trait Net: Send + Sync {
    /// What the transport is and can do, fixed when it was opened (`caps.rs`).
    fn caps(&self) -> &Caps;
    fn devices(&self) -> usize;
    fn properties(&self, dev: usize) -> Result<Properties>;
    fn listen(&self, dev: usize) -> Result<(NetHandle, Box<dyn ListenComm>)>;
    /// `handle` is a fresh copy of the listener's bytes for every connect: implementations may keep
    /// connection state in it between polls.
    fn connect(&self, dev: usize, handle: &mut NetHandle) -> Result<Option<Box<dyn SendComm>>>;
    /// Whether requests progress only while polled (no completion wakes the engine), and some are
    /// outstanding: the progress thread then keeps polling instead of parking.
    fn needs_polling(&self) -> bool;
    /// Whether what needs polling includes device copies (a staged chunk's copy): their end is
    /// reported to no thread, and the GPU, not a thread of the process, moves them, so the
    /// progress thread may poll them without leaving its core to anyone.
    fn polls_device_copies(&self) -> bool;
    /// Frees staging memory kept idle past its bound whose time came (the staged decorator's
    /// pool), and says when the next is due: the progress thread parks no longer than that.
    fn trim_staging(&self) -> Option<std::time::Duration> {
        None
    }
    /// The device channel `channel` of a connection listens and connects on (once the GPU is
    /// known, a plugin's channels pair with the devices next to it).
    fn channel_device(&self, channel: usize) -> usize;
    /// The GPU the engine serves, told once it is known (before any comm is made when it can be);
    /// transports that bind comms to a GPU make it current around those calls.
    fn set_gpu(&self, gpu: &std::sync::Arc<crate::cuda::Gpu>);
    /// The address `connect` would dial for `handle`, when the transport can tell; `None` for handles
    /// it cannot read (a net plugin's are opaque).
    fn handle_address(&self, handle: &NetHandle) -> Option<IpAddr>;
    /// Makes `connect` dial `ip` for `handle` instead of the address it names (same port).
    fn set_handle_address(&self, handle: &mut NetHandle, ip: IpAddr) -> Result<()>;
}

pub trait ListenComm: Send {
    fn accept(&mut self) -> Result<Option<Box<dyn RecvComm>>>;
}

pub trait SendComm: Send {
    fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle>;
    fn dereg_mr(&mut self, mr: MrHandle);
    /// # Safety
    /// `[data, data + len)` stays valid and unmodified until `test` reports the request done or the
    /// comm is dropped.
    unsafe fn isend(&mut self, data: *const u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>>;
    /// Sends the segments of `iov`, in the registrations `mrs` name, as one message (see the
    /// module rules).
    ///
    /// # Safety
    /// Every segment as `isend`'s buffer; `iov` itself need not outlive the call.
    unsafe fn isendv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        match (iov, mrs) {
            // SAFETY: per the contract.
            ([one], [run]) => unsafe { self.isend(one.addr as *const u8, one.len, run.mr) },
            _ => unvectored("send"),
        }
    }
    /// `Some(bytes)` once the request finished.
    fn test(&mut self, req: RequestId) -> Result<Option<usize>>;
    /// Makes now what the comm's first transfer of GPU memory would otherwise make on its way (a
    /// staged comm: a ring for its engine's pool). Asked only of the channels of a connection whose
    /// GPU memory takes them; nothing by default.
    fn make_ahead(&mut self) {}
    /// Per data link, what the comm's sockets carried so far; empty for a transport that does not
    /// count (a net plugin).
    fn link_stats(&self) -> Vec<LinkStats> {
        Vec::new()
    }
}

pub trait RecvComm: Send {
    fn reg_mr(&mut self, addr: usize, len: usize, kind: MemKind) -> Result<MrHandle>;
    fn dereg_mr(&mut self, mr: MrHandle);
    /// # Safety
    /// `[data, data + len)` stays valid and is not accessed by anyone else until `test` reports the
    /// request done or the comm is dropped.
    unsafe fn irecv(&mut self, data: *mut u8, len: usize, mr: MrHandle) -> Result<Option<RequestId>>;
    /// Receives one message into the segments of `iov`, in order, in the registrations `mrs`
    /// name (see the module rules).
    ///
    /// # Safety
    /// Every segment as `irecv`'s buffer; `iov` itself need not outlive the call.
    unsafe fn irecvv(&mut self, iov: &[IoSeg], mrs: &[MrRun]) -> Result<Option<RequestId>> {
        match (iov, mrs) {
            // SAFETY: per the contract.
            ([one], [run]) => unsafe { self.irecv(one.addr as *mut u8, one.len, run.mr) },
            _ => unvectored("receive"),
        }
    }
    /// `Some(bytes)` (the sender's size) once the data is in place.
    fn test(&mut self, req: RequestId) -> Result<Option<usize>>;
    fn irecv_consumed(&mut self, req: RequestId) -> Result<()>;
    /// Makes now what the comm's first transfer of GPU memory would otherwise make on its way (a
    /// staged comm: a ring for its engine's pool). Asked only of the channels of a connection whose
    /// GPU memory takes them; nothing by default.
    fn make_ahead(&mut self) {}

    /// Asks the comm to write the bytes of receives posted from now on into `[addr, addr + len)`
    /// back from the CPU's caches to memory as they land, since a DMA engine reads them next (the
    /// staged path's slots: a copy up of lines other cores hold modified runs at a third of its
    /// speed); returns whether it does. A comm may skip receives whose copy up later arrivals
    /// hide (the socket comm does). Only a cost where nothing but the CPU reads the bytes.
    fn write_back_received(&mut self, _addr: usize, _len: usize) -> bool {
        false
    }
    /// Ends [`RecvComm::write_back_received`] for `[addr, addr + len)`, with no receive posted into
    /// it: the staged path's ring left the comm for its engine's pool.
    fn stop_write_back(&mut self, _addr: usize, _len: usize) {}
    /// Per data link, what the comm's sockets carried so far; empty for a transport that does not
    /// count (a net plugin).
    fn link_stats(&self) -> Vec<LinkStats> {
        Vec::new()
    }
}

/// Whether a comm bound to GPU `bound` (the engine's; `None`: no GPU is known, so none is bound)
/// may register memory of GPU `device`. TCPX binds each comm to the GPU current when it is made
/// (its receive pool lives there) and maps a CUDA registration through the GPU current at regMr
/// (docs/TCPX.md): bytes of another GPU's memory could be neither unpacked into it nor sent from
/// it by that comm. Connections on such a transport refuse it as a post or a peer's request names
/// it (the connection goes on), and its comms at registration.
pub fn bound_gpu_takes(bound: Option<i32>, device: i32) -> Result<()> {
    match bound {
        Some(bound) if bound != device => Err(crate::error::Error::new(
            crate::error::UcclStatus::ErrNotSupported,
            format!(
                "the net plugin binds each comm to one GPU, this engine's GPU {bound}: memory of GPU \
                 {device} moves only to peers on this host; to send it over the network, register it with an \
                 engine of GPU {device} (UCCL_TCPX_GPU={device}, or GPU {device} current at creation)"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod bound_gpu_tests {
    use super::bound_gpu_takes;
    use crate::error::UcclStatus;

    #[test]
    fn a_comm_bound_to_one_gpu_takes_only_that_gpus_memory() {
        assert!(bound_gpu_takes(Some(1), 1).is_ok());
        assert!(bound_gpu_takes(None, 3).is_ok(), "no GPU known: nothing is bound");
        let err = bound_gpu_takes(Some(1), 0).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotSupported);
        for said in ["net plugin", "GPU 1", "memory of GPU 0", "UCCL_TCPX_GPU=0"] {
            assert!(err.message().contains(said), "{said}: {err}");
        }
    }
}
