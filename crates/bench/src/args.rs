//! Command-line options (hand-parsed: a handful of flags does not justify a parser dependency).

use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
    Send,
    /// Round trips over the socket transport's comms alone, in this process (no engine).
    Transport,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
            Op::Send => "send",
            Op::Transport => "transport",
        }
    }

    pub fn parse(s: &str) -> Result<Op, String> {
        match s {
            "write" => Ok(Op::Write),
            "read" => Ok(Op::Read),
            "send" => Ok(Op::Send),
            "transport" => Ok(Op::Transport),
            _ => Err(format!("unknown op {s:?} (write, read, send, transport)")),
        }
    }
}

/// Where the transferred buffers live. Raw TCP baselines always use host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Gpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Both ends on this host, the server end in a child process.
    Loopback,
    Server,
    Client,
}

#[derive(Clone, Debug)]
pub struct Args {
    pub role: Role,
    pub remote_ip: Option<String>,
    /// The bench's own control port (server listens, client connects); 0 = any (loopback).
    pub port: u16,
    pub ops: Vec<Op>,
    pub sizes: Vec<usize>,
    pub iters: Option<usize>,
    pub depth: usize,
    pub channels: Option<u16>,
    pub num_iovs: usize,
    pub json: bool,
    pub plot: Option<PathBuf>,
    /// The JSON results written to this file as well, next to the tables.
    pub json_file: Option<PathBuf>,
    pub baseline: bool,
    pub device: Device,
    /// CUDA ordinal of this end's buffers with `--device gpu`.
    pub gpu: i32,
    /// The loopback server child's GPU; unset: chosen once the GPUs are counted.
    pub peer_gpu: Option<i32>,
    /// Server started by a loopback parent: print the chosen port on stdout.
    pub announce: bool,
    /// Run this process on these CPUs only.
    pub cpus: Option<Vec<usize>>,
    /// Loopback: the server on the first half of the CPUs, the client on the second.
    pub split_cores: bool,
}

pub const DEFAULT_PORT: u16 = 19_971;

pub const USAGE: &str = "\
usage: uccl-tcpx-bench [--loopback | --role server|client --remote-ip IP] [--port P]
                       [--ops write,read,send,transport] [--sizes 8,4K,1M,...] [--iters N] [--depth N]
                       [--channels N] [--num-iovs N] [--device cpu|gpu] [--gpu N] [--peer-gpu N]
                       [--json] [--json-file FILE] [--plot FILE.png] [--no-baseline]
                       [--cpus LIST] [--split-cores]
  --loopback (default)  both ends on this host: the server end runs as a child process
  --role server         wait for a client on --port (default 19971)
  --role client         connect to the server at --remote-ip:--port
  --ops                 write, read (one-sided), send (two-sided); transport = the socket transport's
                        comms alone, in-process round trips (default write,read,send)
  --sizes               message sizes, K/M/G suffixes (default 8 B to 256 MiB in powers of 4)
  --iters               transfers per size (default: about 512 MiB worth, 8 to 2000)
  --depth               transfers in flight (default 1: the latency column is a round trip)
  --channels            data channels per connection (default UCCL_TCPX_NUM_CHANNELS, else 2; 4 from 16 cores)
  --num-iovs            pieces each transfer is split into (one-sided: iovecs; send: messages)
  --device              cpu (default): host buffers; gpu: device buffers (cuMemAlloc), staged through
                        pinned host memory by the socket transport; baselines stay host-memory raw TCP
  --gpu N               this end's GPU with --device gpu (default 0)
  --peer-gpu N          the loopback server's GPU (default: the next GPU if there are 2+, else the same)
  --json                machine-readable results on stdout instead of the tables
  --json-file FILE      also write the JSON results to FILE
  --plot FILE.png       GB/s against size, ours and the raw TCP baseline
  --no-baseline         skip the raw TCP baselines
  --cpus LIST           run this process on these CPUs only (taskset's form: 0-7,12)
  --split-cores         loopback: the server on the first half of the CPUs, the client on the second,
                        as two hosts would be (sharing cores lets a receiver copy cache-hot data on
                        its sender's core, raw TCP most of all)
Socket transport knobs (UCCL_TCPX_SOCKET_NTHREADS, ...) are read from the environment on each side.";

impl Args {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args {
            role: Role::Loopback,
            remote_ip: None,
            port: DEFAULT_PORT,
            ops: vec![Op::Write, Op::Read, Op::Send],
            sizes: default_sizes(),
            iters: None,
            depth: 1,
            channels: None,
            num_iovs: 1,
            json: false,
            plot: None,
            json_file: None,
            baseline: true,
            device: Device::Cpu,
            gpu: 0,
            peer_gpu: None,
            announce: false,
            cpus: None,
            split_cores: false,
        };
        let mut port_given = false;
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
            match flag.as_str() {
                "--loopback" => a.role = Role::Loopback,
                "--role" => {
                    a.role = match value()?.as_str() {
                        "server" => Role::Server,
                        "client" => Role::Client,
                        "loopback" => Role::Loopback,
                        other => return Err(format!("unknown role {other:?} (server, client, loopback)")),
                    }
                }
                "--remote-ip" => a.remote_ip = Some(value()?),
                "--port" => {
                    a.port = value()?.parse().map_err(|_| "--port needs a port number".to_string())?;
                    port_given = true;
                }
                "--ops" => a.ops = value()?.split(',').map(Op::parse).collect::<Result<_, _>>()?,
                "--sizes" => a.sizes = value()?.split(',').map(size).collect::<Result<_, _>>()?,
                "--iters" => a.iters = Some(number(&value()?)?),
                "--depth" => a.depth = number(&value()?)?,
                "--channels" => {
                    let n = number(&value()?)?;
                    a.channels = Some(u16::try_from(n).map_err(|_| format!("--channels {n} is out of range"))?);
                }
                "--num-iovs" => a.num_iovs = number(&value()?)?,
                "--device" => {
                    a.device = match value()?.as_str() {
                        "cpu" => Device::Cpu,
                        "gpu" => Device::Gpu,
                        other => return Err(format!("unknown device {other:?} (cpu, gpu)")),
                    }
                }
                "--gpu" => a.gpu = ordinal("--gpu", &value()?)?,
                "--peer-gpu" => a.peer_gpu = Some(ordinal("--peer-gpu", &value()?)?),
                "--json-file" => a.json_file = Some(PathBuf::from(value()?)),
                "--json" => a.json = true,
                "--plot" => a.plot = Some(PathBuf::from(value()?)),
                "--no-baseline" => a.baseline = false,
                "--announce" => a.announce = true,
                "--cpus" => a.cpus = Some(crate::cpus::parse(&value()?)?),
                "--split-cores" => a.split_cores = true,
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown option {other}\n{USAGE}")),
            }
        }
        if a.role == Role::Loopback && !port_given {
            a.port = 0;
        }
        if a.role == Role::Client && a.remote_ip.is_none() {
            return Err(format!("--role client needs --remote-ip\n{USAGE}"));
        }
        if a.ops.is_empty() || a.sizes.is_empty() || a.depth == 0 || a.iters == Some(0) || a.channels == Some(0) {
            return Err(format!("ops, sizes, depth, channels and iters must be non-empty / positive\n{USAGE}"));
        }
        if a.device == Device::Gpu && a.ops.contains(&Op::Transport) {
            return Err("--ops transport measures the socket transport on host memory alone; \
                        leave it out with --device gpu"
                .into());
        }
        if a.split_cores && a.role != Role::Loopback {
            return Err("--split-cores applies to --loopback only (two hosts have their own cores)".into());
        }
        if a.peer_gpu.is_some() && (a.role != Role::Loopback || a.device != Device::Gpu) {
            return Err("--peer-gpu applies to --loopback --device gpu only (a separate server takes \
                        --device gpu --gpu N itself)"
                .into());
        }
        if a.num_iovs == 0 || a.sizes.iter().any(|&s| s < a.num_iovs) {
            return Err(format!("--num-iovs must be at least 1 and at most the smallest size\n{USAGE}"));
        }
        if a.sizes.iter().any(|&s| s > u32::MAX as usize / a.depth) {
            return Err("sizes times depth must stay below 4 GiB (the advertised window's limit)".into());
        }
        Ok(a)
    }

    /// Transfers for one size: the flag, else about 512 MiB worth, 8 to 2000.
    pub fn iters_for(&self, size: usize) -> usize {
        self.iters.unwrap_or_else(|| ((512usize << 20) / size).clamp(8, 2000))
    }

    /// The options a loopback parent hands to its server child.
    pub fn server_child_args(&self) -> Vec<String> {
        let mut v = vec!["--role".into(), "server".into(), "--port".into(), "0".into(), "--announce".into()];
        if let Some(c) = self.channels {
            v.extend(["--channels".into(), c.to_string()]);
        }
        if self.device == Device::Gpu {
            let gpu = self.peer_gpu.unwrap_or(self.gpu);
            v.extend(["--device".into(), "gpu".into(), "--gpu".into(), gpu.to_string()]);
        }
        v
    }
}

/// 8 B to 256 MiB: powers of 4, then 256 MiB.
pub fn default_sizes() -> Vec<usize> {
    let mut v: Vec<usize> = (0..13).map(|i| 8usize << (2 * i)).collect();
    v.push(256 << 20);
    v
}

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

fn ordinal(flag: &str, s: &str) -> Result<i32, String> {
    s.parse::<u16>().map(i32::from).map_err(|_| format!("{flag} needs a GPU ordinal (0, 1, ...), not {s:?}"))
}

pub fn size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    match number(digits)?.checked_mul(unit) {
        Some(0) | None => Err(format!("{s:?} is not a positive size")),
        Some(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        Args::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn defaults_and_overrides() {
        let d = parse("").unwrap();
        assert_eq!(d.ops, vec![Op::Write, Op::Read, Op::Send]);
        assert_eq!((d.role, d.port, d.depth, d.num_iovs), (Role::Loopback, 0, 1, 1));
        assert_eq!(d.sizes.first(), Some(&8));
        assert_eq!(d.sizes.last(), Some(&(256 << 20)));
        assert!(d.sizes.windows(2).all(|w| w[0] < w[1]));
        assert!(d.baseline);
        let a = parse(
            "--role client --remote-ip 10.0.0.2 --ops read,send --sizes 1K,2M,1G,7 --depth 2 --channels 4 \
             --iters 9 --num-iovs 3 --json --plot x.png --no-baseline",
        )
        .unwrap();
        assert_eq!((a.role, a.remote_ip.as_deref(), a.port), (Role::Client, Some("10.0.0.2"), DEFAULT_PORT));
        assert_eq!(a.ops, vec![Op::Read, Op::Send]);
        assert_eq!(a.sizes, vec![1 << 10, 2 << 20, 1 << 30, 7]);
        assert_eq!((a.depth, a.channels, a.iters, a.num_iovs), (2, Some(4), Some(9), 3));
        assert!(a.json && !a.baseline && a.plot.is_some());
        assert_eq!(d.iters_for(8), 2000);
        assert_eq!(d.iters_for(256 << 20), 8);
        assert_eq!((d.cpus.as_deref(), d.split_cores), (None, false));
        let p = parse("--cpus 0-2,5 --split-cores").unwrap();
        assert_eq!((p.cpus.as_deref(), p.split_cores), (Some(&[0usize, 1, 2, 5][..]), true));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "--ops fly",
            "--sizes 0",
            "--sizes 4X",
            "--depth 0",
            "--iters",
            "--bogus",
            "--sizes 99999999999999999999G",
            "--role client",
            "--role nope",
            "--num-iovs 0",
            "--sizes 4 --num-iovs 8",
            "--channels 70000",
            "--sizes 3G --depth 2",
            "--cpus",
            "--cpus 3-1",
            "--split-cores --role server",
            "--split-cores --role client --remote-ip 10.0.0.2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for bad in [
            "--device tpu",
            "--device",
            "--gpu -1",
            "--gpu x",
            "--device gpu --peer-gpu",
            "--peer-gpu 1",
            "--device gpu --peer-gpu 1 --role server",
            "--device gpu --ops write,transport",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_flags() {
        let d = parse("").unwrap();
        assert_eq!((d.device, d.gpu, d.peer_gpu), (Device::Cpu, 0, None));
        assert!(!d.server_child_args().contains(&"--device".to_string()), "cpu children stay as they were");
        assert!(parse("--device cpu --ops transport").is_ok());
        let g = parse("--device gpu --gpu 3 --peer-gpu 5 --channels 4 --json-file r.json").unwrap();
        assert_eq!((g.device, g.gpu, g.peer_gpu), (Device::Gpu, 3, Some(5)));
        assert_eq!(g.json_file.as_deref(), Some(std::path::Path::new("r.json")));
        let child = g.server_child_args().join(" ");
        assert!(child.ends_with("--channels 4 --device gpu --gpu 5"), "{child}");
        let same = parse("--device gpu --gpu 2").unwrap().server_child_args().join(" ");
        assert!(same.ends_with("--device gpu --gpu 2"), "unresolved peer: same GPU ({same})");
        let server = parse("--role server --device gpu --gpu 1").unwrap();
        assert_eq!((server.role, server.device, server.gpu), (Role::Server, Device::Gpu, 1));
    }
}
