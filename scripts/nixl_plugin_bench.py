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

usage: nixl_plugin_bench.py [--rounds N] [--sizes 4K,1M,64M] [--setups tcpx-net,tcpx-local,ucx-tcp,ucx]
                            (with --vram: tcpx-net,tcpx-local,ucx-tcp-cuda,ucx)
                            [--vram I,T] [--json FILE]
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu13._api import nixl_agent, nixl_agent_config

SETUPS = {
    # name: (backend, backend parameters, environment of both processes)
    "tcpx-net": ("TCPX", {"ip": "127.0.0.1"}, {"UCCL_TCPX_DISABLE_IPC": "1"}),
    "tcpx-local": ("TCPX", {"ip": "127.0.0.1"}, {}),
    "ucx-tcp": ("UCX", {}, {"UCX_TLS": "tcp"}),
    "ucx-tcp-cuda": ("UCX", {}, {"UCX_TLS": "tcp,cuda_copy"}),
    "ucx": ("UCX", {}, {}),
}
ITERS = {4 << 10: 200, 1 << 20: 50, 64 << 20: 8}
# The GPUs of the initiator's and the target's memory (--vram); None: host memory.
VRAM = None


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


def make_agent(name, setup, gpu):
    backend, params, _ = SETUPS[setup]
    params = dict(params)
    if backend == "TCPX" and gpu is not None:
        params["gpu"] = str(gpu)
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    agent.create_backend(backend, params)
    return agent


def target(pipe, setup, size, vram):
    for k, v in SETUPS[setup][2].items():
        os.environ[k] = v
    gpu = vram[1] if vram else None
    agent = make_agent("target", setup, gpu)
    buf = Buffer(max(size, 10000 * 4096), 0, gpu)
    buf.register(agent)
    pipe.send((agent.get_agent_metadata(), (buf.addr, buf.kind, buf.dev)))
    pipe.recv()  # until the initiator is done
    # NIXL's UCX crashes in a library destructor at process exit: skip those.
    os._exit(0)


def wait(agent, handle, state):
    while state == "PROC":
        os.sched_yield()
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"transfer ended {state}")


def measure(setup, size, many):
    """{op: [seconds per transfer]}, and for `many` the (prepare, post) seconds of 10,000 x 4 KiB."""
    saved = dict(os.environ)
    os.environ.update(SETUPS[setup][2])
    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, setup, size, VRAM), daemon=True)
    proc.start()
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
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        os.environ.clear()
        os.environ.update(saved)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="4K,1M,64M")
    ap.add_argument("--setups", help="comma-separated, of " + ", ".join(SETUPS))
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--vram", metavar="I,T", help="GPU memory: the initiator's on GPU I, the target's on GPU T")
    args = ap.parse_args()
    global VRAM
    if args.vram:
        gpus = args.vram.split(",")
        if len(gpus) != 2 or not all(g.isdigit() for g in gpus):
            ap.error(f"--vram takes two GPU indices, I,T: {args.vram!r}")
        VRAM = (int(gpus[0]), int(gpus[1]))
    sizes = [parse_size(s) for s in args.sizes.split(",")]
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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as in target(): UCX's exit-time crash would turn a finished run into a failure
