#!/usr/bin/env bash
# Receiving a 1 -> 10 fan-out: delivered messages per client CPU-second of the TypeScript
# client under Node.js, beside relaymesh's Rust client and beside nats.js against nats-server,
# alternated RUNS times in one run (absolute rates vary between machines; the ratios are the
# figures). Servers (release coordinator and comm server, Debian's nats-server) are pinned to
# CPU 0, the clients to CPU 1. Prints one JSON line per run and a summary.
#
#   cargo build --release -p coordinator -p commserver -p bench
#   cd clients/typescript && npm ci && npm run build
#   bench/client-fanout.sh [RUNS] [RATE] [SECONDS]    # defaults 3, 5000 published/s, 10 s
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
rate=${2:-5000}
seconds=${3:-10}
bin=../../target/release
command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

addr_of() { # the address in a `listening on ADDR` (or nats' `connections on ADDR`) log line
  for _ in $(seq 200); do
    a=$(grep -oE "(listening on|client connections on) [0-9.:]+" "$1" | head -1 | awk '{print $NF}') || true
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.05
  done
  echo "no address in $1" >&2; cat "$1" >&2; exit 1
}

export RELAYMESH_CLUSTER_SECRET=client-fanout-bench
taskset -c 0 "$bin/coordinator" --listen 127.0.0.1:0 2>"$work/coordinator.log" & pids+=($!)
coordinator=$(addr_of "$work/coordinator.log")
taskset -c 0 "$bin/commserver" --coordinator "ws://$coordinator" --listen 127.0.0.1:0 2>"$work/commserver.log" & pids+=($!)
addr_of "$work/commserver.log" >/dev/null
taskset -c 0 nats-server -a 127.0.0.1 -p -1 >"$work/nats.log" 2>&1 & pids+=($!)
nats=$(addr_of "$work/nats.log")

results="$work/results.jsonl"
for run in $(seq "$runs"); do
  for system in relaymesh relaymesh-rust nats; do
    url="http://$coordinator"; [ "$system" = nats ] && url="nats://$nats"
    taskset -c 1 node --experimental-websocket dist/bench/fanout.js --system "$system" --url "$url" \
      --bench-bin "$bin/bench" --rate "$rate" --seconds "$seconds" --topic "bench.fanout.$run" \
      | tee -a "$results"
  done
done
node -e '
  const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
  const pooled = (c) => { const r = rows.filter((x) => x.client === c);
    return r.reduce((n, x) => n + x.delivered, 0) / r.reduce((n, x) => n + x.cpu_s, 0); };
  const clients = [...new Set(rows.map((r) => r.client))];
  const ts = pooled("@relaymesh/client");
  console.log("\nclient | delivered per client CPU-second (pooled) | TypeScript client / this");
  for (const c of clients) console.log(`${c} | ${Math.round(pooled(c))} | ${(ts / pooled(c)).toFixed(2)}`);
' "$results"
