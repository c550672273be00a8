"""get_or_fetch stampede protection across real forked processes (ARCHITECTURE.md §3).

Every scenario runs real processes (forked through conftest's Child / collect), counts
fetch_fn runs exactly (a shared multiprocessing.Value incremented by every fetch_fn,
whatever process runs it), is bounded in time (pipe polls, barrier and collect
timeouts) and kills its leftover children in `finally`.

The only timing assertions are the bounds of the issue: a SIGKILLed lease holder is
taken over within 1 s of the kill (waiters poll every 20 ms), no waiter waits past
stampede_timeout, and waiters with stampede_timeout=0.5 return in < 2.5 s while the
holder sleeps 3 s.
"""
import os
import signal
import threading
import time

import pytest

import vela
from conftest import FORK, Child, collect, run_children, run_in_child

N = 8                  # processes racing for one key
FETCH_SLEEP = 0.5      # seconds a contended fetch takes
BARRIER_TIMEOUT = 30
START_TIMEOUT = 20     # seconds a child gets to reach its fetch


def _bump(counter):
    with counter.get_lock():
        counter.value += 1


def _kill_all(children):
    for c in children:
        c.close()


# --------------------------------------------------------------------------------------
# child bodies (module level: forked children run them)


def _race(name, key, counter, barrier, i, sleep, handle_opts):
    """Wait at the barrier with the others, then get_or_fetch one key."""
    def fetch(k):
        _bump(counter)
        time.sleep(sleep)
        return {"fetched_by": i, "key": k}

    with vela.Cache(name, **handle_opts) as c:
        barrier.wait(BARRIER_TIMEOUT)
        return c.get_or_fetch(key, fetch)


def _hold(name, key, counter, started_w, value, sleep=None, release=None, fail=None):
    """Take the lease on `key`: fetch_fn reports its start (time.monotonic(), the same
    clock in every process of the host) through `started_w`, then sleeps `sleep` s or
    waits for `release`, then returns `value` or raises `fail`."""
    def fetch(k):
        _bump(counter)
        started_w.send(time.monotonic())
        if release is not None:
            assert release.wait(30), "holder was never released"
        if sleep is not None:
            time.sleep(sleep)
        if fail is not None:
            raise fail
        return value

    with vela.Cache(name) as c:
        try:
            return "returned", c.get_or_fetch(key, fetch)
        except Exception as e:  # noqa: BLE001 - the test checks the exact exception
            return "raised", (type(e), str(e))


def _wait_on(name, key, counter, i, handle_opts, fetch_sleep=0.0, ready=None):
    """A caller that arrives while another process holds the lease."""
    def fetch(k):
        _bump(counter)
        fetched_at = time.monotonic()
        time.sleep(fetch_sleep)
        return ("fetched by waiter", i, fetched_at)

    with vela.Cache(name, **handle_opts) as c:
        if ready is not None:
            ready.wait(BARRIER_TIMEOUT)
        events = []
        hid = ("stampede-test-waiter", os.getpid())
        vela.telemetry.attach(hid, [c.telemetry_prefix + ("fetch", "stop")],
                              lambda e, m, md: events.append(md["result"]))
        try:
            t0 = time.monotonic()
            value = c.get_or_fetch(key, fetch)
            t1 = time.monotonic()
        finally:
            vela.telemetry.detach(hid)
        return {"value": value, "began": t0, "ended": t1, "elapsed": t1 - t0,
                "result": events}


# --------------------------------------------------------------------------------------
# one key, 8 processes


def test_eight_processes_one_fetch_all_get_its_value(cache):
    counter = FORK.Value("i", 0)
    barrier = FORK.Barrier(N)
    results = run_children(_race, [(cache.name, "hot", counter, barrier, i, FETCH_SLEEP, {})
                                   for i in range(N)], timeout=60)
    assert counter.value == 1
    fetched = results[0]
    assert fetched["key"] == "hot" and fetched["fetched_by"] in range(N)
    assert results == [fetched] * N
    assert cache.get("hot") == fetched
    stats = cache.stats()
    assert stats["fetches"] == 1
    assert stats["stampede_timeouts"] == 0
    assert cache.check() == []


def test_killed_holder_is_taken_over_within_a_second(cache):
    timeout = 5.0
    counter = FORK.Value("i", 0)
    started_r, started_w = FORK.Pipe(duplex=False)
    ready = FORK.Barrier(N)  # 7 waiters + the parent
    holder = Child(_hold, cache.name, "doomed", counter, started_w, "holder value", 3600)
    started_w.close()
    waiters = []
    try:
        assert started_r.poll(START_TIMEOUT), "holder did not start its fetch"
        started_r.recv()
        waiters = [Child(_wait_on, cache.name, "doomed", counter, i,
                         {"stampede_timeout": timeout}, FETCH_SLEEP, ready)
                   for i in range(N - 1)]
        ready.wait(BARRIER_TIMEOUT)
        time.sleep(0.3)  # the waiters are now asleep on the lease
        assert holder.proc.is_alive()
        killed_at = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        holder.proc.join(5)
        assert holder.proc.exitcode == -signal.SIGKILL
        results = collect(waiters, timeout=30)
    finally:
        _kill_all([holder] + waiters)
        started_r.close()

    # the killed holder's fetch and exactly one takeover fetch
    assert counter.value == 2
    value = results[0]["value"]
    assert value[0] == "fetched by waiter" and value[1] in range(N - 1)
    assert [r["value"] for r in results] == [value] * (N - 1)
    takeover_at = value[2]
    assert 0 < takeover_at - killed_at < 1.0, f"takeover {takeover_at - killed_at:.3f} s after the kill"
    for r in results:
        assert r["elapsed"] < timeout, f"a waiter waited {r['elapsed']:.3f} s"
    assert sorted(r["result"][0] for r in results) == ["fetched"] + ["waited"] * (N - 2)
    assert cache.get("doomed") == value
    assert cache.stats()["stampede_timeouts"] == 0
    assert cache.check() == []


def _parent_of_holder(name, key, counter, pid_w):
    """Fork the lease holder ourselves (so only we can reap it), then wait on its lease.
    The test SIGKILLs the holder; it stays a zombie while we are inside get_or_fetch."""
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder
        try:
            os.close(started_r)
            with vela.Cache(name) as c:
                def fetch(k):
                    _bump(counter)
                    os.write(started_w, b"x")
                    time.sleep(3600)
                c.get_or_fetch(key, fetch)
        finally:
            os._exit(0)
    os.close(started_w)
    try:
        assert os.read(started_r, 1) == b"x"
        pid_w.send(pid)

        def fetch(k):
            _bump(counter)
            return ("taken over", time.monotonic())

        with vela.Cache(name, stampede_timeout=5.0) as c:
            t0 = time.monotonic()
            value = c.get_or_fetch(key, fetch)
            return {"value": value, "elapsed": time.monotonic() - t0,
                    "stats": c.stats()}
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(started_r)


def test_killed_holder_not_yet_reaped_is_taken_over_within_a_second(cache):
    """A SIGKILLed holder is dead at once, even before its parent reaps it (here the
    parent is the waiter itself, busy inside get_or_fetch)."""
    counter = FORK.Value("i", 0)
    pid_r, pid_w = FORK.Pipe(duplex=False)
    parent = Child(_parent_of_holder, cache.name, "orphaned", counter, pid_w)
    pid_w.close()
    try:
        assert pid_r.poll(START_TIMEOUT), "holder did not start its fetch"
        holder_pid = pid_r.recv()
        time.sleep(0.3)  # the parent is now waiting on the holder's lease
        killed_at = time.monotonic()
        os.kill(holder_pid, signal.SIGKILL)
        [result] = collect([parent], timeout=30)
    finally:
        parent.close()
        pid_r.close()
    assert counter.value == 2
    assert result["value"][0] == "taken over"
    took = result["value"][1] - killed_at
    assert 0 < took < 1.0, f"takeover {took:.3f} s after the kill (zombie holder counted as alive?)"
    assert result["stats"]["stampede_timeouts"] == 0
    assert cache.get("orphaned") == result["value"]


# --------------------------------------------------------------------------------------
# a fetch that raises


def test_fetch_error_reaches_its_caller_and_a_waiter_retries(cache):
    counter = FORK.Value("i", 0)
    started_r, started_w = FORK.Pipe(duplex=False)
    release = FORK.Event()
    ready = FORK.Barrier(N)
    holder = Child(_hold, cache.name, "flaky", counter, started_w, "never", None, release,
                   LookupError("upstream said no: flaky"))
    started_w.close()
    waiters = []
    try:
        assert started_r.poll(START_TIMEOUT), "holder did not start its fetch"
        waiters = [Child(_wait_on, cache.name, "flaky", counter, i, {}, 0.2, ready)
                   for i in range(N - 1)]
        ready.wait(BARRIER_TIMEOUT)
        time.sleep(0.3)  # the waiters are now asleep on the lease
        release.set()
        results = collect([holder] + waiters, timeout=30)
    finally:
        _kill_all([holder] + waiters)
        started_r.close()

    assert results[0] == ("raised", (LookupError, "upstream said no: flaky"))
    assert counter.value == 2  # the failed fetch and one retry
    value = results[1]["value"]
    assert value[0] == "fetched by waiter" and value[1] in range(N - 1)
    assert [r["value"] for r in results[1:]] == [value] * (N - 1)
    assert cache.get("flaky") == value
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# many keys


KEYS = 50


def _many_keys(name, counter, per_key, barrier, i):
    def fetch(k):
        _bump(counter)
        with per_key.get_lock():
            per_key[k[1]] += 1
        time.sleep(0.005)
        return ("value", k[1], i)

    with vela.Cache(name) as c:
        order = [(j + i * 7) % KEYS for j in range(KEYS)]
        barrier.wait(BARRIER_TIMEOUT)
        return {j: c.get_or_fetch(("k", j), fetch) for j in order}


def test_fifty_keys_eight_processes_fifty_fetches(cache):
    counter = FORK.Value("i", 0)
    per_key = FORK.Array("i", KEYS)
    barrier = FORK.Barrier(N)
    results = run_children(_many_keys, [(cache.name, counter, per_key, barrier, i)
                                        for i in range(N)], timeout=60)
    assert counter.value == KEYS
    assert list(per_key) == [1] * KEYS
    for j in range(KEYS):
        value = results[0][j]
        assert value[:2] == ("value", j)
        assert [r[j] for r in results] == [value] * N
        assert cache.get(("k", j)) == value
    assert cache.stats()["fetches"] == KEYS
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# stampede_timeout, stampede_protection=False


def test_waiters_give_up_after_stampede_timeout(cache):
    waiters_n = 4
    counter = FORK.Value("i", 0)
    started_r, started_w = FORK.Pipe(duplex=False)
    ready = FORK.Barrier(waiters_n)
    holder = Child(_hold, cache.name, "slow", counter, started_w, "holder value", 3.0)
    started_w.close()
    waiters = []
    try:
        assert started_r.poll(START_TIMEOUT), "holder did not start its fetch"
        # each waiter's own fetch takes 0.5 s, so every waiter times out before any
        # of them has stored its value
        waiters = [Child(_wait_on, cache.name, "slow", counter, i,
                         {"stampede_timeout": 0.5}, FETCH_SLEEP, ready)
                   for i in range(waiters_n)]
        results = collect(waiters, timeout=30)
    finally:
        _kill_all([holder] + waiters)
        started_r.close()
    for i, r in enumerate(results):
        assert r["value"][:2] == ("fetched by waiter", i)
        assert r["elapsed"] < 2.5, f"waiter {i} returned after {r['elapsed']:.3f} s"
        assert r["result"] == ["fetched"]
    assert counter.value == 1 + waiters_n
    assert cache.stats()["stampede_timeouts"] == waiters_n
    assert cache.check() == []


def test_without_stampede_protection_every_caller_fetches(cache):
    counter = FORK.Value("i", 0)
    barrier = FORK.Barrier(N)
    results = run_children(_race, [(cache.name, "free-for-all", counter, barrier, i, FETCH_SLEEP,
                                    {"stampede_protection": False}) for i in range(N)],
                           timeout=60)
    assert counter.value == N
    assert results == [{"fetched_by": i, "key": "free-for-all"} for i in range(N)]
    stats = cache.stats()
    assert stats["fetches"] == N
    assert stats["stampede_waits"] == 0
    assert cache.get("free-for-all") in results
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# threads of one process


def _threads_race(name):
    lock = threading.Lock()
    runs = []
    barrier = threading.Barrier(N)
    results = [None] * N
    errors = []

    def fetch(k):
        with lock:
            runs.append(threading.get_ident())
        time.sleep(FETCH_SLEEP)
        return ("fetched in thread", threading.get_ident())

    with vela.Cache(name) as c:
        def worker(i):
            try:
                barrier.wait(BARRIER_TIMEOUT)
                results[i] = c.get_or_fetch("threads", fetch)
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        alive = sum(t.is_alive() for t in threads)
        return {"runs": len(runs), "results": results, "errors": errors, "alive": alive,
                "stored": c.get("threads"), "fetches": c.stats()["fetches"]}


def test_eight_threads_of_one_process_one_fetch(cache):
    r = run_in_child(_threads_race, cache.name, timeout=60)
    assert r["alive"] == 0 and r["errors"] == []
    assert r["runs"] == 1
    value = r["results"][0]
    assert value[0] == "fetched in thread"
    assert r["results"] == [value] * N
    assert r["stored"] == value
    assert r["fetches"] == 1


# --------------------------------------------------------------------------------------
# stats


def test_stampede_waits_counted_for_each_waiter(cache):
    counter = FORK.Value("i", 0)
    started_r, started_w = FORK.Pipe(duplex=False)
    release = FORK.Event()
    ready = FORK.Barrier(N)
    holder = Child(_hold, cache.name, "counted", counter, started_w, "holder value", None,
                   release)
    started_w.close()
    waiters = []
    try:
        assert started_r.poll(START_TIMEOUT), "holder did not start its fetch"
        waiters = [Child(_wait_on, cache.name, "counted", counter, i, {}, 0.0, ready)
                   for i in range(N - 1)]
        ready.wait(BARRIER_TIMEOUT)
        time.sleep(0.3)  # the waiters are now asleep on the lease
        release.set()
        results = collect([holder] + waiters, timeout=30)
    finally:
        release.set()
        _kill_all([holder] + waiters)
        started_r.close()
    assert results[0] == ("returned", "holder value")
    assert [r["value"] for r in results[1:]] == ["holder value"] * (N - 1)
    assert [r["result"] for r in results[1:]] == [["waited"]] * (N - 1)
    assert counter.value == 1
    stats = cache.stats()
    assert stats["stampede_waits"] == N - 1
    assert stats["fetches"] == 1
    assert stats["stampede_timeouts"] == 0


# --------------------------------------------------------------------------------------
# a value that cannot be stored


def _fill(c, n):
    for i in range(n):
        c.put(("fill", i), i)
    with pytest.raises(vela.CacheFull):
        c.put("one too many", 0)


def test_unstorable_fetched_value_still_reaches_the_caller(cache_name):
    with vela.Cache(cache_name, capacity="1MiB", max_size=4, eviction_policy="ttl_only") as c:
        _fill(c, 4)
        assert c.get_or_fetch("no room", lambda k: {"computed": k}) == {"computed": "no room"}
        assert "no room" not in c
        assert c.size() == 4
        # the lease was released: the next caller fetches again at once
        assert c.get_or_fetch("no room", lambda k: "again") == "again"
        assert c.check() == []


def test_unstorable_value_waiters_fetch_for_themselves(cache_name):
    with vela.Cache(cache_name, capacity="1MiB", max_size=4, eviction_policy="ttl_only") as c:
        _fill(c, 4)
        counter = FORK.Value("i", 0)
        started_r, started_w = FORK.Pipe(duplex=False)
        release = FORK.Event()
        ready = FORK.Barrier(2)
        holder = Child(_hold, cache_name, "no room", counter, started_w, "holder value", None,
                       release)
        started_w.close()
        waiter = None
        try:
            assert started_r.poll(START_TIMEOUT), "holder did not start its fetch"
            waiter = Child(_wait_on, cache_name, "no room", counter, 0, {}, 0.0, ready)
            ready.wait(BARRIER_TIMEOUT)
            time.sleep(0.3)
            release.set()
            held, waited = collect([holder, waiter], timeout=30)
        finally:
            release.set()
            _kill_all([holder] + ([waiter] if waiter else []))
            started_r.close()
        assert held == ("returned", "holder value")
        assert waited["value"][:2] == ("fetched by waiter", 0)
        assert counter.value == 2
        assert "no room" not in c
        assert c.stats()["stampede_timeouts"] == 0
        assert c.check() == []


# --------------------------------------------------------------------------------------
# no stripe lock is held while fetch_fn runs


def _fetch_uses_the_cache(name):
    seen = {}
    with vela.Cache(name, lock_timeout=2.0) as c:
        assert c.info()["stripes"] == 1  # every key shares the one stripe

        def fetch(k):
            c.put("other", "o")
            seen["other"] = c.get("other")
            seen["same key"] = c.get(k)
            seen["same key exists"] = c.exists(k)
            c.put(("another", 1), 1, tags=["t"])
            seen["incr"] = c.incr("counter")
            seen["deleted"] = c.delete("other")
            return "fetched"

        value = c.get_or_fetch("key", fetch)
        return value, seen, c.get("key"), c.get(("another", 1)), c.check()


def test_no_stripe_lock_is_held_while_fetch_runs(cache_name):
    with vela.Cache(cache_name, capacity="1MiB", stripes=1):
        pass
    value, seen, stored, another, problems = run_in_child(_fetch_uses_the_cache, cache_name,
                                                           timeout=30)
    assert value == "fetched"
    assert seen == {"other": "o", "same key": None, "same key exists": False, "incr": 1,
                    "deleted": True}
    assert stored == "fetched"
    assert another == 1
    assert problems == []
