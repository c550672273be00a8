"""The contract of ``vela.Cache``: every public method, with exact outcomes, on every store.

Stores (tests/stores.py): shm-local, file-local, shm-replicated, file-replicated,
shm-partitioned, file-partitioned (two simulated hosts with real bridges), redis and
redis-near (a real redis-server), and shm-local-objects (shm-local with
``local_objects=True``). Each store is set up once for the module; every
test starts from an empty cache with zeroed counters, as a worker of host A.

Every case runs on every store; where the documented outcome differs by store the
case says so: host B sees host A's writes only where the store spans hosts
(replicated, partitioned, Redis; a local cache is the host's own); concurrent
callers include workers of host B where the API is atomic across hosts
(partitioned, Redis); ``expire()`` is 0 on Redis (Redis reclaims by itself);
``cluster()`` is None without bridges; ``PartialWrite`` is provoked where a batch
spans owners (partitioned); ``release_leases`` counts leases of the host table
(every store but partitioned, whose leases live at the owner's bridge).

``CONTRACT`` maps each public name of ``vela.Cache`` to the tests that exercise it;
``test_every_public_method_has_a_contract_case`` fails when a method is added to
``Cache`` without one (and when the README's API names a method without one).
"""
import asyncio
import math
import os
import re
import signal
import time

import pytest

import vela
from cluster import ROOT, eventually
from conftest import FORK, Child, run_children
from stores import CAPACITY_BYTES, STORE_KINDS, Store, store_fixtures

# ---- the table of contract cases ------------------------------------------------------

CONTRACT = {}


def case(*names):
    """Register the decorated test as the contract case of these public names."""
    def mark(fn):
        for name in names:
            CONTRACT.setdefault(name, []).append(fn.__name__)
        return fn
    return mark


# ---- fixtures -----------------------------------------------------------------------------


redis_server, opened, store = store_fixtures(STORE_KINDS)


def on_b_eventually(store, key, expected, timeout=10.0):
    """Host B reads ``expected`` under ``key`` (None: absent) within ``timeout``."""
    def read(cache):
        eventually(lambda: cache.get(key) == expected, timeout, what=f"host B reads {expected!r} under {key!r}")
        return cache.get(key)
    return store.on_host_b(read)


def destroy_options(store):
    opts = store.options()
    return {k: opts[k] for k in ("backend", "backend_opts") if k in opts}


# ---- reading and writing ---------------------------------------------------------------


VALUES = [b"\x00bytes", "text", 0, -5, 2 ** 63 - 1, 1.5, None, [1, "two"], {"a": (1, 2)}, ("t", b"u")]


@case("get", "__getitem__", "put", "__setitem__")
def test_get_put_and_item_access(store):
    c = store.cache
    for i, value in enumerate(VALUES):
        c.put(("v", i), value)
    for i, value in enumerate(VALUES):
        got = c.get(("v", i), "<absent>")
        assert got == value and type(got) is type(value), (i, value, got)
        assert c[("v", i)] == value
    assert c.get("absent") is None
    assert c.get("absent", "dflt") == "dflt"
    with pytest.raises(KeyError):
        c["absent"]
    c["item"] = {"x": 1}
    assert c["item"] == {"x": 1}
    assert c.ttl("item") is None  # [] = put with the default ttl (None here)
    c.put("item", "overwritten")
    assert c.get("item") == "overwritten"
    c.put(1, "one")  # bool keys are the ints they equal, as in a dict
    assert c.get(True) == "one"
    c.put(False, "zero")
    assert c.get(0) == "zero"
    assert c.get(b"item") is None and c.get(("item",)) is None  # str, bytes, tuple: distinct keys


@case("exists", "__contains__")
def test_exists_and_in(store):
    c = store.cache
    c.put("here", 1)
    c.put("short", 1, ttl=0.2)
    assert c.exists("here") is True and ("here" in c) is True
    assert c.exists("nope") is False and ("nope" in c) is False
    time.sleep(0.4)
    assert c.exists("short") is False and "short" not in c
    st = c.stats()
    assert (st["hits"], st["misses"]) == (0, 0)  # exists counts neither


@case("delete", "__delitem__")
def test_delete_and_del(store):
    c = store.cache
    c.put("a", 1)
    c.put("b", 2)
    assert c.delete("a") is True
    assert c.delete("a") is False
    assert c.get("a") is None
    del c["b"]
    assert "b" not in c
    with pytest.raises(KeyError):
        del c["b"]
    assert c.size() == 0


@case("ttl")
def test_ttl_semantics(store):
    c = store.cache
    c.put("sixty", 1, ttl=60)
    assert 55 < c.ttl("sixty") <= 60
    c.put("never", 1)
    assert c.ttl("never") is None
    c.put("inf", 1, ttl=math.inf)
    assert c.ttl("inf") is None
    with pytest.raises(KeyError):
        c.ttl("absent")
    for bad in (0, -1, -0.5, float("nan")):
        with pytest.raises(ValueError):
            c.put("bad-ttl", 1, ttl=bad)
    assert "bad-ttl" not in c
    c.put("short", "v", ttl=0.3)
    assert 0 < c.ttl("short") <= 0.3
    time.sleep(0.5)
    assert c.get("short") is None
    with pytest.raises(KeyError):
        c.ttl("short")
    # default_ttl is per handle; ttl=math.inf overrides it, ttl=None takes it
    h = store.open(default_ttl=30)
    try:
        h.put("dflt", 1)
        assert 25 < h.ttl("dflt") <= 30
        assert 25 < c.ttl("dflt") <= 30  # the entry carries it, whoever reads it
        h.put("forever", 1, ttl=math.inf)
        assert h.ttl("forever") is None
        h.put("own", 1, ttl=5)
        assert 0 < h.ttl("own") <= 5
        h["item"] = 1
        assert 25 < h.ttl("item") <= 30
    finally:
        h.close()


@case("touch")
def test_touch(store):
    c = store.cache
    c.put("t", "v", ttl=1)
    assert c.touch("t", ttl=100) is True
    assert 95 < c.ttl("t") <= 100
    assert c.touch("t", ttl=math.inf) is True
    assert c.ttl("t") is None
    assert c.touch("absent", ttl=10) is False
    assert "absent" not in c
    with pytest.raises(ValueError):
        c.touch("t", ttl=0)
    assert c.get("t") == "v"
    c.put("tagged", "w", ttl=100, tags=["touched"])
    assert c.touch("tagged", ttl=200) is True
    assert 195 < c.ttl("tagged") <= 200
    assert c.invalidate_tag("touched") == 1  # the entry kept its tags
    c.put("short", "v", ttl=0.2)
    time.sleep(0.4)
    assert c.touch("short", ttl=100) is False  # an expired entry is absent, and stays so
    assert "short" not in c


@case("incr", "decr")
def test_incr_and_decr(store):
    c = store.cache
    assert c.incr("n") == 1  # a missing key starts at 0
    assert c.incr("n", 5) == 6
    assert c.decr("n", 2) == 4
    assert c.decr("n") == 3
    assert c.get("n") == 3 and type(c.get("n")) is int
    assert c.ttl("n") is None
    assert c.decr("m", 3) == -3
    assert c.incr("with-ttl", 1, ttl=100) == 1  # a missing key takes the ttl
    assert 95 < c.ttl("with-ttl") <= 100
    c.put("counter", 10, ttl=200)
    assert c.incr("counter", 1, ttl=5) == 11  # an existing counter keeps its expiry
    assert 195 < c.ttl("counter") <= 200
    c.put("text", "abc")
    with pytest.raises(TypeError):
        c.incr("text")
    assert c.get("text") == "abc"
    with pytest.raises(TypeError):
        c.incr("n", 1.5)
    with pytest.raises(TypeError):
        c.incr("n", "1")
    assert c.get("n") == 3


def _incr_worker(cache, key, times):
    return [cache.incr(key) for _ in range(times)]


@case("incr")
def test_incr_is_atomic_across_processes(store):
    args = [store.worker_args("A", _incr_worker, "hits", 100) for _ in range(4)]
    if store.topology == "partitioned" or store.backend == "redis":  # atomic at the owner / in Redis
        args += [store.worker_args("B", _incr_worker, "hits", 100) for _ in range(2)]
    results = run_children(Store.run_worker, args, timeout=120)
    seen = sorted(n for r in results for n in r)
    assert seen == list(range(1, 100 * len(args) + 1))  # every increment saw its own value
    assert store.cache.get("hits") == 100 * len(args)


@case("get_or_fetch")
def test_get_or_fetch(store):
    c = store.cache
    calls = []

    def fetch(key):
        calls.append(key)
        return {"for": key}

    assert c.get_or_fetch("f", fetch, ttl=60, tags=["ft"]) == {"for": "f"}
    assert c.get_or_fetch("f", fetch) == {"for": "f"}
    assert calls == ["f"]
    assert c.get("f") == {"for": "f"}
    assert 55 < c.ttl("f") <= 60
    with pytest.raises(ZeroDivisionError):
        c.get_or_fetch("boom", lambda k: 1 / 0)
    assert "boom" not in c
    assert c.get_or_fetch("boom", lambda k: "ok") == "ok"  # the failed fetch left no lease behind
    assert c.invalidate_tag("ft") == 1
    assert "f" not in c
    st = c.stats()
    assert (st["hits"], st["misses"], st["fetches"], st["writes"]) == (2, 3, 2, 2)


def _stampede_worker(cache, key, start_at):
    time.sleep(max(0.0, start_at - time.time()))
    fetched = []

    def fetch(k):
        fetched.append(k)
        time.sleep(0.5)
        return "fetched-once"

    return cache.get_or_fetch(key, fetch), len(fetched)


@case("get_or_fetch")
def test_get_or_fetch_stampede_one_fetch_across_processes(store):
    start_at = time.time() + 1.0
    args = [store.worker_args("A", _stampede_worker, "stampede", start_at) for _ in range(4)]
    if store.topology == "partitioned" or store.backend == "redis":  # one fetch in the whole cluster
        args.append(store.worker_args("B", _stampede_worker, "stampede", start_at))
    results = run_children(Store.run_worker, args, timeout=60)
    assert [value for value, _ in results] == ["fetched-once"] * len(args)
    assert sum(n for _, n in results) == 1, results
    assert store.cache.get("stampede") == "fetched-once"


@case("aget_or_fetch")
def test_aget_or_fetch(store):
    c = store.cache
    calls = []

    async def fetch(key):
        calls.append(key)
        await asyncio.sleep(0.01)
        return key.upper()

    async def main():
        first = await c.aget_or_fetch("af", fetch, ttl=60, tags=["at"])
        again = await c.aget_or_fetch("af", fetch)
        plain = await c.aget_or_fetch("plain", lambda k: k * 2)  # a plain function works too
        return first, again, plain

    assert asyncio.run(main()) == ("AF", "AF", "plainplain")
    assert calls == ["af"]
    assert c.get("af") == "AF" and c.get("plain") == "plainplain"
    assert 55 < c.ttl("af") <= 60

    async def failing():
        return await c.aget_or_fetch("abad", lambda k: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(failing())
    assert "abad" not in c
    assert asyncio.run(c.aget_or_fetch("abad", fetch)) == "ABAD"


@case("aget", "aput", "adelete", "aexists", "aget_many", "aput_many", "ainvalidate_tag", "aflush")
def test_async_api(store):
    """The asyncio twins of get/put/...; tests/test_async.py has the full cases (every
    store, the loop never blocked, cancellation)."""
    c = store.cache

    async def main():
        await c.aput("a1", "one", tags=["at"])
        await c.aput_many({"a2": 2, "a3": 3})
        seen = (await c.aget("a1"), await c.aget("none", "dflt"), await c.aexists("a2"),
                await c.aget_many(["a2", "a3", "none"]))
        return seen, await c.adelete("a2"), await c.ainvalidate_tag("at"), await c.aflush()

    assert asyncio.run(main()) == (("one", "dflt", True, {"a2": 2, "a3": 3}), True, 1, 1)
    assert c.size() == 0


@case("memoize")
def test_memoize(store):
    c = store.cache
    calls = []

    @c.memoize(ttl=60, tags=["memo"])
    def square(n, *, plus=0):
        calls.append((n, plus))
        return n * n + plus

    assert [square(3), square(3), square(4), square(3, plus=1), square(3, plus=1)] == [9, 9, 16, 10, 10]
    assert calls == [(3, 0), (4, 0), (3, 1)]
    assert square.__name__ == "square"
    key = square.cache_key(3)
    assert c.get(key) == 9
    assert 55 < c.ttl(key) <= 60
    assert c.invalidate_tag("memo") == 3
    assert square(3) == 9 and calls[-1] == (3, 0)

    @c.memoize(key=lambda user: ("user", user))
    def load(user):
        return f"profile of {user}"

    assert load("ann") == "profile of ann"
    assert c.get(("user", "ann")) == "profile of ann"


def _try_lock(cache, name):
    """Another process: whether it could take the lock (released again at once)."""
    lock = cache.lock(name, timeout=0)
    if not lock.acquire():
        return False
    lock.release()
    return True


@case("lock")
def test_lock(store):
    c = store.cache
    with c.lock("job", ttl=30, timeout=0) as lock:
        assert lock.held and lock.locked()
        assert store.on_host_a(_try_lock, "job") is False
        if store.topology == "partitioned" or store.backend == "redis":  # one lock for every host
            assert store.on_host_b(_try_lock, "job") is False
        elif not store.spans_hosts:  # a local cache is the host's own
            assert store.on_host_b(_try_lock, "job") is True
        with pytest.raises(vela.LockTimeout):
            with c.lock("job", timeout=0.05):
                pass
    assert not lock.locked()
    assert store.on_host_a(_try_lock, "job") is True


def _allow(cache, name, rate, times):
    throttle = cache.throttle(name, rate, per=600)
    return [throttle.allow() for _ in range(times)]


@case("throttle")
def test_throttle(store):
    c = store.cache
    assert _allow(c, "api", 3, 2) == [True, True]
    assert store.on_host_a(_allow, "api", 3, 2) == [True, False]
    if store.topology == "partitioned" or store.backend == "redis":
        assert store.on_host_b(_allow, "api", 3, 1) == [False]
    elif not store.spans_hosts:
        assert store.on_host_b(_allow_then_flush, "api", 3, 4) == [True, True, True, False]
    assert c.throttle("api", 3, per=600).used() == 3


def _allow_then_flush(cache, name, rate, times):
    """Host B of a local store (its own cache): the counts, then its cache empty again."""
    try:
        return _allow(cache, name, rate, times)
    finally:
        cache.flush()


# ---- batches ---------------------------------------------------------------------------


@case("get_many", "put_many", "delete_many")
def test_batches(store):
    c = store.cache
    keys = [f"b{i}" for i in range(40)]
    assert c.put_many({k: i for i, k in enumerate(keys)}, ttl=60, tags=["batch"]) is None
    c.put_many([("p1", b"x"), (("p", 2), "y")])  # (key, value) pairs work too
    assert c.get_many(keys + ["zz"]) == {k: i for i, k in enumerate(keys)}
    assert c.get_many([]) == {}
    assert c.get_many(["p1", ("p", 2), "zz"]) == {"p1": b"x", ("p", 2): "y"}
    assert 55 < c.ttl("b7") <= 60
    assert c.ttl("p1") is None
    assert c.size() == 42
    assert c.delete_many(keys[:10] + ["zz", "zz2"]) == 10
    assert c.delete_many(keys[:10]) == 0
    assert c.get_many(keys[:12]) == {"b10": 10, "b11": 11}
    assert c.invalidate_tag("batch") == 30
    assert c.size() == 2


@case("put_many")
def test_put_many_with_a_bad_item_stores_nothing(store):
    c = store.cache
    c.put("kept", "old")
    with pytest.raises(TypeError):
        c.put_many([("kept", "new"), ("fresh", 1), (1.5, "float key")])
    with pytest.raises(ValueError):
        c.put_many({"kept": "new", "fresh": 1}, tags=[""])
    with pytest.raises(vela.ValueTooLarge):
        c.put_many({"kept": "new", "fresh": 1, "huge": b"x" * (CAPACITY_BYTES // 64 + 1)})
    assert c.get("kept") == "old"
    assert c.get_many(["fresh", "huge"]) == {}
    assert c.size() == 1


def _owner(view, key):
    """The owner of ``key`` by the partition table (README: xxh3_64 of the encoded key)."""
    import xxhash

    from vela import _native

    return view["owners"][xxhash.xxh3_64_intdigest(_native.encode_key(key)) % view["partitions"]]


@case("put_many")
def test_put_many_across_owners_says_which_keys_were_stored(store):
    """Where a batch spans owners, a failure raises vela.PartialWrite naming the keys
    stored and the keys not stored (partitioned: host B's bridge does not answer)."""
    assert issubclass(vela.PartialWrite, vela.VelaError)
    if store.topology != "partitioned":
        return  # one host holds every key: all or nothing (test_put_many_with_a_bad_item_stores_nothing)
    view = store.cache.cluster()
    keys = [f"pw{i}" for i in range(30)]
    mine = {k for k in keys if _owner(view, k) == 1}
    theirs = set(keys) - mine
    assert mine and theirs
    host_b = store.cluster.hosts[1]
    with store.open(topology_opts={"timeout": 0.5}) as h:
        host_b.pause()
        try:
            with pytest.raises(vela.PartialWrite) as raised:
                h.put_many({k: k for k in keys})
        finally:
            host_b.resume()
    assert set(raised.value.stored) == mine
    assert set(raised.value.failed) == theirs
    assert store.cache.get_many(sorted(mine)) == {k: k for k in mine}


# ---- add -----------------------------------------------------------------------------------


@case("add")
def test_add(store):
    c = store.cache
    assert c.add("a", "first", ttl=60, tags=["added"]) is True
    assert c.get("a") == "first"
    assert 55 < c.ttl("a") <= 60
    assert c.add("a", "second") is False
    assert c.get("a") == "first"
    assert 55 < c.ttl("a") <= 60  # unchanged, ttl too
    c.put("short", "old", ttl=0.2)
    time.sleep(0.4)
    assert c.add("short", "new") is True  # an expired entry is absent
    assert c.get("short") == "new"
    assert c.invalidate_tag("added") == 1
    assert c.add("a", "third") is True
    assert c.get("a") == "third"
    with pytest.raises(TypeError):
        c.add(1.5, "x")
    with pytest.raises(ValueError):
        c.add("bad-tag", "x", tags=["x" * 256])
    assert "bad-tag" not in c
    assert c.stats()["writes"] == 4  # one put and the three adds that stored


def _add_worker(cache, key, value, start_at):
    time.sleep(max(0.0, start_at - time.time()))
    return cache.add(key, value)


@case("add")
def test_add_concurrent_exactly_one_wins(store):
    start_at = time.time() + 1.0
    args = [store.worker_args("A", _add_worker, "race", f"a{i}", start_at) for i in range(4)]
    if store.topology == "partitioned" or store.backend == "redis":  # atomic across hosts too
        args += [store.worker_args("B", _add_worker, "race", f"b{i}", start_at) for i in range(2)]
    results = run_children(Store.run_worker, args, timeout=60)
    assert results.count(True) == 1, results
    winner = ["a0", "a1", "a2", "a3", "b0", "b1"][results.index(True)]
    assert store.cache.get("race") == winner


@case("replace")
def test_replace(store):
    c = store.cache
    assert c.replace("r", "x") is False  # absent: nothing stored
    assert "r" not in c
    c.put("r", "old", ttl=60, tags=["before"])
    assert c.replace("r", "new", ttl=100, tags=["after"]) is True
    assert c.get("r") == "new"
    assert 95 < c.ttl("r") <= 100  # the replacement's ttl
    assert c.invalidate_tag("before") == 0  # and its tags
    assert c.invalidate_tag("after") == 1
    assert c.replace("r", "again") is False  # invalidated: absent
    c.put("short", "old", ttl=0.2)
    time.sleep(0.4)
    assert c.replace("short", "new") is False  # an expired entry is absent
    assert "short" not in c
    c.put("n", 1)
    assert c.replace("n", 2) is True
    assert c.incr("n") == 3  # an int stays an int
    with pytest.raises(TypeError):
        c.replace(1.5, "x")
    with pytest.raises(ValueError):
        c.replace("n", "x", tags=[""])
    assert c.get("n") == 3
    assert c.stats()["writes"] == 6  # three puts, two replaces that stored, one incr


@case("cas")
def test_cas(store):
    c = store.cache
    assert c.cas("k", None, "v") is False  # absent: no value equals, not even None
    assert "k" not in c
    c.put("k", {"n": 1, "l": [1, 2]}, ttl=60, tags=["cas"])
    assert c.cas("k", {"n": 2, "l": [1, 2]}, "lost") is False  # mismatch
    assert c.get("k") == {"n": 1, "l": [1, 2]}
    assert 55 < c.ttl("k") <= 60  # untouched
    assert c.cas("k", {"n": 1, "l": [1, 2]}, {"n": 2}, ttl=100) is True
    assert c.get("k") == {"n": 2}
    assert 95 < c.ttl("k") <= 100  # the new value's ttl
    assert c.cas("k", {"n": 1, "l": [1, 2]}, "late") is False  # the old value no longer matches
    assert c.invalidate_tag("cas") == 1  # the entry kept its tags
    assert c.cas("k", {"n": 2}, "gone") is False
    # values compare as stored: bytes, str and int are not pickled, so 1 is not "1" nor b"1"
    c.put("i", 1)
    assert c.cas("i", "1", 2) is False
    assert c.cas("i", b"1", 2) is False
    if store.spans_hosts:  # host B reads (and keeps an L1 copy, near caches): the cas reaches it
        assert on_b_eventually(store, "i", 1) == 1
    assert c.cas("i", 1, "two") is True
    assert c.cas("i", "two", b"three") is True
    assert c.get("i") == b"three"
    if store.spans_hosts:
        assert on_b_eventually(store, "i", b"three") == b"three"
    c.put("none", None)
    assert c.cas("none", None, 0) is True
    assert c.incr("none") == 1  # a cas-stored int is a counter
    c.put("short", "v", ttl=0.2)
    time.sleep(0.4)
    assert c.cas("short", "v", "w") is False  # an expired entry is absent
    assert "short" not in c
    with pytest.raises(TypeError):
        c.cas(1.5, 1, 2)
    with pytest.raises(ValueError):
        c.cas("i", b"three", "x", ttl=0)
    with pytest.raises(vela.ValueTooLarge):
        c.cas("i", b"three", b"x" * (CAPACITY_BYTES // 64 + 1))
    assert c.get("i") == b"three"
    assert c.stats()["writes"] == 9  # four puts, four cas that stored, one incr


def _cas_increment_worker(cache, key, times):
    """Add 1 to the int under ``key`` ``times`` times with a get/cas loop; the attempts made."""
    attempts = 0
    for _ in range(times):
        while True:
            attempts += 1
            seen = cache.get(key)
            os.sched_yield()  # let the other loops read the same value meanwhile: they collide
            if cache.cas(key, seen, seen + 1):
                break
    return attempts


@case("cas")
def test_cas_increments_of_many_processes_lose_no_update(store):
    store.cache.put("ctr", 0)
    args = [store.worker_args("A", _cas_increment_worker, "ctr", 50) for _ in range(4)]
    if store.topology == "partitioned" or store.backend == "redis":  # decided at the owner / in Redis
        args += [store.worker_args("B", _cas_increment_worker, "ctr", 50) for _ in range(2)]
    results = run_children(Store.run_worker, args, timeout=180)
    assert store.cache.get("ctr") == 50 * len(args)
    assert all(attempts >= 50 for attempts in results)


@case("incr", "decr")
def test_incr_and_decr_with_an_initial_value(store):
    c = store.cache
    assert c.incr("n", 5, initial=10) == 15  # a missing key starts at initial
    assert c.incr("n", 1, initial=1000) == 16  # an existing counter ignores it
    assert c.decr("d", 2, initial=100) == 98
    assert c.decr("d", initial=-7) == 97
    assert c.incr("z", 0, initial=-3) == -3
    assert c.get("z") == -3
    assert c.incr("t", 1, ttl=100, initial=41) == 42  # a missing key takes the ttl
    assert 95 < c.ttl("t") <= 100
    assert c.incr("t", 1, ttl=5, initial=0) == 43  # an existing counter keeps its expiry
    assert 95 < c.ttl("t") <= 100
    assert c.ttl("n") is None
    with pytest.raises(OverflowError):
        c.incr("o", 1, initial=2 ** 63 - 1)  # the result leaves int64: nothing is stored
    assert "o" not in c
    with pytest.raises(OverflowError):
        c.incr("o", 1, initial=2 ** 63)
    with pytest.raises(TypeError):
        c.incr("o", 1, initial=1.5)
    with pytest.raises(TypeError):
        c.incr("o", 1, initial=True)
    with pytest.raises(TypeError):
        c.incr("o", 1, 10, 5)  # initial is keyword-only
    assert "o" not in c
    assert c.stats()["writes"] == 7


# ---- tags, flush, counts -----------------------------------------------------------------


def _wait_b_has(store, key, value):
    """Replicated: until host B holds ``key`` (writes travel in order: the earlier ones too)."""
    if store.topology == "replicated":
        on_b_eventually(store, key, value, timeout=15)


@case("invalidate_tag")
def test_invalidate_tag_counts_distinct_live_keys(store):
    c = store.cache
    for i in range(30):
        c.put(f"t{i}", i, tags=["t"] + (["u"] if i < 10 else []))
    c.put("u-only", 1, tags=["u"])
    c.put("gone", 1, tags=["t"])
    c.delete("gone")  # deleted (a tombstone where deletes leave one): not counted
    c.put("expired", 1, tags=["t"], ttl=0.2)
    time.sleep(0.4)
    _wait_b_has(store, "u-only", 1)  # every host holds the entries: a sum over hosts would show
    assert c.invalidate_tag("t") == 30
    assert c.invalidate_tag("t") == 0
    assert c.get_many([f"t{i}" for i in range(30)]) == {}
    assert c.invalidate_tag("u") == 1
    assert c.invalidate_tag("never-used") == 0
    assert c.size() == 0
    if store.spans_hosts:
        on_b_eventually(store, "t3", None)
    with pytest.raises(ValueError):
        c.invalidate_tag("")
    with pytest.raises(ValueError):
        c.invalidate_tag("x" * 256)


@case("flush")
def test_flush_counts_distinct_live_keys(store):
    c = store.cache
    c.put_many({f"f{i}": i for i in range(25)})
    c.put("gone", 1)
    c.delete("gone")
    _wait_b_has(store, "f24", 24)
    assert c.flush() == 25
    assert c.flush() == 0
    assert c.size() == 0 and len(c) == 0
    if store.spans_hosts:
        on_b_eventually(store, "f1", None)
        assert store.on_host_b(lambda cache: cache.size()) == 0


@case("size", "__len__")
def test_size_and_len(store):
    c = store.cache
    assert c.size() == 0 and len(c) == 0
    for i in range(12):
        c.put(("s", i), i)
    assert c.size() == 12 and len(c) == 12
    c.put(("s", 0), "again")
    assert c.size() == 12
    c.delete(("s", 1))
    assert c.size() == 11 and len(c) == 11
    assert c.stats()["size"] == 11


# ---- stats ------------------------------------------------------------------------------------


@case("stats")
def test_stats_count_as_documented(store):
    c = store.cache
    c.put("a", 1)
    c.put("b", 2)                                   # writes 2
    assert c.get("a") == 1                          # hit
    assert c.get("zz") is None                      # miss
    assert c["a"] == 1                              # hit
    with pytest.raises(KeyError):
        c["zz"]                                     # miss
    assert c.exists("a") and not c.exists("zz")     # not counted
    assert c.get_many(["a", "b", "zz"]) == {"a": 1, "b": 2}  # 2 hits, 1 miss
    assert c.delete("a") is True                    # deletes 1
    assert c.delete_many(["b"]) == 1                # deletes 2
    c.put_many({"c": 1, "d": 2})                    # writes 4
    assert c.incr("n") == 1                         # writes 5
    assert c.get_or_fetch("f", lambda k: 7) == 7    # miss, fetch, writes 6
    assert c.get_or_fetch("f", lambda k: 8) == 7    # hit
    st = c.stats()
    got = {k: st[k] for k in ("hits", "misses", "writes", "deletes", "fetches")}
    assert got == {"hits": 5, "misses": 4, "writes": 6, "deletes": 2, "fetches": 1}
    assert st["size"] == 4
    assert st["hit_ratio"] == pytest.approx(5 / 9)
    for name in ("evictions", "expirations", "invalidations", "stampede_waits", "stampede_timeouts",
                 "lock_recoveries", "memory_used", "capacity"):
        assert isinstance(st[name], int), name
    # stats(reset=True) returns the counters, then zeroes them
    assert c.stats(reset=True)["hits"] == 5
    after = c.stats()
    assert (after["hits"], after["misses"], after["writes"], after["deletes"]) == (0, 0, 0, 0)
    assert after["size"] == 4  # the entries stay


@case("reset_stats")
def test_reset_stats(store):
    c = store.cache
    c.put("a", 1)
    c.get("a")
    c.get("b")
    assert c.reset_stats() is None
    st = c.stats()
    assert (st["hits"], st["misses"], st["writes"]) == (0, 0, 0)
    assert c.get("a") == 1


@case("stats")
def test_stats_are_shared_by_the_processes_of_the_host(store):
    def reads(cache):
        return [cache.get("shared"), cache.get("absent")]

    store.cache.put("shared", 1)
    assert store.on_host_a(reads) == [1, None]
    st = store.cache.stats()
    assert (st["hits"], st["misses"]) == (1, 1)


# ---- expiry and maintenance ------------------------------------------------------------------


@case("expire")
def test_expire(store):
    c = store.cache
    c.put("e1", 1, ttl=0.2)
    c.put("e2", 1, ttl=0.2)
    c.put("keep", 1)
    time.sleep(0.4)
    # Redis reclaims expired entries itself (never counted by size()): expire() says 0
    assert c.expire() == (0 if store.backend == "redis" else 2)
    assert c.expire() == 0
    assert c.size() == 1
    assert c.get_many(["e1", "e2", "keep"]) == {"keep": 1}


@case("info")
def test_info(store):
    info = store.cache.info()
    assert isinstance(info, dict)
    assert info["capacity"] == CAPACITY_BYTES
    assert info["max_entry_size"] == CAPACITY_BYTES // 64


@case("check")
def test_check(store):
    c = store.cache
    c.put_many({f"c{i}": "x" * i for i in range(50)}, tags=["chk"])
    c.invalidate_tag("chk")
    c.put("after", 1)
    assert c.check() == []


@case("cluster")
def test_cluster(store):
    view = store.cache.cluster()
    if not store.bridged:
        assert view is None
        return
    assert view["node_id"] == 1  # host A; members: the others
    assert {m["node_id"]: m["state"] for m in view["members"]} == {2: "alive"}


def _hold_lease(cache, key, started_conn):
    def never_ending(_key):
        started_conn.send("started")
        time.sleep(600)

    cache.get_or_fetch(key, never_ending)


@case("release_leases")
def test_release_leases(store):
    c = store.cache
    assert c.release_leases(os.getpid()) == 0  # this process holds none
    recv, send = FORK.Pipe(duplex=False)
    holder = Child(Store.run_worker, *store.worker_args("A", _hold_lease, "leased", send))
    try:
        assert recv.poll(30), "the holder did not start its fetch"
        assert recv.recv() == "started"
        os.kill(holder.pid, signal.SIGSTOP)  # alive but stuck: only release_leases frees its lease
        if store.topology != "partitioned":  # the lease is in this host's table
            assert c.release_leases(holder.pid) == 1
            assert c.release_leases(holder.pid) == 0
        # a lease kept elsewhere (Redis, the owner's bridge) ends by stampede_timeout at most
        with store.open(stampede_timeout=1.0) as h:
            assert h.get_or_fetch("leased", lambda k: "ours") == "ours"
        assert c.get("leased") == "ours"
    finally:
        try:
            os.kill(holder.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        holder.close()
        recv.close()


# ---- lifetime ------------------------------------------------------------------------------------


@case("close", "closed", "__enter__", "__exit__")
def test_close_and_context_manager(store):
    with store.open() as h:
        assert h.closed is False
        h.put("written-by-h", 1)
    assert h.closed is True
    for call in (lambda: h.get("written-by-h"), lambda: h.put("x", 1), lambda: h.size()):
        with pytest.raises(vela.CacheClosed):
            call()
    h.close()  # a second close does nothing
    assert store.cache.get("written-by-h") == 1  # the data stays for the other handles
    assert store.cache.closed is False


@case("flush_to_disk")
def test_flush_to_disk(store):
    c = store.cache
    c.put("durable", "yes")
    assert c.flush_to_disk() is None
    if store.backend == "file":
        # (partitioned: the key is in its owner's file, issue 14: each key on one owner)
        host = "AB"[_owner(c.cluster(), "durable") - 1] if store.topology == "partitioned" else "A"
        path = os.path.join(store.data_dir(host), f"{store.name}.vela")
        with open(path, "rb") as f:
            assert b"durable" in f.read()


# ---- validation ----------------------------------------------------------------------------------


GOOD_TAG_SETS = [["x" * 255], ["é" * 127], [f"t{i}" for i in range(32)], ["same"] * 33,
                 [f"t{i}" for i in range(32)] + ["t0", "t31"]]
BAD_TAG_SETS = [[""], ["x" * 256], ["é" * 128], [f"t{i}" for i in range(33)], ["ok", ""]]


def _tagged_writes(c, key, tags):
    """Every call that takes tags, writing ``key``."""
    return [lambda: c.put(key, 1, tags=tags),
            lambda: c.put_many({key: 1}, tags=tags),
            lambda: c.add(key, 1, tags=tags),
            lambda: c.get_or_fetch(key, lambda k: 1, tags=tags)]


@case("put")
def test_tag_limits_are_the_same_on_every_store(store):
    c = store.cache
    for tags in BAD_TAG_SETS:
        for call in _tagged_writes(c, "bad", tags):
            with pytest.raises(ValueError):
                call()
            assert "bad" not in c, tags
    for i, tags in enumerate(GOOD_TAG_SETS):
        for j in range(4):
            _tagged_writes(c, ("good", i, j), tags)[j]()
            assert c.get(("good", i, j)) == 1
        assert c.invalidate_tag(tags[0]) == 4  # duplicates count once: one entry each
    assert c.size() == 0


BAD_KEYS = [1.5, None, [1], {"a": 1}, object(), ("ok", 2.5), {1, 2}]


@case("get", "put", "delete", "exists", "ttl", "touch", "incr", "add", "replace", "cas", "get_many", "put_many",
      "delete_many", "get_or_fetch")
def test_bad_keys_raise_type_error(store):
    c = store.cache
    for key in BAD_KEYS:
        calls = [lambda: c.get(key), lambda: c.put(key, 1), lambda: c.delete(key), lambda: c.exists(key),
                 lambda: key in c, lambda: c[key], lambda: c.ttl(key), lambda: c.touch(key),
                 lambda: c.incr(key), lambda: c.add(key, 1), lambda: c.replace(key, 1),
                 lambda: c.cas(key, 1, 2), lambda: c.get_many([key]),
                 lambda: c.put_many([(key, 1)]), lambda: c.delete_many([key]),
                 lambda: c.get_or_fetch(key, lambda k: 1)]
        for i, call in enumerate(calls):
            with pytest.raises(TypeError):
                call()
    assert c.size() == 0


@case("put", "get")
def test_keys_longer_than_1_kib_raise_value_error(store):
    c = store.cache
    c.put("k" * 1000, "fits")
    assert c.get("k" * 1000) == "fits"
    long_key = "k" * 1025
    for call in (lambda: c.put(long_key, 1), lambda: c.get(long_key), lambda: c.delete(long_key),
                 lambda: c.exists(long_key), lambda: c.add(long_key, 1), lambda: c.put_many({long_key: 1}),
                 lambda: c.incr(long_key), lambda: c.replace(long_key, 1), lambda: c.cas(long_key, 1, 2),
                 lambda: c.get_or_fetch(long_key, lambda k: 1)):
        with pytest.raises(ValueError):
            call()
    assert c.size() == 1


@case("put")
def test_value_too_large(store):
    c = store.cache
    c.put("big", b"x" * (CAPACITY_BYTES // 64 - 2048))  # within max_entry_size
    assert len(c.get("big")) == CAPACITY_BYTES // 64 - 2048
    with pytest.raises(vela.ValueTooLarge):
        c.put("big", b"x" * (CAPACITY_BYTES // 64 + 1))
    assert len(c.get("big")) == CAPACITY_BYTES // 64 - 2048  # unchanged
    with pytest.raises(ValueError):  # ValueTooLarge is a ValueError
        c.add("huge", b"x" * (CAPACITY_BYTES // 64 + 1))
    assert "huge" not in c


# ---- options, adoption, telemetry ---------------------------------------------------------------


def test_bad_options_raise_option_error_naming_the_option(store):
    for extra, named in (({"bogus_option": 1}, "bogus_option"), ({"default_ttl": -1}, "default_ttl"),
                         ({"stampede_timeout": 0}, "stampede_timeout"), ({"serializer": "yaml"}, "serializer"),
                         ({"eviction_policy": "fifo"}, "eviction_policy")):
        with pytest.raises(vela.OptionError) as raised:
            store.open(**extra)
        assert named in str(raised.value), (extra, str(raised.value))
    assert store.cache.size() == 0 and store.cache.check() == []


def _minimal_options(store):
    """What a worker must give to reach the store: the name, and where the table is
    (file: its data_dir; Redis: its URL). Topology and layout are adopted."""
    opts = {"name": store.name, "sweep_interval": None}
    full = store.options()
    for k in ("backend", "backend_opts", "near_cache"):
        if k in full:
            opts[k] = full[k]
    return opts


@case("put", "flush", "size")
def test_a_handle_that_omits_the_segment_options_behaves_the_same(store):
    """Issue 14, item 1: the store comes from what the segment records, so a handle
    opened by name alone routes, replicates and counts like one given every option."""
    with vela.Cache(**_minimal_options(store)) as adopted:
        adopted.put_many({f"ad{i}": i for i in range(20)})
        adopted.put("adopted", "yes")
        assert adopted.size() == 21
        assert store.cache.get_many([f"ad{i}" for i in range(20)]) == {f"ad{i}": i for i in range(20)}
        if store.spans_hosts:
            assert on_b_eventually(store, "adopted", "yes") == "yes"
            assert store.on_host_b(lambda cache: cache.get_many([f"ad{i}" for i in range(20)])) == {
                f"ad{i}": i for i in range(20)}
        if store.topology == "replicated":
            _wait_b_has(store, "adopted", "yes")
        assert adopted.flush() == 21
    assert store.cache.size() == 0


def _telemetry_trace(c):
    seen = []

    def handler(event, measurements, metadata):
        op = event[-2]
        seen.append((op, metadata.get("key"), metadata.get("keys"),
                     metadata.get("result") if op in ("get", "fetch") and "key" in metadata else None,
                     measurements.get("count")))
        assert event == ("vela", "cache", op, "stop") and isinstance(measurements["duration"], int)
        assert metadata["cache"] == c.name

    events = [("vela", "cache", op, "stop") for op in ("get", "put", "delete", "fetch", "invalidate_tag", "flush")]
    vela.telemetry.attach("contract-trace", events, handler)
    try:
        c.put("a", 1)
        c.get("a")
        c.get("zz")
        c.delete("a")
        c.get_or_fetch("f", lambda k: 1)
        c.get_or_fetch("f", lambda k: 2)
        c.put_many({"b": 1, "c": 2})
        c.get_many(["b", "zz"])
        c.delete_many(["b"])
        c.put("t", 1, tags=["x"])
        c.invalidate_tag("x")
        c.flush()
    finally:
        vela.telemetry.detach("contract-trace")
    return seen


@case("get", "put", "delete", "get_or_fetch", "get_many", "put_many", "delete_many", "invalidate_tag", "flush")
def test_telemetry_events_are_the_same_on_every_store(store):
    assert _telemetry_trace(store.cache) == [
        ("put", "a", None, None, None),
        ("get", "a", None, "hit", None),
        ("get", "zz", None, "miss", None),
        ("delete", "a", None, None, None),
        ("fetch", "f", None, "fetched", None),
        ("fetch", "f", None, "hit", None),
        ("put", None, 2, None, None),
        ("get", None, 2, None, None),
        ("delete", None, 1, None, None),
        ("put", "t", None, None, None),
        ("invalidate_tag", None, None, None, 1),
        ("flush", None, None, None, 2),
    ]


# ---- two hosts ---------------------------------------------------------------------------------


@case("get", "put", "delete")
def test_second_host_reads_the_writes_of_the_first(store):
    c = store.cache
    c.put("shared", {"from": "A"}, tags=["cross"])
    c.put_many({"m1": 1, "m2": 2})
    if not store.spans_hosts:  # a local cache is the host's own: host B has another one
        assert store.on_host_b(lambda cache: [cache.get("shared"), cache.size()]) == [None, 0]
        return
    assert on_b_eventually(store, "shared", {"from": "A"}) == {"from": "A"}
    assert on_b_eventually(store, "m2", 2) == 2
    c.put("shared", "second", tags=["cross"])
    assert on_b_eventually(store, "shared", "second") == "second"
    assert c.invalidate_tag("cross") == 1
    assert on_b_eventually(store, "shared", None) is None
    c.delete("m1")
    assert on_b_eventually(store, "m1", None) is None
    # and the other way round: a write on B reads on A
    store.on_host_b(lambda cache: cache.put("from-b", "B"))
    eventually(lambda: c.get("from-b") == "B", 10, what="host A reads the write of host B")


# ---- destroy (last: it removes the store's segment on host A) ----------------------------------


@case("destroy")
def test_destroy(store):
    h = store.open()
    h.put("doomed", 1)
    assert h.destroy() is True
    assert h.closed is True
    with pytest.raises(vela.CacheClosed):
        h.get("doomed")
    if not store.near:
        # already gone (with the near cache, the listener of the store's other handle,
        # still open on this host, registers the host again at its next heartbeat)
        assert vela.destroy(store.name, **destroy_options(store)) is False
    if store.topology == "partitioned":
        return  # the key's owner may be host B, which keeps its table
    fresh = store.open(**({"topology": "local", "topology_opts": {}} if store.bridged else {}))
    try:
        assert fresh.get("doomed") is None
        assert fresh.size() == 0
    finally:
        fresh.destroy()


# ---- the table covers every public method ----------------------------------------------------------


def _readme_api_methods():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Using Vela", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"\bcache\.([a-z_]+)\(", section)) | set(re.findall(r"@cache\.([a-z_]+)", section))


def test_every_public_method_has_a_contract_case():
    public = {name for name in dir(vela.Cache) if not name.startswith("_")}
    missing = sorted(public - set(CONTRACT))
    assert not missing, f"public methods of vela.Cache without a contract case: {missing}"
    missing_readme = sorted(_readme_api_methods() - set(CONTRACT))
    assert not missing_readme, f"methods of the README's API without a contract case: {missing_readme}"
    # the cases named in the table exist in this module
    names = set(globals())
    assert all(t in names for tests in CONTRACT.values() for t in tests)
    assert "add" in public  # store-if-absent is part of the API (issue 14)
