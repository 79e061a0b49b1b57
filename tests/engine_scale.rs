//! What connections cost an engine: two engines joined by up to 128 connections run a fixed number
//! of threads whatever the number of connections, each connection end holds one descriptor for its
//! control stream besides its data sockets and well under a MiB of memory, and idle connections
//! cost no CPU (the control reactor and the socket helpers sleep in `epoll_wait`, the progress
//! thread parks, the accept loop sleeps in `poll`, none on a timer). One test in this binary, so that the process's threads,
//! descriptors and CPU time are the engines'.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{Config, Connection, Engine, OneSided, SocketConfig};

mod common;
use common::{accept, wait};

#[test]
fn connections_cost_no_thread_one_control_descriptor_and_no_idle_cpu() {
    // Two channels of one socket each way, two socket helpers a direction and two control threads
    // per engine: every thread an engine may run is started by its first two connections.
    let socket = SocketConfig { nthreads: 1, nsocks_per_thread: 1, helpers: 2, ..SocketConfig::default() };
    // Polling for chunks in flight on: it must end with the transfers, so idle engines still park.
    let progress_poll = Duration::from_micros(300);
    let config = Config { num_channels: Some(2), control_threads: 2, socket, progress_poll, ..common::loopback() };
    let a = Arc::new(Engine::new(config.clone()).unwrap());
    let b = Arc::new(Engine::new(config).unwrap());
    let mut target = vec![0u8; 4096];
    let tmr = b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let item = b.prepare_fifo(tmr, target.as_mut_ptr() as usize, target.len()).unwrap();
    let mut src = vec![7u8; 4096];
    let smr = a.register(src.as_ptr() as usize, src.len()).unwrap();
    let mut conns: Vec<(Arc<Connection>, Arc<Connection>)> = Vec::new();
    let (mut threads_at, mut fds_at, mut rss_at) = (Vec::new(), Vec::new(), Vec::new());
    for n in [4, 20, 128] {
        while conns.len() < n {
            let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
            let ba = accept(&b).unwrap();
            // Each connection moves bytes of its own once (inline, and over its channels) before
            // it idles; every byte is checked.
            for len in [8, 4096] {
                src.fill((conns.len() * 2 + usize::from(len > 8)) as u8);
                let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote: item }]).unwrap();
                assert_eq!(wait(&ab, w).unwrap(), len as u64);
                assert!(target[..len] == src[..len], "connection {}'s {len}-byte write landed wrong", conns.len());
            }
            conns.push((ab, ba));
        }
        threads_at.push(common::threads());
        fds_at.push(testkit::cost::descriptors());
        rss_at.push(testkit::cost::resident_kib());
    }
    // Per engine: progress, accept loop, 2 control reactor threads, 2 sending and 2 receiving helpers.
    assert_eq!(threads_at, [16, 16, 16], "library threads with 4, 20 and 128 connections");
    // Each more connection has two ends here, each with 2 data sockets a direction and its control
    // socket.
    let per_connection = (fds_at[2] - fds_at[1]) as f64 / 108.0;
    assert_eq!(per_connection, 2.0 * (4.0 + 1.0), "descriptors per connection: {fds_at:?}");
    // Memory: each connection, both its ends, adds well under 1 MiB (about 40 KiB measured).
    let kib_per_connection = (rss_at[2].saturating_sub(rss_at[1])) / 108;
    eprintln!("resident memory {rss_at:?} KiB at 4, 20 and 128 connections: {kib_per_connection} KiB a connection");
    assert!(kib_per_connection <= 1024, "{kib_per_connection} KiB a connection: {rss_at:?} KiB");

    let idle = Duration::from_secs(2);
    let woke = common::library_wakeups_while_idle(idle);
    eprintln!("{} idle connections for {idle:?}: the library's threads slept {woke} times", conns.len());
    // Nothing should run at all: a thread per connection waking on a timer would sleep again 10+
    // times a second, each of the 40 ends, and a progress thread or an accept loop on a timer tens
    // to hundreds of times.
    assert!(woke < 10, "the library's threads woke {woke} times over {idle:?} idle");

    for (ab, ba) in conns.drain(..) {
        a.close_connection(&ab);
        b.close_connection(&ba);
    }
    // The connections' threads ended with them: each engine keeps its progress thread and accept loop.
    common::threads_settle(4, common::PATIENCE);
}
