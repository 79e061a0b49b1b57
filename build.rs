// The cdylib gets a SONAME so that consumers record `libuccl_tcpx.so.0`, and `-z nodelete` so that a
// host calling dlclose() while threads that touched our thread-locals are alive cannot unmap code
// those threads' TLS destructors still need.
fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libuccl_tcpx.so.{major}");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
