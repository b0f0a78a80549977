#!/usr/bin/env bash
# Checks that a built vm-activator has the code layout of link/hot-text.ld: the first
# functions it names (those a start runs first) found in the binary and packed at the
# start of `.text`, not spread over it as the linker's own order leaves them.
#   bash link/check.sh target/release/vm-activator
# Fails when fewer than half of them are found (the layout has gone stale: rerun
# link/profile.sh) or when nine in ten of them span more than 4 MiB (the layout was not
# applied).
set -euo pipefail

bin=${1:?usage: link/check.sh BINARY}
layout="$(dirname "${BASH_SOURCE[0]}")/hot-text.ld"
first=200

text=$(readelf -SW "$bin" | sed -n 's/.* \.text  *PROGBITS  *\([0-9a-f]*\) .*/\1/p')
[ -n "$text" ] || { echo "check: $bin has no .text" >&2; exit 1; }
# The layout's patterns as anchored regular expressions over `nm`'s names.
patterns=$(sed -n 's/^    \*(\.text\.\([^ ]*\) .*/\1/p' "$layout" | sed -n "1,${first}p" |
  sed 's/[.$]/\\&/g; s/\*/.*/g; s/^/ /; s/$/$/')
symbols=$(mktemp)
trap 'rm -f "$symbols"' EXIT
nm "$bin" | awk '$2 ~ /^[tTwW]$/ { print $1 " " $3 }' >"$symbols"
found=0
addresses=""
while read -r pattern; do
  hits=$(grep -e "$pattern" "$symbols" | cut -d' ' -f1) || continue
  found=$((found + 1))
  addresses+="$hits"$'\n'
done <<<"$patterns"
[ "$found" -ge $((first / 2)) ] || {
  echo "check: only $found of the layout's first $first functions are in $bin: rerun link/profile.sh" >&2; exit 1; }
# Judged on nine in ten of them: a function the linker could not move (one outside a
# section of its own) stays where it was.
within=$(printf '%s' "$addresses" | sort | sed -n "$(( $(printf '%s' "$addresses" | wc -l) * 9 / 10 ))p")
span=$(( (16#$within - 16#$text) / 1024 ))
echo "check: $found of the layout's first $first functions found, nine in ten of them within the first $span KiB of .text"
[ "$span" -le 4096 ] || { echo "check: they span $span KiB of .text: link/hot-text.ld was not applied" >&2; exit 1; }
