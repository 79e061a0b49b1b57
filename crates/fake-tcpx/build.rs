// Two jobs:
// - the plugin exports only `ncclNetPlugin_v7`, not every `uccl_engine_*` symbol of the uccl-tcpx rlib
//   it is built on. rustc's own version script lists those upstream symbols as global and a second
//   script cannot take them back, so `--exclude-libs,ALL` keeps symbols that come from archives (the
//   rlibs) out of the dynamic table; the version script states the one export and covers this crate;
// - the integration tests get a C logger: `ncclDebugLogger_t` is variadic, which stable Rust cannot
//   define, so a few lines of C format the message and hand it to a Rust sink in the test.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/exports.map");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs,ALL");
    println!("cargo:rerun-if-changed=exports.map");

    let objects = cc::Build::new().file("tests/logger.c").warnings(true).compile_intermediates();
    for obj in objects {
        println!("cargo:rustc-link-arg-tests={}", obj.display());
    }
    println!("cargo:rerun-if-changed=tests/logger.c");
    println!("cargo:rerun-if-changed=build.rs");
}
