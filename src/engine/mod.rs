//! The engine: owns the control listener, the accept loop, the memory-region and transfer tables
//! and the progress thread; hands out connections.

mod admission;
mod auth;
mod channel;
mod conn;
mod control_reactor;
mod control_rx;
mod dial;
mod establish;
mod fd_limit;
mod handshake;
pub mod locality;
mod mapping;
pub mod notify;
mod one_sided;
mod path;
mod plan;
mod progress;
pub use progress::IdleWaits;
pub mod region;
mod route;
pub mod same_host;
mod served_gpu;
mod setup_thread;
mod shared;
pub mod stats;
#[cfg(test)]
mod test_copies;
mod transfer;
mod writer;

use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use conn::Reach;
pub use conn::{Connection, HostPath, OneSided, PeerInfo, Piece, PieceRun};
pub use notify::Notification;
#[doc(hidden)]
pub use region::collapses_settled;

use crate::config::Config;
use crate::cuda::Gpu;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{AuthKey, FifoItem, IpcInfo};
use crate::sys::iface;
use crate::threads::{ThreadKind, spawn_contained};
use crate::transport::{MemKind, open};
use admission::AcceptQueue;
use control_reactor::ControlReactor;
use progress::{ConnList, IdleWait, ProgressThread};
use region::RegionTable;
use route::Routes;
use served_gpu::ServedGpu;
use shared::{EngineCore, LiveConns, Waker};
use transfer::TransferTable;

pub struct Engine {
    core: Arc<EngineCore>,
    conns: Arc<ConnList>,
    accepted: Arc<AcceptQueue>,
    shutdown: Arc<AtomicBool>,
    advertised: SocketAddr,
    /// The metadata string as first handed out: peers may keep it for the engine's whole life.
    metadata: OnceLock<String>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
    progress: Mutex<Option<ProgressThread>>,
}

impl Engine {
    pub fn new(config: Config) -> Result<Engine> {
        fd_limit::raise_once();
        fd_limit::keep_table_ahead();
        if let Some(trace) = &config.trace {
            crate::trace::start(trace);
        }
        let ip = iface::pick_address(config.ip, config.ifname.as_deref())?;
        // An operator who names the address or interface gets listeners on it alone, the control
        // listener and every channel listener; otherwise every interface is served, as UCCL's engine does.
        let bind: IpAddr = match (config.ip, &config.ifname) {
            (None, None) if ip.is_ipv4() => [0u8; 4].into(),
            (None, None) => [0u16; 8].into(),
            _ => ip,
        };
        let listener = crate::sys::tcp::control_listener(SocketAddr::new(bind, config.port))?;
        let port = listener.local_addr().map_err(|e| Error::io("listener address", e))?.port();
        // Before the transport: a plugin must never make a comm before it knows the GPU.
        let gpu = ServedGpu::at_creation(config.gpu)?;
        let waker = Arc::new(Waker::default());
        let wake_from_io = waker.clone();
        let wake: crate::transport::Wake = Arc::new(move || wake_from_io.io_done());
        let (net, kind) = open::engine_net(&config, ip, bind, wake.clone())?;
        let num_channels = config.channels_for(kind);
        gpu.tell(&*net);
        gpu.build_unpack_kernel(&*net);
        let routes = {
            let config = config.clone();
            let local_peers = config.local_peers;
            let make_local: route::MakeNet = Box::new(move || open::local_peers_net(&config, ip, bind, wake.clone()));
            Arc::new(Routes::new(net.clone(), local_peers, make_local))
        };
        let config_key = config.auth_key.clone().map(Arc::new);
        let control = ControlReactor::new(
            config.control_threads_per_engine(),
            config.control_spin,
            config.control_polls_past_chunks(),
        );
        let core = Arc::new(EngineCore {
            config,
            num_channels,
            net,
            routes: routes.clone(),
            regions: RegionTable::default(),
            transfers: TransferTable::default(),
            waker: waker.clone(),
            next_conn: AtomicU64::new(0),
            gpu,
            auth: RwLock::new(config_key),
            live: Mutex::new(LiveConns::default()),
            control,
            notify_key: notify::next_engine_key(),
            setups: Arc::default(),
            #[cfg(test)]
            simulated_copies: OnceLock::new(),
        });
        let conns = Arc::new(ConnList::default());
        let accepted = Arc::new(AcceptQueue::new()?);
        let progress = {
            let accepted = accepted.clone();
            let idle = {
                let (waker, spin, poll) = (waker.clone(), core.config.copy_poll_spin, core.config.progress_poll);
                move |idle_since| idle_wait(&routes, &waker, spin, poll, idle_since)
            };
            ProgressThread::start(conns.clone(), waker, core.config.timeout, idle, move |err| accepted.break_with(err))
                .map_err(|e| Error::io("spawn progress thread", e))?
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let (core, conns, accepted, shutdown) = (core.clone(), conns.clone(), accepted.clone(), shutdown.clone());
            // A dead accept loop closed the listener as it unwound: peers are refused, and `accept`
            // says why instead of waiting for a connection that cannot come.
            let failing = accepted.clone();
            spawn_contained(
                std::thread::Builder::new().name("uccl-accept".into()),
                ThreadKind::Accept,
                move |err| failing.break_with(err),
                move || admission::accept_loop(listener, core, conns, accepted, shutdown),
            )
            .map_err(|e| Error::io("spawn accept thread", e))?
        };
        log::info!("engine listening on {ip}:{port} ({} transport)", core.net.caps().name);
        Ok(Engine {
            core,
            conns,
            accepted,
            shutdown,
            advertised: SocketAddr::new(ip, port),
            metadata: OnceLock::new(),
            accept_thread: Mutex::new(Some(accept_thread)),
            progress: Mutex::new(Some(progress)),
        })
    }

    /// The transport moving this engine's data: "socket" or the net plugin's name.
    pub fn transport(&self) -> &'static str {
        self.core.net.caps().name
    }

    /// The data channels this engine offers a connection (`UCCL_TCPX_NUM_CHANNELS`, else its
    /// transport's default); a connection takes the smaller of both ends' offers.
    pub fn num_channels(&self) -> u16 {
        self.core.num_channels
    }

    /// The key of this engine's notifications (`notify::drain_engine`).
    pub fn notify_key(&self) -> u64 {
        self.core.notify_key
    }

    pub fn address(&self) -> SocketAddr {
        self.advertised
    }

    /// UCCL's metadata string: `ip:port?gpu` (`[ip6]:port?gpu` for IPv6), where `gpu` is the
    /// served GPU's PCI bus id when one is chosen at the first call, else "0". Peers connect with
    /// that string, and may keep it as long as the engine lives (NIXL reads it once, right after
    /// creating the engine), so it never changes after the first call; the GPU part is advisory.
    pub fn metadata(&self) -> String {
        self.metadata.get_or_init(|| format!("{}?{}", self.advertised, self.core.gpu.identity().1)).clone()
    }

    /// How the progress thread waited once idle so far: for tests, which see it poll or park by
    /// these counts instead of by its CPU time.
    #[doc(hidden)]
    pub fn idle_waits(&self) -> IdleWaits {
        let idle = &self.core.waker.idle;
        IdleWaits {
            polled: idle.polls.load(Ordering::Relaxed),
            parked: idle.parks.load(Ordering::Relaxed),
            spun: idle.spins.load(Ordering::Relaxed),
        }
    }

    /// Callers' waits on this engine's transfers that ran out a slice (a park or a blocking read
    /// of the control stream that nothing ended): a lost wake-up or hand-over shows as these, which
    /// tests count instead of timing the waits.
    #[doc(hidden)]
    pub fn wait_slices_run_out(&self) -> u64 {
        self.core.transfers.slices_run_out()
    }

    /// The GPU this engine serves, once chosen.
    #[doc(hidden)]
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.core.gpu.get()
    }

    pub fn connect(&self, host: &str, remote_gpu: &str, port: u16) -> Result<Arc<Connection>> {
        self.connect_as(host, remote_gpu, port, None)
    }

    /// `connect`, telling the peer `local_gpu` as this side's GPU index (what its `accept`
    /// reports) instead of the index of the GPU this engine serves. The index is advisory on both
    /// sides: a caller such as UCCL's engine numbers its GPUs itself, and a host-only engine
    /// serves none.
    pub fn connect_as(
        &self,
        host: &str,
        remote_gpu: &str,
        port: u16,
        local_gpu: Option<i32>,
    ) -> Result<Arc<Connection>> {
        if let Some(g) = local_gpu
            && g < 0
        {
            return Err(Error::invalid(format!("local GPU index {g} is negative")));
        }
        if let Some(e) = self.conns.failure() {
            return Err(e.context("connect"));
        }
        if port == 0 {
            return Err(Error::invalid("remote port 0 is not a listening port"));
        }
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| Error::invalid(format!("cannot resolve {host:?}: {e}")))?
            .next()
            .ok_or_else(|| Error::invalid(format!("{host:?} resolves to no address")))?;
        let conn = connect_to(&self.core, addr, remote_gpu, local_gpu).map_err(|e| {
            let e = e.context(format!("connect to {addr}"));
            // The caller gets the error too, but a caller such as NIXL reports only a status.
            log::error!("{e}");
            e
        })?;
        self.register_conn(conn)
    }

    fn register_conn(&self, conn: Arc<Connection>) -> Result<Arc<Connection>> {
        if self.shutdown.load(Ordering::Acquire) {
            conn.close();
            return Err(Error::new(UcclStatus::ErrCanceled, "the engine is shutting down"));
        }
        if let Err(e) = self.conns.add(conn.clone()) {
            conn.close();
            return Err(e.context("connect"));
        }
        self.core.waker.wake();
        Ok(conn)
    }

    /// Blocks until a peer finished its handshake, or `stop_accept` was called. Fails with an
    /// internal error for a handshake whose thread panicked, and for good once the accept loop or
    /// the progress thread did.
    pub fn accept(&self) -> Result<Arc<Connection>> {
        self.accept_within(None)?.ok_or_else(|| Error::new(UcclStatus::ErrInternal, "accept without a limit timed out"))
    }

    /// `accept`, giving up after `limit`: `Ok(None)` when no peer finished its handshake by then.
    /// A caller that must stay responsive (to a signal, to shutdown) waits in such slices.
    pub fn accept_within(&self, limit: Option<Duration>) -> Result<Option<Arc<Connection>>> {
        let deadline = limit.map(|l| Instant::now() + l);
        let mut state = self.accepted.state.lock();
        loop {
            if self.accepted.stopped.load(Ordering::Acquire) {
                return Err(Error::new(UcclStatus::ErrCanceled, "accept was stopped"));
            }
            if let Some(outcome) = state.ready.pop_front() {
                drop(state);
                // The handshake thread may have chosen the GPU for this connection (an engine with
                // none yet); its kernel is built here, on the caller's thread, as by a connect.
                if outcome.is_ok() {
                    self.core.gpu.build_unpack_kernel(&*self.core.net);
                }
                return outcome.map(Some);
            }
            if let Some(e) = &state.broken {
                return Err(e.clone().context("accept"));
            }
            match deadline {
                None => self.accepted.changed.wait(&mut state),
                Some(deadline) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    self.accepted.changed.wait_until(&mut state, deadline);
                }
            }
        }
    }

    /// Requires every later handshake, in either direction, to prove `key` (and the peer to prove
    /// it to us); connections made before keep what they had.
    pub fn set_auth_key(&self, key: AuthKey) {
        *self.core.auth.write() = Some(Arc::new(key));
    }

    pub fn stop_accept(&self) {
        self.accepted.stopped.store(true, Ordering::Release);
        self.accepted.wake_loop();
        let _guard = self.accepted.state.lock();
        self.accepted.changed.notify_all();
    }

    /// Closes one connection and forgets it.
    pub fn close_connection(&self, conn: &Connection) {
        self.conns.remove(conn.id);
        conn.close();
    }

    /// Registers host or GPU memory, whichever `addr` is (CUDA decides; without a driver all
    /// memory is host). The first GPU registration chooses the engine's GPU unless
    /// UCCL_TCPX_GPU did.
    pub fn register(&self, addr: usize, len: usize) -> Result<u64> {
        let kind = self.core.memory_kind(addr, len)?;
        self.core.regions.register(addr, len, kind)
    }

    /// Deregisters a region and returns only once no engine thread will read or write it again:
    /// transfers using it are cut off (they fail with NOT_ALLOWED; a peer's write or read is
    /// refused), chunks already handed to the transport are waited for, and a connection whose
    /// transport still holds some after UCCL_TCPX_FENCE_TIMEOUT_MS is failed.
    pub fn deregister(&self, mr: u64) -> Result<()> {
        let region = self.core.regions.remove(mr)?;
        let deadline = Instant::now() + self.core.config.fence_timeout;
        for conn in self.core.live_conns() {
            conn.fence(mr, deadline);
        }
        wait_for_device_copies(&region, deadline);
        // Channels release their registrations of a removed region once no one holds it; a pass
        // the fences woke while this call still held it left them for a later pass, which the
        // progress thread, parked with nothing else to do, would not run.
        drop(region);
        self.core.waker.wake();
        Ok(())
    }

    pub fn prepare_fifo(&self, mr: u64, addr: usize, len: usize) -> Result<FifoItem> {
        self.core.regions.advertise(mr, addr, len)
    }

    /// UCCL's IPC information for registered `addr`: the CUDA IPC handle of the allocation holding
    /// it, the offset of `addr` in that allocation, the bytes from `addr` to the region's end, the
    /// GPU. `None` for host memory, for GPU memory without a legacy IPC handle (the CUDA virtual
    /// memory API's), and when same-host paths are disabled (UCCL_TCPX_DISABLE_IPC=1); an address
    /// outside every registered region is an error. Peers of this engine never need it (a local
    /// connection asks the owner for the handle, which authorizes the request first); it exists
    /// for callers that ship it as UCCL's do.
    pub fn ipc_info(&self, addr: usize) -> Result<Option<IpcInfo>> {
        let region = self
            .core
            .regions
            .find_containing(addr)
            .ok_or_else(|| Error::not_found(format!("address {addr:#x} is not inside a registered region")))?;
        if self.core.config.disable_ipc {
            return Ok(None);
        }
        let (MemKind::Cuda { device }, Some(export)) = (region.kind, region.ipc_export()) else {
            return Ok(None);
        };
        let offset = (addr as u64).checked_sub(export.base).filter(|&o| o < export.len).ok_or_else(|| {
            Error::backend(format!("internal: address {addr:#x} lies outside its allocation's IPC range"))
        })?;
        let size = (region.base + region.len - addr) as u64;
        Ok(Some(IpcInfo { handle: export.handle, offset, size, gpu: device }))
    }

    /// Stops accepting, closes every connection (failing what is pending) and stops the threads.
    pub fn shutdown(&self) {
        if self.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop_accept();
        if let Some(t) = self.accept_thread.lock().take() {
            let _ = t.join();
        }
        for conn in self.accepted.state.lock().ready.drain(..).flatten() {
            conn.close();
        }
        for conn in self.conns.take_all() {
            conn.close();
        }
        // Connections a handshake thread finished meanwhile, which no list holds yet.
        for conn in self.core.close_live() {
            conn.close();
        }
        self.progress.lock().take();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits until no device copy of the same-host path (this engine's or another engine's of this
/// process) reads or writes `region`. The fences made every later copy refuse it; the ones already
/// queued finish on their own (a GPU copy cannot be called back), and the progress threads count
/// them off, so this waits past `deadline` too, saying so once.
fn wait_for_device_copies(region: &region::Region, deadline: Instant) {
    let mut warned = false;
    while region.copies_in_flight() > 0 {
        if !warned && Instant::now() >= deadline {
            log::warn!("deregistering memory region {}: device copies on it are still running", region.id);
            warned = true;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// The connector's side: control stream, Hello, channels. A failure after Hello is also told to
/// the peer (a Refuse with the reason), so both ends log the same cause.
fn connect_to(
    core: &Arc<EngineCore>,
    addr: SocketAddr,
    remote_gpu: &str,
    local_gpu: Option<i32>,
) -> Result<Arc<Connection>> {
    // Before the connect: a first connection may build the GPU's unpack kernel here, which must
    // not eat into the handshake's deadline.
    core.gpu.before_comms(&*core.net)?;
    core.gpu.build_unpack_kernel(&*core.net);
    let deadline = Instant::now() + core.config.connect_timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, core.config.connect_timeout).map_err(|e| Error::io("TCP connect", e))?;
    handshake::prepare_control(&stream, deadline, core.config.timeout)?;
    // Before anything is opened for the peer: an acceptor that cannot prove the key gets no listener.
    let session = core.auth_key().map(|key| auth::authenticate(&mut stream, &key)).transpose()?;
    let mut local = handshake::Local::of(core);
    if let Some(g) = local_gpu {
        local.gpu_index = g;
    }
    // The peer is not known yet: the first listen is on the engine's transport (replaced by one on
    // the socket transport if the peer turns out to share the host).
    let listened = establish::Listens::first(&*core.net);
    let mut listens = listened.map_err(|e| handshake::refuse(&mut stream, e))?;
    let mut agreed = handshake::hello(&mut stream, &local, remote_gpu, &mut listens)?;
    if let Some(s) = &session {
        agreed.nonce = s.channel_nonce();
    }
    core.routes.log_choice(addr, agreed.route, agreed.link.locality);
    dial::confine(&*agreed.net, &mut agreed.peer_handles, addr.ip(), &core.config.allow_dial)?;
    let channels = handshake::establish_channels(&local, &mut listens, &agreed, deadline, &mut stream)
        .map_err(|e| handshake::refuse(&mut stream, e))?;
    let chunking = agreed.chunking();
    let renewal = handshake::renewal(core, &agreed);
    let peer = PeerInfo {
        addr,
        gpu_index: agreed.peer_gpu_index,
        gpu_id: agreed.peer_gpu_id,
        locality: agreed.link.locality,
        channels: agreed.net.caps().name,
    };
    let binding = session.map(|s| s.token_binding());
    let reach = Reach::of(core.gpu.bound_by(&*agreed.net), &*agreed.net);
    Connection::start(core.clone(), stream, peer, channels, chunking, agreed.link, binding, reach, renewal)
}

/// What the idle progress thread does (`idle_choice`): device copies in flight are staged chunks and
/// the same-host GPU path's copies; polled work is a transport that progresses only when polled (a
/// plugin's requests) or a comm that declined a post with nothing in flight, which the waker counts,
/// as it counts connections with network chunks in flight. The clock is read only when polling for
/// those chunks is on and some are in flight. A thread about to park frees the idle staging
/// memory that is due, and parks no longer than until the next is.
fn idle_wait(routes: &Routes, waker: &Waker, spin: bool, chunk_poll: Duration, idle_since: Instant) -> IdleWait {
    let copies = routes.polls_device_copies() || waker.device_copies.any();
    let chunks_idle = (!chunk_poll.is_zero() && waker.chunks_out.any()).then(|| idle_since.elapsed());
    match idle_choice(copies, routes.needs_polling() || waker.polled.any(), spin, chunks_idle, chunk_poll) {
        IdleWait::Park => routes.trim_staging().map_or(IdleWait::Park, IdleWait::ParkFor),
        other => other,
    }
}

/// Polls without pause while device copies are in flight, when `spin` allows (no thread of ours
/// moves them), and while network chunks are in flight (`chunks_idle`: for how long the thread has
/// found nothing to move) for up to `chunk_poll`, after which their completion wakes it as before;
/// naps while anything else needs polling (its threads need the core); parks otherwise.
fn idle_choice(
    device_copies: bool,
    polled: bool,
    spin: bool,
    chunks_idle: Option<Duration>,
    chunk_poll: Duration,
) -> IdleWait {
    if (device_copies && spin) || chunks_idle.is_some_and(|idle| idle < chunk_poll) {
        IdleWait::Poll
    } else if device_copies || polled {
        IdleWait::Nap
    } else {
        IdleWait::Park
    }
}

#[cfg(test)]
mod tests;
