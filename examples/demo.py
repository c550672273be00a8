"""Vela in a few seconds: four worker processes of one host share one cache.

    pip install -e . && python examples/demo.py

The parent creates the cache and forks 4 workers, as gunicorn or a multiprocessing
pool would. Each worker attaches to the cache by name. Worker 0 computes a few
values with a slow function; the others read them without recomputing, and time
their gets. Then: get_or_fetch with all workers asking at once, a TTL running out,
a tag invalidated by one worker and seen by all, and the stats of the whole host.
Then two simulated hosts (VELA_NAMESPACE), each with its own vela-bridge: a
replicated cache, then a partitioned one whose keys are spread over both hosts,
until one host leaves and hands its keys over. Every cache is destroyed at the
end. Only the public API is used.
"""
import multiprocessing as mp
import os
import sys
import time
import traceback

import vela

NAME = f"vela-demo-{os.getpid()}"  # unique: never touches a cache of yours
WORKERS = 4
TIMED_GETS = 100_000
PRODUCTS = {
    "product:1": {"name": "desk lamp", "price": 25},
    "product:2": {"name": "office chair", "price": 149},
    "product:3": {"name": "notebook", "price": 3},
}
SESSION_TTL = 0.5  # seconds


def expensive(key):
    """Stands for a database query or a rendering: slow on purpose."""
    time.sleep(0.15)
    return PRODUCTS[key]


def say(wid, message):
    # One write per line: lines of workers printing at the same moment stay whole.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"  [worker {wid}] {message}\n".encode())


def heading(text):
    print(f"\n{text}", flush=True)


def ms_since(t0):
    return (time.perf_counter() - t0) * 1000


class Phases:
    """Keeps the workers in step, and their output in order."""

    def __init__(self, ctx):
        self.barrier = ctx.Barrier(WORKERS, timeout=30)
        self.fetch_runs = ctx.Value("i", 0)
        self.lookups = ctx.Value("q", 0)  # gets made by all workers, for the stats check

    def sync(self):
        self.barrier.wait()

    def in_turn(self, wid, fn):
        """Runs fn in worker 0, then 1, ...: one after the other, never together."""
        for turn in range(WORKERS):
            if turn == wid:
                fn()
            self.sync()


def worker(wid, phases):
    cache = vela.Cache(NAME)  # attach: options come from the existing segment
    lookups = 0
    try:
        # 1. Worker 0 computes and puts; the others wait for it.
        if wid == 0:
            heading(f"1. Worker 0 computes {len(PRODUCTS)} values with a slow function and puts them")
            for key in PRODUCTS:
                t0 = time.perf_counter()
                value = expensive(key)
                cache.put(key, value, tags=["products"])
                say(wid, f"computed {key} in {ms_since(t0):.0f} ms, put it (tag 'products')")
            cache.put("greeting", "hello from worker 0")
        phases.sync()

        # 2. The others read what worker 0 stored, and time their gets.
        def read():
            nonlocal lookups
            if wid == 0:
                heading("2. The other workers read them from shared memory, no recomputation")
                return
            t0 = time.perf_counter()
            value = cache.get("product:2")
            say(wid, f"get('product:2') -> {value!r} ({ms_since(t0):.3f} ms)")
            get = cache.get
            for key in ("greeting", "product:1"):
                t0 = time.perf_counter_ns()
                for _ in range(TIMED_GETS):
                    get(key)
                ns = (time.perf_counter_ns() - t0) / TIMED_GETS
                say(wid, f"  {ns:6.0f} ns/get over {TIMED_GETS} gets of {key!r}")
            lookups += 1 + 2 * TIMED_GETS

        phases.in_turn(wid, read)

        # 3. get_or_fetch: everybody asks for a missing key at the same moment.
        if wid == 0:
            heading("3. get_or_fetch('report'): all 4 workers ask at the same moment")
        phases.sync()

        def build_report(key):
            with phases.fetch_runs.get_lock():
                phases.fetch_runs.value += 1
            say(wid, f"fetch_fn({key!r}) runs here (0.3 s)")
            time.sleep(0.3)
            return f"report built by worker {wid}"

        t0 = time.perf_counter()
        report = cache.get_or_fetch("report", build_report)
        lookups += 1
        say(wid, f"got {report!r} after {ms_since(t0):.0f} ms")
        phases.sync()
        if wid == 0:
            runs = phases.fetch_runs.value
            if runs == 1:
                print(f"  -> fetch_fn ran once; the other {WORKERS - 1} callers waited for its result",
                      flush=True)
            else:
                print(f"  -> fetch_fn ran {runs} times for {WORKERS} callers: stampede protection "
                      "did NOT hold", flush=True)

        # 4. A TTL running out, seen by every worker.
        if wid == 0:
            heading(f"4. TTL: worker 0 puts 'session:42' with ttl={SESSION_TTL} s")
            cache.put("session:42", "alice", ttl=SESSION_TTL)
        phases.sync()

        def peek_session():
            nonlocal lookups
            if wid == 0:
                return
            value = cache.get("session:42")
            lookups += 1
            remaining = cache.ttl("session:42")
            say(wid, f"get('session:42') -> {value!r}, ttl() -> {remaining:.2f} s left")

        phases.in_turn(wid, peek_session)
        if wid == 0:
            time.sleep(SESSION_TTL + 0.1)
            print(f"  ... {SESSION_TTL + 0.1:.1f} s later", flush=True)
        phases.sync()

        def session_gone():
            nonlocal lookups
            value = cache.get("session:42")
            lookups += 1
            say(wid, f"get('session:42') -> {value!r}" + (" (expired)" if value is None else ""))

        phases.in_turn(wid, session_gone)

        # 5. One worker invalidates a tag; all of them see it at once.
        def invalidate():
            if wid == 0:
                heading("5. Worker 2 invalidates the tag 'products'")
            if wid == 2:
                removed = cache.invalidate_tag("products")
                say(wid, f"invalidate_tag('products') -> {removed} entries removed")

        phases.in_turn(wid, invalidate)

        def products_gone():
            nonlocal lookups
            seen = {key: cache.get(key) for key in PRODUCTS}
            lookups += len(seen)
            still = cache.get("greeting")
            lookups += 1
            say(wid, f"products: {seen}, 'greeting' (untagged) still there: {still is not None}")

        phases.in_turn(wid, products_gone)
    finally:
        with phases.lookups.get_lock():
            phases.lookups.value += lookups
        cache.close()


def run_worker(wid, phases):
    try:
        worker(wid, phases)
    except BaseException:
        traceback.print_exc()
        phases.barrier.abort()  # the other workers fail fast instead of waiting
        sys.exit(1)


def main():
    ctx = mp.get_context("fork")
    cache = vela.Cache(NAME, capacity="16MiB")
    try:
        st = cache.stats()
        print(f"Vela demo: cache {NAME!r} in shared memory, capacity "
              f"{st['capacity'] / 2**20:.0f} MiB, shared by {WORKERS} forked worker processes")
        phases = Phases(ctx)
        procs = [ctx.Process(target=run_worker, args=(wid, phases), name=f"worker-{wid}")
                 for wid in range(WORKERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            print(f"\nFAILED: {', '.join(failed)} did not finish cleanly", flush=True)
            return 1

        heading("6. stats(): one set of counters in the segment, summed over all workers")
        st = cache.stats()
        print("  " + ", ".join(f"{k}={st[k]}" for k in
                               ("hits", "misses", "writes", "invalidations", "expirations",
                                "evictions", "fetches", "stampede_waits", "size")))
        print(f"  hit_ratio={st['hit_ratio']:.4f}, memory_used={st['memory_used']} bytes", flush=True)
        made = phases.lookups.value
        counted = st["hits"] + st["misses"]
        verdict = "match" if made == counted else "DO NOT MATCH"
        print(f"  the workers made {made} lookups between them; hits + misses = {counted}: {verdict}")
        if made != counted:
            return 1
    finally:
        cache.destroy()
        print(f"\nDestroyed cache {NAME!r}.")
    return bridge_pair()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_host(host, code):
    """Run Python code as a process of a simulated host (its own set of segments)."""
    import subprocess

    env = dict(os.environ, VELA_NAMESPACE=host)
    out = subprocess.run([sys.executable, "-c", "import vela\n" + code], env=env, capture_output=True,
                         text=True, timeout=30)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return out.stdout.strip()


def bridge_pair():
    """Two hosts, each with its own shared segment and its own vela-bridge, on loopback.

    VELA_NAMESPACE gives each simulated host its own set of segments on this one
    machine; on real hosts every host runs the same cache name and one bridge.
    """
    import subprocess

    heading("7. Two hosts and a vela-bridge each: a replicated cache")
    hosts, ports = ("demo-a", "demo-b"), (free_port(), free_port())
    opts = "capacity='16MiB', topology='replicated', sweep_interval=None"
    bridges = []
    try:
        for host, port, peer in ((hosts[0], ports[0], ports[1]), (hosts[1], ports[1], ports[0])):
            in_host(host, f"vela.Cache({NAME!r}, {opts}).close()")
            bridges.append(subprocess.Popen(
                [sys.executable, "-m", "vela.bridge", "run", "--cache", NAME, "--listen",
                 f"tcp://127.0.0.1:{port}", "--join", f"tcp://127.0.0.1:{peer}", "--heartbeat", "0.2",
                 "--log-level", "WARNING"], env=dict(os.environ, VELA_NAMESPACE=host)))
        print(f"  host A bridge on port {ports[0]}, host B bridge on port {ports[1]}", flush=True)
        print("  " + in_host(hosts[0], f"""
import time
c = vela.Cache({NAME!r}, {opts})
while not (c.cluster() or {{}}).get("members"):
    time.sleep(0.05)
for i in range(1000):
    c.put(("order", i), {{"id": i, "total": i * 3}}, tags=["orders"])
print(f"host A wrote 1000 orders; its bridge sees {{len(c.cluster()['members'])}} peer")"""))
        print("  " + in_host(hosts[1], f"""
import time
c = vela.Cache({NAME!r}, {opts})
t0 = time.monotonic()
while c.get(("order", 999)) is None and time.monotonic() - t0 < 10:
    time.sleep(0.0005)
seen_ms = (time.monotonic() - t0) * 1000
while len(c) < 1000 and time.monotonic() - t0 < 10:
    time.sleep(0.01)
print(f"host B reads order 999 = {{c.get(('order', 999))}} ({{seen_ms:.0f}} ms after it looked) "
      f"and holds {{len(c)}} entries")
print(f"  host B invalidates tag 'orders': {{c.invalidate_tag('orders')}} entries removed (on each host)")"""))
        print("  " + in_host(hosts[0], f"""
c = vela.Cache({NAME!r}, {opts})
print(f"host A now holds {{len(c)}} entries")"""))
    finally:
        for b in bridges:
            b.terminate()
            b.wait(10)
        for host in hosts:
            in_host(host, f"vela.destroy({NAME!r})")
    return partitioned_pair()


def partitioned_pair():
    """Two hosts of a partitioned cache: each key on one of them; one leaves gracefully."""
    import signal
    import subprocess

    heading("8. A partitioned cache: each key lives on one host, and a leaving host hands its keys over")
    name = NAME + "-p"
    hosts = ("demo-pa", "demo-pb")
    ports = [(free_port(), free_port()) for _ in hosts]
    opts = "capacity='16MiB', topology='partitioned', sweep_interval=None"
    bridges = []
    try:
        for host, (port, data), (peer, _) in ((hosts[0], ports[0], ports[1]), (hosts[1], ports[1], ports[0])):
            in_host(host, f"vela.Cache({name!r}, {opts}).close()")
            bridges.append(subprocess.Popen(
                [sys.executable, "-m", "vela.bridge", "run", "--cache", name, "--listen",
                 f"tcp://127.0.0.1:{port}", "--data-listen", f"127.0.0.1:{data}", "--join",
                 f"tcp://127.0.0.1:{peer}", "--heartbeat", "0.2", "--failure-timeout", "3.0",
                 "--log-level", "WARNING"], env=dict(os.environ, VELA_NAMESPACE=host)))
        wait_ready = f"""
import time
c = vela.Cache({name!r}, {opts})
t0 = time.monotonic()
while not ((c.cluster() or {{}}).get("ready") and len(set(c.cluster()["owners"])) == 2):
    time.sleep(0.05)
    if time.monotonic() - t0 > 15:
        raise SystemExit("the bridges did not agree on a partition table")
"""
        print("  " + in_host(hosts[0], wait_ready + """
c.put_many({("order", i): {"id": i, "total": i * 3} for i in range(1000)})
owners = c.cluster()["owners"]
me = c.cluster()["node_id"]
print(f"host A wrote 1000 orders; it owns {owners.count(me)} of {len(owners)} partitions, "
      f"the cluster holds {c.size()} entries")"""))
        print("  " + in_host(hosts[1], wait_ready + """
orders = c.get_many([("order", i) for i in range(1000)])
print(f"host B reads {len(orders)} orders, order 999 = {orders[('order', 999)]}")"""))
        bridges[0].send_signal(signal.SIGTERM)  # host A leaves: its bridge hands its partitions to B first
        bridges[0].wait(30)
        print("  " + in_host(hosts[1], f"""
import time
c = vela.Cache({name!r}, {opts})
t0 = time.monotonic()
while len(set(c.cluster()["owners"])) != 1 and time.monotonic() - t0 < 10:
    time.sleep(0.05)
orders = c.get_many([("order", i) for i in range(1000)])
print(f"host A left; host B alone now owns every partition and reads {{len(orders)}} orders "
      f"({{1000 - len(orders)}} lost), size {{c.size()}}")"""))
        return 0
    finally:
        for b in bridges:
            if b.poll() is None:
                b.terminate()
            b.wait(30)
        for host in hosts:
            in_host(host, f"vela.destroy({name!r})")


if __name__ == "__main__":
    sys.exit(main())
