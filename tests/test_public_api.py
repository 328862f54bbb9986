"""The names a virt-management tool imports from ``vmsnapbackup`` all resolve, the
error tree has one root, and every exit code is distinct."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import vmsnapbackup
from vmsnapbackup import errors


def test_every_public_name_resolves() -> None:
    for name in vmsnapbackup.__all__:
        assert getattr(vmsnapbackup, name) is not None, name


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        vmsnapbackup.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("no AttributeError")


def test_every_error_descends_from_the_root_and_codes_are_distinct() -> None:
    classes = [getattr(errors, n) for n in errors.__all__
               if isinstance(getattr(errors, n), type)
               and issubclass(getattr(errors, n), BaseException)]
    assert all(issubclass(c, errors.VmSnapBackupError) for c in classes)
    # __members__, not iteration: iterating an IntEnum skips aliases, so two names
    # with one value would look like one code and this check could never fail.
    codes = [m.value for m in errors.ExitCode.__members__.values()]
    assert len(codes) == len(set(codes)), errors.ExitCode.__members__
    # each direct child of the root owns its own code
    direct = [c for c in classes if c.__bases__ == (errors.VmSnapBackupError,)]
    assert len({c.exit_code for c in direct}) == len(direct)


def test_importing_the_package_does_not_load_libvirt_or_numpy() -> None:
    """The libvirt hook imports the package on every domain start and stop."""
    code = ("import sys, vmsnapbackup; "
            "print(' '.join(m for m in ('libvirt', 'numpy', 'qemu.qmp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""


def _type_checking_names() -> Dict[str, Optional[str]]:
    """name -> module of every import in ``vmsnapbackup/__init__.py``'s TYPE_CHECKING block."""
    tree = ast.parse(Path(vmsnapbackup.__file__).read_text())
    names: Dict[str, Optional[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                for alias in imp.names:
                    names[alias.asname or alias.name] = imp.module
    return names


def test_type_checkers_see_every_lazy_name_with_its_real_module() -> None:
    """The TYPE_CHECKING imports are what mypy sees; ``_LAZY`` is what runs: one list."""
    assert _type_checking_names() == vmsnapbackup._LAZY


def test_all_is_curated() -> None:
    public = vmsnapbackup.__all__
    assert len(public) == len(set(public))
    assert set(vmsnapbackup._LAZY) <= set(public)
    assert not [n for n in public if n.startswith("_") and n != "__version__"]
    # every error class is public, the errno helpers are not
    assert set(errors.__all__) - set(public) == {"storage_error_for_errno",
                                                 "storage_error_from_oserror"}
