#!/usr/bin/env python3
"""Two processes drive UCCL's engine (built against uccl-tcpx) over host memory.

The server (GPU index 0) registers and advertises buffers; the client (GPU index 1) connects and
writes, reads, does the same with the async calls and poll_async, writes and reads vectors
(regv / advertisev / writev / readv), sends into a receive posted larger than its registration,
and deregisters. Every byte is checked on the side that owns it, and accept must report the
client's GPU index. Then a message too large for the registration behind a receive: the receiving
process must abort naming the cause, not report success. Needs numpy only (no torch, no GPU).

Prints one line per check and ends with "smoke: N passed, N failed".
"""

import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time

import numpy as np

from uccl import p2p

SIZES = [10 * 1024 * 1024 + 3, 4096, 1 << 20]  # one-sided: large, small, chunk-sized
VEC = [100_000, 1, 65_536, 300_001]  # vector items
SERVER_GPU, CLIENT_GPU = 0, 1


def pattern(n, seed):
    return ((np.arange(n, dtype=np.uint64) * 2654435761 + seed) >> 7).astype(np.uint8)


def ptr(a):
    return a.ctypes.data


class Checks:
    def __init__(self, who):
        self.who, self.passed, self.failed = who, 0, 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
            print(f"[{self.who}] ok   {what}", flush=True)
        else:
            self.failed += 1
            print(f"[{self.who}] FAIL {what}", flush=True)
        return ok


def server(pipe, result):
    c = Checks("server")
    ep = p2p.Endpoint(SERVER_GPU, 4)
    pipe.send(bytes(ep.get_metadata()))
    ok, ip, remote_gpu, conn = ep.accept()
    c.check(ok, f"accept from {ip}")
    c.check(remote_gpu == CLIENT_GPU, f"accept reports the client's GPU index ({remote_gpu})")

    # Targets of the client's writes, sources of its reads.
    wbufs = [np.zeros(n, dtype=np.uint8) for n in SIZES]
    rbufs = [pattern(n, 100 + i) for i, n in enumerate(SIZES)]
    items = []
    for b in wbufs + rbufs:
        ok, mr = ep.reg(ptr(b), b.nbytes)
        c.check(ok, f"reg {b.nbytes} bytes")
        ok, blob = ep.advertise(conn, mr, ptr(b), b.nbytes)
        c.check(ok and len(blob) == 64, "advertise")
        items.append(blob)
    vw = [np.zeros(n, dtype=np.uint8) for n in VEC]
    vr = [pattern(n, 200 + i) for i, n in enumerate(VEC)]
    ok, vw_mrs = ep.regv([ptr(b) for b in vw], [b.nbytes for b in vw])
    c.check(ok and len(vw_mrs) == len(VEC), "regv (write targets)")
    ok, vr_mrs = ep.regv([ptr(b) for b in vr], [b.nbytes for b in vr])
    c.check(ok and len(vr_mrs) == len(VEC), "regv (read sources)")
    ok, vw_items = ep.advertisev(conn, vw_mrs, [ptr(b) for b in vw], VEC, len(VEC))
    c.check(ok and len(vw_items) == len(VEC), "advertisev (write targets)")
    ok, vr_items = ep.advertisev(conn, vr_mrs, [ptr(b) for b in vr], VEC, len(VEC))
    c.check(ok, "advertisev (read sources)")
    pipe.send((items, vw_items, vr_items))

    # A receive of 8 KiB into a 4 KiB registration (as UCCL's test_engine_send.py posts).
    rbuf = np.full(8192, 0xEE, dtype=np.uint8)
    ok, rmr = ep.reg(ptr(rbuf), 4096)
    c.check(ok, "reg 4 KiB of an 8 KiB receive buffer")
    ok = ep.recv(conn, rmr, ptr(rbuf), 8192)
    c.check(ok, "recv of 8 KiB posted into 4 KiB registered")
    c.check(np.array_equal(rbuf[:4096], pattern(4096, 300)), "received bytes")
    c.check(bool((rbuf[4096:] == 0xEE).all()), "bytes past the registration untouched")

    c.check(pipe.recv() == "written", "client finished")
    for i, n in enumerate(SIZES):
        c.check(np.array_equal(wbufs[i], pattern(n, 10 + i)), f"write of {n} bytes landed")
    for i, n in enumerate(VEC):
        c.check(np.array_equal(vw[i], pattern(n, 20 + i)), f"writev item {i} ({n} bytes) landed")
    for mr in vw_mrs + vr_mrs:
        c.check(ep.dereg(mr), "dereg")
    pipe.send("done")
    result.put(("server", c.passed, c.failed))


def client(pipe, result):
    c = Checks("client")
    md = pipe.recv()
    ip, port, remote_gpu = p2p.Endpoint.parse_metadata(md)
    ep = p2p.Endpoint(CLIENT_GPU, 4)
    ok, conn = ep.connect(ip, remote_gpu, remote_port=port)
    c.check(ok, f"connect to {ip}:{port} (GPU {remote_gpu})")
    items, vw_items, vr_items = pipe.recv()
    n_sizes = len(SIZES)

    srcs = [pattern(n, 10 + i) for i, n in enumerate(SIZES)]
    for i, s in enumerate(srcs):
        ok, mr = ep.reg(ptr(s), s.nbytes)
        if i % 2 == 0:
            ok = ok and ep.write(conn, mr, ptr(s), s.nbytes, items[i])
            c.check(ok, f"write {s.nbytes} bytes")
        else:
            ok, tid = ep.write_async(conn, mr, ptr(s), s.nbytes, items[i])
            done = False
            deadline = time.time() + 60
            while ok and not done and time.time() < deadline:
                ok, done = ep.poll_async(tid)
            c.check(ok and done, f"write_async {s.nbytes} bytes + poll_async")
    for i, n in enumerate(SIZES):
        dst = np.zeros(n, dtype=np.uint8)
        ok, mr = ep.reg(ptr(dst), n)
        if i % 2 == 0:
            ok = ok and ep.read(conn, mr, ptr(dst), n, items[n_sizes + i])
            what = "read"
        else:
            ok, tid = ep.read_async(conn, mr, ptr(dst), n, items[n_sizes + i])
            done = False
            deadline = time.time() + 60
            while ok and not done and time.time() < deadline:
                ok, done = ep.poll_async(tid)
            ok = ok and done
            what = "read_async + poll_async"
        c.check(ok and np.array_equal(dst, pattern(n, 100 + i)), f"{what} {n} bytes")

    vsrc = [pattern(n, 20 + i) for i, n in enumerate(VEC)]
    ok, mrs = ep.regv([ptr(b) for b in vsrc], VEC)
    ok = ok and ep.writev(conn, mrs, [ptr(b) for b in vsrc], VEC, vw_items, len(VEC))
    c.check(ok, f"writev of {len(VEC)} items")
    vdst = [np.zeros(n, dtype=np.uint8) for n in VEC]
    ok, mrs = ep.regv([ptr(b) for b in vdst], VEC)
    ok = ok and ep.readv(conn, mrs, [ptr(b) for b in vdst], VEC, vr_items, len(VEC))
    c.check(ok and all(np.array_equal(vdst[i], pattern(n, 200 + i)) for i, n in enumerate(VEC)),
            f"readv of {len(VEC)} items")

    msg = pattern(4096, 300)
    ok, mr = ep.reg(ptr(msg), msg.nbytes)
    c.check(ok and ep.send(conn, mr, ptr(msg), msg.nbytes), "send 4 KiB")
    c.check(ep.dereg(mr), "dereg")

    pipe.send("written")
    c.check(pipe.recv() == "done", "server finished")
    result.put(("client", c.passed, c.failed))


def refused_server(pipe, err_path):
    # Everything this process writes to stderr (the adapter's abort message) lands in err_path.
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    ep = p2p.Endpoint(SERVER_GPU, 4)
    pipe.send(bytes(ep.get_metadata()))
    ok, _, _, conn = ep.accept()
    buf = np.full(8192, 0xEE, dtype=np.uint8)
    ok, mr = ep.reg(ptr(buf), 4096)
    pipe.send("posting")
    # UCCL's engine never reads the receive's status: the process must not return True here.
    ok = ep.recv(conn, mr, ptr(buf), 8192)
    print(f"recv returned {ok} for a message that does not fit", flush=True)
    os._exit(0)


def refused_client(pipe):
    md = pipe.recv()
    ip, port, remote_gpu = p2p.Endpoint.parse_metadata(md)
    ep = p2p.Endpoint(CLIENT_GPU, 4)
    ok, conn = ep.connect(ip, remote_gpu, remote_port=port)
    msg = pattern(8192, 400)
    ok, mr = ep.reg(ptr(msg), msg.nbytes)
    pipe.recv()
    ep.send(conn, mr, ptr(msg), msg.nbytes)
    os._exit(0)


def refused_message():
    """An 8 KiB message into a receive whose registration holds 4 KiB: the receiving process
    aborts with the reason (UCCL's RDMA transport fails the process on such an error too), where
    the engine would otherwise have returned True with nothing received."""
    checks = Checks("refusal")
    err_path = os.path.join(tempfile.mkdtemp(), "server.err")
    a, b = mp.Pipe()
    server = mp.Process(target=refused_server, args=(a, err_path), name="refused-server")
    client = mp.Process(target=refused_client, args=(b,), name="refused-client")
    server.start()
    client.start()
    server.join(120)
    client.join(120)
    for p in (server, client):
        if p.exitcode is None:
            p.terminate()
            p.join(10)
    err = open(err_path, errors="replace").read()
    checks.check(server.exitcode == -signal.SIGABRT,
                 f"the receiving process aborted (exit code {server.exitcode})")
    checks.check("uccl::RDMAEndpoint: receive transfer" in err and
                 "would land outside memory region" in err,
                 "its last words name the receive and why: " +
                 next((line for line in err.splitlines() if "would land outside" in line), "(none)"))
    checks.check(client.exitcode in (0, -signal.SIGABRT),
                 f"the sender ended (exit code {client.exitcode}: its send failed too)")
    return checks.passed, checks.failed


def main():
    a, b = mp.Pipe()
    result = mp.Queue()
    procs = [mp.Process(target=server, args=(a, result), name="server"),
             mp.Process(target=client, args=(b, result), name="client")]
    procs[0].start()
    time.sleep(0.5)
    procs[1].start()
    passed = failed = 0
    for p in procs:
        p.join(240)
        if p.exitcode is None:
            p.terminate()
            p.join(10)
            print(f"FAIL {p.name} still running after 240 s", flush=True)
            failed += 1
        elif p.exitcode != 0:
            print(f"FAIL {p.name} exited with {p.exitcode}", flush=True)
            failed += 1
    got = {}
    while not result.empty():
        who, np_, nf = result.get()
        got[who] = (np_, nf)
    for who in ("server", "client"):
        if who not in got:
            print(f"FAIL {who} reported nothing", flush=True)
            failed += 1
        else:
            passed += got[who][0]
            failed += got[who][1]
    rp, rf = refused_message()
    passed += rp
    failed += rf
    print(f"smoke: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
