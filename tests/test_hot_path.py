"""Regression guards for the hot path that count, not time.

A get of a stored value must allocate nothing on the Python heap beyond the
object it returns, and must not leak: tracemalloc sees every Python-level
allocation, so a wrapper that starts building tuples, dicts or bound methods
per call, or a C path that leaks a reference, shows up here on any machine.
"""
import sys
import tracemalloc

import vela


def _measure(fn, n):
    # Warm caches (interned strings, method lookups) outside the measurement: 2048
    # calls, as CPython 3.10 gives a code object its attribute/global lookup cache
    # (two small blocks) at its 1024th run.
    for _ in range(2048):
        fn()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        blocks = sys.getallocatedblocks()
        for _ in range(n):
            fn()
        current, peak = tracemalloc.get_traced_memory()
        return peak - base, current - base, sys.getallocatedblocks() - blocks
    finally:
        tracemalloc.stop()


def _peak_during(fn, n, attempts=3):
    """(peak, growth, blocks) of n calls of fn, less what n calls of a no-op cost
    (the loop and the measurement itself allocate a little): the smallest of a few
    attempts, as a garbage collection or a background thread may free or allocate
    a few blocks during one; an allocation per call shows in every attempt, n times."""
    def once():
        noop = _measure(lambda: None, n)
        return tuple(a - b for a, b in zip(_measure(fn, n), noop))
    return tuple(map(min, zip(*(once() for _ in range(attempts)))))


def test_get_allocates_only_its_result(cache):
    value = b"v" * 100
    cache.put("k", value)
    result_size = sys.getsizeof(value)
    peak, growth, blocks = _peak_during(lambda: cache.get("k"), 20000)
    # at most the one result alive at a time (plus allocator rounding)
    assert peak <= result_size + 16, peak
    assert growth <= 0 and blocks <= 0, (growth, blocks)


def test_miss_and_exists_allocate_nothing(cache):
    peak, growth, blocks = _peak_during(lambda: cache.get("absent"), 20000)
    assert peak <= 0 and growth <= 0 and blocks <= 0, (peak, growth, blocks)
    cache.put("k", 1)
    peak, growth, blocks = _peak_during(lambda: cache.exists("k"), 20000)
    assert peak <= 0 and growth <= 0 and blocks <= 0, (peak, growth, blocks)


def _leak_per_call(fn):
    """Blocks left behind per call: the difference between a long and a short run,
    so one-time allocations (module caches, interned names) cancel out."""
    _, _, short = _peak_during(fn, 2000)
    _, _, long = _peak_during(fn, 12000)
    return (long - short) / 10000


def test_put_and_pickled_get_do_not_leak(cache):
    record = {"id": 1, "name": "Alice", "tags": ["a", "b"]}
    cache.put("rec", record)
    assert _leak_per_call(lambda: cache.get("rec")) <= 0
    assert _leak_per_call(lambda: cache.put("p", record, ttl=60, tags=["t"])) <= 0
    assert _leak_per_call(lambda: cache.get_many(["rec", "p", "absent"])) <= 0
