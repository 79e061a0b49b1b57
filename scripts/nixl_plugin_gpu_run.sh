#!/usr/bin/env bash
# The TCPX NIXL plugin on a GPU host, from a folder made by scripts/nixl_plugin_bundle.sh; needs
# only that host's Python with torch (the bundle's Python version) and its CUDA driver:
#
#   tests      scripts/nixl_plugin_tests.py --initiator VRAM --target VRAM --gpu 0
#   snippets   the nixl and nixl-gpu snippets of README.md and docs/ (scripts/doc_snippets.py)
#   bench      scripts/nixl_plugin_bench.py --vram 0,P: TCPX (network and same-host paths) against
#              NIXL's UCX over TCP with cuda_copy and UCX's defaults, then uccl-tcpx-bench
#   benchmark  scripts/nixl_tcpx_benchmark.sh: UCCL's benchmark_nixl.py --backend tcpx --device gpu
#   uccl       scripts/uccl_python_tests.sh UCCL_TREE gpu: UCCL's one-GPU Python tests over the
#              uccl_tcpx wheel
#   uccl2      the same, gpu2: UCCL's two-GPU tests, one rank per GPU (needs two GPUs, so it runs
#              only when named)
# P is GPU 1 where there are two GPUs, else 0. benchmark and uccl need the UCCL test files in the
# bundle (made with UCCL_TREE). Every step runs even when an earlier one failed; the last line
# says whether all passed.
#
# usage: scripts/nixl_plugin_gpu_run.sh BUNDLE_DIR [STEPS]
#   STEPS  a comma-separated subset of tests,snippets,bench,benchmark,uccl,uccl2 (default: all but
#          uccl2)
# env:   PYTHON, NIXL_PLUGIN_RUN_DIR (logs and the unpacked packages), as scripts/nixl_plugin_env.sh
#        takes them; UCCL_TESTS_TIMEOUT, NIXL_BENCH_TIMEOUT for the UCCL runs
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
all=tests,snippets,bench,benchmark,uccl
steps=",${2:-$all},"
for s in ${steps//,/ }; do
  [[ ",$all,uccl2," == *,$s,* ]] || { echo "nixl_plugin_gpu_run: unknown step $s ($all,uccl2)" >&2; exit 2; }
done
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/nixl_plugin_env.sh
source "$here/nixl_plugin_env.sh" "$1" || { echo "nixl_plugin_gpu_run: FAILED"; exit 1; }
logs="$NIXL_PLUGIN_RUN_DIR/logs"
mkdir -p "$logs"
gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" || gpus=0
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' || true
((gpus >= 1)) || { echo "nixl_plugin_gpu_run: no GPU visible to torch"; echo "nixl_plugin_gpu_run: FAILED"; exit 1; }
peer=$((gpus >= 2 ? 1 : 0))

failed=()
step() { [[ "$steps" == *,$1,* ]]; }
if step tests; then
  echo "======== nixl_plugin_tests.py, VRAM to VRAM on GPU 0"
  (cd "$NIXL_PLUGIN_RUN_DIR" && timeout 900 "$PYTHON" "$here/nixl_plugin_tests.py" --initiator VRAM --target VRAM --gpu 0) ||
    failed+=(tests)
fi
if step snippets; then
  for suite in nixl nixl-gpu; do
    echo "======== the $suite snippets of README.md and docs/"
    "$PYTHON" "$here/doc_snippets.py" --suite "$suite" --python "$PYTHON" || failed+=("snippets-$suite")
  done
fi
if step bench; then
  echo "======== nixl_plugin_bench.py --vram 0,$peer"
  (cd "$NIXL_PLUGIN_RUN_DIR" && "$PYTHON" "$here/nixl_plugin_bench.py" --vram "0,$peer" --json "$logs/nixl_plugin_bench.json") ||
    failed+=(bench)
  # The engine without NIXL on the same sizes and GPUs: the network path, then the same-host path.
  for path in "" --same-host; do
    echo "======== uccl-tcpx-bench --device gpu --gpu 0 --peer-gpu $peer $path"
    "$UCCL_TCPX_BENCH" --ops write,read --sizes 4K,1M,64M --no-baseline --device gpu --gpu 0 --peer-gpu "$peer" \
      $path || failed+=("uccl-tcpx-bench$path")
  done
fi
if step benchmark; then
  echo "======== benchmark_nixl.py --backend tcpx --device gpu"
  if [[ -z "${UCCL_TREE:-}" ]]; then
    echo "no UCCL files in the bundle (make it with UCCL_TREE)"
    failed+=(benchmark)
  else
    NIXL_SERVER_GPU=$peer "$here/nixl_tcpx_benchmark.sh" "$UCCL_TREE" gpu "$logs/benchmark" || failed+=(benchmark)
  fi
fi
for set in uccl:gpu uccl2:gpu2; do
  step "${set%:*}" || continue
  echo "======== UCCL's Python tests, ${set#*:}"
  if [[ -z "${UCCL_TREE:-}" ]]; then
    echo "no UCCL files in the bundle (make it with UCCL_TREE)"
    failed+=("${set%:*}")
  else
    "$here/uccl_python_tests.sh" "$UCCL_TREE" "${set#*:}" || failed+=("${set%:*}")
  fi
done
echo "logs: $logs"
if ((${#failed[@]})); then
  echo "nixl_plugin_gpu_run: FAILED: ${failed[*]}"
  exit 1
fi
echo "nixl_plugin_gpu_run: all passed"
