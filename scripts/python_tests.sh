#!/usr/bin/env bash
# Builds the Python wheel (python/, maturin installed by pip into a fresh virtual environment),
# installs it into another fresh virtual environment with pytest and numpy, and runs the package's
# suite there, then the Python snippets of README.md and docs/ (scripts/doc_snippets.py --suite
# python: read from the pages, run as written). Needs only cargo and python3 with pip; everything else comes from PyPI.
#
#   scripts/python_tests.sh [PYTEST_ARGS...]
#
# The wheel is left in target/python-wheels/. PYTHON picks the interpreter (default python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
work="$repo/target/python-tests"
wheels="$repo/target/python-wheels"

# A fresh environment: `venv`, or where the distribution ships Python without it (Debian's
# python3 without python3-venv), `virtualenv` from PyPI.
fresh_venv() {
  local dir="$1"
  rm -rf "$dir"
  if ! "$python" -m venv "$dir" 2>/dev/null; then
    rm -rf "$dir"
    "$python" -m pip install --quiet --user virtualenv 2>/dev/null ||
      "$python" -m pip install --quiet --user --break-system-packages virtualenv
    "$python" -m virtualenv --quiet "$dir"
  fi
  "$dir/bin/python" -m pip install --quiet --upgrade pip
}

echo "=== Python: building the wheel ==="
fresh_venv "$work/build-env"
"$work/build-env/bin/python" -m pip install --quiet "maturin>=1.9.4,<2"
rm -rf "$wheels"
# The extension's own target directory: its build settings are maturin's, not the workspace's.
(cd python && CARGO_TARGET_DIR="$repo/target/python-ext" \
  "$work/build-env/bin/maturin" build --release --locked --out "$wheels")
wheel="$(ls "$wheels"/uccl_tcpx-*.whl)"
echo "built $wheel"

# The fake NIC stands in for Google's TCPX plugin in the doctor's fake machines (tests/test_doctor.py).
cargo build --locked -p fake-tcpx
export UCCL_TCPX_FAKE_PLUGIN="${CARGO_TARGET_DIR:-$repo/target}/debug/libfake_tcpx.so"

echo "=== Python: the package's suite ==="
fresh_venv "$work/test-env"
"$work/test-env/bin/python" -m pip install --quiet "$wheel" pytest numpy
# From outside python/, so that `uccl_tcpx` is the installed package, not the source folder.
cd "$work"
"$work/test-env/bin/python" -m pytest -p no:cacheprovider -q "$repo/python/tests" "$@"

echo "=== Python: the snippets of README.md and docs/ ==="
"$work/test-env/bin/python" "$repo/scripts/doc_snippets.py" --suite python --python "$work/test-env/bin/python"
