#!/usr/bin/env bash
# vmsnapbackup demo: a throwaway VM, guest writes into its running disk, and
# (once the commands exist) backups of it while it runs, a restore, a verify.
#
#   bash scripts/demo.sh            set up, (re)create the demo VM, run the demo
#   bash scripts/demo.sh --cleanup  remove the demo VM and every file of it
#
# The demo VM has no guest OS: it sits in its firmware, and "guest writes" are
# made through QEMU's monitor (qemu-io on the disk's virtio backend), which
# goes through the same block layer a guest's writes would.  Re-running
# replaces the previous demo VM.  Needs root (see scripts/setup.sh).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIBVIRT_URI="qemu:///system"
DEMO_NAME="vmsnapbackup-demo"
DEMO_DIR="/var/lib/libvirt/images/$DEMO_NAME"
DEMO_DISK="$DEMO_DIR/vda.qcow2"
DEMO_DISK_SIZE="256M"
DEMO_POOL="/var/lib/$DEMO_NAME/pool"      # where the demo's backups go
DEMO_RESTORE="/var/lib/$DEMO_NAME/restored"  # where the demo restores the latest point
QEMU_LOG="/var/log/libvirt/qemu/$DEMO_NAME.log"
VSB="$REPO_ROOT/.venv/bin/vmsnapbackup"
WRITE_DEADLINE=15                         # seconds to wait for qemu-io's verdict

virsh_() { virsh -q -c "$LIBVIRT_URI" "$@"; }
step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '[demo] ERROR: %s\n' "$*" >&2; exit 1; }

domain_exists() { virsh_ dominfo "$DEMO_NAME" >/dev/null 2>&1; }

virt_type() {
    # KVM only when QEMU (as libvirt-qemu) can open /dev/kvm and libvirt agrees.
    if [ -e /dev/kvm ] && [ "$(stat -c '%G %a' /dev/kvm)" = "kvm 660" ] \
        && virsh_ domcapabilities --virttype kvm >/dev/null 2>&1; then
        echo kvm
    else
        echo qemu
    fi
}

remove_demo_vm() {
    if domain_exists; then
        info "removing the previous $DEMO_NAME"
        if [ "$(virsh_ domstate "$DEMO_NAME")" != "shut off" ]; then
            virsh_ destroy "$DEMO_NAME" >/dev/null
        fi
        virsh_ undefine "$DEMO_NAME" --managed-save --snapshots-metadata \
            --checkpoints-metadata >/dev/null 2>&1 || virsh_ undefine "$DEMO_NAME" >/dev/null
    fi
    rm -rf "$DEMO_DIR" "$(dirname "$DEMO_POOL")"
    rm -f "$QEMU_LOG"
}

create_demo_vm() {
    step "Creating the demo VM $DEMO_NAME (no guest OS, one ${DEMO_DISK_SIZE} qcow2 disk)"
    install -d -m 0755 "$DEMO_DIR"
    qemu-img create -q -f qcow2 "$DEMO_DISK" "$DEMO_DISK_SIZE"
    local type xml
    type="$(virt_type)"
    xml="$(mktemp --tmpdir "$DEMO_NAME.XXXXXX.xml")"
    cat >"$xml" <<EOF
<domain type='$type'>
  <name>$DEMO_NAME</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DEMO_DISK'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    virsh_ define "$xml" >/dev/null
    rm -f "$xml"
    info "defined (domain type '$type')"
}

start_demo_vm() {
    step "Starting $DEMO_NAME"
    virsh_ start "$DEMO_NAME" >/dev/null
    info "state: $(virsh_ domstate "$DEMO_NAME")"
}

disk_alias() {
    # The device id QEMU knows the disk by, from the live XML.
    virsh_ dumpxml "$DEMO_NAME" | awk -v t="$1" '
        /<disk / {in_disk=1; dev=""; alias=""}
        in_disk && /<target / {match($0, /dev=.[^'\''"]*/); dev=substr($0, RSTART+5, RLENGTH-5)}
        in_disk && /<alias / {match($0, /name=.[^'\''"]*/); alias=substr($0, RSTART+6, RLENGTH-6)}
        /<\/disk>/ {if (dev == t) print alias; in_disk=0}'
}

# guest_write TARGET OFFSET LENGTH PATTERN: write LENGTH bytes (numbers in bytes) of PATTERN (e.g.
# 0xaa) at OFFSET into the running disk, as the guest would; PATTERN "zero"
# writes zeroes.  qemu-io reports to the domain log, which is checked.
guest_write() {
    local target="$1" offset="$2" length="$3" pattern="$4" alias cmd out start deadline
    alias="$(disk_alias "$target")"
    [ -n "$alias" ] || die "no alias for disk $target (is $DEMO_NAME running?)"
    if [ "$pattern" = zero ]; then cmd="write -z $offset $length"; else cmd="write -P $pattern $offset $length"; fi
    start="$(stat -c %s "$QEMU_LOG")"
    out="$(virsh_ qemu-monitor-command "$DEMO_NAME" --hmp \
        "qemu-io -d /machine/peripheral/$alias/virtio-backend \"$cmd\"")"
    [ -z "${out//[$'\r\n ']/}" ] || die "qemu-io $cmd: $out"
    deadline=$((SECONDS + WRITE_DEADLINE))
    until tail -c +"$((start + 1))" "$QEMU_LOG" | grep -q "^wrote $length/$length bytes at offset $offset\$"; do
        if tail -c +"$((start + 1))" "$QEMU_LOG" | grep -E -q 'failed|not found|[Ee]rror'; then
            die "qemu-io $cmd: $(tail -c +"$((start + 1))" "$QEMU_LOG")"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "qemu-io $cmd: no verdict in $QEMU_LOG"
        sleep 0.05
    done
    virsh_ qemu-monitor-command "$DEMO_NAME" --hmp \
        "qemu-io -d /machine/peripheral/$alias/virtio-backend \"flush\"" >/dev/null
    info "guest wrote $length bytes of $pattern at offset $offset of $target"
}

write_initial_data() {
    step "Writing data into the running disk, as a guest would"
    local MiB=$((1024 * 1024))
    guest_write vda 0 "$MiB" 0xaa
    guest_write vda $((64 * MiB)) $((4 * MiB)) 0x5c
    guest_write vda $((256 * MiB - 65536)) 65536 0x11
}

show_demo_vm() {
    step "The demo VM and its disks"
    virsh_ list --all | grep -F "$DEMO_NAME" | sed 's/^/    /'
    virsh_ domblklist "$DEMO_NAME" --details | sed 's/^/    /'
}

vsb() { "$VSB" --pool "$DEMO_POOL" "$@"; }

first_backup() {
    step "Point 1: a full backup of the running VM (the base volume)"
    vsb backup "$DEMO_NAME"
}

backup_while_writing() {
    step "Point 2: the guest writes, then writes again while the backup runs"
    local MiB=$((1024 * 1024)) pid
    guest_write vda $((10 * MiB)) $((2 * MiB)) 0x42
    guest_write vda 0 65536 zero
    vsb backup "$DEMO_NAME" &
    pid=$!
    guest_write vda $((100 * MiB)) "$MiB" 0x77
    wait "$pid" || die "the backup failed"
    info "$DEMO_NAME still runs on its original image:"
    virsh_ domblklist "$DEMO_NAME" | sed 's/^/    /'
}

list_points() {
    step "The points in the pool $DEMO_POOL"
    vsb list "$DEMO_NAME" | sed 's/^/    /'
}

restore_latest() {
    step "Restoring the latest point into $DEMO_RESTORE (checked against its check table)"
    rm -rf "$DEMO_RESTORE"
    vsb restore "$DEMO_NAME" --point latest --to "$DEMO_RESTORE" | sed 's/^/    /'
    ls -ls "$DEMO_RESTORE" | sed 's/^/    /'
}

verify_pool() {
    step "Verifying every point: every block re-read and compared with its table"
    vsb verify "$DEMO_NAME" | sed 's/^/    /'
}

backup_steps() {
    first_backup
    backup_while_writing
    list_points
    verify_pool
    restore_latest
}

cleanup() {
    step "Removing the demo VM $DEMO_NAME and its files"
    remove_demo_vm
    info "done"
}

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
    case "${1:-}" in
        "") ;;
        --cleanup) [ "$(id -u)" -eq 0 ] || die "run as root"; cleanup; return ;;
        -h|--help) usage; return ;;
        *) usage >&2; exit 2 ;;
    esac
    step "Setting up (scripts/setup.sh)"
    bash "$REPO_ROOT/scripts/setup.sh"
    step "Replacing any previous demo VM"
    remove_demo_vm
    create_demo_vm
    start_demo_vm
    write_initial_data
    show_demo_vm
    backup_steps
    step "Demo finished. The VM $DEMO_NAME keeps running; remove it with: bash scripts/demo.sh --cleanup"
}

main "$@"
