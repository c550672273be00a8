"""Several real forked processes on one shared table."""
import hashlib
import random
import time

import vela
from conftest import FORK, run_children

N = 4
BARRIER_TIMEOUT = 30


def _write_then_read_all(name, i, barrier):
    with vela.Cache(name) as c:
        for j in range(50):
            c.put(("p", i, j), f"{i}:{j}")
        barrier.wait(BARRIER_TIMEOUT)
        return {(p, j): c.get(("p", p, j)) for p in range(N) for j in range(50)}


def test_writes_of_one_are_seen_by_all(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        parent.put("from-parent", b"hello")
        barrier = FORK.Barrier(N)
        results = run_children(_write_then_read_all,
                               [(cache_name, i, barrier) for i in range(N)], timeout=60)
        expected = {(p, j): f"{p}:{j}" for p in range(N) for j in range(50)}
        for r in results:
            assert r == expected
        assert all(parent.get(("p", p, j)) == f"{p}:{j}" for p in range(N) for j in range(50))
        assert parent.size() == N * 50 + 1
        assert parent.stats()["writes"] == N * 50 + 1
        assert parent.check() == []


def _ttl_child(name, i, barrier, parent_expiry):
    with vela.Cache(name) as c:
        c.put(("mine", i), i, ttl=1.5)
        barrier.wait(BARRIER_TIMEOUT)
        # every child wrote before the barrier opened: all their entries expire by then + 1.5
        released = time.monotonic()
        before = (c.get("parent-short"), [c.get(("mine", p)) for p in range(N)],
                  c.get("parent-keep"))
        time.sleep(max(0.0, max(parent_expiry, released + 1.5) + 0.3 - time.monotonic()))
        after = (c.get("parent-short"), [c.get(("mine", p)) for p in range(N)],
                 c.get("parent-keep"))
        return before, after


def test_ttl_expiry_seen_by_all(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        # CLOCK_MONOTONIC is the same clock in every process of the host
        parent_expiry = time.monotonic() + 2.0
        parent.put("parent-short", "s", ttl=2.0)
        parent.put("parent-keep", "k")
        barrier = FORK.Barrier(N)
        results = run_children(_ttl_child, [(cache_name, i, barrier, parent_expiry)
                                            for i in range(N)], timeout=60)
        for before, after in results:
            assert before == ("s", list(range(N)), "k")
            assert after == (None, [None] * N, "k")
        assert parent.get("parent-short") is None
        assert [parent.get(("mine", p)) for p in range(N)] == [None] * N
        assert parent.get("parent-keep") == "k"
        assert parent.check() == []


def _tag_child(name, i, barrier):
    with vela.Cache(name) as c:
        for j in range(25):
            c.put(("k", i, j), j, tags=["t", f"c{i}"])
        barrier.wait(BARRIER_TIMEOUT)
        # overwrite 5 entries written by another process: they lose "t" and "c{i+1}"
        for j in range(5):
            c.put(("k", (i + 1) % N, j), "over", tags=["u"])
        # delete one of this process's own entries
        assert c.delete(("k", i, 24)) is True
        barrier.wait(BARRIER_TIMEOUT)
        if i == 0:
            # one child invalidates a tag whose entries another process wrote
            return c.invalidate_tag("c1")
        return None


def test_tag_counts_exact_across_processes(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        barrier = FORK.Barrier(N)
        results = run_children(_tag_child, [(cache_name, i, barrier) for i in range(N)],
                               timeout=60)
        # c1: 25 written by child 1, 5 overwritten by child 0, 1 deleted
        assert results[0] == 19
        assert parent.invalidate_tag("c2") == 19
        assert parent.invalidate_tag("c1") == 0
        # t: 100 written - 20 overwritten - 4 deleted - 38 already invalidated
        assert parent.invalidate_tag("t") == 38
        assert parent.invalidate_tag("u") == 20
        assert parent.size() == 0
        assert parent.stats()["invalidations"] == 19 + 19 + 38 + 20
        assert parent.check() == []


def _stats_child(name, i, barrier):
    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        for j in range(100):
            assert c.get(("shared", j)) == j          # 100 hits
        for j in range(50):
            assert c.get(("absent", i, j)) is None    # 50 misses
        for j in range(30):
            c.put(("own", i, j), j)                   # 30 writes
        for j in range(10):
            assert c.exists(("shared", j))            # not counted
        for j in range(7):
            assert c.delete(("own", i, j)) is True    # 7 deletes
        return True


def test_stats_summed_across_processes(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        for j in range(100):
            parent.put(("shared", j), j)
        barrier = FORK.Barrier(N)
        assert run_children(_stats_child, [(cache_name, i, barrier) for i in range(N)],
                            timeout=60) == [True] * N
        s = parent.stats()
        assert s["hits"] == 100 * N
        assert s["misses"] == 50 * N
        assert s["writes"] == 100 + 30 * N
        assert s["deletes"] == 7 * N
        assert s["size"] == 100 + 23 * N
        assert s["hit_ratio"] == (100 * N) / (150 * N)
        assert parent.check() == []


def _value(key, size, rng):
    body = rng.randbytes(size)
    return hashlib.blake2b(repr(key).encode() + body, digest_size=16).digest() + body


def _valid(key, value):
    return (isinstance(value, bytes) and len(value) >= 16 and
            hashlib.blake2b(repr(key).encode() + value[16:], digest_size=16).digest()
            == value[:16])


def _pressure_child(name, i, barrier, n_puts):
    rng = random.Random(i)
    bad = []
    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        for j in range(n_puts):
            key = ("w", i, j)
            c.put(key, _value(key, rng.randint(200, 4000), rng))
            # read a random earlier key of a random writer: absent or intact
            other = ("w", rng.randrange(N), rng.randrange(j + 1))
            v = c.get(other)
            if v is not None and not _valid(other, v):
                bad.append(other)
        return bad


def test_eviction_under_pressure_from_four_writers(cache_name):
    n_puts = 3000
    with vela.Cache(cache_name, capacity="2MiB") as parent:
        barrier = FORK.Barrier(N)
        results = run_children(_pressure_child,
                               [(cache_name, i, barrier, n_puts) for i in range(N)],
                               timeout=120)
        assert results == [[]] * N
        s = parent.stats()
        assert s["writes"] == N * n_puts
        # every put created a new key, so whatever is not stored was evicted
        assert s["evictions"] == N * n_puts - parent.size()
        assert s["evictions"] > N * n_puts // 2
        assert s["memory_used"] <= s["capacity"]
        assert parent.check() == []


def _racing_creator(name, i, start, written):
    start.wait(BARRIER_TIMEOUT)
    with vela.Cache(name, capacity="4MiB") as c:
        c.put(("racer", i), i)
        written.wait(BARRIER_TIMEOUT)
        seen = [c.get(("racer", p)) for p in range(20)]
        return seen, c.stats()["capacity"], c.check()


def test_twenty_processes_racing_to_create(cache_name):
    start, written = FORK.Barrier(20), FORK.Barrier(20)
    results = run_children(_racing_creator,
                           [(cache_name, i, start, written) for i in range(20)], timeout=120)
    for seen, capacity, problems in results:
        assert seen == list(range(20))
        assert capacity == 4 * 1024 * 1024
        assert problems == []
    with vela.Cache(cache_name) as c:
        assert c.size() == 20
        assert c.stats()["writes"] == 20
        assert c.check() == []


def _stampede_child(name, i, barrier, calls):
    def fetch(key):
        with calls.get_lock():
            calls.value += 1
        time.sleep(0.5)
        return {"key": key, "by": i}

    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        return c.get_or_fetch("slow", fetch)


def test_stampede_protection_across_processes(cache_name):
    calls = FORK.Value("i", 0)
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        barrier = FORK.Barrier(N)
        results = run_children(_stampede_child,
                               [(cache_name, i, barrier, calls) for i in range(N)], timeout=60)
        assert calls.value == 1
        assert len({r["by"] for r in results}) == 1
        assert all(r["key"] == "slow" for r in results)
        s = parent.stats()
        assert s["fetches"] == 1
        assert s["stampede_waits"] == N - 1
        assert s["writes"] == 1
        assert parent.check() == []


class Boom(Exception):
    pass


def _failing_fetch_child(name, barrier, calls):
    def fetch(key):
        with calls.get_lock():
            calls.value += 1
            first = calls.value == 1
        if first:
            time.sleep(0.5)
            raise Boom(key)
        time.sleep(0.2)
        return "retried"

    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        try:
            return c.get_or_fetch("k", fetch)
        except Boom:
            return "boom"


def test_stampede_failed_fetch_wakes_waiters_one_retries(cache_name):
    calls = FORK.Value("i", 0)
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        barrier = FORK.Barrier(N)
        results = run_children(_failing_fetch_child,
                               [(cache_name, barrier, calls) for _ in range(N)], timeout=60)
        assert sorted(results) == ["boom"] + ["retried"] * (N - 1)
        assert calls.value == 2
        assert parent.get("k") == "retried"
        s = parent.stats()
        assert s["writes"] == 1
        assert s["stampede_timeouts"] == 0
        assert parent.check() == []


def _slow_fetcher(name, in_fetch):
    def fetch(key):
        in_fetch.set()
        time.sleep(2.0)
        return "slow"

    with vela.Cache(name) as c:
        return c.get_or_fetch("k", fetch)


def _impatient_waiter(name, in_fetch):
    assert in_fetch.wait(BARRIER_TIMEOUT)
    with vela.Cache(name, stampede_timeout=0.3) as c:
        return c.get_or_fetch("k", lambda key: "impatient")


def test_stampede_timeout_then_fetch_yourself(cache_name):
    in_fetch = FORK.Event()
    with vela.Cache(cache_name, capacity="8MiB") as parent:
        from conftest import Child, collect
        children = [Child(_slow_fetcher, cache_name, in_fetch),
                    Child(_impatient_waiter, cache_name, in_fetch)]
        assert collect(children, timeout=60) == ["slow", "impatient"]
        s = parent.stats()
        assert s["stampede_timeouts"] == 1
        assert s["stampede_waits"] == 1
        assert parent.check() == []
