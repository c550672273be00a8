"""End to end: a Django view reading 20 cached fragments, under gunicorn, per cache backend.

    python tools/bench/django_view.py                        # about 2.5 minutes
    python tools/bench/django_view.py --seconds 3 --rounds 1 --warmup 1   # a smoke run
    python tools/bench/django_view.py --backends vela,redis --connections 8

For each Django cache backend (Vela on shared memory; Django's RedisCache against
a redis-server on a unix socket; PyMemcacheCache against memcached on loopback;
LocMemCache; FileBasedCache; diskcache's DjangoCache) a gunicorn (2 sync workers)
serves the page of django_site.py, and a load generator with a fixed number of
connections (wrk, or a Python one when wrk is missing) drives it. Prints req/s and
p50/p99 latency side by side and Vela's req/s over the best networked backend's
(target >= 1.3x).

Every gunicorn and server is started up front and warmed up (which also fills the
caches and checks the page); then the measured time of each backend is split into
rounds, and each round runs every backend once, in a rotating order, so a change in
the host's load touches every backend alike. Everything started here is stopped at
the end, also on an error, Ctrl-C or SIGTERM; everything listens on loopback only.
"""

import argparse
import datetime
import http.client
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
try:
    import vela
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(1, ROOT)
    import vela

import django_site  # noqa: E402
import http_load  # noqa: E402
from servers import MemcachedServer, RedisServer, Server  # noqa: E402

HOST = "127.0.0.1"
WORKERS = 2
VELA_CAPACITY = "64MiB"
ORDER = ["vela", "redis", "memcached", "locmem", "filebased", "diskcache"]
NETWORKED = ("redis", "memcached")
LABELS = {
    "vela": "Vela (shm)",
    "redis": "RedisCache (unix socket)",
    "memcached": "PyMemcacheCache (TCP)",
    "locmem": "LocMemCache",
    "filebased": "FileBasedCache",
    "diskcache": "diskcache DjangoCache",
}
TARGET = 1.3


# what a backend that fails (a server gone, a wrong page, the load generator) raises
FAILURES = (RuntimeError, OSError, http.client.HTTPException, subprocess.SubprocessError)


class Unavailable(Exception):
    """A backend that cannot run here; the message says what to install."""


class GunicornServer(Server):
    """gunicorn serving django_site with one CACHES["default"] entry, 2 sync workers."""

    executable = "gunicorn"
    start_timeout = 60  # two workers importing Django on a busy host

    def __init__(self, cache_conf):
        super().__init__()
        self.cache_conf = cache_conf

    @classmethod
    def available(cls):
        return all(importlib.util.find_spec(m) is not None for m in ("gunicorn", "django"))

    @classmethod
    def version(cls):
        import gunicorn
        return f"gunicorn {gunicorn.__version__}"

    def environment(self):
        path = [HERE, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(path),
                    **{django_site.CACHE_ENV: json.dumps(self.cache_conf)})

    def command(self):
        return [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS), "--worker-class", "sync",
                "--bind", f"{HOST}:{self.port}", "--chdir", HERE, "--worker-tmp-dir", "/dev/shm",
                "--timeout", "30", "--graceful-timeout", "3", "--log-level", "warning",
                "django_site:make_application()"]

    def ping(self):
        return fetch_page(self.port)[0] == 200


def fetch_page(port):
    """(status, fragment misses, body) of one request of the page."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", django_site.PATH)
        response = conn.getresponse()
        return response.status, response.getheader(django_site.MISSES_HEADER), response.read()
    finally:
        conn.close()


def check_page(port, expected, requests=10):
    """Several requests (so both workers answer): each a 200, the right page, no miss."""
    for _ in range(requests):
        status, misses, body = fetch_page(port)
        if status != 200:
            raise RuntimeError(f"the page answered {status}")
        if misses != "0":
            raise RuntimeError(f"{misses} of the 20 fragment reads missed after the warm-up")
        if body != expected:
            raise RuntimeError("the page differs from the fragments it was built from")


class Resources:
    """What the backends need besides gunicorn; all released by close()."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vela-bench-django-")
        self.servers = []
        self.vela_caches = []

    def start(self, server):
        self.servers.append(server)
        return server.start()

    def close(self):
        try:
            for server in reversed(self.servers):  # each gunicorn before the server it uses
                server.stop()
            for cache in self.vela_caches:
                cache.destroy()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _require(module, install):
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"pip install {install}")


def cache_conf(name, res):
    """The CACHES["default"] entry of backend `name`, starting what it needs."""
    if name == "vela":
        location = f"bench-django-{os.getpid()}-{secrets.token_hex(3)}"
        # Created here with the options the workers use, destroyed at the end.
        res.vela_caches.append(vela.Cache(location, capacity=VELA_CAPACITY))
        return {"BACKEND": "vela.contrib.django.VelaCache", "LOCATION": location,
                "OPTIONS": {"capacity": VELA_CAPACITY}}
    if name == "redis":
        _require("redis", "redis hiredis")
        if not RedisServer.available():
            raise Unavailable("apt-get install -y redis-server")
        server = res.start(RedisServer())
        return {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": f"unix://{server.unix_socket}"}
    if name == "memcached":
        _require("pymemcache", "pymemcache")
        if not MemcachedServer.available():
            raise Unavailable("apt-get install -y memcached")
        server = res.start(MemcachedServer())
        return {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                "LOCATION": f"{HOST}:{server.port}", "OPTIONS": {"no_delay": True}}
    if name == "locmem":
        return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "bench"}
    if name == "filebased":
        return {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                "LOCATION": os.path.join(res.dir, "filebased")}
    if name == "diskcache":
        _require("diskcache", "diskcache")
        return {"BACKEND": "diskcache.DjangoCache", "LOCATION": os.path.join(res.dir, "diskcache")}
    raise ValueError(name)


def parse_args():
    p = argparse.ArgumentParser(description="A Django view reading 20 cached fragments under gunicorn, "
                                            "per cache backend: req/s and latency side by side.")
    p.add_argument("--seconds", type=float, default=15,
                   help="measured seconds per backend, split into the rounds, whole seconds each (default 15)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds the measured time is split into, each running every backend (default 3)")
    p.add_argument("--warmup", type=float, default=2,
                   help="warm-up seconds per backend, at least 1: it fills every worker's cache (default 2)")
    p.add_argument("--connections", type=int, default=4, help="connections kept busy (default 4)")
    p.add_argument("--backends", metavar="NAME[,...]", default=",".join(ORDER),
                   help="backends to run (default all): " + ", ".join(ORDER))
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator (default: wrk when installed, else the Python one)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = p.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(ORDER)
    if unknown:
        p.error(f"unknown backend(s): {', '.join(sorted(unknown))}; choose among {', '.join(ORDER)}")
    if args.rounds < 1 or args.connections < 1 or args.warmup < 1:
        p.error("--rounds, --connections and --warmup must be at least 1")
    if args.seconds / args.rounds < 1:
        p.error("each round must last at least 1 s: lower --rounds or raise --seconds")
    # whole seconds, as wrk takes them; the same for the Python load generator
    args.round_seconds = round(args.seconds / args.rounds)
    args.warmup = round(args.warmup)
    return args


def start_backends(names, res):
    """{name: gunicorn} of the backends that run here, and {name: why not} of the others."""
    running, skipped = {}, {}
    for name in names:
        try:
            conf = cache_conf(name, res)
            running[name] = res.start(GunicornServer(conf))
        except Unavailable as exc:
            skipped[name] = str(exc)
        except RuntimeError as exc:  # the last line of the server's log says why
            skipped[name] = f"did not start: {str(exc).strip().splitlines()[-1]}"
    return running, skipped


def warm_up(running, load, args, expected, results):
    """Load each backend for --warmup seconds and check its page; {name: []} of those that pass."""
    slices = {}
    print("warm-up:", end="", flush=True)
    for name, server in running.items():
        try:
            load.run(HOST, server.port, django_site.PATH, args.connections, args.warmup)
            check_page(server.port, expected)
            slices[name] = []
            print(f" {name}", end="", flush=True)
        except FAILURES as exc:
            results[name] = {"error": str(exc)}
            print(f" {name}(ERROR)", end="", flush=True)
    print()
    return slices


def measure(running, slices, load, args, results):
    """The measured rounds: each runs every backend once, the order rotating by one each round."""
    for r in range(args.rounds):
        names = list(slices)
        names = names[r % len(names):] + names[:r % len(names)] if names else names
        print(f"round {r + 1}/{args.rounds}:", end="", flush=True)
        for name in names:
            try:
                slices[name].append(load.run(HOST, running[name].port, django_site.PATH, args.connections,
                                             args.round_seconds))
                print(f" {name}", end="", flush=True)
            except FAILURES as exc:
                results[name] = {"error": str(exc)}
                del slices[name]
                print(f" {name}(ERROR)", end="", flush=True)
        print()


def summarize(slices):
    """One backend's figures over its measured slices."""
    requests = sum(s["requests"] for s in slices)
    seconds = sum(s["seconds"] for s in slices)
    rates = [s["requests"] / s["seconds"] for s in slices]
    return {"req_per_s": requests / seconds, "slice_req_per_s": rates,
            "p50_ms": statistics.median(s["p50_us"] for s in slices) / 1000,
            "p99_ms": statistics.median(s["p99_us"] for s in slices) / 1000,
            "requests": requests, "errors": sum(s["errors"] for s in slices), "slices": slices}


def print_table(results, names):
    vela_rate = results.get("vela", {}).get("req_per_s")
    print(f"\n{'backend':<26} {'req/s':>8} {'rounds (min-max)':>17} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7} {'Vela/this':>10}")
    for name in names:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"{LABELS[name]:<26} ERROR: {r['error']}")
            continue
        spread = f"{min(r['slice_req_per_s']):.0f}-{max(r['slice_req_per_s']):.0f}"
        ratio = f"{vela_rate / r['req_per_s']:.2f}x" if vela_rate else "-"
        print(f"{LABELS[name]:<26} {r['req_per_s']:>8.0f} {spread:>17} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['errors']:>7} {ratio:>10}")


def target(results):
    """Vela's req/s over the best networked backend's, or None when one side is missing."""
    networked = [(results[n]["req_per_s"], n) for n in NETWORKED if "req_per_s" in results.get(n, {})]
    if "req_per_s" not in results.get("vela", {}) or not networked:
        return None
    best_rate, best = max(networked)
    return {"ratio": results["vela"]["req_per_s"] / best_rate, "best_networked": best, "target": TARGET}


def main():
    args = parse_args()
    if not GunicornServer.available():
        sys.exit("django_view.py needs django and gunicorn: pip install -e '.[bench]'")
    # SIGTERM as an exception, so the finally below stops everything; Ctrl-C too, even
    # when started from a shell that made this process ignore SIGINT.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load = http_load.generator(None if args.loadgen == "auto" else args.loadgen)
    began = time.monotonic()
    load_start = os.getloadavg()
    print("command: python tools/bench/django_view.py " + " ".join(sys.argv[1:]))
    print(f"Vela {vela.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"gunicorn {WORKERS} sync workers per backend; load generator: {load.name}"
          f"{' (' + load.version() + ')' if load.version() else ''}, {args.connections} connections; "
          f"{args.warmup} s warm-up, then {args.rounds} round(s) of {args.round_seconds} s per backend")
    print(f"load average at start: {load_start[0]:.2f}")
    if load_start[0] >= 1:
        print("  WARNING: the host is busy; the server, the caches and the load generator share its cores "
              "with other work")
    expected = django_site.expected_page().encode()
    res = Resources()
    results, skipped = {}, {}
    try:
        running, skipped = start_backends(args.backends, res)
        for name, why in skipped.items():
            print(f"skipped {LABELS[name]}: {why}")
        slices = warm_up(running, load, args, expected, results)
        measure(running, slices, load, args, results)
        for name in slices:
            try:
                check_page(running[name].port, expected)  # still right after the load
                results[name] = summarize(slices[name])
            except FAILURES as exc:
                results[name] = {"error": f"after the measurement: {exc}"}
    finally:
        res.close()
    print_table(results, ORDER)
    ratio = target(results)
    if ratio:
        verdict = "met" if ratio["ratio"] >= TARGET else "NOT met"
        print(f"\nVela / best networked backend ({LABELS[ratio['best_networked']]}): {ratio['ratio']:.2f}x req/s "
              f"(target >= {TARGET}x: {verdict})")
    else:
        print("\nVela / best networked backend: not measured (it needs vela and redis or memcached)")
    load_end = os.getloadavg()
    print(f"total {time.monotonic() - began:.0f} s; load average at start {load_start[0]:.2f}, "
          f"at end {load_end[0]:.2f}")
    if args.json:
        doc = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "vela": vela.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_generator": load.name, "options": {k: v for k, v in vars(args).items()},
                        "load_average": [load_start[0], load_end[0]], "skipped": skipped},
               "results": results, "target": ratio}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: every server this run started is stopped")
