#!/usr/bin/env bash
# shellcheck disable=SC2015,SC2016 # "[ a ] && [ b ] || die" on purpose (die exits); '$1' and '${Package}' are not for bash
# Build the CloneBox Debian guest: a small Debian 12 (bookworm) root with cloud-init, openssh-server
# and qemu-guest-agent, made with mmdebstrap from Debian packages, booted by direct kernel boot (no
# boot loader, no partition table), for real cloud-init tests. See README.md in this folder.
#
#   build.sh [--force] [OUTDIR]   build (or confirm the cached build) into OUTDIR
#   build.sh --verify [OUTDIR]    check OUTDIR against its SHA256SUMS
#
# Produces root.qcow2 (an ext4 file system labelled clonebox-root), vmlinuz, vmlinux (the same kernel
# decompressed, when it can be extracted: boots faster under TCG), initrd.img, packages.txt,
# SHA256SUMS and .build-stamp. OUTDIR defaults to /var/lib/clonebox/images/debian-guest; downloaded
# packages are kept in $CLONEBOX_DEBIAN_GUEST_CACHE (default /var/cache/clonebox/debian-guest).
# Kernel command line: root=/dev/vda rw console=ttyS0 net.ifnames=0. Meant to run as root.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CLONEBOX_DEBIAN_GUEST_CACHE:-/var/cache/clonebox/debian-guest}
DEFAULT_OUT=/var/lib/clonebox/images/debian-guest
SUITE=bookworm
MIRROR=${CLONEBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${CLONEBOX_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Virtual size of the root file system; the packages take ~0.6 GiB. A spec's disk `size` can make the
# overlay bigger: cloud-init's resize_rootfs then grows the file system at first boot.
ROOT_SIZE=${CLONEBOX_DEBIAN_GUEST_SIZE:-2G}
# Variant "apt" is Essential:yes + apt; everything else is named here (no Recommends).
PACKAGES=(
  systemd-sysv udev dbus kmod
  linux-image-cloud-amd64    # virtio, small, boots faster than linux-image-amd64
  initramfs-tools
  cloud-init openssh-server qemu-guest-agent
  systemd-resolved iproute2  # cloud-init renders systemd-networkd configuration (part of systemd)
  sudo passwd e2fsprogs
)
OUTPUTS=(root.qcow2 vmlinuz initrd.img packages.txt)   # plus vmlinux when it can be extracted
# Fixed timestamps/UUID/hash seed: identical inputs and packages give byte-identical outputs.
# Not 0: mke2fs treats E2FSPROGS_FAKE_TIME=0 as unset.
EPOCH=946684800
ROOT_UUID=6c0b0a5e-7e57-4e57-a000-deb1a2c10d12
ROOT_LABEL=clonebox-root

log() { echo "debian-guest: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() { sed -n '3,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

mode=build force=0 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --verify) mode=verify ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [ -z "$out" ] || die "only one OUTDIR allowed"; out=$1 ;;
  esac
  shift
done
OUT=$(realpath -m "${out:-$DEFAULT_OUT}")
STAMP=$OUT/.build-stamp

output_stat() { (cd "$OUT" && stat -c '%n:%s:%Y' "$@" 2>/dev/null | tr '\n' ' '); }
stamp_get() {
  if [ -f "$STAMP" ]; then sed -n "s/^$1=//p" "$STAMP" | head -n1; fi
}

if [ "$mode" = verify ]; then
  [ -f "$OUT/SHA256SUMS" ] || die "$OUT/SHA256SUMS missing (not built?)"
  (cd "$OUT" && sha256sum --strict -c SHA256SUMS) || die "checksum mismatch in $OUT"
  for f in "${OUTPUTS[@]}"; do
    grep -q "  $f\$" "$OUT/SHA256SUMS" || die "$f not listed in SHA256SUMS"
  done
  exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, file ownership in the image)"
for tool in mmdebstrap apt-cache mkfs.ext4 debugfs qemu-img sha256sum flock realpath; do
  command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install mmdebstrap e2fsprogs qemu-utils)"
done

mkdir -p "$CACHE/debs" "$OUT"
# One build at a time per cache: parallel runs would race on the package cache and OUTDIR.
exec 9>"$CACHE/.lock"
flock 9
# a root tree left behind only if a build was killed hard (we hold the lock, so none is in use)
rm -rf "$CACHE"/root.*

# ---- inputs -----------------------------------------------------------------------------------
SCRIPT_SHA=$(cd "$HERE" && find build.sh customize.sh guest -type f -print0 | LC_ALL=C sort -z \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
CONFIG="suite=$SUITE
mirror=$MIRROR
security_mirror=$SECURITY_MIRROR
root_size=$ROOT_SIZE
packages=${PACKAGES[*]}
script_sha256=$SCRIPT_SHA"
CONFIG_SHA=$(printf '%s\n' "$CONFIG" | sha256sum | cut -d' ' -f1)

# The image holds whatever the mirror serves at build time. Whether that changed is judged from the
# host's apt lists (same Debian suites): while they are unchanged (size and mtime) the build is
# trusted; after an apt-get update the candidate version of every package in the image is compared
# with what the image has (one apt-cache call, ~1-2 s), and any difference means a rebuild.
shopt -s nullglob
APT_FILES=(/var/lib/apt/lists/*_Packages* /etc/apt/sources.list /etc/apt/sources.list.d/*
           /etc/apt/preferences /etc/apt/preferences.d/*)
shopt -u nullglob
APT_FP=$( (stat -c '%n %s %Y' "${APT_FILES[@]}" 2>/dev/null || true) | sha256sum | cut -d' ' -f1)

outputs_intact() {
  local files
  read -r -a files <<<"$(stamp_get outputs)"
  [ ${#files[@]} -gt 0 ] && [ -f "$OUT/SHA256SUMS" ] && [ -f "$OUT/packages.txt" ] \
    && [ "$(output_stat "${files[@]}")" = "$(stamp_get outputs_stat)" ]
}

# 0 when every package of the built image is still the host's apt candidate
packages_current() {
  local want have
  want=$(LC_ALL=C sort "$OUT/packages.txt")
  # packages.txt lines: "name version"; arch-qualified names are not used in this image
  have=$(cut -d' ' -f1 "$OUT/packages.txt" | xargs apt-cache show --no-all-versions 2>/dev/null \
         | awk '$1 == "Package:" {p = $2} $1 == "Version:" {print p, $2}' | LC_ALL=C sort -u) || return 1
  [ "$want" = "$have" ]
}

if [ "$force" = 0 ] && [ "$(stamp_get config_sha256)" = "$CONFIG_SHA" ] && outputs_intact; then
  if [ "$(stamp_get apt_lists)" = "$APT_FP" ]; then
    log "cached: $OUT is up to date (built $(stamp_get built_at))"
    exit 0
  fi
  if packages_current; then
    sed -i "s/^apt_lists=.*/apt_lists=$APT_FP/" "$STAMP"
    log "cached: $OUT is up to date (apt lists changed, the image's packages did not)"
    exit 0
  fi
  log "a package of the image differs from the host's apt candidate: rebuilding"
fi

# ---- build ------------------------------------------------------------------------------------
START=$(date +%s)
log "building into $OUT ($SUITE from $MIRROR)"
STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
ROOT=$(mktemp -d "$CACHE/root.XXXXXX")
cleanup() {
  rm -rf "$STAGE"
  # mmdebstrap unmounts what it mounted; never rm -rf through a mount that is still there
  if [ -n "$ROOT" ] && ! grep -q " $ROOT/" /proc/self/mounts; then rm -rf "$ROOT"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap also runs when interrupted
rmdir "$ROOT"   # mmdebstrap wants to create it (or find it empty)

include=$(IFS=,; echo "${PACKAGES[*]}")
export SOURCE_DATE_EPOCH=$EPOCH
# dpkg path-excludes keep documentation, manual pages and translations out of the image.
# --skip=cleanup/apt/lists: in root mode mmdebstrap 1.3.5's clean-up emptied the *host's*
# /var/lib/apt/lists (seen here: the next apt-cache call found no packages); customize.sh empties
# the image's lists instead
mmdebstrap --mode=root --variant=apt --format=directory \
  --aptopt='APT::Install-Recommends "false"' \
  --aptopt='APT::Install-Suggests "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --include="$include" \
  --skip=essential/unlink \
  --skip=cleanup/apt/lists \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in $CACHE/debs /var/cache/apt/archives/" \
  --essential-hook="cp -rT --no-preserve=ownership '$HERE/guest' \"\$1\"" \
  --customize-hook="sync-out /var/cache/apt/archives $CACHE/debs" \
  --customize-hook="$HERE/customize.sh" \
  "$SUITE" "$ROOT" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY_MIRROR $SUITE-security main" \
  || die "mmdebstrap failed"

# the packages now in the image, "name version", sorted (also what the cache check compares)
chroot "$ROOT" dpkg-query -W -f='${Package} ${Version}\n' | LC_ALL=C sort >"$STAGE/packages.txt"
# keep only the .debs of this build in the download cache
ARCH=$(dpkg --print-architecture)
declare -A KEEP=()
while read -r p v; do KEEP["${p}_${v//:/%3a}_"]=1; done <"$STAGE/packages.txt"
for deb in "$CACHE"/debs/*.deb; do
  [ -e "$deb" ] || continue
  base=${deb##*/}
  key=${base%"$ARCH.deb"}; key=${key%all.deb}
  [ -n "${KEEP[$key]:-}" ] || rm -f "$deb"
done
rm -f "$CACHE"/debs/lock; rm -rf "$CACHE"/debs/partial

# ---- kernel and initramfs ---------------------------------------------------------------------
shopt -s nullglob
kernels=("$ROOT"/boot/vmlinuz-*)
initrds=("$ROOT"/boot/initrd.img-*)
shopt -u nullglob
[ ${#kernels[@]} -eq 1 ] || die "expected exactly one /boot/vmlinuz-* in the image"
KREL=${kernels[0]##*/vmlinuz-}
[ ${#initrds[@]} -eq 1 ] && [ "${initrds[0]}" = "$ROOT/boot/initrd.img-$KREL" ] \
  || die "expected exactly one /boot/initrd.img-$KREL in the image"
cp "${kernels[0]}" "$STAGE/vmlinuz"
cp "${initrds[0]}" "$STAGE/initrd.img"
# direct kernel boot: the disk needs no kernel, initramfs or System.map of its own
rm -f "$ROOT"/boot/vmlinuz-* "$ROOT"/boot/initrd.img-* "$ROOT"/boot/System.map-* "$ROOT"/boot/config-*

# Under TCG the bzImage's own decompressor costs seconds before the kernel even starts; QEMU can
# boot the plain ELF kernel through its PVH entry point instead (same as deploy/testguest/build.sh).
extract_vmlinux() {
  local src=$1 dst=$2 sects off len start magic dec
  [ "$(od -An -c -j $((0x202)) -N4 "$src" | tr -d ' ')" = HdrS ] || return 1
  [ "$(od -An -tu2 -j $((0x206)) -N2 "$src" | tr -d ' ')" -ge $((0x208)) ] || return 1
  sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$src" | tr -d ' ')
  [ "$sects" -ne 0 ] || sects=4
  off=$(od -An -tu4 -j $((0x248)) -N4 "$src" | tr -d ' ')
  len=$(od -An -tu4 -j $((0x24c)) -N4 "$src" | tr -d ' ')
  start=$(( (sects + 1) * 512 + off ))
  magic=$(od -An -tx1 -j "$start" -N6 "$src" | tr -d ' ')
  case "$magic" in
    fd377a585a00) dec=(xz -dc); len=$((len - 4)) ;;
    28b52ffd*) dec=(zstd -dcq); len=$((len - 4)) ;;
    02214c18*) dec=(lz4 -dcq); len=$((len - 4)) ;;   # the cloud kernel's (LZ4 legacy format)
    1f8b*) dec=(gzip -dc) ;;
    *) return 1 ;;
  esac
  command -v "${dec[0]}" >/dev/null || return 1
  dd if="$src" bs=64K iflag=skip_bytes,count_bytes skip="$start" count="$len" status=none \
    | "${dec[@]}" >"$dst" 2>/dev/null || return 1
  [ "$(od -An -c -N4 "$dst" | tr -d ' ')" = '177ELF' ] || return 1
  # QEMU refuses an ELF kernel without the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 0x12)
  if command -v readelf >/dev/null; then
    local notes
    notes=$(readelf -n "$dst" 2>/dev/null) || return 1
    grep -qE 'Xen.*(\(0x00000012\)|PHYS32_ENTRY)' <<<"$notes" || return 1
  fi
}
if extract_vmlinux "$STAGE/vmlinuz" "$STAGE/vmlinux"; then
  OUTPUTS+=(vmlinux)
else
  rm -f "$STAGE/vmlinux"
  log "note: cannot extract a PVH-bootable vmlinux from $KREL (lz4 installed?); only vmlinuz"
fi

# ---- root file system -------------------------------------------------------------------------
# clamp every timestamp in the tree to EPOCH (mke2fs -d copies them)
find "$ROOT" -newermt "@$EPOCH" -exec touch -h -d "@$EPOCH" {} +
used_kib=$(du -sxk "$ROOT" | cut -f1)
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L "$ROOT_LABEL" -U "$ROOT_UUID" -m 1 \
  -E "hash_seed=$ROOT_UUID,lazy_itable_init=1,nodiscard" -d "$ROOT" "$STAGE/root.raw" "$ROOT_SIZE" >/dev/null \
  || die "mkfs.ext4 -d failed (is $ROOT_SIZE too small for ${used_kib} KiB?)"
# mke2fs -d copies atime and ctime from the tree; ctime cannot be set from user space, so reset
# both inside the image (a few seconds for ~20,000 inodes)
(cd "$ROOT" && find . -mindepth 1 -printf '%P\n') | awk -v t="$EPOCH" '
  { gsub(/"/, "\\\""); printf "sif \"/%s\" atime @%s\nsif \"/%s\" ctime @%s\n", $0, t, $0, t }
  END { printf "sif / atime @%s\nsif / ctime @%s\n", t, t }' \
  | E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f - "$STAGE/root.raw" >/dev/null 2>&1 \
  || log "note: could not reset atime/ctime in the image (outputs will not be byte-reproducible)"
# zero clusters are left out; -m 1: a fixed cluster order, so the file is reproducible
qemu-img convert -q -m 1 -f raw -O qcow2 -c "$STAGE/root.raw" "$STAGE/root.qcow2"
rm -f "$STAGE/root.raw"

# ---- publish ----------------------------------------------------------------------------------
# Drop the stamp first: if anything below fails, the next run rebuilds instead of trusting a mix.
# Files are replaced by rename, so a guest being started from OUTDIR right now sees old or new.
rm -f "$STAMP"
[[ " ${OUTPUTS[*]} " == *" vmlinux "* ]] || rm -f "$OUT/vmlinux"
for f in "${OUTPUTS[@]}"; do
  chmod 0644 "$STAGE/$f"
  touch -d "@$EPOCH" "$STAGE/$f"
  mv -f "$STAGE/$f" "$OUT/$f"
done
(cd "$OUT" && sha256sum "${OUTPUTS[@]}" >.SHA256SUMS.new && chmod 0644 .SHA256SUMS.new \
   && mv -f .SHA256SUMS.new SHA256SUMS)
chmod 0755 "$OUT"
SECONDS_TAKEN=$(( $(date +%s) - START ))
{
  echo "# CloneBox Debian guest build stamp (written by build.sh; delete it or use --force to rebuild)"
  printf '%s\n' "$CONFIG"
  echo "config_sha256=$CONFIG_SHA"
  echo "outputs=${OUTPUTS[*]}"
  echo "outputs_stat=$(output_stat "${OUTPUTS[@]}")"
  echo "kernel_release=$KREL"
  echo "root_used_kib=$used_kib"
  echo "root_qcow2_bytes=$(stat -c %s "$OUT/root.qcow2")"
  echo "packages_count=$(wc -l <"$OUT/packages.txt")"
  echo "build_seconds=$SECONDS_TAKEN"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "apt_lists=$APT_FP"
} >"$STAMP"
chmod 0644 "$STAMP"

# QEMU runs as libvirt-qemu and must be able to reach the files through every parent folder.
d=$OUT
while [ "$d" != / ]; do
  perms=$(stat -c %A "$d")
  if [ "${perms:9:1}" != x ] && [ "${perms:9:1}" != t ]; then
    case "$d/" in
      /var/lib/clonebox/*) chmod 0755 "$d" ;;
      *) log "WARNING: $d is not traversable by others; libvirt-qemu cannot read $OUT" ;;
    esac
  fi
  d=$(dirname "$d")
done

log "built in ${SECONDS_TAKEN}s: kernel $KREL, $(wc -l <"$OUT/packages.txt") packages, root ${used_kib} KiB used of $ROOT_SIZE"
(cd "$OUT" && ls -l "${OUTPUTS[@]}" SHA256SUMS) >&2
