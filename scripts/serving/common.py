"""Shared pieces of the serving-stack harnesses of this folder (run by run.py): NIXL's Python API,
the byte pattern and the buffer (host memory, or with --vram a GPU's) as scripts/nixl_plugin_tests.py
has them (imported from there), a driver process and two role processes (prefill and decode, or
sender and receiver) that talk over pipes where the stacks use ZMQ, bounded waits everywhere, and
failures that name their step.

The NIXL calls follow NIXL's Python agent, ai-dynamo/nixl src/api/python/_api.py @ 8770b655a6b1
(1.4.0): nixl_agent_config(backends=...) gives each listed backend `{}` unless num_threads > 0
and it is UCX/OBJ/LIBFABRIC/GDS_MT/UCCL; prep_xfer_dlist's "NIXL_INIT_AGENT" or "" is the local
list; transfer() and check_xfer_state() answer "DONE", "PROC" or "ERR".

Every process arms faulthandler's watchdog (HANG_S): a process stuck inside a NIXL call prints its
threads' stacks and exits 1, and the driver reports that as a hang of the step it was waiting on.
"""

import faulthandler
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections import Counter

import numpy as np

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

# The harnesses take these from here (the same API, pattern and buffers as the plugin's own tests).
from nixl_plugin_tests import Mem, nixl_agent, nixl_agent_config, pattern  # noqa: E402,F401

_api = sys.modules[nixl_agent.__module__]
# Both NIXL versions tested have it; a version without it gets agents without a sync mode.
nixl_thread_sync_t = getattr(_api, "nixl_thread_sync_t", None)

# Bound on any one wait (a transfer, a notification, an answer from the other process).
WAIT_S = float(os.environ.get("SERVING_WAIT_S", "30"))
# Bound on a whole process: past it, faulthandler dumps every thread's stack and exits.
HANG_S = float(os.environ.get("SERVING_HANG_S", "120"))


# ---- failures and steps -----------------------------------------------------------------------


class Failure(Exception):
    """A check that did not hold, or a call that failed, at a named step."""

    def __init__(self, step_name, msg):
        super().__init__(f"{step_name}: {msg}")
        self.step, self.msg = step_name, msg


_local = threading.local()


def step(name):
    """Names what this thread does now; a failure or hang reports it."""
    _local.step = name


def current_step():
    return getattr(_local, "step", "start")


def check(ok, what):
    if not ok:
        raise Failure(current_step(), what)


def short(x, n=120):
    """A printable, bounded form of a notification (bytes) or anything else."""
    if isinstance(x, (bytes, bytearray)):
        s = repr(bytes(x[:n]))
        return s + (f"...({len(x)} B)" if len(x) > n else "")
    s = repr(x)
    return s if len(s) <= 4 * n else s[: 4 * n] + "..."


def expect_exact(got, expected, what):
    """`got` and `expected` (lists of hashable items, e.g. (sender, message)) hold the same items
    the same number of times; the failure lists what is missing and what is extra."""
    g, e = Counter(got), Counter(expected)
    missing, extra = e - g, g - e
    if missing or extra:
        raise Failure(
            current_step(),
            f"{what}: {sum(missing.values())} missing {short(sorted(missing.items(), key=repr)[:4])}, "
            f"{sum(extra.values())} unexpected {short(sorted(extra.items(), key=repr)[:4])} "
            f"(got {len(got)}, expected {len(expected)})",
        )


def wait_done(agent, handle, what, sleep_s=0.0, deadline=None):
    """Polls check_xfer_state until DONE; "ERR" or a timeout fails the step."""
    deadline = deadline or time.monotonic() + WAIT_S
    while True:
        state = agent.check_xfer_state(handle)
        if state == "DONE":
            return
        if state != "PROC":
            raise Failure(current_step(), f"{what}: check_xfer_state answered {state}")
        if time.monotonic() > deadline:
            raise Failure(current_step(), f"{what}: still PROC after {WAIT_S:.0f} s (hang)")
        time.sleep(sleep_s)


# ---- memory: host, or with --vram I,T a GPU's ---------------------------------------------------

# "I,T" under --vram (set by harness_main, read by the roles): the GPU of the first role's KV
# memory (prefill, sender, the side written from or read from) and of the second's (decode, receiver).
VRAM_ENV = "SERVING_VRAM"
VRAM_USAGE = "--vram takes I,T: the GPUs of the first role's KV memory and of the second's, e.g. 0,0"


def parse_vram(value):
    m = re.fullmatch(r"([0-9]+),([0-9]+)", value or "")
    return (int(m[1]), int(m[2])) if m else None


def check_vram(value):
    """--vram's value as (I, T), GPUs torch sees; otherwise the driver exits saying why, before any
    role starts."""
    gpus = parse_vram(value)
    if gpus is None:
        sys.exit(f"{VRAM_USAGE}; not {value!r}")
    try:
        import torch
    except Exception as e:
        sys.exit(f"--vram needs torch, for the GPU memory; {sys.executable} cannot import it ({e})")
    n = torch.cuda.device_count()
    if max(gpus) >= n:
        sys.exit(f"--vram {value}: torch sees {n} GPU{'' if n == 1 else 's'}")
    return gpus


def role_gpu(second=False):
    """The GPU of this role's KV memory under --vram (the first role's; with second=True the
    second's), or None on host memory. It is made current here, before the role makes its agents:
    the engine serves the GPU current on the thread that creates it, as a stack's worker has its own."""
    gpus = parse_vram(os.environ.get(VRAM_ENV))
    if gpus is None:
        return None
    import torch

    torch.cuda.set_device(gpus[second])
    return gpus[second]


def alloc(nbytes, gpu):
    """Zeroed memory for the agents: host memory (numpy, .kind "DRAM") for gpu None, else on that
    GPU (torch, "VRAM"); .addr, .size, .dev (the device id the stacks register); bytes go in with
    .write(offset, 1-D uint8 array) and come out with .read(offset, n) (on the host, a view not to
    write through), synchronized with the GPU both ways."""
    return Mem(nbytes, "DRAM" if gpu is None else "VRAM", gpu or 0)


# ---- processes ----------------------------------------------------------------------------------


class Link:
    """One end of a pipe carrying (tag, payload) messages. recv() waits for one tag, bounded, and
    turns the other side's ("error", step, text) into a Failure naming that side's step."""

    def __init__(self, conn, peer, proc=None):
        self.conn, self.peer, self.proc = conn, peer, proc
        self.stash = []

    def send(self, tag, *payload):
        self.conn.send((tag, payload))

    def _gone(self, what):
        code = None
        if self.proc is not None:
            self.proc.join(1)
            code = self.proc.exitcode
        how = "closed its pipe" if code is None else f"exited with status {code}"
        return Failure(current_step(), f"{self.peer} {how} while we waited for {what} (a crash, or its "
                       "watchdog after a hang: its stack is printed above)")

    def _take(self, timeout, what="a message"):
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.02):
            if self.proc is not None and not self.proc.is_alive():
                raise self._gone(what)
            if self.proc is None and os.getppid() == 1:
                raise Failure(current_step(), "the driver is gone")
            if time.monotonic() > deadline:
                raise Failure(current_step(), f"no {what} from {self.peer} within {timeout:.0f} s (hang)")
        try:
            tag, payload = self.conn.recv()
        except EOFError:
            raise self._gone(what) from None
        if tag == "error":
            raise Failure(payload[0], payload[1])
        return tag, payload

    def recv(self, tag, timeout=WAIT_S):
        for i, (t, p) in enumerate(self.stash):
            if t == tag:
                del self.stash[i]
                return p
        while True:
            t, p = self._take(timeout, repr(tag))
            if t == tag:
                return p
            self.stash.append((t, p))

    def next(self, timeout=WAIT_S):
        """The next message, whatever its tag: (tag, payload)."""
        if self.stash:
            return self.stash.pop(0)
        return self._take(timeout)

    def poll(self, tag):
        """The payload of a waiting `tag` message, or None, without blocking."""
        for i, (t, p) in enumerate(self.stash):
            if t == tag:
                del self.stash[i]
                return p
        while self.conn.poll(0):
            t, p = self._take(WAIT_S)
            if t == tag:
                return p
            self.stash.append((t, p))
        return None


def _role_entry(fn, conn, name, args):
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    link = Link(conn, "the driver")
    code = 0
    try:
        fn(link, *args)
        link.send("exit-ok")
    except Failure as e:
        link.send("error", e.step if e.step.startswith(name) else f"{name}: {e.step}", e.msg)
        code = 1
    except BaseException:
        where = current_step()
        link.send("error", where if where.startswith(name) else f"{name}: {where}", traceback.format_exc())
        code = 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        # A watchdog for the exit too: NIXL's and the plugin's destructors run now.
        faulthandler.dump_traceback_later(WAIT_S, exit=True)
    sys.exit(code)


class Role:
    """A role (prefill, decode, sender, receiver) in its own process, started with `spawn` as the
    stacks' workers are separate processes."""

    def __init__(self, name, fn, *args):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_role_entry, args=(fn, child, name, args), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.link = Link(self.conn, name, self.proc)

    def send(self, tag, *payload):
        self.link.send(tag, *payload)

    def recv(self, tag, timeout=WAIT_S):
        return self.link.recv(tag, timeout)

    def finish(self):
        """The role's work ended without error and the process exited with status 0 (its NIXL
        agents and the plugin torn down)."""
        self.recv("exit-ok")
        self.proc.join(WAIT_S + 10)  # past the process's own teardown watchdog (WAIT_S)
        if self.proc.is_alive():
            raise Failure(f"{self.name}: exit", f"still running {WAIT_S:.0f} s after its work ended")
        if self.proc.exitcode != 0:
            raise Failure(f"{self.name}: exit", f"exit status {self.proc.exitcode} after its work ended (teardown)")

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


class Worker(threading.Thread):
    """A thread of a role (a transfer or writer thread) whose failure the role re-raises."""

    def __init__(self, name, fn, *args):
        super().__init__(name=name, daemon=True)
        self.fn, self.args, self.error = fn, args, None

    def run(self):
        step(f"thread {self.name}")
        try:
            self.fn(*self.args)
        except Failure as e:
            self.error = Failure(e.step if e.step.startswith(self.name) else f"{self.name}: {e.step}", e.msg)
        except BaseException:
            where = current_step()
            self.error = Failure(where if where.startswith(self.name) else f"{self.name}: {where}", traceback.format_exc())

    def reraise(self):
        if self.error is not None:
            raise self.error


# ---- a small msgpack (the subset the stacks' payloads use) --------------------------------------


def msgpack_pack(obj):
    """msgpack of None, bools, ints, str, bytes, lists/tuples and dicts, each in its smallest form
    (as msgspec and msgpack-python write them)."""
    out = bytearray()

    def put(x):
        if x is None:
            out.append(0xC0)
        elif x is True or x is False:
            out.append(0xC3 if x else 0xC2)
        elif isinstance(x, (int, np.integer)):
            x = int(x)
            if 0 <= x < 0x80:
                out.append(x)
            elif -32 <= x < 0:
                out.append(x & 0xFF)
            elif x >= 0:
                for tag, n in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
                    if x < 1 << (8 * n):
                        out.append(tag)
                        out.extend(x.to_bytes(n, "big"))
                        break
                else:
                    raise ValueError(f"int {x} out of range")
            else:
                for tag, n in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
                    if x >= -(1 << (8 * n - 1)):
                        out.append(tag)
                        out.extend(x.to_bytes(n, "big", signed=True))
                        break
                else:
                    raise ValueError(f"int {x} out of range")
        elif isinstance(x, str):
            b = x.encode()
            head(b, 0xA0, 32, (0xD9, 0xDA, 0xDB))
            out.extend(b)
        elif isinstance(x, (bytes, bytearray)):
            head(x, None, 0, (0xC4, 0xC5, 0xC6))
            out.extend(x)
        elif isinstance(x, (list, tuple)):
            head(x, 0x90, 16, (None, 0xDC, 0xDD))
            for v in x:
                put(v)
        elif isinstance(x, dict):
            head(x, 0x80, 16, (None, 0xDE, 0xDF))
            for k, v in x.items():
                put(k)
                put(v)
        else:
            raise TypeError(f"cannot pack {type(x).__name__}")

    def head(x, fix, fix_n, tags):
        n = len(x)
        if fix is not None and n < fix_n:
            out.append(fix | n)
            return
        for tag, width in zip(tags, (1, 2, 4)):
            if tag is not None and n < 1 << (8 * width):
                out.append(tag)
                out.extend(n.to_bytes(width, "big"))
                return
        raise ValueError("too long")

    put(obj)
    return bytes(out)


def msgpack_unpack(data):
    """The inverse of msgpack_pack (lists come back as lists)."""
    data = memoryview(bytes(data))
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError("truncated msgpack")
        pos += n
        return bytes(data[pos - n : pos])

    def uint(n):
        return int.from_bytes(take(n), "big")

    def get():
        b = take(1)[0]
        if b < 0x80:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return take(b & 0x1F).decode()
        if 0x90 <= b <= 0x9F:
            return [get() for _ in range(b & 0x0F)]
        if 0x80 <= b <= 0x8F:
            return {get(): get() for _ in range(b & 0x0F)}
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xCC, 0xCD, 0xCE, 0xCF):
            return uint(1 << (b - 0xCC))
        if b in (0xD0, 0xD1, 0xD2, 0xD3):
            return int.from_bytes(take(1 << (b - 0xD0)), "big", signed=True)
        if b in (0xD9, 0xDA, 0xDB):
            return take(uint(1 << (b - 0xD9))).decode()
        if b in (0xC4, 0xC5, 0xC6):
            return take(uint(1 << (b - 0xC4)))
        if b in (0xDC, 0xDD):
            return [get() for _ in range(uint(2 if b == 0xDC else 4))]
        if b in (0xDE, 0xDF):
            return {get(): get() for _ in range(uint(2 if b == 0xDE else 4))}
        raise ValueError(f"msgpack type 0x{b:02x} not handled")

    obj = get()
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the msgpack object")
    return obj


def _msgpack_self_check():
    # msgpack.org's example, and the boundaries of each form.
    assert msgpack_pack({"compact": True, "schema": 0}) == b"\x82\xa7compact\xc3\xa6schema\x00"
    vectors = [
        (127, b"\x7f"), (128, b"\xcc\x80"), (256, b"\xcd\x01\x00"), (65536, b"\xce\x00\x01\x00\x00"),
        (-1, b"\xff"), (-33, b"\xd0\xdf"), (-129, b"\xd1\xff\x7f"), ("", b"\xa0"),
        ("a" * 32, b"\xd9\x20" + b"a" * 32), ([1] * 16, b"\xdc\x00\x10" + b"\x01" * 16),
        ({}, b"\x80"), (None, b"\xc0"), (False, b"\xc2"), (b"\x07", b"\xc4\x01\x07"),
    ]
    for value, packed in vectors:
        got = msgpack_pack(value)
        assert got == packed, (value, got, packed)
        assert msgpack_unpack(got) == value, value
    deep = {"request_id": "cmpl-x", "ids": [[0, 5, 70000, 2**40]], "n": -5, "b": b"\x00\x01", "t": None}
    assert msgpack_unpack(msgpack_pack(deep)) == deep
    assert msgpack_unpack(msgpack_pack(list(range(70000)))) == list(range(70000))


# ---- the driver ---------------------------------------------------------------------------------

PATHS = {"network": {"UCCL_TCPX_DISABLE_IPC": "1"}, "same-host": {"UCCL_TCPX_DISABLE_IPC": "0"}}


def harness_main(title, scenarios, env=None):
    """Runs each scenario (name, fn) of a harness; fn() drives its role processes and raises
    Failure on any mismatch. Prints PASS or FAIL with the step, and exits with the number of failed
    scenarios. usage: HARNESS.py [--path network|same-host] [--vram I,T] [SCENARIO ...]"""
    args = sys.argv[1:]
    opts = {"--path": "network", "--vram": None}
    while args and args[0] in opts:
        if len(args) < 2:
            sys.exit(f"{args[0]} needs a value; usage: {os.path.basename(sys.argv[0])} "
                     "[--path network|same-host] [--vram I,T] [SCENARIO ...]")
        opts[args[0]], args = args[1], args[2:]
    path, vram = opts["--path"], opts["--vram"]
    if path not in PATHS:
        sys.exit(f"--path takes one of {sorted(PATHS)}")
    names = [n for n, _ in scenarios]
    for a in args:
        if a not in names:
            sys.exit(f"unknown scenario {a}; the scenarios: {' '.join(names)}")
    # The roles read --vram from the environment; the flag alone decides it.
    os.environ.pop(VRAM_ENV, None)
    where = f"{path} path"
    if vram is not None:
        os.environ[VRAM_ENV] = "%d,%d" % check_vram(vram)
        where += f", vram {os.environ[VRAM_ENV]}"
    # The engines read their settings from the environment (the stacks create the backend with
    # no parameters): loopback, and the path chosen; the role processes inherit these.
    os.environ.setdefault("UCCL_TCPX_IP", "127.0.0.1")
    os.environ.update(PATHS[path])
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)
    faulthandler.dump_traceback_later(HANG_S + 60, exit=True)
    failed = 0
    start_all = time.monotonic()
    for name, fn in scenarios:
        if args and name not in args:
            continue
        start = time.monotonic()
        step(name)
        try:
            note = fn()
            print(f"PASS  {title} {name} ({where}, {time.monotonic() - start:.2f} s)"
                  + (f"  {note}" if note else ""), flush=True)
        except Failure as e:
            failed += 1
            print(f"FAIL  {title} {name} ({where}) at step [{e.step}]: {e.msg}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL  {title} {name} ({where}) at step [{current_step()}]:\n{traceback.format_exc()}", flush=True)
    print(f"{title}: {failed} failed, {time.monotonic() - start_all:.2f} s", flush=True)
    sys.exit(min(failed, 100))


def run_roles(*roles):
    """Context for a scenario's roles: every one is killed on the way out, whatever happened."""

    class _Roles:
        def __enter__(self):
            return roles

        def __exit__(self, *exc):
            for r in roles:
                r.kill()
            return False

    return _Roles()


def drain(q):
    """Everything waiting in queue `q`, without blocking."""
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


_msgpack_self_check()
