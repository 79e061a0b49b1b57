#!/usr/bin/env python3
"""NIXL's transfer time, two agents in two processes of this host, for several backend setups in
one run: our TCPX plugin on the network path and on the same-host path, and NIXL's UCX plugin with
UCX_TLS=tcp and with UCX's defaults. Run by scripts/nixl_plugin_bench.sh (host memory). With
--vram I,T the initiator's buffer is GPU I's memory and the target's GPU T's (torch tensors), and
each TCPX engine serves its agent's GPU; there UCX over TCP is ucx-tcp-cuda (UCX_TLS=tcp,cuda_copy:
UCX stages GPU memory through host memory with cuda_copy and moves it over TCP, the TCP anchor for
VRAM), which replaces ucx-tcp (TCP alone cannot reach GPU memory) in the default setups.

Each point: WRITE or READ of one descriptor, timed from transfer() to DONE (polled with
check_xfer_state, yielding the CPU between polls), after two untimed ones; the median and GB/s
from the mean. Setups alternate within each round, so load changes hit all of them alike.
Also, for TCPX: 10,000 descriptors of 4 KiB in one request, the time to prepare (initialize_xfer)
and to post (transfer) it.

With --kv REGIONSxBLOCKSxPER_REQxBLOCK_SIZE (with --vram too), instead: a reader shaped like vLLM's
pull mode and its push variant, timed against one descriptor of the same bytes (see kv_measure;
--kv-concurrent C: C requests in flight at once, their aggregate against one descriptor alone); also
the initiator thread's CPU time in make_prepped_xfer and in transfer() per descriptor, which the
wall time of a post on a busy host hides (the caller loses its core to the threads moving the bytes).
With --kv-readers N also: N such readers at once, each an initiator process with a target process of
its own, on GPUs every target on GPU T and the readers on --reader-gpus; each reader's time under load
against its anchor alone, and their aggregate against one reader's anchor alone (see KvGroup).
With --kv-all-to-all G instead: G agents, each a target and an initiator in one process (with --vram
agent k on GPU k), each step every agent one request to every other at once; each ordered pair's
time under load, against the pairs' anchors alone, and any stalled step (see KvA2aAgent).

With --sglang ROOMSxCHUNKSxPAGESxPAGE_SIZE (with --vram too), instead: SGLang's prefill->decode push
(4 transfer threads sharing the prefill agent, rooms cut into chunks, kv and aux notifications),
each run's time to the last notification and each room's, against NIXL's UCX (see sglang_measure).

With --breakdown, instead: where one request's time goes (see breakdown_measure), on the same-host
path (tcpx-local) by default, against uccl-tcpx-bench on the same path and sizes in the same rounds
when --bench names its binary (--same-host for tcpx-local).

usage: nixl_plugin_bench.py [--rounds N] [--sizes 4K,1M,64M] [--setups tcpx-net,tcpx-local,ucx-tcp,ucx]
                            (with --vram: tcpx-net,tcpx-local,ucx-tcp-cuda,ucx)
                            [--vram I,T] [--json FILE]
       nixl_plugin_bench.py --kv 8x1024x256x16K [--kv-requests N] [--kv-concurrent C] [--rounds N] [--setups ...]
       nixl_plugin_bench.py --kv 8x1024x256x16K --kv-readers N [--reader-gpus 1,2,3] [--kv-requests N] [--vram I,T] ...
       nixl_plugin_bench.py --kv 8x1024x128x16K --kv-all-to-all G [--kv-requests N] [--vram 0,0] ...
       nixl_plugin_bench.py --sglang 24x3x24x64K [--rounds N] [--setups tcpx-net,tcpx-local,ucx] [--vram I,T]
                            [--sglang-settle S] [--sglang-registered S]
                            [--sglang-sync strict|rw]
       nixl_plugin_bench.py --breakdown [--bench PATH] [--rounds N] [--sizes 4K,1M] [--vram I,T]
                            [--initiator-param UCCL_TCPX_CONTROL_SPIN_US=0 ...]
"""

import argparse
import functools
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait as wait_any

import numpy as np

try:
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
except ImportError:
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except ImportError:
        from nixl_cu13._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

SETUPS = {
    # name: (backend, backend parameters, environment of both processes)
    "tcpx-net": ("TCPX", {"ip": "127.0.0.1"}, {"UCCL_TCPX_DISABLE_IPC": "1"}),
    "tcpx-local": ("TCPX", {"ip": "127.0.0.1"}, {}),
    "ucx-tcp": ("UCX", {}, {"UCX_TLS": "tcp"}),
    "ucx-tcp-cuda": ("UCX", {}, {"UCX_TLS": "tcp,cuda_copy"}),
    "ucx": ("UCX", {}, {}),
}
# The plugin transport over the fake devmem NIC (crates/fake-tcpx) in GPU mode, both agents on this
# host, when UCCL_TCPX_FAKE_PLUGIN names libfake_tcpx.so: the TCPX path's shape without TCPX NICs.
if os.environ.get("UCCL_TCPX_FAKE_PLUGIN"):
    SETUPS["tcpx-fake"] = ("TCPX", {"ip": "127.0.0.1"}, {
        "UCCL_TCPX_TRANSPORT": "tcpx", "UCCL_TCPX_PLUGIN": os.environ["UCCL_TCPX_FAKE_PLUGIN"],
        "FAKE_TCPX_MODE": "gpu", "UCCL_TCPX_LOCAL_PEERS": "plugin", "FAKE_TCPX_SAME_HOST": "allow",
        "FAKE_TCPX_STEERING_WAIT_MS": "0"})
    # The same in host mode (bounce pool in host memory, gathered on the CPU): the plugin path's
    # shape on a host without a GPU. Without same-host identities, or host memory would take the
    # same-host copy (process_vm_readv) instead of the plugin.
    SETUPS["tcpx-fake-host"] = (*SETUPS["tcpx-fake"][:2], {
        **SETUPS["tcpx-fake"][2], "FAKE_TCPX_MODE": "host", "UCCL_TCPX_DISABLE_IPC": "1"})
    # The fake standing in for A3-Mega's GPUDirect-TCPXO (receives written into the buffer posted,
    # host memory refused in requests), driven by the engine's tcpxo profile; GPU mode.
    SETUPS["tcpxo-fake"] = (*SETUPS["tcpx-fake"][:2], {
        **SETUPS["tcpx-fake"][2], "UCCL_TCPX_TRANSPORT": "tcpxo", "FAKE_TCPX_PLUGIN_KIND": "tcpxo"})
ITERS = {4 << 10: 200, 1 << 20: 50, 64 << 20: 8}
# The GPUs of the initiator's and the target's memory (--vram); None: host memory.
VRAM = None
# Backend parameters of the initiator's TCPX backend alone (--initiator-param), such as an engine
# setting (UCCL_TCPX_...) tried on one side.
INITIATOR_PARAMS = {}


def start_target(setup, body, *args):
    """Starts `body(pipe, *args)`, a target, in a spawned process, both processes under `setup`'s
    environment until `end_target`: (the environment before, this end's pipe, the process)."""
    saved = dict(os.environ)
    os.environ.update(SETUPS[setup][2])
    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=body, args=(child, *args), daemon=True)
    proc.start()
    return saved, pipe, proc


def end_target(proc, saved):
    """Joins (else kills) a target process and puts back the environment a setup changed."""
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    os.environ.clear()
    os.environ.update(saved)


class Buffer:
    """Host memory (numpy) or, on a GPU, a torch tensor; `fill` is its bytes' value."""

    def __init__(self, size, fill, gpu=None):
        self.kind, self.dev = ("DRAM", 0) if gpu is None else ("VRAM", gpu)
        if gpu is None:
            self.mem = np.full(size, fill, dtype=np.uint8)
            self.addr = self.mem.ctypes.data
        else:
            import torch

            self.mem = torch.full((size,), fill, dtype=torch.uint8, device=f"cuda:{gpu}")
            torch.cuda.synchronize(self.mem.device)
            self.addr = self.mem.data_ptr()
        self.size = size

    def register(self, agent):
        agent.register_memory(agent.get_reg_descs([(self.addr, self.size, self.dev, "")], self.kind))

    def descs(self, agent, ranges):
        return xfer_descs(agent, (self.addr, self.kind, self.dev), ranges)


def xfer_descs(agent, where, ranges):
    """Descriptors of `ranges` (offset, length) of the memory at `where`: (address, kind, device)."""
    addr, kind, dev = where
    return agent.get_xfer_descs([(addr + o, n, dev) for o, n in ranges], kind)


def parse_size(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def mono_clock():
    """CLOCK_MONOTONIC in seconds: one clock for every process of this host, so that times taken in
    two processes compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def make_agent(name, setup, gpu, sglang=False, initiator=False):
    """An agent named `name` with `setup`'s backend (serving GPU `gpu`); the initiator's backend
    parameters (--initiator-param) when named "initiator" or `initiator`."""
    backend, params, _ = SETUPS[setup]
    params = dict(params)
    if backend == "TCPX" and gpu is not None:
        params["gpu"] = str(gpu)
    if backend == "TCPX" and (name == "initiator" or initiator):
        params.update(INITIATOR_PARAMS)
    config = nixl_agent_config(backends=[])
    if sglang:
        # As SGLang's NixlKVManager: STRICT (unless --sglang-sync rw), for its transfer threads
        # share the prefill agent (without a listen thread NIXL would take NONE), and 8 threads
        # for the prefill's UCX.
        sync = nixl_thread_sync_t.NIXL_THREAD_SYNC_RW if SG_SYNC == "rw" else nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
        config = nixl_agent_config(backends=[], sync_mode=sync)
        if backend == "UCX" and name == "initiator":
            params.setdefault("num_threads", "8")
    agent = nixl_agent(name, config)
    agent.create_backend(backend, params)
    return agent


def leave():
    """Ends this process without Python's teardown: NIXL's UCX crashes in a library destructor at
    exit, which would turn a finished run into a failure. With UCCL_TCPX_TRACE set, through the C
    library's exit instead, so that the engine's exit handler writes the trace (it runs before the
    destructors, having been registered after them)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("UCCL_TCPX_TRACE"):
        import ctypes
        ctypes.CDLL(None).exit(0)
    os._exit(0)


def target(pipe, setup, size, vram):
    for k, v in SETUPS[setup][2].items():
        os.environ[k] = v
    gpu = vram[1] if vram else None
    agent = make_agent("target", setup, gpu)
    buf = Buffer(max(size, 10000 * 4096), 0, gpu)
    buf.register(agent)
    pipe.send((agent.get_agent_metadata(), (buf.addr, buf.kind, buf.dev)))
    pipe.recv()  # until the initiator is done
    leave()


def wait(agent, handle, state):
    while state == "PROC":
        os.sched_yield()
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"transfer ended {state}")


def measure(setup, size, many):
    """{op: [seconds per transfer]}, and for `many` the (prepare, post) seconds of 10,000 x 4 KiB."""
    saved, pipe, proc = start_target(setup, target, setup, size, VRAM)
    try:
        meta, remote_buf = pipe.recv()
        gpu = VRAM[0] if VRAM else None
        agent = make_agent("initiator", setup, gpu)
        buf = Buffer(max(size, 10000 * 4096), 1, gpu)
        buf.register(agent)
        peer = agent.add_remote_agent(meta)
        out = {}
        for op in ("WRITE", "READ"):
            local = buf.descs(agent, [(0, size)])
            remote = xfer_descs(agent, remote_buf, [(0, size)])
            handle = agent.initialize_xfer(op, local, remote, peer)
            times = []
            for i in range(ITERS.get(size, 20) + 2):
                start = time.perf_counter()
                wait(agent, handle, agent.transfer(handle))
                if i >= 2:
                    times.append(time.perf_counter() - start)
            agent.release_xfer_handle(handle)
            out[op] = times
        if many:
            n = 10000
            local = buf.descs(agent, [(4096 * k, 4096) for k in range(n)])
            remote = xfer_descs(agent, remote_buf, [(4096 * k, 4096) for k in range(n)])
            start = time.perf_counter()
            handle = agent.initialize_xfer("WRITE", local, remote, peer)
            prepared = time.perf_counter()
            state = agent.transfer(handle)
            posted = time.perf_counter()
            wait(agent, handle, state)
            done = time.perf_counter()
            agent.release_xfer_handle(handle)
            out["many"] = (prepared - start, posted - prepared, done - start)
        pipe.send("done")
        return out
    finally:
        end_target(proc, saved)



# ---- Breakdown (--breakdown): where one request's time goes ----------------------------------------
# Each request is timed as above (transfer() to DONE), and within it: the transfer() call, each
# check_xfer_state call, and the polls. Our plugin, with UCCL_TCPX_NIXL_CALL_TIMES naming a file,
# appends per request handle the calls NIXL made into it and the nanoseconds they took (postXfer,
# which ends with a check, and checkXfer), so NIXL's own part of transfer() and of check_xfer_state
# is what the call took less what the plugin took inside it. NIXL's floor, per call: check_xfer_state
# on a handle already DONE (the agent answers from its own state, reaching no backend; the plugin's
# count confirms it), and os.sched_yield (what the loop adds per poll).
BREAKDOWN_ITERS = {4 << 10: 2000, 1 << 20: 500}
# The setups uccl-tcpx-bench has a path of: whether it runs with --same-host for them.
BENCH_SAME_HOST = {"tcpx-local": True, "tcpx-net": False}
FLOOR_CALLS = 2000


def read_call_times(path):
    """The plugin's lines, oldest first, as dicts of ints (op stays a string)."""
    rows = []
    with open(path) as f:
        for line in f:
            row = dict(kv.split("=", 1) for kv in line.split())
            rows.append({k: (v if k == "op" else int(v)) for k, v in row.items()})
    return rows


def timed_requests(agent, handle, iters):
    """(total s, transfer() s, check_xfer_state calls, their s) of each of `iters` requests."""
    out = []
    clock = time.perf_counter
    for _ in range(iters):
        start = clock()
        state = agent.transfer(handle)
        posted = clock()
        checks, in_checks = 0, 0.0
        while state == "PROC":
            os.sched_yield()
            t = clock()
            state = agent.check_xfer_state(handle)
            in_checks += clock() - t
            checks += 1
        if state != "DONE":
            raise RuntimeError(f"transfer ended {state}")
        out.append((clock() - start, posted - start, checks, in_checks))
    return out


def call_floor(call):
    """Seconds per call of `call`, over FLOOR_CALLS calls."""
    start = time.perf_counter()
    for _ in range(FLOOR_CALLS):
        call()
    return (time.perf_counter() - start) / FLOOR_CALLS


def breakdown_measure(setup, size):
    """{op: dict of per-request means (us) and counts} for one descriptor of `size` bytes."""
    saved, pipe, proc = start_target(setup, target, setup, size, VRAM)
    fd, times_path = tempfile.mkstemp(prefix="nixl-call-times-")
    os.close(fd)
    try:
        if not pipe.poll(60):
            raise RuntimeError("the target did not start")
        meta, remote_buf = pipe.recv()
        gpu = VRAM[0] if VRAM else None
        # Only the initiator's plugin times its calls: the target was started without it.
        os.environ["UCCL_TCPX_NIXL_CALL_TIMES"] = times_path
        agent = make_agent("initiator", setup, gpu)
        buf = Buffer(max(size, 10000 * 4096), 1, gpu)
        buf.register(agent)
        peer = agent.add_remote_agent(meta)
        iters = BREAKDOWN_ITERS.get(size, 20)
        out = {}
        for op in ("WRITE", "READ"):
            local = buf.descs(agent, [(0, size)])
            remote = xfer_descs(agent, remote_buf, [(0, size)])
            warm = agent.initialize_xfer(op, local, remote, peer)
            timed_requests(agent, warm, 3)
            agent.release_xfer_handle(warm)
            handle = agent.initialize_xfer(op, local, remote, peer)
            reqs = timed_requests(agent, handle, iters)
            done_check = call_floor(lambda: agent.check_xfer_state(handle))
            agent.release_xfer_handle(handle)
            plugin = read_call_times(times_path)[-1]
            polls = sum(r[2] for r in reqs)
            if plugin["op"] != op or plugin["posts"] != iters or plugin["checks"] != polls:
                raise RuntimeError(f"the plugin saw {plugin}, the loop {iters} posts and {polls} checks")
            mean = lambda k: statistics.mean(r[k] for r in reqs) * 1e6  # noqa: E731
            out[op] = {
                "p50": statistics.median(r[0] for r in reqs) * 1e6,
                "total": mean(0),
                "transfer": mean(1),
                "transfer_p50": statistics.median(r[1] for r in reqs) * 1e6,
                "checks": mean(3),
                "polls": polls / iters,
                "post_ns": plugin["post_ns"] / iters / 1e3,
                "check_ns": plugin["check_ns"] / iters / 1e3,
                "done_at_post": plugin["done_at_post"] / iters,
                "done_check": done_check * 1e6,
            }
        out["yield"] = call_floor(os.sched_yield) * 1e6
        pipe.send("done")
        return out
    finally:
        os.unlink(times_path)
        end_target(proc, saved)


def bench_points(bench, sizes, same_host):
    """{(op, size): (p50 us, GB/s, post p50 us)} of uccl-tcpx-bench on `sizes`, this memory, on the
    same-host path or the network path."""
    cmd = [bench, "--ops", "write,read", "--no-baseline", "--json", "--sizes", ",".join(str(s) for s in sizes)]
    if same_host:
        cmd.append("--same-host")
    if VRAM:
        cmd += ["--device", "gpu", "--gpu", str(VRAM[0]), "--peer-gpu", str(VRAM[1])]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {(r["op"].upper(), r["size"]): (r["p50_us"], r["gb_per_s"], r["post_p50_us"]) for r in res["results"]}


def breakdown_main(sizes, setups, rounds, bench):
    rows = {}  # (setup, op, size) -> [per-round dict]
    for r in range(rounds):
        # The bench on each setup's path (other setups have none).
        paths = {BENCH_SAME_HOST[s] for s in setups if s in BENCH_SAME_HOST}
        anchors = {same: bench_points(bench, sizes, same) for same in paths} if bench else {}
        for size in sizes:
            for setup in setups:
                got = breakdown_measure(setup, size)
                anchor = anchors.get(BENCH_SAME_HOST.get(setup), {})
                for op in ("WRITE", "READ"):
                    row = dict(got[op], yield_us=got["yield"])
                    if (op, size) in anchor:
                        p50, gbps, post = anchor[(op, size)]
                        row["bench_p50"], row["bench_post"] = p50, post
                        row["x_p50"] = row["p50"] / p50
                        row["x_rate"] = size / row["total"] / 1e3 / gbps
                    rows.setdefault((setup, op, size), []).append(row)
        print(f"breakdown round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    print(
        "Per request, us (medians over rounds of each round's mean; p50: median request). NIXL's own: "
        "transfer() less our postXfer, check_xfer_state less our checkXfer. bench: its p50 and its post "
        "call's p50; x bench: p50 over the bench's p50, rate over its GB/s, same round."
    )
    print(
        "| setup | op | size | p50 | mean | transfer() | transfer() p50 | our postXfer | done at post | polls | checks | our checkXfer "
        "| NIXL's own | ours | loop+wait | check on DONE | sched_yield | bench p50 | bench post | x bench p50 "
        "| x bench rate |"
    )
    print("|---|---|---|" + "---|" * 18)
    for (setup, op, size), vals in rows.items():
        m = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
        nixl = statistics.median(v["transfer"] - v["post_ns"] + v["checks"] - v["check_ns"] for v in vals)
        ours = statistics.median(v["post_ns"] + v["check_ns"] for v in vals)
        rest = statistics.median(v["total"] - v["transfer"] - v["checks"] for v in vals)
        name = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        x = [f"{m[k]:.2f}" if k in m else "-" for k in ("bench_p50", "bench_post", "x_p50", "x_rate")]
        print(
            f"| {setup} | {op} | {name} | {m['p50']:.1f} | {m['total']:.1f} | {m['transfer']:.2f} | {m['transfer_p50']:.2f} | {m['post_ns']:.2f} "
            f"| {m['done_at_post']:.2f} | {m['polls']:.1f} | {m['checks']:.2f} | {m['check_ns']:.2f} | {nixl:.2f} "
            f"| {ours:.2f} | {rest:.2f} | {m['done_check']:.3f} | {m['yield_us']:.3f} | {' | '.join(x)} |"
        )
    return rows


# ---- KV case (--kv): a reader shaped like vLLM's NixlConnector in pull mode ----------------------
# The target registers REGIONS regions (one per layer x K/V) of BLOCKS blocks each; the initiator
# has the same layout. The initiator prepares both sides' block lists once (prep_xfer_dlist), then
# each request READs (pull) or WRITEs (push) PER_REQ random blocks of every region into PER_REQ
# random blocks of the other side (make_prepped_xfer with index lists, one notification per
# request). Every byte is checked: READs by the initiator, WRITEs by the target once their
# notification is in. Anchor, same run and setup: one descriptor of the same bytes, made and posted
# the same way. Each cell: time from make_prepped_xfer to DONE; `data ratio` is the anchor's time
# over the request's from its post's return to DONE (its data phase). Each request follows an untimed
# anchor and its timed anchor follows it, so both find the GPUs and their links busy: after the
# check's idle (100 ms or more) a copy between two H200s takes about 1.6x as long, and a request
# timed cold against an anchor timed warm read as the request's own cost (perf-log/kv-same-host.md).


def kv_pattern(regions, blocks, block, seed):
    """The bytes a side's regions start with: a (regions, blocks, block) uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, size=(regions, blocks, block), dtype=np.uint8)


class KvMem:
    """One side's regions, (regions, blocks, block) bytes: numpy (host memory) or a torch tensor on
    GPU `gpu`; each region registered on its own, as vLLM registers one per layer and K/V."""

    def __init__(self, shape, seed, gpu=None):
        self.shape = shape
        self.kind, self.dev, self.gpu = ("DRAM", 0, None) if gpu is None else ("VRAM", gpu, gpu)
        host = kv_pattern(*shape, seed)
        if gpu is None:
            self.mem = host
        else:
            import torch

            self.mem = torch.from_numpy(host).to(f"cuda:{gpu}")
            torch.cuda.synchronize(self.mem.device)

    def fill(self, seed):
        host = kv_pattern(*self.shape, seed)
        if self.gpu is None:
            self.mem[...] = host
        else:
            import torch

            self.mem.copy_(torch.from_numpy(host).to(self.mem.device))
            torch.cuda.synchronize(self.mem.device)

    def base(self, r):
        return self.mem[r].ctypes.data if self.gpu is None else self.mem[r].data_ptr()

    def register(self, agent):
        regions, blocks, block = self.shape
        regs = [(self.base(r), blocks * block, self.dev, "") for r in range(regions)]
        agent.register_memory(agent.get_reg_descs(regs, self.kind))

    def blocks(self):
        """Every block of every region, region-major: index r * blocks + b."""
        regions, blocks, block = self.shape
        return [(self.base(r) + b * block, block, self.dev) for r in range(regions) for b in range(blocks)]

    def rows(self):
        """The bytes as a (regions * blocks, block) numpy array."""
        block = self.shape[2]
        if self.gpu is None:
            return self.mem.reshape(-1, block)
        import torch

        torch.cuda.synchronize(self.mem.device)
        return self.mem.cpu().numpy().reshape(-1, block)


KV_WAIT_S = 120  # the longest a KV request may take to DONE, and a step of several agents (barrier, parent)
KV_NOTIF_S = 30  # the longest a WRITE's target waits for its notification


def wait_all(agent, handles, states, timeout=KV_WAIT_S):
    """Polls posted `handles` (`states`: their transfer() answers) until every one is DONE, yielding
    the CPU between rounds: each one's DONE time in CLOCK_MONOTONIC s. Raises on an error, or with
    some still in flight after `timeout` s (a stall, reported rather than waited out)."""
    if any(s not in ("PROC", "DONE") for s in states):
        raise RuntimeError(f"transfer() answered {states}")
    dones = [mono_clock() if s == "DONE" else None for s in states]
    pending = [k for k, s in enumerate(states) if s == "PROC"]
    deadline = mono_clock() + timeout
    while pending:
        os.sched_yield()
        for k in list(pending):
            state = agent.check_xfer_state(handles[k])
            if state == "DONE":
                dones[k] = mono_clock()
                pending.remove(k)
            elif state != "PROC":
                raise RuntimeError(f"transfer ended {state}")
        if pending and mono_clock() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(handles)} requests not DONE after {timeout} s")
    return dones


def kv_tables(shape, rng, n):
    """Block tables of `n` requests on one side: PER_REQ distinct random blocks of each region for
    each, no block in two of them; indices r * BLOCKS + b, region-major."""
    regions, blocks, _, per_req = shape
    picks = [rng.choice(blocks, per_req * n, replace=False) for _ in range(regions)]
    return [
        np.concatenate([r * blocks + picks[r][k * per_req:(k + 1) * per_req] for r in range(regions)])
        for k in range(n)
    ]


def kv_target_side(agent, shape, gpu, seed):
    """A target's regions (bytes from `seed`) and anchor (one request's bytes), registered on `agent`
    as one per layer and K/V: (regions, anchor, what a peer needs to reach them: (block list, anchor
    descriptor, memory kind))."""
    regions, blocks, block, per_req = shape
    mem = KvMem((regions, blocks, block), seed, gpu)
    mem.register(agent)
    anchor = KvMem((1, 1, regions * per_req * block), 7, gpu)
    anchor.register(agent)
    return mem, anchor, (mem.blocks(), anchor.blocks()[0], mem.kind)


class Notifs:
    """An agent's notifications in, kept until waited for: requests in flight together may notify in
    one batch."""

    def __init__(self, agent):
        self.agent, self.seen, self.count = agent, set(), 0

    def wait(self, tag, timeout=KV_NOTIF_S):
        """Whether `tag` came in within `timeout` s."""
        deadline = time.monotonic() + timeout
        while tag not in self.seen and time.monotonic() < deadline:
            for msgs in self.agent.get_new_notifs().values():
                self.count += len(msgs)
                self.seen.update(msgs)
            if tag not in self.seen:
                time.sleep(0.0002)
        got = tag in self.seen
        self.seen.discard(tag)
        return got


def kv_target(pipe, setup, shape, gpu):
    for k, v in SETUPS[setup][2].items():
        os.environ[k] = v
    regions, blocks, block, _ = shape
    agent = make_agent("target", setup, gpu)
    mem, _anchor, reach = kv_target_side(agent, shape, gpu, 2)
    pipe.send((agent.get_agent_metadata(), *reach))
    bad = 0
    notifs = Notifs(agent)
    src = None  # the initiator's bytes, made at the first check
    while True:
        try:
            cmd = pipe.recv()
        except EOFError:  # the initiator is gone, and says why
            break
        if cmd[0] == "done":
            pipe.send((notifs.count, bad))
            break
        # ("check", tag, remote_idx, local_idx): a WRITE request's blocks, to check once its
        # notification is in (the notification comes after the data).
        _, tag, ridx, lidx = cmd
        got = notifs.wait(tag)
        if src is None:
            src = kv_pattern(regions, blocks, block, 1).reshape(-1, block)
        ok = got and np.array_equal(mem.rows()[ridx], src[lidx])
        bad += 0 if ok else 1
        pipe.send(ok)
    leave()


class KvPeer:
    """A peer's regions and anchor as an agent reaches them, both prepared once (prep_xfer_dlist);
    `rows`: the bytes its regions start with (from `seed`), made when first checked against."""

    def __init__(self, agent, meta, reach, shape, seed):
        remote_blocks, remote_anchor, remote_kind = reach
        self.name = agent.add_remote_agent(meta)
        self.label = self.name.decode() if isinstance(self.name, bytes) else self.name
        self.side = agent.prep_xfer_dlist(self.name, remote_blocks, remote_kind)
        self.anchor = agent.prep_xfer_dlist(self.name, [remote_anchor], remote_kind)
        self.shape, self.seed = shape, seed

    @functools.cached_property
    def rows(self):
        regions, blocks, block, _ = self.shape
        return kv_pattern(regions, blocks, block, self.seed).reshape(-1, block)


class KvAgent:
    """An initiator's side in this process: its agent (named `name`, the initiator's backend
    parameters), its regions (bytes from `seed`) and the anchor, one descriptor of one request's
    bytes, both registered and prepared once (prep_xfer_dlist); its peers are KvPeers. A step: a
    tuple (local tables, remote tables, notifications, peers), one entry per request."""

    def __init__(self, name, setup, shape, gpu, seed):
        regions, blocks, block, per_req = shape
        self.setup, self.shape, self.seed = setup, shape, seed
        self.agent = agent = make_agent(name, setup, gpu, initiator=True)
        self.mem = KvMem((regions, blocks, block), seed, gpu)
        self.mem.register(agent)
        self.anchor_mem = KvMem((1, 1, regions * per_req * block), 7, gpu)
        self.anchor_mem.register(agent)
        self.local_side = agent.prep_xfer_dlist("", self.mem.blocks(), self.mem.kind)
        self.anchor_local = agent.prep_xfer_dlist("", self.anchor_mem.blocks(), self.anchor_mem.kind)

    def __enter__(self):
        return self

    def __exit__(self, failed, *_):
        self.end(failed)

    def end(self, failed):
        pass

    def add_peer(self, meta, reach, seed):
        """A peer from its metadata and kv_target_side's `reach`, its regions' bytes from `seed`."""
        return KvPeer(self.agent, meta, reach, self.shape, seed)

    def begin(self, op):
        """Before an op's requests: WRITEs send this side's own bytes, which READs overwrote."""
        if op == "WRITE":
            self.mem.fill(self.seed)

    def run(self, op, step):
        """Makes, posts and waits for a step's requests together: (start, made, posted, the last
        DONE) in CLOCK_MONOTONIC s, the calling thread's CPU s in make_prepped_xfer and in
        transfer(), and each request's DONE."""
        agent = self.agent
        cpu_start = time.thread_time_ns()
        start = mono_clock()
        handles = [
            agent.make_prepped_xfer(op, self.local_side, lidx, peer.side, ridx, tag)
            for lidx, ridx, tag, peer in zip(*step)
        ]
        made = mono_clock()
        cpu_made = time.thread_time_ns()
        states = [agent.transfer(h) for h in handles]
        posted = mono_clock()
        cpu_posted = time.thread_time_ns()
        dones = wait_all(agent, handles, states)
        for handle in handles:
            agent.release_xfer_handle(handle)
        cpu = ((cpu_made - cpu_start) * 1e-9, (cpu_posted - cpu_made) * 1e-9)
        return (start, made, posted, max(dones)), cpu, dones

    def anchor_to(self, op, peer, tag):
        """Seconds to DONE of the anchor to `peer`: one request's bytes as one descriptor, made and
        posted alike."""
        start = mono_clock()
        handle = self.agent.make_prepped_xfer(op, self.anchor_local, [0], peer.anchor, [0], tag)
        done = wait_all(self.agent, [handle], [self.agent.transfer(handle)])[0]
        self.agent.release_xfer_handle(handle)
        return done - start

    def check_reads(self, i, step):
        """Every byte a step's READs brought here."""
        rows = self.mem.rows()
        for lidx, ridx, _, peer in zip(*step):
            if not np.array_equal(rows[lidx], peer.rows[ridx]):
                raise RuntimeError(f"{self.setup} KV READ {i} from {peer.label}: wrong bytes")


class KvInitiator(KvAgent):
    """The KV case's initiator in this process and its target in a process of its own, started here
    under `setup` (initiator memory on GPU `gpu`, the target's on `target_gpu`; None: host memory);
    block tables drawn from a generator of its own (`rng_seed`). A context manager: its end ends the
    target."""

    def __init__(self, setup, shape, gpu, target_gpu, rng_seed=3):
        self.saved, self.pipe, self.proc = start_target(setup, kv_target, setup, shape, target_gpu)
        try:
            if not self.pipe.poll(60):
                raise RuntimeError("the target did not start")
            try:
                meta, *reach = self.pipe.recv()
            except EOFError:
                raise RuntimeError("the target ended before it started (its error above)") from None
            super().__init__("initiator", setup, shape, gpu, 1)
            self.peer = self.add_peer(meta, reach, 2)
            self.rng = np.random.default_rng(rng_seed)
        except BaseException:
            self.end(failed=True)
            raise

    def end(self, failed):
        """Ends the target: after a failure at once (it may be waiting for a check or a command that
        will not come), else once it has answered the end of the run."""
        if failed:
            self.proc.kill()
        else:
            self.pipe.send(("done",))
            if self.pipe.poll(60):
                self.pipe.recv()
        end_target(self.proc, self.saved)

    def draw(self, op, i, concurrent=1):
        """Step `i` of `op`: `concurrent` requests to the target, random block tables (PER_REQ
        distinct blocks of each region on both sides, no block in two of the requests in flight
        together)."""
        local, remote = kv_tables(self.shape, self.rng, concurrent), kv_tables(self.shape, self.rng, concurrent)
        return local, remote, [f"{op}:{i}:{k}".encode() for k in range(concurrent)], [self.peer] * concurrent

    def anchor(self, op, tag):
        return self.anchor_to(op, self.peer, tag)

    def warm(self, op, i):
        """An untimed anchor just before step `i`, which then finds the GPUs busy as the anchors
        timed alone did (the KV case's note above)."""
        self.anchor(op, f"{op}:warm:{i}".encode())

    def check(self, op, i, step):
        """Every byte of a step's requests: READs' here, WRITEs' at the target once their notification
        is in."""
        if op == "READ":
            return self.check_reads(i, step)
        for lidx, ridx, tag, _ in zip(*step):
            self.pipe.send(("check", tag, ridx, lidx))
            if not self.pipe.poll(60) or not self.pipe.recv():
                raise RuntimeError(f"{self.setup} KV WRITE {i}: wrong bytes or no notification at the target")

    # As a member of --kv-readers (kv_member): its anchor alone, and a step under load.
    def alone(self, op, requests):
        """Its anchor's seconds to DONE, `requests` times after two untimed."""
        return [self.anchor(op, f"{op}:alone:{i}".encode()) for i in range(requests + 2)][2:]

    def step(self, op, i, step):
        """Runs and checks a drawn step: (its make_prepped_xfer, DONE)."""
        (start, _, _, done), _, _ = self.run(op, step)
        self.check(op, i, step)
        return start, done


def kv_measure(setup, shape, requests, concurrent=1):
    """{op: [(make s, post s, done s, anchor done s, make CPU s, post CPU s)]} for `requests` requests of
    each op (CPU: the calling thread's), and {op: the first request's seconds to DONE}. With
    `concurrent` C > 1 each step is C requests of disjoint blocks made, posted together and waited
    for together, and the anchor's time counts C times: the ratio is their aggregate rate over one
    descriptor's alone."""
    with KvInitiator(setup, shape, *(VRAM or (None, None))) as kv:
        # Each op's untimed first request, to DONE: READ's is the agent's first request to its
        # peer, which connects (the plugin connects on first use).
        out, firsts = {}, {}
        for op in ("READ", "WRITE"):
            kv.begin(op)
            rows = []
            for i in range(requests + 2):
                step = kv.draw(op, i, concurrent)
                kv.warm(op, i)
                (start, made, posted, done), cpu, _ = kv.run(op, step)
                anchor = kv.anchor(op, step[2][0] + b":1")
                kv.check(op, i, step)
                if i == 0:
                    firsts[op] = done - start
                if i >= 2:
                    rows.append((made - start, posted - made, done - start, anchor * concurrent) + cpu)
            out[op] = rows
        return out, firsts


def parse_kv(text):
    """REGIONSxBLOCKSxPER_REQxBLOCK_SIZE, e.g. 8x1024x256x16K."""
    parts = text.lower().split("x")
    if len(parts) != 4:
        raise ValueError(f"--kv takes REGIONSxBLOCKSxPER_REQxBLOCK_SIZE, not {text!r}")
    regions, blocks, per_req = (int(p) for p in parts[:3])
    block = parse_size(parts[3].upper())
    if min(regions, blocks, per_req, block) <= 0 or per_req > blocks:
        raise ValueError(f"--kv {text!r}: every number positive and PER_REQ <= BLOCKS")
    return regions, blocks, block, per_req


def kv_main(shape, setups, rounds, requests, concurrent=1):
    regions, blocks, block, per_req = shape
    n = regions * per_req * concurrent
    print(
        f"KV: {regions} regions x {blocks} blocks of {block >> 10} KiB; each request {n // concurrent} descriptors "
        f"({n // concurrent * block >> 20} MiB), {concurrent} at once, {requests} steps per op and round; "
        "anchor: one descriptor of one request's bytes, alone (its time x the requests at once)"
    )
    got = {}  # (setup, op) -> rows over rounds
    firsts = {}  # (setup, op) -> the first request's seconds to DONE, one per round
    for r in range(rounds):
        for setup in setups:
            try:
                res, first = kv_measure(setup, shape, requests, concurrent)
            except Exception as e:  # a setup that does not run here is reported, not fatal
                print(f"round {r + 1}: {setup} KV: {e}", file=sys.stderr)
                continue
            for op, rows in res.items():
                got.setdefault((setup, op), []).extend(rows)
                firsts.setdefault((setup, op), []).append(first[op])
        print(f"KV round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    print(
        "| setup | op | make ms | post ms | to DONE ms | GB/s | anchor ms | anchor GB/s | ratio | data ratio "
        "| (make+post)/DONE | x ucx | make CPU ns/desc | post CPU ns/desc | first to DONE ms (x DONE) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (setup, op), rows in got.items():
        make, post, done, anchor, make_cpu, post_cpu = (statistics.median(col) for col in zip(*rows))
        ratio = statistics.median(r[3] / r[2] for r in rows)
        share = statistics.median((r[0] + r[1]) / r[2] for r in rows)
        data = statistics.median(r[3] / max(r[2] - r[0] - r[1], 1e-9) for r in rows)
        # NIXL's UCX backend on the same requests, same run: its time to DONE over ours.
        ucx = got.get(("ucx", op))
        vs_ucx = f"{statistics.median(r[2] for r in ucx) / done:.1f}" if ucx else "-"
        print(
            f"| {setup} | {op} | {make * 1e3:.2f} | {post * 1e3:.2f} | {done * 1e3:.2f} | {n * block / done / 1e9:.2f} "
            f"| {anchor * 1e3:.2f} | {n * block / anchor / 1e9:.2f} | {ratio:.2f} | {data:.2f} | {share:.2f} | {vs_ucx} "
            f"| {make_cpu / n * 1e9:.0f} | {post_cpu / n * 1e9:.0f} "
            f"| {' '.join(f'{f * 1e3:.1f} ({f / done:.1f})' for f in firsts[(setup, op)])} |"
        )
    return got


# ---- Several KV readers at once (--kv-readers N): decode workers pulling KV on one host together ----
# Each reader is a KvInitiator in a process of its own, with a target process of its own (two agents
# a reader), all on this host; with --vram every target on GPU T and reader k on the k-th GPU of
# --reader-gpus. Per op, first each reader's anchor alone: the readers take turns, the others idle.
# Then steps of one KV request per reader: each draws its block tables, waits at a barrier the
# readers share, makes, posts and waits for its request, and checks its bytes before the next step.
# A reader's time: its make_prepped_xfer to DONE; a step's: the first reader's make_prepped_xfer to
# the last one's DONE, in CLOCK_MONOTONIC, one clock for every process of the host. The processes
# and the barrier are a KvGroup's, which --kv-all-to-all's agents share.


def kv_member(pipe, barrier, requests, params, make, *args):
    """A member of a KvGroup in a process of its own: `make(*args)`, a context manager, doing the
    parent's commands from `pipe`: ("alone", op): its `alone(op, requests)`, its anchor(s) timed
    alone; ("load", op): `requests` steps after two untimed, each from `barrier` (kv_load); other
    (name, *args): its method `name`'s answer; ("done",): ends. Answers go back as ("ok", answer); a
    failure as ("error", text), and then breaks the barrier, so that the other members stop too."""
    INITIATOR_PARAMS.update(params)
    try:
        with make(*args) as m:
            pipe.send(("ok", None))
            while (cmd := pipe.recv())[0] != "done":
                what, *rest = cmd
                if what == "load":
                    got = kv_load(m, rest[0], requests, barrier)
                elif what == "alone":
                    got = m.alone(rest[0], requests)
                else:
                    got = getattr(m, what)(*rest)
                pipe.send(("ok", got))
    except Exception as e:
        # The error first: once the barrier breaks, the parent may hear the others' BrokenBarrierError.
        pipe.send(("error", f"{type(e).__name__}: {e}"))
        barrier.abort()
    leave()


def kv_load(m, op, requests, barrier):
    """Member `m`'s steps of `op`: each drawn (`m.draw`) and warmed (`m.warm`), then from the barrier
    the members share, run and checked (`m.step`, whose answers these are), `requests` after two
    untimed."""
    m.begin(op)
    got = []
    for i in range(requests + 2):
        step = m.draw(op, i)
        m.warm(op, i)
        try:
            barrier.wait(KV_WAIT_S)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"KV {op} step {i}: the barrier broke (another member failed, or was not "
                               f"there in {KV_WAIT_S} s)") from None
        got.append(m.step(op, i, step))
    return got[2:]


class KvGroup:
    """Processes of kv_member on this host, one per entry of `members` ((class, *its arguments)),
    sharing a barrier, `requests` steps per op; `noun`: what errors call a member. A context
    manager: its end stops them all."""

    def __init__(self, requests, members, noun):
        ctx = mp.get_context("spawn")
        self.requests, self.noun = requests, noun
        self.barrier = ctx.Barrier(len(members))
        self.members = []  # (pipe, process)
        try:
            for make in members:
                pipe, child = ctx.Pipe()
                # Not a daemon: a reader starts its target. Spawned, as targets are: no fork after CUDA.
                proc = ctx.Process(target=kv_member, args=(child, self.barrier, requests, INITIATOR_PARAMS, *make))
                proc.start()
                child.close()  # so that the member's death reads as EOF here
                self.members.append((pipe, proc))
            self.answers(range(len(members)), KV_WAIT_S)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def ask(self, ks, cmd, timeout=None):
        """Sends `cmd` to members `ks`: their answers, within `timeout` s (default, a step's limit
        for each of the requests and the two untimed)."""
        for k in ks:
            self.members[k][0].send(cmd)
        return self.answers(ks, timeout or KV_WAIT_S * (self.requests + 2))

    def answers(self, ks, timeout):
        """Members `ks`' answers to their last command; a member's error, its death or `timeout` s
        without all answers raises, naming every member that failed by then."""
        deadline = time.monotonic() + timeout
        pending = {self.members[k][0]: k for k in ks}
        got = {}
        while pending:
            if not wait_any(list(pending), max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"no answer from {self.noun}(s) {sorted(pending.values())} in {timeout} s")
            # Every answer in by now, not only the first: a failing member sends its error before it
            # breaks the barrier, so the cause comes with the others' BrokenBarrierError.
            errors = []
            for p in [p for p in pending if p.poll()]:
                k = pending.pop(p)
                try:
                    what, got[k] = p.recv()
                except EOFError:
                    self.members[k][1].join(5)
                    what, got[k] = "error", f"died (exit code {self.members[k][1].exitcode})"
                if what == "error":
                    errors.append(f"{self.noun} {k}: {got[k]}")
            if errors:
                if pending:
                    errors.append(f"no answer yet from {self.noun}(s) {sorted(pending.values())}")
                raise RuntimeError("; ".join(errors))
        return [got[k] for k in ks]

    def close(self):
        self.barrier.abort()  # members waiting there for a failed one stop
        for pipe, _ in self.members:
            try:
                pipe.send(("done",))
            except OSError:  # it ended already
                pass
        for _, proc in self.members:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def kv_readers_measure(setup, shape, requests, gpus):
    """{op: ([each reader's anchor alone s], [each reader's [(start, DONE) per step]])} of one reader
    per entry of `gpus` [(its GPU, its target's)], all at once."""
    n = len(gpus)
    readers = [(KvInitiator, setup, shape, g, t, 3 + k) for k, (g, t) in enumerate(gpus)]
    with KvGroup(requests, readers, "reader") as group:
        out = {}
        for op in ("READ", "WRITE"):
            alone = [group.ask([k], ("alone", op))[0] for k in range(n)]  # in turn, the others idle
            out[op] = (alone, group.ask(range(n), ("load", op)))
        return out


def kv_readers_main(shape, setups, rounds, requests, gpus):
    regions, blocks, block, per_req = shape
    n, size = len(gpus), regions * per_req * block
    at = ",".join(str(g) for g, _ in gpus)
    where = "all in DRAM" if gpus[0][0] is None else f"readers on GPUs {at}, targets on GPU {gpus[0][1]}"
    print(
        f"KV, {n} readers at once, each an initiator and a target process of its own ({where}): {regions} regions x "
        f"{blocks} blocks of {block >> 10} KiB; each request {regions * per_req} descriptors ({size >> 20} MiB), "
        f"{requests} steps per op and round, each reader one request a step from a shared barrier. Per reader, in "
        "order: alone: its anchor (one descriptor of a request's bytes) with the other readers idle; under load: its "
        "request's make_prepped_xfer to DONE; ratio: alone over under load. step: the first make_prepped_xfer to the "
        "last DONE; sum / one alone: the step's bytes per step time over the mean reader's anchor GB/s alone; "
        "spread: the slowest and fastest reader's GB/s under load over their mean"
    )
    got = {}  # (setup, op) -> ([each reader's anchor s], [each reader's DONE s], [step s]) over rounds
    for r in range(rounds):
        for setup in setups:
            try:
                res = kv_readers_measure(setup, shape, requests, gpus)
            except Exception as e:  # a setup that does not run here is reported, not fatal
                print(f"round {r + 1}: {setup} KV readers: {e}", file=sys.stderr)
                continue
            for op, (alone, load) in res.items():
                anchors, dones, steps = got.setdefault((setup, op), ([[] for _ in gpus], [[] for _ in gpus], []))
                for k in range(n):
                    anchors[k] += alone[k]
                    dones[k] += [done - start for start, done in load[k]]
                steps += [max(done for _, done in step) - min(start for start, _ in step) for step in zip(*load)]
        print(f"KV readers round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    print("| setup | op | alone ms | alone GB/s | under load ms | under load GB/s | ratio | step ms | sum GB/s "
          "| sum / one alone | spread |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (setup, op), (anchors, dones, steps) in got.items():
        alone = [statistics.median(x) for x in anchors]
        done = [statistics.median(x) for x in dones]
        rates = [size / d for d in done]
        step = statistics.median(steps)
        one_alone = statistics.mean(size / a for a in alone)
        mean = statistics.mean(rates)
        each = lambda xs, scale: " ".join(f"{x * scale:.2f}" for x in xs)  # noqa: E731
        print(
            f"| {setup} | {op} | {each(alone, 1e3)} | {each([size / a for a in alone], 1e-9)} | {each(done, 1e3)} "
            f"| {each(rates, 1e-9)} | {each([a / d for a, d in zip(alone, done)], 1)} | {step * 1e3:.2f} "
            f"| {n * size / step / 1e9:.2f} | {n * size / step / one_alone:.2f} "
            f"| {min(rates) / mean:.2f}-{max(rates) / mean:.2f} |"
        )
    return got


# ---- KV all-to-all (--kv-all-to-all G): every GPU's agent pulling from and pushing to every other ----
# G agents on this host, agent k in a process of its own, its memory on GPU k with --vram (else host
# memory). Each is a target (its regions registered as kv_target's, bytes of its own) and an
# initiator (regions of the same layout, bytes of its own) in one NIXL agent, a KvGroup member as a
# --kv-readers reader: each step every agent makes, posts and waits for one KV request to every
# other agent at once from the shared barrier, G - 1 in flight per agent and G (G - 1) in all. Block
# tables are drawn alike in every process (a2a_tables, one generator per step): an agent's requests
# take disjoint blocks of its own regions, and the requests into an agent's regions disjoint blocks
# of those, so every pair's bytes check: READs by the reader, WRITEs by the agent written to once
# the writer's notification is in. Per op, first every ordered pair's anchor alone: the agents take
# turns, each timing its anchor to every other in turn, the others idle. A pair's time under load:
# its agent's first make_prepped_xfer to the pair's request DONE (an agent polls its requests in
# turn); a step's: the first make_prepped_xfer of any agent to the last DONE.
A2A_SEED = 5
A2A_STALL = 10  # a step longer than this many times the median step stalled


def a2a_seed(k):
    """The seed of agent k's initiator regions' bytes; its target regions' is one more."""
    return 10 + 2 * k


def a2a_others(n, k):
    return [j for j in range(n) if j != k]


def a2a_tag(op, i, src, dst):
    return f"{op}:{i}:{src}>{dst}".encode()


def a2a_tables(shape, n, op, i):
    """Step `i` of `op` among `n` agents, the same in every process: {(src, dst): (the table in
    src's regions, the table in dst's)} for every ordered pair."""
    rng = np.random.default_rng([A2A_SEED, ("READ", "WRITE").index(op), i])
    local = [kv_tables(shape, rng, n - 1) for _ in range(n)]
    remote = [kv_tables(shape, rng, n - 1) for _ in range(n)]
    return {
        (s, d): (local[s][a2a_others(n, s).index(d)], remote[d][a2a_others(n, d).index(s)])
        for s in range(n) for d in a2a_others(n, s)
    }


class KvA2aAgent(KvAgent):
    """Agent k of a --kv-all-to-all run of n in this process, under `setup`, its memory on GPU `gpu`
    (None: host memory): an initiator (KvAgent) and a target (kv_target_side) in one agent. Besides
    a member's commands: ("reach",): what the others need to reach it; ("connect", [every agent's
    reach]): adds the others as its peers."""

    def __init__(self, k, n, setup, shape, gpu):
        os.environ.update(SETUPS[setup][2])
        super().__init__(f"agent{k}", setup, shape, gpu, a2a_seed(k))
        self.k, self.n, self.others = k, n, a2a_others(n, k)
        self.target, self.target_anchor, self.target_reach = kv_target_side(self.agent, shape, gpu, a2a_seed(k) + 1)
        self.notifs = Notifs(self.agent)
        self.peers = {}
        self.sources = {}  # a writer's initiator bytes, made at its first check

    def reach(self):
        return self.agent.get_agent_metadata(), self.target_reach

    def connect(self, reaches):
        for j in self.others:
            self.peers[j] = self.add_peer(*reaches[j], a2a_seed(j) + 1)

    def begin(self, op):
        """WRITEs send this agent's own bytes, READs read the targets' own (each overwrote them)."""
        super().begin(op)
        if op == "READ":
            self.target.fill(a2a_seed(self.k) + 1)

    def draw(self, op, i):
        """Step `i` of `op`: this agent's requests, one to each other agent in order (a KvAgent step),
        and {writer: its tables} of the others' into this agent's regions."""
        tables = a2a_tables(self.shape, self.n, op, i)
        mine = [tables[(self.k, j)] for j in self.others]
        step = ([t[0] for t in mine], [t[1] for t in mine], [a2a_tag(op, i, self.k, j) for j in self.others],
                [self.peers[j] for j in self.others])
        return step, {s: tables[(s, self.k)] for s in self.others}

    def step(self, op, i, drawn):
        """Runs and checks a drawn step: (its first make_prepped_xfer, [each request's DONE])."""
        step, incoming = drawn
        (start, _, _, _), _, dones = self.run(op, step)
        if op == "READ":
            self.check_reads(i, step)
        else:
            self.check_writes(i, incoming)
        return start, dones

    def check_writes(self, i, incoming):
        """Every byte the others' WRITEs of step `i` brought here, once each one's notification is in."""
        for s in incoming:
            if not self.notifs.wait(a2a_tag("WRITE", i, s, self.k)):
                raise RuntimeError(f"{self.setup} KV WRITE {i} from agent{s}: no notification in {KV_NOTIF_S} s")
        rows = self.target.rows()
        for s, (lidx, ridx) in incoming.items():
            if not np.array_equal(rows[ridx], self.source(s)[lidx]):
                raise RuntimeError(f"{self.setup} KV WRITE {i} from agent{s}: wrong bytes")

    def source(self, s):
        if s not in self.sources:
            regions, blocks, block, _ = self.shape
            self.sources[s] = kv_pattern(regions, blocks, block, a2a_seed(s)).reshape(-1, block)
        return self.sources[s]

    def warm(self, op, i):
        """An untimed anchor to one other agent just before step `i` (as `KvInitiator.warm`)."""
        self.anchor_to(op, self.peers[self.others[0]], f"{op}:warm:{i}:{self.k}".encode())

    def alone(self, op, requests):
        """Its anchor to each other agent in turn, `requests` times after two untimed: [[seconds to
        DONE] per other agent]."""
        tag = f"{op}:alone:{self.k}>{{}}:{{}}"
        return [
            [self.anchor_to(op, self.peers[j], tag.format(j, r).encode()) for r in range(requests + 2)][2:]
            for j in self.others
        ]


def kv_a2a_measure(setup, shape, requests, gpus, out):
    """Fills `out` {op: (alone, load)} of one agent per entry of `gpus` (its GPU, None: host memory):
    alone[k]: agent k's anchor seconds per other agent; load[k]: its steps' (start, [DONE per other
    agent]). Raises at the first failure, `out` keeping the ops done by then."""
    n = len(gpus)
    with KvGroup(requests, [(KvA2aAgent, k, n, setup, shape, g) for k, g in enumerate(gpus)], "agent") as group:
        reaches = group.ask(range(n), ("reach",), KV_WAIT_S)
        group.ask(range(n), ("connect", reaches), KV_WAIT_S)
        for op in ("READ", "WRITE"):
            alone = [group.ask([k], ("alone", op))[0] for k in range(n)]  # in turn, the others idle
            out[op] = (alone, group.ask(range(n), ("load", op)))


def a2a_add(entry, n, alone, load):
    """Adds a round's op to `entry`: each ordered pair's anchor s and s to DONE under load, and the
    step times."""
    for s in range(n):
        for j, d in enumerate(a2a_others(n, s)):
            entry["alone"].setdefault((s, d), []).extend(alone[s][j])
            entry["load"].setdefault((s, d), []).extend(dones[j] - start for start, dones in load[s])
    entry["steps"] += [max(max(d) for _, d in step) - min(start for start, _ in step) for step in zip(*load)]


def a2a_stalls(steps, failed):
    """Steps over A2A_STALL times the median step, and the rounds' failures; "none" without either."""
    slow = [s for s in steps if s > A2A_STALL * statistics.median(steps)] if steps else []
    text = [f"{len(slow)} of {len(steps)} steps > {A2A_STALL}x median (max {max(slow) * 1e3:.1f} ms)"] if slow else []
    return "; ".join(text + failed) or "none"


def a2a_row(setup, op, entry, size):
    if not entry["steps"]:
        return f"| {setup} | {op} | - | - | - | - | - | - | {a2a_stalls([], entry['failed'])} |"
    pairs = sorted(entry["load"])
    alone = [size / statistics.median(entry["alone"][p]) for p in pairs]
    rates = [size / statistics.median(entry["load"][p]) for p in pairs]
    step = statistics.median(entry["steps"])
    one_alone, mean = statistics.mean(alone), statistics.mean(rates)
    total = len(pairs) * size / step
    return (
        f"| {setup} | {op} | {one_alone / 1e9:.2f} ({min(alone) / 1e9:.2f}-{max(alone) / 1e9:.2f}) "
        f"| {' '.join(f'{s}>{d} {r / 1e9:.2f}' for (s, d), r in zip(pairs, rates))} | {step * 1e3:.2f} "
        f"| {total / 1e9:.2f} | {total / one_alone:.2f} | {min(rates) / mean:.2f}-{max(rates) / mean:.2f} "
        f"| {a2a_stalls(entry['steps'], entry['failed'])} |"
    )


def kv_a2a_main(shape, setups, rounds, requests, gpus):
    regions, blocks, block, per_req = shape
    n, size = len(gpus), regions * per_req * block
    where = "all in DRAM" if gpus[0] is None else f"agent k on GPU k, GPUs {','.join(str(g) for g in gpus)}"
    print(
        f"KV all-to-all, {n} agents, each a target and an initiator in one process ({where}): {regions} regions x "
        f"{blocks} blocks of {block >> 10} KiB; each request {regions * per_req} descriptors ({size >> 20} MiB); each "
        f"step every agent one request to every other at once from a shared barrier ({n * (n - 1)} in flight), "
        f"{requests} steps per op and round, every byte checked. alone: each ordered pair's anchor (one descriptor of "
        "a request's bytes, agent i -> j) timed alone, every pair in turn with the others idle: the pairs' mean GB/s "
        "(min-max); under load: each pair i>j's GB/s, agent i's first make_prepped_xfer to the pair's DONE; step: the "
        "first make_prepped_xfer to the last DONE; sum: all pairs' bytes per step time; sum / one alone: over the "
        "mean pair's anchor GB/s alone; spread: the slowest and fastest pair's GB/s under load over their mean; "
        f"stalls: steps over {A2A_STALL}x the median step, and failures (a request not DONE in {KV_WAIT_S} s, a "
        f"barrier or answer wait running out, a notification not in within {KV_NOTIF_S} s, wrong bytes)"
    )
    got = {(s, op): {"alone": {}, "load": {}, "steps": [], "failed": []} for s in setups for op in ("READ", "WRITE")}
    for r in range(rounds):
        for setup in setups:
            res = {}
            try:
                kv_a2a_measure(setup, shape, requests, gpus, res)
            except Exception as e:  # reported in the op's row and here, not fatal
                print(f"round {r + 1}: {setup} KV all-to-all: {e}", file=sys.stderr)
                missing = [op for op in ("READ", "WRITE") if op not in res]
                for op in missing:
                    why = str(e)[:160] if op == missing[0] else f"not run, {missing[0]} failed"
                    got[(setup, op)]["failed"].append(f"round {r + 1}: {why}".replace("|", "/"))
            for op, (alone, load) in res.items():
                a2a_add(got[(setup, op)], n, alone, load)
        print(f"KV all-to-all round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    print("| setup | op | pair alone GB/s | under load GB/s per pair | step ms | sum GB/s | sum / one alone | spread "
          "| stalls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (setup, op), entry in got.items():
        print(a2a_row(setup, op, entry, size))
    return got


# ---- SGLang case (--sglang): SGLang's prefill->decode push through NIXL ----------------------------
# After sgl-project/sglang python/sglang/srt/disaggregation/nixl/conn.py @ 8d9468505bb1, as
# scripts/serving/sglang.py reproduces it for correctness: the initiator is the prefill side, the
# target the decode side. KV: 16 layers x K and V, 32 regions of SLOTS pages each registered apart
# (SLOTS = ROOMS x CHUNKS x PAGES, each room's pages at its own slots, the same on both sides); aux
# in host memory even with --vram. The prefill side prepares both lists once (prep_xfer_dlist, one
# descriptor per region and page, index region * SLOTS + page); each room is cut into CHUNKS chunks
# of PAGES pages, queued room by room (so a room's time is its own chunks', not the queue's behind
# it) to transfer thread room % 4 (4 threads, a queue each); a thread makes (make_prepped_xfer
# WRITE, notification "{room}_kv_{chunk}_{last}_0") and posts a chunk, on a room's last chunk also
# its aux (initialize_xfer WRITE, "{room}_aux"), then polls check_xfer_state over the chunk's
# handles, time.sleep(0) between rounds, until all are DONE. The
# decode side drains get_new_notifs until every room's kv and aux notifications are in, then checks
# every byte. Times are CLOCK_MONOTONIC, one clock for both processes of this host.
SG_REGIONS = 2 * 16
SG_QUEUES = 4  # SGLANG_DISAGGREGATION_QUEUE_SIZE's default
SG_AUX = 256  # one room's aux item, as sglang.py's first aux buffer
SG_WAIT_S = 120
SG_RANK = 0
SG_SETTLE_S = 0.0  # --sglang-settle: seconds from add_remote_agent to the first room
SG_REGISTERED_S = 0.0  # --sglang-registered: seconds from registering the KV to add_remote_agent
# --sglang-sync: the prefill agent's NIXL thread sync mode; SGLang's is STRICT (one lock around
# every agent call), RW lets makeXferReq and its like run side by side.
SG_SYNC = "strict"


def sg_pattern(nbytes, region):
    """The prefill side's bytes of `region`: every 8-byte word unlike every other of every region,
    so a page written to the wrong slot or region shows; cheaper to make than random bytes."""
    words = -(-nbytes // 8)
    w = np.arange(region * words, (region + 1) * words, dtype=np.uint64)
    w *= np.uint64(0x9E3779B97F4A7C15)
    return w.view(np.uint8)[:nbytes]


def sg_aux_pattern(rooms):
    return np.random.default_rng(11).integers(0, 256, size=rooms * SG_AUX, dtype=np.uint8)


def sg_diff(got, region, page):
    """Which pages of `region` hold other bytes than the prefill side's, and what they hold: zeros
    (nothing landed), another page's bytes (named by region and page, from its first word), or
    bytes of no page."""
    want = sg_pattern(len(got), region)
    bad = [p for p in range(len(got) // page) if not np.array_equal(got[p * page:(p + 1) * page], want[p * page:(p + 1) * page])]
    words = -(-len(got) // 8)
    told = []
    for p in bad[:4]:
        chunk = got[p * page:(p + 1) * page]
        if not chunk.any():
            told.append(f"page {p}: zeros")
            continue
        first = int(chunk[:8].view(np.uint64)[0]) * pow(0x9E3779B97F4A7C15, -1, 1 << 64) % (1 << 64)
        r, w = divmod(first, words)
        src = f"region {r} page {w * 8 // page} (+{w * 8 % page} B)" if r < SG_REGIONS else "no page's bytes"
        diff = np.flatnonzero(chunk != want[p * page:(p + 1) * page])
        told.append(f"page {p}: starts as {src}, bytes {diff[0]}..{diff[-1]} differ")
    return f"{len(bad)} of {len(got) // page} pages; " + "; ".join(told)


class SgKv:
    """One side's KV regions: the prefill pattern, or zeros, in host memory or on GPU `gpu`. Every
    page is written here first, so no transfer meets a page the kernel has yet to map."""

    def __init__(self, slots, page, fill, gpu=None):
        self.slots, self.page = slots, page
        self.kind, self.dev, self.gpu = ("DRAM", 0, None) if gpu is None else ("VRAM", gpu, gpu)
        n = slots * page
        if gpu is None:
            self.mem = np.zeros((SG_REGIONS, n), dtype=np.uint8)
            for r in range(SG_REGIONS):
                self.mem[r] = sg_pattern(n, r) if fill else 0
        else:
            import torch

            self.mem = torch.zeros((SG_REGIONS, n), dtype=torch.uint8, device=f"cuda:{gpu}")
            if fill:
                for r in range(SG_REGIONS):
                    self.mem[r].copy_(torch.from_numpy(sg_pattern(n, r)))
            torch.cuda.synchronize(self.mem.device)

    def bases(self):
        if self.gpu is None:
            return [self.mem[r].ctypes.data for r in range(SG_REGIONS)]
        return [self.mem[r].data_ptr() for r in range(SG_REGIONS)]

    def register(self, agent):
        n = self.slots * self.page
        regs = [(b, n, self.dev, "") for b in self.bases()]
        agent.register_memory(agent.get_reg_descs(regs, self.kind))

    def region(self, r):
        """Region r's bytes as a host numpy array."""
        if self.gpu is None:
            return self.mem[r]
        return self.mem[r].cpu().numpy()


def sg_dlist(bases, slots, page, dev):
    """SGLang's _prep_equal_tp_dlist: an Nx3 array, one descriptor per region and page."""
    rows = []
    for base in bases:
        addrs = np.arange(slots, dtype=np.uint64) * np.uint64(page) + np.uint64(base)
        rows.append(np.column_stack([addrs, np.full(slots, page, dtype=np.uint64), np.full(slots, dev, dtype=np.uint64)]))
    return np.vstack(rows)


def sg_notifs(rooms, chunks):
    want = set()
    for room in range(rooms):
        want.update(f"{room}_kv_{c}_{int(c == chunks - 1)}_{SG_RANK}".encode() for c in range(chunks))
        want.add(f"{room}_aux".encode())
    return want


def sglang_target(pipe, setup, shape, gpu):
    for k, v in SETUPS[setup][2].items():
        os.environ[k] = v
    rooms, chunks, pages, page = shape
    slots = rooms * chunks * pages
    agent = make_agent("target", setup, gpu, sglang=True)
    kv = SgKv(slots, page, False, gpu)
    kv.register(agent)
    aux = np.zeros(rooms * SG_AUX, dtype=np.uint8)
    agent.register_memory(agent.get_reg_descs([(aux.ctypes.data, aux.nbytes, 0, "")], "DRAM"))
    pipe.send((agent.get_agent_metadata(), kv.bases(), kv.dev, kv.kind, aux.ctypes.data))
    problems, last = [], None
    if pipe.recv() == "go":
        want = sg_notifs(rooms, chunks)
        seen = set()
        deadline = mono_clock() + SG_WAIT_S
        # SGLang's decode side: get_new_notifs from its scheduler's loop, here every 0.5 ms.
        while last is None and not pipe.poll():
            for msgs in agent.get_new_notifs().values():
                for m in msgs:
                    m = bytes(m)
                    if m not in want or m in seen:
                        problems.append(f"notification {m!r} unknown or twice")
                    seen.add(m)
            if want <= seen:
                last = mono_clock()
            elif mono_clock() > deadline:
                problems.append(f"{len(want - seen)} of {len(want)} notifications missing after {SG_WAIT_S} s")
                break
            else:
                time.sleep(0.0005)
        if last is not None:
            n = slots * page
            for r in range(SG_REGIONS):
                got = kv.region(r)
                if not np.array_equal(got, sg_pattern(n, r)):
                    problems.append(f"KV region {r} differs from the prefill side's: {sg_diff(got, r, page)}")
            if not np.array_equal(aux, sg_aux_pattern(rooms)):
                problems.append("aux differs from the prefill side's")
            # The check took a while: a stray notification would be in by now.
            extra = sum(len(m) for m in agent.get_new_notifs().values())
            if extra:
                problems.append(f"{extra} notifications more than the rooms'")
        pipe.send((last, problems))
    pipe.recv()  # until the prefill side is done
    leave()


def sglang_measure(setup, shape):
    """(run s: the first make_prepped_xfer to the last notification in, [each room's s: its first
    chunk's make_prepped_xfer to its last chunk's DONE], in room order)."""
    rooms, chunks, pages, page = shape
    slots = rooms * chunks * pages
    saved, pipe, proc = start_target(setup, sglang_target, setup, shape, VRAM[1] if VRAM else None)
    try:
        if not pipe.poll(120):
            raise RuntimeError("the target did not start")
        meta, remote_bases, remote_dev, remote_kind, remote_aux = pipe.recv()
        gpu = VRAM[0] if VRAM else None
        agent = make_agent("initiator", setup, gpu, sglang=True)
        kv = SgKv(slots, page, True, gpu)
        kv.register(agent)
        aux = sg_aux_pattern(rooms)
        agent.register_memory(agent.get_reg_descs([(aux.ctypes.data, aux.nbytes, 0, "")], "DRAM"))
        # A serving stack registers its KV as it starts, long before a peer joins; 0 (the default)
        # loads the peer at once.
        time.sleep(SG_REGISTERED_S)
        peer = agent.add_remote_agent(meta)
        src = agent.prep_xfer_dlist("", sg_dlist(kv.bases(), slots, page, kv.dev), kv.kind)
        dst = agent.prep_xfer_dlist(peer, sg_dlist(remote_bases, slots, page, remote_dev), remote_kind)
        # SGLang loads the decode side's agent when it registers, a prefill pass or more before the
        # first push; 0 (the default) pushes at once, the worst case.
        time.sleep(SG_SETTLE_S)
        times = {}  # (room, chunk) -> (make_prepped_xfer, DONE)
        errors = []

        def transfer_worker(q):
            while True:
                item = q.get()
                if item is None:
                    return
                room, chunk = item
                # As SGLang, the last chunk's handles go when the next chunk starts.
                handles = []
                try:
                    last = chunk == chunks - 1
                    first = (room * chunks + chunk) * pages
                    region_starts = np.arange(SG_REGIONS, dtype=np.int32)[:, None] * slots
                    idx = (region_starts + np.arange(first, first + pages, dtype=np.int32)[None, :]).ravel()
                    notif = f"{room}_kv_{chunk}_{int(last)}_{SG_RANK}".encode()
                    start = mono_clock()
                    h = agent.make_prepped_xfer("WRITE", src, idx, dst, idx, notif)
                    if agent.transfer(h) == "ERR":
                        raise RuntimeError(f"room {room} chunk {chunk}: transfer() ERR")
                    handles.append(h)
                    if last:
                        s = agent.get_xfer_descs([(aux.ctypes.data + room * SG_AUX, SG_AUX, 0)], "DRAM")
                        d = agent.get_xfer_descs([(remote_aux + room * SG_AUX, SG_AUX, 0)], "DRAM")
                        h = agent.initialize_xfer("WRITE", s, d, peer, f"{room}_aux".encode())
                        if agent.transfer(h) == "ERR":
                            raise RuntimeError(f"room {room} aux: transfer() ERR")
                        handles.append(h)
                    deadline = start + SG_WAIT_S
                    while True:
                        states = [agent.check_xfer_state(h) for h in handles]
                        if "ERR" in states:
                            raise RuntimeError(f"room {room} chunk {chunk}: ERR")
                        if all(st == "DONE" for st in states):
                            break
                        if mono_clock() > deadline:
                            raise RuntimeError(f"room {room} chunk {chunk}: {states} after {SG_WAIT_S} s")
                        time.sleep(0)
                    times[(room, chunk)] = (start, mono_clock())
                except Exception as e:
                    errors.append(e)

        queues = [queue.Queue() for _ in range(SG_QUEUES)]
        workers = [threading.Thread(target=transfer_worker, args=(q,), daemon=True) for q in queues]
        for w in workers:
            w.start()
        pipe.send("go")
        for room in range(rooms):
            for chunk in range(chunks):
                queues[room % SG_QUEUES].put((room, chunk))
        for q in queues:
            q.put(None)
        for w in workers:
            w.join(SG_WAIT_S * rooms * chunks)
        if errors or any(w.is_alive() for w in workers):
            pipe.send("abort")
            raise errors[0] if errors else RuntimeError("a transfer thread hung")
        if not pipe.poll(SG_WAIT_S + 600):
            raise RuntimeError("the decode side did not answer")
        last, problems = pipe.recv()
        pipe.send("done")
        if problems:
            raise RuntimeError("decode side: " + "; ".join(problems[:5]))
        run = last - min(t[0] for t in times.values())
        return run, [times[(room, chunks - 1)][1] - times[(room, 0)][0] for room in range(rooms)]
    finally:
        end_target(proc, saved)


def parse_sglang(text):
    """ROOMSxCHUNKSxPAGESxPAGE_SIZE, e.g. 24x3x24x64K."""
    parts = text.lower().split("x")
    if len(parts) != 4:
        raise ValueError(f"--sglang takes ROOMSxCHUNKSxPAGESxPAGE_SIZE, not {text!r}")
    rooms, chunks, pages = (int(p) for p in parts[:3])
    page = parse_size(parts[3].upper())
    if min(rooms, chunks, pages, page) <= 0:
        raise ValueError(f"--sglang {text!r}: every number positive")
    if SG_REGIONS * rooms * chunks * pages >= 1 << 31:
        raise ValueError(f"--sglang {text!r}: more descriptors than int32 indices reach")
    return rooms, chunks, pages, page


def sglang_main(shape, setups, rounds, json_path=None):
    rooms, chunks, pages, page = shape
    room_bytes = chunks * pages * SG_REGIONS * page
    total = rooms * room_bytes
    print(
        f"SGLang push: {rooms} rooms x {chunks} chunks x {pages} pages of {page >> 10} KiB in each of "
        f"{SG_REGIONS} regions ({room_bytes / (1 << 20):.0f} MiB a room, {total / (1 << 30):.2f} GiB a run), "
        f"{SG_QUEUES} transfer threads; KV in {'VRAM' if VRAM else 'DRAM'}, aux in DRAM. run: the first "
        "make_prepped_xfer to the last notification in; room: its first chunk's make_prepped_xfer to its "
        "last chunk's DONE; first room: room 0 over the round's room p50 (fresh peer); threads' first: the "
        "slowest of rooms 0-3 (each thread's first) over the p50; x ucx: ucx's run over this one's"
        + ("; the prefill agent in NIXL's RW sync mode" if SG_SYNC == "rw" else "")
    )
    got = {}  # setup -> [(run s, [room s])] over rounds
    for r in range(rounds):
        for setup in setups:
            try:
                res = sglang_measure(setup, shape)
            except Exception as e:  # a setup that does not run here is reported, not fatal
                print(f"round {r + 1}: {setup} SGLang: {e}", file=sys.stderr)
                continue
            got.setdefault(setup, []).append(res)
        print(f"SGLang round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    print("| setup | run ms | GB/s | x ucx | room p50 ms | room max ms | first room ms (x p50) | threads' first "
          "(x p50) | run ms per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setup, res in got.items():
        run = statistics.median(x[0] for x in res)
        p50s = [statistics.median(x[1]) for x in res]
        ucx = got.get("ucx")
        vs_ucx = f"{statistics.median(x[0] for x in ucx) / run:.2f}" if ucx else "-"
        print(
            f"| {setup} | {run * 1e3:.0f} | {total / run / 1e9:.2f} | {vs_ucx} | {statistics.median(p50s) * 1e3:.1f} "
            f"| {max(max(x[1]) for x in res) * 1e3:.1f} "
            f"| {' '.join(f'{x[1][0] * 1e3:.1f} ({x[1][0] / p:.2f})' for x, p in zip(res, p50s))} "
            f"| {' '.join(f'{max(x[1][:SG_QUEUES]) * 1e3:.1f} ({max(x[1][:SG_QUEUES]) / p:.2f})' for x, p in zip(res, p50s))} "
            f"| {' '.join(f'{x[0] * 1e3:.0f}' for x in res)} |"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"shape": shape, "vram": VRAM, "runs": {s: [{"run_s": x[0], "rooms_s": x[1]} for x in res]
                                                            for s, res in got.items()}}, f, indent=1)
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", help="default 4K,1M,64M")
    ap.add_argument("--setups", help="comma-separated, of " + ", ".join(SETUPS))
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--vram", metavar="I,T", help="GPU memory: the initiator's on GPU I, the target's on GPU T")
    ap.add_argument("--kv", metavar="RxBxPxS", help="the KV case instead of the sizes, e.g. 8x1024x256x16K")
    ap.add_argument("--kv-requests", type=int, default=10, help="KV requests per op and round")
    ap.add_argument("--kv-concurrent", type=int, default=1, metavar="C",
                    help="KV requests of one agent in flight at once, disjoint blocks (C x PER_REQ <= BLOCKS)")
    ap.add_argument("--kv-readers", type=int, metavar="N",
                    help="with --kv: N readers at once (N >= 2), each an initiator and a target process of its own")
    ap.add_argument("--reader-gpus", metavar="LIST",
                    help="with --kv-readers and --vram I,T (T: every target's GPU, I unused): the readers' GPUs, "
                         "comma-separated; default the first N GPUs other than T")
    ap.add_argument("--kv-all-to-all", type=int, metavar="G",
                    help="with --kv: G agents (G >= 2, (G-1) x PER_REQ <= BLOCKS), each a target and an initiator "
                         "sending one request to every other at once each step; with --vram (its I,T unused) agent "
                         "k's memory on GPU k")
    ap.add_argument("--sglang", metavar="RxCxPxS",
                    help="SGLang's prefill->decode push instead of the sizes, e.g. 24x3x24x64K: "
                         "ROOMS x CHUNKS a room x PAGES a chunk x PAGE_SIZE")
    ap.add_argument("--sglang-settle", type=float, default=0.0, metavar="S",
                    help="with --sglang: seconds between loading the peer and the first room (default 0)")
    ap.add_argument("--sglang-registered", type=float, default=0.0, metavar="S",
                    help="with --sglang: seconds between registering the prefill side's KV and loading "
                         "the peer (default 0)")
    ap.add_argument("--sglang-sync", choices=["strict", "rw"], default="strict",
                    help="with --sglang: the prefill agent's NIXL thread sync mode (default strict, as SGLang)")
    ap.add_argument("--breakdown", action="store_true", help="where a request's time goes (--sizes default 4K,1M)")
    ap.add_argument("--bench", metavar="PATH", help="with --breakdown: uccl-tcpx-bench, run in every round")
    ap.add_argument("--initiator-param", metavar="KEY=VALUE", action="append", default=[],
                    help="a backend parameter of the initiator's TCPX backend only (repeatable)")
    args = ap.parse_args()
    global VRAM
    for kv in args.initiator_param:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            ap.error(f"--initiator-param takes KEY=VALUE, not {kv!r}")
        INITIATOR_PARAMS[key] = value
    if args.vram:
        gpus = args.vram.split(",")
        if len(gpus) != 2 or not all(g.isdigit() for g in gpus):
            ap.error(f"--vram takes two GPU indices, I,T: {args.vram!r}")
        VRAM = (int(gpus[0]), int(gpus[1]))
    if (args.reader_gpus and args.kv_readers is None) or (args.kv_readers is not None and not args.kv):
        ap.error("--reader-gpus goes with --kv-readers, --kv-readers with --kv")
    if args.kv_all_to_all is not None and (not args.kv or args.kv_readers is not None):
        ap.error("--kv-all-to-all goes with --kv, and not with --kv-readers")
    named = set((args.setups or "").split(","))
    if "tcpxo-fake" in named and named & {"tcpx-fake", "tcpx-fake-host"}:
        # The fake takes its kind when a process first loads it, and this one loads it for both.
        ap.error("tcpxo-fake runs in an invocation of its own, without tcpx-fake or tcpx-fake-host")
    if args.kv:
        kv_setups = args.setups.split(",") if args.setups else ["tcpx-net", "tcpx-local", "ucx"]
        unknown = [s for s in kv_setups if s not in SETUPS]
        if unknown:
            ap.error(f"unknown setup {', '.join(unknown)}: one of {', '.join(SETUPS)}")
        shape = parse_kv(args.kv)
        if args.kv_concurrent < 1 or args.kv_concurrent * shape[3] > shape[1]:
            ap.error(f"--kv-concurrent {args.kv_concurrent}: at least 1, and C x PER_REQ <= BLOCKS")
        if args.kv_all_to_all is not None:
            g = args.kv_all_to_all
            if g < 2 or args.kv_concurrent != 1 or (g - 1) * shape[3] > shape[1]:
                ap.error(f"--kv-all-to-all {g}: at least 2, (G-1) x PER_REQ <= BLOCKS, no --kv-concurrent")
            kv_a2a_main(shape, kv_setups, args.rounds, args.kv_requests, list(range(g)) if VRAM else [None] * g)
            return
        if args.kv_readers is not None:
            n = args.kv_readers
            if n < 2 or args.kv_concurrent != 1:
                ap.error(f"--kv-readers {n}: at least 2, each one request at a time (no --kv-concurrent)")
            if VRAM is None:
                if args.reader_gpus:
                    ap.error("--reader-gpus needs --vram I,T: without it every reader is on host memory")
                gpus = [(None, None)] * n
            else:
                others = [str(g) for g in range(n + 1) if g != VRAM[1]][:n]
                listed = args.reader_gpus.split(",") if args.reader_gpus else others
                if len(listed) != n or not all(g.isdigit() for g in listed):
                    ap.error(f"--reader-gpus takes {n} GPU indices, comma-separated, not {args.reader_gpus!r}")
                gpus = [(int(g), VRAM[1]) for g in listed]
            kv_readers_main(shape, kv_setups, args.rounds, args.kv_requests, gpus)
            return
        kv_main(shape, kv_setups, args.rounds, args.kv_requests, args.kv_concurrent)
        return
    if args.sglang:
        sg_setups = args.setups.split(",") if args.setups else ["tcpx-net", "tcpx-local", "ucx"]
        unknown = [s for s in sg_setups if s not in SETUPS]
        if unknown:
            ap.error(f"unknown setup {', '.join(unknown)}: one of {', '.join(SETUPS)}")
        try:
            shape = parse_sglang(args.sglang)
        except ValueError as e:
            ap.error(str(e))
        if min(args.sglang_settle, args.sglang_registered) < 0:
            ap.error("--sglang-settle and --sglang-registered take seconds, 0 or more")
        global SG_SETTLE_S, SG_REGISTERED_S, SG_SYNC
        SG_SYNC = args.sglang_sync
        SG_SETTLE_S, SG_REGISTERED_S = args.sglang_settle, args.sglang_registered
        sglang_main(shape, sg_setups, args.rounds, args.json)
        return
    if args.breakdown:
        sizes = [parse_size(s) for s in (args.sizes or "4K,1M").split(",")]
        setups = (args.setups or "tcpx-local").split(",")
        if not all(SETUPS.get(x, ("",))[0] == "TCPX" for x in setups):
            ap.error("--breakdown times our plugin's calls: TCPX setups only (tcpx-local, tcpx-net, ...)")
        breakdown_main(sizes, setups, args.rounds, args.bench)
        return
    sizes = [parse_size(s) for s in (args.sizes or "4K,1M,64M").split(",")]
    default = ["tcpx-net", "tcpx-local", "ucx-tcp-cuda" if VRAM else "ucx-tcp", "ucx"]
    setups = args.setups.split(",") if args.setups else default
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        ap.error(f"unknown setup {', '.join(unknown)}: one of {', '.join(SETUPS)}")
    results = {}  # (setup, op, size) -> [per-round (median us, GB/s)]
    many = {}
    for r in range(args.rounds):
        for size in sizes:
            for setup in setups:
                try:
                    got = measure(setup, size, many=setup.startswith("tcpx") and size == sizes[0])
                except Exception as e:  # a setup that does not run here is reported, not fatal
                    print(f"round {r + 1}: {setup} {size}: {e}", file=sys.stderr)
                    continue
                for op in ("WRITE", "READ"):
                    t = got[op]
                    results.setdefault((setup, op, size), []).append(
                        (statistics.median(t) * 1e6, size / statistics.mean(t) / 1e9)
                    )
                if "many" in got:
                    many.setdefault(setup, []).append(got["many"])
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    def cell(vals, k, fmt):
        xs = [v[k] for v in vals]
        return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}" if len(xs) > 1 else fmt.format(xs[0])

    print("| op | size | " + " | ".join(f"{s} p50 us | {s} GB/s" for s in setups) + " |")
    print("|---|---|" + "---|---|" * len(setups))
    for op in ("WRITE", "READ"):
        for size in sizes:
            row = [op, f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"]
            for s in setups:
                vals = results.get((s, op, size), [])
                row += [cell(vals, 0, "{:.1f}"), cell(vals, 1, "{:.3f}")] if vals else ["-", "-"]
            print("| " + " | ".join(row) + " |")
    for s, vals in many.items():
        prep = [v[0] * 1e3 for v in vals]
        post = [v[1] * 1e3 for v in vals]
        total = [v[2] * 1e3 for v in vals]
        print(
            f"{s}: 10,000 x 4 KiB in one request: prepare {min(prep):.2f}-{max(prep):.2f} ms, "
            f"post {min(post):.2f}-{max(post):.2f} ms, to DONE {min(total):.1f}-{max(total):.1f} ms"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": [[*k, v] for k, v in results.items()], "many": many}, f, indent=1)


if __name__ == "__main__":
    main()
    leave()
