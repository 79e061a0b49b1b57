//! Faults of the plugin seen through the engine: a comm whose connection drops (test returns rc 2)
//! and a comm that silently stops progressing (TCPX's dead helper thread). The fake reads its fault
//! knob once per process, in `init`, so each case re-runs this binary as a child process with the
//! knob set; the children are `#[ignore]`d so a normal run only starts them through their parent.

use std::time::{Duration, Instant};

use uccl_tcpx::{Config, UcclStatus};

mod common;
use common::{ChildTest, plugin};

/// Runs the ignored test `name` in a child process with `FAKE_TCPX_FAULT=fault`; returns its output.
fn run_child(name: &str, fault: &str) -> String {
    ChildTest::new(name)
        .ignored()
        .env("FAKE_TCPX_FAULT", fault)
        .env("UCCL_TCPX_FAKE_PLUGIN", plugin::fake_plugin())
        .run()
}

fn config(timeout: Duration) -> Config {
    Config { timeout, ..plugin::config(2, 64 << 10) }
}

/// Sends 8 MiB from a to b and returns both outcomes and how long they took to settle.
fn transfer_outcomes(cfg: Config) -> (uccl_tcpx::Result<u64>, uccl_tcpx::Result<u64>, Duration) {
    let common::Pair { a, b, ab, ba } = common::pair(cfg);
    let src = common::pattern(8 << 20, 1);
    let mut dst = vec![0u8; src.len()];
    let smr = a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let started = Instant::now();
    let r = ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    let sent = common::wait_done(&ab, s, Duration::from_secs(60));
    let received = common::wait_done(&ba, r, Duration::from_secs(60));
    (sent, received, started.elapsed())
}

#[test]
fn a_dropped_plugin_connection_fails_the_transfer_with_the_plugins_words() {
    let out = run_child("child_dropped_connection", "drop:8");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent with FAKE_TCPX_FAULT set"]
fn child_dropped_connection() {
    // Each comm's eighth chunk drops the link (setup moves no bytes over plugin comms).
    // A watchdog far beyond the transfer's bound: a failure by it would say ErrTimeout.
    let (sent, received, took) = transfer_outcomes(config(Duration::from_secs(600)));
    let errors = [sent.expect_err("send fails"), received.expect_err("receive fails")];
    println!("outcomes after {took:?}: {errors:?}");
    assert!(
        errors.iter().any(|e| e.status() == UcclStatus::ErrRemoteDisconnect && e.message().contains("rc 2")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.message().contains("Connection closed by remote peer") || e.message().contains("peer closed")),
        "the plugin's warning or the peer's close is quoted: {errors:?}"
    );
    assert!(
        errors.iter().all(|e| e.status() != UcclStatus::ErrTimeout),
        "failed by the drop, not the watchdog: {errors:?}"
    );
    println!("child checked");
}

#[test]
fn a_stalled_plugin_comm_is_caught_by_the_watchdog() {
    let out = run_child("child_stalled_comm", "stall:8");
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent with FAKE_TCPX_FAULT set"]
fn child_stalled_comm() {
    let (sent, received, took) = transfer_outcomes(config(Duration::from_millis(1500)));
    let errors = [sent.expect_err("send fails"), received.expect_err("receive fails")];
    println!("outcomes after {took:?}: {errors:?}");
    assert!(errors.iter().any(|e| e.status() == UcclStatus::ErrTimeout), "{errors:?}");
    // Not before the watchdog's timeout; `transfer_outcomes` bounds the wait.
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    println!("child checked");
}
