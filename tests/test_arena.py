"""Per-stripe allocation arenas (native/arena.c): small puts without the heap lock,
and spare memory that never stands between a put and free memory.

Crash safety of the arena's paths (stall points 6-8) is in test_crash.py and the soak.
"""
import time

import pytest

import vela
from conftest import Child, run_in_child, stripe_of_new_key

SMALL = b"s" * 100


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _stall_in_heap(name, key):
    c = vela.Cache(name, sweep_interval=None)
    c._table.debug_stall(4, key, b"v" * 3000)  # stops forever inside the heap, holding its lock


def _put_all(name, keys, value):
    """Put value under every key, with a short lock timeout; the keys that timed out."""
    c = vela.Cache(name, sweep_interval=None, lock_timeout=1.0)
    timed_out = []
    for k in keys:
        try:
            c.put(k, value)
        except vela.LockTimeout:
            timed_out.append(k)
    c.close()
    return timed_out


def _delete_all(name, keys):
    """Delete every key, with a short lock timeout; the keys that timed out or were not there."""
    c = vela.Cache(name, sweep_interval=None, lock_timeout=1.0)
    failed = []
    for k in keys:
        try:
            if not c.delete(k):
                failed.append(k)
        except vela.LockTimeout:
            failed.append(k)
    c.close()
    return failed


def test_small_writes_do_not_wait_for_the_heap_lock(cache_name):
    """While another process holds the heap lock (stopped inside the heap), overwrites,
    inserts and deletes of small entries in the other stripes complete with their
    arenas; a large entry's put, which needs the heap, waits (and times out)."""
    with vela.Cache(cache_name, capacity="8MiB", stripes=16, sweep_interval=None) as cache:
        table = cache._table
        # keys of one length: with values of one size, every entry's block has one size
        stripe = {f"k{i}": stripe_of_new_key(table, f"k{i}") for i in range(10, 74)}
        new_stripe = {f"x{i}": stripe_of_new_key(table, f"x{i}") for i in range(10, 42)}
        for k in stripe:  # an insert refills its stripe's arena, an overwrite keeps the old block
            cache.put(k, SMALL)
            cache.put(k, SMALL)
        assert table.info()["spare_bytes"] > 0
        holder = Child(_stall_in_heap, cache_name, "big")
        try:
            _wait(lambda: table.info()["heap_lock_holder"] == holder.pid, 10, "heap not locked")
            held = [i for i, s in enumerate(table.stripes_info()) if s[3] == holder.pid]
            assert len(held) == 1
            free_keys = [k for k, s in stripe.items() if s != held[0]]
            # one insert per stripe: its arena holds a spare block that fits
            inserts = list({s: k for k, s in new_stripe.items() if s != held[0]}.values())

            assert run_in_child(_put_all, cache_name, free_keys, b"o" * 100) == []
            assert run_in_child(_put_all, cache_name, inserts, b"i" * 100) == []
            # a delete gives the small block to the arena: no heap lock either
            assert run_in_child(_delete_all, cache_name, inserts) == []
            assert run_in_child(_put_all, cache_name, free_keys[:1], b"L" * 3000) == free_keys[:1]
        finally:
            holder.close()
        assert cache.check() == []
        assert all(cache.get(k) == b"o" * 100 for k in free_keys)
        assert all(cache.get(k) is None for k in inserts)


def test_a_put_refused_for_room_first_takes_back_every_spare_block(cache_name):
    """ttl_only: nothing may be evicted, so a put that finds no room must not be
    refused while spare blocks of the arenas hold memory."""
    with vela.Cache(cache_name, capacity="2MiB", stripes=16, eviction_policy="ttl_only",
                    sweep_interval=None) as cache:
        for round_ in range(2):
            for i in range(200):
                cache.put(f"small{i}", bytes([round_]) * (60 + i % 300))
        assert cache._table.info()["spare_bytes"] > 0
        n = 0
        with pytest.raises(vela.CacheFull):
            while True:
                cache.put(f"large{n}", b"L" * 1500)
                n += 1
        assert cache._table.info()["spare_bytes"] == 0
        assert n > 0 and cache.get(f"large{n - 1}") == b"L" * 1500
        assert cache.check() == []


def test_lru_eviction_takes_spare_blocks_back_as_its_hand_passes(cache_name):
    """lru: large puts into a full heap evict along the clock hand, which gives the
    arenas' spare blocks back as it passes them; every put succeeds, nothing leaks."""
    with vela.Cache(cache_name, capacity="2MiB", stripes=16, sweep_interval=None) as cache:
        for round_ in range(2):
            for i in range(2000):
                cache.put(f"small{i}", bytes([round_]) * (60 + i % 300))
        spare = cache._table.info()["spare_bytes"]
        assert spare > 0
        for n in range(3000):
            cache.put(f"large{n}", b"L" * 1500)
        assert cache._table.info()["spare_bytes"] < spare
        assert cache.get("large2999") == b"L" * 1500
        assert cache.check() == []
