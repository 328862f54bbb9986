"""ruff and ``mypy --strict`` over the whole package, as ratchets.

The configuration is pyproject.toml's.  Modules not yet clean are listed there
(mypy: an override with ``ignore_errors``; ruff: ``per-file-ignores``).  Both
lists only shrink: a test here fails when a module outside the list has a
finding, and also when a listed module (or a listed ruff code of a file) has
none left, so the list always says exactly what is still to fix.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - tomli is in the test extras for these versions
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vmsnapbackup"
PYPROJECT = ROOT / "pyproject.toml"


def _config() -> Dict[str, Any]:
    with open(PYPROJECT, "rb") as f:
        config: Dict[str, Any] = tomllib.load(f)
    return config


def _module_of(path: str) -> str:
    rel = Path(path).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _mypy_ratchet() -> Set[str]:
    lists = [o["module"] for o in _config()["tool"]["mypy"].get("overrides", [])
             if o.get("ignore_errors")]
    assert len(lists) <= 1, "at most one ignore_errors override: the ratchet list"
    return set(lists[0]) if lists else set()


def _mypy_ini_without_ratchet(tmp_path: Path) -> Path:
    """pyproject's mypy settings as an ini file, minus the ignore_errors override."""
    mypy = _config()["tool"]["mypy"]

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "True" if v else "False"
        if isinstance(v, list):
            return ", ".join(str(x) for x in v)
        return str(v)

    lines = ["[mypy]"] + [f"{k} = {value(v)}" for k, v in mypy.items() if k != "overrides"]
    for override in mypy.get("overrides", []):
        if override.get("ignore_errors"):
            continue
        modules = override["module"]
        lines.append(f"[mypy-{','.join(modules if isinstance(modules, list) else [modules])}]")
        lines += [f"{k} = {value(v)}" for k, v in override.items() if k != "module"]
    ini = tmp_path / "mypy.ini"
    ini.write_text("\n".join(lines) + "\n")
    return ini


def _mypy_failing_modules(tmp_path: Path) -> Tuple[Set[str], str]:
    mypy = pytest.importorskip("mypy.api")
    out, err, _status = mypy.run(["--config-file", str(_mypy_ini_without_ratchet(tmp_path)),
                                  "--cache-dir", str(ROOT / ".mypy_cache"),
                                  "--no-error-summary", str(PACKAGE.relative_to(ROOT))])
    failing = {_module_of(m.group(1))
               for m in re.finditer(r"^(vmsnapbackup/\S+\.py):\d+: error:", out, re.M)}
    return failing, out + err


def test_mypy_strict_ratchet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    failing, report = _mypy_failing_modules(tmp_path)
    listed = _mypy_ratchet()
    new = sorted(failing - listed)
    assert not new, f"mypy --strict errors in modules not on the ratchet list:\n{report}"
    stale = sorted(listed - failing)
    assert not stale, ("clean under mypy --strict now: delete from the ignore_errors list "
                       f"in pyproject.toml: {stale}")


def _ruff(*extra: str) -> List[Dict[str, Any]]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "json",
             *extra, str(PACKAGE)], cwd=ROOT, capture_output=True, text=True, check=False)
    except FileNotFoundError:  # pragma: no cover
        pytest.skip("ruff is not installed")
    if proc.returncode not in (0, 1):
        if "No module named ruff" in proc.stderr:
            pytest.skip("ruff is not installed (pip install -e '.[test]')")
        raise AssertionError(proc.stderr)
    findings: List[Dict[str, Any]] = json.loads(proc.stdout or "[]")
    return findings


def test_ruff_clean_with_the_listed_exceptions() -> None:
    findings = _ruff()
    assert findings == [], "\n".join(
        f"{f['filename']}:{f['location']['row']}: {f['code']} {f['message']}" for f in findings)


def test_ruff_exception_list_has_nothing_stale() -> None:
    listed = _config()["tool"]["ruff"]["lint"].get("per-file-ignores", {})
    found: Dict[str, Set[str]] = {}
    for f in _ruff("--config", "lint.per-file-ignores = {}"):
        rel = Path(f["filename"]).resolve().relative_to(ROOT).as_posix()
        found.setdefault(rel, set()).add(f["code"])
    stale = {path: sorted(set(codes) - found.get(path, set()))
             for path, codes in listed.items() if set(codes) - found.get(path, set())}
    assert not stale, f"fixed now: delete from per-file-ignores in pyproject.toml: {stale}"
