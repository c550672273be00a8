"""cache.lock and cache.throttle with real processes: mutual exclusion, timeouts, a holder
SIGKILLed (freed at once) or on another host (freed by the ttl), a lost lock, asyncio
waits that keep the loop running, and a rate shared by every process."""
import asyncio
import os
import signal
import time
import uuid

import pytest

import vela
from apps import readme
from conftest import FORK, Child, collect, run_children
from vela import locks

BARRIER_TIMEOUT = 30


def _increment_under_lock(name, barrier, rounds):
    cache = vela.Cache(name)
    barrier.wait(BARRIER_TIMEOUT)
    for _ in range(rounds):
        with cache.lock("counter", ttl=10, timeout=30):
            value = cache.get("n", 0)   # a read-modify-write that only the lock makes safe
            time.sleep(0.001)
            cache.put("n", value + 1)
    cache.close()
    return os.getpid()


def test_one_holder_at_a_time_across_processes(cache, cache_name):
    barrier = FORK.Barrier(4)
    run_children(_increment_under_lock, [(cache_name, barrier, 25) for _ in range(4)], timeout=120)
    assert cache.get("n") == 100
    assert not cache.lock("counter").locked()


def _hold(name, lock_name, ready, ttl):
    cache = vela.Cache(name)
    lock = cache.lock(lock_name, ttl=ttl)
    assert lock.acquire(blocking=False)
    ready.set()
    time.sleep(600)


def test_a_held_lock_times_out_and_is_freed_when_its_holder_is_killed(cache, cache_name):
    ready = FORK.Event()
    holder = Child(_hold, cache_name, "job", ready, 600.0)
    try:
        assert ready.wait(BARRIER_TIMEOUT)
        lock = cache.lock("job", ttl=5, timeout=0.2)
        assert lock.locked() and not lock.held
        assert lock.acquire(blocking=False) is False
        with pytest.raises(vela.LockTimeout, match=r"lock 'job' of cache .* not acquired within 0.2 s"):
            with lock:
                pytest.fail("entered a lock held by a live process")
        assert lock.acquire(timeout=0.1) is False
        os.kill(holder.pid, signal.SIGKILL)
        holder.proc.join(10)
        # the ttl is 600 s: the lock is free because its holder died
        with cache.lock("job", ttl=5, timeout=5) as taken:
            assert taken.held and taken.locked()
        assert not lock.locked()
    finally:
        holder.close()


def _hold_on_redis(name, url, ready):
    cache = vela.Cache(name, backend="redis", backend_opts={"url": url})
    assert cache.lock("job", ttl=600).acquire(blocking=False)
    ready.set()
    time.sleep(600)


def test_on_redis_a_killed_holder_frees_the_lock_too():
    from redis_server import RedisServer

    server = RedisServer().start()
    name = f"lk{uuid.uuid4().hex[:8]}"
    ready = FORK.Event()
    holder = Child(_hold_on_redis, name, server.url, ready)
    try:
        assert ready.wait(BARRIER_TIMEOUT)
        cache = vela.Cache(name, backend="redis", backend_opts={"url": server.url})
        assert cache.lock("job", timeout=0).acquire() is False
        os.kill(holder.pid, signal.SIGKILL)
        holder.proc.join(10)
        with cache.lock("job", ttl=5, timeout=5) as lock:
            assert lock.held
        cache.close()
    finally:
        holder.close()
        vela.destroy(name, backend="redis", backend_opts={"url": server.url})
        server.stop()


def _wait_for_dead_holders_lock(name, barrier):
    cache = vela.Cache(name)
    barrier.wait(BARRIER_TIMEOUT)
    with cache.lock("job", ttl=30, timeout=30):
        inside = cache.incr("inside")
        time.sleep(0.05)
        cache.incr("inside", -1)
    return inside


def test_waiters_take_over_a_dead_holders_lock_one_at_a_time(cache, cache_name):
    ready = FORK.Event()
    holder = Child(_hold, cache_name, "job", ready, 600.0)
    try:
        assert ready.wait(BARRIER_TIMEOUT)
        barrier = FORK.Barrier(5)
        waiters = [Child(_wait_for_dead_holders_lock, cache_name, barrier) for _ in range(4)]
        barrier.wait(BARRIER_TIMEOUT)
        os.kill(holder.pid, signal.SIGKILL)
        assert collect(waiters, 60) == [1, 1, 1, 1]  # never two inside at once
    finally:
        holder.close()


def test_holders_judged_by_pid_and_start_time_on_this_host_only(cache):
    me = os.getpid()
    # this pid, but another start time: the process that took it is gone (pid reused)
    cache.put(("vela.lock", "reused"), f"{locks._HOST}|{me}|12345|ab", ttl=600)
    assert cache.lock("reused", timeout=0).acquire() is True
    # a holder on another host is never judged by its pid: its ttl frees the lock
    cache.put(("vela.lock", "remote"), f"other-host/pid:[1]|{me}|12345|ab", ttl=0.5)
    lock = cache.lock("remote", timeout=0)
    assert lock.acquire() is False
    assert lock.acquire(timeout=5) is True
    # a live holder of this host keeps it
    live = cache.lock("live")
    assert live.acquire()
    assert cache.lock("live", timeout=0).acquire() is False


def test_release_extend_and_a_lost_lock(cache):
    lock = cache.lock("short", ttl=0.3)
    with pytest.raises(RuntimeError, match="not held by this Lock object"):
        lock.release()
    assert lock.acquire()
    with pytest.raises(RuntimeError, match="not reentrant"):
        lock.acquire()
    lock.extend(60)
    assert 59 < cache.ttl(("vela.lock", "short")) <= 60
    lock.release()
    assert lock.acquire()
    time.sleep(0.5)  # its ttl runs out while held
    other = cache.lock("short", ttl=60)
    assert other.acquire(blocking=False)
    with pytest.raises(RuntimeError, match=r"lock 'short' was lost: its ttl \(0.3 s\) ran out"):
        lock.release()
    assert other.locked() and other.held  # the new holder keeps it
    other.release()


def test_bad_arguments(cache):
    with pytest.raises(vela.OptionError, match="lock name must be a non-empty str"):
        cache.lock("")
    with pytest.raises(vela.OptionError, match="ttl must be a positive number"):
        cache.lock("x", ttl=0)
    with pytest.raises(vela.OptionError, match="timeout must be a positive number"):
        cache.lock("x", timeout=-1)
    with pytest.raises(vela.OptionError, match="rate must be an int >= 1"):
        cache.throttle("x", 0)
    with pytest.raises(vela.OptionError, match="per must be a positive number"):
        cache.throttle("x", 1, per=0)


# ---- asyncio --------------------------------------------------------------------------------


def _hold_then_release(name, ready, seconds):
    cache = vela.Cache(name)
    with cache.lock("async-job", ttl=30):
        ready.set()
        time.sleep(seconds)
    return True


def test_async_with_waits_without_blocking_the_loop(cache, cache_name):
    ready = FORK.Event()
    holder = Child(_hold_then_release, cache_name, ready, 0.5)
    try:
        assert ready.wait(BARRIER_TIMEOUT)

        async def main():
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            async with cache.lock("async-job", timeout=10) as lock:
                held = lock.held
            ticker.cancel()
            with pytest.raises(vela.LockTimeout):
                async with cache.lock("async-job", timeout=0):
                    async with cache.lock("async-job", timeout=0.05):
                        pass
            return held, ticks

        held, ticks = asyncio.run(main())
        assert held is True
        assert ticks >= 5  # the loop ran while the lock was awaited
    finally:
        holder.close()


# ---- throttle ---------------------------------------------------------------------------------


def _hammer(name, barrier, attempts):
    cache = vela.Cache(name)
    throttle = cache.throttle("api", 30, per=600)
    barrier.wait(BARRIER_TIMEOUT)
    return sum(throttle.allow() for _ in range(attempts))


def test_throttle_admits_rate_events_among_all_processes(cache, cache_name):
    barrier = FORK.Barrier(4)
    admitted = run_children(_hammer, [(cache_name, barrier, 50) for _ in range(4)], timeout=60)
    assert sum(admitted) == 30
    assert cache.throttle("api", 30, per=600).used() == 30
    assert cache.throttle("api", 30, per=600).allow() is False


def test_throttle_bucket_refills_one_token_per_interval(cache):
    throttle = cache.throttle("burst", 5, per=5)  # a token a second, 5 at most
    assert [throttle.allow() for _ in range(7)] == [True] * 5 + [False] * 2
    assert throttle.allow(2) is False and throttle.used() == 5
    time.sleep(1.2)  # one token back (two only after 2 s)
    assert throttle.used() == 4
    assert throttle.allow() is True and throttle.allow() is False
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        throttle.allow(0)


def test_throttle_burst_bounds_what_a_full_bucket_admits(cache):
    throttle = cache.throttle("api", 1, per=600, burst=3)
    assert throttle.allow(4) is False  # more than the bucket ever holds
    assert [throttle.allow() for _ in range(4)] == [True, True, True, False]
    assert throttle.used() == 3
    with pytest.raises(vela.OptionError, match="burst must be an int >= 1"):
        cache.throttle("api", 1, burst=0)


# ---- the README ---------------------------------------------------------------------------------


def test_readme_locks_section_runs_as_written():
    name = f"readme{uuid.uuid4().hex[:10]}"
    (code,) = readme.python_blocks("Locks and rate limits")
    try:
        readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_locks"})
    finally:
        vela.destroy(name)
