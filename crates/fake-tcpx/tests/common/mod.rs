//! Drives the built plugin as a raw ncclNet v7 consumer would: dlopen, copy the table out of the
//! data symbol, call through its function pointers. Every test runs in its own child process (the
//! plugin's init is once per process and its knobs are read there), with the environment it names.
//! Waiting, child processes and test data come from `testkit`, shared with the engine's tests.

#![allow(dead_code, unused_imports)]

use std::ffi::{CStr, c_char, c_int, c_ulong, c_void};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use testkit::child::{ChildTest, is_child};
use uccl_tcpx::internal::ncclnet::*;

pub use testkit::pattern;

/// How long a connect, accept or request of the fake may take on a loaded machine.
const LIMIT: Duration = Duration::from_secs(60);

/// Knobs every test runs with unless it sets them itself: the tests of these rules do.
const TEST_DEFAULTS: &[(&str, &str)] = &[
    // Few tests want TCPX's seconds of setup per pair.
    ("FAKE_TCPX_SOCKET_DELAY_MS", "0"),
    ("FAKE_TCPX_STEERING_WAIT_MS", "0"),
    // Every test pairs comms inside one process, where TCPX would exit at the first devmem receive
    // (same-host traffic never reaches a NIC).
    ("FAKE_TCPX_SAME_HOST", "allow"),
    // The devmem NICs alone, as deployments list them: eth0, whose flows are never steered into GPU
    // memory, is the subject of the tests that set this back ("" is unset).
    ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "^eth0"),
];

/// Test `name` in a child process whose fake knobs, and TCPX variables the fake reads, are only the
/// harness's defaults and `env`.
fn child(name: &str, env: &[(&str, &str)]) -> ChildTest {
    let mut child = ChildTest::new(name).env_cleared("FAKE_TCPX_").env_cleared("NCCL_");
    for (k, v) in TEST_DEFAULTS.iter().chain(env) {
        child = child.env(k, v);
    }
    child
}

/// In the parent: runs test `name` in a child process with `env`, and fails if the child fails;
/// returns true. In that child: returns false, and the test body runs.
pub fn spawn_in_child(name: &str, env: &[(&str, &str)]) -> bool {
    if is_child(name) {
        return false;
    }
    child(name, env).run();
    true
}

/// In the parent: runs test `name` in a child process with `env` and returns how it ended and what
/// it printed. In that child: returns `None`, and the test body runs.
pub fn child_outcome(name: &str, env: &[(&str, &str)]) -> Option<(std::process::ExitStatus, String)> {
    if is_child(name) {
        return None;
    }
    Some(child(name, env).finish())
}

/// Whether a GPU-mode test must return without running (see `testkit::gpu`): checked in the
/// parent, whose child then runs it.
pub fn no_gpu() -> bool {
    testkit::skip_without_gpu(uccl_tcpx::internal::cuda::available())
}

/// A test that runs in its own process with the given plugin knobs.
#[macro_export]
macro_rules! isolated_test {
    ($(#[$attr:meta])* fn $name:ident() $body:block $(env: [$($k:expr => $v:expr),* $(,)?])?) => {
        #[test]
        $(#[$attr])*
        fn $name() {
            if common::spawn_in_child(stringify!($name), &[$($(($k, $v)),*)?]) {
                return;
            }
            $body
        }
    };
}

unsafe extern "C" {
    /// tests/logger.c: the variadic ncclDebugLogger_t.
    fn fake_tcpx_test_logger(level: c_int, flags: c_ulong, file: *const c_char, line: c_int, fmt: *const c_char, ...);
}

static LOG: Mutex<Vec<(c_int, String)>> = Mutex::new(Vec::new());

#[unsafe(no_mangle)]
extern "C" fn fake_tcpx_test_log_sink(
    level: c_int,
    _flags: c_ulong,
    _file: *const c_char,
    _line: c_int,
    msg: *const c_char,
) {
    // SAFETY: logger.c passes a NUL-terminated buffer.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    if level == NCCL_LOG_WARN {
        eprintln!("WARN {text}");
    }
    LOG.lock().unwrap().push((level, text));
}

pub fn logger() -> NcclDebugLogger {
    Some(fake_tcpx_test_logger)
}

/// WARN messages logged since the last call.
pub fn take_warnings() -> Vec<String> {
    let mut log = LOG.lock().unwrap();
    let warns = log.iter().filter(|(l, _)| *l == NCCL_LOG_WARN).map(|(_, m)| m.clone()).collect();
    log.clear();
    warns
}

/// Asserts that the last call logged a WARN containing `needle`.
pub fn assert_warned(needle: &str) {
    let w = take_warnings();
    assert!(w.iter().any(|m| m.contains(needle)), "expected a WARN containing {needle:?}, got {w:?}");
}

/// The cdylib cargo built for this package: `<target>/<profile>/libfake_tcpx.so`, next to `deps/`
/// where the test binary lives.
pub fn library_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    for dir in [deps, deps.parent().expect("profile dir")] {
        let p = dir.join("libfake_tcpx.so");
        if p.exists() {
            return p;
        }
    }
    panic!("libfake_tcpx.so not found next to {}: run `cargo build -p fake-tcpx`", exe.display());
}

pub struct Plugin {
    _lib: libloading::Library,
    pub t: NcclNetV7,
}

impl Plugin {
    /// Loads the plugin without calling init.
    pub fn load() -> Plugin {
        Plugin::load_from(&library_path())
    }

    /// Loads the plugin from `path` (another name for it, or a copy) without calling init.
    pub fn load_from(path: &std::path::Path) -> Plugin {
        // SAFETY: loading our own plugin, whose initialisers are Rust's (none that run on load).
        let lib = unsafe { libloading::Library::new(path) }.expect("dlopen libfake_tcpx.so");
        // SAFETY: ncclNetPlugin_v7 is a data symbol holding an NcclNetV7.
        let t = unsafe { **lib.get::<*const NcclNetV7>(PLUGIN_SYMBOL_V7).expect("ncclNetPlugin_v7") };
        Plugin { _lib: lib, t }
    }

    /// Loads and initialises the plugin.
    pub fn init() -> Plugin {
        let p = Plugin::load();
        // SAFETY: a freshly loaded plugin, initialised with this harness's logger, which lives for the whole
        // process.
        assert_eq!(unsafe { p.t.init.unwrap()(logger()) }, 0, "init");
        take_warnings();
        p
    }

    pub fn listen(&self, dev: c_int) -> ([u8; 128], *mut c_void) {
        let mut handle = [0u8; 128];
        let mut lc = std::ptr::null_mut();
        // SAFETY: handle is a 128-byte buffer (NCCL_NET_HANDLE_MAXSIZE) and lc a local, both writable for the
        // call; dev is checked by the fake.
        let rc = unsafe { self.t.listen.unwrap()(dev, handle.as_mut_ptr().cast(), &mut lc) };
        assert_eq!(rc, 0, "listen");
        assert!(!lc.is_null());
        (handle, lc)
    }

    /// Connects and accepts by polling both, as NCCL's proxy does.
    pub fn pair(&self, dev: c_int) -> Pair {
        let (handle, lc) = self.listen(dev);
        let mut connect_handle = handle;
        let mut dev_handle = Box::new(NcclNetDeviceHandleV7::default());
        let mut dev_handle_ptr: *mut NcclNetDeviceHandleV7 = &mut *dev_handle;
        let (mut sc, mut rc): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        testkit::drive("connect and accept", LIMIT, || {
            if sc.is_null() {
                // SAFETY: connect_handle is the 128-byte handle listen wrote, kept in place across polls as
                // TCPX requires; sc is a writable local.
                let r = unsafe {
                    self.t.connect.unwrap()(dev, connect_handle.as_mut_ptr().cast(), &mut sc, std::ptr::null_mut())
                };
                assert_eq!(r, 0, "connect");
            }
            if rc.is_null() {
                // SAFETY: lc came from listen above; rc and dev_handle_ptr are writable locals, the latter
                // pointing at the boxed storage that Pair keeps alive.
                let r = unsafe { self.t.accept.unwrap()(lc, &mut rc, &mut dev_handle_ptr) };
                assert_eq!(r, 0, "accept");
            }
            (!sc.is_null() && !rc.is_null()).then_some(())
        });
        Pair { send: sc, recv: rc, listen: lc, dev_handle, send_dev_handle: Box::default(), connect_handle }
    }

    /// TCPXO's connect and accept, polled as NCCL's proxy does, with both device handle slots
    /// pointing at handles filled with `UNWRITTEN` first (TCPXO requires `sendDevComm`; it writes
    /// through `*sendDevComm` and `*recvDevComm`).
    pub fn pair_tcpxo(&self, dev: c_int) -> Pair {
        let (handle, lc) = self.listen(dev);
        let mut connect_handle = handle;
        let (mut dev_handle, mut send_dev_handle) = (Box::new(UNWRITTEN), Box::new(UNWRITTEN));
        let mut recv_ptr: *mut NcclNetDeviceHandleV7 = &mut *dev_handle;
        let mut send_ptr: *mut NcclNetDeviceHandleV7 = &mut *send_dev_handle;
        let (mut sc, mut rc): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        testkit::drive("connect and accept", LIMIT, || {
            if sc.is_null() {
                // SAFETY: connect_handle is the 128-byte handle listen wrote, kept in place across polls;
                // sc and send_ptr are writable locals, the latter pointing at boxed storage Pair keeps.
                let r =
                    unsafe { self.t.connect.unwrap()(dev, connect_handle.as_mut_ptr().cast(), &mut sc, &mut send_ptr) };
                assert_eq!(r, 0, "connect");
            }
            if rc.is_null() {
                // SAFETY: lc came from listen above; rc and recv_ptr are writable locals, the latter
                // pointing at boxed storage Pair keeps.
                let r = unsafe { self.t.accept.unwrap()(lc, &mut rc, &mut recv_ptr) };
                assert_eq!(r, 0, "accept");
            }
            (!sc.is_null() && !rc.is_null()).then_some(())
        });
        Pair { send: sc, recv: rc, listen: lc, dev_handle, send_dev_handle, connect_handle }
    }

    /// One TCPXO test call, which writes `*size` too: Ok((done, size)).
    pub fn test_sized(&self, req: *mut c_void) -> Result<(bool, c_int), c_int> {
        let mut done = -1;
        let mut size = -12345;
        // SAFETY: the fake maps req through its registry (anything else is an error) and writes only
        // done and size, both writable locals.
        let rc = unsafe { self.t.test.unwrap()(req, &mut done, &mut size) };
        if rc != 0 {
            return Err(rc);
        }
        assert!(done == 0 || done == 1, "done = {done}");
        assert!(done == 1 || size == 0, "a pending TCPXO request reports size 0, got {size}");
        Ok((done == 1, size))
    }

    /// TCPXO: tests `req` until done, with a deadline; the size it reported.
    pub fn wait_sized(&self, req: *mut c_void) -> Result<c_int, c_int> {
        testkit::drive(&format!("request {req:p} completes"), LIMIT, || match self.test_sized(req) {
            Ok((false, _)) => None,
            Ok((true, n)) => Some(Ok(n)),
            Err(rc) => Some(Err(rc)),
        })
    }

    pub fn reg(&self, comm: *mut c_void, data: *const u8, len: usize, ty: c_int) -> Result<*mut c_void, c_int> {
        let mut mh = std::ptr::null_mut();
        // SAFETY: the fake looks comm up in its registry (a stale or made-up one is an error) and only
        // records data and len; mh is a writable local.
        let rc = unsafe { self.t.reg_mr.unwrap()(comm, data as *mut c_void, len as c_int, ty, &mut mh) };
        if rc == 0 { Ok(mh) } else { Err(rc) }
    }

    pub fn isend(&self, sc: *mut c_void, data: *const u8, len: usize, mh: *mut c_void) -> Result<*mut c_void, c_int> {
        let mut req = std::ptr::null_mut();
        // SAFETY: the fake looks sc and mh up in its registry and refuses a range outside the registration;
        // callers register only buffers they keep alive until the send is done.
        let rc = unsafe { self.t.isend.unwrap()(sc, data as *mut c_void, len as c_int, 7, mh, &mut req) };
        if rc == 0 { Ok(req) } else { Err(rc) }
    }

    pub fn irecv(&self, rc: *mut c_void, data: *mut u8, len: usize, mh: *mut c_void) -> Result<*mut c_void, c_int> {
        let mut req = std::ptr::null_mut();
        let mut data = data.cast::<c_void>();
        let mut size = len as c_int;
        let mut tag = 99;
        let mut mh = mh;
        // SAFETY: each pointer names one writable local (n = 1); the fake looks rc and mh up in its registry
        // and refuses a range outside the registration; callers keep data alive until the receive is done.
        let r = unsafe { self.t.irecv.unwrap()(rc, 1, &mut data, &mut size, &mut tag, &mut mh, &mut req) };
        if r == 0 { Ok(req) } else { Err(r) }
    }

    /// One test call: Ok(done).
    pub fn test(&self, req: *mut c_void) -> Result<bool, c_int> {
        let mut done = -1;
        let mut size = -12345;
        // SAFETY: the fake maps req to its comm's request ring (anything else is an error) and writes only
        // done; both are writable locals.
        let rc = unsafe { self.t.test.unwrap()(req, &mut done, &mut size) };
        assert_eq!(size, -12345, "test must never write *size");
        if rc == 0 {
            assert!(done == 0 || done == 1, "done = {done}");
            Ok(done == 1)
        } else {
            Err(rc)
        }
    }

    /// Tests until done, with a deadline.
    pub fn wait(&self, req: *mut c_void) -> Result<(), c_int> {
        testkit::drive(&format!("request {req:p} completes"), LIMIT, || match self.test(req) {
            Ok(false) => None,
            Ok(true) => Some(Ok(())),
            Err(rc) => Some(Err(rc)),
        })
    }

    /// Tests the oldest send and receive alternately until both are done (one thread drives both
    /// comms, as a proxy thread would).
    pub fn wait_both(&self, send: *mut c_void, recv: *mut c_void) -> Result<(), c_int> {
        let (mut s, mut r) = (false, false);
        let poll = |done: &mut bool, req| -> Result<(), c_int> {
            if !*done {
                *done = self.test(req)?;
            }
            Ok(())
        };
        testkit::drive("the send and the receive complete", LIMIT, || {
            match poll(&mut s, send).and_then(|()| poll(&mut r, recv)) {
                Err(rc) => Some(Err(rc)),
                Ok(()) => (s && r).then_some(Ok(())),
            }
        })
    }

    pub fn consume(&self, rc: *mut c_void, req: *mut c_void) -> c_int {
        // SAFETY: the fake maps rc and req through its registry; anything else is an error.
        unsafe { self.t.irecv_consumed.unwrap()(rc, 1, req) }
    }
}

pub struct Pair {
    pub send: *mut c_void,
    pub recv: *mut c_void,
    pub listen: *mut c_void,
    pub dev_handle: Box<NcclNetDeviceHandleV7>,
    /// What `connect` wrote through `*sendDevComm` (TCPXO; TCPX pairs pass none).
    pub send_dev_handle: Box<NcclNetDeviceHandleV7>,
    pub connect_handle: [u8; 128],
}

/// A device handle no plugin writes: what `pair_tcpxo` fills the slots with first.
pub const UNWRITTEN: NcclNetDeviceHandleV7 = NcclNetDeviceHandleV7 {
    net_device_type: 99,
    net_device_version: 99,
    handle: 0x99 as *mut c_void,
    size: 99,
    needs_proxy_progress: 99,
};

/// The host-mode view of a receive comm's unpack queue.
pub struct Unpack {
    pub meta: *const NetUnpackMeta,
    pub bounce: *const u8,
}

impl Unpack {
    /// Host mode: the device handle points at host memory.
    pub fn host(pair: &Pair) -> Unpack {
        let h = pair.dev_handle.handle.cast::<UnpackDeviceHandle>();
        // SAFETY: in host mode the device handle points at the receive comm's 24-byte UnpackDeviceHandle in
        // host memory, live while the pair is.
        let h = unsafe { h.read() };
        Unpack { meta: h.meta, bounce: h.bounce_buf.cast() }
    }

    pub fn cnt(&self, slot: usize) -> u64 {
        // SAFETY: meta is the receive comm's live host NetUnpackMeta; the fake updates cnt atomically, hence
        // the atomic view; slot < 16 is the caller's.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(std::ptr::addr_of!((*self.meta).cnt[slot]) as *mut u64) }
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn metas(&self, slot: usize) -> Vec<LoadMeta> {
        let cnt = self.cnt(slot) as usize;
        assert!(cnt <= UNPACK_MAX_SLICE_PAGES, "cnt {cnt} over 2048");
        // SAFETY: i < cnt, which metas checked to be at most 2048 (the size of mem[slot]), in the comm's live
        // NetUnpackMeta.
        (0..cnt).map(|i| unsafe { std::ptr::addr_of!((*self.meta).mem[slot][i]).read() }).collect()
    }

    /// Reassembles a receive from its loadMeta list, checking that the fragments tile
    /// `[0, expected_len)` exactly and stay inside the pool.
    pub fn gather(&self, slot: usize, expected_len: usize, pool_bytes: usize) -> Vec<u8> {
        let metas = self.metas(slot);
        let mut out = vec![0u8; expected_len];
        let mut covered = vec![false; expected_len];
        for m in &metas {
            let (src, len, dst) = (m.src_off as usize, m.len as usize, m.dst_off as usize);
            assert!(len > 0 && len <= 4096, "fragment length {len}");
            assert!(src + len <= pool_bytes, "fragment {m:?} outside the pool");
            assert!(src / 4096 == (src + len - 1) / 4096, "fragment {m:?} crosses a page");
            assert!(dst + len <= expected_len, "fragment {m:?} beyond {expected_len}");
            for c in &mut covered[dst..dst + len] {
                assert!(!*c, "byte covered twice by {m:?}");
                *c = true;
            }
            // SAFETY: src + len <= pool_bytes, the bounce pool's size, and dst + len <= expected_len, the
            // size of out (both asserted above).
            unsafe { std::ptr::copy_nonoverlapping(self.bounce.add(src), out.as_mut_ptr().add(dst), len) };
        }
        assert!(covered.iter().all(|c| *c), "fragments leave holes");
        out
    }
}

/// A 4 KiB-aligned host buffer (what a CUDA registration requires).
pub struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: layout has a non-zero size (at least 4096).
        Aligned { ptr: unsafe { std::alloc::alloc_zeroed(layout) }, layout }
    }
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc_zeroed with this same layout in new(), and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}
