//! Choosing the transport (UCCL_TCPX_TRANSPORT): auto falls back to sockets when no plugin loads,
//! tcpx turns a plugin failure into an engine-creation error that says why, socket never loads one.
//! Configured through `Config`, not the environment, so these run in parallel with anything.

use std::path::PathBuf;
use std::sync::Arc;

use uccl_tcpx::{Config, Engine, TransportChoice};

mod common;

fn config(transport: TransportChoice, plugin: &str) -> Config {
    Config { transport, plugin_path: Some(PathBuf::from(plugin)), ..common::loopback() }
}

const MISSING: &str = "/nonexistent/uccl-tcpx-test/libnccl-net-missing.so";

#[test]
fn auto_falls_back_to_sockets_and_the_engine_works() {
    let a = Engine::new(config(TransportChoice::Auto, MISSING)).expect("auto never fails on a missing plugin");
    let b = Engine::new(config(TransportChoice::Auto, "libc.so.6")).expect("nor on a library that is no plugin");
    let b = Arc::new(b);
    assert_eq!((a.transport(), b.transport()), ("socket", "socket"));
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = common::accept(&b).unwrap();
    let src = common::pattern(100_000, 5);
    let mut dst = vec![0u8; src.len()];
    let (smr, dmr) = (
        a.register(src.as_ptr() as usize, src.len()).unwrap(),
        b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap(),
    );
    let r = ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    assert_eq!(common::wait(&ab, s).unwrap(), src.len() as u64);
    assert_eq!(common::wait(&ba, r).unwrap(), src.len() as u64);
    assert_eq!(dst, src);
}

#[test]
fn tcpx_makes_a_missing_plugin_an_error_naming_path_and_cause() {
    let err = Engine::new(config(TransportChoice::Tcpx, MISSING)).err().expect("engine creation fails");
    let msg = err.to_string();
    assert!(msg.contains("UCCL_TCPX_TRANSPORT=tcpx"), "{msg}");
    assert!(msg.contains(MISSING), "{msg}");
    assert!(msg.contains("cannot open shared object file"), "dlerror text: {msg}");
}

#[test]
fn tcpx_refuses_a_library_without_the_v7_table() {
    let err = Engine::new(config(TransportChoice::Tcpx, "libc.so.6")).err().expect("engine creation fails");
    assert!(err.to_string().contains("does not export ncclNetPlugin_v7"), "{err}");
}

#[test]
fn socket_never_loads_a_plugin() {
    // A plugin path that would fail to load is never looked at.
    let e = Engine::new(config(TransportChoice::Socket, MISSING)).unwrap();
    assert_eq!(e.transport(), "socket");
}

#[test]
fn the_transport_knob_parses_from_the_environment_shape() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    let c = Config::from_lookup(lookup(&[("UCCL_TCPX_TRANSPORT", "tcpx"), ("UCCL_TCPX_PLUGIN", MISSING)])).unwrap();
    assert_eq!((c.transport, c.plugin_path.as_deref()), (TransportChoice::Tcpx, Some(std::path::Path::new(MISSING))));
    let err = Config::from_lookup(lookup(&[("UCCL_TCPX_TRANSPORT", "ib")])).unwrap_err();
    assert!(err.to_string().contains("UCCL_TCPX_TRANSPORT"), "{err}");
}
