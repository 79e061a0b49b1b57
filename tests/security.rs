//! One-sided access control: a peer may touch only memory the target registered and advertised with
//! `prepare_fifo`, named by the region id and the region's token from the FifoItem. Every refusal
//! must fail the initiator's transfer with `ErrNotAllowed` (or `ErrInvalidParam` at post time for an
//! item that is garbled locally), leave the target's bytes and the initiator's read buffer
//! untouched, reveal no token, and leave the connection usable.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::{Config, Connection, Engine, FifoItem, OneSided, UcclStatus};

mod common;
use common::wait;

fn config() -> Config {
    Config {
        num_channels: Some(2),
        chunk_size: 64 << 10,
        connect_timeout: Duration::from_secs(5),
        ..common::loopback()
    }
}

const REGION: usize = 1 << 20;
const WIN_OFF: usize = 64 << 10;
const WIN_LEN: usize = 256 << 10;
const SENTINEL: u8 = 0x5a;

/// Two engines; B's 1 MiB region advertises only `[WIN_OFF, WIN_OFF + WIN_LEN)`.
struct Setup {
    _a: Arc<Engine>,
    b: Arc<Engine>,
    ab: Arc<Connection>,
    target: Vec<u8>,
    tmr: u64,
    window: FifoItem,
    src: Vec<u8>,
    smr: u64,
    back: Vec<u8>,
    bmr: u64,
}

impl Setup {
    fn new() -> Setup {
        let common::Pair { a, b, ab, ba } = common::pair(config());
        // B keeps its end open through its engine's connection list.
        drop(ba);
        let mut target = vec![SENTINEL; REGION];
        let tmr = b.register(target.as_mut_ptr() as usize, REGION).unwrap();
        let window = b.prepare_fifo(tmr, target.as_mut_ptr() as usize + WIN_OFF, WIN_LEN).unwrap();
        let src: Vec<u8> = (0..REGION).map(|i| (i * 7 + 3) as u8).collect();
        let smr = a.register(src.as_ptr() as usize, REGION).unwrap();
        let mut back = vec![0xc3u8; REGION];
        let bmr = a.register(back.as_mut_ptr() as usize, REGION).unwrap();
        Setup { _a: a, b, ab, target, tmr, window, src, smr, back, bmr }
    }

    fn base(&self) -> u64 {
        self.target.as_ptr() as u64
    }

    fn write_op(&self, remote: FifoItem, len: usize) -> OneSided {
        OneSided { mr: self.smr, addr: self.src.as_ptr() as usize, len, remote }
    }

    fn read_op(&mut self, remote: FifoItem, len: usize) -> OneSided {
        OneSided { mr: self.bmr, addr: self.back.as_mut_ptr() as usize, len, remote }
    }

    /// Writes and reads `len` bytes against `item`; both must be refused remotely with NOT_ALLOWED and
    /// neither buffer may change. Returns the refusal messages.
    fn expect_refused(&mut self, what: &str, item: FifoItem, len: usize) -> Vec<String> {
        let target_before = self.target.clone();
        let back_before = self.back.clone();
        let mut messages = Vec::new();
        let w = self.ab.write(&[self.write_op(item, len)]).unwrap_or_else(|e| panic!("{what}: write post: {e}"));
        let err = wait(&self.ab, w).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what}: write: {err}");
        messages.push(err.message().to_owned());
        let op = self.read_op(item, len);
        let r = self.ab.read(&[op]).unwrap_or_else(|e| panic!("{what}: read post: {e}"));
        let err = wait(&self.ab, r).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "{what}: read: {err}");
        messages.push(err.message().to_owned());
        assert!(self.target == target_before, "{what}: a refused write changed the target");
        assert!(self.back == back_before, "{what}: a refused read changed the local buffer");
        messages
    }

    /// A valid write and read through the advertised window, checked by content.
    fn assert_usable(&mut self, what: &str) {
        let len = 100_000;
        let off = 4096;
        let mut item = self.window;
        item.addr += off as u64;
        let w = self.ab.write(&[self.write_op(item, len)]).unwrap();
        assert_eq!(wait(&self.ab, w).unwrap_or_else(|e| panic!("{what}: {e}")), len as u64);
        let at = WIN_OFF + off;
        assert_eq!(&self.target[at..at + len], &self.src[..len], "{what}: write after refusals");
        let op = self.read_op(item, len);
        let r = self.ab.read(&[op]).unwrap();
        assert_eq!(wait(&self.ab, r).unwrap(), len as u64);
        assert_eq!(&self.back[..len], &self.src[..len], "{what}: read after refusals");
        // Restore the sentinels so later refusals are checked against known bytes.
        self.target[at..at + len].fill(SENTINEL);
        self.back[..len].fill(0xc3);
    }
}

fn with_addr(item: FifoItem, addr: u64, size: u32) -> FifoItem {
    FifoItem { addr, size, ..item }
}

/// Byte offsets of the capability inside the FifoItem padding (see src/proto/fifo.rs).
const REGION_BYTES: std::ops::Range<usize> = 0..8;
const TOKEN_BYTES: std::ops::Range<usize> = 8..16;

fn set_padding_u64(item: &mut FifoItem, at: std::ops::Range<usize>, v: u64) {
    for (p, b) in item.padding[at].iter_mut().zip(v.to_le_bytes()) {
        *p = b as core::ffi::c_char;
    }
}

#[test]
fn ranges_outside_the_advertised_window_are_refused() {
    let mut s = Setup::new();
    let (base, win) = (s.base(), s.base() + WIN_OFF as u64);
    let win_end = win + WIN_LEN as u64;
    let region_end = base + REGION as u64;
    let cases: Vec<(&str, u64, usize)> = vec![
        ("region start, not advertised", base, 64),
        ("ends one byte into the window", win - 63, 64),
        ("starts one byte before the window", win - 1, 64),
        ("starts at the window end", win_end, 64),
        ("straddles the window end", win_end - 32, 64),
        ("last window byte plus one", win_end - 1, 2),
        ("whole window plus one byte", win, WIN_LEN + 1),
        ("registered but never advertised", base + (768 << 10), 4096),
        ("last byte of the region", region_end - 1, 1),
        ("starts at the region end", region_end, 16),
        ("straddles the region end", region_end - 8, 16),
        ("far past the region", region_end + (1 << 30), 16),
        ("below the region", base - 4096, 16),
        ("address zero", 0, 16),
        ("top of the address space", u64::MAX - 64, 64),
    ];
    let total = cases.len();
    for (what, addr, len) in cases {
        // The item's size is patched to cover `len`, as a caller may (NIXL does); only the target's
        // record of what it advertised counts.
        let item = with_addr(s.window, addr, len as u32);
        s.expect_refused(what, item, len);
    }
    // A request ending exactly at the window end is fine: the boundary is not off by one.
    let item = with_addr(s.window, win_end - 64, 64);
    let w = s.ab.write(&[s.write_op(item, 64)]).unwrap();
    assert_eq!(wait(&s.ab, w).unwrap(), 64);
    assert_eq!(&s.target[WIN_OFF + WIN_LEN - 64..WIN_OFF + WIN_LEN], &s.src[..64]);
    assert!(s.target[WIN_OFF + WIN_LEN..].iter().all(|&b| b == SENTINEL));
    s.target[WIN_OFF + WIN_LEN - 64..WIN_OFF + WIN_LEN].fill(SENTINEL);
    eprintln!("{total} out-of-window ranges refused (write and read each)");
    s.assert_usable("after out-of-window requests");
}

#[test]
fn wrong_tokens_and_region_ids_are_refused_without_revealing_the_token() {
    let mut s = Setup::new();
    let cap = s.window.capability().unwrap();
    let mut messages = Vec::new();
    for byte in TOKEN_BYTES {
        for bit in [0, 7] {
            let mut item = s.window;
            item.padding[byte] ^= 1 << bit;
            messages.extend(s.expect_refused(&format!("token byte {byte} bit {bit} flipped"), item, 128));
        }
    }
    for token in [0, u64::MAX, cap.token.rotate_left(1)] {
        let mut item = s.window;
        set_padding_u64(&mut item, TOKEN_BYTES, token);
        messages.extend(s.expect_refused(&format!("token {token:#x}"), item, 128));
    }
    // Another registered region of the same engine, with this region's token and window address.
    let mut other = vec![0u8; 4096];
    let omr = s.b.register(other.as_mut_ptr() as usize, other.len()).unwrap();
    let other_item = s.b.prepare_fifo(omr, other.as_mut_ptr() as usize, other.len()).unwrap();
    for region in [0, cap.region + 1000, u64::MAX, omr] {
        let mut item = s.window;
        set_padding_u64(&mut item, REGION_BYTES, region);
        messages.extend(s.expect_refused(&format!("region {region}"), item, 128));
    }
    // The other region's own capability with an address inside this region's window.
    let mut item = other_item;
    item.addr = s.window.addr;
    item.size = 128;
    messages.extend(s.expect_refused("other region's capability, this region's window", item, 128));
    assert!(other.iter().all(|&b| b == 0));
    for m in &messages {
        assert!(
            !m.contains(&format!("{:x}", cap.token)) && !m.contains(&cap.token.to_string()),
            "a refusal revealed the region token: {m}"
        );
    }
    eprintln!("{} refusals for wrong tokens and region ids", messages.len());
    s.assert_usable("after wrong tokens");
}

#[test]
fn stale_capabilities_after_deregistration_are_refused() {
    let mut s = Setup::new();
    let mut mem = vec![SENTINEL; 64 << 10];
    let addr = mem.as_mut_ptr() as usize;
    let mr = s.b.register(addr, mem.len()).unwrap();
    let item = s.b.prepare_fifo(mr, addr, mem.len()).unwrap();
    let w = s.ab.write(&[s.write_op(item, 1000)]).unwrap();
    assert_eq!(wait(&s.ab, w).unwrap(), 1000);
    assert_eq!(&mem[..1000], &s.src[..1000]);
    mem[..1000].fill(SENTINEL);
    s.b.deregister(mr).unwrap();
    assert_eq!(s.b.deregister(mr).unwrap_err().status(), UcclStatus::ErrNotFound);
    assert_eq!(s.b.prepare_fifo(mr, addr, 16).unwrap_err().status(), UcclStatus::ErrNotFound);
    let check_untouched = |mem: &[u8], what: &str| assert!(mem.iter().all(|&b| b == SENTINEL), "{what}");
    // The stale item, as is and with every patch a caller might make.
    for (what, it) in [
        ("stale item", item),
        ("stale item, later address", with_addr(item, addr as u64 + 4096, 64)),
        ("stale item, small size", with_addr(item, addr as u64, 8)),
    ] {
        let len = it.size.min(1000) as usize;
        let w = s.ab.write(&[s.write_op(it, len)]).unwrap();
        assert_eq!(wait(&s.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed, "{what}");
        let op = s.read_op(it, len);
        let r = s.ab.read(&[op]).unwrap();
        assert_eq!(wait(&s.ab, r).unwrap_err().status(), UcclStatus::ErrNotAllowed, "{what}");
        check_untouched(&mem, what);
    }
    // Registering the same memory again mints a new id and token: the old item stays dead.
    let mr2 = s.b.register(addr, mem.len()).unwrap();
    assert_ne!(mr2, mr);
    let w = s.ab.write(&[s.write_op(item, 64)]).unwrap();
    assert_eq!(wait(&s.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed, "old item on re-registered memory");
    check_untouched(&mem, "old item on re-registered memory");
    // The old token grafted onto the new region id does not work either.
    let mut grafted = item;
    set_padding_u64(&mut grafted, REGION_BYTES, mr2);
    let fresh = s.b.prepare_fifo(mr2, addr, mem.len()).unwrap();
    let w = s.ab.write(&[s.write_op(grafted, 64)]).unwrap();
    assert_eq!(wait(&s.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed, "old token, new region id");
    check_untouched(&mem, "old token, new region id");
    assert_ne!(fresh.capability().unwrap().token, item.capability().unwrap().token);
    let w = s.ab.write(&[s.write_op(fresh, 64)]).unwrap();
    assert_eq!(wait(&s.ab, w).unwrap(), 64);
    assert_eq!(&mem[..64], &s.src[..64]);
    s.b.deregister(mr2).unwrap();
    s.assert_usable("after stale capabilities");
}

#[test]
fn a_window_at_the_region_end_stops_at_the_region_end() {
    let mut s = Setup::new();
    let end = s.base() + REGION as u64;
    let tail = s.b.prepare_fifo(s.tmr, s.target.as_mut_ptr() as usize + REGION - 4096, 4096).unwrap();
    // Advertising past the end is refused locally.
    let past = s.b.prepare_fifo(s.tmr, s.target.as_mut_ptr() as usize + REGION - 4096, 4097);
    assert_eq!(past.unwrap_err().status(), UcclStatus::ErrInvalidParam);
    for (what, addr, len) in [("overlaps the region end", end - 8, 16usize), ("right after the end", end, 1)] {
        s.expect_refused(what, with_addr(tail, addr, len as u32), len);
    }
    let w = s.ab.write(&[s.write_op(with_addr(tail, end - 16, 16), 16)]).unwrap();
    assert_eq!(wait(&s.ab, w).unwrap(), 16);
    assert_eq!(&s.target[REGION - 16..], &s.src[..16]);
    s.target[REGION - 16..].fill(SENTINEL);
    s.assert_usable("after region-end requests");
}

#[test]
fn locally_garbled_items_fail_at_post_with_invalid_param() {
    let mut s = Setup::new();
    let mut foreign_magic = s.window;
    foreign_magic.padding[16] ^= 1;
    let mut bad_version = s.window;
    bad_version.padding[20] ^= 1;
    let mut dirty_tail = s.window;
    dirty_tail.padding[27] = 1;
    let mut too_small = s.window;
    too_small.size = 10;
    let cases = [
        ("all-zero item", FifoItem::default(), 16usize),
        ("capability magic broken", foreign_magic, 16),
        ("capability version changed", bad_version, 16),
        ("reserved padding written", dirty_tail, 16),
        ("length over the item's size", too_small, 11),
    ];
    for (what, item, len) in cases {
        let err = s.ab.write(&[s.write_op(item, len)]).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}: {err}");
        let op = s.read_op(item, len);
        let err = s.ab.read(&[op]).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}: {err}");
    }
    // A local buffer outside the local region is refused before anything is sent.
    let op = OneSided { mr: s.smr, addr: s.src.as_ptr() as usize + REGION - 8, len: 16, remote: s.window };
    assert_eq!(s.ab.write(&[op]).unwrap_err().status(), UcclStatus::ErrInvalidParam);
    let op = OneSided { mr: s.smr + 100, addr: s.src.as_ptr() as usize, len: 16, remote: s.window };
    assert_eq!(s.ab.write(&[op]).unwrap_err().status(), UcclStatus::ErrNotFound);
    assert!(s.target.iter().all(|&b| b == SENTINEL));
    s.assert_usable("after garbled items");
}

/// Items whose address plus length overflows 64 bits: refused at post, before the target sees them.
fn overflowing_items(s: &Setup) -> Vec<(&'static str, FifoItem, usize)> {
    vec![
        ("addr u64::MAX, 16 bytes", with_addr(s.window, u64::MAX, 16), 16),
        ("addr u64::MAX - 4, 16 bytes", with_addr(s.window, u64::MAX - 4, 16), 16),
        ("addr 2^64 - 512 KiB, 1 MiB", with_addr(s.window, u64::MAX - (512 << 10) + 1, 1 << 20), 1 << 20),
    ]
}

/// Regression (found here, fixed in 8b66d84): `one_sided` did not check that `item.addr + len`
/// fits in 64 bits, so the WriteRequest went out and the target's decoder (`Control::validate`)
/// failed the whole connection: ErrRemoteDisconnect for this and every other transfer on it.
#[test]
fn overflowing_ranges_are_refused_and_the_connection_survives() {
    let mut s = Setup::new();
    for (what, item, len) in overflowing_items(&s) {
        let back_before = s.back.clone();
        let err = s.ab.write(&[s.write_op(item, len)]).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}: {err}");
        let op = s.read_op(item, len);
        let err = s.ab.read(&[op]).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}: {err}");
        assert!(s.target.iter().all(|&b| b == SENTINEL), "{what}: target changed");
        assert!(s.back == back_before, "{what}: local buffer changed");
        s.assert_usable(what);
    }
}

#[test]
fn items_minted_by_another_engine_are_refused() {
    let mut s = Setup::new();
    let c = Engine::new(config()).unwrap();
    // C's region ids start where B's do, so C's item names a region id B also has (B's first region
    // is `tmr`): only the token tells them apart.
    let mut theirs = vec![0x11u8; REGION];
    let cmr = c.register(theirs.as_mut_ptr() as usize, REGION).unwrap();
    assert_eq!(cmr, s.tmr, "region ids are per engine and start at the same value");
    let foreign = c.prepare_fifo(cmr, theirs.as_mut_ptr() as usize, REGION).unwrap();
    s.expect_refused("C's item as minted", foreign, 4096);
    // Even pointed at B's advertised window.
    s.expect_refused("C's item aimed at B's window", with_addr(foreign, s.window.addr, 4096), 4096);
    // A C region whose id B does not have.
    let mut extra = vec![0u8; 4096];
    let _ = c.register(extra.as_mut_ptr() as usize, extra.len()).unwrap();
    let cmr3 = c.register(extra.as_mut_ptr() as usize, extra.len()).unwrap();
    let foreign3 = c.prepare_fifo(cmr3, extra.as_mut_ptr() as usize, extra.len()).unwrap();
    s.expect_refused("C's item for a region id B lacks", foreign3, 4096);
    assert!(theirs.iter().all(|&b| b == 0x11) && extra.iter().all(|&b| b == 0));
    s.assert_usable("after foreign items");
}

/// A vector call with one refused item fails as a whole with NOT_ALLOWED; the refused item's range
/// stays untouched while the valid item lands.
#[test]
fn one_refused_item_fails_the_vector_call() {
    let mut s = Setup::new();
    let good = s.window;
    let bad = with_addr(s.window, s.base(), 64);
    let ops = [s.write_op(good, 64), s.write_op(bad, 64)];
    let id = s.ab.write(&ops).unwrap();
    assert_eq!(wait(&s.ab, id).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert!(s.target[..64].iter().all(|&b| b == SENTINEL), "the refused item's range was written");
    // The valid part may have completed; every byte outside it is untouched.
    assert!(s.target[64..WIN_OFF].iter().all(|&b| b == SENTINEL));
    assert!(s.target[WIN_OFF + 64..].iter().all(|&b| b == SENTINEL));
    s.target[WIN_OFF..WIN_OFF + 64].fill(SENTINEL);
    let back_ptr = s.back.as_mut_ptr() as usize;
    let ops = [
        OneSided { mr: s.bmr, addr: back_ptr, len: 64, remote: bad },
        OneSided { mr: s.bmr, addr: back_ptr + 64, len: 64, remote: good },
    ];
    let id = s.ab.read(&ops).unwrap();
    assert_eq!(wait(&s.ab, id).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert!(s.back[..64].iter().all(|&b| b == 0xc3), "the refused read item wrote the local buffer");
    s.back[64..128].fill(0xc3);
    s.assert_usable("after a partly refused vector");
}

/// Refusals in bulk, interleaved with valid transfers, pipelined: none leaks through, none wedges
/// the connection.
#[test]
fn many_pipelined_refusals_interleaved_with_valid_writes() {
    let mut s = Setup::new();
    let mut ids = Vec::new();
    for i in 0..300u64 {
        let valid = i % 3 == 0;
        let item = if valid {
            with_addr(s.window, s.window.addr + i * 256, 256)
        } else {
            with_addr(s.window, s.base() + (i % 50) * 256, 256)
        };
        ids.push((valid, s.ab.write(&[s.write_op(item, 256)]).unwrap()));
    }
    let mut refused = 0;
    for (valid, id) in ids {
        match wait(&s.ab, id) {
            Ok(n) => {
                assert!(valid);
                assert_eq!(n, 256);
            }
            Err(e) => {
                assert!(!valid, "a valid write failed: {e}");
                assert_eq!(e.status(), UcclStatus::ErrNotAllowed);
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 200);
    assert!(s.target[..WIN_OFF].iter().all(|&b| b == SENTINEL));
    for i in (0..300usize).step_by(3) {
        assert_eq!(&s.target[WIN_OFF + i * 256..WIN_OFF + i * 256 + 256], &s.src[..256]);
    }
    s.target[WIN_OFF..WIN_OFF + WIN_LEN].fill(SENTINEL);
    s.assert_usable("after 200 pipelined refusals");
}
