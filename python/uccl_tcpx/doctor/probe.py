"""Opens an ncclNet v7 plugin in a process of its own and prints what it is, as JSON:

    python probe.py PLUGIN [--init]

`name` of its ncclNetPlugin_v7 table; with --init, `init`'s result, then each device's
properties. A process of its own because TCPX ends the process on some errors and may be
initialised once per process only. Runs as a plain file, without the package."""

import ctypes
import json
import os
import re
import sys

# ncclNet_v7_t: name, then function pointers (NVIDIA/nccl src/include/nccl_net.h at v2.19.3-1).
INIT, DEVICES, GET_PROPERTIES = 1, 2, 3
LOGGER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
WARN_LEVEL = 2


class Properties(ctypes.Structure):
    """ncclNetProperties_v7_t, 56 bytes."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("pciPath", ctypes.c_char_p),
        ("guid", ctypes.c_uint64),
        ("ptrSupport", ctypes.c_int),
        ("speed", ctypes.c_int),
        ("port", ctypes.c_int),
        ("latency", ctypes.c_float),
        ("maxComms", ctypes.c_int),
        ("maxRecvs", ctypes.c_int),
        ("netDeviceType", ctypes.c_int),
        ("netDeviceVersion", ctypes.c_int),
    ]


def version_in(path):
    """The version TCPX logs at init ("NET/GPUDirectTCPX ver. X", src/net_tcpx.cc), read from the
    file, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    m = re.search(rb"NET/[A-Za-z0-9_]+ ver\. ([0-9][0-9A-Za-z._-]*)", data)
    return m.group(1).decode() if m else None


def main():
    path = sys.argv[1]
    out = {"path": path, "version": version_in(path)}
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as e:
        out["load_error"] = str(e)
        print(json.dumps(out))
        return
    try:
        table = ctypes.cast(lib.ncclNetPlugin_v7, ctypes.POINTER(ctypes.c_void_p * 19)).contents
    except AttributeError:
        out["symbol"] = False
        print(json.dumps(out))
        return
    out["symbol"] = True
    out["name"] = ctypes.cast(table[0], ctypes.c_char_p).value.decode(errors="replace") if table[0] else None
    if "--init" in sys.argv[2:]:
        warnings = []

        def log(level, flags, where, line, fmt):
            if level <= WARN_LEVEL and fmt:
                warnings.append(fmt.decode(errors="replace"))

        logger = LOGGER(log)
        init = ctypes.CFUNCTYPE(ctypes.c_int, LOGGER)(table[INIT])
        out["init"] = init(logger)
        out["warnings"] = warnings
        if out["init"] == 0:
            n = ctypes.c_int(0)
            ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int))(table[DEVICES])(ctypes.byref(n))
            get = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Properties))(table[GET_PROPERTIES])
            devices = []
            for dev in range(n.value):
                p = Properties()
                if get(dev, ctypes.byref(p)) != 0:
                    continue
                devices.append(
                    {
                        "name": (p.name or b"").decode(errors="replace"),
                        "pci_path": p.pciPath.decode(errors="replace") if p.pciPath else None,
                        "cuda": bool(p.ptrSupport & 2),  # NCCL_PTR_CUDA
                        "speed_mbps": p.speed,
                    }
                )
            out["devices"] = devices
    print(json.dumps(out), flush=True)
    # Without the plugin's teardown, which may wait on threads of a half-set-up plugin.
    os._exit(0)


if __name__ == "__main__":
    main()
