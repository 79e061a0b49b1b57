//! The server end: owns the target buffer and engine, answers the client's control messages, posts
//! receives for two-sided runs, checks delivered data, and serves the raw TCP baselines.

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uccl_tcpx::{Config, Connection, Engine};

use crate::args::Args;
use crate::ctl::{self, Ctl, field};
use crate::layout::Layout;
use crate::memory::BenchMemory;
use crate::raw;

type Io<T> = std::io::Result<T>;

pub fn run(args: &Args) -> Io<()> {
    let listener = TcpListener::bind(("0.0.0.0", args.port))?;
    let port = listener.local_addr()?.port();
    if args.announce {
        let mut out = std::io::stdout();
        writeln!(out, "LISTENING {port}")?;
        out.flush()?;
    } else {
        eprintln!("uccl-tcpx-bench server: waiting for a client on port {port}");
    }
    let (stream, peer) = listener.accept()?;
    let mut ctl = Ctl::new(stream)?;
    let setup = ctl.recv()?;
    if setup.first().map(String::as_str) == Some("SCALE") {
        log_line(args, &format!("client {peer}: scale run"));
        return crate::scale::serve(args, &mut ctl, &setup);
    }
    if setup.first().map(String::as_str) != Some("SETUP") {
        return Err(std::io::Error::other(format!("bench peer said {:?}, expected SETUP", setup.join(" "))));
    }
    let (bytes, channels): (usize, u16) = (field(&setup, 1)?, field(&setup, 2)?);
    // A same-host run connects twice: over the same-host path and over loopback TCP.
    let connections: usize = if setup.len() > 3 { field(&setup, 3)? } else { 1 };
    let mut config = Config {
        num_channels: args.channels.or((channels != 0).then_some(channels)),
        ..Config::from_env().map_err(std::io::Error::other)?
    };
    // Host buffers on a GPU host: the engine still serves a GPU (a net plugin lands host
    // destinations through it), the one the loopback parent assigned this end.
    if config.gpu.is_none() {
        config.gpu = args.serve_gpu;
    }
    let engine = Engine::new(config).map_err(std::io::Error::other)?;
    let mut mem = BenchMemory::for_args(args, bytes)?;
    let mr = engine.register(mem.addr(), bytes).map_err(std::io::Error::other)?;
    let fifo = engine.prepare_fifo(mr, mem.addr(), bytes).map_err(std::io::Error::other)?;
    let port = engine.address().port();
    ctl.send(&format!("READY {port} {} {}", ctl::hex(&fifo.to_bytes()), mem.describe()))?;
    let conns: Vec<Arc<Connection>> =
        (0..connections.max(1)).map(|_| engine.accept().map_err(std::io::Error::other)).collect::<Io<_>>()?;
    log_line(args, &format!("client {peer} connected"));
    let mut target = Target { engine: &engine, conn: &conns[0], mr, mem: &mut mem };
    let served = target.serve(&mut ctl);
    drop(conns);
    engine.shutdown();
    served
}

fn log_line(args: &Args, msg: &str) {
    if !args.announce {
        eprintln!("uccl-tcpx-bench server: {msg}");
    }
}

struct Target<'a> {
    engine: &'a Engine,
    conn: &'a Arc<Connection>,
    mr: u64,
    mem: &'a mut BenchMemory,
}

impl Target<'_> {
    fn serve(&mut self, ctl: &mut Ctl) -> Io<()> {
        loop {
            let words = ctl.recv()?;
            match words.first().map(String::as_str) {
                Some("OP") => self.op(ctl, &words)?,
                Some("RAW") => raw::streams_server(ctl, self.mem.host(), &words)?,
                Some("RAWMSG") => raw::messages_server(ctl, self.mem.host(), &words)?,
                Some("PING") => raw::pingpong_server(ctl, self.mem.host(), &words)?,
                Some("QUIT") => return Ok(()),
                _ => return Err(std::io::Error::other(format!("unknown bench message {:?}", words.join(" ")))),
            }
        }
    }

    /// `OP kind size count depth iovs seed stride [kv [regions [shares]]]`: prepares slot 0 (the
    /// checked transfer), then for a send posts `count` receives of `iovs` messages each, `depth`
    /// transfers ahead. The pieces lie where the client's do ([`Layout`]; `shares`: the block
    /// tables shuffle within that many shares, region by region). With several regions
    /// (`--kv-regions`) the buffer is registered again cut into them for this op, `GO` carries each
    /// region's FifoItem, and they are deregistered at the client's `FREE`.
    fn op(&mut self, ctl: &mut Ctl, w: &[String]) -> Io<()> {
        let kind = w.get(1).map(String::as_str).unwrap_or("");
        let (size, count, depth, iovs, seed, stride): (usize, usize, usize, usize, u64, usize) =
            (field(w, 2)?, field(w, 3)?, field(w, 4)?, field(w, 5)?, field(w, 6)?, field(w, 7)?);
        let layout = Layout::from_wire(size, iovs, stride, depth).map_err(std::io::Error::other)?;
        // With block tables (`--kv`) the pieces lie in the target's shuffled order of the blocks.
        let kv: u8 = if w.len() > 8 { field(w, 8)? } else { 0 };
        let regions: usize = if w.len() > 9 { field(w, 9)? } else { 1 };
        let shares: usize = if w.len() > 10 { field(w, 10)? } else { 1 };
        let layout = if kv == 1 { layout.with_tables(true, shares) } else { layout };
        if depth == 0 || layout.span(depth) > self.mem.len() {
            return Err(std::io::Error::other(format!("{size} bytes x {depth} in flight do not fit the buffer")));
        }
        if regions <= 1 {
            return self.serve_op(ctl, kind, &layout, (count, depth, seed), "GO");
        }
        let mut mrs = Vec::with_capacity(regions);
        let go = self.register_regions(&layout.regions(regions, depth), &mut mrs);
        // The client's last one-sided transfers may still run when the op's exchange is over:
        // its `FREE` says they ended.
        let served = go
            .and_then(|go| self.serve_op(ctl, kind, &layout, (count, depth, seed), &go))
            .and_then(|()| ctl.expect("FREE").map(drop));
        for mr in mrs {
            let _ = self.engine.deregister(mr);
        }
        served?;
        ctl.send("OK")
    }

    /// Registers each of `bounds` of the buffer (into `mrs`, which the caller deregisters, also
    /// after a failure): the `GO` that carries their FifoItems.
    fn register_regions(&self, bounds: &[std::ops::Range<usize>], mrs: &mut Vec<u64>) -> Io<String> {
        let base = self.mem.addr();
        let mut fifos = Vec::with_capacity(bounds.len());
        for b in bounds {
            let mr = self.engine.register(base + b.start, b.len()).map_err(std::io::Error::other)?;
            mrs.push(mr);
            let fifo = self.engine.prepare_fifo(mr, base + b.start, b.len()).map_err(std::io::Error::other)?;
            fifos.push(ctl::hex(&fifo.to_bytes()));
        }
        Ok(format!("GO {}", fifos.join(",")))
    }

    /// The op's exchange with the client, `go` announcing this end ready; `(count, depth, seed)` as
    /// the `OP` line gave them.
    fn serve_op(&mut self, ctl: &mut Ctl, kind: &str, layout: &Layout, run: (usize, usize, u64), go: &str) -> Io<()> {
        let (count, depth, seed) = run;
        match kind {
            "write" => {
                self.mem.zero(layout)?;
                ctl.send(go)?;
                ctl.expect("CHECK")?;
                ctl.send(if self.mem.check(layout, seed)? { "OK" } else { "BAD" })?;
                settle(ctl)
            }
            "read" => {
                self.mem.fill(layout, seed)?;
                ctl.send(go)?;
                settle(ctl)?;
                ctl.expect("END")?;
                ctl.send("OK")
            }
            "send" => {
                self.mem.zero(layout)?;
                ctl.send(go)?;
                let ok = self.receive(layout, count, depth, seed)?;
                ctl.send(if ok { "OK" } else { "BAD" })
            }
            other => Err(std::io::Error::other(format!("unknown op {other:?}"))),
        }
    }

    fn receive(&mut self, layout: &Layout, count: usize, depth: usize, seed: u64) -> Io<bool> {
        let base = self.mem.addr();
        let iovs = layout.iovs;
        let mut inflight = std::collections::VecDeque::with_capacity(depth * iovs);
        let mut ok = true;
        for i in 0..count {
            if inflight.len() == depth * iovs {
                for _ in 0..iovs {
                    wait(self.conn, inflight.pop_front().expect("non-empty"))?;
                }
            }
            for r in layout.pieces(i % depth) {
                let id = self.conn.recv(self.mr, base + r.start, r.len()).map_err(std::io::Error::other)?;
                inflight.push_back(id);
            }
            if i == 0 {
                while let Some(id) = inflight.pop_front() {
                    wait(self.conn, id)?;
                }
                ok = self.mem.check(layout, seed)?;
            }
        }
        while let Some(id) = inflight.pop_front() {
            wait(self.conn, id)?;
        }
        Ok(ok)
    }
}

/// Polls briefly (a small transfer is usually done within microseconds), then blocks so that a
/// waiting caller does not take a core from the transport's threads on a small host.
pub fn wait(conn: &Connection, id: u64) -> Io<u64> {
    let spin_until = Instant::now() + Duration::from_micros(spin_us());
    loop {
        match conn.poll(id) {
            Ok(Some(n)) => return Ok(n),
            Ok(None) if Instant::now() < spin_until => std::hint::spin_loop(),
            Ok(None) => return conn.wait(id).map_err(|e| std::io::Error::other(format!("transfer failed: {e}"))),
            Err(e) => return Err(std::io::Error::other(format!("transfer failed: {e}"))),
        }
    }
}

/// How long a waiting caller polls before it blocks: only on hosts with cores to spare, since a
/// spinning caller on a 2-core host delays the very threads it waits for.
/// Computed once: `available_parallelism` reads cgroup files, tens of microseconds a call.
pub fn spin_us() -> u64 {
    static SPIN_US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SPIN_US
        .get_or_init(|| if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) >= 8 { 50 } else { 0 })
}

/// The client's `SETTLE` after its warm-up: this end's collapses finish before the timed
/// transfers (`same_host::settle_collapses`).
fn settle(ctl: &mut Ctl) -> Io<()> {
    ctl.expect("SETTLE")?;
    crate::same_host::settle_collapses("server");
    ctl.send("OK")
}
