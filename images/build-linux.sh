#!/usr/bin/env bash
# Builds a Linux test image for `vmm run` from Debian packages only:
#   images/vmlinuz               Debian's cloud kernel (a bzImage)
#   images/initramfs.cpio.gz     busybox-static, the kernel's four virtio modules
#                                (virtio_ring, virtio, virtio_mmio, virtio_balloon)
#                                and an /init that loads them, then runs the balloon
#                                workload (default), or a shell with vmm.shell
# Nothing is installed on the host: `apt-get download` fetches the .debs into a
# temporary directory and `dpkg-deb -x` unpacks them there. Needs apt's package
# lists (`apt-get update` once) and gzip. See docs/linux.md for what the image does.
#
#   images/build-linux.sh                       the newest cloud kernel apt knows
#   KERNEL_PKG=linux-image-6.1.0-57-cloud-amd64 images/build-linux.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out_kernel=$here/vmlinuz
out_initrd=$here/initramfs.cpio.gz
modules=(virtio_ring virtio virtio_mmio virtio_balloon)

# The versioned package behind the cloud kernel's metapackage.
if [ -z "${KERNEL_PKG:-}" ]; then
    KERNEL_PKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
if [ -z "$KERNEL_PKG" ]; then
    echo "build-linux.sh: apt knows no linux-image-cloud-amd64: run apt-get update first" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "build-linux.sh: downloading $KERNEL_PKG and busybox-static" >&2
# Downloads as root into this private directory (apt's _apt user could not write here).
apt-get download -q -o APT::Sandbox::User=root "$KERNEL_PKG" busybox-static >&2
mkdir pkg root
for deb in ./*.deb; do dpkg-deb -x "$deb" pkg; done

vmlinuz=$(ls pkg/boot/vmlinuz-* | head -n1)
release=${vmlinuz##*/vmlinuz-}
moddir=pkg/lib/modules/$release

# The initramfs tree.
mkdir -p root/bin root/proc root/sys root/dev root/tmp root/lib/modules
cp pkg/bin/busybox root/bin/busybox
for m in "${modules[@]}"; do
    # The package has no modules.dep (depmod runs at install): find it by name.
    path=$(cd "$moddir" && find kernel -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
    if [ -z "$path" ]; then
        echo "build-linux.sh: $release has no module $m" >&2
        exit 1
    fi
    case "$path" in
        *.xz) xz -dc "$moddir/$path" > "root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$moddir/$path" > "root/lib/modules/$m.ko" ;;
        *) cp "$moddir/$path" "root/lib/modules/$m.ko" ;;
    esac
done
cp "$here/linux-init.sh" root/init
chmod 755 root/init root/bin/busybox

(cd root && find . | LC_ALL=C sort | ../pkg/bin/busybox cpio -o -H newc 2>/dev/null) | gzip -9 > "$out_initrd"
cp "$vmlinuz" "$out_kernel"
echo "build-linux.sh: $release" >&2
ls -l "$out_kernel" "$out_initrd" >&2
(cd root && find . -type f | LC_ALL=C sort | xargs ls -l) >&2
