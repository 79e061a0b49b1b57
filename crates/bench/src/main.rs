//! Loopback transfer benchmark: two engines in one process over the built-in transport, host
//! memory, every transfer kind, with a raw-TCP anchor measured in the same run.

mod anchor;
mod args;

use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::engine::OneSided;
use uccl_tcpx::{Config, Connection, Engine};

use args::{Args, Op};

struct Side {
    engine: Engine,
    buf: Vec<u8>,
    mr: u64,
}

impl Side {
    fn new(config: &Config, len: usize) -> Side {
        let engine = Engine::new(config.clone()).unwrap_or_else(|e| fail(&format!("engine: {e}")));
        let mut buf = vec![0u8; len];
        let mr = engine.register(buf.as_mut_ptr() as usize, len).unwrap_or_else(|e| fail(&format!("register: {e}")));
        Side { engine, buf, mr }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("uccl-tcpx-bench: {msg}");
    std::process::exit(1)
}

fn main() {
    let args = Args::parse(std::env::args().skip(1)).unwrap_or_else(|e| fail(&e));
    let max = *args.sizes.iter().max().expect("at least one size");
    let config = Config {
        num_channels: args.channels,
        ip: Some("127.0.0.1".parse().unwrap()),
        ..Config::from_env().unwrap_or_else(|e| fail(&e.to_string()))
    };
    let mut a = Side::new(&config, max * args.depth);
    let b = Side::new(&config, max * args.depth);
    for (i, byte) in a.buf.iter_mut().enumerate() {
        *byte = (i as u32).wrapping_mul(2654435761).rotate_left(7) as u8;
    }
    let ab = a.engine.connect("127.0.0.1", "0", b.engine.address().port()).unwrap_or_else(|e| fail(&e.to_string()));
    let ba = b.engine.accept().unwrap_or_else(|e| fail(&e.to_string()));
    let fifo = b.engine.prepare_fifo(b.mr, b.buf.as_ptr() as usize, b.buf.len()).unwrap();

    println!(
        "# uccl-tcpx loopback benchmark: socket transport, host memory, {} channels, chunk {} KiB, {} in flight",
        config.num_channels,
        config.chunk_size >> 10,
        args.depth
    );
    println!("{:<6} {:>10} {:>8} {:>10} {:>12}", "op", "size", "iters", "GB/s", "us/transfer");
    let mut best = 0.0f64;
    for &op in &args.ops {
        for &size in &args.sizes {
            let iters = args.iters.unwrap_or_else(|| (args.bytes / size).clamp(8, 20_000));
            let gbps = {
                let run = Run { op, size, depth: args.depth, ab: &ab, ba: &ba, a: &a, b: &b, fifo };
                verify(&run);
                run.measure(iters.min(2));
                let elapsed = run.measure(iters);
                let gbps = (size * iters) as f64 / elapsed.as_secs_f64() / 1e9;
                println!(
                    "{:<6} {:>10} {:>8} {:>10.3} {:>12.1}",
                    op.name(),
                    human(size),
                    iters,
                    gbps,
                    elapsed.as_secs_f64() * 1e6 / iters as f64
                );
                gbps
            };
            if size == max {
                best = best.max(gbps);
            }
        }
    }
    if args.anchor {
        let anchor = anchor::raw_tcp_streams(config.num_channels as usize, args.bytes.max(256 << 20));
        println!("# anchor: raw loopback TCP, {} streams, {:.3} GB/s", config.num_channels, anchor);
        println!("# best at {}: {:.3} GB/s = {:.2} x raw TCP", human(max), best, best / anchor);
    }
    drop((ab, ba));
    a.engine.shutdown();
    b.engine.shutdown();
}

struct Run<'a> {
    op: Op,
    size: usize,
    depth: usize,
    ab: &'a Arc<Connection>,
    ba: &'a Arc<Connection>,
    a: &'a Side,
    b: &'a Side,
    fifo: uccl_tcpx::proto::FifoItem,
}

impl Run<'_> {
    /// Keeps `depth` transfers in flight, slot `i % depth` of each buffer, until `iters` completed.
    fn measure(&self, iters: usize) -> Duration {
        let start = Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        for i in 0..iters {
            if inflight.len() == self.depth {
                self.complete(inflight.pop_front().expect("non-empty"));
            }
            inflight.push_back(self.post(i % self.depth));
        }
        while let Some(t) = inflight.pop_front() {
            self.complete(t);
        }
        start.elapsed()
    }

    fn post(&self, slot: usize) -> (u64, Option<u64>) {
        let off = slot * self.size;
        let local = self.a.buf.as_ptr() as usize + off;
        let mut remote = self.fifo;
        remote.addr += off as u64;
        let one = OneSided { mr: self.a.mr, addr: local, len: self.size, remote };
        let posted = match self.op {
            Op::Write => self.ab.write(&[one]).map(|id| (id, None)),
            Op::Read => self.ab.read(&[one]).map(|id| (id, None)),
            Op::Send => {
                let dst = self.b.buf.as_ptr() as usize + off;
                let r = self.ba.recv(self.b.mr, dst, self.size).unwrap_or_else(|e| fail(&e.to_string()));
                self.ab.send(&[(self.a.mr, local, self.size)]).map(|id| (id, Some(r)))
            }
        };
        posted.unwrap_or_else(|e| fail(&format!("{} post: {e}", self.op.name())))
    }

    fn complete(&self, (id, recv): (u64, Option<u64>)) {
        spin(self.ab, id);
        if let Some(r) = recv {
            spin(self.ba, r);
        }
    }
}

fn spin(conn: &Connection, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match conn.poll(id) {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::yield_now(),
            Ok(None) => fail("transfer did not finish within 60 s"),
            Err(e) => fail(&format!("transfer failed: {e}")),
        }
    }
}

/// One transfer of every byte of slot 0, checked against the source, before timing a size.
fn verify(run: &Run) {
    let b_ptr = run.b.buf.as_ptr() as *mut u8;
    let a_ptr = run.a.buf.as_ptr() as *mut u8;
    // Reads move B -> A, so B holds the pattern and A is cleared; otherwise the reverse.
    let (src, dst) = if run.op == Op::Read { (b_ptr, a_ptr) } else { (a_ptr, b_ptr) };
    // SAFETY: no transfer is in flight; both buffers hold at least `size` bytes.
    unsafe {
        if run.op == Op::Read {
            std::ptr::copy_nonoverlapping(run.a.buf.as_ptr().add(run.a.buf.len() - run.size), src, run.size);
        }
        std::ptr::write_bytes(dst, 0, run.size);
    }
    run.complete(run.post(0));
    // SAFETY: the transfer completed; nothing else touches the buffers.
    let (s, d) = unsafe { (std::slice::from_raw_parts(src, run.size), std::slice::from_raw_parts(dst, run.size)) };
    if s != d {
        fail(&format!("{} of {} bytes delivered wrong data", run.op.name(), run.size));
    }
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}
