//! This process's threads as Linux shows them in /proc: their names (to count what a library
//! started and prove it ended) and whether one is asleep in the kernel (to know that a thread
//! reached the blocking call a test wants to interrupt, instead of sleeping and hoping it did).

use std::time::Duration;

/// Names of this process's threads. A listing of /proc/self/task that meets a thread exiting can
/// skip the thread after it (the kernel resumes the listing by position), so the directory is read
/// until two listings in a row agree.
pub fn names() -> Vec<String> {
    let mut last = listing();
    for _ in 0..20 {
        let next = listing();
        if next == last {
            break;
        }
        last = next;
    }
    last
}

fn listing() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
            names.push(name.trim().to_owned());
        }
    }
    names
}

/// Kernel ids of this process's threads whose name starts with `prefix`, for [`state`].
pub fn named(prefix: &str) -> Vec<u32> {
    let mut tids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok())
            && name.starts_with(prefix)
        {
            tids.push(tid);
        }
    }
    tids
}

/// How many of this process's threads have a name starting with `prefix`.
pub fn count_named(prefix: &str) -> usize {
    names().iter().filter(|n| n.starts_with(prefix)).count()
}

/// The kernel's id of the calling thread, for [`wait_asleep`] from another one.
pub fn current_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    let tid = link.file_name().and_then(|n| n.to_str()).expect("/proc/thread-self names the task");
    tid.parse().expect("a numeric thread id")
}

/// The scheduler state letter of thread `tid` of this process (`R` running, `S` asleep in a
/// blocking call, ...), `None` once it exited.
pub fn state(tid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "tid (comm) S ...": the name may hold spaces and parentheses, the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits until thread `tid` sleeps in the kernel: a thread that only makes one blocking call is
/// then inside it. Fails the test naming `what` if it never does within `limit`.
pub fn wait_asleep(tid: u32, what: &str, limit: Duration) {
    crate::wait_until(&format!("{what} blocks"), limit, || state(tid) == Some('S'));
}

/// Runs `f` on a new thread and returns once that thread sleeps in the kernel, which, for an `f`
/// that makes one blocking call, means it is blocked in that call. Fails the test naming `what` if
/// the thread never sleeps within [`PATIENCE`](crate::PATIENCE).
pub fn spawn_blocked<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        tid_tx.send(current_tid()).expect("the spawner waits for the id");
        f()
    });
    let tid = tid_rx.recv().expect("the thread sends its id first");
    wait_asleep(tid, what, crate::PATIENCE);
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_blocked_on_a_channel_is_seen_asleep() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("testkit-probe".into())
            .spawn(move || {
                tid_tx.send(current_tid()).unwrap();
                go_rx.recv().unwrap();
            })
            .unwrap();
        let tid = tid_rx.recv().unwrap();
        wait_asleep(tid, "the probe's recv", crate::PATIENCE);
        assert!(count_named("testkit-probe") >= 1, "{:?}", names());
        assert_eq!(named("testkit-probe"), [tid]);
        go_tx.send(()).unwrap();
        t.join().unwrap();
        crate::wait_until("the exited thread leaves /proc", crate::PATIENCE, || state(tid).is_none());
        assert_ne!(current_tid(), tid);
    }

    #[test]
    fn spawn_blocked_returns_with_the_call_blocked() {
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let t = spawn_blocked("a recv", move || rx.recv().unwrap());
        assert!(!t.is_finished());
        tx.send(7).unwrap();
        assert_eq!(t.join().unwrap(), 7);
    }
}
