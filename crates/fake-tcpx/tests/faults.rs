//! Injected faults (FAKE_TCPX_FAULT): a dropped connection surfaces as rc 2 on both sides, a
//! stalled comm never completes (a consumer needs a progress watchdog, as with TCPX).

mod common;

use std::time::{Duration, Instant};

use common::{Plugin, assert_warned, pattern};
use uccl_tcpx::internal::ncclnet::*;

isolated_test!(
    fn drop_surfaces_as_rc_2() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let src = pattern(4096, 1);
        let mut dst = vec![0u8; 4096];
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        for _ in 0..2 {
            let r = p.irecv(pair.recv, dst.as_mut_ptr(), 4096, rmh).unwrap();
            let s = p.isend(pair.send, src.as_ptr(), 4096, smh).unwrap();
            p.wait_both(s, r).unwrap();
            assert_eq!(p.consume(pair.recv, r), 0);
        }
        // Both comms dropped their connection after their second completion.
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 4096, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 4096, smh).unwrap();
        assert_eq!(p.test(s), Err(NCCL_SYSTEM_ERROR));
        assert_warned("Connection closed by remote peer");
        assert_eq!(p.test(r), Err(NCCL_SYSTEM_ERROR));
        assert_warned("Connection closed by remote peer");
        assert_eq!(p.test(r), Err(NCCL_SYSTEM_ERROR), "sticky");
    }
    env: ["FAKE_TCPX_FAULT" => "drop:2"]
);

isolated_test!(
    fn peer_close_surfaces_as_rc_2() {
        // A sender that closes while the receiver still expects data: what was sent still arrives,
        // the next receive fails with rc 2 (TCPX: "Connection closed by remote peer").
        let p = Plugin::init();
        let pair = p.pair(0);
        let src = pattern(100, 1);
        let mut dst = vec![0u8; 100];
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        p.wait(s).unwrap();
        // SAFETY: pair.send is a live send comm, closed once.
        assert_eq!(unsafe { p.t.close_send.unwrap()(pair.send) }, 0);
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh).unwrap();
        p.wait(r).unwrap();
        assert_eq!(p.consume(pair.recv, r), 0);
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh).unwrap();
        let deadline = Instant::now() + testkit::PATIENCE;
        let rc = loop {
            match p.test(r) {
                Ok(false) => assert!(Instant::now() < deadline, "the receiver never noticed the close"),
                Ok(true) => panic!("received from a closed connection"),
                Err(rc) => break rc,
            }
        };
        assert_eq!(rc, NCCL_SYSTEM_ERROR);
        assert_warned("Connection closed by remote peer");
    }
);

isolated_test!(
    fn stall_never_completes() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let src = pattern(100, 1);
        let mut dst = vec![0u8; 100];
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        p.wait_both(s, r).unwrap();
        assert_eq!(p.consume(pair.recv, r), 0);
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert_eq!(p.test(s), Ok(false));
            assert_eq!(p.test(r), Ok(false));
        }
        // Rules still apply to a stalled comm.
        let r2 = p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh).unwrap();
        assert_eq!(p.test(r2), Err(NCCL_INTERNAL_ERROR));
    }
    env: ["FAKE_TCPX_FAULT" => "stall:1"]
);
