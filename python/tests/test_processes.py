"""Two processes; the GIL released during blocking calls; Ctrl-C (SIGINT) interrupting them."""

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

from conftest import addr, pattern, run_python
from uccl_tcpx import p2p

# How long a child may take to report a SIGINT: only a bound on a hang (a call that ignored the
# signal would block for good). The latency (~100 ms) is printed, not held: a loaded host bends it.
INTERRUPT_WAIT = 60

SERVER = textwrap.dedent(
    """
    import ctypes, mmap, sys
    import numpy as np
    from uccl_tcpx import p2p
    n = int(sys.argv[1])
    ep = p2p.Endpoint(0)
    buf = mmap.mmap(-1, 2 * n)
    view = np.frombuffer(buf, np.uint8)
    view[:n] = (np.arange(n) % 251).astype(np.uint8)
    ok, mr = ep.reg(ctypes.addressof(ctypes.c_char.from_buffer(buf)), 2 * n)
    ok, meta = ep.advertise(mr, ctypes.addressof(ctypes.c_char.from_buffer(buf)), 2 * n)
    print(ep.get_metadata().hex(), meta.hex(), flush=True)
    ok, ip, gpu, conn = ep.accept()
    print("accepted", ok, flush=True)
    sys.stdin.readline()
    expected = ((np.arange(n) * 7) % 253).astype(np.uint8)
    print("second half", "ok" if np.array_equal(view[n:], expected) else "bad", flush=True)
    sys.stdin.readline()
    """
)


def spawn(code, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def line(proc, limit=60):
    ready, _, _ = select.select([proc.stdout], [], [], limit)
    assert ready, "the child said nothing in time"
    return proc.stdout.readline().strip()


def test_two_processes_write_and_read_host_memory():
    n = 3 << 20
    server = spawn(SERVER, n)
    try:
        meta_hex, fifo_hex = line(server).split()
        with p2p.Endpoint(0) as ep:
            ok, conn = ep.add_remote_endpoint(bytes.fromhex(meta_hex))
            assert ok
            assert line(server) == "accepted True"
            fifo = bytes.fromhex(fifo_hex)
            local = np.zeros(2 * n, np.uint8)
            _, mr = ep.reg(addr(local), 2 * n)
            assert ep.read(conn, mr, addr(local), n, fifo)
            assert np.array_equal(local[:n], (np.arange(n) % 251).astype(np.uint8))
            # The second half of the server's buffer: the item re-aimed as UCCL callers do, by
            # rewriting the address field of the advertised blob.
            base = int.from_bytes(fifo[:8], "little")
            second = (base + n).to_bytes(8, "little") + fifo[8:]
            local[n:] = ((np.arange(n) * 7) % 253).astype(np.uint8)
            ok, tid = ep.write_async(conn, mr, addr(local) + n, n, second)
            assert ok
            while not ep.poll_async(tid)[1]:
                time.sleep(0.001)
            server.stdin.write("check\n")
            server.stdin.flush()
            assert line(server) == "second half ok"
        server.stdin.write("done\n")
        server.stdin.flush()
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.wait()


def count_while(blocking_call, unblock):
    """Counts to a million in this thread once `blocking_call` was entered in another, then checks
    that it still blocks and unblocks it; returns the count and what the call returned. The count
    spans many of the interpreter's switch intervals, so the other thread is inside the call for
    most of it: a call that held the GIL there would stop the count until it returned, which it
    does only once unblocked. Counted, not timed: a loaded host slows the count, not its end."""
    result, entered = {}, threading.Event()

    def call():
        entered.set()
        result.update(r=blocking_call())

    t = threading.Thread(target=call)
    t.start()
    assert entered.wait(30)
    count = 0
    while count < 1_000_000:
        count += 1
    assert t.is_alive(), "the call was meant to block"
    unblock()
    t.join(30)
    assert not t.is_alive()
    return count, result["r"]


def test_the_gil_is_released_while_accept_and_recv_block():
    with p2p.Endpoint(0) as server, p2p.Endpoint(0) as client:
        ip, port, _ = p2p.Endpoint.parse_metadata(server.get_metadata())
        conns = {}
        count, accepted = count_while(server.accept, lambda: conns.update(c=client.connect(ip, "", port)))
        assert accepted[0] and conns["c"][0]
        assert count == 1_000_000, f"only {count} iterations while accept blocked: the GIL was held"

        n = 1 << 16
        src, dst = pattern(n, 8), np.zeros(n, np.uint8)
        _, smr = client.reg(addr(src), n)
        _, dmr = server.reg(addr(dst), n)
        count, received = count_while(
            lambda: server.recv(accepted[3], dmr, addr(dst), n),
            lambda: client.send(conns["c"][1], smr, addr(src), n),
        )
        assert received is True and np.array_equal(dst, src)
        assert count == 1_000_000, f"only {count} iterations while recv blocked: the GIL was held"


# Python turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when it started, and a
# shell ignores it for its background jobs (a CI runner's may be one): the children restore it.
RESTORE_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"

INTERRUPTED = RESTORE_SIGINT + textwrap.dedent(
    """
    import socket, sys, time
    import numpy as np
    from uccl_tcpx import p2p
    what = sys.argv[1]
    ep = p2p.Endpoint(0)
    try:
        if what == "accept":
            print("ready", flush=True)
            ep.accept()
        elif what == "connect":
            # A listener that never answers the handshake: connect waits for it.
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            print("ready", flush=True)
            ep.connect("127.0.0.1", "", s.getsockname()[1])
        elif what == "recv":
            peer = p2p.Endpoint(0)
            ip, port, _ = p2p.Endpoint.parse_metadata(peer.get_metadata())
            ok, conn = ep.connect(ip, "", port)
            peer.accept()
            buf = np.zeros(4096, np.uint8)
            ok, mr = ep.reg(buf.ctypes.data, 4096)
            print("ready", flush=True)
            ep.recv(conn, mr, buf.ctypes.data, 4096)
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    """
)


def interrupt(what):
    child = spawn(INTERRUPTED, what)
    try:
        assert line(child) == "ready"
        time.sleep(0.3)
        sent = time.monotonic()
        os.kill(child.pid, signal.SIGINT)
        word, at = line(child, INTERRUPT_WAIT).split()
        assert word == "interrupted"
        latency = float(at) - sent
        print(f"{what}: interrupted {latency * 1e3:.1f} ms after SIGINT")
        assert child.wait(30) == 0
    finally:
        child.kill()
        child.wait()


def test_ctrl_c_interrupts_accept():
    interrupt("accept")


def test_ctrl_c_interrupts_connect():
    interrupt("connect")


def test_ctrl_c_interrupts_a_synchronous_transfer():
    interrupt("recv")


STALLED_WRITE = RESTORE_SIGINT + textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from uccl_tcpx import p2p
    meta_hex, fifo_hex = sys.stdin.readline().split()
    ep = p2p.Endpoint(0)
    ok, conn = ep.add_remote_endpoint(bytes.fromhex(meta_hex))
    n = 48 << 20
    buf = np.ones(2 * n, np.uint8)
    ok, mr = ep.reg(buf.ctypes.data, 2 * n)
    fifo = bytes.fromhex(fifo_hex)
    assert ep.write(conn, mr, buf.ctypes.data, 4096, fifo)
    print("ready", flush=True)
    sys.stdin.readline()  # the peer is stopped now
    try:
        ep.write(conn, mr, buf.ctypes.data, n, fifo)
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
    """
)


def stop(proc):
    """SIGSTOP, then waits until every thread of `proc` shows stopped: kill() only queues the signal,
    and the peer's engine threads answer until its main thread has taken it."""
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + INTERRUPT_WAIT
    while True:
        states = []
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
        if all(s in ("T", "t") for s in states):
            return
        assert time.monotonic() < deadline, f"process {proc.pid} not stopped after SIGSTOP: {states}"
        time.sleep(0.001)


def test_ctrl_c_interrupts_a_write_to_a_stopped_peer():
    # The network path, which needs the peer's side: on the same-host path the data would be
    # copied without the stopped process.
    env = dict(os.environ, UCCL_TCPX_DISABLE_IPC="1")
    server = spawn(SERVER, 48 << 20, env=env)
    client = None
    try:
        meta_hex, fifo_hex = line(server).split()
        client = spawn(STALLED_WRITE, env=env)
        client.stdin.write(f"{meta_hex} {fifo_hex}\n")
        client.stdin.flush()
        assert line(server) == "accepted True"
        assert line(client) == "ready"
        stop(server)
        client.stdin.write("go\n")
        client.stdin.flush()
        time.sleep(0.5)
        sent = time.monotonic()
        os.kill(client.pid, signal.SIGINT)
        reply = line(client, INTERRUPT_WAIT).split()
        assert reply[0] == "interrupted", f"the write ended before the signal: {reply}"
        latency = float(reply[1]) - sent
        print(f"stalled write: interrupted {latency * 1e3:.1f} ms after SIGINT")
    finally:
        os.kill(server.pid, signal.SIGCONT)
        for proc in (server, client):
            if proc is not None:
                proc.kill()
                proc.wait()


LOCAL_PEER = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    from uccl_tcpx import p2p
    ep = p2p.Endpoint(0)
    buf = np.zeros(4096, np.uint8)
    print("ready", flush=True)
    ok, bdf, conn = ep.accept_local()
    ok, info = ep.advertise_ipc(conn, buf.ctypes.data, 4096)
    print(ok, bdf == "", conn, info.hex(), flush=True)
    sys.stdin.readline()
    print("got", int(buf.sum()), flush=True)
    """
)


def test_connect_local_between_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("UCCL_TCPX_RENDEZVOUS_DIR", str(tmp_path))
    peer = spawn(LOCAL_PEER)
    try:
        assert line(peer) == "ready"
        with p2p.Endpoint(0) as ep:
            # Both endpoints serve this host's GPU 0 (or no GPU): the peer announced under the
            # same name as this one.
            ok, conn = ep.connect_local(ep.parse_metadata(ep.get_metadata())[2])
            assert ok
            ok, empty_bdf, served, info = line(peer).split()
            assert (ok, empty_bdf, served) == ("True", "True", "0")
            src = np.full(4096, 3, np.uint8)
            assert ep.write_ipc(conn, addr(src), 4096, bytes.fromhex(info))
            peer.stdin.write("check\n")
            peer.stdin.flush()
            assert line(peer) == f"got {3 * 4096}"
        assert peer.wait(30) == 0
    finally:
        peer.kill()
        peer.wait()


def test_an_interpreter_exits_cleanly_with_endpoints_left_open(tmp_path):
    # A passive-accept thread keeps its endpoint alive; the exit closes both endpoints anyway, so
    # the process ends with status 0 and leaves no rendezvous entry behind.
    code = textwrap.dedent(
        """
        from uccl_tcpx import p2p
        ep = p2p.Endpoint(0)
        ep.start_passive_accept()
        other = p2p.Endpoint(0)
        print("up", flush=True)
        """
    )
    for _ in range(3):
        result = run_python(code, {"UCCL_TCPX_RENDEZVOUS_DIR": str(tmp_path)}, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "up", result.stderr
    assert list(tmp_path.rglob("*.meta")) == []
