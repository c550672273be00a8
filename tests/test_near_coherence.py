"""Near-cache coherence checked on histories, with real processes on simulated hosts.

Readers on every host loop over tagged keys, each read recorded with its start and
end time and its result; a writer meanwhile puts new generations of the keys,
invalidates their tag, flushes, deletes. Values are generation numbers, so a read
is stale when it returns a generation an operation that had *returned* before the
read *started* replaced or removed:

- after invalidate_tag and flush (the calls wait for every host's L1): never;
- after a put or a delete (its invalidation travels after the call): only within
  the invalidation latency, which the test measures and prints.

Both stores with a near cache: the partitioned topology (tests/cluster.py, a
vela-bridge per host) and Redis (a real redis-server, one host table per host).
Then a lost invalidation message: the receiver notices the gap and drops the
origin's copies.
"""
import bisect
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from cluster import Cluster, eventually
from conftest import new_name
from redis_server import RedisServer, available

KEYS = [f"n{i}" for i in range(24)]
PAUSE = 0.12  # seconds between the writer's steps: readers take copies meanwhile

# A reader: one process, its own handle; reads until ``until`` (wall clock, shared by
# every simulated host of this machine) and writes its history as JSON.
READER = textwrap.dedent('''
    import json, sys, time
    import vela
    args = json.loads(sys.argv[1])
    cache = vela.Cache(args["name"], **args["opts"])
    history = []
    open(args["path"] + ".ready", "w").close()
    while time.time() < args["until"]:
        for key in args["keys"]:
            start = time.time()
            held = cache._table.contains(key)  # a copy (or an owned entry) was there
            value = cache.get(key)
            history.append([start, time.time(), key, value, held])
        time.sleep(0.001)
    cache.close()
    with open(args["path"], "w") as f:
        json.dump(history, f)
''')


class Readers:
    """Reader processes, one per (environment, options)."""

    def __init__(self, workdir, name, keys, seconds):
        self.workdir = str(workdir)
        self.name = name
        self.keys = keys
        self.until = time.time() + seconds
        self.procs = []

    def start(self, label, env, opts):
        path = os.path.join(self.workdir, f"history-{label}-{len(self.procs)}.json")
        args = json.dumps(dict(name=self.name, keys=self.keys, until=self.until, path=path, opts=opts))
        proc = subprocess.Popen([sys.executable, "-c", READER, args], env=env, stderr=subprocess.PIPE)
        self.procs.append((label, path, proc))

    def wait_started(self):
        for label, path, proc in self.procs:
            eventually(lambda: os.path.exists(path + ".ready") or proc.poll() is not None, 20,
                       what=f"reader on {label} started")
            assert proc.poll() is None, proc.stderr.read().decode()

    def histories(self):
        """{label: [[start, end, key, value, held], ...]} once every reader is done."""
        out = {}
        for label, path, proc in self.procs:
            try:
                _, err = proc.communicate(timeout=max(0.0, self.until - time.time()) + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"reader on {label} did not finish")
            assert proc.returncode == 0, f"reader on {label} failed:\n{err.decode()}"
            with open(path) as f:
                out.setdefault(label, []).extend(json.load(f))
        return out

    def kill(self):
        for _, _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


class Writer:
    """Runs the writer's operations, each recorded as (kind, start, end, floor): once it
    has returned, no generation <= floor may be read (at once for invalidate_tag and
    flush; within the invalidation latency for put and delete)."""

    HARD = ("tag", "flush")

    def __init__(self, keys):
        self.keys = keys
        self.gen = 0
        self.events = []

    def run(self, kind, fn):
        start = time.time()
        fn()
        self.events.append((kind, start, time.time(), self.gen - 1 if kind == "put" else self.gen))

    def rounds(self, n, put_many, invalidate_tag, flush, delete_many):
        """``n`` rounds: a generation put, read, the next one put over it, read, then the
        keys invalidated by tag, flushed or deleted (in turn), read. Each callable takes
        the round number (to pick the host that runs it)."""
        for r in range(n):
            for _ in range(2):
                self.gen += 1
                self.run("put", lambda: put_many(r, [[k, self.gen] for k in self.keys]))
                time.sleep(PAUSE)
            kind = ("tag", "flush", "delete")[r % 3]
            self.run(kind, {"tag": lambda: invalidate_tag(r), "flush": lambda: flush(r),
                            "delete": lambda: delete_many(r, self.keys)}[kind])
            time.sleep(PAUSE)


def check(histories, events):
    """(reads, stale reads after invalidate_tag/flush returned, staleness in seconds of
    each read after a put/delete returned that still saw what it replaced)."""
    def floors(kinds):
        evs = sorted((end, floor) for kind, _, end, floor in events if kind in kinds)
        ends, highest, top = [], [], -1
        for end, floor in evs:
            top = max(top, floor)
            ends.append(end)
            highest.append(top)
        return ends, highest

    def floor_at(table, t):
        ends, highest = table
        i = bisect.bisect_left(ends, t)  # events that ended before t
        return highest[i - 1] if i else -1

    hard, soft = floors(Writer.HARD), floors(("put", "delete"))
    stale, lags, reads = [], [], 0
    for label, history in histories.items():
        for start, end, key, value, held in history:
            reads += 1
            if value is None:
                continue
            if value <= floor_at(hard, start):
                stale.append((label, key, value, start))
            elif value <= floor_at(soft, start):
                # since when it was stale: the first put/delete that replaced this generation
                first = bisect.bisect_left(soft[1], value)
                lags.append(start - soft[0][first])
    return reads, stale, lags


def report(what, reads, stale, lags, copies):
    worst = max(lags) if lags else 0.0
    print(f"\n{what}: {reads} reads ({copies} served by a copy), {len(stale)} stale after "
          f"invalidate_tag/flush returned; {len(lags)} reads after a put/delete returned still saw the "
          f"old value, for at most {worst * 1000:.1f} ms (the invalidation latency)")


# --------------------------------------------------------------------------------------
# partitioned


NEAR = {"near_cache": True, "near_cache_l1_ttl": 60}


def start(cluster):
    """Start the bridges with a failure timeout no load on this machine reaches: a new
    partition table drops every copy, which would hide what the tests look at."""
    a, b, c = cluster
    for h, seed in ((a, b), (b, a), (c, a)):
        h.start_bridge(join=[seed], failure_timeout=5.0, wait=False)
    for h in cluster:
        h.wait_bridge()
    wait_ready(cluster)


def wait_ready(cluster):
    """Every bridge has the partition table of every member (a bridge that started before
    it heard of the last one has a table without it first: the next one drops the copies),
    and knows the others' (the table number is the highest any member used)."""
    cluster.wait_members()
    everyone = sorted(h.node_id for h in cluster)

    def agreed():
        views = [h.cluster() for h in cluster]
        return all((h.status() or {}).get("caches", {}).get(cluster.name, {}).get("ready") for h in cluster) \
            and all(sorted(set(v.get("owners") or ())) == everyone for v in views) \
            and all(v.get("owners") == views[0].get("owners") and v.get("ring_epoch") == views[0].get("ring_epoch")
                    for v in views)
    eventually(agreed, 15, what="every bridge has the partition table of every member")


@pytest.mark.parametrize("backups", [0, 1])
def test_partitioned_reads_after_an_invalidation_returned_are_never_stale(tmp_path, backups):
    c = Cluster(tmp_path, n=3, topology="partitioned", cache_opts=NEAR, start=False,
                bridge_extra=["--backups", str(backups)] if backups else [])
    readers = None
    try:
        start(c)
        owners = {k: c[0].call("owner", key=k)[0] for k in KEYS}
        assert len(set(owners.values())) == 3  # every host owns some of the keys
        readers = Readers(tmp_path, c.name, KEYS, seconds=9 * 3 * PAUSE + 8)
        for h in c:
            readers.start(h.label, h.env, dict(NEAR, topology="partitioned", sweep_interval=None))
        readers.wait_started()
        w = Writer(KEYS)
        w.rounds(9, put_many=lambda r, items: c[r % 3].put_many(items, tags=["t"]),
                 invalidate_tag=lambda r: c[(r + 1) % 3].invalidate_tag("t"),
                 flush=lambda r: c[(r + 1) % 3].flush(),
                 delete_many=lambda r, keys: c[(r + 1) % 3].call("delete_many", keys=keys))
        histories = readers.histories()
        reads, stale, lags = check(histories, w.events)
        node = {h.label: h.node_id for h in c}
        copies = sum(1 for label, hist in histories.items() for _, _, k, v, held in hist
                     if held and owners[k] != node[label])
        report(f"partitioned, 3 hosts, backups={backups}", reads, stale, lags, copies)
        assert copies > 500  # the readers did read L1 copies of other hosts' keys
        assert stale == []
        assert [h.status()["caches"][c.name]["inval_gaps"] for h in c] == [0, 0, 0]  # none was lost
        assert all(lag < 1.0 for lag in lags)  # invalidations arrived (L1 age: 60 s)
    finally:
        if readers is not None:
            readers.kill()
        c.close()


# The bridge of one host loses invalidation messages on purpose: sitecustomize in its
# PYTHONPATH wraps Partitions.take_outbound and drops the next message (numbered all
# the same) whenever the flag file exists.
LOSE_HOOK = textwrap.dedent('''
    import os
    flag = os.environ.get("VELA_TEST_LOSE_INVAL")
    if flag:
        from vela.bridge import partitions
        real = partitions.Partitions.take_outbound
        def take_outbound(self, now, delay):
            brecs, messages = real(self, now, delay)
            if messages and os.path.exists(flag):
                os.unlink(flag)
                messages = messages[1:]
            return brecs, messages
        partitions.Partitions.take_outbound = take_outbound
''')


def test_partitioned_a_lost_invalidation_drops_the_origins_copies(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(LOSE_HOOK)
    flag = tmp_path / "lose-next-invalidation"
    c = Cluster(tmp_path, n=3, topology="partitioned", cache_opts=NEAR, start=False)
    try:
        a, b, cc = c
        a.env = dict(a.env, VELA_TEST_LOSE_INVAL=str(flag),
                     PYTHONPATH=os.pathsep.join([str(hook), a.env["PYTHONPATH"]]))
        start(c)
        epoch = b.cluster()["ring_epoch"]
        by_owner = {}
        for k in [f"g{i}" for i in range(200)]:
            by_owner.setdefault(a.call("owner", key=k)[0], []).append(k)
        k1, k2 = by_owner[a.node_id][:2]
        k3, k4 = by_owner[cc.node_id][:2]
        for k in (k1, k2, k3, k4):
            a.put(k, "v1")
            eventually(lambda: b.get(k) == "v1" and b.call("local_get", key=k) == [True, "v1"], 3,
                       interval=0.01, what=f"a copy of {k} on B")

        # A host reads its own writes at once (its copy goes when the owner answered).
        b.put(k4, "v2")
        assert b.call("local_get", key=k4)[0] is False and b.get(k4) == "v2"
        b.delete(k4)
        assert b.get(k4) is None

        def gaps():
            return b.status()["caches"][c.name]["inval_gaps"]

        assert gaps() == 0
        flag.touch()
        a.put(k1, "v2")                 # its invalidation message is lost; nothing follows it
        eventually(lambda: not flag.exists(), 3, what="the message dropped")
        eventually(lambda: gaps() == 1, 3, what="B noticed the lost message")  # by A's heartbeat
        assert b.call("local_get", key=k1)[0] is False
        assert b.call("local_get", key=k2)[0] is False   # every copy A could have invalidated
        assert b.call("local_get", key=k3) == [True, "v1"]  # C's stay
        assert b.get(k1) == "v2"
        assert "invalidations" in b.bridge_output() and "were lost" in b.bridge_output()
        assert b.cluster()["ring_epoch"] == epoch, c.logs()[-5000:]
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# Redis


pytestmark_redis = pytest.mark.skipif(not available(), reason="redis-server is not installed")

FAST = {"heartbeat": 0.1, "socket_timeout": 0.5, "connect_timeout": 0.5, "retries": 1,
        "retry_backoff": 0.01, "degraded_l1_ttl": 0.5}


def _slow_listener(conn, name, opts, delay):
    """A forked process that becomes its host's listener and applies every message
    ``delay`` seconds late (a loaded host): until told to stop."""
    import vela
    from vela.stores import redis_listener

    real = redis_listener.Listener.on_message

    def late(self, data):
        time.sleep(delay)
        real(self, data)

    redis_listener.Listener.on_message = late
    c = vela.Cache(name, **opts)
    try:
        deadline = time.monotonic() + 5
        while not (c.info()["listener"] and c.info()["listener_healthy"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        conn.send(c.info()["listener"])
        conn.poll(120)
    finally:
        c.close()


@pytestmark_redis
def test_redis_reads_after_an_invalidation_returned_are_never_stale(tmp_path):
    """Host B's listener applies each message 30 ms late: invalidate_tag and flush
    wait for it all the same."""
    import vela
    from conftest import FORK

    server = RedisServer().start()
    name = new_name()
    handles, readers, listener = {}, None, None
    try:
        def opts(label):
            return dict(backend="redis", near_cache=True, near_cache_l1_ttl=60, capacity="8MiB",
                        backend_opts=dict(FAST, url=server.url, l1_segment=f"{name}.{label}"))

        conn, child = FORK.Pipe()
        listener = FORK.Process(target=_slow_listener, args=(child, name, opts("B"), 0.03), daemon=True)
        listener.start()
        assert conn.poll(10) and conn.recv() is True
        # A's first handle (here) is A's listener; B's is the child; the readers are others.
        for label in ("A", "B"):
            handles[label] = vela.Cache(name, **opts(label))
        eventually(lambda: all(h.info()["listener_healthy"] for h in handles.values()), 5,
                   what="a listener on every host")
        hosts = [handles["A"], handles["B"]]
        readers = Readers(tmp_path, name, KEYS, seconds=9 * 3 * PAUSE + 6)
        for label in ("A", "A", "B", "B"):
            readers.start(label, dict(os.environ), opts(label))
        readers.wait_started()
        w = Writer(KEYS)
        w.rounds(9, put_many=lambda r, items: hosts[r % 2].put_many(items, tags=["t"]),
                 invalidate_tag=lambda r: hosts[(r + 1) % 2].invalidate_tag("t"),
                 flush=lambda r: hosts[(r + 1) % 2].flush(),
                 delete_many=lambda r, keys: hosts[(r + 1) % 2].delete_many(keys))
        histories = readers.histories()
        reads, stale, lags = check(histories, w.events)
        copies = sum(1 for hist in histories.values() for _, _, _, _, held in hist if held)
        report("redis, 2 hosts (B's listener 30 ms late)", reads, stale, lags, copies)
        assert copies > 500
        assert stale == []
        assert all(lag < 1.0 for lag in lags)
    finally:
        if readers is not None:
            readers.kill()
        if listener is not None:
            conn.send("stop")
            listener.join(10)
            if listener.is_alive():
                listener.kill()
        for h in handles.values():
            h.destroy()
        server.stop()
