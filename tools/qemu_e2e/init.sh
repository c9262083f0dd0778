#!/bin/busybox sh
# /init of the qemu-e2e guests (tools/qemu_e2e): busybox only, no libc.
#
# 1. load the modules listed in /modules/order (dependencies first, made by assets.py);
# 2. mount the host's root read-only over virtio-9p (tag hostroot) under a tmpfs overlay at
#    /newroot, so the guest runs the host's Python and this checkout at the same paths;
# 3. mount the writable results share (tag results) at /results, and inside /newroot at the
#    host's own path of that directory (kernel parameter e2e_results=PATH);
# 4. agent: for n = 1, 2, ... wait for /results/cmd.N, run it in the background with
#    chroot /newroot /bin/sh, its stdout/stderr to out.N/err.N, then its exit status to rc.N
#    (written last, by rename); until /results/poweroff appears. Then poweroff -f.
# Every step prints "e2e-init: ..." on the console (ttyS0), which the host keeps as a log.

/bin/busybox mount -t proc proc /proc
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "e2e-init: $*"; }
die() {
    say "FAILED: $*"
    dmesg | tail -n 40
    poweroff -f
    sleep 60
}

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo /bin/false > /proc/sys/kernel/modprobe  # no modprobe here: all modules come from order

RESULTS=
MSIZE=262144
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        e2e_results=*) RESULTS="${arg#e2e_results=}" ;;
        e2e_msize=*) MSIZE="${arg#e2e_msize=}" ;;
    esac
done
[ -n "$RESULTS" ] || die "no e2e_results= on the kernel command line"

while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "/modules/$ko" || die "insmod $ko"
done < /modules/order
say "modules loaded: $(wc -l < /modules/order)"

P9="trans=virtio,version=9p2000.L,msize=$MSIZE"
mount -t 9p -o "$P9,cache=loose,ro" hostroot /lower || die "mount hostroot over 9p"
mount -t 9p -o "$P9,cache=none" results /results || die "mount results over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw || die "tmpfs"
mkdir -p /rw/upper /rw/work
if mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot
then
    ROOTFS="overlay (9p lower, tmpfs upper)"
    TMPFS="/dev/shm"  # /tmp and the rest are writable in the overlay, host files visible
else
    say "overlay failed; using the read-only 9p root with tmpfs on /tmp, /run, /var/tmp"
    mount --bind /lower /newroot || die "bind the 9p root"
    ROOTFS="read-only 9p"
    TMPFS="/tmp /run /var/tmp /dev/shm"
fi
mount -t proc proc /newroot/proc || die "proc in the new root"
mount -t sysfs sysfs /newroot/sys || die "sysfs in the new root"
mount -t devtmpfs devtmpfs /newroot/dev || die "devtmpfs in the new root"
for d in $TMPFS; do
    mkdir -p "/newroot$d" 2>/dev/null
    mount -t tmpfs -o mode=1777 tmpfs "/newroot$d" || die "tmpfs on $d"
done
mkdir -p "/newroot$RESULTS" 2>/dev/null
mount --bind /results "/newroot$RESULTS" || die "bind the results share at $RESULTS"

echo "$ROOTFS" > /results/ready.tmp && mv /results/ready.tmp /results/ready
say "ready: root $ROOTFS, results at $RESULTS"

n=1
while [ ! -e /results/poweroff ]; do
    if [ -e "/results/cmd.$n" ]; then
        say "command $n"
        (
            chroot /newroot /bin/sh "$RESULTS/cmd.$n" < /dev/null \
                > "/results/out.$n" 2> "/results/err.$n"
            echo $? > "/results/rc.$n.tmp"
            mv "/results/rc.$n.tmp" "/results/rc.$n"
        ) &
        n=$((n + 1))
    else
        usleep 50000
    fi
done
say "poweroff"
sync
poweroff -f
sleep 60
