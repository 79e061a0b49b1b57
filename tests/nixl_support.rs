//! The C calls a NIXL backend builds on: an engine from key/value parameters, each engine's own
//! notifications, large regions advertised in windows, forgetting a transfer in flight, and
//! preparing a peer's capability before a first transfer.

mod common;

use std::ffi::{CString, c_char, c_void};
use std::ptr::{null, null_mut};
use std::time::Duration;

use uccl_tcpx::UcclStatus;
use uccl_tcpx::ffi::*;

use common::{PATIENCE, eventually};

fn last_error() -> String {
    let mut buf = vec![0u8; 1024];
    let n = uccl_engine_last_error(buf.as_mut_ptr().cast(), buf.len());
    String::from_utf8_lossy(&buf[..n.min(buf.len() - 1)]).into_owned()
}

fn create(params: &[(&str, &str)]) -> *mut uccl_engine_t {
    let keys: Vec<CString> = params.iter().map(|(k, _)| CString::new(*k).unwrap()).collect();
    let values: Vec<CString> = params.iter().map(|(_, v)| CString::new(*v).unwrap()).collect();
    let kp: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
    let vp: Vec<*const c_char> = values.iter().map(|v| v.as_ptr()).collect();
    uccl_tcpx_engine_create_with(kp.as_ptr(), vp.as_ptr(), params.len())
}

/// An engine on loopback with the same-host path off, so that these tests take the network path.
fn loopback_engine() -> *mut uccl_engine_t {
    let e = create(&[("ip", "127.0.0.1"), ("UCCL_TCPX_DISABLE_IPC", "1")]);
    assert!(!e.is_null(), "{}", last_error());
    e
}

fn port_of(e: *mut uccl_engine_t) -> i32 {
    let mut s: *mut c_char = null_mut();
    assert_eq!(uccl_engine_get_metadata(e, &mut s), 0);
    // SAFETY: the library returned a NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(s) }.to_str().unwrap().to_owned();
    uccl_engine_free_string(s);
    text.split('?').next().unwrap().rsplit(':').next().unwrap().parse().unwrap()
}

/// `from` connected to `to`, and `to`'s accepted end.
fn connect(from: *mut uccl_engine_t, to: *mut uccl_engine_t) -> (*mut uccl_conn_t, *mut uccl_conn_t) {
    let port = port_of(to);
    // Engine handles are plain integers, so they cross to the accepting thread as such.
    let to_addr = to as usize;
    let acceptor = std::thread::spawn(move || {
        let mut ip = [0 as c_char; 64];
        let mut gpu = 0;
        uccl_engine_accept(to_addr as *mut uccl_engine_t, ip.as_mut_ptr(), ip.len(), &mut gpu) as usize
    });
    let ip = CString::new("127.0.0.1").unwrap();
    let gpu = CString::new("0").unwrap();
    let c = uccl_engine_connect(from, ip.as_ptr(), gpu.as_ptr(), port, false);
    assert!(!c.is_null(), "{}", last_error());
    let accepted = acceptor.join().unwrap() as *mut uccl_conn_t;
    assert!(!accepted.is_null(), "{}", last_error());
    (c, accepted)
}

/// Every notification `e` holds now or within `wait`, as (name, message) strings.
fn notifs_of(e: *mut uccl_engine_t, want: usize, wait: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut out: Vec<uccl_notif_v_t> =
            (0..8).map(|_| uccl_notif_v { name: null_mut(), name_len: 0, msg: null_mut(), msg_len: 0 }).collect();
        let n = uccl_tcpx_engine_get_notifs_v(e, out.as_mut_ptr(), out.len());
        for entry in &mut out[..n] {
            // SAFETY: the library filled these entries with name_len and msg_len bytes.
            let (name, msg) = unsafe {
                (
                    std::slice::from_raw_parts(entry.name.cast::<u8>(), entry.name_len).to_vec(),
                    std::slice::from_raw_parts(entry.msg.cast::<u8>(), entry.msg_len).to_vec(),
                )
            };
            got.push((String::from_utf8(name).unwrap(), String::from_utf8(msg).unwrap()));
            uccl_engine_free_notif_v(entry);
        }
        if got.len() >= want || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn parameters_configure_the_engine_and_bad_ones_are_refused() {
    let e = create(&[("num_channels", "3"), ("ip", "127.0.0.1"), ("Port", "")]);
    assert!(!e.is_null(), "{}", last_error());
    assert!(port_of(e) > 0);
    uccl_engine_destroy(e);

    assert!(create(&[("num_chanels", "3")]).is_null());
    assert!(last_error().contains("unknown parameter UCCL_TCPX_NUM_CHANELS"), "{}", last_error());
    assert!(create(&[("num_channels", "many")]).is_null());
    assert!(last_error().contains("parameter UCCL_TCPX_NUM_CHANNELS=\"many\" is invalid"), "{}", last_error());
    assert!(create(&[("bad key", "1")]).is_null());
    assert!(last_error().contains("not a setting name"), "{}", last_error());
    assert!(create(&[("auth_key_file", "/nonexistent/key")]).is_null());
    assert!(last_error().contains("UCCL_TCPX_AUTH_KEY_FILE"), "{}", last_error());
    assert!(uccl_tcpx_engine_create_with(null(), null(), 1).is_null());
    assert!(last_error().contains("`keys` is NULL"), "{}", last_error());
    let k = CString::new("ip").unwrap();
    let keys = [k.as_ptr()];
    let values = [null::<c_char>()];
    assert!(uccl_tcpx_engine_create_with(keys.as_ptr(), values.as_ptr(), 1).is_null());
    assert!(last_error().contains("values[0]"), "{}", last_error());
    let e = uccl_tcpx_engine_create_with(null(), null(), 0);
    assert!(!e.is_null(), "no parameters: the environment's settings: {}", last_error());
    uccl_engine_destroy(e);
}

/// Three engines in one process: what a connection of one engine receives reaches that engine's
/// queue alone, whole, and in order, whoever drains first.
#[test]
fn each_engine_gets_only_its_own_notifications() {
    let (a, b, c) = (loopback_engine(), loopback_engine(), loopback_engine());
    let (ab, _ba) = connect(a, b);
    let (ac, _ca) = connect(a, c);
    let big = "x".repeat(100_000);
    for (conn, msgs) in [(ab, ["to-b 1", "to-b 2"]), (ac, ["to-c 1", "to-c 2"])] {
        for m in msgs {
            assert_eq!(uccl_engine_send_notif_v(conn, c"agent-a".as_ptr(), 7, m.as_ptr().cast(), m.len()), 0);
        }
    }
    assert_eq!(uccl_engine_send_notif_v(ab, c"agent-a".as_ptr(), 7, big.as_ptr().cast(), big.len()), 0);
    let for_c = notifs_of(c, 2, PATIENCE);
    let for_b = notifs_of(b, 3, PATIENCE);
    let named = |msgs: &[&str]| msgs.iter().map(|m| ("agent-a".to_owned(), m.to_string())).collect::<Vec<_>>();
    assert_eq!(for_c, named(&["to-c 1", "to-c 2"]));
    assert_eq!(for_b, named(&["to-b 1", "to-b 2", &big]));
    assert!(notifs_of(a, 1, Duration::from_millis(100)).is_empty(), "a received nothing");

    assert_eq!(uccl_tcpx_engine_get_notifs_v(null_mut(), null_mut(), 0), 0);
    assert!(last_error().contains("engine handle is NULL"), "{}", last_error());
    assert_eq!(uccl_tcpx_engine_get_notifs_v(b, null_mut(), 4), 0);
    assert!(last_error().contains("`out` is NULL"), "{}", last_error());
    for e in [a, b, c] {
        uccl_engine_destroy(e);
    }
}

/// A host mapping larger than 4 GiB, reserved but never touched but where the test writes.
struct Sparse {
    addr: usize,
    len: usize,
}

impl Sparse {
    fn new(len: usize) -> Sparse {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes");
        Sparse { addr: p as usize, len }
    }

    fn slice(&self, at: usize, len: usize) -> &[u8] {
        assert!(at + len <= self.len);
        // SAFETY: inside the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts((self.addr + at) as *const u8, len) }
    }

    fn slice_mut(&mut self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= self.len);
        // SAFETY: inside the mapping, which lives as long as `self`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut((self.addr + at) as *mut u8, len) }
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.addr as *mut c_void, self.len) };
    }
}

fn wait_transfer(conn: *mut uccl_conn_t, id: u64) -> i32 {
    eventually("the transfer ends", PATIENCE, || {
        let rc = uccl_engine_poll(conn, id, null_mut());
        (rc != 1).then_some(rc)
    })
}

/// A 6 GiB region advertised in 2 GiB windows: writes and reads inside any window reach the right
/// bytes (the last one, past 4 GiB, included); an item across a window boundary is refused by the
/// owner.
#[test]
fn a_region_over_4_gib_is_reached_through_its_windows() {
    const GIB: usize = 1 << 30;
    let (a, b) = (loopback_engine(), loopback_engine());
    let (ab, _ba) = connect(a, b);
    let (mut src, mut dst) = (Sparse::new(1 << 20), Sparse::new(6 * GIB));
    let (mut smr, mut dmr) = (0, 0);
    assert_eq!(uccl_engine_reg(a, src.addr, src.len, &mut smr), 0, "{}", last_error());
    assert_eq!(uccl_engine_reg(b, dst.addr, dst.len, &mut dmr), 0, "{}", last_error());
    let mut item = FifoItem::default();
    let mut window = 0;
    assert_eq!(uccl_tcpx_advertise_region(b, dmr, dst.addr, dst.len, &mut item, &mut window), 0, "{}", last_error());
    assert_eq!(window, UCCL_TCPX_ADVERTISE_WINDOW);
    assert_eq!((item.addr as usize, item.size as u64), (dst.addr, UCCL_TCPX_ADVERTISE_WINDOW));

    for (k, at) in [(0u8, 4096), (1, 2 * GIB + 12345), (2, 6 * GIB - 65536)] {
        src.slice_mut(0, 65536).iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8) ^ k.wrapping_mul(31));
        let mut it = item;
        assert_eq!(uccl_engine_update_fifo(&mut it, (dst.addr + at) as u64, 65536), 0);
        let mut id = 0;
        assert_eq!(uccl_engine_write(ab, smr, src.addr as *const c_void, 65536, it, &mut id), 0, "{}", last_error());
        assert_eq!(wait_transfer(ab, id), 0, "write at {at}: {}", last_error());
        assert_eq!(dst.slice(at, 65536), src.slice(0, 65536), "write at {at}");
        dst.slice_mut(at, 65536).fill(k + 1);
        assert_eq!(uccl_engine_read(ab, smr, src.addr as *const c_void, 65536, it, &mut id), 0, "{}", last_error());
        assert_eq!(wait_transfer(ab, id), 0, "read at {at}: {}", last_error());
        assert!(src.slice(0, 65536).iter().all(|&b| b == k + 1), "read at {at}");
    }

    let mut across = item;
    assert_eq!(uccl_engine_update_fifo(&mut across, (dst.addr + 2 * GIB - 4096) as u64, 8192), 0);
    let mut id = 0;
    assert_eq!(uccl_engine_write(ab, smr, src.addr as *const c_void, 8192, across, &mut id), 0);
    assert_eq!(wait_transfer(ab, id), UcclStatus::ErrNotAllowed as i32, "across a window: {}", last_error());

    assert_eq!(
        uccl_tcpx_advertise_region(b, dmr, dst.addr, 0, &mut item, null_mut()),
        UcclStatus::ErrInvalidParam as i32
    );
    assert_eq!(
        uccl_tcpx_advertise_region(b, dmr, dst.addr, dst.len + 1, &mut item, null_mut()),
        UcclStatus::ErrInvalidParam as i32,
        "past the region"
    );
    assert_eq!(
        uccl_tcpx_advertise_region(b, dmr + 99, dst.addr, 4096, &mut item, null_mut()),
        UcclStatus::ErrNotFound as i32
    );
    assert_eq!(
        uccl_tcpx_advertise_region(b, dmr, dst.addr, 4096, null_mut(), null_mut()),
        UcclStatus::ErrInvalidParam as i32
    );
    assert_eq!(
        uccl_tcpx_advertise_region(b, dmr, dst.addr, usize::MAX, &mut item, null_mut()),
        UcclStatus::ErrInvalidParam as i32
    );
    assert!(last_error().contains("at most 4096"), "{}", last_error());
    uccl_engine_mr_destroy(a, smr);
    uccl_engine_mr_destroy(b, dmr);
    uccl_engine_destroy(a);
    uccl_engine_destroy(b);
}

/// `uccl_tcpx_prepare` maps nothing where no transfer would (a peer over the network; a peer engine
/// of this process, whose memory needs no mapping) and says so without failing; the transfers after it still
/// move their bytes; bad arguments are refused with a status.
#[test]
fn preparing_a_capability_that_no_mapping_serves_succeeds_and_says_so() {
    let same_process = || {
        let e = create(&[("ip", "127.0.0.1")]);
        assert!(!e.is_null(), "{}", last_error());
        e
    };
    for (a, b) in [(loopback_engine(), loopback_engine()), (same_process(), same_process())] {
        let (ab, _ba) = connect(a, b);
        let len = 1 << 20;
        let (src, dst) = (vec![0x33u8; len], vec![0u8; len]);
        let (mut smr, mut dmr) = (0, 0);
        assert_eq!(uccl_engine_reg(a, src.as_ptr() as usize, len, &mut smr), 0);
        assert_eq!(uccl_engine_reg(b, dst.as_ptr() as usize, len, &mut dmr), 0);
        let mut item = FifoItem::default();
        assert_eq!(uccl_tcpx_advertise_region(b, dmr, dst.as_ptr() as usize, len, &mut item, null_mut()), 0);
        let mut mapped = true;
        assert_eq!(uccl_tcpx_prepare(ab, &item, &mut mapped), 0, "{}", last_error());
        assert!(!mapped, "nothing to map over the network or within one process");
        assert_eq!(uccl_tcpx_prepare(ab, &item, null_mut()), 0, "{}", last_error());
        let mut id = 0;
        assert_eq!(uccl_engine_write(ab, smr, src.as_ptr().cast(), len, item, &mut id), 0, "{}", last_error());
        assert_eq!(wait_transfer(ab, id), 0, "{}", last_error());
        assert!(dst.iter().all(|&b| b == 0x33), "the write after preparing");

        assert_eq!(uccl_tcpx_prepare(ab, null(), &mut mapped), UcclStatus::ErrInvalidParam as i32);
        assert_eq!(uccl_tcpx_prepare(null_mut(), &item, &mut mapped), UcclStatus::ErrInvalidParam as i32);
        let not_ours = FifoItem { addr: item.addr, size: 64, ..FifoItem::default() };
        assert_eq!(uccl_tcpx_prepare(ab, &not_ours, &mut mapped), UcclStatus::ErrInvalidParam as i32);
        assert!(last_error().contains("capability"), "{}", last_error());
        uccl_engine_mr_destroy(a, smr);
        uccl_engine_mr_destroy(b, dmr);
        uccl_engine_destroy(a);
        uccl_engine_destroy(b);
    }
}

/// A forgotten transfer is unknown afterwards, its data still arrives, and the region's
/// deregistration still returns.
#[test]
fn a_forgotten_transfer_is_unknown_and_still_completes() {
    let (a, b) = (loopback_engine(), loopback_engine());
    let (ab, _ba) = connect(a, b);
    let len = 8 << 20;
    let (src, dst) = (vec![0x5au8; len], vec![0u8; len]);
    let (mut smr, mut dmr) = (0, 0);
    assert_eq!(uccl_engine_reg(a, src.as_ptr() as usize, len, &mut smr), 0);
    assert_eq!(uccl_engine_reg(b, dst.as_ptr() as usize, len, &mut dmr), 0);
    let mut item = FifoItem::default();
    assert_eq!(uccl_tcpx_advertise_region(b, dmr, dst.as_ptr() as usize, len, &mut item, null_mut()), 0);
    let mut id = 0;
    assert_eq!(uccl_engine_write(ab, smr, src.as_ptr().cast(), len, item, &mut id), 0);
    assert_eq!(uccl_tcpx_forget(ab, id), 0);
    assert_eq!(uccl_engine_poll(ab, id, null_mut()), UcclStatus::ErrNotFound as i32);
    assert_eq!(uccl_tcpx_forget(ab, id), UcclStatus::ErrNotFound as i32);
    assert_eq!(uccl_tcpx_forget(ab, id + 1000), UcclStatus::ErrNotFound as i32);
    assert_eq!(uccl_tcpx_forget(null_mut(), id), UcclStatus::ErrInvalidParam as i32);
    // SAFETY: reading bytes the peer writes concurrently, as plain u8s, only to watch them arrive.
    let last = || unsafe { std::ptr::read_volatile(dst.as_ptr().add(len - 1)) };
    eventually("the forgotten write lands", PATIENCE, || (last() == 0x5a).then_some(()));
    uccl_engine_mr_destroy(a, smr);
    uccl_engine_mr_destroy(b, dmr);
    uccl_engine_destroy(a);
    uccl_engine_destroy(b);
}
