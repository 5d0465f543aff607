#!/usr/bin/env bash
# shellcheck disable=SC2015 # "[ a ] && [ b ] || die" on purpose: die exits
# Build the CloneBox test guest: a Debian kernel plus a tiny busybox/qemu-ga initramfs and a small
# data disk, all taken from Debian packages, so real VM lifecycle tests boot in seconds without a
# distro image. See README.md in this folder.
#
#   build.sh [--force] [OUTDIR]   build (or confirm the cached build) into OUTDIR
#   build.sh --verify [OUTDIR]    check OUTDIR against its SHA256SUMS
#
# Produces vmlinuz (Debian's kernel), vmlinux (the same kernel decompressed, boots faster under
# TCG), initrd.img, data.qcow2, SHA256SUMS and .build-stamp. OUTDIR defaults to
# /var/lib/clonebox/images/testguest; downloads are kept in $CLONEBOX_TESTGUEST_CACHE
# (default /var/cache/clonebox/testguest). Meant to run as root (mknod, folders under /var).
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${CLONEBOX_TESTGUEST_CACHE:-/var/cache/clonebox/testguest}
DEFAULT_OUT=/var/lib/clonebox/images/testguest
META_PKG=linux-image-amd64
OUTPUTS=(vmlinuz initrd.img data.qcow2)   # plus vmlinux when it can be extracted (see below)
DATA_SIZE=64M
# Guest drivers, in load order. Hard dependencies are added automatically (from each module's
# depends=); crc32c_generic is only a *soft* dependency of ext4/jbd2 (crypto-crc32c, needed for
# metadata_csum), so it has to be named. evdev gives busybox acpid the /dev/input/event* it reads.
# virtio_console comes first because /init starts qemu-ga as soon as it is loaded.
MODULES=(virtio_pci virtio_console virtio_blk virtio_net virtio_balloon crc32c_generic ext4 button evdev)
# Fixed timestamps/UUID make identical inputs give byte-identical outputs (stable SHA256SUMS).
# Not 0: mke2fs treats E2FSPROGS_FAKE_TIME=0 as unset.
EPOCH=946684800
DATA_UUID=6c0b0a5e-7e57-4e57-a000-c10e0b0c0de5

log() { echo "testguest: $*" >&2; }
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

if [ "$mode" = verify ]; then
  [ -f "$OUT/SHA256SUMS" ] || die "$OUT/SHA256SUMS missing (not built?)"
  (cd "$OUT" && sha256sum --strict -c SHA256SUMS) || die "checksum mismatch in $OUT"
  for f in "${OUTPUTS[@]}"; do
    grep -q "  $f\$" "$OUT/SHA256SUMS" || die "$f not listed in SHA256SUMS"
  done
  exit 0
fi

for tool in apt-cache apt-get dpkg-deb dpkg-query cpio gzip mkfs.ext4 debugfs qemu-img ldd sha256sum flock; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done

mkdir -p "$CACHE" "$OUT"
# One build at a time per cache: parallel runs would race on the .deb download and OUTDIR.
exec 9>"$CACHE/.lock"
flock 9
# 400 MB each; left behind only if a build was killed hard (we hold the lock, so none is in use)
rm -rf "$CACHE"/extract.*

stamp_get() {
  if [ -f "$STAMP" ]; then sed -n "s/^$1=//p" "$STAMP" | head -n1; fi
}

# ---- inputs -----------------------------------------------------------------------------------
# (one dpkg-query for both: every dpkg call costs ~50 ms, and a cached run should take ~0.2 s)
BUSYBOX_VER="" QGA_VER=""
while read -r pkg status ver; do
  [ "$status" = installed ] || continue
  case "$pkg" in
    busybox-static) BUSYBOX_VER=$ver ;;
    qemu-guest-agent) QGA_VER=$ver ;;
  esac
done < <(dpkg-query -W -f='${Package} ${db:Status-Status} ${Version}\n' busybox-static qemu-guest-agent 2>/dev/null || true)
[ -n "$BUSYBOX_VER" ] || die "package busybox-static is not installed (apt-get install busybox-static)"
[ -n "$QGA_VER" ] || die "package qemu-guest-agent is not installed (apt-get install qemu-guest-agent)"
BUSYBOX=/bin/busybox
QGA=/usr/sbin/qemu-ga
[ -x "$BUSYBOX" ] && [ -x "$QGA" ] || die "$BUSYBOX or $QGA missing"

# Everything ldd resolves, including the dynamic loader (the line without "=>").
mapfile -t QGA_LIBS < <(ldd "$QGA" | awk '/=> not found/ {print "MISSING:" $1; next}
                                          /=>/ && $3 ~ /^\// {print $3; next}
                                          $1 ~ /^\// {print $1}')
for lib in "${QGA_LIBS[@]}"; do
  [[ $lib != MISSING:* ]] || die "qemu-ga needs ${lib#MISSING:}, which ldd cannot find"
done

# The libraries are inputs too: a libc/glib security update must rebuild the initramfs even though
# the busybox and qemu-ga package versions did not change. Package upgrades replace files, so
# size+mtime+inode of the resolved files is enough and much cheaper than hashing them.
BINARIES_SHA=$(stat -L -c '%n %s %Y %i' "$BUSYBOX" "$QGA" "${QGA_LIBS[@]}" | sha256sum | cut -d' ' -f1)
SCRIPT_SHA=$(cd "$HERE" && find build.sh guest -type f -print0 | LC_ALL=C sort -z \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)

# Which kernel linux-image-amd64 resolves to depends only on apt's package lists and config.
# apt-cache needs ~1 s here (no pkgcache.bin in this image), so while those are unchanged we trust
# the kernel recorded in the stamp and skip apt entirely.
shopt -s nullglob
APT_FILES=(/var/lib/apt/lists/*_Packages* /etc/apt/sources.list /etc/apt/sources.list.d/*
           /etc/apt/preferences /etc/apt/preferences.d/* /etc/apt/apt.conf.d/*)
shopt -u nullglob
APT_FP=$( (stat -c '%n %s %Y' "${APT_FILES[@]}" 2>/dev/null || true) | sha256sum | cut -d' ' -f1)

resolve_kernel() {
  KPKG=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances "$META_PKG" \
         | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
  [ -n "$KPKG" ] || die "cannot resolve the kernel package $META_PKG depends on (apt-get update?)"
  # the candidate's record has both the version and the hash apt-get download will be checked against
  read -r KVER KSHA < <(apt-cache show --no-all-versions "$KPKG" 2>/dev/null \
    | awk '$1 == "Version:" {v = $2} $1 == "SHA256:" {h = $2} /^$/ {exit} END {print v, h}')
  [ -n "$KVER" ] && [ -n "$KSHA" ] || die "no installable version of $KPKG"
}

KPKG="" KVER="" KSHA=""
if [ "$force" = 0 ] && [ "$(stamp_get apt_lists)" = "$APT_FP" ]; then
  KPKG=$(stamp_get kernel_package)
  KVER=$(stamp_get kernel_version)
  KSHA=$(stamp_get kernel_deb_sha256)
fi
[ -n "$KPKG" ] && [ -n "$KVER" ] && [ -n "$KSHA" ] || resolve_kernel

INPUTS="kernel_package=$KPKG
kernel_version=$KVER
busybox_static=$BUSYBOX_VER
qemu_guest_agent=$QGA_VER
binaries_stat_sha256=$BINARIES_SHA
script_sha256=$SCRIPT_SHA"
INPUTS_SHA=$(printf '%s\n' "$INPUTS" | sha256sum | cut -d' ' -f1)

# Outputs are compared by name, size and mtime only: hashing the 66 MB vmlinux alone would take
# most of the time budget of a cached run. Content is checked by --verify.
outputs_intact() {
  local files
  read -r -a files <<<"$(stamp_get outputs)"
  [ ${#files[@]} -gt 0 ] && [ -f "$OUT/SHA256SUMS" ] \
    && [ "$(output_stat "${files[@]}")" = "$(stamp_get outputs_stat)" ]
}

if [ "$force" = 0 ] && [ "$(stamp_get inputs_sha256)" = "$INPUTS_SHA" ] && outputs_intact; then
  # remember the new lists fingerprint so the next run takes the fast path again
  [ "$(stamp_get apt_lists)" = "$APT_FP" ] || sed -i "s/^apt_lists=.*/apt_lists=$APT_FP/" "$STAMP"
  log "cached: $OUT is up to date ($KPKG $KVER)"
  exit 0
fi

# ---- build ------------------------------------------------------------------------------------
log "building into $OUT ($KPKG $KVER, busybox $BUSYBOX_VER, qemu-ga $QGA_VER)"
STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
EXTRACT=""
cleanup() {
  rm -rf "$STAGE"
  [ -z "$EXTRACT" ] || rm -rf "$EXTRACT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap also runs when interrupted

# apt-get download checks the hash only while downloading; a cached .deb is re-checked against
# the index so a truncated or stale file can never be used.
ARCH=$(dpkg --print-architecture)
DEB="$CACHE/${KPKG}_${KVER//:/%3a}_${ARCH}.deb"
WANT_SHA=$KSHA
if [ ! -f "$DEB" ] || [ "$(sha256sum <"$DEB" | cut -d' ' -f1)" != "$WANT_SHA" ]; then
  rm -f "$DEB"
  log "downloading $KPKG=$KVER"
  # apt's download user _apt cannot write the cache folder; download as root without the warning
  (cd "$CACHE" && apt-get download -q=2 -o APT::Sandbox::User=root "$KPKG=$KVER") \
    || die "apt-get download $KPKG=$KVER failed"
  [ -f "$DEB" ] || die "apt-get download did not produce $DEB"
  [ "$(sha256sum <"$DEB" | cut -d' ' -f1)" = "$WANT_SHA" ] || die "$DEB: checksum mismatch"
fi
# Old kernels are never needed again (security updates replace them).
for old in "$CACHE"/linux-image-*.deb; do
  [ "$old" = "$DEB" ] || rm -f "$old"
done

EXTRACT=$(mktemp -d "$CACHE/extract.XXXXXX")
dpkg-deb -x "$DEB" "$EXTRACT"
shopt -s nullglob
kernels=("$EXTRACT"/boot/vmlinuz-*)
shopt -u nullglob
[ ${#kernels[@]} -eq 1 ] || die "expected exactly one /boot/vmlinuz-* in $DEB"
KREL=${kernels[0]##*/vmlinuz-}
MODDIR=""
for d in "$EXTRACT/lib/modules/$KREL" "$EXTRACT/usr/lib/modules/$KREL"; do
  [ -d "$d" ] && MODDIR=$d
done
[ -n "$MODDIR" ] || die "no modules directory for $KREL in $DEB"
cp "${kernels[0]}" "$STAGE/vmlinuz"

# Under TCG the bzImage's own xz decompressor needs 5-7 s before the kernel even starts. QEMU can
# boot the plain ELF kernel through its PVH entry point instead, so ship it decompressed as well.
# The payload location comes from the x86 boot header (boot protocol >= 2.08); xz and zstd
# payloads carry a 4-byte size trailer that is not part of the compressed stream.
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
    1f8b*) dec=(gzip -dc) ;;
    *) return 1 ;;
  esac
  dd if="$src" bs=64K iflag=skip_bytes,count_bytes skip="$start" count="$len" status=none \
    | "${dec[@]}" >"$dst" || return 1
  [ "$(od -An -c -N4 "$dst" | tr -d ' ')" = '177ELF' ] || return 1
  # QEMU refuses an ELF kernel without the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 0x12)
  if command -v readelf >/dev/null; then
    # capture first: with pipefail, grep -q exiting early would fail the pipeline through SIGPIPE
    local notes
    notes=$(readelf -n "$dst" 2>/dev/null) || return 1
    grep -qE 'Xen.*(\(0x00000012\)|PHYS32_ENTRY)' <<<"$notes" || return 1
  fi
}
if extract_vmlinux "$STAGE/vmlinuz" "$STAGE/vmlinux"; then
  OUTPUTS+=(vmlinux)
else
  rm -f "$STAGE/vmlinux"
  log "WARNING: cannot extract a PVH-bootable vmlinux from $KPKG; only vmlinuz (slow under TCG)"
fi

# ---- initramfs --------------------------------------------------------------------------------
R=$STAGE/initrd
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,data,root,var/log,www} \
         "$R"/etc/{udhcpc,acpi/PWRF} "$R/lib/modules"
ln -s ../run "$R/var/run"

# The package ships no modules.dep (depmod runs in its postinst), so dependencies come from each
# module's own depends= field, which is what depmod would record. Built-in ones need no file.
declare -A MODPATH=() BUILTIN=() MODSTATE=()
while IFS= read -r -d '' f; do
  name=${f##*/}; name=${name%%.ko*}
  MODPATH[${name//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
if [ -f "$MODDIR/modules.builtin" ]; then
  while IFS= read -r line; do
    name=${line##*/}; name=${name%.ko}
    BUILTIN[${name//-/_}]=1
  done <"$MODDIR/modules.builtin"
fi
LOAD_ORDER=()

add_module() {
  local m=${1//-/_} src dst deps d
  case "${MODSTATE[$m]:-}" in
    loaded) return ;;
    visiting) die "module dependency cycle at $m" ;;
  esac
  if [ -n "${BUILTIN[$m]:-}" ]; then MODSTATE[$m]=loaded; return; fi
  src=${MODPATH[$m]:-}
  [ -n "$src" ] || die "module $m is neither built in nor shipped in $KPKG"
  MODSTATE[$m]=visiting
  dst="$R/lib/modules/$m.ko"
  # busybox insmod may lack decompression support, so store plain .ko files
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -dcq "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) die "unknown module format: $src" ;;
  esac
  deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1)
  for d in ${deps//,/ }; do add_module "$d"; done
  MODSTATE[$m]=loaded
  LOAD_ORDER+=("$m.ko")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${LOAD_ORDER[@]}" >"$R/lib/modules/load-order"

# A dynamic busybox (package "busybox" instead of "busybox-static") would not run in the initramfs.
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked; install busybox-static"
cp "$BUSYBOX" "$R/bin/busybox"
# Applet links where a normal system has them, so scripts can use absolute paths like /sbin/ip.
"$BUSYBOX" --list-full | while IFS= read -r applet; do
  case "$applet" in */*) ;; *) continue ;; esac
  [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done

cp "$QGA" "$R/usr/sbin/qemu-ga"
for lib in "${QGA_LIBS[@]}"; do
  mkdir -p "$R${lib%/*}"
  cp -L "$lib" "$R$lib"
done

install -m 0755 "$HERE/guest/init" "$R/init"
install -m 0755 "$HERE/guest/udhcpc.script" "$R/etc/udhcpc/default.script"
install -m 0755 "$HERE/guest/shutdown" "$R/sbin/shutdown"
install -m 0755 "$HERE/guest/acpi-power" "$R/etc/acpi/PWRF/00000080"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
# qemu-ga's guest-get-osinfo reads this
cat >"$R/etc/os-release" <<EOF
NAME="CloneBox test guest"
ID=clonebox-testguest
ID_LIKE=debian
PRETTY_NAME="CloneBox test guest ($KREL)"
VERSION_ID="$KVER"
EOF
# what went into this image, for a look from inside the guest (no host-specific stat data, so
# identical packages give an identical initramfs on any machine)
grep -v '^binaries_stat_sha256=' <<<"$INPUTS" >"$R/etc/clonebox-testguest"
printf '%s\n' "kernel_release=$KREL" "modules=${LOAD_ORDER[*]}" >>"$R/etc/clonebox-testguest"

# The kernel opens /dev/console before /init runs; without the node the early output is lost.
# Only root can mknod, and /init mounts devtmpfs anyway, so this is best effort.
mknod -m 0600 "$R/dev/console" c 5 1 2>/dev/null || log "note: cannot mknod /dev/console (not root?)"
mknod -m 0666 "$R/dev/null" c 1 3 2>/dev/null || true

find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort \
   | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$STAGE/initrd.img"

# ---- data disk --------------------------------------------------------------------------------
D=$STAGE/data-root
mkdir -p "$D"
printf 'hello from the CloneBox test guest data disk\n' >"$D/hello.txt"
touch -d "@$EPOCH" "$D/hello.txt" "$D"
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L clonebox-data -U "$DATA_UUID" \
  -E "root_owner=0:0,hash_seed=$DATA_UUID" -d "$D" "$STAGE/data.raw" "$DATA_SIZE" >/dev/null
# mke2fs -d copies atime/ctime from the source files, which touch cannot pin down (ctime) and
# mke2fs's own reading changes (atime); reset them inside the image.
(cd "$D" && find . -printf '%P\n') | while IFS= read -r p; do
  printf 'sif "/%s" atime @%s\nsif "/%s" ctime @%s\n' "$p" "$EPOCH" "$p" "$EPOCH"
done | E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f - "$STAGE/data.raw" >/dev/null 2>&1
qemu-img convert -q -f raw -O qcow2 "$STAGE/data.raw" "$STAGE/data.qcow2"

# ---- publish ----------------------------------------------------------------------------------
# Drop the stamp first: if anything below fails, the next run rebuilds instead of trusting a mix.
# Files are replaced by rename, so a guest being started from OUTDIR right now sees old or new.
rm -f "$STAMP"
[[ " ${OUTPUTS[*]} " == *" vmlinux "* ]] || rm -f "$OUT/vmlinux"
for f in "${OUTPUTS[@]}"; do
  chmod 0644 "$STAGE/$f"
  mv -f "$STAGE/$f" "$OUT/$f"
done
(cd "$OUT" && sha256sum "${OUTPUTS[@]}" >.SHA256SUMS.new && chmod 0644 .SHA256SUMS.new \
   && mv -f .SHA256SUMS.new SHA256SUMS)
chmod 0755 "$OUT"
{
  echo "# CloneBox test guest build stamp (written by build.sh; delete it or use --force to rebuild)"
  printf '%s\n' "$INPUTS"
  echo "inputs_sha256=$INPUTS_SHA"
  echo "outputs=${OUTPUTS[*]}"
  echo "outputs_stat=$(output_stat "${OUTPUTS[@]}")"
  echo "kernel_release=$KREL"
  echo "kernel_deb_sha256=$KSHA"
  echo "modules=${LOAD_ORDER[*]}"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "apt_lists=$APT_FP"
} >"$STAMP"
chmod 0644 "$STAMP"

# QEMU runs as libvirt-qemu and must be able to reach the files through every parent folder.
# Folders of CloneBox's own tree are fixed; anything else is not ours to change, so only warn.
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

log "built $KPKG $KVER (kernel $KREL), modules: ${LOAD_ORDER[*]}"
(cd "$OUT" && ls -l "${OUTPUTS[@]}" SHA256SUMS) >&2
