"""The Cache API against a real redis-server (backend="redis"), with exact expectations.

Every API test runs twice: without and with the near cache (the host table as L1),
which must not change any answer. The server is started by the fixtures (see
redis_server.py) and stopped in finally blocks.
"""
import asyncio
import json
import math
import os
import pickle
import time

import pytest
import redis

import vela
from conftest import new_name, run_children, run_in_child
from redis_server import RedisServer, available, free_port

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed "
                                "(apt-get install redis-server; .ci/run installs it)")

MISSING = object()
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    s = RedisServer()
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def raw(server):
    r = redis.Redis.from_url(server.url)
    yield r
    r.close()


def open_cache(server, name, near=False, **kw):
    opts = dict(url=server.url)
    opts.update(kw.pop("backend_opts", {}))
    kw.setdefault("capacity", "8MiB")
    return vela.Cache(name, backend="redis", backend_opts=opts, near_cache=near, **kw)


@pytest.fixture(params=[False, True], ids=["redis", "redis+near"])
def near(request):
    return request.param


@pytest.fixture
def cache(server, near):
    c = open_cache(server, new_name(), near=near)
    yield c
    c.destroy()


def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b




def _redis(cache):
    """The Redis store of a handle (with near_cache=True, the one the near cache wraps)."""
    return getattr(cache._store, "inner", cache._store)

# --------------------------------------------------------------------------------------
# the implementation is chosen by vela.Cache


def test_cache_sits_on_the_redis_store(cache):
    from vela.stores.near import NearStore
    from vela.stores.redis import RedisStore

    assert type(cache) is vela.Cache and isinstance(_redis(cache), RedisStore)
    # the near cache is a store wrapping the Redis one
    assert isinstance(cache._store, NearStore) is cache.near_cache
    info = cache.info()
    assert info["backend"] == "redis"
    assert info["namespace"] == f"vela:{cache.name}:"


# --------------------------------------------------------------------------------------
# get / [] / put / delete / exists


def test_get_put_delete_exists(cache):
    assert cache.get("nope") is None
    assert cache.get("nope", 5) == 5
    assert cache.get("nope", default=MISSING) is MISSING
    with pytest.raises(KeyError):
        cache["nope"]
    assert cache.put("user:1", {"name": "Alice"}) is None
    assert cache.get("user:1") == {"name": "Alice"}
    assert cache["user:1"] == {"name": "Alice"}
    cache["k"] = "v"
    assert cache.get("k") == "v"
    cache.put("k", "w")
    assert cache.get("k") == "w"
    assert cache.exists("k") and "k" in cache and not cache.exists("zz") and "zz" not in cache
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert cache.get("k") is None and "k" not in cache
    with pytest.raises(KeyError):
        del cache["k"]
    del cache["user:1"]
    assert cache.size() == 0 and len(cache) == 0


def bookkeeping(name, keys):
    """The keys that number invalidations and register the hosts' listeners, checked
    to be only those; the others are returned."""
    prefix = f"vela:{name}:".encode()
    book = [k for k in keys if k == prefix + b"iseq" or k == prefix + b"hosts" or k.startswith(prefix + b"hb:")]
    return sorted(set(keys) - set(book))


def test_keys_live_under_the_namespace(cache, raw):
    cache.put("a", 1, tags=["t"])
    keys = sorted(raw.scan_iter(match=f"vela:{cache.name}:*"))
    enc = vela._native.encode_key("a")
    assert f"vela:{cache.name}:iseq".encode() in keys  # the put's invalidation was numbered
    assert bookkeeping(cache.name, keys) == sorted([
        f"vela:{cache.name}:v:".encode() + enc, f"vela:{cache.name}:m:".encode() + enc,
        f"vela:{cache.name}:t:t".encode()])
    hosts = raw.smembers(f"vela:{cache.name}:hosts")
    assert len(hosts) == (1 if cache.near_cache else 0)  # a listener registers its host


def test_values_are_stored_with_a_codec_byte_and_ints_as_decimal(cache, raw):
    cache.put("i", -42)
    cache.put("b", b"\x00raw")
    cache.put("s", "é")
    cache.put("o", [1])
    vkey = lambda k: f"vela:{cache.name}:v:".encode() + vela._native.encode_key(k)  # noqa: E731
    assert raw.get(vkey("i")) == b"-42"                     # so INCRBY works on it
    assert raw.get(vkey("b")) == b"\x00\x00raw"
    assert raw.get(vkey("s")) == b"\x01" + "é".encode()
    assert raw.get(vkey("o"))[:1] == bytes([vela._native.CODEC_PICKLE])


def test_flush_removes_only_this_caches_keys(server, raw, near):
    a = open_cache(server, new_name(), near=near)
    b = open_cache(server, new_name(), near=near)
    try:
        raw.set("foreign", b"keep me")
        assert a.flush() == 0
        for i in range(37):
            a.put(f"k{i}", i, tags=["t"] if i % 2 else ())
        b.put("k1", "b's")
        assert a.get("k3") == 3
        assert a.flush() == 37
        assert a.size() == 0 and len(a) == 0
        assert all(a.get(f"k{i}") is None for i in range(37))
        assert a.flush() == 0
        assert raw.get("foreign") == b"keep me"
        assert b.get("k1") == "b's" and b.size() == 1
        assert bookkeeping(a.name, list(raw.scan_iter(match=f"vela:{a.name}:*"))) == []
        a.put("k1", 1, tags=["t"])
        assert a.invalidate_tag("t") == 1
    finally:
        raw.delete("foreign")
        a.destroy()
        b.destroy()


def test_size_and_len(cache):
    for i in range(10):
        cache.put(i, i)
    assert cache.size() == 10 and len(cache) == 10
    cache.put(3, "again")
    assert cache.size() == 10
    cache.delete(3)
    assert cache.size() == 9
    assert cache.stats()["size"] == 9


# --------------------------------------------------------------------------------------
# stats


def test_stats_exact_counts(cache):
    cache.put("a", 1)
    cache.put("b", 2)
    cache["c"] = 3
    cache.put("a", 10)
    assert cache.get("a") == 10               # hit
    assert cache["b"] == 2                    # hit
    assert cache.get("a") == 10               # hit (an L1 copy with the near cache)
    assert cache.get("zz") is None            # miss
    with pytest.raises(KeyError):
        cache["zz"]                           # miss
    assert cache.exists("a") and "b" in cache and not cache.exists("zz")  # not counted
    assert cache.incr("n") == 1
    assert cache.incr("n") == 2
    assert cache.delete("a") is True
    del cache["b"]
    assert cache.delete("a") is False         # nothing removed: not counted
    s = cache.stats()
    assert (s["hits"], s["misses"], s["hit_ratio"]) == (3, 2, 0.6)
    assert (s["writes"], s["deletes"], s["size"]) == (6, 2, 2)
    assert (s["evictions"], s["expirations"], s["invalidations"], s["fetches"]) == (0, 0, 0, 0)
    assert {"hits", "misses", "writes", "deletes", "evictions", "expirations", "invalidations",
            "fetches", "stampede_waits", "stampede_timeouts", "lock_recoveries", "size",
            "memory_used", "capacity", "hit_ratio"} <= set(s)
    assert s["capacity"] == 8 * MiB


def test_stats_reset_and_disabled(cache, server):
    cache.put("a", 1)
    cache.get("a")
    cache.get("b")
    first = cache.stats(reset=True)
    assert (first["hits"], first["misses"], first["writes"]) == (1, 1, 1)
    again = cache.stats()
    assert (again["hits"], again["misses"], again["writes"], again["size"]) == (0, 0, 0, 1)
    quiet = open_cache(server, cache.name, near=cache.near_cache, stats_enabled=False,
                       backend_opts=dict(l1_segment=cache.info()["l1_segment"]))
    try:
        quiet.put("q", 1)
        quiet.get("q")
        quiet.get("nothing")
        s = cache.stats()
        assert (s["hits"], s["misses"], s["writes"]) == (0, 0, 0)
    finally:
        quiet.close()


def test_stats_are_summed_over_the_processes_of_the_host(cache):
    cache.put("k", 1)
    name, l1 = cache.name, cache.info()["l1_segment"]
    url = _redis(cache)._o.url
    near = cache.near_cache

    def reader(_):
        with vela.Cache(name, backend="redis", backend_opts={"url": url, "l1_segment": l1},
                        near_cache=near) as c:
            return [c.get("k") for _ in range(5)] + [c.get("absent")]

    assert run_children(reader, [(i,) for i in range(2)], timeout=30) == [[1] * 5 + [None]] * 2
    s = cache.stats()
    assert (s["hits"], s["misses"]) == (10, 2)


# --------------------------------------------------------------------------------------
# tags


def test_invalidate_tag_counts_entries_with_several_tags(cache):
    cache.put("a", 1, tags=["x", "y"])
    cache.put("b", 2, tags=["x"])
    cache.put("c", 3, tags=["y"])
    cache.put("d", 4)
    assert cache.get("a") == 1 and cache.get("b") == 2
    assert cache.invalidate_tag("x") == 2
    assert cache.get("a") is None and cache.get("b") is None
    assert cache.get("c") == 3 and cache.get("d") == 4
    assert cache.invalidate_tag("y") == 1
    assert cache.get("c") is None
    assert cache.invalidate_tag("y") == 0
    assert cache.invalidate_tag("never-used") == 0
    assert cache.size() == 1
    assert cache.stats()["invalidations"] == 3


def test_invalidate_tag_overwritten_entry_loses_its_tags(cache):
    cache.put("a", 1, tags=["x"])
    cache.put("a", 2, tags=["y"])
    cache.put("b", 1, tags=["x"])
    cache.put("b", 2)
    assert cache.invalidate_tag("x") == 0
    assert cache.get("a") == 2 and cache.get("b") == 2
    assert cache.invalidate_tag("y") == 1
    assert cache.get("a") is None and cache.get("b") == 2


def test_invalidate_tag_ignores_deleted_flushed_and_expired_entries(cache, raw):
    for i in range(10):
        cache.put(f"k{i}", i, tags=["t"])
    assert cache.delete("k0") and cache.delete("k1")
    del cache["k2"]
    assert cache.invalidate_tag("t") == 7
    for i in range(5):
        cache.put(f"k{i}", i, tags=["t"])
    cache.flush()
    cache.put("new", 1, tags=["t"])
    cache.put("short", 1, ttl=0.2, tags=["t"])
    time.sleep(0.3)
    assert cache.invalidate_tag("t") == 1
    assert cache.size() == 0
    assert bookkeeping(cache.name, list(raw.scan_iter(match=f"vela:{cache.name}:*"))) == []   # no tag sets left behind


def test_tag_sets_expire_with_their_longest_lived_member(cache, raw):
    tk = f"vela:{cache.name}:t:t"
    cache.put("a", 1, ttl=5, tags=["t"])
    assert 4000 < raw.pttl(tk) <= 5000
    cache.put("b", 1, ttl=50, tags=["t"])
    assert 49000 < raw.pttl(tk) <= 50000
    cache.put("c", 1, ttl=1, tags=["t"])
    assert 49000 < raw.pttl(tk) <= 50000
    cache.put("d", 1, tags=["t"])
    assert raw.pttl(tk) == -1
    assert cache.touch("a", ttl=math.inf)
    assert raw.pttl(tk) == -1
    assert cache.invalidate_tag("t") == 4


def test_tag_limits(cache):
    cache.put("many", 1, tags=[f"t{i}" for i in range(32)])
    cache.put("long", 1, tags=["é" * 127 + "x"])
    assert cache.invalidate_tag("t31") == 1
    assert cache.invalidate_tag("é" * 127 + "x") == 1
    with pytest.raises(ValueError):
        cache.put("k", 1, tags=[f"t{i}" for i in range(33)])
    with pytest.raises(ValueError):
        cache.put("k", 1, tags=["é" * 128])
    with pytest.raises(TypeError):
        cache.put("k", 1, tags=[1])
    with pytest.raises(TypeError):
        cache.put("k", 1, tags="single")
    assert cache.get("k") is None
    assert cache.size() == 0


# --------------------------------------------------------------------------------------
# keys and values

DISTINCT_KEYS = ["1", 1, b"1", (1,), ("1",), (b"1",), ((1,),), (1, 1), "", b"", (), 0, -1, "-1",
                 2 ** 63 - 1, 2 ** 63, -2 ** 63 - 1, 2 ** 200, ("a", "b"), ("ab",), "é", "\x00"]


def test_distinct_keys_and_bool_keys(cache):
    for i, k in enumerate(DISTINCT_KEYS):
        cache.put(k, i)
    assert cache.size() == len(DISTINCT_KEYS)
    for i, k in enumerate(DISTINCT_KEYS):
        assert cache.get(k) == i, k
    cache.put(True, "t")
    assert cache.get(1) == "t" and cache.get(True) == "t"
    assert cache.get_many([False, 0]) == {0: DISTINCT_KEYS.index(0)}
    for bad in (1.5, [1], {"a": 1}, None, object()):
        with pytest.raises(TypeError):
            cache.put(bad, 1)
        with pytest.raises(TypeError):
            cache.get(bad)
    with pytest.raises(ValueError):
        cache.put("k" * 2000, 1)


class Point:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Point) and other.x == self.x


VALUES = [b"", b"\x00\xff" * 10, "", "text", "ü€𝄞", "\ud800lone", 0, 1, -1, 2 ** 63 - 1, -2 ** 63,
          2 ** 63, -2 ** 63 - 1, 2 ** 200, 1.5, float("nan"), -0.0, None, True, False,
          [1, "a", b"b"], {"a": [1, 2]}, (1, (2,)), {1, 2}, frozenset({3}), Point(3), bytearray(b"x")]


def test_values_round_trip_with_exact_types(cache):
    for i, v in enumerate(VALUES):
        cache.put(("v", i), v)
    for _ in range(2):  # from Redis, then (near cache) from L1
        for i, v in enumerate(VALUES):
            got = cache.get(("v", i))
            assert (got == v) if isinstance(v, Point) else same(got, v), (v, got)
    assert cache.get(("v", VALUES.index(None)), MISSING) is None


def test_large_values(cache):
    big_b = bytes(range(256)) * 256
    big_s = "ü" * 20000
    cache.put("b", big_b)
    cache.put("s", big_s)
    assert cache.get("b") == big_b and cache.get("s") == big_s
    assert cache.get("b") == big_b


def test_unserializable_value_stores_nothing(cache):
    cache.put("k", "old")
    for bad in (lambda: 0, (x for x in ()), __import__("threading").Lock()):
        with pytest.raises(TypeError):
            cache.put("k", bad)
        with pytest.raises(TypeError):
            cache.put("new", bad)
    assert cache.get("k") == "old" and "new" not in cache
    assert cache.stats()["writes"] == 1


def test_value_too_large(cache):
    limit = 8 * MiB // 64
    cache.put("k", b"old")
    cache.put("under", b"u" * (limit - 512))
    assert cache.get("under") == b"u" * (limit - 512)
    with pytest.raises(vela.ValueTooLarge):
        cache.put("k", b"x" * (limit + 1))
    with pytest.raises(vela.ValueTooLarge):
        cache.put("list", list(range(limit)))
    assert cache.get("k") == b"old" and cache.size() == 2


class Recording:
    def dumps(self, obj):
        return b"REC:" + pickle.dumps(obj)

    def loads(self, data):
        assert data.startswith(b"REC:")
        return pickle.loads(data[4:])


@pytest.mark.parametrize("serializer", ["json", Recording()], ids=["json", "custom"])
def test_serializers(server, near, serializer):
    c = open_cache(server, new_name(), near=near, serializer=serializer)
    try:
        c.put("d", {"a": [1, 2]})
        c.put("s", "plain")
        assert c.get("d") == {"a": [1, 2]} and c.get("d") == {"a": [1, 2]}
        assert c.get("s") == "plain"
        if serializer == "json":
            with pytest.raises(TypeError):
                c.put("set", {1})
    finally:
        c.destroy()


# --------------------------------------------------------------------------------------
# ttl / touch / incr


def test_ttl_expiry_and_ttl_method(cache, raw):
    cache.put("short", 1, ttl=0.2)
    cache.put("t", 1, ttl=10)
    cache.put("forever", 1)
    assert cache.get("short") == 1
    assert 9 < cache.ttl("t") <= 10 and type(cache.ttl("t")) is float
    assert 9000 < raw.pttl(f"vela:{cache.name}:v:".encode() + vela._native.encode_key("t")) <= 10000
    assert cache.ttl("forever") is None
    with pytest.raises(KeyError):
        cache.ttl("absent")
    time.sleep(0.3)
    assert cache.get("short") is None
    with pytest.raises(KeyError):
        cache.ttl("short")
    assert cache.size() == 2
    assert cache.expire() == 0


def test_default_ttl_and_infinite_ttl(server, near):
    c = open_cache(server, new_name(), near=near, default_ttl=0.2)
    try:
        c.put("d", 1)
        c.put("inf", 1, ttl=math.inf)
        assert 0 < c.ttl("d") <= 0.2 and c.ttl("inf") is None
        assert c.get("d") == 1
        time.sleep(0.3)
        assert c.get("d") is None and c.get("inf") == 1
    finally:
        c.destroy()


@pytest.mark.parametrize("bad_ttl", [0, -1, float("nan"), "10", True])
def test_bad_ttl_raises_and_writes_nothing(cache, bad_ttl):
    with pytest.raises(ValueError):
        cache.put("k", 1, ttl=bad_ttl)
    assert "k" not in cache


def test_touch(cache):
    assert cache.touch("absent", ttl=10) is False
    assert "absent" not in cache
    cache.put("k", "v", ttl=0.3, tags=["t"])
    assert cache.get("k") == "v"
    assert cache.touch("k", ttl=10) is True
    assert 9 < cache.ttl("k") <= 10
    time.sleep(0.4)
    assert cache.get("k") == "v"
    assert cache.touch("k", ttl=math.inf) is True
    assert cache.ttl("k") is None
    assert cache.touch("k", ttl=0.2) is True
    assert cache.get("k") == "v"
    time.sleep(0.3)
    assert cache.get("k") is None        # also no L1 copy outlives the shortened entry
    assert cache.touch("k", ttl=10) is False
    with pytest.raises(ValueError):
        cache.touch("k", ttl=-1)


def test_incr_decr(cache):
    assert cache.incr("c") == 1
    assert cache.incr("c") == 2
    assert cache.incr("c", 5) == 7
    assert cache.incr("c", delta=-3) == 4
    assert cache.decr("c") == 3
    assert cache.decr("c", 10) == -7
    assert cache.get("c") == -7 and type(cache.get("c")) is int
    assert cache.decr("d") == -1
    cache.put("i", 10)
    assert cache.get("i") == 10
    assert cache.incr("i", 3) == 13
    assert cache["i"] == 13               # the L1 copy of 10 was dropped
    assert cache.incr("big", 2 ** 62) == 2 ** 62
    assert cache.incr("big", 2 ** 62 - 1) == 2 ** 63 - 1   # exact past 2^53
    with pytest.raises(TypeError):
        cache.incr("c", 1.5)
    with pytest.raises(TypeError):
        cache.incr("c", True)


def test_incr_ttl_applies_to_missing_key_only(cache):
    assert cache.incr("n", ttl=0.3) == 1
    assert 0 < cache.ttl("n") <= 0.3
    assert cache.incr("n", ttl=100) == 2
    assert 0 < cache.ttl("n") <= 0.3
    time.sleep(0.4)
    assert cache.get("n") is None
    assert cache.incr("n") == 1
    assert cache.ttl("n") is None


@pytest.mark.parametrize("value", ["abc", "12", b"1", 1.5, [1], None, 2 ** 64])
def test_incr_non_integer_raises_type_error(cache, value):
    cache.put("v", value)
    with pytest.raises(TypeError):
        cache.incr("v")
    with pytest.raises(TypeError):
        cache.decr("v")
    assert same(cache.get("v", MISSING), value)


def test_incr_overflow_raises(cache):
    cache.put("max", 2 ** 63 - 1)
    with pytest.raises(OverflowError):
        cache.incr("max")
    assert cache.get("max") == 2 ** 63 - 1
    cache.put("min", -2 ** 63)
    with pytest.raises(OverflowError):
        cache.decr("min")
    with pytest.raises(OverflowError):
        cache.incr("x", 2 ** 64)
    assert cache.get("min") == -2 ** 63


def _incr_many(name, url, n):
    with vela.Cache(name, backend="redis", backend_opts={"url": url, "l1_segment": name + ".l1"}) as c:
        return max(c.incr("hits") for _ in range(n))


def test_incr_is_atomic_across_processes(server):
    name = new_name()
    try:
        results = run_children(_incr_many, [(name, server.url, 300)] * 4, timeout=60)
        assert max(results) == 1200
        with vela.Cache(name, backend="redis", backend_opts={"url": server.url,
                                                            "l1_segment": name + ".l1"}) as c:
            assert c.get("hits") == 1200
    finally:
        from vela.stores.redis import destroy

        destroy(name, {"url": server.url, "l1_segment": name + ".l1"})


# --------------------------------------------------------------------------------------
# batches


def test_get_many_put_many_delete_many(cache):
    assert cache.put_many({"a": 1, "b": "two", ("c", 3): [3]}, ttl=60, tags=["batch"]) is None
    cache.put_many([("d", 4)])
    assert cache.get_many(["a", "b", ("c", 3), "missing", "d"]) == {"a": 1, "b": "two", ("c", 3): [3], "d": 4}
    assert cache.get_many(["a", "d"]) == {"a": 1, "d": 4}
    assert cache.get_many([]) == {}
    assert 59 < cache.ttl("a") <= 60 and cache.ttl("d") is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["writes"]) == (6, 1, 4)
    assert cache.delete_many(["a", "zz", "d"]) == 2
    assert cache.delete_many([]) == 0
    assert cache.invalidate_tag("batch") == 2
    assert cache.size() == 0
    assert cache.stats()["deletes"] == 2


def test_put_many_bad_item_stores_nothing(cache):
    cache.put("before", "kept")
    for bad in [("x", lambda: 0), (1.5, "float key"), ("k" * 2000, "long")]:
        with pytest.raises((TypeError, ValueError)):
            cache.put_many([("a", 1), bad, ("c", 3)])
    assert cache.get_many(["a", "c"]) == {}
    assert cache.size() == 1


# --------------------------------------------------------------------------------------
# get_or_fetch


def test_get_or_fetch(cache, raw):
    calls = []

    def fetch(key):
        calls.append(key)
        return {"computed": key}

    assert cache.get_or_fetch("k", fetch, ttl=30, tags=["f"]) == {"computed": "k"}
    assert cache.get_or_fetch("k", fetch) == {"computed": "k"}
    assert cache.get_or_fetch("k", fetch) == {"computed": "k"}
    assert calls == ["k"]
    assert 29 < cache.ttl("k") <= 30
    s = cache.stats()
    assert (s["hits"], s["misses"], s["fetches"], s["writes"]) == (2, 1, 1, 1)
    assert list(raw.scan_iter(match=f"vela:{cache.name}:l:*")) == []      # lease released
    assert cache.invalidate_tag("f") == 1


def test_get_or_fetch_error_propagates_stores_nothing_and_releases_the_lease(cache, raw):
    def boom(key):
        raise RuntimeError("backend down")

    with pytest.raises(RuntimeError):
        cache.get_or_fetch("k", boom)
    assert "k" not in cache
    assert list(raw.scan_iter(match=f"vela:{cache.name}:l:*")) == []
    assert cache.get_or_fetch("k", lambda k: 7) == 7
    with pytest.raises(TypeError):
        cache.get_or_fetch("u", lambda k: (x for x in ()))
    assert "u" not in cache
    assert list(raw.scan_iter(match=f"vela:{cache.name}:l:*")) == []


def test_get_or_fetch_waits_for_another_hosts_lease(cache, raw, server):
    """A lease held elsewhere: the caller waits, then reads the other host's value."""
    lease = f"vela:{cache.name}:l:".encode() + vela._native.encode_key("k")
    raw.set(lease, b"other-host", px=5000)
    other = open_cache(server, cache.name, backend_opts=dict(l1_segment=cache.name + ".other"))
    try:
        import threading

        def finish():
            time.sleep(0.2)
            other.put("k", "theirs")
            raw.delete(lease)

        t = threading.Thread(target=finish)
        t.start()
        start = time.monotonic()
        assert cache.get_or_fetch("k", lambda k: "mine") == "theirs"
        assert 0.15 < time.monotonic() - start < 2
        t.join()
        s = cache.stats()
        assert (s["stampede_waits"], s["fetches"], s["hits"]) == (1, 0, 1)
    finally:
        other.destroy()


def test_get_or_fetch_lease_timeout_fetches_itself(server, raw, near):
    c = open_cache(server, new_name(), near=near, stampede_timeout=0.3)
    try:
        lease = f"vela:{c.name}:l:".encode() + vela._native.encode_key("k")
        raw.set(lease, b"stuck", px=10000)
        start = time.monotonic()
        assert c.get_or_fetch("k", lambda k: "mine") == "mine"
        assert 0.25 < time.monotonic() - start < 2
        assert c.get("k") == "mine"
        assert c.stats()["stampede_timeouts"] == 1
    finally:
        c.destroy()


def _fetch_once(name, url, host, barrier, counter_key):
    with vela.Cache(name, backend="redis", near_cache=True,
                    backend_opts={"url": url, "l1_segment": f"{name}.{host}"}) as c:
        r = redis.Redis.from_url(url)
        barrier.wait(10)

        def slow(key):
            r.incr(counter_key)
            time.sleep(0.3)
            return "value"

        return c.get_or_fetch("k", slow)


def test_get_or_fetch_runs_once_across_hosts_and_processes(server, raw):
    """Two simulated hosts, three processes each: fetch_fn runs exactly once."""
    from conftest import FORK

    name = new_name()
    counter_key = f"test:{name}:fetches"
    barrier = FORK.Barrier(6)
    try:
        args = [(name, server.url, "hostA" if i < 3 else "hostB", barrier, counter_key) for i in range(6)]
        assert run_children(_fetch_once, args, timeout=60) == ["value"] * 6
        assert int(raw.get(counter_key)) == 1
    finally:
        raw.delete(counter_key)
        from vela.stores.redis import destroy

        for host in ("hostA", "hostB"):
            destroy(name, {"url": server.url, "l1_segment": f"{name}.{host}"})


def test_aget_or_fetch_and_memoize(cache):
    async def afetch(key):
        await asyncio.sleep(0.01)
        return f"async {key}"

    assert asyncio.run(cache.aget_or_fetch("a", afetch)) == "async a"
    assert asyncio.run(cache.aget_or_fetch("a", afetch)) == "async a"
    assert cache.get("a") == "async a"
    calls = []

    @cache.memoize(ttl=60)
    def square(x):
        calls.append(x)
        return x * x

    assert [square(3), square(3), square(4)] == [9, 9, 16]
    assert calls == [3, 4]


def test_telemetry_events(cache):
    events = []
    vela.telemetry.attach("t-redis", [("vela", "cache", op, "stop") for op in
                                      ("get", "put", "fetch", "delete", "invalidate_tag", "flush")],
                          lambda e, m, md: events.append((e[2], md.get("result"), m.get("count"))))
    try:
        cache.put("k", 1, tags=["t"])
        cache.get("k")
        cache.get("k")
        cache.get("nope")
        cache.get_or_fetch("f", lambda k: 1)
        cache.delete("f")
        cache.invalidate_tag("t")
        cache.flush()
    finally:
        vela.telemetry.detach("t-redis")
    assert events == [("put", None, None), ("get", "hit", None), ("get", "hit", None),
                      ("get", "miss", None), ("fetch", "fetched", None), ("delete", True, None),
                      ("invalidate_tag", None, 1), ("flush", None, 0)]


# --------------------------------------------------------------------------------------
# options, lifecycle, errors


@pytest.mark.parametrize("opts,named", [
    ({"nope": 1}, "nope"),
    ({"url": "http://x"}, "url"),
    ({"url": 5}, "url"),
    ({"socket_timeout": 0}, "socket_timeout"),
    ({"connect_timeout": "1"}, "connect_timeout"),
    ({"retries": -1}, "retries"),
    ({"retry_backoff": -1}, "retry_backoff"),
    ({"degraded_l1_ttl": math.inf}, "degraded_l1_ttl"),
    ({"l1_segment": ".bad"}, "l1_segment"),
    ({"listener": "yes"}, "listener"),
    ({"cluster": 1}, "cluster"),
    ({"client_options": []}, "client_options"),
])
def test_bad_backend_opts_are_named(server, opts, named):
    with pytest.raises(vela.OptionError, match=named):
        vela.Cache(new_name(), backend="redis", backend_opts={"url": server.url, **opts})


@pytest.mark.parametrize("kw,named", [
    ({"bogus": 1}, "bogus"), ({"default_ttl": 0}, "default_ttl"),
    ({"near_cache_l1_ttl": -1}, "near_cache_l1_ttl"), ({"stampede_timeout": math.inf}, "stampede_timeout"),
    ({"capacity": "1KB"}, "capacity"), ({"serializer": "nope"}, "serializer"),
    ({"telemetry_prefix": ()}, "telemetry_prefix"), ({"topology": "replicated"}, "topology"),
    ({"eviction_policy": "fifo"}, "eviction_policy"), ({"near_cache": "yes"}, "near_cache"),
])
def test_bad_cache_options_are_named(server, kw, named):
    with pytest.raises(vela.OptionError, match=named):
        vela.Cache(new_name(), backend="redis", backend_opts={"url": server.url}, **kw)


def test_close_then_any_call_raises_cache_closed(server, near):
    c = open_cache(server, new_name(), near=near)
    c.put("k", 1)
    c.close()
    c.close()
    assert c.closed
    calls = [
        lambda: c.get("k"), lambda: c["k"], lambda: c.put("k", 2), lambda: c.__setitem__("k", 2),
        lambda: c.__delitem__("k"), lambda: c.delete("k"), lambda: c.exists("k"), lambda: "k" in c,
        lambda: c.flush(), lambda: c.size(), lambda: len(c), lambda: c.stats(), lambda: c.check(),
        lambda: c.invalidate_tag("t"), lambda: c.ttl("k"), lambda: c.touch("k", ttl=5),
        lambda: c.incr("n"), lambda: c.decr("n"), lambda: c.expire(), lambda: c.get_many(["k"]),
        lambda: c.put_many({"k": 1}), lambda: c.delete_many(["k"]),
        lambda: c.get_or_fetch("k", lambda k: 1),
    ]
    for call in calls:
        with pytest.raises(vela.CacheClosed):
            call()
    with open_cache(server, c.name, near=near) as again:
        assert again.get("k") == 1
        again.destroy()


def test_destroy_removes_entries_and_host_table(server, raw):
    name = new_name()
    c = open_cache(server, name, near=True)
    c.put("k", 1)
    seg = c.info()["l1_segment"]
    assert os.path.exists(f"/dev/shm/vela.{seg}")
    assert c.destroy() is True
    assert c.closed
    assert list(raw.scan_iter(match=f"vela:{name}:*")) == []
    assert not os.path.exists(f"/dev/shm/vela.{seg}")


def test_check_and_repr(cache):
    cache.put("k", 1)
    assert cache.check() == []
    assert "redis" in repr(cache)


def test_unreachable_redis_raises_backend_unavailable_within_the_bound(near):
    port = free_port()  # nothing listens there
    opts = {"url": f"redis://127.0.0.1:{port}/0", "socket_timeout": 0.2, "connect_timeout": 0.2,
            "retries": 2, "retry_backoff": 0.01}
    c = vela.Cache(new_name(), backend="redis", backend_opts=opts, near_cache=near, capacity="8MiB")
    try:
        bound = _redis(c)._o.bound()
        for call in (lambda: c.get("k"), lambda: c.put("k", 1), lambda: c.incr("n"),
                     lambda: c.get_or_fetch("k", lambda k: 1), lambda: c.flush(),
                     lambda: c.invalidate_tag("t"), lambda: c.delete("k")):
            start = time.monotonic()
            with pytest.raises(vela.BackendUnavailable):
                call()
            assert time.monotonic() - start <= bound + 0.1
    finally:
        c.close()
        from vela.stores.redis import _destroy_local

        _destroy_local(_redis(c)._o.l1_segment)


def test_paused_redis_times_out_within_the_bound():
    """A server that accepts but never answers (SIGSTOP): BackendUnavailable, no hang."""
    s = RedisServer().start()
    c = None
    try:
        c = vela.Cache(new_name(), backend="redis", capacity="8MiB",
                       backend_opts={"url": s.url, "socket_timeout": 0.2, "connect_timeout": 0.2,
                                     "retries": 1, "retry_backoff": 0.01})
        c.put("k", 1)
        s.pause()
        start = time.monotonic()
        with pytest.raises(vela.BackendUnavailable):
            c.get("k")
        assert time.monotonic() - start <= _redis(c)._o.bound() + 0.1
        s.resume()
        assert c.get("k") == 1
    finally:
        if c is not None:
            c.destroy()
        s.stop()


def test_unix_socket_url_and_fork(server):
    """Works over a unix socket; a forked child gets its own connections."""
    name = new_name()
    c = vela.Cache(name, backend="redis", capacity="8MiB", backend_opts={"url": server.unix_url})
    try:
        c.put("k", "parent")
        assert c.get("k") == "parent"

        def child():
            c.put("k2", "child")
            return c.get("k")

        assert run_in_child(child) == "parent"
        assert c.get("k2") == "child"
        assert c.get("k") == "parent"
    finally:
        c.destroy()


# --------------------------------------------------------------------------------------
# the URL kinds redis-py supports: Cluster, Sentinel, TLS


def _exercise(c):
    c.put("a", 1, tags=["t"])
    c.put("b", "x", ttl=30, tags=["t"])
    assert c.get("a") == 1 and c.get("b") == "x" and c.get("zz") is None
    assert c.incr("a") == 2
    assert c.get_many(["a", "b", "zz"]) == {"a": 2, "b": "x"}
    assert c.get_or_fetch("f", lambda k: 5) == 5
    assert c.size() == 3
    assert c.invalidate_tag("t") == 2
    assert c.flush() == 1 and c.size() == 0


def test_cluster_url():
    """A one-node Redis Cluster holding every slot; keys spread over the cache's shards."""
    s = RedisServer(extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                "--cluster-port", str(free_port())]).start()
    c = None
    try:
        r = redis.Redis(port=s.port)
        r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not become ready"
            time.sleep(0.05)
        r.close()
        name = new_name()
        c = vela.Cache(name, backend="redis", near_cache=True, capacity="8MiB",
                       backend_opts={"url": f"redis+cluster://127.0.0.1:{s.port}", "l1_segment": name + ".A"})
        assert c.info()["namespace"] == f"vela:{{{name}:*}}:"
        _exercise(c)
        assert c.info()["shards"] == 64
        deadline = time.monotonic() + 5
        while not c._store.near.healthy():
            assert time.monotonic() < deadline, "no listener over the cluster"
            time.sleep(0.02)
    finally:
        if c is not None:
            c.destroy()
        s.stop()


def test_sentinel_url():
    import subprocess

    master = RedisServer().start()
    port = free_port()
    conf = os.path.join(master.dir, "sentinel.conf")
    with open(conf, "w") as f:
        f.write(f"port {port}\nbind 127.0.0.1\ndir {master.dir}\n"
                f"sentinel monitor main 127.0.0.1 {master.port} 1\n")
    sentinel = subprocess.Popen(["redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    c = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=port, socket_timeout=0.5).ping():
                    break
            except redis.RedisError:
                assert time.monotonic() < deadline, "sentinel did not start"
                time.sleep(0.05)
        name = new_name()
        c = vela.Cache(name, backend="redis", near_cache=True, capacity="8MiB",
                       backend_opts={"url": f"redis+sentinel://127.0.0.1:{port}/main/0",
                                     "l1_segment": name + ".A"})
        _exercise(c)
        assert redis.Redis(port=master.port).get(f"vela:{name}:v:".encode()
                                                 + vela._native.encode_key("f")) is None
    finally:
        if c is not None:
            c.destroy()
        sentinel.terminate()
        try:
            sentinel.wait(5)
        except subprocess.TimeoutExpired:
            sentinel.kill()
            sentinel.wait(5)
        master.stop()


def test_tls_url(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS test")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"],
                   check=True, capture_output=True, timeout=60)
    tls_port = free_port()
    s = RedisServer(extra_args=["--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                                "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]).start()
    c = None
    try:
        name = new_name()
        c = vela.Cache(name, backend="redis", near_cache=True, capacity="8MiB",
                       backend_opts={"url": f"rediss://127.0.0.1:{tls_port}/0", "l1_segment": name + ".A",
                                     "client_options": {"ssl_ca_certs": cert}})
        _exercise(c)
    finally:
        if c is not None:
            c.destroy()
        s.stop()


def test_vela_destroy_with_redis_backend_options(server, raw):
    name = new_name()
    c = open_cache(server, name, near=False)
    c.put("k", 1, tags=["t"])
    c.close()
    assert vela.destroy(name, backend="redis", backend_opts={"url": server.url}) is True
    assert list(raw.scan_iter(match=f"vela:{name}:*")) == []
