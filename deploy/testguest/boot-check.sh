#!/usr/bin/env bash
# Boot the CloneBox test guest for real on qemu:///system and check everything it promises:
#   1. boot, time create -> /init -> guest agent -> READY, IP via the agent, HTTP page with the
#      hostname, /data/hello.txt via guest-exec, then ACPI shutdown must stop it within 30 s with
#      /data cleanly unmounted;
#   2. boot with clonebox.ignore_acpi=1: ACPI shutdown must be ignored for 10 s, virsh destroy stops it;
#   3. boot, shutdown through the guest agent (qemu-ga -> /sbin/shutdown) must stop it within 30 s.
#
#   boot-check.sh [IMAGEDIR]     IMAGEDIR defaults to /var/lib/clonebox/images/testguest
#
# Environment: KERNEL=vmlinux|vmlinuz picks the kernel file (default: vmlinux when built, it boots
# 5-7 s faster under TCG); CMDLINE_EXTRA is appended to the kernel command line (e.g. acpi=noirq).
#
# Every domain is transient, the data disk is a qcow2 overlay in a temp folder under
# /var/lib/clonebox/tmp (the base data.qcow2 is never written), and all of it is removed on exit,
# also on failure. Exits non-zero on any failed check.
set -euo pipefail
umask 022

IMG=$(realpath -m "${1:-/var/lib/clonebox/images/testguest}")
URI=qemu:///system
WORK_BASE=/var/lib/clonebox/tmp
SUBNET_RE='^192\.168\.122\.[0-9]+$'   # libvirt "default" network: the only place we may connect to
SHUTDOWN_TIMEOUT=30
IGNORE_WINDOW=10
BOOT_TIMEOUT=120                       # TCG on a busy host can be slow; normal is well under 10 s

virsh() { command virsh -q -c "$URI" "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "boot-check: $*"; }
fail() { echo "boot-check: FAIL: $*" >&2; exit 1; }

for f in vmlinuz initrd.img data.qcow2; do
  [ -r "$IMG/$f" ] || fail "$IMG/$f missing; run deploy/testguest/build.sh first"
done
if [ -z "${KERNEL:-}" ]; then
  KERNEL=vmlinuz
  [ -r "$IMG/vmlinux" ] && KERNEL=vmlinux
fi
[ -r "$IMG/$KERNEL" ] || fail "$IMG/$KERNEL missing"
CMDLINE="console=ttyS0 quiet${CMDLINE_EXTRA:+ $CMDLINE_EXTRA}"
log "kernel $IMG/$KERNEL, cmdline: $CMDLINE clonebox.hostname=NAME ..."
virsh version >/dev/null 2>&1 || fail "libvirtd not reachable at $URI (deploy/dev/start-libvirt.sh)"

mkdir -p "$WORK_BASE"
chmod 0755 /var/lib/clonebox "$WORK_BASE"
WORK=$(mktemp -d "$WORK_BASE/boot-check.XXXXXX")
chmod 0755 "$WORK"   # QEMU runs as libvirt-qemu and must reach the overlay and the console log
DOMAINS=()
CURRENT_CONSOLE=""
SUMMARY=()
BASE_SHA=$(sha256sum <"$IMG/data.qcow2")

cleanup() {
  local rc=$? d
  trap - EXIT INT TERM
  if [ $rc -ne 0 ] && [ -n "$CURRENT_CONSOLE" ] && [ -f "$CURRENT_CONSOLE" ]; then
    echo "---- last serial console lines ($CURRENT_CONSOLE) ----" >&2
    tail -n 40 "$CURRENT_CONSOLE" >&2 || true
    echo "------------------------------------------------------" >&2
  fi
  for d in "${DOMAINS[@]}"; do
    virsh destroy "$d" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

domain_gone() { ! virsh domstate "$1" >/dev/null 2>&1; }
domain_running() { [ "$(virsh domstate "$1" 2>/dev/null)" = running ]; }
agent() { virsh qemu-agent-command --timeout 5 "$1" "$2"; }

# boot NAME [EXTRA_CMDLINE]: start a transient domain; sets T0 and CONSOLE
boot() {
  local name=$1 extra=${2:-} overlay xml
  overlay=$WORK/$name-data.qcow2
  CONSOLE=$WORK/$name-console.log
  CURRENT_CONSOLE=$CONSOLE
  qemu-img create -q -f qcow2 -F qcow2 -b "$IMG/data.qcow2" "$overlay"
  xml=$WORK/$name.xml
  cat >"$xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$IMG/$KERNEL</kernel>
    <initrd>$IMG/initrd.img</initrd>
    <cmdline>$CMDLINE clonebox.hostname=$name $extra</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <!-- nothing the guest does not use: under TCG the USB controller alone costs ~1 s of kernel
         boot, and the NIC's iPXE option ROM slows down the firmware -->
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$overlay'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='$CONSOLE'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
EOF
  DOMAINS+=("$name")
  T0=$(now)
  virsh create "$xml" >/dev/null || fail "virsh create $name failed"
  log "$name: created${extra:+ (cmdline: $extra)}"
}

# wait_agent NAME: poll guest-ping, noting when /init's first marker shows up on the console
wait_agent() {
  local name=$1 t_init="" t_agent
  while :; do
    if [ -z "$t_init" ] && grep -q 'CLONEBOX-TESTGUEST INIT' "$CONSOLE" 2>/dev/null; then
      t_init=$(since "$T0")
      log "$name: /init running after ${t_init} s ($(grep -o 'INIT uptime=[^ ]*' "$CONSOLE" | head -n1))"
    fi
    if agent "$name" '{"execute":"guest-ping"}' >/dev/null 2>&1; then
      t_agent=$(since "$T0")
      log "$name: guest agent answers guest-ping after $t_agent s"
      SUMMARY+=("$(printf '%-22s create->/init %5s s   create->agent %5s s' "$name" "${t_init:-?}" "$t_agent")")
      return 0
    fi
    domain_running "$name" || fail "$name stopped while waiting for the guest agent"
    awk -v a="$T0" -v b="$(now)" -v t="$BOOT_TIMEOUT" 'BEGIN { exit !(b - a > t) }' \
      && fail "$name: guest agent not answering after $BOOT_TIMEOUT s"
    sleep 0.2
  done
}

# wait_console NAME PATTERN TIMEOUT
wait_console() {
  local name=$1 pattern=$2 timeout=$3 start
  start=$(now)
  until grep -q -- "$pattern" "$CONSOLE" 2>/dev/null; do
    awk -v a="$start" -v b="$(now)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }' \
      && fail "$name: '$pattern' not on the console after $timeout s"
    sleep 0.2
  done
}

# wait_gone NAME TIMEOUT: true if the domain disappears (transient + on_poweroff=destroy) in time
wait_gone() {
  local name=$1 timeout=$2 start
  start=$(now)
  until domain_gone "$name"; do
    awk -v a="$start" -v b="$(now)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }' && return 1
    sleep 0.2
  done
}

guest_ip() {
  local name=$1 ip=""
  for _ in $(seq 1 100); do
    ip=$(virsh domifaddr "$name" --source agent 2>/dev/null \
         | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^192\.168\.122\.[0-9]+\//) { split($i, a, "/"); print a[1]; exit } }')
    [ -n "$ip" ] && break
    sleep 0.3
  done
  [[ $ip =~ $SUBNET_RE ]] || fail "$name: no 192.168.122.x address reported by the guest agent"
  echo "$ip"
}

# guest_exec NAME PATH [ARG...]: run a command through qemu-ga, print its stdout
guest_exec() {
  local name=$1 path=$2 args="" a pid reply
  shift 2
  for a in "$@"; do args+="${args:+,}\"$a\""; done
  reply=$(agent "$name" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"$path\",\"arg\":[$args],\"capture-output\":true}}")
  pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' <<<"$reply")
  [ -n "$pid" ] || fail "$name: guest-exec $path failed: $reply"
  for _ in $(seq 1 50); do
    reply=$(agent "$name" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
    if grep -q '"exited": *true' <<<"$reply"; then
      grep -q '"exitcode": *0' <<<"$reply" || fail "$name: guest-exec $path $*: $reply"
      sed -n 's/.*"out-data": *"\([^"]*\)".*/\1/p' <<<"$reply" | base64 -d
      return 0
    fi
    sleep 0.1
  done
  fail "$name: guest-exec $path did not finish"
}

# The ext4 "clean" flag is cleared while mounted read-write and set again only by a clean unmount.
check_fs_clean() {
  local name=$1 raw=$WORK/$1-check.raw state
  qemu-img convert -f qcow2 -O raw "$WORK/$name-data.qcow2" "$raw"
  state=$(dumpe2fs -h "$raw" 2>/dev/null | sed -n 's/^Filesystem state: *//p')
  rm -f "$raw"
  [ "$state" = clean ] || fail "$name: data disk filesystem state is '$state' after shutdown, not clean"
  log "$name: data disk filesystem is clean after shutdown"
}

TAG=cbtg-$$

# ---- 1: full functional check, ACPI shutdown ----
n1=$TAG-acpi
boot "$n1"
wait_agent "$n1"
wait_console "$n1" 'CLONEBOX-TESTGUEST READY' 60
log "$n1: READY marker after $(since "$T0") s ($(grep -o 'READY .*' "$CONSOLE" | head -n1 | tr -d '\r'))"
ip=$(guest_ip "$n1")
log "$n1: guest agent reports IP $ip"
page=$(curl -fsS --noproxy '*' --max-time 10 "http://$ip/") || fail "$n1: HTTP GET http://$ip/ failed"
grep -q "hostname: <span id=\"hostname\">$n1</span>" <<<"$page" || fail "$n1: page does not show hostname $n1"
log "$n1: http://$ip/ serves the page with hostname $n1"
hello=$(guest_exec "$n1" /bin/cat /data/hello.txt)
[ "$hello" = "hello from the CloneBox test guest data disk" ] || fail "$n1: /data/hello.txt is '$hello'"
log "$n1: /data/hello.txt read through guest-exec"
t=$(now)
virsh shutdown --mode acpi "$n1" >/dev/null
wait_gone "$n1" "$SHUTDOWN_TIMEOUT" || fail "$n1: still running $SHUTDOWN_TIMEOUT s after ACPI shutdown"
log "$n1: ACPI shutdown completed in $(since "$t") s"
grep -q 'CLONEBOX-TESTGUEST SHUTDOWN action=poweroff reason=ACPI power button' "$CONSOLE" \
  || fail "$n1: guest stopped but not through its ACPI handler"
grep -q 'CLONEBOX-TESTGUEST SHUTDOWN /data unmounted' "$CONSOLE" || fail "$n1: /data was not unmounted"
check_fs_clean "$n1"

# ---- 2: clonebox.ignore_acpi=1, ACPI must be ignored, destroy needed ----
n2=$TAG-noacpi
boot "$n2" clonebox.ignore_acpi=1
wait_agent "$n2"
wait_console "$n2" 'CLONEBOX-TESTGUEST ACPI power button IGNORED' 30
virsh shutdown --mode acpi "$n2" >/dev/null
if wait_gone "$n2" "$IGNORE_WINDOW"; then
  fail "$n2: stopped after ACPI shutdown although clonebox.ignore_acpi=1"
fi
domain_running "$n2" || fail "$n2: not running after the ignored ACPI request"
! grep -q 'CLONEBOX-TESTGUEST SHUTDOWN' "$CONSOLE" || fail "$n2: guest started shutting down"
log "$n2: ACPI shutdown ignored for $IGNORE_WINDOW s as asked; destroying"
virsh destroy "$n2" >/dev/null
wait_gone "$n2" 10 || fail "$n2: virsh destroy did not stop it"
log "$n2: destroyed"

# ---- 3: shutdown through the guest agent ----
n3=$TAG-agent
boot "$n3"
wait_agent "$n3"
t=$(now)
virsh shutdown --mode agent "$n3" >/dev/null
wait_gone "$n3" "$SHUTDOWN_TIMEOUT" || fail "$n3: still running $SHUTDOWN_TIMEOUT s after agent shutdown"
log "$n3: guest-agent shutdown completed in $(since "$t") s"
grep -q 'CLONEBOX-TESTGUEST SHUTDOWN action=poweroff' "$CONSOLE" \
  || fail "$n3: guest stopped but not through /sbin/shutdown"
check_fs_clean "$n3"

[ "$(sha256sum <"$IMG/data.qcow2")" = "$BASE_SHA" ] || fail "the base data.qcow2 changed"
log "base data.qcow2 unchanged"
log "all checks passed ($KERNEL, cmdline: $CMDLINE)"
printf '  %s\n' "${SUMMARY[@]}"
