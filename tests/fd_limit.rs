//! The open-file limit: engines raise the soft limit to the hard one, and a connection refused for
//! lack of descriptors says which limit was reached instead of a bare "Too many open files". The
//! descriptor table grows with the engine and its connections, not at a transfer.

mod common;

use common::engine::loopback;
use testkit::child::ChildTest;
use testkit::cost::{descriptor_table, descriptors};
use uccl_tcpx::Engine;

fn nofile() -> libc::rlimit {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a writable rlimit that outlives the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit
}

#[test]
fn an_engine_raises_the_soft_limit_and_names_it_when_it_runs_out() {
    // The serving engine lives in this process, so only the connecting child runs short.
    let server = Engine::new(loopback()).unwrap();
    ChildTest::new("running_out_of_descriptors")
        .ignored()
        .env_cleared("UCCL_TCPX_")
        .env("FD_LIMIT_TEST_PORT", server.address().port().to_string())
        .run();
    server.shutdown();
}

#[test]
#[ignore = "runs in a child process: it lowers the process's open-file limit"]
fn running_out_of_descriptors() {
    let port: u16 = std::env::var("FD_LIMIT_TEST_PORT").expect("started by its parent test").parse().unwrap();
    let a = Engine::new(loopback()).unwrap();
    let limit = nofile();
    assert_eq!(limit.rlim_cur, limit.rlim_max, "the engine left the soft limit below the hard one");

    // Leave room for a handful of descriptors beyond what is open now: connections soon run out.
    let open = descriptors() as libc::rlim_t;
    let low = libc::rlimit { rlim_cur: open + 24, rlim_max: limit.rlim_max };
    // SAFETY: a valid rlimit that outlives the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);

    let mut conns = Vec::new();
    let err = loop {
        assert!(conns.len() < 64, "{} connections within a limit of {} descriptors", conns.len(), low.rlim_cur);
        match a.connect("127.0.0.1", "0", port) {
            Ok(c) => conns.push(c),
            Err(e) => break e,
        }
    };
    let text = err.to_string();
    let named = format!("open-file limit is reached: RLIMIT_NOFILE soft {}", low.rlim_cur);
    assert!(text.contains(&named), "the error does not name the limit: {text}");
    println!("refused after {} connections: {text}", conns.len());
    drop(conns);
    a.shutdown();
}

#[test]
fn a_connections_first_large_transfer_grows_no_table_and_starts_no_helper() {
    ChildTest::new("first_large_transfer_in_a_fresh_process").ignored().env_cleared("UCCL_TCPX_").run();
}

#[test]
#[ignore = "runs in a child process: it watches the whole process's descriptor table and threads"]
fn first_large_transfer_in_a_fresh_process() {
    use common::engine::{Region, pair, wait};
    use uccl_tcpx::OneSided;
    use uccl_tcpx::internal::config::SocketConfig;
    // Eight sockets per comm, opened as traffic asks: the first 16 MiB write adds the others.
    let socket = SocketConfig { nthreads: 2, nsocks_per_thread: 4, helpers: 8, ..SocketConfig::default() };
    let p = pair(uccl_tcpx::Config { socket, ..loopback() });
    let len = 16 << 20;
    let src = Region::new(&p.a, (0..len).map(|i| (i % 251) as u8).collect());
    let dst = Region::new(&p.b, vec![0u8; len]);
    let (table, open, threads) = (descriptor_table(), descriptors(), common::socket_helpers());
    // The connection left room for its data sockets and more (the kernel would grow the table,
    // stalling every thread that opens a descriptor meanwhile, at the transfer that opens them).
    let limit = nofile().rlim_cur as usize;
    assert!(table >= (open + 1000).min(limit), "a table of {table} for {open} descriptors");
    let w = p.ab.write(&[OneSided { mr: src.mr, addr: src.addr(), len, remote: dst.fifo }]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), len as u64);
    assert!(dst.bytes == src.bytes, "the 16 MiB arrived intact");
    assert!(descriptors() > open, "the write added data sockets ({open} descriptors before)");
    assert_eq!(descriptor_table(), table, "the descriptor table did not grow at the transfer");
    assert_eq!(common::socket_helpers(), threads, "no socket helper started at the transfer");
}
