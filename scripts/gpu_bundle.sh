#!/usr/bin/env bash
# Builds everything the GPU suite needs into one folder that can be copied to a GPU host without a
# Rust toolchain: release test binaries (stripped), the fake devmem NIC, the benchmarks.
#
#   scripts/gpu_bundle.sh OUT_DIR
#
# Then, on the GPU host: scripts/gpu_tests.sh OUT_DIR (and scripts/gpu_bench.sh OUT_DIR/uccl-tcpx-bench).
# The folder also carries the NCCL-over-the-fake test (nccl_over_fake.sh and its Python driver).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: scripts/gpu_bundle.sh OUT_DIR}"
mkdir -p "$out"

cargo build --release --locked -p fake-tcpx
cargo build --release --locked -p uccl-tcpx-bench --bins
cargo build --release --locked --example gpu_staging_bw
cp target/release/libfake_tcpx.so target/release/uccl-tcpx-bench target/release/unpack_bench target/release/pieces_bench \
  target/release/examples/gpu_staging_bw "$out/"
# NCCL over the fake (scripts/gpu_tests.sh runs it from the bundle on a 2-GPU host with PyTorch).
cp scripts/nccl_over_fake.sh scripts/nccl_over_fake.py "$out/"

# Test binaries: every GPU test, the fake NIC's GPU tests (its TCPXO mode's among them), and the
# library's unit tests (which hold the CUDA and staging unit tests); cargo prints each executable
# in its JSON messages, and the errors of a test that does not build, which end the script before
# anything is copied (a stale binary of it would otherwise stay in the folder).
bundle_tests() {
  cargo test --release --locked --no-run --message-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
    elif m.get("reason") == "compiler-message" and m["message"]["level"] == "error":
        print(m["message"]["rendered"], file=sys.stderr)'
}
built="$(
  bundle_tests -p uccl-tcpx --lib --test gpu_staging --test gpu_engine --test gpu_ipc --test gpu_send_ipc --test gpu_unpack --test plugin_gpu &&
    bundle_tests -p fake-tcpx --test gpu --test gpu_busy --test tcpxo
)" || { echo "gpu_bundle: a test did not build (above); nothing copied" >&2; exit 1; }
while read -r name exe; do
  dest="$out/test-$name"
  [[ "$name" == uccl_tcpx ]] && dest="$out/test-lib"
  [[ "$name" == gpu ]] && dest="$out/test-fake-gpu"
  [[ "$name" == gpu_busy ]] && dest="$out/test-fake-gpu-busy"
  cp "$exe" "$dest"
done <<<"$built"
strip "$out"/test-* "$out"/*.so "$out"/uccl-tcpx-bench "$out"/unpack_bench "$out"/pieces_bench "$out"/gpu_staging_bw 2>/dev/null || true
ls -la "$out"
