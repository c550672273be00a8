"""Stampede protection of get_or_fetch: how fast waiters get the value, and take over.

    python tools/bench/stampede.py [--rounds 200] [--kills 20] [--json PATH]

1. Wake-up latency. A holder process runs get_or_fetch(key) and, inside its
   fetch_fn, waits until a waiter process is blocked in get_or_fetch(key) for the
   same key; then it notes the time and returns the value, which Vela stores and
   hands to the waiters (fetch_complete: store, release the lease, futex wake).
   Latency = waiter's get_or_fetch return - holder's fetch_fn return: the
   time from the value being ready to a waiter of another process holding it.
2. Takeover after SIGKILL. A holder blocks inside its fetch_fn forever; a waiter
   blocks on the same key; the parent SIGKILLs the holder and reaps it at once
   (as a supervisor does), at a random point 3-28 ms after the waiter blocked.
   Takeover = waiter's own fetch_fn start - kill. Then the same with the holder
   left unreaped until the takeover (a zombie, still listed in /proc), as when a
   supervisor is slow to reap: it must make no difference.

Both clocks are time.perf_counter_ns, CLOCK_MONOTONIC: one clock for every
process of the host, so times taken in different processes subtract.
"""

import argparse
import json
import multiprocessing
import os
import random
import secrets
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import vela
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import vela

_ctx = multiprocessing.get_context("fork")
# Time the parent gives a waiter to go from "about to call" to asleep on the
# lease's futex (microseconds of work): generous, so every round measures a wake-up.
SETTLE_S = 0.003
# Longer than the period at which a waiter checks that the lease holder lives.
KILL_SPREAD_S = 0.025
VALUE = b"v" * 100


def _recv(conn, timeout=30):
    """conn.recv(), but a child that died or hangs is an error, not a hung benchmark."""
    if not conn.poll(timeout):
        raise RuntimeError(f"no answer from a child process in {timeout} s")
    return conn.recv()


def _tell_stop(conn):
    try:
        conn.send(None)
    except OSError:  # the child is gone already
        pass


def _percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))]


# ---- 1. wake-up latency -------------------------------------------------------------

def _holder_loop(cache, conn):
    """For each key sent: hold its lease until told to release; reply with the release time."""
    while True:
        key = conn.recv()
        if key is None:
            return
        released = []

        def fetch(k):
            conn.send("holding")
            conn.recv()  # "release"
            released.append(time.perf_counter_ns())
            return VALUE

        cache.get_or_fetch(key, fetch)
        conn.send(released[0])


def _waiter_loop(cache, conn):
    """For each key sent: get_or_fetch it; reply with the return time and whether it fetched."""
    while True:
        key = conn.recv()
        if key is None:
            return
        fetched = []
        conn.send("calling")
        value = cache.get_or_fetch(key, lambda k: fetched.append(k) or VALUE)
        done = time.perf_counter_ns()
        conn.send((done, bool(fetched), value == VALUE))


def _serve(target, cache, conn):
    try:
        target(cache, conn)
    finally:
        conn.close()


def wakeup(cache, rounds):
    holder_end, holder = _ctx.Pipe()
    waiter_end, waiter = _ctx.Pipe()
    procs = [_ctx.Process(target=_serve, args=(_holder_loop, cache, holder), daemon=True),
             _ctx.Process(target=_serve, args=(_waiter_loop, cache, waiter), daemon=True)]
    for p in procs:
        p.start()
    holder.close()
    waiter.close()
    latencies, bad = [], 0
    try:
        for r in range(rounds):
            key = f"wake-{r}"
            before = cache.stats()["stampede_waits"]
            holder_end.send(key)
            assert _recv(holder_end) == "holding"
            waiter_end.send(key)
            assert _recv(waiter_end) == "calling"
            time.sleep(SETTLE_S)  # the waiter is now asleep on the lease
            holder_end.send("release")
            released = _recv(holder_end)
            done, fetched, same = _recv(waiter_end)
            waited = cache.stats()["stampede_waits"] - before
            if fetched or not same or waited != 1:  # not a wake-up: do not count it
                bad += 1
                continue
            latencies.append(done - released)
    finally:
        for end in (holder_end, waiter_end):
            _tell_stop(end)
        for p in procs:
            p.join(5)
    us = [x / 1000 for x in latencies]
    return {"rounds": rounds, "measured": len(us), "discarded": bad,
            "p50_us": statistics.median(us) if us else None,
            "p99_us": _percentile(us, 99) if us else None,
            "max_us": max(us) if us else None, "samples_us": us}


# ---- 2. takeover after SIGKILL --------------------------------------------------------

def _doomed_holder(cache, key, conn):
    def fetch(k):
        conn.send("holding")
        while True:  # until SIGKILL
            time.sleep(60)
    cache.get_or_fetch(key, fetch)


def _taking_waiter(cache, conn):
    while True:
        key = conn.recv()
        if key is None:
            return
        started = []
        conn.send("calling")
        cache.get_or_fetch(key, lambda k: started.append(time.perf_counter_ns()) or VALUE)
        conn.send(started[0] if started else None)


def takeover(cache, kills, reap=True):
    waiter_end, waiter = _ctx.Pipe()
    wproc = _ctx.Process(target=_serve, args=(_taking_waiter, cache, waiter), daemon=True)
    wproc.start()
    waiter.close()
    times, bad = [], 0
    rng = random.Random(7)
    try:
        for r in range(kills):
            key = f"kill-{'reaped' if reap else 'unreaped'}-{r}"  # never stored before
            holder_end, holder = _ctx.Pipe()
            hproc = _ctx.Process(target=_doomed_holder, args=(cache, key, holder), daemon=True)
            hproc.start()
            holder.close()
            assert _recv(holder_end) == "holding"
            waiter_end.send(key)
            assert _recv(waiter_end) == "calling"
            # A kill lands at any point of the waiter's liveness-poll period: spread
            # the kills over more than one period, else every round would measure
            # the same phase.
            time.sleep(SETTLE_S + rng.uniform(0, KILL_SPREAD_S))
            timeouts = cache.stats()["stampede_timeouts"]
            killed = time.perf_counter_ns()
            os.kill(hproc.pid, signal.SIGKILL)
            if reap:
                hproc.join()  # as a supervisor does at once
            # Unreaped, the dead holder stays a zombie, still listed in /proc:
            # the waiter must see it as dead all the same.
            started = _recv(waiter_end)
            hproc.join()
            if started is None or cache.stats()["stampede_timeouts"] != timeouts:
                bad += 1  # the waiter got the value or gave up by timeout: not a takeover
                continue
            times.append(started - killed)
    finally:
        _tell_stop(waiter_end)
        wproc.join(5)
    ms = [x / 1e6 for x in times]
    return {"rounds": kills, "reaped": reap, "measured": len(ms), "discarded": bad,
            "p50_ms": statistics.median(ms) if ms else None,
            "max_ms": max(ms) if ms else None, "samples_ms": ms}


def main():
    p = argparse.ArgumentParser(description="Wake-up and takeover times of Vela's get_or_fetch.")
    p.add_argument("--rounds", type=int, default=200, help="wake-up rounds (default 200)")
    p.add_argument("--kills", type=int, default=20, help="takeover rounds (default 20)")
    p.add_argument("--quick", action="store_true", help="50 wake-up rounds, 5 kills")
    p.add_argument("--json", metavar="PATH", default="bench-results-stampede.json",
                   help="where to write the results (default ./bench-results-stampede.json)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.kills = 50, 5
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    cache = vela.Cache(f"bench-stampede-{os.getpid()}-{secrets.token_hex(3)}", capacity="16MiB",
                       stampede_timeout=10.0)  # far above any takeover: a timeout is never the cause
    try:
        wake = wakeup(cache, args.rounds)
        take = takeover(cache, args.kills)
        zombie = takeover(cache, args.kills, reap=False)
    finally:
        cache.destroy()
    print(f"Vela {vela.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"wake-up of a waiter in another process after fetch_complete "
          f"({wake['measured']} of {wake['rounds']} rounds measured):")
    if wake["measured"]:
        print(f"  p50 {wake['p50_us']:.1f} us   p99 {wake['p99_us']:.1f} us   max {wake['max_us']:.1f} us")
    for result, how in ((take, "reaped at once"), (zombie, "left unreaped, a zombie")):
        print(f"takeover after SIGKILL of the lease holder ({how}), kill to the waiter's own fetch "
              f"({result['measured']} of {result['rounds']} rounds measured):")
        if result["measured"]:
            print(f"  p50 {result['p50_ms']:.2f} ms   max {result['max_ms']:.2f} ms")
    with open(args.json, "w") as f:
        json.dump({"vela": vela.__version__, "wakeup": wake, "takeover": take,
                   "takeover_unreaped": zombie}, f, indent=1)
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
