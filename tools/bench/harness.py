"""Timing: size a run by calibration, then fork N workers that start together.

Each worker connects its own client after fork, builds its plan, warms up, waits
at a barrier, then times its loop with perf_counter_ns (CLOCK_MONOTONIC, one
clock for every process of the host). The aggregate figure is
total ops / (last worker's end - first worker's start): the wall time of the
whole group, so a worker that is starved or serialised behind another shows.
"""

import multiprocessing
import os
import statistics
import time
import traceback

_ctx = multiprocessing.get_context("fork")
MAX_OPS = 3_000_000  # bounds the plan lists a worker builds (memory, build time)
MIN_OPS = 200


def calibrate(store, workload, seconds):
    """Ops per worker so that one worker's loop lasts about `seconds` (runs in the parent)."""
    run = workload.loop(store)
    n, pilot = 64, max(seconds / 8, 0.005)
    while True:
        plan = workload.plan(0, 1, n)
        start = time.perf_counter()
        run(plan)
        elapsed = time.perf_counter() - start
        if elapsed >= pilot or n >= MAX_OPS:
            break
        n *= 4 if elapsed < pilot / 8 else 2
    return max(MIN_OPS, min(MAX_OPS, int(n * seconds / max(elapsed, 1e-9))))


def _worker(store, workload, index, nprocs, n_ops, barrier, results):
    try:
        store.connect()
        run = workload.loop(store)
        plan = workload.plan(index, nprocs, n_ops)
        run(plan[:min(len(plan), 2000)])  # warm-up: connections, caches, lazy imports
        barrier.wait(timeout=120)
        start = time.perf_counter_ns()
        run(plan)
        end = time.perf_counter_ns()
        store.disconnect()
        results.put((index, "ok", start, end))
    except BaseException:
        results.put((index, "error", traceback.format_exc(), None))


def run_once(store, workload, nprocs, n_ops):
    """Fork nprocs workers running n_ops each; returns (wall_ns, [per-worker ns])."""
    barrier = _ctx.Barrier(nprocs)
    results = _ctx.Queue()
    procs = [_ctx.Process(target=_worker, args=(store, workload, i, nprocs, n_ops, barrier, results),
                          daemon=True) for i in range(nprocs)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r[2] for r in got if r[1] != "ok"]
    if errors:
        raise RuntimeError(f"worker failed:\n{errors[0]}")
    starts, ends = [r[2] for r in got], [r[3] for r in got]
    return max(ends) - min(starts), [e - s for s, e in zip(starts, ends)]


def measure(store, workload, procs_list, seconds, repeats):
    """Every process count of procs_list, `repeats` times each, on one populated store.

    Returns {nprocs: result dict}; the reported figure is the median of the repeats.
    """
    store.connect()
    try:
        workload.check(store)
        n_ops = calibrate(store, workload, seconds)
    finally:
        store.disconnect()
    # Repeats interleave the process counts (1, 2, 1, 2, ...), so a drift of the
    # host during the measurement touches every count alike.
    runs = {nprocs: [] for nprocs in procs_list}
    for _ in range(repeats):
        for nprocs in procs_list:
            runs[nprocs].append(run_once(store, workload, nprocs, n_ops))
    out = {}
    for nprocs, done in runs.items():
        rates = [nprocs * n_ops / (wall / 1e9) for wall, _ in done]
        per_op = [statistics.mean(each) / n_ops for _, each in done]
        out[nprocs] = {
            "ops_per_proc": n_ops,
            "ops_per_s": statistics.median(rates),
            "best_ops_per_s": max(rates),
            "ns_per_op": statistics.median(per_op),
            "repeats": [{"wall_ns": wall, "worker_ns": each, "ops_per_s": rate}
                        for (wall, each), rate in zip(done, rates)],
        }
    return out


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def baselines(ops=300_000):
    """Costs inside every figure, for reading them: the bare loop with a no-op call,
    and the pickle.loads that the floor, redis, memcached and lmdb pay on a 100 B get."""
    import pickle
    keys = [f"k{i}" for i in range(1000)] * (ops // 1000)
    blob = pickle.dumps(b"v" * 100)

    def noop(key):
        return None

    def unpickle(key, loads=pickle.loads):
        return loads(blob)

    out = {}
    for name, fn in (("loop_noop_call_ns", noop), ("loop_pickle_loads_100b_ns", unpickle)):
        best = None
        for _ in range(3):
            start = time.perf_counter_ns()
            for key in keys:
                fn(key)
            ns = (time.perf_counter_ns() - start) / len(keys)
            best = ns if best is None else min(best, ns)
        out[name] = best
    return out
