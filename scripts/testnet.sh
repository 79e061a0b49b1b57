#!/usr/bin/env bash
# Test hosts on this machine: Linux network namespaces joined by veth links, so that two engines
# cross a real network stack (their own interfaces, routes and host identity) without a second
# machine. Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2.
#
#   scripts/testnet.sh up PREFIX [--hosts N] [--data-links N] [--rate RATE]
#   scripts/testnet.sh down PREFIX            remove every namespace and link PREFIX made, then check
#   scripts/testnet.sh check PREFIX           fail if anything PREFIX made is still there
#   scripts/testnet.sh exec PREFIX HOST CMD...  run CMD on test host HOST (0, 1, ...)
#   scripts/testnet.sh link PREFIX HOST IFACE up|down
#   scripts/testnet.sh rate PREFIX HOST IFACE RATE|none   shape (or unshape) IFACE's egress on HOST
#   scripts/testnet.sh bench [--data-links N] [--rate RATE] [--bin BENCH] [--server-arg ARG]... -- BENCH_ARGS...
#                          uccl-tcpx-bench's server on test host 1 and its client on host 0, over a
#                          network made for the run and removed on every exit path; --server-arg
#                          passes one argument to the server (e.g. --device, gpu: a server picks
#                          its memory itself)
#
# PREFIX: 1-8 lower-case letters and digits; namespaces are PREFIX + "h" + host index. Between each
# pair of hosts i < j (the p-th pair, p from 0) there is one control link and N data links (default
# 1). Link L (0: control, 1..N: data) of pair p is the subnet 198.18.(16p + L).0/24, host i at .1 and
# host j at .2: addresses from 198.18.0.0/15, the range set aside for benchmarks, and no other. On
# host i the control link towards host j is named ctlJ and its data links datJ_1 .. datJ_N, so
# "dat" names every data link and "=dat1_2" one. RATE (tc tbf, both directions of each data link):
# a number with kbit, mbit or gbit, e.g. 1gbit.
set -euo pipefail

die() {
  echo "testnet: $*" >&2
  exit 2
}

check_prefix() {
  [[ "${1:-}" =~ ^[a-z0-9]{1,8}$ ]] || die "PREFIX must be 1-8 lower-case letters or digits, got '${1:-}'"
}

# tbf needs a bucket of at least one packet; veth hands it segmentation-offload packets of up to
# 64 KiB, so the bucket holds 10 ms at the rate and never less than 256 KiB.
shape() {
  local ns=$1 dev=$2 rate=$3
  ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
  [[ "$rate" == none ]] && return 0
  [[ "$rate" =~ ^([0-9]+)(kbit|mbit|gbit)$ ]] || die "RATE must be a number with kbit, mbit or gbit, got '$rate'"
  local n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]} bits
  case $unit in
    kbit) bits=$((n * 1000)) ;;
    mbit) bits=$((n * 1000000)) ;;
    gbit) bits=$((n * 1000000000)) ;;
  esac
  local burst=$((bits / 8 / 100))
  ((burst < 262144)) && burst=262144
  ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 100ms
}

up() {
  local prefix=$1
  shift
  local hosts=2 links=1 rate=none
  while (($#)); do
    case $1 in
      --hosts) hosts=$2; shift 2 ;;
      --data-links) links=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ "$hosts" =~ ^[0-9]+$ ]] && ((hosts >= 2 && hosts <= 6)) || die "--hosts must be 2-6"
  [[ "$links" =~ ^[0-9]+$ ]] && ((links >= 1 && links <= 15)) || die "--data-links must be 1-15"
  command -v ip >/dev/null || die "iproute2's ip is not installed"
  if ip netns list 2>/dev/null | grep -q "^${prefix}h"; then
    die "namespaces of prefix $prefix exist already (scripts/testnet.sh down $prefix)"
  fi
  # Anything made before a failure is removed again.
  trap 'down "$prefix" >/dev/null 2>&1 || true' ERR
  local i j
  for ((i = 0; i < hosts; i++)); do
    ip netns add "${prefix}h$i"
    ip -n "${prefix}h$i" link set lo up
  done
  local pair=0 link a b subnet
  for ((i = 0; i < hosts; i++)); do
    for ((j = i + 1; j < hosts; j++)); do
      for ((link = 0; link <= links; link++)); do
        # Made in the root namespace under names of this prefix, moved, then renamed.
        a="${prefix}a$((pair * 16 + link))"
        b="${prefix}b$((pair * 16 + link))"
        ip link add "$a" type veth peer name "$b"
        ip link set "$a" netns "${prefix}h$i"
        ip link set "$b" netns "${prefix}h$j"
        local ai bj
        if ((link == 0)); then
          ai="ctl$j" bj="ctl$i"
        else
          ai="dat${j}_$link" bj="dat${i}_$link"
        fi
        ip -n "${prefix}h$i" link set "$a" name "$ai"
        ip -n "${prefix}h$j" link set "$b" name "$bj"
        subnet="198.18.$((pair * 16 + link))"
        ip -n "${prefix}h$i" addr add "$subnet.1/24" dev "$ai"
        ip -n "${prefix}h$j" addr add "$subnet.2/24" dev "$bj"
        ip -n "${prefix}h$i" link set "$ai" up
        ip -n "${prefix}h$j" link set "$bj" up
        if ((link > 0)); then
          shape "${prefix}h$i" "$ai" "$rate"
          shape "${prefix}h$j" "$bj" "$rate"
        fi
        echo "link host$i:$ai=$subnet.1 host$j:$bj=$subnet.2$([[ $link -gt 0 && $rate != none ]] && echo " rate=$rate")"
      done
      pair=$((pair + 1))
    done
  done
  trap - ERR
  for ((i = 0; i < hosts; i++)); do echo "host $i ${prefix}h$i"; done
}

leftovers() {
  local prefix=$1
  ip netns list 2>/dev/null | awk '{print $1}' | grep "^${prefix}h[0-9]*$" || true
  ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${prefix}[ab][0-9]+$" || true
}

down() {
  local prefix=$1 ns dev
  # Deleting a namespace deletes the veth ends in it, and with them their peers.
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${prefix}h[0-9]*$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns"
  done
  for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${prefix}[ab][0-9]+$" || true); do
    ip link del "$dev" 2>/dev/null || true
  done
  check "$prefix"
}

check() {
  local left
  left=$(leftovers "$1")
  if [[ -n "$left" ]]; then
    echo "testnet: left behind by prefix $1:" $left >&2
    return 1
  fi
}

bench() {
  local links=1 rate=none bin=${UCCL_TCPX_BENCH_BIN:-target/release/uccl-tcpx-bench}
  local server_args=()
  while (($#)); do
    case $1 in
      --data-links) links=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      --bin) bin=$2; shift 2 ;;
      --server-arg) server_args+=("$2"); shift 2 ;;
      --) shift; break ;;
      *) die "unknown option $1 (bench options, then -- and the bench's own)" ;;
    esac
  done
  [[ -x "$bin" ]] || die "no bench binary at $bin (cargo build --release -p uccl-tcpx-bench, or --bin)"
  local prefix="tb$$"
  prefix=${prefix:0:8}
  trap 'down "'"$prefix"'" >/dev/null 2>&1 || true' EXIT INT TERM
  up "$prefix" --data-links "$links" --rate "$rate" >&2
  # The server takes port 0 and announces the one it got; the client starts once it listens. The
  # bench's own arguments go to the client (a server follows the client's settings).
  coproc SERVER { ip netns exec "${prefix}h1" env UCCL_TCPX_IFNAME=ctl0 "$bin" --role server --port 0 --announce ${server_args[@]+"${server_args[@]}"} 2>&1; }
  local line port="" out
  # A copy of the coprocess's output descriptor, which bash would not hand to a background job.
  exec {out}<&"${SERVER[0]}"
  while IFS= read -r -t 60 line <&"$out"; do
    if [[ "$line" =~ ^LISTENING\ ([0-9]+)$ ]]; then
      port=${BASH_REMATCH[1]}
      break
    fi
    echo "[server] $line" >&2
  done
  [[ -n "$port" ]] || die "the bench server on test host 1 did not start"
  sed 's/^/[server] /' <&"$out" >&2 &
  local rc=0
  ip netns exec "${prefix}h0" env UCCL_TCPX_IFNAME=ctl1 "$bin" --role client --remote-ip 198.18.0.2 \
    --port "$port" "$@" || rc=$?
  wait 2>/dev/null || true
  return "$rc"
}

cmd=${1:-}
[[ -n "$cmd" ]] || die "usage: scripts/testnet.sh up|down|check|exec|link|rate|bench ..."
shift
case $cmd in
  up) check_prefix "${1:-}"; up "$@" ;;
  down) check_prefix "${1:-}"; down "$1" ;;
  check) check_prefix "${1:-}"; check "$1" ;;
  exec)
    check_prefix "${1:-}"
    [[ "${2:-}" =~ ^[0-9]+$ ]] || die "exec PREFIX HOST CMD..."
    ns="${1}h$2"
    shift 2
    exec ip netns exec "$ns" "$@"
    ;;
  link)
    check_prefix "${1:-}"
    [[ $# -eq 4 && "$4" =~ ^(up|down)$ ]] || die "link PREFIX HOST IFACE up|down"
    ip -n "${1}h$2" link set "$3" "$4"
    ;;
  rate)
    check_prefix "${1:-}"
    [[ $# -eq 4 ]] || die "rate PREFIX HOST IFACE RATE|none"
    shape "${1}h$2" "$3" "$4"
    ;;
  bench) bench "$@" ;;
  *) die "unknown command $cmd" ;;
esac
