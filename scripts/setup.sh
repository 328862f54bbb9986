#!/usr/bin/env bash
# Set up a machine to run vmsnapbackup, its demo and its tests.
#
# For a fresh Debian 12 machine, as root; safe to run again (each step only
# does what is missing).  Called by scripts/demo.sh and scripts/test.sh; can
# also be sourced.  Steps:
#   1. Debian packages: QEMU, qemu-img, libvirtd, and what libvirt-python
#      needs to build (libvirt-dev, pkg-config, python3-dev, gcc).
#   2. /dev/kvm as udev would set it (root:kvm 0660): QEMU runs as
#      libvirt-qemu, and with a root-only /dev/kvm libvirtd also re-probes
#      QEMU on every define (30-50 s each).
#   3. virtlogd and libvirtd running (by hand: these machines have no systemd).
#   4. <repo>/.venv with the package installed editable, plus test tools.
set -euo pipefail

VSB_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VSB_LIBVIRT_URI="qemu:///system"
VSB_APT_PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev pkg-config openssl
                  python3-venv python3-dev gcc fuse3 libfuse3-dev
                  linux-image-cloud-amd64 busybox-static cpio
                  openssh-server   # integration/sshd.py: a private sshd as the remote hypervisor
                  virtnbdbackup)   # integration/test_tour_coexist.py: the other backup tool beside us
VSB_LIBVIRTD_DEADLINE=60   # seconds to wait for libvirtd to answer

vsb_log() { printf '[setup] %s\n' "$*" >&2; }
vsb_die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

vsb_install_packages() {
    local missing=() pkg
    for pkg in "${VSB_APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        vsb_log "Debian packages: all present"
        return
    fi
    vsb_log "Debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}" </dev/null
}

vsb_fix_kvm() {
    if [ ! -e /dev/kvm ]; then
        vsb_log "/dev/kvm: absent; domains will run under TCG (type='qemu')"
        return
    fi
    if ! getent group kvm >/dev/null; then
        vsb_log "/dev/kvm: no 'kvm' group; leaving permissions as they are"
        return
    fi
    local before
    before="$(stat -c '%G %a' /dev/kvm)"
    if [ "$before" = "kvm 660" ]; then
        vsb_log "/dev/kvm: root:kvm 0660 already"
        return
    fi
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
    vsb_log "/dev/kvm: was '$before', now root:kvm 0660"
    if pgrep -x libvirtd >/dev/null; then
        vsb_log "note: libvirtd was already running and may have cached QEMU capabilities without KVM;" \
                "it re-probes on its own, or restart it to be sure"
    fi
}

vsb_libvirtd_answers() {
    virsh -c "$VSB_LIBVIRT_URI" version >/dev/null 2>&1
}

# Start a daemon with no descriptor beyond 0-2: one inherited from our caller (the
# integration lock that `flock LOCK cmd` hands down) would live on in the daemon,
# and with it the lock, forever.
vsb_detached() {
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec "$@"
    )
}

vsb_start_daemons() {
    if [ -d /run/systemd/system ]; then
        vsb_log "daemons: systemd is running; starting virtlogd and libvirtd through it"
        systemctl start virtlogd.socket libvirtd.socket libvirtd.service
    else
        if pgrep -x virtlogd >/dev/null; then
            vsb_log "daemons: virtlogd already running"
        else
            vsb_log "daemons: starting virtlogd"
            vsb_detached virtlogd -d
        fi
        if pgrep -x libvirtd >/dev/null; then
            vsb_log "daemons: libvirtd already running"
        else
            vsb_log "daemons: starting libvirtd"
            vsb_detached libvirtd -d
        fi
    fi
    local deadline=$((SECONDS + VSB_LIBVIRTD_DEADLINE))
    until vsb_libvirtd_answers; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            virsh -c "$VSB_LIBVIRT_URI" version >&2 || true
            vsb_die "libvirtd did not answer on $VSB_LIBVIRT_URI within ${VSB_LIBVIRTD_DEADLINE} s"
        fi
        sleep 0.2
    done
    vsb_log "daemons: libvirtd answers ($(virsh -c "$VSB_LIBVIRT_URI" version 2>/dev/null \
        | sed -n 's/^Running hypervisor: //p'))"
}

vsb_setup_stamp() {
    # What the install depends on: the package metadata and the interpreter.
    {
        cat "$VSB_REPO_ROOT/setup.cfg" "$VSB_REPO_ROOT/pyproject.toml"
        "$VSB_REPO_ROOT/.venv/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

vsb_setup_venv() {
    local venv="$VSB_REPO_ROOT/.venv" stamp_file want
    stamp_file="$venv/.vmsnapbackup-setup-stamp"
    if [ ! -x "$venv/bin/python" ]; then
        vsb_log "venv: creating $venv"
        python3 -m venv "$venv"
    fi
    want="$(vsb_setup_stamp)"
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ] \
        && "$venv/bin/python" - "$VSB_REPO_ROOT" <<'EOF' 2>/dev/null
import os, sys
import libvirt, pytest, hypothesis, vmsnapbackup  # noqa: F401
root = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(vmsnapbackup.__file__).startswith(root + os.sep) else 1)
EOF
    then
        vsb_log "venv: package installed and up to date"
        return
    fi
    vsb_log "venv: pip install -e '.[test]' (builds libvirt-python on first run; about a minute)"
    rm -f "$stamp_file"
    local pip_log="$venv/pip-install.log"
    if ! (cd "$VSB_REPO_ROOT" && "$venv/bin/python" -m pip install -e '.[test]') >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        vsb_die "pip install failed; full log: $pip_log"
    fi
    echo "$want" >"$stamp_file"
    vsb_log "venv: done"
}

vsb_setup_main() {
    [ "$(id -u)" -eq 0 ] || vsb_die "run as root (installs packages, starts libvirtd)"
    vsb_install_packages
    vsb_fix_kvm
    vsb_start_daemons
    vsb_setup_venv
    vsb_log "ready: $VSB_REPO_ROOT/.venv/bin/vmsnapbackup, libvirt at $VSB_LIBVIRT_URI"
}

vsb_setup_main "$@"
