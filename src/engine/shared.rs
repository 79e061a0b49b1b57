//! What connections share with the engine: configuration, transport, the region and transfer
//! tables, the progress thread's waker, the GPU the engine serves, the control reactor. Never the connection list itself,
//! so that the engine, its connections and the progress thread that drives them do not import each
//! other.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::Thread;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use super::control_reactor::ControlReactor;
use super::mapping;
use super::region::{self, RegionTable};
use super::route::Routes;
use super::served_gpu::ServedGpu;
use super::transfer::TransferTable;
use crate::config::Config;
use crate::cuda::{self, Location};
use crate::error::{Error, Result, UcclStatus};
use crate::proto::AuthKey;
use crate::transport::{MemKind, Net};

pub(crate) struct EngineCore {
    pub(super) config: Config,
    /// The channels a connection offers: the configured count, else the default of the transport
    /// `net` runs on (known only once the transport is chosen).
    pub(super) num_channels: u16,
    pub(super) net: Arc<dyn Net>,
    /// Where each connection's channels go: `net`, or for same-host peers of a transport that
    /// cannot reach its own host, the socket transport.
    pub(super) routes: Arc<Routes>,
    pub(super) regions: RegionTable,
    pub(super) transfers: TransferTable,
    pub(super) waker: Arc<Waker>,
    pub(super) next_conn: AtomicU64,
    /// The GPU this engine serves (see `served_gpu` for how it is chosen).
    pub(super) gpu: ServedGpu,
    /// The key peers must prove, read by every handshake as it starts.
    pub(super) auth: RwLock<Option<Arc<AuthKey>>>,
    pub(super) live: Mutex<LiveConns>,
    /// The threads that read and write every connection's control stream.
    pub(super) control: ControlReactor,
    /// Tags what this engine's connections receive in the process-wide notification queue.
    pub(super) notify_key: u64,
    /// The thread setting up new channels of connections whose idle ones closed.
    pub(super) setups: Arc<super::setup_thread::SetupThread>,
    /// Copies started for host-memory inline payloads too (`test_copies.rs`).
    #[cfg(test)]
    pub(super) simulated_copies: OnceLock<Arc<super::test_copies::SimulatedCopies>>,
}

/// What a deregistration and the engine's shutdown need from every connection the engine started.
pub(crate) trait LiveConnection: Send + Sync {
    /// Cuts the deregistered `region` off; returns once no request handed to the transport uses
    /// it, or, at `deadline`, after failing the connection.
    fn fence(&self, region: u64, deadline: Instant);

    fn close(&self);
}

/// Every connection started and not yet dropped, held weakly, so that a deregistration reaches each
/// one that could hold the region (handed out or not yet); closed when the engine shuts down.
#[derive(Default)]
pub(super) struct LiveConns {
    conns: Vec<Weak<dyn LiveConnection>>,
    closed: bool,
}

impl EngineCore {
    pub(super) fn auth_key(&self) -> Option<Arc<AuthKey>> {
        self.auth.read().clone()
    }

    /// Records a connection before it reads its first message; refused once the engine shut down.
    pub(super) fn adopt(&self, conn: Weak<dyn LiveConnection>) -> Result<()> {
        let mut live = self.live.lock();
        if live.closed {
            return Err(Error::new(UcclStatus::ErrCanceled, "the engine is shutting down"));
        }
        live.conns.retain(|c| c.strong_count() > 0);
        live.conns.push(conn);
        Ok(())
    }

    pub(super) fn live_conns(&self) -> Vec<Arc<dyn LiveConnection>> {
        self.live.lock().conns.iter().filter_map(Weak::upgrade).collect()
    }

    /// Stops adopting and returns every connection still alive.
    pub(super) fn close_live(&self) -> Vec<Arc<dyn LiveConnection>> {
        let mut live = self.live.lock();
        live.closed = true;
        live.conns.drain(..).filter_map(|c| c.upgrade()).collect()
    }

    pub(super) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// What `[addr, addr + len)` is, refusing memory this engine's transport cannot move.
    pub(super) fn memory_kind(&self, addr: usize, len: usize) -> Result<MemKind> {
        region::check_range(addr, len)?;
        match cuda::locate(addr, len)? {
            Location::Host => {
                mapping::check_host_range(addr, len)?;
                Ok(MemKind::Host)
            }
            Location::Device { ordinal } => {
                if !self.net.properties(0)?.supports_cuda {
                    return Err(Error::new(
                        UcclStatus::ErrNotSupported,
                        format!("the {} transport cannot move GPU memory", self.net.caps().name),
                    ));
                }
                self.gpu.serve(ordinal, &*self.net)?;
                Ok(MemKind::Cuda { device: ordinal })
            }
        }
    }
}

/// A caller counted by `Waker::waiting_caller`.
pub struct WaitingCaller<'a> {
    waker: &'a Waker,
    id: u64,
}

impl WaitingCaller<'_> {
    /// The caller tested its own connection: the progress thread takes whatever else completed.
    pub fn looked(&self) {
        self.waker.wake();
    }
}

impl Drop for WaitingCaller<'_> {
    /// Wakes the progress thread once the caller is off the list: a completion that woke this
    /// caller after its last look would otherwise reach nobody.
    fn drop(&mut self) {
        self.waker.waiting.fetch_sub(1, Ordering::SeqCst);
        self.waker.waiters.lock().retain(|(id, _)| *id != self.id);
        self.waker.wake();
    }
}

/// How many of one kind of work are in flight, for the idle progress thread to ask whether any is.
/// SeqCst, so that a poster that counts work and then reads whether the thread parks untimed, and
/// the thread that says so and then reads the counts, cannot both miss the other.
#[derive(Default)]
pub struct Tally(AtomicUsize);

impl Tally {
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn remove(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }

    /// Counts a member in or out as its own flag changes to `now`; true when it was counted in.
    pub fn set(&self, flag: &mut bool, now: bool) -> bool {
        if std::mem::replace(flag, now) == now {
            return false;
        }
        if now {
            self.add()
        } else {
            self.remove()
        }
        now
    }
}

/// Unparks the progress thread: for posts, and for transports' completions (their `Wake`), which
/// also reach callers waiting on their transfers' chunks.
#[derive(Default)]
pub struct Waker {
    pub(super) thread: OnceLock<Thread>,
    /// The progress thread parks with no timer: work that may start a wait on a peer must wake it,
    /// or nothing would watch that wait's stall timeout. SeqCst with the connection locks' order.
    untimed: AtomicBool,
    /// Work in flight that completes only when polled (a comm that declined a post with nothing of
    /// ours in flight): while any is, the progress thread naps instead of parking.
    pub polled: Tally,
    /// Device copies of the same-host path in flight that a peer awaits (an offered message's
    /// answer): they complete only when polled, and no thread of ours moves them, so the progress
    /// thread may poll them without pause.
    pub device_copies: Tally,
    /// Device copies of the same-host path in flight that only their caller awaits: its poll or
    /// wait finishes them, so their post does not wake the progress thread (a futex call, a tenth
    /// of a small copy's time) nor has it poll beside the caller. While any is in flight the thread
    /// parks with a short timer instead of for good, so that one nobody polls still ends (its
    /// regions' counts, a revocation it holds up). SeqCst with `untimed`, as `activity` reads it.
    pub caller_copies: Tally,
    /// Connections with network chunks posted to their channels' transport and not complete, at
    /// most 1 MiB of them (each counted once, however many chunks): a thread of the transport ends
    /// them and wakes the progress thread, which `UCCL_TCPX_PROGRESS_POLL_US` may keep awake.
    pub chunks_out: Tally,
    /// Callers blocked in `wait` on a transfer that ends on its own chunks (a read), by a number
    /// of their own; `waiting` counts them, so a completion with none costs one load.
    waiters: Mutex<Vec<(u64, Thread)>>,
    waiting: AtomicUsize,
    next_waiter: AtomicU64,
    /// The progress thread's idle waits that polled, its parks and idle passes: counted, so that
    /// tests see it poll, park or spin by the event rather than by the CPU time it takes.
    pub idle: IdleCounts,
}

/// Counts the polling progress thread bumps on every pass, on a cache line of their own so that
/// the threads reading the waker's other fields on each completion do not lose theirs to it.
#[derive(Default)]
#[repr(align(128))]
pub struct IdleCounts {
    pub polls: AtomicU64,
    pub parks: AtomicU64,
    pub spins: AtomicU64,
}

impl Waker {
    pub fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// A transport's request completed (its `Wake`). While callers wait on their chunks, they
    /// hear of it instead of the progress thread: the one whose chunk it was tests its connection
    /// and finishes its transfer itself, rather than the progress thread waking to finish it and
    /// then waking the caller; each caller wakes the progress thread once it tested its own
    /// connection (`WaitingCaller::looked`), for completions of any other.
    pub fn io_done(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let waiters = self.waiters.lock();
            if !waiters.is_empty() {
                waiters.iter().for_each(|(_, t)| t.unpark());
                return;
            }
        }
        self.wake();
    }

    /// Counts the calling thread among the waiting callers until the guard drops. Registered
    /// before the caller looks at its connection: a completion after that look unparks it.
    pub fn waiting_caller(&self) -> WaitingCaller<'_> {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        self.waiters.lock().push((id, std::thread::current()));
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaitingCaller { waker: self, id }
    }

    /// Whether the progress thread parks (or is about to) with no timer.
    pub fn parked_untimed(&self) -> bool {
        self.untimed.load(Ordering::SeqCst)
    }

    /// A connection's state changed so that it waits on its peer's engine: wakes the progress
    /// thread if it parked with no timer, so that it watches the stall timeout.
    pub fn activity(&self) {
        if self.untimed.load(Ordering::SeqCst) && self.untimed.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    pub(super) fn parking_untimed(&self, untimed: bool) {
        self.untimed.store(untimed, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Waker;

    /// A transport's completion reaches a counted caller (parked, it is unparked), and stops
    /// reaching it once its guard dropped.
    #[test]
    fn completions_wake_the_callers_counted_while_they_wait() {
        // Parks that only a wake-up ends: one that nothing ends outlasts the test's patience.
        const FOREVER: Duration = Duration::from_secs(3600);
        let waker = Arc::new(Waker::default());
        let w = waker.clone();
        testkit::within(testkit::PATIENCE, "a counted caller woken by the completion", move || {
            std::thread::scope(|s| {
                let counted = w.waiting_caller();
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(30));
                    w.io_done();
                });
                std::thread::park_timeout(FOREVER);
                drop(counted);
            })
        });
        assert_eq!(waker.waiting.load(std::sync::atomic::Ordering::SeqCst), 0);
        // With nobody counted, a completion goes to the progress thread (here, the parked one).
        let w = waker.clone();
        testkit::within(testkit::PATIENCE, "the progress thread woken by the completion", move || {
            let _ = w.thread.set(std::thread::current());
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(30));
                    w.io_done();
                });
                std::thread::park_timeout(FOREVER);
            })
        });
        assert!(waker.waiters.lock().is_empty());
        let (a, b) = (waker.waiting_caller(), waker.waiting_caller());
        assert_ne!(a.id, b.id);
        drop(a);
        assert_eq!(waker.waiters.lock().iter().map(|(id, _)| *id).collect::<Vec<_>>(), [b.id]);
    }
}
