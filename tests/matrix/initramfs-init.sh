#!/bin/busybox sh
# /init of the kernel matrix's initramfs (tests/matrix/run.py builds it; busybox
# from Debian's busybox-static). Loads the guest kernel's own modules needed to
# reach the host's filesystem (virtio, 9p), mounts the host's / read-only over
# 9p and hands over to tests/matrix/guest-init.sh on it. Any failure is named on
# the console and powers the guest off: the host never waits for a dead guest.
export PATH=/bin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# shellcheck source=/dev/null
. /pkm.conf

fail() {
    echo "PKM-FAIL: initramfs: $*"
    echo o > /proc/sysrq-trigger
    exec sleep 3600   # PID 1 must not exit; the poweroff above ends the guest
}

echo "PKM: initramfs up ($(uname -r))"
while read -r m; do
    insmod "/modules/$m" || fail "insmod $m"
done < /modules/order
mount -t 9p -o "trans=virtio,version=9p2000.L,ro,cache=loose,msize=$PKM_MSIZE" "$PKM_ROOT_TAG" /newroot \
    || fail "mount 9p $PKM_ROOT_TAG"
[ -x "/newroot$PKM_GUEST_INIT" ] || fail "no $PKM_GUEST_INIT on the host's filesystem"
umount /sys /proc
mount --move /dev /newroot/dev || fail "move /dev"
exec switch_root /newroot /bin/bash "$PKM_GUEST_INIT"
