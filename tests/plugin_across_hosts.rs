//! Plugin engines on two test hosts of this machine (`scripts/testnet.sh`): separate network
//! namespaces, so each engine takes the other for remote, yet one kernel carries the bytes between
//! them over a virtual link and no NIC ever sees them. TCPX exits the process at the first devmem
//! receive of such traffic as it does for loopback, so the engines must keep the plugin out of the
//! connection here too: its channels go over the built-in socket transport.
//!
//! Both ends run against the fake NIC at its strict defaults (`FAKE_TCPX_SAME_HOST=fatal`), with
//! every comm the plugin makes dropped at once (`FAKE_TCPX_FAULT=drop:0`), so a transfer that the
//! plugin carried would fail: the bytes arriving whole prove the route.

use std::sync::Arc;
use std::time::Duration;

use testkit::netns::TestNet;
use uccl_tcpx::{Config, Engine, LocalPeers, Locality, OneSided};

mod common;
use common::engine::{fifo_from_hex, fifo_to_hex};
use common::{ChildTest, PATIENCE, assert_same, pattern, plugin, wait_done};

const FAKE: &str = "FakeDevmemTCPX_v7";
/// The server's advertised region.
const REGION: usize = 8 << 20;
/// Sizes written, read and sent: inline on the control stream, one chunk, several on both channels.
const SIZES: [usize; 3] = [5, 64 << 10, (3 << 20) + 7];
const LIMIT: Duration = Duration::from_secs(60);

/// A plugin engine at this test host's control address, same-host peers on sockets as deployed.
fn config() -> Config {
    let own = std::env::var("TESTNET_SELF").expect("set by the parent test");
    Config {
        ip: Some(own.parse().unwrap()),
        disable_ipc: false,
        local_peers: LocalPeers::Socket,
        ..plugin::config(2, 256 << 10)
    }
}

#[test]
fn plugin_engines_on_two_test_hosts_keep_the_plugin_out_of_their_connection() {
    let Some(net) = TestNet::up(1, None) else { return };
    let mut server = plugin::strict_child(ChildTest::new("plugin_server_host").env_cleared("UCCL_TCPX_"))
        .env("TESTNET_SELF", net.addr(1, 0).to_string())
        .on_host(&net, 1)
        .spawn();
    let announced = server.announcement("SERVER ", PATIENCE);
    let out = plugin::strict_child(ChildTest::new("plugin_client_host").env_cleared("UCCL_TCPX_"))
        .env("TESTNET_SELF", net.addr(0, 0).to_string())
        .env("TESTNET_SERVER", format!("{} {}", net.addr(1, 0), announced.trim()))
        .on_host(&net, 0)
        .run_within(Duration::from_secs(180));
    assert!(out.contains("CLIENT ok"), "the client checked everything:\n{out}");
    assert_eq!(server.announcement("SERVED ", PATIENCE).trim(), "ok");
}

#[test]
#[ignore = "started by the tests of this file on a test host"]
fn plugin_server_host() {
    assert!(common::is_child("plugin_server_host"));
    plugin::assert_strict();
    let engine = Arc::new(Engine::new(config()).unwrap());
    assert_eq!(engine.transport(), FAKE);
    let mut region = vec![0u8; REGION];
    let mr = engine.register(region.as_mut_ptr() as usize, REGION).unwrap();
    let item = engine.prepare_fifo(mr, region.as_mut_ptr() as usize, REGION).unwrap();
    println!("SERVER {} {}", engine.address().port(), fifo_to_hex(&item));
    let conn = engine.accept().unwrap();
    assert_eq!(conn.peer.locality, Locality::Remote, "a client in another network namespace is remote");
    assert_eq!(conn.peer.channels, "socket", "but on this machine's kernel, so not on the plugin");
    // Echoes every message back; the client checks both directions.
    for &len in &SIZES {
        let mut inbox = vec![0u8; len];
        let imr = engine.register(inbox.as_mut_ptr() as usize, len).unwrap();
        let r = conn.recv(imr, inbox.as_mut_ptr() as usize, len).unwrap();
        assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), len as u64);
        let s = conn.send(&[(imr, inbox.as_ptr() as usize, len)]).unwrap();
        assert_eq!(wait_done(&conn, s, LIMIT).unwrap(), len as u64);
    }
    println!("SERVED ok");
    testkit::child::park_until_killed()
}

#[test]
#[ignore = "started by the tests of this file on a test host"]
fn plugin_client_host() {
    assert!(common::is_child("plugin_client_host"));
    plugin::assert_strict();
    let server = std::env::var("TESTNET_SERVER").unwrap();
    let mut words = server.split_whitespace();
    let (ip, port, hex) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap());
    let remote = fifo_from_hex(hex);
    let engine = Engine::new(config()).unwrap();
    assert_eq!(engine.transport(), FAKE);
    let conn = engine.connect(ip, "0", port.parse().unwrap()).unwrap();
    assert_eq!((conn.peer.locality, conn.peer.channels), (Locality::Remote, "socket"));
    for (k, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, 30 + k as u64);
        let src = data.clone();
        let smr = engine.register(src.as_ptr() as usize, len).unwrap();
        let w = conn.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
        assert_eq!(wait_done(&conn, w, LIMIT).unwrap(), len as u64);
        let mut back = vec![0u8; len];
        let bmr = engine.register(back.as_mut_ptr() as usize, len).unwrap();
        let r = conn.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote }]).unwrap();
        assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), len as u64);
        assert_same(&back, &data, &format!("{len} bytes written and read back across test hosts"));

        let mut echo = vec![0u8; len];
        let emr = engine.register(echo.as_mut_ptr() as usize, len).unwrap();
        let r = conn.recv(emr, echo.as_mut_ptr() as usize, len).unwrap();
        let s = conn.send(&[(smr, src.as_ptr() as usize, len)]).unwrap();
        assert_eq!(wait_done(&conn, s, LIMIT).unwrap(), len as u64);
        assert_eq!(wait_done(&conn, r, LIMIT).unwrap(), len as u64, "the server's echo");
        assert_same(&echo, &data, &format!("{len} bytes sent and echoed across test hosts"));
    }
    println!("CLIENT ok");
}
