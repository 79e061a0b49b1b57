//! Many connections of one engine moving data at once (host memory, loopback): connections closing
//! while the others move data take nothing of the others' with them. Every open connection's write
//! lands whole in its own target, a closed one's ends with a status (never a hang), and the open
//! ones move data again afterwards.

use std::sync::Arc;

use uccl_tcpx::{Config, Engine, OneSided, UcclStatus};

mod common;
use common::{accept, pattern, wait};

#[test]
fn connections_closing_while_others_move_data_lose_nothing_of_theirs() {
    const N: usize = 48;
    // Over the inline limit, so the channels carry every write.
    const LEN: usize = 320 << 10;
    let config = Config { num_channels: Some(2), ..common::loopback() };
    let a = Arc::new(Engine::new(config.clone()).unwrap());
    let b = Arc::new(Engine::new(config).unwrap());
    let src: Vec<Vec<u8>> = (0..N).map(|i| pattern(2 * LEN, i as u64 + 1)).collect();
    let mut dst: Vec<Vec<u8>> = (0..N).map(|_| vec![0u8; LEN]).collect();
    let smrs: Vec<u64> = src.iter().map(|s| a.register(s.as_ptr() as usize, s.len()).unwrap()).collect();
    let targets: Vec<_> = dst
        .iter_mut()
        .map(|d| {
            let mr = b.register(d.as_mut_ptr() as usize, LEN).unwrap();
            b.prepare_fifo(mr, d.as_mut_ptr() as usize, LEN).unwrap()
        })
        .collect();
    let conns: Vec<_> = (0..N)
        .map(|_| {
            let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
            (ab, accept(&b).unwrap())
        })
        .collect();
    // Connection i writes half `round` of its source into its own target.
    let write = |i: usize, round: usize| {
        let op = OneSided { mr: smrs[i], addr: src[i].as_ptr() as usize + round * LEN, len: LEN, remote: targets[i] };
        conns[i].0.write(&[op]).unwrap()
    };
    let closed = |i: usize| i.is_multiple_of(3);

    // Every connection writes at once; every third closes while the writes are in flight, from
    // one end or the other.
    let ids: Vec<u64> = (0..N).map(|i| write(i, 0)).collect();
    for i in (0..N).filter(|&i| closed(i)) {
        if i.is_multiple_of(2) { a.close_connection(&conns[i].0) } else { b.close_connection(&conns[i].1) }
    }
    let mut failed = 0;
    for (i, &id) in ids.iter().enumerate() {
        match wait(&conns[i].0, id) {
            Ok(n) => assert_eq!(n, LEN as u64, "connection {i}"),
            Err(e) if closed(i) => {
                assert!(e.status() != UcclStatus::ErrTimeout && !e.message().is_empty(), "connection {i}: {e}");
                failed += 1;
            }
            Err(e) => panic!("connection {i}, left open, failed: {e}"),
        }
    }
    eprintln!("{failed} of {} closed connections' writes ended with a status", N / 3);
    for (i, d) in dst.iter().enumerate().filter(|&(i, _)| !closed(i)) {
        assert!(d[..] == src[i][..LEN], "connection {i}: every byte of its first write");
    }

    // The open connections move data again, every byte in place.
    let again: Vec<(usize, u64)> = (0..N).filter(|&i| !closed(i)).map(|i| (i, write(i, 1))).collect();
    for &(i, id) in &again {
        assert_eq!(wait(&conns[i].0, id).unwrap(), LEN as u64, "connection {i}, second write");
    }
    for (i, d) in dst.iter().enumerate().filter(|&(i, _)| !closed(i)) {
        assert!(d[..] == src[i][LEN..], "connection {i}: every byte of its second write");
    }
    // A closed connection takes no more work.
    let refused =
        conns[0].0.write(&[OneSided { mr: smrs[0], addr: src[0].as_ptr() as usize, len: 8, remote: targets[0] }]);
    assert!(refused.is_err(), "a write on a closed connection");
}
