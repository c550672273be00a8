"""local_objects=: a process keeps the values it decoded and returns the same object
while the table's entry keeps the version it was decoded from; any write, delete,
tag invalidation, flush or expiry, from any process or host, is seen at the next get.
"""
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vela
from cluster import Cluster, eventually
from conftest import new_name, run_in_child

RECORD = {"id": 1, "name": "Alice", "tags": ["a", "b"]}


@pytest.fixture
def kept(cache_name):
    """A handle that keeps decoded values, and a plain one on the same table."""
    with vela.Cache(cache_name, capacity="8MiB", local_objects=True) as k, vela.Cache(cache_name) as plain:
        yield k, plain


def _write_in_child(name, op, *args):
    with vela.Cache(name) as c:
        return getattr(c, op)(*args)


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


def test_expiry_is_seen(kept):
    k, _ = kept
    k.put("short", RECORD, ttl=0.05)
    assert k.get("short") is k.get("short")
    time.sleep(0.1)
    assert k.get("short", "gone") == "gone"
    assert "short" not in k


def test_hits_and_misses_count_as_without_the_option(kept):
    k, _ = kept
    k.reset_stats()
    k.put("rec", RECORD)
    for _ in range(5):
        k.get("rec")
    k.get("absent")
    assert (k.stats()["hits"], k.stats()["misses"]) == (5, 1)


def test_at_most_n_values_are_kept_the_oldest_go_first(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", local_objects=2) as k:
        for key in ("a", "b", "c"):
            k.put(key, [key])
        a, b = k.get("a"), k.get("b")
        c = k.get("c")  # a third: "a" is forgotten
        assert k.get("b") is b and k.get("c") is c
        again = k.get("a")
        assert again == ["a"] and again is not a


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
    assert not os.path.exists(f"/dev/shm/vela.{cache_name}")
    with pytest.raises(vela.OptionError, match="local_objects: the Redis backend"):
        vela.Cache(cache_name, backend="redis", backend_opts={"url": "redis://127.0.0.1:1"}, local_objects=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "delete", "get", "tag", "touch"]),
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
                assert k.get(key) == plain.get(key)
    finally:
        vela.destroy(name)


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
        a.invalidate_tag("t")
        eventually(lambda: b.get("rec") is None, 5, what="A's tag invalidation on B")
    finally:
        cluster.close()


def test_readme_example_runs_as_written(cache_name):
    from apps import readme

    (code,) = [c for c in readme.python_blocks("Using Vela") if "local_objects=True" in c]
    readme.run_snippet(code.replace('"shop"', repr(cache_name)), {"vela": vela})
