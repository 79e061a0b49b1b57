//! The socket transport under concurrency, through its comms directly: many requests of random sizes
//! in flight on several comms at once, with one socket per comm and with many sockets per comm and
//! small pieces (so requests are spread over sockets and reassembled), every byte checked.

use std::time::Duration;

use uccl_tcpx::SocketConfig;
use uccl_tcpx::internal::transport::{MrHandle, Net, RecvComm, RequestId, SendComm};

mod common;
use common::comm::comm_pair;
use common::socket::socket_net;
use common::{Rng, TRANSFER_LIMIT as LIMIT, drive, pattern};

/// Sizes that hit the edges: empty, one byte, piece boundaries and their neighbours, large.
fn random_size(rng: &mut Rng, piece: usize) -> usize {
    match rng.below(6) {
        0 => 0,
        1 => 1 + rng.below(64),
        2 => piece * (1 + rng.below(4)),
        3 => piece * (1 + rng.below(4)) + 1,
        4 => rng.below(4 * piece),
        _ => rng.below(2 << 20),
    }
}

/// Moves `count` messages of random sizes through one comm pair, every one checked.
fn stream_messages(send: &mut dyn SendComm, recv: &mut dyn RecvComm, seed: u64, count: usize, piece: usize) {
    let mut rng = Rng::new(&format!("message stream {seed}"));
    let srcs: Vec<Vec<u8>> = (0..count).map(|i| pattern(random_size(&mut rng, piece), seed + i as u64)).collect();
    common::comm::stream(send, recv, &srcs, 16);
}

/// Several comm pairs in parallel threads, each moving its own random stream of messages.
fn concurrent_comms(options: SocketConfig, comms: usize, messages: usize) {
    let net = socket_net(options.clone());
    let pairs: Vec<_> = (0..comms).map(|_| comm_pair(&net, 0)).collect();
    std::thread::scope(|s| {
        for (i, (mut tx, mut rx, _listen)) in pairs.into_iter().enumerate() {
            let piece = options.subchunk as usize;
            s.spawn(move || stream_messages(&mut *tx, &mut *rx, 1000 + i as u64 * 77, messages, piece));
        }
    });
}

#[test]
fn random_sizes_over_one_socket_per_comm() {
    let options = SocketConfig { nthreads: 1, nsocks_per_thread: 1, subchunk: 64 << 10, ..SocketConfig::default() };
    concurrent_comms(options, 3, 120);
}

/// The default piece size over four sockets: requests below 1 MiB are shared over the sockets in
/// pieces of 64 KiB and up, larger ones cut in 256 KiB pieces, and both ends agree on every cut.
#[test]
fn random_sizes_shared_over_four_sockets_at_the_default_piece_size() {
    let options = SocketConfig { nthreads: 4, nsocks_per_thread: 1, ..SocketConfig::default() };
    assert_eq!(options.subchunk, 256 << 10);
    concurrent_comms(options, 2, 80);
}

/// Many comms with several sockets each, all on one sending and one receiving helper thread: the
/// helpers take turns between sockets and never let one comm's busy socket starve another's.
#[test]
fn random_sizes_over_many_comms_sharing_one_helper_each_way() {
    let options =
        SocketConfig { nthreads: 2, nsocks_per_thread: 2, helpers: 1, subchunk: 16 << 10, ..SocketConfig::default() };
    concurrent_comms(options, 6, 60);
}

#[test]
fn random_sizes_over_many_sockets_and_threads_per_comm() {
    // 4 threads x 2 sockets, 4 KiB pieces: a message is spread over up to 8 sockets and reassembled.
    let options = SocketConfig { nthreads: 4, nsocks_per_thread: 2, subchunk: 4 << 10, ..SocketConfig::default() };
    concurrent_comms(options, 3, 120);
}

/// Sleeping helpers woken in a cascade: the poster wakes one and owes the other kicks, which each
/// running socket passes on one at a time; every message still arrives intact.
#[test]
fn random_sizes_with_sleeping_helpers_woken_one_by_another() {
    let options = SocketConfig {
        nthreads: 8,
        nsocks_per_thread: 1,
        subchunk: 8 << 10,
        kick_fanout: 1,
        ..SocketConfig::default()
    };
    concurrent_comms(options, 2, 80);
}

#[test]
fn many_sockets_on_one_thread() {
    let options = SocketConfig { nthreads: 1, nsocks_per_thread: 6, subchunk: 8 << 10, ..SocketConfig::default() };
    concurrent_comms(options, 2, 80);
}

#[test]
fn socket_buffer_sizes_and_zero_spin_are_accepted() {
    let options = SocketConfig {
        nthreads: 2,
        nsocks_per_thread: 1,
        sndbuf: 256 << 10,
        rcvbuf: 256 << 10,
        subchunk: 32 << 10,
        spin: Duration::ZERO,
        spin_max_request: 0,
        held_spin: Duration::ZERO,
        spinners: 1,
        kick_fanout: 0,
        // Small buffers keep the sends waiting for room, each socket on its own helper.
        helpers: 2,
        lazy: true,
        failover: true,
        data_ifname: None,
    };
    concurrent_comms(options, 1, 40);
}

/// The sender's socket count wins: an accepting side configured for one socket still serves a comm
/// that opened eight.
#[test]
fn accepting_side_follows_the_connectors_socket_count() {
    let many =
        socket_net(SocketConfig { nthreads: 4, nsocks_per_thread: 2, subchunk: 4 << 10, ..SocketConfig::default() });
    let one = socket_net(SocketConfig { nthreads: 1, nsocks_per_thread: 1, ..SocketConfig::default() });
    let (mut handle, mut listen) = one.listen(0).unwrap();
    let mut tx = many.connect(0, &mut handle).unwrap().unwrap();
    let mut rx = common::comm::accept(&mut *listen);
    stream_messages(&mut *tx, &mut *rx, 5, 40, 4 << 10);
}

/// Receives posted long before the data, and data sent long before the receives, both complete.
#[test]
fn data_waits_for_late_receives_and_receives_wait_for_late_data() {
    late_receives_and_late_data(SocketConfig {
        nthreads: 2,
        nsocks_per_thread: 2,
        subchunk: 4 << 10,
        ..SocketConfig::default()
    });
}

/// The same with both sockets on one helper each way: a receiving socket holding a header for a
/// request not posted yet must still see the post while its helper sleeps.
#[test]
fn late_receives_and_late_data_on_one_helper() {
    late_receives_and_late_data(SocketConfig {
        nthreads: 2,
        nsocks_per_thread: 1,
        helpers: 1,
        subchunk: 4 << 10,
        ..SocketConfig::default()
    });
}

fn late_receives_and_late_data(options: SocketConfig) {
    let net = socket_net(options);
    let (mut tx, mut rx, _listen) = comm_pair(&net, 0);
    let msgs: Vec<Vec<u8>> = (0..16).map(|i| pattern(10_000 + i * 999, i as u64)).collect();
    let ids: Vec<RequestId> =
        // SAFETY: each m is a live Vec in msgs, and every send is tested to completion just below.
        msgs.iter().map(|m| unsafe { tx.isend(m.as_ptr(), m.len(), MrHandle(0)) }.unwrap().unwrap()).collect();
    // The messages fit the sockets' buffers, so every send completes with no receive posted: the
    // data is all on its way to the receiver before the first receive comes.
    for id in ids {
        drive("a send completes before any receive is posted", LIMIT, || tx.test(id).unwrap());
    }
    let mut bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 32 << 10]).collect();
    let rids: Vec<RequestId> =
        // SAFETY: each b is a live 32 KiB Vec in bufs, read only after its receive is reported done below.
        bufs.iter_mut().map(|b| unsafe { rx.irecv(b.as_mut_ptr(), b.len(), MrHandle(0)) }.unwrap().unwrap()).collect();
    for (i, id) in rids.into_iter().enumerate() {
        let n = drive(&format!("receive {i} completes"), LIMIT, || rx.test(id).unwrap());
        assert_eq!(&bufs[i][..n], &msgs[i][..]);
        rx.irecv_consumed(id).unwrap();
    }
}

/// Sends `msg` and receives it into a fresh buffer, one request each way; returns what arrived.
fn one_message(tx: &mut dyn SendComm, rx: &mut dyn RecvComm, msg: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; msg.len()];
    // SAFETY: buf and msg outlive both requests, which are tested to completion below.
    let r = unsafe { rx.irecv(buf.as_mut_ptr(), buf.len(), MrHandle(0)) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle(0)) }.unwrap().unwrap();
    assert_eq!(drive("the send completes", LIMIT, || tx.test(s).unwrap()), msg.len());
    assert_eq!(drive("the receive completes", LIMIT, || rx.test(r).unwrap()), msg.len());
    rx.irecv_consumed(r).unwrap();
    buf
}

/// A comm of four sockets connects one; one small request after another (each a single piece)
/// never needs another, and the first large one brings in the other three on both ends while its
/// bytes arrive intact, the ones after it riding all four.
#[test]
fn a_comm_starts_with_one_socket_and_grows_to_its_count_under_a_large_transfer() {
    let net = socket_net(SocketConfig { nthreads: 4, nsocks_per_thread: 1, ..SocketConfig::default() });
    let (mut tx, mut rx, _listen) = comm_pair(&net, 0);
    let stats = net.data_socket_stats();
    assert_eq!((stats.sending, stats.receiving, stats.added), (1, 1, 0), "{stats:?}");
    let mut rng = Rng::new("small requests");
    for i in 0..200 {
        // Up to the smallest piece a request is shared in: one piece each.
        let msg = pattern(rng.below(64 << 10) + 1, i);
        assert!(one_message(&mut *tx, &mut *rx, &msg) == msg, "small message {i} arrived intact");
    }
    let stats = net.data_socket_stats();
    assert_eq!((stats.sending, stats.receiving, stats.added), (1, 1, 0), "small requests: {stats:?}");

    let large = pattern(16 << 20, 7);
    assert!(one_message(&mut *tx, &mut *rx, &large) == large, "the 16 MiB message arrived intact");
    let grown =
        |s: uccl_tcpx::internal::transport::socket::DataSocketStats| (s.sending == 4 && s.receiving == 4).then_some(s);
    let stats = common::eventually("the comm grows to four sockets", LIMIT, || grown(net.data_socket_stats()));
    assert_eq!((stats.added, stats.given_up, stats.refused), (3, 0, 0), "{stats:?}");
    let msgs: Vec<Vec<u8>> = (0..32).map(|i| pattern((1 << 20) + i * 4099, 100 + i as u64)).collect();
    common::comm::stream(&mut *tx, &mut *rx, &msgs, 8);
    assert_eq!(net.data_socket_stats(), stats, "nothing more to add or refuse");
    drop((tx, rx));
    let stats = net.data_socket_stats();
    assert_eq!((stats.sending, stats.receiving), (0, 0), "{stats:?}");
}

/// Comms on a net whose peer listens with sockets opened eagerly still talk to lazy ones: how many
/// sockets a comm opens when is the sender's affair alone.
#[test]
fn lazy_and_eager_senders_meet_the_same_listener() {
    let lazy = socket_net(lazy_options());
    let eager = socket_net(SocketConfig { lazy: false, ..lazy_options() });
    for sender in [&lazy, &eager] {
        let (mut handle, mut listen) = lazy.listen(0).unwrap();
        let mut tx = sender.connect(0, &mut handle).unwrap().unwrap();
        let mut rx = common::comm::accept(&mut *listen);
        stream_messages(&mut *tx, &mut *rx, 9, 40, 16 << 10);
    }
}

fn lazy_options() -> SocketConfig {
    SocketConfig { nthreads: 2, nsocks_per_thread: 2, subchunk: 16 << 10, ..SocketConfig::default() }
}

/// A receiving helper whose socket holds a piece with no receive posted polls for the post for
/// `UCCL_TCPX_SOCKET_HELD_SPIN_US`, then sleeps; at 0 it sleeps at once; either way the piece lands
/// intact once the receive comes. The net's count of its helpers' waits shows which they did: a
/// loaded host changes how much CPU a poll gets, not whether the helper polls.
#[test]
fn a_helper_holding_an_unposted_piece_polls_for_its_post_within_the_bound() {
    for held_ms in [1000, 0] {
        let net = socket_net(SocketConfig {
            nthreads: 1,
            nsocks_per_thread: 1,
            spin: Duration::ZERO,
            held_spin: Duration::from_millis(held_ms),
            // Turns of the process's other tests' helpers leave this one's free.
            spinners: 1024,
            ..SocketConfig::default()
        });
        let (mut tx, mut rx, _listen) = comm_pair(&net, 0);
        let msg = pattern(16 << 10, 7);
        // SAFETY: msg outlives the send, tested to completion just below.
        let id = unsafe { tx.isend(msg.as_ptr(), msg.len(), MrHandle(0)) }.unwrap().unwrap();
        drive("the send completes with no receive posted", LIMIT, || tx.test(id).unwrap());
        // Past the bound (at once with none) the helper sleeps, the piece still held.
        let asleep = common::eventually("the helper holding the piece sleeps", LIMIT, || {
            Some(net.helper_waits()).filter(|w| w.slept_holding > 0)
        });
        if held_ms > 0 {
            assert!(
                asleep.polled_holding > 0,
                "the helper slept holding a piece without polling for its post: {asleep:?}"
            );
        } else {
            assert_eq!(asleep.polled_holding, 0, "the helper polled with the held poll off: {asleep:?}");
        }
        // Asleep, it polls no more for that piece, however long its post takes.
        std::thread::sleep(Duration::from_millis(200));
        let later = net.helper_waits();
        assert_eq!(later.polled_holding, asleep.polled_holding, "polled past the bound: {asleep:?} then {later:?}");
        let mut buf = vec![0u8; msg.len()];
        // SAFETY: buf outlives the receive, tested to completion just below.
        let r = unsafe { rx.irecv(buf.as_mut_ptr(), buf.len(), MrHandle(0)) }.unwrap().unwrap();
        assert_eq!(drive("the held piece lands once posted", LIMIT, || rx.test(r).unwrap()), msg.len());
        assert_eq!(buf, msg);
    }
}
