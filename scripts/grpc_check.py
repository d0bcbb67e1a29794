#!/usr/bin/python3
"""The coordinator's admin API from a third-party gRPC client (Python's grpcio, Debian's
python3-grpcio), with no relaymesh code and no generated stubs: what a generic tool sees.

Usage: grpc_check.py BIN_DIR

Starts a coordinator (admin API on) and two comm servers from BIN_DIR on 127.0.0.1, then
through grpcio: lists the services by server reflection, checks health, calls
Admin/ListServers with the token (and without it: UNAUTHENTICATED), and stops everything.
Messages are encoded and decoded by hand (a few protobuf fields), since the point is that
nothing of relaymesh's is needed. Exits non-zero with a message on any difference.
"""

import os
import re
import subprocess
import sys
import threading
import time

import grpc

TOKEN = "ci-admin-token-0123456789abcdef"
SECRET = "ci-cluster-secret"


def varint(data, i):
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def fields(data):
    """(field number, wire type, value) of a protobuf message; value is bytes or an int."""
    i, out = 0, []
    while i < len(data):
        key, i = varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            length, i = varint(data, i)
            value, i = data[i : i + length], i + length
        else:
            raise ValueError(f"unexpected wire type {wire}")
        out.append((number, wire, value))
    return out


def start(bin_dir, name, args, env):
    full = dict(os.environ, RUST_LOG="info", RELAYMESH_CLUSTER_SECRET=SECRET, **env)
    return subprocess.Popen(
        [os.path.join(bin_dir, name), *args],
        env=full,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_lines(proc, *patterns):
    """The first match of each of `patterns` in the process's log, in whatever order."""
    found = {}
    while len(found) < len(patterns):
        line = proc.stderr.readline()
        if not line:
            sys.exit(f"grpc_check: the process ended before logging {patterns!r}")
        for pattern in patterns:
            match = re.search(pattern, line)
            if match and pattern not in found:
                found[pattern] = match
    return [found[p] for p in patterns]


def main():
    bin_dir = sys.argv[1]
    procs = []
    try:
        coordinator = start(
            bin_dir,
            "coordinator",
            ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            {"RELAYMESH_ADMIN_TOKEN": TOKEN},
        )
        procs.append(coordinator)
        admin, url = (
            m.group(1)
            for m in wait_lines(
                coordinator,
                r"admin API listening on (\S+)",
                r"coordinator listening on (\S+)",
            )
        )
        ids = []
        for _ in range(2):
            server = start(
                bin_dir,
                "commserver",
                ["--coordinator", f"ws://{url}", "--listen", "127.0.0.1:0"],
                {},
            )
            procs.append(server)
            listening, _ = wait_lines(
                server, r"comm server listening on (\S+)", "registered with the coordinator"
            )
            ids.append(listening.group(1))

        # Their logs from here on are not read: drained so no process blocks on a full pipe.
        for proc in procs:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
        channel = grpc.insecure_channel(admin)
        raw = lambda b: b  # noqa: E731 (messages stay bytes)

        # Reflection: ServerReflectionRequest{list_services: ""} (field 7).
        reflect = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=raw,
            response_deserializer=raw,
        )
        answer = next(reflect(iter([b"\x3a\x00"]), timeout=10))
        services = set()
        for number, _, value in fields(answer):
            if number == 6:  # list_services_response
                for _, _, service in fields(value):
                    for n, _, name in fields(service):
                        if n == 1:
                            services.add(name.decode())
        for wanted in ["relaymesh.admin.v1.Admin", "relaymesh.admin.v1.Backend", "grpc.health.v1.Health"]:
            if wanted not in services:
                sys.exit(f"grpc_check: reflection lists {sorted(services)}, not {wanted}")

        # Health: HealthCheckRequest{service: ""}; SERVING is 1 (field 1).
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=raw,
            response_deserializer=raw,
        )
        deadline = time.time() + 15
        while True:
            status = dict((n, v) for n, _, v in fields(check(b"", timeout=5))).get(1, 0)
            if status == 1:
                break
            if time.time() > deadline:
                sys.exit(f"grpc_check: health status {status}, not SERVING")
            time.sleep(0.2)

        # Admin/ListServers: refused without the token, the two servers with it.
        list_servers = channel.unary_unary(
            "/relaymesh.admin.v1.Admin/ListServers",
            request_serializer=raw,
            response_deserializer=raw,
        )
        try:
            list_servers(b"", timeout=5)
            sys.exit("grpc_check: ListServers without a token was answered")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                sys.exit(f"grpc_check: without a token: {e.code()}, not UNAUTHENTICATED")
        answer = list_servers(
            b"", timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")]
        )
        listed = sorted(
            dict((n, v) for n, _, v in fields(server))[1].decode()
            for n, _, server in fields(answer)
            if n == 1
        )
        if listed != sorted(ids):
            sys.exit(f"grpc_check: ListServers gave {listed}, not {sorted(ids)}")
        print(f"grpc_check: ok: reflection, health, and ListServers ({len(listed)} servers) through grpcio {grpc.__version__}")
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
