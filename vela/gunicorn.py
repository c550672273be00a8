"""Hooks for a ``gunicorn.conf.py``.

    # gunicorn.conf.py
    import vela.gunicorn
    from vela.gunicorn import on_starting, post_fork, child_exit, worker_exit  # noqa: F401

    vela.gunicorn.configure("shop", capacity="256MiB", default_ttl=300)
    workers = 4

    # app.py
    import vela.gunicorn
    cache = vela.gunicorn.cache("shop")     # this process's handle, same options

What each hook does:

- ``on_starting`` (master, before any worker): opens every configured cache, so
  the segment is created with its layout options once, and a bad option or a
  :class:`vela.LayoutMismatch` stops gunicorn at start instead of failing
  every worker. The master's handle is inherited by the workers; a handle
  survives ``fork`` (its per-process state is reset in the child).
- ``post_fork`` (each new worker): makes sure every configured cache is open in
  the worker (it is when the master opened it; otherwise it is opened here),
  with or without ``preload_app``.
- ``child_exit`` (master, after a worker died or exited): releases the stampede
  leases the worker held in every cache the master has open, so callers waiting
  for its fetch stop waiting at once (without it they find out too, by the
  holder's pid and start time, on their next poll).
- ``worker_exit`` (the worker, on its way out): releases its own leases and
  closes its handles.

With ``preload_app = True`` the app is imported in the master *before*
``on_starting`` runs: open the cache with :func:`cache` (or give
``vela.Cache`` the same options), so that the first opening already has the
configured layout. Each hook may also be called from hooks of your own
(``def post_fork(server, worker): vela.gunicorn.post_fork(server, worker); ...``).
"""

import logging
import os
import threading

from . import cache as _cache_module
from .cache import Cache

__all__ = ["configure", "cache", "caches", "on_starting", "post_fork", "child_exit", "worker_exit"]

_log = logging.getLogger("vela.gunicorn")
_lock = threading.Lock()
_configured = {}  # name -> options given to configure()
_handles = {}     # name -> the Cache opened by this module in this process (or inherited)


def configure(name, **options):
    """Declare a cache for the hooks to open: ``vela.Cache(name, **options)``."""
    with _lock:
        _configured[name] = dict(options)


def cache(name):
    """This process's handle on the cache ``name``, opened on first use with the
    options given to :func:`configure` (none when it was not configured)."""
    with _lock:
        handle = _handles.get(name)
        if handle is None or handle.closed:
            handle = _handles[name] = Cache(name, **_configured.get(name, {}))
        return handle


def caches():
    """The handles this module opened (or inherited) in this process."""
    with _lock:
        return [h for h in _handles.values() if not h.closed]


def _logger(server):
    return getattr(server, "log", None) or _log


def on_starting(server):
    """gunicorn hook, in the master: open (create) every configured cache."""
    for name in list(_configured):
        handle = cache(name)
        info = handle.info()
        _logger(server).info("vela: cache %r ready (%d MiB, %d stripes, %d entries)", name,
                             info["capacity"] >> 20, info["stripes"], info["entries"])


def post_fork(server, worker):
    """gunicorn hook, in a new worker: every configured cache is open here."""
    for name in list(_configured):
        cache(name)


def _open_in_this_process():
    """Every live handle of this process, one per cache name."""
    found = {}
    for handle in list(_handles.values()) + list(_cache_module._live):
        if not handle.closed:
            found.setdefault(handle.name, handle)
    return found


def child_exit(server, worker):
    """gunicorn hook, in the master: release the leases held by the exited worker."""
    for name in list(_configured):  # also when on_starting is not used
        cache(name)
    pid = worker.pid
    for name, handle in _open_in_this_process().items():
        try:
            released = handle.release_leases(pid)
        except Exception as e:  # never let a cache problem take the master down
            _logger(server).warning("vela: could not release the leases of worker %s in %r: %s",
                                    pid, name, e)
            continue
        if released:
            _logger(server).info("vela: released %d stampede lease(s) of worker %s in cache %r",
                                 released, pid, name)


def worker_exit(server, worker):
    """gunicorn hook, in an exiting worker: release its leases, close its handles."""
    pid = os.getpid()
    if getattr(worker, "pid", pid) != pid:
        # gunicorn also calls worker_exit in the master for a worker that vanished
        # before it could be signalled: the master's handles must stay open.
        child_exit(server, worker)
        return
    for handle in _open_in_this_process().values():
        try:
            handle.release_leases(pid)
        except Exception:
            pass
    with _lock:
        for handle in _handles.values():
            handle.close()
        _handles.clear()
