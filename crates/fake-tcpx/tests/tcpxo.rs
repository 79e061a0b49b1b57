//! TCPXO mode (`FAKE_TCPX_PLUGIN_KIND=tcpxo`): the rules of Google's GPUDirect-TCPXO plugin as a raw
//! v7 consumer meets them. One test per row of BEHAVIOURS_TCPXO.md; each fails if the fake
//! stopped enforcing its rule. The GPU cases need a CUDA driver and a GPU and report themselves
//! skipped without one (a failure where UCCL_TCPX_REQUIRE_GPU=1 says the host has one).

mod common;

use std::ffi::{CStr, c_int, c_void};
use std::ptr::null_mut;
use std::time::Duration;

use common::{Aligned, Plugin, UNWRITTEN, assert_warned, pattern, take_warnings};
use cudarc::driver::{result, sys};
use uccl_tcpx::internal::ncclnet::*;

const KIND: (&str, &str) = ("FAKE_TCPX_PLUGIN_KIND", "tcpxo");

/// How long a connect, accept or request of the fake may take on a loaded machine.
const LIMIT: Duration = Duration::from_secs(60);

/// A test run in its own process with the library loaded as TCPXO, and the knobs given.
macro_rules! tcpxo_test {
    (fn $name:ident() $body:block $(env: [$($k:expr => $v:expr),* $(,)?])?) => {
        #[test]
        fn $name() {
            if common::spawn_in_child(stringify!($name), &[KIND $($(, ($k, $v))*)?]) {
                return;
            }
            $body
        }
    };
}

/// A TCPXO test whose child must end with status 1, printing each of `$needle`.
macro_rules! ending_test {
    (fn $name:ident() $body:block $(env: [$($k:expr => $v:expr),* $(,)?])? expect: [$($needle:expr),+ $(,)?]) => {
        #[test]
        fn $name() {
            if let Some((status, text)) = common::child_outcome(stringify!($name), &[KIND $($(, ($k, $v))*)?]) {
                assert_eq!(status.code(), Some(1), "the child should have ended with status 1:\n{text}");
                $(assert!(text.contains($needle), "no {:?} in the child's output:\n{text}", $needle);)+
                return;
            }
            $body
            panic!("the consumer survived where TCPXO ends the process");
        }
    };
}

unsafe extern "C" {
    /// tests/logger.c: a second consumer's logger; its messages start with "second: ".
    fn fake_tcpx_test_logger_second(
        level: c_int,
        flags: std::ffi::c_ulong,
        file: *const std::ffi::c_char,
        line: c_int,
        fmt: *const std::ffi::c_char,
        ...
    );
}

/// A 4 KiB-aligned host buffer filled with `fill`, registered as NCCL_PTR_CUDA (host memory stands
/// in for device memory in host mode) on `comm`.
fn cuda_buffer(p: &Plugin, comm: *mut c_void, len: usize, fill: u8) -> (Aligned, *mut c_void) {
    let buf = Aligned::new(len);
    // SAFETY: buf holds at least len bytes (Aligned rounds up to 4 KiB), owned here.
    unsafe { std::ptr::write_bytes(buf.ptr(), fill, len) };
    let mh = p.reg(comm, buf.ptr(), len.div_ceil(4096).max(1) * 4096, NCCL_PTR_CUDA).unwrap();
    (buf, mh)
}

/// The `len` bytes at `off` of `buf`.
fn bytes(buf: &Aligned, off: usize, len: usize) -> Vec<u8> {
    // SAFETY: every caller reads inside the buffer it allocated with at least off + len bytes.
    unsafe { std::slice::from_raw_parts(buf.ptr().add(off), len) }.to_vec()
}

/// Tests every request in turn until each is done (a proxy thread's loop: the sends' bytes need
/// the receives' progress once the socket is full); the sizes the receives reported.
fn finish_all(p: &Plugin, sends: &[*mut c_void], receives: &[*mut c_void]) -> Vec<c_int> {
    let all: Vec<*mut c_void> = sends.iter().chain(receives).copied().collect();
    let mut sizes: Vec<Option<c_int>> = vec![None; all.len()];
    testkit::drive("every request completes", LIMIT, || {
        for (size, &req) in sizes.iter_mut().zip(&all) {
            if size.is_none() {
                let (done, n) = p.test_sized(req).unwrap();
                *size = done.then_some(n);
            }
        }
        sizes.iter().all(Option::is_some).then_some(())
    });
    sizes[sends.len()..].iter().map(|s| s.unwrap()).collect()
}

/// The device handle TCPXO writes for either end: HOST, no handle, no proxy progress.
fn assert_host_handle(h: &NcclNetDeviceHandleV7, which: &str) {
    let got = (h.net_device_type, h.net_device_version, h.handle, h.size, h.needs_proxy_progress);
    assert_eq!(got, (NCCL_NET_DEVICE_HOST, NCCL_NET_DEVICE_UNPACK_VERSION, null_mut(), 0, 0), "{which}");
}

// --- table, properties, devices ---

tcpxo_test!(
    fn tcpxo_table_has_no_irecv_consumed_and_an_iflush_that_does_nothing() {
        let p = Plugin::load();
        let t = &p.t;
        // SAFETY: the table's name is a static NUL-terminated string of the plugin, loaded while p lives.
        assert_eq!(unsafe { CStr::from_ptr(t.name) }.to_str().unwrap(), "FakeFasTrak");
        assert!(t.irecv_consumed.is_none(), "TCPXO's table ends with irecvConsumed NULL");
        assert!(t.init.is_some() && t.isend.is_some() && t.irecv.is_some() && t.test.is_some());
        assert!(t.iflush.is_some() && t.get_device_mr.is_some() && t.reg_mr_dma_buf.is_none());
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let mut req = 0x1234 as *mut c_void;
        // SAFETY: pair.recv is a live receive comm and req a writable local; TCPXO's iflush reads
        // nothing (the arrays are null) and writes nothing.
        let rc = unsafe { p.t.iflush.unwrap()(pair.recv, 1, null_mut(), null_mut(), null_mut(), &mut req) };
        assert_eq!((rc, req), (0, 0x1234 as *mut c_void), "iflush returns 0 and leaves *request alone");
        let mut dptr = std::ptr::dangling_mut::<c_void>();
        // SAFETY: pair.send is a live comm and dptr a writable local; nothing is written.
        assert_eq!(unsafe { p.t.get_device_mr.unwrap()(pair.send, null_mut(), &mut dptr) }, 0);
        assert_eq!(dptr, std::ptr::dangling_mut());
    }
);

#[test]
fn kind_is_fixed_when_the_library_loads() {
    if common::spawn_in_child("kind_is_fixed_when_the_library_loads", &[]) {
        return;
    }
    // Loaded as TCPX: asking for TCPXO only at init fails it (the table is TCPX's already).
    let p = Plugin::load();
    assert!(p.t.irecv_consumed.is_some());
    // SAFETY: this child process is single-threaded here: no other thread reads the environment.
    unsafe { std::env::set_var(KIND.0, KIND.1) };
    // SAFETY: the harness's logger lives for the whole process.
    assert_eq!(unsafe { p.t.init.unwrap()(common::logger()) }, NCCL_INTERNAL_ERROR);
    assert_warned("FAKE_TCPX_PLUGIN_KIND=tcpxo at init, but this library was loaded as tcpx");
}

tcpxo_test!(
    fn tcpxo_properties_are_tcpxos() {
        let p = Plugin::init();
        let mut n = 0;
        // SAFETY: n is a writable local.
        assert_eq!(unsafe { p.t.devices.unwrap()(&mut n) }, 0);
        assert_eq!(n, 3, "eth0 too: TCPX's interface list does not apply");
        for dev in 0..n {
            let mut props = NcclNetPropertiesV7::default();
            // SAFETY: props is a writable 56-byte v7 struct.
            assert_eq!(unsafe { p.t.get_properties.unwrap()(dev, &mut props) }, 0);
            // SAFETY: name is the plugin's static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(props.name) }.to_str().unwrap().to_owned();
            let speed = sysfs_speed(&name).unwrap_or(10_000);
            assert_eq!(props.ptr_support, NCCL_PTR_HOST | NCCL_PTR_CUDA, "{name}");
            assert_eq!((props.speed, props.port, props.latency, props.guid), (speed, 0, 0.0, dev as u64), "{name}");
            assert_eq!((props.max_comms, props.max_recvs), (65536, 1), "{name}");
            assert_eq!((props.net_device_type, props.net_device_version), (NCCL_NET_DEVICE_HOST, 7), "{name}");
        }
        let mut props = NcclNetPropertiesV7::default();
        // SAFETY: as above; a bad device is refused before anything is written.
        assert_eq!(unsafe { p.t.get_properties.unwrap()(n, &mut props) }, NCCL_SYSTEM_ERROR);
    }
    env: ["NCCL_GPUDIRECTTCPX_SOCKET_IFNAME" => "^eth0"]
);

/// What TCPXO's GetSpeed finds for an interface: its sysfs speed when positive.
fn sysfs_speed(name: &str) -> Option<c_int> {
    let raw = std::fs::read(format!("/sys/class/net/{name}/speed")).ok()?;
    let text = String::from_utf8_lossy(&raw[..raw.len().min(8)]).into_owned();
    text.split_whitespace().next()?.parse().ok().filter(|s: &c_int| *s > 0)
}

tcpxo_test!(
    fn tcpxo_devices_are_sorted_by_pci_address_and_filtered_by_fastrak_ifname() {
        let p = Plugin::init();
        let mut n = 0;
        // SAFETY: n is a writable local.
        assert_eq!(unsafe { p.t.devices.unwrap()(&mut n) }, 0);
        let listed: Vec<(String, String, c_int)> = (0..n)
            .map(|dev| {
                let mut props = NcclNetPropertiesV7::default();
                // SAFETY: props is a writable 56-byte v7 struct.
                assert_eq!(unsafe { p.t.get_properties.unwrap()(dev, &mut props) }, 0);
                // SAFETY: name and pciPath are the plugin's static NUL-terminated strings.
                let (name, path) = unsafe { (CStr::from_ptr(props.name), CStr::from_ptr(props.pci_path)) };
                (name.to_str().unwrap().into(), path.to_str().unwrap().into(), props.speed)
            })
            .collect();
        let names: Vec<&str> = listed.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["fxc", "fxb", "fxa"], "by PCI address, not by name; `other` filtered out");
        assert!(listed.iter().all(|(_, _, s)| *s == 10_000), "no such interfaces: TCPXO's default speed");
    }
    env: [
        "FAKE_TCPX_TOPOLOGY" => "fxb /sys/devices/pci0000:01/0000:01:00.0/0000:09:00.0; \
                                 fxa /sys/devices/pci0000:81/0000:86:00.0; \
                                 fxc /sys/devices/pci0000:00/0000:00:04.0; \
                                 other /sys/devices/pci0000:00/0000:00:05.0",
        "NCCL_FASTRAK_IFNAME" => "fx",
    ]
);

tcpxo_test!(
    fn tcpxo_errors_are_rc_2() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let (buf, mh) = cuda_buffer(&p, pair.recv, 4096, 0);
        let mut data = [buf.ptr().cast::<c_void>(); 2];
        let (mut sizes, mut tags, mut mhs, mut req) = ([8; 2], [0; 2], [mh; 2], null_mut());
        // SAFETY: arrays of two writable elements each, and a writable request slot.
        let rc = unsafe {
            p.t.irecv.unwrap()(
                pair.recv,
                2,
                data.as_mut_ptr(),
                sizes.as_mut_ptr(),
                tags.as_mut_ptr(),
                mhs.as_mut_ptr(),
                &mut req,
            )
        };
        assert_eq!(rc, NCCL_SYSTEM_ERROR);
        assert_warned("PXN is not supported");
        assert_eq!(p.test_sized(0x4000 as *mut c_void), Err(NCCL_SYSTEM_ERROR), "a made-up request");
        let (mut handle, mut lc) = ([0u8; 128], null_mut());
        // SAFETY: handle is 128 writable bytes and lc a writable local; device 99 does not exist.
        let rc = unsafe { p.t.listen.unwrap()(99, handle.as_mut_ptr().cast(), &mut lc) };
        assert_eq!(rc, NCCL_SYSTEM_ERROR, "a device out of range (TCPX: 4)");
        take_warnings();
    }
);

// --- init ---

tcpxo_test!(
    fn tcpxo_init_is_shared_and_keeps_the_first_logger() {
        let p = Plugin::init();
        let again = Plugin::load();
        // SAFETY: tests/logger.c's second logger lives for the whole process.
        assert_eq!(unsafe { again.t.init.unwrap()(Some(fake_tcpx_test_logger_second)) }, 0, "a later init shares");
        // SAFETY: the harness's logger; the same consumer calling again.
        assert_eq!(unsafe { p.t.init.unwrap()(common::logger()) }, 0);
        let mut n = 0;
        // SAFETY: n is a writable local.
        assert_eq!(unsafe { again.t.devices.unwrap()(&mut n) }, 0);
        assert_eq!(n, 3, "the image is the first init's");
        take_warnings();
        let mut props = NcclNetPropertiesV7::default();
        // SAFETY: props is writable; a bad device is refused and logged.
        assert_eq!(unsafe { again.t.get_properties.unwrap()(99, &mut props) }, NCCL_SYSTEM_ERROR);
        let w = take_warnings();
        assert!(!w.is_empty() && w.iter().all(|m| !m.starts_with("second: ")), "the first logger stays: {w:?}");
    }
);

ending_test!(
    fn tcpxo_failed_init_ends_the_process() {
        let p = Plugin::load();
        // SAFETY: the harness's logger lives for the whole process.
        unsafe { p.t.init.unwrap()(common::logger()) };
    }
    env: ["FAKE_TCPX_FRAGMENT" => "pages"]
    expect: ["Plug-in core initialization failed", "FAKE_TCPX_FRAGMENT", "exiting the process"]
);

ending_test!(
    fn tcpxo_init_with_a_null_logger_ends_the_process() {
        let p = Plugin::load();
        // SAFETY: a NULL logger; the fake ends the process before calling anything through it.
        unsafe { p.t.init.unwrap()(None) };
    }
    expect: ["NULL logger", "exiting the process"]
);

/// Whether GPU test `name` returns without running: the parent decides, and its child runs it.
fn skip_without_gpu(name: &str) -> bool {
    !testkit::child::is_child(name) && common::no_gpu()
}

/// Makes device `n`'s primary context current on the calling thread.
fn use_gpu(n: i32) {
    uccl_tcpx::internal::cuda::driver().expect("cuInit");
    let dev = result::device::get(n).unwrap();
    // SAFETY: dev is a device the driver (initialised by cuInit) reported.
    let ctx = unsafe { result::primary_ctx::retain(dev) }.unwrap();
    // SAFETY: ctx was just retained and stays retained for the rest of the process.
    unsafe { result::ctx::set_current(ctx) }.unwrap();
}

/// Leaves the calling thread with no current context.
fn use_no_gpu() {
    // SAFETY: cuCtxSetCurrent(NULL) unbinds the calling thread's context; nothing is freed.
    assert_eq!(unsafe { sys::cuCtxSetCurrent(null_mut()) }, sys::CUresult::CUDA_SUCCESS);
}

/// Runs GPU test `name` in a child in GPU mode and checks that it ended with status 1 printing
/// `needles`; in that child returns false and the test body runs.
fn gpu_child_ends(name: &str, needles: &[&str]) -> bool {
    if skip_without_gpu(name) {
        return true;
    }
    let Some((status, text)) = common::child_outcome(name, &[KIND, ("FAKE_TCPX_MODE", "gpu")]) else { return false };
    assert_eq!(status.code(), Some(1), "the child should have ended with status 1:\n{text}");
    for n in needles {
        assert!(text.contains(n), "no {n:?} in the child's output:\n{text}");
    }
    true
}

#[test]
fn tcpxo_gpu_init_without_a_current_gpu_ends_the_process() {
    let name = "tcpxo_gpu_init_without_a_current_gpu_ends_the_process";
    if gpu_child_ends(name, &["Failed to get device index for current GPU -1", "exiting the process"]) {
        return;
    }
    uccl_tcpx::internal::cuda::driver().expect("cuInit");
    use_no_gpu();
    Plugin::init();
    panic!("init succeeded with no CUDA context current");
}

#[test]
fn tcpxo_gpu_every_init_needs_a_current_gpu() {
    let name = "tcpxo_gpu_every_init_needs_a_current_gpu";
    let needles = ["first init returned", "Failed to get device index for current GPU -1"];
    if gpu_child_ends(name, &needles) {
        return;
    }
    use_gpu(0);
    let p = Plugin::init();
    println!("first init returned");
    // The shared outcome does not excuse a later call on a thread with no GPU.
    use_no_gpu();
    // SAFETY: the harness's logger lives for the whole process.
    unsafe { p.t.init.unwrap()(common::logger()) };
    panic!("a second init succeeded with no CUDA context current");
}

// --- connections ---

tcpxo_test!(
    fn tcpxo_connect_state_lives_in_handle_bytes_88_to_104() {
        let p = Plugin::init();
        let (listen_handle, lc) = p.listen(1);
        assert_eq!((listen_handle[0], listen_handle[1]), (1, 0), "version 1, FasTrak index 0 (no GPU)");
        assert!(listen_handle[88..104].iter().all(|b| *b == 0), "listen writes state 0 and NULL");
        // (FAKE_TCPX_SOCKET_DELAY_MS keeps the first connect call from completing at once, which it
        // may on TCPXO too: its first call polls right after starting.)
        let connect = |h: &mut [u8; 128], sc: &mut *mut c_void| {
            let mut dev_handle = UNWRITTEN;
            let mut slot: *mut NcclNetDeviceHandleV7 = &mut dev_handle;
            // SAFETY: h is a 128-byte handle, sc and slot writable locals (slot points at dev_handle).
            unsafe { p.t.connect.unwrap()(1, h.as_mut_ptr().cast(), sc, &mut slot) }
        };
        for (byte, value, what) in [(0, 2u8, "VERSION MISMATCH"), (1, 255, "FasTrak index is uninitialized")] {
            let mut h = listen_handle;
            h[byte] = value;
            let mut sc = null_mut();
            assert_eq!(connect(&mut h, &mut sc), NCCL_REMOTE_ERROR, "byte {byte} = {value}");
            assert_warned(what);
        }
        let mut h = listen_handle;
        let mut sc = null_mut();
        assert_eq!(connect(&mut h, &mut sc), 0);
        assert!(sc.is_null());
        assert_eq!(h[88], 1, "connecting");
        assert_ne!(u64::from_le_bytes(h[96..104].try_into().unwrap()), 0, "the comm being connected");
        assert_eq!(&h[..88], &listen_handle[..88], "nothing before byte 88 changes (TCPX's 80..88 included)");
        let mut rc: *mut c_void = null_mut();
        let mut recv_dev = UNWRITTEN;
        let mut recv_slot: *mut NcclNetDeviceHandleV7 = &mut recv_dev;
        testkit::drive("connect and accept", LIMIT, || {
            if sc.is_null() {
                assert_eq!(connect(&mut h, &mut sc), 0);
            }
            if rc.is_null() {
                // SAFETY: lc is the live listen comm; rc and recv_slot writable locals.
                assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, &mut recv_slot) }, 0);
            }
            (!sc.is_null() && !rc.is_null()).then_some(())
        });
        assert_eq!(h[88], 3, "done");
        assert!(h[96..104].iter().all(|b| *b == 0), "the comm pointer is handed out and cleared");
        let mut again = null_mut();
        assert_eq!(connect(&mut h, &mut again), NCCL_SYSTEM_ERROR, "a done handle");
        assert_warned("should not be called in state 3");
        assert!(again.is_null());
    }
    env: ["FAKE_TCPX_SOCKET_DELAY_MS" => "300"]
);

tcpxo_test!(
    fn tcpxo_connect_and_accept_write_host_device_handles() {
        let p = Plugin::init();
        let (mut h, lc) = p.listen(1);
        let mut sc = null_mut();
        // SAFETY: h is the 128-byte listen handle and sc a writable local; sendDevComm NULL is refused.
        assert_eq!(unsafe { p.t.connect.unwrap()(1, h.as_mut_ptr().cast(), &mut sc, null_mut()) }, NCCL_SYSTEM_ERROR);
        assert_warned("sendDevComm may not be null");
        let pair = p.pair_tcpxo(1);
        assert_host_handle(&pair.send_dev_handle, "*sendDevComm");
        assert_host_handle(&pair.dev_handle, "*recvDevComm");
        // *sendDevComm and *recvDevComm NULL: TCPXO writes no handle, and both complete.
        let (mut sc, mut rc): (*mut c_void, *mut c_void) = (null_mut(), null_mut());
        let mut slots: [*mut NcclNetDeviceHandleV7; 2] = [null_mut(); 2];
        testkit::drive("connect and accept", LIMIT, || {
            if sc.is_null() {
                // SAFETY: h is the 128-byte listen handle; sc and slots[0] writable locals, the latter NULL.
                assert_eq!(unsafe { p.t.connect.unwrap()(1, h.as_mut_ptr().cast(), &mut sc, &mut slots[0]) }, 0);
            }
            if rc.is_null() {
                // SAFETY: lc is a live listen comm; rc and slots[1] writable locals, the latter NULL.
                assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, &mut slots[1]) }, 0);
            }
            (!sc.is_null() && !rc.is_null()).then_some(())
        });
        assert_eq!(slots, [null_mut(); 2]);
    }
);

tcpxo_test!(
    fn tcpxo_one_accept_per_listen_comm() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let mut rc = null_mut();
        let mut dev_handle = UNWRITTEN;
        let mut slot: *mut NcclNetDeviceHandleV7 = &mut dev_handle;
        // SAFETY: pair.listen is a live listen comm whose one accept completed; rc and slot writable.
        assert_eq!(unsafe { p.t.accept.unwrap()(pair.listen, &mut rc, &mut slot) }, NCCL_SYSTEM_ERROR);
        assert_warned("should not be called in state 3");
        assert!(rc.is_null());
        // closeListen is fine at any time.
        // SAFETY: a live listen comm, closed once.
        assert_eq!(unsafe { p.t.close_listen.unwrap()(pair.listen) }, 0);
    }
);

// --- requests ---

tcpxo_test!(
    fn tcpxo_requests_have_no_bound() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let n = 40; // TCPX refuses the 17th
        let size = 1000;
        let src = pattern(n * size, 5);
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_CUDA).unwrap();
        let (dst, rmh) = cuda_buffer(&p, pair.recv, n * size, 0);
        // SAFETY: each pointer lies inside dst's n * size bytes.
        let receives: Vec<_> =
            (0..n).map(|k| p.irecv(pair.recv, unsafe { dst.ptr().add(k * size) }, size, rmh).unwrap()).collect();
        // SAFETY: each pointer lies inside src's n * size bytes.
        let sends: Vec<_> =
            (0..n).map(|k| p.isend(pair.send, unsafe { src.as_ptr().add(k * size) }, size, smh).unwrap()).collect();
        assert!(finish_all(&p, &sends, &receives).iter().all(|s| *s == size as c_int));
        assert!(bytes(&dst, 0, n * size) == src);
    }
);

tcpxo_test!(
    fn tcpxo_any_request_may_be_tested_in_any_order() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let n = 8;
        let size = 5000;
        let src = pattern(n * size, 9);
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_CUDA).unwrap();
        let (dst, rmh) = cuda_buffer(&p, pair.recv, n * size, 0);
        // SAFETY: each pointer lies inside dst's n * size bytes.
        let receives: Vec<_> =
            (0..n).map(|k| p.irecv(pair.recv, unsafe { dst.ptr().add(k * size) }, size, rmh).unwrap()).collect();
        // SAFETY: each pointer lies inside src's n * size bytes.
        let sends: Vec<_> =
            (0..n).map(|k| p.isend(pair.send, unsafe { src.as_ptr().add(k * size) }, size, smh).unwrap()).collect();
        // The newest of each first (TCPX refuses any but the oldest), the rest backwards.
        for k in (0..n).rev() {
            assert_eq!(p.wait_sized(sends[k]), Ok(size as c_int), "send {k}");
            assert_eq!(p.wait_sized(receives[k]), Ok(size as c_int), "receive {k}");
            assert!(bytes(&dst, k * size, size) == src[k * size..(k + 1) * size], "receive {k}");
        }
    }
);

ending_test!(
    fn tcpxo_a_second_test_of_a_done_request_ends_the_process() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let src = pattern(100, 1);
        let smh = p.reg(pair.send, src.as_ptr(), 100, NCCL_PTR_CUDA).unwrap();
        let (dst, rmh) = cuda_buffer(&p, pair.recv, 100, 0);
        let r = p.irecv(pair.recv, dst.ptr(), 100, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        assert_eq!(finish_all(&p, &[s], &[r]), [100]);
        let _ = p.test_sized(r);
    }
    expect: ["which test already reported done", "Test L728", "exiting the process"]
);

tcpxo_test!(
    fn tcpxo_the_kth_send_meets_the_kth_receive() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let sizes = [7usize, 0, 4096, 65_537, 1, 300_000];
        let cap = 300_000;
        let starts: Vec<usize> = sizes.iter().scan(0, |at, n| Some(std::mem::replace(at, *at + n))).collect();
        let all = pattern(sizes.iter().sum(), 100);
        let sources: Vec<&[u8]> = starts.iter().zip(sizes).map(|(&at, n)| &all[at..at + n]).collect();
        let smh = p.reg(pair.send, all.as_ptr(), all.len(), NCCL_PTR_CUDA).unwrap();
        // Receives into buffers of their own, posted for more than each send: a smaller send arrives and
        // test reports its size; tags are ignored.
        let targets: Vec<_> = sizes.iter().map(|_| cuda_buffer(&p, pair.recv, cap, 0xEE)).collect();
        let receives: Vec<_> = targets.iter().map(|(b, mh)| p.irecv(pair.recv, b.ptr(), cap, *mh).unwrap()).collect();
        let sends: Vec<_> =
            sources.iter().map(|src| p.isend(pair.send, src.as_ptr(), src.len(), smh).unwrap()).collect();
        let got = finish_all(&p, &sends, &receives);
        for (k, src) in sources.iter().enumerate() {
            assert_eq!(got[k], src.len() as c_int, "receive {k} reports the send's size");
            assert!(bytes(&targets[k].0, 0, src.len()) == **src, "receive {k} holds send {k}");
            assert!(bytes(&targets[k].0, src.len(), 64.min(cap - src.len())).iter().all(|b| *b == 0xEE), "{k}: beyond");
        }
    }
);

tcpxo_test!(
    fn tcpxo_a_send_larger_than_its_receive_fails_it() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let src = pattern(200, 3);
        let smh = p.reg(pair.send, src.as_ptr(), 200, NCCL_PTR_CUDA).unwrap();
        let (dst, rmh) = cuda_buffer(&p, pair.recv, 4096, 0xEE);
        let r = p.irecv(pair.recv, dst.ptr(), 100, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 200, smh).unwrap();
        p.wait_sized(s).unwrap();
        let failed = testkit::drive("the receive fails", LIMIT, || {
            let (mut done, mut size) = (-1, -1);
            // SAFETY: r is a live request; done and size writable locals.
            let rc = unsafe { p.t.test.unwrap()(r, &mut done, &mut size) };
            (rc != 0).then_some((rc, done, size))
        });
        assert_eq!(failed, (NCCL_SYSTEM_ERROR, 1, 0));
        assert_warned("kSendRecvSizeMismatch");
        assert!(bytes(&dst, 0, 4096).iter().all(|b| *b == 0xEE), "nothing written past or into the posted buffer");
    }
);

tcpxo_test!(
    fn tcpxo_bytes_land_in_the_posted_buffer() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let len = 100_000;
        let src = pattern(len, 77);
        let smh = p.reg(pair.send, src.as_ptr(), len, NCCL_PTR_CUDA).unwrap();
        // One registration, the receive at an offset inside it.
        let (dst, rmh) = cuda_buffer(&p, pair.recv, 3 * 65536, 0xEE);
        let off = 12_345;
        // SAFETY: off + len lies inside dst's 3 * 65536 bytes.
        let r = p.irecv(pair.recv, unsafe { dst.ptr().add(off) }, len, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), len, smh).unwrap();
        assert_eq!(finish_all(&p, &[s], &[r]), [len as c_int]);
        assert!(bytes(&dst, off, len) == src, "the posted buffer holds the bytes");
        assert!(bytes(&dst, 0, off).iter().all(|b| *b == 0xEE), "before it, untouched");
        assert!(bytes(&dst, off + len, 3 * 65536 - off - len).iter().all(|b| *b == 0xEE), "after it, untouched");
    }
);

tcpxo_test!(
    fn tcpxo_host_memory_requests_over_0_bytes_fail_with_rc_2() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let mut buf = vec![1u8; 64];
        let smh = p.reg(pair.send, buf.as_ptr(), 64, NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, buf.as_mut_ptr(), 64, NCCL_PTR_HOST).unwrap();
        assert_eq!(p.isend(pair.send, buf.as_ptr(), 1, smh), Err(NCCL_SYSTEM_ERROR));
        assert_warned("Attempted to Send 1 bytes from host buffer");
        assert_eq!(p.irecv(pair.recv, buf.as_mut_ptr(), 64, rmh), Err(NCCL_SYSTEM_ERROR));
        assert_warned("Attempted to Recv 64 bytes from host buffer");
        // 0 bytes may name host memory.
        let r = p.irecv(pair.recv, buf.as_mut_ptr(), 0, rmh).unwrap();
        let s = p.isend(pair.send, buf.as_ptr(), 0, smh).unwrap();
        assert_eq!(finish_all(&p, &[s], &[r]), [0]);
    }
);

tcpxo_test!(
    fn tcpxo_a_failed_request_reports_done_with_rc_2() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let src = pattern(1000, 2);
        let smh = p.reg(pair.send, src.as_ptr(), 1000, NCCL_PTR_CUDA).unwrap();
        let (dst, rmh) = cuda_buffer(&p, pair.recv, 4096, 0);
        // The first transfer completes; then each comm drops its connection.
        let r = p.irecv(pair.recv, dst.ptr(), 1000, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 1000, smh).unwrap();
        assert_eq!(finish_all(&p, &[s], &[r]), [1000]);
        for (what, req) in [
            ("send", p.isend(pair.send, src.as_ptr(), 1000, smh).unwrap()),
            ("receive", p.irecv(pair.recv, dst.ptr(), 1000, rmh).unwrap()),
        ] {
            let (mut done, mut size) = (-1, -1);
            // SAFETY: req is a live request; done and size writable locals.
            assert_eq!(unsafe { p.t.test.unwrap()(req, &mut done, &mut size) }, NCCL_SYSTEM_ERROR, "{what}");
            assert_eq!((done, size), (1, 0), "{what}: a failure reports done with size 0");
            assert_warned("Connection closed");
            let (mut done, mut size) = (-1, -1);
            // SAFETY: as above: the failed request is kept, in error state.
            assert_eq!(unsafe { p.t.test.unwrap()(req, &mut done, &mut size) }, NCCL_SYSTEM_ERROR, "{what} again");
            assert_eq!((done, size), (-1, -1), "{what}: a request in error state writes nothing");
            assert_warned("Request is in error state");
        }
    }
    env: ["FAKE_TCPX_FAULT" => "drop:1"]
);

tcpxo_test!(
    fn tcpxo_same_host_payload_fails_the_receive() {
        let p = Plugin::init();
        let pair = p.pair_tcpxo(1);
        let src = pattern(100, 4);
        let smh = p.reg(pair.send, src.as_ptr(), 100, NCCL_PTR_CUDA).unwrap();
        let (dst, rmh) = cuda_buffer(&p, pair.recv, 4096, 0xEE);
        let r = p.irecv(pair.recv, dst.ptr(), 100, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        p.wait_sized(s).unwrap();
        let failed = testkit::drive("the receive fails", LIMIT, || {
            let (mut done, mut size) = (-1, -1);
            // SAFETY: r is a live request; done and size writable locals.
            let rc = unsafe { p.t.test.unwrap()(r, &mut done, &mut size) };
            (rc != 0).then_some((rc, done, size))
        });
        assert_eq!(failed, (NCCL_SYSTEM_ERROR, 1, 0));
        assert_warned("kNotServingVM");
    }
    env: ["FAKE_TCPX_SAME_HOST" => "fatal"]
);

// --- GPU mode ---

/// Device memory of `len` usable bytes from a 4 KiB boundary, filled with `fill`, on the current GPU.
struct DeviceBuf {
    raw: sys::CUdeviceptr,
    ptr: sys::CUdeviceptr,
}

impl DeviceBuf {
    fn new(len: usize, fill: u8) -> DeviceBuf {
        // SAFETY: cuMemAlloc only allocates; the test made a primary context current first.
        let raw = unsafe { result::malloc_sync(len + 4096) }.unwrap();
        // SAFETY: raw was just allocated with len + 4096 bytes.
        unsafe { result::memset_d8_sync(raw, fill, len + 4096) }.unwrap();
        DeviceBuf { raw, ptr: (raw + 4095) & !4095 }
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: callers read inside the usable bytes after ptr.
        unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr + off as u64) }.unwrap();
        out
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() in the context still current, freed once after the transfers.
        unsafe { result::free_sync(self.raw) }.unwrap();
    }
}

#[test]
fn tcpxo_gpu_bytes_land_in_the_posted_device_buffer() {
    let name = "tcpxo_gpu_bytes_land_in_the_posted_device_buffer";
    if skip_without_gpu(name) || common::spawn_in_child(name, &[KIND, ("FAKE_TCPX_MODE", "gpu")]) {
        return;
    }
    use_gpu(0);
    let p = Plugin::init();
    let pair = p.pair_tcpxo(1);
    assert_host_handle(&pair.dev_handle, "*recvDevComm");
    let (len, off, cap) = (1_000_000usize, 8192usize, 2 << 20);
    let data = pattern(len, 31);
    let src = DeviceBuf::new(cap, 0);
    // SAFETY: src holds cap >= len bytes.
    unsafe { result::memcpy_htod_sync(src.ptr, &data) }.unwrap();
    let dst = DeviceBuf::new(cap, 0xEE);
    let smh = p.reg(pair.send, src.ptr as *const u8, cap, NCCL_PTR_CUDA).unwrap();
    let rmh = p.reg(pair.recv, dst.ptr as *const u8, cap, NCCL_PTR_CUDA).unwrap();
    let r = p.irecv(pair.recv, (dst.ptr as usize + off) as *mut u8, len, rmh).unwrap();
    let s = p.isend(pair.send, src.ptr as *const u8, len, smh).unwrap();
    assert_eq!(finish_all(&p, &[s], &[r]), [len as c_int]);
    assert!(dst.read(off, len) == data, "the posted device buffer holds the bytes");
    assert!(dst.read(0, off).iter().all(|b| *b == 0xEE), "before it, untouched");
    assert!(dst.read(off + len, 4096).iter().all(|b| *b == 0xEE), "after it, untouched");
    // TCPXO finds the current GPU's state in getProperties too.
    use_no_gpu();
    let mut props = NcclNetPropertiesV7::default();
    // SAFETY: props is writable; refused before anything is written.
    assert_eq!(unsafe { p.t.get_properties.unwrap()(0, &mut props) }, NCCL_SYSTEM_ERROR);
    assert_warned("no CUDA context current");
    use_gpu(0);
}
