#!/usr/bin/env bash
# Every test: Rust unit and integration tests, lints, the checked-in header against cbindgen,
# the C suite (shared and static) through the installed CMake package, libuccl_p2p.so's symbols
# against UCCL's released library, the C suite again under ASan+UBSan and valgrind, the Python
# package's suite on its built wheel, and the NIXL plugin against NIXL's own wheels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The plugin tests load the fake devmem NIC from target/<profile>/libfake_tcpx.so.
cargo build -p fake-tcpx --locked
cargo test --workspace --locked

if command -v cbindgen >/dev/null 2>&1; then
  fresh="$(mktemp)"
  trap 'rm -f "$fresh"' EXIT
  cbindgen --config cbindgen.toml --quiet --output "$fresh" .
  if ! diff -u include/uccl_engine.h "$fresh"; then
    echo "include/uccl_engine.h is stale: run cbindgen --config cbindgen.toml --output include/uccl_engine.h" >&2
    exit 1
  fi
else
  echo "cbindgen not installed: header freshness not checked (.ci/run installs it)" >&2
fi

scripts/c_tests.sh
# The installed libuccl_p2p.so against UCCL's released one (its wheel, from PyPI): every
# uccl_engine_* symbol UCCL defines must be defined by ours. Prints SKIPPED when PyPI is unreachable.
scripts/p2p_symbols.sh "$PWD/target/cmake-stage/lib"
scripts/sanitize.sh
scripts/python_tests.sh
# The NIXL plugin against the stock nixl-cu12 wheels from PyPI: as the Python wheel just built
# installs it, for each NIXL version it is built for; and as cmake/install.sh installs it.
# The newer one also runs the real-model example on the CPU (examples/disaggregated).
for nixl in 1.4.0 1.5.1; do
  scripts/nixl_plugin_tests.sh --nixl "$nixl" --wheel "$(ls target/python-wheels/uccl_tcpx-*.whl)" \
    $([[ $nixl == 1.5.1 ]] && echo --example)
done
scripts/nixl_plugin_tests.sh
