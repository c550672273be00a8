"""Where a cache's segment lives. Backends differ only in how the memory is obtained.

A backend module offers:

- ``KIND``: the backend code stored in the segment header;
- ``open_segment(name, backend_opts) -> Segment``: the memory to map, ready for the
  C core, plus what the backend must do around a handle's life;
- ``destroy(name, backend_opts) -> bool``: remove the cache from the host;
- ``peek_topology(name, backend_opts) -> int | None``: the topology an existing, ready
  segment records (what a handle that omits ``topology`` adopts), None otherwise.
"""

import os
import struct

from .. import _native


class Segment:
    """What a backend hands to Cache: a file descriptor to map, and hooks.

    The defaults suit a segment that needs nothing around its life (shared memory).
    """

    def __init__(self, fd, lock_fd=-2, reinit_unready=True, created=False):
        self.fd = fd                      # mapped by the C core, which closes it
        self.lock_fd = lock_fd            # flock'ed around layout; -2: fd itself, -1: none
        self.reinit_unready = reinit_unready
        self.created = created

    def open_table(self, make_table):
        """Build the native table (``make_table(fd, lock_fd, reinit_unready)``)."""
        return make_table(self.fd, self.lock_fd, self.reinit_unready)

    def failed(self):
        """The table could not be opened: undo what open_segment did."""

    def attached(self, table):
        """The table is open in this process."""

    def closing(self, table):
        """The handle is about to close its table."""

    def after_fork(self):
        """In a forked child that inherited the handle."""

    def periodic(self):
        """[(interval_seconds, fn(table))]: background jobs of this backend."""
        return []

    def sync(self, table):
        """Make what was written durable, as far as this backend can."""


# The identity fields that open the segment's header (native/table.h: u64 magic,
# u32 format, u32 header_size, u32 ready), then its topology where the C core says.
_IDENTITY = struct.Struct("<QIII")
_TOPOLOGY = struct.Struct("<I")


def read_topology(fd):
    """The topology a ready segment records (a _native.TOPOLOGY_* value), read without
    mapping or locking it; None when the segment is new, not ready or not Vela's."""
    head = os.pread(fd, _native.HEADER_TOPOLOGY_OFFSET + _TOPOLOGY.size, 0)
    if len(head) < _native.HEADER_TOPOLOGY_OFFSET + _TOPOLOGY.size:
        return None
    magic, fmt, _, ready = _IDENTITY.unpack_from(head)
    if magic != _native.MAGIC or fmt != _native.FORMAT or ready != _native.READY:
        return None
    return _TOPOLOGY.unpack_from(head, _native.HEADER_TOPOLOGY_OFFSET)[0]
