# The --bundle step of scripts/nixl_e2e.sh, which sources this file once our package is staged
# ($stage), uccl-tcpx-bench built ($bench) and build_plugins defined; it sets $bundle, the output
# folder. It assembles what scripts/nixl_gpu_run.sh needs on a GPU host that has a Python with
# torch but no network, compiler or Rust:
#
#   nixl-site.tar.xz   a site-packages subset for PYTHONPATH: NIXL's `nixl` package (nixl-V, the
#                      meta package that picks nixl-cuN by torch's CUDA major) and nixl_meta_utils,
#                      nixl_cuN's Python files and extension modules, the libraries those load from
#                      the wheel (libnixl*.so, libserdes, libstream and the gRPC, etcd, protobuf and
#                      abseil copies libnixl.so needs) and no plugin of NIXL's own; and pyzmq, which
#                      benchmark_nixl.py imports. Packed, since it is most of the bundle's size.
#   lib/               our libuccl_p2p.so and libuccl_tcpx.so.0
#   plugins/{source,binary}/libplugin_UCCL.so   linked to the wheel's libraries, no RPATH
#   uccl-tcpx-bench, nixl_e2e.py, nixl_gpu_run.sh, nixl_uccl_benchmark.sh, benchmark_nixl.py
#                      (UCCL's, unchanged), bundle.env (what was bundled), MANIFEST (sizes)
# shellcheck shell=bash

command -v xz >/dev/null 2>&1 || die "xz is required for --bundle"
bcuda="${NIXL_BUNDLE_CUDA:-13}"
bpython="${NIXL_BUNDLE_PYTHON:-3.12}"
pyzmq_version="${PYZMQ_VERSION:-27.3.0}"
module="nixl_cu$bcuda"
benchmark="$uccl_src/p2p/benchmarks/benchmark_nixl.py"
[[ -f "$benchmark" ]] || die "$benchmark not found"

# ---- the wheels, for the GPU host's Python ------------------------------------------------------------
wheels="$work/bundle-wheels/py$bpython"
# shellcheck source=scripts/wheels.sh
source "$repo/scripts/wheels.sh"
fetch_wheels "$wheels" "$bpython" "nixl==$nixl_version" "nixl-cu$bcuda==$nixl_version" "pyzmq==$pyzmq_version" ||
  die "the wheels for Python $bpython could not be fetched"
unpacked="$work/bundle-unpacked"
rm -rf "$unpacked"
unpack_wheels "$unpacked" "$wheels"/nixl-"$nixl_version"-*.whl "$wheels"/nixl_cu"$bcuda"-"$nixl_version"-*.whl \
  "$wheels"/pyzmq-"$pyzmq_version"-*.whl || die "the wheels could not be unpacked"
tag="cpython-${bpython/./}-x86_64-linux-gnu"
[[ -f "$unpacked/$module/_bindings.$tag.so" ]] ||
  die "nixl-cu$bcuda $nixl_version has no _bindings.$tag.so: not a wheel for Python $bpython"
libs="$(nixl_libs_in "$unpacked" "$bcuda")"

# ---- the plugins, against the bundled NIXL ------------------------------------------------------------
rm -rf "$bundle"
mkdir -p "$bundle/lib"
# No RPATH: NIXL loads the plugin after its own libraries, which the dynamic loader then reuses by
# name, and our lib/ comes from LD_LIBRARY_PATH as it does for a user.
build_plugins "$bundle/plugins" "$libs"

# ---- the site subset -------------------------------------------------------------------------------------
# Python files of the packages, and every shared library reachable from the extension modules through
# DT_NEEDED inside the wheel (system libraries stay the host's); no plugin of NIXL's own.
site="$work/bundle-site"
rm -rf "$site"
mkdir -p "$site"
python3 "$repo/scripts/nixl_site.py" "$unpacked" "$site" "$module" || die "could not collect NIXL's libraries"
for lib in libnixl.so libnixl_common.so libnixl_build.so libserdes.so; do
  [[ -f "$site/.$module.mesonpy.libs/$lib" ]] || die "$lib was not collected"
done
echo "packing the site subset ($(du -sh "$site" | cut -f1)) ..."
tar -C "$site" -cf - . | xz -6 -T0 >"$bundle/nixl-site.tar.xz"

# ---- the rest ----------------------------------------------------------------------------------------------
cp "$stage/lib/libuccl_p2p.so" "$bundle/lib/"
cp -L "$stage/lib/libuccl_tcpx.so.0" "$bundle/lib/libuccl_tcpx.so.0"
cp "$bench" "$bundle/uccl-tcpx-bench"
strip "$bundle/uccl-tcpx-bench" "$bundle/lib/"*.so* "$bundle/plugins/"*/*.so 2>/dev/null || true
cp "$repo/scripts/nixl_e2e.py" "$repo/scripts/nixl_gpu_run.sh" "$repo/scripts/nixl_uccl_benchmark.sh" \
  "$benchmark" "$bundle/"
{
  echo "NIXL_VERSION=$nixl_version"
  echo "NIXL_MODULE=$module"
  echo "PYTHON_VERSION=$bpython"
  echo "PYZMQ_VERSION=$pyzmq_version"
  echo "NIXL_SRC_COMMIT=${NIXL_SRC_COMMIT:-$(git -C "$nixl_src" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "UCCL_SRC_COMMIT=${UCCL_SRC_COMMIT:-$(git -C "$uccl_src" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "UCCL_TCPX_COMMIT=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
} >"$bundle/bundle.env"
(cd "$bundle" && find . -type f ! -name MANIFEST -printf '%s\t%p\n' | sort -k2) >"$bundle/MANIFEST"
echo "bundle for Python $bpython, NIXL $nixl_version (nixl-cu$bcuda): $bundle," \
  "$(du -sb "$bundle" | cut -f1) bytes ($(du -sh "$bundle" | cut -f1))"
echo "on the GPU host: scripts/nixl_gpu_run.sh $bundle (or $bundle/nixl_gpu_run.sh $bundle)"
