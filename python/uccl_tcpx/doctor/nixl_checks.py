"""NIXL: which NIXL this Python imports, whether NIXL_PLUGIN_DIR holds our plugin for that version
and NIXL's own plugins, and whether an agent with backends=["TCPX"] really instantiates ours."""

import importlib.metadata
import json
import os
import subprocess
import sys

from .report import FAIL, OK, WARN

EXPORT = 'export NIXL_PLUGIN_DIR="$(uccl-tcpx-nixl-plugin-dir)"'

# An agent with backends=["TCPX"] in a process of its own; prints the TCPX plugin files mapped in.
_AGENT = """
import json
try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu13._api import nixl_agent, nixl_agent_config
out = {}
try:
    agent = nixl_agent("uccl-tcpx-doctor", nixl_agent_config(backends=["TCPX"]))
    out["plugins"] = list(agent.get_plugin_list())
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
with open("/proc/self/maps") as f:
    out["mapped"] = sorted({l.split()[-1] for l in f if l.rstrip().endswith("libplugin_TCPX.so")})
print(json.dumps(out))
"""


def installed_nixl():
    """[(distribution, version)] of the NIXL wheels this Python has."""
    out = []
    for dist in ("nixl-cu12", "nixl-cu13"):
        try:
            out.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def our_plugins():
    """{NIXL version: real path} of the TCPX plugins this package carries."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib", "nixl")
    out = {}
    for v in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        p = os.path.join(root, v, "libplugin_TCPX.so")
        if os.path.isfile(p):
            out[v] = os.path.realpath(p)
    return out


def run(report, env):
    found = installed_nixl()
    if not found:
        report.add(
            "nixl",
            "installed",
            WARN,
            f"no NIXL wheel in {sys.executable}'s environment",
            "pip install nixl-cu12 (for NIXL's TCPX backend; the engine itself does not need it)",
        )
        return
    dist, version = found[0]
    ours = our_plugins()
    if len(found) > 1:
        report.add(
            "nixl",
            "installed",
            WARN,
            f"both {found[0]} and {found[1]} installed",
            "pip uninstall the one for the other CUDA",
        )
    elif version not in ours:
        report.add(
            "nixl",
            "installed",
            FAIL,
            f"{dist} {version}; this package's TCPX plugin is built for NIXL {', '.join(ours)}",
            f"pip install '{dist}=={max(ours) if ours else '?'}'",
        )
        return
    else:
        report.add("nixl", "installed", OK, f"{dist} {version}")
    folder = env.get("NIXL_PLUGIN_DIR")
    if not folder:
        # NIXL's Python agent only logs a warning for a listed backend it has no plugin for, so a
        # serving stack asking for TCPX starts and fails later, at its first registration.
        report.add(
            "nixl",
            "plugin folder",
            FAIL,
            'NIXL_PLUGIN_DIR unset: NIXL loads its own plugins only; a stack asking for "TCPX" (docs/SERVING.md) '
            "starts with a warning and fails at its first registration",
            EXPORT,
        )
        return
    plugin = os.path.join(folder, "libplugin_TCPX.so")
    if not os.path.exists(plugin):
        report.add("nixl", "plugin folder", FAIL, f"NIXL_PLUGIN_DIR={folder} has no libplugin_TCPX.so", EXPORT)
        return
    real = os.path.realpath(plugin)
    own = [n for n in ("libplugin_UCX.so", "libplugin_POSIX.so") if not os.path.exists(os.path.join(folder, n))]
    if real != ours.get(version):
        # Another build of the plugin (cmake/install.sh's, say) works if it was built for this NIXL,
        # which the agent below finds out; it may not match this package's engine, hence a warning.
        report.add(
            "nixl",
            "plugin folder",
            WARN,
            f"{plugin} is {real}, not this package's plugin for NIXL {version}: another build is used",
            EXPORT + " (for the plugin of this package)",
        )
    elif own:
        report.add(
            "nixl",
            "plugin folder",
            WARN,
            f"{folder} lacks NIXL's own {', '.join(own)}: agents asking for them fail",
            EXPORT + " (it links NIXL's plugins in too)",
        )
    else:
        report.add("nixl", "plugin folder", OK, f"{folder}: our TCPX plugin for NIXL {version}, and NIXL's own")
    try:
        done = subprocess.run([sys.executable, "-c", _AGENT], env=env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        got = (
            json.loads(lines[-1])
            if lines
            else {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "mapped": []}
        )
    except subprocess.TimeoutExpired:
        got = {"error": "no answer within 120 s", "mapped": []}
    mapped = [os.path.realpath(p) for p in got.get("mapped", [])]
    if "error" in got or real not in mapped:
        why = got.get("error") or f"the process mapped {mapped or 'no TCPX plugin'}"
        report.add(
            "nixl",
            "agent",
            FAIL,
            f'an agent with backends=["TCPX"] does not get ours: {why}',
            "run with UCCL_TCPX_LOG=info and send the output",
        )
    else:
        report.add("nixl", "agent", OK, f'an agent with backends=["TCPX"] instantiates {mapped[0]}')
