#!/usr/bin/env bash
# Builds the library in release mode and installs it under PREFIX through the packaging project in
# this directory:
#   PREFIX/lib/libuccl_tcpx.so.0 (+ .so.0.1.0, .so), libuccl_tcpx.a,
#   PREFIX/lib/libuccl_p2p.so (UCCL's name and C++ interface over libuccl_tcpx.so.0; needs a C++ compiler),
#   PREFIX/include/{uccl_engine.h, common.h, uccl_tcpx/*.hpp},
#   PREFIX/lib/cmake/UcclTcpx/UcclTcpxConfig{,Version}.cmake, PREFIX/lib/pkgconfig/uccl_tcpx.pc
#
# usage: cmake/install.sh PREFIX [BUILD_DIR]
#   BUILD_DIR: where the packaging project is configured (default: <target>/cmake-build; wiped first)
# Honours CARGO_TARGET_DIR. Needs cargo, cmake >= 3.16 and C and C++17 compilers.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  echo "usage: $0 PREFIX [BUILD_DIR]" >&2
  exit 2
fi

# Relative paths are taken from the caller's directory, before the cd below.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$(realpath -m -- "$1")"
target_dir="$(realpath -m -- "${CARGO_TARGET_DIR:-$repo/target}")"
build_dir="$(realpath -m -- "${2:-$target_dir/cmake-build}")"
export CARGO_TARGET_DIR="$target_dir"

cd "$repo"

# Honour the lock file when there is one so the install is what CI tested.
locked=()
if [[ -f Cargo.lock ]]; then
  locked=(--locked)
fi

# One cargo invocation both builds the release artifacts (rlib, staticlib, cdylib, as Cargo.toml
# lists) and makes rustc report what the static archive needs from the system; cargo replays the
# report when nothing had to be rebuilt.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo rustc --release ${locked[@]+"${locked[@]}"} -p uccl-tcpx --lib -- \
  --print native-static-libs 2>&1 | tee "$log"
native_libs="$(sed -n 's/^.*native-static-libs: *//p' "$log" | tail -n 1)"
if [[ -z "$native_libs" ]]; then
  echo "error: rustc did not report native-static-libs" >&2
  exit 1
fi
echo "native-static-libs: $native_libs"

# A stale configuration could hide a file the install step no longer produces.
rm -rf "$build_dir"
cmake -S "$repo/cmake" -B "$build_dir" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DUCCL_TCPX_ARTIFACT_DIR="$target_dir/release" \
  -DUCCL_TCPX_INCLUDE_DIR="$repo/include" \
  -DUCCL_TCPX_NATIVE_STATIC_LIBS="$native_libs"
cmake --build "$build_dir"
cmake --install "$build_dir"
