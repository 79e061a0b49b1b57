//! Idle channels closed and new ones opened (`conn/life.rs`, `conn/renew.rs`), over the built-in
//! socket transport: transfers after a parking find new channels, either end's work opens them, a
//! busy acceptor keeps them, and a peer gone while they are closed fails what waits for them.
//! Most cases park on cue (`park`) with an idle time no test reaches, so that no count depends on
//! how fast the machine runs; the last lets the progress thread park on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{bytes, config, wait};
use crate::config::{Config, TransportChoice};
use crate::engine::conn::life::{IdleTime, Life};
use crate::engine::{Connection, Engine, OneSided};
use crate::error::Result;

/// An idle time no test waits out.
const NEVER: Duration = Duration::from_secs(3600);

fn idle_pair(idle: Duration) -> (Engine, Engine, Arc<Connection>, Arc<Connection>) {
    let engine = || {
        Engine::new(Config {
            transport: TransportChoice::Socket,
            disable_ipc: true,
            idle_close: Some(idle),
            ..config()
        })
        .unwrap()
    };
    let (a, b) = (engine(), engine());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = b.accept().unwrap();
    (a, b, ab, ba)
}

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + testkit::PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The connector `ab` asks to close its channels as the progress thread does once they idled
/// past its idle time (however long channels wanted again soon made it), again after an acceptor
/// that still had something in flight kept them, until both ends closed them.
fn park(ab: &Connection, ba: &Connection) {
    let (a, b) = (ab.channel_renewals().0, ba.channel_renewals().0);
    let past = NEVER * (IdleTime::MAX_FACTOR + 1);
    until("the channels never closed", || {
        let closed = ab.channel_renewals().0 == a + 1 && ba.channel_renewals().0 == b + 1;
        if !closed {
            ab.close_if_idle(Instant::now() + past);
        }
        closed
    });
}

/// How transfer `id` ended: its bytes, or its error.
fn outcome(conn: &Connection, id: u64) -> Result<u64> {
    let deadline = Instant::now() + testkit::PATIENCE;
    loop {
        if let Some(n) = conn.poll(id)? {
            return Ok(n);
        }
        assert!(Instant::now() < deadline, "transfer {id} never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writes `src` from `from`'s engine into `dst` of the other over `conn`, and checks the bytes.
fn write(from: &Engine, to: &Engine, conn: &Connection, src: &[u8], dst: &mut [u8]) {
    let len = src.len();
    let smr = from.register(src.as_ptr() as usize, len).unwrap();
    let dmr = to.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = to.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    let w = conn.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
    assert_eq!(wait(conn, w), len as u64);
    assert!(dst == src, "the write landed wrong");
    from.deregister(smr).unwrap();
    to.deregister(dmr).unwrap();
}

/// Channels wanted again within the idle time after they closed stay open twice as long before
/// the connector parks them again (`life::IdleTime`); the acceptor's setting plays no part.
#[test]
fn channels_wanted_again_soon_idle_longer_before_the_next_close() {
    let (a, b, ab, ba) = idle_pair(NEVER);
    // Large enough to take the channels, not the control stream.
    let len = 1 << 20;
    let mut dst = vec![0u8; len];
    write(&a, &b, &ab, &bytes(len, 1), &mut dst);
    assert_eq!(ab.idle_time(), NEVER);
    park(&ab, &ba);
    write(&a, &b, &ab, &bytes(len, 2), &mut dst);
    assert_eq!(ab.channel_renewals(), (1, 1), "closed once, opened again");
    assert_eq!(ab.idle_time(), 2 * NEVER, "opened again within the idle time of the close");
    park(&ab, &ba);
    write(&a, &b, &ab, &bytes(len, 3), &mut dst);
    assert_eq!(ab.idle_time(), 4 * NEVER);
    assert_eq!(ba.idle_time(), NEVER, "the acceptor never parks: its own time stays");
}

/// Landing memory goes once the connection idled with no message in it, channels open, on the
/// socket transport too, and comes back with the next message to land: a message waiting in it
/// for its receive keeps it. Every byte lands.
#[test]
fn idle_landing_memory_goes_and_comes_back_with_the_next_message() {
    use crate::engine::conn::landing::LANDING_IDLE;
    let (a, b, ab, ba) = idle_pair(NEVER);
    let len = 512 << 10;
    let (mut got, msgs) = (vec![0u8; len], [bytes(len, 21), bytes(len, 22)]);
    let gmr = b.register(got.as_mut_ptr() as usize, len).unwrap();
    for (i, msg) in msgs.iter().enumerate() {
        let smr = a.register(msg.as_ptr() as usize, len).unwrap();
        let s = ab.send(&[(smr, msg.as_ptr() as usize, len)]).unwrap();
        until("the message never landed", || ba.stats().landed == i as u64 + 1);
        assert!(ba.holds_landing_memory(), "message {i} landed in landing memory");
        let later = Instant::now() + 2 * LANDING_IDLE;
        assert!(ba.give_back_idle_landing(later).is_some(), "a message waiting in it keeps it");
        assert!(ba.holds_landing_memory());
        let r = ba.recv(gmr, got.as_mut_ptr() as usize, len).unwrap();
        assert_eq!((wait(&ba, r), wait(&ab, s)), (len as u64, len as u64));
        assert!(got == *msg, "message {i} arrived wrong");
        a.deregister(smr).unwrap();
        let now = Instant::now();
        assert!(ba.give_back_idle_landing(now).is_some(), "not idle long enough yet");
        assert!(ba.holds_landing_memory());
        assert_eq!(ba.give_back_idle_landing(now + 2 * LANDING_IDLE), None);
        assert!(!ba.holds_landing_memory(), "idle with nothing in it: given back");
        assert_eq!(ba.open_channels(), 2, "the channels stay open");
    }
    // The channels still carry transfers after the landing memory's registrations went.
    let mut dst = vec![0u8; 1 << 20];
    write(&a, &b, &ab, &bytes(1 << 20, 23), &mut dst);
}

/// Both ends close their channels once idle, and open new ones for the next transfer: the
/// connector's own, then the acceptor's (which asks the connector). Every byte lands.
#[test]
fn idle_channels_close_and_either_ends_transfer_opens_new_ones() {
    let (a, b, ab, ba) = idle_pair(NEVER);
    let len = 1 << 20;
    let mut dst = vec![0u8; len];
    write(&a, &b, &ab, &bytes(len, 1), &mut dst);
    // A mid-size message sent before its receive lands in the acceptor's landing slots.
    let (msg, mut got) = (bytes(512 << 10, 9), vec![0u8; 512 << 10]);
    let smr = a.register(msg.as_ptr() as usize, msg.len()).unwrap();
    let gmr = b.register(got.as_mut_ptr() as usize, got.len()).unwrap();
    let s = ab.send(&[(smr, msg.as_ptr() as usize, msg.len())]).unwrap();
    until("the message never landed", || ba.stats().landed == 1);
    let r = ba.recv(gmr, got.as_mut_ptr() as usize, got.len()).unwrap();
    assert_eq!((wait(&ba, r), wait(&ab, s)), (msg.len() as u64, msg.len() as u64));
    assert!(got == msg, "the landed message arrived wrong");
    assert!(ba.holds_landing_memory());
    park(&ab, &ba);
    assert_eq!((ab.open_channels(), ba.open_channels()), (0, 0), "closed at both ends");
    assert!(!ba.holds_landing_memory(), "landing memory kept with the channels closed");
    assert_eq!((ab.channel_life(), ba.channel_life()), (Life::Parked, Life::Parked));

    // The connector's write waits for new channels.
    write(&a, &b, &ab, &bytes(len, 2), &mut dst);
    assert_eq!((ab.channel_renewals().1, ba.channel_renewals().1), (1, 1), "opened once at each end");
    assert_eq!(ab.open_channels(), 2);
    let stats = ab.stats();
    assert_eq!((stats.idle_closes, stats.reopens), (1, 1), "the counters say so too");
    assert!(stats.to_string().contains("channels closed idle 1 times, opened again 1"), "{stats}");

    // Parked again; now the acceptor writes, and a read from the connector follows.
    park(&ab, &ba);
    let mut back = vec![0u8; len];
    write(&b, &a, &ba, &bytes(len, 3), &mut back);
    assert_eq!((ab.channel_renewals().1, ba.channel_renewals().1), (2, 2));
    let src = bytes(len, 4);
    let mut got = vec![0u8; len];
    let (smr, gmr) =
        (b.register(src.as_ptr() as usize, len).unwrap(), a.register(got.as_mut_ptr() as usize, len).unwrap());
    let remote = b.prepare_fifo(smr, src.as_ptr() as usize, len).unwrap();
    let r = ab.read(&[OneSided { mr: gmr, addr: got.as_mut_ptr() as usize, len, remote }]).unwrap();
    assert_eq!(wait(&ab, r), len as u64);
    assert!(got == src, "the read returned wrong bytes");
}

/// The acceptor has a write under way that the connector has not heard of when the connector
/// asks to park: the acceptor keeps its channels, the connector takes the write's chunks on the
/// channels it kept, and nothing closes.
#[test]
fn an_acceptor_with_work_in_flight_keeps_the_channels() {
    let (a, b, ab, ba) = idle_pair(NEVER);
    let len = 1 << 20;
    let src = bytes(len, 5);
    let mut dst = vec![0u8; len];
    let smr = b.register(src.as_ptr() as usize, len).unwrap();
    let dmr = a.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = a.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    // The connector hears nothing from here on until the guard goes: it stays idle.
    let held = ab.hold_reads();
    let w = ba.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
    until("the connector never asked to park", || ab.close_if_idle(Instant::now() + 2 * NEVER).is_none());
    assert_eq!(ab.channel_life(), Life::Parking);
    drop(held);
    assert_eq!(wait(&ba, w), len as u64);
    assert!(dst == src, "the write landed wrong");
    until("the connector never took the answer", || ab.channel_life() == Life::Open);
    assert_eq!((ab.channel_renewals(), ba.channel_renewals()), ((0, 0), (0, 0)), "nothing closed");
    assert_eq!(ab.open_channels(), 2);
}

/// A peer gone while the channels are closed: the transfer that waits for new ones fails with
/// an error, and nothing hangs.
#[test]
fn a_peer_gone_while_the_channels_are_closed_fails_the_waiting_transfer() {
    let (a, b, ab, ba) = idle_pair(NEVER);
    park(&ab, &ba);
    let len = 1 << 20;
    let mut dst = vec![0u8; len];
    let src = bytes(len, 6);
    let smr = a.register(src.as_ptr() as usize, len).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    drop(ba);
    drop(b);
    let ended =
        ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).and_then(|w| outcome(&ab, w));
    assert!(ended.is_err(), "a write to a peer gone: {ended:?}");
}

/// A deregistration while a write's chunks wait for new channels: the write fails as cut off,
/// its chunks go from scratch memory once the channels open (the target's range gets zeros, not
/// the region's bytes), and the next write on the new channels lands whole.
#[test]
fn a_deregistration_while_channels_open_sends_nothing_of_the_region() {
    let (a, b, ab, ba) = idle_pair(NEVER);
    park(&ab, &ba);
    let len = 1 << 20;
    let src = bytes(len, 7);
    let mut dst = vec![0xeeu8; len];
    let smr = a.register(src.as_ptr() as usize, len).unwrap();
    let dmr = b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let remote = b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    // The acceptor reads nothing: the connector's offer of new channels waits, and so do the
    // write's chunks.
    let held = ba.hold_reads();
    let w = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len, remote }]).unwrap();
    until("the write never waited for new channels", || ab.channel_life() == Life::Opening);
    a.deregister(smr).unwrap();
    drop(held);
    let err = outcome(&ab, w).expect_err("a write cut off by its deregistration");
    assert!(err.message().contains("deregistered"), "{}", err.message());
    let mut next = vec![0u8; len];
    write(&a, &b, &ab, &bytes(len, 8), &mut next);
    assert_eq!((ab.channel_renewals().1, ba.channel_renewals().1), (1, 1));
    assert!(dst.iter().all(|&x| x == 0), "the target's range got the region's bytes, not scratch");
}

/// Transfers of both ends, writes, reads and messages, with pauses around the idle time between
/// them: whatever each finds (channels open, being parked, parked, opening), every one ends with
/// its bytes in place.
#[test]
fn transfers_around_the_idle_time_all_land() {
    let (a, b, ab, ba) = idle_pair(Duration::from_millis(3));
    let mut rng = testkit::Rng::new("renew");
    let len = 512 << 10;
    for round in 0..40u8 {
        let (from, to, conn, back) = if round % 2 == 0 { (&a, &b, &ab, &ba) } else { (&b, &a, &ba, &ab) };
        match round % 3 {
            0 => write(from, to, conn, &bytes(len, round), &mut vec![0u8; len]),
            1 => {
                let src = bytes(len, round);
                let mut got = vec![0u8; len];
                let smr = to.register(src.as_ptr() as usize, len).unwrap();
                let gmr = from.register(got.as_mut_ptr() as usize, len).unwrap();
                let remote = to.prepare_fifo(smr, src.as_ptr() as usize, len).unwrap();
                let r = conn.read(&[OneSided { mr: gmr, addr: got.as_mut_ptr() as usize, len, remote }]).unwrap();
                assert_eq!(wait(conn, r), len as u64);
                assert!(got == src, "read {round} returned wrong bytes");
            }
            _ => {
                let src = bytes(len, round);
                let mut got = vec![0u8; len];
                let smr = from.register(src.as_ptr() as usize, len).unwrap();
                let gmr = to.register(got.as_mut_ptr() as usize, len).unwrap();
                let s = conn.send(&[(smr, src.as_ptr() as usize, len)]).unwrap();
                let r = back.recv(gmr, got.as_mut_ptr() as usize, len).unwrap();
                assert_eq!(wait(back, r), len as u64);
                assert_eq!(wait(conn, s), len as u64);
                assert!(got == src, "message {round} arrived wrong");
            }
        }
        if round % 5 == 4 {
            // Every fifth round the next finds the channels parked, whatever the machine's load.
            let parks = ab.channel_renewals().0;
            until("the channels never closed", || ab.channel_renewals().0 > parks);
        } else {
            std::thread::sleep(Duration::from_micros(rng.below(8_000) as u64));
        }
    }
    let (parks, opens) = ab.channel_renewals();
    assert!(parks >= 8 && opens >= 7, "the rounds found the channels parked {parks} times, opened {opens}");
    until("both ends never counted the same lifetimes", || ab.channel_renewals() == ba.channel_renewals());
}
