"""Telemetry events (ARCHITECTURE.md §3, docs/api-notes.md).

vela.telemetry.attach(handler_id, events, fn) / detach(handler_id), with
fn(event, measurements, metadata). Every test detaches its handlers in `finally`
(the `recorder` helper does it), and an autouse fixture fails any test that leaves a
handler behind.
"""
import contextlib
import itertools
import threading

import pytest

import vela
from conftest import FORK, Child, collect

DEFAULT = ("vela", "cache")
OPS = ("get", "put", "fetch", "delete", "invalidate_tag", "flush")
_ids = itertools.count()


def ev(op, prefix=DEFAULT):
    return prefix + (op, "stop")


@pytest.fixture(autouse=True)
def no_leaked_handlers():
    assert vela.telemetry.list_handlers() == {}
    yield
    leaked = vela.telemetry.list_handlers()
    for hid in leaked:
        vela.telemetry.detach(hid)
    assert leaked == {}, "a test left telemetry handlers attached"


@contextlib.contextmanager
def recorder(ops=OPS, prefix=DEFAULT):
    """Attach a handler recording (event, measurements, metadata) of `ops`."""
    events = []
    hid = ("telemetry-test", next(_ids))
    vela.telemetry.attach(hid, [ev(op, prefix) for op in ops],
                          lambda e, m, md: events.append((e, dict(m), dict(md))))
    try:
        yield events
    finally:
        vela.telemetry.detach(hid)


def check_durations(events):
    for e, m, _ in events:
        assert type(m["duration"]) is int, (e, m)
        assert m["duration"] > 0, (e, m)


# --------------------------------------------------------------------------------------
# one event per call


def test_get_events_hit_and_miss(cache):
    cache.put("here", 1)
    with recorder(["get"]) as events:
        assert cache.get("here") == 1
        assert cache.get("absent") is None
        assert cache["here"] == 1
        with pytest.raises(KeyError):
            cache["absent"]
    check_durations(events)
    name = cache.name
    assert [(e, md) for e, _, md in events] == [
        (ev("get"), {"cache": name, "key": "here", "result": "hit"}),
        (ev("get"), {"cache": name, "key": "absent", "result": "miss"}),
        (ev("get"), {"cache": name, "key": "here", "result": "hit"}),
        (ev("get"), {"cache": name, "key": "absent", "result": "miss"}),
    ]
    assert [m.keys() for _, m, _ in events] == [{"duration"}] * 4


def test_put_event_carries_ttl(cache):
    with recorder(["put"]) as events:
        cache.put("a", 1)
        cache.put(("t", 2), "x", ttl=60)
        cache.put("c", b"z", ttl=1.5, tags=["g"])
    check_durations(events)
    name = cache.name
    assert [(e, md) for e, _, md in events] == [
        (ev("put"), {"cache": name, "key": "a", "ttl": None}),
        (ev("put"), {"cache": name, "key": ("t", 2), "ttl": 60}),
        (ev("put"), {"cache": name, "key": "c", "ttl": 1.5}),
    ]


def _hold_lease(name, key, started_w, release):
    def fetch(k):
        started_w.send(True)
        assert release.wait(30), "never released"
        return "from the holder"

    with vela.Cache(name) as c:
        return c.get_or_fetch(key, fetch)


def test_fetch_events_fetched_hit_waited(cache):
    started_r, started_w = FORK.Pipe(duplex=False)
    release = FORK.Event()
    holder = Child(_hold_lease, cache.name, "contended", started_w, release)
    started_w.close()
    try:
        assert started_r.poll(20), "holder did not start its fetch"
        with recorder(["fetch"]) as events:
            assert cache.get_or_fetch("f", lambda k: "v") == "v"   # fetched
            assert cache.get_or_fetch("f", lambda k: "w") == "v"   # hit
            # a process holds the lease on "contended": we wait for its value
            releaser = threading.Timer(0.3, release.set)
            releaser.start()
            try:
                assert cache.get_or_fetch("contended", lambda k: "mine") == "from the holder"
            finally:
                releaser.cancel()
                releaser.join(10)
        assert collect([holder], timeout=30) == ["from the holder"]
    finally:
        release.set()
        holder.close()
        started_r.close()
    check_durations(events)
    name = cache.name
    assert [(e, md) for e, _, md in events] == [
        (ev("fetch"), {"cache": name, "key": "f", "result": "fetched"}),
        (ev("fetch"), {"cache": name, "key": "f", "result": "hit"}),
        (ev("fetch"), {"cache": name, "key": "contended", "result": "waited"}),
    ]


def test_invalidate_tag_event_count(cache):
    cache.put("a", 1, tags=["users"])
    cache.put("b", 2, tags=["users", "x"])
    cache.put("c", 3, tags=["x"])
    with recorder(["invalidate_tag"]) as events:
        assert cache.invalidate_tag("users") == 2
        assert cache.invalidate_tag("nobody") == 0
    check_durations(events)
    name = cache.name
    assert [(e, {k: v for k, v in m.items() if k != "duration"}, md) for e, m, md in events] == [
        (ev("invalidate_tag"), {"count": 2}, {"cache": name, "tag": "users"}),
        (ev("invalidate_tag"), {"count": 0}, {"cache": name, "tag": "nobody"}),
    ]


def test_delete_event_result(cache):
    cache.put("a", 1)
    with recorder(["delete"]) as events:
        assert cache.delete("a") is True
        assert cache.delete("a") is False
    check_durations(events)
    name = cache.name
    assert [(e, md) for e, _, md in events] == [
        (ev("delete"), {"cache": name, "key": "a", "result": True}),
        (ev("delete"), {"cache": name, "key": "a", "result": False}),
    ]


def test_flush_event_count(cache):
    for i in range(5):
        cache.put(i, i)
    with recorder(["flush"]) as events:
        assert cache.flush() == 5
        assert cache.flush() == 0
    check_durations(events)
    assert [(e, {k: v for k, v in m.items() if k != "duration"}, md) for e, m, md in events] == [
        (ev("flush"), {"count": 5}, {"cache": cache.name}),
        (ev("flush"), {"count": 0}, {"cache": cache.name}),
    ]


def test_only_the_subscribed_events_reach_a_handler(cache):
    with recorder(["put"]) as puts:
        cache.put("a", 1)
        cache.get("a")
        cache.delete("a")
        cache.get_or_fetch("b", lambda k: 2)
        cache.flush()
    assert [e for e, _, _ in puts] == [ev("put")]


# --------------------------------------------------------------------------------------
# telemetry_prefix


def test_telemetry_prefix_is_honoured(cache_name):
    prefix = ("myapp", "cache")
    with recorder(prefix=prefix) as mine, recorder() as default:
        with vela.Cache(cache_name, capacity="8MiB", telemetry_prefix=prefix) as c:
            c.put("k", "v", ttl=30, tags=["t"])
            assert c.get("k") == "v"
            assert c.get_or_fetch("k", lambda k: "other") == "v"
            assert c.invalidate_tag("t") == 1
            c.put("k", "v")
            assert c.delete("k") is True
            assert c.flush() == 0
    assert default == []
    check_durations(mine)
    assert [e for e, _, _ in mine] == [
        ("myapp", "cache", "put", "stop"),
        ("myapp", "cache", "get", "stop"),
        ("myapp", "cache", "fetch", "stop"),
        ("myapp", "cache", "invalidate_tag", "stop"),
        ("myapp", "cache", "put", "stop"),
        ("myapp", "cache", "delete", "stop"),
        ("myapp", "cache", "flush", "stop"),
    ]
    assert all(md["cache"] == cache_name for _, _, md in mine)


# --------------------------------------------------------------------------------------
# batch calls: one event per call, "keys" (the count) instead of "key"


def test_batch_calls_emit_one_event_with_keys(cache):
    with recorder() as events:
        cache.put_many({"a": 1, "b": 2, "c": 3}, ttl=10)
        found = cache.get_many(["a", "b", "zz", "yy"])
        assert found == {"a": 1, "b": 2}
        assert cache.delete_many(["a", "zz"]) == 1
    check_durations(events)
    assert [e for e, _, _ in events] == [ev("put"), ev("get"), ev("delete")]
    (_, _, put), (_, _, get), (_, _, delete) = events
    for md, n in ((put, 3), (get, 4), (delete, 2)):
        assert md["cache"] == cache.name
        assert md["keys"] == n
        assert "key" not in md
    assert put["ttl"] == 10
    assert delete["result"] == 1


# --------------------------------------------------------------------------------------
# handlers


def test_raising_handler_is_detached_and_the_call_is_unaffected(cache):
    calls = []

    def bad(event, measurements, metadata):
        calls.append(metadata["key"])
        raise RuntimeError("handler bug")

    vela.telemetry.attach("bad-handler", [ev("put"), ev("get")], bad)
    try:
        with recorder(["put", "get"]) as good:
            assert cache.put("a", 1) is None
            assert cache.get("a") == 1
            assert cache.get("b", "dflt") == "dflt"
        assert calls == ["a"]               # the next event did not reach it
        assert "bad-handler" not in vela.telemetry.list_handlers()
        assert [md["key"] for _, _, md in good] == ["a", "a", "b"]
        assert cache.get("a") == 1          # the put happened
    finally:
        vela.telemetry.detach("bad-handler")


def test_detach_returns_true_then_false():
    vela.telemetry.attach("once", [ev("get")], lambda *a: None)
    try:
        assert vela.telemetry.detach("once") is True
        assert vela.telemetry.detach("once") is False
    finally:
        vela.telemetry.detach("once")


def test_attaching_the_same_id_twice_raises(cache):
    first = []
    vela.telemetry.attach("dup", [ev("get")], lambda *a: first.append(a))
    try:
        with pytest.raises(ValueError):
            vela.telemetry.attach("dup", [ev("put")], lambda *a: None)
        cache.put("k", 1)                  # the failed attach subscribed nothing
        cache.get("k")
        assert len(first) == 1             # the first handler is intact
    finally:
        vela.telemetry.detach("dup")


def test_detached_handler_receives_nothing(cache):
    got = []
    vela.telemetry.attach("gone", [ev("get")], lambda *a: got.append(a))
    try:
        cache.get("x")
        assert len(got) == 1
        assert vela.telemetry.detach("gone") is True
        cache.get("x")
        assert len(got) == 1
    finally:
        vela.telemetry.detach("gone")
