# syntax=docker/dockerfile:1
#
# One image with the four binaries: coordinator, commserver, simulation, meshctl.
#
#   docker build -t relaymesh .
#   docker run --rm -e RELAYMESH_CLUSTER_SECRET=... -p 127.0.0.1:7400:7400 relaymesh \
#     coordinator --listen 0.0.0.0:7400
#
# scripts/deploy_check.sh checks this file without a Docker engine: it runs the builder
# stage's RUN commands from the repository root, checks that every file copied out of the
# builder exists afterwards and runs, and runs the HEALTHCHECK against real processes.

# The builder: the official Rust image at the toolchain the repository is built and tested
# with (rustc 1.95.0), on Debian 12 "bookworm" so that the binaries need no newer glibc than
# the runtime stage's (also bookworm, glibc 2.36).
FROM rust:1.95.0-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mount keeps downloaded crates between builds. It changes nothing that is built:
# target/ stays in the image layer, so the binaries can be copied out below.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked -p coordinator -p commserver -p simulation -p meshctl
# The release profile keeps line tables (debug = "line-tables-only", for profiles), which
# makes the binaries 51-125 MB each. strip --strip-debug drops them (10-26 MB each) and
# keeps the symbol table, so a backtrace still names its functions.
RUN mkdir -p target/image \
    && for b in coordinator commserver simulation meshctl; do \
         strip --strip-debug -o target/image/$b target/release/$b; \
       done

# The runtime: debian:bookworm-slim rather than gcr.io/distroless/cc-debian12.
# - Distroless is smaller (no shell, no package manager, fewer packages to patch) but a
#   HEALTHCHECK there needs a binary that can ask a comm server's /healthz over HTTP, and none
#   of ours can yet (meshctl's `wait` asks a coordinator only). bookworm-slim has bash, whose
#   /dev/tcp does it (deploy/docker/healthcheck.sh), plus a shell to debug in.
# - Kubernetes ignores HEALTHCHECK (it has its own httpGet probes), so a Kubernetes-only build
#   could use distroless: change the FROM below, drop the RUN useradd and healthcheck lines,
#   and use USER 65532 (distroless's nonroot). The binaries need only glibc and libgcc_s,
#   which both bases have.
FROM debian:bookworm-slim
# The system CA bundle, for wss:// and https:// URLs signed by a public CA (rustls reads it
# when no --ca is given). Copied from the builder, which has Debian's ca-certificates, rather
# than installed here, which would bring openssl with it.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /src/target/image/coordinator /usr/local/bin/coordinator
COPY --from=builder /src/target/image/commserver /usr/local/bin/commserver
COPY --from=builder /src/target/image/simulation /usr/local/bin/simulation
COPY --from=builder /src/target/image/meshctl /usr/local/bin/meshctl
COPY --chmod=0755 deploy/docker/healthcheck.sh /usr/local/bin/relaymesh-healthcheck
# A numeric, unprivileged user (Kubernetes' runAsNonRoot can check a number, not a name).
# /var/lib/relaymesh is its writable directory, e.g. for a SQLite account store.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/relaymesh \
        --shell /usr/sbin/nologin relaymesh \
    && mkdir -p /var/lib/relaymesh \
    && chown relaymesh:relaymesh /var/lib/relaymesh
USER 10001:10001
WORKDIR /var/lib/relaymesh
# 7400: coordinator (clients, comm servers, /healthz, /readyz, /metrics); 7401: its gRPC
# admin API when --admin-listen is given; 7500: comm server (clients, peers, /healthz ...).
EXPOSE 7400 7401 7500
# The port relaymesh-healthcheck asks; a comm server's container sets 7500.
ENV RELAYMESH_HEALTH_PORT=7400
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["relaymesh-healthcheck"]
# The binaries handle SIGTERM themselves (graceful shutdown; a comm server drains first) and
# start no child processes, so they run as PID 1 without an init. No ENTRYPOINT: the command
# names the binary, e.g. `commserver --coordinator ws://...`.
CMD ["coordinator", "--listen", "0.0.0.0:7400"]
