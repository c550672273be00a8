"""vela.contrib.django.VelaCache against the behaviours Django's own cache tests
(tests/cache/tests.py, BaseCacheTests) expect of every backend, for the calls it
implements, plus what sharing one table between processes adds. Timeouts are
shortened (Vela takes float seconds) so the file runs in a few seconds.
"""
import asyncio
import pickle
import time
import warnings
import zlib

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(USE_TZ=True)
    django.setup()

from django.core.cache import CacheKeyWarning, InvalidCacheKey, caches  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

import vela  # noqa: E402
from conftest import new_name, run_children  # noqa: E402

KEY_ERRORS_WITH_MEMCACHED_MSG = "Cache key contains characters that will cause errors if used with memcached: %r"
BACKEND = "vela.contrib.django.VelaCache"


def custom_key_func(key, key_prefix, version):
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def f():
    return 42


class C:
    def m(n):
        return 24


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError()


@pytest.fixture(scope="module")
def location():
    name, cull = new_name(), new_name()
    common = {"BACKEND": BACKEND, "LOCATION": name, "OPTIONS": {"capacity": "4MiB"}}
    setting = {
        "default": dict(common),
        "prefix": dict(common, KEY_PREFIX="cacheprefix"),
        "v2": dict(common, VERSION=2),
        "custom_key": dict(common, KEY_FUNCTION=custom_key_func),
        "custom_key2": dict(common, KEY_FUNCTION=f"{__name__}.custom_key_func"),
        "cull": {"BACKEND": BACKEND, "LOCATION": cull, "OPTIONS": {"capacity": "4MiB", "MAX_ENTRIES": 30}},
    }
    with override_settings(CACHES=setting):
        yield name
    vela.destroy(name)
    vela.destroy(cull)


@pytest.fixture
def cache(location):
    c = caches["default"]
    yield c
    c.clear()


def test_simple(cache):
    cache.set("key", "value")
    assert cache.get("key") == "value"


def test_default_used_when_none_is_set(cache):
    cache.set("key_default_none", None)
    assert cache.get("key_default_none", default="default") is None


def test_add(cache):
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_prefix(cache):
    cache.set("somekey", "value")
    assert caches["prefix"].has_key("somekey") is False
    caches["prefix"].set("somekey", "value2")
    assert cache.get("somekey") == "value"
    assert caches["prefix"].get("somekey") == "value2"


def test_non_existent(cache):
    assert cache.get("does_not_exist") is None
    assert cache.get("does_not_exist", "bang!") == "bang!"


def test_get_many(cache):
    cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    cache.set_many({"x": None, "y": 1})
    assert cache.get_many(["x", "y"]) == {"x": None, "y": 1}


def test_delete(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.get("key1") == "spam"
    assert cache.delete("key1") is True
    assert cache.get("key1") is None
    assert cache.get("key2") == "eggs"
    assert cache.delete("nonexistent_key") is False


def test_has_key_and_in(cache):
    cache.set("hello1", "goodbye1")
    assert cache.has_key("hello1") is True
    assert cache.has_key("goodbye1") is False
    cache.set("no_expiry", "here", None)
    assert cache.has_key("no_expiry") is True
    cache.set("null", None)
    assert cache.has_key("null") is True
    assert "hello1" in cache and "null" in cache and "goodbye1" not in cache


def test_incr(cache):
    cache.set("answer", 41)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.get("answer") == 52
    assert cache.incr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.incr("does_not_exist")
    with pytest.raises(ValueError):
        cache.incr("does_not_exist", -1)
    assert cache.has_key("does_not_exist") is False
    cache.set("null", None)
    with pytest.raises(TypeError):
        cache.incr("null")


def test_decr(cache):
    cache.set("answer", 43)
    assert cache.decr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.decr("answer", 10) == 32
    assert cache.decr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.decr("does_not_exist")
    cache.set("null", None)
    with pytest.raises(TypeError):
        cache.decr("null")


def test_incr_keeps_the_timeout(cache):
    cache.set("counter", 1, 0.3)
    assert cache.incr("counter") == 2
    time.sleep(0.5)
    assert cache.get("counter") is None


def test_close_keeps_working(cache):
    cache.close()
    cache.set("after_close", 1)
    assert cache.get("after_close") == 1


def test_data_types(cache):
    tests = {"string": "this is a string", "int": 42, "bool": True, "list": [1, 2, 3, 4],
             "tuple": (1, 2, 3, 4), "dict": {"A": 1, "B": 2}, "function": f, "class": C,
             "big_int": 2 ** 80, "float": 1.5}
    for key, value in tests.items():
        cache.set(key, value)
        got = cache.get(key)
        assert got == value and type(got) is type(value), key


def test_expiration(cache):
    cache.set("expire1", "very quickly", 0.2)
    cache.set("expire2", "very quickly", 0.2)
    cache.set("expire3", "very quickly", 0.2)
    time.sleep(0.4)
    assert cache.get("expire1") is None
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"
    assert cache.has_key("expire3") is False


def test_touch(cache):
    cache.set("expire1", "very quickly", timeout=0.2)
    assert cache.touch("expire1", timeout=0.6) is True
    time.sleep(0.3)
    assert cache.has_key("expire1") is True
    time.sleep(0.4)
    assert cache.has_key("expire1") is False
    cache.set("expire1", "very quickly", timeout=0.2)
    assert cache.touch("expire1") is True  # the default timeout: 300 s
    time.sleep(0.3)
    assert cache.has_key("expire1") is True
    assert cache.touch("nonexistent") is False


def test_unicode(cache):
    stuff = {"ascii": "ascii_value", "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
             "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2", "ascii2": {"x": 1}}
    for key, value in stuff.items():
        cache.set(key, value)
        assert cache.get(key) == value
    for key, value in stuff.items():
        assert cache.delete(key) is True
        assert cache.add(key, value) is True
        assert cache.get(key) == value
    for key in stuff:
        assert cache.delete(key) is True
    cache.set_many(stuff)
    for key, value in stuff.items():
        assert cache.get(key) == value


def test_binary_string(cache):
    value = "value_to_be_compressed"
    compressed = zlib.compress(value.encode())
    cache.set("binary1", compressed)
    assert zlib.decompress(cache.get("binary1")).decode() == value
    assert cache.add("binary1-add", compressed) is True
    assert cache.get("binary1-add") == compressed
    cache.set_many({"binary1-set_many": compressed})
    assert cache.get("binary1-set_many") == compressed


def test_set_many(cache):
    assert cache.set_many({"key1": "spam", "key2": "eggs"}) == []
    assert cache.get("key1") == "spam"
    assert cache.get("key2") == "eggs"
    assert cache.set_many({}) == []


def test_set_many_expiration(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"}, 0.2)
    time.sleep(0.4)
    assert cache.get("key1") is None
    assert cache.get("key2") is None


def test_delete_many(cache):
    cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
    assert cache.delete_many(["key1", "key2"]) is None
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert cache.get("key3") == "ham"
    assert cache.delete_many([]) is None


def test_clear(cache):
    cache.set_many({"key1": "spam", "key2": "eggs"})
    cache.clear()
    assert cache.get("key1") is None
    assert cache.get("key2") is None


def test_long_timeout(cache):
    # Not memcached's "over 30 days is a timestamp": a long timeout is a duration.
    cache.set("key1", "eggs", 60 * 60 * 24 * 30 + 1)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", 60 * 60 * 24 * 30 + 1) is True
    assert cache.get("key2") == "ham"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 60 * 60 * 24 * 30 + 1)
    assert cache.get("key3") == "sausage"
    assert cache.vela_cache.ttl(cache.make_key("key3")) > 60 * 60 * 24 * 30


def test_forever_timeout(cache):
    cache.set("key1", "eggs", None)
    assert cache.get("key1") == "eggs"
    assert cache.vela_cache.ttl(cache.make_key("key1")) is None
    assert cache.add("key2", "ham", None) is True
    assert cache.get("key2") == "ham"
    assert cache.add("key1", "new eggs", None) is False
    assert cache.get("key1") == "eggs"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
    assert cache.get("key3") == "sausage"
    assert cache.get("key4") == "lobster bisque"
    cache.set("key5", "belgian fries", timeout=0.2)
    assert cache.touch("key5", timeout=None) is True
    time.sleep(0.4)
    assert cache.get("key5") == "belgian fries"


def test_zero_timeout(cache):
    cache.set("key1", "eggs", 0)
    assert cache.get("key1") is None
    assert cache.add("key2", "ham", 0) is True
    assert cache.get("key2") is None
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
    assert cache.get("key3") is None
    assert cache.get("key4") is None
    cache.set("key5", "belgian fries", timeout=5)
    assert cache.touch("key5", timeout=0) is True
    assert cache.get("key5") is None
    # a zero (or negative) timeout on an existing key removes it
    cache.set("key6", "chips")
    cache.set("key6", "chips", -1)
    assert cache.has_key("key6") is False
    cache.set("key7", "peas")
    assert cache.add("key7", "beans", 0) is False
    assert cache.get("key7") == "peas"


def test_float_timeout(cache):
    cache.set("key1", "spam", 100.2)
    assert cache.get("key1") == "spam"


def test_default_timeout_is_300(cache):
    cache.set("key1", "spam")
    assert 299 < cache.vela_cache.ttl(cache.make_key("key1")) <= 300


def test_max_entries_bounds_the_cache(location):
    cull = caches["cull"]
    for i in range(1, 50):
        cull.set("cull%d" % i, "value", 1000)
    kept = sum(cull.has_key("cull%d" % i) for i in range(1, 50))
    assert 0 < kept <= 30
    assert cull.has_key("cull49") is True  # the newest survived


def _invalid_key_test(cache, key, expected_warning, key_func=None):
    old_func = cache.key_func
    cache.key_func = key_func or (lambda key, *args: key)
    tests = [("add", [key, 1]), ("get", [key]), ("set", [key, 1]), ("incr", [key]), ("decr", [key]),
             ("touch", [key]), ("delete", [key]), ("get_many", [[key, "b"]]),
             ("set_many", [{key: 1, "b": 2}]), ("delete_many", [[key, "b"]])]
    try:
        for operation, args in tests:
            with pytest.warns(CacheKeyWarning) as record:
                getattr(cache, operation)(*args)
            assert str(record[0].message) == expected_warning, operation
    finally:
        cache.key_func = old_func


def test_invalid_key_characters(cache):
    key = "key with spaces and 清"
    _invalid_key_test(cache, key, KEY_ERRORS_WITH_MEMCACHED_MSG % key)


def test_invalid_key_length(cache):
    key = ("a" * 250) + "清"
    _invalid_key_test(cache, key, "Cache key will cause errors if used with memcached: "
                                  "%r (longer than %s)" % (key, 250))


def test_invalid_with_version_key_length(cache):
    def key_func(key, *args):
        return key + ":1"
    key = "a" * 249
    _invalid_key_test(cache, key, "Cache key will cause errors if used with memcached: "
                                  "%r (longer than %s)" % (key_func(key), 250), key_func=key_func)


def test_key_longer_than_vela_accepts(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        with pytest.raises(InvalidCacheKey, match="too long for Vela"):
            cache.set("x" * 2000, 1)
        cache.set("x" * 900, 1)
        assert cache.get("x" * 900) == 1


def test_cache_versioning_get_set(cache):
    v2 = caches["v2"]
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert v2.get("answer1") is None
    assert v2.get("answer1", version=1) == 42
    cache.set("answer2", 42, version=2)
    assert cache.get("answer2") is None
    assert cache.get("answer2", version=2) == 42
    assert v2.get("answer2") == 42
    v2.set("answer4", 42, version=1)
    assert cache.get("answer4") == 42
    assert v2.get("answer4") is None


def test_cache_versioning_add(cache):
    v2 = caches["v2"]
    assert cache.add("answer1", 42, version=2) is True
    assert cache.get("answer1", version=1) is None
    assert cache.get("answer1", version=2) == 42
    assert cache.add("answer1", 37, version=2) is False
    assert cache.add("answer1", 37, version=1) is True
    assert cache.get("answer1", version=1) == 37
    assert cache.get("answer1", version=2) == 42
    assert v2.add("answer2", 42) is True
    assert v2.add("answer2", 37) is False
    assert v2.add("answer2", 37, version=1) is True
    assert cache.get("answer2", version=1) == 37
    assert cache.get("answer2", version=2) == 42


def test_cache_versioning_has_key_and_delete(cache):
    v2 = caches["v2"]
    cache.set("answer1", 42)
    assert cache.has_key("answer1", version=1) is True
    assert cache.has_key("answer1", version=2) is False
    assert v2.has_key("answer1") is False
    assert v2.has_key("answer1", version=1) is True
    cache.set("answer2", 37, version=1)
    cache.set("answer2", 42, version=2)
    assert v2.delete("answer2") is True
    assert cache.get("answer2", version=1) == 37
    assert cache.get("answer2", version=2) is None


def test_cache_versioning_incr_decr(cache):
    v2 = caches["v2"]
    cache.set("answer1", 37, version=1)
    cache.set("answer1", 42, version=2)
    assert cache.incr("answer1") == 38
    assert cache.get("answer1", version=2) == 42
    assert cache.decr("answer1") == 37
    assert cache.incr("answer1", version=2) == 43
    assert v2.decr("answer1") == 42
    assert v2.incr("answer1", version=1) == 38
    assert cache.get("answer1", version=1) == 38


def test_cache_versioning_get_set_many(cache):
    v2 = caches["v2"]
    cache.set_many({"ford1": 37, "arthur1": 42})
    assert cache.get_many(["ford1", "arthur1"]) == {"ford1": 37, "arthur1": 42}
    assert cache.get_many(["ford1", "arthur1"], version=2) == {}
    assert v2.get_many(["ford1", "arthur1"]) == {}
    assert v2.get_many(["ford1", "arthur1"], version=1) == {"ford1": 37, "arthur1": 42}
    v2.set_many({"ford4": 37, "arthur4": 42}, version=1)
    assert cache.get_many(["ford4", "arthur4"]) == {"ford4": 37, "arthur4": 42}
    assert v2.get_many(["ford4", "arthur4"]) == {}


def test_incr_version(cache):
    v2 = caches["v2"]
    cache.set("answer", 42, version=2)
    assert cache.get("answer") is None
    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42
    v2.set("answer2", 42)
    assert v2.incr_version("answer2") == 3
    assert v2.get("answer2") is None
    assert v2.get("answer2", version=3) == 42
    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")
    cache.set("null", None)
    assert cache.incr_version("null") == 2


def test_decr_version(cache):
    cache.set("answer", 42, version=2)
    assert cache.decr_version("answer", version=2) == 1
    assert cache.get("answer") == 42
    assert cache.get("answer", version=2) is None
    with pytest.raises(ValueError):
        cache.decr_version("does_not_exist", version=2)


def test_custom_key_func(cache):
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert caches["custom_key"].get("answer1") is None
    assert caches["custom_key2"].get("answer1") is None
    caches["custom_key"].set("answer2", 42)
    assert cache.get("answer2") is None
    assert caches["custom_key"].get("answer2") == 42
    assert caches["custom_key2"].get("answer2") == 42


def test_fail_on_pickleerror(cache):
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.set("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.set_many({"unpicklable": Unpicklable()})
    assert cache.has_key("unpicklable") is False
    assert cache.add("unpicklable", "fine now") is True  # the failed add left no lease behind


def test_get_or_set(cache):
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("null", None) is None
    assert cache.get("null", "default") is None


def test_get_or_set_callable(cache):
    def my_callable():
        return "value"
    assert cache.get_or_set("mykey", my_callable) == "value"
    assert cache.get_or_set("mykey", my_callable()) == "value"
    assert cache.get_or_set("null", lambda: None) is None
    assert cache.get("null", "default") is None


def test_get_or_set_version(cache):
    msg = "get_or_set() missing 1 required positional argument: 'default'"
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    with pytest.raises(TypeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        cache.get_or_set("brian")
    with pytest.raises(TypeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        cache.get_or_set("brian", version=1)
    assert cache.get("brian", version=1) is None
    assert cache.get_or_set("brian", 42, version=1) == 42
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    assert cache.get("brian", version=3) is None


def test_get_or_set_racing(cache, monkeypatch):
    # add() losing the race: the default is still returned
    monkeypatch.setattr(type(cache), "add", lambda *a, **k: False)
    assert cache.get_or_set("key", "default") == "default"


def test_async_api(cache):
    async def run():
        await cache.aset("akey", "avalue")
        assert await cache.aget("akey") == "avalue"
        assert await cache.aadd("akey", "other") is False
        assert await cache.aadd("fresh", "x") is True
        assert await cache.aget_or_set("akey2", lambda: 5) == 5
        assert await cache.aget_or_set("akey2", lambda: 6) == 5
        assert await cache.ahas_key("akey2") is True
        assert await cache.adelete("akey") is True
        assert await cache.adelete("akey") is False
        assert await cache.aset_many({"m1": 1, "m2": 2}) == []
        assert await cache.aget_many(["m1", "m2", "absent"]) == {"m1": 1, "m2": 2}
        assert await cache.aincr("m1", 10) == 11 and await cache.adecr("m1") == 10
        assert await cache.atouch("m2", 60) is True
        await cache.adelete_many(["m1", "m2"])
        assert await cache.aget_many(["m1", "m2"]) == {}
        await cache.aset("gone", 1, timeout=0)  # Django: expires at once
        assert await cache.aget("gone", "default") == "default"
        with pytest.raises(ValueError, match="not found"):
            await cache.aincr("absent")
        await cache.aclear()
        assert await cache.ahas_key("akey2") is False
        await cache.aclose()
    asyncio.run(run())


def test_async_api_is_vela_s_own_not_the_sync_call_in_a_thread(cache, monkeypatch):
    """Django's defaults run the sync method in a thread; Vela's await its coroutines."""
    for name in ("get", "set", "delete", "has_key", "get_many", "set_many", "clear", "get_or_set"):
        monkeypatch.setattr(type(cache), name, lambda *a, **k: pytest.fail("a sync method was called"))

    async def run():
        await cache.aset("k", {"v": 1})
        assert await cache.aget("k") == {"v": 1}
        assert await cache.ahas_key("k") is True
        await cache.aset_many({"a": 1})
        assert await cache.aget_many(["a", "k"]) == {"a": 1, "k": {"v": 1}}
        assert await cache.aget_or_set("f", lambda: "fetched") == "fetched"
        assert await cache.adelete("k") is True
        await cache.aclear()
    asyncio.run(run())


# --------------------------------------------------------------------------------------
# one table for every process of the host


def _child_django(step, start_at=None):
    c = caches["default"]
    if start_at is not None:  # CLOCK_MONOTONIC is the same for every process of the host
        time.sleep(max(0.0, start_at - time.monotonic()))
    if step == "write":
        c.set("from_child", {"pid": "child"}, 60)
        return True
    if step == "add":
        return c.add("only_one", "x", 60)
    counter = c.vela_cache
    return c.get_or_set("expensive", lambda: (counter.incr("runs"), time.sleep(0.3), "value")[2], 60)


def test_processes_share_the_cache(cache):
    assert run_children(_child_django, [("write",)], timeout=20) == [True]
    assert cache.get("from_child") == {"pid": "child"}


def test_add_is_atomic_across_processes(cache):
    start_at = time.monotonic() + 0.3  # all at once
    results = run_children(_child_django, [("add", start_at)] * 8, timeout=20)
    assert sorted(results) == [False] * 7 + [True]


def test_get_or_set_callable_runs_once_per_host(cache):
    start_at = time.monotonic() + 0.3
    results = run_children(_child_django, [("fetch", start_at)] * 6, timeout=20)
    assert results == ["value"] * 6
    assert cache.vela_cache.get("runs") == 1


def test_readme_example():
    """README's settings and calls, run as they are (with a test cache name); every
    value a comment announces is checked."""
    from apps import readme

    name = new_name()
    settings_code = readme.files("Django")["settings.py"].replace('"shop"', f'"{name}"')
    conf = {}
    exec(settings_code, conf)
    (usage,) = readme.python_blocks("Django")
    try:
        with override_settings(CACHES=conf["CACHES"]):
            ns = readme.run_snippet(usage, {})
            assert ns["cache"].vela_cache.name == name
            assert ns["cache"].vela_cache.info()["capacity"] == 64 << 20
    finally:
        vela.destroy(name)
