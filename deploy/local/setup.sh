#!/usr/bin/env bash
# Installs what the local activator and its tests need and is missing — QEMU's x86_64
# system emulator, cpio, procps — then builds the guest image (target/guest/).
# Idempotent. Installing packages needs root (or sudo); nothing else does.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v cpio >/dev/null || missing+=(cpio)
command -v pgrep >/dev/null || missing+=(procps)
command -v xz >/dev/null || missing+=(xz-utils)

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "setup: need root to run: $*" >&2; exit 1
  fi
}

# build-guest.sh downloads packages by name: it needs current package lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  as_root apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
bash "$repo/deploy/local/build-guest.sh"
