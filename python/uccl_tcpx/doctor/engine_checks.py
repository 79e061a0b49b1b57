"""The engine's checks: its version, the settings in the environment, the transport
UCCL_TCPX_TRANSPORT resolves to here and why, the address it advertises, the authentication key."""

import json
import os
import stat
import subprocess
import sys

from .report import FAIL, OK, WARN

TRANSPORTS = ("auto", "socket", "tcpx", "tcpxo")

# Creates one engine in a process of its own (a net plugin is initialised once per process, and
# TCPX ends the process on some errors) and prints its metadata or the engine's error.
_CREATE = """
import json, sys
from uccl_tcpx import _engine
try:
    e = _engine.create(int(sys.argv[1]))
except Exception as err:
    print(json.dumps({"error": str(err)}))
else:
    print(json.dumps({"metadata": _engine.metadata(e)}))
    _engine.destroy(e)
"""


def knobs_file():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib", "knobs.txt")


def load_knobs(path=None):
    """(known names, retired names, [(plugin variable, engine default)]) from the package's
    knobs.txt, which the build writes from docs/CONFIG.md and src/config/retired.rs."""
    known, retired, defaults = set(), set(), []
    with open(path or knobs_file(), encoding="utf-8") as f:
        for line in f:
            kind, _, rest = line.strip().partition(" ")
            if kind == "known":
                known.add(rest)
            elif kind == "retired":
                retired.add(rest)
            elif kind == "plugin_default":
                name, _, value = rest.partition(" ")
                defaults.append((name, value))
    return known, retired, defaults


def create_engine(env, gpu):
    """The engine's own verdict on env: {"metadata": "ip:port?gpu"} or {"error": why}."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CREATE, str(gpu)], env=env, capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        return {"error": "engine creation did not finish within 180 s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"the process creating the engine exited with status {done.returncode}: {tail}"}


def check_version(report):
    import uccl_tcpx

    report.add("engine", "version", OK, f"uccl-tcpx {uccl_tcpx.__version__}, library {uccl_tcpx.lib_path()}")


def check_settings(report, env, known, retired):
    ours = sorted(n for n in env if n.startswith("UCCL_TCPX_"))
    old = [n for n in ours if n in retired]
    unknown = [n for n in ours if n not in known and n not in retired]
    if old:
        report.add(
            "engine",
            "retired settings",
            WARN,
            f"set but no longer read: {', '.join(old)}",
            f"unset {' '.join(old)} (docs/CONFIG.md says what replaced them)",
        )
    if unknown:
        report.add(
            "engine",
            "unknown settings",
            WARN,
            f"not read by this version (a typo?): {', '.join(unknown)}",
            "check the names against docs/CONFIG.md, or unset them",
        )
    if not old and not unknown:
        report.add("engine", "settings", OK, f"{len(ours)} UCCL_TCPX_* set, all known")


def check_auth(report, env):
    path = env.get("UCCL_TCPX_AUTH_KEY_FILE")
    if not path:
        report.add(
            "engine",
            "auth key",
            WARN,
            "UCCL_TCPX_AUTH_KEY_FILE unset: any host that reaches the port may connect",
            "head -c 32 /dev/urandom > key && chmod 600 key, the same file on every peer, "
            "export UCCL_TCPX_AUTH_KEY_FILE=$PWD/key",
        )
        return
    try:
        st = os.stat(path)
    except OSError as e:
        report.add(
            "engine",
            "auth key",
            FAIL,
            f"UCCL_TCPX_AUTH_KEY_FILE={path}: {e.strerror}",
            "point UCCL_TCPX_AUTH_KEY_FILE at a readable key file",
        )
        return
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.add(
            "engine",
            "auth key",
            FAIL,
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); the engine refuses it",
            f"chmod 600 {path}",
        )
    elif not 16 <= st.st_size <= 4097:
        report.add(
            "engine",
            "auth key",
            FAIL,
            f"{path} holds {st.st_size} bytes; a key is 16 to 4096",
            f"head -c 32 /dev/urandom > {path}",
        )
    else:
        report.add("engine", "auth key", OK, f"{path} ({st.st_size} bytes, mode {stat.S_IMODE(st.st_mode):o})")


def creation_fix(error, gpu):
    """The fix line for an engine that cannot be created, from what its error is about."""
    lowered = error.lower()
    if "cuda" in lowered or "gpu" in lowered:
        return (
            f"the engine was to serve GPU {gpu}: fix what the cuda section reports, or run the doctor with "
            "--gpu -1 to check a host-memory engine"
        )
    if "address" in lowered or "interface" in lowered or "bind" in lowered or "port" in lowered:
        return "fix the setting the error names (UCCL_TCPX_IP, UCCL_TCPX_IFNAME, UCCL_TCPX_PORT)"
    return "fix what the error names; UCCL_TCPX_LOG=info says more"


def plugin_fix(asked, why, mega):
    """The fix line for a plugin engine that cannot be created."""
    if "UCCL_TCPX_TRANSPORT" in why and "invalid" in why:
        return f"install a uccl-tcpx that knows UCCL_TCPX_TRANSPORT={asked}, or UCCL_TCPX_TRANSPORT=socket"
    if asked == "auto":
        if mega:
            return "auto never loads TCPXO: export UCCL_TCPX_TRANSPORT=tcpxo (see tcpxo); sockets work meanwhile"
        return "fix what the tcpx section reports to get TCPX; sockets work meanwhile"
    return f"fix what the {asked} section reports, or UCCL_TCPX_TRANSPORT=socket"


def check_transport(report, env, asked, plugin_path, gpu, mega=False):
    """The socket engine this host can make, and what `asked` resolves to, each from a real engine.
    `mega`: the host looks like A3-Mega (TCPXO's checks ran)."""
    sock = create_engine({**env, "UCCL_TCPX_TRANSPORT": "socket"}, gpu)
    if "error" in sock:
        report.add(
            "engine",
            "socket transport",
            FAIL,
            f"an engine cannot be created: {sock['error']}",
            creation_fix(sock["error"], gpu),
        )
    else:
        report.add(
            "engine", "socket transport", OK, f"an engine advertises {sock['metadata']}", address=sock["metadata"]
        )
    if asked == "socket":
        report.add("engine", "transport", OK, "UCCL_TCPX_TRANSPORT=socket: the built-in socket transport, no plugin")
        return "socket"
    # TCPXO only where asked for by name: auto never loads it (its failed init ends the process).
    plugin = "tcpxo" if asked == "tcpxo" else "tcpx"
    plugin_env = {**env, "UCCL_TCPX_TRANSPORT": plugin}
    if plugin_path:
        plugin_env["UCCL_TCPX_PLUGIN"] = plugin_path
    made = create_engine(plugin_env, gpu)
    if "error" not in made:
        report.add(
            "engine",
            "transport",
            OK,
            f"{asked} resolves to {plugin}: an engine over the net plugin advertises {made['metadata']}",
        )
        return plugin
    why = made["error"]
    if asked in ("tcpx", "tcpxo"):
        report.add(
            "engine",
            "transport",
            FAIL,
            f"UCCL_TCPX_TRANSPORT={asked}, and the plugin engine fails: {why}",
            plugin_fix(asked, why, mega),
        )
    else:
        report.add(
            "engine",
            "transport",
            WARN,
            f"auto resolves to socket, because the plugin engine fails: {why}",
            plugin_fix(asked, why, mega),
        )
    return "socket"
