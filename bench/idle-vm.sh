#!/usr/bin/env bash
# Runs the bench `idle` scenario (comm server memory per idle client at 10k, 25k and 50k
# clients) inside a throwaway virtual machine and copies results.json, results.md and the
# servers' logs back to the host.
#
# Why: each idle client holds one open file in the comm server and one in the generator, and a
# host whose RLIMIT_NOFILE hard limit is below the client count (20000 on our dev machines,
# without CAP_SYS_RESOURCE to raise it) reports the larger counts as "blocked". In the VM bench
# runs under PID 1, as root with every capability, after `ulimit -n 200000`.
#
# The VM: the Debian kernel from /boot and an initramfs as its whole root filesystem (static
# busybox, the three release binaries, the libraries ldd lists, bench/configs); loopback only,
# no disk, no network device. The console is printed here as the VM runs; the results come back
# as a base64 tar on a second serial port, and the VM powers off when bench ends.
# It uses KVM when KVM boots the kernel (a quick probe), else TCG emulation: about 15 times
# slower, so connect times mean little, but the same memory figures. /dev/kvm from the kvm_pvm
# module of nested sandboxes boots only PVM guest kernels, so those get TCG; there the servers
# are left unpinned by default (`--server-cpu ""`) as one emulated CPU cannot keep 25k up.
#
# Needs: the Debian packages qemu-system-x86 linux-image-amd64 busybox-static; root (or read
# access to /boot/vmlinuz-* and /dev/kvm).
#
# Usage: bench/idle-vm.sh [--bin-dir DIR] [--out DIR] [BENCH ARGS...]
#   --bin-dir DIR  prebuilt bench, coordinator and commserver (default: cargo build --release)
#   --out DIR      where results go (default: bench/results/idle-vm)
#   BENCH ARGS     passed on to bench, e.g. `--idle-clients 1000` for a quick check
# Environment: VM_MEM (default 6G), VM_CPUS (2), VM_TIMEOUT seconds (1800), VM_ACCEL (auto,
# kvm or tcg).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin_dir=""
out="$repo/bench/results/idle-vm"
user_args=()
while (($#)); do
    case "$1" in
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) user_args+=("$1"); shift ;;
    esac
done

die() { echo "idle-vm: $*" >&2; exit 1; }

# What the host needs; nothing is installed here.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
kernel=$(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V | tail -n 1)
[[ -n "$kernel" ]] || missing+=(linux-image-amd64)
busybox=$(command -v busybox || true)
# A dynamically linked busybox (the `busybox` package) would need its libraries in the VM.
if [[ -z "$busybox" ]] || ldd "$busybox" >/dev/null 2>&1; then missing+=(busybox-static); fi
if ((${#missing[@]})); then
    die "missing packages; install with: apt-get install -y --no-install-recommends ${missing[*]}"
fi
[[ -r "$kernel" ]] || die "cannot read $kernel (run as root)"

tmp=$(mktemp -d -t idle-vm.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

boot() { # LOG TIMEOUT QEMU-ARGS...: boots $kernel, console on stdout and in LOG
    local log=$1 secs=$2
    shift 2
    timeout "$secs" qemu-system-x86_64 -m "${VM_MEM:-6G}" -smp "${VM_CPUS:-2}" -nodefaults \
        -display none -no-reboot -kernel "$kernel" -serial stdio "$@" </dev/null | tee "$log"
}
# The probe boots the kernel with no root filesystem: it panics at once where KVM works.
kvm=(-enable-kvm -cpu host)
tcg=(-accel tcg,thread=multi -cpu max)
case "${VM_ACCEL:-auto}" in
    kvm) [[ -w /dev/kvm ]] || die "/dev/kvm is missing or not writable"; accel=kvm ;;
    tcg) accel=tcg ;;
    auto)
        accel=tcg
        if [[ -w /dev/kvm ]] && {
            boot "$tmp/probe.log" 60 "${kvm[@]}" -append "console=ttyS0 panic=-1" >/dev/null 2>&1 || :
            grep -q 'Kernel panic' "$tmp/probe.log"
        }; then
            accel=kvm
        else
            echo "idle-vm: KVM cannot boot $(basename "$kernel") here; using TCG emulation"
        fi ;;
    *) die "VM_ACCEL must be auto, kvm or tcg" ;;
esac
if [[ $accel == kvm ]]; then accel_args=("${kvm[@]}"); server_cpu=0; else accel_args=("${tcg[@]}"); server_cpu=""; fi

if [[ -z "$bin_dir" ]]; then
    (cd "$repo" && cargo build --release --locked -q -p bench -p coordinator -p commserver)
    bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
for b in bench coordinator commserver; do
    [[ -x "$bin_dir/$b" ]] || die "no $b in $bin_dir"
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Root filesystem: busybox, the binaries and their libraries, the configs.
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,etc,rm,bench,out}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$bin_dir"/{bench,coordinator,commserver} "$root/rm/"
for lib in $(for b in "$root"/rm/*; do ldd "$b"; done | grep -o '/[^ ]*' | sort -u); do
    cp -L --parents "$lib" "$root/"
done
cp -r "$repo/bench/configs" "$root/bench/configs"
if [[ $accel == tcg ]]; then
    # Emulated, everything runs about 15 times slower, and at 50 000 clients a comm server or
    # the generator can fall seconds behind: with the default 15 s heartbeat timeout idle
    # clients were dropped as silent and logins timed out. What is measured here is memory, so
    # the VM's servers get timeouts long enough for the emulation (and the clients ping at
    # the longer interval the server suggests).
    printf '\n# idle-vm.sh under TCG emulation\nheartbeat_interval_ms = 30000\nheartbeat_timeout_ms = 120000\n' \
        >>"$root/bench/configs/commserver.toml"
    printf '\n# idle-vm.sh under TCG emulation\nheartbeat_interval_ms = 30000\nheartbeat_timeout_ms = 120000\nreserve_timeout_ms = 8000\n' \
        >>"$root/bench/configs/coordinator.toml"
fi
echo "127.0.0.1 localhost" >"$root/etc/hosts"

# The bench command: these defaults unless the caller passed the same option.
defaults=(--systems relaymesh --scenarios idle --idle-clients 10000,25000,50000
    --source-addresses 4 --server-cpu "$server_cpu")
cmd=(/rm/bench)
for ((i = 0; i < ${#defaults[@]}; i += 2)); do
    given=no
    for a in ${user_args[@]+"${user_args[@]}"}; do
        [[ "$a" == "${defaults[i]}" || "$a" == "${defaults[i]}="* ]] && given=yes
    done
    [[ $given == yes ]] || cmd+=("${defaults[i]}" "${defaults[i + 1]}")
done
cmd+=(--configs /bench/configs --bin-dir /rm --out /out ${user_args[@]+"${user_args[@]}"})
printf '%q ' "${cmd[@]}" >"$root/bench-cmd"

# PID 1 of the VM: raise the limit, run bench (with `top` logging the VM's CPU use), send /out
# as a base64 tar.gz on the second serial port, power off.
cat >"$root/init" <<'EOF'
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
ip link set lo up
sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
ulimit -n 200000
echo "idle-vm: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo) GiB RAM, open files $(ulimit -n)"
echo "idle-vm: $(date) running $(cat /bench-cmd)"
cd /out
top -b -d 10 >/out/vm-top.log 2>&1 &
sh /bench-cmd
echo $? >/out/bench-exit-code
kill $!
echo "idle-vm: $(date) bench exited with $(cat /out/bench-exit-code)"
dmesg >/out/vm-dmesg.log
stty -F /dev/ttyS1 raw -echo
tar -C /out -czf - . | base64 >/dev/ttyS1
sync
sleep 1
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$tmp/initrd.gz"

rm -rf "$out/run" "$out"/{results.json,results.md,bench-exit-code,vm-console.log,vm-dmesg.log,vm-top.log}
echo "idle-vm: booting $(basename "$kernel") under $accel with ${VM_MEM:-6G} RAM and ${VM_CPUS:-2} CPUs"
started=$SECONDS
status=0
boot "$tmp/console.log" "${VM_TIMEOUT:-1800}" "${accel_args[@]}" -initrd "$tmp/initrd.gz" \
    -append "console=ttyS0 quiet panic=1" -serial "file:$tmp/ttyS1" || status=$?
echo "idle-vm: the VM ran for $((SECONDS - started)) s"
tr -d '\r' <"$tmp/console.log" >"$out/vm-console.log"
((status != 124)) || die "the VM did not finish within ${VM_TIMEOUT:-1800} s; see $out/vm-console.log"
((status == 0)) || die "qemu failed (exit $status); see $out/vm-console.log"
if ! tr -d '\r' <"$tmp/ttyS1" | base64 -d 2>/dev/null | tar -xzf - -C "$out" 2>/dev/null \
    || [[ ! -s "$out/bench-exit-code" ]]; then
    die "the VM printed no results; see $out/vm-console.log"
fi
rc=$(cat "$out/bench-exit-code")
echo "idle-vm: results in $out (results.md, results.json, run/, vm-*.log)"
((rc == 0)) || die "bench failed in the VM (exit $rc); see $out/vm-console.log and $out/run/"
