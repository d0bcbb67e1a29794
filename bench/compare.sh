#!/usr/bin/env bash
# Side-by-side benchmark of relaymesh against NATS, Mosquitto and Redis pub/sub on this machine.
#
#   bench/compare.sh                         # every system and scenario (about 10 minutes)
#   bench/compare.sh --systems relaymesh,nats --scenarios fanout10
#   bench/compare.sh --smoke --systems relaymesh   # seconds: checks the harness works
#
# It installs nothing. The peers come from Debian's packages:
#   apt-get install -y --no-install-recommends nats-server mosquitto redis-server
# Servers run pinned to CPU 0, this load generator to CPU 1 (one thread), one system at a
# time; every server is started from bench/configs/ on 127.0.0.1 and stopped by PID.
# Results: bench/results/results.md and results.json (override with --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v taskset >/dev/null; then
  echo "compare.sh: taskset (package util-linux) is needed to pin servers and generator" >&2
  exit 1
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "compare.sh: needs 2 CPUs (servers on CPU 0, generator on CPU 1); this machine has $(nproc)" >&2
  exit 1
fi

cargo build --release --locked -q -p bench -p coordinator -p commserver
exec taskset -c 1 target/release/bench --server-cpu 0 "$@"
