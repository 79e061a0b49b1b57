//! Catches two threads inside the plugin at once where TCPX would race. TCPX takes no lock around
//! its lazy per-GPU setup (`gpu/cuda_wrapper.cu` `gpu_current_dev`, `gpu_get_rxmem`, reached from
//! listen, connect, accept and regMr) nor around a comm's request ring and progress (`net_tcpx.cc`
//! `tcpxGetRequest`, `tcpxCommProgress`). NCCL calls it from its proxy threads: control calls from
//! the service thread, isend/irecv/test/irecvConsumed from the progress thread, which TCPX
//! tolerates. So two control calls at once, or two calls on one comm at once, end the process
//! (as a fatal condition: see `fatal.rs`) with a message naming both calls; the per-comm locks
//! stay behind this as a safety net. `FAKE_TCPX_THREAD_CHECK=off` turns the check off.
//!
//! TCPXO locks its per-GPU setup and shared clients (`fo/fastrak_plugin.cc` L57-71), but not a
//! comm's state nor the counter its connect and accept bump (`fo/nccl_shim.cc` `Connect` L371,
//! `Accept` L430): the same two clashes hold, the first stricter than TCPXO needs for calls that
//! make no comm.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::fail::Result;
use crate::fatal::fatal;
use crate::profile::{self, Kind};

/// What an entry point touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Static state only (devices, getProperties, iflush).
    Free,
    /// TCPX's process-wide setup state, and the comm it names (0: none).
    Control(usize),
    /// One comm's requests.
    Comm(usize),
}

impl Scope {
    fn comm(self) -> Option<usize> {
        match self {
            Scope::Control(c) | Scope::Comm(c) if c != 0 => Some(c),
            _ => None,
        }
    }

    /// Why the plugin `kind` cannot run calls of these two scopes at once, if it cannot.
    fn clash(self, other: Scope, kind: Kind) -> Option<String> {
        if let (Scope::Control(_), Scope::Control(_)) = (self, other) {
            return Some(match kind {
                Kind::Tcpx => {
                    "TCPX's per-GPU setup (gpu_current_dev, the rx pool import) and connection setup take no lock"
                        .into()
                }
                Kind::Tcpxo => "TCPXO's comm counter (++comm_counter_, fo/nccl_shim.cc Connect L371, Accept L430) \
                                and connection stages take no lock"
                    .into(),
            });
        }
        match (self.comm(), other.comm()) {
            (Some(a), Some(b)) if a == b => Some(format!("the requests and progress of comm {a:#x} take no lock")),
            _ => None,
        }
    }
}

struct Inside {
    id: u64,
    /// The kernel's thread id: this library's own `std::thread` knows nothing of threads its
    /// consumer started, not even their names.
    tid: i64,
    call: &'static str,
    scope: Scope,
}

static INSIDE: Mutex<Vec<Inside>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);
/// On until `init` read the knob.
static ENABLED: AtomicBool = AtomicBool::new(true);

pub fn configure(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// The calling thread is inside `call` until the token drops.
pub struct Token(Option<u64>);

impl Drop for Token {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            inside().retain(|i| i.id != id);
        }
    }
}

fn inside() -> std::sync::MutexGuard<'static, Vec<Inside>> {
    INSIDE.lock().unwrap_or_else(|p| p.into_inner())
}

fn gettid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// "thread 1234 'name'", with the name the kernel knows (read only when a clash is reported).
fn label(tid: i64) -> String {
    match std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")) {
        Ok(name) => format!("thread {tid} '{}'", name.trim()),
        Err(_) => format!("thread {tid}"),
    }
}

/// Records the calling thread as inside `call`; a clash with another thread already inside is
/// fatal.
pub fn enter(call: &'static str, scope: Scope) -> Result<Token> {
    if scope == Scope::Free || !ENABLED.load(Ordering::Relaxed) {
        return Ok(Token(None));
    }
    let tid = gettid();
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let clash = {
        let mut inside = inside();
        let kind = profile::kind();
        let clash = inside
            .iter()
            .filter(|i| i.tid != tid)
            .find_map(|i| scope.clash(i.scope, kind).map(|why| (i.call, i.tid, why)));
        inside.push(Inside { id, tid, call, scope });
        clash
    };
    let token = Token(Some(id));
    match clash {
        None => Ok(token),
        Some((other, other_thread, why)) => Err(fatal(format!(
            "fatal, two threads inside the plugin at once: {call} on {} entered while {other} on {} was \
             running; {why}. Drive the plugin from one thread, or as NCCL does: control calls from one thread, \
             isend/irecv/test/irecvConsumed from another (FAKE_TCPX_THREAD_CHECK=off disables this check)",
            label(tid),
            label(other_thread)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashes() {
        let (c1, c2) = (0x1000, 0x2000);
        for k in [Kind::Tcpx, Kind::Tcpxo] {
            assert!(Scope::Control(0).clash(Scope::Control(c1), k).is_some(), "two control calls");
            assert!(Scope::Comm(c1).clash(Scope::Comm(c1), k).is_some(), "one comm");
            assert!(Scope::Control(c1).clash(Scope::Comm(c1), k).is_some(), "regMr or close during test of its comm");
            assert!(Scope::Comm(c1).clash(Scope::Comm(c2), k).is_none(), "two comms");
            assert!(Scope::Control(c1).clash(Scope::Comm(c2), k).is_none(), "NCCL's service and progress threads");
            assert!(Scope::Control(0).clash(Scope::Comm(c2), k).is_none());
            assert!(Scope::Free.clash(Scope::Free, k).is_none());
        }
        assert!(Scope::Control(0).clash(Scope::Control(0), Kind::Tcpxo).unwrap().contains("comm_counter_"));
    }

    #[test]
    fn one_thread_nests_and_tokens_leave() {
        let outer = enter("accept", Scope::Control(0)).unwrap();
        // The same thread re-entering (a logger calling back) is no clash.
        let inner = enter("listen", Scope::Control(0)).unwrap();
        drop(inner);
        drop(outer);
        assert!(inside().is_empty());
    }
}
