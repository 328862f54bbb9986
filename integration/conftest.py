"""Fixtures for the integration tests: a libvirt connection and throwaway domains.

CI rule: with ``VMSNAPBACKUP_REQUIRE_INTEGRATION=1`` (set by scripts/test.sh)
an integration test may not be skipped: a missing libvirtd, or any other
skip, becomes a failure, so a green run always means the real stack was
exercised.  Without it, tests skip with the reason.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import DiskSpec, DomainFactory, TestDomain, sweep_stale_domains

# Overridable so the "no libvirtd" path can be tried without stopping the daemon.
LIBVIRT_URI = os.environ.get("VMSNAPBACKUP_TEST_LIBVIRT_URI", "qemu:///system")


def require_integration() -> bool:
    return os.environ.get("VMSNAPBACKUP_REQUIRE_INTEGRATION", "") == "1"


def _unavailable(reason: str) -> None:
    if require_integration():
        pytest.fail(f"{reason} (VMSNAPBACKUP_REQUIRE_INTEGRATION=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under the CI rule a skipped integration test is a failed one."""
    outcome = yield
    rep = outcome.get_result()
    if require_integration() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"integration test skipped ({reason}), but VMSNAPBACKUP_REQUIRE_INTEGRATION=1"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Same rule for a whole module skipped at collection (importorskip, ...)."""
    outcome = yield
    rep = outcome.get_result()
    if require_integration() and rep.skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"integration module skipped ({reason}), but VMSNAPBACKUP_REQUIRE_INTEGRATION=1"
        )


def _open():  # type: ignore[no-untyped-def]
    try:
        import libvirt
    except ImportError as exc:
        _unavailable(f"libvirt-python is not importable: {exc}")
    try:
        return libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as exc:
        _unavailable(f"no libvirtd at {LIBVIRT_URI}: {exc}")


@pytest.fixture(scope="session")
def _swept() -> None:
    """Once per session: remove domains left by earlier runs that were killed."""
    conn = _open()
    try:
        sweep_stale_domains(conn)
    finally:
        conn.close()


@pytest.fixture
def libvirt_conn(_swept):  # type: ignore[no-untyped-def]
    """A connection to qemu:///system for one test.

    Per test, not per session: a test that restarts libvirtd (the fault tests)
    must not leave every later test holding a dead connection.
    """
    conn = _open()
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):   # already dead with a restarted daemon
            conn.close()


@pytest.fixture
def make_domain(libvirt_conn) -> Iterator[DomainFactory]:  # type: ignore[no-untyped-def]
    """Factory: make_domain(disks=[DiskSpec(...)], start=True, name_prefix="vsb-test").

    Every domain it made is destroyed, undefined and its files removed at
    teardown, whatever the test did.
    """
    factory = DomainFactory(libvirt_conn)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def running_domain(make_domain: DomainFactory) -> TestDomain:
    """A running domain with a 64 MiB qcow2 vda and a 32 MiB + 12 KiB raw vdb."""
    return make_domain(
        disks=[DiskSpec("vda", "qcow2", 64 * 2**20), DiskSpec("vdb", "raw", 32 * 2**20 + 12 * 2**10)],
        start=True,
    )
