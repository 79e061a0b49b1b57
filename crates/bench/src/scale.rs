//! `--scale N1,N2,...`: what connections cost. The client's engine connects to the server's until it
//! holds each count of the list (adding to the connections already open); at each count, the time
//! the new connections took, each process's threads, descriptors and resident memory (one engine
//! each), the CPU each burns while every connection idles, and the aggregate rate with every
//! connection writing at once. Both ends announce no host identity (`disable_ipc`), so that the
//! data moves over the network path as between hosts; with `--same-host` they announce it and the
//! connections take the same-host path (CUDA IPC, direct host copies). With `--device gpu` each end's engine serves
//! its GPU (the client `--gpu`, the loopback server `--peer-gpu`) and moves that GPU's memory; the
//! staging rings each process holds and each GPU's memory in use are columns of every table (0 and
//! `-` on host memory).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use state::Accepted;
use uccl_tcpx::{Config, Connection, Engine, FifoItem, OneSided};

use crate::args::{Args, Device};
use crate::ctl::{self, Ctl, field};
use crate::memory::BenchMemory;
use crate::probe::{self, Probe, Reading, Stats};
use crate::report::human;
use crate::stdout::sayln;

type Io<T> = std::io::Result<T>;

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn config(args: &Args, channels: Option<u16>, same_host: bool) -> Io<Config> {
    let mut config = Config::from_env().map_err(other)?;
    if let Some(c) = args.channels.or(channels) {
        config.num_channels = Some(c);
    }
    config.disable_ipc = !same_host;
    if args.device == Device::Gpu {
        config.gpu = Some(args.gpu);
    }
    Ok(config)
}

/// The probe, reading this end's GPU's memory in use with `--device gpu`.
fn probe_for(args: &Args) -> Io<Probe> {
    let mut probe = open_probe()?;
    if args.device == Device::Gpu {
        probe.gpu = Some(uccl_tcpx::internal::cuda::Gpu::open(args.gpu).map_err(other)?);
    }
    Ok(probe)
}

/// The client: connects, measures, prints the table.
pub fn run(args: &Args, server: IpAddr, port: u16) -> Io<()> {
    let probe = probe_for(args)?;
    let mut ctl = Ctl::new(TcpStream::connect(SocketAddr::new(server, port))?)?;
    let mut config = config(args, None, args.same_host)?;
    if server.is_loopback() {
        config.ip = Some(server);
    }
    let size = args.scale_size();
    // 0: unset, the server's engine takes its transport's default as this one does.
    ctl.send(&format!("SCALE {size} {} {}", config.num_channels.unwrap_or(0), u8::from(args.same_host)))?;
    let ready = ctl.expect("READY")?;
    let engine_port: u16 = field(&ready, 1)?;
    let fifo = ready
        .get(2)
        .and_then(|h| ctl::unhex(h))
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| FifoItem::from_bytes(&b))
        .ok_or_else(|| other("malformed FifoItem from the server"))?;
    let engine = Engine::new(config.clone()).map_err(other)?;
    let src = BenchMemory::for_args(args, size)?;
    let mr = engine.register(src.addr(), size).map_err(other)?;
    let op = OneSided { mr, addr: src.addr(), len: size, remote: fifo };
    let idle = Duration::from_secs_f64(args.idle_secs);
    sayln!(
        "# uccl-tcpx-bench --scale: {} path, one engine per process (c: the connecting client, s: the accepting server), \
         {} channels x {} sockets per comm, {} helper threads per direction and engine; idle CPU over {idle:?}; \
         busy: every connection writes {} of {} at once, repeated for at least 1 s after untimed rounds (more \
         while they make staging rings); free: each connection writing back to back on its own for 1 s, \
         each/mean: the slowest and the fastest connection's writes over the mean; rings: staging rings made and not freed; GPU MiB: the GPU's memory in \
         use, every process's",
        if args.same_host { "same-host" } else { "network" },
        engine.num_channels(),
        config.socket.sockets_per_comm(),
        config.socket.helpers_per_direction(),
        human(size),
        src.describe()
    );
    sayln!(
        "{:>6} {:>11} {:>8} {:>11} {:>13} {:>13} {:>9} {:>15} {:>13} {:>13} {:>15} {:>9} {:>13} {:>9} {:>11}",
        "conns",
        "connect ms",
        "ms/conn",
        "threads c/s",
        "fds c/s",
        "RSS MiB c/s",
        "rings c/s",
        "GPU MiB c/s",
        "idle CPU% c/s",
        "%/conn c/s",
        "wakeups/s c/s",
        "busy GB/s",
        "CPU s/GB c/s",
        "free GB/s",
        "each/mean"
    );
    let mut conns: Vec<Arc<Connection>> = Vec::new();
    let host = server.to_string();
    let mut result = Ok(());
    for &n in &args.scale {
        match step(&mut ctl, &probe, &engine, &host, engine_port, &mut conns, n, &op, idle, args.same_host) {
            Ok(row) => sayln!("{}", row.line()),
            Err(e) => {
                result = Err(other(format!("at {n} connections: {e}")));
                break;
            }
        }
    }
    if let Err(e) = &result {
        sayln!("# stopped {e}");
    }
    drop(conns);
    engine.shutdown();
    // The server may be gone after a failure; the error above is the one to report.
    let _ = ctl.send("QUIT");
    result
}

/// Opens connections up to `n`, then measures.
#[allow(clippy::too_many_arguments)]
fn step(
    ctl: &mut Ctl,
    probe: &Probe,
    engine: &Engine,
    host: &str,
    port: u16,
    conns: &mut Vec<Arc<Connection>>,
    n: usize,
    op: &OneSided,
    idle: Duration,
    same_host: bool,
) -> Io<Row> {
    let start = Instant::now();
    let added = n.saturating_sub(conns.len());
    while conns.len() < n {
        let conn = engine
            .connect(host, "0", port)
            .map_err(|e| other(format!("connection {} of {n}: {e}", conns.len() + 1)))?;
        // A table that names a path holds only connections on it.
        if conn.peer.locality.is_local() != same_host {
            return Err(other(format!(
                "connection {} of {n} took the {} path (the peer is {:?})",
                conns.len() + 1,
                if same_host { "network" } else { "same-host" },
                conn.peer.locality
            )));
        }
        conns.push(conn);
    }
    ctl.send(&format!("ACCEPTED {n}"))?;
    let answer = ctl.recv()?;
    if answer.first().map(String::as_str) != Some("OK") {
        return Err(other(format!("the server: {}", answer.get(1..).unwrap_or_default().join(" "))));
    }
    let connect = start.elapsed();
    // Every connection moves data once before it idles, as a connection in use would.
    write_all(conns, op)?;
    std::thread::sleep(Duration::from_millis(300));
    let (c0, s0) = (probe.read(), server_stats(ctl)?);
    std::thread::sleep(idle);
    let (c1, s1) = (probe.read(), server_stats(ctl)?);
    let (busy_gbs, bytes, warm) = busy(conns, op)?;
    if warm.rings > 0 {
        sayln!(
            "# at {n} connections the busy phase's {} untimed rounds took {:.1} ms, the client making {} staging rings",
            warm.rounds,
            warm.took.as_secs_f64() * 1e3,
            warm.rings
        );
    }
    let (c2, s2) = (probe.read(), server_stats(ctl)?);
    // CPU per byte holds on a shared host where GB/s does not: there a process with more threads
    // simply gets more of the cores.
    let per_gb = |a: &Reading, b: &Reading| {
        Some((b.as_ref().ok()?.cpu_us - a.as_ref().ok()?.cpu_us) as f64 / 1e6 / (bytes as f64 / 1e9))
    };
    let busy_cpu = (per_gb(&c1, &c2), per_gb(&s1, &s2));
    for (end, reading) in
        [("client", &c0), ("server", &s0), ("client", &c1), ("server", &s1), ("client", &c2), ("server", &s2)]
    {
        if let Err(why) = reading {
            sayln!("# {end}'s figures at {n} connections: {why}");
        }
    }
    let free = free_running(conns, op)?;
    Ok(Row { conns: n, connect, added, idle, client: (c0, c1), server: (s0, s1), busy_gbs, busy_cpu, free })
}

fn server_stats(ctl: &mut Ctl) -> Io<Reading> {
    ctl.send("STATS")?;
    probe::from_words(&ctl.expect("STATS")?)
}

/// Opened before the engine exists, so that the figures can be read however many descriptors the
/// connections take later.
fn open_probe() -> Io<Probe> {
    Probe::open().map_err(|e| other(format!("opening this process's /proc files: {e}")))
}

struct Row {
    conns: usize,
    connect: Duration,
    added: usize,
    idle: Duration,
    /// Each process's figures at the start and the end of the idle interval.
    client: (Reading, Reading),
    server: (Reading, Reading),
    busy_gbs: f64,
    /// CPU seconds per GB written while busy, each process, where its figures could be read.
    busy_cpu: (Option<f64>, Option<f64>),
    free: Free,
}

impl Row {
    /// The table's row; a figure that could not be read shows as `n/a` (why is printed above the row).
    fn line(&self) -> String {
        let secs = self.idle.as_secs_f64();
        let cpu = |ends| both(ends).map(|(a, b)| (b.cpu_us - a.cpu_us) as f64 / 1e6 / secs * 100.0);
        let wakeups = |ends| both(ends).map(|(a, b)| (b.switches - a.switches) as f64 / secs);
        let (cc, sc) = (cpu(&self.client), cpu(&self.server));
        let per_conn_ms = if self.added > 0 { self.connect.as_secs_f64() * 1e3 / self.added as f64 } else { 0.0 };
        let shown = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        let pair = |a: Option<String>, b: Option<String>| format!("{}/{}", shown(a), shown(b));
        let (c, s) = (self.client.1.as_ref().ok(), self.server.1.as_ref().ok());
        let each = |f: &dyn Fn(&Stats) -> String| pair(c.map(f), s.map(f));
        let num = |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}"));
        let per_conn = |v: Option<f64>| num(v.map(|v| v / self.conns as f64), 4);
        format!(
            "{:>6} {:>11.1} {:>8.2} {:>11} {:>13} {:>13} {:>9} {:>15} {:>13} {:>13} {:>15} {:>9.2} {:>13} {:>9.2} {:>11}",
            self.conns,
            self.connect.as_secs_f64() * 1e3,
            per_conn_ms,
            each(&|s| s.threads.to_string()),
            each(&|s| s.fds.to_string()),
            each(&|s| format!("{:.1}", s.rss_kib as f64 / 1024.0)),
            each(&|s| s.rings.to_string()),
            each(&|s| s.gpu_kib.map_or("-".into(), |k| format!("{:.0}", k as f64 / 1024.0))),
            pair(num(cc, 2), num(sc, 2)),
            pair(per_conn(cc), per_conn(sc)),
            pair(num(wakeups(&self.client), 0), num(wakeups(&self.server), 0)),
            self.busy_gbs,
            pair(num(self.busy_cpu.0, 2), num(self.busy_cpu.1, 2)),
            self.free.gbs,
            self.free.spread.map_or_else(|| "n/a".into(), |(lo, hi)| format!("{lo:.2}-{hi:.2}"))
        )
    }
}

/// A process's figures at both ends of an interval, if both could be read.
fn both((a, b): &(Reading, Reading)) -> Option<(&Stats, &Stats)> {
    Some((a.as_ref().ok()?, b.as_ref().ok()?))
}

/// One write on every connection at once, all waited for.
fn write_all(conns: &[Arc<Connection>], op: &OneSided) -> Io<()> {
    let ids = conns
        .iter()
        .map(|c| c.write(std::slice::from_ref(op)))
        .collect::<uccl_tcpx::Result<Vec<u64>>>()
        .map_err(|e| other(format!("write post: {e}")))?;
    for (c, id) in conns.iter().zip(ids) {
        c.wait(id).map_err(|e| other(format!("write: {e}")))?;
    }
    Ok(())
}

/// Every connection writing back to back on its own for a second: the aggregate, and the writes
/// of the slowest and the fastest connection as shares of the mean. The busy phase's rounds wait
/// for their slowest write, which hides a connection starved by the others; here none waits.
struct Free {
    gbs: f64,
    /// None when no write finished within the second.
    spread: Option<(f64, f64)>,
}

fn free_running(conns: &[Arc<Connection>], op: &OneSided) -> Io<Free> {
    let post = |c: &Connection| c.write(std::slice::from_ref(op)).map_err(|e| other(format!("write post: {e}")));
    let mut posted = conns.iter().map(|c| post(c)).collect::<Io<Vec<u64>>>()?;
    let mut done = vec![0u64; conns.len()];
    let start = Instant::now();
    // One thread polls every connection in turn, so no connection gets ahead by its thread
    // being scheduled more often.
    while start.elapsed() < Duration::from_secs(1) {
        let mut moved = false;
        for (i, c) in conns.iter().enumerate() {
            if c.poll(posted[i]).map_err(|e| other(format!("write: {e}")))?.is_some() {
                done[i] += 1;
                posted[i] = post(c)?;
                moved = true;
            }
        }
        if !moved {
            std::thread::yield_now();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for (c, id) in conns.iter().zip(posted) {
        c.wait(id).map_err(|e| other(format!("write: {e}")))?;
    }
    let total: u64 = done.iter().sum();
    let mean = total as f64 / conns.len() as f64;
    let (min, max) = (done.iter().min().copied().unwrap_or(0), done.iter().max().copied().unwrap_or(0));
    let spread = (total > 0).then(|| (min as f64 / mean, max as f64 / mean));
    Ok(Free { gbs: total as f64 * op.len as f64 / secs / 1e9, spread })
}

/// The untimed rounds before the busy phase's clock starts: at least one, and more while a round
/// makes staging rings (each takes milliseconds; after an idle spell the first rounds of a load
/// wider than the engine's pool make them), at most [`WARM_ROUNDS`].
struct Warm {
    rounds: usize,
    took: Duration,
    rings: u64,
}

const WARM_ROUNDS: usize = 20;

/// GB/s with every connection writing at once, rounds repeated for at least a second after the
/// untimed ones ([`Warm`]); the bytes written in all, and the warm-up.
fn busy(conns: &[Arc<Connection>], op: &OneSided) -> Io<(f64, usize, Warm)> {
    let made = || {
        let c = uccl_tcpx::internal::transport::staged::ring_counts();
        c.at_connect + c.on_first_use
    };
    let (first, start) = (made(), Instant::now());
    let mut warm = Warm { rounds: 0, took: Duration::ZERO, rings: 0 };
    loop {
        let before = made();
        write_all(conns, op)?;
        warm.rounds += 1;
        if made() == before || warm.rounds == WARM_ROUNDS {
            break;
        }
    }
    (warm.took, warm.rings) = (start.elapsed(), made() - first);
    let start = Instant::now();
    let mut rounds = 0usize;
    while rounds == 0 || start.elapsed() < Duration::from_secs(1) {
        write_all(conns, op)?;
        rounds += 1;
    }
    let bytes = (rounds + warm.rounds) * conns.len() * op.len;
    Ok(((rounds * conns.len() * op.len) as f64 / start.elapsed().as_secs_f64() / 1e9, bytes, warm))
}

/// The server: `SCALE size channels same-host` came; accepts every connection the client opens, answers
/// `ACCEPTED n` once it holds n (or with why not) and `STATS` with its own figures, until `QUIT`.
pub fn serve(args: &Args, ctl: &mut Ctl, setup: &[String]) -> Io<()> {
    let (size, channels, same_host): (usize, u16, u8) = (field(setup, 1)?, field(setup, 2)?, field(setup, 3)?);
    let probe = probe_for(args)?;
    let config = config(args, (channels != 0).then_some(channels), same_host != 0)?;
    let timeout = config.connect_timeout;
    let engine = Arc::new(Engine::new(config).map_err(other)?);
    let dst = BenchMemory::for_args(args, size)?;
    let mr = engine.register(dst.addr(), size).map_err(other)?;
    let fifo = engine.prepare_fifo(mr, dst.addr(), size).map_err(other)?;
    let accepted = Arc::new(Accepted::default());
    let acceptor = {
        let (engine, accepted) = (engine.clone(), accepted.clone());
        std::thread::spawn(move || accepted.run(&engine))
    };
    ctl.send(&format!("READY {} {}", engine.address().port(), ctl::hex(&fifo.to_bytes())))?;
    let served = loop {
        let words = match ctl.recv() {
            Ok(w) => w,
            Err(e) => break Err(e),
        };
        let answered = match words.first().map(String::as_str) {
            Some("ACCEPTED") => match field::<usize>(&words, 1) {
                Ok(n) => match accepted.wait_for(n, timeout + Duration::from_secs(5)) {
                    Ok(()) => ctl.send("OK"),
                    Err(why) => ctl.send(&format!("FAIL {why}")),
                },
                Err(e) => Err(e),
            },
            Some("STATS") => ctl.send(&probe::to_line(&probe.read())),
            Some("QUIT") => break Ok(()),
            _ => break Err(other(format!("unknown bench message {:?}", words.join(" ")))),
        };
        if let Err(e) = answered {
            break Err(e);
        }
    };
    engine.stop_accept();
    let _ = acceptor.join();
    accepted.clear();
    engine.shutdown();
    drop(dst);
    served
}

/// The server's accepted connections.
mod state {
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use uccl_tcpx::{Connection, Engine};

    #[derive(Default)]
    pub struct Accepted {
        state: Mutex<(Vec<Arc<Connection>>, Option<String>)>,
        changed: Condvar,
    }

    impl Accepted {
        fn lock(&self) -> MutexGuard<'_, (Vec<Arc<Connection>>, Option<String>)> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// The accepting thread: takes connections until accept fails (stopped, or broken).
        pub fn run(&self, engine: &Engine) {
            loop {
                let outcome = engine.accept();
                let mut state = self.lock();
                let stop = match outcome {
                    Ok(c) => {
                        state.0.push(c);
                        false
                    }
                    Err(e) => {
                        state.1 = Some(e.to_string());
                        true
                    }
                };
                self.changed.notify_all();
                if stop {
                    return;
                }
            }
        }

        pub fn wait_for(&self, n: usize, limit: Duration) -> Result<(), String> {
            let deadline = Instant::now() + limit;
            let mut state = self.lock();
            while state.0.len() < n {
                if let Some(e) = &state.1 {
                    return Err(format!("accept failed after {} connections: {e}", state.0.len()));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!("{} of {n} connections accepted within {limit:?}", state.0.len()));
                }
                state = self.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            Ok(())
        }

        pub fn clear(&self) {
            self.lock().0.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_that_could_not_be_read_shows_as_not_available() {
        let stats = |threads, fds, cpu_us| {
            Ok(Stats { threads, fds, rss_kib: 2048, cpu_us, switches: 4, rings: 3, gpu_kib: Some(5 << 10) })
        };
        let mut row = Row {
            conns: 2,
            connect: Duration::from_millis(10),
            added: 2,
            idle: Duration::from_secs(1),
            client: (stats(9, 30, 0), stats(9, 31, 10_000)),
            server: (stats(10, 40, 0), stats(10, 41, 20_000)),
            busy_gbs: 1.5,
            busy_cpu: (Some(0.5), Some(0.25)),
            free: Free { gbs: 1.25, spread: Some((0.9, 1.1)) },
        };
        let words = |row: &Row| row.line().split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            words(&row)[3..],
            [
                "9/10",
                "31/41",
                "2.0/2.0",
                "3/3",
                "5/5",
                "1.00/2.00",
                "0.5000/1.0000",
                "0/0",
                "1.50",
                "0.50/0.25",
                "1.25",
                "0.90-1.10"
            ]
        );
        row.client.1 = Err("listing /proc/self/fd: Too many open files".into());
        row.busy_cpu.0 = None;
        row.free.spread = None;
        let failed = words(&row);
        assert_eq!(
            failed[3..],
            [
                "n/a/10",
                "n/a/41",
                "n/a/2.0",
                "n/a/3",
                "n/a/5",
                "n/a/2.00",
                "n/a/1.0000",
                "n/a/0",
                "1.50",
                "n/a/0.25",
                "1.25",
                "n/a"
            ]
        );
    }
}
