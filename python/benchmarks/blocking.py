"""Blocking calls against async + busy poll, through UCCL's Python API: for each size, blocks of
blocking `write` (or `read`) alternate with blocks of `write_async` + a `poll_async` loop between
two processes of this host, and the table gives the median of each and their ratio (a blocking
call that wakes late shows as a ratio over 1). Host memory by default; `--gpu` puts the client on
GPU 0 and the server on GPU 1 (PyTorch), `--gpus C,S` on GPUs C and S (which may be one GPU).
The path is the engine's choice: the same-host one, or the network one with
UCCL_TCPX_DISABLE_IPC=1 set for both processes. Every transfer's bytes are checked once per size.
`--only` times one kind, for a trace of it.

    python benchmarks/blocking.py [--gpu [--gpus 0,1]] [--only blocking|polled]
        [--sizes 4K,64K,1M,16M,64M,256M] [--iters 40] [--ops write,read]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from uccl_tcpx import p2p

SERVER = """
import sys
from uccl_tcpx import p2p
n, gpu = int(sys.argv[1]), sys.argv[2] != "cpu"
if gpu:
    import torch
    dev = int(sys.argv[2])
    torch.cuda.set_device(dev)
    buf = torch.zeros(n, dtype=torch.uint8, device=f"cuda:{dev}")
    ptr = buf.data_ptr()
else:
    import numpy as np
    buf = np.zeros(n, np.uint8)
    ptr = buf.ctypes.data
ep = p2p.Endpoint(dev if gpu else 0)
_, mr = ep.reg(ptr, n)
_, meta = ep.advertise(mr, ptr, n)
print(ep.get_metadata().hex(), meta.hex(), flush=True)
ep.accept()
for line in sys.stdin:
    # "sum N": the first N bytes' sum, so the client checks what landed.
    k = int(line.split()[1])
    print(int(buf[:k].sum(dtype=torch.int64).item()) if gpu else int(buf[:k].astype("int64").sum()), flush=True)
"""


def size_arg(s):
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpus", default="0,1", help="with --gpu: the client's GPU and the server's")
    ap.add_argument("--sizes", default="4K,64K,1M,16M,64M,256M")
    ap.add_argument("--iters", type=int, default=40, help="transfers of each kind a size, in blocks of 4")
    ap.add_argument("--ops", default="write,read")
    ap.add_argument("--json", help="write the table here too")
    ap.add_argument("--only", choices=["blocking", "polled"],
                    help="time only this kind (for a trace of one kind); the table's ratio is then 1")
    args = ap.parse_args()
    sizes = [size_arg(s) for s in args.sizes.split(",")]
    largest = max(sizes)
    try:
        client_gpu, server_gpu = (int(g) for g in args.gpus.split(","))
    except ValueError:
        ap.error(f"--gpus takes two GPU indices, C,S; got {args.gpus!r}")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(largest), str(server_gpu) if args.gpu else "cpu"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    meta_hex, fifo_hex = server.stdout.readline().split()
    if args.gpu:
        import torch
        torch.cuda.set_device(client_gpu)
        src = torch.randint(0, 256, (largest,), dtype=torch.uint8, device=f"cuda:{client_gpu}")
        ptr = src.data_ptr()
        expect = lambda k: int(src[:k].sum(dtype=torch.int64).item())  # noqa: E731
    else:
        import numpy as np
        src = np.random.default_rng(7).integers(0, 256, largest, dtype=np.uint8)
        ptr = src.ctypes.data
        expect = lambda k: int(src[:k].astype("int64").sum())  # noqa: E731
    ep = p2p.Endpoint(client_gpu if args.gpu else 0)
    ok, conn = ep.add_remote_endpoint(bytes.fromhex(meta_hex))
    assert ok, "connect"
    fifo = bytes.fromhex(fifo_hex)
    _, mr = ep.reg(ptr, largest)
    clock = time.perf_counter

    def blocking(op, size, n, times):
        call = ep.write if op == "write" else ep.read
        for _ in range(n):
            t0 = clock()
            assert call(conn, mr, ptr, size, fifo), op
            times.append(clock() - t0)

    def polled(op, size, n, times):
        call = ep.write_async if op == "write" else ep.read_async
        for _ in range(n):
            t0 = clock()
            ok, tid = call(conn, mr, ptr, size, fifo)
            assert ok, op
            while not ep.poll_async(tid)[1]:
                pass
            times.append(clock() - t0)

    rows = []
    for op in args.ops.split(","):
        for size in sizes:
            blocking(op, size, 2, [])
            polled(op, size, 2, [])
            if op == "write":
                server.stdin.write(f"sum {size}\n")
                server.stdin.flush()
                got = int(server.stdout.readline())
                assert got == expect(size), f"write {size}: the server holds other bytes"
            b, p = [], []
            kinds = {"blocking": (blocking,), "polled": (polled,)}.get(args.only, (blocking, polled))
            for _ in range(4):
                for kind in kinds:
                    kind(op, size, max(args.iters // 4, 1), b if kind is blocking else p)
            b, p = b or p, p or b
            mb, mp = statistics.median(b) * 1e6, statistics.median(p) * 1e6
            rows.append({"op": op, "size": size, "blocking_us": mb, "polled_us": mp, "ratio": mb / mp})
            print(f"{op:5} {size:>10} B: blocking {mb:9.1f} us ({size / mb / 1e3:7.2f} GB/s), async + busy poll "
                  f"{mp:9.1f} us ({size / mp / 1e3:7.2f} GB/s): {mb / mp:.2f}x", flush=True)
    server.stdin.close()
    server.wait(timeout=30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": args.gpu and args.gpus, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
