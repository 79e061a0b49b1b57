#!/usr/bin/env python3
"""NIXL end to end over uccl-tcpx, driven by scripts/nixl_e2e.sh (host memory) and
scripts/nixl_gpu_run.sh (GPU memory).

Two processes, each a NIXL agent (NIXL's Python package) with only the UCCL backend, which NIXL
loads from $NIXL_PLUGIN_DIR: there, NIXL's own src/plugins/uccl built against uccl-tcpx. The
agents register memory, exchange metadata as NIXL users do, and the initiator WRITEs to and READs
from the target: 4 KiB, 1 MiB and 64 MiB, as one descriptor and as many, each transfer with a
notification that the target must receive, every byte checked. Then the initiator transfers to
itself, and finally the target exits and a transfer to it must fail with NIXL's error (not hang).

--device cpu registers host memory (DRAM, numpy). --device gpu registers torch tensors (VRAM):
the initiator's on cuda:0 and the target's on cuda:1 (--target-gpu), each allocated and registered only after the
process created its agent, as NIXL users do; the engine therefore learns its GPU from the first
registration, after NIXL already read its metadata.

Prints one line per check and a table of NIXL's transfer rates (timed through NIXL's API); with
--bench-json, next to those of uccl-tcpx-bench for the same sizes. Exit status 0 only when every
check passed.
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

SIZES = [4 << 10, 1 << 20, 64 << 20]
# Descriptors of the many-descriptor transfers: pieces of at least 1 KiB, 2 to 16 of them.
MAX_PIECES = 16
# Timed transfers per size after the checked one (the 64 MiB ones dominate the run time).
ITERS = {4 << 10: 200, 1 << 20: 50, 64 << 20: 8}
TIMEOUT_S = 60.0


def pretty(size):
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def import_nixl():
    # The package is nixl-cu12; its module is nixl_cu12 (the `nixl` meta package re-exports it).
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    return nixl_agent, nixl_agent_config


class HostMemory:
    """Host buffers (numpy), registered as DRAM."""

    kind = "DRAM"

    def __init__(self, gpu):
        import numpy

        self.np = numpy
        self.dev_id = 0
        self.where = "host memory"

    def zeros(self, size):
        buf = self.np.zeros(size, dtype=self.np.uint8)
        return buf, buf.ctypes.data

    def pattern(self, size, seed):
        """Position-dependent bytes, different per seed, so a misplaced or stale block shows."""
        np = self.np
        i = np.arange(size, dtype=np.uint64)
        x = (i * np.uint64(2654435761) + np.uint64(seed) * np.uint64(0x9E3779B9)) >> np.uint64(7)
        return (x & np.uint64(0xFF)).astype(np.uint8)

    def fill(self, view, seed):
        view[:] = self.pattern(len(view), seed)

    def zero(self, view):
        view[:] = 0

    def holds(self, view, seed):
        return bool(self.np.array_equal(view, self.pattern(len(view), seed)))

    def same(self, a, b):
        return bool(self.np.array_equal(a, b))


class GpuMemory:
    """torch tensors on one GPU, registered as VRAM. Every fill and check synchronizes the device,
    so the engine never reads a buffer that a kernel is still writing, nor the check a stale one."""

    kind = "VRAM"

    def __init__(self, gpu):
        import torch

        if torch.cuda.device_count() <= gpu:
            raise RuntimeError(f"cuda:{gpu} is needed, torch sees {torch.cuda.device_count()} GPU(s)")
        self.torch = torch
        self.dev = torch.device(f"cuda:{gpu}")
        self.dev_id = gpu
        self.where = f"cuda:{gpu} ({torch.cuda.get_device_name(gpu)})"

    def zeros(self, size):
        buf = self.torch.zeros(size, dtype=self.torch.uint8, device=self.dev)
        self.torch.cuda.synchronize(self.dev)
        return buf, buf.data_ptr()

    def pattern(self, size, seed):
        # The host pattern's formula; its values stay below 2**63, so int64 gives the same bytes.
        i = self.torch.arange(size, dtype=self.torch.int64, device=self.dev)
        x = (i * 2654435761 + seed * 0x9E3779B9) >> 7
        return (x & 0xFF).to(self.torch.uint8)

    def fill(self, view, seed):
        view.copy_(self.pattern(view.numel(), seed))
        self.torch.cuda.synchronize(self.dev)

    def zero(self, view):
        view.zero_()
        self.torch.cuda.synchronize(self.dev)

    def holds(self, view, seed):
        self.torch.cuda.synchronize(self.dev)
        return bool(self.torch.equal(view, self.pattern(view.numel(), seed)))

    def same(self, a, b):
        self.torch.cuda.synchronize(self.dev)
        return bool(self.torch.equal(a, b))


def memory_name(device):
    return "VRAM" if device == "gpu" else "DRAM"


def memory(device, gpu):
    return GpuMemory(gpu) if device == "gpu" else HostMemory(gpu)


def pieces(size):
    n = max(2, min(MAX_PIECES, size // 1024))
    step = size // n
    return [(k * step, step if k < n - 1 else size - k * step) for k in range(n)]


def make_agent(name):
    nixl_agent, nixl_agent_config = import_nixl()
    agent = nixl_agent(name, nixl_agent_config(backends=["UCCL"]))
    if "UCCL" not in agent.backends:
        raise RuntimeError(
            f"NIXL did not create the UCCL backend (plugins found: {agent.get_plugin_list()}; "
            f"NIXL_PLUGIN_DIR={os.environ.get('NIXL_PLUGIN_DIR')})"
        )
    return agent


def register(agent, mem, size):
    buf, addr = mem.zeros(size)
    descs = agent.get_reg_descs([(addr, size, mem.dev_id, "")], mem.kind)
    agent.register_memory(descs)
    return buf, addr, descs


def xfer_descs(agent, mem, ranges, dev_id=None):
    """Descriptors of `ranges` in memory of `mem`'s kind on GPU `dev_id` (default: `mem`'s own).
    NIXL finds a remote descriptor's registration by address, length and device, so a range of the
    peer's memory names the peer's GPU."""
    dev = mem.dev_id if dev_id is None else dev_id
    return agent.get_xfer_descs([(addr, n, dev) for addr, n in ranges], mem.kind)


def wait_notif(agent, sender, msg, deadline):
    """Waits for `msg` from `sender`; other notifications are kept for later waits."""
    while True:
        for got in agent.notifs.get(sender, []):
            if got == msg:
                agent.notifs[sender].remove(got)
                return True
        if time.monotonic() > deadline:
            return False
        agent.update_notifs()
        time.sleep(0.0002)


def run_xfer(agent, op, local, remote, peer, notif):
    """Posts one transfer and polls it to the end: ("DONE" | "ERR" | "TIMEOUT", seconds)."""
    handle = agent.initialize_xfer(op, local, remote, peer, notif)
    start = time.perf_counter()
    state = agent.transfer(handle)
    deadline = time.monotonic() + TIMEOUT_S
    while state == "PROC":
        if time.monotonic() > deadline:
            state = "TIMEOUT"
            break
        # Polling as NIXL users do, but handing the CPU over between polls: with fewer cores than
        # runnable threads a pure spin would starve the engine threads that complete the transfer.
        os.sched_yield()
        state = agent.check_xfer_state(handle)
    elapsed = time.perf_counter() - start
    if state != "TIMEOUT":
        agent.release_xfer_handle(handle)
    return state, elapsed


# ---- the target --------------------------------------------------------------------------------


def target_main(pipe, device, gpu):
    # The agent first, the memory after: the order NIXL users follow, and the one that must work.
    agent = make_agent("target")
    mem = memory(device, gpu)
    bufs = {s: register(agent, mem, s) for s in SIZES}
    pipe.send(mem.where)
    pipe.send(agent.get_agent_metadata())
    agent.add_remote_agent(pipe.recv())
    pipe.send((mem.dev_id, {s: addr for s, (_, addr, _) in bufs.items()}))
    while True:
        cmd = pipe.recv()
        kind = cmd[0]
        if kind == "fill":  # ("fill", size, seed): for the initiator's READ
            _, size, seed = cmd
            mem.fill(bufs[size][0], seed)
            pipe.send("filled")
        elif kind == "expect":  # ("expect", size, seed, notif, check_bytes)
            _, size, seed, notif, check = cmd
            got = wait_notif(agent, "initiator", notif, time.monotonic() + TIMEOUT_S)
            ok = True
            if got and check:
                ok = mem.holds(bufs[size][0], seed)
            pipe.send((got, ok))
        elif kind == "exit":
            for _, _, descs in bufs.values():
                agent.deregister_memory(descs)
            del agent
            pipe.send("exited")
            return


# ---- the initiator -----------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok


def initiator_main(pipe, out, device, gpu):
    res = Results()
    rates = {}  # (op, size, layout) -> GB/s
    agent = make_agent("initiator")
    mem = memory(device, gpu)
    bufs = {s: register(agent, mem, s) for s in SIZES}
    target_where = pipe.recv()
    print(f"  initiator on {mem.where}, target on {target_where}", flush=True)
    remote_md = pipe.recv()
    pipe.send(agent.get_agent_metadata())
    peer = agent.add_remote_agent(remote_md)
    peer = peer.decode() if isinstance(peer, bytes) else peer
    res.check(peer == "target", f"metadata exchanged, remote agent {peer!r}")
    remote_dev, remote_addrs = pipe.recv()
    seed = 1

    for size in SIZES:
        buf, addr, _ = bufs[size]
        for layout in ("1 descriptor", f"{len(pieces(size))} descriptors"):
            parts = [(0, size)] if layout == "1 descriptor" else pieces(size)
            local = xfer_descs(agent, mem, [(addr + o, n) for o, n in parts])
            remote = xfer_descs(agent, mem, [(remote_addrs[size] + o, n) for o, n in parts], remote_dev)
            for op in ("WRITE", "READ"):
                what = f"{op:5} {pretty(size):>7}, {layout}"
                times = []
                for it in range(1 + ITERS[size]):
                    seed += 1
                    checked = it == 0
                    notif = f"{op}-{size}-{len(parts)}-{it}".encode()
                    if op == "WRITE":
                        if checked:
                            mem.fill(buf, seed)
                    elif checked:
                        pipe.send(("fill", size, seed))
                        pipe.recv()
                        mem.zero(buf)
                    state, secs = run_xfer(agent, op, local, remote, peer, notif)
                    if state != "DONE":
                        res.check(False, f"{what}: transfer ended {state}")
                        break
                    # The target checks the notification of every transfer, and the bytes of the
                    # checked WRITE; the initiator checks the bytes of the checked READ.
                    pipe.send(("expect", size, seed, notif, checked and op == "WRITE"))
                    got, ok = pipe.recv()
                    if not got:
                        res.check(False, f"{what}: notification {notif!r} never reached the target")
                        break
                    if checked:
                        if op == "READ":
                            ok = mem.holds(buf, seed)
                        if not res.check(ok, f"{what}: bytes and notification"):
                            break
                    else:
                        times.append(secs)
                if len(times) == ITERS[size]:
                    # As uccl-tcpx-bench reports: GB/s from the mean time, latency as the median.
                    rates[(op, size, len(parts))] = (
                        size / statistics.mean(times) / 1e9,
                        statistics.median(times) * 1e6,
                    )

    # An agent's transfer to itself: WRITE from the 1 MiB buffer into the 64 MiB one, then READ back.
    src_buf, src_addr, _ = bufs[1 << 20]
    dst_buf, dst_addr, _ = bufs[64 << 20]
    mem.fill(src_buf, 999)
    mem.zero(dst_buf)
    local = xfer_descs(agent, mem, [(src_addr, 1 << 20)])
    remote = xfer_descs(agent, mem, [(dst_addr + 4096, 1 << 20)])
    state, _ = run_xfer(agent, "WRITE", local, remote, "initiator", b"self-write")
    res.check(
        state == "DONE"
        and mem.same(dst_buf[4096 : 4096 + (1 << 20)], src_buf)
        and wait_notif(agent, "initiator", b"self-write", time.monotonic() + TIMEOUT_S),
        f"self WRITE 1 MiB: {state}, bytes and notification",
    )
    mem.zero(src_buf)
    state, _ = run_xfer(agent, "READ", local, remote, "initiator", b"self-read")
    res.check(
        state == "DONE" and mem.holds(src_buf, 999),
        f"self READ 1 MiB: {state}, bytes",
    )

    # The target exits; a transfer to it must fail, promptly.
    pipe.send(("exit",))
    res.check(pipe.recv() == "exited", "target agent destroyed")
    time.sleep(0.5)
    buf, addr, _ = bufs[1 << 20]
    local = xfer_descs(agent, mem, [(addr, 1 << 20)])
    remote = xfer_descs(agent, mem, [(remote_addrs[1 << 20], 1 << 20)], remote_dev)
    start = time.monotonic()
    try:
        state, _ = run_xfer(agent, "WRITE", local, remote, peer, b"after-exit")
    except Exception as e:  # NIXL raises from initialize_xfer when it refuses up front
        state = f"raised {type(e).__name__}: {e}"
    waited = time.monotonic() - start
    res.check(
        state != "DONE" and state != "TIMEOUT",
        f"WRITE after the target exited fails: {state} after {waited:.2f} s",
    )
    out.put((res.passed, res.failed, {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in rates.items()}))


def bench_rates(path):
    """(op, size) -> (GB/s, p50 us) from uccl-tcpx-bench's --json-file report."""
    if not path:
        return {}
    with open(path) as f:
        report = json.load(f)
    found = {}

    def walk(node):
        if isinstance(node, dict):
            op, size = node.get("op"), node.get("size")
            gbps, p50 = node.get("gb_per_s"), node.get("p50_us")
            if isinstance(op, str) and isinstance(size, int) and isinstance(gbps, (int, float)):
                found[(op.upper(), size)] = (gbps, p50)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(report)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="", help="label printed with the results")
    ap.add_argument("--bench-json", default="", help="uccl-tcpx-bench --json-file output")
    ap.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="host memory, or torch tensors with the initiator on cuda:0 and the target on cuda:1",
    )
    ap.add_argument(
        "--target-gpu",
        type=int,
        default=1,
        help="the target's GPU with --device gpu (0 on a one-GPU host: both agents share it)",
    )
    args = ap.parse_args()
    if not os.environ.get("NIXL_PLUGIN_DIR"):
        sys.exit("NIXL_PLUGIN_DIR must name the directory holding libplugin_UCCL.so")

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    target = ctx.Process(target=target_main, args=(a, args.device, args.target_gpu), name="target")
    initiator = ctx.Process(target=initiator_main, args=(b, out, args.device, 0), name="initiator")
    print(
        f"== NIXL over uccl-tcpx: {args.variant}, {memory_name(args.device)}"
        f" (NIXL_PLUGIN_DIR={os.environ['NIXL_PLUGIN_DIR']})"
    )
    target.start()
    initiator.start()
    # Only the children hold pipe ends now, so one dying ends the other's wait with EOFError.
    a.close()
    b.close()
    initiator.join(timeout=1800)
    target.join(timeout=60)
    for p in (initiator, target):
        if p.is_alive():
            p.kill()
            print(f"  FAIL  the {p.name} process hung and was killed")
            sys.exit(1)
    if initiator.exitcode != 0 or out.empty():
        print(f"  FAIL  the initiator process died (exit code {initiator.exitcode})")
        sys.exit(1)
    if target.exitcode != 0:
        print(f"  FAIL  the target process died (exit code {target.exitcode})")
        sys.exit(1)
    passed, failed, rates = out.get()

    bench = bench_rates(args.bench_json)
    # NIXL: the timed transfers, each from transfer() to DONE; GB/s from their mean, us their
    # median. bench: uccl-tcpx-bench on the same engine and transport without NIXL (one descriptor),
    # the same two statistics.
    print(
        f"\n  {'op':5} {'size':>7} {'descs':>5} {'NIXL GB/s':>10} {'NIXL p50us':>10}"
        f" {'bench GB/s':>11} {'bench p50us':>11}"
    )
    for key, (gbps, us) in rates.items():
        op, size, n = key.split("|")
        ref = bench.get((op, int(size)))
        ref_text = f"{ref[0]:11.3f} {ref[1]:11.1f}" if ref else f"{'-':>11} {'-':>11}"
        print(f"  {op:5} {pretty(int(size)):>7} {n:>5} {gbps:10.3f} {us:10.1f} {ref_text}")
    print(f"\n{args.variant}: {passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
