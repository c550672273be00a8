"""Microseconds per call of the API features built on the public Cache API, one
process, shared memory (a noisy machine moves these by tens of percent):

    python tools/bench/api_features.py

memoize hits (key building included), get_or_fetch hit beside them, a lock taken and
released, a throttle's allow(), a signed read beside a plain one.
"""
import time
import uuid

import vela
from vela.serializers import signed


def per_call(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main():
    name = f"bench{uuid.uuid4().hex[:8]}"
    cache = vela.Cache(name, capacity="64MiB", sweep_interval=None)
    safe = vela.Cache(name, serializer=signed(key=b"k" * 32), sweep_interval=None)
    try:
        @cache.memoize(ttl=600)
        def scalar(x, y=1.5):
            return {"x": x}

        @cache.memoize(ttl=600)
        def nested(a, b):
            return a

        def locked():
            with cache.lock("bench"):
                pass

        throttle = cache.throttle("bench", 10**9, per=60)
        value = {"rows": list(range(100))}
        cache.put("plain", value)
        safe.put("signed", value)
        rows = [
            ("memoize hit, f(1)", lambda: scalar(1), 100_000),
            ("memoize hit, f({'k': [1, 2, 3]}, 's')", lambda: nested({"k": [1, 2, 3]}, "s"), 100_000),
            ("get_or_fetch hit", lambda: cache.get_or_fetch("k", lambda k: 1), 100_000),
            ("lock acquire + release", locked, 20_000),
            ("throttle allow()", throttle.allow, 20_000),
            ("get, a 100-int dict, pickle", lambda: cache.get("plain"), 50_000),
            ("get, the same, signed pickle", lambda: safe.get("signed"), 50_000),
        ]
        for label, fn, n in rows:
            fn()
            print(f"{label:40s} {per_call(fn, n):7.2f} us")
    finally:
        safe.close()
        cache.destroy()


if __name__ == "__main__":
    main()
