"""Crash safety: workers SIGKILLed at any instruction, also while holding locks.

Values are self-checking (key, sequence number, length and a digest of all of it), so a
torn or misplaced value is always detected by the reader that gets it.
"""
import importlib.util
import os
import random
import signal
import time

import pytest

import vela
from conftest import FORK, Child, collect, run_in_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_soak():
    """tools/crash_soak.py, whose self-checking values these tests use too."""
    spec = importlib.util.spec_from_file_location("crash_soak", os.path.join(ROOT, "tools", "crash_soak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOAK = _load_soak()
make_value, is_valid = SOAK.make_value, SOAK.is_valid


def test_value_checker_detects_tearing():
    v = make_value("k:1", 7, 300)
    assert is_valid("k:1", v)
    assert not is_valid("k:2", v)
    w = make_value("k:1", 8, 300)
    assert not is_valid("k:1", v[:150] + w[150:])          # half old, half new
    assert not is_valid("k:1", v[:-1])
    assert not is_valid("k:1", v[:100] + b"\x00" * 50 + v[150:])


# --------------------------------------------------------------------------------------
# deterministic kills inside a put (test hook)


def _stall(name, phase, key, value, ready):
    c = vela.Cache(name)
    ready.send(os.getpid())
    c._table.debug_stall(phase, key, value)      # never returns: pauses holding locks
    return "debug_stall returned instead of stalling"


def stall_and_kill(name, phase, key, value, wait=0.3):
    """Fork a process that stalls inside a put of key at `phase`, then SIGKILL it."""
    ready_r, ready_w = FORK.Pipe(duplex=False)
    child = Child(_stall, name, phase, key, value, ready_w)
    ready_w.close()
    try:
        assert ready_r.poll(20), "stalling child did not start"
        ready_r.recv()
        time.sleep(wait)
        if child.conn.poll():
            child.receive()
            pytest.fail(f"debug_stall({phase}) did not stall: {child.status} {child.payload}")
        assert child.proc.is_alive()
        os.kill(child.pid, signal.SIGKILL)
        child.proc.join(10)
        assert child.proc.exitcode == -signal.SIGKILL
    finally:
        child.close()
        ready_r.close()


def _after_stall(name, key, newer, neighbours):
    c = vela.Cache(name)
    t0 = time.monotonic()
    value = c.get(key)
    t1 = time.monotonic()
    c.put(key, newer)
    t2 = time.monotonic()
    value2 = c.get(key)
    damaged = [k for k, v in neighbours.items() if c.get(k) != v]
    # allocate fresh memory of several sizes (recovers an allocator lock if one was held)
    for i, size in enumerate((50, 500, 5000, 50000, 100000)):
        c.put(("fresh", i), make_value(f"fresh{i}", i, size))
    fresh_ok = all(is_valid(f"fresh{i}", c.get(("fresh", i))) for i in range(5))
    problems = c.check()
    stats = c.stats()
    size = c.size()
    c.close()
    return dict(get_time=t1 - t0, put_time=t2 - t1, value=value, value2=value2,
                damaged=damaged, fresh_ok=fresh_ok, problems=problems,
                recoveries=stats["lock_recoveries"], size=size)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-key", "overwrite"])
@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_kill_inside_put(cache_name, phase, overwrite):
    _kill_inside_put(cache_name, phase, overwrite)


def test_kill_inside_the_free_of_the_overwritten_entry(cache_name):
    """Phase 5: the old block's kind says free, its header still says used."""
    _kill_inside_put(cache_name, 5, overwrite=True)


@pytest.mark.parametrize("phase", [6, 7, 8], ids=["arena-take", "arena-keep", "arena-refill"])
def test_kill_inside_the_stripe_arena(cache_name, phase):
    """Small entries: 6, a spare block leaves the stripe's arena (out of its chain,
    not yet an entry); 7, the replaced block joins it (not yet its head); 8, a
    refill took a block from the heap that is in no chain yet."""
    _kill_inside_put(cache_name, phase, overwrite=True, size=300)


def _kill_inside_put(cache_name, phase, overwrite, size=None):
    """size None: entries too large for an arena (the heap path); else both the
    old and the new value have this size, and the arena holds a block that fits."""
    key = "stalled"
    old = make_value(key, 1, size or 1700)
    new = make_value(key, 2, size or 3000)
    newer = make_value(key, 3, 1500)
    # one stripe: every other entry shares the stripe of the stalled put
    neighbours = {f"n{i}": make_value(f"n{i}", i, 50 + (i * 97) % 4000) for i in range(200)}
    with vela.Cache(cache_name, capacity="8MiB", stripes=1) as c:
        for k, v in neighbours.items():
            c.put(k, v)
        if overwrite:
            c.put(key, old)
            c.put(key, old)  # a replacing put: its old block of this size is a spare block now
        recoveries_before = c.stats()["lock_recoveries"]

    stall_and_kill(cache_name, phase, key, new)
    r = run_in_child(_after_stall, cache_name, key, newer, neighbours, timeout=30)

    assert r["get_time"] < 1.0 and r["put_time"] < 1.0, r
    allowed = [old, new] if overwrite else [None, new]
    assert r["value"] in allowed, "torn or lost value after the kill"
    assert r["value2"] == newer
    assert r["damaged"] == []
    assert r["fresh_ok"]
    assert r["size"] == len(neighbours) + 1 + 5
    assert r["problems"] == []
    assert r["recoveries"] >= recoveries_before + 1


# --------------------------------------------------------------------------------------
# random kills of writers while readers verify everything they read

POOL = SOAK.POOL
WRITERS = 3
READERS = 2
KILL_PHASE = 25.0
STALLS_PER_PHASE = 3


_writer = SOAK.writer  # puts, overwrites, deletes, tags, expiries over SOAK.POOL keys


def _reader(name, seed, baseline, stop):
    rng = random.Random(seed)
    base_keys = list(baseline)
    c = vela.Cache(name)
    reads = torn = base_missing = slow = 0
    max_latency = 0.0
    examples = []
    while not stop.is_set():
        for _ in range(100):
            if rng.random() < 0.3:
                key = rng.choice(base_keys)
                t0 = time.monotonic()
                v = c.get(key)
                dt = time.monotonic() - t0
                if v is None:
                    base_missing += 1
                elif v != baseline[key]:
                    torn += 1
                    examples.append((key, len(v)))
            else:
                key = f"k:{rng.randrange(POOL)}"
                t0 = time.monotonic()
                v = c.get(key)
                dt = time.monotonic() - t0
                if v is not None and not is_valid(key, v):
                    torn += 1
                    examples.append((key, len(v) if isinstance(v, bytes) else repr(v)[:50]))
            reads += 1
            max_latency = max(max_latency, dt)
            slow += dt > 1.0
    c.close()
    return dict(reads=reads, torn=torn, base_missing=base_missing, slow=slow,
                max_latency=max_latency, examples=examples[:10])


def _verify_after_crashes(name, baseline):
    c = vela.Cache(name)
    problems = c.check()
    base_bad = [k for k, v in baseline.items() if c.get(k) != v]
    pool_torn = []
    for n in range(POOL):
        key = f"k:{n}"
        v = c.get(key)
        if v is not None and not is_valid(key, v):
            pool_torn.append(key)
    # every key can still be written and read back
    unwritable = []
    for n in range(POOL):
        key = f"k:{n}"
        value = make_value(key, 10 ** 15 + n, 100 + n)
        c.put(key, value)
        if c.get(key) != value:
            unwritable.append(key)
    problems_after = c.check()
    stats = c.stats()
    size = c.size()
    c.close()
    return dict(problems=problems, base_bad=base_bad, pool_torn=pool_torn,
                unwritable=unwritable, problems_after=problems_after, stats=stats, size=size)


def test_sigkill_writers_while_readers_verify(cache_name):
    rng = random.Random(2024)
    baseline = {f"base:{i}": make_value(f"base:{i}", i, rng.randint(20, 4000))
                for i in range(300)}
    with vela.Cache(cache_name, capacity="64MiB") as c:
        for k, v in baseline.items():
            c.put(k, v)
        assert all(c.get(k) == v for k, v in baseline.items())

    stop = FORK.Event()
    readers = [Child(_reader, cache_name, 100 + i, baseline, stop) for i in range(READERS)]
    writers = []
    kills = stall_kills = 0
    writer_errors = []
    seed = 1

    def check_writer(w):
        if w.conn.poll():
            w.receive()
            if w.status == "error":
                writer_errors.append(w.payload)

    try:
        for _ in range(WRITERS):
            writers.append(Child(_writer, cache_name, seed))
            seed += 1
        stall_plan = [p for p in (1, 2, 3, 4) for _ in range(STALLS_PER_PHASE)]
        rng.shuffle(stall_plan)
        started = time.monotonic()
        stall_every = KILL_PHASE / (len(stall_plan) + 1)
        next_stall = started + stall_every
        # At least KILL_PHASE seconds and at least min_kills kills: a loaded machine takes
        # longer to reach the count rather than failing it (bounded at six times the phase).
        min_kills = 100 if "libasan" in os.environ.get("LD_PRELOAD", "") else 200
        while (time.monotonic() < started + KILL_PHASE or kills < min_kills or stall_plan) \
                and time.monotonic() < started + 6 * KILL_PHASE:
            time.sleep(rng.uniform(0.002, 0.03))
            i = rng.randrange(WRITERS)
            check_writer(writers[i])
            writers[i].kill()
            kills += 1
            check_writer(writers[i])
            writers[i].close()
            writers[i] = Child(_writer, cache_name, seed)
            seed += 1
            if stall_plan and time.monotonic() >= next_stall:
                phase = stall_plan.pop()
                n = rng.randrange(POOL)
                stall_and_kill(cache_name, phase, f"k:{n}",
                               make_value(f"k:{n}", 10 ** 14 + stall_kills, 2000), wait=0.25)
                stall_kills += 1
                next_stall += stall_every
    finally:
        for w in writers:
            w.close()
        stop.set()
    results = collect(readers, timeout=30)

    assert writer_errors == []
    # (Under AddressSanitizer, tools/asan.sh, every process runs about twice as slowly.)
    assert kills >= min_kills
    assert stall_kills == 4 * STALLS_PER_PHASE
    for r in results:
        assert r["reads"] > 1000, r
        assert r["torn"] == 0, r
        assert r["base_missing"] == 0, r
        assert r["slow"] == 0, f"a reader call blocked {r['max_latency']:.3f} s"
        assert r["max_latency"] < 1.0

    v = run_in_child(_verify_after_crashes, cache_name, baseline, timeout=60)
    print(f"kills={kills} stall_kills={stall_kills} "
          f"lock_recoveries={v['stats']['lock_recoveries']} "
          f"reads={[r['reads'] for r in results]} "
          f"max_latency={max(r['max_latency'] for r in results):.4f}s")
    assert v["problems"] == []
    assert v["base_bad"] == []
    assert v["pool_torn"] == []
    assert v["unwritable"] == []
    assert v["problems_after"] == []
    assert v["size"] == len(baseline) + POOL      # every pool key was just written
    assert v["stats"]["evictions"] == 0
    assert v["stats"]["lock_recoveries"] >= stall_kills


# --------------------------------------------------------------------------------------
# a get_or_fetch lease held by a process that dies


def _fetch_forever(name, in_fetch):
    def fetch(key):
        in_fetch.send(True)
        time.sleep(3600)

    with vela.Cache(name) as c:
        return c.get_or_fetch("leased", fetch)


def _fetch_after_holder_died(name):
    # a waiter that waited out its whole stampede_timeout would count a stampede_timeout
    with vela.Cache(name, stampede_timeout=10.0) as c:
        value = c.get_or_fetch("leased", lambda key: "taken over")
        return value, c.get("leased"), c.stats(), c.check()


def test_lease_of_killed_fetcher_is_taken_over(cache_name):
    with vela.Cache(cache_name, capacity="8MiB"):
        pass
    in_fetch_r, in_fetch_w = FORK.Pipe(duplex=False)
    holder = Child(_fetch_forever, cache_name, in_fetch_w)
    in_fetch_w.close()
    try:
        assert in_fetch_r.poll(20), "fetching child did not start its fetch"
        holder.kill()
        assert holder.proc.exitcode == -signal.SIGKILL
    finally:
        holder.close()
        in_fetch_r.close()
    value, stored, stats, problems = run_in_child(_fetch_after_holder_died, cache_name,
                                                  timeout=30)
    assert value == "taken over"
    assert stored == "taken over"
    assert stats["stampede_timeouts"] == 0
    assert problems == []


# --------------------------------------------------------------------------------------
# the crash soak (tools/crash_soak.py), short: its long run makes 1,000+ kills


def test_crash_soak_short(cache_name):
    """Random SIGKILLs of writers, every 5th at a stall point inside a put (each of
    the five in turn), readers verifying all along; afterwards check() is clean and
    every key reads and writes."""
    summary, problems = SOAK.soak(cache_name, kills=150, seed=3, stall_every=5, log=lambda line: None)
    assert problems == []
    assert summary["kills"] == 150 and summary["stall_kills"] == 30
    assert summary["torn"] == 0 and summary["reads"] > 1000
    assert summary["lock_recoveries"] >= 30  # every stall kill left a lock to repair
