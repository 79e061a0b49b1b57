//! A hostile peer on the socket transport's data sockets: bad hellos are ignored, late sockets that
//! do not belong to a live comm are refused, and a bad piece header fails the receiving comm cleanly
//! (an error from `test`, nothing written outside the posted buffer, a prompt drop). The peer speaks
//! the wire format of src/transport/socket/pure/wire.rs by hand.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use uccl_tcpx::internal::transport::socket::SocketNet;
use uccl_tcpx::internal::transport::{ListenComm, MrHandle, Net, NetHandle, RecvComm};
use uccl_tcpx::{SocketConfig, UcclStatus};

mod common;
use common::PATIENCE;

const HELLO_MAGIC: u32 = 0x5353_5455;
const PIECE_MAGIC: u32 = 0x4350_5455;
const ACK_MAGIC: u32 = 0x4B41_5455;
/// The data socket wire's version (`VERSION` in wire.rs).
const VERSION: u16 = 6;
const PIECE: u32 = 4096;

fn net() -> SocketNet {
    common::socket::socket_net(SocketConfig { nthreads: 1, nsocks_per_thread: 1, ..SocketConfig::default() })
}

fn target(handle: &NetHandle) -> (SocketAddr, u64) {
    let port = u16::from_le_bytes([handle[6], handle[7]]);
    let ip = Ipv4Addr::new(handle[8], handle[9], handle[10], handle[11]);
    (SocketAddr::from((ip, port)), u64::from_le_bytes(handle[24..32].try_into().unwrap()))
}

fn hello(nonce: u64, comm_id: u64, index: u8, count: u8) -> Vec<u8> {
    hello_with(nonce, comm_id, index, count, PIECE)
}

fn hello_with(nonce: u64, comm_id: u64, index: u8, count: u8, piece_size: u32) -> Vec<u8> {
    let mut b = HELLO_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&[index, count]);
    b.extend_from_slice(&nonce.to_le_bytes());
    b.extend_from_slice(&comm_id.to_le_bytes());
    b.extend_from_slice(&piece_size.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// What the listener writes on a socket it added to a live comm.
fn ack(index: u8) -> Vec<u8> {
    let mut b = ACK_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&[index, 0]);
    b
}

fn piece(magic: u32, seq: u64, offset: u64, len: u32, total: u64) -> Vec<u8> {
    let mut b = magic.to_le_bytes().to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    b.extend(std::iter::repeat_n(0xab, len as usize));
    b
}

/// Whether the other end closed `s` (a listener drops a connection whose hello it refuses).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("the listener sent bytes"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Asks `listen` for comms, failing the test if it hands one out, until `done`: the listener reads
/// hellos only when asked.
fn refuse_until(listen: &mut dyn ListenComm, what: &str, mut done: impl FnMut() -> bool) {
    common::wait_until(what, PATIENCE, || {
        assert!(listen.accept().unwrap().is_none(), "{what}: a bad hello made a comm");
        done()
    });
}

/// A one-socket comm whose sending side is ours to script.
fn hostile_comm() -> (TcpStream, Box<dyn RecvComm>) {
    let (mut sockets, comm) = hostile_comm_of(1, PIECE);
    (sockets.remove(0), comm)
}

/// A comm of `count` sockets announcing pieces of up to `piece_size` bytes, all its sockets ours.
fn hostile_comm_of(count: u8, piece_size: u32) -> (Vec<TcpStream>, Box<dyn RecvComm>) {
    let net = net();
    let (handle, mut listen) = net.listen(0).unwrap();
    let (addr, nonce) = target(&handle);
    let sockets = (0..count)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&hello_with(nonce, 42, i, count, piece_size)).unwrap();
            s
        })
        .collect();
    let comm = common::comm::accept(&mut *listen);
    (sockets, comm)
}

/// Posts receives of `posted` bytes (into buffers of `posted + 64`), sends `bytes`, and expects the
/// comm to fail with ErrBackend naming `what`, with nothing written past the posted length.
fn expect_failure(receives: usize, posted: usize, bytes: &[u8], what: &str) {
    let (peer, comm) = hostile_comm();
    expect_failure_on(vec![peer], comm, receives, posted, bytes, what);
}

/// The same on a comm of `peers`, `bytes` sent on the first; the others stay open meanwhile, so
/// the comm fails for what it read, not for a closed socket.
fn expect_failure_on(
    mut peers: Vec<TcpStream>,
    mut comm: Box<dyn RecvComm>,
    receives: usize,
    posted: usize,
    bytes: &[u8],
    what: &str,
) {
    let mut bufs: Vec<Vec<u8>> = (0..receives).map(|_| vec![0u8; posted + 64]).collect();
    let ids: Vec<_> =
        // SAFETY: each b is a live Vec of posted + 64 bytes (posted of them handed over), read only after the
        // comm has failed below, and a failed comm writes no receive buffer.
        bufs.iter_mut().map(|b| unsafe { comm.irecv(b.as_mut_ptr(), posted, MrHandle(0)) }.unwrap().unwrap()).collect();
    peers[0].write_all(bytes).unwrap();
    let mut next = 0;
    let err = common::eventually(&format!("{what}: the comm fails"), PATIENCE, || match comm.test(ids[next]) {
        Ok(Some(_)) if next + 1 < ids.len() => {
            next += 1;
            None
        }
        Ok(Some(n)) => panic!("{what}: the last receive completed with {n} bytes"),
        Ok(None) => None,
        Err(e) => Some(e),
    });
    assert_eq!(err.status(), UcclStatus::ErrBackend, "{what}: {err}");
    assert!(err.message().contains(what), "{what}: {err}");
    for b in &bufs {
        assert!(b[posted..].iter().all(|&x| x == 0), "{what}: bytes past the posted receive were written");
    }
    common::within(common::PATIENCE, &format!("{what}: dropping the failed comm"), move || drop(comm));
}

#[test]
fn bad_magic_fails_the_comm() {
    expect_failure(1, 100, &piece(0xdead_beef, 0, 0, 10, 10), "bad magic");
}

#[test]
fn piece_off_the_senders_cut_fails_the_comm() {
    expect_failure(1, 10_000, &piece(PIECE_MAGIC, 0, 100, PIECE, 10_000), "pieces are 4096 bytes");
    expect_failure(1, 10_000, &piece(PIECE_MAGIC, 0, 0, 100, 10_000), "pieces are 4096 bytes");
    expect_failure(1, 10_000, &piece(PIECE_MAGIC, 0, 12_288, 0, 10_000), "pieces are 4096 bytes");
}

/// A comm of four sockets and 256 KiB pieces shares a 256 KiB request in four 64 KiB pieces: the
/// receiver takes exactly that cut, on any of the sockets, and refuses the fixed 256 KiB one and
/// any piece off the shared boundaries.
#[test]
fn shared_pieces_follow_the_senders_cut() {
    const K: u32 = 1024;
    let total = 256 * K;
    let (mut sockets, mut comm) = hostile_comm_of(4, total);
    let mut buf = vec![0u8; total as usize + 64];
    // SAFETY: buf is a live Vec of total + 64 bytes, read once the receive completed.
    let id = unsafe { comm.irecv(buf.as_mut_ptr(), total as usize, MrHandle(0)) }.unwrap().unwrap();
    for i in 0..4u64 {
        let at = i * 64 * K as u64;
        sockets[0].write_all(&piece(PIECE_MAGIC, 0, at, 64 * K, total as u64)).unwrap();
    }
    let n = common::eventually("the shared pieces complete the receive", PATIENCE, || comm.test(id).unwrap());
    assert_eq!(n, total as usize);
    assert!(buf[..total as usize].iter().all(|&x| x == 0xab) && buf[total as usize..].iter().all(|&x| x == 0));
    drop(sockets);

    let whole = piece(PIECE_MAGIC, 0, 0, total, total as u64);
    let (sockets, comm) = hostile_comm_of(4, total);
    expect_failure_on(sockets, comm, 1, total as usize, &whole, "its pieces are 65536 bytes");
    // 300 KiB shares as 76 KiB pieces; a 64 KiB one is off the cut.
    let off = piece(PIECE_MAGIC, 0, 64 * K as u64, 64 * K, 300 * K as u64);
    let (sockets, comm) = hostile_comm_of(4, total);
    expect_failure_on(sockets, comm, 1, 300 * K as usize, &off, "its pieces are 77824 bytes");
}

#[test]
fn message_larger_than_the_receive_is_refused_without_writing() {
    let (posted, total) = (5000usize, 8192u64);
    expect_failure(1, posted, &piece(PIECE_MAGIC, 0, 4096, PIECE, total), "8192-byte message into a 5000-byte");
}

#[test]
fn repeated_piece_fails_the_comm() {
    let mut bytes = piece(PIECE_MAGIC, 0, 0, PIECE, 8192);
    bytes.extend(piece(PIECE_MAGIC, 0, 0, PIECE, 8192));
    expect_failure(1, 8192, &bytes, "received a piece twice");
}

#[test]
fn pieces_disagreeing_on_the_size_fail_the_comm() {
    let mut bytes = piece(PIECE_MAGIC, 0, 0, PIECE, 9000);
    bytes.extend(piece(PIECE_MAGIC, 0, 4096, PIECE, 8192));
    expect_failure(1, 10_000, &bytes, "disagree on its size");
}

#[test]
fn piece_of_a_completed_request_fails_the_comm() {
    let mut bytes = piece(PIECE_MAGIC, 0, 0, 10, 10);
    bytes.extend(piece(PIECE_MAGIC, 0, 0, 10, 10));
    expect_failure(2, 100, &bytes, "which is complete");
    let mut empty = piece(PIECE_MAGIC, 0, 0, 0, 0);
    empty.extend(piece(PIECE_MAGIC, 0, 0, 0, 0));
    expect_failure(2, 100, &empty, "which is complete");
}

#[test]
fn peer_closing_mid_piece_is_a_disconnect() {
    let (mut peer, mut comm) = hostile_comm();
    let mut buf = vec![0u8; 8192];
    // SAFETY: buf is a live 8192-byte Vec, read only after the receive has failed with the peer's disconnect
    // below.
    let id = unsafe { comm.irecv(buf.as_mut_ptr(), buf.len(), MrHandle(0)) }.unwrap().unwrap();
    peer.write_all(&piece(PIECE_MAGIC, 0, 0, PIECE, 8192)[..1000]).unwrap();
    drop(peer);
    let err = common::eventually("the closed peer is noticed", PATIENCE, || match comm.test(id) {
        Ok(None) => None,
        Ok(Some(n)) => panic!("completed with {n} bytes"),
        Err(e) => Some(e),
    });
    assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");
}

#[test]
fn bad_hellos_never_make_a_comm() {
    let net = net();
    let (handle, mut listen) = net.listen(0).unwrap();
    let (addr, nonce) = target(&handle);
    let mut bad_hellos =
        vec![hello(nonce ^ 1, 1, 0, 1), hello(nonce, 2, 1, 1), hello(nonce, 3, 0, 0), hello(nonce, 4, 0, 65)];
    let mut version = hello(nonce, 5, 0, 1);
    version[4] = 9;
    bad_hellos.push(version);
    let mut piece_size = hello(nonce, 6, 0, 1);
    piece_size[24..28].copy_from_slice(&1u32.to_le_bytes());
    bad_hellos.push(piece_size);
    // An unknown flag, spare sockets without acknowledgements, and the version before either.
    for (at, value) in [(28, 2u8), (29, 1), (30, 1), (4, 5)] {
        let mut h = hello(nonce, 7 + at as u64, 0, 1);
        h[at] = value;
        bad_hellos.push(h);
    }
    let connect = |h: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(h).unwrap();
        s
    };
    let mut refused: Vec<TcpStream> = bad_hellos.iter().map(|h| connect(h)).collect();
    let mut dropped = vec![false; refused.len()];
    refuse_until(&mut *listen, "the listener drops every bad hello", || {
        for (s, d) in refused.iter_mut().zip(dropped.iter_mut()) {
            *d = *d || closed_by_peer(s);
        }
        dropped.iter().all(|d| *d)
    });
    // Socket 1 of a comm of two, before its first: held, no comm. Another socket claiming the same
    // index of comm 7 is dropped (whichever of the two the listener reads second).
    let mut early = connect(&hello(nonce, 7, 1, 2));
    let mut dup = connect(&hello(nonce, 7, 1, 2));
    refuse_until(&mut *listen, "the listener drops one of two sockets claiming one index", || {
        closed_by_peer(&mut early) || closed_by_peer(&mut dup)
    });
    let mut held = if closed_by_peer(&mut early) { dup } else { early };
    // The listener still serves good comms.
    let _good = connect(&hello(nonce, 8, 0, 1));
    let _comm = common::comm::accept(&mut *listen);
    // The first socket of comm 7 makes it, with the socket that came early, which is acknowledged.
    let _first = connect(&hello(nonce, 7, 0, 2));
    let _comm7 = common::comm::accept(&mut *listen);
    held.set_nonblocking(false).unwrap();
    held.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = [0u8; 8];
    held.read_exact(&mut got).unwrap();
    assert_eq!(got.to_vec(), ack(1));
}

/// A comm of four sockets whose first is ours, handed out, its listen comm gone: the net's acceptor
/// serves its listener. Late sockets join only when they name this comm, fit it and are new; every
/// other is closed and counted, and the comm keeps taking pieces on its sockets throughout.
#[test]
fn late_hellos_that_do_not_fit_a_live_comm_are_refused() {
    let net = net();
    let (handle, mut listen) = net.listen(0).unwrap();
    let (addr, nonce) = target(&handle);
    let connect = |h: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(h).unwrap();
        s
    };
    let mut first = connect(&hello(nonce, 42, 0, 4));
    let mut comm = common::comm::accept(&mut *listen);
    drop(listen);
    assert_eq!(net.data_socket_stats().receiving, 1);

    // A proper late socket is acknowledged and carries pieces.
    let mut second = connect(&hello(nonce, 42, 2, 4));
    second.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = [0u8; 8];
    second.read_exact(&mut got).unwrap();
    assert_eq!(got.to_vec(), ack(2));
    assert_eq!(net.data_socket_stats().receiving, 2);

    let mut bogus = vec![
        ("another comm", hello(nonce ^ 1, 42, 1, 4)),
        ("an unknown comm", hello(nonce, 43, 1, 4)),
        ("a second first socket", hello(nonce, 42, 0, 4)),
        ("a duplicate", hello(nonce, 42, 2, 4)),
        ("another count", hello(nonce, 42, 1, 8)),
        ("another piece size", hello_with(nonce, 42, 1, 4, 2 * PIECE)),
        ("an index past the count", hello(nonce, 42, 4, 4)),
    ];
    let mut old = hello(nonce, 42, 1, 4);
    old[4] = 3;
    bogus.push(("the version before sockets were added late", old));
    let mut acked = hello(nonce, 42, 1, 4);
    acked[28] = 1;
    bogus.push(("acknowledgements its comm did not ask for", acked));
    for (what, h) in &bogus {
        let mut s = connect(h);
        common::wait_until(&format!("{what} is closed"), PATIENCE, || closed_by_peer(&mut s));
    }
    // Only those that named this listener's comm count as refused; the others never got that far.
    common::wait_until("the refusals are counted", PATIENCE, || net.data_socket_stats().refused == 6);

    // The comm still takes pieces on both its sockets.
    let mut buf = vec![0u8; 2 * PIECE as usize];
    // SAFETY: buf is a live Vec, read once the receive completed.
    let id = unsafe { comm.irecv(buf.as_mut_ptr(), buf.len(), MrHandle(0)) }.unwrap().unwrap();
    first.write_all(&piece(PIECE_MAGIC, 0, PIECE as u64, PIECE, 2 * PIECE as u64)).unwrap();
    second.write_all(&piece(PIECE_MAGIC, 0, 0, PIECE, 2 * PIECE as u64)).unwrap();
    let n = common::eventually("the pieces complete the receive", PATIENCE, || comm.test(id).unwrap());
    assert_eq!(n, buf.len());
    assert!(buf.iter().all(|&b| b == 0xab));
    assert_eq!(net.data_socket_stats().receiving, 2, "no refused socket was added");

    // Once the comm is gone, so is its listener: a late socket finds nobody.
    drop(comm);
    common::wait_until("the listener closes with its comm", PATIENCE, || match TcpStream::connect(addr) {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(&hello(nonce, 42, 3, 4));
            common::wait_until("a socket for a closed comm is closed", PATIENCE, || closed_by_peer(&mut s));
            false
        }
    });
}
