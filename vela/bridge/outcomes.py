"""The outcomes of recent changes that must not be made twice, by request id.

An incr, add, replace or cas is not idempotent: made twice, a counter counts twice.
A worker whose request got no answer (the owner's bridge died after making the
change, or the connection broke) cannot tell whether it was made, and asks again
with the same request id (``rid``), at whichever member owns the partition by then.
The owner remembers each change's outcome by its request id and sends it along
with the change: in the backup record (so a backup promoted in the owner's place
knows it) and in handoff and backup streams (so a new owner or a fresh backup does).
The member that answers the second try answers what the first one did.

An outcome is remembered for OUTCOME_TTL seconds, far past any call's timeout (the
longest a worker keeps asking), and at most MAX_OUTCOMES of them. A bridge process
remembers only what it made or was sent since it started: asked again for a change
first sent before that (``again``: how long ago, by the worker's clock) and not
known, it cannot tell whether its previous incarnation made it (a bridge restarted
at once, before anyone took its partitions, keeps their entries in the host's
table), and says the outcome is unknown rather than make it a second time.
"""
import time
from collections import OrderedDict

# The request ops not to be made twice, with the names of the methods that send them.
ONCE = {"incr": "incr", "add": "add", "repl": "replace", "cas": "cas"}
OUTCOME_TTL = 120.0
MAX_OUTCOMES = 100_000
AGAIN_MARGIN = 0.5  # seconds: a request's trip, for "sent before this process started"


class Outcomes:
    def __init__(self, ttl=OUTCOME_TTL, limit=MAX_OUTCOMES):
        self.ttl = ttl
        self.limit = limit
        self._by_rid = OrderedDict()  # rid -> (partition, result, monotonic expiry), oldest first
        self.since = time.monotonic()  # every outcome made or sent here since then is known

    def __len__(self):
        return len(self._by_rid)

    def remember(self, rid, p, result):
        now = time.monotonic()
        self._by_rid.pop(rid, None)
        self._by_rid[rid] = (p, result, now + self.ttl)
        by_rid = self._by_rid
        while by_rid and (len(by_rid) > self.limit or next(iter(by_rid.values()))[2] < now):
            by_rid.popitem(last=False)

    def result(self, rid, p):
        """The outcome of request ``rid`` about partition ``p``, or None (not made here)."""
        known = self._by_rid.get(rid)
        if known is None or known[0] != p or known[2] < time.monotonic():
            return None
        return known[1]

    def unknown(self, again):
        """Whether a request first sent ``again`` seconds ago (and not known here) may have
        been made before this member remembered outcomes."""
        return time.monotonic() - again - AGAIN_MARGIN < self.since

    def of(self, ps):
        """[[rid, partition, result]] of the partitions ``ps`` (for a stream of them)."""
        now = time.monotonic()
        return [[rid, p, result] for rid, (p, result, expiry) in self._by_rid.items()
                if p in ps and expiry >= now]

    def take(self, triples, ps):
        """Outcomes a stream of partitions ``ps`` brought (the others are not ours to keep)."""
        for rid, p, result in triples:
            if p in ps:
                self.remember(rid, p, result)
