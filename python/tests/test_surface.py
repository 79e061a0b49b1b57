"""The module's surface: names, constructors, metadata and descriptor byte formats."""

import ctypes
import inspect
import ipaddress
import struct

import pytest

from uccl_tcpx import p2p

# UCCL's Endpoint methods at its current source (39), and those only its 0.1.1 wheel has (12).
HEAD_METHODS = [
    "connect_local", "accept_local", "advertise_ipc", "advertisev_ipc", "write_ipc", "read_ipc",
    "write_ipc_async", "read_ipc_async", "writev_ipc", "readv_ipc", "writev_ipc_async", "readv_ipc_async",
    "start_passive_accept", "connect", "add_remote_endpoint", "remove_remote_endpoint", "get_metadata",
    "parse_metadata", "accept", "reg", "regv", "dereg", "register_memory", "deregister_memory",
    "get_serialized_descs", "deserialize_descs", "transfer", "read", "write", "read_async", "write_async",
    "readv", "writev", "readv_async", "writev_async", "advertise", "advertisev", "poll_async", "conn_id_of_rank",
]
V011_METHODS = [
    "send", "recv", "send_async", "recv_async", "sendv", "recvv", "sendv_async", "recvv_async",
    "send_ipc", "recv_ipc", "send_ipc_async", "recv_ipc_async",
]


def test_module_names():
    for name in ["Endpoint", "XferDesc", "XferHandle", "FloatType", "get_oob_ip"]:
        assert hasattr(p2p, name), name
    assert [(m.name, m.value) for m in p2p.FloatType] == [
        ("kUndefined", 0), ("kFloat16", 1), ("kBFloat16", 2), ("kFloat32", 3), ("kFloat8E4M3FN", 4), ("kFloat8E5M2", 5),
    ]
    for member in p2p.FloatType:
        assert getattr(p2p, member.name) is member


@pytest.mark.parametrize("name", HEAD_METHODS + V011_METHODS)
def test_endpoint_has_method(name):
    assert callable(getattr(p2p.Endpoint, name))


def test_argument_names_and_defaults_are_uccls():
    sig = inspect.signature
    assert list(sig(p2p.Endpoint.connect).parameters)[1:4] == ["remote_ip_addr", "remote_gpu_bdf", "remote_port"]
    assert sig(p2p.Endpoint.connect).parameters["remote_port"].default == -1
    assert sig(p2p.Endpoint.reg).parameters["floatType"].default == p2p.FloatType.kUndefined
    assert list(sig(p2p.Endpoint.transfer).parameters)[1:] == [
        "conn_id", "op_name", "local_desc_list", "remote_desc_list",
    ]
    assert list(sig(p2p.Endpoint.writev).parameters)[1:] == [
        "conn_id", "mr_id_v", "ptr_v", "size_v", "meta_blob_v", "num_iovs",
    ]
    assert list(sig(p2p.Endpoint.read).parameters)[1:] == ["conn_id", "mr_id", "ptr", "size", "meta"]


def test_get_oob_ip_is_the_advertised_address():
    ip = p2p.get_oob_ip()
    ipaddress.ip_address(ip)
    with p2p.Endpoint(0) as ep:
        assert p2p.Endpoint.parse_metadata(ep.get_metadata())[0] == ip


def test_both_constructors_and_repr():
    with p2p.Endpoint() as a, p2p.Endpoint(local_gpu_idx=0) as b:
        assert repr(a) == repr(b) == "<UCCL P2P Endpoint>"
        assert a.get_metadata() != b.get_metadata(), "each endpoint listens on a port of its own"


def test_metadata_byte_format():
    with p2p.Endpoint(0) as ep:
        meta = ep.get_metadata()
        ip, port, bdf = p2p.Endpoint.parse_metadata(meta)
        packed = ipaddress.ip_address(ip).packed
        assert meta == packed + struct.pack(">HB", port, len(bdf)) + bdf.encode()
        assert 0 < port < 65536
        # Equal hosts give equal lengths (peers exchange fixed-size buffers of it).
        with p2p.Endpoint(0) as other:
            assert len(other.get_metadata()) == len(meta)


def test_parse_metadata_ipv4_ipv6_and_errors():
    v4 = bytes([10, 0, 0, 7]) + struct.pack(">HB", 4242, 12) + b"0000:4a:00.0"
    assert p2p.Endpoint.parse_metadata(v4) == ("10.0.0.7", 4242, "0000:4a:00.0")
    assert p2p.Endpoint.parse_metadata(bytes([127, 0, 0, 1, 0, 80, 0])) == ("127.0.0.1", 80, "")
    v6 = ipaddress.IPv6Address("fd00::5").packed + struct.pack(">HB", 7, 3) + b"abc"
    assert p2p.Endpoint.parse_metadata(v6) == ("fd00::5", 7, "abc")
    with pytest.raises(RuntimeError, match="Metadata too short: 3"):
        p2p.Endpoint.parse_metadata(b"abc")
    with pytest.raises(RuntimeError, match="Metadata size mismatch for IPv6"):
        p2p.Endpoint.parse_metadata(v4 + b"x")
    with pytest.raises(TypeError):
        p2p.Endpoint.parse_metadata("10.0.0.1:5")


def test_xfer_desc_fields_repr_and_subscripting():
    d = p2p.XferDesc()
    assert (d.addr, d.size, d.mr_id, d.lkeys, d.rkeys) == (0, 0, 0, [], [])
    d.addr, d.size, d.mr_id = 4096, 10, 3
    assert repr(d) == "<XferDesc addr=4096 size=10 mr_id=3>"
    assert d["addr"] == 4096 and d["size"] == 10
    with pytest.raises(KeyError):
        d["nope"]
    with pytest.raises(AttributeError):
        d.other = 1


def test_xfer_handle_cannot_be_made():
    with pytest.raises(TypeError):
        p2p.XferHandle()


def test_serialized_descs_byte_format_round_trips():
    a, b = p2p.XferDesc(), p2p.XferDesc()
    a.addr, a.size, a.mr_id, a.lkeys, a.rkeys = 0x1000, 64, 9, [1, 2], [3, 4]
    b.addr, b.size = 0x2000, 8
    with p2p.Endpoint(0) as ep:
        blob = ep.get_serialized_descs([a, b])
    expected = (
        struct.pack("<Q", 2)
        + struct.pack("<QQQ", 0x1000, 64, 2) + struct.pack("<2I2I", 1, 2, 3, 4) + struct.pack("<Q", 0)
        + struct.pack("<QQQ", 0x2000, 8, 0) + struct.pack("<Q", 0)
    )
    assert blob == expected
    back = p2p.Endpoint.deserialize_descs(blob)
    assert [(d.addr, d.size, d.lkeys, d.rkeys, d.mr_id) for d in back] == [
        (0x1000, 64, [1, 2], [3, 4], 0), (0x2000, 8, [], [], 0),
    ]
    assert p2p.Endpoint.deserialize_descs(b"") == []
    # A missing IPC tail is tolerated; anything else cut short is not.
    assert len(p2p.Endpoint.deserialize_descs(blob[: len(blob) - 8])) == 2
    for cut in (4, 8 + 10, 8 + 24 + 4, len(expected) - 30):
        with pytest.raises(RuntimeError, match="Invalid serialized XferDesc data"):
            p2p.Endpoint.deserialize_descs(blob[:cut])
    huge = struct.pack("<QQQQ", 1, 0, 0, 2**40)
    with pytest.raises(RuntimeError, match="Invalid serialized XferDesc data"):
        p2p.Endpoint.deserialize_descs(huge)


def test_conn_id_of_rank_is_never_filled():
    with p2p.Endpoint(0) as ep:
        assert ep.conn_id_of_rank(0) == 2**64 - 1


def test_descriptors_from_uccl_round_trip_byte_for_byte():
    # UCCL's own descriptors carry four NIC keys each way and a 104-byte IPC record; ours eight keys
    # and none. Both shapes, mixed in one list, come back out exactly as they went in.
    uccl = struct.pack("<QQQ", 0x7000, 4096, 4) + struct.pack("<8I", *range(1, 9)) + struct.pack("<Q", 104) + bytes(
        range(104)
    )
    ours = struct.pack("<QQQ", 0x9000, 512, 8) + struct.pack("<16I", *range(100, 116)) + struct.pack("<Q", 0)
    blob = struct.pack("<Q", 3) + ours + uccl + ours
    descs = p2p.Endpoint.deserialize_descs(blob)
    assert [(d.addr, d.size, len(d.lkeys)) for d in descs] == [(0x9000, 512, 8), (0x7000, 4096, 4), (0x9000, 512, 8)]
    assert descs[1].lkeys == [1, 2, 3, 4] and descs[1].rkeys == [5, 6, 7, 8]
    assert descs[0].rkeys == list(range(108, 116))
    with p2p.Endpoint(0) as ep:
        assert ep.get_serialized_descs(descs) == blob


# UCCL's keyword names for each method (its binding's nb::arg list), in order.
UCCL_ARGS = {
    "connect": ["remote_ip_addr", "remote_gpu_bdf", "remote_port"],
    "add_remote_endpoint": ["metadata_bytes"],
    "remove_remote_endpoint": ["conn_id"],
    "reg": ["ptr", "size", "floatType"],
    "regv": ["ptrs", "sizes"],
    "dereg": ["mr_id"],
    "register_memory": ["tensor_list"],
    "deregister_memory": ["desc_list"],
    "get_serialized_descs": ["desc_list"],
    "deserialize_descs": ["serialized_bytes"],
    "transfer": ["conn_id", "op_name", "local_desc_list", "remote_desc_list"],
    "read": ["conn_id", "mr_id", "ptr", "size", "meta"],
    "write": ["conn_id", "mr_id", "ptr", "size", "meta"],
    "read_async": ["conn_id", "mr_id", "ptr", "size", "meta"],
    "write_async": ["conn_id", "mr_id", "ptr", "size", "meta"],
    "readv": ["conn_id", "mr_id_v", "ptr_v", "size_v", "meta_blob_v", "num_iovs"],
    "writev": ["conn_id", "mr_id_v", "ptr_v", "size_v", "meta_blob_v", "num_iovs"],
    "readv_async": ["conn_id", "mr_id_v", "ptr_v", "size_v", "meta_blob_v", "num_iovs"],
    "writev_async": ["conn_id", "mr_id_v", "ptr_v", "size_v", "meta_blob_v", "num_iovs"],
    "connect_local": ["remote_gpu_bdf"],
    "write_ipc": ["conn_id", "ptr", "size", "info"],
    "read_ipc": ["conn_id", "ptr", "size", "info"],
    "write_ipc_async": ["conn_id", "ptr", "size", "info"],
    "read_ipc_async": ["conn_id", "ptr", "size", "info"],
    "writev_ipc": ["conn_id", "ptr_v", "size_v", "info_v"],
    "readv_ipc": ["conn_id", "ptr_v", "size_v", "info_v"],
    "writev_ipc_async": ["conn_id", "ptr_v", "size_v", "info_v"],
    "readv_ipc_async": ["conn_id", "ptr_v", "size_v", "info_v"],
    "advertise_ipc": ["conn_id", "ptr", "size"],
    "advertisev_ipc": ["conn_id", "ptr_v", "size_v"],
    "poll_async": ["transfer_id"],
    "conn_id_of_rank": ["rank"],
    # UCCL 0.1.1's two-sided family.
    **{name: ["conn_id", "mr_id", "ptr", "size"] for name in ("send", "recv", "send_async", "recv_async")},
    **{
        name: ["conn_id", "mr_id_v", "data_ptr_v", "size_v", "num_iovs"]
        for name in ("sendv", "recvv", "sendv_async", "recvv_async")
    },
    **{name: ["conn_id", "ptr", "size"] for name in ("send_ipc", "recv_ipc", "send_ipc_async", "recv_ipc_async")},
}


@pytest.mark.parametrize("name", sorted(UCCL_ARGS))
def test_keyword_names_are_uccls(name):
    params = [p for p in inspect.signature(getattr(p2p.Endpoint, name)).parameters if p != "self"]
    assert params[: len(UCCL_ARGS[name])] == UCCL_ARGS[name]


def test_advertise_takes_uccls_keywords_in_both_forms():
    with p2p.Endpoint(0) as ep:
        buf = bytearray(4096)
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        _, mr = ep.reg(ptr, 4096)
        ok, one = ep.advertise(mr_id=mr, ptr=ptr, size=4096)
        assert ok and len(one) == 64
        ok, many = ep.advertisev(mr_id_v=[mr], ptr_v=[ptr], size_v=[4096], num_iovs=1)
        assert ok and many[0][:12] == one[:12]
        with pytest.raises(TypeError, match="unexpected or repeated argument 'bogus'"):
            ep.advertise(mr, ptr, bogus=1)
        with pytest.raises(TypeError, match="missing argument"):
            ep.advertise(mr_id=mr, ptr=ptr)
