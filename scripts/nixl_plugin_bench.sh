#!/usr/bin/env bash
# NIXL over host memory on this host, one run: our TCPX plugin (network path and same-host path)
# against NIXL's own UCX plugin (UCX_TLS=tcp, and UCX's defaults), two agents in two processes,
# then uccl-tcpx-bench on the same sizes (the engine without NIXL). A benchmark, not a test: it
# prints tables (scripts/nixl_plugin_bench.py says what is timed) and checks nothing but that
# every transfer completed.
#
# usage: scripts/nixl_plugin_bench.sh [--nixl VERSION] [--rounds N] [--sizes 4K,1M,64M] [--kv RxBxPxS]
#                                      [--breakdown]
#   --kv         also the KV case of nixl_plugin_bench.py (e.g. 8x1024x256x16K: 2,048 blocks of 16 KiB a request)
#   --breakdown  instead: where a request's time goes on the same-host path, NIXL's calls against our
#                plugin's, with uccl-tcpx-bench --same-host in every round (sizes default 4K,1M)
# env: NIXL_PLUGIN_TESTS_DIR  work directory shared with nixl_plugin_tests.sh (default target/nixl-plugin)
set -euo pipefail
nixl_version=1.4.0
rounds=3
sizes=
kv=
breakdown=0
while [[ $# -gt 0 ]]; do
  case "$1" in
  --nixl) nixl_version="$2"; shift 2 ;;
  --rounds) rounds="$2"; shift 2 ;;
  --sizes) sizes="$2"; shift 2 ;;
  --kv) kv="$2"; shift 2 ;;
  --breakdown) breakdown=1; shift ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(realpath -m -- "${NIXL_PLUGIN_TESTS_DIR:-$repo/target/nixl-plugin}")"
prefix="$work/prefix"
venv="$work/venv-nixl-cu12-$nixl_version"
mkdir -p "$work"
"$repo/cmake/install.sh" "$prefix" "$work/cmake-build" >"$work/install.log" 2>&1 ||
  { tail -n 40 "$work/install.log"; exit 1; }
cargo build --release --locked -q -p uccl-tcpx-bench --manifest-path "$repo/Cargo.toml"
bench="${CARGO_TARGET_DIR:-$repo/target}/release/uccl-tcpx-bench"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check numpy
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nixl-cu12==$nixl_version"
plugin_dir="$("$prefix/bin/uccl-tcpx-nixl-plugin-dir" --python "$venv/bin/python" --out "$work/plugins-$nixl_version")"

echo "== host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); NIXL $nixl_version"
if ((breakdown)); then
  echo "== NIXL on the same-host path, where a request's time goes, $rounds rounds"
  (cd "$work" && NIXL_PLUGIN_DIR="$plugin_dir" "$venv/bin/python" "$repo/scripts/nixl_plugin_bench.py" \
    --breakdown --bench "$bench" --rounds "$rounds" ${sizes:+--sizes "$sizes"})
  exit
fi
sizes="${sizes:-4K,1M,64M}"
echo "== NIXL, $rounds rounds (each cell: the range over rounds)"
(cd "$work" && NIXL_PLUGIN_DIR="$plugin_dir" "$venv/bin/python" "$repo/scripts/nixl_plugin_bench.py" \
  --rounds "$rounds" --sizes "$sizes" --json "$work/nixl_plugin_bench.json")
if [[ -n "$kv" ]]; then
  echo "== NIXL, KV block tables $kv, $rounds rounds"
  (cd "$work" && NIXL_PLUGIN_DIR="$plugin_dir" "$venv/bin/python" "$repo/scripts/nixl_plugin_bench.py" \
    --rounds "$rounds" --kv "$kv")
fi
echo "== uccl-tcpx-bench, network path"
"$bench" --ops write,read --sizes "$sizes" --no-baseline
echo "== uccl-tcpx-bench, same-host path"
"$bench" --ops write,read --sizes "$sizes" --no-baseline --same-host
