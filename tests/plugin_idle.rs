//! Idle channels closed over the fake NIC in host mode (`UCCL_TCPX_IDLE_CLOSE_MS`): what TCPX holds
//! per comm (the fake holds it too, `crates/fake-tcpx/src/footprint.rs`) goes once a connection's
//! channels moved nothing for the idle time, and the next transfer gets new channels, listened,
//! connected and accepted one a channel as TCPX wants, its bytes whole. One test in this binary:
//! the fake's counts are the process's.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{Config, Engine, OneSided};

mod common;
use common::{PATIENCE, accept, pattern, plugin, wait, wait_until};

#[test]
fn idle_plugin_channels_give_back_what_tcpx_holds_and_open_again() {
    const LEN: usize = 1 << 20;
    const CONNS: usize = 2;
    let config = Config { idle_close: Some(Duration::from_millis(200)), ..plugin::config(2, 256 << 10) };
    let a = Arc::new(Engine::new(config.clone()).unwrap());
    let b = Arc::new(Engine::new(config).unwrap());
    let fake = plugin::fake_plugin();
    let mut target = vec![0u8; LEN];
    let tmr = b.register(target.as_mut_ptr() as usize, LEN).unwrap();
    let item = b.prepare_fifo(tmr, target.as_mut_ptr() as usize, LEN).unwrap();
    let write = |ab: &uccl_tcpx::Connection, seed: u64, target: &[u8]| {
        let src = pattern(LEN, seed);
        let smr = a.register(src.as_ptr() as usize, LEN).unwrap();
        let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: LEN, remote: item }]).unwrap();
        assert_eq!(wait(ab, w).unwrap(), LEN as u64);
        assert!(target == src, "write {seed} landed whole");
        a.deregister(smr).unwrap();
    };
    let mut conns = Vec::new();
    for i in 0..CONNS {
        let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let ba = accept(&b).unwrap();
        write(&ab, i as u64 + 1, &target);
        conns.push((ab, ba));
    }
    // Two channels of a send and a receive comm, at each end of each connection: a set per
    // connection made at its handshake and one at each opening (a connection idle past 200 ms
    // before its first write, on a slow machine, has opened once already).
    let per_conn = 2 * 2 * 2;
    let made = |conns: &[(Arc<uccl_tcpx::Connection>, Arc<uccl_tcpx::Connection>)]| {
        conns.iter().map(|(ab, _)| per_conn * (1 + ab.channel_renewals().1)).sum::<u64>()
    };
    assert_eq!(plugin::fake_comms(&fake).2, made(&conns), "comms made by the handshakes and openings");
    let parked = |conns: &[(Arc<uccl_tcpx::Connection>, Arc<uccl_tcpx::Connection>)], n: u64| {
        conns.iter().all(|(ab, ba)| ab.channel_renewals().0 >= n && ba.channel_renewals().0 >= n)
    };
    wait_until("every connection's channels closed", PATIENCE, || parked(&conns, 1));
    wait_until("the fake's comms all closed", PATIENCE, || plugin::fake_comms(&fake).0 == 0);
    assert_eq!(plugin::fake_comms(&fake).1, 0, "no byte of TCPX's per-comm memory held");

    // Each connection's next write gets new channels, once.
    for (i, (ab, ba)) in conns.iter().enumerate() {
        let before = (ab.channel_renewals().1, ba.channel_renewals().1);
        write(ab, i as u64 + 10, &target);
        let after = (ab.channel_renewals().1, ba.channel_renewals().1);
        assert_eq!(after, (before.0 + 1, before.1 + 1), "connection {i} opened once");
    }
    assert_eq!(plugin::fake_comms(&fake).2, made(&conns), "new comms, a set an opening");
    let closes = conns.iter().map(|(ab, _)| ab.channel_renewals().0).min().unwrap();
    wait_until("closed again", PATIENCE, || parked(&conns, closes + 1));
    wait_until("the fake's comms closed again", PATIENCE, || plugin::fake_comms(&fake).0 == 0);
    for (ab, ba) in conns.drain(..) {
        a.close_connection(&ab);
        b.close_connection(&ba);
    }
}
