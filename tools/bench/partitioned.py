"""The partitioned topology between two simulated hosts on loopback, against
redis-py and a local redis-server, in one run.

    python tools/bench/partitioned.py            # about 30 s
    python tools/bench/partitioned.py --quick    # a smoke run, noisier
    python tools/bench/partitioned.py --json out.json
    python tools/bench/partitioned.py --backups 1 [--async-backups]   # puts with a backup copy

Two hosts A and B (tests/cluster.py: each its own VELA_NAMESPACE and its own
``vela-bridge``); this process is a worker of host A. Prints, each measured in
this run, 100-byte values, one call at a time (latency = time per call):

- remote get: ``cache.get`` of keys that B owns (a request to B's bridge over TCP
  loopback and its answer) against redis-py ``GET`` of the same values from a
  redis-server on TCP loopback, the mean and the median (p50) of calls timed
  one by one (target: both <= 1.0x the redis GET);
- local get: ``cache.get`` of keys that A owns (read from A's table, lock-free);
- near-cache hit: ``cache.get`` of B's keys on a handle with ``near_cache=True``
  once their L1 copies are in A's table, against the local get (target: equal);
  and, for scale, a get on a cache of the local topology (no routing at all);
- puts (reported, no target): ``cache.put`` of B's keys against redis-py ``SET``,
  and of A's own keys (made in place, in A's table; with ``--backups 1`` a request
  to A's bridge that returns once B holds the backup copy, unless ``--async-backups``);
- remote gets/s through one bridge: 4 worker processes of A read B's keys as fast
  as they can for a few seconds; their total (B's bridge answers them on its
  native thread), against 4 processes reading the same keys from the redis-server
  with redis-py (target: >= 1.0x).

Repeats are interleaved and the medians are compared. The JSON (``--json``,
default ./bench-results-partitioned.json) holds every figure and the raw repeats.
"""

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import vela  # noqa: E402
from cluster import Cluster, eventually  # noqa: E402
from servers import RedisServer  # noqa: E402

FORK = multiprocessing.get_context("fork")
VALUE = b"v" * 100
KEYS = 2000


def _open(namespace, name, **opts):
    os.environ["VELA_NAMESPACE"] = namespace
    return vela.Cache(name, topology="partitioned", sweep_interval=None, **opts)


def _per_call_ns(fn, keys, rounds):
    start = time.perf_counter_ns()
    n = 0
    for _ in range(rounds):
        for k in keys:
            fn(k)
        n += len(keys)
    return (time.perf_counter_ns() - start) / n


def _p50_ns(fn, keys):
    """The median time of one call, each timed alone."""
    clock = time.perf_counter_ns
    times = []
    for k in keys:
        start = clock()
        fn(k)
        times.append(clock() - start)
    return statistics.median(times)


def _reader(conn, open_get, keys, seconds):
    get, close = open_get()
    conn.recv()  # start together
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for k in keys[:200]:
            get(k)
        n += 200
    close()
    conn.send(n)


def _vela_get(namespace, name):
    def open_get():
        cache = _open(namespace, name)
        return cache.get, cache.close
    return open_get


def _redis_get(port):
    def open_get():
        import redis
        client = redis.Redis(host="127.0.0.1", port=port)
        return client.get, client.close
    return open_get


def throughput(open_get, keys, procs, seconds):
    """Gets/s of ``procs`` forked processes, each reading ``keys`` with ``open_get()``'s get."""
    pipes, workers = [], []
    for _ in range(procs):
        parent, child = FORK.Pipe()
        p = FORK.Process(target=_reader, args=(child, open_get, keys, seconds), daemon=True)
        p.start()
        pipes.append(parent)
        workers.append(p)
    time.sleep(0.5)
    start = time.monotonic()
    for c in pipes:
        c.send("go")
    total = sum(c.recv() for c in pipes)
    took = time.monotonic() - start
    for p in workers:
        p.join(5)
    return total / took


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (noisier)")
    p.add_argument("--json", default="bench-results-partitioned.json", help="where the results go")
    p.add_argument("--backups", type=int, choices=(0, 1), default=0, help="the bridges' --backups")
    p.add_argument("--async-backups", action="store_true", help="the bridges' --async-backups")
    args = p.parse_args(argv)
    bridge_extra = ["--backups", str(args.backups)] + (["--async-backups"] if args.async_backups else [])
    in_place = not args.backups or args.async_backups
    rounds, repeats, tp_seconds = (2, 3, 2.0) if args.quick else (5, 7, 4.0)

    import redis

    workdir = tempfile.mkdtemp(prefix="vela-bench-part-")
    cluster = Cluster(workdir, n=2, capacity="256MiB", topology="partitioned", bridge_extra=bridge_extra)
    server = RedisServer()
    results = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "value_bytes": len(VALUE), "bridge_args": bridge_extra}
    try:
        server.start()
        a, b = cluster
        cluster.wait_members()
        eventually(lambda: all((h.status() or {}).get("caches", {}).get(cluster.name, {}).get("ready")
                               for h in cluster), 15, what="partition tables")
        cache = _open(a.namespace, cluster.name)
        near = _open(a.namespace, cluster.name, near_cache=True, near_cache_l1_ttl=600)
        view = cache._store._view()
        from vela import _native
        from vela.ring import partition_of

        names = [f"key:{i}" for i in range(KEYS * 3)]
        owner = {k: view.owners[partition_of(_native.encode_key(k))] for k in names}
        remote = [k for k in names if owner[k] == b.node_id][:KEYS // 2]
        local = [k for k in names if owner[k] == a.node_id][:KEYS // 2]
        cache.put_many([(k, VALUE) for k in remote + local])
        client = redis.Redis(host="127.0.0.1", port=server.port)
        client.mset({k: VALUE for k in remote})
        for k in remote:  # L1 copies on A
            near.get(k)
        assert all(cache.get(k) == VALUE for k in remote[:50]) and client.get(remote[0]) == VALUE

        plain = vela.Cache(cluster.name + "-plain", capacity="64MiB", topology="local")
        plain.put_many([(k, VALUE) for k in local])
        runs = {"remote_get": [], "redis_get": [], "local_get": [], "near_hit": [], "local_topology_get": [],
                "remote_put": [], "redis_set": [], "owned_put": [], "remote_get_p50": [], "redis_get_p50": []}
        print(f"{repeats} interleaved repeats of {rounds} x {len(remote)} gets each ...", flush=True)
        for _ in range(repeats):
            runs["remote_get"].append(_per_call_ns(cache.get, remote, max(1, rounds // 2)))
            runs["redis_get"].append(_per_call_ns(client.get, remote, max(1, rounds // 2)))
            runs["remote_get_p50"].append(_p50_ns(cache.get, remote))
            runs["redis_get_p50"].append(_p50_ns(client.get, remote))
            runs["local_get"].append(_per_call_ns(cache.get, local, rounds * 20))
            runs["near_hit"].append(_per_call_ns(near.get, remote, rounds * 20))
            runs["local_topology_get"].append(_per_call_ns(plain.get, local, rounds * 20))
        # Puts apart: a put drops the near cache's copies of its key (as it must).
        for _ in range(repeats):
            runs["remote_put"].append(_per_call_ns(lambda k: cache.put(k, VALUE), remote, 1))
            runs["redis_set"].append(_per_call_ns(lambda k: client.set(k, VALUE), remote, 1))
            runs["owned_put"].append(_per_call_ns(lambda k: cache.put(k, VALUE), local, 1))
        med = {k: statistics.median(v) for k, v in runs.items()}
        results["runs_ns"] = runs
        results["median_ns"] = med
        remote_ratio = med["remote_get"] / med["redis_get"]
        p50_ratio = med["remote_get_p50"] / med["redis_get_p50"]
        near_ratio = med["near_hit"] / med["local_get"]
        print(f"  remote get   {med['remote_get'] / 1000:8.1f} us   redis-py GET {med['redis_get'] / 1000:8.1f} us"
              f"   ratio {remote_ratio:.2f}x  -> {'meets' if remote_ratio <= 1.0 else 'MISSES'} the <= 1.0x target")
        print(f"  p50          {med['remote_get_p50'] / 1000:8.1f} us   redis-py GET {med['redis_get_p50'] / 1000:8.1f} us"
              f"   ratio {p50_ratio:.2f}x  -> {'meets' if p50_ratio <= 1.0 else 'MISSES'} the <= 1.0x target")
        print(f"  near hit     {med['near_hit']:8.0f} ns   local get    {med['local_get']:8.0f} ns"
              f"   ratio {near_ratio:.2f}x  -> {'meets' if near_ratio <= 1.2 else 'MISSES'} 'equal' (within 20%)")
        print(f"  (a get on a local-topology cache: {med['local_topology_get']:.0f} ns)")
        put_ratio = med["remote_put"] / med["redis_set"]
        print(f"  remote put   {med['remote_put'] / 1000:8.1f} us   redis-py SET {med['redis_set'] / 1000:8.1f} us"
              f"   ratio {put_ratio:.2f}x  (reported)")
        how = "in place" if in_place else "through A's bridge, once B holds the backup"
        print(f"  put of a key A owns {med['owned_put'] / 1000:.1f} us ({how})")
        print(f"remote gets/s through B's bridge, then from the redis-server, 4 readers on A for "
              f"{tp_seconds:g} s each ...", flush=True)
        results["remote_gets_per_s"] = tp = throughput(_vela_get(a.namespace, cluster.name), remote, 4, tp_seconds)
        results["redis_gets_per_s"] = tp_redis = throughput(_redis_get(server.port), remote, 4, tp_seconds)
        tp_ratio = tp / tp_redis
        print(f"  {tp:,.0f} remote gets/s through one bridge, {tp_redis:,.0f} from one redis-server: "
              f"ratio {tp_ratio:.2f}x  -> {'meets' if tp_ratio >= 1.0 else 'MISSES'} the >= 1.0x target", flush=True)
        results["ratios"] = {"remote_over_redis": remote_ratio, "remote_p50_over_redis_p50": p50_ratio,
                             "near_over_local": near_ratio,
                             "remote_put_over_redis_set": put_ratio, "bridge_over_redis_server": tp_ratio}
        results["targets"] = {"remote_over_redis": 1.0, "remote_p50_over_redis_p50": 1.0, "near_over_local": 1.0,
                              "bridge_over_redis_server": 1.0}
        cache.close()
        near.close()
        plain.destroy()
        client.close()
    finally:
        server.stop()
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(f"\nsummary: remote get {remote_ratio:.2f}x a redis-py GET, p50 {p50_ratio:.2f}x (target <= 1.0x); near hit "
          f"{near_ratio:.2f}x a local hit (target: equal); {tp:,.0f} remote gets/s through one bridge "
          f"({tp_ratio:.2f}x one redis-server's; target >= 1.0x)")
    print(f"results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
