"""The ssh parameters read from a libvirt URI and the ssh argv built from them."""
from __future__ import annotations

import errno

import pytest

from vmsnapbackup.adapters.hostfor import SshTarget, ssh_target_for
from vmsnapbackup.adapters.sshhost import errno_from_message, ssh_base_argv
from vmsnapbackup.errors import UsageError


def test_local_uris_name_no_ssh_target() -> None:
    for uri in (None, "", "qemu:///system", "qemu+tls://h/system", "qemu+tcp://h/system"):
        assert ssh_target_for(uri) is None


def test_ssh_uri_carries_user_port_keyfile_and_no_verify() -> None:
    target = ssh_target_for("qemu+ssh://root@10.0.0.5:2222/system?keyfile=/k/id&no_verify=1")
    assert target == SshTarget(host="10.0.0.5", user="root", port=2222, keyfile="/k/id",
                               no_verify=True)
    assert target.destination == "root@10.0.0.5"
    bare = ssh_target_for("qemu+ssh://hv1/system")
    assert bare == SshTarget(host="hv1")
    assert bare is not None and bare.destination == "hv1"


def test_ssh_uri_without_host_or_with_bad_port_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        ssh_target_for("qemu+ssh:///system")
    with pytest.raises(UsageError):
        ssh_target_for("qemu+ssh://h:99999/system")


def test_argv_verifies_host_keys_unless_told_not_to() -> None:
    strict = ssh_base_argv(SshTarget(host="h"), "/c")
    assert "StrictHostKeyChecking=no" not in strict
    assert strict[:3] == ["ssh", "-S", "/c"] and "BatchMode=yes" in strict
    loose = ssh_base_argv(SshTarget(host="h", port=22, keyfile="/k", no_verify=True), "/c")
    assert "StrictHostKeyChecking=no" in loose
    assert loose[loose.index("-p") + 1] == "22" and loose[loose.index("-i") + 1] == "/k"


def test_remote_messages_map_to_errnos() -> None:
    assert errno_from_message("rmdir: failed to remove 'x': Directory not empty") == \
        errno.ENOTEMPTY
    assert errno_from_message("cat: x: No such file or directory") == errno.ENOENT
    assert errno_from_message("bash: x: cannot overwrite existing file") == errno.EEXIST
    assert errno_from_message("something odd") == errno.EIO
