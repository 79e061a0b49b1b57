//! The accept loop, and what a new control connection must show before anything is spent on it.
//!
//! The loop reads every new connection's opening frames itself, without blocking: one `poll` over
//! the listener and every connection still being admitted, each bounded by the connect timeout.
//! With a key the connection must first pass the challenge-response, then its Hello must be one
//! this engine can serve. Only then does it get a handshake thread, which opens the data listeners
//! and answers Welcome. A silent, garbled, unauthenticated or refused peer costs a socket and a
//! frame's worth of buffer until it is turned away, never a thread, a listener or a dial.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::conn::{Connection, PeerInfo, Reach};
use super::handshake::prepare_control;
use super::progress::ConnList;
use super::shared::EngineCore;
use super::{auth, dial, handshake};
use crate::error::{Error, Result, UcclStatus};
use crate::proto::auth::{Challenge, Session};
use crate::proto::frame::{FRAME_HEADER_LEN, is_handshake_kind};
use crate::proto::{AuthChallenge, AuthKey, FrameHeader, Handshake, Hello, ProtoError, Refuse};
use crate::sys::epoll::EventFd;
use crate::threads::{ThreadKind, spawn_contained};

/// Handshakes' outcomes waiting for `accept`.
pub(super) struct AcceptQueue {
    pub(super) state: Mutex<Accepted>,
    pub(super) changed: Condvar,
    pub(super) stopped: AtomicBool,
    /// Wakes the accept loop, which otherwise sleeps until a peer arrives or an admission's
    /// deadline passes: for `stop_accept` and shutdown.
    wake: EventFd,
}

#[derive(Default)]
pub(super) struct Accepted {
    /// Finished handshakes, and handshake threads that panicked (an internal error for the
    /// `accept` that would have returned their connection).
    pub(super) ready: VecDeque<Result<Arc<Connection>>>,
    /// Once the accept loop or the progress thread died: every later `accept` fails with it.
    pub(super) broken: Option<Error>,
}

impl AcceptQueue {
    pub(super) fn new() -> Result<AcceptQueue> {
        Ok(AcceptQueue {
            state: Mutex::default(),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            wake: EventFd::new()?,
        })
    }

    /// Has the accept loop look at `stopped` and the engine's shutdown at once.
    pub(super) fn wake_loop(&self) {
        self.wake.signal();
    }

    pub(super) fn push(&self, outcome: Result<Arc<Connection>>) {
        self.state.lock().ready.push_back(outcome);
        self.changed.notify_all();
    }

    pub(super) fn break_with(&self, err: Error) {
        self.state.lock().broken.get_or_insert(err);
        self.changed.notify_all();
    }
}

/// Connections admitted or being admitted at once. Each is bounded by UCCL_TCPX_CONNECT_TIMEOUT_MS,
/// so a flood of idle connections costs at most this many sockets (and, once admitted, small-stack
/// threads), and real peers still get through unless the flood exceeds it.
const MAX_PENDING_HANDSHAKES: usize = 1024;
const HANDSHAKE_STACK: usize = 256 << 10;
/// Connections taken from the listener per pass, so a burst cannot starve those already pending.
const ACCEPTS_PER_PASS: usize = 64;

/// What the next frame of a connection being admitted leads to.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Send this and wait for the peer's next frame.
    Answer(Box<Handshake>),
    /// Wait for the peer's next frame.
    Wait,
    /// The Hello checked out (after the challenge-response, when this engine has a key).
    Admit(Box<Hello>, Option<Session>),
    /// Turn the peer away with a Refuse saying why.
    Refuse(Error),
    /// Close without a word: the peer does not speak the protocol, or already said why it left.
    Close(Error),
}

enum Phase {
    Opening,
    Proving { connector: Challenge, acceptor: Challenge },
    Hello(Option<Session>),
}

/// The admission rules for one connection, free of I/O: frames in, verdicts out.
pub(super) struct Gate {
    key: Option<Arc<AuthKey>>,
    phase: Phase,
}

impl Gate {
    pub(super) fn new(key: Option<Arc<AuthKey>>) -> Gate {
        Gate { key, phase: Phase::Opening }
    }

    /// `transport` is this engine's; `challenge` draws a fresh challenge when one is needed.
    pub(super) fn on_frame(
        &mut self,
        frame: std::result::Result<Handshake, ProtoError>,
        transport: &str,
        challenge: impl FnOnce() -> Result<Challenge>,
    ) -> Verdict {
        let msg = match frame {
            Ok(msg) => msg,
            Err(e) => {
                return match handshake::version_refusal(&e) {
                    Some(err) => Verdict::Refuse(err),
                    None => Verdict::Close(e.into()),
                };
            }
        };
        match (std::mem::replace(&mut self.phase, Phase::Opening), msg) {
            // The peer gave up and says why (the key it holds does not match ours, say).
            (_, Handshake::Refuse(r)) => Verdict::Close(handshake::refused(r)),
            (Phase::Opening, Handshake::AuthHello(h)) => {
                let Some(key) = &self.key else {
                    return Verdict::Refuse(Error::not_allowed(
                        "authentication failed: the peer holds a key and this engine none (set the same \
                         UCCL_TCPX_AUTH_KEY_FILE or uccl_engine_set_auth_key on both sides)",
                    ));
                };
                let acceptor = match challenge() {
                    Ok(c) => c,
                    Err(e) => return Verdict::Close(e),
                };
                let proof = key.acceptor_proof(&h.challenge, &acceptor);
                self.phase = Phase::Proving { connector: h.challenge, acceptor };
                Verdict::Answer(Box::new(Handshake::AuthChallenge(AuthChallenge { challenge: acceptor, proof })))
            }
            (Phase::Opening, Handshake::Hello(h)) => match &self.key {
                Some(_) => Verdict::Refuse(Error::not_allowed(
                    "authentication failed: this engine requires a key and the peer has none (set the same \
                     UCCL_TCPX_AUTH_KEY_FILE or uccl_engine_set_auth_key on both sides)",
                )),
                None => admit(h, None, transport),
            },
            (Phase::Proving { connector, acceptor }, Handshake::AuthProof(p)) => {
                let key = self.key.as_ref().expect("proving implies a key");
                if !key.connector_proof_ok(&connector, &acceptor, &p.proof) {
                    return Verdict::Refuse(Error::not_allowed(
                        "authentication failed: the peer's proof does not match this engine's key (the two \
                         engines hold different keys)",
                    ));
                }
                self.phase = Phase::Hello(Some(key.session(&connector, &acceptor)));
                Verdict::Wait
            }
            (Phase::Hello(session), Handshake::Hello(h)) => admit(h, session, transport),
            (Phase::Opening, _) => {
                Verdict::Close(Error::backend("protocol violation: connection did not open with Hello or AuthHello"))
            }
            (Phase::Proving { .. }, _) => Verdict::Close(Error::backend("protocol violation: expected an AuthProof")),
            (Phase::Hello(_), _) => {
                Verdict::Close(Error::backend("protocol violation: expected a Hello after authentication"))
            }
        }
    }
}

fn admit(h: Hello, session: Option<Session>, transport: &str) -> Verdict {
    match handshake::check_hello(&h, transport) {
        Ok(()) => Verdict::Admit(Box::new(h), session),
        Err(e) => Verdict::Refuse(e),
    }
}

/// A control connection being admitted.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    gate: Gate,
    /// The frame being read: exactly its bytes so far, never a byte of the next one (which belongs
    /// to the handshake thread once the connection is admitted).
    frame: Vec<u8>,
    /// Bytes of an answer the socket did not take yet.
    out: Vec<u8>,
}

/// What reading and writing a pending connection came to.
enum Progress {
    Keep,
    Gone,
    Admit(Box<Hello>, Option<Session>),
}

impl Pending {
    fn new(stream: TcpStream, peer: SocketAddr, deadline: Instant, key: Option<Arc<AuthKey>>) -> Pending {
        Pending { stream, peer, deadline, gate: Gate::new(key), frame: Vec::new(), out: Vec::new() }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => drop(self.out.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what has arrived, frame by frame, and acts on each whole one.
    fn progress(&mut self, transport: &str) -> Progress {
        if let Err(e) = self.flush() {
            log::debug!("{}: dropped during admission: {e}", self.peer);
            return Progress::Gone;
        }
        loop {
            let want = match self.frame.len().checked_sub(FRAME_HEADER_LEN) {
                None => FRAME_HEADER_LEN - self.frame.len(),
                Some(_) => match frame_header(&self.frame) {
                    Ok(h) => FRAME_HEADER_LEN + h.body_len as usize - self.frame.len(),
                    Err(e) => return self.turn_away(Verdict::Close(e)),
                },
            };
            if want == 0 {
                let frame = std::mem::take(&mut self.frame);
                let decoded = frame_header(&frame).map(|h| Handshake::decode(&h, &frame[FRAME_HEADER_LEN..]));
                let decoded = match decoded {
                    Ok(d) => d,
                    Err(e) => return self.turn_away(Verdict::Close(e)),
                };
                match self.gate.on_frame(decoded, transport, auth::random_challenge) {
                    Verdict::Wait => continue,
                    Verdict::Answer(msg) => {
                        msg.encode(&mut self.out);
                        if let Err(e) = self.flush() {
                            log::debug!("{}: dropped during admission: {e}", self.peer);
                            return Progress::Gone;
                        }
                        continue;
                    }
                    Verdict::Admit(hello, session) => return Progress::Admit(hello, session),
                    other => return self.turn_away(other),
                }
            }
            let start = self.frame.len();
            self.frame.resize(start + want, 0);
            match self.stream.read(&mut self.frame[start..]) {
                Ok(0) => {
                    log::debug!("{} closed its connection during admission", self.peer);
                    return Progress::Gone;
                }
                Ok(n) => self.frame.truncate(start + n),
                Err(e) => {
                    self.frame.truncate(start);
                    match e.kind() {
                        ErrorKind::WouldBlock => return Progress::Keep,
                        ErrorKind::Interrupted => {}
                        _ => {
                            log::debug!("{}: dropped during admission: {e}", self.peer);
                            return Progress::Gone;
                        }
                    }
                }
            }
        }
    }

    /// Logs why the peer is turned away (at error level when it failed authentication: an operator
    /// needs to see that) and tells it, best effort, when there is something to tell.
    fn turn_away(&mut self, verdict: Verdict) -> Progress {
        let (err, tell) = match verdict {
            Verdict::Refuse(err) => (err, true),
            Verdict::Close(err) => (err, false),
            _ => unreachable!("only refusals turn a peer away"),
        };
        if err.status() == UcclStatus::ErrNotAllowed {
            log::error!("refusing {}: {}", self.peer, err.message());
        } else {
            log::warn!("refusing {}: {}", self.peer, err.message());
        }
        if tell {
            let refuse = Refuse { status: err.status() as i32, reason: err.message().to_owned() };
            Handshake::Refuse(refuse).encode(&mut self.out);
            let _ = self.flush();
        }
        Progress::Gone
    }
}

/// The header of a frame once its 8 bytes are in: a known handshake kind with a bounded body, or
/// the reason the connection is dropped.
fn frame_header(frame: &[u8]) -> Result<FrameHeader> {
    let bytes: &[u8; FRAME_HEADER_LEN] = frame[..FRAME_HEADER_LEN].try_into().expect("a whole header");
    let header = FrameHeader::parse(bytes)?;
    if !is_handshake_kind(header.kind) {
        return Err(Error::backend("protocol violation: a control frame before the handshake finished"));
    }
    Ok(header)
}

/// Serves the control listener until `shutdown`: admits connections, hands admitted ones to a
/// handshake thread each, and queues the connections those make for `accept`.
pub(super) fn accept_loop(
    listener: TcpListener,
    core: Arc<EngineCore>,
    conns: Arc<ConnList>,
    accepted: Arc<AcceptQueue>,
    shutdown: Arc<AtomicBool>,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        accepted.break_with(Error::io("control listener", e));
        return;
    }
    let transport = core.net.caps().handshake_name();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let mut pending: Vec<Pending> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !shutdown.load(Ordering::Acquire) {
        fds.clear();
        fds.push(libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        for p in &pending {
            let events = if p.out.is_empty() { libc::POLLIN } else { libc::POLLIN | libc::POLLOUT };
            fds.push(libc::pollfd { fd: p.stream.as_raw_fd(), events, revents: 0 });
        }
        // Last, so that the indices of the others stay as they were.
        fds.push(libc::pollfd { fd: accepted.wake.fd(), events: libc::POLLIN, revents: 0 });
        let now = Instant::now();
        let next_deadline = pending.iter().map(|p| p.deadline.saturating_duration_since(now)).min();
        // No timer without an admission under way: a stop or shutdown writes the eventfd. Rounded
        // up, so a deadline a fraction of a millisecond away is not polled for in a spin.
        let wait_ms = next_deadline.map_or(-1, |w| w.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int);
        // SAFETY: `fds` holds `fds.len()` pollfds for descriptors owned by `listener` and `pending`,
        // all open for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if ready < 0 {
            continue;
        }
        if fds.last().is_some_and(|w| w.revents != 0) {
            accepted.wake.drain();
        }
        // Pending connections first (newly accepted ones are polled next pass), from the back so
        // that removing one leaves the indices of those still to visit alone.
        let stopped = accepted.stopped.load(Ordering::Acquire);
        let now = Instant::now();
        for i in (0..pending.len()).rev() {
            let revents = fds[i + 1].revents;
            // The deadline first: a peer trickling a byte at a time must not outlive it.
            let outcome = if stopped {
                Progress::Gone
            } else if now >= pending[i].deadline {
                log::info!("{}: no handshake within the connect timeout", pending[i].peer);
                Progress::Gone
            } else if revents != 0 {
                pending[i].progress(&transport)
            } else {
                Progress::Keep
            };
            match outcome {
                Progress::Keep => {}
                Progress::Gone => drop(pending.swap_remove(i)),
                Progress::Admit(hello, session) => {
                    let p = pending.swap_remove(i);
                    spawn_handshake(&core, &conns, &accepted, &shutdown, &handshakes, p, *hello, session);
                }
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        for _ in 0..ACCEPTS_PER_PASS {
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("accept on the control listener failed: {e}");
                    break;
                }
            };
            crate::threads::point(ThreadKind::Accept);
            if accepted.stopped.load(Ordering::Acquire) {
                log::info!("refusing {peer}: accepting was stopped");
                continue;
            }
            if pending.len() + handshakes.load(Ordering::Acquire) >= MAX_PENDING_HANDSHAKES {
                log::warn!("refusing {peer}: {MAX_PENDING_HANDSHAKES} handshakes already in progress");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("refusing {peer}: {e}");
                continue;
            }
            let deadline = Instant::now() + core.config.connect_timeout;
            pending.push(Pending::new(stream, peer, deadline, core.auth_key()));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_handshake(
    core: &Arc<EngineCore>,
    conns: &Arc<ConnList>,
    accepted: &Arc<AcceptQueue>,
    shutdown: &Arc<AtomicBool>,
    handshakes: &Arc<AtomicUsize>,
    admitted: Pending,
    hello: Hello,
    session: Option<Session>,
) {
    let peer = admitted.peer;
    handshakes.fetch_add(1, Ordering::AcqRel);
    let in_progress = handshakes.clone();
    let (core, conns, accepted, shutdown) = (core.clone(), conns.clone(), accepted.clone(), shutdown.clone());
    // The peer sees its connection drop as the thread unwinds; our `accept` learns of it here.
    let failing = accepted.clone();
    let spawned = spawn_contained(
        std::thread::Builder::new().name("uccl-handshake".into()).stack_size(HANDSHAKE_STACK),
        ThreadKind::Handshake,
        move |err| failing.push(Err(err.context(format!("handshake with {peer}")))),
        move || {
            let _done = DecrementOnDrop(in_progress);
            match serve_admitted(&core, admitted, hello, session) {
                Ok(conn) if !shutdown.load(Ordering::Acquire) && !accepted.stopped.load(Ordering::Acquire) => {
                    match conns.add(conn.clone()) {
                        Ok(()) => {
                            core.waker.wake();
                            accepted.push(Ok(conn));
                        }
                        Err(e) => {
                            conn.close();
                            log::warn!("handshake with {peer} finished after the engine failed: {e}");
                        }
                    }
                }
                Ok(conn) => conn.close(),
                Err(e) => log::error!("handshake with {peer} failed: {e}"),
            }
        },
    );
    if let Err(e) = spawned {
        handshakes.fetch_sub(1, Ordering::AcqRel);
        log::error!("cannot spawn a handshake thread for {peer}: {e}");
    }
}

struct DecrementOnDrop(Arc<AtomicUsize>);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The acceptor's side once the peer was admitted: its listens, Welcome, the channels.
fn serve_admitted(
    core: &Arc<EngineCore>,
    admitted: Pending,
    hello: Hello,
    session: Option<Session>,
) -> Result<Arc<Connection>> {
    let Pending { mut stream, peer, deadline, out, .. } = admitted;
    stream.set_nonblocking(false).map_err(|e| Error::io("control stream", e))?;
    prepare_control(&stream, deadline, core.config.timeout)?;
    // Whatever of an answer the socket had not taken yet (it always has, in practice: a few dozen bytes).
    stream.write_all(&out).map_err(|e| Error::io("handshake write", e))?;
    let local = handshake::Local::of(core);
    // The Hello says where the peer runs, so the first listen is already on its route's transport.
    let listened = handshake::accepted_routing(&local, &hello).and_then(|routing| {
        core.gpu.before_comms(&*routing.net)?;
        Ok((super::establish::Listens::first(&*routing.net)?, routing))
    });
    let (mut listens, routing) = listened.map_err(|e| handshake::refuse(&mut stream, e))?;
    let mut agreed = handshake::welcome(&mut stream, &local, &mut listens, hello, routing)?;
    if let Some(s) = &session {
        agreed.nonce = s.channel_nonce();
    }
    core.routes.log_choice(peer, agreed.route, agreed.link.locality);
    dial::confine(&*agreed.net, &mut agreed.peer_handles, peer.ip(), &core.config.allow_dial)?;
    crate::threads::point(ThreadKind::Handshake);
    let channels = handshake::establish_channels(&local, &mut listens, &agreed, deadline, &mut stream)
        .map_err(|e| handshake::refuse(&mut stream, e))?;
    let chunking = agreed.chunking();
    let renewal = handshake::renewal(core, &agreed);
    let info = PeerInfo {
        addr: peer,
        gpu_index: agreed.peer_gpu_index,
        gpu_id: agreed.peer_gpu_id,
        locality: agreed.link.locality,
        channels: agreed.net.caps().name,
    };
    let binding = session.map(|s| s.token_binding());
    let reach = Reach::of(core.gpu.bound_by(&*agreed.net), &*agreed.net);
    Connection::start(core.clone(), stream, info, channels, chunking, agreed.link, binding, reach, renewal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::auth::MIN_KEY_LEN;
    use crate::proto::{AuthHello, AuthProof};

    fn hello(transport: &str) -> Hello {
        Hello {
            version: crate::proto::PROTOCOL_VERSION,
            capabilities: 0,
            nonce: 1,
            num_channels: 1,
            chunk_size: 4096,
            gpu_index: 0,
            gpu_id: "0".into(),
            requested_gpu: "0".into(),
            transport: transport.into(),
            net_handle: [0; 128],
            host: Default::default(),
        }
    }

    fn key(b: u8) -> Arc<AuthKey> {
        Arc::new(AuthKey::new(&[b; MIN_KEY_LEN]).unwrap())
    }

    fn step(gate: &mut Gate, msg: Handshake) -> Verdict {
        gate.on_frame(Ok(msg), "socket", || Ok([7; 32]))
    }

    fn refused_with(v: Verdict, status: UcclStatus, needle: &str) {
        match v {
            Verdict::Refuse(e) => {
                assert_eq!(e.status(), status, "{e}");
                assert!(e.message().contains(needle), "{e}");
            }
            other => panic!("expected a refusal naming {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn without_a_key_a_servable_hello_is_admitted_and_the_rest_turned_away() {
        assert!(matches!(step(&mut Gate::new(None), Handshake::Hello(hello("socket"))), Verdict::Admit(_, None)));
        refused_with(step(&mut Gate::new(None), Handshake::Hello(hello("tcpx"))), UcclStatus::ErrNotSupported, "tcpx");
        let auth = Handshake::AuthHello(AuthHello { challenge: [1; 32] });
        refused_with(step(&mut Gate::new(None), auth), UcclStatus::ErrNotAllowed, "holds a key and this engine none");
        let version =
            Gate::new(None).on_frame(Err(ProtoError::VersionMismatch { ours: 6, theirs: 9 }), "socket", || {
                unreachable!("no challenge without a key")
            });
        refused_with(version, UcclStatus::ErrNotSupported, "version");
        let garbage = Gate::new(None).on_frame(Err(ProtoError::BadMagic { found: 1 }), "socket", || unreachable!());
        assert!(matches!(garbage, Verdict::Close(_)));
        let proof = Handshake::AuthProof(AuthProof { proof: [0; 32] });
        assert!(matches!(step(&mut Gate::new(None), proof), Verdict::Close(_)));
        // A connector that failed before its Hello (its own listen, say) says why.
        let refuse = Handshake::Refuse(Refuse { status: -3, reason: "net plugin listen failed".into() });
        match step(&mut Gate::new(None), refuse) {
            Verdict::Close(e) => assert_eq!(e.message(), "peer refused the connection: net plugin listen failed"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn with_a_key_only_a_proven_peer_gets_its_hello_read() {
        let k = key(3);
        refused_with(
            step(&mut Gate::new(Some(k.clone())), Handshake::Hello(hello("socket"))),
            UcclStatus::ErrNotAllowed,
            "requires a key and the peer has none",
        );
        let ours = [1u8; 32];
        let mut gate = Gate::new(Some(k.clone()));
        let Verdict::Answer(answer) = step(&mut gate, Handshake::AuthHello(AuthHello { challenge: ours })) else {
            panic!("no answer");
        };
        let Handshake::AuthChallenge(c) = *answer else { panic!("no challenge: {answer:?}") };
        assert_eq!(c.challenge, [7; 32], "the challenge drawn for this connection");
        assert!(k.acceptor_proof_ok(&ours, &c.challenge, &c.proof));
        // Nothing but a proof is taken now, a Hello least of all.
        let mut skipping = Gate::new(Some(k.clone()));
        step(&mut skipping, Handshake::AuthHello(AuthHello { challenge: ours }));
        assert!(matches!(step(&mut skipping, Handshake::Hello(hello("socket"))), Verdict::Close(_)));
        // A proof made with another key, or the acceptor's own proof sent back, is refused.
        for proof in [key(4).connector_proof(&ours, &c.challenge), c.proof] {
            let mut g = Gate::new(Some(k.clone()));
            step(&mut g, Handshake::AuthHello(AuthHello { challenge: ours }));
            refused_with(step(&mut g, Handshake::AuthProof(AuthProof { proof })), UcclStatus::ErrNotAllowed, "proof");
        }
        let proof = k.connector_proof(&ours, &c.challenge);
        assert!(matches!(step(&mut gate, Handshake::AuthProof(AuthProof { proof })), Verdict::Wait));
        match step(&mut gate, Handshake::Hello(hello("socket"))) {
            Verdict::Admit(h, Some(session)) => {
                assert_eq!(h.transport, "socket");
                let connector = k.session(&ours, &c.challenge);
                assert_eq!(session.channel_nonce(), connector.channel_nonce(), "both ends share the secret");
            }
            other => panic!("expected the Hello admitted with a session, got {other:?}"),
        }
    }
}
