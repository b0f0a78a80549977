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
# QEMU's packages must come from one suite: next to a newer qemu-utils from backports,
# the stable suite's qemu-system-x86 cannot be installed (apt: "held broken packages",
# through qemu-system-common and qemu-block-extra). So: with a qemu-utils installed from
# a suite the package lists still have (say bookworm-backports), the emulator comes from
# that suite too (`-t`, so its dependencies do); otherwise both come from the suite of
# the emulator's candidate (a stray newer qemu-utils is moved back to it).

# The suite (archive) a package's version comes from in the package lists, if any:
# `apt-cache policy`'s version table has "*** VERSION PRIO" then "PRIO URL SUITE/COMPONENT …".
suite_of() {
  apt-cache policy "$1" | awk -v v="$2" '
    { sub(/^ *(\*\*\* )?/, "") }
    $1 == v { found = 1; next }
    found && $2 ~ /^[a-z]+:\/\// { split($3, s, "/"); print s[1]; exit }
    found && $2 !~ /^\// { exit }'
}

qemu_install() {
  local have suite candidate pinned pkg
  have=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
  suite=${have:+$(suite_of qemu-utils "$have")}
  if [ -n "$suite" ]; then
    echo "-t $suite qemu-system-x86 qemu-utils"
    return
  fi
  candidate=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  suite=$(suite_of qemu-system-x86 "$candidate")
  if [ -z "$suite" ]; then
    echo "setup: no installable qemu-system-x86 in the package lists" >&2; exit 1
  fi
  # Both from the emulator's suite, and every installed package built from QEMU's source
  # with them (a qemu-system-data of another version Breaks an older qemu-system-common).
  pinned="qemu-system-x86/$suite qemu-utils/$suite"
  for pkg in $(dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Source}\n' 2>/dev/null |
    awk '$1 == "ii" && $3 == "qemu" && $2 != "qemu-utils" && $2 != "qemu-system-x86" {print $2}'); do
    pinned="$pinned $pkg/$suite"
  done
  echo "$pinned"
}

if $need_qemu || [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  as_root apt-get update -qq
fi
install() {
  echo "setup: installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
  install "${missing[@]}"
fi
if $need_qemu; then
  qemu=$(qemu_install)
  # shellcheck disable=SC2086 # words: maybe `-t SUITE`, then the packages
  if ! install --allow-downgrades $qemu; then
    echo "setup: could not install QEMU ($qemu). A qemu-utils from a suite the package lists" \
      "no longer have (e.g. backports, since removed) pulled in newer libraries: add that suite" \
      "back and run this again, or install qemu-system-x86 from it by hand" >&2
    exit 1
  fi
fi
bash "$repo/deploy/local/build-guest.sh"
