#!/usr/bin/env bash
# Where an idle client's bytes go in the comm server: runs `bench --scenarios idle` with the
# comm server under heaptrack, then sums the heap still held at the end (all clients connected,
# attached, subscribed to a topic each, idle) by what allocated it, per client. Kernel memory
# per connection (the TCP socket's slab objects, and buffer pages from /proc/net/sockstat)
# is sampled while the clients are connected and reported beside it.
#
#   cargo build --release -p coordinator -p bench
#   bench/idle-heap.sh [CLIENTS] [OUT]      # defaults: 10000 (below this host's open-file
#                                            # limit), bench/results/idle-heap
#
# heaptrack sees allocations through the C library's malloc, so the comm server profiled here
# is built without its `jemalloc` feature (into target/heaptrack, once; the figures are live
# bytes by allocation site, which do not depend on the allocator). RSS with the allocator the
# comm server ships with is what `bench --scenarios idle` measures.
#
# Needs heaptrack (apt-get install heaptrack) and python3; root for /proc/slabinfo (the
# kernel figures are left out otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-10000}
out=${2:-bench/results/idle-heap}
command -v heaptrack >/dev/null || { echo "needs heaptrack (apt-get install heaptrack)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$out"
cargo build --release --quiet -p commserver --no-default-features --target-dir target/heaptrack
ln -s "$PWD/target/release/coordinator" "$work/bin/coordinator"
printf '#!/bin/sh\nexec heaptrack -o %s/commserver %s/target/heaptrack/release/commserver "$@"\n' "$work" "$PWD" \
  > "$work/bin/commserver"
chmod +x "$work/bin/commserver"

# Kernel objects per socket while the clients are connected (largest sample).
( for _ in $(seq 100); do
    { grep -E '^(TCP|sock_inode_cache|filp|dentry) ' /proc/slabinfo 2>/dev/null || true; grep '^TCP:' /proc/net/sockstat; } \
      | tr '\n' ' '; echo; sleep 0.1
  done > "$work/kernel.log" ) &
sampler=$!
./target/release/bench --bin-dir "$work/bin" --systems relaymesh --scenarios idle \
  --idle-clients "$clients" --server-cpu 0 --out "$work/bench" > "$work/bench.log" 2>&1 &
bench=$!
# The comm server is killed the moment bench has measured it, every client still connected:
# the heap it held then is what is summed (heaptrack finishes its file once the process is
# gone). Killing it also matters because bench stops the process it started, heaptrack's
# script, not the comm server under it, which would go on dialling its coordinator's port.
until grep -q "idle clients: server RSS" "$work/bench.log"; do
  kill -0 "$bench" 2>/dev/null || { cat "$work/bench.log" >&2; exit 1; }
  sleep 0.05
done
pkill -KILL -f -- "--config $work/bench/run/commserver" || true
wait "$bench" || true
wait "$sampler"
for _ in $(seq 100); do
  pgrep -f -- "-o $work/commserver" >/dev/null || break
  sleep 0.1
done
heaptrack_print --print-flamegraph "$work/stacks.txt" --flamegraph-cost-type leaked \
  "$work"/commserver.*zst > "$work/summary.txt" 2>/dev/null

python3 - "$work/stacks.txt" "$work/kernel.log" "$clients" > "$out/breakdown.md" <<'PY'
import collections, re, sys
stacks, kernel, clients = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Each allocation site named by the innermost frame in relaymesh's code, the tokio task
# spawns and channel creations by where they happen.
ours = re.compile(r"\((session|routes|driver|writer|read|interest|accept|serve|ws|direct|backlog|"
                  r"closer|keys|control|presence|history|stats|inbox|peers|logins)\.rs\)")
sites = collections.Counter()
for line in open(stacks):
    stack, _, cost = line.rstrip("\n").rpartition(" ")
    frames = stack.split(";")
    here = [f for f in frames if ours.search(f)]
    where = here[-1].split(" (")[0] + " (" + here[-1].split(" (")[1] if here else "outside relaymesh's code"
    if "new_task" in stack:
        kind = "tokio task spawned in"
    elif "channel_from_index" in stack:
        kind = "tokio mpsc channel made in"
    elif "box_new_uninit" in stack:
        kind = "Box or Arc made in"
    else:
        kind = "allocated in"
    sites[f"{kind} {where}"] += int(cost)
total = sum(sites.values())
print(f"# Heap held per idle client in the comm server ({clients} clients)\n")
print(f"Heap held at the end: {total / 2**20:.1f} MiB, **{total / clients / 1024:.2f} KiB per client** "
      "(the process's own baseline included; `bench --scenarios idle` divides RSS growth instead).\n")
print("| bytes per client | share | what |\n|---|---|---|")
for what, cost in sites.most_common():
    if cost / clients < 16:
        continue
    print(f"| {cost / clients:.0f} | {100 * cost / total:.1f} % | {what} |")
peak = {}
for line in open(kernel):
    fields = line.split()
    for i, name in enumerate(fields):
        if name in ("TCP", "sock_inode_cache", "filp", "dentry") and i + 3 < len(fields) and fields[i + 1].isdigit():
            objs, size = int(fields[i + 1]), int(fields[i + 3])
            if objs * size > peak.get(name, (0, 0))[0] * peak.get(name, (0, 1))[1]:
                peak[name] = (objs, size)
    if "TCP:" in fields:
        at = fields.index("TCP:")
        inuse = int(fields[fields.index("inuse", at) + 1])
        mem = int(fields[fields.index("mem", at) + 1])
        # The buffer pages when the most sockets were open (every client connected, idle).
        if inuse >= peak.get("sockstat", (0, 0))[0]:
            peak["sockstat"] = (inuse, mem)
print("\n## Kernel memory per connection (not in the process's RSS)\n")
if "TCP" in peak:
    print("Largest sample of the slab caches while the clients were connected (both ends of every "
          "connection are on this host, so each client holds two TCP sockets):\n")
    print("| cache | objects | bytes each |\n|---|---|---|")
    for name in ("TCP", "sock_inode_cache", "filp", "dentry"):
        if name in peak:
            print(f"| {name} | {peak[name][0]} | {peak[name][1]} |")
    per_socket = sum(peak[n][1] for n in ("TCP", "sock_inode_cache", "filp", "dentry") if n in peak)
    print(f"\nAbout **{per_socket / 1024:.1f} KiB of slab per socket** (TCP + socket inode + file + dentry), "
          "per end of a connection.")
else:
    print("/proc/slabinfo was not readable (run as root).")
inuse, mem = peak.get("sockstat", (0, 0))
print(f"\nTCP buffer memory (`/proc/net/sockstat`) with the most sockets open ({inuse}): {mem} pages "
      f"in all, {4096 * mem / max(inuse, 1):.0f} bytes per socket.")
PY
cp "$work/bench/results.md" "$out/bench-results.md"
cat "$out/breakdown.md"
