//! TCPX's rules as a raw v7 consumer meets them: table shape, init once, devices, asynchronous
//! connect/accept, registration checks, the 16-request window, FIFO test and consume, rc codes.

mod common;

use std::ffi::{CStr, c_int};
use std::ptr::null_mut;

use common::{Plugin, assert_warned, take_warnings};
use uccl_tcpx::internal::ncclnet::*;

isolated_test!(
    fn table_shape_and_iflush() {
        let p = Plugin::load();
        let t = &p.t;
        // SAFETY: the table's name is a static NUL-terminated string of the plugin, which stays loaded while
        // p lives.
        assert_eq!(unsafe { CStr::from_ptr(t.name) }.to_str().unwrap(), "FakeDevmemTCPX_v7");
        assert!(t.init.is_some() && t.devices.is_some() && t.get_properties.is_some() && t.listen.is_some());
        assert!(t.connect.is_some() && t.accept.is_some() && t.reg_mr.is_some() && t.dereg_mr.is_some());
        assert!(t.isend.is_some() && t.irecv.is_some() && t.iflush.is_some() && t.test.is_some());
        assert!(t.close_send.is_some() && t.close_recv.is_some() && t.close_listen.is_some());
        assert!(t.get_device_mr.is_some() && t.irecv_consumed.is_some());
        assert!(t.reg_mr_dma_buf.is_none());
        let p = Plugin::init();
        let pair = p.pair(0);
        let mut req = null_mut();
        // SAFETY: pair.recv is a live receive comm and req a writable local; the fake refuses iflush before
        // reading any array (they are null).
        let rc = unsafe { p.t.iflush.unwrap()(pair.recv, 1, null_mut(), null_mut(), null_mut(), &mut req) };
        assert_eq!(rc, NCCL_INTERNAL_ERROR);
        assert_warned("iflush");
        // getDeviceMr succeeds and writes nothing, as TCPX's.
        let mut dptr = std::ptr::dangling_mut::<std::ffi::c_void>();
        // SAFETY: pair.send is a live comm and dptr a writable local; the fake writes nothing (what this
        // checks).
        assert_eq!(unsafe { p.t.get_device_mr.unwrap()(pair.send, null_mut(), &mut dptr) }, 0);
        assert_eq!(dptr, std::ptr::dangling_mut());
    }
);

isolated_test!(
    fn close_warns_about_receives_never_consumed() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let mut buf = vec![1u8; 100];
        let smh = p.reg(pair.send, buf.as_ptr(), 100, NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, buf.as_mut_ptr(), 100, NCCL_PTR_HOST).unwrap();
        let r = p.irecv(pair.recv, buf.as_mut_ptr(), 100, rmh).unwrap();
        let s = p.isend(pair.send, buf.as_ptr(), 100, smh).unwrap();
        p.wait_both(s, r).unwrap();
        // SAFETY: pair.recv is a live receive comm of this plugin, closed once.
        assert_eq!(unsafe { p.t.close_recv.unwrap()(pair.recv) }, 0);
        assert_warned("some pages not yet freed?");
    }
);

isolated_test!(
    fn init_once_with_a_logger() {
        let p = Plugin::load();
        let init = p.t.init.unwrap();
        let mut n = 0;
        // SAFETY: n is a writable local; before init the call is refused.
        assert_eq!(unsafe { p.t.devices.unwrap()(&mut n) }, NCCL_INTERNAL_ERROR, "devices before init");
        // SAFETY: a null logger is refused before anything is called through it.
        assert_eq!(unsafe { init(None) }, NCCL_INTERNAL_ERROR, "NULL logger");
        // SAFETY: the logger is this harness's, which lives for the whole process.
        assert_eq!(unsafe { init(common::logger()) }, 0, "a rejected init does not count");
        take_warnings();
        // SAFETY: the logger is this harness's; a second init is refused.
        assert_eq!(unsafe { init(common::logger()) }, NCCL_INTERNAL_ERROR);
        assert_warned("init twice");
    }
);

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

isolated_test!(
    fn a_second_consumer_in_the_process_gets_init_twice() {
        // Consumer A (say NCCL) loads and initialises the library first.
        let a = Plugin::init();
        let devices = |p: &Plugin| {
            let mut n = 0;
            // SAFETY: n is a writable local.
            assert_eq!(unsafe { p.t.devices.unwrap()(&mut n) }, 0);
            n
        };
        assert_eq!(devices(&a), 2);
        // Consumer B loads the same file, by the same path and through another name: one image.
        let dir = std::env::temp_dir().join(format!("fake-tcpx-consumers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let alias = dir.join("libnccl-net-alias.so");
        std::os::unix::fs::symlink(common::library_path(), &alias).unwrap();
        for b in [Plugin::load(), Plugin::load_from(&alias)] {
            // SAFETY: fake_tcpx_test_logger_second is tests/logger.c's variadic logger, linked into this test
            // for the whole process.
            assert_eq!(unsafe { b.t.init.unwrap()(Some(fake_tcpx_test_logger_second)) }, NCCL_INTERNAL_ERROR);
            let w = take_warnings();
            assert!(w.iter().any(|m| m.starts_with("second: ") && m.contains("init twice")), "{w:?}");
            // The image is A's as much as B's: B may use it, as A's init made it ready.
            assert_eq!(devices(&b), 2);
        }
        // As TCPX's init replaces its logger first thing, A's messages now go to B's logger.
        // SAFETY: a null ndev is refused (logged and reported) before anything is written.
        assert_eq!(unsafe { a.t.devices.unwrap()(null_mut()) }, NCCL_INTERNAL_ERROR);
        let w = take_warnings();
        assert!(!w.is_empty() && w.iter().all(|m| m.starts_with("second: ") && m.contains("ndev is NULL")), "{w:?}");
        // A private copy of the file is another image, with an init of its own.
        let copy = dir.join("libnccl-net-copy.so");
        std::fs::copy(common::library_path(), &copy).unwrap();
        let c = Plugin::load_from(&copy);
        // SAFETY: a fresh image of the copy, initialised with this harness's process-long logger.
        assert_eq!(unsafe { c.t.init.unwrap()(common::logger()) }, 0);
        assert_eq!(devices(&c), 2);
        // The copy stays mapped (its threads' exit handlers point into it), as a net plugin does.
        std::mem::forget(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }
);

isolated_test!(
    fn bad_knob_fails_init() {
        let p = Plugin::load();
        // SAFETY: the logger is this harness's, which lives for the whole process.
        assert_eq!(unsafe { p.t.init.unwrap()(common::logger()) }, NCCL_INTERNAL_ERROR);
        assert_warned("FAKE_TCPX_FRAGMENT");
    }
    env: ["FAKE_TCPX_FRAGMENT" => "pages"]
);

/// Checks the properties of the `names` devices, in order, and returns their PCI paths.
fn check_properties(p: &Plugin, names: &[&str]) -> Vec<String> {
    let mut n = 0;
    // SAFETY: n is a writable local.
    assert_eq!(unsafe { p.t.devices.unwrap()(&mut n) }, 0);
    assert_eq!(n, names.len() as c_int);
    let mut paths = Vec::new();
    for dev in 0..n {
        let mut props = NcclNetPropertiesV7::default();
        // Poison every byte, so that a field left unwritten shows.
        // SAFETY: props is a live NcclNetPropertiesV7 of at least 56 bytes (its 11 fields), plain integers
        // and pointers for which any bytes are valid.
        unsafe { std::ptr::write_bytes(&mut props as *mut NcclNetPropertiesV7 as *mut u8, 0xAB, 56) };
        // SAFETY: props is a writable local; dev < n, a device the plugin reported.
        assert_eq!(unsafe { p.t.get_properties.unwrap()(dev, &mut props) }, 0);
        // SAFETY: getProperties succeeded above, so name points at the plugin's static NUL-terminated device
        // name.
        assert_eq!(unsafe { CStr::from_ptr(props.name) }.to_str().unwrap(), names[dev as usize]);
        // SAFETY: getProperties succeeded above, so pci_path points at the plugin's static NUL-terminated PCI
        // path.
        let path = unsafe { CStr::from_ptr(props.pci_path) }.to_str().unwrap().to_owned();
        assert!(path.starts_with("/sys/devices/pci"), "{path}");
        paths.push(path);
        // TCPX reports every interface alike, the one without devmem included.
        assert_eq!(props.guid, dev as u64);
        assert_eq!(props.ptr_support, NCCL_PTR_HOST | NCCL_PTR_CUDA);
        assert!(props.speed > 0);
        assert_eq!(props.port, 0);
        assert_eq!(props.latency, 0.0);
        assert!(props.max_comms > 0);
        assert_eq!(props.max_recvs, 1);
        assert_eq!(props.net_device_type, NCCL_NET_DEVICE_UNPACK);
        assert_eq!(props.net_device_version, NCCL_NET_DEVICE_UNPACK_VERSION);
        // Static storage: a second call returns the same strings.
        let mut again = NcclNetPropertiesV7::default();
        // SAFETY: again is a writable local; dev < n.
        unsafe { p.t.get_properties.unwrap()(dev, &mut again) };
        assert_eq!(again.name, props.name);
        assert_eq!(again.pci_path, props.pci_path);
    }
    let mut distinct = paths.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), n as usize, "PCI paths are distinct");
    let mut props = NcclNetPropertiesV7::default();
    for bad in [-1, n, 1000] {
        // SAFETY: props is a writable local; an out-of-range device is refused before it is written.
        assert_eq!(unsafe { p.t.get_properties.unwrap()(bad, &mut props) }, NCCL_INVALID_ARGUMENT, "dev {bad}");
        assert_warned("does not exist");
    }
    paths
}

/// The IPv4 address in a listen handle of device `dev` (the socket handle's bytes 8..12).
fn listen_address(p: &Plugin, dev: c_int) -> std::net::Ipv4Addr {
    let (handle, lc) = p.listen(dev);
    // SAFETY: lc came from listen, no accept runs; closed once.
    assert_eq!(unsafe { p.t.close_listen.unwrap()(lc) }, 0);
    assert_eq!(handle[4], 4, "an IPv4 handle");
    std::net::Ipv4Addr::new(handle[8], handle[9], handle[10], handle[11])
}

isolated_test!(
    fn devices_and_properties_default() {
        // A3's shape: eth0 without devmem first (TCPX sorts interfaces by name), then the GPU NICs,
        // each with its own address and under a PCI root of its own, as A3 High's eth1 and eth2.
        let p = Plugin::init();
        let paths = check_properties(&p, &["eth0", "eth1", "eth2"]);
        assert_eq!(paths[0], "/sys/devices/pci0000:00/0000:00:04.0");
        assert_eq!(paths[1], "/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:06:00.0");
        assert_eq!(paths[2], "/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0c:00.0");
        let addrs: Vec<String> = (0..3).map(|d| listen_address(&p, d).to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
        // Every device carries data; the one without devmem only into host memory (tests/fatal.rs).
        for dev in 0..3 {
            let pair = p.pair(dev);
            let data = common::pattern(10_000, dev as u64);
            let smh = p.reg(pair.send, data.as_ptr(), data.len(), NCCL_PTR_HOST).unwrap();
            let mut dst = vec![0u8; data.len()];
            let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
            let r = p.irecv(pair.recv, dst.as_mut_ptr(), dst.len(), rmh).unwrap();
            let s = p.isend(pair.send, data.as_ptr(), data.len(), smh).unwrap();
            p.wait_both(s, r).unwrap();
            assert_eq!(common::Unpack::host(&pair).gather(0, data.len(), 1 << 30), data);
            assert_eq!(p.consume(pair.recv, r), 0);
        }
    }
    env: ["NCCL_GPUDIRECTTCPX_SOCKET_IFNAME" => ""]
);

isolated_test!(
    fn devices_follow_the_topology_knob_and_tcpx_interface_list() {
        let p = Plugin::init();
        // Sorted by name, filtered by NCCL_GPUDIRECTTCPX_SOCKET_IFNAME as TCPX does.
        let paths = check_properties(&p, &["eth1", "eth7"]);
        assert_eq!(paths, ["/sys/devices/pci0000:81/0000:81:00.0/0000:86:00.0", "/sys/devices/pci0000:07/0000:0c:00.0"]);
        assert_eq!(listen_address(&p, 0).to_string(), "127.0.0.9", "a listed address");
        assert_eq!(listen_address(&p, 1).to_string(), "127.0.0.3", "its place in the sorted list, eth0 included");
    }
    env: [
        "FAKE_TCPX_TOPOLOGY" => "eth7 /sys/devices/pci0000:07/0000:0c:00.0 0000:0a:00.0; \
            eth0 /sys/devices/pci0000:00/0000:00:04.0; \
            eth1@127.0.0.9 /sys/devices/pci0000:81/0000:81:00.0/0000:86:00.0 *",
        "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME" => "eth1,eth7",
    ]
);

isolated_test!(
    fn devices_and_properties_ndev() {
        let p = Plugin::init();
        check_properties(&p, &["eth1", "eth2", "eth3", "eth4", "eth5"]);
        let mut handle = [0u8; 128];
        let mut lc = null_mut();
        // SAFETY: handle is a 128-byte buffer and lc a writable local; device 5 does not exist and is
        // refused.
        assert_eq!(unsafe { p.t.listen.unwrap()(5, handle.as_mut_ptr().cast(), &mut lc) }, NCCL_INVALID_ARGUMENT);
        let pair = p.pair(4);
        assert!(!pair.send.is_null());
    }
    env: ["FAKE_TCPX_NDEV" => "5"]
);

isolated_test!(
    fn connect_and_accept_are_asynchronous() {
        let p = Plugin::init();
        let (handle, lc) = p.listen(0);
        assert_eq!(&handle[80..88], &[0u8; 8], "listen leaves the connect state slot empty");
        let mut h = handle;
        let mut sc = std::ptr::dangling_mut::<std::ffi::c_void>();
        // SAFETY: h is the 128-byte handle listen wrote and sc a writable local; the dev-comm slot is
        // optional (null).
        assert_eq!(unsafe { p.t.connect.unwrap()(0, h.as_mut_ptr().cast(), &mut sc, null_mut()) }, 0);
        assert!(sc.is_null(), "the first connect call never completes");
        assert_ne!(&h[80..88], &[0u8; 8], "connect keeps its state in the handle");

        // accept insists on caller-allocated device handle storage, on every call.
        let mut rc = null_mut();
        // SAFETY: lc came from listen; rc is a writable local and the missing device-handle storage is
        // refused.
        assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, null_mut()) }, NCCL_INTERNAL_ERROR);
        assert_warned("recvDevComm");
        let mut no_storage: *mut NcclNetDeviceHandleV7 = null_mut();
        // SAFETY: lc came from listen; rc and no_storage are writable locals, and the null storage is
        // refused.
        assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, &mut no_storage) }, NCCL_INTERNAL_ERROR);
        assert_warned("caller-allocated");

        let mut dh = NcclNetDeviceHandleV7::default();
        let mut dhp: *mut NcclNetDeviceHandleV7 = &mut dh;
        // SAFETY: lc came from listen; rc is a writable local and dhp points at dh, which lives to the end of
        // the test.
        assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, &mut dhp) }, 0);
        assert!(rc.is_null(), "the first accept call never completes");
        let deadline = std::time::Instant::now() + testkit::PATIENCE;
        while sc.is_null() || rc.is_null() {
            assert!(std::time::Instant::now() < deadline);
            if sc.is_null() {
                // SAFETY: h is the 128-byte handle listen wrote, kept in place across polls, and sc a
                // writable local.
                assert_eq!(unsafe { p.t.connect.unwrap()(0, h.as_mut_ptr().cast(), &mut sc, null_mut()) }, 0);
            }
            if rc.is_null() {
                // SAFETY: lc came from listen; rc is a writable local and dhp points at dh, which lives to
                // the end of the test.
                assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc, &mut dhp) }, 0);
            }
        }
        assert_eq!(dh.net_device_type, NCCL_NET_DEVICE_UNPACK);
        assert_eq!(dh.net_device_version, NCCL_NET_DEVICE_UNPACK_VERSION);
        assert_eq!(dh.size, 24);
        assert_eq!(dh.needs_proxy_progress, 1);
        // SAFETY: accept completed, so dh.handle points at the receive comm's UnpackDeviceHandle in host
        // memory (host mode), live while the comm is.
        let unpack = unsafe { dh.handle.cast::<UnpackDeviceHandle>().read() };
        assert_eq!(unpack.head, u64::MAX);
        assert!(!unpack.meta.is_null() && !unpack.bounce_buf.is_null());

        // A handle reused after its connect completed is refused, not dereferenced.
        let mut sc2 = null_mut();
        assert_eq!(
            // SAFETY: h is a 128-byte handle buffer and sc2 a writable local; the reused handle is refused.
            unsafe { p.t.connect.unwrap()(0, h.as_mut_ptr().cast(), &mut sc2, null_mut()) },
            NCCL_INTERNAL_ERROR
        );
        assert_warned("fresh copy");
        // One accept per listen comm.
        let mut rc2 = null_mut();
        // SAFETY: lc came from listen; rc2 is a writable local and dhp points at dh; the second accept is
        // refused.
        assert_eq!(unsafe { p.t.accept.unwrap()(lc, &mut rc2, &mut dhp) }, NCCL_INTERNAL_ERROR);
        assert_warned("one accept per listen comm");
        // A handle not written by listen.
        let mut junk = [7u8; 128];
        junk[80..88].fill(0);
        assert_eq!(
            // SAFETY: junk is a 128-byte buffer and sc2 a writable local; a handle listen never wrote is
            // refused without being dereferenced.
            unsafe { p.t.connect.unwrap()(0, junk.as_mut_ptr().cast(), &mut sc2, null_mut()) },
            NCCL_INTERNAL_ERROR
        );

        for (f, c) in [(p.t.close_send, sc), (p.t.close_recv, rc), (p.t.close_listen, lc)] {
            // SAFETY: each comm is live and closed once, with the close of its own kind.
            assert_eq!(unsafe { f.unwrap()(c) }, 0);
        }
        // SAFETY: the fake looks sc up in its registry, so the already closed comm is an error, not a
        // dereference.
        assert_eq!(unsafe { p.t.close_send.unwrap()(sc) }, NCCL_INTERNAL_ERROR, "double close");
    }
);

isolated_test!(
    fn registration_rules() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let buf = common::Aligned::new(16384);
        let b = buf.ptr();
        for comm in [pair.send, pair.recv] {
            assert_eq!(p.reg(comm, b, 4096, 4), Err(NCCL_INTERNAL_ERROR), "DMABUF type");
            assert_eq!(p.reg(comm, b, 4096, 0), Err(NCCL_INTERNAL_ERROR), "type 0");
            // SAFETY: b is a 16 KiB allocation, so b + 8 lies inside it.
            assert_eq!(p.reg(comm, unsafe { b.add(8) }, 4096, NCCL_PTR_CUDA), Err(NCCL_INTERNAL_ERROR));
            assert_warned("data not aligned");
            assert_eq!(p.reg(comm, b, 4095, NCCL_PTR_CUDA), Err(NCCL_INTERNAL_ERROR));
            assert_warned("data not aligned");
            let cuda = p.reg(comm, b, 16384, NCCL_PTR_CUDA).unwrap();
            // SAFETY: b is a 16 KiB allocation, so b + 3 lies inside it.
            let host = p.reg(comm, unsafe { b.add(3) }, 100, NCCL_PTR_HOST).unwrap();
            // SAFETY: comm is live and cuda a registration on it.
            assert_eq!(unsafe { p.t.dereg_mr.unwrap()(comm, cuda) }, 0);
            // SAFETY: the fake looks cuda up in its registry, so the freed registration is an error, not a
            // dereference.
            assert_eq!(unsafe { p.t.dereg_mr.unwrap()(comm, cuda) }, NCCL_INTERNAL_ERROR, "double dereg");
            // SAFETY: comm is live and host a registration on it.
            assert_eq!(unsafe { p.t.dereg_mr.unwrap()(comm, host) }, 0);
        }
        assert_eq!(p.reg(null_mut(), b, 4096, NCCL_PTR_HOST), Err(NCCL_INTERNAL_ERROR), "no comm");
        // A registration belongs to its comm.
        let mh = p.reg(pair.send, b, 4096, NCCL_PTR_HOST).unwrap();
        assert_eq!(p.irecv(pair.recv, b, 10, mh), Err(NCCL_INTERNAL_ERROR));
        // Buffers must lie inside the registration.
        // SAFETY: b is a 16 KiB allocation, so b + 4000 lies inside it.
        assert_eq!(p.isend(pair.send, unsafe { b.add(4000) }, 97, mh), Err(NCCL_INTERNAL_ERROR));
        assert_warned("outside");
        assert_eq!(p.isend(pair.send, b, 10, null_mut()), Err(NCCL_INTERNAL_ERROR));
        let rmh = p.reg(pair.recv, b, 4096, NCCL_PTR_HOST).unwrap();
        assert_eq!(p.irecv(pair.recv, b.wrapping_sub(1), 10, rmh), Err(NCCL_INTERNAL_ERROR));
        // irecv: n must be 1, mhandles[0] non-NULL.
        let mut req = null_mut();
        let mut datas = [b.cast::<std::ffi::c_void>(); 2];
        let mut sizes = [10, 10];
        let mut tags = [0, 0];
        let mut mhs = [rmh, rmh];
        let irecv = p.t.irecv.unwrap();
        // SAFETY: each array has 2 entries (n = 2) and req is a writable local; n = 2 is refused before the
        // arrays are used.
        let r = unsafe {
            irecv(pair.recv, 2, datas.as_mut_ptr(), sizes.as_mut_ptr(), tags.as_mut_ptr(), mhs.as_mut_ptr(), &mut req)
        };
        assert_eq!(r, NCCL_INTERNAL_ERROR);
        mhs[0] = null_mut();
        // SAFETY: each array has at least 1 entry (n = 1) and req is a writable local; the null mhandle is
        // refused.
        let r = unsafe {
            irecv(pair.recv, 1, datas.as_mut_ptr(), sizes.as_mut_ptr(), tags.as_mut_ptr(), mhs.as_mut_ptr(), &mut req)
        };
        assert_eq!(r, NCCL_INTERNAL_ERROR);
        // Sends on a receive comm and receives on a send comm are refused.
        assert_eq!(p.isend(pair.recv, b, 10, rmh), Err(NCCL_INTERNAL_ERROR));
        assert_eq!(p.irecv(pair.send, b, 10, mh), Err(NCCL_INTERNAL_ERROR));
    }
);

isolated_test!(
    fn registrations_of_2_gib_or_more_fail() {
        // regMr takes an int: a C consumer's 2 GiB and more arrive negative, or wrapped to 0 (4 GiB)
        // or to a small size (4 GiB + 8 KiB). Host mode never touches CUDA-registered memory until
        // it is sent, so a large range can be named without allocating it.
        let p = Plugin::init();
        let pair = p.pair(0);
        let buf = common::Aligned::new(16384);
        let b = buf.ptr();
        for comm in [pair.send, pair.recv] {
            for gib in [2usize, 3, 4, 6] {
                assert_eq!(p.reg(comm, b, gib << 30, NCCL_PTR_CUDA), Err(NCCL_INTERNAL_ERROR), "{gib} GiB");
                assert_warned("int size");
            }
            assert_eq!(p.reg(comm, b, 2 << 30, NCCL_PTR_HOST), Err(NCCL_INTERNAL_ERROR), "2 GiB host");
            assert_warned("int size");
            let below = p.reg(comm, b, (2 << 30) - 4096, NCCL_PTR_CUDA).unwrap();
            // SAFETY: comm is live and below a registration on it.
            assert_eq!(unsafe { p.t.dereg_mr.unwrap()(comm, below) }, 0);
        }
        // 4 GiB + 8 KiB wraps to 8 KiB: registered, but it covers 8 KiB only.
        let wrapped = p.reg(pair.send, b, (4 << 30) + 8192, NCCL_PTR_CUDA).unwrap();
        assert!(p.isend(pair.send, b, 8192, wrapped).is_ok());
        // SAFETY: b is a 16 KiB allocation, so b + 8192 lies inside it.
        assert_eq!(p.isend(pair.send, unsafe { b.add(8192) }, 4096, wrapped), Err(NCCL_INTERNAL_ERROR));
        assert_warned("outside its registration");
    }
);

isolated_test!(
    fn request_window_test_and_consume_order() {
        let p = Plugin::init();
        let pair = p.pair(1);
        let src = common::pattern(64 * 100, 1);
        let mut dst = vec![0u8; 64 * 100];
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();

        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for i in 0..16 {
            // SAFETY: src holds 64 * 100 bytes and i < 16, so src + i * 100 lies inside it.
            sends.push(p.isend(pair.send, unsafe { src.as_ptr().add(i * 100) }, 100, smh).unwrap());
            // SAFETY: dst holds 64 * 100 bytes and i < 16, so dst + i * 100 lies inside it.
            recvs.push(p.irecv(pair.recv, unsafe { dst.as_mut_ptr().add(i * 100) }, 100, rmh).unwrap());
        }
        assert_eq!(p.isend(pair.send, src.as_ptr(), 100, smh), Err(NCCL_INTERNAL_ERROR), "17th send");
        assert_warned("unable to allocate requests");
        assert_eq!(p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh), Err(NCCL_INTERNAL_ERROR), "17th receive");
        assert_warned("unable to allocate requests");

        // test only the oldest in-flight request.
        assert_eq!(p.test(sends[1]), Err(NCCL_INTERNAL_ERROR));
        assert_warned("test called with invalid request");
        assert_eq!(p.test(recvs[5]), Err(NCCL_INTERNAL_ERROR));
        assert_eq!(p.test(null_mut()), Err(NCCL_INTERNAL_ERROR));
        // SAFETY: requests point into their comm's ring of request entries, larger than 8 bytes, so +8 stays
        // inside it.
        assert_eq!(p.test(unsafe { sends[0].cast::<u8>().add(8).cast() }), Err(NCCL_INTERNAL_ERROR));
        // Consume before done.
        assert_eq!(p.consume(pair.recv, recvs[0]), NCCL_INTERNAL_ERROR);
        assert_warned("has not been reported done");

        for i in 0..16 {
            p.wait_both(sends[i], recvs[i]).unwrap();
        }
        // Completed receives still hold their entries: the window is still full for receives but
        // not for sends, whose entries are freed on completion.
        assert_eq!(p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh), Err(NCCL_INTERNAL_ERROR));
        assert_warned("16 requests are outstanding");
        // Re-testing a completed request is invalid.
        assert_eq!(p.test(recvs[0]), Err(NCCL_INTERNAL_ERROR));
        assert_warned("already reported done");
        assert_eq!(p.test(sends[0]), Err(NCCL_INTERNAL_ERROR));
        // Consume in order only; a send request is ignored with a WARN.
        assert_eq!(p.consume(pair.recv, recvs[1]), NCCL_INTERNAL_ERROR);
        assert_warned("not the oldest unconsumed");
        assert_eq!(p.consume(pair.send, sends[0]), 0);
        assert_warned("send request");
        // SAFETY: pair.recv is live; n = 2 is refused before the request is used.
        let r = unsafe { p.t.irecv_consumed.unwrap()(pair.recv, 2, recvs[0]) };
        assert_eq!(r, NCCL_INTERNAL_ERROR, "n must be 1");
        assert_warned("n = 2");
        for (i, r) in recvs.iter().enumerate() {
            assert_eq!(p.consume(pair.recv, *r), 0, "consume {i}");
        }
        assert_eq!(p.consume(pair.recv, recvs[0]), NCCL_INTERNAL_ERROR, "double consume");
        assert_warned("invalid request");
        // The 17th request now fits, in entry 0 again (request k lives in entry k % 16).
        let again = p.irecv(pair.recv, dst.as_mut_ptr(), 100, rmh).unwrap();
        assert_eq!(again, recvs[0]);
        let send_again = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        assert_eq!(send_again, sends[0]);
        p.wait_both(send_again, again).unwrap();
        assert_eq!(p.consume(pair.recv, again), 0);
        assert!(take_warnings().is_empty());
    }
);

isolated_test!(
    fn misuse_from_many_threads_never_crashes() {
        // Each comm is meant to be driven by one thread; a consumer that breaks this, or passes
        // stale and made-up pointers, gets error codes, never a crash.
        let p = std::sync::Arc::new(Plugin::init());
        let pair = p.pair(0);
        let (send, recv) = (pair.send as usize, pair.recv as usize);
        let src = std::sync::Arc::new(common::pattern(4096, 1));
        let smh = p.reg(pair.send, src.as_ptr(), 4096, NCCL_PTR_HOST).unwrap() as usize;
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (p, src) = (p.clone(), src.clone());
                std::thread::spawn(move || {
                    let mut reqs = Vec::new();
                    for i in 0..200usize {
                        if let Ok(r) = p.isend(send as *mut _, src.as_ptr(), 4096, smh as *mut _) {
                            reqs.push(r as usize);
                        }
                        for r in &reqs {
                            let rc = p.test(*r as *mut _).err().unwrap_or(0);
                            assert!(rc == 0 || rc == NCCL_INTERNAL_ERROR, "rc {rc}");
                        }
                        let junk = (recv + t * 8 + i) as *mut std::ffi::c_void;
                        assert_eq!(p.test(junk).err().unwrap_or(NCCL_INTERNAL_ERROR), NCCL_INTERNAL_ERROR);
                        assert_eq!(p.consume(recv as *mut _, junk), NCCL_INTERNAL_ERROR);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Closing while requests are in flight, then using the closed comm, is reported too.
        // SAFETY: pair.send is a live send comm, closed once.
        assert_eq!(unsafe { p.t.close_send.unwrap()(pair.send) }, 0);
        assert_eq!(p.isend(pair.send, src.as_ptr(), 1, smh as *mut _), Err(NCCL_INTERNAL_ERROR));
        // SAFETY: the fake checks the kind of comm in its registry, so a receive comm given to closeListen is
        // an error.
        assert_eq!(unsafe { p.t.close_listen.unwrap()(pair.recv) }, NCCL_INTERNAL_ERROR, "wrong kind");
        // SAFETY: the fake checks the kind of comm in its registry, so a listen comm given to closeRecv is an
        // error.
        assert_eq!(unsafe { p.t.close_recv.unwrap()(pair.listen) }, NCCL_INTERNAL_ERROR, "wrong kind");
        // SAFETY: pair.recv is a live receive comm, closed once.
        assert_eq!(unsafe { p.t.close_recv.unwrap()(pair.recv) }, 0);
        // SAFETY: pair.listen is a live listen comm, closed once.
        assert_eq!(unsafe { p.t.close_listen.unwrap()(pair.listen) }, 0);
    }    // The per-comm locks under test here sit behind the thread check (tests/fatal.rs).
    env: ["FAKE_TCPX_THREAD_CHECK" => "off"]
);
