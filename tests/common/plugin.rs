//! The fake devmem NIC plugin for the plugin tests: where it is, and engines configured to use it.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libloading::os::unix::Library;
use testkit::Rng;
use testkit::child::ChildTest;
use uccl_tcpx::internal::ncclnet::{NCCL_NET_HANDLE_MAXSIZE, NcclNetV7, PLUGIN_SYMBOL_V7};
use uccl_tcpx::{Config, TransportChoice};

/// `$UCCL_TCPX_FAKE_PLUGIN`, else `libfake_tcpx.so` in the target directory and profile this test
/// was built into (so CARGO_TARGET_DIR and --release are respected). Fails the test, saying how to
/// build it, when it is missing.
pub fn fake_plugin() -> PathBuf {
    if let Some(path) = std::env::var_os("UCCL_TCPX_FAKE_PLUGIN") {
        let path = PathBuf::from(path);
        assert!(path.exists(), "UCCL_TCPX_FAKE_PLUGIN={} does not exist", path.display());
        return path;
    }
    // Test binaries live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("<target>/<profile>/deps/<test>");
    let so = profile_dir.join("libfake_tcpx.so");
    assert!(
        so.exists(),
        "{} is missing: run `cargo build -p fake-tcpx` (with the same profile) before these tests, or set UCCL_TCPX_FAKE_PLUGIN",
        so.display()
    );
    so
}

/// Child test `child` against the fake NIC at its strict default for same-host traffic
/// (`FAKE_TCPX_SAME_HOST=fatal`: same-host devmem traffic ends the process, as in TCPX) with every
/// comm the plugin makes dropped at once (`FAKE_TCPX_FAULT=drop:0`, so a transfer the plugin
/// carried fails), and same-host peers on sockets as deployed: both set back from what the plugin
/// harness pins for the other plugin tests. The fake's other settings are cleared.
pub fn strict_child(child: ChildTest) -> ChildTest {
    child
        .ignored()
        .env_cleared("FAKE_TCPX_")
        .env("FAKE_TCPX_SAME_HOST", "fatal")
        .env("FAKE_TCPX_FAULT", "drop:0")
        .env("UCCL_TCPX_LOCAL_PEERS", "socket")
        .env("UCCL_TCPX_FAKE_PLUGIN", fake_plugin())
}

/// In a child: fails unless it runs as [`strict_child`] set it up.
pub fn assert_strict() {
    for (name, value) in [("FAKE_TCPX_SAME_HOST", "fatal"), ("FAKE_TCPX_FAULT", "drop:0")] {
        assert_eq!(std::env::var(name).as_deref(), Ok(value), "run through its parent, which sets {name}");
    }
}

/// Another consumer of the plugin in this process, loading and initialising it as NCCL does
/// (`dlopen` RTLD_LOCAL, `init` with a logger).
pub struct Nccl {
    table: NcclNetV7,
    _library: Library,
}

impl Nccl {
    pub fn load(path: &Path) -> Nccl {
        Nccl::load_with(path, libc::RTLD_NOW | libc::RTLD_LOCAL)
    }

    /// Loaded with `flags` instead of NCCL's.
    pub fn load_with(path: &Path, flags: i32) -> Nccl {
        // SAFETY: loads the fake NIC, which the test built, as a net plugin consumer would.
        let library = unsafe { Library::open(Some(path), flags) }.expect("load the fake");
        // SAFETY: the fake exports its table as this data symbol.
        let table = unsafe { **library.get::<*const NcclNetV7>(PLUGIN_SYMBOL_V7).expect("the plugin table") };
        let nccl = Nccl { table, _library: library };
        assert_eq!(nccl.init(), 0, "the first consumer's init succeeds");
        nccl
    }

    pub fn init(&self) -> i32 {
        // SAFETY: the fake's init with a C logger that lives as long as the process.
        unsafe { (self.table.init.unwrap())(uccl_tcpx::internal::transport::plugin::logger::logger()) }
    }

    /// A listen on device 0 and its close: the image serves its consumer.
    pub fn listen_works(&self) -> bool {
        let mut handle = [0u8; NCCL_NET_HANDLE_MAXSIZE];
        let mut comm: *mut c_void = std::ptr::null_mut();
        // SAFETY: a 128-byte handle buffer and an out-pointer, as the ABI asks.
        let rc = unsafe { (self.table.listen.unwrap())(0, handle.as_mut_ptr().cast(), &mut comm) };
        if rc != 0 || comm.is_null() {
            return false;
        }
        // SAFETY: a listen comm of this image with no accept running.
        unsafe { (self.table.close_listen.unwrap())(comm) == 0 }
    }
}

/// How many images of `path` this process has mapped (each maps the file from offset 0 once).
pub fn images_of(path: &Path) -> usize {
    let path = std::fs::canonicalize(path).unwrap();
    mapped_at_zero(|file| Path::new(file) == path)
}

/// How many private copies of `path` the engines loaded: anonymous files the maps call
/// `/memfd:uccl-tcpx-private:<file name>`.
pub fn private_copies_of(path: &Path) -> usize {
    let name = format!("/memfd:uccl-tcpx-private:{}", path.file_name().unwrap().to_string_lossy());
    mapped_at_zero(|file| file == name)
}

fn mapped_at_zero(is_it: impl Fn(&str) -> bool) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() >= 6 && fields[2] == "00000000" && is_it(fields[5])
        })
        .count()
}

/// The fake's count of send and receive requests handed out in this process so far.
pub fn fake_requests(path: &Path) -> (u64, u64) {
    // SAFETY: the engine loaded the fake from this path (RTLD_NOLOAD only finds that image); the
    // hook writes two u64s.
    unsafe {
        let lib = libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_NOLOAD)
            .expect("the fake is loaded");
        let hook = lib
            .get::<unsafe extern "C" fn(*mut u64, *mut u64)>(b"fake_tcpx_requests\0")
            .expect("the fake's request counter");
        let (mut s, mut r) = (0u64, 0u64);
        hook(&mut s, &mut r);
        (s, r)
    }
}

/// The fake's comms that hold TCPX's per-comm host memory now, the bytes they hold, and the
/// comms that ever held it.
pub fn fake_comms(path: &Path) -> (u64, u64, u64) {
    // SAFETY: as in `fake_requests`; the hook writes three u64s.
    unsafe {
        let lib = libloading::os::unix::Library::open(Some(path), libc::RTLD_NOW | libc::RTLD_NOLOAD)
            .expect("the fake is loaded");
        let hook = lib
            .get::<unsafe extern "C" fn(*mut u64, *mut u64, *mut u64)>(b"fake_tcpx_comms\0")
            .expect("the fake's comm counter");
        let (mut held, mut bytes, mut made) = (0u64, 0u64, 0u64);
        hook(&mut held, &mut bytes, &mut made);
        (held, bytes, made)
    }
}

/// A random block table: `n` pieces of `min..=max` bytes, each at a random offset inside its own
/// slot of `slot` bytes, the slots shuffled.
pub fn block_table(rng: &mut Rng, n: usize, slot: usize, min: usize, max: usize) -> Vec<(usize, usize)> {
    let mut slots: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut slots);
    slots
        .into_iter()
        .map(|s| {
            let len = min + rng.below(max - min + 1);
            (s * slot + rng.below(slot - len + 1), len)
        })
        .collect()
}

/// The other end's pieces for the same bytes: the same lengths (one item is one length on both
/// ends), each at a random offset of its own slot of `slot` bytes, the slots shuffled.
pub fn elsewhere(rng: &mut Rng, pieces: &[(usize, usize)], slot: usize) -> Vec<(usize, usize)> {
    let mut slots: Vec<usize> = (0..pieces.len()).collect();
    rng.shuffle(&mut slots);
    pieces.iter().zip(slots).map(|(&(_, len), s)| (s * slot + rng.below(slot - len + 1), len)).collect()
}

/// Engines on the plugin transport over the fake NIC, with `channels` channels of `chunk`-byte
/// chunks, 16 in flight (TCPX's window). Same-host peers stay on the plugin as the pinned
/// `UCCL_TCPX_LOCAL_PEERS` says (below).
pub fn config(channels: u16, chunk: u32) -> Config {
    let local_peers =
        Config::from_lookup(|name| (name == "UCCL_TCPX_LOCAL_PEERS").then(|| std::env::var(name).ok()).flatten())
            .expect("UCCL_TCPX_LOCAL_PEERS")
            .local_peers;
    Config {
        transport: TransportChoice::Tcpx,
        plugin_path: Some(fake_plugin()),
        num_channels: Some(channels),
        chunk_size: chunk,
        window: 16,
        connect_timeout: Duration::from_secs(30),
        local_peers,
        ..super::loopback()
    }
}

/// What lets the plugin tests run both ends of a plugin connection on one host, which real TCPX
/// cannot carry; a value already in the environment wins.
const ONE_HOST_PLUGIN: &[(&str, &str)] = &[
    // The plugin tests are about the plugin path, and both engines of each run on one host, where
    // an engine sends a peer it knows to share the host over the socket transport instead (TCPX
    // exits at the first devmem receive of loopback traffic: "data landed on host memory",
    // sock/tcpx.h). Test-only: it keeps such peers on the plugin.
    ("UCCL_TCPX_LOCAL_PEERS", "plugin"),
    // ... and the fake then carries them instead of ending the process as TCPX would, for a receive
    // into GPU memory (a CUDA registration). `tests/plugin_local.rs` sets both back to their defaults.
    ("FAKE_TCPX_SAME_HOST", "allow"),
];

extern "C" fn pin_one_host_plugin() {
    for (name, value) in ONE_HOST_PLUGIN {
        if std::env::var_os(name).is_none() {
            // SAFETY: runs from .init_array, before main, while the process has one thread.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// Before main: the fake reads its knobs once, in the `init` of the first engine of whichever test
/// runs first, and setting the environment once test threads run would race their reads of it.
/// Child processes the tests start inherit the values, or set them again where they are cleared.
/// Every test binary that includes this harness sets them; the fake reads its own, and `config`
/// the engine's.
#[used]
#[unsafe(link_section = ".init_array")]
static PIN_ONE_HOST_PLUGIN: extern "C" fn() = pin_one_host_plugin;
