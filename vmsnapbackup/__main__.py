"""``python -m vmsnapbackup``: the same as the ``vmsnapbackup`` command."""
import sys

from .cli import main

sys.exit(main())
