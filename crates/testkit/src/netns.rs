//! Test hosts on this machine (`scripts/testnet.sh`): network namespaces joined by veth links, so a
//! test's engines cross a real network stack, choose interfaces and lose links. A [`TestNet`] is
//! removed when dropped, and the drop checks that nothing of it is left behind.
//!
//! Making namespaces needs root; where it cannot be done the tests print SKIPPED and pass, unless
//! `UCCL_TCPX_REQUIRE_NETNS=1` (set by `.ci/run`), under which that is a failure.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Makes a missing namespace facility a failure instead of a skip.
const REQUIRE_VAR: &str = "UCCL_TCPX_REQUIRE_NETNS";

/// `scripts/testnet.sh`: in this checkout, or under the working directory where a test binary runs
/// away from its build tree (the GPU bundle runs from the repository root).
fn script() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testnet.sh");
    if built.exists() { built } else { PathBuf::from("scripts/testnet.sh") }
}

fn run_script(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("bash").arg(script()).args(args).output()
}

/// Two test hosts (0 and 1): a control link and `data_links` data links between them.
pub struct TestNet {
    prefix: String,
    data_links: usize,
}

impl TestNet {
    /// Makes the hosts, each data link shaped to `rate` (tc's syntax, e.g. "1gbit") where given.
    /// `None` (after printing SKIPPED) where namespaces cannot be made here and the environment
    /// does not require them.
    pub fn up(data_links: usize, rate: Option<&str>) -> Option<TestNet> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Unique across the processes of a run and the tests of one: 8 characters at most.
        let prefix = format!("t{:05x}{:x}", std::process::id() & 0xf_ffff, NEXT.fetch_add(1, Ordering::Relaxed) & 0xf);
        let links = data_links.to_string();
        let mut args = vec!["up", prefix.as_str(), "--data-links", links.as_str()];
        if let Some(rate) = rate {
            args.extend(["--rate", rate]);
        }
        match run_script(&args) {
            Ok(out) if out.status.success() => Some(TestNet { prefix, data_links }),
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                };
                let required = std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1");
                assert!(!required, "{REQUIRE_VAR}=1 but no test hosts could be made: {why}");
                println!("SKIPPED: no test hosts (network namespaces) here: {why}");
                None
            }
        }
    }

    /// The namespace of host `host`.
    pub fn ns(&self, host: usize) -> String {
        format!("{}h{host}", self.prefix)
    }

    /// Host `host`'s address on link `link` (0: control, 1..: data).
    pub fn addr(&self, host: usize, link: usize) -> Ipv4Addr {
        assert!(host < 2 && link <= self.data_links, "host {host}, link {link} of a net of 2 hosts");
        Ipv4Addr::new(198, 18, link as u8, host as u8 + 1)
    }

    /// Host `host`'s name for its control link (0) or data link `link`.
    pub fn iface(&self, host: usize, link: usize) -> String {
        let peer = 1 - host;
        if link == 0 { format!("ctl{peer}") } else { format!("dat{peer}_{link}") }
    }

    /// `program` to be run on host `host`.
    pub fn command(&self, host: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).arg(program);
        cmd
    }

    /// Sets link `link` of host `host` up or down (its peer end keeps its state, as a cable pulled
    /// at one NIC would leave the switch port).
    pub fn set_link(&self, host: usize, link: usize, up: bool) {
        let out = run_script(&[
            "link",
            &self.prefix,
            &host.to_string(),
            &self.iface(host, link),
            if up { "up" } else { "down" },
        ])
        .expect("run testnet.sh");
        assert!(out.status.success(), "testnet.sh link: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Shapes link `link` to `rate` (tc's syntax) at both ends.
    pub fn set_rate(&self, link: usize, rate: &str) {
        for host in 0..2 {
            let out = run_script(&["rate", &self.prefix, &host.to_string(), &self.iface(host, link), rate])
                .expect("run testnet.sh");
            assert!(out.status.success(), "testnet.sh rate: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Bytes host `host` sent and received on link `link`, from the interface's own counters.
    pub fn link_bytes(&self, host: usize, link: usize) -> (u64, u64) {
        let read = |what: &str| -> u64 {
            let path = format!("/sys/class/net/{}/statistics/{what}", self.iface(host, link));
            let out = self.command(host, "cat").arg(path).output().expect("read an interface counter");
            String::from_utf8_lossy(&out.stdout).trim().parse().expect("a byte count")
        };
        (read("tx_bytes"), read("rx_bytes"))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let out = run_script(&["down", &self.prefix]);
        let clean = out.as_ref().is_ok_and(|o| o.status.success());
        if !clean && !std::thread::panicking() {
            let why = match out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            panic!("test hosts {} were not removed cleanly: {why}", self.prefix);
        }
    }
}
