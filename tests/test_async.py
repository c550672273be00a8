"""The asyncio API of ``vela.Cache`` on every store (the contract suite's stores and fixtures).

``aget``, ``aput``, ``adelete``, ``aexists``, ``aget_many``, ``aput_many``,
``ainvalidate_tag``, ``aflush`` and ``async with``: the same outcomes, counters,
checks and telemetry events as the sync calls; a wait on a bridge (a partitioned
owner, a replicated flush) never blocks the event loop and ends with
``BridgeUnavailable`` after the handle's timeout; a call cancelled mid-way leaves
the handle usable, no connection behind and nothing half-written.
"""
import asyncio
import concurrent.futures
import os
import uuid

import pytest

import vela
from apps import readme
from cluster import Cluster, eventually
from conftest import run_in_child
from test_contract import _owner, opened, redis_server, store  # noqa: F401 - the contract suite's fixtures

SHORT = 1.0  # seconds: the timeout of the handles that wait on a stopped bridge


def run(coro):
    return asyncio.run(coro)


def keys_on_both_hosts(store, n=12, prefix="k"):
    """``n`` keys; for a partitioned store, some owned by host A and some by host B."""
    keys = [f"{prefix}{i}" for i in range(n)]
    if store.topology == "partitioned":
        owners = {_owner(store.cache.cluster(), k) for k in keys}
        assert owners == {1, 2}, owners
    return keys


def key_owned_by(store, node, prefix="b"):
    """A key that ``node`` owns, once it owns partitions again (an earlier test of the
    module may have stopped its bridge: its partitions come back when it is heard)."""
    def find():
        view = store.cache.cluster()
        return next((f"{prefix}{i}" for i in range(1000) if _owner(view, f"{prefix}{i}") == node), None)
    return eventually(find, 30, what=f"a key owned by node {node}")


class Ticker:
    """A task that counts the loop's turns while a call is pending (the loop is not blocked)."""

    def __init__(self):
        self.ticks_while_pending = 0
        self.pending = None

    async def run(self):
        while True:
            await asyncio.sleep(0.01)
            if self.pending is not None and not self.pending.done():
                self.ticks_while_pending += 1


async def with_ticker(coro):
    """(the call's outcome, ticks of another task while it was pending)."""
    ticker = Ticker()
    tick = asyncio.create_task(ticker.run())
    ticker.pending = call = asyncio.create_task(coro)
    try:
        outcome = await call
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        outcome = exc
    tick.cancel()
    return outcome, ticker.ticks_while_pending


def read_eventually(cache, key, expected):
    """(on host B) what ``key`` holds once it is ``expected``, or after 10 s."""
    eventually(lambda: cache.get(key) == expected, 10, what=f"{key!r} is {expected!r}")
    return cache.get(key)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ---- the API on every store ------------------------------------------------------------


def test_async_round_trip(store):
    c = store.cache
    keys = keys_on_both_hosts(store)

    async def main():
        for i, k in enumerate(keys):
            assert await c.aput(k, {"n": i}, ttl=60, tags=["even" if i % 2 == 0 else "odd"]) is None
        got = [await c.aget(k) for k in keys]
        assert got == [{"n": i} for i in range(len(keys))]
        assert await c.aget("absent") is None
        assert await c.aget("absent", "dflt") == "dflt"
        assert await c.aexists(keys[0]) is True and await c.aexists("absent") is False
        assert await c.aget_many(keys + ["absent"]) == {k: {"n": i} for i, k in enumerate(keys)}
        assert await c.adelete(keys[1]) is True
        assert await c.adelete(keys[1]) is False
        assert await c.ainvalidate_tag("even") == len(keys) // 2
        assert await c.aget_many(keys) == {k: {"n": i} for i, k in enumerate(keys) if i % 2 and i != 1}
        await c.aput_many({f"m{i}": i for i in range(20)}, tags=["m"])
        await c.aput_many([(("t", 1), b"bytes"), (("t", 2), "text")])
        assert await c.aget_many([f"m{i}" for i in range(20)]) == {f"m{i}": i for i in range(20)}
        assert await c.aget(("t", 1)) == b"bytes" and await c.aget(("t", 2)) == "text"
        return await c.aflush()

    removed = run(main())
    assert removed == len(keys) // 2 - 1 + 22  # the odd keys but keys[1], the 20 + 2 of the batches
    assert c.size() == 0
    st = c.stats()
    # hits and misses as the sync calls count them: 14 gets (12 hits), batch reads of
    # 13 keys (12 hits), 12 keys (5 hits), 20 and 2 keys (all hits)
    assert (st["hits"], st["misses"]) == (12 + 12 + 5 + 20 + 2, 2 + 1 + 7)
    assert st["writes"] == 12 + 22
    assert st["deletes"] == 1


def test_async_writes_are_seen_by_the_other_host(store):
    keys = keys_on_both_hosts(store, prefix="seen")

    async def main():
        await store.cache.aput_many({k: k.upper() for k in keys})
        await store.cache.aput("one", 1)

    run(main())
    expected = {k: k.upper() for k in keys} if store.spans_hosts else {}
    assert store.on_host_b(lambda cache: cache.get_many(keys)) == expected
    if store.spans_hosts:
        assert store.on_host_b(lambda cache: cache.get("one")) == 1


def test_async_calls_check_their_arguments_as_the_sync_ones_do(store):
    c = store.cache

    async def main():
        with pytest.raises(TypeError):
            await c.aput(1.5, "x")
        with pytest.raises(TypeError):
            await c.aget(1.5)
        with pytest.raises(ValueError):
            await c.aput("k", "x", tags=[""])
        with pytest.raises(ValueError):
            await c.aput("k", "x", ttl=-1)
        with pytest.raises(ValueError):
            await c.aput_many({"a": 1, "b": 2}, tags=["x" * 256])
        with pytest.raises(TypeError):
            await c.aput_many({"a": 1, 2.5: 2})
        with pytest.raises(vela.ValueTooLarge):
            await c.aput_many({"a": 1, "huge": b"x" * (16 << 20)})
        with pytest.raises(ValueError):
            await c.ainvalidate_tag("")
        return await c.aget_many(["k", "a", "b"])

    assert run(main()) == {}  # nothing half-stored
    assert c.size() == 0


def test_async_calls_emit_the_sync_calls_events(store):
    c = store.cache
    seen = []
    events = [("vela", "cache", op, "stop") for op in ("get", "put", "delete", "invalidate_tag", "flush")]
    vela.telemetry.attach("async-test", events, lambda event, m, meta: seen.append((event[2], meta)))
    try:
        async def main():
            await c.aput("e", 1, tags=["et"])
            await c.aget("e")
            await c.aget("nope")
            await c.aget_many(["e", "nope"])
            await c.aput_many({"f": 2})
            await c.adelete("f")
            await c.ainvalidate_tag("et")
            await c.aflush()

        run(main())
    finally:
        vela.telemetry.detach("async-test")
    name = store.cache.name
    assert seen == [
        ("put", {"key": "e", "ttl": None, "cache": name}),
        ("get", {"key": "e", "result": "hit", "cache": name}),
        ("get", {"key": "nope", "result": "miss", "cache": name}),
        ("get", {"keys": 2, "hits": 1, "cache": name}),
        ("put", {"keys": 1, "ttl": None, "cache": name}),
        ("delete", {"key": "f", "result": True, "cache": name}),
        ("invalidate_tag", {"tag": "et", "cache": name}),
        ("flush", {"cache": name}),
    ]


def test_async_with_closes_the_handle(store):
    async def main():
        async with store.open() as h:
            await h.aput("w", "with")
            assert await h.aget("w") == "with"
        return h

    h = run(main())
    assert h.closed
    with pytest.raises(vela.CacheClosed):
        run(h.aget("w"))
    assert store.cache.get("w") == "with"


def test_one_handle_serves_several_event_loops_and_concurrent_tasks(store):
    keys = keys_on_both_hosts(store, n=20, prefix="cc")
    c = store.cache

    async def main():
        await asyncio.gather(*(c.aput(k, k) for k in keys))
        return await asyncio.gather(*(c.aget(k) for k in keys))

    assert run(main()) == keys
    assert run(main()) == keys  # a second loop: connections of the first one are not reused
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three loops at once, one per thread
        assert [f.result(60) for f in [pool.submit(run, main()) for _ in range(3)]] == [keys] * 3


def test_async_reads_keep_near_cache_copies_and_writes_drop_them(store):
    if not store.near:
        return
    c = store.cache

    async def main():
        await c.aput("n1", "v1")
        await c.aput_many({"n2": "v2", "n3": "v3"})
        # (returns once every host's listener applied the invalidations published so far,
        # those of these writes too: none can void the copies read next)
        assert await c.ainvalidate_tag("no-such-tag") == 0
        assert (await c.aget("n1"), await c.aget_many(["n2", "n3"])) == ("v1", {"n2": "v2", "n3": "v3"})
        copies = c.stats()["l1_size"]
        await c.aput("n1", "new")  # this host's copy goes with the write
        await c.adelete("n2")
        return copies, c.stats()["l1_size"], await c.aget("n1"), await c.aget("n2")

    assert run(main()) == (3, 1, "new", None)


# ---- the loop is not blocked; timeouts -------------------------------------------------


def test_a_call_waiting_on_a_stopped_owner_does_not_block_the_loop(store):
    """Partitioned: host B's bridge is SIGSTOPped; a call about a key it owns waits for
    it without blocking the loop, and raises BridgeUnavailable after the handle's timeout."""
    if store.topology != "partitioned":
        return  # (replicated: the next test; the other stores wait on no bridge)
    host_b = store.cluster.hosts[1]
    with store.open(topology_opts={"timeout": SHORT}) as h:
        for call in (lambda: h.aget(key), lambda: h.aput(key, "x"), lambda: h.aget_many([key]),
                     lambda: h.ainvalidate_tag("t"), lambda: h.aflush()):
            # One call per stop, each far shorter than the failure timeout: stopped longer,
            # B would be declared dead and A would take its partitions over.
            key = key_owned_by(store, 2)
            run(h.aput(key, "before"))
            host_b.pause()
            try:
                outcome, ticks = run(with_ticker(call()))
            finally:
                host_b.resume()
            assert isinstance(outcome, vela.BridgeUnavailable), outcome
            assert ticks > 5, ticks  # another task ran all along
        # A call that timed out may or may not have been applied; the handle goes on working
        # with B back: a flush now reaches it.
        key_owned_by(store, 2)
        run(h.aput(key, "after"))
        assert run(h.aget(key)) == "after"
        assert run(h.aflush()) >= 1
        assert run(h.aget(key)) is None


def test_a_replicated_flush_waiting_on_its_bridge_does_not_block_the_loop(store):
    if store.topology != "replicated":
        return
    host_a = store.cluster.hosts[0]
    store.cache.put("r", 1, tags=["rt"])
    with store.open(topology_opts={"bridge_timeout": SHORT}) as h:
        host_a.pause()
        try:
            for call, in ((lambda: h.ainvalidate_tag("rt"),), (lambda: h.aflush(),)):
                outcome, ticks = run(with_ticker(call()))
                assert isinstance(outcome, vela.BridgeUnavailable), outcome
                assert ticks > 5, ticks
        finally:
            host_a.resume()
    assert store.cache.get("r") is None  # made on this host; the bridge carries it on
    assert store.on_host_b(read_eventually, "r", None) is None


def test_a_call_waiting_on_a_paused_redis_does_not_block_the_loop(store):
    if store.backend != "redis":
        return
    import redis

    admin = redis.Redis.from_url(store.redis_url)
    opts = {"url": store.redis_url, "socket_timeout": 0.3, "retries": 1}
    with store.open(backend_opts=opts) as h:
        run(h.aput("p", "before"))
        admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")
        try:
            outcome, ticks = run(with_ticker(h.aget("unseen")))
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
        assert isinstance(outcome, vela.BackendUnavailable), outcome
        assert ticks > 5, ticks
        assert run(h.aget("p")) == "before"


# ---- cancellation ----------------------------------------------------------------------


async def cancel_when_pending(coro, after_ticks=5):
    """Start ``coro``, cancel it once the loop turned ``after_ticks`` times while it was pending."""
    task = asyncio.create_task(coro)
    for _ in range(after_ticks):
        await asyncio.sleep(0.01)
    assert not task.done(), "the call ended before it could be cancelled"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_cancelled_call_to_a_stopped_owner_leaves_the_handle_usable(store):
    if store.topology != "partitioned":
        return
    key, mine = key_owned_by(store, 2, prefix="cx"), key_owned_by(store, 1, prefix="cm")
    host_b = store.cluster.hosts[1]
    with store.open(topology_opts={"timeout": 5.0}) as h:
        run(h.aput(key, "old"))

        async def main():
            await h.aget(key)  # a pooled connection to B, in this loop
            fds = open_fds()
            host_b.pause()
            try:
                await cancel_when_pending(h.aget(key))
                await cancel_when_pending(h.aput_many({key: "new", mine: 1}))
            finally:
                host_b.resume()
            # The cancelled requests' connections were closed, not pooled: their late
            # replies cannot meet the next request, which gets its own answer. The batch's
            # share of A was stored in place before its first await; its share of B waited
            # for a new connection's challenge (the cancelled get took the pooled one with
            # it) and was never sent.
            assert await h.aget_many([key, mine]) == {key: "old", mine: 1}
            # A request sent on a pooled connection, then cancelled: it reached B's socket
            # whole, and B stores it when it goes on.
            assert await h.aget(key) == "old"  # (a pooled connection to B again)
            host_b.pause()
            try:
                await cancel_when_pending(h.aput(key, "sent"))
            finally:
                host_b.resume()
            for _ in range(500):
                if await h.aget(key) == "sent":
                    break
                await asyncio.sleep(0.02)
            assert await h.aget(key) == "sent"
            await h.aput(key, "after")
            assert await h.aget(key) == "after"
            return fds, open_fds()

        before, after = run(main())
        assert after == before
    assert store.cache.get(key) == "after"


def test_a_cancelled_replicated_flush_is_still_carried_to_the_other_host(store):
    if store.topology != "replicated":
        return
    host_a = store.cluster.hosts[0]
    store.cache.put("gone", 1)
    assert store.on_host_b(read_eventually, "gone", 1) == 1
    with store.open(topology_opts={"bridge_timeout": 5.0}) as h:
        async def main():
            host_a.pause()
            try:
                await cancel_when_pending(h.aflush())
            finally:
                host_a.resume()
            await h.aput("next", 2)  # the handle's bridge socket was not left stuck
            return await h.aflush()

        assert run(main()) == 1
    assert store.cache.get("gone") is None
    assert store.on_host_b(read_eventually, "gone", None) is None


def test_a_cancelled_redis_batch_is_stored_whole_or_not_at_all(store):
    if store.backend != "redis":
        return
    import redis

    admin = redis.Redis.from_url(store.redis_url)
    c = store.cache
    items = {f"rb{i}": i for i in range(1200)}  # three script calls of one transaction
    try:
        async def main():
            await c.aget("warm")  # this loop's client, connected
            admin.execute_command("CLIENT", "PAUSE", 2000, "ALL")
            try:
                await cancel_when_pending(c.aput_many(items))
                await cancel_when_pending(c.aget("rb0"))
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
            stored = await c.aget_many(list(items))
            await c.aput("after", 1)
            return stored, await c.aget("after")

        stored, after = run(main())
    finally:
        admin.close()
    assert stored in ({}, items)
    assert after == 1


def test_the_readme_example_runs_and_returns_what_it_says():
    name = f"readme{uuid.uuid4().hex[:10]}"
    (code,) = readme.python_blocks("asyncio")
    try:
        readme.run_snippet(code.replace('"shop-async"', repr(name)), {})
    finally:
        vela.destroy(name)


def _curve_worker(namespace, name, keyfile, keys):
    os.environ["VELA_NAMESPACE"] = namespace
    with vela.Cache(name, topology="partitioned", topology_opts={"curve_key_file": keyfile}) as h:
        async def main():
            await h.aput_many({k: k.upper() for k in keys})
            await h.aput("one", 1)
            return (await h.aget_many(keys), await h.aget("one"), await h.aexists("one"), await h.adelete("one"),
                    await h.aflush())
        return asyncio.run(main())


def test_async_calls_in_a_cluster_with_curve_keys_use_the_encrypted_routers(tmp_path):
    """With CURVE keys there is no data port: the async calls go to the bridges' ROUTERs
    on a zmq.asyncio DEALER (the same messages)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vela.bridge", "keygen"], capture_output=True, text=True,
                         timeout=30, check=True)
    keyfile = tmp_path / "curve"
    keyfile.write_text(out.stdout)
    c = Cluster(tmp_path, n=2, topology="partitioned", bridge_extra=["--curve-key-file", str(keyfile)],
                cache_opts={"topology_opts": {"curve_key_file": str(keyfile)}})
    try:
        c.wait_members()
        eventually(lambda: all((h.status() or {}).get("caches", {}).get(c.name, {}).get("ready") for h in c),
                   15, what="partition tables")
        a, b = c
        keys = [f"c{i}" for i in range(40)]
        assert {a.call("owner", key=k)[0] for k in keys} == {a.node_id, b.node_id}
        got = run_in_child(_curve_worker, a.namespace, c.name, str(keyfile), keys)
        assert got == ({k: k.upper() for k in keys}, 1, True, True, len(keys))
        assert b.get(keys[0]) is None
    finally:
        c.close()


class _RefusingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A loop's default executor that fails any call given to it."""

    def submit(self, *args, **kwargs):
        raise AssertionError("the loop's default executor was used")


def test_aget_or_fetch_never_uses_the_loop_s_default_executor(store):
    """The application shares the default executor (asyncio.to_thread): Vela's waits for a
    lease, and a remote store's lease calls, run in Vela's own threads (vela.waits)."""
    key = f"dx-{uuid.uuid4().hex[:6]}"

    async def main():
        asyncio.get_running_loop().set_default_executor(_RefusingExecutor(max_workers=1))
        calls = []
        value = await store.cache.aget_or_fetch(key, lambda k: calls.append(k) or "v", ttl=60)
        again = await store.cache.aget_or_fetch(key, lambda k: "other", ttl=60)
        return value, again, calls
    assert run(main()) == ("v", "v", [key])
