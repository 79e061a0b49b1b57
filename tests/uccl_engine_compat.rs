//! What UCCL's p2p engine relies on from its RDMA transport, through the Rust API: receives posted
//! larger than their registration (only the bytes that arrive must fit), the connector's own GPU
//! index reported by accept, and FifoItem's `engine_offset`, which the engine writes per chunk.

use uccl_tcpx::{FifoItem, OneSided, UcclStatus};

mod common;
use common::{Pair, accept, pair, pattern, wait};

const SENTINEL: u8 = 0xa5;

fn pair_of_loopback() -> Pair {
    pair(uccl_tcpx::Config { num_channels: Some(2), chunk_size: 64 << 10, ..common::loopback() })
}

/// Receives of `post` bytes at the start of `reg` registered bytes of a `buf`-byte buffer, taking
/// a message of `msg` bytes; returns the buffer.
fn receive_past_registration(p: &Pair, buf: usize, reg: usize, post: usize, msg: usize) -> Vec<u8> {
    let src = pattern(msg, 7);
    let mut dst = vec![SENTINEL; buf];
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, reg).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, post).expect("a receive larger than its registration posts");
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, msg)]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), msg as u64);
    assert_eq!(wait(&p.ba, r).unwrap(), msg as u64);
    assert_eq!(&dst[..msg], &src[..], "the message landed wrong");
    dst
}

/// UCCL's test_engine_send.py: an 8 KiB receive into a 4 KiB registration takes a 4 KiB message
/// (carried inline on the control stream), and a 2 MiB receive into 1 MiB takes 1 MiB (carried by
/// the data channels).
#[test]
fn a_receive_posted_past_its_registration_takes_a_message_that_fits() {
    let p = pair_of_loopback();
    let dst = receive_past_registration(&p, 8192, 4096, 8192, 4096);
    assert!(dst[4096..].iter().all(|&b| b == SENTINEL), "bytes past the registration were written");
    let dst = receive_past_registration(&p, 2 << 20, 1 << 20, 2 << 20, 1 << 20);
    assert!(dst[1 << 20..].iter().all(|&b| b == SENTINEL), "bytes past the registration were written");
    // Shorter messages into such receives.
    let dst = receive_past_registration(&p, 8192, 4096, 8192, 100);
    assert!(dst[100..].iter().all(|&b| b == SENTINEL));
}

/// A message longer than the registered room from the receive's start fails that receive
/// (NOT_ALLOWED, naming the region) and the send (NOT_ALLOWED), writes nothing, and leaves the
/// connection working; inline and channel-carried messages alike.
#[test]
fn a_message_that_would_land_outside_the_registration_fails_its_receive() {
    let p = pair_of_loopback();
    for (reg, post, msg) in [(4096usize, 8192usize, 4097usize), (100 << 10, 200 << 10, 150 << 10)] {
        let src = pattern(msg, 3);
        let mut dst = vec![SENTINEL; post];
        let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
        let dmr = p.b.register(dst.as_mut_ptr() as usize, reg).unwrap();
        let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, post).unwrap();
        let s = p.ab.send(&[(smr, src.as_ptr() as usize, msg)]).unwrap();
        let rerr = wait(&p.ba, r).unwrap_err();
        assert_eq!(rerr.status(), UcclStatus::ErrNotAllowed, "{rerr}");
        let text = rerr.to_string();
        assert!(text.contains(&format!("a {msg}-byte message would land outside memory region {dmr}")), "{text}");
        assert!(text.contains(&format!("posted for {post} bytes, {reg} of them registered")), "{text}");
        let serr = wait(&p.ab, s).unwrap_err();
        assert_eq!(serr.status(), UcclStatus::ErrNotAllowed, "{serr}");
        assert!(serr.to_string().contains("does not fit the receiver's registered memory"), "{serr}");
        assert!(dst.iter().all(|&b| b == SENTINEL), "a refused message wrote {reg}/{post}/{msg}");

        // The connection goes on: the same receive shape takes a message that fits.
        let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, post).unwrap();
        let s = p.ab.send(&[(smr, src.as_ptr() as usize, reg)]).unwrap();
        assert_eq!(wait(&p.ab, s).unwrap(), reg as u64);
        assert_eq!(wait(&p.ba, r).unwrap(), reg as u64);
        assert_eq!(&dst[..reg], &src[..reg]);
        assert!(dst[reg..].iter().all(|&b| b == SENTINEL));
    }
}

/// The room is counted from where the receive starts, not from the region's base.
#[test]
fn the_room_of_a_receive_inside_its_region_is_what_is_left_of_the_region() {
    let p = pair_of_loopback();
    let src = pattern(200, 5);
    let mut dst = vec![SENTINEL; 8192];
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, 4096).unwrap();
    let at = dst.as_mut_ptr() as usize + 4000;
    let r = p.ba.recv(dmr, at, 1000).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, 97)]).unwrap();
    assert_eq!(wait(&p.ba, r).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert_eq!(wait(&p.ab, s).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    let r = p.ba.recv(dmr, at, 1000).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, 96)]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), 96);
    assert_eq!(wait(&p.ba, r).unwrap(), 96);
    assert_eq!(&dst[4000..4096], &src[..96]);
    assert!(dst[..4000].iter().chain(&dst[4096..]).all(|&b| b == SENTINEL));
}

/// A receive must still start inside the region it names; otherwise nothing it could take would
/// land in a registration, and the post fails with INVALID_PARAM.
#[test]
fn a_receive_starting_outside_its_region_is_refused_at_post() {
    let p = pair_of_loopback();
    let mut dst = vec![0u8; 8192];
    let base = dst.as_mut_ptr() as usize;
    let dmr = p.b.register(base, 4096).unwrap();
    for (what, addr, max) in [
        ("just past the end", base + 4096, 16usize),
        ("below the base", base - 1, 16),
        ("wrapping", base, usize::MAX),
        ("zero bytes", base, 0),
    ] {
        let err = p.ba.recv(dmr, addr, max).expect_err(what);
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}: {err}");
    }
    let err = p.ba.recv(dmr, base + 4096, 16).unwrap_err();
    assert!(err.to_string().contains("does not start inside memory region"), "{err}");
    assert_eq!(p.ba.recv(dmr + 1000, base, 16).unwrap_err().status(), UcclStatus::ErrNotFound);
}

/// The index the connector announces is what the acceptor reports (UCCL's accept returns the
/// connector's GPU); without one, the engine's own (0 for a host-only engine). Negative indexes
/// are refused before anything is sent.
#[test]
fn accept_reports_the_gpu_index_the_connector_announced() {
    let p = pair_of_loopback();
    let port = p.b.address().port();
    for announced in [Some(1), Some(7), None] {
        let ab = p.a.connect_as("127.0.0.1", "0", port, announced).unwrap();
        let ba = accept(&p.b).unwrap();
        assert_eq!(ba.peer.gpu_index, announced.unwrap_or(0), "announced {announced:?}");
        assert_eq!(ab.peer.gpu_index, 0, "the acceptor's own index is unchanged");
    }
    let err = p.a.connect_as("127.0.0.1", "0", port, Some(-2)).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{err}");
}

/// UCCL's engine sets `engine_offset` on every chunk of a write or read; the target ignores it.
#[test]
fn engine_offset_set_per_chunk_is_ignored() {
    let p = pair_of_loopback();
    let len = 256 << 10;
    let src = pattern(len, 11);
    let mut dst = vec![0u8; len];
    let mut back = vec![0u8; len];
    let smr = p.a.register(src.as_ptr() as usize, len).unwrap();
    let bmr = p.a.register(back.as_mut_ptr() as usize, len).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let item = p.b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    let chunk = 64 << 10;
    for (i, off) in (0..len).step_by(chunk).enumerate() {
        let remote = FifoItem { addr: item.addr + off as u64, size: chunk as u32, engine_offset: i as u32 % 4, ..item };
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize + off, len: chunk, remote }]).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), chunk as u64);
        let remote = FifoItem { engine_offset: u32::MAX - i as u32, ..remote };
        let r = p.ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize + off, len: chunk, remote }]).unwrap();
        assert_eq!(wait(&p.ab, r).unwrap(), chunk as u64);
    }
    assert!(dst == src, "writes landed wrong");
    assert!(back == src, "reads returned wrong bytes");
}
