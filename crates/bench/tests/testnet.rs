//! `scripts/testnet.sh bench`, the command behind every figure taken across test hosts: the bench's
//! server on one test host and its client on another, each end confined to CPUs of its own with the
//! bench's `--cpus` (one given through `--server-arg`), as two small hosts would be. The run must
//! take the network path, measure ours and the raw anchors at every point, and leave no namespace
//! behind. Needs root, as every test across test hosts does (`UCCL_TCPX_REQUIRE_NETNS=1` makes its
//! absence a failure).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::netns::TestNet;

const BENCH: &str = env!("CARGO_BIN_EXE_uccl-tcpx-bench");
/// A run of a few hundred transfers and their anchors on a loaded two-core machine takes seconds.
const LIMIT: Duration = Duration::from_secs(180);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testnet.sh")
}

fn status_field(pid: &str, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().to_owned())
}

/// The CPU lists the bench processes on test host `ns` run on now.
fn bench_cpus(ns: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| status_field(pid, "Name:").as_deref() == Some("uccl-tcpx-bench"))
        .filter_map(|pid| status_field(pid, "Cpus_allowed_list:"))
        .collect()
}

#[test]
fn bench_runs_across_two_test_hosts_with_each_end_on_its_own_cpus() {
    // The same rule as every test across hosts: skip (or fail, where required) without namespaces.
    let Some(probe) = TestNet::up(1, None) else { return };
    drop(probe);
    let allowed = status_field("self", "Cpus_allowed_list:").expect("this process's CPU list");
    let first = allowed.split([',', '-']).next().expect("a CPU").to_owned();
    let last = allowed.rsplit([',', '-']).next().expect("a CPU").to_owned();
    let dir = std::env::temp_dir().join(format!("uccl-testnet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("run.json");
    let log = dir.join("run.log");
    let mut child = Command::new("bash")
        .arg(script())
        .args(["bench", "--bin", BENCH, "--server-arg", "--cpus", "--server-arg", &last, "--", "--cpus", &first])
        .args(["--sizes", "64K,1M", "--ops", "write,read,send", "--iters", "100", "--rounds", "2"])
        .arg("--json-file")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("run.err")).unwrap())
        .spawn()
        .expect("bash runs testnet.sh");
    // The script names its test hosts after its own process.
    let prefix: String = format!("tb{}", child.id()).chars().take(8).collect();
    let (client_ns, server_ns) = (format!("{prefix}h0"), format!("{prefix}h1"));
    let (mut client_seen, mut server_seen) = (BTreeSet::new(), BTreeSet::new());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        client_seen.extend(bench_cpus(&client_ns));
        server_seen.extend(bench_cpus(&server_ns));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("testnet.sh bench still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = std::fs::read_to_string(&log).unwrap() + &std::fs::read_to_string(dir.join("run.err")).unwrap();
    assert!(status.success(), "testnet.sh bench: {status}\n{output}");

    // Each end ran on the CPU it was given: a bench starts on every CPU of the machine and pins
    // itself before its first thread, so the lists seen are those two, the given one among them.
    assert!(client_seen.contains(&first) && server_seen.contains(&last), "{client_seen:?} {server_seen:?}\n{output}");

    let saved = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{e}: no JSON file\n{output}"));
    let report: Value = serde_json::from_str(&saved).unwrap_or_else(|e| panic!("{e}: {saved}"));
    assert_eq!(report["mode"].as_str(), Some("client of 198.18.0.2"), "{saved}");
    assert_eq!(report["same_host"].as_bool(), Some(false), "{saved}");
    let results = report["results"].as_array().expect("a results list");
    let points: Vec<(&str, u64)> =
        results.iter().map(|p| (p["op"].as_str().unwrap(), p["size"].as_u64().unwrap())).collect();
    let want: Vec<(&str, u64)> =
        ["write", "read", "send"].into_iter().flat_map(|op| [(op, 64u64 << 10), (op, 1 << 20)]).collect();
    assert_eq!(points, want, "{saved}");
    for p in results {
        for key in ["gb_per_s", "raw_gb_per_s", "raw_msg_gb_per_s", "msg_ratio"] {
            assert!(p[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {p}");
        }
        assert_eq!(p["rounds"].as_array().map(Vec::len), Some(2), "{p}");
    }

    // Every exit path of the script removes what it made.
    let left = Command::new("bash").arg(script()).args(["check", &prefix]).output().unwrap();
    assert!(left.status.success(), "test hosts {prefix} left behind: {}", String::from_utf8_lossy(&left.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
