//! The fake's knobs, read once by `init` (as TCPX reads its environment once). A malformed value
//! fails `init` with a message naming the variable. The few TCPX variables the fake honours
//! (`NCCL_NSOCKS_PERTHREAD`, `NCCL_SOCKET_NTHREADS`,
//! `NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS`) are read as TCPX reads them: a value out
//! of range falls back to the default instead of failing. `FAKE_TCPX_PLUGIN_KIND` is read here too,
//! to be checked against the kind the library was loaded as (`profile.rs`).

use std::net::IpAddr;
use std::time::Duration;

use crate::fail::{Fail, Result};
use crate::profile::{self, Kind};
use crate::topology::{self, NicSpec};

/// The pool of a GPU by default, MiB. TCPX's is 4 GiB per GPU (RxDM's `RX_POOL_SIZE`); this is
/// smaller, so a consumer that hoards pages meets the wait sooner, and still several times what
/// the engine keeps posted by default: 16 receives of 2 MiB on each of 4 channels is 128 MiB per
/// connection and direction, 171 MiB of pages with FAKE_TCPX_FRAGMENT=random, and a loopback pair
/// receives in both directions on one GPU.
const DEFAULT_POOL_MIB: u64 = 1024;

/// Devices with devmem `FAKE_TCPX_NDEV` may ask for: with eth0, TCPX's `MAX_IFS`.
const MAX_DEVMEM_DEVICES: u64 = topology::MAX_DEVICES as u64 - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bounce pool, metadata and device handle in host memory: runs anywhere.
    Host,
    /// Bounce pool and device handle in GPU memory, metadata in mapped pinned memory, as TCPX.
    Gpu,
}

/// How GPU mode moves a received message from its pinned staging buffer into its pool pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuCopy {
    /// One host-to-device copy of the whole message into device scratch memory, then one small
    /// scatter kernel (compiled by NVRTC; without it, `Batch`).
    Kernel,
    /// One `cuMemcpyBatchAsync` per receive (CUDA 12.8+ drivers; older ones fall back to `Each`).
    Batch,
    /// One `cuMemcpyHtoDAsync` per run of contiguous fragments.
    Each,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragmentation {
    /// Whole 4 KiB fragments at page starts; partial ones only at chunk edges.
    Page,
    /// Random lengths and in-page offsets, so that every alignment occurs.
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// After this many completed requests on a comm its connection is dropped.
    Drop(u64),
    /// After this many completed requests a comm stops progressing.
    Stall(u64),
}

/// What the fake does where TCPX calls `exit(1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFatal {
    /// Exit the process with status 1 after the WARN, as TCPX does.
    Exit,
    /// Return rc 3 from the call and leave the comm failed, so one test can observe it.
    Rc,
}

/// How long connection setup takes, as TCPX's `connect.cc` spends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupTiming {
    /// Slept before each socket on both sides (TCPX: `usleep(100 * 1000)` per socket).
    pub socket_delay: Duration,
    /// Data sockets per comm: `NCCL_NSOCKS_PERTHREAD` x `NCCL_SOCKET_NTHREADS` of the listener, as
    /// `tcpxGetNsockNthread` computes it; the ctrl socket comes on top.
    pub data_sockets: u32,
    /// Slept by accept after its last socket, so flow-steering rules are active before data flows.
    pub steering_wait: Duration,
}

/// TCPX's `kNSocksPerThread` / `kNThreads` limits (`macro.h`: `MAX_SOCKETS`, `MAX_THREADS`).
const TCPX_MAX_SOCKETS: u64 = 8;
const TCPX_MAX_THREADS: u64 = 16;
/// TCPX's steering wait when `NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS` is unset or not
/// positive.
const TCPX_STEERING_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Config {
    /// `FAKE_TCPX_PLUGIN_KIND`: the plugin the fake stands in for.
    pub kind: Kind,
    /// `FAKE_TCPX_NDEV`: devices with devmem in the default topology (its own default when unset).
    pub devices: Option<usize>,
    /// `FAKE_TCPX_TOPOLOGY`, which replaces the default topology.
    pub topology: Option<Vec<NicSpec>>,
    /// The plugin's interface list and the variable it came from: TCPX's
    /// `NCCL_GPUDIRECTTCPX_SOCKET_IFNAME`; TCPXO's `NCCL_FASTRAK_IFNAME`, else
    /// `NCCL_FASTRAK_SOCKET_IFNAME`.
    pub ifname: Option<(&'static str, String)>,
    pub ip: IpAddr,
    pub mode: Mode,
    pub gpu_copy: GpuCopy,
    pub fragmentation: Fragmentation,
    pub seed: u64,
    /// The bounce pool of each GPU (host mode: the one pool), shared by its receive comms.
    pub pool_bytes: usize,
    /// Sends are cut into chunks of this size, like TCPX's `NCCL_DYNAMIC_CHUNK_SIZE`; fragmentation
    /// restarts at every chunk edge.
    pub chunk_bytes: usize,
    pub fault: Fault,
    pub on_fatal: OnFatal,
    /// GPU mode: whether a HOST-registered receive is accepted (TCPX: it cannot read a steered flow).
    pub host_recv_allowed: bool,
    /// Whether overlapping calls from two threads are caught.
    pub thread_check: bool,
    pub setup: SetupTiming,
    /// Whether a connection whose two ends share a host may carry devmem receives (TCPX: never,
    /// loopback traffic does not reach the NIC).
    pub same_host_allowed: bool,
    /// Whether every request and its unpack slot are traced on stderr (`log::trace`).
    pub trace: bool,
}

impl Config {
    pub fn from_env() -> Result<Config> {
        Self::parse(|name| std::env::var(name).ok())
    }

    pub fn parse(var: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let get = |name: &str| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let kind = Kind::parse(get(profile::VAR).as_deref()).map_err(Fail::internal)?;
        let devices = match get("FAKE_TCPX_NDEV") {
            Some(_) => Some(number(&get, "FAKE_TCPX_NDEV", 0, 1, MAX_DEVMEM_DEVICES)? as usize),
            None => None,
        };
        let topology = match get("FAKE_TCPX_TOPOLOGY") {
            Some(_) if devices.is_some() => {
                return Err(Fail::internal(
                    "FAKE_TCPX_NDEV and FAKE_TCPX_TOPOLOGY are both set: the topology lists every device",
                ));
            }
            Some(v) => Some(topology::parse(&v).map_err(|why| Fail::internal(format!("FAKE_TCPX_TOPOLOGY: {why}")))?),
            None => None,
        };
        let ifname = interface_list(kind, &get);
        let ip = match get("FAKE_TCPX_IP") {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(v) => v.parse().map_err(|_| bad("FAKE_TCPX_IP", &v, "an IPv4 or IPv6 address"))?,
        };
        let mode = match get("FAKE_TCPX_MODE").as_deref() {
            None | Some("host") => Mode::Host,
            Some("gpu") => Mode::Gpu,
            Some(v) => return Err(bad("FAKE_TCPX_MODE", v, "host or gpu")),
        };
        let gpu_copy = match get("FAKE_TCPX_GPU_COPY").as_deref() {
            None | Some("kernel") => GpuCopy::Kernel,
            Some("batch") => GpuCopy::Batch,
            Some("each") => GpuCopy::Each,
            Some(v) => return Err(bad("FAKE_TCPX_GPU_COPY", v, "kernel, batch or each")),
        };
        let fragmentation = match get("FAKE_TCPX_FRAGMENT").as_deref() {
            None | Some("page") => Fragmentation::Page,
            Some("random") => Fragmentation::Random,
            Some(v) => return Err(bad("FAKE_TCPX_FRAGMENT", v, "page or random")),
        };
        let seed = number(&get, "FAKE_TCPX_SEED", 0x7c9f_0d5e, 0, u64::MAX)?;
        // src_off is 32-bit, so the pool cannot exceed 4 GiB (TCPX's pool is exactly that).
        let pool_mib = number(&get, "FAKE_TCPX_POOL_MIB", DEFAULT_POOL_MIB, 1, 4096)?;
        if get("FAKE_TCPX_POOL_MB").is_some() {
            // A per-comm size read as a per-GPU one would starve comms that used to have their own.
            return Err(Fail::internal(
                "FAKE_TCPX_POOL_MB (a pool per receive comm) was replaced by FAKE_TCPX_POOL_MIB (one pool per GPU, \
                 shared by its receive comms, as TCPX's)",
            ));
        }
        let chunk_bytes = number(&get, "FAKE_TCPX_CHUNK", 512 * 1024, 1, i32::MAX as u64)? as usize;
        let fault = match get("FAKE_TCPX_FAULT") {
            None => Fault::None,
            Some(v) => parse_fault(&v)?,
        };
        let on_fatal = match get("FAKE_TCPX_ON_FATAL").as_deref() {
            None | Some("exit") => OnFatal::Exit,
            Some("rc") => OnFatal::Rc,
            Some(v) => return Err(bad("FAKE_TCPX_ON_FATAL", v, "exit or rc")),
        };
        let host_recv_allowed = choice(&get, "FAKE_TCPX_HOST_RECV", ("fail", "allow"))?;
        let thread_check = !choice(&get, "FAKE_TCPX_THREAD_CHECK", ("on", "off"))?;
        // TCPXO's setup time is its transfer service's, which nothing in its source fixes: none by
        // default there.
        let delay_default = if kind == Kind::Tcpx { 100 } else { 0 };
        let socket_delay = Duration::from_millis(number(&get, "FAKE_TCPX_SOCKET_DELAY_MS", delay_default, 0, 10_000)?);
        let steering_wait = match (get("FAKE_TCPX_STEERING_WAIT_MS"), kind) {
            (Some(_), _) => Duration::from_millis(number(&get, "FAKE_TCPX_STEERING_WAIT_MS", 0, 0, 600_000)?),
            (None, Kind::Tcpx) => tcpx_steering_wait(get("NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS")),
            (None, Kind::Tcpxo) => Duration::ZERO,
        };
        let data_sockets = tcpx_data_sockets(get("NCCL_NSOCKS_PERTHREAD"), get("NCCL_SOCKET_NTHREADS"));
        let same_host_allowed = choice(&get, "FAKE_TCPX_SAME_HOST", ("fatal", "allow"))?;
        let trace = choice(&get, "FAKE_TCPX_DEBUG", ("0", "1"))?;
        Ok(Config {
            kind,
            devices,
            topology,
            ifname,
            ip,
            mode,
            gpu_copy,
            fragmentation,
            seed,
            pool_bytes: pool_mib as usize * 1024 * 1024,
            chunk_bytes,
            fault,
            on_fatal,
            host_recv_allowed,
            thread_check,
            setup: SetupTiming { socket_delay, data_sockets, steering_wait },
            same_host_allowed,
            trace,
        })
    }
}

/// The plugin's interface list. TCPX (`misc/socket_utils.cc`): a value of one character counts as
/// unset. TCPXO: `NCCL_FASTRAK_IFNAME` when set (`fo/common.cc` `initializeNetIfs` L68), else
/// `NCCL_FASTRAK_SOCKET_IFNAME` longer than one character (`fo/utilities.h` `findInterfaces` L464).
fn interface_list(kind: Kind, get: &impl Fn(&str) -> Option<String>) -> Option<(&'static str, String)> {
    let named = |name: &'static str, min: usize| get(name).filter(|v| v.len() >= min).map(|v| (name, v));
    match kind {
        Kind::Tcpx => named("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", 2),
        Kind::Tcpxo => named("NCCL_FASTRAK_IFNAME", 1).or_else(|| named("NCCL_FASTRAK_SOCKET_IFNAME", 2)),
    }
}

/// A two-valued knob: `false` for the first (default) value, `true` for the second.
fn choice(get: &impl Fn(&str) -> Option<String>, name: &str, (default, other): (&str, &str)) -> Result<bool> {
    match get(name) {
        None => Ok(false),
        Some(v) if v == default => Ok(false),
        Some(v) if v == other => Ok(true),
        Some(v) => Err(bad(name, &v, &format!("{default} or {other}"))),
    }
}

/// An integer TCPX parameter as `ncclLoadParam` reads it: anything unparsable is the default.
fn tcpx_param(v: Option<String>, default: i64) -> i64 {
    v.and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `tcpxGetNsockNthread` (connect.cc) with `TCPX_GET_INT_FLAG`'s range checks (net_tcpx.cc
/// `tcpxInit`): out-of-range values keep the defaults of flags.cc (1 and 1), and a product above
/// `MAX_SOCKETS` lowers the sockets per thread.
fn tcpx_data_sockets(per_thread: Option<String>, threads: Option<String>) -> u32 {
    let in_range = |v: i64, hi: u64| if (1..=hi as i64).contains(&v) { v as u64 } else { 1 };
    let mut per_thread = in_range(tcpx_param(per_thread, 1), TCPX_MAX_SOCKETS);
    let threads = in_range(tcpx_param(threads, 1), TCPX_MAX_THREADS);
    if per_thread * threads > TCPX_MAX_SOCKETS {
        per_thread = TCPX_MAX_SOCKETS / threads;
    }
    (per_thread * threads) as u32
}

/// `tcpxAsyncAcceptV5_v5` (connect.cc): the parameter in microseconds when positive, else 5 s.
fn tcpx_steering_wait(v: Option<String>) -> Duration {
    match tcpx_param(v, -2) as i32 {
        v if v > 0 => Duration::from_micros(v as u64),
        _ => TCPX_STEERING_WAIT,
    }
}

fn parse_fault(v: &str) -> Result<Fault> {
    let expected = "none, drop:N or stall:N";
    if v == "none" {
        return Ok(Fault::None);
    }
    let (kind, n) = v.split_once(':').ok_or_else(|| bad("FAKE_TCPX_FAULT", v, expected))?;
    let n: u64 = n.trim().parse().map_err(|_| bad("FAKE_TCPX_FAULT", v, expected))?;
    match kind.trim() {
        "drop" => Ok(Fault::Drop(n)),
        "stall" => Ok(Fault::Stall(n)),
        _ => Err(bad("FAKE_TCPX_FAULT", v, expected)),
    }
}

fn number(get: &impl Fn(&str) -> Option<String>, name: &str, default: u64, min: u64, max: u64) -> Result<u64> {
    let Some(v) = get(name) else { return Ok(default) };
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    };
    match parsed {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(name, &v, &format!("an integer in {min}..={max}"))),
    }
}

fn bad(name: &str, value: &str, expected: &str) -> Fail {
    Fail::internal(format!("{name}={value:?} is not valid: expected {expected}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config> {
        Config::parse(|n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.kind, Kind::Tcpx);
        assert_eq!((c.devices, &c.topology, &c.ifname), (None, &None, &None));
        assert_eq!(c.mode, Mode::Host);
        assert_eq!(c.gpu_copy, GpuCopy::Kernel);
        assert_eq!(c.fragmentation, Fragmentation::Page);
        assert_eq!(c.pool_bytes, 1 << 30);
        assert_eq!(c.fault, Fault::None);
        assert_eq!(c.on_fatal, OnFatal::Exit);
        assert!(!c.host_recv_allowed);
        assert!(c.thread_check);
        assert!(!c.same_host_allowed);
        assert!(!c.trace);
        let tcpx = SetupTiming {
            socket_delay: Duration::from_millis(100),
            data_sockets: 1,
            steering_wait: Duration::from_secs(5),
        };
        assert_eq!(c.setup, tcpx);
    }

    #[test]
    fn setup_timing_follows_tcpx() {
        let setup = |pairs: &[(&str, &str)]| parse(pairs).unwrap().setup;
        assert_eq!(setup(&[("NCCL_NSOCKS_PERTHREAD", "4")]).data_sockets, 4);
        assert_eq!(setup(&[("NCCL_NSOCKS_PERTHREAD", "4"), ("NCCL_SOCKET_NTHREADS", "2")]).data_sockets, 8);
        // Above MAX_SOCKETS the sockets per thread drop to 8 / threads.
        assert_eq!(setup(&[("NCCL_NSOCKS_PERTHREAD", "8"), ("NCCL_SOCKET_NTHREADS", "3")]).data_sockets, 6);
        // Out of range or unparsable: the default, as TCPX_GET_INT_FLAG restores it.
        assert_eq!(setup(&[("NCCL_NSOCKS_PERTHREAD", "9")]).data_sockets, 1);
        assert_eq!(setup(&[("NCCL_NSOCKS_PERTHREAD", "x")]).data_sockets, 1);
        let wait = |v: &str| setup(&[("NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS", v)]).steering_wait;
        assert_eq!(wait("500000"), Duration::from_millis(500));
        assert_eq!(wait("0"), Duration::from_secs(5), "only a positive value replaces the 5 s");
        assert_eq!(wait("-1"), Duration::from_secs(5));
        let own = setup(&[
            ("NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS", "500000"),
            ("FAKE_TCPX_STEERING_WAIT_MS", "0"),
            ("FAKE_TCPX_SOCKET_DELAY_MS", "0"),
        ]);
        assert_eq!((own.steering_wait, own.socket_delay), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn tcpxo_reads_its_own_interface_list_and_spends_no_setup_time() {
        let tcpxo = |pairs: &[(&str, &str)]| {
            let mut all = vec![("FAKE_TCPX_PLUGIN_KIND", "tcpxo")];
            all.extend_from_slice(pairs);
            parse(&all).unwrap()
        };
        let c = tcpxo(&[]);
        assert_eq!(
            (c.kind, c.setup.socket_delay, c.setup.steering_wait),
            (Kind::Tcpxo, Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(tcpxo(&[("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "eth1")]).ifname, None, "TCPX's list");
        let fastrak = tcpxo(&[("NCCL_FASTRAK_IFNAME", "e"), ("NCCL_FASTRAK_SOCKET_IFNAME", "eth2")]).ifname;
        assert_eq!(fastrak, Some(("NCCL_FASTRAK_IFNAME", "e".to_owned())), "first, and any length");
        let socket = tcpxo(&[("NCCL_FASTRAK_SOCKET_IFNAME", "eth2")]).ifname;
        assert_eq!(socket, Some(("NCCL_FASTRAK_SOCKET_IFNAME", "eth2".to_owned())));
        assert_eq!(tcpxo(&[("NCCL_FASTRAK_SOCKET_IFNAME", "e")]).ifname, None, "too short");
        assert_eq!(tcpxo(&[("FAKE_TCPX_SOCKET_DELAY_MS", "5")]).setup.socket_delay, Duration::from_millis(5));
    }

    #[test]
    fn values_and_errors() {
        let c = parse(&[("FAKE_TCPX_FAULT", "drop:3"), ("FAKE_TCPX_NDEV", "4"), ("FAKE_TCPX_SEED", "0x10")]).unwrap();
        assert_eq!(c.fault, Fault::Drop(3));
        assert_eq!(c.devices, Some(4));
        let t = parse(&[("FAKE_TCPX_TOPOLOGY", "eth9 /sys/devices/pci0000:01/0000:01:00.0 *")]).unwrap();
        assert_eq!(t.topology.unwrap()[0].name, "eth9");
        let list = |pairs: &[(&str, &str)]| parse(pairs).unwrap().ifname.map(|(var, v)| format!("{var}={v}"));
        assert_eq!(
            list(&[("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "eth1")]).unwrap(),
            "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME=eth1"
        );
        assert_eq!(list(&[("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "e")]), None, "too short for TCPX");
        assert_eq!(c.seed, 16);
        assert_eq!(parse(&[("FAKE_TCPX_GPU_COPY", "each")]).unwrap().gpu_copy, GpuCopy::Each);
        assert_eq!(parse(&[("FAKE_TCPX_GPU_COPY", "batch")]).unwrap().gpu_copy, GpuCopy::Batch);
        assert_eq!(parse(&[("FAKE_TCPX_FAULT", "stall:0")]).unwrap().fault, Fault::Stall(0));
        assert_eq!(parse(&[("FAKE_TCPX_ON_FATAL", "rc")]).unwrap().on_fatal, OnFatal::Rc);
        assert!(parse(&[("FAKE_TCPX_HOST_RECV", "allow")]).unwrap().host_recv_allowed);
        assert!(!parse(&[("FAKE_TCPX_THREAD_CHECK", "off")]).unwrap().thread_check);
        assert!(parse(&[("FAKE_TCPX_SAME_HOST", "allow")]).unwrap().same_host_allowed);
        assert!(parse(&[("FAKE_TCPX_DEBUG", "1")]).unwrap().trace);
        assert_eq!(parse(&[("FAKE_TCPX_PLUGIN_KIND", "tcpxo")]).unwrap().kind, Kind::Tcpxo);
        let both =
            parse(&[("FAKE_TCPX_NDEV", "2"), ("FAKE_TCPX_TOPOLOGY", "eth1 /sys/devices/pci0000:01/0000:01:00.0")]);
        assert!(both.unwrap_err().msg.contains("both set"));
        for (k, v) in [
            ("FAKE_TCPX_NDEV", "0"),
            ("FAKE_TCPX_NDEV", "16"),
            ("FAKE_TCPX_TOPOLOGY", "eth1"),
            ("FAKE_TCPX_MODE", "cpu"),
            ("FAKE_TCPX_FRAGMENT", "pages"),
            ("FAKE_TCPX_GPU_COPY", "kernels"),
            ("FAKE_TCPX_POOL_MIB", "4097"),
            ("FAKE_TCPX_POOL_MIB", "0"),
            ("FAKE_TCPX_POOL_MB", "64"),
            ("FAKE_TCPX_FAULT", "drop"),
            ("FAKE_TCPX_FAULT", "hang:1"),
            ("FAKE_TCPX_IP", "localhost"),
            ("FAKE_TCPX_ON_FATAL", "abort"),
            ("FAKE_TCPX_HOST_RECV", "1"),
            ("FAKE_TCPX_THREAD_CHECK", "no"),
            ("FAKE_TCPX_SOCKET_DELAY_MS", "10001"),
            ("FAKE_TCPX_STEERING_WAIT_MS", "-1"),
            ("FAKE_TCPX_SAME_HOST", "yes"),
            ("FAKE_TCPX_DEBUG", "yes"),
            ("FAKE_TCPX_PLUGIN_KIND", "fastrak"),
        ] {
            let err = parse(&[(k, v)]).unwrap_err();
            assert!(err.msg.contains(k), "{k}={v}: {}", err.msg);
        }
    }
}
