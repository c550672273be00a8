"""Bytes of Vela segment per entry: N entries of 100 B values under keys f"k{i}".

Two figures, because the segment has two parts:
- heap bytes per entry: memory_used / entries (entry header, key, value, tags,
  allocator rounding): what each entry costs in the shared heap;
- whole segment per entry: (segment - unused heap) / entries, i.e. the heap in
  use plus the fixed part (header, bucket index, stats slots, leases). The index
  is sized from the capacity, so a larger capacity adds a little here.
The overhead is either figure minus the mean key length plus the value size.
"""

import os
import secrets
import sys

try:
    import vela
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import vela

VALUE_SIZE = 100


def fill(entries, capacity):
    cache = vela.Cache(f"bench-memory-{os.getpid()}-{secrets.token_hex(3)}",
                       capacity=capacity, sweep_interval=None)
    try:
        value = b"v" * VALUE_SIZE
        put = cache.put
        for i in range(entries):
            put(f"k{i}", value)
        return cache.stats(), cache.info()
    finally:
        cache.destroy()


def measure(entries=1_000_000):
    # About 2.5x what an entry needs in the heap: no eviction, and the index is
    # sized as an operator who sizes for this many entries would get it.
    capacity = max(16 << 20, entries * 256)
    for _ in range(3):
        stats, info = fill(entries, capacity)
        if stats["evictions"] == 0 and stats["size"] == entries:
            break
        capacity *= 2  # something was evicted: the figure would be wrong, retry bigger
    else:
        raise RuntimeError(f"{entries} entries did not fit in {capacity} bytes without eviction")
    key_bytes = sum(len(f"k{i}") for i in range(entries)) / entries
    payload = key_bytes + VALUE_SIZE
    fixed = info["capacity"] - info["heap_bytes"]  # header, index, stats slots, leases
    heap_per_entry = info["memory_used"] / entries
    segment_per_entry = (fixed + info["memory_used"]) / entries
    return {
        "entries": entries,
        "value_size": VALUE_SIZE,
        "mean_key_bytes": key_bytes,
        "capacity": info["capacity"],
        "memory_used": info["memory_used"],
        "index_bytes": info["index_bytes"],
        "fixed_bytes": fixed,
        "evictions": stats["evictions"],
        "heap_bytes_per_entry": heap_per_entry,
        "index_bytes_per_entry": info["index_bytes"] / entries,
        "segment_bytes_per_entry": segment_per_entry,
        "capacity_per_entry": info["capacity"] / entries,
        "heap_overhead_per_entry": heap_per_entry - payload,
        "segment_overhead_per_entry": segment_per_entry - payload,
    }


def report(m, out=sys.stdout):
    print(f"{m['entries']:,} entries of {m['value_size']} B values, keys f\"k{{i}}\" "
          f"(mean {m['mean_key_bytes']:.2f} B), capacity {m['capacity'] / 2**20:.0f} MiB, "
          f"evictions {m['evictions']}", file=out)
    print(f"  heap bytes per entry        {m['heap_bytes_per_entry']:8.1f}   "
          f"(overhead beyond key + value: {m['heap_overhead_per_entry']:.1f})", file=out)
    print(f"  whole segment per entry     {m['segment_bytes_per_entry']:8.1f}   "
          f"(overhead beyond key + value: {m['segment_overhead_per_entry']:.1f}; "
          f"fixed part {m['fixed_bytes'] / m['entries']:.1f} of it, "
          f"of which info()['index_bytes'] {m['index_bytes_per_entry']:.1f})", file=out)
    print(f"  segment as sized, per entry {m['capacity_per_entry']:8.1f}   "
          f"(capacity / entries: includes the heap left free)", file=out)


if __name__ == "__main__":
    report(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
