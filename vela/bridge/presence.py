"""Whether the host's bridge runs: a lock it holds on a file beside the segment.

A worker writes a partition its host owns in place only while the bridge reads the
change log (backup copies, near-cache invalidations). A write made after the bridge
died would be acknowledged, then reach no backup until a bridge of the host runs
again, while the other members, which take the partition over, serve what it
replaced. The view the bridge publishes ages out within half the failure timeout
(that covers a stopped bridge), but a killed bridge is known at once: the kernel
drops its lock, which every worker of the host -- and a sidecar container sharing
/dev/shm -- tests without waiting (one non-blocking flock, about a microsecond).
"""

import fcntl
import os
import time

from ..stores.replicated import beside_segment

SUFFIX = "alive"  # vela.<name>.alive (vela.cli.SIDE_FILES)


def lock_path(cache_name):
    return beside_segment(cache_name, SUFFIX)


def hold(cache_name, wait=2.0):
    """Take the lock for this bridge's life (the descriptor stays open: closing it, or
    dying, lets it go). ValueError naming the problem when another bridge of this
    host holds it (a worker's test holds it shared for a few microseconds: retried)."""
    fd = os.open(lock_path(cache_name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise ValueError(f"another vela-bridge of this host already serves cache {cache_name!r} "
                                 "(one bridge per host and cache: stop the other one first)") from None
            time.sleep(0.01)


class Presence:
    """A worker's test of its bridge's lock."""

    def __init__(self, cache_name):
        self.path = lock_path(cache_name)
        self.fd = None

    def running(self):
        """True while a bridge of this host holds the lock."""
        if self.fd is not None and self._held(self.fd):
            return True
        # No bridge, or a new file (made after ours was removed): look at the path again.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        if self.fd is not None:
            os.close(self.fd)
        self.fd = fd
        return self._held(fd)

    @staticmethod
    def _held(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
