"""A fork never happens while Vela's maintenance threads run.

A process that forks with threads running risks its child (a lock held by a thread
that does not exist there), and Python 3.12+ says so with a DeprecationWarning on
every fork: gunicorn --preload, multiprocessing and the suite's own workers fork
after opening a cache. Vela stops its threads before a fork; the child starts its
own at once, the parent at its next write (Python 3.13 counts the threads after the
fork hooks have run, so the parent cannot start one in a hook).

Each scenario runs in a forked child of the test process: a process with no thread
but its own (threads do not survive a fork), whatever other tests left running here.
"""
import os
import threading
import time
import warnings

import vela
from conftest import run_in_child


def _maintenance_threads(name):
    return [t for t in threading.enumerate() if t.name == f"vela-maintenance-{name}"]


def _fork_recording_warnings(child):
    """Fork; the child runs child() and reports its bytes; (child's bytes, warnings)."""
    r, w = os.pipe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pid = os.fork()
    if pid == 0:
        try:
            os.write(w, child())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    os.waitpid(pid, 0)
    return report, [str(c.message) for c in caught if "multi-threaded" in str(c.message)]


def _fork_stops_and_restarts(cache_name):
    with vela.Cache(cache_name, capacity="2MiB", sweep_interval=0.05) as cache:
        (before,) = _maintenance_threads(cache_name)
        report, warned = _fork_recording_warnings(
            lambda: b"ok" if len(_maintenance_threads(cache_name)) == 1 and cache.get("absent", 7) == 7 else b"no")
        assert (report, warned) == (b"ok", [])
        assert not before.is_alive()  # stopped before the fork
        assert _maintenance_threads(cache_name) == []  # the parent has not written since
        cache.put("k", 1, ttl=0.01)  # its first write starts it again
        (after,) = _maintenance_threads(cache_name)
        assert after is not before and after.is_alive()
        # and it does its job: the expired entry is swept (size() counts an expired
        # entry until it is reclaimed)
        for _ in range(200):
            if cache.size() == 0:
                break
            time.sleep(0.05)
        assert cache.size() == 0
        # a second fork, a second write: still one thread
        _fork_recording_warnings(lambda: b"")
        cache.put("k2", 2)
        cache.delete("k2")
        assert len(_maintenance_threads(cache_name)) == 1
    return "done"


def test_fork_stops_the_maintenance_threads_and_both_sides_start_them_again(cache_name):
    assert run_in_child(_fork_stops_and_restarts, cache_name, timeout=60) == "done"


def _closed_before_fork(cache_name):
    for _ in range(5):
        vela.Cache(cache_name, capacity="2MiB").close()
    return _fork_recording_warnings(lambda: b"ok")


def test_a_handle_closed_just_before_a_fork_has_no_thread_left_at_the_fork(cache_name):
    assert run_in_child(_closed_before_fork, cache_name) == (b"ok", [])
