#!/usr/bin/env bash
# Runs UCCL's own Python tests and benchmarks, unmodified, from a UCCL source tree, over uccl-tcpx:
# the only change is the opt-in alias on PYTHONPATH, which makes `from uccl import p2p` ours.
#
#   scripts/uccl_python_tests.sh UCCL_TREE [cpu|gpu|gpu2|all]
#
# UCCL_TREE is a checkout of UCCL (the folder holding p2p/, or p2p/ itself); nothing of it is
# copied here. `cpu` (the default) runs what needs no GPU, `gpu` what needs one GPU (both ranks
# on GPU 0), `all` both; `gpu2` what needs two GPUs (one rank per GPU).
#
# PYTHON names an interpreter that has torch and uccl-tcpx installed. Unset, a virtual
# environment in target/uccl-tests-env gets torch, numpy and the wheel in target/python-wheels/
# (scripts/python_tests.sh builds it); PyPI's torch wheel with its CUDA libraries is several GiB.
# Each run's output is kept in target/uccl-python-tests/<name>.log. Each run is stopped after
# UCCL_TESTS_TIMEOUT seconds (default 600).
set -euo pipefail

if (($# < 1)); then
  echo "usage: $0 UCCL_TREE [cpu|gpu|gpu2|all]" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$(cd "$1" && pwd)"
what="${2:-cpu}"
case "$what" in
  cpu | gpu | gpu2 | all) ;;
  *) echo "unknown set $what: cpu, gpu, gpu2 or all" >&2; exit 2 ;;
esac
[[ -d "$tree/p2p/tests" ]] && tree="$tree/p2p"
if [[ ! -f "$tree/tests/test_register_memory_cache.py" ]]; then
  echo "$1 is not a UCCL source tree (no p2p/tests/test_register_memory_cache.py)" >&2
  exit 2
fi
logs="$repo/target/uccl-python-tests"
mkdir -p "$logs"

if [[ -z "${PYTHON:-}" ]]; then
  env="$repo/target/uccl-tests-env"
  wheel="$(ls "$repo"/target/python-wheels/uccl_tcpx-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    echo "no wheel in target/python-wheels: run scripts/python_tests.sh first, or set PYTHON" >&2
    exit 2
  fi
  [[ -x "$env/bin/python" ]] || python3 -m venv "$env"
  "$env/bin/python" -m pip install --quiet torch numpy intervaltree
  "$env/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
  PYTHON="$env/bin/python"
fi
# The interpreter's folder goes first on PATH (torchrun's workers and UCCL's scripts call `python`).
# A bare name (PYTHON=python3) is resolved first: its dirname would be `.`, putting the current
# folder on PATH.
if [[ "$PYTHON" != */* ]]; then
  PYTHON="$(command -v "$PYTHON")" || { echo "PYTHON=$PYTHON: not found on PATH" >&2; exit 2; }
fi
bin="$(cd "$(dirname "$PYTHON")" && pwd)"
PYTHON="$bin/$(basename "$PYTHON")" # the runs below start from the UCCL tree
limit="${UCCL_TESTS_TIMEOUT:-600}"
[[ "$limit" =~ ^[1-9][0-9]*$ ]] || { echo "UCCL_TESTS_TIMEOUT=$limit: a whole number of seconds" >&2; exit 2; }
# torchrun's workers rendezvous on a fixed port (MASTER_PORT picks it); runs go one after another.
# torchrun takes the port as an argument and sets the workers' MASTER_PORT itself: an exported
# MASTER_PORT would not reach them.
torchrun=("$PYTHON" -m torch.distributed.run --master_port "${MASTER_PORT:-29517}")
alias_dir="$("$PYTHON" -m uccl_tcpx.alias)"
export PYTHONPATH="$alias_dir${PYTHONPATH:+:$PYTHONPATH}"
export UCCL_TCPX_ALIAS_QUIET=1
cd "$tree"

passed=0
failed=0
# run NAME PATTERNS COMMAND...: passes when the command exits 0 and its output holds every line of
# PATTERNS (one per line), except those starting with "!", which it must not hold: a test that
# skips its checks and still exits 0 has not passed.
run() {
  local name="$1" patterns="$2" pattern wrong=()
  shift 2
  echo "=== $name: $* ==="
  local rc=0 log="$logs/$name.log"
  PATH="$bin:$PATH" timeout "$limit" "$@" >"$log" 2>&1 || rc=$?
  while IFS= read -r pattern; do
    if [[ "$pattern" == '!'* ]]; then
      ! grep -qF -- "${pattern#!}" "$log" || wrong+=("printed \"${pattern#!}\"")
    else
      grep -qF -- "$pattern" "$log" || wrong+=("no \"$pattern\"")
    fi
  done <<<"$patterns"
  if ((rc == 0 && ${#wrong[@]} == 0)); then
    echo "passed: $(grep -v '^!' <<<"$patterns" | while IFS= read -r p; do grep -F -- "$p" "$log" | tail -n1; done | paste -sd ' ')"
    passed=$((passed + 1))
  else
    echo "FAILED (exit $rc; ${wrong[*]:-}); the last lines of $log:"
    tail -n 30 "$log"
    # torchrun's report of a failed rank ends the log: the rank's own error comes before it.
    echo "--- the first error lines of $log:"
    grep -nE 'Error|Traceback|assert|FAIL|panicked' "$log" | grep -v 'torch/distributed' | head -n 20
    failed=$((failed + 1))
  fi
}

if [[ "$what" == cpu || "$what" == all ]]; then
  run remove_remote_endpoint "Results: 5 passed, 0 failed out of 5" \
    "${torchrun[@]}" --nproc_per_node=2 tests/test_remove_remote_endpoint.py
  run register_memory_cache "✓ register_memory cache verification passed
✓ register_memory subregion cache verification passed
✓ register_memory partial-overlap no-cache verification passed
✓ register_memory non-overlap no-cache verification passed
!Skipping" "$PYTHON" tests/test_register_memory_cache.py
  run gpu_index_mapping "=== Results: 4/4 passed ===" "$PYTHON" tests/test_gpu_index_mapping.py
  run ray_p2p_cpu "[All] Benchmark complete (WRITE + READ)" \
    "${torchrun[@]}" --nproc_per_node=2 benchmarks/benchmark_ray_p2p.py --device cpu --sizes 4096,1048576
  run ray_p2p_cpu_iovs "[All] Benchmark complete (WRITE + READ)" \
    "${torchrun[@]}" --nproc_per_node=2 benchmarks/benchmark_ray_p2p.py --device cpu --num-iovs 8 --normal \
    --sizes 4096,1048576 --iters 16
fi

if [[ "$what" == gpu || "$what" == all ]]; then
  run engine_write_compress "[Receiver] all iterations passed" \
    "${torchrun[@]}" --nproc_per_node=2 tests/test_engine_write_compress.py --iters 8
  run engine_nvlink_metadata "=== All UCCL P2P Engine tests completed! ===" \
    "${torchrun[@]}" --nproc_per_node=2 tests/test_engine_nvlink_metadata.py
  run gpu_index_mapping_gpu "=== Results: 4/4 passed ===" "$PYTHON" tests/test_gpu_index_mapping.py
  for variant in "" "--num-iovs 128" "--async-api" "--mode read" "--device cpu --pinned"; do
    # shellcheck disable=SC2086 # the variant's words are separate arguments
    run "benchmark_uccl${variant:+_$(tr -c 'a-z0-9\n' '_' <<<"${variant#--}")}" "[Client] Benchmark complete" \
      "${torchrun[@]}" --nproc_per_node=2 benchmarks/benchmark_uccl.py --local-gpu-idx 0 $variant
  done
fi

if [[ "$what" == gpu2 ]]; then
  run engine_onesided_ipc "All one-sided IPC tests passed!" \
    "${torchrun[@]}" --nproc_per_node=2 tests/test_engine_onesided_ipc.py
  run engine_nvlink "All local IPC tests passed!" \
    "${torchrun[@]}" --nproc_per_node=2 tests/test_engine_nvlink.py
  # In full: with two GPUs none of its cases may skip.
  run gpu_index_mapping_two_gpus "=== Results: 4/4 passed ===
!SKIP" "$PYTHON" tests/test_gpu_index_mapping.py
  for op in write read; do
    run "benchmark_uccl_${op}_ipc" "[Client] ${op}_ipc benchmark complete
[Server] ${op}_ipc benchmark complete" \
      "${torchrun[@]}" --nproc_per_node=2 benchmarks/benchmark_uccl.py "--${op}-ipc"
  done
fi

echo "UCCL's tests over uccl-tcpx: $passed passed, $failed failed"
((failed == 0))
