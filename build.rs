// The cdylib gets a SONAME so that consumers record `libuccl_tcpx.so.0`, and `-z nodelete` so that a
// host calling dlclose() while threads that touched our thread-locals are alive cannot unmap code
// those threads' TLS destructors still need.
//
// The net plugin's logger is C-variadic, so a small C shim defines it (src/transport/plugin/logger.c).
// It is a static native library: bundled into the rlib and the staticlib, linked into the cdylib,
// so no consumer needs an extra link flag.
fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libuccl_tcpx.so.{major}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");

    env_reads();

    let shim = "src/transport/plugin/logger.c";
    println!("cargo:rerun-if-changed={shim}");
    cc::Build::new()
        .file(shim)
        .flag_if_supported("-fvisibility=hidden")
        .warnings(true)
        .compile("uccl_tcpx_plugin_logger");
}

/// Where the sources read environment variables, for `config::tests`, which holds every variable
/// of ours to the reference page: scanned here, at build time, so that the test binary checks the
/// sources it was built from wherever it runs (the GPU suite's bundle runs off the build tree).
/// Writes `$OUT_DIR/env_reads.rs`, a `&[(name, file)]` literal; a folder absent from a packaged
/// crate is skipped.
fn env_reads() {
    use std::path::Path;
    fn scan(path: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
            entries.sort();
            for entry in entries {
                scan(&entry, root, out);
            }
            return;
        }
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let file = path.strip_prefix(root).unwrap_or(path).display().to_string();
        for call in ["getenv(\"", "uccl_param(\"", "environ.get(\"", "env::var(\"", "env::var_os(\""] {
            for (at, _) in text.match_indices(call) {
                let name: String = text[at + call.len()..].chars().take_while(|c| *c != '"').collect();
                out.push((name, file.clone()));
            }
        }
    }
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut read = Vec::new();
    for dir in ["src", "include", "nixl", "python/uccl_tcpx", "python/src"] {
        let path = root.join(dir);
        if path.exists() {
            println!("cargo:rerun-if-changed={dir}");
            scan(&path, &root, &mut read);
        }
    }
    read.sort();
    read.dedup();
    let items: Vec<String> = read.iter().map(|(name, file)| format!("({name:?}, {file:?})")).collect();
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("env_reads.rs");
    std::fs::write(out, format!("&[{}]\n", items.join(", "))).unwrap();
}
