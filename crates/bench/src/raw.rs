//! Raw TCP baselines measured in the same run, between the same two processes, on the same buffers
//! as the transfers they are compared with (so neither side gets cache-resident data for free):
//! `streams` parallel connections with a thread each (bandwidth), and a one-connection ping-pong of
//! the message size (latency).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::ctl::{Ctl, field};

type Io<T> = std::io::Result<T>;

/// Byte range of part `i` of `size` split `n` ways.
fn part(size: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    size * i / n..size * (i + 1) / n
}

/// A raw pointer that crosses into scoped threads; each thread touches a disjoint range.
#[derive(Clone, Copy)]
struct Shared(*mut u8);
// SAFETY: only used with disjoint ranges per thread, joined before the buffer is used again.
unsafe impl Send for Shared {}

/// Client side of the bandwidth baseline: `iters` times `size` bytes from `src` over `streams`
/// connections. Returns GB/s, timed from when all connections are up until the server has it all.
pub fn streams_client(ctl: &mut Ctl, server: IpAddr, src: &[u8], streams: usize, iters: usize) -> Io<f64> {
    let size = src.len();
    ctl.send(&format!("RAW {size} {streams} {iters}"))?;
    let port: u16 = field(&ctl.expect("PORT")?, 1)?;
    let mut conns = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut s = TcpStream::connect(SocketAddr::new(server, port))?;
        s.set_nodelay(true)?;
        s.write_all(&(i as u32).to_le_bytes())?;
        conns.push(s);
    }
    ctl.expect("ACCEPTED")?;
    let start = Instant::now();
    let base = Shared(src.as_ptr() as *mut u8);
    std::thread::scope(|sc| -> Io<()> {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                sc.spawn(move || -> Io<()> {
                    let r = part(size, streams, i);
                    let base = base;
                    // SAFETY: `src` outlives the scope; this thread only reads its part.
                    let mine = unsafe { std::slice::from_raw_parts(base.0.add(r.start), r.len()) };
                    for _ in 0..iters {
                        s.write_all(mine)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| std::io::Error::other("raw sender panicked"))??;
        }
        Ok(())
    })?;
    ctl.expect("DONE")?;
    Ok((size * iters) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

pub fn streams_server(ctl: &mut Ctl, dst: &mut [u8], words: &[String]) -> Io<()> {
    let (size, streams, iters): (usize, usize, usize) = (field(words, 1)?, field(words, 2)?, field(words, 3)?);
    if size > dst.len() || streams == 0 || streams > 1024 {
        return Err(std::io::Error::other(format!("raw baseline of {size} bytes over {streams} streams does not fit")));
    }
    let listener = TcpListener::bind("0.0.0.0:0")?;
    ctl.send(&format!("PORT {}", listener.local_addr()?.port()))?;
    let mut conns: Vec<Option<TcpStream>> = (0..streams).map(|_| None).collect();
    for _ in 0..streams {
        let (mut s, _) = listener.accept()?;
        let mut idx = [0u8; 4];
        s.read_exact(&mut idx)?;
        let i = u32::from_le_bytes(idx) as usize;
        match conns.get_mut(i) {
            Some(slot @ None) => *slot = Some(s),
            _ => return Err(std::io::Error::other("raw baseline stream index out of range or repeated")),
        }
    }
    ctl.send("ACCEPTED")?;
    let base = Shared(dst.as_mut_ptr());
    std::thread::scope(|sc| -> Io<()> {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.expect("every stream arrived");
                sc.spawn(move || -> Io<()> {
                    let r = part(size, streams, i);
                    let base = base;
                    // SAFETY: `dst` outlives the scope; this thread only writes its part.
                    let mine = unsafe { std::slice::from_raw_parts_mut(base.0.add(r.start), r.len()) };
                    for _ in 0..iters {
                        s.read_exact(mine)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| std::io::Error::other("raw receiver panicked"))??;
        }
        Ok(())
    })?;
    ctl.send("DONE")
}

/// Client side of the latency baseline: round trips of `size` bytes each way; returns every sample.
pub fn pingpong_client(ctl: &mut Ctl, server: IpAddr, buf: &mut [u8], iters: usize) -> Io<Vec<Duration>> {
    let size = buf.len();
    ctl.send(&format!("PING {size} {iters}"))?;
    let port: u16 = field(&ctl.expect("PORT")?, 1)?;
    let mut s = TcpStream::connect(SocketAddr::new(server, port))?;
    s.set_nodelay(true)?;
    ctl.expect("ACCEPTED")?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        s.write_all(buf)?;
        s.read_exact(buf)?;
        samples.push(t.elapsed());
    }
    ctl.expect("DONE")?;
    Ok(samples)
}

pub fn pingpong_server(ctl: &mut Ctl, buf: &mut [u8], words: &[String]) -> Io<()> {
    let (size, iters): (usize, usize) = (field(words, 1)?, field(words, 2)?);
    if size > buf.len() {
        return Err(std::io::Error::other(format!("ping-pong of {size} bytes does not fit")));
    }
    let listener = TcpListener::bind("0.0.0.0:0")?;
    ctl.send(&format!("PORT {}", listener.local_addr()?.port()))?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    ctl.send("ACCEPTED")?;
    let mine = &mut buf[..size];
    for _ in 0..iters {
        s.read_exact(mine)?;
        s.write_all(mine)?;
    }
    ctl.send("DONE")
}

#[cfg(test)]
mod tests {
    use super::part;

    #[test]
    fn parts_cover_the_buffer_once() {
        for (size, n) in [(8usize, 2usize), (7, 3), (1, 4), (1 << 20, 6)] {
            let ranges: Vec<_> = (0..n).map(|i| part(size, n, i)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[n - 1].end, size);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
