"""Batch calls, counters, ttl/touch, memoize, aget_or_fetch and stats, across real
forked processes (ARCHITECTURE.md §3, docs/api-notes.md).

Children are forked through conftest's helpers (bounded by collect timeouts, killed in
`finally`); shared counts go through multiprocessing.Value.
"""
import asyncio
import math
import time

import pytest

import vela
from conftest import FORK, Child, collect, run_children, run_in_child

BARRIER_TIMEOUT = 30
COUNTER_KEYS = ("hits", "misses", "writes", "deletes", "evictions", "expirations",
                "invalidations", "fetches", "stampede_waits", "stampede_timeouts")


def _bump(counter):
    with counter.get_lock():
        counter.value += 1


# --------------------------------------------------------------------------------------
# get_many / put_many / delete_many


def test_get_many_returns_present_keys_only(cache):
    cache.put("a", 1)
    cache.put(("t", 2), {"x": [1, 2]})
    cache.put(b"raw", b"bytes")
    cache.put(7, "seven")
    cache.put("gone", 0)
    cache.delete("gone")
    found = cache.get_many(["a", ("t", 2), "missing", b"raw", 7, "gone", 8])
    assert found == {"a": 1, ("t", 2): {"x": [1, 2]}, b"raw": b"bytes", 7: "seven"}
    assert cache.get_many([]) == {}
    assert cache.get_many(iter(["a", "nope"])) == {"a": 1}
    stats = cache.stats()
    assert stats["hits"] == 4 + 1
    assert stats["misses"] == 3 + 1


def test_get_many_sees_other_processes_writes(cache):
    def writer(name):
        with vela.Cache(name) as c:
            c.put_many({("w", i): i * i for i in range(20)})
        return True

    assert run_in_child(writer, cache.name, timeout=30) is True
    assert cache.get_many([("w", i) for i in range(25)]) == {("w", i): i * i for i in range(20)}


def test_put_many_dict_with_ttl_and_tags(cache):
    assert cache.put_many({"a": 1, "b": "two", ("c", 3): [3]}, ttl=60, tags=["batch", "x"]) is None
    assert cache.get_many(["a", "b", ("c", 3)]) == {"a": 1, "b": "two", ("c", 3): [3]}
    for k in ("a", "b", ("c", 3)):
        assert 59.0 < cache.ttl(k) <= 60.0
    assert cache.stats()["writes"] == 3
    assert cache.invalidate_tag("x") == 3
    assert cache.size() == 0
    assert cache.check() == []


def test_put_many_pairs_without_ttl(cache):
    cache.put_many([("a", 1), ("b", 2)])
    cache.put_many(iter([("c", 3)]))
    cache.put_many((k, v) for k, v in [("d", 4)])
    assert cache.get_many("abcd") == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert cache.ttl("a") is None
    assert cache.size() == 4


@pytest.mark.parametrize("bad", [
    pytest.param(("bad value", lambda: None), id="unserializable-value"),
    pytest.param((1.5, "float key"), id="float-key"),
    pytest.param((["list", "key"], "list key"), id="list-key"),
    pytest.param(("k" * 2000, "key too long"), id="key-too-long"),
])
def test_put_many_bad_item_stores_nothing(cache, bad):
    cache.put("before", "kept")
    items = [("a", 1), ("b", 2), bad, ("c", 3)]
    expected = ValueError if bad[0] == "k" * 2000 else TypeError
    with pytest.raises(expected):
        cache.put_many(items)
    with pytest.raises(expected):
        cache.put_many(dict(items) if not isinstance(bad[0], list) else items[::-1])
    assert cache.get_many(["a", "b", "c"]) == {}
    assert cache.size() == 1
    assert cache.get("before") == "kept"
    assert cache.stats()["writes"] == 1
    assert cache.check() == []


def test_delete_many_returns_count_removed(cache):
    cache.put_many({i: i for i in range(10)})
    assert cache.delete_many([0, 1, 2, 99, "x"]) == 3
    assert cache.delete_many([0, 1]) == 0
    assert cache.delete_many(iter([3])) == 1
    assert cache.delete_many([]) == 0
    assert sorted(cache.get_many(range(10))) == [4, 5, 6, 7, 8, 9]
    assert cache.size() == 6
    assert cache.stats()["deletes"] == 4
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# incr / decr


INCRS = 10_000


def _incr_many(name, barrier):
    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        last = 0
        for _ in range(INCRS):
            n = c.incr("hits")
            assert n > last
            last = n
        return last


def test_incr_from_four_processes_is_exact(cache):
    barrier = FORK.Barrier(4)
    lasts = run_children(_incr_many, [(cache.name, barrier) for _ in range(4)], timeout=60)
    assert cache.get("hits") == 4 * INCRS
    assert max(lasts) == 4 * INCRS
    assert all(INCRS <= n <= 4 * INCRS for n in lasts)
    assert cache.check() == []


def test_decr(cache):
    assert cache.decr("d") == -1
    assert cache.decr("d", 5) == -6
    assert cache.incr("d", 10) == 4
    assert cache.decr("d", delta=4) == 0
    assert cache.get("d") == 0
    cache.put("n", 100)
    assert cache.decr("n", 1) == 99


def test_incr_missing_key_takes_ttl(cache):
    assert cache.incr("t", 3, ttl=30) == 3
    assert 29.0 < cache.ttl("t") <= 30.0
    assert cache.incr("forever") == 1
    assert cache.ttl("forever") is None


def test_incr_on_str_raises_type_error(cache):
    cache.put("s", "12")
    with pytest.raises(TypeError):
        cache.incr("s")
    with pytest.raises(TypeError):
        cache.decr("s")
    assert cache.get("s") == "12"


def test_incr_overflow_raises(cache):
    cache.put("max", 2**63 - 1)
    with pytest.raises(OverflowError):
        cache.incr("max")
    assert cache.get("max") == 2**63 - 1
    cache.put("min", -2**63)
    with pytest.raises(OverflowError):
        cache.decr("min")
    assert cache.get("min") == -2**63
    cache.put("near", 2**63 - 10)
    with pytest.raises(OverflowError):
        cache.incr("near", 10)
    assert cache.incr("near", 9) == 2**63 - 1
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# ttl / touch


def test_ttl_remaining_none_and_keyerror(cache):
    cache.put("short", 1, ttl=10)
    cache.put("never", 2)
    cache.put("inf", 3, ttl=math.inf)
    remaining = cache.ttl("short")
    assert type(remaining) is float
    assert 9.0 < remaining <= 10.0
    assert cache.ttl("never") is None
    assert cache.ttl("inf") is None
    with pytest.raises(KeyError):
        cache.ttl("absent")


def test_touch(cache):
    cache.put("k", 1, ttl=5)
    assert cache.touch("k", 100) is True
    assert 99.0 < cache.ttl("k") <= 100.0
    assert cache.touch("k", math.inf) is True
    assert cache.ttl("k") is None
    assert cache.touch("absent", 10) is False
    with pytest.raises(KeyError):
        cache.ttl("absent")
    assert cache.get("k") == 1


def test_touch_from_another_process(cache):
    cache.put("k", 1, ttl=5)

    def toucher(name):
        with vela.Cache(name) as c:
            return c.touch("k", 300), c.touch("nope", 300)

    assert run_in_child(toucher, cache.name, timeout=30) == (True, False)
    assert 299.0 < cache.ttl("k") <= 300.0


# --------------------------------------------------------------------------------------
# memoize


def _call_memoized(fn, barrier):
    barrier.wait(BARRIER_TIMEOUT)
    return [fn(1), fn(2), fn(1, scale=3), fn(2), fn(1), fn(1, scale=3)]


def test_memoize_runs_once_per_distinct_arguments_across_processes(cache):
    runs = FORK.Value("i", 0)

    @cache.memoize(ttl=60, tags=["memo"])
    def square(x, scale=1):
        _bump(runs)
        time.sleep(0.2)
        return {"x": x, "value": x * x * scale}

    barrier = FORK.Barrier(4)
    results = run_children(_call_memoized, [(square, barrier) for _ in range(4)], timeout=60)
    expected = [{"x": 1, "value": 1}, {"x": 2, "value": 4}, {"x": 1, "value": 3},
                {"x": 2, "value": 4}, {"x": 1, "value": 1}, {"x": 1, "value": 3}]
    assert results == [expected] * 4
    assert runs.value == 3
    assert square(2) == {"x": 2, "value": 4}
    assert runs.value == 3
    assert 59.0 < cache.ttl(square.cache_key(1)) <= 60.0

    # memoized results carry the tag: invalidate_tag removes them all
    assert cache.invalidate_tag("memo") == 3
    assert square.cache_key(1) not in cache
    assert square(1) == {"x": 1, "value": 1}
    assert runs.value == 4
    assert cache.check() == []


def test_memoize_with_key_function(cache):
    runs = FORK.Value("i", 0)

    @cache.memoize(key=lambda user_id, **kw: ("user", user_id))
    def load_user(user_id, verbose=False):
        _bump(runs)
        return {"id": user_id}

    def child(fn):
        return fn(7), fn(7, verbose=True), fn(8)

    assert run_in_child(child, load_user, timeout=30) == ({"id": 7}, {"id": 7}, {"id": 8})
    assert runs.value == 2
    assert cache.get(("user", 7)) == {"id": 7}
    assert load_user.cache_key(7) == ("user", 7)


# --------------------------------------------------------------------------------------
# aget_or_fetch


def test_aget_or_fetch_with_an_async_fetch_function(cache):
    calls = []

    async def fetch(key):
        calls.append(key)
        await asyncio.sleep(0.01)
        return {"async": key}

    async def main():
        first = await cache.aget_or_fetch("ak", fetch, ttl=60, tags=["a"])
        second = await cache.aget_or_fetch("ak", fetch)
        return first, second

    assert asyncio.run(asyncio.wait_for(main(), 20)) == ({"async": "ak"}, {"async": "ak"})
    assert calls == ["ak"]
    assert cache.get("ak") == {"async": "ak"}
    assert 59.0 < cache.ttl("ak") <= 60.0
    assert cache.invalidate_tag("a") == 1
    assert cache.stats()["fetches"] == 1


def _hold_lease(name, key, counter, started_w, sleep, value):
    def fetch(k):
        _bump(counter)
        started_w.send(True)
        time.sleep(sleep)
        return value

    with vela.Cache(name) as c:
        return c.get_or_fetch(key, fetch)


def test_aget_or_fetch_waits_without_blocking_the_event_loop(cache):
    counter = FORK.Value("i", 0)
    started_r, started_w = FORK.Pipe(duplex=False)
    holder = Child(_hold_lease, cache.name, "shared", counter, started_w, 0.5,
                   {"from": "holder"})
    started_w.close()
    try:
        assert started_r.poll(20), "holder did not start its fetch"

        async def fetch(key):
            _bump(counter)
            return {"from": "loop"}

        async def main():
            ticks = 0
            stop = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            before = ticks
            try:
                value = await asyncio.wait_for(cache.aget_or_fetch("shared", fetch), 20)
            finally:
                during = ticks - before
                stop.set()
                await task
            return value, during

        value, ticked = asyncio.run(main())
        assert collect([holder], timeout=30) == [{"from": "holder"}]
    finally:
        holder.close()
        started_r.close()
    assert value == {"from": "holder"}
    assert ticked >= 10, f"the event loop ticked only {ticked} times while aget_or_fetch waited"
    assert counter.value == 1
    assert cache.stats()["fetches"] == 1
    assert cache.get("shared") == {"from": "holder"}


def test_aget_or_fetch_wait_counts_as_a_wait_not_a_timeout(cache):
    """Stats of an aget_or_fetch that waits for another process's fetch, well within
    stampede_timeout: one stampede wait and one hit, as get_or_fetch counts it; no
    stampede_timeout (it did not wait past the timeout) and no extra miss."""
    counter = FORK.Value("i", 0)
    started_r, started_w = FORK.Pipe(duplex=False)
    holder = Child(_hold_lease, cache.name, "counted", counter, started_w, 0.5, "held")
    started_w.close()
    try:
        assert started_r.poll(20), "holder did not start its fetch"

        async def fetch(key):
            _bump(counter)
            return "mine"

        value = asyncio.run(asyncio.wait_for(cache.aget_or_fetch("counted", fetch), 20))
        assert collect([holder], timeout=30) == ["held"]
    finally:
        holder.close()
        started_r.close()
    assert value == "held"
    assert counter.value == 1
    stats = cache.stats()
    assert stats["stampede_timeouts"] == 0
    assert stats["stampede_waits"] == 1
    assert (stats["hits"], stats["misses"]) == (1, 1)   # the holder's miss, our hit after waiting


# --------------------------------------------------------------------------------------
# stats(reset=True), stats_enabled=False


def _some_traffic(name, opts):
    with vela.Cache(name, **opts) as c:
        c.put("p", 1)
        c.get("p")
        c.get("absent")
        c.incr("n")
        c.get_or_fetch("f", lambda k: "fetched")
        c.delete("p")
        c.put_many({"m1": 1, "m2": 2})
        c.get_many(["m1", "zz"])
        return c.stats()


def test_stats_reset_returns_figures_and_zeroes_counters(cache):
    child_stats = run_in_child(_some_traffic, cache.name, {}, timeout=30)
    assert child_stats["hits"] == 2 and child_stats["misses"] == 3
    cache.get("m1")
    figures = cache.stats(reset=True)
    assert figures["hits"] == 3
    assert figures["misses"] == 3
    assert figures["writes"] == 5       # put, incr, fetch result, 2 x put_many
    assert figures["deletes"] == 1
    assert figures["fetches"] == 1
    assert figures["size"] == 4
    after = cache.stats()
    assert {k: after[k] for k in COUNTER_KEYS} == {k: 0 for k in COUNTER_KEYS}
    assert after["hit_ratio"] == 0.0
    assert after["size"] == 4           # the entries stay
    cache.get("m1")
    assert cache.stats()["hits"] == 1
    assert cache.check() == []


def test_stats_disabled_handle_counts_nothing(cache):
    run_in_child(_some_traffic, cache.name, {"stats_enabled": False}, timeout=30)
    stats = cache.stats()
    assert {k: stats[k] for k in COUNTER_KEYS} == {k: 0 for k in COUNTER_KEYS}
    assert stats["size"] == 4
    # in one process too: the disabled handle does not count, this one does
    with vela.Cache(cache.name, stats_enabled=False) as quiet:
        quiet.get("m1")
        quiet.get("absent")
        quiet.put("q", 1)
        quiet.get_or_fetch("g", lambda k: 1)
    stats = cache.stats()
    assert {k: stats[k] for k in COUNTER_KEYS} == {k: 0 for k in COUNTER_KEYS}
    cache.get("m1")
    assert cache.stats()["hits"] == 1
