#!/usr/bin/env python3
"""NIXL end to end over uccl-tcpx, driven by scripts/nixl_e2e.sh.

Two processes, each a NIXL agent (NIXL's Python package) with only the UCCL backend, which NIXL
loads from $NIXL_PLUGIN_DIR: there, NIXL's own src/plugins/uccl built against uccl-tcpx. The
agents register host memory, exchange metadata as NIXL users do, and the initiator WRITEs to and
READs from the target: 4 KiB, 1 MiB and 64 MiB, as one descriptor and as many, each transfer with
a notification that the target must receive, every byte checked. Then the initiator transfers to
itself, and finally the target exits and a transfer to it must fail with NIXL's error (not hang).

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


def pattern(np, size, seed):
    """Position-dependent bytes, different per seed, so a misplaced or stale block shows."""
    i = np.arange(size, dtype=np.uint64)
    x = (i * np.uint64(2654435761) + np.uint64(seed) * np.uint64(0x9E3779B9)) >> np.uint64(7)
    return (x & np.uint64(0xFF)).astype(np.uint8)


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


def register(agent, np, size):
    buf = np.zeros(size, dtype=np.uint8)
    addr = buf.ctypes.data
    descs = agent.get_reg_descs([(addr, size, 0, "")], "DRAM")
    agent.register_memory(descs)
    return buf, addr, descs


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


def target_main(pipe):
    import numpy as np

    agent = make_agent("target")
    bufs = {s: register(agent, np, s) for s in SIZES}
    pipe.send(agent.get_agent_metadata())
    agent.add_remote_agent(pipe.recv())
    pipe.send({s: addr for s, (_, addr, _) in bufs.items()})
    while True:
        cmd = pipe.recv()
        kind = cmd[0]
        if kind == "fill":  # ("fill", size, seed): for the initiator's READ
            _, size, seed = cmd
            bufs[size][0][:] = pattern(np, size, seed)
            pipe.send("filled")
        elif kind == "expect":  # ("expect", size, seed, notif, check_bytes)
            _, size, seed, notif, check = cmd
            got = wait_notif(agent, "initiator", notif, time.monotonic() + TIMEOUT_S)
            ok = True
            if got and check:
                ok = bool(np.array_equal(bufs[size][0], pattern(np, size, seed)))
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


def initiator_main(pipe, out):
    import numpy as np

    res = Results()
    rates = {}  # (op, size, layout) -> GB/s
    agent = make_agent("initiator")
    bufs = {s: register(agent, np, s) for s in SIZES}
    remote_md = pipe.recv()
    pipe.send(agent.get_agent_metadata())
    peer = agent.add_remote_agent(remote_md)
    peer = peer.decode() if isinstance(peer, bytes) else peer
    res.check(peer == "target", f"metadata exchanged, remote agent {peer!r}")
    remote_addrs = pipe.recv()
    seed = 1

    for size in SIZES:
        buf, addr, _ = bufs[size]
        for layout in ("1 descriptor", f"{len(pieces(size))} descriptors"):
            parts = [(0, size)] if layout == "1 descriptor" else pieces(size)
            local = agent.get_xfer_descs([(addr + o, n, 0) for o, n in parts], "DRAM")
            remote = agent.get_xfer_descs(
                [(remote_addrs[size] + o, n, 0) for o, n in parts], "DRAM"
            )
            for op in ("WRITE", "READ"):
                what = f"{op:5} {pretty(size):>7}, {layout}"
                times = []
                for it in range(1 + ITERS[size]):
                    seed += 1
                    checked = it == 0
                    notif = f"{op}-{size}-{len(parts)}-{it}".encode()
                    if op == "WRITE":
                        if checked:
                            buf[:] = pattern(np, size, seed)
                    elif checked:
                        pipe.send(("fill", size, seed))
                        pipe.recv()
                        buf[:] = 0
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
                            ok = bool(np.array_equal(buf, pattern(np, size, seed)))
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
    src_buf[:] = pattern(np, 1 << 20, 999)
    dst_buf[:] = 0
    local = agent.get_xfer_descs([(src_addr, 1 << 20, 0)], "DRAM")
    remote = agent.get_xfer_descs([(dst_addr + 4096, 1 << 20, 0)], "DRAM")
    state, _ = run_xfer(agent, "WRITE", local, remote, "initiator", b"self-write")
    res.check(
        state == "DONE"
        and bool(np.array_equal(dst_buf[4096 : 4096 + (1 << 20)], src_buf))
        and wait_notif(agent, "initiator", b"self-write", time.monotonic() + TIMEOUT_S),
        f"self WRITE 1 MiB: {state}, bytes and notification",
    )
    src_buf[:] = 0
    state, _ = run_xfer(agent, "READ", local, remote, "initiator", b"self-read")
    res.check(
        state == "DONE" and bool(np.array_equal(src_buf, pattern(np, 1 << 20, 999))),
        f"self READ 1 MiB: {state}, bytes",
    )

    # The target exits; a transfer to it must fail, promptly.
    pipe.send(("exit",))
    res.check(pipe.recv() == "exited", "target agent destroyed")
    time.sleep(0.5)
    buf, addr, _ = bufs[1 << 20]
    local = agent.get_xfer_descs([(addr, 1 << 20, 0)], "DRAM")
    remote = agent.get_xfer_descs([(remote_addrs[1 << 20], 1 << 20, 0)], "DRAM")
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
    args = ap.parse_args()
    if not os.environ.get("NIXL_PLUGIN_DIR"):
        sys.exit("NIXL_PLUGIN_DIR must name the directory holding libplugin_UCCL.so")

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out = ctx.Queue()
    target = ctx.Process(target=target_main, args=(a,), name="target")
    initiator = ctx.Process(target=initiator_main, args=(b, out), name="initiator")
    print(f"== NIXL over uccl-tcpx: {args.variant} (NIXL_PLUGIN_DIR={os.environ['NIXL_PLUGIN_DIR']})")
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
