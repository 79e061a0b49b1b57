// Puts the engine library into the package (uccl_tcpx/lib/libuccl_tcpx.so.0) and the NIXL backend
// plugin beside it (uccl_tcpx/lib/nixl/<version>/libplugin_TCPX.so, one per NIXL version
// nixl/nixl_abi.h reproduces) before maturin collects the package's files, so that one
// `pip install ./python` builds everything from a clone, no cmake needed. The extension itself
// does not link the engine: it opens that file at import time.
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
    build_nixl_plugin(&repo, &dest_dir);
    write_knobs(&repo, &dest_dir);
}

/// uccl_tcpx/lib/knobs.txt, what `uccl-tcpx-doctor` knows of the engine's settings: `known NAME`
/// for each variable of docs/CONFIG.md (generated from, and tested against, src/config.rs),
/// `retired NAME` for each of src/config/retired.rs, and `plugin_default NAME VALUE` for each net
/// plugin variable the engine sets when unset (docs/CONFIG.md, tested against
/// src/transport/plugin/tcpx.rs).
fn write_knobs(repo: &Path, lib_dir: &Path) {
    let page_path = repo.join("docs").join("CONFIG.md");
    let retired_path = repo.join("src").join("config").join("retired.rs");
    println!("cargo:rerun-if-changed={}", page_path.display());
    println!("cargo:rerun-if-changed={}", retired_path.display());
    let page = std::fs::read_to_string(&page_path).expect("read docs/CONFIG.md");
    let retired = std::fs::read_to_string(&retired_path).expect("read src/config/retired.rs");
    let mut out = String::new();
    for row in page.lines().filter_map(|l| l.strip_prefix("| `")) {
        if let Some((name, _)) = row.split_once('`') {
            out += &format!("known {name}\n");
        }
    }
    // Backticked NAME=VALUE of the page: the plugin variables the engine fills in.
    for quoted in page.split('`').skip(1).step_by(2) {
        if let Some((name, value)) = quoted.split_once('=')
            && name.starts_with("NCCL_")
            && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && !value.is_empty()
            && !value.contains(char::is_whitespace)
        {
            out += &format!("plugin_default {name} {value}\n");
        }
    }
    let table = retired.split("#[cfg(test)]").next().unwrap_or_default();
    for quoted in table.split('"').skip(1).step_by(2).filter(|q| q.starts_with("UCCL_TCPX_")) {
        out += &format!("retired {quoted}\n");
    }
    if !out.contains("known UCCL_TCPX_TRANSPORT") || !out.contains("retired ") || !out.contains("plugin_default ") {
        panic!("docs/CONFIG.md or src/config/retired.rs no longer has the shape build.rs reads");
    }
    std::fs::write(lib_dir.join("knobs.txt"), out).expect("write uccl_tcpx/lib/knobs.txt");
}

/// Compiles nixl/tcpx_backend.cpp against the project's NIXL ABI header and links it to the
/// engine library just copied in, as nixl/plugin.cmake does for cmake/install.sh. The plugin finds
/// that library through its rpath: `$ORIGIN/../..` from where it lies in the package, `$ORIGIN`
/// from the folder `uccl-tcpx-nixl-plugin-dir` makes (which links the library beside it).
fn build_nixl_plugin(repo: &Path, lib_dir: &Path) {
    let nixl = repo.join("nixl");
    let include = repo.join("include");
    for file in ["tcpx_backend.cpp", "nixl_abi.h", "exports.map"] {
        println!("cargo:rerun-if-changed={}", nixl.join(file).display());
    }
    println!("cargo:rerun-if-changed={}", include.join("uccl_engine.h").display());
    let header = std::fs::read_to_string(nixl.join("nixl_abi.h")).expect("read nixl/nixl_abi.h");
    let versions = nixl_versions(&header);
    let version = engine_version(repo);

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let built = out.join("libplugin_TCPX.so");
    let compiler = cc::Build::new().cpp(true).std("c++20").opt_level(2).debug(false).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wall", "-Wextra", "-Werror"])
        .arg(format!("-DUCCL_TCPX_PLUGIN_VERSION=\"{version}\""))
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(&nixl)
        .arg(nixl.join("tcpx_backend.cpp"))
        .arg("-o")
        .arg(&built)
        // Exactly NIXL's two entry points leave the plugin, and every symbol it uses must resolve
        // now (-z defs), against the engine library and the C++ runtime alone.
        .arg(format!("-Wl,--version-script={}", nixl.join("exports.map").display()))
        .args(["-Wl,-z,defs", "-Wl,-rpath,$ORIGIN:$ORIGIN/../.."])
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-l:libuccl_tcpx.so.0");
    let status = cmd.status().unwrap_or_else(|e| panic!("run the C++ compiler {:?}: {e}", compiler.path()));
    if !status.success() {
        panic!("building the NIXL plugin failed ({status}): {cmd:?}");
    }

    let root = lib_dir.join("nixl");
    // Versions dropped from the header must not linger in the package.
    if root.is_dir() {
        std::fs::remove_dir_all(&root).expect("clear uccl_tcpx/lib/nixl");
    }
    for v in &versions {
        let dir = root.join(v);
        std::fs::create_dir_all(&dir).expect("create uccl_tcpx/lib/nixl/<version>");
        std::fs::copy(&built, dir.join("libplugin_TCPX.so")).expect("copy the NIXL plugin into the package");
    }
}

/// The NIXL versions nixl/nixl_abi.h declares it reproduces (`#define UCCL_TCPX_NIXL_VERSIONS "..."`).
fn nixl_versions(header: &str) -> Vec<String> {
    let line = header
        .lines()
        .find_map(|l| l.strip_prefix("#define UCCL_TCPX_NIXL_VERSIONS "))
        .expect("nixl/nixl_abi.h defines UCCL_TCPX_NIXL_VERSIONS");
    let versions: Vec<String> = line.trim().trim_matches('"').split_whitespace().map(str::to_owned).collect();
    let valid = |v: &String| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.');
    if versions.is_empty() || !versions.iter().all(valid) {
        panic!("UCCL_TCPX_NIXL_VERSIONS in nixl/nixl_abi.h is not a list of versions: {line}");
    }
    versions
}

/// The engine's version, from the repository's Cargo.toml, which the plugin reports to NIXL.
fn engine_version(repo: &Path) -> String {
    let manifest = std::fs::read_to_string(repo.join("Cargo.toml")).expect("read Cargo.toml");
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \"").and_then(|v| v.strip_suffix('"')))
        .expect("the repository's Cargo.toml has a version")
        .to_owned()
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
