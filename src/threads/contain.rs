//! Starting a library thread whose panic is contained: logged once and reported to its owner.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::{Builder, JoinHandle};

use super::fault;
use super::kind::ThreadKind;
use crate::error::Error;

/// Spawns `body` on `builder`'s thread. If `body` panics, `on_panic` runs on that thread with an
/// internal error naming `kind` and the panic text, after the panic unwound `body`'s frames (so
/// every lock it held is released: the library's locks do not poison). `on_panic` must fail what
/// the thread served and wake its waiters; it is itself contained, so a second panic there is
/// logged and ends the thread quietly instead of crossing into the process's other threads.
pub fn spawn_contained<B, P>(
    builder: Builder,
    kind: ThreadKind,
    on_panic: P,
    body: B,
) -> std::io::Result<JoinHandle<()>>
where
    B: FnOnce() + Send + 'static,
    P: FnOnce(Error) + Send + 'static,
{
    builder.spawn(move || {
        fault::enter(kind);
        // Unwind safety: after a panic nothing of `body` is used again; `on_panic` touches only
        // shared state made to be failed (a flag, an error slot, a socket shutdown).
        let run = || {
            super::warm::starting(kind);
            body()
        };
        let Err(panic) = catch_unwind(AssertUnwindSafe(run)) else { return };
        let err = Error::internal(format!("{kind} panicked: {}", panic_text(&*panic)));
        log::error!("{}", err.message());
        if let Err(again) = catch_unwind(AssertUnwindSafe(|| on_panic(err))) {
            log::error!("failing what the {kind} served panicked too: {}", panic_text(&*again));
        }
    })
}

/// Runs `work` on the calling library thread as `kind`'s work, for a thread that serves many
/// connections and must fail only the one whose work panicked: `kind`'s fault point fires inside
/// `work` (and no other kind's), and a panic comes back as an internal error naming `kind`, logged
/// once. The thread's own kind is restored afterwards either way.
pub(crate) fn run_contained<R>(kind: ThreadKind, work: impl FnOnce() -> R) -> Result<R, Error> {
    let outer = fault::swap_kind(Some(kind));
    // Unwind safety: the caller fails what `work` served and uses none of its state again.
    let result = catch_unwind(AssertUnwindSafe(work));
    fault::swap_kind(outer);
    result.map_err(|panic| {
        let err = Error::internal(format!("{kind} panicked: {}", panic_text(&*panic)));
        log::error!("{}", err.message());
        err
    })
}

/// The message of a panic payload (`panic!` with a literal or a format string).
pub fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_panic_reaches_on_panic_as_an_internal_error_naming_the_thread() {
        let (tx, rx) = mpsc::channel();
        let t = spawn_contained(
            Builder::new(),
            ThreadKind::ControlWriter,
            move |e| tx.send(e).unwrap(),
            || panic!("boom {}", 7),
        )
        .unwrap();
        assert!(t.join().is_ok(), "the panic stays inside the thread");
        let err = rx.recv().unwrap();
        assert_eq!(err.status(), crate::error::UcclStatus::ErrInternal);
        assert_eq!(err.message(), "control writer panicked: boom 7");
    }

    #[test]
    fn contained_work_fires_its_own_fault_point_and_fails_alone() {
        // No unit test starts a host copy thread (its connections are in-process), so arming that
        // kind here cannot hit another test.
        let kind = ThreadKind::HostCopier;
        let (tx, rx) = mpsc::channel();
        let failed = tx.clone();
        let t = spawn_contained(
            Builder::new(),
            ThreadKind::ControlReactor,
            move |e| failed.send(format!("thread: {}", e.message())).unwrap(),
            move || {
                fault::inject_panic(kind);
                // The thread's own kind does not fire the work's point.
                fault::point(kind);
                let err = run_contained(kind, || {
                    fault::point(kind);
                    7
                })
                .expect_err("the point fired inside the work");
                tx.send(err.message().to_owned()).unwrap();
                // The thread is its own kind again: a point armed now passes it.
                fault::inject_panic(kind);
                fault::point(kind);
                tx.send(format!("pending after: {}", fault::panic_pending(kind))).unwrap();
                // Work that does not panic returns its value (and fires the armed point of its kind).
                tx.send(format!("{:?}", run_contained(ThreadKind::ControlReader, || 7))).unwrap();
                assert!(run_contained(kind, || fault::point(kind)).is_err());
            },
        )
        .unwrap();
        t.join().unwrap();
        let got: Vec<String> = rx.try_iter().collect();
        assert_eq!(
            got,
            ["host copy thread panicked: injected panic in the host copy thread", "pending after: true", "Ok(7)",],
            "the thread itself never panicked"
        );
        assert!(!fault::panic_pending(kind));
    }

    #[test]
    fn a_body_that_returns_never_calls_on_panic() {
        let (tx, rx) = mpsc::channel::<Error>();
        spawn_contained(Builder::new(), ThreadKind::Accept, move |e| tx.send(e).unwrap(), || {})
            .unwrap()
            .join()
            .unwrap();
        assert!(rx.recv().is_err(), "on_panic was dropped unused");
    }

    #[test]
    fn a_panic_in_on_panic_is_contained_too() {
        let t =
            spawn_contained(Builder::new(), ThreadKind::Progress, |_| panic!("second"), || panic!("first")).unwrap();
        assert!(t.join().is_ok());
    }

    #[test]
    fn a_fault_point_fires_once_and_only_in_its_kind_of_thread() {
        // No other unit test starts handshake threads, so arming that kind cannot hit another test.
        let kind = ThreadKind::Handshake;
        fault::inject_panic(kind);
        // Not a library thread of that kind: the point passes.
        fault::point(kind);
        let (tx, rx) = mpsc::channel();
        let other = spawn_contained(Builder::new(), ThreadKind::Accept, |_| {}, || fault::point(ThreadKind::Handshake));
        other.unwrap().join().unwrap();
        assert!(fault::panic_pending(kind), "a thread of another kind does not fire it");
        let tx2 = tx.clone();
        let hit = spawn_contained(
            Builder::new(),
            kind,
            move |e| tx2.send(e.message().to_owned()).unwrap(),
            move || {
                fault::point(kind);
                tx.send("passed".into()).unwrap();
            },
        );
        hit.unwrap().join().unwrap();
        assert_eq!(rx.recv().unwrap(), "handshake thread panicked: injected panic in the handshake thread");
        assert!(!fault::panic_pending(kind), "fired once");
        let (tx, rx) = mpsc::channel();
        let again = spawn_contained(
            Builder::new(),
            kind,
            |_| {},
            move || {
                fault::point(kind);
                tx.send(()).unwrap();
            },
        );
        again.unwrap().join().unwrap();
        assert!(rx.recv().is_ok(), "a fired point passes afterwards");
    }
}
