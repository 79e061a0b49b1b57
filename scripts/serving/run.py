#!/usr/bin/env python3
"""Runs the serving-stack harnesses of this folder (vllm.py, sglang.py, lmcache.py,
dynamo_kvbm.py: how vLLM, SGLang, LMCache and Dynamo's KVBM call NIXL, on host memory or, with
--vram I,T, on GPU memory (the first role's on GPU I, the second's on GPU T, the same one or not;
this needs torch), through our backend TCPX), each in a process group of its own, on both of the
engine's paths between processes of one host: the network path that agents on two hosts take
(UCCL_TCPX_DISABLE_IPC=1) and the same-host one. Prints each run's result and time, then a
summary; the exit status is the number of failed runs. scripts/nixl_plugin_tests.sh runs it
after its own tests, with the NIXL_PLUGIN_DIR it made.

usage: run.py [--path network|same-host] [--vram I,T] [HARNESS ...]
   (default: every harness, both paths, host memory)
"""

import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESSES = ["vllm", "sglang", "lmcache", "dynamo_kvbm"]
PATHS = ["network", "same-host"]
# A run past this is killed with its role processes (each process has its own watchdog first).
LIMIT_S = 240


def main():
    args = sys.argv[1:]
    opts = {"--path": None, "--vram": None}
    while args and args[0] in opts:
        if len(args) < 2:
            sys.exit(f"{args[0]} needs a value; usage: run.py [--path network|same-host] [--vram I,T] [HARNESS ...]")
        opts[args[0]], args = args[1], args[2:]
    if opts["--path"] not in (None, *PATHS):
        sys.exit(f"--path takes one of {PATHS}")
    paths = [opts["--path"]] if opts["--path"] else PATHS
    memory, vram_args = "host", []
    if opts["--vram"] is not None:
        # Refused here once, not by every harness in turn (common needs NIXL's Python API).
        from common import check_vram

        gpus = "%d,%d" % check_vram(opts["--vram"])
        memory, vram_args = f"vram {gpus}", ["--vram", gpus]
    for a in args:
        if a not in HARNESSES:
            sys.exit(f"unknown harness {a}; the harnesses: {' '.join(HARNESSES)}")
    if not os.environ.get("NIXL_PLUGIN_DIR"):
        print("run.py: NIXL_PLUGIN_DIR is not set: NIXL looks in its own folder, which has no TCPX", file=sys.stderr)
    results = []
    for path in paths:
        for name in args or HARNESSES:
            print(f"== serving harness {name}.py, {path} path, {memory}", flush=True)
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, f"{name}.py"), "--path", path, *vram_args],
                                    start_new_session=True)
            try:
                code = proc.wait(LIMIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = f"killed after {LIMIT_S} s"
            finally:
                # Whatever role process outlived its driver.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            results.append((name, path, code, time.monotonic() - start))
    print("== serving harnesses", flush=True)
    for name, path, code, took in results:
        verdict = "PASS" if code == 0 else f"FAIL ({code if isinstance(code, str) else f'exit status {code}'})"
        print(f"{verdict:<6} {name:<12} {path:<10} {memory:<9} {took:6.2f} s", flush=True)
    failed = sum(1 for _, _, code, _ in results if code != 0)
    print(f"serving harnesses: {len(results) - failed} passed, {failed} failed, "
          f"{sum(t for *_, t in results):.1f} s", flush=True)
    sys.exit(failed)


if __name__ == "__main__":
    main()
