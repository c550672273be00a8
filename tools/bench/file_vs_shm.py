"""get and put speed of the file backend relative to the shared-memory backend,
measured in one run (interleaved repeats, median).

    python tools/bench/file_vs_shm.py

Both backends are the same C table; the file backend maps a file MAP_SHARED and
syncs it in the background (sync_interval, default 1 s), so the difference is
what the page cache and the periodic msync cost.
"""
import os
import statistics
import tempfile
import time

import vela

N = 200_000
VALUE = b"v" * 100


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / N * 1e9


def main():
    data_dir = tempfile.mkdtemp(prefix="vela-bench-file-")
    name = f"bfile{os.getpid()}"
    caches = {
        "shm": vela.Cache(name, capacity="64MiB", sweep_interval=None),
        "file": vela.Cache(name, backend="file", backend_opts={"data_dir": data_dir},
                           capacity="64MiB", sweep_interval=None),
    }
    results = {k: {"get": [], "put": []} for k in caches}
    keys = [f"k{i % 10000}" for i in range(N)]
    try:
        for c in caches.values():
            for k in keys[:10000]:
                c.put(k, VALUE)
        for _ in range(5):
            for kind, c in caches.items():
                get, put = c.get, c.put
                results[kind]["get"].append(timed(lambda: [get(k) for k in keys]))
                results[kind]["put"].append(timed(lambda: [put(k, VALUE) for k in keys]))
        for op in ("get", "put"):
            shm, file = (statistics.median(results[k][op]) for k in ("shm", "file"))
            print(f"{op} 100 B: shm {shm:.0f} ns, file {file:.0f} ns, file/shm time {file / shm:.2f}x")
    finally:
        caches["shm"].destroy()
        caches["file"].destroy()
        os.rmdir(data_dir)


if __name__ == "__main__":
    main()
