"""Where a table lives: one module per segment backend.

- ``shm``: a POSIX shared-memory object (the default);
- ``file``: a memory-mapped file under ``backend_opts["data_dir"]``;
- ``base``: what a backend module offers (``Segment``, the topology read of a segment);
- ``table``: a table open in this process (:class:`OpenTable`), the internal
  ``open_table`` the bridge uses.

Backends are orthogonal to topologies: a store (vela.stores) sits on any of them.
"""

from .table import BACKENDS, OpenTable, backend_module, open_table, resume_if_due, segment_topology

__all__ = ["BACKENDS", "OpenTable", "backend_module", "open_table", "resume_if_due", "segment_topology"]
