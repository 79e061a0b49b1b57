#!/usr/bin/env python3
"""Runs one of UCCL's engine test scripts and fails when any process of it failed.

UCCL's tests run their server and client in multiprocessing children and never look at the
children's exit codes, so an assertion failing in a child still ends the script with status 0.
This runner executes the script unchanged as __main__ and records the exit code of every child
it joins (a child still running after JOIN_LIMIT_S is terminated and counted as failed).

The tests of UCCL's September-October 2025 engine construct `p2p.Endpoint(local_gpu_idx=...,
num_cpus=...)` by keyword while that engine's binding names no constructor argument, which fails
with TypeError on UCCL's own build too. When the binding takes no keywords, the runner says so and
hands the two arguments over by position (the script itself is not touched).

usage: run_uccl_test.py TEST_SCRIPT
"""

import multiprocessing
import runpy
import sys

JOIN_LIMIT_S = 120

failures = []
joined = []
_join = multiprocessing.Process.join


def _checked_join(self, timeout=None):
    _join(self, JOIN_LIMIT_S if timeout is None else timeout)
    if timeout is not None and self.exitcode is None:
        return
    if self.exitcode is None:
        self.terminate()
        _join(self, 10)
        failures.append(f"{self.name}: still running after {JOIN_LIMIT_S} s, terminated")
    elif self.exitcode != 0:
        failures.append(f"{self.name}: exit code {self.exitcode}")
    joined.append(self.name)


def _positional_constructor():
    from uccl import p2p

    if "local_gpu_idx" in (p2p.Endpoint.__init__.__doc__ or ""):
        return
    print("note: this engine's p2p.Endpoint names no constructor argument; local_gpu_idx= and "
          "num_cpus= are passed by position", flush=True)
    base = p2p.Endpoint

    # A function, not a subclass: a Python subclass would make the interpreter run the binding's
    # __del__ (which destroys the engine) before the binding's own deallocation destroys it again.
    def Endpoint(*args, **kwargs):
        if kwargs:
            args = (kwargs.pop("local_gpu_idx"), kwargs.pop("num_cpus"), *args)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return base(*args)

    Endpoint.parse_metadata = base.parse_metadata
    p2p.Endpoint = Endpoint


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    script = sys.argv[1]
    _positional_constructor()
    multiprocessing.Process.join = _checked_join
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            failures.append(f"{script}: exited with {e.code}")
    except BaseException as e:  # the script's own failure, reported like any other
        failures.append(f"{script}: {type(e).__name__}: {e}")
    if not joined:
        failures.append(f"{script}: started no process (nothing was tested)")
    for f in failures:
        print(f"FAILED {f}", flush=True)
    if failures:
        return 1
    print(f"{script}: {len(joined)} processes exited 0", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
