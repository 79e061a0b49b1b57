#!/usr/bin/env bash
# The TCPX NIXL plugin against the stock NIXL wheel from PyPI, over host memory, on one machine.
#
# Builds and installs uccl-tcpx with its plugin (cmake/install.sh), makes a virtual environment with
# nixl-cuNN==VERSION and NIXL's `nixl` package of that version (both --no-deps: host memory needs no
# torch) and numpy, as README.md has a user do, checks that
# uccl-tcpx-nixl-plugin-dir refuses a NIXL version without a plugin, makes the plugin folder with
# it, and runs scripts/nixl_plugin_tests.py: two agents in two processes (WRITE and READ of 4 KiB,
# 1 MiB and 64 MiB as 1, 4 and 16 descriptors, notifications, bytes checked; random KV block tables
# through prepared lists, 1 to 100,000 blocks of odd sizes; a 6 GiB sparse registration reached
# across its windows; a stopped and then a dead peer), an agent to itself,
# three agents in one process each getting only its own notifications, bad input, a request
# released in flight, backend options (auth key file, channels); then the NIXL snippets of README.md
# and docs/ that run on host memory (scripts/doc_snippets.py --suite nixl). About a minute after the
# build.
#
# usage: scripts/nixl_plugin_tests.sh [--nixl VERSION] [--cuda 12|13] [--unsupported]
#   --nixl VERSION  the NIXL wheel to test against (default 1.4.0, the version the plugin is built for)
#   --unsupported   run the plugin against a NIXL version it is not built for (to find out whether
#                   that version keeps the layout); without it such a version stops at the refusal,
#                   exit status 3
# env: NIXL_PLUGIN_TESTS_DIR  work directory (default target/nixl-plugin)
# Needs cargo, cmake, g++ (C++20), python3 with venv and pip, and PyPI.
set -euo pipefail

nixl_version=1.4.0
cuda=12
unsupported=0
while [[ $# -gt 0 ]]; do
  case "$1" in
  --nixl) nixl_version="$2"; shift 2 ;;
  --cuda) cuda="$2"; shift 2 ;;
  --unsupported) unsupported=1; shift ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(realpath -m -- "${NIXL_PLUGIN_TESTS_DIR:-$repo/target/nixl-plugin}")"
prefix="$work/prefix"
venv="$work/venv-nixl-cu$cuda-$nixl_version"
mkdir -p "$work"

echo "== build and install uccl-tcpx with its NIXL plugin into $prefix"
"$repo/cmake/install.sh" "$prefix" "$work/cmake-build" >"$work/install.log" 2>&1 ||
  { tail -n 40 "$work/install.log"; echo "nixl_plugin_tests: the build failed ($work/install.log)" >&2; exit 1; }
plugin_dir_cmd="$prefix/bin/uccl-tcpx-nixl-plugin-dir"
[[ -x "$plugin_dir_cmd" ]] || { echo "nixl_plugin_tests: $plugin_dir_cmd was not installed" >&2; exit 1; }
# Exported are NIXL's two entry points and nothing else.
exported="$(nm -D --defined-only "$prefix"/lib/uccl-tcpx/nixl/*/libplugin_TCPX.so | awk '$2 ~ /^[TDB]$/ {print $3}' | sort -u | tr '\n' ' ')"
[[ "$exported" == "nixl_plugin_fini nixl_plugin_init " ]] ||
  { echo "nixl_plugin_tests: the plugin exports: $exported" >&2; exit 1; }

echo "== nixl-cu$cuda $nixl_version, nixl $nixl_version and numpy into $venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check numpy
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "nixl-cu$cuda==$nixl_version" "nixl==$nixl_version"

echo "== the folder command refuses a NIXL version it has no plugin for"
fake="$work/fake-root"
rm -rf "$fake" && mkdir -p "$fake/0.0.1" && touch "$fake/0.0.1/libplugin_TCPX.so"
if out="$("$plugin_dir_cmd" --python "$venv/bin/python" --plugin-root "$fake" 2>&1)"; then
  echo "nixl_plugin_tests: NIXL $nixl_version was accepted for a plugin built for 0.0.1: $out" >&2
  exit 1
fi
grep -q "built for NIXL 0.0.1 only" <<<"$out" ||
  { echo "nixl_plugin_tests: the refusal does not name the supported version: $out" >&2; exit 1; }
echo "refused: $out"

echo "== the plugin folder"
if ! plugin_dir="$("$plugin_dir_cmd" --python "$venv/bin/python" --out "$work/plugins-$nixl_version")"; then
  if [[ "$unsupported" == 0 ]]; then
    echo "nixl_plugin_tests: NIXL $nixl_version is refused (above); --unsupported runs the plugin anyway" >&2
    exit 3
  fi
  # The installed plugin under the version found, to see whether that NIXL keeps the layout.
  root="$work/unsupported-root"
  rm -rf "$root" && mkdir -p "$root/$nixl_version"
  ln -s "$(ls "$prefix"/lib/uccl-tcpx/nixl/*/libplugin_TCPX.so | head -n 1)" "$root/$nixl_version/libplugin_TCPX.so"
  ln -s "$prefix/lib/libuccl_tcpx.so.0" "$root/$nixl_version/libuccl_tcpx.so.0"
  plugin_dir="$("$plugin_dir_cmd" --python "$venv/bin/python" --plugin-root "$root" --out "$work/plugins-$nixl_version")"
  echo "running a plugin built for another NIXL version against $nixl_version"
fi
echo "NIXL_PLUGIN_DIR=$plugin_dir"
ls "$plugin_dir"

echo "== tests"
cd "$work"
NIXL_PLUGIN_DIR="$plugin_dir" timeout 600 "$venv/bin/python" "$repo/scripts/nixl_plugin_tests.py"

echo "== the NIXL snippets of README.md and docs/, host memory"
NIXL_PLUGIN_DIR="$plugin_dir" "$venv/bin/python" "$repo/scripts/doc_snippets.py" --suite nixl --python "$venv/bin/python"
