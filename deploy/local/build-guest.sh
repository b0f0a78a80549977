#!/usr/bin/env bash
# Builds the local guest image from Debian packages, without installing them:
#   target/guest/vmlinuz            the Debian cloud kernel
#   target/guest/initramfs.cpio.gz  busybox + virtio network modules + the guest app
#
# The guest app is a small "legacy service" (busybox httpd + a CGI script) on port 8080:
#   POST /          accepts a CloudEvent, records its id (ce-id header, or "id" of a
#                   structured event), answers 202 with an empty body
#   GET  /events    one line per received event id
#   GET  /healthz   "ok" (the activator's readiness probe)
#
# Idempotent: re-running with the same packages and this same script does nothing.
# Needs no root once the apt package lists exist (as root it runs `apt-get update` itself
# when they are missing). Output directory: $GUEST_DIR (default <repo>/target/guest).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${GUEST_DIR:-$repo/target/guest}
work="$out/work"
mkdir -p "$out" "$work"

need() { command -v "$1" >/dev/null || { echo "build-guest: $1 is required ($2)" >&2; exit 1; }; }
need apt-get "Debian's apt"
need dpkg-deb "Debian's dpkg"
need cpio "apt-get install cpio"
need gzip "apt-get install gzip"

kernel_meta=linux-image-cloud-amd64
if ! apt-cache show "$kernel_meta" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
  else
    echo "build-guest: apt package lists are missing; run 'apt-get update' as root once" >&2
    exit 1
  fi
fi
# The metapackage depends on the versioned kernel package; that is the one with files.
kernel_pkg=$(apt-cache depends "$kernel_meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || { echo "build-guest: cannot resolve $kernel_meta" >&2; exit 1; }
versions="$(apt-cache policy "$kernel_pkg" busybox-static | awk '/Candidate:/ {print $2}' | tr '\n' ' ')"
stamp="$kernel_pkg $versions $(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "build-guest: up to date ($out)"
  exit 0
fi

echo "build-guest: downloading $kernel_pkg busybox-static"
(cd "$work" && rm -f ./*.deb && apt-get download -q "$kernel_pkg" busybox-static 2>&1 | grep -v "unsandboxed" || true)
ls "$work"/linux-image-*.deb "$work"/busybox-static_*.deb >/dev/null
rm -rf "$work/kernel" "$work/busybox" "$work/root"
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"

kver=$(ls "$work/kernel/lib/modules")
moddir="$work/kernel/lib/modules/$kver"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"

root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,www/cgi-bin,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"

# The virtio network driver and what it needs, in load order. The package ships no
# modules.dep (depmod makes it at install time), so dependencies are read from each
# module's own .modinfo "depends=" entry. Built-in modules are skipped; compressed
# modules are unpacked, since busybox insmod may not read them.
unpack() {
  case "$1" in
    *.xz) xz -dc "$1" ;;
    *.zst) zstd -qdc "$1" ;;
    *.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
  esac
}
resolve() {
  local name=$1 path deps
  grep -Eq "/${name//_/[_-]}\.ko$" "$moddir/modules.builtin" 2>/dev/null && return 0
  path=$(find "$moddir/kernel" -regextype posix-extended -regex ".*/${name//_/[_-]}\.ko(\.(xz|zst|gz))?" | head -n 1)
  [ -n "$path" ] || { echo "build-guest: module $name not found in $kver" >&2; exit 1; }
  deps=$(unpack "$path" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
  for dep in $deps; do resolve "$dep"; done
  grep -qxF "$path" "$work/modules.order" 2>/dev/null || echo "$path" >>"$work/modules.order"
}
: >"$work/modules.order"
# button + evdev: the ACPI power button (QMP system_powerdown) becomes an input event.
for m in virtio_pci virtio_net button evdev; do resolve "$m"; done
: >"$root/etc/modules"
while read -r path; do
  file=$(basename "$path" | sed -E 's/\.(xz|zst|gz)$//')
  unpack "$path" >"$root/lib/modules/$file"
  echo "$file" >>"$root/etc/modules"
done <"$work/modules.order"

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 >/proc/sys/kernel/printk
for m in $(cat /etc/modules); do insmod "/lib/modules/$m"; done
# QEMU user networking: the guest is 10.0.2.15, the host side 10.0.2.2.
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
: >/www/events
echo ok >/www/healthz
echo "guest: legacy service on :8080"
# A power-button press (QMP system_powerdown) powers the guest off at once: the first
# input event from the ACPI "Power Button" device is the press.
for dev in /sys/class/input/event*; do
  if grep -q "Power Button" "$dev/device/name" 2>/dev/null; then
    (head -c 1 "/dev/input/${dev##*/}" >/dev/null && poweroff -f) &
  fi
done
exec httpd -f -p 8080 -h /www
EOF
chmod +x "$root/init"


cat >"$root/www/cgi-bin/index.cgi" <<'EOF'
#!/bin/sh
# The legacy service: accept a CloudEvent, remember its id, answer 202.
if [ "$REQUEST_METHOD" = POST ]; then
  body=$(head -c "${CONTENT_LENGTH:-0}")
  id=$HTTP_CE_ID
  if [ -z "$id" ]; then
    id=$(printf '%s' "$body" | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n 1)
  fi
  echo "$id" >>/www/events
  printf 'Status: 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
else
  printf 'Status: 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nlegacy service\n'
fi
EOF
chmod +x "$root/www/cgi-bin/index.cgi"

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$out/initramfs.cpio.gz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$stamp" >"$out/stamp"
echo "build-guest: wrote $out/vmlinuz and $out/initramfs.cpio.gz (kernel $kver; modules: $(tr '\n' ' ' <"$root/etc/modules"))"
