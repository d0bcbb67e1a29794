#!/usr/bin/env bash
# The README's test command: every test of the workspace, the PostgreSQL account store
# included. It needs Debian's PostgreSQL server binaries: when they are missing it installs the
# `postgresql` package with apt-get (as root; otherwise it stops and says what to install). It
# starts a throwaway server on 127.0.0.1 (trust auth, a fresh data directory under /tmp) for the
# run, points the tests at it with RELAYMESH_TEST_POSTGRES_URL, and stops and deletes it after.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
root() { [[ $(id -u) -eq 0 ]]; }

if [[ -z "$(pg_bin)" ]]; then
  if root; then
    echo "== installing Debian's postgresql package (server for the PostgreSQL account-store test)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
  else
    echo "scripts/test.sh: PostgreSQL server binaries not found; install Debian's postgresql package" >&2
    exit 1
  fi
fi
bin=$(pg_bin)

# PostgreSQL refuses to run as root: as root, the server runs as the package's postgres user.
as_pg() { if root; then runuser -u postgres -- "$@"; else "$@"; fi; }
dir=$(mktemp -d /tmp/relaymesh-pg.XXXXXX)
if root; then chown postgres "$dir"; fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stop() {
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT
as_pg "$bin/initdb" -D "$dir/data" -U relaymesh --auth=trust >/dev/null
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
echo "== PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (throwaway)"
export RELAYMESH_TEST_POSTGRES_URL="postgres://relaymesh@127.0.0.1:$port/postgres"

cargo test --workspace --locked "$@"
