#!/usr/bin/env bash
# Start virtlogd and libvirtd when none runs (there is no systemd here), fix /dev/kvm permissions first,
# and make sure libvirt's "default" NAT network exists and is active.
# Records what it started in $STATE so stop-libvirt.sh stops only that.
set -euo pipefail
STATE=${CLONEBOX_DEV_STATE:-/run/clonebox-dev}
mkdir -p "$STATE"

# libvirt re-probes QEMU on every call (~4 s) when /dev/kvm permissions change under it
if [ -e /dev/kvm ]; then
  getent group kvm >/dev/null || groupadd -r kvm
  chown root:kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if ! pgrep -x virtlogd >/dev/null; then
  virtlogd -d && echo virtlogd >> "$STATE/started"
  echo "start-libvirt: started virtlogd"
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d && echo libvirtd >> "$STATE/started"
  echo "start-libvirt: started libvirtd"
fi

for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null

if ! virsh -c qemu:///system net-info default >/dev/null 2>&1; then
  tmp=$(mktemp)
  cat > "$tmp" <<'XML'
<network>
  <name>default</name>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='on' delay='0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
  </ip>
</network>
XML
  virsh -c qemu:///system net-define "$tmp" >/dev/null; rm -f "$tmp"
fi
net_active() { local info; info=$(virsh -c qemu:///system net-info default 2>/dev/null) && grep -q 'Active:.*yes' <<<"$info"; }  # no pipe: pipefail + grep -q would see SIGPIPE
if ! net_active; then
  # another process may start it at the same moment; only a network that stays down is an error
  virsh -c qemu:///system net-start default >/dev/null 2>&1 || net_active || {
    echo "start-libvirt: cannot start libvirt network 'default'" >&2; exit 1; }
fi
virsh -c qemu:///system net-autostart default >/dev/null 2>&1 || true
echo "start-libvirt: libvirtd ready, network 'default' active"
