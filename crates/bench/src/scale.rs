//! `--scale N1,N2,...`: what connections cost. The client's engine connects to the server's until it
//! holds each count of the list (adding to the connections already open); at each count, the time
//! the new connections took, each process's threads, descriptors and resident memory (one engine
//! each), the CPU each burns while every connection idles, and the aggregate rate with every
//! connection writing at once. Both ends announce no host identity (`disable_ipc`), so that the
//! data moves over the network path as between hosts.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use state::{Accepted, Stats};
use uccl_tcpx::engine::OneSided;
use uccl_tcpx::proto::FifoItem;
use uccl_tcpx::{Config, Connection, Engine};

use crate::args::Args;
use crate::ctl::{self, Ctl, field};
use crate::report::human;

type Io<T> = std::io::Result<T>;

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn config(args: &Args, channels: Option<u16>) -> Io<Config> {
    let mut config = Config::from_env().map_err(other)?;
    if let Some(c) = args.channels.or(channels) {
        config.num_channels = c;
    }
    config.disable_ipc = true;
    Ok(config)
}

/// The client: connects, measures, prints the table.
pub fn run(args: &Args, server: IpAddr, port: u16) -> Io<()> {
    let mut ctl = Ctl::new(TcpStream::connect(SocketAddr::new(server, port))?)?;
    let mut config = config(args, None)?;
    if server.is_loopback() {
        config.ip = Some(server);
    }
    let size = args.scale_size();
    ctl.send(&format!("SCALE {size} {}", config.num_channels))?;
    let ready = ctl.expect("READY")?;
    let engine_port: u16 = field(&ready, 1)?;
    let fifo = ready
        .get(2)
        .and_then(|h| ctl::unhex(h))
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| FifoItem::from_bytes(&b))
        .ok_or_else(|| other("malformed FifoItem from the server"))?;
    let engine = Engine::new(config.clone()).map_err(other)?;
    let src: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mr = engine.register(src.as_ptr() as usize, size).map_err(other)?;
    let op = OneSided { mr, addr: src.as_ptr() as usize, len: size, remote: fifo };
    let idle = Duration::from_secs_f64(args.idle_secs);
    println!(
        "# uccl-tcpx-bench --scale: one engine per process (c: the connecting client, s: the accepting server), \
         {} channels x {} sockets per comm, {} helper threads per direction and engine; idle CPU over {idle:?}; \
         busy: every connection writes {} at once, repeated for at least 1 s",
        config.num_channels,
        config.socket.sockets_per_comm(),
        config.socket.helpers_per_direction(),
        human(size)
    );
    println!(
        "{:>6} {:>11} {:>8} {:>11} {:>13} {:>13} {:>13} {:>13} {:>15} {:>9} {:>13}",
        "conns",
        "connect ms",
        "ms/conn",
        "threads c/s",
        "fds c/s",
        "RSS MiB c/s",
        "idle CPU% c/s",
        "%/conn c/s",
        "wakeups/s c/s",
        "busy GB/s",
        "CPU s/GB c/s"
    );
    let mut conns: Vec<Arc<Connection>> = Vec::new();
    let host = server.to_string();
    let mut result = Ok(());
    for &n in &args.scale {
        match step(&mut ctl, &engine, &host, engine_port, &mut conns, n, &op, idle) {
            Ok(row) => row.print(),
            Err(e) => {
                result = Err(other(format!("at {n} connections: {e}")));
                break;
            }
        }
    }
    if let Err(e) = &result {
        println!("# stopped {e}");
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
    engine: &Engine,
    host: &str,
    port: u16,
    conns: &mut Vec<Arc<Connection>>,
    n: usize,
    op: &OneSided,
    idle: Duration,
) -> Io<Row> {
    let start = Instant::now();
    let added = n.saturating_sub(conns.len());
    while conns.len() < n {
        let conn = engine
            .connect(host, "0", port)
            .map_err(|e| other(format!("connection {} of {n}: {e}", conns.len() + 1)))?;
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
    let (c0, s0) = (Stats::now(), server_stats(ctl)?);
    std::thread::sleep(idle);
    let (c1, s1) = (Stats::now(), server_stats(ctl)?);
    let (busy_gbs, bytes) = busy(conns, op)?;
    let (c2, s2) = (Stats::now(), server_stats(ctl)?);
    // CPU per byte holds on a shared host where GB/s does not: there a process with more threads
    // simply gets more of the cores.
    let per_gb = |a: &Stats, b: &Stats| (b.cpu_us - a.cpu_us) as f64 / 1e6 / (bytes as f64 / 1e9);
    let busy_cpu = (per_gb(&c1, &c2), per_gb(&s1, &s2));
    Ok(Row { conns: n, connect, added, idle, client: (c0, c1), server: (s0, s1), busy_gbs, busy_cpu })
}

fn server_stats(ctl: &mut Ctl) -> Io<Stats> {
    ctl.send("STATS")?;
    Stats::from_words(&ctl.expect("STATS")?)
}

struct Row {
    conns: usize,
    connect: Duration,
    added: usize,
    idle: Duration,
    /// Each process's figures at the start and the end of the idle interval.
    client: (Stats, Stats),
    server: (Stats, Stats),
    busy_gbs: f64,
    /// CPU seconds per GB written while busy, each process.
    busy_cpu: (f64, f64),
}

impl Row {
    fn print(&self) {
        let secs = self.idle.as_secs_f64();
        let cpu = |(a, b): &(Stats, Stats)| (b.cpu_us - a.cpu_us) as f64 / 1e6 / secs * 100.0;
        let wakeups = |(a, b): &(Stats, Stats)| (b.switches - a.switches) as f64 / secs;
        let (cc, sc) = (cpu(&self.client), cpu(&self.server));
        let per_conn_ms = if self.added > 0 { self.connect.as_secs_f64() * 1e3 / self.added as f64 } else { 0.0 };
        let pair = |a: String, b: String| format!("{a}/{b}");
        let (c, s) = (&self.client.1, &self.server.1);
        println!(
            "{:>6} {:>11.1} {:>8.2} {:>11} {:>13} {:>13} {:>13} {:>13} {:>15} {:>9.2} {:>13}",
            self.conns,
            self.connect.as_secs_f64() * 1e3,
            per_conn_ms,
            pair(c.threads.to_string(), s.threads.to_string()),
            pair(c.fds.to_string(), s.fds.to_string()),
            pair(format!("{:.1}", c.rss_kib as f64 / 1024.0), format!("{:.1}", s.rss_kib as f64 / 1024.0)),
            pair(format!("{cc:.2}"), format!("{sc:.2}")),
            pair(format!("{:.4}", cc / self.conns as f64), format!("{:.4}", sc / self.conns as f64)),
            pair(format!("{:.0}", wakeups(&self.client)), format!("{:.0}", wakeups(&self.server))),
            self.busy_gbs,
            pair(format!("{:.2}", self.busy_cpu.0), format!("{:.2}", self.busy_cpu.1))
        );
    }
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

/// GB/s with every connection writing at once, rounds repeated for at least a second after one
/// untimed round; and the bytes written in all.
fn busy(conns: &[Arc<Connection>], op: &OneSided) -> Io<(f64, usize)> {
    write_all(conns, op)?;
    let start = Instant::now();
    let mut rounds = 0usize;
    while rounds == 0 || start.elapsed() < Duration::from_secs(1) {
        write_all(conns, op)?;
        rounds += 1;
    }
    let bytes = (rounds + 1) * conns.len() * op.len;
    Ok(((rounds * conns.len() * op.len) as f64 / start.elapsed().as_secs_f64() / 1e9, bytes))
}

/// The server: `SCALE size channels` came; accepts every connection the client opens, answers
/// `ACCEPTED n` once it holds n (or with why not) and `STATS` with its own figures, until `QUIT`.
pub fn serve(args: &Args, ctl: &mut Ctl, setup: &[String]) -> Io<()> {
    let (size, channels): (usize, u16) = (field(setup, 1)?, field(setup, 2)?);
    let config = config(args, Some(channels))?;
    let timeout = config.connect_timeout;
    let engine = Arc::new(Engine::new(config).map_err(other)?);
    let mut dst = vec![0u8; size];
    let mr = engine.register(dst.as_mut_ptr() as usize, size).map_err(other)?;
    let fifo = engine.prepare_fifo(mr, dst.as_mut_ptr() as usize, size).map_err(other)?;
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
            Some("STATS") => ctl.send(&Stats::now().to_line()),
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

/// The server's accepted connections, and a process's figures as both ends take them.
mod state {
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use uccl_tcpx::{Connection, Engine};

    use crate::ctl::field;

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

    /// A process's threads, descriptors, resident memory, CPU time and voluntary context switches.
    pub struct Stats {
        pub threads: usize,
        pub fds: usize,
        pub rss_kib: u64,
        pub cpu_us: u64,
        pub switches: i64,
    }

    impl Stats {
        pub fn now() -> Stats {
            // SAFETY: an all-zero rusage is valid, and getrusage writes only into it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `ru` is writable for the call; RUSAGE_SELF cannot fail.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
            let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            let count = |dir: &str| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let rss_kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
            Stats {
                threads: count("/proc/self/task"),
                // Less the descriptor that reads the directory.
                fds: count("/proc/self/fd").saturating_sub(1),
                rss_kib,
                cpu_us: us(ru.ru_utime) + us(ru.ru_stime),
                switches: ru.ru_nvcsw,
            }
        }

        pub fn to_line(&self) -> String {
            format!("STATS {} {} {} {} {}", self.threads, self.fds, self.rss_kib, self.cpu_us, self.switches)
        }

        pub fn from_words(w: &[String]) -> std::io::Result<Stats> {
            Ok(Stats {
                threads: field(w, 1)?,
                fds: field(w, 2)?,
                rss_kib: field(w, 3)?,
                cpu_us: field(w, 4)?,
                switches: field(w, 5)?,
            })
        }
    }
}
