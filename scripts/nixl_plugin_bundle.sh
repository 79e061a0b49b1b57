#!/usr/bin/env bash
# Builds what the TCPX NIXL plugin's GPU runs need into one folder (under 64 MiB) for a GPU host
# that has Python with torch and a CUDA driver but no Rust, compiler or network, as
# scripts/gpu_bundle.sh does for the GPU suite:
#
#   prefix/            the install tree of cmake/install.sh: libuccl_tcpx.so.0, the TCPX plugin for
#                      each supported NIXL, bin/uccl-tcpx-nixl-plugin-dir (stripped, no headers)
#   uccl_tcpx-*.whl    the Python package (the wheel scripts/python_tests.sh builds)
#   nixl-site.tar.xz   NIXL for that Python (scripts/nixl_site.py): `nixl`, nixl_cuN with its
#                      libraries, NIXL's own UCX plugin (the anchor) with UCX's cuda and cma
#                      modules, and pyzmq (benchmark_nixl.py imports it)
#   numpy-*.whl        for a Python whose torch came without numpy (used only then)
#   uccl-tcpx-bench, scripts/ (the drivers below, run from here; the serving harnesses, `--vram`;
#   blocking.py), README.md and docs/*.md (for
#   the snippet runner), uccl/p2p/{tests,benchmarks}/*.py when UCCL_TREE is given (UCCL's Python
#   tests and benchmark_nixl.py, for uccl_python_tests.sh and nixl_tcpx_benchmark.sh), bundle.env
#
# On the GPU host, from the folder alone: BUNDLE/scripts/nixl_plugin_gpu_run.sh BUNDLE, which runs
# scripts/nixl_plugin_tests.py on GPU memory, the nixl-gpu snippets of the pages,
# scripts/nixl_plugin_bench.py --vram, scripts/nixl_tcpx_benchmark.sh and
# scripts/uccl_python_tests.sh; `source BUNDLE/scripts/nixl_plugin_env.sh BUNDLE` sets up a shell
# to run any of them by hand.
#
# usage: scripts/nixl_plugin_bundle.sh OUT_DIR [UCCL_TREE]
# env: NIXL_BUNDLE_VERSION  the NIXL release (default 1.5.1; the plugin supports 1.4.0 and 1.5.1)
#      NIXL_BUNDLE_CUDA     12 or 13: nixl-cuN, by the GPU host torch's CUDA major (default 13)
#      NIXL_BUNDLE_PYTHON   the GPU host's Python (default 3.12)
#      PYZMQ_VERSION        (default 27.3.0)
#      NUMPY_VERSION        (default 2.4.6)
# Needs cargo, cmake, g++, python3 with venv and pip, xz, and PyPI.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m -- "$1")"
uccl="${2:+$(realpath -- "$2")}"
version="${NIXL_BUNDLE_VERSION:-1.5.1}"
cuda="${NIXL_BUNDLE_CUDA:-13}"
bpython="${NIXL_BUNDLE_PYTHON:-3.12}"
pyzmq_version="${PYZMQ_VERSION:-27.3.0}"
numpy_version="${NUMPY_VERSION:-2.4.6}"
module="nixl_cu$cuda"
work="$repo/target/nixl-plugin-bundle"
limit=$((64 << 20))
die() { echo "nixl_plugin_bundle: $*" >&2; exit 1; }
command -v xz >/dev/null 2>&1 || die "xz is required"
if [[ -n "$uccl" ]]; then
  [[ -d "$uccl/p2p/tests" ]] || die "$uccl is not a UCCL source tree (no p2p/tests)"
fi
mkdir -p "$work"

echo "== the install tree (cmake/install.sh)"
"$repo/cmake/install.sh" "$work/prefix" "$work/cmake-build" >"$work/install.log" 2>&1 ||
  { tail -n 40 "$work/install.log"; die "the build failed ($work/install.log)"; }
grep -qw "$version" <<<"$(ls "$work/prefix/lib/uccl-tcpx/nixl")" ||
  die "the plugin is built for NIXL $(ls "$work/prefix/lib/uccl-tcpx/nixl" | paste -sd ' '), not $version"

echo "== the wheel (maturin, as scripts/python_tests.sh builds it)"
[[ -x "$work/build-env/bin/maturin" ]] || {
  python3 -m venv "$work/build-env"
  "$work/build-env/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.9.4,<2"
}
rm -rf "$work/wheels"
(cd "$repo/python" && CARGO_TARGET_DIR="$repo/target/python-ext" \
  "$work/build-env/bin/maturin" build --release --locked --out "$work/wheels") >"$work/wheel.log" 2>&1 ||
  { tail -n 40 "$work/wheel.log"; die "the wheel did not build ($work/wheel.log)"; }

echo "== uccl-tcpx-bench"
cargo build --release --locked -q -p uccl-tcpx-bench --manifest-path "$repo/Cargo.toml"

echo "== NIXL $version (nixl-cu$cuda) and pyzmq $pyzmq_version for Python $bpython"
wheels="$work/nixl-wheels/py$bpython"
# shellcheck source=scripts/wheels.sh
source "$repo/scripts/wheels.sh"
fetch_wheels "$wheels" "$bpython" "nixl==$version" "nixl-cu$cuda==$version" "pyzmq==$pyzmq_version" \
  "numpy==$numpy_version" || die "the wheels for Python $bpython could not be fetched"
unpacked="$work/nixl-unpacked"
rm -rf "$unpacked" "$work/site"
unpack_wheels "$unpacked" "$wheels"/nixl-"$version"-*.whl "$wheels"/nixl_cu"$cuda"-"$version"-*.whl \
  "$wheels"/pyzmq-"$pyzmq_version"-*.whl || die "the wheels could not be unpacked"
[[ -f "$unpacked/$module/_bindings.cpython-${bpython/./}-x86_64-linux-gnu.so" ]] ||
  die "nixl-cu$cuda $version has no extension for Python $bpython"
python3 "$repo/scripts/nixl_site.py" "$unpacked" "$work/site" "$module" --plugins UCX --ucx-modules cuda,cma

echo "== the folder"
rm -rf "$out"
mkdir -p "$out/scripts" "$out/docs"
tar -C "$work/site" -cf - . | xz -6 -T0 >"$out/nixl-site.tar.xz"
# The install tree less what a GPU run does not use (headers, the static library, CMake files, the
# link-time and versioned names of the library), with no symbolic link: a copy that drops links
# must still work.
cp -rL "$work/prefix" "$out/prefix"
rm -rf "$out/prefix/include" "$out/prefix/lib/cmake" "$out/prefix/lib/pkgconfig" "$out/prefix/lib/"*.a \
  "$out/prefix/lib/libuccl_tcpx.so" "$out/prefix/lib/libuccl_tcpx.so.0".*
strip "$out/prefix/lib/"*.so* "$out/prefix/lib/uccl-tcpx/nixl/"*/*.so 2>/dev/null || true
cp "$work/wheels"/uccl_tcpx-*.whl "$wheels"/numpy-"$numpy_version"-*.whl "$out/"
cp "$repo/target/release/uccl-tcpx-bench" "$out/"
strip "$out/uccl-tcpx-bench"
for s in nixl_plugin_gpu_run.sh nixl_plugin_env.sh nixl_plugin_tests.py nixl_plugin_bench.py \
  nixl_tcpx_benchmark.sh nixl_uccl_benchmark.sh uccl_python_tests.sh doc_snippets.py; do
  cp "$repo/scripts/$s" "$out/scripts/"
done
mkdir -p "$out/scripts/serving"
cp "$repo"/scripts/serving/*.py "$out/scripts/serving/"
cp "$repo/python/benchmarks/blocking.py" "$out/scripts/"
cp "$repo/README.md" "$out/"
cp "$repo"/docs/*.md "$out/docs/"
if [[ -n "$uccl" ]]; then
  (cd "$uccl" && find p2p/tests p2p/benchmarks -maxdepth 1 -name '*.py' -print0 |
    xargs -0 tar -cf -) | (mkdir -p "$out/uccl" && tar -C "$out/uccl" -xf -)
fi
{
  echo "NIXL_VERSION=$version"
  echo "NIXL_MODULE=$module"
  echo "PYTHON_VERSION=$bpython"
  echo "PYZMQ_VERSION=$pyzmq_version"
  echo "UCCL_SRC_COMMIT=$([[ -n "$uccl" ]] && (git -C "$uccl" rev-parse --short HEAD 2>/dev/null || echo unknown) || echo none)"
  echo "UCCL_TCPX_COMMIT=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
} >"$out/bundle.env"
[[ -z "$(find "$out" -type l)" ]] || die "symbolic links in $out: $(find "$out" -type l | paste -sd ' ')"
(cd "$out" && find . -type f ! -name MANIFEST -printf '%s\t%p\n' | sort -k2) >"$out/MANIFEST"
size="$(du -sb "$out" | cut -f1)"
((size < limit)) || die "$out is $size bytes, over 64 MiB"
echo "bundle: $out, $size bytes ($(du -sh "$out" | cut -f1)); NIXL $version (nixl-cu$cuda), Python $bpython"
echo "on the GPU host: bash $out/scripts/nixl_plugin_gpu_run.sh $out"
