"""The eight defects of issue 14 ("One Vela"), one test each, asserting the fixed
behaviour. Each failed on the main branch of the day the issue was filed.
"""
import asyncio
import glob
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import vela
from cluster import ROOT, Host, eventually, free_port
from conftest import FORK, Child, new_name, run_in_child
from redis_server import RedisServer
from stores import Store, unlink_namespace_segments


@pytest.fixture(scope="module")
def partitioned():
    store = Store("shm-partitioned")
    yield store
    store.close()


@pytest.fixture(scope="module")
def replicated():
    store = Store("shm-replicated")
    yield store
    store.close()


def _read_many_on(cache, keys):
    return cache.get_many(keys)


# ---- 1 ---------------------------------------------------------------------------------------


def test_defect1_partitioned_cache_opened_by_name_alone_routes_like_the_bridges_workers(partitioned,
                                                                                        monkeypatch):
    """``vela.Cache("shop")`` on a partitioned segment ("omitted: adopt") is a partitioned
    handle: its writes reach each key's owner, on whichever host."""
    monkeypatch.setenv("VELA_NAMESPACE", partitioned.namespaces["A"])
    keys = [f"adopt-{i}" for i in range(40)]
    with vela.Cache(partitioned.name) as adopted:
        adopted.put_many({k: i for i, k in enumerate(keys[:20])})
        for i, k in enumerate(keys[20:], 20):
            adopted.put(k, i)
        assert adopted.size() == 40  # the cluster's size, not this host's share
        assert adopted.cluster()["ready"] is True
    expected = {k: i for i, k in enumerate(keys)}
    assert partitioned.on_host_b(_read_many_on, keys) == expected
    assert partitioned.cache.get_many(keys) == expected


# ---- 2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file-replicated", "file-partitioned"])
def test_defect2_file_backend_works_with_bridges_for_replicated_and_partitioned(kind, monkeypatch):
    """A file-backed table with a bridge per host (``--backend file --data-dir DIR``):
    writes of host A read on host B, no shared-memory segment is made on the side, and
    the bridge does not call the cache local."""
    store = Store(kind)
    try:
        monkeypatch.setenv("VELA_NAMESPACE", store.namespaces["A"])
        store.cache.put_many({f"f{i}": i for i in range(20)}, tags=["file"])
        store.cache.put("last", "written on A")

        def read(cache):
            eventually(lambda: cache.get("last") == "written on A", 15, what="host B reads host A's write")
            return cache.get_many([f"f{i}" for i in range(20)])

        assert store.on_host_b(read) == {f"f{i}": i for i in range(20)}
        assert store.cache.invalidate_tag("file") == 20
        for label, namespace in store.namespaces.items():
            stray = f"/dev/shm/vela.{namespace}.{store.name}"
            assert not os.path.exists(stray), f"a stray shared-memory table on host {label}"
            assert os.path.exists(os.path.join(store.data_dir(label), f"{store.name}.vela"))
        for host in store.cluster.hosts:
            assert host.bridge_alive()
            assert "is local" not in host.bridge_output()
    finally:
        store.close()


# ---- 3 ---------------------------------------------------------------------------------------


def test_defect3_bridge_started_before_any_worker_serves_the_cache(tmp_path, monkeypatch):
    """A bridge whose host has no segment yet keeps running (it creates the segment with
    the topology it serves, or waits for it); the workers that come later open the cache
    without LayoutMismatch, and their writes reach the other host."""
    name = f"early{uuid.uuid4().hex[:8]}"
    namespace = f"ve{uuid.uuid4().hex[:8]}A"
    monkeypatch.setenv("VELA_NAMESPACE", namespace)
    host_b = None
    listen = f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp_path / "bridge-A.log", "wb")
    bridge = subprocess.Popen([sys.executable, "-m", "vela.bridge", "run", "--cache", name, "--listen", listen,
                               "--heartbeat", "0.2", "--failure-timeout", "1.0", "--node-id", "1"],
                              env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT)
    cache = None
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert bridge.poll() is None, (tmp_path / "bridge-A.log").read_text()
            time.sleep(0.1)
        shm = glob.glob(f"/dev/shm/vela.{namespace}.*")
        assert shm in ([], [f"/dev/shm/vela.{namespace}.{name}"]), shm
        cache = vela.Cache(name, topology="replicated", sweep_interval=None)  # no LayoutMismatch
        assert bridge.poll() is None, (tmp_path / "bridge-A.log").read_text()
        host_b = Host("B", name, str(tmp_path), node_id=2, topology="replicated")
        host_b.start_bridge(join=[listen], heartbeat=0.2, failure_timeout=1.0)
        eventually(lambda: {m["node_id"]: m["state"] for m in (cache.cluster() or {}).get("members", [])}
                   == {2: "alive"}, 20, what="host A's bridge sees host B")
        cache.put("early", "reached B")
        eventually(lambda: host_b.get("early") == "reached B", 15, what="host B reads host A's write")
        assert bridge.poll() is None
        assert "Traceback" not in (tmp_path / "bridge-A.log").read_text()
    finally:
        if cache is not None:
            cache.close()
        if host_b is not None:
            host_b.close()
        if bridge.poll() is None:
            bridge.terminate()
            try:
                bridge.wait(10)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait(5)
        log.close()
        vela.destroy(name)
        unlink_namespace_segments(namespace)


# ---- 4 ---------------------------------------------------------------------------------------


TAG_CASES = [["x" * 300], [""], ["same"] * 33, ["é" * 128], [f"t{i}" for i in range(33)], ["x" * 255]]


def _tag_outcomes(cache, prefix):
    """For each tag list of TAG_CASES and 10 keys (several owners): what put/put_many did."""
    outcomes = []
    for i, tags in enumerate(TAG_CASES):
        row = []
        for j in range(10):
            key = f"{prefix}-{i}-{j}"
            try:
                if j % 2:
                    cache.put(key, j, tags=tags)
                else:
                    cache.put_many({key: j}, tags=tags)
                row.append("stored" if cache.get(key) == j else "lost")
            except Exception as exc:  # noqa: BLE001 - the type is the outcome
                row.append(type(exc).__name__ if cache.get(key) is None else f"{type(exc).__name__}+stored")
        outcomes.append(sorted(set(row)))
    return outcomes


def test_defect4_tag_rules_are_the_same_on_partitioned_and_local(partitioned, monkeypatch, cache_name):
    """1-255 bytes of UTF-8, at most 32 distinct tags, duplicates count once: the same
    outcome on a partitioned cache (whatever host owns the key) as on a local one."""
    monkeypatch.setenv("VELA_NAMESPACE", partitioned.namespaces["A"])
    expected = [["ValueError"], ["ValueError"], ["stored"], ["ValueError"], ["ValueError"], ["stored"]]
    with vela.Cache(cache_name, capacity="8MiB") as local:
        assert _tag_outcomes(local, "tag") == expected
    assert _tag_outcomes(partitioned.cache, "tag") == expected
    assert partitioned.cache.invalidate_tag("same") == 10


# ---- 5 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["shm", "file"])
def test_defect5_put_many_that_raises_cache_full_leaves_nothing_half_written(backend, tmp_path):
    """``ttl_only`` and full: a put_many that raises CacheFull stores none of its items
    (one host holds every key: all or nothing)."""
    name = new_name()
    opts = {"backend": "file", "backend_opts": {"data_dir": str(tmp_path)}} if backend == "file" else {}
    cache = vela.Cache(name, capacity="1MiB", eviction_policy="ttl_only", sweep_interval=None, **opts)
    try:
        value = b"v" * 8000
        filled = 0
        with pytest.raises(vela.CacheFull):
            while True:
                cache.put(("fill", filled), value)
                filled += 1
        assert filled > 10
        for i in range(3):  # room for about three entries
            assert cache.delete(("fill", i)) is True
        before = cache.size()
        batch = {("batch", i): value for i in range(20)}
        with pytest.raises(vela.CacheFull):
            cache.put_many(batch)
        assert cache.get_many(list(batch)) == {}
        assert cache.size() == before
        assert cache.check() == []
        cache.put_many({("batch", 0): value, ("batch", 1): value})  # what fits still fits
        assert cache.size() == before + 2
    finally:
        cache.destroy()


# ---- 6 ---------------------------------------------------------------------------------------


def test_defect6_django_add_on_the_redis_backend_stores_in_redis():
    """Django's ``add`` on a Redis-backed cache stores into Redis: ``get`` finds it, on
    this host and on any other."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(USE_TZ=True)
        django.setup()
    from vela.contrib.django import VelaCache

    server = RedisServer().start()
    name = new_name()
    other_host = f"vd{uuid.uuid4().hex[:8]}"
    try:
        params = {"OPTIONS": {"backend": "redis", "backend_opts": {"url": server.url}, "sweep_interval": None}}
        django_cache = VelaCache(name, params)
        assert django_cache.add("k", "v", timeout=60) is True
        assert django_cache.get("k") == "v"
        assert django_cache.add("k", "other", timeout=60) is False
        assert django_cache.get("k") == "v"
        key = django_cache.make_key("k")
        with vela.Cache(name, backend="redis", backend_opts={"url": server.url}, sweep_interval=None) as direct:
            assert direct.get(key) == "v"  # in Redis, where every host reads it

        def on_another_host(namespace):
            os.environ["VELA_NAMESPACE"] = namespace
            with vela.Cache(name, backend="redis", backend_opts={"url": server.url}, sweep_interval=None) as c:
                return c.get(key)

        assert run_in_child(on_another_host, other_host) == "v"
        django_cache.vela_cache.destroy()
    finally:
        server.stop()
        unlink_namespace_segments(other_host)


# ---- 7 ---------------------------------------------------------------------------------------


def _failing_fetch_holder(name, key, started):
    """get_or_fetch(key) in another process: holds the lease a while, then its fetch raises."""
    cache = vela.Cache(name, sweep_interval=None)

    def fetch(_k):
        started.send("started")
        time.sleep(0.8)
        raise RuntimeError("the holder's fetch fails")

    try:
        cache.get_or_fetch(key, fetch)
    except RuntimeError:
        return "raised"
    finally:
        cache.close()


def _next_caller(name, key):
    with vela.Cache(name, sweep_interval=None, stampede_timeout=5.0) as cache:
        value = cache.get_or_fetch(key, lambda k: "fetched by the next caller")
        return value


@pytest.mark.parametrize("where", ["waiting for another caller's fetch", "awaiting its own fetch"])
def test_defect7_cancelled_aget_or_fetch_releases_its_lease(where, cache_name):
    """Cancel the task at each await point of aget_or_fetch: no lease stays held, and
    the next caller of the key fetches at once (no stampede timeout)."""
    cache = vela.Cache(cache_name, capacity="8MiB", sweep_interval=None, stampede_timeout=5.0)
    holder = None
    recv, send = FORK.Pipe(duplex=False)
    try:
        if where.startswith("waiting"):
            holder = Child(_failing_fetch_holder, cache_name, "k", send)
            assert recv.poll(30) and recv.recv() == "started"

            async def fetch(_k):
                return "never stored: the task is cancelled"
        else:
            async def fetch(_k):
                await asyncio.sleep(30)

        async def main():
            task = asyncio.ensure_future(cache.aget_or_fetch("k", fetch))
            await asyncio.sleep(0.3)  # the task waits (off the loop) or awaits its fetch
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())  # returns once the loop's executor threads are done
        if holder is not None:
            holder.proc.join(30)
            assert holder.conn.recv() == ("ok", "raised")
        eventually(lambda: cache.info()["leases_held"] == 0, 3.0, what="every lease released")
        cache.stats(reset=True)
        assert run_in_child(_next_caller, cache_name, "k") == "fetched by the next caller"
        st = cache.stats()
        assert (st["stampede_timeouts"], st["stampede_waits"], st["fetches"]) == (0, 0, 1)
    finally:
        if holder is not None:
            holder.close()
        recv.close()
        cache.close()


# ---- 8 ---------------------------------------------------------------------------------------


def test_defect8_replicated_flush_and_invalidate_tag_count_keys_not_hosts(replicated, monkeypatch):
    """1,000 keys on two hosts: invalidate_tag and flush say 1,000 (what one host removed),
    not 2,000, and deleted entries (tombstones) are not counted."""
    monkeypatch.setenv("VELA_NAMESPACE", replicated.namespaces["A"])
    c = replicated.cache
    c.flush()

    def b_holds(key, value):
        replicated.on_host_b(lambda cache: eventually(lambda: cache.get(key) == value, 20,
                                                      what=f"host B holds {key!r}"))

    c.put_many({f"k{i}": i for i in range(1000)}, tags=["demo"])
    c.put("marker", 1)
    b_holds("marker", 1)
    assert c.invalidate_tag("demo") == 1000
    assert c.invalidate_tag("demo") == 0
    c.put_many({f"k{i}": i for i in range(1000)})
    for i in range(10):
        c.delete(f"k{i}")
    c.put("marker", 2)
    b_holds("marker", 2)
    assert c.flush() == 991  # 990 keys and the marker; the 10 tombstones are not entries
    assert c.flush() == 0
    assert replicated.on_host_b(lambda cache: (cache.size(), cache.flush())) == (0, 0)


def test_defect2_a_file_backed_replicated_host_restarted_whole_keeps_its_data(monkeypatch):
    """Host A of a file-backed replicated cache stops entirely (workers and bridge
    SIGKILLed); started again, its table still holds what was written, and its bridge
    rejoins the cluster."""
    store = Store("file-replicated")
    try:
        monkeypatch.setenv("VELA_NAMESPACE", store.namespaces["A"])
        host_a, host_b = store.cluster.hosts
        written = {f"r{i}": {"n": i} for i in range(30)}
        store.cache.put_many(written)
        store.cache.flush_to_disk()
        store.on_host_b(lambda cache: eventually(lambda: cache.get("r29") == {"n": 29}, 15,
                                                 what="host B holds host A's writes"))
        store.cache.close()
        host_a.kill_bridge(signal.SIGKILL)
        host_a.agent.kill()
        host_a.agent.wait(10)
        store.cache = store.open()  # the first process of the restarted host
        assert store.cache.get_many(list(written)) == written
        host_a.restart_bridge(wait=False)  # (host A's agent is gone: wait through the segment)
        eventually(lambda: (store.cache.cluster() or {}).get("pid") == host_a.bridge.pid, 20,
                   what=f"host A's restarted bridge publishes its view:\n{host_a.bridge_output()}")
        store.on_host_b(lambda cache: cache.put("after-restart", "from B"))
        eventually(lambda: store.cache.get("after-restart") == "from B", 20,
                   what="host A's restarted bridge receives host B's writes")
        assert store.cache.get_many(list(written)) == written
    finally:
        store.close()


@pytest.mark.parametrize("options, named", [
    ({"backend": "redis", "topology": "replicated"}, ("backend", "topology")),
    ({"backend": "redis", "topology": "partitioned"}, ("backend", "topology")),
    ({"near_cache": True}, ("near_cache", "backend")),
    ({"near_cache": True, "backend": "file"}, ("near_cache", "backend")),
    ({"near_cache": True, "topology": "replicated"}, ("near_cache", "topology")),
])
def test_refused_combinations_name_both_options_and_leave_nothing_behind(options, named, tmp_path,
                                                                          monkeypatch):
    """Issue 14, item 1: a combination no store serves is refused at construction with
    OptionError naming both options; no segment, file or socket is left."""
    namespace = f"vr{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("VELA_NAMESPACE", namespace)
    options = dict(options)
    if options.get("backend") == "file":
        options["backend_opts"] = {"data_dir": str(tmp_path)}
    if options.get("backend") == "redis":
        options["backend_opts"] = {"url": "redis://127.0.0.1:1/0"}  # never reached: refused first
    sockets = set(glob.glob("/tmp/vela-bridge.*"))
    with pytest.raises(vela.OptionError) as raised:
        vela.Cache(new_name(), **options)
    for option in named:
        assert option in str(raised.value), (option, str(raised.value))
    assert glob.glob(f"/dev/shm/vela.{namespace}.*") == []
    assert os.listdir(tmp_path) == []
    assert set(glob.glob("/tmp/vela-bridge.*")) <= sockets


def test_redis_put_many_cut_off_between_batches_says_which_keys_were_stored():
    """Issue 14, item 4: a Redis ``put_many`` is written in Lua calls of 500 entries;
    when Redis goes away after the first, the PartialWrite names exactly the keys
    written (the first call's, which Redis holds) and those not written."""
    server = RedisServer().start()
    name = new_name()
    cache = vela.Cache(name, backend="redis", backend_opts={"url": server.url, "retries": 0},
                       sweep_interval=None)
    store = cache._store
    real_store = store._store
    in_redis = []

    def store_then_lose_redis(entries, *args, **kwargs):
        real_store(entries, *args, **kwargs)
        in_redis.append(len(store._scan(store._P + b"v:*")))
        server.stop()  # the next call finds no server

    store._store = store_then_lose_redis
    items = {f"k{i}": i for i in range(700)}
    try:
        with pytest.raises(vela.PartialWrite) as raised:
            cache.put_many(items)
        assert in_redis == [500]
        assert raised.value.stored == {f"k{i}" for i in range(500)}
        assert raised.value.failed == {f"k{i}" for i in range(500, 700)}
        assert isinstance(raised.value.__cause__, vela.BackendUnavailable)
    finally:
        store._store = real_store
        cache.close()
        server.stop()
        vela.destroy(store._o.l1_segment)  # the host table
