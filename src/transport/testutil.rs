//! What the transports' unit tests share: a socket net on loopback, a connected pair of comms, a
//! bounded wait for a request, the turn at the process's write-back count, and a message received
//! while that count is watched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::socket::SocketNet;
use super::{MrHandle, Net, RecvComm, SendComm};

/// The socket transport on 127.0.0.1, with the engine's usual timeouts and no wake-up to deliver.
pub(crate) fn loopback_socket_net() -> SocketNet {
    SocketNet::new("127.0.0.1".parse().unwrap(), Duration::from_secs(5), Duration::from_secs(30), Arc::new(|| {}))
}

/// A send comm and the receive comm it connected to, both of `net`.
pub(crate) fn pair(net: &dyn Net) -> (Box<dyn SendComm>, Box<dyn RecvComm>) {
    let (mut handle, mut listen) = net.listen(0).unwrap();
    let send = net.connect(0, &mut handle).unwrap().expect("socket connect completes at once");
    let deadline = Instant::now() + testkit::PATIENCE;
    loop {
        if let Some(recv) = listen.accept().unwrap() {
            return (send, recv);
        }
        assert!(Instant::now() < deadline, "accept timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls `f` (a request's `test`) until it reports done, failing the test after 10 s.
pub(crate) fn until<T>(mut f: impl FnMut() -> crate::Result<Option<T>>) -> crate::Result<T> {
    let deadline = Instant::now() + testkit::PATIENCE;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        assert!(Instant::now() < deadline, "request did not finish");
        std::thread::yield_now();
    }
}

/// Held by each test that measures `socket::written_back_bytes()` over receives of its own: the
/// count is the process's, and another test's write-backs meanwhile would be counted as its own.
pub(crate) fn written_back_alone() -> MutexGuard<'static, ()> {
    static ALONE: Mutex<()> = Mutex::new(());
    ALONE.lock()
}

/// Sends `msg` over `tx` into `dst` (at least as long) through `rx`, both requests tested to
/// completion, and checks it arrived whole.
pub(crate) fn exchange(tx: &mut dyn SendComm, rx: &mut dyn RecvComm, msg: &[u8], dst: &mut [u8]) {
    // SAFETY: dst and msg outlive both requests, which are tested done before this returns.
    let r = unsafe { rx.irecv(dst.as_mut_ptr(), dst.len(), MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), msg.len());
    assert_eq!(until(|| rx.test(r)).unwrap(), msg.len());
    rx.irecv_consumed(r).unwrap();
    assert!(dst[..msg.len()] == *msg, "every byte as sent");
}

/// [`exchange`], returning the bytes the receivers wrote back meanwhile (hold
/// [`written_back_alone`]).
pub(crate) fn receive_counting_write_back(
    tx: &mut Box<dyn SendComm>,
    rx: &mut Box<dyn RecvComm>,
    msg: &[u8],
    dst: &mut [u8],
) -> u64 {
    let before = super::socket::written_back_bytes();
    exchange(&mut **tx, &mut **rx, msg, dst);
    super::socket::written_back_bytes() - before
}
