"""What a history and the hosts' final reads say about the cache.

The model is a register per key whose writers are ``put``, ``delete`` and ``incr``
on that key, ``invalidate_tag`` (only for values written with that tag) and
``flush``. An operation *supersedes* an earlier one when it was acknowledged
(``ok``) and started after the earlier one ended: whatever order the cluster picks
for concurrent operations, it must keep that real-time order. An operation that no
acknowledged one supersedes is a *candidate* for the key's final state.

Outcomes other than ``ok`` are indeterminate: ``info`` (timed out, unknown) may or
may not have taken effect, and so may ``fail``, because Vela's errors do not promise
that nothing was applied (a write can land in the local table before the bridge
refuses it). Neither ever supersedes anything, and both stay candidates.

Anomalies, counted in keys unless said otherwise:

- lost acknowledged write: a final read that no candidate explains and that an
  acknowledged write superseded (or an absent key whose candidates hold a write);
- resurrected delete: a final read of a value an acknowledged delete superseded,
  with no later write that explains it;
- invalidation not respected: the same for an acknowledged ``invalidate_tag`` of one
  of the value's tags, or a ``flush``;
- stale read (reads, not keys): a read on a healthy host that started after an
  acknowledged delete, tag invalidation or flush had completed, returning a value
  that one superseded. A delete counts on every host when ``delete_scope`` is
  "cluster" (partitioned: the owner answers every read), on its own host only when
  "host" (replicated deletes travel asynchronously; near-cache copies of a deleted
  key are dropped asynchronously). A host is unhealthy while a fault touches it and
  for ``grace`` seconds after;
- convergence: hosts that read different values for a key;
- calls over the timeout (calls): a call that took longer than ``timeout`` + 0.5 s;
- last-writer-wins ties (``ties``, keys; not an anomaly): a final read that is
  unexplained only because an op started less than ``tie`` seconds (1 ms) after the
  op it supersedes ended: versions that count milliseconds may order them either
  way (a tie is broken by node id).

Counters (keys ``c*``, only ``incr`` and ``flush``), with ``counters="sum"`` (an
owner increments: partitioned): the final value is at least the acknowledged
increments that started after every flush ended (fewer: lost writes) and at most the
increments not superseded by a flush (more: ``over_counted``). With
``counters="register"`` (replicated: a host increments its own copy and the newest
version wins, so concurrent increments on two hosts keep one) an ``incr`` is a write
of the value it returned, checked as a register (an ``incr`` of unknown outcome may
have written any value).
"""
import math
from collections import defaultdict

LATENCY_SLACK = 0.5
REMOVERS = ("delete", "invalidate_tag", "flush")


class Result:
    COLUMNS = ("lost", "resurrected", "invalidations", "stale_reads", "diverging", "over_timeout")

    def __init__(self):
        self.examples = defaultdict(list)
        self.keys = defaultdict(set)
        self.counts = defaultdict(int)
        self.notes = []
        self.extra = {}

    def key_anomaly(self, kind, key, detail):
        if key not in self.keys[kind]:
            self.keys[kind].add(key)
            self.counts[kind] += 1
            if len(self.examples[kind]) < 5:
                self.examples[kind].append(detail)

    def event(self, kind, detail):
        self.counts[kind] += 1
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(detail)

    def __getitem__(self, kind):
        return self.counts.get(kind, 0)

    @property
    def converged(self):
        return self["diverging"] == 0

    def clean(self):
        return all(self[c] == 0 for c in self.COLUMNS) and self["over_counted"] == 0

    def as_dict(self):
        return {"counts": dict(self.counts), "examples": dict(self.examples), "notes": self.notes,
                "extra": self.extra}


def _supersedes(o, c):
    """Whether the acknowledged op ``o`` must come after ``c`` and overrides it."""
    if o["type"] != "ok" or not o["t0"] > c["t1"]:
        return False
    if o["f"] == "invalidate_tag":
        return c["f"] == "put" and o["tag"] in c["tags"]
    return True


class _Index:
    """The history by key, tag and value, for the questions the checks ask."""

    def __init__(self, ops):
        self.by_key = defaultdict(list)
        self.flushes, self.invalidations = [], defaultdict(list)
        self.put_of = {}
        self.faults = []
        self.calls = []
        self.last_ok = defaultdict(lambda: -math.inf)  # latest start of an acknowledged op, by (what, key)
        for o in ops:
            if o["f"] == "fault":
                self.faults.append(o)
                continue
            self.calls.append(o)
            if o["type"] == "ok":
                what = {"put": "write", "incr": "write"}.get(o["f"], o["f"])
                scope = o.get("tag") if o["f"] == "invalidate_tag" else None if o["f"] == "flush" else o["k"]
                self.last_ok[(what, scope)] = max(self.last_ok[(what, scope)], o["t0"])
            if o["f"] in ("put", "delete", "incr"):
                self.by_key[o["k"]].append(o)
                if o["f"] == "put":
                    known = self.put_of.get((o["k"], o["v"]))
                    if known is None or known["t1"] < o["t1"]:
                        self.put_of[(o["k"], o["v"])] = o
            elif o["f"] == "flush":
                self.flushes.append(o)
            elif o["f"] == "invalidate_tag":
                self.invalidations[o["tag"]].append(o)

    def affecting(self, key):
        """Every op that can change ``key``: its own, flushes, invalidations of its tags."""
        own = self.by_key.get(key, [])
        tags = {t for o in own if o["f"] == "put" for t in o["tags"]}
        return own + self.flushes + [i for t in tags for i in self.invalidations[t]]

    def overriders(self, c, slack=0.0):
        """The kinds of acknowledged ops that started after ``c`` ended (by more than
        ``slack``) and override it: a subset of write, delete, flush, invalidate_tag."""
        k, end = c["k"], c["t1"] + slack
        kinds = {what for what in ("write", "delete") if self.last_ok[(what, k)] > end}
        if self.last_ok[("flush", None)] > end:
            kinds.add("flush")
        if c["f"] == "put" and any(self.last_ok[("invalidate_tag", t)] > end for t in c["tags"]):
            kinds.add("invalidate_tag")
        return kinds


def check(ops, reads, timeout, grace=5.0, delete_scope="host", counters="sum", tie=0.001):
    """The anomalies of a history ``ops`` (``history.load``) with the final ``reads``
    ({host: {key: value}}; None for a host that could not be read)."""
    result = Result()
    if counters == "register":
        ops = [dict(o, f="put", tags=[]) if o["f"] == "incr" else o for o in ops]
    index = _Index(ops)
    _check_final(index, reads, result, counters, tie)
    _check_stale_reads(index, result, grace, delete_scope, tie)
    for key in diverging_keys(reads):
        result.key_anomaly("diverging", key, {"key": key, "reads": {h: (r or {}).get(key, "unreadable")
                                                                     for h, r in reads.items()}})
    for o in index.calls:
        if math.isfinite(o["t1"]) and o["t1"] - o["t0"] > timeout + LATENCY_SLACK:
            result.event("over_timeout", {"op": o["f"], "host": o["host"], "seconds": round(o["t1"] - o["t0"], 2),
                                          "type": o["type"], "err": o["err"]})
    return result


def diverging_keys(reads):
    """Keys the hosts read differently (every key, when a host could not be read)."""
    hosts = list(reads.values())
    if not hosts:
        return []
    if any(r is None for r in hosts):
        return sorted({k for r in hosts if r for k in r}) or ["(no host could be read)"]
    keys = sorted(set().union(*hosts))
    return [k for k in keys if any(r.get(k) != hosts[0].get(k) or isinstance(r.get(k), dict) for r in hosts)]


def _check_final(index, reads, result, counters, tie):
    for host, values in reads.items():
        for key, value in (values or {}).items():
            if isinstance(value, dict):
                continue  # unreadable: counted as not converged
            if key.startswith("c") and counters == "sum":
                _check_counter(index, host, key, value, result)
            else:
                _check_register(index, host, key, value, result, tie)


def _explained(index, ops, key, value, slack):
    """Whether some op not overridden (by more than ``slack``) leaves ``value``."""
    candidates = [o for o in ops if not index.overriders(dict(o, k=key), slack)]
    if value is None:
        initial_possible = not any(o["f"] in ("put", "delete", "incr", "flush") and o["type"] == "ok"
                                   for o in ops)
        return (any(o["f"] in REMOVERS for o in candidates)
                or (initial_possible and not any(o["f"] == "put" and o["type"] == "ok" for o in candidates)))
    return any(c["f"] == "put" and c["v"] in (value, None) for c in candidates)  # None: an incr of unknown outcome


def _check_register(index, host, key, value, result, tie):
    ops = index.affecting(key)
    if _explained(index, ops, key, value, 0.0):
        return
    detail = {"key": key, "host": host, "read": value}
    if _explained(index, ops, key, value, tie):
        result.key_anomaly("ties", key, detail)
        return
    if value is None:
        candidates = [o for o in ops if o["f"] == "put" and not index.overriders(dict(o, k=key))]
        last = max(candidates, key=lambda o: o["t1"], default=None)
        result.key_anomaly("lost", key, dict(detail, last_acknowledged=last and last["v"]))
        return
    put = index.put_of.get((key, value))
    if put is None:
        result.key_anomaly("lost", key, dict(detail, why="a value nobody wrote"))
        return
    kinds = index.overriders(put)
    kind = "lost" if "write" in kinds else "resurrected" if "delete" in kinds else "invalidations"
    result.key_anomaly(kind, key, dict(detail, written_at=put["t0"], ended_at=put["t1"], superseded_by=sorted(kinds)))


def _check_counter(index, host, key, value, result):
    incrs = [o for o in index.by_key.get(key, []) if o["f"] == "incr"]
    last_flush_end = max((f["t1"] for f in index.flushes), default=-math.inf)
    lower = sum(1 for o in incrs if o["type"] == "ok" and o["t0"] > last_flush_end)
    upper = sum(1 for o in incrs if o["t1"] >= index.last_ok[("flush", None)])
    got = value or 0
    if not isinstance(got, int) or got < lower:
        result.key_anomaly("lost", key, {"key": key, "host": host, "read": value, "at_least": lower})
    elif got > upper:
        result.key_anomaly("over_counted", key, {"key": key, "host": host, "read": value, "at_most": upper})


def _unhealthy(index, grace):
    spans = defaultdict(list)
    for fault in index.faults:
        for host in fault["hosts"]:
            spans[host].append((fault["t0"], fault["t1"] + grace))
    return spans


def _healthy(spans, host, t0, t1):
    return not any(a <= t1 and t0 <= b for a, b in spans.get(host, ()))


def _check_stale_reads(index, result, grace, delete_scope, tie):
    spans = _unhealthy(index, grace)
    for r in index.calls:
        if r["f"] != "get" or r["type"] != "ok" or r["v"] is None or r["k"].startswith("c"):
            continue
        put = index.put_of.get((r["k"], r["v"]))
        if put is None:
            continue
        for d in _removers_of(index, put):
            if not (_supersedes(d, put) and d["t1"] < r["t0"]):
                continue
            if d["t0"] <= put["t1"] + tie:
                continue  # the two may have the same version time: either order is right
            if d["f"] == "delete" and delete_scope == "host" and d["host"] != r["host"]:
                continue
            if not _healthy(spans, r["host"], d["t0"], r["t1"]):
                continue
            result.event("stale_reads", {"key": r["k"], "host": r["host"], "read": r["v"], "by": d["f"],
                                         "tag": d.get("tag"), "after": round(r["t0"] - d["t1"], 3)})
            break


def _removers_of(index, put):
    own = [o for o in index.by_key.get(put["k"], []) if o["f"] == "delete"]
    return own + index.flushes + [i for t in put["tags"] for i in index.invalidations[t]]
