"""Cost of Vela's Python layer on a get with telemetry idle (no handler attached).

Compares `cache.get(key)` with the raw native call `cache._table.get(key)`
(what cache.get calls), on hits of 100 B values, one process. The two loops
alternate, round after round, so a drift of the machine (frequency, a neighbour)
touches both alike; the figure is the median round of each.

    python tools/bench/telemetry_idle.py [--quick]
"""

import argparse
import os
import secrets
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402

try:
    import vela
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import vela

TARGET = 1.05  # cache.get within 5 % of the native call


def _time_loop(fn, keys):
    start = time.perf_counter_ns()
    for key in keys:
        fn(key)
    return (time.perf_counter_ns() - start) / len(keys)


def measure(ops=300_000, rounds=7):
    if vela.telemetry.active:
        raise RuntimeError("a telemetry handler is attached: this measures the idle path")
    cache = vela.Cache(f"bench-telemetry-{os.getpid()}-{secrets.token_hex(3)}", capacity="32MiB")
    try:
        w = workloads.BY_NAME["get_hit_100b"]
        cache.put_many(w.items())
        keys = w.plan(0, 1, ops)
        raw = cache._table.get  # the native method cache.get calls
        wrapped, bare = [], []
        _time_loop(cache.get, keys[:20_000])  # warm-up
        _time_loop(raw, keys[:20_000])
        for _ in range(rounds):  # the same loop for both: only the callable differs
            wrapped.append(_time_loop(cache.get, keys))
            bare.append(_time_loop(raw, keys))
        get_ns, raw_ns = statistics.median(wrapped), statistics.median(bare)
        return {"ops_per_round": ops, "rounds": rounds,
                "cache_get_ns": get_ns, "native_get_ns": raw_ns,
                "ratio": get_ns / raw_ns, "target": TARGET,
                "rounds_cache_get_ns": wrapped, "rounds_native_get_ns": bare}
    finally:
        cache.destroy()


def report(m, out=sys.stdout):
    print(f"cache.get (telemetry idle) {m['cache_get_ns']:7.1f} ns/op   "
          f"cache._table.get {m['native_get_ns']:7.1f} ns/op   "
          f"ratio {m['ratio']:.3f}  (Python layer adds {m['cache_get_ns'] - m['native_get_ns']:.1f} ns)",
          file=out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    m = measure(ops=100_000, rounds=3) if args.quick else measure()
    report(m)
    print(f"target: within 5 % -> {'met' if m['ratio'] <= TARGET else 'NOT met'} ({m['ratio']:.3f}x)")
