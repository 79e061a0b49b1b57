"""The machine as the doctor reads it: files under a root folder (`--root`, default /), so that
tests can hand it a fake sysfs, procfs and library tree."""

import os
import stat

NVIDIA = "0x10de"


class Host:
    def __init__(self, root="/"):
        self.root = os.path.abspath(root)

    @property
    def live(self):
        """Whether this is the running machine (live probes such as the CUDA API make sense)."""
        return self.root == "/"

    def path(self, p):
        return os.path.join(self.root, p.lstrip("/"))

    def unrooted(self, real):
        """A path under the root as the machine itself names it."""
        if self.root == "/":
            return real
        rel = os.path.relpath(real, self.root)
        return "/" + rel if not rel.startswith("..") else real

    def read(self, p):
        try:
            with open(self.path(p), encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return None

    def exists(self, p):
        return os.path.exists(self.path(p))

    def is_socket(self, p):
        try:
            return stat.S_ISSOCK(os.stat(self.path(p)).st_mode)
        except OSError:
            return False

    def listdir(self, p):
        try:
            return sorted(os.listdir(self.path(p)))
        except OSError:
            return []

    def realpath(self, p):
        """realpath of p, as the machine names it (links inside the tree resolved inside it)."""
        return self.unrooted(os.path.realpath(self.path(p)))

    def gpus(self):
        """{bus id: sysfs device path} of the NVIDIA display and 3D controllers on the PCI bus."""
        out = {}
        for bdf in self.listdir("/sys/bus/pci/devices"):
            dev = f"/sys/bus/pci/devices/{bdf}"
            cls = self.read(f"{dev}/class") or ""
            if self.read(f"{dev}/vendor") == NVIDIA and cls.startswith(("0x0300", "0x0302")):
                out[bdf.lower()] = self.realpath(dev)
        return out

    def nics(self):
        """{interface: sysfs device path or None} of /sys/class/net."""
        out = {}
        for name in self.listdir("/sys/class/net"):
            dev = f"/sys/class/net/{name}/device"
            out[name] = self.realpath(dev) if self.exists(dev) else None
        return out

    def nic_driver(self, name):
        link = self.path(f"/sys/class/net/{name}/device/driver")
        return os.path.basename(os.path.realpath(link)) if os.path.exists(link) else None

    def sysctl(self, name):
        return self.read("/proc/sys/" + name.replace(".", "/"))


def pci_root(path):
    """The PCI root complex a sysfs device path lies under (pci0000:01)."""
    return next((c for c in (path or "").split("/") if c.startswith("pci")), None)


def common_components(a, b):
    n = 0
    for x, y in zip([c for c in a.split("/") if c], [c for c in b.split("/") if c]):
        if x != y:
            break
        n += 1
    return n


def closest(devices, gpu_path):
    """The devices the engine pairs with the GPU at gpu_path: among those that take CUDA pointers
    and sit under the GPU's PCI root, the ones sharing the longest path with it (the engine's
    rule, src/transport/plugin/devices.rs `closest_devices`). devices: [(name, pci path, cuda)]."""
    root = pci_root(gpu_path)
    scored = [
        (common_components(path, gpu_path), name)
        for name, path, cuda in devices
        if cuda and path and root and pci_root(path) == root
    ]
    if not scored:
        return []
    best = max(s for s, _ in scored)
    return [name for s, name in scored if s == best]
