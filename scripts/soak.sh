#!/usr/bin/env bash
# The soak test: a coordinator and three comm servers as real processes on 127.0.0.1, driven by
# the simulation's churn scenario for a long time, with each process's resident memory, open
# file descriptors, threads, tokio tasks and the servers' own session counts sampled all along.
#
#   scripts/soak.sh [--minutes N] [--warmup MIN] [--interval S] [--bin-dir DIR] [--out DIR]
#                   [--clients N] [--churners N] [--rate R] [--churn-messages N]
#                   [--max-growth-pct P] [--max-growth-mib M] [--max-fd-growth N]
#   scripts/soak.sh --flood [--flood-clients N] [--floods N] [--allocators "glibc arena2 ..."]
#                   [--bin-dir DIR] [--out DIR]
#
# Soak (the default): `simulation --scenario churn` against the deployed cluster for --minutes
# (30): --clients (300) steady subscribers on a feed while --churners (20) workers keep cycling
# short-lived clients (log in, connect, subscribe to a room, publish --churn-messages (5) at
# --rate (5) msg/s to the feed, leave). Every --interval (5) s it samples each process's VmRSS,
# Threads (/proc/PID/status) and open descriptors (/proc/PID/fd), and what /v1/stats reports:
# a comm server's clients (sessions), topics, peers, peer interest and pending keys; the
# coordinator's view of the servers' clients, its negotiation links and logins. It writes
# soak.csv and soak.svg (RSS, fds, threads, tasks and sessions over time per process) to --out and
# prints, per process, the values at the end of the warm-up (--warmup minutes, 5) and at the
# end (medians over a minute) and the slope after warm-up (least squares, per 10 minutes).
#
# It fails (exit 1) when, after warm-up, a server process's RSS grew by more than
# --max-growth-pct (10) % of its warm-up value and by more than --max-growth-mib (2) MiB, or its
# descriptors or tokio tasks by more than 10 % and by more than --max-fd-growth (10); when a
# server still holds sessions, or more descriptors or tasks than before the load, once the
# simulation has left; or when the
# simulation's own check fails (`--check`: loss, duplicates, reordering, or sessions, topics or
# peer interest left over after the churn). The generator's own memory is recorded, not judged:
# it keeps per-publisher bookkeeping for every short-lived session, so it grows by design.
#
# --flood: memory after a connection flood, per allocator. For each configuration a fresh
# coordinator and one comm server; `simulation --scenario fanout --clients N --rate 1` connects N
# (--flood-clients, 10000) clients to it (all but one subscribed to one topic, one message a
# second: idle but for that), holds them 10 s and leaves; three times (--floods). The server's RSS is
# read idle, with the N clients connected, and 15 s after they left; for glibc, malloc_stats()
# (what the allocator holds and what is in use) and RSS after malloc_trim(0), both called in the
# server through gdb. Configurations (--allocators):
#   glibc       the default
#   arena2      MALLOC_ARENA_MAX=2
#   trim128k    MALLOC_TRIM_THRESHOLD_=131072
#   jemalloc    LD_PRELOAD of Debian's libjemalloc2 (skipped when not installed)
#   jemalloc-bg the same with MALLOC_CONF=background_thread:true (purges without allocator calls)
#   mimalloc    LD_PRELOAD of Debian's libmimalloc2.0 (skipped when not installed)
# The binaries are not rebuilt: every configuration is an environment variable or a preload.
#
# Needs the release binaries (coordinator, commserver, simulation), curl, jq and python3 (and
# gdb for --flood's trim figures); it installs nothing. Every process it starts is stopped on
# exit. Open files: each comm server and the generator need one descriptor per client; --flood
# raises the comm server's max_connections_per_ip above --flood-clients (all come from 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "scripts/soak.sh: $*" >&2; }
mode=soak
bin_dir=target/release
out=
minutes=30
warmup=
interval=5
clients=300
churners=20
rate=5
churn_messages=5
max_growth_pct=10
max_growth_mib=2
max_fd_growth=10
flood_clients=10000
floods=3
allocators="glibc arena2 trim128k jemalloc jemalloc-bg mimalloc"
while [[ $# -gt 0 ]]; do
  case $1 in
    --flood) mode=flood; shift ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --churners) churners=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --churn-messages) churn_messages=$2; shift 2 ;;
    --max-growth-pct) max_growth_pct=$2; shift 2 ;;
    --max-growth-mib) max_growth_mib=$2; shift 2 ;;
    --max-fd-growth) max_fd_growth=$2; shift 2 ;;
    --flood-clients) flood_clients=$2; shift 2 ;;
    --floods) floods=$2; shift 2 ;;
    --allocators) allocators=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) say "unknown argument $1"; exit 2 ;;
  esac
done

for tool in curl jq python3; do
  command -v "$tool" >/dev/null || { say "needs $tool"; exit 1; }
done
for b in coordinator commserver simulation; do
  [[ -x $bin_dir/$b ]] || { say "$bin_dir/$b missing: cargo build --release -p coordinator -p commserver -p simulation"; exit 1; }
done
bin_dir=$(cd "$bin_dir" && pwd)
[[ -n $out ]] || out=$(mktemp -d /tmp/relaymesh-soak.XXXXXX)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export RELAYMESH_CLUSTER_SECRET=soak-secret
export RUST_LOG=${RUST_LOG:-warn}

declare -A pid=()      # name -> pid of every process this script started
server_args=()         # more comm server flags
declare -A http=()     # name -> http://host:port of its /v1/stats
sampler=

stop_one() {
  local name=$1 p=${pid[$1]:-}
  [[ -n $p ]] || return 0
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "pid[$name]"
}
stop_all() {
  if [[ -n $sampler ]]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=
  fi
  for name in "${!pid[@]}"; do stop_one "$name"; done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
get() { curl -s --max-time 2 "$1" || true; }

# Starts the coordinator on a free port; sets $coord_port.
start_coordinator() {
  local tries
  for tries in 1 2 3; do
    coord_port=$(free_port)
    "$bin_dir/coordinator" --listen "127.0.0.1:$coord_port" >>"$out/coordinator.log" 2>&1 &
    pid[coordinator]=$!
    http[coordinator]=http://127.0.0.1:$coord_port
    for _ in $(seq 100); do
      [[ $(get "${http[coordinator]}/healthz") == ok ]] && return 0
      kill -0 "${pid[coordinator]}" 2>/dev/null || break
      sleep 0.1
    done
    stop_one coordinator
    say "coordinator did not come up on port $coord_port (try $tries)"
  done
  return 1
}

# Starts comm server $1 (its id); the rest are `env` arguments (allocator settings).
start_server() {
  local s=$1
  shift
  env "$@" "$bin_dir/commserver" --coordinator "ws://127.0.0.1:$coord_port" --listen 127.0.0.1:0 \
    --id "$s" "${server_args[@]}" >>"$out/$s.log" 2>&1 &
  pid[$s]=$!
}

# Waits until the coordinator offers $1 servers and each has $1 - 1 peers; fills http[].
wait_cluster() {
  local n=$1 deadline=$(($(now_ms) + 30000)) stats s url ok
  while (($(now_ms) < deadline)); do
    stats=$(get "${http[coordinator]}/v1/stats")
    ok=1
    [[ $(jq '[.servers[]? | select(.eligible)] | length' <<<"$stats" 2>/dev/null || echo 0) == "$n" ]] || ok=0
    if [[ $ok == 1 ]]; then
      for s in $(jq -r '.servers[].id' <<<"$stats"); do
        url=$(jq -r --arg s "$s" '.servers[] | select(.id == $s) | .url' <<<"$stats")
        http[$s]=${url/ws:/http:}
        [[ $(get "${http[$s]}/v1/stats" | jq '.peers' 2>/dev/null || echo -1) == $((n - 1)) ]] || ok=0
      done
    fi
    [[ $ok == 1 ]] && return 0
    sleep 0.2
  done
  say "the cluster did not form within 30 s; logs in $out"
  tail -5 "$out"/*.log >&2
  return 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# One CSV row per process: t_s,phase,process,pid,rss_kib,rss_anon_kib,fds,threads,tasks,sessions,
# topics,peers,remote_topics,keys_pending,negotiation_links,logins,messages_in
sample() {
  local t=$1 phase=$2 name p rss anon threads fds extra stats
  for name in coordinator s1 s2 s3 simulation; do
    p=${pid[$name]:-}
    [[ -n $p && -r /proc/$p/status ]] || continue
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    threads=$(awk '/^Threads:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    fds=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    extra=,,,,,,,,
    case $name in
      coordinator)
        stats=$(get "${http[coordinator]}/v1/stats")
        extra=$(jq -r '[.tasks, ([.servers[].clients] | add // 0), ([.servers[].topics] | add // 0),
          (.servers | length), "", ([.servers[].pending_keys] | add // 0), .negotiation_links,
          .logins, ""] | @csv' <<<"$stats" 2>/dev/null || echo ,,,,,,,,)
        ;;
      s?)
        stats=$(get "${http[$name]}/v1/stats")
        extra=$(jq -r '[.tasks, .clients, .topics, .peers, ([.peer_links[]?.remote_topics] | add // 0),
          .keys_pending, "", "", .messages_in] | @csv' <<<"$stats" 2>/dev/null || echo ,,,,,,,,)
        ;;
    esac
    echo "$t,$phase,$name,$p,$rss,$anon,$fds,$threads,${extra//\"/}"
  done
}

soak() {
  local secs warm csv=$out/soak.csv sim_status=0 t0 t s sys0 use0 sys1 use1
  secs=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')
  if [[ -z $warmup ]]; then
    # 5 minutes, or a third of a short run.
    warmup=$(awk -v m="$minutes" 'BEGIN { print (m >= 15 ? 5 : m / 3) }')
  fi
  warm=$(awk -v m="$warmup" 'BEGIN { printf "%d", m * 60 }')
  say "output in $out"
  start_coordinator
  for s in s1 s2 s3; do start_server "$s"; done
  wait_cluster 3
  echo "t_s,phase,process,pid,rss_kib,rss_anon_kib,fds,threads,tasks,sessions,topics,peers,remote_topics,keys_pending,negotiation_links,logins,messages_in" >"$csv"
  # What each comm server's heap holds before the load (glibc's malloc_stats() through gdb).
  local -A heap_before=() heap_after=()
  if command -v gdb >/dev/null; then
    for s in s1 s2 s3; do heap_before[$s]=$(malloc_stats "${pid[$s]}" "$out/$s.log" || echo "- -"); done
    wait_cluster 3
  fi
  sample 0 before >>"$csv"
  say "churn for $secs s: $clients steady clients, $churners churners x $churn_messages messages at $rate msg/s; sampling every $interval s"
  t0=$(now_ms)
  "$bin_dir/simulation" --coordinator "ws://127.0.0.1:$coord_port" --scenario churn \
    --clients "$clients" --churners "$churners" --rate "$rate" --churn-messages "$churn_messages" \
    --duration "$secs" --json "$out/simulation.json" --check --quiet >"$out/simulation.log" 2>&1 &
  pid[simulation]=$!
  (
    while kill -0 "${pid[simulation]}" 2>/dev/null; do
      sample "$(awk -v a="$t0" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')" load >>"$csv"
      sleep "$interval"
    done
  ) &
  sampler=$!
  wait "${pid[simulation]}" || sim_status=$?
  unset "pid[simulation]"
  wait "$sampler" 2>/dev/null || true
  sampler=
  # The servers have had the simulation's own settle time; give them a few seconds more, then
  # every session and the descriptors it held must be gone.
  sleep 10
  t=$(awk -v a="$t0" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
  sample "$t" after >>"$csv"
  if command -v gdb >/dev/null; then
    for s in s1 s2 s3; do heap_after[$s]=$(malloc_stats "${pid[$s]}" "$out/$s.log" || echo "- -"); done
  fi
  stop_all

  echo
  tail -n 25 "$out/simulation.log"
  echo
  local verdict=0
  python3 scripts/soak_report.py --csv "$csv" --svg "$out/soak.svg" --warmup-s "$warm" \
    --max-growth-pct "$max_growth_pct" --max-growth-mib "$max_growth_mib" \
    --max-fd-growth "$max_fd_growth" \
    --title "relaymesh soak: churn, $clients steady + $churners churners, $minutes min" || verdict=1
  if [[ ${#heap_before[@]} -gt 0 ]]; then
    echo "glibc heap of each comm server before the load and after it left (malloc_stats(), MiB):"
    echo "| server | in use before | in use after | held by malloc before | held after |"
    echo "|---|---|---|---|---|"
    for s in s1 s2 s3; do
      read -r sys0 use0 <<<"${heap_before[$s]}"
      read -r sys1 use1 <<<"${heap_after[$s]:-- -}"
      echo "| $s | $(bytes_mib "$use0") | $(bytes_mib "$use1") | $(bytes_mib "$sys0") | $(bytes_mib "$sys1") |"
    done
    echo
  fi
  if [[ $sim_status != 0 ]]; then
    say "the simulation's check failed (exit $sim_status): see $out/simulation.log"
    verdict=1
  fi
  if ! jq -e '.churn.leaks_checked' "$out/simulation.json" >/dev/null 2>&1; then
    say "the simulation could not check the servers for leftovers"
    verdict=1
  else
    jq -r '.churn | "churn: \(.sessions) sessions (\(.sessions_per_s | floor)/s), \(.connect_failures) failed; left over: \(.leaked_sessions) sessions, \(.leaked_topics) topics, \(.leaked_remote_topics) peer-interest topics"' "$out/simulation.json"
  fi
  echo "samples: $csv"
  echo "plot:    $out/soak.svg"
  if [[ $verdict == 0 ]]; then echo "soak: passed"; else echo "soak: FAILED"; fi
  return $verdict
}

# ---- --flood ------------------------------------------------------------------------------

# The first of its arguments that exists (a glob's first match).
first() { local f; for f in "$@"; do [[ -e $f ]] && { echo "$f"; return 0; }; done; }

# Allocator configuration $1 as `env` arguments on stdout, one per line; fails when its library
# is missing.
alloc_env() {
  local lib
  case $1 in
    glibc) ;;
    arena2) echo MALLOC_ARENA_MAX=2 ;;
    trim128k) echo MALLOC_TRIM_THRESHOLD_=131072 ;;
    jemalloc | jemalloc-bg)
      lib=$(first /usr/lib/*-linux-gnu/libjemalloc.so.2)
      [[ -n $lib ]] || return 1
      echo "LD_PRELOAD=$lib"
      if [[ $1 == jemalloc-bg ]]; then echo MALLOC_CONF=background_thread:true; fi
      ;;
    mimalloc)
      lib=$(first /usr/lib/*-linux-gnu/libmimalloc.so.2)
      [[ -n $lib ]] || return 1
      echo "LD_PRELOAD=$lib"
      ;;
    *) say "unknown allocator configuration $1"; return 2 ;;
  esac
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
bytes_mib() { if [[ $1 =~ ^[0-9]+$ ]]; then awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; else echo -; fi; }
cpu_s() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

# glibc's malloc_stats() in process $1 (printed to its stderr, the log $2): "system in_use" bytes.
malloc_stats() {
  local p=$1 log=$2 before
  before=$(wc -l <"$log")
  gdb -p "$p" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1 || return 1
  sleep 0.2
  tail -n +"$((before + 1))" "$log" | awk '
    /^Total \(incl. mmap\):/ { total = 1; next }
    total && /system bytes/ { sys = $NF }
    total && /in use bytes/ { use = $NF }
    END { if (sys) print sys, use; else exit 1 }'
}

# "held / in use" (MiB) of glibc's heap in process $1 (its stderr is the log $2), or "-".
heap_cell() {
  local sys use
  if read -r sys use < <(malloc_stats "$1" "$2"); then
    echo "$(bytes_mib "$sys") / $(bytes_mib "$use")"
  else
    echo -
  fi
}

flood() {
  local rows=() alloc envs idle file conn after hwm trimmed cpu_trim round n s p log t0 cpu0 glibc heap heap_idle
  command -v gdb >/dev/null || say "gdb missing: no malloc_stats or malloc_trim figures"
  say "output in $out"
  # Every flood client and the script's own stats requests come from 127.0.0.1.
  echo "max_connections_per_ip = $((flood_clients + 100))" >"$out/commserver.toml"
  server_args=(--config "$out/commserver.toml")
  for alloc in $allocators; do
    if ! envs=$(alloc_env "$alloc"); then
      say "$alloc: library not installed, skipped"
      continue
    fi
    mapfile -t envs <<<"$envs"
    [[ ${#envs[@]} == 1 && -z ${envs[0]} ]] && envs=()
    log=$out/s1.log
    : >"$out/coordinator.log"
    start_coordinator
    : >"$log"
    start_server s1 "${envs[@]}"
    wait_cluster 1
    p=${pid[s1]}
    sleep 2
    glibc=0
    [[ $alloc != jemalloc* && $alloc != mimalloc ]] && command -v gdb >/dev/null && glibc=1
    idle=$(rss_kib "$p")
    file=$(awk '/^RssFile:/ {print $2}' "/proc/$p/status")
    heap_idle=-
    if [[ $glibc == 1 ]]; then
      heap_idle=$(heap_cell "$p" "$log")
      wait_cluster 1
    fi
    local cells=
    for round in $(seq "$floods"); do
      cpu0=$(cpu_s "$p")
      "$bin_dir/simulation" --coordinator "ws://127.0.0.1:$coord_port" --scenario fanout \
        --clients "$flood_clients" --rate 1 --duration 10 --quiet \
        >"$out/flood-$alloc.sim$round.log" 2>&1 &
      pid[simulation]=$!
      conn=0
      while kill -0 "${pid[simulation]}" 2>/dev/null; do
        n=$(get "${http[s1]}/v1/stats" | jq '.clients' 2>/dev/null || echo 0)
        if [[ $n == "$flood_clients" ]]; then
          s=$(rss_kib "$p")
          ((s > conn)) && conn=$s
        fi
        sleep 0.5
      done
      wait "${pid[simulation]}" || say "$alloc: flood $round: the simulation failed (see $out/flood-$alloc.sim$round.log)"
      unset "pid[simulation]"
      ((conn > 0)) || say "$alloc: flood $round: the server never reported $flood_clients clients"
      sleep 15
      after=$(rss_kib "$p")
      n=$(get "${http[s1]}/v1/stats" | jq '.clients' 2>/dev/null || echo '?')
      [[ $n == 0 ]] || say "$alloc: flood $round: $n clients still connected after the flood"
      heap=-
      [[ $glibc == 1 ]] && heap=$(heap_cell "$p" "$log")
      cells+=" $(mib "$conn") | $(mib "$after") | $heap | $(awk -v a="$(cpu_s "$p")" -v b="$cpu0" 'BEGIN { printf "%.1f", a - b }') |"
      say "$alloc: flood $round: idle $(mib "$idle") MiB, $flood_clients clients $(mib "$conn") MiB, after $(mib "$after") MiB"
    done
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status")
    trimmed=- cpu_trim=-
    if [[ $glibc == 1 ]]; then
      t0=$(cpu_s "$p")
      if gdb -p "$p" -batch -ex 'call (int)malloc_trim(0)' >/dev/null 2>&1; then
        sleep 0.5
        trimmed=$(mib "$(rss_kib "$p")")
        cpu_trim=$(awk -v a="$(cpu_s "$p")" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
      fi
    fi
    rows+=("| $alloc | $(mib "$idle") | $(mib "$file") | $heap_idle |$cells $(mib "$hwm") | $trimmed | $cpu_trim |")
    stop_all
    mv "$log" "$out/flood-$alloc.server.log"
  done
  echo
  echo "comm server RSS (MiB): idle, with $flood_clients clients connected (fanout, 1 msg/s) and 15 s after they"
  echo "left, $floods floods; glibc's heap (malloc_stats, MiB): held by malloc / in use; the server's CPU seconds per"
  echo "flood; its peak RSS; RSS after malloc_trim(0) following the last flood, and the CPU seconds the trim took"
  echo
  local head="| allocator | idle | of it file-backed | heap idle |" sep="|---|---|---|---|"
  for round in $(seq "$floods"); do
    head+=" flood $round: connected | after | heap after | CPU s |"
    sep+="---|---|---|---|"
  done
  echo "$head peak (VmHWM) | after malloc_trim(0) | trim CPU s |"
  echo "$sep---|---|---|"
  printf '%s\n' "${rows[@]}"
}

if [[ $mode == flood ]]; then flood; else soak; fi
