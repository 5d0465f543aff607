#!/bin/sh
# mmdebstrap --customize-hook of deploy/testguest/debian/build.sh: "$1" is the finished root.
# Makes the tree a first-boot image: services on, no per-machine identity, no caches.
set -eu
R=$1
# every path below is under "$R": an empty or "/" root would clean the build host instead
case "$R" in ""|/) echo "customize.sh: refusing root '$R'" >&2; exit 1 ;; esac
[ -d "$R/var/lib/dpkg" ] || { echo "customize.sh: $R is not a Debian root" >&2; exit 1; }

# systemd-networkd brings up what cloud-init renders (its wait-online orders cloud-init's network
# stage); qemu-guest-agent needs no enabling: udev starts it when its virtio port appears.
chroot "$R" systemctl enable systemd-networkd.service systemd-resolved.service ssh.service
# nothing in a test guest needs these periodic jobs, and under TCG every process start counts
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer 2>/dev/null || true

# per-machine identity is made at first boot: systemd writes /etc/machine-id (also the DHCP
# client id), cloud-init generates the SSH host keys and sets the hostname from meta-data
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id" "$R"/etc/ssh/ssh_host_*
echo debian >"$R/etc/hostname"
# C.UTF-8 needs no generated locale; with it cloud-init's locale module has nothing to do (its
# default, en_US.UTF-8, is not generated in this image and would make cloud-init report an error)
printf 'LANG=C.UTF-8\n' >"$R/etc/default/locale"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
# the host's resolv.conf was copied in for the build; in the guest systemd-resolved provides it
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"

# caches and logs of the build
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/apt/*.bin "$R"/var/lib/apt/lists/* \
  "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old "$R"/var/cache/ldconfig/aux-cache \
  "$R"/var/log/journal/* "$R"/tmp/* "$R"/var/tmp/*
find "$R/var/log" -type f -exec truncate -s 0 {} +
