#!/usr/bin/env bash
# The README's test command: every test of the workspace (unit, doc tests of the README and the
# crates, end-to-end in-process and as real processes), the PostgreSQL account store included.
#
# What it needs, beyond Rust (cargo) and bash:
#   - PostgreSQL's server binaries (Debian's `postgresql` package), for the PostgreSQL account
#     store, and `curl` and `openssl`, which the README's shell examples (run as tests) use. When
#     one is missing and this runs as root with apt-get, it installs the package (that needs the
#     network); otherwise it stops and says what to install. It needs nothing else: no Python,
#     no running database.
#   - As root, `runuser` (util-linux) to run the server as the package's `postgres` user, since
#     PostgreSQL refuses to run as root.
# It starts a throwaway server on 127.0.0.1 (trust auth, a fresh data directory under /tmp),
# points the tests at it with RELAYMESH_TEST_POSTGRES_URL, and stops and deletes it afterwards.
# Every test binary runs even when one fails (`--no-fail-fast`); the failed tests are listed at
# the end and the exit status is non-zero. Extra arguments go to `cargo test` (and skip the
# TypeScript client's tests, which need Node.js 20 and npm and otherwise run last).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "scripts/test.sh: $*" >&2; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
root() { [[ $(id -u) -eq 0 ]]; }

missing=()
[[ -n "$(pg_bin)" ]] || missing+=(postgresql)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
if [[ ${#missing[@]} -gt 0 ]]; then
  if root && command -v apt-get >/dev/null; then
    say "installing Debian's ${missing[*]} (needed by the tests)"
    apt_log=$(mktemp)
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      say "installing ${missing[*]} failed (the apt-get output is above)"
      exit 1
    fi
    rm -f "$apt_log"
  else
    say "missing: ${missing[*]}; install Debian's packages of those names (apt-get install ${missing[*]}) and run again"
    exit 1
  fi
fi
bin=$(pg_bin)
if root && ! command -v runuser >/dev/null; then
  say "runuser not found (util-linux): it is needed to run PostgreSQL as the postgres user"
  exit 1
fi

dir=$(mktemp -d /tmp/relaymesh-pg.XXXXXX)
# PostgreSQL refuses to run as root: as root, the server runs as the package's postgres user,
# from a directory it may enter (the repository may be under /root).
as_pg() {
  if root; then (cd "$dir" && runuser -u postgres -- "$@"); else "$@"; fi
}
if root; then chown postgres "$dir"; fi
stop() {
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT
as_pg "$bin/initdb" -D "$dir/data" -U relaymesh --auth=trust >/dev/null

# A port below the kernel's ephemeral range (which starts at 32768), so the tests' own outbound
# connections cannot take it; if one is in use the server fails to start and the next is tried.
port=""
for attempt in $(seq 1 20); do
  candidate=$((20000 + (RANDOM * 32768 + RANDOM + attempt * 7919) % 12000))
  if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
    -o "-p $candidate -k $dir -c listen_addresses=127.0.0.1" start >/dev/null 2>&1; then
    port=$candidate
    break
  fi
done
if [[ -z "$port" ]]; then
  say "the throwaway PostgreSQL server did not start; its log:"
  cat "$dir/server.log" >&2 || true
  exit 1
fi
echo "== PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (throwaway)"
export RELAYMESH_TEST_POSTGRES_URL="postgres://relaymesh@127.0.0.1:$port/postgres"

log="$dir/cargo-test.log"
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
if [[ $status -ne 0 ]]; then
  echo
  echo "== failed (exit status $status)"
  grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/  \1/' | sort -u || true
  grep -E -A20 '^error: [0-9]+ targets? failed' "$log" | grep -E '^error|^    ' || true
  exit "$status"
fi

# The TypeScript client (clients/typescript) against this build's coordinator and comm server
# processes, with Node.js's test runner; skipped when arguments picked some of the Rust tests.
if [[ $# -eq 0 ]]; then
  if ! command -v node >/dev/null || ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    say "the TypeScript client's tests need Node.js 20 or later with npm (found: $(node --version 2>/dev/null || echo none))"
    exit 1
  fi
  echo "== TypeScript client: clients/typescript (Node.js $(node --version))"
  bins="$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)"
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error &&
    RELAYMESH_BIN_DIR="$bins" npm test)
fi
