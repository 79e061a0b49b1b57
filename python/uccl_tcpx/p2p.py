"""UCCL's ``p2p`` module over the uccl-tcpx engine.

The names, arguments, defaults, return tuples and byte formats are UCCL's (its current source, plus
what its 0.1.1 wheel still had: ``advertise``/``advertisev`` with a leading ``conn_id`` and the
two-sided ``send``/``recv`` family). Where this module behaves differently on purpose:

* A transfer larger than the remote range it names is refused (the peer only grants what it
  advertised); UCCL posts it.
* ``FloatType`` is accepted and ignored: no compression.
* Bad input raises (``RuntimeError``, or ``TypeError``/``ValueError`` for arguments of the wrong
  kind) where UCCL aborts the process or misbehaves: an unknown or already reported transfer id, a
  blob of the wrong length, a closed endpoint, memory of a GPU the process cannot reach.
* ``Endpoint(local_gpu_idx)`` works without a CUDA driver: the engine then serves host memory only.
"""

import atexit
import bisect
import enum
import ipaddress
import itertools
import logging
import os
import re
import struct
import sys
import threading
import weakref

from . import _engine

__all__ = ["Endpoint", "XferDesc", "XferHandle", "FloatType", "get_oob_ip"]

_log = logging.getLogger("uccl_tcpx.p2p")

#: The mr_id of a descriptor whose registration failed (UCCL's marker).
_NO_MR = 2**64 - 1
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_FIFO_LEN = 64
#: UCCL's IPC blob is 104 bytes (its IpcTransferInfo); ours is a FifoItem, a tag and zeros.
_IPC_LEN = 104
_IPC_TAG = b"TCPXIPC1"
_FIFO = struct.Struct("<QIIIIQ32s")
_FIFO_WITH_KEYS = struct.Struct("<QIIIIQ8I")
_DESC_HEAD = struct.Struct("<QQQ")
# A descriptor of ours (eight keys each way, no IPC part) in one go.
_DESC_OF_OURS = struct.Struct("<QQQ8I8IQ")
_U64 = struct.Struct("<Q")
#: The engine's status for memory it cannot serve (GPU memory its transport cannot move).
_NOT_SUPPORTED = -9

# Process-wide, as UCCL's ids are addresses: an id of one endpoint never names another's transfer.
_transfer_ids = itertools.count(1)

# Endpoints still open when the interpreter exits are closed first, while Python still runs: a
# passive-accept thread (which keeps its endpoint alive) must not wake inside the engine after
# the interpreter is gone.
_open_endpoints = weakref.WeakSet()


@atexit.register
def _close_open_endpoints():
    for ep in list(_open_endpoints):
        try:
            ep.close()
        except Exception:
            pass


class FloatType(enum.IntEnum):
    """Element types for UCCL's compression; accepted and ignored here (no compression)."""

    kUndefined = 0
    kFloat16 = 1
    kBFloat16 = 2
    kFloat32 = 3
    kFloat8E4M3FN = 4
    kFloat8E5M2 = 5


# UCCL exports the enum's values onto the module as well.
globals().update(FloatType.__members__)
__all__ += list(FloatType.__members__)


def get_oob_ip():
    """The IP this host's endpoints advertise in their metadata."""
    return _engine.default_ip()


class XferHandle:
    """UCCL exposes this type though nothing returns it; kept for code that names it."""

    __slots__ = ("_conn_id", "_op_name", "_transfer_id")

    def __init__(self, *args, **kwargs):
        raise TypeError("XferHandle cannot be instantiated")

    conn_id = property(lambda self: self._conn_id)
    op_name = property(lambda self: self._op_name)
    transfer_id = property(lambda self: self._transfer_id)


class XferDesc:
    """One registered buffer as a peer may address it: UCCL's fields, byte format and repr."""

    __slots__ = ("addr", "size", "mr_id", "lkeys", "rkeys", "_ipc_info")

    def __init__(self):
        self.addr = 0
        self.size = 0
        self.mr_id = 0
        self.lkeys = []
        self.rkeys = []
        self._ipc_info = b""

    def __repr__(self):
        return f"<XferDesc addr={self.addr} size={self.size} mr_id={self.mr_id}>"

    def __getitem__(self, key):
        # UCCL's object is not subscriptable, but older callers index it like a dict.
        if key in ("addr", "size", "mr_id", "lkeys", "rkeys"):
            return getattr(self, key)
        raise KeyError(key)


def _int(value, name, bits=64):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0 or value >> bits:
        raise ValueError(f"{name} must be in 0..2**{bits}-1, got {value}")
    return value


def _ints(values, name, bits=64):
    try:
        return [_int(v, f"{name}[{i}]", bits) for i, v in enumerate(values)]
    except TypeError as e:
        if "must be an int" in str(e):
            raise
        raise TypeError(f"{name} must be a list of ints, got {type(values).__name__}") from None


def _blob(value, name, length, message=None):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != length:
        raise RuntimeError(message or f"{name} must be exactly {length} bytes, got {len(value)}")
    return value


def _meta(value):
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) != _FIFO_LEN:
        raise RuntimeError("meta must be exactly 64 bytes (serialized FifoItem)")
    return _blob(value, "meta", _FIFO_LEN)


def _resized(meta, size):
    """UCCL's sync and async one-sided calls send the item with its size set to the call's."""
    if size > _U32_MAX:
        raise RuntimeError(f"size {size} exceeds a FifoItem's 32-bit size field")
    return meta[:8] + struct.pack("<I", size) + meta[12:]


def _tensor_range(obj, index):
    """(address, bytes) of a torch tensor, anything shaped like one, or a numpy array.

    Only a contiguous, writable buffer is accepted: its registration is what a peer may write, so
    a strided view (whose [address, address + bytes) is not its memory, and for a reversed one
    runs past the allocation) or read-only memory must never be registered."""
    data_ptr = getattr(obj, "data_ptr", None)
    if callable(data_ptr):
        is_contiguous = getattr(obj, "is_contiguous", None)
        if callable(is_contiguous) and not is_contiguous():
            raise ValueError(
                f"Tensor at index {index} is not contiguous: register a contiguous one (tensor.contiguous())"
            )
        return int(data_ptr()), int(obj.numel()) * int(obj.element_size())
    interface = getattr(obj, "__array_interface__", None)
    if isinstance(interface, dict) and "data" in interface:
        data = interface["data"]
        if not isinstance(data, tuple) or len(data) != 2:
            raise ValueError(f"Array at index {index} does not expose its memory as an address")
        ptr, readonly = data
        if readonly:
            raise ValueError(f"Array at index {index} is read-only: a peer could write into registered memory")
        shape = tuple(int(d) for d in interface.get("shape", ()))
        itemsize = _itemsize(interface.get("typestr", ""), index)
        if not _c_contiguous(shape, interface.get("strides"), itemsize):
            raise ValueError(
                f"Array at index {index} is not C-contiguous (strides {interface.get('strides')}): "
                "register a contiguous one (numpy.ascontiguousarray)"
            )
        size = itemsize
        for d in shape:
            size *= d
        return int(ptr), size
    raise RuntimeError(f"Object at index {index} is not a tensor (missing data_ptr() method)")


_new_desc = object.__new__


def _ranges(objs):
    """(address, bytes) of each buffer, as _tensor_range gives them: plain numpy arrays read in
    one call into the extension, anything else (and every refusal, with its message) the slow way."""
    if type(objs) is not list:
        objs = list(objs)
    numpy = sys.modules.get("numpy")
    fast = _engine.array_ranges(getattr(numpy, "ndarray", None), objs)
    for i, r in enumerate(fast):
        if r is None:
            fast[i] = _tensor_range(objs[i], i)
    return fast


def _itemsize(typestr, index):
    digits = re.match(r"[<>|=]?[a-zA-Z](\d+)", typestr or "")
    if digits is None:
        raise ValueError(f"Array at index {index} has an element type of unknown size: {typestr!r}")
    return int(digits.group(1))


def _c_contiguous(shape, strides, itemsize):
    """Whether strides lay the elements out back to back in C order (None is how the array
    interface says so)."""
    if strides is None or 0 in shape:
        return True
    expected = itemsize
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if dim != 1 and stride != expected:
            return False
        expected *= dim
    return True


def _keys_of(meta):
    """A capability's padding as UCCL's rkeys: eight little-endian u32 words."""
    return list(struct.unpack("<8I", meta[32:64]))


def _item_for(desc):
    """The FifoItem a remote descriptor stands for (its keys carry our capability)."""
    keys = desc.rkeys
    if len(keys) != 8:
        raise RuntimeError("RDMA transfer requires RDMA-registered local and remote descriptors")
    return _FIFO_WITH_KEYS.pack(desc.addr, min(desc.size, _U32_MAX), 0, 0, 0, 0, *keys)


_BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_GPU_INDEX = re.compile(r"[0-9]{1,9}")


def _gpu_name(gpu):
    """connect_local's GPU as the name it is announced under: a PCI bus id (lower case), a GPU
    index, or "" / "0". It becomes part of a path (and often comes from a peer's metadata), so
    anything else is refused rather than allowed to name another folder."""
    if isinstance(gpu, bool):
        raise TypeError("remote_gpu_bdf must be a PCI bus id (str) or a GPU index (int), got a bool")
    if isinstance(gpu, int):
        gpu = str(_int(gpu, "remote_gpu_idx", 31))
    elif not isinstance(gpu, str):
        raise TypeError(f"remote_gpu_bdf must be a PCI bus id (str) or a GPU index (int), got {type(gpu).__name__}")
    name = gpu.lower()
    if name == "" or _GPU_INDEX.fullmatch(name) or _BDF.fullmatch(name):
        return name
    raise ValueError(
        f"remote_gpu_bdf {gpu!r} is neither a PCI bus id (dddd:bb:dd.f, hexadecimal) nor a GPU index"
    )


def _rendezvous_dir(name):
    """Where endpoints of this user on this host announce themselves (under their GPU's bus id,
    "host", or "gpuN"). The user's folder must be theirs alone: metadata planted by someone else
    would make connect_local hand them a connection."""
    base = os.environ.get("UCCL_TCPX_RENDEZVOUS_DIR") or (
        "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    )
    mine = os.path.join(base, f"uccl-tcpx-{os.getuid()}")
    try:
        os.mkdir(mine, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(mine)
    if not os.path.isdir(mine) or os.path.islink(mine) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{mine} is not a folder of this user's alone; connect_local will not use it")
    return os.path.join(mine, name)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _announced(name, own):
    """Metadata of the live endpoints announced under `name` other than those at `own`, newest first."""
    found = []
    try:
        folder = _rendezvous_dir(name)
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        _log.error("connect_local: %s", e)
        return []
    for name in names:
        path = os.path.join(folder, name)
        if path in own or not name.endswith(".meta"):
            continue
        try:
            pid = int(name.split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        try:
            with open(path, "rb") as f:
                found.append((os.stat(path).st_mtime_ns, f.read()))
        except OSError:
            continue
    return [meta for _, meta in sorted(found, reverse=True)]


class _Region:
    """A registration shared by the register_memory calls whose buffers lie inside it."""

    __slots__ = ("base", "size", "mr", "keys", "refs")

    def __init__(self, base, size, mr, keys):
        self.base, self.size, self.mr, self.keys, self.refs = base, size, mr, keys, 0


class Endpoint:
    """An engine with its connections, registrations and transfers, as UCCL's p2p.Endpoint."""

    def __init__(self, local_gpu_idx=None):
        self._engine = 0
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._conns = {}  # conn_id -> connection handle
        self._memo = {}  # metadata bytes -> conn_id (add_remote_endpoint)
        self._mrs = {}  # mr_id -> (engine mr, region or None)
        self._xfers = {}  # transfer id -> (connection handle, [engine ids left], [failed])
        self._next_conn = itertools.count(0)
        self._next_mr = itertools.count(0)
        # Live registrations of register_memory and the *_ipc calls, sorted by base address (with
        # their bases alongside, for bisect), so that finding one that contains a buffer stays
        # cheap with thousands of them.
        self._regions = []
        self._region_bases = []
        self._largest_region = 0
        self._passive = None
        self._announcements = []
        self._closed = False
        if local_gpu_idx is None:
            gpu = -1
        else:
            gpu = _int(local_gpu_idx, "local_gpu_idx", 31)
            count = _engine.gpu_count()
            if count == 0:
                # No CUDA driver: host memory only, the index recorded (UCCL cannot run here at all).
                gpu = -2
            elif gpu >= count:
                raise RuntimeError(f"local_gpu_idx {gpu} is out of range: {count} CUDA device(s) are visible")
        self.local_gpu_idx = local_gpu_idx
        self._engine = _engine.create(gpu)
        _open_endpoints.add(self)
        self._announce()

    def _announce(self):
        """Makes this endpoint findable by connect_local on this host: under its GPU's bus id (or
        "host" without one) and under the GPU index it was created for."""
        meta = self.get_metadata()
        _, port, bdf = self.parse_metadata(meta)
        # Lower case, as connect_local looks a bus id up.
        names = [(bdf or "host").lower()]
        if self.local_gpu_idx is not None:
            names.append(f"gpu{self.local_gpu_idx}")
        for name in names:
            try:
                folder = _rendezvous_dir(name)
                os.makedirs(folder, mode=0o700, exist_ok=True)
                path = os.path.join(folder, f"{os.getpid()}-{port}.meta")
                with open(path + ".tmp", "wb") as f:
                    f.write(meta)
                os.replace(path + ".tmp", path)
                self._announcements.append(path)
            except OSError as e:
                _log.warning("connect_local will not find this endpoint: %s", e)

    def __repr__(self):
        return "<UCCL P2P Endpoint>"

    # -- lifetime -------------------------------------------------------------------------------

    def close(self):
        """Stops accepting, closes every connection and frees the engine. Idempotent."""
        with self._lock:
            if self._closed or not self._engine:
                self._closed = True
                return
            self._closed = True
            engine = self._engine
        for path in self._announcements:
            try:
                os.unlink(path)
            except OSError:
                pass
        _engine.stop_accept(engine)
        if self._passive is not None:
            self._passive.join()
        for conn in list(self._conns.values()):
            _engine.conn_destroy(conn)
        self._conns.clear()
        _engine.destroy(engine)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _live(self):
        if self._closed:
            raise RuntimeError("Endpoint is closed")
        return self._engine

    def _conn(self, conn_id):
        self._live()
        conn = self._conns.get(_int(conn_id, "conn_id"))
        if conn is None:
            raise RuntimeError(f"Invalid conn_id {conn_id}: no such connection on this endpoint")
        return conn

    def _engine_mr(self, mr_id):
        entry = self._mrs.get(_int(mr_id, "mr_id"))
        if entry is None:
            raise RuntimeError(f"Invalid mr_id {mr_id}: not registered on this endpoint")
        return entry[0]

    def _add_conn(self, conn):
        with self._lock:
            conn_id = next(self._next_conn)
            self._conns[conn_id] = conn
        return conn_id

    def _track(self, conn, ids, failed=False):
        tid = next(_transfer_ids)
        self._xfers[tid] = (conn, ids, [failed])
        return tid

    def _keep_interrupted(self, conn, ids, failed, interruption):
        """An exception (Ctrl-C) ended the wait of a synchronous transfer while the engine still
        uses its buffers: the transfer stays tracked, under the id noted on the exception as
        `transfer_id`, for poll_async to report."""
        tid = self._track(conn, list(ids), failed)
        try:
            interruption.transfer_id = tid
        except AttributeError:
            pass
        _log.warning(
            "a synchronous transfer was interrupted and keeps running as transfer_id %d; its buffers "
            "stay in use until poll_async reports it done or the endpoint closes",
            tid,
        )

    # -- connections ----------------------------------------------------------------------------

    def get_metadata(self):
        """ip (4 or 16 bytes) + port (u16 big-endian) + bdf length (u8) + bdf (ASCII), as UCCL's."""
        text = _engine.metadata(self._live())
        address, _, bdf = text.partition("?")
        host, _, port = address.rpartition(":")
        ip = ipaddress.ip_address(host.strip("[]"))
        bdf = b"" if bdf in ("", "0") else bdf.lower().encode("ascii")
        return ip.packed + struct.pack(">HB", int(port), len(bdf)) + bdf

    @staticmethod
    def parse_metadata(metadata):
        """(ip, port, bdf) from get_metadata's bytes."""
        if not isinstance(metadata, (bytes, bytearray, memoryview)):
            raise TypeError(f"metadata must be bytes, got {type(metadata).__name__}")
        b = bytes(metadata)
        if len(b) < 7:
            raise RuntimeError(f"Metadata too short: {len(b)}")
        if len(b) == 7 + b[6]:
            ip, port, bdf = ipaddress.IPv4Address(b[:4]), b[4:6], b[7:]
        elif len(b) >= 19 and len(b) == 19 + b[18]:
            ip, port, bdf = ipaddress.IPv6Address(b[:16]), b[16:18], b[19:]
        else:
            raise RuntimeError(f"Metadata size mismatch for IPv6: {len(b)} bytes")
        try:
            bdf = bdf.decode("ascii")
        except UnicodeDecodeError:
            raise RuntimeError("Metadata holds a GPU bus id that is not ASCII") from None
        return str(ip), struct.unpack(">H", port)[0], bdf

    def connect(self, remote_ip_addr, remote_gpu_bdf=None, remote_port=-1, remote_gpu_idx=None):
        """(ok, conn_id). ``remote_gpu_idx`` is accepted as another name of ``remote_gpu_bdf``."""
        engine = self._live()
        if not isinstance(remote_ip_addr, str):
            raise TypeError(f"remote_ip_addr must be a str, got {type(remote_ip_addr).__name__}")
        gpu = remote_gpu_bdf if remote_gpu_bdf is not None else remote_gpu_idx
        gpu = "0" if gpu is None or gpu == "" else str(gpu)
        if isinstance(remote_port, bool) or not isinstance(remote_port, int):
            raise TypeError(f"remote_port must be an int, got {type(remote_port).__name__}")
        if not 0 < remote_port < 65536:
            _log.error("connect to %s: remote_port %d is not a port (1..65535)", remote_ip_addr, remote_port)
            return False, 0
        try:
            conn = _engine.connect(engine, remote_ip_addr, gpu, remote_port)
        except RuntimeError as e:
            _log.error("%s", e)
            return False, 0
        return True, self._add_conn(conn)

    def accept(self):
        """Blocks until a peer connects: (ok, remote_ip, remote_gpu_idx, conn_id)."""
        got = _engine.accept(self._live())
        conn, ip, gpu = got
        return True, ip, gpu, self._add_conn(conn)

    def start_passive_accept(self):
        """Accepts every later peer on a background thread. Do not call accept() afterwards."""
        engine = self._live()
        with self._lock:
            if self._passive is not None:
                return True

            def serve():
                while not self._closed:
                    try:
                        got = _engine.accept(engine, 200)
                    except RuntimeError:
                        if not self._closed:
                            _log.exception("passive accept stopped")
                        return
                    if got is not None:
                        self._add_conn(got[0])

            self._passive = threading.Thread(target=serve, name="uccl-passive-accept", daemon=True)
            self._passive.start()
        return True

    def add_remote_endpoint(self, metadata_bytes):
        """(ok, conn_id) of a connection to the endpoint of ``metadata_bytes``, made once per metadata."""
        self._live()
        key = bytes(metadata_bytes)
        with self._lock:
            if key in self._memo:
                return True, self._memo[key]
        ip, port, bdf = self.parse_metadata(key)
        ok, conn_id = self.connect(ip, bdf or "0", port)
        if ok:
            with self._lock:
                self._memo[key] = conn_id
        return ok, conn_id

    def remove_remote_endpoint(self, conn_id):
        """Closes a connection and forgets it; False for an unknown id."""
        self._live()
        with self._lock:
            conn = self._conns.pop(_int(conn_id, "conn_id"), None)
            if conn is None:
                return False
            for key in [k for k, v in self._memo.items() if v == conn_id]:
                del self._memo[key]
        _engine.conn_destroy(conn)
        return True

    def conn_stats(self, conn_id):
        """This endpoint's counters for a connection (an addition of uccl-tcpx): a dict with
        ``out_transfers``/``out_bytes`` (writes and sends that succeeded), ``in_transfers``/
        ``in_bytes`` (reads and receives), ``in_flight``, ``failed``, ``errors`` (failures by
        status, e.g. ``{-14: 1}`` for one timeout), ``retries``, ``last_error`` (0 while none
        failed) and ``landed`` (the peer's mid-size messages that arrived before their receive was
        posted, each copied once more). The peer's one-sided transfers against this side's memory
        count at the peer."""
        return _engine.conn_stats(self._conn(conn_id))

    def prepare(self, conn_id, meta):
        """Sets up now what a first write or read into the peer's ``meta`` (its ``advertise``
        bytes) would set up on its way (an addition of uccl-tcpx): for a peer on this host, its
        grant for the memory and the mapping of its GPU allocation, which otherwise cost that first
        transfer hundreds of microseconds to milliseconds. True when a mapping now serves ``meta``;
        False where no transfer would map anything (a peer on another host, host memory, an
        endpoint without a GPU). Raises RuntimeError when the peer refuses the capability."""
        return _engine.prepare(self._conn(conn_id), bytes(meta))

    def conn_link_stats(self, conn_id):
        """What the connection's data sockets carried per data link (an addition of uccl-tcpx): a
        list of dicts, each with ``link`` (the local address) and ``out``/``in`` dicts of
        ``sockets``, ``bytes``, ``pieces`` and ``errors``. Empty over a net plugin."""
        return _engine.conn_link_stats(self._conn(conn_id))

    def conn_id_of_rank(self, rank):
        """UCCL never fills this table: always 2**64-1."""
        _int(rank, "rank")
        return _NO_MR

    # -- memory ---------------------------------------------------------------------------------

    def reg(self, ptr, size, floatType=FloatType.kUndefined):
        """(ok, mr_id). ``floatType`` selects compression in UCCL; it is ignored here."""
        FloatType(floatType)
        mr = _engine.reg(self._live(), _int(ptr, "ptr"), _int(size, "size"))
        with self._lock:
            mr_id = next(self._next_mr)
            self._mrs[mr_id] = (mr, None)
        return True, mr_id

    def regv(self, ptrs, sizes):
        """(ok, [mr_id]) of one registration per (ptr, size)."""
        ptrs, sizes = _ints(ptrs, "ptrs"), _ints(sizes, "sizes")
        if len(ptrs) != len(sizes):
            raise RuntimeError("ptrs and sizes must match")
        ids = []
        try:
            for p, s in zip(ptrs, sizes):
                ids.append(self.reg(p, s)[1])
        except BaseException:
            for mr_id in ids:
                self.dereg(mr_id)
            raise
        return True, ids

    def dereg(self, mr_id):
        """Deregisters; False for an unknown id. Afterwards no transfer touches the memory."""
        engine = self._live()
        with self._lock:
            entry = self._mrs.pop(_int(mr_id, "mr_id"), None)
        if entry is None:
            return False
        mr, region = entry
        if region is None:
            _engine.dereg(engine, mr)
        else:
            self._release(region)
        return True

    def _release(self, region):
        with self._lock:
            region.refs -= 1
            if region.refs > 0:
                return
            i = bisect.bisect_left(self._region_bases, region.base)
            while self._regions[i] is not region:
                i += 1
            del self._regions[i], self._region_bases[i]
        _engine.dereg(self._engine, region.mr)

    def register_memory(self, tensor_list):
        """One XferDesc per tensor. A buffer inside a registration that is still alive shares it
        (and its keys); otherwise it is registered whole. A failed registration gives mr_id
        2**64-1 and no keys, as UCCL's cache does."""
        engine = self._live()
        ranges = _ranges(tensor_list)
        # One pass under the lock for the usual case (blocks of a pool registered before); the
        # misses register on their own, outside it.
        with self._lock:
            hits = self._containing_all(ranges)
            for region in hits:
                if region is not None:
                    region.refs += 1
        if None not in hits:
            with self._lock:
                return _engine.make_descs(_new_desc, XferDesc, ranges, hits, self._mrs, self._next_mr)
        regions = []
        try:
            for hit, (addr, size) in zip(hits, ranges):
                regions.append(hit or self._region_for(engine, addr, size))
        except BaseException:
            # Nothing of a failed call stays: every reference it took is given back.
            for region in hits:
                if region is not None:
                    self._release(region)
            for hit, region in zip(hits, regions):
                if hit is None and region is not None:
                    self._release(region)
            raise
        with self._lock:
            descs = _engine.make_descs(_new_desc, XferDesc, ranges, regions, self._mrs, self._next_mr)
        return descs

    def _containing_all(self, ranges):
        """[_containing(addr, size) for each range], reusing the last answer while a range starts
        in the same gap between registration bases and ends inside that registration, where
        _containing would look at that registration first and return it. Called with the lock held."""
        bases, regions, containing = self._region_bases, self._regions, self._containing
        hits = []
        last, lo, hi, last_end = None, 0, -1, 0
        for addr, size in ranges:
            if lo <= addr < hi and addr + size <= last_end:
                hits.append(last)
                continue
            hit = containing(addr, size)
            hits.append(hit)
            i = bisect.bisect_right(bases, addr) - 1
            if hit is not None and regions[i] is hit:
                last, lo, last_end = hit, hit.base, hit.base + hit.size
                hi = bases[i + 1] if i + 1 < len(bases) else last_end + 1
            else:
                lo, hi = 0, -1
        return hits

    def _containing(self, addr, size):
        """A live registration holding [addr, addr+size), or None. Called with the lock held."""
        end = addr + size
        i = bisect.bisect_right(self._region_bases, addr)
        while i > 0:
            i -= 1
            region = self._regions[i]
            if region.base + region.size >= end:
                return region
            if region.base + self._largest_region < end:
                return None  # no registration further down reaches that far
        return None

    def _region_for(self, engine, addr, size):
        with self._lock:
            region = self._containing(addr, size)
            if region is not None:
                region.refs += 1
                return region
        try:
            mr = _engine.reg(engine, addr, size)
        except _engine.EngineError as e:
            if e.status == _NOT_SUPPORTED:
                # Memory this endpoint cannot serve: a mistake to report, not a miss.
                raise
            _log.warning("register_memory: %s", e)
            return None
        try:
            keys = _keys_of(_engine.prepare_fifo(engine, mr, addr, size))
        except RuntimeError as e:
            _engine.dereg(engine, mr)
            _log.warning("register_memory: %s", e)
            return None
        region = _Region(addr, size, mr, keys)
        region.refs = 1
        with self._lock:
            i = bisect.bisect_right(self._region_bases, addr)
            self._region_bases.insert(i, addr)
            self._regions.insert(i, region)
            self._largest_region = max(self._largest_region, size)
        return region

    def deregister_memory(self, desc_list):
        """Releases the registrations of register_memory's descriptors."""
        self._live()
        for desc in desc_list:
            if desc.mr_id != _NO_MR:
                self.dereg(desc.mr_id)

    @staticmethod
    def _serialize(desc_list):
        out = [_U64.pack(len(desc_list))]
        for d in desc_list:
            k = len(d.lkeys)
            if k == 8 and len(d.rkeys) == 8 and not d._ipc_info:
                out.append(_DESC_OF_OURS.pack(d.addr, d.size, 8, *d.lkeys, *d.rkeys, 0))
                continue
            if len(d.rkeys) != k:
                raise RuntimeError(f"XferDesc has {k} lkeys but {len(d.rkeys)} rkeys")
            out.append(_DESC_HEAD.pack(_int(d.addr, "addr"), _int(d.size, "size"), k))
            out.append(struct.pack(f"<{k}I{k}I", *d.lkeys, *d.rkeys))
            out.append(_U64.pack(len(d._ipc_info)))
            out.append(d._ipc_info)
        return b"".join(out)

    def get_serialized_descs(self, desc_list):
        """UCCL's byte form of a descriptor list (little-endian; mr_id is not part of it)."""
        if type(desc_list) is list:
            # Descriptors with eight keys each way and no IPC part, in one call.
            blob = _engine.serialize_descs(desc_list)
            if blob is not None:
                return blob
        return self._serialize(desc_list)

    @staticmethod
    def deserialize_descs(serialized_bytes):
        """The descriptor list get_serialized_descs made. Empty input gives []."""
        b = bytes(serialized_bytes)
        if not b:
            return []
        # Descriptors of ours (eight keys each way, no IPC part) in one call; None for others.
        descs = _engine.deserialize_descs(b, _new_desc, XferDesc)
        if descs is not None:
            return descs
        return Endpoint._deserialize(b)

    @staticmethod
    def _deserialize(b):
        """deserialize_descs for any blob, in Python (non-empty bytes)."""
        bad = RuntimeError("Invalid serialized XferDesc data")
        if len(b) < 8:
            raise bad
        (n,) = _U64.unpack_from(b, 0)
        at, descs, end, ours = 8, [], len(b), _DESC_OF_OURS.size
        for _ in range(n):
            if at + ours <= end:
                v = _DESC_OF_OURS.unpack_from(b, at)
                if v[2] == 8 and v[19] == 0:
                    desc = XferDesc()
                    desc.addr, desc.size, desc.lkeys, desc.rkeys = v[0], v[1], list(v[3:11]), list(v[11:19])
                    descs.append(desc)
                    at += ours
                    continue
            if at + _DESC_HEAD.size > len(b):
                raise bad
            addr, size, k = _DESC_HEAD.unpack_from(b, at)
            at += _DESC_HEAD.size
            if k > (len(b) - at) // 8:
                raise bad
            keys = struct.unpack_from(f"<{2 * k}I", b, at)
            at += 8 * k
            desc = XferDesc()
            desc.addr, desc.size, desc.mr_id = addr, size, 0
            desc.lkeys, desc.rkeys = list(keys[:k]), list(keys[k:])
            # A missing IPC tail is tolerated, as UCCL's reader does.
            if at + 8 <= len(b):
                (ipc_len,) = _U64.unpack_from(b, at)
                if ipc_len > len(b) - at - 8:
                    raise bad
                desc._ipc_info = b[at + 8 : at + 8 + ipc_len]
                at += 8 + ipc_len
            descs.append(desc)
        return descs

    # -- one-sided transfers --------------------------------------------------------------------

    def transfer(self, conn_id, op_name, local_desc_list, remote_desc_list):
        """(ok, transfer_id) of a write or read of every local descriptor against the remote one
        at the same index; poll it with poll_async."""
        self._live()
        if len(local_desc_list) != len(remote_desc_list):
            raise RuntimeError("Local and remote descriptors must have the same size")
        if op_name not in ("write", "read"):
            raise RuntimeError(f"Invalid op_name: {op_name}")
        conn = self._conns.get(conn_id)
        if conn is None:
            raise RuntimeError(f"Invalid conn_id {conn_id}")
        if not local_desc_list:
            raise RuntimeError("transfer needs at least one descriptor")
        if type(local_desc_list) is list and type(remote_desc_list) is list:
            # Plain descriptors (what register_memory and deserialize_descs give) in one call;
            # None where any is not, for the loop below and its messages.
            try:
                eid = _engine.post_descs(conn, op_name == "write", local_desc_list, remote_desc_list, self._mrs)
            except RuntimeError as e:
                _log.error("transfer: %s", e)
                return False, 0
            if eid is not None:
                return True, self._track(conn, [eid])
        mrs, ptrs, sizes, items = [], [], [], []
        for local, remote in zip(local_desc_list, remote_desc_list):
            entry = self._mrs.get(local.mr_id)
            if entry is None or local.mr_id == _NO_MR:
                raise RuntimeError("RDMA transfer requires RDMA-registered local and remote descriptors")
            mrs.append(entry[0])
            ptrs.append(local.addr)
            sizes.append(local.size)
            items.append(_item_for(remote))
        try:
            eid = _engine.postv(conn, op_name == "write", mrs, ptrs, sizes, items)
        except RuntimeError as e:
            _log.error("transfer: %s", e)
            return False, 0
        return True, self._track(conn, [eid])

    def _post(self, conn_id, write, mr_id, ptr, size, meta):
        conn = self._conn(conn_id)
        mr = self._engine_mr(mr_id)
        ptr, size = _int(ptr, "ptr"), _int(size, "size")
        meta = _resized(_meta(meta), size)
        try:
            return conn, _engine.post(conn, write, mr, ptr, size, meta)
        except RuntimeError as e:
            _log.error("%s: %s", "write" if write else "read", e)
            return conn, None

    def _postv(self, conn_id, write, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs):
        conn = self._conn(conn_id)
        n = _int(num_iovs, "num_iovs")
        if not all(len(v) == n for v in (mr_id_v, ptr_v, size_v, meta_blob_v)):
            raise RuntimeError("All input vectors/lists must have length num_iovs")
        if n == 0:
            raise RuntimeError("num_iovs must be positive")
        # Plain lists (ints, 64-byte bytes, known regions) are read and posted in one pass in the
        # extension; anything else takes the checks below and their messages.
        try:
            eid = _engine.postv_plain(conn, write, self._mrs, mr_id_v, ptr_v, size_v, meta_blob_v)
        except RuntimeError as e:
            _log.error("%s: %s", "writev" if write else "readv", e)
            return conn, None
        if eid is not None:
            return conn, eid
        mrs = [self._engine_mr(m) for m in mr_id_v]
        ptrs, sizes = _ints(ptr_v, "ptr_v"), _ints(size_v, "size_v")
        metas = [_resized(_meta(m), s) for m, s in zip(meta_blob_v, sizes)]
        try:
            return conn, _engine.postv(conn, write, mrs, ptrs, sizes, metas)
        except RuntimeError as e:
            _log.error("%s: %s", "writev" if write else "readv", e)
            return conn, None

    def _finish(self, conn, eid, what):
        if eid is None:
            return False
        try:
            rc, _, error = _engine.wait(conn, eid)
        except BaseException as e:
            self._keep_interrupted(conn, [eid], False, e)
            raise
        if rc < 0:
            _log.error("%s: %s", what, error)
        return rc == 0

    def _started(self, conn, eid):
        if eid is None:
            return False, 0
        return True, self._track(conn, [eid])

    def _post_fast(self, conn_id, write, mr_id, ptr, size, meta):
        """_post for arguments of the plain kinds (ints in range, a 64-byte bytes object, a live
        connection and region): one lookup each and one call into the engine, which sets the
        item's size itself. Anything else takes _post, with its checks and messages."""
        conn = self._conns.get(conn_id) if type(conn_id) is int else None
        entry = self._mrs.get(mr_id) if type(mr_id) is int else None
        if (
            conn is None
            or entry is None
            or self._closed
            or type(ptr) is not int
            or type(size) is not int
            or type(meta) is not bytes
            or len(meta) != _FIFO_LEN
            or not 0 <= ptr <= _U64_MAX
            or not 0 <= size <= _U32_MAX
        ):
            return self._post(conn_id, write, mr_id, ptr, size, meta)
        try:
            return conn, _engine.post_sized(conn, write, entry[0], ptr, size, meta)
        except RuntimeError as e:
            _log.error("%s: %s", "write" if write else "read", e)
            return conn, None

    def write(self, conn_id, mr_id, ptr, size, meta):
        """Blocking one-sided write of [ptr, ptr+size) to the range ``meta`` (64 bytes) names."""
        return self._finish(*self._post_fast(conn_id, True, mr_id, ptr, size, meta), "write")

    def read(self, conn_id, mr_id, ptr, size, meta):
        """Blocking one-sided read of the range ``meta`` names into [ptr, ptr+size)."""
        return self._finish(*self._post_fast(conn_id, False, mr_id, ptr, size, meta), "read")

    def write_async(self, conn_id, mr_id, ptr, size, meta):
        conn, eid = self._post_fast(conn_id, True, mr_id, ptr, size, meta)
        if eid is None:
            return False, 0
        tid = next(_transfer_ids)
        self._xfers[tid] = (conn, [eid], [False])
        return True, tid

    def read_async(self, conn_id, mr_id, ptr, size, meta):
        conn, eid = self._post_fast(conn_id, False, mr_id, ptr, size, meta)
        if eid is None:
            return False, 0
        tid = next(_transfer_ids)
        self._xfers[tid] = (conn, [eid], [False])
        return True, tid

    def writev(self, conn_id, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs):
        return self._finish(*self._postv(conn_id, True, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs), "writev")

    def readv(self, conn_id, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs):
        return self._finish(*self._postv(conn_id, False, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs), "readv")

    def writev_async(self, conn_id, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs):
        return self._started(*self._postv(conn_id, True, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs))

    def readv_async(self, conn_id, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs):
        return self._started(*self._postv(conn_id, False, mr_id_v, ptr_v, size_v, meta_blob_v, num_iovs))

    def advertise(self, *args, **kwargs):
        """advertise(mr_id, ptr, size) -> (ok, 64 bytes); the 0.1.1 form with a leading conn_id
        is accepted too. The bytes let a peer write or read [ptr, ptr+size) of region mr_id."""
        names = ("conn_id", "mr_id", "ptr", "size") if len(args) + len(kwargs) == 4 else ("mr_id", "ptr", "size")
        a = _bind("advertise", names, args, kwargs)
        engine = self._live()
        if "conn_id" in a:
            self._conn(a["conn_id"])
        mr = self._engine_mr(a["mr_id"])
        try:
            return True, _engine.prepare_fifo(engine, mr, _int(a["ptr"], "ptr"), _int(a["size"], "size"))
        except RuntimeError as e:
            _log.error("advertise: %s", e)
            return False, b""

    def advertisev(self, *args, **kwargs):
        """advertisev(mr_id_v, ptr_v, size_v, num_iovs) -> (ok, [64 bytes]); also with a leading conn_id."""
        five = len(args) + len(kwargs) == 5
        names = ("conn_id", "mr_id_v", "ptr_v", "size_v", "num_iovs") if five else ("mr_id_v", "ptr_v", "size_v", "num_iovs")
        a = _bind("advertisev", names, args, kwargs)
        n = _int(a["num_iovs"], "num_iovs")
        if not all(len(a[k]) == n for k in ("mr_id_v", "ptr_v", "size_v")):
            raise RuntimeError("All input vectors/lists must have length num_iovs")
        blobs = []
        for mr_id, ptr, size in zip(a["mr_id_v"], a["ptr_v"], a["size_v"]):
            ok, blob = self.advertise(mr_id, ptr, size) if "conn_id" not in a else self.advertise(a["conn_id"], mr_id, ptr, size)
            if not ok:
                return False, []
            blobs.append(blob)
        return True, blobs

    def poll_async(self, transfer_id):
        """(ok, is_done): (True, False) in progress, (True, True) done, (False, True) failed. An id
        is reported done once; polling it again raises, as does an id never issued here."""
        if self._closed:
            raise RuntimeError("Endpoint is closed")
        entry = self._xfers.get(transfer_id)
        if entry is None:
            raise RuntimeError(
                f"Unknown transfer_id {transfer_id}: not issued by this endpoint, or already reported done"
            )
        conn, ids, failure = entry
        # One poller at a time per endpoint: the engine forgets an id once it reports it, so a
        # second thread polling the same id meanwhile would read it as failed (or pop an empty list).
        with self._poll_lock:
            while ids:
                # 1 in progress, 0 done, or the failure's message.
                rc = _engine.poll_status(conn, ids[0])
                if rc == 1:
                    return True, False
                if type(rc) is str:
                    _log.error("transfer %d failed: %s", transfer_id, rc)
                    # Kept in the entry: the pieces still running are reported by later polls.
                    failure[0] = True
                ids.pop(0)
            if self._xfers.pop(transfer_id, None) is None:
                raise RuntimeError(f"Unknown transfer_id {transfer_id}: already reported done")
        return not failure[0], True

    # -- same host ------------------------------------------------------------------------------

    def connect_local(self, remote_gpu_bdf=None, remote_gpu_idx=None):
        """(ok, conn_id) of a connection to the endpoint of this host that serves GPU
        ``remote_gpu_bdf`` (another endpoint than this one; the newest if several). As in UCCL, it
        does not wait for the peer's accept_local."""
        self._live()
        gpu = remote_gpu_bdf if remote_gpu_bdf is not None else remote_gpu_idx
        if gpu is None:
            raise TypeError("connect_local() needs remote_gpu_bdf")
        gpu = _gpu_name(gpu)
        # A bus id names a GPU; a bare number is a GPU index; nothing (or UCCL's "0" for an
        # unknown GPU) names an endpoint without one.
        name = "host" if gpu in ("", "0") and remote_gpu_idx is None else (gpu if ":" in gpu else f"gpu{gpu}")
        for meta in _announced(name, self._announcements):
            ip, port, _ = self.parse_metadata(meta)
            ok, conn_id = self.connect(ip, gpu or "0", port)
            if ok:
                return ok, conn_id
        _log.error("connect_local: no live endpoint of this host serves GPU %r", gpu)
        return False, 0

    def accept_local(self):
        """Blocks until a peer connects: (ok, remote_gpu_bdf, conn_id). The peer's bus id is not
        part of the engine's handshake, so it is returned as ""."""
        ok, _, _, conn_id = self.accept()
        return ok, "", conn_id

    def _auto_region(self, ptr, size):
        """The registration of [ptr, ptr+size) the *_ipc calls use: made once, kept until close."""
        ptr, size = _int(ptr, "ptr"), _int(size, "size")
        with self._lock:
            region = self._containing(ptr, size)
            if region is not None:
                return region
        region = self._region_for(self._live(), ptr, size)
        if region is None:
            raise RuntimeError(f"cannot register [{ptr:#x}, +{size}) for a same-host transfer")
        return region

    def advertise_ipc(self, conn_id, ptr, size):
        """(ok, 104 bytes) letting a peer of this host write or read [ptr, ptr+size); the memory is
        registered (once) on the way. ``conn_id`` is not used, as in UCCL."""
        region = self._auto_region(ptr, size)
        try:
            fifo = _engine.prepare_fifo(self._engine, region.mr, ptr, size)
        except RuntimeError as e:
            _log.error("advertise_ipc: %s", e)
            return False, b""
        return True, fifo + _IPC_TAG + bytes(_IPC_LEN - _FIFO_LEN - len(_IPC_TAG))

    def advertisev_ipc(self, conn_id, ptr_v, size_v):
        if len(ptr_v) != len(size_v):
            raise RuntimeError("ptr_v and size_v must have the same length")
        out = []
        for ptr, size in zip(ptr_v, size_v):
            ok, blob = self.advertise_ipc(conn_id, ptr, size)
            if not ok:
                return False, []
            out.append(blob)
        return True, out

    def _ipc_post(self, conn_id, write, ptr_v, size_v, info_v):
        conn = self._conn(conn_id)
        if not len(ptr_v) == len(size_v) == len(info_v) or not ptr_v:
            raise RuntimeError("ptr_v, size_v and info_v must have the same, non-zero length")
        mrs, metas = [], []
        for ptr, size, info in zip(ptr_v, size_v, info_v):
            info = _blob(info, "info", _IPC_LEN)
            if info[_FIFO_LEN : _FIFO_LEN + len(_IPC_TAG)] != _IPC_TAG:
                raise RuntimeError("info was not made by advertise_ipc of uccl-tcpx")
            mrs.append(self._auto_region(ptr, size).mr)
            metas.append(_resized(info[:_FIFO_LEN], size))
        try:
            return conn, _engine.postv(conn, write, mrs, _ints(ptr_v, "ptr_v"), _ints(size_v, "size_v"), metas)
        except RuntimeError as e:
            _log.error("%s: %s", "write_ipc" if write else "read_ipc", e)
            return conn, None

    def write_ipc(self, conn_id, ptr, size, info):
        """Blocking write of [ptr, ptr+size) to the range advertise_ipc's 104-byte ``info`` names."""
        return self._finish(*self._ipc_post(conn_id, True, [ptr], [size], [info]), "write_ipc")

    def read_ipc(self, conn_id, ptr, size, info):
        return self._finish(*self._ipc_post(conn_id, False, [ptr], [size], [info]), "read_ipc")

    def write_ipc_async(self, conn_id, ptr, size, info):
        return self._started(*self._ipc_post(conn_id, True, [ptr], [size], [info]))

    def read_ipc_async(self, conn_id, ptr, size, info):
        return self._started(*self._ipc_post(conn_id, False, [ptr], [size], [info]))

    def writev_ipc(self, conn_id, ptr_v, size_v, info_v):
        return self._finish(*self._ipc_post(conn_id, True, ptr_v, size_v, info_v), "writev_ipc")

    def readv_ipc(self, conn_id, ptr_v, size_v, info_v):
        return self._finish(*self._ipc_post(conn_id, False, ptr_v, size_v, info_v), "readv_ipc")

    def writev_ipc_async(self, conn_id, ptr_v, size_v, info_v):
        return self._started(*self._ipc_post(conn_id, True, ptr_v, size_v, info_v))

    def readv_ipc_async(self, conn_id, ptr_v, size_v, info_v):
        return self._started(*self._ipc_post(conn_id, False, ptr_v, size_v, info_v))

    # -- two-sided (UCCL 0.1.1) -----------------------------------------------------------------

    def _send_start(self, conn_id, mr_id_v, ptr_v, size_v):
        conn = self._conn(conn_id)
        mrs = [self._engine_mr(m) for m in mr_id_v]
        try:
            return conn, _engine.send(conn, mrs, _ints(ptr_v, "data_ptr_v"), _ints(size_v, "size_v"))
        except RuntimeError as e:
            _log.error("send: %s", e)
            return conn, None

    def _recv_start(self, conn_id, mr_id_v, ptr_v, size_v):
        conn = self._conn(conn_id)
        mrs = [self._engine_mr(m) for m in mr_id_v]
        return self._recv_raw(conn, mrs, _ints(ptr_v, "data_ptr_v"), _ints(size_v, "size_v"))

    def _wait_all(self, conn, ids, what):
        if ids is None:
            return False
        ok = True
        for i, eid in enumerate(ids):
            try:
                rc, _, error = _engine.wait(conn, eid)
            except BaseException as e:
                self._keep_interrupted(conn, ids[i:], not ok, e)
                raise
            if rc < 0:
                _log.error("%s: %s", what, error)
                ok = False
        return ok

    def send(self, conn_id, mr_id, ptr, size):
        conn, eid = self._send_start(conn_id, [mr_id], [ptr], [size])
        return self._finish(conn, eid, "send")

    def recv(self, conn_id, mr_id, ptr, size):
        return self._wait_all(*self._recv_start(conn_id, [mr_id], [ptr], [size]), "recv")

    def send_async(self, conn_id, mr_id, ptr, size):
        return self._started(*self._send_start(conn_id, [mr_id], [ptr], [size]))

    def recv_async(self, conn_id, mr_id, ptr, size):
        conn, ids = self._recv_start(conn_id, [mr_id], [ptr], [size])
        return (False, 0) if ids is None else (True, self._track(conn, ids))

    def _vector_args(self, mr_id_v, data_ptr_v, size_v, num_iovs):
        n = _int(num_iovs, "num_iovs")
        if not all(len(v) == n for v in (mr_id_v, data_ptr_v, size_v)) or n == 0:
            raise RuntimeError("All input vectors/lists must have length num_iovs")

    def sendv(self, conn_id, mr_id_v, data_ptr_v, size_v, num_iovs):
        self._vector_args(mr_id_v, data_ptr_v, size_v, num_iovs)
        return self._finish(*self._send_start(conn_id, mr_id_v, data_ptr_v, size_v), "sendv")

    def recvv(self, conn_id, mr_id_v, data_ptr_v, size_v, num_iovs):
        self._vector_args(mr_id_v, data_ptr_v, size_v, num_iovs)
        return self._wait_all(*self._recv_start(conn_id, mr_id_v, data_ptr_v, size_v), "recvv")

    def sendv_async(self, conn_id, mr_id_v, data_ptr_v, size_v, num_iovs):
        self._vector_args(mr_id_v, data_ptr_v, size_v, num_iovs)
        return self._started(*self._send_start(conn_id, mr_id_v, data_ptr_v, size_v))

    def recvv_async(self, conn_id, mr_id_v, data_ptr_v, size_v, num_iovs):
        self._vector_args(mr_id_v, data_ptr_v, size_v, num_iovs)
        conn, ids = self._recv_start(conn_id, mr_id_v, data_ptr_v, size_v)
        return (False, 0) if ids is None else (True, self._track(conn, ids))

    def send_ipc(self, conn_id, ptr, size):
        """UCCL 0.1.1: a blocking send of [ptr, ptr+size), registered on the way."""
        mr = self._auto_region(ptr, size).mr
        conn = self._conn(conn_id)
        try:
            eid = _engine.send(conn, [mr], [ptr], [size])
        except RuntimeError as e:
            _log.error("send_ipc: %s", e)
            return False
        return self._finish(conn, eid, "send_ipc")

    def recv_ipc(self, conn_id, ptr, size):
        mr = self._auto_region(ptr, size).mr
        conn = self._conn(conn_id)
        return self._wait_all(*self._recv_raw(conn, [mr], [ptr], [size]), "recv_ipc")

    def send_ipc_async(self, conn_id, ptr, size):
        mr = self._auto_region(ptr, size).mr
        conn = self._conn(conn_id)
        try:
            return True, self._track(conn, [_engine.send(conn, [mr], [ptr], [size])])
        except RuntimeError as e:
            _log.error("send_ipc_async: %s", e)
            return False, 0

    def recv_ipc_async(self, conn_id, ptr, size):
        mr = self._auto_region(ptr, size).mr
        conn, ids = self._recv_raw(self._conn(conn_id), [mr], [ptr], [size])
        return (False, 0) if ids is None else (True, self._track(conn, ids))

    def _recv_raw(self, conn, mrs, ptrs, sizes):
        ids = []
        try:
            for mr, ptr, size in zip(mrs, ptrs, sizes):
                ids.append(_engine.recv(conn, mr, ptr, size))
        except RuntimeError as e:
            _log.error("recv: %s", e)
            return conn, None
        return conn, ids


def _bind(method, names, args, kwargs):
    if len(args) > len(names):
        raise TypeError(f"{method}() takes {len(names)} arguments, got {len(args)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names or key in bound:
            raise TypeError(f"{method}() got an unexpected or repeated argument {key!r}")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{method}() missing argument(s): {', '.join(missing)}")
    return bound
