"""CUDA: the driver, the GPUs, and peer access between them."""

import ctypes

from .report import FAIL, OK, WARN


def check_driver(report, host):
    text = host.read("/proc/driver/nvidia/version")
    if not text:
        report.add(
            "cuda",
            "driver",
            FAIL,
            "no NVIDIA driver (/proc/driver/nvidia/version)",
            "install the NVIDIA driver (A3 images and GKE's GPU nodes carry it)",
        )
        return False
    words = text.splitlines()[0].split()
    version = next((w for w in words if w[:1].isdigit() and "." in w), "unknown")
    report.add("cuda", "driver", OK, f"NVIDIA kernel module {version}")
    return True


def check_devices(report, host, gpus):
    if not gpus:
        report.add("cuda", "devices", FAIL, "no NVIDIA GPU on the PCI bus", "use a GPU VM (A3: a3-highgpu-8g)")
        return
    report.add("cuda", "devices", OK, f"{len(gpus)} GPUs: {', '.join(gpus)}")


def check_peer_access(report):
    """cuDeviceCanAccessPeer for every ordered pair (live machine only)."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        report.add(
            "cuda", "CUDA API", FAIL, f"libcuda.so.1 does not load: {e}", "install the NVIDIA driver's user libraries"
        )
        return
    if cu.cuInit(0) != 0:
        report.add(
            "cuda", "CUDA API", FAIL, "cuInit fails", "check `nvidia-smi`; a driver/module mismatch needs a reboot"
        )
        return
    n = ctypes.c_int(0)
    cu.cuDeviceGetCount(ctypes.byref(n))
    missing = []
    for a in range(n.value):
        for b in range(n.value):
            if a != b:
                ok = ctypes.c_int(0)
                cu.cuDeviceCanAccessPeer(ctypes.byref(ok), a, b)
                if not ok.value:
                    missing.append(f"{a}->{b}")
    if missing:
        report.add(
            "cuda",
            "peer access",
            WARN,
            f"{n.value} devices; no peer access {', '.join(missing[:8])}",
            "same-host GPU copies go through host memory between these; check `nvidia-smi topo -m`",
        )
    else:
        report.add("cuda", "peer access", OK, f"{n.value} devices, every pair has peer access")
