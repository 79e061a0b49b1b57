use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::pure::wire;
use super::*;
use crate::error::UcclStatus;
use crate::proto::testutil::XorShift;
use crate::transport::MrRun;
use crate::transport::testutil::{loopback_socket_net, pair, receive_counting_write_back, until, written_back_alone};
use crate::transport::{IoSeg, MemKind, MrHandle, RequestId};

#[test]
fn handle_round_trip_and_rejects_garbage() {
    let h = SocketHandle::new("127.0.0.1:4242".parse().unwrap(), 77, &[]);
    assert_eq!(SocketHandle::decode(&h.encode()).unwrap(), h);
    let v6 = SocketHandle::new("[::1]:9".parse().unwrap(), 1, &[]);
    assert_eq!(SocketHandle::decode(&v6.encode()).unwrap(), v6);
    let mut bad = h.encode();
    bad[0] ^= 1;
    assert!(SocketHandle::decode(&bad).is_err());
    let mut family = h.encode();
    family[4] = 9;
    assert!(SocketHandle::decode(&family).is_err());
    assert!(SocketHandle::decode(&[0u8; 128]).is_err());
}

#[test]
fn handles_carry_data_links_and_refuse_bad_ones() {
    let links: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(198, 18, i, 2)).collect();
    let h = SocketHandle::new("198.18.0.2:4242".parse().unwrap(), 77, &links);
    let back = SocketHandle::decode(&h.encode()).unwrap();
    assert_eq!(back, h);
    assert_eq!(&back.links[..back.nlinks], &links[..]);
    let mut many = h.encode();
    many[LINKS_AT + 2] = MAX_DATA_LINKS as u8 + 1;
    assert!(SocketHandle::decode(&many).unwrap_err().message().contains("data links"));
    let mut zero = h.encode();
    zero[LINKS_AT + 8..LINKS_AT + 12].fill(0);
    assert!(SocketHandle::decode(&zero).is_err(), "an unspecified link");
    // Whoever wraps the transport may write bytes 32..88 (the fake NIC does): no links there.
    let mut wrapped = SocketHandle::new("198.18.0.2:4242".parse().unwrap(), 77, &[]).encode();
    wrapped[32..88].fill(0x46);
    assert_eq!(SocketHandle::decode(&wrapped).unwrap().nlinks, 0);
    let mut wrapped = h.encode();
    wrapped[32..88].fill(0x46);
    assert_eq!(SocketHandle::decode(&wrapped).unwrap(), h, "nor do its bytes disturb the links");
}

/// Socket k of a comm goes from our link k to theirs, both lists taken in turn from the comm's
/// first link; where either side has no links, or they have other counts, every socket goes to
/// the handle's address.
#[test]
fn data_sockets_take_the_links_in_turn() {
    let addr: SocketAddr = "198.18.0.2:4242".parse().unwrap();
    let ours: Vec<Ipv4Addr> = (1..=2).map(|i| Ipv4Addr::new(198, 18, i, 1)).collect();
    let theirs: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(198, 18, i, 2)).collect();
    let routes = Routes::new(addr, ours.clone(), theirs[..2].to_vec(), 5);
    assert_eq!(routes.links(), 2);
    let got: Vec<Route> = (0..4).map(|k| routes.route(k)).collect();
    for (k, route) in got.iter().enumerate() {
        assert_eq!(route.to, SocketAddr::new(theirs[(5 + k) % 2].into(), 4242));
        assert_eq!(route.from, Some(ours[(5 + k) % 2]), "rank pairs with rank");
    }
    // Other counts could pair NICs of different networks: the handle's address for every socket.
    let uneven = Routes::new(addr, ours.clone(), theirs.clone(), 1);
    assert!(!uneven.over_links());
    assert_eq!((uneven.links(), uneven.route(2)), (1, Route { to: addr, from: None }));
    let none = Routes::new(addr, ours, Vec::new(), 0);
    assert_eq!((none.links(), none.route(3)), (1, Route { to: addr, from: None }));
}

/// The remote addresses of this process's sockets connected to `port`.
fn remote_addresses_to(port: u16) -> std::collections::BTreeSet<Ipv4Addr> {
    settled(|| {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let remote = line.split_whitespace().nth(2)?;
                let (ip, p) = remote.split_once(':')?;
                let ip = Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?));
                (u16::from_str_radix(p, 16).ok()? == port).then_some(ip)
            })
            .collect()
    })
}

/// Two nets with two data links each (127.0.0.1 and 127.0.0.2, both on the loopback interface):
/// a comm's sockets go to both of the listener's links, and messages arrive whole.
#[test]
fn a_comm_spreads_its_sockets_over_the_data_links() {
    let links: Vec<IpAddr> = vec![Ipv4Addr::new(127, 0, 0, 1).into(), Ipv4Addr::new(127, 0, 0, 2).into()];
    let net = loopback_socket_net()
        .with_options(crate::config::SocketConfig {
            nthreads: 1,
            lazy: false,
            subchunk: 16 << 10,
            ..Default::default()
        })
        .with_data_links(links);
    let (mut handle, mut listen) = net.listen(0).unwrap();
    let port = SocketHandle::decode(&handle).unwrap().addr.port();
    let mut tx = net.connect(0, &mut handle).unwrap().expect("socket connect completes at once");
    let mut rx = until(|| listen.accept()).unwrap();
    // Both sockets joined before the messages go: else the first may cut every piece alone.
    until(|| Ok(Some(()).filter(|_| net.data_socket_stats().sending == 2))).unwrap();
    let msgs: Vec<Vec<u8>> = (0..8).map(|i| (0..(300 << 10) + i).map(|b| (b * 7 + i) as u8).collect()).collect();
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 400 << 10]).collect();
    // Rounds of the eight messages until both links carried some: on a loaded machine one
    // socket's helper may cut every piece of a round before the other's gets a core.
    let mut rounds = 0u64;
    while rounds == 0 || tx.link_stats().iter().any(|l| l.bytes == 0) {
        assert!(rounds < 50, "one link carried every piece of {rounds} rounds: {:?}", tx.link_stats());
        // SAFETY: each buffer lives in `bufs` and is read only after its receive is reported done.
        let r: Vec<_> = bufs
            .iter_mut()
            .map(|b| unsafe { rx.irecv(b.as_mut_ptr(), b.len(), MrHandle::NONE) }.unwrap().unwrap())
            .collect();
        // SAFETY: each message lives in `msgs` until its send is tested to completion below.
        let s: Vec<_> =
            msgs.iter().map(|m| unsafe { tx.isend(m.as_ptr(), m.len(), MrHandle::NONE) }.unwrap().unwrap()).collect();
        for (i, id) in s.into_iter().enumerate() {
            assert_eq!(until(|| tx.test(id)).unwrap(), msgs[i].len());
        }
        for (i, id) in r.into_iter().enumerate() {
            assert_eq!(until(|| rx.test(id)).unwrap(), msgs[i].len());
            rx.irecv_consumed(id).unwrap();
            assert!(bufs[i][..msgs[i].len()] == msgs[i][..], "message {i} arrived whole");
            bufs[i].fill(0);
        }
        rounds += 1;
    }
    let remotes = remote_addresses_to(port);
    let want: std::collections::BTreeSet<Ipv4Addr> = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)].into();
    assert_eq!(remotes, want, "the comm's sockets reach the listener over both links");
    // Every byte of every message is counted once on each side, on the link that carried it; both
    // links carried some, and nothing failed.
    let sent: u64 = rounds * msgs.iter().map(|m| m.len() as u64).sum::<u64>();
    for (side, links) in [("send", tx.link_stats()), ("receive", rx.link_stats())] {
        let mut seen: Vec<IpAddr> = links.iter().map(|l| l.link).collect();
        seen.sort();
        assert_eq!(seen, vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])], "{side}: {links:?}");
        assert_eq!(links.iter().map(|l| l.bytes).sum::<u64>(), sent, "{side}: {links:?}");
        assert_eq!(links.iter().map(|l| l.sockets).sum::<u32>(), 2, "{side}: {links:?}");
        let pieces: u64 =
            rounds * msgs.iter().map(|m| wire::PieceCut::new(16 << 10, 2).pieces(m.len() as u64)).sum::<u64>();
        assert_eq!(links.iter().map(|l| l.pieces).sum::<u64>(), pieces, "{side}: {links:?}");
        assert!(links.iter().all(|l| l.bytes > 0 && l.errors == 0), "{side}: {links:?}");
    }
}

/// A net of one socket per comm, a pair of its comms, and the 64 KiB message and receive buffer
/// of the one message they exchanged (completed and consumed).
struct Exchanged {
    net: SocketNet,
    tx: Box<dyn SendComm>,
    rx: Box<dyn RecvComm>,
    msg: Vec<u8>,
    got: Vec<u8>,
}

fn one_socket_pair_after_a_message() -> Exchanged {
    let net = loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 1,
        nsocks_per_thread: 1,
        ..Default::default()
    });
    let (mut tx, mut rx) = pair(&net);
    let msg = vec![5u8; 64 << 10];
    let mut got = vec![0u8; 64 << 10];
    // SAFETY: both buffers outlive the requests, tested to completion here.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    until(|| tx.test(s)).unwrap();
    until(|| rx.test(r)).unwrap();
    rx.irecv_consumed(r).unwrap();
    Exchanged { net, tx, rx, msg, got }
}

/// A socket that fails counts an error on its link, and the bytes it moved before stay counted.
#[test]
fn a_failed_socket_counts_an_error_on_its_link() {
    let Exchanged { net: _net, mut tx, rx, msg, got: _got } = one_socket_pair_after_a_message();
    drop(rx);
    // The peer is gone: sends fail once the kernel reports the reset.
    let start = Instant::now();
    loop {
        // SAFETY: as above; a failed comm drops its requests before it reports the failure.
        match unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) } {
            Ok(Some(id)) if until(|| tx.test(id)).is_ok() => {}
            _ => break,
        }
        assert!(start.elapsed() < testkit::PATIENCE, "sends to a dropped peer kept succeeding");
    }
    let links = tx.link_stats();
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(links[0].bytes >= 64 << 10, "the bytes before the failure stay counted: {links:?}");
    assert_eq!(links[0].errors, 1, "{links:?}");
}

/// A send comm that closes between pieces ends its receive comm's sockets without an error on
/// their link; one that closes in the middle of a piece leaves one.
#[test]
fn a_sender_closing_between_pieces_is_no_link_error() {
    let Exchanged { net, tx, mut rx, msg: _msg, mut got } = one_socket_pair_after_a_message();
    drop(tx);
    // SAFETY: as above. The comm fails once its socket read the end of the stream: at the post
    // if it did already, else while the receive waits.
    let failed = match unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) } {
        Err(_) => true,
        Ok(Some(r)) => until(|| rx.test(r)).is_err(),
        Ok(None) => false,
    };
    assert!(failed, "a receive from a closed sender completed");
    let links = rx.link_stats();
    assert_eq!((links.len(), links[0].bytes, links[0].pieces, links[0].errors), (1, 64 << 10, 1, 0), "{links:?}");

    // A sender gone in the middle of a piece: a header and part of its payload, then the end.
    let (handle, mut listen) = net.listen(0).unwrap();
    let h = SocketHandle::decode(&handle).unwrap();
    let mut raw = TcpStream::connect(h.addr).unwrap();
    let hello = wire::SocketHello {
        listen_nonce: h.nonce,
        comm_id: 77,
        index: 0,
        count: 1,
        subchunk: 256 << 10,
        acked: false,
        spare: 0,
    };
    raw.write_all(&hello.encode()).unwrap();
    let mut rx = until(|| listen.accept()).unwrap();
    // SAFETY: as above.
    let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
    let piece = wire::PieceHeader { seq: 0, total: 64 << 10, offset: 0, len: 64 << 10 };
    raw.write_all(&piece.encode()).unwrap();
    raw.write_all(&[9u8; 1000]).unwrap();
    drop(raw);
    assert!(until(|| rx.test(r)).is_err(), "a receive cut off mid-piece completed");
    let links = rx.link_stats();
    assert_eq!((links.len(), links[0].pieces, links[0].errors), (1, 0, 1), "{links:?}");
}

#[test]
fn messages_complete_in_order_with_sender_sizes() {
    let net = loopback_socket_net();
    let (mut tx, mut rx) = pair(&net);
    let msgs: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; 1 + i * 1000]).collect();
    let mut bufs: Vec<Vec<u8>> = (0..20).map(|_| vec![0u8; 32 << 10]).collect();
    let mut rreqs = Vec::new();
    let mut sreqs = Vec::new();
    // 16 receives fit the window; the 17th must wait for a consume.
    for b in bufs.iter_mut().take(16) {
        // SAFETY: each b is a live 32 KiB Vec in bufs, read only after its receive is reported done, and
        // every one of these receives completes before the test ends.
        rreqs.push(unsafe { rx.irecv(b.as_mut_ptr(), b.len(), MrHandle::NONE) }.unwrap().unwrap());
    }
    // SAFETY: bufs[16] is a live Vec; the window is full, so the receive is refused and nothing keeps the
    // pointer.
    assert!(unsafe { rx.irecv(bufs[16].as_mut_ptr(), 1, MrHandle::NONE) }.unwrap().is_none(), "window of 16");
    for m in msgs.iter().take(16) {
        // SAFETY: each m is a live Vec in msgs, and every send is tested to completion below.
        sreqs.push(unsafe { tx.isend(m.as_ptr(), m.len(), MrHandle::NONE) }.unwrap().unwrap());
    }
    for (i, r) in sreqs.into_iter().enumerate() {
        assert_eq!(until(|| tx.test(r)).unwrap(), msgs[i].len());
    }
    for (i, r) in rreqs.into_iter().enumerate() {
        assert_eq!(until(|| rx.test(r)).unwrap(), msgs[i].len(), "receive reports the sender's size");
        assert_eq!(&bufs[i][..msgs[i].len()], &msgs[i][..]);
        rx.irecv_consumed(r).unwrap();
    }
}

#[test]
fn test_and_consume_out_of_order_are_errors() {
    let net = loopback_socket_net();
    let (mut tx, mut rx) = pair(&net);
    let data = [1u8; 8];
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    // SAFETY: data is a live 8-byte array and both sends are tested to completion below.
    let s0 = unsafe { tx.isend(data.as_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: data is a live 8-byte array and both sends are tested to completion below.
    let s1 = unsafe { tx.isend(data.as_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    assert!(tx.test(s1).is_err(), "only the oldest request may be tested");
    // SAFETY: a is a live 8-byte array, read by nobody else until r0 is tested to completion below.
    let r0 = unsafe { rx.irecv(a.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: b is a live 8-byte array, read by nobody else until r1 is tested to completion below.
    let r1 = unsafe { rx.irecv(b.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    assert!(rx.irecv_consumed(r0).is_err(), "consume before completion");
    until(|| tx.test(s0)).unwrap();
    until(|| tx.test(s1)).unwrap();
    until(|| rx.test(r0)).unwrap();
    until(|| rx.test(r1)).unwrap();
    assert!(rx.irecv_consumed(r1).is_err(), "consume out of order");
    rx.irecv_consumed(r0).unwrap();
    rx.irecv_consumed(r1).unwrap();
    assert!(tx.test(RequestId(99)).is_err());
    assert_eq!(rx.reg_mr(0, 1, MemKind::Cuda { device: 0 }).unwrap_err().status(), UcclStatus::ErrNotSupported);
    assert_eq!(tx.reg_mr(0x1000, 1, MemKind::Host).unwrap(), MrHandle::NONE);
}

#[test]
fn oversized_message_fails_the_receive_without_overflow() {
    let net = loopback_socket_net();
    let (mut tx, mut rx) = pair(&net);
    let data = [7u8; 100];
    let mut buf = vec![0u8; 150];
    // SAFETY: buf is a live 150-byte Vec (50 are posted), checked only after the receive has failed.
    let r = unsafe { rx.irecv(buf.as_mut_ptr(), 50, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: data is a live 100-byte array that stays in scope until the receive has read this message's
    // header and failed on it.
    unsafe { tx.isend(data.as_ptr(), data.len(), MrHandle::NONE) }.unwrap().unwrap();
    let err = until(|| rx.test(r)).unwrap_err();
    assert!(err.message().contains("100-byte message into a 50-byte receive"), "{err}");
    assert!(buf.iter().all(|b| *b == 0), "nothing was written");
}

#[test]
fn peer_drop_surfaces_as_error_and_drop_unblocks_pending_receive() {
    let net = loopback_socket_net();
    let (tx, mut rx) = pair(&net);
    let mut buf = [0u8; 8];
    // SAFETY: buf is a live 8-byte array; the receive ends (with the peer's disconnect) before buf is reused.
    let r = unsafe { rx.irecv(buf.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    drop(tx);
    let err = until(|| rx.test(r)).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");

    let (_tx2, mut rx2) = pair(&net);
    // SAFETY: buf is a live 8-byte array that outlives rx2, which is dropped below with the receive still
    // posted.
    let r = unsafe { rx2.irecv(buf.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    assert!(rx2.test(r).unwrap().is_none());
    // Nothing will complete the receive: the drop returns without waiting for it.
    testkit::within(testkit::PATIENCE, "dropping a comm with a blocked receive", move || drop(rx2));
}

#[test]
fn stray_connection_without_nonce_is_ignored() {
    let net = loopback_socket_net();
    let (handle, mut listen) = net.listen(0).unwrap();
    let h = SocketHandle::decode(&handle).unwrap();
    let mut stray = std::net::TcpStream::connect(h.addr).unwrap();
    stray.write_all(&[0u8; wire::HELLO_LEN]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        assert!(listen.accept().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Cuts `total` bytes into segments of the given sizes (cycled), each `gap` bytes after the last
/// within `buf`; returns the segments.
fn segments(buf: &mut [u8], total: usize, sizes: &[usize], gap: usize) -> Vec<IoSeg> {
    let mut segs = Vec::new();
    let (mut at, mut left) = (0, total);
    for &size in sizes.iter().cycle() {
        if left == 0 {
            break;
        }
        let len = size.min(left);
        assert!(at + len <= buf.len(), "test buffer too small");
        segs.push(IoSeg { addr: buf.as_mut_ptr() as usize + at, len });
        at += len + gap;
        left -= len;
    }
    segs
}

fn gather(segs: &[IoSeg]) -> Vec<u8> {
    // SAFETY: test segments lie in live buffers.
    segs.iter().flat_map(|s| unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.len) }.to_vec()).collect()
}

/// One message of `total` bytes from `send_sizes` segments into `recv_sizes` segments (empty: a
/// plain contiguous request on that side), checked byte for byte, gaps untouched.
fn move_vectored(net: &SocketNet, total: usize, send_sizes: &[usize], recv_sizes: &[usize]) {
    let (mut tx, mut rx) = pair(net);
    let mut src = vec![0u8; 2 * total + (8 << 10)];
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    let mut dst = vec![0xeeu8; 3 * total + (8 << 10)];
    let send_segs = if send_sizes.is_empty() {
        vec![IoSeg { addr: src.as_ptr() as usize, len: total }]
    } else {
        segments(&mut src, total, send_sizes, 3)
    };
    let recv_segs = if recv_sizes.is_empty() {
        vec![IoSeg { addr: dst.as_mut_ptr() as usize, len: total }]
    } else {
        segments(&mut dst, total, recv_sizes, 5)
    };
    // SAFETY: both segment lists lie in buffers that outlive the requests (tested to completion below).
    let r = unsafe { rx.irecvv(&recv_segs, &MrRun::all(&recv_segs, MrHandle::NONE)) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isendv(&send_segs, &MrRun::all(&send_segs, MrHandle::NONE)) }.unwrap().unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), total);
    assert_eq!(until(|| rx.test(r)).unwrap(), total);
    rx.irecv_consumed(r).unwrap();
    assert!(gather(&recv_segs) == gather(&send_segs), "{total} bytes {send_sizes:?} -> {recv_sizes:?} arrived intact");
    let landed: usize = recv_segs.iter().map(|s| s.len).sum();
    let untouched = dst.iter().filter(|&&b| b == 0xee).count();
    assert!(untouched >= dst.len() - landed, "nothing outside the segments was written");
}

fn small_pieces_net(threads: u8, socks: u8) -> SocketNet {
    loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: threads,
        nsocks_per_thread: socks,
        subchunk: 16 << 10,
        ..Default::default()
    })
}

#[test]
fn vectored_requests_gather_and_scatter_across_piece_boundaries() {
    for net in [small_pieces_net(1, 1), small_pieces_net(2, 2)] {
        // Segment sizes that are not page multiples and cross the 16 KiB pieces at odd offsets.
        move_vectored(&net, 100_000, &[4096, 1, 12_345, 16 << 10, 777], &[10_000, 3, 16_385]);
        move_vectored(&net, 100_000, &[7000], &[]);
        move_vectored(&net, 100_000, &[], &[5000, 1]);
        move_vectored(&net, 64 << 10, &[16 << 10], &[16 << 10]);
        // More segments in one piece than one sendmsg / recvmsg takes.
        move_vectored(&net, 40_000, &[7], &[13]);
        // Small enough for the posting thread to send it itself.
        move_vectored(&net, 3000, &[100, 900], &[1500]);
    }
    move_vectored(&small_pieces_net(2, 1), 200_000, &[20_000, 4096], &[9999]);
}

/// `n` segment sizes from a seeded xorshift: below 2 KiB (through the helpers' bounce buffers)
/// but one in `large_one_in` from 2 to 10 KiB (each an iovec of its own).
fn random_sizes(seed: u64, n: usize, large_one_in: usize) -> Vec<usize> {
    let mut rng = XorShift::new(seed);
    (0..n)
        .map(
            |_| {
                if rng.below(large_one_in) == 0 { (2 << 10) + rng.below(8 << 10) } else { 1 + rng.below((2 << 10) - 1) }
            },
        )
        .collect()
}

/// Requests of many small segments, their sizes random and their addresses at any alignment,
/// alone or among large ones, on either end or both: every byte lands in place, across the
/// pieces (16 KiB, and the default's 256 KiB, which span several bounce buffers' worth).
#[test]
fn many_small_segments_land_in_place_both_ways_and_among_large_ones() {
    let small = random_sizes(1, 97, usize::MAX);
    let other = random_sizes(2, 89, usize::MAX);
    let mixed = random_sizes(3, 61, 4);
    for net in [loopback_socket_net(), small_pieces_net(2, 2)] {
        move_vectored(&net, 600_000, &small, &[]);
        move_vectored(&net, 600_000, &[], &other);
        move_vectored(&net, 600_000, &small, &other);
        move_vectored(&net, 600_000, &mixed, &small);
        move_vectored(&net, 600_000, &other, &mixed);
        // The KV shape: blocks of 512 B on both ends.
        move_vectored(&net, 600_000, &[512], &[512]);
        // Small enough for the posting thread to send it itself.
        move_vectored(&net, 9000, &small, &mixed);
    }
}

#[test]
fn vectored_receive_takes_a_shorter_message_and_refuses_nothing_empty() {
    let net = small_pieces_net(1, 1);
    let (mut tx, mut rx) = pair(&net);
    let msg: Vec<u8> = (0..30_000).map(|i| i as u8).collect();
    let mut dst = vec![0u8; 60_000];
    let recv_segs = segments(&mut dst, 50_000, &[20_000], 100);
    // SAFETY: the segments and the message outlive the requests (tested to completion below).
    let r = unsafe { rx.irecvv(&recv_segs, &MrRun::all(&recv_segs, MrHandle::NONE)) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), 30_000);
    assert_eq!(until(|| rx.test(r)).unwrap(), 30_000, "the sender's size");
    assert_eq!(&dst[..20_000], &msg[..20_000]);
    assert_eq!(&dst[20_100..30_100], &msg[20_000..]);
    // SAFETY: no segment, nothing to keep valid.
    let err = unsafe { tx.isendv(&[], &[]) }.unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{err}");
}

/// Every comm of a net shares its helpers: 32 comm pairs of 2 sockets each (64 sockets each way)
/// run on the 3 senders and 3 receivers the options allow, and the helpers end with the last
/// socket they serve.
#[test]
fn helpers_are_shared_bounded_and_end_with_their_last_socket() {
    let net = loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 2,
        nsocks_per_thread: 1,
        helpers: 3,
        subchunk: 16 << 10,
        ..Default::default()
    });
    assert_eq!(net.helper_threads(), 0, "no comm, no helper");
    let mut pairs: Vec<_> = (0..32).map(|_| pair(&net)).collect();
    assert_eq!(net.helper_threads(), 6, "3 senders and 3 receivers serve every socket");
    // Two pieces each, so both sockets of every comm carry one.
    let msg: Vec<u8> = (0..32 << 10).map(|i| (i % 251) as u8).collect();
    let mut bufs = vec![vec![0u8; msg.len()]; pairs.len()];
    let mut reqs = Vec::new();
    for ((tx, rx), buf) in pairs.iter_mut().zip(bufs.iter_mut()) {
        // SAFETY: buf and msg outlive the requests, which are tested to completion below.
        let r = unsafe { rx.irecv(buf.as_mut_ptr(), buf.len(), MrHandle::NONE) }.unwrap().unwrap();
        // SAFETY: as above.
        let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
        reqs.push((s, r));
    }
    for ((tx, rx), (s, r)) in pairs.iter_mut().zip(reqs) {
        assert_eq!(until(|| tx.test(s)).unwrap(), msg.len());
        assert_eq!(until(|| rx.test(r)).unwrap(), msg.len());
    }
    assert!(bufs.iter().all(|b| *b == msg), "every comm's message arrived intact");
    // Each two-piece message made its comm add its second socket.
    let grown = |s: DataSocketStats| (s.sending == 64 && s.receiving == 64).then_some(());
    until(|| Ok(grown(net.data_socket_stats()))).unwrap();
    // Every comm has all its sockets: their listeners closed, and the thread that kept them ended.
    until(|| Ok((net.acceptor_threads() == 0).then_some(()))).unwrap();
    pairs.truncate(1);
    assert_eq!(net.helper_threads(), 4, "helpers still serving the last comm's two sockets each way stay");
    drop(pairs);
    assert_eq!(net.helper_threads(), 0, "the last comm's drop ended the helpers");
    assert_eq!(net.data_socket_stats(), DataSocketStats { added: 32, ..Default::default() });
}

/// A comm's helpers start when it is made, one per socket it may open: the sockets a lazy comm adds
/// at its first large request find theirs running, and no thread starts on the way of a transfer.
#[test]
fn helpers_start_with_the_comm_not_with_its_first_large_request() {
    let net = loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 2,
        nsocks_per_thread: 2,
        helpers: 6,
        subchunk: 16 << 10,
        ..Default::default()
    });
    let (mut tx, mut rx) = pair(&net);
    assert_eq!(net.helper_threads(), 8, "4 senders and 4 receivers for the comm's 4 sockets each way");
    let starts = net.helper_starts();
    assert_eq!(net.data_socket_stats().sending, 1, "a lazy comm opened one socket so far");
    // Four pieces: the comm adds its three other sockets.
    let msg: Vec<u8> = (0..(64 << 10) + 100).map(|i| (i % 253) as u8).collect();
    let mut buf = vec![0u8; msg.len()];
    // SAFETY: buf and msg outlive the requests, tested to completion below.
    let r = unsafe { rx.irecv(buf.as_mut_ptr(), buf.len(), MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), msg.len());
    assert_eq!(until(|| rx.test(r)).unwrap(), msg.len());
    assert_eq!(buf, msg);
    let grown = |s: DataSocketStats| (s.sending == 4 && s.receiving == 4).then_some(());
    until(|| Ok(grown(net.data_socket_stats()))).unwrap();
    assert_eq!(net.helper_starts(), starts, "no helper started for the added sockets");
    assert_eq!(net.helper_threads(), 8);
    drop((tx, rx));
    assert_eq!(net.helper_threads(), 0, "the comm's helpers end with it");
}

/// A listener outlives its listen comm while a comm of it may still take sockets, on the net's
/// acceptor thread, and closes with the last such comm.
#[test]
fn listeners_stay_open_for_comms_that_may_grow() {
    let net = four_socket_net();
    let (mut handle, mut listen) = net.listen(0).unwrap();
    let port = SocketHandle::decode(&handle).unwrap().addr.port();
    let tx = net.connect(0, &mut handle).unwrap().unwrap();
    let rx = until(|| listen.accept()).unwrap();
    assert_eq!(net.acceptor_threads(), 1, "later sockets are read whether or not the listen comm is polled");
    drop(listen);
    assert_eq!(net.acceptor_threads(), 1);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "the listener is open");
    drop(rx);
    until(|| Ok((net.acceptor_threads() == 0).then_some(()))).unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the listener closed with its comm");
    drop(tx);
}

/// Sockets this process holds a descriptor of that are connected to `port` (other tests of this
/// binary open and close descriptors meanwhile, so a plain count would not tell).
fn sockets_to(port: u16) -> usize {
    sockets_to_in(port, None)
}

/// The same, only those in TCP state `state` (the kernel's hex code: 02 is SYN_SENT).
fn sockets_to_in(port: u16, state: Option<&str>) -> usize {
    settled(|| {
        let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|t| Some(t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned()))
            .collect();
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let remote_port = f[2].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                let wanted = remote_port == Some(port) && ours.contains(f[9]) && state.is_none_or(|st| f[3] == st);
                wanted.then(|| f[9].to_owned())
            })
            .collect::<std::collections::BTreeSet<String>>()
    })
    .len()
}

/// What `read` gives twice in a row. The kernel hands `/proc/net/tcp` out a page at a time, so a
/// read that races with other sockets opening or closing (other tests of this process) can list
/// an entry twice or miss one; entries are keyed by inode and the reading is repeated until stable.
fn settled<T: PartialEq>(read: impl Fn() -> T) -> T {
    let mut last = read();
    for _ in 0..50 {
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("/proc/net/tcp did not settle in 50 reads");
}

/// A peer's listener whose handle our net connects to, with the test reading what arrives.
fn raw_peer() -> (TcpListener, NetHandle, u64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let nonce = 0x1234_5678;
    let handle = SocketHandle::new(listener.local_addr().unwrap(), nonce, &[]).encode();
    (listener, handle, nonce)
}

fn four_socket_net() -> SocketNet {
    loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 4,
        nsocks_per_thread: 1,
        ..Default::default()
    })
}

/// A comm whose added sockets are all refused (the listener went away after the first) moves a
/// multi-piece request over its first socket alone, byte for byte, and says so once.
#[test]
fn a_send_comm_whose_added_sockets_fail_goes_on_with_its_first() {
    let net = four_socket_net();
    let (listener, mut handle, nonce) = raw_peer();
    let mut tx = net.connect(0, &mut handle).unwrap().unwrap();
    let (mut first, _) = listener.accept().unwrap();
    drop(listener);
    let mut hello = [0u8; wire::HELLO_LEN];
    first.read_exact(&mut hello).unwrap();
    let hello = SocketHello::decode(&hello, nonce).unwrap();
    assert_eq!((hello.index, hello.count), (0, 4));
    let msg: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    // SAFETY: msg outlives the send, which is tested to completion below.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    let mut got = vec![0u8; msg.len()];
    let cut = wire::PieceCut::new(hello.subchunk as usize, 4);
    for _ in 0..cut.pieces(msg.len() as u64) {
        let mut header = [0u8; wire::PIECE_HEADER_LEN];
        first.read_exact(&mut header).unwrap();
        let h = wire::PieceHeader::decode(&header, cut).unwrap();
        first.read_exact(&mut got[h.offset as usize..][..h.len as usize]).unwrap();
    }
    assert_eq!(until(|| tx.test(s)).unwrap(), msg.len());
    assert!(got == msg, "every piece came over the first socket intact");
    // Their helpers see the refusals when they next run.
    let stats = until(|| Ok(Some(net.data_socket_stats()).filter(|s| s.given_up == 3))).unwrap();
    assert_eq!((stats.sending, stats.added), (1, 3), "{stats:?}");
    drop(tx);
    assert_eq!(net.helper_threads(), 0);
}

/// Dropping a send comm whose added sockets wait for an acknowledgement that never comes returns
/// at once and leaves no thread or descriptor behind.
#[test]
fn dropping_a_comm_with_sockets_still_joining_leaves_nothing() {
    let net = four_socket_net();
    let (listener, mut handle, _) = raw_peer();
    let port = listener.local_addr().unwrap().port();
    let mut tx = net.connect(0, &mut handle).unwrap().unwrap();
    let msg = vec![5u8; 1 << 20];
    // SAFETY: msg outlives the comm, which is dropped below with the send still in flight.
    unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    // The added sockets connect (the kernel completes them into the backlog) and wait.
    assert_eq!(net.data_socket_stats().added, 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(net.data_socket_stats().sending, 1, "no acknowledgement, no added socket in use");
    assert_eq!(sockets_to(port), 4);
    // Nothing will acknowledge the added sockets: the drop returns without waiting for them.
    testkit::within(testkit::PATIENCE, "the drop", move || drop(tx));
    assert_eq!(net.helper_threads(), 0);
    assert_eq!(sockets_to(port), 0, "every socket of the comm was closed");
    assert_eq!(net.data_socket_stats().sending, 0);
    drop(listener);
}

/// Without lazy sockets a comm opens all of its sockets right after connect, traffic or not.
#[test]
fn eager_comms_open_every_socket_at_once() {
    let net = loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 4,
        nsocks_per_thread: 1,
        lazy: false,
        ..Default::default()
    });
    let (_tx, _rx) = pair(&net);
    let all = |s: DataSocketStats| (s.sending == 4 && s.receiving == 4).then_some(s);
    let stats = until(|| Ok(all(net.data_socket_stats()))).unwrap();
    assert_eq!((stats.added, stats.given_up, stats.refused), (3, 0, 0));
}

/// Comms whose sockets all arrive before the listen comm is polled again, read by the acceptor
/// (which watches the listener for a comm handed out earlier): each is handed out with every
/// socket, including those that came after its first while it waited to be handed out.
#[test]
fn comms_read_by_the_acceptor_are_handed_out_with_all_their_sockets() {
    let net = loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 4,
        nsocks_per_thread: 1,
        lazy: false,
        ..Default::default()
    });
    let (mut handle, mut listen) = net.listen(0).unwrap();
    let first = net.connect(0, &mut handle).unwrap().unwrap();
    let first_rx = until(|| listen.accept()).unwrap();
    let later: Vec<_> = (0..3).map(|_| net.connect(0, &mut handle).unwrap().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let later_rx: Vec<_> = (0..3).map(|_| until(|| listen.accept()).unwrap()).collect();
    let all = |s: DataSocketStats| (s.sending == 16 && s.receiving == 16).then_some(s);
    let stats = until(|| Ok(all(net.data_socket_stats()))).unwrap();
    assert_eq!((stats.added, stats.given_up, stats.refused), (12, 0, 0), "{stats:?}");
    drop((first, first_rx, later, later_rx, listen));
}

/// The same while the added sockets' connects cannot even complete: the peer's accept queue is
/// full (its first socket fills it), so the kernel drops their SYNs and they stay connecting.
#[test]
fn dropping_a_comm_with_sockets_still_connecting_leaves_nothing() {
    let net = four_socket_net();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    sock.listen(0).unwrap();
    let listener = TcpListener::from(sock);
    let addr = listener.local_addr().unwrap();
    let mut handle = SocketHandle::new(addr, 1, &[]).encode();
    let mut tx = net.connect(0, &mut handle).unwrap().unwrap();
    let msg = vec![5u8; 1 << 20];
    // SAFETY: msg outlives the comm, which is dropped below with the send still in flight.
    unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
    assert_eq!(net.data_socket_stats().added, 3);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sockets_to(addr.port()), 4, "the first socket and three more");
    assert_eq!(sockets_to_in(addr.port(), Some("02")), 3, "the three added ones still connecting");
    // The added sockets never finish connecting: the drop returns without waiting for them.
    testkit::within(testkit::PATIENCE, "the drop", move || drop(tx));
    assert_eq!(net.helper_threads(), 0);
    assert_eq!(sockets_to(addr.port()), 0, "every socket of the comm was closed");
    assert_eq!(net.data_socket_stats().sending, 0);
    drop(listener);
}

/// A net whose send comms open `sockets` sockets at once, each on a sending helper of its own, cut
/// 16 KiB pieces, and have sleeping helpers woken `fanout` at a time; `spin`: how long a helper polls
/// after its last piece (`None`: the default).
pub(super) fn eager_net(sockets: u8, fanout: u8, spin: Option<Duration>) -> SocketNet {
    let d = crate::config::SocketConfig::default();
    loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: sockets,
        nsocks_per_thread: 1,
        helpers: sockets,
        subchunk: 16 << 10,
        lazy: false,
        kick_fanout: fanout,
        spin: spin.unwrap_or(d.spin),
        ..d
    })
}

/// A send comm of `net` (the only one of the net) and its receive comm, once all `sockets` of them
/// are open both ways.
pub(super) fn eager_pair(net: &SocketNet, sockets: u64) -> (comm::SocketSendComm, Box<dyn RecvComm>) {
    let (handle, mut listen) = net.listen(0).unwrap();
    let tx = net.connect_comm(0, &handle).unwrap();
    let rx = until(|| listen.accept()).unwrap();
    let all = |s: DataSocketStats| (s.sending == sockets && s.receiving == sockets).then_some(());
    until(|| Ok(all(net.data_socket_stats()))).unwrap();
    (tx, rx)
}

/// Requests of 16 pieces posted while every sending helper sleeps: with a fan-out of 2 the poster
/// wakes two and owes the other kicks, which the running sockets pass on until none is left; every
/// request arrives intact. Without fan-out nothing is ever owed.
#[test]
fn kicks_owed_by_a_post_all_go_out_and_its_request_arrives_intact() {
    for fanout in [2u8, 0] {
        let net = eager_net(16, fanout, None);
        let (mut tx, mut rx) = eager_pair(&net, 16);
        let msg: Vec<u8> = (0..256 << 10).map(|i| (i * 13 % 251) as u8).collect();
        assert_eq!(wire::PieceCut::new(16 << 10, 16).pieces(msg.len() as u64), 16);
        for _ in 0..6 {
            // Past any helper's polling after its last piece: they all sleep in epoll_wait.
            std::thread::sleep(Duration::from_millis(20));
            let mut got = vec![0u8; msg.len()];
            // Arrived intact, every round, whatever the fan-out.
            crate::transport::testutil::exchange(&mut tx, &mut *rx, &msg, &mut got);
            // No owed kick is left behind: each was passed on (or its socket ran anyway).
            let relay = tx.relay();
            let counted = || (relay.counted.0.load(Ordering::Relaxed), relay.counted.1.load(Ordering::Relaxed));
            until(|| Ok((relay.owed() == 0 && counted().0 == counted().1).then_some(()))).unwrap();
        }
        let owed = tx.relay().counted.0.load(Ordering::Relaxed);
        if fanout == 0 {
            assert_eq!(owed, 0, "without fan-out the poster kicks every socket itself");
        } else {
            assert!(owed > 0, "sleeping helpers past the fan-out had their kicks owed");
        }
    }
}

/// Helpers poll after the pieces of small requests only: with a minute's poll and a 64 KiB bound,
/// every helper sleeps soon after a 256 KiB request, while one polls on after a 32 KiB one.
#[test]
fn helpers_poll_after_small_requests_and_sleep_after_large_ones() {
    let d = crate::config::SocketConfig::default();
    let net = loopback_socket_net().with_options(crate::config::SocketConfig {
        nthreads: 4,
        nsocks_per_thread: 1,
        helpers: 4,
        subchunk: 16 << 10,
        lazy: false,
        spin: Duration::from_secs(60),
        spin_max_request: 64 << 10,
        // Turns of the process's other tests' helpers leave this one's free.
        spinners: 1024,
        ..d
    });
    let (mut tx, mut rx) = eager_pair(&net, 4);
    let mut transfer = |len: usize| {
        let msg: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let mut got = vec![0u8; len];
        // SAFETY: got and msg outlive both requests, which are tested to completion below.
        let r = unsafe { rx.irecv(got.as_mut_ptr(), got.len(), MrHandle::NONE) }.unwrap().unwrap();
        // SAFETY: as above.
        let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
        assert_eq!(until(|| tx.test(s)).unwrap(), len);
        assert_eq!(until(|| rx.test(r)).unwrap(), len);
        rx.irecv_consumed(r).unwrap();
        assert!(got == msg, "{len} bytes arrived intact");
    };
    let all_asleep_within = |limit: Duration| {
        let start = Instant::now();
        while start.elapsed() < limit {
            if net.awake_helpers() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    };
    transfer(256 << 10);
    assert!(all_asleep_within(testkit::PATIENCE), "a helper polled after a piece of a 256 KiB request");
    transfer(32 << 10);
    std::thread::sleep(Duration::from_millis(50));
    assert!(net.awake_helpers() > 0, "no helper polled after the pieces of a 32 KiB request");
}

/// A send comm dropped with kicks owed (some by its post, all of them by hand on odd rounds, with
/// nobody running to pass them on) returns at once and leaves no helper behind.
#[test]
fn dropping_a_comm_with_kicks_owed_returns_and_leaves_no_helper() {
    let net = eager_net(16, 2, None);
    for round in 0..4 {
        let msg = vec![9u8; 1 << 20];
        let (mut tx, rx) = eager_pair(&net, 16);
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: msg outlives the comm, which is dropped below with the send in flight (no receive
        // is posted for it).
        unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle::NONE) }.unwrap().unwrap();
        if round % 2 == 1 {
            tx.relay().owe(u64::from(u16::MAX));
        }
        // Nobody passes the kicks on: the drop returns without waiting for them.
        testkit::within(testkit::PATIENCE, &format!("round {round}: the drop"), move || drop(tx));
        drop(rx);
        assert_eq!(net.helper_threads(), 0, "round {round}");
        assert_eq!(net.data_socket_stats().sending, 0);
    }
}

#[test]
fn receives_into_memory_read_by_dma_are_written_back_and_arrive_whole() {
    let _alone = written_back_alone();
    let net = loopback_socket_net();
    let (mut tx, mut rx) = pair(&net);
    let len = 3 << 20;
    let msg: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4099) as u8).collect();
    let mut slots = vec![0u8; 2 * len];
    let mut plain = vec![0u8; len];
    if !rx.write_back_received(slots.as_mut_ptr() as usize, len) {
        assert!(!write_back::supported(), "the comm refused though the CPU can write lines back");
        return;
    }
    let move_into = |tx: &mut Box<dyn SendComm>, rx: &mut Box<dyn RecvComm>, dst: &mut [u8]| {
        receive_counting_write_back(tx, rx, &msg, dst)
    };
    assert!(
        move_into(&mut tx, &mut rx, &mut slots[..len]) >= len as u64,
        "a receive inside the range is written back whole"
    );
    assert_eq!(move_into(&mut tx, &mut rx, &mut plain), 0, "a receive elsewhere is not");
    assert_eq!(move_into(&mut tx, &mut rx, &mut slots[len / 2..len / 2 + len]), 0, "nor one reaching past the range");
    // Four receives posted before any byte comes: only the last two, whose copy up no later
    // arrival would hide, are written back.
    let part = len / 4;
    let before = written_back_bytes();
    let recvs: Vec<_> = (0..4)
        .map(|k| {
            // SAFETY: slots outlives the receives, each tested done below; the four parts are disjoint.
            unsafe { rx.irecv(slots.as_mut_ptr().add(k * part), part, MrHandle::NONE) }.unwrap().unwrap()
        })
        .collect();
    for k in 0..4 {
        // SAFETY: msg outlives the send, tested done right away.
        let s = unsafe { tx.isend(msg.as_ptr().add(k * part), part, MrHandle::NONE) }.unwrap().unwrap();
        assert_eq!(until(|| tx.test(s)).unwrap(), part);
    }
    for r in recvs {
        assert_eq!(until(|| rx.test(r)).unwrap(), part);
        rx.irecv_consumed(r).unwrap();
    }
    assert!(slots[..4 * part] == msg[..4 * part], "every byte as sent");
    assert_eq!(written_back_bytes() - before, 2 * part as u64);
}

/// A comm's added sockets leave each step of their join in the trace: the sender starting to dial
/// it, the receiving side filing it (its comm took it), the sender reading its acknowledgement, in
/// that order for every socket; none refused.
#[test]
fn an_added_socket_is_traced_from_its_dial_to_its_acknowledgement() {
    crate::trace::record_in_memory(crate::trace::SOCKET);
    let net = four_socket_net();
    let (handle, mut listen) = net.listen(0).unwrap();
    let mut tx = net.connect_comm(0, &handle).unwrap();
    let mut rx = until(|| listen.accept()).unwrap();
    let comm = tx.comm_id();
    // Four pieces of 128 KiB: the comm opens its three other sockets.
    let msg: Vec<u8> = (0..512 << 10).map(|i| (i % 249) as u8).collect();
    let mut buf = vec![0u8; msg.len()];
    let steps = || crate::trace::recorded_of_comm(comm, &["sock_dial", "sock_filed", "sock_opened"]);
    while steps().iter().filter(|e| e.1 == "sock_opened").count() < 3 {
        crate::transport::testutil::exchange(&mut tx, &mut *rx, &msg, &mut buf);
    }
    let steps = steps();
    assert!(
        steps.iter().all(|(_, label, f)| *label != "sock_filed" || f["taken"] == 1),
        "no added socket refused: {steps:?}"
    );
    for k in 1..4u64 {
        let at = |label: &str| {
            let mine: Vec<u64> =
                steps.iter().filter(|(_, l, f)| *l == label && f["socket"] == k).map(|(t, _, _)| *t).collect();
            assert_eq!(mine.len(), 1, "one {label} for socket {k}: {steps:?}");
            mine[0]
        };
        let (d, f, o) = (at("sock_dial"), at("sock_filed"), at("sock_opened"));
        assert!(d <= f && f <= o, "socket {k}: dialed at {d}, filed at {f}, opened at {o}");
    }
}
