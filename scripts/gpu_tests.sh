#!/usr/bin/env bash
# Runs the GPU test suite from a folder made by scripts/gpu_bundle.sh, on a host with a CUDA driver:
# every test binary, the piece copier between two GPUs (on 2+ GPUs), then NCCL over the fake NIC
# (nccl_over_fake.sh: a GPU and PyTorch; on a host with no GPU it reports itself skipped).
# Everything runs even if an earlier step failed; the exit status says whether all passed.
#
#   scripts/gpu_tests.sh BUNDLE_DIR
set -uo pipefail
bundle="$(cd "${1:?usage: scripts/gpu_tests.sh BUNDLE_DIR}" && pwd)"
# From the repository root, wherever it is started. The test binaries need no source tree: what
# they read of it (docs/CONFIG.md, the sources' environment reads, scripts/diag/) was embedded when
# they were built.
scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$scripts/.."
export UCCL_TCPX_FAKE_PLUGIN="$bundle/libfake_tcpx.so"
# Here a GPU test that finds no CUDA driver fails instead of printing SKIPPED and passing.
export UCCL_TCPX_REQUIRE_GPU=1
nvidia-smi -L || true
shopt -s nullglob
tests=("$bundle"/test-*)
if ((${#tests[@]} == 0)); then
  echo "GPU suite: no test binaries (test-*) in $bundle: make it with scripts/gpu_bundle.sh" >&2
  exit 1
fi
failed=()
for t in "${tests[@]}"; do
  name="$(basename "$t")"
  echo "======== $name"
  if ! "$t" --test-threads=1 2>&1; then
    failed+=("$name")
  fi
done
skipped=()
# The piece copier between two GPUs, its side stream and lists included (8,192 pieces: three
# launches), in one process and through CUDA IPC: every layout's bytes are checked first.
echo "======== pieces-two-gpus"
if (($(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l) >= 2)); then
  for ipc in "" --ipc; do
    "$bundle/pieces_bench" --pieces 8192 --blocks 16384 --reps 1 $ipc 2>&1 || failed+=("pieces_bench${ipc:+ $ipc}")
  done
else
  skipped+=(pieces-two-gpus)
fi
echo "======== nccl-over-fake"
nccl_test="$bundle/nccl_over_fake.sh"
[[ -f "$nccl_test" ]] || nccl_test="$scripts/nccl_over_fake.sh"
bash "$nccl_test" "$bundle"
case $? in
  0) ;;
  77) skipped+=(nccl-over-fake) ;;
  *) failed+=(nccl-over-fake) ;;
esac
((${#skipped[@]})) && echo "GPU suite: skipped on this host: ${skipped[*]}"
if ((${#failed[@]})); then
  echo "GPU suite: FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU suite: all passed"
