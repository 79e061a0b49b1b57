#!/usr/bin/env bash
# Copies this machine's `perf` with every shared library it needs (and the dynamic loader) into
# OUT_DIR, for hosts that lack perf: run it there as OUT_DIR/perf.sh (the loader is invoked
# directly, so the bundled glibc is used whatever the host has). The kernel must allow perf events.
#
#   scripts/diag/perf_bundle.sh OUT_DIR
set -euo pipefail
out="${1:?usage: scripts/diag/perf_bundle.sh OUT_DIR}"
perf="$(readlink -f "$(command -v perf)")"
mkdir -p "$out/lib"
cp "$perf" "$out/perf.bin"
ldd "$perf" | awk '/=>/ { print $3 }' | while read -r lib; do cp -L "$lib" "$out/lib/"; done
cp -L /lib64/ld-linux-x86-64.so.2 "$out/lib/"
cat >"$out/perf.sh" <<'WRAP'
#!/bin/bash
D="$(cd "$(dirname "$0")" && pwd)"
exec "$D/lib/ld-linux-x86-64.so.2" --library-path "$D/lib" "$D/perf.bin" "$@"
WRAP
chmod +x "$out/perf.sh"
du -sh "$out"
