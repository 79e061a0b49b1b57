"""The extension's one-call paths (buffer ranges, descriptor byte formats, transfer() and the
one-item posts) give what the general Python paths give, and hand everything else to them."""

import random
import struct

import numpy as np
import pytest

from conftest import addr, pattern
from uccl_tcpx import _engine, p2p


def slow_range(obj, i=0):
    return p2p._tensor_range(obj, i)


def arrays():
    base = np.zeros(4096, np.uint8)
    return [
        base,
        base[128:1152],
        base.view(np.float32),
        np.zeros((16, 8), np.int64),
        np.zeros((3, 1, 5), np.complex128),
        np.zeros((4, 4), np.float64, order="F")[:, :1],  # one column of an F-order array: contiguous
        np.zeros((2, 3, 4), np.uint16)[1],
        np.zeros((0, 5), np.int32),
        np.zeros((), np.float16),
        np.zeros(7, np.bool_),
        np.zeros(10, np.int8)[3:4],
    ]


@pytest.mark.parametrize("i", range(len(arrays())))
def test_array_ranges_match_the_array_interface(i):
    a = arrays()[i]
    (fast,) = _engine.array_ranges(np.ndarray, [a])
    assert fast is not None, "a plain writable contiguous array takes the one-call path"
    assert fast == slow_range(a)
    assert fast == (a.__array_interface__["data"][0], a.nbytes)


def test_array_ranges_leave_everything_else_to_the_slow_path():
    class Sub(np.ndarray):
        pass

    ro = np.zeros(8, np.uint8)
    ro.flags.writeable = False
    others = [
        np.zeros(8, np.uint8)[::2],  # strided
        np.zeros(8, np.uint8)[::-1],  # reversed
        np.zeros((4, 4), np.float32).T,  # transposed
        ro,  # read-only
        np.zeros(2, "U4"),  # typestr digits are not the item size
        np.zeros(2, object),
        np.zeros(4, np.uint8).view(Sub),  # a subclass
        bytearray(8),
        b"abc",
        memoryview(bytearray(8)),
        7,
        None,
    ]
    assert _engine.array_ranges(np.ndarray, others) == [None] * len(others)
    # Without numpy's type nothing is taken.
    assert _engine.array_ranges(None, [np.zeros(4, np.uint8)]) == [None]


def test_register_memory_messages_and_order_are_the_slow_paths():
    with p2p.Endpoint(0) as ep:
        good = np.zeros(64, np.uint8)
        with pytest.raises(ValueError, match=r"Array at index 1 is not C-contiguous \(strides \(2,\)\)"):
            ep.register_memory([good, np.zeros(8, np.uint8)[::2], bytearray(8)])
        with pytest.raises(RuntimeError, match="Object at index 2 is not a tensor"):
            ep.register_memory([good, good[:8], bytearray(8)])
        ro = np.zeros(8, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="Array at index 0 is read-only"):
            ep.register_memory([ro])
        assert not ep._regions, "a call that raised keeps nothing"
        # A generator and a tuple are taken as a list is; a unicode array is sized as before.
        descs = ep.register_memory(x for x in (good, good[8:16]))
        assert [(d.addr, d.size) for d in descs] == [(addr(good), 64), (addr(good) + 8, 8)]
        u = np.zeros(2, "U4")
        (d,) = ep.register_memory((u,))
        assert (d.addr, d.size) == slow_range(u)
        ep.deregister_memory(descs + [d])


def random_desc(rng, keys=8, ipc=b""):
    d = p2p.XferDesc()
    d.addr, d.size = rng.randrange(2**64), rng.randrange(2**64)
    d.lkeys = [rng.randrange(2**32) for _ in range(keys)]
    d.rkeys = [rng.randrange(2**32) for _ in range(keys)]
    d._ipc_info = ipc
    return d


def serialized(descs):
    with p2p.Endpoint(0) as ep:
        return ep.get_serialized_descs(descs)


def fields(descs):
    return [(d.addr, d.size, d.mr_id, d.lkeys, d.rkeys, d._ipc_info) for d in descs]


def test_descriptor_formats_match_the_general_path():
    rng = random.Random(7)
    ours = [random_desc(rng) for _ in range(50)]
    blob = serialized(ours)
    assert _engine.serialize_descs(ours) == blob == p2p.Endpoint._serialize(ours)
    assert len(blob) == 8 + 50 * 96 and struct.unpack_from("<Q", blob)[0] == 50
    fast = _engine.deserialize_descs(blob, object.__new__, p2p.XferDesc)
    assert fast is not None and all(type(d) is p2p.XferDesc for d in fast)
    assert fields(fast) == fields(p2p.Endpoint._deserialize(blob)) == fields(p2p.Endpoint.deserialize_descs(blob))
    assert [d.mr_id for d in fast] == [0] * 50 and fields(fast)[0][:2] == (ours[0].addr, ours[0].size)
    # Trailing bytes are ignored by both; an empty list is 8 zero bytes.
    assert fields(p2p.Endpoint.deserialize_descs(blob + b"xyz")) == fields(fast)
    assert _engine.serialize_descs([]) == bytes(8) and p2p.Endpoint.deserialize_descs(bytes(8)) == []


def test_other_descriptors_take_the_general_path():
    rng = random.Random(8)
    mixed = [random_desc(rng), random_desc(rng, keys=2), random_desc(rng, ipc=b"\x01\x02")]
    assert _engine.serialize_descs(mixed) is None
    blob = serialized(mixed)
    assert blob == p2p.Endpoint._serialize(mixed)
    assert _engine.deserialize_descs(blob, object.__new__, p2p.XferDesc) is None
    back = p2p.Endpoint.deserialize_descs(blob)
    assert [(d.addr, d.size, d.lkeys, d.rkeys, d._ipc_info) for d in back] == [
        (d.addr, d.size, d.lkeys, d.rkeys, d._ipc_info) for d in mixed
    ]
    # Keys that are not plain ints in range, or a tuple of keys, are the general path's to judge.
    odd = random_desc(rng)
    odd.lkeys = tuple(odd.lkeys)
    assert _engine.serialize_descs([odd]) is None
    assert serialized([odd]) == p2p.Endpoint._serialize([odd])
    big = random_desc(rng)
    big.rkeys[3] = 2**32
    assert _engine.serialize_descs([big]) is None
    with pytest.raises(struct.error):
        serialized([big])
    # A count larger than the blob holds is refused, whichever path reads it.
    one = serialized([random_desc(rng)])
    for bad in (struct.pack("<Q", 2) + one[8:], one[:50], one[:7]):
        assert _engine.deserialize_descs(bad, object.__new__, p2p.XferDesc) is None
        with pytest.raises(RuntimeError, match="Invalid serialized XferDesc data"):
            p2p.Endpoint.deserialize_descs(bad)


def test_transfer_of_tuples_and_plain_lists_moves_the_same_bytes(pair):
    n = 8
    src = [pattern(1024, i) for i in range(n)]
    dst_pool = np.zeros(n * 1024, np.uint8)
    remote = pair.client.deserialize_descs(
        pair.server.get_serialized_descs(pair.server.register_memory([dst_pool[i * 1024 : (i + 1) * 1024] for i in range(n)]))
    )
    local = pair.client.register_memory(src)
    for descs in (tuple(local), local):
        dst_pool[:] = 0
        ok, tid = pair.client.transfer(pair.conn, "write", descs, remote)
        assert ok
        while not pair.client.poll_async(tid)[1]:
            pass
        assert np.array_equal(dst_pool, np.concatenate(src))
    # A remote descriptor without keys in a plain list still gets the general path's message.
    keyless = p2p.XferDesc()
    with pytest.raises(RuntimeError, match="RDMA transfer requires RDMA-registered"):
        pair.client.transfer(pair.conn, "write", local[:1], [keyless])


def test_one_item_posts_of_other_argument_kinds(pair):
    n = 8192
    src, dst = pattern(n, 3), np.zeros(n, np.uint8)
    _, src_mr = pair.client.reg(addr(src), n)
    _, dst_mr = pair.server.reg(addr(dst), n)
    ok, meta = pair.server.advertise(dst_mr, addr(dst), n)
    assert ok
    # numpy ints, a bytearray and a memoryview of the item: the general path, same outcome.
    for kind, (mr, ptr, size, m) in {
        "plain": (src_mr, addr(src), n, meta),
        "numpy ints": (np.uint64(src_mr), np.int64(addr(src)), np.uint32(n), bytearray(meta)),
        "memoryview": (src_mr, addr(src), n, memoryview(meta)),
    }.items():
        dst[:] = 0
        ok, tid = pair.client.write_async(pair.conn, mr, ptr, size, m)
        assert ok, kind
        while not pair.client.poll_async(tid)[1]:
            pass
        assert np.array_equal(dst, src), kind
        dst[:] = 0
        assert pair.client.write(pair.conn, mr, ptr, size, m), kind
        assert np.array_equal(dst, src), kind
    # A smaller write is sent with its own size: the rest of the range is untouched.
    dst[:] = 0
    assert pair.client.write(pair.conn, src_mr, addr(src), 100, meta)
    assert np.array_equal(dst[:100], src[:100]) and not dst[100:].any()
    with pytest.raises(RuntimeError, match="exceeds a FifoItem's 32-bit size field"):
        pair.client.write_async(pair.conn, src_mr, addr(src), 2**32, meta)
    with pytest.raises(RuntimeError, match=r"meta must be exactly 64 bytes \(serialized FifoItem\)"):
        pair.client.read_async(pair.conn, src_mr, addr(src), n, meta[:63])
    with pytest.raises(RuntimeError, match="Invalid conn_id"):
        pair.client.write_async(99, src_mr, addr(src), n, meta)
    with pytest.raises(RuntimeError, match="Invalid mr_id"):
        pair.client.read(pair.conn, 12345, addr(src), n, meta)
    with pytest.raises(ValueError, match="ptr must be in 0..2"):
        pair.client.write_async(pair.conn, src_mr, -1, n, meta)


def test_vector_posts_of_plain_and_other_argument_kinds_move_the_same_blocks(pair, monkeypatch):
    # A random block table of 2,000 blocks of 67 bytes each way; plain lists take the extension's
    # one pass (the general path's postv is not called), other kinds the general path.
    n, block = 2000, 67
    rng = random.Random(5)
    src, dst = pattern(n * block, 9), np.zeros(n * block, np.uint8)
    _, src_mr = pair.client.reg(addr(src), src.nbytes)
    _, dst_mr = pair.server.reg(addr(dst), dst.nbytes)
    ok, whole = pair.server.advertise(dst_mr, addr(dst), dst.nbytes)
    assert ok
    # Block k's item: the window's, with the block's address and size.
    metas = [struct.pack("<QI", addr(dst) + k * block, block) + whole[12:] for k in range(n)]
    mine, theirs = rng.sample(range(n), n), rng.sample(range(n), n)
    ptrs = [addr(src) + k * block for k in mine]
    items = [metas[k] for k in theirs]
    expected = np.zeros_like(dst)
    for a, b in zip(mine, theirs):
        expected[b * block : (b + 1) * block] = src[a * block : (a + 1) * block]
    general = p2p._engine.postv
    for kind, (mrs, ps, sizes, ms) in {
        "plain": ([src_mr] * n, ptrs, [block] * n, items),
        "tuples and numpy ints": (tuple([np.uint64(src_mr)] * n), tuple(ptrs), [np.int32(block)] * n, tuple(items)),
        "bytearrays": ([src_mr] * n, ptrs, [block] * n, [bytearray(m) for m in items]),
    }.items():
        calls = []
        monkeypatch.setattr(p2p._engine, "postv", lambda *a: calls.append(1) or general(*a))
        dst[:] = 0
        assert pair.client.writev(pair.conn, mrs, ps, sizes, ms, n) is True, kind
        assert np.array_equal(dst, expected), kind
        assert (calls == []) == (kind == "plain"), kind
    back = np.zeros_like(src)
    _, back_mr = pair.client.reg(addr(back), back.nbytes)
    assert pair.client.readv(pair.conn, [back_mr] * n, [addr(back) + k * block for k in mine], [block] * n, items, n)
    assert np.array_equal(back, src)
    with pytest.raises(RuntimeError, match="Invalid mr_id"):
        pair.client.writev(pair.conn, [src_mr] * (n - 1) + [12345], ptrs, [block] * n, items, n)
    with pytest.raises(RuntimeError, match=r"meta must be exactly 64 bytes"):
        pair.client.readv(pair.conn, [src_mr] * n, ptrs, [block] * n, items[:-1] + [items[0][:63]], n)


def test_containing_all_answers_as_containing_does():
    rng = random.Random(11)
    pool = np.zeros(1 << 16, np.uint8)
    base = addr(pool)
    with p2p.Endpoint(0) as ep:
        # Overlapping, nested and equal-based registrations.
        kept = []
        for _ in range(30):
            a = rng.randrange(0, 1 << 15)
            b = rng.randrange(a + 1, min(a + (1 << 14), 1 << 16) + 1)
            kept += ep.register_memory([pool[a:b]])
        kept += ep.register_memory([pool[100:200], pool[100:300], pool[100:150]])
        ranges = []
        for _ in range(2000):
            a = rng.randrange(0, 1 << 16)
            ranges.append((base + a, rng.randrange(0, min(1 << 12, (1 << 16) - a) + 1)))
        # Runs of neighbouring blocks, as a pool's are described.
        ranges += [(base + 64 * i, 64) for i in range(1024)]
        ranges += [(base + 100 + i, 40) for i in range(60)]
        with ep._lock:
            expected = [ep._containing(a, s) for a, s in ranges]
            got = ep._containing_all(ranges)
        assert got == expected
        assert sum(r is not None for r in got) > 1000, "most ranges lie in a registration"
        ep.deregister_memory(kept)
