//! `scripts/diag/alternate.py` over this bench: every setting runs the same arguments in turn, the
//! medians it prints are those of the invocations it kept, and a setting the bench refuses ends the
//! comparison with the bench's own words instead of a table without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// (op, size as printed) -> GB/s of one bench output's summary table.
fn summary(output: &str) -> HashMap<(String, String), f64> {
    let mut rows = HashMap::new();
    let mut inside = false;
    for line in output.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.starts_with(&["op", "size"]) {
            inside = true;
        } else if inside && f.len() >= 10 {
            rows.insert((f[0].to_owned(), format!("{} {}", f[1], f[2])), f[3].parse().unwrap());
        }
    }
    rows
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

    // Each setting ran its own layout every time, with the arguments given.
    let mut kept: HashMap<&str, Vec<String>> = HashMap::new();
    for (name, channels) in [("one", "1 channels"), ("two", "2 channels")] {
        for round in 0..TIMES {
            let file = dir.join(format!("{round}-{name}.txt"));
            let output = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(output.contains(channels), "{name} ran another layout:\n{output}");
            kept.entry(name).or_default().push(output);
        }
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2 * TIMES, "one file per invocation");

    // Every op and size has a line, and its figures are the kept invocations' medians and ranges.
    let lines: Vec<&str> = printed.lines().filter(|l| l.contains(" | ")).collect();
    assert_eq!(lines.len(), 4, "two ops x two sizes:\n{printed}");
    for (op, size) in [("write", "4 KiB"), ("write", "64 KiB"), ("read", "4 KiB"), ("read", "64 KiB")] {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == [op, size.split(' ').next().unwrap(), "KiB"])
            .unwrap_or_else(|| panic!("no line for {op} {size}:\n{printed}"));
        assert!(line.contains(" GB/s |"), "no baseline ran, so the figure is GB/s: {line}");
        for name in ["one", "two"] {
            let figures = kept[name].iter().map(|o| summary(o)[&(op.to_owned(), size.to_owned())]).collect();
            let expected = format!("{name}: {}", median_and_range(figures));
            assert!(line.contains(&expected), "{expected:?} in {line:?}");
        }
    }
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
    assert!(printed.contains("broken, round 0: the bench exited"), "{printed}");
    assert!(printed.contains("UCCL_TCPX_SOCKET_SUBCHUNK"), "the bench's own error is shown: {printed}");
    assert!(!printed.contains(" | "), "no table from a partial comparison: {printed}");

    for bad in ["nameless", "x=NOVALUE"] {
        let out = alternate(&[bad, "--", "--sizes", "4K"]);
        assert!(!out.status.success() && text(&out).contains("setting"), "{bad}: {}", text(&out));
    }
}
