#!/bin/busybox sh
# /init of the Linux test image (images/build-linux.sh): loads the virtio modules,
# then either gives a shell (vmm.shell on the command line) or runs the balloon
# workload that tests/tests/linux.rs drives from the host:
#   ready      the balloon is bound to virtio_balloon; MemTotal noted
#   inflated   MemTotal fell by >= 32 MiB (the host set a target; deflate_on_oom off)
#   allocated  16 MiB written to tmpfs and freed while inflated
#   deflated   MemTotal is back (the host set the target to 0)
# Each step prints one JSON line {"linux":STEP,...}. The VM ends through the VMM's
# exit register (busybox devmem): 0 when every step passed, else the failed step's code.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
EXIT_REGISTER=0xd0100000

say() { echo "{\"linux\":\"$1\"$2}"; }
finish() {
    devmem $EXIT_REGISTER 32 "$1"
    echo "init: the VMM's exit register did not end the VM" >&2
    poweroff -f
}
fail() { say error ",\"what\":\"$2\""; finish "$1"; }
meminfo() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
# wait_for CONDITION SECONDS
wait_for() {
    i=0
    while ! eval "$1"; do
        i=$((i + 1))
        [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
}

for m in virtio_ring virtio virtio_mmio virtio_balloon; do
    insmod /lib/modules/$m.ko || fail 2 "insmod $m"
done
if grep -q vmm.shell /proc/cmdline; then
    echo "init: modules loaded; a shell (exit it, or run poweroff -f / reboot)"
    exec setsid cttyhack sh
fi

balloon=
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && balloon=$d
done
[ -n "$balloon" ] || fail 3 "no virtio balloon in /sys/bus/virtio/devices"
driver=$(basename "$(readlink "$balloon/driver")")
[ "$driver" = virtio_balloon ] || fail 3 "the balloon is not bound to virtio_balloon"
total0=$(meminfo MemTotal)
say ready ",\"device\":\"${balloon##*/}\",\"driver\":\"$driver\",\"features\":\"$(cat "$balloon/features")\",\"mem_total_kb\":$total0,\"mem_free_kb\":$(meminfo MemFree)"

wait_for '[ "$(meminfo MemTotal)" -le $((total0 - 32768)) ]' 60 || fail 4 "the balloon never inflated"
say inflated ",\"mem_total_kb\":$(meminfo MemTotal)"
mount -t tmpfs tmpfs /tmp
{ dd if=/dev/zero of=/tmp/fill bs=1M count=16 2>/dev/null && rm /tmp/fill; } || fail 5 "allocation while inflated"
say allocated
wait_for '[ "$(meminfo MemTotal)" -ge $((total0 - 1024)) ]' 60 || fail 6 "the balloon never deflated"
say deflated ",\"mem_total_kb\":$(meminfo MemTotal)"
finish 0
