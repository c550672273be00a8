"""The replicated topology between two simulated hosts on loopback, in one run.

    python tools/bench/replication.py              # about 30 s
    python tools/bench/replication.py --quick      # a smoke run, noisier
    python tools/bench/replication.py --json out.json

Two hosts A and B, each its own VELA_NAMESPACE (its own segment) and its own
``vela-bridge`` process (the harness of tests/cluster.py), heartbeat 0.2 s. Prints,
each measured in this run:

- replication latency, p50 / p99 / max: from the start of ``cache.put`` in a worker
  on A until a process on B, polling B's table in a tight loop, sees the key. Both
  stamp with ``time.perf_counter_ns`` (CLOCK_MONOTONIC, one clock for every process
  of the machine). One put at a time, each after B saw the previous one and a random
  0-3 ms pause, so a put meets the bridges at any point of their loops;
- replicated puts/s through one bridge with batching (target >= 50,000/s): a worker
  on A puts N distinct keys as fast as it can; the time from its first put until B's
  table holds all N (A's bridge tails the change log, batches, B's bridge applies);
  whether the change log ran over (a resync from a snapshot) is reported too;
- the worker's cost of a replicated put against a local put (target <= 2x): the
  same loop of puts (100-byte values over 10,000 keys) in one process on a cache
  opened ``topology="replicated"`` (A's bridge running and tailing its change log)
  and on one opened ``topology="local"``, interleaved repeats; the ratio replicated /
  local of the best runs (the medians are printed too). B's bridge is stopped
  meanwhile: on a real cluster it is on another machine, not on the two cores that
  the worker and A's bridge share here.

Values are 100 bytes. The JSON (``--json``, default ./bench-results-replication.json)
holds every figure and the raw repeats.
"""

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # the checkout, when not installed
sys.path.insert(0, os.path.join(ROOT, "tests"))

import vela  # noqa: E402
from cluster import Cluster, eventually  # noqa: E402

FORK = multiprocessing.get_context("fork")
VALUE = b"v" * 100


def _in_host(namespace, name):
    """A worker's handle on the host ``namespace`` (call in a fresh child)."""
    os.environ["VELA_NAMESPACE"] = namespace  # read when the segment is opened
    return vela.Cache(name, topology="replicated", sweep_interval=None)


# ---- latency --------------------------------------------------------------------------


def _latency_watcher(conn, namespace, name, n):
    cache = _in_host(namespace, name)
    contains = cache._table.contains
    clock = time.perf_counter_ns
    yield_ = os.sched_yield
    seen = []
    conn.send("ready")
    for i in range(n):
        key = f"lat{i}"
        deadline = clock() + 5_000_000_000
        while not contains(key):
            yield_()  # let the bridges have the other core
            if clock() > deadline:
                seen.append(None)
                break
        else:
            seen.append(clock())
        conn.send(i)
    conn.send(seen)
    cache.close()


def _latency_writer(conn, namespace, name, n, seed):
    cache = _in_host(namespace, name)
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    started = []
    conn.recv()  # go
    for i in range(n):
        time.sleep(rng.uniform(0, 0.003))
        started.append(clock())
        cache.put(f"lat{i}", VALUE)
        conn.send(i)
        conn.recv()  # B saw it
    conn.send(started)
    cache.close()


def bench_latency(a, b, name, n):
    w_parent, w_child = FORK.Pipe()
    r_parent, r_child = FORK.Pipe()
    watcher = FORK.Process(target=_latency_watcher, args=(r_child, b.namespace, name, n), daemon=True)
    writer = FORK.Process(target=_latency_writer, args=(w_child, a.namespace, name, n, 7), daemon=True)
    watcher.start()
    writer.start()
    try:
        assert r_parent.poll(30) and r_parent.recv() == "ready"
        w_parent.send("go")
        for i in range(n):
            if not w_parent.poll(30) or w_parent.recv() != i:
                raise RuntimeError("the writer stopped")
            if not r_parent.poll(30) or r_parent.recv() != i:
                raise RuntimeError("the watcher stopped")
            w_parent.send("next")
        if not (r_parent.poll(30) and w_parent.poll(30)):
            raise RuntimeError("no results")
        seen, started = r_parent.recv(), w_parent.recv()
    finally:
        for p in (watcher, writer):
            p.join(5)
            if p.is_alive():
                p.kill()
    lat = sorted((s - t) / 1000 for s, t in zip(seen, started) if s is not None)
    missing = sum(s is None for s in seen)
    return {"n": n, "missing": missing, "p50_us": _pct(lat, 50), "p99_us": _pct(lat, 99),
            "max_us": lat[-1] if lat else None, "mean_us": statistics.fmean(lat) if lat else None}


def _pct(values, p):
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# ---- throughput -------------------------------------------------------------------------


def _throughput_watcher(conn, namespace, name, n, base):
    cache = _in_host(namespace, name)
    size = cache._table.size
    clock = time.perf_counter_ns
    conn.send("ready")
    deadline = clock() + 120_000_000_000
    while size() < base + n and clock() < deadline:
        time.sleep(0.0005)
    conn.send((clock(), size()))
    cache.close()


def _throughput_writer(conn, namespace, name, n, prefix):
    cache = _in_host(namespace, name)
    put = cache.put
    keys = [f"{prefix}{i}" for i in range(n)]
    conn.recv()
    start = time.perf_counter_ns()
    for key in keys:
        put(key, VALUE)
    end = time.perf_counter_ns()
    conn.send((start, end))
    cache.close()


def bench_throughput(a, b, name, n, prefix):
    base = b.size()
    before = a.status()["caches"][name]
    peer_before = b.status()["caches"][name]
    w_parent, w_child = FORK.Pipe()
    r_parent, r_child = FORK.Pipe()
    watcher = FORK.Process(target=_throughput_watcher, args=(r_child, b.namespace, name, n, base), daemon=True)
    writer = FORK.Process(target=_throughput_writer, args=(w_child, a.namespace, name, n, prefix), daemon=True)
    watcher.start()
    writer.start()
    try:
        assert r_parent.poll(30) and r_parent.recv() == "ready"
        w_parent.send("go")
        if not w_parent.poll(120):
            raise RuntimeError("the writer did not finish")
        start, written = w_parent.recv()
        if not r_parent.poll(150):
            raise RuntimeError("the watcher did not finish")
        seen_at, seen = r_parent.recv()
    finally:
        for p in (watcher, writer):
            p.join(5)
            if p.is_alive():
                p.kill()
    after = a.status()["caches"][name]
    peer_after = b.status()["caches"][name]
    seconds = (seen_at - start) / 1e9
    return {"puts": n, "visible_on_b": seen - base, "seconds": seconds,
            "puts_per_s": (seen - base) / seconds if seconds > 0 else None,
            "writer_puts_per_s": n / ((written - start) / 1e9),
            "resyncs_requested_by_b": peer_after["resyncs"] - peer_before["resyncs"],
            "snapshots_served_by_a": after["snapshots_served"] - before["snapshots_served"],
            "sent_by_a": after["sent"] - before["sent"]}


# ---- the worker's cost --------------------------------------------------------------------


def _cost_worker(conn, namespace, name, local_name, n, repeats):
    os.environ["VELA_NAMESPACE"] = namespace
    replicated = vela.Cache(name, topology="replicated", sweep_interval=None)
    local = vela.Cache(local_name, capacity="256MiB", topology="local", sweep_interval=None)
    keys = [f"cost{i % 10_000}" for i in range(n)]
    clock = time.perf_counter_ns
    runs = {"local": [], "replicated": []}

    def timed(cache):
        put = cache.put
        start = clock()
        for key in keys:
            put(key, VALUE)
        return (clock() - start) / n

    timed(local), timed(replicated)  # warm up: every key exists in both
    for _ in range(repeats):
        runs["local"].append(timed(local))
        runs["replicated"].append(timed(replicated))
        time.sleep(0.2)  # the bridge catches up outside the timed loops
    replicated.close()
    local.close()
    vela.destroy(local_name)
    conn.send(runs)


def bench_cost(a, name, n, repeats):
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_cost_worker, args=(child, a.namespace, name, f"loc{uuid.uuid4().hex[:8]}", n, repeats),
                     daemon=True)
    p.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("the cost worker did not finish")
        runs = parent.recv()
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
    local, replicated = min(runs["local"]), min(runs["replicated"])
    med_local, med_replicated = statistics.median(runs["local"]), statistics.median(runs["replicated"])
    return {"local_ns": local, "replicated_ns": replicated, "ratio": replicated / local, "puts_per_run": n,
            "median_local_ns": med_local, "median_replicated_ns": med_replicated,
            "median_ratio": med_replicated / med_local, "runs_ns": runs}


# ---- main ------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (noisier)")
    p.add_argument("--latency-samples", type=int, default=None, help="puts timed one by one (default 2000)")
    p.add_argument("--puts", type=int, default=None, help="puts of the throughput figure (default 200000)")
    p.add_argument("--json", default="bench-results-replication.json", help="where the results go")
    args = p.parse_args(argv)
    samples = args.latency_samples or (300 if args.quick else 2000)
    puts = args.puts or (50_000 if args.quick else 200_000)
    cost_n, cost_repeats = (20_000, 3) if args.quick else (100_000, 7)

    workdir = tempfile.mkdtemp(prefix="vela-bench-repl-")
    # 512 MiB: a 32 MiB change log, room for every put of the throughput run
    cluster = Cluster(workdir, n=2, capacity="512MiB")
    results = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "value_bytes": len(VALUE), "heartbeat_s": 0.2}
    try:
        a, b = cluster
        cluster.wait_members()
        a.put("warm", 1)
        eventually(lambda: b.has("warm"), 10, what="first replication")

        print(f"replication latency, {samples} puts one at a time, A -> B ...", flush=True)
        results["latency"] = lat = bench_latency(a, b, cluster.name, samples)
        print(f"  p50 {lat['p50_us']:.0f} us   p99 {lat['p99_us']:.0f} us   max {lat['max_us']:.0f} us"
              f"   (missing {lat['missing']})", flush=True)

        print(f"replicated puts/s, {puts} puts by one worker on A until all visible on B ...", flush=True)
        results["throughput"] = tp = bench_throughput(a, b, cluster.name, puts, "tp")
        verdict = "meets" if tp["puts_per_s"] and tp["puts_per_s"] >= 50_000 else "MISSES"
        print(f"  {tp['puts_per_s']:,.0f} puts/s replicated ({tp['seconds']:.2f} s; the worker alone "
              f"{tp['writer_puts_per_s']:,.0f} puts/s; snapshots {tp['snapshots_served_by_a']})  "
              f"-> {verdict} the 50,000/s target", flush=True)

        print(f"worker's cost of a put, {cost_n} puts x {cost_repeats} interleaved repeats ...", flush=True)
        # B's bridge is stopped meanwhile: on a real cluster it runs on another machine,
        # not on the two cores this worker and A's bridge (which tails the log) share.
        b.pause()
        try:
            results["put_cost"] = cost = bench_cost(a, cluster.name, cost_n, cost_repeats)
        finally:
            b.resume()
        verdict = "meets" if cost["ratio"] <= 2.0 else "MISSES"
        print(f"  best: local {cost['local_ns']:.0f} ns   replicated {cost['replicated_ns']:.0f} ns   "
              f"ratio {cost['ratio']:.2f}x  -> {verdict} the 2x target", flush=True)
        print(f"  median: local {cost['median_local_ns']:.0f} ns   replicated {cost['median_replicated_ns']:.0f} ns"
              f"   ratio {cost['median_ratio']:.2f}x", flush=True)

        results["targets"] = {"puts_per_s": 50_000, "put_cost_ratio": 2.0}
        results["bridge_status"] = {"A": a.status(), "B": b.status()}
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(f"\nsummary: latency p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us; "
          f"{tp['puts_per_s']:,.0f} replicated puts/s (target >= 50,000); "
          f"replicated/local put {cost['ratio']:.2f}x (target <= 2x)")
    print(f"results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
