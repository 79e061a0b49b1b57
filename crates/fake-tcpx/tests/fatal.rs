//! Where TCPX ends the process, the fake does too: more than 2048 fragments in one receive
//! ("failstop"). Each case runs the consumer in a child process and checks that it exited with
//! status 1 and TCPX's message.

mod common;

use std::ffi::c_int;

use common::{Aligned, Plugin, pattern};
use uccl_tcpx::transport::plugin::abi::*;

/// A test whose child must exit with status 1, as TCPX's `exit(1)`, printing `$needle`s.
macro_rules! exiting_test {
    (fn $name:ident() $body:block env: [$($k:expr => $v:expr),* $(,)?] expect: [$($needle:expr),+ $(,)?]) => {
        #[test]
        fn $name() {
            if let Some((status, text)) = common::child_outcome(stringify!($name), &[$(($k, $v)),*]) {
                assert_eq!(status.code(), Some(1), "the child should have exited with status 1:\n{text}");
                $(assert!(text.contains($needle), "no {:?} in the child's output:\n{text}", $needle);)+
                return;
            }
            $body
            panic!("the consumer survived where TCPX exits the process");
        }
    };
}

/// Sends `len` bytes into a receive registered as `recv_type` and waits for both (or the exit).
fn transfer(p: &Plugin, len: usize, recv_type: c_int) {
    let pair = p.pair(0);
    let src = pattern(len, 3);
    let dst = Aligned::new(len);
    let smh = p.reg(pair.send, src.as_ptr(), len, NCCL_PTR_HOST).unwrap();
    let rmh = p.reg(pair.recv, dst.ptr(), len.div_ceil(4096).max(1) * 4096, recv_type).unwrap();
    let r = p.irecv(pair.recv, dst.ptr(), len, rmh).unwrap();
    let s = p.isend(pair.send, src.as_ptr(), len, smh).unwrap();
    p.wait_both(s, r).unwrap();
    assert_eq!(p.consume(pair.recv, r), 0);
}

exiting_test!(
    fn failstop_exits_the_process() {
        // 8 MiB + 1 byte of whole pages: 2049 fragments.
        transfer(&Plugin::init(), (8 << 20) + 1, NCCL_PTR_CUDA);
    }
    env: []
    expect: ["request too many pages 2049, failstop", "exiting the process"]
);

exiting_test!(
    fn failstop_in_one_chunk_exits_the_process() {
        // A single 8 MiB chunk fills a task's 2048-entry scatter list, though the request would hold it.
        transfer(&Plugin::init(), 8 << 20, NCCL_PTR_CUDA);
    }
    env: ["FAKE_TCPX_CHUNK" => "8388608"]
    expect: ["received 2048/2048 segs, failstop"]
);
