#!/usr/bin/env bash
# The soak (docs/durability.md): a real Linux guest writes on ext4 while backups,
# prunes, verifies, SIGKILLs and power cuts of the pool run in a loop; at the end
# every point verifies and restores to a file system e2fsck accepts.
#
#   scripts/soak.sh [--minutes 30] [--seed 17] [--restart-libvirtd]
#
# Not part of scripts/test.sh.  As root; takes the shared integration lock
# (/tmp/vsb-integration.lock) for its whole run, so other integration runs wait.
# --restart-libvirtd also kills and restarts libvirtd: only on a machine of your own.
# Prints one JSON line of counts; exit 0 only if nothing failed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup.sh
exec flock /tmp/vsb-integration.lock .venv/bin/python integration/soak.py "$@"
