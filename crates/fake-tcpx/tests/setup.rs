//! Connection setup takes TCPX's time (connect.cc `tcpxAsyncConnectV5`, `tcpxAsyncAcceptV5_v5`):
//! 100 ms before each socket on both sides (the listener's data sockets and the ctrl socket), then
//! the flow-steering wait on accept; two knobs shorten it for tests.

mod common;

use std::ptr::null_mut;
use std::time::{Duration, Instant};

use common::Plugin;
use uccl_tcpx::internal::ncclnet::*;

/// Polls connect and accept on one thread, as NCCL's proxy does; returns how long each took.
fn setup_times(p: &Plugin) -> (Duration, Duration) {
    let (handle, lc) = p.listen(0);
    let mut h = handle;
    let mut dh = NcclNetDeviceHandleV7::default();
    let mut dhp: *mut NcclNetDeviceHandleV7 = &mut dh;
    let (mut sc, mut rc) = (null_mut(), null_mut());
    let (mut connected, mut accepted) = (None, None);
    let started = Instant::now();
    while connected.is_none() || accepted.is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "setup never completed");
        if connected.is_none() {
            // SAFETY: h is the 128-byte handle listen wrote, kept in place across polls, and sc a writable
            // local.
            assert_eq!(unsafe { p.t.connect.unwrap()(0, h.as_mut_ptr().cast(), &mut sc, null_mut()) }, 0);
            if !sc.is_null() {
                connected = Some(started.elapsed());
            }
        }
        if accepted.is_none() {
            // SAFETY: lc came from listen; rc is a writable local and dhp points at dh, which lives to the
            // end of the test.
            assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, &mut dhp) }, 0);
            if !rc.is_null() {
                accepted = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (connected.unwrap(), accepted.unwrap())
}

isolated_test!(
    fn setup_takes_tcpx_time() {
        let (connected, accepted) = setup_times(&Plugin::init());
        println!("connect {connected:?}, accept {accepted:?}");
        // Two data sockets and the ctrl socket: 300 ms per side, and accept then waits 400 ms.
        // (Which wait TCPX's variable gives is checked in config.rs; upper bounds would only
        // measure the host's load.)
        assert!(connected >= Duration::from_millis(300), "connect took {connected:?}");
        assert!(accepted >= Duration::from_millis(700), "accept took {accepted:?}");
    }
    env: [
        "FAKE_TCPX_SOCKET_DELAY_MS" => "",
        "FAKE_TCPX_STEERING_WAIT_MS" => "",
        "NCCL_NSOCKS_PERTHREAD" => "2",
        "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS" => "400000",
    ]
);

isolated_test!(
    fn knobs_shorten_setup() {
        let (connected, accepted) = setup_times(&Plugin::init());
        println!("connect {connected:?}, accept {accepted:?}");
        // 8 sockets and a 60 s wait, skipped: the fake's own knobs win over TCPX's variables.
        assert!(accepted < Duration::from_secs(30), "accept took {accepted:?}");
    }
    env: [
        "FAKE_TCPX_SOCKET_DELAY_MS" => "0",
        "FAKE_TCPX_STEERING_WAIT_MS" => "0",
        "NCCL_NSOCKS_PERTHREAD" => "8",
        "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS" => "60000000",
    ]
);
