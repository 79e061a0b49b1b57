#!/usr/bin/env python3
"""Two processes drive UCCL's engine (built against uccl-tcpx) with CUDA tensors on GPU 0.

UCCL's own GPU tests write and read a tensor of ones into a tensor of ones, which passes whether
or not a byte moved. Here the server's tensors start as zeros and as a pattern, the client writes
and reads a different pattern at sizes below, at and above the engine's chunking (whose pieces
carry `engine_offset`), and every byte is compared on the side that owns it. Needs torch with CUDA.

Prints one line per check and ends with "gpu_bytes: N passed, N failed".
"""

import multiprocessing as mp
import sys

import torch

from uccl import p2p

SIZES = [4096, 1 << 20, 64 * 1024 * 1024 + 12]


def pattern(n, seed):
    i = torch.arange(n, dtype=torch.int64, device="cuda:0")
    return ((i * 2654435761 + seed) >> 7).to(torch.uint8)


class Checks:
    def __init__(self, who):
        self.who, self.passed, self.failed = who, 0, 0

    def check(self, ok, what):
        self.passed += bool(ok)
        self.failed += not ok
        print(f"[{self.who}] {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        return ok


def advertised(c, ep, conn, t, what):
    ok, mr = ep.reg(t.data_ptr(), t.numel())
    c.check(ok, f"reg {what}")
    ok, blob = ep.advertise(conn, mr, t.data_ptr(), t.numel())
    c.check(ok and len(blob) == 64, f"advertise {what}")
    return bytes(blob)


def server(pipe, result):
    c = Checks("server")
    ep = p2p.Endpoint(0, 4)
    pipe.send(bytes(ep.get_metadata()))
    ok, _, _, conn = ep.accept()
    c.check(ok, "accept")
    targets = [torch.zeros(n, dtype=torch.uint8, device="cuda:0") for n in SIZES]
    sources = [pattern(n, 50 + k) for k, n in enumerate(SIZES)]
    torch.cuda.synchronize()
    blobs = [advertised(c, ep, conn, t, f"write target of {t.numel()} bytes") for t in targets]
    blobs += [advertised(c, ep, conn, t, f"read source of {t.numel()} bytes") for t in sources]
    pipe.send(blobs)
    c.check(pipe.recv() == "done", "client finished")
    torch.cuda.synchronize()
    for k, t in enumerate(targets):
        c.check(torch.equal(t, pattern(t.numel(), 10 + k)), f"write of {t.numel()} bytes landed whole")
    for k, t in enumerate(sources):
        c.check(torch.equal(t, pattern(t.numel(), 50 + k)), f"read source of {t.numel()} bytes unchanged")
    pipe.send("checked")
    result.put(("server", c.passed, c.failed))


def client(pipe, result):
    c = Checks("client")
    ip, port, gpu = p2p.Endpoint.parse_metadata(pipe.recv())
    ep = p2p.Endpoint(0, 4)
    ok, conn = ep.connect(ip, gpu, remote_port=port)
    c.check(ok, "connect")
    blobs = pipe.recv()
    for k, n in enumerate(SIZES):
        src = pattern(n, 10 + k)
        torch.cuda.synchronize()
        ok, mr = ep.reg(src.data_ptr(), n)
        c.check(ok and ep.write(conn, mr, src.data_ptr(), n, blobs[k]), f"write {n} bytes")
    for k, n in enumerate(SIZES):
        dst = torch.full((n,), 0xEE, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        ok, mr = ep.reg(dst.data_ptr(), n)
        ok = ok and ep.read(conn, mr, dst.data_ptr(), n, blobs[len(SIZES) + k])
        torch.cuda.synchronize()
        c.check(ok and torch.equal(dst, pattern(n, 50 + k)), f"read {n} bytes, every byte")
    pipe.send("done")
    c.check(pipe.recv() == "checked", "server checked")
    result.put(("client", c.passed, c.failed))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    a, b = mp.Pipe()
    result = mp.Queue()
    procs = [mp.Process(target=server, args=(a, result)), mp.Process(target=client, args=(b, result))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    passed = failed = 0
    for p in procs:
        if p.exitcode != 0:
            print(f"FAIL {p.name} exit code {p.exitcode}", flush=True)
            failed += 1
    for _ in procs:
        try:
            _, np_, nf = result.get(timeout=5)
        except Exception:  # a process that died before reporting is counted through its checks below
            break
        passed, failed = passed + np_, failed + nf
    expected_checks = 1 + 4 * len(SIZES) + 1 + 2 * len(SIZES) + 1 + 2 * len(SIZES) + 1
    if passed + failed < expected_checks:
        print(f"FAIL only {passed + failed} of {expected_checks} checks ran", flush=True)
        failed += 1
    print(f"gpu_bytes: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
