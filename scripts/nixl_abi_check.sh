#!/usr/bin/env bash
# Checks nixl/nixl_abi.h, this project's declaration of NIXL's backend interface, against the
# headers of a NIXL source tree (ai-dynamo/nixl): sizes, alignments and member offsets of the
# classes a backend shares with NIXL, the slot of every virtual function of nixlBackendEngine, and
# NIXL's own inline accessors reading an engine our declaration built (nixl/abi_check/). Needs g++
# (C++20) and the tree, nothing else: NIXL's logging header, which needs abseil, is stood in for.
#
# usage: scripts/nixl_abi_check.sh NIXL_SRC
# Exit status 0 when everything matches and the tree's version is one the header names.
set -euo pipefail
[[ $# -eq 1 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$(realpath -- "$1")"
for d in src/api/cpp/backend src/utils/common src/core/telemetry; do
  [[ -d "$src/$d" ]] || { echo "nixl_abi_check: $src has no $d: not a NIXL source tree" >&2; exit 1; }
done
version="$(sed -n "s/^project('nixl'.*version: *'\([^']*\)'.*/\1/p" "$src/meson.build" | head -n 1)"
supported="$(sed -n 's/^#define UCCL_TCPX_NIXL_VERSIONS "\(.*\)"/\1/p' "$repo/nixl/nixl_abi.h")"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# NIXL's headers as system headers: their own warnings are not this check's business.
g++ -std=c++20 -Wall -Wextra -Werror -Wno-invalid-offsetof \
  -I "$repo/nixl/abi_check" -isystem "$src/src/api/cpp" -isystem "$src/src/api/cpp/backend" \
  -isystem "$src/src/utils" -isystem "$src/src/core/telemetry" -I "$repo/nixl" \
  "$repo/nixl/abi_check/abi_check.cpp" -o "$out/abi_check"
"$out/abi_check"
case " $supported " in
*" $version "*) echo "NIXL $version is among the versions nixl_abi.h names ($supported)" ;;
*)
  echo "nixl_abi_check: the tree is NIXL $version; nixl_abi.h names $supported: add it there only if this check passes" >&2
  exit 1
  ;;
esac
