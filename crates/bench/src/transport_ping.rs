//! Round trips over the socket transport's comms alone (no engine, no control messages), in this
//! process: what the transport itself adds to a message's latency.

use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::server::spin_us;
use uccl_tcpx::Config;
use uccl_tcpx::internal::transport::socket::SocketNet;
use uccl_tcpx::internal::transport::{MrHandle, Net, RecvComm, SendComm};

type Io<T> = std::io::Result<T>;

fn err(e: uccl_tcpx::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A net whose completions unpark `thread`, the way the engine's progress thread is woken.
fn net(config: &Config, thread: Thread) -> SocketNet {
    let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || thread.unpark());
    SocketNet::new("127.0.0.1".parse().unwrap(), Duration::from_secs(5), Duration::from_secs(30), wake)
        .with_options(config.socket.clone())
}

/// One direction: a send comm from `from` to a listener of `to`.
fn comm_pair(from: &SocketNet, to: &SocketNet) -> Io<(Box<dyn SendComm>, Box<dyn RecvComm>)> {
    let (mut handle, mut listen) = to.listen(0).map_err(err)?;
    let send = from.connect(0, &mut handle).map_err(err)?.ok_or_else(|| std::io::Error::other("connect pending"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(recv) = listen.accept().map_err(err)? {
            return Ok((send, recv));
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other("transport accept timed out"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Polls `f` for a short while, then sleeps until a completion wakes this thread.
fn until<T>(mut f: impl FnMut() -> uccl_tcpx::Result<Option<T>>) -> Io<T> {
    let spin_until = Instant::now() + Duration::from_micros(spin_us());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().map_err(err)? {
            return Ok(v);
        }
        let now = Instant::now();
        if now > deadline {
            return Err(std::io::Error::other("transport request did not finish within 30 s"));
        }
        if now > spin_until {
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }
}

fn exchange(send: &mut dyn SendComm, recv: &mut dyn RecvComm, buf: &mut [u8], first_send: bool) -> Io<()> {
    let len = buf.len();
    let mut do_send = |buf: &mut [u8]| -> Io<()> {
        // SAFETY: `buf` outlives the request, which is tested to completion here.
        let id = until(|| unsafe { send.isend(buf.as_ptr(), len, MrHandle(0)) })?;
        until(|| send.test(id)).map(|_| ())
    };
    if first_send {
        do_send(buf)?;
    }
    // SAFETY: as above; nothing else touches `buf` until the receive completed.
    let id = until(|| unsafe { recv.irecv(buf.as_mut_ptr(), len, MrHandle(0)) })?;
    until(|| recv.test(id))?;
    recv.irecv_consumed(id).map_err(err)?;
    if !first_send {
        do_send(buf)?;
    }
    Ok(())
}

/// `iters` round trips of `size` bytes each way between two threads of this process.
pub fn round_trips(size: usize, iters: usize, config: &Config) -> Io<Vec<Duration>> {
    let warmup = (iters / 10).clamp(1, 10);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<(Box<dyn SendComm>, Box<dyn RecvComm>)>();
        let echo = s.spawn(move || -> Io<()> {
            let Ok((mut send, mut recv)) = rx.recv() else { return Ok(()) };
            let mut buf = vec![0u8; size];
            for _ in 0..warmup + iters {
                exchange(&mut *send, &mut *recv, &mut buf, false)?;
            }
            Ok(())
        });
        let a = net(config, std::thread::current());
        let b = net(config, echo.thread().clone());
        let (a_send, b_recv) = comm_pair(&a, &b)?;
        let (b_send, a_recv) = comm_pair(&b, &a)?;
        let (mut a_send, mut a_recv) = (a_send, a_recv);
        tx.send((b_send, b_recv)).map_err(|_| std::io::Error::other("echo thread gone"))?;
        let mut buf = vec![0x5au8; size];
        let mut samples = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t = Instant::now();
            exchange(&mut *a_send, &mut *a_recv, &mut buf, true)?;
            if i >= warmup {
                samples.push(t.elapsed());
            }
        }
        echo.join().map_err(|_| std::io::Error::other("echo thread panicked"))??;
        Ok(samples)
    })
}
