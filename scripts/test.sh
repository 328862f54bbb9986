#!/usr/bin/env bash
# Run every test: unit tests (tests/) and integration tests on the real
# libvirt/QEMU stack (integration/).  Extra arguments go to pytest.
#
# The run fails unless integration tests really ran: with
# VMSNAPBACKUP_REQUIRE_INTEGRATION=1 (the default here) integration/conftest.py
# turns every skipped integration test into a failure, and this script fails
# when no integration test ran at all (pytest's "no tests" exit 5 included).
# VMSNAPBACKUP_REQUIRE_INTEGRATION=0 lifts both rules, e.g. for `-k` runs of
# unit tests only.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh

export VMSNAPBACKUP_REQUIRE_INTEGRATION="${VMSNAPBACKUP_REQUIRE_INTEGRATION:-1}"
junit="$(mktemp --tmpdir vmsnapbackup-junit.XXXXXX.xml)"
trap 'rm -f "$junit"' EXIT

echo "[test] .venv/bin/python -m pytest tests integration $*" >&2
rc=0
.venv/bin/python -m pytest -p no:cacheprovider --junitxml="$junit" tests integration "$@" || rc=$?

if [ "$rc" -eq 5 ]; then
    echo "[test] FAILED: pytest collected no tests" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
if [ "$VMSNAPBACKUP_REQUIRE_INTEGRATION" = "1" ]; then
    # Integration tests live in integration/, so their junit classname starts
    # with "integration.".  A success prints nothing: pytest's summary line
    # stays the last line of the run.
    .venv/bin/python - "$junit" <<'EOF'
import sys
import xml.etree.ElementTree as ET

ran = skipped = 0
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if not case.get("classname", "").startswith("integration."):
        continue
    skip = case.find("skipped")
    if skip is not None and skip.get("type") != "pytest.xfail":
        skipped += 1
    else:
        ran += 1
if ran == 0 or skipped:
    print(f"[test] FAILED: {ran} integration tests ran, {skipped} skipped "
          "(VMSNAPBACKUP_REQUIRE_INTEGRATION=1 needs >0 and 0)", file=sys.stderr)
    sys.exit(1)
EOF
fi
