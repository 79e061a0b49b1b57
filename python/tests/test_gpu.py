"""Device memory through torch tensors and raw device pointers. Needs torch with CUDA and a GPU;
skipped elsewhere (the host-memory suite covers every method without them)."""

import pytest

from uccl_tcpx import _engine, p2p

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or _engine.gpu_count() == 0:
    pytest.skip("no CUDA GPU visible", allow_module_level=True)


def pattern(n, seed, device="cuda:0"):
    return ((torch.arange(n, dtype=torch.int64, device=device) * 2654435761 + seed) % 251).to(torch.uint8)


@pytest.fixture
def endpoints():
    server, client = p2p.Endpoint(local_gpu_idx=0), p2p.Endpoint(local_gpu_idx=0)
    ip, port, bdf = p2p.Endpoint.parse_metadata(server.get_metadata())
    assert bdf.count(":") == 2, f"an endpoint of GPU 0 names its bus id in its metadata: {bdf!r}"
    ok, conn = client.connect(ip, bdf, port)
    assert ok
    ok, _, _, served = server.accept()
    assert ok
    yield server, client, conn, served
    client.close()
    server.close()


def test_register_memory_and_transfer_of_cuda_tensors(endpoints):
    server, client, conn, _ = endpoints
    n = 4 << 20
    src = pattern(n, 1)
    dst, back = torch.zeros_like(src), torch.zeros_like(src)
    local = client.register_memory([src, back])
    (remote_desc,) = server.register_memory([dst])
    remote = client.deserialize_descs(server.get_serialized_descs([remote_desc]))
    ok, tid = client.transfer(conn, "write", [local[0]], remote)
    assert ok
    while not client.poll_async(tid)[1]:
        pass
    torch.cuda.synchronize()
    assert torch.equal(dst, src)
    ok, tid = client.transfer(conn, "read", [local[1]], remote)
    assert ok
    while not client.poll_async(tid)[1]:
        pass
    torch.cuda.synchronize()
    assert torch.equal(back, src)


def test_raw_device_pointers_and_a_host_peer(endpoints):
    server, client, conn, _ = endpoints
    n = 1 << 20
    src = pattern(n, 2)
    dst = torch.zeros(n, dtype=torch.uint8)  # host memory on the target
    ok, smr = client.reg(src.data_ptr(), n)
    assert ok
    ok, dmr = server.reg(dst.data_ptr(), n)
    assert ok
    ok, meta = server.advertise(dmr, dst.data_ptr(), n)
    assert ok
    assert client.write(conn, smr, src.data_ptr(), n, meta)
    assert torch.equal(dst, src.cpu())


def test_same_host_ipc_calls_between_gpu_buffers(endpoints):
    server, client, conn, served = endpoints
    n = 1 << 20
    src, dst = pattern(n, 3), torch.zeros(n, dtype=torch.uint8, device="cuda:0")
    ok, info = server.advertise_ipc(served, dst.data_ptr(), n)
    assert ok and len(info) == 104
    assert client.write_ipc(conn, src.data_ptr(), n, info)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)


@pytest.mark.skipif(_engine.gpu_count() < 2, reason="needs a second GPU")
def test_memory_of_another_gpu_moves_like_its_own(endpoints):
    """Endpoints of GPU 0 take GPU 1's tensors, as UCCL's engine takes any GPU's pointer."""
    server, client, conn, _ = endpoints
    n = 1 << 20
    src = pattern(n, 7, device="cuda:1")
    dst, back = torch.zeros(n, dtype=torch.uint8, device="cuda:1"), torch.zeros(n, dtype=torch.uint8, device="cuda:1")
    local = client.register_memory([src, back])
    (remote_desc,) = server.register_memory([dst])
    remote = client.deserialize_descs(server.get_serialized_descs([remote_desc]))
    for op, buf in (("write", local[0]), ("read", local[1])):
        ok, tid = client.transfer(conn, op, [buf], remote)
        assert ok, op
        while not client.poll_async(tid)[1]:
            pass
    torch.cuda.synchronize("cuda:1")
    assert torch.equal(dst, src) and torch.equal(back, src)
