//! Raw TCP baselines measured in the same run, between the same two processes, on the same buffers
//! as the transfers they are compared with (so neither side gets cache-resident data for free):
//! `streams` parallel connections with a thread each (bandwidth: once streaming without message
//! ends, once as acknowledged messages with the transfers' depth), and a one-connection ping-pong of
//! the message size (latency).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard};
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
// SAFETY: as above; the threads share the pointer value, never the same bytes.
unsafe impl Sync for Shared {}

/// Connects `streams` connections for a baseline the server was just told about (it answers with
/// its port, then ACCEPTED once every stream arrived).
fn connect_streams(ctl: &mut Ctl, server: IpAddr, streams: usize) -> Io<Vec<TcpStream>> {
    let port: u16 = field(&ctl.expect("PORT")?, 1)?;
    let mut conns = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut s = TcpStream::connect(SocketAddr::new(server, port))?;
        s.set_nodelay(true)?;
        s.write_all(&(i as u32).to_le_bytes())?;
        conns.push(s);
    }
    ctl.expect("ACCEPTED")?;
    Ok(conns)
}

/// The server's half of `connect_streams`: the streams in the client's order.
fn accept_streams(ctl: &mut Ctl, streams: usize) -> Io<Vec<TcpStream>> {
    let listener = TcpListener::bind("0.0.0.0:0")?;
    ctl.send(&format!("PORT {}", listener.local_addr()?.port()))?;
    let mut conns: Vec<Option<TcpStream>> = (0..streams).map(|_| None).collect();
    for _ in 0..streams {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut idx = [0u8; 4];
        s.read_exact(&mut idx)?;
        let i = u32::from_le_bytes(idx) as usize;
        match conns.get_mut(i) {
            Some(slot @ None) => *slot = Some(s),
            _ => return Err(std::io::Error::other("raw baseline stream index out of range or repeated")),
        }
    }
    ctl.send("ACCEPTED")?;
    Ok(conns.into_iter().map(|s| s.expect("every stream arrived")).collect())
}

/// Runs `each(i, stream, part i of buf)` on a scoped thread per stream and joins them all.
fn per_stream<F>(conns: Vec<TcpStream>, buf: Shared, size: usize, each: F) -> Io<()>
where
    F: Fn(usize, TcpStream, &mut [u8]) -> Io<()> + Sync,
{
    let streams = conns.len();
    std::thread::scope(|sc| -> Io<()> {
        let each = &each;
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                sc.spawn(move || {
                    let r = part(size, streams, i);
                    let buf = buf;
                    // SAFETY: the caller's buffer outlives the scope and holds `size` bytes; each
                    // thread touches only its own part.
                    let mine = unsafe { std::slice::from_raw_parts_mut(buf.0.add(r.start), r.len()) };
                    each(i, s, mine)
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| std::io::Error::other("raw baseline thread panicked"))??;
        }
        Ok(())
    })
}

/// Client side of the bandwidth ceiling: `iters` times `size` bytes from `src` over `streams`
/// connections, every stream writing its part without waiting for anything (no message ends: what
/// the streams carry at best). Returns GB/s, timed from when all connections are up until the server
/// has it all.
pub fn streams_client(ctl: &mut Ctl, server: IpAddr, src: &[u8], streams: usize, iters: usize) -> Io<f64> {
    let size = src.len();
    ctl.send(&format!("RAW {size} {streams} {iters}"))?;
    let conns = connect_streams(ctl, server, streams)?;
    let start = Instant::now();
    per_stream(conns, Shared(src.as_ptr() as *mut u8), size, |_, mut s, mine| {
        for _ in 0..iters {
            s.write_all(mine)?;
        }
        Ok(())
    })?;
    ctl.expect("DONE")?;
    Ok((size * iters) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

pub fn streams_server(ctl: &mut Ctl, dst: &mut [u8], words: &[String]) -> Io<()> {
    receive_streams(ctl, dst, words, false)
}

/// The server side of both bandwidth baselines: every stream reads its part of each message, and
/// with `ack` answers each part with one byte.
fn receive_streams(ctl: &mut Ctl, dst: &mut [u8], words: &[String], ack: bool) -> Io<()> {
    let (size, streams, iters): (usize, usize, usize) = (field(words, 1)?, field(words, 2)?, field(words, 3)?);
    check_fits(size, dst.len(), streams)?;
    let conns = accept_streams(ctl, streams)?;
    per_stream(conns, Shared(dst.as_mut_ptr()), size, |_, mut s, mine| {
        for _ in 0..iters {
            s.read_exact(mine)?;
            if ack {
                s.write_all(&[1])?;
            }
        }
        Ok(())
    })?;
    ctl.send("DONE")
}

/// Streams the message baseline uses for `size`: those of the bandwidth baseline, but none with less
/// than 64 KiB of each message (a small transfer rides one stream, the control stream, so the
/// baseline should not pay a barrier over streams that carry nothing).
pub fn message_streams(size: usize, streams: usize) -> usize {
    streams.min(size.div_ceil(64 << 10)).max(1)
}

/// Client side of the message baseline: the same streams carry `iters` messages of `size` bytes,
/// each split over all streams, and a message counts as delivered once the server acknowledged every
/// part of it (one byte back per stream). At most `depth` messages are unacknowledged: message `m`
/// starts on any stream only after every part of message `m - depth` was acknowledged. That is the
/// work a transfer does at that depth (the last byte landed and the sender heard so), on plain TCP.
pub fn messages_client(
    ctl: &mut Ctl,
    server: IpAddr,
    src: &[u8],
    streams: usize,
    iters: usize,
    depth: usize,
) -> Io<f64> {
    let size = src.len();
    ctl.send(&format!("RAWMSG {size} {streams} {iters}"))?;
    let conns = connect_streams(ctl, server, streams)?;
    let acked = AckRound::new(streams);
    let start = Instant::now();
    per_stream(conns, Shared(src.as_ptr() as *mut u8), size, |_, mut s, mine| {
        let mut ack = [0u8; 1];
        let run = (|| {
            for m in 0..iters + depth {
                if m >= depth {
                    s.read_exact(&mut ack)?;
                    acked.wait()?;
                }
                if m < iters {
                    s.write_all(mine)?;
                }
            }
            Ok(())
        })();
        if run.is_err() {
            acked.abandon();
        }
        run
    })?;
    let elapsed = start.elapsed();
    ctl.expect("DONE")?;
    Ok((size * iters) as f64 / elapsed.as_secs_f64() / 1e9)
}

pub fn messages_server(ctl: &mut Ctl, dst: &mut [u8], words: &[String]) -> Io<()> {
    receive_streams(ctl, dst, words, true)
}

/// A barrier over the client's stream threads that a failing thread breaks for the others, so that
/// one broken stream ends the run instead of leaving the rest waiting.
struct AckRound {
    state: Mutex<(usize, u64, bool)>,
    turned: Condvar,
    threads: usize,
}

impl AckRound {
    fn new(threads: usize) -> AckRound {
        AckRound { state: Mutex::new((0, 0, false)), turned: Condvar::new(), threads }
    }

    fn lock(&self) -> MutexGuard<'_, (usize, u64, bool)> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait(&self) -> Io<()> {
        let mut st = self.lock();
        let round = st.1;
        st.0 += 1;
        if st.0 == self.threads {
            *st = (0, round + 1, st.2);
            self.turned.notify_all();
        }
        while st.1 == round && !st.2 {
            st = self.turned.wait(st).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if st.2 { Err(std::io::Error::other("another raw baseline stream failed")) } else { Ok(()) }
    }

    fn abandon(&self) {
        self.lock().2 = true;
        self.turned.notify_all();
    }
}

fn check_fits(size: usize, have: usize, streams: usize) -> Io<()> {
    if size > have || streams == 0 || streams > 1024 {
        return Err(std::io::Error::other(format!("raw baseline of {size} bytes over {streams} streams does not fit")));
    }
    Ok(())
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
    fn ack_rounds_hold_every_thread_until_the_last_and_a_failure_releases_them() {
        use super::AckRound;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let round = AckRound::new(3);
        let passed = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    round.wait().unwrap();
                    passed.fetch_add(1, Ordering::SeqCst);
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(passed.load(Ordering::SeqCst), 0, "two of three threads are held");
            round.wait().unwrap();
        });
        assert_eq!(passed.load(Ordering::SeqCst), 2);
        // The next round: one thread waits, another fails instead of arriving.
        std::thread::scope(|sc| {
            let waiter = sc.spawn(|| round.wait());
            std::thread::sleep(std::time::Duration::from_millis(20));
            round.abandon();
            assert!(waiter.join().unwrap().is_err(), "released with an error");
        });
        assert!(round.wait().is_err(), "an abandoned round stays broken");
    }

    #[test]
    fn message_streams_carry_at_least_64_kib_each() {
        use super::message_streams;
        assert_eq!(message_streams(8, 16), 1);
        assert_eq!(message_streams(64 << 10, 16), 1);
        assert_eq!(message_streams((64 << 10) + 1, 16), 2);
        assert_eq!(message_streams(1 << 20, 16), 16);
        assert_eq!(message_streams(64 << 20, 16), 16);
        assert_eq!(message_streams(0, 4), 1);
    }

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
