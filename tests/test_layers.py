"""The layers, as the imports show them (read from the source, never by importing).

    base:      errors, progress           importable by every module
    core       pure: tables, pool format  imports base only
    adapters   the hypervisor host        imports core, base
    workflows  the recipes                imports adapters, core, base
    cli, hooks the entry points           import anything below
    facade:    vmsnapbackup/__init__.py, __main__.py

Every import counts: module level, inside functions, under ``TYPE_CHECKING``.
A second rule: only adapters touch the host, so ``libvirt``, ``qemu`` (QEMU's
QMP client) and ``subprocess`` are imported nowhere above them, nor in core.
Today's exceptions are listed in ``HOST_IMPORTS_ALLOWED``; that list only
shrinks: a new offender fails, and so does an entry that is no longer needed.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "vmsnapbackup"
PACKAGE = "vmsnapbackup"

BASE = {"errors", "progress"}
RANK = {"core": 1, "adapters": 2, "workflows": 3, "cli": 4, "hooks": 4}
FACADE = 5

#: Top-level names of the host-touching libraries.
HOST_LIBRARIES = {"libvirt", "qemu", "subprocess"}

#: Layers that must not import HOST_LIBRARIES.
NO_HOST_LAYERS = {"core", "workflows", "cli", "hooks"}

#: RATCHET: (file, library) pairs that still break the rule above.  Their owners
#: are moving these calls behind adapters; delete a line when it is done (the
#: test fails until you do, so this list is always exactly what is left).
HOST_IMPORTS_ALLOWED = {
    ("hooks/install.py", "subprocess"),
    ("hooks/jobs.py", "subprocess"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    base = PACKAGE_DIR.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in the file, nested ones too."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from . import errors`` imports a module; ``from .x import f`` imports x
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if _is_module(candidate) else base


def layer_of(module: str) -> Optional[str]:
    """The layer name of a module of the package (None outside it)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1 or parts[1] == "__main__":
        return "facade"
    if parts[1] in BASE:
        return "base"
    if parts[1] in RANK:
        return parts[1]
    raise AssertionError(f"{module}: in no layer; add it to tests/test_layers.py")


def rank(layer: str) -> int:
    return 0 if layer == "base" else FACADE if layer == "facade" else RANK[layer]


def _sources(root: Path = PACKAGE_DIR) -> List[Path]:
    return sorted(root.rglob("*.py"))


def upward_imports(root: Path = PACKAGE_DIR) -> List[str]:
    problems = []
    for path in _sources(root):
        own = layer_of(_module_name(path))
        assert own is not None
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is None or (theirs == "facade" and target == PACKAGE and own != "facade"):
                # ``import vmsnapbackup`` alone only reaches the base (errors, version)
                continue
            if rank(theirs) > rank(own):
                problems.append(f"{path.relative_to(PACKAGE_DIR)}:{line}: {own} imports "
                                f"{target} ({theirs})")
    return problems


def host_imports(root: Path = PACKAGE_DIR) -> Dict[Tuple[str, str], List[int]]:
    found: Dict[Tuple[str, str], List[int]] = {}
    for path in _sources(root):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        if rel.split("/")[0] not in NO_HOST_LAYERS:
            continue
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top in HOST_LIBRARIES:
                found.setdefault((rel, top), []).append(line)
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_imports() == []


def test_workflows_cli_hooks_and_core_leave_the_host_to_adapters() -> None:
    found = host_imports()
    new = {f"{f}:{lines[0]}: imports {lib}" for (f, lib), lines in found.items()
           if (f, lib) not in HOST_IMPORTS_ALLOWED}
    assert not new, f"new host imports outside adapters/ (go through an adapter): {sorted(new)}"


def test_the_host_import_allow_list_has_nothing_stale() -> None:
    stale = HOST_IMPORTS_ALLOWED - set(host_imports())
    assert not stale, f"no longer imported: delete from HOST_IMPORTS_ALLOWED: {sorted(stale)}"


# the checker itself ----------------------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small package laid out like ours, for checking the checker."""
    root = tmp_path / PACKAGE
    for d in ("", "core", "adapters", "workflows", "cli", "hooks"):
        (root / d).mkdir(exist_ok=True)
        (root / d / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    monkeypatch.setitem(globals(), "PACKAGE_DIR", root)
    return root


def test_relative_nested_and_type_checking_imports_are_resolved(tree: Path) -> None:
    (tree / "core" / "table.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..errors import X\n"
        "from . import other\n"
        "if TYPE_CHECKING:\n    from ..adapters.host import H\n"
        "def f():\n    import vmsnapbackup.workflows.backup\n")
    (tree / "core" / "other.py").write_text("")
    (tree / "adapters" / "host.py").write_text("")
    (tree / "workflows" / "backup.py").write_text("")
    got = [t for _, t in imports_of(tree / "core" / "table.py")]
    assert got == ["typing", "vmsnapbackup.errors", "vmsnapbackup.core.other",
                   "vmsnapbackup.adapters.host", "vmsnapbackup.workflows.backup"]
    assert len(upward_imports(tree)) == 2


def test_an_upward_import_is_caught(tree: Path) -> None:
    (tree / "workflows" / "backup.py").write_text("")
    (tree / "adapters" / "pool.py").write_text(
        "def f():\n    from ..workflows.backup import run\n")
    assert upward_imports(tree) == [
        "adapters/pool.py:2: adapters imports vmsnapbackup.workflows.backup (workflows)"]


def test_a_host_import_above_adapters_is_caught(tree: Path) -> None:
    (tree / "cli" / "run.py").write_text("def f():\n    import subprocess\n")
    (tree / "adapters" / "proc.py").write_text("import subprocess\nimport libvirt\n")
    assert host_imports(tree) == {("cli/run.py", "subprocess"): [2]}
