#!/usr/bin/env bash
# One-shot measurement on a GPU host, no cargo needed there: uccl-tcpx-bench with GPU buffers and
# with host buffers at two socket layouts, raw TCP anchors, and (on hosts with 2+ GPUs and PyTorch)
# NCCL's socket transport GPU->GPU, default and tuned. Everything goes to stdout; the bench runs'
# results are also collected in one JSON file.
#
#   scripts/gpu_bench.sh [BENCH_BINARY]
#
# BENCH_BINARY (or UCCL_TCPX_BENCH_BIN): a prebuilt uccl-tcpx-bench, default target/release/uccl-tcpx-bench.
# GPU_BENCH_OUT (else $OUT, else ./gpu_bench_out): where logs and gpu_bench.json go.
# GPU_BENCH_SIZES, GPU_BENCH_LAYOUTS: override the size list and the layouts run (tags below).
# GPU_BENCH_DEVICES: which buffers to bench, default "gpu cpu".
# GPU_BENCH_STEP_TIMEOUT: seconds one step may take (default 150); GPU_BENCH_BUDGET: seconds for the
# whole script (default 540), after which the remaining steps are skipped.
# Optional: target/release/examples/gpu_staging_bw (or GPU_STAGING_BW_BIN) is run too when present.
# The net-plugin transport over the fake devmem NIC in GPU mode runs first when libfake_tcpx.so lies
# next to the bench binary (or GPU_BENCH_FAKE_PLUGIN names it): GPU->GPU and GPU->host writes and
# sends (GPU_BENCH_FAKE_SIZES), with UCCL_TCPX_PLUGIN_TEST_AHEAD=1 (the default) and 0 (the plugin
# tested only for a comm's oldest receive, as before); GPU_BENCH_FAKE=0 skips it.
# The staging knobs (UCCL_TCPX_STAGING_AHEAD, _STREAMS) and UCCL_TCPX_TRACE (e.g.
# staging,device:/tmp/t: each bench process writes its events at exit; scripts/diag/trace_summary.py
# /tmp/t summarizes them) pass through from the caller's environment to every bench run.
set -uo pipefail # not -e: a failing step is reported and the next one still runs
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-${UCCL_TCPX_BENCH_BIN:-target/release/uccl-tcpx-bench}}"
OUTDIR="${GPU_BENCH_OUT:-${OUT:-gpu_bench_out}}"
STEP_TIMEOUT="${GPU_BENCH_STEP_TIMEOUT:-150}"
BUDGET="${GPU_BENCH_BUDGET:-540}"
STAGING_BW="${GPU_STAGING_BW_BIN:-target/release/examples/gpu_staging_bw}"
SIZES="${GPU_BENCH_SIZES:-8,4K,64K,1M,16M,64M,256M}"
# GPU_BENCH_LAYOUTS: the layout tags to run (below), default all.
ONLY_LAYOUTS="${GPU_BENCH_LAYOUTS:-}"
ANCHORS=scripts/anchors
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
START=$SECONDS

if [[ ! -x "$BIN" ]]; then
  echo "gpu_bench: no executable bench binary at $BIN (build it with cargo build --release -p uccl-tcpx-bench)" >&2
  exit 2
fi

section() { printf '\n======== %s (t=%ds) ========\n' "$*" "$((SECONDS - START))"; }

# Runs a step under the time limit (the step's own, cut to what is left of the script's budget),
# its output to stdout and to $OUTDIR/NAME.log.
step() {
  local name=$1
  shift
  local limit=$((BUDGET - (SECONDS - START)))
  ((limit > STEP_TIMEOUT)) && limit=$STEP_TIMEOUT
  if ((limit < 15)); then
    echo "gpu_bench: step $name skipped: the ${BUDGET}s budget is spent"
    return 125
  fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then
    echo "gpu_bench: step $name failed with status $rc$([[ $rc -eq 124 ]] && echo " (timed out after ${limit}s)")"
  fi
  return "$rc"
}

json_string() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr '\n\t' '  ')"; }

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi
CORES=$(nproc)

section "host"
echo "date: $(date -u +%FT%TZ)"
echo "kernel: $(uname -r), cores: $CORES, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')"
echo "GPUs: $GPUS"
nvidia-smi -L 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total,pci.bus_id --format=csv,noheader 2>/dev/null
nvidia-smi topo -m 2>/dev/null | head -n 12
echo "bench binary: $BIN"

RUNS_JSON=()
FAKE_PLUGIN="${GPU_BENCH_FAKE_PLUGIN:-$(dirname "$BIN")/libfake_tcpx.so}"
FAKE_SIZES="${GPU_BENCH_FAKE_SIZES:-4K,64K,1M,4M,64M,256M}"
FAKE_RUNS=()
if [[ "${GPU_BENCH_FAKE:-1}" == 0 ]]; then
  echo "gpu_bench: the fake NIC runs are off (GPU_BENCH_FAKE=0)"
elif [[ ! -f "$FAKE_PLUGIN" || $GPUS -lt 1 ]]; then
  echo "gpu_bench: fake NIC runs skipped: needs a GPU and $FAKE_PLUGIN"
else
  # Both ends on this host stay on the plugin (UCCL_TCPX_LOCAL_PEERS=plugin; the fake carries such
  # traffic only with FAKE_TCPX_SAME_HOST=allow), no flow-steering wait; the engine pairs its GPU
  # with the fake NICs next to it (eth0, without devmem, sits elsewhere); host receives in the
  # plugin fail as on TCPX, so a host destination must take the landing path.
  FAKE_ENV=(UCCL_TCPX_TRANSPORT=tcpx "UCCL_TCPX_PLUGIN=$FAKE_PLUGIN" UCCL_TCPX_LOCAL_PEERS=plugin FAKE_TCPX_MODE=gpu
    FAKE_TCPX_SAME_HOST=allow FAKE_TCPX_STEERING_WAIT_MS=0 FAKE_TCPX_HOST_RECV=fail)
  for ahead in 1 0; do
    for dest in gpu cpu; do
      name="fake-gpu-to-$dest-ahead$ahead"
      section "$name: UCCL_TCPX_PLUGIN_TEST_AHEAD=$ahead uccl-tcpx-bench --device gpu --peer-device $dest"
      rm -f "$OUTDIR/$name.json"
      step "$name" env "${FAKE_ENV[@]}" UCCL_TCPX_PLUGIN_TEST_AHEAD=$ahead "$BIN" --device gpu --peer-device "$dest" \
        --ops write,send --sizes "$FAKE_SIZES" --no-baseline --json-file "$OUTDIR/$name.json"
      rc=$?
      result=null
      [[ -s "$OUTDIR/$name.json" ]] && result=$(cat "$OUTDIR/$name.json")
      RUNS_JSON+=("{\"name\":\"$name\",\"device\":\"gpu\",\"env\":$(json_string "${FAKE_ENV[*]} UCCL_TCPX_PLUGIN_TEST_AHEAD=$ahead"),\"flags\":$(json_string "--peer-device $dest"),\"status\":$rc,\"result\":$result}")
      FAKE_RUNS+=("$name")
    done
  done
fi

# The same-host path: GPU buffers in both bench processes, one-sided writes and reads as device
# copies (CUDA IPC between the two processes), against device copies of the same bytes between the
# same GPUs measured in the same run (the anchors: cuMemcpyPeerAsync across GPUs, cuMemcpyDtoDAsync
# on one; goals: 64 MiB writes and reads at >= 0.90 of them, an 8 B write's round trip within 1.5x
# one copy's launch and wait; the bench prints both verdicts). On one GPU and, with two, across.
if [[ "${GPU_BENCH_SAME_HOST:-1}" == 0 || $GPUS -lt 1 ]]; then
  echo "gpu_bench: same-host runs skipped (GPU_BENCH_SAME_HOST=0, or no GPU)"
else
  SAME_HOST_RUNS=("one-gpu|--peer-gpu 0")
  ((GPUS >= 2)) && SAME_HOST_RUNS+=("two-gpus|--peer-gpu 1")
  for run in "${SAME_HOST_RUNS[@]}"; do
    IFS='|' read -r tag flags <<<"$run"
    name="same-host-gpu-$tag"
    section "$name: uccl-tcpx-bench --same-host --device gpu $flags (same-host path, device-copy anchors)"
    rm -f "$OUTDIR/$name.json"
    # shellcheck disable=SC2086 # flags is a word list
    step "$name" env -u UCCL_TCPX_DISABLE_IPC "$BIN" --same-host --device gpu --gpu 0 $flags --ops write,read \
      --sizes "$SIZES" --no-baseline --json-file "$OUTDIR/$name.json"
    rc=$?
    result=null
    [[ -s "$OUTDIR/$name.json" ]] && result=$(cat "$OUTDIR/$name.json")
    RUNS_JSON+=("{\"name\":\"$name\",\"device\":\"gpu\",\"env\":\"\",\"flags\":$(json_string "$flags"),\"status\":$rc,\"result\":$result}")
  done
fi

# Two socket layouts with 16 data sockets per direction each (16-32 core host): 4 channels x 4
# helper threads with 1 MiB chunks, and 8 channels x 2 threads with 4 MiB chunks and a deeper
# window (the staged GPU path's best setting in the in-process staging example); the latter again
# with 4 transfers in flight, where copies of one transfer overlap the socket I/O of another.
# Smaller chunks would shorten a depth-1 GPU transfer's pipeline fill and drain (every channel's
# first chunk is copied before the network starts, its last after it ends); ch4-2m (4 x 2 MiB in
# the pipe) and ch8-1m measure whether that beats the per-chunk cost. ch2-depth4 is ch8-depth4 on the
# default two channels: on 2 x H200 a 256 KiB GPU write (one chunk) took 134-137 us there against
# 214-234 us with eight channels, each of which carries one transfer in eight. Without --same-host the bench
# keeps its two processes on the network path these layouts are about. dflt-depth4 is what a caller
# gets with no knob set (2 channels of 8 sockets and 2 MiB chunks from 16 cores), 4 in flight.
LAYOUTS=(
  "dflt-depth4|--depth 4|"
  "ch4|--channels 4|UCCL_TCPX_SOCKET_NTHREADS=4 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=1M UCCL_TCPX_WINDOW=8"
  "ch8|--channels 8|UCCL_TCPX_SOCKET_NTHREADS=2 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=4M UCCL_TCPX_WINDOW=16"
  "ch8-depth4|--channels 8 --depth 4|UCCL_TCPX_SOCKET_NTHREADS=2 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=4M UCCL_TCPX_WINDOW=16"
  "ch2-depth4|--channels 2 --depth 4|UCCL_TCPX_SOCKET_NTHREADS=2 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=4M UCCL_TCPX_WINDOW=16"
  "ch4-2m|--channels 4|UCCL_TCPX_SOCKET_NTHREADS=4 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=2M UCCL_TCPX_WINDOW=16"
  "ch4-2m-depth4|--channels 4 --depth 4|UCCL_TCPX_SOCKET_NTHREADS=4 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=2M UCCL_TCPX_WINDOW=16"
  "ch8-1m|--channels 8|UCCL_TCPX_SOCKET_NTHREADS=2 UCCL_TCPX_NSOCKS_PERTHREAD=1 UCCL_TCPX_CHUNK_SIZE=1M UCCL_TCPX_WINDOW=16"
)
for device in ${GPU_BENCH_DEVICES:-gpu cpu}; do
  for layout in "${LAYOUTS[@]}"; do
    IFS='|' read -r tag flags knobs <<<"$layout"
    [[ -n "$ONLY_LAYOUTS" && " $ONLY_LAYOUTS " != *" $tag "* ]] && continue
    name="bench-$device-$tag"
    section "$name: $knobs uccl-tcpx-bench --device $device $flags"
    rm -f "$OUTDIR/$name.json"
    # shellcheck disable=SC2086 # flags and knobs are word lists
    step "$name" env $knobs "$BIN" --device "$device" $flags --ops write,read,send --sizes "$SIZES" \
      --json-file "$OUTDIR/$name.json"
    rc=$?
    result=null
    [[ -s "$OUTDIR/$name.json" ]] && result=$(cat "$OUTDIR/$name.json")
    RUNS_JSON+=("{\"name\":\"$name\",\"device\":\"$device\",\"env\":$(json_string "$knobs"),\"flags\":$(json_string "$flags"),\"status\":$rc,\"result\":$result}")
  done
done

if [[ -x "$STAGING_BW" ]]; then
  section "gpu_staging_bw (two engines in one process, one-sided writes)"
  step staging_bw "$STAGING_BW" 256 6 4:1024:8 8:1024:16 8:4096:16
fi

section "raw TCP anchors (gcc -O2 -pthread)"
ANCHOR_LINES=()
ANCHOR_BIN="$(mktemp -d)"
trap 'rm -rf "$ANCHOR_BIN"' EXIT
if command -v gcc >/dev/null 2>&1 &&
  gcc -O2 -pthread "$ANCHORS/tcp_stream.c" -o "$ANCHOR_BIN/tcp_stream" &&
  gcc -O2 -pthread "$ANCHORS/tcp_pingpong.c" -o "$ANCHOR_BIN/tcp_pingpong"; then
  for streams in 1 2 4 8 16 32; do
    ((SECONDS - START < BUDGET - 15)) || break
    line=$(timeout -k 5 60 "$ANCHOR_BIN/tcp_stream" "$streams" 16384 2>&1)
    echo "$line"
    ANCHOR_LINES+=("$(json_string "$line")")
  done
  for _ in 1 2 3; do
    ((SECONDS - START < BUDGET - 15)) || break
    line=$(timeout -k 5 60 "$ANCHOR_BIN/tcp_pingpong" 2>&1)
    echo "$line"
    ANCHOR_LINES+=("$(json_string "$line")")
  done
else
  echo "gpu_bench: gcc missing or the anchors did not compile: raw TCP anchors skipped"
fi

section "NCCL socket transport GPU->GPU (anchor)"
if [[ $GPUS -lt 2 ]]; then
  echo "skipped: needs 2 GPUs, this host has $GPUS"
elif ! command -v torchrun >/dev/null 2>&1 || ! python3 -c 'import torch' 2>/dev/null; then
  echo "skipped: torchrun / PyTorch not installed"
else
  NCCL_ENV=(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1
    NCCL_NVLS_ENABLE=0)
  step nccl-default env "${NCCL_ENV[@]}" TAG=default \
    torchrun --nproc_per_node=2 --master_port=29561 "$ANCHORS/nccl_socket_p2p.py"
  step nccl-tuned env "${NCCL_ENV[@]}" NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=2 TAG=tuned \
    torchrun --nproc_per_node=2 --master_port=29562 "$ANCHORS/nccl_socket_p2p.py"
  for tag in default tuned; do
    while IFS= read -r line; do
      ANCHOR_LINES+=("$(json_string "$line")")
    done < <(grep '^nccl-socket' "$OUTDIR/nccl-$tag.log" 2>/dev/null)
  done
fi

join() {
  local IFS=,
  echo "$*"
}
{
  printf '{"date":"%s","cores":%s,"gpus":%s,"sizes":"%s",' "$(date -u +%FT%TZ)" "$CORES" "$GPUS" "$SIZES"
  printf '"runs":[%s],"anchor_lines":[%s]}\n' "$(join "${RUNS_JSON[@]}")" "$(join "${ANCHOR_LINES[@]}")"
} >"$OUTDIR/gpu_bench.json"

section "summary: GPU bench against host bench and raw TCP, same layout (GB/s)"
if command -v python3 >/dev/null 2>&1; then
  python3 - "$OUTDIR/gpu_bench.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
runs = {r["name"]: r["result"] for r in doc["runs"] if r["result"]}
for tag in ("dflt-depth4", "ch4", "ch8", "ch8-depth4", "ch2-depth4", "ch4-2m", "ch4-2m-depth4", "ch8-1m"):
    gpu, cpu = runs.get(f"bench-gpu-{tag}"), runs.get(f"bench-cpu-{tag}")
    if not gpu:
        print(f"{tag}: no GPU result")
        continue
    host = {(p["op"], p["size"]): p for p in (cpu or {}).get("results", [])}
    print(f"\n{tag}: client {gpu['client_memory']}, server {gpu['server_memory']}, "
          f"{gpu['raw_streams']} raw streams, {gpu['depth']} in flight")
    print(f"{'op':<6}{'size':>11}{'GPU GB/s':>10}{'host GB/s':>10}{'GPU/host':>9}{'raw GB/s':>9}{'GPU/raw':>8}"
          f"{'GPU p50 us':>11}{'host p50':>9}")
    for p in gpu["results"]:
        h = host.get((p["op"], p["size"]))
        f = lambda v, spec: format(v, spec) if v is not None else "-"
        ratio = p["gb_per_s"] / h["gb_per_s"] if h and h["gb_per_s"] else None
        print(f"{p['op']:<6}{p['size']:>11}{p['gb_per_s']:>10.2f}{f(h and h['gb_per_s'], '>10.2f'):>10}"
              f"{f(ratio, '>9.2f'):>9}{f(p['raw_gb_per_s'], '>9.2f'):>9}{f(p['bw_ratio'], '>8.2f'):>8}"
              f"{p['p50_us']:>11.1f}{f(h and h['p50_us'], '>9.1f'):>9}")

same_host = {n.removeprefix("same-host-gpu-"): r for n, r in runs.items() if n.startswith("same-host-gpu-")}
for tag, r in same_host.items():
    print(f"\nsame-host path, {tag}: client {r['client_memory']}, server {r['server_memory']}: ours against "
          "device copies of the same bytes (anchor)")
    print(f"{'op':<6}{'size':>11}{'GB/s':>9}{'anchor':>9}{'ratio':>7}{'p50 us':>9}{'anchor us':>10}{'ratio':>7}")
    for p in r["results"]:
        f = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"{p['op']:<6}{p['size']:>11}{p['gb_per_s']:>9.2f}{f(p['anchor_gb_per_s'], '>9.2f'):>9}"
              f"{f(p['anchor_ratio'], '>7.2f'):>7}{p['p50_us']:>9.1f}{f(p['anchor_p50_us'], '>10.1f'):>10}"
              f"{f(p['anchor_lat_ratio'], '>7.2f'):>7}")

fake = {n.removeprefix("fake-gpu-to-"): r for n, r in runs.items() if n.startswith("fake-gpu-to-")}
if fake:
    print("\nplugin transport over the fake NIC in GPU mode: GB/s, GPU->host against GPU->GPU, and the plugin")
    print("tested ahead (default) against only for the oldest receive (UCCL_TCPX_PLUGIN_TEST_AHEAD=0)")
    print(f"{'op':<6}{'size':>11}{'to GPU':>8}{'to host':>8}{'host/GPU':>9}{'GPU old':>8}{'host old':>9}"
          f"{'host/GPU old':>13}{'gain GPU':>9}{'gain host':>10}")
    point = lambda tag, op, size: next((p["gb_per_s"] for p in fake.get(tag, {}).get("results", [])
                                        if p["op"] == op and p["size"] == size), None)
    sizes = sorted({(p["op"], p["size"]) for r in fake.values() for p in r["results"]})
    for op, size in sizes:
        g, h, go, ho = (point(t, op, size) for t in ("gpu-ahead1", "cpu-ahead1", "gpu-ahead0", "cpu-ahead0"))
        f = lambda v, w: format(v, f">{w}.2f") if v is not None else "-".rjust(w)
        div = lambda a, b: a / b if a is not None and b else None
        print(f"{op:<6}{size:>11}{f(g, 8)}{f(h, 8)}{f(div(h, g), 9)}{f(go, 8)}{f(ho, 9)}{f(div(ho, go), 13)}"
              f"{f(div(g, go), 9)}{f(div(h, ho), 10)}")

# NCCL lines: "nccl-socket TAG size=N GB/s=X lat_us=Y"
nccl = {}
for line in doc["anchor_lines"]:
    words = line.split()
    if words and words[0] == "nccl-socket":
        kv = dict(w.split("=", 1) for w in words if "=" in w)
        nccl[(words[1], int(kv["size"]))] = (float(kv["GB/s"]), float(kv["lat_us"]))
if nccl:
    print("\nGPU->GPU against NCCL's socket transport (best of our layouts; NCCL latency = time per send/recv)")
    print(f"{'op':<6}{'size':>11}{'ours GB/s':>10}{'layout':>11}{'NCCL dflt':>10}{'NCCL tuned':>11}{'ours/tuned':>11}"
          f"{'ours p50 us':>12}{'NCCL tuned us':>14}")
    gpu_runs = {n: r for n, r in runs.items() if n.startswith("bench-gpu-")}
    sizes = sorted({size for _, size in nccl})
    for op in ("write", "read", "send"):
        for size in sizes:
            best = None
            for name, r in gpu_runs.items():
                for p in r["results"]:
                    if p["op"] == op and p["size"] == size and (best is None or p["gb_per_s"] > best[1]["gb_per_s"]):
                        best = (name.removeprefix("bench-gpu-"), p)
            d, t = nccl.get(("default", size)), nccl.get(("tuned", size))
            if best is None:
                continue
            layout, p = best
            ratio = p["gb_per_s"] / t[0] if t and t[0] else None
            f = lambda v, spec: format(v, spec) if v is not None else "-"
            print(f"{op:<6}{size:>11}{p['gb_per_s']:>10.2f}{layout:>11}{f(d and d[0], '>10.2f'):>10}"
                  f"{f(t and t[0], '>11.2f'):>11}{f(ratio, '>11.2f'):>11}{p['p50_us']:>12.1f}{f(t and t[1], '>14.1f'):>14}")
EOF
else
  echo "python3 missing: see $OUTDIR/gpu_bench.json"
fi
echo
echo "results: $OUTDIR/gpu_bench.json (logs: $OUTDIR/*.log), total ${SECONDS}s"
