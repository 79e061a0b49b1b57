"""The TCPXO checks (GPUDirect-TCPXO, "FasTrak", A3-Mega): Google's plugin where the engine looks,
RxDM and its import helper, LLCM's devices, the data and control NICs, the GPUs, and the setting that
selects TCPXO. A failed TCPXO `init` ends the process, so these read the host instead of
initialising the plugin; the engine section's `transport` check creates a real engine where TCPXO
is asked for. Each requirement names the upstream file it comes from
(google/nccl-plugin-gpudirect-tcpxo v1.0.17, GoogleCloudPlatform/container-engine-accelerators);
docs/TCPXO.md has the reading behind them."""

from dataclasses import dataclass, field

from . import tcpx_checks
from .report import FAIL, OK, WARN

PLUGIN_SRC = "google/nccl-plugin-gpudirect-tcpxo"
FO = "tcpdirect_plugin/fastrak_offload"
GKE_SRC = "GoogleCloudPlatform/container-engine-accelerators"
INSTALLER = f"{GKE_SRC}: gpudirect-tcpxo/nccl-tcpxo-installer.yaml"
ENGINE_SRC = "the engine: src/transport/plugin/loader.rs, src/transport/plugin/tcpxo.rs"

# Google's installer renames the plugin and puts a closed wrapper (a configuration checker that
# loads it) in libnccl-net.so's place: tcpxo_scripts/container_entry.sh, install_nccl_shim.
INTERNAL = "libnccl-net_internal.so"
# Where that installer puts it (container_entry.sh fills both), and where GKE's installer copies
# /var/lib/tcpxo/lib64 (the node's /home/kubernetes/bin/nvidia/lib64, mounted at
# /usr/local/nvidia/lib64). dlopen searches none of them unless listed.
INSTALL_DIRS = [
    "/var/lib/tcpxo/lib64",
    "/var/lib/fastrak/lib64",
    "/usr/local/nvidia/lib64",
    "/home/kubernetes/bin/nvidia/lib64",
]
# The table name the engine takes for TCPXO's (src/transport/plugin/loader.rs `profile_of`).
TABLE_NAME = "FasTrak"
INSTALL_FIX = (
    f"run Google's TCPXO installer (gpudirect-tcpxo/nccl-tcpxo-installer.yaml; /scripts/container_entry.sh "
    f"install --install-nccl), then put /var/lib/tcpxo/lib64 on LD_LIBRARY_PATH or set UCCL_TCPX_PLUGIN "
    f"to its {INTERNAL}"
)

IMPORT_HELPER = "/dev/dmabuf_import_helper"
# Where Google's manifests bind-mount the LLCM devices; the engine turns LLCM on where it holds some.
LLCM_DIR = "/dev/aperture_devices"
# The plugin's own default folder for LLCM devices (dxs/client/dxs-client.h `kLlcmDeviceDirectory`).
LLCM_DEFAULT_DIR = "/sys/bus/pci/devices"
LLCM_ID = ("0x1ae0", "0x0084")
LLCM_FIX = (
    f"bind-mount each 1ae0:0084 device (lspci -nn -D | grep 1ae0:0084) under {LLCM_DIR}/BDF, as "
    "nccl-tcpxo-installer.yaml does, and mount that folder into the workload's container"
)

# RxDM's socket answering which NIC serves each GPU, the first thing TCPXO's init asks it:
# abstract (the network namespace's, not a file) unless FILE_BASED_UDS_PATH_PREFIX names a folder.
RXDM_MAPPING = "rxdm_uds_nic_mapping"
RXDM_FIX = (
    "run RxDM (tcpgpudmarxd-dev, /fts/entrypoint_rxdm_container.sh; docs/A3.md) in this network namespace "
    "(docker --network=host for RxDM and the workload, or one pod), with the same FILE_BASED_UDS_PATH_PREFIX if set"
)

H100 = "0x2330"
MAX_GPUS = 8
DEFAULT_CTRL_DEV = "eth0"


@dataclass
class Verdict:
    """What the TCPXO checks found: the plugin's path under the root, and the checks that would
    stop TCPXO. The report turns failures into warnings where TCPXO was not asked for, so the
    host's one line learns from this whether TCPXO could run."""

    plugin: str = None
    blocking: list = field(default_factory=list)


class Findings:
    """The tcpxo section of a report, remembering its failures."""

    def __init__(self, report):
        self.report = report
        self.verdict = Verdict()

    def add(self, title, status, detail, fix="", source="", **data):
        if status == FAIL:
            self.verdict.blocking.append(title)
        return self.report.add("tcpxo", title, status, detail, fix, source, **data)


def transport_setting(env):
    return (env.get("UCCL_TCPX_TRANSPORT") or "").strip().lower()


def library_names(env):
    """The names the engine dlopens for TCPXO, in its order (src/transport/plugin/loader.rs
    `candidates`)."""
    own = [f"libnccl-net-{env['NCCL_NET_PLUGIN']}.so"] if env.get("NCCL_NET_PLUGIN") else []
    return own + [INTERNAL, "libnccl-net.so"]


def installed_elsewhere(host, dirs):
    """Copies of TCPXO's plugin in Google's install folders that are not among `dirs`."""
    return [f"{d}/{INTERNAL}" for d in INSTALL_DIRS if d not in dirs and host.exists(f"{d}/{INTERNAL}")]


def looks_like_a3_mega(host, env, asked):
    """Whether to run the TCPXO checks: TCPXO asked for, LLCM's device folder, or TCPXO's plugin
    installed (by its renamed name, or in its own install folders)."""
    if asked == "tcpxo" or transport_setting(env) == "tcpxo" or host.exists(LLCM_DIR):
        return True
    dirs = tcpx_checks.search_dirs(host, env) + INSTALL_DIRS
    own = ["/var/lib/tcpxo/lib64/libnccl-net.so", "/var/lib/fastrak/lib64/libnccl-net.so"]
    return any(host.exists(f"{d}/{INTERNAL}") for d in dirs) or any(host.exists(p) for p in own)


def candidates(host, env):
    """(the files the engine would load, in its order; what was searched). UCCL_TCPX_PLUGIN stands
    alone when set; otherwise each name is found in the first folder dlopen searches that holds it."""
    explicit = env.get("UCCL_TCPX_PLUGIN")
    if explicit:
        return ([explicit] if host.exists(explicit) else []), [explicit]
    names, dirs = library_names(env), tcpx_checks.search_dirs(host, env)
    found = []
    for name in names:
        folder = next((d for d in dirs if host.exists(f"{d}/{name}")), None)
        if folder:
            found.append(f"{folder}/{name}")
    return found, [f"{d}/{n}" for n in names for d in dirs]


def why_not_tcpxo(info):
    """Why a probed library is not one the engine takes for TCPXO, or None."""
    if "error" in info or "load_error" in info:
        return f"does not load: {info.get('error') or info['load_error']}"
    if not info.get("symbol"):
        return "has no ncclNetPlugin_v7"
    if TABLE_NAME not in (info.get("name") or ""):
        return f"is {info.get('name')!r}, not TCPXO's {TABLE_NAME}"
    return None


def check_plugin(out, host, env):
    """The library the engine would take for TCPXO: loaded and named only (its init is fatal)."""
    src = f"{PLUGIN_SRC}: tcpxo_scripts/container_entry.sh; {FO}/fastrak_plugin.cc"
    found, searched = candidates(host, env)
    if not found:
        # A path the user named stands alone: no other copy is a fix for it.
        explicit = env.get("UCCL_TCPX_PLUGIN")
        elsewhere = [] if explicit else installed_elsewhere(host, tcpx_checks.search_dirs(host, env))
        tcpx_checks.plugin_missing(out.add, "TCPXO", searched, elsewhere, INSTALL_FIX, src)
        return None
    refused = []
    for path in found:
        # Loaded in a process of its own, named, never initialised.
        info = tcpx_checks.probe(host.path(path), env, init=False)
        why = why_not_tcpxo(info)
        if why is None:
            name = info["name"]
            out.add("plugin", OK, f"{path}: ncclNetPlugin_v7 named {name!r}", source=src, path=path, name=name)
            return host.path(path)
        refused.append(f"{path} {why}")
    out.add(
        "plugin",
        FAIL,
        "; ".join(refused),
        f"put /var/lib/tcpxo/lib64 on LD_LIBRARY_PATH (the plugin's libraries are there), or set "
        f"UCCL_TCPX_PLUGIN to TCPXO's {INTERNAL}",
        src,
    )
    return None


def check_import_helper(out, host):
    src = f"{PLUGIN_SRC}: dmabuf_bridge/dmabuf_importer.c; {INSTALLER}"
    if host.exists(IMPORT_HELPER):
        out.add("import helper", OK, f"{IMPORT_HELPER}: RxDM can map GPU memory's dma-bufs", source=src)
        return
    out.add(
        "import helper",
        FAIL,
        f"no {IMPORT_HELPER}: RxDM maps every GPU buffer TCPXO registers through it",
        f"load Google's module (modprobe import-helper, as nccl-tcpxo-installer.yaml does) and give RxDM "
        f"the device (--device {IMPORT_HELPER})",
        src,
    )


def rxdm_address(host, env):
    """(the address of RxDM's NIC-mapping socket, as shown): a file under
    FILE_BASED_UDS_PATH_PREFIX, else abstract."""
    prefix = env.get("FILE_BASED_UDS_PATH_PREFIX")
    if prefix:
        path = f"{prefix}/{RXDM_MAPPING}"
        return host.path(path), path
    return "\0" + RXDM_MAPPING, f"@{RXDM_MAPPING} (abstract)"


def check_rxdm(out, host, env):
    """Connects to RxDM's NIC-mapping socket as the plugin does; abstract sockets are the running
    machine's (its network namespace), whatever --root says."""
    src = f"{PLUGIN_SRC}: buffer_mgmt_daemon/common/uds_helpers.cc (UdsSockaddr), {FO}/init.cc (WaitForRxDM)"
    address, shown = rxdm_address(host, env)
    if tcpx_checks.serves(address):
        out.add("rxdm", OK, f"RxDM answers on {shown}", source=src)
        return
    out.add(
        "rxdm",
        FAIL,
        f"nothing answers on RxDM's {shown}: TCPXO's init waits NCCL_FASTRAK_RXDM_INIT_TIMEOUT (30 s), "
        "then ends the process",
        RXDM_FIX,
        src,
    )


def llcm_devices(host, folder):
    """The LLCM PCI devices (1ae0:0084) in `folder`, a sysfs-like device folder."""

    def ids(entry):
        return host.read(f"{folder}/{entry}/vendor"), host.read(f"{folder}/{entry}/device")

    return [e for e in host.listdir(folder) if ids(e) == LLCM_ID]


def llcm_setting(host, env):
    """(NCCL_FASTRAK_USE_LLCM, the device folder, who set LLCM) as the plugin will read them: the
    user's where set, else the engine's defaults where LLCM_DIR holds anything
    (src/transport/plugin/tcpxo.rs `apply_defaults`), else the plugin's own (`fo/const_params.h`)."""
    engine_sets = bool(host.listdir(LLCM_DIR))
    if "NCCL_FASTRAK_USE_LLCM" in env:
        use, who = env["NCCL_FASTRAK_USE_LLCM"].strip(), "yours"
    else:
        use, who = ("1", "the engine's") if engine_sets else ("0", "the plugin's default")
    if "NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY" in env:
        # The plugin trims it and takes its default for an empty one (nic_client_router.cc).
        folder = env["NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY"].strip() or LLCM_DEFAULT_DIR
    else:
        folder = LLCM_DIR if engine_sets else LLCM_DEFAULT_DIR
    return use, folder, who


def check_llcm(out, host, env):
    src = f"{PLUGIN_SRC}: {FO}/nic_client_router.cc, dxs/client/guest-llcm-device.cc; {INSTALLER}"
    use, folder, who = llcm_setting(host, env)
    if use != "1":
        if "NCCL_FASTRAK_USE_LLCM" in env:
            out.add("llcm", OK, f"NCCL_FASTRAK_USE_LLCM={use} (yours): control messages over SCTP in UDP", source=src)
        else:
            out.add(
                "llcm",
                WARN,
                f"no devices in {LLCM_DIR}: LLCM stays off, control messages go over SCTP in UDP "
                "(Google's settings turn LLCM on)",
                LLCM_FIX,
                src,
            )
        return
    found = llcm_devices(host, folder)
    if not found:
        out.add(
            "llcm",
            FAIL,
            f"NCCL_FASTRAK_USE_LLCM=1 ({who}) but {folder} holds no LLCM device (1ae0:0084): "
            "TCPXO's init ends the process",
            f"{LLCM_FIX}; or unset NCCL_FASTRAK_USE_LLCM and NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY",
            src,
        )
        return
    out.add(
        "llcm",
        OK,
        f"NCCL_FASTRAK_USE_LLCM=1 ({who}), {len(found)} LLCM devices in {folder}",
        source=src,
        devices=found,
    )


def matching(spec, names):
    """The interfaces of `names` that an NCCL interface list selects: prefixes, `=` for exact
    names, `^` to exclude (fo/utilities.h `findInterfaces`)."""
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    wanted = [w for w in (spec[1:] if exact else spec).split(",") if w]

    def listed(name):
        return any(name == w if exact else name.startswith(w) for w in wanted)

    return [n for n in names if listed(n) != exclude]


def default_interfaces(env, names):
    """The plugin's choice without NCCL_FASTRAK_IFNAME: NCCL_FASTRAK_SOCKET_IFNAME, else ib*, else
    every interface but lo and docker*."""
    spec = env.get("NCCL_FASTRAK_SOCKET_IFNAME", "")
    if len(spec) > 1:
        return matching(spec, names)
    return matching("ib", names) or [n for n in names if n != "lo" and not n.startswith("docker")]


def check_data_nics(out, host, env, gpus):
    src = f"{PLUGIN_SRC}: {FO}/common.cc (initializeNetIfs), {FO}/utilities.h; tcpxo_scripts/nccl-env-profile.sh"
    names = sorted(host.nics())
    spec = env.get("NCCL_FASTRAK_IFNAME")
    nics = matching(spec, names) if spec else default_interfaces(env, names)
    fix = "export NCCL_FASTRAK_IFNAME=<the GPU NICs, comma-separated> (GKE: eth1,...,eth8; `ip -br link` names them)"
    if not nics:
        what = f"NCCL_FASTRAK_IFNAME={spec}" if spec else "the plugin's default choice"
        out.add(
            "data nics",
            FAIL,
            f"{what} selects no interface here ({', '.join(names) or 'none'}): TCPXO's init ends the process",
            fix,
            src,
        )
        return
    if not spec:
        ctrl = env.get("NCCL_FASTRAK_CTRL_DEV") or DEFAULT_CTRL_DEV
        among = f", the control NIC {ctrl} among them" if ctrl in nics else ""
        out.add(
            "data nics",
            WARN,
            f"NCCL_FASTRAK_IFNAME unset: the plugin takes {', '.join(nics)}{among}",
            fix,
            src,
            nics=nics,
        )
    elif gpus and len(nics) < min(len(gpus), MAX_GPUS):
        out.add(
            "data nics",
            WARN,
            f"NCCL_FASTRAK_IFNAME={spec} selects {', '.join(nics)}, fewer than the {len(gpus)} GPUs "
            "(A3-Mega has a NIC per GPU)",
            fix,
            src,
            nics=nics,
        )
    else:
        out.add("data nics", OK, f"NCCL_FASTRAK_IFNAME={spec} selects {', '.join(nics)}", source=src, nics=nics)


def check_control_nic(out, host, env):
    src = f"{PLUGIN_SRC}: {FO}/common.cc (initializeNetIfs)"
    ctrl = env.get("NCCL_FASTRAK_CTRL_DEV") or DEFAULT_CTRL_DEV
    found = matching(ctrl, sorted(host.nics()))
    shown = f"NCCL_FASTRAK_CTRL_DEV={ctrl}" + ("" if "NCCL_FASTRAK_CTRL_DEV" in env else " (the plugin's default)")
    if found:
        out.add("control nic", OK, f"{shown}: {found[0]}", source=src)
        return
    out.add(
        "control nic",
        FAIL,
        f"{shown} names no interface here: TCPXO's init ends the process",
        "export NCCL_FASTRAK_CTRL_DEV=<the host NIC, eth0 on GKE>",
        src,
    )


def visible_count(env, gpus):
    """The GPUs CUDA will count (`checkDeviceCount` asks CUDA): CUDA_VISIBLE_DEVICES's list where
    set, never more than the GPUs there are."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    listed = len(gpus) if visible is None else len([v for v in visible.split(",") if v.strip()])
    return min(listed, len(gpus))


def check_gpus(out, host, env, gpus):
    src = (
        f"{PLUGIN_SRC}: {FO}/common.cc (GetPciAddrToFastrakIdxMap), buffer_mgmt_daemon/pci_utils.h "
        "(kH100DeviceId), nccl_cuda/cuda_common.cc (checkDeviceCount)"
    )
    if not gpus:
        out.add(
            "gpus",
            FAIL,
            "no NVIDIA GPU: TCPXO moves GPU memory only and its init needs a current CUDA context",
            "use an A3-Mega VM (a3-megagpu-8g), or UCCL_TCPX_TRANSPORT=socket",
            src,
        )
        return
    ids = {bdf: (host.read(f"{path}/device") or "").lower() for bdf, path in gpus.items()}
    others = [f"{bdf} ({i or 'no device id'})" for bdf, i in ids.items() if i != H100]
    if others:
        out.add(
            "gpus",
            FAIL,
            f"not H100s ({H100}): {', '.join(others)}; TCPXO's init ends the process on a GPU it does not list",
            "use A3-Mega (a3-megagpu-8g), whose GPUs are H100s; elsewhere UCCL_TCPX_TRANSPORT=socket",
            src,
        )
        return
    count = visible_count(env, gpus)
    if count > MAX_GPUS:
        out.add(
            "gpus",
            FAIL,
            f"{count} GPUs visible: TCPXO's init ends the process with more than {MAX_GPUS}",
            f"export CUDA_VISIBLE_DEVICES=<at most {MAX_GPUS} GPUs>",
            src,
        )
        return
    out.add("gpus", OK, f"{len(gpus)} H100s ({H100}), {count} visible to CUDA", source=src)


def check_engine_gpu(out, env):
    """The engine makes its GPU current around TCPXO's init, which needs one: named, or current
    where the engine is created."""
    src = f"{ENGINE_SRC}; {PLUGIN_SRC}: {FO}/fastrak_plugin.cc (Init, GetShim)"
    value = env.get("UCCL_TCPX_GPU")
    if value is None:
        out.add(
            "engine gpu",
            WARN,
            "UCCL_TCPX_GPU unset: the engine serves the GPU current on the thread creating it, and its "
            "creation fails with none current",
            "export UCCL_TCPX_GPU=<the GPU's ordinal, 0-7>, or make the GPU current before creating the engine",
            src,
        )
        return
    try:
        ordinal = int(value)
    except ValueError:
        return  # the engine refuses it itself, and the engine section says so
    if not 0 <= ordinal < MAX_GPUS:
        out.add(
            "engine gpu",
            FAIL,
            f"UCCL_TCPX_GPU={value}: TCPXO serves ordinals 0-{MAX_GPUS - 1}",
            f"export UCCL_TCPX_GPU=<0-{MAX_GPUS - 1}>",
            src,
        )
        return
    out.add("engine gpu", OK, f"UCCL_TCPX_GPU={ordinal}", source=src)


def check_transport(out, env):
    value = transport_setting(env)
    src = f"{ENGINE_SRC}; {PLUGIN_SRC}: {FO}/fastrak_plugin.cc (Init)"
    if value == "tcpxo":
        out.add("transport", OK, "UCCL_TCPX_TRANSPORT=tcpxo: the engine loads TCPXO's plugin", source=src)
        return
    out.add(
        "transport",
        WARN,
        f"UCCL_TCPX_TRANSPORT={value or 'auto (unset)'}: the engine never loads TCPXO's plugin unless it is "
        "named (a failed TCPXO init ends the process, so auto does not try it)",
        "export UCCL_TCPX_TRANSPORT=tcpxo",
        src,
    )


def run(report, host, env, gpus):
    """Every TCPXO check; returns a Verdict."""
    out = Findings(report)
    out.verdict.plugin = check_plugin(out, host, env)
    check_rxdm(out, host, env)
    check_import_helper(out, host)
    check_llcm(out, host, env)
    check_data_nics(out, host, env, gpus)
    check_control_nic(out, host, env)
    check_gpus(out, host, env, gpus)
    check_engine_gpu(out, env)
    check_transport(out, env)
    return out.verdict
