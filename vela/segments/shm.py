"""SharedMemory backend: the segment is a POSIX shared-memory object /vela.<name>.

It lives until ``vela.destroy(name)`` or a reboot; a write is durable for as long.
"""

import os

import posix_ipc

from .. import _native
from ..errors import OptionError
from .base import Segment, read_topology

KIND = _native.BACKEND_SHM


def segment_name(name):
    """The shm object's name. VELA_NAMESPACE (environment) keeps separate sets of
    caches apart on one host: simulated hosts in tests, several demos."""
    namespace = os.environ.get("VELA_NAMESPACE")
    return f"/vela.{namespace}.{name}" if namespace else f"/vela.{name}"


class ShmSegment(Segment):
    def __init__(self, name, fd, created):
        super().__init__(fd, created=created)
        self.name = name

    def failed(self):
        """Remove a segment this process created but could not lay out (bad options)."""
        if not self.created:
            return
        try:
            shm = posix_ipc.SharedMemory(segment_name(self.name))
        except posix_ipc.ExistentialError:
            return
        try:
            if os.fstat(shm.fd).st_size == 0:
                shm.unlink()
        finally:
            shm.close_fd()


def open_segment(name, backend_opts):
    """The segment's file descriptor, created empty (mode 0600) if missing.

    The C core sizes and lays out an empty segment under flock, so processes
    racing to create the same cache end up with one table.
    """
    if backend_opts:
        raise OptionError(f"backend_opts: the shm backend takes no options, got {backend_opts!r}")
    try:
        shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREX, mode=0o600)
        created = True
    except posix_ipc.ExistentialError:
        shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREAT, mode=0o600)
        created = False
    try:
        return ShmSegment(name, os.dup(shm.fd), created)
    finally:
        shm.close_fd()


def destroy(name, backend_opts=None):
    """Remove the segment; True when there was one. Open handles keep their mapping."""
    try:
        posix_ipc.unlink_shared_memory(segment_name(name))
    except posix_ipc.ExistentialError:
        return False
    return True


def peek_topology(name, backend_opts=None):
    """The topology the segment records, or None (absent or not laid out yet)."""
    try:
        shm = posix_ipc.SharedMemory(segment_name(name))
    except posix_ipc.ExistentialError:
        return None
    try:
        return read_topology(shm.fd)
    finally:
        shm.close_fd()
