"""uccl-tcpx-doctor on fake machines: an A3-like sysfs/procfs/library tree (the fake NIC,
libfake_tcpx.so, standing in for Google's plugin) that passes, one tree per missing piece that
fails with that piece's fix, the same for an A3-Mega-like tree (the fake in its TCPXO mode), and
this machine itself."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A3 High's shape, two PCI roots of it: each root has a switch with two GPUs and their NIC.
GPUS = {
    "0000:04:00.0": "/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:04:00.0",
    "0000:05:00.0": "/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:05:00.0",
    "0000:0a:00.0": "/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0a:00.0",
    "0000:0b:00.0": "/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0b:00.0",
}
NICS = {
    "eth0": ("/sys/devices/pci0000:00/0000:00:04.0", []),
    "eth1": ("/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:06:00.0", ["0000:04:00.0", "0000:05:00.0"]),
    "eth2": ("/sys/devices/pci0000:07/0000:07:00.0/0000:08:00.0/0000:0c:00.0", ["0000:0a:00.0", "0000:0b:00.0"]),
}
SYSCTLS = {
    "net/core/optmem_max": "131072",
    "net/ipv4/tcp_mtu_probing": "0",
    "net/ipv4/tcp_slow_start_after_idle": "0",
    "net/ipv4/tcp_no_metrics_save": "1",
    "net/core/somaxconn": "4096",
    "net/ipv4/tcp_max_syn_backlog": "4096",
}
RXDM = "/run/tcpx"
H100 = "0x2330"


def fake_plugin():
    """libfake_tcpx.so: UCCL_TCPX_FAKE_PLUGIN, else the repository's build (scripts/python_tests.sh
    builds it)."""
    path = os.environ.get("UCCL_TCPX_FAKE_PLUGIN") or os.path.join(REPO, "target", "debug", "libfake_tcpx.so")
    assert os.path.isfile(path), f"{path} is missing: cargo build -p fake-tcpx (or set UCCL_TCPX_FAKE_PLUGIN)"
    return path


class Tree:
    """A fake machine under a short temporary root (unix socket paths are limited to 108 bytes)."""

    def __init__(self, nics=NICS, gpus=GPUS, tcpx=True):
        self.root = tempfile.mkdtemp(prefix="dr", dir="/tmp")
        self.gpus = gpus
        self.listeners = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("UCCL_TCPX_", "NCCL_", "FAKE_TCPX_"))}
        # The fake's devices are the tree's NICs, at the same PCI paths.
        self.env["FAKE_TCPX_TOPOLOGY"] = "; ".join(
            f"{name} {path}" + (f" {','.join(gpus)}" if gpus else "") for name, (path, gpus) in nics.items()
        )
        self.env["FAKE_TCPX_SOCKET_DELAY_MS"] = "0"
        self.write(
            "/proc/driver/nvidia/version",
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07  Fri May 31 2024\n",
        )
        self.write("/proc/sys/kernel/osrelease", "6.1.85+\n")
        for name, value in SYSCTLS.items():
            self.write(f"/proc/sys/{name}", value + "\n")
        for bdf, path in gpus.items():
            self.add_gpu(bdf, path)
        os.makedirs(self.path("/sys/bus/pci/drivers/gve"), exist_ok=True)
        for name, (path, _) in nics.items():
            self.write(f"{path}/vendor", "0x1ae0\n")
            self.link(f"{path}/driver", "/sys/bus/pci/drivers/gve")
            self.link(f"/sys/class/net/{name}/device", path)
        if tcpx:
            self.install_plugin("/usr/local/nvidia/lib64")
            self.env["LD_LIBRARY_PATH"] = "/usr/local/nvidia/lib64"
            self.serve_rxdm(RXDM)

    def path(self, p):
        return os.path.join(self.root, p.lstrip("/"))

    def write(self, p, text):
        os.makedirs(os.path.dirname(self.path(p)), exist_ok=True)
        with open(self.path(p), "w") as f:
            f.write(text)

    def link(self, p, target):
        """A link inside the tree, relative, as sysfs makes them."""
        os.makedirs(os.path.dirname(self.path(p)), exist_ok=True)
        os.makedirs(self.path(target), exist_ok=True)
        os.symlink(os.path.relpath(self.path(target), os.path.dirname(self.path(p))), self.path(p))

    def add_gpu(self, bdf, path, device=H100):
        """An NVIDIA 3D controller (an H100 unless `device` says otherwise) at sysfs `path`."""
        self.write(f"{path}/vendor", "0x10de\n")
        self.write(f"{path}/device", device + "\n")
        self.write(f"{path}/class", "0x030200\n")
        self.link(f"/sys/bus/pci/devices/{bdf}", path)

    def install_plugin(self, folder, source=None, name="libnccl-net.so"):
        os.makedirs(self.path(folder), exist_ok=True)
        shutil.copy(source or fake_plugin(), self.path(f"{folder}/{name}"))

    def remove(self, p):
        target = self.path(p)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)

    def socket_at(self, p, listen=True):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path(p))
        if listen:
            s.listen(16)
            self.listeners.append(s)
        else:
            s.close()  # the file stays, nothing answers: a stopped RxDM

    def serve_rxdm(self, folder):
        """RxDM's sockets (google/tcpgpudmarxd), listening."""
        os.makedirs(self.path(folder), exist_ok=True)
        self.socket_at(f"{folder}/rx_rule_manager")
        for bdf in self.gpus:
            self.socket_at(f"{folder}/get_gpu_fd_{bdf}")
            self.socket_at(f"{folder}/get_gpu_metadata_{bdf}")

    def stop_rxdm(self, folder=RXDM):
        for s in self.listeners:
            s.close()
        self.listeners = []
        shutil.rmtree(self.path(folder))

    def close(self):
        for s in self.listeners:
            s.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def tree():
    t = Tree()
    yield t
    t.close()


def doctor_report(args, env):
    """(exit status, the JSON report) of one doctor run."""
    done = subprocess.run(
        [sys.executable, "-m", "uccl_tcpx.doctor", "--json", "--no-nixl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.startswith("{"), f"no JSON (exit {done.returncode}): {done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout)
    assert report["exit"] == done.returncode, report
    return done.returncode, report


def doctor(args, env):
    code, report = doctor_report(args, env)
    return code, {f"{c['section']}/{c['name']}": c for c in report["checks"]}


def run_tree(t, *extra):
    return doctor(["--root", t.root, "--transport", "tcpx", *extra], t.env)


def failed(checks):
    return sorted(k for k, c in checks.items() if c["status"] == "fail")


def test_a3_like_tree_passes(tree):
    code, checks = run_tree(tree)
    assert failed(checks) == [], checks
    assert code == 0
    assert checks["tcpx/plugin"]["data"]["name"] == "FakeDevmemTCPX_v7"
    names = [d["name"] for d in checks["tcpx/devices"]["data"]["devices"]]
    assert names == ["eth0", "eth1", "eth2"], names
    # Each GPU pairs with the NIC behind its own switch, as the engine pairs them.
    assert checks["tcpx/pairing"]["data"]["pairs"] == {
        "0000:04:00.0": ["eth1"],
        "0000:05:00.0": ["eth1"],
        "0000:0a:00.0": ["eth2"],
        "0000:0b:00.0": ["eth2"],
    }
    assert checks["tcpx/rxdm"]["status"] == "ok"
    assert checks["tcpx/kernel"]["status"] == "ok"
    assert checks["engine/transport"]["detail"].startswith("tcpx resolves to tcpx")
    # Every TCPX requirement says where it comes from upstream.
    for key, c in checks.items():
        if key.startswith("tcpx/") and key != "tcpx/environment":
            assert c["source"].startswith(("google/", "GoogleCloudPlatform/")), (key, c["source"])
    # The kernel check looks at the NICs the engine uses, not at eth0.
    assert "eth1, eth2" in checks["tcpx/kernel"]["detail"] and "eth0" not in checks["tcpx/kernel"]["detail"]
    # Nothing of TCPXO's here: its checks are for A3-Mega-like hosts.
    assert not any(k.startswith("tcpxo/") for k in checks)


def only_failure(checks, key):
    assert failed(checks) == [key], {k: checks[k]["detail"] for k in failed(checks)}
    return checks[key]


def test_no_plugin(tree):
    tree.remove("/usr/local/nvidia/lib64/libnccl-net.so")
    code, checks = run_tree(tree)
    assert code == 1
    # The engine, asked for tcpx, fails as well, and says why.
    assert set(failed(checks)) == {"tcpx/plugin", "engine/transport"}, failed(checks)
    assert "install Google's plugin" in checks["tcpx/plugin"]["fix"]
    assert "LD_LIBRARY_PATH" in checks["tcpx/plugin"]["fix"]


def test_plugin_off_the_library_path(tree):
    tree.remove("/usr/local/nvidia/lib64/libnccl-net.so")
    tree.install_plugin("/var/lib/tcpx/lib64")
    code, checks = run_tree(tree)
    assert code == 1
    assert checks["tcpx/plugin"]["status"] == "fail"
    assert checks["tcpx/plugin"]["fix"].startswith("export LD_LIBRARY_PATH=/var/lib/tcpx/lib64:")


def test_a_library_that_is_no_net_plugin(tree):
    import uccl_tcpx

    tree.install_plugin("/usr/local/nvidia/lib64", source=uccl_tcpx.lib_path())
    code, checks = run_tree(tree)
    assert code == 1
    assert "has no ncclNetPlugin_v7" in checks["tcpx/plugin"]["detail"]


def test_no_rxdm(tree):
    tree.stop_rxdm()
    code, checks = run_tree(tree)
    assert code == 1
    c = only_failure(checks, "tcpx/rxdm")
    assert "rx_rule_manager" in c["detail"] and "--uds_path /run/tcpx" in c["fix"]
    assert c["source"].startswith("google/nccl-plugin-gpudirecttcpx")


def test_rxdm_stopped_leaves_its_sockets(tree):
    tree.stop_rxdm()
    os.makedirs(tree.path(RXDM))
    for name in ["rx_rule_manager"] + [f"get_gpu_{k}_{b}" for b in GPUS for k in ("fd", "metadata")]:
        tree.socket_at(f"{RXDM}/{name}", listen=False)
    code, checks = run_tree(tree)
    assert code == 1
    c = only_failure(checks, "tcpx/rxdm")
    assert "nothing answers" in c["detail"] and c["fix"].startswith("restart RxDM")


def test_rxdm_prefix_points_elsewhere(tree):
    tree.env["NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX"] = "/tmp"
    code, checks = run_tree(tree)
    assert code == 1
    c = only_failure(checks, "tcpx/rxdm")
    assert c["fix"].startswith("export NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX=/run/tcpx")


def test_rxdm_missing_one_gpu(tree):
    os.unlink(tree.path(f"{RXDM}/get_gpu_fd_0000:0b:00.0"))
    code, checks = run_tree(tree)
    assert code == 1
    assert "get_gpu_fd_0000:0b:00.0" in only_failure(checks, "tcpx/rxdm")["detail"]


def test_optmem_max_too_small(tree):
    tree.write("/proc/sys/net/core/optmem_max", "20480\n")
    code, checks = run_tree(tree)
    assert code == 1
    c = only_failure(checks, "tcpx/net.core.optmem_max")
    assert c["fix"] == "sysctl -w net.core.optmem_max=131072"
    assert "optmem-max-ds.yaml" in c["source"]


def test_untuned_tcp_settings_warn(tree):
    tree.write("/proc/sys/net/ipv4/tcp_mtu_probing", "1\n")
    code, checks = run_tree(tree)
    assert code == 0
    assert checks["tcpx/net.ipv4.tcp_mtu_probing"]["status"] == "warn"
    assert checks["tcpx/net.ipv4.tcp_mtu_probing"]["fix"] == "sysctl -w net.ipv4.tcp_mtu_probing=0"


def test_no_nvidia_driver(tree):
    tree.remove("/proc/driver/nvidia")
    code, checks = run_tree(tree)
    assert code == 1
    assert "install the NVIDIA driver" in only_failure(checks, "cuda/driver")["fix"]


def test_a_gpu_without_its_nic():
    # The plugin lists no NIC under the second PCI root: its GPUs have no devmem path.
    nics = {k: v for k, v in NICS.items() if k != "eth2"}
    t = Tree(nics)
    try:
        code, checks = run_tree(t)
    finally:
        t.close()
    assert code == 1
    c = only_failure(checks, "tcpx/pairing")
    assert (
        "0000:0a:00.0" in c["detail"]
        and "0000:0b:00.0" in c["detail"]
        and "0000:04:00.0" not in c["detail"].split("(")[0]
    )


def test_flow_steering_strategy_overridden(tree):
    tree.env["NCCL_GPUDIRECTTCPX_FLOW_STEERING_STRATEGY"] = "1"
    code, checks = run_tree(tree)
    assert code == 1
    assert only_failure(checks, "tcpx/flow steering")["fix"] == "unset NCCL_GPUDIRECTTCPX_FLOW_STEERING_STRATEGY"


def test_ifname_naming_no_interface(tree):
    tree.env["NCCL_GPUDIRECTTCPX_SOCKET_IFNAME"] = "enp0s1"
    code, checks = run_tree(tree)
    assert code == 1
    assert "enp0s1" in checks["tcpx/NCCL_GPUDIRECTTCPX_SOCKET_IFNAME"]["detail"]


def test_user_values_are_shown_against_the_engines(tree):
    tree.env["NCCL_NSOCKS_PERTHREAD"] = "4"
    code, checks = run_tree(tree)
    assert code == 0
    assert "NCCL_NSOCKS_PERTHREAD=4 (yours; engine's 2)" in checks["tcpx/environment"]["detail"]


def test_retired_and_unknown_settings_warn(tree):
    tree.env["UCCL_TCPX_TRACE_FLOW"] = "1"
    tree.env["UCCL_TCPX_NUM_CHANELS"] = "4"
    code, checks = run_tree(tree)
    assert code == 0
    assert "UCCL_TCPX_TRACE_FLOW" in checks["engine/retired settings"]["detail"]
    assert "UCCL_TCPX_NUM_CHANELS" in checks["engine/unknown settings"]["detail"]


def test_auth_key_open_to_others(tree):
    key = tree.path("/key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o644)
    tree.env["UCCL_TCPX_AUTH_KEY_FILE"] = key
    code, checks = run_tree(tree)
    assert code == 1
    # The engine refuses such a key too: the doctor's verdict is the engine's.
    assert checks["engine/auth key"]["fix"] == f"chmod 600 {key}"
    os.chmod(key, 0o600)
    code, checks = run_tree(tree)
    assert code == 0 and checks["engine/auth key"]["status"] == "ok"


def test_a_tcpxo_plugin_asked_for_as_tcpx(tree):
    # TCPXO's plugin where TCPX's is looked for: named, never initialised (its failed init ends
    # the process), with the setting that selects it.
    tree.env["FAKE_TCPX_PLUGIN_KIND"] = "tcpxo"
    code, checks = run_tree(tree)
    assert code == 1
    c = checks["tcpx/plugin"]
    assert c["status"] == "fail" and "is GPUDirect-TCPXO's plugin ('FakeFasTrak'" in c["detail"], c
    assert c["fix"].startswith("export UCCL_TCPX_TRANSPORT=tcpxo")
    assert "tcpx/devices" not in checks


def mega_shape():
    """A3-Mega's shape (a3-megagpu-8g): eight H100s on four PCI roots, each GPU with a NIC of its
    own behind the same switch, eth0 for control (GKE's names). ({bdf: path}, NICS-like)."""
    gpus, nics = {}, {"eth0": ("/sys/devices/pci0000:00/0000:00:0c.0", [])}
    for k in range(8):
        root = 0x10 * (k // 2 + 1)
        switch = f"/sys/devices/pci0000:{root:02x}/0000:{root:02x}:00.0/0000:{root + 1:02x}:00.0"
        gpu = f"0000:{root + 2 + k % 2:02x}:00.0"
        gpus[gpu] = f"{switch}/{gpu}"
        nics[f"eth{k + 1}"] = (f"{switch}/0000:{root + 4 + k % 2:02x}:00.0", [gpu])
    return gpus, nics


MEGA_GPUS, MEGA_NICS = mega_shape()
# Where Google's TCPXO installer puts the plugin, renamed (tcpxo_scripts/container_entry.sh).
TCPXO_LIB = "/var/lib/tcpxo/lib64"
TCPXO_PLUGIN = f"{TCPXO_LIB}/libnccl-net_internal.so"
IMPORT_HELPER = "/dev/dmabuf_import_helper"
LLCM_DIR = "/dev/aperture_devices"
# RxDM's sockets as files (FILE_BASED_UDS_PATH_PREFIX): abstract ones are the machine's, not the tree's.
RXDM_UDS = "/run/rxdm"


class MegaTree(Tree):
    """An A3-Mega-like machine set up as docs/A3.md says: TCPXO's plugin where Google's installer
    puts it (the fake in its TCPXO mode), RxDM's import helper, LLCM devices bind-mounted under
    /dev/aperture_devices, and the settings that select TCPXO."""

    def __init__(self):
        super().__init__(MEGA_NICS, MEGA_GPUS, tcpx=False)
        self.install_plugin(TCPXO_LIB, name="libnccl-net_internal.so")
        self.env["LD_LIBRARY_PATH"] = TCPXO_LIB
        self.env["FAKE_TCPX_PLUGIN_KIND"] = "tcpxo"
        self.write(IMPORT_HELPER, "")
        os.makedirs(self.path(RXDM_UDS))
        self.socket_at(f"{RXDM_UDS}/rxdm_uds_nic_mapping")
        self.env["FILE_BASED_UDS_PATH_PREFIX"] = RXDM_UDS
        for k in range(8):
            bdf = f"0000:{0x10 * (k // 2 + 1) + 6 + k % 2:02x}:00.0"
            self.write(f"{LLCM_DIR}/{bdf}/vendor", "0x1ae0\n")
            self.write(f"{LLCM_DIR}/{bdf}/device", "0x0084\n")
        self.env["UCCL_TCPX_TRANSPORT"] = "tcpxo"
        self.env["UCCL_TCPX_GPU"] = "0"
        self.env["NCCL_FASTRAK_IFNAME"] = ",".join(f"eth{k}" for k in range(1, 9))
        self.env["NCCL_FASTRAK_CTRL_DEV"] = "eth0"


@pytest.fixture
def mega():
    t = MegaTree()
    yield t
    t.close()


def run_mega(t, *extra):
    """(exit status, checks, the host's one line). --gpu -2: the doctor's engines take no GPU,
    whatever UCCL_TCPX_GPU says (this machine may have none; the fake stands in for one)."""
    code, report = doctor_report(["--root", t.root, "--gpu", "-2", *extra], t.env)
    return code, {f"{c['section']}/{c['name']}": c for c in report["checks"]}, report["runs"]


def predates_tcpxo(checks):
    """Whether the installed engine library was built before TCPXO: it refuses
    UCCL_TCPX_TRANSPORT=tcpxo, and the doctor says to upgrade."""
    c = checks["engine/transport"]
    return c["status"] == "fail" and "invalid" in c["detail"] and c["fix"].startswith("install a uccl-tcpx that knows")


def mega_failures(checks):
    """The failed checks, less engine/transport where the engine library predates TCPXO."""
    return [k for k in failed(checks) if not (k == "engine/transport" and predates_tcpxo(checks))]


MEGA_CHECKS = [
    "tcpxo/control nic",
    "tcpxo/data nics",
    "tcpxo/engine gpu",
    "tcpxo/gpus",
    "tcpxo/import helper",
    "tcpxo/llcm",
    "tcpxo/plugin",
    "tcpxo/rxdm",
    "tcpxo/transport",
]


def test_a3_mega_like_tree_passes_the_tcpxo_checks(mega):
    code, checks, runs = run_mega(mega)
    assert sorted(k for k in checks if k.startswith("tcpxo/")) == MEGA_CHECKS
    assert [k for k in MEGA_CHECKS if checks[k]["status"] != "ok"] == [], {k: checks[k] for k in MEGA_CHECKS}
    # TCPX's checks would judge another plugin: not run on A3-Mega unless tcpx is asked for.
    assert not any(k.startswith("tcpx/") for k in checks)
    assert checks["tcpxo/plugin"]["data"] == {"path": TCPXO_PLUGIN, "name": "FakeFasTrak"}
    assert len(checks["tcpxo/llcm"]["data"]["devices"]) == 8
    assert "the engine's" in checks["tcpxo/llcm"]["detail"]
    assert checks["tcpxo/data nics"]["data"]["nics"] == [f"eth{k}" for k in range(1, 9)]
    # Every TCPXO requirement says where it comes from upstream (the last two are the engine's).
    for key in MEGA_CHECKS:
        src = checks[key]["source"]
        assert src.startswith(("google/", "GoogleCloudPlatform/", "the engine:")), (key, src)
        assert "the engine:" not in src or key in ("tcpxo/engine gpu", "tcpxo/transport"), (key, src)
    if predates_tcpxo(checks):
        # An engine library built before TCPXO (the installed wheel lags the source): the doctor
        # says so, and nothing else fails.
        assert code == 1 and failed(checks) == ["engine/transport"], failed(checks)
    else:
        assert code == 0 and failed(checks) == [], failed(checks)
        assert checks["engine/transport"]["detail"].startswith("tcpxo resolves to tcpxo"), checks["engine/transport"]
        assert runs.startswith("the TCPXO net plugin, but no GPU an engine can serve"), runs


def test_a3_mega_without_the_plugin(mega):
    mega.remove(TCPXO_PLUGIN)
    code, checks, runs = run_mega(mega)
    assert code == 1
    assert set(failed(checks)) == {"tcpxo/plugin", "engine/transport"}, failed(checks)
    c = checks["tcpxo/plugin"]
    assert c["detail"].startswith("no TCPXO plugin") and "nccl-tcpxo-installer.yaml" in c["fix"], c
    assert "not TCPXO (see tcpxo: plugin)" in runs, runs


def test_a3_mega_plugin_off_the_library_path(mega):
    del mega.env["LD_LIBRARY_PATH"]
    code, checks, _ = run_mega(mega)
    assert code == 1
    c = checks["tcpxo/plugin"]
    assert c["status"] == "fail" and c["fix"].startswith(f"export LD_LIBRARY_PATH={TCPXO_LIB}:"), c


def test_a3_mega_without_the_import_helper(mega):
    mega.remove(IMPORT_HELPER)
    code, checks, runs = run_mega(mega)
    assert code == 1
    assert mega_failures(checks) == ["tcpxo/import helper"], mega_failures(checks)
    c = checks["tcpxo/import helper"]
    assert "modprobe import-helper" in c["fix"] and IMPORT_HELPER in c["fix"]
    assert c["source"].startswith("google/nccl-plugin-gpudirect-tcpxo: dmabuf_bridge/dmabuf_importer.c")
    # An engine may be made (the fake has no RxDM), but transfers would fail: the line says so.
    assert "(see tcpxo: import helper)" in runs and not runs.startswith("the TCPXO net plugin"), runs


def test_a3_mega_without_rxdm(mega):
    mega.stop_rxdm(RXDM_UDS)
    code, checks, _ = run_mega(mega)
    assert code == 1
    assert mega_failures(checks) == ["tcpxo/rxdm"], mega_failures(checks)
    c = checks["tcpxo/rxdm"]
    assert f"{RXDM_UDS}/rxdm_uds_nic_mapping" in c["detail"] and "ends the process" in c["detail"]
    assert "entrypoint_rxdm_container.sh" in c["fix"] and "uds_helpers.cc" in c["source"]


def test_a3_mega_with_a_gpu_that_is_no_h100(mega):
    a100 = next(iter(MEGA_GPUS.values()))
    mega.write(f"{a100}/device", "0x20b2\n")  # an A100 80GB
    code, checks, _ = run_mega(mega)
    assert code == 1
    assert mega_failures(checks) == ["tcpxo/gpus"], mega_failures(checks)
    c = checks["tcpxo/gpus"]
    assert "(0x20b2)" in c["detail"] and "ends the process" in c["detail"]
    assert "a3-megagpu-8g" in c["fix"] and "kH100DeviceId" in c["source"]


def test_a3_mega_with_more_than_8_gpus_visible(mega):
    mega.add_gpu("0000:52:00.0", "/sys/devices/pci0000:50/0000:50:00.0/0000:51:00.0/0000:52:00.0")
    code, checks, _ = run_mega(mega)
    c = checks["tcpxo/gpus"]
    assert c["status"] == "fail" and "9 GPUs visible" in c["detail"] and "CUDA_VISIBLE_DEVICES" in c["fix"], c
    mega.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(8))
    code, checks, _ = run_mega(mega)
    assert checks["tcpxo/gpus"]["status"] == "ok", checks["tcpxo/gpus"]


def test_a3_mega_without_uccl_tcpx_transport(mega):
    # auto never loads TCPXO: the doctor judges auto (sockets, which work), says TCPXO's checks
    # pass, and names the setting; nothing fails.
    del mega.env["UCCL_TCPX_TRANSPORT"]
    code, checks, runs = run_mega(mega)
    assert code == 0 and failed(checks) == [], failed(checks)
    c = checks["tcpxo/transport"]
    assert c["status"] == "warn" and c["fix"] == "export UCCL_TCPX_TRANSPORT=tcpxo", c
    assert "UCCL_TCPX_TRANSPORT=tcpxo" in checks["engine/transport"]["fix"]
    assert not any(k.startswith("tcpx/") for k in checks)
    assert runs.endswith("TCPXO's checks pass: set UCCL_TCPX_TRANSPORT=tcpxo to use it"), runs


def test_a3_mega_without_llcm_devices(mega):
    # No devices: LLCM stays off, a warning. LLCM turned on by hand with no devices: init would
    # end the process, a failure.
    mega.remove(LLCM_DIR)
    code, checks, _ = run_mega(mega)
    c = checks["tcpxo/llcm"]
    assert c["status"] == "warn" and LLCM_DIR in c["fix"], c
    assert mega_failures(checks) == []
    mega.env["NCCL_FASTRAK_USE_LLCM"] = "1"
    code, checks, _ = run_mega(mega)
    assert mega_failures(checks) == ["tcpxo/llcm"], mega_failures(checks)
    assert "ends the process" in checks["tcpxo/llcm"]["detail"]


def test_a3_mega_nic_settings_naming_no_interface(mega):
    mega.env["NCCL_FASTRAK_IFNAME"] = "enp6s0"
    mega.env["NCCL_FASTRAK_CTRL_DEV"] = "enp0s12"
    code, checks, _ = run_mega(mega)
    assert code == 1
    # The engine fails too where it knows TCPXO: the fake, like TCPXO, then lists no device.
    tcpxo = [k for k in failed(checks) if k.startswith("tcpxo/")]
    assert tcpxo == ["tcpxo/control nic", "tcpxo/data nics"], failed(checks)
    assert checks["tcpxo/data nics"]["fix"].startswith("export NCCL_FASTRAK_IFNAME=")
    assert checks["tcpxo/control nic"]["fix"].startswith("export NCCL_FASTRAK_CTRL_DEV=")


def test_this_machine_without_tcpx():
    """Here: no GPU, no plugin. Sockets work; auto says why TCPX is out and exits 0, tcpx exits 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCCL_TCPX_", "NCCL_"))}
    code, checks = doctor([], env)
    assert code == 0
    assert checks["engine/socket transport"]["status"] == "ok"
    assert checks["engine/transport"]["status"] == "warn"
    assert "auto resolves to socket" in checks["engine/transport"]["detail"]
    # What TCPX or CUDA lack stops nothing auto runs: warnings, and the host's one line says so.
    assert checks["tcpx/plugin"]["status"] == "warn" and checks["tcpx/plugin"]["fix"]
    assert not [k for k, c in checks.items() if c["status"] == "fail"], checks
    code, checks = doctor(["--transport", "tcpx"], env)
    assert code == 1
    assert checks["engine/transport"]["status"] == "fail"
    assert checks["tcpx/plugin"]["status"] == "fail"
    code, checks = doctor(["--transport", "socket"], env)
    assert code == 0 and not any(k.startswith("tcpx/") for k in checks)


def test_the_host_says_what_it_runs():
    """The report's one line: here the socket transport; host memory only without a GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCCL_TCPX_", "NCCL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "uccl_tcpx.doctor", "--json", "--no-nixl", "--gpu", "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    runs = json.loads(done.stdout)["runs"]
    assert runs.startswith("the built-in socket transport, host memory only"), runs
    text = subprocess.run(
        [sys.executable, "-m", "uccl_tcpx.doctor", "--no-nixl", "--transport", "socket", "--gpu", "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert "this host runs: the built-in socket transport, host memory only" in text, text


def test_a_failed_engine_names_the_fix_for_its_cause():
    from uccl_tcpx.doctor.engine_checks import creation_fix

    assert "cuda section" in creation_fix("cannot register GPU memory: CUDA unavailable", 0)
    assert "UCCL_TCPX_IFNAME" in creation_fix("no interface named eth9", -1)
    assert "UCCL_TCPX_IP" not in creation_fix("something else", -1)


def test_serve_and_peer_across_two_processes():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCCL_TCPX_", "NCCL_"))}
    env["UCCL_TCPX_TRANSPORT"] = "socket"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uccl_tcpx.doctor", "--serve", "--port", str(port)],
        env={**env, "UCCL_TCPX_IP": "127.0.0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = server.stdout.readline()
        assert "serving at" in first, first
        code, checks = doctor(["--transport", "socket", "--peer", f"127.0.0.1:{port}"], env)
        served = server.communicate(timeout=120)[0]
    finally:
        server.kill()
    assert server.returncode == 0, served
    c = checks["peer/exchange"]
    assert c["status"] == "ok", c
    assert code == 0
    assert c["data"]["path"] in ("same-host", "sockets"), c
    assert c["data"]["out_gbps"] > 0 and c["data"]["in_gbps"] > 0
    assert "served 127.0.0.1" in served


def test_peer_with_nobody_there_fails_with_the_fix():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCCL_TCPX_", "NCCL_"))}
    env["UCCL_TCPX_CONNECT_TIMEOUT_MS"] = "2000"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, checks = doctor(["--transport", "socket", "--peer", f"127.0.0.1:{port}"], env)
    assert code == 1
    assert f"uccl-tcpx-doctor --serve --port {port}" in checks["peer/exchange"]["fix"]


def test_serve_and_peer_across_two_test_hosts():
    """The same across two network namespaces (scripts/testnet.sh): no same-host shortcut, so the
    path is the socket transport over the hosts' link."""
    testnet = os.path.join(REPO, "scripts", "testnet.sh")
    prefix = f"dr{os.getpid() % 100000}"
    up = subprocess.run([testnet, "up", prefix], capture_output=True, text=True, check=False)
    if up.returncode != 0:
        subprocess.run([testnet, "down", prefix], capture_output=True, check=False)
        if os.environ.get("UCCL_TCPX_REQUIRE_NETNS") == "1":
            pytest.fail(f"cannot make test hosts: {up.stderr.strip()}")
        pytest.skip(f"no test hosts here (root and iproute2 needed): {up.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UCCL_TCPX_", "NCCL_"))}
    env["UCCL_TCPX_TRANSPORT"] = "socket"
    try:
        # Link 0 of the pair (hosts 0 and 1) is 198.18.0.0/24: host 0 at .1, host 1 at .2.
        server = subprocess.Popen(
            [testnet, "exec", prefix, "1", sys.executable, "-m", "uccl_tcpx.doctor", "--serve", "--port", "18515"],
            env={**env, "UCCL_TCPX_IP": "198.18.0.2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            first = server.stdout.readline()
            assert "serving at 198.18.0.2:18515" in first, first
            done = subprocess.run(
                [testnet, "exec", prefix, "0", sys.executable, "-m", "uccl_tcpx.doctor", "--json", "--no-nixl"]
                + ["--transport", "socket", "--peer", "198.18.0.2:18515"],
                env={**env, "UCCL_TCPX_IP": "198.18.0.1"},
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            served = server.communicate(timeout=120)[0]
        finally:
            server.kill()
    finally:
        subprocess.run([testnet, "down", prefix], capture_output=True, check=False)
    checks = {f"{c['section']}/{c['name']}": c for c in json.loads(done.stdout)["checks"]}
    c = checks["peer/exchange"]
    assert c["status"] == "ok" and done.returncode == 0, c
    assert c["data"]["path"] == "sockets", c
    assert all(link.startswith("198.18.") for link in c["data"]["links"]) and c["data"]["links"], c
    assert "served 198.18.0.1: path sockets" in served, served
