//! Engines that share a key: they connect and move data; a peer without the key, or with another,
//! is refused, and both ends say why (the connector in its error, both in an error-level log
//! record); the key can come from the environment, the Rust API or the C call. The hostile-peer
//! suite runs against keyed engines in `hostile_auth.rs`, and `handshake_cost` measures what the
//! challenge-response adds to a connect.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uccl_tcpx::{AuthKey, Config, Engine, OneSided, UcclStatus};

mod common;
use common::{accept, pattern, wait};

const KEY: &[u8] = b"a key both engines of a pair hold";

/// Every log record at error level, so a test can check what each side reported.
static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Error
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            ERRORS.lock().unwrap().push(r.args().to_string());
        }
    }

    fn flush(&self) {}
}

fn capture_errors() {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Error);
}

/// The tests here share the log capture and count refusals in it: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn config(key: Option<&[u8]>) -> Config {
    Config {
        auth_key: key.map(|k| AuthKey::new(k).unwrap()),
        connect_timeout: Duration::from_secs(5),
        ..common::loopback()
    }
}

fn engine(key: Option<&[u8]>) -> Arc<Engine> {
    Arc::new(Engine::new(config(key)).unwrap())
}

/// A write, a read and a send over `conn` (engine `a`'s) to `b`, each checked by content.
fn moves_data(a: &Engine, b: &Engine, ab: &uccl_tcpx::Connection, ba: &uccl_tcpx::Connection) {
    let len = 300_000;
    let src = pattern(len, 1);
    let mut target = vec![0u8; len];
    let mut back = vec![0u8; len];
    let smr = a.register(src.as_ptr() as usize, len).unwrap();
    let bmr = a.register(back.as_mut_ptr() as usize, len).unwrap();
    let tmr = b.register(target.as_mut_ptr() as usize, len).unwrap();
    let item = b.prepare_fifo(tmr, target.as_mut_ptr() as usize, len).unwrap();
    // Large and small one-sided transfers: the request path and the inline path both carry tokens.
    for n in [len, 100] {
        let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: n, remote: item }]).unwrap();
        assert_eq!(wait(ab, w).unwrap(), n as u64);
        let r = ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: n, remote: item }]).unwrap();
        assert_eq!(wait(ab, r).unwrap(), n as u64);
    }
    assert!(target == src && back == src, "one-sided transfers delivered the wrong bytes");
    target.fill(0);
    let rid = ba.recv(tmr, target.as_mut_ptr() as usize, len).unwrap();
    let sid = ab.send(&[(smr, src.as_ptr() as usize, len)]).unwrap();
    assert_eq!(wait(ab, sid).unwrap(), len as u64);
    assert_eq!(wait(ba, rid).unwrap(), len as u64);
    assert!(target == src, "send delivered the wrong bytes");
}

#[test]
fn engines_sharing_a_key_connect_and_move_data() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    capture_errors();
    let p = common::pair(config(Some(KEY)));
    moves_data(&p.a, &p.b, &p.ab, &p.ba);
    // Two engines of one process copy one-sided transfers directly; the target checks the bound
    // token all the same.
    let p = common::pair(Config { auth_key: Some(AuthKey::new(KEY).unwrap()), ..common::same_host() });
    moves_data(&p.a, &p.b, &p.ab, &p.ba);
    // A key set after creation (the C call's path) works the same.
    let (a, b) = (engine(None), engine(None));
    for e in [&a, &b] {
        e.set_auth_key(AuthKey::new(KEY).unwrap());
    }
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = accept(&b).unwrap();
    moves_data(&a, &b, &ab, &ba);
}

/// A connection attempt that must fail on authentication: the connector's error and the error-level
/// records both ends logged, and the acceptor serves the next good peer instead.
#[test]
fn a_peer_without_the_key_or_with_another_is_refused_and_both_sides_say_why() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    capture_errors();
    let other: &[u8] = b"another key, as long as the first";
    type Key = Option<&'static [u8]>;
    let cases: [(&str, Key, Key, &str); 3] = [
        ("connector keyed, acceptor not", Some(KEY), None, "the peer holds a key and this engine none"),
        ("acceptor keyed, connector not", None, Some(KEY), "this engine requires a key and the peer has none"),
        ("different keys", Some(KEY), Some(other), "proof does not match this engine's key"),
    ];
    for (what, connector_key, acceptor_key, cause) in cases {
        let (a, b) = (engine(connector_key), engine(acceptor_key));
        ERRORS.lock().unwrap().clear();
        // Refused by the check itself, not by a handshake timeout (which fails as ErrTimeout).
        let err = a.connect("127.0.0.1", "0", b.address().port()).err().unwrap_or_else(|| panic!("{what}: connected"));
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what}: {err}");
        assert!(err.message().contains("authentication failed") && err.message().contains(cause), "{what}: {err}");
        // The acceptor logs its side as it turns the peer away; the connector logged its error.
        let logged = || {
            let errors = ERRORS.lock().unwrap();
            let acceptor =
                errors.iter().any(|e| e.starts_with("refusing 127.0.0.1") && e.contains("authentication failed"));
            let connector = errors.iter().any(|e| e.starts_with("connect to") && e.contains(cause));
            (acceptor && connector).then_some(())
        };
        common::eventually(&format!("{what}: both sides log the refusal"), Duration::from_secs(5), logged);
        // Nothing was queued for `accept`: the next connection it returns is a good peer's.
        let good = engine(acceptor_key);
        let gb = good.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let bg = accept(&b).unwrap();
        moves_data(&good, &b, &gb, &bg);
    }
}

#[test]
fn the_c_call_checks_its_key() {
    use uccl_tcpx::ffi::{uccl_engine_create, uccl_engine_destroy, uccl_engine_set_auth_key};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Before the C call installs its own logger, which would take the capture's place.
    capture_errors();
    let e = uccl_engine_create(0, false);
    assert!(!e.is_null());
    assert_eq!(uccl_engine_set_auth_key(e, std::ptr::null(), 32), UcclStatus::ErrInvalidParam as i32);
    let short = [7u8; 15];
    assert_eq!(uccl_engine_set_auth_key(e, short.as_ptr(), short.len()), UcclStatus::ErrInvalidParam as i32);
    assert_eq!(uccl_engine_set_auth_key(e, KEY.as_ptr(), usize::MAX), UcclStatus::ErrInvalidParam as i32);
    assert_eq!(uccl_engine_set_auth_key(e, KEY.as_ptr(), KEY.len()), 0);
    uccl_engine_destroy(e);
    assert_eq!(uccl_engine_set_auth_key(e, KEY.as_ptr(), KEY.len()), UcclStatus::ErrNotFound as i32);
}

/// What the challenge-response adds to a connect on loopback: `cargo test --release --test auth
/// handshake_cost -- --ignored --nocapture` (docs/PERFORMANCE.md has the figures).
#[test]
#[ignore]
fn handshake_cost() {
    let rounds = 200;
    for key in [None, Some(KEY)] {
        let (a, b) = (engine(key), engine(key));
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
            let ba = accept(&b).unwrap();
            times.push(started.elapsed());
            a.close_connection(&ab);
            b.close_connection(&ba);
        }
        times.sort();
        let pct = |p: usize| times[(rounds - 1) * p / 100];
        println!(
            "key {}: connect + accept p50 {:?}, p90 {:?}, min {:?} ({rounds} rounds)",
            if key.is_some() { "on" } else { "off" },
            pct(50),
            pct(90),
            times[0]
        );
    }
    let binding = AuthKey::new(KEY).unwrap().session(&[1; 32], &[2; 32]).token_binding();
    let n = 1_000_000u64;
    let started = Instant::now();
    let mut acc = 0u64;
    for i in 0..n {
        acc ^= binding.bind(i, 0x5eed);
    }
    println!("token binding: {:?} per request side (checksum {acc:x})", started.elapsed() / n as u32);
}
