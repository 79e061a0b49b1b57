#!/usr/bin/env bash
# NIXL end to end over uccl-tcpx, host memory (DRAM): NIXL's own UCCL backend, built unmodified from
# a NIXL source tree, driven through NIXL's Python package by scripts/nixl_e2e.py (two agents in two
# processes: WRITE/READ of 4 KiB, 1 MiB and 64 MiB, one and many descriptors, notifications, bytes
# checked; an agent's transfer to itself; a transfer after the peer exited must fail, not hang).
#
# The backend (src/plugins/uccl/*.cpp) is built twice into libplugin_UCCL.so:
#   source  against our headers (uccl_engine.h and its C++ forms), linked to our libuccl_p2p.so;
#   binary  against UCCL's own uccl_engine.h and common.h (UCCL_SRC/p2p), so it calls UCCL's
#           C++-mangled functions, linked to our libuccl_p2p.so as it would be to UCCL's. A plugin
#           built against UCCL's library records the same dependency (libuccl_p2p.so) and runs on
#           ours unchanged: this variant is that plugin.
# NIXL's headers come from NIXL_SRC, its libraries from the nixl-cu12 wheel (pip, the version that
# NIXL_SRC's meson.build names), abseil's headers (NIXL logs through absl) from ABSL_SRC or the
# tarball NIXL_SRC/subprojects/abseil-cpp.wrap names, checked against its hash.
#
# CI does not run this: NIXL has no source package on a package registry (its backend has to be
# built from a source tree), and neither do UCCL's header or abseil's matching release.
#
# usage: scripts/nixl_e2e.sh NIXL_SRC UCCL_SRC
#   NIXL_SRC  a NIXL source tree (ai-dynamo/nixl), e.g. 1.4.0
#   UCCL_SRC  a UCCL source tree (uccl-project/uccl) for p2p/uccl_engine.h and p2p/util/common.h
# env: ABSL_SRC  an abseil-cpp tree of the release NIXL_SRC's wrap names (else downloaded)
#      NIXL_E2E_DIR  work directory (default target/nixl-e2e)
# Needs g++ (C++20), cmake, cargo, python3 with venv and pip, readelf/nm, and libibverbs-dev
# (UCCL's common.h includes <infiniband/verbs.h>). About 5 minutes on 2 cores.
set -euo pipefail

if [[ $# -ne 2 || "$1" == -* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nixl_src="$(realpath -- "$1")"
uccl_src="$(realpath -- "$2")"
work="$(realpath -m -- "${NIXL_E2E_DIR:-$repo/target/nixl-e2e}")"
mkdir -p "$work"

die() {
  echo "nixl_e2e: $*" >&2
  exit 1
}
for f in "$nixl_src/src/plugins/uccl/uccl_backend.cpp" "$nixl_src/src/plugins/uccl/uccl_plugin.cpp" \
  "$nixl_src/meson.build" "$uccl_src/p2p/uccl_engine.h" "$uccl_src/p2p/util/common.h"; do
  [[ -f "$f" ]] || die "$f not found"
done
[[ -f /usr/include/infiniband/verbs.h ]] ||
  die "UCCL's common.h needs <infiniband/verbs.h>: install libibverbs-dev"
for tool in g++ cmake cargo python3 readelf nm; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# ---- NIXL's Python package, at the source tree's version -----------------------------------------
nixl_version="$(sed -n "s/^project('nixl'.*version: *'\([^']*\)'.*/\1/p" "$nixl_src/meson.build" | head -n 1)"
[[ -n "$nixl_version" ]] || die "no version in $nixl_src/meson.build"
venv="$work/venv"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
# Its dependencies are numpy and torch; host memory needs no torch, hence numpy first, then NIXL
# with --no-deps.
"$venv/bin/python" -m pip install -q --disable-pip-version-check numpy
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nixl-cu12==$nixl_version"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nixl_libs="$site/.nixl_cu12.mesonpy.libs"
for lib in libnixl_common.so libnixl_build.so libserdes.so; do
  [[ -f "$nixl_libs/$lib" ]] || die "the nixl-cu12 $nixl_version wheel has no $lib in $nixl_libs"
done
echo "NIXL $nixl_version from the nixl-cu12 wheel: $nixl_libs"

# ---- abseil's headers at NIXL's version ------------------------------------------------------------
absl="${ABSL_SRC:-}"
if [[ -z "$absl" ]]; then
  wrap="$nixl_src/subprojects/abseil-cpp.wrap"
  [[ -f "$wrap" ]] || die "set ABSL_SRC (no $wrap to find abseil's release in)"
  url="$(sed -n 's/^source_url *= *//p' "$wrap")"
  sum="$(sed -n 's/^source_hash *= *//p' "$wrap")"
  dir="$(sed -n 's/^directory *= *//p' "$wrap")"
  absl="$work/$dir"
  if [[ ! -d "$absl" ]]; then
    python3 - "$url" "$sum" "$work/absl.tar.gz" <<'EOF' || die "could not download $url; set ABSL_SRC"
import hashlib, sys, urllib.request
url, want, out = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=60).read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{url}: sha256 {got}, the wrap file says {want}")
open(out, "wb").write(data)
EOF
    tar -xzf "$work/absl.tar.gz" -C "$work"
  fi
fi
[[ -f "$absl/absl/log/log.h" ]] || die "$absl has no absl/log/log.h"

# ---- our package ---------------------------------------------------------------------------------
stage="$work/stage"
(cd "$repo" && cmake/install.sh "$stage" "$work/cmake-build") >"$work/install.log" 2>&1 ||
  die "cmake/install.sh failed; see $work/install.log"
cargo build --release --locked -q -p uccl-tcpx-bench --manifest-path "$repo/Cargo.toml"
bench="${CARGO_TARGET_DIR:-$repo/target}/release/uccl-tcpx-bench"

# ---- the backend, twice ----------------------------------------------------------------------------
nixl_inc=(-I"$nixl_src/src/api/cpp" -I"$nixl_src/src/api/cpp/backend" -I"$nixl_src/src/infra"
  -I"$nixl_src/src/utils" -I"$nixl_src/src/core" -I"$nixl_src/src/core/telemetry" -I"$absl")
build_plugin() {
  local variant="$1"
  shift
  local out="$work/plugins/$variant"
  mkdir -p "$out"
  echo "building NIXL's UCCL backend ($variant) ..."
  # -z defs: every symbol resolves at link time, from NIXL's libraries and libuccl_p2p.so alone.
  g++ -std=c++20 -O2 -fPIC -shared -o "$out/libplugin_UCCL.so" \
    "$nixl_src/src/plugins/uccl/uccl_backend.cpp" "$nixl_src/src/plugins/uccl/uccl_plugin.cpp" \
    "${nixl_inc[@]}" "$@" \
    -L"$nixl_libs" -lnixl_common -lnixl_build -lserdes -Wl,-rpath,"$nixl_libs" \
    -L"$stage/lib" -luccl_p2p -Wl,-z,defs
}
build_plugin source -I"$stage/include"
build_plugin binary -I"$uccl_src/p2p" -I"$uccl_src/p2p/util"

# What each plugin asks libuccl_p2p.so for: C names for the source variant, UCCL's C++ names for the
# binary one, and the library by UCCL's name.
for variant in source binary; do
  so="$work/plugins/$variant/libplugin_UCCL.so"
  readelf -d "$so" | grep -q 'NEEDED.*\[libuccl_p2p\.so\]' || die "$so does not depend on libuccl_p2p.so"
  c_refs="$(nm -D --undefined-only "$so" | awk '$2 ~ /^uccl_engine_/' | wc -l)"
  cxx_refs="$(nm -D --undefined-only "$so" | awk '$2 ~ /^_Z.*uccl_engine_/' | wc -l)"
  echo "  $variant: $c_refs C and $cxx_refs C++ uccl_engine_* references"
  if [[ "$variant" == source ]]; then
    ((c_refs > 0 && cxx_refs == 0)) || die "the source variant should call the C functions only"
  else
    ((cxx_refs > 0 && c_refs == 0)) || die "the binary variant should call UCCL's C++ functions only"
  fi
done

# ---- our bench, same sizes, for comparison ---------------------------------------------------------
echo "uccl-tcpx-bench (write and read, 4K 1M 64M, no NIXL) ..."
"$bench" --ops write,read --sizes 4K,1M,64M --no-baseline --json-file "$work/bench.json" \
  >"$work/bench.log" 2>&1 || die "the bench failed; see $work/bench.log"

# ---- the runs ----------------------------------------------------------------------------------------
status=0
for variant in source binary; do
  # A user swapping libraries does just this: our lib/ on the library path, NIXL_PLUGIN_DIR at the
  # plugin.
  LD_LIBRARY_PATH="$stage/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    NIXL_PLUGIN_DIR="$work/plugins/$variant" \
    "$venv/bin/python" "$repo/scripts/nixl_e2e.py" --variant "$variant drop-in" \
    --bench-json "$work/bench.json" || status=1
done
exit "$status"
