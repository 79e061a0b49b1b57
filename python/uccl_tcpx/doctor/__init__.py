"""uccl-tcpx-doctor: what on this machine stops uccl-tcpx's transports, each finding with its fix.

    uccl-tcpx-doctor [--json] [--transport auto|socket|tcpx|tcpxo] [--root DIR] [--gpu N]
    uccl-tcpx-doctor --serve [--port P]        (on one host)
    uccl-tcpx-doctor --peer HOST[:P]           (on the other)

Exit status 1 when the transport asked for (--transport, else UCCL_TCPX_TRANSPORT, else auto)
cannot work here; auto falls back to sockets, so TCPX's problems are reported without failing it.
A host that looks like A3-Mega (TCPXO's plugin, /dev/aperture_devices, or tcpxo asked for) gets the
TCPXO checks instead of TCPX's, unless tcpx is asked for.
"""

import argparse
import os
import sys

from . import cuda_checks, engine_checks, nixl_checks, peer, tcpx_checks, tcpxo_checks
from .host import Host
from .report import Report


def parse(argv):
    ap = argparse.ArgumentParser(prog="uccl-tcpx-doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the findings as JSON")
    ap.add_argument(
        "--transport",
        choices=engine_checks.TRANSPORTS,
        help="the transport to judge (default: UCCL_TCPX_TRANSPORT, else auto)",
    )
    ap.add_argument("--root", default="/", help="read sysfs, procfs and libraries under this folder (tests)")
    ap.add_argument("--gpu", type=int, default=None, help="the GPU the engine serves (default: 0 where there are GPUs)")
    ap.add_argument("--serve", action="store_true", help="wait for one --peer and answer it")
    ap.add_argument("--peer", metavar="HOST[:PORT]", help="exchange 64 MiB each way with a --serve")
    ap.add_argument("--port", type=int, default=peer.DEFAULT_PORT, help=f"--serve's port (default {peer.DEFAULT_PORT})")
    ap.add_argument("--no-nixl", action="store_true", help="skip the NIXL checks")
    return ap.parse_args(argv)


def guarded(report, section, what, fn, *args, default=None):
    """Runs one group of checks; a check that breaks is a finding, never a traceback."""
    try:
        return fn(*args)
    except Exception as e:  # the doctor reports what it could not check and goes on
        report.add(
            section,
            what,
            "fail",
            f"the check itself failed: {type(e).__name__}: {e}",
            "send this output with UCCL_TCPX_LOG=info",
        )
        return default


def diagnose(args, env):
    asked = (args.transport or env.get("UCCL_TCPX_TRANSPORT") or "auto").strip().lower()
    report = Report(asked if asked in engine_checks.TRANSPORTS else "auto")
    host = Host(args.root)
    guarded(report, "engine", "version", engine_checks.check_version, report)
    if asked not in engine_checks.TRANSPORTS:
        report.add(
            "engine",
            "transport",
            "fail",
            f"UCCL_TCPX_TRANSPORT={asked} is none of {', '.join(engine_checks.TRANSPORTS)}",
            "export UCCL_TCPX_TRANSPORT=auto",
        )
    knobs = guarded(report, "engine", "settings", engine_checks.load_knobs, default=(set(), set(), []))
    known, retired, defaults = knobs
    if known:
        guarded(report, "engine", "settings", engine_checks.check_settings, report, env, known, retired)
    guarded(report, "engine", "auth key", engine_checks.check_auth, report, env)
    gpus = guarded(report, "cuda", "devices", host.gpus, default={})
    if guarded(report, "cuda", "driver", cuda_checks.check_driver, report, host) and host.live and gpus:
        guarded(report, "cuda", "peer access", cuda_checks.check_peer_access, report)
    cuda_checks.check_devices(report, host, gpus)
    plugin, tcpxo = plugin_checks(report, host, env, asked, defaults, gpus)
    # The engine serves a GPU where there is one: TCPX binds a comm to the current GPU, so a
    # host-memory-only engine is not what a GPU user runs.
    gpu = args.gpu if args.gpu is not None else (0 if host.live and gpus else -1)
    resolved = guarded(
        report,
        "engine",
        "transport",
        engine_checks.check_transport,
        report,
        env,
        report.transport,
        plugin,
        gpu,
        tcpxo is not None,
    )
    report.runs = runs_here(report, resolved, gpu, tcpxo)
    if not args.no_nixl:
        guarded(report, "nixl", "checks", nixl_checks.run, report, env)
    if args.peer:
        guarded(report, "peer", "exchange", peer.peer, report, args.peer, None if gpu < 0 else gpu)
    return report


def plugin_checks(report, host, env, asked, defaults, gpus):
    """Runs the checks of the plugins this host may use: (the plugin the engine check should
    load, or None; the TCPXO checks' Verdict, or None where they did not run)."""
    if report.transport == "socket":
        return None, None
    mega = guarded(report, "tcpxo", "checks", tcpxo_checks.looks_like_a3_mega, host, env, asked, default=False)
    plugin = tcpxo = None
    # On A3-Mega, TCPX's checks would judge another plugin (and initialise Google's wrapper, which
    # loads TCPXO): only where TCPX is asked for by name.
    if report.transport == "tcpx" or (report.transport == "auto" and not mega):
        plugin = guarded(report, "tcpx", "checks", tcpx_checks.run, report, host, env, defaults, gpus)
    if mega:
        tcpxo = guarded(
            report, "tcpxo", "checks", tcpxo_checks.run, report, host, env, gpus, default=tcpxo_checks.Verdict()
        )
        if report.transport == "tcpxo":
            plugin = tcpxo.plugin
    return plugin, tcpxo


def runs_here(report, resolved, gpu, tcpxo=None):
    """One line: the profile (TCPX, TCPXO or sockets only) and memory kinds an engine gets on this
    host, from the checks. `tcpxo`: the TCPXO checks' Verdict where they ran."""
    status = {f"{c.section}/{c.name}": c.status for c in report.checks}
    if status.get("engine/socket transport") != "ok":
        return "nothing: no engine can be created (see engine)"
    has_gpu = gpu >= 0 and status.get("cuda/driver") == "ok" and status.get("cuda/CUDA API", "ok") == "ok"
    if resolved == "tcpxo":
        return over_tcpxo(gpu if has_gpu else None, tcpxo)
    memory = "host memory" + (f" and GPU {gpu}'s memory" if has_gpu else " only (no GPU an engine can serve)")
    if resolved == "tcpx":
        return f"the TCPX net plugin, {memory}; peers on this host over sockets"
    line = f"the built-in socket transport, {memory}"
    if tcpxo is None:
        return line + ("" if resolved == "socket" and report.transport == "socket" else "; not TCPX (see tcpx)")
    return line + ("; not TCPX (see tcpx)" if report.transport == "tcpx" else "") + tcpxo_suffix(report, tcpxo)


def over_tcpxo(gpu, tcpxo):
    """The line for an engine made over TCPXO, serving `gpu` (None: none it can serve)."""
    # An engine made proves TCPXO's init only: what the checks found missing (RxDM's import
    # helper, say) fails the transfers later.
    if tcpxo is not None and tcpxo.blocking:
        missing = ", ".join(tcpxo.blocking)
        return f"an engine over the TCPXO net plugin, whose transfers will fail (see tcpxo: {missing})"
    if gpu is None:
        return "the TCPXO net plugin, but no GPU an engine can serve (TCPXO moves GPU memory)"
    return f"the TCPXO net plugin, GPU {gpu}'s memory and host memory (through a GPU {gpu} buffer)"


def tcpxo_suffix(report, tcpxo):
    """Why an A3-Mega-like host's engine is not over TCPXO, after the socket line."""
    if tcpxo.blocking:
        return f"; not TCPXO (see tcpxo: {', '.join(tcpxo.blocking)})"
    if report.transport == "tcpxo":
        return "; not TCPXO (see engine/transport)"
    return "; TCPXO's checks pass: set UCCL_TCPX_TRANSPORT=tcpxo to use it"


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.serve:
        try:
            host = Host(args.root)
            gpu = args.gpu if args.gpu is not None else (0 if host.live and host.gpus() else None)
            peer.serve(args.port, gpu, sys.stdout)
        except Exception as e:
            print(f"uccl-tcpx-doctor --serve: {e}", file=sys.stderr)
            return 1
        return 0
    report = diagnose(args, dict(os.environ))
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code()


def console():
    sys.exit(main())
