"""Vela against its peers, side by side, on one host.

    python tools/bench/run.py                 # everything, about 2-3 minutes
    python tools/bench/run.py --quick         # a smoke run, under 30 s
    python tools/bench/run.py --only get_hit_100b,put_100b --procs 1 --json out.json

Prints ops/s and ns/op per store and workload, Vela / peer ratios, scaling with
processes (Vela's against the dict floor's in the last column), the memory
figure, the telemetry-idle cost and the targets (met / NOT met; a missed target
never fails the run), and writes every figure to JSON. See README.md here.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import vela
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import vela

import harness  # noqa: E402
import memory  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import telemetry_idle  # noqa: E402
from servers import MemcachedServer, RedisServer  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description="Vela against diskcache, Redis, memcached, lmdb and a dict.")
    p.add_argument("--quick", action="store_true", help="short runs, one repeat, smaller memory figure")
    p.add_argument("--only", metavar="WORKLOAD[,...]", help="run only these workloads: "
                   + ", ".join(w.name for w in WORKLOADS))
    p.add_argument("--stores", metavar="STORE[,...]", help="run only these stores (vela is always run): "
                   + ", ".join(peers.ORDER))
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated (default 1,2)")
    p.add_argument("--seconds", type=float, help="target length of one timed loop (default 0.12, quick 0.03)")
    p.add_argument("--repeats", type=int, help="timed runs per figure, median reported (default 5, quick 1)")
    p.add_argument("--entries", type=int, help="entries of the memory figure (default 1,000,000, quick 200,000)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory figure")
    p.add_argument("--no-telemetry", action="store_true", help="skip the telemetry-idle figure")
    p.add_argument("--no-remote", action="store_true",
                   help="skip the partitioned remote-get figures (tools/bench/partitioned.py)")
    p.add_argument("--json", metavar="PATH", default="bench-results.json",
                   help="where to write the results (default ./bench-results.json)")
    args = p.parse_args()
    args.seconds = args.seconds or (0.03 if args.quick else 0.12)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.entries = args.entries or (200_000 if args.quick else 1_000_000)
    args.procs = [int(n) for n in args.procs.split(",")]
    names = {w.name for w in WORKLOADS}
    args.only = args.only.split(",") if args.only else [w.name for w in WORKLOADS]
    unknown = set(args.only) - names
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.stores = set(args.stores.split(",")) | {"vela"} if args.stores else set(peers.ORDER)
    if args.stores - set(peers.ORDER):
        p.error(f"unknown store(s): {', '.join(sorted(args.stores - set(peers.ORDER)))}")
    return args


def remote_gets(quick):
    """tools/bench/partitioned.py's figures (remote gets between two simulated hosts
    against a redis-server, one bridge's gets/s against one redis-server's), run in a
    child process that prints its own table."""
    print("\n== partitioned: remote gets (tools/bench/partitioned.py) ==", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "partitioned.json")
        cmd = [sys.executable, os.path.join(HERE, "partitioned.py"), "--json", out] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def make_stores(wanted, servers):
    """The adapters that can run here, starting the servers they need; notes for the others."""
    stores, skipped = [], {}

    def want(name, cls):
        if name not in wanted:
            return False
        why = cls.unavailable()
        if why:
            skipped[name] = why
        return not why

    if want("vela", peers.VelaStore):
        stores.append(peers.VelaStore())
    if want("vela-objects", peers.VelaObjectsStore):
        stores.append(peers.VelaObjectsStore())
    if want("floor", peers.FloorStore):
        stores.append(peers.FloorStore())
    if want("diskcache", peers.DiskCacheStore):
        stores.append(peers.DiskCacheStore())
    redis_wanted = [t for t in ("unix", "tcp") if want(f"redis-{t}", peers.RedisStore)]
    if redis_wanted:
        server = RedisServer().start()
        servers.append(server)
        stores += [peers.RedisStore(server, t) for t in redis_wanted]
    if want("memcached", peers.MemcachedStore):
        server = MemcachedServer().start()
        servers.append(server)
        stores.append(peers.MemcachedStore(server))
    if want("lmdb", peers.LmdbStore):
        stores.append(peers.LmdbStore())
    return stores, skipped


def run_workloads(args, stores):
    """results[workload][store][nprocs] = figures (see harness.measure)."""
    results = {}
    for w in WORKLOADS:
        if w.name not in args.only:
            continue
        print(f"  {w.name:<13}", end="", flush=True)
        results[w.name] = {}
        for store in stores:
            store.setup(w.name)
            try:
                store.connect()
                store.populate(w.items())
                store.disconnect()
                results[w.name][store.name] = harness.measure(store, w, args.procs, args.seconds, args.repeats)
                print(f" {store.name}", end="", flush=True)
            except Exception as exc:  # one broken peer must not lose the others' figures
                results[w.name][store.name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f" {store.name}(ERROR)", end="", flush=True)
            finally:
                store.disconnect()
                store.teardown()
        print()
    return results


def meta(args, skipped):
    import importlib.metadata as md
    versions = {}
    for dist in ("diskcache", "redis", "hiredis", "pymemcache", "lmdb"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vela": vela.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": harness.cpu_count(),
        "packages": versions,
        "servers": {name: RedisServer.version() if name == "redis" else MemcachedServer.version()
                    for name in ("redis", "memcached")},
        "options": {"quick": args.quick, "procs": args.procs, "seconds": args.seconds,
                    "repeats": args.repeats, "workloads": args.only, "entries": args.entries},
        "skipped": skipped,
    }


def main():
    args = parse_args()
    # SIGTERM as an exception, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    servers = []
    try:
        stores, skipped = make_stores(args.stores, servers)
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        print(f"Vela {vela.__version__}, Python {platform.python_version()}, {harness.cpu_count()} CPUs; "
              f"processes {args.procs}, {args.repeats} repeat(s) of ~{args.seconds}s each")
        about = meta(args, skipped)
        print("peers: " + ", ".join(f"{name} {version}" for name, version in about["packages"].items())
              + "; " + ", ".join(v.split(" sha=")[0] for v in about["servers"].values() if v))
        load_start = os.getloadavg()[0]
        print(f"load average at start: {load_start:.2f}")
        if load_start > 0.5:  # other work on the host shares the cores with the workers
            print("  WARNING: the host is busy; figures (above all 2-process ones) will be low and noisy")
        base = harness.baselines()
        print(f"for reading the figures: the timed loop with a no-op Python call costs "
              f"{base['loop_noop_call_ns']:.0f} ns/op (in every figure); pickle.loads of a 100 B bytes "
              f"value {base['loop_pickle_loads_100b_ns'] - base['loop_noop_call_ns']:.0f} ns "
              f"(in the floor's, redis', memcached's and lmdb's gets)")
        print("running:")
        results = run_workloads(args, stores)
    finally:
        for server in servers:
            server.stop()
    mem = None if args.no_memory else memory.measure(args.entries)
    tele = None if args.no_telemetry else (telemetry_idle.measure(100_000, 3) if args.quick
                                           else telemetry_idle.measure())
    remote = None if args.no_remote else remote_gets(args.quick)
    order = [s.name for s in stores]
    report.tables(results, order, args.procs)
    if mem:
        print("\n== memory ==")
        memory.report(mem)
    if tele:
        print("\n== telemetry idle ==")
        telemetry_idle.report(tele)
    targets = report.targets(results, mem, tele, remote)
    load_end = os.getloadavg()[0]
    print(f"\ntotal {time.monotonic() - began:.0f} s; load average at start {load_start:.2f}, at end {load_end:.2f}")
    doc = {"meta": dict(about, load_average=[load_start, load_end], baselines=base), "results": results,
           "ratios": report.ratios(results, order, args.procs),
           "scaling_vs_floor": {w: report.scaling_vs_floor(results, w, min(args.procs), max(args.procs))
                                for w in results},
           "memory": mem, "telemetry_idle": tele, "partitioned": remote, "targets": targets}
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
