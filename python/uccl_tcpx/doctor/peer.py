"""--serve and --peer: two engines connect as any user's would and move 64 MiB each way; the
bytes are checked and the rate, the path taken and the links used are reported."""

import ctypes
import os
import random
import struct
import time

from .report import FAIL, OK

SIZE = 64 << 20
CTRL = 64
DEFAULT_PORT = 18515


class Side:
    """An endpoint with a data buffer and a small control buffer, both registered."""

    def __init__(self, gpu):
        from uccl_tcpx import p2p

        self.ep = p2p.Endpoint(gpu)
        self.data = ctypes.create_string_buffer(SIZE)
        self.ctrl = ctypes.create_string_buffer(CTRL)
        self.data_mr = self._reg(self.data, SIZE)
        self.ctrl_mr = self._reg(self.ctrl, CTRL)

    def _reg(self, buf, size):
        ok, mr = self.ep.reg(ctypes.addressof(buf), size)
        if not ok:
            raise RuntimeError("registering the buffer failed")
        return mr

    def fill(self, payload):
        ctypes.memmove(self.data, payload, SIZE)

    def send_data(self, conn):
        if not self.ep.send(conn, self.data_mr, ctypes.addressof(self.data), SIZE):
            raise RuntimeError("sending 64 MiB failed")

    def recv_data(self, conn):
        if not self.ep.recv(conn, self.data_mr, ctypes.addressof(self.data), SIZE):
            raise RuntimeError("receiving 64 MiB failed")
        return ctypes.string_at(self.data, SIZE)

    def send_ctrl(self, conn, verdict, seconds=0.0):
        ctypes.memmove(self.ctrl, struct.pack("<?d", verdict, seconds).ljust(CTRL, b"\0"), CTRL)
        if not self.ep.send(conn, self.ctrl_mr, ctypes.addressof(self.ctrl), CTRL):
            raise RuntimeError("sending the verdict failed")

    def recv_ctrl(self, conn):
        if not self.ep.recv(conn, self.ctrl_mr, ctypes.addressof(self.ctrl), CTRL):
            raise RuntimeError("receiving the verdict failed")
        return struct.unpack_from("<?d", ctypes.string_at(self.ctrl, CTRL))

    def path(self, conn):
        """(path, links): same-host, sockets over their local addresses, or the net plugin."""
        from uccl_tcpx import _engine

        if _engine.conn_is_local(self.ep._conn(conn)):
            return "same-host", []
        links = [ln["link"] for ln in self.ep.conn_link_stats(conn) if ln["out"]["bytes"] or ln["in"]["bytes"]]
        # The plugin keeps no per-socket counts: its NICs are the ones tcpx/pairing gives the GPU.
        return ("sockets", links) if links else ("tcpx (net plugin; NICs: those tcpx/pairing gives the GPU)", [])


def pattern(seed):
    return random.Random(seed).randbytes(SIZE)


def timed_send(side, conn, payload):
    """Sends payload and waits for the receiver's verdict: (bytes matched, seconds)."""
    side.fill(payload)
    start = time.monotonic()
    side.send_data(conn)
    matched, _ = side.recv_ctrl(conn)
    return matched, time.monotonic() - start


def serve(port, gpu, out):
    """Waits for one --peer, then answers its exchange."""
    os.environ["UCCL_TCPX_PORT"] = str(port)
    side = Side(gpu)
    # Made before the exchange, so that the peer's timings do not include them.
    expected, payload = pattern(1), pattern(2)
    from uccl_tcpx import _engine

    print(
        f"uccl-tcpx-doctor: serving at {_engine.metadata(side.ep._engine)}; on the other host: "
        f"uccl-tcpx-doctor --peer THIS_HOST:{port}",
        file=out,
        flush=True,
    )
    _, ip, _, conn = side.ep.accept()
    got = side.recv_data(conn)
    side.send_ctrl(conn, got == expected)
    matched, seconds = timed_send(side, conn, payload)
    side.send_ctrl(conn, matched, seconds)
    path, links = side.path(conn)
    print(
        f"uccl-tcpx-doctor: served {ip}: path {path}{' over ' + ', '.join(links) if links else ''}",
        file=out,
        flush=True,
    )
    side.ep.close()


def peer(report, target, gpu):
    host, _, port = target.rpartition(":") if ":" in target and not target.endswith("]") else (target, "", "")
    host = host.strip("[]") or target
    port = int(port) if port else DEFAULT_PORT
    payload, expected = pattern(1), pattern(2)
    try:
        side = Side(gpu)
        ok, conn = side.ep.connect(host, remote_port=port)
        if not ok:
            raise RuntimeError(f"connect to {host}:{port} failed")
        out_ok, out_s = timed_send(side, conn, payload)
        in_ok = side.recv_data(conn) == expected
        side.send_ctrl(conn, in_ok)
        _, in_s = side.recv_ctrl(conn)
        path, links = side.path(conn)
        side.ep.close()
    except Exception as e:
        fix = (
            f"run `uccl-tcpx-doctor --serve --port {port}` there first; open TCP port {port} and the engine's "
            "data ports between the hosts; send both sides' --json and UCCL_TCPX_LOG=info output"
        )
        report.add("peer", "exchange", FAIL, f"with {host}:{port}: {e}", fix)
        return
    rate = lambda s: SIZE / s / 1e9 if s > 0 else 0.0
    detail = f"64 MiB out {rate(out_s):.2f} GB/s, in {rate(in_s):.2f} GB/s (each with one round trip); path {path}" + (
        f" over {', '.join(links)}" if links else ""
    )
    if out_ok and in_ok:
        report.add("peer", "exchange", OK, detail, path=path, links=links, out_gbps=rate(out_s), in_gbps=rate(in_s))
    else:
        bad = ", ".join(w for w, good in (("out", out_ok), ("in", in_ok)) if not good)
        report.add(
            "peer",
            "exchange",
            FAIL,
            f"bytes differ ({bad}); {detail}",
            "send both sides' --json and UCCL_TCPX_LOG=debug output",
            path=path,
        )
