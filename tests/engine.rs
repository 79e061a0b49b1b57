//! End-to-end engine behaviour over loopback through the Rust API (the C ABI has its own tests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::{Config, Connection, Engine, FifoItem, OneSided, UcclStatus};

mod common;
use common::{PATIENCE, Pair, pattern, wait};

fn config() -> Config {
    Config { num_channels: Some(3), chunk_size: 64 << 10, ..common::loopback() }
}

fn pair() -> Pair {
    common::pair(config())
}

#[test]
fn send_recv_various_sizes_in_order() {
    let p = pair();
    let sizes = [1usize, 4095, 64 << 10, (1 << 20) + 7];
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u64)).collect();
    let mut dsts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n + 16]).collect();
    let mut recvs = Vec::new();
    for d in dsts.iter_mut() {
        let mr = p.b.register(d.as_mut_ptr() as usize, d.len()).unwrap();
        recvs.push(p.ba.recv(mr, d.as_mut_ptr() as usize, d.len()).unwrap());
    }
    let mut sends = Vec::new();
    for s in &srcs {
        let mr = p.a.register(s.as_ptr() as usize, s.len()).unwrap();
        sends.push(p.ab.send(&[(mr, s.as_ptr() as usize, s.len())]).unwrap());
    }
    for (i, id) in sends.into_iter().enumerate() {
        assert_eq!(wait(&p.ab, id).unwrap(), sizes[i] as u64);
    }
    for (i, id) in recvs.into_iter().enumerate() {
        assert_eq!(wait(&p.ba, id).unwrap(), sizes[i] as u64);
        assert_eq!(&dsts[i][..sizes[i]], &srcs[i][..], "message {i}");
        assert!(dsts[i][sizes[i]..].iter().all(|b| *b == 0), "bytes past the message untouched");
    }
}

#[test]
fn oversized_send_fails_both_sides_and_connection_survives() {
    let p = pair();
    let src = pattern(1000, 1);
    let mut dst = vec![0u8; 100];
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap_err().status(), UcclStatus::ErrMismatch);
    assert_eq!(wait(&p.ba, r).unwrap_err().status(), UcclStatus::ErrMismatch);
    assert!(dst.iter().all(|b| *b == 0));
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, 100)]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), 100);
    assert_eq!(wait(&p.ba, r).unwrap(), 100);
    assert_eq!(&dst[..], &src[..100]);
}

#[test]
fn one_sided_write_read_and_refusals() {
    let p = pair();
    let mut target = vec![0xEEu8; 3 << 20];
    let tmr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let base = target.as_mut_ptr() as usize;
    // Advertise the middle only: [base + 4096, base + 4096 + 2 MiB).
    let fifo = p.b.prepare_fifo(tmr, base + 4096, 2 << 20).unwrap();
    let src = pattern((2 << 20) - 10, 9);
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let mut item = fifo;
    item.addr += 10;
    let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: src.len(), remote: item }]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), src.len() as u64);
    assert_eq!(&target[4096 + 10..4096 + 10 + src.len()], &src[..]);

    let mut back = vec![0u8; src.len()];
    let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let r =
        p.ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: back.len(), remote: item }]).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), back.len() as u64);
    assert_eq!(back, src);

    let before = target.clone();
    for (addr, len) in [(base, 16usize), (base + 4096 + (2 << 20) - 8, 16)] {
        let mut bad = fifo;
        bad.addr = addr as u64;
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote: bad }]).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed);
        let r = p.ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote: bad }]).unwrap();
        assert_eq!(wait(&p.ab, r).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    }
    let mut forged = fifo;
    forged.padding[9] ^= 0x40; // inside the token
    let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: 8, remote: forged }]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert!(target == before, "refused writes left target memory untouched");

    // Still usable afterwards, with a vector write of two items.
    let a = OneSided { mr: smr, addr: src.as_ptr() as usize, len: 100, remote: fifo };
    let mut second = fifo;
    second.addr += 1 << 20;
    let b = OneSided { mr: smr, addr: src.as_ptr() as usize + 100, len: 5000, remote: second };
    let w = p.ab.write(&[a, b]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), 5100);
    assert_eq!(&target[4096..4196], &src[..100]);
    assert_eq!(&target[4096 + (1 << 20)..4096 + (1 << 20) + 5000], &src[100..5100]);
}

/// Writes, reads and sends up to the engine's inline bound ride the control stream, larger ones the
/// channels: with a bound of 256 KiB the data sockets carry none of the former and every byte lands,
/// each transfer checked alone; with 64 KiB the same 200,000 bytes take the channels.
#[test]
fn inline_bound_decides_what_rides_the_channels() {
    let data_bytes = |conn: &uccl_tcpx::Connection| -> (u64, u64) {
        conn.link_stats().iter().fold((0, 0), |(o, i), l| (o + l.out.bytes, i + l.inbound.bytes))
    };
    for (bound, sizes) in [
        (256 << 10, [1usize, (64 << 10) + 1, 200_000, 256 << 10, (256 << 10) + 1]),
        (64 << 10, [64 << 10, (64 << 10) + 1, 200_000, 1, 2]),
    ] {
        let p = common::pair(Config { inline_max: bound, ..config() });
        let mut target = vec![0u8; 1 << 20];
        let tmr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
        let remote = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, target.len()).unwrap();
        // Whether the data sockets carried the transfer is exactly whether it was past the bound.
        let took_channels = |what: &str, n: usize, on_channels: u64| {
            assert_eq!(
                on_channels == 0,
                n as u32 <= bound,
                "{what} of {n} bytes, bound {bound}: {on_channels} on the channels"
            );
        };
        for (i, &n) in sizes.iter().enumerate() {
            let src = pattern(n, 300 + i as u64);
            let smr = p.a.register(src.as_ptr() as usize, n).unwrap();
            let before = data_bytes(&p.ab);
            let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: n, remote }]).unwrap();
            assert_eq!(wait(&p.ab, w).unwrap(), n as u64);
            assert_eq!(&target[..n], &src[..], "write of {n} bytes, bound {bound}");
            took_channels("write", n, data_bytes(&p.ab).0 - before.0);
            let before = data_bytes(&p.ab);
            let mut back = vec![0u8; n];
            let bmr = p.a.register(back.as_mut_ptr() as usize, n).unwrap();
            let r = p.ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: n, remote }]).unwrap();
            assert_eq!(wait(&p.ab, r).unwrap(), n as u64);
            assert!(back == src, "read of {n} bytes, bound {bound}");
            took_channels("read", n, data_bytes(&p.ab).1 - before.1);
            let before = data_bytes(&p.ab);
            let rid = p.ba.recv(tmr, target.as_mut_ptr() as usize, target.len()).unwrap();
            let s = p.ab.send(&[(smr, src.as_ptr() as usize, n)]).unwrap();
            assert_eq!(wait(&p.ab, s).unwrap(), n as u64);
            assert_eq!(wait(&p.ba, rid).unwrap(), n as u64);
            assert_eq!(&target[..n], &src[..], "send of {n} bytes, bound {bound}");
            took_channels("send", n, data_bytes(&p.ab).0 - before.0);
            target[..n].fill(0);
        }
    }
}

/// One send call of more inline-sized messages than the peer may hold unmatched (4 MiB): the first
/// ride the control stream, the rest are announced, and every message lands whole in its own
/// receive, in order, whether the receives come before the call or after it.
#[test]
fn a_send_of_more_inline_messages_than_the_peer_holds_lands_in_order() {
    const N: usize = 30;
    const LEN: usize = 200_000;
    let p = common::pair(Config { inline_max: 256 << 10, ..config() });
    let src = pattern(N * LEN, 41);
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let msgs: Vec<(u64, usize, usize)> = (0..N).map(|i| (smr, src.as_ptr() as usize + i * LEN, LEN)).collect();
    for receives_first in [true, false] {
        let mut dst = vec![0u8; N * (LEN + 8)];
        let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let base = dst.as_mut_ptr() as usize;
        let post = |p: &common::Pair| -> Vec<u64> {
            (0..N).map(|i| p.ba.recv(dmr, base + i * (LEN + 8), LEN + 8).unwrap()).collect()
        };
        let (recvs, s) = if receives_first {
            let recvs = post(&p);
            (recvs, p.ab.send(&msgs).unwrap())
        } else {
            let s = p.ab.send(&msgs).unwrap();
            (post(&p), s)
        };
        assert_eq!(wait(&p.ab, s).unwrap(), (N * LEN) as u64);
        for (i, r) in recvs.into_iter().enumerate() {
            assert_eq!(wait(&p.ba, r).unwrap(), LEN as u64, "receive {i}");
            let at = i * (LEN + 8);
            assert!(dst[at..at + LEN] == src[i * LEN..(i + 1) * LEN], "message {i} (receives first: {receives_first})");
            assert!(dst[at + LEN..at + LEN + 8].iter().all(|&b| b == 0), "past message {i}");
        }
        p.b.deregister(dmr).unwrap();
    }
}

/// Inline-sized writes alternating between two remote regions, 12 MB in all (more than a
/// connection keeps unanswered inline, 8 MiB): as one call, they go together as one request over
/// both regions, all over the channels; as a call each, posted back to back, the first ride the
/// control stream and the rest go as requests (how many of each depends on how soon the peer
/// answers: `unanswered_inline_one_sided_bytes_are_bounded` holds the bound itself). Every item
/// lands whole where it was sent either way.
#[test]
fn inline_sized_writes_over_two_regions_land_whole_in_one_call_or_many() {
    const N: usize = 60;
    const LEN: usize = 200_000;
    let p = common::pair(Config { inline_max: 256 << 10, ..config() });
    let src = pattern(N * LEN, 43);
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let mut targets = [vec![0u8; N / 2 * LEN], vec![0u8; N / 2 * LEN]];
    let remotes: Vec<FifoItem> = targets
        .iter_mut()
        .map(|t| {
            let mr = p.b.register(t.as_mut_ptr() as usize, t.len()).unwrap();
            p.b.prepare_fifo(mr, t.as_mut_ptr() as usize, t.len()).unwrap()
        })
        .collect();
    let items: Vec<OneSided> = (0..N)
        .map(|i| {
            let mut remote = remotes[i % 2];
            remote.addr += (i / 2 * LEN) as u64;
            OneSided { mr: smr, addr: src.as_ptr() as usize + i * LEN, len: LEN, remote }
        })
        .collect();
    let on_channels = || p.ab.link_stats().iter().map(|l| l.out.bytes).sum::<u64>();
    for one_call in [true, false] {
        for t in targets.iter_mut() {
            t.fill(0);
        }
        let before = on_channels();
        if one_call {
            let w = p.ab.write(&items).unwrap();
            assert_eq!(wait(&p.ab, w).unwrap(), (N * LEN) as u64);
            assert!(on_channels() - before >= (N * LEN) as u64, "one call: every item over the channels");
        } else {
            let writes: Vec<u64> = items.iter().map(|item| p.ab.write(std::slice::from_ref(item)).unwrap()).collect();
            for w in writes {
                assert_eq!(wait(&p.ab, w).unwrap(), LEN as u64);
            }
        }
        for i in 0..N {
            let at = i / 2 * LEN;
            assert!(targets[i % 2][at..at + LEN] == src[i * LEN..(i + 1) * LEN], "item {i} (one call: {one_call})");
        }
    }
}

/// Transfers up to 64 KiB travel inline on the control stream, larger ones over the channels; a vector
/// mixing both, in both directions, lands every byte where it belongs and nothing beyond.
#[test]
fn small_and_large_one_sided_items_mix_across_the_inline_limit() {
    let p = pair();
    let sizes = [1usize, 8, 65_535, 65_536, 65_537, 200_000];
    let total: usize = sizes.iter().sum();
    let mut target = vec![0u8; total + sizes.len() * 16];
    let tmr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let fifo = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, target.len()).unwrap();
    let src = pattern(total, 77);
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let (mut items, mut spans) = (Vec::new(), Vec::new());
    let (mut s_off, mut t_off) = (0usize, 0usize);
    for &n in &sizes {
        let mut remote = fifo;
        remote.addr += t_off as u64;
        items.push(OneSided { mr: smr, addr: src.as_ptr() as usize + s_off, len: n, remote });
        spans.push((s_off, t_off, n));
        s_off += n;
        t_off += n + 16; // a gap that must stay untouched
    }
    let w = p.ab.write(&items).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total as u64);
    let mut expected = vec![0u8; target.len()];
    for &(s, t, n) in &spans {
        expected[t..t + n].copy_from_slice(&src[s..s + n]);
    }
    assert!(target == expected, "written bytes and gaps");

    let mut back = vec![0xAAu8; total];
    let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let reads: Vec<OneSided> = items
        .iter()
        .zip(&spans)
        .map(|(item, &(s, _, n))| OneSided {
            mr: bmr,
            addr: back.as_mut_ptr() as usize + s,
            len: n,
            remote: item.remote,
        })
        .collect();
    let r = p.ab.read(&reads).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total as u64);
    assert_eq!(back, src);
}

#[test]
fn peer_close_fails_pending_and_later_posts() {
    let p = pair();
    let mut dst = vec![0u8; 64];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    p.a.close_connection(&p.ab);
    let err = wait(&p.ba, r).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");
    let again = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap_err();
    assert_eq!(again.status(), UcclStatus::ErrRemoteDisconnect);
    assert_eq!(p.ab.notify(b"x", b"y").unwrap_err().status(), UcclStatus::ErrCanceled);
}

#[test]
fn simultaneous_connects_both_ways_and_any_gpu_name_served() {
    let a = Arc::new(Engine::new(config()).unwrap());
    let b = Arc::new(Engine::new(config()).unwrap());
    let (pa, pb) = (a.address().port(), b.address().port());
    let (a2, b2) = (a.clone(), b.clone());
    let t1 = std::thread::spawn(move || a2.connect("127.0.0.1", "0", pb).unwrap());
    let t2 = std::thread::spawn(move || b2.connect("127.0.0.1", "0", pa).unwrap());
    let ab = t1.join().unwrap();
    let ba = t2.join().unwrap();
    let from_b = common::accept(&a).unwrap();
    let from_a = common::accept(&b).unwrap();
    assert_eq!(from_b.peer.gpu_index, 0);
    for (tx, rx, eng_tx, eng_rx) in [(&ab, &from_a, &a, &b), (&ba, &from_b, &b, &a)] {
        let src = pattern(70_000, 3);
        let mut dst = vec![0u8; 70_000];
        let smr = eng_tx.register(src.as_ptr() as usize, src.len()).unwrap();
        let dmr = eng_rx.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let r = rx.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let s = tx.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
        assert_eq!(wait(tx, s).unwrap(), 70_000);
        assert_eq!(wait(rx, r).unwrap(), 70_000);
        assert_eq!(dst, src);
    }
    // The GPU a peer names is advisory (its metadata may predate the engine's GPU): one port
    // reaches one engine, which serves its own GPU whatever the name.
    for name in ["5", "0000:ff:1f.7"] {
        let conn = a.connect("127.0.0.1", name, pb).unwrap_or_else(|e| panic!("GPU name {name:?}: {e}"));
        let served = b.accept().unwrap();
        assert_eq!((conn.peer.gpu_index, conn.peer.gpu_id.as_str()), (0, "0"), "b says which GPU it serves");
        assert_eq!(served.peer.addr.ip(), conn.peer.addr.ip());
    }
}

#[test]
fn stop_accept_unblocks_and_shutdown_fails_pending() {
    let e = Arc::new(Engine::new(config()).unwrap());
    let e2 = e.clone();
    let t = testkit::threads::spawn_blocked("Engine::accept", move || e2.accept());
    let start = Instant::now();
    e.stop_accept();
    let err = testkit::within(PATIENCE, "the accept released by stop_accept", move || t.join().unwrap()).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrCanceled);
    eprintln!("stop_accept released a blocked accept after {:?}", start.elapsed());

    let p = pair();
    let mut dst = vec![0u8; 64];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    p.b.shutdown();
    assert_eq!(wait(&p.ba, r).unwrap_err().status(), UcclStatus::ErrCanceled);
    drop(p.a);
}

#[test]
fn notifications_arrive_in_order_and_whole() {
    let p = pair();
    // Larger than UCCL's fixed 256-byte form, with zero bytes at the end.
    let mut long = pattern(3 << 20, 5);
    long.extend_from_slice(&[0, 0, 0]);
    p.ab.notify(b"agent-a", &long).unwrap();
    p.ab.notify(b"agent-a", b"second").unwrap();
    let mut got = Vec::new();
    common::wait_until("both notifications arrive", PATIENCE, || {
        got.extend(uccl_tcpx::drain_notifications(16).into_iter().filter(|n| n.name == b"agent-a"));
        got.len() >= 2
    });
    assert_eq!(got.len(), 2);
    assert!(got[0].msg == long, "the long message came back {} bytes, not whole", got[0].msg.len());
    assert_eq!(got[1].msg, b"second");
    assert!(p.ab.notify(&[b'n'; 256], b"").is_err(), "name too long");
    drop(p.b);
}

/// Blocking waits on inline transfers read the control stream in the waiting thread. Several such
/// waiters, a large write whose Done arrives on the same stream and a peer sending back at the
/// same time must all be served, whoever happens to be reading.
#[test]
fn blocking_waits_from_many_threads_share_the_control_stream() {
    many_threads_share_the_control_stream(config());
}

/// The same with no polling at all, and with polls long enough that every reader polls through most
/// of the run (a caller's reply then usually arrives while the reactor holds the stream).
#[test]
fn blocking_waits_share_the_control_stream_without_and_with_long_polls() {
    for spin in [Duration::ZERO, Duration::from_millis(2)] {
        many_threads_share_the_control_stream(Config { control_spin: spin, ..config() });
    }
}

fn many_threads_share_the_control_stream(config: Config) {
    let p = Arc::new(common::pair(config));
    let region_len = 4 << 20;
    let mut remote = vec![0u8; region_len];
    let rmr = p.b.register(remote.as_mut_ptr() as usize, remote.len()).unwrap();
    let fifo = p.b.prepare_fifo(rmr, remote.as_mut_ptr() as usize, remote.len()).unwrap();
    let at = move |off: usize| {
        let mut item = fifo;
        item.addr += off as u64;
        item
    };
    let threads = 4;
    let rounds = 150;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let p = p.clone();
            sc.spawn(move || {
                // Each thread owns a disjoint 64 KiB slice of the remote region.
                let base = t * (64 << 10);
                let mut local = pattern(64 << 10, t as u64);
                let mut back = vec![0u8; 64 << 10];
                let lmr = p.a.register(local.as_mut_ptr() as usize, local.len()).unwrap();
                let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
                for r in 0..rounds {
                    // Up to the inline limit, mostly small.
                    let len =
                        if r % 8 == 7 { 1 + (r * 7919 + t * 131) % (64 << 10) } else { 1 + (r * 997 + t * 131) % 8192 };
                    local[..len].copy_from_slice(&pattern(len, (t * 1000 + r) as u64));
                    let item = at(base);
                    let op = OneSided { mr: lmr, addr: local.as_ptr() as usize, len, remote: item };
                    let w = p.ab.write(&[op]).unwrap();
                    assert_eq!(p.ab.wait(w).unwrap(), len as u64, "thread {t} round {r}");
                    let op = OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote: item };
                    let rd = p.ab.read(&[op]).unwrap();
                    assert_eq!(p.ab.wait(rd).unwrap(), len as u64);
                    assert_eq!(&back[..len], &local[..len], "thread {t} round {r}: read back");
                }
            });
        }
        // A large write on the same connection: its Done is read by whichever thread reads.
        let p2 = p.clone();
        sc.spawn(move || {
            let big = pattern(1 << 20, 77);
            let mr = p2.a.register(big.as_ptr() as usize, big.len()).unwrap();
            for _ in 0..4 {
                let item = at(2 << 20);
                let w =
                    p2.ab.write(&[OneSided { mr, addr: big.as_ptr() as usize, len: big.len(), remote: item }]).unwrap();
                assert_eq!(p2.ab.wait(w).unwrap(), big.len() as u64);
            }
        });
        // The peer sends small messages back while all that runs.
        let p3 = p.clone();
        sc.spawn(move || {
            let mut dst = vec![0u8; 64];
            let dmr = p3.a.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
            let src = pattern(64, 5);
            let smr = p3.b.register(src.as_ptr() as usize, src.len()).unwrap();
            for i in 0..200 {
                let r = p3.ab.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
                let s = p3.ba.send(&[(smr, src.as_ptr() as usize, 1 + i % 64)]).unwrap();
                assert_eq!(p3.ba.wait(s).unwrap(), (1 + i % 64) as u64);
                assert_eq!(p3.ab.wait(r).unwrap(), (1 + i % 64) as u64);
                assert_eq!(&dst[..1 + i % 64], &src[..1 + i % 64]);
            }
        });
    });
    assert_eq!(&remote[2 << 20..(2 << 20) + (1 << 20)], &pattern(1 << 20, 77)[..]);
}

/// Small sends posted before any receive wait at the receiver (inline ones buffered up to a bound,
/// the rest announced) and land in posting order once receives come.
#[test]
fn small_sends_before_receives_land_in_order() {
    let p = pair();
    // 700 messages with 64 KiB and 100000-byte ones among them pass the 4 MiB the receiver holds for
    // sends before their receives (inline payloads, landed eager ones), so announced ones
    // interleave with both.
    let sizes: Vec<usize> = (0..700).map(|i| [1, 65_536, 100, 100_000, 8192][i % 5]).collect();
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u64)).collect();
    let mut sends = Vec::new();
    for s in &srcs {
        let mr = p.a.register(s.as_ptr() as usize, s.len()).unwrap();
        sends.push(p.ab.send(&[(mr, s.as_ptr() as usize, s.len())]).unwrap());
    }
    let mut dst = vec![0u8; 100_000 + 8];
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        dst.fill(0);
        let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, 100_000).unwrap();
        assert_eq!(p.ba.wait(r).unwrap(), n as u64, "message {i}");
        assert_eq!(&dst[..n], &srcs[i][..], "message {i}");
        assert!(dst[n..].iter().all(|&b| b == 0), "message {i}: bytes past it untouched");
    }
    for (i, id) in sends.into_iter().enumerate() {
        assert_eq!(p.ab.wait(id).unwrap(), sizes[i] as u64, "send {i}");
    }
}

/// A caller blocked on an inline send whose receive never comes is released by a local close.
#[test]
fn close_releases_a_caller_waiting_on_the_stream() {
    let p = pair();
    let src = pattern(16, 1);
    let mr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let id = p.ab.send(&[(mr, src.as_ptr() as usize, src.len())]).unwrap();
    let conn = p.ab.clone();
    let waiter = testkit::threads::spawn_blocked("Connection::wait", move || conn.wait(id));
    p.a.close_connection(&p.ab);
    // The wait never ends on its own: only the close can have released it.
    let outcome = testkit::within(PATIENCE, "the wait released by the close", move || waiter.join().unwrap());
    assert_eq!(outcome.unwrap_err().status(), UcclStatus::ErrCanceled);
}

/// A small send waits inline at the receiver for its receive, a mid-size one in its landing
/// memory; that is the peer's user being slow, not the peer's engine stalling, so no timeout may
/// fire however long it takes.
#[test]
fn a_send_waiting_for_its_receive_is_not_a_stall() {
    let cfg = || Config { timeout: Duration::from_millis(500), ..config() };
    let Pair { a, b, ab, ba } = common::pair(cfg());
    for len in [16, 300_000] {
        let src = pattern(len, 3);
        let smr = a.register(src.as_ptr() as usize, src.len()).unwrap();
        let id = ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
        // Three timeouts' worth with nothing on the wire.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(ab.poll(id).unwrap(), None, "the send must still be pending");
        ab.notify(b"alive", b"").expect("the connection must still be up");
        let mut dst = vec![0u8; len];
        let dmr = b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        let r = ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
        assert_eq!(wait(&ba, r).unwrap(), len as u64);
        assert_eq!(wait(&ab, id).unwrap(), len as u64);
        assert_eq!(dst, src, "{len} bytes");
    }
}

/// Mid-size messages go with their bytes at once: into receives posted before them, or landed at
/// the receiver (counted) and copied once their receives come; one too large for its receive fails
/// both ends either way and leaves the receive's memory untouched.
#[test]
fn mid_size_sends_meet_receives_posted_before_and_after_them() {
    let p = pair();
    let sizes = [(64 << 10) + 1, 300_000, 1 << 20];
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, 40 + i as u64)).collect();
    let smrs: Vec<u64> = srcs.iter().map(|s| p.a.register(s.as_ptr() as usize, s.len()).unwrap()).collect();
    let mut dst = vec![0u8; (1 << 20) + 64];
    let (at, cap) = (dst.as_mut_ptr() as usize, dst.len());
    let dmr = p.b.register(at, cap).unwrap();
    let landed = || p.ba.stats().landed;
    for posted_first in [true, false] {
        for (i, &n) in sizes.iter().enumerate() {
            let send = || p.ab.send(&[(smrs[i], srcs[i].as_ptr() as usize, n)]).unwrap();
            let recv = |max| p.ba.recv(dmr, at, max).unwrap();
            // Posted after: the receive comes once the message has landed.
            let send_first = || {
                let before = landed();
                let s = send();
                testkit::wait_until("the message lands", PATIENCE, || landed() == before + 1);
                s
            };
            for max in [cap, n - 1] {
                dst.fill(0);
                let before = landed();
                let (r, s) = if posted_first {
                    let r = recv(max);
                    (r, send())
                } else {
                    let s = send_first();
                    (recv(max), s)
                };
                let what = format!("{n} bytes into {max}, posted first: {posted_first}");
                if max == cap {
                    assert_eq!(wait(&p.ab, s).unwrap(), n as u64, "{what}");
                    assert_eq!(wait(&p.ba, r).unwrap(), n as u64, "{what}");
                    assert_eq!(&dst[..n], &srcs[i][..], "{what}");
                    assert!(dst[n..].iter().all(|&b| b == 0), "{what}: bytes past the message untouched");
                } else {
                    // Too large for the receive: both fail, nothing lands.
                    assert_eq!(wait(&p.ab, s).unwrap_err().status(), UcclStatus::ErrMismatch, "{what}");
                    assert_eq!(wait(&p.ba, r).unwrap_err().status(), UcclStatus::ErrMismatch, "{what}");
                    assert!(dst.iter().all(|&b| b == 0), "{what}: a refused message wrote nothing");
                }
                assert_eq!(landed() - before, u64::from(!posted_first), "{what}: landed only when sent first");
            }
        }
    }
}

/// A connection that only serves (its peer's inline writes) has its control stream read by the
/// engine's control reactor; when its own callers then wait for inline replies, they take the
/// stream from the reactor and hand it back. Every transfer completes, with the right bytes, in
/// both phases and after the roles swap back, and none waits for a missed hand-back.
#[test]
fn inline_waits_take_the_stream_from_the_reactor_and_hand_it_back() {
    let p = pair();
    let mut at_b = vec![0u8; 8192];
    let mut at_a = vec![0u8; 8192];
    let bmr = p.b.register(at_b.as_mut_ptr() as usize, at_b.len()).unwrap();
    let amr = p.a.register(at_a.as_mut_ptr() as usize, at_a.len()).unwrap();
    let fifo_b = p.b.prepare_fifo(bmr, at_b.as_mut_ptr() as usize, at_b.len()).unwrap();
    let fifo_a = p.a.prepare_fifo(amr, at_a.as_mut_ptr() as usize, at_a.len()).unwrap();
    let mut src = pattern(8192, 1);
    let smr_a = p.a.register(src.as_mut_ptr() as usize, src.len()).unwrap();
    let smr_b = p.b.register(src.as_mut_ptr() as usize, src.len()).unwrap();
    let mut back = vec![0u8; 8192];
    let back_b = p.b.register(back.as_mut_ptr() as usize, back.len()).unwrap();

    let write = |conn: &Connection, mr, fifo, len: usize, seed: u64, src: &mut Vec<u8>| {
        src[..len].copy_from_slice(&pattern(len, seed));
        let id = conn.write(&[OneSided { mr, addr: src.as_ptr() as usize, len, remote: fifo }]).unwrap();
        assert_eq!(conn.wait(id).unwrap(), len as u64);
    };
    // A hand-back that missed its wake-up shows as a wait that ran out a whole read timeout
    // (100 ms), which the engines count: a loaded host makes waits slower, not run out.
    let slices = || p.a.wait_slices_run_out() + p.b.wait_slices_run_out();
    let before = slices();
    for round in 0..3 {
        // A serves B's memory: B's stream is read by B's control reactor alone.
        for i in 0..(3 * 32) {
            let len = 1 + (i * 61) % 8192;
            write(&p.ab, smr_a, fifo_b, len, (round * 1000 + i) as u64, &mut src);
            assert_eq!(&at_b[..len], &src[..len]);
        }
        // Now B waits on inline transfers of its own: writes into A, and reads of A's memory.
        for i in 0..40 {
            let len = 1 + (i * 211) % 8192;
            write(&p.ba, smr_b, fifo_a, len, (round * 1000 + 500 + i) as u64, &mut src);
            assert_eq!(&at_a[..len], &src[..len]);
            let id =
                p.ba.read(&[OneSided { mr: back_b, addr: back.as_mut_ptr() as usize, len, remote: fifo_a }]).unwrap();
            assert_eq!(p.ba.wait(id).unwrap(), len as u64);
            assert_eq!(&back[..len], &at_a[..len]);
        }
    }
    let slow = slices() - before;
    assert!(slow <= 3, "{slow} waits ran out their slice over 120 inline writes and their reads");
}

/// Small one-sided items in flight on the control stream are bounded: a vector of thousands of
/// inline-sized reads and writes (here 512 MiB each way) sends the excess as requests over the
/// channels, so neither end queues hundreds of MiB of inline replies for the other and the
/// connection survives, with every byte where it belongs.
#[test]
fn a_vector_of_many_small_items_keeps_inline_bytes_bounded() {
    let p = pair();
    let (items, item) = (8192usize, 64usize << 10);
    let total = items * item;
    let mut target = pattern(total, 31);
    let tmr = p.b.register(target.as_mut_ptr() as usize, total).unwrap();
    let fifo = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, total).unwrap();
    let mut local = vec![0u8; total];
    let lmr = p.a.register(local.as_mut_ptr() as usize, total).unwrap();
    let vector = |base: usize| -> Vec<OneSided> {
        (0..items)
            .map(|i| {
                let mut remote = fifo;
                remote.addr += (i * item) as u64;
                OneSided { mr: lmr, addr: base + i * item, len: item, remote }
            })
            .collect()
    };
    let r = p.ab.read(&vector(local.as_mut_ptr() as usize)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total as u64);
    assert!(local == target, "every item read");
    local.copy_from_slice(&pattern(total, 32));
    let w = p.ab.write(&vector(local.as_mut_ptr() as usize)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total as u64);
    assert!(target == local, "every item written");
}

/// Callers blocked in `Connection::wait` on transfers over the channels: writes (the caller reads
/// its Done on the control stream) and reads (with `caller_completes`, woken by the transport in
/// the progress thread's place), from several threads of one connection at once, with chunks of
/// other transfers completing meanwhile, and a refused read. Every wait returns with the right
/// bytes, none by a timeout's slice.
#[test]
fn callers_waiting_on_channel_transfers_finish_them() {
    for caller_completes in [false, true] {
        let p = common::pair(Config { caller_completes, ..config() });
        let size = 3 << 20;
        let mut remote = pattern(2 * size, 9);
        let rmr = p.b.register(remote.as_mut_ptr() as usize, remote.len()).unwrap();
        let fifo = p.b.prepare_fifo(rmr, remote.as_ptr() as usize, remote.len()).unwrap();
        let before = p.a.wait_slices_run_out();
        std::thread::scope(|sc| {
            let threads: Vec<_> = (0..3u64)
                .map(|t| {
                    let p = &p;
                    sc.spawn(move || {
                        let mut src = pattern(size / 4, t);
                        let mut back = vec![0u8; size / 4];
                        let smr = p.a.register(src.as_mut_ptr() as usize, src.len()).unwrap();
                        let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
                        // Each thread reads and writes its own quarter of the remote buffer.
                        let mut at = fifo;
                        at.addr += t * (size / 4) as u64;
                        for r in 0..24u64 {
                            let len = (64 << 10) + 1 + ((r * 7919 + t * 131) as usize * 4099) % (size / 4 - (64 << 10));
                            src[..len].copy_from_slice(&pattern(len, t * 100 + r));
                            let op = OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote: at };
                            let w = p.ab.write(&[op]).unwrap();
                            assert_eq!(p.ab.wait(w).unwrap(), len as u64, "thread {t} write {r}");
                            back[..len].fill(0);
                            let op = OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote: at };
                            let rd = p.ab.read(&[op]).unwrap();
                            assert_eq!(p.ab.wait(rd).unwrap(), len as u64, "thread {t} read {r}");
                            assert!(back[..len] == src[..len], "thread {t} round {r}: read back");
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|h| h.join().unwrap());
        });
        // A wake-up lost on either path (the write's Done, the read's last chunk) leaves every
        // round to a wait that runs out its slice, which the engine counts; a loaded machine makes
        // waits slower, and only one the peer's threads kept waiting a whole slice runs out.
        let slow = p.a.wait_slices_run_out() - before;
        assert!(slow <= 24, "caller_completes {caller_completes}: {slow} waits ran out their slice over 72 rounds");
        // A read the peer refuses ends with its Deny.
        let mut back = vec![0u8; 1 << 20];
        let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
        let mut stale = fifo;
        stale.addr += remote.len() as u64;
        let op = OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: 1 << 20, remote: stale };
        let rd = p.ab.read(&[op]).unwrap();
        assert!(p.ab.wait(rd).is_err(), "a read outside the advertised window is refused");
    }
}
