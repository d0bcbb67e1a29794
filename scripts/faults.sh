#!/usr/bin/env bash
# The fault suite: a cluster of real processes, each in a network namespace of its own, with
# the simulation driving it from another, and one fault injected from outside per run.
#
#   sudo scripts/faults.sh [--quick] [--bin-dir DIR] [--faults "none kill stop ..."] [--keep]
#
# Faults (each a fresh cluster: a coordinator, three comm servers s1..s3, the simulation):
#   none         no fault: the baseline
#   kill         s3 killed with SIGKILL, started again 3 s later
#   stop         s3 frozen with SIGSTOP for 10 s (longer than the peer heartbeat timeout), then SIGCONT
#   blackhole    every packet between s1 and s2 dropped for 10 s (the processes keep running)
#   loss         5 % of s3's packets dropped, both ways, for 10 s
#   partition    s3 cut off from everyone for 10 s
#   coordinator  the coordinator killed with SIGKILL and started again 2 s later
# For each it prints a row: delivered of expected, what was lost and by which cause the
# simulation could prove (slow consumer and peer gap: told by Dropped notices; server failure:
# in a gap of a stream whose receiver or publisher lost its server; late: arrived after the
# drain; unexplained: none of these),
# what the receivers were told (Dropped notices, disconnects), how long the fault took to detect
# (the coordinator no longer offering the server, or the peer link given up) and to recover from
# (the cluster whole again), and the comm servers' largest RSS.
#
# --quick (what .ci/run runs): the kill and partition faults, shorter and lighter (and a drain
# that outlasts the fault), with the debug binaries (target/debug). Every run fails unless the cluster is whole after each fault,
# nothing was duplicated, reordered or misrouted, and no loss was unexplained.
#
# Needs root (network namespaces), iproute2, iptables, curl and jq; as root with apt-get it
# installs the missing ones. Loopback only: every address is in 10.77.0.0/24, inside
# namespaces this script creates and deletes. Latency injection (tc netem) is not used: the
# kernels this was built on have no sch_netem.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "scripts/faults.sh: $*" >&2; }
quick=0
keep=0
bin_dir=target/release
faults="none kill stop blackhole loss partition coordinator"
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) quick=1; faults="kill partition"; bin_dir=target/debug; shift ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --faults) faults=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) say "unknown argument $1"; exit 2 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { say "needs root (network namespaces)"; exit 1; }

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
if [[ ${#missing[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || { say "missing: ${missing[*]}"; exit 1; }
  say "installing Debian's ${missing[*]}"
  apt_log=$(mktemp)
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    exit 1
  fi
fi
for b in coordinator commserver simulation; do
  [[ -x $bin_dir/$b ]] || { say "$bin_dir/$b missing: cargo build --release -p coordinator -p commserver -p simulation"; exit 1; }
done
bin_dir=$(cd "$bin_dir" && pwd)

if [[ $quick -eq 1 ]]; then
  # The fault ends (2 s + detection + 4 s) after the 8 s of publishing: the drain outlasts it,
  # so what a healed link replays or reports arrives before the simulation counts it lost. It
  # ends as soon as everything expected has arrived.
  duration=8; fault_at=2; hold=4; sim_args=(--clients 60 --room-size 6 --rate 5 --drain 10)
else
  duration=30; fault_at=8; hold=10; sim_args=()
fi
secret=fault-suite-secret
tag=rf$$
work=$(mktemp -d /tmp/relaymesh-faults.XXXXXX)
nodes=(c s1 s2 s3 g)
declare -A addr=([c]=10.77.0.1 [s1]=10.77.0.11 [s2]=10.77.0.12 [s3]=10.77.0.13 [g]=10.77.0.100)
declare -A pid=()

ns() { echo "$tag-$1"; }
in_ns() { local node=$1; shift; ip netns exec "$(ns "$node")" "$@"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

network_up() {
  ip netns add "$(ns sw)"
  in_ns sw ip link add br0 type bridge
  in_ns sw ip link set br0 up
  for node in "${nodes[@]}"; do
    ip netns add "$(ns "$node")"
    in_ns "$node" ip link set lo up
    ip link add "$tag$node" type veth peer name "$tag${node}b"
    ip link set "$tag$node" netns "$(ns "$node")"
    ip link set "$tag${node}b" netns "$(ns sw)"
    in_ns sw ip link set "$tag${node}b" master br0
    in_ns sw ip link set "$tag${node}b" up
    in_ns "$node" ip addr add "${addr[$node]}/24" dev "$tag$node"
    in_ns "$node" ip link set "$tag$node" up
  done
}

network_down() {
  for node in "${nodes[@]}" sw; do ip netns del "$(ns "$node")" 2>/dev/null || true; done
}

stop_all() {
  for key in "${!pid[@]}"; do
    kill -CONT "${pid[$key]}" 2>/dev/null || true
    kill -KILL "${pid[$key]}" 2>/dev/null || true
    wait "${pid[$key]}" 2>/dev/null || true
    unset "pid[$key]"
  done
}

cleanup() {
  stop_all
  network_down
  if [[ $keep -eq 1 ]]; then say "logs and reports kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# `ip netns exec` and `env` exec what they run, so `$!` is the server's own pid.
start_coordinator() {
  ip netns exec "$(ns c)" env RELAYMESH_CLUSTER_SECRET=$secret RUST_LOG=warn \
    "$bin_dir/coordinator" --listen "${addr[c]}:7400" >>"$work/coordinator.log" 2>&1 &
  pid[c]=$!
}

start_server() {
  local s=$1
  ip netns exec "$(ns "$s")" env RELAYMESH_CLUSTER_SECRET=$secret RUST_LOG=warn \
    "$bin_dir/commserver" --coordinator "ws://${addr[c]}:7400" --listen "${addr[$s]}:7500" \
    --id "$s" >>"$work/$s.log" 2>&1 &
  pid[$s]=$!
}

# JSON from a URL, seen from the generator's namespace; empty when unreachable.
stats() { in_ns g curl -s --max-time 1 "$1" || true; }
coordinator_stats() { stats "http://${addr[c]}:7400/v1/stats"; }
server_stats() { stats "http://${addr[$1]}:7500/v1/stats"; }

# Whether the coordinator offers all three servers and each has both peers.
whole() {
  local offered
  offered=$(coordinator_stats | jq '[.servers[]? | select(.eligible)] | length' 2>/dev/null || echo 0)
  [[ $offered == 3 ]] || return 1
  for s in s1 s2 s3; do
    [[ $(server_stats "$s" | jq '.peers' 2>/dev/null || echo 0) == 2 ]] || return 1
  done
}

# Waits (polling every 100 ms, at most $2 s) until "$1" succeeds; prints the ms it took.
wait_for() {
  local check=$1 limit_ms=$(($2 * 1000)) start
  start=$(now_ms)
  while ! $check; do
    if (($(now_ms) - start > limit_ms)); then
      echo "-"
      return 1
    fi
    sleep 0.1
  done
  echo $(($(now_ms) - start))
}

s3_not_offered() {
  [[ $(coordinator_stats | jq '[.servers[]? | select(.id == "s3" and .eligible)] | length' 2>/dev/null) == 0 ]]
}
s1_lost_a_peer() { [[ $(server_stats s1 | jq '.peers' 2>/dev/null || echo 2) -lt 2 ]]; }
three_registered() { [[ $(coordinator_stats | jq '.servers | length' 2>/dev/null || echo 0) == 3 ]]; }

# Drops every packet of $1 to and from $2 (an address or "all").
cut() {
  local node=$1 peer=$2
  if [[ $peer == all ]]; then
    in_ns "$node" iptables -A INPUT -i "$tag$node" -j DROP
    in_ns "$node" iptables -A OUTPUT -o "$tag$node" -j DROP
  else
    in_ns "$node" iptables -A INPUT -s "$peer" -j DROP
    in_ns "$node" iptables -A OUTPUT -d "$peer" -j DROP
  fi
}
lossy() {
  in_ns "$1" iptables -A INPUT -i "$tag$1" -m statistic --mode random --probability 0.05 -j DROP
  in_ns "$1" iptables -A OUTPUT -o "$tag$1" -m statistic --mode random --probability 0.05 -j DROP
}
heal() { in_ns "$1" iptables -F; }

max_rss_mib() {
  local most=0 rss
  for s in s1 s2 s3; do
    rss=$(server_stats "$s" | jq '.process.rss_bytes // 0' 2>/dev/null || echo 0)
    ((rss > most)) && most=$rss
  done
  echo $((most / 1048576))
}

failed=0
rows=()
network_up
for fault in $faults; do
  : >"$work/coordinator.log"
  start_coordinator
  for s in s1 s2 s3; do start_server "$s"; done
  if ! wait_for whole 30 >/dev/null; then
    say "$fault: the cluster did not form; logs in $work"
    tail -5 "$work"/*.log >&2
    failed=1
    stop_all
    continue
  fi
  ip netns exec "$(ns g)" "$bin_dir/simulation" --coordinator "ws://${addr[c]}:7400" --duration "$duration" \
    --json "$work/$fault.json" --quiet "${sim_args[@]}" >"$work/$fault.sim.log" 2>&1 &
  sim=$!
  sleep "$fault_at"
  detect=- recover=-
  case $fault in
    none) ;;
    kill)
      kill -KILL "${pid[s3]}"; wait "${pid[s3]}" 2>/dev/null || true; unset "pid[s3]"
      detect=$(wait_for s3_not_offered 20 || true)
      sleep 3
      start_server s3
      ;;
    stop)
      kill -STOP "${pid[s3]}"
      detect=$(wait_for s3_not_offered 20 || true)
      sleep "$hold"
      kill -CONT "${pid[s3]}"
      ;;
    blackhole)
      cut s1 "${addr[s2]}"
      detect=$(wait_for s1_lost_a_peer 20 || true)
      sleep "$hold"
      heal s1
      ;;
    loss)
      lossy s3
      sleep "$hold"
      heal s3
      ;;
    partition)
      cut s3 all
      detect=$(wait_for s3_not_offered 20 || true)
      sleep "$hold"
      heal s3
      ;;
    coordinator)
      kill -KILL "${pid[c]}"; wait "${pid[c]}" 2>/dev/null || true; unset "pid[c]"
      sleep 2
      start_coordinator
      detect=$(wait_for three_registered 20 || true)
      ;;
  esac
  recover=$(wait_for whole 60 || true)
  [[ $recover == - ]] && { say "$fault: the cluster was not whole again within 60 s"; failed=1; }
  rss=$(max_rss_mib)
  wait "$sim" || true
  for s in s1 s2 s3; do server_stats "$s" >"$work/$fault.$s.stats.json" 2>/dev/null || true; done
  if ! jq -e . "$work/$fault.json" >/dev/null 2>&1; then
    say "$fault: the simulation wrote no report"; tail -20 "$work/$fault.sim.log" >&2
    failed=1
    stop_all
    continue
  fi
  read -r expected delivered lost slow gap failure late unexplained dropped disconnects \
    duplicates disorder misrouted errors < <(
    jq -r '[.expected, .delivered, .lost, .lost_by_cause.slow_consumer, .lost_by_cause.peer_gap,
            .lost_by_cause.server_failure, .lost_by_cause.late, .lost_by_cause.unexplained,
            .dropped_reported, .disconnects, .duplicates, .out_of_order, .misrouted,
            .publish_errors] | @tsv' "$work/$fault.json")
  if [[ $duplicates != 0 || $disorder != 0 || $misrouted != 0 ]]; then
    say "$fault: $duplicates duplicates, $disorder out of order, $misrouted misrouted"
    failed=1
  fi
  # Every lost message must have a cause: told (Dropped notices) or gone with a server failure
  # that its receiver or publisher saw.
  if [[ $unexplained != 0 ]]; then
    say "$fault: $unexplained of $lost lost messages unexplained (no Dropped notice, no server failure around them)"
    failed=1
  fi
  rows+=("| $fault | $delivered / $expected | $lost | $slow | $gap | $failure | $late | $unexplained | $dropped | $disconnects | $errors | $detect | $recover | $rss |")
  stop_all
done

echo
echo "| fault | delivered / expected | lost | lost: slow | lost: gap | lost: failure | lost: late | lost: unexplained | told dropped | disconnects | publish errors | detected (ms) | whole again (ms) | max server RSS (MiB) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
