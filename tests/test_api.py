"""Unit tests of the public API (ARCHITECTURE.md section 3 and docs/api-notes.md).

Every test states an exact outcome; every scenario that writes ends with check() == [].
"""
import json
import math
import pickle
import random
import time

import msgpack
import pytest

import vela
from conftest import new_name, run_in_child

MiB = 1024 * 1024
MISSING = object()

STAT_INT_KEYS = {
    "hits", "misses", "writes", "deletes", "evictions", "expirations", "invalidations",
    "fetches", "stampede_waits", "stampede_timeouts", "lock_recoveries", "size",
    "memory_used", "capacity",
}


def same(a, b):
    """Equal and of exactly the same types, recursively (so True != 1 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


# --------------------------------------------------------------------------------------
# errors


def test_error_hierarchy():
    for cls in (vela.CacheFull, vela.ValueTooLarge, vela.LayoutMismatch,
                vela.BackendUnavailable, vela.BridgeUnavailable, vela.OptionError,
                vela.CacheClosed):
        assert issubclass(cls, vela.VelaError), cls
    assert issubclass(vela.VelaError, Exception)
    assert issubclass(vela.ValueTooLarge, ValueError)
    assert issubclass(vela.OptionError, ValueError)
    assert issubclass(vela.OptionError, TypeError)


# --------------------------------------------------------------------------------------
# get / [] / put / delete / exists / flush / size


def test_get_missing_returns_default(cache):
    assert cache.get("nope") is None
    assert cache.get("nope", 5) == 5
    assert cache.get("nope", default=MISSING) is MISSING
    assert cache.check() == []


def test_put_then_get(cache):
    assert cache.put("user:1", {"name": "Alice"}) is None
    assert cache.get("user:1") == {"name": "Alice"}
    assert cache.get("user:1", MISSING) == {"name": "Alice"}
    assert cache["user:1"] == {"name": "Alice"}
    assert cache.check() == []


def test_getitem_missing_raises_keyerror(cache):
    with pytest.raises(KeyError):
        cache["nope"]
    cache.put("k", 1)
    cache.delete("k")
    with pytest.raises(KeyError):
        cache["k"]


def test_setitem(cache):
    cache["a"] = 1
    cache["a"] = 2
    assert cache["a"] == 2
    assert cache.get("a") == 2
    assert len(cache) == 1
    assert cache.check() == []


def test_put_overwrites(cache):
    cache.put("k", "v1")
    cache.put("k", b"v2")
    assert cache.get("k") == b"v2"
    assert cache.size() == 1
    assert cache.check() == []


def test_delete_returns_whether_removed(cache):
    cache.put("k", "v")
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert cache.delete("never") is False
    assert cache.get("k") is None
    assert cache.size() == 0
    assert cache.check() == []


def test_delitem(cache):
    cache["k"] = "v"
    del cache["k"]
    assert "k" not in cache
    with pytest.raises(KeyError):
        del cache["k"]
    assert cache.size() == 0
    assert cache.check() == []


def test_exists_and_contains(cache):
    assert cache.exists("k") is False
    assert ("k" in cache) is False
    cache.put("k", 0)
    assert cache.exists("k") is True
    assert ("k" in cache) is True
    assert "other" not in cache
    cache.delete("k")
    assert cache.exists("k") is False
    assert "k" not in cache


def test_flush_returns_count(cache):
    assert cache.flush() == 0
    for i in range(37):
        cache.put(f"k{i}", i, tags=["t"] if i % 2 else ())
    assert cache.flush() == 37
    assert cache.size() == 0
    assert len(cache) == 0
    assert all(cache.get(f"k{i}") is None for i in range(37))
    assert cache.flush() == 0
    # the table is usable after a flush, tags start from scratch
    cache.put("k1", 1, tags=["t"])
    assert cache.invalidate_tag("t") == 1
    assert cache.check() == []


def test_size_and_len(cache):
    assert cache.size() == 0 and len(cache) == 0
    for i in range(10):
        cache.put(i, i)
    assert cache.size() == 10 and len(cache) == 10
    cache.put(3, "again")
    assert cache.size() == 10
    cache.delete(3)
    assert cache.size() == 9 and len(cache) == 9
    assert cache.stats()["size"] == 9
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# stats


def test_stats_keys_and_types(cache):
    s = cache.stats()
    assert STAT_INT_KEYS | {"hit_ratio"} <= set(s)
    for k in STAT_INT_KEYS:
        assert type(s[k]) is int, (k, s[k])
    assert type(s["hit_ratio"]) is float
    assert s["capacity"] == 8 * MiB
    for k in STAT_INT_KEYS - {"capacity", "memory_used"}:
        assert s[k] == 0, (k, s[k])
    assert s["hit_ratio"] == 0.0


def test_stats_exact_counts(cache):
    cache.put("a", 1)
    cache.put("b", 2)
    cache["c"] = 3
    cache.put("a", 10)                        # overwrite: still a stored entry
    assert cache.get("a") == 10               # hit
    assert cache["b"] == 2                    # hit
    assert cache.get("zz") is None            # miss
    with pytest.raises(KeyError):
        cache["zz"]                           # miss
    assert cache.exists("a") and "b" in cache and not cache.exists("zz")  # not counted
    assert "zz" not in cache                  # not counted
    assert cache.incr("n") == 1               # write
    assert cache.incr("n") == 2               # write
    assert cache.delete("a") is True          # delete
    del cache["b"]                            # delete
    s = cache.stats()
    assert s["hits"] == 2
    assert s["misses"] == 2
    assert s["hit_ratio"] == 0.5
    assert s["writes"] == 6
    assert s["deletes"] == 2
    assert s["size"] == 2                     # c and n
    assert s["evictions"] == 0
    assert s["expirations"] == 0
    assert s["invalidations"] == 0
    assert s["lock_recoveries"] == 0
    assert 0 < s["memory_used"] <= s["capacity"]
    assert cache.check() == []


def test_stats_reset(cache):
    cache.put("a", 1)
    cache.get("a")
    cache.get("b")
    before = cache.stats(reset=True)
    assert (before["hits"], before["misses"], before["writes"]) == (1, 1, 1)
    after = cache.stats()
    assert (after["hits"], after["misses"], after["writes"], after["deletes"]) == (0, 0, 0, 0)
    assert after["hit_ratio"] == 0.0
    # gauges are not counters: they survive a reset
    assert after["size"] == 1
    assert after["capacity"] == 8 * MiB
    assert cache.get("a") == 1
    assert cache.stats()["hits"] == 1


def test_stats_disabled_handle_does_not_count(cache, cache_name):
    quiet = vela.Cache(cache_name, stats_enabled=False)
    try:
        quiet.put("a", 1)
        assert quiet.get("a") == 1
        assert quiet.get("b") is None
        s = cache.stats()
        assert (s["hits"], s["misses"]) == (0, 0)
        assert cache.get("a") == 1
        assert cache.stats()["hits"] == 1
    finally:
        quiet.close()


# --------------------------------------------------------------------------------------
# tags


def test_invalidate_tag_counts_entries_with_several_tags(cache):
    cache.put("a", 1, tags=["x", "y"])
    cache.put("b", 2, tags=["x"])
    cache.put("c", 3, tags=["y"])
    cache.put("d", 4)
    assert cache.invalidate_tag("x") == 2
    assert cache.get("a") is None and cache.get("b") is None
    assert cache.get("c") == 3 and cache.get("d") == 4
    assert cache.invalidate_tag("y") == 1     # a is already gone
    assert cache.get("c") is None
    assert cache.invalidate_tag("y") == 0
    assert cache.invalidate_tag("never-used") == 0
    assert cache.size() == 1
    assert cache.stats()["invalidations"] == 3
    assert cache.check() == []


def test_invalidate_tag_overwritten_entry_loses_its_tags(cache):
    cache.put("a", 1, tags=["x"])
    cache.put("a", 2, tags=["y"])
    cache.put("b", 1, tags=["x"])
    cache.put("b", 2)                          # no tags any more
    assert cache.invalidate_tag("x") == 0
    assert cache.get("a") == 2 and cache.get("b") == 2
    assert cache.invalidate_tag("y") == 1
    assert cache.get("a") is None
    assert cache.get("b") == 2
    assert cache.check() == []


def test_invalidate_tag_ignores_deleted_and_flushed_entries(cache):
    for i in range(10):
        cache.put(f"k{i}", i, tags=["t"])
    assert cache.delete("k0") and cache.delete("k1")
    del cache["k2"]
    assert cache.invalidate_tag("t") == 7
    for i in range(5):
        cache.put(f"k{i}", i, tags=["t"])
    cache.flush()
    cache.put("new", 1, tags=["t"])
    assert cache.invalidate_tag("t") == 1
    assert cache.size() == 0
    assert cache.check() == []


def test_invalidate_tag_ignores_expired_entries(cache):
    cache.put("short", 1, ttl=0.2, tags=["t"])
    cache.put("long", 2, tags=["t"])
    time.sleep(0.35)
    assert cache.invalidate_tag("t") == 1
    assert cache.get("short") is None and cache.get("long") is None
    assert cache.check() == []


def test_retagging_after_invalidation(cache):
    cache.put("a", 1, tags=["t"])
    assert cache.invalidate_tag("t") == 1
    cache.put("a", 2, tags=["t"])
    cache.put("b", 3, tags=["t", "u"])
    assert cache.invalidate_tag("t") == 2
    assert cache.invalidate_tag("u") == 0
    assert cache.check() == []


def test_tag_limits(cache):
    cache.put("many", 1, tags=[f"t{i}" for i in range(32)])
    cache.put("long", 1, tags=["é" * 127 + "x"])           # 255 bytes UTF-8
    assert cache.invalidate_tag("t31") == 1
    assert cache.invalidate_tag("é" * 127 + "x") == 1
    with pytest.raises(ValueError):
        cache.put("k", 1, tags=[f"t{i}" for i in range(33)])
    with pytest.raises(ValueError):
        cache.put("k", 1, tags=["é" * 128])                   # 256 bytes UTF-8
    with pytest.raises(TypeError):
        cache.put("k", 1, tags=[1])
    assert cache.get("k") is None
    assert cache.size() == 0
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# keys

DISTINCT_KEYS = [
    "1", 1, b"1", (1,), ("1",), (b"1",), ((1,),), (1, 1), (1, (1,)),
    "", b"", (), ((),), 0, -1, "-1",
    2 ** 63 - 1, 2 ** 63, -2 ** 63, -2 ** 63 - 1, 2 ** 64, 2 ** 200, -2 ** 200,
    ("a", "b"), ("ab",), ("a", ("b",)), (("a",), "b"), (b"a", "b"), ("a", b"b"),
    "user:1", "üñí", ("user", 1), ("user", "1"),
]


def test_distinct_keys(cache):
    assert len(set(map(repr, DISTINCT_KEYS))) == len(DISTINCT_KEYS)
    for i, k in enumerate(DISTINCT_KEYS):
        cache.put(k, i)
    for i, k in enumerate(DISTINCT_KEYS):
        assert cache.get(k) == i, k
        assert cache[k] == i, k
        assert k in cache
    assert cache.size() == len(DISTINCT_KEYS)
    for i, k in enumerate(DISTINCT_KEYS):
        assert cache.delete(k) is True, k
    assert cache.size() == 0
    assert cache.check() == []


def test_bool_keys_are_the_ints_they_equal(cache):
    cache[True] = "a"
    assert cache[1] == "a"
    cache[1] = "b"
    assert cache[True] == "b"
    cache.put(False, "zero")
    assert cache.get(0) == "zero"
    cache.put((1, "x"), "t")
    assert cache.get((True, "x")) == "t"
    assert cache.get(((False,), True)) is None
    cache.put(((0,), 1), "nested")
    assert cache.get(((False,), True)) == "nested"
    assert cache.size() == 4
    assert cache.delete(True) is True
    assert 1 not in cache
    assert cache.check() == []


def test_key_equal_across_handles(cache, cache_name):
    other = vela.Cache(cache_name)
    try:
        for i, k in enumerate(DISTINCT_KEYS):
            cache.put(k, i)
        assert [other.get(k) for k in DISTINCT_KEYS] == list(range(len(DISTINCT_KEYS)))
    finally:
        other.close()


@pytest.mark.parametrize("bad", [1.5, [1], None, {"a": 1}, {1}, bytearray(b"x"),
                                 (1, 2.0), (1, [2]), ("a", (None,)), object()])
def test_bad_key_types(cache, bad):
    with pytest.raises(TypeError):
        cache.put(bad, 1)
    with pytest.raises(TypeError):
        cache.get(bad)
    with pytest.raises(TypeError):
        cache[bad]
    with pytest.raises(TypeError):
        cache.delete(bad)
    with pytest.raises(TypeError):
        cache.exists(bad)
    assert cache.size() == 0
    assert cache.stats()["writes"] == 0
    assert cache.check() == []


def test_key_length_limit(cache):
    cache.put("x" * 1000, 1)
    cache.put(b"y" * 1000, 2)
    assert cache.get("x" * 1000) == 1
    assert cache.get(b"y" * 1000) == 2
    for long_key in ("x" * 1025, b"y" * 1025, "z" * 5000, ("a" * 600, "b" * 600)):
        with pytest.raises(ValueError):
            cache.put(long_key, 1)
        with pytest.raises(ValueError):
            cache.get(long_key)
    assert cache.size() == 2
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# values


class MyStr(str):
    pass


class MyInt(int):
    pass


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


VALUES = [
    b"", b"bytes\x00\xff", "", "text", "héllo €", 0, 1, -1, 2 ** 63 - 1, -2 ** 63,
    2 ** 63, -2 ** 63 - 1, 2 ** 100, -2 ** 100, True, False, 1.5, -0.0, float("inf"),
    float("nan"), {"name": "Alice", "n": [1, 2.5, None]}, [1, "a", b"b", [True]],
    (1, (2, "x")), {1, 2}, frozenset({"a"}), bytearray(b"ba"), MyStr("sub"), MyInt(7),
    Point(1, 2), {"nested": {"deep": [(), {}]}},
]


def test_values_round_trip_with_exact_types(cache):
    for i, v in enumerate(VALUES):
        cache.put(("v", i), v)
    for i, v in enumerate(VALUES):
        got = cache.get(("v", i))
        if isinstance(v, Point):
            assert got == v
        else:
            assert same(got, v), (v, got)
    assert type(cache[("v", next(i for i, v in enumerate(VALUES) if v is True))]) is bool
    assert cache.check() == []


def test_none_value_is_distinguishable(cache):
    cache.put("n", None)
    assert cache.get("n", MISSING) is None
    assert cache.get("absent", MISSING) is MISSING
    assert cache["n"] is None
    assert cache.exists("n") is True
    assert cache.size() == 1


def test_large_text_and_bytes_values(cache):
    big_b = bytes(range(256)) * 256       # 64 KiB
    big_s = "ü" * 20000
    cache.put("b", big_b)
    cache.put("s", big_s)
    assert cache.get("b") == big_b
    assert cache.get("s") == big_s
    assert cache.check() == []


def test_unserializable_value_leaves_table_unchanged(cache):
    cache.put("k", "old")
    cache.put("other", 1)
    writes = cache.stats()["writes"]
    for bad in (lambda: 0, (x for x in ()), __import__("threading").Lock()):
        with pytest.raises(TypeError):
            cache.put("k", bad)
        with pytest.raises(TypeError):
            cache.put("new", bad)
    assert cache.get("k") == "old"
    assert "new" not in cache
    assert cache.size() == 2
    assert cache.stats()["writes"] == writes
    assert cache.check() == []


class RecordingSerializer:
    def __init__(self):
        self.dumped = []
        self.loaded = []

    def dumps(self, obj):
        if isinstance(obj, set):
            raise TypeError("sets are not supported")
        self.dumped.append(obj)
        return b"REC:" + pickle.dumps(obj)

    def loads(self, data):
        data = bytes(data)
        self.loaded.append(data)
        assert data.startswith(b"REC:")
        return pickle.loads(data[4:])


def test_custom_serializer(cache_name):
    ser = RecordingSerializer()
    with vela.Cache(cache_name, capacity="8MiB", serializer=ser) as c:
        c.put("d", {"a": [1, 2]})
        assert ser.dumped == [{"a": [1, 2]}]
        assert c.get("d") == {"a": [1, 2]}
        assert len(ser.loaded) == 1 and ser.loaded[0].startswith(b"REC:")
        # bytes, str and int are stored as they are, without the serializer
        c.put("b", b"raw")
        c.put("s", "text")
        c.put("i", 42)
        assert (c.get("b"), c.get("s"), c.get("i")) == (b"raw", "text", 42)
        assert ser.dumped == [{"a": [1, 2]}]
        assert len(ser.loaded) == 1
        # a value the serializer rejects -> TypeError, nothing written
        with pytest.raises(TypeError):
            c.put("set", {1, 2})
        assert "set" not in c
        assert c.size() == 4
        assert c.check() == []


def test_json_serializer(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", serializer="json") as c:
        doc = {"a": [1, 2.5, None, True], "b": {"c": "ü"}}
        c.put("doc", doc)
        assert same(c.get("doc"), doc)
        c.put("tuple", (1, 2))
        assert c.get("tuple") == [1, 2]                       # JSON has no tuples
        c.put("bool", True)
        assert c.get("bool") is True
        c.put("raw", b"\x00\xff")
        assert c.get("raw") == b"\x00\xff"                    # bytes stored as they are
        c.put("float", 0.1)
        assert c.get("float") == 0.1
        with pytest.raises(TypeError):
            c.put("set", {1, 2})
        with pytest.raises(TypeError):
            c.put("obj", object())
        assert "set" not in c and "obj" not in c
        assert c.size() == 5
        assert c.check() == []


def test_msgpack_serializer(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", serializer="msgpack") as c:
        doc = {"a": [1, -2, 2.5, None, False], "b": b"\x01\x02", "s": "ü"}
        c.put("doc", doc)
        assert same(c.get("doc"), doc)
        c.put("tuple", (1, (2, 3)))
        assert c.get("tuple") == [1, [2, 3]]
        c.put("f", 1.25)
        assert c.get("f") == 1.25
        with pytest.raises(TypeError):
            c.put("obj", object())
        assert "obj" not in c
        assert c.size() == 3
        assert c.check() == []


def test_json_and_msgpack_modules_agree_with_our_assumptions():
    # guards the two tests above against an environment where these modules differ
    assert json.loads(json.dumps((1, 2))) == [1, 2]
    assert msgpack.unpackb(msgpack.packb((1, (2, 3)))) == [1, [2, 3]]


# --------------------------------------------------------------------------------------
# TTL


def test_ttl_expiry(cache):
    cache.put("short", "v", ttl=0.2)
    cache.put("keep", "v")
    assert cache.get("short") == "v"
    time.sleep(0.35)
    # an expired entry counts in size() until it is reclaimed
    assert cache.size() == 2
    assert cache.get("short") is None
    assert cache.get("short", MISSING) is MISSING
    assert not cache.exists("short")
    assert "short" not in cache
    with pytest.raises(KeyError):
        cache["short"]
    assert cache.size() == 1
    assert cache.get("keep") == "v"
    assert cache.check() == []


def test_default_ttl_and_infinite_ttl(cache, cache_name):
    short = vela.Cache(cache_name, default_ttl=0.2)     # per-handle option, adopts the rest
    try:
        assert short.stats()["capacity"] == 8 * MiB
        short.put("default", 1)
        short.put("inf", 2, ttl=math.inf)
        short.put("explicit", 3, ttl=30)
        cache.put("other-handle", 4)                     # cache has no default_ttl
        assert 0 < short.ttl("default") <= 0.2
        assert short.ttl("inf") is None
        assert 29 < short.ttl("explicit") <= 30
        assert cache.ttl("other-handle") is None
        time.sleep(0.35)
        assert short.get("default") is None
        assert short.get("inf") == 2
        assert short.get("explicit") == 3
        assert short.get("other-handle") == 4
        assert cache.check() == []
    finally:
        short.close()


@pytest.mark.parametrize("bad_ttl", [0, 0.0, -1, -0.5, float("nan"), -math.inf, "x", "10"])
def test_bad_ttl_raises_and_writes_nothing(cache, bad_ttl):
    cache.put("existing", "old")
    with pytest.raises(ValueError):
        cache.put("k", "v", ttl=bad_ttl)
    with pytest.raises(ValueError):
        cache.put("existing", "new", ttl=bad_ttl)
    assert cache.get("k") is None
    assert cache.get("existing") == "old"
    assert cache.ttl("existing") is None
    assert cache.size() == 1
    assert cache.stats()["writes"] == 1
    assert cache.check() == []


@pytest.mark.parametrize("bad_ttl", [0, -1, float("nan"), "x"])
def test_bad_default_ttl_is_an_option_error(cache_name, bad_ttl):
    with pytest.raises(vela.OptionError, match="default_ttl"):
        vela.Cache(cache_name, capacity="8MiB", default_ttl=bad_ttl)


def test_ttl_method(cache):
    cache.put("t", 1, ttl=10)
    cache.put("forever", 1)
    remaining = cache.ttl("t")
    assert type(remaining) is float
    assert 9 < remaining <= 10
    assert cache.ttl("forever") is None
    with pytest.raises(KeyError):
        cache.ttl("absent")
    cache.put("gone", 1, ttl=0.2)
    time.sleep(0.35)
    with pytest.raises(KeyError):
        cache.ttl("gone")


def test_touch(cache):
    assert cache.touch("absent", ttl=10) is False
    assert "absent" not in cache
    cache.put("k", "v", ttl=0.3)
    assert cache.touch("k", ttl=10) is True
    assert 9 < cache.ttl("k") <= 10
    time.sleep(0.45)
    assert cache.get("k") == "v"
    assert cache.touch("k", ttl=math.inf) is True
    assert cache.ttl("k") is None
    assert cache.touch("k", ttl=0.2) is True
    time.sleep(0.35)
    assert cache.get("k") is None
    assert cache.touch("k", ttl=10) is False
    cache.put("z", 1)
    with pytest.raises(ValueError):
        cache.touch("z", ttl=-1)
    assert cache.ttl("z") is None
    assert cache.check() == []


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
    assert cache.incr("i", 3) == 13
    assert cache["i"] == 13
    assert cache.check() == []


def test_incr_ttl_applies_to_missing_key_only(cache):
    assert cache.incr("n", ttl=0.3) == 1
    assert 0 < cache.ttl("n") <= 0.3
    assert cache.incr("n") == 2                   # keeps its expiry
    assert 0 < cache.ttl("n") <= 0.3
    time.sleep(0.45)
    assert cache.get("n") is None
    assert cache.incr("n") == 1                   # starts again from 0, never expires
    assert cache.ttl("n") is None


@pytest.mark.parametrize("value", ["abc", b"1", 1.5, [1], {"a": 1}, None])
def test_incr_non_integer_raises_type_error(cache, value):
    cache.put("v", value)
    with pytest.raises(TypeError):
        cache.incr("v")
    with pytest.raises(TypeError):
        cache.decr("v")
    assert same(cache.get("v", MISSING), value)
    assert cache.check() == []


def test_expire_reclaims_expired_entries(cache):
    for i in range(5):
        cache.put(f"short{i}", i, ttl=0.2)
    for i in range(3):
        cache.put(f"keep{i}", i)
    assert cache.expire() == 0
    time.sleep(0.35)
    assert cache.size() == 8
    assert cache.expire() == 5
    assert cache.size() == 3
    assert cache.expire() == 0
    assert cache.stats()["expirations"] == 5
    assert [cache.get(f"keep{i}") for i in range(3)] == [0, 1, 2]
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("capacity,expected", [
    ("8MiB", 8 * MiB), (4 * MiB, 4 * MiB), ("3.5MiB", 3670016), (MiB, MiB), ("2MB", 2_000_000),
])
def test_capacity_parsing(cache_name, capacity, expected):
    with vela.Cache(cache_name, capacity=capacity) as c:
        assert c.stats()["capacity"] == expected
        c.put("k", b"v" * 1000)
        assert c.get("k") == b"v" * 1000
        assert c.check() == []


@pytest.mark.parametrize("capacity", [1024, MiB - 1, "512KB", 0, -1, "lots", "", "10XB", "MiB"])
def test_bad_capacity(cache_name, capacity):
    with pytest.raises(vela.OptionError, match="capacity"):
        vela.Cache(cache_name, capacity=capacity)
    assert vela.destroy(cache_name) is False      # nothing was created


def test_unknown_option_is_named(cache_name):
    with pytest.raises(vela.OptionError, match="capasity"):
        vela.Cache(cache_name, capasity="8MiB")
    assert vela.destroy(cache_name) is False


@pytest.mark.parametrize("option,value", [
    ("eviction_policy", "foo"), ("eviction_policy", "LRU!"),
    ("stripes", 3), ("stripes", 0), ("stripes", 8192), ("stripes", -4), ("stripes", "x"),
    ("max_size", -1), ("max_size", "x"),
    ("max_entry_size", -1), ("max_entry_size", "x"),
    ("serializer", "yaml"), ("serializer", object()),
    ("backend", "nope"), ("topology", "nope"),
])
def test_bad_option_values(cache_name, option, value):
    with pytest.raises(vela.OptionError, match=option):
        vela.Cache(cache_name, capacity="8MiB", **{option: value})
    assert vela.destroy(cache_name) is False


def test_all_documented_options_accepted_with_defaults(cache_name):
    with vela.Cache(
        cache_name, backend="shm", backend_opts={}, topology="local", topology_opts={},
        capacity="8MiB", default_ttl=None, max_size=None, eviction_policy="lru",
        stampede_protection=True, stampede_timeout=5.0, stats_enabled=True,
        telemetry_prefix=("vela", "cache"), sweep_interval=30.0, near_cache=False,
        near_cache_l1_ttl=60.0, serializer="pickle", stripes=64, max_entry_size=MiB // 8,
    ) as c:
        c.put("k", {"v": 1})
        assert c.get("k") == {"v": 1}
        assert c.check() == []


@pytest.mark.parametrize("stripes", [1, 2, 16, 4096])
def test_stripe_counts(cache_name, stripes):
    with vela.Cache(cache_name, capacity="16MiB", stripes=stripes) as c:
        for i in range(300):
            c.put(i, str(i))
        assert all(c.get(i) == str(i) for i in range(300))
        assert c.size() == 300
        assert c.invalidate_tag("none") == 0
        assert c.check() == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a b", "x" * 201, "é", "a\x00b"])
def test_bad_names(name):
    with pytest.raises(ValueError) as exc:
        vela.Cache(name, capacity="8MiB")
    if name and "\x00" not in name:
        assert name in str(exc.value) or repr(name) in str(exc.value)


def test_longest_valid_name():
    long_name = ("Ab9_.-" + new_name()).ljust(200, "z")
    try:
        with vela.Cache(long_name, capacity="1MiB") as c:
            c.put("k", 1)
            assert c.get("k") == 1
    finally:
        vela.destroy(long_name)


# --------------------------------------------------------------------------------------
# layout agreement between handles


@pytest.mark.parametrize("option,first,second", [
    ("capacity", "8MiB", "16MiB"),
    ("stripes", 16, 32),
    ("max_size", 100, 200),
    ("max_entry_size", 4096, 8192),
    ("eviction_policy", "lru", "lfu"),
    ("eviction_policy", "ttl_only", "lru"),
])
def test_layout_mismatch(cache_name, option, first, second):
    opts = {"capacity": "8MiB", option: first}
    with vela.Cache(cache_name, **opts) as c:
        c.put("k", 1)
        with pytest.raises(vela.LayoutMismatch, match=option):
            vela.Cache(cache_name, **{option: second})
        # an explicit equal value, and omitting it, both attach
        with vela.Cache(cache_name, **{option: first}) as same_opt:
            assert same_opt.get("k") == 1
        with vela.Cache(cache_name) as adopted:
            assert adopted.get("k") == 1
            assert adopted.stats()["capacity"] == 8 * MiB
        # the adopting handle did not change the stored value
        with pytest.raises(vela.LayoutMismatch):
            vela.Cache(cache_name, **{option: second})
        assert c.get("k") == 1
        assert c.check() == []


def test_layout_mismatch_on_default_values(cache, cache_name):
    # the fixture created the table with the default policy (lru)
    with vela.Cache(cache_name, eviction_policy="lru") as c:
        assert c.stats()["capacity"] == 8 * MiB
    with pytest.raises(vela.LayoutMismatch, match="eviction_policy"):
        vela.Cache(cache_name, eviction_policy="lfu")
    with pytest.raises(vela.LayoutMismatch, match="capacity"):
        vela.Cache(cache_name, capacity="64MiB")


def test_adopting_handle_honours_stored_max_size(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", max_size=50) as first:
        with vela.Cache(cache_name) as second:
            for i in range(300):
                second.put(i, i)
                assert second.size() <= 50
            assert first.size() <= 50
            assert second.check() == []


# --------------------------------------------------------------------------------------
# entry size


def test_value_too_large(cache):
    limit = 8 * MiB // 64
    cache.put("k", b"old")
    just_under = b"u" * (limit - 512)
    cache.put("under", just_under)
    assert cache.get("under") == just_under
    with pytest.raises(vela.ValueTooLarge):
        cache.put("k", b"x" * (limit + 1))
    with pytest.raises(ValueError):
        cache.put("big", b"x" * (4 * limit))
    with pytest.raises(vela.ValueTooLarge):
        cache.put("str", "s" * (limit + 1))
    with pytest.raises(vela.ValueTooLarge):
        cache.put("list", list(range(limit)))            # pickled: far over the limit
    assert cache.get("k") == b"old"
    assert "big" not in cache and "str" not in cache and "list" not in cache
    assert cache.size() == 2
    assert cache.check() == []


def test_explicit_max_entry_size(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", max_entry_size=4096) as c:
        c.put("ok", b"a" * 3500)
        assert c.get("ok") == b"a" * 3500
        with pytest.raises(vela.ValueTooLarge):
            c.put("big", b"a" * 5000)
        assert c.size() == 1
        assert c.check() == []


def test_max_entry_size_entries_fit_in_every_stripe(cache):
    # 8 MiB / 256 stripes would be 32 KiB per stripe; max_entry_size is 128 KiB
    value_size = 8 * MiB // 64 - 1024
    keys = [f"big{i}" for i in range(24)]
    for i, k in enumerate(keys):
        cache.put(k, bytes([i]) * value_size)
    for i, k in enumerate(keys):
        assert cache.get(k) == bytes([i]) * value_size, k
    assert cache.stats()["evictions"] == 0
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# lifecycle


def test_close_then_any_call_raises_cache_closed(cache_name):
    c = vela.Cache(cache_name, capacity="8MiB")
    c.put("k", 1)
    c.close()
    calls = [
        lambda: c.get("k"), lambda: c["k"], lambda: c.put("k", 2),
        lambda: c.__setitem__("k", 2), lambda: c.__delitem__("k"), lambda: c.delete("k"),
        lambda: c.exists("k"), lambda: "k" in c, lambda: c.flush(), lambda: c.size(),
        lambda: len(c), lambda: c.stats(), lambda: c.check(), lambda: c.invalidate_tag("t"),
        lambda: c.ttl("k"), lambda: c.touch("k", ttl=5), lambda: c.incr("n"),
        lambda: c.decr("n"), lambda: c.expire(), lambda: c.get_or_fetch("k", lambda k: 1),
    ]
    for call in calls:
        with pytest.raises(vela.CacheClosed):
            call()
    # the segment itself is still there
    with vela.Cache(cache_name) as again:
        assert again.get("k") == 1


def test_context_manager(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as c:
        assert isinstance(c, vela.Cache)
        c.put("k", "v")
    with pytest.raises(vela.CacheClosed):
        c.get("k")
    with vela.Cache(cache_name) as c2:
        assert c2.get("k") == "v"


def test_destroy(cache_name):
    assert vela.destroy(cache_name) is False
    c = vela.Cache(cache_name, capacity="8MiB")
    c.put("k", "v")
    assert vela.destroy(cache_name) is True
    assert vela.destroy(cache_name) is False
    # a handle still open keeps its mapping
    c.put("k2", "v2")
    assert c.get("k") == "v" and c.get("k2") == "v2"
    # a new handle gets a new, empty table
    with vela.Cache(cache_name, capacity="8MiB") as fresh:
        assert fresh.get("k") is None
        assert fresh.size() == 0
    c.close()
    # destroy takes the backend options of Cache
    assert vela.destroy(cache_name, backend="shm") is True
    assert vela.destroy(cache_name, backend="shm") is False


def test_cache_destroy_method(cache_name):
    c = vela.Cache(cache_name, capacity="8MiB")
    c.put("k", 1)
    c.destroy()
    with pytest.raises(vela.CacheClosed):
        c.get("k")
    assert vela.destroy(cache_name) is False


# --------------------------------------------------------------------------------------
# eviction


def test_max_size_honoured(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", max_size=100) as c:
        for i in range(1000):
            c.put(i, f"value{i}")
            assert c.get(i) == f"value{i}"
            assert c.size() <= 100
        size = c.size()
        s = c.stats()
        assert size >= 50
        assert s["writes"] == 1000
        assert s["evictions"] == 1000 - size
        assert s["size"] == size
        assert c.check() == []


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_recently_read_entries_survive_pressure(cache_name, policy):
    rng = random.Random(7)
    with vela.Cache(cache_name, capacity="2MiB", eviction_policy=policy) as c:
        hot = [f"hot{i}" for i in range(40)]
        control = [f"control{i}" for i in range(40)]
        for k in hot + control:
            c.put(k, k.encode() * 50)                 # ~300-500 B
        for n in range(8000):                          # ~8 MiB of cold data, 4x the capacity
            c.put(f"cold{n}", rng.randbytes(1024))
            if n % 40 == 0:
                for k in hot:
                    c.get(k)
        hot_alive = sum(c.get(k) == k.encode() * 50 for k in hot)
        assert hot_alive >= 36, hot_alive
        if policy == "lru":
            control_alive = sum(k in c for k in control)
            assert control_alive <= 8, control_alive
        assert c.stats()["evictions"] > 4000
        assert c.check() == []


def test_ttl_only_cache_full_then_reclaims_expired(cache_name):
    with vela.Cache(cache_name, capacity="2MiB", eviction_policy="ttl_only") as c:
        value = b"v" * 1024
        written = []
        started = time.monotonic()
        with pytest.raises(vela.CacheFull):
            for i in range(4096):
                c.put(f"k{i}", value, ttl=3.0)
                written.append(f"k{i}")
        last_put = time.monotonic()
        assert last_put - started < 2.5, "filling took too long for the 3 s TTL"
        assert len(written) >= 512
        assert c.size() == len(written)
        with pytest.raises(vela.CacheFull):
            c.put("forever", value)
        assert all(c.get(k) == value for k in written)
        s = c.stats()
        assert s["evictions"] == 0
        time.sleep(max(0.0, started + 3.2 - time.monotonic()))
        c.put("forever", value)                    # reclaims expired entries first
        assert c.get("forever") == value
        for i in range(200):
            c.put(f"again{i}", value)
        assert c.stats()["evictions"] == 0
        assert c.check() == []


def test_ttl_only_max_size(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", max_size=10, eviction_policy="ttl_only") as c:
        for i in range(10):
            c.put(i, i)
        with pytest.raises(vela.CacheFull):
            c.put(10, 10)
        assert 10 not in c
        c.put(3, "overwrite")                       # does not grow the table
        assert c.get(3) == "overwrite"
        c.delete(0)
        c.put(10, 10)
        assert c.size() == 10
        assert c.stats()["evictions"] == 0
        assert c.check() == []


def test_mixed_value_sizes_under_lru_never_fail(cache):
    rng = random.Random(175)
    limit = 64 * 1024
    # phase 1: small values fill all memory (distinct keys); phase 2: random sizes over a
    # pool of keys; phase 3: only big values (OpenResty #175)
    plan = [(f"s{n}", rng.randint(100, 300)) for n in range(40000)]
    plan += [(f"m{rng.randrange(20000)}", int(math.exp(rng.uniform(math.log(100),
                                                                  math.log(limit)))))
             for _ in range(3000)]
    plan += [(f"m{rng.randrange(20000)}", rng.randint(limit // 2, limit)) for _ in range(400)]
    for n, (key, size) in enumerate(plan):
        value = rng.randbytes(16) * (size // 16) + b"x" * (size % 16)
        cache.put(key, value)
        assert cache.get(key) == value, (n, size)
    s = cache.stats()
    assert s["evictions"] > 0
    assert s["memory_used"] <= s["capacity"]
    assert cache.check() == []


# --------------------------------------------------------------------------------------
# get_or_fetch


def test_get_or_fetch(cache):
    calls = []

    def fetch(key):
        calls.append(key)
        return {"computed": key}

    assert cache.get_or_fetch("k", fetch) == {"computed": "k"}
    assert cache.get_or_fetch("k", fetch) == {"computed": "k"}
    assert calls == ["k"]
    assert cache.get("k") == {"computed": "k"}
    s = cache.stats()
    assert (s["hits"], s["misses"], s["fetches"], s["writes"]) == (2, 1, 1, 1)
    assert cache.get_or_fetch(("t", 1), lambda k: list(k), ttl=0.2, tags=["g"]) == ["t", 1]
    assert 0 < cache.ttl(("t", 1)) <= 0.2
    assert cache.invalidate_tag("g") == 1
    assert cache.check() == []


def test_get_or_fetch_error_propagates_and_stores_nothing(cache):
    class Boom(Exception):
        pass

    def fail(key):
        raise Boom(key)

    with pytest.raises(Boom):
        cache.get_or_fetch("k", fail)
    assert "k" not in cache
    assert cache.get_or_fetch("k", lambda key: 5) == 5
    assert cache.get("k") == 5
    assert cache.check() == []


def _fetch_that_uses_the_cache(name):
    # stripes=1: every key shares the one stripe, so a lock held during fetch_fn would
    # deadlock the calls below
    with vela.Cache(name) as c:
        def fetch(key):
            c.put("side", 1)
            return ("fetched", c.get("side"), c.get(key))

        first = c.get_or_fetch("k", fetch)
        return first, c.get("k"), c.check()


def test_get_or_fetch_holds_no_lock_while_fetch_runs(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", stripes=1):
        first, stored, problems = run_in_child(_fetch_that_uses_the_cache, cache_name,
                                               timeout=20)
    assert first == ("fetched", 1, None)
    assert stored == ("fetched", 1, None)
    assert problems == []


# --------------------------------------------------------------------------------------
# telemetry


def test_telemetry_get_events(cache_name):
    events = []

    def handler(event, measurements, metadata):
        events.append((tuple(event), dict(measurements), dict(metadata)))

    vela.telemetry.attach("test-get", [("app", "c", "get", "stop")], handler)
    try:
        with vela.Cache(cache_name, capacity="8MiB", telemetry_prefix=("app", "c")) as c:
            c.put("k", 1)
            c.get("k")
            c.get("missing")
            assert [e[0] for e in events] == [("app", "c", "get", "stop")] * 2
            assert [e[2]["result"] for e in events] == ["hit", "miss"]
            assert [e[2]["key"] for e in events] == ["k", "missing"]
            assert all(e[2]["cache"] == cache_name for e in events)
            assert all(type(e[1]["duration"]) is int and e[1]["duration"] >= 0
                       for e in events)
    finally:
        vela.telemetry.detach("test-get")
    with vela.Cache(cache_name) as c:
        c.get("k")
    assert len(events) == 2


def test_topology_is_a_segment_option(cache_name):
    """A cache opened without topology is local (no change log in its segment);
    the topology must agree between processes like the other layout options."""
    with vela.Cache(cache_name, capacity="4MiB") as c:
        state = c._table.log_state()
        assert state["replicated"] == 0 and state["size"] == 0
        with pytest.raises(vela.LayoutMismatch, match="topology=replicated"):
            vela.Cache(cache_name, topology="replicated")
        with vela.Cache(cache_name, topology="local") as same:
            assert same.info()["capacity"] == 4 << 20
    vela.destroy(cache_name)
    with vela.Cache(cache_name, capacity="4MiB", topology="replicated") as r:
        assert r._table.log_state()["replicated"] == 1
        with vela.Cache(cache_name) as adopter:  # omitted: adopts
            assert adopter._table.log_state()["replicated"] == 1
        with pytest.raises(vela.LayoutMismatch, match="topology=local"):
            vela.Cache(cache_name, topology="local")
