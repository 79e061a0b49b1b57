"""Bad input of each kind raises a Python exception that says what was wrong; nothing aborts,
hangs or crashes, and the endpoint stays usable afterwards."""

import threading

import numpy as np
import pytest

from conftest import addr, pattern
from uccl_tcpx import _engine, p2p


@pytest.fixture
def ready(pair):
    """The pair with a registered source and an advertised target."""
    n = 4096
    pair.src, pair.dst = pattern(n, 1), np.zeros(n, np.uint8)
    _, pair.smr = pair.client.reg(addr(pair.src), n)
    _, pair.dmr = pair.server.reg(addr(pair.dst), n)
    _, pair.meta = pair.server.advertise(pair.dmr, addr(pair.dst), n)
    pair.n = n
    return pair


def still_works(p):
    p.dst[:] = 0
    assert p.client.write(p.conn, p.smr, addr(p.src), p.n, p.meta)
    assert np.array_equal(p.dst, p.src)


@pytest.mark.parametrize("length", [0, 63, 65, 104])
def test_meta_of_the_wrong_length(ready, length):
    p = ready
    calls = [
        lambda m: p.client.write(p.conn, p.smr, addr(p.src), p.n, m),
        lambda m: p.client.read(p.conn, p.smr, addr(p.src), p.n, m),
        lambda m: p.client.write_async(p.conn, p.smr, addr(p.src), p.n, m),
        lambda m: p.client.read_async(p.conn, p.smr, addr(p.src), p.n, m),
        lambda m: p.client.writev(p.conn, [p.smr], [addr(p.src)], [p.n], [m], 1),
        lambda m: p.client.readv_async(p.conn, [p.smr], [addr(p.src)], [p.n], [m], 1),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"meta must be exactly 64 bytes \(serialized FifoItem\)"):
            call(b"\0" * length)
    still_works(p)


def test_a_forged_or_foreign_capability_is_refused(ready):
    p = ready
    forged = bytearray(p.meta)
    forged[40] ^= 0xFF  # the token
    assert p.client.write(p.conn, p.smr, addr(p.src), p.n, bytes(forged)) is False
    assert not p.dst.any()
    assert p.client.write(p.conn, p.smr, addr(p.src), p.n, b"\0" * 64) is False
    still_works(p)


def test_unknown_and_finished_transfer_ids(ready):
    p = ready
    with pytest.raises(RuntimeError, match="Unknown transfer_id 987654321"):
        p.client.poll_async(987654321)
    ok, tid = p.client.write_async(p.conn, p.smr, addr(p.src), p.n, p.meta)
    assert ok
    while not p.client.poll_async(tid)[1]:
        pass
    with pytest.raises(RuntimeError, match="already reported done"):
        p.client.poll_async(tid)
    with pytest.raises(RuntimeError, match="Unknown transfer_id"):
        p.server.poll_async(tid), "an id of another endpoint"


def test_unknown_ids_and_arguments_of_the_wrong_kind(ready):
    p = ready
    with pytest.raises(RuntimeError, match="Invalid conn_id 99"):
        p.client.write(99, p.smr, addr(p.src), p.n, p.meta)
    with pytest.raises(RuntimeError, match="Invalid mr_id 1234"):
        p.client.write(p.conn, 1234, addr(p.src), p.n, p.meta)
    with pytest.raises(RuntimeError, match="Invalid mr_id"):
        p.server.advertise(1234, addr(p.dst), p.n)
    with pytest.raises(TypeError, match="ptr must be an int"):
        p.client.write(p.conn, p.smr, "0x1000", p.n, p.meta)
    with pytest.raises(ValueError, match="size must be in"):
        p.client.write(p.conn, p.smr, addr(p.src), -1, p.meta)
    with pytest.raises(TypeError, match="meta must be bytes"):
        p.client.write(p.conn, p.smr, addr(p.src), p.n, "x" * 64)
    with pytest.raises(RuntimeError, match="must have length num_iovs"):
        p.client.writev(p.conn, [p.smr], [addr(p.src)], [p.n], [p.meta], 2)
    with pytest.raises(RuntimeError, match="ptrs and sizes must match"):
        p.client.regv([1, 2], [3])
    with pytest.raises(TypeError):
        p.server.advertise(p.dmr, addr(p.dst))
    with pytest.raises(ValueError):
        p.client.reg(addr(p.src), p.n, floatType=17)
    assert p.client.remove_remote_endpoint(42) is False
    assert p.client.dereg(77) is False
    still_works(p)


def test_transfer_checks_in_uccls_words(ready):
    p = ready
    (local,) = p.client.register_memory([p.src])
    (remote,) = p.server.register_memory([p.dst])
    with pytest.raises(RuntimeError, match="Local and remote descriptors must have the same size"):
        p.client.transfer(p.conn, "write", [local, local], [remote])
    with pytest.raises(RuntimeError, match="Invalid op_name: WRITE"):
        p.client.transfer(p.conn, "WRITE", [local], [remote])
    with pytest.raises(RuntimeError, match="Invalid conn_id"):
        p.client.transfer(55, "write", [local], [remote])
    unregistered = p2p.XferDesc()
    unregistered.addr, unregistered.size, unregistered.mr_id = addr(p.src), p.n, 2**64 - 1
    with pytest.raises(RuntimeError, match="RDMA transfer requires RDMA-registered local and remote descriptors"):
        p.client.transfer(p.conn, "write", [unregistered], [remote])
    keyless = p2p.XferDesc()
    keyless.addr, keyless.size = remote.addr, remote.size
    with pytest.raises(RuntimeError, match="RDMA transfer requires RDMA-registered"):
        p.client.transfer(p.conn, "write", [local], [keyless])
    with pytest.raises(RuntimeError, match="Object at index 1 is not a tensor"):
        p.client.register_memory([p.src, object()])


def test_a_larger_local_than_remote_descriptor_fails_the_transfer(ready):
    # Deliberately unlike UCCL, which would post it: the peer grants only what it advertised.
    p = ready
    big = pattern(2 * p.n, 3)
    (local,) = p.client.register_memory([big])
    (remote,) = p.server.register_memory([p.dst])
    ok, tid = p.client.transfer(p.conn, "write", [local], [remote])
    if ok:
        while True:
            ok, done = p.client.poll_async(tid)
            if done:
                break
    assert not ok
    assert not p.dst.any()


def test_memory_the_engine_cannot_register():
    with p2p.Endpoint(0) as ep:
        for ptr, size in ((0, 4096), (addr(np.zeros(8, np.uint8)), 0)):
            with pytest.raises(RuntimeError, match="uccl_engine_reg") as raised:
                ep.reg(ptr, size)
            assert isinstance(raised.value, _engine.EngineError) and raised.value.status < 0
        # register_memory marks what it could not register, as UCCL's cache does.
        empty = np.zeros(0, np.uint8)
        (desc,) = ep.register_memory([empty])
        assert desc.mr_id == 2**64 - 1 and desc.rkeys == []


def test_a_gpu_index_beyond_the_visible_devices():
    if _engine.gpu_count() == 0:
        # Host only: the index is recorded, as documented, and host memory works.
        with p2p.Endpoint(7) as ep:
            assert ep.local_gpu_idx == 7
        return
    with pytest.raises(RuntimeError, match="out of range"):
        p2p.Endpoint(_engine.gpu_count())


def test_negative_or_odd_constructor_arguments():
    with pytest.raises(ValueError):
        p2p.Endpoint(-1)
    with pytest.raises(TypeError):
        p2p.Endpoint("0")


def test_a_closed_endpoint_raises_everywhere(ready):
    p = ready
    ok, tid = p.client.write_async(p.conn, p.smr, addr(p.src), p.n, p.meta)
    p.client.close()
    p.client.close()  # idempotent
    calls = [
        lambda: p.client.get_metadata(),
        lambda: p.client.connect("127.0.0.1", "", 1),
        lambda: p.client.accept(),
        lambda: p.client.reg(addr(p.src), p.n),
        lambda: p.client.write(p.conn, p.smr, addr(p.src), p.n, p.meta),
        lambda: p.client.write_async(p.conn, p.smr, addr(p.src), p.n, p.meta),
        lambda: p.client.poll_async(tid),
        lambda: p.client.advertise(p.smr, addr(p.src), p.n),
        lambda: p.client.register_memory([p.src]),
        lambda: p.client.transfer(p.conn, "write", [], []),
        lambda: p.client.add_remote_endpoint(p.server.get_metadata()),
        lambda: p.client.start_passive_accept(),
        lambda: p.client.send(p.conn, p.smr, addr(p.src), p.n),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="Endpoint is closed"):
            call()


def test_a_peer_that_closed_fails_transfers_without_hanging(ready):
    p = ready
    p.server.close()
    ok = p.client.write(p.conn, p.smr, addr(p.src), p.n, p.meta)
    assert ok is False


def test_connect_failures_return_false():
    with p2p.Endpoint(0) as ep:
        assert ep.connect("127.0.0.1", "", -1) == (False, 0)
        assert ep.connect("127.0.0.1", "", 70000) == (False, 0)
        # Nothing listens on port 1 of loopback: refused, reported, not raised.
        assert ep.connect("127.0.0.1", "", 1) == (False, 0)
        assert ep.connect("no.such.host.invalid", "", 5000) == (False, 0)
        with pytest.raises(ValueError, match="NUL"):
            ep.connect("127.0.0.1\0", "", 5000)


def test_a_local_buffer_outside_its_registration_is_refused(ready):
    p = ready
    other = pattern(p.n, 9)
    # The mr_id names the registered source; the pointer is somewhere else.
    assert p.client.write(p.conn, p.smr, addr(other), p.n, p.meta) is False
    assert p.client.write(p.conn, p.smr, addr(p.src) + 1, p.n, p.meta) is False, "one byte past its end"
    assert p.client.write_async(p.conn, p.smr, addr(other), p.n, p.meta) == (False, 0)
    assert not p.dst.any()
    with pytest.raises(RuntimeError, match="not mapped"):
        p.client.reg(0x10000, 4096)
    still_works(p)


def test_register_memory_refuses_strided_and_read_only_arrays():
    with p2p.Endpoint(0) as ep:
        a = pattern(1 << 16, 4)
        refused = [
            (a[::-1], "not C-contiguous"),
            (a[::2], "not C-contiguous"),
            (a.reshape(256, 256)[:, :128], "not C-contiguous"),
            (a.reshape(256, 256).T, "not C-contiguous"),
            (np.frombuffer(bytes(4096), np.uint8), "read-only"),
        ]
        ro = np.zeros(4096, np.uint8)
        ro.flags.writeable = False
        refused.append((ro, "read-only"))
        for bad, why in refused:
            with pytest.raises(ValueError, match=f"Array at index 1 is {why}"):
                ep.register_memory([a, bad])
        # Nothing of a refused call stays registered: the same buffer registers anew afterwards.
        assert ep._regions == []
        # Contiguous views, of any shape, still register, with exactly their own bytes.
        grid = a.reshape(256, 256)
        views = [a, a[100:200], grid[3:5], grid[7:8, :], a.view(np.uint32)[10:20], np.zeros((4, 1, 8), np.float64)]
        descs = ep.register_memory(views)
        assert [(d.addr, d.size) for d in descs] == [(v.ctypes.data, v.nbytes) for v in views]
        assert all(d.mr_id != 2**64 - 1 for d in descs)
        ep.deregister_memory(descs)


def test_register_memory_refuses_a_tensor_that_is_not_contiguous():
    class Tensor:
        """What register_memory reads of a torch tensor."""

        def __init__(self, array, contiguous):
            self.array, self.contiguous = array, contiguous

        def data_ptr(self):
            return self.array.ctypes.data

        def numel(self):
            return self.array.size

        def element_size(self):
            return self.array.itemsize

        def is_contiguous(self):
            return self.contiguous

    buf = np.zeros(4096, np.uint8)
    with p2p.Endpoint(0) as ep:
        with pytest.raises(ValueError, match="Tensor at index 0 is not contiguous"):
            ep.register_memory([Tensor(buf, False)])
        (desc,) = ep.register_memory([Tensor(buf, True)])
        assert (desc.addr, desc.size) == (buf.ctypes.data, 4096) and len(desc.rkeys) == 8


def test_a_timeout_beyond_the_clock_means_no_limit(ready):
    p = ready
    huge = 2**64 - 1
    eid = _engine.post(p.client._conns[p.conn], True, p.client._engine_mr(p.smr), addr(p.src), p.n, p.meta)
    rc, moved, error = _engine.wait(p.client._conns[p.conn], eid, huge)
    assert (rc, moved, error) == (0, p.n, None)
    assert np.array_equal(p.dst, p.src)
    with p2p.Endpoint(0) as server, p2p.Endpoint(0) as client:
        ip, port, _ = p2p.Endpoint.parse_metadata(server.get_metadata())
        got = {}
        t = threading.Thread(target=lambda: got.update(r=_engine.accept(server._engine, huge)))
        t.start()
        assert client.connect(ip, "", port)[0]
        t.join(30)
        assert not t.is_alive() and got["r"] is not None and got["r"][1] == ip
        _engine.conn_destroy(got["r"][0])
    with pytest.raises(OverflowError):
        _engine.wait(p.client._conns[p.conn], eid, 2**64)


def test_a_register_memory_that_raises_partway_keeps_nothing(monkeypatch):
    with p2p.Endpoint(0) as ep:
        pool = np.zeros(1 << 16, np.uint8)
        (held,) = ep.register_memory([pool])
        fresh, shared, bad = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
        live, real_reg, real_dereg = set(), _engine.reg, _engine.dereg

        def reg(engine, ptr, size):
            if ptr == bad.ctypes.data:
                e = _engine.EngineError("uccl_engine_reg: memory of a GPU this endpoint does not serve")
                e.status = -9
                raise e
            mr = real_reg(engine, ptr, size)
            live.add(mr)
            return mr

        def dereg(engine, mr):
            live.discard(mr)
            real_dereg(engine, mr)

        monkeypatch.setattr(_engine, "reg", reg)
        monkeypatch.setattr(_engine, "dereg", dereg)
        with pytest.raises(RuntimeError, match="does not serve"):
            # A hit in the held region, a miss registered anew, a region shared by two entries,
            # then the failure, then another hit.
            ep.register_memory([pool[:4096], fresh, shared, shared, bad, pool[4096:8192]])
        assert live == set(), "the registrations the call made are undone"
        assert len(ep._regions) == 1 and ep._regions[0].refs == 1, "the held region's count is restored"
        ep.deregister_memory([held])
        assert ep._regions == []
        descs = ep.register_memory([fresh, shared])
        assert len(live) == 2 and all(len(d.rkeys) == 8 for d in descs)
        ep.deregister_memory(descs)
        assert live == set() and ep._regions == []


def test_a_region_advertises_at_most_4096_distinct_ranges():
    with p2p.Endpoint(0) as ep:
        buf = np.zeros(8192, np.uint8)
        _, mr = ep.reg(addr(buf), buf.size)
        for i in range(4096):
            ok, blob = ep.advertise(mr, addr(buf) + i, 1)
            assert ok and len(blob) == 64
        assert ep.advertise(mr, addr(buf) + 17, 1)[0], "a range advertised before costs nothing"
        assert ep.advertise(mr, addr(buf) + 4096, 1) == (False, b"")
        assert ep.advertise(mr, addr(buf), buf.size) == (False, b""), "the whole region is a range too"
