"""What the binding costs with no transfer running, in one process without a peer:

* per write_async + poll_async, with the extension's calls replaced by no-op Python functions
  (their own cost, timed alone, is subtracted): what p2p.py does per call, apart from the engine
  and the crossing into it;
* register_memory of 1,000 blocks of a registered numpy pool, get_serialized_descs and
  deserialize_descs of the result (the descriptor steps of overhead.py but the transfer).

    python benchmarks/layer.py [--calls 20000] [--runs 15]
"""

import argparse
import statistics
import time
import types

import numpy as np

from uccl_tcpx import p2p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    ep = p2p.Endpoint(0)
    # A connection and a region the stubs stand behind (never handed to the engine).
    ep._conns[0] = 1
    ep._mrs[0] = (1, None)
    stub = types.SimpleNamespace(
        post=lambda conn, write, mr, ptr, size, meta: 1,
        post_sized=lambda conn, write, mr, ptr, size, meta: 1,
        poll=lambda conn, eid: (0, 0, None),
        poll_status=lambda conn, eid: 0,
    )
    meta = bytes(64)

    def layer(n):
        write_async, poll_async = ep.write_async, ep.poll_async
        t0 = time.perf_counter()
        for _ in range(n):
            ok, tid = write_async(0, 0, 1 << 20, 4096, meta)
            poll_async(tid)
        return (time.perf_counter() - t0) / n

    def stubs_alone(n):
        post, poll = stub.post, stub.poll
        t0 = time.perf_counter()
        for _ in range(n):
            post(1, True, 1, 1 << 20, 4096, meta)
            poll(1, 1)
        return (time.perf_counter() - t0) / n

    real = p2p._engine
    p2p._engine = stub
    try:
        costs = [layer(args.calls) - stubs_alone(args.calls) for _ in range(args.runs)]
    finally:
        p2p._engine = real
        ep._conns.clear()
        ep.close()
    print(f"Python layer per write_async + poll_async (engine calls stubbed): median "
          f"{statistics.median(costs) * 1e6:.2f} us of {args.runs} runs")

    with p2p.Endpoint(0) as ep:
        pool = np.ones(1000 * 1024, np.uint8)
        whole = ep.register_memory([pool])
        blocks = [pool[i * 1024 : (i + 1) * 1024] for i in range(1000)]
        steps = {"register_memory": [], "get_serialized_descs": [], "deserialize_descs": []}
        for _ in range(args.runs * 3):
            t0 = time.perf_counter()
            descs = ep.register_memory(blocks)
            t1 = time.perf_counter()
            blob = ep.get_serialized_descs(descs)
            t2 = time.perf_counter()
            back = ep.deserialize_descs(blob)
            t3 = time.perf_counter()
            assert len(back) == 1000
            ep.deregister_memory(descs)
            for name, took in zip(steps, (t1 - t0, t2 - t1, t3 - t2)):
                steps[name].append(took)
        ep.deregister_memory(whole)
    print(f"1,000 blocks of a registered pool, medians of {args.runs * 3}: "
          + ", ".join(f"{name} {statistics.median(v) * 1e3:.2f} ms" for name, v in steps.items()))


if __name__ == "__main__":
    main()
