//! Engine behaviour that needs the engine's insides: a GPU identity given without CUDA.

use std::time::{Duration, Instant};

use super::{Connection, Engine, FifoItem, OneSided};
use crate::config::{ChannelTransport, Config, TransportChoice};

fn config() -> Config {
    Config { ip: Some("127.0.0.1".parse().unwrap()), num_channels: Some(2), chunk_size: 64 << 10, ..Config::default() }
}

fn wait(conn: &Connection, id: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(n) = conn.poll(id).unwrap() {
            return n;
        }
        assert!(Instant::now() < deadline, "transfer {id} still in progress");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Writes `len` bytes from `a` into `b` over `ab` and reads them back, `rounds` times, each
/// checked by its count; then checks the bytes at both ends.
fn write_and_read_back(a: &Engine, b: &Engine, ab: &Connection, len: usize, rounds: usize) {
    let src = bytes(len, 3);
    let mut dst = vec![0u8; len];
    let mut back = vec![0u8; len];
    let smr = a.register(src.as_ptr() as usize, len).unwrap();
    let bmr = a.register(back.as_mut_ptr() as usize, len).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    for _ in 0..rounds {
        let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
        assert_eq!(wait(ab, w), len as u64);
        let r = ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote }]).unwrap();
        assert_eq!(wait(ab, r), len as u64);
    }
    assert!(dst == src, "write landed wrong");
    assert!(back == src, "read returned wrong bytes");
}

/// Two engines over the built-in socket transport (the network path) and the connection from the
/// first to the second, each end's.
fn socket_pair() -> (Engine, Engine, std::sync::Arc<Connection>, std::sync::Arc<Connection>) {
    let engine = || Engine::new(Config { transport: TransportChoice::Socket, disable_ipc: true, ..config() }).unwrap();
    let (a, b) = (engine(), engine());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = b.accept().unwrap();
    (a, b, ab, ba)
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// NIXL reads an engine's metadata once, right after creating it and before registering memory,
/// and connects with it later, after the engine learned its GPU from a registration: the peer
/// then names GPU "0" to an engine that serves another. The engine serves the connection, and the
/// metadata it handed out stays what it was.
#[test]
fn a_peer_holding_metadata_from_before_the_gpu_was_known_connects() {
    let a = Engine::new(config()).unwrap();
    let b = Engine::new(config()).unwrap();
    assert!(b.gpu().is_none(), "a test thread has no current GPU");
    let cached = b.metadata();
    let (addr, named_gpu) = cached.rsplit_once('?').unwrap();
    assert_eq!(named_gpu, "0", "{cached}");
    let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();

    // What registering memory of its GPU 1 (bus 0000:00:07.0) does to b's identity.
    b.core.gpu.pretend(1, "0000:00:07.0");
    assert_eq!(b.metadata(), cached, "metadata changed after it was handed out");

    let ab = a.connect("127.0.0.1", named_gpu, port).expect("a stale GPU name refused the connection");
    let ba = b.accept().unwrap();
    assert_eq!((ab.peer.gpu_index, ab.peer.gpu_id.as_str()), (1, "0000:00:07.0"), "the handshake names b's GPU");
    assert_eq!((ba.peer.gpu_index, ba.peer.gpu_id.as_str()), (0, "0"));

    // Any other name is served too: one port reaches one engine.
    let by_other_name = a.connect("127.0.0.1", "0000:ff:1f.7", port).expect("another GPU name refused");
    let _accepted = b.accept().unwrap();

    // And data moves both ways over the first connection: a write into b, then a read back.
    write_and_read_back(&a, &b, &ab, (1 << 20) + 5, 1);
    drop(by_other_name);
}

/// An engine left without UCCL_TCPX_NUM_CHANNELS offers its transport's default, so two such
/// engines agree on it; a connection between different counts takes the smaller at both ends,
/// whichever end connects, and moves data over it.
#[test]
fn channels_default_to_the_transport_and_peers_take_the_smaller_count() {
    let engine = |num_channels| {
        // Same-process peers would copy directly; the channels are what is under test.
        Engine::new(Config { num_channels, transport: TransportChoice::Socket, disable_ipc: true, ..config() }).unwrap()
    };
    let pair = |a: &Engine, b: &Engine| {
        let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        (ab, b.accept().unwrap())
    };
    let (a, b) = (engine(None), engine(None));
    let socket_default = Config::default().channels_for(ChannelTransport::Socket);
    assert_eq!((a.num_channels(), b.num_channels()), (socket_default, socket_default));
    let (ab, ba) = pair(&a, &b);
    assert_eq!((ab.num_channels(), ba.num_channels()), (socket_default as usize, socket_default as usize));

    let (three, five) = (engine(Some(3)), engine(Some(5)));
    assert_eq!((three.num_channels(), five.num_channels()), (3, 5));
    for (from, to) in [(&three, &five), (&five, &three)] {
        let (out, back) = pair(from, to);
        assert_eq!(
            (out.num_channels(), back.num_channels()),
            (3, 3),
            "{} -> {}",
            from.num_channels(),
            to.num_channels()
        );
    }
    let (out, _back) = pair(&five, &three);
    // Large enough to be cut into chunks on every one of the agreed channels.
    let len = (1 << 20) + 5;
    let src = bytes(len, 9);
    let mut dst = vec![0u8; len];
    let smr = five.register(src.as_ptr() as usize, len).unwrap();
    let dmr = three.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = three.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    let w = out.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
    assert_eq!(wait(&out, w), len as u64);
    assert!(dst == src, "write over 3 agreed channels landed wrong");
}

/// The progress thread polls without pause for device copies, and for network chunks within their
/// bound: a plugin's requests or a comm retrying a declined post get naps (their threads need the
/// core), nothing at all a park.
#[test]
fn only_device_copies_and_chunks_within_their_bound_keep_the_idle_progress_thread_polling() {
    use super::idle_choice;
    use super::progress::IdleWait;
    let (off, bound) = (Duration::ZERO, Duration::from_micros(100));
    assert_eq!(idle_choice(true, false, true, None, off), IdleWait::Poll);
    assert_eq!(idle_choice(true, true, true, None, off), IdleWait::Poll);
    assert_eq!(idle_choice(true, false, false, None, off), IdleWait::Nap, "copies with polling off");
    assert_eq!(idle_choice(false, true, true, None, off), IdleWait::Nap, "a retrying comm or a plugin's requests");
    assert_eq!(idle_choice(false, false, true, None, off), IdleWait::Park);
    // Chunks in flight, idle for `Some(..)`: polled within the bound, then left to their wake-up.
    let us = Duration::from_micros;
    assert_eq!(idle_choice(false, false, false, Some(us(0)), bound), IdleWait::Poll);
    assert_eq!(idle_choice(false, false, false, Some(us(99)), bound), IdleWait::Poll);
    assert_eq!(idle_choice(false, false, false, Some(us(100)), bound), IdleWait::Park, "at the bound");
    assert_eq!(idle_choice(false, false, false, Some(us(5000)), bound), IdleWait::Park, "a peer gone");
    assert_eq!(idle_choice(false, false, false, Some(us(0)), off), IdleWait::Park, "polling for chunks off");
    assert_eq!(idle_choice(false, false, false, None, bound), IdleWait::Park, "no chunks in flight");
    assert_eq!(idle_choice(false, true, false, Some(us(50)), bound), IdleWait::Poll, "within the bound");
    assert_eq!(idle_choice(false, true, false, Some(us(500)), bound), IdleWait::Nap, "past it, polled work naps");
    assert_eq!(idle_choice(true, false, false, Some(us(500)), bound), IdleWait::Nap, "and so do copies");
    assert_eq!(idle_choice(true, false, false, Some(us(50)), bound), IdleWait::Poll);
}

/// With UCCL_TCPX_PROGRESS_POLL_US set, an engine's idle progress thread polls while a connection
/// counts network chunks in flight and its bound has not passed, and parks otherwise: both ends of
/// real writes and reads count their chunks off again once they completed, so an idle engine
/// parks, and a count left up (chunks that never complete) parks once the bound passed.
#[test]
fn network_chunks_in_flight_keep_the_idle_progress_thread_polling_within_its_bound() {
    use super::idle_wait;
    use super::progress::IdleWait;
    let bound = Duration::from_millis(50);
    let engine = || {
        let config = Config { progress_poll: bound, transport: TransportChoice::Socket, disable_ipc: true, ..config() };
        Engine::new(config).unwrap()
    };
    let (a, b) = (engine(), engine());
    let choice = |e: &Engine, idle_since: Instant| {
        idle_wait(&e.core.routes, &e.core.waker, false, e.core.config.progress_poll, idle_since)
    };
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let _ba = b.accept().unwrap();
    write_and_read_back(&a, &b, &ab, (4 << 20) + 5, 3);
    for (end, e) in [("initiator", &a), ("target", &b)] {
        let deadline = Instant::now() + testkit::PATIENCE;
        while e.core.waker.chunks_out.any() {
            assert!(Instant::now() < deadline, "the {end} still counts chunks in flight after every transfer ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(choice(e, Instant::now()), IdleWait::Park, "the idle {end} polls with nothing in flight");
    }
    // What a connection does when its first chunk goes out, and when its last completes.
    b.core.waker.chunks_out.add();
    assert_eq!(choice(&b, Instant::now()), IdleWait::Poll);
    let long_idle = Instant::now().checked_sub(2 * bound).expect("a clock older than the bound");
    assert_eq!(choice(&b, long_idle), IdleWait::Park, "chunks that never complete are not polled past the bound");
    b.core.waker.chunks_out.remove();
    assert_eq!(choice(&b, Instant::now()), IdleWait::Park);
    // The knob at 0 never polls for chunks.
    b.core.waker.chunks_out.add();
    assert_eq!(idle_wait(&b.core.routes, &b.core.waker, false, Duration::ZERO, Instant::now()), IdleWait::Park);
    b.core.waker.chunks_out.remove();
}

/// A caller's write posts about one chunk's bytes of sends per channel and leaves the rest queued:
/// once its call returned, whatever its channels would still take is marked for a pass (which
/// wakes the progress thread) or already posted, never left until a completion happens to come.
/// Every write still lands whole.
#[test]
fn sends_a_write_leaves_queued_are_marked_for_the_progress_thread() {
    let (a, b, ab, _ba) = socket_pair();
    // 16 chunks of 64 KiB over 2 channels: the caller posts one a channel, seven stay queued.
    let len = 1 << 20;
    let mut dst = vec![0u8; len];
    let dmr = b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    for seed in 0..20u8 {
        let src = bytes(len, seed);
        let smr = a.register(src.as_ptr() as usize, len).unwrap();
        let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
        assert!(!ab.sends_stranded(), "write {seed} left sends nothing will post");
        assert_eq!(wait(&ab, w), len as u64);
        assert!(dst == src, "write {seed} landed wrong");
        a.deregister(smr).unwrap();
    }
}

/// The progress thread passes over a connection with nothing to do and drives one with work: a
/// write whose request the target has not read yet keeps the initiator's connection in the pass
/// until the write ends, and a region deregistered after it moved over the channels keeps it there
/// until a pass released the channels' registrations of it.
#[test]
fn the_progress_pass_passes_over_quiet_connections_only() {
    let (a, b, ab, ba) = socket_pair();
    let quiet = |what: &str| {
        let deadline = Instant::now() + testkit::PATIENCE;
        while !ab.is_quiet() {
            assert!(Instant::now() < deadline, "the connection never went quiet {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    quiet("once connected");
    let len = 1 << 20;
    let mut dst = vec![0u8; len];
    let dmr = b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    let src = bytes(len, 3);
    let smr = a.register(src.as_ptr() as usize, len).unwrap();
    let held = ba.hold_reads();
    let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
    assert!(!ab.is_quiet(), "a write the target has not answered is passed over");
    drop(held);
    assert_eq!(wait(&ab, w), len as u64);
    assert!(dst == src, "the write landed wrong");
    quiet("after the write");
    a.deregister(smr).unwrap();
    // The deregistration counts a removal the channels have not swept yet, unless a pass did.
    let deadline = Instant::now() + testkit::PATIENCE;
    while !ab.is_quiet() {
        assert!(Instant::now() < deadline, "the deregistered region's registrations were never released");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// While the progress thread drives channel 0 without the connection's lock, another thread
/// posts: what it queues on channel 0 waits for that channel's next drive, what it queues on
/// channel 1 goes there at once, and every byte lands in place, in both channels' order. Three
/// writes of their own bytes to three ranges and a read back of all three.
#[test]
fn chunks_queued_while_the_progress_thread_drives_a_channel_wait_for_it_in_order() {
    let (a, b, ab, _ba) = socket_pair();
    let part = 1 << 20;
    let mut dst = vec![0u8; 3 * part];
    let dmr = b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let srcs: Vec<Vec<u8>> = (0..3).map(|i| bytes(part, 7 * i as u8 + 1)).collect();
    let mrs: Vec<u64> = srcs.iter().map(|s| a.register(s.as_ptr() as usize, part).unwrap()).collect();
    let write = |i: usize| {
        let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize + i * part, part).unwrap();
        ab.write(&[OneSided { mr: mrs[i], addr: srcs[i].as_ptr() as usize, len: part, remote }]).unwrap()
    };
    ab.gate().close();
    let first = write(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ab.gate().reached() {
        assert!(Instant::now() < deadline, "the progress thread never drove the connection");
        std::thread::sleep(Duration::from_micros(100));
    }
    let (second, third) = (write(1), write(2));
    assert!(ab.deferred_ops() > 0, "chunks for the channel being driven were queued on it under its drive");
    ab.gate().open();
    for w in [first, second, third] {
        assert_eq!(wait(&ab, w), part as u64);
    }
    assert_eq!(ab.deferred_ops(), 0);
    for (i, src) in srcs.iter().enumerate() {
        assert!(&dst[i * part..(i + 1) * part] == src.as_slice(), "write {i} landed wrong");
    }
    let mut back = vec![0u8; 3 * part];
    let bmr = a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, dst.len()).unwrap();
    let r = ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: back.len(), remote }]).unwrap();
    assert_eq!(wait(&ab, r), back.len() as u64);
    assert!(back == dst, "the read returned other bytes");
}

/// Reads posted while the target's control stream is held pile up there and are read at once:
/// its reader hands the connection's lock over between them (sending what each answered, leaving
/// what it queued to the progress thread), and every read ends with its bytes.
#[test]
fn a_reader_lets_others_in_between_the_requests_of_one_read() {
    let (a, b, ab, ba) = socket_pair();
    ba.hand_over_every_message();
    let (n, part) = (16usize, 1usize << 20);
    let src = bytes(n * part, 3);
    let smr = b.register(src.as_ptr() as usize, src.len()).unwrap();
    let remote = b.prepare_fifo(smr, src.as_ptr() as usize, src.len()).unwrap();
    let mut back = vec![0u8; n * part];
    let kmr = a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let held = ba.hold_reads();
    let reads: Vec<u64> = (0..n)
        .map(|i| {
            let remote = FifoItem { addr: remote.addr + (i * part) as u64, ..remote };
            ab.read(&[OneSided { mr: kmr, addr: back.as_mut_ptr() as usize + i * part, len: part, remote }]).unwrap()
        })
        .collect();
    drop(held);
    for r in reads {
        assert_eq!(wait(&ab, r), part as u64);
    }
    assert!(ba.lets_in() > 0, "16 requests read together were handled under one hold of the lock");
    assert!(back == src, "a read returned other bytes");
}

/// Four reads of 8,192 pieces of 512 B each (4 MiB) posted while the target's control stream is
/// held: their requests, about 128 KiB each, take more than one of its reads. A reader that
/// handled some with the rest still in the stream leaves their chunks to the progress thread, and
/// every read ends with its bytes.
#[test]
fn a_reader_with_more_to_read_leaves_large_flows_to_the_progress_thread() {
    let (a, b, ab, ba) = socket_pair();
    let (pieces, piece) = (8192usize, 512usize);
    let len = pieces * piece;
    let n = 4;
    let src = bytes(2 * n * len, 5);
    let smr = b.register(src.as_ptr() as usize, src.len()).unwrap();
    let remote = b.prepare_fifo(smr, src.as_ptr() as usize, src.len()).unwrap();
    let mut back = vec![0u8; n * len];
    let kmr = a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    // Every other piece of the source, so that none joins its neighbour.
    let read = |k: usize, back: &mut Vec<u8>| {
        let ops: Vec<OneSided> = (0..pieces)
            .map(|i| OneSided {
                mr: kmr,
                addr: back.as_mut_ptr() as usize + k * len + i * piece,
                len: piece,
                remote: FifoItem { addr: remote.addr + ((k * pieces + i) * 2 * piece) as u64, ..remote },
            })
            .collect();
        ab.read(&ops).unwrap()
    };
    let held = ba.hold_reads();
    let reads: Vec<u64> = (0..n).map(|k| read(k, &mut back)).collect();
    drop(held);
    for r in reads {
        assert_eq!(wait(&ab, r), len as u64);
    }
    assert!(ba.left_to_progress() > 0, "the reader posted every read's chunks with more requests waiting");
    for (i, got) in back.chunks(piece).enumerate() {
        assert!(got == &src[i * 2 * piece..][..piece], "piece {i} of the reads landed wrong");
    }
}

/// Inline writes, reads and sends whose stores and loads start copies (simulated on host memory,
/// landing 2 ms after they start): 32 posted at once, three times, so that readers find several
/// payloads queued and read on while copies run, then one at a time, so that a caller waits for
/// its own answer's copy. Each transfer's bytes are in place when it ends (an answer sent before
/// its copy landed shows as bytes missing), and every copy started landed.
#[test]
fn inline_transfers_over_started_copies_end_with_their_bytes() {
    let sim = super::test_copies::SimulatedCopies::new(Duration::from_millis(2));
    // The network path: same-host peers would copy one-sided transfers directly.
    let config = || Config { disable_ipc: true, ..config() };
    let (a, b) = (Engine::new(config()).unwrap(), Engine::new(config()).unwrap());
    for e in [&a, &b] {
        e.core.simulated_copies.set(sim.clone()).unwrap();
    }
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = b.accept().unwrap();
    // Payloads near the device inline bound: a read of 32 at once fills the reader's buffer with
    // more behind, the turn in which copies run while it reads on.
    let (n, len) = (32usize, 60 << 10);
    let src = bytes(n * len, 9);
    let (mut dst, mut back, mut got) = (vec![0u8; n * len], vec![0u8; n * len], vec![0u8; n * len]);
    let smr = a.register(src.as_ptr() as usize, n * len).unwrap();
    let kmr = a.register(back.as_mut_ptr() as usize, n * len).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, n * len).unwrap();
    let gmr = b.register(got.as_mut_ptr() as usize, n * len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, n * len).unwrap();
    // What the transfers wrote, read as the engine left it (the buffers are the engine's to write
    // while registered).
    // SAFETY: `buf` is a live allocation of n * len bytes; the transfers that wrote `[off, +len)`
    // ended.
    let landed =
        |buf: &Vec<u8>, off: usize| unsafe { std::ptr::read_volatile(buf.as_ptr().add(off) as *const [u8; 60 << 10]) };
    for batch in [n, n, n, 1] {
        for kind in ["write", "read", "send"] {
            let into = match kind {
                "write" => &dst,
                "read" => &back,
                _ => &got,
            };
            for first in (0..n).step_by(batch) {
                let mut pending = Vec::new();
                for off in (first..first + batch).map(|i| i * len) {
                    let remote = FifoItem { addr: remote.addr + off as u64, ..remote };
                    let id = match kind {
                        "write" => ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize + off, len, remote }]),
                        "read" => ab.read(&[OneSided { mr: kmr, addr: back.as_ptr() as usize + off, len, remote }]),
                        _ => {
                            let r = ba.recv(gmr, got.as_ptr() as usize + off, len).unwrap();
                            pending.push((&ba, r, off));
                            ab.send(&[(smr, src.as_ptr() as usize + off, len)])
                        }
                    };
                    pending.push((&ab, id.unwrap(), off));
                }
                for (conn, id, off) in pending {
                    assert_eq!(wait(conn, id), len as u64, "{kind}, {batch} at once");
                    if !(kind == "send" && std::ptr::eq(conn, &ab)) {
                        let whole = landed(into, off)[..] == src[off..off + len];
                        assert!(whole, "{kind} at +{off} ({batch} at once) ended before its bytes landed");
                    }
                }
            }
        }
        for v in [&mut dst, &mut back, &mut got] {
            v.fill(0);
        }
    }
    let started = sim.started.load(std::sync::atomic::Ordering::SeqCst);
    // Every write, read and send of the four rounds started one at least.
    assert!(started >= 3 * 4 * n as u64, "{started} copies started for {} inline transfers", 3 * 4 * n);
    assert_eq!(sim.landed.load(std::sync::atomic::Ordering::SeqCst), started, "a started copy never landed");
}

/// A deregistration returns only once the copies started for inline payloads into the region
/// ended (here each lands 20 ms after it starts, and the target's reader, finding more to read,
/// leaves them running while it reads on): none lands in the region after it returned. The writes
/// end, either way, with their bytes or an error.
#[test]
fn a_deregistration_waits_for_the_copies_of_payloads_into_the_region() {
    let sim = super::test_copies::SimulatedCopies::new(Duration::from_millis(20));
    let config = || Config { disable_ipc: true, ..config() };
    let (a, b) = (Engine::new(config()).unwrap(), Engine::new(config()).unwrap());
    b.core.simulated_copies.set(sim.clone()).unwrap();
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let _ba = b.accept().unwrap();
    let (n, len) = (32usize, 60 << 10);
    let src = bytes(n * len, 7);
    let mut dst = vec![0u8; n * len];
    let smr = a.register(src.as_ptr() as usize, n * len).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, n * len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, n * len).unwrap();
    let ids: Vec<u64> = (0..n)
        .map(|i| {
            let remote = FifoItem { addr: remote.addr + (i * len) as u64, ..remote };
            ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize + i * len, len, remote }]).unwrap()
        })
        .collect();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    // Deregister while copies into the region run (the first lands 20 ms after it started).
    testkit::wait_until("a copy into the region started", testkit::PATIENCE, || count(&sim.started) > 0);
    b.deregister(dmr).unwrap();
    let (started, landed) = (count(&sim.started), count(&sim.landed));
    assert_eq!(landed, started, "the deregistration returned with copies into the region still running");
    for id in ids {
        testkit::wait_until(&format!("write {id} ends"), testkit::PATIENCE, || {
            matches!(ab.poll(id), Ok(Some(_)) | Err(_))
        });
    }
    assert_eq!(count(&sim.started), started, "a copy into the region started after its deregistration");
    drop(dst);
}

/// A caller waiting in slices (`wait_within`, as the Python package's blocking calls do) reads its
/// answer itself within each slice and ends every kind of transfer with its bytes, inline and over
/// the channels, writes and reads, over the network path and the same-host one, with slices from
/// none at all to longer than the transfer; a slice that runs out leaves the transfer in progress
/// for the next, and the id is done once.
#[test]
fn waits_in_slices_end_every_kind_of_transfer_with_its_bytes() {
    for disable_ipc in [true, false] {
        let config = || Config { disable_ipc, ..config() };
        let (a, b) = (Engine::new(config()).unwrap(), Engine::new(config()).unwrap());
        let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let _ba = b.accept().unwrap();
        let most = 8 << 20;
        let src = bytes(most, 5);
        let (mut dst, mut back) = (vec![0u8; most], vec![0u8; most]);
        let smr = a.register(src.as_ptr() as usize, most).unwrap();
        let kmr = a.register(back.as_mut_ptr() as usize, most).unwrap();
        let dmr = b.register(dst.as_mut_ptr() as usize, most).unwrap();
        let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, most).unwrap();
        for (k, len) in [4096usize, (256 << 10) + 3, most].into_iter().enumerate() {
            for slice in [Duration::ZERO, Duration::from_micros(50), Duration::from_millis(50)] {
                for write in [true, false] {
                    let (local, mr) =
                        if write { (src.as_ptr() as usize, smr) } else { (back.as_mut_ptr() as usize, kmr) };
                    let op = [OneSided { mr, addr: local, len, remote }];
                    let id = if write { ab.write(&op) } else { ab.read(&op) }.unwrap();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let got = loop {
                        if let Some(n) = ab.wait_within(id, slice).unwrap() {
                            break n;
                        }
                        assert!(Instant::now() < deadline, "{len} B, slice {slice:?}: still in progress");
                    };
                    assert_eq!(got, len as u64, "case {k}, slice {slice:?}, write {write}");
                    assert!(ab.poll(id).is_err(), "an id is reported done once");
                }
                assert!(dst[..len] == src[..len], "ipc off {disable_ipc}: {len} B written, slice {slice:?}");
                assert!(back[..len] == src[..len], "ipc off {disable_ipc}: {len} B read back, slice {slice:?}");
                back[..len].fill(0);
            }
        }
    }
}

mod renew;
