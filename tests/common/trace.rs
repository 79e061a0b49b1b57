//! Traces for the tests: a fresh folder for a child process's trace file, and the scripts of
//! `scripts/diag/` run on what it wrote.

use std::path::{Path, PathBuf};

/// An empty folder of this process's for the trace named `name`.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("uccl-trace-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The files in `dir`.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// The scripts of `scripts/diag/` that tests run, and those they import, as they were when the
/// test binary was built: a binary copied off its build tree (the GPU suite's bundle) runs them
/// with no source tree where it runs.
const SCRIPTS: [(&str, &str); 5] = [
    ("flow_timeline.py", include_str!("../../scripts/diag/flow_timeline.py")),
    ("socket_balance.py", include_str!("../../scripts/diag/socket_balance.py")),
    ("socket_timeline.py", include_str!("../../scripts/diag/socket_timeline.py")),
    ("trace_events.py", include_str!("../../scripts/diag/trace_events.py")),
    ("trace_summary.py", include_str!("../../scripts/diag/trace_summary.py")),
];

/// Runs `scripts/diag/<script>` with `args`, from a folder of its own holding the embedded
/// scripts; fails the test unless it succeeds. Returns its output.
pub fn run_script(script: &str, args: &[&str]) -> String {
    assert!(SCRIPTS.iter().any(|(name, _)| *name == script), "{script} is not among the embedded scripts");
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("uccl-diag-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in SCRIPTS {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let run = std::process::Command::new("python3").arg(dir.join(script)).args(args).output().expect("python3 runs");
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{script} failed:\n{out}{}", String::from_utf8_lossy(&run.stderr));
    print!("{out}");
    out
}

/// One event of a trace file: its label, time, thread and fields by name.
#[derive(Clone, Debug)]
pub struct Row {
    pub event: String,
    pub ns: u64,
    pub tid: u64,
    pub fields: std::collections::HashMap<String, u64>,
}

impl Row {
    pub fn get(&self, field: &str) -> u64 {
        *self.fields.get(field).unwrap_or_else(|| panic!("{} has no field {field}", self.event))
    }
}

/// Every event of a trace file, as its schema lines name their fields.
pub fn rows(path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut schema = std::collections::HashMap::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split('\t').collect();
        if parts[0] == "# event" {
            schema.insert(parts[1].to_owned(), parts[2..].iter().map(|s| s.to_string()).collect::<Vec<_>>());
        } else if !parts[0].starts_with('#') {
            let names = schema.get(parts[0]).unwrap_or_else(|| panic!("{} is not in the schema", parts[0]));
            assert_eq!(names.len() + 3, parts.len(), "a row has every field: {line}");
            let fields = names.iter().cloned().zip(parts[3..].iter().map(|v| v.parse().unwrap())).collect();
            rows.push(Row {
                event: parts[0].to_owned(),
                ns: parts[1].parse().unwrap(),
                tid: parts[2].parse().unwrap(),
                fields,
            });
        }
    }
    rows
}
