#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a while, on its committed corpus (which it grows).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   # default: 30 s each, every target
#
# Needs the nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz, which it
# installs with `cargo install cargo-fuzz --locked` when missing. A crash stops it with the
# fuzzer's report and the input saved under fuzz/artifacts/TARGET/; replay it with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

say() { echo "scripts/fuzz.sh: $*" >&2; }
seconds=${1:-30}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(ws_frames envelopes dispatch_frame http_head topic config)

if ! cargo +nightly --version >/dev/null 2>&1; then
  say "the nightly toolchain is missing: rustup toolchain install nightly"
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
cargo +nightly fuzz build -O
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  log=$(mktemp)
  if ! cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log" >&2
    say "$target failed"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  echo "$target: $runs executions in ${seconds} s, no failure"
  rm -f "$log"
done
