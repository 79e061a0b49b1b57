#!/usr/bin/env bash
# UCCL's own NIXL benchmark (p2p/benchmarks/benchmark_nixl.py from a UCCL tree, run unchanged) over
# uccl-tcpx: its server and client roles on this host with `--backend uccl`, WRITE then READ, at
# its default sizes (8 B to 1 MiB, 128 iterations each). With --device gpu the server's tensors
# are on cuda:1 (cuda:$NIXL_SERVER_GPU) and the client's on cuda:0; with --device cpu both are host
# memory.
#
# Each size runs as its own pair of processes (`--sizes N`). Within one run the benchmark binds a
# new ZeroMQ PAIR socket on port 9000 for every size, and a client that reconnects before the
# server closed the previous one sends its metadata to the old socket, where it is lost: both roles
# then wait in recv for good (seen on a loaded 2-core host at the second size).
#
# The caller sets up what a NIXL user would: PYTHONPATH (or the interpreter's own site) holding
# NIXL's `nixl` package, torch and pyzmq; LD_LIBRARY_PATH with uccl-tcpx's lib/ first;
# NIXL_PLUGIN_DIR at a libplugin_UCCL.so built for uccl-tcpx. The benchmark catches its own
# errors and still exits 0, so its output is checked here: every size must report on both roles
# and no error may be printed.
#
# With UCCL_TCPX_BENCH set, uccl-tcpx-bench then measures the same sizes without NIXL (same GPUs,
# one descriptor), and a table puts the client's figures next to its: GB/s from the mean time and
# the mean time itself, the statistics benchmark_nixl.py prints.
#
# usage: scripts/nixl_uccl_benchmark.sh BENCHMARK_NIXL_PY cpu|gpu LOG_DIR
# env:   PYTHON  the interpreter (default python3)
#        NIXL_BENCH_TIMEOUT  seconds for each size's run (default 300)
#        UCCL_TCPX_BENCH  uccl-tcpx-bench, for the comparison
#        NIXL_SERVER_GPU  the server's GPU with gpu (default 1; 0 on a one-GPU host)
#        NIXL_BENCH_BACKEND  the benchmark's --backend (default uccl; scripts/nixl_tcpx_benchmark.sh sets tcpx)
set -uo pipefail

if [[ $# -ne 3 || ("$2" != cpu && "$2" != gpu) ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
bench="$1"
device="$2"
logs="$3"
py="${PYTHON:-python3}"
backend="${NIXL_BENCH_BACKEND:-uccl}"
limit="${NIXL_BENCH_TIMEOUT:-300}"
mkdir -p "$logs"
[[ -f "$bench" ]] || {
  echo "nixl_uccl_benchmark: $bench not found" >&2
  exit 1
}
# The benchmark's default --sizes, which every role must report.
size_list=8,16,32,64,128,256,512,1024,2048,4096,8192,16384,32768,65536,131072,262144,524288,1048576
sizes=18
if [[ "$device" == gpu ]]; then
  server_gpu=(--local-gpu-idx "${NIXL_SERVER_GPU:-1}")
  client_gpu=(--local-gpu-idx 0)
  bench_gpu=(--same-host --device gpu --gpu 0 --peer-gpu "${NIXL_SERVER_GPU:-1}")
else
  server_gpu=()
  client_gpu=()
  bench_gpu=(--same-host)
fi

status=0
for op in write read; do
  echo "== benchmark_nixl.py --backend $backend --device $device --op-type $op"
  server_log="$logs/benchmark_nixl-$device-$op-server.log"
  client_log="$logs/benchmark_nixl-$device-$op-client.log"
  : >"$server_log"
  : >"$client_log"
  bad=()
  for size in ${size_list//,/ }; do
    # Unbuffered, so a killed run still leaves what it printed.
    PYTHONUNBUFFERED=1 timeout "$limit" "$py" "$bench" --role server --device "$device" \
      "${server_gpu[@]}" --backend "$backend" --op-type "$op" --sizes "$size" >>"$server_log" 2>&1 &
    server=$!
    PYTHONUNBUFFERED=1 timeout "$limit" "$py" "$bench" --role client --remote-ip 127.0.0.1 \
      --device "$device" "${client_gpu[@]}" --backend "$backend" --op-type "$op" --sizes "$size" \
      >>"$client_log" 2>&1
    client_rc=$?
    wait "$server"
    server_rc=$?
    ((client_rc == 0 && server_rc == 0)) || bad+=("$size (exit codes client $client_rc, server $server_rc)")
  done
  grep -E '^\[client\]' "$client_log" | sed 's/^/  /'
  reported_c="$(grep -cE '^\[client\] ' "$client_log")"
  reported_s="$(grep -cE '^\[server\] ' "$server_log")"
  errors="$(grep -c 'Error in' "$client_log" "$server_log" | awk -F: '{s += $2} END {print s + 0}')"
  if ((${#bad[@]} != 0 || reported_c != sizes || reported_s != sizes || errors != 0)); then
    echo "  FAIL  $op: sizes reported: client $reported_c, server $reported_s of $sizes; $errors" \
      "error(s); failed runs: ${bad[*]:-none} (logs: $client_log, $server_log)"
    grep -h -A12 'Error in' "$client_log" "$server_log" | head -n 40 | sed 's/^/    /'
    status=1
  else
    echo "  ok    $op: $sizes sizes reported by both roles, no error"
  fi
done

if [[ -n "${UCCL_TCPX_BENCH:-}" ]]; then
  echo "== uccl-tcpx-bench, the same sizes without NIXL"
  if "$UCCL_TCPX_BENCH" --ops write,read --sizes "$size_list" --no-baseline "${bench_gpu[@]}" \
    --json-file "$logs/bench-$device.json" >"$logs/bench-$device.log" 2>&1; then
    "$py" - "$logs" "$device" <<'EOF'
import json, re, sys

logs, device = sys.argv[1:]
ours = {}


def walk(node):
    if isinstance(node, dict):
        if isinstance(node.get("op"), str) and isinstance(node.get("size"), int):
            ours[(node["op"].lower(), node["size"])] = (node.get("gb_per_s"), node.get("avg_us"))
        for v in node.values():
            walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)


walk(json.load(open(f"{logs}/bench-{device}.json")))
line = re.compile(r"^\[client\]\s+(\S+ \S+) :\s+\S+ Gbps \|\s+(\S+) GB/s \|\s+(\S+) us")
print(f"  {'op':5} {'size':>9} {'NIXL GB/s':>10} {'NIXL us':>10} {'bench GB/s':>11} {'bench us':>10}")
for op in ("write", "read"):
    with open(f"{logs}/benchmark_nixl-{device}-{op}-client.log") as f:
        found = [m for m in map(line.match, f) if m]
    for size, m in zip([1 << k for k in range(3, 21)], found):
        gbs, us = ours.get((op, size), (None, None))
        ref = f"{gbs:11.3f} {us:10.1f}" if gbs is not None else f"{'-':>11} {'-':>10}"
        print(f"  {op:5} {m.group(1):>9} {float(m.group(2)):10.3f} {float(m.group(3)):10.1f} {ref}")
EOF
  else
    echo "  FAIL  uccl-tcpx-bench (log: $logs/bench-$device.log)"
    status=1
  fi
fi
exit "$status"
