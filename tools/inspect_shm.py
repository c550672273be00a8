#!/usr/bin/env python3
"""Diagnostics of a live Vela cache of this host; works while its workers hang.

    python tools/inspect_shm.py NAME [--json] [--check] [--keys N] [--watch SECONDS]

Never waits for a stripe lock: figures are read lock-free, key samples try-lock
each stripe and skip the busy ones. `vela inspect NAME ...` is the same command.
Exit status: 0 fine; 1 no such cache or --check found a problem; 2 bad
arguments; 3 --check could not run (a lock held by a stopped process).
"""
import os
import sys

if __package__ in (None, ""):  # run as a file from a checkout: find the vela next to tools/
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "vela")) and root not in sys.path:
        sys.path.insert(0, root)

from vela.inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="inspect_shm.py"))
