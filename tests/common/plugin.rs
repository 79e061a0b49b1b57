//! The fake devmem NIC plugin for the plugin tests: where it is, and engines configured to use it.

use std::path::PathBuf;
use std::time::Duration;

use uccl_tcpx::Config;
use uccl_tcpx::config::TransportChoice;

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

/// Engines on the plugin transport over the fake NIC, with `channels` channels of `chunk`-byte
/// chunks, 16 in flight (TCPX's window).
pub fn config(channels: u16, chunk: u32) -> Config {
    Config {
        transport: TransportChoice::Tcpx,
        plugin_path: Some(fake_plugin()),
        num_channels: channels,
        chunk_size: chunk,
        window: 16,
        connect_timeout: Duration::from_secs(30),
        ..super::loopback()
    }
}

/// The fake NIC's lenient knobs, for what the engine does not yet do as TCPX requires. Each stays
/// until the engine honours the TCPX behaviour named above it; a value already in the environment
/// wins, so `FAKE_TCPX_SAME_HOST=fatal cargo test ...` shows what the engine still breaks.
const LENIENT_FAKE: &[(&str, &str)] = &[
    // Both engines of a test run on one host, and the engine has no same-host path: TCPX exits at
    // the first devmem receive of loopback traffic ("data landed on host memory", sock/tcpx.h), as
    // the fake does for a receive into GPU memory (a CUDA registration).
    ("FAKE_TCPX_SAME_HOST", "allow"),
];

extern "C" fn pin_lenient_fake() {
    for (name, value) in LENIENT_FAKE {
        if std::env::var_os(name).is_none() {
            // SAFETY: runs from .init_array, before main, while the process has one thread.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// Before main: the fake reads its knobs once, in the `init` of the first engine of whichever test
/// runs first, and setting the environment once test threads run would race their reads of it.
/// Child processes the tests start inherit the values, or set them again where they are cleared.
/// Every test binary that includes this harness sets them; only the fake reads them.
#[used]
#[unsafe(link_section = ".init_array")]
static PIN_LENIENT_FAKE: extern "C" fn() = pin_lenient_fake;
