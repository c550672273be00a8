"""The Redis near cache against plain redis-py, in one run; and its staleness bound.

    python tools/bench/near_cache.py               # about 20 s
    python tools/bench/near_cache.py --quick       # a smoke run, noisier

Prints, each measured in this run against a redis-server it starts itself (unix
socket in a temp dir, no persistence; stopped at the end):

- near-cache hit (``cache.get`` answered by the host table) vs a redis-py GET over
  the unix socket: the ratio GET / hit (target >= 50x);
- the miss path (``cache.get_or_fetch`` of a key that is nowhere: host lease, Redis
  lease, fetch, store, invalidation) vs a plain redis-py GET + SET: the ratio
  miss / (GET + SET) (target <= 1.3x); also an L1 miss that Redis answers vs a GET;
- the invalidation latency between two simulated hosts (two host tables, one
  Redis): from the start of a put on host A until host B's table stops serving the
  old value, p50 / p99 over the writes.

Both hosts' listeners run in forked processes of their own, as in production where
one worker per host holds the role, so the measuring process shares its interpreter
lock with nobody. Values are 100 bytes.
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))  # the checkout, when not installed

import redis  # noqa: E402

import vela  # noqa: E402
from servers import RedisServer  # noqa: E402
from vela.stores.redis import destroy as redis_destroy  # noqa: E402

FORK = multiprocessing.get_context("fork")
VALUE = b"v" * 100
FAST = {"heartbeat": 0.1, "socket_timeout": 0.5, "connect_timeout": 0.5}


def open_host(url, name, host, **kw):
    return vela.Cache(name, backend="redis", near_cache=True, capacity="64MiB",
                      backend_opts=dict(FAST, url=url, l1_segment=f"{name}.{host}"), **kw)


def _listener_main(conn, url, name, host):
    c = open_host(url, name, host)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (c.info()["listener"] and c._store.near.healthy()):
            time.sleep(0.01)
        conn.send(bool(c.info()["listener"]))
        conn.poll(600)
    finally:
        c.close()


class ListenerProcess:
    """A process that holds a host's listener role until stop()."""

    def __init__(self, url, name, host):
        self.conn, child = FORK.Pipe()
        self.proc = FORK.Process(target=_listener_main, args=(child, url, name, host), daemon=True)
        self.proc.start()
        child.close()
        if not (self.conn.poll(15) and self.conn.recv()):
            self.stop()
            raise RuntimeError(f"no listener for host {host}")

    def stop(self):
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def per_op(workloads, repeats):
    """{label: best ns per call} of workloads {label: (fn(rep, n), n)}, the repeats
    interleaved so that every workload sees the same conditions of the machine."""
    best = {label: float("inf") for label in workloads}
    for rep in range(repeats):
        for label, (fn, n) in workloads.items():
            start = time.perf_counter_ns()
            fn(rep, n)
            best[label] = min(best[label], (time.perf_counter_ns() - start) / n)
    return best


def bench_speed(server, name, n_hit, n_miss, repeats):
    url = f"unix://{server.unix_socket}"
    r = redis.Redis(unix_socket_path=server.unix_socket)
    listener = ListenerProcess(url, name, "A")
    c = open_host(url, name, "A")
    try:
        r.set("plain:hot", VALUE)
        c.put("hot", VALUE)
        time.sleep(0.05)
        while c._table.get("hot", None) is None:   # the copy is in L1
            c.get("hot")
            time.sleep(0.01)
        get = r.get
        cget = c.get

        def redis_get(_, n):
            for _ in range(n):
                get("plain:hot")

        def near_hit(_, n):
            for _ in range(n):
                cget("hot")

        def redis_get_set(rep, n):
            for i in range(n):
                k = f"plain:miss:{rep}:{i}"
                get(k)
                r.set(k, VALUE)

        def fetch(_key):
            return VALUE

        def near_miss(rep, n):
            for i in range(n):
                c.get_or_fetch(("miss", rep, i), fetch)

        c.put_many({("cold", rep, i): VALUE for rep in range(repeats) for i in range(n_miss)})
        time.sleep(0.05)

        def near_cold(rep, n):  # L1 miss, Redis hit, copy kept
            for i in range(n):
                cget(("cold", rep, i))

        def redis_cold(rep, n):
            for i in range(n):
                get(f"plain:miss:{rep}:{i}")

        out = per_op({
            "redis GET (unix)": (redis_get, n_hit // 50),
            "near hit": (near_hit, n_hit),
            "redis GET+SET (unix)": (redis_get_set, n_miss),
            "near miss (get_or_fetch)": (near_miss, n_miss),
            "redis GET of a present key": (redis_cold, n_miss),
            "near L1 miss, Redis hit": (near_cold, n_miss),
        }, repeats)
        return out
    finally:
        c.close()
        listener.stop()
        r.close()
        redis_destroy(name, {"url": url, "l1_segment": f"{name}.A"})


def bench_staleness(server, name, writes):
    url = f"unix://{server.unix_socket}"
    listeners = [ListenerProcess(url, name, "A"), ListenerProcess(url, name, "B")]
    a, b = open_host(url, name, "A"), open_host(url, name, "B")
    missing = object()
    try:
        latencies = []
        a.put("k", 0)
        for i in range(1, writes + 1):
            deadline = time.monotonic() + 2
            while not (b.get("k") == i - 1 and b._table.get("k", missing) == i - 1):
                if time.monotonic() > deadline:
                    raise RuntimeError("host B never kept a copy")
                time.sleep(0.0005)
            start = time.perf_counter()
            a.put("k", i)
            while b._table.get("k", missing) == i - 1:
                if time.perf_counter() - start > 2:
                    raise RuntimeError("host B served the old value for 2 s")
                time.sleep(0.00002)
            latencies.append(time.perf_counter() - start)
        return latencies
    finally:
        a.close()
        b.close()
        for lp in listeners:
            lp.stop()
        for h in ("A", "B"):
            redis_destroy(name, {"url": url, "l1_segment": f"{name}.{h}"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer iterations (noisier)")
    p.add_argument("--writes", type=int, default=200, help="writes for the staleness figures")
    args = p.parse_args(argv)
    n_hit, n_miss, repeats = (50_000, 300, 2) if args.quick else (200_000, 1000, 5)
    if not RedisServer.available():
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer().start()
    name = f"bench{uuid.uuid4().hex[:8]}"
    try:
        speed = bench_speed(server, name, n_hit, n_miss, repeats)
        lat = sorted(bench_staleness(server, name + "s", args.writes))
    finally:
        server.stop()
    print(f"redis-server {RedisServer.version()}; redis-py {redis.__version__}"
          f"{' + hiredis' if _hiredis() else ''}; Python {sys.version.split()[0]}; "
          f"{os.cpu_count()} CPUs; values of {len(VALUE)} bytes")
    for label, ns in speed.items():
        print(f"  {label:<28} {ns / 1000:10.2f} us/op")
    hit_ratio = speed["redis GET (unix)"] / speed["near hit"]
    miss_ratio = speed["near miss (get_or_fetch)"] / speed["redis GET+SET (unix)"]
    cold_ratio = speed["near L1 miss, Redis hit"] / speed["redis GET of a present key"]
    print(f"near hit vs redis GET:            {hit_ratio:8.1f}x faster   (target >= 50x)")
    print(f"miss path vs redis GET + SET:     {miss_ratio:8.2f}x the time (target <= 1.3x)")
    print(f"L1 miss + Redis hit vs redis GET: {cold_ratio:8.2f}x the time")
    p50 = statistics.median(lat)
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    print(f"invalidation latency host A -> host B over {len(lat)} writes: "
          f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, max {lat[-1] * 1e3:.2f} ms")


def _hiredis():
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
