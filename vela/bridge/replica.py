"""One replicated cache as the bridge sees it: the local change log going out,
other hosts' changes coming in, snapshots both ways.

Convergence rests on versions (hybrid logical clocks, last writer wins) rather
than on delivery order: a change may arrive late, twice, or inside a snapshot
that races the stream, and every host still ends with the same contents. What
must also stop an older put that arrives late is kept here, for
``tombstone_ttl`` seconds: a tombstone per deleted key, the newest flush, the
newest invalidation per tag. After that, a put older than a delete could come
back only if it had been delayed longer than ``tombstone_ttl``.
"""

import logging
import os
import time
from collections import OrderedDict

from ..errors import VelaError

from ..stores.replicated import marks_path, take_marks
from .protocol import DELETE, FLUSH, PUT, TAG

log = logging.getLogger("vela.bridge")

SNAPSHOT_CHUNK = 2000
LOG_BATCH = 5000


class Replica:
    def __init__(self, name, table, tombstone_ttl=300.0):
        self.name = name
        self.table = table
        self.tombstone_ttl = tombstone_ttl
        state = table.log_state()
        if not state["replicated"]:
            raise ValueError(f"cache {name!r} is not replicated: open it with topology='replicated'")
        self.marks_path = marks_path(name)      # flushes/tag invalidations workers kept
        self.pos = state["bridge_pos"]          # resume where the last bridge stopped
        self.dropped = state["dropped"]
        self.seq = 0                            # batches sent by this incarnation
        self.tombs = {}                         # key bytes -> (version, deadline)
        self.tag_marks = {}                     # tag id -> (version, deadline)
        self.flush_mark = 0                     # newest flush version seen
        self.expect = {}                        # (origin, incarnation) -> next batch seq
        self.snap_wait = {}                     # origin node -> [request id, last asked, started]
        self.synced = set()                     # (node, incarnation) we asked for a snapshot
        self.snap_again = set()                 # origins to ask again when theirs is done
        self.serving = []                       # snapshot streams in progress
        # Entries each flush / tag invalidation removed here, whichever way it came
        # first (the stream or the caller's request for a count): counts stay exact.
        self.removed_by = OrderedDict()
        self.stats = {"sent": 0, "applied": 0, "stale": 0, "suppressed": 0, "failed": 0, "resyncs": 0,
                      "snapshots_served": 0, "snapshots_applied": 0}

    def member_restarted(self, node_id):
        """A member came back as a new incarnation: what was in flight with the old
        one (a snapshot it was sending us or we it, its stream's numbers) is void.
        The caller asks the new one for a snapshot at once."""
        self.snap_wait.pop(node_id, None)
        self.snap_again.discard(node_id)
        self.serving = [s for s in self.serving if s[0].node_id != node_id]
        self.synced = {s for s in self.synced if s[0] != node_id}
        self.expect = {k: v for k, v in self.expect.items() if k[0] != node_id}

    # ---- what stops late older puts --------------------------------------------------

    def _mark_delete(self, key, version, now):
        old = self.tombs.get(key)
        if old is None or old[0] < version:
            self.tombs[key] = (version, now + self.tombstone_ttl)

    def _mark_tag(self, tag, version, now):
        old = self.tag_marks.get(tag)
        if old is None or old[0] < version:
            self.tag_marks[tag] = (version, now + self.tombstone_ttl)

    def suppressed(self, key, tags, version):
        if version < self.flush_mark:
            return True
        tomb = self.tombs.get(key)
        if tomb is not None and tomb[0] >= version:
            return True
        for tag in tags:
            mark = self.tag_marks.get(tag)
            if mark is not None and mark[0] >= version:
                return True
        return False

    def prune(self, now):
        self.tombs = {k: v for k, v in self.tombs.items() if v[1] > now}
        self.tag_marks = {k: v for k, v in self.tag_marks.items() if v[1] > now}

    # ---- outgoing: the local change log ------------------------------------------------

    def take_kept_marks(self):
        """The flushes and tag invalidations this host's workers kept (client.keep_mark):
        recorded, so snapshots carry them even when the change log lost their records
        (it wrapped while this bridge was stopped), and applied here again (a put from
        another host may have come in between; idempotent)."""
        try:
            if os.stat(self.marks_path).st_size == 0:  # (one look per loop turn)
                return
        except FileNotFoundError:
            return
        for op, tag, version in take_marks(self.marks_path):
            if op == FLUSH and 0 < version < 2**64:
                self.apply_rpc("flush", version)
            elif op == TAG and 0 < version < 2**64:
                self.apply_rpc("tag", version, tag)

    def read_local(self):
        """Records this host's workers wrote since the last call (may be [])."""
        records, pos, lapped = self.table.log_read(self.pos, LOG_BATCH)
        dropped = self.table.log_state()["dropped"]
        if lapped or dropped != self.dropped:
            # Changes were lost to us: peers must pull a snapshot of this host. A batch
            # number that no batch carries tells them, as a lost batch would: each sees
            # the gap in the next batch or heartbeat it gets from us, however long it is
            # unreachable now (a message saying so could be lost without a trace).
            self.seq += 1
            self.dropped = dropped
            self.pos = self.table.log_state()["head"]
            self.table.log_commit(self.pos)
            return []
        now = time.monotonic()
        out = []
        for op, key, value, codec, ttl, tags, version in records:
            if op == PUT and ttl == -1:
                continue  # expired before it could be sent
            if op != PUT:
                # A remote put older than this host's own flush or tag invalidation
                # may have been applied between the worker's change and this read:
                # apply it again (idempotent). A delete needs nothing more: its
                # tombstone in the table already beats older puts.
                self._remove(op, key, tags, version, now)
            out.append([op, key, value, codec, ttl, list(tags), version])
        self.pos = pos
        return out

    def commit(self):
        self.table.log_commit(self.pos)

    # ---- incoming ------------------------------------------------------------------

    def check_sequence(self, origin, inc, seq, batch=True):
        """True when batch `seq` does not follow the last one seen from (origin, inc):
        first contact, a restart (new incarnation) or a gap; the caller resyncs.
        With batch=False, `seq` is the origin's last batch as its heartbeat says:
        True when we have not seen it."""
        key = (origin, inc)
        expected = self.expect.get(key)
        if not batch:
            if expected is not None and expected > seq:
                return False  # up to date
            self.expect[key] = seq + 1
            for stale in [k for k in self.expect if k[0] == origin and k[1] != inc]:
                del self.expect[stale]
            return True
        self.expect[key] = seq + 1
        for stale in [k for k in self.expect if k[0] == origin and k[1] != inc]:
            del self.expect[stale]
        return expected != seq

    def apply(self, records):
        for record in records:
            try:
                self._apply_one(record, time.monotonic())
            except (VelaError, ValueError, TypeError, OverflowError) as exc:
                # e.g. an entry larger than this host's max_entry_size, or a full
                # ttl_only table: this host cannot hold it; the others still can.
                self.stats["failed"] += 1
                log.warning("cache %s: could not apply a change: %s", self.name, exc)

    def _apply_one(self, record, now):
        op, key, value, codec, ttl, tags, version = record
        if op == PUT:
            if ttl == -1 or self.suppressed(key, tags, version):
                # It existed and is gone (invalidated, flushed, expired): what this host
                # holds of the key from before it goes too, as the put would have replaced it.
                self.table.apply_delete(key, version)
                self.stats["suppressed"] += 1
            elif self.table.apply_put(key, value, codec, ttl, tags, version):
                self.stats["applied"] += 1
            else:
                self.stats["stale"] += 1
            return
        self._remove(op, key, tags, version, now)
        if op == DELETE:
            self.table.apply_delete(key, version)
        self.stats["applied"] += 1

    def _remove(self, op, key, tags, version, now):
        """Record what a delete, flush or tag invalidation must stop, and apply
        flushes and tag invalidations (a delete's table part is the caller's)."""
        if op == DELETE:
            self._mark_delete(key, version, now)
        elif op == FLUSH:
            self.apply_rpc("flush", version)
        elif op == TAG:
            self.apply_rpc("tag", version, tags[0])

    def apply_rpc(self, op, version, tag=None):
        """Apply a flush or tag invalidation (again: it is idempotent); returns how
        many live entries it removed on this host in all, however often it came."""
        if op == "flush":
            self.flush_mark = max(self.flush_mark, version)
            removed = self.table.apply_flush(version)
        else:
            self._mark_tag(tag, version, time.monotonic())
            removed = self.table.apply_tag(tag, version)
        key = (op, tag, version)
        total = self.removed_by.pop(key, 0) + removed
        self.removed_by[key] = total
        while len(self.removed_by) > 10000:
            self.removed_by.popitem(last=False)
        return total

    # ---- snapshots -----------------------------------------------------------------

    def snapshot_stream(self):
        """Chunks of this host's table, then its tombstones and marks."""
        cursor = 0
        while cursor is not None:
            cursor, items = self.table.scan(cursor, SNAPSHOT_CHUNK)
            entries = [[k, v, codec, ttl, list(tags), ver] for k, v, codec, ttl, tags, ver in items if ttl != -1]
            yield {"entries": entries, "last": False}
        yield {"entries": [], "last": True,
               "tombs": [[k, v[0]] for k, v in self.tombs.items()],
               "tagwm": [[t, v[0]] for t, v in self.tag_marks.items()],
               "flushwm": self.flush_mark}

    def apply_snapshot_chunk(self, msg):
        now = time.monotonic()
        if msg["last"]:
            if msg["flushwm"]:
                self.apply_rpc("flush", msg["flushwm"])
            for key, version in msg["tombs"]:
                self._mark_delete(key, version, now)
                self.table.apply_delete(key, version)
            for tag, version in msg["tagwm"]:
                self.apply_rpc("tag", version, tag)
        self.apply([[PUT] + e for e in msg["entries"]])

    @property
    def ready(self):
        return not self.snap_wait
