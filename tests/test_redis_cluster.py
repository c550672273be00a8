"""The Redis store on a real Redis Cluster: a cache spread over every master.

Every test starts real redis-servers (``redis_server.RedisCluster``): three masters
(with a replica each where a master is killed), slots in even ranges as
``redis-cli --cluster create`` gives them. The contract suite runs here too, against
the cluster (the ``redis`` and ``redis-near`` cases of tests/test_contract.py).
"""
import time

import pytest
import redis

import vela
from conftest import new_name, run_in_child
from redis_server import RedisCluster, free_port
from stores import Store
from test_contract import *  # noqa: F401,F403 - the contract cases, run below against the cluster

del test_async_api  # noqa: F821 - the async API serves single-node URLs; a cluster URL is refused (tested below)
from vela import _native
from vela.stores.redis import Shards

FAST = {"socket_timeout": 0.5, "connect_timeout": 0.5, "retries": 1, "retry_backoff": 0.01, "heartbeat": 0.1}


@pytest.fixture(scope="module")
def cluster():
    c = RedisCluster(masters=3).start()
    yield c
    c.stop()


def open_cache(cluster, name, **opts):
    backend_opts = dict(FAST, url=cluster.url, l1_segment=opts.pop("l1_segment", name + ".A"))
    backend_opts.update(opts.pop("backend_opts", {}))
    return vela.Cache(name, backend="redis", capacity="16MiB", backend_opts=backend_opts, **opts)


@pytest.fixture
def cache(cluster):
    c = open_cache(cluster, new_name())
    yield c
    c.destroy()


def count_per_master(cluster, pattern):
    """{port: keys matching ``pattern``} on each live master (SCAN of that node only)."""
    counts = {}
    for master in cluster.masters():
        client = redis.Redis(port=master.port)
        counts[master.port] = sum(1 for _ in client.scan_iter(match=pattern, count=1000))
        client.close()
    return counts


def values_pattern(name):
    return f"vela:{{{name}:*}}:v:*"


# ---- the async API --------------------------------------------------------------------------


def test_the_async_api_on_a_cluster_url_is_refused_naming_the_sync_api(cache):
    import asyncio

    cache.put("k", 1)
    with pytest.raises(vela.VelaError, match="is a cluster URL \\(use the sync API\\)"):
        asyncio.run(cache.aget("k"))
    assert cache.get("k") == 1  # the sync API works on


# ---- spreading ------------------------------------------------------------------------------


def test_keys_spread_evenly_over_every_master(cluster, cache):
    n = 6000
    cache.put_many({f"user:{i}": i for i in range(n)})
    counts = count_per_master(cluster, values_pattern(cache.name))
    assert len(counts) == 3 and sum(counts.values()) == n
    for port, count in counts.items():
        assert abs(count - n / 3) <= 0.15 * n / 3, (port, counts)
    assert cache.size() == n
    assert cache.get_many([f"user:{i}" for i in range(n)]) == {f"user:{i}": i for i in range(n)}


def test_the_shards_spread_evenly_over_the_slots():
    # Shard s's hash tag lands in the s-th N-th of the slots: 64 shards over three even
    # slot ranges are 21, 21 and 22 (in some order: two shards straddle a boundary).
    shards = Shards("shop", 64, True)
    slots = [redis.crc.key_slot(p) for p in shards.prefixes]
    assert [slot * 64 // 16384 for slot in slots] == list(range(64))
    owners = [sum(1 for slot in slots if lo <= slot <= hi) for lo, hi in ((0, 5460), (5461, 10922), (10923, 16383))]
    assert sorted(owners) == [21, 21, 22]
    assert Shards("shop", 1, False).prefixes == [b"vela:shop:"]


def test_a_key_lives_in_its_shard_with_its_tag_set(cluster, cache):
    cache.put(("order", 7), "x", tags=["orders"])
    store = cache._store
    enc = _native.encode_key(("order", 7))
    prefix = store._prefix(enc)
    assert prefix == Shards(cache.name, 64, True).of(enc)
    client = redis.RedisCluster.from_url("redis://" + cluster.url.split("//", 1)[1].split(",")[0])
    try:
        assert client.get(prefix + b"v:" + enc) == b"\x01x"
        assert client.smembers(prefix + b"m:" + enc) == {b"orders"}
        assert client.smembers(prefix + b"t:orders") == {enc}
    finally:
        client.close()


def test_every_process_agrees_on_the_recorded_shard_count(cluster):
    name = new_name()
    first = open_cache(cluster, name, backend_opts={"shards": 16})
    try:
        first.put_many({i: i for i in range(400)})
        with pytest.raises(vela.LayoutMismatch, match=r"shards'\]=8, but .* has 16 shards"):
            other = open_cache(cluster, name, l1_segment=name + ".B", backend_opts={"shards": 8})
            try:
                other.get(1)
            finally:
                other.close()

        def read_all(url):
            c = vela.Cache(name, backend="redis", backend_opts=dict(FAST, url=url, l1_segment=name + ".C"))
            try:
                return c.get_many(list(range(400))), c.info()["shards"]
            finally:
                c.close()

        # A process that gives no count adopts the recorded one and finds every key.
        assert run_in_child(read_all, cluster.url) == ({i: i for i in range(400)}, 16)
    finally:
        first.destroy()
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0].port)
    try:
        assert client.exists(f"vela:{{{name}}}:shards".encode()) == 0  # destroy removed the record
    finally:
        client.close()


@pytest.mark.parametrize("opts, message", [
    ({"shards": 0}, r"'shards'\] must be an int from 1 to 256, not 0"),
    ({"shards": True}, r"'shards'\] must be an int from 1 to 256, not True"),
    ({"shards": 257}, r"'shards'\] must be an int from 1 to 256, not 257"),
    ({"shards": "8"}, r"'shards'\] must be an int from 1 to 256, not '8'"),
])
def test_bad_shard_counts_are_refused(opts, message):
    with pytest.raises(vela.OptionError, match=message):
        vela.Cache(new_name(), backend="redis", backend_opts=dict(opts, url="redis+cluster://127.0.0.1:1"))


def test_shards_apply_to_a_cluster_only():
    with pytest.raises(vela.OptionError, match=r"'shards'\] applies to Redis Cluster only"):
        vela.Cache(new_name(), backend="redis", backend_opts={"url": "redis://127.0.0.1:1/0", "shards": 4})


def test_a_cluster_with_no_reachable_node_is_unavailable():
    name = new_name()
    c = vela.Cache(name, backend="redis", backend_opts=dict(FAST, url=f"redis+cluster://127.0.0.1:{free_port()}",
                                                            l1_segment=name + ".A"))
    try:
        for call in (lambda: c.get("k"), lambda: c.put("k", 1), lambda: c.get_many(["a", "b"]), c.size):
            with pytest.raises(vela.BackendUnavailable, match="Redis Cluster cannot be connected"):
                call()
    finally:
        c.close()
        assert vela.destroy(name + ".A")  # the host table (Redis holds nothing of it)


# ---- tags, flush, batches ------------------------------------------------------------------


def test_tags_and_flush_across_shards_count_exactly(cluster, cache):
    cache.put_many({f"a{i}": i for i in range(300)}, tags=["a"])
    cache.put_many({f"b{i}": i for i in range(200)}, tags=["b"])
    cache.put_many({f"ab{i}": i for i in range(100)}, tags=["a", "b"])
    cache.put_many({f"n{i}": i for i in range(50)})
    # Each shard keeps its own set of a tag: the sets are on every master.
    tag_sets = count_per_master(cluster, f"vela:{{{cache.name}:*}}:t:a")
    assert all(count > 0 for count in tag_sets.values()) and sum(tag_sets.values()) == 64
    assert cache.invalidate_tag("a") == 400
    assert sum(count_per_master(cluster, f"vela:{{{cache.name}:*}}:t:a").values()) == 0
    assert cache.size() == 250
    assert cache.get_many([f"ab{i}" for i in range(100)] + [f"a{i}" for i in range(300)]) == {}
    assert cache.invalidate_tag("b") == 200
    assert cache.invalidate_tag("b") == 0
    assert cache.size() == 50
    assert cache.flush() == 50
    assert cache.size() == 0
    assert sum(count_per_master(cluster, values_pattern(cache.name)).values()) == 0
    assert sum(count_per_master(cluster, f"vela:{{{cache.name}:*}}:[mt]:*").values()) == 0


def test_batches_and_single_key_calls_across_shards(cache):
    keys = [("k", i) for i in range(1500)]  # more than a Lua call takes (500) in some shards
    cache.put_many({k: k[1] for k in keys}, ttl=60, tags=["t"])
    assert cache.get_many(keys + ["absent"]) == {k: k[1] for k in keys}
    assert cache.delete_many(keys[:700]) == 700
    assert cache.size() == 800
    assert cache.incr(("k", 900), 5) == 905
    assert cache.add(("k", 901), 0) is False and cache.add(("k", 1), 1) is True
    assert cache.touch(("k", 902), ttl=30) is True
    assert cache.get_or_fetch(("k", 2), lambda k: "fetched") == "fetched"
    assert cache.invalidate_tag("t") == 800
    assert cache.size() == 2


def test_near_caches_of_two_hosts_see_every_shard_change(two_hosts):
    a, b = two_hosts
    keys = [f"k{i}" for i in range(300)]
    b.put_many({k: 1 for k in keys}, tags=["t"])
    # Reads fill A's L1 (a fill racing B's invalidations in flight is dropped: read again).
    deadline = time.monotonic() + 10
    while True:
        assert a.get_many(keys) == {k: 1 for k in keys}
        if a.info()["entries"] >= 300:
            break
        assert time.monotonic() < deadline, "A's L1 did not fill"
        time.sleep(0.02)
    # invalidate_tag returns once A's listener applied every shard's invalidations.
    assert b.invalidate_tag("t") == 300
    assert a.get_many(keys) == {}
    b.put_many({k: 2 for k in keys})
    assert a.get_many(keys) == {k: 2 for k in keys}
    b.put_many({k: 3 for k in keys})  # each shard's message reaches A's listener
    deadline = time.monotonic() + 10
    while a.get_many(keys) != {k: 3 for k in keys}:
        assert time.monotonic() < deadline, "A kept stale copies"
        time.sleep(0.02)
    assert b.flush() == 300
    assert a.get_many(keys) == {}


@pytest.fixture
def two_hosts(cluster):
    """Near caches of two hosts (two host tables) on one cache, their listeners healthy."""
    name = new_name()
    a = open_cache(cluster, name, l1_segment=name + ".A", near_cache=True)
    b = open_cache(cluster, name, l1_segment=name + ".B", near_cache=True)
    deadline = time.monotonic() + 10
    while not (a.info()["listener_healthy"] and b.info()["listener_healthy"]):
        assert time.monotonic() < deadline, "no healthy listener over the cluster"
        time.sleep(0.02)
    yield a, b
    b.close()
    a.destroy()
    vela.destroy(name, backend="redis", backend_opts={"url": cluster.url, "l1_segment": name + ".B"})


def listener_of(cache):
    return cache._store.inner._agent.listener


def test_writes_streaming_over_every_shard_show_no_loss(two_hosts):
    """The heartbeat's checks, made while every shard's messages come over the cluster
    bus, find no gap where none happened."""
    a, b = two_hosts
    deadline = time.monotonic() + 1.5  # 15 heartbeats
    i = 0
    while time.monotonic() < deadline:
        a.put(("w", i), i)
        i += 1
    time.sleep(0.3)
    assert (listener_of(a).numbering.gaps, listener_of(b).numbering.gaps) == (0, 0)
    channels = listener_of(b).channels
    assert len(channels) == 64
    assert sum(listener_of(b).numbering.highest(c) for c in channels) >= i


def test_a_lost_message_of_one_shard_drops_l1(cluster, two_hosts):
    a, b = two_hosts
    a.put("k", 1)
    deadline = time.monotonic() + 5
    while b._table.get("k", None) != 1:  # B's L1 holds a copy
        assert b.get("k") == 1
        assert time.monotonic() < deadline, "B kept no copy"
        time.sleep(0.02)
    # A number taken in the shard of another key, its message never sent: a lost one.
    shard_of = a._store.inner._layout().of
    other = next(shard_of(_native.encode_key(f"o{i}")) for i in range(1000)
                 if shard_of(_native.encode_key(f"o{i}")) != shard_of(_native.encode_key("k")))
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0].port)
    try:
        client.incr(other + b"iseq")
    finally:
        client.close()
    deadline = time.monotonic() + 5  # the heartbeat finds it (a few heartbeats of 0.1 s)
    while listener_of(b).numbering.gaps != 1:
        assert time.monotonic() < deadline, "the lost message was not found"
        time.sleep(0.02)
    assert b._table.get("k", None) is None  # what it named is unknown: L1 is dropped
    assert b.get("k") == 1


# ---- a master dies ---------------------------------------------------------------------------


def wait_until(predicate, what, timeout=30.0):
    """Call ``predicate`` until it is true; BackendUnavailable counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except vela.BackendUnavailable:
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_killed_master_fails_over_while_the_cache_keeps_answering():
    cl = RedisCluster(masters=3, replicas=1, node_timeout_ms=1000).start()
    name = new_name()
    c = near = None
    try:
        c = open_cache(cl, name)
        # Another host's near cache: its listener is subscribed on the home shard's master.
        near = open_cache(cl, name, l1_segment=name + ".N", near_cache=True)
        n = 3000
        c.put_many({f"k{i}": i for i in range(n)}, tags=["t"])
        shards = c._store._layout()
        ranges = {(lo, hi): node[1] for lo, hi, node, *_ in cl.node_command(cl.masters()[0], "CLUSTER", "SLOTS")}

        def master_port(prefix):
            slot = redis.crc.key_slot(prefix)
            return next(port for (lo, hi), port in ranges.items() if lo <= slot <= hi)

        # The victim holds the home shard: the listener's node, the hosts' registrations.
        victim = next(m for m in cl.masters() if m.port == master_port(shards.home))
        cl.wait_replicated(victim)  # every acknowledged write is on its replica

        def on_victim(key):
            return master_port(shards.of(_native.encode_key(key))) == victim.port

        batch = [f"new{i}" for i in range(2000)]
        dead = [k for k in batch if on_victim(k)]
        # Keys of live masters' shards first, so that some shards are stored before one fails.
        first = next(k for k in batch if not on_victim(k))
        batch.remove(first)
        batch.insert(0, first)
        victim.kill()

        # Before the failover: a batch is stored shard by shard up to the dead master's
        # first shard; the error names exactly the keys stored.
        with pytest.raises(vela.PartialWrite) as caught:
            c.put_many({k: 1 for k in batch})
        stored, failed = caught.value.stored, caught.value.failed
        assert stored and stored.isdisjoint(dead) and stored | failed == set(batch) and not stored & failed

        # The replica is promoted; meanwhile calls either answer or raise BackendUnavailable.
        wait_until(lambda: c.get(dead[0]) is None and c.get("k1") == 1, "no answer after the failover")
        c.put(dead[0], "after")
        cl.wait_healthy()
        assert victim.port not in {m.port for m in cl.masters()}

        # Nothing acknowledged before the kill is lost; the partial batch is exactly as reported.
        assert c.get_many([f"k{i}" for i in range(n)]) == {f"k{i}": i for i in range(n)}
        assert set(c.get_many(batch)) == stored | {dead[0]}
        assert c.size() == n + len(stored) + 1

        # The near cache's listener is back on the new master and sees every change again.
        wait_until(lambda: near.info()["listener_healthy"], "the listener did not come back")
        wait_until(lambda: near.get("k5") == 5 and near._table.get("k5", None) == 5, "no L1 copy")
        c.put("k5", "changed")
        wait_until(lambda: near.get("k5") == "changed", "the near cache kept a stale copy")
        assert near.get_many([f"k{i}" for i in range(100)]) == {**{f"k{i}": i for i in range(100)}, "k5": "changed"}
        assert c.invalidate_tag("t") == n - 1  # (k5 was rewritten untagged)
        assert near.get_many([f"k{i}" for i in range(100)]) == {"k5": "changed"}  # confirmed by its host
        c.put_many({k: 2 for k in batch})
        assert c.get_many(batch) == {k: 2 for k in batch}
        assert c.flush() == len(batch) + 1  # and k5
    finally:
        for handle in (near, c):
            if handle is not None:
                try:
                    handle.destroy()
                except vela.VelaError:
                    handle.close()
        cl.stop()


# ---- the contract suite, against the cluster --------------------------------------------------


@pytest.fixture(scope="module", params=["redis", "redis-near"])
def opened(request, cluster):  # noqa: F811 - replaces test_contract's: its stores, on the cluster
    store = Store(request.param, redis_url=cluster.url)
    yield store
    store.cache.destroy()
    store.close()

