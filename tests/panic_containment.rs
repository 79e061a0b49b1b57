//! A panic in a library thread fails what that thread served with an internal error (-15) naming
//! the thread, wakes whoever waits on it, and leaves the engine destroyable; what another thread
//! serves goes on working where that is sound. Each test injects one panic through the fault hook
//! with a call or a transfer in flight. A socket helper whose epoll wait fails dies the same way.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::internal::threads::{
    ThreadKind, clear_panic, clear_wait_failure, inject_panic, inject_wait_failure, panic_pending, wait_failure_pending,
};
use uccl_tcpx::{Config, Connection, Engine, OneSided, SocketConfig, TransportChoice, UcclStatus};

mod common;
use common::{Pair, pattern};
use testkit::poll::background;

/// The fault hook is process-wide: one test at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fault armed for the test that holds it, withdrawn when that test ends, failed ones included:
/// a fault that did not fire would otherwise hit a thread of the next test in this process.
struct Armed {
    kind: ThreadKind,
    clear: fn(ThreadKind),
}

impl Drop for Armed {
    fn drop(&mut self) {
        (self.clear)(self.kind);
    }
}

/// Makes the next `kind` thread panic at its fault point while the guard is held.
fn arm_panic(kind: ThreadKind) -> Armed {
    inject_panic(kind);
    Armed { kind, clear: clear_panic }
}

/// Makes the next epoll wait of a `kind` thread fail while the guard is held.
fn arm_wait_failure(kind: ThreadKind) -> Armed {
    inject_wait_failure(kind);
    Armed { kind, clear: clear_wait_failure }
}

/// Generous for a loaded CI host (5 s was missed under a load average of 15 on 2 cores), and far
/// below the stall and connect timeouts below, so that an outcome within it came from the panic's
/// handling and not from a timeout.
const BOUND: Duration = Duration::from_secs(20);
const LEN: usize = 8 << 20;

fn config() -> Config {
    Config {
        transport: TransportChoice::Socket,
        num_channels: Some(2),
        chunk_size: 256 << 10,
        timeout: Duration::from_secs(120),
        connect_timeout: Duration::from_secs(60),
        ..common::loopback()
    }
}

fn pair() -> Pair {
    common::pair(config())
}

/// A new connection from `a` to `b`: (a's end, b's end).
fn connect(a: &Arc<Engine>, b: &Arc<Engine>) -> (Arc<Connection>, Arc<Connection>) {
    let accepting = background({
        let b = b.clone();
        move || b.accept()
    });
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    (ab, accepting.finish(BOUND, "accept").unwrap())
}

fn within<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    common::within(BOUND, what, call)
}

/// Destroys the engine, which must return even though one of its threads died.
fn destroy(engine: Arc<Engine>) {
    within("destroying the engine", move || drop(Arc::into_inner(engine).expect("the test holds the last reference")));
}

/// Closes the pair's connections, then destroys both engines (each within the bound).
fn close(p: Pair) {
    drop((p.ab, p.ba));
    destroy(p.a);
    destroy(p.b);
}

/// The transfer's outcome, which must come within the bound.
fn outcome(conn: &Connection, id: u64) -> uccl_tcpx::Result<u64> {
    common::wait_done(conn, id, BOUND)
}

/// The internal error of an injected panic in a `kind` thread.
fn assert_internal<T: std::fmt::Debug>(result: uccl_tcpx::Result<T>, kind: ThreadKind) {
    let err = result.expect_err("the call must fail");
    assert_eq!(err.status(), UcclStatus::ErrInternal, "{err}");
    let expected = format!("{kind} panicked: injected panic in the {kind}");
    assert!(err.message().contains(&expected), "{:?} does not say {expected:?}", err.message());
    assert!(!panic_pending(kind), "the injected panic fired");
}

/// A registered buffer.
struct Buf {
    data: Vec<u8>,
    mr: u64,
}

impl Buf {
    fn new(engine: &Engine, data: Vec<u8>) -> Buf {
        let mr = engine.register(data.as_ptr() as usize, data.len()).unwrap();
        Buf { data, mr }
    }

    fn recv(&mut self, conn: &Connection) -> u64 {
        conn.recv(self.mr, self.data.as_mut_ptr() as usize, self.data.len()).unwrap()
    }

    fn send(&self, conn: &Connection) -> u64 {
        conn.send(&[(self.mr, self.data.as_ptr() as usize, self.data.len())]).unwrap()
    }
}

/// A message of LEN bytes from `from` to `to` arrives intact.
fn moves_data(from: &Connection, from_engine: &Engine, to: &Connection, to_engine: &Engine) {
    let src = Buf::new(from_engine, pattern(LEN, 9));
    let mut dst = Buf::new(to_engine, vec![0; LEN]);
    let r = dst.recv(to);
    let s = src.send(from);
    assert_eq!(outcome(from, s).unwrap(), LEN as u64);
    assert_eq!(outcome(to, r).unwrap(), LEN as u64);
    assert!(dst.data == src.data, "the message arrived intact");
}

/// A new connection between the engines carries data both ways: what the dead thread did not serve
/// still works.
fn new_connection_works(a: &Arc<Engine>, b: &Arc<Engine>) {
    let (ab, ba) = connect(a, b);
    moves_data(&ab, a, &ba, b);
    moves_data(&ba, b, &ab, a);
}

/// A panic in a thread that serves one connection during a data transfer from `a` to `b`: `failing`
/// says which end's transfer must see the internal error; the other end's fails as its peer goes.
fn panic_during_transfer(kind: ThreadKind, failing_is_receiver: bool) {
    let _serial = serial();
    let p = pair();
    let src = Buf::new(&p.a, pattern(LEN, 1));
    let mut dst = Buf::new(&p.b, vec![0; LEN]);
    let r = dst.recv(&p.ba);
    let _armed = arm_panic(kind);
    let s = src.send(&p.ab);
    let (ours, theirs) = if failing_is_receiver {
        (outcome(&p.ba, r), outcome(&p.ab, s))
    } else {
        (outcome(&p.ab, s), outcome(&p.ba, r))
    };
    assert_internal(ours, kind);
    let theirs = theirs.expect_err("the peer's end of a failed connection fails too");
    assert_ne!(theirs.status(), UcclStatus::ErrTimeout, "{theirs}");
    new_connection_works(&p.a, &p.b);
    close(p);
}

#[test]
fn socket_sender_panic_fails_the_send_and_other_connections_work() {
    panic_during_transfer(ThreadKind::SocketSender, false);
}

#[test]
fn socket_receiver_panic_fails_the_receive_and_other_connections_work() {
    panic_during_transfer(ThreadKind::SocketReceiver, true);
}

/// A socket helper whose epoll wait fails (nothing but a programming error makes it) fails the comms
/// it served instead of leaving their transfers to hang, marks itself dead so that closing them
/// returns, and a new connection's comms get a fresh helper in its place.
#[test]
fn socket_helper_whose_wait_fails_fails_its_comms_and_is_replaced() {
    let _serial = serial();
    let p = pair();
    let src = Buf::new(&p.a, pattern(LEN, 3));
    let mut dst = Buf::new(&p.b, vec![0; LEN]);
    let r = dst.recv(&p.ba);
    // The receiving helpers sleep until data comes: the first to wait again afterwards is b's.
    let _armed = arm_wait_failure(ThreadKind::SocketReceiver);
    let s = src.send(&p.ab);
    let err = outcome(&p.ba, r).expect_err("the receive of a dead helper's comm fails");
    assert!(err.message().contains("wait on data sockets"), "{err}");
    assert!(!wait_failure_pending(ThreadKind::SocketReceiver), "the injected failure fired");
    let theirs = outcome(&p.ab, s).expect_err("the peer's end of a failed connection fails too");
    assert_ne!(theirs.status(), UcclStatus::ErrTimeout, "{theirs}");
    within("closing the connections of the dead helper", move || drop((p.ab, p.ba)));
    new_connection_works(&p.a, &p.b);
    destroy(p.a);
    destroy(p.b);
}

/// A test that ends before its fault fired leaves nothing armed: the guard withdraws the fault, and
/// the socket helpers of a later transfer neither panic nor fail their wait.
#[test]
fn a_fault_withdrawn_before_it_fired_hits_no_later_thread() {
    let _serial = serial();
    let p = pair();
    drop((arm_panic(ThreadKind::SocketSender), arm_wait_failure(ThreadKind::SocketReceiver)));
    assert!(!panic_pending(ThreadKind::SocketSender), "the panic was withdrawn");
    assert!(!wait_failure_pending(ThreadKind::SocketReceiver), "the wait failure was withdrawn");
    moves_data(&p.ab, &p.a, &p.ba, &p.b);
    moves_data(&p.ba, &p.b, &p.ab, &p.a);
    close(p);
}

/// The socket acceptor moves no data: a panic there costs at most the sockets it was adding (their
/// senders give them up and go on with the sockets they have); transfers on either connection
/// complete intact, and the next connection's comms grow on a fresh acceptor.
#[test]
fn socket_acceptor_panic_costs_only_the_sockets_it_was_adding() {
    let _serial = serial();
    let socket = SocketConfig { nthreads: 4, nsocks_per_thread: 1, ..SocketConfig::default() };
    let p = common::pair(Config { socket, ..config() });
    let _armed = arm_panic(ThreadKind::SocketAcceptor);
    // Each chunk has four pieces, so every comm that sends asks for its other three sockets.
    moves_data(&p.ab, &p.a, &p.ba, &p.b);
    moves_data(&p.ba, &p.b, &p.ab, &p.a);
    assert!(!panic_pending(ThreadKind::SocketAcceptor), "the injected panic fired");
    new_connection_works(&p.a, &p.b);
    close(p);
}

/// The progress thread serves every connection of its engine: all of them fail, and every later
/// call on that engine fails at once with the same error instead of waiting for progress that
/// cannot come. The peer engine is unaffected.
#[test]
fn progress_panic_fails_every_connection_and_later_calls_fail_fast() {
    let _serial = serial();
    let p = pair();
    let c = Arc::new(Engine::new(config()).unwrap());
    // A second connection of the engine whose progress thread dies, with a receive pending.
    let (cb, bc) = connect(&c, &p.b);
    let mut idle = Buf::new(&p.b, vec![0; 4096]);
    let pending = idle.recv(&bc);
    // The panic comes as the first chunk of this receive completes: only b receives chunks.
    let src = Buf::new(&p.a, pattern(LEN, 2));
    let mut dst = Buf::new(&p.b, vec![0; LEN]);
    let r = dst.recv(&p.ba);
    let _armed = arm_panic(ThreadKind::Progress);
    let s = src.send(&p.ab);
    assert_internal(outcome(&p.ba, r), ThreadKind::Progress);
    assert_internal(outcome(&bc, pending), ThreadKind::Progress);
    assert!(outcome(&p.ab, s).is_err(), "the sender's connection went with its peer");

    // Later calls on b fail at once.
    assert_internal(p.ba.recv(idle.mr, idle.data.as_mut_ptr() as usize, 4096), ThreadKind::Progress);
    assert_internal(p.ba.notify(b"n", b"m"), ThreadKind::Progress);
    let b = p.b.clone();
    assert_internal(within("accept", move || b.accept()), ThreadKind::Progress);
    let (b, port) = (p.b.clone(), p.a.address().port());
    assert_internal(within("connect", move || b.connect("127.0.0.1", "0", port)), ThreadKind::Progress);

    // a and c keep working with each other.
    new_connection_works(&p.a, &c);
    drop((p.ab, p.ba, cb, bc));
    destroy(p.b);
    destroy(p.a);
    destroy(c);
}

/// The control reader serves one connection: it fails, with a receive pending on each end.
#[test]
fn control_reader_panic_fails_its_connection_only() {
    control_thread_panic(ThreadKind::ControlReader);
}

/// The control writer serves one connection: it fails, with a receive pending on each end.
#[test]
fn control_writer_panic_fails_its_connection_only() {
    control_thread_panic(ThreadKind::ControlWriter);
}

/// A control reactor thread serves several connections of its engine: when it dies outside any one
/// connection's work, every connection it served fails with the internal error, while the engine's
/// other reactor thread goes on serving its own and a new connection gets a fresh thread.
#[test]
fn control_reactor_panic_fails_the_connections_it_served_only() {
    let _serial = serial();
    let p = common::pair(Config { control_threads: 2, ..config() });
    // a's second connection goes to a's second reactor thread.
    let (ab2, ba2) = connect(&p.a, &p.b);
    let mut at_a = Buf::new(&p.a, vec![0; 4096]);
    let mut at_b = Buf::new(&p.b, vec![0; 4096]);
    let ra = at_a.recv(&p.ab);
    let rb = at_b.recv(&p.ba);
    let _armed = arm_panic(ThreadKind::ControlReactor);
    // Larger than a caller writes itself: the reactor thread serving ab is handed it, and dies as it
    // wakes, before any byte reaches b.
    p.ab.notify(b"panic", &[1; 100 << 10]).unwrap();
    assert_internal(outcome(&p.ab, ra), ThreadKind::ControlReactor);
    assert!(outcome(&p.ba, rb).is_err(), "the peer's end fails as the connection goes");
    moves_data(&ab2, &p.a, &ba2, &p.b);
    moves_data(&ba2, &p.b, &ab2, &p.a);
    new_connection_works(&p.a, &p.b);
    drop((p.ab, p.ba, ab2, ba2));
    destroy(p.a);
    destroy(p.b);
}

/// A vector call of several requests posts them one by one: a control writer that dies as it
/// writes the first request's frame (an armed writer panic takes every message through the control
/// reactor's write turn, so it dies in the engine that posts) fails the connection while the call's
/// later requests are being posted or its chunks move, and the call still ends with the internal
/// error (from the post or its transfer), none of its parts left waiting.
#[test]
fn a_vector_call_whose_connection_fails_while_it_posts_ends_with_the_error() {
    let _serial = serial();
    let p = pair();
    // 60,000 items: eight requests of at most 8192 segments.
    let (count, len, slot) = (60_000usize, 64usize, 128usize);
    let src = Buf::new(&p.a, pattern(count * slot, 4));
    let dst = Buf::new(&p.b, vec![0; count * slot]);
    let fifo = p.b.prepare_fifo(dst.mr, dst.data.as_ptr() as usize, dst.data.len()).unwrap();
    let items: Vec<OneSided> = (0..count)
        .map(|i| {
            let mut remote = fifo;
            remote.addr += (i * slot) as u64;
            remote.size = len as u32;
            OneSided { mr: src.mr, addr: src.data.as_ptr() as usize + i * slot, len, remote }
        })
        .collect();
    let _armed = arm_panic(ThreadKind::ControlWriter);
    let ab = p.ab.clone();
    let result = within("vector write", move || ab.write(&items).and_then(|id| outcome(&ab, id)));
    assert_internal(result, ThreadKind::ControlWriter);
    close(p);
}

/// A notification from a to b: the reader kind panics in b as it reads it, the writer kind in a as
/// it writes it (an armed writer panic takes every message through the writer thread).
fn control_thread_panic(kind: ThreadKind) {
    let _serial = serial();
    let p = pair();
    let mut at_a = Buf::new(&p.a, vec![0; 4096]);
    let mut at_b = Buf::new(&p.b, vec![0; 4096]);
    let ra = at_a.recv(&p.ab);
    let rb = at_b.recv(&p.ba);
    let _armed = arm_panic(kind);
    p.ab.notify(b"panic", b"in flight").unwrap();
    let (ours, theirs) = match kind {
        ThreadKind::ControlReader => (outcome(&p.ba, rb), outcome(&p.ab, ra)),
        _ => (outcome(&p.ab, ra), outcome(&p.ba, rb)),
    };
    assert_internal(ours, kind);
    assert!(theirs.is_err(), "the peer's end fails as the connection goes");
    new_connection_works(&p.a, &p.b);
    close(p);
}

/// The accept loop's death closes the listener: a blocked accept and every later one fail with
/// the internal error, a connecting peer is refused, and established connections keep working.
#[test]
fn accept_loop_panic_fails_accept_and_spares_established_connections() {
    let _serial = serial();
    let p = pair();
    let accepting = background({
        let b = p.b.clone();
        move || b.accept()
    });
    let _armed = arm_panic(ThreadKind::Accept);
    let (a, port) = (p.a.clone(), p.b.address().port());
    let refused = within("connect to an engine whose accept loop died", move || a.connect("127.0.0.1", "0", port));
    assert!(refused.is_err(), "the listener went with the accept loop");
    assert_internal(accepting.finish(BOUND, "the blocked accept"), ThreadKind::Accept);
    let b = p.b.clone();
    assert_internal(within("a later accept", move || b.accept()), ThreadKind::Accept);
    moves_data(&p.ab, &p.a, &p.ba, &p.b);
    close(p);
}

/// A handshake serves one incoming peer: that peer's connect fails, one accept reports the
/// internal error, and the next peer is accepted as usual.
#[test]
fn handshake_panic_fails_that_handshake_only() {
    let _serial = serial();
    let a = Arc::new(Engine::new(config()).unwrap());
    let b = Arc::new(Engine::new(config()).unwrap());
    let accepting = background({
        let b = b.clone();
        move || b.accept()
    });
    let _armed = arm_panic(ThreadKind::Handshake);
    let (a2, port) = (a.clone(), b.address().port());
    let refused = within("connect through a handshake that panicked", move || a2.connect("127.0.0.1", "0", port));
    assert!(refused.is_err(), "the peer's handshake went with the thread");
    let err = accepting.finish(BOUND, "the blocked accept").map(|_| ());
    assert!(err.as_ref().is_err_and(|e| e.message().contains("handshake with 127.0.0.1:")), "{err:?}");
    assert_internal(err, ThreadKind::Handshake);
    new_connection_works(&a, &b);
    destroy(a);
    destroy(b);
}
