#!/usr/bin/env bash
# NCCL (PyTorch's) over the fake devmem NIC in GPU mode as its net plugin, GPU 0 <-> GPU 1 of one
# host (both ranks on GPU 0 of a one-GPU host, each naming a host of its own): every size from 4 KiB to 64 MiB (some not page multiples) in both directions and both at
# once, bit-exact, then timed, once with TCPX's NCCL settings, once with NCCL's default channel
# counts and once with the fake as TCPXO ("FakeFasTrak"); then our own bench over the fake for the
# same sizes, and a table of the first two and ours.
#
#   scripts/nccl_over_fake.sh DIR
#
# DIR holds libfake_tcpx.so and uccl-tcpx-bench (a folder made by scripts/gpu_bundle.sh, or
# target/release). Needs a GPU and PyTorch with its NCCL. Knobs:
#   NCCL_OVER_FAKE_SIZES          sizes, comma-separated, K/M suffixes (default 4K .. 64M, see the .py)
#   NCCL_OVER_FAKE_TIMEOUT        seconds one NCCL run may take (default 600)
#   NCCL_OVER_FAKE_PHASE_TIMEOUT  seconds one step of it may take before it counts as a hang (120)
#   NCCL_OVER_FAKE_OUT            where logs go (default $OUT, else DIR/nccl_over_fake_out)
#   FAKE_TCPX_DEBUG=1             the fake traces every request on stderr (into the run's log)
# Exit status: 0 all passed, 1 a run failed or hung, 77 this host cannot run it (no GPU).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="$(cd "${1:?usage: scripts/nccl_over_fake.sh DIR}" && pwd)"
driver="$here/nccl_over_fake.py"
out="${NCCL_OVER_FAKE_OUT:-${OUT:-$dir/nccl_over_fake_out}}"
limit="${NCCL_OVER_FAKE_TIMEOUT:-600}"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

gpus=0
command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if ((gpus < 1)); then
  echo "SKIPPED: nccl-over-fake needs a GPU, this host has none"
  exit 77
fi
if ((gpus < 2)); then
  echo "one GPU: both ranks on GPU 0 as two hosts (NCCL_HOSTID); their kernels take turns on it, so" \
    "NCCL's GB/s below are not its speed"
fi
for f in "$dir/libfake_tcpx.so" "$driver"; do
  [[ -f "$f" ]] || { echo "FAILED: $f is missing" >&2; exit 1; }
done
if ! "$python" -c 'import torch, torch.distributed' 2>/dev/null; then
  echo "FAILED: $python cannot import torch: the NCCL test needs PyTorch on a GPU host" >&2
  exit 1
fi
"$python" -c 'import torch; print(f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, CUDA {torch.version.cuda}")'

# NCCL loads libnccl-net-<NCCL_NET_PLUGIN>.so from the library path; NCCL_NET makes it use that
# network or fail, never fall back to its own socket transport.
plugin_dir="$(mktemp -d)"
trap 'rm -rf "$plugin_dir"' EXIT
cp "$dir/libfake_tcpx.so" "$plugin_dir/libnccl-net-fake.so"

sizes="${NCCL_OVER_FAKE_SIZES:-4096,12305,65536,524288,528383,1048576,4194303,16777216,16789561,67108864}"
common=(
  LD_LIBRARY_PATH="$plugin_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  NCCL_NET_PLUGIN=fake NCCL_NET=FakeDevmemTCPX_v7
  # TCPX deployments: no NVLink or shared-memory path between the GPUs, GPUDirect to the NIC at any
  # distance, and the Simple protocol (the only one that unpacks).
  NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET_GDR_LEVEL=SYS NCCL_NVLS_ENABLE=0 NCCL_PROTO=Simple
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET
  # The fake: GPU mode; both ranks are on this host, so same-host devmem traffic must be allowed;
  # no flow-steering wait (each of NCCL's connections would wait 5 s). NCCL places a NIC by reading
  # sysfs under its PCI path, where the fake's NICs do not exist, so it cannot pair GPUs with NICs
  # as it does on A3: two devices under the host bridge whose queues serve every GPU.
  FAKE_TCPX_MODE=gpu FAKE_TCPX_SAME_HOST=allow FAKE_TCPX_STEERING_WAIT_MS=0
  "FAKE_TCPX_TOPOLOGY=fake0 /sys/devices/pci0000:00/0000:00:00.0 *; fake1 /sys/devices/pci0000:00/0000:00:01.0 *"
  NCCL_OVER_FAKE_SIZES="$sizes"
)
configs=(
  "tcpx|FakeDevmemTCPX_v7|NCCL_P2P_NET_CHUNKSIZE=524288 NCCL_BUFFSIZE=4194304 NCCL_MIN_NCHANNELS=2 NCCL_MAX_NCHANNELS=2"
  "default-channels|FakeDevmemTCPX_v7|NCCL_P2P_NET_CHUNKSIZE=524288 NCCL_BUFFSIZE=4194304"
  # The fake as GPUDirect-TCPXO: a HOST device, receives written into the buffer posted, no
  # irecvConsumed; Google's A3-Mega settings (tcpxo_scripts/nccl-env-profile.sh).
  "tcpxo|FakeFasTrak|FAKE_TCPX_PLUGIN_KIND=tcpxo NCCL_NET=FakeFasTrak NCCL_P2P_NET_CHUNKSIZE=524288 NCCL_BUFFSIZE=8388608"
)
failed=()
for config in "${configs[@]}"; do
  IFS='|' read -r tag net knobs <<<"$config"
  log="$out/nccl-$tag.log"
  rm -f "$out/nccl-$tag".*.debug
  echo "======== nccl-over-fake $tag: $knobs"
  # shellcheck disable=SC2086 # knobs is a word list
  timeout -k 10 "$limit" env "${common[@]}" $knobs TAG="$tag" NCCL_DEBUG_FILE="$out/nccl-$tag.%h.%p.debug" \
    "$python" -m torch.distributed.run --standalone --nproc_per_node=2 "$driver" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  why=()
  ((rc == 124)) && why+=("timed out after ${limit}s")
  ((rc != 0 && rc != 124)) && why+=("exit status $rc")
  grep -q "HANG:" "$log" && why+=("a step hung")
  grep -qs "Loaded net plugin $net" "$out/nccl-$tag".*.debug || why+=("NCCL did not load the fake as $net")
  grep -qs "via NET/$net.*GDRDMA" "$out/nccl-$tag".*.debug || why+=("no GDRDMA channel over the fake")
  grep -q "sizes bit-exact" "$log" || why+=("not every size was checked")
  if ((${#why[@]})); then
    echo "nccl-over-fake $tag: FAILED: ${why[*]} (logs: $log, $out/nccl-$tag.*.debug)"
    failed+=("$tag")
  else
    echo "nccl-over-fake $tag: passed"
  fi
done

echo "======== uccl-tcpx-bench over the fake, GPU 0 -> GPU $((gpus > 1 ? 1 : 0)), same sizes"
bench_json="$out/bench-over-fake.json"
rm -f "$bench_json"
if [[ -x "$dir/uccl-tcpx-bench" ]]; then
  # Both ends are on this host: UCCL_TCPX_LOCAL_PEERS=plugin keeps them on the plugin (by default
  # same-host peers take the socket transport, as TCPX cannot carry them).
  timeout -k 10 "$limit" env UCCL_TCPX_TRANSPORT=tcpx UCCL_TCPX_PLUGIN="$dir/libfake_tcpx.so" \
    UCCL_TCPX_LOCAL_PEERS=plugin UCCL_TCPX_NET_DEVICES=0,1 FAKE_TCPX_MODE=gpu FAKE_TCPX_SAME_HOST=allow \
    FAKE_TCPX_STEERING_WAIT_MS=0 \
    "FAKE_TCPX_TOPOLOGY=fake0 /sys/devices/pci0000:00/0000:00:00.0 *; fake1 /sys/devices/pci0000:00/0000:00:01.0 *" \
    "$dir/uccl-tcpx-bench" --loopback --device gpu --ops send,write --sizes "$sizes" --no-baseline \
    --json-file "$bench_json" 2>&1 | tee "$out/bench-over-fake.log"
  rc=${PIPESTATUS[0]}
  ((rc == 0)) || { echo "bench over the fake: FAILED (exit status $rc)"; failed+=(bench); }
else
  echo "bench over the fake: FAILED: no uccl-tcpx-bench in $dir"
  failed+=(bench)
fi

echo "======== GB/s over the fake in GPU mode, same host, same run"
"$python" - "$out" "$bench_json" <<'EOF'
import json, os, re, sys
out, bench = sys.argv[1], sys.argv[2]
nccl = {}
for tag in ("tcpx", "default-channels"):
    try:
        text = open(os.path.join(out, f"nccl-{tag}.log")).read()
    except OSError:
        continue
    for m in re.finditer(r"nccl-over-fake \S+ size=(\d+) GB/s=([\d.]+)", text):
        nccl[(tag, int(m.group(1)))] = float(m.group(2))
ours = {}
if os.path.exists(bench):
    for p in json.load(open(bench)).get("results", []):
        ours[(p["op"], p["size"])] = p["gb_per_s"]
sizes = sorted({s for _, s in nccl} | {s for _, s in ours})
f = lambda v: f"{v:.3f}" if v is not None else "-"
print(f"{'size':>10} {'NCCL tcpx':>10} {'NCCL dflt ch':>12} {'ours send':>10} {'ours write':>11}")
for s in sizes:
    print(f"{s:>10} {f(nccl.get(('tcpx', s))):>10} {f(nccl.get(('default-channels', s))):>12} "
          f"{f(ours.get(('send', s))):>10} {f(ours.get(('write', s))):>11}")
EOF

if ((${#failed[@]})); then
  echo "nccl-over-fake: FAILED: ${failed[*]}"
  exit 1
fi
echo "nccl-over-fake: all passed"
