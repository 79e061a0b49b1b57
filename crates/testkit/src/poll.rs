//! Bounded waits. A test never sleeps hoping another thread got somewhere: it polls the condition
//! it needs, and fails with a message naming it once a deadline passes. Deadlines are generous
//! (a loaded two-core CI machine must not miss them); they only turn a hang into a failure.

use std::time::{Duration, Instant};

/// How long a test waits for something that happens at once on an idle machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Pause between polls of a condition another thread makes true: short enough not to slow the
/// test, long enough to leave the CPU to the threads being waited for.
const POLL_INTERVAL: Duration = Duration::from_micros(100);

/// Polls `f` until it returns `Some`, sleeping between polls; fails the test naming `what` when
/// `limit` passes first.
pub fn eventually<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(limit, f).unwrap_or_else(|| panic!("{what}: not within {limit:?}"))
}

/// Polls `f` like [`eventually`], but leaves the failure to the caller (whose message can then
/// describe the state it found): `None` when `limit` passed first.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`eventually`] for a plain condition.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    eventually(what, limit, || f().then_some(()))
}

/// Calls `f` back to back (yielding in between) until it returns `Some`: for loops whose own calls
/// make the progress, such as a transport's `test`, which a sleep between calls would only slow.
/// Fails the test naming `what` when `limit` passes first.
pub fn drive<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::yield_now();
    }
}

/// Runs `f` on a thread of its own and returns its result; fails the test naming `what` if it has
/// not returned within `limit` (the thread is left behind: it is what hung).
pub fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    background(f).finish(limit, what)
}

/// A call running on a thread of its own, so that the test can do something else meanwhile (make
/// the call return, say) and a hang fails the test instead of stalling it.
pub struct Background<T> {
    done: std::sync::mpsc::Receiver<T>,
}

/// Starts `f` on a thread of its own; [`Background::finish`] collects its result.
pub fn background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Background<T> {
    let (tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    Background { done }
}

impl<T> Background<T> {
    /// The call's result; fails the test naming `what` if it has not returned within `limit`.
    pub fn finish(self, limit: Duration, what: &str) -> T {
        self.done.recv_timeout(limit).unwrap_or_else(|e| panic!("{what} did not return within {limit:?} ({e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn eventually_returns_what_another_thread_made_true() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = flag.clone();
        let t = std::thread::spawn(move || setter.store(true, Ordering::Release));
        wait_until("flag set", PATIENCE, || flag.load(Ordering::Acquire));
        t.join().unwrap();
        let mut calls = 0;
        assert_eq!(
            drive("third call", PATIENCE, || (calls == 2).then_some(7).or_else(|| {
                calls += 1;
                None
            })),
            7
        );
        assert_eq!(calls, 2);
    }

    #[test]
    #[should_panic(expected = "never: not within")]
    fn eventually_fails_naming_the_condition() {
        eventually::<()>("never", Duration::from_millis(1), || None);
    }

    #[test]
    fn within_returns_the_result_or_fails() {
        assert_eq!(within(PATIENCE, "sum", || 2 + 2), 4);
        let hung = std::panic::catch_unwind(|| {
            within(Duration::from_millis(1), "a hang", || {
                loop {
                    std::thread::park();
                }
            })
        });
        let msg = hung.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("a hang did not return"), "{msg}");
    }
}
