//! The benchmark binary end to end: a short loopback run with its JSON file, and `--device gpu`,
//! which runs where a CUDA driver is present and otherwise fails with one clear line, not a panic.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uccl-tcpx-bench")).args(args).output().expect("the bench binary starts")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn host_run_prints_tables_and_writes_its_json_file() {
    let dir = std::env::temp_dir().join(format!("uccl-tcpx-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("host.json");
    let out =
        bench(&["--sizes", "8,64K", "--iters", "5", "--ops", "write,send", "--json-file", json.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("socket transport, host memory"), "{stdout}");
    assert!(stdout.contains("# Summary"), "{stdout}");
    // 2 ops x 2 sizes, the first transfer of each compared.
    assert!(stdout.contains("# bytes checked: 4 transfers (the first of each measurement), all equal"), "{stdout}");
    let saved = std::fs::read_to_string(&json).unwrap();
    let report: Value = serde_json::from_str(&saved).unwrap_or_else(|e| panic!("{e}: {saved}"));
    assert_eq!((report["device"].as_str(), report["client_memory"].as_str()), (Some("cpu"), Some("host")), "{saved}");
    assert!(report["mode"].as_str().is_some_and(|m| m.starts_with("loopback")), "{saved}");
    assert!(report["channels"].as_u64().is_some_and(|c| c > 0), "{saved}");
    let results = report["results"].as_array().expect("a results list");
    let points: Vec<(&str, u64)> =
        results.iter().map(|p| (p["op"].as_str().unwrap(), p["size"].as_u64().unwrap())).collect();
    assert_eq!(points, [("write", 8), ("write", 65536), ("send", 8), ("send", 65536)], "{saved}");
    for p in results {
        assert_eq!(p["iters"].as_u64(), Some(5), "{p}");
        // Ours and both bandwidth baselines ran for every point and measured something.
        for key in ["gb_per_s", "raw_gb_per_s", "raw_msg_gb_per_s", "p50_us", "raw_pingpong_p50_us"] {
            assert!(p[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {p}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vector_run_reports_the_one_piece_figure_of_the_same_run() {
    let out = bench(&[
        "--sizes",
        "64K,1M",
        "--iters",
        "4",
        "--ops",
        "write,read,send",
        "--num-iovs",
        "16",
        "--scatter",
        "8M",
        "--no-baseline",
        "--json",
    ]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let report: Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {all}"));
    assert_eq!(report["num_iovs"].as_u64(), Some(16), "{all}");
    let results = report["results"].as_array().expect("a results list");
    assert_eq!(results.len(), 6, "{all}");
    for p in results {
        let f = |key: &str| p[key].as_f64().unwrap_or_else(|| panic!("{key} in {p}"));
        assert!(f("contiguous_gb_per_s") > 0.0 && f("post_p50_us") > 0.0, "{p}");
        assert!((f("vector_ratio") - f("gb_per_s") / f("contiguous_gb_per_s")).abs() < 1e-9, "{p}");
    }
}

#[test]
fn same_host_run_measures_its_anchors_in_the_same_run() {
    // The parallel memcpy anchor copies on as many threads as the library would, set or not.
    let out = Command::new(env!("CARGO_BIN_EXE_uccl-tcpx-bench"))
        .args(["--same-host", "--sizes", "64K,4M", "--iters", "4", "--ops", "write,read", "--json"])
        // A count the library's default (three quarters of the CPUs, at most 24) never gives.
        .env("UCCL_TCPX_HOST_COPY_THREADS", "30")
        .output()
        .expect("the bench binary starts");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let report: Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {all}"));
    let path = report["host_path"].as_str().unwrap_or_else(|| panic!("the path is named: {all}"));
    // Whether the kernel lets the two processes read each other is the host's policy; either way
    // the run names what it measured.
    assert!(path.starts_with("reads ") || path.starts_with("loopback TCP"), "{path}");
    assert!(report["mode"].as_str().is_some_and(|m| m.contains("same-host")), "{all}");
    let results = report["results"].as_array().expect("a results list");
    assert_eq!(results.len(), 4, "{all}");
    for p in results {
        let f = |key: &str| p[key].as_f64().unwrap_or_else(|| panic!("{key} in {p}"));
        assert!(f("gb_per_s") > 0.0 && f("tcp_gb_per_s") > 0.0 && f("memcpy_gb_per_s") > 0.0, "{p}");
        assert!((f("tcp_ratio") - f("gb_per_s") / f("tcp_gb_per_s")).abs() < 1e-9, "{p}");
        assert!(f("par_memcpy_gb_per_s") > 0.0, "{p}");
        assert!((f("par_memcpy_ratio") - f("gb_per_s") / f("par_memcpy_gb_per_s")).abs() < 1e-9, "{p}");
    }
    assert_eq!(report["par_memcpy_threads"].as_u64(), Some(30), "{all}");
    // Without the flag no anchors run; with the path off the report names no host path either.
    let plain = |env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uccl-tcpx-bench"));
        cmd.args(["--sizes", "64K", "--iters", "2", "--ops", "write", "--no-baseline", "--json"]);
        if let Some(v) = env {
            cmd.env("UCCL_TCPX_DISABLE_IPC", v);
        }
        let out = cmd.output().expect("the bench binary starts");
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_str::<Value>(&String::from_utf8_lossy(&out.stdout)).unwrap()
    };
    // Unset, the bench measures the network path; an explicit 0 lets the plain run go local.
    let default = plain(None);
    assert!(default["host_path"].is_null(), "{default}");
    let local = plain(Some("0"));
    assert!(local["host_path"].is_string() && local["results"][0]["tcp_gb_per_s"].is_null(), "{local}");
    let off = plain(Some("1"));
    assert!(off["host_path"].is_null() && off["results"][0]["tcp_gb_per_s"].is_null(), "{off}");
}

#[test]
fn gpu_runs_or_says_it_needs_a_driver() {
    let out = bench(&["--device", "gpu", "--sizes", "4K,1M", "--iters", "4", "--json"]);
    let all = text(&out);
    assert!(!all.contains("panicked"), "{all}");
    if out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {all}"));
        assert_eq!(report["device"], "gpu", "{all}");
        assert!(report["client_memory"].as_str().is_some_and(|m| m.starts_with("gpu0@")), "{all}");
        assert_eq!(report["results"].as_array().map(Vec::len), Some(6), "three ops times two sizes: {all}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{all}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("uccl-tcpx-bench: --device gpu needs a CUDA driver: "), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(out.stdout.is_empty(), "nothing measured: {all}");
    }
}

#[test]
fn bad_flags_are_usage_errors_before_anything_runs() {
    for args in [
        &["--gpu", "-1"][..],
        &["--peer-gpu", "1"],
        &["--device", "gpu", "--ops", "transport"],
        &["--sizes", "4X"],
        &["--bogus"],
    ] {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.contains("--help"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing ran");
    }
}

#[test]
fn help_goes_to_stdout_and_succeeds() {
    let out = bench(&["--help"]);
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: uccl-tcpx-bench [OPTIONS]") && help.contains("--split-cores"), "{help}");
}

/// `--scale`: a row per connection count, each with both processes' figures, a busy rate and the
/// free-running one with the slowest and fastest connection's share, and
/// the same transport threads at 1 and at 3 connections (the helpers are shared; one per direction
/// here, and one control reactor thread, so that the first connection already starts all of them
/// on any host).
#[test]
fn scale_run_prints_a_row_per_connection_count() {
    let out = Command::new(env!("CARGO_BIN_EXE_uccl-tcpx-bench"))
        .args(["--scale", "1,3", "--idle-secs", "0.2", "--sizes", "64K"])
        .env("UCCL_TCPX_SOCKET_HELPERS", "1")
        .env("UCCL_TCPX_CONTROL_THREADS", "1")
        .output()
        .expect("the bench binary starts");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim_start().starts_with("conns"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), ["1", "3"], "{stdout}");
    for r in &rows {
        assert_eq!(r.len(), 15, "{r:?}");
        assert_eq!((r[6], r[7]), ("0/0", "-/-"), "host memory: no staging ring, no GPU: {r:?}");
        let threads: Vec<usize> = r[3].split('/').map(|t| t.parse().unwrap()).collect();
        let fds: Vec<usize> = r[4].split('/').map(|t| t.parse().unwrap()).collect();
        assert!(threads.iter().all(|&t| t > 1) && fds.iter().all(|&f| f > 3), "{r:?}");
        assert!(r[11].parse::<f64>().unwrap() > 0.0, "busy GB/s in {r:?}");
        // Free-running: an aggregate rate, and the slowest and fastest connection around the mean.
        assert!(r[13].parse::<f64>().unwrap() >= 0.0, "free GB/s in {r:?}");
        if let Some((slowest, fastest)) = r[14].split_once('-') {
            let (slowest, fastest): (f64, f64) = (slowest.parse().unwrap(), fastest.parse().unwrap());
            assert!(slowest <= 1.0 && fastest >= 1.0, "each/mean in {r:?}");
        } else {
            assert_eq!(r[14], "n/a", "each/mean in {r:?}");
        }
    }
    let threads = |r: &Vec<&str>| r[3].split('/').map(|t| t.parse::<usize>().unwrap()).collect::<Vec<_>>();
    // More connections add no thread: the engine's one control reactor thread serves every control
    // stream, and the socket helpers every data socket.
    let (one, three) = (threads(&rows[0]), threads(&rows[1]));
    assert_eq!(three, one, "{stdout}");
}

/// `--scale --same-host`: the connections take the same-host path (the bench fails a connection
/// that took another), and the table says which path it measured.
#[test]
fn scale_run_on_the_same_host_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_uccl-tcpx-bench"))
        .args(["--scale", "1,2", "--same-host", "--idle-secs", "0.2", "--sizes", "64K"])
        .env_remove("UCCL_TCPX_DISABLE_IPC")
        .output()
        .expect("the bench binary starts");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("--scale: same-host path"), "{stdout}");
    let rows: Vec<&str> =
        stdout.lines().filter(|l| !l.starts_with('#') && !l.trim_start().starts_with("conns")).collect();
    assert_eq!(rows.iter().map(|r| r.split_whitespace().next().unwrap()).collect::<Vec<_>>(), ["1", "2"], "{stdout}");
}

/// Every point of a `--rounds 3` run: three rounds, each with the figures of its own anchors, and
/// every median (figures and ratios) within what the rounds measured.
fn check_rounds(report: &Value, figures: &[&str], ratios: &[&str]) {
    assert_eq!(report["rounds"].as_u64(), Some(3), "{report}");
    for p in report["results"].as_array().expect("a results list") {
        let each = p["rounds"].as_array().unwrap_or_else(|| panic!("rounds in {p}"));
        assert_eq!(each.len(), 3, "{p}");
        let within = |key: &str, median: f64| {
            let v: Vec<f64> = each.iter().map(|r| r[key].as_f64().unwrap_or_else(|| panic!("{key} in {r}"))).collect();
            let (min, max) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            assert!(min <= median && median <= max, "{key}: median {median} outside {v:?}");
            (min, max)
        };
        for key in figures {
            within(key, p[key].as_f64().unwrap_or_else(|| panic!("{key} in {p}")));
        }
        for key in ratios {
            let median = p[key].as_f64().unwrap_or_else(|| panic!("{key} in {p}"));
            let (min, max) = within(key, median);
            assert_eq!(p["ratio_ranges"][key], serde_json::json!([min, max]), "{p}");
        }
    }
}

#[test]
fn rounds_alternate_ours_and_the_raw_baselines() {
    let out = bench(&["--sizes", "64K", "--iters", "3", "--ops", "write,send", "--rounds", "3", "--json"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let report: Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {all}"));
    assert_eq!(report["results"].as_array().map(Vec::len), Some(2), "{all}");
    let figures = ["gb_per_s", "p50_us", "raw_gb_per_s", "raw_msg_gb_per_s", "raw_pingpong_p50_us"];
    check_rounds(&report, &figures, &["bw_ratio", "msg_ratio", "lat_ratio"]);
    // The tables: a line per point showing its rounds, and the summary saying it holds medians.
    let out = bench(&["--sizes", "8", "--iters", "3", "--ops", "write", "--rounds", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("#   2 rounds: GB/s "), "{stdout}");
    assert!(stdout.contains("# Summary, medians of 2 alternated rounds"), "{stdout}");
}

#[test]
fn same_host_rounds_alternate_ours_and_loopback_tcp() {
    let args = ["--same-host", "--sizes", "64K", "--iters", "3", "--ops", "write,read", "--rounds", "3", "--json"];
    let out = bench(&args);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let report: Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {all}"));
    assert_eq!(report["results"].as_array().map(Vec::len), Some(2), "{all}");
    let figures = ["gb_per_s", "tcp_gb_per_s", "memcpy_gb_per_s", "par_memcpy_gb_per_s"];
    check_rounds(&report, &figures, &["tcp_ratio", "par_memcpy_ratio", "bw_ratio", "msg_ratio"]);
}

/// A reader that stops early (`| head -1`) ends neither the run in a panic nor its exit status in a
/// failure: the bench finishes, printing nothing more.
#[test]
fn a_reader_that_goes_away_early_does_not_fail_the_run() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_uccl-tcpx-bench"))
        .args(["--sizes", "8,4K,64K", "--iters", "5", "--ops", "write,read", "--no-baseline"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the bench binary starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with('#'), "the header comes first: {first:?}");
    // The reader is dropped here: every later write of the bench meets a closed pipe.
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status:?}: {err}");
}

/// `--kv`: each end places the pieces after its own shuffled block table, the blocks in regions
/// registered apart (64 by default, one block each here; 7 of uneven block counts); the run checks
/// every transfer's bytes at the other end (a piece in the wrong block or region fails it), over
/// the network path and the same-host path, and times one piece of the same bytes alongside.
#[test]
fn kv_block_tables_move_checked_bytes_on_both_paths() {
    for (same_host, regions) in [(false, None), (true, None), (false, Some("7")), (true, Some("7"))] {
        // The same-host bench measures one-sided transfers only.
        let ops = if same_host { "write,read" } else { "write,read,send" };
        let mut args = vec!["--sizes", "1M", "--iters", "3", "--ops", ops, "--num-iovs", "64"];
        args.extend(["--scatter", "8M", "--kv", "--no-baseline", "--json"]);
        if same_host {
            args.push("--same-host");
        }
        if let Some(n) = regions {
            args.extend(["--kv-regions", n]);
        }
        let out = bench(&args);
        let all = text(&out);
        assert!(out.status.success(), "same host {same_host}, regions {regions:?}: {all}");
        let report: Value =
            serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|e| panic!("{e}: {all}"));
        assert_eq!(report["kv_regions"].as_u64(), Some(regions.map_or(64, |n| n.parse().unwrap())), "{all}");
        let results = report["results"].as_array().expect("a results list");
        assert_eq!(results.len(), if same_host { 2 } else { 3 }, "{all}");
        for p in results {
            assert!(p["contiguous_gb_per_s"].as_f64().is_some_and(|v| v > 0.0), "{p}");
        }
    }
    let refused = bench(&["--sizes", "1M", "--num-iovs", "64", "--kv"]);
    assert!(!refused.status.success() && text(&refused).contains("--scatter"), "{}", text(&refused));
    let refused = bench(&["--sizes", "1M", "--num-iovs", "64", "--kv-regions", "4"]);
    assert!(!refused.status.success() && text(&refused).contains("--kv"), "{}", text(&refused));
}

/// `scripts/fan_out.sh` on host memory: a table for the staged and same-host paths and for the
/// plugin over the fake (kept open and closed once idle, where `cargo build -p fake-tcpx` put the
/// fake beside the bench), each followed by what a connection added between the two counts.
#[test]
fn fan_out_script_runs_every_path() {
    let bench = env!("CARGO_BIN_EXE_uccl-tcpx-bench");
    let fake = std::path::Path::new(bench).with_file_name("libfake_tcpx.so");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fan_out.sh");
    let out = Command::new("bash")
        .args([script, bench])
        .env("FAN_OUT_DEVICE", "cpu")
        .env("FAN_OUT_COUNTS", "1,2")
        .env("FAN_OUT_PLUGIN_COUNTS", "1,2")
        .env("FAN_OUT_IDLE_SECS", "0.2")
        .env_remove("UCCL_TCPX_DISABLE_IPC")
        .output()
        .expect("bash starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("fan_out: all ran"), "{stdout}");
    let paths: &[&str] = if fake.exists() {
        &["staged", "same-host", "plugin-open", "plugin-idle"]
    } else {
        assert!(stdout.contains("the plugin runs skipped"), "{stdout}");
        &["staged", "same-host"]
    };
    for path in paths {
        assert!(stdout.contains(&format!("======== {path}:")), "{path}: {stdout}");
    }
    let added = stdout.lines().filter(|l| l.contains("1 -> 2 connections, each: RSS")).count();
    assert_eq!(added, paths.len(), "one line of what a connection added per path: {stdout}");
}
