#!/usr/bin/env bash
# The TCPX NIXL plugin against the stock NIXL wheel from PyPI, over host memory, on one machine.
#
# Builds and installs uccl-tcpx with its plugin (cmake/install.sh), or with --wheel installs the
# Python wheel (which carries the plugin) into the virtual environment instead; makes a virtual
# environment with nixl-cuNN==VERSION and NIXL's `nixl` package of that version (both --no-deps:
# host memory needs no torch) and numpy, as README.md has a user do, checks that
# uccl-tcpx-nixl-plugin-dir refuses a NIXL version without a plugin, makes the plugin folder with
# it, and runs scripts/nixl_plugin_tests.py: two agents in two processes (WRITE and READ of 4 KiB,
# 1 MiB and 64 MiB as 1, 4 and 16 descriptors, notifications, bytes checked; random KV block tables
# through prepared lists, 1 to 100,000 blocks of odd sizes, a handle posted twice; a 6 GiB sparse
# registration reached across its windows; a stopped and then a dead peer), an agent to itself,
# three agents in one process each getting only its own notifications, bad input, a request
# released in flight, backend options (auth key file, channels, connect_on_load: connected before
# the first request or at it), each request's calls counted under UCCL_TCPX_NIXL_CALL_TIMES (and
# released requests' lists kept, eight at most); then the NIXL snippets of README.md and docs/ that
# run on host memory (scripts/doc_snippets.py --suite nixl). About a minute after the build.
#
# usage: scripts/nixl_plugin_tests.sh [--nixl VERSION] [--cuda 12|13] [--wheel WHEEL] [--unsupported]
#                                     [--example]
#   --nixl VERSION  the NIXL wheel to test against (default 1.4.0, the version the plugin is built for)
#   --wheel WHEEL   test the plugin the Python wheel installs (scripts/python_tests.sh builds it into
#                   target/python-wheels/), found through its `uccl-tcpx-nixl-plugin-dir` console
#                   command, with no LD_LIBRARY_PATH: what `pip install uccl-tcpx` gives a user
#   --unsupported   run the plugin against a NIXL version it is not built for (to find out whether
#                   that version keeps the layout); without it such a version stops at the refusal,
#                   exit status 3
#   --example       also run examples/disaggregated on the CPU (a tiny Llama model, prefill and
#                   decode processes, tokens checked): installs torch and transformers into the
#                   environment first (about 3 GB from PyPI, a minute or two) and removes them after
# env: NIXL_PLUGIN_TESTS_DIR  work directory (default target/nixl-plugin)
# Needs cargo, cmake, g++ (C++20), python3 with venv and pip, and PyPI.
set -euo pipefail

nixl_version=1.4.0
cuda=12
unsupported=0
example=0
wheel=
while [[ $# -gt 0 ]]; do
  case "$1" in
  --nixl) nixl_version="$2"; shift 2 ;;
  --cuda) cuda="$2"; shift 2 ;;
  --wheel) wheel="$(realpath -- "$2")"; shift 2 ;;
  --unsupported) unsupported=1; shift ;;
  --example) example=1; shift ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(realpath -m -- "${NIXL_PLUGIN_TESTS_DIR:-$repo/target/nixl-plugin}")"
prefix="$work/prefix"
venv="$work/venv-nixl-cu$cuda-$nixl_version${wheel:+-wheel}"
mkdir -p "$work"

if [[ -n "$wheel" ]]; then
  # A fresh environment, so that only what this wheel installs is there.
  rm -rf "$venv"
  python3 -m venv "$venv"
  echo "== $(basename "$wheel") into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
  plugin_dir_cmd="$venv/bin/uccl-tcpx-nixl-plugin-dir"
  plugins=("$venv"/lib/python3*/site-packages/uccl_tcpx/lib/nixl/*/libplugin_TCPX.so)
  engine_lib="$(dirname "${plugins[0]}")/../../libuccl_tcpx.so.0"
  # Nothing but the wheel may supply the engine library.
  unset LD_LIBRARY_PATH
else
  echo "== build and install uccl-tcpx with its NIXL plugin into $prefix"
  "$repo/cmake/install.sh" "$prefix" "$work/cmake-build" >"$work/install.log" 2>&1 ||
    { tail -n 40 "$work/install.log"; echo "nixl_plugin_tests: the build failed ($work/install.log)" >&2; exit 1; }
  plugin_dir_cmd="$prefix/bin/uccl-tcpx-nixl-plugin-dir"
  plugins=("$prefix"/lib/uccl-tcpx/nixl/*/libplugin_TCPX.so)
  engine_lib="$prefix/lib/libuccl_tcpx.so.0"
fi
[[ -x "$plugin_dir_cmd" ]] || { echo "nixl_plugin_tests: $plugin_dir_cmd was not installed" >&2; exit 1; }
[[ -f "${plugins[0]}" ]] || { echo "nixl_plugin_tests: no libplugin_TCPX.so was installed" >&2; exit 1; }
# Exported are NIXL's two entry points and nothing else.
exported="$(nm -D --defined-only "${plugins[@]}" | awk '$2 ~ /^[TDB]$/ {print $3}' | sort -u | tr '\n' ' ')"
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
if [[ -n "$wheel" ]]; then
  # As a user types it, in the environment the wheel went into.
  make_dir() { PATH="$venv/bin:$PATH" XDG_CACHE_HOME="$work/cache-$nixl_version" uccl-tcpx-nixl-plugin-dir; }
else
  make_dir() { "$plugin_dir_cmd" --python "$venv/bin/python" --out "$work/plugins-$nixl_version"; }
fi
if ! plugin_dir="$(make_dir)"; then
  if [[ "$unsupported" == 0 ]]; then
    echo "nixl_plugin_tests: NIXL $nixl_version is refused (above); --unsupported runs the plugin anyway" >&2
    exit 3
  fi
  # The installed plugin under the version found, to see whether that NIXL keeps the layout.
  root="$work/unsupported-root"
  rm -rf "$root" && mkdir -p "$root/$nixl_version"
  ln -s "${plugins[0]}" "$root/$nixl_version/libplugin_TCPX.so"
  ln -s "$(realpath "$engine_lib")" "$root/$nixl_version/libuccl_tcpx.so.0"
  plugin_dir="$("$plugin_dir_cmd" --python "$venv/bin/python" --plugin-root "$root" --out "$work/plugins-$nixl_version")"
  echo "running a plugin built for another NIXL version against $nixl_version"
fi
echo "NIXL_PLUGIN_DIR=$plugin_dir"
ls "$plugin_dir"
# The folder's TCPX plugin is the one installed above, not one found elsewhere on this machine.
ours="$(readlink -f "$plugin_dir/libplugin_TCPX.so")"
[[ "$unsupported" == 1 ]] || [[ " $(readlink -f "${plugins[@]}" | tr '\n' ' ') " == *" $ours "* ]] ||
  { echo "nixl_plugin_tests: the folder's plugin is $ours, not one installed here" >&2; exit 1; }

if [[ -n "$wheel" ]]; then
  echo "== uccl-tcpx-doctor sees the folder and an agent with backends=[\"TCPX\"] getting ours"
  NIXL_PLUGIN_DIR="$plugin_dir" UCCL_TCPX_TRANSPORT=socket "$venv/bin/uccl-tcpx-doctor" --json >"$work/doctor.json" ||
    { cat "$work/doctor.json"; echo "nixl_plugin_tests: the doctor failed" >&2; exit 1; }
  "$venv/bin/python" - "$work/doctor.json" <<'PY'
import json, sys
checks = {f"{c['section']}/{c['name']}": c for c in json.load(open(sys.argv[1]))["checks"]}
for key in ("nixl/installed", "nixl/plugin folder", "nixl/agent"):
    c = checks.get(key)
    if not c or c["status"] != "ok":
        sys.exit(f"nixl_plugin_tests: doctor {key}: {c}")
    print(f"doctor {key}: {c['detail']}")
PY
  # A folder holding another build of the plugin (a copy of the package's library folder, as
  # cmake/install.sh's would be): the doctor warns and still passes, its agent getting that build.
  other="$work/other-build-$nixl_version"
  rm -rf "$other" && mkdir -p "$other/dir"
  cp -r "$(dirname "$(dirname "$(dirname "$ours")")")" "$other/lib"
  cp -P "$plugin_dir"/* "$other/dir/"
  ln -sf "$other/lib/nixl/$nixl_version/libplugin_TCPX.so" "$other/dir/libplugin_TCPX.so"
  NIXL_PLUGIN_DIR="$other/dir" UCCL_TCPX_TRANSPORT=socket "$venv/bin/uccl-tcpx-doctor" --json >"$work/doctor-other.json" ||
    { cat "$work/doctor-other.json"; echo "nixl_plugin_tests: the doctor failed another build of the plugin" >&2; exit 1; }
  "$venv/bin/python" - "$work/doctor-other.json" "$other/lib/nixl/$nixl_version/libplugin_TCPX.so" <<'PY'
import json, sys
checks = {f"{c['section']}/{c['name']}": c for c in json.load(open(sys.argv[1]))["checks"]}
folder, agent = checks["nixl/plugin folder"], checks["nixl/agent"]
assert folder["status"] == "warn" and "another build" in folder["detail"], folder
assert agent["status"] == "ok" and sys.argv[2] in agent["detail"], agent
print(f"doctor, another build: {folder['detail']}")
PY
  # NIXL's own folder has no TCPX plugin: the doctor says so, with the command that fixes it.
  own=("$venv"/lib/python3*/site-packages/.nixl_cu*.mesonpy.libs/plugins)
  if NIXL_PLUGIN_DIR="${own[0]}" UCCL_TCPX_TRANSPORT=socket "$venv/bin/uccl-tcpx-doctor" >"$work/doctor.txt"; then
    cat "$work/doctor.txt"; echo "nixl_plugin_tests: the doctor passed a folder without our plugin" >&2; exit 1
  fi
  grep -q 'has no libplugin_TCPX.so' "$work/doctor.txt" && grep -q 'uccl-tcpx-nixl-plugin-dir' "$work/doctor.txt" ||
    { cat "$work/doctor.txt"; echo "nixl_plugin_tests: the doctor's verdict on NIXL's own folder" >&2; exit 1; }
fi

echo "== tests"
cd "$work"
NIXL_PLUGIN_DIR="$plugin_dir" timeout 600 "$venv/bin/python" "$repo/scripts/nixl_plugin_tests.py"

echo "== the NIXL snippets of README.md and docs/, host memory"
NIXL_PLUGIN_DIR="$plugin_dir" "$venv/bin/python" "$repo/scripts/doc_snippets.py" --suite nixl --python "$venv/bin/python"

echo "== the serving stacks' NIXL call patterns (scripts/serving/run.py), host memory"
NIXL_PLUGIN_DIR="$plugin_dir" timeout 600 "$venv/bin/python" "$repo/scripts/serving/run.py"

if ((example)); then
  echo "== a real model, prefill and decode processes over TCPX (examples/disaggregated), CPU"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
    "torch==${EXAMPLE_TORCH_VERSION:-2.15.0}" "transformers==${EXAMPLE_TRANSFORMERS_VERSION:-5.24.0}"
  NIXL_PLUGIN_DIR="$plugin_dir" timeout 900 "$venv/bin/python" "$repo/examples/disaggregated/disagg.py" --device cpu
  # Gigabytes of CUDA libraries nothing after this uses.
  "$venv/bin/python" -m pip freeze | grep -E '^(torch|transformers|triton|nvidia-[^=]*|cuda-[^=]*)==' |
    cut -d= -f1 | xargs -r "$venv/bin/python" -m pip uninstall -y -q
fi
