//! Two engines over loopback and the connection between them, set up with bounded waits.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{Config, Connection, Engine, FifoItem};

use testkit::PATIENCE;

/// The defaults on loopback, with the same-host path off: two engines of one test process would
/// otherwise copy one-sided host transfers directly, and these tests are about the network path.
pub fn loopback() -> Config {
    // Inline up to 64 KiB whatever the host's CPUs, so a test's mid-size transfers take the
    // channels everywhere; `inline_bound_decides_what_rides_the_channels` covers more.
    Config { ip: Some("127.0.0.1".parse().unwrap()), disable_ipc: true, inline_max: 64 << 10, ..Config::default() }
}

/// Loopback with the same-host path on.
pub fn same_host() -> Config {
    // The direct copy for every size, whatever the host's CPUs: the tests count what it took.
    Config { disable_ipc: false, host_copy_network_band: None, ..loopback() }
}

/// Engine `a` connected to engine `b`: `ab` is a's end, `ba` the connection b accepted.
pub struct Pair {
    pub a: Arc<Engine>,
    pub b: Arc<Engine>,
    pub ab: Arc<Connection>,
    pub ba: Arc<Connection>,
}

/// Two engines with `config`, a connected to b.
pub fn pair(config: Config) -> Pair {
    let a = Arc::new(Engine::new(config.clone()).unwrap());
    let b = Arc::new(Engine::new(config).unwrap());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = accept(&b).unwrap();
    Pair { a, b, ab, ba }
}

/// `Engine::accept`, bounded: if nothing is accepted within [`PATIENCE`], accepting is stopped
/// (which releases the blocked call) and the test fails.
pub fn accept(engine: &Arc<Engine>) -> uccl_tcpx::Result<Arc<Connection>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || {
        let _ = tx.send(e.accept());
    });
    rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
        engine.stop_accept();
        panic!("Engine::accept returned nothing within {PATIENCE:?}");
    })
}

/// The outcome of transfer `id`; fails the test if it is still in progress after `limit`.
pub fn wait_done(conn: &Connection, id: u64, limit: Duration) -> uccl_tcpx::Result<u64> {
    testkit::eventually(&format!("transfer {id} finishes"), limit, || conn.poll(id).transpose())
}

/// How long a transfer may take in the tests: ample for hundreds of MiB on a loaded machine.
pub const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// The outcome of transfer `id`, bounded by [`TRANSFER_LIMIT`].
pub fn wait(conn: &Connection, id: u64) -> uccl_tcpx::Result<u64> {
    wait_done(conn, id, TRANSFER_LIMIT)
}

/// `item` as hex, for a peer process to print.
pub fn fifo_to_hex(item: &FifoItem) -> String {
    item.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The item a peer printed with [`fifo_to_hex`].
pub fn fifo_from_hex(hex: &str) -> FifoItem {
    let mut bytes = [0u8; 64];
    assert_eq!(hex.len(), 2 * bytes.len(), "a FifoItem is 64 bytes: {hex}");
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits");
    }
    FifoItem::from_bytes(&bytes)
}

/// A host buffer registered with `engine`, advertised whole: the FifoItem a peer targets it with.
pub struct Region {
    pub bytes: Vec<u8>,
    pub mr: u64,
    pub fifo: FifoItem,
}

impl Region {
    pub fn new(engine: &Engine, mut bytes: Vec<u8>) -> Region {
        let (addr, len) = (bytes.as_mut_ptr() as usize, bytes.len());
        let mr = engine.register(addr, len).unwrap();
        let fifo = engine.prepare_fifo(mr, addr, len).unwrap();
        Region { bytes, mr, fifo }
    }

    pub fn addr(&self) -> usize {
        self.bytes.as_ptr() as usize
    }
}
