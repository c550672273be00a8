"""SharedMemory backend: the segment is a POSIX shared-memory object /vela.<name>."""

import os

import posix_ipc

from .. import _native

KIND = _native.BACKEND_SHM


def segment_name(name):
    return f"/vela.{name}"


def open_fd(name):
    """(fd, created): the segment's file descriptor, created empty (mode 0600) if missing.

    The C core sizes and lays out an empty segment under flock, so processes
    racing to create the same cache end up with one table.
    """
    try:
        shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREX, mode=0o600)
        created = True
    except posix_ipc.ExistentialError:
        shm = posix_ipc.SharedMemory(segment_name(name), posix_ipc.O_CREAT, mode=0o600)
        created = False
    try:
        return os.dup(shm.fd), created
    finally:
        shm.close_fd()


def discard_if_empty(name):
    """Remove a segment this process created but could not lay out (bad options)."""
    try:
        shm = posix_ipc.SharedMemory(segment_name(name))
    except posix_ipc.ExistentialError:
        return
    try:
        if os.fstat(shm.fd).st_size == 0:
            shm.unlink()
    finally:
        shm.close_fd()


def destroy(name):
    """Remove the segment; True when there was one. Open handles keep their mapping."""
    try:
        posix_ipc.unlink_shared_memory(segment_name(name))
    except posix_ipc.ExistentialError:
        return False
    return True
