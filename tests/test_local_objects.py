"""local_objects=: a process keeps the values it decoded and returns the same object
while the table's entry keeps the version it was decoded from; any write, delete,
tag invalidation, flush or expiry, from any process or host, is seen at the next read
(get, get_many, get_or_fetch, their async forms, memoize).

Writers of "another process" are real forked processes; a stale stamp is judged with
the clock of vela.cache moved ahead (no sleeping until a value goes stale).
"""
import asyncio
import gc
import os
import sys
import time
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vela
from cluster import Cluster, eventually
from conftest import FORK, Child, collect, new_name, run_in_child
from vela import refresh
from vela.stamp import Stamped

RECORD = {"id": 1, "name": "Alice", "tags": ["a", "b"]}


@pytest.fixture
def kept(cache_name):
    """A handle that keeps decoded values, and a plain one on the same table."""
    with vela.Cache(cache_name, capacity="8MiB", local_objects=True) as k, vela.Cache(cache_name) as plain:
        yield k, plain


def _write_in_child(name, op, *args):
    with vela.Cache(name) as c:
        return getattr(c, op)(*args)


def _unexpected_fetch(key):
    raise AssertionError(f"fetched {key!r}: the value was cached")


class _ClockAhead:
    """The time module as vela.cache sees it, its wall clock ``seconds`` ahead."""

    def __init__(self, seconds):
        self.ahead_ns = int(seconds * 1e9)

    def __getattr__(self, name):
        return getattr(time, name)

    def time_ns(self):
        return time.time_ns() + self.ahead_ns


def test_an_unchanged_entry_gives_the_same_object(kept):
    k, plain = kept
    k.put("rec", RECORD)
    first = k.get("rec")
    assert first == RECORD
    assert k.get("rec") is first and k["rec"] is first
    assert plain.get("rec") is not plain.get("rec")  # without the option: a new object each time
    k.touch("rec", 60)  # a touch is a write (it replicates with a version): decoded again
    assert k.get("rec") == RECORD


@pytest.mark.parametrize("change, expect", [
    (("put", "rec", {"id": 2}), {"id": 2}),
    (("delete", "rec"), None),
    (("invalidate_tag", "users"), None),
    (("flush",), None),
])
def test_a_change_by_another_process_is_seen_at_the_next_get(kept, change, expect):
    k, _ = kept
    k.put("rec", RECORD, tags=["users"])
    assert k.get("rec") is k.get("rec")
    run_in_child(_write_in_child, k.name, *change)
    assert k.get("rec") == expect
    if expect is not None:
        assert k.get("rec") is k.get("rec")  # the new value is kept in turn


def test_every_read_path_returns_the_one_kept_object(kept):
    k, plain = kept
    k.put("rec", RECORD)
    first = k.get_many(["rec", "absent"])
    assert first == {"rec": RECORD}
    rec = first["rec"]
    assert k.get("rec") is rec and k["rec"] is rec
    assert k.get_many(["rec"])["rec"] is rec
    assert k.get_or_fetch("rec", _unexpected_fetch) is rec
    assert k.get_or_fetch("rec", _unexpected_fetch, ttl=30, stale_ttl=30) is rec  # (not stamped: as it is)

    async def reads():
        return (await k.aget("rec"), (await k.aget_many(["rec"]))["rec"],
                await k.aget_or_fetch("rec", _unexpected_fetch))

    assert all(got is rec for got in asyncio.run(reads()))
    assert plain.get_many(["rec"])["rec"] is not plain.get_many(["rec"])["rec"]  # without the option


def test_memoized_results_are_kept(kept):
    k, _ = kept
    calls = []

    @k.memoize(ttl=60)
    def profile(user):
        calls.append(user)
        return {"user": user, "roles": ["admin"]}

    computed = profile(1)  # (the function's own result; the calls after it read the table)
    first = profile(1)
    assert first == computed and profile(1) is first and profile(1) is first
    assert calls == [1]
    profile.invalidate(1)
    assert profile(1) == first and profile(1) is not first and calls == [1, 1]


@pytest.mark.parametrize("change, expect", [
    (("put", "rec", {"id": 2}), {"rec": {"id": 2}, "other": {"id": 9}}),
    (("delete", "rec"), {"other": {"id": 9}}),
    (("invalidate_tag", "users"), {"other": {"id": 9}}),
    (("flush",), {}),
])
def test_get_many_and_get_or_fetch_see_another_process_change_at_once(kept, change, expect):
    k, _ = kept
    k.put("rec", RECORD, tags=["users"])
    k.put("other", {"id": 9}, tags=["others"])
    before = k.get_many(["rec", "other"])
    assert k.get_or_fetch("rec", _unexpected_fetch) is before["rec"]
    run_in_child(_write_in_child, k.name, *change)
    after = k.get_many(["rec", "other"])
    assert after == expect
    if "other" in expect:
        assert after["other"] is before["other"]  # an entry no write touched keeps its object
    fetched = {"id": "fetched"}
    assert k.get_or_fetch("rec", lambda key: fetched) == expect.get("rec", fetched)
    assert k.get_many(["rec"])["rec"] is k.get("rec")  # the new value is kept in turn


def test_a_write_between_two_reads_of_one_get_many_is_seen_by_the_next(kept):
    k, plain = kept
    keys = [f"k{i}" for i in range(20)]
    plain.put_many({key: {"n": i} for i, key in enumerate(keys)})
    first = k.get_many(keys)
    run_in_child(_write_in_child, k.name, "put_many", {key: {"n": -1} for key in keys[::2]})
    second = k.get_many(keys)
    assert second == {key: {"n": -1 if i % 2 == 0 else i} for i, key in enumerate(keys)}
    assert all((second[key] is first[key]) == (i % 2 == 1) for i, key in enumerate(keys))


WRITES = 2000


def _writer(name, acknowledged):
    """Put {"n": 1..WRITES} under "counter", publishing each n once its put returned."""
    with vela.Cache(name) as c:
        for n in range(1, WRITES + 1):
            c.put("counter", {"n": n})
            acknowledged.value = n
    return n


def test_no_read_returns_a_value_older_than_a_write_acknowledged_before_it(kept):
    """Linearizable reads across processes: a kept object never outlives its version."""
    k, _ = kept
    k.put("counter", {"n": 0})
    acknowledged = FORK.Value("q", 0, lock=False)
    writer = Child(_writer, k.name, acknowledged)
    reads = kept_hits = 0
    last = None
    while True:
        done = acknowledged.value
        for got in (k.get("counter"), k.get_many(["counter"])["counter"],
                    k.get_or_fetch("counter", _unexpected_fetch)):
            assert got["n"] >= done, f"read n={got['n']} after the put of n={done} returned"
            kept_hits += got is last
            last = got
            reads += 1
        if done == WRITES:
            break
    assert collect([writer], 60) == [WRITES]
    assert k.get_many(["counter"]) == {"counter": {"n": WRITES}}
    assert reads >= 3 and kept_hits >= 2  # (the reads after the last write at least hit the kept object)


def test_expiry_is_seen(kept):
    k, _ = kept
    k.put("short", RECORD, ttl=0.05)
    k.put("many", RECORD, ttl=0.05)
    k.put("fetch", RECORD, ttl=0.05)
    assert k.get("short") is k.get("short")
    assert k.get_many(["many"])["many"] is k.get_many(["many"])["many"]
    assert k.get_or_fetch("fetch", _unexpected_fetch) is k.get_or_fetch("fetch", _unexpected_fetch)
    time.sleep(0.1)
    assert k.get("short", "gone") == "gone"
    assert "short" not in k
    assert k.get_many(["many"]) == {}
    assert k.get_or_fetch("fetch", lambda key: "fetched") == "fetched"


def _reads(cache):
    """The same reads, hits and misses, through every read path: the counters after them."""
    cache.reset_stats()
    cache.put("rec", RECORD)
    for _ in range(5):
        cache.get("rec")
    cache.get("absent")
    cache.get_many(["rec", "absent", "rec"])
    cache.get_or_fetch("rec", _unexpected_fetch)
    cache.get_or_fetch("fetched", lambda key: RECORD)
    stats = cache.stats()
    return stats["hits"], stats["misses"], stats["fetches"]


def test_hits_and_misses_count_as_without_the_option(kept):
    k, plain = kept
    assert _reads(k) == (8, 3, 1)
    k.flush()
    assert _reads(plain) == (8, 3, 1)


def test_the_aliasing_rule_one_process_shares_the_object_the_table_keeps_its_bytes(kept):
    k, plain = kept
    k.put("rec", RECORD)
    mine = k.get("rec")
    mine["name"] = "Mallory"  # what the README says not to do: a put changes a value
    assert k.get_many(["rec"])["rec"]["name"] == "Mallory"  # this handle's callers share the object
    assert plain.get("rec") == RECORD  # the table, other handles and processes are unaffected
    assert run_in_child(_write_in_child, k.name, "get", "rec") == RECORD
    k.put("rec", mine)
    assert k.get("rec") == mine and k.get("rec") is not mine  # a put is decoded anew on the next read


def test_a_closed_handle_raises_cache_closed(cache_name):
    k = vela.Cache(cache_name, capacity="8MiB", local_objects=True)
    k.put("rec", RECORD)
    k.get("rec")
    k.close()
    for read in (lambda: k.get("rec"), lambda: k.get_many(["rec"]), lambda: k.get_many([]),
                 lambda: k.get_or_fetch("rec", _unexpected_fetch)):
        with pytest.raises(vela.CacheClosed):
            read()


class Profile:
    """A value a weak reference can follow (a dict cannot)."""

    def __init__(self, name):
        self.name = name

    def __eq__(self, other):
        return type(other) is Profile and other.name == self.name


def test_reads_leak_no_reference_and_forget_what_changed(cache_name):
    k = vela.Cache(cache_name, capacity="8MiB", local_objects=True)
    key = "rec-" + "x" * 20  # (a key object of its own, its references counted)
    k.put(key, Profile("a"))
    k.get_or_fetch("stamped", lambda _: Profile("s"), ttl=30, stale_ttl=30)
    kept = k.get(key)
    stamp = refresh.read(k._store, "stamped")
    counts = sys.getrefcount(kept), sys.getrefcount(stamp), sys.getrefcount(key)
    for _ in range(1000):
        k.get(key), k.get_many([key, "stamped", "absent"]), k.get_or_fetch(key, _unexpected_fetch)
        k.get_or_fetch("stamped", _unexpected_fetch, ttl=30, stale_ttl=30), refresh.read(k._store, "stamped")
    assert (sys.getrefcount(kept), sys.getrefcount(stamp), sys.getrefcount(key)) == counts
    replaced = weakref.ref(kept)
    del kept
    k.put(key, Profile("b"))
    assert k.get_many([key]) == {key: Profile("b")}
    gc.collect()
    assert replaced() is None  # the old version's object is no longer kept
    gone, stale = weakref.ref(k.get(key)), weakref.ref(stamp.value)
    del stamp
    k.close()
    gc.collect()
    assert gone() is None and stale() is None  # closing forgets every kept object


def test_at_most_n_values_are_kept_the_oldest_go_first(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", local_objects=2) as k:
        for key in ("a", "b", "c"):
            k.put(key, [key])
        a, b = k.get("a"), k.get("b")
        c = k.get("c")  # a third: "a" is forgotten
        assert k.get("b") is b and k.get("c") is c
        again = k.get("a")
        assert again == ["a"] and again is not a
        batch = k.get_many(["a", "b", "c"])  # "b" then "c" go in turn
        assert batch["a"] is again and batch["b"] is not b
        assert k.get_many(["b", "c"]) == {"b": ["b"], "c": ["c"]}


def test_the_last_n_decoded_stay_kept_under_churn(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", local_objects=50) as k:
        keys = [f"k{i}" for i in range(150)]
        k.put_many({key: [key] for key in keys})
        for _ in range(3):  # (every read of the first two rounds forgets the oldest kept)
            first = k.get_many(keys)
        again = k.get_many(keys[100:]) | k.get_many(keys[:100])
        assert again == first
        assert [again[key] is first[key] for key in keys] == [False] * 100 + [True] * 50


def test_traced_gets_keep_objects_too(kept):
    k, _ = kept
    seen = []
    vela.telemetry.attach("lo-test", [("vela", "cache", "get", "stop")], lambda e, m, md: seen.append(md["result"]))
    try:
        k.put("rec", RECORD)
        assert k.get("rec") is k.get("rec")
        assert seen == ["hit", "hit"]
    finally:
        vela.telemetry.detach("lo-test")


@pytest.mark.parametrize("bad", [-1, 1.5, "many", None])
def test_a_bad_value_names_the_option(cache_name, bad):
    with pytest.raises(vela.OptionError, match="local_objects"):
        vela.Cache(cache_name, local_objects=bad)


def test_stores_without_every_entry_on_the_host_refuse_it_creating_nothing(cache_name):
    with pytest.raises(vela.OptionError, match="local_objects: topology='partitioned'"):
        vela.Cache(cache_name, topology="partitioned", local_objects=True)
    with pytest.raises(vela.OptionError, match="local_objects: topology='partitioned'"):
        vela.Cache(cache_name, topology="partitioned", near_cache=True, local_objects=True)
    assert not os.path.exists(f"/dev/shm/vela.{cache_name}")
    for near in (False, True):
        with pytest.raises(vela.OptionError, match="local_objects: the Redis backend"):
            vela.Cache(cache_name, backend="redis", backend_opts={"url": "redis://127.0.0.1:1"},
                       near_cache=near, local_objects=True)


# ---- stamped values (get_or_fetch with stale_ttl, early, stale_if_error) --------------


def test_a_stamped_value_is_kept_once_get_sees_its_value_get_or_fetch_its_stamp(kept):
    k, _ = kept
    assert k.get_or_fetch("k", lambda key: {"v": 1}, ttl=30, stale_ttl=30) == {"v": 1}  # (fetched)
    value = k.get_or_fetch("k", _unexpected_fetch, ttl=30, stale_ttl=30)
    assert value == {"v": 1} and k.get_or_fetch("k", _unexpected_fetch, ttl=30, stale_ttl=30) is value
    stamp = refresh.read(k._store, "k")  # the stamp, as get_or_fetch reads it
    assert type(stamp) is Stamped and stamp.value is value and refresh.read(k._store, "k") is stamp
    # a read outside get_or_fetch never gets the stamp, before or after one was kept
    assert k.get("k") is value and k.get_many(["k"]) == {"k": value} and k.get_many(["k"])["k"] is value
    assert asyncio.run(k.aget("k")) is value
    assert asyncio.run(k.aget_or_fetch("k", _unexpected_fetch, ttl=30, stale_ttl=30)) is value


def test_a_kept_stamp_is_judged_on_every_hit(kept, monkeypatch):
    import vela.cache

    k, _ = kept
    k.put("k", Stamped({"v": "old"}, time.time_ns() + 5 * 10**9, 1), ttl=600)  # fresh for 5 s
    old = k.get("k")  # kept by a plain read first
    assert k.get_or_fetch("k", _unexpected_fetch, ttl=30, stale_ttl=30) is old
    fetched = []

    def fetch(key):
        fetched.append(key)
        return {"v": "new"}

    monkeypatch.setattr(vela.cache, "time", _ClockAhead(10))  # 5 s past fresh: stale, within stale_ttl
    assert k.get_or_fetch("k", fetch, ttl=30, stale_ttl=30) is old  # served, refreshed in the background
    eventually(lambda: k.get("k") == {"v": "new"}, 10, what="the background refresh")
    assert fetched == ["k"]

    k.put("k", Stamped({"v": "old"}, time.time_ns() + 5 * 10**9, 1), ttl=600)
    old = k.get("k")
    monkeypatch.setattr(vela.cache, "time", _ClockAhead(100))  # 95 s past fresh: too old to serve
    assert k.get_or_fetch("k", fetch, ttl=30, stale_ttl=30) == {"v": "new"} and fetched == ["k", "k"]
    monkeypatch.undo()  # the clock as it is: the value just fetched is fresh, and kept
    assert k.get_or_fetch("k", _unexpected_fetch, ttl=30, stale_ttl=30) is k.get("k")


def test_stale_if_error_serves_a_kept_stamp_within_its_window_only(kept, monkeypatch):
    import vela.cache

    def down(key):
        raise ConnectionError("backend down")

    k, _ = kept
    k.put("k", Stamped({"v": "old"}, time.time_ns() + 5 * 10**9, 1), ttl=600)
    old = k.get_or_fetch("k", down, ttl=1, stale_if_error=60)
    assert old == {"v": "old"}
    monkeypatch.setattr(vela.cache, "time", _ClockAhead(15))  # 10 s past fresh
    assert k.get_or_fetch("k", down, ttl=1, stale_if_error=60) is old
    with pytest.raises(ConnectionError, match="backend down"):
        k.get_or_fetch("k", down, ttl=1, stale_if_error=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "delete", "get", "tag", "touch", "fetch"]),
                          st.sampled_from(["a", "b", ("t", 1), 7]),
                          st.integers(0, 3)), max_size=40))
def test_a_handle_keeping_objects_reads_what_a_plain_one_reads(ops):
    name = new_name()
    try:
        with vela.Cache(name, capacity="4MiB", local_objects=2) as k, vela.Cache(name) as plain:
            for op, key, n in ops:
                writer = plain if n % 2 else k
                if op == "put":
                    writer.put(key, {"v": n, "key": key}, tags=[f"t{n}"])
                elif op == "delete":
                    writer.delete(key)
                elif op == "tag":
                    writer.invalidate_tag(f"t{n}")
                elif op == "touch":
                    writer.touch(key, 60)
                elif op == "fetch":
                    assert k.get_or_fetch(key, lambda _: {"fetched": n}) == plain.get(key)
                assert k.get(key) == plain.get(key)
                assert k.get_many([key, "a"]) == plain.get_many([key, "a"])
    finally:
        vela.destroy(name)


# Run by a host's agent: get_many, get and get_or_fetch's hit return one object.
_SAME_OBJECT_ON_EVERY_READ = """
rec = cache.get_many(["rec"])["rec"]
assert cache.get("rec") is rec and cache.get_or_fetch("rec", lambda key: 1 / 0) is rec, "not the kept object"
"""


def test_replicated_writes_from_another_host_replace_kept_values(tmp_path):
    cluster = Cluster(tmp_path, n=2, cache_opts={"local_objects": True})
    try:
        cluster.wait_members()
        cluster.wait_ready()  # (flush and invalidate_tag need a bridge that knows its cluster)
        a, b = cluster
        a.put("rec", {"v": 1}, tags=["t"])
        eventually(lambda: b.get("rec") == {"v": 1}, 5, what="A's write on B")
        assert b.get("rec") == {"v": 1}  # kept on B now
        a.put("rec", {"v": 2}, tags=["t"])
        eventually(lambda: b.get("rec") == {"v": 2}, 5, what="A's second write replacing B's kept value")
        b.call("exec_loop", code=_SAME_OBJECT_ON_EVERY_READ)  # (raises AgentError when not)
        a.put("rec", {"v": 3}, tags=["t"])
        eventually(lambda: b.call("get_many", keys=["rec"]) == [["rec", {"v": 3}]], 5,
                   what="A's third write in B's get_many")
        b.call("exec_loop", code=_SAME_OBJECT_ON_EVERY_READ)
        a.invalidate_tag("t")
        eventually(lambda: b.get("rec") is None, 5, what="A's tag invalidation on B")
        assert b.call("get_many", keys=["rec"]) == []
    finally:
        cluster.close()


def test_readme_example_runs_as_written(cache_name):
    from apps import readme

    (code,) = [c for c in readme.python_blocks("Using Vela") if "local_objects=True" in c]
    readme.run_snippet(code.replace('"shop"', repr(cache_name)), {"vela": vela})
