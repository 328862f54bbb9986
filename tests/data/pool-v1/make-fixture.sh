#!/usr/bin/env bash
# Build the version-1 pool fixture (tests/data/pool-v1/pool) with the code of
# the checkout this script runs in, through the public CLI: a real offline
# backup of a tiny shut-off throwaway libvirt domain, twice.
#
# Kept for the record of how the fixture was made; running it again with a
# newer vmsnapbackup writes a pool of *that* version, which is not what the
# fixture is for.  Run as root, under the shared integration lock:
#   flock /tmp/vsb-integration.lock bash tests/data/pool-v1/make-fixture.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
vsb="$repo/.venv/bin/vmsnapbackup"
uri="qemu:///system"
name="vsb-fixture-v1-$$"
image="/var/lib/libvirt/images/$name.qcow2"
pool="$here/pool"
size=1052672          # 1 MiB + 4 KiB: the last 64 KiB block is short

cleanup() {
    virsh -c "$uri" undefine "$name" >/dev/null 2>&1 || true
    rm -f "$image"
}
trap cleanup EXIT

[ ! -e "$pool" ] || { echo "$pool exists; remove it first" >&2; exit 1; }

qemu-img create -q -f qcow2 "$image" "$size"
# point 1: a few data blocks, including the short last one
qemu-io -f qcow2 -c "write -P 0x11 0 64k" -c "write -P 0x22 262144 4k" \
        -c "write -P 0x33 1048576 4k" "$image" >/dev/null
cat >"$here/domain.xml" <<XML
<domain type='qemu'>
  <name>$name</name>
  <uuid>6f1d2c3b-0000-4000-8000-00000000f1a1</uuid>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$image'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
XML
virsh -c "$uri" define "$here/domain.xml" >/dev/null
rm -f "$here/domain.xml"

"$vsb" -c "$uri" --pool "$pool" backup "$name" --no-dirty-bitmaps >/dev/null
qemu-img convert -O raw "$image" "$here/p1.raw"

# point 2: change one block, zero another, add one: a difference table of 3 entries
qemu-io -f qcow2 -c "write -P 0x44 65536 64k" -c "write -z 0 64k" \
        -c "write -P 0x55 524288 512" "$image" >/dev/null
"$vsb" -c "$uri" --pool "$pool" backup "$name" --no-dirty-bitmaps >/dev/null
qemu-img convert -O raw "$image" "$here/p2.raw"

{
    echo "{"
    echo "  \"domain\": \"$name\","
    echo "  \"virtual_size\": $size,"
    echo "  \"sha256\": {\"1\": \"$(sha256sum "$here/p1.raw" | cut -d' ' -f1)\","
    echo "             \"2\": \"$(sha256sum "$here/p2.raw" | cut -d' ' -f1)\"}"
    echo "}"
} >"$here/expected.json"
rm -f "$here/p1.raw" "$here/p2.raw"
"$vsb" --pool "$pool" list
