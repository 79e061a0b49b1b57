"""The TCPX checks: Google's net plugin, the devices it lists, the NIC each GPU pairs with, RxDM,
the kernel and host settings, and the plugin's environment. Each requirement names the upstream
file it comes from (google/nccl-plugin-gpudirecttcpx, google/tcpgpudmarxd,
GoogleCloudPlatform/container-engine-accelerators)."""

import functools
import json
import os
import socket
import subprocess
import sys

from .host import closest
from .report import FAIL, OK, WARN

PLUGIN_SRC = "google/nccl-plugin-gpudirecttcpx"
RXDM_SRC = "google/tcpgpudmarxd"
GKE_SRC = "GoogleCloudPlatform/container-engine-accelerators"

# Where dlopen looks besides LD_LIBRARY_PATH and ld.so.conf.
SYSTEM_DIRS = ["/lib", "/usr/lib", "/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
# Where Google's installers put the plugin, not searched by dlopen unless listed:
# nccl-tcpx-installer.yaml copies /var/lib/tcpx/lib64 into /usr/local/nvidia/lib64 (GKE's node
# folder /home/kubernetes/bin/nvidia/lib64).
INSTALL_DIRS = ["/usr/local/nvidia/lib64", "/var/lib/tcpx/lib64", "/home/kubernetes/bin/nvidia/lib64"]
RXDM_DIR = "/run/tcpx"
PREFIX_VAR = "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX"
START_RXDM = (
    "run RxDM (image us-docker.pkg.dev/gce-ai-infra/gpudirect-tcpx/tcpgpudmarxd-dev) with --gpu_nic_preset a3vm "
    f"--gpu_shmem_type fd --uds_path {RXDM_DIR}, and export {PREFIX_VAR}={RXDM_DIR}"
)


def search_dirs(host, env):
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    conf = [host.read("/etc/ld.so.conf") or ""]
    conf += [
        host.read(f"/etc/ld.so.conf.d/{n}") or "" for n in host.listdir("/etc/ld.so.conf.d") if n.endswith(".conf")
    ]
    for text in conf:
        dirs += [ln.strip() for ln in text.splitlines() if ln.strip().startswith("/")]
    return dirs + SYSTEM_DIRS


def find_plugin(host, env):
    """(path under the root or None, what was searched, copies found where dlopen does not look)."""
    explicit = env.get("UCCL_TCPX_PLUGIN")
    if explicit:
        return (host.path(explicit) if host.exists(explicit) else None), [explicit], []
    names = ([f"libnccl-net-{env['NCCL_NET_PLUGIN']}.so"] if env.get("NCCL_NET_PLUGIN") else []) + ["libnccl-net.so"]
    dirs = search_dirs(host, env)
    for name in names:
        for d in dirs:
            if host.exists(f"{d}/{name}"):
                return host.path(f"{d}/{name}"), [f"{d}/{n}" for n in names for d in dirs], []
    elsewhere = [f"{d}/{n}" for d in INSTALL_DIRS if d not in dirs for n in names if host.exists(f"{d}/{n}")]
    return None, [f"{d}/{n}" for n in names for d in dirs], elsewhere


def plugin_env(env, host, defaults):
    """The environment the engine gives the plugin: the user's, plus its defaults where unset
    (src/transport/plugin/tcpx.rs)."""
    out = dict(env)
    for name, value in defaults:
        out.setdefault(name, value)
    if PREFIX_VAR not in out and host.exists(RXDM_DIR):
        out[PREFIX_VAR] = RXDM_DIR
    return out


def probe(path, env, init):
    """Runs probe.py on the plugin in a process of its own; its JSON, or {"error": ...}."""
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py"), path]
    argv += ["--init"] if init else []
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"error": "the plugin did not answer within 120 s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the probe exited with status {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def plugin_missing(add, vendor, searched, elsewhere, install, src):
    """The `plugin` finding where no library was found where dlopen looks: the fix for a copy in an
    install folder dlopen does not search (`elsewhere`), else `install`. `add(title, status, detail,
    fix, source)` reports in the caller's section."""
    if elsewhere:
        folder = os.path.dirname(elsewhere[0])
        detail = f"found {elsewhere[0]}, but not where dlopen looks"
        fix = f"export LD_LIBRARY_PATH={folder}:$LD_LIBRARY_PATH (or UCCL_TCPX_PLUGIN={elsewhere[0]})"
        add("plugin", FAIL, detail, fix, src)
    else:
        shown = ", ".join(searched[:4]) + (", ..." if len(searched) > 4 else "")
        add("plugin", FAIL, f"no {vendor} plugin (searched {shown})", install, src)


def check_plugin(report, host, env, defaults):
    path, searched, elsewhere = find_plugin(host, env)
    src = f"{GKE_SRC}: gpudirect-tcpx/nccl-tcpx-installer.yaml"
    if path is None:
        install = (
            "install Google's plugin (nccl-plugin-gpudirecttcpx-dev image, /scripts/container_entry.sh "
            "install) and put its folder on LD_LIBRARY_PATH, or set UCCL_TCPX_PLUGIN"
        )
        plugin_missing(functools.partial(report.add, "tcpx"), "TCPX", searched, elsewhere, install, src)
        return None
    shown = host.unrooted(path)
    info = probe(path, env, init=False)
    if "error" in info or "load_error" in info:
        why = info.get("error") or info["load_error"]
        report.add(
            "tcpx",
            "plugin",
            FAIL,
            f"{shown} does not load: {why}",
            "put the plugin's libraries (libcuda, libcudart, protobuf; /usr/local/nvidia/lib64) on LD_LIBRARY_PATH",
            src,
        )
        return None
    if not info.get("symbol"):
        report.add(
            "tcpx",
            "plugin",
            FAIL,
            f"{shown} has no ncclNetPlugin_v7",
            "use Google's GPUDirect-TCPX plugin v3.1.x, which exports ncclNetPlugin_v7",
            f"{PLUGIN_SRC}: src/nccl_plugin.cc",
        )
        return None
    if "FasTrak" in (info.get("name") or ""):
        # Never initialised here: a failed TCPXO init ends the process (google/nccl-plugin-gpudirect-tcpxo,
        # tcpdirect_plugin/fastrak_offload/fastrak_plugin.cc), and the engine refuses it for tcpx.
        report.add(
            "tcpx",
            "plugin",
            FAIL,
            f"{shown} is GPUDirect-TCPXO's plugin ({info.get('name')!r}, A3-Mega), not TCPX's",
            "export UCCL_TCPX_TRANSPORT=tcpxo (the doctor then checks TCPXO; docs/TCPXO.md)",
            "google/nccl-plugin-gpudirect-tcpxo: tcpdirect_plugin/fastrak_offload/fastrak_plugin.cc",
        )
        return None
    version = info.get("version") or "not stated in the file"
    report.add(
        "tcpx",
        "plugin",
        OK,
        f"{shown}: ncclNetPlugin_v7 named {info.get('name')!r}, version {version}",
        source=f"{PLUGIN_SRC}: src/nccl_plugin.cc, src/net_tcpx.cc",
        path=shown,
        name=info.get("name"),
    )
    return path


def check_devices(report, host, path, env):
    """The plugin's devices (init in a process of its own, with the engine's environment)."""
    info = probe(path, env, init=True)
    if "error" in info or info.get("init") != 0:
        why = info.get("error") or f"init returned {info.get('init')}: " + "; ".join(info.get("warnings", [])[-3:])
        report.add(
            "tcpx",
            "devices",
            FAIL,
            f"the plugin does not initialise: {why}",
            "see the warnings; TCPX's init needs a CUDA driver and GPUs, and NCCL_GPUDIRECTTCPX_SOCKET_ENABLE unset",
            f"{PLUGIN_SRC}: src/net_tcpx.cc (tcpxInit)",
        )
        return None
    devices = info.get("devices", [])
    listed = ", ".join(
        f"{d['name']} ({d['pci_path'] or 'no PCI path'}{'' if d['cuda'] else ', host only'})" for d in devices
    )
    if not any(d["cuda"] for d in devices):
        report.add(
            "tcpx",
            "devices",
            FAIL,
            f"no device takes GPU memory: {listed or 'none'}",
            "set NCCL_GPUDIRECTTCPX_SOCKET_IFNAME to the GPU NICs (A3: eth1,eth2,eth3,eth4)",
            f"{PLUGIN_SRC}: src/misc/socket_utils.cc",
        )
        return devices
    report.add("tcpx", "devices", OK, listed, source=f"{PLUGIN_SRC}: src/misc/socket_utils.cc", devices=devices)
    return devices


def check_pairing(report, host, gpus, devices):
    """The NIC each GPU pairs with, by the engine's rule: under the GPU's PCI root, closest.
    Returns the NICs paired."""
    if not gpus:
        return []
    triples = [(d["name"], d["pci_path"], d["cuda"]) for d in devices]
    pairs = {bdf: closest(triples, path) for bdf, path in gpus.items()}
    lonely = [bdf for bdf, nics in pairs.items() if not nics]
    shown = ", ".join(f"{bdf}->{'+'.join(n) or 'none'}" for bdf, n in pairs.items())
    src = f"{RXDM_SRC}: src/a3vm_gpu_rxq_configurator.cc"
    if lonely:
        report.add(
            "tcpx",
            "pairing",
            FAIL,
            f"GPUs without a TCPX NIC under their PCI root: {', '.join(lonely)} ({shown})",
            "the plugin must list each GPU's own NIC: unset NCCL_GPUDIRECTTCPX_SOCKET_IFNAME or list eth1..eth4",
            src,
            pairs=pairs,
        )
    else:
        report.add("tcpx", "pairing", OK, shown, source=src, pairs=pairs)
    return sorted({n for nics in pairs.values() for n in nics})


def serves(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def check_rxdm(report, host, env, gpus):
    prefix = env.get(PREFIX_VAR) or (RXDM_DIR if host.exists(RXDM_DIR) else "/tmp")
    wanted = [("rx_rule_manager", f"{PLUGIN_SRC}: src/rx_buf_mgr_client/rx_rule_client.cc")]
    for bdf in gpus:
        wanted += [
            (f"get_gpu_fd_{bdf}", f"{RXDM_SRC}: cuda/cu_ipc_memfd_exporter.cu"),
            (f"get_gpu_metadata_{bdf}", f"{RXDM_SRC}: cuda/cu_ipc_memfd_exporter.cu"),
        ]
    missing = [(n, s) for n, s in wanted if not host.is_socket(f"{prefix}/{n}")]
    if missing:
        elsewhere = prefix != RXDM_DIR and host.is_socket(f"{RXDM_DIR}/rx_rule_manager")
        fix = f"export {PREFIX_VAR}={RXDM_DIR} (RxDM serves there)" if elsewhere else START_RXDM
        names = ", ".join(n for n, _ in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        report.add("tcpx", "rxdm", FAIL, f"no RxDM socket {names} in {prefix}", fix, missing[0][1])
        return
    # RxDM has no health file in its public source: a socket that takes a connection is alive.
    rule = host.path(f"{prefix}/rx_rule_manager")
    if not serves(rule):
        report.add(
            "tcpx",
            "rxdm",
            FAIL,
            f"{prefix}/rx_rule_manager exists but nothing answers on it (RxDM stopped)",
            f"restart RxDM; {START_RXDM}",
            f"{RXDM_SRC}: app/tcpgpudmarxd.cu",
        )
        return
    report.add(
        "tcpx",
        "rxdm",
        OK,
        f"RxDM answers in {prefix} (rx_rule_manager, and get_gpu_fd_/get_gpu_metadata_ for {len(gpus)} GPUs)",
        source=f"{RXDM_SRC}: app/tcpgpudmarxd.cu",
    )


def check_kernel(report, host, env, gpus, nics):
    release = host.read("/proc/sys/kernel/osrelease") or "unknown"
    if env.get("NCCL_GPUDIRECTTCPX_REG_DMABUF_USE_INTERNAL_API") == "1":
        missing = [b for b in gpus if not host.exists(f"/proc/driver/nvp2p_dma_buf/{b}")]
        if missing:
            report.add(
                "tcpx",
                "dma-buf",
                FAIL,
                f"NCCL_GPUDIRECTTCPX_REG_DMABUF_USE_INTERNAL_API=1 but no /proc/driver/nvp2p_dma_buf/{missing[0]}",
                "unset NCCL_GPUDIRECTTCPX_REG_DMABUF_USE_INTERNAL_API",
                f"{PLUGIN_SRC}: src/gpu/tx_pool.cu",
            )
            return
    if nics is None:
        report.add(
            "tcpx",
            "kernel",
            OK,
            f"kernel {release}; the GPU NICs' driver is checked once the plugin lists them",
            source=f"{PLUGIN_SRC}: src/sock/tcpx.h (devmem receive)",
        )
        return
    drivers = {n: host.nic_driver(n) for n in nics}
    odd = [f"{n} ({d or 'no driver'})" for n, d in drivers.items() if d != "gve"]
    src = f"{RXDM_SRC}: app/tcpgpudmarxd.cu (ethtool header split and ntuple on the GPU NICs)"
    if odd:
        report.add(
            "tcpx",
            "kernel",
            WARN,
            f"kernel {release}; GPU NICs not on gVNIC's driver gve: {', '.join(odd)}",
            "use an A3 image with Google's devmem kernel (COS on GKE); --peer proves the devmem path",
            src,
        )
    else:
        report.add(
            "tcpx",
            "kernel",
            OK,
            f"kernel {release}; GPU NICs on gve: {', '.join(nics) or 'none listed'}; "
            "devmem receive itself is proven by --peer only",
            source=src,
        )


# (sysctl, wanted, how compared, source, whether a miss stops TCPX).
SYSCTLS = [
    ("net.core.optmem_max", 131072, "min", f"{GKE_SRC}: gpudirect-tcpx/optmem-max-ds.yaml", True),
    (
        "net.ipv4.tcp_mtu_probing",
        0,
        "eq",
        f"{RXDM_SRC}: app/tcpgpudmarxd.cu, scripts/a3-tuning-scripts/setup.sh",
        False,
    ),
    ("net.ipv4.tcp_slow_start_after_idle", 0, "eq", f"{RXDM_SRC}: scripts/a3-tuning-scripts/setup.sh", False),
    ("net.ipv4.tcp_no_metrics_save", 1, "eq", f"{RXDM_SRC}: scripts/a3-tuning-scripts/setup.sh", False),
    ("net.core.somaxconn", 4096, "min", f"{RXDM_SRC}: scripts/a3-tuning-scripts/setup.sh", False),
    ("net.ipv4.tcp_max_syn_backlog", 4096, "min", f"{RXDM_SRC}: scripts/a3-tuning-scripts/setup.sh", False),
]


def check_sysctls(report, host):
    for name, wanted, how, src, required in SYSCTLS:
        value = host.sysctl(name)
        try:
            number = int(value.split()[0]) if value else None
        except ValueError:
            number = None
        good = number is not None and (number >= wanted if how == "min" else number == wanted)
        fix = f"sysctl -w {name}={wanted}"
        if good:
            report.add("tcpx", name, OK, str(number), source=src)
        else:
            report.add(
                "tcpx",
                name,
                FAIL if required else WARN,
                f"{value if value is not None else 'unreadable'}, {'at least ' if how == 'min' else ''}{wanted} wanted",
                fix,
                src,
            )


def check_env(report, host, env, defaults):
    parts = []
    for name, value in defaults:
        parts.append(f"{name}={env[name]} (yours; engine's {value})" if name in env else f"{name}={value}")
    report.add("tcpx", "environment", OK, "; ".join(parts), source="the engine: src/transport/plugin/tcpx.rs")
    strategy = env.get("NCCL_GPUDIRECTTCPX_FLOW_STEERING_STRATEGY")
    if strategy not in (None, "", "3"):
        report.add(
            "tcpx",
            "flow steering",
            FAIL,
            f"NCCL_GPUDIRECTTCPX_FLOW_STEERING_STRATEGY={strategy}: only 3 (unix client) works",
            "unset NCCL_GPUDIRECTTCPX_FLOW_STEERING_STRATEGY",
            f"{PLUGIN_SRC}: src/connect.cc",
        )
    if env.get("NCCL_GPUDIRECTTCPX_SOCKET_ENABLE") == "0":
        report.add(
            "tcpx",
            "socket enable",
            FAIL,
            "NCCL_GPUDIRECTTCPX_SOCKET_ENABLE=0 makes the plugin's init fail",
            "unset NCCL_GPUDIRECTTCPX_SOCKET_ENABLE",
            f"{PLUGIN_SRC}: src/net_tcpx.cc",
        )
    nics = host.nics()
    for var in ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "NCCL_GPUDIRECTTCPX_CTRL_DEV"):
        spec = env.get(var, "")
        if not spec or spec.startswith("^"):
            continue
        exact = spec.startswith("=")
        names = [n for n in spec.lstrip("=").split(",") if n]
        unknown = [n for n in names if not any((i == n) if exact else i.startswith(n) for i in nics)]
        if unknown:
            report.add(
                "tcpx",
                var,
                FAIL,
                f"{var}={spec} names no interface here: {', '.join(unknown)} (interfaces: {', '.join(nics)})",
                f"export {var}=<interfaces of `ip link`>",
                f"{PLUGIN_SRC}: src/misc/socket_utils.cc",
            )


def run(report, host, env, defaults, gpus):
    """Every TCPX check; returns the plugin's path under the root, or None."""
    # The RxDM prefix is the engine's only where /run/tcpx exists: plugin_env decides it.
    defaults = [(n, v) for n, v in defaults if n != PREFIX_VAR]
    penv = plugin_env(env, host, defaults)
    path = check_plugin(report, host, penv, defaults)
    devices = check_devices(report, host, path, penv) if path else None
    paired = check_pairing(report, host, gpus, devices) if devices is not None else None
    check_rxdm(report, host, penv, gpus)
    check_kernel(report, host, penv, gpus, paired)
    check_sysctls(report, host)
    check_env(report, host, env, defaults)
    return path
