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

    let shim = "src/transport/plugin/logger.c";
    println!("cargo:rerun-if-changed={shim}");
    cc::Build::new()
        .file(shim)
        .flag_if_supported("-fvisibility=hidden")
        .warnings(true)
        .compile("uccl_tcpx_plugin_logger");
}
