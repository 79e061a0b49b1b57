#!/usr/bin/env bash
# Runs the C/C++ suite (c_tests/) against the installed package under two memory checkers:
#   1. AddressSanitizer + UndefinedBehaviorSanitizer (with LeakSanitizer): the test programs are
#      built with -fsanitize=address,undefined and run through ctest, linked to the shared library
#      and to the static archive. The Rust library itself is not instrumented, but every allocation
#      it makes and every memcpy/memmove/memset it calls go through ASan's interceptors, and
#      LeakSanitizer sees its leaks at exit.
#   2. Valgrind memcheck: the same programs built normally (shared library), each run under
#      valgrind --error-exitcode, reporting invalid accesses, uninitialised reads and definite leaks.
# Exit status: 0 when both passes are clean, 1 otherwise. Run by scripts/test_all.sh (about 70 s); see
# docs/TESTING.md for the figures of the last run.
#
# usage: scripts/sanitize.sh [asan|valgrind|all]     (default: all)
# Needs cargo, cmake, a C/C++ compiler with sanitizer runtimes (gcc: libasan, libubsan) and valgrind.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mode="${1:-all}"
case "$mode" in
  asan | valgrind | all) ;;
  *)
    echo "usage: $0 [asan|valgrind|all]" >&2
    exit 2
    ;;
esac

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
stage="$target_dir/sanitize-stage"
pkg_build="$target_dir/sanitize-pkg-build"
builds="$target_dir/sanitize-build"
jobs="$(nproc 2>/dev/null || echo 2)"

# Under valgrind everything runs ~20-50x slower: give connection setup and the stalled-peer
# watchdog room so that slowness is not mistaken for a dead peer.
export UCCL_TCPX_CONNECT_TIMEOUT_MS="${UCCL_TCPX_CONNECT_TIMEOUT_MS:-120000}"
export UCCL_TCPX_TIMEOUT_MS="${UCCL_TCPX_TIMEOUT_MS:-300000}"

install_package() {
  rm -rf "$stage"
  if [[ -x cmake/install.sh ]]; then
    cmake/install.sh "$stage" "$pkg_build"
  else
    local locked=()
    [[ -f Cargo.lock ]] && locked=(--locked)
    cargo build --release ${locked[@]+"${locked[@]}"} -p uccl-tcpx
    rm -rf "$pkg_build"
    cmake -S cmake -B "$pkg_build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$stage" \
      -DUCCL_TCPX_ARTIFACT_DIR="$target_dir/release" -DUCCL_TCPX_INCLUDE_DIR="$repo/include"
    cmake --build "$pkg_build"
    cmake --install "$pkg_build"
  fi
}

# configure_suite DIR USE_STATIC [extra compile/link flags]
configure_suite() {
  local dir="$1" use_static="$2" flags="${3:-}"
  rm -rf "$dir"
  cmake -S c_tests -B "$dir" \
    -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_PREFIX_PATH="$stage" \
    -DUCCL_TCPX_USE_STATIC="$use_static" \
    -DCMAKE_C_FLAGS="-g -O1 $flags" \
    -DCMAKE_CXX_FLAGS="-g -O1 $flags" \
    -DCMAKE_EXE_LINKER_FLAGS="$flags"
  cmake --build "$dir" -j "$jobs"
}

# The test programs of a build directory (ctest also runs CMake-script checks; those are skipped).
programs() {
  local dir="$1" exe
  for exe in "$dir"/test_* "$dir"/header_* "$dir"/p2p_*; do
    [[ -f "$exe" && -x "$exe" ]] && echo "$exe"
  done
}

status=0
summary=()

run_asan() {
  local san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  local variant use_static dir start
  for variant in shared static; do
    use_static=OFF
    [[ "$variant" == static ]] && use_static=ON
    dir="$builds/asan-$variant"
    echo "=== ASan+UBSan: $variant ==="
    start=$SECONDS
    if configure_suite "$dir" "$use_static" "$san" && (cd "$dir" && ctest --output-on-failure -j2); then
      summary+=("asan+ubsan $variant: clean ($((SECONDS - start)) s)")
    else
      summary+=("asan+ubsan $variant: FAILED")
      status=1
    fi
  done
  unset ASAN_OPTIONS UBSAN_OPTIONS
}

run_valgrind() {
  if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind is not installed" >&2
    summary+=("valgrind: not installed")
    status=1
    return
  fi
  local dir="$builds/valgrind" exe name log start failed=0 count=0
  echo "=== valgrind memcheck: shared ==="
  start=$SECONDS
  configure_suite "$dir" OFF ""
  mkdir -p "$dir/valgrind-logs"
  while read -r exe; do
    name="$(basename "$exe")"
    log="$dir/valgrind-logs/$name.log"
    count=$((count + 1))
    # Definite leaks and every memory error fail the run (exit 99); Rust's process-lifetime statics
    # (the notification queue, thread-locals) show up as "still reachable" and are not errors.
    # Valgrind runs one thread at a time; --fair-sched keeps a test's busy-polling thread from
    # starving the engine's threads (without it, polling loops hit their deadlines).
    local rc=0
    (cd "$dir" && timeout 1800 valgrind --tool=memcheck --fair-sched=yes --error-exitcode=99 \
      --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite --track-origins=yes \
      --log-file="$log" "$exe" >"$log.out" 2>&1) || rc=$?
    local errors
    errors="$(grep -h 'ERROR SUMMARY' "$log" 2>/dev/null | tail -n 1 | sed 's/^==[0-9]*== //')"
    if ((rc == 0)); then
      echo "  $name: clean ($errors)"
    elif ((rc == 99)); then
      echo "  $name: MEMCHECK ERRORS ($errors, see $log)" >&2
      tail -n 60 "$log" >&2 || true
      failed=$((failed + 1))
    else
      echo "  $name: the program failed under valgrind (exit $rc; $errors; see $log.out)" >&2
      tail -n 20 "$log.out" >&2 || true
      failed=$((failed + 1))
    fi
  done < <(programs "$dir")
  if ((count == 0)); then
    summary+=("valgrind: no test programs found")
    status=1
  elif ((failed == 0)); then
    summary+=("valgrind memcheck: $count programs clean ($((SECONDS - start)) s)")
  else
    summary+=("valgrind memcheck: $failed of $count programs FAILED")
    status=1
  fi
}

install_package
[[ "$mode" == asan || "$mode" == all ]] && run_asan
[[ "$mode" == valgrind || "$mode" == all ]] && run_valgrind

echo "=== summary ==="
printf '  %s\n' "${summary[@]}"
exit "$status"
