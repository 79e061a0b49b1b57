//! Same-host peers of a plugin engine never reach the plugin: traffic between two ends of one host
//! never passes the NIC, and TCPX exits the process at its first receive of it. The engine moves
//! such a connection's channels over the built-in socket transport instead, whether the peer is an
//! engine of this process or another process of this host.
//!
//! The cases run in child processes against the fake NIC at its strict default
//! (`FAKE_TCPX_SAME_HOST=fatal`: same-host devmem traffic ends the process), with
//! `UCCL_TCPX_LOCAL_PEERS` at its default, both set back from what the plugin harness pins for the
//! other plugin tests. The fake's host mode (no GPU here) serves host receives, which loopback bytes
//! satisfy as they do in TCPX, so each child also runs with `FAKE_TCPX_FAULT=drop:0`: every comm
//! the plugin makes drops its connection at once, and any transfer the plugin carried would fail.
//! The parent asserts that the child ran its test and was not killed.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{ChannelTransport, Config, Connection, Engine, LocalPeers, Locality, OneSided, UcclStatus};

mod common;
use common::{ChildTest, Pair, pair, pattern, plugin, wait};

const FAKE: &str = "FakeDevmemTCPX_v7";
/// Several chunks over both channels, and a part inline on the control stream.
const SIZES: [usize; 3] = [5, 64 << 10, (3 << 20) + 7];

/// A plugin engine that sends same-host peers over sockets, as deployments run.
fn local_config() -> Config {
    Config { disable_ipc: false, local_peers: LocalPeers::Socket, ..plugin::config(2, 256 << 10) }
}

/// A registered host buffer.
struct Buf {
    bytes: Vec<u8>,
    mr: u64,
}

impl Buf {
    fn new(engine: &Engine, len: usize) -> Buf {
        let mut bytes = vec![0u8; len];
        let mr = engine.register(bytes.as_mut_ptr() as usize, len).unwrap();
        Buf { bytes, mr }
    }

    fn addr(&self) -> usize {
        self.bytes.as_ptr() as usize
    }
}

/// `from` sends `data` to `to`, which receives it into a fresh buffer of `to_engine`.
fn send_recv(from: &Connection, from_engine: &Engine, to: &Connection, to_engine: &Engine, data: &[u8]) {
    let mut src = Buf::new(from_engine, data.len());
    src.bytes.copy_from_slice(data);
    let dst = Buf::new(to_engine, data.len());
    let r = to.recv(dst.mr, dst.addr(), data.len()).unwrap();
    let s = from.send(&[(src.mr, src.addr(), data.len())]).unwrap();
    assert_eq!(wait(from, s).unwrap(), data.len() as u64);
    assert_eq!(wait(to, r).unwrap(), data.len() as u64);
    common::assert_same(&dst.bytes, data, &format!("{} bytes received", data.len()));
}

/// `conn` (of `engine`) writes `data` into `target` and reads it back into a buffer of its own.
fn write_read(conn: &Connection, engine: &Engine, remote: uccl_tcpx::FifoItem, data: &[u8]) {
    let mut src = Buf::new(engine, data.len());
    src.bytes.copy_from_slice(data);
    let w = conn.write(&[OneSided { mr: src.mr, addr: src.addr(), len: data.len(), remote }]).unwrap();
    assert_eq!(wait(conn, w).unwrap(), data.len() as u64);
    let back = Buf::new(engine, data.len());
    let r = conn.read(&[OneSided { mr: back.mr, addr: back.addr(), len: data.len(), remote }]).unwrap();
    assert_eq!(wait(conn, r).unwrap(), data.len() as u64);
    common::assert_same(&back.bytes, data, &format!("{} bytes written and read back", data.len()));
}

/// Writes, reads and two-sided transfers initiated from either end.
fn both_ways(p: &Pair) {
    let max = *SIZES.iter().max().unwrap();
    for (k, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, k as u64);
        send_recv(&p.ab, &p.a, &p.ba, &p.b, &data);
        send_recv(&p.ba, &p.b, &p.ab, &p.a, &data);
        for (conn, engine, target_engine) in [(&p.ab, &p.a, &p.b), (&p.ba, &p.b, &p.a)] {
            let target = Buf::new(target_engine, max);
            let remote = target_engine.prepare_fifo(target.mr, target.addr(), max).unwrap();
            write_read(conn, engine, remote, &data);
            common::assert_same(&target.bytes[..len], &data, "the target holds what was written");
        }
    }
}

#[test]
fn engines_of_one_process_keep_the_plugin_out_of_their_connection() {
    let out = plugin::strict_child(ChildTest::new("child_engines_of_one_process")).run();
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent with the fake at its strict defaults"]
fn child_engines_of_one_process() {
    plugin::assert_strict();
    let p = pair(local_config());
    assert_eq!((p.a.transport(), p.b.transport()), (FAKE, FAKE));
    assert_eq!((p.ab.peer.locality, p.ba.peer.locality), (Locality::SameProcess, Locality::SameProcess));
    assert_eq!((p.ab.peer.channels, p.ba.peer.channels), ("socket", "socket"));
    both_ways(&p);
    // An engine connecting to itself is a peer of this process too.
    let ab = p.a.connect("127.0.0.1", "0", p.a.address().port()).unwrap();
    let ba = common::accept(&p.a).unwrap();
    assert_eq!((ab.peer.channels, ba.peer.channels), ("socket", "socket"));
    send_recv(&ab, &p.a, &ba, &p.a, &pattern(SIZES[2], 9));
    // Their channels run on the socket transport, so an acceptor left at its default takes that
    // transport's channel count, not the plugin's, whatever the connector offers.
    let offering = Arc::new(Engine::new(Config { num_channels: Some(4), ..local_config() }).unwrap());
    let default = Arc::new(Engine::new(Config { num_channels: None, ..local_config() }).unwrap());
    let socket_channels = Config::default().channels_for(ChannelTransport::Socket).min(4) as usize;
    let out = offering.connect("127.0.0.1", "0", default.address().port()).unwrap();
    let back = common::accept(&default).unwrap();
    assert_eq!((out.peer.channels, back.peer.channels), ("socket", "socket"));
    assert_eq!((out.num_channels(), back.num_channels()), (socket_channels, socket_channels));
    send_recv(&out, &offering, &back, &default, &pattern(SIZES[2], 10));
    println!("child checked");
}

#[test]
fn a_process_of_this_host_keeps_the_plugin_out_of_the_connection() {
    let out = plugin::strict_child(ChildTest::new("child_host_driver")).run();
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "runs as the peer process of child_host_driver"]
fn child_host_peer() {
    plugin::assert_strict();
    let engine = Arc::new(Engine::new(local_config()).unwrap());
    let max = *SIZES.iter().max().unwrap();
    let target = Buf::new(&engine, max);
    let item = engine.prepare_fifo(target.mr, target.addr(), max).unwrap();
    println!("PEER {} {}", engine.address().port(), common::engine::fifo_to_hex(&item));
    let conn = common::accept(&engine).unwrap();
    assert_eq!((conn.peer.locality, conn.peer.channels), (Locality::SameHost, "socket"));
    // Echoes every message back; the driver checks both directions.
    for &len in &SIZES {
        let mut buf = Buf::new(&engine, len);
        let r = conn.recv(buf.mr, buf.addr(), len).unwrap();
        assert_eq!(wait(&conn, r).unwrap(), len as u64);
        let echo = std::mem::take(&mut buf.bytes);
        let mut out = Buf::new(&engine, len);
        out.bytes.copy_from_slice(&echo);
        let s = conn.send(&[(out.mr, out.addr(), len)]).unwrap();
        assert_eq!(wait(&conn, s).unwrap(), len as u64);
    }
    testkit::child::park_until_killed()
}

#[test]
#[ignore = "run by its parent with the fake at its strict defaults"]
fn child_host_driver() {
    plugin::assert_strict();
    let mut peer = ChildTest::new("child_host_peer").ignored().spawn();
    let line = peer.announcement("PEER ", Duration::from_secs(120));
    let (port, hex) = line.trim().split_once(' ').unwrap();
    let remote = common::engine::fifo_from_hex(hex);
    let engine = Engine::new(local_config()).unwrap();
    assert_eq!(engine.transport(), FAKE);
    let conn = engine.connect("127.0.0.1", "0", port.parse().unwrap()).unwrap();
    assert_eq!((conn.peer.locality, conn.peer.channels), (Locality::SameHost, "socket"));
    for (k, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, 20 + k as u64);
        write_read(&conn, &engine, remote, &data);
        let echo = Buf::new(&engine, len);
        let r = conn.recv(echo.mr, echo.addr(), len).unwrap();
        let mut src = Buf::new(&engine, len);
        src.bytes.copy_from_slice(&data);
        let s = conn.send(&[(src.mr, src.addr(), len)]).unwrap();
        assert_eq!(wait(&conn, s).unwrap(), len as u64);
        assert_eq!(wait(&conn, r).unwrap(), len as u64, "the peer's echo");
        common::assert_same(&echo.bytes, &data, &format!("{len} bytes sent and echoed"));
    }
    println!("child checked");
}

#[test]
fn the_test_override_keeps_same_host_peers_on_the_plugin() {
    // This process runs with the harness's pins: the fake carries same-host traffic.
    let p = pair(Config { local_peers: LocalPeers::Plugin, ..local_config() });
    assert_eq!((p.ab.peer.locality, p.ab.peer.channels, p.ba.peer.channels), (Locality::SameProcess, FAKE, FAKE));
    send_recv(&p.ab, &p.a, &p.ba, &p.b, &pattern(SIZES[2], 3));
    send_recv(&p.ba, &p.b, &p.ab, &p.a, &pattern(SIZES[2], 4));
}

#[test]
fn ends_that_route_same_host_peers_differently_are_refused() {
    for (a, b) in [(LocalPeers::Socket, LocalPeers::Plugin), (LocalPeers::Plugin, LocalPeers::Socket)] {
        let a = Engine::new(Config { local_peers: a, ..local_config() }).unwrap();
        let b = Engine::new(Config { local_peers: b, ..local_config() }).unwrap();
        let Err(err) = a.connect("127.0.0.1", "0", b.address().port()) else { panic!("the connection is refused") };
        assert_eq!(err.status(), UcclStatus::ErrNotSupported, "{err}");
        assert!(err.message().contains("UCCL_TCPX_LOCAL_PEERS"), "{err}");
    }
}

#[test]
fn peers_without_a_host_identity_stay_on_the_plugin() {
    // UCCL_TCPX_DISABLE_IPC=1 on either end: neither takes the other for local.
    let p = pair(Config { disable_ipc: true, ..local_config() });
    assert_eq!((p.ab.peer.locality, p.ab.peer.channels, p.ba.peer.channels), (Locality::Remote, FAKE, FAKE));
    send_recv(&p.ab, &p.a, &p.ba, &p.b, &pattern(SIZES[2], 5));
}
