#!/usr/bin/env bash
# Runs the GPU test suite from a folder made by scripts/gpu_bundle.sh, on a host with a CUDA driver.
# Every binary runs even if an earlier one failed; the exit status says whether all passed.
#
#   scripts/gpu_tests.sh BUNDLE_DIR
set -uo pipefail
bundle="$(cd "${1:?usage: scripts/gpu_tests.sh BUNDLE_DIR}" && pwd)"
export UCCL_TCPX_FAKE_PLUGIN="$bundle/libfake_tcpx.so"
# Here a GPU test that finds no CUDA driver fails instead of printing SKIPPED and passing.
export UCCL_TCPX_REQUIRE_GPU=1
nvidia-smi -L || true
failed=()
for t in "$bundle"/test-*; do
  name="$(basename "$t")"
  echo "======== $name"
  if ! "$t" --test-threads=1 2>&1; then
    failed+=("$name")
  fi
done
if ((${#failed[@]})); then
  echo "GPU suite: FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU suite: all passed"
