#!/usr/bin/env bash
# Runs a command (a bench run) once the machine has been quiet, and says how much CPU anything
# else used while it ran: on a shared 2-core machine a build next door moves the figures.
#
#   bench/quiet.sh [--quiet-s N] [--max-wait-s N] [--max-other-s S --attempts K] -- COMMAND...
#
# Quiet: the whole machine's busy CPU (all cores, /proc/stat) stayed under 5 % of one core for
# N seconds in a row (default 30); after --max-wait-s (default 1800) it runs anyway and says
# so. Afterwards it prints, on stderr, the machine's busy CPU-seconds during the run, the
# command's own (user + system, the servers it started and reaped included) and the
# difference: what other work took. With --max-other-s, a run during which other work took
# more than S CPU-seconds is discarded and the command runs again (after the machine is quiet
# again), at most K times in all (default 3); the exit status is 3 when none was clean.
set -euo pipefail

quiet_s=30
max_wait_s=1800
max_other_s=""
attempts=3
while [ $# -gt 0 ]; do
  case "$1" in
    --quiet-s) quiet_s=$2; shift 2 ;;
    --max-wait-s) max_wait_s=$2; shift 2 ;;
    --max-other-s) max_other_s=$2; shift 2 ;;
    --attempts) attempts=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--quiet-s N] [--max-wait-s N] -- COMMAND..." >&2; exit 2; }

hz=$(getconf CLK_TCK)
# Busy jiffies of all cores: user nice system irq softirq steal.
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }

run_once() {
  local waited=0 calm=0 b0 b1
  while [ "$calm" -lt "$quiet_s" ]; do
    if [ "$waited" -ge "$max_wait_s" ]; then
      echo "quiet.sh: the machine was not quiet for ${quiet_s} s within ${max_wait_s} s; running anyway" >&2
      break
    fi
    b0=$(busy); sleep 1; b1=$(busy)
    waited=$((waited + 1))
    if [ $((b1 - b0)) -le $((hz / 20)) ]; then calm=$((calm + 1)); else calm=0; fi
  done
  echo "quiet.sh: quiet for ${calm} s (waited ${waited} s); running: $*" >&2

  local start end t0 t1 own own_jiffies
  start=$(busy)
  t0=$(date +%s.%N)
  # In a subshell, whose children's CPU (the command's, its reaped servers included) is read
  # from its own /proc/PID/stat (fields cutime, cstime) once the command has ended.
  own=$(bash -c '"$@" >&2; rc=$?; read -ra f </proc/$$/stat; echo "$((f[15] + f[16])) $rc"' _ "$@")
  end=$(busy)
  t1=$(date +%s.%N)
  read -r own_jiffies rc <<<"$own"
  other_jiffies=$((end - start - own_jiffies))
  awk -v b="$((end - start))" -v hz="$hz" -v own="$own_jiffies" -v t0="$t0" -v t1="$t1" 'BEGIN {
    printf "quiet.sh: %.0f s; machine busy %.1f CPU-s, the command %.1f CPU-s, other work %.1f CPU-s\n",
      t1 - t0, b / hz, own / hz, (b - own) / hz
  }' >&2
}

for attempt in $(seq "$attempts"); do
  run_once "$@"
  if [ -z "$max_other_s" ] || [ "$other_jiffies" -le $((max_other_s * hz)) ]; then
    exit "$rc"
  fi
  echo "quiet.sh: attempt $attempt discarded: other work took more than ${max_other_s} CPU-s" >&2
done
exit 3
