"""File backend: the same table in a memory-mapped file, ``<data_dir>/<name>.vela``.

Durability, in one sentence: everything written before ``close()`` or
``flush_to_disk()`` returns survives a process or host restart, a process crash
loses nothing that was written (the kernel holds the pages), and a power loss
or kernel crash loses at most what was written in the last ``sync_interval``
seconds. Expiry uses wall-clock time, so TTLs keep their meaning across reboots.

Every process of the host maps the file MAP_SHARED: reads cost what shared-memory
reads cost. Processes hold a shared flock on the file while they have it open;
the first one to open it (nobody holds that lock) checks and rebuilds the whole
table (rebuild.c: stale locks re-made, every entry verified by its checksum,
damaged ones dropped), and the last one to close it syncs and marks it clean.
The host name is written into the file: a second host that reaches the file
through a network filesystem is refused while the first has it open.
"""

import errno
import fcntl
import logging
import os
import socket

from .. import _native
from ..errors import LayoutMismatch, OptionError, SegmentCorrupt, VelaError
from .base import Segment, read_topology

KIND = _native.BACKEND_FILE
log = logging.getLogger("vela.file")

_OPTIONS = {"data_dir", "sync_interval", "on_corrupt"}


def _parse(backend_opts):
    opts = dict(backend_opts or {})
    unknown = set(opts) - _OPTIONS
    if unknown:
        raise OptionError(f"backend_opts: unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(sorted(unknown))} (the file backend takes {', '.join(sorted(_OPTIONS))})")
    data_dir = opts.get("data_dir")
    if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
        raise OptionError("backend_opts['data_dir'] is required by the file backend: the directory "
                          "that holds <name>.vela")
    sync_interval = opts.get("sync_interval", 1.0)
    if sync_interval is not None and (isinstance(sync_interval, bool)
                                      or not isinstance(sync_interval, (int, float))
                                      or not 0 < sync_interval < float("inf")):
        raise OptionError(f"backend_opts['sync_interval'] must be a positive number of seconds or None, "
                          f"not {sync_interval!r}")
    on_corrupt = opts.get("on_corrupt", "rebuild")
    if on_corrupt not in ("rebuild", "raise"):
        raise OptionError(f"backend_opts['on_corrupt'] must be 'rebuild' or 'raise', not {on_corrupt!r}")
    return os.fspath(data_dir), sync_interval, on_corrupt


def path_of(name, data_dir):
    return os.path.join(data_dir, f"{name}.vela")


class FileSegment(Segment):
    def __init__(self, name, path, sync_interval, on_corrupt):
        self.name = name
        self.path = path
        self.sync_interval = sync_interval
        self.on_corrupt = on_corrupt
        self.host = socket.gethostname()
        self.last_rebuild = None  # (kept, dropped) when this process rebuilt the file
        # Opens and closes of this file are serialised by a lock file beside it.
        self.init_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.init_fd, fcntl.LOCK_EX)
        try:
            self.life_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self.life_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.first = True  # nobody else has the file open
            except BlockingIOError:
                fcntl.flock(self.life_fd, fcntl.LOCK_SH)
                self.first = False
            self.created = os.fstat(self.life_fd).st_size == 0
        except BaseException:
            self._release_init()
            raise
        super().__init__(fd=-1, lock_fd=-1, reinit_unready=False, created=self.created)

    def _release_init(self):
        if self.init_fd >= 0:
            os.close(self.init_fd)  # closing releases the flock
            self.init_fd = -1

    def open_table(self, make_table):
        def attempt():
            return make_table(os.open(self.path, os.O_RDWR | os.O_CLOEXEC), -1, False)

        try:
            return attempt()
        except (SegmentCorrupt, LayoutMismatch) as exc:
            damaged = getattr(exc, "code", "") in ("VELA_ECORRUPT", "VELA_EFORMAT")
            if not damaged:
                raise  # options that disagree: the user's mistake, not damage
            if not self.first:
                raise SegmentCorrupt(f"{self.path}: {exc}; other processes have it open, so it "
                                     "cannot be rebuilt now") from exc
            if self.on_corrupt == "raise":
                raise SegmentCorrupt(f"{self.path}: {exc} (on_corrupt='raise'; with 'rebuild' the "
                                     "file is replaced by an empty cache)") from exc
            log.warning("%s: %s; replacing it with an empty cache (on_corrupt='rebuild')", self.path, exc)
            os.ftruncate(self.life_fd, 0)
            self.last_rebuild = (0, None)
            return attempt()

    def failed(self):
        try:
            if self.first and os.fstat(self.life_fd).st_size == 0:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.life_fd)
        self._release_init()

    def attached(self, table):
        try:
            if self.first:
                kept, dropped = table.rebuild()
                if dropped:
                    log.warning("%s: %d damaged or expired entries dropped, %d kept", self.path, dropped, kept)
                if self.last_rebuild is None:
                    self.last_rebuild = (kept, dropped)
                table.host = self.host
                table.clean = False
                fcntl.flock(self.life_fd, fcntl.LOCK_SH)  # others may open it now
            elif table.host != self.host:
                raise VelaError(f"{self.path} is open on host {table.host!r}; a file cache belongs to "
                                f"one host at a time (this is {self.host!r})")
        except BaseException:
            table.close()
            os.close(self.life_fd)
            raise
        finally:
            self._release_init()

    def closing(self, table):
        """The last process to close the file syncs it and marks it clean."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                fcntl.flock(self.life_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            table.sync()
            if last:
                table.clean = True
                table.sync()
        finally:
            os.close(self.life_fd)
            self.life_fd = -1
            os.close(fd)

    def after_fork(self):
        # The inherited descriptor shares its lock with the parent: a child must
        # hold a shared lock of its own, or its close would look like the last one.
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        old, self.life_fd = self.life_fd, fd
        os.close(old)

    def periodic(self):
        if self.sync_interval is None:
            return []
        return [(self.sync_interval, lambda table: table.sync())]

    def sync(self, table):
        table.sync()


def open_segment(name, backend_opts):
    data_dir, sync_interval, on_corrupt = _parse(backend_opts)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"backend_opts['data_dir']: cannot use {data_dir!r}: {exc.strerror}") from exc
    return FileSegment(name, path_of(name, data_dir), sync_interval, on_corrupt)


def destroy(name, backend_opts=None):
    """Remove the file (and its lock file); True when it existed."""
    data_dir, _, _ = _parse(backend_opts)
    path = path_of(name, data_dir)
    existed = True
    for p in (path, path + ".lock"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            existed = existed and p != path
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return existed


def peek_topology(name, backend_opts):
    """The topology the cache's file records, or None (absent or not laid out yet)."""
    try:
        fd = os.open(path_of(name, _parse(backend_opts)[0]), os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, OptionError):
        return None
    try:
        return read_topology(fd)
    finally:
        os.close(fd)
