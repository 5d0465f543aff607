#!/usr/bin/env bash
# The main job end to end: a local controller and agent on real libvirt, then a three-VM stack
# (examples/stack: db -> api -> web, each started only when what it needs is healthy) brought up
# with `clonebox up`, shown with its health, and taken down in reverse order; a single VM's life
# through the VM commands; and the audit log of all of it listed and verified. Exits non-zero on
# any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

PLAN=examples/stack/clonebox-compose.yaml
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  # leave nothing behind even when a step fails
  clonebox down stack >/dev/null 2>&1 || true
  clonebox vm delete tiny-b --wait >/dev/null 2>&1 || true
  clonebox dev down >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "start a local controller and agent (qemu:///system)"
clonebox dev up
clonebox dev status

say "hosts"
clonebox host list

say "the stack: check the plan file (graph, names, capacity), then what 'up' would do"
clonebox plan validate -f "$PLAN"
clonebox up -f "$PLAN" --dry-run

say "clonebox up: db, then api once db is healthy, then web once api reaches db by its service name (plan network cb-stack)"
clonebox up -f "$PLAN"

say "the stack's VMs, their health, and the plan's history"
clonebox ps stack
clonebox health list
clonebox plan history stack

say "the last lines db's guest wrote on its serial console"
clonebox logs stack-db --tail 400
echo

say "applying the same file again changes nothing"
clonebox up -f "$PLAN"

say "clonebox down: web, api, then db"
clonebox down stack
clonebox ps stack

say "one VM through the VM commands: a version-2 spec without a key gets a generated one"
clonebox vm create -f examples/tiny-b.yaml --wait
keyfile=$(mktemp -u /tmp/clonebox-demo-key.XXXXXX)
clonebox vm ssh-key tiny-b -O "$keyfile"
ssh-keygen -l -f "$keyfile"
rm -f "$keyfile"
clonebox vm stop tiny-b --wait
clonebox vm delete tiny-b --wait
clonebox vm list

say "who did what: the audit log, and proof nobody edited it"
clonebox audit list --limit 12
clonebox audit verify

say "stop the local daemons"
clonebox dev down
trap - EXIT
say "demo finished"
