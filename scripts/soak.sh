#!/usr/bin/env bash
# The soak (docs/durability.md): a real Linux guest writes on ext4 while backups,
# prunes, verifies, SIGKILLs and power cuts of the pool run in a loop; at the end
# every point verifies and restores to a file system e2fsck accepts.
#
#   scripts/soak.sh [--minutes 30] [--seed 17] [--restart-libvirtd]
#
# Not part of scripts/test.sh.  As root.  It touches only its own domain, pool and
# storage daemons (its repairs name its domain), so it may run beside other tests:
# their load makes it a harder soak.  --restart-libvirtd also kills and restarts
# libvirtd, which other tests would see: then it takes the shared integration lock
# (/tmp/vsb-integration.lock) for its whole run.  Only on a machine of your own.
# Prints one JSON line of counts; exit 0 only if nothing failed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup.sh
case " $* " in
    *" --restart-libvirtd "*) exec flock /tmp/vsb-integration.lock .venv/bin/python integration/soak.py "$@" ;;
    *) exec .venv/bin/python integration/soak.py "$@" ;;
esac
