//! Host-mode transfers as an unpacking consumer sees them: every received byte sits in the bounce
//! pool, reachable only through the loadMeta list of the receive's unpack slot.

mod common;

use std::ffi::c_void;
use std::time::{Duration, Instant};

use common::{Pair, Plugin, Unpack, assert_warned, pattern, take_warnings};
use uccl_tcpx::internal::ncclnet::*;

const POOL_DEFAULT: usize = 1 << 30;

/// Sends each size over one comm pair and checks the reassembly from loadMeta, the unpack slot
/// (k % 16), the size at request offset 36 and that the posted buffer is never written.
fn round_trips(sizes: &[usize], pool: usize, check: impl Fn(&[LoadMeta])) {
    let p = Plugin::init();
    let pair = p.pair(0);
    let unpack = Unpack::host(&pair);
    let cap = sizes.iter().max().copied().unwrap_or(0).max(1);
    let mut dst = vec![0xEEu8; cap];
    let rmh = p.reg(pair.recv, dst.as_mut_ptr(), cap, NCCL_PTR_HOST).unwrap();
    for (k, &size) in sizes.iter().enumerate() {
        let src = pattern(size, k as u64);
        let smh = p.reg(pair.send, src.as_ptr(), size, NCCL_PTR_HOST).unwrap();
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), cap, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), size, smh).unwrap();
        p.wait_both(s, r).unwrap();
        let slot = k % 16;
        assert_eq!(request_size(r), size as i32, "request offset 36 holds the sender's size");
        assert_eq!(request_slot(r), slot as u64, "unpack slot of the k-th receive");
        // The fields a TCPX-peeking consumer validates: comm at 0, &mem[slot][0] at 72, &cnt[slot] at 80.
        // SAFETY: r is a live receive request of this plugin (done, not yet consumed), and off is 0, 72 or
        // 80: each usize read lies inside its ring entry of at least 88 bytes (the layout TCPX consumers
        // read).
        let field = |off: usize| unsafe { r.cast::<u8>().add(off).cast::<usize>().read() };
        assert_eq!(field(0), pair.recv as usize);
        // SAFETY: only computes the address of mem[slot] inside the comm's live NetUnpackMeta (slot < 16);
        // nothing is read.
        assert_eq!(field(72), unsafe { std::ptr::addr_of!((*unpack.meta).mem[slot]) } as usize);
        // SAFETY: only computes the address of cnt[slot] inside the comm's live NetUnpackMeta (slot < 16);
        // nothing is read.
        assert_eq!(field(80), unsafe { std::ptr::addr_of!((*unpack.meta).cnt[slot]) } as usize);
        let got = unpack.gather(slot, size, pool);
        assert!(got == src, "size {size}: reassembled bytes differ");
        check(&unpack.metas(slot));
        assert!(dst.iter().all(|b| *b == 0xEE), "the posted buffer is never written");
        assert_eq!(p.consume(pair.recv, r), 0);
        // SAFETY: pair.send is live and smh its live registration on it.
        assert_eq!(unsafe { p.t.dereg_mr.unwrap()(pair.send, smh) }, 0);
    }
    assert!(take_warnings().is_empty());
}

fn request_size(req: *mut c_void) -> i32 {
    // SAFETY: callers pass a live request of this plugin; offset 36 holds its i32 size inside a ring entry of
    // at least 88 bytes.
    unsafe { req.cast::<u8>().add(36).cast::<i32>().read() }
}

fn request_slot(req: *mut c_void) -> u64 {
    // SAFETY: callers pass a live request of this plugin; offset 64 holds its u64 slot inside a ring entry of
    // at least 88 bytes.
    unsafe { req.cast::<u8>().add(64).cast::<u64>().read() }
}

const SIZES: &[usize] = &[0, 1, 4095, 4096, 4097, 100_000, 524_288, 4 << 20, 3, 0, 65_536];

isolated_test!(
    fn page_fragments_reassemble() {
        round_trips(SIZES, POOL_DEFAULT, |metas| {
            for (i, m) in metas.iter().enumerate() {
                assert_eq!(m.src_off % 4096, 0, "page mode: fragments start at page starts");
                if i + 1 < metas.len() {
                    assert_eq!(m.len, 4096, "page mode: only the last fragment of a chunk is partial");
                }
            }
        });
    }
);

isolated_test!(
    fn random_fragments_reassemble() {
        let misaligned = std::cell::Cell::new(0usize);
        let partial = std::cell::Cell::new(0usize);
        round_trips(SIZES, POOL_DEFAULT, |metas| {
            misaligned.set(misaligned.get() + metas.iter().filter(|m| m.src_off % 16 != 0).count());
            partial.set(partial.get() + metas.iter().filter(|m| m.len < 4096).count());
        });
        assert!(misaligned.get() > 100 && partial.get() > 100, "{} misaligned, {} partial", misaligned.get(), partial.get());
    }
    env: ["FAKE_TCPX_FRAGMENT" => "random", "FAKE_TCPX_SEED" => "12345"]
);

isolated_test!(
    fn chunk_edges_cut_fragments() {
        round_trips(&[25_000], POOL_DEFAULT, |metas| {
            let lens: Vec<u32> = metas.iter().map(|m| m.len).collect();
            assert_eq!(lens, vec![4096, 4096, 1808, 4096, 4096, 1808, 4096, 904]);
        });
    }
    env: ["FAKE_TCPX_CHUNK" => "10000"]
);

isolated_test!(
    fn sends_are_taken_before_the_receiver_posts() {
        // TCPX's isend hands out a request whenever the comm is up and an entry is free: it does not
        // wait for the receiver (no rendezvous), so a sender may run a full window ahead of the
        // receives that take its bytes, in order, later.
        let p = Plugin::init();
        let pair = p.pair(0);
        let unpack = Unpack::host(&pair);
        let src = pattern(16 * 4096, 7);
        let mut dst = vec![0u8; 4096];
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_HOST).unwrap();
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let sends: Vec<_> = (0..16)
            // SAFETY: src holds 16 * 4096 bytes and i < 16.
            .map(|i| p.isend(pair.send, unsafe { src.as_ptr().add(i * 4096) }, 4096, smh).unwrap())
            .collect();
        assert!(sends.iter().all(|r| !r.is_null()), "every send got a request with no receive posted");
        for (slot, s) in sends.iter().enumerate() {
            let r = p.irecv(pair.recv, dst.as_mut_ptr(), 4096, rmh).unwrap();
            p.wait_both(*s, r).unwrap();
            let want = &src[slot * 4096..(slot + 1) * 4096];
            assert_eq!(unpack.gather(slot, 4096, POOL_DEFAULT), want, "receive {slot} took send {slot}'s bytes");
            assert_eq!(p.consume(pair.recv, r), 0);
        }
        assert!(take_warnings().is_empty());
    }
);

isolated_test!(
    fn sender_size_overrides_receiver_size() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let unpack = Unpack::host(&pair);
        let mut dst = vec![0xEEu8; 8192];
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let src = pattern(10_000, 9);
        let smh = p.reg(pair.send, src.as_ptr(), src.len(), NCCL_PTR_HOST).unwrap();

        // Smaller than posted: the request reports the sender's size.
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 1024, rmh).unwrap();
        assert_eq!(request_size(r), 1024, "provisional size until the sender's header arrives");
        let s = p.isend(pair.send, src.as_ptr(), 100, smh).unwrap();
        p.wait_both(s, r).unwrap();
        assert_eq!(request_size(r), 100);
        assert_eq!(unpack.gather(0, 100, POOL_DEFAULT), src[..100]);
        assert_eq!(p.consume(pair.recv, r), 0);

        // Larger than posted: no check (as TCPX), nothing written past the posted buffer, the
        // request and loadMeta describe all 10 000 bytes so that the consumer can refuse them.
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), 1024, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), 10_000, smh).unwrap();
        p.wait_both(s, r).unwrap();
        assert_eq!(request_size(r), 10_000);
        let metas = unpack.metas(1);
        assert_eq!(metas.iter().map(|m| m.len as usize).sum::<usize>(), 10_000);
        assert!(metas.iter().any(|m| m.dst_off + m.len as u64 > 1024));
        assert_eq!(unpack.gather(1, 10_000, POOL_DEFAULT), src);
        assert!(dst.iter().all(|b| *b == 0xEE), "the posted buffer is never written");
        assert_eq!(p.consume(pair.recv, r), 0);
        assert!(take_warnings().is_empty());
    }
);

isolated_test!(
    fn tags_are_ignored_and_matching_is_fifo() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let unpack = Unpack::host(&pair);
        let mut dst = vec![0u8; 4096];
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let msgs: Vec<Vec<u8>> = (0..5).map(|i| pattern(100 + i * 10, i as u64)).collect();
        let smhs: Vec<_> = msgs.iter().map(|m| p.reg(pair.send, m.as_ptr(), m.len(), NCCL_PTR_HOST).unwrap()).collect();
        let isend = p.t.isend.unwrap();
        let irecv = p.t.irecv.unwrap();
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        for i in 0..5 {
            let mut req = std::ptr::null_mut();
            // Tags that would pair messages in reverse order if they were honoured.
            // SAFETY: msgs[i] is a live Vec registered as smhs[i] and kept until every send is waited for
            // below; req is a writable local.
            let rc = unsafe {
                isend(pair.send, msgs[i].as_ptr() as *mut c_void, msgs[i].len() as i32, i as i32, smhs[i], &mut req)
            };
            assert_eq!(rc, 0);
            sends.push(req);
            let (mut data, mut size, mut tag, mut mh) = (dst.as_mut_ptr().cast::<c_void>(), 4096, 4 - i as i32, rmh);
            // SAFETY: each pointer names one writable local (n = 1); data is dst, registered as rmh and alive
            // until every receive is waited for below.
            let rc = unsafe { irecv(pair.recv, 1, &mut data, &mut size, &mut tag, &mut mh, &mut req) };
            assert_eq!(rc, 0);
            recvs.push(req);
        }
        for i in 0..5 {
            p.wait_both(sends[i], recvs[i]).unwrap();
            assert_eq!(unpack.gather(i, msgs[i].len(), POOL_DEFAULT), msgs[i], "message {i}");
        }
        for r in recvs {
            assert_eq!(p.consume(pair.recv, r), 0);
        }
    }
);

/// Sends `len` bytes and receives them into slot `k % 16` without consuming.
fn transfer(p: &Plugin, pair: &Pair, data: &[u8], smh: *mut c_void, dst: *mut u8, rmh: *mut c_void) -> *mut c_void {
    let r = p.irecv(pair.recv, dst, data.len(), rmh).unwrap();
    let s = p.isend(pair.send, data.as_ptr(), data.len(), smh).unwrap();
    p.wait_both(s, r).unwrap();
    r
}

fn pages_of(metas: &[LoadMeta]) -> Vec<u32> {
    let mut v: Vec<u32> = metas.iter().map(|m| m.src_off / 4096).collect();
    v.sort();
    v
}

isolated_test!(
    fn consumed_pages_are_recycled() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let unpack = Unpack::host(&pair);
        let a = pattern(64 * 4096, 1);
        let b = pattern(64 * 4096, 2);
        let smh_a = p.reg(pair.send, a.as_ptr(), a.len(), NCCL_PTR_HOST).unwrap();
        let smh_b = p.reg(pair.send, b.as_ptr(), b.len(), NCCL_PTR_HOST).unwrap();
        let mut dst = vec![0u8; a.len()];
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();

        let ra = transfer(&p, &pair, &a, smh_a, dst.as_mut_ptr(), rmh);
        let metas_a = unpack.metas(0);
        assert_eq!(unpack.gather(0, a.len(), POOL_DEFAULT), a);
        // While A is unconsumed, B gets other pages.
        let rb = transfer(&p, &pair, &b, smh_b, dst.as_mut_ptr(), rmh);
        let metas_b = unpack.metas(1);
        let (pa, pb) = (pages_of(&metas_a), pages_of(&metas_b));
        assert!(pa.iter().all(|x| pb.binary_search(x).is_err()), "unconsumed pages are never reused");
        assert_eq!(unpack.gather(0, a.len(), POOL_DEFAULT), a, "A's pages are intact until consumed");

        // Consuming A gives its pages to the next receive: a consumer that gathers A after consuming
        // it reads C's bytes.
        assert_eq!(p.consume(pair.recv, ra), 0);
        let c = pattern(64 * 4096, 3);
        let smh_c = p.reg(pair.send, c.as_ptr(), c.len(), NCCL_PTR_HOST).unwrap();
        let rc = transfer(&p, &pair, &c, smh_c, dst.as_mut_ptr(), rmh);
        assert_eq!(pages_of(&unpack.metas(2)), pa, "C reuses exactly A's pages");
        let stale: Vec<u8> = {
            let mut out = vec![0u8; a.len()];
            for m in &metas_a {
                // SAFETY: gather checked A's metas above: each fragment lies inside the live bounce pool and
                // inside [0, a.len()), the size of out.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        unpack.bounce.add(m.src_off as usize),
                        out.as_mut_ptr().add(m.dst_off as usize),
                        m.len as usize,
                    )
                };
            }
            out
        };
        assert!(stale != a, "gathering after consume reads recycled pages");
        assert_eq!(unpack.gather(2, c.len(), POOL_DEFAULT), c);
        assert_eq!(p.consume(pair.recv, rb), 0);
        assert_eq!(p.consume(pair.recv, rc), 0);
    }
);

isolated_test!(
    fn receive_waits_for_pool_pages() {
        // 1 MiB pool = 256 pages; each message needs 192.
        let p = Plugin::init();
        let pair = p.pair(0);
        let unpack = Unpack::host(&pair);
        let a = pattern(192 * 4096, 1);
        let b = pattern(192 * 4096, 2);
        let smh_a = p.reg(pair.send, a.as_ptr(), a.len(), NCCL_PTR_HOST).unwrap();
        let smh_b = p.reg(pair.send, b.as_ptr(), b.len(), NCCL_PTR_HOST).unwrap();
        let mut dst = vec![0u8; a.len()];
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let ra = transfer(&p, &pair, &a, smh_a, dst.as_mut_ptr(), rmh);
        let rb = p.irecv(pair.recv, dst.as_mut_ptr(), b.len(), rmh).unwrap();
        let sb = p.isend(pair.send, b.as_ptr(), b.len(), smh_b).unwrap();
        let until = Instant::now() + Duration::from_millis(300);
        let mut sent = false;
        while Instant::now() < until {
            assert_eq!(p.test(rb), Ok(false), "B cannot land while A holds the pool");
            if !sent {
                sent = p.test(sb).unwrap();
            }
        }
        assert_eq!(p.consume(pair.recv, ra), 0);
        p.wait(rb).unwrap();
        assert_eq!(unpack.gather(1, b.len(), 1 << 20), b);
        assert_eq!(p.consume(pair.recv, rb), 0);
        assert!(take_warnings().is_empty());

        // A message that can never fit the pool is an error, not a wait.
        let big = pattern(300 * 4096, 3);
        let smh = p.reg(pair.send, big.as_ptr(), big.len(), NCCL_PTR_HOST).unwrap();
        let mut big_dst = vec![0u8; big.len()];
        let rmh = p.reg(pair.recv, big_dst.as_mut_ptr(), big_dst.len(), NCCL_PTR_HOST).unwrap();
        let r = p.irecv(pair.recv, big_dst.as_mut_ptr(), big.len(), rmh).unwrap();
        let s = p.isend(pair.send, big.as_ptr(), big.len(), smh).unwrap();
        let deadline = Instant::now() + testkit::PATIENCE;
        let mut big_sent = false;
        let rc = loop {
            if !sent {
                sent = p.test(sb).unwrap();
            } else if !big_sent {
                big_sent = p.test(s).unwrap();
            }
            match p.test(r) {
                Ok(false) => assert!(Instant::now() < deadline),
                Ok(true) => panic!("a 300-page receive completed in a 256-page pool"),
                Err(rc) => break rc,
            }
        };
        assert_eq!(rc, NCCL_INTERNAL_ERROR);
        assert_warned("FAKE_TCPX_POOL_MIB");
    }
    env: ["FAKE_TCPX_POOL_MIB" => "1"]
);

/// Tests `r` (and the send `s` until it is done) for `ms` milliseconds, asserting that the receive
/// neither completes nor fails meanwhile; returns whether the send finished.
fn stays_waiting(p: &Plugin, r: *mut c_void, s: *mut c_void, ms: u64, why: &str) -> bool {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut sent = false;
    while Instant::now() < until {
        assert_eq!(p.test(r), Ok(false), "{why}");
        if !sent {
            sent = p.test(s).unwrap();
        }
    }
    sent
}

isolated_test!(
    fn one_pool_shared_by_every_receive_comm() {
        // 1 MiB = 256 pages for the whole process (host mode stands in for one GPU), not per comm.
        let p = Plugin::init();
        let (x, y) = (p.pair(0), p.pair(1));
        let (ux, uy) = (Unpack::host(&x), Unpack::host(&y));
        assert_eq!(ux.bounce, uy.bounce, "both receive comms hand out the same bounce pool");
        let a = pattern(192 * 4096, 1);
        let b = pattern(128 * 4096, 2);
        let mut dst = vec![0u8; a.len()];
        let reg = |pair: &Pair, data: &[u8]| p.reg(pair.send, data.as_ptr(), data.len(), NCCL_PTR_HOST).unwrap();
        let (smh_a, smh_b) = (reg(&x, &a), reg(&y, &b));
        let rmh_x = p.reg(x.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();
        let rmh_y = p.reg(y.recv, dst.as_mut_ptr(), dst.len(), NCCL_PTR_HOST).unwrap();

        // X holds 192 pages and does not consume: Y's 128-page receive waits, without error.
        let ra = transfer(&p, &x, &a, smh_a, dst.as_mut_ptr(), rmh_x);
        let rb = p.irecv(y.recv, dst.as_mut_ptr(), b.len(), rmh_y).unwrap();
        let sb = p.isend(y.send, b.as_ptr(), b.len(), smh_b).unwrap();
        let sent = stays_waiting(&p, rb, sb, 300, "Y waits while X holds the pages it needs");
        assert!(take_warnings().is_empty(), "waiting for pages is not an error");
        assert_eq!(ux.gather(0, a.len(), 1 << 20), a, "X's pages are intact while it holds them");

        // X's consume frees Y.
        assert_eq!(p.consume(x.recv, ra), 0);
        if !sent {
            p.wait_both(sb, rb).unwrap();
        } else {
            p.wait(rb).unwrap();
        }
        assert_eq!(uy.gather(0, b.len(), 1 << 20), b);
        assert_eq!(p.consume(y.recv, rb), 0);

        // Closing a comm returns the pages of receives it never consumed, as closing TCPX's sockets
        // does: X holds 192 pages again, is closed, and Y gets 200.
        transfer(&p, &x, &a, smh_a, dst.as_mut_ptr(), rmh_x);
        let c = pattern(200 * 4096, 3);
        let smh_c = reg(&y, &c);
        let mut big = vec![0u8; c.len()];
        let rmh_big = p.reg(y.recv, big.as_mut_ptr(), big.len(), NCCL_PTR_HOST).unwrap();
        let rc = p.irecv(y.recv, big.as_mut_ptr(), c.len(), rmh_big).unwrap();
        let sc = p.isend(y.send, c.as_ptr(), c.len(), smh_c).unwrap();
        let sent = stays_waiting(&p, rc, sc, 200, "Y waits while X holds 192 of 256 pages");
        for (close, comm) in [(p.t.close_send, x.send), (p.t.close_recv, x.recv), (p.t.close_listen, x.listen)] {
            // SAFETY: each comm of pair X is live and closed once, with the close of its own kind.
            assert_eq!(unsafe { close.unwrap()(comm) }, 0);
        }
        assert_warned("never consumed");
        if !sent {
            p.wait_both(sc, rc).unwrap();
        } else {
            p.wait(rc).unwrap();
        }
        assert_eq!(uy.gather(1, c.len(), 1 << 20), c);
        assert_eq!(p.consume(y.recv, rc), 0);
    }
    env: ["FAKE_TCPX_POOL_MIB" => "1"]
);

isolated_test!(
    fn too_many_fragments_fail_with_rc_3_on_request() {
        let p = Plugin::init();
        let pair = p.pair(0);
        let len = (8 << 20) + 1;
        let src = vec![5u8; len];
        let smh = p.reg(pair.send, src.as_ptr(), len, NCCL_PTR_HOST).unwrap();
        let mut dst = vec![0u8; len];
        let rmh = p.reg(pair.recv, dst.as_mut_ptr(), len, NCCL_PTR_HOST).unwrap();
        let r = p.irecv(pair.recv, dst.as_mut_ptr(), len, rmh).unwrap();
        let s = p.isend(pair.send, src.as_ptr(), len, smh).unwrap();
        let deadline = Instant::now() + testkit::PATIENCE;
        let rc = loop {
            let _ = p.test(s);
            match p.test(r) {
                Ok(false) => assert!(Instant::now() < deadline),
                Ok(true) => panic!("a 2049-fragment receive completed"),
                Err(rc) => break rc,
            }
        };
        assert_eq!(rc, NCCL_INTERNAL_ERROR);
        assert_warned("request too many pages 2049, failstop");
        assert_eq!(p.test(r), Err(NCCL_INTERNAL_ERROR), "the failure is sticky");
    }
    // TCPX exits here (tests/fatal.rs); the knob returns rc 3 instead.
    env: ["FAKE_TCPX_ON_FATAL" => "rc"]
);
