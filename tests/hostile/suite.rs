use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uccl_tcpx::internal::proto::auth::Session;
use uccl_tcpx::internal::proto::control::decode_frame;
use uccl_tcpx::internal::proto::{
    AuthHello, AuthProof, ChannelHello, Control, FrameHeader, Handshake, Hello, HostIdentity, Refuse, RemoteSeg,
};
use uccl_tcpx::{AuthKey, Config, Connection, Engine, OneSided, SocketConfig, UcclStatus};

use super::AUTH_KEY;
use crate::common::{self, PATIENCE, Pair, Rng, accept, pattern, threads, threads_settle, wait};

/// Bound on connection setup for the engines under attack: abandoned handshakes end this quickly.
const SETUP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long past `SETUP_TIMEOUT` the tests wait for an engine to drop a connection it gave up on:
/// only a bound on a hang, which a loaded host must not reach.
const SLACK: Duration = PATIENCE;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key of the engines under attack, when this suite runs with authentication on.
fn key() -> Option<AuthKey> {
    AUTH_KEY.map(|k| AuthKey::new(k).unwrap())
}

fn config() -> Config {
    Config {
        auth_key: key(),
        num_channels: Some(2),
        chunk_size: 128 << 10,
        connect_timeout: SETUP_TIMEOUT,
        socket: SocketConfig { nthreads: 1, nsocks_per_thread: 1, ..SocketConfig::default() },
        ..common::loopback()
    }
}

fn pair() -> Pair {
    pair_with(config())
}

fn pair_with(config: Config) -> Pair {
    // Errors only (unless UCCL_TCPX_LOG says otherwise): an engine-side failure shows up in the output.
    uccl_tcpx::init_logging();
    let p = common::pair(config);
    // Every thread the pair runs exists once a transfer went each way, so a thread count taken
    // after this is a steady baseline.
    assert_pair_works(&p, 0);
    p
}

/// A hand-driven peer (no stray data connections) and the connection engine `b` accepted for it.
fn fake_peer(p: &Pair) -> (FakePeer, Arc<Connection>) {
    let fake = FakePeer::connect(p.b.address(), Stray::None).unwrap();
    (fake, accept(&p.b).unwrap())
}

/// A write, a read and a send/receive between the two real engines, each checked by content.
fn assert_pair_works(p: &Pair, seed: u64) {
    let len = 200_000;
    let src = pattern(len, seed);
    let mut target = vec![0u8; len];
    let mut back = vec![0u8; len];
    let smr = p.a.register(src.as_ptr() as usize, len).unwrap();
    let bmr = p.a.register(back.as_mut_ptr() as usize, len).unwrap();
    let tmr = p.b.register(target.as_mut_ptr() as usize, len).unwrap();
    let item = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, len).unwrap();
    let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote: item }]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), len as u64);
    assert!(target == src, "write delivered the wrong bytes");
    let r = p.ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote: item }]).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), len as u64);
    assert!(back == src, "read returned the wrong bytes");
    target.fill(0);
    let rid = p.ba.recv(tmr, target.as_mut_ptr() as usize, len).unwrap();
    let sid = p.ab.send(&[(smr, src.as_ptr() as usize, len)]).unwrap();
    assert_eq!(wait(&p.ab, sid).unwrap(), len as u64);
    assert_eq!(wait(&p.ba, rid).unwrap(), len as u64);
    assert!(target == src, "send delivered the wrong bytes");
    for (e, mr) in [(&p.a, smr), (&p.a, bmr), (&p.b, tmr)] {
        e.deregister(mr).unwrap();
    }
}

/// A new engine can still complete a handshake with `target` (its accept loop is alive).
fn assert_accepts_new_peers(target: &Arc<Engine>) {
    let probe = Engine::new(config()).unwrap();
    let conn = probe.connect("127.0.0.1", "0", target.address().port()).unwrap();
    let accepted = accept(target).unwrap();
    probe.close_connection(&conn);
    target.close_connection(&accepted);
}

/// What came back on a raw control connection before the engine closed it (or `limit` passed).
struct Reply {
    bytes: Vec<u8>,
    closed: bool,
    elapsed: Duration,
}

fn read_reply(stream: &mut TcpStream, limit: Duration) -> Reply {
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Reply { bytes, closed: false, elapsed: start.elapsed() };
        }
        stream.set_read_timeout(Some(left.min(Duration::from_millis(100)))).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Reply { bytes, closed: true, elapsed: start.elapsed() },
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return Reply { bytes, closed: true, elapsed: start.elapsed() },
        }
    }
}

/// Decodes the handshake frames in `bytes` (an engine answers one, then a Refuse if it gives up later).
fn handshakes_in(bytes: &[u8]) -> Vec<Handshake> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((head, body)) = rest.split_first_chunk::<8>() {
        let h = FrameHeader::parse(head).expect("the engine sent a malformed frame header");
        let len = h.body_len as usize;
        out.push(Handshake::decode(&h, &body[..len]).expect("the engine sent a malformed handshake"));
        rest = &body[len..];
    }
    out
}

fn encode(msg: &Handshake) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

/// The crate's protocol version (crate-private there); a wrong one fails every handshake below.
const PROTOCOL_VERSION: u16 = 27;

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        capabilities: 0,
        nonce: 0x1234_5678_9abc_def0,
        num_channels: 1,
        chunk_size: 128 << 10,
        gpu_index: 0,
        gpu_id: "0".into(),
        requested_gpu: "0".into(),
        transport: "socket".into(),
        net_handle: [0u8; 128],
        host: Default::default(),
    }
}

/// Sends `bytes` on a fresh control connection and returns what the engine answered before closing.
/// Write errors are expected: the engine may close before it has read everything.
fn probe(target: SocketAddr, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    read_reply(&mut s, SETUP_TIMEOUT + SLACK)
}

/// A control connection to `target` ready for a Hello: with a key, after the challenge-response (our
/// challenge all ones, the engine's checked), returning the session both ends now share.
fn open_control(target: SocketAddr) -> (TcpStream, Option<Session>) {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
    let Some(key) = key() else { return (s, None) };
    let ours = [1u8; 32];
    s.write_all(&encode(&Handshake::AuthHello(AuthHello { challenge: ours }))).unwrap();
    let head: [u8; 8] = read_exact_within(&mut s, 8, SETUP_TIMEOUT).unwrap().try_into().unwrap();
    let header = FrameHeader::parse(&head).unwrap();
    let body = read_exact_within(&mut s, header.body_len as usize, SETUP_TIMEOUT).unwrap();
    let Ok(Handshake::AuthChallenge(c)) = Handshake::decode(&header, &body) else { panic!("no AuthChallenge") };
    assert!(key.acceptor_proof_ok(&ours, &c.challenge, &c.proof), "the engine's proof");
    let proof = key.connector_proof(&ours, &c.challenge);
    s.write_all(&encode(&Handshake::AuthProof(AuthProof { proof }))).unwrap();
    (s, Some(key.session(&ours, &c.challenge)))
}

/// Like `probe`, after the challenge-response when the suite runs with a key.
fn probe_admitted(target: SocketAddr, bytes: &[u8]) -> Reply {
    let (mut s, _) = open_control(target);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    read_reply(&mut s, SETUP_TIMEOUT + SLACK)
}

#[test]
fn garbage_on_the_control_port_is_dropped() {
    let _serial = serial();
    let p = pair();
    let target = p.b.address();
    let baseline = threads();
    let mut rng = Rng::new("garbage on the control port");
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("http request".into(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("tls client hello".into(), [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03].to_vec()),
        ("zeros".into(), vec![0; 64]),
        ("one byte".into(), vec![0x43]),
        ("1 MiB of noise".into(), rng.bytes(1 << 20)),
        ("control frame instead of Hello".into(), {
            let mut f = Vec::new();
            Control::Close.encode(&mut f);
            f
        }),
        ("Welcome instead of Hello".into(), {
            let h = hello();
            encode(&Handshake::Welcome(uccl_tcpx::internal::proto::Welcome {
                version: PROTOCOL_VERSION,
                capabilities: 0,
                num_channels: 1,
                chunk_size: 4096,
                gpu_index: 0,
                gpu_id: h.gpu_id,
                transport: h.transport,
                net_handle: h.net_handle,
                host: h.host,
            }))
        }),
        ("Refuse instead of Hello".into(), encode(&Handshake::Refuse(Refuse { status: -3, reason: "no".into() }))),
        (
            "Hello header with an oversized body length".into(),
            FrameHeader { kind: 1, body_len: 4097 }.to_bytes().to_vec(),
        ),
        ("Hello header, body never sent".into(), FrameHeader { kind: 1, body_len: 300 }.to_bytes().to_vec()),
        ("truncated Hello".into(), {
            let f = encode(&Handshake::Hello(hello()));
            f[..f.len() / 2].to_vec()
        }),
        ("Hello with trailing bytes in its body".into(), {
            let mut f = encode(&Handshake::Hello(hello()));
            f.push(0);
            let len = u32::from_le_bytes(f[4..8].try_into().unwrap()) + 1;
            f[4..8].copy_from_slice(&len.to_le_bytes());
            f
        }),
        ("Hello asking for 0 channels".into(), encode(&Handshake::Hello(Hello { num_channels: 0, ..hello() }))),
        ("Hello asking for 65 channels".into(), encode(&Handshake::Hello(Hello { num_channels: 65, ..hello() }))),
        ("Hello with chunk size 0".into(), encode(&Handshake::Hello(Hello { chunk_size: 0, ..hello() }))),
        ("Hello with invalid UTF-8 gpu id".into(), {
            let mut f = encode(&Handshake::Hello(Hello { gpu_id: "ab".into(), ..hello() }));
            // Header 8, then magic 4, version 2, caps 8, nonce 8, channels 2, chunk 4, gpu 4, len 2.
            f[8 + 34] = 0xff;
            f
        }),
        (
            "Hello with a garbage channel handle".into(),
            encode(&Handshake::Hello(Hello { net_handle: [0xa5; 128], ..hello() })),
        ),
    ];
    for i in 0..40 {
        let len = 1 + rng.below(600);
        let mut bytes = rng.bytes(len);
        if i % 2 == 0 {
            // Valid frame magic so the kind and length checks are reached.
            bytes[..2.min(len)].copy_from_slice(&[0x43, 0x54][..2.min(len)]);
        }
        cases.push((format!("random {len} bytes #{i}"), bytes));
    }
    let total = cases.len();
    // Probe all at once (the slow ones wait for the setup timeout); each answer is checked on its own.
    for batch in cases.chunks(64) {
        let handles: Vec<_> = batch
            .iter()
            .cloned()
            .map(|(name, bytes)| std::thread::spawn(move || (name, probe(target, &bytes))))
            .collect();
        for h in handles {
            let (name, reply) = h.join().unwrap();
            assert!(reply.closed, "{name}: the engine kept the connection open for {:?}", reply.elapsed);
            for msg in handshakes_in(&reply.bytes) {
                // A garbage channel handle passes the handshake (the Welcome) and fails the channel setup.
                let welcome_ok = name.contains("garbage channel handle") && matches!(msg, Handshake::Welcome(_));
                assert!(matches!(msg, Handshake::Refuse(_)) || welcome_ok, "{name}: answered {msg:?}");
            }
        }
    }
    eprintln!("{total} garbage connections dropped");
    assert_pair_works(&p, 1);
    assert_accepts_new_peers(&p.b);
    threads_settle(baseline, SLACK);
}

#[test]
fn other_protocol_versions_are_refused_with_a_reason() {
    let _serial = serial();
    let p = pair();
    for version in (0..PROTOCOL_VERSION).chain([PROTOCOL_VERSION + 1, 0x100, u16::MAX]) {
        // A full Hello of another version, and only magic + version as a future peer might send.
        let full = encode(&Handshake::Hello(Hello { version, ..hello() }));
        let mut short = FrameHeader { kind: 1, body_len: 6 }.to_bytes().to_vec();
        short.extend_from_slice(&full[8..12]);
        short.extend_from_slice(&version.to_le_bytes());
        for bytes in [full, short] {
            let reply = probe(p.b.address(), &bytes);
            assert!(reply.closed, "version {version}: connection left open");
            match handshakes_in(&reply.bytes).as_slice() {
                [Handshake::Refuse(r)] => {
                    assert_eq!(r.status, UcclStatus::ErrNotSupported as i32, "version {version}");
                    assert!(r.reason.contains("version"), "version {version}: {}", r.reason);
                }
                other => panic!("version {version}: expected one Refuse, got {other:?}"),
            }
        }
    }
    assert_pair_works(&p, 2);
    assert_accepts_new_peers(&p.b);
}

#[test]
fn unknown_transports_are_refused_with_a_reason_and_gpu_names_are_advisory() {
    let _serial = serial();
    let p = pair();
    let cases = [
        (Hello { transport: "tcpx".into(), ..hello() }, UcclStatus::ErrNotSupported, "tcpx"),
        (Hello { transport: String::new(), ..hello() }, UcclStatus::ErrNotSupported, "transport"),
        (Hello { transport: "SOCKET".into(), ..hello() }, UcclStatus::ErrNotSupported, "SOCKET"),
        (Hello { transport: "s".repeat(32), ..hello() }, UcclStatus::ErrNotSupported, "transport"),
    ];
    for (h, status, needle) in cases {
        let what = format!("transport {:?} gpu {:?}", h.transport, h.requested_gpu);
        let reply = probe_admitted(p.b.address(), &encode(&Handshake::Hello(h)));
        assert!(reply.closed, "{what}: connection left open");
        match handshakes_in(&reply.bytes).as_slice() {
            [Handshake::Refuse(r)] => {
                assert_eq!(r.status, status as i32, "{what}: {r:?}");
                assert!(r.reason.contains(needle), "{what}: reason {:?}", r.reason);
            }
            other => panic!("{what}: expected one Refuse, got {other:?}"),
        }
    }
    // A GPU name from metadata taken before the engine knew its GPU, or any other, is welcomed:
    // the engine serves its own GPU. (Our handle leads nowhere, so channel setup then fails, and
    // the engine says why before it closes.)
    for requested_gpu in ["7", "0000:ff:00.0", ""] {
        let hello = Hello { requested_gpu: requested_gpu.into(), ..hello() };
        let reply = probe_admitted(p.b.address(), &encode(&Handshake::Hello(hello)));
        assert!(reply.closed, "GPU {requested_gpu:?}: connection left open");
        match handshakes_in(&reply.bytes).as_slice() {
            [Handshake::Welcome(w), Handshake::Refuse(r)] => {
                assert_eq!((w.gpu_index, w.gpu_id.as_str()), (0, "0"), "GPU {requested_gpu:?}");
                assert!(!r.reason.contains("GPU"), "GPU {requested_gpu:?}: refused for its GPU: {}", r.reason);
            }
            other => panic!("GPU {requested_gpu:?}: expected a Welcome, then a Refuse, got {other:?}"),
        }
    }
    assert_pair_works(&p, 3);
}

#[test]
fn silent_and_stalled_connections_time_out_while_the_engine_keeps_serving() {
    let _serial = serial();
    let p = pair();
    let baseline = threads();
    let target = p.b.address();
    // Before the first connect: the engine's clock for each of them cannot start earlier.
    let started = Instant::now();
    let mut silent = TcpStream::connect(target).unwrap();
    let mut half_header = TcpStream::connect(target).unwrap();
    half_header.write_all(&[0x43, 0x54, 1]).unwrap();
    let mut half_body = TcpStream::connect(target).unwrap();
    let hello_frame = encode(&Handshake::Hello(hello()));
    half_body.write_all(&hello_frame[..20]).unwrap();
    // While those sit there, the real connection works and new peers are accepted.
    assert_pair_works(&p, 4);
    assert_accepts_new_peers(&p.b);
    for (name, s) in [("silent", &mut silent), ("half header", &mut half_header), ("half body", &mut half_body)] {
        let reply = read_reply(s, SETUP_TIMEOUT + SLACK);
        assert!(reply.closed, "{name}: still open after {:?}", started.elapsed());
        assert!(reply.bytes.is_empty(), "{name}: the engine answered {:?}", reply.bytes);
        assert!(started.elapsed() >= SETUP_TIMEOUT - Duration::from_millis(100), "{name}: dropped before the timeout");
    }
    eprintln!("stalled handshakes dropped after {:?}", started.elapsed());
    threads_settle(baseline, SLACK);
    assert_pair_works(&p, 5);
}

#[test]
fn two_hundred_connections_opened_and_dropped() {
    let _serial = serial();
    let p = pair();
    let baseline = threads();
    let target = p.b.address();
    let start = Instant::now();
    for i in 0..200 {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        match i % 4 {
            0 => {}
            1 => {
                let _ = s.write_all(&[0x43]);
            }
            2 => {
                let _ = s.write_all(&encode(&Handshake::Hello(hello()))[..30]);
            }
            _ => {
                // Reset instead of FIN.
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            }
        }
        drop(s);
    }
    eprintln!("200 connections opened and dropped in {:?}", start.elapsed());
    assert_pair_works(&p, 6);
    assert_accepts_new_peers(&p.b);
    threads_settle(baseline, SLACK);
}

/// The handshake timeout of the engine the silent flood targets: long enough that a loaded machine
/// opens all 200 connections, probes the engine with a real peer and counts its threads before the
/// first of them time out.
const FLOOD_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn two_hundred_silent_connections_held_at_once() {
    let _serial = serial();
    let p = pair_with(Config { connect_timeout: FLOOD_SETUP_TIMEOUT, ..config() });
    let baseline = (threads(), common::listening_sockets());
    let target = p.b.address();
    let opened = Instant::now();
    let held: Vec<TcpStream> =
        (0..200).map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap()).collect();
    eprintln!("200 silent connections opened in {:?}", opened.elapsed());
    // A real peer still gets through while all of them wait for their Hello, which costs no thread
    // and no listener: they wait in the accept loop.
    assert_accepts_new_peers(&p.b);
    assert_pair_works(&p, 7);
    // The probe's connection leaves threads that end on their own soon after it closed (a control
    // reactor thread at its next look at its inbox), which a loaded host may delay: wait for them,
    // but only while all 200 still wait for their Hello, so that a thread or listener kept per
    // pending connection still shows.
    let pending = FLOOD_SETUP_TIMEOUT.saturating_sub(opened.elapsed());
    let settled = |(threads, listening): (usize, usize)| threads <= baseline.0 && listening == baseline.1;
    let now = testkit::poll::poll(pending, || Some((threads(), common::listening_sockets())).filter(|&n| settled(n)))
        .unwrap_or_else(|| (threads(), common::listening_sockets()));
    assert!(settled(now), "(threads, listening sockets) with 200 connections pending: {now:?}, {baseline:?} before");
    // Counted while all 200 were pending: none is closed even now (the engine closes one at its
    // handshake timeout, which a host loaded enough to open them slowly may have let pass).
    for (i, s) in held.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let pending = matches!((&*s).read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
        assert!(pending, "silent connection {i} was dropped before the count: counted too late to tell");
        s.set_nonblocking(false).unwrap();
    }
    for mut s in held {
        let reply = read_reply(&mut s, FLOOD_SETUP_TIMEOUT + SLACK);
        assert!(reply.closed && reply.bytes.is_empty());
    }
    threads_settle(baseline.0, SLACK);
}

/// Nothing is spent on a peer before its Hello (and, with a key, its proof) checked out: silent,
/// garbled, refused and (with a key) unauthenticated connections cost no thread, no listener and
/// no dial, however long they stay. Each is answered or dropped by the accept loop itself.
#[test]
fn peers_turned_away_cost_no_thread_listener_or_dial() {
    let _serial = serial();
    let p = pair_with(Config { connect_timeout: FLOOD_SETUP_TIMEOUT, ..config() });
    let decoy = TcpListener::bind("127.0.0.1:0").unwrap();
    decoy.set_nonblocking(true).unwrap();
    let baseline = (threads(), common::listening_sockets());
    let target = p.b.address();
    let named = Hello { net_handle: socket_handle(decoy.local_addr().unwrap(), 7), ..hello() };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("silent", vec![]),
        ("half a Hello", encode(&Handshake::Hello(named.clone()))[..30].to_vec()),
        ("garbage", vec![0xee; 64]),
        ("a control frame first", {
            let mut f = Vec::new();
            Control::Close.encode(&mut f);
            f
        }),
    ];
    let hello_named = encode(&Handshake::Hello(named));
    let challenge = encode(&Handshake::AuthHello(AuthHello { challenge: [3; 32] }));
    let forged = encode(&Handshake::AuthProof(AuthProof { proof: [4; 32] }));
    match key() {
        Some(_) => {
            // No key at all; a forged proof after a real challenge; a proof that skips the challenge.
            cases.push(("a Hello without the key", hello_named.clone()));
            cases.push(("a forged proof", [challenge.clone(), forged.clone(), hello_named.clone()].concat()));
            cases.push(("a proof without a challenge", [forged, hello_named].concat()));
        }
        None => {
            cases.push((
                "a Hello of another transport",
                encode(&Handshake::Hello(Hello { transport: "tcpx".into(), ..hello() })),
            ));
            cases.push(("a challenge to an engine without a key", [challenge, hello_named].concat()));
        }
    }
    let mut held = Vec::new();
    for (name, bytes) in &cases {
        for _ in 0..10 {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            s.write_all(bytes).unwrap();
            held.push((*name, s));
        }
    }
    // Give the engine time to act on every one of them, then look.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((threads(), common::listening_sockets()), baseline, "(threads, listening sockets)");
    assert!(accepted(&decoy).is_none(), "the engine dialed for a peer it should have turned away");
    for (name, mut s) in held {
        let reply = read_reply(&mut s, FLOOD_SETUP_TIMEOUT + SLACK);
        assert!(reply.closed, "{name}: left open");
        for msg in handshakes_in(&reply.bytes) {
            let auth_challenge = matches!(msg, Handshake::AuthChallenge(_)) && name == "a forged proof";
            assert!(matches!(msg, Handshake::Refuse(_)) || auth_challenge, "{name}: answered {msg:?}");
        }
        if name.contains("without the key") || name.contains("forged") || name.contains("without a key") {
            let refusal = handshakes_in(&reply.bytes).into_iter().find_map(|m| match m {
                Handshake::Refuse(r) => Some(r),
                _ => None,
            });
            let r = refusal.unwrap_or_else(|| panic!("{name}: no Refuse"));
            assert_eq!(r.status, UcclStatus::ErrNotAllowed as i32, "{name}: {r:?}");
            assert!(r.reason.contains("authentication failed"), "{name}: {r:?}");
        }
    }
    assert!(accepted(&decoy).is_none(), "the engine dialed for a peer it turned away");
    assert_pair_works(&p, 8);
    threads_settle(baseline.0, SLACK);
}

// ---------------------------------------------------------------------------------------------
// A scripted peer that completes the handshake itself, then misbehaves. It speaks the socket
// transport's wire format, which is private to the crate: it mirrors `SocketHandle` in
// src/transport/socket/mod.rs and the data socket hello and piece header in
// src/transport/socket/pure/wire.rs, with one data socket per comm (so every message is one piece,
// in order).

const HANDLE_MAGIC: u32 = 0x4B53_5455;
const STREAM_HELLO_MAGIC: u32 = 0x5353_5455;
const PIECE_MAGIC: u32 = 0x4350_5455;
const HELLO_LEN: usize = 32;
const PIECE_HEADER_LEN: usize = 32;

fn socket_handle(addr: SocketAddr, nonce: u64) -> [u8; 128] {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only") };
    let mut h = [0u8; 128];
    h[0..4].copy_from_slice(&HANDLE_MAGIC.to_le_bytes());
    h[4] = 4;
    h[6..8].copy_from_slice(&v4.port().to_le_bytes());
    h[8..12].copy_from_slice(&v4.ip().octets());
    h[24..32].copy_from_slice(&nonce.to_le_bytes());
    h
}

fn parse_socket_handle(h: &[u8; 128]) -> (SocketAddr, u64) {
    assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), HANDLE_MAGIC);
    assert_eq!(h[4], 4);
    let port = u16::from_le_bytes([h[6], h[7]]);
    let ip = Ipv4Addr::new(h[8], h[9], h[10], h[11]);
    (SocketAddr::from((ip, port)), u64::from_le_bytes(h[24..32].try_into().unwrap()))
}

/// The hello of socket 0 of a one-socket comm; the comm id is what the engine's side picks at random.
fn stream_hello(nonce: u64, comm_id: u64) -> Vec<u8> {
    let mut b = STREAM_HELLO_MAGIC.to_le_bytes().to_vec();
    // The data socket wire's version (`VERSION` in wire.rs).
    b.extend_from_slice(&6u16.to_le_bytes());
    b.extend_from_slice(&[0, 1]);
    b.extend_from_slice(&nonce.to_le_bytes());
    b.extend_from_slice(&comm_id.to_le_bytes());
    b.extend_from_slice(&(256u32 << 10).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// Message `seq` of a comm as one piece (on one socket, a message of up to 256 KiB is one piece).
fn message(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = PIECE_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn read_exact_within(s: &mut TcpStream, n: usize, limit: Duration) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(limit))?;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// What the fake peer does on the engine's data port before opening its real channel.
#[derive(Clone, Copy)]
enum Stray {
    None,
    /// A connection that sends a hello's worth of wrong bytes.
    Garbage,
    /// A connection that sends nothing at all.
    Silent,
}

struct FakePeer {
    control: TcpStream,
    /// Our send direction (fake -> engine), channel 0.
    tx: TcpStream,
    /// The engine's send direction (engine -> fake), channel 0.
    rx: TcpStream,
    inbox: Vec<u8>,
    _stray: Option<TcpStream>,
    /// Number of the next message on `tx`.
    tx_seq: u64,
    /// What the handshake's challenge-response established, when the engine has a key.
    session: Option<Session>,
}

impl FakePeer {
    /// Runs the connector's side of the handshake with one channel against `target`.
    fn connect(target: SocketAddr, stray: Stray) -> std::io::Result<FakePeer> {
        FakePeer::connect_as(target, stray, HostIdentity::default())
    }

    /// The same, announcing `host` as its host identity (another host's, or none, by default).
    fn connect_as(target: SocketAddr, stray: Stray, host: HostIdentity) -> std::io::Result<FakePeer> {
        let limit = SETUP_TIMEOUT + SLACK;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let our_handle_nonce = 0x5eed_0000_0000_0001;
        let session_nonce = 0x5eed_0000_0000_0002;
        let (mut control, session) = open_control(target);
        // An authenticated connection's channel hellos carry a nonce derived from its secret.
        let channel_nonce = session.as_ref().map_or(session_nonce, Session::channel_nonce);
        let h = Hello {
            nonce: session_nonce,
            net_handle: socket_handle(listener.local_addr()?, our_handle_nonce),
            host,
            ..hello()
        };
        control.write_all(&encode(&Handshake::Hello(h)))?;
        let head: [u8; 8] = read_exact_within(&mut control, 8, limit)?.try_into().unwrap();
        let header = FrameHeader::parse(&head).expect("engine header");
        let body = read_exact_within(&mut control, header.body_len as usize, limit)?;
        let Handshake::Welcome(w) = Handshake::decode(&header, &body).expect("engine handshake") else {
            return Err(std::io::Error::other("not welcomed"));
        };
        assert_eq!((w.num_channels, w.chunk_size), (1, 128 << 10));
        let (data_addr, their_handle_nonce) = parse_socket_handle(&w.net_handle);
        let stray = match stray {
            Stray::None => None,
            Stray::Garbage => {
                let mut s = TcpStream::connect(data_addr)?;
                s.write_all(&[0xee; HELLO_LEN])?;
                Some(s)
            }
            Stray::Silent => Some(TcpStream::connect(data_addr)?),
        };
        let mut tx = TcpStream::connect(data_addr)?;
        tx.write_all(&stream_hello(their_handle_nonce, 0x5eed_0000_0000_0003))?;
        tx.write_all(&message(0, &ChannelHello { channel: 0, nonce: channel_nonce }.to_bytes()))?;
        // The engine dials our handle for its send direction.
        listener.set_nonblocking(true)?;
        let mut rx = common::eventually("the engine dials our handle", limit, || match listener.accept() {
            Ok((s, _)) => Some(Ok(s)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e)),
        })?;
        rx.set_nonblocking(false)?;
        let their_hello = read_exact_within(&mut rx, HELLO_LEN, limit)?;
        let comm_id = u64::from_le_bytes(their_hello[16..24].try_into().unwrap());
        assert_eq!(their_hello, stream_hello(our_handle_nonce, comm_id));
        let ch = read_exact_within(&mut rx, PIECE_HEADER_LEN + 16, limit)?;
        let channel_hello = ChannelHello { channel: 0, nonce: channel_nonce };
        assert_eq!(ch, message(0, &channel_hello.to_bytes()));
        Ok(FakePeer { control, tx, rx, inbox: Vec::new(), _stray: stray, tx_seq: 1, session })
    }

    fn send(&mut self, msg: &Control) {
        let mut f = Vec::new();
        msg.encode(&mut f);
        self.control.write_all(&f).unwrap();
    }

    /// The next data message on our send direction.
    fn data(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.tx_seq += 1;
        self.tx.write_all(&message(self.tx_seq - 1, payload))
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.control.write_all(bytes);
    }

    /// The next control message from the engine, `None` once it closed the stream.
    fn recv(&mut self) -> Option<Control> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match decode_frame(&self.inbox).expect("the engine sent a malformed control frame") {
                Some((msg, used)) => {
                    self.inbox.drain(..used);
                    return Some(msg);
                }
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    assert!(!left.is_zero(), "no control message from the engine within {PATIENCE:?}");
                    self.control.set_read_timeout(Some(left)).unwrap();
                    let mut buf = [0u8; 4096];
                    match self.control.read(&mut buf) {
                        Ok(0) => return None,
                        Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                        Err(_) => return None,
                    }
                }
            }
        }
    }

    /// The engine closed the control stream (after a Close or nothing) within the bound.
    fn expect_closed(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            match self.recv() {
                None => return,
                Some(Control::Close) => {}
                Some(other) => panic!("expected the engine to close, got {other:?}"),
            }
        }
        panic!("the engine did not close the control stream");
    }
}

/// The fake peer's own happy path: the engine accepts it and moves verified data both ways, so the
/// failures provoked below come from the violations and not from a broken fake.
#[test]
fn fake_peer_happy_path_moves_data_both_ways() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    // fake -> engine: a two-sided send of 100 bytes.
    let mut dst = vec![0u8; 300];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, 200).unwrap();
    fake.send(&Control::SendAnnounce { xfer: 1, len: 100 });
    let Some(Control::Grant { xfer: 1, flow }) = fake.recv() else { panic!("no Grant") };
    fake.send(&Control::Data { flow, len: 100 });
    fake.data(&pattern(100, 9)).unwrap();
    assert_eq!(fake.recv(), Some(Control::Done { xfer: 1, len: 100 }));
    assert_eq!(wait(&conn, rid).unwrap(), 100);
    assert_eq!(&dst[..100], &pattern(100, 9)[..]);
    assert!(dst[100..].iter().all(|&b| b == 0));
    // fake -> engine: an inline send of 40 bytes lands in the next receive.
    let rid = conn.recv(dmr, dst.as_mut_ptr() as usize + 200, 100).unwrap();
    fake.send(&Control::InlineSend { xfer: 4, payload: pattern(40, 10) });
    assert_eq!(fake.recv(), Some(Control::Done { xfer: 4, len: 40 }));
    assert_eq!(wait(&conn, rid).unwrap(), 40);
    assert_eq!(&dst[200..240], &pattern(40, 10)[..]);
    assert!(dst[240..].iter().all(|&b| b == 0));
    // engine -> fake: a send of 50 bytes rides inline; one of 10000 is announced and streamed.
    let src = pattern(100_000, 3);
    let smr = p.b.register(src.as_ptr() as usize, src.len()).unwrap();
    let sid = conn.send(&[(smr, src.as_ptr() as usize, 50)]).unwrap();
    let Some(Control::InlineSend { xfer, payload }) = fake.recv() else { panic!("no InlineSend") };
    assert_eq!(payload, &src[..50]);
    fake.send(&Control::Done { xfer, len: 50 });
    assert_eq!(wait(&conn, sid).unwrap(), 50);
    let sid = conn.send(&[(smr, src.as_ptr() as usize, 100_000)]).unwrap();
    let Some(Control::SendAnnounce { xfer, len: 100_000 }) = fake.recv() else { panic!("no SendAnnounce") };
    fake.send(&Control::Grant { xfer, flow: 77 });
    assert_eq!(fake.recv(), Some(Control::Data { flow: 77, len: 100_000 }));
    let got = read_exact_within(&mut fake.rx, PIECE_HEADER_LEN + 100_000, Duration::from_secs(10)).unwrap();
    assert_eq!(got, message(1, &src));
    fake.send(&Control::Done { xfer, len: 100_000 });
    assert_eq!(wait(&conn, sid).unwrap(), 100_000);
    // A guessed one-sided request is denied, and the connection stays up. A write's bytes follow
    // its request unasked: they are taken into scratch memory, and the Deny comes after them.
    let guess = dst.as_ptr() as u64;
    let before = dst.clone();
    fake.send(&Control::WriteRequest { xfer: 2, region: dmr, token: 0, addr: guess, len: 8 });
    fake.data(&[0xee; 8]).unwrap();
    match fake.recv() {
        Some(Control::Deny { xfer: 2, status, .. }) => assert_eq!(status, UcclStatus::ErrNotAllowed as i32),
        other => panic!("expected a Deny, got {other:?}"),
    }
    assert!(dst == before, "a refused write's bytes landed");
    fake.send(&Control::ReadRequest { xfer: 3, region: dmr, token: 1, addr: guess, len: 8 });
    assert!(matches!(fake.recv(), Some(Control::Deny { xfer: 3, status: -6, .. })));
    fake.send(&Control::Notify { name: b"fake-peer".to_vec(), msg: b"still here".to_vec() });
    fake.send(&Control::Close);
    fake.expect_closed();
    assert_pair_works(&p, 8);
}

/// A peer that announces a write and then sends none of its chunks, with nothing else going on: the
/// engine's progress thread, parked without a timer while nothing was owed, starts watching when the
/// request makes the connection wait on the peer, and fails it at the stall timeout (the control
/// stream closes) while the engine keeps serving its other connection.
#[test]
fn a_peer_silent_after_a_write_request_is_cut_off_at_the_stall_timeout() {
    let _serial = serial();
    let timeout = Duration::from_secs(1);
    let p = pair_with(Config { timeout, ..config() });
    let (mut fake, _conn) = fake_peer(&p);
    let (_mem, start) = announce_unsent_write(&p, &mut fake);
    fake.expect_closed();
    let took = start.elapsed();
    // Not before the timeout (a loaded host only makes it later; `expect_closed` bounds the wait).
    assert!(took >= timeout, "cut off after {took:?}, before the stall timeout");
    assert_pair_works(&p, 16);
}

/// A peer that announces a write and then sends none of its chunks leaves the engine's receives
/// posted for good: with UCCL_TCPX_PROGRESS_POLL_US set, the progress thread polls for them only
/// until the bound has passed since it last woke, then parks while the stall timeout is still far.
/// The engine's count of its idle waits shows which it did: a loaded host changes how much CPU a
/// poll gets, not whether the thread polls or parks.
#[test]
fn chunks_that_never_complete_are_polled_for_only_up_to_the_bound() {
    let _serial = serial();
    // Long enough that the thread woken by the request is still within it when its idle passes
    // end, however loaded the host; the stall watch (a sixteenth of the timeout) wakes it no
    // sooner than the test ends.
    let bound = Duration::from_secs(1);
    let p = pair_with(Config { timeout: Duration::from_secs(600), progress_poll: bound, ..config() });
    let (mut fake, _conn) = fake_peer(&p);
    let before = p.b.idle_waits();
    let (_mem, _start) = announce_unsent_write(&p, &mut fake);
    // It polls for the receives, then parks past the bound with them still posted.
    let polling = common::eventually("the progress thread polls for the chunks", PATIENCE, || {
        Some(p.b.idle_waits()).filter(|w| w.polled > before.polled)
    });
    let parked = common::eventually("the progress thread parks past the bound", PATIENCE, || {
        Some(p.b.idle_waits()).filter(|w| w.parked > polling.parked)
    });
    // Parked, it polls no more.
    std::thread::sleep(Duration::from_millis(300));
    let later = p.b.idle_waits();
    eprintln!("receives outstanding: idle waits {before:?} before, {parked:?} once parked, {later:?} later");
    assert_eq!(later, parked, "the thread polled or woke again past the bound");
    fake.send(&Control::Close);
    fake.expect_closed();
    assert_pair_works(&p, 18);
}

/// A caller blocked on a read the peer never serves (woken by the transport in the progress
/// thread's place, or not) is released with a failure when the peer hangs up, and the engine
/// goes on serving its other connection.
#[test]
fn a_caller_waiting_on_an_unserved_read_is_released_when_the_peer_hangs_up() {
    let _serial = serial();
    for caller_completes in [false, true] {
        let p = pair_with(Config { caller_completes, ..config() });
        let (mut fake, conn) = fake_peer(&p);
        let mut dst = vec![0u8; 1 << 20];
        let mr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        // Any capability does: the fake takes the request and never answers it.
        let remote = p.b.prepare_fifo(mr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let id = conn.read(&[OneSided { mr, addr: dst.as_mut_ptr() as usize, len: dst.len(), remote }]).unwrap();
        assert!(matches!(fake.recv(), Some(Control::ReadRequest { .. })));
        let waiter = testkit::threads::spawn_blocked("Connection::wait", move || conn.wait(id));
        drop(fake);
        // Released by the hang-up, not by the stall timeout (which fails it as a timeout).
        let outcome = testkit::within(PATIENCE, "the wait released by the hang-up", move || waiter.join().unwrap());
        let err = outcome.expect_err("the read cannot have succeeded");
        assert_ne!(err.status(), UcclStatus::ErrTimeout, "caller_completes {caller_completes}: {err}");
        assert_pair_works(&p, 17);
    }
}

/// What a one-sided request carries for a region's token on `fake`'s connection: the token itself
/// without a key, its binding to this connection with one.
/// Registers 1 MiB at b, lets its engine park with nothing owed, then has `fake` announce a write of
/// all of it and send none of its chunks; returns the memory (registered while it lives) and when
/// the announcement went.
fn announce_unsent_write(p: &Pair, fake: &mut FakePeer) -> (Vec<u8>, Instant) {
    let mut mem = vec![0u8; 1 << 20];
    let mr = p.b.register(mem.as_mut_ptr() as usize, mem.len()).unwrap();
    let item = p.b.prepare_fifo(mr, mem.as_mut_ptr() as usize, mem.len()).unwrap();
    let cap = item.capability().unwrap();
    let token = wire_token(fake, cap.region, cap.token);
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    fake.send(&Control::WriteRequest { xfer: 1, region: cap.region, token, addr: item.addr, len: 1 << 20 });
    (mem, start)
}

fn wire_token(fake: &FakePeer, region: u64, token: u64) -> u64 {
    fake.session.as_ref().map_or(token, |s| s.token_binding().bind(region, token))
}

/// A request seen on one connection, replayed byte for byte from another: with a key the value it
/// carries is bound to the first connection and the replay is refused (as is the bare token);
/// without one a capability is a bearer token and the replay is served.
#[test]
fn a_request_replayed_from_another_connection_is_refused_only_with_a_key() {
    let _serial = serial();
    let p = pair();
    let (mut x, _x_conn) = fake_peer(&p);
    let (mut y, _y_conn) = fake_peer(&p);
    let secret = pattern(64, 21);
    let mr = p.b.register(secret.as_ptr() as usize, secret.len()).unwrap();
    let item = p.b.prepare_fifo(mr, secret.as_ptr() as usize, secret.len()).unwrap();
    let cap = item.capability().unwrap();
    let request = |xfer, token| Control::ReadSmall { xfer, region: cap.region, token, addr: item.addr, len: 16 };
    let seen = request(1, wire_token(&x, cap.region, cap.token));
    x.send(&seen);
    assert_eq!(x.recv(), Some(Control::ReadData { xfer: 1, payload: secret[..16].to_vec() }), "the original");
    y.send(&seen);
    let replay = y.recv();
    y.send(&request(2, cap.token));
    let bare = y.recv();
    match key() {
        Some(_) => {
            for (what, answer) in [("the replay", replay), ("the bare token", bare)] {
                match answer {
                    Some(Control::Deny { xfer: _, status, reason }) => {
                        assert_eq!(status, UcclStatus::ErrNotAllowed as i32, "{what}");
                        assert!(!reason.contains(&cap.token.to_string()), "{what}: the refusal names the token");
                    }
                    other => panic!("{what} was served from another connection: {other:?}"),
                }
            }
        }
        None => {
            assert_eq!(replay, Some(Control::ReadData { xfer: 1, payload: secret[..16].to_vec() }));
            assert_eq!(bare, Some(Control::ReadData { xfer: 2, payload: secret[..16].to_vec() }));
        }
    }
    p.b.deregister(mr).unwrap();
    assert_pair_works(&p, 17);
}

/// A peer's vector requests: one segment outside the advertised window refuses the whole request
/// (nothing is written or read), a good one is answered as one flow, and with a peer that does not
/// take spanning chunks (capability bit 0 clear, as here) that flow is cut within each segment.
#[test]
fn vector_requests_are_authorized_whole_and_cut_per_segment_for_a_peer_without_spanning() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let mut mem = pattern(64 << 10, 12);
    let before = mem.clone();
    let mr = p.b.register(mem.as_mut_ptr() as usize, mem.len()).unwrap();
    let fifo = p.b.prepare_fifo(mr, mem.as_mut_ptr() as usize, 32 << 10).unwrap();
    let cap = fifo.capability().unwrap();
    let token = wire_token(&fake, cap.region, cap.token);
    let base = fifo.addr;
    let seg = |off: u64, len: u32| RemoteSeg { addr: base + off, len };
    let outside = vec![seg(0, 100), seg(1000, 200), seg((32 << 10) - 50, 100)];
    for (xfer, msg) in [
        (10, Control::WriteVector { xfer: 10, region: cap.region, token, segs: outside.clone() }),
        (11, Control::ReadVector { xfer: 11, region: cap.region, token, segs: outside.clone() }),
        (12, Control::WriteVector { xfer: 12, region: cap.region, token: token ^ 1, segs: vec![seg(0, 8)] }),
    ] {
        fake.send(&msg);
        // A write's bytes follow it whether or not it is refused, one message per segment.
        if let Control::WriteVector { segs, .. } = &msg {
            for s in segs {
                fake.data(&vec![0xcc; s.len as usize]).unwrap();
            }
        }
        match fake.recv() {
            Some(Control::Deny { xfer: x, status, reason }) => {
                assert_eq!((x, status), (xfer, UcclStatus::ErrNotAllowed as i32), "{reason}");
            }
            other => panic!("expected a Deny for {xfer}, got {other:?}"),
        }
    }
    // A read of two segments, the second first in memory: one Data for the total, then one message
    // per segment in request order.
    fake.send(&Control::ReadVector { xfer: 13, region: cap.region, token, segs: vec![seg(5000, 300), seg(10, 100)] });
    assert_eq!(fake.recv(), Some(Control::Data { flow: 13, len: 400 }));
    let got = read_exact_within(&mut fake.rx, 2 * PIECE_HEADER_LEN + 400, Duration::from_secs(10)).unwrap();
    let mut want = message(1, &mem[5000..5300]);
    want.extend(message(2, &mem[10..110]));
    assert_eq!(got, want);
    assert!(mem == before, "refused requests wrote nothing");
    // A write of two segments lands in both and nowhere else; its bytes follow at once.
    fake.send(&Control::WriteVector { xfer: 14, region: cap.region, token, segs: vec![seg(20_000, 64), seg(300, 36)] });
    fake.data(&[0xa1; 64]).unwrap();
    fake.data(&[0xb2; 36]).unwrap();
    assert_eq!(fake.recv(), Some(Control::Done { xfer: 14, len: 100 }));
    let mut expected = before;
    expected[20_000..20_064].fill(0xa1);
    expected[300..336].fill(0xb2);
    assert!(mem == expected, "exactly the two segments were written");
    fake.send(&Control::Close);
    fake.expect_closed();
    p.b.close_connection(&conn);
    assert_pair_works(&p, 13);
}

/// The same-host GPU path's messages from peers that may not use it: a peer on another host asks
/// for a region's CUDA IPC handle and is refused whatever it presents; a peer of this host gets no
/// handle for host memory (NOT_SUPPORTED: the network path serves it) nor for a request the
/// region's token and windows do not authorize. Revocations are answered, answers to asks nobody
/// made are dropped, and an IpcRevoked for nothing revoked is a protocol violation that fails only
/// that connection.
#[test]
fn ipc_requests_are_answered_only_for_local_peers_and_never_with_a_handle_for_host_memory() {
    let _serial = serial();
    let ask = |xfer: u64, region, token, addr, len| Control::IpcRequest {
        xfer: (1 << 63) | xfer,
        region,
        token,
        segs: vec![RemoteSeg { addr, len }],
    };
    let expect_deny = |fake: &mut FakePeer, xfer: u64, status: UcclStatus, what: &str| match fake.recv() {
        Some(Control::Deny { xfer: x, status: s, reason }) => {
            assert_eq!((x, s), ((1 << 63) | xfer, status as i32), "{what}: {reason}");
            reason
        }
        other => panic!("{what}: expected a Deny, got {other:?}"),
    };
    for local in [false, true] {
        let p = pair_with(Config { disable_ipc: !local, ..config() });
        let mut host = uccl_tcpx::internal::engine::same_host::own_identity(false);
        host.pid += 1;
        let fake = FakePeer::connect_as(p.b.address(), Stray::None, if local { host } else { HostIdentity::default() });
        let (mut fake, _conn) = (fake.unwrap(), accept(&p.b).unwrap());
        if local {
            // A same-host peer first hears which process the engine is (the host-memory path).
            assert!(matches!(fake.recv(), Some(Control::ProcessHello { .. })));
        }
        let mem = pattern(64 << 10, 31);
        let mr = p.b.register(mem.as_ptr() as usize, mem.len()).unwrap();
        let item = p.b.prepare_fifo(mr, mem.as_ptr() as usize + 4096, 8192).unwrap();
        let cap = item.capability().unwrap();
        let token = wire_token(&fake, cap.region, cap.token);
        fake.send(&ask(1, cap.region, token, item.addr, 64));
        if local {
            let reason = expect_deny(&mut fake, 1, UcclStatus::ErrNotSupported, "host memory");
            assert!(reason.contains("no CUDA IPC handle"), "{reason}");
            fake.send(&ask(2, cap.region, token ^ 1, item.addr, 64));
            expect_deny(&mut fake, 2, UcclStatus::ErrNotAllowed, "a wrong token");
            fake.send(&ask(3, cap.region, token, item.addr - 1, 64));
            expect_deny(&mut fake, 3, UcclStatus::ErrNotAllowed, "outside the window");
        } else {
            let reason = expect_deny(&mut fake, 1, UcclStatus::ErrNotAllowed, "a remote peer");
            assert!(reason.contains("only to peers on this host"), "{reason}");
        }
        fake.send(&Control::IpcRevoke { region: 0x4242 });
        assert_eq!(fake.recv(), Some(Control::IpcRevoked { region: 0x4242 }), "a revocation is answered");
        let stray_grant = Control::IpcGrant {
            xfer: (1 << 63) | 99,
            region: cap.region,
            handle: [7; 64],
            alloc_base: 0x1000,
            alloc_len: 0x1000,
            windows: vec![RemoteSeg { addr: 0x1000, len: 8 }],
        };
        fake.send(&stray_grant);
        fake.send(&Control::Deny { xfer: (1 << 63) | 98, status: -6, reason: "an ask nobody made".into() });
        // Both were dropped: the connection still answers.
        fake.send(&Control::IpcRevoke { region: 7 });
        assert_eq!(fake.recv(), Some(Control::IpcRevoked { region: 7 }));
        fake.send(&Control::IpcRevoked { region: 7 });
        fake.expect_closed();
        assert!(mem == pattern(64 << 10, 31), "nothing was written");
        p.b.deregister(mr).unwrap();
        assert_pair_works(&p, 19);
    }
}

/// A two-sided message offered for the receiver to copy (IpcSend): from a peer on another host a
/// protocol violation that fails that connection; from a peer of this host into a receive the
/// engine cannot copy into (host memory, no GPU mapping the garbage handle) granted, its chunks
/// then coming over the channels; one whose range runs past the allocation it names refused when
/// decoded, failing that connection. The engine keeps serving either way.
#[test]
fn ipc_sends_are_granted_when_no_copy_can_be_made_and_refused_from_elsewhere() {
    let _serial = serial();
    let offer = |xfer, addr, alloc_len| Control::IpcSend {
        xfer,
        len: 100,
        region: 5,
        addr,
        handle: [9; 64],
        alloc_base: 0x10000,
        alloc_len,
    };
    for local in [true, false] {
        let p = pair_with(Config { disable_ipc: !local, ..config() });
        let mut host = uccl_tcpx::internal::engine::same_host::own_identity(false);
        host.pid += 1;
        let fake = FakePeer::connect_as(p.b.address(), Stray::None, if local { host } else { HostIdentity::default() });
        let (mut fake, conn) = (fake.unwrap(), accept(&p.b).unwrap());
        if local {
            assert!(matches!(fake.recv(), Some(Control::ProcessHello { .. })));
        }
        let mut dst = vec![0u8; 300];
        let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, 200).unwrap();
        fake.send(&offer(1, 0x10000, 0x1000));
        if local {
            let Some(Control::Grant { xfer: 1, flow }) = fake.recv() else { panic!("no Grant") };
            fake.send(&Control::Data { flow, len: 100 });
            fake.data(&pattern(100, 12)).unwrap();
            assert_eq!(fake.recv(), Some(Control::Done { xfer: 1, len: 100 }));
            assert_eq!(wait(&conn, rid).unwrap(), 100);
            assert_eq!(&dst[..100], &pattern(100, 12)[..]);
            let rid = conn.recv(dmr, dst.as_mut_ptr() as usize + 100, 200).unwrap();
            fake.send(&offer(2, 0x10fa0, 0x1000));
            fake.expect_closed();
            assert!(wait(&conn, rid).is_err(), "the receive fails with the connection");
        } else {
            fake.expect_closed();
            assert!(wait(&conn, rid).is_err(), "the receive fails with the connection");
        }
        assert!(dst[100..].iter().all(|&b| b == 0), "nothing else was written");
        p.b.deregister(dmr).unwrap();
        assert_pair_works(&p, 23);
    }
}

/// Protocol violations after the handshake: each fails that one connection (a pending receive
/// reports an error, the control stream is closed), never the process or other connections.
#[test]
fn control_protocol_violations_fail_only_that_connection() {
    let _serial = serial();
    let p = pair();
    let mut hello_frame = Vec::new();
    Handshake::Hello(hello()).encode(&mut hello_frame);
    let frame = |m: Control| {
        let mut f = Vec::new();
        m.encode(&mut f);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage bytes", vec![0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5]),
        ("unknown frame kind", FrameHeader { kind: 99, body_len: 0 }.to_bytes().to_vec()),
        ("nonzero flags", {
            let mut f = frame(Control::Close);
            f[3] = 1;
            f
        }),
        ("a second Hello", hello_frame),
        ("Grant for an unknown op", frame(Control::Grant { xfer: 42, flow: 1 })),
        ("Deny for an unknown op", frame(Control::Deny { xfer: 42, status: -3, reason: "x".into() })),
        ("Data for an unknown flow", frame(Control::Data { flow: 42, len: 10 })),
        ("Done for an unknown op", frame(Control::Done { xfer: 42, len: 10 })),
        ("zero-length SendAnnounce", {
            let mut f = frame(Control::SendAnnounce { xfer: 1, len: 1 });
            f[16..24].copy_from_slice(&0u64.to_le_bytes());
            f
        }),
        ("WriteRequest wrapping the address space", {
            let mut f = frame(Control::WriteRequest { xfer: 1, region: 1, token: 1, addr: 1, len: 1 });
            f[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
            f
        }),
        ("Deny with a positive status", {
            let mut f = frame(Control::Deny { xfer: 1, status: -1, reason: String::new() });
            f[16..20].copy_from_slice(&5i32.to_le_bytes());
            f
        }),
        ("Notify name with a NUL", frame(Control::Notify { name: b"a\0b".to_vec(), msg: vec![] })),
        ("WriteVector naming no segment", frame(Control::WriteVector { xfer: 1, region: 1, token: 1, segs: vec![] })),
        (
            "ReadVector with an empty segment",
            frame(Control::ReadVector { xfer: 1, region: 1, token: 1, segs: vec![RemoteSeg { addr: 64, len: 0 }] }),
        ),
        ("WriteVector announcing more segments than its body holds", {
            let mut f = frame(Control::WriteVector {
                xfer: 1,
                region: 1,
                token: 1,
                segs: vec![RemoteSeg { addr: 64, len: 8 }],
            });
            f[32..36].copy_from_slice(&2u32.to_le_bytes());
            f
        }),
        ("Notify name over 255 bytes", {
            let mut f = frame(Control::Notify { name: vec![b'n'; 255], msg: vec![] });
            f[8..12].copy_from_slice(&256u32.to_le_bytes());
            f.insert(12, b'n');
            let body_len = u32::from_le_bytes(f[4..8].try_into().unwrap()) + 1;
            f[4..8].copy_from_slice(&body_len.to_le_bytes());
            f
        }),
        (
            "Notify announcing more than 64 MiB",
            FrameHeader { kind: 23, body_len: (64 << 20) + 264 }.to_bytes().to_vec(),
        ),
        ("ChannelsParked never asked for", frame(Control::ChannelsParked { epoch: 0, parked: true })),
        ("WantChannels sent to the acceptor", frame(Control::WantChannels { epoch: 0 })),
        ("ParkChannels of another lifetime", frame(Control::ParkChannels { epoch: 5 })),
        ("OpenChannels for open channels", frame(Control::OpenChannels { epoch: 1, handles: vec![[0; 128]] })),
        ("Close", frame(Control::Close)),
    ];
    let total = cases.len();
    for (name, bytes) in cases {
        let mut fake = FakePeer::connect(p.b.address(), Stray::None).unwrap();
        let conn = accept(&p.b).unwrap();
        let mut dst = vec![0u8; 64];
        let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
        fake.send_raw(&bytes);
        let err = wait(&conn, rid).expect_err(name);
        let expected = if name == "Close" { UcclStatus::ErrRemoteDisconnect } else { UcclStatus::ErrBackend };
        assert_eq!(err.status(), expected, "{name}: {err}");
        fake.expect_closed();
        assert!(conn.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).is_err(), "{name}: connection still usable");
        assert!(dst.iter().all(|&b| b == 0), "{name}: destination written");
        p.b.close_connection(&conn);
        p.b.deregister(dmr).unwrap();
    }
    eprintln!("{total} control-protocol violations each failed only their connection");
    assert_pair_works(&p, 9);
}

#[test]
fn unmatched_send_announce_flood_is_cut_off() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let mut burst = Vec::new();
    for xfer in 0..(1u64 << 16) + 1 {
        Control::SendAnnounce { xfer, len: 1 << 30 }.encode(&mut burst);
    }
    fake.send_raw(&burst);
    fake.expect_closed();
    assert!(conn.notify(b"x", b"y").is_err(), "the connection survived 65537 unmatched announces");
    assert_pair_works(&p, 10);
}

/// A data chunk larger than granted is refused before a byte of it lands; a shorter one fails the
/// connection too. Either way the bytes past the granted range stay untouched.
#[test]
fn wrong_sized_data_chunks_fail_the_connection_without_overflow() {
    let _serial = serial();
    let p = pair();
    for (name, sent) in [("longer chunk", 150usize), ("shorter chunk", 60), ("empty chunk", 0)] {
        let mut fake = FakePeer::connect(p.b.address(), Stray::None).unwrap();
        let conn = accept(&p.b).unwrap();
        let mut dst = vec![0u8; 256];
        let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, 100).unwrap();
        fake.send(&Control::SendAnnounce { xfer: 1, len: 100 });
        let Some(Control::Grant { flow, .. }) = fake.recv() else { panic!("{name}: no Grant") };
        fake.send(&Control::Data { flow, len: 100 });
        let _ = fake.data(&vec![0xab; sent]);
        let err = wait(&conn, rid).expect_err(name);
        assert_eq!(err.status(), UcclStatus::ErrBackend, "{name}: {err}");
        assert!(dst[100..].iter().all(|&b| b == 0), "{name}: bytes past the receive were written");
        if sent > 100 {
            assert!(dst[..100].iter().all(|&b| b == 0), "{name}: an oversized chunk was partly written");
        }
        fake.expect_closed();
        p.b.close_connection(&conn);
        p.b.deregister(dmr).unwrap();
    }
    assert_pair_works(&p, 11);
}

/// Sets up a granted 100-byte receive from the fake peer, then announces Data of another length.
fn data_len_mismatch(p: &Pair) -> (FakePeer, Arc<Connection>, u64, Vec<u8>, u64) {
    let (mut fake, conn) = fake_peer(p);
    let mut dst = vec![0u8; 256];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, 100).unwrap();
    fake.send(&Control::SendAnnounce { xfer: 1, len: 100 });
    let Some(Control::Grant { flow, .. }) = fake.recv() else { panic!("no Grant") };
    fake.send(&Control::Data { flow, len: 200 });
    (fake, conn, rid, dst, dmr)
}

#[test]
fn data_len_differing_from_the_grant_fails_the_connection() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn, _rid, dst, dmr) = data_len_mismatch(&p);
    fake.expect_closed();
    let err = conn.recv(dmr, dst.as_ptr() as usize, 100).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrBackend, "{err}");
    assert!(err.message().contains("Data for flow"), "{err}");
    assert!(dst.iter().all(|&b| b == 0));
    assert_pair_works(&p, 12);
}

/// Regression (found here, fixed in 8b66d84): `Control::Data` handling removed the granted
/// destination from `inbound` before comparing lengths, so on a mismatch `fail` never saw the
/// receive's transfer and it stayed in progress forever although its connection was dead.
#[test]
fn data_len_mismatch_reports_the_pending_receive() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn, rid, _dst, _dmr) = data_len_mismatch(&p);
    fake.expect_closed();
    let what = "the receive ends after its connection failed";
    match common::eventually(what, PATIENCE, || conn.poll(rid).transpose()) {
        Ok(n) => panic!("the receive succeeded with {n} bytes"),
        Err(e) => assert_eq!(e.status(), UcclStatus::ErrBackend, "{e}"),
    }
}

#[test]
fn done_with_a_wrong_length_fails_the_send() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let src = pattern(100_000, 4);
    let smr = p.b.register(src.as_ptr() as usize, src.len()).unwrap();
    let sid = conn.send(&[(smr, src.as_ptr() as usize, 100_000)]).unwrap();
    let Some(Control::SendAnnounce { xfer, .. }) = fake.recv() else { panic!("no SendAnnounce") };
    fake.send(&Control::Grant { xfer, flow: 5 });
    assert_eq!(fake.recv(), Some(Control::Data { flow: 5, len: 100_000 }));
    read_exact_within(&mut fake.rx, PIECE_HEADER_LEN + 100_000, Duration::from_secs(10)).unwrap();
    fake.send(&Control::Done { xfer, len: 9_999 });
    assert_eq!(wait(&conn, sid).unwrap_err().status(), UcclStatus::ErrBackend);
    fake.expect_closed();
    assert_pair_works(&p, 13);
}

#[test]
fn done_with_a_wrong_length_fails_the_inline_send() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let src = pattern(50, 4);
    let smr = p.b.register(src.as_ptr() as usize, src.len()).unwrap();
    let sid = conn.send(&[(smr, src.as_ptr() as usize, 50)]).unwrap();
    let Some(Control::InlineSend { xfer, .. }) = fake.recv() else { panic!("no InlineSend") };
    fake.send(&Control::Done { xfer, len: 51 });
    assert_eq!(wait(&conn, sid).unwrap_err().status(), UcclStatus::ErrBackend);
    fake.expect_closed();
    assert_pair_works(&p, 14);
}

/// Inline sends the engine has no receive for are buffered up to a bound; a peer that goes past it
/// is cut off, and nothing it sent lands anywhere.
#[test]
fn unmatched_inline_send_flood_is_cut_off() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let mut burst = Vec::new();
    // 512 full payloads are exactly the 4 MiB a peer may leave unanswered; one byte more is not.
    for xfer in 0..512u64 {
        Control::InlineSend { xfer, payload: vec![0xa5; 8192] }.encode(&mut burst);
    }
    fake.send_raw(&burst);
    // A refused guess proves the engine read the whole burst and is still serving.
    fake.send(&Control::ReadRequest { xfer: 9999, region: 1, token: 0, addr: 4096, len: 8 });
    assert!(matches!(fake.recv(), Some(Control::Deny { xfer: 9999, .. })), "the connection failed within the bound");
    fake.send(&Control::InlineSend { xfer: 512, payload: vec![0xa5; 1] });
    fake.expect_closed();
    assert!(conn.notify(b"x", b"y").is_err(), "the connection survived an unbounded inline backlog");
    assert_pair_works(&p, 15);
}

/// An inline send larger than the receive it meets is refused to the peer and fails that receive;
/// the connection and the bytes past the receive are untouched.
#[test]
fn oversized_inline_send_fails_only_its_receive() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let mut dst = vec![0u8; 256];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, 100).unwrap();
    fake.send(&Control::InlineSend { xfer: 1, payload: vec![7; 101] });
    assert!(
        matches!(fake.recv(), Some(Control::Deny { xfer: 1, status, .. }) if status == UcclStatus::ErrMismatch as i32)
    );
    assert_eq!(wait(&conn, rid).unwrap_err().status(), UcclStatus::ErrMismatch);
    assert!(dst.iter().all(|&b| b == 0), "a refused message wrote into the receive");
    let rid = conn.recv(dmr, dst.as_mut_ptr() as usize, 100).unwrap();
    fake.send(&Control::InlineSend { xfer: 2, payload: vec![7; 100] });
    assert_eq!(fake.recv(), Some(Control::Done { xfer: 2, len: 100 }));
    assert_eq!(wait(&conn, rid).unwrap(), 100);
    assert!(dst[..100].iter().all(|&b| b == 7) && dst[100..].iter().all(|&b| b == 0));
    assert_pair_works(&p, 16);
}

#[test]
fn data_port_noise_during_setup_is_ignored() {
    let _serial = serial();
    let p = pair();
    let mut fake = FakePeer::connect(p.b.address(), Stray::Garbage).unwrap();
    let conn = accept(&p.b).unwrap();
    fake.send(&Control::Notify { name: b"x".to_vec(), msg: vec![] });
    p.b.close_connection(&conn);
    fake.expect_closed();
    assert_pair_works(&p, 14);
}

/// Regression (found here, fixed in 8b66d84): the data listener read each accepted stream's 12-byte
/// hello with a blocking read bounded only by the connect timeout, inside the setup loop whose
/// deadline is that same timeout, so one silent connection to the data port made setup fail.
#[test]
fn silent_data_port_connection_does_not_block_setup() {
    let _serial = serial();
    let p = pair();
    let mut fake = FakePeer::connect(p.b.address(), Stray::Silent).unwrap();
    let conn = accept(&p.b).expect("the real peer's setup failed because of a silent stray connection");
    fake.send(&Control::Notify { name: b"x".to_vec(), msg: vec![] });
    p.b.close_connection(&conn);
    fake.expect_closed();
}

/// A listener on 127.0.0.2 and one on 127.0.0.1 with the same port: a handle naming the first tells
/// from which of the two takes a connection whether the engine dialed the named address or its peer's.
fn decoy_and_peer_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let decoy = TcpListener::bind("127.0.0.2:0").unwrap();
        let port = decoy.local_addr().unwrap().port();
        if let Ok(own) = TcpListener::bind(("127.0.0.1", port)) {
            for l in [&decoy, &own] {
                l.set_nonblocking(true).unwrap();
            }
            return (decoy, own);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.1");
}

fn accepted(listener: &TcpListener) -> Option<TcpStream> {
    match listener.accept() {
        Ok((s, _)) => Some(s),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accepting: {e}"),
    }
}

/// Sends a Hello whose channel handle names `named` (nonce 7) from 127.0.0.1, and returns the
/// connection the engine then opens on `expected` with the bytes it sent there before giving up.
fn dial_for_hello_naming(p: &Pair, named: &TcpListener, expected: &TcpListener) -> (Reply, TcpStream) {
    let h = Hello { net_handle: socket_handle(named.local_addr().unwrap(), 7), ..hello() };
    let (mut control, _) = open_control(p.b.address());
    control.write_all(&encode(&Handshake::Hello(h))).unwrap();
    let mut dialed =
        common::eventually("the engine dials for its channel", SETUP_TIMEOUT + SLACK, || accepted(expected));
    dialed.set_nonblocking(false).unwrap();
    let got = read_reply(&mut dialed, SETUP_TIMEOUT + SLACK);
    assert!(got.closed, "the engine kept the dialed connection open");
    let comm_id = u64::from_le_bytes(got.bytes[16..24].try_into().unwrap());
    assert_eq!(&got.bytes[..HELLO_LEN], &stream_hello(7, comm_id)[..]);
    (got, control)
}

/// A Hello whose channel handle names another host is not obeyed: the engine dials the address the
/// control connection came from (the handle's port there) and never the named one, so a stranger
/// cannot make it connect anywhere. It gives up by the connect timeout when nobody completes setup.
#[test]
fn hello_handle_naming_another_address_makes_the_engine_dial_its_peer_instead() {
    let _serial = serial();
    let p = pair();
    let baseline = threads();
    let (decoy, own) = decoy_and_peer_listeners();
    let (_, mut control) = dial_for_hello_naming(&p, &decoy, &own);
    let reply = read_reply(&mut control, SETUP_TIMEOUT + SLACK);
    assert!(reply.closed);
    match handshakes_in(&reply.bytes).as_slice() {
        [Handshake::Welcome(_), Handshake::Refuse(r)] => {
            assert_eq!(r.status, UcclStatus::ErrTimeout as i32, "{r:?}");
            assert!(r.reason.contains("channel setup"), "{r:?}");
        }
        other => panic!("expected a Welcome, then a Refuse saying why, got {other:?}"),
    }
    assert!(accepted(&decoy).is_none(), "the engine dialed the address the Hello named");
    let _ = control.shutdown(Shutdown::Both);
    threads_settle(baseline, SLACK);
    assert_pair_works(&p, 15);
}

/// An operator may allow other addresses for multi-homed peers: those are dialed as named.
#[test]
fn allowed_dial_addresses_are_dialed_as_named() {
    let _serial = serial();
    let p = pair_with(Config { allow_dial: vec!["127.0.0.2/32".parse().unwrap()], ..config() });
    let (decoy, own) = decoy_and_peer_listeners();
    let (got, _control) = dial_for_hello_naming(&p, &decoy, &decoy);
    assert_eq!(got.bytes.len(), HELLO_LEN + PIECE_HEADER_LEN + 16, "unexpected bytes sent to the dialed address");
    assert!(accepted(&own).is_none(), "the engine dialed its peer's address although the named one is allowed");
}

/// The data listener of an engine told its address (`UCCL_TCPX_IP`) binds that address alone, like
/// the control listener: on loopback, the same port on 127.0.0.2 refuses connections.
#[test]
fn data_listener_binds_the_configured_address_only() {
    let _serial = serial();
    let p = pair();
    let ours = TcpListener::bind("127.0.0.1:0").unwrap();
    let h = Hello { net_handle: socket_handle(ours.local_addr().unwrap(), 7), ..hello() };
    let (mut control, _) = open_control(p.b.address());
    control.write_all(&encode(&Handshake::Hello(h))).unwrap();
    let head: [u8; 8] = read_exact_within(&mut control, 8, SETUP_TIMEOUT).unwrap().try_into().unwrap();
    let header = FrameHeader::parse(&head).unwrap();
    let body = read_exact_within(&mut control, header.body_len as usize, SETUP_TIMEOUT).unwrap();
    let Ok(Handshake::Welcome(w)) = Handshake::decode(&header, &body) else { panic!("no Welcome") };
    let (data, _) = parse_socket_handle(&w.net_handle);
    assert_eq!(data.ip(), Ipv4Addr::LOCALHOST);
    let elsewhere = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), data.port()));
    match TcpStream::connect_timeout(&elsewhere, Duration::from_secs(5)) {
        Ok(_) => panic!("the data listener accepts on {elsewhere}, an address the engine was not told to use"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
    }
    TcpStream::connect_timeout(&data, Duration::from_secs(5)).expect("the data listener on the configured address");
}

/// Regression (found here, fixed in 8b66d84): `close` marks the control writer closing and waits up
/// to a second for it to drain before failing what is pending. A Grant for one of our writes (sends
/// since writes need none) handled in that window was taken out of `awaiting_grant`,
/// `start_outbound` then failed to queue the Data message before recording the flow, and the
/// transfer was in no table when `fail` ran: it stayed in progress forever. A peer that stops
/// reading its control stream makes the window last the full second (the race also showed up with
/// two real engines under CPU load).
#[test]
fn grant_arriving_during_close_does_not_strand_the_send() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let (w, xfer, _src) = transfer_behind_a_blocked_writer(&p, &mut fake, &conn, false);
    let (b, c) = (p.b.clone(), conn.clone());
    let closer = std::thread::spawn(move || b.close_connection(&c));
    // The writer refuses new messages from the moment the close starts waiting for it to drain:
    // the Grant must arrive in that wait.
    common::wait_until("close_connection waits for the blocked writer", PATIENCE, || {
        conn.notify(b"probe", b"").is_err()
    });
    fake.send(&Control::Grant { xfer, flow: 1 });
    common::wait_until("close_connection returns", Duration::from_secs(10), || closer.is_finished());
    closer.join().unwrap();
    assert_canceled(&conn, w);
}

/// A write of `p.b`'s on `conn` waiting for its Done (its bytes already went to the fake, which
/// does not read them), or with `send` a send waiting for its Grant (both larger than the inline
/// limit), behind 64 MiB of notification that the fake never reads, so the engine's control writer
/// is blocked. Returns the transfer's id, the xfer the fake saw and the source.
fn transfer_behind_a_blocked_writer(
    p: &Pair,
    fake: &mut FakePeer,
    conn: &Connection,
    write: bool,
) -> (u64, u64, Vec<u8>) {
    let src = pattern(128 << 10, 5);
    let smr = p.b.register(src.as_ptr() as usize, src.len()).unwrap();
    let remote = uccl_tcpx::FifoItem::with_capability(
        0x1000,
        128 << 10,
        uccl_tcpx::internal::proto::Capability {
            region: 1,
            token: 2,
            place: uccl_tcpx::internal::proto::Place::host(),
        },
    );
    let (w, xfer) = if write {
        let w = conn.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: src.len(), remote }]).unwrap();
        let Some(Control::WriteRequest { xfer, .. }) = fake.recv() else { panic!("no WriteRequest") };
        (w, xfer)
    } else {
        let s = conn.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
        let Some(Control::SendAnnounce { xfer, .. }) = fake.recv() else { panic!("no SendAnnounce") };
        (s, xfer)
    };
    // Stop reading: 64 MiB of notification fill the socket buffers and the engine's writer blocks.
    conn.notify(b"filler", &vec![0u8; 64 << 20]).unwrap();
    (w, xfer, src)
}

/// Transfer `w` of the closed connection `conn` ends, canceled.
fn assert_canceled(conn: &Connection, w: u64) {
    let what = "the transfer ends after close_connection returned";
    match common::eventually(what, PATIENCE, || conn.poll(w).transpose()) {
        Ok(n) => panic!("the transfer succeeded with {n} bytes on a closed connection"),
        Err(e) => assert_eq!(e.status(), UcclStatus::ErrCanceled, "{e}"),
    }
}

/// The same close with the writer blocked, a write's bytes gone and no answer crossing it: the
/// pending write is failed.
#[test]
fn close_with_a_blocked_control_writer_fails_pending_writes() {
    let _serial = serial();
    let p = pair();
    let (mut fake, conn) = fake_peer(&p);
    let (w, _xfer, _src) = transfer_behind_a_blocked_writer(&p, &mut fake, &conn, true);
    let start = Instant::now();
    let (b, c) = (p.b.clone(), conn.clone());
    let closer = std::thread::spawn(move || b.close_connection(&c));
    common::wait_until("close_connection returns", Duration::from_secs(10), || closer.is_finished());
    closer.join().unwrap();
    eprintln!("close with a blocked writer returned after {:?}", start.elapsed());
    assert_canceled(&conn, w);
    assert_pair_works(&p, 16);
}

/// A fake peer that shares the engine's host identity: same host and network namespace, another
/// process (the one it names).
fn same_host_fake(p: &Pair, pid: u32) -> (FakePeer, Arc<Connection>) {
    let host = HostIdentity { pid, ..uccl_tcpx::internal::engine::same_host::own_identity(false) };
    let mut fake = FakePeer::connect_as(p.b.address(), Stray::None, host).unwrap();
    let conn = accept(&p.b).unwrap();
    assert_eq!(conn.peer.locality, uccl_tcpx::Locality::SameHost);
    // The engine names its own process and its end of the control connection first.
    let Some(Control::ProcessHello { pid: theirs, .. }) = fake.recv() else { panic!("no ProcessHello") };
    assert_eq!(theirs, std::process::id());
    (fake, conn)
}

/// A same-host peer gets the direct copy only for the process it proves to be: one naming another
/// process of ours (which the engine could read) is told no and gets the network path, even when
/// it asks for a direct write anyway; one naming itself (this test process holds its socket) has its
/// write copied in, inside the window alone.
#[test]
fn a_same_host_peer_is_copied_from_only_when_it_proves_its_process() {
    use std::os::fd::AsRawFd;
    let _serial = serial();
    let p = pair_with(Config { disable_ipc: false, ..config() });
    let mut target = vec![0u8; 1 << 20];
    let mr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let window = p.b.prepare_fifo(mr, target.as_ptr() as usize + 4096, 512 << 10).unwrap();
    let cap = window.capability().unwrap();
    let src = pattern(256 << 10, 31);
    let write = |fake: &FakePeer, xfer| Control::DirectWrite {
        xfer,
        region: cap.region,
        token: wire_token(fake, cap.region, cap.token),
        segs: vec![RemoteSeg { addr: window.addr, len: src.len() as u32 }],
        src: vec![src.as_ptr() as u64],
        huge: false,
    };

    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let (mut liar, liar_conn) = same_host_fake(&p, other.id());
    let fd = u32::try_from(liar.control.as_raw_fd()).unwrap();
    liar.send(&Control::ProcessHello { pid: other.id(), fd });
    assert_eq!(liar.recv(), Some(Control::ProcessAck { readable: false }), "the claim does not check out");
    assert!(!liar_conn.host_path().reads_peer);
    liar.send(&write(&liar, 1));
    assert!(matches!(liar.recv(), Some(Control::Grant { xfer: 1, .. })), "the network path instead");
    assert!(target.iter().all(|&b| b == 0), "nothing was copied");
    liar.send(&Control::Close);
    liar.expect_closed();
    other.kill().unwrap();
    other.wait().unwrap();

    let (mut honest, conn) = same_host_fake(&p, std::process::id());
    let fd = u32::try_from(honest.control.as_raw_fd()).unwrap();
    honest.send(&Control::ProcessHello { pid: std::process::id(), fd });
    assert_eq!(honest.recv(), Some(Control::ProcessAck { readable: true }));
    honest.send(&write(&honest, 2));
    assert_eq!(honest.recv(), Some(Control::Done { xfer: 2, len: src.len() as u64 }));
    assert_eq!(&target[4096..4096 + src.len()], &src[..]);
    // The window still bounds it: a segment past its end refuses the whole request.
    let mut past = write(&honest, 3);
    if let Control::DirectWrite { segs, .. } = &mut past {
        segs.push(RemoteSeg { addr: window.addr + (512 << 10) - 8, len: 16 });
        if let Control::DirectWrite { src: from, .. } = &mut past {
            from.push(src.as_ptr() as u64);
        }
    }
    honest.send(&past);
    assert!(matches!(honest.recv(), Some(Control::Deny { xfer: 3, status: -6, .. })));
    assert!(conn.host_path().reads_peer);
    honest.send(&Control::Close);
    honest.expect_closed();
    p.b.deregister(mr).unwrap();
    assert_pair_works(&p, 32);
}

/// Deregistration stays a fence when a same-host peer's write is copied in: once `deregister`
/// returns nothing lands in the region, however far the copy got (not started, mid-way, done).
/// Four threads copy it (the worker and three of the process's helpers), whatever the host.
#[test]
fn deregistering_during_a_same_host_copy_in_is_a_fence() {
    use std::os::fd::AsRawFd;
    let _serial = serial();
    let p = pair_with(Config { disable_ipc: false, host_copy_threads: 4, ..config() });
    let (mut fake, _conn) = same_host_fake(&p, std::process::id());
    let fd = u32::try_from(fake.control.as_raw_fd()).unwrap();
    fake.send(&Control::ProcessHello { pid: std::process::id(), fd });
    assert_eq!(fake.recv(), Some(Control::ProcessAck { readable: true }));
    let len = 64usize << 20;
    let src = vec![0xabu8; len];
    let mut outcomes = Vec::new();
    for round in 0..6u64 {
        let mut target = vec![0u8; len];
        let mr = p.b.register(target.as_mut_ptr() as usize, len).unwrap();
        let window = p.b.prepare_fifo(mr, target.as_ptr() as usize, len).unwrap();
        let cap = window.capability().unwrap();
        fake.send(&Control::DirectWrite {
            xfer: round + 1,
            region: cap.region,
            token: wire_token(&fake, cap.region, cap.token),
            segs: vec![RemoteSeg { addr: window.addr, len: len as u32 }],
            src: vec![src.as_ptr() as u64],
            huge: false,
        });
        // Later rounds let the copy get further before the cut.
        std::thread::sleep(Duration::from_millis(round * 2));
        p.b.deregister(mr).unwrap();
        target.fill(0x11);
        std::thread::sleep(Duration::from_millis(30));
        assert!(target.iter().all(|&b| b == 0x11), "round {round}: bytes landed after deregister returned");
        match fake.recv() {
            Some(Control::Done { xfer, .. }) if xfer == round + 1 => outcomes.push("done"),
            Some(Control::Deny { xfer, status: -6, .. }) if xfer == round + 1 => outcomes.push("denied"),
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert!(outcomes.contains(&"denied"), "no round cut the copy off: {outcomes:?}");
    fake.send(&Control::Close);
    fake.expect_closed();
    assert_pair_works(&p, 33);
}
