//! The request trace (`FAKE_TCPX_DEBUG=1`): every request, its unpack slot and the comm's counters
//! on stderr, so that one run of a consumer that hangs (NCCL over the fake) shows which call last
//! completed.

mod common;

use common::{Aligned, Plugin, Unpack, pattern};
use uccl_tcpx::internal::ncclnet::*;

/// Two messages through one pair, checked.
fn two_messages() {
    let p = Plugin::init();
    let pair = p.pair(0);
    let unpack = Unpack::host(&pair);
    let dst = Aligned::new(1 << 20);
    let rmh = p.reg(pair.recv, dst.ptr(), 1 << 20, NCCL_PTR_CUDA).unwrap();
    for (k, size) in [(0u64, 4096usize), (1, 100_000)] {
        let data = pattern(size, k);
        let smh = p.reg(pair.send, data.as_ptr(), size, NCCL_PTR_HOST).unwrap();
        let r = p.irecv(pair.recv, dst.ptr(), 1 << 20, rmh).unwrap();
        let s = p.isend(pair.send, data.as_ptr(), size, smh).unwrap();
        p.wait_both(s, r).unwrap();
        assert!(unpack.gather(k as usize, size, 1 << 30) == data);
        assert_eq!(p.consume(pair.recv, r), 0);
    }
}

#[test]
fn trace_shows_every_request_and_its_slot() {
    let Some((status, text)) =
        common::child_outcome("trace_shows_every_request_and_its_slot", &[("FAKE_TCPX_DEBUG", "1")])
    else {
        two_messages();
        return;
    };
    assert!(status.success(), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("fake-tcpx[")).collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    for needle in [
        "accept: recv comm",
        "connect: send comm",
        "irecv k=0 slot=0 size=1048576 into 0x",
        "(CUDA registration; posted 1, done 0, consumed 0)",
        "isend k=1 slot=1 size=100000 from 0x",
        "(HOST registration)",
        "k=1 slot=1: the sender's 100000 B arrive as 25 fragments",
        "test k=1 slot=1 done: cnt[1]=25 published",
        "irecvConsumed k=1 slot=1 (posted 2, done 2, consumed 2)",
    ] {
        assert!(has(needle), "no trace line with {needle:?} in:\n{}", lines.join("\n"));
    }
    assert!(lines.iter().any(|l| l.contains(" send ") && l.contains("test k=1 slot=1 done")), "{}", lines.join("\n"));
    // Lines carry the process id and a time, in order.
    let times: Vec<f64> =
        lines.iter().map(|l| l.split_whitespace().nth(1).and_then(|t| t.parse().ok()).expect("a time")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[test]
fn no_trace_by_default() {
    let Some((status, text)) = common::child_outcome("no_trace_by_default", &[]) else {
        two_messages();
        return;
    };
    assert!(status.success(), "{text}");
    assert!(!text.contains("fake-tcpx["), "{text}");
}
