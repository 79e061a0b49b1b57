//! Docs are read by people: README.md, every page of docs/ and each crate's README stay under
//! 20 KB. History that outgrows a page belongs in docs/perf-log/, which is a record, not a page to
//! read through, and is left out.

use std::path::{Path, PathBuf};

const LIMIT: u64 = 20_000;

fn pages(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

#[test]
fn every_page_stays_under_twenty_kilobytes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![root.join("README.md")];
    pages(&root.join("docs"), &mut docs);
    for krate in ["crates/fake-tcpx", "crates/bench", "crates/testkit", "python", "nixl"] {
        let dir = root.join(krate);
        if dir.is_dir() {
            pages(&dir, &mut docs);
        }
    }
    assert!(docs.len() > 10, "found only {docs:?}");
    let over: Vec<String> = docs
        .iter()
        .filter_map(|p| {
            let len = std::fs::metadata(p).unwrap().len();
            (len > LIMIT).then(|| format!("{} is {len} bytes", p.strip_prefix(root).unwrap().display()))
        })
        .collect();
    assert!(
        over.is_empty(),
        "pages over {LIMIT} bytes (split them or move history to docs/perf-log/):\n{}",
        over.join("\n")
    );
}
