//! Command-line options, declared once for clap: parsing, `--help` and the errors for bad values
//! come from the declarations below; the rules between flags are checked after parsing.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::layout::Layout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Op {
    /// One-sided write into the server's registered buffer
    Write,
    /// One-sided read from the server's registered buffer
    Read,
    /// Two-sided send, the server posting the receive
    Send,
    /// Round trips over the socket transport's comms alone, in this process (no engine)
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
}

/// Where the transferred buffers live. Raw TCP baselines always use host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// Host buffers
    Cpu,
    /// Device buffers (cuMemAlloc), staged through pinned host memory by the socket transport
    Gpu,
}

/// The order a KV transfer lists its blocks in, over several regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvOrder {
    /// Region by region, each region's blocks shuffled among its own on both ends, as serving
    /// stacks list a request (every block of one layer's tensor, then the next's)
    Region,
    /// One shuffle over every block: consecutive blocks fall in different regions at both ends
    Any,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Both ends on this host, the server end in a child process
    Loopback,
    /// Wait for a client on --port
    Server,
    /// Connect to the server at --remote-ip:--port
    Client,
}

pub const DEFAULT_PORT: u16 = 19_971;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "uccl-tcpx-bench",
    about = "Transfer benchmark over uccl-tcpx's socket transport, with raw TCP baselines measured in the same run",
    // A repeated flag takes its last value, so a script can append an override to a base command.
    args_override_self = true,
    after_help = "Socket transport knobs (UCCL_TCPX_SOCKET_NTHREADS, ...) are read from the environment on each side."
)]
pub struct Args {
    /// Both ends on this host, the server end as a child process (the default; same as --role loopback)
    // Read by clap alone: overriding --role resets it to its default, loopback, so `role` is the answer.
    #[arg(long, overrides_with = "role")]
    loopback: bool,
    /// Which end this process runs
    #[arg(long, value_enum, default_value_t = Role::Loopback, overrides_with = "loopback")]
    pub role: Role,
    /// The server's address, for --role client
    #[arg(long, value_name = "IP", required_if_eq("role", "client"))]
    pub remote_ip: Option<String>,
    /// The bench's own control port (the server listens, the client connects); a loopback run takes
    /// any free port unless one is given
    #[arg(long, value_name = "P", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Operations to measure, comma-separated
    // Set, not clap's default Append for lists: a repeated --ops replaces the list, as other flags do.
    #[arg(long, value_enum, value_name = "LIST", value_delimiter = ',', action = clap::ArgAction::Set, default_values_t = [Op::Write, Op::Read, Op::Send])]
    pub ops: Vec<Op>,
    /// Message sizes, comma-separated, with K/M/G suffixes [default: 8 B to 256 MiB in powers of 4]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = clap::ArgAction::Set, value_parser = size, default_values_t = default_sizes(), hide_default_value = true)]
    pub sizes: Vec<usize>,
    /// Transfers per size [default: about 512 MiB worth, 8 to 2000]
    #[arg(long, value_name = "N", value_parser = positive)]
    pub iters: Option<usize>,
    /// Transfers in flight (1: the latency column is a round trip)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive)]
    pub depth: usize,
    /// Data channels per connection [default: UCCL_TCPX_NUM_CHANNELS, else 2; a net plugin 4 from 16 cores]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub channels: Option<u16>,
    /// Pieces each transfer is split into (one-sided: iovecs; send: messages)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive)]
    pub num_iovs: usize,
    /// Spread the pieces of each transfer over a region of SIZE bytes on both ends (K/M/G suffixes),
    /// as the blocks of a KV cache are, instead of side by side
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub scatter: Option<usize>,
    /// KV-cache block tables (needs --scatter): the region is cut into --num-iovs blocks and each
    /// end places the pieces in its own shuffled order of them, as a serving stack's random block
    /// tables do; bytes are checked, and the same bytes in one piece are timed in the same run
    #[arg(long, requires = "scatter")]
    pub kv: bool,
    /// With --kv: the block tables' blocks fall in N regions, registered apart on each end, as a
    /// serving stack registers one region per KV tensor (an 8B model's 64; 160 for 70B); at most
    /// the block count
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = positive, requires = "kv")]
    pub kv_regions: usize,
    /// With --kv: the order the blocks are listed in over the regions
    #[arg(long, value_enum, default_value_t = KvOrder::Region, requires = "kv")]
    pub kv_order: KvOrder,
    /// Machine-readable results on stdout instead of the tables
    #[arg(long)]
    pub json: bool,
    /// GB/s against size, ours and the raw TCP baseline, as a PNG chart
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// Also write the JSON results to FILE, next to the tables
    #[arg(long, value_name = "FILE")]
    pub json_file: Option<PathBuf>,
    /// Measure each point and its anchors (raw TCP, or with --same-host loopback TCP and memcpy on
    /// one thread and on the library's copy threads, or device copies) alternately N times, ours
    /// first, and report medians: each ratio the median of the rounds' own ratios (1 to 100; with
    /// more than 1 the raw TCP baselines are measured again for every op)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::rounds::parse)]
    pub rounds: usize,
    /// Skip the raw TCP baselines
    #[arg(long = "no-baseline", action = clap::ArgAction::SetFalse)]
    pub baseline: bool,
    /// Where the transferred buffers live; the baselines stay host-memory raw TCP
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// This end's GPU with --device gpu
    // Negative numbers reach the parser, which says what an ordinal is, instead of reading as a flag.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = ordinal, allow_negative_numbers = true)]
    pub gpu: i32,
    /// The loopback server's GPU with --device gpu [default: the next GPU if there are 2+, else the same]
    #[arg(long, value_name = "N", value_parser = ordinal, allow_negative_numbers = true)]
    pub peer_gpu: Option<i32>,
    /// Where the loopback server's buffers live [default: as --device]; `--device gpu --peer-device
    /// cpu` lands writes and sends from a GPU in host memory (the server's engine still serves
    /// --peer-gpu's GPU, as a host-memory engine on a GPU host does)
    #[arg(long, value_enum)]
    pub peer_device: Option<Device>,
    /// Server started by a loopback parent: print the chosen port on stdout.
    #[arg(long, hide = true)]
    pub announce: bool,
    /// Server started by a loopback parent with host buffers: the GPU its engine serves, unless
    /// UCCL_TCPX_GPU names one.
    #[arg(long, hide = true, value_name = "N", value_parser = ordinal)]
    pub serve_gpu: Option<i32>,
    /// Run this process on these CPUs only (taskset's form: 0-7,12)
    // The full path keeps clap from reading the list as a flag given once per CPU.
    #[arg(long, value_name = "LIST", value_parser = crate::cpus::parse)]
    pub cpus: Option<::std::vec::Vec<usize>>,
    /// Loopback: the server on the first half of the CPUs, the client on the second, as two hosts
    /// would be (sharing cores lets a receiver copy cache-hot data on its sender's core, raw TCP most
    /// of all)
    #[arg(long)]
    pub split_cores: bool,
    /// Loopback: the connection takes the same-host path (without this flag the bench sets
    /// UCCL_TCPX_DISABLE_IPC=1 unless it is set, and measures the network path). Host memory is
    /// measured next to the same transfers over loopback TCP, memcpy of the same size on one thread,
    /// and the same memcpy split over as many threads as the library copies on
    /// (UCCL_TCPX_HOST_COPY_THREADS): what the host's memory can copy at all. GPU memory is
    /// measured next to device copies between the same GPUs
    #[arg(long)]
    pub same_host: bool,

    /// Before the first transfer, set up what it would (`Connection::prepare`: a same-host peer's
    /// grant asked for and its GPU allocation mapped, as a NIXL agent's dialer does once the
    /// peer's memory is loaded); elsewhere it sets up nothing
    #[arg(long)]
    pub prepare: bool,
    /// Host buffers (ours and the anchors', both ends) ask for transparent huge pages
    /// (`madvise(MADV_HUGEPAGE)` before their pages are touched), as an allocator that does so
    /// gives them (PyTorch's with THP_MEM_ALLOC_ENABLE=1); the kernel grants them when its THP mode
    /// is `madvise` or `always`. The report says which mode the kernel is in
    #[arg(long)]
    pub huge_pages: bool,
    /// Instead of the transfer table, what connections cost: the client's engine connects to the
    /// server's until it holds each count of the list (ascending, e.g. 1,64,256,1024); per count the
    /// connect time, each end's threads, descriptors, resident memory and CPU while idle, and GB/s
    /// with every connection writing the first of --sizes [default 1 MiB] at once; over the network
    /// path, or the same-host path with --same-host
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = clap::ArgAction::Set, value_parser = positive)]
    pub scale: Vec<usize>,
    /// With --scale: seconds over which the idle CPU is measured
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = seconds)]
    pub idle_secs: f64,
    /// --sizes was given (not its default).
    #[arg(skip)]
    sizes_given: bool,
}

impl Args {
    /// Parses a command line, program name first, and checks the rules between flags; the error
    /// prints as clap's (`Error::exit`).
    pub fn try_from_args<I, T>(argv: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut command = Args::command();
        let matches = command.try_get_matches_from_mut(argv)?;
        let mut a = Args::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        if a.role == Role::Loopback && matches.value_source("port") == Some(ValueSource::DefaultValue) {
            a.port = 0;
        }
        a.sizes_given = matches.value_source("sizes") != Some(ValueSource::DefaultValue);
        a.check().map_err(|(kind, msg)| command.error(kind, msg))?;
        Ok(a)
    }

    fn check(&self) -> Result<(), (ErrorKind, &'static str)> {
        let mixed = self.peer_device.is_some_and(|d| d != self.device);
        if !self.scale.is_empty() && (self.role == Role::Server || mixed) {
            return Err((
                ErrorKind::ArgumentConflict,
                "--scale is the client's (a server follows it) and moves one kind of memory: leave out --role server \
                 and --peer-device",
            ));
        }
        if self.rounds > 1 && (self.role == Role::Server || !self.scale.is_empty()) {
            return Err((
                ErrorKind::ArgumentConflict,
                "--rounds applies to the client's transfer table (a server follows the client's rounds): leave out \
                 --role server and --scale",
            ));
        }
        if self.scale.windows(2).any(|w| w[0] >= w[1]) {
            return Err((ErrorKind::ValueValidation, "--scale counts must be ascending"));
        }
        if self.device == Device::Gpu && self.ops.contains(&Op::Transport) {
            return Err((
                ErrorKind::ArgumentConflict,
                "--ops transport measures the socket transport on host memory alone; leave it out with --device gpu",
            ));
        }
        if self.split_cores && self.role != Role::Loopback {
            return Err((
                ErrorKind::ArgumentConflict,
                "--split-cores applies to --loopback only (two hosts have their own cores)",
            ));
        }
        if self.same_host && self.role != Role::Loopback {
            return Err((
                ErrorKind::ArgumentConflict,
                "--same-host applies to --loopback only (two hosts have no same-host path)",
            ));
        }
        // GPU memory's sends take the same-host path too (the receiver copies them over CUDA IPC);
        // host memory's keep to the connection, which the network-path bench measures.
        let same_host_op = |o: &Op| matches!(o, Op::Write | Op::Read) || (*o == Op::Send && self.uses_gpu());
        if self.same_host && self.scale.is_empty() && !self.ops.iter().all(same_host_op) {
            return Err((
                ErrorKind::ArgumentConflict,
                "--same-host measures one-sided transfers, --ops write,read, and with --device gpu sends too",
            ));
        }
        if self.peer_device.is_some() && self.role != Role::Loopback {
            return Err((
                ErrorKind::ArgumentConflict,
                "--peer-device applies to --loopback only (a separate server takes --device itself)",
            ));
        }
        if self.peer_gpu.is_some() && (self.role != Role::Loopback || !self.uses_gpu()) {
            return Err((
                ErrorKind::ArgumentConflict,
                "--peer-gpu applies to --loopback --device gpu only (a separate server takes --device gpu --gpu N \
                 itself)",
            ));
        }
        if self.sizes.iter().any(|&s| s < self.num_iovs) {
            return Err((ErrorKind::ValueValidation, "--num-iovs must be at most the smallest size"));
        }
        if self.scatter.is_some_and(|s| s > u32::MAX as usize) {
            return Err((
                ErrorKind::ValueValidation,
                "--scatter must stay below 4 GiB (the advertised window's limit)",
            ));
        }
        if self.sizes.iter().any(|&s| self.layout(s, self.num_iovs).is_err()) {
            return Err((
                ErrorKind::ValueValidation,
                "--scatter is too small: it needs room for every piece of the largest size, --depth times",
            ));
        }
        if self.sizes.iter().any(|&s| s > u32::MAX as usize / self.depth) {
            return Err((
                ErrorKind::ValueValidation,
                "sizes times depth must stay below 4 GiB (the advertised window's limit)",
            ));
        }
        Ok(())
    }

    /// Where the pieces of a transfer of `size` bytes in `iovs` pieces lie.
    pub fn layout(&self, size: usize, iovs: usize) -> Result<Layout, String> {
        let layout = Layout::new(size, iovs, self.scatter, self.depth)?;
        Ok(if self.kv { layout.with_tables(false, self.table_regions()) } else { layout })
    }

    /// The regions a transfer's pieces fall in: `--kv-regions` (at most one per block) with
    /// `--kv`, else one.
    pub fn regions(&self) -> usize {
        if self.kv { self.kv_regions.min(self.num_iovs) } else { 1 }
    }

    /// The shares the block tables shuffle within: the regions, listed region by region, else one.
    pub fn table_regions(&self) -> usize {
        if self.kv_order == KvOrder::Region { self.regions() } else { 1 }
    }

    /// Bytes each end registers: every slot of the largest size, or the scatter region.
    pub fn buffer_bytes(&self) -> usize {
        let max = self.sizes.iter().max().copied().unwrap_or(8);
        let spans = self.sizes.iter().filter_map(|&s| self.layout(s, self.num_iovs).ok()).map(|l| l.span(self.depth));
        spans.fold(max * self.depth, usize::max)
    }

    /// What every connection writes at once in the busy phase of --scale.
    pub fn scale_size(&self) -> usize {
        if self.sizes_given { self.sizes[0] } else { 1 << 20 }
    }

    /// Transfers for one size: the flag, else about 512 MiB worth, 8 to 2000.
    pub fn iters_for(&self, size: usize) -> usize {
        self.iters.unwrap_or_else(|| ((512usize << 20) / size).clamp(8, 2000))
    }

    /// Whether either end of the run uses GPU buffers.
    pub fn uses_gpu(&self) -> bool {
        self.device == Device::Gpu || self.peer_device == Some(Device::Gpu)
    }

    /// The options a loopback parent hands to its server child.
    pub fn server_child_args(&self) -> Vec<String> {
        let mut v = vec!["--role".into(), "server".into(), "--port".into(), "0".into(), "--announce".into()];
        if let Some(c) = self.channels {
            v.extend(["--channels".into(), c.to_string()]);
        }
        if self.huge_pages {
            v.push("--huge-pages".into());
        }
        if self.uses_gpu() {
            let gpu = self.peer_gpu.unwrap_or(self.gpu).to_string();
            match self.peer_device.unwrap_or(self.device) {
                Device::Gpu => v.extend(["--device".into(), "gpu".into(), "--gpu".into(), gpu]),
                Device::Cpu => v.extend(["--serve-gpu".into(), gpu]),
            }
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

fn positive(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(0) | Err(_) => Err("expected a whole number of at least 1".into()),
        Ok(n) => Ok(n),
    }
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err("expected seconds, more than 0 and at most 3600".into()),
    }
}

fn ordinal(s: &str) -> Result<i32, String> {
    s.parse::<u16>().map(i32::from).map_err(|_| "expected a GPU ordinal (0, 1, ...)".into())
}

fn size(s: &str) -> Result<usize, String> {
    match uccl_tcpx::internal::config::parse_bytes(s).and_then(|n| usize::try_from(n).ok()) {
        Some(0) | None => Err("expected a positive size: bytes, or a number with K, M or G".into()),
        Some(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, clap::Error> {
        Args::try_from_args(std::iter::once("uccl-tcpx-bench").chain(s.split_whitespace()))
    }

    #[test]
    fn the_declarations_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_and_overrides() {
        let d = parse("").unwrap();
        assert_eq!(d.ops, vec![Op::Write, Op::Read, Op::Send]);
        assert_eq!((d.role, d.port, d.depth, d.num_iovs), (Role::Loopback, 0, 1, 1));
        assert_eq!(d.sizes, default_sizes());
        assert_eq!(d.sizes.first(), Some(&8));
        assert_eq!(d.sizes.last(), Some(&(256 << 20)));
        assert!(d.sizes.windows(2).all(|w| w[0] < w[1]));
        assert!(d.baseline && !d.json && !d.announce);
        assert_eq!((d.iters, d.channels, d.plot.as_deref(), d.json_file.as_deref()), (None, None, None, None));
        let a = parse(
            "--role client --remote-ip 10.0.0.2 --ops read,send --sizes 1K,2M,1G,7 --depth 2 --channels 4 \
             --iters 9 --num-iovs 3 --json --plot x.png --no-baseline",
        )
        .unwrap();
        assert_eq!((a.role, a.remote_ip.as_deref(), a.port), (Role::Client, Some("10.0.0.2"), DEFAULT_PORT));
        assert_eq!(a.ops, vec![Op::Read, Op::Send]);
        assert_eq!(a.sizes, vec![1 << 10, 2 << 20, 1 << 30, 7]);
        assert_eq!((a.depth, a.channels, a.iters, a.num_iovs), (2, Some(4), Some(9), 3));
        assert_eq!((d.scatter, d.buffer_bytes()), (None, 256 << 20));
        let s = parse("--sizes 16M,4M --num-iovs 1024 --scatter 1G --depth 2").unwrap();
        assert_eq!(s.scatter, Some(1 << 30));
        assert!(s.buffer_bytes() > 32 << 20 && s.buffer_bytes() <= 1 << 30, "{}", s.buffer_bytes());
        assert_eq!(s.layout(16 << 20, 1024).unwrap().stride, 1 << 20);
        assert!(a.json && !a.baseline && a.plot.is_some());
        assert_eq!(d.iters_for(8), 2000);
        assert_eq!(d.iters_for(256 << 20), 8);
        assert_eq!((d.cpus.as_deref(), d.split_cores), (None, false));
        assert_eq!((d.rounds, parse("--rounds 100").unwrap().rounds), (1, 100));
        assert_eq!(parse("--rounds 1 --role server").unwrap().rounds, 1, "one round is no rounds");
        let p = parse("--cpus 0-2,5 --split-cores").unwrap();
        assert_eq!((p.cpus.as_deref(), p.split_cores), (Some(&[0usize, 1, 2, 5][..]), true));
        assert_eq!(parse("--port 5000").unwrap().port, 5000, "a loopback run keeps a port it was given");
        assert_eq!(parse("--role server").unwrap().port, DEFAULT_PORT);
    }

    #[test]
    fn the_last_of_a_repeated_or_competing_flag_wins() {
        let a = parse("--depth 2 --depth 3 --sizes 1K,2K --sizes 8 --ops write --ops read,send").unwrap();
        assert_eq!((a.depth, a.sizes, a.ops), (3, vec![8], vec![Op::Read, Op::Send]));
        assert_eq!(parse("--role server --loopback").unwrap().role, Role::Loopback);
        assert_eq!(parse("--loopback --role server").unwrap().role, Role::Server);
        assert_eq!(parse("--role server --role loopback").unwrap().role, Role::Loopback);
    }

    #[test]
    fn rejects_bad_input_with_clap_usage_errors() {
        for bad in [
            "--ops fly",
            "--ops",
            "--sizes 0",
            "--sizes 4X",
            "--sizes 8,,16",
            "--depth 0",
            "--depth -1",
            "--iters",
            "--iters 0",
            "--bogus",
            "--sizes 99999999999999999999G",
            "--sizes 16E",
            "--role client",
            "--role nope",
            "--port 70000",
            "--num-iovs 0",
            "--sizes 4 --num-iovs 8",
            "--sizes 16M --num-iovs 1024 --scatter 8M",
            "--sizes 16M --num-iovs 4 --scatter 5G",
            "--scatter 0",
            "--channels 70000",
            "--channels 0",
            "--sizes 3G --depth 2",
            "--cpus",
            "--cpus 3-1",
            "--split-cores --role server",
            "--split-cores --role client --remote-ip 10.0.0.2",
            "--device tpu",
            "--device",
            "--gpu -1",
            "--gpu x",
            "--device gpu --peer-gpu",
            "--peer-gpu 1",
            "--device gpu --peer-gpu 1 --role server",
            "--device gpu --ops write,transport",
            "--same-host --role client --remote-ip 10.0.0.2",
            "--same-host --role server",
            "--same-host --ops write,send",
            "--scale 64,1",
            "--scale 0",
            "--scale 4 --role server",
            "--scale 4 --device gpu --peer-device cpu",
            "--scale 4 --idle-secs 0",
            "--rounds 0",
            "--rounds 101",
            "--rounds x",
            "--rounds",
            "--rounds 3 --role server",
            "--rounds 3 --scale 4",
            "stray",
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad} was accepted"));
            assert_eq!(e.exit_code(), 2, "{bad}: a usage error ({e})");
            assert!(e.to_string().starts_with("error: "), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_flag_and_the_rule() {
        let says = |bad: &str, want: &str| {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        };
        says("--ops fly", "[possible values: write, read, send, transport]");
        says("--sizes 4X", "'--sizes <LIST>'");
        says("--gpu -1", "expected a GPU ordinal");
        says("--role client", "--remote-ip <IP>");
        says("--channels 70000", "70000 is not in 1..=65535");
        says("--cpus 3-1", "ranges like 0-7,12");
        says("--sizes 4 --num-iovs 8", "--num-iovs must be at most the smallest size");
        says("--sizes 16M --num-iovs 1024 --scatter 8M", "--scatter is too small");
        says("--device gpu --ops transport", "leave it out with --device gpu");
        says("--bogus", "unexpected argument '--bogus'");
        says("--scale 64,1", "--scale counts must be ascending");
        says("--rounds 101", "expected a whole number of rounds from 1 to 100");
        says("--rounds 2 --role server", "--rounds applies to the client's transfer table");
    }

    #[test]
    fn help_lists_every_flag_but_the_internal_one() {
        let e = parse("--help").unwrap_err();
        assert_eq!((e.kind(), e.exit_code()), (ErrorKind::DisplayHelp, 0));
        let help = e.to_string();
        for flag in [
            "--loopback",
            "--role",
            "--remote-ip",
            "--port",
            "--ops",
            "--sizes",
            "--iters",
            "--depth",
            "--channels",
            "--num-iovs",
            "--scatter",
            "--json",
            "--plot",
            "--json-file",
            "--no-baseline",
            "--device",
            "--gpu",
            "--peer-gpu",
            "--peer-device",
            "--cpus",
            "--split-cores",
            "--same-host",
            "--huge-pages",
            "--scale",
            "--idle-secs",
            "--rounds",
            "--help",
        ] {
            assert!(help.split_whitespace().any(|w| w == flag), "{flag} in {help}");
        }
        assert!(!help.contains("--announce") && !help.contains("--serve-gpu"), "{help}");
        assert!(help.contains("[default: 19971]") && help.contains("UCCL_TCPX_SOCKET_NTHREADS"), "{help}");
    }

    #[test]
    fn command_lines_from_the_readme_scripts_and_docs_parse() {
        for line in [
            "--role server --port 19971",
            "--role client --remote-ip 10.0.0.2 --port 19971",
            "--ops write --sizes 64M --channels 4 --depth 2",
            "--ops transport --sizes 8,4K",
            "--json",
            "--plot run.png",
            "--iters 5 --num-iovs 4 --no-baseline --json-file run.json --cpus 0-7,12",
            "--sizes 16M --ops write,read --num-iovs 1024 --scatter 1G",
            "--sizes 400000K --ops write,read --num-iovs 100000 --scatter 1G --iters 8",
            "--split-cores",
            "--device gpu --gpu 1 --peer-gpu 0",
            "--role server --device gpu --gpu 1",
            // scripts/gpu_bench.sh, one layout of each shape
            "--device gpu --channels 8 --depth 4 --ops write,read,send --sizes 8,4K,64K,1M,16M,64M,256M \
             --json-file out/bench-gpu-ch8-depth4.json",
            "--device cpu --channels 4 --ops write,read,send --sizes 8,4K,64K,1M,16M,64M,256M --json-file x.json",
            // scripts/diag/thread_cpu.py
            "--ops write --sizes 64M --iters 2500 --no-baseline",
            // docs/PERFORMANCE.md
            "--ops write,read,send,transport --sizes 8,4K --iters 5000",
            "--loopback --ops write --device gpu --sizes 512K,4M,64M --no-baseline",
            "--device gpu --ops write,read,send --sizes 4K,64K,1M,4M,64M --no-baseline",
            "--device gpu --peer-device cpu --ops write,send --sizes 4K,64K,1M,4M,64M --no-baseline",
            "--sizes 128K,256K,512K,1M,4M,64M --ops write,read",
            "--ops write,read --sizes 64M --depth 4 --iters 16 --channels 8",
            "--same-host --ops write,read --sizes 64K,1M,16M,64M",
            "--same-host --device gpu --peer-gpu 1 --ops write,read --sizes 8,64M --no-baseline",
            "--same-host --device gpu --gpu 0 --peer-gpu 1 --ops send --sizes 16M,64M",
            "--scale 1,64,256,1024",
            "--scale 1,64 --sizes 64K --idle-secs 2",
            "--scale 1,8 --same-host",
            "--same-host --ops write,read --sizes 16M --rounds 5",
            "--same-host --huge-pages --ops write,read --sizes 1M,2M,4M,8M,16M,64M --iters 40 --no-baseline",
            // docs/PERFORMANCE.md, the commands of its figures
            "--sizes 64K,256K,1M,4M,16M,64M --ops write,read --iters 300",
            "--sizes 64K,256K,1M,4M,16M,64M,256M --ops write,read --rounds 3",
            "--sizes 8 --ops write,read,send --iters 5000 --rounds 3",
            "--sizes 8,64K --ops write,read,send --iters 5000",
            "--same-host --device gpu --gpu 0 --peer-gpu 1 --ops write,read --no-baseline --sizes 16M --num-iovs 1024 \
             --scatter 64M",
            "--same-host --device gpu --sizes 16M --ops write,read --num-iovs 1024 --scatter 1G --no-baseline \
             --iters 100",
            "--same-host --sizes 1M,2M,4M,8M,16M --ops write,read --iters 600 --rounds 3 --no-baseline",
            "--ops write --device gpu --sizes 512K,4M,64M --no-baseline",
            "--sizes 16M --ops write,read --num-iovs 64 --scatter 1G --no-baseline --iters 100",
            "--same-host --device gpu --gpu 0 --peer-gpu 1 --ops write,read --sizes 4K,64K,256K,1M,16M,64M,256M \
             --no-baseline",
            "--sizes 64M --ops write,read",
            "--sizes 409600000 --ops write,read --num-iovs 100000 --scatter 1G --iters 8",
        ] {
            if let Err(e) = parse(line) {
                panic!("{line}: {e}");
            }
        }
    }

    #[test]
    fn scale_flags() {
        let d = parse("").unwrap();
        assert!(d.scale.is_empty());
        let s = parse("--scale 1,64,256,1024").unwrap();
        assert_eq!((&s.scale[..], s.idle_secs, s.scale_size()), (&[1, 64, 256, 1024][..], 3.0, 1 << 20));
        let t = parse("--scale 2 --sizes 64K,1M --idle-secs 0.5").unwrap();
        assert_eq!((t.scale_size(), t.idle_secs), (64 << 10, 0.5));
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

    #[test]
    fn a_host_memory_server_behind_a_gpu_client() {
        let a = parse("--device gpu --peer-device cpu --peer-gpu 1 --channels 2").unwrap();
        let child = a.server_child_args().join(" ");
        assert!(child.ends_with("--channels 2 --serve-gpu 1"), "{child}");
        let argv = std::iter::once("uccl-tcpx-bench".to_string()).chain(a.server_child_args());
        let server = Args::try_from_args(argv).unwrap();
        assert_eq!((server.device, server.serve_gpu), (Device::Cpu, Some(1)));
        let b = parse("--peer-device gpu --peer-gpu 1").unwrap();
        assert!(b.uses_gpu());
        assert!(b.server_child_args().join(" ").ends_with("--device gpu --gpu 1"));
        let plain = parse("--peer-device cpu").unwrap();
        assert!(!plain.uses_gpu() && !plain.server_child_args().iter().any(|w| w.contains("gpu")));
        let e = parse("--role server --peer-device cpu").unwrap_err().to_string();
        assert!(e.contains("--peer-device applies to --loopback only"), "{e}");
    }

    #[test]
    fn a_server_child_parses_what_its_parent_hands_it() {
        let parent = parse("--device gpu --gpu 1 --peer-gpu 0 --channels 3").unwrap();
        let argv = std::iter::once("uccl-tcpx-bench".to_string()).chain(parent.server_child_args());
        let child = Args::try_from_args(argv).unwrap();
        assert_eq!((child.role, child.port, child.announce), (Role::Server, 0, true));
        assert_eq!((child.device, child.gpu, child.channels), (Device::Gpu, 0, Some(3)));
        assert!(!child.huge_pages);
        let parent = parse("--same-host --ops write,read --huge-pages").unwrap();
        let argv = std::iter::once("uccl-tcpx-bench".to_string()).chain(parent.server_child_args());
        assert!(Args::try_from_args(argv).unwrap().huge_pages, "both ends' buffers ask for huge pages");
    }
}
