"""One partitioned cache as its host's bridge serves it.

The owner's host makes every write to a key. Workers of that host write a
partition it owns in place (``Table.put_routed``/``delete_routed``): the write
is made under the key's stripe lock only while the cluster view the worker
routed by is still the current one, and logged; the bridge reads the log
(``pump_local``) for the backup copies and near-cache invalidations. Every
other write -- from other hosts, for partitions in transit, get_or_fetch,
incr/touch/add/replace/cas -- is made by the owner's bridge. A handoff starts only after the
bridge has published the table that no longer names this host the owner, and
copies stripe by stripe under the same locks, so a write made in place is in
the copy or was refused. A backup copy receives the owner's writes in the order
they were made (one ZeroMQ pipe), and a member that no longer owns a partition
refuses its requests with "moved".

The table of this host holds three kinds of entries, told apart by partition:
the partitions it owns, the backup copies of partitions whose backup it is
(``backups=1``), and, with the near cache, L1 copies of the others.

Ring changes (``set_ring``): for every partition whose owner changes, the old
owner streams it to the new one ("hand" messages, then an ack); meanwhile the
new owner serves the keys written or deleted since (the "touched" keys) and
tells readers of the others to read the old owner (fallback). When the old
owner is gone, its backup is promoted in place, or streams its copy to the new
owner when another member took the partition.

Versions and what wins when two copies meet (a handoff, a backup copy, the two
sides of a healed network split, a restarted member's table):

- Every write has a version from the segment's hybrid logical clock
  (native/log.c: wall-clock milliseconds, a counter, the node id). The clock
  observes every version the bridge applies (handoffs, backup records, tombstones,
  marks), so a write made after a copy arrived is newer than everything in it,
  whatever the wall clocks say. Only writes with no causal link (the two sides of
  a split) are ordered by the wall clocks of their hosts.
- A put is kept when its version is newer than the entry or tombstone held.
- A delete leaves a tombstone (codec 7, kept 300 s) with its version: an older put
  that arrives later is refused. Handoffs and backup records carry tombstones.
- ``invalidate_tag`` leaves a tag mark (tag, version) and ``flush`` a flush mark:
  entries with the tag (every entry, for a flush) older than the mark are dropped
  wherever the mark goes, and refused when they arrive later. Marks travel at the
  head of every handoff stream and are published in the segment's cluster view
  (a restarted bridge reads them back); they are kept 300 s, as tombstones.

A restarted bridge (or one whose loop stalled past the failure timeout) keeps the
segment's table: it reads the partition table it last published, keeps the
partitions it owned or backed up, streams what it owned and no longer owns to
the owner (merged by the rules above), drops only L1 copies, and resumes the
change log where its predecessor stopped (so writes workers made in place while
no bridge read the log still reach the backup). Partitions it owns settle for a
while: writes go through the bridge and win over what a former holder hands back.

Every stream is sequenced: a handoff message carries its stream id and chunk
number (a gap: the stream is not acknowledged, and is sent again whole); backup
records carry a sequence per (owner, incarnation, backup), repeated every
heartbeat; a backup that sees a gap, or hears from an owner incarnation it never
had a full copy from, asks for a full copy again ("brepair").

Anti-entropy catches what no sequence number reveals (a backup copy that differs
from its owner's partition however it came to): every ``DIGEST_EVERY`` heartbeats an
owner sends each backup a "digest" of the partitions it backs up that are quiet --
copied in full, no stream to it in flight, every backup record of the partition
acknowledged: per partition, the live entries and the sum of a hash of each one's
(key, version) (``Table.partition_digests``; tombstones do not count, nor entries
that expire within a margin: two digests, with ``DIGEST_MARGINS`` of 1 s and 2 s).
The backup compares them with its own. A partition differs when both digests do (an
entry that expires between the moments the two hosts compute crosses one margin, and
changes one digest); one that differs in two consecutive rounds (a write that raced
the first is in both copies by the second) is copied again: "brepair" naming the
partitions, answered by a "repair" stream that changes the copy in place -- the
owner's entries and tombstones are taken (over a newer version of ours too, unless
a record of the owner's wrote it), and at the stream's end the keys of those
partitions that neither the copy nor a record since its first chunk carried are
removed. The copy never lacks what the owner holds while it runs;
each repair is counted (``digest_repairs``) and logged with its partitions.
"""

import itertools
import json
import logging
import time

from .. import _native
from ..errors import CacheFull, LockTimeout, ValueTooLarge
from ..stores.near import Numbering, copy_tag
from ..ring import PARTITIONS, assign, partition_of
from .outcomes import ONCE, Outcomes
from .protocol import PUT

TOMBSTONE = _native.CODEC_TOMBSTONE  # the codec of a delete kept as a tombstone
MARK_TTL = 300.0        # seconds a tag or flush mark is kept (as long as a tombstone)
MARKS_PUBLISHED = 64    # newest marks written into the cluster view (its size is bounded)
MARKS_KEPT = 10_000     # marks remembered (and sent at the head of a stream) at most: the oldest go first

log = logging.getLogger("vela.bridge")

CHUNK = 2000            # entries per handoff message
LOG_BATCH = 5000        # change log records read per loop turn
RESEND = 2.0            # seconds without an ack before a stream is sent again from the start
WRITES = frozenset(("put", "add", "repl", "cas", "putm", "del", "delm", "incr", "touch", "tag", "flush"))
STREAM_STALL = 30.0     # seconds a stream may go unacknowledged, or an incoming partition unfed
INVAL_BATCH = 10_000    # keys per invalidation message
BREC_CHUNK = 2000       # backup records per message
DIGEST_EVERY = 10       # heartbeats between two anti-entropy rounds (a digest per backup)
DIGEST_MARGINS = (1.0, 2.0)  # seconds: two digests, of the entries that expire past each (or never)


class Stream:
    """A handoff in progress: the partitions ``ps`` of this table, to ``target``."""

    def __init__(self, sid, target, role, ps):
        self.sid = sid
        self.target = target
        self.role = role          # "own": the target becomes the owner; "backup": it keeps a copy
        self.ps = set(ps)
        self.cursor = 0           # table scan position; None once everything was sent
        self.chunk = 0            # number of the next message of the stream
        self.sent_at = self.started = time.monotonic()


class Incoming:
    """A partition this host owns now and whose entries are still on their way."""

    def __init__(self, source, wait=STREAM_STALL, settling=False):
        self.source = source      # node id the entries come from (None: nobody to read from)
        self.settling = settling  # a new table's guess: whoever hands the partition over completes it
        self.touched = set()      # keys written or deleted here since: theirs lose
        self.dead_tags = set()    # tags invalidated here since: entries with them are dropped
        self.flushed = False      # flushed here since: every incoming entry is dropped
        self.deadline = time.monotonic() + wait


class Repair:
    """A copy of partitions ``ps`` from their owner ``sender`` that corrects our backup
    copy in place (anti-entropy): keys it carries (``copied``) and keys the owner's
    backup records wrote since its first chunk (``recorded``) stay; at its end, the
    others of those partitions go (the owner no longer holds them)."""

    def __init__(self, sender, ps):
        self.sender = sender
        self.ps = ps
        self.copied = set()
        self.recorded = set()
        self.started = time.monotonic()


class Partitions:
    def __init__(self, name, cache, node, backups=0, parts=PARTITIONS, async_backups=False):
        self.name = name
        self.cache = cache
        self.table = cache._table
        self.node = node
        self.me = node.node_id
        self.backups = backups
        # Every write's reply waits until the backup holds it (workers write nothing in
        # place then): an owner killed a moment after a reply cannot leave the member that
        # takes its partitions over serving what the write replaced. async_backups: only
        # incr/add/cas wait; the backup follows within BATCH_DELAY (lost if killed before).
        self.sync_writes = bool(backups) and not async_backups
        self.parts = parts
        self.owners = None
        self.backup_of = [None] * parts
        self.ring_members = ()
        self.incoming = {}          # partition -> Incoming
        # on_routes(self, flags): called whenever the partitions whose gets may be answered
        # from the table change (servable); the bridge's native data port serves those.
        self.on_routes = None
        self.served_natively = 0    # gets the native data port answered, counted in stats
        self.outgoing = {}          # partition -> sid of the stream handing it to its new owner
        self.streams = []           # Stream objects being sent or awaiting their ack
        self.backup_synced = {}     # partition -> node that holds our full backup copy
        self.brecs = {}             # backup node -> records not sent yet
        self.invals = []            # keys changed, not published yet: L1 copies elsewhere drop
        self.inval_seq = 0          # invalidation messages sent (they are numbered from 1)
        self.numbering = Numbering()  # the invalidation messages received from each member
        self.outbound_at = 0.0      # when brecs/invals were last sent
        state = self.table.log_state()
        self.log_pos = state["bridge_pos"]  # the writes workers made in place: resume there
        self.log_dropped = state["dropped"]
        self.marks = {}             # tag -> (version, monotonic expiry): invalidate_tag marks
        self.flush_mark = 0         # version of the last flush seen: older entries are gone
        self.bseq = {}              # backup node -> seq of the last backup record message sent to it
        self.backup_acked = {}      # backup node -> the last seq it confirmed (every record before it too)
        self.wait = {}              # backup -> seq the reply to the request just served waits for
        self.bgot = {}              # (owner, incarnation) -> seq of the last backup records received
        self.repairs = set()        # owners to ask for a full backup copy again (a gap)
        self.hand_next = {}         # (sender, sid) -> next chunk number (-1: a gap, never acknowledged)
        self.taken_at = {}          # partition -> when a handoff of it to us last completed
        self.unsent = {}            # backup node -> partitions with records not sent to it yet
        self.rec_seq = {}           # backup node -> {partition: seq of the last record message carrying it}
        self.digest_at = time.monotonic()  # when the next anti-entropy round is due
        self.digest_round = 0       # rounds sent (numbered from 1)
        self.digest_misses = {}     # owner -> (incarnation, round, partitions that differed in it)
        self.repairing = {}         # (owner, sid) -> Repair: copies correcting ours in place
        self.prev = self._previous_view()
        self.leases = {}            # key -> (holder, deadline, connection): get_or_fetch in progress
        self.outcomes = Outcomes()  # request id -> what an incr/add/repl/cas made answered
        self.conn_id = None         # the data port connection of the request being served
        self.sids = itertools.count(1)
        self.lease_ttl = 30.0        # a holder alive but stuck; a dead one is seen at once (its connection)
        self.stats = {"requests": 0, "moved": 0, "fallbacks": 0, "handed_out": 0, "handed_in": 0,
                      "dropped": 0, "promoted": 0, "lost": 0, "backup_records": 0, "errors": 0,
                      "local_writes": 0, "log_lapped": 0, "repairs": 0, "stream_gaps": 0, "kept": 0,
                      "inval_gaps": 0, "digest_rounds": 0, "digest_repairs": 0, "asked_again": 0}

    def _previous_view(self):
        """(owners, backups) of the partition table the last bridge of this host published,
        or None; its marks are taken back at once."""
        try:
            view = json.loads(self.table.cluster() or b"{}")
        except ValueError:
            return None
        for tag, version in view.get("marks") or ():
            self._mark(tag, version, apply=False)
        self.flush_mark = max(self.flush_mark, view.get("flushmark") or 0)
        owners, backups = view.get("owners"), view.get("backups")
        if owners is None and view.get("held"):
            owners, backups = view["held"]  # it exited (closing_view), or died before it had a table
        if isinstance(owners, list) and len(owners) == self.parts:
            # What it was still handing off counts as held: it may be the only copy of writes.
            handing = set(view.get("outgoing") or ())
            owners = [self.me if p in handing else o for p, o in enumerate(owners)]
        if view.get("topology") != "partitioned" or not isinstance(owners, list) or len(owners) != self.parts \
                or not isinstance(backups, list) or len(backups) != self.parts:
            return None
        return owners, backups

    def last_ring(self):
        """The members of this cache's partition table: the current one, or the one this
        host's last bridge published (a restarted bridge that hears nobody must not count
        itself a majority of one: the others may be writing its partitions); empty
        when there is neither."""
        if self.owners is not None:
            return set(self.ring_members)
        if self.prev is not None:
            return {n for n in self.prev[0] + self.prev[1] if n is not None}
        return set()

    def holds_entries(self):
        """Whether this host may hold entries another member's partitions need: it kept
        a table from before, or has one and its segment holds entries."""
        return self.prev is not None or (self.owners is not None and self.table.size() > 0)

    # ---- the ring ----------------------------------------------------------------

    def mine(self, p):
        return self.owners is not None and self.owners[p] == self.me

    def flags(self, pick):
        """bytes of one flag per partition, set where pick(p) is true."""
        return bytes(1 if pick(p) else 0 for p in range(self.parts))

    def set_ring(self, members, reachable, settle=0.0):
        """Adopt the partition table of ``members`` (node ids in the ring); ``reachable``:
        the members that can still stream (the ring plus any member that is leaving).

        The first table of a bridge (which may be back from the dead, with a table
        others changed meanwhile) starts empty and takes for ``settle`` seconds
        whatever the previous owners hand back."""
        members = tuple(sorted(members))
        if members == self.ring_members and self.owners is not None:
            return False
        self._routes_changed(pause=True)
        owners, backup_of = assign(members, self.parts, self.backups)
        old_owners, old_backups = self.owners, self.backup_of
        returning = old_owners is None and self.prev is not None
        if returning:
            old_owners, old_backups = self.prev  # what this host held before: kept, reconciled
            self.prev = None
        if self.owners is None and settle > 0 and len(members) > 1:
            # Who probably held our partitions while we were away: the table without us.
            # Readers fall back to it until its handoff (if any) arrives.
            before = assign([m for m in members if m != self.me], self.parts)[0]
        else:
            before = None
        self.owners, self.backup_of, self.ring_members = owners, backup_of, members
        drop = bytearray(self.parts)
        to_send = {}  # new owner -> partitions we hand to it
        for p in range(self.parts):
            n, nb = owners[p], backup_of[p]
            if old_owners is None or returning:
                o, ob = (old_owners[p], old_backups[p]) if returning else (None, None)
                if n == self.me:
                    if o != self.me and ob != self.me:
                        drop[p] = 1  # L1 copies (local versions): never merged
                    if settle > 0 and len(members) > 1:
                        source = before[p] if before and before[p] in reachable else None
                        self.incoming[p] = Incoming(source, settle, settling=True)
                elif o == self.me or (ob == self.me and o not in reachable):
                    # Ours before (writes made in place since may be in it), or the only
                    # copy left: merged into its owner's, then dropped unless we back it up.
                    to_send.setdefault(n, set()).add(p)
                    self.outgoing[p] = None
                elif not (ob == self.me and nb == self.me):
                    drop[p] = 1
                continue
            o, ob = old_owners[p], old_backups[p]
            holding = (o == self.me and p not in self.incoming) or p in self.outgoing
            if n == self.me:
                self.outgoing.pop(p, None)  # handing it off no more: it is ours again
                inc = self.incoming.get(p)
                if holding or (inc is not None and (inc.source is None or inc.source in reachable)):
                    continue
                if o not in reachable and ob == self.me:
                    self.stats["promoted"] += 1  # our backup copy is the partition now
                    self.incoming.pop(p, None)
                    continue
                source = o if o in reachable else ob if ob in reachable else None
                drop[p] = 1  # what we held of it (L1 copies, an old backup) makes way
                if source is None or source == self.me:
                    self.stats["lost"] += 1  # owner and backup gone: its keys are misses
                    self.incoming.pop(p, None)
                else:
                    self.incoming[p] = Incoming(source)
                continue
            incoming = self.incoming.pop(p, None)
            if holding or (incoming is not None and incoming.source is not None) or (
                    ob == self.me and o not in reachable):
                # We hold it (all of it, what reached us, or the only copy left): to its new owner.
                to_send.setdefault(n, set()).add(p)
                self.outgoing[p] = None
            elif nb != self.me:
                drop[p] = 1
        # Streams still going to the right member go on (for the partitions still theirs).
        kept = []
        for st in self.streams:
            if st.role == "own":
                st.ps = {p for p in st.ps if owners[p] == st.target and p in self.outgoing}
            else:
                for p in st.ps:
                    self.backup_synced.pop(p, None)  # cut short: copy again to the new backup
                st.ps = set()
            if st.ps:
                kept.append(st)
        self.streams = kept
        for target, ps in to_send.items():
            self._start_stream(target, "own", ps)
        for p in range(self.parts):
            if owners[p] != self.me or self.backup_synced.get(p) != backup_of[p]:
                self.backup_synced.pop(p, None)
        if returning:
            self.stats["kept"] = sum(c for p, c in enumerate(self.table.partition_counts(self.parts)) if not drop[p])
        if any(drop):
            self.stats["dropped"] += self.table.drop_partitions(self.parts, bytes(drop))
        self.leases = {k: v for k, v in self.leases.items() if self.mine(partition_of(k, self.parts))}
        self._routes_changed()
        return True

    def _start_stream(self, target, role, ps):
        sid = next(self.sids)
        self.streams.append(Stream(sid, target, role, ps))
        if role == "own":
            for p in ps:
                self.outgoing[p] = sid

    def sync_backups(self):
        """Start a full copy of each partition we own to its backup, where the
        backup does not hold one yet (a new ring, a finished handoff)."""
        if not self.backups or self.owners is None:
            return
        todo = {}
        for p in range(self.parts):
            b = self.backup_of[p]
            if b is not None and self.owners[p] == self.me and p not in self.incoming \
                    and self.backup_synced.get(p) != b:
                todo.setdefault(b, set()).add(p)
                self.backup_synced[p] = b
        for target, ps in todo.items():
            self._start_stream(target, "backup", ps)

    # ---- streams out ---------------------------------------------------------------

    def pump_streams(self, send):
        """Send the next chunk of every stream; ``send(node, fields) -> bool``."""
        now = time.monotonic()
        still = []
        for s in self.streams:
            if s.cursor is None:
                if now - s.started > STREAM_STALL:
                    log.warning("cache %s: handoff %d of %d partitions to member %d was never acknowledged",
                                self.name, s.sid, len(s.ps), s.target)
                    self._finish_stream(s, s.ps)
                    continue
                if now - s.sent_at > RESEND:
                    # Not taken (the receiver had no table yet, or another one): again, afresh.
                    s.sid, s.cursor, s.chunk = next(self.sids), 0, 0
                    if s.role == "own":
                        for p in s.ps:
                            self.outgoing[p] = s.sid
                still.append(s)
                continue
            cursor, items = self.table.scan(s.cursor, CHUNK)
            entries, tombs = [], []
            for k, v, codec, ttl, tags, ver in items:
                if ttl == -1 or partition_of(k, self.parts) not in s.ps:
                    continue
                if codec == TOMBSTONE:
                    tombs.append([k, ver])
                elif codec < TOMBSTONE:
                    entries.append([k, v, codec, ttl, list(tags), ver])
            last = cursor is None
            fields = dict(c=self.name, sid=s.sid, chunk=s.chunk, role=s.role, ps=sorted(s.ps), last=last,
                          entries=[e[:5] for e in entries], vers=[e[5] for e in entries], tombs=tombs)
            if s.chunk == 0:
                # The marks first: the receiver drops what they kill before any entry lands.
                fields.update(marks=self.mark_list(), fm=self.flush_mark)
                if s.role == "backup":
                    fields["bseq"] = self.bseq.get(s.target, 0)  # the records this copy covers
                done = self.outcomes.of(s.ps)
                if done:
                    fields["done"] = done  # (a change asked for again there is not made twice)
            if not send(s.target, fields):
                still.append(s)  # no room now (or not connected): the same chunk again next turn
                continue
            s.cursor = cursor
            s.chunk += 1
            s.sent_at = now
            self.stats["handed_out"] += len(entries)
            still.append(s)
        self.streams = still

    def on_handack(self, sid, ps):
        """The receiver of stream ``sid`` took partitions ``ps`` (the others go again)."""
        for s in self.streams:
            if s.sid == sid:
                taken = s.ps & set(ps)
                self._finish_stream(s, taken)
                s.ps -= taken
                if not s.ps:
                    self.streams.remove(s)
                return

    def _finish_stream(self, s, ps):
        if s.role != "own":
            return
        drop = bytearray(self.parts)
        for p in ps:
            if self.outgoing.get(p) == s.sid:
                del self.outgoing[p]
                if self.owners[p] != self.me and self.backup_of[p] != self.me:
                    drop[p] = 1
        if any(drop):
            self.stats["dropped"] += self.table.drop_partitions(self.parts, bytes(drop))

    # ---- streams in ----------------------------------------------------------------

    def _in_sequence(self, sender, msg):
        """True when ``msg`` is the next chunk of its stream; a chunk after a gap (a message
        lost, or the first ones sent before we had a table) breaks the stream: it is never
        acknowledged, and its sender sends it again whole."""
        key = (sender, msg["sid"])
        expected = self.hand_next.get(key, 0)
        if msg["chunk"] != expected:
            if expected != -1:
                self.stats["stream_gaps"] += 1
                if len(self.hand_next) > 10_000:
                    self.hand_next.clear()
                self.hand_next[key] = -1
            return False
        if msg["last"]:
            self.hand_next.pop(key, None)
        else:
            self.hand_next[key] = expected + 1
        return True

    def on_hand(self, sender, inc, msg):
        """Entries of a stream from ``sender`` (incarnation ``inc``); at its end, the
        partitions taken (to acknowledge), else None. Without a table of our own, or
        after a gap in the stream, nothing is taken."""
        if self.owners is None or not self._in_sequence(sender, msg):
            self.repairing.pop((sender, msg["sid"]), None)  # (incomplete: never ends in removals)
            return None
        self.take_marks(msg.get("marks", ()), msg.get("fm", 0))
        vers = msg["vers"]
        ps = set(msg["ps"])
        self.outcomes.take(msg.get("done", ()), ps)
        if msg["role"] == "repair":
            return self._take_repair(sender, msg, ps)
        if msg["role"] == "backup":
            if msg["chunk"] == 0:
                # A fresh full copy: what we held of these partitions is replaced (but what
                # we are handing to the owner ourselves stays until it was taken).
                self.bgot[(sender, inc)] = msg.get("bseq", 0)
                drop = self.flags(lambda p: p in ps and not self.mine(p) and p not in self.outgoing)
                self.table.drop_partitions(self.parts, drop)
            for k, ver in msg.get("tombs", ()):
                if partition_of(k, self.parts) in ps and not self.mine(partition_of(k, self.parts)):
                    self.table.apply_delete(k, ver)
            for (k, v, codec, ttl, tags), ver in zip(msg["entries"], vers):
                p = partition_of(k, self.parts)
                if p in ps and not self.mine(p):
                    self._apply(k, v, codec, ttl, tags, ver)
            if not msg["last"]:
                return None
            return [p for p in ps if self.backup_of[p] == self.me]
        # What a handoff changes here, L1 copies elsewhere drop (they may have been read
        # from this member before the newer copy arrived).
        for k, ver in msg.get("tombs", ()):
            p = partition_of(k, self.parts)
            inc_p = self.incoming.get(p)
            if p in ps and self.mine(p) and not (inc_p is not None and k in inc_p.touched):
                if self.table.apply_delete(k, ver):
                    self.invals.append(k)
        for (k, v, codec, ttl, tags), ver in zip(msg["entries"], vers):
            p = partition_of(k, self.parts)
            if p not in ps or not self.mine(p):
                continue
            inc_p = self.incoming.get(p)
            # From any member: two copies of a key (a partition that moved twice, two sides
            # of a healed network split, a restarted member's table) meet by version.
            if inc_p is not None and (inc_p.flushed or k in inc_p.touched or inc_p.dead_tags.intersection(tags)):
                continue
            if self._apply(k, v, codec, ttl, tags, ver):
                self.invals.append(k)
            self.stats["handed_in"] += 1
        if not msg["last"]:
            return None
        now = time.monotonic()
        for p in ps:
            self.taken_at[p] = now
            inc = self.incoming.get(p)
            if inc is not None and (inc.settling or inc.source == sender):
                del self.incoming[p]
        self._routes_changed()
        return [p for p in ps if self.mine(p)]

    def _apply(self, k, v, codec, ttl, tags, version):
        """Keep a copy of ``k`` made elsewhere if it is newer than ours; True when kept."""
        if self.killed(tags, version):
            # Older than a tag invalidation or a flush this member saw: it existed and is
            # gone, and so is what we hold of the key from before it (a tombstone at its version).
            self.table.apply_delete(k, version)
            return False
        try:
            return bool(self.table.apply_put(k, v, codec, ttl, tags, version))
        except (CacheFull, ValueTooLarge) as exc:
            self.stats["errors"] += 1
            log.warning("cache %s: could not keep a handed-off entry: %s", self.name, exc)
            return False

    def regained(self, reachable, settle, since):
        """This member hears a majority again after a spell long enough for the others to
        have taken its partitions over (vela.bridge.quorum): each partition it owns settles
        until the member that held it meanwhile hands it back (merged by version), or for
        ``settle`` seconds; meanwhile a read-modify-write of a key not written here since
        waits (an incr on the value this member kept would count from a stale number).
        A partition handed back already (``since`` the majority was lost) has settled."""
        if self.owners is None:
            return
        others = [m for m in self.ring_members if m != self.me]
        if not others:
            return
        holder = assign(others, self.parts)[0]  # who held our partitions while we were cut off
        self._routes_changed(pause=True)
        for p in range(self.parts):
            if self.owners[p] == self.me and p not in self.incoming and holder[p] in reachable \
                    and self.taken_at.get(p, -1.0) < since:
                self.incoming[p] = Incoming(holder[p], settle, settling=True)
        self._routes_changed()

    def check_incoming(self, reachable):
        """Give up on partitions whose source died or went silent: what did not
        arrive is lost (misses), the rest is served."""
        now = time.monotonic()
        before = len(self.incoming)
        for p, inc in list(self.incoming.items()):
            if inc.settling and (now > inc.deadline or inc.source not in reachable):
                del self.incoming[p]  # the settling time of a new table is over: nothing more comes
            elif inc.source is not None and (inc.source not in reachable or now > inc.deadline):
                log.warning("cache %s: partition %d: handoff from member %d did not complete", self.name, p,
                            inc.source)
                del self.incoming[p]
        if len(self.incoming) != before:
            self._routes_changed()

    # ---- marks: tag invalidations and flushes --------------------------------------------

    def _mark(self, tag, version, apply=True):
        """Remember (and with ``apply``, carry out here) an invalidation of ``tag`` at
        ``version``: entries with the tag older than it go, and stay out."""
        known = self.marks.get(tag)
        if known is not None and known[0] >= version:
            return
        self.marks[tag] = (version, time.monotonic() + MARK_TTL)
        if len(self.marks) > MARKS_KEPT:
            self.marks = {t: m for t, m in sorted(self.marks.items(), key=lambda tm: -tm[1][0])[:MARKS_KEPT]}
        if apply:
            self.table.apply_tag(tag, version)

    def take_marks(self, marks, flush_mark):
        """Marks another member sent (a handoff's head): applied here too."""
        for tag, version in marks:
            self._mark(tag, version)
        if flush_mark > self.flush_mark:
            self.flush_mark = flush_mark
            self.table.apply_flush(flush_mark)

    def mark_list(self, newest=None):
        now = time.monotonic()
        self.marks = {t: m for t, m in self.marks.items() if m[1] > now}
        marks = sorted(([t, m[0]] for t, m in self.marks.items()), key=lambda tm: -tm[1])
        return marks[:newest] if newest else marks

    def killed(self, tags, version):
        """True when an entry of ``version`` with ``tags`` is older than a mark."""
        if version < self.flush_mark:
            return True
        for t in tags:
            m = self.marks.get(t)
            if m is not None and m[0] > version:
                return True
        return False

    # ---- backups and invalidations ----------------------------------------------------

    def on_brec(self, origin, inc, seq, records, clock=0):
        """Backup copies of an owner's writes, with the owner's versions (which the table's
        clock observes, so a promoted copy is newer than nothing the owner wrote before).
        ``seq`` numbers the owner's record messages to us (an empty one repeats the last
        number every heartbeat): a gap, or an owner incarnation we never had a full copy
        from, asks the owner for a full copy again. True when ``seq`` is to be
        acknowledged (records, and no gap before them)."""
        if clock:
            self.table.observe(clock)  # (an owner's clock: a backup promoted later writes past it)
        got = self.bgot.get((origin, inc))
        if got is None:
            gap = seq != 0 or bool(records)
        else:
            gap = seq != got + 1 if records else seq > got
        if gap:
            self.repairs.add(origin)
        self.bgot[(origin, inc)] = seq if got is None else max(got, seq)
        confirmed = bool(records) and not gap
        for record in records:
            k, v, codec, ttl, tags, ver = record[:6]
            if self.mine(partition_of(k, self.parts)):
                # Stale: we own it now (the sender does not know yet). Not confirmed: the
                # owner we replaced must not acknowledge a write that is not in our copy.
                confirmed = False
                continue
            if v is None:
                self.table.apply_delete(k, ver)  # a tombstone (a put the owner made after it may be here first)
            else:
                self._apply(k, v, codec, ttl, tags, ver)
            if len(record) == 8:  # (what a change made at most once answered)
                self.outcomes.remember(record[6], partition_of(k, self.parts), record[7])
            self.stats["backup_records"] += 1
            for rep in self.repairing.values():
                if rep.sender == origin and partition_of(k, self.parts) in rep.ps:
                    rep.recorded.add(k)  # the owner wrote it since the repair began: it stays
        return confirmed  # the caller acknowledges ``seq`` (it and every record before it are here)

    def on_brack(self, backup, seq):
        """``backup`` holds our records up to message ``seq``."""
        if seq > self.backup_acked.get(backup, -1):
            self.backup_acked[backup] = seq

    def take_wait(self):
        """What the reply to the request just served waits for (None: nothing)."""
        wait, self.wait = self.wait, {}
        return wait or None

    def backed_up(self, wait):
        return all(self.backup_acked.get(backup, -1) >= seq for backup, seq in wait.items())

    def on_repair(self, node):
        """Backup ``node`` lost some of our records (or restarted): copy it again in full."""
        self.stats["repairs"] += 1
        for p, b in list(self.backup_synced.items()):
            if b == node:
                del self.backup_synced[p]

    def member_restarted(self, node):
        """``node`` came back as a new incarnation (it kept its table and reconciles its
        own partitions when it takes its table): our backup copies on it are copied again
        at once, and nothing of its previous incarnation's streams is expected any more."""
        self.on_repair(node)
        self.bgot = {k: v for k, v in self.bgot.items() if k[0] != node}
        self.hand_next = {k: v for k, v in self.hand_next.items() if k[0] != node}
        self.repairing = {k: v for k, v in self.repairing.items() if k[0] != node}
        self.digest_misses.pop(node, None)
        self.sync_backups()

    def brec_messages(self, brecs, beat):
        """[(backup node, fields)] of the backup records to send; on a heartbeat, every
        backup of ours hears our last sequence number even without records."""
        targets = set(brecs)
        if beat and self.owners is not None:
            targets |= {b for p, b in enumerate(self.backup_of)
                        if b is not None and b != self.me and self.owners[p] == self.me}
        out = []
        for b in targets:
            recs = brecs.get(b, [])
            for chunk in [recs[i:i + BREC_CHUNK] for i in range(0, len(recs), BREC_CHUNK)] or [[]]:
                if chunk:
                    self.bseq[b] = self.bseq.get(b, 0) + 1
                out.append((b, dict(c=self.name, recs=chunk, seq=self.bseq.get(b, 0), clk=self.table.next_version())))
            if recs:
                seqs = self.rec_seq.setdefault(b, {})
                for p in self.unsent.pop(b, ()):
                    seqs[p] = self.bseq[b]  # (quiet once the backup acknowledged it: digest_messages)
        return out

    # ---- anti-entropy: digests of backup copies ------------------------------------------

    def digest_messages(self, now, interval):
        """[(backup node, fields)] of an anti-entropy round, due every ``interval`` seconds:
        to each backup, the digests of the partitions it holds a copy of that are quiet
        (copied in full, no stream to it in flight, every record of the partition sent
        and acknowledged) -- where the two copies must be equal."""
        if not self.backups or self.owners is None or now < self.digest_at:
            return []
        self.digest_at = now + interval
        busy = {(s.target, p) for s in self.streams for p in s.ps}
        quiet = {}
        for p in range(self.parts):
            b = self.backup_of[p]
            if b is None or b == self.me or not self.mine(p) or p in self.incoming or p in self.outgoing \
                    or self.backup_synced.get(p) != b or (b, p) in busy or p in self.unsent.get(b, ()):
                continue
            seq = self.rec_seq.get(b, {}).get(p)
            if seq is None or self.backup_acked.get(b, -1) >= seq:
                quiet.setdefault(b, []).append(p)
        if not quiet:
            return []
        digests = self._digests()
        self.digest_round += 1
        return [(b, dict(c=self.name, r=self.digest_round, ps=ps, d=[list(digests[p]) for p in ps]))
                for b, ps in quiet.items()]

    def on_digest(self, origin, inc, rnd, ps, digests):
        """Digests of round ``rnd`` of owner ``origin`` (incarnation ``inc``) for our backup
        copies of partitions ``ps``: the partitions to copy again from it (they differed
        in this round and in the one before), logged and counted."""
        if self.owners is None or origin in self.repairs:
            return []  # (no table yet, or a full copy is asked for already)
        repairing = {p for r in self.repairing.values() if r.sender == origin for p in r.ps}
        ours = None
        differ = set()
        for p, theirs in zip(ps, digests):
            if p >= self.parts or self.owners[p] != origin or self.backup_of[p] != self.me or p in repairing:
                continue  # (tables that disagree for a moment: not ours to compare)
            if ours is None:
                ours = self._digests()
            if list(ours[p][:2]) != theirs[:2] and list(ours[p][2:]) != theirs[2:]:
                differ.add(p)
        self.stats["digest_rounds"] += 1
        before = self.digest_misses.get(origin)
        again = sorted(differ & before[2]) if before is not None and before[:2] == (inc, rnd - 1) else []
        self.digest_misses[origin] = (inc, rnd, differ.difference(again))
        if again:
            self.stats["digest_repairs"] += 1
            log.warning("cache %s: the backup copy of partitions %s differs from member %d's (two digest "
                        "rounds): copying them again", self.name, again, origin)
        return again

    def _digests(self):
        """[(entries, digest, entries, digest)] of each partition: past each of DIGEST_MARGINS."""
        near, far = (int(m * 1e9) for m in DIGEST_MARGINS)
        return self.table.partition_digests(self.parts, near, far)

    def on_repair_partitions(self, node, ps):
        """Backup ``node`` found its copy of partitions ``ps`` different from ours: a "repair"
        stream of them corrects it in place (those we still own, with ``node`` their backup,
        and not on their way to it already)."""
        busy = {p for s in self.streams if s.target == node for p in s.ps}
        ps = {p for p in ps if p < self.parts and self.mine(p) and self.backup_of[p] == node
              and p not in self.incoming and p not in busy}
        if ps:
            self._start_stream(node, "repair", ps)

    def _take_repair(self, sender, msg, ps):
        """A chunk of a "repair" stream (on_hand): the owner's entries and tombstones of
        the partitions we back up replace ours, also a newer version of ours that no record
        of the owner's wrote (the copy was read after every record that came before it); at
        the end, the keys it did not carry go. The partitions are acknowledged at the end."""
        key = (sender, msg["sid"])
        if msg["chunk"] == 0:
            now = time.monotonic()
            self.repairing = {k: r for k, r in self.repairing.items() if now - r.started < STREAM_STALL}
            self.repairing[key] = Repair(sender, {p for p in ps if p < self.parts and self.owners[p] == sender
                                                  and self.backup_of[p] == self.me})
        rep = self.repairing.get(key)
        if rep is None:
            return None
        for k, ver in msg.get("tombs", ()):
            if partition_of(k, self.parts) in rep.ps:
                self._repair_key(rep, k, ver, lambda k=k, ver=ver: self.table.apply_delete(k, ver))
        for (k, v, codec, ttl, tags), ver in zip(msg["entries"], msg["vers"]):
            if partition_of(k, self.parts) in rep.ps:
                self._repair_key(rep, k, ver, lambda k=k, v=v, codec=codec, ttl=ttl, tags=tags, ver=ver:
                                 self._apply(k, v, codec, ttl, tags, ver))
        if not msg["last"]:
            return None
        del self.repairing[key]
        self._drop_uncopied(rep)
        return sorted(ps)

    def _repair_key(self, rep, k, ver, take):
        rep.copied.add(k)
        take()
        if k in rep.recorded:
            return  # (a record of the owner's wrote it since: newer than the copy)
        raw = self.table.get_raw(k, False)
        if raw is not None and raw[4] > ver:
            self.table.invalidate(_native.decode_key(k))  # ours is newer than the owner's: not the owner's
            take()

    def _drop_uncopied(self, rep):
        """The end of a repair: the live keys of its partitions that neither its copy nor a
        record since carried go (the owner does not hold them)."""
        keep = rep.copied | rep.recorded
        doomed = []
        cursor = 0
        while cursor is not None:
            cursor, items = self.table.scan(cursor, CHUNK)
            doomed += [k for k, _v, codec, ttl, _tags, _ver in items
                       if codec < TOMBSTONE and ttl != -1 and k not in keep and partition_of(k, self.parts) in rep.ps]
        for k in doomed:
            self.table.invalidate(_native.decode_key(k))

    def take_repairs(self):
        repairs, self.repairs = self.repairs, set()
        return repairs

    def pump_local(self):
        """Backup records and invalidations for the writes this host's workers made in
        place (the table's change log). If the log ran over us, every backup is copied
        again in full and every host drops its L1 copies."""
        if self.owners is None:
            return  # (a restarted bridge: its table first, then what workers wrote meanwhile)
        records, pos, lapped = self.table.log_read(self.log_pos, LOG_BATCH)
        dropped = self.table.log_state()["dropped"]
        if lapped or dropped != self.log_dropped:
            log.warning("cache %s: writes were lost to the change log; copying backups again", self.name)
            self.log_dropped = dropped
            self.log_pos = self.table.log_state()["head"]
            self.table.log_commit(self.log_pos)
            self.backup_synced.clear()
            self.streams = [st for st in self.streams if st.role != "backup"]
            self.invals.append(b"")
            self.stats["log_lapped"] += 1
            return
        for op, k, v, codec, ttl, tags, ver in records:
            p = partition_of(k, self.parts)
            if self.mine(p) and (op != PUT or ttl != -1):
                record = [k, v, codec, ttl, list(tags), ver] if op == PUT else [k, None, 0, 0, [], ver]
                self._changed(k, p, record, touched=False)
            else:
                # It moved since (its copy went with it) or expired: L1 copies drop all the same.
                self.invals.append(k)
            self.stats["local_writes"] += 1
        if pos != self.log_pos:
            self.log_pos = pos
            self.table.log_commit(pos)

    # ---- near cache: this host's L1 copies of other members' keys ---------------------

    def l1(self, p):
        """True when what this host keeps of partition p are L1 copies (the near cache)."""
        return not self.mine(p) and self.backup_of[p] != self.me and p not in self.outgoing

    def drop_l1(self, pick=None):
        """Drop this host's L1 copies (of the partitions ``pick(p)`` names). Fills in
        flight are voided first: a copy read before the change that made us drop it
        must not land after."""
        if self.owners is None:
            return  # no table yet: which partitions hold copies is not known
        self.table.invalidate_all()
        self.table.drop_partitions(self.parts, self.flags(lambda p: self.l1(p) and (pick is None or pick(p))))

    def on_inval(self, origin, inc, seq, keys):
        """Drop the L1 copies of keys member ``origin`` (incarnation ``inc``) changed
        (b"": all of them); ``seq`` numbers its invalidation messages."""
        before = self.numbering.highest(origin)
        if self.owners is not None and self.numbering.received(origin, inc, seq):
            self._lost_invals(origin, before, seq - 1)
        for k in keys:
            if not k:
                self.drop_l1()
                continue
            p = partition_of(k, self.parts)
            if self.owners is None or self.l1(p):
                self.table.invalidate(_native.decode_key(k))

    def on_inval_seq(self, origin, inc, last):
        """A heartbeat of ``origin``: ``last`` is the number of its latest invalidation
        message (so a lost last message is noticed without waiting for the next one)."""
        if self.owners is None:
            return  # numbers are first taken with a table: that first contact drops the copies
        before = self.numbering.highest(origin)
        # (a heartbeat travels after the messages before it, on the same pipe)
        if self.numbering.counted(origin, inc, last) or self.numbering.announced(origin, inc, last):
            self._lost_invals(origin, before, last)

    def _lost_invals(self, origin, before, last):
        """Invalidations of ``origin`` may be lost (vela.stores.near.Numbering): every L1 copy of
        its partitions goes (on a first contact or a restart, too)."""
        if self.numbering.gaps != self.stats["inval_gaps"]:
            self.stats["inval_gaps"] = self.numbering.gaps
            log.warning("cache %s: invalidations %d..%d from member %d were lost: its L1 copies dropped",
                        self.name, before + 1, last, origin)
        self.drop_l1(lambda p: self.owners[p] == origin)

    def _op_near(self, msg):
        """The second step of invalidate_tag (``tag``) and flush (no tag), once every
        owner has removed its entries: this host's L1 copies of them go. Fills in flight
        are voided first, so a copy read from an owner before its step cannot land after."""
        if msg.get("tag") is None:
            self.drop_l1()
        else:
            self.table.invalidate_all()
            self.table.apply_tag(_native.tag_hash(copy_tag(msg["tag"])), self.table.next_version(), self.parts,
                                 bytes(self.parts))  # (copies are not counted: only owned entries are)
        return {"ok": True}

    def _changed(self, k, p, record, touched=True):
        """A write to owned key ``k`` was made: backup and L1 copies follow. With
        ``touched``, it was made here after the partition became ours: it wins over what
        a former holder hands over (a write made in place that the log brings now may be
        older than that)."""
        b = self.backup_of[p]
        if b is not None:
            self.brecs.setdefault(b, []).append(record)
            self.unsent.setdefault(b, set()).add(p)
        self.invals.append(k)
        inc = self.incoming.get(p)
        if inc is not None and touched:
            inc.touched.add(k)

    def _await_backup(self, p, sent=False):
        """The reply to this write waits until the backup holds its record: an owner cut
        off or killed a moment later must not have acknowledged a write (an increment, a
        delete) the member that takes the partition over (from the backup copy) never saw.
        ``sent``: also for the records already sent (the write was made earlier)."""
        b = self.backup_of[p]
        if b is None or b == self.me:
            return
        if self.brecs.get(b):
            self.wait[b] = self.bseq.get(b, 0) + 1 + (len(self.brecs[b]) - 1) // BREC_CHUNK
        elif sent and 0 < self.bseq.get(b, 0) > self.backup_acked.get(b, -1):
            self.wait[b] = self.bseq[b]

    def _made(self, msg, p, result):
        """A change made at most once was made: its outcome is remembered by the request's
        id, and goes to the backup with its record (the record's tail; vela.bridge.outcomes)."""
        rid = msg.get("rid")
        if rid is None:
            return ()
        self.outcomes.remember(rid, p, result)
        return (rid, result)

    def _changed_entry(self, k, p, made=()):
        """Record the entry now stored under ``k`` (after incr/touch) for backups; ``made``:
        the request id and outcome of a change made at most once (``_made``)."""
        raw = self.table.get_raw(k, False)  # (no lookup of the caller's: not counted)
        if raw is None:
            self._changed(k, p, [k, None, 0, 0, [], self.table.next_version(), *made])
        else:
            v, codec, ttl, tags, version = raw
            self._changed(k, p, [k, v, codec, ttl, list(tags), version, *made])

    def take_outbound(self, now, delay):
        """(backup records per node, invalidation messages) to send now: those gathered since
        the last send, once ``delay`` seconds have passed since it (a write after a quiet
        spell goes at once; a run of writes travels in a few messages, not one per write
        to every member)."""
        if not (self.brecs or self.invals) or (now - self.outbound_at < delay and len(self.invals) < INVAL_BATCH):
            return {}, []
        self.outbound_at = now
        brecs, invals = self.brecs, self.invals
        self.brecs, self.invals = {}, []
        messages = []
        for i in range(0, len(invals), INVAL_BATCH):
            self.inval_seq += 1  # numbered, so a receiver notices one it did not get
            messages.append({"seq": self.inval_seq, "ks": invals[i:i + INVAL_BATCH]})
        return brecs, messages

    # ---- requests from workers ------------------------------------------------------

    def serve(self, msg, addr_of, conn_id=None):
        """Answer one worker request (a dict); ``addr_of(node)`` gives a member's address;
        ``conn_id`` names the connection it came on (a lease dies with it). Every reply
        carries this member's clock ("ver"): the worker's table observes it, so what the
        worker writes next (in place, on its host) is newer than what it saw here, whatever
        the two hosts' wall clocks say; a request carries the worker's clock ("clk"), which
        this member's clock observes before it writes (the two make a hybrid logical clock
        that follows the worker from host to host)."""
        if msg.get("clk"):
            # The worker's clock: what this member writes for it now is newer than anything
            # the worker wrote or saw before (in place on its host, or on another member).
            self.table.observe(msg["clk"])
        reply = self._serve(msg, addr_of, conn_id)
        reply["ver"] = self.table.next_version()
        return reply

    def _serve(self, msg, addr_of, conn_id):
        self.conn_id = conn_id
        self.stats["requests"] += 1
        op = msg["op"]
        if self.owners is None:
            return {"retry": "this member has no partition table yet"}
        if op in WRITES and not self.node.quorum.writable:
            return {"err": "BridgeUnavailable",
                    "msg": f"cache {self.name!r}: member {self.me} does not hear a majority of the cluster: "
                           "it serves no writes until it does (reads go on)"}
        if op in WRITES and msg.get("e", 0) < self.node.ring_epoch:
            # Routed by an older table than ours: maybe a request that waited in the network
            # through a split, whose worker gave up on it and wrote since (it must not land
            # now, with a new version, over what came after). Its worker, if still waiting,
            # asks again once its host's bridge has the newer table (a heartbeat at most).
            return {"retry": "the request was routed by an older partition table"}
        if op in ("size", "stats", "flush", "tag", "near", "expire"):
            return getattr(self, "_op_" + op)(msg)
        if op in ("getm", "delm"):
            return self._op_many(op, msg, addr_of)
        if op == "putm":
            return self._op_putm(msg, addr_of)
        k = msg["k"]
        p = partition_of(k, self.parts)
        if msg.get("fb"):
            # A read sent here because we are handing the partition off.
            if p in self.outgoing:
                self.stats["fallbacks"] += 1
                return self._read(op, k)
            return self._moved(p, addr_of)
        if not self.mine(p):
            return self._moved(p, addr_of)
        if op in ONCE and "rid" in msg:
            made = self.outcomes.result(msg["rid"], p)
            if made is not None:
                # Asked again (the answer to the first try never reached the worker): it
                # was made, here or by the member we took the partition over from.
                self.stats["asked_again"] += 1
                self._await_backup(p, sent=True)
                return {"ok": made}
            if "again" in msg and self.outcomes.unknown(msg["again"] / 1000):
                return {"err": "BridgeUnavailable",
                        "msg": f"cache {self.name!r}: the {ONCE[op]} may or may not have been made: the "
                               f"bridge of member {self.me} restarted while it was on its way, before it "
                               "answered (it is not made a second time)"}
        inc = self.incoming.get(p)
        if inc is not None and inc.source is not None and k not in inc.touched and not inc.flushed \
                and not (msg.get("own") and op in ("get", "has", "ttl")) and (
                inc.settling or not self.table.contains(_native.decode_key(k))):
            # Not here yet, or (settling: this member is back from a restart or a split) what
            # is here may be older than what the former holder hands back: read it there,
            # and let a read-modify-write wait (an incr must not count from a stale copy).
            # ("own": the former holder said it does not hold the partition.)
            if op in ("get", "has", "ttl"):
                return {"fb": addr_of(inc.source)}
            if op in ("incr", "touch", "fetch", "add", "repl", "cas"):
                return {"retry": "the partition is being handed over"}
        return getattr(self, "_op_" + op)(k, p, msg)

    def _moved(self, p, addr_of):
        self.stats["moved"] += 1
        return {"moved": addr_of(self.owners[p]), "epoch": self.node.ring_epoch}

    def _read(self, op, k):
        raw = self.table.get_raw(k) if op == "get" else None
        if op == "get":
            # (the tags go with the value: an L1 copy made of it carries them)
            return {"miss": True} if raw is None else {"val": raw[0], "codec": raw[1], "ttl": raw[2],
                                                       "tags": list(raw[3])}
        found, remaining = self.table.ttl(_native.decode_key(k))
        if op == "has":
            return {"ok": bool(found)}
        return {"ok": found, "ttl": remaining}

    def _op_get(self, k, p, msg):
        return self._read("get", k)

    def _op_has(self, k, p, msg):
        return self._read("has", k)

    def _op_ttl(self, k, p, msg):
        return self._read("ttl", k)

    def _op_put(self, k, p, msg):
        holder = msg.get("holder")
        if holder is not None:  # the value of a get_or_fetch's fetch
            self.table.bump("fetches")
            lease = self.leases.get(k)
            if lease is not None and lease[0] == holder:
                del self.leases[k]
        version = self.table.next_version()
        self.table.apply_put(k, msg["val"], msg["codec"], msg["ttl"], msg["tags"], version)
        self.table.bump("writes")
        self._changed(k, p, [k, msg["val"], msg["codec"], msg["ttl"], list(msg["tags"]), version])
        if self.sync_writes:
            self._await_backup(p)
        return {"ok": True}

    def _put_if(self, k, p, msg, cond):
        """A conditional put (add, replace, cas): checked and made in one step under the
        key's stripe lock (so also atomic with the writes this host's workers make in
        place); its reply waits for the backup, as an incr's does."""
        stored = self.table.put_if_raw(k, cond, msg.get("xval", b""), msg.get("xcodec", 0), msg["val"],
                                       msg["codec"], msg["ttl"], msg["tags"])
        if stored:
            self._changed_entry(k, p, self._made(msg, p, True))
            self._await_backup(p)
        return {"ok": stored}

    def _op_add(self, k, p, msg):
        return self._put_if(k, p, msg, _native.PUT_IF_ABSENT)

    def _op_repl(self, k, p, msg):
        return self._put_if(k, p, msg, _native.PUT_IF_PRESENT)

    def _op_cas(self, k, p, msg):
        return self._put_if(k, p, msg, _native.PUT_IF_EQUAL)

    def _op_del(self, k, p, msg):
        version = self.table.next_version()
        removed = self.table.apply_delete(k, version)  # a tombstone: an older copy elsewhere stays out
        self._changed(k, p, [k, None, 0, 0, [], version])
        if self.sync_writes:
            self._await_backup(p)
        return {"ok": bool(removed)}

    def _op_incr(self, k, p, msg):
        try:
            value = self.table.incr(_native.decode_key(k), msg["delta"], msg["ttl"], msg.get("init", 0))
        except TypeError as exc:
            return {"err": "TypeError", "msg": str(exc)}
        except OverflowError as exc:
            return {"err": "OverflowError", "msg": str(exc)}
        self._changed_entry(k, p, self._made(msg, p, value))
        self._await_backup(p)
        return {"ok": value}

    def _op_touch(self, k, p, msg):
        found = self.table.touch(_native.decode_key(k), msg["ttl"])
        if found:
            self._changed_entry(k, p)
            if self.sync_writes:
                self._await_backup(p)
        return {"ok": bool(found)}

    def _op_fetch(self, k, p, msg):
        raw = self.table.get_raw(k)
        if raw is not None:
            return {"val": raw[0], "codec": raw[1], "ttl": raw[2]}
        now = time.monotonic()
        lease = self.leases.get(k)
        if lease is None or lease[1] < now or lease[0] == msg["holder"]:
            self.leases[k] = (msg["holder"], now + self.lease_ttl, self.conn_id)
            return {"lease": True}
        self.table.bump("stampede_waits")
        return {"wait": True}

    def release_leases(self, conn_id):
        """Drop the leases taken over connection ``conn_id`` (it closed: its worker died,
        or gave up on a request); their waiters may fetch at once."""
        self.leases = {k: v for k, v in self.leases.items() if v[2] != conn_id}

    def _op_abort(self, k, p, msg):
        lease = self.leases.get(k)
        if lease is not None and lease[0] == msg["holder"]:
            del self.leases[k]
        return {"ok": True}

    def _op_many(self, op, msg, addr_of):
        """Keys of one owner in one request; keys that are not simply ours come back
        under "redo" (the worker asks for them one by one)."""
        out, redo = [], []
        for i, k in enumerate(msg["ks"]):
            p = partition_of(k, self.parts)
            inc = self.incoming.get(p)
            if not self.mine(p) or (inc is not None and k not in inc.touched):
                redo.append(i)
                out.append(None)
                continue
            if op == "getm":
                raw = self.table.get_raw(k)
                out.append(None if raw is None else [raw[0], raw[1], raw[2], list(raw[3])])
            else:
                out.append(bool(self._op_del(k, p, msg)["ok"]))
        return {"ok": out, "redo": redo}

    def _op_putm(self, msg, addr_of):
        redo = []
        for i, (k, v, codec) in enumerate(msg["items"]):
            p = partition_of(k, self.parts)
            if not self.mine(p):
                redo.append(i)
                continue
            self._op_put(k, p, dict(val=v, codec=codec, ttl=msg["ttl"], tags=msg["tags"]))
        return {"ok": True, "redo": redo}

    def owned_flags(self):
        return self.flags(self.mine)

    def servable(self):
        """A flag per partition whose gets may be answered from the table with no Python
        step (the native data port): ours, and nothing on its way to us (a handoff, or
        settling after a restart or a split: those reads go through ``_serve``). None
        before the first partition table."""
        if self.owners is None:
            return None
        return self.flags(lambda p: self.owners[p] == self.me and p not in self.incoming)

    def _routes_changed(self, pause=False):
        """Tells the bridge (``on_routes(self, servable)``) what may be served natively now;
        ``pause``: nothing, while a change is being made (before it is whole)."""
        if self.on_routes is not None:
            self.on_routes(self, None if pause else self.servable())

    def owned_size(self):
        counts = self.table.partition_counts(self.parts)
        return sum(c for p, c in enumerate(counts) if self.mine(p))

    def _op_expire(self, msg):
        return {"ok": self.table.expire()}

    def _op_size(self, msg):
        return {"ok": self.owned_size()}

    def _op_stats(self, msg):
        counters = self.table.stats(bool(msg.get("reset")))
        info = self.table.info()
        counters.update(size=self.owned_size(), memory_used=info["memory_used"], capacity=info["capacity"])
        return {"ok": counters}

    def _op_flush(self, msg):
        removed = self.owned_size()
        self.flush_mark = self.table.next_version()
        self.table.drop_partitions(self.parts, b"\x01" * self.parts)
        for inc in self.incoming.values():
            inc.flushed = True
        self.leases.clear()
        self.invals.append(b"")  # "" stands for "everything": L1 copies elsewhere drop
        return {"ok": removed}

    def _op_tag(self, msg):
        tag = msg["tag"]
        version = self.table.next_version()
        # (every entry of the tag here goes: owned, backup copies, L1 copies; the count is the owned ones)
        removed = self.table.apply_tag(tag, version, self.parts, self.owned_flags())
        self._mark(tag, version, apply=False)
        for inc in self.incoming.values():
            inc.dead_tags.add(tag)
        return {"ok": removed}

    def status(self):
        owned = sum(1 for p in range(self.parts) if self.mine(p)) if self.owners else 0
        backed = sum(1 for b in self.backup_of if b == self.me)
        return dict(self.stats, partitions=self.parts, owned=owned, backup_of=backed,
                    incoming=len(self.incoming), outgoing=len(self.outgoing), streams=len(self.streams),
                    leases=len(self.leases), native_gets=self.served_natively,
                    ready=self.owners is not None and not self.incoming)

    def closing_view(self):
        """The view a bridge leaves in the segment when it exits: no table to route by (its
        workers stop writing in place at once), but what this host held and the marks,
        for the next bridge of the host to take back."""
        held = [self.owners, self.backup_of] if self.owners is not None else self.prev
        return json.dumps({"topology": "partitioned", "owners": None, "held": held,
                           "outgoing": sorted(self.outgoing), "marks": self.mark_list(MARKS_PUBLISHED),
                           "flushmark": self.flush_mark}).encode()

    def view(self):
        """What workers route by (written into the segment's cluster view)."""
        return {"partitions": self.parts, "owners": self.owners, "backups": self.backup_of,
                "incoming": {str(p): inc.source for p, inc in self.incoming.items()},
                "marks": self.mark_list(MARKS_PUBLISHED), "flushmark": self.flush_mark,
                "outgoing": sorted(self.outgoing), "held": self.prev,  # (outgoing: held until handed off)
                "writable": self.node.quorum.writable,  # (a minority: its workers write nothing in place)
                "sync_backups": self.sync_writes}  # (its workers write nothing in place either)


def error_reply(exc):
    """A worker-facing reply for an exception raised while serving a request: the
    errors a local call would raise keep their name; anything else is reported as
    this bridge failing the request (the bridge goes on)."""
    if isinstance(exc, (CacheFull, ValueTooLarge, LockTimeout)):
        return {"err": type(exc).__name__, "msg": str(exc)}
    return {"err": "BridgeUnavailable", "msg": f"the bridge could not serve the request: {type(exc).__name__}: {exc}"}
