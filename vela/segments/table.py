"""A table open in this process, on its segment, with its background jobs.

This is the internal way to open a table: every store holds one (the host's
table: entries, leases, counters, L1 copies) and the bridge opens its caches'
tables with :func:`open_table`, never through the public ``vela.Cache``.

An :class:`OpenTable` runs the periodic jobs of its table in one thread: the
segment's own (the file backend's msync) and the sweep of expired entries (only
in the host's elected sweeper). The threads stop before a fork and start again
after it (in the child at once; in the parent at its next write, see
:func:`resume_if_due`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Optional

from .. import _native, serializers
from ..errors import OptionError
from . import file, shm

__all__ = ["OpenTable", "open_table", "backend_module", "segment_topology", "ADOPT_LAYOUT"]

# Segment backends by name (backend="redis" is a store, not a segment: vela.stores.redis).
BACKENDS = {"shm": shm, "file": file}

# The layout a table adopts from its segment (-1: take the segment's value, or
# Vela's default when this call creates it).
ADOPT_LAYOUT = dict(capacity=-1, stripes=-1, max_size=-1, max_entry_size=-1, eviction=-1, replicated=-1)

# How long a fork waits for a maintenance job in progress to end (seconds).
_FORK_JOIN_TIMEOUT = 2.0
# How long it then waits for the OS threads of the joined ones to end (seconds).
_OS_THREAD_EXIT_WAIT = 0.05
# True after a fork, in the parent, until its next write restarts its maintenance.
resume_due = False

# Open tables: their background thread restarts in a forked child.
_live: "weakref.WeakSet[OpenTable]" = weakref.WeakSet()
# The maintenance threads not joined yet: a fork waits for them to end. (Strong
# references: a thread that left Python can still be running in the OS, which is
# what Python 3.12+ counts when it warns, and only join() waits for that.)
_threads: set[threading.Thread] = set()


def backend_module(backend: Any):
    """The segment module of a backend name ("shm", "file")."""
    if isinstance(backend, str) and backend in BACKENDS:
        return BACKENDS[backend]
    raise OptionError(f"backend must be one of {', '.join(BACKENDS)} or redis, not {backend!r}")


def segment_topology(name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None):
    """The topology (a _native.TOPOLOGY_* value) a ready segment records, or None."""
    return backend_module(backend).peek_topology(name, backend_opts)


class OpenTable:
    """The native table of the segment ``name``, open in this process.

    :param layout: the layout options as the C core takes them (``ADOPT_LAYOUT``
        keys; -1 adopts the segment's value); ``backend`` is set from the backend.
    :param sweep_interval: seconds between sweeps of expired entries (None: no sweep).
    :raises vela.OptionError, vela.LayoutMismatch: as ``vela.Cache`` says; nothing
        this call created stays behind.
    """

    def __init__(self, name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None,
                 layout: Optional[Mapping[str, int]] = None, serializer: Any = "pickle",
                 stats_enabled: bool = True, lock_timeout: float = 10.0,
                 sweep_interval: Optional[float] = None):
        self.table: Any = None
        self._stop: Optional[threading.Event] = None
        self.name = name
        self.backend = backend_module(backend)
        self.backend_opts = dict(backend_opts or {})
        self.sweep_interval = sweep_interval
        dumps, codec, loaders = serializers.resolve(serializer)
        shape = dict(ADOPT_LAYOUT, **(layout or {}), backend=self.backend.KIND)
        segment = self.backend.open_segment(name, self.backend_opts)

        def make_table(fd, lock_fd, reinit_unready):
            try:
                return _native.Table(fd=fd, lock_fd=lock_fd, reinit_unready=reinit_unready, dumps=dumps,
                                     dumps_codec=codec, loaders=loaders, **shape)
            except BaseException:
                os.close(fd)
                raise

        try:
            table = segment.open_table(make_table)
        except BaseException:
            segment.failed()  # nothing half-made stays behind
            raise
        segment.attached(table)
        self.segment = segment
        self.table = table
        table.stats_enabled = bool(stats_enabled)
        table.lock_timeout = lock_timeout
        self.start_maintenance()
        _live.add(self)

    @property
    def _table(self):
        # (the name the bridge's code reads)
        return self.table

    @property
    def topology(self) -> int:
        """The topology the segment records (a _native.TOPOLOGY_* value)."""
        return self.table.log_state()["replicated"]

    @property
    def closed(self) -> bool:
        return self.table is None or self.table.closed

    def sync(self) -> None:
        """Make every write so far durable, as far as the backend can (file: msync)."""
        self.segment.sync(self.table)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.table is not None and not self.table.closed:
            try:
                self.segment.closing(self.table)
            finally:
                self.table.close()
        _live.discard(self)

    def destroy(self) -> bool:
        """Close and remove the segment; True when it existed."""
        self.close()
        return self.backend.destroy(self.name, self.backend_opts)

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()

    # ---- background work -----------------------------------------------------------

    def start_maintenance(self) -> None:
        """One thread per open table runs its periodic jobs (none: no thread)."""
        if self._stop is not None and not self._stop.is_set():
            return  # running
        jobs = list(self.segment.periodic())
        if self.sweep_interval is not None:
            stale_ns = int(self.sweep_interval * 3e9)

            def sweep(table):
                if table.sweeper_elect(stale_ns):
                    table.expire()

            jobs.append((self.sweep_interval, sweep))
        if not jobs:
            return
        stop = self._stop = threading.Event()
        thread = threading.Thread(target=_maintenance_loop, args=(weakref.ref(self), stop, jobs),
                                  name=f"vela-maintenance-{self.name}", daemon=True)
        _join_ended_threads(0.0)
        _threads.add(thread)
        thread.start()


def open_table(name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None) -> OpenTable:
    """The bridge's: the segment's table as it is, whatever topology it records
    (never the store a worker would get); no sweep (the workers' sweeper does it)."""
    return OpenTable(name, backend, backend_opts)


def _maintenance_loop(ref, stop, jobs):
    due = [time.monotonic() + interval for interval, _ in jobs]
    while not stop.wait(max(0.0, min(due) - time.monotonic())):
        opened = ref()
        if opened is None or opened.closed:
            return
        try:
            now = time.monotonic()
            for i, (interval, job) in enumerate(jobs):
                if now >= due[i]:
                    job(opened.table)
                    due[i] = time.monotonic() + interval
        except Exception:  # a closed or broken handle: the jobs end, calls report it
            return
        finally:
            del opened


# ---- fork ---------------------------------------------------------------------------


def _before_fork():
    """Stop the maintenance threads before a fork (they start again after it): a
    process that forks with threads running risks its child, and Python 3.12+ warns
    about it. A job in progress (a sweep) is waited for, a couple of seconds at most;
    so are the threads of handles closed just before, which are on their way out."""
    running = _os_thread_count()
    for opened in list(_live):
        if opened._stop is not None:
            opened._stop.set()
    joined = _join_ended_threads(_FORK_JOIN_TIMEOUT)
    if running is not None and joined:
        # join() returns once a thread has left Python; its OS thread ends a moment
        # later, and that is what Python 3.12+ counts when it warns: wait for it too.
        deadline = time.monotonic() + _OS_THREAD_EXIT_WAIT
        while (_os_thread_count() or 0) > running - joined and time.monotonic() < deadline:
            time.sleep(0.0002)


def _os_thread_count():
    """The threads of this process as the OS counts them (None where /proc is not)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _join_ended_threads(timeout):
    """Join the maintenance threads that end within ``timeout`` seconds (0: those
    already told to stop and gone from Python), and forget them; how many."""
    deadline = time.monotonic() + timeout
    joined = 0
    for thread in list(_threads):
        if thread is threading.current_thread() or (not timeout and thread.is_alive()):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            _threads.discard(thread)
            joined += 1
    return joined


def _after_fork_in_parent():
    # The parent's threads start again at its next write, not here: Python 3.13+
    # counts the threads after these hooks run, and would warn about one started now.
    # (A process that forks workers and writes no more needs no sweeps of its own.)
    global resume_due
    resume_due = True


def resume_if_due() -> None:
    """After a fork, in the parent: start the maintenance threads again (every
    writing call of vela.Cache calls this when ``resume_due``)."""
    global resume_due
    resume_due = False
    for opened in list(_live):
        if not opened.closed:
            opened.start_maintenance()


def _after_fork_in_child():
    global resume_due
    resume_due = False
    for opened in list(_live):
        if not opened.closed:
            opened.segment.after_fork()
            opened.start_maintenance()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
