//! Engines over the socket transport with several connections, channels and sockets per comm:
//! concurrent writes, reads and sends of random sizes from several threads, every byte checked, with
//! one socket per comm and with many.

use std::sync::Arc;

use uccl_tcpx::{Config, Connection, Engine, OneSided, SocketConfig};

mod common;
use common::{Rng, pattern};

fn config(socket: SocketConfig) -> Config {
    Config { num_channels: Some(3), chunk_size: 64 << 10, socket, ..common::loopback() }
}

fn wait(conn: &Connection, id: u64) -> u64 {
    common::wait(conn, id).unwrap()
}

/// One thread's traffic on its own connection: `rounds` batches of a write, a read and a send of
/// random sizes in flight together, each checked byte for byte.
fn traffic(a: &Engine, b: &Engine, ab: &Arc<Connection>, ba: &Arc<Connection>, seed: u64, rounds: usize) {
    let mut rng = Rng::new(&format!("connection {seed}"));
    let max = 3 << 20;
    let mut src = vec![0u8; max];
    let mut dst = vec![0u8; max];
    let mut remote = vec![0u8; 2 * max];
    let smr = a.register(src.as_mut_ptr() as usize, max).unwrap();
    let dmr = a.register(dst.as_mut_ptr() as usize, max).unwrap();
    let rmr = b.register(remote.as_mut_ptr() as usize, remote.len()).unwrap();
    let fifo = b.prepare_fifo(rmr, remote.as_ptr() as usize, remote.len()).unwrap();
    for round in 0..rounds {
        let sizes: Vec<usize> = (0..3)
            .map(|_| match rng.below(4) {
                0 => 1 + rng.below(100),
                1 => rng.below(64 << 10) + 1,
                _ => rng.below(max) + 1,
            })
            .collect();
        let (w, r, s) = (sizes[0], sizes[1], sizes[2]);
        let s_seed = seed * 1000 + round as u64;
        // The write source and the send source share `src`: both are read-only while in flight.
        let payload = pattern(w.max(s), s_seed);
        src[..payload.len()].copy_from_slice(&payload);
        let read_src = pattern(r, s_seed + 1);
        remote[max..max + r].copy_from_slice(&read_src);
        remote[..w].fill(0);
        dst[..r].fill(0);
        let mut recv_buf = vec![0u8; s + 8];
        let recv_mr = b.register(recv_buf.as_mut_ptr() as usize, recv_buf.len()).unwrap();
        let rid = ba.recv(recv_mr, recv_buf.as_mut_ptr() as usize, recv_buf.len()).unwrap();
        let wid = ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: w, remote: fifo }]).unwrap();
        let mut read_at = fifo;
        read_at.addr += max as u64;
        let rd = ab.read(&[OneSided { mr: dmr, addr: dst.as_ptr() as usize, len: r, remote: read_at }]).unwrap();
        let sid = ab.send(&[(smr, src.as_ptr() as usize, s)]).unwrap();
        assert_eq!(wait(ab, wid), w as u64);
        assert_eq!(wait(ab, rd), r as u64);
        assert_eq!(wait(ab, sid), s as u64);
        assert_eq!(wait(ba, rid), s as u64);
        assert!(remote[..w] == payload[..w], "seed {seed} round {round}: write of {w} bytes corrupted");
        assert!(dst[..r] == read_src[..], "seed {seed} round {round}: read of {r} bytes corrupted");
        assert!(recv_buf[..s] == payload[..s], "seed {seed} round {round}: send of {s} bytes corrupted");
        assert!(recv_buf[s..].iter().all(|&x| x == 0), "bytes past the sent message were written");
        b.deregister(recv_mr).unwrap();
    }
}

fn many_connections(socket: SocketConfig) {
    many_connections_with(config(socket));
}

fn many_connections_with(config: Config) {
    let a = Engine::new(config.clone()).unwrap();
    let b = Arc::new(Engine::new(config).unwrap());
    let conns: Vec<(Arc<Connection>, Arc<Connection>)> = (0..3)
        .map(|_| {
            let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
            (ab, common::accept(&b).unwrap())
        })
        .collect();
    std::thread::scope(|s| {
        for (i, (ab, ba)) in conns.iter().enumerate() {
            let (a, b) = (&a, &b);
            s.spawn(move || traffic(a, b, ab, ba, 7 + i as u64, 12));
        }
    });
    drop(conns);
    a.shutdown();
    b.shutdown();
}

#[test]
fn concurrent_transfers_with_one_socket_per_comm() {
    many_connections(SocketConfig { nthreads: 1, nsocks_per_thread: 1, ..SocketConfig::default() });
}

#[test]
fn concurrent_transfers_with_many_sockets_per_comm() {
    // 3 channels x 2 comm directions x 6 sockets per comm, 16 KiB pieces: every chunk is reassembled
    // from pieces that travelled on different sockets.
    many_connections(SocketConfig { nthreads: 3, nsocks_per_thread: 2, subchunk: 16 << 10, ..SocketConfig::default() });
}

#[test]
fn concurrent_transfers_spread_over_channels_and_sockets() {
    // 4 channels x 2 MiB chunks (a plugin engine's from 16 cores), 4 sockets per comm, 256 KiB pieces. Every
    // transfer here (up to 3 MiB) is below a full chunk per channel, so it is cut in shares per
    // channel, and each chunk in shares per socket.
    let socket = SocketConfig { nthreads: 4, nsocks_per_thread: 1, ..SocketConfig::default() };
    assert_eq!(socket.subchunk, 256 << 10);
    many_connections_with(Config { num_channels: Some(4), chunk_size: 2 << 20, ..config(socket) });
}

#[test]
fn concurrent_transfers_in_small_pieces() {
    // Pieces of 16 KiB over four sockets per comm: every transfer is many pieces on every socket.
    many_connections(SocketConfig { nthreads: 2, nsocks_per_thread: 2, subchunk: 16 << 10, ..SocketConfig::default() });
}

/// A data interface list that names no interface fails the engine's creation, saying which
/// setting and why; one that names the loopback interface gives a working engine pair.
#[test]
fn data_interface_lists_are_checked_at_creation() {
    let socket = |spec: &str| uccl_tcpx::SocketConfig {
        data_ifname: Some(spec.to_owned()),
        ..uccl_tcpx::SocketConfig::default()
    };
    for bad in ["=no-such-if9", "^", "^lo,e,w,d,b,v,t,c,i,s,p,m,n,g,a,f,h,j,k,l,o,q,r,u,x,y,z"] {
        let err = Engine::new(Config { socket: socket(bad), ..common::loopback() }).err().expect(bad);
        assert!(err.message().contains("UCCL_TCPX_SOCKET_IFNAME"), "{bad}: {}", err.message());
    }
    let lo = uccl_tcpx::internal::sys::iface::list()
        .unwrap()
        .into_iter()
        .find(|i| i.loopback && i.addr.is_ipv4())
        .expect("a loopback interface");
    let p = common::pair(Config { socket: socket(&format!("={}", lo.name)), ..common::loopback() });
    let data = vec![7u8; 300_000];
    let mr = p.a.register(data.as_ptr() as usize, data.len()).unwrap();
    let mut inbox = vec![0u8; data.len()];
    let imr = p.b.register(inbox.as_mut_ptr() as usize, inbox.len()).unwrap();
    let r = p.ba.recv(imr, inbox.as_mut_ptr() as usize, inbox.len()).unwrap();
    let s = p.ab.send(&[(mr, data.as_ptr() as usize, data.len())]).unwrap();
    assert_eq!(common::wait(&p.ab, s).unwrap(), data.len() as u64);
    assert_eq!(common::wait(&p.ba, r).unwrap(), data.len() as u64);
    assert!(inbox == data);
}
