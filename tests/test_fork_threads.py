"""A fork never happens while Vela's maintenance threads run.

A process that forks with threads running risks its child (a lock held by a thread
that does not exist there), and Python 3.12+ says so with a DeprecationWarning on
every fork: gunicorn --preload, multiprocessing and the suite's own workers fork
after opening a cache. Vela stops its threads before a fork and starts them again
after it, in the parent and in the child.
"""
import os
import threading
import time
import warnings

import vela


def _maintenance_threads(name):
    return [t for t in threading.enumerate() if t.name == f"vela-maintenance-{name}"]


def test_fork_stops_the_maintenance_thread_and_both_sides_restart_it(cache_name):
    with vela.Cache(cache_name, capacity="2MiB", sweep_interval=0.05) as cache:
        (before,) = _maintenance_threads(cache_name)
        cache.put("k", 1, ttl=0.01)
        r, w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 3.12+: "This process is multi-threaded, use of fork() ..."
            pid = os.fork()
        if pid == 0:  # the child: its own maintenance thread, and the cache works
            try:
                ok = len(_maintenance_threads(cache_name)) == 1 and cache.get("absent", 7) == 7
                os.write(w, b"ok" if ok else b"no")
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"ok"
        os.waitpid(pid, 0)
        assert not before.is_alive()  # stopped before the fork
        (after,) = _maintenance_threads(cache_name)
        assert after is not before and after.is_alive()
        # the restarted thread does its job: the expired entry is swept (size() counts
        # an expired entry until it is reclaimed)
        for _ in range(200):
            if cache.size() == 0:
                break
            time.sleep(0.05)
        assert cache.size() == 0


def test_a_handle_closed_just_before_a_fork_has_no_thread_left_at_the_fork(cache_name):
    cache = vela.Cache(cache_name, capacity="2MiB")
    (thread,) = _maintenance_threads(cache_name)
    cache.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert not thread.is_alive()
