"""Operation records, one JSON object a line, the way Jepsen keeps a history.

A process writes an ``invoke`` record before it calls the cache and a completion
record after (``ok``, ``fail`` with the exception's type, or ``info`` when the
outcome is unknown: a timeout, an unreachable bridge). A process killed in the middle
of a call leaves an invoke without completion: that call becomes ``info`` (it may or
may not have taken effect). Times are ``time.monotonic()``, one clock for every
process of the machine (a host whose wall clock is skewed keeps the true monotonic
clock, see ``clock``).

Fields of an operation: ``p`` process, ``host`` its host's label, ``f`` (put, get,
delete, incr, invalidate_tag, flush), ``k`` key, ``v`` value written or read (None:
absent), ``tags``, ``tag`` (invalidate_tag), ``t0``/``t1`` start and end, ``type``,
``err`` the exception type. The nemesis writes ``f`` = ``fault`` records with the
hosts it hurts and the interval (``t0``/``t1``).
"""
import glob
import json
import math
import os

COMPLETIONS = ("ok", "fail", "info")


class Recorder:
    """Appends one process's records to its own file (no locking between processes)."""

    def __init__(self, path, process, host):
        self.file = open(path, "a", buffering=1)
        self.process, self.host = process, host
        self.seq = 0

    def invoke(self, f, t0, **fields):
        self.seq += 1
        self.write(dict(fields, type="invoke", p=self.process, host=self.host, f=f, n=self.seq, t0=t0))
        return self.seq

    def complete(self, n, kind, t1, **fields):
        assert kind in COMPLETIONS, kind
        self.write(dict(fields, type=kind, p=self.process, n=n, t1=t1))

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")

    def close(self):
        self.file.close()


def op(f, k=None, v=None, t0=0.0, t1=0.0, type="ok", p="p", host="A", tags=(), tag=None, err=None):
    """One completed operation, as ``load`` returns them (hand-written histories use it)."""
    return {"f": f, "k": k, "v": v, "t0": t0, "t1": t1, "type": type, "p": p, "host": host,
            "tags": list(tags), "tag": tag, "err": err}


def pair(records):
    """Completed operations from invoke/completion records; an invoke never completed
    is ``info`` with an end at infinity."""
    open_ops, done = {}, []
    for rec in records:
        if rec.get("f") == "fault":
            done.append(rec)
            continue
        ident = (rec["p"], rec["n"])
        if rec["type"] == "invoke":
            open_ops[ident] = rec
            continue
        start = open_ops.pop(ident, None)
        if start is None:
            continue
        merged = dict(start, **{k: v for k, v in rec.items() if k not in ("f", "host")})
        done.append(op(merged["f"], merged.get("k"), merged.get("v"), merged["t0"], merged["t1"], merged["type"],
                       merged["p"], merged["host"], merged.get("tags") or (), merged.get("tag"), merged.get("err")))
    for start in open_ops.values():
        done.append(op(start["f"], start.get("k"), start.get("v"), start["t0"], math.inf, "info", start["p"],
                       start["host"], start.get("tags") or (), start.get("tag"), "unfinished"))
    return done


def load(directory):
    """Every operation recorded in ``directory`` (all ``*.jsonl`` files)."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        pass  # the last line of a process killed while writing it
    return pair(records)


def merge(directory, out):
    """All operations of a run in one JSONL file, by start time (kept for debugging)."""
    ops = sorted(load(directory), key=lambda o: o["t0"])
    with open(out, "w") as f:
        for o in ops:
            f.write(json.dumps(o, default=str) + "\n")
    return out
