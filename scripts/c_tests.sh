#!/usr/bin/env bash
# Builds the library, installs it through the CMake package (cmake/install.sh), and runs the C and
# C++ suite against the installed package twice: linked to the shared library and to the static
# archive.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

stage="$repo/target/cmake-stage"
pkg_build="$repo/target/cmake-build"
tests_build="$repo/target/c_tests-build"
jobs="$(nproc 2>/dev/null || echo 2)"

# The install tree the suite consumes comes from the same one command users run. A stale stage
# could hide a file the install step no longer produces.
rm -rf "$stage"
cmake/install.sh "$stage" "$pkg_build"

# Called from an `||` list so that a failing shared run still lets the static run happen; errexit
# is suspended there, hence the explicit `|| return 1` on every step.
run_suite() {
  local variant="$1" use_static="$2"
  local dir="$tests_build/$variant"
  echo "=== C/C++ tests: $variant ==="
  cmake -S c_tests -B "$dir" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$stage" \
    -DUCCL_TCPX_USE_STATIC="$use_static" || return 1
  cmake --build "$dir" -j "$jobs" || return 1

  # Make sure each variant really links the way it claims to; otherwise the two runs could
  # silently test the same thing.
  if command -v readelf >/dev/null 2>&1; then
    local exe needed checked=0
    for exe in "$dir"/test_* "$dir"/header_*; do
      [[ -x "$exe" && -f "$exe" ]] || continue
      checked=$((checked + 1))
      needed="$(readelf -d "$exe" | grep -c 'NEEDED.*\[libuccl_tcpx\.so\.0\]' || true)"
      if [[ "$use_static" == ON && "$needed" != 0 ]]; then
        echo "error: $exe depends on libuccl_tcpx.so.0 in the static build" >&2
        return 1
      fi
      if [[ "$use_static" == OFF && "$needed" == 0 ]]; then
        echo "error: $exe does not depend on libuccl_tcpx.so.0 in the shared build" >&2
        return 1
      fi
    done
    if ((checked == 0)); then
      echo "error: no test executables found in $dir" >&2
      return 1
    fi
  fi

  (cd "$dir" && ctest --output-on-failure -j2) || return 1
}

status=0
run_suite shared OFF || { echo "=== C/C++ tests: shared FAILED ===" >&2; status=1; }
run_suite static ON || { echo "=== C/C++ tests: static FAILED ===" >&2; status=1; }
exit "$status"
