"""The background sweep: expired entries are reclaimed without being touched,
by one elected process of the host at a time, taken over when it dies."""
import os
import signal
import time

import vela

from conftest import FORK


def wait_until(predicate, timeout, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_sweep_reclaims_expired_entries_nobody_reads(cache_name):
    with vela.Cache(cache_name, capacity="4MiB", sweep_interval=0.1) as c:
        for i in range(300):
            c.put(("short", i), b"x" * 100, ttl=0.05)
        for i in range(50):
            c.put(("long", i), b"y" * 100)
        assert len(c) == 350
        assert wait_until(lambda: len(c) == 50, timeout=5)
        stats = c.stats()
        assert stats["expirations"] == 300
        assert stats["hits"] == 0 and stats["misses"] == 0  # nothing was read
        assert all(c.get(("long", i)) == b"y" * 100 for i in range(50))
        assert c.info()["sweeper_pid"] == os.getpid()
        assert c.check() == []


def test_expire_reclaims_now_and_counts(cache_name):
    with vela.Cache(cache_name, capacity="4MiB", sweep_interval=None) as c:
        c.put_many({i: i for i in range(20)}, ttl=0.05)
        c.put("keep", 1)
        time.sleep(0.1)
        assert len(c) == 21  # nothing reclaimed them yet: no sweeper, no reads
        assert c.expire() == 20
        assert len(c) == 1 and c.expire() == 0
        assert c.stats()["expirations"] == 20


def _idle_handle(name, ready_w):
    c = vela.Cache(name, sweep_interval=0.1)
    os.write(ready_w, b"1")
    time.sleep(60)
    c.close()


def test_one_sweeper_per_host_taken_over_when_it_dies(cache_name):
    """Three processes run sweep threads; one is elected and stays elected; when it
    is SIGKILLed another live one takes over."""
    c = vela.Cache(cache_name, capacity="4MiB", sweep_interval=None)  # never sweeps itself
    r, w = os.pipe()
    procs = [FORK.Process(target=_idle_handle, args=(cache_name, w), daemon=True) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        assert len(os.read(r, 3)) >= 1
        pids = {p.pid for p in procs}
        assert wait_until(lambda: c.info()["sweeper_pid"] in pids, timeout=5)
        first = c.info()["sweeper_pid"]
        time.sleep(0.5)  # several sweep rounds: the same process keeps the role
        assert c.info()["sweeper_pid"] == first
        os.kill(first, signal.SIGKILL)
        [p.join(5) for p in procs if p.pid == first]
        alive = pids - {first}
        assert wait_until(lambda: c.info()["sweeper_pid"] in alive, timeout=3)
        # the new sweeper does the work
        c.put("gone-soon", 1, ttl=0.05)
        assert wait_until(lambda: len(c) == 0, timeout=3)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        os.close(r)
        os.close(w)
        c.close()
