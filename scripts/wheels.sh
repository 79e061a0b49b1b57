# Sourced by the NIXL bundle scripts (nixl_bundle.sh, nixl_plugin_bundle.sh): binary wheels for a
# GPU host's Python, fetched here, since that host has no network.
#
#   fetch_wheels DEST PYTHON_VERSION REQUIREMENT...  each requirement's manylinux x86_64 wheel for
#                                                    that CPython, without its dependencies
#   unpack_wheels DEST WHEEL...                      each wheel (a glob that must match) into DEST
#
# Both print why and return 1 on failure.
# shellcheck shell=bash

fetch_wheels() {
  local dest=$1 py=$2 p req
  shift 2
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64; do
    platforms+=(--platform "$p")
  done
  mkdir -p "$dest"
  for req in "$@"; do
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$py" --implementation cp "${platforms[@]}" -d "$dest" "$req" ||
      { echo "pip could not download $req for Python $py" >&2; return 1; }
  done
}

unpack_wheels() {
  local dest=$1 whl
  shift
  mkdir -p "$dest"
  for whl in "$@"; do
    [[ -f "$whl" ]] || { echo "no wheel matches $whl" >&2; return 1; }
    python3 -m zipfile -e "$whl" "$dest"
  done
}
