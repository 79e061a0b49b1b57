#!/usr/bin/env python3
"""Collects the part of NIXL's unpacked wheels that a host without network needs on PYTHONPATH:
NIXL's `nixl` package and nixl_meta_utils, nixl_cuN's Python files and extension modules, pyzmq
when unpacked, their dist-info (uccl-tcpx-nixl-plugin-dir reads NIXL's version from it), and every
shared library of the wheels that those reach through DT_NEEDED (system libraries stay the host's).
With --plugins, NIXL's own plugins of those names (in the wheel's plugin folder, where NIXL and
uccl-tcpx-nixl-plugin-dir look) and, with --ucx-modules, the UCX transport modules of those names
(UCX loads them at run time, so no DT_NEEDED names them), each with what it needs.

    nixl_site.py UNPACKED DEST MODULE [--plugins UCX,POSIX] [--ucx-modules cuda,cma]

Used by scripts/nixl_bundle.sh (no plugin) and scripts/nixl_plugin_bundle.sh (UCX, the anchor).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys


def needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.*)\]", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("module", help="nixl_cu12 or nixl_cu13")
    ap.add_argument("--plugins", default="", help="NIXL plugins to keep (libplugin_NAME.so), comma-separated")
    ap.add_argument("--ucx-modules", default="", help="UCX modules to keep (libuct_NAME, libucm_NAME)")
    args = ap.parse_args()
    src, dst, module = args.src, args.dst, args.module
    mesonpy, libs_dir = f".{module}.mesonpy.libs", f"{module}.libs"
    lib_dirs = [mesonpy, libs_dir, "pyzmq.libs"]

    files = ["nixl_meta_utils.py"]
    for pkg in ("nixl", module, "zmq"):
        for root, _, names in os.walk(os.path.join(src, pkg)):
            files += [os.path.relpath(os.path.join(root, n), src) for n in names]
    for name in os.listdir(src):
        if name.endswith(".dist-info") and re.match(r"(nixl|nixl_cu\d+|pyzmq)-", name):
            for root, _, names in os.walk(os.path.join(src, name)):
                files += [os.path.relpath(os.path.join(root, n), src) for n in names]
    for plugin in filter(None, args.plugins.split(",")):
        rel = os.path.join(mesonpy, "plugins", f"libplugin_{plugin}.so")
        if not os.path.isfile(os.path.join(src, rel)):
            sys.exit(f"nixl_site: the wheel has no {rel}")
        files.append(rel)
    ucx = os.path.join(libs_dir, "ucx")
    for mod in filter(None, args.ucx_modules.split(",")):
        found = [n for n in os.listdir(os.path.join(src, ucx)) if re.match(rf"lib(uct|ucm)_{re.escape(mod)}\.", n)]
        if not found:
            sys.exit(f"nixl_site: the wheel has no UCX module {mod} in {ucx}")
        files += [os.path.join(ucx, n) for n in found]
    files = [f for f in files if os.path.exists(os.path.join(src, f))]

    todo = [f for f in files if ".so" in os.path.basename(f)]
    libs = set()
    while todo:
        for name in needed(os.path.join(src, todo.pop())):
            for d in lib_dirs:
                rel = os.path.join(d, name)
                if os.path.exists(os.path.join(src, rel)) and rel not in libs:
                    libs.add(rel)
                    todo.append(rel)
    for rel in sorted(set(files) | libs):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
    print(f"  {len(set(files))} package files and {len(libs)} libraries from the wheels")


if __name__ == "__main__":
    main()
