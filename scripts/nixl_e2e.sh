#!/usr/bin/env bash
# NIXL end to end over uccl-tcpx: NIXL's own UCCL backend, built unmodified from a NIXL source tree,
# driven through NIXL's Python package by scripts/nixl_e2e.py (two agents in two processes:
# WRITE/READ of 4 KiB, 1 MiB and 64 MiB, one and many descriptors, notifications, bytes checked; an
# agent's transfer to itself; a transfer after the peer exited must fail, not hang).
#
# The backend (src/plugins/uccl/*.cpp) is built twice into libplugin_UCCL.so:
#   source  against our headers (uccl_engine.h and its C++ forms), linked to our libuccl_p2p.so;
#   binary  against UCCL's own uccl_engine.h and common.h (UCCL_SRC/p2p), so it calls UCCL's
#           C++-mangled functions, linked to our libuccl_p2p.so as it would be to UCCL's. A plugin
#           built against UCCL's library records the same dependency (libuccl_p2p.so) and runs on
#           ours unchanged: this variant is that plugin.
# NIXL's headers come from NIXL_SRC, its libraries from its wheel on PyPI (nixl-cu12 or nixl-cu13,
# the version that NIXL_SRC's meson.build names), abseil's headers (NIXL logs through absl) from
# ABSL_SRC or the tarball NIXL_SRC/subprojects/abseil-cpp.wrap names, checked against its hash.
#
# Two modes:
#   (default)  host memory (DRAM), here: builds, runs uccl-tcpx-bench for comparison, then both
#              variants. With --uccl-benchmark also UCCL's p2p/benchmarks/benchmark_nixl.py,
#              unchanged, --backend uccl --device cpu (scripts/nixl_uccl_benchmark.sh); it needs
#              torch and pyzmq, which it installs from PyPI into a second virtual environment
#              (several GiB, as torch's wheels pull CUDA's).
#   --bundle OUT_DIR  builds, for a GPU host without network, compiler or Rust, one folder that
#              scripts/nixl_gpu_run.sh runs there (GPU memory, both variants, and benchmark_nixl.py
#              --device gpu): both plugins, our lib/, uccl-tcpx-bench, the drivers, and NIXL's
#              Python package for that host's Python reduced to what the UCCL backend loads
#              (nixl, its nixl-cuXX module, the libraries they need from the wheel, no other plugin),
#              plus pyzmq, packed as nixl-site.tar.xz. Nothing runs here.
#
# CI does not run this: NIXL has no source package on a package registry (its backend has to be
# built from a source tree), and neither do UCCL's header or abseil's matching release.
#
# usage: scripts/nixl_e2e.sh [--uccl-benchmark] NIXL_SRC UCCL_SRC
#        scripts/nixl_e2e.sh --bundle OUT_DIR NIXL_SRC UCCL_SRC
#   NIXL_SRC  a NIXL source tree (ai-dynamo/nixl), e.g. 1.4.0
#   UCCL_SRC  a UCCL source tree (uccl-project/uccl) for p2p/uccl_engine.h, p2p/util/common.h and
#             p2p/benchmarks/benchmark_nixl.py
# env: ABSL_SRC  an abseil-cpp tree of the release NIXL_SRC's wrap names (else downloaded)
#      NIXL_E2E_DIR  work directory (default target/nixl-e2e)
#      NIXL_CUDA  the NIXL wheel's CUDA major here (default 12: nixl-cu12)
#      NIXL_BUNDLE_CUDA, NIXL_BUNDLE_PYTHON  the GPU host's (default 13 and 3.12: the `nixl`
#                 package picks nixl-cuN by torch's CUDA major, and that host's torch is cu13x)
#      PYZMQ_VERSION  pyzmq for the bundle (default 27.3.0)
# Needs g++ (C++20), cmake, cargo, python3 with venv and pip, readelf/nm, xz, and libibverbs-dev
# (UCCL's common.h includes <infiniband/verbs.h>). About 5 minutes on 2 cores.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
bundle=""
uccl_benchmark=0
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
  --bundle)
    [[ $# -ge 2 ]] || usage
    bundle="$(realpath -m -- "$2")"
    shift 2
    ;;
  --uccl-benchmark)
    uccl_benchmark=1
    shift
    ;;
  *) usage ;;
  esac
done
[[ $# -eq 2 ]] || usage
[[ -z "$bundle" || "$uccl_benchmark" == 0 ]] || usage
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

nixl_version="$(sed -n "s/^project('nixl'.*version: *'\([^']*\)'.*/\1/p" "$nixl_src/meson.build" | head -n 1)"
[[ -n "$nixl_version" ]] || die "no version in $nixl_src/meson.build"

# The libraries NIXL's backends link to, in an installed or unpacked nixl-cuN wheel.
nixl_libs_in() {
  local libs="$1/.nixl_cu$2.mesonpy.libs" lib
  for lib in libnixl_common.so libnixl_build.so libserdes.so; do
    [[ -f "$libs/$lib" ]] || die "the nixl-cu$2 $nixl_version wheel has no $lib in $libs"
  done
  echo "$libs"
}

# A virtual environment with NIXL's Python package at the source tree's version, nixl-cuN only
# (with --no-deps: its dependencies are numpy and torch, and host memory needs no torch).
nixl_venv() {
  local venv="$1" cuda="$2"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check numpy
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nixl-cu$cuda==$nixl_version"
}

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
# build_plugins OUT NIXL_LIBS [LINK_FLAGS...]: OUT/source and OUT/binary, each a libplugin_UCCL.so
# linked to the NIXL libraries in NIXL_LIBS.
build_plugins() {
  local out="$1" libs="$2" variant so c_refs cxx_refs
  shift 2
  for variant in source binary; do
    local inc=(-I"$stage/include")
    [[ "$variant" == binary ]] && inc=(-I"$uccl_src/p2p" -I"$uccl_src/p2p/util")
    mkdir -p "$out/$variant"
    so="$out/$variant/libplugin_UCCL.so"
    echo "building NIXL's UCCL backend ($variant) into $so ..."
    # -z defs: every symbol resolves at link time, from NIXL's libraries and libuccl_p2p.so alone.
    g++ -std=c++20 -O2 -fPIC -shared -o "$so" \
      "$nixl_src/src/plugins/uccl/uccl_backend.cpp" "$nixl_src/src/plugins/uccl/uccl_plugin.cpp" \
      "${nixl_inc[@]}" "${inc[@]}" \
      -L"$libs" -lnixl_common -lnixl_build -lserdes "$@" \
      -L"$stage/lib" -luccl_p2p -Wl,-z,defs
    # What the plugin asks libuccl_p2p.so for: C names for the source variant, UCCL's C++ names
    # for the binary one, and the library by UCCL's name.
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
}

if [[ -n "$bundle" ]]; then
  # shellcheck source=scripts/nixl_bundle.sh
  source "$repo/scripts/nixl_bundle.sh"
  exit 0
fi

# ---- host memory, here -------------------------------------------------------------------------------
cuda="${NIXL_CUDA:-12}"
venv="$work/venv"
nixl_venv "$venv" "$cuda"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nixl_libs="$(nixl_libs_in "$site" "$cuda")"
echo "NIXL $nixl_version from the nixl-cu$cuda wheel: $nixl_libs"
build_plugins "$work/plugins" "$nixl_libs" -Wl,-rpath,"$nixl_libs"

# ---- our bench, same sizes, for comparison ---------------------------------------------------------
# NIXL's two agents share this host and move memory over the same-host path: --same-host measures it.
echo "uccl-tcpx-bench (write and read, 4K 1M 64M, no NIXL) ..."
"$bench" --same-host --ops write,read --sizes 4K,1M,64M --no-baseline --json-file "$work/bench.json" \
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

# ---- UCCL's benchmark_nixl.py, unchanged ---------------------------------------------------------------
if ((uccl_benchmark)); then
  benchmark="$uccl_src/p2p/benchmarks/benchmark_nixl.py"
  [[ -f "$benchmark" ]] || die "$benchmark not found"
  # It imports torch and zmq, and NIXL as `nixl`: the meta package, which picks nixl-cuN by torch's
  # CUDA major, as a NIXL user's install does.
  bvenv="$work/bench-venv"
  [[ -x "$bvenv/bin/python" ]] || python3 -m venv "$bvenv"
  "$bvenv/bin/python" -m pip install -q --disable-pip-version-check numpy pyzmq torch
  "$bvenv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nixl==$nixl_version"
  bcuda="$("$bvenv/bin/python" -c 'from nixl_meta_utils import detect_cuda_major; print(detect_cuda_major() or 12)')"
  "$bvenv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nixl-cu$bcuda==$nixl_version"
  bsite="$("$bvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  blibs="$(nixl_libs_in "$bsite" "$bcuda")"
  echo "benchmark_nixl.py: torch $("$bvenv/bin/python" -c 'import torch; print(torch.__version__)'), NIXL nixl-cu$bcuda"
  build_plugins "$work/plugins-bench" "$blibs" -Wl,-rpath,"$blibs"
  # The binary variant: NIXL's plugin as built against UCCL, our library swapped in.
  LD_LIBRARY_PATH="$stage/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    NIXL_PLUGIN_DIR="$work/plugins-bench/binary" PYTHON="$bvenv/bin/python" UCCL_TCPX_BENCH="$bench" \
    "$repo/scripts/nixl_uccl_benchmark.sh" "$benchmark" cpu "$work/logs" || status=1
fi
exit "$status"
