//! The engine's one progress thread: drives every connection's channels, spins briefly when idle,
//! then parks until a transport completion or a new post wakes it. A transport that progresses
//! only while polled (a net plugin) never wakes it, so while such a transport has requests
//! outstanding the thread naps briefly instead of parking.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use parking_lot::Mutex;

use super::conn::Connection;
use crate::transport::Net;

/// Idle passes before parking; a completion usually arrives within a few of them under load.
const IDLE_SPINS: u32 = 64;
/// Parked threads re-check this often even without a wake (a lost wake costs at most this).
const PARK_TIMEOUT: Duration = Duration::from_millis(5);
/// Idle nap while a polled transport has work: short against a 512 KiB chunk's ~40 us at 12.5 GB/s,
/// long enough to leave the core to the plugin's helper threads.
const POLL_NAP: Duration = Duration::from_micros(25);
/// Timer slack of the progress thread, in nanoseconds.
const POLL_NAP_SLACK_NS: libc::c_ulong = 1_000;

#[derive(Default)]
pub struct Waker {
    thread: OnceLock<Thread>,
}

impl Waker {
    pub fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// The connections the progress thread drives; the generation lets it refresh its copy only when
/// the set changed, so a pass allocates nothing.
#[derive(Default)]
pub struct ConnList {
    conns: Mutex<Vec<Arc<Connection>>>,
    generation: AtomicU64,
}

impl ConnList {
    pub fn add(&self, conn: Arc<Connection>) {
        self.conns.lock().push(conn);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn remove(&self, id: u64) -> Option<Arc<Connection>> {
        let mut conns = self.conns.lock();
        let pos = conns.iter().position(|c| c.id == id)?;
        let conn = conns.swap_remove(pos);
        self.generation.fetch_add(1, Ordering::Release);
        Some(conn)
    }

    pub fn take_all(&self) -> Vec<Arc<Connection>> {
        let all = std::mem::take(&mut *self.conns.lock());
        self.generation.fetch_add(1, Ordering::Release);
        all
    }

    fn refresh(&self, seen: &mut u64, local: &mut Vec<Arc<Connection>>) {
        let current = self.generation.load(Ordering::Acquire);
        if current != *seen {
            let conns = self.conns.lock();
            local.clear();
            local.extend(conns.iter().cloned());
            *seen = current;
        }
    }
}

pub struct ProgressThread {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressThread {
    pub fn start(conns: Arc<ConnList>, waker: Arc<Waker>, net: Arc<dyn Net>) -> std::io::Result<ProgressThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread =
            std::thread::Builder::new().name("uccl-progress".into()).spawn(move || run(&conns, &thread_stop, &*net))?;
        let _ = waker.thread.set(thread.thread().clone());
        Ok(ProgressThread { stop, waker, thread: Some(thread) })
    }
}

impl Drop for ProgressThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(list: &ConnList, stop: &AtomicBool, net: &dyn Net) {
    // A sleeping thread's wake-up may come this much late (50 us unless set), which would turn every
    // POLL_NAP into about 75 us; the nap is what a staged copy or a plugin request waits on.
    // SAFETY: plain prctl on the calling thread; a failure leaves the default slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, POLL_NAP_SLACK_NS) };
    let mut local = Vec::new();
    let mut seen = u64::MAX;
    let mut idle = 0u32;
    while !stop.load(Ordering::Acquire) {
        list.refresh(&mut seen, &mut local);
        let mut moved = false;
        for conn in &local {
            moved |= conn.progress();
        }
        if moved {
            idle = 0;
        } else if idle < IDLE_SPINS {
            idle += 1;
            std::thread::yield_now();
        } else if net.needs_polling() {
            std::thread::sleep(POLL_NAP);
        } else {
            std::thread::park_timeout(PARK_TIMEOUT);
        }
    }
}
