//! What connections cost the socket transport: two nets (two engines' worth) joined by many comm
//! pairs in both directions run a fixed number of helper threads whatever the number of comms, and
//! idle comms cost no CPU (their helpers sleep in `epoll_wait`, with no timer). One test in this
//! binary, so that the process's threads and CPU time are the transport's alone.

use std::time::Duration;

use uccl_tcpx::SocketConfig;
use uccl_tcpx::internal::transport::socket::DataSocketStats;
use uccl_tcpx::internal::transport::{ListenComm, MrHandle, RecvComm, SendComm};

mod common;
use common::comm::comm_pair;
use common::socket::socket_net;
use common::{PATIENCE, TRANSFER_LIMIT, drive};

type Pair = (Box<dyn SendComm>, Box<dyn RecvComm>, Box<dyn ListenComm>);

/// Moves one message of two pieces over every pair, so each comm opened its second socket and each
/// socket has worked before it idles.
fn exercise(pairs: &mut [Pair]) {
    let msg: Vec<u8> = (0..128 << 10).map(|i| (i % 253) as u8).collect();
    for (tx, rx, _) in pairs.iter_mut() {
        let mut buf = vec![0u8; msg.len()];
        // SAFETY: buf and msg outlive both requests, which are tested to completion just below.
        let r = unsafe { rx.irecv(buf.as_mut_ptr(), buf.len(), MrHandle(0)) }.unwrap().unwrap();
        // SAFETY: as above.
        let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle(0)) }.unwrap().unwrap();
        drive("a send completes", TRANSFER_LIMIT, || tx.test(s).unwrap());
        drive("a receive completes", TRANSFER_LIMIT, || rx.test(r).unwrap());
        assert!(buf == msg, "the message arrived intact");
        rx.irecv_consumed(r).unwrap();
    }
}

#[test]
fn helper_threads_stay_bounded_and_idle_comms_cost_no_cpu() {
    let options = SocketConfig { nthreads: 2, nsocks_per_thread: 1, helpers: 4, ..SocketConfig::default() };
    let (a, b) = (socket_net(options.clone()), socket_net(options));
    let mut pairs: Vec<Pair> = Vec::new();
    let mut threads_at = Vec::new();
    for n in [8, 32] {
        while pairs.len() < 2 * n {
            pairs.push(comm_pair(&a, 0));
            pairs.push(comm_pair(&b, 0));
        }
        exercise(&mut pairs);
        for net in [&a, &b] {
            let all = |s: DataSocketStats| (s.sending == 2 * n as u64 && s.receiving == 2 * n as u64).then_some(());
            common::eventually("every comm has both its sockets", PATIENCE, || all(net.data_socket_stats()));
        }
        // The acceptor that read the added sockets ends once no comm can take another.
        common::wait_until("the acceptors end", PATIENCE, || common::threads() <= 16);
        threads_at.push(common::threads());
    }
    // 2 nets x (4 senders + 4 receivers), reached by 8 pairs (16 sockets each way per net).
    assert_eq!(threads_at, [16, 16], "library threads with 8 and with 32 comm pairs each way");

    let idle = Duration::from_secs(2);
    let woke = common::library_wakeups_while_idle(idle);
    eprintln!("{} idle comm pairs for {idle:?}: the library's threads slept {woke} times", pairs.len());
    // Nothing should run at all: a helper that woke on a timer would sleep again 10+ times a
    // second, each of the 16.
    assert!(woke < 100, "the library's threads woke {woke} times over {idle:?} idle");
    drop(pairs);
    // Helpers are joined by the last comm's drop, but a joined thread can still be listed in
    // /proc for a moment, and an acceptor ends on its own once no comm can take another socket.
    common::threads_settle(0, PATIENCE);
}
