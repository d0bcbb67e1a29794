#!/usr/bin/env bash
# Round trips of a client's connect: a coordinator and a comm server, each behind a proxy that
# delays every chunk by DELAY_MS in each direction (bench/rtt/delay.py), and `meshctl pub`
# (log in, attach, publish, close) timed through them, for each meshctl binary given.
# TCP handshakes with the proxies are local, so they cost no delay; every other round trip
# costs 2 x DELAY_MS.
#
#   cargo build -p coordinator -p commserver -p meshctl
#   bench/rtt/connect-rtt.sh [ROUNDS] [DELAY_MS] MESHCTL...   # e.g. 3 25 target/debug/meshctl
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}; delay_ms=${2:-25}; shift 2 || true
[ $# -gt 0 ] || set -- target/debug/meshctl
export RELAYMESH_CLUSTER_SECRET=rtt-secret
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
coord=$(free_port); coord_proxy=$(free_port); server=$(free_port); server_proxy=$(free_port)
delay=$(python3 -c "print($delay_ms/1000)")
target/debug/coordinator --listen "127.0.0.1:$coord" >"$work/coordinator.log" 2>&1 & pids+=($!)
python3 bench/rtt/delay.py "$coord_proxy" "$coord" "$delay" & pids+=($!)
python3 bench/rtt/delay.py "$server_proxy" "$server" "$delay" & pids+=($!)
target/debug/commserver --coordinator "ws://127.0.0.1:$coord" --listen "127.0.0.1:$server" \
  --public-url "ws://127.0.0.1:$server_proxy" >"$work/commserver.log" 2>&1 & pids+=($!)
target/debug/meshctl wait --coordinator "ws://127.0.0.1:$coord" --servers 1 >/dev/null
echo "delay ${delay_ms} ms each way (round trip $((2 * delay_ms)) ms); meshctl pub, ms:"
for _ in $(seq "$rounds"); do
  for meshctl in "$@"; do
    start=$(date +%s%N)
    "$meshctl" pub --coordinator "ws://127.0.0.1:$coord_proxy" rtt hello >/dev/null
    echo "$meshctl $(( ($(date +%s%N) - start) / 1000000 ))"
  done
done
