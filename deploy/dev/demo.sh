#!/usr/bin/env bash
# The main job end to end: a local controller and agent on real libvirt, two tiny VMs from examples/,
# shown running with their guest addresses, then stopped and deleted, and the audit log of all of it
# listed and verified. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  # leave nothing behind even when a step fails
  clonebox vm delete tiny-a --wait >/dev/null 2>&1 || true
  clonebox vm delete tiny-b --wait >/dev/null 2>&1 || true
  clonebox dev down >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "start a local controller and agent (qemu:///system)"
clonebox dev up
clonebox dev status

say "hosts"
clonebox host list

say "create two tiny VMs from examples/"
clonebox vm create -f examples/tiny-a.yaml --wait
clonebox vm create -f examples/tiny-b.yaml --wait

say "wait for guest addresses (qemu-ga inside the guest reports them)"
for vm in tiny-a tiny-b; do
  for _ in $(seq 1 60); do
    addr=$(clonebox -o json vm show "$vm" | python3 -c 'import json,sys; a=json.load(sys.stdin).get("addresses",[]); print(a[0]["address"] if a else "")')
    [ -n "$addr" ] && break
    sleep 1
  done
  [ -n "$addr" ] || { echo "demo: $vm reported no address within 60 s" >&2; exit 1; }
  echo "$vm: $addr"
done
clonebox vm list

say "tiny-b is a version-2 spec without a key: the agent generated one (operators only; the read is audited)"
keyfile=$(mktemp -u /tmp/clonebox-demo-key.XXXXXX)
clonebox vm ssh-key tiny-b -O "$keyfile"
ssh-keygen -l -f "$keyfile"
rm -f "$keyfile"

say "stop both (graceful ACPI / guest-agent shutdown)"
clonebox vm stop tiny-a --wait
clonebox vm stop tiny-b --wait
clonebox vm list

say "delete both"
clonebox vm delete tiny-a --wait
clonebox vm delete tiny-b --wait
clonebox vm list

say "who did what: the audit log, and proof nobody edited it"
clonebox audit list --limit 12
clonebox audit verify

say "stop the local daemons"
clonebox dev down
trap - EXIT
say "demo finished"
