#!/usr/bin/env bash
# Builds UCCL's p2p engine (p2p/engine.cc, engine.h, pybind_engine.cc of a UCCL source tree, as
# they are: no edit, no -D) against this library's headers, links it with libuccl_tcpx, and runs
# UCCL's Python tests that move host memory plus a two-process smoke of our own.
#
# usage: scripts/uccl_engine_check.sh UCCL_TREE [WORK_DIR]
#   UCCL_TREE  a UCCL checkout (or exported tree) holding p2p/ and include/util/; the engine of
#              September-October 2025 (commit 4bf9cd45 is the one this was made against)
#   WORK_DIR   where everything is built (default: target/uccl-engine-check; wiped first)
#
# Environment:
#   PYTHON            the interpreter to build for and run with (default python3); it needs numpy,
#                     and torch for UCCL's tests (those are skipped, and said so, without it)
#   UCCL_TCPX_PREFIX  an installed uccl-tcpx to use instead of building one (cmake/install.sh)
#   CUDA_HOME         a CUDA toolkit; else the headers and libcudart of the pip wheels
#                     nvidia-cuda-runtime-cu12 and nvidia-cuda-nvcc-cu12 (crt/ headers)
#   UCCL_CHECK_GPU    1: use the CUDA runtime for every test; 0: use no GPU (default: count the
#                     GPUs with nvidia-smi; with fewer than two the host-memory tests, which
#                     construct engines on GPUs 0 and 1, use the stand-in below)
#
# Needs g++, glog and libibverbs headers (Debian: libgoogle-glog-dev libibverbs-dev; the engine
# includes verbs.h but calls nothing of it), pybind11 and the Python headers.
#
# With fewer than two GPUs the host-memory tests' CUDA runtime calls (device count, set device,
# streams) go to a host-only stand-in (scripts/uccl_engine_check/host_cudart.c) placed first on the
# library path; every byte still moves through libuccl_tcpx. UCCL's GPU tests (test_engine_write.py,
# test_engine_read.py, GPU 0 only) and our byte check of GPU memory (uccl_engine_check/gpu_bytes.py)
# run with the real runtime when there is a GPU, else are skipped and listed as such.
#
# Exit status: 0 when everything ran and passed, 1 when something failed, 3 when nothing failed
# but something was skipped.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  sed -n '2,30p' "$0" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$(realpath -- "$1")"
work="$(realpath -m -- "${2:-$repo/target/uccl-engine-check}")"
python="${PYTHON:-python3}"
here="$repo/scripts/uccl_engine_check"

die() {
  echo "uccl_engine_check: $*" >&2
  exit 2
}

for f in p2p/engine.cc p2p/engine.h p2p/pybind_engine.cc include/util/util.h p2p/tests/test_engine_send.py \
  p2p/tests/test_engine_metadata.py; do
  [[ -f "$tree/$f" ]] || die "$tree/$f is missing: UCCL_TREE must be a UCCL source tree"
done
echo "== UCCL tree: $tree"
if git -C "$tree" rev-parse HEAD >/dev/null 2>&1; then
  echo "   commit $(git -C "$tree" rev-parse HEAD)"
fi
(cd "$tree/p2p" && sha256sum engine.cc engine.h pybind_engine.cc | sed 's/^/   /')

# ---- prerequisites ---------------------------------------------------------------------------
command -v g++ >/dev/null || die "g++ not found"
[[ -f /usr/include/glog/logging.h ]] || die "glog headers missing (apt-get install libgoogle-glog-dev)"
[[ -f /usr/include/infiniband/verbs.h ]] || die "verbs.h missing (apt-get install libibverbs-dev)"
"$python" -c 'import numpy' 2>/dev/null || die "$python has no numpy (pip install numpy)"
pybind_inc="$("$python" -m pybind11 --includes 2>/dev/null)" ||
  pybind_inc="$(python3 -m pybind11 --includes 2>/dev/null)" ||
  die "pybind11 not found (pip install pybind11)"
py_inc="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
[[ -f "$py_inc/Python.h" ]] || die "Python.h not found in $py_inc"
ext_suffix="$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"

if [[ -n "${CUDA_HOME:-}" && -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
  cuda_inc=(-I"$CUDA_HOME/include")
  cuda_lib="$CUDA_HOME/lib64"
else
  # The first interpreter whose nvidia/ wheels hold CUDA 12's runtime headers, crt/ and libcudart.
  nv=""
  for py in "$python" python3; do
    cand="$("$py" -c 'import nvidia.cuda_runtime as m, os; print(os.path.dirname(list(m.__path__)[0]))' 2>/dev/null || true)"
    if [[ -n "$cand" && -f "$cand/cuda_runtime/include/cuda_runtime.h" && -f "$cand/cuda_nvcc/include/crt/host_config.h" &&
      -f "$cand/cuda_runtime/lib/libcudart.so.12" ]]; then
      nv="$cand"
      break
    fi
  done
  [[ -n "$nv" ]] ||
    die "no CUDA 12 runtime headers: set CUDA_HOME or pip install nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12"
  cuda_inc=(-I"$nv/cuda_runtime/include" -I"$nv/cuda_nvcc/include")
  cuda_lib="$nv/cuda_runtime/lib"
fi
[[ -f "$cuda_lib/libcudart.so.12" || -f "$cuda_lib/libcudart.so" ]] || die "no libcudart in $cuda_lib"

# UCCL's host-memory tests and the smoke construct engines on GPUs 0 and 1, its GPU tests on GPU 0.
ngpus=0
if command -v nvidia-smi >/dev/null 2>&1; then ngpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; fi
case "${UCCL_CHECK_GPU:-}" in
  1) ((ngpus >= 2)) || ngpus=2 ;;
  0) ngpus=0 ;;
esac

rm -rf "$work"
mkdir -p "$work/py/uccl" "$work/logs"

# ---- this library ------------------------------------------------------------------------------
prefix="${UCCL_TCPX_PREFIX:-}"
if [[ -z "$prefix" ]]; then
  prefix="$work/stage"
  echo "== building uccl-tcpx into $prefix"
  "$repo/cmake/install.sh" "$prefix" "$work/cmake-build" >"$work/logs/install.log" 2>&1 ||
    { tail -20 "$work/logs/install.log" >&2; die "cmake/install.sh failed"; }
fi
[[ -f "$prefix/include/uccl_tcpx/rdma_compat/transport.h" ]] || die "$prefix lacks uccl_tcpx/rdma_compat/transport.h"
libdir="$prefix/lib"
[[ -f "$libdir/libuccl_tcpx.so" ]] || libdir="$prefix/lib64"

# ---- UCCL's engine, unchanged ------------------------------------------------------------------
# The include order is the whole trick: our rdma_compat folder provides "transport.h", UCCL's
# include/ the util/ headers the engine also includes. The -Wno flags are UCCL's own Makefile's.
ext="$work/py/uccl/p2p$ext_suffix"
echo "== compiling UCCL's engine.cc and pybind_engine.cc with uccl-tcpx's transport.h"
# shellcheck disable=SC2086
g++ -O2 -std=c++17 -fPIC -shared -o "$ext" \
  -I"$prefix/include/uccl_tcpx/rdma_compat" -I"$prefix/include" -I"$tree/include" "${cuda_inc[@]}" \
  $pybind_inc -I"$py_inc" \
  -Wno-pointer-arith -Wno-sign-compare -Wno-unused-variable -Wno-interference-size \
  "$tree/p2p/engine.cc" "$tree/p2p/pybind_engine.cc" \
  -L"$libdir" -luccl_tcpx -Wl,-rpath,"$libdir" \
  -L"$cuda_lib" -l:libcudart.so.12 -lglog -lpthread 2>"$work/logs/compile.log" ||
  { cat "$work/logs/compile.log" >&2; echo "BUILD FAILED" >&2; exit 1; }
touch "$work/py/uccl/__init__.py"
echo "   built $ext"
echo "   $(readelf -d "$ext" | grep -c NEEDED) NEEDED entries: $(readelf -d "$ext" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"

gpu_runlib="$cuda_lib"
host_runlib="$cuda_lib"
if ((ngpus < 2)); then
  mkdir -p "$work/host-cudart"
  gcc -O2 -shared -fPIC -Wall -Wextra -Werror -Wl,-soname,libcudart.so.12 \
    -Wl,--version-script="$here/host_cudart.map" -o "$work/host-cudart/libcudart.so.12" "$here/host_cudart.c"
  host_runlib="$work/host-cudart"
  echo "== $ngpus GPU(s): the host-memory tests (GPUs 0 and 1) run with the engine's CUDA runtime calls"
  echo "   going to the host-only stand-in $host_runlib/libcudart.so.12; the data path is uccl-tcpx's"
fi

export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
base_ld="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH="$host_runlib:$base_ld"
passed=() failed=() skipped=()
run() { # run NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"
  shift 2
  echo "== $name"
  if timeout "$limit" "$@" >"$work/logs/$name.log" 2>&1; then
    passed+=("$name")
    echo "   PASSED ($name)"
  else
    local rc=$?
    failed+=("$name")
    echo "   FAILED ($name, exit $rc); last lines:"
    tail -25 "$work/logs/$name.log" | sed 's/^/   | /'
  fi
}

has_torch=0
"$python" -c 'import torch' 2>/dev/null && has_torch=1

cd "$tree/p2p"
run import 60 "$python" -c 'from uccl import p2p; print("imported", p2p.__file__); print(p2p.Endpoint)'
for t in test_engine_send.py test_engine_metadata.py; do
  if [[ "$has_torch" == 1 ]]; then
    run "$t" 300 "$python" "$here/run_uccl_test.py" "tests/$t"
  else
    skipped+=("$t (needs torch: $python -m pip install torch)")
  fi
done
for t in test_engine_write.py test_engine_read.py; do
  if ((ngpus >= 1)) && [[ "$has_torch" == 1 && -f "tests/$t" ]]; then
    LD_LIBRARY_PATH="$gpu_runlib:$base_ld" run "$t" 300 "$python" "$here/run_uccl_test.py" "tests/$t"
  else
    skipped+=("$t (needs a GPU and torch with CUDA)")
  fi
done
if ((ngpus >= 1)) && [[ "$has_torch" == 1 ]]; then
  LD_LIBRARY_PATH="$gpu_runlib:$base_ld" run gpu_bytes 300 "$python" "$here/gpu_bytes.py"
else
  skipped+=("gpu_bytes (needs a GPU and torch with CUDA)")
fi
run smoke 300 "$python" "$here/smoke.py"

echo
echo "== results (logs in $work/logs)"
for n in "${passed[@]+"${passed[@]}"}"; do echo "PASSED  $n"; done
for n in "${failed[@]+"${failed[@]}"}"; do echo "FAILED  $n"; done
for n in "${skipped[@]+"${skipped[@]}"}"; do echo "SKIPPED $n"; done
echo "uccl_engine_check: ${#passed[@]} passed, ${#failed[@]} failed, ${#skipped[@]} skipped"
((${#failed[@]} == 0)) || exit 1
((${#skipped[@]} == 0)) || exit 3
exit 0
