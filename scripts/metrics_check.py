#!/usr/bin/python3
"""`/metrics` of both services read by Prometheus's own Python client parser
(`prometheus_client.parser`, Debian's python3-prometheus-client): the text parses, every
figure `/v1/stats` has is a metric too, and the histograms fill.

Usage: metrics_check.py BIN_DIR

Starts a coordinator and two comm servers from BIN_DIR on 127.0.0.1, logs a client in over
`POST /v1/login` (so the login histograms have an observation), scrapes both services and
compares each `/metrics` with its `/v1/stats`. Exits non-zero with a message on any gap.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SECRET = "ci-cluster-secret"
# Fields that name a thing rather than measure it.
NAMES = {"id", "url", "version", "link", "dialed", "coordinator_id"}


def start(bin_dir, name, args):
    env = dict(os.environ, RUST_LOG="info", RELAYMESH_CLUSTER_SECRET=SECRET)
    return subprocess.Popen(
        [os.path.join(bin_dir, name), *args], env=env, stderr=subprocess.PIPE, text=True
    )


def wait_line(proc, pattern):
    while True:
        line = proc.stderr.readline()
        if not line:
            sys.exit(f"metrics_check: the process ended before logging {pattern!r}")
        match = re.search(pattern, line)
        if match:
            return match


def get(url):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def scrape(base):
    """{family name (counters without `_total`): [(labels, value)]} of `base`/metrics."""
    families = {}
    for family in text_string_to_metric_families(get(f"{base}/metrics")):
        samples = families.setdefault(family.name, [])
        for sample in family.samples:
            samples.append((sample.name, sample.labels, sample.value))
    return families


def check(base, prefix, arrays):
    stats = json.loads(get(f"{base}/v1/stats"))
    families = scrape(base)
    missing = []
    for key, value in stats.items():
        if key in NAMES:
            continue
        if key == "uptime_s":
            wanted = [f"{prefix}_uptime_seconds"]
        elif key == "process":
            wanted = ["process_cpu_seconds", "process_resident_memory_bytes"]
        elif key in arrays:
            label, family_prefix = arrays[key]
            for item in value:
                for field, v in item.items():
                    if field in NAMES:
                        continue
                    name = f"{family_prefix}_{field}"
                    labelled = [s for s in families.get(name, []) if s[1].get(label) == item["id"]]
                    if not labelled:
                        missing.append(f"{key}[].{field} ({name}{{{label}={item['id']!r}}})")
            continue
        else:
            wanted = [f"{prefix}_{key}"]
        missing += [f"{key} ({w})" for w in wanted if w not in families]
    if missing:
        sys.exit(f"metrics_check: {base}/metrics lacks what /v1/stats has: {', '.join(missing)}")
    return stats, families


def count(families, name):
    return next(v for (n, _, v) in families[name] if n == f"{name}_count")


def main():
    bin_dir = sys.argv[1]
    procs = []
    try:
        coordinator = start(bin_dir, "coordinator", ["--listen", "127.0.0.1:0"])
        procs.append(coordinator)
        addr = wait_line(coordinator, r"coordinator listening on (\S+)").group(1)
        servers = []
        for _ in range(2):
            server = start(
                bin_dir, "commserver", ["--coordinator", f"ws://{addr}", "--listen", "127.0.0.1:0"]
            )
            procs.append(server)
            servers.append(wait_line(server, r"comm server listening on (\S+)").group(1))
            wait_line(server, "registered with the coordinator")
        for proc in procs:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
        base = f"http://{addr}"
        # Until both servers are linked, /v1/stats lists them while they settle: wait.
        deadline = time.time() + 15
        while len(json.loads(get(f"{base}/v1/stats"))["servers"]) < 2:
            if time.time() > deadline:
                sys.exit("metrics_check: the servers did not register")
            time.sleep(0.1)
        login = urllib.request.Request(
            f"{base}/v1/login",
            data=json.dumps({"credentials": {"anonymous": {}}}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(login, timeout=10) as answer:
            json.load(answer)
        stats, families = check(
            base,
            "relaymesh_coordinator",
            {"servers": ("server", "relaymesh_coordinator_server")},
        )
        if count(families, "relaymesh_coordinator_login_placement_seconds") < 1:
            sys.exit("metrics_check: the login placement histogram has no observation")
        logins = next(v for (n, _, v) in families["relaymesh_coordinator_logins"])
        if logins != stats["logins"]:
            sys.exit(f"metrics_check: logins {logins} in /metrics, {stats['logins']} in /v1/stats")
        for server in servers:
            _, families = check(
                f"http://{server}",
                "relaymesh",
                {
                    "peer_links": ("peer", "relaymesh_peer"),
                    "coordinator_links": ("coordinator", "relaymesh_coordinator_link"),
                },
            )
            for histogram in [
                "relaymesh_subscribe_ack_seconds",
                "relaymesh_fanout_batch_messages",
                "relaymesh_queue_depth_at_drop",
            ]:
                count(families, histogram)
        print(
            "metrics_check: ok: both services' /metrics parse with prometheus_client and hold "
            "every /v1/stats figure"
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
