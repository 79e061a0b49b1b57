//! Reads data listeners for the comms that may still take sockets: one thread per net, started when
//! a listener first has such a comm and ended when no listener has one, waits in `epoll_wait` on
//! those listeners and their pending streams (timing out when the oldest pending hello is due) and
//! files what comes (`door`), whether or not anyone still polls the listen comm (the engine drops
//! it once its channels are set up; a caller of the comms directly may keep it unpolled). A door
//! leaves the thread once each of its comms closed or has all its sockets; a receive comm's drop
//! signals the thread to look.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;

use super::door::Doorway;
use crate::error::Result;
use crate::sys::epoll::{Epoll, EventFd};
use crate::threads::{self, ThreadKind, spawn_contained};

const WAKE_TOKEN: u64 = u64::MAX;
const EVENTS_PER_WAIT: usize = 64;

pub(super) type Door = Arc<Mutex<Doorway>>;

struct State {
    /// By token: a door's listener and pending streams are in the epoll set under its slot number.
    doors: Vec<Option<Door>>,
    running: bool,
    exit: bool,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    epoll: Arc<Epoll>,
    wake: Arc<EventFd>,
    state: Mutex<State>,
}

/// A net's acceptor; its epoll set and eventfd are made when a comm first needs them. Lock order:
/// the state before a door; nothing takes the state while holding a door.
#[derive(Default)]
pub(super) struct Acceptor {
    shared: Mutex<Option<Arc<Shared>>>,
}

impl Acceptor {
    fn shared(&self) -> Result<Arc<Shared>> {
        let mut shared = self.shared.lock();
        if let Some(s) = &*shared {
            return Ok(s.clone());
        }
        let epoll = Arc::new(Epoll::new()?);
        let wake = Arc::new(EventFd::new()?);
        epoll
            .add(wake.fd(), libc::EPOLLIN as u32, WAKE_TOKEN)
            .map_err(|e| crate::error::Error::io("add an eventfd to the socket acceptor's epoll set", e))?;
        let state = Mutex::new(State { doors: Vec::new(), running: false, exit: false, thread: None });
        let s = Arc::new(Shared { epoll, wake, state });
        *shared = Some(s.clone());
        Ok(s)
    }

    /// What a receive comm that may grow signals when it goes. `None` if the acceptor cannot be
    /// set up (no descriptor left): its comms then take no socket after their first.
    pub fn waker(&self) -> Option<Arc<EventFd>> {
        self.shared().map(|s| s.wake.clone()).ok()
    }

    /// Reads `door` from now on, while a comm of it may still grow. The caller holds no door lock.
    pub fn watch(&self, door: &Door) {
        if let Err(e) = self.try_watch(door) {
            log::warn!("comms of a data listener take no more sockets: {e}");
        }
    }

    fn try_watch(&self, door: &Door) -> Result<()> {
        let shared = self.shared()?;
        let mut st = shared.state.lock();
        if st.doors.iter().flatten().any(|d| Arc::ptr_eq(d, door)) {
            return Ok(());
        }
        let token = st.doors.iter().position(Option::is_none).unwrap_or(st.doors.len());
        door.lock()
            .watch(shared.epoll.clone(), token as u64)
            .map_err(|e| crate::error::Error::io("watch a data listener", e))?;
        if token == st.doors.len() {
            st.doors.push(None);
        }
        st.doors[token] = Some(door.clone());
        if !st.running {
            if let Some(old) = st.thread.take() {
                // It said it ends, under this lock, and touches nothing after.
                let _ = old.join();
            }
            let (body, failing) = (shared.clone(), shared.clone());
            let started = spawn_contained(
                std::thread::Builder::new().name("uccl-sock-acc".into()),
                ThreadKind::SocketAcceptor,
                move |_| {
                    let mut st = failing.state.lock();
                    for door in st.doors.drain(..).flatten() {
                        door.lock().unwatch();
                    }
                    st.running = false;
                },
                move || serve(&body),
            );
            match started {
                Ok(t) => {
                    st.thread = Some(t);
                    st.running = true;
                }
                Err(e) => {
                    door.lock().unwatch();
                    st.doors[token] = None;
                    return Err(crate::error::Error::io("start the socket acceptor", e));
                }
            }
        }
        drop(st);
        shared.wake.signal();
        Ok(())
    }

    /// Has the thread look at its doors again (a listen comm went).
    pub fn nudge(&self) {
        if let Some(s) = &*self.shared.lock() {
            s.wake.signal();
        }
    }

    /// Acceptor threads running now (0 or 1).
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.shared.lock().as_ref().map_or(0, |s| s.state.lock().running as usize)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let Some(shared) = self.shared.get_mut().take() else { return };
        let thread = {
            let mut st = shared.state.lock();
            st.exit = true;
            st.thread.take()
        };
        shared.wake.signal();
        if let Some(t) = thread {
            let _ = t.join();
        }
        for door in shared.state.lock().doors.drain(..).flatten() {
            door.lock().unwatch();
        }
    }
}

fn serve(shared: &Shared) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut ready: Vec<u64> = Vec::new();
    let mut doors: Vec<(u64, Door)> = Vec::new();
    loop {
        let deadline = {
            let mut st = shared.state.lock();
            if st.exit {
                return;
            }
            for slot in st.doors.iter_mut() {
                if let Some(door) = slot {
                    let mut d = door.lock();
                    if !d.prune() {
                        d.unwatch();
                        drop(d);
                        *slot = None;
                    }
                }
            }
            if st.doors.iter().all(Option::is_none) {
                st.running = false;
                return;
            }
            st.doors.iter().flatten().filter_map(|d| d.lock().deadline()).min()
        };
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let n = match shared.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(e) => {
                log::error!("the socket acceptor stops: wait on data listeners: {e}");
                let mut st = shared.state.lock();
                for door in st.doors.drain(..).flatten() {
                    door.lock().unwatch();
                }
                st.running = false;
                return;
            }
        };
        ready.clear();
        for ev in &events[..n] {
            let token = ev.u64;
            if token == WAKE_TOKEN {
                shared.wake.drain();
            } else if !ready.contains(&token) {
                ready.push(token);
            }
        }
        // The doors as they are now: one watched while this thread waited has events already.
        doors.clear();
        doors.extend(shared.state.lock().doors.iter().enumerate().filter_map(|(t, d)| Some((t as u64, d.clone()?))));
        let now = Instant::now();
        for (token, door) in &doors {
            let mut d = door.lock();
            let due = d.deadline().is_some_and(|t| t <= now);
            if !(ready.contains(token) || due) || !d.watched() {
                continue;
            }
            threads::point(ThreadKind::SocketAcceptor);
            if let Err(e) = d.pump() {
                log::warn!("a data listener could not take a socket: {e}");
            }
        }
    }
}
