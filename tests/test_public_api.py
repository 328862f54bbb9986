"""The names a virt-management tool imports from ``vmsnapbackup`` all resolve, the
error tree has one root, and every exit code is distinct."""
from __future__ import annotations

import subprocess
import sys

import vmsnapbackup
from vmsnapbackup import errors


def test_every_public_name_resolves():
    for name in vmsnapbackup.__all__:
        assert getattr(vmsnapbackup, name) is not None, name


def test_unknown_name_is_an_attribute_error():
    try:
        vmsnapbackup.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("no AttributeError")


def test_every_error_descends_from_the_root_and_codes_are_distinct():
    classes = [getattr(errors, n) for n in errors.__all__
               if isinstance(getattr(errors, n), type)
               and issubclass(getattr(errors, n), BaseException)]
    assert all(issubclass(c, errors.VmSnapBackupError) for c in classes)
    codes = [c.value for c in errors.ExitCode]
    assert len(codes) == len(set(codes))
    # each direct child of the root owns its own code
    direct = [c for c in classes if c.__bases__ == (errors.VmSnapBackupError,)]
    assert len({c.exit_code for c in direct}) == len(direct)


def test_importing_the_package_does_not_load_libvirt_or_numpy():
    """The libvirt hook imports the package on every domain start and stop."""
    code = ("import sys, vmsnapbackup; "
            "print(' '.join(m for m in ('libvirt', 'numpy', 'qemu.qmp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
