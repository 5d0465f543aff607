#!/usr/bin/env bash
# Stop only the daemons that start-libvirt.sh started.
set -uo pipefail
STATE=${CLONEBOX_DEV_STATE:-/run/clonebox-dev}
[ -f "$STATE/started" ] || exit 0
while read -r d; do
  pkill -x "$d" && echo "stop-libvirt: stopped $d"
done < <(sort -u "$STATE/started")
rm -f "$STATE/started"
