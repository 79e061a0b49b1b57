#!/usr/bin/env python3
"""Tests of the TCPX NIXL plugin through NIXL's own Python API (the stock nixl-cuNN wheel), over
host memory. Run by scripts/nixl_plugin_tests.sh, which builds and installs the plugin and makes
NIXL_PLUGIN_DIR; see there. Each case prints PASS or FAIL with what it checked; the exit status
is the number of failed cases (capped at 100).

usage: nixl_plugin_tests.py [--initiator DRAM|VRAM] [--target DRAM|VRAM] [--gpu N] [CASE ...]
   (default: host memory, every case; VRAM needs torch and the GPU)
"""

import ctypes
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
import traceback

import numpy as np

try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu13._api import nixl_agent, nixl_agent_config

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = [4 * KiB, 1 * MiB, 64 * MiB]
DESC_COUNTS = [1, 4, 16]
# A gap between descriptors keeps NIXL from merging neighbours, so the backend sees all of them.
GAP = 4 * KiB
# The engine's transfer timeout for these agents: a dead peer must surface well within it.
TIMEOUT_MS = 5000
# Bound on any one wait here: far above what a transfer needs, far below a hang.
WAIT_S = 60.0
# What the target maps and fills in one system call while it is being stopped (case_dead_peer).
HOLD = 512 * MiB


def make_agent(name, **options):
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    if "TCPX" not in agent.get_plugin_list():
        raise RuntimeError(
            f"NIXL finds no TCPX plugin (plugins: {agent.get_plugin_list()}; "
            f"NIXL_PLUGIN_DIR={os.environ.get('NIXL_PLUGIN_DIR')})"
        )
    params = {"ip": "127.0.0.1", "timeout_ms": str(TIMEOUT_MS)}
    params.update(options)
    agent.create_backend("TCPX", params)
    return agent


def pattern(size, seed):
    i = np.arange(size, dtype=np.uint64)
    x = (i * np.uint64(2654435761) + np.uint64(seed) * np.uint64(0x9E3779B9)) >> np.uint64(7)
    return (x & np.uint64(0xFF)).astype(np.uint8)


def layout(size, n):
    """n descriptors covering `size` bytes, GAP apart: [(offset, length)]."""
    step = size // n
    return [(k * (step + GAP), step if k < n - 1 else size - k * step) for k in range(n)]


def span(size, n):
    off, length = layout(size, n)[-1]
    return off + length


BUF = span(64 * MiB, 16)


def register(agent, buf):
    addr = buf.ctypes.data
    descs = agent.get_reg_descs([(addr, buf.nbytes, 0, "")], "DRAM")
    agent.register_memory(descs)
    return addr, descs


class Mem:
    """A buffer the agents transfer from and to: host memory (numpy, DRAM) or, with --gpu, a torch
    tensor on that GPU (VRAM). Bytes go in and come out as numpy arrays."""

    def __init__(self, size, kind="DRAM", gpu=0):
        self.kind, self.dev = kind, (gpu if kind == "VRAM" else 0)
        if kind == "VRAM":
            import torch

            self.torch = torch
            self.buf = torch.zeros(size, dtype=torch.uint8, device=f"cuda:{gpu}")
            torch.cuda.synchronize(self.buf.device)
            self.addr = self.buf.data_ptr()
        else:
            self.buf = np.zeros(size, dtype=np.uint8)
            self.addr = self.buf.ctypes.data
        self.size = size

    def write(self, off, data):
        if self.kind == "VRAM":
            self.buf[off : off + len(data)].copy_(self.torch.from_numpy(data))
            self.torch.cuda.synchronize(self.buf.device)
        else:
            self.buf[off : off + len(data)] = data

    def read(self, off, n):
        if self.kind == "VRAM":
            self.torch.cuda.synchronize(self.buf.device)
            return self.buf[off : off + n].cpu().numpy()
        return self.buf[off : off + n]

    def zero(self):
        if self.kind == "VRAM":
            self.buf.zero_()
            self.torch.cuda.synchronize(self.buf.device)
        else:
            self.buf[:] = 0

    def register(self, agent):
        descs = agent.get_reg_descs([(self.addr, self.size, self.dev, "")], self.kind)
        agent.register_memory(descs)
        return descs

    def descs(self, agent, ranges):
        return agent.get_xfer_descs([(self.addr + o, n, self.dev) for o, n in ranges], self.kind)


# Which memory the two-process checks and the agent-to-itself check use (--initiator / --target).
MEM = {"initiator": "DRAM", "target": "DRAM", "gpu": 0}


def run(agent, op, local, remote, peer, notif):
    """Posts one transfer and polls it to the end: "DONE", "ERR" or "TIMEOUT"."""
    handle = agent.initialize_xfer(op, local, remote, peer, notif)
    try:
        state = agent.transfer(handle)
        deadline = time.monotonic() + WAIT_S
        while state == "PROC":
            if time.monotonic() > deadline:
                return "TIMEOUT"
            os.sched_yield()
            state = agent.check_xfer_state(handle)
        return state
    finally:
        agent.release_xfer_handle(handle)


def wait_notif(agent, sender, msg, wait_s=WAIT_S):
    deadline = time.monotonic() + wait_s
    while True:
        for got in agent.notifs.get(sender, []):
            if got == msg:
                agent.notifs[sender].remove(got)
                return True
        if time.monotonic() > deadline:
            return False
        agent.update_notifs()
        time.sleep(0.0005)


def nixl_error(fn):
    """The NIXL exception `fn` raised (its class name), or None if it returned."""
    try:
        fn()
    except Exception as e:  # NIXL's errors are nixlBind exceptions named nixl*Error
        return type(e).__name__
    return None


# ---- two agents in two processes --------------------------------------------------------------


def target_main(pipe, big, options, mem):
    """The target agent: registers its buffer(s), hands its metadata over, then serves commands."""
    agent = make_agent("target", **options)
    buf = Mem(BUF, mem["target"], mem["gpu"])
    buf.register(agent)
    addr = buf.addr
    sparse = None
    if big:
        sparse = Sparse(6 * GiB)
        agent.register_memory(agent.get_reg_descs([(sparse.addr, sparse.len, 0, "")], "DRAM"))
    pipe.send((agent.get_agent_metadata(), addr, sparse.addr if sparse else 0, buf.dev))
    while True:
        cmd, *args = pipe.recv()
        if cmd == "fill":
            for off, length, seed in args[0]:
                buf.write(off, pattern(length, seed))
            pipe.send(True)
        elif cmd == "check":  # after the notification: the bytes must be there
            ranges, msg = args
            got = wait_notif(agent, "initiator", msg)
            ok = all(np.array_equal(buf.read(o, n), pattern(n, seed)) for o, n, seed in ranges)
            pipe.send((got, ok))
        elif cmd == "notif":
            pipe.send(wait_notif(agent, "initiator", args[0]))
        elif cmd == "sparse_fill":
            for off, length, seed in args[0]:
                sparse.view(off, length)[:] = pattern(length, seed)
            pipe.send(True)
        elif cmd == "sparse_check":
            ok = all(np.array_equal(sparse.view(off, n), pattern(n, seed)) for off, n, seed in args[0])
            pipe.send(ok)
        elif cmd == "zero":
            buf.zero()
            pipe.send(True)
        elif cmd == "hold":
            # This thread spends a while in one system call (the kernel filling a mapping), where
            # a SIGSTOP waits for it while the engine's threads run on.
            pipe.send(True)
            populate(args[0])
        elif cmd == "die":
            # Gone without a goodbye, as a crashed process is.
            os._exit(0)


class Sparse:
    """A private anonymous mapping reserved without backing: only the pages written take memory."""

    def __init__(self, length):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        prot, flags = 0x1 | 0x2, 0x02 | 0x20 | 0x4000  # READ|WRITE, PRIVATE|ANONYMOUS|NORESERVE
        addr = libc.mmap(None, length, prot, flags, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {length} bytes")
        self.addr, self.len = addr, length

    def view(self, off, length):
        return np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(self.addr + off))


# The two paths between processes of one host: the engine's same-host copies, and the network
# path (loopback TCP) that agents on two hosts take.
PATHS = {"same-host path": {}, "network path": {"UCCL_TCPX_DISABLE_IPC": "1"}}


class TwoProcesses:
    def __init__(self, big=False, options=None):
        self.options = options or {}
        self.start_target(big)
        self.agent = make_agent("initiator", **self.options)
        self.mem = Mem(BUF, MEM["initiator"], MEM["gpu"])
        self.ldescs = self.mem.register(self.agent)
        self.laddr = self.mem.addr
        self.peer = self.agent.add_remote_agent(self.meta)

    def start_target(self, big=False):
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=target_main, args=(child, big, self.options, MEM), daemon=True)
        self.proc.start()
        self.meta, self.raddr, self.rsparse, self.rdev = self.answer("start")

    def remote(self, ranges):
        """Descriptors of the target's buffer."""
        return self.agent.get_xfer_descs([(self.raddr + o, n, self.rdev) for o, n in ranges], MEM["target"])

    def ask(self, *cmd):
        self.pipe.send(cmd)
        return self.answer(cmd[0])

    def answer(self, what):
        deadline = time.monotonic() + WAIT_S
        while not self.pipe.poll(0.1):
            if not self.proc.is_alive():
                raise RuntimeError(f"the target process exited ({self.proc.exitcode}) before answering {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the target did not answer {what}")
        return self.pipe.recv()

    def close(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


def case_two_processes(results, path):
    """WRITE and READ at 4 KiB, 1 MiB and 64 MiB as 1, 4 and 16 descriptors, with notifications."""
    t = TwoProcesses(big=True, options=PATHS[path])
    try:
        seed = 1
        for op in ("WRITE", "READ"):
            for size in SIZES:
                for n in DESC_COUNTS:
                    seed += 1000
                    lr = layout(size, n)
                    # Local piece k goes to remote piece n-1-k (all pieces are the same length
                    # here), so an item placed by position rather than by address shows.
                    rr = lr[::-1]
                    local = t.mem.descs(t.agent, lr)
                    remote = t.remote(rr)
                    # Where each piece's bytes end up on the target, and the seed they carry.
                    theirs = [(ro, ln, seed + lo) for (lo, ln), (ro, _) in zip(lr, rr)]
                    msg = f"{op}-{size}-{n}".encode()
                    what = f"{path}: {op} {size // KiB} KiB as {n} descriptor(s)"
                    t.mem.zero()
                    t.ask("zero")
                    if op == "WRITE":
                        for o, ln in lr:
                            t.mem.write(o, pattern(ln, seed + o))
                        state = run(t.agent, op, local, remote, t.peer, msg)
                        got, ok = t.ask("check", theirs, msg)
                    else:
                        t.ask("fill", theirs)
                        state = run(t.agent, op, local, remote, t.peer, msg)
                        ok = all(np.array_equal(t.mem.read(o, ln), pattern(ln, seed + o)) for o, ln in lr)
                        got = t.ask("notif", msg)
                    results.check(state == "DONE" and ok and got, what, f"state {state}, bytes {ok}, notif {got}")
        return t
    except Exception:
        t.close()
        raise


def case_big_region(results, t):
    """A 6 GiB sparse registration on the target; items across its 2 GiB windows and past 4 GiB."""
    if not t.rsparse:
        return
    pieces = [(2 * GiB - 512 * KiB, 1 * MiB), (4 * GiB - 4 * KiB, 64 * KiB), (6 * GiB - 1 * MiB, 1 * MiB)]
    # Descriptors adjacent on both sides, which the backend joins, up to a window's end and past it.
    adjacent = [(2 * GiB - 8 * KiB + k * 4 * KiB, 4 * KiB) for k in range(4)]
    for op, pieces, gap in [(op, p, g) for op in ("WRITE", "READ") for p, g in ((pieces, GAP), (adjacent, 0))]:
        seeds = [(off, ln, 77 + k + (10 if op == "READ" else 0)) for k, (off, ln) in enumerate(pieces)]
        lr, pos = [], 0
        for _, ln, _ in seeds:
            lr.append((pos, ln))
            pos += ln + gap
        local = t.mem.descs(t.agent, lr)
        remote = t.agent.get_xfer_descs([(t.rsparse + off, ln, 0) for off, ln, _ in seeds], "DRAM")
        t.mem.zero()
        if op == "WRITE":
            for (o, ln), (_, _, s) in zip(lr, seeds):
                t.mem.write(o, pattern(ln, s))
            state = run(t.agent, op, local, remote, t.peer, b"big-w")
            ok = t.ask("notif", b"big-w") and t.ask("sparse_check", seeds)
        else:
            t.ask("sparse_fill", seeds)
            state = run(t.agent, op, local, remote, t.peer, b"big-r")
            ok = all(np.array_equal(t.mem.read(o, ln), pattern(ln, s)) for (o, ln), (_, _, s) in zip(lr, seeds))
            ok = ok and t.ask("notif", b"big-r")
        what = f"6 GiB registration, {op} across its windows" + (", adjacent descriptors" if not gap else "")
        results.check(state == "DONE" and ok, what, f"state {state}, checked {ok}")


def populate(length):
    """Maps `length` bytes and has the kernel fill them in one system call, then unmaps them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    prot, flags = 0x1 | 0x2, 0x02 | 0x20 | 0x8000  # READ|WRITE, PRIVATE|ANONYMOUS|POPULATE
    addr = libc.mmap(None, length, prot, flags, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {length} bytes")
    libc.munmap(addr, length)


def resident(pid):
    """The resident memory of process `pid`, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * KiB for line in f if line.startswith("VmRSS:"))


def stopped_threads(pid):
    """How many threads of process `pid` are stopped, and how many it has."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return sum(s in ("T", "t") for s in states), len(states)


def stop(proc):
    """Stops `proc` with SIGSTOP and returns once every thread of it is stopped. kill() only
    queues the signal: the kernel wakes one thread (the main one) to take it, and stops the others
    once that thread leaves the kernel; until then a peer's engine threads still answer, and a
    transfer posted at once may be served in full by the peer being stopped."""
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + WAIT_S
    while True:
        done, threads = stopped_threads(proc.pid)
        if done == threads:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {proc.pid}: {done} of {threads} threads stopped after SIGSTOP")
        time.sleep(0.001)


def timed_transfer(t, msg):
    local = t.mem.descs(t.agent, [(0, 1 * MiB)])
    remote = t.remote([(0, 1 * MiB)])
    start = time.monotonic()
    try:
        state = run(t.agent, "WRITE", local, remote, t.peer, msg)
    except Exception as e:
        state = f"raised {type(e).__name__}"
    return state, time.monotonic() - start


def case_dead_peer(results, t):
    """A transfer to a peer that stopped answering fails within the engine's timeout, and one to
    a peer whose process died fails at once: NIXL's error either way, never in progress forever."""
    # NIXL drops a peer whose transfer failed with NIXL_ERR_REMOTE_DISCONNECT.
    disconnect = "raised nixlRemoteDisconnectError"
    stop(t.proc)
    try:
        state, took = timed_transfer(t, b"while-stopped")
    finally:
        os.kill(t.proc.pid, signal.SIGCONT)
    # How long it took is reported, not held: a loaded host bends it, and `run` bounds the wait.
    results.check(state == disconnect, "transfer to a stopped peer fails", f"{state} after {took:.2f} s")
    # Loaded again, the peer is reached on a new connection.
    t.agent.add_remote_agent(t.meta)
    state, took = timed_transfer(t, b"after-reload")
    results.check(state == "DONE" and t.ask("notif", b"after-reload"), "the peer again after reloading it", state)
    # The stop again, with the peer's main thread in the kernel when it is signalled: the group
    # stops only once that thread comes out, while the engine's threads serve on (as they did, for
    # a millisecond or so, whenever the host was busy). A transfer posted only once every thread
    # stopped fails; one posted right after kill() would be served in full.
    before = resident(t.proc.pid)
    t.ask("hold", HOLD)
    while resident(t.proc.pid) < before + HOLD // 8:  # the mapping fills: the thread is in the kernel
        if not t.proc.is_alive():
            raise RuntimeError("the target process exited while filling a mapping")
        time.sleep(0.001)
    stop(t.proc)
    try:
        state, took = timed_transfer(t, b"while-stopped-busy")
    finally:
        os.kill(t.proc.pid, signal.SIGCONT)
    what = "transfer to a peer stopped while in the kernel fails"
    results.check(state == disconnect, what, f"{state} after {took:.2f} s")
    t.agent.add_remote_agent(t.meta)
    state, took = timed_transfer(t, b"after-reload-2")
    results.check(state == "DONE" and t.ask("notif", b"after-reload-2"), "the peer again after that", state)
    t.pipe.send(("die",))
    t.proc.join(WAIT_S)
    state, took = timed_transfer(t, b"after-death")
    results.check(state == disconnect, "transfer to a dead peer fails", f"{state} after {took:.2f} s")
    # The peer restarted: same agent name, a new engine at another port.
    t.start_target()
    # NIXL 1.5.1 keeps a dropped peer's connection info and refuses other info under its name
    # until the agent is removed; 1.4.0 forgot it already (and then removing it fails).
    nixl_error(lambda: t.agent.remove_remote_agent("target"))
    t.agent.add_remote_agent(t.meta)
    state, _ = timed_transfer(t, b"restarted")
    results.check(state == "DONE" and t.ask("notif", b"restarted"), "a restarted peer of the same name", state)


def case_release_in_flight(results, t):
    """Releasing a request still in flight returns at once; deregistering its memory then returns
    too (a fence), after which the memory is freed and the agents keep working."""
    released = []
    for _ in range(3):
        buf = np.full(64 * MiB, 7, dtype=np.uint8)
        addr, descs = register(t.agent, buf)
        handle = t.agent.initialize_xfer(
            "WRITE", t.agent.get_xfer_descs([(addr, buf.nbytes, 0)], "DRAM"),
            t.remote([(0, buf.nbytes)]), t.peer, b"released")
        state = t.agent.transfer(handle)
        start = time.monotonic()
        err = nixl_error(lambda: t.agent.release_xfer_handle(handle))
        t.agent.deregister_memory(descs)
        took = time.monotonic() - start
        del buf
        released.append((state, err, round(took, 3)))
        if state == "PROC":
            break
    in_flight = [r for r in released if r[0] == "PROC"]
    ok = bool(in_flight) and all(err is None for _, err, _ in released)
    results.check(ok, "release of a request in flight, then deregistration", f"(posted, raised, seconds): {released}")
    state, _ = timed_transfer(t, b"after-release")
    results.check(state == "DONE" and t.ask("notif", b"after-release"), "a transfer after the release", state)


# ---- one process --------------------------------------------------------------------------------


def case_self(results):
    """An agent's WRITE and READ to itself (initiator memory to target memory), with
    notifications to itself."""
    a = make_agent("solo")
    src, dst = Mem(2 * MiB, MEM["initiator"], MEM["gpu"]), Mem(2 * MiB, MEM["target"], MEM["gpu"])
    src.register(a)
    dst.register(a)
    ranges = [(0, 1 * MiB), (1 * MiB + GAP, 1 * MiB - GAP)]
    for op, seed in (("WRITE", 5), ("READ", 6)):
        src.zero()
        dst.zero()
        (src if op == "WRITE" else dst).write(0, pattern(2 * MiB, seed))
        state = run(a, op, src.descs(a, ranges), dst.descs(a, ranges), "solo", f"self-{op}".encode())
        ok = all(np.array_equal(src.read(o, n), dst.read(o, n)) and np.array_equal(src.read(o, n), pattern(2 * MiB, seed)[o : o + n]) for o, n in ranges)
        got = wait_notif(a, "solo", f"self-{op}".encode())
        what = f"agent to itself, {op}, {MEM['initiator']} to {MEM['target']}"
        results.check(state == "DONE" and ok and got, what, f"state {state}, bytes {ok}, notif {got}")


def case_notifs_in_one_process(results):
    """Three TCPX agents in one process: each gets only the notifications sent to it."""
    a, b, c = make_agent("A"), make_agent("B"), make_agent("C")
    bufs = {x: np.zeros(1 * MiB, dtype=np.uint8) for x in "ABC"}
    addrs = {x: register(agent, bufs[x])[0] for x, agent in zip("ABC", (a, b, c))}
    for agent in (a, b, c):
        for other in (a, b, c):
            if other is not agent:
                agent.add_remote_agent(other.get_agent_metadata())
    bufs["A"][:] = pattern(1 * MiB, 9)
    local = a.get_xfer_descs([(addrs["A"], 1 * MiB, 0)], "DRAM")
    sent = {"B": [b"xfer-to-B"], "C": [b"xfer-to-C"]}
    states = [run(a, "WRITE", local, a.get_xfer_descs([(addrs[x], 1 * MiB, 0)], "DRAM"), x, sent[x][0]) for x in "BC"]
    a.send_notif("B", b"plain-to-B")
    c.send_notif("B", b"from-C-to-B")
    big = bytes(range(256)) * 4096  # 1 MiB: no size limit on a notification
    a.send_notif("C", big)
    want = {"B": {"A": [b"xfer-to-B", b"plain-to-B"], "C": [b"from-C-to-B"]}, "C": {"A": [b"xfer-to-C", big]}}
    got = {}
    for name, agent in (("B", b), ("C", c)):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            agent.update_notifs()
            if sum(len(v) for v in agent.notifs.values()) >= sum(len(v) for v in want[name].values()):
                break
            time.sleep(0.001)
        time.sleep(0.2)  # anything stray would have arrived by now too
        agent.update_notifs()
        got[name] = {k: v for k, v in agent.notifs.items() if v}
    a.update_notifs()
    stray_a = {k: v for k, v in a.notifs.items() if v}
    ok = states == ["DONE", "DONE"] and got == want and not stray_a
    results.check(ok, "notifications reach only their agent (3 agents, 1 process)",
                  f"states {states}, B {sorted(got['B'])}, C {sorted(got['C'])}, A {sorted(stray_a)}")
    bytes_ok = np.array_equal(bufs["B"], bufs["A"]) and np.array_equal(bufs["C"], bufs["A"])
    results.check(bytes_ok, "both writes landed", f"{bytes_ok}")


def connections_to(port):
    """This process's established TCP connections to 127.0.0.1:`port`."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ours.add(link[len("socket:[") : -1])
    target = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[2] == target and r[3] == "01" and r[9] in ours)


def control_port(meta):
    """The port of the engine whose connection info `meta` (an agent's metadata) carries."""
    found = re.search(rb"tcpx1;127\.0\.0\.1:(\d+)\?", meta)
    if not found:
        raise RuntimeError("no TCPX connection info on 127.0.0.1 in the agent's metadata")
    return int(found.group(1))


def case_connect_on_load(results):
    """connect_on_load (default 1): loading a peer's metadata connects to it in the background,
    before any request; with 0 the first request connects. Both then move bytes."""
    for on in ("1", "0"):
        t = TwoProcesses(options={"connect_on_load": on, **PATHS["network path"]})
        try:
            port = control_port(t.meta)
            deadline = time.monotonic() + (WAIT_S if on == "1" else 0.5)
            while connections_to(port) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            before = connections_to(port)
            t.ask("fill", [(0, 1 * MiB, 41)])
            local, remote = t.mem.descs(t.agent, [(0, 1 * MiB)]), t.remote([(0, 1 * MiB)])
            state = run(t.agent, "READ", local, remote, t.peer, b"")
            same = bool(np.array_equal(t.mem.read(0, 1 * MiB), pattern(1 * MiB, 41)))
            after = connections_to(port)
        finally:
            t.close()
        expected_before = 1 if on == "1" else 0
        results.check(
            state == "DONE" and same and before == expected_before and after == 1,
            f"connect_on_load={on}: connected before the first request: {bool(expected_before)}",
            f"{state}, bytes {same}, connections before {before}, after {after}",
        )
    try:
        make_agent("bad-option", connect_on_load="yes")
        refused = "created"
    except Exception as e:
        refused = f"refused: {type(e).__name__}"
    results.check(refused.startswith("refused"), "connect_on_load=yes is refused", refused)


def case_bad_input(results):
    """Bad requests get a NIXL error, not a crash."""
    a, b = make_agent("bad-a"), make_agent("bad-b")
    x, y = np.zeros(1 * MiB, dtype=np.uint8), np.zeros(1 * MiB, dtype=np.uint8)
    xa, _ = register(a, x)
    ya, _ = register(b, y)
    a.add_remote_agent(b.get_agent_metadata())
    stray = np.zeros(64 * KiB, dtype=np.uint8)

    def xfer(local, remote, peer="bad-b"):
        return lambda: run(a, "WRITE", a.get_xfer_descs(local, "DRAM"), a.get_xfer_descs(remote, "DRAM"), peer, b"")

    def empty():
        # NIXL's Python helper refuses an empty list itself; the list type takes one.
        bind = sys.modules[type(a.agent).__module__]
        none = bind.nixlXferDList(bind.DRAM_SEG)
        return run(a, "WRITE", none, none, "bad-b", b"")

    cases = [
        ("length mismatch", xfer([(xa, 4096, 0)], [(ya, 8192, 0)])),
        ("count mismatch", xfer([(xa, 4096, 0), (xa + 8192, 4096, 0)], [(ya, 4096, 0)])),
        ("unknown agent", xfer([(xa, 4096, 0)], [(ya, 4096, 0)], peer="nobody")),
        ("unregistered local memory", xfer([(stray.ctypes.data, 4096, 0)], [(ya, 4096, 0)])),
        ("remote range beyond the registration", xfer([(xa, 4096, 0)], [(ya + 1 * MiB - 2048, 4096, 0)])),
        ("an empty descriptor list", empty),
    ]
    for what, fn in cases:
        err = nixl_error(fn)
        results.check(err is not None and err.startswith("nixl"), f"bad input: {what}", f"raised {err}")
    err = nixl_error(lambda: make_agent("bad-opt", num_channels="many"))
    results.check(err is not None and err.startswith("nixl"), "bad input: a bad backend option", f"raised {err}")
    err = nixl_error(lambda: make_agent("bad-opt2", auth_key_file="/nonexistent/key"))
    results.check(err is not None and err.startswith("nixl"), "bad input: a missing auth key file", f"raised {err}")
    # Still working after all that.
    x[:] = pattern(x.nbytes, 3)
    state = run(a, "WRITE", a.get_xfer_descs([(xa, 1 * MiB, 0)], "DRAM"), a.get_xfer_descs([(ya, 1 * MiB, 0)], "DRAM"), "bad-b", b"ok")
    results.check(state == "DONE" and np.array_equal(x, y), "a good transfer after the bad ones", state)


def case_auth_key(results):
    """Agents given the same auth key file move data; an agent with another key is refused."""
    with tempfile.TemporaryDirectory() as d:
        k1, k2 = os.path.join(d, "k1"), os.path.join(d, "k2")
        for k in (k1, k2):
            with open(os.open(k, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(os.urandom(32))
        a, b, c = make_agent("key-a", auth_key_file=k1, num_channels="2"), make_agent("key-b", auth_key_file=k1), make_agent("key-c", auth_key_file=k2)
    x, y, z = (np.zeros(1 * MiB, dtype=np.uint8) for _ in range(3))
    xa, _ = register(a, x)
    ya, _ = register(b, y)
    za, _ = register(c, z)
    a.add_remote_agent(b.get_agent_metadata())
    a.add_remote_agent(c.get_agent_metadata())
    x[:] = pattern(x.nbytes, 11)
    local = a.get_xfer_descs([(xa, 1 * MiB, 0)], "DRAM")
    state = run(a, "WRITE", local, a.get_xfer_descs([(ya, 1 * MiB, 0)], "DRAM"), "key-b", b"")
    results.check(state == "DONE" and np.array_equal(x, y), "options: same auth key, 2 channels", state)
    try:
        state = run(a, "WRITE", local, a.get_xfer_descs([(za, 1 * MiB, 0)], "DRAM"), "key-c", b"")
    except Exception as e:
        state = f"raised {type(e).__name__}"
    results.check(state != "DONE" and not z.any(), "options: another key is refused", state)


def telemetry_child(pipe, folder):
    os.environ.update(NIXL_TELEMETRY_ENABLE="y", NIXL_TELEMETRY_DIR=folder)
    agents = []
    for name in ("tel-a", "tel-b"):
        agent = nixl_agent(name, nixl_agent_config(backends=[], capture_telemetry=True))
        agent.create_backend("TCPX", {"ip": "127.0.0.1"})
        agents.append(agent)
    a, b = agents
    x, y = np.zeros(1 * MiB, dtype=np.uint8), np.zeros(1 * MiB, dtype=np.uint8)
    xa, _ = register(a, x)
    ya, _ = register(b, y)
    a.add_remote_agent(b.get_agent_metadata())
    x[:] = pattern(x.nbytes, 31)
    states = [run(a, "WRITE", a.get_xfer_descs([(xa, 1 * MiB, 0)], "DRAM"), a.get_xfer_descs([(ya, 1 * MiB, 0)], "DRAM"), "tel-b", b"") for _ in range(20)]
    time.sleep(1.5)  # NIXL writes its telemetry on its own thread
    pipe.send((states, bool(np.array_equal(x, y)), sorted(os.listdir(folder))))


def case_telemetry(results):
    """With NIXL's telemetry on, the plugin queues its events in the base class's queue (NIXL
    1.4.0 never collects backend events; the agent records bytes and errors itself): transfers,
    NIXL's telemetry files and the process's exit stay intact."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        pipe, child = ctx.Pipe()
        proc = ctx.Process(target=telemetry_child, args=(child, folder), daemon=True)
        proc.start()
        got = pipe.recv() if pipe.poll(WAIT_S) else (["no answer"], False, [])
        proc.join(30)
        states, same, files = got
        ok = states == ["DONE"] * 20 and same and files == ["tel-a", "tel-b"] and proc.exitcode == 0
        results.check(ok, "telemetry on: transfers and a clean exit", f"{states[:1]}x{len(states)}, bytes {same}, files {files}, exit {proc.exitcode}")


def case_call_times(results):
    """UCCL_TCPX_NIXL_CALL_TIMES: one line per released request, counting the calls NIXL made
    into it (what scripts/nixl_plugin_bench.py --breakdown reads), against the caller's count, and
    saying whether its lists were a released request's."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "calls")
        os.environ["UCCL_TCPX_NIXL_CALL_TIMES"] = path
        try:
            t = TwoProcesses()  # the backend reads the variable when it is made
        finally:
            del os.environ["UCCL_TCPX_NIXL_CALL_TIMES"]
        try:
            local, remote = t.mem.descs(t.agent, [(0, 1 * MiB)]), t.remote([(0, 1 * MiB)])
            handle = t.agent.initialize_xfer("WRITE", local, remote, t.peer)
            states, checks, at_post = [], 0, 0
            for _ in range(3):
                state = t.agent.transfer(handle)
                at_post += state == "DONE"
                while state == "PROC":
                    os.sched_yield()
                    state = t.agent.check_xfer_state(handle)
                    checks += 1
                states.append(state)
            t.agent.release_xfer_handle(handle)
            # A handle released unposted: a line with no calls.
            t.agent.release_xfer_handle(t.agent.initialize_xfer("READ", local, remote, t.peer))
            # Ten made at once, released, and ten more: the backend keeps at most eight lists.
            for _ in range(2):
                batch = [t.agent.initialize_xfer("READ", local, remote, t.peer) for _ in range(10)]
                for h in batch:
                    t.agent.release_xfer_handle(h)
        finally:
            t.close()
        lines = open(path).read().splitlines() if os.path.exists(path) else []
    rows = [dict(kv.split("=", 1) for kv in line.split()) for line in lines]
    reused = [sum(r.get("reused") == "1" for r in rows[at : at + 10]) for at in (2, 12)]
    results.check(
        len(rows) == 22 and reused == [1, 8],
        "call times: released requests' lists kept, eight at most",
        f"{len(rows)} lines, reused in the two batches of ten: {reused}",
    )
    ok = states == ["DONE"] * 3 and len(rows) == 22
    if ok:
        w, r = rows[:2]
        ok = (
            (w["op"], w["bytes"], w["pieces"], w["posts"]) == ("WRITE", str(MiB), "1", "3")
            and (int(w["checks"]), int(w["done_at_post"])) == (checks, at_post)
            and int(w["post_ns"]) > 0
            and (int(w["check_ns"]) > 0) == (checks > 0)
            and (r["op"], r["posts"], r["checks"], r["post_ns"], r["check_ns"]) == ("READ", "0", "0", "0", "0")
            # The READ was made after the WRITE's release: it fills the lists that one left.
            and r["reused"] == "1"
        )
    results.check(ok, "call times: each request's calls counted", f"{states}, {checks} checks, {lines[:2]}")


def ucx_child(pipe):
    a = nixl_agent("ucx-a", nixl_agent_config(backends=["UCX"]))
    b = nixl_agent("ucx-b", nixl_agent_config(backends=["UCX"]))
    x, y = np.zeros(1 * MiB, dtype=np.uint8), np.zeros(1 * MiB, dtype=np.uint8)
    xa, _ = register(a, x)
    ya, _ = register(b, y)
    a.add_remote_agent(b.get_agent_metadata())
    x[:] = pattern(x.nbytes, 21)
    state = run(a, "WRITE", a.get_xfer_descs([(xa, 1 * MiB, 0)], "DRAM"), a.get_xfer_descs([(ya, 1 * MiB, 0)], "DRAM"), "ucx-b", b"u")
    pipe.send((state, bool(np.array_equal(x, y)), wait_notif(b, "ucx-a", b"u")))
    # The wheel's UCX crashes at process exit (a library destructor of its bundled libnl-route
    # faults in _dl_fini, with the wheel's own plugin folder too): leave without running them.
    os._exit(0)


def case_wheel_plugins(results):
    """The folder keeps the wheel's own plugins working: UCX moves data next to TCPX."""
    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=ucx_child, args=(child,), daemon=True)
    proc.start()
    got = pipe.recv() if pipe.poll(WAIT_S) else ("no answer", False, False)
    proc.join(10)
    state, same, notif = got
    results.check(state == "DONE" and same and notif, "the wheel's UCX plugin from the same folder", f"state {state}, bytes {same}, notif {notif}")


# ---- KV-cache block tables (vLLM's pull and push) ---------------------------------------------
# Shapes: (regions, blocks per region, block bytes, offset of region starts, blocks per request and
# region). Odd block sizes and offsets leave every block unaligned; the 100,000-block one is the
# size of a large serving request.
KV_SHAPES = [(1, 1, 4 * KiB, 0, 1), (4, 300, 4099, 3, 250), (2, 60000, 67, 1, 50000)]


def kv_regions(shape, seed):
    """The regions of one side: a list of uint8 arrays, region r starting `offset` bytes into its
    allocation and filled from `pattern(.., seed + r)`."""
    regions, blocks, block, offset, _ = shape
    out = []
    for r in range(regions):
        whole = np.zeros(offset + blocks * block, dtype=np.uint8)
        view = whole[offset:]
        view[:] = pattern(blocks * block, seed + r)
        out.append(view)
    return out


def kv_blocks(regions, shape):
    """Every block of every region, region-major: (address, length, device)."""
    _, blocks, block, _, _ = shape
    return [(reg.ctypes.data + b * block, block, 0) for reg in regions for b in range(blocks)]


def kv_target_main(pipe, options, shape):
    agent = make_agent("target", **options)
    regions = kv_regions(shape, 500)
    agent.register_memory(agent.get_reg_descs([(r.ctypes.data, r.nbytes, 0, "") for r in regions], "DRAM"))
    pipe.send((agent.get_agent_metadata(), kv_blocks(regions, shape)))
    block = shape[2]
    while True:
        cmd, *args = pipe.recv()
        if cmd == "check":  # a WRITE: once its notification is in, the blocks must hold the bytes
            msg, ridx, expected = args
            got = wait_notif(agent, "initiator", msg)
            flat = [r.reshape(-1, block) for r in regions]
            blocks = shape[1]
            ok = all(np.array_equal(flat[i // blocks][i % blocks], e) for i, e in zip(ridx, expected))
            pipe.send((got, ok))
        elif cmd == "notif":
            pipe.send(wait_notif(agent, "initiator", args[0]))


def case_kv(results, path):
    """Random block tables through prepared lists, as vLLM's NixlConnector sends them: both sides'
    block lists prepared once, then READs (pull) and WRITEs (push) of random blocks of every region
    into random blocks of ours, one notification each, every byte checked; nothing arrives twice or
    in the wrong block, and the notification comes after the data. One handle of each op is posted
    a second time, after the bytes it reads changed: its lists serve every post."""
    rng = np.random.default_rng(11)
    for shape in KV_SHAPES:
        n_regions, blocks, block, _, per_req = shape
        ctx = mp.get_context("spawn")
        pipe, child = ctx.Pipe()
        proc = ctx.Process(target=kv_target_main, args=(child, PATHS[path], shape), daemon=True)
        proc.start()
        t = TwoProcesses.__new__(TwoProcesses)
        t.pipe, t.proc = pipe, proc
        try:
            meta, remote_blocks = t.answer("start")
            agent = make_agent("initiator", **PATHS[path])
            mine = kv_regions(shape, 900)
            agent.register_memory(agent.get_reg_descs([(r.ctypes.data, r.nbytes, 0, "") for r in mine], "DRAM"))
            peer = agent.add_remote_agent(meta)
            local_side = agent.prep_xfer_dlist("", kv_blocks(mine, shape), "DRAM")
            remote_side = agent.prep_xfer_dlist(peer, remote_blocks, "DRAM")
            theirs = [pattern(blocks * block, 500 + r).reshape(-1, block) for r in range(n_regions)]
            for op in ("READ", "WRITE"):
                for rep in range(2):
                    lidx = np.concatenate([r * blocks + rng.choice(blocks, per_req, replace=False) for r in range(n_regions)])
                    ridx = np.concatenate([r * blocks + rng.choice(blocks, per_req, replace=False) for r in range(n_regions)])
                    flat = [m.reshape(-1, block) for m in mine]
                    msg = f"kv-{op}-{rep}".encode()
                    handle = agent.make_prepped_xfer(op, local_side, lidx, remote_side, ridx, msg)
                    try:
                        # The second request is posted twice: a handle's lists serve every post of
                        # it. Between the posts the bytes the op reads change (a READ's target
                        # blocks here are zeroed, a WRITE's source blocks get new bytes).
                        for post in range(1 + rep):
                            if post:
                                for li in lidx:
                                    flat[li // blocks][li % blocks] = 0 if op == "READ" else (li + 7) % 251
                            state = agent.transfer(handle)
                            deadline = time.monotonic() + WAIT_S
                            while state == "PROC" and time.monotonic() < deadline:
                                os.sched_yield()
                                state = agent.check_xfer_state(handle)
                            if op == "READ":
                                ok = all(
                                    np.array_equal(flat[li // blocks][li % blocks], theirs[ri // blocks][ri % blocks])
                                    for li, ri in zip(lidx, ridx)
                                )
                                got = t.ask("notif", msg)
                            else:
                                expected = [flat[li // blocks][li % blocks].copy() for li in lidx]
                                got, ok = t.ask("check", msg, ridx, expected)
                                for ri, e in zip(ridx, expected):  # what the target holds now
                                    theirs[ri // blocks][ri % blocks] = e
                            what = (
                                f"{path}: KV {op} of {len(lidx)} blocks of {block} B ({n_regions} regions), "
                                f"request {rep}" + (", posted again" if post else "")
                            )
                            results.check(state == "DONE" and ok and got, what, f"state {state}, bytes {ok}, notif {got}")
                    finally:
                        agent.release_xfer_handle(handle)
        finally:
            t.close()


class Results:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, ok, what, detail=""):
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""), flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1


def main():
    args = sys.argv[1:]
    # --initiator KIND / --target KIND (DRAM or VRAM) and --gpu N: the memory of the two-process
    # checks and of the agent-to-itself check (VRAM needs torch and a GPU); the rest is host memory.
    while args and args[0] in ("--initiator", "--target", "--gpu"):
        if len(args) < 2:
            sys.exit(f"{args[0]} needs a value")
        key, value = args[0][2:], args[1]
        if key != "gpu" and value not in ("DRAM", "VRAM"):
            sys.exit(f"--{key} takes DRAM or VRAM, not {value}")
        MEM[key] = int(value) if key == "gpu" else value
        args = args[2:]
    cases = args or [
        "two_processes", "kv", "self", "notifs", "connect_on_load", "bad_input", "auth", "telemetry", "call_times", "ucx",
    ]
    results = Results()
    for case in cases:
        try:
            if case == "two_processes":
                t = case_two_processes(results, "same-host path")
                t.close()
                # The network path, where a stopped peer cannot be reached around (the same-host
                # path may copy into a stopped process's memory once it was granted).
                t = case_two_processes(results, "network path")
                try:
                    case_big_region(results, t)
                    case_release_in_flight(results, t)
                    case_dead_peer(results, t)
                finally:
                    t.close()
            elif case == "kv":
                case_kv(results, "same-host path")
                case_kv(results, "network path")
            elif case == "self":
                case_self(results)
            elif case == "notifs":
                case_notifs_in_one_process(results)
            elif case == "connect_on_load":
                case_connect_on_load(results)
            elif case == "bad_input":
                case_bad_input(results)
            elif case == "auth":
                case_auth_key(results)
            elif case == "telemetry":
                case_telemetry(results)
            elif case == "call_times":
                case_call_times(results)
            elif case == "ucx":
                case_wheel_plugins(results)
            else:
                raise ValueError(f"unknown case {case}")
        except Exception:
            traceback.print_exc()
            results.check(False, f"case {case} raised")
    print(f"{results.passed} passed, {results.failed} failed", flush=True)
    sys.exit(min(results.failed, 100))


if __name__ == "__main__":
    main()
