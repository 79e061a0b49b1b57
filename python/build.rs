// Puts the engine library into the package (uccl_tcpx/lib/libuccl_tcpx.so.0) before maturin
// collects the package's files, so that one `pip install ./python` builds everything from a clone.
// The extension itself does not link it: it opens that file at import time.
//
// UCCL_TCPX_ENGINE_LIB names a library built already (a release build, an installed copy); unset,
// the engine of the enclosing repository is built in release mode into its own target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let repo = here.parent().expect("the package lives in a folder of the repository").to_path_buf();
    let dest_dir = here.join("uccl_tcpx").join("lib");
    let dest = dest_dir.join("libuccl_tcpx.so.0");
    println!("cargo:rerun-if-env-changed=UCCL_TCPX_ENGINE_LIB");
    let built = match std::env::var_os("UCCL_TCPX_ENGINE_LIB") {
        Some(path) => PathBuf::from(path),
        None => build_engine(&repo),
    };
    if !built.is_file() {
        panic!("engine library {} does not exist", built.display());
    }
    std::fs::create_dir_all(&dest_dir).expect("create uccl_tcpx/lib");
    // Replaced, not overwritten in place: a running process may have the old file mapped.
    let staging = dest_dir.join(".libuccl_tcpx.so.0.tmp");
    std::fs::copy(&built, &staging).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    std::fs::rename(&staging, &dest).expect("move the engine library into place");
}

/// Builds the repository's engine cdylib with the cargo running this script, and returns its path.
fn build_engine(repo: &Path) -> PathBuf {
    for dir in ["src", "include", "crates", "p2p"] {
        println!("cargo:rerun-if-changed={}", repo.join(dir).display());
    }
    for file in ["Cargo.toml", "Cargo.lock", "build.rs"] {
        println!("cargo:rerun-if-changed={}", repo.join(file).display());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = repo.join("target");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "-p", "uccl-tcpx", "--lib", "--manifest-path"])
        .arg(repo.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings (its target directory, flags and jobserver, the extension's
    // features and cfgs) are not the engine's.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = ["CARGO_TARGET_DIR", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_MAKEFLAGS"];
        if outer.contains(&key)
            || ["CARGO_FEATURE_", "CARGO_CFG_", "CARGO_PKG_", "CARGO_MANIFEST_", "PYO3_", "DEP_"]
                .iter()
                .any(|p| key.starts_with(p))
            || ["TARGET", "HOST", "OUT_DIR", "PROFILE", "OPT_LEVEL", "DEBUG", "NUM_JOBS", "MAKEFLAGS", "MFLAGS"]
                .contains(&key)
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().expect("run cargo to build the engine library");
    if !status.success() {
        panic!("building the engine library failed ({status})");
    }
    target_dir.join("release").join("libuccl_tcpx.so")
}
