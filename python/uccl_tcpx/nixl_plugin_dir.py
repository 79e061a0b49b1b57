#!/usr/bin/env python3
"""Makes a NIXL plugin folder holding the installed NIXL wheel's own plugins (UCX, ...) and
uccl-tcpx's TCPX plugin, and prints its path, for NIXL_PLUGIN_DIR:

    export NIXL_PLUGIN_DIR="$(uccl-tcpx-nixl-plugin-dir)"

NIXL_PLUGIN_DIR replaces NIXL's own plugin folder, hence the links to the wheel's plugins. The TCPX
plugin is built for exact NIXL versions (NIXL's classes change layout between releases); a NIXL
of another version is refused, naming the versions this installation supports.

Installed with the Python package (pip install uccl-tcpx) as a console command, and by
cmake/install.sh as <prefix>/bin/uccl-tcpx-nixl-plugin-dir; each finds its own plugins.

NIXL is looked up in the Python that runs this command (the first python3 on PATH), or in the one
--python names. Exit status: 0 and the folder on stdout, else 1 and the reason on stderr.
"""

import argparse
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PLUGIN = "libplugin_TCPX.so"
ENGINE_LIB = "libuccl_tcpx.so.0"


def die(msg):
    print(f"uccl-tcpx-nixl-plugin-dir: {msg}", file=sys.stderr)
    sys.exit(1)


def default_root():
    here = Path(__file__).resolve().parent
    # In the Python package (pip): uccl_tcpx/lib/nixl/<version>/, beside this module.
    packaged = here / "lib" / "nixl"
    if packaged.is_dir():
        return packaged
    # Installed by cmake/install.sh as <prefix>/bin/<this>: <prefix>/lib/uccl-tcpx/nixl/<version>/.
    return here.parent / "lib" / "uccl-tcpx" / "nixl"


def supported(root):
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / PLUGIN).is_file())


def find_nixl(cuda):
    """(distribution name, version, the wheel's plugin folder) of the NIXL this Python imports."""
    found = []
    for major in [cuda] if cuda else ["12", "13"]:
        module = f"nixl_cu{major}"
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        site = Path(list(spec.submodule_search_locations)[0]).parent
        try:
            version = importlib.metadata.version(f"nixl-cu{major}")
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append((f"nixl-cu{major}", version, site / f".nixl_cu{major}.mesonpy.libs" / "plugins"))
    if not found:
        die(f"no NIXL wheel (nixl-cu12 or nixl-cu13) is importable by {sys.executable}; pip install nixl")
    if len(found) > 1:
        # The `nixl` package picks one by the CUDA it detects: take the same.
        try:
            import nixl._api as api

            picked = api.__name__.split(".")[0].replace("_", "-")
            return next(f for f in found if f[0] == picked)
        except Exception:
            names = ", ".join(f"{d} {v}" for d, v, _ in found)
            die(f"both {names} are installed: pick one with --cuda 12 or --cuda 13")
    return found[0]


def link(folder, name, target):
    path = folder / name
    if path.is_symlink() or path.exists():
        if path.is_symlink() and os.readlink(path) == str(target):
            return
        path.unlink()
    path.symlink_to(target)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", help="look NIXL up in this Python instead of the one running this")
    ap.add_argument("--cuda", choices=["12", "13"], help="which nixl-cuNN wheel, when both are installed")
    ap.add_argument("--plugin-root", type=Path, help="folder of <version>/" + PLUGIN + " (default: the installed one)")
    ap.add_argument("--out", type=Path, help="the folder to make (default: under $XDG_CACHE_HOME/uccl-tcpx)")
    ap.add_argument(
        "--as-uccl",
        action="store_true",
        help="also name our plugin UCCL, so that programs asking NIXL for its UCCL backend get TCPX",
    )
    args = ap.parse_args()

    env_root = os.environ.get("UCCL_TCPX_NIXL_PLUGIN_ROOT")
    root = (args.plugin_root or (Path(env_root) if env_root else default_root())).resolve()
    if args.python:
        # The same command in the other Python, with the folders already resolved here.
        argv = [args.python, os.path.abspath(__file__), "--plugin-root", str(root)]
        argv += ["--cuda", args.cuda] if args.cuda else []
        argv += ["--out", str(args.out.resolve())] if args.out else []
        argv += ["--as-uccl"] if args.as_uccl else []
        try:
            sys.exit(subprocess.call(argv))
        except OSError as e:
            die(f"cannot run {args.python}: {e}")
    versions = supported(root)
    if not versions:
        die(f"no {PLUGIN} under {root}/<version>/: is uccl-tcpx installed with its NIXL plugin?")

    dist, version, wheel_plugins = find_nixl(args.cuda)
    if version not in versions:
        die(
            f"{dist} {version} is installed, but this uccl-tcpx's TCPX plugin is built for NIXL "
            f"{', '.join(versions)} only (a plugin depends on the exact NIXL version's class layout): "
            f"pip install '{dist}=={versions[-1]}'"
        )
    if not wheel_plugins.is_dir():
        die(f"{dist} {version} has no plugin folder at {wheel_plugins}")
    ours = root / version / PLUGIN

    if args.out:
        base = args.out.resolve()
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        key = hashlib.sha256(f"{wheel_plugins}\0{ours}\0{args.as_uccl}".encode()).hexdigest()[:12]
        base = cache / "uccl-tcpx" / f"nixl-plugins-{dist}-{version}-{key}"
    # The wheel's plugins find their libraries through $ORIGIN-relative paths ($ORIGIN/.. and
    # $ORIGIN/../../nixl_cuNN.libs), and $ORIGIN is the folder NIXL opened them from, links not
    # resolved. So the folder sits in a copy of the wheel's layout made of links:
    # base/.nixl_cuNN.mesonpy.libs/{the wheel's libraries, plugins/} and base/nixl_cuNN.libs.
    wheel_libs = wheel_plugins.parent
    libs = base / wheel_libs.name
    folder = libs / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in wheel_libs.iterdir():
        if entry.name != "plugins":
            link(libs, entry.name, entry.resolve())
    bundled = wheel_libs.parent / wheel_libs.name.replace(".mesonpy.libs", ".libs").lstrip(".")
    if bundled.is_dir():
        link(base, bundled.name, bundled.resolve())

    wanted = {p.name: p.resolve() for p in wheel_plugins.iterdir() if p.name.endswith(".so")}
    wanted[PLUGIN] = ours
    # The plugin finds the engine library through $ORIGIN, which is this folder when NIXL opens the
    # plugin through its link here; NIXL loads only libplugin_*.so files, so the link is inert.
    # Where each layout keeps it: <libdir> of <libdir>/uccl-tcpx/nixl (cmake), uccl_tcpx/lib of
    # uccl_tcpx/lib/nixl (the Python package), or beside the plugin.
    places = (root.parent.parent / ENGINE_LIB, root.parent / ENGINE_LIB, root / version / ENGINE_LIB)
    engine = next((p for p in places if p.exists()), None)
    if engine:
        wanted[ENGINE_LIB] = engine.resolve()
    if args.as_uccl:
        wanted["libplugin_UCCL.so"] = ours
    for entry in folder.iterdir():
        if entry.is_symlink() and entry.name not in wanted:
            entry.unlink()
    for name, target in sorted(wanted.items()):
        link(folder, name, target)
    # NIXL reports a plugin that does not load only as an unsupported backend: say why here.
    try:
        ctypes.CDLL(str(folder / PLUGIN), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as e:
        die(f"{folder / PLUGIN} does not load: {e}")
    print(folder)


if __name__ == "__main__":
    main()
