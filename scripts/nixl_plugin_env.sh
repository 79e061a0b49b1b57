# Sourced, from a folder made by scripts/nixl_plugin_bundle.sh, on the GPU host:
#
#   source BUNDLE/scripts/nixl_plugin_env.sh BUNDLE
#
# Unpacks the bundle's NIXL site and the uccl-tcpx wheel into a work folder and exports what the
# drivers of BUNDLE/scripts/ need, with no network and no compiler: PYTHON (the interpreter with
# torch: $PYTHON, else /opt/torch/.venv/bin/python3 when present, else python3; it must be the
# bundle's Python version), PYTHONPATH (NIXL and uccl_tcpx first), NIXL_PLUGIN_DIR (NIXL's UCX
# and our TCPX, made by the bundled uccl-tcpx-nixl-plugin-dir), UCCL_TCPX_PREFIX, UCCL_TCPX_BENCH,
# UCCL_TREE (the bundled UCCL test files, when bundled) and NIXL_PLUGIN_RUN_DIR (the work folder:
# $NIXL_PLUGIN_RUN_DIR if set, else a new one in /tmp). Returns non-zero, saying why, when
# something is missing.
# shellcheck shell=bash

nixl_plugin_env() {
  local bundle have
  bundle="$(cd "${1:?usage: source nixl_plugin_env.sh BUNDLE}" && pwd)" || return 1
  [[ -f "$bundle/bundle.env" && -f "$bundle/nixl-site.tar.xz" ]] ||
    { echo "nixl_plugin_env: $bundle is not a bundle of scripts/nixl_plugin_bundle.sh" >&2; return 1; }
  # shellcheck source=/dev/null
  source "$bundle/bundle.env"
  if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x /opt/torch/.venv/bin/python3 ]] && PYTHON=/opt/torch/.venv/bin/python3
  fi
  [[ "$PYTHON" == */* ]] || PYTHON="$(command -v "$PYTHON")" || { echo "nixl_plugin_env: no python3" >&2; return 1; }
  have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ||
    { echo "nixl_plugin_env: $PYTHON does not run" >&2; return 1; }
  [[ "$have" == "$PYTHON_VERSION" ]] || {
    echo "nixl_plugin_env: $PYTHON is Python $have; the bundle's NIXL is for $PYTHON_VERSION" \
      "(make it with NIXL_BUNDLE_PYTHON=$have)" >&2
    return 1
  }
  NIXL_PLUGIN_RUN_DIR="${NIXL_PLUGIN_RUN_DIR:-$(mktemp -d /tmp/nixl-plugin-run.XXXXXX)}"
  mkdir -p "$NIXL_PLUGIN_RUN_DIR"
  local site="$NIXL_PLUGIN_RUN_DIR/site" pkg="$NIXL_PLUGIN_RUN_DIR/uccl-tcpx"
  rm -rf "$site" "$pkg"
  mkdir -p "$site"
  "$PYTHON" - "$bundle/nixl-site.tar.xz" "$site" <<'EOF' || { echo "nixl_plugin_env: cannot unpack the site" >&2; return 1; }
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    # The data filter where this Python has it: plain files only, nothing outside the folder.
    tar.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
EOF
  "$PYTHON" -m zipfile -e "$bundle"/uccl_tcpx-*.whl "$pkg" || { echo "nixl_plugin_env: cannot unpack the wheel" >&2; return 1; }
  export PYTHON NIXL_PLUGIN_RUN_DIR
  export PYTHONPATH="$site:$pkg${PYTHONPATH:+:$PYTHONPATH}"
  # The bundled numpy only where the interpreter has none: torch's own stays in charge otherwise.
  if ! "$PYTHON" -c 'import numpy' 2>/dev/null; then
    rm -rf "$NIXL_PLUGIN_RUN_DIR/numpy"
    "$PYTHON" -m zipfile -e "$bundle"/numpy-*.whl "$NIXL_PLUGIN_RUN_DIR/numpy" ||
      { echo "nixl_plugin_env: cannot unpack numpy" >&2; return 1; }
    PYTHONPATH="$PYTHONPATH:$NIXL_PLUGIN_RUN_DIR/numpy"
    echo "numpy: the bundle's (this Python has none)"
  fi
  export UCCL_TCPX_PREFIX="$bundle/prefix"
  export UCCL_TCPX_BENCH="$bundle/uccl-tcpx-bench"
  [[ -d "$bundle/uccl/p2p/tests" ]] && export UCCL_TREE="$bundle/uccl"
  NIXL_PLUGIN_DIR="$("$PYTHON" "$UCCL_TCPX_PREFIX/bin/uccl-tcpx-nixl-plugin-dir" \
    --out "$NIXL_PLUGIN_RUN_DIR/plugins")" || { echo "nixl_plugin_env: no plugin folder (above)" >&2; return 1; }
  export NIXL_PLUGIN_DIR
  echo "NIXL $NIXL_VERSION ($NIXL_MODULE) for $PYTHON, uccl-tcpx $UCCL_TCPX_COMMIT; NIXL_PLUGIN_DIR=$NIXL_PLUGIN_DIR"
}
nixl_plugin_env "$@"
