#!/bin/bash
# PID 1 of a kernel-matrix guest, started by the initramfs on the host's / (9p,
# read-only). Mounts what the tests need, runs pytest as root with the repo's
# venv, writes the result to the shared results directory and powers off.
# Every line meant for the host starts with "PKM:" (tests/matrix/run.py reads
# the serial console); a setup step that fails is written to results/error.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RESULTS=/run/pkm-results

poweroff_now() {
    sync
    echo o > /proc/sysrq-trigger
    exec sleep 3600   # PID 1 must not exit; the poweroff above ends the guest
}

fail() {
    echo "PKM-FAIL: guest setup: $*"
    if mountpoint -q "$RESULTS"; then
        echo "$*" > "$RESULTS/error"
    fi
    poweroff_now
}

mnt() { mount "$@" || fail "mount $*"; }

mnt -t proc proc /proc
mnt -t sysfs sysfs /sys
echo "PKM: guest-init up ($(uname -r))"
mnt -t tmpfs -o mode=0755 tmpfs /run
mkdir -p "$RESULTS"
# The result tag is the only writable 9p export.
mnt -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 pkmresults "$RESULTS"
# shellcheck source=/dev/null
. "$RESULTS/job.env" || fail "no job.env in the results directory"

mnt -t cgroup2 cgroup2 /sys/fs/cgroup
mnt -t bpf bpf /sys/fs/bpf
# A repository under /tmp or /var/tmp (a CI clone) would vanish under the
# tmpfs mounted there: it is bound aside first and back at its own path after.
case "$PKM_REPO/" in
    /tmp/*|/var/tmp/*) mkdir -p /run/pkm-repo && mnt --bind "$PKM_REPO" /run/pkm-repo ;;
esac
mnt -t tmpfs -o mode=1777 tmpfs /tmp
mnt -t tmpfs -o mode=1777 tmpfs /var/tmp
if mountpoint -q /run/pkm-repo; then
    mkdir -p "$PKM_REPO" && mnt --bind /run/pkm-repo "$PKM_REPO"
fi
mkdir -p /dev/pts /dev/shm
mnt -t devpts devpts /dev/pts
mnt -t tmpfs -o mode=1777 tmpfs /dev/shm
# The guest kernel's own modules at /lib/modules/$(uname -r), from the unpacked
# Debian package (modprobe and the kernel's request_module look there).
mnt -t tmpfs -o mode=0755 tmpfs /lib/modules
mkdir -p "/lib/modules/$(uname -r)"
mnt --bind "$PKM_MODULES" "/lib/modules/$(uname -r)"
# A writable /etc/hosts (tests that add names remove them again).
cp /etc/hosts /run/pkm-hosts && mnt --bind /run/pkm-hosts /etc/hosts
ip link set lo up || fail "ip link set lo up"
hostname "pkm-$PKM_SERIES" 2>/dev/null

# Modules the data paths and the test hosts use; the kernel would also load
# most on demand (through the host's /sbin/modprobe), preloading names a missing one.
missing=()
for m in $PKM_PRELOAD; do
    modprobe -q "$m" 2>/dev/null || missing+=("$m")
done
[ ${#missing[@]} -eq 0 ] || echo "PKM: modules not loaded: ${missing[*]}"
echo 4 > /proc/sys/kernel/printk   # kernel messages below warnings stay off the console

cd "$PKM_REPO" || fail "cd $PKM_REPO"
export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TERM=dumb
mapfile -t args < "$RESULTS/pytest.args"
echo "PKM: pytest start"
"$PKM_PYTHON" -m pytest -p no:cacheprovider --junitxml="$RESULTS/junit.xml" "${args[@]}" < /dev/null 2>&1
rc=$?
echo "$rc" > "$RESULTS/rc"
echo "PKM: pytest done rc=$rc"
cd /
umount "$RESULTS"
poweroff_now
