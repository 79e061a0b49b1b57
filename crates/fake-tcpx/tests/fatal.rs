//! Where TCPX ends the process, the fake does too: more than 2048 fragments in one receive
//! ("failstop"), payload that reached a devmem receive through host memory (a same-host
//! connection: "data landed on host memory"), and two threads inside the plugin where TCPX takes no
//! lock. Each case runs the consumer in a child process and checks that it exited with status 1 and
//! TCPX's message; the cases around them show what stays allowed.

mod common;

use std::ffi::{c_char, c_int, c_ulong, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use common::{Aligned, Plugin, pattern};
use uccl_tcpx::internal::ncclnet::*;

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

unsafe extern "C" {
    fn fake_tcpx_test_slow_logger(
        level: c_int,
        flags: c_ulong,
        file: *const c_char,
        line: c_int,
        fmt: *const c_char,
        ...
    );
    static fake_tcpx_test_slow_logger_entered: c_int;
}

/// Messages the slow logger has started on so far.
fn slow_logger_entered() -> i32 {
    let p = std::ptr::addr_of!(fake_tcpx_test_slow_logger_entered);
    // SAFETY: p is the address of logger.c's int, a static that lives for the whole process; C touches it
    // only with __atomic builtins, so an atomic view is sound.
    unsafe { AtomicI32::from_ptr(p as *mut i32) }.load(Ordering::SeqCst)
}

/// Sends `len` bytes into a receive registered as `recv_type` and waits for both (or the exit).
fn transfer(p: &Plugin, len: usize, recv_type: c_int) {
    transfer_on(p, 0, len, recv_type);
}

/// The same over device `dev`.
fn transfer_on(p: &Plugin, dev: c_int, len: usize, recv_type: c_int) {
    let pair = p.pair(dev);
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

exiting_test!(
    fn same_host_devmem_receive_exits_the_process() {
        transfer(&Plugin::init(), 100_000, NCCL_PTR_CUDA);
    }
    env: ["FAKE_TCPX_SAME_HOST" => "fatal"]
    expect: ["data landed on host memory", "this process", "FAKE_TCPX_SAME_HOST=allow"]
);

isolated_test!(
    fn same_host_without_devmem_payload_is_no_fatal() {
        // A host receive is a plain recv(), which loopback bytes satisfy; an empty devmem receive
        // carries no payload at all.
        let p = Plugin::init();
        transfer(&p, 100_000, NCCL_PTR_HOST);
        transfer(&p, 0, NCCL_PTR_CUDA);
    }
    env: ["FAKE_TCPX_SAME_HOST" => "fatal"]
);

exiting_test!(
    fn devmem_receive_over_a_device_without_devmem_exits_the_process() {
        let p = Plugin::init();
        // Device 0 is eth0 (TCPX lists it when NCCL_GPUDIRECTTCPX_SOCKET_IFNAME is unset): a host
        // receive is a plain recv(), an empty devmem receive carries no payload, the NICs with devmem
        // steer theirs.
        transfer_on(&p, 0, 100_000, NCCL_PTR_HOST);
        transfer_on(&p, 0, 0, NCCL_PTR_CUDA);
        transfer_on(&p, 1, 100_000, NCCL_PTR_CUDA);
        transfer_on(&p, 0, 100_000, NCCL_PTR_CUDA);
    }
    env: ["NCCL_GPUDIRECTTCPX_SOCKET_IFNAME" => ""]
    expect: ["data landed on host memory", "device 0 (eth0) has no devmem rx queues", "exiting the process"]
);

isolated_test!(
    fn same_host_allowed_by_its_knob() {
        transfer(&Plugin::init(), 100_000, NCCL_PTR_CUDA);
    }
    env: ["FAKE_TCPX_SAME_HOST" => "allow"]
);

/// Initialises the plugin with the slow logger (its init message takes half a second).
fn init_slow() -> Plugin {
    let p = Plugin::load();
    // SAFETY: a freshly loaded plugin, initialised with logger.c's slow logger, which lives for the whole
    // process.
    assert_eq!(unsafe { p.t.init.unwrap()(Some(fake_tcpx_test_slow_logger)) }, 0);
    p
}

/// Runs `inside` on another thread, which stays inside that plugin call while the slow logger takes
/// its message, and `meanwhile` on this thread once it is in there.
fn overlap(inside: impl FnOnce() + Send + 'static, meanwhile: impl FnOnce()) {
    let before = slow_logger_entered();
    let t = std::thread::Builder::new().name("first".into()).spawn(inside).unwrap();
    let deadline = Instant::now() + testkit::PATIENCE;
    while slow_logger_entered() == before {
        assert!(Instant::now() < deadline, "the first thread never logged");
        std::thread::yield_now();
    }
    meanwhile();
    t.join().unwrap();
}

exiting_test!(
    fn two_control_calls_at_once_exit_the_process() {
        let p = Plugin::load();
        let init = p.t.init.unwrap();
        // init logs as it finishes, through the slow logger: listen comes in meanwhile.
        overlap(
            // SAFETY: init is the fresh plugin's entry point, which stays loaded (p lives to the end of the
            // test); the logger is logger.c's, process-long.
            move || assert_eq!(unsafe { init(Some(fake_tcpx_test_slow_logger)) }, 0),
            || {
                p.listen(0);
            },
        );
    }
    env: []
    expect: ["two threads inside the plugin at once: listen on thread", "while init on thread", "'first' was running", "per-GPU setup"]
);

/// A pair with a receive and a send posted: (send comm, receive comm, receive request, send request).
fn posted(p: &Plugin) -> (usize, usize, usize, usize) {
    let pair = p.pair(0);
    let buf = Box::leak(vec![0u8; 64].into_boxed_slice());
    let smh = p.reg(pair.send, buf.as_ptr(), 64, NCCL_PTR_HOST).unwrap();
    let rmh = p.reg(pair.recv, buf.as_mut_ptr(), 64, NCCL_PTR_HOST).unwrap();
    let r = p.irecv(pair.recv, buf.as_mut_ptr(), 64, rmh).unwrap();
    let s = p.isend(pair.send, buf.as_ptr(), 64, smh).unwrap();
    (pair.send as usize, pair.recv as usize, r as usize, s as usize)
}

/// irecvConsumed of a send request WARNs from inside the call: with the slow logger the calling
/// thread stays inside a call on the receive comm for half a second.
fn consume_slowly(p: &'static Plugin, recv: usize, send_req: usize) -> impl FnOnce() + Send + 'static {
    move || assert_eq!(p.consume(recv as *mut c_void, send_req as *mut c_void), 0)
}

exiting_test!(
    fn two_calls_on_one_comm_exit_the_process() {
        let p: &'static Plugin = Box::leak(Box::new(init_slow()));
        let (_, recv, r, s) = posted(p);
        overlap(consume_slowly(p, recv, s), || {
            let _ = p.test(r as *mut c_void);
        });
    }
    env: []
    expect: ["two threads inside the plugin at once: test", "while irecvConsumed", "take no lock"]
);

isolated_test!(
    fn control_and_data_calls_on_two_threads_are_allowed() {
        // NCCL's proxy threads: a control call on one, data calls of other comms on another.
        let p: &'static Plugin = Box::leak(Box::new(init_slow()));
        let (send, recv, _, s) = posted(p);
        overlap(consume_slowly(p, recv, s), || {
            p.listen(1);
            let _ = p.test(s as *mut c_void);
            // SAFETY: send is the pair's live send comm (never closed before), closed once here.
            assert_eq!(unsafe { p.t.close_send.unwrap()(send as *mut c_void) }, 0);
        });
    }
);

isolated_test!(
    fn thread_check_off() {
        let p: &'static Plugin = Box::leak(Box::new(init_slow()));
        let (_, recv, r, s) = posted(p);
        overlap(consume_slowly(p, recv, s), || {
            assert_eq!(p.test(r as *mut c_void), Ok(false));
        });
    }
    env: ["FAKE_TCPX_THREAD_CHECK" => "off"]
);
