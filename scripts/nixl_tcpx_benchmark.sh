#!/usr/bin/env bash
# UCCL's NIXL benchmark (p2p/benchmarks/benchmark_nixl.py of a UCCL tree) with `--backend tcpx`,
# our NIXL plugin, server and client on this host (scripts/nixl_uccl_benchmark.sh runs the roles,
# one size per process pair, and checks their output). The benchmark knows only the backends ucx,
# mooncake and uccl, and sends any other name down its UCX path, so a copy of it, made in LOG_DIR at
# run time and never kept in this repository, gets the few changes tcpx needs: tcpx among the
# --backend choices, tcpx taking the path of mooncake and uccl (metadata over ZeroMQ), and tcpx
# allowed with --local. Each change must apply exactly where expected, or the run stops.
#
# usage: scripts/nixl_tcpx_benchmark.sh UCCL_SRC cpu|gpu LOG_DIR
#        scripts/nixl_tcpx_benchmark.sh --patch-only UCCL_SRC OUT.py   (the patched copy alone)
# env: PYTHON  an interpreter with NIXL (1.4.0 or 1.5.1), torch and pyzmq (default python3)
#      UCCL_TCPX_PREFIX  the installed uccl-tcpx (default target/nixl-plugin/prefix, as
#                        scripts/nixl_plugin_tests.sh installs it; scripts/nixl_plugin_env.sh sets
#                        it to a bundle's)
#      and those of scripts/nixl_uccl_benchmark.sh (UCCL_TCPX_BENCH, NIXL_SERVER_GPU, ...)
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

patch_benchmark() {  # UCCL_SRC OUT
  local src="$1/p2p/benchmarks/benchmark_nixl.py"
  [[ -f "$src" ]] || { echo "nixl_tcpx_benchmark: $src not found" >&2; exit 1; }
  "${PYTHON:-python3}" - "$src" "$2" <<'PY'
import re, sys
src, out = sys.argv[1:]
text = open(src).read()
changes = [
    # (what, pattern, replacement, how many times it must apply)
    ("the --backend choices", r'choices=\["ucx", "mooncake", "uccl"\]', 'choices=["ucx", "mooncake", "uccl", "tcpx"]', 1),
    ("the ZeroMQ metadata path", r'args\.backend == "mooncake" or args\.backend == "uccl"',
     'args.backend in ("mooncake", "uccl", "tcpx")', 5),
    ("the --local check", r'args\.backend == "uccl" or args\.backend == "ucx"',
     'args.backend in ("uccl", "ucx", "tcpx")', 1),
]
for what, pattern, repl, count in changes:
    text, n = re.subn(pattern, repl, text)
    if n != count:
        sys.exit(f"nixl_tcpx_benchmark: {what}: {n} match(es) in {src}, {count} expected; the benchmark changed")
open(out, "w").write(text)
compile(text, out, "exec")
PY
}

if [[ "${1:-}" == --patch-only ]]; then
  [[ $# -eq 3 ]] || usage
  patch_benchmark "$2" "$3"
  echo "patched copy: $3"
  exit 0
fi
[[ $# -eq 3 && ("$2" == cpu || "$2" == gpu) ]] || usage
uccl_src="$(realpath -- "$1")"
logs="$(realpath -m -- "$3")"
mkdir -p "$logs"
py="${PYTHON:-python3}"
prefix="${UCCL_TCPX_PREFIX:-$repo/target/nixl-plugin/prefix}"
patched="$logs/benchmark_nixl_tcpx.py"
patch_benchmark "$uccl_src" "$patched"
"$py" -c 'import torch, zmq' || { echo "nixl_tcpx_benchmark: $py needs torch and pyzmq" >&2; exit 1; }
# Run by that interpreter, so that a host whose only Python is $py needs no python3 on PATH.
NIXL_PLUGIN_DIR="$("$py" "$prefix/bin/uccl-tcpx-nixl-plugin-dir")"
export NIXL_PLUGIN_DIR PYTHON="$py" NIXL_BENCH_BACKEND=tcpx
exec "$repo/scripts/nixl_uccl_benchmark.sh" "$patched" "$2" "$logs"
