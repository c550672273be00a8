"""Crash soak: SIGKILL writers of one cache at random instants, many times over.

    python tools/crash_soak.py                      # 1,000 kills (a few minutes on 2 cores)
    python tools/crash_soak.py --kills 5000 --seed 7

Writers put, overwrite, delete, tag, expire and invalidate self-checking values (key,
sequence number and a digest of all of it) over a pool of keys; some of them are
killed while stopped at a stall point inside a put (in the heap, between build and
publish, inside the free of the old entry, in the stripe's arena: taking a spare block,
keeping the replaced one, refilling), the others at whatever instruction they are at. Readers verify every value they get, all the while, and a baseline written
before the first kill must never change. Afterwards one process checks the table
(`check()` must return []), reads every key, writes every key again and checks again.

Prints one line `kills=N stall_kills=N lock_recoveries=N reads=N torn=0 problems=0`
and exits 0 when nothing was wrong, 1 otherwise (with what was wrong). The crash tests
run the same soak, shorter (tests/test_crash.py).
"""
import argparse
import hashlib
import multiprocessing
import os
import random
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vela  # noqa: E402

FORK = multiprocessing.get_context("fork")
HEADER = struct.Struct("<4sHQI")  # magic, key length, sequence, payload length
MAGIC = b"VELA"
DIGEST = 8
POOL = 2000
STALL_KEYS = 50  # the pool's last keys: written only by the stalled puts, one at a time, so
                 # that what a stall point needs (an old entry of a given size) stays there
STALL_PHASES = (1, 2, 3, 4, 5, 6, 7, 8)  # the stall points of a put (native/table.c, heap.c, arena.c)
ARENA_PHASES = (6, 7, 8)  # in the stripe's arena: a small entry (a block an arena keeps)
SMALL, LARGE = 300, 2000  # value bytes of a stalled put: served by the arena / by the heap


def make_value(key, seq, size):
    kb = key.encode()
    payload = (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]
    body = HEADER.pack(MAGIC, len(kb), seq, size) + kb + payload
    return body + hashlib.blake2b(body, digest_size=DIGEST).digest()


def is_valid(key, value):
    """True when value is a whole value written by make_value for this key."""
    if type(value) is not bytes or len(value) < HEADER.size + DIGEST:
        return False
    body, digest = value[:-DIGEST], value[-DIGEST:]
    if hashlib.blake2b(body, digest_size=DIGEST).digest() != digest:
        return False
    magic, klen, seq, size = HEADER.unpack_from(body)
    kb = key.encode()
    return (magic == MAGIC and klen == len(kb) and len(body) == HEADER.size + klen + size
            and body[HEADER.size:HEADER.size + klen] == kb
            and body[HEADER.size + klen:] == (seq.to_bytes(8, "little") * (size // 8 + 1))[:size])


def writer(name, seed):
    rng = random.Random(seed)
    c = vela.Cache(name, sweep_interval=None)
    seq = seed * 1_000_000_000
    while True:
        seq += 1
        key = f"k:{rng.randrange(POOL - STALL_KEYS)}"
        value = make_value(key, seq, rng.randint(30, 8000))
        r = rng.random()
        if r < 0.08:
            c.delete(key)
        elif r < 0.12:
            c.put(key, value, tags=["w", f"w{seq % 7}"])
        elif r < 0.14:
            c.put(key, value, ttl=0.3)
        elif r < 0.15:
            c.touch(key, ttl=60)
        elif r < 0.1505:
            c.invalidate_tag(f"w{seq % 7}")
        else:
            c.put(key, value)


def staller(name, phase, key, value, ready):
    c = vela.Cache(name, sweep_interval=None)
    if phase == 5:  # inside the free of the entry the put replaces (too large for the arena)
        c.put(key, make_value(key, 1, 1500))
    elif phase in (6, 7):  # a replacing put of the stalled size: the arena keeps a block that fits
        c.put(key, make_value(key, 1, SMALL))
        c.put(key, make_value(key, 2, SMALL))
    ready.send(os.getpid())
    c._table.debug_stall(phase, key, value)  # never returns: stops holding its locks


def reader(name, seed, baseline, stop, out):
    rng = random.Random(seed)
    base_keys = list(baseline)
    c = vela.Cache(name, sweep_interval=None)
    reads = torn = base_bad = 0
    examples = []
    while not stop.is_set():
        for _ in range(100):
            if rng.random() < 0.3:
                key = rng.choice(base_keys)
                if c.get(key) != baseline[key]:
                    base_bad += 1
                    examples.append(key)
            else:
                key = f"k:{rng.randrange(POOL)}"
                v = c.get(key)
                if v is not None and not is_valid(key, v):
                    torn += 1
                    examples.append(key)
            reads += 1
    out.send(dict(reads=reads, torn=torn, base_bad=base_bad, examples=examples[:10]))


def verify(name, baseline):
    """Everything one process finds after the last kill: a list of problems."""
    c = vela.Cache(name, sweep_interval=None)
    found = [f"check: {p}" for p in c.check()]
    found += [f"baseline {k} changed" for k, v in baseline.items() if c.get(k) != v]
    for n in range(POOL):
        key = f"k:{n}"
        v = c.get(key)
        if v is not None and not is_valid(key, v):
            found.append(f"{key} torn")
        value = make_value(key, 10 ** 15 + n, 100 + n)
        c.put(key, value)
        if c.get(key) != value:
            found.append(f"{key} cannot be written again")
    found += [f"check after rewriting: {p}" for p in c.check()]
    if c.size() != len(baseline) + POOL:
        found.append(f"size {c.size()}, expected {len(baseline) + POOL}")
    recoveries = c.stats()["lock_recoveries"]
    c.close()
    return found, recoveries


def kill(proc):
    """SIGKILL proc (if it still runs), reap it and release what the handle holds."""
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    if proc.exitcode is not None:
        proc.close()


def stall_and_kill(name, phase, key, value):
    """Start a put that stops at `phase` holding its locks, and SIGKILL it there.
    False when it did not reach the stall point (then it was killed anyway)."""
    ready_r, ready_w = FORK.Pipe(duplex=False)
    p = FORK.Process(target=staller, args=(name, phase, key, value, ready_w), daemon=True)
    p.start()
    ready_w.close()
    ok = ready_r.poll(20)
    if ok:
        ready_r.recv()
        time.sleep(0.05)  # from the handshake into debug_stall's pause
        ok = p.is_alive()
    kill(p)
    ready_r.close()
    return ok


def soak(name, kills, seed, writers=3, readers=2, stall_every=10, log=print):
    """Run the soak on a new cache `name`; returns (summary dict, problems list)."""
    rng = random.Random(seed)
    baseline = {f"base:{i}": make_value(f"base:{i}", i, rng.randint(20, 4000)) for i in range(300)}
    with vela.Cache(name, capacity="64MiB", sweep_interval=None) as c:
        for k, v in baseline.items():
            c.put(k, v)
    stop = FORK.Event()
    pipes, procs = [], []
    for i in range(readers):
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=reader, args=(name, seed * 100 + i, baseline, stop, w), daemon=True)
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    ws = [FORK.Process(target=writer, args=(name, seed * 1000 + i), daemon=True) for i in range(writers)]
    for w in ws:
        w.start()
    problems = []
    done = stall_kills = 0
    next_seed = seed * 1000 + writers
    started = time.monotonic()
    try:
        while done < kills:
            if stall_every and done % stall_every == stall_every - 1:
                phase = STALL_PHASES[stall_kills % len(STALL_PHASES)]
                key = f"k:{POOL - STALL_KEYS + rng.randrange(STALL_KEYS)}"
                size = SMALL if phase in ARENA_PHASES else LARGE
                if not stall_and_kill(name, phase, key, make_value(key, 10 ** 14 + done, size)):
                    problems.append(f"a put did not reach stall point {phase}")
                stall_kills += 1
            else:
                time.sleep(rng.uniform(0.002, 0.02))
                i = rng.randrange(writers)
                if ws[i].exitcode not in (None, -signal.SIGKILL):
                    problems.append(f"a writer exited with {ws[i].exitcode} before its kill")
                kill(ws[i])
                ws[i] = FORK.Process(target=writer, args=(name, next_seed), daemon=True)
                ws[i].start()
                next_seed += 1
            done += 1
            if done % 250 == 0:
                log(f"  {done} kills, {time.monotonic() - started:.0f} s")
    finally:
        for w in ws:
            kill(w)
        stop.set()
    results = []
    for r, p in zip(pipes, procs):
        if r.poll(60):
            results.append(r.recv())
        else:
            problems.append("a reader did not report")
        r.close()
        kill(p)
    for res in results:
        if res["torn"] or res["base_bad"]:
            problems.append(f"a reader saw {res['torn']} torn values and {res['base_bad']} changed "
                            f"baseline values: {res['examples']}")
    found, recoveries = verify(name, baseline)
    problems += found
    summary = dict(kills=done, stall_kills=stall_kills, lock_recoveries=recoveries,
                   reads=sum(r["reads"] for r in results), torn=sum(r["torn"] for r in results),
                   problems=len(problems), seconds=round(time.monotonic() - started))
    return summary, problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=1000, help="SIGKILLs in all (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--stall-every", type=int, default=10,
                    help="every Nth kill is made at a stall point inside a put (0: never)")
    args = ap.parse_args(argv)
    name = f"soak{os.getpid()}"
    try:
        summary, problems = soak(name, args.kills, args.seed, args.writers, args.readers, args.stall_every)
    finally:
        try:
            vela.Cache(name, sweep_interval=None).destroy()
        except vela.VelaError:
            pass
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    for p in problems[:50]:
        print("problem:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
