#!/usr/bin/env bash
# Installs what the local activator and its tests need and is missing — QEMU's x86_64
# system emulator and its utilities, cpio, procps, xz — then builds the guest image
# (target/guest/).
# Idempotent. Installing packages needs root (or sudo); nothing else does.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

missing=()
need_qemu=false
command -v qemu-system-x86_64 >/dev/null || need_qemu=true
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
# QEMU's packages must come from one suite and version: next to a newer qemu-utils from
# backports, the stable suite's qemu-system-x86 cannot be installed (apt: "held broken
# packages", through qemu-system-common and qemu-block-extra). So: the qemu-utils version
# already installed when the system emulator exists in that version, else the emulator's
# candidate for both (a backports qemu-utils is then moved to it).
qemu_packages() {
  local have candidate
  have=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
  if [ -n "$have" ] && apt-cache madison qemu-system-x86 | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF -- "$have"; then
    echo "qemu-system-x86=$have qemu-utils=$have"
  else
    candidate=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
      echo "setup: no installable qemu-system-x86 in the package lists" >&2; exit 1
    fi
    echo "qemu-system-x86=$candidate qemu-utils=$candidate"
  fi
}

if $need_qemu || [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  as_root apt-get update -qq
fi
if $need_qemu; then
  # shellcheck disable=SC2207 # versions hold no spaces
  missing+=($(qemu_packages))
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${missing[@]}" >/dev/null
fi
bash "$repo/deploy/local/build-guest.sh"
