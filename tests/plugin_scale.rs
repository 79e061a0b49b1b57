//! What connections cost a plugin engine (host memory over the fake NIC in host mode): the library
//! runs as many threads with 32 connections as with 4, every connection having moved data; no
//! thread is started per connection or per comm on the plugin path. One test in this binary, so
//! that the process's threads are the engines'.
//!
//! Resident memory is printed, not asserted: over the fake it is mostly what the fake holds as
//! TCPX does per comm (about 7 MiB a send comm, 9 a receive comm, at 2 sockets and 512 KiB
//! chunks; `crates/fake-tcpx/src/footprint.rs`, `perf-log/fan-out.md`).

use std::sync::Arc;

use uccl_tcpx::{Engine, OneSided};

mod common;
use common::{accept, pattern, plugin, wait};

#[test]
fn plugin_connections_start_no_thread_of_the_library() {
    const LEN: usize = 1 << 20;
    let config = plugin::config(2, 256 << 10);
    let a = Arc::new(Engine::new(config.clone()).unwrap());
    let b = Arc::new(Engine::new(config).unwrap());
    let mut target = vec![0u8; LEN];
    let tmr = b.register(target.as_mut_ptr() as usize, LEN).unwrap();
    let item = b.prepare_fifo(tmr, target.as_mut_ptr() as usize, LEN).unwrap();
    let mut conns = Vec::new();
    let (mut threads_at, mut rss_at) = (Vec::new(), Vec::new());
    for n in [4, 16, 32] {
        while conns.len() < n {
            let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
            let ba = accept(&b).unwrap();
            // Each connection writes bytes of its own over its channels before it idles.
            let src = pattern(LEN, conns.len() as u64 + 1);
            let smr = a.register(src.as_ptr() as usize, LEN).unwrap();
            let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: LEN, remote: item }]).unwrap();
            assert_eq!(wait(&ab, w).unwrap(), LEN as u64);
            assert!(target == src, "connection {}'s write landed whole", conns.len());
            a.deregister(smr).unwrap();
            conns.push((ab, ba));
        }
        threads_at.push(common::threads());
        rss_at.push(testkit::cost::resident_kib());
    }
    eprintln!("library threads at 4, 16 and 32 connections: {threads_at:?}; resident {rss_at:?} KiB");
    assert!(threads_at.iter().all(|&t| t == threads_at[0]), "threads grew with connections: {threads_at:?}");
    for (ab, ba) in conns.drain(..) {
        a.close_connection(&ab);
        b.close_connection(&ba);
    }
}
