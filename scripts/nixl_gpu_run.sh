#!/usr/bin/env bash
# NIXL over uccl-tcpx on a GPU host with two GPUs (or one, which both agents then share: that run
# cannot show an engine learning a GPU other than 0 after NIXL read its metadata), from a folder made by
# `scripts/nixl_e2e.sh --bundle DIR NIXL_SRC UCCL_SRC`; needs only that host's Python with torch
# (the Python version the bundle was made for) and its CUDA driver, no network and no compiler.
#
#   1. uccl-tcpx-bench --device gpu (cuda:0 to cuda:1, or cuda:0 on one GPU), WRITE and READ of
#      4 KiB, 1 MiB, 64 MiB;
#   2. scripts/nixl_e2e.py --device gpu with each plugin (source and binary drop-in): two agents in
#      two processes, torch tensors on cuda:0 and cuda:1 (or both on cuda:0) registered after the
#      agents were created, WRITE and READ with notifications and every byte checked, transfers to
#      self, peer exit; NIXL's timings next to the bench's;
#   3. UCCL's benchmark_nixl.py, unchanged, --backend uccl --device gpu, server on cuda:1 (or
#      cuda:0) and client on cuda:0, write and read at its default sizes (binary drop-in), next to
#      uccl-tcpx-bench at the same sizes.
# Every step runs even when an earlier one failed; the last line says whether all passed.
#
# usage: scripts/nixl_gpu_run.sh BUNDLE_DIR [STEPS]
#   STEPS  a comma-separated subset of bench,e2e,benchmark (default: all three)
# env:   PYTHON  the interpreter holding torch (default /opt/torch/.venv/bin/python3 when present,
#                else python3)
#        NIXL_GPU_RUN_DIR  where logs and the unpacked site go (default: a new folder in /tmp)
#        NIXL_BENCH_TIMEOUT  seconds for each benchmark_nixl.py size (default 120 here)
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
steps=",${2:-bench,e2e,benchmark},"
for s in ${steps//,/ }; do
  [[ "$s" == bench || "$s" == e2e || "$s" == benchmark ]] || {
    echo "nixl_gpu_run: unknown step $s (bench, e2e, benchmark)" >&2
    exit 2
  }
done
export NIXL_BENCH_TIMEOUT="${NIXL_BENCH_TIMEOUT:-120}"
bundle="$(cd "$1" && pwd)" || exit 2
die() {
  echo "nixl_gpu_run: $*" >&2
  echo "nixl_gpu_run: FAILED"
  exit 1
}
[[ -f "$bundle/bundle.env" && -f "$bundle/nixl-site.tar.xz" ]] || die "$bundle is not a bundle (no bundle.env)"
# shellcheck source=/dev/null
source "$bundle/bundle.env"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  py=python3
  [[ -x /opt/torch/.venv/bin/python3 ]] && py=/opt/torch/.venv/bin/python3
fi
have="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "$py does not run"
[[ "$have" == "$PYTHON_VERSION" ]] ||
  die "$py is Python $have; this bundle's NIXL is built for $PYTHON_VERSION (rebuild with NIXL_BUNDLE_PYTHON=$have)"

work="${NIXL_GPU_RUN_DIR:-$(mktemp -d /tmp/nixl-gpu-run.XXXXXX)}"
mkdir -p "$work/logs"
site="$work/site"
rm -rf "$site"
mkdir -p "$site"
"$py" - "$bundle/nixl-site.tar.xz" "$site" <<'EOF' || die "could not unpack nixl-site.tar.xz"
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    # The data filter where this Python has it: plain files only, nothing outside the folder.
    if hasattr(tarfile, "data_filter"):
        tar.extractall(sys.argv[2], filter="data")
    else:
        tar.extractall(sys.argv[2])
EOF
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# What a user swapping us in sets: our lib/ first on the library path.
export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$py" -c 'import torch, zmq; import nixl._api as a; print("NIXL from", a.__file__)' ||
  die "the bundled NIXL does not import (PYTHONPATH=$site)"
# Each plugin loads, and creates an engine, before anything is timed.
for variant in source binary; do
  NIXL_PLUGIN_DIR="$bundle/plugins/$variant" "$py" -c 'import sys
from nixl._api import nixl_agent, nixl_agent_config
agent = nixl_agent("probe", nixl_agent_config(backends=["UCCL"]))
sys.exit(0 if "UCCL" in agent.backends else 1)' >"$work/logs/probe-$variant.log" 2>&1 ||
    die "NIXL did not create the UCCL backend from plugins/$variant (log: $work/logs/probe-$variant.log)"
done
echo "bundle: NIXL $NIXL_VERSION ($NIXL_MODULE, NIXL $NIXL_SRC_COMMIT, UCCL $UCCL_SRC_COMMIT), uccl-tcpx $UCCL_TCPX_COMMIT"
"$py" -c 'import sys, torch
n = torch.cuda.device_count()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {n} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(n)))
sys.exit(0 if n >= 1 else 1)' || die "no GPU visible to torch"
peer_gpu=1
if [[ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" == 1 ]]; then
  peer_gpu=0
  echo "one GPU: both agents on cuda:0 (the engine learning GPU 1 after NIXL's metadata needs two)"
fi
export NIXL_SERVER_GPU=$peer_gpu

failed=()
if [[ "$steps" == *,bench,* ]]; then
  # The same-host path, which NIXL's two agents on this host take as well.
  echo "======== uccl-tcpx-bench --same-host --device gpu (cuda:0 -> cuda:$peer_gpu)"
  "$bundle/uccl-tcpx-bench" --same-host --ops write,read --sizes 4K,1M,64M --no-baseline --device gpu --gpu 0 \
    --peer-gpu $peer_gpu --json-file "$work/bench.json" >"$work/logs/bench.log" 2>&1 || failed+=(uccl-tcpx-bench)
  cat "$work/logs/bench.log"
fi

if [[ "$steps" == *,e2e,* ]]; then
  bench_json=()
  [[ -f "$work/bench.json" ]] && bench_json=(--bench-json "$work/bench.json")
  for variant in source binary; do
    echo "======== nixl_e2e.py --device gpu, $variant drop-in"
    NIXL_PLUGIN_DIR="$bundle/plugins/$variant" PYTHONUNBUFFERED=1 "$py" "$bundle/nixl_e2e.py" \
      --device gpu --target-gpu $peer_gpu --variant "$variant drop-in" "${bench_json[@]}" ||
      failed+=("nixl_e2e-$variant")
  done
fi

if [[ "$steps" == *,benchmark,* ]]; then
  echo "======== benchmark_nixl.py --backend uccl --device gpu (binary drop-in)"
  NIXL_PLUGIN_DIR="$bundle/plugins/binary" PYTHON="$py" UCCL_TCPX_BENCH="$bundle/uccl-tcpx-bench" \
    "$bundle/nixl_uccl_benchmark.sh" "$bundle/benchmark_nixl.py" gpu "$work/logs" ||
    failed+=(benchmark_nixl)
fi

echo "logs: $work/logs"
if ((${#failed[@]})); then
  echo "nixl_gpu_run: FAILED: ${failed[*]}"
  exit 1
fi
echo "nixl_gpu_run: all passed"
