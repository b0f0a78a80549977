#!/usr/bin/env bash
# Builds the image deploy/Dockerfile describes without a registry: buildah FROM scratch,
# the `dist` binary, and the runtime files of the Dockerfile's distroless base
# (gcr.io/distroless/cc-debian12:nonroot) taken from Debian 12's own packages — glibc,
# libgcc, CA certificates, time zones, netbase, the nonroot user (65532) — with the
# Dockerfile's own USER, EXPOSE and ENTRYPOINT (read from it, so the two stay in step;
# tests/image.rs compares the results).
#
# Writes target/image/: rootfs/ (the image's root filesystem, unpacked, for starting it
# with chroot where no container runtime works), inspect.json (`buildah inspect`),
# size.txt, and the image itself in buildah's storage as $IMAGE (default
# localhost/vm-activator:dev). Needs root, buildah and apt-get (Debian 12).
# SKIP_BUILD=1 uses target/dist/vm-activator as it is.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
image=${IMAGE:-localhost/vm-activator:dev}
out=$repo/target/image
# vfs works wherever buildah does (no overlay mounts needed); chroot isolation: nothing
# is run inside the image at build time anyway.
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=chroot

dockerfile=deploy/Dockerfile
# The final stage: everything after the last FROM.
final=$(awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' "$dockerfile")
directive() { printf '%s' "$final" | awk -v d="$1" '$1 == d { $1 = ""; sub(/^ /, ""); print }'; }
user=$(directive USER)
entrypoint=$(directive ENTRYPOINT)
ports=$(directive EXPOSE)
binary_dest=$(directive COPY | awk '{print $NF}')
[ -n "$user" ] && [ -n "$entrypoint" ] && [ -n "$binary_dest" ] || {
  echo "image: cannot read USER, ENTRYPOINT and COPY from $dockerfile" >&2; exit 1; }

if [ "${SKIP_BUILD:-}" != 1 ]; then
  cargo build --profile dist --locked --bin vm-activator
fi
binary=target/dist/vm-activator
[ -x "$binary" ] || { echo "image: no $binary" >&2; exit 1; }

# The distroless base's runtime files, from the Debian packages it is made of.
base=$(mktemp -d)
trap 'rm -rf "$base"' EXIT
packages=(libc6 libgcc-s1 ca-certificates tzdata netbase)
(cd "$base" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}" >/dev/null)
root=$base/root
mkdir -p "$root"
for deb in "$base"/*.deb; do dpkg-deb -x "$deb" "$root"; done
# What a container needs of them: no documentation beyond the licences, no locales.
find "$root/usr/share/doc" -type f ! -name copyright -delete
rm -rf "$root/usr/share/man" "$root/usr/share/lintian" "$root/usr/share/locale" \
  "$root/usr/share/ca-certificates-"* "$root/usr/sbin" "$root/etc/ca-certificates.conf" \
  "$root/etc/ssl/certs"
# ca-certificates' bundle is made by its postinst (update-ca-certificates): the same here.
mkdir -p "$root/etc/ssl/certs"
find "$root/usr/share/ca-certificates" -name '*.crt' | sort | xargs cat >"$root/etc/ssl/certs/ca-certificates.crt"
# distroless's users: root, nobody, and nonroot (65532) with its home; a world-writable /tmp.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
mkdir -p "$root/tmp" "$root/root" "$root/home/nonroot"
chmod 1777 "$root/tmp"
chmod 700 "$root/root" "$root/home/nonroot"
chown 65532:65532 "$root/home/nonroot"

buildah rm vm-activator-build >/dev/null 2>&1 || true
ctr=$(buildah from --name vm-activator-build scratch)
buildah copy --quiet "$ctr" "$root" / >/dev/null
buildah copy --quiet --chmod 0755 "$ctr" "$binary" "$binary_dest" >/dev/null
config=(--user "$user" --entrypoint "$entrypoint" --workingdir /
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  --label org.opencontainers.image.source=deploy/image/build.sh)
# Docker records EXPOSE 8080 as 8080/tcp; buildah takes the protocol as given.
for port in $ports; do config+=(--port "${port%/tcp}/tcp"); done
buildah config "${config[@]}" "$ctr"
buildah commit --quiet --rm "$ctr" "$image" >/dev/null

# The image as a registry would hold it (one layer), and unpacked for chroot.
rm -rf "$out" && mkdir -p "$out"
buildah inspect --type image "$image" >"$out/inspect.json"
ctr=$(buildah from --name vm-activator-unpack "$image")
mnt=$(buildah mount "$ctr")
cp -a "$mnt" "$out/rootfs"
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
buildah push --quiet "$image" "oci-archive:$out/image.tar" >/dev/null
bytes=$(du -sb --apparent-size "$out/rootfs" | cut -f1)
archive=$(stat -c %s "$out/image.tar")
compressed=$(gzip -c "$out/image.tar" | wc -c)
bin_bytes=$(stat -c %s "$binary")
printf 'rootfs_bytes=%s\narchive_bytes=%s\ngzip_bytes=%s\nbinary_bytes=%s\n' \
  "$bytes" "$archive" "$compressed" "$bin_bytes" >"$out/size.txt"
rm -f "$out/image.tar"
echo "image: $image — $(numfmt --to=iec "$bytes") unpacked ($(numfmt --to=iec "$bin_bytes") of it the binary), $(numfmt --to=iec "$compressed") compressed"
