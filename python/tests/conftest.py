import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from uccl_tcpx import p2p

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def own_rendezvous_folder(tmp_path_factory, monkeypatch):
    """Each test's endpoints announce themselves in a folder of that test's own: in the shared
    /dev/shm one, connect_local could find a live endpoint of another process on this host."""
    monkeypatch.setenv("UCCL_TCPX_RENDEZVOUS_DIR", str(tmp_path_factory.mktemp("rendezvous")))


def addr(buf):
    """The address of a numpy array, bytearray or mmap (writable buffers)."""
    if isinstance(buf, np.ndarray):
        return buf.ctypes.data
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def pattern(n, seed):
    return ((np.arange(n, dtype=np.uint64) * 2654435761 + seed) % 251).astype(np.uint8)


class Pair:
    """Two endpoints of this process, connected: `client` dialled `server`."""

    def __init__(self):
        self.server = p2p.Endpoint(0)
        self.client = p2p.Endpoint(0)
        ip, port, _ = p2p.Endpoint.parse_metadata(self.server.get_metadata())
        accepted = {}
        t = threading.Thread(target=lambda: accepted.update(r=self.server.accept()))
        t.start()
        ok, self.conn = self.client.connect(ip, "", port)
        t.join(30)
        assert ok and not t.is_alive()
        ok, self.peer_ip, self.peer_gpu, self.served = accepted["r"]
        assert ok

    def close(self):
        self.client.close()
        self.server.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def run_python(code, env=None, timeout=60, **kwargs):
    """Runs `code` in a fresh interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
