"""What the Python binding adds per call: a loop of one-sided write_async + poll_async between two
processes of this host (host memory), and the time to post a transfer() of 1,000 descriptors.
Compare the loop with `cargo run --release -p uccl-tcpx-bench -- --ops write --sizes 4K,1M` run
right before or after on the same machine.

    python benchmarks/overhead.py [--sizes 4096,1048576] [--iters 2000]
"""

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

from uccl_tcpx import p2p

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
    for size in sizes:
        for _ in range(50):
            ok, tid = ep.write_async(conn, mr, src.ctypes.data, size, fifo)
            while not ep.poll_async(tid)[1]:
                pass
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            ok, tid = ep.write_async(conn, mr, src.ctypes.data, size, fifo)
            while not ep.poll_async(tid)[1]:
                pass
            times.append(time.perf_counter() - t0)
        med = statistics.median(times) * 1e6
        print(f"write_async+poll_async {size:>8} B: median {med:8.1f} us, mean {statistics.mean(times) * 1e6:8.1f} us, "
              f"{size / statistics.mean(times) / 1e9:6.2f} GB/s")
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
    ep.register_memory([src])
    blocks = [src[i * 1024:(i + 1) * 1024] for i in range(1000)]
    t0 = time.perf_counter()
    local = ep.register_memory(blocks)
    blob = ep.get_serialized_descs(local)
    ok, tid = ep.transfer(conn, "write", local, remote)
    took = time.perf_counter() - t0
    assert ok
    while not ep.poll_async(tid)[1]:
        pass
    print(f"register_memory (blocks of a registered pool) + get_serialized_descs + transfer of 1000 descriptors: "
          f"posted in {took * 1e3:.2f} ms ({len(blob)} bytes of descriptors)")
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
