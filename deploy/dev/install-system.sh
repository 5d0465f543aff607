#!/usr/bin/env bash
# Install the Debian packages CloneBox needs, idempotently.
# Safe to run again: apt-get only acts when something is missing.
set -euo pipefail

PKGS=(
  # build libvirt-python from source
  libvirt-dev pkg-config gcc python3-dev
  # the real hypervisor stack
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  dnsmasq-base iptables ovmf
  # test guest kit: kernel + busybox initramfs with qemu-ga, data disk tools
  busybox-static qemu-guest-agent cpio e2fsprogs
  # controller store for HA tests
  postgresql
  # xattr tools for checking ownership marks
  attr
  # `cloud-init schema` checks every user-data CloneBox renders; ssh-keygen checks generated keys
  cloud-init openssh-client
  # the Debian cloud-init test guest (deploy/testguest/debian) and real SSH logins into it
  mmdebstrap lz4 sshpass
)

missing=()
for p in "${PKGS[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"install ok installed"* ]] || missing+=("$p")
done

# buf comes from npm; Node may already be installed from another source that ships its own npm
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # the package lists may be missing on a fresh machine
  apt-get update -qq
  # policy-rc.d keeps package scripts from trying to start services (there is no systemd here)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-system: all system packages present"
fi
