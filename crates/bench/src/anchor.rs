//! The ceiling any TCP transport on this host can reach: `streams` raw loopback TCP connections, one
//! thread per side each, moving `total` bytes (the same measurement as the C anchor tcp_stream.c).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

pub fn raw_tcp_streams(streams: usize, total: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind anchor listener");
    let addr = listener.local_addr().expect("anchor address");
    let per_stream = total / streams;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..streams {
            s.spawn(move || {
                let mut tx = TcpStream::connect(addr).expect("anchor connect");
                tx.set_nodelay(true).expect("nodelay");
                let buf = vec![0u8; 4 << 20];
                let mut sent = 0;
                while sent < per_stream {
                    let n = (per_stream - sent).min(buf.len());
                    tx.write_all(&buf[..n]).expect("anchor send");
                    sent += n;
                }
            });
        }
        for _ in 0..streams {
            let (mut rx, _) = listener.accept().expect("anchor accept");
            s.spawn(move || {
                let mut buf = vec![0u8; 4 << 20];
                let mut got = 0;
                while got < per_stream {
                    match rx.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
            });
        }
    });
    (per_stream * streams) as f64 / start.elapsed().as_secs_f64() / 1e9
}
