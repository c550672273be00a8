"""Stale-while-revalidate, early refresh (XFetch) and stale-if-error in get_or_fetch,
aget_or_fetch and memoize (README "Stale values and early refresh").

Multi-process scenarios run real forked processes as workers of simulated hosts
(tests/stores.py) on the host table, on a real redis-server and on a partitioned
cluster of two real bridges. Fetches are counted exactly with a shared
multiprocessing.Value; a stale value is planted stamped in the past (no sleeping
until something expires), and fetches block on an Event until the test has seen
every reader's answer, so "every reader got the stale value while one refresh ran"
is an exact outcome, not a timing.
"""
import asyncio
import logging
import math
import os
import random
import signal
import time

import pytest

import vela
from cluster import eventually
from conftest import FORK, Child, collect
from stores import Store, store_fixtures
from vela import refresh
from vela.stamp import MAGIC, Stamped

N = 6
TIMEOUT = 60
KINDS = ("shm-local", "redis", "redis-near", "shm-partitioned")


def _bump(counter):
    with counter.get_lock():
        counter.value += 1


def _stale(value, fetch_ns=1_000_000):
    """``value`` stamped fresh until a millisecond ago."""
    return Stamped(value, time.time_ns() - 1_000_000, fetch_ns)


def _stamp(cache, key):
    """What ``key`` holds, read as get_or_fetch reads it (a Stamped when stamped)."""
    return refresh.read(cache._store, key)


# ---- the rules, in one process ------------------------------------------------------------


def test_plan_refuses_bad_options_naming_them(cache):
    fetch = lambda k: 1  # noqa: E731
    with pytest.raises(vela.OptionError, match="stale_ttl"):
        cache.get_or_fetch("k", fetch, ttl=10, stale_ttl=-1)
    with pytest.raises(vela.OptionError, match="stale_if_error"):
        cache.get_or_fetch("k", fetch, ttl=10, stale_if_error="1h")
    with pytest.raises(vela.OptionError, match="early"):
        cache.get_or_fetch("k", fetch, ttl=10, early=-2)
    with pytest.raises(vela.OptionError, match="finite ttl"):
        cache.get_or_fetch("k", fetch, stale_ttl=5)  # no ttl, no default_ttl
    with pytest.raises(vela.OptionError, match="finite ttl"):
        cache.memoize(stale_ttl=5)
    assert "k" not in cache


def test_judge_windows_and_the_xfetch_rule():
    p = refresh.plan(10 * 10**9, 5, None, 20)
    assert (p.fresh_ns, p.stale_ns, p.error_ns, p.beta, p.store_ns) == (10**10, 5 * 10**9, 2 * 10**10, 0.0,
                                                                      3 * 10**10)
    found = Stamped("v", fresh_until=1_000 * 10**9, fetch_ns=10**9)
    assert p.judge(found, 999 * 10**9) == refresh.FRESH
    assert p.judge(found, 1_000 * 10**9) == refresh.REFRESH          # stale: serve, refresh
    assert p.judge(found, 1_005 * 10**9 - 1) == refresh.REFRESH
    assert p.judge(found, 1_005 * 10**9) == refresh.FETCH            # too old: fetch now
    assert p.may_serve_on_error(found, 1_020 * 10**9 - 1) is True
    assert p.may_serve_on_error(found, 1_020 * 10**9) is False
    # XFetch: refresh when delta * beta * -log(1 - r) >= time left; r is the seeded draw
    seed = 7
    r = random.Random(seed).random()
    weight = -math.log(1.0 - r)
    left = 30 * 10**9
    for beta in (1.0, 100.0):
        early = refresh.plan(60 * 10**9, None, beta, None)
        refresh._random.seed(seed)
        expected = refresh.REFRESH if 10**9 * beta * weight >= left else refresh.FRESH
        assert early.judge(Stamped("v", 1_000 * 10**9 + left, 10**9), 1_000 * 10**9) == expected
    assert refresh.plan(10**9, None, True, None).beta == 1.0
    assert refresh.plan(10**9, None, None, None) is None


def test_get_returns_the_bare_value_of_a_stamped_entry(cache):
    values = [b"raw\x00", "text \udc80", 12, 2**80, None, {"a": [1, 2]}, MAGIC + b"not a stamp"]
    for i, v in enumerate(values):
        assert cache.get_or_fetch(("k", i), lambda k, v=v: v, ttl=30, stale_ttl=30) == v
    for i, v in enumerate(values):
        assert cache.get(("k", i)) == v and cache[("k", i)] == v
        assert type(_stamp(cache, ("k", i))) is Stamped
    assert cache.get_many([("k", 5)]) == {("k", 5): {"a": [1, 2]}}
    # the entry lives ttl + stale_ttl
    assert 59 < cache.ttl(("k", 0)) <= 60


def test_a_signed_serializer_verifies_stamped_values(cache_name):
    from vela.serializers import signed

    safe = vela.Cache(cache_name, capacity="8MiB", serializer=signed(key=b"k" * 32))
    intruder = vela.Cache(cache_name)
    try:
        assert safe.get_or_fetch("k", lambda k: {"v": 1}, ttl=30, stale_ttl=30) == {"v": 1}
        assert safe.get("k") == {"v": 1}
        intruder.put("k", _stale({"forged": True}), ttl=60)  # stamped, pickled, unsigned
        with pytest.raises(vela.UntrustedValue):
            safe.get("k")
        with pytest.raises(vela.UntrustedValue):
            safe.get_or_fetch("k", lambda k: {"v": 2}, ttl=30, stale_ttl=30)
    finally:
        safe.close()
        intruder.close()


def test_get_and_plain_get_or_fetch_serve_a_stale_entry_until_its_real_ttl(cache):
    cache.put("k", _stale("old"), ttl=30)
    assert cache.get("k") == "old"
    assert cache.get_or_fetch("k", lambda k: "new") == "old"  # no refresh option: no refresh


def test_a_value_put_without_a_stamp_is_served_as_it_is(cache):
    cache.put("k", "plain", ttl=30)
    assert cache.get_or_fetch("k", lambda k: "new", ttl=1, stale_ttl=5, early=100) == "plain"


def test_stale_if_error_serves_the_stale_value_within_its_window_only(cache):
    def down(k):
        raise ConnectionError("backend down")

    cache.put("k", Stamped("old", time.time_ns() - 10 * 10**9, 1), ttl=60)  # 10 s past fresh
    assert cache.get_or_fetch("k", down, ttl=1, stale_if_error=60) == "old"
    with pytest.raises(ConnectionError, match="backend down"):
        cache.get_or_fetch("k", down, ttl=1, stale_if_error=5)  # 10 s past: beyond 5
    with pytest.raises(ConnectionError):
        cache.get_or_fetch("absent", down, ttl=1, stale_if_error=60)  # nothing stale to serve
    # a fetch that works replaces it, stamped fresh
    assert cache.get_or_fetch("k", lambda k: "new", ttl=30, stale_if_error=60) == "new"
    assert _stamp(cache, "k").fresh_until > time.time_ns() + 29 * 10**9


def test_a_failed_background_refresh_keeps_the_stale_value_and_is_logged(cache, caplog):
    calls = []

    def down(k):
        calls.append(k)
        raise ConnectionError("backend down")

    cache.put("k", _stale("old"), ttl=60)
    with caplog.at_level(logging.WARNING, logger="vela.refresh"):
        assert cache.get_or_fetch("k", down, ttl=30, stale_ttl=30) == "old"
        eventually(lambda: not refresh._running, 10, what="the refresh thread ended")
    assert calls == ["k"] and cache.get("k") == "old"
    assert "background refresh of 'k' failed" in caplog.text and "backend down" in caplog.text
    # the lease was released: the next stale read refreshes
    assert cache.get_or_fetch("k", lambda k: "new", ttl=30, stale_ttl=30) == "old"
    eventually(lambda: cache.get("k") == "new", 10, what="the second refresh")


def test_memoize_unless_with_a_stale_value_returns_the_result_unstored(cache):
    @cache.memoize(ttl=30, stale_if_error=60, unless=lambda r: r is None)
    def find(x):
        return None

    cache.put(find.key(1), Stamped("old", time.time_ns() - 10**11, 1), ttl=60)  # too old to serve
    assert find(1) is None
    assert cache.get(find.key(1)) == "old"


def test_memoize_refuses_a_refresh_option_without_ttl(cache):
    with pytest.raises(vela.OptionError, match="early"):
        cache.memoize(ttl=5, early="soon")


def test_telemetry_says_stale_and_stale_on_error(cache):
    seen = []
    vela.telemetry.attach("refresh-test", [("vela", "cache", "fetch", "stop")],
                          lambda event, m, meta: seen.append(meta["result"]))
    try:
        cache.put("k", _stale("old"), ttl=60)
        assert cache.get_or_fetch("k", lambda k: "new", ttl=30, stale_ttl=30) == "old"
        eventually(lambda: cache.get("k") == "new", 10, what="the refresh")
        assert cache.get_or_fetch("k", lambda k: "newer", ttl=30, stale_ttl=30) == "new"

        def down(k):
            raise ConnectionError("down")

        cache.put("e", Stamped("old", time.time_ns() - 10**9, 1), ttl=60)
        assert cache.get_or_fetch("e", down, ttl=30, stale_if_error=30) == "old"
        assert cache.get_or_fetch("f", lambda k: "v", ttl=30, stale_if_error=30) == "v"
    finally:
        vela.telemetry.detach("refresh-test")
    assert seen == ["stale", "hit", "stale_on_error", "fetched"]


def test_counters_of_a_stale_read_and_its_refresh(cache):
    cache.put("k", _stale("old"), ttl=60)
    cache.stats(reset=True)
    assert cache.get_or_fetch("k", lambda k: "new", ttl=30, stale_ttl=30) == "old"
    eventually(lambda: not refresh._running, 10, what="the refresh thread ended")
    stats = cache.stats()
    # the stale value served: a hit; the refresh: a miss (its lease), a hit (its check),
    # a fetch and a write
    assert {k: stats[k] for k in ("hits", "misses", "fetches", "writes", "stampede_waits")} == {
        "hits": 2, "misses": 1, "fetches": 1, "writes": 1, "stampede_waits": 0}
    assert cache.get("k") == "new"


def test_async_too_old_value_one_task_fetches_the_others_wait(cache):
    calls = []

    async def slow(k):
        calls.append(k)
        await asyncio.sleep(0.2)
        return "new"

    async def down(k):
        raise ConnectionError("down")

    async def main():
        cache.put("k", Stamped("old", time.time_ns() - 100 * 10**9, 1), ttl=600)  # past stale_ttl
        got = await asyncio.gather(*(cache.aget_or_fetch("k", slow, ttl=30, stale_ttl=1) for _ in range(5)))
        cache.put("e", Stamped("old", time.time_ns() - 10**9, 1), ttl=600)
        on_error = await cache.aget_or_fetch("e", down, ttl=30, stale_if_error=60)
        with pytest.raises(ConnectionError):
            await cache.aget_or_fetch("e", down, ttl=30, stale_if_error=0.5)
        return got, on_error

    got, on_error = asyncio.run(main())
    assert got == ["new"] * 5 and calls == ["k"]
    assert on_error == "old"


def test_async_stale_value_is_refreshed_by_a_task(cache):
    calls = []

    async def fetch(k):
        calls.append(k)
        return "new"

    async def main():
        cache.put("k", _stale("old"), ttl=60)
        got = await asyncio.gather(*(cache.aget_or_fetch("k", fetch, ttl=30, stale_ttl=30) for _ in range(5)))
        while cache.get("k") != "new":
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(main()) == ["old"] * 5
    assert calls == ["k"]


def test_memoize_early_refreshes_a_fresh_result_with_a_seeded_draw(cache):
    calls = []

    @cache.memoize(ttl=60, early=100)
    def rate(currency):
        calls.append(currency)
        return f"{currency} v{len(calls)}"

    seed = 7
    weight = -math.log(1.0 - random.Random(seed).random())
    assert 1.0 * 100 * weight >= 30  # fetch took 1 s, 30 s left: beta 100 refreshes
    cache.put(rate.key("EUR"), Stamped("EUR v0", time.time_ns() + 30 * 10**9, 10**9), ttl=60)
    refresh._random.seed(seed)
    assert rate("EUR") == "EUR v0"  # still fresh: served, refreshed behind
    eventually(lambda: cache.get(rate.key("EUR")) == "EUR v1", 10, what="the early refresh")
    assert calls == ["EUR"]


# ---- real processes, every store ------------------------------------------------------------


redis_server, opened, store = store_fixtures(KINDS)


def _host(store, i):
    """Workers alternate between the two hosts where the store spans hosts."""
    return "AB"[i % 2] if store.spans_hosts else "A"


def _worker(store, host, fn, *args, **extra):
    return Child(Store.run_worker, store.namespaces[host], store.options(host, **extra), fn, args)


def _stale_reader(cache, key, counter, reads, release, i, mode):
    """get_or_fetch (or aget_or_fetch, or a memoized call) of a stale key; report the
    answer, then stay until the refresh landed (a refresher's thread dies with its process)."""
    def fetch(k):
        _bump(counter)
        assert release.wait(TIMEOUT), "never released"
        return "new"

    async def afetch(k):
        _bump(counter)
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "new"

    async def areader():
        got = await cache.aget_or_fetch(key, afetch, ttl=60, stale_ttl=60)
        reads.put((i, got))
        while cache.get(key) != "new":  # the loop runs on: the refresh task with it
            await asyncio.sleep(0.02)
        return got

    if mode == "async":
        return asyncio.run(areader())
    if mode == "amemoize":
        @cache.memoize(ttl=60, stale_ttl=60, key=lambda x: key)
        async def acompute(x):
            return await afetch(x)

        async def amemoized():
            got = await acompute(1)
            reads.put((i, got))
            while cache.get(key) != "new":
                await asyncio.sleep(0.02)
            return got

        return asyncio.run(amemoized())
    if mode == "read-first":  # a near cache (redis-near; partitioned here) keeps a copy
        assert cache.get(key) == "old" and cache.get(key) == "old"
    if mode == "memoize":
        @cache.memoize(ttl=60, stale_ttl=60, key=lambda x: key)
        def compute(x):
            return fetch(x)
        got = compute(1)
    else:
        got = cache.get_or_fetch(key, fetch, ttl=60, stale_ttl=60)
    reads.put((i, got))
    eventually(lambda: cache.get(key) == "new", TIMEOUT, what="the refreshed value")
    return got


@pytest.mark.parametrize("mode", ["sync", "async", "memoize", "amemoize", "read-first"])
def test_n_processes_get_the_stale_value_and_one_refreshes(store, mode):
    """Every reader gets the stale value while the one refresh is blocked; with
    "read-first", each reads the key plainly before (its near cache, if any, keeps a
    copy that a refresh elsewhere makes stale: no second refresh comes of it)."""
    key = ("stale", mode)
    near = {"near_cache": True} if mode == "read-first" and store.topology == "partitioned" else {}
    store.cache.put(key, _stale("old"), ttl=120)
    counter, reads, release = FORK.Value("i", 0), FORK.Queue(), FORK.Event()
    children = [_worker(store, _host(store, i), _stale_reader, key, counter, reads, release, i, mode, **near)
                for i in range(N)]
    try:
        got = sorted(reads.get(timeout=TIMEOUT) for _ in range(N))  # while the refresh is blocked
        assert got == [(i, "old") for i in range(N)]
        eventually(lambda: counter.value == 1, TIMEOUT, what="the one refresh started")
        release.set()
        assert collect(children, TIMEOUT) == ["old"] * N
    finally:
        release.set()
        for c in children:
            c.close()
    assert counter.value == 1
    assert store.cache.get(key) == "new"
    assert _stamp(store.cache, key).fresh_until > time.time_ns() + 50 * 10**9


def _hanging_refresher(cache, key, counter, started):
    def fetch(k):
        _bump(counter)
        started.set()
        time.sleep(TIMEOUT * 2)  # SIGKILLed meanwhile
        return "never"

    assert cache.get_or_fetch(key, fetch, ttl=60, stale_ttl=60) == "old"
    time.sleep(TIMEOUT * 2)


def _taker(cache, key, counter):
    def fetch(k):
        _bump(counter)
        return "new"

    first = cache.get_or_fetch(key, fetch, ttl=60, stale_ttl=60)
    # every stale read tries the refresh lease: once the dead holder's lease is taken
    # over (at once on a host; after lease_ttl in Redis), one of them refreshes
    eventually(lambda: cache.get_or_fetch(key, fetch, ttl=60, stale_ttl=60) == "new", TIMEOUT,
               interval=0.1, what="a refresh after the refresher was killed")
    return first


def test_a_sigkilled_refresher_is_replaced(store):
    key = "killed"
    store.cache.put(key, _stale("old"), ttl=120)
    counter, started = FORK.Value("i", 0), FORK.Event()
    extra = {"stampede_timeout": 1.0} if store.backend == "redis" else {}  # lease_ttl in Redis
    victim = _worker(store, "A", _hanging_refresher, key, counter, started, **extra)
    try:
        assert started.wait(TIMEOUT), "the refresh never started"
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.join(10)
    finally:
        victim.close()
    assert store.cache.get(key) == "old" and counter.value == 1
    taker = _worker(store, "B" if store.spans_hosts else "A", _taker, key, counter, **extra)
    assert collect([taker], TIMEOUT * 2) == ["old"]
    assert counter.value == 2
    assert store.cache.get(key) == "new"


def _reads_then_refreshes(cache, key, counter):
    def fetch(k):
        _bump(counter)
        return "new"

    # plain reads first: a near cache keeps its copy, and the copy must keep the stamp
    assert cache.get(key) == "old" and cache.get_many([key]) == {key: "old"} and cache.get(key) == "old"
    first = cache.get_or_fetch(key, fetch, ttl=60, stale_ttl=60)
    eventually(lambda: cache.get(key) == "new", TIMEOUT, what="the refresh")
    return first, type(refresh.read(cache._store, key)).__name__


def test_a_value_read_plainly_first_is_still_judged_stale(store):
    key = "read-first"
    store.cache.put(key, _stale("old"), ttl=120)
    counter = FORK.Value("i", 0)
    child = _worker(store, "B" if store.spans_hosts else "A", _reads_then_refreshes, key, counter)
    assert collect([child], TIMEOUT) == [("old", "Stamped")]
    assert counter.value == 1


def test_a_refresher_checks_past_a_near_copy_that_has_not_heard_of_the_refresh(redis_server):
    store = Store("redis-near", redis_url=redis_server.url)
    try:
        cache = store.cache
        cache.put("k", _stale("old"), ttl=60)
        assert cache.get("k") == "old"  # the host keeps a copy, with its stamp
        assert type(_stamp(cache, "k")) is Stamped
        # A refresh elsewhere stored "new"; this host's copy still says "old" (as before
        # the invalidation arrives): written into the host table, where copies live.
        copy = _stale("old")
        cache._store.inner.put("k", Stamped("new", time.time_ns() + 60 * 10**9, 1), 60 * 10**9, ())
        cache._store.table.put("k", copy, 60 * 10**9, ())
        assert cache.get("k") == "old"
        calls = []
        # a reader that found the copy stale wins the refresh lease: it checks where the
        # entries are, finds "new", and does not fetch a second time
        refresh.refresh_once(cache._store, "k", refresh.refresh_key("k"), copy, calls.append,
                             refresh.plan(60 * 10**9, 60, None, None), ())
        assert calls == []
        assert _stamp(cache, "k").value == "new"
    finally:
        store.close()


def _failing_reader(cache, key, window):
    def down(k):
        raise ConnectionError("backend down")

    try:
        return cache.get_or_fetch(key, down, ttl=60, stale_if_error=window)
    except ConnectionError as exc:
        return f"raised {exc}"


def test_stale_if_error_in_processes_of_every_host(store):
    key = "errors"
    store.cache.put(key, Stamped("old", time.time_ns() - 10 * 10**9, 1), ttl=120)  # 10 s past fresh
    children = [_worker(store, _host(store, i), _failing_reader, key, 60 if i < 2 else 5) for i in range(4)]
    assert collect(children, TIMEOUT) == ["old", "old", "raised backend down", "raised backend down"]
    assert store.cache.get(key) == "old"


def _early_reader(cache, key, counter, beta, seed, reads, release):
    def fetch(k):
        _bump(counter)
        assert release.wait(TIMEOUT), "never released"
        return "new"

    refresh._random.seed(seed)
    got = cache.get_or_fetch(key, fetch, ttl=60, early=beta)
    reads.put(got)
    if beta > 1:
        eventually(lambda: cache.get(key) == "new", TIMEOUT, what="the early refresh")
    else:  # the verdict is taken in the call: no refresh was started
        assert not refresh._running
    return got


def test_early_refresh_before_expiry_is_deterministic_with_a_seed(store):
    seed = 7
    weight = -math.log(1.0 - random.Random(seed).random())  # the first draw of every process
    left, took = 30.0, 1.0  # fresh 30 s more; its fetch took 1 s
    assert took * 100 * weight >= left > took * 1 * weight  # beta 100 refreshes, beta 1 does not
    for beta, expected_fetches in ((1.0, 0), (100.0, 1)):
        key = ("early", int(beta))
        store.cache.put(key, Stamped("old", time.time_ns() + int(left * 1e9), int(took * 1e9)), ttl=60)
        counter, reads, release = FORK.Value("i", 0), FORK.Queue(), FORK.Event()
        children = [_worker(store, _host(store, i), _early_reader, key, counter, beta, seed, reads, release)
                    for i in range(4)]
        try:
            assert [reads.get(timeout=TIMEOUT) for _ in range(4)] == ["old"] * 4  # fresh: served
            release.set()
            assert collect(children, TIMEOUT) == ["old"] * 4
        finally:
            release.set()
            for c in children:
                c.close()
        assert counter.value == expected_fetches
        assert store.cache.get(key) == ("new" if expected_fetches else "old")


def _too_old_reader(cache, key, counter, release):
    def fetch(k):
        _bump(counter)
        assert release.wait(TIMEOUT)
        return "new"

    return cache.get_or_fetch(key, fetch, ttl=60, stale_ttl=1, stale_if_error=600)


def test_past_the_stale_window_one_fetches_and_the_others_wait_for_it(store):
    key = "too-old"
    store.cache.put(key, Stamped("old", time.time_ns() - 100 * 10**9, 1), ttl=600)  # 100 s past fresh
    counter, release = FORK.Value("i", 0), FORK.Event()
    children = [_worker(store, _host(store, i), _too_old_reader, key, counter, release) for i in range(4)]
    try:
        eventually(lambda: counter.value == 1, TIMEOUT, what="one fetch started")
        release.set()
        assert collect(children, TIMEOUT) == ["new"] * 4
    finally:
        release.set()
        for c in children:
            c.close()
    assert counter.value == 1


# ---- the README ---------------------------------------------------------------------------------


def test_readme_section_runs_as_written():
    from apps import readme

    name = f"readme{os.urandom(5).hex()}"
    (code,) = readme.python_blocks("Stale values and early refresh")
    try:
        readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_refresh"})
    finally:
        vela.destroy(name)
