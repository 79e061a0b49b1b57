"""What the Python binding adds per call: a loop of one-sided write_async + poll_async between two
processes of this host (host memory), and the time to post a transfer() of 1,000 descriptors.
Compare the loop with `cargo run --release -p uccl-tcpx-bench -- --ops write --sizes 4K,1M` run
right before or after on the same machine.

    python benchmarks/overhead.py [--sizes 4096,1048576] [--iters 2000] [--rounds 20]
"""

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

from uccl_tcpx import _engine, p2p

SERVER = """
import sys, numpy as np
from uccl_tcpx import p2p
n = int(sys.argv[1])
ep = p2p.Endpoint(0)
buf = np.zeros(n, np.uint8)
_, mr = ep.reg(buf.ctypes.data, n)
_, meta = ep.advertise(mr, buf.ctypes.data, n)
descs = ep.register_memory([buf[i * 1024:(i + 1) * 1024] for i in range(1000)])
print(ep.get_metadata().hex(), meta.hex(), ep.get_serialized_descs(descs).hex(), flush=True)
ep.accept()
sys.stdin.readline()
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,1048576")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the 1,000-descriptor steps")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    largest = max(max(sizes), 1000 * 1024)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(largest)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    meta_hex, fifo_hex, descs_hex = server.stdout.readline().split()
    ep = p2p.Endpoint(0)
    ok, conn = ep.add_remote_endpoint(bytes.fromhex(meta_hex))
    assert ok
    fifo = bytes.fromhex(fifo_hex)
    src = np.ones(largest, np.uint8)
    _, mr = ep.reg(src.ctypes.data, largest)
    # The same loop straight over the extension (no Python layer): what the binding adds is the
    # difference. Blocks of the two loops alternate, so both see the same load.
    raw_conn, raw_mr = ep._conns[conn], ep._mrs[mr][0]
    clock = time.perf_counter

    def p2p_loop(size, n, times):
        for _ in range(n):
            t0 = clock()
            ok, tid = ep.write_async(conn, mr, ptr, size, fifo)
            while not ep.poll_async(tid)[1]:
                pass
            times.append(clock() - t0)

    def raw_loop(size, n, times):
        item = fifo[:8] + size.to_bytes(4, "little") + fifo[12:]
        for _ in range(n):
            t0 = clock()
            eid = _engine.post(raw_conn, True, raw_mr, ptr, size, item)
            while _engine.poll(raw_conn, eid)[0] == 1:
                pass
            times.append(clock() - t0)

    ptr = src.ctypes.data
    for size in sizes:
        p2p_times, raw_times = [], []
        for _ in range(10):
            p2p_loop(size, args.iters // 10, p2p_times)
            raw_loop(size, args.iters // 10, raw_times)
        p, r = statistics.median(p2p_times) * 1e6, statistics.median(raw_times) * 1e6
        print(f"write_async+poll_async {size:>8} B, alternating blocks: p2p median {p:.2f} us, extension alone "
              f"median {r:.2f} us, the Python layer adds {p - r:.2f} us")
    for size in sizes:
        for _ in range(50):
            ok, tid = ep.write_async(conn, mr, src.ctypes.data, size, fifo)
            while not ep.poll_async(tid)[1]:
                pass
        times, posts, polls = [], [], []
        ptr = src.ctypes.data
        clock = time.perf_counter
        for _ in range(args.iters):
            t0 = clock()
            ok, tid = ep.write_async(conn, mr, ptr, size, fifo)
            t1 = clock()
            while True:
                t2 = clock()
                done = ep.poll_async(tid)[1]
                polls.append(clock() - t2)
                if done:
                    break
            times.append(clock() - t0)
            posts.append(t1 - t0)
        med = statistics.median(times) * 1e6
        print(f"write_async+poll_async {size:>8} B: median {med:8.1f} us, mean {statistics.mean(times) * 1e6:8.1f} us, "
              f"{size / statistics.mean(times) / 1e9:6.2f} GB/s; one write_async call median "
              f"{statistics.median(posts) * 1e6:.2f} us, one poll_async call median {statistics.median(polls) * 1e6:.2f} us "
              f"({len(polls) / args.iters:.1f} per transfer)")
    remote = ep.deserialize_descs(bytes.fromhex(descs_hex))
    local = ep.register_memory([src[i * 1024:(i + 1) * 1024] for i in range(1000)])
    posts = []
    for _ in range(20):
        t0 = time.perf_counter()
        ok, tid = ep.transfer(conn, "write", local, remote)
        posts.append(time.perf_counter() - t0)
        assert ok
        while not ep.poll_async(tid)[1]:
            pass
    print(f"transfer() of 1000 descriptors posted in: median {statistics.median(posts) * 1e3:.2f} ms")
    # As a KV-cache pool is used: the pool registered once, its blocks described per step.
    # Each step of it timed on its own too, with deserialize_descs (the peer's side of the blob).
    pool = ep.register_memory([src])
    blocks = [src[i * 1024:(i + 1) * 1024] for i in range(1000)]
    steps = {"register_memory": [], "get_serialized_descs": [], "deserialize_descs": [], "transfer": [],
             "all four": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        local = ep.register_memory(blocks)
        t1 = time.perf_counter()
        blob = ep.get_serialized_descs(local)
        t2 = time.perf_counter()
        back = ep.deserialize_descs(blob)
        t3 = time.perf_counter()
        ok, tid = ep.transfer(conn, "write", local, remote)
        t4 = time.perf_counter()
        assert ok and len(back) == 1000
        while not ep.poll_async(tid)[1]:
            pass
        ep.deregister_memory(local)
        for name, took in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            steps[name].append(took)
    print(f"register_memory (blocks of a registered pool) + get_serialized_descs + deserialize_descs + transfer "
          f"of 1000 descriptors ({len(blob)} bytes of descriptors), medians of {args.rounds}: "
          + ", ".join(f"{name} {statistics.median(v) * 1e3:.2f} ms" for name, v in steps.items()))
    ep.deregister_memory(pool)
    t0 = time.perf_counter()
    fresh = ep.register_memory([np.zeros(1024, np.uint8) for _ in range(1000)])
    print(f"register_memory of 1000 separate buffers (1000 registrations): {(time.perf_counter() - t0) * 1e3:.2f} ms")
    ep.deregister_memory(fresh)
    server.stdin.write("done\n")
    server.stdin.flush()
    server.wait(30)
    ep.close()


if __name__ == "__main__":
    main()
