#!/usr/bin/env bash
# What many connections of one engine cost, on each path: `uccl-tcpx-bench --scale` over the
# staged network path, the same-host path, and the plugin transport over the fake NIC with its
# channels kept open and closed once idle. After each table, what a connection added between two
# counts: resident memory and GPU memory in use, each side.
#
#   scripts/fan_out.sh BENCH [FAKE_PLUGIN]
#
# BENCH is uccl-tcpx-bench; FAKE_PLUGIN the fake NIC (default: libfake_tcpx.so beside BENCH; its
# runs are skipped, and said so, where it is missing).
# env: FAN_OUT_DEVICE       gpu (default where nvidia-smi lists a GPU) or cpu
#      FAN_OUT_GPUS         client,server GPUs (default 0,1 on two or more GPUs, else 0,0)
#      FAN_OUT_COUNTS       connection counts on the staged and same-host paths (default 1,8,64,128)
#      FAN_OUT_PLUGIN_COUNTS  on the plugin path, where each connection takes TCPX's connect and
#                           accept sequence (default 1,8,32)
#      FAN_OUT_IDLE_SECS    idle interval at each count (default 4)
#      FAN_OUT_PATHS        a comma-separated subset of staged,same-host,plugin-open,plugin-idle
#                           (default all)
# The plugin runs use the fake in GPU mode with GPU memory (host mode with host memory), no
# flow-steering wait (FAKE_TCPX_STEERING_WAIT_MS=0), and UCCL_TCPX_IDLE_CLOSE_MS 0 (open) or 1000
# (idle: closed within the idle interval).
set -uo pipefail
bench="${1:?usage: scripts/fan_out.sh BENCH [FAKE_PLUGIN]}"
fake="${2:-$(dirname "$bench")/libfake_tcpx.so}"
[[ -x "$bench" ]] || { echo "fan_out: $bench is not an executable" >&2; exit 2; }
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
device="${FAN_OUT_DEVICE:-$( ((gpus > 0)) && echo gpu || echo cpu)}"
pair="${FAN_OUT_GPUS:-$( ((gpus >= 2)) && echo 0,1 || echo 0,0)}"
counts="${FAN_OUT_COUNTS:-1,8,64,128}"
plugin_counts="${FAN_OUT_PLUGIN_COUNTS:-1,8,32}"
idle="${FAN_OUT_IDLE_SECS:-4}"
paths=",${FAN_OUT_PATHS:-staged,same-host,plugin-open,plugin-idle},"
flags=(--device "$device" --idle-secs "$idle")
[[ "$device" == gpu ]] && flags+=(--gpu "${pair%,*}" --peer-gpu "${pair#*,}")
mode=host
[[ "$device" == gpu ]] && mode=gpu

# What each connection added from one count to the next: the RSS and GPU MiB columns' c/s pairs.
per_connection() {
  awk '/^ *conns/ { next } /^#/ { next } NF >= 15 {
    n = $1; split($6, rss, "/"); split($8, gpu, "/")
    if (seen) {
      d = n - last
      line = sprintf("  %d -> %d connections, each: RSS %.2f / %.2f MiB", last, n, (rss[1] - lr[1]) / d, (rss[2] - lr[2]) / d)
      if (gpu[1] != "-") line = line sprintf(", GPU %.2f / %.2f MiB", (gpu[1] - lg[1]) / d, (gpu[2] - lg[2]) / d)
      print line " (client / server)"
    }
    seen = 1; last = n; lr[1] = rss[1]; lr[2] = rss[2]; lg[1] = gpu[1]; lg[2] = gpu[2]
  }'
}

failed=()
run() {
  local name="$1" list="$2"
  shift 2
  echo "======== $name: $* $bench --scale $list ${flags[*]}"
  local out
  out="$(env "$@" "$bench" --scale "$list" "${flags[@]}" ${extra[@]+"${extra[@]}"} 2>&1)"
  local rc=$?
  echo "$out"
  echo "$out" | per_connection
  ((rc == 0)) || failed+=("$name")
}

want() { [[ "$paths" == *,$1,* ]]; }
extra=()
want staged && run staged "$counts"
extra=(--same-host)
want same-host && run same-host "$counts"
extra=()
plugin_env=(UCCL_TCPX_TRANSPORT=tcpx "UCCL_TCPX_PLUGIN=$fake" UCCL_TCPX_LOCAL_PEERS=plugin "FAKE_TCPX_MODE=$mode"
  FAKE_TCPX_SAME_HOST=allow FAKE_TCPX_STEERING_WAIT_MS=0)
if want plugin-open || want plugin-idle; then
  if [[ ! -f "$fake" ]]; then
    echo "fan_out: the plugin runs skipped: no fake NIC at $fake"
  else
    want plugin-open && run plugin-open "$plugin_counts" "${plugin_env[@]}" UCCL_TCPX_IDLE_CLOSE_MS=0
    want plugin-idle && run plugin-idle "$plugin_counts" "${plugin_env[@]}" UCCL_TCPX_IDLE_CLOSE_MS=1000
  fi
fi
if ((${#failed[@]})); then
  echo "fan_out: FAILED: ${failed[*]}"
  exit 1
fi
echo "fan_out: all ran"
