//! `scripts/diag/alternate.py` over this bench: every setting runs the same arguments in turn, the
//! medians it prints are those of the invocations it kept, and a setting the bench refuses ends the
//! comparison with the bench's own words instead of a table without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_uccl-tcpx-bench");
const TIMES: usize = 3;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/diag/alternate.py")
}

fn alternate(args: &[&str]) -> Output {
    Command::new("python3").arg(script()).args(args).output().expect("python3 runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Field `key` of `op` at `size` bytes in one kept `--json-file`.
fn field(results: &Value, op: &str, size: u64, key: &str) -> f64 {
    results["results"]
        .as_array()
        .expect("a results array")
        .iter()
        .find(|r| r["op"] == op && r["size"] == size)
        .and_then(|r| r[key].as_f64())
        .unwrap_or_else(|| panic!("no {key} of {op} of {size} B in {results}"))
}

/// What `--keep DIR` kept of setting `name`'s invocation in `round`: its output (`txt`) or results
/// (`json`).
fn kept_file(dir: &Path, round: usize, name: &str, ext: &str) -> String {
    let file = dir.join(format!("{round}-{name}.{ext}"));
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn median_and_range(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.2} [{:.2}-{:.2}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

#[test]
fn medians_are_those_of_the_alternated_invocations() {
    let dir = std::env::temp_dir().join(format!("uccl-alternate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = format!("BIN={BENCH}");
    let two_channels = format!("two={bin},UCCL_TCPX_NUM_CHANNELS=2");
    let out = alternate(&[
        "--times",
        &TIMES.to_string(),
        "--keep",
        dir.to_str().unwrap(),
        &format!("one={bin},UCCL_TCPX_NUM_CHANNELS=1"),
        &two_channels,
        "--",
        "--sizes",
        "4K,64K",
        "--ops",
        "write,read",
        "--iters",
        "20",
        "--no-baseline",
    ]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");

    // Each setting ran its own layout every time, with the arguments given; its output and results
    // were kept.
    let mut kept: HashMap<&str, Vec<Value>> = HashMap::new();
    for (name, channels) in [("one", 1), ("two", 2)] {
        for round in 0..TIMES {
            let read = |ext: &str| kept_file(&dir, round, name, ext);
            let output = read("txt");
            assert!(output.contains("# Summary"), "{name}: the bench's output is kept:\n{output}");
            let results: Value = serde_json::from_str(&read("json")).unwrap();
            assert_eq!(results["channels"], channels, "{name} ran another layout: {results}");
            kept.entry(name).or_default().push(results);
        }
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4 * TIMES, "output and results of each invocation");

    // Every op and size has a line, and its figures are the kept invocations' medians and ranges.
    let lines: Vec<&str> = printed.lines().filter(|l| l.contains(" | ")).collect();
    assert_eq!(lines.len(), 4, "two ops x two sizes:\n{printed}");
    for (op, kib) in [("write", 4), ("write", 64), ("read", 4), ("read", 64)] {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == [op, &kib.to_string(), "KiB"])
            .unwrap_or_else(|| panic!("no line for {op} {kib} KiB:\n{printed}"));
        assert!(line.contains(" GB/s |"), "no baseline ran, so the figure is GB/s: {line}");
        for name in ["one", "two"] {
            let figures = kept[name].iter().map(|r| field(r, op, kib << 10, "gb_per_s")).collect();
            let expected = format!("{name}: {}", median_and_range(figures));
            assert!(line.contains(&expected), "{expected:?} in {line:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With the baseline, each cell gives the message ratio and both sides' GB/s, each the median and
/// range of the kept invocations.
#[test]
fn with_the_baseline_both_sides_rates_stand_beside_the_ratio() {
    let dir = std::env::temp_dir().join(format!("uccl-alternate-msg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = alternate(&[
        "--times",
        &TIMES.to_string(),
        "--keep",
        dir.to_str().unwrap(),
        &format!("only=BIN={BENCH}"),
        "--",
        "--sizes",
        "64K",
        "--ops",
        "write",
        "--iters",
        "20",
    ]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    let kept: Vec<Value> =
        (0..TIMES).map(|round| serde_json::from_str(&kept_file(&dir, round, "only", "json")).unwrap()).collect();
    let of = |key: &str| median_and_range(kept.iter().map(|r| field(r, "write", 64 << 10, key)).collect());
    let line = printed.lines().find(|l| l.starts_with("write") && l.contains(" msg |")).unwrap_or_else(|| {
        panic!("a message-ratio line for the write:\n{printed}");
    });
    let expected = format!("only: {} ours {} anchor {}", of("msg_ratio"), of("gb_per_s"), of("raw_msg_gb_per_s"));
    assert!(line.contains(&expected), "{expected:?} in {line:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_setting_the_bench_refuses_ends_the_comparison() {
    let out = alternate(&[
        &format!("fine=BIN={BENCH}"),
        &format!("broken=BIN={BENCH},UCCL_TCPX_SOCKET_SUBCHUNK=lots"),
        "--",
        "--sizes",
        "4K",
        "--iters",
        "5",
        "--no-baseline",
    ]);
    let printed = text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("broken, round 0: the bench exited 1 without results"), "{printed}");
    assert!(printed.contains("UCCL_TCPX_SOCKET_SUBCHUNK"), "the bench's own error is shown: {printed}");
    assert!(!printed.contains(" | "), "no table from a partial comparison: {printed}");

    for bad in ["nameless", "x=NOVALUE"] {
        let out = alternate(&[bad, "--", "--sizes", "4K"]);
        assert!(!out.status.success() && text(&out).contains("setting"), "{bad}: {}", text(&out));
    }
    let out = alternate(&["a=", "--", "--sizes", "4K", "--json-file", "x.json"]);
    assert!(!out.status.success() && text(&out).contains("leave --json-file out"), "{}", text(&out));
}
