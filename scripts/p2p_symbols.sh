#!/usr/bin/env bash
# Checks that our libuccl_p2p.so defines every uccl_engine_* symbol that UCCL's released
# libuccl_p2p.so defines, so that a binary built against UCCL loads ours unchanged.
#
# UCCL's library comes from the `uccl` wheel on PyPI (uccl/lib/libuccl_p2p.so), fetched with pip.
# When the package registry cannot be reached the check prints a SKIPPED line and exits 0; when it
# can, a missing symbol (or a wheel that does not download or holds no such symbols) fails.
# That the exported functions work is c_tests/p2p_abi.cpp's job (ctest, in scripts/c_tests.sh).
#
# usage: scripts/p2p_symbols.sh [LIBDIR]
#   LIBDIR: the installed lib/ holding our libuccl_p2p.so (default: target/cmake-stage/lib, where
#           scripts/c_tests.sh installs the package)
# Env: UCCL_WHEEL_VERSION (default 0.1.1). Needs python3 with pip, nm and c++filt (binutils).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
libdir="${1:-$repo/target/cmake-stage/lib}"
version="${UCCL_WHEEL_VERSION:-0.1.1}"
ours="$libdir/libuccl_p2p.so"
work="$repo/target/uccl-wheel/$version"

if [[ ! -f "$ours" ]]; then
  echo "error: $ours not found (run scripts/c_tests.sh or cmake/install.sh first)" >&2
  exit 1
fi
for tool in python3 nm c++filt; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: $tool is required" >&2
    exit 1
  fi
done
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "error: pip is required (python3 -m pip)" >&2
  exit 1
fi

mkdir -p "$work"
wheel="$(find "$work" -maxdepth 1 -name "uccl-$version-*.whl" -print -quit)"
if [[ -z "$wheel" ]]; then
  log="$work/pip-download.log"
  # The wheel is built for CPython 3.12 (abi3) on manylinux_2_35 x86-64; asking for that platform
  # makes the download independent of this machine's Python and glibc. --no-deps: only the file.
  if ! python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64 \
    --retries 2 --timeout 30 -d "$work" "uccl==$version" >"$log" 2>&1; then
    # pip reports an unreachable index as "no matching distribution" after its retries; the
    # connection errors it logged on the way tell the two apart.
    if grep -Eqi 'NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|Network is unreachable|Connection refused|ConnectTimeoutError|Read timed out|ProxyError|Max retries exceeded' "$log"; then
      echo "SKIPPED: p2p symbol check: the package registry is unreachable, so UCCL's uccl==$version wheel could not be fetched ($(grep -Ei -m1 'error|retrying' "$log" | cut -c1-160))"
      exit 0
    fi
    cat "$log" >&2
    echo "error: pip could not download uccl==$version although the registry answered" >&2
    exit 1
  fi
  wheel="$(find "$work" -maxdepth 1 -name "uccl-$version-*.whl" -print -quit)"
  if [[ -z "$wheel" ]]; then
    echo "error: pip reported success but no uccl-$version wheel is in $work" >&2
    exit 1
  fi
fi

theirs="$work/libuccl_p2p.so"
python3 - "$wheel" "$theirs" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    try:
        data = z.read("uccl/lib/libuccl_p2p.so")
    except KeyError:
        sys.exit(f"error: {wheel} has no uccl/lib/libuccl_p2p.so")
with open(out, "wb") as f:
    f.write(data)
EOF

# Defined dynamic symbols whose (mangled) name mentions uccl_engine_: "addr type name".
defined() { nm -D --defined-only "$1" | awk '$3 ~ /uccl_engine_/ { print $3 }' | sort -u; }
mapfile -t want < <(defined "$theirs")
if ((${#want[@]} == 0)); then
  echo "error: UCCL's libuccl_p2p.so ($wheel) defines no uccl_engine_* symbol; nm -D said:" >&2
  nm -D --defined-only "$theirs" | head -20 >&2
  exit 1
fi
have="$(defined "$ours")"

missing=0
for sym in "${want[@]}"; do
  if grep -qxF -- "$sym" <<<"$have"; then
    echo "  ok       $(c++filt <<<"$sym")"
  else
    echo "  MISSING  $(c++filt <<<"$sym")   [$sym]"
    missing=$((missing + 1))
  fi
done
if ((missing > 0)); then
  echo "p2p symbols: $missing of UCCL $version's ${#want[@]} uccl_engine_* symbols are not defined by $ours: FAILED" >&2
  exit 1
fi
echo "p2p symbols: all ${#want[@]} uccl_engine_* symbols of UCCL $version's libuccl_p2p.so are defined by ours: PASSED"
